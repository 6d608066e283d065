"""``npu_grouped_matmul``.

Sources: op-plugin ``torch_npu-npu_grouped_matmul.md`` (signature, table 2 "group_list为Tensor",
scenario table), ops-transformer ``gmm/grouped_matmul/docs/aclnnGroupedMatmulV4.md`` (A8W8
table, single-tensor scale shape (g, N), "groupListOptional中未指定的部分将不会参与更新").

Emulated scenarios (group_list a Tensor):
  * group_type -1 ("多多多"): x and weight lists of equal length, y_i = x_i @ w_i (+ bias_i),
    split_item 0/1, group_list None.
  * group_type 0, m-axis groups ("单单单"): one x [M, K], one weight [G, K, N], split_item 2/3,
    one output [M, N]; group_list int64, type 0 = cumsum (non-decreasing), type 1 = counts
    (non-negative, length != 1), type 2 = [[group, size], ...]; <= 1024 groups; the group sizes
    may sum to less than M (aclnn: "小于等于"), rows past the last group are not written
    (NaN here).
  * group_type 0 with a weight list ("单多单"): one x, G weights [K, N], <= 128 groups.
  List[int] group_list (older form: cumsum) is accepted for group_type None.
Dtypes (A2/A3 table 2): float16 x/w (bias float16) -> float16; bfloat16 x/w (bias float32) ->
bfloat16; float32 x/w (bias float32) -> float32 (single tensors only, ND weight only);
int8 x/w: perchannel (bias int32, scale int64 -> int8; scale bfloat16 -> bfloat16; scale
float32 -> float16), pertoken (per_token_scale float32; scale bfloat16 -> bfloat16, float32 ->
float16), no scale -> int32 (aclnn A8W8 table). output_dtype None means x's dtype (int8 for
int8 x, which needs an int64 scale). Formula 3 (pertoken): y = (x @ w + bias) * scale *
per_token_scale. K and N < 65536. Per-group scale for a single [G, K, N] weight: (G, N)
(perchannel) or (G,)/(G, 1) (pertensor). act_type other than 0, group_type 2, antiquant and
activation inputs are not emulated.
Precision: float paths accumulate in fp32 and round once; int8 paths accumulate exactly.
"""

from __future__ import annotations

import torch

from ._base import (FLOAT_TYPES, dt, fail, fill_undefined, integer, op, tensor, tensor_list,
                    unsupported)
from .formats import FRACTAL_NZ, format_of
from .quant import decode_quant_param, int_matmul

_NAME = "npu_grouped_matmul"
_INNER_LIMIT = 65536


def _group_sizes(gl, gl_type: int, groups: int, rows: int, max_groups: int) -> list[int]:
    if isinstance(gl, (list, tuple)):
        vals = [int(v) for v in gl]
        if len(vals) == 1 or any(b < a for a, b in zip([0] + vals, vals)):
            fail(_NAME, f"a List[int] group_list must be a non-negative increasing sequence "
                        f"of length != 1, got {vals}")
        sizes = [b - a for a, b in zip([0] + vals, vals)]
    else:
        g = tensor(_NAME, "group_list", gl, dtypes=(torch.int64,))
        if gl_type == 2:
            # [[group, size], ...]: rows are consumed in the listed order
            if g.dim() != 2 or g.shape[1] != 2:
                fail(_NAME, f"group_list_type 2 needs group_list of shape [E, 2], got "
                            f"{list(g.shape)}")
            pairs = [(int(a), int(b)) for a, b in g.tolist()]
            gids = [a for a, _ in pairs]
            if any(not 0 <= a < groups or b < 0 for a, b in pairs) or len(set(gids)) != len(gids):
                fail(_NAME, f"group_list_type 2 entries must be distinct [group, size>=0] with "
                            f"group in [0, {groups}), got {pairs}")
            if groups > max_groups:
                fail(_NAME, f"at most {max_groups} groups are supported, got {groups}")
            if sum(b for _, b in pairs) > rows:
                fail(_NAME, f"the groups cover {sum(b for _, b in pairs)} rows but x has only "
                            f"{rows}")
            return pairs
        if g.dim() != 1:
            fail(_NAME, f"group_list must be 1-D, got shape {list(g.shape)}")
        vals = g.tolist()
        if any(v < 0 for v in vals):
            fail(_NAME, f"group_list values must be non-negative, got {vals}")
        if gl_type == 0:
            if any(b < a for a, b in zip(vals, vals[1:])):
                fail(_NAME, f"group_list_type 0 (cumsum) needs a non-decreasing group_list, "
                            f"got {vals}")
            sizes = [b - a for a, b in zip([0] + vals, vals)]
        else:
            if len(vals) == 1:
                fail(_NAME, "group_list_type 1 (counts) does not allow a group_list of length 1")
            sizes = vals
    if len(sizes) != groups:
        fail(_NAME, f"group_list has {len(sizes)} groups but the weight has {groups}")
    if groups > max_groups:
        fail(_NAME, f"at most {max_groups} groups are supported, got {groups}")
    if sum(sizes) > rows:
        fail(_NAME, f"the groups cover {sum(sizes)} rows but x has only {rows}")
    return [(g, s) for g, s in enumerate(sizes)]


def _scale_for_group(scales: torch.Tensor, g: int, single: bool, n: int) -> torch.Tensor:
    s = scales[g] if single else scales
    return s.reshape(-1) if s.numel() in (1, n) else s


@op
def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None,
                       activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, output_dtype=None, tuning_config=None):
    xs = tensor_list(_NAME, "x", x)
    ws = tensor_list(_NAME, "weight", weight)
    bs = tensor_list(_NAME, "bias", bias, optional=True)
    ss = tensor_list(_NAME, "scale", scale, optional=True)
    ps = tensor_list(_NAME, "per_token_scale", per_token_scale, optional=True)
    if offset is not None:
        fail(_NAME, "offset: only None is supported (当前仅支持传入None)")
    for nm, val in (("activation_input", activation_input),
                    ("activation_quant_scale", activation_quant_scale),
                    ("activation_quant_offset", activation_quant_offset)):
        if val is not None:
            fail(_NAME, f"{nm}: only None is supported")
    if antiquant_scale is not None or antiquant_offset is not None:
        unsupported(_NAME, "antiquant (weight-only quantisation)")
    si = integer(_NAME, "split_item", split_item, choices=(0, 1, 2, 3))
    gt = None if group_type is None else integer(_NAME, "group_type", group_type,
                                                  choices=(-1, 0, 2))
    glt = integer(_NAME, "group_list_type", group_list_type, choices=(0, 1, 2))
    at = integer(_NAME, "act_type", act_type, choices=(0, 1, 2, 3, 4, 5))
    if at == 3:
        fail(_NAME, "act_type 3 is not supported (暂不支持)")
    if at != 0:
        unsupported(_NAME, f"act_type={at}")
    if gt == 2:
        unsupported(_NAME, "group_type 2 (k-axis groups)")
    if isinstance(group_list, (list, tuple)) and gt is not None:
        fail(_NAME, "group_type must be None when group_list is a List[int]")

    x_dt = xs[0].dtype
    if any(t.dtype != x_dt for t in xs) or any(t.dtype != ws[0].dtype for t in ws):
        fail(_NAME, "all x tensors (and all weight tensors) must share one dtype")
    w_dt = ws[0].dtype
    quant = x_dt == torch.int8
    if quant:
        if w_dt != torch.int8:
            unsupported(_NAME, f"int8 x with {dt(ws[0])} weight")
    elif x_dt not in FLOAT_TYPES:
        if x_dt == torch.int32:
            unsupported(_NAME, "int4 (int32-packed) inputs")
        fail(_NAME, f"x dtype must be float16/bfloat16/float32/int8, got {dt(xs[0])}")
    elif w_dt != x_dt:
        if w_dt == torch.int8:
            unsupported(_NAME, "antiquant (float x with int8 weight)")
        fail(_NAME, f"non-quantised x and weight must share a dtype, got {dt(xs[0])} and "
                    f"{dt(ws[0])}")

    # ---- output dtype (table 2) ----
    if quant:
        if ss is None:  # aclnn A8W8 table: no scale -> INT32 output (the raw accumulator)
            out_dt = torch.int32
            if output_dtype != torch.int32:
                fail(_NAME, f"int8 x without scale gives the int32 accumulator: output_dtype "
                            f"must be torch.int32, got {output_dtype}")
        else:
            s_dt = ss[0].dtype
            if ps is not None:
                allowed = {torch.bfloat16: torch.bfloat16, torch.float32: torch.float16}
            else:
                allowed = {torch.int64: torch.int8, torch.bfloat16: torch.bfloat16,
                           torch.float32: torch.float16}
            if s_dt not in allowed:
                fail(_NAME, f"scale dtype {dt(ss[0])} is not supported "
                            f"({'pertoken' if ps is not None else 'perchannel'} quantisation)")
            out_dt = allowed[s_dt]
            want = output_dtype if output_dtype is not None else torch.int8
            if want != out_dt:
                fail(_NAME, f"x int8 with scale {dt(ss[0])}"
                            f"{' and per_token_scale' if ps is not None else ''} gives "
                            f"{str(out_dt).replace('torch.', '')}; output_dtype {want} is not "
                            f"a supported combination")
        if bs is not None and any(b.dtype != torch.int32 for b in bs):
            fail(_NAME, "int8 grouped matmul takes an int32 bias")
    else:
        if ss is not None or ps is not None:
            fail(_NAME, "scale / per_token_scale need int8 x and weight")
        out_dt = x_dt
        if output_dtype not in (None, x_dt):
            fail(_NAME, f"non-quantised {dt(xs[0])} gives {dt(xs[0])}; output_dtype "
                        f"{output_dtype} is not supported")
        want_bias = torch.float16 if x_dt == torch.float16 else torch.float32
        if bs is not None and any(b.dtype != want_bias for b in bs):
            fail(_NAME, f"bias for {dt(xs[0])} inputs must be "
                        f"{str(want_bias).replace('torch.', '')}")
        if x_dt == torch.float32 and any(format_of(w) == FRACTAL_NZ for w in ws):
            fail(_NAME, "float32 weights are supported in ND format only (not FRACTAL_NZ)")

    for t in xs + ws:
        if t.shape[-1] >= _INNER_LIMIT:
            fail(_NAME, f"the last dim of every x/weight tensor must be < 65536, got "
                        f"{list(t.shape)}")

    def matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if quant:
            return int_matmul(a, w)
        return a.float() @ w.float()

    def finish(acc: torch.Tensor, g: int, bias_t, rows: slice | None) -> torch.Tensor:
        """acc: fp32 (float) or int64 (int8) product of one group -> fp32/int64 result."""
        if bias_t is not None:
            acc = acc + (bias_t.to(torch.int64) if quant else bias_t.float())
        if not quant:
            return acc
        if ss is None:
            return acc
        s = _scale_for_group(ss[0] if single_w else ss[g], g, single_w, acc.shape[-1])
        if s.dtype == torch.int64:
            s32, off32 = decode_quant_param(s)
            y = acc.float() * s32 + off32
        else:
            y = acc.float() * s.float()
        if ps is not None:
            y = y * ps[0].reshape(-1)[rows].float().unsqueeze(-1)
        return y

    def cast(y: torch.Tensor) -> torch.Tensor:
        if out_dt == torch.int8:
            return torch.round(y).clamp(-128, 127).to(torch.int8)
        if out_dt == torch.int32:
            return y.clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32)
        return y.to(out_dt)

    single_w = len(ws) == 1 and ws[0].dim() == 3

    # ---------------- group_type -1: independent pairs ----------------
    if gt == -1 or (gt is None and group_list is None and len(xs) == len(ws) and not single_w):
        if group_list is not None:
            fail(_NAME, "group_type -1 requires group_list=None")
        if si not in (0, 1):
            fail(_NAME, f"group_type -1 gives one output per weight: split_item must be 0/1, "
                        f"got {si}")
        if len(xs) != len(ws):
            fail(_NAME, f"x ({len(xs)}) and weight ({len(ws)}) lists must have equal length")
        if ps is not None:
            fail(_NAME, "per_token_scale is only supported with single x/weight/y tensors")
        outs = []
        for g, (a, w) in enumerate(zip(xs, ws)):
            if w.dim() != 2 or a.dim() < 2 or a.shape[-1] != w.shape[0]:
                fail(_NAME, f"pair {g}: x {list(a.shape)} and weight {list(w.shape)} do not "
                            f"form x @ weight (weight must be 2-D [K, N])")
            outs.append(cast(finish(matmul(a, w), g, None if bs is None else bs[g], None)))
        return outs

    # ---------------- group_type 0: m-axis groups ----------------
    if gt is None and not isinstance(group_list, (list, tuple)):
        fail(_NAME, "group_type must be given (-1, 0 or 2) when group_list is a Tensor")
    if len(xs) != 1:
        unsupported(_NAME, "several x tensors with m-axis groups ('多多单')")
    if si not in (2, 3):
        fail(_NAME, f"m-axis grouping with a single x gives a single output: split_item must be "
                    f"2 or 3, got {si}")
    a = xs[0]
    if a.dim() != 2:
        fail(_NAME, f"x must be 2-D [M, K], got {list(a.shape)}")
    M, K = a.shape
    if group_list is None:
        fail(_NAME, "group_list is required for m-axis grouping")
    if single_w:
        w3 = ws[0]
        G, wk, N = w3.shape
        max_groups = 1024
        weights = [w3[g] for g in range(G)]
    else:
        if any(w.dim() != 2 for w in ws):
            fail(_NAME, "a weight list must hold 2-D [K, N] tensors (or one 3-D [G, K, N])")
        G, wk, N = len(ws), ws[0].shape[0], ws[0].shape[1]
        if any(tuple(w.shape) != (wk, N) for w in ws):
            fail(_NAME, "every weight of the list must have the same [K, N]")
        max_groups = 128
        weights = ws
    if wk != K:
        fail(_NAME, f"x [M={M}, K={K}] and weight [.., K={wk}, N={N}] disagree on K")
    if isinstance(group_list, (list, tuple)):
        plan = _group_sizes(group_list, 0, G, M, max_groups)
    else:
        plan = _group_sizes(group_list, glt, G, M, max_groups)
    if ps is not None:
        if len(ps) != 1 or ps[0].dim() != 1 or ps[0].shape[0] != M:
            fail(_NAME, f"per_token_scale must be one 1-D tensor of M={M} elements, got "
                        f"{[list(p.shape) for p in ps]}")
    if ss is not None:
        if single_w:
            if len(ss) != 1:
                fail(_NAME, "a single [G, K, N] weight takes one scale tensor")
            s = ss[0]
            if tuple(s.shape) not in ((G, N), (G, 1), (G,)):
                fail(_NAME, f"scale for a single [G={G}, K, N={N}] weight must be (G, N), "
                            f"(G, 1) or (G,), got {list(s.shape)}")
        else:
            if len(ss) != G or any(s.dim() != 1 or s.shape[0] not in (1, N) for s in ss):
                fail(_NAME, f"a weight list takes {G} 1-D scales of N={N} (or 1) elements")
    if bs is not None:
        if single_w:
            if len(bs) != 1 or tuple(bs[0].shape) != (G, N):
                fail(_NAME, f"bias for a single weight must be one (G, N) = ({G}, {N}) tensor")
        elif len(bs) != G or any(tuple(b.shape) != (N,) for b in bs):
            fail(_NAME, f"bias must hold {G} tensors of shape ({N},)")
    y = fill_undefined((M, N), out_dt)  # rows past the groups are not written
    start = 0
    for g, size in plan:
        if size:
            rows = slice(start, start + size)
            b = None if bs is None else (bs[0][g] if single_w else bs[g])
            y[rows] = cast(finish(matmul(a[rows], weights[g]), g, b, rows))
        start += size
    return [y]
