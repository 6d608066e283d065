"""Qwen3Graph: the project's Qwen3 / Qwen3-MoE graph: embedding, decoder layers, final norm, LM
head (tied or not). ``forward`` returns the final hidden states and ``compute_logits`` turns them
into logits, the split vLLM's model classes make (Hugging Face's ``Qwen3ForCausalLM.forward``
returns logits; hence the different name).

The forward takes the packed tokens of a step (TND) with their positions and attention metadata,
the same shape of call a serving engine makes, so the standalone generation loop and the vLLM
plugin drive the same graph.
"""

from __future__ import annotations

import torch
from torch import nn

import ops
from ..config import Qwen3Config
from ..parallel import SINGLE, ParallelContext
from ..parallel.layers import ParallelLMHead, VocabParallelEmbedding
from ..parallel.plan import check_parallel
from .decoder import Qwen3DecoderLayer
from .metadata import AttentionMetadata
from .norm import RMSNorm


class Qwen3Graph(nn.Module):
    def __init__(self, cfg: Qwen3Config, ctx: ParallelContext = SINGLE, *, device=None,
                 max_positions: int | None = None, quant=None, attention=None):
        """``quant``: a ``QuantConfig`` (W8A8 checkpoint) or None (float). ``attention``: None
        (standalone paged attention on caches passed to ``forward``) or a core factory, see
        ``model.attention.Qwen3Attention``."""
        super().__init__()
        check_parallel(cfg, ctx.tp_size, ctx.expert_parallel, ctx.dp_size)  # fail before allocating anything
        self.config, self.ctx, self.quant = cfg, ctx, quant
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx, dtype=cfg.dtype,
                                                   device=device)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, i, ctx, device=device, quant=quant,
                                                      attention=attention)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype, device=device)
        self.lm_head = ParallelLMHead(self.embed_tokens, ctx, tied=cfg.tie_word_embeddings,
                                      dtype=cfg.dtype, device=device)
        self.max_positions = max_positions or cfg.max_position_embeddings
        # RoPE rows of every position in the model dtype ([2, P, D]: ops.rope_table); a step
        # gathers its positions' rows once for all layers
        table = (torch.empty(2, self.max_positions, cfg.head_dim, dtype=cfg.dtype, device="meta")
                 if torch.device(device or "cpu").type == "meta" else
                 ops.rope_table(ops.rope_cos_sin_cache(cfg.head_dim, self.max_positions,
                                                       cfg.rope_theta, cfg.rope_scaling),
                                cfg.dtype).to(device))
        self.register_buffer("rope_table", table, persistent=False)
        # EAGLE-3 (a drafter that reads the target's inner states): the residual stream after
        # these many decoder layers (0: the embeddings) is returned beside the final hidden
        # states, in ascending order; empty: forward returns the hidden states alone
        self.aux_layers: tuple[int, ...] = ()

    def set_aux_layers(self, layers) -> None:
        """Return the residual stream after each of ``layers`` decoder layers (0..num_layers;
        repeated ids count once) from every ``forward``, as EAGLE-3 drafters read it."""
        wanted = sorted({int(i) for i in layers})
        bad = [i for i in wanted if not 0 <= i <= len(self.layers)]
        if bad:
            raise ValueError(f"auxiliary hidden-state layer id(s) {bad} out of range: this model has "
                             f"{len(self.layers)} decoder layers, so ids run from 0 (the "
                             f"embeddings) to {len(self.layers)} (after the last layer); use a draft "
                             f"trained for this model, or set eagle_aux_hidden_state_layer_ids in its "
                             f"config to ids in that range")
        self.aux_layers = tuple(wanted)

    def finalize_weights(self) -> None:
        """Once, after loading: put weights into the layout their kernels consume (quantised
        weights, scales, and float weights in the backend's prepared form)."""
        for m in self.modules():
            if m is not self and hasattr(m, "finalize"):
                m.finalize()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata | None = None,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                inputs_embeds: torch.Tensor | None = None):
        """input_ids, positions: [T]; kv_caches: one (key_cache, value_cache) per layer, or None
        when the attention cores own their caches (a serving engine's; then meta is None too).

        Returns the final hidden states [T, hidden] (normed); with ``aux_layers`` set, the pair
        (hidden states, [the residual stream [T, hidden] after each of those layers]).
        """
        if kv_caches is None:
            kv_caches = [None] * len(self.layers)
        else:
            if len(kv_caches) != len(self.layers):
                raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
            # (an engine bounds positions by its max_model_len; the host copy of the lengths
            # makes this check free of any device->host copy)
            longest = max(meta.seq_lens_host, default=0)
            if longest > self.max_positions:
                raise ValueError(f"position {longest - 1} exceeds the model's rotary table of "
                                 f"{self.max_positions} positions (max_position_embeddings)")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rope = ops.rope_cos_sin(self.rope_table, positions)     # once per step, for every layer
        residual = None
        aux = [h] if 0 in self.aux_layers else []
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            h, residual = layer(h, residual, rope, meta, kv)
            if i + 1 in self.aux_layers:      # the stream the next layer's norm would read
                aux.append(h + residual)
        h, _ = self.norm(h, residual)
        return (h, aux) if self.aux_layers else h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, vocab] logits (model dtype)."""
        return self.lm_head(hidden)
