"""Which slice of the model this process holds, and the collectives that join the slices.

Works over any torch.distributed process group (gloo on the CPU, HCCL on the NPU, or the tensor-
parallel group of a vLLM engine); with tp_size == 1 every collective is the identity and
torch.distributed is never touched.
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
    expert_parallel: bool = False   # each rank holds whole experts (EP size = tp_size)
    group: Any = None         # torch.distributed group (None: the default group)

    def __post_init__(self):
        if not (0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"tp_rank={self.tp_rank} must lie in [0, tp_size={self.tp_size})")

    @property
    def ep_size(self) -> int:
        return self.tp_size if self.expert_parallel else 1

    @property
    def ep_rank(self) -> int:
        return self.tp_rank if self.expert_parallel else 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel ranks."""
        return x if self.tp_size == 1 else self._reduce(x)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' tensors along the last dim (rank order)."""
        return x if self.tp_size == 1 else self._gather_last(x.contiguous())

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


SINGLE = ParallelContext()
