"""Linear and embedding layers that hold one tensor-parallel slice of their weight.

Each layer creates its per-rank parameter (on any device, ``meta`` included) and says how its
forward joins the slices; which rows or columns of a checkpoint tensor a rank holds is decided by
``ascend_qwen3.parallel.plan`` and applied by the loader. With tp_size == 1 they are plain layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ops
from .context import ParallelContext


def empty_param(*shape, dtype, device=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def finalize_float_weight(module: nn.Module, name: str, source: torch.Tensor | None = None) -> None:
    """After loading: ``module.<name>`` becomes a (non-persistent) buffer holding
    ``module.ops.prepare_linear_weight`` of the loaded parameter (or of ``source``, a weight
    owned elsewhere, such as a tied embedding); the parameter is dropped, so the weight is not
    held twice."""
    loaded = getattr(module, name).data if source is None else source.data
    if source is None:
        delattr(module, name)
    module.register_buffer(name, module.ops.prepare_linear_weight(loaded), persistent=False)


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by tp={parts}")
    return total // parts


class FloatLinearMethod:
    """How a float linear creates, finalises and applies its weight: the default ``method`` of
    ``LinearBase``. A quantised linear gets another object with the same three methods
    (``ascend_qwen3.quant.layers.Int8LinearMethod``), so these layers never import quantisation
    (the pattern of vLLM's ``quant_method``)."""

    def create(self, layer: nn.Module, out_local: int, in_local: int, *, dtype, device=None,
               with_quant_bias: bool = True) -> None:
        """Register the parameters the loader fills (``weight`` [out_local, in_local])."""
        layer.weight = empty_param(out_local, in_local, dtype=dtype, device=device)
        layer.ops = ops.bind(device, "linear", "prepare_linear_weight")

    def finalize(self, layer: nn.Module) -> None:
        """The loaded weight, replaced by the form the backend multiplies fastest."""
        finalize_float_weight(layer, "weight")

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer.ops.linear(x, layer.weight)


FLOAT = FloatLinearMethod()


class LinearBase(nn.Module):
    """A linear y = x @ W^T with this rank's slice of W.

    ``method`` creates, finalises and applies the weight: ``FLOAT`` (the default), or an int8
    method with the same parallel role (column: outputs split; row: inputs split, outputs
    all-reduced). The loader fills ``weight`` [out_local, in_local], the checkpoint's layout;
    ``finalize()``, once after loading, replaces it with the form the method's kernel takes (a
    prepacked float weight; an int8 weight as [in_local, out_local] in the backend's layout).
    """

    def __init__(self, in_local: int, out_local: int, *, dtype, device=None, method=None,
                 with_quant_bias: bool = True):
        super().__init__()
        self.in_local, self.out_local = in_local, out_local
        self.method = method or FLOAT
        self.output_dtype = dtype          # the activations' dtype (what quantised matmuls return)
        self.method.create(self, out_local, in_local, dtype=dtype, device=device,
                           with_quant_bias=with_quant_bias)

    def finalize(self) -> None:
        self.method.finalize(self)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; the result stays split (no communication).
    ``out_local``: this rank's output features (its heads' q/k/v, its share of gate/up)."""

    def __init__(self, in_features: int, out_local: int, *, dtype, device=None, method=None):
        super().__init__(in_features, out_local, dtype=dtype, device=device, method=method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial outputs summed with an all-reduce.
    ``in_local``: this rank's input features (its heads' attention output, its share of the
    FFN), as ``ColumnParallelLinear`` takes its local outputs."""

    def __init__(self, in_local: int, out_features: int, ctx: ParallelContext, *, dtype,
                 device=None, method=None):
        # a static W8A8 quant_bias is added once: on rank 0, before the all-reduce
        super().__init__(in_local, out_features, dtype=dtype, device=device, method=method,
                         with_quant_bias=ctx.tp_rank == 0)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return self.ctx.all_reduce(y)


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary range; ids outside a rank's range contribute zeros."""

    def __init__(self, vocab_size: int, dim: int, ctx: ParallelContext, *, dtype, device=None):
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // ctx.tp_size)  # ceil: the last rank may be padded
        self.start = ctx.tp_rank * self.per_rank
        self.weight = empty_param(self.per_rank, dim, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        return self.ctx.all_reduce(y)


class ParallelLMHead(nn.Module):
    """Logits over a vocabulary split by rank, gathered to the full vocabulary.

    With tied embeddings it reads the embedding's (identically split) weight.
    """

    def __init__(self, embedding: VocabParallelEmbedding, ctx: ParallelContext, *, tied: bool,
                 dtype, device=None):
        super().__init__()
        self.ctx, self.tied = ctx, tied
        self.vocab_size, self.per_rank = embedding.vocab_size, embedding.per_rank
        self._embedding = [embedding]  # not a submodule: the weight is owned by the embedding
        if not tied:
            self.weight = empty_param(self.per_rank, embedding.weight.shape[1], dtype=dtype,
                                      device=device)
        self.ops = ops.bind(device, "linear", "prepare_linear_weight")

    def finalize(self) -> None:
        """The head's weight in the backend's fastest form: its own, or (tied) a prepared copy
        of the embedding's (the embedding keeps the plain rows it looks up)."""
        finalize_float_weight(self, "weight", self._embedding[0].weight if self.tied else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = getattr(self, "weight", None)
        if w is None:          # tied and not finalised: multiply by the embedding itself
            w = self._embedding[0].weight
        logits = self.ctx.all_gather_last(self.ops.linear(hidden, w))
        return logits[..., :self.vocab_size]
