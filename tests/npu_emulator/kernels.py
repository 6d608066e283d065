"""Kernel launches: what a step would put on an NPU's queue, seen one by one.

The NPU runs what the host queues; every queued kernel costs a launch (tens of microseconds of
host and device time on Ascend, which is why decode is launch-bound in eager and piecewise
modes and why vllm-ascend captures graphs). ``KernelMode`` sees, while a block runs:

- every emulated torch_npu function the caller invokes (one kernel each; what the emulator
  computes inside it is its own business, not the caller's);
- every PyTorch operator the caller dispatches that does work on the device: arithmetic,
  copies and casts, fills, index and cat ops, reductions (a composite operator, which
  ``inference_mode`` hands over undecomposed, is taken as what it decomposes into), and
  other libraries' operators (vllm-ascend's ``_C_ascend`` kernels, ``c_ascend.py``). Views
  (``view``, ``reshape`` of a contiguous tensor, slicing, ``transpose``, ``split``: operators
  whose schema says the result aliases the input without writing it) and allocations
  (``empty*``) launch nothing. A tensor made from a Python list (``torch.tensor([...])``) is a
  host-to-device copy and counts;
- collectives, reported by the parallel context a test gives the model (``collective``), and
  the emulated torch_npu kernels that are collectives themselves (MC2's dispatch and combine,
  ``COLLECTIVE_KERNELS``; the bytes they receive come from ``mc2.traffic_listeners``).

Custom operators (``torch.library``, e.g. the project's MoE op) are entered: their
CompositeExplicitAutograd implementation runs under the mode, so the kernels inside are seen.

``KernelCounter`` counts them per decoder layer: a layer's kernels are those launched between
its forward-pre and forward hooks (``attach(counter, model.layers)``); the rest is "outside any
layer" (embedding, final norm, LM head, and the per-step work a graph does once before its
layers). ``graphs.py`` records them into an emulated ACL graph the same way.
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
# emulated torch_npu functions that do host work only (a size query and a format query)
HOST_ONLY = {"_npu_fused_infer_attention_score_get_max_workspace", "get_npu_format"}
# emulated torch_npu functions that are collectives (HCCL kernels over a communicator)
COLLECTIVE_KERNELS = ("torch_npu.npu_moe_distribute_dispatch_v2",
                      "torch_npu.npu_moe_distribute_combine_v2")
# operators whose own implementation is entered (their insides are seen instead)
ENTERED_NAMESPACES = ("ascend_qwen3",)
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def is_view(func) -> bool:
    """The schema says every result aliases an input and nothing is written."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


def launches_kernel(func) -> bool:
    """It returns a tensor or writes one of its arguments (an operator whose schema returns
    nothing but marks an argument written, e.g. vllm-ascend's ``_C_ascend.bgmv_shrink``)."""
    name = func._schema.name.split("::", 1)[-1]
    returns_tensor = any("Tensor" in str(r.type) for r in func._schema.returns)
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
    return (returns_tensor or writes) and name not in NO_KERNEL and not is_view(func)


def kernel_name(func) -> str:
    namespace, name = func._schema.name.split("::", 1)
    if namespace not in ("aten", "prim"):      # a library's own operator: "_C_ascend.bgmv_shrink"
        return f"{namespace}.{name}"
    return "h2d_copy" if name == "lift_fresh_copy" else f"aten.{name}"


def is_collective(name: str) -> bool:
    """A kernel name of ``KernelMode`` that is a collective."""
    return name.startswith("collective.") or name in COLLECTIVE_KERNELS


def ring_received(kind: str, parts: list[int], rank: int) -> int:
    """Bytes one rank receives in a collective run as a ring over ``len(parts)`` ranks, the
    algorithm HCCL and NCCL use for large messages (the bus-bandwidth factors of
    https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md):

    - "all_reduce": ``parts`` the bytes of each rank's equal tensor; a ring all-reduce is a
      reduce-scatter then an all-gather: 2 (n - 1) / n of the tensor;
    - "all_gather": ``parts`` what each rank contributes (equal or not, ``all_gatherv``): every
      other rank's part, once;
    - "reduce_scatter": ``parts`` the rows each rank keeps, in bytes (equal or not,
      ``reduce_scatterv``): in n - 1 steps each rank receives one partial sum of all chunks
      but one, counted here as the other ranks' parts (exact for equal parts; for unequal ones
      which chunk a rank skips depends on its place in the ring).
    """
    n = len(parts)
    if n <= 1:
        return 0
    if kind == "all_reduce":
        return 2 * (n - 1) * parts[rank] // n
    if kind in ("all_gather", "reduce_scatter"):
        return sum(parts) - parts[rank]
    raise ValueError(f"ring_received: unknown collective {kind!r}")


class KernelMode(TorchDispatchMode):
    """Calls ``launched(name, fn, args, kwargs, result)`` for every kernel launch (module
    docstring): ``fn`` re-runs the kernel (the aten operator, or the emulated torch_npu
    function without its logging)."""

    def __init__(self, call_log):
        super().__init__()
        self.log = call_log
        self._entered = 0
        self.traffic: list[tuple[str, str, int]] = []    # (layer, collective, bytes received)

    layer = OUTSIDE             # the decoder layer running (``attach``)

    def launched(self, name, fn, args, kwargs, result) -> None:
        raise NotImplementedError

    def collective(self, name: str, tensor: torch.Tensor, received: int = 0,
                   stand_in=None) -> torch.Tensor:
        """A collective of the parallel context a test gives the model (one HCCL kernel on
        the NPU). ``tensor`` its result in the emulated single process: what the test's context
        made it; ``stand_in`` (fn, inputs): how it made it, re-run when a graph replays the
        collective (else the tensor is kept as it is). ``received``: the bytes this rank
        receives in it (``ring_received``), kept in ``traffic`` beside the layer that ran it."""
        self.traffic.append((self.layer, f"collective.{name}", int(received)))
        fn, inputs = stand_in if stand_in is not None else (_keep, (tensor,))
        self.launched(f"collective.{name}", fn, tuple(inputs), {}, tensor)
        return tensor

    def _torch_npu_call(self, name, args, kwargs, result) -> None:
        if self.log.depth == 0 and name not in HOST_ONLY:  # not one emulated function calling another
            self.launched(f"torch_npu.{name}", self.log.raw[name], args, kwargs, result)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.log.depth > 0:                  # inside an emulated torch_npu kernel
            return func(*args, **kwargs)
        if func.namespace in ENTERED_NAMESPACES:
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        if func.has_kernel_for_dispatch_key(_COMPOSITE):
            with self:                          # what it decomposes into is what runs
                return func.decompose(*args, **kwargs)
        result = func(*args, **kwargs)
        if launches_kernel(func):
            self.launched(kernel_name(func), func, args, kwargs, result)
        return result

    def _mc2_traffic(self, name: str, nbytes: int) -> None:
        self.traffic.append((self.layer, f"torch_npu.{name}", nbytes))

    def __enter__(self):
        from . import mc2
        self._entered += 1                      # re-entered for custom operators
        if self._entered == 1:
            self.log.listeners.append(self._torch_npu_call)
            mc2.traffic_listeners.append(self._mc2_traffic)
        return super().__enter__()

    def __exit__(self, *exc):
        from . import mc2
        self._entered -= 1
        if self._entered == 0:
            self.log.listeners.remove(self._torch_npu_call)
            mc2.traffic_listeners.remove(self._mc2_traffic)
        return super().__exit__(*exc)


class KernelCounter(KernelMode):
    """Counts kernel launches per layer. ``kernels``: (layer, name) in launch order."""

    def __init__(self, call_log):
        super().__init__(call_log)
        self.layer = OUTSIDE
        self.kernels: list[tuple[str, str]] = []

    def launched(self, name, fn, args, kwargs, result) -> None:
        self.kernels.append((self.layer, name))

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
def attach(tracker, layers):
    """Attribute kernels to ``layers`` (an iterable of modules, e.g. ``model.layers``): the
    tracker's ``layer`` is "layer i" while layer i's forward runs."""
    hooks = []
    for i, layer in enumerate(layers):
        def enter(_module, _args, i=i):
            tracker.layer = f"layer {i}"

        def leave(_module, _args, _out):
            tracker.layer = OUTSIDE
        hooks += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    try:
        yield tracker
    finally:
        for h in hooks:
            h.remove()
