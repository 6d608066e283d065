"""Memory planner: will a model, at a precision and tensor-parallel size, fit a machine's NPUs,
and how many KV-cache tokens (hence concurrent sequences) are left?

Per NPU (the busiest rank):

    usable    = HBM x memory_utilization              (vLLM's --gpu-memory-utilization)
    weights   = bytes of this rank's shards            (the sharding plan; W8A8 as stored)
                + a speculative draft's share           (``draft_bytes_per_rank``)
    workspace = runtime + activations + HCCL buffers   (a fixed margin, see WORKSPACE_GIB)
    kv        = usable - weights - workspace
    kv tokens = kv / kv_bytes_per_token                (2 (K,V) x layers x local KV heads x
                                                        head_dim x cache element bytes; the
                                                        draft's layers too)
    sequences at full length = kv tokens // max_model_len

With pipeline parallel (pp stages of tp NPUs each, ``parallel.plan.stage_layers``), each
stage is planned on its own: its layers' share of the weights, plus the embedding on the first
stage (and on the last when the head is tied to it) and the final norm and head on the last, and
a KV cache for its own layers only. The engine gives every stage the same number of KV blocks
(vLLM takes the smallest any worker can hold), so the deployment's KV tokens are the smallest
stage's.

The weights come from the same sharding plan the loader follows (``loader.load_plan``), so a
replicated KV head or an expert-parallel split is counted as loaded. The workspace margin is an estimate:
it is the number to raise if a profile that fits here runs out of memory on the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Qwen3Config
from ..parallel.plan import check_parallel, check_pipeline, stage_layers, valid_tp_sizes

GiB = 2**30

# Atlas 800I A2: 8 x Ascend 910B (64 GB HBM each; a 32 GB variant exists)
HARDWARE = {
    "atlas-800i-a2-64g": {"npus": 8, "hbm_gib": 64.0, "title": "Atlas 800I A2, 8 x 64 GB"},
    "atlas-800i-a2-32g": {"npus": 8, "hbm_gib": 32.0, "title": "Atlas 800I A2, 8 x 32 GB"},
}
HW_ALIASES = {"atlas-800i-a2": "atlas-800i-a2-64g"}
PRECISIONS = ("bf16", "w8a8", "w8a8_dynamic")
# CANN runtime + activations of one max_num_batched_tokens step + HCCL buffers, per NPU
WORKSPACE_GIB = 4.0
MEMORY_UTILIZATION = 0.9


class PlanError(ValueError):
    """A deployment that cannot work; the message gives the numbers and the fix."""


def hardware(name: str) -> dict:
    key = HW_ALIASES.get(name, name)
    if key not in HARDWARE:
        raise PlanError(f"unknown hardware {name!r}; known: {', '.join(list(HARDWARE) + list(HW_ALIASES))}")
    return dict(HARDWARE[key], name=key)


def weight_bytes_per_rank(cfg: Qwen3Config, tp: int, ep: bool, precision: str, dp: int = 1,
                          stage: tuple[int, int] | None = None, *, head: bool = True) -> list[int]:
    """Bytes of weights each rank holds (as the checkpoint stores them); with dp data-parallel
    ranks, every rank of every one of them (under ep they hold different experts); ``stage``:
    the ranks of the pipeline stage holding these (start, end) decoder layers (None: all);
    ``head=False``: an embedding model (runner pooling), which holds no output head."""
    import torch

    from ..quant.description import QuantConfig
    from ..loader import load_plan
    from ..quant.plan import assignment_bytes

    if precision not in PRECISIONS:
        raise PlanError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    cfg = cfg.with_dtype(torch.bfloat16)
    quant = None if precision == "bf16" else QuantConfig.for_scheme(cfg, precision)
    return [sum(assignment_bytes(a, cfg.dtype)
                for a in load_plan(cfg, tp, r, ep, quant, dp, d, stage, head=head))
            for d in range(dp if ep else 1) for r in range(tp)]


def kv_bytes_per_token(cfg: Qwen3Config, tp: int, cache_bytes: int = 2,
                       layers: int | None = None) -> int:
    """KV-cache bytes one token occupies on one rank (bf16 cache; KV heads replicated when
    tp > kv heads), for ``layers`` decoder layers (default: all; a pipeline stage's own)."""
    kv_local = max(1, cfg.num_kv_heads // tp)
    n = cfg.num_layers if layers is None else layers
    return 2 * n * kv_local * cfg.head_dim * cache_bytes


def draft_bytes_per_rank(cfg: Qwen3Config, tp: int, method: str | None,
                         draft: Qwen3Config | None = None) -> tuple[int, int]:
    """(weight bytes, KV-cache layers) a speculative draft adds to each rank, in bf16, its layers
    split over the tp ranks as the target's. An EAGLE head is counted at the target's shape: one
    decoder layer whose attention reads 2 x hidden, EAGLE-3's fc from 3 x hidden, and an output
    layer over the whole vocabulary (the upper bound: EAGLE-3 heads often have a smaller one);
    a draft model (``draft``: its config) at its own size; n-gram adds nothing."""
    if method in (None, "ngram"):
        return 0, 0
    H, V = cfg.hidden_size, cfg.vocab_size
    if method == "draft_model":
        if draft is None or draft.is_moe:
            raise PlanError("a draft_model plan needs the draft's config, a dense Qwen3 (a family "
                            "name in the profile's speculative.family, e.g. Qwen3-0.6B)")
        return _dense_bytes(draft) // tp, draft.num_layers
    layer = 2 * H * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * H + 3 * H * cfg.intermediate_size
    params = layer + V * H + (3 * H * H if method == "eagle3" else 2 * H * H)
    return 2 * params // tp, 1


def _dense_bytes(cfg: Qwen3Config) -> int:
    """bf16 bytes of a dense Qwen3 (embedding, layers, head if untied)."""
    H = cfg.hidden_size
    layer = H * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * H + 3 * H * cfg.intermediate_size
    return 2 * (cfg.vocab_size * H * (1 if cfg.tie_word_embeddings else 2) + cfg.num_layers * layer)


@dataclass
class Plan:
    model: str
    precision: str
    hardware: str
    tp: int
    ep: bool
    nodes: int
    dp: int
    hbm_gib: float
    memory_utilization: float
    usable_gib: float
    weights_gib: float
    workspace_gib: float
    kv_gib: float
    kv_bytes_per_token: int
    kv_tokens: int
    max_model_len: int
    max_num_seqs: int | None
    draft: str | None = None
    draft_gib: float = 0.0
    pp: int = 1
    # pipeline parallel: per stage, its layers [start, end), weights (GiB, its busiest NPU), KV
    # cache (GiB) and KV tokens; the fields above are the busiest stage's (weights) and the
    # smallest cache's (KV tokens)
    stages: list = field(default_factory=list)

    @property
    def devices(self) -> int:
        """NPUs the deployment uses: dp x pp x tp."""
        return self.dp * self.pp * self.tp

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.max_model_len

    @property
    def full_length_sequences(self) -> int:
        return max(0, self.kv_tokens // self.max_model_len)

    def report(self) -> str:
        lines = [f"{self.model} {self.precision} on {self.hardware}: "
                 + (f"dp={self.dp} x " if self.dp > 1 else "")
                 + (f"pp={self.pp} x " if self.pp > 1 else "") + f"tp={self.tp}"
                 + (f" with expert parallel (ep={self.dp * self.tp})" if self.ep and self.dp > 1
                    else " with expert parallel" if self.ep else "")
                 + (f" over {self.nodes} nodes" if self.nodes > 1 else ""),
                 f"  per NPU: {self.hbm_gib:.0f} GiB HBM x {self.memory_utilization:g} = "
                 f"{self.usable_gib:.2f} GiB usable",
                 f"    weights    {self.weights_gib:8.2f} GiB  (largest rank"
                 + (f"; {self.draft_gib:.2f} GiB of it the {self.draft} draft)" if self.draft_gib
                    else ")"),
                 f"    workspace  {self.workspace_gib:8.2f} GiB  (runtime, activations, HCCL)",
                 f"    KV cache   {self.kv_gib:8.2f} GiB  = {self.kv_tokens:,} tokens at "
                 f"{self.kv_bytes_per_token:,} B/token"
                 + (f" per data-parallel rank ({self.dp} ranks, each its own cache and "
                    f"max_num_seqs)" if self.dp > 1 else ""),
                 f"  max_model_len {self.max_model_len:,}: {self.full_length_sequences} sequence(s) at "
                 f"full length" + (f"; max_num_seqs {self.max_num_seqs} share "
                                   f"{self.kv_tokens // max(1, self.max_num_seqs):,} tokens each"
                                   if self.max_num_seqs else "")]
        if self.pp > 1:
            lines[0] += f" ({self.devices} NPUs)"
            lines.insert(3, "    (weights: the busiest stage; KV cache: the smallest stage's, "
                            "as the engine gives every stage the same number of blocks)")
            lines.append(f"  per stage ({self.pp} stages, {self.tp} NPU(s) each):")
            for st in self.stages:
                lines.append(f"    stage {st['stage']}: layers {st['layers'][0]}..{st['layers'][1] - 1}"
                             f"{' + embedding' if st['embed'] else ''}"
                             f"{' + norm + head' if st['head'] else ''}: weights "
                             f"{st['weights_gib']:.2f} GiB, KV {st['kv_gib']:.2f} GiB = "
                             f"{st['kv_tokens']:,} tokens at {st['kv_bytes_per_token']:,} B/token")
        if self.fits:
            lines.append(f"  fits: margin {self.kv_tokens - self.max_model_len:,} KV tokens beyond one "
                         f"full-length sequence")
        else:
            lines.append(f"  DOES NOT FIT: {self.kv_tokens:,} KV tokens < max_model_len "
                         f"{self.max_model_len:,}")
        return "\n".join(lines)


def plan(cfg: Qwen3Config, *, hw: str, precision: str, tp: int, ep: bool = False, nodes: int = 1,
         dp: int = 1, max_model_len: int = 32768, max_num_seqs: int | None = None,
         workspace_gib: float = WORKSPACE_GIB, memory_utilization: float = MEMORY_UTILIZATION,
         draft: str | None = None, draft_cfg: Qwen3Config | None = None, pp: int = 1,
         pp_partition: str | None = None, head: bool = True) -> Plan:
    """The busiest NPU of a deployment: dp data-parallel ranks of pp pipeline stages of tp NPUs
    each (on ``nodes`` machines; with ep the experts are spread over the dp x tp NPUs of each
    stage). KV tokens are per data-parallel rank: each has its own cache, shared by its own
    max_num_seqs. ``pp_partition``: the layers per stage as VLLM_PP_LAYER_PARTITION gives them
    (None: vLLM's even split). ``head=False``: an embedding model (runner pooling): no output
    head is loaded (Qwen3-Embedding ships none), and its KV cache serves the prompts' prefill."""
    h = hardware(hw)
    try:
        check_parallel(cfg, tp, ep and cfg.is_moe, dp)
        check_pipeline(cfg, pp, pp_partition)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    if tp * pp * dp > h["npus"] * nodes:
        need = " x ".join(f"{k}={v}" for k, v in (("dp", dp), ("pp", pp), ("tp", tp))
                          if v > 1 or k == "tp")
        raise PlanError(f"{need} needs {tp * pp * dp} NPUs but {nodes} x {h['title']} has "
                        f"{h['npus'] * nodes}")
    if pp > 1 and draft is not None:
        raise PlanError(f"speculative decoding ({draft}) with pipeline parallel (pp={pp}) is not "
                        f"supported by the project's classes; use pp 1 with speculative decoding")
    draft_bytes, draft_layers = draft_bytes_per_rank(cfg, tp, draft, draft_cfg)
    usable = h["hbm_gib"] * memory_utilization * GiB
    stages = []
    for s in range(pp):
        layers = stage_layers(cfg.num_layers, s, pp, pp_partition) if pp > 1 else None
        weights = max(weight_bytes_per_rank(cfg, tp, ep and cfg.is_moe, precision, dp,
                                            layers, head=head)) + draft_bytes
        kv = usable - weights - workspace_gib * GiB
        per_tok = kv_bytes_per_token(cfg, tp, layers=None if layers is None
                                     else layers[1] - layers[0])
        if draft_layers:
            d = draft_cfg or cfg
            per_tok += 2 * draft_layers * max(1, d.num_kv_heads // tp) * d.head_dim * 2
        first, end = layers or (0, cfg.num_layers)
        stages.append({"stage": s, "layers": (first, end), "weights_gib": weights / GiB,
                       "kv_gib": kv / GiB, "kv_bytes_per_token": per_tok,
                       "kv_tokens": int(kv // per_tok) if kv > 0 else 0,
                       "embed": first == 0 or (end == cfg.num_layers and cfg.tie_word_embeddings),
                       "head": end == cfg.num_layers and head})
    busiest = max(stages, key=lambda st: st["weights_gib"])
    smallest = min(stages, key=lambda st: st["kv_tokens"])
    return Plan(model=cfg.name or cfg.architecture, precision=precision, hardware=h["name"], tp=tp,
                ep=ep and cfg.is_moe, nodes=nodes, dp=dp, hbm_gib=h["hbm_gib"],
                memory_utilization=memory_utilization, usable_gib=usable / GiB,
                weights_gib=busiest["weights_gib"], workspace_gib=workspace_gib,
                kv_gib=smallest["kv_gib"], kv_bytes_per_token=smallest["kv_bytes_per_token"],
                kv_tokens=smallest["kv_tokens"], max_model_len=max_model_len,
                max_num_seqs=max_num_seqs, draft=draft, draft_gib=draft_bytes / GiB, pp=pp,
                stages=stages if pp > 1 else [])


def recommend(cfg: Qwen3Config, *, hw: str, precision: str, max_model_len: int = 32768,
              min_sequences: int = 8, head: bool = True) -> tuple[int | None, list[Plan]]:
    """Plans for every valid tp on one machine, and the smallest tp that holds ``min_sequences``
    full-length sequences (else the smallest that fits at all; None if none does)."""
    h = hardware(hw)
    ep = cfg.is_moe
    plans = [plan(cfg, hw=hw, precision=precision, tp=t, ep=ep, max_model_len=max_model_len,
                  head=head)
             for t in valid_tp_sizes(cfg, ep) if t <= h["npus"]]
    good = [p for p in plans if p.full_length_sequences >= min_sequences]
    fitting = [p for p in plans if p.fits]
    best = (good or fitting or [None])[0]
    return (best.tp if best else None), plans
