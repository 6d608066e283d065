"""The project's attention backend for vLLM: the platform's backend with ``ops`` as the kernel.

vLLM keeps scheduling, KV-block allocation and the attention metadata; the backend class below
extends the platform's own backend (same name, metadata and cache layout: see ``compat``) and
replaces the implementation. ``OpsAttentionImpl.forward`` writes this step's keys and values
into vLLM's paged cache with ``ops.write_kv_cache`` and runs ``ops.paged_attention`` on it:
torch_npu's fused attention on the NPU; on the CPU vLLM's own C++ kernels, which the plugin
registers as those two ops (``cpu_kernels.py``; the batched PyTorch specification with
``ASCEND_QWEN3_ENGINE_KERNELS=0``), with the step's lengths as host lists
(``compat.host_lengths``), so no layer reads a device value back, and the step's work split
from vLLM's metadata builder (``plan``).
It is attached to each layer through ``Attention(..., attn_backend=)``, the out-of-tree route
vLLM offers (selecting a custom backend by name is not honoured on the CPU).

Graph mode. vLLM calls the impl through its opaque ``unified_attention_with_output`` op, so the
impl runs eagerly outside the compiled graph, and piecewise graphs (``cudagraph_mode``
PIECEWISE) are split at it. A FULL graph (vllm-ascend's default FULL_AND_PIECEWISE captures one
per uniform decode size) also captures the attention call, and a replay would run it with the
lengths of its capture, unless something refreshes them: vllm-ascend does, after each replay,
for the calls recorded in its graph params (``update_full_graph_params`` in
``vllm_ascend/compilation/acl_graph.py`` runs ``AscendAttentionBackendImpl.update_graph_params``
of ``vllm_ascend/attention/attention_v1.py``). So while vllm-ascend captures (its forward
context's ``capturing``), this impl captures its attention as an updatable task
(``ops.npu.paged_attention_graph_task``: event, task group, the ``.out`` call writing vLLM's
output) and records it in vllm-ascend's layout (``compat.record_attention_task``); every replay
then gets the step's lengths and block table, as vllm-ascend's own layers do. Why this way in
(and not delegating the captured call to vllm-ascend's impl, or patching its updater):
docs/serving.md. The builder therefore declares ``AttentionCGSupport.ALWAYS`` on the NPU (as
vllm-ascend's own builder does); the backbone refuses to start when the installed vllm-ascend
no longer works as this relies on (``compat.check_full_graph_protocol``). On the CPU, where
vLLM captures no graphs, the platform builder's own declaration stands.
"""

from __future__ import annotations

import functools

import torch

import ops
from . import compat


def _impl_ops(impl, device):
    """The ops backend of this impl's device, bound on its first call (then kept)."""
    bound = impl.__dict__.get("_ascend_qwen3_ops")
    if bound is None:
        bound = impl._ascend_qwen3_ops = ops.bind(device, "write_kv_cache", "paged_attention")
    return bound


def _forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache,
             attn_metadata, output: torch.Tensor, output_scale=None, output_block_scale=None,
             *args, **kwargs) -> torch.Tensor:
    """query [T, H, D], key/value [T, Hkv, D] (T may include padding), output [T, H, D]."""
    if output_scale is not None or output_block_scale is not None:
        raise NotImplementedError("ascend-qwen3 attention does not fuse output quantisation")
    if attn_metadata is None:          # vLLM's profiling / warm-up pass: no cache bound yet
        return output.zero_()          # (as the platform impls do: no garbage into later layers)
    be = _impl_ops(self, query.device)
    kept = self.__dict__.get("_ascend_qwen3_kv")         # (this layer's cache, its views)
    if kept is None or kept[0] is not kv_cache:
        kept = self._ascend_qwen3_kv = (kv_cache, compat.kv_views(kv_cache))
    a = compat.attention_inputs(kv_cache, attn_metadata, kept[1])
    n = a.num_tokens
    if n == query.shape[0]:          # no padding (always so on the CPU): no per-layer slicing
        q, k, v, o = query, key, value, output
    else:
        q, k, v, o = query[:n], key[:n], value[:n], output[:n]
    if o.dim() != 3:                 # vLLM passes the output as [T, H, D]; a runner may not
        o = o.view(q.shape)
    be.write_kv_cache(k, v, a.key_cache, a.value_cache, a.slot_mapping)
    graph_params = compat.full_graph_capture() if be.NAME == "npu" else None
    if graph_params is not None:     # a FULL graph is being captured: an updatable task
        S = a.query_start_loc_host[-1]       # the padded size: every query row is used
        task = be.paged_attention_graph_task(
            query[:S], a.key_cache, a.value_cache, a.block_tables, a.query_start_loc, a.seq_lens,
            self.scale, out=output[:S].view(query[:S].shape), query_start_loc_host=a.query_start_loc_host,
            seq_lens_host=a.seq_lens_host, workspace=graph_params.workspaces.get(S))
        compat.record_attention_task(graph_params, S, task)
        return output
    be.paged_attention(q, a.key_cache, a.value_cache, a.block_tables,
                       a.query_start_loc, a.seq_lens, self.scale,
                       query_start_loc_host=a.query_start_loc_host,
                       seq_lens_host=a.seq_lens_host, plan=compat.attention_plan(attn_metadata),
                       out=o)
    return output


def _do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
    # Not called while the backend says forward_includes_kv_cache_update (it does); defined so a
    # runner that calls it anyway writes the same (idempotent) values.
    key_cache, value_cache = compat.kv_views(kv_cache)
    n = slot_mapping.shape[0]
    _impl_ops(self, key.device).write_kv_cache(key[:n], value[:n], key_cache, value_cache,
                                               slot_mapping)


def _graph_support(cls, vllm_config, kv_cache_spec):
    from vllm.v1.attention.backend import AttentionCGSupport

    if compat.on_npu():     # replays get fresh lengths (module docstring)
        return AttentionCGSupport.ALWAYS
    return super(cls, cls).get_cudagraph_support(vllm_config, kv_cache_spec)


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
    builder = type("OpsAttentionMetadataBuilder", (base.get_builder_cls(),), {
        "__doc__": "The platform's metadata builder, declaring the graph support the project's "
                   "attention has (see the module docstring).",
        "__module__": __name__,
        "get_cudagraph_support": classmethod(_graph_support),
    })
    return type("OpsAttentionBackend", (base,), {
        "__doc__": f"{base.__name__} with ascend-qwen3's ops as the attention kernel.",
        "__module__": __name__,
        "forward_includes_kv_cache_update": True,
        "get_impl_cls": staticmethod(lambda: impl),
        "get_builder_cls": staticmethod(lambda: builder),
    })
