"""CPU backend: pure-PyTorch reference implementations of every operator.

This module is the specification of the operator interface. Each function documents its shapes and
dtypes; the NPU backend (``ops.npu``) implements the same signature with torch_npu kernels and must
return the same numbers within the tolerance stated in its docstring.

Notation: T tokens (all requests packed, "TND"), R requests, H heads, D head_dim, E experts,
k experts per token, NB cache blocks, BS block size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch


NAME = "cpu"


# --------------------------------------------------------------------------------------------
# Float linear
# --------------------------------------------------------------------------------------------

def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight^T. x: [M, K]; weight: [N, K] in x's dtype, as it is or as
    ``prepare_linear_weight`` made it. Each output accumulated in fp32 and rounded once to
    x.dtype. Returns [M, N]."""
    return torch.ops.ascend_qwen3_ops.linear(x, weight)


def prepare_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [N, K] linear weight in the form ``linear`` multiplies fastest, made once when the
    weights are finalised: here oneDNN's prepacked (blocked) layout for bf16 / fp32 weights
    (``torch.ops.mkldnn._reorder_linear_weight``, what PyTorch's own compiler uses for frozen
    CPU linears; several times faster than multiplying the plain [N, K] weight), the weight
    itself where oneDNN is not available. The same product either way."""
    weight = weight.contiguous()
    if weight.dtype in (torch.bfloat16, torch.float32) and _packing_works(weight.dtype):
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    return weight


_PACKING: dict[torch.dtype, bool] = {}


def _packing_works(dtype: torch.dtype) -> bool:
    """Can oneDNN prepack (and multiply) a ``dtype`` linear weight on this CPU? (probed once)
    Its bf16 path needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; it refuses on AVX2-only CPUs and
    under ONEDNN_MAX_CPU_ISA=AVX2, where the plain weight is used."""
    if dtype not in _PACKING:
        try:
            w, x = torch.ones(8, 16, dtype=dtype), torch.ones(2, 16, dtype=dtype)
            y = torch.ops.mkldnn._linear_pointwise(
                x, torch.ops.mkldnn._reorder_linear_weight(w, None), None, "none", [], "")
            _PACKING[dtype] = bool(torch.backends.mkldnn.is_available()) and \
                torch.equal(y, torch.nn.functional.linear(x, w))
        except (RuntimeError, AttributeError):
            _PACKING[dtype] = False
    return _PACKING[dtype]


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if w.is_mkldnn:                  # prepacked by prepare_linear_weight
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return torch.nn.functional.linear(x, w)


# The product as an op of its own (a schema, one implementation, a fake), so that a compiler
# (torch.compile, vLLM's support_torch_compile) calls it as it is: Inductor lowers oneDNN's
# prepacked linear only for weights it froze itself, and a traced graph cannot see whether a
# weight is prepacked.
_LIB = torch.library.Library("ascend_qwen3_ops", "DEF")
_LIB.define("linear(Tensor x, Tensor w) -> Tensor")
_LIB.impl("linear", _linear, "CompositeExplicitAutograd")
torch.library.register_fake("ascend_qwen3_ops::linear",
                            lambda x, w: x.new_empty(*x.shape[:-1], w.shape[0]), lib=_LIB)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``.

    x: [..., N] any float dtype; weight: [N]. Computed in fp32, the weight multiply included, and
    rounded once to ``promote_types(x.dtype, weight.dtype)`` (x.dtype for a model's weights), as
    torch_npu's ``npu_rms_norm`` and vLLM's RMSNorm kernels do. (Hugging Face's Qwen3RMSNorm
    rounds ``x * rstd`` to x.dtype before multiplying by the weight: at most one ulp apart, and in
    bf16 that second rounding is measurably less accurate.)
    """
    return _rms_norm_fp32(x, weight, eps).to(torch.promote_types(x.dtype, weight.dtype))


def _rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * rstd * weight.float()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns ``(rms_norm(x + residual), x + residual)``.

    x, residual: [..., N] same dtype; weight: [N]. The sum is formed in x.dtype (as an unfused
    ``x + residual`` would be) and is the new residual stream.
    """
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       scale: torch.Tensor, offset: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, RMSNorm and static int8 quantisation in one: what a linear with a static
    W8A8 input receives from the norm in front of it.

    x, residual: [..., K], one dtype; weight: [K]; scale, offset: the quantiser's input_scale
    and input_offset as ``prepare_norm_quant`` made them (values of the checkpoint's
    input_scale / integral input_offset). s = x + residual in fp32 (exact); y = RMSNorm of s
    times weight, in fp32 and NOT rounded to x.dtype (the fused kernels' formula);
    xq = clamp(round(y / scale + offset), -128, 127) (half to even), int8; the new residual is s
    rounded once to x.dtype (the same values ``add_rms_norm`` returns).
    Returns (xq [..., K] int8, new_residual).
    """
    s = x.float() + residual.float()
    new_residual = s.to(x.dtype)
    y = _rms_norm_fp32(s, weight, eps)
    xq = torch.round(y / scale.float() + offset.float()).clamp(-128, 127).to(torch.int8)
    return xq, new_residual


def add_rms_norm_dynamic_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add, RMSNorm and per-token dynamic int8 quantisation in one: what a linear with
    a W8A8_DYNAMIC input receives from the norm in front of it.

    x, residual: [M, K], one dtype; weight: [K]. s = x + residual in fp32 (exact); y = RMSNorm
    of s times weight in fp32, not rounded; then ``dynamic_quant`` of y: scale[m] =
    max |y[m]| / 127, xq = round(y / scale) (half to even), a zero row gives scale 0; the new
    residual is s rounded once to x.dtype.
    Returns (xq [M, K] int8, scale [M] fp32, new_residual).
    """
    s = x.float() + residual.float()
    xq, scale = dynamic_quant(_rms_norm_fp32(s, weight, eps))
    return xq, scale, s.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Rotary embedding (neox / rotate-half style)
# --------------------------------------------------------------------------------------------

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply neox-style rotary embedding to q and k.

    q: [T, Hq, D], k: [T, Hk, D]; cos, sin: [T, 1, D], each token's row with both halves
    (``ops.rope_cos_sin``: gathered once per step from ``ops.rope_table``, in the model's
    dtype). For each token and head: ``out = x * cos + rotate_half(x) * sin``, computed in fp32
    from the given cos/sin and rounded once to the input dtype.
    Returns (q_out, k_out). A backend may write the results into q and k (the NPU kernel works
    in place): callers pass tensors they do not need afterwards.
    """
    c, s = cos.float(), sin.float()

    def apply(x):
        xf = x.float()
        return (xf * c + _rotate_half(xf) * s).to(x.dtype)

    return apply(q), apply(k)


def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                  rope: tuple, num_heads: int, num_kv_heads: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention's prologue: split the fused QKV projection, QK-norm q and k, rotate them.

    qkv: [T, (Hq + 2 Hkv) * D], the q | k | v columns of the fused projection; q_weight,
    k_weight: [D], the QK-norm weights (one per head dim, shared by the heads); rope: the step's
    rotation as ``ops.rope_step`` makes it, (cos [T, 1, D], sin [T, 1, D], cos_sin_cache [P, D],
    positions [T]): cos / sin are the cache's rows at the positions with each half repeated, so
    an implementation may read either form (this one reads cos / sin; a kernel that gathers
    its own rows reads the cache, vLLM's layout: cos half then sin half).
    Returns (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]): q = rotary_embedding(rms_norm(q's
    heads, q_weight)), k the same with k_weight, v the v columns (a view of qkv or a copy).
    """
    T, D = qkv.shape[0], q_weight.shape[0]
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    q = rms_norm(q.reshape(T, num_heads, D), q_weight, eps)
    k = rms_norm(k.reshape(T, num_kv_heads, D), k_weight, eps)
    q, k = rotary_embedding(q, k, rope[0], rope[1])
    return q, k, v.reshape(T, num_kv_heads, D)


# --------------------------------------------------------------------------------------------
# Activation
# --------------------------------------------------------------------------------------------

def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused gate/up tensor: x [..., 2I] -> silu(x[..., :I]) * x[..., I:] ([..., I]).

    Computed in fp32, returned in x.dtype.
    """
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Paged KV cache and attention
# --------------------------------------------------------------------------------------------

def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's keys/values into the paged cache, in place.

    key, value: [T, Hkv, D]; key_cache, value_cache: [NB, BS, Hkv, D] (any strides);
    slot_mapping: [T] int (int32 or int64). Token t goes to block ``slot // BS`` at offset
    ``slot % BS``; a slot of -1 means "do not write" (padding tokens).
    """
    nb, bs = key_cache.shape[0], key_cache.shape[1]
    if not slot_mapping.numel():
        return
    slots = slot_mapping.long()
    lowest, highest = (int(x) for x in torch.aminmax(slots))
    if highest >= nb * bs:
        raise ValueError(f"slot {highest} is outside the cache of {nb} blocks x {bs}")
    if lowest < 0:                                   # padding tokens: dropped
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    # (block, offset) indexing works on any strided view of a cache, e.g. a page layout that
    # stores K transposed (vLLM's own CPU kernels do)
    block, offset = slots // bs, slots % bs
    key_cache[block, offset] = key.to(key_cache.dtype)
    value_cache[block, offset] = value.to(value_cache.dtype)


def write_to(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """``result``, or ``out`` holding it (an op's optional ``out=``)."""
    if out is None:
        return result
    out.copy_(result)
    return out


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, *,
                    query_start_loc_host: list[int] | None = None,
                    seq_lens_host: list[int] | None = None, plan=None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed queries over a paged KV cache (prefill, chunked prefill, decode).

    query: [T, Hq, D], tokens of R requests packed in order; request r owns query rows
    ``query_start_loc[r]:query_start_loc[r+1]`` (query_start_loc: [R+1] int, starts at 0).
    key_cache, value_cache: [NB, BS, Hkv, D] (any strides), already holding every key of the
    requests, this step's included. block_tables: [R, max_blocks] int32, logical block i of
    request r lives in physical block ``block_tables[r, i]``; entries past a request's last
    block are not read; cache slots past a request's length are read but get zero weight, so
    they must hold finite values (stale keys or zeros, what a cache holds).
    seq_lens: [R] int, number of keys of request r (cached prefix + this step's tokens).
    Bottom-right causal: with Lq queries and Lk keys, query j sees keys 0 .. Lk - Lq + j.
    A query that sees no key (Lq > Lk: the first Lq - Lk queries; or Lk == 0) gets a zero row:
    engines pad batches with such requests (vllm-ascend's graph padding: decode dummies with no
    keys, one mixed-batch dummy with a query per padded token and one key).
    GQA: query head h reads kv head ``h // (Hq // Hkv)``.
    query_start_loc_host, seq_lens_host: the same values as Python lists, when the caller has
    them on the host (a backend whose kernel takes host lengths needs them, to avoid copying
    the tensors back in every layer; here they only spare a conversion).
    plan: what the engine's metadata builder made once per step for a registered kernel of
    this op (vLLM's CPU scheduler metadata, for example); the backends' own kernels ignore it.
    Returns [T, Hq, D] in query.dtype; rows past ``query_start_loc[R]`` (padding) are zeros.

    The arithmetic is PyTorch's ``scaled_dot_product_attention`` on the CPU (its fused flash
    kernel): scores and softmax in fp32; for bf16 / fp16 inputs the products accumulate in fp32
    and the probabilities are rounded to the input dtype before they weight the values (as
    flash-attention kernels do), the sum accumulated in fp32 and rounded once.
    Batched: the requests with one query (decode) together, in groups whose keys take a few MB,
    each request with more (prefill, chunked prefill) in a call of its own; keys padded to the
    longest request of a call and masked.
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
    T, Hq, D = query.shape
    Hkv = key_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} are not a multiple of kv heads {Hkv}")
    starts = query_start_loc.tolist() if query_start_loc_host is None else query_start_loc_host
    lens = seq_lens.tolist() if seq_lens_host is None else seq_lens_host
    # the queries that see a key: a request's last min(Lq, Lk) (the others stay zero rows)
    first = [max(starts[r], starts[r + 1] - lens[r]) for r in range(len(lens))]
    decode = [r for r in range(len(lens)) if starts[r + 1] - first[r] == 1]
    if _compiled_decode is not None and decode and len(decode) == T:  # a decode step, no padding:
        return _decode_compiled(query, key_cache, value_cache, block_tables, seq_lens, lens,
                                decode, scale)                      # the kernel's result as is
    out = query.new_zeros(T, Hq, D)
    if decode and _compiled_decode is not None:
        rows = [first[r] for r in decode]
        out[rows] = _decode_compiled(query[rows], key_cache, value_cache, block_tables,
                                     seq_lens, lens, decode, scale)
        decode = []
    for group in _by_size(decode, lens, key_cache):
        rows = [first[r] for r in group]
        if group[-1] - group[0] == len(group) - 1 and rows[-1] - rows[0] == len(group) - 1:
            # consecutive requests, a row each: views, no copies
            rows, tables = slice(rows[0], rows[0] + len(group)), block_tables[group[0]:group[-1] + 1]
        else:
            tables = block_tables[group]
        out[rows] = _attend(query[rows].unsqueeze(1), key_cache, value_cache, tables,
                            [lens[r] for r in group], scale).squeeze(1)
    for r in range(len(lens)):
        q0, q1 = first[r], starts[r + 1]
        if q1 - q0 > 1:
            out[q0:q1] = _attend(query[q0:q1].unsqueeze(0), key_cache, value_cache,
                                 block_tables[r:r + 1], [lens[r]], scale).squeeze(0)
    return out


# keys (and values) copied per call, at most: a few MB, so the copies stay in the CPU's caches
# and below glibc's largest mmap threshold (32 MiB), above which every allocation is fresh pages
_GATHER_BYTES = 8 * 2**20


def _by_size(requests: list[int], lens: list[int], key_cache: torch.Tensor) -> list[list[int]]:
    """``requests`` in consecutive groups whose padded keys take at most _GATHER_BYTES (one
    request per group at least)."""
    bs, h, d = key_cache.shape[1:]
    block_bytes = bs * h * d * key_cache.element_size()
    groups, group, most = [], [], 0
    for r in requests:
        blocks = max(most, -(-lens[r] // bs))
        if group and (len(group) + 1) * blocks * block_bytes > _GATHER_BYTES:
            groups.append(group)
            group, blocks = [], -(-lens[r] // bs)
        group.append(r)
        most = blocks
    return groups + [group] if group else groups


def _attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
            tables: torch.Tensor, kv_lens: list[int], scale: float) -> torch.Tensor:
    """R requests with Lq queries each: q [R, Lq, Hq, D]; tables [R, >= n]: each request's
    blocks; kv_lens: each request's keys (its last Lq keys are the queries' own). Returns
    [R, Lq, Hq, D]."""
    R, Lq, Hq, D = q.shape
    bs, Hkv = key_cache.shape[1], key_cache.shape[2]
    G = Hq // Hkv
    L = max(kv_lens)
    n = -(-L // bs)                                                # blocks of the longest
    blocks = tables[:, :n].long()
    if any(length <= (n - 1) * bs for length in kv_lens):         # a request needs fewer:
        in_use = torch.arange(n).view(1, n) * bs < torch.tensor(kv_lens).view(R, 1)
        blocks = torch.where(in_use, blocks, 0)                    # its other entries: any block
    k = _gather_blocks(key_cache, blocks)[:, :L].transpose(1, 2)   # [R, Hkv, L, D]
    v = _gather_blocks(value_cache, blocks)[:, :L].transpose(1, 2)
    # GQA without copying K / V: the G query heads that share a kv head are attention rows of
    # that head (row g * Lq + j is query j of head kv * G + g), each with its query's mask
    rows = q.view(R, Lq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(R, Hkv, G * Lq, D)
    mask = None
    if Lq > 1 or any(length != L for length in kv_lens):           # causal and/or padded keys
        lens = torch.tensor(kv_lens).view(R, 1, 1)
        kpos = torch.arange(L).view(1, 1, L)
        qpos = torch.arange(Lq).view(1, Lq, 1) + (lens - Lq)
        visible = (kpos <= qpos) & (kpos < lens)                   # [R, Lq, L]
        mask = visible.unsqueeze(1).expand(R, G, Lq, L).reshape(R, 1, G * Lq, L)
    out = torch.nn.functional.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)
    return out.view(R, Hkv, G, Lq, D).permute(0, 3, 1, 2, 4).reshape(R, Lq, Hq, D)


# --- the decode attention for a compiler ------------------------------------------------------
# ``_decode_attention`` is the same decode attention as ``_attend`` written as gathers,
# element-wise products and sums, the form a compiler fuses: under ``torch.compile`` (inductor)
# it becomes loops that read each request's keys and values in place from the cache pages, with
# no gathered copy and no per-call packing of GEMM operands. Eager, it would materialise every
# product, so it only ever runs compiled: ``compile_kernels()`` switches the decode requests of
# ``paged_attention`` to it (the serving engine does when it compiles the model), and
# ``tests/test_ops_reference.py`` holds it to ``_attend`` in fp32 and bf16.

_compiled_decode = None


def compile_kernels(enabled: bool = True) -> None:
    """Run the decode requests of ``paged_attention`` through ``torch.compile`` (``enabled``)
    or through the eager reference ``_attend`` (not ``enabled``, the default).

    Compiling (inductor, a few seconds) happens at the first call, for its shapes; when the
    number of requests or of blocks changes, once more with those sizes dynamic (PyTorch's
    automatic dynamic shapes), and for a single request or block, whose sizes PyTorch
    specialises. Head counts, head size and block size stay constants of the compiled code."""
    global _compiled_decode
    # Inductor's FX-graph cache is bypassed: shared across processes with different
    # ATEN_CPU_CAPABILITY settings, it handed PyTorch 2.13 a graph compiled for another vector
    # ISA, which computed garbage (seen: native AVX-512 run, then one capped to AVX2). The C++
    # kernels' own cache stays on; it is keyed by their source, which names the ISA.
    _compiled_decode = torch.compile(_decode_attention, options={"fx_graph_cache": False}) \
        if enabled else None


def _decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      blocks: torch.Tensor, lens: torch.Tensor, scale: float, L: int
                      ) -> torch.Tensor:
    """q [R, Hq, D], one query per request, the last of its ``lens[r]`` keys; blocks [R, n]
    int, every entry a block of the cache; lens [R] int; L = max(lens).
    Returns [R, Hq, D] in q.dtype, with the numerics of ``_attend``."""
    R, Hq, D = q.shape
    n, bs, Hkv = blocks.shape[1], key_cache.shape[1], key_cache.shape[2]
    G = Hq // Hkv
    # [R, Hkv, 1, L, D]: each request's first L keys (values), read where they lie in the pages
    k = key_cache[blocks].permute(0, 3, 1, 2, 4).reshape(R, Hkv, 1, n * bs, D)[:, :, :, :L]
    v = value_cache[blocks].permute(0, 3, 1, 2, 4).reshape(R, Hkv, 1, n * bs, D)[:, :, :, :L]
    rows = q.view(R, Hkv, G, 1, D).float()          # GQA: query head kv * G + g reads kv head kv
    scores = (rows * k.float()).sum(-1) * scale                                # [R, Hkv, G, L]
    seen = torch.arange(L, device=q.device).view(1, 1, 1, L) < lens.view(R, 1, 1, 1)
    p = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1).to(q.dtype)
    out = (p.float().unsqueeze(-1) * v.float()).sum(3)                         # [R, Hkv, G, D]
    return out.reshape(R, Hq, D).to(q.dtype)


def _decode_compiled(q, key_cache, value_cache, block_tables, seq_lens, lens, decode,
                     scale) -> torch.Tensor:
    """q [len(decode), Hq, D]: the queries of the decode requests ``decode`` of a
    ``paged_attention`` call, attended in one compiled call."""
    bs = key_cache.shape[1]
    kv_lens = [lens[r] for r in decode]
    n = -(-max(kv_lens) // bs)
    if decode[-1] - decode[0] == len(decode) - 1:       # consecutive requests: views, no copies
        tables, lengths = block_tables[decode[0]:decode[-1] + 1, :n], \
            seq_lens[decode[0]:decode[-1] + 1]
    else:
        tables, lengths = block_tables[decode, :n], seq_lens[decode]
    if any(length <= (n - 1) * bs for length in kv_lens):    # a request needs fewer blocks:
        tables = torch.where(torch.arange(n) * bs < lengths.view(-1, 1), tables, 0)  # others: any
    return _compiled_decode(q, key_cache, value_cache, tables, lengths, scale, max(kv_lens))


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache [NB, BS, Hkv, D] (any strides), blocks [R, n] -> a new contiguous
    [R, n * BS, Hkv, D]: each request's keys (or values) in order."""
    R, n = blocks.shape
    nb, bs, h, d = cache.shape
    out = torch.empty(R * n, bs, h, d, dtype=cache.dtype)
    torch.index_select(cache, 0, blocks.reshape(-1), out=out)
    return out.view(R, n * bs, h, d)


# --------------------------------------------------------------------------------------------
# int8 quantisation
# --------------------------------------------------------------------------------------------

def dynamic_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantisation.

    x: [M, K] float. scale[m] = max_k |x[m, k]| / 127 (fp32); xq = round(x / scale) (half to even),
    int8. A row of zeros gets scale 0 and quantises to zeros. Returns (xq [M, K] int8, scale [M] fp32).
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    xq = torch.round(xf / safe.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return xq, scale


def static_quant(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per-tensor static int8 quantisation with zero point.

    x: [..., K] float; scale: [1] float (the checkpoint's ``input_scale``); offset: [1] (int8 or
    float, the ``input_offset``). xq = clamp(round(x / scale + offset), -128, 127) (round half to
    even), int8.
    """
    y = torch.round(x.float() / scale.float() + offset.float())
    return y.clamp(-128, 127).to(torch.int8)


_INT_MM_EXACT: bool | None = None


def int_mm_is_exact() -> bool:
    """Does ``torch._int_mm`` give the exact int32 accumulator on this CPU? (probed once)

    oneDNN's int8 GEMM on x86 CPUs without VNNI (AVX2-only parts, AVX-512 parts without VNNI,
    or any CPU under ``ONEDNN_MAX_CPU_ISA`` below them) multiplies unsigned x signed byte pairs
    with ``vpmaddubsw``, whose int16 pair sums saturate, so large int8 products come out wrong
    (oneDNN developer guide, "Nuances of int8 Computations"). The probe multiplies the extreme
    values and compares with an int64 product.
    """
    global _INT_MM_EXACT
    if _INT_MM_EXACT is None:   # (first called by prepare_weight, when int8 weights are finalised)
        a = torch.full((16, 64), 127, dtype=torch.int8)
        a[1::2] = -128
        b = torch.full((64, 16), -128, dtype=torch.int8)
        b[:, 1::2] = 127
        exact = a.long() @ b.long()
        _INT_MM_EXACT = all(torch.equal(torch._int_mm(a, w).long(), exact)   # both layouts
                            for w in (b, b.t().contiguous().t()))
    return _INT_MM_EXACT


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """The int32 accumulator of an int8 GEMM: xq [M, K] int8 @ wq [K, N] int8 -> [M, N] int32,
    exact (sums of K products of int8 values; exact in int32 for K < 2^17).

    ``torch._int_mm`` (oneDNN) where it is exact; an int32 matmul of the widened operands on CPUs
    where oneDNN's int8 GEMM saturates (``int_mm_is_exact``).
    """
    if xq.shape[0] == 0:
        return torch.zeros(0, wq.shape[1], dtype=torch.int32)
    if int_mm_is_exact():
        return torch._int_mm(xq.contiguous(), _either_major(wq))
    return torch.mm(xq.to(torch.int32), wq.to(torch.int32))


def _either_major(w: torch.Tensor) -> torch.Tensor:
    """w itself when it is stored row- or column-major (``_int_mm`` takes both), else a copy."""
    return w if w.is_contiguous() or w.t().is_contiguous() else w.contiguous()


def quant_matmul(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor,
                 pertoken_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 output_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """int8 x int8 GEMM with int32 accumulation and dequantisation.

    xq: [M, K] int8; wq: [K, N] int8 (weight stored transposed, K-major rows); scale: [N] fp32
    per-output-channel dequant scale (static W8A8: input_scale * weight_scale; dynamic: weight_scale);
    pertoken_scale: [M] fp32 or None (dynamic quant of the activations); bias: [N] int32 or None,
    added to the int32 accumulator before scaling (msModelSlim's ``quant_bias``).
    y[m, n] = (acc[m, n] + bias[n]) * scale[n] * pertoken_scale[m], cast to output_dtype.
    """
    acc = int8_matmul(xq, wq)
    if bias is not None:
        acc = acc + bias.to(torch.int32)
    y = acc.float() * scale.float()
    if pertoken_scale is not None:
        y = y * pertoken_scale.float().unsqueeze(-1)
    return y.to(output_dtype)


# --------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------

_MAX_KEYED_EXPERTS = 1 << 16      # expert ids in the low 16 bits of moe_gating_topk's keys


def moe_gating_topk(router_logits: torch.Tensor, k: int, renormalize: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router with top-k selection.

    router_logits: [T, E] (any float dtype). Softmax over E in fp32, keep the k largest
    probabilities (ties: lower expert id first); if ``renormalize`` divide them by their sum
    (fp32). Returns (weights [T, k] in router_logits' dtype, rounded once; expert_ids [T, k]
    int32), each row sorted by descending weight. (The weights stay in the model dtype, as
    vLLM's and vllm-ascend's routers keep them for bf16 models; fp32 logits give fp32 weights.)
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    # torch.topk's order among equal values is unspecified (on the CPU it does not put the lower
    # expert id first), so it runs on keys that are all distinct: a non-negative fp32's bits,
    # read as an integer, order as the float does; below them, 65535 - id puts the lower id
    # first among equal probabilities. (The same result as a stable descending sort, which
    # took 3-6x as long for 128 experts.)
    E = probs.shape[-1]
    if E > _MAX_KEYED_EXPERTS:
        raise ValueError(f"moe_gating_topk: {E} experts, at most {_MAX_KEYED_EXPERTS} supported")
    low = _MAX_KEYED_EXPERTS - 1 - torch.arange(E, device=probs.device)
    keys = (probs.view(torch.int32).long() << 16) | low
    ids = _MAX_KEYED_EXPERTS - 1 - (keys.topk(k, dim=-1).values & (_MAX_KEYED_EXPERTS - 1))
    weights = probs.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids.to(torch.int32)


def moe_route(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Permute token copies so that rows for the same expert are contiguous.

    x: [T, Hd]; expert_ids: [T, k] int. The T*k (token, slot) pairs are flattened in row-major order
    (pair index p = t * k + j) and stably sorted by expert id; ``order[i]`` is the pair of sorted
    row i.
    Returns:
      sorted_x [T*k, Hd]: ``sorted_x[i] = x[order[i] // k]``;
      row_of_pair [T*k] int32: the sorted row of each pair, ``row_of_pair[order[i]] = i`` (the
        "gather index" the NPU routing and unpermute kernels produce and consume);
      tokens_per_expert [E] int64: how many rows each expert received (zeros allowed).
    """
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    order = torch.sort(flat, stable=True).indices
    sorted_x = x.index_select(0, order // k)
    row_of_pair = torch.empty_like(order)
    row_of_pair[order] = torch.arange(order.numel())
    counts = torch.bincount(flat, minlength=num_experts)
    return sorted_x, row_of_pair.to(torch.int32), counts.to(torch.int64)


def moe_route_quant(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_route`` with the per-token dynamic int8 quantisation of W8A8_DYNAMIC experts fused in.

    Returns (sorted_xq [T*k, Hd] int8, row_of_pair, tokens_per_expert, scale [T*k] fp32), where
    (sorted_xq, scale) = dynamic_quant(sorted_x) of ``moe_route``'s sorted rows.
    """
    sorted_x, row_of_pair, counts = moe_route(x, expert_ids, num_experts)
    xq, scale = dynamic_quant(sorted_x)
    return xq, row_of_pair, counts, scale


def grouped_matmul(x: torch.Tensor, weight, group_sizes: torch.Tensor,
                   cumulative: bool = False) -> torch.Tensor:
    """Per-group float GEMM over rows sorted by group.

    x: [M, K]; weight: [G, K, N] in x.dtype, or what ``prepare_grouped_weight`` made of one;
    group_sizes: [G] int64 counts summing to at most M (``cumulative``: each group's end row
    instead, non-decreasing, at most M: what ``ep_dispatch`` returns). Rows ``offset_g :
    offset_g + group_sizes[g]`` are multiplied by weight[g]. Returns [M, N] in x.dtype: each output
    accumulated in fp32 and rounded once (what ``torch.mm`` and oneDNN's linear do for bf16 /
    fp16 on the CPU, so the weights are used as they are, never converted). Rows past the last
    group are not part of any group: their values are unspecified (zeros here; the NPU kernel
    does not write them).
    """
    n_out = weight[0].shape[0] if isinstance(weight, list) else weight.shape[2]
    out = x.new_zeros(x.shape[0], n_out)
    for g, rows in _groups(group_sizes, x.shape[0], cumulative):
        w = weight[g]
        if w.is_mkldnn:                  # prepacked [N, K] (prepare_grouped_weight)
            out[rows] = _linear(x[rows], w)
        else:
            torch.mm(x[rows], w, out=out[rows])
    return out


class GroupedExperts:
    """One rank's float experts in the form ``moe_experts`` takes (``prepare_moe_experts``):
    ``w13`` and ``w2`` as ``prepare_grouped_weight`` made them, ``count`` experts."""

    def __init__(self, w13, w2, count: int):
        self.w13, self.w2, self.count = w13, w2, count
        self._rows: torch.Tensor | None = None

    def row_index(self, n: int, device) -> torch.Tensor:
        """0 .. n-1 on ``device``, made once (again only for a longer step): a view, no kernel."""
        if self._rows is None or self._rows.numel() < n:
            self._rows = torch.arange(max(n, 256), device=device)
        return self._rows[:n]


def prepare_moe_experts(w13: torch.Tensor, w2: torch.Tensor) -> GroupedExperts:
    """A rank's float experts, made once when the weights are finalised, for ``moe_experts``.

    w13: [E_l, H, 2I] (each expert's gate columns, then its up columns); w2: [E_l, I, H]; both
    in the model dtype. Here each is ``prepare_grouped_weight``'s form; an engine's kernel may
    keep its own (the pair is registered together)."""
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0] \
            or w13.shape[2] != 2 * w2.shape[1] or w13.shape[1] != w2.shape[2]:
        raise ValueError(f"prepare_moe_experts: w13 [E, H, 2I] and w2 [E, I, H] expected, got "
                         f"{list(w13.shape)} and {list(w2.shape)}")
    return GroupedExperts(prepare_grouped_weight(w13), prepare_grouped_weight(w2), w13.shape[0])


def moe_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                experts: GroupedExperts, num_experts: int) -> torch.Tensor:
    """The routed float experts of one rank, weighted and summed per token.

    x: [T, H]; weights: [T, k] (the router's, any float dtype); expert_ids: [T, k] int32 in
    [0, num_experts); experts: ``prepare_moe_experts`` of this rank's E_l experts. Pair (t, j)
    goes to expert ``expert_ids[t, j]`` when that is below E_l and adds nothing otherwise (expert
    parallel: the model numbers this rank's experts first). Returns [T, H] in x.dtype:
    out[t] = sum_j weights[t, j] * (swiglu(x[t] @ w13[e]) @ w2[e]), e = expert_ids[t, j], with
    the roundings of the ops it is made of: ``moe_route``, ``grouped_matmul`` (fp32 accumulation,
    rounded to x.dtype), ``swiglu``, ``grouped_matmul``, ``moe_combine`` (fp32 weighted sum)."""
    return _route_experts_combine(sys.modules[__name__], x, weights, expert_ids, experts,
                                  num_experts)


def _route_experts_combine(be, x, weights, expert_ids, experts, num_experts):
    """``moe_experts`` from a backend's own ops (``be``: this module or ``ops.npu``)."""
    count = experts.count
    sorted_x, row_of_pair, counts = be.moe_route(x, expert_ids, num_experts)
    counts = counts[:count]
    out = be.grouped_matmul(be.swiglu(be.grouped_matmul(sorted_x, experts.w13, counts)),
                            experts.w2, counts)
    if count != num_experts:   # rows past this rank's pairs (other ranks' pairs): zero
        past = experts.row_index(out.shape[0], x.device) >= counts.sum()
        out = out.masked_fill(past.unsqueeze(-1), 0)
    return be.moe_combine(out, row_of_pair, weights)


def _groups(group_sizes: torch.Tensor, m: int, cumulative: bool = False):
    """(group, its slice of rows) for every non-empty group of rows sorted by group; refuses
    sizes that add up to more than the ``m`` rows there are. ``cumulative``: ``group_sizes``
    holds each group's end row (the running sum of the counts) instead of its count."""
    sizes = group_sizes.tolist()
    if cumulative:
        if any(b < a for a, b in zip([0] + sizes, sizes)):
            raise ValueError(f"cumulative group ends must not decrease, got {sizes}")
        sizes = [b - a for a, b in zip([0] + sizes, sizes)]
    if sum(sizes) > m:
        raise ValueError(f"group sizes sum to {sum(sizes)}, x has only {m} rows")
    start = 0
    for g, n in enumerate(sizes):
        if n:
            yield g, slice(start, start + n)
        start += n


def prepare_grouped_weight(weight: torch.Tensor):
    """A [G, K, N] float ``grouped_matmul`` weight in the form it multiplies fastest, made once
    when the weights are finalised: here a list of G oneDNN-prepacked weights
    (``prepare_linear_weight`` of each group's [N, K] transpose; about 2.4x faster than the
    plain [K, N] matrix for the few rows a decode step gives an expert) where packing works,
    the tensor itself otherwise. The same products either way."""
    if weight.dtype in (torch.bfloat16, torch.float32) and _packing_works(weight.dtype):
        return [prepare_linear_weight(w.t()) for w in weight]
    return weight


def grouped_quant_matmul(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor,
                         pertoken_scale: torch.Tensor, group_sizes: torch.Tensor,
                         output_dtype: torch.dtype = torch.bfloat16,
                         cumulative: bool = False) -> torch.Tensor:
    """Per-group int8 GEMM (W8A8_DYNAMIC experts).

    xq: [M, K] int8 rows sorted by group; wq: [G, K, N] int8; scale: [G, N] fp32 per-channel weight
    scale; pertoken_scale: [M] fp32; group_sizes: [G] int64 summing to at most M (``cumulative``:
    end rows, as in ``grouped_matmul``). For a row m of
    group g: y[m, n] = acc[m, n] * scale[g, n] * pertoken_scale[m], acc the int32 accumulator.
    Rows past the last group: unspecified, as in ``grouped_matmul``.
    """
    out = torch.zeros(xq.shape[0], wq.shape[2], dtype=output_dtype)
    for g, rows in _groups(group_sizes, xq.shape[0], cumulative):
        out[rows] = quant_matmul(xq[rows], wq[g], scale[g], pertoken_scale[rows], None,
                                 output_dtype)
    return out


def grouped_quant_swiglu_quant(xq: torch.Tensor, w13q: torch.Tensor, scale: torch.Tensor,
                               pertoken_scale: torch.Tensor, group_sizes: torch.Tensor,
                               output_dtype: torch.dtype = torch.bfloat16,
                               cumulative: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of W8A8_DYNAMIC experts: the gate/up GEMM, SwiGLU and the per-token
    quantisation of its output for the down GEMM.

    Arguments as ``grouped_quant_matmul`` (w13q [G, K, 2I], scale [G, 2I]). Returns
    ``dynamic_quant(swiglu(grouped_quant_matmul(xq, w13q, scale, pertoken_scale, group_sizes,
    output_dtype)))``: (aq [M, I] int8, a_scale [M] fp32). Rows past the last group:
    unspecified.
    """
    h = grouped_quant_matmul(xq, w13q, scale, pertoken_scale, group_sizes, output_dtype,
                             cumulative)
    return dynamic_quant(swiglu(h))


def moe_combine(expert_out: torch.Tensor, row_of_pair: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
    """Weighted un-permute: the inverse of ``moe_route`` followed by the top-k weighted sum.

    expert_out: [T*k, Hd] rows in sorted order; row_of_pair: [T*k] int (from moe_route);
    weights: [T, k] (``moe_gating_topk``'s, any float dtype).
    out[t] = sum_j weights[t, j] * expert_out[row_of_pair[t*k + j]], products and sum in fp32
    from the given values, returned [T, Hd] in expert_out.dtype.
    """
    T, k = weights.shape
    gathered = expert_out.float().index_select(0, row_of_pair.long()).view(T, k, expert_out.shape[-1])
    return (gathered * weights.float().unsqueeze(-1)).sum(dim=1).to(expert_out.dtype)


# --------------------------------------------------------------------------------------------
# Expert parallel: the token exchange (dispatch to the experts' ranks, combine back)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertGroup:
    """The expert-parallel ranks ``ep_dispatch`` / ``ep_combine`` exchange tokens over: this
    rank's place (``rank`` of ``size``; rank r holds experts r * E / size .. (r + 1) * E / size
    - 1) and the communicator as each backend names it: ``group``, a torch.distributed group
    (None: the default one; the CPU backend's), ``hccl_name``, the HCCL communicator's name
    (the NPU backend's)."""

    rank: int
    size: int
    group: Any = None
    hccl_name: str | None = None


@dataclass(frozen=True)
class Dispatched:
    """What ``ep_combine`` needs of an ``ep_dispatch`` (its own bookkeeping here: for each
    received row its source rank, token and slot, -1 past the received rows)."""

    expert_ids: torch.Tensor
    active: torch.Tensor | None
    num_experts: int
    ep: ExpertGroup
    sources: torch.Tensor          # [A, 3] int64 (rank, token, slot)


def _ep_all_gather(t: torch.Tensor, ep: ExpertGroup) -> list[torch.Tensor]:
    if ep.size == 1:
        return [t]
    import torch.distributed as dist
    parts = [torch.empty_like(t) for _ in range(ep.size)]
    dist.all_gather(parts, t.contiguous(), group=ep.group)
    return parts


def _check_dispatch(x, expert_ids, active, num_experts, ep) -> int:
    if not 0 <= ep.rank < ep.size:
        raise ValueError(f"ep_dispatch: rank {ep.rank} outside the group of {ep.size}")
    if num_experts % ep.size:
        raise ValueError(f"ep_dispatch: {num_experts} experts do not divide over {ep.size} "
                         f"expert-parallel ranks; pick a size that divides them")
    if x.dim() != 2 or expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"ep_dispatch: x [BS, H] and expert_ids [BS, k] expected, got "
                         f"{list(x.shape)} and {list(expert_ids.shape)}")
    if active is not None and (active.dtype != torch.bool or tuple(active.shape) != (x.shape[0],)):
        raise ValueError(f"ep_dispatch: active must be a bool [{x.shape[0]}] mask, got "
                         f"{active.dtype} {list(active.shape)}")
    if active is not None and bool((active[1:] & ~active[:-1]).any()):
        raise ValueError("ep_dispatch: the active rows must come first (a prefix of the rows); "
                         "put the padding rows last")
    return num_experts // ep.size


def ep_dispatch(x: torch.Tensor, expert_ids: torch.Tensor, active: torch.Tensor | None,
                num_experts: int, ep: ExpertGroup, quantize: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, Dispatched]:
    """Send every (token, slot) pair to the rank that holds its expert; a collective: every
    rank of ``ep`` calls it in the same step with the same number of tokens BS.

    x: [BS, H] this rank's tokens; expert_ids: [BS, k] int32 in [0, num_experts) (the router's,
    distinct within a row); active: [BS] bool, the rows that take part, a prefix (None: all; an
    inactive row sends nothing and gets an unspecified row from ``ep_combine``: padding);
    ``quantize``: the rows
    travel as per-token int8 (``dynamic_quant``: W8A8_DYNAMIC experts).
    Returns (expand_x [A, H], scale, ends, handle) with A = BS * size * min(E_l, k), E_l =
    num_experts / size the experts of this rank: the rows this rank's experts received from
    every rank, grouped by its expert (local 0 first; within one expert in the backend's own
    order: here source rank, then token, then slot), rows past them unspecified (zeros here);
    x's dtype, or int8 with ``scale`` [A] fp32 when ``quantize`` (else scale is None); ends
    [E_l] int64, each local expert's end row (cumulative: ``grouped_matmul(...,
    cumulative=True)``); handle for ``ep_combine``.
    Here over torch.distributed (``ep.group``): every rank's tokens are gathered and this
    rank keeps its pairs (the NPU backend moves only the pairs, with HCCL).
    """
    E_l = _check_dispatch(x, expert_ids, active, num_experts, ep)
    BS, k = expert_ids.shape
    act = active if active is not None else torch.ones(BS, dtype=torch.bool, device=x.device)
    xs = _ep_all_gather(x, ep)
    ids = _ep_all_gather(expert_ids.to(torch.int64), ep)
    acts = _ep_all_gather(act.to(torch.uint8), ep)
    lo = ep.rank * E_l
    picked = []                    # (local expert, source rank, token, slot)
    for src in range(ep.size):
        mine = (ids[src] >= lo) & (ids[src] < lo + E_l) & acts[src].bool().unsqueeze(1)
        t, j = mine.nonzero(as_tuple=True)
        picked.append(torch.stack([ids[src][t, j] - lo, torch.full_like(t, src), t, j], dim=1))
    picked = torch.cat(picked)
    picked = picked[torch.sort(picked[:, 0], stable=True).indices]
    A = BS * ep.size * min(E_l, k)
    expand_x = x.new_zeros(A, x.shape[1])
    sources = torch.full((A, 3), -1, dtype=torch.int64)
    n = picked.shape[0]
    if n:
        expand_x[:n] = torch.stack([xs[int(s)][int(t)] for _, s, t, _ in picked.tolist()])
        sources[:n] = picked[:, 1:]
    ends = torch.bincount(picked[:, 0], minlength=E_l).cumsum(0)
    handle = Dispatched(expert_ids, active, num_experts, ep, sources)
    if quantize:
        xq, scale = dynamic_quant(expand_x)
        return xq, scale, ends, handle
    return expand_x, None, ends, handle


def ep_combine(expert_out: torch.Tensor, weights: torch.Tensor, handle: Dispatched
               ) -> torch.Tensor:
    """``ep_dispatch``'s way back: every rank's expert outputs return to the tokens they came
    from, weighted and summed; a collective of the same ranks.

    expert_out: [A, H] the experts' output for the rows ``ep_dispatch`` gave this rank (rows
    past them are ignored); weights: [BS, k] the router's weights of this rank's tokens.
    Returns [BS, H] in expert_out's dtype: out[t] = sum_j weights[t, j] * (the output for pair
    (t, j)), products and sum in fp32 over j in slot order (as ``moe_combine``), one rounding;
    the rows of inactive tokens are unspecified (zeros here; the NPU kernel does not write
    them).
    Here over torch.distributed: every rank's outputs are gathered and this rank picks its pairs.
    """
    ep = handle.ep
    BS, k = handle.expert_ids.shape
    outs = _ep_all_gather(expert_out, ep)
    sources = _ep_all_gather(handle.sources, ep)
    pairs = expert_out.new_zeros(BS, k, expert_out.shape[1], dtype=torch.float32)
    for d in range(ep.size):
        rows = (sources[d][:, 0] == ep.rank).nonzero(as_tuple=True)[0]
        t, j = sources[d][rows, 1], sources[d][rows, 2]
        pairs[t, j] = outs[d][rows].float()
    out = (pairs * weights.float().unsqueeze(-1)).sum(dim=1)
    if handle.active is not None:
        out = out.masked_fill(~handle.active.unsqueeze(-1), 0)
    return out.to(expert_out.dtype)


# --------------------------------------------------------------------------------------------
# Weight preparation
# --------------------------------------------------------------------------------------------

def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    """Put a [K, N] or [G, K, N] matmul weight into the backend's preferred layout.

    Numerically the identity, same shape; on the NPU a cast to FRACTAL_NZ. On the CPU an int8
    weight is stored N-major (each output channel's K values contiguous, the [K, N] tensor a
    transposed view): oneDNN's int8 GEMM behind ``torch._int_mm`` multiplies that layout
    several times faster than a K-major one when there are few rows (decode). Float weights
    are returned as they are.
    """
    if weight.dtype == torch.int8:
        int_mm_is_exact()   # probed here, eagerly: a compiled graph cannot run the probe
        return weight.transpose(-1, -2).contiguous().transpose(-1, -2)
    return weight


def prepare_static_quant(scale: torch.Tensor, offset: torch.Tensor, k: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, offset) of a static quantiser in the form ``static_quant`` of this backend
    takes fastest, made once when the weights are finalised. scale, offset: [1] (the
    checkpoint's input_scale / input_offset; offset integral); k: the input features.
    Here: (scale fp32 [1], offset fp32 [1]). Numerically the identity."""
    return scale.reshape(1).float(), offset.reshape(1).float()


def prepare_norm_quant(scale: torch.Tensor, offset: torch.Tensor, k: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, offset) of a static quantiser fused into a norm (``add_rms_norm_quant``) in
    the form this backend takes, made once when the weights are finalised. scale, offset: [1]
    (input_scale / input_offset); k: the features; dtype: the activations'. Here: fp32 [1]
    each. Numerically the identity."""
    return scale.reshape(1).float(), offset.reshape(1).float()


def prepare_quant_scale(scale: torch.Tensor, output_dtype: torch.dtype, pertoken: bool
                        ) -> torch.Tensor:
    """A ``quant_matmul`` dequant scale [N] in the form this backend's kernel takes, made once
    when the weights are finalised (``pertoken``: the layer quantises its input per token).
    Here: fp32 [N]. Numerically the identity."""
    return scale.reshape(-1).float().contiguous()


def prepare_expert_scale(scale: torch.Tensor, output_dtype: torch.dtype) -> torch.Tensor:
    """A ``grouped_quant_matmul`` weight scale [G, N] in the form this backend's kernel takes,
    made once when the weights are finalised. Here: fp32 [G, N]. Numerically the identity for
    scales read from a bf16 / fp16 checkpoint."""
    return scale.float().contiguous()


# --------------------------------------------------------------------------------------------
# LoRA (low-rank adapters: several adapters in one batch, one per token)
# --------------------------------------------------------------------------------------------
# A LoRA adapter adds (x @ A^T) @ B^T * scale to a linear's output. The engine keeps the
# adapters of a step in S "slots" stacked along a leading dimension, every slot padded to the
# same rank R (an adapter of lower rank has zero rows in A and zero columns in B), and tells
# each token its slot (-1: the base model alone). The work is split in two ops, as vLLM's
# punica kernels split it (vllm/lora/ops/torch_ops/lora_ops.py: bgmv_shrink, bgmv_expand_slice):
# ``lora_shrink`` to the rank, ``lora_expand`` back to the output features, so that a packed
# projection (qkv = q|k|v) shrinks once per slice and expands into its own columns.

def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_lora: torch.Tensor,
                scale: float) -> torch.Tensor:
    """h[t] = scale * lora_a[token_lora[t]] @ x[t]; 0 for the tokens whose slot is -1.

    x: [T, K] in the model dtype (fp32 / bf16 / fp16). lora_a: [S, R, K] in x's dtype (S slots,
    R the slots' rank; rows past an adapter's own rank are zero). token_lora: [T] integer
    (int32 or int64), each in [-1, S). scale: a Python float. Returns h: [T, R] float32, each
    product accumulated in float32 from the float32 values of x and lora_a, then multiplied by
    ``scale`` (h is not rounded to the model dtype: ``lora_expand`` takes it as it is)."""
    T, R = x.shape[0], lora_a.shape[1]
    h = torch.zeros(T, R, dtype=torch.float32, device=x.device)
    for s in range(lora_a.shape[0]):
        rows = token_lora == s
        h[rows] = scale * (x[rows].float() @ lora_a[s].float().t())
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, token_lora: torch.Tensor,
                offset: int) -> torch.Tensor:
    """y[t, offset:offset+n] += lora_b[token_lora[t]] @ h[t], for the tokens whose slot is not -1.

    y: [T, N] in the model dtype (fp32 / bf16 / fp16); h: [T, R] float32 (``lora_shrink``);
    lora_b: [S, n, R] in y's dtype, offset + n <= N (the columns of one slice of a packed
    projection: q, k or v of qkv, gate or up of gate_up; offset 0 and n = N for a plain linear).
    token_lora: [T] integer, each in [-1, S). Each updated element is y's value plus the
    product, added in float32 and rounded once to y's dtype; the other columns and the rows of
    tokens with slot -1 are unchanged. Returns y (updated in place here; an implementation may
    also return a new tensor, so callers use the return value)."""
    n = lora_b.shape[1]
    out = y[:, offset:offset + n]
    for s in range(lora_b.shape[0]):
        rows = token_lora == s
        out[rows] = (out[rows].float() + h[rows].float() @ lora_b[s].float().t()).to(y.dtype)
    return y
