"""One pre-norm Qwen3 decoder layer (attention + dense MLP or sparse MoE), residual fused."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Qwen3Config
from ..parallel import ParallelContext
from .attention import Qwen3Attention
from .metadata import AttentionMetadata
from .mlp import Qwen3MLP
from .moe import Qwen3SparseMoeBlock
from .norm import RMSNorm


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int, ctx: ParallelContext, *, device=None, quant=None,
                 attention=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype,
                                                device=device)
        p = f"layers.{layer}."
        self.self_attn = Qwen3Attention(cfg, ctx, device=device, quant=quant, prefix=p + "self_attn.",
                                        attention=attention, layer=layer)
        if cfg.is_moe_layer(layer):
            self.mlp = Qwen3SparseMoeBlock(cfg, ctx, device=device, quant=quant, prefix=p + "mlp.")
        else:
            self.mlp = Qwen3MLP(cfg.hidden_size, cfg.intermediate_size, ctx, dtype=cfg.dtype,
                                device=device, quant=quant, prefix=p + "mlp.")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                rope: tuple, meta: AttentionMetadata, kv_cache):
        """rope: the step's rotation (``ops.rope_step``), shared by the layers."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:   # (a W8A8 qkv_proj gets its input quantised by the norm)
            h, residual = self.input_layernorm(x, residual, into=self.self_attn.qkv_proj)
        h = self.self_attn(h, rope, meta, kv_cache)
        h, residual = self.post_attention_layernorm(h, residual,
                                                    into=getattr(self.mlp, "gate_up_proj", None))
        return self.mlp(h), residual
