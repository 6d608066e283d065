"""Qwen3Graph: the project's Qwen3 / Qwen3-MoE graph: embedding, decoder layers, final norm, LM
head (tied or not). ``forward`` returns the final hidden states and ``compute_logits`` turns them
into logits, the split vLLM's model classes make (Hugging Face's ``Qwen3ForCausalLM.forward``
returns logits; hence the different name).

The forward takes the packed tokens of a step (TND) with their positions and attention metadata,
the same shape of call a serving engine makes, so the standalone generation loop and the vLLM
plugin drive the same graph.

Pipeline parallel: a graph built with ``layers=(start, end)`` is one stage. It holds only those
decoder layers (under their global indices: ``layers.{i}``, checkpoint ``model.layers.{i}``; the
others are ``MissingLayer`` placeholders), the embedding only on the first stage (and on the last
when the head is tied to it), the final norm and the head only on the last stage, as vLLM's
Qwen3 does (``vllm/model_executor/models/qwen2.py`` Qwen2Model, ``models/utils.py``
make_layers / PPMissingLayer). A stage after the first takes the stream (hidden, residual) of the
stage before it; a stage before the last returns that pair instead of normed hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

import ops
from ..config import Qwen3Config
from ..parallel import SINGLE, ParallelContext
from ..parallel.layers import ParallelLMHead, VocabParallelEmbedding
from ..parallel.plan import check_parallel, stage_holds
from .decoder import Qwen3DecoderLayer
from .metadata import AttentionMetadata
from .norm import RMSNorm


class MissingLayer(nn.Module):
    """The place of a decoder layer another pipeline stage holds: no parameters, never run (the
    role of vLLM's ``PPMissingLayer``). It keeps ``layers[i]`` and the parameter names global."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.layer} belongs to another pipeline stage")


class Qwen3Graph(nn.Module):
    def __init__(self, cfg: Qwen3Config, ctx: ParallelContext = SINGLE, *, device=None,
                 max_positions: int | None = None, quant=None, attention=None,
                 layers: tuple[int, int] | None = None, head: bool = True):
        """``quant``: a ``QuantConfig`` (W8A8 checkpoint) or None (float). ``attention``: None
        (standalone paged attention on caches passed to ``forward``) or a core factory, see
        ``model.attention.Qwen3Attention``. ``layers``: (start, end), the decoder layers of this
        pipeline stage (``parallel.plan.stage_layers``); None: the whole model. ``head=False``:
        no output head at all (a pooling model, which returns hidden states and never logits;
        nothing is allocated or loaded for the head, tied or not)."""
        super().__init__()
        check_parallel(cfg, ctx.tp_size, ctx.expert_parallel, ctx.dp_size)  # fail before allocating anything
        holds = stage_holds(cfg, layers)
        self.config, self.ctx, self.quant = cfg, ctx, quant
        self.start_layer, self.end_layer = (0, cfg.num_layers) if layers is None else layers
        self.is_first_stage = self.start_layer == 0
        self.is_last_stage = self.end_layer == cfg.num_layers
        # the embedding: the first stage's input; on the last stage the tied head's weight
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx,
                                                    dtype=cfg.dtype, device=device)
                             if holds["embed"] else None)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, i, ctx, device=device, quant=quant,
                                                      attention=attention)
                                    if self.start_layer <= i < self.end_layer else MissingLayer(i)
                                    for i in range(cfg.num_layers))
        self.norm = (RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype, device=device)
                     if holds["norm"] else None)
        self.lm_head = None
        if holds["head"] and head:
            # (an untied head on a stage without the embedding takes only its shape from one,
            # made on the meta device: no memory)
            shape = self.embed_tokens or VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                                ctx, dtype=cfg.dtype, device="meta")
            self.lm_head = ParallelLMHead(shape, ctx, tied=cfg.tie_word_embeddings,
                                          dtype=cfg.dtype, device=device)
        self.max_positions = max_positions or cfg.max_position_embeddings
        # RoPE rows of every position in the model dtype ([2, P, D]: ops.rope_table); a step
        # gathers its positions' rows once for all layers. The same values in vLLM's layout
        # ([P, D], cos half then sin half: ops.rope_cos_sin_cache in the model dtype) for
        # kernels that gather their rows themselves (ops.qkv_norm_rope, ops.rope_step)
        if torch.device(device or "cpu").type == "meta":
            table = torch.empty(2, self.max_positions, cfg.head_dim, dtype=cfg.dtype, device="meta")
            cache = torch.empty(self.max_positions, cfg.head_dim, dtype=cfg.dtype, device="meta")
        else:
            cache = ops.rope_cos_sin_cache(cfg.head_dim, self.max_positions, cfg.rope_theta,
                                           cfg.rope_scaling)
            table = ops.rope_table(cache, cfg.dtype).to(device)
            cache = cache.to(cfg.dtype).to(device)
        self.register_buffer("rope_table", table, persistent=False)
        self.register_buffer("rope_cache", cache, persistent=False)
        # EAGLE-3 (a drafter that reads the target's inner states): the residual stream after
        # these many decoder layers (0: the embeddings) is returned beside the final hidden
        # states, in ascending order; empty: forward returns the hidden states alone
        self.aux_layers: tuple[int, ...] = ()

    def set_aux_layers(self, layers) -> None:
        """Return the residual stream after each of ``layers`` decoder layers (0..num_layers;
        repeated ids count once) from every ``forward``, as EAGLE-3 drafters read it."""
        wanted = sorted({int(i) for i in layers})
        if wanted and not (self.is_first_stage and self.is_last_stage):
            raise ValueError(f"auxiliary hidden states (EAGLE-3) need the whole model in one "
                             f"pipeline stage; this stage holds layers [{self.start_layer}, "
                             f"{self.end_layer}) of {len(self.layers)}: serve EAGLE-3 with "
                             f"pipeline-parallel size 1")
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

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata | None = None,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                inputs_embeds: torch.Tensor | None = None,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """input_ids, positions: [T]; kv_caches: one (key_cache, value_cache) per layer of this
        stage, or None when the attention cores own their caches (a serving engine's; then meta
        is None too). ``intermediate``: on a stage after the first, the (hidden, residual)
        [T, hidden] pair the stage before returned (input_ids are then not read).

        Returns the final hidden states [T, hidden] (normed); with ``aux_layers`` set, the pair
        (hidden states, [the residual stream [T, hidden] after each of those layers]). A stage
        before the last returns the pair (hidden, residual) for the next stage.
        """
        local = self.end_layer - self.start_layer
        if kv_caches is None:
            kv_caches = [None] * local
        else:
            if len(kv_caches) != local:
                raise ValueError(f"got {len(kv_caches)} KV caches for the {local} layers of this "
                                 f"stage ([{self.start_layer}, {self.end_layer}))")
            # (an engine bounds positions by its max_model_len; the host copy of the lengths
            # makes this check free of any device->host copy)
            longest = max(meta.seq_lens_host, default=0)
            if longest > self.max_positions:
                raise ValueError(f"position {longest - 1} exceeds the model's rotary table of "
                                 f"{self.max_positions} positions (max_position_embeddings)")
        if self.is_first_stage:
            h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
        elif intermediate is None:
            raise ValueError(f"this pipeline stage starts at layer {self.start_layer}: pass the "
                             f"previous stage's (hidden, residual) as intermediate=")
        else:
            h, residual = intermediate
        rope = ops.rope_step(self.rope_table, self.rope_cache, positions)   # once per step
        aux = [h] if 0 in self.aux_layers else []
        for i, kv in enumerate(kv_caches, start=self.start_layer):
            h, residual = self.layers[i](h, residual, rope, meta, kv)
            if i + 1 in self.aux_layers:      # the stream the next layer's norm would read
                aux.append(h + residual)
        if not self.is_last_stage:
            return h, residual
        h, _ = self.norm(h, residual)
        return (h, aux) if self.aux_layers else h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, vocab] logits (model dtype); the last pipeline stage only."""
        if self.lm_head is None and self.is_last_stage:
            raise RuntimeError("this graph was built without an output head (head=False: a "
                               "pooling model, which returns hidden states); build it with "
                               "head=True for logits")
        if self.lm_head is None:
            raise RuntimeError(f"logits come from the last pipeline stage; this stage holds layers "
                               f"[{self.start_layer}, {self.end_layer}) of {len(self.layers)}")
        return self.lm_head(hidden)
