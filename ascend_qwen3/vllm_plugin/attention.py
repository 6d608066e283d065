"""The project's attention backend for vLLM: the platform's backend with ``ops`` as the kernel.

vLLM keeps scheduling, KV-block allocation and the attention metadata; the backend class below
extends the platform's own backend (same name, metadata builder and cache layout: see
``compat``) and replaces only the implementation. ``OpsAttentionImpl.forward`` writes this step's
keys and values into vLLM's paged cache with ``ops.write_kv_cache`` and runs
``ops.paged_attention`` on it: torch_npu's fused attention on the NPU, the batched PyTorch
reference on the CPU. It is attached to each layer through ``Attention(..., attn_backend=)``, the
out-of-tree route vLLM offers (selecting a custom backend by name is not honoured on the CPU).
"""

from __future__ import annotations

import functools

import torch

import ops
from . import compat


def _forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache,
             attn_metadata, output: torch.Tensor, output_scale=None, output_block_scale=None,
             *args, **kwargs) -> torch.Tensor:
    """query [T, H, D], key/value [T, Hkv, D] (T may include padding), output [T, H, D]."""
    if output_scale is not None or output_block_scale is not None:
        raise NotImplementedError("ascend-qwen3 attention does not fuse output quantisation")
    if attn_metadata is None:          # vLLM's profiling / warm-up pass: no cache bound yet
        return output
    a = compat.attention_inputs(kv_cache, attn_metadata)
    n = a.num_tokens
    ops.write_kv_cache(key[:n], value[:n], a.key_cache, a.value_cache, a.slot_mapping)
    out = ops.paged_attention(query[:n], a.key_cache, a.value_cache, a.block_tables,
                              a.query_start_loc, a.seq_lens, self.scale)
    output[:n].copy_(out.view(output[:n].shape))
    return output


def _do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
    # Not called while the backend says forward_includes_kv_cache_update (it does); defined so a
    # runner that calls it anyway writes the same (idempotent) values.
    key_cache, value_cache = compat.kv_views(kv_cache)
    n = slot_mapping.shape[0]
    ops.write_kv_cache(key[:n], value[:n], key_cache, value_cache, slot_mapping)


@functools.cache
def ops_attention_backend() -> type:
    """Our backend class for the running platform (built once per process)."""
    base = compat.platform_attention_backend()
    impl = type("OpsAttentionImpl", (base.get_impl_cls(),), {
        "__doc__": "The platform's attention impl with forward() running ascend-qwen3's ops.",
        "__module__": __name__,
        "forward": _forward,
        "do_kv_cache_update": _do_kv_cache_update,
    })
    return type("OpsAttentionBackend", (base,), {
        "__doc__": f"{base.__name__} with ascend-qwen3's ops as the attention kernel.",
        "__module__": __name__,
        "forward_includes_kv_cache_update": True,
        "get_impl_cls": staticmethod(lambda: impl),
    })
