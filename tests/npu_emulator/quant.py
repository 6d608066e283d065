"""int8 quantisation kernels: npu_dynamic_quant, npu_quantize, npu_trans_quant_param,
npu_quant_matmul, and the norm-fused npu_add_rms_norm_quant / npu_add_rms_norm_dynamic_quant.

Sources: op-plugin ``docs/zh/custom_APIs/torch_npu/`` torch_npu-npu_dynamic_quant.md,
torch_npu-npu_quantize.md, torch_npu-npu_trans_quant_param.md, torch_npu-npu_quant_matmul.md;
for the int32-output case of npu_quant_matmul, ops-nn
``matmul/quant_batch_matmul_v4/docs/aclnnQuantMatmulV5.md``: "x1，x2为INT8，out为INT32，bias为
INT32或nullptr时，各scale实际不参与计算: out = x1@x2 + bias".

Not stated by the pages, chosen here and flagged in each docstring: rounding is round-half-to-
even (``rint``) and int8 results saturate to [-128, 127]; scales and sums are fp32; an int8 GEMM
accumulates exactly (int32 accumulator, computed here in float64, exact for K <= 65535).
"""

from __future__ import annotations

import torch

from ._base import (FLOAT_TYPES, HALF_TYPES, boolean, dt, fail, fill_undefined, integer, op,
                    real, tensor, unsupported)

# --------------------------------------------------------------------------------------------
# npu_dynamic_quant
# --------------------------------------------------------------------------------------------


@op
def npu_dynamic_quant(input, /, *, smooth_scales=None, group_index=None, dst_type=None):
    """Per-token symmetric quantisation: scale = rowMax(|x * smooth|) / 127,
    y = round(x * smooth / scale). Returns (y int8 of x's shape, scale fp32 of x.shape[:-1]).

    Doc: x float16/bfloat16, more than 1 dim, non-contiguous allowed; smooth_scales
    float16/bfloat16, 1-D of x's last dim (2-D [groups, K] with group_index int32, MoE);
    dst_type None -> int8 (quint4x2 not emulated). The page names the tensor ``x``, the op
    schema ``input``: positional-only here. An all-zero row gives scale 0 and (not documented)
    y = 0 here.
    """
    name = "npu_dynamic_quant"
    x = tensor(name, "x", input, dtypes=HALF_TYPES)
    if x.dim() < 2:
        fail(name, f"x must have more than 1 dim, got shape {list(x.shape)}")
    if dst_type not in (None, torch.int8):
        if dst_type == torch.quint4x2:
            unsupported(name, "dst_type=torch.quint4x2")
        fail(name, f"dst_type must be None, torch.int8 or torch.quint4x2, got {dst_type}")
    K = x.shape[-1]
    x32 = x.float()
    if group_index is not None:
        gi = tensor(name, "group_index", group_index, dtypes=(torch.int32,), dims=(1,))
        sm = tensor(name, "smooth_scales", smooth_scales, dtypes=HALF_TYPES, dims=(2,))
        if sm.shape[1] != K or sm.shape[0] != gi.shape[0]:
            fail(name, f"with group_index, smooth_scales must be [{gi.shape[0]}, {K}], got "
                       f"{list(sm.shape)}")
        ends = gi.tolist()
        rows = x32.reshape(-1, K)
        if any(b < a for a, b in zip([0] + ends, ends)) or ends[-1] != rows.shape[0]:
            fail(name, f"group_index must be increasing and end at {rows.shape[0]}, got {ends}")
        start = 0
        for g, end in enumerate(ends):
            rows[start:end] = rows[start:end] * sm[g].float()
            start = end
        x32 = rows.reshape(x.shape)
    elif smooth_scales is not None:
        sm = tensor(name, "smooth_scales", smooth_scales, dtypes=HALF_TYPES, dims=(1,))
        if sm.shape[0] != K:
            fail(name, f"smooth_scales must have {K} elements (x's last dim), got {sm.shape[0]}")
        x32 = x32 * sm.float()
    scale = x32.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(x32 / safe.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return y, scale


# --------------------------------------------------------------------------------------------
# npu_quantize
# --------------------------------------------------------------------------------------------

_QUANTIZE_OUT = {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.int32: torch.int32}


@op
def npu_quantize(input, /, scales, zero_points, dtype, axis=1, div_mode=True):
    """result = input / scales + zero_points (div_mode=True) or input * scales + zero_points.

    Doc (A2/A3): input float/float16/bfloat16; div_mode=True: scales float/bfloat16,
    zero_points int8/uint8/int32/bfloat16 or None, dtype torch.qint8/quint8/int32;
    div_mode=False: scales/zero_points of input's dtype, 1-D sized input.shape[axis] or 1,
    dtype qint8 (quint4x2 not emulated). ``axis`` is the element-wise axis, the others
    broadcast. ``zero_points`` is required but may be None. The returned tensor is a plain
    int8 (qint8), uint8 (quint8) or int32 tensor. Rounding half-to-even with saturation
    (not documented).
    """
    name = "npu_quantize"
    x = tensor(name, "input", input, dtypes=FLOAT_TYPES)
    dm = boolean(name, "div_mode", div_mode)
    ax = integer(name, "axis", axis)
    if dtype == torch.quint4x2:
        unsupported(name, "dtype=torch.quint4x2")
    allowed = (torch.qint8, torch.quint8, torch.int32) if dm else (torch.qint8,)
    if dtype not in allowed:
        fail(name, f"dtype must be one of {allowed} (div_mode={dm}), got {dtype}")
    s_types = (torch.float32, torch.bfloat16) if dm else (x.dtype,)
    s = tensor(name, "scales", scales, dtypes=s_types)
    zp_types = (torch.int8, torch.uint8, torch.int32, torch.bfloat16) if dm else (x.dtype,)
    zp = tensor(name, "zero_points", zero_points, dtypes=zp_types, optional=True)
    if x.dim() == 0:
        fail(name, "input must have at least 1 dim")
    if not -x.dim() <= ax < x.dim():
        fail(name, f"axis {ax} is out of range for input of {x.dim()} dims")
    if not dm and ax < -2:
        fail(name, f"div_mode=False needs axis >= -2, got {ax}")
    ax = ax % x.dim()
    n = x.shape[ax]

    def shaped(t: torch.Tensor, nm: str) -> torch.Tensor:
        if t.dim() == 1:
            if t.shape[0] not in (1, n):
                fail(name, f"{nm} of {t.shape[0]} elements must match input dim {ax} ({n}) "
                           f"or be 1")
            view = [1] * x.dim()
            view[ax] = t.shape[0]
            return t.float().reshape(view)
        if t.dim() != x.dim() or any(sz != 1 for d, sz in enumerate(t.shape) if d != ax) \
                or t.shape[ax] not in (1, n):
            fail(name, f"{nm} shape {list(t.shape)} must be 1-D or input's rank with only the "
                       f"axis dim ({n} or 1) != 1")
        return t.float()

    s32 = shaped(s, "scales")
    y = x.float() / s32 if dm else x.float() * s32
    if zp is not None:
        if zp.shape != s.shape:
            fail(name, f"zero_points shape {list(zp.shape)} must equal scales shape "
                       f"{list(s.shape)}")
        y = y + shaped(zp, "zero_points")
    out = _QUANTIZE_OUT[dtype]
    info = torch.iinfo(out)
    return torch.round(y).clamp(info.min, info.max).to(out)


# --------------------------------------------------------------------------------------------
# npu_trans_quant_param
# --------------------------------------------------------------------------------------------

_FLAG46 = 1 << 46


def _fp19_bits(scale: torch.Tensor, round_mode: int) -> torch.Tensor:
    bits = scale.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if round_mode == 1:  # R_INT: round to nearest (ties to even) at the 13 dropped bits
        low = bits & 0x1FFF
        keep_odd = (bits >> 13) & 1
        up = (low > 0x1000) | ((low == 0x1000) & (keep_odd == 1))
        bits = (bits + up.to(torch.int64) * 0x2000) & 0xFFFFFFFF
    return bits & 0xFFFFE000


def decode_quant_param(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp32, offset fp32) from npu_trans_quant_param's int64 words."""
    low = (packed & 0xFFFFFFFF).to(torch.int64)
    low = torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32)
    scale = low.view(torch.float32).clone()
    off9 = (packed >> 37) & 0x1FF
    offset = torch.where(off9 >= 256, off9 - 512, off9).to(torch.float32)
    return scale, offset


@op
def npu_trans_quant_param(scale, offset=None, round_mode=0):
    """Pack fp32 scale (and offset) into int64 words: out = (scale_bits & 0xFFFFE000) | 1 << 46,
    plus (clamp(round(offset), -256, 255) & 0x1FF) << 37 when offset is given.

    Doc: scale/offset float32, 1-D or 2-D, contiguous, not empty; round_mode 0 (truncate to
    FP19) or 1 (R_INT rounding first); without offset the output has scale's shape; with offset
    a 1-D output has the larger of the two sizes.
    """
    name = "npu_trans_quant_param"
    s = tensor(name, "scale", scale, dtypes=(torch.float32,), dims=(1, 2), nonempty=True,
               contiguous=True)
    rm = integer(name, "round_mode", round_mode, choices=(0, 1))
    o = tensor(name, "offset", offset, dtypes=(torch.float32,), dims=(1, 2), nonempty=True,
               contiguous=True, optional=True)
    bits = _fp19_bits(s, rm)
    if o is None:
        return bits | _FLAG46
    if s.dim() == 1 and o.dim() == 1:
        n = max(s.shape[0], o.shape[0])
        if {s.shape[0], o.shape[0]} - {1, n}:
            fail(name, f"scale ({s.shape[0]}) and offset ({o.shape[0]}) sizes must be 1 or "
                       f"equal")
        bits = bits.expand(n)
        o = o.expand(n)
    elif o.shape != s.shape:
        if o.numel() != s.numel():
            fail(name, f"2-D offset shape {list(o.shape)} must match scale {list(s.shape)}")
        o = o.reshape(s.shape)
    off = torch.round(o).clamp(-256, 255).to(torch.int64) & 0x1FF
    return (bits & 0x4000FFFFFFFF) | _FLAG46 | (off << 37)


# --------------------------------------------------------------------------------------------
# npu_quant_matmul
# --------------------------------------------------------------------------------------------


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 product with an int32 accumulator (float64 is exact for K <= 65535)."""
    return torch.matmul(a.to(torch.float64), b.to(torch.float64)).round().to(torch.int64)


@op
def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None,
                     output_dtype=None, group_sizes=None):
    """Quantised matmul, A2/A3 int8 combinations of the page's table 2:

      | scale         | offset       | bias                   | pertoken  | output      |
      | int64/float32 | None         | int32/None             | None      | float16     |
      | int64/float32 | float32/None | int32/None             | None      | int8 (None) |
      | float32/bf16  | None         | int32/bf16/float32/None| float32/None | bfloat16 |
      | float32       | None         | int32/bf16/float32/None| float32   | float16     |
      | float32/bf16  | None         | int32/None             | None      | int32       |

    Formulas: bias int32: (x1@x2 + bias) * scale (+ offset); float bias: x1@x2 * scale + bias;
    with pertoken_scale an extra factor per row; int32 output: x1@x2 (+ bias), scales unused
    (aclnnQuantMatmulV5). output_dtype None means int8. scale is 1-D (t,) with t = 1 or n; an
    int64 scale must come from npu_trans_quant_param (FP19 scale in the low word, flag bit 46,
    optional 9-bit offset at bits 37-45). pertoken_scale 1-D (m,). x1/x2 2-6 dims, last dims
    <= 65535; x2 may be FRACTAL_NZ (the page recommends casting x2 without transposing it on A2).
    int4 (int32 x1/x2), 2-D scales and group_sizes are not emulated.
    """
    name = "npu_quant_matmul"
    if isinstance(x1, torch.Tensor) and x1.dtype == torch.int32:
        unsupported(name, "int4 (int32-packed) x1/x2")
    a = tensor(name, "x1", x1, dtypes=(torch.int8,), dims=range(2, 7), nonempty=True)
    b = tensor(name, "x2", x2, dtypes=(torch.int8,), dims=range(2, 7), nonempty=True)
    if group_sizes is not None:
        unsupported(name, "group_sizes")
    if a.shape[-1] > 65535 or b.shape[-1] > 65535:
        fail(name, f"x1/x2 last dims must be <= 65535, got {a.shape[-1]} / {b.shape[-1]}")
    if a.shape[-1] != b.shape[-2]:
        fail(name, f"x1 {list(a.shape)} and x2 {list(b.shape)}: k mismatch (x2 is [.., k, n])")
    n = b.shape[-1]
    s = tensor(name, "scale", scale, dtypes=(torch.float32, torch.bfloat16, torch.int64),
               nonempty=True)
    if s.dim() != 1:
        if s.dim() == 2:
            unsupported(name, "2-D scale (int4 per-group path)")
        fail(name, f"scale must be 1-D (t,), got shape {list(s.shape)}")
    if s.shape[0] not in (1, n):
        fail(name, f"scale must have 1 or n={n} elements, got {s.shape[0]}")
    off = tensor(name, "offset", offset, dtypes=(torch.float32,), dims=(1,), optional=True)
    pts = tensor(name, "pertoken_scale", pertoken_scale, dtypes=(torch.float32,), dims=(1,),
                 optional=True)
    bia = tensor(name, "bias", bias, dtypes=(torch.int32, torch.bfloat16, torch.float16,
                                              torch.float32), dims=(1, 3), optional=True)
    out = torch.int8 if output_dtype is None else output_dtype
    if out not in (torch.int8, torch.float16, torch.bfloat16, torch.int32):
        fail(name, f"output_dtype must be int8/float16/bfloat16/int32 (or None), got "
                   f"{output_dtype}")

    # ---- the documented dtype combinations (A2/A3 table 2, int8 rows) ----
    sdt, bdt = s.dtype, None if bia is None else bia.dtype
    combo = None
    if out == torch.float16 and pts is None:
        combo = sdt in (torch.int64, torch.float32) and off is None and bdt in (None, torch.int32)
    elif out == torch.int8:
        combo = sdt in (torch.int64, torch.float32) and pts is None and bdt in (None, torch.int32)
    elif out == torch.bfloat16:
        combo = sdt in (torch.float32, torch.bfloat16) and off is None and \
            bdt in (None, torch.int32, torch.bfloat16, torch.float32)
    elif out == torch.float16:  # with pertoken_scale
        combo = sdt == torch.float32 and off is None and \
            bdt in (None, torch.int32, torch.bfloat16, torch.float32)
    elif out == torch.int32:
        combo = sdt in (torch.float32, torch.bfloat16) and off is None and pts is None and \
            bdt in (None, torch.int32)
    if not combo:
        fail(name, f"unsupported dtype combination: scale {dt(s)}, offset "
                   f"{None if off is None else dt(off)}, bias {None if bia is None else dt(bia)}, "
                   f"pertoken_scale {None if pts is None else dt(pts)}, output_dtype {out}")
    if off is not None and off.shape[0] not in (1, n):
        fail(name, f"offset must have 1 or n={n} elements, got {off.shape[0]}")
    m = a.shape[-2]
    if pts is not None and pts.shape[0] != m:
        fail(name, f"pertoken_scale must have m={m} elements (x1's second-to-last dim), got "
                   f"{pts.shape[0]}")
    acc = int_matmul(a, b)  # [..., m, n] int64, exact
    if bia is not None:
        if bia.dim() == 1 and bia.shape[0] != n or bia.dim() == 3 and (
                acc.dim() != 3 or tuple(bia.shape) != (acc.shape[0], 1, n)):
            fail(name, f"bias must be (n,) or, for a 3-D output, (batch, 1, n); got "
                       f"{list(bia.shape)} for output {list(acc.shape)}")
    int_bias = bia is not None and bia.dtype == torch.int32
    if int_bias:
        acc = acc + bia.to(torch.int64)
    if out == torch.int32:
        return acc.clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32)
    if sdt == torch.int64:
        if bool(((s >> 46) & 1 == 0).any()):
            fail(name, "an int64 scale must be produced by torch_npu.npu_trans_quant_param "
                       "(bit 46 is not set)")
        s32, packed_off = decode_quant_param(s)
        if off is None and out == torch.int8:
            off32 = packed_off
        else:
            off32 = None
    else:
        s32, off32 = s.float(), None
    y = acc.to(torch.float64).float() * s32
    if pts is not None:
        y = y * pts.unsqueeze(-1)
    if off is not None:
        off32 = off
    if off32 is not None:
        y = y + off32
    if bia is not None and not int_bias:
        y = y + bia.float()
    if out == torch.int8:
        return torch.round(y).clamp(-128, 127).to(torch.int8)
    return y.to(out)



# --------------------------------------------------------------------------------------------
# Residual add + RMSNorm + quantisation, fused
# --------------------------------------------------------------------------------------------
# Sources: op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_add_rms_norm_quant.md and its
# English twin; CANN aclnnAddRmsNormQuantV2 ("divMode supports only True" on Atlas A2/A3);
# torch_npu-npu_add_rms_norm_dynamic_quant.md. Precision model as npu_add_rms_norm (norm_act.py):
# the sum x1 + x2 and the norm in fp32, the quantised value rounded once (half to even, op-plugin's
# test golden clips to [-128, 127] before the int8 cast).

def _add_norm(name, x1, x2, gamma, beta, epsilon, dims):
    a = tensor(name, "x1", x1, dtypes=HALF_TYPES, dims=dims, nonempty=True)
    b = tensor(name, "x2", x2, dtypes=HALF_TYPES, dims=dims, nonempty=True)
    if b.dtype != a.dtype or tuple(b.shape) != tuple(a.shape):
        fail(name, f"x1 and x2 must share dtype and shape, got {dt(a)} {list(a.shape)} and "
                   f"{dt(b)} {list(b.shape)}")
    K = a.shape[-1]
    g = tensor(name, "gamma", gamma, dtypes=(a.dtype,), dims=(1,))
    if g.shape[0] != K:
        fail(name, f"gamma must be [{K}] (x1's last dim), got {list(g.shape)}")
    bt = tensor(name, "beta", beta, dtypes=(a.dtype,), dims=(1,), optional=True)
    if bt is not None and bt.shape[0] != K:
        fail(name, f"beta must be [{K}], got {list(bt.shape)}")
    eps = real(name, "epsilon", epsilon)
    s32 = a.float() + b.float()
    y = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps) * g.float()
    if bt is not None:
        y = y + bt.float()
    return a, y, s32.to(a.dtype)


@op
def npu_add_rms_norm_quant(x1, x2, gamma, scales1, zero_points1, beta=None, scales2=None,
                           zero_points2=None, *, axis=-1, epsilon=1e-06, div_mode=True):
    """(y1, y2, x): x = x1 + x2 (x1's dtype), y = x / RMS(x) * gamma (+ beta),
    y1 = clamp(round(y / scales1 + zero_points1)) int8 (div_mode True), y2 likewise with
    scales2 / zero_points2.

    Doc (A2/A3 dtype rows): fp16 x1/x2/gamma with fp32 scales and int32 zero points; bf16 with
    bf16 scales and bf16 zero points. x1/x2 1-8 dims of one shape; gamma, beta, the scales and
    zero points of gamma's shape (1-D [K] here); zero points may be None; axis -1 only (op-plugin
    checks it); div_mode: only True on A2/A3 (CANN page), and scales must then not be 0. y2 is
    always allocated: without scales2 its content is not defined (here: the int8 minimum).
    """
    name = "npu_add_rms_norm_quant"
    if integer(name, "axis", axis) != -1:
        fail(name, f"axis must be -1, got {axis}")
    if not boolean(name, "div_mode", div_mode):
        fail(name, "div_mode=False is not supported on Atlas A2/A3 (aclnnAddRmsNormQuantV2)")
    a, y, x_sum = _add_norm(name, x1, x2, gamma, beta, epsilon, range(1, 9))
    K = a.shape[-1]
    s_dt, z_dt = (torch.float32, torch.int32) if a.dtype == torch.float16 else \
        (torch.bfloat16, torch.bfloat16)

    def quantise(which, scales, zeros):
        s = tensor(name, f"scales{which}", scales, dtypes=(s_dt,), dims=(1,))
        z = tensor(name, f"zero_points{which}", zeros, dtypes=(z_dt,), dims=(1,), optional=True)
        if s.shape[0] != K or (z is not None and z.shape[0] != K):
            fail(name, f"scales{which} / zero_points{which} must be [{K}] (gamma's shape)")
        if bool((s == 0).any()):
            fail(name, f"scales{which} must not hold 0 with div_mode=True")
        q = y / s.float() + (0.0 if z is None else z.float())
        return torch.round(q).clamp(-128, 127).to(torch.int8)

    y1 = quantise(1, scales1, zero_points1)
    y2 = quantise(2, scales2, zero_points2) if scales2 is not None else \
        fill_undefined(a.shape, torch.int8)
    return y1, y2, x_sum


@op
def npu_add_rms_norm_dynamic_quant(x1, x2, gamma, *, smooth_scale1=None, smooth_scale2=None,
                                   beta=None, epsilon=1e-06, output_mask=None, y_dtype=None):
    """(y1, y2, x_out, scale1, scale2): x = x1 + x2, y = x / RMS(x) * gamma (+ beta);
    branch i: input_i = y * smooth_scale_i (if given), scale_i = row_max(|input_i|) / 127 (fp32,
    x1.shape[:-1]), y_i = round(input_i / scale_i) int8.

    Doc (A2/A3): x1/x2 fp16/bf16 of 2-8 dims and one shape; gamma, beta and the smooth scales of
    x1's dtype, 1-D [K]; output_mask (two bools, not both False) selects the branches, a branch
    switched off returns empty y and scale, and a smooth scale needs its branch on; empty mask:
    branch 1, and branch 2 when smooth_scale2 is given. y_dtype None = int8 (int4 not emulated).
    """
    name = "npu_add_rms_norm_dynamic_quant"
    if y_dtype is not None:
        unsupported(name, f"y_dtype={y_dtype}")
    a, y, x_sum = _add_norm(name, x1, x2, gamma, beta, epsilon, range(2, 9))
    K = a.shape[-1]
    mask = list(output_mask) if output_mask else [True, smooth_scale2 is not None]
    if len(mask) != 2 or not all(isinstance(m, bool) for m in mask) or not any(mask):
        fail(name, f"output_mask must be two bools, not both False, got {output_mask}")
    outs = []
    for i, (on, smooth) in enumerate(zip(mask, (smooth_scale1, smooth_scale2)), 1):
        sm = tensor(name, f"smooth_scale{i}", smooth, dtypes=(a.dtype,), dims=(1,), optional=True)
        if sm is not None and not on:
            fail(name, f"smooth_scale{i} is given but output_mask[{i - 1}] is False")
        if not on:
            outs.append((torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.float32)))
            continue
        if sm is not None and sm.shape[0] != K:
            fail(name, f"smooth_scale{i} must be [{K}], got {list(sm.shape)}")
        inp = y if sm is None else y * sm.float()
        scale = inp.abs().amax(dim=-1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        outs.append((torch.round(inp / safe.unsqueeze(-1)).clamp(-128, 127).to(torch.int8), scale))
    (y1, s1), (y2, s2) = outs
    return y1, y2, x_sum, s1, s2
