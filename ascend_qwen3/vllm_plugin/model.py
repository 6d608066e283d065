"""The project's Qwen3 / Qwen3-MoE graph as a vLLM model class.

vLLM builds ``AscendQwen3ForCausalLM(vllm_config=..., prefix=...)`` in each worker, runs its
``forward`` on the packed tokens of each step and samples from ``compute_logits``. Inside:

- the graph is ``ascend_qwen3.model.Qwen3Graph`` (``ops`` for every kernel), held by
  ``AscendQwen3Backbone``, which vLLM compiles (``support_torch_compile``) unless told
  ``--enforce-eager``;
- its tensor-parallel collectives go through vLLM's TP group (``VllmParallelContext``), with
  vLLM's TP rank and size; ``--enable-expert-parallel`` gives each rank whole experts;
  ``--pipeline-parallel-size`` gives each stage vLLM's share of the layers (``get_pp_indices``)
  and relays (hidden, residual) between stages as vLLM's ``IntermediateTensors`` (SupportsPP);
- attention is vLLM's ``Attention`` layer bound to the project's backend (``attention.py``), so
  vLLM owns the KV cache and metadata while ``ops`` does the work;
- weights are read by the project's loader, straight from the model directory, each rank reading
  only its slices; a ``quant_model_description.json`` next to the weights makes it a W8A8 model
  (msModelSlim format). No vLLM quantisation method is involved, so ``--quantization`` is not
  needed; engine options the classes do not implement are refused (``options.py``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

import ops
from ..config import ConfigError, Qwen3Config
from ..loader import checkpoint_files, checkpoint_prefix, load_weights
from ..model import Qwen3Graph
from ..parallel import ParallelContext
from ..parallel.plan import ShardingError, check_pipeline
from ..quant.description import QuantConfig
from ..speculative import (DRAFT_METHODS, METHODS, Speculative, SpeculativeError, check_draft,
                           default_eagle3_layers)
from . import compat
from . import cpu_kernels, npu_kernels
from .attention import ops_attention_backend
from .options import refusals_from_config

# a child of vLLM's own "vllm" logger, so these lines appear in the engine's log, in its format
logger = logging.getLogger("vllm.ascend_qwen3")


@dataclass(frozen=True)
class VllmParallelContext(ParallelContext):
    """The project's parallel context over vLLM's tensor-parallel group."""

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        # in the activation dtype, as vLLM's own models reduce (an fp32 reduction would move twice
        # the bytes over HCCL for bf16 models)
        return compat.tp_all_reduce(x)

    def _gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return compat.tp_all_gather(x, dim=-1)

    # expert parallel across data-parallel ranks: vLLM's groups and its step's token counts
    def dp_token_counts(self, local: int) -> list[int]:
        counts = compat.dp_token_counts()
        return counts if counts is not None else super().dp_token_counts(local)

    def dp_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return compat.dp_all_gather(x.contiguous())

    def dp_reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        return compat.dp_reduce_scatter(x.contiguous())

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        return compat.tp_all_gather(x, dim=0)

    def dispatch_active(self, tokens, first, n, rows):
        # vllm-ascend's mask of the step's real tokens where it keeps one (so padding rows of a
        # graph's batch send nothing, as in its own MC2 layers); else by the step's count
        mask = compat.mc2_active_mask(rows.shape[0])
        return super().dispatch_active(tokens, first, n, rows) if mask is None else \
            mask[first:first + n]


def _model_dir(model_config, load_config) -> str:
    path = model_config.model
    if os.path.isdir(path):
        return path
    try:   # a hub id: the files vLLM would download (our loader reads them from the snapshot)
        from huggingface_hub import snapshot_download
        return snapshot_download(path, revision=getattr(model_config, "revision", None),
                                 cache_dir=getattr(load_config, "download_dir", None),
                                 allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:
        raise ValueError(f"ascend-qwen3 reads weights from a local directory; {path!r} is not one "
                         f"and could not be downloaded ({exc}); pass the checkpoint directory") from None


class AscendQwen3Backbone(nn.Module):
    """The project's graph (embedding, decoder layers, final norm) as the part vLLM compiles.

    Decorated with vLLM's ``support_torch_compile`` by ``compiled_backbone`` (the decorator needs
    vLLM, which this module may only import inside functions vLLM calls): the same dynamic
    dimensions as vLLM's own ``Qwen3Model``, a keyword-only ``__init__(vllm_config, prefix)``.
    Attention stays vLLM's opaque ``unified_attention_with_output`` op (its impl runs eagerly,
    and is where piecewise graphs are split), the MoE experts are the ``ascend_qwen3::sparse_moe``
    op; everything else is traced. On vLLM's CPU build this means Dynamo traced once and Inductor
    (``DYNAMO_TRACE_ONCE``); with ``--enforce-eager`` it runs eagerly.
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        refused = refusals_from_config(vllm_config)
        if refused:
            raise ValueError("; ".join(refused))
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        try:   # hf_config carries --hf-overrides (architectures, YaRN rope_scaling, ...)
            cfg = Qwen3Config.from_dict(mc.hf_config.to_dict(), name=mc.model)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        self.config = cfg = cfg.with_dtype(mc.dtype)
        # --runner pooling: vLLM wraps the class (as_embedding_model) and pools the hidden states
        # this returns; the graph then has no output head (nothing allocated or read for it)
        self.pooling = check_pooling(vllm_config)
        rank, size = compat.tp_rank_and_size()
        ep = bool(getattr(pc, "enable_expert_parallel", False)) and cfg.is_moe
        dp_rank, dp_size = compat.dp_rank_and_size() if pc.data_parallel_size > 1 else (0, 1)
        # data parallel: each rank its own batch; with expert parallel the experts are spread
        # over dp x tp ranks and the MoE layers exchange tokens (model/moe.py)
        across_dp = ep and dp_size > 1
        # on the NPU, vllm-ascend's choice of exchange: dispatch and combine (MC2) for steps up
        # to its capacity where it would take them, over its MC2 group's HCCL communicator
        capacity = (compat.mc2_capacity(vllm_config, cfg.num_experts, dp_size * size, size)
                    if across_dp and compat.on_npu() else 0)
        self.ctx = VllmParallelContext(tp_rank=rank, tp_size=size, expert_parallel=ep,
                                       dp_rank=dp_rank if ep else 0, dp_size=dp_size if ep else 1,
                                       dp_group=compat.dp_cpu_group() if across_dp else None,
                                       dispatch_capacity=capacity,
                                       ep_hccl_name=compat.mc2_hccl_name() if capacity else None)
        if compat.on_npu() and compat.full_graphs_requested(vllm_config):
            compat.check_full_graph_protocol()    # before any weight is read
        # pipeline parallel: this rank's stage holds vLLM's share of the layers (get_pp_indices,
        # as vLLM's own Qwen3 takes it), after the project's check of the size
        self.pp_rank, self.pp_size = compat.pp_rank_and_size()
        try:
            check_pipeline(cfg, self.pp_size)
        except ShardingError as exc:
            raise ValueError(f"ascend-qwen3: --pipeline-parallel-size: {exc}") from None
        stage = compat.pp_stage_layers(cfg.num_layers) if self.pp_size > 1 else None
        if self.pp_size > 1 and not compat.on_npu():
            # vLLM's CPU runner would leave a later stage's relay buffer unallocated in eager
            # mode (cpu_kernels.fix_cpu_pipeline_relay)
            cpu_kernels.fix_cpu_pipeline_relay()
        check_speculative(vllm_config, cfg)
        self.model_dir = _model_dir(mc, vllm_config.load_config)
        self.files = checkpoint_files(self.model_dir)
        bare = not checkpoint_prefix(self.files, self.model_dir)   # a clear error before allocating
        if self.pooling:
            logger.info("ascend-qwen3: runner pooling: the graph has no output head; checkpoint "
                        "tensors named %s", "without the model. prefix (a bare Qwen3Model "
                        "export, as Qwen3-Embedding ships)" if bare else "model.*")
        self.quant = QuantConfig.from_model_dir(self.model_dir, cfg, set(self.files))
        # the engine's own kernels implement the ops they have kernels for: vLLM's on the CPU
        # (cpu_kernels.py), vllm-ascend's on the NPU (npu_kernels.py); registered before the
        # graph binds its ops
        self.engine_kernels = npu_kernels.register() if compat.on_npu() else cpu_kernels.register()
        backend = ops_attention_backend()
        cache_config = vllm_config.cache_config

        def attention(layer, num_heads, num_kv_heads, head_dim, scale):
            return VllmAttention(compat.make_attention_layer(
                num_heads=num_heads, head_dim=head_dim, scale=scale, num_kv_heads=num_kv_heads,
                cache_config=cache_config, backend=backend,
                prefix=_join(prefix, f"layers.{layer}.self_attn.attn.layer")))

        device = vllm_config.device_config.device
        self.graph = Qwen3Graph(cfg, self.ctx, device=device, quant=self.quant,
                                max_positions=max(mc.max_model_len, 1), attention=attention,
                                head=not self.pooling, layers=stage)
        self.attention_backend = backend

    @property
    def embed_tokens(self) -> nn.Module:
        """The token embedding, where vLLM's and vllm-ascend's EAGLE drafters take it
        (``target.model.embed_tokens``) to share it; called as ``embed_tokens(input_ids)``
        (None on a pipeline stage that does not hold it)."""
        return self.graph.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.graph.layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None):
        """A stage after the first reads the previous stage's ``intermediate_tensors``
        ("hidden_states", "residual"); a stage before the last returns them for the next one
        (vLLM's ``IntermediateTensors``), as vLLM's Qwen2Model does."""
        g = self.graph
        relay = None if g.is_first_stage else (intermediate_tensors["hidden_states"],
                                               intermediate_tensors["residual"])
        out = g(input_ids, positions, inputs_embeds=inputs_embeds, intermediate=relay)
        if g.is_last_stage:
            return out
        return compat.intermediate_tensors({"hidden_states": out[0], "residual": out[1]})


def check_pooling(vllm_config) -> bool:
    """True when the engine pools (``--runner pooling``): vLLM's ``as_embedding_model`` wraps the
    class (vllm/model_executor/models/adapters.py), calls ``forward`` for the final hidden states
    and pools them itself, and never asks for logits. Sequence classification (``--convert
    classify``, e.g. Qwen3-Reranker) is refused: its adapter reads a Hugging Face config object
    and a vLLM score layer from the model, which the project's class does not have."""
    if compat.runner_type(vllm_config) != "pooling":
        return False
    convert = compat.convert_type(vllm_config)
    if convert not in ("embed", "none"):
        raise ValueError(f"ascend-qwen3: --runner pooling with --convert {convert} is not served by "
                         f"the project's classes (they serve embeddings: --convert embed, the "
                         f"default for a Qwen3 checkpoint); serve this model with vLLM's built-in "
                         f"Qwen3 class (without the architecture override or "
                         f"ASCEND_QWEN3_TAKE_OVER)")
    return True


def _join(*parts: str) -> str:
    """A module prefix, as vLLM's ``maybe_prefix`` joins them ("" parts dropped)."""
    return ".".join(p.rstrip(".") for p in parts if p)


def check_speculative(vllm_config, cfg: Qwen3Config) -> None:
    """The engine's speculative config against this target, before any weight is read: a draft
    whose hidden size, vocabulary or layer ids do not fit, or too many tokens for the NPU, stops
    the start with what was expected and found (``ascend_qwen3.speculative``)."""
    sc = getattr(vllm_config, "speculative_config", None)
    if sc is None or getattr(vllm_config.model_config, "runner", None) == "draft":
        return
    method = getattr(sc, "method", None)
    pp = getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1)
    if pp > 1:
        # vLLM runs the drafter on the last stage only; EAGLE / EAGLE-3 there need the target's
        # embedding and its auxiliary states relayed from earlier stages, which the project's
        # classes do not do (vLLM's EagleModelMixin does it for its own models)
        raise ValueError(f"ascend-qwen3: speculative decoding ({method}) with pipeline parallel "
                         f"(--pipeline-parallel-size {pp}) is not supported by the project's "
                         f"classes; serve it with --pipeline-parallel-size 1 (use tensor "
                         f"parallel to spread the model), or drop --speculative-config")
    device = "npu" if compat.on_npu() else "cpu"
    if method not in METHODS:
        raise ValueError(f"ascend-qwen3: speculative method {method!r} is not served by the "
                         f"project's classes (served: {', '.join(METHODS)}); use one of those, "
                         f"or vLLM's built-in Qwen3 class")
    dmc = getattr(sc, "draft_model_config", None)
    spec = Speculative(method, int(sc.num_speculative_tokens), getattr(dmc, "model", None))
    try:
        check_draft(cfg, spec, device,
                    draft=dmc.hf_config.to_dict() if method in DRAFT_METHODS else None)
    except SpeculativeError as exc:
        raise ValueError(f"ascend-qwen3: speculative decoding: {exc}") from None


class SharedLMHead(nn.Module):
    """The project's output head in the form vLLM's ``LogitsProcessor`` calls a head: what an
    EAGLE draft without a head of its own takes as ``target.lm_head`` (vLLM's
    ``SpecDecodeBaseProposer._maybe_share_lm_head``) and then calls through
    ``lm_head.quant_method.apply(lm_head, hidden, bias)``, gathering the rank's vocabulary slice
    itself when ``tp_size`` > 1. The head is referenced, not owned (its weight stays the graph's)."""

    class _Apply:
        @staticmethod
        def apply(layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            head = layer._head[0]
            w = getattr(head, "weight", None)
            if w is None:          # tied and not finalised: the embedding itself
                w = head._embedding[0].weight
            y = head.ops.linear(x, w)
            return y if bias is None else y + bias

    quant_method = _Apply()

    def __init__(self, head: nn.Module):
        super().__init__()
        self._head = [head]                      # not a submodule: owned by the graph
        self.tp_size = head.ctx.tp_size
        rank = head.ctx.tp_rank
        self.org_vocab_size = head.vocab_size
        pad = max(0, (rank + 1) * head.per_rank - head.vocab_size)
        self.shard_indices = type("ShardIndices", (), {
            "org_vocab_start_index": rank * head.per_rank, "num_org_vocab_padding": pad})()

    @property
    def weight(self) -> torch.Tensor:
        head = self._head[0]
        w = getattr(head, "weight", None)
        return head._embedding[0].weight if w is None else w

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head[0](hidden)


@functools.cache
def compiled_backbone() -> type:
    """``AscendQwen3Backbone`` under vLLM's ``support_torch_compile`` (decorated once per process)."""
    from vllm.compilation.decorators import support_torch_compile

    # the module uses `from __future__ import annotations`, so vLLM cannot infer the dynamic
    # dimensions from the annotations: they are given, as vLLM's Qwen3Model declares them
    return support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1,
                                                   "intermediate_tensors": 0,
                                                   "inputs_embeds": 0})(AscendQwen3Backbone)


class AscendQwen3ForCausalLM(nn.Module):
    """The project's Qwen3 for vLLM; also a speculative-decoding target (vLLM's ``SupportsEagle``
    and ``SupportsEagle3`` protocols, met by these members: the runner checks them with
    ``isinstance`` on its runtime-checkable protocols): ``model.embed_tokens`` and ``lm_head``
    as EAGLE drafters share them, and the residual stream of the layers an EAGLE-3 draft names
    returned beside the hidden states from every forward (``set_aux_hidden_state_layers``)."""

    supports_eagle = True
    supports_eagle3 = True
    has_own_lm_head = False
    has_own_embed_tokens = False
    # LoRA (vLLM's SupportsLoRA, vllm/model_executor/models/interfaces.py: a runtime-checkable
    # protocol, so every member is here): adapters on the attention and dense-MLP projections,
    # none on the embedding or the head (lora.py)
    supports_lora = True
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}
    embedding_modules: dict = {}
    is_3d_moe_weight = False
    is_non_gated_moe = False
    lora_skip_prefixes: list = []
    lora_manager = None
    # pipeline parallel (vLLM's SupportsPP, vllm/model_executor/models/interfaces.py: the class
    # must carry supports_pp, make_empty_intermediate_tensors and a forward taking the keyword
    # intermediate_tensors; the registry checks the class itself, so the factory is a method)
    supports_pp = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        self.model = compiled_backbone()(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        self.config, self.ctx, self.quant = self.model.config, self.model.ctx, self.model.quant
        self.lora_config = getattr(vllm_config, "lora_config", None)
        if self.lora_config is not None:    # vLLM's LoRA manager on the project's linears
            from . import lora
            lora.check_lora_config(self.lora_config, self.config)
            self.hf_to_vllm_mapper = lora.weights_mapper()   # adapter names -> this tree
        cc = vllm_config.compilation_config
        self._compilation = ("off (eager)" if self.model.do_not_compile else
                             f"torch.compile {getattr(cc.mode, 'name', cc.mode)}, backend "
                             f"{cc.backend or 'default'}, cudagraph_mode "
                             f"{getattr(cc.cudagraph_mode, 'name', cc.cudagraph_mode)}")
        self._compiled_said = False
        # the engine compiles, so the CPU ops written in PyTorch may be compiled too (the decode
        # attention runs in vLLM's opaque attention op, outside the compiled backbone)
        ops.compile_kernels(not self.model.do_not_compile)
        cfg = self.config
        kernels = (ops.registered_kernels("npu" if compat.on_npu() else "cpu")
                   if self.model.engine_kernels else None)
        g = self.model.graph
        logger.info("ascend-qwen3 %s: %s, tp %d/%d%s%s, %s, attention %s, compilation %s, "
                    "kernels %s", type(self).__name__, cfg.architecture, self.ctx.tp_rank,
                    self.ctx.tp_size, " (expert parallel)" if self.ctx.expert_parallel else "",
                    f", pp {self.model.pp_rank}/{self.model.pp_size} (layers "
                    f"{g.start_layer}..{g.end_layer - 1})" if self.model.pp_size > 1 else "",
                    "W8A8 (" + self.quant.model_quant_type + ")" if self.quant else str(cfg.dtype),
                    self.model.attention_backend.__name__, self._compilation,
                    f"{kernels.name} for {', '.join(sorted(kernels.ops))}" if kernels else
                    "ops' own (" + ("torch_npu" if compat.on_npu() else "the specification") + ")")

    # --- the vLLM model interface --------------------------------------------------------------

    @property
    def lm_head(self) -> SharedLMHead:
        head = self.__dict__.get("_shared_head")
        if head is None and self.model.pooling:
            raise AttributeError("ascend-qwen3: a pooling model (--runner pooling) has no output "
                                 "head; it returns hidden states for vLLM's pooler")
        if head is None:
            head = self.__dict__["_shared_head"] = SharedLMHead(self.model.graph.lm_head)
        return head

    def set_aux_hidden_state_layers(self, layers: tuple[int, ...]) -> None:
        """EAGLE-3: from now on every forward returns (hidden states, [the residual stream after
        each of ``layers`` layers]), in ascending layer order, each id once (as vLLM's
        ``EagleModelMixin``). vLLM's runner calls it at load, before warm-up and compilation."""
        self.model.graph.set_aux_layers(layers)
        logger.info("ascend-qwen3 %s: auxiliary hidden states after layers %s for EAGLE-3",
                    type(self).__name__, self.model.graph.aux_layers)

    def get_eagle3_default_aux_hidden_state_layers(self) -> tuple[int, ...]:
        return default_eagle3_layers(self.config.num_layers)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.graph.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        """The final hidden states [T, hidden]; for an EAGLE-3 drafter (aux layers set) the pair
        (hidden states, [aux states])."""
        hidden = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        if not self._compiled_said and (getattr(self.model, "compiled", False)   # compiled now,
                                        or getattr(self.model, "aot_compiled_fn", None)):  # or loaded
            self._compiled_said = True
            logger.info("ascend-qwen3 %s: the backbone is compiled (%s)", type(self).__name__,
                        self._compilation)
        return hidden

    def make_empty_intermediate_tensors(self, batch_size: int, dtype: torch.dtype,
                                        device: torch.device):
        """The (zero) tensors a stage after the first receives, for vLLM's dummy and profiling
        runs: "hidden_states" and "residual", [batch_size, hidden] each (as vLLM's
        ``make_empty_intermediate_tensors_factory`` makes them)."""
        shape = (batch_size, self.config.hidden_size)
        return compat.intermediate_tensors({
            key: torch.zeros(shape, dtype=dtype, device=device)
            for key in ("hidden_states", "residual")})

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab]; vLLM calls it on the last pipeline stage only (the one that holds
        the head)."""
        return self.model.graph.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Reads this rank's slices with the project's loader (``weights``, vLLM's iterator over
        whole tensors, is left unread). Returns the names of the parameters it filled, every
        parameter of the backbone (all are filled or the loader has raised, naming the tensor):
        vLLM's ``DefaultModelLoader`` raises for any other parameter of the model (one a pooling
        adapter added, say). The loader finds the checkpoint's naming itself ("model." or a bare
        ``Qwen3Model`` export, as Qwen3-Embedding ships) and, in a pooling model, reads no head.

        The same method serves vLLM's pooling adapters, in place of theirs (``__init_subclass__``)."""
        m = self.model
        load_weights(m.graph, m.model_dir, self.config, self.ctx, self.quant, m.files)
        m.graph.finalize_weights()
        if self.lora_config is not None:    # after loading: the loader addresses the graph's own layers
            from . import lora
            n = lora.install(m.graph, self.config, self.ctx)
            logger.info("ascend-qwen3 %s: LoRA on %d projections (vLLM's LoRA manager, ops "
                        "lora_shrink/lora_expand)", type(self).__name__, n)
        # (vLLM lists the model's parameters after this call: their names once LoRA is installed)
        return {_join("model", name) for name, _ in m.named_parameters()}

    def __init_subclass__(cls, **kwargs):
        """vLLM's pooling adapters (``as_embedding_model`` / ``as_seq_cls_model`` build their class
        with ``_create_pooling_model_cls``, vllm/model_executor/models/adapters.py, 0.23 and 0.32)
        subclass this class with a ``load_weights`` that finds the checkpoint's naming by taking
        tensors from vLLM's weight iterator, cloning each, until one's name, bare or under
        "model.", is a parameter of the model, and then hands all of them on. This class's
        parameters are named by the project's graph (``model.graph.layers.N.self_attn.qkv_proj``
        ...), so no name would match: the whole checkpoint would be read and cloned into host
        memory, to be dropped unread by this class's ``load_weights``, which reads the files
        itself and finds the naming itself (``loader.checkpoint_prefix``). So the adapter's class
        gets this class's ``load_weights`` back; its pooler and everything else stay vLLM's."""
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("is_pooling_model") and "load_weights" in cls.__dict__:
            cls.load_weights = AscendQwen3ForCausalLM.load_weights


class AscendQwen3MoeForCausalLM(AscendQwen3ForCausalLM):
    """The same graph for Qwen3-MoE configs (the config decides which layers are sparse)."""


class VllmAttention(nn.Module):
    """An attention core for ``Qwen3Attention``: vLLM's ``Attention`` layer (our backend)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta, kv_cache) -> torch.Tensor:
        T, H, D = q.shape
        return self.layer(q.reshape(T, H * D), k.reshape(T, -1), v.reshape(T, -1)).view(T, H, D)
