"""vllm-ascend's own NPU kernels, emulated on CPU tensors: its AscendC kernels in
``torch.ops._C_ascend`` (``bgmv_shrink`` / ``bgmv_expand`` for LoRA, ``moe_gating_top_k`` and
``grouped_matmul_swiglu_quant_weight_nz`` for MoE) and its Triton kernel
``torch.ops.vllm.qkv_rmsnorm_rope`` (split of the fused QKV, QK-norm and RoPE in one).

These are not torch_npu kernels: vllm-ascend builds the AscendC ones (``csrc/``) and binds them
into the ``_C_ascend`` library (``csrc/torch_binding.cpp``), and registers the Triton one as a
vLLM custom op (``vllm_ascend/ops/triton/linearnorm/split_qkv_rmsnorm_rope.py``). Everything
below cites those files at tag v0.23.0 (https://github.com/vllm-project/vllm-ascend; Python
files by their lines in the v0.23.0 wheel); the schemas are the bindings', verbatim (the Triton
op's is what vLLM's ``direct_register_custom_op`` infers from its Python signature).

LoRA: the bgmv pair only. They take one LoRA slot per token (``indices`` [T]), so
they serve decode and prefill alike, which is what ``ops.lora_shrink`` / ``ops.lora_expand``
pass. The sgmv pair (``sgmv_shrink`` / ``sgmv_expand``) takes one slot per request plus the
requests' lengths, a form the ops' interface does not carry; vllm-ascend uses it for prefill
only to pass less index data (``vllm_ascend/lora/punica_npu.py`` ``_shrink_prefill``).

What is checked, and how it fails:

- the bindings' ``TORCH_CHECK``s (torch_binding.cpp:426-434 for bgmv_shrink, 466-476 for
  bgmv_expand; the adapters' and tiling checks of the MoE kernels) raise ``NpuEmulatorError`` (a RuntimeError, as TORCH_CHECK raises) with the
  binding's own message;
- what the binding does not check but the kernel relies on (the dtype of each pointer, the
  index dtype, the weight's shape the kernel computes its offsets from, the ranks bgmv_expand
  has code for, the 32-byte lengths of its plain ``DataCopy`` moves, each index below the slot
  count, contiguous rows) is refused too, with "not checked by the kernel" in the message: on
  the device such a call reads or writes the wrong memory and returns garbage silently.

Maths, following the kernels (each function's docstring for the MoE and Triton ones): LoRA:
inputs cast to float32, products summed in float32; bgmv_shrink multiplies by ``scale`` and writes float32 (``Y_T = float``); bgmv_expand adds the
16-bit ``y`` (cast to float32) and rounds to y's dtype (``CAST_RINT``: to nearest, ties to even).
Rows whose index is negative are skipped by both (left as they were: not zeroed).

``installed(calls)`` registers the ops (CPU implementations) for the duration of a block and
removes them after; each accepted call is counted in ``calls`` (the torch_npu emulator's
``CallLog``) as ``<namespace>.<name>``, each rejected one in ``calls.rejected``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ._base import CallLog, NpuEmulatorError, dt
from .formats import FRACTAL_NZ, format_of

NAMESPACE = "_C_ascend"
TRITON_NAMESPACE = "vllm"      # vllm-ascend's Triton kernels are vLLM custom ops

# csrc/torch_binding.cpp:2294, 2297-2299, 2356-2361, 2465-2480 (v0.23.0)
SCHEMAS = {
    "bgmv_shrink": "bgmv_shrink(Tensor! x, Tensor! weight, Tensor! indices, Tensor! y, float scale) -> ()",
    "bgmv_expand": ("bgmv_expand(Tensor! x, Tensor! weight, Tensor! indices, Tensor! y,"
                    "            int slice_offset, int slice_size) -> Tensor"),
    "moe_gating_top_k": ("moe_gating_top_k(Tensor x, int k, int k_group, int group_count, "
                         "int group_select_mode, int renorm, int norm_type, bool out_flag, "
                         "float routed_scaling_factor, float eps, Tensor? bias_opt=None) "
                         "-> (Tensor y, Tensor expert_idx, Tensor out)"),
    "grouped_matmul_swiglu_quant_weight_nz": (
        "grouped_matmul_swiglu_quant_weight_nz(Tensor x, Tensor weight, Tensor weight_scale, "
        "Tensor x_scale, Tensor group_list, *, Tensor? bias=None, Tensor? offset=None, "
        "float swiglu_limit=0.0) -> (Tensor output, Tensor output_scale, Tensor output_offset)"),
}
# vllm_ascend/ops/triton/linearnorm/split_qkv_rmsnorm_rope.py:264-276 (the Python signature) and
# 384-390 (direct_register_custom_op, mutates_args=[]): the schema vLLM infers from it
TRITON_SCHEMAS = {
    "qkv_rmsnorm_rope": (
        "qkv_rmsnorm_rope(Tensor input, Tensor cos_sin_cache, Tensor positions, Tensor q_weight, "
        "Tensor k_weight, SymInt q_hidden_size, SymInt kv_hidden_size, SymInt head_dim, float eps, "
        "Tensor? q_bias=None, Tensor? k_bias=None) -> (Tensor, Tensor, Tensor)"),
}

KERNEL_DTYPES = (torch.float16, torch.bfloat16)     # "only support half and bf16"
EXPAND_RANKS = (8, 16, 32, 64)                      # bgmv_expand.cpp:27-31, 252-280
DATACOPY_BYTES = 32   # a plain AscendC DataCopy moves whole 32-byte blocks (DataCopyPad otherwise)


def _fail(op: str, what: str) -> None:
    raise NpuEmulatorError(f"torch.ops._C_ascend.{op} (emulated): {what}")


def _check(ok: bool, op: str, message: str) -> None:
    """A TORCH_CHECK of the binding: its own message."""
    if not ok:
        _fail(op, message)


def _unchecked(ok: bool, op: str, what: str, where: str) -> None:
    """A contract the kernel relies on without checking it."""
    if not ok:
        _fail(op, f"{what} (not checked by the kernel: on the device the call computes garbage "
                  f"or touches memory out of bounds; {where})")


def _aligned(op: str, name: str, count: int, dtype: torch.dtype, where: str) -> None:
    size = torch.empty((), dtype=dtype).element_size()
    _unchecked(count * size % DATACOPY_BYTES == 0, op,
               f"{name} = {count} {dt(torch.empty((), dtype=dtype))} elements is not a whole number "
               f"of {DATACOPY_BYTES}-byte blocks, which its DataCopy moves", where)


def _binding(op: str, x, weight, indices, y) -> None:
    """The TORCH_CHECKs both bindings make (torch_binding.cpp:428-433 / 468-473)."""
    _check(x.dim() == 2, op, "x should be [batch_size, hidden_in]")
    _check(weight.dim() in (3, 4), op, "weight should be [num_loras, hidden_out, hidden_in] or "
                                       "[num_loras, 1, hidden_out, hidden_in]")
    _check(y.dim() == 2, op, "y should be [batch_size, hidden_out]")
    _check(indices.dim() == 1, op, "indices should be [batch_size]")
    _check(x.size(0) == y.size(0) and x.size(0) == indices.size(0), op,
           "the first dimension of x, y, indices should be same")


def _kernel(op: str, x, weight, indices, y) -> torch.Tensor:
    """What both kernels rely on unchecked: int64 indices, contiguous rows, indices below the
    slot count; returns the weight as [S, rows, cols]."""
    # GlobalTensor<int64_t> indicesGm_ (bgmv_shrink.cpp:47, bgmv_expand.cpp:73)
    _unchecked(indices.dtype == torch.int64, op, f"indices must be int64, got {dt(indices)}",
               "the kernel reads them as int64_t")
    if weight.dim() == 4:
        _unchecked(weight.size(1) == 1, op, f"a 4-d weight must be [num_loras, 1, ., .], got "
                   f"{list(weight.shape)}", "the kernel skips no second dimension")
        weight = weight[:, 0]
    for name, t in (("x", x), ("weight", weight), ("indices", indices), ("y", y)):
        _unchecked(t.is_contiguous(), op, f"{name} must be contiguous",
                   "the kernel addresses rows by pointer arithmetic")
    bad = indices >= weight.size(0)     # the emulator may look: a real kernel reads blindly
    _unchecked(not bool(bad.any()), op, f"indices {sorted(set(indices[bad].tolist()))} are not "
               f"below num_loras = {weight.size(0)}", "the weight offset is index * one slot")
    return weight


def bgmv_shrink(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, y: torch.Tensor,
                scale: float) -> None:
    """y[t] = scale * weight[indices[t]] @ x[t] (float32), for indices[t] >= 0; other rows of y
    untouched. x [T, K] fp16/bf16; weight [S, R, K] (or [S, 1, R, K]) in x's dtype; indices [T]
    int64; y [T, R] float32 with R < K (bgmv_shrink.cpp; torch_binding.cpp:424-462)."""
    op = "bgmv_shrink"
    _check(x.dtype in KERNEL_DTYPES, op, "only support half and bf16")
    _binding(op, x, weight, indices, y)
    _check(x.size(1) > y.size(1), op, "hidden in should be greater than hidden out")
    w = _kernel(op, x, weight, indices, y)
    K, R = x.size(1), y.size(1)
    # X_T = W_T = scalar_t, Y_T = float (bgmv_shrink.cpp:23-25)
    _unchecked(weight.dtype == x.dtype, op, f"weight must be {dt(x)} like x, got {dt(weight)}",
               "bgmv_shrink.cpp:24 reads it as x's type")
    _unchecked(y.dtype == torch.float32, op, f"y must be float32, got {dt(y)}",
               "bgmv_shrink.cpp:25 writes float")
    # one slot is inputHiddenDim * maxLoRARank elements, maxLoRARank = y.size(1) (:41, :72, :129)
    _unchecked(tuple(w.shape[1:]) == (R, K), op, f"weight must be [num_loras, {R}, {K}] for x "
               f"[T, {K}] and y [T, {R}], got {list(weight.shape)}",
               "bgmv_shrink.cpp:41 computes the slot offset from y's and x's widths")
    _aligned(op, "hidden_in", K, x.dtype, "bgmv_shrink.cpp:122, 129 (x and weight rows)")
    _aligned(op, "the rank (y's width)", R, torch.float32, "bgmv_shrink.cpp:191 (y rows)")
    live = indices >= 0                 # rows with a negative index: skipped (:69-71)
    if bool(live.any()):
        idx = indices[live]
        acc = torch.einsum("tk,trk->tr", x[live].float(), w[idx].float())   # Cast + Mul + ReduceSum
        y[live] = acc * float(scale)                                       # Muls (:182)


def bgmv_expand(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, y: torch.Tensor,
                slice_offset: int, slice_size: int) -> torch.Tensor:
    """y[t, off:off+n] = rint(y[t, off:off+n] + weight[indices[t]] @ x[t]) in float32, for
    indices[t] >= 0; returns y itself (``y_out = y``). x [T, R] float32, R in {8, 16, 32, 64};
    weight [S, n, R] (or [S, 1, n, R]) in y's dtype; indices [T] int64; y [T, N] fp16/bf16
    (bgmv_expand.cpp; torch_binding.cpp:464-508)."""
    op = "bgmv_expand"
    _check(y.dtype in KERNEL_DTYPES, op, "only support half and bf16")
    _binding(op, x, weight, indices, y)
    _check(x.size(1) <= slice_size, op, "hidden in should be smaller than hidden out")
    _check(slice_offset >= 0, op, "slice offset should be no smaller than 0")
    _check(slice_size + slice_offset <= y.size(1), op,
           "slice_size + slice_offset should be smaller than the second dimension of y")
    w = _kernel(op, x, weight, indices, y)
    R, n = x.size(1), slice_size
    # X_T = float, W_T = Y_T = scalar_t (bgmv_expand.cpp:23-25)
    _unchecked(x.dtype == torch.float32, op, f"x must be float32, got {dt(x)}",
               "bgmv_expand.cpp:23 reads float")
    _unchecked(weight.dtype == y.dtype, op, f"weight must be {dt(y)} like y, got {dt(weight)}",
               "bgmv_expand.cpp:24 reads it as y's type")
    _unchecked(R in EXPAND_RANKS, op, f"the rank (x's width) must be one of {list(EXPAND_RANKS)}, "
               f"got {R}", "bgmv_expand.cpp:252-280 compute nothing for other ranks")
    # one slot is maxLoRARank * outputHiddenDim elements, outputHiddenDim = slice_size (:67, :108)
    _unchecked(tuple(w.shape[1:]) == (n, R), op, f"weight must be [num_loras, {n}, {R}] for "
               f"slice_size {n} and x [T, {R}], got {list(weight.shape)}",
               "bgmv_expand.cpp:67 computes the slot offset from slice_size and x's width")
    _aligned(op, "slice_size", n, y.dtype, "bgmv_expand.cpp:205, 286 (y tiles)")
    live = indices >= 0                 # rows with a negative index: skipped (:105-107)
    if bool(live.any()):
        idx = indices[live]
        acc = torch.einsum("tr,tnr->tn", x[live], w[idx].float())          # Cast, Mul, reduce sums
        cols = y[:, slice_offset:slice_offset + n]
        cols[live] = (cols[live].float() + acc).to(y.dtype)               # Add, Cast CAST_RINT (:221-229)
    return y


# --- MoE ------------------------------------------------------------------------------------

MAX_GATING_EXPERTS = 2048        # moe_gating_top_k_tiling.cpp:50 (MAX_EXPERT_COUNT)


def moe_gating_top_k(x: torch.Tensor, k: int, k_group: int, group_count: int,
                     group_select_mode: int, renorm: int, norm_type: int, out_flag: bool,
                     routed_scaling_factor: float, eps: float, bias_opt=None):
    """Router scores, top-k and (optionally) renormalisation in one kernel
    (csrc/moe/moe_gating_top_k/: the adapter ``moe_gating_top_k_torch_adpt.h:19-71``, tiling
    checks ``op_host/moe_gating_top_k_tiling.cpp:182-249``, the ungrouped kernel
    ``op_kernel/moe_gating_top_k_without_group.h``, the one Qwen3 takes: group_count 1).

    In float32 per row: softmax as exp(x - max) * (1 / sum) (norm_type 0) or sigmoid (1);
    experts chosen on p + bias by a full descending sort (ties: the lower id first, as the
    upstream golden's stable sort), ids int32 in descending order; y = p at those ids; divided
    by (sum + eps) when norm_type is 1 or renorm is 1 (``:232-248``); times
    routed_scaling_factor; cast to x's dtype rounding to nearest even (``:251-256``). ``out``
    [T, E] float32 holds p only with out_flag (otherwise uninitialised memory: NaN here).
    Grouped selection (group_count > 1 with k_group < group_count) is not emulated."""
    op = "moe_gating_top_k"
    _check(x.dim() == 2, op, "x must be 2-D [tokens, experts]")
    _check(x.dtype in (torch.float16, torch.float32, torch.bfloat16), op,
           "x dtype must be float16, float32 or bfloat16")
    T, E = x.shape
    if bias_opt is not None:
        _check(bias_opt.dim() == 1 and bias_opt.numel() == E and bias_opt.dtype == x.dtype, op,
               "bias must be 1-D of the expert count, in x's dtype")
    _check(E <= MAX_GATING_EXPERTS, op, f"expert count {E} exceeds {MAX_GATING_EXPERTS}")
    _check(0 < k <= E, op, f"k must lie in (0, {E}], got {k}")
    _check(0 < group_count and E % group_count == 0, op, "expert count must divide into groups")
    _check(0 < k_group <= group_count, op, "k_group must lie in (0, group_count]")
    _check(k <= k_group * (E // group_count), op, "k exceeds the experts of the selected groups")
    _check(norm_type in (0, 1) and group_select_mode in (0, 1) and renorm in (0, 1), op,
           "norm_type, group_select_mode and renorm must be 0 or 1")
    if group_count not in (1, E) and k_group != group_count:
        _fail(op, "grouped expert selection is not emulated (Qwen3 routes without groups)")
    xf = x.float()
    if norm_type == 0:
        e = torch.exp(xf - xf.amax(dim=-1, keepdim=True))
        p = e * (1.0 / e.sum(dim=-1, keepdim=True))
    else:
        p = torch.sigmoid(xf)
    score = p if bias_opt is None else p + bias_opt.float()
    ids = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
    y = p.gather(-1, ids)
    if norm_type == 1 or renorm == 1:
        y = y / (y.sum(dim=-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    out = p.clone() if out_flag else torch.full((T, E), float("nan"))
    return y.to(x.dtype), ids.to(torch.int32), out


GMM_SWIGLU_MAX_N = 10240         # aclnn_grouped_matmul_swiglu_quant.cpp:149-212 (N <= 10240, K < 65536)


def grouped_matmul_swiglu_quant_weight_nz(x: torch.Tensor, weight: torch.Tensor,
                                          weight_scale: torch.Tensor, x_scale: torch.Tensor,
                                          group_list: torch.Tensor, *, bias=None, offset=None,
                                          swiglu_limit: float = 0.0):
    """W8A8 grouped gate/up GEMM, dequantisation, SwiGLU and per-token int8 quantisation in one
    kernel (csrc/gmm/grouped_matmul_swiglu_quant/: op definition ``op_host/
    grouped_matmul_swiglu_quant_def.cpp:22-68``, aclnn checks ``op_host/op_api/
    aclnn_grouped_matmul_swiglu_quant.cpp:149-212, 328-335, 485-511``, the vector stage
    ``op_kernel/grouped_matmul_swiglu_quant.h:383-525`` and its casts
    ``op_kernel/grouped_matmul_swiglu_quant_utils.h:308-325``; README.md:40-86).

    x int8 [M, K]; weight int8 [E, K, N] in FRACTAL_NZ (the only A8W8 weight format);
    weight_scale [E, N] fp32 / bf16 / fp16; x_scale fp32 [M]; group_list int64 [<= E], the
    CUMULATIVE row ends of the groups. Per row of group e, in float32: c = float(int32 acc)
    * x_scale[m] * weight_scale[e, n]; s = silu(c[:, :N/2]) * c[:, N/2:]; scale = max|s| / 127;
    q = s * (1 / scale) rounded to float16 then to int8 (both to nearest even). Returns (q int8
    [M, N/2], scale fp32 [M], offset fp32 []); rows at or past group_list[-1] are not written
    (here: loud garbage, as uninitialised memory would be)."""
    op = "grouped_matmul_swiglu_quant_weight_nz"
    _check(x.dim() == 2 and x.dtype == torch.int8, op, "x must be int8 [M, K]")
    _check(weight.dim() == 3 and weight.dtype == torch.int8, op, "weight must be int8 [E, K, N]")
    _check(format_of(weight) == FRACTAL_NZ, op, "weight must be in FRACTAL_NZ format "
           "(npu_format_cast(weight, 29)): the A8W8 kernel takes no ND weight")
    E, K, N = weight.shape
    M = x.shape[0]
    _check(x.shape[1] == K and K < 65536, op, f"x [M, {K}] must match weight [E, K, N], K < 65536")
    _check(N % 2 == 0 and N <= GMM_SWIGLU_MAX_N, op, f"N must be even and <= {GMM_SWIGLU_MAX_N}")
    _check(tuple(weight_scale.shape) == (E, N) and weight_scale.dtype in
           (torch.float32, torch.bfloat16, torch.float16), op, f"weight_scale must be [{E}, {N}] "
           f"fp32 / bf16 / fp16")
    _check(x_scale.dim() == 1 and x_scale.numel() == M and x_scale.dtype == torch.float32, op,
           f"x_scale must be fp32 [{M}]")
    _check(group_list.dim() == 1 and group_list.dtype == torch.int64 and group_list.numel() <= E,
           op, f"group_list must be int64 with at most {E} entries")
    _check(bias is None and offset is None, op, "bias and offset are not taken by the A8W8 path")
    for name, t in (("x", x), ("x_scale", x_scale), ("group_list", group_list)):
        _unchecked(t.is_contiguous(), op, f"{name} must be contiguous",
                   "the kernel addresses rows by pointer arithmetic")
    ends = group_list.tolist()            # the emulator may look: the kernel reads them on device
    _unchecked(all(a <= b for a, b in zip([0] + ends, ends)) and (not ends or ends[-1] <= M), op,
               f"group_list {ends} must be a non-decreasing cumulative sum <= M = {M}",
               "README.md:40-59: a prefix sum of the groups' rows")
    q = torch.randint(-128, 128, (M, N // 2), dtype=torch.int8)       # unwritten rows
    out_scale = torch.full((M,), float("nan"))
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            acc = x[start:end].double() @ weight[e].double()             # int32 accumulation, exact
            c = acc.float() * x_scale[start:end, None]                   # Muls: per-token first
            c = c * weight_scale[e].float()                              # Mul: per-channel
            gate, up = c[:, :N // 2], c[:, N // 2:]
            if swiglu_limit > 0:
                up = up.clamp(-swiglu_limit, swiglu_limit)
                gate = gate.clamp(max=swiglu_limit)
            act = gate / (1.0 + torch.exp(-gate)) * up                    # SwiGLU(src0=up, src1=gate)
            scale = act.abs().amax(dim=-1) / 127.0
            q[start:end] = (act * (1.0 / scale)[:, None]).half().round().to(torch.int8)
            out_scale[start:end] = scale
        start = max(start, end)
    return q, out_scale, torch.zeros(())


# --- the Triton prologue of the attention --------------------------------------------------------

def qkv_rmsnorm_rope(input: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
                     q_weight: torch.Tensor, k_weight: torch.Tensor, q_hidden_size: int,
                     kv_hidden_size: int, head_dim: int, eps: float, q_bias=None, k_bias=None):
    """Split of the fused QKV, QK-norm and neox RoPE in one Triton kernel
    (vllm_ascend/ops/triton/linearnorm/split_qkv_rmsnorm_rope.py, wheel lines: the kernel
    25-261, the wrapper 264-344). The wrapper checks nothing; the kernel reads every tensor by
    raw offsets (all must be contiguous), bf16 buffers hold the norm's output and the rotation.

    Per token row and head, D = head_dim, R = cos_sin_cache.shape[-1] (rope dim), in order:
    the mean of x^2 over D in float32, rstd = 1 / sqrt(mean + eps) (:115-118); x * rstd * w
    (+ b) in float32, rounded once to bf16 (:119-131, 191-194); cos = cache[pos, :R/2], sin =
    cache[pos, R/2:] (bf16, :91-113); out[:R/2] = x1 * cos - x2 * sin, out[R/2:R] = x2 * cos +
    x1 * sin, every product and sum rounded to bf16 (bf16 operands, :133-160); dims past R
    unrotated. v is copied as it is (:247-261). Returns new contiguous (q [T, q_hidden],
    k [T, kv_hidden], v [T, kv_hidden]) in input's dtype; nothing is written in place."""
    op = "qkv_rmsnorm_rope"
    where = "split_qkv_rmsnorm_rope.py:264-344 checks nothing"
    D, Q, KV = head_dim, q_hidden_size, kv_hidden_size
    _unchecked(input.dim() == 2 and input.shape[1] == Q + 2 * KV, op,
               f"input must be [T, {Q} + 2 x {KV}], got {list(input.shape)}", where)
    _unchecked(Q % D == 0 and KV % D == 0, op, "q/kv hidden sizes must be multiples of head_dim",
               where)
    for name, t in (("input", input), ("cos_sin_cache", cos_sin_cache), ("positions", positions),
                    ("q_weight", q_weight), ("k_weight", k_weight)):
        _unchecked(t.is_contiguous(), op, f"{name} must be contiguous",
                   "the kernel reads by raw offsets without strides")
    _unchecked(input.dtype == torch.bfloat16 and cos_sin_cache.dtype == torch.bfloat16, op,
               f"input and cos_sin_cache must be bf16, got {dt(input)} / {dt(cos_sin_cache)}",
               "its norm and rotation buffers are tl.bfloat16 (:91, 129-131)")
    R = cos_sin_cache.shape[-1]
    _unchecked(cos_sin_cache.dim() == 2 and R % 2 == 0 and R <= D, op,
               f"cos_sin_cache must be [positions, rope_dim] with an even rope_dim <= {D}", where)
    _unchecked(q_weight.shape == (D,) and k_weight.shape == (D,), op,
               f"q_weight and k_weight must be [{D}]", "read with tl.arange(0, HEAD_DIM) (:57-58)")
    T = input.shape[0]
    _unchecked(positions.dim() == 1 and positions.numel() >= T and not positions.is_floating_point(),
               op, f"positions must be 1-D integers with >= {T} entries", where)
    pos = positions[:T].long()
    _unchecked(T == 0 or int(pos.max()) < cos_sin_cache.shape[0], op,
               "positions must lie below the cache's rows", "cos/sin are loaded unmasked (:96)")
    cs = cos_sin_cache[pos]                                   # [T, R] bf16
    cos, sin = cs[:, None, :R // 2], cs[:, None, R // 2:]

    def norm_rope(x, w, b, heads):
        x = x.reshape(T, heads, D)
        xf = x.float()
        rstd = 1.0 / torch.sqrt((xf * xf).sum(dim=-1, keepdim=True) / D + eps)
        y = xf * rstd * w.float()
        if b is not None:
            y = y + b.float()
        y = y.to(torch.bfloat16)
        x1, x2 = y[..., :R // 2], y[..., R // 2:R]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, y[..., R:]), dim=-1)
        return out.reshape(T, heads * D).to(input.dtype).contiguous()

    q = norm_rope(input[:, :Q], q_weight, q_bias, Q // D)
    k = norm_rope(input[:, Q:Q + KV], k_weight, k_bias if q_bias is not None else None, KV // D)
    v = input[:, Q + KV:].clone()
    return q, k, v


IMPLS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand,
         "moe_gating_top_k": moe_gating_top_k,
         "grouped_matmul_swiglu_quant_weight_nz": grouped_matmul_swiglu_quant_weight_nz}
TRITON_IMPLS = {"qkv_rmsnorm_rope": qkv_rmsnorm_rope}


def _counted(qualified: str, fn, calls: CallLog | None):
    def call(*args, **kwargs):
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            if calls is not None:
                calls.rejected.append((qualified, f"{type(exc).__name__}: {exc}"))
            raise
        if calls is not None:
            calls.counts[qualified] += 1
            calls.calls.append(qualified)
        return out
    call.__name__ = qualified.rsplit(".", 1)[1]
    return call


def _exists(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def present() -> bool:
    """Does ``torch.ops`` already hold one of these kernels (the real vllm-ascend's, or an
    emulation left installed)?"""
    return (any(_exists(NAMESPACE, n) for n in SCHEMAS)
            or any(_exists(TRITON_NAMESPACE, n) for n in TRITON_SCHEMAS))


@contextlib.contextmanager
def installed(calls: CallLog | None = None) -> Iterator[None]:
    """``torch.ops._C_ascend.<kernel>`` and ``torch.ops.vllm.qkv_rmsnorm_rope`` (this module's
    implementations, for CPU tensors) while the block runs; removed after. Refuses to shadow a
    real vllm-ascend."""
    if present():
        raise RuntimeError("vllm-ascend's kernels exist already in torch.ops (vllm-ascend is "
                           "installed, or an emulation is still installed): the emulation would "
                           "shadow them")
    libs = [torch.library.Library(NAMESPACE, "FRAGMENT"),
            torch.library.Library(TRITON_NAMESPACE, "FRAGMENT")]
    try:
        for lib, namespace, schemas, impls in ((libs[0], NAMESPACE, SCHEMAS, IMPLS),
                                               (libs[1], TRITON_NAMESPACE, TRITON_SCHEMAS,
                                                TRITON_IMPLS)):
            for name, schema in schemas.items():
                lib.define(schema)
                lib.impl(name, _counted(f"{namespace}.{name}", impls[name], calls), "CPU")
        yield
    finally:
        for lib in libs:
            lib._destroy()
