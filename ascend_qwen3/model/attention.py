"""Qwen3 self-attention: fused QKV, QK-Norm, RoPE, paged KV cache, GQA.

The attention proper (cache write + paged attention) is a replaceable core: ``PagedAttention``
runs ``ops`` on a cache the caller passes in (the standalone runner); a serving engine supplies
its own core through ``attention=`` (the vLLM plugin's core reads vLLM's cache and metadata).
A core is ``core(q [T,H,D], k [T,Hkv,D], v [T,Hkv,D], meta, kv_cache) -> [T,H,D]``.
"""

from __future__ import annotations

import torch
from torch import nn

import ops
from ..config import Qwen3Config
from ..parallel import ParallelContext
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, empty_param
from ..quant.layers import linear_method
from ..parallel.plan import local_heads
from .metadata import AttentionMetadata


class PagedAttention(nn.Module):
    """Write this step's K/V into the caller's (key_cache, value_cache) and attend over it."""

    def __init__(self, scale: float, device=None):
        super().__init__()
        self.scale = scale
        self.ops = ops.bind(device, "write_kv_cache", "paged_attention")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        key_cache, value_cache = kv_cache
        self.ops.write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        return self.ops.paged_attention(q, key_cache, value_cache, meta.block_tables,
                                        meta.query_start_loc, meta.seq_lens, self.scale,
                                        query_start_loc_host=meta.query_start_loc_host,
                                        seq_lens_host=meta.seq_lens_host)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, ctx: ParallelContext, *, device=None, quant=None,
                 prefix: str = "", attention=None, layer: int = 0):
        """``attention``: None for ``PagedAttention``, or a factory
        ``attention(layer, num_heads, num_kv_heads, head_dim, scale) -> core`` (per-rank heads)."""
        super().__init__()
        self.head_dim = cfg.head_dim
        self.num_heads, self.num_kv_heads = local_heads(cfg, ctx.tp_size)
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.head_dim ** -0.5
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                             dtype=cfg.dtype, device=device,
                                             method=linear_method(quant, prefix + "qkv_proj"))
        self.o_proj = RowParallelLinear(self.q_size, cfg.hidden_size, ctx,
                                        dtype=cfg.dtype, device=device,
                                        method=linear_method(quant, prefix + "o_proj"))
        self.q_norm = empty_param(cfg.head_dim, dtype=cfg.dtype, device=device)
        self.k_norm = empty_param(cfg.head_dim, dtype=cfg.dtype, device=device)
        self.ops = ops.bind(device, "qkv_norm_rope")
        self.attn = (PagedAttention(self.scale, device) if attention is None else
                     attention(layer, self.num_heads, self.num_kv_heads, self.head_dim, self.scale))

    def forward(self, x: torch.Tensor, rope: tuple, meta: AttentionMetadata | None,
                kv_cache) -> torch.Tensor:
        """x [T, hidden]; rope: this step's rotation, ``ops.rope_step``, made once per step."""
        T = x.shape[0]
        # split, QK-norm (RMSNorm over head_dim of every head, one weight [D] shared by the
        # heads) and RoPE: one op, which a platform may run as one kernel
        q, k, v = self.ops.qkv_norm_rope(self.qkv_proj(x), self.q_norm, self.k_norm, self.eps,
                                         rope, self.num_heads, self.num_kv_heads)
        out = self.attn(q, k, v, meta, kv_cache)
        return self.o_proj(out.reshape(T, self.q_size))
