"""The operator interface: one function per op, two backends (``cpu`` and ``npu``).

The backend is chosen once, at first use: ``npu`` when torch_npu imports and an NPU device is
present, ``cpu`` otherwise. ``ASCEND_QWEN3_BACKEND=cpu|npu`` forces either (forcing ``npu``
without torch_npu is an error). The choice is logged once at INFO level and readable from
``ops.backend_name()``.

Every public function below forwards to the chosen backend; see ``ops.cpu`` for the
specification (shapes, dtypes, exact semantics) of each op.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

from .rope import rope_cos_sin_cache, rope_inv_freq  # noqa: F401  (backend independent)

logger = logging.getLogger("ascend_qwen3.ops")

ENV_VAR = "ASCEND_QWEN3_BACKEND"

OPS = (
    "rms_norm", "add_rms_norm", "head_rms_norm", "rotary_embedding", "swiglu",
    "write_kv_cache", "paged_attention",
    "dynamic_quant", "static_quant", "int8_matmul", "quant_matmul",
    "moe_gating_topk", "moe_route", "moe_route_quant", "grouped_matmul", "grouped_quant_matmul", "moe_combine",
    "prepare_weight",
)

_backend: ModuleType | None = None


def _npu_available() -> tuple[bool, str]:
    try:
        import torch
        import torch_npu  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CANN install raising at import
        return False, f"torch_npu is not importable ({type(exc).__name__}: {exc})"
    try:
        if not torch.npu.is_available() or torch.npu.device_count() == 0:
            return False, "torch_npu imported but no NPU device is visible"
    except Exception as exc:
        return False, f"torch.npu device query failed ({exc})"
    return True, f"torch_npu with {torch.npu.device_count()} NPU device(s)"


def _load(name: str) -> ModuleType:
    if name == "cpu":
        from . import cpu
        return cpu
    if name == "npu":
        from . import npu
        return npu
    raise ValueError(f"{ENV_VAR}={name!r} is not a backend; use 'cpu' or 'npu' (or unset it to auto-select)")


def select_backend(name: str | None = None) -> ModuleType:
    """Choose (or re-choose) the backend. ``name`` overrides the environment; None auto-selects."""
    global _backend
    forced = name or os.environ.get(ENV_VAR, "").strip().lower() or None
    if forced is not None:
        if forced == "npu":
            ok, why = _npu_available()
            if not ok:
                raise RuntimeError(f"{ENV_VAR}=npu was requested but {why}; install torch_npu on an "
                                   f"Ascend machine or set {ENV_VAR}=cpu")
        _backend = _load(forced)
        logger.info("ops backend: %s (forced by %s)", _backend.NAME, "argument" if name else ENV_VAR)
    else:
        ok, why = _npu_available()
        _backend = _load("npu" if ok else "cpu")
        logger.info("ops backend: %s (auto: %s)", _backend.NAME, why)
    return _backend


def backend() -> ModuleType:
    return _backend if _backend is not None else select_backend()


def backend_name() -> str:
    return backend().NAME


# ``ASCEND_QWEN3_OPS_LOG=<dir>``: every process appends one line per op to ``<dir>/ops-<pid>.log``
# the first time it calls it ("<backend> <op>"). Serving engines run the model in worker
# processes; this file is how a test (or a user) sees which ops actually ran there.
LOG_ENV_VAR = "ASCEND_QWEN3_OPS_LOG"
_logged: set[str] = set()


def record(name: str) -> None:
    """Note (once per process) that ``name`` ran, if ASCEND_QWEN3_OPS_LOG is set."""
    if name in _logged:
        return
    _logged.add(name)
    where = os.environ.get(LOG_ENV_VAR)
    if where:
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, f"ops-{os.getpid()}.log"), "a") as f:
            f.write(f"{backend_name()} {name}\n")


def _forward(op: str):
    def call(*args, **kwargs):
        if op not in _logged:
            record(op)
        return getattr(backend(), op)(*args, **kwargs)
    call.__name__ = op
    call.__qualname__ = op
    from . import cpu
    call.__doc__ = getattr(cpu, op).__doc__
    return call


for _op in OPS:
    globals()[_op] = _forward(_op)
del _op

__all__ = list(OPS) + ["select_backend", "backend", "backend_name", "rope_cos_sin_cache",
                       "rope_inv_freq", "record", "ENV_VAR", "LOG_ENV_VAR"]
