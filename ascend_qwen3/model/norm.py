"""RMSNorm module over ``ops.rms_norm`` / ``ops.add_rms_norm``."""

from __future__ import annotations

import torch
from torch import nn

import ops
from ..parallel.layers import empty_param


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, *, dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = empty_param(size, dtype=dtype, device=device)
        self.ops = ops.bind(device, "rms_norm", "add_rms_norm")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, into=None):
        """rms_norm(x); with a residual: (rms_norm(x + residual), x + residual).

        ``into``: the linear the result feeds. When its method quantises its input and can take
        the quantisation fused into this norm (``add_rms_norm_into``: one NPU kernel for add,
        norm and quantiser), the first result is that linear's input already quantised."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        fuse = getattr(getattr(into, "method", None), "add_rms_norm_into", None)
        fused = fuse(into, x, residual, self.weight, self.eps) if fuse is not None else None
        if fused is not None:
            return fused
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
