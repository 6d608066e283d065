"""The sharding plan: which slice of every checkpoint tensor each tensor-parallel rank holds.

``rank_plan(cfg, tp, rank, ep)`` is the single source of truth for sharding. It maps every
checkpoint tensor (Hugging Face names) to the destination parameter of the project's graph, the
slice of the checkpoint tensor to read and the slice of the parameter to fill. The model's
parameter shapes (``local_heads``, ``local_experts``) and the loader both follow it, and it can be
printed and tested without building the model.

Pipeline parallel is data here too: ``stage_layers`` says which decoder layers a stage holds (the
rule of vLLM's ``get_pp_indices``), ``stage_holds`` what else it holds, ``check_pipeline`` which
sizes the project serves, and ``rank_plan(..., stage=)`` what a stage's rank reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import Qwen3Config


class ShardingError(ValueError):
    """A (config, tp, ep) combination that cannot be sharded; the message names valid choices."""


@dataclass(frozen=True)
class Assignment:
    """Copy ``checkpoint[name][src]`` (transposed if asked) into ``param[dst]``."""

    name: str                      # checkpoint tensor name
    shape: tuple[int, ...]         # full checkpoint shape expected
    param: str                     # parameter name in the graph (model.Qwen3Graph)
    src: tuple[slice, ...]         # slice of the checkpoint tensor read by this rank
    dst: tuple                     # index into the parameter
    transpose: bool = False
    # safetensors dtypes the tensor may be stored in (float weights by default)
    dtypes: tuple[str, ...] = ("F32", "BF16", "F16")
    # several checkpoint tensors fill the same value (a fused module's input_scale): all must agree
    shared: bool = False
    # the slice is reshaped to the destination ([n, 1] scales into [n] rows of a grouped layout)
    reshape: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s, full in zip(self.src, self.shape):
            n *= len(range(*s.indices(full)))
        return n


def _tp_ok(cfg: Qwen3Config, tp: int, ep: bool, dp: int = 1) -> str | None:
    """None if tp (with dp data-parallel ranks sharing the experts under ep) works for cfg,
    else the reason."""
    if tp < 1:
        return "tp must be >= 1"
    if cfg.num_heads % tp:
        return f"tp={tp} does not divide {cfg.num_heads} query heads"
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        return f"tp={tp} neither divides nor is a multiple of {cfg.num_kv_heads} KV heads"
    dense_layers = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if dense_layers and cfg.intermediate_size % tp:
        return f"tp={tp} does not divide intermediate_size={cfg.intermediate_size}"
    if cfg.is_moe:
        if ep and cfg.num_experts % (tp * dp):
            return f"expert parallel size {tp * dp} does not divide {cfg.num_experts} experts"
        if not ep and cfg.moe_intermediate_size % tp:
            return f"tp={tp} does not divide moe_intermediate_size={cfg.moe_intermediate_size}"
    return None


def valid_tp_sizes(cfg: Qwen3Config, ep: bool = False, limit: int = 64) -> list[int]:
    return [t for t in range(1, limit + 1) if _tp_ok(cfg, t, ep) is None]


def check_parallel(cfg: Qwen3Config, tp: int, ep: bool = False, dp: int = 1) -> None:
    """Raise ShardingError, naming the valid choices, if (cfg, tp, ep) cannot be sharded (with
    ``dp`` data-parallel ranks: under ep the experts are spread over dp x tp ranks)."""
    label = cfg.name or cfg.architecture
    if ep and not cfg.is_moe:
        raise ShardingError(f"expert parallel was requested for {label}, which is a dense model; "
                            f"drop --ep")
    if dp < 1:
        raise ShardingError(f"data-parallel size {dp} must be >= 1")
    if ep and tp * dp > cfg.num_experts:
        size = f"{tp * dp} (dp {dp} x tp {tp})" if dp > 1 else f"{tp}"
        raise ShardingError(f"expert parallel size {size} exceeds the {cfg.num_experts} experts "
                            f"of {label}; use ep <= {cfg.num_experts}, or tp without --ep")
    why = _tp_ok(cfg, tp, ep, dp)
    if why:
        choices = ", ".join(map(str, [t for t in valid_tp_sizes(cfg, ep) if t <= 64
                                      and _tp_ok(cfg, t, ep, dp) is None]))
        mode = " with expert parallel" if ep else ""
        mode += f" and data parallel {dp}" if dp > 1 and ep else ""
        raise ShardingError(f"{why} of {label}; use tp in {{{choices}}}{mode}")


# vLLM's explicit pipeline partition: comma-separated layer counts, one per stage
# (vllm/envs.py VLLM_PP_LAYER_PARTITION, read by vllm/distributed/utils.py get_pp_indices)
PP_PARTITION_ENV = "VLLM_PP_LAYER_PARTITION"
_FROM_ENV = object()        # default of the functions below: read the partition from the variable


def _partition_env(partition: str | None | object) -> str | None:
    return os.environ.get(PP_PARTITION_ENV) if partition is _FROM_ENV else partition


def stage_sizes(num_layers: int, pp: int, partition: str | None | object = _FROM_ENV) -> list[int]:
    """Decoder layers held by each of ``pp`` pipeline stages, by the rule of vLLM's
    ``get_pp_indices`` (vllm/distributed/utils.py): ``partition`` (default: the
    ``VLLM_PP_LAYER_PARTITION`` variable), e.g. "10,14", gives them explicitly and must name
    ``pp`` counts summing to ``num_layers``; without it each stage holds ``num_layers // pp`` and
    the remainder goes one layer each to the stages before the last, from the second-to-last
    backwards (the last stage holds the final norm and the head, the first the embedding)."""
    text = _partition_env(partition)
    if pp < 1:
        raise ShardingError(f"pipeline-parallel size {pp} must be >= 1")
    if text is not None:
        try:
            sizes = [int(x) for x in text.split(",")]
        except ValueError:
            raise ShardingError(f"{PP_PARTITION_ENV}={text!r} is not a comma-separated list of "
                                f"layer counts; write e.g. {PP_PARTITION_ENV}="
                                f"{','.join(str(n) for n in _even(num_layers, pp))}") from None
        if len(sizes) != pp or sum(sizes) != num_layers or min(sizes) < 1:
            raise ShardingError(f"{PP_PARTITION_ENV}={text!r} must give {pp} layer counts (one per "
                                f"pipeline stage), each >= 1, summing to the model's {num_layers} "
                                f"layers; found {len(sizes)} count(s) summing to {sum(sizes)}")
        return sizes
    return _even(num_layers, pp)


def _even(num_layers: int, pp: int) -> list[int]:
    sizes = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):      # vLLM's remainder rule (module docstring)
        sizes[-i] += 1
    return sizes


def stage_layers(num_layers: int, pp_rank: int, pp: int,
                 partition: str | None | object = _FROM_ENV) -> tuple[int, int]:
    """(first layer, end layer) of pipeline stage ``pp_rank``: vLLM's ``get_pp_indices``."""
    if not 0 <= pp_rank < pp:
        raise ShardingError(f"pipeline stage {pp_rank} is outside pp={pp}")
    sizes = stage_sizes(num_layers, pp, partition)
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


def valid_pp_sizes(num_layers: int) -> list[int]:
    """Pipeline sizes that split ``num_layers`` evenly (the project's rule without an explicit
    partition)."""
    return [p for p in range(1, num_layers + 1) if num_layers % p == 0]


def check_pipeline(cfg: Qwen3Config, pp: int, partition: str | None | object = _FROM_ENV) -> None:
    """Raise ShardingError, naming the valid sizes, unless ``pp`` stages can hold ``cfg``'s layers:
    an even split, or the explicit ``VLLM_PP_LAYER_PARTITION`` (``partition``) that sums to them.
    (vLLM itself also accepts uneven splits; the project refuses them unless the partition is
    written out, so that every stage's share is a deliberate choice.)"""
    label = cfg.name or cfg.architecture
    n = cfg.num_layers
    if pp < 1:
        raise ShardingError(f"pipeline-parallel size {pp} must be >= 1")
    text = _partition_env(partition)
    if pp == 1 and text is None:
        return
    if pp > n:
        raise ShardingError(f"pipeline-parallel size {pp} exceeds the {n} decoder layers of "
                            f"{label}; use pp in {{{', '.join(map(str, valid_pp_sizes(n)))}}}")
    if text is None and n % pp:
        raise ShardingError(f"pipeline-parallel size {pp} does not divide the {n} decoder layers of "
                            f"{label}; use pp in {{{', '.join(map(str, valid_pp_sizes(n)))}}}, or "
                            f"set {PP_PARTITION_ENV} to {pp} layer counts summing to {n} (e.g. "
                            f"{','.join(map(str, _even(n, pp)))})")
    stage_sizes(n, pp, text)


def local_heads(cfg: Qwen3Config, tp: int) -> tuple[int, int]:
    """(query heads, kv heads) per rank; kv heads are replicated when tp exceeds them."""
    return cfg.num_heads // tp, max(1, cfg.num_kv_heads // tp)


def kv_head_start(cfg: Qwen3Config, tp: int, rank: int) -> int:
    """First KV head held by ``rank`` (with replication, consecutive ranks share one head)."""
    if tp <= cfg.num_kv_heads:
        return rank * (cfg.num_kv_heads // tp)
    return rank * cfg.num_kv_heads // tp


def local_experts(cfg: Qwen3Config, ctx) -> tuple[int, int, int]:
    """(first expert, number of experts, expert FFN width) held by ``ctx``'s rank."""
    if ctx.expert_parallel:
        per = cfg.num_experts // ctx.ep_size
        return ctx.ep_rank * per, per, cfg.moe_intermediate_size
    return 0, cfg.num_experts, cfg.moe_intermediate_size // ctx.tp_size


def _rows(start, n):
    return slice(start, start + n)


ALL = slice(None)


def stage_holds(cfg: Qwen3Config, stage: tuple[int, int] | None) -> dict[str, bool]:
    """What a pipeline stage holding decoder layers ``stage`` = (start, end) holds besides them
    (None: the whole model), as vLLM's Qwen3 places them (vllm/model_executor/models/qwen2.py
    Qwen2Model, qwen3.py Qwen3ForCausalLM): the embedding on the first stage, and on the last
    when the head is tied to it; the final norm and the head on the last stage."""
    start, end = (0, cfg.num_layers) if stage is None else stage
    if not 0 <= start < end <= cfg.num_layers:
        raise ShardingError(f"pipeline stage layers [{start}, {end}) are not a non-empty range "
                            f"within the model's {cfg.num_layers} layers")
    first, last = start == 0, end == cfg.num_layers
    return {"embed": first or (last and cfg.tie_word_embeddings), "norm": last, "head": last}


def rank_plan(cfg: Qwen3Config, tp: int = 1, rank: int = 0, ep: bool = False, dp: int = 1,
              dp_rank: int = 0, stage: tuple[int, int] | None = None) -> list[Assignment]:
    """Every checkpoint tensor this rank reads, with source and destination slices (the float
    tensors; a W8A8 checkpoint's extra tensors are added by ``ascend_qwen3.quant.plan``, and
    ``ascend_qwen3.loader.load_plan`` gives the two together). ``dp``/``dp_rank``: the
    data-parallel rank, which decides the experts under ep (everything else follows tp).
    ``stage``: the (start, end) decoder layers of this rank's pipeline stage (None: all); the
    embedding, final norm and head only where the stage holds them (``stage_holds``)."""
    check_parallel(cfg, tp, ep, dp)
    holds = stage_holds(cfg, stage)
    first_layer, end_layer = (0, cfg.num_layers) if stage is None else stage
    if not 0 <= rank < tp:
        raise ShardingError(f"rank {rank} is outside tp={tp}")
    if not 0 <= dp_rank < dp:
        raise ShardingError(f"data-parallel rank {dp_rank} is outside dp={dp}")
    H, D, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    hq, hkv = local_heads(cfg, tp)
    q0, kv0 = rank * hq, kv_head_start(cfg, tp, rank)
    per_vocab = -(-V // tp)
    v0 = rank * per_vocab
    v_n = max(0, min(V, v0 + per_vocab) - v0)
    plan: list[Assignment] = []
    add = plan.append

    if holds["embed"]:
        add(Assignment("model.embed_tokens.weight", (V, H), "embed_tokens.weight",
                       (_rows(v0, v_n), ALL), (slice(0, v_n), ALL)))
    if holds["head"] and not cfg.tie_word_embeddings:
        add(Assignment("lm_head.weight", (V, H), "lm_head.weight", (_rows(v0, v_n), ALL),
                       (slice(0, v_n), ALL)))
    if holds["norm"]:
        add(Assignment("model.norm.weight", (H,), "norm.weight", (ALL,), (ALL,)))

    for i in range(first_layer, end_layer):
        c, p = f"model.layers.{i}.", f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(Assignment(c + norm + ".weight", (H,), p + norm + ".weight", (ALL,), (ALL,)))
        a, pa = c + "self_attn.", p + "self_attn."
        qkv = pa + "qkv_proj.weight"
        add(Assignment(a + "q_proj.weight", (cfg.num_heads * D, H), qkv,
                       (_rows(q0 * D, hq * D), ALL), (slice(0, hq * D), ALL)))
        add(Assignment(a + "k_proj.weight", (cfg.num_kv_heads * D, H), qkv,
                       (_rows(kv0 * D, hkv * D), ALL), (_rows(hq * D, hkv * D), ALL)))
        add(Assignment(a + "v_proj.weight", (cfg.num_kv_heads * D, H), qkv,
                       (_rows(kv0 * D, hkv * D), ALL), (_rows((hq + hkv) * D, hkv * D), ALL)))
        add(Assignment(a + "o_proj.weight", (H, cfg.num_heads * D), pa + "o_proj.weight",
                       (ALL, _rows(q0 * D, hq * D)), (ALL, ALL)))
        add(Assignment(a + "q_norm.weight", (D,), pa + "q_norm", (ALL,), (ALL,)))
        add(Assignment(a + "k_norm.weight", (D,), pa + "k_norm", (ALL,), (ALL,)))

        m, pm = c + "mlp.", p + "mlp."
        if cfg.is_moe_layer(i):
            add(Assignment(m + "gate.weight", (cfg.num_experts, H), pm + "gate", (ALL, ALL), (ALL, ALL)))
            from .context import ParallelContext
            first, count, inter = local_experts(cfg, ParallelContext(rank, tp, ep, dp_rank=dp_rank,
                                                                     dp_size=dp))
            I = cfg.moe_intermediate_size
            f0 = 0 if ep else rank * inter
            for e in range(first, first + count):
                le, pe = e - first, m + f"experts.{e}."
                add(Assignment(pe + "gate_proj.weight", (I, H), pm + "experts.w13",
                               (_rows(f0, inter), ALL), (le, ALL, slice(0, inter)), transpose=True))
                add(Assignment(pe + "up_proj.weight", (I, H), pm + "experts.w13",
                               (_rows(f0, inter), ALL), (le, ALL, _rows(inter, inter)), transpose=True))
                add(Assignment(pe + "down_proj.weight", (H, I), pm + "experts.w2",
                               (ALL, _rows(f0, inter)), (le, ALL, ALL), transpose=True))
        else:
            I = cfg.intermediate_size
            il = I // tp
            add(Assignment(m + "gate_proj.weight", (I, H), pm + "gate_up_proj.weight",
                           (_rows(rank * il, il), ALL), (slice(0, il), ALL)))
            add(Assignment(m + "up_proj.weight", (I, H), pm + "gate_up_proj.weight",
                           (_rows(rank * il, il), ALL), (_rows(il, il), ALL)))
            add(Assignment(m + "down_proj.weight", (H, I), pm + "down_proj.weight",
                           (ALL, _rows(rank * il, il)), (ALL, ALL)))
    return plan


def shard_plan(cfg: Qwen3Config, tp: int = 1, ep: bool = False) -> list[list[Assignment]]:
    """The plan of every rank, rank order."""
    check_parallel(cfg, tp, ep)
    return [rank_plan(cfg, tp, r, ep) for r in range(tp)]


def parameter_counts(cfg: Qwen3Config) -> tuple[int, int]:
    """(total, active per token) parameters of the whole model, counted from the tp=1 plan.

    Active excludes the experts a token does not visit (E - k per MoE layer); tied embeddings
    count once.
    """
    total = sum(a.numel for a in rank_plan(cfg, 1, 0))
    active = total
    if cfg.is_moe:
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
        active -= moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    return total, active


def _kind(param: str) -> str:
    """Group name of a parameter for summaries: 'layers.*.self_attn.qkv_proj.weight' etc."""
    parts = param.split(".")
    return ".".join("*" if p.isdigit() else p for p in parts)


def plan_summary(cfg: Qwen3Config, tp: int, ep: bool = False, dtype_bytes: int | None = None) -> str:
    """Human-readable plan: per-rank bytes, then each parameter kind's per-rank slice."""
    import torch

    check_parallel(cfg, tp, ep)
    nbytes = dtype_bytes or torch.empty(0, dtype=cfg.dtype).element_size()
    plans = shard_plan(cfg, tp, ep)
    total, active = parameter_counts(cfg)
    lines = [f"{cfg.name or cfg.architecture}: {total / 1e9:.3f}B parameters"
             + (f" ({active / 1e9:.2f}B active)" if cfg.is_moe else "")
             + f", {nbytes} bytes each, tp={tp}" + (" with expert parallel" if ep else "")]
    hq, hkv = local_heads(cfg, tp)
    rep = tp // cfg.num_kv_heads if tp > cfg.num_kv_heads else 1
    lines.append(f"per rank: {hq} query heads, {hkv} KV head(s)"
                 + (f" (each KV head replicated on {rep} ranks)" if rep > 1 else ""))
    if cfg.is_moe:
        from .context import ParallelContext
        first, count, inter = local_experts(cfg, ParallelContext(0, tp, ep))
        lines.append(f"per rank: {count} experts x FFN {inter}"
                     + (" (whole experts)" if ep else " (expert FFN split by tp)"))
    lines.append("")
    lines.append(f"{'rank':>4}  {'parameters':>16}  {'bytes':>16}  {'GiB':>8}")
    whole = 0
    for r, plan in enumerate(plans):
        n = sum(a.numel for a in plan)
        whole += n
        lines.append(f"{r:>4}  {n:>16,}  {n * nbytes:>16,}  {n * nbytes / 2**30:>8.2f}")
    lines.append(f"{'sum':>4}  {whole:>16,}  {whole * nbytes:>16,}  {whole * nbytes / 2**30:>8.2f}"
                 f"  (model {total * nbytes / 2**30:.2f} GiB + replicated tensors)")
    lines.append("")
    lines.append("rank 0 slices (checkpoint tensor -> parameter), one line per kind:")
    seen = {}
    for a in plans[0]:
        k = (_kind(a.name), _kind(a.param))
        seen.setdefault(k, [a, 0])[1] += 1
    for (ck, pk), (a, count) in seen.items():
        src = ", ".join(_fmt_slice(s, n) for s, n in zip(a.src, a.shape))
        lines.append(f"  {ck} {list(a.shape)}[{src}] -> {pk}{' (transposed)' if a.transpose else ''}"
                     f"  x{count}")
    return "\n".join(lines)


def _fmt_slice(s: slice, n: int) -> str:
    start, stop, _ = s.indices(n)
    return ":" if (start, stop) == (0, n) else f"{start}:{stop}"
