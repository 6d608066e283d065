"""Qwen3 dense feed-forward: fused gate/up projection, SwiGLU, down projection."""

from __future__ import annotations

import torch
from torch import nn

import ops
from ..parallel import ParallelContext
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, divide
from ..quant.layers import linear_method


class Qwen3MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, ctx: ParallelContext, *, dtype,
                 device=None, quant=None, prefix: str = ""):
        super().__init__()
        local = divide(intermediate_size, ctx.tp_size, "intermediate_size")
        self.gate_up_proj = ColumnParallelLinear(hidden_size, 2 * local, dtype=dtype, device=device,
                                                 method=linear_method(quant, prefix + "gate_up_proj"))
        self.down_proj = RowParallelLinear(local, hidden_size, ctx, dtype=dtype, device=device,
                                           method=linear_method(quant, prefix + "down_proj"))
        self.ops = ops.bind(device, "swiglu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.swiglu(self.gate_up_proj(x)))
