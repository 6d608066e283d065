"""vllm-ascend's own NPU kernels as the implementation of the project's ops, inside vLLM on an
Ascend NPU.

vllm-ascend ships AscendC kernels of its own next to torch_npu's, in the ``torch.ops._C_ascend``
library (``csrc/`` of https://github.com/vllm-project/vllm-ascend, bound in
``csrc/torch_binding.cpp``). Where they do an op's work, ``register`` registers adapters to them
with ``ops.register_kernels`` ("vllm-ascend", for NPU devices) when the project's model is built
inside vLLM on the NPU; the other ops stay with ``ops.npu`` (torch_npu). The switch
``ASCEND_QWEN3_ENGINE_KERNELS=0`` turns the registration off (``ops.npu`` runs everything).
``tests/test_ops_npu_emulated.py`` holds each adapter to the specification (``ops.cpu``) against
an emulation of the kernels (``tests/npu_emulator/c_ascend.py``).

Each entry of ``ADAPTERS`` is one op: the ``_C_ascend`` kernels it calls, and a factory that
makes the op's implementation given the NPU backend module (``ops.npu``), which the adapter
falls back to for inputs the kernel does not take. An op is registered only when all its kernels
are present. Registered (vllm-ascend v0.23.0):

- ``lora_shrink``: ``_C_ascend.bgmv_shrink(x, weight, indices, y, scale)``
  (``csrc/kernels/bgmv_shrink.cpp``; ``vllm_ascend/lora/lora_ops.py`` ``bgmv_shrink``). It
  writes y = scale * weight[index] @ x as float32 for the tokens of slot >= 0 and skips the
  others, so h starts as zeros. Taken: fp16 / bf16 x with lora_a in the same dtype, K > R, K a
  multiple of 16 and R of 8 (its 32-byte DataCopy moves); other inputs run ``ops.npu``.
- ``lora_expand``: ``_C_ascend.bgmv_expand(x, weight, indices, y, slice_offset, slice_size)``
  (``csrc/kernels/bgmv_expand.cpp``; ``lora_ops.py`` ``bgmv_expand_slice``): y[:, offset:offset
  +n] += weight[index] @ h in float32, rounded to y's dtype, in place, rows of slot -1
  untouched; it has code for ranks 8, 16, 32 and 64 only (``bgmv_expand.cpp:27-31, 252-280``;
  vllm-ascend's ``PunicaWrapperNPU`` sends rank >= 128 to vLLM's torch ops, and this adapter
  sends every rank the kernel lacks to ``ops.npu``). Taken: fp16 / bf16 y with lora_b in the
  same dtype, n a multiple of 16 and at least R; the kernel's return value (y itself) is
  returned.

The slots are the kernels' ``indices``: int64 (the kernels read ``int64_t``; vLLM's
``PunicaWrapperBase`` keeps its token indices as int64, an int32 tensor is cast on the device).
Nothing is read back to the host: the choices above are made from shapes and dtypes.

Not modelled or registered: the ``sgmv`` pair (one slot per request plus the requests' lengths;
the ops take one slot per token, which the bgmv pair serves for prefill as for decode).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

import ops

logger = logging.getLogger("vllm.ascend_qwen3")

NAME = "vllm-ascend"
NAMESPACE = "_C_ascend"
_HALF = (torch.float16, torch.bfloat16)


def _kernel(name: str):
    """``torch.ops._C_ascend.<name>``, or None when this process has no such kernel."""
    try:
        return getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return None


def _slots(token_lora: torch.Tensor) -> torch.Tensor:
    return token_lora if token_lora.dtype == torch.int64 else token_lora.long()


# --- LoRA --------------------------------------------------------------------------------------

def _lora_shrink(backend: ModuleType) -> Callable:
    shrink = _kernel("bgmv_shrink")

    def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_lora: torch.Tensor,
                    scale: float) -> torch.Tensor:
        """``ops.lora_shrink`` with vllm-ascend's ``bgmv_shrink`` (module docstring)."""
        T, K = x.shape
        R = lora_a.shape[1]
        if x.dtype not in _HALF or lora_a.dtype != x.dtype or K <= R or K % 16 or R % 8:
            return backend.lora_shrink(x, lora_a, token_lora, scale)
        h = torch.zeros(T, R, dtype=torch.float32, device=x.device)   # slot -1 rows: not written
        shrink(x.contiguous(), lora_a.contiguous(), _slots(token_lora), h, float(scale))
        return h
    return lora_shrink


EXPAND_RANKS = (8, 16, 32, 64)


def _lora_expand(backend: ModuleType) -> Callable:
    expand = _kernel("bgmv_expand")

    def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor,
                    token_lora: torch.Tensor, offset: int) -> torch.Tensor:
        """``ops.lora_expand`` with vllm-ascend's ``bgmv_expand`` (module docstring)."""
        n, R = lora_b.shape[1], lora_b.shape[2]
        if y.dtype not in _HALF or lora_b.dtype != y.dtype or R not in EXPAND_RANKS or n % 16 \
                or n < R:
            return backend.lora_expand(y, h, lora_b, token_lora, offset)
        return expand(h.float().contiguous(), lora_b.contiguous(), _slots(token_lora),
                      y if y.is_contiguous() else y.contiguous(), offset, n)
    return lora_expand


@dataclass(frozen=True)
class Adapter:
    """One op implemented with vllm-ascend kernels: ``make(ops.npu)`` returns the function."""

    op: str
    kernels: tuple[str, ...]       # torch.ops._C_ascend names it calls
    make: Callable[[ModuleType], Callable]


ADAPTERS = (
    Adapter("lora_shrink", ("bgmv_shrink",), _lora_shrink),
    Adapter("lora_expand", ("bgmv_expand",), _lora_expand),
)


def _custom_ops_enabled() -> bool:
    """vllm-ascend loads its ``_C_ascend`` library lazily and may decline to
    (``vllm_ascend.utils.enable_custom_op``: not on A5, not with VLLM_BATCH_INVARIANT); True
    when it did, or (no vllm-ascend importable) when the kernels are simply there."""
    try:
        from vllm_ascend.utils import enable_custom_op
    except ImportError:
        return True
    return bool(enable_custom_op())


def kernels() -> dict[str, Callable]:
    """op -> implementation, for every adapter whose kernels this process has."""
    if not _custom_ops_enabled():
        return {}
    backend = importlib.import_module("ops.npu")
    return {a.op: a.make(backend) for a in ADAPTERS
            if all(_kernel(k) is not None for k in a.kernels)}


def register() -> bool:
    """Register the adapters for NPU tensors (``ops.register_kernels``), unless
    ``ASCEND_QWEN3_ENGINE_KERNELS`` turns it off or vllm-ascend's kernels are missing (said in the
    log). Returns whether any is registered."""
    found = kernels()
    missing = sorted(a.op for a in ADAPTERS if a.op not in found)
    if missing:
        logger.info("ascend-qwen3: vllm-ascend's _C_ascend kernels for %s are not loaded here; "
                    "ops.npu runs these ops", ", ".join(missing))
    if not found:
        return False
    return ops.register_kernels(NAME, "npu", found)
