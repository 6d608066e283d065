"""Paged KV-cache writes.

Sources:
  * ``_npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices)``: op-plugin
    ``op_plugin/ops/atb/ReshapeAndCachAtb.cpp`` (schema; ND caches unless BOTH caches are
    FRACTAL_NZ) and the ATB ReshapeAndCacheOperation page (hiascend ``ascendtb_01_0073``):
    key [num_tokens, num_head, k_head_size], value [num_tokens, num_head, v_head_size],
    keyCache [num_blocks, block_size, num_head, k_head_size] (ND), float16/bf16/int8, all four
    of one dtype; slotMapping int32 [num_tokens], slot = block_id * block_size + offset; the
    caches are updated in place. Negative slots are skipped: op-plugin's own test of this op
    (``test/test_custom_ops/test_atb_reshape_and_cache.py``, cal_nd) skips ``slot < 0``, which is
    how vLLM marks padding tokens. NZ caches follow the same test's cal_nz layout
    [num_blocks, num_head*head_size // C0, block_size, C0] with C0 = 32 bytes / itemsize.
  * ``npu_scatter_pa_kv_cache``: op-plugin ``torch_npu-npu_scatter_pa_kv_cache.md``. Only
    scenario 1 (3-D key/value, no compression) is emulated; slot_mapping values must lie in
    [0, num_blocks*block_size - 1] and be unique (the page gives no skip value).
"""

from __future__ import annotations

import torch

from ._base import dt, fail, op, tensor, unsupported
from .formats import FRACTAL_NZ, format_of

_ATB_DTYPES = (torch.float16, torch.bfloat16, torch.int8)


def _nz_c0(t: torch.Tensor) -> int:
    return 32 // t.element_size()


def _write_nz(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, bs: int) -> None:
    """cache [NB, H // C0, BS, C0]; rows [n, H]: row r goes to cache[blk, :, off, :]."""
    nb, h1, _, c0 = cache.shape
    blk, off = slots // bs, slots % bs
    cache[blk, :, off, :] = rows.reshape(rows.shape[0], h1, c0)


@op
def _npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices):
    name = "_npu_reshape_and_cache"
    k = tensor(name, "key", key, dtypes=_ATB_DTYPES, dims=(3,))
    v = tensor(name, "value", value, dtypes=_ATB_DTYPES, dims=(3,))
    kc = tensor(name, "key_cache", key_cache, dtypes=_ATB_DTYPES, dims=(4,))
    vc = tensor(name, "value_cache", value_cache, dtypes=_ATB_DTYPES, dims=(4,))
    slots = tensor(name, "slot_indices", slot_indices, dtypes=(torch.int32,), dims=(1,))
    if not (k.dtype == v.dtype == kc.dtype == vc.dtype):
        fail(name, f"key/value/key_cache/value_cache must share one dtype, got "
                   f"{dt(k)}/{dt(v)}/{dt(kc)}/{dt(vc)}")
    T = k.shape[0]
    if v.shape[0] != T or k.shape[1] != v.shape[1] or slots.shape[0] != T:
        fail(name, f"key {list(k.shape)}, value {list(v.shape)} and slot_indices "
                   f"{list(slots.shape)} must agree on num_tokens (and num_head)")
    nz = format_of(kc) == FRACTAL_NZ and format_of(vc) == FRACTAL_NZ
    if nz:
        nb, bs = kc.shape[0], kc.shape[2]
        for nm, cache, src in (("key_cache", kc, k), ("value_cache", vc, v)):
            c0 = _nz_c0(cache)
            h = src.shape[1] * src.shape[2]
            if cache.shape[3] != c0 or cache.shape[1] * c0 != h or cache.shape[0] != nb \
                    or cache.shape[2] != bs:
                fail(name, f"NZ {nm} must be [num_blocks, num_head*head_size/{c0}, block_size, "
                           f"{c0}] = [{nb}, {h // c0}, {bs}, {c0}], got {list(cache.shape)}")
    else:
        nb, bs = kc.shape[0], kc.shape[1]
        if tuple(kc.shape[2:]) != tuple(k.shape[1:]) or tuple(vc.shape[2:]) != tuple(v.shape[1:]) \
                or tuple(vc.shape[:2]) != (nb, bs):
            fail(name, f"ND caches must be [num_blocks, block_size, num_head, head_size] "
                       f"matching key {list(k.shape)} / value {list(v.shape)}; got key_cache "
                       f"{list(kc.shape)}, value_cache {list(vc.shape)}")
    s = slots.long()
    keep = s >= 0  # negative slot: token skipped (see module docstring)
    if bool((s[keep] >= nb * bs).any()):
        fail(name, f"slot {int(s.max())} is outside the cache ({nb} blocks x {bs} = "
                   f"{nb * bs} slots)")
    s = s[keep]
    if s.unique().numel() != s.numel():
        fail(name, "slot_indices hold duplicate slots (the result would be undefined)")
    kk, vv = k[keep], v[keep]
    if nz:
        _write_nz(kc, kk.reshape(kk.shape[0], -1), s, bs)
        _write_nz(vc, vv.reshape(vv.shape[0], -1), s, bs)
    else:
        kc.view(nb * bs, *kc.shape[2:])[s] = kk
        vc.view(nb * bs, *vc.shape[2:])[s] = vv


_SCATTER_DTYPES = (torch.float16, torch.float32, torch.bfloat16, torch.int8, torch.uint8,
                   torch.int16, torch.int32)


@op
def npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, *,
                            compress_lens=None, compress_seq_offsets=None, seq_lens=None,
                            cache_mode="PA_NZ"):
    """Scenario 1 only: key [batch, num_head, k_head_size], value [batch, num_head, v_head_size].

    cache_mode 'PA_NZ' (default): caches must be FRACTAL_NZ ("仅支持NZ内存排布格式"), shaped
    [num_blocks, num_head*head_size // last_dim, block_size, last_dim]. cache_mode None/'Norm':
    ND caches; their shape is not given by the page, the emulator takes the ND layout the
    ATB/vLLM caches use, [num_blocks, block_size, num_head, head_size].
    All tensors contiguous; key/value/caches one dtype; slot_mapping int32/int64 in
    [0, num_blocks*block_size-1], no duplicates. Updated in place, returns None.
    """
    name = "npu_scatter_pa_kv_cache"
    if compress_lens is not None or compress_seq_offsets is not None or seq_lens is not None:
        unsupported(name, "scenario 2 (compress_lens / compress_seq_offsets / seq_lens)")
    k = tensor(name, "key", key, dtypes=_SCATTER_DTYPES, dims=(3, 4), contiguous=True)
    if k.dim() == 4:
        unsupported(name, "scenario 2 (4-D key/value)")
    v = tensor(name, "value", value, dtypes=_SCATTER_DTYPES, dims=(3,), contiguous=True)
    kc = tensor(name, "key_cache", key_cache, dtypes=_SCATTER_DTYPES, dims=(4,), contiguous=True)
    vc = tensor(name, "value_cache", value_cache, dtypes=_SCATTER_DTYPES, dims=(4,),
                contiguous=True)
    slots = tensor(name, "slot_mapping", slot_mapping, dtypes=(torch.int32, torch.int64),
                   dims=(1,), contiguous=True)
    if not (k.dtype == v.dtype == kc.dtype == vc.dtype):
        fail(name, f"key/value/key_cache/value_cache must share one dtype, got "
                   f"{dt(k)}/{dt(v)}/{dt(kc)}/{dt(vc)}")
    if tuple(k.shape[:2]) != tuple(v.shape[:2]) or slots.shape[0] != k.shape[0]:
        fail(name, f"key {list(k.shape)}, value {list(v.shape)} and slot_mapping "
                   f"{list(slots.shape)} must agree on the first two dims / batch")
    if cache_mode == "PA_NZ":
        if format_of(kc) != FRACTAL_NZ or format_of(vc) != FRACTAL_NZ:
            fail(name, "cache_mode 'PA_NZ' needs FRACTAL_NZ caches "
                       "(torch_npu.npu_format_cast(cache, 29))")
        nb, bs = kc.shape[0], kc.shape[2]
        for nm, cache, src in (("key_cache", kc, k), ("value_cache", vc, v)):
            last = cache.shape[3]
            h = src.shape[1] * src.shape[2]
            if h % last or cache.shape[1] != h // last or cache.shape[0] != nb \
                    or cache.shape[2] != bs:
                fail(name, f"{nm} must be [num_blocks, num_head*head_size//last_dim, block_size, "
                           f"last_dim] for {nm.split('_')[0]} {list(src.shape)}, got "
                           f"{list(cache.shape)}")
    elif cache_mode in (None, "Norm"):
        if format_of(kc) == FRACTAL_NZ or format_of(vc) == FRACTAL_NZ:
            fail(name, f"cache_mode {cache_mode!r} supports ND caches only")
        nb, bs = kc.shape[0], kc.shape[1]
        if tuple(kc.shape[2:]) != tuple(k.shape[1:]) or tuple(vc.shape[2:]) != tuple(v.shape[1:]) \
                or tuple(vc.shape[:2]) != (nb, bs):
            fail(name, f"ND caches must be [num_blocks, block_size, num_head, head_size], got "
                       f"{list(kc.shape)}/{list(vc.shape)}")
    else:
        fail(name, f"cache_mode must be 'PA_NZ', 'Norm' or None, got {cache_mode!r}")
    s = slots.long()
    if s.numel() and (int(s.min()) < 0 or int(s.max()) > nb * bs - 1):
        fail(name, f"slot_mapping values must lie in [0, {nb * bs - 1}], got "
                   f"[{int(s.min())}, {int(s.max())}]")
    if s.unique().numel() != s.numel():
        fail(name, "slot_mapping holds duplicate slots (the page: correctness not guaranteed)")
    if cache_mode == "PA_NZ":
        _write_nz(kc, k.reshape(k.shape[0], -1), s, bs)
        _write_nz(vc, v.reshape(v.shape[0], -1), s, bs)
    else:
        kc.view(nb * bs, *kc.shape[2:])[s] = k
        vc.view(nb * bs, *vc.shape[2:])[s] = v
    return None
