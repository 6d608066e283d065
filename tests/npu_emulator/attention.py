"""``npu_fused_infer_attention_score`` (FIA).

Sources:
  [T] op-plugin ``docs/zh/custom_APIs/torch_npu/torch_npu-npu_fused_infer_attention_score.md``
      (master, and the 26.0.0 branch's longer wording);
  [A] ops-transformer ``attention/fused_infer_attention_score/docs/aclnnFusedInferAttentionScoreV4.md``
      (hicann/ops-transformer; its English twin ``..._en.md``).

Facts the emulator enforces or implements:
  * query/key/value positional, everything else keyword-only; returns (attention_out,
    softmax_lse); softmax_lse is (T, Q_N, 1) fp32 for TND / (B, Q_N, Q_S, 1) otherwise when
    softmax_lse_flag=True, else a one-element zero tensor (shape (1,)).  [T]
  * attention_out = softmax(scale * q k^T + mask) v; scale defaults to 1.0 (callers must pass
    1/sqrt(D)).  [T]
  * TND: query (T, Q_N, D), output (T, Q_N, D); actual_seq_lengths required, a list of ints whose
    count is the batch (<= 4096), cumulative ("当前batch与之前所有batch的seqlen累加和"), non
    decreasing.  [T]
  * actual_seq_lengths_kv: "In the PA scenario, this parameter works in the batch mode. In non-PA
    scenarios, when the layout is TND, this parameter works in the accumulation mode."  [A, en]
    I.e. with block_table it holds each request's KV length, without it cumulative KV ends.
    PageAttention requires it.  [T]
  * PageAttention (block_table given): block_table int32, 2-D [B, >= maxBlockNumPerSeq];
    key/value are the caches, "BSH/BSND仅BnBsH; BNSD/TND支持BnBsH和BnNBsD", i.e.
    (blocknum, blocksize, KV_N*D) or (blocknum, KV_N, blocksize, D); KV_N*D > 65535 rejected for
    BnBsH; blocknum >= sum of the batches' block counts; block_size: Q_S > 1 -> multiple of 128
    in [128, 512], Q_S = 1 -> non-zero, <= 512; kv float16/bfloat16.  [T]
    A2 + TND + D != 512: block_size 128/512/1024 only, q/k/v BFLOAT16 only, D = 128 (or
    Q_D = K_D = 192 with V_D 128/192; no V_D 192 with GQA or PA).  [A]
  * GQA: num_key_value_heads 0 means num_heads; num_heads % num_key_value_heads == 0, ratio
    <= 64; Q_N, KV_N <= 256. Query head h reads KV head h // (Q_N / KV_N).  [T]
  * sparse_mode 0: no mask -> full attention (pre/next_tokens ignored). 2 = leftUpCausal,
    3 = rightDownCausal ("以右顶点为划分的下三角"): atten_mask REQUIRED, shape (2048, 2048),
    (1, 2048, 2048) or (1, 1, 2048, 2048), dtype bool/int8/uint8 with values 0/1 (1 = not
    computed), lower-triangular ("需用户保证传入的atten_mask为下三角"): the emulator requires
    exactly triu(ones(2048, 2048), diagonal=1) as vllm-ascend builds it. 5-8 unsupported by the
    kernel.  [T]/[A]
    rightDownCausal for a request with Lq queries and Lk keys: query i sees keys j <= i + Lk - Lq;
    leftUpCausal: j <= i.
  * Rows with no visible key (e.g. sparse_mode 3 with Lq > Lk, or Lk == 0) output zeros: "若算子
    可判断出存在无效行场景（如sparse_mode=3且Q_S > KV_S），会自动开启行无效计算" and "key/value为空
    （S2=0）则attention_out按对应shape返回全0".  [T]
    [A] also says "当sparseMode=3时，要求每个batch单独的actualSeqLengths < actualSeqLengthsKv" for
    TND; read literally that forbids plain prefill (Lq == Lk), which vllm-ascend runs with
    sparse_mode 3, and it contradicts [T]'s invalid-row rule, so it is not enforced.
  * Q_S = 1 outside TND (IncreFlashAttention branch): sparse_mode has no effect.  [T]
Precision: fp32 scores, fp32 softmax, fp32 P@V, one rounding to query's dtype (the kernel works
in blocks with bf16 matmul inputs; compare with a bf16 tolerance).
Not emulated (NotImplementedError): quantisation/antiquant inputs, pse_shift, padding sizes,
shared prefix, MLA rope inputs, sparse_mode 1 and 4, masks with sparse_mode 0 in TND, layouts
other than BSH/BSND/BNSD/TND, NZ KV caches.
"""

from __future__ import annotations

import torch

from ._base import (HALF_TYPES, boolean, dt, fail, fill_undefined, int_list, integer, must_be_none,
                    op, real, tensor, unsupported)
from .formats import FRACTAL_NZ, format_of

_NAME = "npu_fused_infer_attention_score"
_MASK_SIDE = 2048
_CAUSAL_2048: dict[torch.dtype, torch.Tensor] = {}


def _causal_2048(dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """triu(ones(2048, 2048), diagonal=1) in ``dtype`` (bool, int8 or uint8: 0 and 1)."""
    ref = _CAUSAL_2048.get(dtype)
    if ref is None:
        ref = torch.triu(torch.ones(_MASK_SIDE, _MASK_SIDE, dtype=torch.bool), diagonal=1).to(dtype)
        _CAUSAL_2048[dtype] = ref
    return ref


def _is_causal_2048(m2: torch.Tensor) -> bool:
    """``m2`` (2048 x 2048, bool/int8/uint8) holds exactly the optimised causal mask: compared
    with the reference of its own dtype, eight bytes at a time when contiguous (every call of
    the kernel checks its mask; one pass over 4 MB instead of four)."""
    ref = _causal_2048(m2.dtype)
    if m2.is_contiguous():
        try:
            return torch.equal(m2.view(torch.int64), ref.view(torch.int64))
        except RuntimeError:        # a storage offset the wider view cannot take
            pass
    return torch.equal(m2, ref)


def _check_compressed_mask(mask, sparse_mode: int) -> None:
    if mask is None:
        fail(_NAME, f"sparse_mode {sparse_mode} requires the optimised atten_mask of shape "
                    f"(2048, 2048) (e.g. torch.triu(torch.ones(2048, 2048), 1)), got None")
    m = tensor(_NAME, "atten_mask", mask, dtypes=(torch.bool, torch.int8, torch.uint8),
               dims=(2, 3, 4))
    if tuple(m.shape[-2:]) != (_MASK_SIDE, _MASK_SIDE) or any(s != 1 for s in m.shape[:-2]):
        fail(_NAME, f"sparse_mode {sparse_mode} needs atten_mask of shape (2048, 2048), "
                    f"(1, 2048, 2048) or (1, 1, 2048, 2048), got {list(m.shape)}")
    m2 = m.reshape(_MASK_SIDE, _MASK_SIDE)
    if not _is_causal_2048(m2):
        if m2.dtype != torch.bool and bool(((m2 != 0) & (m2 != 1)).any()):
            fail(_NAME, "an int8/uint8 atten_mask must hold only 0 and 1")
        fail(_NAME, "the sparse_mode 2/3 atten_mask must be the lower-triangular optimised "
                    "mask: 1 (masked) strictly above the diagonal, 0 on and below it, i.e. "
                    "torch.triu(torch.ones(2048, 2048), diagonal=1)")


def _check_ints_nondecreasing(name: str, vals: list[int]) -> None:
    prev = 0
    for v in vals:
        if v < prev:
            fail(_NAME, f"{name} must be non-negative and non-decreasing cumulative sums in TND "
                        f"layout, got {vals}")
        prev = v


def _per_batch(name: str, vals: list[int] | None, batch: int, default: int) -> list[int]:
    """Non-TND rule: length 1 -> shared by all batches; length >= B -> first B; else invalid."""
    if vals is None:
        return [default] * batch
    if len(vals) == 1:
        vals = vals * batch
    elif len(vals) >= batch:
        vals = vals[:batch]
    else:
        fail(_NAME, f"{name} must have 1 or >= B={batch} elements, got {len(vals)}")
    for v in vals:
        if v < 0 or v > default:
            fail(_NAME, f"{name} values must lie in [0, {default}], got {vals}")
    return vals


@op
def npu_fused_infer_attention_score(
        query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
        actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
        quant_scale2=None, quant_offset2=None, antiquant_scale=None, antiquant_offset=None,
        block_table=None, query_padding_size=None, kv_padding_size=None,
        key_antiquant_scale=None, key_antiquant_offset=None, value_antiquant_scale=None,
        value_antiquant_offset=None, key_shared_prefix=None, value_shared_prefix=None,
        actual_shared_prefix_len=None, query_rope=None, key_rope=None,
        key_rope_antiquant_scale=None, num_heads=1, scale=1.0, pre_tokens=2147483647,
        next_tokens=2147483647, input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
        inner_precise=0, block_size=0, antiquant_mode=0, softmax_lse_flag=False,
        key_antiquant_mode=0, value_antiquant_mode=0):
    must_be_none(_NAME, pse_shift=pse_shift, dequant_scale1=dequant_scale1,
                 quant_scale1=quant_scale1, dequant_scale2=dequant_scale2,
                 quant_scale2=quant_scale2, quant_offset2=quant_offset2,
                 antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                 query_padding_size=query_padding_size, kv_padding_size=kv_padding_size,
                 key_antiquant_scale=key_antiquant_scale,
                 key_antiquant_offset=key_antiquant_offset,
                 value_antiquant_scale=value_antiquant_scale,
                 value_antiquant_offset=value_antiquant_offset,
                 key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
                 actual_shared_prefix_len=actual_shared_prefix_len, query_rope=query_rope,
                 key_rope=key_rope, key_rope_antiquant_scale=key_rope_antiquant_scale)
    for nm, v in (("antiquant_mode", antiquant_mode), ("key_antiquant_mode", key_antiquant_mode),
                  ("value_antiquant_mode", value_antiquant_mode)):
        if integer(_NAME, nm, v) != 0:
            unsupported(_NAME, f"{nm}={v}")

    layouts = ("BSH", "BSND", "BNSD", "TND")
    others = ("BNSD_BSND", "BSH_NBSD", "BSND_NBSD", "BNSD_NBSD", "TND_NTD", "NTD_TND", "NTD",
              "BSH_BNSD", "BSND_BNSD")
    if not isinstance(input_layout, str):
        raise TypeError(f"torch_npu.{_NAME}(): argument 'input_layout' must be str")
    if input_layout in others:
        unsupported(_NAME, f"input_layout {input_layout!r}")
    if input_layout not in layouts:
        fail(_NAME, f"input_layout must be one of {list(layouts) + list(others)}, got "
                    f"{input_layout!r}")
    layout = input_layout
    tnd = layout == "TND"

    if isinstance(query, torch.Tensor) and query.dtype == torch.int8:
        unsupported(_NAME, "int8 query (full quantisation)")
    q = tensor(_NAME, "query", query, dtypes=HALF_TYPES, contiguous=True,
               dims=(3,) if layout in ("BSH", "TND") else (4,))
    k = tensor(_NAME, "key", key, dtypes=HALF_TYPES + (torch.int8,), contiguous=True)
    v = tensor(_NAME, "value", value, dtypes=HALF_TYPES + (torch.int8,), contiguous=True)
    if k.dtype == torch.int8 or v.dtype == torch.int8:
        unsupported(_NAME, "int8 key/value (antiquant)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        fail(_NAME, f"query/key/value dtypes must match here, got {dt(q)}/{dt(k)}/{dt(v)}")
    if format_of(k) == FRACTAL_NZ or format_of(v) == FRACTAL_NZ:
        unsupported(_NAME, "FRACTAL_NZ key/value")

    n_q = integer(_NAME, "num_heads", num_heads)
    n_kv = integer(_NAME, "num_key_value_heads", num_key_value_heads) or n_q
    if n_q < 1 or n_kv < 1 or n_q > 256 or n_kv > 256:
        fail(_NAME, f"num_heads {n_q} / num_key_value_heads {n_kv} must lie in [1, 256]")
    if n_q % n_kv or n_q // n_kv > 64:
        fail(_NAME, f"num_heads {n_q} must be a multiple of num_key_value_heads {n_kv} with a "
                    f"ratio <= 64")
    sc = real(_NAME, "scale", scale)
    integer(_NAME, "pre_tokens", pre_tokens)
    integer(_NAME, "next_tokens", next_tokens)
    sm = integer(_NAME, "sparse_mode", sparse_mode)
    if sm in (5, 6, 7, 8) or not 0 <= sm <= 8:
        fail(_NAME, f"sparse_mode {sm} is not supported (0-4 only)")
    if sm in (1, 4):
        unsupported(_NAME, f"sparse_mode {sm}")
    integer(_NAME, "inner_precise", inner_precise, choices=(0, 1, 2, 3))
    want_lse = boolean(_NAME, "softmax_lse_flag", softmax_lse_flag)
    bs = integer(_NAME, "block_size", block_size)
    paged = block_table is not None

    # ---------------- queries: per-batch [Lq, Q_N, D] ----------------
    if layout == "TND":
        T, qn, D = q.shape
        if qn != n_q:
            fail(_NAME, f"TND query has {qn} heads but num_heads={n_q}")
        ends = int_list(_NAME, "actual_seq_lengths", actual_seq_lengths, optional=True)
        if ends is None:
            fail(_NAME, "actual_seq_lengths is required for input_layout TND (cumulative query "
                        "ends, one per request)")
        if not 1 <= len(ends) <= 4096:
            fail(_NAME, f"TND actual_seq_lengths must hold 1..4096 elements, got {len(ends)}")
        _check_ints_nondecreasing("actual_seq_lengths", ends)
        if ends[-1] != T:
            fail(_NAME, f"TND actual_seq_lengths must end at T = query.shape[0] = {T} "
                        f"(T is the sum of the sequence lengths), got last value {ends[-1]}")
        B = len(ends)
        starts = [0] + ends[:-1]
        q_rows = [(s, e) for s, e in zip(starts, ends)]
        q_lens = [e - s for s, e in q_rows]
        S_q = None
    else:
        if layout == "BSH":
            B, S_q, H = q.shape
            if H % n_q:
                fail(_NAME, f"BSH query hidden {H} is not divisible by num_heads {n_q}")
            D = H // n_q
        elif layout == "BSND":
            B, S_q, qn, D = q.shape
        else:
            B, qn, S_q, D = q.shape
        if layout in ("BSND", "BNSD") and qn != n_q:
            fail(_NAME, f"{layout} query has {qn} heads but num_heads={n_q}")
        q_lens = _per_batch("actual_seq_lengths",
                            int_list(_NAME, "actual_seq_lengths", actual_seq_lengths,
                                     optional=True), B, S_q)
        if B > 65536:
            fail(_NAME, f"B must be <= 65536, got {B}")
    if D > 512 or (D * q.element_size()) % 16:
        fail(_NAME, f"head dim D={D} must be <= 512 and 16-byte aligned")

    # ---------------- keys/values: per-batch [Lk, KV_N, D] ----------------
    kv_lens_raw = int_list(_NAME, "actual_seq_lengths_kv", actual_seq_lengths_kv, optional=True)
    if paged:
        btab = tensor(_NAME, "block_table", block_table, dtypes=(torch.int32,), dims=(2,))
        if kv_lens_raw is None:
            fail(_NAME, "actual_seq_lengths_kv is required with PageAttention (block_table)")
        if bs <= 0:
            fail(_NAME, f"block_size must be > 0 with PageAttention, got {bs}")
        if tnd:
            if len(kv_lens_raw) != B:
                fail(_NAME, f"TND: actual_seq_lengths_kv must have one element per request "
                            f"(B={B}), got {len(kv_lens_raw)}")
            kv_lens = list(kv_lens_raw)  # PA: batch mode (per-request lengths) [A]
        else:
            kv_lens = _per_batch("actual_seq_lengths_kv", kv_lens_raw, B, 1 << 62)
        if any(x < 0 for x in kv_lens):
            fail(_NAME, f"actual_seq_lengths_kv must be non-negative, got {kv_lens}")
        if tuple(k.shape) != tuple(v.shape):
            fail(_NAME, f"key and value caches must have one shape, got {list(k.shape)} and "
                        f"{list(v.shape)}")
        max_q = max(q_lens) if q_lens else 0
        if (S_q is not None and S_q > 1) or (tnd and max_q > 1):
            if bs % 128 or not 128 <= bs <= 512:
                fail(_NAME, f"PageAttention with Q_S > 1 needs block_size a multiple of 128 in "
                            f"[128, 512], got {bs}")
        elif bs > 512:
            fail(_NAME, f"PageAttention block_size must be <= 512, got {bs}")
        if tnd and bs not in (128, 512, 1024):
            fail(_NAME, f"TND PageAttention on Atlas A2 supports block_size 128, 512 or 1024 "
                        f"only, got {bs}")
        if k.dim() == 3:  # BnBsH
            nb, kbs, hkv = k.shape
            if kbs != bs or hkv != n_kv * D:
                fail(_NAME, f"BnBsH key/value cache must be (blocknum, block_size={bs}, "
                            f"KV_N*D={n_kv * D}), got {list(k.shape)}")
            if hkv > 65535:
                fail(_NAME, f"BnBsH cache with KV_N*D = {hkv} > 65535 is rejected; use GQA or the "
                            f"(blocknum, KV_N, blocksize, D) layout")
        elif k.dim() == 4:  # BnNBsD
            if layout in ("BSH", "BSND"):
                fail(_NAME, f"with input_layout {layout} the paged cache must be BnBsH "
                            f"(blocknum, blocksize, H), got 4-D {list(k.shape)}")
            nb, kn, kbs, kd = k.shape
            if kn != n_kv or kbs != bs or kd != D:
                fail(_NAME, f"BnNBsD key/value cache must be (blocknum, KV_N={n_kv}, "
                            f"block_size={bs}, D={D}), got {list(k.shape)}")
        else:
            fail(_NAME, f"paged key/value must be 3-D (blocknum, blocksize, H) or 4-D "
                        f"(blocknum, KV_N, blocksize, D), got {list(k.shape)}")
        if btab.shape[0] != B:
            fail(_NAME, f"block_table first dim must equal the batch B={B}, got "
                        f"{list(btab.shape)}")
        need = [(L + bs - 1) // bs for L in kv_lens]
        if need and btab.shape[1] < max(need):
            fail(_NAME, f"block_table second dim {btab.shape[1]} is smaller than "
                        f"maxBlockNumPerSeq {max(need)}")
        if sum(need) > nb:
            fail(_NAME, f"blocknum {nb} is smaller than the blocks the batches need "
                        f"({sum(need)})")
        kv_slices = []
        for b, (L, nblk) in enumerate(zip(kv_lens, need)):
            ids = btab[b, :nblk].long()
            if nblk and (int(ids.min()) < 0 or int(ids.max()) >= nb):
                fail(_NAME, f"block_table[{b}] references block ids outside [0, {nb}): "
                            f"{ids.tolist()}")
            if k.dim() == 3:
                kb = k[ids].reshape(nblk * bs, n_kv, D)[:L]
                vb = v[ids].reshape(nblk * bs, n_kv, D)[:L]
            else:
                kb = k[ids].permute(0, 2, 1, 3).reshape(nblk * bs, n_kv, D)[:L]
                vb = v[ids].permute(0, 2, 1, 3).reshape(nblk * bs, n_kv, D)[:L]
            kv_slices.append((kb, vb))
        d_v = D
    else:
        if bs != 0:
            fail(_NAME, f"block_size={bs} given without block_table (PageAttention is enabled "
                        f"by block_table)")
        if tnd:
            tensor(_NAME, "key", k, dims=(3,))
            tensor(_NAME, "value", v, dims=(3,))
            if kv_lens_raw is None:
                fail(_NAME, "actual_seq_lengths_kv is required for input_layout TND "
                            "(cumulative KV ends without PageAttention)")
            if len(kv_lens_raw) != B:
                fail(_NAME, f"TND: actual_seq_lengths_kv must have B={B} elements, got "
                            f"{len(kv_lens_raw)}")
            _check_ints_nondecreasing("actual_seq_lengths_kv", kv_lens_raw)
            if kv_lens_raw[-1] != k.shape[0]:
                fail(_NAME, f"TND actual_seq_lengths_kv must end at key.shape[0]={k.shape[0]}, "
                            f"got {kv_lens_raw[-1]}")
            if k.shape[1] != n_kv or v.shape[:2] != k.shape[:2]:
                fail(_NAME, f"TND key/value must be (T_kv, KV_N={n_kv}, D), got "
                            f"{list(k.shape)}/{list(v.shape)}")
            kstarts = [0] + kv_lens_raw[:-1]
            kv_slices = [(k[s:e], v[s:e]) for s, e in zip(kstarts, kv_lens_raw)]
            kv_lens = [e - s for s, e in zip(kstarts, kv_lens_raw)]
            d_v = v.shape[2]
        else:
            rank = 3 if layout == "BSH" else 4
            tensor(_NAME, "key", k, dims=(rank,))
            if tuple(k.shape) != tuple(v.shape):
                fail(_NAME, f"key and value shapes must be identical, got {list(k.shape)} and "
                            f"{list(v.shape)}")
            if layout == "BSH":
                kb_, S_kv, hkv = k.shape
                if hkv != n_kv * D:
                    fail(_NAME, f"BSH key hidden must be KV_N*D = {n_kv * D}, got {hkv}")
                kk = k.view(kb_, S_kv, n_kv, D)
                vv = v.view(kb_, S_kv, n_kv, D)
            elif layout == "BSND":
                kb_, S_kv, kn, kd = k.shape
                kk, vv = k, v
            else:
                kb_, kn, S_kv, kd = k.shape
                kk, vv = k.transpose(1, 2), v.transpose(1, 2)
            if layout != "BSH" and (kn != n_kv or kd != D):
                fail(_NAME, f"{layout} key must have KV_N={n_kv} heads of D={D}, got "
                            f"{list(k.shape)}")
            if kb_ != B:
                fail(_NAME, f"key batch {kb_} differs from query batch {B}")
            kv_lens = _per_batch("actual_seq_lengths_kv", kv_lens_raw, B, S_kv)
            kv_slices = [(kk[b, :L], vv[b, :L]) for b, L in enumerate(kv_lens)]
            d_v = D
    if tnd:
        qd, kd_, vd = D, (kv_slices[0][0].shape[-1] if kv_slices else D), d_v
        if q.dtype != torch.bfloat16:
            fail(_NAME, f"TND with D != 512 supports BFLOAT16 query/key/value only on Atlas A2, "
                        f"got {dt(q)}")
        ok = (qd, kd_, vd) == (128, 128, 128) or (qd == kd_ == 192 and vd in (128, 192))
        if not ok or (vd == 192 and (paged or n_kv != n_q)):
            fail(_NAME, f"TND without rope needs Q_D = K_D = V_D = 128 (or Q_D = K_D = 192 and "
                        f"V_D 128/192, no V_D 192 with GQA/PA), got {qd}/{kd_}/{vd}")

    # ---------------- mask rule ----------------
    incre = (not tnd) and S_q == 1  # IncreFlashAttention branch: sparse_mode has no effect
    if sm in (2, 3) and not incre:
        _check_compressed_mask(atten_mask, sm)
    elif sm == 0 and atten_mask is not None:
        unsupported(_NAME, "a user atten_mask with sparse_mode 0")
    rule = "none" if incre or sm == 0 else ("right_down" if sm == 3 else "left_up")

    # ---------------- compute ----------------
    group = n_q // n_kv
    outs, lses = [], []
    for b in range(B):
        if tnd:
            s0, s1 = q_rows[b]
            qb = q[s0:s1]
        elif layout == "BSH":
            qb = q[b, :q_lens[b]].view(q_lens[b], n_q, D)
        elif layout == "BSND":
            qb = q[b, :q_lens[b]]
        else:
            qb = q[b, :, :q_lens[b]].transpose(0, 1)
        kb, vb = kv_slices[b]
        Lq, Lk = qb.shape[0], kb.shape[0]
        qf = qb.float()
        kf = kb.float().repeat_interleave(group, dim=1)
        vf = vb.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qf, kf) * sc  # [Q_N, Lq, Lk]
        i = torch.arange(Lq).unsqueeze(1)
        j = torch.arange(Lk).unsqueeze(0)
        if rule == "right_down":
            visible = j <= i + (Lk - Lq)
        elif rule == "left_up":
            visible = j <= i
        else:
            visible = torch.ones(Lq, Lk, dtype=torch.bool)
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1) if Lk else torch.full((n_q, Lq), float("-inf"))
        valid = visible.any(dim=-1)  # [Lq]; rows without keys -> zeros (invalid-row rule)
        probs = torch.softmax(scores, dim=-1) if Lk else scores.new_zeros(n_q, Lq, 0)
        probs = torch.where(valid.view(1, Lq, 1), probs, torch.zeros_like(probs))
        out = torch.einsum("hqk,khd->qhd", probs, vf)  # [Lq, Q_N, Dv]
        outs.append(out)
        lses.append(lse.transpose(0, 1))  # [Lq, Q_N]

    if tnd:
        T = q.shape[0]
        attn = torch.cat(outs, 0) if outs else q.new_zeros(0, n_q, d_v, dtype=torch.float32)
        attn = attn.to(q.dtype).reshape(T, n_q, d_v)
        lse_out = (torch.cat(lses, 0).unsqueeze(-1) if lses
                   else torch.zeros(0, n_q, 1)).float()
    else:
        full = fill_undefined((B, S_q, n_q, d_v), torch.float32)  # rows past actual length
        lse_full = fill_undefined((B, S_q, n_q), torch.float32)
        for b in range(B):
            full[b, :q_lens[b]] = outs[b]
            lse_full[b, :q_lens[b]] = lses[b]
        full = full.to(q.dtype)
        if layout == "BSH":
            attn = full.reshape(B, S_q, n_q * d_v)
        elif layout == "BSND":
            attn = full
        else:
            attn = full.transpose(1, 2).contiguous()
        lse_out = lse_full.transpose(1, 2).unsqueeze(-1).contiguous()
    if not want_lse:
        lse_out = torch.zeros(1, dtype=torch.float32)
    return attn, lse_out


# --------------------------------------------------------------------------------------------
# The ``.out`` overload and the workspace query (graph capture)
# --------------------------------------------------------------------------------------------
# Sources: op-plugin ``op_plugin_functions.yaml`` (schemas of
# ``npu_fused_infer_attention_score.out(..., Tensor? workspace=None, Tensor(a!) attention_out,
# Tensor(b!) softmax_lse)`` and ``_npu_fused_infer_attention_score_get_max_workspace(<the
# functional arguments>) -> Tensor``), and the example of the ``graph_task_group_begin`` /
# ``graph_task_update_begin`` pages (torch_npu-npu-graph_task_group_begin.md,
# torch_npu-npu-graph_task_update_begin.md): inside a graph capture the workspace is queried
# with the call's arguments, ``output`` and a one-element ``softmax_lse`` are allocated, and
# ``npu_fused_infer_attention_score.out(q, k, v, workspace=workspace, ..., out=[output,
# softmax_lse])`` writes them. Neither has a page of its own: what the emulator checks is what
# the schema says (two out tensors: the attention output of the functional call's shape and
# dtype, the lse), and op-plugin's implementation (the workspace is a 1-D tensor of query's
# dtype).

WORKSPACE_NUMEL = 1 << 16      # the emulated size: any 1-D tensor of query's dtype is accepted


def _npu_fused_infer_attention_score_get_max_workspace(query, key, value, **kwargs):
    """The workspace a graph-captured ``.out`` call of these arguments needs (1-D, query's
    dtype). The arguments are checked as the functional call checks them."""
    npu_fused_infer_attention_score(query, key, value, **kwargs)
    return torch.zeros(WORKSPACE_NUMEL, dtype=query.dtype)


_npu_fused_infer_attention_score_get_max_workspace = op(_npu_fused_infer_attention_score_get_max_workspace)


def npu_fused_infer_attention_score_out(query, key, value, *, workspace=None, out=None, **kwargs):
    """``npu_fused_infer_attention_score.out``: the functional call's results written into
    ``out = [attention_out, softmax_lse]`` (returned). ``workspace``: None or a 1-D tensor of
    query's dtype (``_npu_fused_infer_attention_score_get_max_workspace``)."""
    name = _NAME + ".out"
    if workspace is not None:
        tensor(name, "workspace", workspace, dtypes=(query.dtype,), dims=(1,))
    if not isinstance(out, (list, tuple)) or len(out) != 2:
        raise TypeError(f"torch_npu.{name}(): 'out' must be a list [attention_out, softmax_lse]")
    attn_out, lse_out = out
    attn, lse = npu_fused_infer_attention_score(query, key, value, **kwargs)
    tensor(name, "attention_out", attn_out, dtypes=(attn.dtype,))
    if tuple(attn_out.shape) != tuple(attn.shape):
        fail(name, f"attention_out must have shape {list(attn.shape)}, got {list(attn_out.shape)}")
    tensor(name, "softmax_lse", lse_out)
    if lse_out.numel() != lse.numel():
        fail(name, f"softmax_lse must hold {lse.numel()} element(s), got {lse_out.numel()}")
    attn_out.copy_(attn)
    lse_out.copy_(lse.reshape(lse_out.shape).to(lse_out.dtype))
    return attn_out, lse_out


npu_fused_infer_attention_score_out.__name__ = _NAME + ".out"
OUT_OVERLOADS = {_NAME: npu_fused_infer_attention_score_out}
