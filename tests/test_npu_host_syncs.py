"""No device-to-host synchronisation inside a layer on the NPU backend (tier 2, emulated).

The NPU executes asynchronously: torch_npu queues kernels and returns. Any read of a device
value on the host (``.tolist()``, ``.item()``, ``int(t)``, ``bool(t)``, a Python ``if`` on a
tensor, ``torch.equal``) waits until the queue has drained, in every layer that does it. Here the
whole graph runs on the NPU backend bound to the torch_npu emulator, and a ``TorchFunctionMode``
counts every such read made outside the emulator's own code (the emulator computes on the CPU
and may read its inputs freely; a real kernel does not), attributing each to the decoder layer
that was running.

A decode step (and a chunked-prefill step) of a dense and a MoE model, float and W8A8, makes
zero host reads in every layer and in the whole forward. The per-step budget of the standalone
runner is outside the forward: the step's lengths are planned on the host before it
(``PagedKVCache.prepare``, which also gives the attention its host copies), and the sampled
token ids come back once after it. The counter itself is shown to fail: a backend op that reads
a device value is caught and attributed to its layer.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ascend_qwen3.loader import load_model
from ascend_qwen3.runner.kv_cache import PagedKVCache
from tests.test_graph_npu_emulated import CASES, npu_backend

EMULATOR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "npu_emulator") + os.sep
# Tensor methods and functions that copy a device value to the host (or branch on it)
HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__len__",
              "equal", "numpy", "cpu", "allclose", "is_nonzero", "nonzero", "unique",
              "masked_select", "__format__", "__repr__"}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values made outside the emulator, per current layer."""

    def __init__(self):
        super().__init__()
        self.layer = "outside any layer"
        self.found: list[tuple[str, str, str]] = []     # (layer, what, where)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "to" or name == "cpu":
            device = (kwargs or {}).get("device", args[1] if len(args) > 1 else None)
            if name == "to" and not (isinstance(device, (str, torch.device))
                                     and torch.device(device).type == "cpu"):
                name = ""          # a dtype cast or a device-to-device move: no host read
        if name in HOST_READS:
            where = self._caller()
            if where is not None:
                self.found.append((self.layer, name, where))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _caller() -> str | None:
        """file:line of the first frame outside torch; None when the emulator made the call."""
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if path.startswith(EMULATOR_DIR):
                return None
            if f"{os.sep}torch{os.sep}" not in path:
                return f"{os.path.relpath(path)}:{frame.f_lineno}"
            frame = frame.f_back
        return "?"


# The Python bodies of the project's custom ops (model/moe.py: the MoE experts run inside
# torch.ops.ascend_qwen3.sparse_moe / sparse_moe_across_dp). A TorchFunctionMode sees the op
# call, not what its kernel does below the dispatcher, so the counter re-enters itself there.
CUSTOM_OP_BODIES = ("experts_forward", "forward_across_dp")


@contextlib.contextmanager
def counting(model):
    """Count host reads while the block runs, attributing them to the decoder layer running
    (inside the project's custom ops too)."""
    mode = HostReads()
    hooks, patched = [], []
    for i, layer in enumerate(model.layers):
        def enter(_module, _args, i=i):
            mode.layer = f"layer {i}"

        def leave(_module, _args, _out):
            mode.layer = "outside any layer"
        hooks += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    inside = []
    for module in model.modules():
        for name in CUSTOM_OP_BODIES:
            body = getattr(module, name, None)
            if body is None:
                continue

            def counted(*args, _body=body, **kwargs):
                if inside:                       # already counted by an outer body
                    return _body(*args, **kwargs)
                inside.append(True)
                try:
                    with mode:
                        return _body(*args, **kwargs)
                finally:
                    inside.pop()
            setattr(module, name, counted)
            patched.append((module, name))
    try:
        with mode:
            yield mode
    finally:
        for h in hooks:
            h.remove()
        for module, name in patched:
            delattr(module, name)                # the class's method again


def _one_decode_step(model, prompt_len=40, batch=3):
    """Prefill ``batch`` prompts (not counted), then one decode step for all of them, counted.
    Returns the HostReads of the decode step."""
    cfg = model.config
    cache = PagedKVCache(cfg, 8, 128, ctx=model.ctx)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (prompt_len + 7 * r,), generator=g) for r in range(batch)]
    with torch.inference_mode():
        positions, meta = cache.prepare([(r, len(p)) for r, p in enumerate(prompts)])
        model(torch.cat(prompts), positions, meta, cache.caches)
        # the step is planned on the host: lengths, slots and block tables (the per-step budget)
        positions, meta = cache.prepare([(r, 1) for r in range(batch)])
        ids = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
        with counting(model) as reads:
            hidden = model(ids, positions, meta, cache.caches)
            model.compute_logits(hidden)
    return reads


def _assert_no_reads(reads):
    per_layer: dict[str, list] = {}
    for layer, what, where in reads.found:
        per_layer.setdefault(layer, []).append(f"{what} at {where}")
    assert not reads.found, "host reads of device values in the forward:\n" + "\n".join(
        f"  {layer}: {len(v)}: {', '.join(v[:4])}" for layer, v in per_layer.items())


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_step_reads_nothing_back(checkpoint, name):
    path = checkpoint(name, dtype=torch.bfloat16, **CASES[name])
    with npu_backend() as emu:
        model, _ = load_model(path, dtype="bfloat16")
        reads = _one_decode_step(model)
        assert emu.calls.count("npu_fused_infer_attention_score") > 0     # it did run on the NPU ops
    _assert_no_reads(reads)


@pytest.mark.parametrize("case", ["dense_yarn-w8a8", "moe_plain-w8a8_dynamic"])
def test_w8a8_decode_step_reads_nothing_back(quantized, case):
    from tests.test_graph_npu_emulated import QUANT_CASES

    name, scheme, overrides = QUANT_CASES[case]
    path = quantized(name, scheme, dtype=torch.bfloat16, **overrides)
    with npu_backend() as emu:
        model, _ = load_model(path, dtype="bfloat16")
        reads = _one_decode_step(model)
        assert emu.calls.count("npu_quant_matmul") + emu.calls.count("npu_grouped_matmul") > 0
    _assert_no_reads(reads)


def test_expert_parallel_moe_reads_nothing_back(checkpoint):
    """Expert parallel (this rank holds half of the experts): the rank's rows are found without
    reading the routing counts back (ids rotated, rows past the local groups masked)."""
    from ascend_qwen3.parallel import ParallelContext

    path = checkpoint("moe_plain", dtype=torch.bfloat16, **CASES["moe_plain"])

    class Rank0(ParallelContext):      # one rank of an EP=2 group, its collectives kept local
        def all_reduce(self, x):
            return x

        def all_gather_last(self, x):
            return torch.cat([x] * self.tp_size, dim=-1)

    with npu_backend():
        model, _ = load_model(path, dtype="bfloat16", ctx=Rank0(tp_rank=0, tp_size=2, expert_parallel=True))
        assert model.layers[0].mlp.experts.count == model.config.num_experts // 2
        reads = _one_decode_step(model)
    _assert_no_reads(reads)


def test_the_counter_catches_a_host_read(checkpoint, monkeypatch):
    """The same step with a backend op that reads a device value back (as ops.npu.paged_attention
    did before it took host lengths: ``query_start_loc.tolist()``) is caught, in every layer."""
    path = checkpoint("dense_yarn", dtype=torch.bfloat16, **CASES["dense_yarn"])
    with npu_backend() as emu:
        real = emu.npu_ops.paged_attention

        def reads_back(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale,
                       **kw):
            kw.update(query_start_loc_host=query_start_loc.tolist(), seq_lens_host=seq_lens.tolist())
            return real(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
                        scale, **kw)

        monkeypatch.setattr(emu.npu_ops, "paged_attention", reads_back)
        model, cfg = load_model(path, dtype="bfloat16")
        reads = _one_decode_step(model)
    layers = {layer for layer, what, _ in reads.found if what == "tolist"}
    assert layers == {f"layer {i}" for i in range(cfg.num_layers)}, reads.found
    with pytest.raises(AssertionError, match="host reads of device values"):
        _assert_no_reads(reads)


@pytest.mark.parametrize("dispatch", [False, True], ids=["all-gather", "dispatch-combine"])
def test_moe_across_data_parallel_ranks_reads_nothing_back(checkpoint, dispatch):
    """Expert parallel across data-parallel ranks (one rank of DP 2 x TP 1, the other rank's
    rows stood in by zeros, its collectives kept local; or MC2's dispatch and combine, the
    other rank standing in with this one's tokens): the step's counts are the engine's host
    values (vLLM's DPMetadata), the padding and this rank's rows are found by shape, the
    padding rows masked off by a device comparison; nothing is read back from the device."""
    from tests.npu_emulator import mc2
    from dataclasses import dataclass

    from ascend_qwen3.parallel import ParallelContext

    path = checkpoint("moe_plain", dtype=torch.bfloat16, **CASES["moe_plain"])

    @dataclass(frozen=True)
    class Rank0OfDp2(ParallelContext):
        def dp_token_counts(self, local):
            return [local, local + 2]            # the other rank runs two more tokens: padding

        def dp_all_gather(self, x):
            return torch.cat([x, torch.zeros_like(x)])

        def dp_reduce_scatter(self, x):
            return x[:x.shape[0] // 2]

    ctx = Rank0OfDp2(tp_rank=0, tp_size=1, expert_parallel=True, dp_rank=0, dp_size=2,
                     dispatch_capacity=256 if dispatch else 0, ep_hccl_name="stand-in")
    with npu_backend() as emu:
        mc2.register("stand-in", mc2.StandInRanks(2, 0))
        try:
            model, _ = load_model(path, dtype="bfloat16", ctx=ctx)
            assert model.layers[0].mlp.experts.count == model.config.num_experts // 2
            reads = _one_decode_step(model)
        finally:
            mc2.unregister("stand-in")
        assert emu.calls.count("npu_grouped_matmul") > 0
        assert (emu.calls.count("npu_moe_distribute_combine_v2") > 0) == dispatch
    _assert_no_reads(reads)
