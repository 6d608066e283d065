"""Per-step attention metadata shared by every layer of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes the packed tokens of one step (several requests, TND layout).

    query_start_loc: [R+1] int32, request r's tokens are rows query_start_loc[r]:query_start_loc[r+1].
    seq_lens: [R] int32, keys of request r after this step (cached prefix + new tokens).
    block_tables: [R, max_blocks] int32, physical cache block of each logical block (pad with 0).
    slot_mapping: [T] int32 or int64, cache slot of each token (-1: do not write); int32 is what
    the NPU's cache-write kernel takes (the standalone runner makes it so: no cast per layer).
    query_start_loc_host, seq_lens_host: the same values as Python lists, made on the host when
    the step is planned: kernels that take lengths as host arguments (the NPU's fused attention)
    read these instead of copying the tensors back from the device in every layer.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
