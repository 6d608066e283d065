"""Mixture-of-experts routing kernels.

Sources (op-plugin ``docs/zh/custom_APIs/torch_npu/``): torch_npu-npu_moe_gating_top_k_softmax.md,
torch_npu-npu_moe_init_routing.md, torch_npu-npu_moe_init_routing_v2.md (formulas, parameter
text and its "等价计算逻辑" reference), torch_npu-npu_moe_finalize_routing.md; for
npu_moe_token_unpermute (no torch_npu page in op-plugin's docs) the aclnnMoeTokenUnpermute page
(hiascend CANN 8.x "aclnnMoeTokenUnpermute", ops-transformer moe/moe_token_unpermute) and the
op schema ``npu_moe_token_unpermute(Tensor permuted_tokens, Tensor sorted_indices, Tensor? probs
=None, bool padded_mode=False, int[]? restore_shape=None) -> Tensor``.

Index conventions (the part most easily got wrong):
  * gating_top_k_softmax row_idx: rowIdxOut = arange(N*k).reshape(k, N).transpose(1, 0), i.e.
    row_idx[i, j] = j * N + i (column-major numbering of the (token, slot) pairs).
  * init_routing (v1): sorted by expert_idx (flattened row-major, stable), sorted_row_idx[i] =
    row_idx.flat[order[i]]; expanded_row_idx[sorted_row_idx[i]] = i;
    expanded_x[i] = x[sorted_row_idx[i] % num_rows].
  * init_routing_v2: pairs numbered p = t * K + j (row-major flatten of expert_idx, "rowIdx"),
    keyValueSort(expertIdx, rowIdx) -> sortedRowIdx (stable: the reference uses
    np.argsort(kind="stable")); expanded_x[i] = x[sortedRowIdx[i] // K];
    row_idx_type 0 ("gather index", default): expanded_row_idx[sortedRowIdx[i]] = i, -1 for pairs
    outside active_expert_range; row_idx_type 1 ("scatter index"): expanded_row_idx[i] =
    sortedRowIdx[i]. expert_tokens_num_type 0 = cumsum, 1 = counts, 2 = (expert, count) pairs.
  * token_unpermute: T[k] = T[S[k]]; O[i] = sum_{k=i*topK}^{(i+1)*topK-1} T[k] * P[i][k-i*topK]:
    sorted_indices[k] is the row of permuted_tokens that holds pair k = i*topK + j (a gather
    index, row-major pairs) -- exactly init_routing_v2's row_idx_type 0 output.
  * finalize_routing: out[i] = skip1[i] + skip2[i] + sum_k scales[i,k] *
    (rows[expanded_src_to_dst_row[i + k*num_rows]] + bias[expert_for_source_row[i,k]]) for
    drop_pad_mode 0/1 ("按列排列", column-major pairs); drop_pad_mode 2/3 use row-major pairs
    (i*K + k, "按行排列"). In drop modes an index of -1 contributes a zero row (bias still added,
    as in the page's reference).
"""

from __future__ import annotations

import torch

from ._base import (FLOAT_TYPES, boolean, fail, fill_undefined, int_list, integer, op,
                    tensor, unsupported)

# --------------------------------------------------------------------------------------------
# gating
# --------------------------------------------------------------------------------------------


@op
def npu_moe_gating_top_k_softmax(x, finished=None, k=1):
    """(y, expert_idx, row_idx): y = topK(softmax(x, -1)) in x's dtype, expert_idx int32,
    row_idx int32 (column-major pair ids, see module docstring).

    Doc: x 2-D/3-D float16/bfloat16/float32; finished bool of x.shape[:-1] marks rows that "do
    not take part" (their outputs are not specified: rows marked True are not emulated);
    0 < k <= E, k <= 1024. Order among equal probabilities is not documented: lower expert id
    first here (a stable sort).
    """
    name = "npu_moe_gating_top_k_softmax"
    xt = tensor(name, "x", x, dtypes=FLOAT_TYPES, dims=(2, 3))
    kk = integer(name, "k", k)
    E = xt.shape[-1]
    if not 0 < kk <= E or kk > 1024:
        fail(name, f"k must satisfy 0 < k <= {E} (experts) and k <= 1024, got {kk}")
    fin = tensor(name, "finished", finished, dtypes=(torch.bool,), optional=True)
    if fin is not None:
        if tuple(fin.shape) != tuple(xt.shape[:-1]):
            fail(name, f"finished must have shape {list(xt.shape[:-1])}, got {list(fin.shape)}")
        if bool(fin.any()):
            unsupported(name, "rows marked finished=True (their output is not specified)")
    probs = torch.softmax(xt.float(), dim=-1)
    vals, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    y = vals[..., :kk].to(xt.dtype)
    expert_idx = idx[..., :kk].to(torch.int32)
    n = expert_idx.numel() // kk
    row_idx = torch.arange(n * kk, dtype=torch.int32).reshape(kk, n).transpose(0, 1)
    return y, expert_idx, row_idx.reshape(expert_idx.shape).contiguous()


# --------------------------------------------------------------------------------------------
# init routing
# --------------------------------------------------------------------------------------------


@op
def npu_moe_init_routing(x, row_idx, expert_idx, active_num):
    """(expanded_x, expanded_row_idx, expanded_expert_idx), v1 semantics (module docstring).

    Doc: x 2-D float16/bfloat16/float32 (numel < 2^24); row_idx int32 of expert_idx's shape;
    expert_idx 2-D int32 (NUM_ROWS, K); active_num required int; expanded_x has
    min(NUM_ROWS, active_num) * K rows.
    """
    name = "npu_moe_init_routing"
    xt = tensor(name, "x", x, dtypes=FLOAT_TYPES, dims=(2,))
    ri = tensor(name, "row_idx", row_idx, dtypes=(torch.int32,), dims=(2,))
    ei = tensor(name, "expert_idx", expert_idx, dtypes=(torch.int32,), dims=(2,))
    an = integer(name, "active_num", active_num)
    if xt.numel() >= 2 ** 24:
        fail(name, f"x must have fewer than 2^24 elements, got {xt.numel()}")
    N, K = ei.shape
    if ri.shape != ei.shape or xt.shape[0] != N:
        fail(name, f"row_idx {list(ri.shape)} must match expert_idx {list(ei.shape)} and x "
                   f"must have {N} rows, got {list(xt.shape)}")
    if an < 0:
        fail(name, f"active_num must be >= 0, got {an}")
    flat = ei.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    sorted_row = ri.reshape(-1).long()[order]
    if sorted(sorted_row.tolist()) != list(range(N * K)):
        fail(name, "row_idx must be a permutation of 0 .. NUM_ROWS*K-1")
    expanded_row_idx = torch.empty(N * K, dtype=torch.int32)
    expanded_row_idx[sorted_row] = torch.arange(N * K, dtype=torch.int32)
    rows = min(an, N) * K
    expanded_x = xt[sorted_row[:rows] % N]
    return expanded_x, expanded_row_idx, flat[order].to(torch.int32)


@op
def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1,
                            expert_capacity=-1, expert_num=-1, drop_pad_mode=0,
                            expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=[], row_idx_type=0):
    """(expanded_x, expanded_row_idx, expert_token_cumsum_or_count, expanded_scale).

    Doc: x 2-D (NUM_ROWS, H) float16/bfloat16/float32/int8; expert_idx 2-D (NUM_ROWS, K) int32,
    ids must not exceed the expert count; active_num >= -1 (-1/0: all rows); expert_num in
    [0, 10240] ([0, 5120] in key_value mode); drop_pad_mode 0 (dropless) / 1 (drop-pad, needs
    0 < expert_capacity <= NUM_ROWS); expert_tokens_num_type 0 cumsum / 1 count / 2 key_value;
    quant_mode -1 none / 0 static (x*scale + offset) / 1 dynamic int8 (others not emulated);
    active_expert_range [start, end) with 0 <= start < end <= expert_num, [] = [0, expert_num];
    row_idx_type 0 gather / 1 scatter. expanded_row_idx int32 (NUM_ROWS*K,); counts int64.
    expanded_scale: fp32; with quant_mode -1 it is scale[row] per expanded row when scale is
    given, otherwise "无意义" (NaN here); dynamic quant: the per-row quant scale; static: not
    output (an empty tensor here). expert_tokens_num_flag=False: no count output (empty int64).
    The page does not say what an unset expert_num with an empty range means: both unset is
    rejected here.
    """
    name = "npu_moe_init_routing_v2"
    xt = tensor(name, "x", x, dtypes=FLOAT_TYPES + (torch.int8,), dims=(2,))
    ei = tensor(name, "expert_idx", expert_idx, dtypes=(torch.int32,), dims=(2,))
    an = integer(name, "active_num", active_num)
    cap = integer(name, "expert_capacity", expert_capacity)
    en = integer(name, "expert_num", expert_num)
    dpm = integer(name, "drop_pad_mode", drop_pad_mode, choices=(0, 1))
    ttype = integer(name, "expert_tokens_num_type", expert_tokens_num_type, choices=(0, 1, 2))
    tflag = boolean(name, "expert_tokens_num_flag", expert_tokens_num_flag)
    qm = integer(name, "quant_mode", quant_mode)
    if qm not in (-1, 0, 1):
        if qm in (2, 3, 6, 7, 8, 9, 11, 12, 13, 16, 17):
            unsupported(name, f"quant_mode={qm}")
        fail(name, f"quant_mode {qm} is not a documented mode")
    rng = int_list(name, "active_expert_range", active_expert_range)
    rit = integer(name, "row_idx_type", row_idx_type, choices=(0, 1))
    N, K = ei.shape
    if xt.shape[0] != N:
        fail(name, f"x has {xt.shape[0]} rows but expert_idx has {N}")
    H = xt.shape[1]
    if an < -1:
        fail(name, f"active_num must be >= -1, got {an}")
    if en != -1 and not 0 <= en <= (5120 if ttype == 2 else 10240):
        fail(name, f"expert_num must lie in [0, {5120 if ttype == 2 else 10240}], got {en}")
    if rng:
        if len(rng) != 2 or not 0 <= rng[0] < rng[1] or (en >= 0 and rng[1] > en):
            fail(name, f"active_expert_range must be [start, end) with 0 <= start < end <= "
                       f"expert_num ({en}), got {rng}")
        start, end = rng
    else:
        if en <= 0:
            fail(name, "pass expert_num (> 0) or active_expert_range: with both at their "
                       "defaults the expert range is undefined")
        start, end = 0, en
    n_range = end - start
    ids = ei.reshape(-1).long()
    limit = en if en > 0 else end
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        fail(name, f"expert ids must lie in [0, {limit}) (below the expert count), got "
                   f"[{int(ids.min())}, {int(ids.max())}]")
    if dpm == 1:
        if rit != 0:
            fail(name, "drop_pad_mode 1 requires row_idx_type 0")
        if (start, end) != (0, en):
            fail(name, "drop_pad_mode 1 requires active_expert_range = [0, expert_num]")
        if not 0 < cap <= N:
            fail(name, f"drop_pad_mode 1 needs 0 < expert_capacity <= NUM_ROWS ({N}), got {cap}")

    # ---- quantisation of the source rows ----
    exp_scale_src = None
    if qm == 0:
        if xt.dtype == torch.int8:
            fail(name, "static quantisation of an int8 x is meaningless")
        sc = tensor(name, "scale", scale, dtypes=(torch.float32,), dims=(1,))
        of = tensor(name, "offset", offset, dtypes=(torch.float32,), dims=(1,))
        if sc.shape[0] != 1 or of.shape[0] != 1:
            fail(name, "static quant_mode 0 needs scale and offset of shape (1,)")
        src = torch.round(xt.float() * sc + of).clamp(-128, 127).to(torch.int8)
    elif qm == 1:
        if offset is not None:
            fail(name, "dynamic quant_mode 1 takes no offset")
        src = xt
        sc = tensor(name, "scale", scale, dtypes=(torch.float32,), dims=(2,), optional=True)
        if sc is not None and tuple(sc.shape) not in ((n_range, H), (1, H)):
            fail(name, f"dynamic quant scale must be ({n_range}, {H}) or (1, {H}), got "
                       f"{list(sc.shape)}")
    else:
        if offset is not None:
            fail(name, "offset is only used by static quantisation (quant_mode 0)")
        src = xt
        sc = tensor(name, "scale", scale, dtypes=(torch.float32,), dims=(1,), optional=True)
        if sc is not None and sc.shape[0] != N:
            fail(name, f"without quantisation scale must be (NUM_ROWS,) = ({N},), got "
                       f"{list(sc.shape)}")
        exp_scale_src = sc

    # ---- sort the (token, slot) pairs by expert ----
    in_range = (ids >= start) & (ids < end)
    keys = torch.where(ids < start, torch.full_like(ids, 2 ** 31 - 1), ids)
    order = torch.sort(keys, stable=True).indices  # sortedRowIdx
    sorted_ids = ids[order]
    avail = int(in_range.sum())
    counts = torch.bincount(sorted_ids[:avail] - start, minlength=n_range).to(torch.int64)

    if dpm == 0:
        if rit == 1:
            expanded_row_idx = order.to(torch.int32)
        else:
            expanded_row_idx = torch.full((N * K,), -1, dtype=torch.int32)
            expanded_row_idx[order[:avail]] = torch.arange(avail, dtype=torch.int32)
        rows = N * K if an in (-1, 0) else min(an, N * K)
        valid = min(rows, avail)
        src_rows = order[:valid] // K
        out_dtype = torch.int8 if qm in (0, 1) else xt.dtype
        expanded_x = fill_undefined((rows, H), out_dtype)
        if qm == 1:
            xs = xt[src_rows].float()
            if sc is not None:
                xs = xs * (sc if sc.shape[0] == 1 else sc[sorted_ids[:valid] - start])
            qscale = xs.abs().amax(dim=-1) / 127.0
            safe = torch.where(qscale > 0, qscale, torch.ones_like(qscale))
            expanded_x[:valid] = torch.round(xs / safe.unsqueeze(-1)).clamp(-128, 127) \
                .to(torch.int8)
            expanded_scale = fill_undefined((rows,), torch.float32)
            expanded_scale[:valid] = qscale
        else:
            expanded_x[:valid] = src[src_rows]
            if qm == 0:
                expanded_scale = torch.empty(0, dtype=torch.float32)
            else:
                expanded_scale = fill_undefined((rows,), torch.float32)
                if exp_scale_src is not None:
                    expanded_scale[:valid] = exp_scale_src[src_rows]
    else:
        # drop-pad: each expert keeps its first `cap` pairs (in sorted order), zero padding
        slot_of = torch.full((N * K,), -1, dtype=torch.long)
        seen = [0] * en
        for i in range(avail):
            e = int(sorted_ids[i])
            if seen[e] < cap:
                slot_of[order[i]] = e * cap + seen[e]
                seen[e] += 1
        expanded_row_idx = slot_of.to(torch.int32)
        out_dtype = torch.int8 if qm in (0, 1) else xt.dtype
        expanded_x = torch.zeros(en * cap, H, dtype=out_dtype)
        kept = (slot_of >= 0).nonzero().flatten()
        dst = slot_of[kept]
        if qm == 1:
            xs = xt[kept // K].float()
            if sc is not None:
                xs = xs * (sc if sc.shape[0] == 1 else sc[dst // cap])
            qscale = xs.abs().amax(dim=-1) / 127.0
            safe = torch.where(qscale > 0, qscale, torch.ones_like(qscale))
            expanded_x[dst] = torch.round(xs / safe.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
            expanded_scale = torch.zeros(en * cap, dtype=torch.float32)
            expanded_scale[dst] = qscale
        else:
            expanded_x[dst] = src[kept // K]
            expanded_scale = torch.zeros(en * cap, dtype=torch.float32)
            if exp_scale_src is not None:
                expanded_scale[dst] = exp_scale_src[kept // K]
            elif qm == 0:
                expanded_scale = torch.empty(0, dtype=torch.float32)
        expanded_x = expanded_x.reshape(en, cap, H)

    if not tflag:
        tokens = torch.empty(0, dtype=torch.int64)
    elif dpm == 1 or ttype == 1:
        tokens = counts
    elif ttype == 0:
        tokens = torch.cumsum(counts, 0)
    else:
        limit_rows = en if en > 0 else n_range
        tokens = torch.zeros(limit_rows, 2, dtype=torch.int64)
        nz = (counts > 0).nonzero().flatten()
        tokens[:nz.numel(), 0] = nz + start
        tokens[:nz.numel(), 1] = counts[nz]
    return expanded_x, expanded_row_idx, tokens, expanded_scale


# --------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------


@op
def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False,
                            restore_shape=None):
    """out[i] = sum_j probs[i, j] * permuted_tokens[sorted_indices[i*topK + j]].

    aclnnMoeTokenUnpermute: permutedTokens (tokens*topK, hidden) bfloat16/float16/float32;
    sortedIndices (tokens*topK,) int32, values in [0, tokens*topK - 1], no duplicates; probs
    (tokens, topK) bfloat16/float16/float32, topK = probs.shape[1] (1 without probs); output in
    permuted_tokens' dtype. padded_mode=True (with restore_shape) is not emulated.
    Accumulation in fp32 (not documented).
    """
    name = "npu_moe_token_unpermute"
    pt = tensor(name, "permuted_tokens", permuted_tokens, dtypes=FLOAT_TYPES, dims=(2,))
    si = tensor(name, "sorted_indices", sorted_indices, dtypes=(torch.int32,), dims=(1,))
    pr = tensor(name, "probs", probs, dtypes=FLOAT_TYPES, dims=(2,), optional=True)
    if boolean(name, "padded_mode", padded_mode):
        unsupported(name, "padded_mode=True")
    if restore_shape is not None:
        int_list(name, "restore_shape", restore_shape)
    n = si.shape[0]
    if pt.shape[0] != n:
        fail(name, f"permuted_tokens has {pt.shape[0]} rows but sorted_indices {n} elements")
    topk = 1 if pr is None else pr.shape[1]
    if pr is not None and pr.numel() != n:
        fail(name, f"probs {list(pr.shape)} must be (tokens, topK) with tokens*topK = {n}")
    s = si.long()
    if n and (int(s.min()) < 0 or int(s.max()) >= n):
        fail(name, f"sorted_indices values must lie in [0, {n - 1}], got "
                   f"[{int(s.min())}, {int(s.max())}]")
    if s.unique().numel() != n:
        fail(name, "sorted_indices must not hold duplicate indices")
    gathered = pt.float()[s].view(n // topk, topk, pt.shape[1])
    if pr is not None:
        gathered = gathered * pr.float().unsqueeze(-1)
    return gathered.sum(dim=1).to(pt.dtype)


@op
def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales,
                             expanded_src_to_dst_row, export_for_source_row, /, drop_pad_mode=0):
    """The weighted combine of npu_moe_finalize_routing (formula in the module docstring).

    Doc: expanded_permuted_rows float16/bfloat16/float32, (NUM_ROWS*K, H) for drop_pad_mode 0/2,
    (E, C, H) for 1/3; skip1/skip2/bias/scales required positionally but may be None, of the
    rows' dtype; skip2 needs skip1; bias (E, H); scales (NUM_ROWS, K) (K = 1 without scales);
    expanded_src_to_dst_row int32 (NUM_ROWS*K,) in [0, NUM_ROWS*K-1] (modes 0/2) or [-1, E*C-1]
    (1/3); expert_for_source_row int32 (NUM_ROWS, K) in [0, E-1]. The first seven parameters are
    positional-only: the page names the seventh ``expert_for_source_row``, the op schema
    ``export_for_source_row``. Output (NUM_ROWS, H) in the rows' dtype; fp32 accumulation.
    """
    name = "npu_moe_finalize_routing"
    dpm = integer(name, "drop_pad_mode", drop_pad_mode, choices=(0, 1, 2, 3))
    rows = tensor(name, "expanded_permuted_rows", expanded_permuted_rows, dtypes=FLOAT_TYPES,
                  dims=(3,) if dpm in (1, 3) else (2,))
    s1 = tensor(name, "skip1", skip1, dtypes=(rows.dtype,), dims=(2,), optional=True)
    s2 = tensor(name, "skip2", skip2, dtypes=(rows.dtype,), dims=(2,), optional=True)
    bi = tensor(name, "bias", bias, dtypes=(rows.dtype,), dims=(2,), optional=True)
    sc = tensor(name, "scales", scales, dtypes=(rows.dtype,), dims=(2,), optional=True)
    idx = tensor(name, "expanded_src_to_dst_row", expanded_src_to_dst_row,
                 dtypes=(torch.int32,), dims=(1,))
    efr = tensor(name, "expert_for_source_row", export_for_source_row, dtypes=(torch.int32,),
                 dims=(2,), optional=True)
    if s1 is None and s2 is not None:
        fail(name, "skip2 must be None when skip1 is None")
    H = rows.shape[-1]
    flat_rows = rows.reshape(-1, H).float()
    NK = idx.shape[0]
    K = 1 if sc is None else sc.shape[1]
    if NK % K:
        fail(name, f"expanded_src_to_dst_row length {NK} is not a multiple of K={K}")
    N = NK // K
    for nm, t in (("skip1", s1), ("skip2", s2)):
        if t is not None and tuple(t.shape) != (N, H):
            fail(name, f"{nm} must be (NUM_ROWS, H) = ({N}, {H}), got {list(t.shape)}")
    if sc is not None and sc.shape[0] != N:
        fail(name, f"scales must be (NUM_ROWS, K) = ({N}, {K}), got {list(sc.shape)}")
    if dpm in (0, 2) and rows.shape[0] != NK:
        fail(name, f"expanded_permuted_rows must have NUM_ROWS*K = {NK} rows, got "
                   f"{rows.shape[0]}")
    lo = -1 if dpm in (1, 3) else 0
    hi = flat_rows.shape[0] - 1
    li = idx.long()
    if NK and (int(li.min()) < lo or int(li.max()) > hi):
        fail(name, f"expanded_src_to_dst_row values must lie in [{lo}, {hi}], got "
                   f"[{int(li.min())}, {int(li.max())}]")
    if bi is not None:
        E = bi.shape[0]
        if bi.shape[1] != H:
            fail(name, f"bias must be (E, H) with H={H}, got {list(bi.shape)}")
        if efr is None:
            fail(name, "expert_for_source_row is required with bias")
        if tuple(efr.shape) != (N, K):
            fail(name, f"expert_for_source_row must be (NUM_ROWS, K) = ({N}, {K}), got "
                       f"{list(efr.shape)}")
        if efr.numel() and (int(efr.min()) < 0 or int(efr.max()) >= E):
            fail(name, f"expert_for_source_row values must lie in [0, {E - 1}]")
    out = torch.zeros(N, H, dtype=torch.float32)
    if s1 is not None:
        out += s1.float()
    if s2 is not None:
        out += s2.float()
    i = torch.arange(N)
    for kk in range(K):
        pair = i + kk * N if dpm in (0, 1) else i * K + kk
        src = li[pair]
        vals = torch.where((src >= 0).unsqueeze(-1), flat_rows[src.clamp(min=0)],
                           torch.zeros(N, H))
        if bi is not None:
            vals = vals + bi.float()[efr[:, kk].long()]
        w = 1.0 if sc is None else sc[:, kk].float().unsqueeze(-1)
        out += w * vals
    return out.to(rows.dtype)
