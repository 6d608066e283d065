"""vllm-ascend's own NPU kernels as the implementation of the project's ops, inside vLLM on an
Ascend NPU.

vllm-ascend ships kernels of its own next to torch_npu's: AscendC kernels in the
``torch.ops._C_ascend`` library (``csrc/`` of https://github.com/vllm-project/vllm-ascend, bound
in ``csrc/torch_binding.cpp``) and Triton kernels registered as vLLM custom ops
(``torch.ops.vllm.*``, ``vllm_ascend/ops/triton/``; its worker imports them and sets up the
Triton device properties before the model is built). Where they do an op's work, ``register`` registers adapters to them
with ``ops.register_kernels`` ("vllm-ascend", for NPU devices) when the project's model is built
inside vLLM on the NPU; the other ops stay with ``ops.npu`` (torch_npu). The switch
``ASCEND_QWEN3_ENGINE_KERNELS=0`` turns the registration off (``ops.npu`` runs everything).
``tests/test_ops_npu_emulated.py`` holds each adapter to the specification (``ops.cpu``) against
an emulation of the kernels (``tests/npu_emulator/c_ascend.py``).

Each entry of ``ADAPTERS`` is one op: the kernels it calls, and a factory that makes the op's
implementation given the NPU backend module (``ops.npu``), which the adapter falls back to for
inputs the kernel does not take. An op is registered only when all its kernels are present.
Registered (vllm-ascend v0.23.0; Python files cited by their lines in the 0.23.0 wheel):

- ``qkv_norm_rope``: the Triton ``torch.ops.vllm.qkv_rmsnorm_rope(input, cos_sin_cache,
  positions, q_weight, k_weight, q_hidden_size, kv_hidden_size, head_dim, eps)``
  (``vllm_ascend/ops/triton/linearnorm/split_qkv_rmsnorm_rope.py`` 264-344, registered at
  384-390 for NPU tensors, when ``vllm_ascend.ops`` is imported, as vllm-ascend's worker does):
  split, QK-norm and neox RoPE of the whole head in one kernel, q / k / v returned contiguous
  (so the V copy the cache write needed goes too). vllm-ascend itself reaches it only through
  its QK-norm + RoPE fusion pass (``compilation/passes/qknorm_rope_fusion_pass.py``), which
  matches its own ``vllm.npu_rotary_embedding`` op; calling the op here needs no pass. Taken
  as the pass takes it: bf16 qkv and cache, head_dim 128 (``qknorm_rope_fusion_pass.py``
  196-210), the full head rotated, contiguous qkv; the kernel reads the step's rows from the
  model's [P, D] cache (cos half, sin half: vLLM's layout) at the positions itself. Its
  rotation rounds every product to bf16 (the torch_npu path rotates in fp32): within 2 bf16
  ulps of the specification.
- ``moe_gating_topk``: ``_C_ascend.moe_gating_top_k(x, k, k_group=1, group_count=1,
  group_select_mode=1, renorm, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
  eps=1e-20)`` (``csrc/moe/moe_gating_top_k/``; called so by
  ``vllm_ascend/ops/fused_moe/experts_selector.py`` 292-307): softmax, top-k and (renorm=1)
  the renormalisation in one kernel, weights in the logits' dtype, ids int32. Taken: fp16 /
  bf16 / fp32 logits, at most 2048 experts.
- ``grouped_quant_swiglu_quant``: ``_C_ascend.grouped_matmul_swiglu_quant_weight_nz(x, weight,
  weight_scale, x_scale, group_list)`` (``csrc/gmm/grouped_matmul_swiglu_quant/``; called so by
  ``vllm_ascend/device/device_op.py`` 208-232 from ``ops/fused_moe/moe_mlp.py`` 295-310) after
  one cumsum of the counts (the kernel takes the groups' cumulative row ends): the W8A8 gate/up
  GEMM, its dequantisation, SwiGLU and the per-token int8 quantisation in one kernel, all in
  float32 (the torch_npu path rounds the GEMM's output to bf16 first). Taken: int8 x, an int8
  [G, K, N] weight in FRACTAL_NZ (as ``ops.npu.prepare_weight`` leaves expert weights), N even
  and at most 10240, K below 65536.
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
the ops take one slot per token, which the bgmv pair serves for prefill as for decode);
``_C_ascend.npu_add_rms_norm_bias`` and ``npu_moe_init_routing_custom`` (one kernel each, as
their torch_npu counterparts ``npu_add_rms_norm`` and ``npu_moe_init_routing_v2`` that
``ops.npu`` calls: nothing to gain).
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


def _kernel(qualified: str):
    """``torch.ops.<namespace>.<name>`` for "namespace.name", or None when this process has no
    such kernel."""
    namespace, name = qualified.split(".", 1)
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def _slots(token_lora: torch.Tensor) -> torch.Tensor:
    return token_lora if token_lora.dtype == torch.int64 else token_lora.long()


# --- LoRA --------------------------------------------------------------------------------------

def _lora_shrink(backend: ModuleType) -> Callable:
    shrink = _kernel("_C_ascend.bgmv_shrink")

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
    expand = _kernel("_C_ascend.bgmv_expand")

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


# --- the attention's prologue --------------------------------------------------------------------

def _qkv_norm_rope(backend: ModuleType) -> Callable:
    fused = _kernel("vllm.qkv_rmsnorm_rope")

    def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                      eps: float, rope: tuple, num_heads: int, num_kv_heads: int):
        """``ops.qkv_norm_rope`` with vllm-ascend's Triton ``qkv_rmsnorm_rope`` (module
        docstring)."""
        cache, positions = rope[2], rope[3]
        D = q_weight.shape[0]
        if (qkv.dtype != torch.bfloat16 or cache.dtype != torch.bfloat16 or D != 128
                or cache.shape[-1] != D or not qkv.is_contiguous() or positions is None):
            return backend.qkv_norm_rope(qkv, q_weight, k_weight, eps, rope, num_heads,
                                         num_kv_heads)
        T = qkv.shape[0]
        q, k, v = fused(qkv, cache, positions, q_weight.contiguous(), k_weight.contiguous(),
                        num_heads * D, num_kv_heads * D, D, float(eps))
        return (q.view(T, num_heads, D), k.view(T, num_kv_heads, D), v.view(T, num_kv_heads, D))
    return qkv_norm_rope


# --- MoE ---------------------------------------------------------------------------------------

MAX_GATING_EXPERTS = 2048          # csrc/moe/moe_gating_top_k/op_host/moe_gating_top_k_tiling.cpp:50


def _moe_gating_topk(backend: ModuleType) -> Callable:
    gating = _kernel("_C_ascend.moe_gating_top_k")

    def moe_gating_topk(router_logits: torch.Tensor, k: int, renormalize: bool):
        """``ops.moe_gating_topk`` with vllm-ascend's ``moe_gating_top_k`` (module docstring)."""
        T, E = router_logits.shape if router_logits.dim() == 2 else (0, 0)
        if (router_logits.dim() != 2 or T == 0 or E > MAX_GATING_EXPERTS or not 0 < k <= E
                or router_logits.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
            return backend.moe_gating_topk(router_logits, k, renormalize)
        weights, ids, _ = gating(router_logits.contiguous(), k, 1, 1, 1, int(bool(renormalize)),
                                 0, False, 1.0, 1e-20, None)
        return weights, ids
    return moe_gating_topk


GMM_SWIGLU_MAX_N = 10240           # aclnn_grouped_matmul_swiglu_quant.cpp (N <= 10240, K < 65536)


def _grouped_quant_swiglu_quant(backend: ModuleType) -> Callable:
    fused = _kernel("_C_ascend.grouped_matmul_swiglu_quant_weight_nz")
    torch_npu = importlib.import_module("torch_npu")

    def grouped_quant_swiglu_quant(xq: torch.Tensor, w13q: torch.Tensor, scale: torch.Tensor,
                                   pertoken_scale: torch.Tensor, group_sizes: torch.Tensor,
                                   output_dtype: torch.dtype = torch.bfloat16,
                                   cumulative: bool = False):
        """``ops.grouped_quant_swiglu_quant`` with vllm-ascend's
        ``grouped_matmul_swiglu_quant_weight_nz`` (module docstring). Cumulative group ends
        (``ops.ep_dispatch``'s) go in as they are, as vllm-ascend's MC2 path passes the
        dispatch's ``expert_token_nums`` (``cumsum_group_list`` with equal types: no kernel)."""
        M = xq.shape[0]
        if (xq.dtype != torch.int8 or w13q.dtype != torch.int8 or w13q.dim() != 3 or M == 0
                or w13q.shape[2] % 2 or w13q.shape[2] > GMM_SWIGLU_MAX_N
                or w13q.shape[1] >= 65536 or tuple(scale.shape) != (w13q.shape[0], w13q.shape[2])
                or torch_npu.get_npu_format(w13q) != 29):   # 29: FRACTAL_NZ (a host-side query)
            return backend.grouped_quant_swiglu_quant(xq, w13q, scale, pertoken_scale,
                                                      group_sizes, output_dtype, cumulative)
        ends = group_sizes.to(torch.int64)               # the kernel takes cumulative row ends
        if not cumulative:
            ends = ends.cumsum(0)
        aq, a_scale, _ = fused(xq.contiguous(), w13q, scale, pertoken_scale.reshape(M).float(),
                               ends)
        return aq, a_scale
    return grouped_quant_swiglu_quant


@dataclass(frozen=True)
class Adapter:
    """One op implemented with vllm-ascend kernels: ``make(ops.npu)`` returns the function."""

    op: str
    kernels: tuple[str, ...]       # "namespace.name" of the torch.ops kernels it calls
    make: Callable[[ModuleType], Callable]


ADAPTERS = (
    Adapter("qkv_norm_rope", ("vllm.qkv_rmsnorm_rope",), _qkv_norm_rope),
    Adapter("moe_gating_topk", ("_C_ascend.moe_gating_top_k",), _moe_gating_topk),
    Adapter("grouped_quant_swiglu_quant", ("_C_ascend.grouped_matmul_swiglu_quant_weight_nz",),
            _grouped_quant_swiglu_quant),
    Adapter("lora_shrink", ("_C_ascend.bgmv_shrink",), _lora_shrink),
    Adapter("lora_expand", ("_C_ascend.bgmv_expand",), _lora_expand),
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
        logger.info("ascend-qwen3: vllm-ascend's kernels for %s are not loaded here; "
                    "ops.npu runs these ops", ", ".join(missing))
    if not found:
        return False
    return ops.register_kernels(NAME, "npu", found)
