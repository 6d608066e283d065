"""NPU backend: the operator interface implemented with torch_npu kernels (Atlas 800I A2).

Every function has exactly the signature, shapes, dtypes and semantics of its ``ops.cpu``
counterpart (the specification); its docstring names the torch_npu kernel, the marshalling done
around it (dtype casts, layouts, index conventions) and the tolerance against ``ops.cpu``.
Nothing here hands an input to ``ops.cpu`` (which backend runs is decided once, by the tensors'
device: ``ops.backend_for``): inputs outside a kernel's documented limits raise an error that
says what was expected, what was found and what to do.

Sources (Ascend Extension for PyTorch API reference, i.e. the op-plugin docs
``docs/zh/custom_APIs/torch_npu/torch_npu-<name>.md`` of https://gitcode.com/Ascend/op-plugin,
also published on hiascend.com); the aclnn / ATB pages are cited where the torch_npu page is
silent. vllm-ascend (``attention/attention_v1.py``, ``ops/fused_moe``, ``quantization/methods``)
was read for how these kernels are called in production.

Notation as in ``ops.cpu``: T tokens, R requests, H heads, D head_dim, E experts, k experts per
token, NB cache blocks, BS block size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch_npu

from .cpu import write_to


NAME = "npu"

_HALF = (torch.float16, torch.bfloat16)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def _check(ok: bool, op: str, expected: str, found, todo: str) -> None:
    """Raise the house-style error: what was expected, what was found, what to do."""
    if not ok:
        raise ValueError(f"ops.npu.{op}: expected {expected}, found {found}; {todo}")


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# Float linear
# --------------------------------------------------------------------------------------------

def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight^T with ``torch.nn.functional.linear`` (torch_npu's matmul on NPU tensors).

    Marshalling: none; the weight is the [N, K] tensor ``prepare_linear_weight`` returned.
    Tolerance vs ops.cpu: fp32 accumulation, one rounding; order differs: rtol=atol=1e-2 bf16,
    1e-5 fp32.
    """
    return torch.nn.functional.linear(x, weight)


def prepare_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """The [N, K] float weight, contiguous. Kept in ND: vllm-ascend 0.23 casts float weights to
    FRACTAL_NZ only when VLLM_ASCEND_ENABLE_NZ=2 (``maybe_trans_nz``, vllm_ascend/utils.py),
    not by default. Numerically the identity."""
    return weight.contiguous()


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

def _gamma_for(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """npu_rms_norm accepts gamma in x's dtype or fp32 (A2 table: fp16/fp32, bf16/fp32,
    fp16/fp16, bf16/bf16, fp32/fp32). Any other weight dtype is widened to fp32 (exact)."""
    if weight.dtype == x.dtype or weight.dtype == torch.float32:
        return weight
    return weight.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with ``torch_npu.npu_rms_norm(x, gamma, epsilon=eps)[0]``.

    Kernel doc: torch_npu.npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd); self fp16/bf16/
    fp32 with 2-8 dims, gamma the trailing dims; y has self's dtype.
    Marshalling: a 1-D x is viewed as [1, N]; gamma is passed in x.dtype or fp32 (see
    ``_gamma_for``); rstd is dropped. The result is cast to promote_types(x, weight), the dtype
    ``ops.cpu`` returns (x.dtype for the model's same-dtype weights).
    Tolerance vs ops.cpu: the same maths with one final rounding (fp32 accumulation order
    aside): about one ulp of x.dtype, rtol=atol=1e-2 (bf16), 2e-3 (fp16), 1e-5 (fp32).
    """
    _check(x.dtype in _FLOAT, "rms_norm", "x of dtype float16/bfloat16/float32", _dt(x),
           "cast the activations to the model dtype")
    _check(weight.shape == x.shape[-1:], "rms_norm", f"weight of shape [{x.shape[-1]}]",
           list(weight.shape), "pass the norm weight of the last dim")
    x2 = x.unsqueeze(0) if x.dim() == 1 else x
    y = torch_npu.npu_rms_norm(x2, _gamma_for(x, weight), epsilon=eps)[0]
    y = y.reshape(x.shape)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm with ``torch_npu.npu_add_rms_norm(x1, x2, gamma, epsilon)``.

    Kernel doc: npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06) -> (y, rstd, x); x = x1 + x2 in
    x1's dtype, y = RMSNorm(x) * gamma; gamma must have x1's dtype; empty tensors unsupported.
    Returns (y, x_sum). Marshalling: when weight's dtype differs from x's (the fused kernel would
    need it cast, i.e. rounded), the sum is formed by a plain ``x + residual`` and normalised by
    ``rms_norm`` (npu_rms_norm accepts fp32 gamma); T == 0 returns empty results without a call.
    Tolerance vs ops.cpu: the sum is bit-identical (both add in x.dtype); y as ``rms_norm``.
    """
    _check(x.dtype in _FLOAT and residual.dtype == x.dtype, "add_rms_norm",
           "x and residual of one dtype in float16/bfloat16/float32", f"{_dt(x)} and {_dt(residual)}",
           "cast both to the model dtype")
    _check(x.shape == residual.shape, "add_rms_norm", f"residual of shape {list(x.shape)}",
           list(residual.shape), "pass the residual stream of the same tokens")
    if x.numel() == 0 or weight.dtype != x.dtype:
        new_residual = x + residual
        if x.numel() == 0:
            return torch.empty_like(new_residual), new_residual
        return rms_norm(new_residual, weight, eps), new_residual
    y, _rstd, new_residual = torch_npu.npu_add_rms_norm(x, residual, weight, epsilon=eps)
    return y, new_residual


def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       scale: torch.Tensor, offset: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm + static int8 quantisation with ``torch_npu.npu_add_rms_norm_quant(
    x1, x2, gamma, scales1, zero_points1, epsilon=eps)`` (div_mode=True, the default and the
    only mode on A2): one kernel where ``add_rms_norm`` then ``static_quant`` take two.

    Kernel doc (torch_npu-npu_add_rms_norm_quant.md): -> (y1, y2, x); x = x1 + x2 in x1's dtype,
    y = x / RMS(x) * gamma, y1 = round(y / scales1 + zero_points1) int8; scales1 / zero_points1
    of gamma's shape; A2 dtype rows: fp16 x with fp32 scales and int32 zero points, bf16 x with
    bf16 scales and bf16 zero points; axis -1 only; y2 is allocated but not asked for here
    (scales2 None). vllm-ascend makes this call from its norm + quant fusion pass
    (compilation/passes/norm_quant_fusion_pass.py), with the scale repeated to [H] in the model
    dtype (quantization/methods/w8a8_static.py).
    Marshalling: scale / offset as ``prepare_norm_quant`` made them at finalisation (the
    kernel's dtypes, [K]); nothing per call. T == 0 returns empties without a call.
    Tolerance vs ops.cpu: bit-exact quantised values when the kernel computes y in fp32 (its
    op-plugin test does) and rounds half to even (not documented: the npu-marked test settles it),
    given a scale representable in the model dtype (msModelSlim stores it in that dtype).
    """
    _check(x.dtype in _HALF and residual.dtype == x.dtype and weight.dtype == x.dtype,
           "add_rms_norm_quant", "x, residual and weight of one dtype, float16 or bfloat16",
           f"{_dt(x)}/{_dt(residual)}/{_dt(weight)}", "run W8A8 models in bf16 or fp16")
    _check(x.shape == residual.shape and weight.shape == x.shape[-1:] and scale.shape == weight.shape
           and offset.shape == weight.shape, "add_rms_norm_quant",
           f"x and residual of one shape, weight/scale/offset [{x.shape[-1]}]",
           f"{list(x.shape)}, {list(residual.shape)}, {list(weight.shape)}, {list(scale.shape)}, "
           f"{list(offset.shape)}", "prepare scale and offset with ops.prepare_norm_quant")
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.int8, device=x.device), x + residual
    y1, _y2, x_sum = torch_npu.npu_add_rms_norm_quant(x, residual, weight, scale, offset,
                                                      epsilon=eps)
    return y1, x_sum


def add_rms_norm_dynamic_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm + per-token dynamic int8 quantisation with
    ``torch_npu.npu_add_rms_norm_dynamic_quant(x1, x2, gamma, epsilon=eps, output_mask=[True,
    False])``: one kernel where ``add_rms_norm`` then ``dynamic_quant`` take two.

    Kernel doc (torch_npu-npu_add_rms_norm_dynamic_quant.md, A2/A3): -> (y1, y2, x_out, scale1,
    scale2); x = x1 + x2, y = x / RMS(x) * gamma, scale1 = row_max(|y|) / 127 (fp32,
    x1.shape[:-1]), y1 = round(y / scale1) int8; x1/x2 fp16/bf16 of 2-8 dims, gamma of x1's dtype
    [K]; output_mask [True, False] asks for the first quantisation only (what vllm-ascend's
    fusion pass asks, compilation/passes/norm_quant_fusion_pass.py).
    Marshalling: none; M == 0 returns empties without a call.
    Tolerance vs ops.cpu: scale within one fp32 ulp, xq within +-1 on rounding ties (as
    ``dynamic_quant``); the sum bit-exact.
    """
    _check(x.dtype in _HALF and residual.dtype == x.dtype and weight.dtype == x.dtype,
           "add_rms_norm_dynamic_quant", "x, residual and weight of one dtype, float16 or bfloat16",
           f"{_dt(x)}/{_dt(residual)}/{_dt(weight)}", "run W8A8 models in bf16 or fp16")
    _check(x.dim() == 2 and x.shape == residual.shape and weight.shape == x.shape[-1:],
           "add_rms_norm_dynamic_quant", f"x and residual [M, K] and weight [{x.shape[-1]}]",
           f"{list(x.shape)}, {list(residual.shape)}, {list(weight.shape)}",
           "flatten the tokens to [M, K]")
    if x.shape[0] == 0:
        return torch.empty(x.shape, dtype=torch.int8, device=x.device), \
            torch.empty(0, dtype=torch.float32, device=x.device), x + residual
    y1, _y2, x_sum, scale1, _scale2 = torch_npu.npu_add_rms_norm_dynamic_quant(
        x, residual, weight, epsilon=eps, output_mask=[True, False])
    return y1, scale1, x_sum


# --------------------------------------------------------------------------------------------
# Rotary embedding (neox / rotate-half style)
# --------------------------------------------------------------------------------------------

def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox RoPE with ``torch_npu.npu_apply_rotary_pos_emb(q, k, cos, sin, layout="TND",
    rotary_mode="half")``, in place: one kernel per layer.

    Kernel doc: npu_apply_rotary_pos_emb(query, key, cos, sin, *, layout='BSND',
    rotary_mode='half') -> (query_out, key_out), updated IN PLACE; "half" computes
    ``x * cos + cat(-x2, x1) * sin`` with cos/sin of full width D; on A2: layouts BSND/TND,
    rotary_mode "half" only, D in {64, 128}, query/key/cos/sin of one dtype, TND shapes
    query [T, Nq, D], key [T, Nk, D], cos/sin [T, 1, D]; no empty tensors; and
    (aclnnApplyRotaryPosEmbV2 page) a per-token unified-buffer budget, checked here.
    Marshalling: none for the graph's tensors: q and k (the QK-norm outputs, contiguous) are
    rotated where they lie and returned; cos/sin come once per step from ``ops.rope_cos_sin`` in
    the model dtype (vllm-ascend and Hugging Face also rotate bf16 activations with bf16 cos/sin).
    Non-contiguous q/k are copied first; cos/sin of another dtype are cast to q's. T == 0
    returns q and k without a call.
    Tolerance vs ops.cpu (fp32 maths from the same cos/sin, one rounding): about one ulp of the
    input dtype, if the kernel widens to fp32 internally (the emulator does; the page does not
    say, the npu-marked rotary test on an A2 settles it).
    """
    T, D = q.shape[0], q.shape[-1]
    _check(q.dim() == 3 and k.dim() == 3 and k.shape[0] == T and k.shape[-1] == D,
           "rotary_embedding", "q [T, Hq, D] and k [T, Hk, D]",
           f"{list(q.shape)} and {list(k.shape)}", "pass per-head q/k in TND layout")
    _check(D in (64, 128), "rotary_embedding", "head_dim 64 or 128 (npu_apply_rotary_pos_emb on A2)",
           D, "Qwen3 uses head_dim 128; other head sizes need a different RoPE kernel")
    _check(cos.shape == (T, 1, D) and sin.shape == cos.shape, "rotary_embedding",
           f"cos and sin of shape [{T}, 1, {D}]", f"{list(cos.shape)} and {list(sin.shape)}",
           "gather them for the step's positions with ops.rope_cos_sin")
    _check(q.dtype in _FLOAT and k.dtype == q.dtype, "rotary_embedding",
           "q and k of one dtype in float16/bfloat16/float32", f"{_dt(q)}/{_dt(k)}",
           "cast to the model dtype")
    # aclnnApplyRotaryPosEmbV2 constraint: the per-token working set must fit the AI core's
    # unified buffer (192 KiB on A2); counted here for fp32 (cast=0, castSize=DtypeSize=4),
    # the largest case, whatever the dtype
    ub = (q.shape[1] + k.shape[1]) * D * 4 * 5 + D * 4 * 4
    _check(ub <= 192 * 1024, "rotary_embedding",
           "(q_heads + k_heads) * head_dim small enough for the RoPE kernel's unified buffer",
           f"{q.shape[1]} + {k.shape[1]} heads of {D} ({ub} bytes > 196608)",
           "use tensor parallelism to reduce the heads per rank")
    if T == 0:
        return q, k
    if cos.dtype != q.dtype:
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    q_out, k_out = torch_npu.npu_apply_rotary_pos_emb(q.contiguous(), k.contiguous(),
                                                      cos.contiguous(), sin.contiguous(),
                                                      layout="TND", rotary_mode="half")
    return q_out, k_out


def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                  rope: tuple, num_heads: int, num_kv_heads: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ops.cpu.qkv_norm_rope`` with torch_npu's kernels: ``rms_norm`` (npu_rms_norm) on q's
    and on k's heads, then ``rotary_embedding`` (npu_apply_rotary_pos_emb) on the step's
    cos / sin; the split and head reshapes are views, v is returned as a view of qkv.
    Three kernels. (vllm-ascend runs the whole prologue as one Triton kernel of its own,
    ``torch.ops.vllm.qkv_rmsnorm_rope``, registered for it by the vLLM plugin where vllm-ascend
    is installed: ascend_qwen3/vllm_plugin/npu_kernels.py.)
    Tolerance vs ops.cpu: those of ``rms_norm`` and ``rotary_embedding``.
    """
    D = q_weight.shape[0]
    _check(qkv.dim() == 2 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * D,
           "qkv_norm_rope", f"qkv [T, ({num_heads} + 2 x {num_kv_heads}) x {D}]",
           list(qkv.shape), "pass the fused QKV projection's output")
    T = qkv.shape[0]
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    q = rms_norm(q.reshape(T, num_heads, D), q_weight, eps)
    k = rms_norm(k.reshape(T, num_kv_heads, D), k_weight, eps)
    q, k = rotary_embedding(q, k, rope[0], rope[1])
    return q, k, v.reshape(T, num_kv_heads, D)


# --------------------------------------------------------------------------------------------
# Activation
# --------------------------------------------------------------------------------------------

def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU with ``torch_npu.npu_swiglu(x, dim=-1)``: silu(x[..., :I]) * x[..., I:].

    Kernel doc: npu_swiglu(input, dim=-1); input fp32/fp16/bf16, 1-8 dims, contiguous, not
    empty, even along dim; output in input's dtype.
    Marshalling: x made contiguous; an empty x returns an empty [..., I] without a call.
    Tolerance vs ops.cpu (fp32 maths, one rounding): about one ulp of x.dtype
    (rtol=atol=1e-2 bf16, 2e-3 fp16, 1e-5 fp32).
    """
    _check(x.dtype in _FLOAT, "swiglu", "x of dtype float16/bfloat16/float32", _dt(x),
           "cast the gate/up output to the model dtype")
    _check(x.shape[-1] % 2 == 0, "swiglu", "an even last dim (fused gate|up)", x.shape[-1],
           "pass the concatenated [gate, up] projection")
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    return torch_npu.npu_swiglu(x.contiguous(), dim=-1)


# --------------------------------------------------------------------------------------------
# Paged KV cache and attention
# --------------------------------------------------------------------------------------------

def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter keys/values into the paged cache with ``torch_npu._npu_reshape_and_cache``.

    Kernel: torch_npu._npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices)
    (ATB ReshapeAndCacheOperation, as vllm-ascend calls it): key/value [T, Hkv, D], caches
    [NB, BS, Hkv, D] ND, all of one dtype in float16/bfloat16/int8; slot_indices int32 [T],
    slot = block * BS + offset; caches updated in place.
    Marshalling: key/value cast to the cache dtype (as ops.cpu does) and made contiguous; slots
    cast to int32 and passed as they are: no device->host sync, the slot values are not read
    here. Slots of -1 (skip) go to the kernel: the ATB page does not say what it does with them,
    but op-plugin's own test of this op (test/test_custom_ops/test_atb_reshape_and_cache.py,
    cal_nd) skips slot < 0, as ops.cpu specifies (the emulator follows that test); the callers
    here pass none anyway (the vLLM plugin slices vLLM's slot_mapping to num_actual_tokens, as
    vllm-ascend does; the standalone runner never makes -1). Slots past the cache are not
    checked (ops.cpu checks them): a tier-3 test on hardware settles both.
    Tolerance vs ops.cpu: bit-exact (a copy).
    """
    nb, bs = key_cache.shape[0], key_cache.shape[1]
    _check(key_cache.dim() == 4 and value_cache.shape == key_cache.shape
           and key.shape[1:] == key_cache.shape[2:] and value.shape == key.shape,
           "write_kv_cache", "key/value [T, Hkv, D] and caches [NB, BS, Hkv, D]",
           f"key {list(key.shape)}, value {list(value.shape)}, caches {list(key_cache.shape)}/"
           f"{list(value_cache.shape)}", "allocate the caches as [blocks, block_size, kv_heads, head_dim]")
    _check(key_cache.dtype in (torch.float16, torch.bfloat16, torch.int8)
           and value_cache.dtype == key_cache.dtype, "write_kv_cache",
           "caches of one dtype in float16/bfloat16/int8 (ATB ReshapeAndCache)",
           f"{_dt(key_cache)}/{_dt(value_cache)}", "allocate the KV cache in the model dtype (bf16/fp16)")
    _check(slot_mapping.dim() == 1 and slot_mapping.numel() == key.shape[0], "write_kv_cache",
           f"slot_mapping [{key.shape[0]}] (one slot per token)", list(slot_mapping.shape),
           "pass the step's slot mapping")
    if slot_mapping.numel() == 0:
        return
    slots = slot_mapping.to(device=key.device, dtype=torch.int32)
    torch_npu._npu_reshape_and_cache(
        key=key.to(key_cache.dtype).contiguous(), value=value.to(value_cache.dtype).contiguous(),
        key_cache=key_cache, value_cache=value_cache, slot_indices=slots.contiguous())


_CAUSAL_MASKS: dict[str, torch.Tensor] = {}


def _compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The 2048 x 2048 mask sparse_mode 2/3/4 require (1 = masked: strictly upper triangle),
    int8 like vllm-ascend's AttentionMaskBuilder; built once per device."""
    key = str(device)
    mask = _CAUSAL_MASKS.get(key)
    if mask is None:
        mask = torch.triu(torch.ones(2048, 2048, dtype=torch.int8), diagonal=1).to(device)
        _CAUSAL_MASKS[key] = mask
    return mask


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, *,
                    query_start_loc_host: list[int] | None = None,
                    seq_lens_host: list[int] | None = None, plan=None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal paged attention with ``torch_npu.npu_fused_infer_attention_score`` (TND, paged KV).
    (``plan``: for an engine's registered kernel; not used here.)

    Kernel doc: npu_fused_infer_attention_score(query, key, value, *, atten_mask, block_table,
    actual_seq_lengths, actual_seq_lengths_kv, num_heads, scale, input_layout, num_key_value_heads,
    sparse_mode, block_size, ...) -> (attention_out, softmax_lse). Used here with
    input_layout="TND": query [T, Hq, D] packed, attention_out [T, Hq, D]; actual_seq_lengths =
    cumulative query ends (query_start_loc[1:]); PageAttention: key/value = the caches in the
    "BnBsH" layout [NB, BS, Hkv*D], block_table int32 [R, max_blocks], block_size = BS,
    actual_seq_lengths_kv = per-request KV lengths (seq_lens, NOT cumulative: the TND page says
    "cumulative" generically, but with PageAttention each request's KV lives in its own blocks;
    vllm-ascend passes seq_lens_list here, and the kernel's aclnn page sizes the block table and
    the block count from "each batch's actualSeqLengthsKv"); sparse_mode=3 = bottom-right causal
    ("rightDownCausal") with the compressed 2048x2048 mask; num_key_value_heads for GQA.
    Documented limits checked (torch_npu page, and aclnnFusedInferAttentionScoreV4.md of
    ops-transformer for A2 + TND, which is stricter): query/key/value bfloat16 (A2, TND, D != 512:
    "BFLOAT16 only"); D == 128 (TND without rope); block_size in {128, 512} (torch_npu page:
    multiple of 128 in [128, 512] for Q_S > 1; aclnn A2 TND: 128, 512 or 1024); Hq % Hkv == 0
    with ratio <= 64 and <= 256 heads; Hkv * D <= 65535 (BnBsH cache); 1..4096 requests;
    T <= 1048576. A request with more queries than keys (engines' padding requests) is passed
    on: the kernel zeroes the query rows that see no key, as ops.cpu specifies.
    actual_seq_lengths(_kv) are host int lists: they are taken from ``query_start_loc_host`` and
    ``seq_lens_host``, which this backend REQUIRES (the engine's metadata carries them:
    vllm-ascend's ``actual_seq_lengths_q`` / ``seq_lens_list``, the standalone runner's
    ``AttentionMetadata``), so no device->host copy happens in any layer; the tensors
    query_start_loc / seq_lens are not read.
    Marshalling: query rows beyond query_start_loc[-1] (padding) are not sent; their output rows
    are zeros, as in ops.cpu. T == 0 returns an empty result.
    Tolerance vs ops.cpu (fp32 softmax over the same keys): flash-style blocked softmax in
    fp32 with bf16 matmuls: rtol=atol=1e-2.
    ``out``: a [T, Hq, D] tensor of query's dtype to write the result to (and return).
    """
    return write_to(out, _paged_attention(query, key_cache, value_cache, block_tables,
                                          query_start_loc, seq_lens, scale,
                                          query_start_loc_host=query_start_loc_host,
                                          seq_lens_host=seq_lens_host))


def _paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, *,
                     query_start_loc_host: list[int] | None = None,
                     seq_lens_host: list[int] | None = None, plan=None) -> torch.Tensor:
    """The work of ``paged_attention`` (which writes it to ``out`` when given)."""
    T = query.shape[0]
    lengths = _attention_lengths(query, key_cache, value_cache, block_tables, query_start_loc,
                                 seq_lens, query_start_loc_host, seq_lens_host)
    if lengths is None:                                   # T == 0
        return torch.empty_like(query)
    q_ends, kv_lens = lengths
    n = q_ends[-1]
    out = _fused_attention(query[:n].contiguous(), key_cache, value_cache, block_tables, scale,
                           q_ends, kv_lens)
    if n == T:
        return out
    full = query.new_zeros(query.shape)
    full[:n] = out
    return full


def _attention_lengths(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
                       query_start_loc_host, seq_lens_host) -> tuple[list[int], list[int]] | None:
    """The documented limits of ``paged_attention`` checked, and the kernel's host lengths:
    (cumulative query ends, per-request KV lengths), or None for a step without tokens."""
    T, Hq, D = query.shape
    NB, BS, Hkv = key_cache.shape[0], key_cache.shape[1], key_cache.shape[2]
    R = seq_lens.shape[0]
    _check(query.dtype == torch.bfloat16 and key_cache.dtype == query.dtype
           and value_cache.dtype == query.dtype, "paged_attention",
           "query and KV caches in bfloat16 (FIA TND layout on A2 supports BFLOAT16 only)",
           f"{_dt(query)}/{_dt(key_cache)}/{_dt(value_cache)}", "run the model in bfloat16 on the NPU")
    _check(D == 128 and key_cache.shape[3] == D and value_cache.shape == key_cache.shape,
           "paged_attention", "head_dim 128 for q/k/v (FIA TND layout without rope)",
           f"query {list(query.shape)}, caches {list(key_cache.shape)}/{list(value_cache.shape)}",
           "Qwen3 uses head_dim 128; other head sizes need another attention kernel")
    _check(Hq % Hkv == 0 and Hq // Hkv <= 64 and Hq <= 256 and Hkv * D <= 65535, "paged_attention",
           "query heads a multiple of kv heads, ratio <= 64, <= 256 heads, kv_heads*head_dim <= 65535",
           f"{Hq} / {Hkv} heads of {D}", "check the tensor-parallel split of the heads")
    _check(BS in (128, 512), "paged_attention", "block_size 128 or 512 (FIA PageAttention, TND)", BS,
           "allocate the KV cache with block size 128")
    _check(0 < R <= 4096 and query_start_loc.shape[0] == R + 1 and block_tables.shape[0] >= R,
           "paged_attention", "1..4096 requests with query_start_loc [R+1] and block_tables [>=R, ...]",
           f"seq_lens [{R}], query_start_loc {list(query_start_loc.shape)}, "
           f"block_tables {list(block_tables.shape)}", "split the batch or fix the metadata")
    _check(T <= 1048576, "paged_attention", "at most 1048576 tokens per call (TND)", T,
           "split the prefill into chunks")
    if T == 0:
        return None
    _check(query_start_loc_host is not None and seq_lens_host is not None, "paged_attention",
           "query_start_loc_host and seq_lens_host (the step's lengths as host lists)", "None",
           "pass the host copies the engine's metadata carries; reading the device tensors here "
           "would stall the NPU in every layer")
    starts = [int(v) for v in query_start_loc_host]
    kv_lens = [int(v) for v in seq_lens_host]
    _check(len(starts) == R + 1 and len(kv_lens) == R, "paged_attention",
           f"host lists of {R + 1} query starts and {R} seq_lens", f"{len(starts)} and {len(kv_lens)}",
           "pass the host copies of the same step's query_start_loc and seq_lens")
    q_ends = starts[1:]
    _check(starts[0] == 0 and q_ends[-1] <= T, "paged_attention",
           f"query_start_loc starting at 0 and ending at <= {T} query rows", starts,
           "query_start_loc must index rows of query")
    q_lens = [b - a for a, b in zip(starts, q_ends)]
    # a query longer than its keys (an engine's padding request) is valid: the kernel gives the
    # rows that see no key zeros ("sparse_mode=3 and Q_S > KV_S" invalid rows; empty KV: all
    # zeros), as ops.cpu specifies
    _check(all(lq >= 0 for lq in q_lens) and all(lk >= 0 for lk in kv_lens), "paged_attention",
           "non-decreasing query starts and non-negative seq_lens", f"query lengths {q_lens}, "
           f"seq_lens {kv_lens}", "fix the attention metadata")
    return q_ends, kv_lens


# torch_npu's default for both: no sliding window (passed explicitly where vllm-ascend does)
_NO_WINDOW = 2147483647


@dataclass
class GraphTask:
    """``paged_attention`` captured in an ACL graph as an updatable task (``args``: the call,
    every tensor and host value it was captured with; ``handle`` and ``event``: what an updater
    needs to give a replay fresh lengths, see ``paged_attention_graph_task``)."""

    event: object
    handle: object
    args: dict
    workspace: torch.Tensor
    softmax_lse: torch.Tensor
    output: torch.Tensor


def _fused_attention(query, key_cache, value_cache, block_tables, scale, q_ends, kv_lens,
                     graph_out=None, workspace=None):
    """The fused attention call, made here only.

    Functional (``graph_out`` None): returns the attention output [n, Hq, D].
    ``graph_out`` [n, Hq, D] (a capture): the updatable task of ``paged_attention_graph_task``
    writing into it; returns its ``GraphTask``."""
    NB, BS, Hkv, D = key_cache.shape
    Hq = query.shape[1]
    R = len(kv_lens)
    args = dict(query=query, key=key_cache.view(NB, BS, Hkv * D),
                value=value_cache.view(NB, BS, Hkv * D),
                atten_mask=_compressed_causal_mask(query.device),
                block_table=block_tables[:R].to(device=query.device, dtype=torch.int32).contiguous(),
                actual_seq_lengths=q_ends, actual_seq_lengths_kv=kv_lens, num_heads=Hq,
                num_key_value_heads=Hkv, scale=float(scale), input_layout="TND", block_size=BS,
                sparse_mode=3)
    if graph_out is None:
        attention_out, _lse = torch_npu.npu_fused_infer_attention_score(**args)
        return attention_out.view(query.shape[0], Hq, D)
    if workspace is None:           # host work: the size for these arguments, and the tensor
        workspace = torch_npu._npu_fused_infer_attention_score_get_max_workspace(
            **args, pre_tokens=_NO_WINDOW, next_tokens=_NO_WINDOW)
    lse = torch.empty(1, dtype=query.dtype, device=query.device)
    stream = torch_npu.npu.current_stream()
    event = torch_npu.npu.ExternalEvent()
    event.wait(stream)
    event.reset(stream)
    torch_npu.npu.graph_task_group_begin(stream)
    torch_npu.npu_fused_infer_attention_score.out(**args, pre_tokens=_NO_WINDOW,
                                                  next_tokens=_NO_WINDOW, workspace=workspace,
                                                  out=[graph_out, lse])
    handle = torch_npu.npu.graph_task_group_end(stream)
    return GraphTask(event, handle, dict(args, pre_tokens=_NO_WINDOW, next_tokens=_NO_WINDOW),
                     workspace, lse, graph_out)


def paged_attention_graph_task(query: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_tables: torch.Tensor,
                               query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float, *, out: torch.Tensor,
                               query_start_loc_host: list[int], seq_lens_host: list[int],
                               workspace: torch.Tensor | None = None) -> GraphTask:
    """``paged_attention`` while an ACL graph is being captured, as an updatable task: the NPU
    backend's form of the op for a FULL graph (no CPU counterpart: CPU engines capture nothing).

    A replayed graph runs its kernels with the arguments of their capture; the attention's host
    lengths (``actual_seq_lengths``, ``actual_seq_lengths_kv``) and block table change every
    step, so the call is captured the way torch.npu documents for an updatable task
    (torch_npu-npu-graph_task_group_begin.md / graph_task_update_begin.md, whose example this
    is, and vllm-ascend's own ``full_graph_fia`` in attention/attention_v1.py):
    an ``ExternalEvent`` waited and reset on the stream (the replay stops there until an updater
    records it), then alone in a task group the ``.out`` overload writing ``out`` [n, Hq, D]
    directly (no copy), with a workspace queried for these arguments (``workspace``: one made
    already for this token count, shared by the layers). Checks as ``paged_attention``; the
    step must use every query row (n == T: a captured step is padded by the engine).
    Returns the ``GraphTask``; an updater re-issues the same ``.out`` call with fresh lengths
    and block table between ``graph_task_update_begin(stream, task.handle)`` and
    ``graph_task_update_end(stream)``, then records ``task.event``.
    """
    lengths = _attention_lengths(query, key_cache, value_cache, block_tables, query_start_loc,
                                 seq_lens, query_start_loc_host, seq_lens_host)
    T, Hq, D = query.shape
    _check(lengths is not None and lengths[0][-1] == T and out.shape == (T, Hq, D),
           "paged_attention_graph_task", f"a padded step using all {T} query rows and out of shape "
           f"[{T}, {Hq}, {D}]", f"query ends {lengths and lengths[0]}, out {list(out.shape)}",
           "capture the step the engine pads to its graph size")
    q_ends, kv_lens = lengths
    return _fused_attention(query.contiguous(), key_cache, value_cache, block_tables, scale,
                            q_ends, kv_lens, graph_out=out, workspace=workspace)


# --------------------------------------------------------------------------------------------
# int8 quantisation
# --------------------------------------------------------------------------------------------

def dynamic_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantisation with ``torch_npu.npu_dynamic_quant(x)``.

    Kernel doc: npu_dynamic_quant(x, *, smooth_scales=None, group_index=None, dst_type=None)
    -> (y int8, scale fp32 of x.shape[:-1]); scale = rowMax(|x|) / 127, y = round(x / scale);
    x fp16/bf16 only, more than 1 dim.
    Marshalling: none (x [M, K] passed as is); M == 0 returns empties without a call.
    Tolerance vs ops.cpu: scale within 1 fp32 ulp; xq within +-1 where x/scale lands on a
    rounding tie or the kernel multiplies by a reciprocal. Not documented: the kernel's rounding
    mode (ops.cpu: half to even) and its output for an all-zero row (ops.cpu: scale 0, xq 0).
    """
    _check(x.dtype in _HALF, "dynamic_quant", "x of dtype float16/bfloat16 (npu_dynamic_quant)",
           _dt(x), "quantise activations in the model dtype (bf16/fp16)")
    _check(x.dim() == 2, "dynamic_quant", "x of shape [M, K]", list(x.shape),
           "flatten the tokens to [M, K] first")
    if x.shape[0] == 0:
        return torch.empty(x.shape, dtype=torch.int8, device=x.device), \
            torch.empty(0, dtype=torch.float32, device=x.device)
    xq, scale = torch_npu.npu_dynamic_quant(x)
    return xq, scale.float()


def static_quant(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per-tensor int8 quantisation with zero point via ``torch_npu.npu_quantize(..., div_mode=True)``.

    Kernel doc: npu_quantize(input, scales, zero_points, dtype, axis=1, div_mode=True);
    div_mode=True computes ``input / scales + zero_points`` (False multiplies); on A2 with
    div_mode=True: input fp32/fp16/bf16, scales fp32/bf16, zero_points int8/uint8/int32/bf16,
    dtype torch.qint8. vllm-ascend instead passes 1/scale with div_mode=False, which is not
    bit-exact with a division; this backend divides, as ops.cpu does.
    Marshalling: x passed in its own dtype (one kernel; the A2 table takes bf16 / fp16 input
    with an fp32 scale, and an exact widening of x changes nothing in ``x / scale``); scale and
    offset as ``prepare_static_quant`` made them when the weights were finalised (fp32 [K],
    int8 [K]: nothing is converted per call); a raw [1] scale / offset is expanded here instead. The
    offset must be integral in [-128, 127] (the kernel takes integer zero points): checked once,
    at finalisation, never here.
    Tolerance vs ops.cpu: bit-exact if the kernel divides in fp32 and rounds half to even and
    saturates to [-128, 127]; the torch_npu page states the formula but not the rounding mode.
    """
    K = x.shape[-1]
    _check(x.dtype in _FLOAT, "static_quant", "x of dtype float16/bfloat16/float32", _dt(x),
           "quantise activations in the model dtype")
    _check(scale.numel() in (1, K) and offset.numel() == scale.numel(), "static_quant",
           f"per-tensor scale and offset of 1 (or, prepared, {K}) elements",
           f"{list(scale.shape)} and {list(offset.shape)}",
           "pass the checkpoint's input_scale / input_offset, or prepare_static_quant's result")
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if scale.numel() != K or scale.dtype != torch.float32 or offset.dtype != torch.int8:
        scale, offset = prepare_static_quant(scale.reshape(-1)[:1], offset.reshape(-1)[:1], K)
    return torch_npu.npu_quantize(x.contiguous(), scale, offset, torch.qint8, axis=-1,
                                  div_mode=True)


def _check_mm(op: str, xq: torch.Tensor, wq: torch.Tensor) -> None:
    _check(xq.dtype == torch.int8 and wq.dtype == torch.int8, op, "int8 xq and int8 wq",
           f"{_dt(xq)} and {_dt(wq)}", "quantise with ops.dynamic_quant / ops.static_quant first")
    _check(xq.dim() == 2 and wq.dim() == 2 and xq.shape[1] == wq.shape[0], op,
           "xq [M, K] and wq [K, N]", f"{list(xq.shape)} and {list(wq.shape)}",
           "store the weight transposed as [in, out]")
    _check(wq.shape[0] <= 65535 and wq.shape[1] <= 65535, op,
           "K and N <= 65535 (npu_quant_matmul last-dim limit)", list(wq.shape),
           "split the layer (e.g. keep lm_head in float)")


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """The raw int32 accumulator with ``torch_npu.npu_quant_matmul(..., output_dtype=torch.int32)``.

    Kernel doc: npu_quant_matmul(x1, x2, scale, *, offset, pertoken_scale, bias, output_dtype);
    the A2 dtype table lists x1 int8, x2 int8, scale fp32/bf16, no offset, bias int32/None, no
    pertoken_scale -> output int32. A scale is mandatory there; the page does not say whether it
    is applied to an int32 output, so scale = 1.0 (fp32 [1]) makes either reading return the
    accumulator.
    Marshalling: xq [M, K] contiguous, wq [K, N] (ND or the FRACTAL_NZ from ``prepare_weight``);
    M == 0 returns an empty [0, N] without a call (x1 may not be empty).
    Tolerance vs ops.cpu: bit-exact (integer accumulation).
    """
    _check_mm("int8_matmul", xq, wq)
    if xq.shape[0] == 0:
        return torch.zeros(0, wq.shape[1], dtype=torch.int32, device=xq.device)
    one = torch.ones(1, dtype=torch.float32, device=xq.device)
    return torch_npu.npu_quant_matmul(xq.contiguous(), wq, one, output_dtype=torch.int32)


def quant_matmul(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor,
                 pertoken_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 output_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """int8 GEMM + dequant with ``torch_npu.npu_quant_matmul(xq, wq, scale, offset=None,
    pertoken_scale=, bias=, output_dtype=)``.

    Kernel doc (formulas): bias int32: out = (x1 @ x2 + bias) * scale; with pertoken_scale and
    int32 bias: out = (x1 @ x2 + bias) * scale * pertoken_scale. A2 dtype table:
      bf16 output: scale fp32/bf16, bias int32/None, pertoken_scale fp32/None;
      fp16 output with pertoken_scale: scale fp32;
      fp16 output without pertoken_scale: scale int64 from torch_npu.npu_trans_quant_param(scale)
      (the doc's examples require this conversion; it packs the fp32 scale as FP19, i.e. keeps
      sign, exponent and the top 10 mantissa bits).
    Marshalling: scale -> fp32 [N], or the int64 FP19 pack for fp16 without pertoken_scale (both
    made once by ``prepare_quant_scale`` when the weights are finalised; a raw fp32 scale is
    converted here);
    pertoken_scale -> fp32 [M]; bias -> int32 [N]; M == 0 returns an empty [0, N].
    Other output dtypes are rejected (the kernel's float outputs are bf16 and fp16 only).
    Tolerance vs ops.cpu: bf16: one bf16 ulp (fp32 dequant, one rounding); fp16 with
    pertoken_scale: one fp16 ulp; fp16 without: FP19 truncation of scale (relative <= 2^-10)
    plus one fp16 ulp, rtol 2e-3.
    """
    _check_mm("quant_matmul", xq, wq)
    M, N = xq.shape[0], wq.shape[1]
    _check(output_dtype in _HALF, "quant_matmul", "output_dtype bfloat16 or float16",
           output_dtype, "npu_quant_matmul dequantises to bf16/fp16 only; cast the result afterwards")
    packed = scale.dtype == torch.int64
    _check((scale.is_floating_point() or packed) and scale.numel() in (1, N), "quant_matmul",
           f"a float (or prepare_quant_scale's int64) scale of 1 or {N} elements",
           f"{_dt(scale)} {list(scale.shape)}",
           "pass the per-channel dequant scale as fp32 (not msModelSlim's int64 deq_scale)")
    _check(not packed or (output_dtype == torch.float16 and pertoken_scale is None), "quant_matmul",
           "an int64 (FP19-packed) scale only for fp16 output without a per-token scale",
           f"int64 scale with output {output_dtype}", "prepare the scale for this output")
    if M == 0:
        return torch.empty(0, N, dtype=output_dtype, device=xq.device)
    scale_arg = scale if packed else \
        prepare_quant_scale(scale, output_dtype, pertoken=pertoken_scale is not None)
    pts = None
    if pertoken_scale is not None:
        _check(pertoken_scale.numel() == M, "quant_matmul", f"pertoken_scale of {M} elements",
               list(pertoken_scale.shape), "pass the scale returned by ops.dynamic_quant")
        pts = pertoken_scale.reshape(M).float().contiguous()
    b = None if bias is None else bias.reshape(-1).to(torch.int32).contiguous()
    return torch_npu.npu_quant_matmul(xq.contiguous(), wq, scale_arg, offset=None,
                                      pertoken_scale=pts, bias=b, output_dtype=output_dtype)


# --------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------

def moe_gating_topk(router_logits: torch.Tensor, k: int, renormalize: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router + top-k with ``torch_npu.npu_moe_gating_top_k_softmax(logits, finished=None, k=k)``.

    Kernel doc: npu_moe_gating_top_k_softmax(x, finished=None, k=1) -> (y, expert_idx, row_idx);
    y = topK(softmax(x, -1)) in x's dtype (2-D/3-D x of fp16/bf16/fp32), expert_idx int32,
    0 < k <= E, k <= 1024. Neither this kernel nor npu_moe_gating_top_k renormalises softmax
    weights (torch_npu-npu_moe_gating_top_k.md: renorm accepts 0 only; the renormalised
    formula is the sigmoid mode's); vllm-ascend does it in its own _C_ascend.moe_gating_top_k.
    Marshalling: none: the logits go in their own dtype (the weights come back in it, as
    ops.cpu returns them, and as vllm-ascend keeps them), row_idx is dropped, the
    renormalisation (weights / their sum) follows in that dtype: three kernels in all.
    T == 0 returns empties.
    Tolerance vs ops.cpu (fp32 softmax and renormalisation, one rounding): for bf16 logits the
    kernel's rounding of the top-k probabilities and the bf16 sum and division add two
    roundings: within 3 bf16 ulps (rtol 2e-2); fp32 logits: atol 1e-6. Ids identical except
    between equal probabilities (ops.cpu keeps the lower expert id first; the kernel's tie
    order is not documented).
    """
    _check(router_logits.dim() == 2, "moe_gating_topk", "router_logits [T, E]",
           list(router_logits.shape), "flatten the tokens first")
    E = router_logits.shape[1]
    _check(0 < k <= min(E, 1024), "moe_gating_topk", f"0 < k <= min(E={E}, 1024)", k,
           "use top_k from the model config")
    T = router_logits.shape[0]
    if T == 0:
        dev = router_logits.device
        return torch.empty(0, k, dtype=router_logits.dtype, device=dev), \
            torch.empty(0, k, dtype=torch.int32, device=dev)
    weights, ids, _row_idx = torch_npu.npu_moe_gating_top_k_softmax(
        router_logits.contiguous(), finished=None, k=k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_route(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort token copies by expert with ``torch_npu.npu_moe_init_routing_v2``.

    Kernel doc: npu_moe_init_routing_v2(x, expert_idx, *, active_num, expert_num,
    expert_tokens_num_type, expert_tokens_num_flag, quant_mode, active_expert_range,
    row_idx_type, ...) -> (expanded_x, expanded_row_idx, expert_token_cumsum_or_count,
    expanded_scale). The (token, slot) pairs p = t*k + j are key-value sorted by expert id
    (sortedRowIdx; the doc's reference uses a stable argsort) and expanded_x[i] =
    x[sortedRowIdx[i] // k]. row_idx_type=0 ("gather index", the default) gives
    expanded_row_idx[sortedRowIdx[i]] = i, i.e. the sorted row of each pair; row_idx_type=1
    would give sortedRowIdx itself. expert_tokens_num_type=1 = per-expert counts (int64 [E])
    when expert_tokens_num_flag=True; quant_mode=-1 = no quantisation; active_num = T*k and
    active_expert_range=[0, E] route every pair. Expert ids must be < E; expert_num <= 10240.
    Why row_idx_type=0: op-plugin's wrapper sends one shape family (E=128, range [0, 128],
    hidden 2048, no quant, counts: exactly Qwen3-30B-A3B) to the older aclnnMoeInitRoutingV2 on
    CANN < 8.5.0alpha003, which has no row_idx_type and always returns the gather index; the
    gather index means the same on both code paths.
    Marshalling: expert_ids -> int32; the gather index is ops.cpu's ``row_of_pair`` as it is (no
    permutation is inverted here or in ``moe_combine``); T == 0 returns empties. The expert ids are not
    range-checked here (that would be a device->host sync in every MoE layer): they come from
    ``moe_gating_topk`` over E logits, so they lie in [0, E).
    Tolerance vs ops.cpu: bit-exact (a permutation and counts), given the stable sort.
    """
    _check(x.dtype in _FLOAT, "moe_route", "x of dtype float16/bfloat16/float32", _dt(x),
           "route the activations in the model dtype")
    sorted_x, pairs, counts, _scale = _route("moe_route", x, expert_ids, num_experts, quant_mode=-1)
    return sorted_x, pairs, counts


def _route(op: str, x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, quant_mode: int):
    """The shared body of ``moe_route`` (quant_mode -1) and ``moe_route_quant`` (1): their shape
    checks and the kernel call."""
    _check(expert_ids.dim() == 2 and x.dim() == 2 and x.shape[0] == expert_ids.shape[0],
           op, "x [T, Hd] and expert_ids [T, k]",
           f"{list(x.shape)} and {list(expert_ids.shape)}", "pass the router's top-k ids")
    _check(0 < num_experts <= 10240, op, "1..10240 experts", num_experts,
           "check num_experts of the config")
    T, k = expert_ids.shape
    if T == 0:
        return x.new_empty(0, x.shape[1], dtype=torch.int8 if quant_mode == 1 else x.dtype), \
            torch.empty(0, dtype=torch.int32, device=x.device), \
            torch.zeros(num_experts, dtype=torch.int64, device=x.device), \
            torch.empty(0, dtype=torch.float32, device=x.device)
    ids = expert_ids.to(torch.int32).contiguous()
    sorted_x, gather_idx, counts, scale = torch_npu.npu_moe_init_routing_v2(
        x.contiguous(), ids,
        active_num=T * k, expert_num=num_experts,
        expert_tokens_num_type=1, expert_tokens_num_flag=True,
        quant_mode=quant_mode, active_expert_range=[0, num_experts], row_idx_type=0)
    return sorted_x, gather_idx, counts.to(torch.int64), scale


def moe_route_quant(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing with the per-token dynamic int8 quantisation fused in (W8A8_DYNAMIC experts).

    Kernel doc: npu_moe_init_routing_v2 with quant_mode=1 (dynamic quant) returns expanded_x in
    int8 and expanded_scale [rows] fp32 = rowmax|x| / 127 of each expanded row; no scale input
    (no smoothing), no offset. Everything else as in ``moe_route``.
    Tolerance vs ops.cpu (moe_route then dynamic_quant): bit-exact permutation and counts; the
    quantised rows and scales are the same arithmetic (round half to even of x / scale).
    """
    _check(x.dtype in (torch.float16, torch.bfloat16), "moe_route_quant",
           "x of dtype float16/bfloat16 (the fused dynamic quant)", _dt(x),
           "run W8A8 models in bfloat16 or float16 on the NPU")
    return _route("moe_route_quant", x, expert_ids, num_experts, quant_mode=1)


def _group_list(op: str, group_sizes: torch.Tensor, groups: int, rows: int,
                cumulative: bool = False) -> tuple[torch.Tensor, int]:
    """(group_list, group_list_type) for npu_grouped_matmul from per-group counts, or from
    cumulative end rows (``cumulative``: type 0, the kernel's cumsum mode, as they are).

    Counts mode (type 1) is used, except for a single group: the doc forbids a counts list of
    length 1, and a 1-element cumsum (type 0) carries the same number. Checks at most 1024
    groups; the counts (which may cover fewer than ``rows`` rows) are not read on the host: that
    would be a device->host sync in every MoE layer.
    """
    _check(group_sizes.dim() == 1 and group_sizes.numel() == groups, op,
           f"group_sizes [{groups}] (one count per weight group)", list(group_sizes.shape),
           "pass tokens_per_expert from ops.moe_route")
    _check(groups <= 1024, op, "at most 1024 groups", groups, "shard the experts (expert parallel)")
    gl = group_sizes if group_sizes.dtype == torch.int64 else group_sizes.to(torch.int64)
    return gl.contiguous(), (0 if groups == 1 or cumulative else 1)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor,
                   cumulative: bool = False) -> torch.Tensor:
    """Per-group float GEMM with ``torch_npu.npu_grouped_matmul([x], [weight], group_list=,
    group_list_type=1, split_item=2, group_type=0)[0]``.

    Kernel doc: npu_grouped_matmul(x: List[Tensor], weight: List[Tensor], *, ..., group_list,
    split_item, group_type, group_list_type, output_dtype) -> List[Tensor]; "single-single-single"
    with group_type=0 (m-axis groups): x [M, K] 2-D, weight [G, K, N] 3-D, split_item 2/3 -> one
    output [M, N]; group_list int64 tensor, type 1 = counts (length != 1), type 0 = cumsum;
    the groups may cover fewer than M rows (aclnnGroupedMatmulV4: the total is "less than or
    equal to" M; rows past them are not written, as ops.cpu allows); <= 1024 groups;
    K, N < 65536. Float combos: fp16/fp16->fp16,
    bf16/bf16->bf16, fp32/fp32->fp32.
    Marshalling: group_sizes -> int64 (see ``_group_list``); M == 0 returns [0, N].
    Tolerance vs ops.cpu (fp32 accumulation, one rounding): rtol=atol=1e-2 bf16, 2e-3 fp16,
    1e-4 fp32 (accumulation order differs).
    """
    _check(x.dim() == 2 and weight.dim() == 3 and weight.shape[1] == x.shape[1], "grouped_matmul",
           "x [M, K] and weight [G, K, N]", f"{list(x.shape)} and {list(weight.shape)}",
           "stack the expert weights as [experts, in, out]")
    _check(x.dtype in _FLOAT and weight.dtype == x.dtype, "grouped_matmul",
           "x and weight of one dtype in float16/bfloat16/float32", f"{_dt(x)} and {_dt(weight)}",
           "load the expert weights in the activation dtype")
    _check(x.shape[1] < 65536 and weight.shape[2] < 65536, "grouped_matmul",
           "K and N < 65536 (inner-axis limit)", list(weight.shape), "split the expert FFN")
    G, N = weight.shape[0], weight.shape[2]
    gl, gl_type = _group_list("grouped_matmul", group_sizes, G, x.shape[0], cumulative)
    if x.shape[0] == 0:
        return x.new_empty(0, N)
    return torch_npu.npu_grouped_matmul([x.contiguous()], [weight], group_list=gl,
                                        group_list_type=gl_type, split_item=2, group_type=0)[0]


def grouped_quant_matmul(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor,
                         pertoken_scale: torch.Tensor, group_sizes: torch.Tensor,
                         output_dtype: torch.dtype = torch.bfloat16,
                         cumulative: bool = False) -> torch.Tensor:
    """Per-group W8A8-dynamic GEMM with ``torch_npu.npu_grouped_matmul([xq], [wq], scale=[s],
    per_token_scale=[pts], group_list=, group_list_type=1, split_item=2, group_type=0,
    output_dtype=)[0]``.

    Kernel doc: formula 3 (pertoken quantisation): y_i = (x_i @ weight_i) * scale_i *
    pertokenscale_i. A2 dtype table (group_list a Tensor), "pertoken full quantisation":
    x int8, weight int8, per_token_scale fp32, and scale bf16 -> output bf16, scale fp32 ->
    output fp16. vllm-ascend passes the per-expert scale as a 2-D [E, N] tensor (the page says
    1-D per list entry; the 2-D form is the one exercised on hardware).
    Marshalling: scale [G, N] in bf16 (bf16 output) or fp32 (fp16 output), as
    ``prepare_expert_scale`` made it when the weights were finalised (a scale of another dtype is
    cast here); pertoken_scale -> fp32 [M]; group_sizes -> int64 counts (see ``_group_list``);
    M == 0 returns [0, N]. Output dtypes other than bf16/fp16 are rejected.
    Tolerance vs ops.cpu: bf16 output: the scale is rounded to bf16 (exact when it comes from a
    bf16 checkpoint's weight_scale, as msModelSlim stores it) plus one bf16 ulp: rtol 1e-2;
    fp16 output: one fp16 ulp, rtol 2e-3.
    """
    _check(xq.dtype == torch.int8 and wq.dtype == torch.int8, "grouped_quant_matmul",
           "int8 xq and int8 wq", f"{_dt(xq)} and {_dt(wq)}", "quantise with ops.dynamic_quant first")
    _check(xq.dim() == 2 and wq.dim() == 3 and wq.shape[1] == xq.shape[1], "grouped_quant_matmul",
           "xq [M, K] and wq [G, K, N]", f"{list(xq.shape)} and {list(wq.shape)}",
           "stack the expert weights as [experts, in, out]")
    G, N = wq.shape[0], wq.shape[2]
    _check(scale.shape == (G, N), "grouped_quant_matmul", f"scale [{G}, {N}]", list(scale.shape),
           "pass the per-expert, per-channel weight_scale")
    _check(output_dtype in _HALF, "grouped_quant_matmul", "output_dtype bfloat16 or float16",
           output_dtype, "the kernel dequantises to bf16/fp16 only; cast afterwards")
    M = xq.shape[0]
    _check(pertoken_scale.numel() == M, "grouped_quant_matmul", f"pertoken_scale of {M} elements",
           list(pertoken_scale.shape), "pass the scale returned by ops.dynamic_quant")
    _check(xq.shape[1] < 65536 and N < 65536, "grouped_quant_matmul",
           "K and N < 65536 (inner-axis limit)", list(wq.shape), "split the expert FFN")
    gl, gl_type = _group_list("grouped_quant_matmul", group_sizes, G, M, cumulative)
    if M == 0:
        return torch.empty(0, N, dtype=output_dtype, device=xq.device)
    s = prepare_expert_scale(scale, output_dtype)      # no copy when already prepared
    return torch_npu.npu_grouped_matmul(
        [xq.contiguous()], [wq], scale=[s], per_token_scale=[pertoken_scale.reshape(M).float()],
        group_list=gl, group_list_type=gl_type, split_item=2, group_type=0,
        output_dtype=output_dtype)[0]


def grouped_quant_swiglu_quant(xq: torch.Tensor, w13q: torch.Tensor, scale: torch.Tensor,
                               pertoken_scale: torch.Tensor, group_sizes: torch.Tensor,
                               output_dtype: torch.dtype = torch.bfloat16,
                               cumulative: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.cpu.grouped_quant_swiglu_quant`` with torch_npu's kernels: ``grouped_quant_matmul``
    (npu_grouped_matmul), ``swiglu`` (npu_swiglu), ``dynamic_quant`` (npu_dynamic_quant): three
    kernels. (vllm-ascend fuses them into its own ``_C_ascend.grouped_matmul_swiglu_quant_weight_nz``,
    registered for it by the vLLM plugin where vllm-ascend is installed.)
    Tolerance vs ops.cpu: those of the three ops (the int8 output may differ by one step where
    the bf16 rounding of the GEMM's output flips a rounding of the quantisation)."""
    h = grouped_quant_matmul(xq, w13q, scale, pertoken_scale, group_sizes, output_dtype,
                             cumulative)
    return dynamic_quant(swiglu(h))


def moe_combine(expert_out: torch.Tensor, row_of_pair: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
    """Weighted un-permute with ``torch_npu.npu_moe_token_unpermute(permuted_tokens,
    sorted_indices, probs=)``.

    Kernel doc (aclnnMoeTokenUnpermute; torch_npu wraps it 1:1): T[k] = T[S[k]];
    T[k] *= P[i][j]; O[i] = sum_{k=i*topK}^{(i+1)*topK-1} T[k]: ``sorted_indices`` S gives, for
    each pair k = i*topK + j, its row in permuted_tokens ("the position in permutedTokens of the
    data to compute": a gather index, int32, no duplicates); probs [tokens, topK]; permuted
    tokens and probs fp32/fp16/bf16; topK <= 512; output in permuted_tokens' dtype. (vllm-ascend
    feeds it init_routing_v2's row_idx_type=0 index, which has this meaning; op-plugin's own
    test passes the double argsort of the flat ids, the same thing.)
    npu_moe_finalize_routing was not chosen: it indexes pairs column-major (i + k*num_rows) and
    vllm-ascend reports accuracy issues with it.
    Marshalling: none: S is ``row_of_pair`` from ``moe_route`` as it is (the routing kernel's
    gather index, int32), expert_out and weights go in their own dtypes (the kernel's op
    definition takes every pairing of bf16 / fp16 / fp32 tokens and probs and returns the
    tokens' dtype; vllm-ascend passes bf16 for both), one kernel. T == 0 returns [0, Hd].
    Tolerance vs ops.cpu (fp32 products and sum of the given values, one rounding): one ulp of
    expert_out.dtype if the kernel accumulates in fp32 (not documented; the emulator does, the
    npu-marked test settles it).
    """
    _check(weights.dim() == 2 and expert_out.dim() == 2
           and expert_out.shape[0] == weights.numel() == row_of_pair.numel(), "moe_combine",
           "expert_out [T*k, Hd], row_of_pair [T*k], weights [T, k]",
           f"{list(expert_out.shape)}, {list(row_of_pair.shape)}, {list(weights.shape)}",
           "pass the outputs of ops.moe_route and ops.moe_gating_topk")
    T, k = weights.shape
    _check(k <= 512, "moe_combine", "top-k <= 512", k, "use fewer experts per token")
    if T == 0:
        return expert_out.new_empty(0, expert_out.shape[1])
    return torch_npu.npu_moe_token_unpermute(expert_out.contiguous(),
                                             row_of_pair.to(device=expert_out.device, dtype=torch.int32),
                                             probs=weights.contiguous())


# --------------------------------------------------------------------------------------------
# Expert parallel: the token exchange (MC2)
# --------------------------------------------------------------------------------------------

# Atlas A2 limits of the MC2 kernels (torch_npu-npu_moe_distribute_dispatch_v2.md /
# _combine_v2.md, "Constraints"): tokens per rank, hidden size, experts per token
MC2_MAX_TOKENS = 256
MC2_MAX_HIDDEN = 7168
MC2_MAX_TOP_K = 16
MC2_EP_SIZES = (2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Mc2Dispatched:
    """What ``npu_moe_distribute_combine_v2`` needs of its dispatch (``ep_dispatch``'s handle)."""

    expert_ids: torch.Tensor
    active: torch.Tensor | None
    num_experts: int
    hccl_name: str
    size: int
    rank: int
    assist_info: torch.Tensor
    recv_counts: torch.Tensor
    expand_scales: torch.Tensor


def ep_dispatch(x: torch.Tensor, expert_ids: torch.Tensor, active: torch.Tensor | None,
                num_experts: int, ep, quantize: bool = False):
    """``ops.cpu.ep_dispatch`` with ``torch_npu.npu_moe_distribute_dispatch_v2`` (MC2: the
    routing, the all-to-all of the pairs and, for ``quantize``, the per-token int8 quantisation
    in one collective kernel), called as vllm-ascend 0.23 calls it on Atlas A2
    (``vllm_ascend/ops/fused_moe/token_dispatcher.py``, TokenDispatcherWithMC2): global_bs 0
    (every rank the same BS) with ``x_active_mask``, expert_token_nums_type 0 (cumulative),
    no shared experts, no TP domain, quant_mode 0 or 2, over the HCCL communicator
    ``ep.hccl_name``.

    Kernel doc (torch_npu-npu_moe_distribute_dispatch_v2.md; aclnnMoeDistributeDispatchV2):
    x [BS, H] bf16/fp16, expert_ids [BS, K] int32 (distinct in a row); returns (expand_x [A, H]
    with A = BS * ep_world_size * min(local experts, K), rows grouped by local expert, then
    source rank, then token; dynamic_scales [A] fp32 (quant_mode 2: 1 / (127 / max|x|)),
    assist_info_for_combine, expert_token_nums [L] int64, ep_recv_counts, tp_recv_counts,
    expand_scales); rows past the received ones are not written. x_active_mask: bool [BS], a
    prefix of True; masked rows send nothing. A2: 0 < BS <= 256, H a multiple of 32 up to 7168,
    K <= 16, experts divisible by the ranks, ep_world_size 2-8, 16, 32, 64, 128 or 256.
    Marshalling: expert ids to int32 (the router's already are: no kernel). One kernel.
    Tolerance vs ops.cpu: the rows exact (int8 rows within one step where x / scale lands on a
    rounding tie: the kernel multiplies by 127 / max, ops.cpu divides by max / 127), the scales
    within one fp32 ulp; within an expert the row order may differ from ops.cpu's (only
    ``ep_combine`` reads it).
    """
    BS, H = x.shape
    K = expert_ids.shape[1]
    _check(isinstance(ep.hccl_name, str) and 0 < len(ep.hccl_name) < 128, "ep_dispatch",
           "the expert-parallel group's HCCL communicator name (ExpertGroup.hccl_name)",
           ep.hccl_name, "pass ProcessGroupHCCL.get_hccl_comm_name of the expert-parallel group")
    _check(x.dtype in _HALF, "ep_dispatch", "x of dtype bfloat16/float16", _dt(x),
           "run MoE models in bf16 or fp16 on the NPU")
    _check(0 < BS <= MC2_MAX_TOKENS, "ep_dispatch", f"1 to {MC2_MAX_TOKENS} tokens per rank "
           "(Atlas A2)", BS, "take the all-gather exchange for larger steps")
    _check(H % 32 == 0 and H <= MC2_MAX_HIDDEN, "ep_dispatch",
           f"a hidden size that is a multiple of 32, at most {MC2_MAX_HIDDEN}", H,
           "take the all-gather exchange")
    _check(K <= MC2_MAX_TOP_K, "ep_dispatch", f"at most {MC2_MAX_TOP_K} experts per token", K,
           "take the all-gather exchange")
    _check(ep.size in MC2_EP_SIZES and num_experts % ep.size == 0, "ep_dispatch",
           f"an expert-parallel size in {MC2_EP_SIZES} dividing the experts",
           f"{ep.size} ranks for {num_experts} experts", "take the all-gather exchange")
    ids = expert_ids if expert_ids.dtype == torch.int32 else expert_ids.to(torch.int32)
    kwargs = dict(expert_shard_type=0, shared_expert_rank_num=0, quant_mode=2 if quantize else 0,
                  global_bs=0, expert_token_nums_type=0)
    if active is not None:
        kwargs["x_active_mask"] = active
    (expand_x, dynamic_scales, assist_info, ends, recv_counts, _tp_counts,
     expand_scales) = torch_npu.npu_moe_distribute_dispatch_v2(
        x.contiguous(), ids, ep.hccl_name, ep.size, ep.rank, num_experts, **kwargs)[:7]
    handle = Mc2Dispatched(ids, active, num_experts, ep.hccl_name, ep.size, ep.rank, assist_info,
                           recv_counts, expand_scales)
    return expand_x, (dynamic_scales if quantize else None), ends, handle


def ep_combine(expert_out: torch.Tensor, weights: torch.Tensor, handle: Mc2Dispatched
               ) -> torch.Tensor:
    """``ops.cpu.ep_combine`` with ``torch_npu.npu_moe_distribute_combine_v2``, called as
    vllm-ascend 0.23 calls it on Atlas A2 (vllm_ascend/ops/fused_moe/token_dispatcher.py, TokenDispatcherWithMC2):
    the dispatch's assist info, receive counts (as ep_send_counts), expand scales and mask,
    the router weights as fp32 expert_scales, comm_quant_mode 0.

    Kernel doc (torch_npu-npu_moe_distribute_combine_v2.md; aclnnMoeDistributeCombineV2):
    x[t] = sum_k expert_scales[t, k] * (the row returned for pair (t, k)), [BS, H] in
    expand_x's dtype (bf16/fp16); expand_x must keep the dispatch's row order; rows of masked
    tokens are not written.
    Marshalling: the weights to fp32 (one kernel for bf16 weights, as vllm-ascend's
    ``topk_weights.to(torch.float32)``). One kernel plus that cast.
    Tolerance vs ops.cpu: one ulp of expert_out.dtype (fp32 products and sum over k in order,
    one rounding, as ops.cpu).
    """
    _check(expert_out.dtype in _HALF, "ep_combine", "expert outputs of dtype bfloat16/float16",
           _dt(expert_out), "run MoE models in bf16 or fp16 on the NPU")
    h = handle
    kwargs = dict(expert_shard_type=0, shared_expert_rank_num=0, global_bs=0, comm_quant_mode=0,
                  expand_scales=h.expand_scales)
    if h.active is not None:
        kwargs["x_active_mask"] = h.active
    scales = weights if weights.dtype == torch.float32 else weights.to(torch.float32)
    return torch_npu.npu_moe_distribute_combine_v2(
        expert_out.contiguous(), h.expert_ids, h.assist_info, h.recv_counts, scales,
        h.hccl_name, h.size, h.rank, h.num_experts, **kwargs)


# --------------------------------------------------------------------------------------------
# Weight preparation
# --------------------------------------------------------------------------------------------

def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    """Cast a [K, N] or [G, K, N] matmul weight to FRACTAL_NZ with ``torch_npu.npu_format_cast(w, 29)``.

    Kernel doc: npu_format_cast(input, acl_format, customize_dtype=None) -> a new tensor in the
    target format; 29 = torch_npu.Format.FRACTAL_NZ. npu_quant_matmul's page recommends, on A2,
    casting x2 to the affine format WITHOUT transposing it first, which is what the [K, N]
    layout here is.
    Marshalling: made contiguous first; fp32 weights are left in ND (the grouped matmul takes
    fp32 weights in ND only). Numerically the identity (bit-exact vs ops.cpu).
    """
    _check(weight.dim() in (2, 3), "prepare_weight", "a [K, N] or [G, K, N] weight",
           list(weight.shape), "prepare matmul weights only")
    if weight.dtype == torch.float32:
        # npu_grouped_matmul documents fp32 weights as ND only (fp16/bf16/int8 take ND or NZ),
        # so fp32 weights stay in ND for every consumer.
        return weight.contiguous()
    return torch_npu.npu_format_cast(weight.contiguous(), 29)


def prepare_moe_experts(w13: torch.Tensor, w2: torch.Tensor):
    """The float experts for ``moe_experts``: each weight as ``prepare_grouped_weight`` gives it
    (``ops.cpu.prepare_moe_experts``)."""
    from . import cpu
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"prepare_moe_experts: w13 [E, H, 2I] and w2 [E, I, H] expected, got "
                         f"{list(w13.shape)} and {list(w2.shape)}")
    return cpu.GroupedExperts(prepare_grouped_weight(w13), prepare_grouped_weight(w2), w13.shape[0])


def moe_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, experts,
                num_experts: int) -> torch.Tensor:
    """The routed float experts (``ops.cpu.moe_experts``) from this backend's kernels:
    npu_moe_init_routing_v2, two npu_grouped_matmul around npu_swiglu, npu_moe_token_unpermute
    (and, under expert parallel, one masked_fill of the rows of other ranks' pairs)."""
    from . import cpu
    return cpu._route_experts_combine(sys.modules[__name__], x, weights, expert_ids, experts,
                                      num_experts)


def prepare_grouped_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [G, K, N] float ``grouped_matmul`` weight as the kernel takes it: contiguous, in ND
    (the layout the float experts have always been multiplied in here; npu_grouped_matmul also
    accepts bf16 / fp16 weights in FRACTAL_NZ, not tried without hardware). Numerically the
    identity."""
    _check(weight.dim() == 3, "prepare_grouped_weight", "a [G, K, N] weight", list(weight.shape),
           "stack the expert weights as [experts, in, out]")
    return weight.contiguous()


def prepare_static_quant(scale: torch.Tensor, offset: torch.Tensor, k: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp32 [k], zero point int8 [k]): npu_quantize's scales / zero_points along
    axis=-1, expanded once here instead of in every ``static_quant`` call (as vllm-ascend
    shapes them). The offset must be integral in [-128, 127] (checked when the weights are
    finalised). Numerically the identity."""
    _check(scale.numel() == 1 and offset.numel() == 1, "prepare_static_quant",
           "per-tensor scale [1] and offset [1]", f"{list(scale.shape)} and {list(offset.shape)}",
           "pass the checkpoint's input_scale / input_offset")
    return (scale.reshape(1).float().expand(k).contiguous(),
            offset.reshape(1).to(torch.int8).expand(k).contiguous())


def prepare_norm_quant(scale: torch.Tensor, offset: torch.Tensor, k: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales1, zero_points1) of ``npu_add_rms_norm_quant`` for activations of ``dtype``,
    expanded to [k] once here: bf16 scale and bf16 zero point for bf16 models, fp32 scale and
    int32 zero point for fp16 (the kernel's A2 dtype table; vllm-ascend shapes them so for the
    same kernel, quantization/methods/w8a8_static.py). Numerically the identity for a scale
    stored in the model dtype and an integral zero point in [-128, 127]."""
    _check(scale.numel() == 1 and offset.numel() == 1 and dtype in _HALF, "prepare_norm_quant",
           "per-tensor scale [1] and offset [1] for bf16 / fp16 activations",
           f"{list(scale.shape)} and {list(offset.shape)} for {dtype}",
           "pass the checkpoint's input_scale / input_offset")
    s_dt, o_dt = (torch.bfloat16, torch.bfloat16) if dtype == torch.bfloat16 else \
        (torch.float32, torch.int32)
    return (scale.reshape(1).to(s_dt).expand(k).contiguous(),
            offset.reshape(1).to(o_dt).expand(k).contiguous())


def prepare_quant_scale(scale: torch.Tensor, output_dtype: torch.dtype, pertoken: bool
                        ) -> torch.Tensor:
    """The dequant scale in the form npu_quant_matmul takes (see ``quant_matmul``), made once:
    fp32 [N], or for fp16 output without a per-token scale the int64 FP19 pack of
    ``torch_npu.npu_trans_quant_param`` (which ``quant_matmul`` would otherwise make per call)."""
    s = scale.reshape(-1).float().contiguous()
    if output_dtype == torch.float16 and not pertoken:
        return torch_npu.npu_trans_quant_param(s)
    return s


def prepare_expert_scale(scale: torch.Tensor, output_dtype: torch.dtype) -> torch.Tensor:
    """The per-expert weight scale [G, N] in the dtype npu_grouped_matmul pairs with the output
    (bf16 for bf16 output, fp32 for fp16; see ``grouped_quant_matmul``), cast once here. Exact
    for scales read from a bf16 checkpoint (msModelSlim stores them in the model dtype)."""
    return scale.to(torch.bfloat16 if output_dtype == torch.bfloat16 else torch.float32).contiguous()


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
# torch_npu has no LoRA kernel (vllm-ascend brings its own AscendC kernels, bgmv_shrink /
# bgmv_expand in torch.ops._C_ascend: ascend_qwen3/vllm_plugin/npu_kernels.py registers them
# where vllm-ascend is installed). Here: plain PyTorch ops on the NPU tensors (matmul, gather,
# where), with static shapes and no host read of the slots: every token goes through every
# slot's A in one matmul ([T, S*R], S slots of rank R: S times the flops of the one product a
# token needs, which at LoRA ranks is small next to the base linear, and no [T, R, K] gather of
# weights), and the expand multiplies each token's h, placed in its slot's block of S*R columns,
# with the slots' B side by side. Tokens with slot -1 select nothing (masked with where).

def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_lora: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``ops.cpu.lora_shrink`` with torch ops on the device: x [T, K] @ every slot's A^T in
    float32 ([T, S*R]), each token's slot picked with a gather, scaled, masked to 0 for slot -1.
    Tolerance against ops.cpu: float32 accumulation order only (1e-5 relative)."""
    T = x.shape[0]
    S, R, K = lora_a.shape
    every = torch.matmul(x.float(), lora_a.reshape(S * R, K).float().t()).view(T, S, R)
    slot = token_lora.long()
    pick = slot.clamp(min=0).view(T, 1, 1).expand(T, 1, R)
    h = every.gather(1, pick).view(T, R)
    return torch.where((slot >= 0).view(T, 1), h * scale, 0.0)


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, token_lora: torch.Tensor,
                offset: int) -> torch.Tensor:
    """``ops.cpu.lora_expand`` with torch ops on the device: h placed in its token's slot block
    ([T, S*R], zeros elsewhere and for slot -1), times the slots' B^T stacked ([S*R, n]) in
    float32, added to y's columns in float32 and rounded once to y's dtype, in place. Rows of
    slot -1 add an exact 0 (y unchanged). Tolerance against ops.cpu: float32 accumulation order
    only, then one rounding to y's dtype (as the specification rounds)."""
    T = y.shape[0]
    S, n, R = lora_b.shape
    mine = token_lora.long().view(T, 1) == torch.arange(S, device=y.device).view(1, S)
    spread = torch.where(mine.view(T, S, 1), h.float().view(T, 1, R), 0.0).view(T, S * R)
    stacked = lora_b.float().transpose(1, 2).reshape(S * R, n)
    out = y[:, offset:offset + n]
    out.copy_(out.float() + torch.matmul(spread, stacked))
    return y


# --------------------------------------------------------------------------------------------
# Differences from vllm-ascend 0.23's calls of the same kernels
# --------------------------------------------------------------------------------------------
# tests/test_npu_calls_vs_vllm_ascend.py reads the vllm-ascend 0.23.0 wheel and compares, for
# every torch_npu kernel called above: the argument names (positional ones named by the kernel's
# schema), the literal values where both sides pass literals, where vllm-ascend calls the kernel
# (a kernel it reaches only through its own torch.ops._C_ascend ops counts as not called), and a
# few dtype / layout facts (int32 slots, block tables and expert ids, int64 group list, which
# weights go to FRACTAL_NZ, fp32 unpermute inputs, the K/V of a prefill without cache). Each
# difference it finds is listed here with why ours is right, or why it is an accepted risk and
# what would settle it on an Atlas A2 (the npu-marked tests: `pytest -m npu
# tests/test_ops_npu_emulated.py`); an entry that no longer matches a difference fails the test.
# vllm_ascend/... paths are inside the wheel; torch_npu-<name>.md pages are op-plugin's
# docs/zh/custom_APIs/torch_npu/; schema defaults are from op-plugin's
# op_plugin/config/op_plugin_functions.yaml.

NPU_CALL_DIFFERENCES: dict[str, str] = {
    "npu_add_rms_norm.a2_custom_op": (
        "On A2 vllm-ascend's AscendRMSNorm.forward_oot (vllm_ascend/ops/layernorm.py) calls its own "
        "torch.ops._C_ascend.npu_add_rms_norm_bias whenever its custom ops are loaded (the default) "
        "and torch_npu.npu_add_rms_norm(x, residual, weight, eps), our call argument for argument, "
        "only as the fallback. Ours is right for Qwen3: the custom op adds an optional norm bias, "
        "which vllm-ascend creates only for quantized checkpoints whose description lists "
        "norm.bias (msModelSlim's m4 anti-outlier method, same file) and Qwen3's RMSNorm does not "
        "have, and npu_add_rms_norm is the documented public kernel (torch_npu-npu_add_rms_norm.md) "
        "that vllm-ascend also runs on 310P (vllm_ascend/_310p/ops/layernorm.py)."),
    "npu_apply_rotary_pos_emb.layout": (
        "Ours passes layout=\"TND\" (q/k [T, N, D], cos/sin [T, 1, D]); vllm-ascend's only calls "
        "(310P, vllm_ascend/_310p/ops/rotary_embedding.py) use the default BSND on [1, T, N, D] "
        "views, the same computation with a dummy batch axis. torch_npu-apply_rotary_pos_emb.md "
        "lists 3-D TND tensors as supported on A2; accepted risk until the npu-marked rotary tests "
        "run on an A2, since no vllm-ascend path exercises TND."),
    "npu_apply_rotary_pos_emb.not_called_on_A2": (
        "vllm-ascend calls npu_apply_rotary_pos_emb only on 310P "
        "(vllm_ascend/_310p/ops/rotary_embedding.py); its A2 RoPE (vllm_ascend/ops/rotary_embedding.py "
        "rope_forward_oot) is a Triton kernel, or torch_npu._npu_rotary_embedding, an ATB binding "
        "with no torch_npu doc page. Accepted risk: ours uses the kernel whose A2 contract is "
        "documented (torch_npu-apply_rotary_pos_emb.md: half mode, D 64 or 128) with fp32 inputs so "
        "it computes like ops.cpu, but vllm-ascend never runs it on A2; the npu-marked rotary tests "
        "on an A2 settle correctness, and a timing against _npu_rotary_embedding its cost."),
    "npu_format_cast.half_weights_to_nz": (
        "prepare_weight sends every non-fp32 weight to FRACTAL_NZ (29), bf16/fp16 included, while "
        "vllm-ascend (vllm_ascend/utils.py _should_trans_nz) converts bf16/fp16 weights only with "
        "weight_nz_mode 2 (VLLM_ASCEND_ENABLE_NZ, default 1 = quantized weights only, "
        "vllm_ascend/envs.py); fp32 stays ND on both sides. In this project only int8 weights reach "
        "prepare_weight (ascend_qwen3/quant/layers.py), which is vllm-ascend's default; the bf16 "
        "case is its opt-in mode 2 (torch_npu-npu_grouped_matmul.md takes bf16 weights in ND or NZ), "
        "an accepted risk for direct callers until timed on an A2."),
    "npu_fused_infer_attention_score.prefill_no_cache_kv": (
        "For a prefill with nothing cached vllm-ascend passes the fresh K/V with block_table=None "
        "and cumulative KV lengths (vllm_ascend/attention/attention_v1.py _get_fia_params, "
        "PrefillNoCache); ours is always called after write_kv_cache has put the step's K/V in "
        "the cache (ascend_qwen3/vllm_plugin/attention.py, ascend_qwen3/model/attention.py) and "
        "reads them from the paged cache with the block table and per-request seq_lens. That is "
        "the call vllm-ascend makes in its ChunkedPrefill and PrefillCacheHit states (same file: "
        "key_cache.view(num_block, block_size, -1), block_tables, seq_lens_list, sparse_mode=3), "
        "here with query length == KV length, so the result is the same; accepted cost: long first "
        "prefills read K/V through the block table, to be timed on an A2."),
    "_npu_fused_infer_attention_score_get_max_workspace.sparse_mode": (
        "The only literal sparse_mode vllm-ascend passes to the workspace query is the ViT "
        "encoder's 0 (vllm_ascend/ops/mm_encoder_attention.py, non-causal); its decoder capture "
        "(vllm_ascend/attention/attention_v1.py full_graph_fia) passes a variable that is 3 for "
        "causal attention (same file: 'sparse_mode = 4 if self.sliding_window else 3 if "
        "attn_metadata.causal else 0'), what ours passes for Qwen3's causal layers. The same call."),
    "npu_fused_infer_attention_score.out.sparse_mode": (
        "As for the workspace query: vllm-ascend's literal 0 is the ViT encoder's "
        "(vllm_ascend/ops/mm_encoder_attention.py, vllm_ascend/worker/encoder_acl_graph.py); its "
        "decoder capture and replay update (vllm_ascend/attention/attention_v1.py full_graph_fia, "
        "update_graph_params) pass the variable that is 3 for causal layers, as ours does. The "
        "same call."),
    "npu_moe_gating_top_k_softmax.finished": (
        "Ours passes finished=None, the schema default (op_plugin_functions.yaml: Tensor? "
        "finished=None); vllm-ascend's calls (vllm_ascend/_310p/fused_moe/experts_selector.py) "
        "leave it out. The same call."),
    "npu_moe_gating_top_k_softmax.not_called_on_A2": (
        "vllm-ascend calls npu_moe_gating_top_k_softmax only on 310P "
        "(vllm_ascend/_310p/fused_moe/experts_selector.py, renormalising afterwards as ours does); on "
        "A2 its select_experts uses its own torch.ops._C_ascend.moe_gating_top_k "
        "(vllm_ascend/device/device_op.py BaseDeviceAdaptor.moe_gating_top_k) or torch softmax + "
        "topk. Accepted risk: the kernel is documented for A2 "
        "(torch_npu-npu_moe_gating_top_k_softmax.md) and ours feeds it fp32 logits so the softmax "
        "is fp32 like ops.cpu, but vllm-ascend does not run it on A2. Its 310P path splits the "
        "logits into chunks of 1024 tokens (\"returns invalid routing results\" above that on 310P); "
        "the A2 page states no such limit, so the npu-marked moe_gating_topk tests on an A2 must "
        "include more than 1024 tokens (its tie order is undocumented too)."),
    "npu_moe_init_routing_v2.a2_custom_op": (
        "vllm-ascend's A2 all-gather MoE dispatch (vllm_ascend/ops/fused_moe/token_dispatcher.py "
        "TokenDispatcherWithAllGather.token_dispatch -> vllm_ascend/device/device_op.py "
        "BaseDeviceAdaptor.npu_moe_init_routing) calls its own "
        "torch.ops._C_ascend.npu_moe_init_routing_custom with the keywords ours passes (bar "
        "row_idx_type); "
        "torch_npu.npu_moe_init_routing_v2 runs on A2 only in its all-to-all dispatcher (same file, "
        "_dispatch_postprocess) and on 310P/A5. Ours is the public kernel documented for A2 "
        "(torch_npu-npu_moe_init_routing_v2.md), with row_idx_type=0 as "
        "vllm_ascend/_310p/fused_moe/token_dispatcher.py passes it; accepted risk for quant_mode=1, "
        "which vllm-ascend never sends to this kernel on A2, until the npu-marked moe_route_quant "
        "tests run on an A2."),
    "npu_quant_matmul.bias": (
        "int8_matmul leaves out bias (schema default None), which every vllm-ascend call passes "
        "explicitly; its own int32-output call, the same use as ours, passes bias=None "
        "(vllm_ascend/ops/fused_moe/fused_moe.py AscendMoERunner._forward_shared_experts). The same "
        "call."),
    "npu_quant_matmul.offset": (
        "quant_matmul passes offset=None, the schema default (torch_npu-npu_quant_matmul.md: an "
        "optional offset added after the scale), which no vllm-ascend call passes (e.g. "
        "vllm_ascend/quantization/methods/w8a8_dynamic.py). The same call."),
    "npu_quantize.div_mode": (
        "Ours passes div_mode=True (fp32 x / scale + int8 offset); vllm-ascend "
        "(vllm_ascend/ops/register_custom_ops.py _quantize_impl) passes div_mode=False with "
        "1/input_scale computed in input_scale's dtype (the params dtype) and the offset cast to "
        "it "
        "(vllm_ascend/quantization/methods/w8a8_static.py process_weights_after_loading). Both modes "
        "are documented on A2 (torch_npu-npu_quantize.md); ours divides in fp32 as ops.cpu does, "
        "where a rounded reciprocal can land one step off at rounding boundaries. Accepted risk: "
        "the page does not state div_mode=True's rounding mode; the npu-marked static_quant test "
        "on an A2 settles it."),
    "npu_swiglu.dim": (
        "Ours passes dim=-1, the schema default (op_plugin_functions.yaml: npu_swiglu(Tensor self, "
        "int dim=-1)); vllm-ascend relies on the default (vllm_ascend/ops/activation.py "
        "AscendSiluAndMul.forward_oot). The same call."),
    "npu_trans_quant_param.not_called": (
        "Ours calls it only for fp16 output without a per-token scale, where the A2 table of "
        "torch_npu-npu_quant_matmul.md wants an int64 scale and its examples make it with "
        "npu_trans_quant_param (torch_npu-npu_trans_quant_param.md); vllm-ascend never calls it: for "
        "fp16 static W8A8 it passes the checkpoint's int64 deq_scale through "
        "(vllm_ascend/quantization/methods/w8a8_static.py get_perchannel_param). Accepted risk: "
        "ours repacks an fp32 scale, not known to equal msModelSlim's int64 bit for bit; comparing "
        "both scales, or both outputs on an A2, settles it."),
    'npu_moe_distribute_dispatch_v2.group_tp': (
        "Only on A3 / A5: vllm-ascend's TokenDispatcherWithMC2 adds group_tp, tp_world_size and "
        'tp_rank_id (and tp_send_counts to the combine) when need_extra_args, i.e. the device is '
        'A3 or A5 (vllm_ascend/ops/fused_moe/token_dispatcher.py, __init__ and '
        'get_dispatch_mc2_kwargs / get_combine_mc_kwargs). On Atlas A2 it passes none of them, as '
        'ours: A2 has no TP domain in MC2 (torch_npu-npu_moe_distribute_dispatch_v2.md: '
        'tp_world_size 0 or 1, default 0).'),
    'npu_moe_distribute_dispatch_v2.tp_world_size': (
        'A TP-domain argument, like group_tp (the entry above): vllm-ascend passes it only on A3 '
        '/ A5 (vllm_ascend/ops/fused_moe/token_dispatcher.py, need_extra_args); on A2 neither it '
        'nor ours does.'),
    'npu_moe_distribute_dispatch_v2.tp_rank_id': (
        "The TP rank in MC2's TP domain: vllm-ascend passes 0 only on A3 / A5 "
        "(vllm_ascend/ops/fused_moe/token_dispatcher.py, need_extra_args); A2's MC2 has no TP "
        'domain, so neither passes it there.'),
    'npu_moe_distribute_combine_v2.group_tp': (
        "The combine's TP domain, set with the dispatch's "
        '(npu_moe_distribute_dispatch_v2.group_tp): vllm-ascend passes it on A3 / A5 only '
        '(vllm_ascend/ops/fused_moe/token_dispatcher.py get_combine_mc_kwargs).'),
    'npu_moe_distribute_combine_v2.tp_world_size': (
        'Left at its default 0 on A2 by vllm-ascend too: it sets it only when need_extra_args (A3 '
        '/ A5; vllm_ascend/ops/fused_moe/token_dispatcher.py get_combine_mc_kwargs).'),
    'npu_moe_distribute_combine_v2.tp_rank_id': (
        'Passed by vllm-ascend on A3 / A5 alone (vllm_ascend/ops/fused_moe/token_dispatcher.py '
        'get_combine_mc_kwargs, need_extra_args); A2 runs the combine without a TP domain, as '
        'ours calls it.'),
    'npu_moe_distribute_combine_v2.tp_send_counts': (
        "The dispatch's tp_recv_counts, which vllm-ascend hands back only on A3 / A5 "
        '(vllm_ascend/ops/fused_moe/token_dispatcher.py get_combine_mc_kwargs); on A2 the '
        'dispatch returns it empty and neither passes it.'),
    'npu_moe_distribute_dispatch_v2.comm_alg': (
        'Only with hierarchical communication: vllm-ascend passes comm_alg="hierarchy" when '
        'ascend_config.enable_mc2_hierarchy_comm is set (vllm_ascend/ops/fused_moe/token_dispatcher.py, need_comm_alg); off '
        'by default, and ours runs the default full-mesh algorithm, as vllm-ascend does without '
        'it (comm_alg "").'),
    'npu_moe_distribute_combine_v2.comm_alg': (
        'As for the dispatch (npu_moe_distribute_dispatch_v2.comm_alg): the hierarchical '
        'algorithm only with enable_mc2_hierarchy_comm '
        '(vllm_ascend/ops/fused_moe/token_dispatcher.py get_combine_mc_kwargs); ours and '
        "vllm-ascend's default run full mesh."),
    'npu_moe_distribute_dispatch_v2.expert_scales': (
        'vllm-ascend passes the router weights to the dispatch only with hierarchical '
        'communication or on A5 (vllm_ascend/ops/fused_moe/token_dispatcher.py, need_expert_scale / a5_need_extra_args); '
        'the full-mesh A2 dispatch does not read them (the weights go to the combine, as ours).'),
    'npu_moe_distribute_dispatch_v2.y_dtype': (
        'Only on A5 with MXFP / FP8 dispatch quantisation (vllm_ascend/ops/fused_moe/token_dispatcher.py, '
        "a5_need_extra_args); not on A2, not for Qwen3's bf16 or W8A8_DYNAMIC experts."),
    'npu_moe_distribute_dispatch_v2.scales': (
        'vllm-ascend passes scales=None explicitly (vllm_ascend/ops/fused_moe/token_dispatcher.py get_dispatch_mc2_kwargs, '
        'no smoothing scales); ours leaves the documented default None: the same call.'),
    'npu_moe_distribute_combine_v2.expand_idx': (
        'vllm-ascend passes expand_idx only to the v1 kernel, npu_moe_distribute_combine, when '
        'torch_npu lacks dispatch_v2 (vllm_ascend/ops/fused_moe/token_dispatcher.py get_combine_mc_kwargs: '
        'enable_dispatch_v2); the v2 kernel ours calls takes assist_info_for_combine instead, '
        'which ours passes, as vllm-ascend does with v2.'),
}
