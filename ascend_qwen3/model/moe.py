"""Qwen3-MoE sparse block: softmax top-k router, grouped expert GEMMs, weighted combine.

Expert placement (``ParallelContext``): without expert parallelism every rank holds all experts
with the expert FFN split by TP; with expert parallelism (ep) each rank holds E/tp whole experts.
Either way every rank sees all tokens, computes its share and the TP all-reduce sums the shares.
"""

from __future__ import annotations

import torch
from torch import nn

import ops
from ..config import Qwen3Config
from ..parallel import ParallelContext
from ..parallel.layers import empty_param
from ..parallel.plan import local_experts


class Qwen3MoeExperts(nn.Module):
    """Weights of this rank's experts in grouped-GEMM layout: w13 [E_l, H, 2I_l], w2 [E_l, I_l, H]."""

    def __init__(self, cfg: Qwen3Config, ctx: ParallelContext, *, device=None):
        super().__init__()
        self.first, self.count, self.inter = local_experts(cfg, ctx)
        H = cfg.hidden_size
        self.w13 = empty_param(self.count, H, 2 * self.inter, dtype=cfg.dtype, device=device)
        self.w2 = empty_param(self.count, self.inter, H, dtype=cfg.dtype, device=device)

    def forward(self, sorted_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """sorted_x: rows of this rank's experts only, grouped; counts [E_l]."""
        h = ops.grouped_matmul(sorted_x, self.w13, counts)
        return ops.grouped_matmul(ops.swiglu(h), self.w2, counts)


class Qwen3SparseMoeBlock(nn.Module):
    def __init__(self, cfg: Qwen3Config, ctx: ParallelContext, *, device=None):
        super().__init__()
        self.ctx = ctx
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.gate = empty_param(cfg.num_experts, cfg.hidden_size, dtype=cfg.dtype, device=device)
        self.experts = Qwen3MoeExperts(cfg, ctx, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(x, self.gate)
        weights, ids = ops.moe_gating_topk(logits, self.top_k, self.renormalize)
        sorted_x, pairs, counts = ops.moe_route(x, ids, self.num_experts)
        e0, e1 = self.experts.first, self.experts.first + self.experts.count
        if e1 - e0 == self.num_experts:
            expert_out = self.experts(sorted_x, counts)
        else:  # expert parallel: rows of this rank's experts are contiguous in the sorted order
            r0 = int(counts[:e0].sum())
            r1 = r0 + int(counts[e0:e1].sum())
            expert_out = torch.zeros_like(sorted_x)
            expert_out[r0:r1] = self.experts(sorted_x[r0:r1], counts[e0:e1])
        return self.ctx.all_reduce(ops.moe_combine(expert_out, pairs, weights))
