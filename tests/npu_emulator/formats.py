"""Storage formats: ``npu_format_cast``, ``npu_format_cast_``, ``get_npu_format``, ``Format``.

Source: op-plugin ``torch_npu-npu_format_cast.md`` ((beta) page): npu_format_cast(input,
acl_format, customize_dtype=None) -> a NEW tensor in the target format ("修改后的新张量不会替换原
有张量"); acl_format an int or torch_npu.Format; the format table below. Numerically a format
cast is the identity (a different memory tiling of the same logical tensor), so the emulator
returns a copy and remembers the format on the tensor object, which ``get_npu_format`` reads.
The page's example shows a freshly created 4-D tensor reporting format 0 (NCHW); other tensors
report 2 (ND).
"""

from __future__ import annotations

import enum

import torch

from ._base import fail, integer, op, tensor

_ATTR = "_npu_emulated_format"


class Format(enum.IntEnum):
    UNDEFINED = -1
    NCHW = 0
    NHWC = 1
    ND = 2
    NC1HWC0 = 3
    FRACTAL_Z = 4
    NC1HWC0_C04 = 12
    HWCN = 16
    NDHWC = 27
    FRACTAL_NZ = 29
    NCDHW = 30
    NDC1HWC0 = 32
    FRACTAL_Z_3D = 33
    NC = 35
    NCL = 47


FRACTAL_NZ = int(Format.FRACTAL_NZ)
_VALID = {int(f) for f in Format} - {int(Format.UNDEFINED), int(Format.NC1HWC0_C04)}


def format_of(t: torch.Tensor) -> int:
    fmt = getattr(t, _ATTR, None)
    if fmt is not None:
        return fmt
    return int(Format.NCHW) if t.dim() == 4 else int(Format.ND)


def _target(name: str, acl_format) -> int:
    if isinstance(acl_format, Format):
        acl_format = int(acl_format)
    fmt = integer(name, "acl_format", acl_format)
    if fmt not in _VALID:
        fail(name, f"acl_format {fmt} is not a supported torch_npu.Format "
                   f"(valid: {sorted(_VALID)}; NC1HWC0_C04 is not supported by this version)")
    return fmt


@op
def npu_format_cast(input, acl_format, customize_dtype=None):
    name = "npu_format_cast"
    x = tensor(name, "input", input)
    fmt = _target(name, acl_format)
    if fmt == FRACTAL_NZ and x.dim() < 2:
        fail(name, f"FRACTAL_NZ needs at least 2 dims, got shape {list(x.shape)}")
    if customize_dtype is not None:
        # only int(torch.int32) == 3 is described (C0 = 8 for FRACTAL_NZ)
        if integer(name, "customize_dtype", customize_dtype) != 3:
            fail(name, f"customize_dtype must be None or 3 (int32), got {customize_dtype}")
    out = x.clone()
    setattr(out, _ATTR, fmt)
    return out


@op
def npu_format_cast_(input, acl_format):
    """In-place variant: the tensor itself takes the new format and is returned."""
    name = "npu_format_cast_"
    x = tensor(name, "input", input)
    fmt = _target(name, acl_format)
    setattr(x, _ATTR, fmt)
    return x


@op
def get_npu_format(input):
    return format_of(tensor("get_npu_format", "input", input))
