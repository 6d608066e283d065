"""A standalone paged KV cache with a block allocator, for tests, benchmarks and ``run``.

Layout per layer: key and value caches of [num_blocks, block_size, kv_heads_per_rank, head_dim]
(the layout torch_npu's paged KV-cache kernels use). ``prepare`` turns "these requests get these new tokens" into the
positions and ``AttentionMetadata`` of one packed step, allocating blocks as sequences grow.
"""

from __future__ import annotations

import torch

from ..config import Qwen3Config
from ..parallel import SINGLE, ParallelContext
from ..parallel.plan import local_heads
from ..model.metadata import AttentionMetadata


class CacheFullError(RuntimeError):
    pass


class PagedKVCache:
    def __init__(self, cfg: Qwen3Config, num_blocks: int, block_size: int = 128,
                 ctx: ParallelContext = SINGLE, device="cpu", dtype: torch.dtype | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        kv_heads = local_heads(cfg, ctx.tp_size)[1]
        dtype = dtype or cfg.dtype
        shape = (num_blocks, block_size, kv_heads, cfg.head_dim)
        self.caches = [(torch.zeros(shape, dtype=dtype, device=device),
                        torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device
        self._free = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    @classmethod
    def for_tokens(cls, cfg: Qwen3Config, total_tokens: int, block_size: int = 128, **kw):
        """A cache large enough for ``total_tokens`` tokens spread over any number of sequences
        (one partly filled block per sequence is accounted by the caller through total_tokens)."""
        return cls(cfg, max(1, -(-total_tokens // block_size)), block_size, **kw)

    def release(self, seq_id: int) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id, [])))
        self.lens.pop(seq_id, None)

    def _grow(self, seq_id: int, new_len: int) -> None:
        table = self.tables.setdefault(seq_id, [])
        need = -(-new_len // self.block_size) - len(table)
        if need > len(self._free):
            raise CacheFullError(f"KV cache full: sequence {seq_id} needs {need} more block(s) of "
                                 f"{self.block_size} tokens, {len(self._free)} free of "
                                 f"{self.num_blocks}; build the cache with more blocks")
        for _ in range(need):
            table.append(self._free.pop())

    def prepare(self, steps: list[tuple[int, int]]) -> tuple[torch.Tensor, AttentionMetadata]:
        """steps: (seq_id, new_tokens) per request, in packing order.

        Returns positions [T] int64 and the metadata of the packed step.
        """
        starts, seq_lens = [0], []
        for seq_id, n in steps:
            length = self.lens.get(seq_id, 0) + n
            self._grow(seq_id, length)
            starts.append(starts[-1] + n)
            seq_lens.append(length)
        width = max(len(self.tables[s]) for s, _ in steps)
        tables = torch.tensor([self.tables[s] + [0] * (width - len(self.tables[s])) for s, _ in steps],
                              dtype=torch.int32)
        # every token's position and cache slot, computed for all requests at once
        request = torch.repeat_interleave(torch.arange(len(steps)), torch.tensor([n for _, n in steps]))
        end = torch.tensor(seq_lens)[request]                     # keys of the token's request
        positions = end - (torch.tensor(starts[1:])[request] - torch.arange(len(request)))
        slots = tables[request, positions // self.block_size].long() * self.block_size \
            + positions % self.block_size
        for (seq_id, _), length in zip(steps, seq_lens):
            self.lens[seq_id] = length
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            slot_mapping=slots.to(device=dev, dtype=torch.int32),    # the NPU kernels' dtype
            query_start_loc_host=starts,
            seq_lens_host=seq_lens,
        )
        return positions.to(dev), meta
