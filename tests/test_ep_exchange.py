"""The expert-parallel token exchange (``ops.ep_dispatch`` / ``ops.ep_combine``) across real
ranks (gloo processes): the specification (``ops.cpu``, over torch.distributed) against the
definition (a plain per-token sum over every rank's experts), and the NPU backend (torch_npu's
MC2 kernels, ``npu_moe_distribute_dispatch_v2`` / ``combine_v2``, emulated with their
multi-rank semantics in tests/npu_emulator/mc2.py) against the specification."""

from __future__ import annotations

import pytest
import torch

from ascend_qwen3.parallel.launch import run_parallel

H, E, K = 64, 16, 4


def _inputs(rank: int, bs: int, n_active: int):
    """Rank ``rank``'s tokens, distinct expert ids per row, weights and active-prefix mask."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(bs, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(bs)]).to(torch.int32)
    w = torch.rand(bs, K, generator=g).to(torch.bfloat16)
    active = torch.arange(bs) < n_active
    return x, ids, w, active


def _experts(e: int, rows: torch.Tensor) -> torch.Tensor:
    """Expert e's stand-in FFN: a fixed per-expert scaling and shift (exact in bf16 range)."""
    return (rows.float() * (1 + e / 8) + e / 16).to(rows.dtype)


def _jobs(ctx, bs, n_active):
    """``_job`` for the specification and the NPU backend, with and without quantisation, in
    one set of processes: {(on_npu, quantize): result}."""
    return {(on_npu, quantize): _job(ctx, bs, n_active, on_npu, quantize)
            for on_npu in (False, True) for quantize in (False, True)}


def _job(ctx, bs, n_active, on_npu, quantize):
    """One rank: dispatch its tokens, run its experts on what arrived, combine. Returns what
    this rank's experts received (per local expert, in order), the ends, and the combined rows."""
    import contextlib

    import ops.cpu as cpu
    from ops.cpu import ExpertGroup

    size, rank = ctx.tp_size, ctx.tp_rank
    x, ids, w, active = _inputs(rank, bs, n_active)
    mask = None if n_active == bs else active
    with contextlib.ExitStack() as stack:
        if on_npu:
            from tests.npu_emulator import installed, mc2
            emu = stack.enter_context(installed())
            mc2.register("ep-test", mc2.GlooRanks())
            be = emu.npu_ops
        else:
            be = cpu
        ep = ExpertGroup(rank=rank, size=size, hccl_name="ep-test")
        rows, scale, ends, handle = be.ep_dispatch(x, ids, mask, E, ep, quantize)
        L = E // size
        n = int(ends[-1])
        got = rows[:n]
        if quantize:     # dequantised rows for the experts
            got = (got.float() * scale[:n].unsqueeze(-1)).to(torch.bfloat16)
        out = torch.zeros(rows.shape[0], H, dtype=torch.bfloat16)
        start = 0
        for j, end in enumerate(ends.tolist()):
            out[start:end] = _experts(rank * L + j, got[start:end])
            start = end
        y = be.ep_combine(out, w, handle)
    return got, ends, y[:n_active]


def _expected(size, bs, n_active):
    """The definition: token t of rank s gets sum_k w[t, k] * expert_{ids[t, k]}(x[t]) in fp32,
    rounded once."""
    outs = []
    for s in range(size):
        x, ids, w, _ = _inputs(s, bs, n_active)
        y = torch.zeros(n_active, H)
        for t in range(n_active):
            for k in range(K):
                e = int(ids[t, k])
                y[t] += _experts(e, x[t:t + 1])[0].float() * float(w[t, k])
        outs.append(y.to(torch.bfloat16))
    return outs


_RUNS: dict = {}


def _runs(size, bs, n_active):
    """Every rank's ``_jobs``, once per configuration (one set of processes)."""
    key = (size, bs, n_active)
    if key not in _RUNS:
        _RUNS[key] = run_parallel(_jobs, size, bs, n_active)
    return _RUNS[key]


CASES = [(2, 5, 5), (4, 3, 2)]      # (ranks, tokens per rank, active tokens per rank)


@pytest.mark.parametrize("size,bs,n_active", CASES)
def test_the_specification_sends_each_pair_to_its_expert_and_back(size, bs, n_active):
    want = _expected(size, bs, n_active)
    L = E // size
    for r, runs in enumerate(_runs(size, bs, n_active)):
        rows, ends, y = runs[(False, False)]
        assert ends.dtype == torch.int64 and ends.shape == (L,)
        # every active pair routed to rank r arrived, grouped by local expert
        n = sum(int(((_inputs(s, bs, n_active)[1][:n_active] // L) == r).sum())
                for s in range(size))
        assert int(ends[-1]) == n == rows.shape[0]
        torch.testing.assert_close(y.float(), want[r].float(), rtol=0, atol=0)


@pytest.mark.parametrize("size,bs,n_active", CASES)
@pytest.mark.parametrize("quantize", [False, True])
def test_mc2_kernels_exchange_as_the_specification(size, bs, n_active, quantize):
    """The emulated MC2 kernels over gloo ranks, through ops.npu, against ops.cpu: the same rows
    in the same order, the same ends, the combined tokens exactly equal without quantisation
    (within one int8 step's worth with it)."""
    for r, runs in enumerate(_runs(size, bs, n_active)):
        rows, ends, y = runs[(True, quantize)]
        rows_c, ends_c, y_c = runs[(False, quantize)]
        assert torch.equal(ends, ends_c), (r, ends, ends_c)
        if quantize:   # the kernel scales by 127 / max, the specification divides by max / 127
            torch.testing.assert_close(rows.float(), rows_c.float(), rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(y.float(), y_c.float(), rtol=2e-2, atol=2e-2)
        else:
            assert torch.equal(rows, rows_c), r
            assert torch.equal(y, y_c), r


def test_mc2_refuses_what_atlas_a2_does_not_take():
    from tests.npu_emulator import NpuEmulatorError, installed, mc2
    from ops.cpu import ExpertGroup

    with installed() as emu:
        mc2.register("one", mc2.StandInRanks(16, 0))
        try:
            x = torch.zeros(4, 64, dtype=torch.bfloat16)
            ids = torch.arange(8, dtype=torch.int32).repeat(4, 1)
            ok = ExpertGroup(rank=0, size=16, hccl_name="one")
            emu.npu_ops.ep_dispatch(x, ids, None, 128, ok)              # accepted
            with pytest.raises(ValueError, match="HCCL communicator name"):
                emu.npu_ops.ep_dispatch(x, ids, None, 128, ExpertGroup(rank=0, size=16))
            with pytest.raises(ValueError, match="1 to 256 tokens"):
                emu.npu_ops.ep_dispatch(torch.zeros(300, 64, dtype=torch.bfloat16),
                                        ids[:1].repeat(300, 1), None, 128, ok)
            with pytest.raises(ValueError, match="multiple of 32"):
                emu.npu_ops.ep_dispatch(torch.zeros(4, 48, dtype=torch.bfloat16), ids, None,
                                        128, ok)
            with pytest.raises(ValueError, match="expert-parallel size"):
                emu.npu_ops.ep_dispatch(x, ids, None, 120, ok)
            torch_npu = emu.torch_npu
            with pytest.raises(NpuEmulatorError, match="prefix"):
                torch_npu.npu_moe_distribute_dispatch_v2(
                    x, ids, "one", 16, 0, 128, x_active_mask=torch.tensor([True, False, True,
                                                                           False]))
            with pytest.raises(NpuEmulatorError, match="no HCCL communicator"):
                torch_npu.npu_moe_distribute_dispatch_v2(x, ids, "two", 16, 0, 128)
            with pytest.raises(NpuEmulatorError, match="ep_world_size must be one of"):
                mc2.register("ten", mc2.StandInRanks(10, 0))
                torch_npu.npu_moe_distribute_dispatch_v2(x, ids, "ten", 10, 0, 120)
        finally:
            for name in ("one", "ten"):
                mc2.unregister(name)


def test_the_plugin_takes_mc2_where_vllm_ascend_does():
    """vllm-ascend 0.23's Atlas A2 rule (``_select_a2_moe_comm_method``): dispatch and combine
    only with at least 16 expert-parallel ranks holding at most 24 experts each, for steps up
    to its MC2 capacity (the largest graph size over TP, rounded up, at most 512, times TP),
    here also at most 256 tokens per tensor-parallel rank (the A2 kernels' limit)."""
    from types import SimpleNamespace

    from ascend_qwen3.vllm_plugin import compat

    def config(capture=128, seqs=256):
        return SimpleNamespace(
            compilation_config=SimpleNamespace(max_cudagraph_capture_size=capture,
                                               cudagraph_capture_sizes=[1, 2, 4, capture]
                                               if capture else []),
            scheduler_config=SimpleNamespace(max_num_seqs=seqs))

    assert compat.mc2_capacity(config(), 128, 16, 8) == 128         # Qwen3-235B, DP 2 x TP 8
    assert compat.mc2_capacity(config(), 128, 8, 8) == 0            # EP 8: all-gather
    assert compat.mc2_capacity(config(), 512, 16, 8) == 0           # 32 experts a rank
    assert compat.mc2_capacity(config(capture=100), 128, 16, 8) == 104
    assert compat.mc2_capacity(config(capture=8192), 128, 16, 8) == 256 * 8
    assert compat.mc2_capacity(config(capture=None), 128, 32, 4) == 256   # eager: max_num_seqs


def test_inside_vllm_ascend_the_mask_is_its_own(monkeypatch):
    """Inside vllm-ascend the dispatch's mask is vllm-ascend's per-step buffer of real tokens
    (``_EXTRA_CTX.mc2_mask``, filled before every forward and graph replay), this tensor-
    parallel rank's slice of it, a view: a captured graph reads each step's. Without one (no
    vllm-ascend, another length) the step's count decides."""
    import sys
    import types

    from ascend_qwen3.vllm_plugin.model import VllmParallelContext

    ctx = VllmParallelContext(tp_rank=1, tp_size=2, expert_parallel=True, dp_rank=0, dp_size=2)
    rows = torch.arange(8)
    assert ctx.dispatch_active(8, 4, 4, rows) is None                # no vllm-ascend: all real
    assert ctx.dispatch_active(6, 4, 4, rows).tolist() == [True, True, False, False]

    buffer = torch.zeros(16, dtype=torch.bool)
    buffer[:5] = True                                                 # 5 real tokens this step
    extra = types.SimpleNamespace(mc2_mask=buffer[:8])
    fake = types.ModuleType("vllm_ascend.ascend_forward_context")
    fake._EXTRA_CTX = extra
    monkeypatch.setitem(sys.modules, "vllm_ascend", types.ModuleType("vllm_ascend"))
    monkeypatch.setitem(sys.modules, "vllm_ascend.ascend_forward_context", fake)
    mask = ctx.dispatch_active(8, 4, 4, rows)
    assert mask.tolist() == [True, False, False, False]
    buffer[5:7] = True                                                # the next step: 7 real
    assert mask.tolist() == [True, True, True, False]                 # the same storage
    extra.mc2_mask = buffer[:6]                                       # another step length
    assert ctx.dispatch_active(8, 4, 4, rows) is None
