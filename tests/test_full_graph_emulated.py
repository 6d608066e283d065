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
vllm-ascend's own count with its kernels registered behind the ops, and are what they were with
the registration off (``BUDGETS``, ``TORCH_NPU_COUNTS``; the table in docs/serving.md), data
parallel included, whose MoE exchange is counted in bytes too (docs/multi-node.md).

Speculative decoding (eagle3, draft_model, ngram: k draft tokens verified per request in one
target step, each such request scheduled 1 + k tokens), dense and MoE, bf16, W8A8 and
W8A8_DYNAMIC:

- eager verification steps (k = 1 and 3) beside a plain decode row and a prefill chunk, drafts
  rejected in between: the fused attention gets the call vllm-ascend makes for them (its
  ChunkedPrefill call), and the hidden states are the CPU specification's (ops.cpu) and those
  of the same tokens computed one by one (``check_verification_steps``); a backend leaving the
  drafts' keys out is caught by each check;
- FULL graphs captured for uniform batches of 1 + k tokens per request (S = 8: 2 requests of 4
  for k = 3, 4 of 2 for k = 1; ``Runner.capture(q=1 + k)``), replayed with vllm-ascend's padding
  (dummy requests of 1 + k tokens and no keys) and update over growing lengths, rejected drafts
  and fewer requests than captured: every replay gives the eager engine's hidden states and,
  with EAGLE-3's aux layers set, its aux states (graph outputs too); without the update, caught;
- kernels: the 1 + k graph launches the plain decode graph's kernels layer by layer, and each
  EAGLE-3 aux layer adds exactly one kernel (the residual add), nothing else.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.utils import _python_dispatch

import ops
from ascend_qwen3.config import Qwen3Config
from ascend_qwen3.loader import load_model
from ascend_qwen3.parallel import ParallelContext
from ascend_qwen3.vllm_plugin import attention as plugin_attention
from ascend_qwen3.vllm_plugin import compat, npu_kernels
from tests.npu_emulator import c_ascend, mc2
from tests.npu_emulator.kernels import (OUTSIDE, KernelCounter, attach, is_collective,
                                        ring_received)
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


def _rows(out, n):
    """The first ``n`` rows of a forward's result, copied: the hidden states, or with EAGLE-3's
    aux layers set (hidden states, [aux states]) as the graph returns them."""
    if isinstance(out, tuple):
        hidden, aux = out
        return hidden[:n].clone(), [a[:n].clone() for a in aux]
    return out[:n].clone()


class Runner:
    """One model, its paged KV caches, the persistent input buffers and a captured graph."""

    def __init__(self, emu, path, ctx=None, blocks=24, max_reqs=S, aux_layers=(),
                 dtype=torch.bfloat16):
        """``emu`` None: the model on the CPU backend (ops.cpu), eager only (``dtype`` float32
        there: the exact reference of a bf16 computation). ``aux_layers``:
        EAGLE-3's auxiliary hidden states (``Qwen3Graph.set_aux_layers``), as vLLM's runner sets
        them at load when its drafter is EAGLE-3; every forward then returns (hidden, [aux])."""
        self.emu, self.npu = emu, (emu.torch_npu.npu if emu is not None else None)
        self.meta, self.capturing, self.params = None, False, GraphParams()
        self.q = 1          # the captured graph's query tokens per request (1 + k drafts)
        self.model, self.cfg = load_model(
            path, dtype=str(dtype).removeprefix("torch."), ctx=ctx or ParallelContext(),
            max_positions=4096,
            attention=lambda layer, h, hkv, d, scale: PluginAttention(self, layer, scale))
        if aux_layers:
            self.model.set_aux_layers(aux_layers)
        layer0 = self.model.layers[0].self_attn
        shape = (blocks, BS, layer0.num_kv_heads, self.cfg.head_dim)
        self.caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
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

    def eager(self, tokens, positions, q_lens, kv_lens, tables, slots):
        """One unpadded step run eagerly on these caches (the reference, or a warm-up): the
        hidden states, or with aux layers (hidden states, [aux states])."""
        n = len(tokens)
        self.slot_mapping[:n] = torch.tensor(slots, dtype=torch.int32)
        table = torch.tensor(tables, dtype=torch.int32)
        self.meta = self._meta(q_lens, kv_lens, table, n)
        with torch.inference_mode():
            return _rows(self.model(torch.tensor(tokens), torch.tensor(positions)), n)

    # --- capture, replay, update ---------------------------------------------------------------

    def capture(self, record=True, q=1):
        """Warm-up and capture of a uniform decode batch of S tokens (MR _dummy_run): S // q
        requests of ``q`` query tokens (``uniform_decode_query_len``: 1, or 1 + k with k draft
        tokens per request, MR 3399 and 3407-3411), every seq_len ``q`` (MR 3497-3508: with a
        speculative config ``using_paged_attention`` is False, vllm_ascend/attention/utils.py
        104-106, so the capture's seq_len is max_query_len), the slot mapping -1 (the warm-up
        leaves it so, MR 3548-3551). With k drafts vLLM only captures sizes that are multiples
        of 1 + k (vllm/config/compilation.py 1432-1443, 1471-1510)."""
        assert S % q == 0, f"capture size {S} is not a multiple of the query length {q}"
        self.q, reqs = q, S // q
        self.slot_mapping.fill_(-1)
        dummy = self._meta([q] * reqs, [q] * reqs, self.block_table[:reqs], S)
        ids, pos = self.input_ids[:S], self.positions[:S]
        with torch.inference_mode():
            self.meta = dummy
            self.model(ids, pos)                                         # the eager warm-up
            self.graph = self.npu.NPUGraph()
            self.capturing = record
            with self.npu.graph(self.graph), attach(self.npu.state.recorder, self.model.layers):
                self.meta = dummy
                # the graph's outputs: hidden states, or (hidden, [aux]) with EAGLE-3 (MR
                # 2324-2326 and 3635-3638 unpack the pair from every forward, capture included)
                self.out = self.model(ids, pos)
            self.capturing = False

    def replay(self, tokens, positions, q_lens, kv_lens, tables, slots, update=True):
        """One step through the captured graph, padded to S as vllm-ascend pads it. Returns the
        real rows of the graph's outputs, as ``eager``."""
        n, r, q = len(tokens), len(q_lens), self.q
        self.input_ids[:n] = torch.tensor(tokens)
        self.positions[:n] = torch.tensor(positions)
        self.positions[n:S] = 0                                          # GMR 3502-3503
        self.slot_mapping[:n] = torch.tensor(slots, dtype=torch.int32)
        self.slot_mapping[n:S] = -1                                      # MR 3125
        self.block_table[:r] = torch.tensor(tables, dtype=torch.int32)
        self.block_table[r:] = 0                                         # MR 3126
        if all(ql == q for ql in q_lens):
            # uniform decode (MR 2953-2958: every request has uniform_decode_query_len tokens),
            # padded to the graph's S // q requests (vLLM's cudagraph_dispatcher.py 147-149) in
            # FULL_AND_PIECEWISE / FULL_DECODE_ONLY: dummy requests of q tokens each (MR
            # 837-847) and seq_len 0 (MR 1090), block row 0 and slot -1 (MR 3125-3126)
            pad = (S - n) // q
            q_pad, kv_pad = q_lens + [q] * pad, kv_lens + [0] * pad
            tables_now = self.block_table[:r + pad]
        else:                                  # mixed: one dummy for the padding, seq_len 1
            q_pad, kv_pad = q_lens + [S - n], kv_lens + [1]                # MR 848-856, AV1 339-351
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
        return _rows(self.out, n)

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
def emulated_vllm_ascend(monkeypatch, engine_kernels: bool = True):
    """The NPU backend over the emulator, and vllm-ascend's capture state as the runners set it.
    ``engine_kernels``: vllm-ascend's own kernels (emulated, npu_emulator/c_ascend.py)
    registered behind the ops as the plugin registers them inside vllm-ascend
    (``npu_kernels.register``); False: the torch_npu path alone, as with
    ASCEND_QWEN3_ENGINE_KERNELS=0."""
    runners = []

    def capture_state():
        live = [r for r in runners if r.capturing]
        return live[0].params if live else None

    with npu_backend() as emu, (c_ascend.installed(emu.calls) if engine_kernels
                                else contextlib.nullcontext()):
        monkeypatch.setattr(compat, "full_graph_capture", capture_state)
        if engine_kernels:
            assert npu_kernels.register(), "vllm-ascend's emulated kernels were not registered"
        try:
            yield emu, runners
        finally:
            ops.unregister_kernels("npu")


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

    def reject(self, rid, rejected):
        """A verification step rejected the last ``rejected`` draft tokens of request ``rid``:
        its length goes back by as many (vLLM's scheduler, vllm/v1/core/sched/scheduler.py
        1420-1427: ``num_computed_tokens -= num_rejected``), so its next step starts at the
        bonus token and overwrites their cache slots."""
        self.lens[rid] -= rejected

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


@pytest.mark.parametrize("engine_kernels", [True, False], ids=["vllm-ascend kernels", "torch_npu"])
@pytest.mark.parametrize("name", sorted(PATHS))
def test_replays_equal_eager(monkeypatch, checkpoint, quantized, name, engine_kernels):
    """Growing decode lengths, a changing batch (a request joins, one leaves), a uniform batch
    padded with query-1 dummies, a mixed batch (a prefill chunk with decodes) padded with one
    dummy request: every replay gives the eager engine's hidden states; without the update the
    same replays reuse the capture's lengths and are caught. With vllm-ascend's kernels
    registered behind the ops and without (the torch_npu path, ASCEND_QWEN3_ENGINE_KERNELS=0)."""
    path = _path(checkpoint, quantized, name)
    with emulated_vllm_ascend(monkeypatch, engine_kernels) as (emu, runners):
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


@pytest.mark.parametrize("scheme", [None, "w8a8_dynamic"])
def test_dispatch_and_combine_replays_equal_eager(monkeypatch, checkpoint, quantized, scheme):
    """Rank 0 of DP 2 x TP 8 + EP with MC2's exchange (``CountingDpRank``: the other ranks stand
    in with this rank's rows) in the captured FULL decode graph: replays of decode steps with a
    changing batch give the eager steps' hidden states, the dispatch and combine kernels
    replayed from the graph with the step's data."""
    kw = dict(PATHS["MoE bf16"][2], num_attention_heads=8, num_key_value_heads=4)
    path = (checkpoint("moe_plain", dtype=torch.bfloat16, **kw) if scheme is None else
            quantized("moe_plain", scheme, dtype=torch.bfloat16, vocab_size=320, **kw))
    with emulated_vllm_ascend(monkeypatch) as (emu, runners):
        ctx = _counting_ctx(emu, 8, 2, dispatch=True)
        graph, eager = Runner(emu, path, ctx=ctx), Runner(emu, path, ctx=ctx)
        runners.append(graph)
        graph.capture()
        calls = emu.calls.count("npu_moe_distribute_dispatch_v2")
        reqs = Requests(graph.cfg.vocab_size)
        prefill = reqs.step([(0, 20), (1, 9), (2, 33)])
        for r in (graph, eager):
            r.eager(*prefill)
        for plan in ([(0, 1), (1, 1), (2, 1)], [(0, 1), (2, 1)], [(0, 1), (2, 1), (3, 1)]):
            step = reqs.step(plan)
            _close(graph.replay(*step), eager.eager(*step), f"{scheme}, step {plan}")
        assert emu.calls.count("npu_moe_distribute_dispatch_v2") > calls     # they ran


# --- speculative decoding: verification steps of 1 + k tokens per request -------------------
#
# vllm-ascend 0.23 verifies a request's k draft tokens (eagle3, draft_model, ngram) in one target
# step: the request is scheduled 1 + k tokens (its last sampled token and the drafts), with the
# drafts' keys written and counted in its seq_len (the optimistic seq_lens, MR 1080-1090). Such a
# step is not DecodeOnly: ``_build_attn_state`` (MR 1477-1506) makes it SpecDecoding and then,
# for any method but MTP, ChunkedPrefill, whose attention (AV1 ``_get_fia_params`` 1174-1232 and
# ``forward_fused_infer_attention`` 1234-1362) is one ``npu_fused_infer_attention_score`` over
# the paged cache: TND, sparse_mode 3 (bottom-right causal), ``actual_seq_lengths`` the
# cumulative query ends, ``actual_seq_lengths_kv`` the seq_lens_list. The project's impl makes
# that call for every step, whatever the state (vllm_plugin/attention.py).

SPEC_KS = (1, 3)


def verification_schedule(vocab, k, seed=0):
    """A prefill, then two eager verification steps with k drafts per speculating request, each
    with a plain decode row and a prefill chunk beside them, and drafts rejected in between:

    0. prefill: requests 0 (126 tokens), 1 (9), 2 (33) and the first chunk of 3 (40 of 64);
    1. verification: 0 and 2 with 1 + k tokens (0 crosses its first 128-token block), 1 a plain
       decode (no draft this step: an ngram drafter without a match proposes none), 3 its second
       chunk (24 tokens after 40 cached);
    2. 0 rejected all its drafts and 2 accepted one (their next tokens overwrite the rejected
       drafts' cache slots: ``Requests.reject``), then 0, 1 and 2 with 1 + k tokens and 3 a plain
       decode.

    Returns the steps (``Requests.step`` tuples)."""
    reqs = Requests(vocab, seed)
    steps = [reqs.step([(0, 126), (1, 9), (2, 33), (3, 40)]),
             reqs.step([(0, 1 + k), (1, 1), (2, 1 + k), (3, 24)])]
    reqs.reject(0, k)
    reqs.reject(2, k - 1)
    steps.append(reqs.step([(0, 1 + k), (2, 1 + k), (1, 1 + k), (3, 1)]))
    return steps


def one_by_one(runner, step):
    """``step`` as a non-speculative engine would compute it: every request alone, and each
    request of at most 1 + max(SPEC_KS) tokens (a decode or a verification) one token per step;
    the rows in the step's order."""
    tokens, positions, q_lens, kv_lens, tables, slots = step
    rows, a = [], 0
    for ql, kl, table in zip(q_lens, kv_lens, tables):
        b = a + ql
        if ql <= 1 + max(SPEC_KS):
            rows += [runner.eager([tokens[j]], [positions[j]], [1], [kl - (b - 1 - j)], [table],
                                  [slots[j]]) for j in range(a, b)]
        else:
            rows.append(runner.eager(tokens[a:b], positions[a:b], [ql], [kl], [table], slots[a:b]))
        a = b
    return torch.cat(rows)


@contextlib.contextmanager
def _fia_calls(emu):
    """The keyword arguments of the ``npu_fused_infer_attention_score`` calls made in the block."""
    calls = []

    def listen(name, args, kwargs, result):
        if name == "npu_fused_infer_attention_score":
            calls.append(kwargs)
    emu.calls.listeners.append(listen)
    try:
        yield calls
    finally:
        emu.calls.listeners.remove(listen)


def _no_further_than_cpu(npu, cpu, truth, what):
    """The NPU backend's bf16 result no further from the fp32 truth than the CPU backend's bf16
    result is (x1.5), and every row's direction kept (cosine to the truth above 0.995, or within
    0.005 of the CPU's worst row), but for at most one row, whose cosine must stay above 0.95: the
    criterion of tests/test_graph_npu_emulated.py's W8A8 test. bf16 rounding before an int8
    quantiser or a router's top-k can flip a near-tie in a row on either backend (measured:
    single rows at cosine 0.993-0.996, CPU and NPU alike; with vllm-ascend's fused QK-norm +
    RoPE kernel, which rounds its rotation to bf16 product by product, one MoE W8A8_DYNAMIC row
    at 0.981, an expert choice flipped); a wrong mask or KV length moves whole steps, every
    row, by 10-60% of their scale."""
    scale = truth.float().abs().max()
    rows_npu = ((npu.float() - truth.float()).abs().amax(dim=-1) / scale).sort(descending=True).values
    err_cpu = float((cpu.float() - truth.float()).abs().max() / scale)
    err_npu = float(rows_npu[1]) if rows_npu.numel() > 1 else 0.0       # all rows but the worst
    assert err_npu <= 1.5 * err_cpu + 1e-3, \
        f"{what}: NPU {rows_npu[:3].tolist()} vs CPU {err_cpu:.3g} from fp32"
    cos_npu = torch.nn.functional.cosine_similarity(npu.float(), truth.float(), dim=-1).sort().values
    cos_cpu = float(torch.nn.functional.cosine_similarity(cpu.float(), truth.float(), dim=-1).min())
    rest = float(cos_npu[1]) if cos_npu.numel() > 1 else 1.0
    assert float(cos_npu[0]) > 0.95 and rest > min(0.995, cos_cpu) - 0.005, \
        f"{what}: cosines {cos_npu[:3].tolist()} (CPU worst {cos_cpu:.4f})"


def _cpu_reference(monkeypatch, path, steps):
    """The steps on the CPU backend (ops.cpu, the specification; no engine kernels registered
    for the CPU), in bf16 and in fp32."""
    monkeypatch.delitem(ops._kernels, "cpu", raising=False)
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        r = Runner(None, path, dtype=dtype)
        out.append([r.eager(*s) for s in steps])
    return out


def check_verification_steps(monkeypatch, path, what, k, checks=("call", "cpu", "one by one"),
                             patch=None):
    """``verification_schedule`` run eagerly through the NPU backend (``patch(npu_ops)``: change
    it first), its verification steps held to ``checks``:

    - "call": every layer's fused attention is the call vllm-ascend makes for a ChunkedPrefill
      step (AV1 1336-1357, through vllm_ascend/device/device_op.py 92; lengths from
      ``_get_fia_params`` 1221-1231): TND, sparse_mode 3, ``actual_seq_lengths`` the cumulative
      query ends, ``actual_seq_lengths_kv`` the seq_lens with the drafts;
    - "cpu": the hidden states are the CPU specification's (``_no_further_than_cpu``);
    - "one by one": they are those of the same tokens computed one by one on the NPU backend
      (``one_by_one``), which is what makes verifying drafts exact."""
    steps = verification_schedule(Qwen3Config.from_model_dir(path).vocab_size, k)
    if "cpu" in checks:
        cpu_bf16, cpu_fp32 = _cpu_reference(monkeypatch, path, steps)
    with emulated_vllm_ascend(monkeypatch) as (emu, _):
        if patch is not None:
            patch(emu.npu_ops)
        npu, alone = Runner(emu, path), Runner(emu, path)
        npu.eager(*steps[0])
        if "one by one" in checks:
            alone.eager(*steps[0])
        for i, step in enumerate(steps[1:], 1):
            with _fia_calls(emu) as calls:
                got = npu.eager(*step)
            if "call" in checks:
                ends, kv_lens = torch.tensor(step[2]).cumsum(0).tolist(), step[3]
                where = f"{what}, k={k}, step {i}"
                assert len(calls) == len(npu.model.layers), (where, len(calls))
                for c in calls:
                    assert (c["input_layout"], c["sparse_mode"]) == ("TND", 3), (where, c)
                    assert list(c["actual_seq_lengths"]) == ends, \
                        f"{where}: actual_seq_lengths {c['actual_seq_lengths']}, query ends {ends}"
                    assert list(c["actual_seq_lengths_kv"]) == kv_lens, (
                        f"{where}: actual_seq_lengths_kv {c['actual_seq_lengths_kv']}, "
                        f"seq_lens {kv_lens}")
            if "cpu" in checks:
                _no_further_than_cpu(got, cpu_bf16[i], cpu_fp32[i], f"{what}, k={k}, step {i}")
            if "one by one" in checks:
                _close(got, one_by_one(alone, step), f"{what}, k={k}, step {i} one by one")


@pytest.mark.parametrize("k", SPEC_KS)
@pytest.mark.parametrize("name", sorted(PATHS))
def test_verification_steps_equal_cpu_and_one_by_one(monkeypatch, checkpoint, quantized, name, k):
    """Eager verification steps of k drafts per request beside a plain decode and a prefill
    chunk, through the NPU backend: vllm-ascend's call, the CPU specification's hidden states,
    and those of the same tokens one by one (``check_verification_steps``)."""
    check_verification_steps(monkeypatch, _path(checkpoint, quantized, name), name, k)


def test_a_verification_without_the_drafts_keys_is_caught(monkeypatch, checkpoint):
    """The same checks against a backend that leaves the drafts' keys out of a verifying
    request's KV length (as if its seq_len were the one before the step): each of them fails."""
    def drop_draft_keys(npu_ops):
        real = npu_ops._fused_attention

        def wrong(query, key_cache, value_cache, block_tables, scale, q_ends, kv_lens, **kw):
            q_lens = [b - a for a, b in zip([0] + q_ends[:-1], q_ends)]
            kv = [lk - lq + 1 if 1 < lq <= 1 + max(SPEC_KS) else lk
                  for lq, lk in zip(q_lens, kv_lens)]
            return real(query, key_cache, value_cache, block_tables, scale, q_ends, kv, **kw)
        monkeypatch.setattr(npu_ops, "_fused_attention", wrong)

    path = _path(checkpoint, None, "dense bf16")
    for check, message in (("call", "actual_seq_lengths_kv"), ("cpu", "from fp32"),
                           ("one by one", "one by one")):
        with pytest.raises(AssertionError, match=message):
            check_verification_steps(monkeypatch, path, "dense bf16", 3, (check,), drop_draft_keys)


# --- speculative decoding: FULL graphs of uniform 1 + k decode batches -----------------------

AUX_LAYERS = (0, 1, 2)    # EAGLE-3's aux layers that fit the 2-layer test checkpoints: the
                          # embeddings, after layer 1, after the last layer (before the norm)


def spec_decode_plans(k):
    """The steps after a prefill, for a graph captured with S // (1 + k) requests of 1 + k
    tokens: full uniform batches with growing lengths and drafts rejected in between
    (``Requests.reject``), one with fewer requests than captured (padded with dummies of 1 + k
    tokens and no keys), and a request leaving; as (plan, rejected drafts after it) pairs."""
    q, reqs = 1 + k, S // (1 + k)
    ids = list(range(reqs))
    return [([(r, q) for r in ids], {0: k, ids[-1]: min(1, k)}),
            ([(r, q) for r in ids], {0: k - 1}),
            ([(0, q)], {0: k}),                                  # fewer requests than captured
            ([(r, q) for r in ids[1:]] + [(0, q)], {}),          # all back, another order
            ([(r, q) for r in ids[1:]], {})]                     # request 0 left


def _spec_prefill(reqs, k):
    """The requests' prompts (eager: a prefill does not replay the decode graph); request 0's
    ends 2 tokens before its first block does, so its verifications cross into a second block."""
    lens = [126, 40, 9, 33][:S // (1 + k)]
    return reqs.step(list(enumerate(lens)))


def _close_outputs(got, want, what):
    """Hidden states, and with aux layers the aux states too (each its own scale)."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got[1]) == len(want[1]), what
        _close(got[0], want[0], what)
        for i, (g, w) in enumerate(zip(got[1], want[1])):
            _close(g, w, f"{what}, aux {AUX_LAYERS[i]}")
    else:
        _close(got, want, what)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_spec_decode_replays_equal_eager(monkeypatch, checkpoint, quantized, name):
    """FULL decode graphs captured for speculative decoding (S = 8 tokens: k = 3, 2 requests of
    4, with EAGLE-3's aux layers; k = 1, 4 requests of 2, without) and replayed over
    ``spec_decode_plans``, with vllm-ascend's padding and update: every replay gives the eager
    engine's hidden states, and with EAGLE-3 its aux states, which are outputs of the captured
    graph too (MR 2324-2326). Without the update the replays keep the capture's lengths and are
    caught."""
    path = _path(checkpoint, quantized, name)
    with emulated_vllm_ascend(monkeypatch) as (emu, runners):
        for k, aux in ((3, AUX_LAYERS), (1, ())):
            graph, eager = Runner(emu, path, aux_layers=aux), Runner(emu, path, aux_layers=aux)
            runners[:] = [graph]
            graph.capture(q=1 + k)
            assert len(graph.params.attn_params[S]) == len(graph.model.layers)
            assert isinstance(graph.out, tuple) == bool(aux)
            reqs = Requests(graph.cfg.vocab_size)
            prefill = _spec_prefill(reqs, k)
            for r in (graph, eager):
                r.eager(*prefill)
            for plan, rejected in spec_decode_plans(k):
                step = reqs.step(plan)
                _close_outputs(graph.replay(*step), eager.eager(*step), f"{name}, k={k}, {plan}")
                for rid, n in rejected.items():
                    reqs.reject(rid, n)
        # k = 3 again, replayed without the update: the capture's lengths (1 + k keys each)
        graph, eager = Runner(emu, path), Runner(emu, path)
        runners[:] = [graph]
        graph.capture(q=4)
        reqs = Requests(graph.cfg.vocab_size)
        prefill = _spec_prefill(reqs, 3)
        for r in (graph, eager):
            r.eager(*prefill)
        stale = []
        for plan, _ in spec_decode_plans(3)[:2]:
            step = reqs.step(plan)
            got, want = graph.replay(*step, update=False), eager.eager(*step)
            stale.append(float((got.float() - want.float()).abs().max() / want.float().abs().max()))
        assert min(stale) > 0.1, stale


# --- kernels per decoder layer ---------------------------------------------------------------

# vllm-ascend 0.23's own Qwen3 / Qwen3-MoE, decode in its default FULL graph, kernels per decoder
# layer (index >= 1), counted from its source (file and lines in docs/serving.md): the lower
# end where the source leaves a range. The project's decode graph, with vllm-ascend's own
# kernels registered behind the ops (vllm_plugin/npu_kernels.py), may launch no more: no
# allowance. (compute kernels, collectives)
BUDGETS = {
    "dense bf16": (10, 0),
    "dense W8A8": (12, 0),
    "dense W8A8_DYNAMIC": (12, 0),
    "MoE bf16": (15, 0),
    "MoE W8A8_DYNAMIC": (17, 0),
    "EP MoE bf16, TP=2": (18, 2),
    "EP MoE bf16, TP=4": (18, 2),
    "EP MoE W8A8_DYNAMIC, TP=2": (20, 2),
    # data parallel x TP with expert parallel across both (EP 16): decode steps within the MC2
    # capacity dispatch and combine (vllm-ascend's MC2: its dispatch, combine and TP all-gather
    # beside attention's all-reduce); larger steps, and EP < 16, take the all-gather MoE
    # communication ("all-gather": DP all-gathers of hidden states and logits, DP
    # reduce-scatter, TP all-reduce)
    "DP 2 x TP 8 + EP, MoE bf16": (13, 4),
    "DP 2 x TP 8 + EP, MoE W8A8_DYNAMIC": (13, 4),
    "DP 2 x TP 8 + EP, MoE bf16, all-gather": (18, 5),
    "DP 2 x TP 8 + EP, MoE W8A8_DYNAMIC, all-gather": (19, 5),
}
# the same graphs with the registration off (ASCEND_QWEN3_ENGINE_KERNELS=0: torch_npu alone),
# what they launched before vllm-ascend's kernels were registered (docs/serving.md, the
# torch_npu column): the switch must leave this path as it was
TORCH_NPU_COUNTS = {
    "dense bf16": (13, 0),
    "dense W8A8": (15, 0),
    "dense W8A8_DYNAMIC": (15, 0),
    "MoE bf16": (19, 0),
    "MoE W8A8_DYNAMIC": (21, 0),
    "EP MoE bf16, TP=2": (23, 2),
    "EP MoE bf16, TP=4": (23, 2),
    "EP MoE W8A8_DYNAMIC, TP=2": (25, 2),
    # (the data-parallel exchanges are new with the budget set for them)
    "DP 2 x TP 8 + EP, MoE bf16": (18, 4),
    "DP 2 x TP 8 + EP, MoE W8A8_DYNAMIC": (20, 4),
    "DP 2 x TP 8 + EP, MoE bf16, all-gather": (23, 4),
    "DP 2 x TP 8 + EP, MoE W8A8_DYNAMIC, all-gather": (25, 4),
}


def budget(path: str) -> tuple[int, int]:
    """(compute kernels, collectives) a decoder layer may launch on this path."""
    return BUDGETS[path]


@dataclass(frozen=True)
class CountingRank(ParallelContext):
    """Rank 0 of a TP (and EP) group in one process: its collectives keep the tensor, and while
    a graph is captured each is recorded as the kernel it would be, with the bytes this rank
    would receive (``ring_received``). ``npu``: the emulated torch_npu.npu (whose state knows
    the capture running)."""

    npu: object = None
    counter: object = None      # a KernelCounter for eager steps (else the capture's recorder)

    def _record(self, name, out, received, stand_in=None):
        rec = self.counter if self.counter is not None else self.npu.state.recorder
        return out if rec is None else rec.collective(name, out, received, stand_in)

    def all_reduce(self, x):
        if self.tp_size == 1:
            return x
        return self._record("all_reduce", x,
                            ring_received("all_reduce", [x.nbytes] * self.tp_size, 0))

    def all_gather_last(self, x):
        return torch.cat([x] * self.tp_size, dim=-1)


@dataclass(frozen=True)
class CountingDpRank(CountingRank):
    """Rank 0 of data parallel x TP with expert parallel across both (EP = DP x TP) in one
    process: the other data-parallel ranks run as many tokens (the engine pads them to one
    count under graphs), their rows stood in by copies of this rank's; each collective is
    recorded with the bytes this rank would receive. With ``dispatch_capacity`` set the MoE
    exchange is MC2's, over the emulator's stand-in communicator ``STAND_IN`` (the other ranks
    send what this one sends; ``mc2.StandInRanks``)."""

    def _copies(self, x, n):
        with _python_dispatch._disable_current_modes():   # the stand-in is no kernel of the model
            return torch.cat([x] * n)

    def all_gather_rows(self, x):
        if self.tp_size == 1:
            return x
        return self._record("all_gather", self._copies(x, self.tp_size),
                            ring_received("all_gather", [x.nbytes] * self.tp_size, 0),
                            (lambda t: torch.cat([t] * self.tp_size), (x,)))

    def dp_token_counts(self, local):
        return [local] * self.dp_size

    def dp_all_gather(self, x):
        return self._record("all_gather", self._copies(x, self.dp_size),
                            ring_received("all_gather", [x.nbytes] * self.dp_size, 0),
                            (lambda t: torch.cat([t] * self.dp_size), (x,)))

    def dp_reduce_scatter(self, x):
        n = x.shape[0] // self.dp_size
        mine = x[:n]
        return self._record("reduce_scatter", mine,
                            ring_received("reduce_scatter", [mine.nbytes] * self.dp_size, 0),
                            (lambda t: t[:n], (x,)))


STAND_IN = "stand-in ep"      # the emulator's MC2 communicator of CountingDpRank


def _counting_ctx(emu, tp, dp, counter=None, dispatch=False):
    if dp > 1:
        if dispatch:
            mc2.register(STAND_IN, mc2.StandInRanks(dp * tp, 0))
        return CountingDpRank(tp_size=tp, dp_size=dp, expert_parallel=True,
                              npu=emu.torch_npu.npu, counter=counter,
                              dispatch_capacity=MAX_TOKENS if dispatch else 0,
                              ep_hccl_name=STAND_IN if dispatch else None)
    if tp > 1:
        return CountingRank(tp_size=tp, expert_parallel=True, npu=emu.torch_npu.npu,
                            counter=counter)
    return None


def captured_kernels(monkeypatch, path, tp=1, patch=None, q=1, aux_layers=(),
                     engine_kernels=True, dp=1, dispatch=False) -> list[tuple[str, str]]:
    """The kernels of the captured decode graph in launch order, as (where, name): where is
    "layer i" for decoder layer i's, else OUTSIDE (``tp`` > 1: rank 0 of an expert-parallel TP
    group; ``patch(npu_ops)``: change the NPU backend first; ``q``: query tokens per request,
    1 + k with k drafts; ``aux_layers``: EAGLE-3's, ``Runner``; ``engine_kernels``:
    ``emulated_vllm_ascend``; ``dp`` > 1: rank 0 of data parallel x TP with expert parallel
    across both; ``dispatch``: its MoE exchange by MC2's dispatch and combine)."""
    with emulated_vllm_ascend(monkeypatch, engine_kernels) as (emu, runners):
        if patch is not None:
            patch(emu.npu_ops)
        ctx = _counting_ctx(emu, tp, dp, dispatch=dispatch)
        r = Runner(emu, path, ctx=ctx, aux_layers=aux_layers)
        runners.append(r)
        r.capture(q=q)
    return [(t.layer, t.name) for t in r.graph.kernels()]


def layer_kernels(monkeypatch, path, tp=1, patch=None, q=1, engine_kernels=True, dp=1,
                  dispatch=False) -> dict[int, list[str]]:
    """The kernels each decoder layer launches in the captured decode graph
    (``captured_kernels``)."""
    out: dict[int, list[str]] = {}
    for where, name in captured_kernels(monkeypatch, path, tp, patch, q,
                                        engine_kernels=engine_kernels, dp=dp, dispatch=dispatch):
        if where.startswith("layer "):
            out.setdefault(int(where.split()[1]), []).append(name)
    return out


def counts(names: list[str]) -> tuple[int, int]:
    """(compute kernels, collectives) of one layer's launches."""
    coll = sum(is_collective(n) for n in names)
    return len(names) - coll, coll


def over_budget(path: str, per_layer: dict[int, list[str]]) -> list[str]:
    compute, collectives = budget(path)
    problems = []
    for i, names in per_layer.items():
        if i == 0:
            continue        # layer 0 has no residual yet (an unfused first norm, as vllm-ascend's)
        got, coll = counts(names)
        if got > compute or coll > collectives:
            problems.append(f"{path}, layer {i}: {got} kernels + {coll} collectives, "
                            f"budget {compute} + {collectives}: {names}")
    return problems


def _kernels_for(monkeypatch, checkpoint, quantized, path, patch=None, q=1, engine_kernels=True):
    if path.startswith("DP "):        # "DP 2 x TP 8 + EP, MoE bf16[, all-gather]"
        dp, tp = int(path.split()[1]), int(path.split()[4].rstrip(","))
        base = path.split(", ")[1]
        dispatch = not path.endswith(", all-gather")
        ck, scheme, kw = PATHS[base]
        kw = dict(kw, num_attention_heads=8, num_key_value_heads=4)   # 8 heads for TP 8
        p = (checkpoint(ck, dtype=torch.bfloat16, **kw) if scheme is None else
             quantized(ck, scheme, dtype=torch.bfloat16, **kw))
        return layer_kernels(monkeypatch, p, tp, patch, q, engine_kernels, dp=dp,
                             dispatch=dispatch)
    base = path.split(",")[0].replace("EP ", "")
    tp = int(path.rsplit("=", 1)[1]) if "TP=" in path else 1
    return layer_kernels(monkeypatch, _path(checkpoint, quantized, base), tp, patch, q,
                         engine_kernels)


VLLM_ASCEND_OWN = ("vllm.qkv_rmsnorm_rope", "_C_ascend.moe_gating_top_k",
                   "_C_ascend.grouped_matmul_swiglu_quant_weight_nz")


@pytest.mark.parametrize("path", list(BUDGETS))
def test_kernels_per_layer_within_vllm_ascends(monkeypatch, checkpoint, quantized, path):
    """With vllm-ascend's kernels behind the ops, every decoder layer (>= 1) launches at most
    vllm-ascend's own count, with no allowance; its kernels are the ones that run."""
    per_layer = _kernels_for(monkeypatch, checkpoint, quantized, path)
    assert len(per_layer) >= 2
    assert not over_budget(path, per_layer), over_budget(path, per_layer)
    ran = set(per_layer[1])
    assert "vllm.qkv_rmsnorm_rope" in ran, per_layer[1]
    if "MoE" in path:
        assert "_C_ascend.moe_gating_top_k" in ran, per_layer[1]
    if "MoE W8A8_DYNAMIC" in path:
        assert "_C_ascend.grouped_matmul_swiglu_quant_weight_nz" in ran, per_layer[1]


@pytest.mark.parametrize("path", list(TORCH_NPU_COUNTS))
def test_switched_off_the_torch_npu_path_launches_what_it_did(monkeypatch, checkpoint, quantized,
                                                               path):
    """ASCEND_QWEN3_ENGINE_KERNELS=0 (no registration): torch_npu's kernels alone, exactly as
    many per layer as before vllm-ascend's were registered, none of vllm-ascend's."""
    per_layer = _kernels_for(monkeypatch, checkpoint, quantized, path, engine_kernels=False)
    for i, names in per_layer.items():
        if i:
            assert counts(names) == TORCH_NPU_COUNTS[path], (path, i, names)
            assert not set(names) & set(VLLM_ASCEND_OWN), names


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


# --- the MoE exchange across data-parallel ranks: bytes ---------------------------------------

TWO_NODE = dict(dp=2, tp=8, hidden=4096)      # Qwen3-235B-A22B's hidden size, the two-node profile


def moe_exchange_bytes(monkeypatch, checkpoint, batch, dp=2, tp=8, hidden=4096, dispatch=False,
                       experts=16, top_k=4):
    """The collectives of decoder layer 1 in one decode step of ``batch`` requests per
    data-parallel rank, eager, bf16, as (name, bytes this rank receives): rank 0 of DP x TP with
    expert parallel across both (``CountingDpRank``, ``ring_received``; ``dispatch``: MC2's
    exchange, its bytes from the emulated kernels, the other ranks standing in with this
    rank's tokens, each tensor-parallel rank with its own slice's active rows)."""
    path = checkpoint("moe_plain", dtype=torch.bfloat16, hidden_size=hidden, head_dim=128,
                      num_attention_heads=8, num_key_value_heads=4, norm_topk_prob=True,
                      num_experts=experts, num_experts_per_tok=top_k)
    with emulated_vllm_ascend(monkeypatch) as (emu, _):
        counter = KernelCounter(emu.calls)
        ctx = _counting_ctx(emu, tp, dp, counter, dispatch)
        if dispatch:     # tensor-parallel rank t's rows of the padded step: its active ones
            n = -(-batch // tp)
            mc2.register(STAND_IN, mc2.StandInRanks(
                dp * tp, 0, [min(max(batch - (r % tp) * n, 0), n) for r in range(dp * tp)]))
        r = Runner(emu, path, ctx=ctx, max_reqs=batch, blocks=batch + 1)
        tokens = [t % 256 for t in range(batch)]     # distinct tokens: spread over the experts
        with counter, attach(counter, r.model.layers):
            r.eager(tokens, [0] * batch, [1] * batch, [1] * batch, [[0] * 4] * batch,
                    [-1] * batch)
    return [(name, n) for where, name, n in counter.traffic if where == "layer 1"]


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_moe_exchange_across_data_parallel_moves_vllm_ascends_bytes(monkeypatch, checkpoint, batch):
    """Per MoE layer and step, rank 0 of the two-node profile (DP 2 x TP 8, EP 16, hidden 4096,
    bf16) receives, by the emulator's collective counter: the other data-parallel rank's rows
    (all-gather), their partial sums of its own rows (reduce-scatter), and 2 x 7/8 of its rows
    (the tensor-parallel all-reduce): 3.75 rows per token, one fewer than an all-reduce of
    every gathered row over the 16 expert-parallel ranks received (4.75: 1 + 2 x 15/16 x 2), and
    less than vllm-ascend's own all-gather communication (which also gathers the router logits,
    ``vllm_ascend/ops/fused_moe/prepare_finalize.py`` 428-483 and 531-548)."""
    row = TWO_NODE["hidden"] * 2                                  # bf16 bytes of one token
    got = moe_exchange_bytes(monkeypatch, checkpoint, batch, **TWO_NODE)
    names = [n for n, _ in got]
    assert names == ["collective.all_reduce", "collective.all_gather", "collective.reduce_scatter",
                     "collective.all_reduce"], names                     # attention's, then MoE's
    moe = sum(n for _, n in got[1:])
    assert moe == batch * row + batch * row + 2 * 7 * batch * row // 8, got
    everyone_all_reduced = batch * row + 2 * 15 * (2 * batch * row) // 16
    assert moe < everyone_all_reduced
    logits_row = 16 * 2                                           # this checkpoint's 16 experts
    vllm_ascend_all_gather = moe + batch * logits_row
    assert moe < vllm_ascend_all_gather


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_moe_exchange_by_dispatch_and_combine_moves_the_pairs(monkeypatch, checkpoint, batch):
    """The same step through MC2's exchange (decode within its capacity), Qwen3-235B-A22B's
    128 experts and top 8: rank 0 receives, by the emulated kernels' counts, the pairs other
    ranks route to its 8 experts (dispatch), its own tokens' pairs from the other ranks'
    experts (combine), and the other tensor-parallel ranks' slices of its data-parallel rank's
    padded step (all-gather). From 64 tokens per rank on, that is less than the all-gather
    exchange receives (docs/multi-node.md has the numbers); at 1 it is more (the tensor-parallel
    all-gather moves 8 padded rows), as for vllm-ascend's own MC2."""
    row = TWO_NODE["hidden"] * 2
    got = moe_exchange_bytes(monkeypatch, checkpoint, batch, **TWO_NODE, dispatch=True,
                             experts=128, top_k=8)
    names = [n for n, _ in got]
    assert names == ["collective.all_reduce", "torch_npu.npu_moe_distribute_dispatch_v2",
                     "torch_npu.npu_moe_distribute_combine_v2", "collective.all_gather"], names
    n = -(-batch // 8)                               # this tensor-parallel rank's rows
    dispatch, combine, gather = (b for _, b in got[1:])
    assert gather == 7 * n * row
    mine = min(batch, n)                             # this rank's active tokens
    assert combine % row == 0 and combine <= mine * 8 * row
    # the stand-ins send what this rank sends: 15 other ranks, the active ones among them
    assert dispatch % row == 0 and dispatch <= 15 * mine * 8 * row
    all_gather_exchange = batch * row + batch * row + 2 * 7 * batch * row // 8
    if batch >= 64:
        assert dispatch + combine + gather < all_gather_exchange, (got, all_gather_exchange)
    print(f"\nMC2 bytes, batch {batch}: dispatch {dispatch}, combine {combine}, "
          f"all-gather {gather}, total {dispatch + combine + gather}; "
          f"all-gather exchange {all_gather_exchange}")


# --- kernels with speculative decoding -------------------------------------------------------

@pytest.mark.parametrize("path", list(BUDGETS))
def test_verification_graph_launches_the_decode_graphs_kernels(monkeypatch, checkpoint, quantized,
                                                               path):
    """The FULL graph captured for k = 3 drafts (2 requests of 4 tokens, ``Runner.capture``)
    launches, layer by layer, the same kernels as the plain decode graph (8 requests of 1):
    verifying drafts costs no kernel per layer, and the budgets above hold for it as well."""
    plain = _kernels_for(monkeypatch, checkpoint, quantized, path)
    spec = _kernels_for(monkeypatch, checkpoint, quantized, path, q=4)
    assert spec == plain
    assert not over_budget(path, spec), over_budget(path, spec)


def kernels_between_layers(kernels) -> dict[int, list[str]]:
    """The kernels outside any layer (``captured_kernels``), by how many decoder layers ran
    before them: 0, the step's own before the first layer (embedding, RoPE table); the number
    of layers, after the last (the final norm)."""
    out: dict[int, list[str]] = {}
    ran = 0
    for where, name in kernels:
        if where.startswith("layer "):
            ran = int(where.split()[1]) + 1
        else:
            out.setdefault(ran, []).append(name)
    return out


@pytest.mark.parametrize("name", sorted(PATHS))
def test_aux_layers_cost_one_add_each(monkeypatch, checkpoint, quantized, name):
    """EAGLE-3's aux states in the captured graph: an aux layer j >= 1 costs exactly one kernel,
    the ``aten.add`` forming the residual stream (hidden + residual) right after layer j - 1,
    as vLLM's own ``_maybe_add_hidden_state`` does (vllm/model_executor/models/interfaces.py
    1291-1301, called by qwen2.py 407-414, the forward of vLLM's Qwen3 that vllm-ascend runs);
    aux layer 0 (the embeddings) costs none; every other place of the graph, the decoder
    layers' own kernels included, launches what it launches without aux layers."""
    path = _path(checkpoint, quantized, name)
    base = captured_kernels(monkeypatch, path, q=4)
    base_between = kernels_between_layers(base)
    for aux in ((1,), (0, 2)):
        got = captured_kernels(monkeypatch, path, q=4, aux_layers=aux)
        assert [k for k in got if k[0] != OUTSIDE] == [k for k in base if k[0] != OUTSIDE], aux
        between = kernels_between_layers(got)
        for j in sorted(set(between) | set(base_between)):
            extra = list(between.get(j, []))
            for kernel in base_between.get(j, []):
                extra.remove(kernel)
            want = ["aten.add"] if j in aux and j > 0 else []
            assert extra == want, (aux, j, between.get(j), base_between.get(j))

