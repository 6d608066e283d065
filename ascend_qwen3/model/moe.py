"""Qwen3-MoE sparse block: softmax top-k router, grouped expert GEMMs, weighted combine.

Expert placement (``ParallelContext``): without expert parallelism every rank holds all experts
with the expert FFN split by TP; with expert parallelism (ep) each rank holds E/tp whole experts.
Either way every rank sees all tokens, computes its share and the TP all-reduce sums the shares.

The router runs in the graph. What follows it (routing, the grouped GEMMs, the weighted
combine) produces tensors whose sizes depend on the routing decisions, so it is one custom op,
``torch.ops.ascend_qwen3.sparse_moe``, with a fake (meta) implementation: a compiler
(``torch.compile``, vLLM's ``support_torch_compile``) sees an op from [T, H] to [T, H] and leaves
its inside to run eagerly, as vLLM does with its own fused MoE op. The op finds its layer by a
name registered when the layer is built.

Expert parallel without a host sync, in four kernels: the expert ids are rotated (one gather
from a table made at build) so that this rank's experts become 0 .. E_local-1 and sort first;
the grouped GEMMs take the counts of those experts only (summing to fewer rows than the sorted
input holds, as vllm-ascend's expert-parallel dispatch does); the rows past them, which hold
exactly the other ranks' pairs, are zeroed (their count summed, compared with a row index made
once), so those pairs add nothing in the combine, whatever their weight. No row range is read
back to the host.

Expert parallel across data-parallel ranks (EP = DP x TP, inside a serving engine): each
data-parallel rank runs its own tokens, so the layer is one op, ``sparse_moe_across_dp``, that
gathers the tokens of every data-parallel rank over the data-parallel group (each rank's rows
padded with zeros to the step's largest count, a host value from the engine; under graphs the
engine pads every rank to one count already: one all-gather of equal shapes), runs the router
and this rank's experts on all of them, then sums the partial outputs back: a reduce-scatter
over the data-parallel group (the ranks of this tensor-parallel index) leaves this rank's own
rows summed over the data-parallel ranks, and the tensor-parallel all-reduce sums those over
this rank's tensor-parallel group. That is vllm-ascend's all-gather MoE communication on Atlas
A2 (``vllm_ascend/ops/fused_moe/prepare_finalize.py``, ``_prepare_with_dp_group`` /
``_finalize_with_dp_group``: "DP AG -> MoE -> DP RS -> TP AR"), without its second all-gather
(of the router logits: the router runs here on the gathered rows). Per rank and step it receives
3.75 rows of hidden state per padded token against 4.75 for one all-reduce of every gathered
row over the whole expert-parallel group (docs/multi-node.md has the bytes). A data-parallel
rank with no request runs the engine's dummy batch, so every rank joins every step's collectives.

Where the context says so (``ParallelContext.dispatch_exchange``: inside vllm-ascend, as it
chooses MC2 on Atlas A2), steps of up to its capacity exchange by dispatch and combine instead
(``forward_dispatch_combine``): each tensor-parallel rank routes its share of the rows,
``ops.ep_dispatch`` sends each (token, expert) pair to the expert's rank, ``ops.ep_combine``
brings the outputs back weighted, and a tensor-parallel all-gather joins the shares: only the
routed pairs cross the network, and the routing, permutation and weighting happen inside the
two collectives (vllm-ascend's ``TokenDispatcherWithMC2``).
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

import ops
from ops.cpu import GroupedExperts
from ..config import Qwen3Config
from ..parallel import ParallelContext
from ..parallel.layers import empty_param, finalize_float_weight
from ..parallel.plan import local_experts
from ..quant.format import W8A8_DYNAMIC
from ..quant.layers import apply_experts, create_experts, finalize_experts

_LAYERS: "weakref.WeakValueDictionary[str, Qwen3SparseMoeBlock]" = weakref.WeakValueDictionary()
_NAMES = itertools.count()


def _sparse_moe(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, layer: str
                ) -> torch.Tensor:
    """x [T, H], router weights [T, k] fp32 and expert ids [T, k] int32 -> this rank's share of
    the MoE output [T, H] (before the tensor-parallel all-reduce)."""
    return _LAYERS[layer].experts_forward(x, weights, expert_ids)


def _sparse_moe_fake(x, weights, expert_ids, layer):
    return torch.empty_like(x)


def _sparse_moe_across_dp(x: torch.Tensor, layer: str) -> torch.Tensor:
    """x [T, H] of this data-parallel rank -> the MoE output of its tokens [T, H], summed over
    every expert-parallel rank (no further all-reduce)."""
    return _LAYERS[layer].forward_across_dp(x)


def _sparse_moe_across_dp_fake(x, layer):
    return torch.empty_like(x)


# Registered with torch.library's low-level API (a schema, one implementation for every device,
# a fake), as vLLM registers its own ops (vllm.utils.torch_utils.direct_register_custom_op).
# (The torch.library.custom_op decorator made gloo processes that had called the op abort at
# exit now and then with torch 2.13: "terminate called without an active exception".)
_LIB = torch.library.Library("ascend_qwen3", "DEF")
_LIB.define("sparse_moe(Tensor x, Tensor weights, Tensor expert_ids, str layer) -> Tensor")
_LIB.impl("sparse_moe", _sparse_moe, "CompositeExplicitAutograd")
torch.library.register_fake("ascend_qwen3::sparse_moe", _sparse_moe_fake, lib=_LIB)
_LIB.define("sparse_moe_across_dp(Tensor x, str layer) -> Tensor")
_LIB.impl("sparse_moe_across_dp", _sparse_moe_across_dp, "CompositeExplicitAutograd")
torch.library.register_fake("ascend_qwen3::sparse_moe_across_dp", _sparse_moe_across_dp_fake,
                            lib=_LIB)


class Qwen3MoeExperts(nn.Module):
    """Weights of this rank's experts in grouped-GEMM layout: w13 [E_l, H, 2I_l], w2 [E_l, I_l, H]
    (after ``finalize``, float weights are ``prepared``: ``ops.prepare_moe_experts``' form)."""

    def __init__(self, cfg: Qwen3Config, ctx: ParallelContext, *, device=None, scheme: str | None = None):
        super().__init__()
        self.first, self.count, self.inter = local_experts(cfg, ctx)
        self.scheme, self.dtype = scheme, cfg.dtype
        H = cfg.hidden_size
        if scheme is None:
            self.w13 = empty_param(self.count, H, 2 * self.inter, dtype=cfg.dtype, device=device)
            self.w2 = empty_param(self.count, self.inter, H, dtype=cfg.dtype, device=device)
            self.ops = ops.bind(device, "prepare_moe_experts")
            self.prepared = None          # ops.prepare_moe_experts(w13, w2), made by finalize
        elif scheme == W8A8_DYNAMIC:
            create_experts(self, self.count, H, self.inter, device=device)
        else:
            raise ValueError(f"MoE experts support W8A8_DYNAMIC quantisation only, not {scheme}")

    def finalize(self) -> None:
        if self.scheme is not None:
            finalize_experts(self)
            return
        # the ops' prepared form (``ops.prepare_moe_experts``) replaces the two parameters
        w13, w2 = self.w13.data, self.w2.data
        del self.w13, self.w2
        self.prepared = self.ops.prepare_moe_experts(w13, w2)

    def grouped(self):
        """The float experts for ``ops.moe_experts``: the prepared form after ``finalize``; before
        it (the quantizer calibrates a loaded model as it is) the weights as loaded, which the
        backends' own ops take too."""
        if self.prepared is not None:
            return self.prepared
        return GroupedExperts(self.w13, self.w2, self.count)

    def forward(self, sorted_x: torch.Tensor, counts: torch.Tensor,
                token_scale: torch.Tensor) -> torch.Tensor:
        """Quantised experts: sorted_x int8 rows grouped by this rank's experts first, with their
        per-row ``token_scale``; counts [E_l] (they may cover fewer rows than sorted_x has: the
        output rows past them are unspecified). (Float experts run as ``ops.moe_experts``.)"""
        return apply_experts(self, sorted_x, token_scale, counts, self.dtype)


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
        self.ops = ops.bind(device, "linear", "prepare_linear_weight", "moe_gating_topk",
                            "ep_dispatch", "ep_combine",
                            *(("moe_route_quant", "moe_combine") if scheme is not None else
                              ("moe_experts", "grouped_matmul", "swiglu")))
        self.op_name = f"{prefix or 'moe'}#{next(_NAMES)}"
        _LAYERS[self.op_name] = self
        first, count, E = self.experts.first, self.experts.count, cfg.num_experts
        if count != E:   # expert parallel: expert id -> its place after rotating this rank's first
            rotate = torch.remainder(torch.arange(E, device=device) - first, E).to(torch.int32)
            self.register_buffer("rotate_ids", rotate, persistent=False)
        self._row_index: torch.Tensor | None = None      # 0 .. n-1, grown when a step needs more

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.experts_across_dp:
            return torch.ops.ascend_qwen3.sparse_moe_across_dp(x, self.op_name)
        logits = self.ops.linear(x, self.gate)
        weights, ids = self.ops.moe_gating_topk(logits, self.top_k, self.renormalize)
        out = torch.ops.ascend_qwen3.sparse_moe(x, weights, ids, self.op_name)
        return self.ctx.all_reduce(out)

    def forward_across_dp(self, x: torch.Tensor) -> torch.Tensor:
        """The inside of ``sparse_moe_across_dp`` (eager): every data-parallel rank's tokens meet
        this rank's experts; this rank's rows summed over the data-parallel ranks
        (reduce-scatter), then over the tensor-parallel ones (all-reduce)."""
        ctx, T = self.ctx, x.shape[0]
        counts = ctx.dp_token_counts(T)
        if counts[ctx.dp_rank] != T:
            raise RuntimeError(f"data-parallel rank {ctx.dp_rank} runs {T} tokens but the step's "
                               f"counts say {counts}: the engine's metadata and the batch disagree")
        pad = max(counts)
        padded = -(-pad // ctx.tp_size) * ctx.tp_size
        if ctx.dispatch_exchange(padded):
            return self.forward_dispatch_combine(x, padded)
        if pad > T:
            x = torch.cat([x, x.new_zeros(pad - T, x.shape[1])])
        everyone = ctx.dp_all_gather(x)                                 # [dp x pad, H]
        logits = self.ops.linear(everyone, self.gate)
        weights, ids = self.ops.moe_gating_topk(logits, self.top_k, self.renormalize)
        mine = ctx.dp_reduce_scatter(self.experts_forward(everyone, weights, ids))   # [pad, H]
        return ctx.all_reduce(mine[:T])

    def forward_dispatch_combine(self, x: torch.Tensor, padded: int) -> torch.Tensor:
        """The dispatch-and-combine exchange (vllm-ascend's MC2 on Atlas A2): this data-parallel
        rank's rows padded to ``padded`` (a multiple of tp_size), each tensor-parallel rank takes
        its 1 / tp_size of them, routes them, sends each (token, expert) pair to the rank holding
        the expert (``ep_dispatch``), runs the pairs it received through its experts, sends the
        outputs back weighted and summed (``ep_combine``); the tensor-parallel all-gather puts
        this data-parallel rank's rows together again. Padding rows are inactive: sent nowhere."""
        ctx, T = self.ctx, x.shape[0]
        if padded > T:
            x = torch.nn.functional.pad(x, (0, 0, 0, padded - T))
        n = padded // ctx.tp_size
        first = ctx.tp_rank * n
        mine = x[first:first + n]
        # the rows past this rank's real tokens take no part (inside vllm-ascend: its own mask
        # of the step's real tokens, refreshed before every graph replay)
        active = ctx.dispatch_active(T, first, n, self._rows(padded, x.device))
        logits = self.ops.linear(mine, self.gate)
        weights, ids = self.ops.moe_gating_topk(logits, self.top_k, self.renormalize)
        experts, quantised = self.experts, self.experts.scheme is not None
        rows, scale, ends, handle = self.ops.ep_dispatch(mine, ids, active, self.num_experts,
                                                         ctx.expert_group, quantised)
        if quantised:
            out = apply_experts(experts, rows, scale, ends, experts.dtype, cumulative=True)
        else:
            g = experts.grouped()
            h = self.ops.grouped_matmul(rows, g.w13, ends, cumulative=True)
            out = self.ops.grouped_matmul(self.ops.swiglu(h), g.w2, ends, cumulative=True)
        mine_out = self.ops.ep_combine(out, weights, handle)
        return ctx.all_gather_rows(mine_out)[:T]

    def finalize(self) -> None:
        finalize_float_weight(self, "gate")

    def experts_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The inside of the ``sparse_moe`` op (eager): route, expert GEMMs, weighted combine."""
        E, count = self.num_experts, self.experts.count
        if count != E:   # expert parallel: this rank's experts become 0 .. count-1, sorted first
            ids = self.rotate_ids[ids]
        if self.experts.scheme is None:      # float experts: one op (routing to combine)
            return self.ops.moe_experts(x, weights, ids, self.experts.grouped(), E)
        # int8 experts: the dynamic quant fused into routing
        sorted_x, row_of_pair, counts, token_scale = self.ops.moe_route_quant(x, ids, E)
        expert_out = self.experts(sorted_x, counts[:count], token_scale)
        if count != E:   # the rows past this rank's pairs (other ranks' pairs, not computed): 0
            past = self._rows(expert_out.shape[0], x.device) >= counts[:count].sum()
            expert_out = expert_out.masked_fill(past.unsqueeze(-1), 0)
        return self.ops.moe_combine(expert_out, row_of_pair, weights)

    def _rows(self, n: int, device) -> torch.Tensor:
        """A view of 0 .. n-1 on ``device``, made once (and again only for a longer step): a
        step decides by its shape, never by a device value."""
        if self._row_index is None or self._row_index.numel() < n:
            self._row_index = torch.arange(max(n, 256), device=device)
        return self._row_index[:n]
