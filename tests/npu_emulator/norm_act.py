"""RMSNorm, SwiGLU and rotary-embedding kernels.

Sources (op-plugin ``docs/zh/custom_APIs/torch_npu/``, https://gitcode.com/Ascend/op-plugin):
  torch_npu-npu_rms_norm.md, torch_npu-npu_add_rms_norm.md, torch_npu-npu_swiglu.md,
  torch_npu-npu_rotary_mul.md, torch_npu-apply_rotary_pos_emb.md.

Precision model (not stated by the pages, chosen as the plain reading of their formulas): the
maths is carried out in fp32 and each output is rounded once to its documented dtype.
"""

from __future__ import annotations

import torch

from ._base import FLOAT_TYPES, dt, fail, integer, op, real, tensor

# npu_rms_norm, A2/A3 table "self dtype / gamma dtype"
_RMS_NORM_DTYPES = {
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
}


def _norm_dims(op_name: str, x: torch.Tensor, gamma: torch.Tensor) -> int:
    """gamma normalises the trailing gamma.dim() dims: 'gamma_shape = self_shape[n:], n < dims'."""
    g = gamma.dim()
    if g == 0 or g >= x.dim() + 1 or tuple(x.shape[x.dim() - g:]) != tuple(gamma.shape):
        fail(op_name, f"gamma shape {list(gamma.shape)} must equal the trailing dims of the "
                      f"input {list(x.shape)} (gamma_shape = self_shape[n:])")
    return g


def _rms(x32: torch.Tensor, g: int, eps: float) -> torch.Tensor:
    dims = tuple(range(x32.dim() - g, x32.dim()))
    return torch.rsqrt(x32.pow(2).mean(dim=dims, keepdim=True) + eps)


@op
def npu_rms_norm(self, gamma, epsilon=1e-06):
    """(y, rstd): y = x / sqrt(mean(x^2) + eps) * gamma in self's dtype; rstd fp32.

    Doc: self 2-8 dims ("shape支持2-8维度"), empty tensors allowed; A2 dtype pairs listed in
    ``_RMS_NORM_DTYPES``; rstd has self's leading (un-normalised) dims -- the keepdim shape of
    the npu_add_rms_norm page's example ((2,3,4,8) with gamma (8) -> (2,3,4,1)) is used.
    """
    name = "npu_rms_norm"
    x = tensor(name, "self", self, dtypes=FLOAT_TYPES, dims=range(2, 9))
    gamma = tensor(name, "gamma", gamma, dtypes=FLOAT_TYPES, dims=range(1, 9))
    eps = real(name, "epsilon", epsilon)
    if (x.dtype, gamma.dtype) not in _RMS_NORM_DTYPES:
        fail(name, f"self/gamma dtypes {dt(x)}/{dt(gamma)} are not a supported pair "
                   f"(fp16/fp32, bf16/fp32, fp16/fp16, bf16/bf16, fp32/fp32)")
    g = _norm_dims(name, x, gamma)
    x32 = x.float()
    rstd = _rms(x32, g, eps)
    y = (x32 * rstd * gamma.float()).to(x.dtype)
    return y, rstd


@op
def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    """(y, rstd, x) with x = x1 + x2 and y = RMSNorm(x) * gamma.

    Doc: x1/x2/gamma float32/float16/bfloat16, 1-8 dims, no empty tensors; gamma has x1's dtype
    and x1's trailing shape; y and x take x1's dtype and shape; rstd fp32 keepdim shape.
    x1 and x2 are required to share a dtype: the page lists the same dtypes for both and gives
    the sum x1's dtype, it documents no mixed pair. The norm uses the exact (fp32) sum, the
    formula's x_i = x1_i + x2_i; only the returned x is rounded to x1's dtype.
    """
    name = "npu_add_rms_norm"
    a = tensor(name, "x1", x1, dtypes=FLOAT_TYPES, dims=range(1, 9), nonempty=True)
    b = tensor(name, "x2", x2, dtypes=FLOAT_TYPES, dims=range(1, 9), nonempty=True)
    gamma = tensor(name, "gamma", gamma, dtypes=FLOAT_TYPES, dims=range(1, 9), nonempty=True)
    eps = real(name, "epsilon", epsilon)
    if b.dtype != a.dtype:
        fail(name, f"x2 dtype {dt(b)} differs from x1 dtype {dt(a)}")
    if tuple(b.shape) != tuple(a.shape):
        fail(name, f"x2 shape {list(b.shape)} differs from x1 shape {list(a.shape)}")
    if gamma.dtype != a.dtype:
        fail(name, f"gamma dtype must equal x1's ({dt(a)}), got {dt(gamma)}")
    g = _norm_dims(name, a, gamma)
    s32 = a.float() + b.float()
    rstd = _rms(s32, g, eps)
    y = (s32 * rstd * gamma.float()).to(a.dtype)
    return y, rstd, s32.to(a.dtype)


@op
def npu_swiglu(input, /, dim=-1):
    """silu(A) * B with A, B the two halves of ``input`` along ``dim``.

    Doc: input float32/float16/bfloat16, 1-8 dims, contiguous, not empty, even along dim;
    dim in [-input.dim(), input.dim()-1]; output in input's dtype. (The page calls the tensor
    ``input``, the op schema ``self``: it is positional-only here, valid under both names.)
    """
    name = "npu_swiglu"
    x = tensor(name, "input", input, dtypes=FLOAT_TYPES, dims=range(1, 9), nonempty=True,
               contiguous=True)
    d = integer(name, "dim", dim)
    if not -x.dim() <= d <= x.dim() - 1:
        fail(name, f"dim must lie in [{-x.dim()}, {x.dim() - 1}], got {d}")
    if x.shape[d] % 2:
        fail(name, f"input size {x.shape[d]} along dim {d} is not divisible by 2")
    a, b = x.float().chunk(2, dim=d)
    return (a * torch.sigmoid(a) * b).to(x.dtype)


def _rotate(x32: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "half":  # x1, x2 = chunk(x, 2, -1); rotate(x) = cat(-x2, x1)
        x1, x2 = x32.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    # interleave: x1 = x[..., ::2], x2 = x[..., 1::2]; rotate = stack((-x2, x1), -1) flattened
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


@op
def npu_rotary_mul(input, /, r1, r2, rotary_mode="half", rotate=None):
    """output = x * cos + rotate(x) * sin, shape and dtype of ``input``.

    Doc: input/r1/r2 3-D or 4-D, float16/bfloat16/float32; rotary_mode "half" | "interleave";
    ``rotate`` (2-D) replaces the rotation by x @ rotate. r1/r2 broadcast against input
    (e.g. 1S1D/BS1D/BSND for a BSND input); D even. (``input`` is positional-only: the page names
    it ``input``, the schema ``self``.)
    """
    name = "npu_rotary_mul"
    x = tensor(name, "input", input, dtypes=FLOAT_TYPES, dims=(3, 4))
    cos = tensor(name, "r1", r1, dtypes=FLOAT_TYPES, dims=(3, 4))
    sin = tensor(name, "r2", r2, dtypes=FLOAT_TYPES, dims=(3, 4))
    if rotary_mode not in ("half", "interleave"):
        fail(name, f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    if cos.dim() != x.dim() or sin.shape != cos.shape:
        fail(name, f"r1/r2 shapes {list(cos.shape)}/{list(sin.shape)} must match each other "
                   f"and have input's rank ({list(x.shape)})")
    try:
        torch.broadcast_shapes(x.shape, cos.shape)
    except RuntimeError:
        fail(name, f"r1/r2 shape {list(cos.shape)} does not broadcast to input {list(x.shape)}")
    if torch.broadcast_shapes(x.shape, cos.shape) != x.shape:
        fail(name, f"r1/r2 shape {list(cos.shape)} must broadcast into input {list(x.shape)}")
    if x.shape[-1] % 2:
        fail(name, f"D must be even, got {x.shape[-1]}")
    x32 = x.float()
    if rotate is not None:
        rot = tensor(name, "rotate", rotate, dtypes=FLOAT_TYPES, dims=(2,))
        if tuple(rot.shape) != (x.shape[-1], x.shape[-1]):
            fail(name, f"rotate must be [D, D] = [{x.shape[-1]}, {x.shape[-1]}], got "
                       f"{list(rot.shape)}")
        rotated = x32 @ rot.float()
    else:
        rotated = _rotate(x32, rotary_mode)
    return (x32 * cos.float() + rotated * sin.float()).to(x.dtype)


@op
def npu_apply_rotary_pos_emb(query, key, cos, sin, *, layout="BSND", rotary_mode="half"):
    """Rotary embedding of query and key, updated IN PLACE; returns (query_out, key_out), which
    are the input tensors themselves.

    Doc (A2/A3): layout "BSND" (4-D) or "TND" (3-D); rotary_mode "half" only; no empty tensors;
    D of query/key/cos/sin equal and in {64, 128}; query, key, cos, sin of one dtype in
    bfloat16/float16/float32; cos/sin N axis == 1; BSND: B and S equal across all four; TND: T
    equal. Shapes: TND query (t, q_n, d), key (t, k_n, d), cos/sin (t, 1, d).
    "half": out = x * cos + cat(-x2, x1) * sin.
    """
    name = "npu_apply_rotary_pos_emb"
    if layout not in ("BSND", "TND", "SBND", "BNSD"):
        fail(name, f"layout must be one of BSND/SBND/BNSD/TND, got {layout!r}")
    if layout in ("SBND", "BNSD"):
        fail(name, f"layout {layout} is only supported on Ascend 950DT, not Atlas A2/A3")
    if rotary_mode not in ("half", "quarter", "interleave"):
        fail(name, f"rotary_mode must be half/quarter/interleave, got {rotary_mode!r}")
    if rotary_mode != "half":
        fail(name, f"rotary_mode {rotary_mode!r} is only supported on Ascend 950DT "
                   f"(Atlas A2/A3: 'half')")
    rank = 3 if layout == "TND" else 4
    q = tensor(name, "query", query, dtypes=FLOAT_TYPES, dims=(rank,), nonempty=True)
    k = tensor(name, "key", key, dtypes=FLOAT_TYPES, dims=(rank,), nonempty=True)
    c = tensor(name, "cos", cos, dtypes=FLOAT_TYPES, dims=(rank,), nonempty=True)
    s = tensor(name, "sin", sin, dtypes=FLOAT_TYPES, dims=(rank,), nonempty=True)
    if not (q.dtype == k.dtype == c.dtype == s.dtype):
        fail(name, f"query/key/cos/sin must share one dtype, got "
                   f"{dt(q)}/{dt(k)}/{dt(c)}/{dt(s)}")
    d = q.shape[-1]
    if d not in (64, 128) or k.shape[-1] != d or c.shape[-1] != d or s.shape[-1] != d:
        fail(name, f"D must be 64 or 128 and equal for query/key/cos/sin, got "
                   f"{q.shape[-1]}/{k.shape[-1]}/{c.shape[-1]}/{s.shape[-1]}")
    lead = rank - 2  # B,S for BSND; T for TND
    for nm, t in (("key", k), ("cos", c), ("sin", s)):
        if tuple(t.shape[:lead]) != tuple(q.shape[:lead]):
            fail(name, f"{nm} leading dims {list(t.shape[:lead])} differ from query's "
                       f"{list(q.shape[:lead])} ({layout})")
    if c.shape[-2] != 1 or s.shape[-2] != 1:
        fail(name, f"cos/sin N axis must be 1, got shapes {list(c.shape)}/{list(s.shape)}")
    c32, s32 = c.float(), s.float()
    for t in (q, k):
        t32 = t.float()
        t.copy_((t32 * c32 + _rotate(t32, "half") * s32).to(t.dtype))
    return q, k
