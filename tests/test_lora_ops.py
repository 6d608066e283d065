"""The LoRA ops' specification (``ops.cpu.lora_shrink`` / ``ops.cpu.lora_expand``) against an
independent formula: a per-token loop of explicit float64 dot products (tier 1).

Cases: every slot and -1 ("no adapter") mixed in one batch, slots of lower rank padded with zero
rows / columns, a packed projection (q|k|v expanded slice by slice at their offsets), int32 and
int64 slots, fp32 / bf16 / fp16. Tolerances: h (float32) within float32 accumulation-order noise
of the float64 truth (relative 1e-5); y within one rounding to its dtype (the specification
rounds once from float32; the float64 truth may round the other way at a tie-close value, so one
unit in the last place is allowed); rows of slot -1 and columns outside the slice bit-exact.
"""

from __future__ import annotations

import pytest
import torch

from ops import cpu

ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def lora_case(T: int, S: int, R: int, K: int, n: int, dtype: torch.dtype, ranks=None):
    """x [T, K]; lora_a [S, R, K] and lora_b [S, n, R] with slot s of rank ranks[s] (zero past
    it); slots: each of -1..S-1 at least once (for T > S), shuffled, the same for every call
    with the same T (the slices of one packed projection share them)."""
    ranks = ranks or [R] * S
    x = torch.randn(T, K).to(dtype)
    a = torch.randn(S, R, K) / K ** 0.5
    b = torch.randn(S, n, R) / R ** 0.5
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, :, r:] = 0
    order = torch.randperm(T, generator=torch.Generator().manual_seed(T))   # one per batch size
    return x, a.to(dtype), b.to(dtype), (torch.arange(T) % (S + 1) - 1)[order]


def shrink_truth(x, a, slots, scale):
    """h[t] = scale * sum_k a[s, r, k] x[t, k], one token and one rank row at a time, float64."""
    T, R = x.shape[0], a.shape[1]
    h = torch.zeros(T, R, dtype=torch.float64)
    for t in range(T):
        s = int(slots[t])
        if s < 0:
            continue
        for r in range(R):
            h[t, r] = scale * torch.dot(a[s, r].double(), x[t].double())
    return h


def expand_truth(y, h, b, slots, offset):
    """(y[t, offset + j] + sum_r b[s, j, r] h[t, r] in float64, and the sum of the terms'
    magnitudes |y| + sum_r |b h|, which bounds the float32 accumulation noise)."""
    out, size = y.double().clone(), y.double().abs()
    n = b.shape[1]
    for t in range(y.shape[0]):
        s = int(slots[t])
        if s < 0:
            continue
        out[t, offset:offset + n] += b[s].double() @ h[t].double()
        size[t, offset:offset + n] += b[s].double().abs() @ h[t].double().abs()
    return out, size


def assert_rounded_once(got, truth, size):
    """got is the float64 truth rounded to got's dtype: within half a unit in the last place
    of the truth, plus float32 accumulation noise (1e-6 of the terms' magnitudes)."""
    assert got.shape == truth.shape
    bound = ULP[got.dtype] / 2 * truth.abs() + 1e-6 * size
    err = (got.double() - truth).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R", [8, 16, 64])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_shrink_vs_per_token_dot_products(dtype, R, slot_dtype):
    x, a, _, slots = lora_case(T=13, S=3, R=R, K=96, n=32, dtype=dtype, ranks=[R, R // 2, 8])
    h = cpu.lora_shrink(x, a, slots.to(slot_dtype), 0.5)
    assert h.dtype == torch.float32 and h.shape == (13, R)
    truth = shrink_truth(x, a, slots, 0.5)
    torch.testing.assert_close(h.double(), truth, rtol=1e-5, atol=1e-6)
    assert torch.equal(h[slots < 0], torch.zeros_like(h[slots < 0]))     # exactly 0 for -1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R", [8, 32])
def test_expand_packed_qkv_vs_per_token_sums(dtype, R):
    """q|k|v of sizes 64|32|32 expanded slice by slice at offsets 0, 64, 96 into one y."""
    T, S, K = 11, 2, 64
    sizes, offsets = [64, 32, 32], [0, 64, 96]
    y = torch.randn(T, sum(sizes)).to(dtype)
    x, _, _, slots = lora_case(T, S, R, K, 8, dtype)
    got = y.clone()
    for n, off in zip(sizes, offsets):
        _, a, b, _ = lora_case(T, S, R, K, n, dtype)
        h = cpu.lora_shrink(x, a, slots, 2.0)
        truth, size = expand_truth(y, h, b, slots, off)   # the slices do not overlap: each from y
        before = got.clone()
        out = cpu.lora_expand(got, h, b, slots, off)
        assert out.data_ptr() == got.data_ptr()        # the specification updates y in place
        cols = slice(off, off + n)
        assert_rounded_once(out[:, cols], truth[:, cols], size[:, cols])
        assert torch.equal(torch.cat([out[:, :off], out[:, off + n:]], 1),
                           torch.cat([before[:, :off], before[:, off + n:]], 1))
    assert torch.equal(got[slots < 0], y[slots < 0])    # slot -1: y untouched, bit for bit


def test_expand_leaves_the_other_columns_alone():
    T, R, n = 6, 8, 16
    y = torch.randn(T, 80).bfloat16()
    _, _, b, slots = lora_case(T, 2, R, 32, n, torch.bfloat16)
    h = torch.randn(T, R)
    got = cpu.lora_expand(y.clone(), h, b, slots, 48)
    assert torch.equal(got[:, :48], y[:, :48]) and torch.equal(got[:, 64:], y[:, 64:])
    assert not torch.equal(got[slots >= 0, 48:64], y[slots >= 0, 48:64])


def test_a_zero_adapter_is_the_base_model():
    """An adapter whose B is zero (how PEFT initialises one) changes nothing, bit for bit."""
    x, a, b, slots = lora_case(9, 2, 16, 64, 48, torch.bfloat16)
    y = torch.randn(9, 48).bfloat16()
    got = cpu.lora_expand(y.clone(), cpu.lora_shrink(x, a, slots, 1.0), torch.zeros_like(b), slots, 0)
    assert torch.equal(got, y)


def test_no_tokens():
    h = cpu.lora_shrink(torch.zeros(0, 32), torch.randn(2, 8, 32), torch.zeros(0, dtype=torch.long), 1.0)
    assert h.shape == (0, 8) and h.dtype == torch.float32
    y = cpu.lora_expand(torch.zeros(0, 16), h, torch.randn(2, 16, 8), torch.zeros(0, dtype=torch.long), 0)
    assert y.shape == (0, 16)
