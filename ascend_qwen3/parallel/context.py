"""Which slice of the model this process holds, and the collectives that join the slices.

Works over any torch.distributed process group (gloo on the CPU, HCCL on the NPU, or the tensor-
parallel group of a vLLM engine); with tp_size == 1 every collective is the identity and
torch.distributed is never touched.

Data parallel (``dp_size`` > 1) exists only inside a serving engine, where each data-parallel
rank runs its own batch on its own tensor-parallel group; with expert parallel the experts are
spread over all of them (EP = DP x TP, expert-parallel rank = dp_rank x tp_size + tp_rank, the
order of vLLM's EP group) and the MoE layers exchange tokens across the data-parallel ranks. The
collectives that needs (``dp_token_counts``, ``dp_all_gather``, ``dp_reduce_scatter``,
``all_gather_rows``) run over torch.distributed groups here (``parallel.launch.run_parallel(...,
dp=N)`` makes them, for tests) and over the engine's groups inside vLLM
(``vllm_plugin.model.VllmParallelContext``). With ``dispatch_capacity`` set, steps up to it
exchange by ``ops.ep_dispatch`` / ``ops.ep_combine`` over ``expert_group`` instead (MC2 on the
NPU, over the HCCL communicator ``ep_hccl_name``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    expert_parallel: bool = False   # each rank holds whole experts (EP size = dp_size x tp_size)
    group: Any = None         # torch.distributed group (None: the default group)
    dp_rank: int = 0          # data-parallel rank (a serving engine's; 0 elsewhere)
    dp_size: int = 1
    dp_group: Any = None      # the ranks with this tp_rank in every data-parallel rank
    ep_group: Any = None      # every rank (data- and tensor-parallel): None, the default group
    # the MoE exchange across data-parallel ranks by dispatch and combine (``ops.ep_dispatch``,
    # vllm-ascend's MC2 on Atlas A2) for steps of up to this many tokens per data-parallel rank
    # (padded to a multiple of tp_size); larger steps, or 0, take the all-gather exchange
    dispatch_capacity: int = 0
    ep_hccl_name: str | None = None   # the expert-parallel group's HCCL communicator (NPU)

    def __post_init__(self):
        if not (0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"tp_rank={self.tp_rank} must lie in [0, tp_size={self.tp_size})")
        if not (0 <= self.dp_rank < self.dp_size):
            raise ValueError(f"dp_rank={self.dp_rank} must lie in [0, dp_size={self.dp_size})")

    @property
    def ep_size(self) -> int:
        return self.tp_size * self.dp_size if self.expert_parallel else 1

    @property
    def ep_rank(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank if self.expert_parallel else 0

    @property
    def experts_across_dp(self) -> bool:
        """True when the MoE layers must exchange tokens between data-parallel ranks."""
        return self.expert_parallel and self.dp_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel ranks."""
        return x if self.tp_size == 1 else self._reduce(x)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' tensors along the last dim (rank order)."""
        return x if self.tp_size == 1 else self._gather_last(x.contiguous())

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the tensor-parallel ranks' equal-shaped tensors along dim 0 (rank order)."""
        return x if self.tp_size == 1 else self._gather_rows(x.contiguous())

    def dispatch_exchange(self, padded_tokens: int) -> bool:
        """True when a step whose data-parallel ranks run up to ``padded_tokens`` tokens each
        (a multiple of tp_size) exchanges its MoE tokens by ``ops.ep_dispatch`` /
        ``ops.ep_combine``; False: the all-gather exchange."""
        return self.experts_across_dp and 0 < padded_tokens <= self.dispatch_capacity

    def dispatch_active(self, tokens: int, first: int, n: int, rows: torch.Tensor):
        """Which of rows ``first`` .. ``first + n`` of a step padded past its ``tokens`` rows
        take part in the dispatch: a bool [n] mask on the rows' device, or None for all.
        ``rows``: 0, 1, ... on that device (a view, no kernel). Here: the rows before
        ``tokens`` (a host decision: no mask at all when every row is real)."""
        return None if first + n <= tokens else rows[first:first + n] < tokens

    @property
    def expert_group(self):
        """The expert-parallel group as ``ops.ep_dispatch`` takes it."""
        from ops.cpu import ExpertGroup
        return ExpertGroup(rank=self.ep_rank, size=self.ep_size, group=self.ep_group,
                           hccl_name=self.ep_hccl_name)

    # across data-parallel ranks (a serving engine's context overrides these with its groups)
    def dp_token_counts(self, local: int) -> list[int]:
        """The number of tokens each data-parallel rank runs in this step (host values; ``local``
        is this rank's). Here: exchanged as a host tensor over the group."""
        n = torch.tensor([local], dtype=torch.int64)
        parts = [torch.empty_like(n) for _ in range(self.dp_size)]
        dist.all_gather(parts, n, group=self.dp_group)
        return [int(p) for p in parts]

    def dp_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors of the data-parallel ranks along dim 0 (rank order)."""
        parts = [torch.empty_like(x) for _ in range(self.dp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.dp_group)
        return torch.cat(parts)

    def dp_reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the data-parallel ranks of equal-shaped [dp x n, ...] tensors, this
        rank's n rows of it (rank order, ``dp_all_gather``'s inverse)."""
        y = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        out = y.new_empty((y.shape[0] // self.dp_size,) + tuple(y.shape[1:]))
        dist.reduce_scatter_tensor(out, y.contiguous(), group=self.dp_group)
        return out.to(x.dtype)

    # the collectives themselves, over torch.distributed (a serving engine's context overrides
    # them with its own group's)
    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        # low-precision dtypes reduce in fp32
        y = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x.clone()
        dist.all_reduce(y, group=self.group)
        return y.to(x.dtype)

    def _gather_last(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((self.tp_size * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=self.group)
        return out


SINGLE = ParallelContext()
