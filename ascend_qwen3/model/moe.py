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
from ..quant.format import W8A8_DYNAMIC
from ..quant.layers import apply_experts, create_experts, finalize_experts


class Qwen3MoeExperts(nn.Module):
    """Weights of this rank's experts in grouped-GEMM layout: w13 [E_l, H, 2I_l], w2 [E_l, I_l, H]."""

    def __init__(self, cfg: Qwen3Config, ctx: ParallelContext, *, device=None, scheme: str | None = None):
        super().__init__()
        self.first, self.count, self.inter = local_experts(cfg, ctx)
        self.scheme, self.dtype = scheme, cfg.dtype
        H = cfg.hidden_size
        if scheme is None:
            self.w13 = empty_param(self.count, H, 2 * self.inter, dtype=cfg.dtype, device=device)
            self.w2 = empty_param(self.count, self.inter, H, dtype=cfg.dtype, device=device)
        elif scheme == W8A8_DYNAMIC:
            create_experts(self, self.count, H, self.inter, device=device)
        else:
            raise ValueError(f"MoE experts support W8A8_DYNAMIC quantisation only, not {scheme}")

    def finalize(self) -> None:
        if self.scheme is not None:
            finalize_experts(self)

    def forward(self, sorted_x: torch.Tensor, counts: torch.Tensor,
                token_scale: torch.Tensor | None = None) -> torch.Tensor:
        """sorted_x: rows of this rank's experts only, grouped; counts [E_l]. For quantised
        experts sorted_x is int8 with its per-row ``token_scale``."""
        if self.scheme is not None:
            return apply_experts(self, sorted_x, token_scale, counts, self.dtype)
        h = ops.grouped_matmul(sorted_x, self.w13, counts)
        return ops.grouped_matmul(ops.swiglu(h), self.w2, counts)


class Qwen3SparseMoeBlock(nn.Module):
    def __init__(self, cfg: Qwen3Config, ctx: ParallelContext, *, device=None, quant=None,
                 prefix: str = ""):
        super().__init__()
        self.ctx = ctx
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.gate = empty_param(cfg.num_experts, cfg.hidden_size, dtype=cfg.dtype, device=device)
        scheme = quant.scheme(prefix + "experts") if quant is not None else None
        self.experts = Qwen3MoeExperts(cfg, ctx, device=device, scheme=scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(x, self.gate)
        weights, ids = ops.moe_gating_topk(logits, self.top_k, self.renormalize)
        if self.experts.scheme is not None:  # int8 experts: the dynamic quant fused into routing
            sorted_x, pairs, counts, token_scale = ops.moe_route_quant(x, ids, self.num_experts)
        else:
            (sorted_x, pairs, counts), token_scale = ops.moe_route(x, ids, self.num_experts), None
        e0, e1 = self.experts.first, self.experts.first + self.experts.count
        if e1 - e0 == self.num_experts:
            expert_out = self.experts(sorted_x, counts, token_scale)
        else:  # expert parallel: rows of this rank's experts are contiguous in the sorted order
            r0 = int(counts[:e0].sum())
            r1 = r0 + int(counts[e0:e1].sum())
            expert_out = torch.zeros(sorted_x.shape, dtype=x.dtype, device=x.device)
            expert_out[r0:r1] = self.experts(sorted_x[r0:r1], counts[e0:e1],
                                             None if token_scale is None else token_scale[r0:r1])
        return self.ctx.all_reduce(ops.moe_combine(expert_out, pairs, weights))
