"""MC2: the expert-parallel token exchange of Atlas A2, ``npu_moe_distribute_dispatch_v2`` and
``npu_moe_distribute_combine_v2``, emulated with their multi-rank semantics.

Sources: the op-plugin API pages torch_npu-npu_moe_distribute_dispatch_v2.md and
torch_npu-npu_moe_distribute_combine_v2.md (https://gitcode.com/Ascend/op-plugin, docs; the
schemas in op_plugin/config/op_plugin_functions.yaml), the CANN pages
aclnnMoeDistributeDispatchV2 / aclnnMoeDistributeCombineV2 (hiascend, "aolapi"), and for what
the pages leave open (the order of the received rows, the assist info, the quantisation's
rounding, unwritten rows) the A2 full-mesh kernels of CANN's ops-transformer
(mc2/moe_distribute_dispatch_v2/op_kernel/moe_distribute_dispatch_a2.h,
mc2/moe_distribute_combine_v2/op_kernel/moe_distribute_combine_a2.h; the A2 tiling checks in
mc2/moe_distribute_dispatch_v2/op_host/op_tiling/arch22/).

What is modelled (Atlas A2, full mesh: no TP domain, no shared experts, no hierarchy):

- **Communicators.** A kernel names its expert-parallel communicator by a string (``group_ep``,
  ``ProcessGroupHCCL.get_hccl_comm_name``). Here a test registers what stands behind a name
  (``register``): ``GlooRanks`` (every rank a process of a torch.distributed group: the
  exchange is real) or ``StandInRanks`` (one process plays one rank; the others send what it
  sends, and their expert outputs are not computed: zeros; for counting kernels and bytes).
- **Dispatch.** Rank r holds experts r*L .. r*L+L-1 (L = experts / ranks). Every rank's active
  rows (``x_active_mask``, a prefix of True; all rows without it) are sent, one row per (token,
  slot), to the rank of the slot's expert. expand_x [A, H], A = BS * ranks * min(L, K): rows
  grouped by local expert, then source rank, then token (the kernel's order); rows past the
  received ones are not written (NaN here). quant_mode 2: each sent row is quantised on its
  way, ds = 127 / max|x| in fp32, q = rint(x * ds) (half to even), dynamic_scales = 1 / ds.
  expert_token_nums [L] int64: cumulative (type 0) or counts (type 1). ep_recv_counts [L * W]
  int32: the running sum over (local expert j, source s), index j * W + s, inclusive.
  assist_info_for_combine: for each of this rank's own pairs (t, k), in flat order, how many
  earlier pairs of this rank went to the same expert (the kernel's A2 layout); the rest not
  written. expand_scales: not written by the full-mesh kernel.
- **Combine.** For each active token t of rank s: out[t] = sum over k, in order, of fp32(row
  returned for (t, k)) * expert_scales[t, k], rounded once to expand_x's dtype; the returned
  row is the one at ep_send_counts' start of block (j, s) plus assist[t * K + k] on the
  expert's rank. Rows of inactive tokens are not written (NaN here).
- **Limits (A2):** BS 1..256; H a multiple of 32, at most 7168 (the documented full-mesh
  bound); K at most 16 and at most the experts; experts divisible by the ranks, at most 1024;
  ep_world_size 2-8, 16, 32, 64, 128 or 256; tp_world_size 0 or 1; quant_mode 0 or 2 (scales
  None with 0); shared_expert_rank_num 0, expert_shard_type 0; global_bs 0 (the same BS on every
  rank; a real global_bs is documented but not emulated); comm_alg "" (hierarchy not
  emulated); expert_token_nums_type 0 or 1.
- **Bytes.** What this rank receives from other ranks in each call is reported to
  ``traffic_listeners`` (``kernels.KernelMode`` keeps it beside the layer).
"""

from __future__ import annotations

from typing import Callable

import torch

from ._base import fail, fill_undefined, integer, op, tensor, unsupported

MAX_BS = 256
MAX_H = 7168
MAX_K = 16
MAX_EXPERTS = 1024
EP_SIZES = (2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256)
HALF = (torch.bfloat16, torch.float16)


# --- communicators -----------------------------------------------------------------------------

class GlooRanks:
    """The ranks behind a communicator name are processes of a torch.distributed group
    (``group`` None: the default one): what one rank sends the others receive."""

    stand_in = False

    def __init__(self, group=None):
        import torch.distributed as dist
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        import torch.distributed as dist
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts

    def active_counts(self, mine: int) -> list[int]:
        return [int(c) for c in self.all_gather(torch.tensor([mine], dtype=torch.int64))]


class StandInRanks:
    """One process plays rank ``rank`` of ``size``: every other rank sends what this one sends
    (of its first ``active[s]`` rows, when ``active`` gives each rank's active token count:
    e.g. the tensor-parallel ranks whose slice of a small step is padding); the expert outputs
    of the others are not computed here (zeros come back for them)."""

    stand_in = True

    def __init__(self, size: int, rank: int = 0, active: list[int] | None = None):
        self.size, self.rank, self.active = size, rank, active

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t] * self.size

    def active_counts(self, mine: int) -> list[int]:
        if self.active is None:
            return [mine] * self.size
        if self.active[self.rank] != mine:
            fail("npu_moe_distribute_dispatch_v2", f"this rank has {mine} active tokens, the "
                 f"stand-in says {self.active[self.rank]}")
        return list(self.active)


_COMMUNICATORS: dict[str, object] = {}
traffic_listeners: list[Callable[[str, int], None]] = []


def register(name: str, ranks) -> None:
    """Make ``name`` a communicator the MC2 kernels can be given (``group_ep``)."""
    _COMMUNICATORS[name] = ranks


def unregister(name: str) -> None:
    _COMMUNICATORS.pop(name, None)


def _ranks(opname: str, name, size: int, rank: int):
    if not isinstance(name, str):
        raise TypeError(f"torch_npu.{opname}(): argument 'group_ep' must be str, not "
                        f"{type(name).__name__}")
    if not 0 < len(name) < 128:
        fail(opname, f"group_ep must be 1..127 characters, got {len(name)}")
    ranks = _COMMUNICATORS.get(name)
    if ranks is None:
        fail(opname, f"no HCCL communicator named {name!r}")
    if ranks.size != size or ranks.rank != rank:
        fail(opname, f"ep_world_size {size} / ep_rank_id {rank} do not match communicator "
                     f"{name!r} ({ranks.size} ranks, this one {ranks.rank})")
    return ranks


def _received(name: str, nbytes: int) -> None:
    for listener in traffic_listeners:
        listener(name, int(nbytes))


# --- argument checks shared by both kernels ----------------------------------------------------

def _common(opname, expert_ids, ep_world_size, ep_rank_id, moe_expert_num, x_active_mask,
            group_tp, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
            shared_expert_rank_num, global_bs, comm_alg, zero_expert_num, copy_expert_num,
            const_expert_num, elastic_info, performance_info, bs):
    W = integer(opname, "ep_world_size", ep_world_size)
    r = integer(opname, "ep_rank_id", ep_rank_id)
    E = integer(opname, "moe_expert_num", moe_expert_num)
    if not 0 <= r < W:
        raise RuntimeError(f"torch_npu.{opname}: ep_rank_id {r} must lie in [0, {W})")
    if W not in EP_SIZES:
        fail(opname, f"ep_world_size must be one of {list(EP_SIZES)} on Atlas A2, got {W}")
    if not 0 < E <= MAX_EXPERTS or E % W:
        fail(opname, f"moe_expert_num must be in (0, {MAX_EXPERTS}] and divisible by "
                     f"ep_world_size {W}, got {E}")
    ids = tensor(opname, "expert_ids", expert_ids, dtypes=(torch.int32,), dims=(2,))
    if ids.shape[0] != bs:
        fail(opname, f"expert_ids must have {bs} rows (one per token), got {ids.shape[0]}")
    K = ids.shape[1]
    if not 0 < K <= min(MAX_K, E):
        fail(opname, f"K (experts per token) must be in (0, {min(MAX_K, E)}], got {K}")
    if not 0 < bs <= MAX_BS:
        fail(opname, f"BS must be in (0, {MAX_BS}] on Atlas A2, got {bs}")
    if integer(opname, "tp_world_size", tp_world_size) not in (0, 1) or tp_rank_id != 0 \
            or group_tp != "":
        fail(opname, "Atlas A2 has no TP domain: tp_world_size 0 or 1, tp_rank_id 0, group_tp ''")
    if expert_shard_type != 0 or shared_expert_rank_num != 0 or shared_expert_num not in (0, 1):
        fail(opname, "Atlas A2 takes no shared experts: expert_shard_type 0, "
                     "shared_expert_rank_num 0")
    if integer(opname, "global_bs", global_bs) != 0:
        unsupported(opname, "global_bs != 0 (a different BS on each rank)")
    if comm_alg not in ("", "fullmesh"):
        unsupported(opname, f"comm_alg {comm_alg!r} (hierarchy)")
    if zero_expert_num or copy_expert_num or const_expert_num:
        unsupported(opname, "zero / copy / constant experts")
    if elastic_info is not None:
        fail(opname, "elastic_info must be None on Atlas A2")
    if performance_info is not None:
        unsupported(opname, "performance_info")
    mask = tensor(opname, "x_active_mask", x_active_mask, dtypes=(torch.bool,), optional=True)
    if mask is not None:
        if mask.dim() != 1 or mask.shape[0] != bs:
            fail(opname, f"x_active_mask must be bool [{bs}], got {list(mask.shape)}")
        if bool((mask[1:] & ~mask[:-1]).any()):
            fail(opname, "x_active_mask must be True for a prefix of the tokens, then False")
    active = int(mask.sum()) if mask is not None else bs
    return W, r, E, ids, K, active


def _quantise(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quant_mode 2 on rows (each row one pair): ds = 127 / max|x| (fp32), q = rint(x * ds),
    scale 1 / ds."""
    xf = rows.float()
    ds = torch.tensor(127.0, dtype=torch.float32) / xf.abs().amax(dim=-1)
    q = torch.round(xf * ds.unsqueeze(-1)).to(torch.int8)
    return q, torch.tensor(1.0, dtype=torch.float32) / ds


# --- the kernels -------------------------------------------------------------------------------

@op
def npu_moe_distribute_dispatch_v2(x, expert_ids, group_ep, ep_world_size, ep_rank_id,
                                   moe_expert_num, *, scales=None, x_active_mask=None,
                                   expert_scales=None, elastic_info=None, performance_info=None,
                                   group_tp="", tp_world_size=0, tp_rank_id=0,
                                   expert_shard_type=0, shared_expert_num=1,
                                   shared_expert_rank_num=0, quant_mode=0, global_bs=0,
                                   expert_token_nums_type=1, comm_alg="", zero_expert_num=0,
                                   copy_expert_num=0, const_expert_num=0, y_dtype=None,
                                   x_dtype=None, scales_dtype=None):
    """(expand_x, dynamic_scales, assist_info_for_combine, expert_token_nums, ep_recv_counts,
    tp_recv_counts, expand_scales): module docstring."""
    name = "npu_moe_distribute_dispatch_v2"
    xt = tensor(name, "x", x, dtypes=HALF, dims=(2,))
    BS, H = xt.shape
    W, r, E, ids, K, active = _common(
        name, expert_ids, ep_world_size, ep_rank_id, moe_expert_num, x_active_mask, group_tp,
        tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num, shared_expert_rank_num,
        global_bs, comm_alg, zero_expert_num, copy_expert_num, const_expert_num, elastic_info,
        performance_info, BS)
    if H % 32 or not 0 < H <= MAX_H:
        fail(name, f"H must be a multiple of 32 in (0, {MAX_H}], got {H}")
    mode = integer(name, "quant_mode", quant_mode, choices=(0, 2))
    if scales is not None:
        unsupported(name, "smoothing scales")
    if expert_scales is not None:
        unsupported(name, "expert_scales (hierarchical communication)")
    if y_dtype is not None or x_dtype is not None or scales_dtype is not None:
        unsupported(name, "y_dtype / x_dtype / scales_dtype")
    kind = integer(name, "expert_token_nums_type", expert_token_nums_type, choices=(0, 1))
    ranks = _ranks(name, group_ep, W, r)
    L = E // W
    A = BS * W * min(L, K)

    xs = ranks.all_gather(xt)
    id_parts = ranks.all_gather(ids)
    counts = ranks.active_counts(active)
    lo = r * L
    blocks, sizes = [], torch.zeros(L, W, dtype=torch.int64)
    for j in range(L):
        for s in range(W):
            n_s = int(counts[s])
            t = (id_parts[s][:n_s] == lo + j).any(dim=1).nonzero(as_tuple=True)[0]
            blocks.append(xs[s][t])
            sizes[j, s] = t.numel()
    rows = torch.cat(blocks) if blocks else xt.new_empty(0, H)
    n = rows.shape[0]
    dyn = fill_undefined((A,), torch.float32)
    if mode == 2:
        expand_x = fill_undefined((A, H), torch.int8)
        if n:
            expand_x[:n], dyn[:n] = _quantise(rows)
    else:
        expand_x = fill_undefined((A, H), xt.dtype)
        expand_x[:n] = rows
    recv = sizes.reshape(-1).cumsum(0).to(torch.int32)            # index j * W + s, inclusive
    per_expert = sizes.sum(dim=1)
    token_nums = per_expert.cumsum(0) if kind == 0 else per_expert

    assist = fill_undefined((max(BS * K, A * 128),), torch.int32)
    flat = ids[:active].reshape(-1).long()
    if flat.numel():
        same = flat.unsqueeze(0) == flat.unsqueeze(1)
        earlier = torch.tril(same, diagonal=-1).sum(dim=1)
        assist[:flat.numel()] = earlier.to(torch.int32)
    row_bytes = H * (1 if mode == 2 else xt.element_size()) + (4 if mode == 2 else 0)
    _received(name, int(sizes.sum() - sizes[:, r].sum()) * row_bytes)
    return (expand_x, dyn, assist, token_nums.to(torch.int64), recv,
            torch.empty(0, dtype=torch.int32), fill_undefined((A,), torch.float32))


@op
def npu_moe_distribute_combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts,
                                  expert_scales, group_ep, ep_world_size, ep_rank_id,
                                  moe_expert_num, *, tp_send_counts=None, x_active_mask=None,
                                  expand_scales=None, shared_expert_x=None, elastic_info=None,
                                  ori_x=None, const_expert_alpha_1=None,
                                  const_expert_alpha_2=None, const_expert_v=None,
                                  performance_info=None, group_tp="", tp_world_size=0,
                                  tp_rank_id=0, expert_shard_type=0, shared_expert_num=1,
                                  shared_expert_rank_num=0, global_bs=0, comm_quant_mode=0,
                                  comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                  const_expert_num=0):
    """x [BS, H]: module docstring."""
    name = "npu_moe_distribute_combine_v2"
    ex = tensor(name, "expand_x", expand_x, dtypes=HALF, dims=(2,))
    scales = tensor(name, "expert_scales", expert_scales, dtypes=(torch.float32,), dims=(2,))
    BS, H = scales.shape[0], ex.shape[1]
    W, r, E, ids, K, active = _common(
        name, expert_ids, ep_world_size, ep_rank_id, moe_expert_num, x_active_mask, group_tp,
        tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num, shared_expert_rank_num,
        global_bs, comm_alg, zero_expert_num, copy_expert_num, const_expert_num, elastic_info,
        performance_info, BS)
    if tuple(scales.shape) != (BS, K):
        fail(name, f"expert_scales must be [{BS}, {K}] like expert_ids, got {list(scales.shape)}")
    if integer(name, "comm_quant_mode", comm_quant_mode) != 0:
        unsupported(name, "comm_quant_mode != 0")
    for arg, value in (("shared_expert_x", shared_expert_x), ("ori_x", ori_x),
                       ("const_expert_alpha_1", const_expert_alpha_1),
                       ("const_expert_alpha_2", const_expert_alpha_2),
                       ("const_expert_v", const_expert_v)):
        if value is not None:
            unsupported(name, arg)
    L = E // W
    counts = tensor(name, "ep_send_counts", ep_send_counts, dtypes=(torch.int32,), dims=(1,))
    assist = tensor(name, "assist_info_for_combine", assist_info_for_combine,
                    dtypes=(torch.int32,), dims=(1,))
    if counts.numel() < L * W or assist.numel() < BS * K:
        fail(name, "ep_send_counts / assist_info_for_combine are not this layout's dispatch's")
    ranks = _ranks(name, group_ep, W, r)
    outs = ranks.all_gather(ex)
    sends = ranks.all_gather(counts[:L * W].contiguous())

    out = fill_undefined((BS, H), ex.dtype)
    acc = torch.zeros(active, H, dtype=torch.float32)
    from_others = 0
    for t in range(active):
        for k in range(K):
            e = int(ids[t, k])
            d, j = divmod(e, L)
            if d != r:
                from_others += 1
            if ranks.stand_in and d != r:
                continue                        # another rank's experts: not computed here
            prefix = sends[d]
            start = int(prefix[j * W + r - 1]) if j * W + r > 0 else 0
            row = outs[d][start + int(assist[t * K + k])]
            acc[t] = acc[t] + row.float() * scales[t, k]
    out[:active] = acc.to(ex.dtype)
    _received(name, from_others * H * ex.element_size())
    return out
