"""vLLM's CPU kernels as the implementation of the project's ops, inside vLLM on the CPU.

vLLM's CPU build ships hand-written C++ kernels for the work its own Qwen3 classes do; the
plugin registers them with ``ops.register_kernels`` ("vllm-cpu") when the project's model is
built inside vLLM on the CPU (``register``), so the project's graph runs them behind the same
op interface the NPU backend implements with torch_npu. ``ASCEND_QWEN3_ENGINE_KERNELS=0`` turns
the registration off: the specification (``ops.cpu``) runs instead. ``tests/test_cpu_kernels.py``
holds each kernel to the specification.

Registered:

- ``prepare_linear_weight`` + ``linear`` (together: the packed weight): vLLM's oneDNN matmul,
  ``_C::create_onednn_mm_handler`` once per weight and ``_C::onednn_mm`` per call, as vLLM's
  own linear layers use it on the CPU (``dispatch_cpu_unquantized_gemm`` in
  ``vllm/model_executor/layers/utils.py``). The handler packs the weight into memory of its
  own; the prepared "weight" the graph keeps is its handle, an int64 tensor holding the
  handler's address viewed as [N, K] (stride 0: 8 bytes), which owns the handler (released
  with it). Being a C++ op with tensor arguments, it is called straight from the compiled
  graph, without the Python of the specification's custom op (``ascend_qwen3_ops::linear``);
  at batch 8 it was also about 3% faster per call than oneDNN's ``_linear_pointwise`` here.
- ``write_kv_cache`` + ``paged_attention`` (together: they share vLLM's page layout):
  ``_C::cpu_attn_reshape_and_cache`` and ``_C::cpu_attention_with_kv_cache``, called as vLLM's
  ``CPUAttentionBackendImpl`` calls them (``vllm/v1/attention/backends/cpu_attn.py``): one call
  for a step's decode, prefill and chunked-prefill requests alike, over vLLM's cache
  ``[blocks, kv_heads, block_size, 2 x head_size]``, whose pages hold keys and values in an
  instruction-set-specific packing ("vec", "vec16", "amx"; only these two kernels read it). The
  per-step work split (``scheduler_metadata``) is what vLLM's metadata builder made for the step
  (the ``plan`` argument); without one (a direct call) it is made here.
- ``prepare_moe_experts`` + ``moe_experts`` (together: the packed weight layout):
  ``_C::prepack_moe_weight`` once at load, ``_C::cpu_fused_moe`` per layer and step (vLLM's
  ``CPUUnquantizedExperts``, ``vllm/model_executor/layers/fused_moe/experts/cpu_moe.py``): routing,
  both expert GEMMs, SiLU-and-mul and the weighted sum in one call. The kernel has no expert map,
  so under expert parallel the pairs of other ranks' experts are sent to local expert 0 with
  weight 0 (computed, adding nothing). The intermediate size is zero-padded to a multiple of 32,
  as vLLM pads it. Quantised (W8A8_DYNAMIC) experts keep the project's int8 path: vLLM's
  ``cpu_fused_moe_int8`` is not compiled for x86.
- ``lora_shrink`` / ``lora_expand``: vLLM's CPU punica kernels, ``bgmv_shrink`` and
  ``bgmv_expand_slice`` of ``vllm/lora/ops/torch_ops/lora_ops.py`` (what ``PunicaWrapperCPU``,
  ``vllm/lora/punica_wrapper/punica_cpu.py``, runs for decode; its prefill path expands per-request
  indices to the same per-token form first). They index the stacked weights with the token's
  slot as it is, so a slot -1 ("no adapter", ``PunicaWrapperBase.token_lora_indices``) would
  select the last slot by Python's negative indexing: here the slots are clamped to >= 0 and
  the -1 rows masked (h set to 0 after the shrink; an exact 0 added by the expand), on the
  tensors, without reading them. bgmv_expand_slice multiplies in y's dtype (h rounded to it,
  the product rounded once more before the add): in bf16 two roundings more than the
  specification's one; in fp32 the same numbers up to the order of the sums. The shrink
  multiplies in float32, as the specification does.

Not registered: vLLM's ``rms_norm`` / ``fused_add_rms_norm`` / ``rotary_embedding`` /
``silu_and_mul``. Inside vLLM's compiled graph (its default on the CPU) Inductor already fuses
the project's norms, rotary embedding and SwiGLU with their neighbours; an opaque C++ call there
would split that fusion (``bench/engine_profile.py`` shows these ops are not where the time
goes). vLLM 0.23 and 0.32 differ in a few of these calls; ``compat`` hides that.
"""

from __future__ import annotations

import logging

import torch

import ops
from ops.cpu import GroupedExperts
from . import compat

logger = logging.getLogger("vllm.ascend_qwen3")

NAME = "vllm-cpu"


_KERNEL_VIEW = "_ascend_qwen3_kernel_view"


def _kernel_view(cache: torch.Tensor) -> torch.Tensor:
    """The [NB, Hkv, BS, D] view the kernels take of a [NB, BS, Hkv, D] cache view, made once
    and kept on the view (the attention keeps its layer's views across steps: a per-layer, per-step
    tensor view less, which is a measurable share of a decode step's Python at batch 1)."""
    view = cache.__dict__.get(_KERNEL_VIEW)
    if view is None:
        view = cache.transpose(1, 2)
        setattr(cache, _KERNEL_VIEW, view)
    return view


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``ops.write_kv_cache`` with ``_C::cpu_attn_reshape_and_cache``. key_cache/value_cache:
    the [NB, BS, Hkv, D] views ``compat.kv_views`` makes of vLLM's cache (the kernel takes them
    as [NB, Hkv, BS, D], the same memory); the pages are written in the kernel's packing."""
    if not slot_mapping.numel():
        return
    kc, vc = _kernel_view(key_cache), _kernel_view(value_cache)
    isa = compat.cpu_attention_isa(kc.dtype, kc.shape[2], kc.shape[3])
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    compat.cpu_reshape_and_cache(key, value, kc, vc, slots, isa)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, *,
                    query_start_loc_host: list[int] | None = None,
                    seq_lens_host: list[int] | None = None, plan=None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.paged_attention`` with ``_C::cpu_attention_with_kv_cache`` over a cache written by
    this module's ``write_kv_cache``. ``plan``: vLLM's scheduler metadata of the step (made here
    when absent); ``out``: where the kernel writes. Every request must see at least one key
    (vLLM's CPU runner never pads with key-less requests, unlike vllm-ascend's graph padding)."""
    T, Hq, D = query.shape
    kc, vc = _kernel_view(key_cache), _kernel_view(value_cache)
    Hkv, bs = kc.shape[1], kc.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} are not a multiple of kv heads {Hkv}")
    qsl = query_start_loc if query_start_loc.dtype == torch.int32 else query_start_loc.int()
    lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.int()
    tables = block_tables if block_tables.dtype == torch.int32 else block_tables.int()
    isa = compat.cpu_attention_isa(query.dtype, bs, D)
    if plan is None:
        plan = compat.cpu_attention_schedule(lens.shape[0], Hq, Hkv, D, lens, query.dtype, qsl, isa)
    if out is None:
        out = torch.empty_like(query)
    used = query_start_loc_host[-1] if query_start_loc_host is not None else int(qsl[-1])
    if used == T:
        compat.cpu_attention(query, kc, vc, out, qsl, lens, scale, tables, plan)
    else:                              # padding rows: zeros, as the specification gives
        compat.cpu_attention(query[:used], kc, vc, out[:used], qsl, lens, scale, tables, plan)
        out[used:].zero_()
    return out


_NO_ONEDNN: set[torch.dtype] = set()     # dtypes vLLM's oneDNN matmul refused here (said once)


def prepare_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """``ops.prepare_linear_weight`` for vLLM's oneDNN matmul: weight [N, K] (bf16, fp16 or
    fp32) -> its handle (module docstring). Other weights, and weights oneDNN refuses on this
    CPU (bf16 under ``ONEDNN_MAX_CPU_ISA=AVX2``, for example), keep the specification's form."""
    if weight.dim() != 2 or weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return ops.cpu.prepare_linear_weight(weight)
    N, K = weight.shape
    try:
        handler = compat.onednn_mm_handler(weight.contiguous())
    except RuntimeError as exc:      # e.g. bf16 where oneDNN may not use AVX-512 (vLLM falls
        if weight.dtype not in _NO_ONEDNN:     # back to torch's linear there, too)
            _NO_ONEDNN.add(weight.dtype)
            logger.info("ascend-qwen3: vLLM's oneDNN matmul cannot take %s weights on this CPU "
                        "(%s); the specification's linear runs them", weight.dtype, exc)
        return ops.cpu.prepare_linear_weight(weight)
    handle = handler.handler_tensor.reshape(1, 1).expand(N, K)
    handle.onednn_handler = handler          # the packed weight lives as long as the handle
    return handle


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``ops.linear`` with ``_C::onednn_mm`` for a weight ``prepare_linear_weight`` made (the
    specification for any other: the weights as loaded, which the quantizer multiplies)."""
    if weight.dtype != torch.int64:
        return ops.cpu.linear(x, weight)
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    torch.ops._C.onednn_mm(out, x.reshape(-1, weight.shape[1]), None, weight[0, 0])
    return out


class PackedExperts:
    """A rank's float experts prepacked for ``_C::cpu_fused_moe``: w13 [E, 2I', H] (gate rows,
    then up rows, I' = I rounded up to 32) and w2 [E, H, I'], in the kernel's packing."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, count: int, isa: str):
        self.w13, self.w2, self.count, self.isa = w13, w2, count, isa


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def prepare_moe_experts(w13: torch.Tensor, w2: torch.Tensor):
    """``ops.prepare_moe_experts`` for ``_C::cpu_fused_moe``: transposed to [E, out, in], the
    intermediate size zero-padded to a multiple of 32, prepacked once. A hidden size the kernel
    cannot take (not a multiple of 32) keeps the specification's form, said once in the log."""
    E, H, I2 = w13.shape
    inter = I2 // 2
    if H % 32 or w13.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        logger.info("ascend-qwen3: experts of hidden size %d in %s: vLLM's fused MoE needs a "
                    "multiple of 32 in a float dtype; the specification runs these", H, w13.dtype)
        return ops.cpu.prepare_moe_experts(w13, w2)
    padded = _round_up(inter, 32)
    gate_up = w13.transpose(1, 2)                                   # [E, 2I, H]
    packed13 = w13.new_zeros(E, 2 * padded, H)
    packed13[:, :inter] = gate_up[:, :inter]
    packed13[:, padded:padded + inter] = gate_up[:, inter:]
    packed2 = w2.new_zeros(E, H, padded)
    packed2[:, :, :inter] = w2.transpose(1, 2)
    isa = compat.cpu_moe_isa(w13.dtype)
    return PackedExperts(compat.cpu_prepack_moe_weight(packed13, isa),
                         compat.cpu_prepack_moe_weight(packed2, isa), E, isa)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, experts,
                num_experts: int) -> torch.Tensor:
    """``ops.moe_experts`` with ``_C::cpu_fused_moe`` (experts from this module's
    ``prepare_moe_experts``)."""
    if isinstance(experts, GroupedExperts):     # not packed (see prepare_moe_experts)
        return ops.cpu.moe_experts(x, weights, expert_ids, experts, num_experts)
    if not isinstance(experts, PackedExperts):
        raise TypeError(f"moe_experts: experts must come from prepare_moe_experts, got "
                        f"{type(experts).__name__}")
    w = weights.float()
    ids = expert_ids.to(torch.int32)
    if experts.count != num_experts:   # expert parallel: other ranks' pairs add nothing
        mine = ids < experts.count
        ids = torch.where(mine, ids, 0).to(torch.int32)
        w = torch.where(mine, w, 0.0)
    out = torch.empty_like(x)
    compat.cpu_fused_moe(out, x.contiguous(), experts.w13, experts.w2, w.contiguous(),
                         ids.contiguous(), experts.isa)
    return out


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_lora: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``ops.lora_shrink`` with vLLM's ``bgmv_shrink`` (torch ops; module docstring)."""
    from vllm.lora.ops.torch_ops import bgmv_shrink

    h = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    bgmv_shrink(x, lora_a, h, token_lora.clamp(min=0), scale)
    return torch.where((token_lora >= 0).unsqueeze(1), h, 0.0)


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, token_lora: torch.Tensor,
                offset: int) -> torch.Tensor:
    """``ops.lora_expand`` with vLLM's ``bgmv_expand_slice`` (torch ops; module docstring):
    in place, rows of slot -1 get an exact 0 added."""
    from vllm.lora.ops.torch_ops import bgmv_expand_slice

    live = torch.where((token_lora >= 0).unsqueeze(1), h, 0.0)
    bgmv_expand_slice(live, lora_b, y, token_lora.clamp(min=0), offset, lora_b.shape[1],
                      add_inputs=True)
    return y


KERNELS = {
    "prepare_linear_weight": prepare_linear_weight,
    "linear": linear,
    "write_kv_cache": write_kv_cache,
    "paged_attention": paged_attention,
    "prepare_moe_experts": prepare_moe_experts,
    "moe_experts": moe_experts,
    "lora_shrink": lora_shrink,
    "lora_expand": lora_expand,
}


def register() -> bool:
    """Register the kernels for CPU tensors (``ops.register_kernels``), unless
    ``ASCEND_QWEN3_ENGINE_KERNELS`` turns it off or vLLM's CPU extension is missing (said in the
    log). Returns whether they are registered."""
    missing = compat.missing_cpu_kernels()
    if missing:
        logger.warning("ascend-qwen3: vLLM's CPU kernels %s are not in this vLLM build; the "
                       "specification (ops.cpu) runs", ", ".join(missing))
        return False
    return ops.register_kernels(NAME, "cpu", KERNELS)


# --- a fix to vLLM's own CPU fallback for a sampling kernel ------------------------------------

def expand_kernel_impl(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                       replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:  # noqa: N803
    """vLLM's ``expand_kernel`` (``vllm/v1/sample/rejection_sampler.py``: request i's value,
    ``replace_from`` turned into ``replace_to``, written over its draft positions
    ``output[cu[i-1]:cu[i]]``), in ``output``'s own dtype.

    vLLM 0.32's CPU fallback (``vllm/utils/cpu_triton_utils.py::_expand_kernel_impl``) passes
    ``output`` through ``_ensure_int64``, which copies any tensor that is not int64, and never
    copies the result back; the float and int32 inputs are truncated to int64 on the way in.
    The rejection sampler expands the per-request temperature (float32), top-k (int32) and
    top-p (float32) with it, so with speculative decoding every request that samples (not
    greedy) read uninitialised memory: top-k failed with "index ... is out of bounds" and the
    engine died, on vLLM's built-in Qwen3 as on the project's.
    """
    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    n = int(cu[-1]) if cu.numel() else 0
    output[:n] = torch.repeat_interleave(values, counts).to(output.dtype)


def fix_cpu_expand_kernel() -> bool:
    """Put ``expand_kernel_impl`` where vLLM's CPU platform takes its fallback from when it
    registers its kernel overrides (``CpuPlatform.register_triton_kernel_overrides``, which
    the worker runs right after loading the general plugins: ``WorkerWrapperBase.init_worker``).
    Called from the plugin's ``register``; a no-op where that module does not exist (vLLM
    builds without the CPU fallbacks) or is already fixed. True when it is in place."""
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:
        return False
    if getattr(cpu_triton_utils, "_expand_kernel_impl", None) is None:
        return False
    cpu_triton_utils._expand_kernel_impl = expand_kernel_impl
    return True


def fix_cpu_pipeline_relay() -> bool:
    """Pipeline parallel in eager mode on vLLM's CPU build: a stage after the first copies what
    the previous stage sent into a buffer the runner allocates (``self.intermediate_tensors``,
    from the model's ``make_empty_intermediate_tensors``) only in its dummy run
    (vllm/v1/worker/gpu_model_runner.py ``_dummy_run``); the CPU worker skips that run in eager
    mode (vllm/v1/worker/cpu_model_runner.py ``warming_up_model`` returns at
    CompilationMode.NONE, and cpu_worker.py ``_should_warm_up_model`` skips it with an explicit
    KV-cache size), so the first step failed in ``sync_and_gather_intermediate_tensors``
    (``assert self.intermediate_tensors is not None``), whatever the model class. This
    allocates the buffer, as the dummy run would, once the KV cache is set up
    (``initialize_kv_cache``, which every worker runs after loading the model). Called by the
    model class in a worker of a pipeline stage on the CPU; a no-op where the runner is not
    vLLM's CPU runner or is already fixed. True when the fix is in place."""
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:
        return False
    init = CPUModelRunner.initialize_kv_cache
    if getattr(init, "_ascend_qwen3_relay", False):
        return True

    def initialize_kv_cache(self, *args, **kwargs):
        out = init(self, *args, **kwargs)
        from vllm.distributed.parallel_state import get_pp_group

        pp = get_pp_group()
        if (pp.world_size > 1 and not pp.is_first_rank
                and getattr(self, "intermediate_tensors", None) is None):
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return out

    initialize_kv_cache._ascend_qwen3_relay = True
    CPUModelRunner.initialize_kv_cache = initialize_kv_cache
    return True
