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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x); with a residual: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
