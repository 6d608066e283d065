"""Kernel launches, counted: what a step would put on an NPU's queue, attributed to the layer
that launched it.

The NPU runs what the host queues; every queued kernel costs a launch (tens of microseconds of
host and device time on Ascend, which is why decode is launch-bound in eager and piecewise
modes and why vllm-ascend captures graphs). ``KernelCounter`` counts, while a block runs:

- every emulated torch_npu function the caller invokes (one kernel each; what the emulator
  computes inside it is its own business, not the caller's);
- every PyTorch operator the caller dispatches that does work on the device: arithmetic,
  copies and casts, fills, index and cat ops, reductions (a composite operator, which
  ``inference_mode`` hands over undecomposed, is counted as what it decomposes into). Views (``view``, ``reshape`` of a
  contiguous tensor, slicing, ``transpose``, ``split``: operators whose schema says the result
  aliases the input without writing it) and allocations (``empty*``) launch nothing and are not
  counted. A tensor made from a Python list (``torch.tensor([...])``) is a host-to-device copy
  and counts;
- collectives, reported by the parallel context a test gives the model (``collective``).

Attribution: a decoder layer's kernels are those launched between its forward-pre and forward
hooks (``attach(model)``); the rest is "outside any layer" (embedding, final norm, LM head, and
the per-step work a graph does once before its layers).

Custom operators (``torch.library``, e.g. the project's MoE op) are entered: their
CompositeExplicitAutograd implementation runs under the counter, so the kernels inside count.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

OUTSIDE = "outside any layer"
# operators that allocate, alias or read metadata: no kernel is launched for them
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
             "_unsafe_view", "alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
             "sym_storage_offset", "is_same_size", "resize_", "set_", "_local_scalar_dense",
             "is_nonzero"}
# operators whose own implementation is entered (their insides are counted instead)
ENTERED_NAMESPACES = ("ascend_qwen3",)


def is_view(func) -> bool:
    """The schema says every result aliases an input and nothing is written."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


def launches_kernel(func) -> bool:
    name = func._schema.name.split("::", 1)[-1]
    returns_tensor = any("Tensor" in str(r.type) for r in func._schema.returns)
    return returns_tensor and name not in NO_KERNEL and not is_view(func)


_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


class KernelCounter(TorchDispatchMode):
    """Counts kernel launches per layer (module docstring). ``kernels``: (layer, name) in launch
    order."""

    def __init__(self, call_log):
        super().__init__()
        self.log = call_log
        self.layer = OUTSIDE
        self.kernels: list[tuple[str, str]] = []

    # --- sources of kernels ---------------------------------------------------------------------

    def _torch_npu_call(self, name, args, kwargs, result) -> None:
        if self.log.depth == 0:                 # not one emulated function calling another
            self.kernels.append((self.layer, f"torch_npu.{name}"))

    def collective(self, name: str) -> None:
        self.kernels.append((self.layer, f"collective.{name}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.log.depth > 0:                  # inside an emulated torch_npu kernel
            return func(*args, **kwargs)
        if func.namespace in ENTERED_NAMESPACES:
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        if func.has_kernel_for_dispatch_key(_COMPOSITE):
            # a composite (e.g. `to`, `linear` under inference_mode): what it decomposes into
            # is what runs (`to` the same dtype is no kernel at all)
            with self:
                return func.decompose(*args, **kwargs)
        if launches_kernel(func):
            name = func._schema.name.split("::", 1)[-1]
            self.kernels.append((self.layer, "h2d_copy" if name == "lift_fresh_copy" else
                                 f"aten.{name}"))
        return func(*args, **kwargs)

    def __enter__(self):
        self._entered = getattr(self, "_entered", 0) + 1     # re-entered for custom operators
        if self._entered == 1:
            self.log.listeners.append(self._torch_npu_call)
        return super().__enter__()

    def __exit__(self, *exc):
        self._entered -= 1
        if self._entered == 0:
            self.log.listeners.remove(self._torch_npu_call)
        return super().__exit__(*exc)

    # --- results -----------------------------------------------------------------------------------

    def per_layer(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = collections.defaultdict(list)
        for layer, name in self.kernels:
            out[layer].append(name)
        return dict(out)

    def count(self, layer: str) -> int:
        return sum(1 for where, _ in self.kernels if where == layer)

    def reset(self) -> None:
        self.kernels.clear()


@contextlib.contextmanager
def attach(counter: KernelCounter, layers):
    """Attribute kernels to ``layers`` (an iterable of modules, e.g. ``model.layers``): a layer's
    name is "layer i" while its forward runs."""
    hooks = []
    for i, layer in enumerate(layers):
        def enter(_module, _args, i=i):
            counter.layer = f"layer {i}"

        def leave(_module, _args, _out):
            counter.layer = OUTSIDE
        hooks += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    try:
        yield counter
    finally:
        for h in hooks:
            h.remove()
