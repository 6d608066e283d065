"""FULL ACL graphs of the project's graph on the NPU backend, emulated end to end (tier 2), and
its kernels per decoder layer held to vllm-ascend 0.23's.

The model is built as the vLLM plugin builds it: the project's graph with the plugin's attention
impl (``vllm_plugin.attention._forward``) as every layer's attention, on metadata shaped like
vllm-ascend's ``AscendMetadata`` and KV caches in its layout, all ops bound to ``ops.npu`` over
the torch_npu emulator (whose ``torch_npu.npu`` records and replays graphs: npu_emulator/graphs.py).
``Runner`` drives it as vllm-ascend 0.23's model runner does (vllm_ascend/worker/model_runner_v1.py,
"MR"; vllm_ascend/compilation/acl_graph.py, "AG"; vllm_ascend/attention/attention_v1.py, "AV1";
line numbers of the 0.23.0 wheel):

- capture (MR ``_dummy_run`` about 3367-3661, AG ``ACLGraphWrapper.__call__`` 152-232): one
  eager warm-up of a uniform decode batch of S requests (query 1, seq_len 1, every slot -1),
  then the same batch inside ``torch.npu.graph(g)`` with the forward context's ``capturing`` set;
- replay (MR ``execute_model`` / ``_model_forward`` 2834-2874): the step's tokens, positions,
  slots and block table written into the persistent buffers the graph captured, the batch padded
  as ``_pad_query_start_loc_for_fia`` (MR 813-860) and ``_build_attention_metadata`` (MR
  3119-3126) pad it (uniform: dummy requests of query 1 and seq_len 0, slot -1, block row 0;
  mixed: one dummy request for the whole padding with seq_len 1 and a zero block row, AV1
  319-351), the stream synchronised and ``g.replay()`` launched;
- update (MR ``_update_full_graph_params_if_needed`` 2809-2832 -> AG ``update_full_graph_params``
  270-289 -> AV1 ``update_graph_params``, the FIA branch 621-799, written out in ``_update``):
  for every recorded call, on a second stream, ``graph_task_update_begin``, the same ``.out``
  call with the step's ``actual_seq_lengths_q`` / ``seq_lens_list`` / ``block_tables``,
  ``graph_task_update_end``, ``event.record``; the replay waits on each layer's event until then.

Checked: several decode steps with growing and changing lengths, a uniform batch padded with
query-1 requests and a mixed batch with a dummy request give the eager engine's hidden states,
dense and MoE, bf16 and W8A8; the same steps without the update replay the capture's lengths and
are caught. And the kernels each decoder layer launches in the captured decode graph stay within
vllm-ascend's own count (``BUDGETS``; the table in docs/serving.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from ascend_qwen3.loader import load_model
from ascend_qwen3.parallel import ParallelContext
from ascend_qwen3.vllm_plugin import attention as plugin_attention
from ascend_qwen3.vllm_plugin import compat
from tests.npu_emulator.kernels import attach
from tests.test_graph_npu_emulated import npu_backend

BS = 128            # the KV block size of the NPU profiles
S = 8               # the captured decode size
MAX_TOKENS = 256    # the persistent buffers' size (vLLM sizes them for max_num_batched_tokens)


@dataclass
class Meta:
    """The fields of vllm-ascend's AscendMetadata that the project's impl and vllm-ascend's
    updater read."""
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    num_actual_tokens: int
    slot_mapping: torch.Tensor
    actual_seq_lengths_q: list
    seq_lens_list: list


@dataclass
class GraphParams:
    """vllm_ascend/compilation/acl_graph.py GraphParams (AG 292-297), for one capture size."""
    events: dict = field(default_factory=lambda: {S: []})
    workspaces: dict = field(default_factory=lambda: {S: None})
    handles: dict = field(default_factory=lambda: {S: []})
    attn_params: dict = field(default_factory=lambda: {S: []})


class PluginAttention(nn.Module):
    """What vLLM's Attention layer does around the project's impl: allocate the output
    (``torch.empty``, vllm/model_executor/layers/attention/attention.py) and call the impl's
    forward with the layer's cache and the step's metadata."""

    def __init__(self, runner, layer, scale):
        super().__init__()
        self.runner, self.index = runner, layer
        self.impl = type("Impl", (), {})()
        self.impl.scale = scale

    def forward(self, q, k, v, meta, kv_cache):
        output = torch.empty(q.shape, dtype=q.dtype)
        return plugin_attention._forward(self.impl, None, q, k, v, self.runner.caches[self.index],
                                         self.runner.meta, output)


class Runner:
    """One model, its paged KV caches, the persistent input buffers and a captured graph."""

    def __init__(self, emu, path, ctx=None, blocks=24, max_reqs=S):
        self.emu, self.npu = emu, emu.torch_npu.npu
        self.meta, self.capturing, self.params = None, False, GraphParams()
        self.model, self.cfg = load_model(
            path, dtype="bfloat16", ctx=ctx or ParallelContext(), max_positions=4096,
            attention=lambda layer, h, hkv, d, scale: PluginAttention(self, layer, scale))
        layer0 = self.model.layers[0].self_attn
        shape = (blocks, BS, layer0.num_kv_heads, self.cfg.head_dim)
        self.caches = [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
                       for _ in self.model.layers]
        self.input_ids = torch.zeros(MAX_TOKENS, dtype=torch.long)
        self.positions = torch.zeros(MAX_TOKENS, dtype=torch.long)
        self.slot_mapping = torch.full((MAX_TOKENS,), -1, dtype=torch.int32)
        self.block_table = torch.zeros(max_reqs, 4, dtype=torch.int32)
        self.graph = None

    def _meta(self, q_lens, kv_lens, tables, num_tokens):
        ends = torch.tensor(q_lens).cumsum(0).tolist()
        return Meta(block_tables=tables, seq_lens=torch.tensor(kv_lens, dtype=torch.int32),
                    query_start_loc=torch.tensor([0] + ends, dtype=torch.int32),
                    num_actual_tokens=num_tokens, slot_mapping=self.slot_mapping[:num_tokens],
                    actual_seq_lengths_q=ends, seq_lens_list=list(kv_lens))

    # --- eager ---------------------------------------------------------------------------------

    def eager(self, tokens, positions, q_lens, kv_lens, tables, slots) -> torch.Tensor:
        """One unpadded step run eagerly on these caches (the reference, or a warm-up)."""
        n = len(tokens)
        self.slot_mapping[:n] = torch.tensor(slots, dtype=torch.int32)
        table = torch.tensor(tables, dtype=torch.int32)
        self.meta = self._meta(q_lens, kv_lens, table, n)
        with torch.inference_mode():
            return self.model(torch.tensor(tokens), torch.tensor(positions)).clone()

    # --- capture, replay, update ---------------------------------------------------------------

    def capture(self, record=True):
        """Warm-up and capture of a uniform decode batch of S requests (MR _dummy_run): query 1,
        seq_len 1, the slot mapping -1 (the warm-up leaves it so, MR 3548-3551)."""
        self.slot_mapping.fill_(-1)
        dummy = self._meta([1] * S, [1] * S, self.block_table[:S], S)
        ids, pos = self.input_ids[:S], self.positions[:S]
        with torch.inference_mode():
            self.meta = dummy
            self.model(ids, pos)                                         # the eager warm-up
            self.graph = self.npu.NPUGraph()
            self.capturing = record
            with self.npu.graph(self.graph), attach(self.npu.state.recorder, self.model.layers):
                self.meta = dummy
                self.hidden = self.model(ids, pos)
            self.capturing = False

    def replay(self, tokens, positions, q_lens, kv_lens, tables, slots, update=True) -> torch.Tensor:
        """One step through the captured graph, padded to S as vllm-ascend pads it."""
        n, r = len(tokens), len(q_lens)
        self.input_ids[:n] = torch.tensor(tokens)
        self.positions[:n] = torch.tensor(positions)
        self.positions[n:S] = 0                                          # GMR 3502-3503
        self.slot_mapping[:n] = torch.tensor(slots, dtype=torch.int32)
        self.slot_mapping[n:S] = -1                                      # MR 3122-3123
        self.block_table[:r] = torch.tensor(tables, dtype=torch.int32)
        self.block_table[r:] = 0                                         # MR 3126
        if all(q == 1 for q in q_lens):       # uniform decode: dummies of query 1, seq_len 0
            q_pad, kv_pad = q_lens + [1] * (S - r), kv_lens + [0] * (S - r)
            tables_now = self.block_table[:S]
        else:                                  # mixed: one dummy for the padding, seq_len 1
            q_pad, kv_pad = q_lens + [S - n], kv_lens + [1]
            tables_now = torch.cat([self.block_table[:r], torch.zeros(1, 4, dtype=torch.int32)])
        self.meta = self._meta(q_pad, kv_pad, tables_now, n)
        with torch.inference_mode():
            self.npu.current_stream().synchronize()                      # AG 253-256
            self.graph.replay()
            if update:
                self._update()
            else:   # the graph's waits still need their events: recorded, nothing refreshed
                for event in self.params.events[S]:
                    event.record(self.update_stream)
            self.npu.synchronize()
        return self.hidden[:n].clone()

    @property
    def update_stream(self):
        if not hasattr(self, "_update_stream"):
            self._update_stream = self.npu.Stream()                      # MR 3808
        return self._update_stream

    def _update(self):
        """AV1 AscendAttentionBackendImpl.update_graph_params, the FIA branch (621-799): every
        layer reads the one metadata of the step (MR 3265-3266)."""
        torch_npu, npu, meta, stream = self.emu.torch_npu, self.npu, self.meta, self.update_stream
        workspace = self.params.workspaces.get(S)
        with npu.stream(stream):
            for param, handle, event in zip(self.params.attn_params[S], self.params.handles[S],
                                            self.params.events[S]):
                (query, key_cache, value, block_tables, attn_mask, block_size, seq_lens,
                 query_start_loc, num_kv_heads, num_heads, scale, attn_output, softmax_lse,
                 sparse_mode, pre_tokens, next_tokens, sliding_window, c8_k_aq_scale,
                 c8_k_aq_offset, c8_v_aq_scale, c8_v_aq_offset, layer_name) = param
                npu.graph_task_update_begin(stream, handle)
                torch_npu.npu_fused_infer_attention_score.out(
                    query=query, key=key_cache, value=value, block_table=meta.block_tables,
                    atten_mask=attn_mask, input_layout="TND", block_size=block_size,
                    actual_seq_lengths=meta.actual_seq_lengths_q,
                    actual_seq_lengths_kv=meta.seq_lens_list, num_key_value_heads=num_kv_heads,
                    num_heads=num_heads, scale=scale, sparse_mode=sparse_mode,
                    pre_tokens=pre_tokens, next_tokens=next_tokens, workspace=workspace,
                    out=[attn_output, softmax_lse])
                npu.graph_task_update_end(stream)
                event.record(stream)


@contextlib.contextmanager
def emulated_vllm_ascend(monkeypatch):
    """The NPU backend over the emulator, and vllm-ascend's capture state as the runners set it."""
    runners = []

    def capture_state():
        live = [r for r in runners if r.capturing]
        return live[0].params if live else None

    with npu_backend() as emu:
        monkeypatch.setattr(compat, "full_graph_capture", capture_state)
        yield emu, runners


class Requests:
    """Requests sharing one block allocator, on the NPU's paged layout: block 0 unused."""

    def __init__(self, vocab, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.vocab, self.lens, self.tables, self.next_block = vocab, {}, {}, 1

    def _slots(self, rid, start, n):
        table = self.tables.setdefault(rid, [])
        while len(table) * BS < start + n:
            table.append(self.next_block)
            self.next_block += 1
        return [table[p // BS] * BS + p % BS for p in range(start, start + n)]

    def step(self, plan):
        """plan: [(request id, new tokens: how many (random ids) or which)] -> the step's tokens,
        positions, query and KV lengths, block tables (4 columns) and slots."""
        tokens, positions, q_lens, kv_lens, tables, slots = [], [], [], [], [], []
        for rid, new in plan:
            n = new if isinstance(new, int) else len(new)
            start = self.lens.get(rid, 0)
            slots += self._slots(rid, start, n)
            tokens += (torch.randint(0, self.vocab, (n,), generator=self.g).tolist()
                       if isinstance(new, int) else list(new))
            positions += list(range(start, start + n))
            self.lens[rid] = start + n
            q_lens.append(n)
            kv_lens.append(start + n)
            tables.append((self.tables[rid] + [0] * 4)[:4])
        return tokens, positions, q_lens, kv_lens, tables, slots


PATHS = {   # name: (checkpoint, scheme or None, overrides)
    "dense bf16": ("dense_yarn", None, {}),
    "dense W8A8": ("dense_yarn", "w8a8", {}),
    "dense W8A8_DYNAMIC": ("dense_yarn", "w8a8_dynamic", {}),
    "MoE bf16": ("moe_plain", None, dict(head_dim=128, norm_topk_prob=True)),
    "MoE W8A8_DYNAMIC": ("moe_plain", "w8a8_dynamic", dict(head_dim=128, norm_topk_prob=True,
                                                            vocab_size=320)),
}


def _path(checkpoint, quantized, name):
    ck, scheme, kw = PATHS[name]
    if scheme is None:
        return checkpoint(ck, dtype=torch.bfloat16, **kw)
    return quantized(ck, scheme, dtype=torch.bfloat16, **kw)


def _close(a, b, what):
    scale = b.float().abs().max()
    err = float((a.float() - b.float()).abs().max() / scale)
    assert err < 2e-2, f"{what}: relative error {err:.3g}"
    return err


@pytest.mark.parametrize("name", sorted(PATHS))
def test_replays_equal_eager(monkeypatch, checkpoint, quantized, name):
    """Growing decode lengths, a changing batch (a request joins, one leaves), a uniform batch
    padded with query-1 dummies, a mixed batch (a prefill chunk with decodes) padded with one
    dummy request: every replay gives the eager engine's hidden states; without the update the
    same replays reuse the capture's lengths and are caught."""
    path = _path(checkpoint, quantized, name)
    with emulated_vllm_ascend(monkeypatch) as (emu, runners):
        graph, eager = Runner(emu, path), Runner(emu, path)
        runners.append(graph)
        graph.capture()
        assert len(graph.params.attn_params[S]) == len(graph.model.layers)  # one task per layer
        reqs = Requests(graph.cfg.vocab_size)
        prefill = reqs.step([(0, 150), (1, 9), (2, 33)])                  # not through the graph
        for r in (graph, eager):
            r.eager(*prefill)
        steps = [[(0, 1), (1, 1), (2, 1)], [(0, 1), (1, 1), (2, 1)],       # growing
                 [(0, 1), (2, 1)],                                         # request 1 left
                 [(0, 1), (2, 1), (3, 5)],                                 # mixed: 3 joins
                 [(0, 1), (2, 1), (3, 1)]]
        stale = []
        for plan in steps:
            step = reqs.step(plan)
            want = eager.eager(*step)
            got = graph.replay(*step)
            _close(got, want, f"{name}, step {plan}")
        # the same schedule without the update: the replays keep the capture's lengths
        graph2, eager2 = Runner(emu, path), Runner(emu, path)
        runners[:] = [graph2]
        graph2.capture()
        reqs = Requests(graph2.cfg.vocab_size)
        prefill = reqs.step([(0, 150), (1, 9), (2, 33)])
        for r in (graph2, eager2):
            r.eager(*prefill)
        for plan in steps[:2]:
            step = reqs.step(plan)
            want = eager2.eager(*step)
            got = graph2.replay(*step, update=False)
            stale.append(float((got.float() - want.float()).abs().max() / want.float().abs().max()))
        assert min(stale) > 0.1, stale


# --- kernels per decoder layer ---------------------------------------------------------------

# vllm-ascend 0.23's own Qwen3 / Qwen3-MoE, decode in its default FULL graph, kernels per decoder
# layer (index >= 1), counted from its source (file and lines in docs/serving.md), and where it
# runs a kernel of its own outside torch_npu, what stands for it here and how many more kernels
# that takes: the budget may exceed vllm-ascend's count by those alone.
OWN_KERNELS = {   # vllm-ascend's kernel outside torch_npu: (what replaces it here, extra kernels)
    "triton split_qkv_rmsnorm_rope": ("npu_rms_norm x2, npu_apply_rotary_pos_emb, v copy", 3),
    "_C_ascend.moe_gating_top_k": ("npu_moe_gating_top_k_softmax, sum, div (renormalise)", 2),
    "_C_ascend.grouped_matmul_swiglu_quant_weight_nz (+ its cumsum)":
        ("npu_grouped_matmul, npu_swiglu, npu_dynamic_quant", 1),
}
BUDGETS = {   # path: (vllm-ascend's kernels per layer, its own kernels we replace, collectives)
    "dense bf16": (10, ["triton split_qkv_rmsnorm_rope"], 0),
    "dense W8A8": (12, ["triton split_qkv_rmsnorm_rope"], 0),
    "dense W8A8_DYNAMIC": (12, ["triton split_qkv_rmsnorm_rope"], 0),
    "MoE bf16": (15, ["triton split_qkv_rmsnorm_rope", "_C_ascend.moe_gating_top_k"], 0),
    "MoE W8A8_DYNAMIC": (17, ["triton split_qkv_rmsnorm_rope", "_C_ascend.moe_gating_top_k",
                              "_C_ascend.grouped_matmul_swiglu_quant_weight_nz (+ its cumsum)"], 0),
    "EP MoE bf16, TP=2": (18, ["triton split_qkv_rmsnorm_rope", "_C_ascend.moe_gating_top_k"], 2),
    "EP MoE bf16, TP=4": (18, ["triton split_qkv_rmsnorm_rope", "_C_ascend.moe_gating_top_k"], 2),
    "EP MoE W8A8_DYNAMIC, TP=2": (20, ["triton split_qkv_rmsnorm_rope", "_C_ascend.moe_gating_top_k",
                                       "_C_ascend.grouped_matmul_swiglu_quant_weight_nz (+ its cumsum)"], 2),
}


def budget(path: str) -> tuple[int, int]:
    """(compute kernels, collectives) a decoder layer may launch on this path."""
    base, own, collectives = BUDGETS[path]
    return base + sum(OWN_KERNELS[k][1] for k in own), collectives


@dataclass(frozen=True)
class CountingRank(ParallelContext):
    """Rank 0 of a TP (and EP) group in one process: its collectives keep the tensor, and while
    a graph is captured each is recorded as the kernel it would be. ``npu``: the emulated
    torch_npu.npu (whose state knows the capture running)."""

    npu: object = None

    def all_reduce(self, x):
        rec = self.npu.state.recorder
        return x if rec is None else rec.collective("all_reduce", x)

    def all_gather_last(self, x):
        return torch.cat([x] * self.tp_size, dim=-1)


def layer_kernels(monkeypatch, path, tp=1, patch=None) -> dict[int, list[str]]:
    """The kernels each decoder layer launches in the captured decode graph (``tp`` > 1: rank 0
    of an expert-parallel TP group; ``patch(npu_ops)``: change the NPU backend first)."""
    with emulated_vllm_ascend(monkeypatch) as (emu, runners):
        if patch is not None:
            patch(emu.npu_ops)
        ctx = CountingRank(tp_size=tp, expert_parallel=True, npu=emu.torch_npu.npu) if tp > 1 else None
        r = Runner(emu, path, ctx=ctx)
        runners.append(r)
        r.capture()
    out: dict[int, list[str]] = {}
    for t in r.graph.kernels():
        if t.layer.startswith("layer "):
            out.setdefault(int(t.layer.split()[1]), []).append(t.name)
    return out


def over_budget(path: str, per_layer: dict[int, list[str]]) -> list[str]:
    compute, collectives = budget(path)
    problems = []
    for i, names in per_layer.items():
        if i == 0:
            continue        # layer 0 has no residual yet (an unfused first norm, as vllm-ascend's)
        coll = sum(n.startswith("collective.") for n in names)
        if len(names) - coll > compute or coll > collectives:
            problems.append(f"{path}, layer {i}: {len(names) - coll} kernels + {coll} collectives, "
                            f"budget {compute} + {collectives}: {names}")
    return problems


def _kernels_for(monkeypatch, checkpoint, quantized, path, patch=None):
    base = path.split(",")[0].replace("EP ", "")
    tp = int(path.rsplit("=", 1)[1]) if "TP=" in path else 1
    return layer_kernels(monkeypatch, _path(checkpoint, quantized, base), tp, patch)


@pytest.mark.parametrize("path", list(BUDGETS))
def test_kernels_per_layer_within_vllm_ascends(monkeypatch, checkpoint, quantized, path):
    per_layer = _kernels_for(monkeypatch, checkpoint, quantized, path)
    assert len(per_layer) >= 2
    assert not over_budget(path, per_layer), over_budget(path, per_layer)


def test_an_extra_kernel_breaks_the_budget(monkeypatch, checkpoint, quantized):
    """The same count with one more elementwise op in SwiGLU: over budget, and said so."""
    per_layer = _kernels_for(monkeypatch, checkpoint, quantized, "dense bf16")
    assert not over_budget("dense bf16", per_layer)

    def one_more(npu_ops):
        real = npu_ops.swiglu
        monkeypatch.setattr(npu_ops, "swiglu", lambda x: real(x) * 1)

    per_layer = _kernels_for(monkeypatch, checkpoint, quantized, "dense bf16", one_more)
    problems = over_budget("dense bf16", per_layer)
    assert problems and "aten.mul" in problems[0], problems
