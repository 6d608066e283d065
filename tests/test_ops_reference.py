"""CPU reference operators (``ops.cpu``, ``ops.rope``) against implementations nobody here wrote.

Tier 1 of the README's three tiers. The independent references are:
- attention: ``torch.nn.functional.scaled_dot_product_attention`` on the un-paged K/V of each
  request, with an explicit bottom-right causal mask and ``enable_gqa``;
- norms, RoPE (plain and YaRN), the dense MLP and the sparse MoE block: Hugging Face
  ``transformers`` Qwen3 / Qwen3-MoE modules;
- int8 GEMMs: ``torch.matmul`` on int64 tensors; quantisers: closed-form formulas on exact grids.

Tolerances are stated next to each assertion. fp32 comparisons are tight (accumulation-order
noise only); bf16 comparisons allow the rounding of the output to bf16 (relative 2**-8 = 0.39%
per rounding) or a few such roundings when the reference itself runs in bf16.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import ops
from ops import cpu
from ops.rope import rope_cos_sin_cache, rope_inv_freq

from transformers import Qwen3Config, Qwen3MoeConfig
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

BF16_EPS = 2.0 ** -8  # relative spacing of bf16 numbers: one rounding to bf16 costs <= half of it


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ============================================================================================
# Paged attention vs SDPA on the un-paged K/V
# ============================================================================================

def _paged_case(reqs, hq, hkv, d, bs, dtype, spare_blocks=3, use_write_op=True):
    """Random packed queries and a paged cache holding every key of every request.

    reqs: list of (Lq, Lk). Physical blocks are a random permutation (non-contiguous, shuffled)
    of the pool; cache slots no request owns hold 1e4 (finite, as a cache's stale slots are),
    so any weight given to them, or any of them read as a key, spoils the output. Returns the
    op's inputs plus the un-paged per-request K/V.
    """
    nblocks = [math.ceil(lk / bs) for _, lk in reqs]
    total = sum(nblocks) + spare_blocks
    perm = torch.randperm(total)
    max_blocks = max(nblocks) + 2  # padded table: entries past a request's blocks are junk
    block_tables = torch.randint(0, total, (len(reqs), max_blocks), dtype=torch.int32)
    key_cache = torch.full((total, bs, hkv, d), 1e4, dtype=dtype)
    value_cache = torch.full((total, bs, hkv, d), 1e4, dtype=dtype)
    q_list, k_list, v_list, slots = [], [], [], []
    used = 0
    for (lq, lk), nb in zip(reqs, nblocks):
        phys = perm[used:used + nb]
        used += nb
        block_tables[len(k_list), :nb] = phys.to(torch.int32)
        k = torch.randn(lk, hkv, d).to(dtype)
        v = torch.randn(lk, hkv, d).to(dtype)
        pos = torch.arange(lk)
        slot = phys[pos // bs] * bs + pos % bs
        if use_write_op:
            cpu.write_kv_cache(k, v, key_cache, value_cache, slot)
        else:  # fill the pages directly, independently of write_kv_cache
            for i in range(lk):
                key_cache[phys[i // bs], i % bs] = k[i]
                value_cache[phys[i // bs], i % bs] = v[i]
        q_list.append(torch.randn(lq, hq, d).to(dtype))
        k_list.append(k)
        v_list.append(v)
        slots.append(slot)
    query = torch.cat(q_list)
    qsl = torch.tensor([0] + [lq for lq, _ in reqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([lk for _, lk in reqs], dtype=torch.int32)
    return query, key_cache, value_cache, block_tables, qsl, seq_lens, q_list, k_list, v_list


def _sdpa_reference(q_list, k_list, v_list, scale):
    """Per-request SDPA in fp32 with an explicit bottom-right causal mask; [T, Hq, D] fp32."""
    outs = []
    for q, k, v in zip(q_list, k_list, v_list):
        lq, lk = q.shape[0], k.shape[0]
        # query j (absolute position lk - lq + j) sees keys 0 .. lk - lq + j
        mask = torch.arange(lk)[None, :] <= (torch.arange(lq)[:, None] + (lk - lq))
        o = F.scaled_dot_product_attention(
            q.float().transpose(0, 1).unsqueeze(0),  # [1, Hq, Lq, D]
            k.float().transpose(0, 1).unsqueeze(0),  # [1, Hkv, Lk, D]
            v.float().transpose(0, 1).unsqueeze(0),
            attn_mask=mask, scale=scale, enable_gqa=True)  # GQA: head h reads kv head h // group
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


ATTN_CASES = {
    "prefill": [(37, 37)],
    "prefill_one_token": [(1, 1)],
    "prefill_long": [(333, 333)],
    "chunked_prefill": [(20, 75)],
    "chunked_prefill_long_prefix": [(45, 345)],
    "decode": [(1, 50)],
    "decode_long": [(1, 317)],
    "decode_at_block_boundary": [(1, 32), (1, 33)],
    "mixed_batch": [(1, 300), (17, 17), (5, 133), (1, 1), (64, 200), (16, 16), (3, 48)],
}


@pytest.fixture(params=["eager", "compiled"])
def decode_kernel(request):
    """Each test below runs twice: with the eager reference kernels, and with the decode
    requests through ``torch.compile`` (``cpu.compile_kernels``, what a compiling engine uses),
    both held to the same independent reference. Returns the number of graphs compiled during
    the test (call it at the end), so a test sees the compiled path really ran."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()           # fresh caches: no test inherits another's recompile count
    cpu.compile_kernels(request.param == "compiled")
    before = counters["stats"]["unique_graphs"]
    yield lambda: counters["stats"]["unique_graphs"] - before
    cpu.compile_kernels(False)


def _check_compiled(decode_kernel, request, reqs):
    if "compiled" in request.node.callspec.id and any(lq == 1 for lq, _ in reqs):
        assert decode_kernel() >= 1, "the compiled decode attention did not run"


@pytest.mark.parametrize("case", sorted(ATTN_CASES))
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
def test_paged_attention_fp32_vs_sdpa(case, gqa, decode_kernel, request):
    hkv, d, bs = 2, 32, 16
    hq = hkv * gqa
    scale = d ** -0.5
    query, kc, vc, bt, qsl, sl, qs, ks, vs = _paged_case(ATTN_CASES[case], hq, hkv, d, bs, torch.float32)
    out = cpu.paged_attention(query, kc, vc, bt, qsl, sl, scale)
    ref = _sdpa_reference(qs, ks, vs, scale)
    assert out.shape == query.shape and out.dtype == torch.float32
    # fp32 both sides; only summation order differs (softmax over <= 345 keys, D=32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _check_compiled(decode_kernel, request, ATTN_CASES[case])


@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
@pytest.mark.parametrize("bs", [16, 128])
def test_paged_attention_bf16_vs_sdpa(gqa, bs, decode_kernel, request):
    hkv, d = 1, 128
    hq = hkv * gqa
    scale = d ** -0.5
    reqs = [(1, 300), (23, 23), (7, 150), (1, 1), (40, 129)]
    query, kc, vc, bt, qsl, sl, qs, ks, vs = _paged_case(reqs, hq, hkv, d, bs, torch.bfloat16)
    out = cpu.paged_attention(query, kc, vc, bt, qsl, sl, scale)
    ref = _sdpa_reference(qs, ks, vs, scale)  # exact maths on the same bf16 inputs
    assert out.dtype == torch.bfloat16
    # scores and softmax in fp32, the probabilities rounded to bf16 (relative error <= 2^-9
    # each) before they weight the values, the sum rounded once: error <= 2^-9 * max|v|
    # (+ fp32 noise) absolute, plus half a bf16 ulp of the result
    vmax = max(float(v.float().abs().max()) for v in vs)
    torch.testing.assert_close(out.float(), ref, rtol=BF16_EPS, atol=2**-9 * vmax + 1e-5)
    _check_compiled(decode_kernel, request, reqs)


def test_paged_attention_cache_filled_directly():
    """Same as above but with the pages written by hand, so write_kv_cache is not involved."""
    reqs = [(5, 40), (1, 17), (12, 12)]
    query, kc, vc, bt, qsl, sl, qs, ks, vs = _paged_case(reqs, 8, 2, 16, 8, torch.float32,
                                                         use_write_op=False)
    out = cpu.paged_attention(query, kc, vc, bt, qsl, sl, 0.3)
    # fp32 tight, as in the SDPA test above
    torch.testing.assert_close(out, _sdpa_reference(qs, ks, vs, 0.3), rtol=1e-5, atol=1e-5)


def _page_major_views(key_cache, value_cache):
    """The same caches in a page layout that stores each (block, head) page's K transposed
    ([D, BS]) and its V token-major ([BS, D]), one [NB, H, BS, 2D] tensor, as vLLM's CPU cache
    does; returned as [NB, BS, H, D] views (strided), like ascend_qwen3.vllm_plugin.compat."""
    nb, bs, h, d = key_cache.shape
    pages = torch.empty(nb, h, 2 * bs * d, dtype=key_cache.dtype)
    k = pages[:, :, :bs * d].view(nb, h, d, bs).permute(0, 3, 1, 2)
    v = pages[:, :, bs * d:].view(nb, h, bs, d).permute(0, 2, 1, 3)
    k.copy_(key_cache)
    v.copy_(value_cache)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_any_cache_strides(dtype, decode_kernel, request):
    """The op reads a cache through any strided [NB, BS, Hkv, D] view (here vLLM's CPU page
    layout, K stored transposed) with the results of a contiguous cache: exactly in eager; the
    compiled kernel vectorises each layout its own way, so there only the summation order may
    differ (fp32: 1e-5; bf16: a probability or the result rounded the other way)."""
    reqs = [(1, 300), (1, 7), (1, 129), (9, 40), (1, 128)]
    query, kc, vc, bt, qsl, sl, qs, ks, vs = _paged_case(reqs, 8, 2, 32, 16, dtype)
    kv, vv = _page_major_views(kc, vc)
    assert not kv.is_contiguous() and kv.stride(1) == 1
    want = cpu.paged_attention(query, kc, vc, bt, qsl, sl, 0.2)
    got = cpu.paged_attention(query, kv, vv, bt, qsl, sl, 0.2)
    if "eager" in request.node.callspec.id:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    elif dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        vmax = max(float(v.float().abs().max()) for v in vs)
        torch.testing.assert_close(got.float(), want.float(), rtol=BF16_EPS,
                                   atol=2**-9 * vmax + 1e-5)
    _check_compiled(decode_kernel, request, reqs)


def test_paged_attention_padding_rows_are_zero(decode_kernel):
    """Rows past query_start_loc[R] (an engine's padding) come back as zeros."""
    query, kc, vc, bt, qsl, sl, *_ = _paged_case([(1, 20), (3, 30)], 4, 2, 16, 8, torch.float32)
    padded = torch.cat([query, torch.randn(5, 4, 16)])
    out = cpu.paged_attention(padded, kc, vc, bt, qsl, sl, 0.25)
    assert torch.equal(out[query.shape[0]:], torch.zeros(5, 4, 16))


def test_paged_attention_padding_requests(decode_kernel):
    """Engines pad batches with requests that have more queries than keys (vllm-ascend: decode
    dummies with no keys, a mixed-batch dummy with one key): the queries that see no key give
    zero rows, the others attend as the last queries of a request with that many keys, and the
    real requests are untouched."""
    real = [(1, 20), (3, 30)]
    query, kc, vc, bt, qsl, sl, *_ = _paged_case(real, 4, 2, 16, 8, torch.float32)
    ref = cpu.paged_attention(query, kc, vc, bt, qsl, sl, 0.25)
    n = query.shape[0]
    extra = torch.randn(1 + 1 + 5, 4, 16)
    padded = torch.cat([query, extra])
    # two decode dummies (q 1, no keys) and a mixed-batch dummy (q 5, its one key: request 0's)
    qsl2 = torch.tensor(qsl.tolist() + [n + 1, n + 2, n + 7], dtype=torch.int32)
    sl2 = torch.tensor(sl.tolist() + [0, 0, 1], dtype=torch.int32)
    bt2 = torch.cat([bt, bt[:1], bt[:1], bt[:1]])
    out = cpu.paged_attention(padded, kc, vc, bt2, qsl2, sl2, 0.25)
    assert torch.equal(out[:n], ref)
    assert torch.equal(out[n:n + 6], torch.zeros(6, 4, 16))
    one = cpu.paged_attention(extra[-1:], kc, vc, bt[:1], torch.tensor([0, 1]),
                              torch.tensor([1], dtype=torch.int32), 0.25)
    assert torch.equal(out[-1:], one)          # the last dummy query sees the one key


def test_paged_attention_of_no_tokens(decode_kernel):
    """A step without tokens (no requests) gives an empty result, compiled or not."""
    kc = torch.zeros(3, 8, 2, 16)
    out = cpu.paged_attention(torch.randn(0, 4, 16), kc, kc, torch.zeros(0, 1, dtype=torch.int32),
                              torch.tensor([0]), torch.tensor([], dtype=torch.int32), 1.0)
    assert out.shape == (0, 4, 16)


def test_paged_attention_rejects_bad_gqa():
    query = torch.randn(3, 6, 8)
    kc = torch.zeros(2, 4, 4, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        cpu.paged_attention(query, kc, kc, torch.zeros(1, 1, dtype=torch.int32),
                            torch.tensor([0, 3]), torch.tensor([3]), 1.0)


# ============================================================================================
# write_kv_cache
# ============================================================================================

@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_scatter_and_skip(slot_dtype, dtype):
    nb, bs, h, d = 5, 4, 2, 3
    key = torch.randn(6, h, d).to(dtype)
    value = torch.randn(6, h, d).to(dtype)
    kc = torch.full((nb, bs, h, d), 7.0, dtype=dtype)
    vc = torch.full((nb, bs, h, d), -7.0, dtype=dtype)
    slots = torch.tensor([13, -1, 0, 19, -1, 6], dtype=slot_dtype)
    cpu.write_kv_cache(key, value, kc, vc, slots)
    exp_k = torch.full((nb, bs, h, d), 7.0, dtype=dtype)
    exp_v = torch.full((nb, bs, h, d), -7.0, dtype=dtype)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            exp_k[s // bs, s % bs] = key[t]
            exp_v[s // bs, s % bs] = value[t]
    # a pure copy: bit-exact, and untouched everywhere else (slots -1 included)
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv_cache_out_of_range_raises(slot_dtype):
    kc = torch.zeros(2, 4, 1, 2)
    vc = torch.zeros(2, 4, 1, 2)
    x = torch.ones(2, 1, 2)
    with pytest.raises(ValueError, match="outside the cache"):
        cpu.write_kv_cache(x, x, kc, vc, torch.tensor([3, 8], dtype=slot_dtype))
    cpu.write_kv_cache(x, x, kc, vc, torch.tensor([-1, -1], dtype=slot_dtype))  # all skipped: fine
    assert not kc.any() and not vc.any()


# ============================================================================================
# RMSNorm family vs Qwen3RMSNorm
# ============================================================================================

def _hf_norm(n, dtype, eps=1e-6):
    m = Qwen3RMSNorm(n, eps=eps)
    with torch.no_grad():
        m.weight.copy_(torch.randn(n) * 0.5 + 1.0)
    return m.to(dtype)


# the same maths: fp32 agrees to float noise; in bf16 ours rounds once, HF twice (x * rstd, then
# the weight product): at most one bf16 ulp apart
_NORM_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2 * BF16_EPS, atol=1e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 1024), (3, 5, 128)])
def test_rms_norm_vs_hf(dtype, shape):
    m = _hf_norm(shape[-1], dtype)
    x = (torch.randn(shape) * 3).to(dtype)
    y = cpu.rms_norm(x, m.weight.detach(), 1e-6)
    with torch.no_grad():
        ref = m(x)
    assert y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, **_NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_per_head_vs_hf_qk_norm(dtype):
    t, h, d = 9, 4, 128
    m = _hf_norm(d, dtype)
    x = torch.randn(t, h, d).to(dtype)
    y = cpu.rms_norm(x, m.weight.detach(), 1e-6)
    with torch.no_grad():  # HF applies q_norm on [B, S, H, D] before the transpose
        ref = m(x.unsqueeze(0))[0]
    torch.testing.assert_close(y, ref, **_NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_vs_hf(dtype):
    m = _hf_norm(256, dtype)
    x = torch.randn(6, 256).to(dtype)
    res = (torch.randn(6, 256) * 4).to(dtype)
    y, new_res = cpu.add_rms_norm(x, res, m.weight.detach(), 1e-6)
    # the residual is an unfused add in the input dtype: bit-exact
    assert new_res.dtype == dtype and torch.equal(new_res, x + res)
    with torch.no_grad():
        ref = m(x + res)
    torch.testing.assert_close(y, ref, **_NORM_TOL[dtype])


# ============================================================================================
# Rotary embedding vs Qwen3RotaryEmbedding + apply_rotary_pos_emb
# ============================================================================================

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
MAX_POS = 131072


def _hf_rope(head_dim, theta, scaling):
    params = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    config = Qwen3Config(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=head_dim, max_position_embeddings=MAX_POS, rope_parameters=params)
    assert config.rope_parameters["rope_theta"] == theta  # transformers 5: theta lives in rope_parameters
    return Qwen3RotaryEmbedding(config)


def _positions(t):
    """Unsorted positions with repeats, including 0, large ones (~1e5) and the table's last row."""
    pos = torch.cat([torch.tensor([100000, 0, 5, MAX_POS - 1, 5, 65537, 32767, 32768]),
                     torch.randint(0, MAX_POS, (t - 8,))])
    return pos[torch.randperm(t)]


@pytest.mark.parametrize("scaling", [None, YARN], ids=["default", "yarn"])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_tables_vs_hf(scaling, head_dim):
    theta = 1e6
    hf = _hf_rope(head_dim, theta, scaling)
    inv, mscale = rope_inv_freq(head_dim, theta, scaling)
    # same fp32 formula: inverse frequencies agree to one ulp; the YaRN attention factor exactly
    torch.testing.assert_close(inv, hf.inv_freq, rtol=1.2e-7, atol=0)
    assert mscale == pytest.approx(hf.attention_scaling, rel=1e-12)
    if scaling is not None:
        assert mscale == pytest.approx(0.1 * math.log(4.0) + 1.0)


@pytest.mark.parametrize("scaling", [None, YARN], ids=["default", "yarn"])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rotary_embedding_fp32_vs_hf(scaling, head_dim):
    theta, t, hq, hk = 1e6, 40, 4, 2
    table = rope_cos_sin_cache(head_dim, MAX_POS, theta, scaling)
    assert table.shape == (MAX_POS, head_dim) and table.dtype == torch.float32
    hf = _hf_rope(head_dim, theta, scaling)
    pos = _positions(t)
    q = torch.randn(t, hq, head_dim)
    k = torch.randn(t, hk, head_dim)
    rows = ops.rope_table(table, torch.float32)
    assert rows.shape == (2, MAX_POS, head_dim)
    q_out, k_out = cpu.rotary_embedding(q, k, *ops.rope_cos_sin(rows, pos))
    cos, sin = hf(q, pos.unsqueeze(0))  # [1, T, D]
    # HF layout is [B, H, S, D]; ops use [T, H, D]
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), cos, sin)
    # fp32 tables built the same way (angle = fp32(pos) * inv_freq): only float noise remains
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out, k_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scaling", [None, YARN], ids=["default", "yarn"])
def test_rotary_embedding_bf16_vs_hf(scaling):
    """A bf16 model rotates with bf16 cos/sin (the model's ``rope_table``, as Hugging Face and
    vLLM round them to the activations' dtype, and as the NPU kernel needs them): against the
    fp32 truth the error stays within the tolerance the fp32 tables had (measured below), and
    against Hugging Face run in bf16 it is closer than before."""
    theta, t, hq, hk, d = 1e6, 33, 8, 2, 128
    table = rope_cos_sin_cache(d, MAX_POS, theta, scaling)
    hf = _hf_rope(d, theta, scaling)
    pos = _positions(t)
    q = torch.randn(t, hq, d).to(torch.bfloat16)
    k = torch.randn(t, hk, d).to(torch.bfloat16)
    q_out, k_out = cpu.rotary_embedding(q, k, *ops.rope_cos_sin(ops.rope_table(table, torch.bfloat16),
                                                                pos))
    q32, k32 = cpu.rotary_embedding(q, k, *ops.rope_cos_sin(ops.rope_table(table, torch.float32), pos))
    assert q_out.dtype == k_out.dtype == torch.bfloat16
    qh, kh = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0)
    # (a) vs HF in fp32 on the same bf16 inputs: fp32 tables round once, at the end; bf16 tables
    # add the rounding of cos/sin: a few bf16 ulps, the tolerance of the bf16 end-to-end check
    cos, sin = hf(qh.float(), pos.unsqueeze(0))
    q_ref, k_ref = apply_rotary_pos_emb(qh.float(), kh.float(), cos, sin)
    torch.testing.assert_close(q32.float(), q_ref[0].transpose(0, 1), rtol=BF16_EPS, atol=1e-5)
    torch.testing.assert_close(k32.float(), k_ref[0].transpose(0, 1), rtol=BF16_EPS, atol=1e-5)
    torch.testing.assert_close(q_out.float(), q_ref[0].transpose(0, 1), rtol=4 * BF16_EPS, atol=3e-2)
    torch.testing.assert_close(k_out.float(), k_ref[0].transpose(0, 1), rtol=4 * BF16_EPS, atol=3e-2)
    # (b) vs HF run end-to-end in bf16 (cos/sin and products rounded to bf16): a few roundings
    cos, sin = hf(qh, pos.unsqueeze(0))
    q_bf, k_bf = apply_rotary_pos_emb(qh, kh, cos, sin)
    for ours, theirs in ((q_out, q_bf), (k_out, k_bf), (q32, q_bf), (k32, k_bf)):
        torch.testing.assert_close(ours, theirs[0].transpose(0, 1), rtol=4 * BF16_EPS, atol=3e-2)
    # HF's bf16 run rounds cos/sin as the bf16 table does: closer to it than the fp32 table is
    assert (q_out.float() - q_bf[0].transpose(0, 1).float()).abs().mean() <= \
        (q32.float() - q_bf[0].transpose(0, 1).float()).abs().mean()


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "llama3", "longrope", "su"])
def test_rope_rejects_unknown_type(rope_type):
    with pytest.raises(ValueError, match=f"rope_type '{rope_type}' is not supported.*'yarn'"):
        rope_cos_sin_cache(128, 16, 1e6, {"rope_type": rope_type, "factor": 2.0})
    with pytest.raises(ValueError, match="is not supported"):  # legacy key "type"
        ops.rope_cos_sin_cache(128, 16, 1e6, {"type": rope_type, "factor": 2.0})


# ============================================================================================
# SwiGLU and the dense MLP vs Qwen3MLP
# ============================================================================================

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_vs_formula(dtype):
    x = (torch.randn(11, 2 * 96) * 4).to(dtype)
    y = cpu.swiglu(x)
    assert y.shape == (11, 96) and y.dtype == dtype
    xf = x.float()
    ref = F.silu(xf[:, :96]) * xf[:, 96:]
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)  # same formula in fp32
    else:  # fp32 maths, one rounding to bf16
        torch.testing.assert_close(y.float(), ref, rtol=BF16_EPS, atol=1e-6)


def test_mlp_vs_hf_qwen3mlp():
    h, inter = 64, 96
    cfg = Qwen3Config(hidden_size=h, intermediate_size=inter, hidden_act="silu", num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)
    mlp = Qwen3MLP(cfg)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(13, h)
    w13 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).t().detach()  # [H, 2I]
    y = cpu.swiglu(x @ w13) @ mlp.down_proj.weight.t().detach()
    with torch.no_grad():
        ref = mlp(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)  # fp32, GEMM summation order only


# ============================================================================================
# MoE chain vs Qwen3MoeSparseMoeBlock
# ============================================================================================

def _moe_block(h, inter, e, k, norm):
    cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=inter, num_experts=e, num_experts_per_tok=k,
                         norm_topk_prob=norm, hidden_act="silu", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16)
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(std=0.2)  # [E, 2I, H]
        block.experts.down_proj.normal_(std=0.2)     # [E, H, I]
        block.gate.weight.normal_(std=1.0)           # [E, H]
    return block


def _moe_ours(block, x, k, norm):
    e = block.gate.weight.shape[0]
    logits = x @ block.gate.weight.detach().t()
    weights, ids = cpu.moe_gating_topk(logits, k, renormalize=norm)
    sorted_x, pairs, counts = cpu.moe_route(x, ids, e)
    w13 = block.experts.gate_up_proj.detach().transpose(1, 2)  # [E, H, 2I], gate then up
    w2 = block.experts.down_proj.detach().transpose(1, 2)      # [E, I, H]
    hmid = cpu.swiglu(cpu.grouped_matmul(sorted_x, w13, counts))
    out = cpu.grouped_matmul(hmid, w2, counts)
    return cpu.moe_combine(out, pairs, weights), counts


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("t,e,k", [(64, 8, 2), (37, 16, 8), (2, 16, 4), (1, 8, 1)])
def test_moe_chain_vs_hf_sparse_moe_block(norm, t, e, k):
    h, inter = 32, 24
    block = _moe_block(h, inter, e, k, norm)
    x = torch.randn(t, h)
    y, counts = _moe_ours(block, x, k, norm)
    with torch.no_grad():
        ref = block(x.unsqueeze(0))[0]
    if t * k < e:
        assert (counts == 0).any()  # this case exercises experts that receive no token
    # fp32 throughout; differences are only GEMM / top-k sum ordering
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_moe_gating_matches_hf_router():
    block = _moe_block(32, 24, 16, 4, True)
    x = torch.randn(20, 32)
    with torch.no_grad():
        _, hf_w, hf_ids = block.gate(x)
    w, ids = cpu.moe_gating_topk(x @ block.gate.weight.detach().t(), 4, renormalize=True)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long(), hf_ids)
    torch.testing.assert_close(w, hf_w, rtol=1e-6, atol=1e-7)  # identical fp32 softmax/top-k


def test_moe_gating_ties_lower_expert_first():
    """Documented contract: equal probabilities are ordered by lower expert id first."""
    logits = torch.zeros(3, 16)
    logits[1, 5:] = 1.0          # experts 5..15 tie for first place
    logits[2, 8:] = 1.0
    logits[2, 3] = 2.0           # expert 3 first, then the tie 8..15
    w, ids = cpu.moe_gating_topk(logits, 4, renormalize=False)
    assert ids.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8], [3, 8, 9, 10]]
    assert (w[:, :-1] >= w[:, 1:]).all()  # rows sorted by descending weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,e,k", [(0, 8, 2), (1, 128, 8), (57, 128, 8), (9, 16, 16)])
def test_moe_gating_equals_a_stable_descending_sort(dtype, t, e, k):
    """The selection (top-k on distinct integer keys) is exactly a stable descending sort of the
    fp32 probabilities, cut at k: logits on a coarse grid make many ties; -inf gives zeros."""
    logits = (torch.randn(t, e) * 2).round().to(dtype)
    if t:
        logits[0, : e // 2] = float("-inf")
    w, ids = cpu.moe_gating_topk(logits, k, renormalize=False)
    probs = torch.softmax(logits.float(), dim=-1)
    sw, sids = torch.sort(probs, dim=-1, descending=True, stable=True)
    assert torch.equal(ids.long(), sids[:, :k])
    assert torch.equal(w, sw[:, :k].to(dtype))


def test_moe_gating_refuses_more_experts_than_its_keys_hold():
    with pytest.raises(ValueError, match="experts"):
        cpu.moe_gating_topk(torch.zeros(1, (1 << 16) + 1), 2, renormalize=False)


# ============================================================================================
# moe_route / moe_combine invariants
# ============================================================================================

@pytest.mark.parametrize("t,e,k", [(10, 8, 2), (3, 16, 4), (50, 4, 4), (0, 8, 2)])
def test_moe_route_combine_invariants(t, e, k):
    hd = 6
    x = torch.randn(t, hd)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32) if t else \
        torch.zeros(0, k, dtype=torch.int32)
    weights = torch.rand(t, k)
    sorted_x, rows, counts = cpu.moe_route(x, ids, e)
    assert sorted_x.shape == (t * k, hd) and rows.dtype == torch.int32 and counts.dtype == torch.int64
    # rows is a permutation of the sorted rows: pairs[i] (the pair in sorted row i) inverts it
    assert torch.equal(torch.sort(rows.long()).values, torch.arange(t * k))
    pairs = torch.empty(t * k, dtype=torch.int64)
    pairs[rows.long()] = torch.arange(t * k)
    # tokens_per_expert sums to T*k and is the histogram of expert ids (zeros allowed)
    assert int(counts.sum()) == t * k
    assert torch.equal(counts, torch.bincount(ids.reshape(-1).long(), minlength=e))
    # rows grouped by expert in ascending id; stable: pair indices increase within a group
    flat = ids.reshape(-1).long()
    sorted_ids = flat[pairs.long()]
    assert torch.equal(sorted_ids, torch.sort(flat).values)
    for ex in range(e):
        grp = pairs[sorted_ids == ex]
        assert torch.equal(grp, torch.sort(grp).values)
    assert torch.equal(sorted_x, x[pairs.long() // k])  # sorted_x[i] = x[pair // k]
    # combine(all-ones expert outputs) = per-token sum of the weights
    ones = cpu.moe_combine(torch.ones(t * k, hd), rows, weights)
    torch.testing.assert_close(ones, weights.sum(-1, keepdim=True).expand(t, hd), rtol=1e-6, atol=1e-6)
    # combine(route(x)) with identity experts = x * sum of weights
    back = cpu.moe_combine(sorted_x, rows, weights)
    torch.testing.assert_close(back, x * weights.sum(-1, keepdim=True), rtol=1e-6, atol=1e-6)


def test_moe_route_zero_token_experts():
    ids = torch.tensor([[1, 3], [3, 1], [1, 6]], dtype=torch.int64)
    _, _, counts = cpu.moe_route(torch.randn(3, 4), ids, 8)
    assert counts.tolist() == [0, 3, 0, 2, 0, 0, 1, 0]


@pytest.mark.parametrize("bad", [8, -1, 100])
def test_moe_route_invalid_expert_raises(bad):
    ids = torch.tensor([[0, 1], [2, bad]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 8\)"):
        cpu.moe_route(torch.randn(2, 4), ids, 8)


def test_grouped_matmul_vs_per_group_and_bad_sizes():
    sizes = torch.tensor([3, 0, 5, 0, 2])
    x = torch.randn(10, 7)
    w = torch.randn(5, 7, 4)
    out = cpu.grouped_matmul(x, w, sizes)
    starts = [0, 3, 3, 8, 8, 10]
    for g in range(5):
        # fp32, same GEMM per group
        torch.testing.assert_close(out[starts[g]:starts[g + 1]], x[starts[g]:starts[g + 1]] @ w[g],
                                   rtol=1e-6, atol=1e-6)
    # groups covering fewer rows than x has (expert parallel): the rest is not computed
    part = cpu.grouped_matmul(x, w, torch.tensor([3, 0, 4, 0, 2]))
    torch.testing.assert_close(part[:9], torch.cat([x[:3] @ w[0], x[3:7] @ w[2], x[7:9] @ w[4]]),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="group sizes sum to 11, x has only 10"):
        cpu.grouped_matmul(x, w, torch.tensor([3, 0, 6, 0, 2]))


# ============================================================================================
# int8 quantisation and GEMMs
# ============================================================================================

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_quant(dtype):
    x = torch.randn(9, 300) * torch.logspace(-3, 3, 9).unsqueeze(1)
    x[4] = 0.0  # an all-zero row
    x = x.to(dtype)
    xq, scale = cpu.dynamic_quant(x)
    assert xq.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (9,)
    xf = x.float()
    # scale = rowmax|x| / 127, the same fp32 division: exact
    assert torch.equal(scale, xf.abs().max(dim=1).values / 127.0)
    assert scale[4] == 0 and not xq[4].any()
    nz = scale > 0
    # the row maximum maps to +-127
    assert (xq[nz].abs().amax(dim=1) == 127).all()
    # dequantisation error at most half a quantisation step (slack: one fp32 rounding of x/scale)
    err = (xq.float() * scale.unsqueeze(1) - xf).abs()
    assert (err <= scale.unsqueeze(1) * (0.5 + 1e-5)).all()


def test_static_quant_exact_grid_and_clamp():
    # scale a power of two so x / scale is exact; x on a quarter-step grid including .5 ties
    scale = torch.tensor([0.0625])
    steps = torch.arange(-800, 801, dtype=torch.float32) / 4  # -200 .. 200 in quarter steps
    x = steps * 0.0625
    for offset in (torch.tensor([0], dtype=torch.int8), torch.tensor([7], dtype=torch.int8),
                   torch.tensor([-3.0])):
        xq = cpu.static_quant(x, scale, offset)
        off = float(offset.item())
        # Python's round() is round-half-to-even, as the NPU quantiser
        expected = [max(-128, min(127, round(s + off))) for s in steps.tolist()]
        assert xq.dtype == torch.int8 and xq.tolist() == expected
    assert xq.min() == -128 and xq.max() == 127  # clamping exercised at both ends


def test_static_quant_random_vs_float64():
    x = torch.randn(16, 64) * 3
    scale, offset = torch.tensor([0.0173]), torch.tensor([5], dtype=torch.int8)
    xq = cpu.static_quant(x.to(torch.bfloat16), scale, offset)
    ref = torch.round(x.to(torch.bfloat16).double() / 0.0173 + 5).clamp(-128, 127)
    diff = (xq.double() - ref).abs()
    # fp32 vs fp64 division can only flip a value sitting on a .5 boundary, by one step
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_fused_quantisers_vs_float64(dtype):
    """add_rms_norm_quant / add_rms_norm_dynamic_quant against the plain formula in float64:
    the norm of the exact sum x + residual, not rounded before it is quantised."""
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(33, 256, generator=g) * 2).to(dtype), torch.randn(33, 256, generator=g).to(dtype)
    w = (torch.rand(256, generator=g) + 0.5).to(dtype)
    s = x.double() + r.double()
    y = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    scale, offset = cpu.prepare_norm_quant(torch.tensor([0.0211]), torch.tensor([-4.0]), 256, dtype)
    xq, new_res = cpu.add_rms_norm_quant(x, r, w, 1e-6, scale, offset)
    assert torch.equal(new_res, cpu.add_rms_norm(x, r, w, 1e-6)[1])   # the same residual stream
    ref = torch.round(y / 0.0211 - 4).clamp(-128, 127)
    diff = (xq.double() - ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    xq, tscale, _ = cpu.add_rms_norm_dynamic_quant(x, r, w, 1e-6)
    torch.testing.assert_close(tscale.double(), y.abs().amax(-1) / 127, rtol=1e-6, atol=0)
    diff = (xq.double() - torch.round(y / (y.abs().amax(-1, keepdim=True) / 127))).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def _int64_acc(xq, wq):
    return torch.matmul(xq.to(torch.int64), wq.to(torch.int64))


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (16, 64, 32), (33, 1000, 17), (0, 8, 4)])
def test_int8_matmul_bit_exact(m, k, n):
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    acc = cpu.int8_matmul(xq, wq)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc.to(torch.int64), _int64_acc(xq, wq))  # integer maths: bit-exact


def test_int8_matmul_extreme_no_overflow():
    k = 4096  # 4096 * 128 * 128 = 2**26: needs int32 accumulation, overflows int8/int16
    xq = torch.full((2, k), -128, dtype=torch.int8)
    wq = torch.full((k, 3), -128, dtype=torch.int8)
    wq[:, 1] = 127
    acc = cpu.int8_matmul(xq, wq)
    assert torch.equal(acc.to(torch.int64), _int64_acc(xq, wq))
    assert acc[0, 0] == 2 ** 26


def test_linear_prepared_and_plain_give_one_product_on_any_isa():
    """``linear`` on ``prepare_linear_weight``'s weight equals F.linear on the plain weight: at
    the native ISA (oneDNN's prepacked layout) and capped to AVX2, where oneDNN refuses to
    prepack bf16 and the plain weight is kept (each level in a process of its own)."""
    import subprocess
    import sys

    code = (
        "import torch, ops.cpu as c\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    w = torch.randn(96, 64, generator=g).to(dt); x = torch.randn(5, 64, generator=g).to(dt)\n"
        "    p = c.prepare_linear_weight(w)\n"
        "    y, ref = c.linear(x, p), torch.nn.functional.linear(x, w)\n"
        "    print(str(dt), p.is_mkldnn, float((y.float() - ref.float()).abs().max()))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for caps in ({}, {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, **caps), cwd=root, timeout=300)
        assert out.returncode == 0, out.stderr
        for line in out.stdout.splitlines():
            dt, _packed, diff = line.split()
            assert float(diff) <= (1e-5 if dt == "torch.float32" else 1e-2), (caps, line)


def test_int8_matmul_exact_where_onednn_saturates():
    """Under oneDNN capped to AVX2 (no VNNI), torch._int_mm saturates int16 pair sums and is
    wrong for large products; the probe sees it and int8_matmul stays exact (run in a process of
    its own: the cap must be set before torch is imported)."""
    import subprocess
    import sys

    code = (
        "import torch, ops.cpu as c\n"
        "g = torch.Generator().manual_seed(0)\n"
        "a = torch.randint(-128, 128, (64, 512), dtype=torch.int8, generator=g)\n"
        "b = torch.randint(-128, 128, (512, 96), dtype=torch.int8, generator=g)\n"
        "ref = a.long() @ b.long()\n"
        "print(c.int_mm_is_exact(), torch.equal(torch._int_mm(a, b).long(), ref),"
        " torch.equal(c.int8_matmul(a, b).long(), ref))\n")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    probe, int_mm_exact, ours_exact = out.stdout.split()
    assert ours_exact == "True"
    assert probe == int_mm_exact, "the probe must predict torch._int_mm's behaviour"


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_pertoken", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_quant_matmul_vs_int64(with_bias, with_pertoken, out_dtype):
    m, k, n = 12, 96, 20
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    scale = torch.rand(n) * 1e-3 + 1e-4
    pts = torch.rand(m) * 0.05 + 0.01 if with_pertoken else None
    bias = torch.randint(-50000, 50000, (n,), dtype=torch.int32) if with_bias else None
    y = cpu.quant_matmul(xq, wq, scale, pertoken_scale=pts, bias=bias, output_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    acc = _int64_acc(xq, wq) + (bias.to(torch.int64) if with_bias else 0)
    ref = acc.double() * scale.double()
    if with_pertoken:
        ref = ref * pts.double().unsqueeze(1)
    # the int accumulator is exact; then two fp32 products (~1e-7 rel each), or a bf16 rounding
    tol = dict(rtol=1e-6, atol=0) if out_dtype == torch.float32 else dict(rtol=BF16_EPS, atol=0)
    torch.testing.assert_close(y.double(), ref, **tol)


def test_grouped_quant_matmul_vs_per_group():
    sizes = torch.tensor([4, 0, 1, 0, 0, 6], dtype=torch.int64)
    g, k, n = len(sizes), 40, 24
    m = int(sizes.sum())
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-128, 128, (g, k, n), dtype=torch.int8)
    scale = torch.rand(g, n) * 1e-3
    pts = torch.rand(m) * 0.1
    for dtype in (torch.float32, torch.bfloat16):
        out = cpu.grouped_quant_matmul(xq, wq, scale, pts, sizes, output_dtype=dtype)
        assert out.dtype == dtype and out.shape == (m, n)
        start = 0
        for gi, cnt in enumerate(sizes.tolist()):
            ref = cpu.quant_matmul(xq[start:start + cnt], wq[gi], scale[gi], pts[start:start + cnt],
                                   None, dtype)
            assert torch.equal(out[start:start + cnt], ref)  # same computation per group: bit-exact
            start += cnt
    part = cpu.grouped_quant_matmul(xq, wq, scale, pts, torch.tensor([4, 0, 1, 0, 0, 5]))
    assert torch.equal(part[:10], out[:10])          # the rows the groups cover
    with pytest.raises(ValueError, match="group sizes sum to 12, x has only 11"):
        cpu.grouped_quant_matmul(xq, wq, scale, pts, torch.tensor([4, 0, 1, 0, 0, 7]))



def test_empty_batch():
    """T == 0 (an idle step) gives empty results of the right shape (ops.npu does the same)."""
    e, k, hd = 8, 2, 6
    x = torch.zeros(0, hd)
    assert cpu.rms_norm(x, torch.ones(hd), 1e-6).shape == (0, hd)
    cos, sin = ops.rope_cos_sin(ops.rope_table(rope_cos_sin_cache(16, 8, 1e6), torch.float32),
                                torch.zeros(0, dtype=torch.long))
    q, kk = cpu.rotary_embedding(torch.zeros(0, 4, 16), torch.zeros(0, 2, 16), cos, sin)
    assert q.shape == (0, 4, 16) and kk.shape == (0, 2, 16)
    w, ids = cpu.moe_gating_topk(torch.zeros(0, e), k, renormalize=True)
    assert w.shape == ids.shape == (0, k)
    sx, pairs, counts = cpu.moe_route(x, ids, e)
    assert sx.shape == (0, hd) and not counts.any()
    h = cpu.grouped_matmul(sx, torch.randn(e, hd, 2 * 5), counts)
    assert cpu.moe_combine(cpu.swiglu(h), pairs, w).shape == (0, 5)
    xq, scale = cpu.dynamic_quant(x)
    assert xq.shape == (0, hd) and scale.shape == (0,)
    assert cpu.quant_matmul(xq, torch.zeros(hd, 3, dtype=torch.int8), torch.ones(3), scale).shape == (0, 3)
