"""Contract tests of the NPU backend (``ops.npu``) against the CPU specification (``ops.cpu``).

Tiers 2 and 3 of the README's three tiers. Every test takes the ``be`` fixture, which has two parameters:
  * ``emulated`` (runs here): ``ops.npu`` is imported against the test-only torch_npu emulator
    (``tests/npu_emulator``), so the backend's marshalling (dtypes, layouts, index conventions,
    argument names) runs on CPU tensors through kernels that enforce the documented contracts,
    and the call log proves which torch_npu kernels the backend used;
  * ``device`` (``@pytest.mark.npu``, deselected here by pytest.ini): the same checks with the
    real torch_npu on an Ascend device, inputs moved to ``npu``, results compared on the CPU.
    torch_npu is only imported inside that fixture.

Tolerances (stated per comparison, see ``TOL``): fp32 1e-5 relative (accumulation order only);
fp16 2e-3 and bf16 1.6e-2 relative+absolute (one or two roundings to the output dtype: the
kernels round once from fp32, the CPU reference sometimes twice); int8 outputs, int32
accumulators, indices, counts and KV-cache copies are compared bit-exactly.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from types import SimpleNamespace

import pytest
import torch

import ops
from ops import cpu
from ops.rope import rope_cos_sin_cache
from tests import npu_emulator
from tests.npu_emulator import NpuEmulatorError

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ============================================================================================
# backends: emulated torch_npu (tier 2) and real device (tier 3)
# ============================================================================================

class Backend:
    """ops.npu bound to a torch_npu (emulated or real) plus helpers to move data and check the
    kernels that ran."""

    def __init__(self, kind: str, npu_ops, calls=None, device: str = "cpu"):
        self.kind, self.npu, self.calls, self.device = kind, npu_ops, calls, device

    @property
    def emulated(self) -> bool:
        return self.kind == "emulated"

    def dev(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj.to(self.device)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.dev(o) for o in obj)
        return obj

    def host(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj.cpu()
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.host(o) for o in obj)
        return obj

    @contextlib.contextmanager
    def expect(self, *kernels: str):
        """Assert that each named torch_npu kernel ran at least once inside the block."""
        if not self.emulated:
            yield
            return
        before = {k: self.calls.count(k) for k in kernels}
        yield
        missing = [k for k in kernels if self.calls.count(k) <= before[k]]
        assert not missing, (f"ops.npu did not call torch_npu.{missing} (calls seen: "
                             f"{dict(self.calls.counts)}, rejected: {self.calls.rejected})")

    def run(self, op: str, *args, expect: tuple[str, ...] = (), **kwargs):
        """ops.npu.<op> on device copies of the arguments; results back on the CPU."""
        with self.expect(*expect):
            out = getattr(self.npu, op)(*self.dev(args), **{k: self.dev(v) for k, v in
                                                             kwargs.items()})
        return self.host(out)


@pytest.fixture(params=[pytest.param("emulated"),
                        pytest.param("device", marks=pytest.mark.npu)])
def be(request):
    if request.param == "emulated":
        with npu_emulator.installed() as emu:
            yield Backend("emulated", emu.npu_ops, emu.calls)
        return
    torch_npu = pytest.importorskip("torch_npu")  # tier 3: the real one, imported only here
    if getattr(torch_npu, "IS_NPU_EMULATOR", False):
        pytest.skip("sys.modules['torch_npu'] is the emulator")
    if not torch.npu.is_available():
        pytest.skip("torch_npu is installed but no NPU device is visible")
    npu_ops = sys.modules.get("ops.npu")
    if npu_ops is None or getattr(npu_ops.torch_npu, "IS_NPU_EMULATOR", False):
        sys.modules.pop("ops.npu", None)
        npu_ops = importlib.import_module("ops.npu")
    yield Backend("device", npu_ops, None, "npu")


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
          **override):
    """assert_close with the file's per-dtype tolerance (dtypes must match)."""
    tol = dict(TOL[dtype or expected.dtype])
    tol.update(override)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, **tol)


def exact(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert torch.equal(actual, expected), (actual != expected).nonzero()[:10]


FLOATS = [torch.float32, torch.bfloat16]
HALFS = [torch.bfloat16, torch.float16]


# ============================================================================================
# normalisation
# ============================================================================================

@pytest.mark.parametrize("dtype", FLOATS + [torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (300, 128), (3, 5, 128), (128,)])
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_rms_norm(be, dtype, shape, weight_fp32):
    x = torch.randn(shape, dtype=dtype) * 3
    w = (torch.rand(shape[-1]) + 0.5).to(torch.float32 if weight_fp32 else dtype)
    got = be.run("rms_norm", x, w, 1e-6, expect=("npu_rms_norm",))
    close(got, cpu.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", FLOATS + [torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (300, 128), (2, 7, 64)])
def test_add_rms_norm_fused(be, dtype, shape):
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(dtype)
    y, s = be.run("add_rms_norm", x, r, w, 1e-6, expect=("npu_add_rms_norm",))
    y_ref, s_ref = cpu.add_rms_norm(x, r, w, 1e-6)
    exact(s, s_ref)  # the new residual: one rounding of the exact sum on both sides
    close(y, y_ref, dtype)


def test_add_rms_norm_fp32_weight_and_empty(be):
    x, r = torch.randn(9, 64, dtype=torch.bfloat16), torch.randn(9, 64, dtype=torch.bfloat16)
    w = torch.rand(64) + 0.5
    y, s = be.run("add_rms_norm", x, r, w, 1e-6, expect=("npu_rms_norm",))
    y_ref, s_ref = cpu.add_rms_norm(x, r, w, 1e-6)
    exact(s, s_ref)
    close(y, y_ref, torch.bfloat16)
    e = torch.empty(0, 64, dtype=torch.bfloat16)
    y0, s0 = be.run("add_rms_norm", e, e, w.bfloat16(), 1e-6)
    assert y0.shape == (0, 64) and s0.shape == (0, 64)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,H", [(1, 16), (300, 8), (5, 4)])
def test_rms_norm_per_head(be, dtype, T, H):
    """QK-norm: rms_norm of [T, H, D] with one weight [D] for every head."""
    x = torch.randn(T, H, 128, dtype=dtype)
    w = (torch.rand(128) + 0.5).to(dtype)
    got = be.run("rms_norm", x, w, 1e-6, expect=("npu_rms_norm",))
    close(got, cpu.rms_norm(x, w, 1e-6), dtype)


# ============================================================================================
# rotary embedding, activation
# ============================================================================================

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,hq,hk,d", [(1, 16, 8, 128), (300, 8, 2, 128), (7, 4, 4, 64)])
@pytest.mark.parametrize("yarn", [False, True])
def test_rotary_embedding(be, dtype, T, hq, hk, d, yarn):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256} \
        if yarn else None
    table = ops.rope_table(rope_cos_sin_cache(d, 2048, 1_000_000.0, scaling), dtype)
    q, k = torch.randn(T, hq, d, dtype=dtype), torch.randn(T, hk, d, dtype=dtype)
    pos = torch.randint(0, 2048, (T,))
    cos, sin = ops.rope_cos_sin(table, pos)
    qr, kr = cpu.rotary_embedding(q, k, cos, sin)
    qo, ko = be.run("rotary_embedding", q, k, cos, sin, expect=("npu_apply_rotary_pos_emb",))
    close(qo, qr, dtype)
    close(ko, kr, dtype)
    # one kernel: the rotation lands in q and k themselves (the graph passes tensors it owns)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()


def test_rotary_embedding_rejects_head_dim_96(be):
    cos, sin = ops.rope_cos_sin(ops.rope_table(rope_cos_sin_cache(96, 64, 10000.0), torch.float32),
                                torch.arange(3))
    q, k = torch.randn(3, 2, 96), torch.randn(3, 2, 96)
    with pytest.raises(ValueError, match="head_dim"):
        be.run("rotary_embedding", q, k, cos, sin)


@pytest.mark.parametrize("dtype", FLOATS + [torch.float16])
@pytest.mark.parametrize("shape", [(1, 128), (300, 192), (2, 3, 256), (0, 64)])
def test_swiglu(be, dtype, shape):
    x = torch.randn(shape, dtype=dtype) * 2
    got = be.run("swiglu", x, expect=("npu_swiglu",) if x.numel() else ())
    close(got, cpu.swiglu(x), dtype)


# ============================================================================================
# paged KV cache write and paged attention
# ============================================================================================

@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("T,hkv,bs", [(1, 8, 128), (300, 4, 128), (37, 1, 16)])
@pytest.mark.parametrize("skip", [False, True])
def test_write_kv_cache(be, dtype, T, hkv, bs, skip):
    nb, d = 5 + T // bs, 128
    kc = torch.randn(nb, bs, hkv, d).to(dtype)
    vc = torch.randn(nb, bs, hkv, d).to(dtype)
    slots = torch.randperm(nb * bs)[:T]
    if skip:
        slots[::3] = -1  # padding tokens
    key, value = torch.randn(T, hkv, d, dtype=dtype), torch.randn(T, hkv, d, dtype=dtype)
    kc_dev, vc_dev = be.dev(kc.clone()), be.dev(vc.clone())
    with be.expect(*(("_npu_reshape_and_cache",) if bool((slots >= 0).any()) else ())):
        be.npu.write_kv_cache(be.dev(key), be.dev(value), kc_dev, vc_dev, be.dev(slots))
    cpu.write_kv_cache(key, value, kc, vc, slots)
    exact(be.host(kc_dev), kc)
    exact(be.host(vc_dev), vc)


def test_write_kv_cache_all_skipped_and_fp32(be):
    kc, vc = torch.zeros(2, 128, 1, 128, dtype=torch.bfloat16), torch.zeros(2, 128, 1, 128,
                                                                               dtype=torch.bfloat16)
    kv = torch.randn(3, 1, 128, dtype=torch.bfloat16)
    kc_dev, vc_dev = be.dev(kc), be.dev(vc)
    be.npu.write_kv_cache(be.dev(kv), be.dev(kv), kc_dev, vc_dev,
                          be.dev(torch.full((3,), -1, dtype=torch.int32)))
    assert not be.host(kc_dev).any() and not be.host(vc_dev).any()
    # fp32 caches: the NPU kernel supports fp16/bf16/int8 only -> a clear error, not a wrong write
    f32 = torch.zeros(2, 128, 1, 128)
    with pytest.raises(ValueError, match="float16/bfloat16/int8"):
        be.npu.write_kv_cache(be.dev(kv.float()), be.dev(kv.float()), be.dev(f32),
                              be.dev(f32.clone()), be.dev(torch.arange(3)))


def _paged_batch(reqs, hq, hkv, d=128, bs=128, dtype=torch.bfloat16, pad_rows=0, spare=3):
    """reqs: (cached_prefix, query_len). Caches hold every key of every request in shuffled,
    non-contiguous blocks; slots owned by nobody hold 1e4 (finite, as a cache's stale slots are:
    any weight given to them, or any of them read as a key, spoils the output)."""
    lens = [c + q for c, q in reqs]
    nblk = [max(1, math.ceil(L / bs)) for L in lens]
    total = sum(nblk) + spare
    perm = torch.randperm(total)
    width = max(nblk) + 2
    tables = torch.randint(0, total, (len(reqs), width), dtype=torch.int32)
    kc = torch.full((total, bs, hkv, d), 1e4, dtype=dtype)
    vc = torch.full((total, bs, hkv, d), 1e4, dtype=dtype)
    used = 0
    for r, L in enumerate(lens):
        ids = perm[used:used + nblk[r]]
        used += nblk[r]
        tables[r, :nblk[r]] = ids.to(torch.int32)
        flat_k = torch.randn(nblk[r] * bs, hkv, d).to(dtype)
        flat_v = torch.randn(nblk[r] * bs, hkv, d).to(dtype)
        flat_k[L:] = 1e4
        flat_v[L:] = 1e4
        kc[ids] = flat_k.view(nblk[r], bs, hkv, d)
        vc[ids] = flat_v.view(nblk[r], bs, hkv, d)
    qsl = torch.tensor([0] + list(torch.tensor([q for _, q in reqs]).cumsum(0)), dtype=torch.int32)
    T = int(qsl[-1]) + pad_rows
    query = torch.randn(T, hq, d).to(dtype)
    return query, kc, vc, tables, qsl, torch.tensor(lens, dtype=torch.int32)


PAGED_BATCHES = {
    "decode1": [(0, 1)],
    "prefill300": [(0, 300)],
    "mixed": [(200, 1), (0, 300), (130, 70), (0, 1), (127, 1), (0, 129)],
    "chunked": [(256, 44), (383, 1), (0, 5)],
}


@pytest.mark.parametrize("batch", sorted(PAGED_BATCHES))
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 4), (8, 2), (16, 2)])
def test_paged_attention(be, batch, hq, hkv):
    reqs = PAGED_BATCHES[batch]
    q, kc, vc, bt, qsl, lens = _paged_batch(reqs, hq, hkv)
    scale = 128 ** -0.5
    got = be.run("paged_attention", q, kc, vc, bt, qsl, lens, scale,
                 query_start_loc_host=qsl.tolist(), seq_lens_host=lens.tolist(),
                 expect=("npu_fused_infer_attention_score",))
    ref = cpu.paged_attention(q, kc, vc, bt, qsl, lens, scale)
    close(got, ref, torch.bfloat16)


def test_paged_attention_padding_rows_and_gqa8(be):
    reqs = [(140, 1), (0, 77)]
    q, kc, vc, bt, qsl, lens = _paged_batch(reqs, 32, 4, pad_rows=5)
    got = be.run("paged_attention", q, kc, vc, bt, qsl, lens, 0.0883,
                 query_start_loc_host=qsl.tolist(), seq_lens_host=lens.tolist(),
                 expect=("npu_fused_infer_attention_score",))
    n = int(qsl[-1])
    close(got[:n], cpu.paged_attention(q, kc, vc, bt, qsl, lens, 0.0883)[:n], torch.bfloat16)


def test_paged_attention_accepts_padding_requests(be):
    """vllm-ascend's graph padding: decode dummies (q 1, seq_len 0) and a mixed-batch dummy
    (q = the padding, seq_len 1) go to the kernel, which zeroes what sees no key, as ops.cpu."""
    reqs = [(140, 1), (0, 77)]
    q, kc, vc, bt, qsl, lens = _paged_batch(reqs, 8, 2, pad_rows=7)
    n = int(qsl[-1])
    qsl2 = torch.tensor(qsl.tolist() + [n + 1, n + 2, n + 7], dtype=torch.int32)
    lens2 = torch.tensor(lens.tolist() + [0, 0, 1], dtype=torch.int32)
    bt2 = torch.cat([bt, torch.zeros(3, bt.shape[1], dtype=bt.dtype)])
    got = be.run("paged_attention", q, kc, vc, bt2, qsl2, lens2, 0.0883,
                 query_start_loc_host=qsl2.tolist(), seq_lens_host=lens2.tolist(),
                 expect=("npu_fused_infer_attention_score",))
    ref = cpu.paged_attention(q, kc, vc, bt2, qsl2, lens2, 0.0883)
    assert torch.equal(got[n:n + 6], torch.zeros_like(got[n:n + 6]))
    close(got, ref, torch.bfloat16)


def test_paged_attention_takes_host_lengths_and_no_device_copy(be):
    """The kernel's lengths come from the host lists (never from the device tensors): without
    them the op refuses, and with lists that disagree with the tensors the lists win."""
    q, kc, vc, bt, qsl, lens = _paged_batch([(30, 2), (5, 1)], 8, 8)
    with pytest.raises(ValueError, match="query_start_loc_host and seq_lens_host"):
        be.run("paged_attention", q, kc, vc, bt, qsl, lens, 0.1)
    with pytest.raises(ValueError, match="host lists of 3 query starts"):
        be.run("paged_attention", q, kc, vc, bt, qsl, lens, 0.1, query_start_loc_host=[0, 2],
               seq_lens_host=lens.tolist())
    zeros = torch.zeros_like(qsl)       # device tensors that are never read
    got = be.run("paged_attention", q, kc, vc, bt, zeros, zeros[:2], 0.1,
                 query_start_loc_host=qsl.tolist(), seq_lens_host=lens.tolist())
    close(got, cpu.paged_attention(q, kc, vc, bt, qsl, lens, 0.1), torch.bfloat16)


def test_paged_attention_requires_bf16_and_block_128(be):
    q, kc, vc, bt, qsl, lens = _paged_batch([(3, 2)], 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="bfloat16"):
        be.run("paged_attention", q, kc, vc, bt, qsl, lens, 0.1)
    q, kc, vc, bt, qsl, lens = _paged_batch([(3, 2)], 8, 8, bs=16)
    with pytest.raises(ValueError, match="block_size"):
        be.run("paged_attention", q, kc, vc, bt, qsl, lens, 0.1)


# ============================================================================================
# int8 quantisation
# ============================================================================================

@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("M,K", [(1, 256), (300, 512), (7, 64)])
def test_dynamic_quant(be, dtype, M, K):
    x = (torch.randn(M, K) * torch.rand(M, 1) * 4).to(dtype)
    if M > 1:
        x[1] = 0  # an all-zero row
    xq, s = be.run("dynamic_quant", x, expect=("npu_dynamic_quant",))
    xq_ref, s_ref = cpu.dynamic_quant(x)
    exact(xq, xq_ref)
    close(s, s_ref, torch.float32, rtol=1e-6, atol=0)


def test_dynamic_quant_rejects_fp32(be):
    with pytest.raises(ValueError, match="float16/bfloat16"):
        be.run("dynamic_quant", torch.randn(3, 8))


@pytest.mark.parametrize("dtype", FLOATS + [torch.float16])
@pytest.mark.parametrize("offset", [torch.tensor([3], dtype=torch.int8), torch.tensor([-2.0])])
@pytest.mark.parametrize("shape", [(1, 128), (300, 64), (2, 5, 32)])
def test_static_quant(be, dtype, offset, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    scale = torch.tensor([0.037], dtype=dtype)
    got = be.run("static_quant", x, scale, offset, expect=("npu_quantize",))
    exact(got, cpu.static_quant(x, scale, offset))


@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("M,K", [(1, 128), (300, 64), (0, 64)])
def test_add_rms_norm_quant(be, dtype, M, K):
    """One kernel for residual add, RMSNorm and the static quantiser; the scale stored in the
    model dtype (as msModelSlim stores it) makes the quantised values exact."""
    x, r = torch.randn(M, K, dtype=dtype), torch.randn(M, K, dtype=dtype)
    w = (torch.rand(K) + 0.5).to(dtype)
    scale = torch.tensor([0.021], dtype=dtype).float()
    offset = torch.tensor([3.0])
    n_scale, n_offset = be.npu.prepare_norm_quant(be.dev(scale), be.dev(offset), K, dtype)
    with be.expect(*(("npu_add_rms_norm_quant",) if M else ())):
        xq, s = (be.host(t) for t in be.npu.add_rms_norm_quant(be.dev(x), be.dev(r), be.dev(w),
                                                                1e-6, n_scale, n_offset))
    c_scale, c_offset = cpu.prepare_norm_quant(scale, offset, K, dtype)
    xq_ref, s_ref = cpu.add_rms_norm_quant(x, r, w, 1e-6, c_scale, c_offset)
    exact(s, s_ref)
    # the norm's fp32 value may land on the other side of a rounding boundary: +-1, rarely
    if M:
        assert (xq.int() - xq_ref.int()).abs().max() <= 1
        assert (xq != xq_ref).float().mean() < 0.01


@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("M,K", [(1, 128), (300, 64), (0, 64)])
def test_add_rms_norm_dynamic_quant(be, dtype, M, K):
    x, r = torch.randn(M, K, dtype=dtype), torch.randn(M, K, dtype=dtype)
    w = (torch.rand(K) + 0.5).to(dtype)
    with be.expect(*(("npu_add_rms_norm_dynamic_quant",) if M else ())):
        xq, scale, s = (be.host(t) for t in be.npu.add_rms_norm_dynamic_quant(
            be.dev(x), be.dev(r), be.dev(w), 1e-6))
    xq_ref, scale_ref, s_ref = cpu.add_rms_norm_dynamic_quant(x, r, w, 1e-6)
    exact(s, s_ref)
    close(scale, scale_ref, torch.float32, rtol=1e-5, atol=0)
    if M:
        assert (xq.int() - xq_ref.int()).abs().max() <= 1


def _int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("M,K,N", [(1, 256, 384), (300, 512, 128), (5, 64, 64), (0, 64, 32)])
@pytest.mark.parametrize("prepared", [False, True])
def test_int8_matmul(be, M, K, N, prepared):
    xq, wq = _int8(M, K), _int8(K, N)
    w_arg = be.npu.prepare_weight(be.dev(wq)) if prepared else be.dev(wq)
    with be.expect(*(("npu_quant_matmul",) if M else ())):
        got = be.host(be.npu.int8_matmul(be.dev(xq), w_arg))
    exact(got, cpu.int8_matmul(xq, wq))


@pytest.mark.parametrize("out_dtype", HALFS)
@pytest.mark.parametrize("pertoken", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M", [1, 300])
def test_quant_matmul(be, out_dtype, pertoken, bias, M):
    K, N = 256, 192
    xq, wq = _int8(M, K), _int8(K, N)
    scale = torch.rand(N) * 1e-3 + 1e-4
    pts = torch.rand(M) * 0.02 + 1e-3 if pertoken else None
    b = torch.randint(-5000, 5000, (N,), dtype=torch.int32) if bias else None
    kernels = ("npu_quant_matmul",)
    if out_dtype == torch.float16 and not pertoken:
        kernels += ("npu_trans_quant_param",)
    got = be.run("quant_matmul", xq, be.npu.prepare_weight(be.dev(wq)), scale, pts, b,
                 out_dtype, expect=kernels)
    ref = cpu.quant_matmul(xq, wq, scale, pts, b, out_dtype)
    # fp16 without per-token scale: the int64 (FP19) scale keeps 10 mantissa bits (2^-10)
    tol = dict(rtol=4e-3, atol=1e-3) if out_dtype == torch.float16 and not pertoken else {}
    close(got, ref, out_dtype, **tol)


def test_quant_matmul_rejects_fp32_output(be):
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        be.run("quant_matmul", _int8(2, 16), _int8(16, 8), torch.rand(8), None, None,
               torch.float32)


# ============================================================================================
# mixture of experts
# ============================================================================================

def _distinct_logits(T, E, dtype):
    """Router logits without ties (tie order is not documented for the NPU kernel)."""
    return torch.stack([torch.randperm(E).float() * 0.05 for _ in range(T)]).to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (300, 128, 8), (9, 16, 2), (4, 8, 1)])
@pytest.mark.parametrize("renorm", [True, False])
def test_moe_gating_topk(be, dtype, T, E, k, renorm):
    logits = _distinct_logits(T, E, dtype)
    w, ids = be.run("moe_gating_topk", logits, k, renorm, expect=("npu_moe_gating_top_k_softmax",))
    w_ref, ids_ref = cpu.moe_gating_topk(logits, k, renorm)
    exact(ids, ids_ref)
    assert w.dtype == w_ref.dtype == dtype       # the weights stay in the logits' dtype
    if dtype == torch.float32:
        close(w, w_ref, torch.float32, rtol=1e-6, atol=1e-7)
    else:   # the kernel rounds the top-k probabilities, the renormalisation two more times
        close(w, w_ref, dtype, rtol=2e-2, atol=0)


def _route_inputs(T, E, k, dtype, hidden=64, idle=(3, 5)):
    """Expert ids avoid the experts in ``idle`` (they receive zero tokens)."""
    live = torch.tensor([e for e in range(E) if e not in idle])
    ids = torch.stack([live[torch.randperm(len(live))[:k]] for _ in range(T)]).to(torch.int32)
    return torch.randn(T, hidden).to(dtype), ids


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,E,k", [(1, 16, 2), (5, 16, 4), (300, 128, 8), (600, 8, 4)])
def test_moe_route(be, dtype, T, E, k):
    x, ids = _route_inputs(T, E, k, dtype)
    sx, rows, counts = be.run("moe_route", x, ids, E, expect=("npu_moe_init_routing_v2",))
    # the specification itself, independent of ops.cpu's implementation: pairs p = t*k + j
    # stably sorted by expert id; rows[p] is the sorted row of pair p
    order = torch.sort(ids.reshape(-1).long(), stable=True).indices
    exact(rows[order], torch.arange(T * k, dtype=torch.int32))
    exact(sx, x[order // k])
    exact(counts, torch.bincount(ids.reshape(-1).long(), minlength=E))
    assert counts[3] == 0 and counts[5] == 0
    sx_ref, rows_ref, counts_ref = cpu.moe_route(x, ids, E)
    exact(rows, rows_ref)
    exact(sx, sx_ref)
    exact(counts, counts_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E,k", [(1, 16, 2), (5, 16, 4), (300, 128, 8)])
def test_moe_route_quant(be, dtype, T, E, k):
    """Routing with the fused dynamic quant equals moe_route then dynamic_quant (bit-exact)."""
    x, ids = _route_inputs(T, E, k, dtype)
    xq, pairs, counts, scale = be.run("moe_route_quant", x, ids, E,
                                      expect=("npu_moe_init_routing_v2",))
    sx_ref, pairs_ref, counts_ref = cpu.moe_route(x, ids, E)
    xq_ref, scale_ref = cpu.dynamic_quant(sx_ref)
    exact(pairs, pairs_ref)
    exact(counts, counts_ref)
    exact(xq, xq_ref)
    exact(scale, scale_ref)
    assert xq.dtype == torch.int8 and counts[3] == 0


def test_moe_route_quant_rejects_fp32_and_handles_empty(be):
    x, ids = _route_inputs(4, 8, 2, torch.float32)
    if be.emulated:
        with pytest.raises(ValueError, match="float16/bfloat16"):
            be.npu.moe_route_quant(x, ids, 8)
    xq, pairs, counts, scale = be.run("moe_route_quant", x[:0].bfloat16(), ids[:0], 8)
    assert xq.shape == (0, 64) and xq.dtype == torch.int8 and pairs.numel() == 0
    exact(counts, torch.zeros(8, dtype=torch.int64))


@pytest.mark.parametrize("dtype,prepared", [
    (torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True),
    (torch.float32, True)])
@pytest.mark.parametrize("sizes", [[0, 5, 0, 17, 1, 0, 300, 2], [7], [0, 0, 3], [1, 1]])
def test_grouped_matmul(be, dtype, sizes, prepared):
    K, N = 64, 96
    M, G = sum(sizes), len(sizes)
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(G, K, N) * 0.1).to(dtype)
    gs = torch.tensor(sizes, dtype=torch.int64)
    w_arg = be.npu.prepare_weight(be.dev(w)) if prepared else be.dev(w)
    with be.expect("npu_grouped_matmul"):
        got = be.host(be.npu.grouped_matmul(be.dev(x), w_arg, be.dev(gs)))
    close(got, cpu.grouped_matmul(x, w, gs), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prepare_grouped_weight(be, dtype):
    """Both backends' prepared grouped weights multiply as the plain [G, K, N] weight does: the
    NPU's stays the ND tensor (exact), the CPU's may be oneDNN-prepacked per group (same
    products, fp32 accumulation in another order: within the bf16 / fp32 tolerance)."""
    sizes = torch.tensor([3, 0, 1, 9], dtype=torch.int64)
    x = torch.randn(int(sizes.sum()), 64).to(dtype)
    w = (torch.randn(4, 64, 48) * 0.1).to(dtype)
    p = be.npu.prepare_grouped_weight(be.dev(w))
    exact(be.host(p), w)
    with be.expect("npu_grouped_matmul"):
        got = be.host(be.npu.grouped_matmul(be.dev(x), p, be.dev(sizes)))
    close(got, cpu.grouped_matmul(x, w, sizes), dtype)
    close(cpu.grouped_matmul(x, cpu.prepare_grouped_weight(w), sizes),
          cpu.grouped_matmul(x, w, sizes), dtype)
    with pytest.raises(ValueError):
        be.npu.prepare_grouped_weight(be.dev(torch.randn(8, 8)))


def test_grouped_matmul_zero_rows(be):
    w = torch.randn(3, 16, 8)
    got = be.run("grouped_matmul", torch.randn(0, 16), w, torch.zeros(3, dtype=torch.int64))
    assert got.shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("count", [8, 3])          # 3 of 8: expert parallel
def test_moe_experts(be, dtype, count):
    """The routed float experts from the NPU's kernels (routing, two grouped GEMMs around
    SwiGLU, unpermute) against the specification, with and without other ranks' pairs."""
    T, E, k, H, inter = 9, 8, 2, 64, 48
    x = torch.randn(T, H).to(dtype)
    w13 = (torch.randn(count, H, 2 * inter) * 0.1).to(dtype)
    w2 = (torch.randn(count, inter, H) * 0.1).to(dtype)
    weights, ids = cpu.moe_gating_topk(torch.randn(T, E), k, True)
    ex = be.npu.prepare_moe_experts(be.dev(w13), be.dev(w2))
    with be.expect("npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_moe_token_unpermute"):
        got = be.host(be.npu.moe_experts(be.dev(x), be.dev(weights), be.dev(ids), ex, E))
    close(got, cpu.moe_experts(x, weights, ids, cpu.prepare_moe_experts(w13, w2), E), dtype)


@pytest.mark.parametrize("out_dtype", HALFS)
@pytest.mark.parametrize("sizes", [[0, 40, 3, 0, 257], [12], [1, 0]])
@pytest.mark.parametrize("prepared", [False, True])
def test_grouped_quant_matmul(be, out_dtype, sizes, prepared):
    K, N = 128, 64
    M, G = sum(sizes), len(sizes)
    xq, wq = _int8(M, K), _int8(G, K, N)
    # weight scales as msModelSlim stores them for a bf16 model (bf16 values)
    scale = (torch.rand(G, N) * 1e-3 + 1e-4).bfloat16().float()
    pts = torch.rand(M) * 0.02 + 1e-3
    gs = torch.tensor(sizes, dtype=torch.int64)
    w_arg = be.npu.prepare_weight(be.dev(wq)) if prepared else be.dev(wq)
    with be.expect("npu_grouped_matmul"):
        got = be.host(be.npu.grouped_quant_matmul(be.dev(xq), w_arg, be.dev(scale),
                                                   be.dev(pts), be.dev(gs), out_dtype))
    close(got, cpu.grouped_quant_matmul(xq, wq, scale, pts, gs, out_dtype), out_dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,E,k", [(1, 16, 2), (300, 128, 8), (6, 8, 1)])
def test_moe_combine(be, dtype, T, E, k):
    x, ids = _route_inputs(T, E, k, dtype)
    _, pairs, _ = cpu.moe_route(x, ids, E)
    expert_out = torch.randn(T * k, 48).to(dtype)
    weights = torch.rand(T, k)
    got = be.run("moe_combine", expert_out, pairs, weights, expect=("npu_moe_token_unpermute",))
    close(got, cpu.moe_combine(expert_out, pairs, weights), dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_moe_block_end_to_end(be, dtype):
    """router -> route -> expert FFN (grouped GEMMs + SwiGLU) -> combine, all on ops.npu."""
    T, E, k, H, I = 37, 16, 4, 64, 32
    x = torch.randn(T, H).to(dtype)
    logits = _distinct_logits(T, E, torch.float32)
    w13, w2 = (torch.randn(E, H, 2 * I) * 0.1).to(dtype), (torch.randn(E, I, H) * 0.1).to(dtype)

    def block(m, xx):
        w, ids = m.moe_gating_topk(logits if m is cpu else be.dev(logits), k, True)
        sx, pairs, counts = m.moe_route(xx, ids, E)
        h = m.grouped_matmul(sx, w13 if m is cpu else be.dev(w13), counts)
        y = m.grouped_matmul(m.swiglu(h), w2 if m is cpu else be.dev(w2), counts)
        return m.moe_combine(y, pairs, w)

    with be.expect("npu_moe_gating_top_k_softmax", "npu_moe_init_routing_v2",
                   "npu_grouped_matmul", "npu_swiglu", "npu_moe_token_unpermute"):
        got = be.host(block(be.npu, be.dev(x)))
    close(got, block(cpu, x), dtype, **({"rtol": 3e-2, "atol": 3e-2}
                                        if dtype == torch.bfloat16 else {}))


# ============================================================================================
# weight preparation
# ============================================================================================

@pytest.mark.parametrize("shape,dtype", [((64, 32), torch.int8), ((4, 64, 32), torch.int8),
                                          ((64, 32), torch.bfloat16)])
def test_prepare_weight(be, shape, dtype):
    w = torch.randn(shape).to(dtype)
    with be.expect("npu_format_cast"):
        p = be.npu.prepare_weight(be.dev(w))
    if be.emulated:
        assert be.npu.torch_npu.get_npu_format(p) == 29  # FRACTAL_NZ
    exact(be.host(p), cpu.prepare_weight(w))
    with pytest.raises(ValueError):
        be.npu.prepare_weight(be.dev(torch.randn(8)))


@pytest.mark.parametrize("out_dtype", HALFS)
def test_prepared_static_quant_gives_the_same_int8(be, out_dtype):
    """static_quant with prepare_static_quant's (scale, offset) equals the raw [1] form and
    ops.cpu, bit for bit; the prepared form needs no conversion per call."""
    K = 256
    x = (torch.randn(300, K) * 3).to(out_dtype)
    scale, offset = torch.tensor([0.0213]), torch.tensor([-7.0])
    p_scale, p_offset = be.npu.prepare_static_quant(be.dev(scale), be.dev(offset), K)
    assert p_scale.shape == (K,) and p_scale.dtype == torch.float32
    assert p_offset.shape == (K,) and p_offset.dtype == torch.int8
    prepared = be.run("static_quant", x, be.host(p_scale), be.host(p_offset), expect=("npu_quantize",))
    exact(prepared, be.run("static_quant", x, scale, offset))
    exact(prepared, cpu.static_quant(x, *cpu.prepare_static_quant(scale, offset, K)))
    exact(prepared, cpu.static_quant(x, scale, offset))


@pytest.mark.parametrize("out_dtype", HALFS)
@pytest.mark.parametrize("pertoken", [False, True])
def test_prepared_quant_scale_gives_the_same_matmul(be, out_dtype, pertoken):
    """quant_matmul with prepare_quant_scale's scale (fp32, or the FP19 int64 pack for fp16
    without per-token scales: npu_trans_quant_param runs once, at preparation) equals the raw
    fp32 scale."""
    M, K, N = 9, 128, 64
    xq, wq = _int8(M, K), _int8(K, N)
    scale = torch.rand(N) * 1e-3 + 1e-4
    pts = torch.rand(M) * 0.02 + 1e-3 if pertoken else None
    packs = out_dtype == torch.float16 and not pertoken
    with be.expect(*(("npu_trans_quant_param",) if packs else ())):
        prep = be.npu.prepare_quant_scale(be.dev(scale), out_dtype, pertoken)
    assert prep.dtype == (torch.int64 if packs else torch.float32)
    w = be.npu.prepare_weight(be.dev(wq))
    with be.expect("npu_quant_matmul"):
        got = be.host(be.npu.quant_matmul(be.dev(xq), w, prep, be.dev(pts) if pertoken else None,
                                          None, out_dtype))
    exact(got, be.run("quant_matmul", xq, w, scale, pts, None, out_dtype))
    exact(cpu.prepare_quant_scale(scale, out_dtype, pertoken), scale)
    if packs:
        with pytest.raises(ValueError, match="int64"):
            be.npu.quant_matmul(be.dev(xq), w, prep, be.dev(torch.rand(M)), None, out_dtype)


@pytest.mark.parametrize("out_dtype", HALFS)
def test_prepared_expert_scale(be, out_dtype):
    scale = (torch.rand(4, 32) * 1e-2).bfloat16().float()     # a bf16 checkpoint's values
    prep = be.npu.prepare_expert_scale(be.dev(scale), out_dtype)
    assert prep.dtype == (torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
    exact(be.host(prep).float(), scale)                       # exact for bf16-born scales
    exact(cpu.prepare_expert_scale(scale, out_dtype), scale)


@pytest.mark.parametrize("dtype", FLOATS)
def test_linear(be, dtype):
    """The float linear (torch_npu's matmul through F.linear on the NPU) against ops.cpu, whose
    prepared weight is oneDNN's packed layout: the same product."""
    x, w = torch.randn(7, 96).to(dtype), torch.randn(40, 96).to(dtype)
    got = be.host(be.npu.linear(be.dev(x), be.npu.prepare_linear_weight(be.dev(w))))
    ref = cpu.linear(x, cpu.prepare_linear_weight(w))
    close(got, ref, dtype)
    close(ref, (x.float() @ w.float().t()).to(dtype), dtype)


@pytest.mark.parametrize("quantize", [False, True])
def test_ep_dispatch_and_combine_contract(quantize):
    """``ep_dispatch`` / ``ep_combine`` with torch_npu's MC2 kernels (emulated), in one process:
    rank 0 of 2 whose stand-in partner sends what it sends (``mc2.StandInRanks``), every id
    among rank 0's experts so that nothing depends on the partner's experts. The received rows
    are each pair twice (this rank's, then the partner's), grouped by expert; the ends
    cumulative; the combine the weighted sum of the experts' outputs of this rank's own pairs;
    the padding row (inactive) unspecified. (Across real ranks against ops.cpu:
    tests/test_ep_exchange.py.)"""
    from ops.cpu import ExpertGroup
    from tests.npu_emulator import mc2

    E, K, H = 8, 2, 64
    x = torch.randn(4, H).bfloat16()
    ids = torch.tensor([[1, 0], [2, 3], [0, 2], [3, 1]], dtype=torch.int32)
    w = torch.rand(4, K).bfloat16()
    active = torch.tensor([True, True, True, False])
    with npu_emulator.installed() as emu:
        mc2.register("contract", mc2.StandInRanks(2, 0))
        try:
            ep = ExpertGroup(rank=0, size=2, hccl_name="contract")
            rows, scale, ends, handle = emu.npu_ops.ep_dispatch(x, ids, active, E, ep, quantize)
            assert rows.shape == (4 * 2 * min(E // 2, K), H) and ends.dtype == torch.int64
            want = [x[t] for j in range(4) for src in range(2) for t in range(3)
                    if j in ids[t].tolist()]
            n = len(want)
            assert ends.tolist() == list(torch.tensor(
                [2 * int((ids[:3] == j).any(dim=1).sum()) for j in range(4)]).cumsum(0))
            if quantize:
                assert rows.dtype == torch.int8 and scale.shape == (rows.shape[0],)
                got = rows[:n].float() * scale[:n].unsqueeze(-1)
                close(got, torch.stack(want).float(), torch.bfloat16, rtol=1e-2, atol=2e-2)
            else:
                assert scale is None
                exact(rows[:n], torch.stack(want))
            out = torch.zeros(rows.shape[0], H, dtype=torch.bfloat16)
            start = 0
            for j, end in enumerate(ends.tolist()):         # expert j scales its rows by j + 1
                part = rows[start:end].float()
                if quantize:
                    part = part * scale[start:end].unsqueeze(-1)
                out[start:end] = (part * (j + 1)).bfloat16()
                start = end
            y = emu.npu_ops.ep_combine(out, w, handle)
            assert y.shape == (4, H) and y.dtype == torch.bfloat16
            # expert e's output for token t is (e + 1) * x[t] (dequantised: within int8 steps)
            ref = torch.stack([sum(float(w[t, k]) * (int(ids[t, k]) + 1) * x[t].float()
                                   for k in range(K)) for t in range(3)])
            close(y[:3].float(), ref, torch.bfloat16, rtol=2e-2, atol=5e-2)
            assert emu.calls.count("npu_moe_distribute_dispatch_v2") == 1
            assert emu.calls.count("npu_moe_distribute_combine_v2") == 1
        finally:
            mc2.unregister("contract")


@pytest.mark.parametrize("quant", [False, True])
def test_grouped_matmul_takes_cumulative_ends(be, quant):
    """``cumulative=True`` (each group's end row, as ``ep_dispatch`` gives them) is the same as
    the counts, on both backends."""
    counts = torch.tensor([3, 0, 2, 1])
    ends = counts.cumsum(0)
    if quant:
        xq = torch.randint(-127, 128, (7, 64), dtype=torch.int8)
        w = torch.randint(-127, 128, (4, 64, 32), dtype=torch.int8)
        s, pts = torch.rand(4, 32) * 1e-2, torch.rand(7) * 1e-2
        wp = be.npu.prepare_weight(be.dev(w))
        sp = be.npu.prepare_expert_scale(be.dev(s), torch.bfloat16)
        got = be.host(be.npu.grouped_quant_matmul(be.dev(xq), wp, sp, be.dev(pts), be.dev(ends),
                                                  torch.bfloat16, cumulative=True))[:6]
        want = cpu.grouped_quant_matmul(xq, w, s, pts, counts, torch.bfloat16)[:6]
        close(got, want, torch.bfloat16)
        exact(cpu.grouped_quant_matmul(xq, w, s, pts, ends, torch.bfloat16, cumulative=True),
              cpu.grouped_quant_matmul(xq, w, s, pts, counts, torch.bfloat16))
    else:
        x, w = torch.randn(7, 64).bfloat16(), torch.randn(4, 64, 32).bfloat16()
        got = be.host(be.npu.grouped_matmul(be.dev(x), be.npu.prepare_grouped_weight(be.dev(w)),
                                            be.dev(ends), cumulative=True))[:6]
        close(got, cpu.grouped_matmul(x, w, counts)[:6], torch.bfloat16)
        exact(cpu.grouped_matmul(x, w, ends, cumulative=True), cpu.grouped_matmul(x, w, counts))
    with pytest.raises(ValueError, match="must not decrease"):
        cpu.grouped_matmul(torch.zeros(7, 64), torch.zeros(4, 64, 32), torch.tensor([3, 2, 5, 6]),
                           cumulative=True)


def test_every_op_is_covered():
    """Each op of ops.OPS has a contract test in this file."""
    import ops
    src = open(__file__).read()
    missing = [op for op in ops.OPS if f'"{op}"' not in src and f".{op}(" not in src]
    assert not missing, missing


# ============================================================================================
# LoRA: ops.npu (torch ops) and vllm-ascend's bgmv kernels (vllm_plugin/npu_kernels.py)
# ============================================================================================
# Both against ops.cpu: h (float32) within 1e-5 (float32 sums in another order); y within one
# rounding to its dtype (TOL); rows of slot -1 bit-exact (y untouched, h exactly 0). The slots
# mix every adapter (ranks 8..R, zero-padded to R) and -1 in one batch; nothing is read back to
# the host (the counter of tests/test_npu_host_syncs.py).

LORA_RANKS = [8, 16, 32, 64]


def _lora_inputs(T, S, R, K, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = [max(8, R >> s) for s in range(S)]                 # mixed adapter ranks in the slots
    x = torch.randn(T, K, generator=g).to(dtype)
    a = torch.randn(S, R, K, generator=g) / K ** 0.5
    b = torch.randn(S, n, R, generator=g) / R ** 0.5
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, :, r:] = 0
    order = torch.randperm(T, generator=torch.Generator().manual_seed(T))   # one per batch size
    return x, a.to(dtype), b.to(dtype), (torch.arange(T) % (S + 1) - 1)[order]


@contextlib.contextmanager
def _no_host_reads():
    from tests.test_npu_host_syncs import HostReads
    mode = HostReads()
    with mode:
        yield
    assert not mode.found, f"host reads of device values: {mode.found}"


def _lora_check(be, impl, dtype, R, *, T=21, S=3, K=256, sizes=(128, 64, 64),
                slot_dtype=torch.int64):
    """A packed q|k|v projection's LoRA through ``impl`` (an object with lora_shrink and
    lora_expand taking device tensors) against ops.cpu, slice by slice."""
    y0 = torch.randn(T, sum(sizes)).to(dtype)
    got_y, ref_y, offset = be.dev(y0.clone()), y0.clone(), 0
    for i, n in enumerate(sizes):
        x, a, b, slots = _lora_inputs(T, S, R, K, n, dtype, seed=i)
        ref_h = cpu.lora_shrink(x, a, slots, 0.25)
        with _no_host_reads():
            h = impl.lora_shrink(be.dev(x), be.dev(a), be.dev(slots.to(slot_dtype)), 0.25)
            got_y = impl.lora_expand(got_y, h, be.dev(b), be.dev(slots.to(slot_dtype)), offset)
        ref_y = cpu.lora_expand(ref_y, ref_h, b, slots, offset)
        close(be.host(h), ref_h, torch.float32)
        assert torch.equal(be.host(h)[slots < 0], torch.zeros(int((slots < 0).sum()), R))
        offset += n
    got_y = be.host(got_y)
    close(got_y, ref_y, dtype)
    dead = slots < 0
    exact(got_y[dead], y0[dead])
    assert not torch.equal(got_y[~dead], y0[~dead])


@pytest.mark.parametrize("dtype", FLOATS + [torch.float16])
@pytest.mark.parametrize("R", LORA_RANKS)
def test_lora_ops(be, dtype, R):
    """ops.npu.lora_shrink / ops.npu.lora_expand (plain torch ops on the device) = ops.cpu."""
    _lora_check(be, be.npu, dtype, R)


def test_lora_ops_int32_slots_and_no_tokens(be):
    _lora_check(be, be.npu, torch.bfloat16, 16, slot_dtype=torch.int32)
    h = be.host(be.npu.lora_shrink(be.dev(torch.zeros(0, 64)), be.dev(torch.randn(2, 8, 64)),
                                   be.dev(torch.zeros(0, dtype=torch.long)), 1.0))
    assert h.shape == (0, 8) and h.dtype == torch.float32


@contextlib.contextmanager
def _vllm_ascend_kernels(be):
    """vllm-ascend's _C_ascend kernels (emulated with the torch_npu emulator, real on a device
    with vllm-ascend installed) behind npu_kernels' adapters: (adapters, calls or None)."""
    from ascend_qwen3.vllm_plugin import npu_kernels
    from tests.npu_emulator import c_ascend
    if not be.emulated:
        found = npu_kernels.kernels()
        if not found:
            pytest.skip("vllm-ascend's _C_ascend LoRA kernels are not loaded here")
        yield SimpleNamespace(**found), None
        return
    with c_ascend.installed(be.calls):
        yield SimpleNamespace(**npu_kernels.kernels()), be.calls


@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("R", LORA_RANKS)
def test_lora_vllm_ascend_bgmv_kernels(be, dtype, R):
    """npu_kernels' lora_shrink / lora_expand on _C_ascend.bgmv_shrink / bgmv_expand = ops.cpu,
    every slice through the kernels (the kernels take fp16 / bf16 only)."""
    with _vllm_ascend_kernels(be) as (impl, calls):
        _lora_check(be, impl, dtype, R)
        if calls is not None:
            assert calls.count("_C_ascend.bgmv_shrink") == 3 == calls.count("_C_ascend.bgmv_expand")
            assert not calls.rejected, calls.rejected


def test_lora_vllm_ascend_falls_back_where_the_kernels_cannot(be):
    """fp32 (the kernels take fp16 / bf16) and rank 128 (bgmv_expand has code for 8..64) run
    ops.npu; the results equal ops.cpu either way."""
    with _vllm_ascend_kernels(be) as (impl, calls):
        _lora_check(be, impl, torch.float32, 16, sizes=(64,))
        if calls is not None:
            assert calls.count("_C_ascend.bgmv_shrink") == 0 == calls.count("_C_ascend.bgmv_expand")
        _lora_check(be, impl, torch.bfloat16, 128, sizes=(128,))
        if calls is not None:      # the shrink takes rank 128, the expand does not
            assert calls.count("_C_ascend.bgmv_shrink") == 1
            assert calls.count("_C_ascend.bgmv_expand") == 0


def test_lora_kernel_launches(be):
    """Kernels a LoRA'd linear launches per step (the emulator's launch counter): vllm-ascend's
    path is one fill (h's zeros), bgmv_shrink and bgmv_expand; ops.npu's torch path is 19 (the
    shrink 9: two casts, the matmul, the slot clamp, gather, mask, scale and where; the expand 10:
    the slot one-hot, where, the casts and stacking of B, the matmul, the add and the copy back)."""
    if not be.emulated:
        pytest.skip("launches are counted by the emulator")
    from tests.npu_emulator.kernels import KernelCounter
    x, a, b, slots = _lora_inputs(5, 2, 16, 128, 64, torch.bfloat16)
    y = torch.randn(5, 64).bfloat16()

    def launched(impl):
        counter, out = KernelCounter(be.calls), y.clone()
        with counter:
            impl.lora_expand(out, impl.lora_shrink(x, a, slots, 1.0), b, slots, 0)
        return [name for _, name in counter.kernels]
    with _vllm_ascend_kernels(be) as (impl, _):
        fused = launched(impl)
    assert fused == ["aten.zeros", "_C_ascend.bgmv_shrink", "_C_ascend.bgmv_expand"], fused
    torch_path = launched(be.npu)
    assert len(torch_path) == 19 and not any(k.startswith("torch_npu.") for k in torch_path), torch_path


def test_lora_on_a_w8a8_linear(be, monkeypatch):
    """A W8A8_DYNAMIC linear (the project's int8 path: dynamic_quant + quant_matmul) with LoRA
    on top, on the NPU backend (ops.npu and the vllm-ascend kernels) = the same on ops.cpu."""
    from ascend_qwen3.parallel.layers import ColumnParallelLinear
    from ascend_qwen3.quant.format import W8A8_DYNAMIC
    from ascend_qwen3.quant.layers import Int8LinearMethod
    from ascend_qwen3.quant.maths import quantize_weight

    T, K, N, R = 9, 256, 128, 16
    wq, wscale = quantize_weight(torch.randn(N, K))

    def layer(device):
        lin = ColumnParallelLinear(K, N, dtype=torch.bfloat16, device=device,
                                   method=Int8LinearMethod(W8A8_DYNAMIC))
        lin.weight.data.copy_(wq)
        lin.weight_scale.data.copy_(wscale)
        lin.weight_offset.data.zero_()
        lin.finalize()
        return lin
    ref_layer = layer(None)
    if be.emulated:
        monkeypatch.setenv(ops.ENV_VAR, "npu")        # emulated NPU tensors live on the CPU
    npu_layer = layer(be.device)
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    x, a, b, slots = _lora_inputs(T, 3, R, K, N, torch.bfloat16)
    ref = cpu.lora_expand(ref_layer(x), cpu.lora_shrink(x, a, slots, 0.5), b, slots, 0)
    with _vllm_ascend_kernels(be) as (fused, calls):
        for impl in (be.npu, fused):
            xd, sd = be.dev(x), be.dev(slots)
            with be.expect("npu_quant_matmul"), _no_host_reads():
                y = impl.lora_expand(npu_layer(xd), impl.lora_shrink(xd, be.dev(a), sd, 0.5),
                                     be.dev(b), sd, 0)
            close(be.host(y), ref, torch.bfloat16)
        if calls is not None:
            assert calls.count("_C_ascend.bgmv_expand") == 1


def test_lora_registration(be, monkeypatch):
    """npu_kernels.register() registers the adapters (LoRA, the attention's prologue, the
    router, the experts' first half) as "vllm-ascend" for NPU devices (what ops.bind hands the
    graph, and what the ops log names), and ASCEND_QWEN3_ENGINE_KERNELS=0 turns it off."""
    if not be.emulated:
        pytest.skip("registration is checked against the emulated kernels")
    from ascend_qwen3.vllm_plugin import npu_kernels
    assert npu_kernels.register() is False            # no _C_ascend kernels: nothing registered
    assert ops.registered_kernels("npu") is None
    with _vllm_ascend_kernels(be):
        try:
            assert npu_kernels.register() is True
            bound = ops.bind("npu", "lora_shrink", "lora_expand", "linear", "qkv_norm_rope",
                             "moe_gating_topk", "grouped_quant_swiglu_quant")
            assert bound.IMPL["lora_shrink"] == bound.IMPL["lora_expand"] == "vllm-ascend"
            assert bound.IMPL["qkv_norm_rope"] == bound.IMPL["moe_gating_topk"] == "vllm-ascend"
            assert bound.IMPL["grouped_quant_swiglu_quant"] == "vllm-ascend"
            assert bound.IMPL["linear"] == "npu"
            # under the forced NPU backend (the emulator's CPU tensors) the same registration
            monkeypatch.setenv(ops.ENV_VAR, "npu")
            assert ops.bind(None, "qkv_norm_rope").IMPL["qkv_norm_rope"] == "vllm-ascend"
            monkeypatch.delenv(ops.ENV_VAR)
            monkeypatch.setenv(ops.KERNELS_ENV_VAR, "0")
            assert npu_kernels.register() is False
            assert ops.registered_kernels("npu") is None
            assert ops.bind("npu", "lora_shrink") is be.npu
        finally:
            ops.unregister_kernels("npu")


def test_emulated_bgmv_kernels_fail_as_the_binding_and_the_kernels_would(be):
    """The binding's TORCH_CHECKs (torch_binding.cpp:426-434, 466-476 of vllm-ascend v0.23.0)
    and the contracts its kernels rely on unchecked (int64 indices, float32 h, the ranks
    bgmv_expand has code for, slots below the slot count)."""
    if not be.emulated:
        pytest.skip("the emulator's strictness")
    from tests.npu_emulator import c_ascend
    x, a, b, slots = _lora_inputs(6, 2, 16, 64, 32, torch.bfloat16)
    h, y = torch.zeros(6, 16), torch.randn(6, 32).bfloat16()
    with c_ascend.installed(be.calls):
        k = torch.ops._C_ascend
        cases = [
            (lambda: k.bgmv_shrink(x.float(), a.float(), slots, h, 1.0), "only support half and bf16"),
            (lambda: k.bgmv_shrink(x[:, :16], a[:, :, :16], slots, h, 1.0), "greater than hidden out"),
            (lambda: k.bgmv_shrink(x, a, slots.int(), h, 1.0), "indices must be int64"),
            (lambda: k.bgmv_shrink(x, a, slots, h.bfloat16(), 1.0), "y must be float32"),
            (lambda: k.bgmv_shrink(x, a, slots + 1, h, 1.0), r"indices \[2\] are not below"),
            (lambda: k.bgmv_expand(h, b, slots, y, 0, 48), "smaller than the second dimension"),
            (lambda: k.bgmv_expand(h.bfloat16(), b, slots, y, 0, 32), "x must be float32"),
            (lambda: k.bgmv_expand(h[:, :12].contiguous(), b[:, :, :12].contiguous(), slots, y, 0, 32),
             r"one of \[8, 16, 32, 64\]"),
            (lambda: k.bgmv_expand(h, b, slots, y, 8, 24), "weight must be"),
        ]
        for call, match in cases:
            with pytest.raises(NpuEmulatorError, match=match):
                call()
        assert len(be.calls.rejected) == len(cases)
        # a call as vllm-ascend's lora_ops.py makes it is accepted; slot -1 rows stay as they were
        h.fill_(7.0)
        k.bgmv_shrink(x, a, slots, h, 1.0)
        assert torch.equal(h[slots < 0], torch.full_like(h[slots < 0], 7.0))
    assert not c_ascend.present()       # removed with the block


# ============================================================================================
# the emulator's own strictness and doc semantics (tier 2 only)
# ============================================================================================

@pytest.fixture
def tn():
    return npu_emulator.build()


def _fia_args(q_lens=(3, 1), kv_lens=(5, 130), hq=8, hkv=2, bs=128, dtype=torch.bfloat16):
    nblk = [math.ceil(L / bs) for L in kv_lens]
    nb = sum(nblk) + 1
    kc = torch.randn(nb, bs, hkv * 128).to(dtype)
    vc = torch.randn(nb, bs, hkv * 128).to(dtype)
    table = torch.zeros(len(kv_lens), max(nblk), dtype=torch.int32)
    start = 0
    for r, n in enumerate(nblk):
        table[r, :n] = torch.arange(start, start + n, dtype=torch.int32)
        start += n
    T = sum(q_lens)
    q = torch.randn(T, hq, 128).to(dtype)
    kwargs = dict(atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.int8), 1),
                  block_table=table, actual_seq_lengths=list(torch.tensor(q_lens).cumsum(0)
                                                              .tolist()),
                  actual_seq_lengths_kv=list(kv_lens), num_heads=hq, num_key_value_heads=hkv,
                  scale=0.088, input_layout="TND", block_size=bs, sparse_mode=3)
    return q, kc, vc, kwargs


def test_emulator_fia_accepts_documented_call(tn):
    q, kc, vc, kw = _fia_args()
    out, lse = tn.npu_fused_infer_attention_score(q, kc, vc, **kw)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (1,)
    _, lse = tn.npu_fused_infer_attention_score(q, kc, vc, softmax_lse_flag=True, **kw)
    assert lse.shape == (q.shape[0], 8, 1) and lse.dtype == torch.float32
    assert tn.call_log.count("npu_fused_infer_attention_score") == 2


@pytest.mark.parametrize("change,exc,match", [
    (dict(block_table="int64"), NpuEmulatorError, "block_table.*int32"),
    (dict(atten_mask=None), NpuEmulatorError, "requires the optimised atten_mask"),
    (dict(atten_mask="tril"), NpuEmulatorError, "lower-triangular"),
    (dict(atten_mask="small"), NpuEmulatorError, "2048"),
    (dict(actual_seq_lengths="tensor"), TypeError, "list of ints"),
    (dict(actual_seq_lengths=[3, 3]), NpuEmulatorError, "must end at T"),
    (dict(actual_seq_lengths_kv=None), NpuEmulatorError, "required"),
    (dict(actual_seq_lengths_kv=[5]), NpuEmulatorError, "one element per request"),
    (dict(block_size=16), NpuEmulatorError, "block_size"),
    (dict(num_key_value_heads=3), NpuEmulatorError, "multiple"),
    (dict(num_heads=4), NpuEmulatorError, "num_heads"),
    (dict(cache="BSND4"), NpuEmulatorError, "BnNBsD"),
    (dict(dtype=torch.float16), NpuEmulatorError, "BFLOAT16"),
    (dict(sparse_mode=5), NpuEmulatorError, "sparse_mode"),
    (dict(input_layout="TDN"), NpuEmulatorError, "input_layout"),
])
def test_emulator_fia_rejects(tn, change, exc, match):
    q, kc, vc, kw = _fia_args(dtype=change.get("dtype", torch.bfloat16))
    for key, val in change.items():
        if key == "dtype":
            continue
        if key == "block_table" and val == "int64":
            kw[key] = kw[key].long()
        elif key == "atten_mask" and val == "tril":
            kw[key] = torch.tril(torch.ones(2048, 2048, dtype=torch.int8))
        elif key == "atten_mask" and val == "small":
            kw[key] = torch.triu(torch.ones(128, 128, dtype=torch.bool), 1)
        elif key == "actual_seq_lengths" and val == "tensor":
            kw[key] = torch.tensor(kw[key])
        elif key == "cache":
            kc = kc.view(kc.shape[0], 128, 2, 128)  # [NB, BS, KV_N, D]: not a documented layout
            vc = vc.view_as(kc)
        else:
            kw[key] = val
    with pytest.raises(exc, match=match):
        tn.npu_fused_infer_attention_score(q, kc, vc, **kw)
    assert tn.call_log.count("npu_fused_infer_attention_score") == 0
    assert tn.call_log.rejected


def test_emulator_fia_semantics(tn):
    """Paged (per-request KV lengths) and contiguous TND (cumulative KV ends) agree; sparse_mode 3
    is bottom-right causal; 4-D BnNBsD caches read like BnBsH; GQA maps head h to h // group."""
    hq, hkv, D = 4, 2, 128
    q_lens, kv_lens = [3, 1, 4], [5, 9, 4]
    k = [torch.randn(L, hkv, D).bfloat16() for L in kv_lens]
    v = [torch.randn(L, hkv, D).bfloat16() for L in kv_lens]
    q = torch.randn(sum(q_lens), hq, D).bfloat16()
    cum = lambda xs: torch.tensor(xs).cumsum(0).tolist()  # noqa: E731
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    common = dict(atten_mask=mask, num_heads=hq, num_key_value_heads=hkv, scale=0.1,
                  input_layout="TND", sparse_mode=3, actual_seq_lengths=cum(q_lens))
    flat, _ = tn.npu_fused_infer_attention_score(q, torch.cat(k), torch.cat(v),
                                                 actual_seq_lengths_kv=cum(kv_lens), **common)
    bs = 128
    kc = torch.zeros(4, bs, hkv * D).bfloat16()
    vc = torch.zeros_like(kc)
    table = torch.tensor([[2], [0], [3]], dtype=torch.int32)
    for r in range(3):
        kc[table[r, 0], :kv_lens[r]] = k[r].reshape(kv_lens[r], -1)
        vc[table[r, 0], :kv_lens[r]] = v[r].reshape(kv_lens[r], -1)
    paged, _ = tn.npu_fused_infer_attention_score(q, kc, vc, block_table=table, block_size=bs,
                                                  actual_seq_lengths_kv=kv_lens, **common)
    exact(paged, flat)
    kc4 = kc.view(4, bs, hkv, D).transpose(1, 2).contiguous()
    vc4 = vc.view(4, bs, hkv, D).transpose(1, 2).contiguous()
    paged4, _ = tn.npu_fused_infer_attention_score(q, kc4, vc4, block_table=table, block_size=bs,
                                                   actual_seq_lengths_kv=kv_lens, **common)
    exact(paged4, flat)
    # request 1: one query, 9 keys -> sees all 9; request 0: query 0 sees keys 0..2
    r0q0 = q[0].float()
    keys, vals = k[0][:3].float(), v[0][:3].float()
    for h in range(hq):
        p = torch.softmax(keys[:, h // 2] @ r0q0[h] * 0.1, 0)
        torch.testing.assert_close(flat[0, h].float(), (p @ vals[:, h // 2]), rtol=1e-2,
                                   atol=1e-2)


def test_emulator_reshape_and_cache(tn):
    kc, vc = torch.zeros(2, 4, 1, 16, dtype=torch.float16), torch.zeros(2, 4, 1, 16,
                                                                         dtype=torch.float16)
    key = torch.arange(3 * 16, dtype=torch.float16).view(3, 1, 16)
    tn._npu_reshape_and_cache(key, key, kc, vc, torch.tensor([5, -1, 0], dtype=torch.int32))
    exact(kc[1, 1, 0], key[0, 0])  # slot 5 = block 1, offset 1
    exact(kc[0, 0, 0], key[2, 0])
    assert kc.count_nonzero() == (kc[1, 1] != 0).sum() + (kc[0, 0] != 0).sum()
    with pytest.raises(NpuEmulatorError, match="int32"):
        tn._npu_reshape_and_cache(key, key, kc, vc, torch.tensor([1, 2, 3]))
    with pytest.raises(NpuEmulatorError, match="one dtype"):
        tn._npu_reshape_and_cache(key.bfloat16(), key.bfloat16(), kc, vc,
                                  torch.tensor([1, 2, 3], dtype=torch.int32))
    with pytest.raises(NpuEmulatorError, match="outside the cache"):
        tn._npu_reshape_and_cache(key, key, kc, vc, torch.tensor([1, 2, 8], dtype=torch.int32))
    # npu_scatter_pa_kv_cache documents no skip value: -1 is out of range there
    with pytest.raises(NpuEmulatorError, match=r"\[0, 7\]"):
        tn.npu_scatter_pa_kv_cache(key, key, kc, vc, torch.tensor([1, -1, 3]), cache_mode="Norm")
    # NZ caches: [NB, H/16, BS, 16]
    knz = tn.npu_format_cast(torch.zeros(2, 1, 4, 16, dtype=torch.float16), 29)
    vnz = tn.npu_format_cast(torch.zeros(2, 1, 4, 16, dtype=torch.float16), 29)
    tn.npu_scatter_pa_kv_cache(key, key, knz, vnz, torch.tensor([5, 2, 0], dtype=torch.int32))
    exact(knz[1, 0, 1], key[0, 0])


def test_emulator_moe_index_conventions(tn):
    # gating: row_idx is column-major, row_idx[i, j] = j * N + i
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 0.0, 1.0]])
    y, e, r = tn.npu_moe_gating_top_k_softmax(logits, None, k=2)
    exact(e, torch.tensor([[1, 2], [0, 2]], dtype=torch.int32))
    exact(r, torch.tensor([[0, 2], [1, 3]], dtype=torch.int32))
    # init_routing_v2 with expert_idx [[1, 0], [0, 1]]: pairs p = t*K + j -> experts [1, 0, 0, 1]
    x = torch.tensor([[10.0], [20.0]])
    ids = torch.tensor([[1, 0], [0, 1]], dtype=torch.int32)
    ex, gather, cnt, _ = tn.npu_moe_init_routing_v2(
        x, ids, expert_num=2, expert_tokens_num_type=1, expert_tokens_num_flag=True)
    exact(ex, torch.tensor([[10.0], [20.0], [10.0], [20.0]]))  # sorted pairs 1, 2, 0, 3
    exact(gather, torch.tensor([2, 0, 1, 3], dtype=torch.int32))  # row of each pair (type 0)
    exact(cnt, torch.tensor([2, 2]))
    _, scatter, cum, _ = tn.npu_moe_init_routing_v2(
        x, ids, expert_num=2, row_idx_type=1, expert_tokens_num_flag=True)
    exact(scatter, torch.tensor([1, 2, 0, 3], dtype=torch.int32))  # pair of each row (type 1)
    exact(cum, torch.tensor([2, 4]))  # type 0 = cumsum
    # an active range [1, 2): expert-0 pairs are dropped, gather index -1 for them
    ex, gather, cnt, _ = tn.npu_moe_init_routing_v2(
        x, ids, expert_num=2, active_expert_range=[1, 2], expert_tokens_num_type=1,
        expert_tokens_num_flag=True)
    exact(gather, torch.tensor([0, -1, -1, 1], dtype=torch.int32))
    exact(cnt, torch.tensor([2]))
    exact(ex[:2], torch.tensor([[10.0], [20.0]]))
    assert torch.isnan(ex[2:]).all()  # rows past the available ones are undefined
    # token_unpermute consumes the gather index: out[t] = sum_j p[t, j] * rows[S[t*K + j]]
    rows = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    probs = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    S = torch.tensor([2, 0, 1, 3], dtype=torch.int32)
    out = tn.npu_moe_token_unpermute(rows, S, probs=probs)
    exact(out, torch.tensor([[0.5 * 3 + 0.25 * 1], [1.0 * 2 + 2.0 * 4]]))
    # finalize_routing: column-major pairs (mode 0) vs row-major (mode 2)
    col = torch.tensor([2, 1, 0, 3], dtype=torch.int32)  # pair (i, k) at i + k*N
    rowm = torch.tensor([2, 0, 1, 3], dtype=torch.int32)  # pair (i, k) at i*K + k
    f0 = tn.npu_moe_finalize_routing(rows, None, None, None, probs, col, None)
    f2 = tn.npu_moe_finalize_routing(rows, None, None, None, probs, rowm, None, drop_pad_mode=2)
    exact(f0, out)
    exact(f2, out)


def test_emulator_moe_rejects(tn):
    x = torch.randn(4, 8)
    with pytest.raises(NpuEmulatorError, match="int32"):
        tn.npu_moe_init_routing_v2(x, torch.zeros(4, 2, dtype=torch.int64), expert_num=4)
    with pytest.raises(NpuEmulatorError, match="expert ids"):
        tn.npu_moe_init_routing_v2(x, torch.full((4, 2), 4, dtype=torch.int32), expert_num=4)
    with pytest.raises(NpuEmulatorError, match="expert_num"):
        tn.npu_moe_init_routing_v2(x, torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="list of ints"):
        tn.npu_moe_init_routing_v2(x, torch.zeros(4, 2, dtype=torch.int32), expert_num=4,
                                   active_expert_range=torch.tensor([0, 4]))
    with pytest.raises(NpuEmulatorError, match="duplicate"):
        tn.npu_moe_token_unpermute(x, torch.tensor([0, 0, 1, 2], dtype=torch.int32))
    with pytest.raises(NpuEmulatorError, match="k must"):
        tn.npu_moe_gating_top_k_softmax(x, k=9)


def test_emulator_grouped_matmul_rules(tn):
    x, w = torch.randn(6, 8), torch.randn(3, 8, 4)
    counts = torch.tensor([2, 0, 4])
    out = tn.npu_grouped_matmul([x], [w], group_list=counts, split_item=2, group_type=0,
                                group_list_type=1)
    assert isinstance(out, list) and len(out) == 1
    exact(out[0][:2], (x[:2] @ w[0]))
    torch.testing.assert_close(out[0][2:], x[2:] @ w[2])
    cum = tn.npu_grouped_matmul([x], [w], group_list=counts.cumsum(0), split_item=3,
                                group_type=0, group_list_type=0)
    exact(cum[0], out[0])
    pairs = tn.npu_grouped_matmul([x], [w], group_list=torch.tensor([[2, 4], [0, 2]]),
                                  split_item=2, group_type=0, group_list_type=2)
    torch.testing.assert_close(pairs[0][:4], x[:4] @ w[2])
    short = tn.npu_grouped_matmul([x], [w], group_list=torch.tensor([1, 0, 2]), split_item=2,
                                  group_type=0, group_list_type=1)
    assert torch.isnan(short[0][3:]).all()  # rows past the groups are not written
    with pytest.raises(TypeError, match="list of Tensors"):
        tn.npu_grouped_matmul(x, [w], group_list=counts, split_item=2, group_type=0)
    with pytest.raises(NpuEmulatorError, match="int64"):
        tn.npu_grouped_matmul([x], [w], group_list=counts.int(), split_item=2, group_type=0,
                              group_list_type=1)
    with pytest.raises(NpuEmulatorError, match="length 1"):
        tn.npu_grouped_matmul([x], [w[:1]], group_list=torch.tensor([6]), split_item=2,
                              group_type=0, group_list_type=1)
    with pytest.raises(NpuEmulatorError, match="non-decreasing"):
        tn.npu_grouped_matmul([x], [w], group_list=torch.tensor([4, 2, 6]), split_item=2,
                              group_type=0, group_list_type=0)
    with pytest.raises(NpuEmulatorError, match="split_item"):
        tn.npu_grouped_matmul([x], [w], group_list=counts, split_item=0, group_type=0,
                              group_list_type=1)
    with pytest.raises(NpuEmulatorError, match="only 6"):
        tn.npu_grouped_matmul([x], [w], group_list=torch.tensor([4, 4, 4]), split_item=2,
                              group_type=0, group_list_type=1)
    xq, wq = _int8(6, 8), _int8(3, 8, 4)
    with pytest.raises(NpuEmulatorError, match="output_dtype"):
        tn.npu_grouped_matmul([xq], [wq], scale=[torch.rand(3, 4)], per_token_scale=[torch.rand(6)],
                              group_list=counts, split_item=2, group_type=0, group_list_type=1,
                              output_dtype=torch.bfloat16)  # fp32 scale gives float16
    raw = tn.npu_grouped_matmul([xq], [wq], group_list=counts, split_item=2, group_type=0,
                                group_list_type=1, output_dtype=torch.int32)
    exact(raw[0][2:], cpu.int8_matmul(xq[2:], wq[2].contiguous()))


def test_emulator_quant_rules(tn):
    scale = torch.tensor([0.0123, -3.5, 1e-4])
    packed = tn.npu_trans_quant_param(scale)
    assert packed.dtype == torch.int64 and bool(((packed >> 46) & 1).all())
    low = (packed & 0xFFFFFFFF).to(torch.int64)
    low = torch.where(low >= 2 ** 31, low - 2 ** 32, low).to(torch.int32).view(torch.float32)
    exact(low, (scale.view(torch.int32) & -8192).view(torch.float32))  # 19 bits kept
    with_off = tn.npu_trans_quant_param(scale, torch.tensor([-3.0, 300.0, 2.4]))
    exact((with_off >> 37) & 0x1FF, torch.tensor([509, 255, 2]))
    xq, wq = _int8(4, 32), _int8(32, 3)
    acc = cpu.int8_matmul(xq, wq)
    y = tn.npu_quant_matmul(xq, wq, packed, output_dtype=torch.float16)
    torch.testing.assert_close(y, (acc.float() * low).half())
    exact(tn.npu_quant_matmul(xq, wq, scale, output_dtype=torch.int32), acc)  # scale unused
    with pytest.raises(NpuEmulatorError, match="npu_trans_quant_param"):
        tn.npu_quant_matmul(xq, wq, torch.tensor([7, 8, 9]), output_dtype=torch.float16)
    with pytest.raises(NpuEmulatorError, match="combination"):
        tn.npu_quant_matmul(xq, wq, scale, pertoken_scale=torch.rand(4),
                            output_dtype=torch.int8)
    with pytest.raises(NpuEmulatorError, match="output_dtype"):
        tn.npu_quant_matmul(xq, wq, scale, output_dtype=torch.float32)
    with pytest.raises(NpuEmulatorError, match="int8"):
        tn.npu_quant_matmul(xq.float(), wq, scale, output_dtype=torch.bfloat16)
    with pytest.raises(NpuEmulatorError, match="float16/bfloat16"):
        tn.npu_dynamic_quant(torch.randn(3, 4))
    with pytest.raises(NpuEmulatorError, match="more than 1 dim"):
        tn.npu_dynamic_quant(torch.randn(4).half())
    q = tn.npu_quantize(torch.tensor([[0.26, -1.0, 300.0]]), torch.tensor([0.1] * 3),
                        torch.tensor([1, 1, 1], dtype=torch.int8), torch.qint8, axis=-1)
    exact(q, torch.tensor([[4, -9, 127]], dtype=torch.int8))
    with pytest.raises(NpuEmulatorError, match="dtype"):
        tn.npu_quantize(torch.randn(2, 3), torch.ones(3), None, torch.int8, axis=-1)


def test_emulator_norm_rope_rules(tn):
    with pytest.raises(NpuEmulatorError, match="2/3/4/5/6/7/8 dims"):
        tn.npu_rms_norm(torch.randn(8), torch.ones(8))
    with pytest.raises(NpuEmulatorError, match="not a supported pair"):
        tn.npu_rms_norm(torch.randn(2, 8), torch.ones(8).half())
    with pytest.raises(NpuEmulatorError, match="gamma dtype"):
        tn.npu_add_rms_norm(torch.randn(2, 8).half(), torch.randn(2, 8).half(), torch.ones(8))
    with pytest.raises(NpuEmulatorError, match="divisible by 2"):
        tn.npu_swiglu(torch.randn(2, 7))
    q, k = torch.randn(3, 4, 128), torch.randn(3, 2, 128)
    cos, sin = torch.randn(3, 1, 128), torch.randn(3, 1, 128)
    q_out, k_out = tn.npu_apply_rotary_pos_emb(q, k, cos, sin, layout="TND")
    assert q_out is q and k_out is k  # documented in-place update
    with pytest.raises(NpuEmulatorError, match="64 or 128"):
        tn.npu_apply_rotary_pos_emb(torch.randn(3, 4, 96), torch.randn(3, 2, 96),
                                    torch.randn(3, 1, 96), torch.randn(3, 1, 96), layout="TND")
    with pytest.raises(NpuEmulatorError, match="one dtype"):
        tn.npu_apply_rotary_pos_emb(q.bfloat16(), k, cos, sin, layout="TND")
    with pytest.raises(NpuEmulatorError, match="4 dims"):
        tn.npu_apply_rotary_pos_emb(q, k, cos, sin)  # default layout BSND needs 4-D
    with pytest.raises(TypeError):
        tn.npu_apply_rotary_pos_emb(q, k, cos, sin, "TND")  # layout is keyword-only
    # rotary_mul half mode == apply_rotary_pos_emb maths
    x = torch.randn(3, 4, 128)
    ref = torch.cat((-x[..., 64:], x[..., :64]), -1) * sin + x * cos
    torch.testing.assert_close(tn.npu_rotary_mul(x, cos, sin), ref)


def test_emulator_format_cast_round_trip(tn):
    w = torch.randn(16, 8)
    assert tn.get_npu_format(w) == 2 and tn.get_npu_format(torch.randn(2, 3, 4, 5)) == 0
    nz = tn.npu_format_cast(w, tn.Format.FRACTAL_NZ)
    assert tn.get_npu_format(nz) == 29 and tn.get_npu_format(w) == 2
    exact(nz, w)
    assert tn.get_npu_format(tn.npu_format_cast(nz, 2)) == 2
    with pytest.raises(NpuEmulatorError, match="acl_format"):
        tn.npu_format_cast(w, 28)
    # fp32 grouped-matmul weights are documented ND-only
    with pytest.raises(NpuEmulatorError, match="ND format only"):
        tn.npu_grouped_matmul([torch.randn(2, 16)], [tn.npu_format_cast(torch.randn(1, 16, 8), 29)],
                              group_list=torch.tensor([2]), split_item=2, group_type=0)


def test_installed_restores_modules():
    import ops
    before_tn = sys.modules.get("torch_npu")
    before_npu = sys.modules.get("ops.npu")
    with npu_emulator.installed() as emu:
        assert sys.modules["torch_npu"] is emu.torch_npu
        assert emu.npu_ops.torch_npu is emu.torch_npu
        assert ops.npu is emu.npu_ops
    assert sys.modules.get("torch_npu") is before_tn
    assert sys.modules.get("ops.npu") is before_npu
    assert getattr(ops, "npu", None) is before_npu


from tests.npu_emulator import emulated_npu  # noqa: E402,F401  (the package's pytest fixture)


def test_emulated_npu_fixture(emulated_npu):
    x = torch.randn(4, 32)
    y = emulated_npu.npu_ops.rms_norm(x, torch.ones(32), 1e-6)
    close(y, cpu.rms_norm(x, torch.ones(32), 1e-6))
    assert emulated_npu.calls.count("npu_rms_norm") == 1
    assert emulated_npu.calls.calls == ["npu_rms_norm"]


# ============================================================================================
# vllm-ascend's own kernels behind the ops (vllm_plugin/npu_kernels.py): the attention's
# prologue (Triton qkv_rmsnorm_rope), the router (moe_gating_top_k) and the W8A8 experts'
# first half (grouped_matmul_swiglu_quant_weight_nz); ops.npu's torch_npu path beside them
# ============================================================================================

def _qkv_inputs(T, hq, hk, d, dtype, max_pos=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, (hq + 2 * hk) * d, generator=g) * 3).to(dtype)
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    cache = rope_cos_sin_cache(d, max_pos, 1_000_000.0)
    pos = torch.randint(0, max_pos, (T,), generator=g)
    return qkv, qw, kw, ops.rope_step(ops.rope_table(cache, dtype), cache.to(dtype), pos)


def _qkv_truth(qkv, qw, kw, rope, hq, hk):
    """The specification in float32: what both bf16 implementations are measured from."""
    cache, pos = rope[2].float(), rope[3]
    r32 = ops.rope_step(ops.rope_table(cache, torch.float32), cache, pos)
    return cpu.qkv_norm_rope(qkv.float(), qw.float(), kw.float(), 1e-6, r32, hq, hk)


@pytest.mark.parametrize("T,hq,hk,d", [(1, 8, 2, 128), (37, 4, 4, 128), (5, 2, 1, 64)])
def test_qkv_norm_rope(be, T, hq, hk, d):
    """ops.npu: npu_rms_norm on q and k, npu_apply_rotary_pos_emb = ops.cpu (bf16)."""
    qkv, qw, kw, rope = _qkv_inputs(T, hq, hk, d, torch.bfloat16)
    got = be.run("qkv_norm_rope", qkv, qw, kw, 1e-6, rope, hq, hk,
                 expect=("npu_rms_norm", "npu_apply_rotary_pos_emb"))
    for a, b in zip(got, cpu.qkv_norm_rope(qkv, qw, kw, 1e-6, rope, hq, hk)):
        close(a, b, torch.bfloat16)


@pytest.mark.parametrize("T,hq,hk", [(1, 8, 2), (37, 4, 4), (300, 16, 2)])
def test_qkv_norm_rope_on_vllm_ascends_triton_kernel(be, T, hq, hk):
    """npu_kernels' qkv_norm_rope on vllm.qkv_rmsnorm_rope: q and k within 2 bf16 ulps of the
    specification, and at most twice as far from its float32 result as the specification is
    (the kernel rounds each product of the rotation to bf16, the specification rotates in
    float32: measured up to 1.5x); v bit-exact; one kernel, nothing read back."""
    qkv, qw, kw, rope = _qkv_inputs(T, hq, hk, 128, torch.bfloat16)
    ref = cpu.qkv_norm_rope(qkv, qw, kw, 1e-6, rope, hq, hk)
    truth = _qkv_truth(qkv, qw, kw, rope, hq, hk)
    with _vllm_ascend_kernels(be) as (impl, calls):
        args = (be.dev(qkv), be.dev(qw), be.dev(kw), 1e-6, be.dev(rope), hq, hk)
        with _no_host_reads():
            got = impl.qkv_norm_rope(*args)
        got = be.host(got)
        if calls is not None:
            assert calls.count("vllm.qkv_rmsnorm_rope") == 1 and not calls.rejected
    for a, b, t in zip(got[:2], ref[:2], truth[:2]):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16
        close(a, b, torch.bfloat16, rtol=2 ** -7, atol=2 * 2 ** -7 * float(b.float().abs().max()))
        err_a = float((a.float() - t).abs().max())
        err_b = float((b.float() - t).abs().max())
        assert err_a <= 2 * err_b, (err_a, err_b)
    exact(got[2].contiguous(), ref[2].contiguous())


def test_qkv_norm_rope_falls_back_where_the_kernel_cannot(be):
    """fp32 activations, head_dim 64 (the kernel is taken as vllm-ascend's fusion pass takes
    it: bf16, head_dim 128): ops.npu runs, equal to it."""
    with _vllm_ascend_kernels(be) as (impl, calls):
        for dtype, d in ((torch.float32, 128), (torch.bfloat16, 64)):
            qkv, qw, kw, rope = _qkv_inputs(5, 4, 2, d, dtype)
            got = be.host(impl.qkv_norm_rope(be.dev(qkv), be.dev(qw), be.dev(kw), 1e-6,
                                             be.dev(rope), 4, 2))
            for a, b in zip(got, be.host(be.npu.qkv_norm_rope(be.dev(qkv), be.dev(qw), be.dev(kw),
                                                                1e-6, be.dev(rope), 4, 2))):
                exact(a, b)
        if calls is not None:
            assert calls.count("vllm.qkv_rmsnorm_rope") == 0


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (300, 128, 8), (9, 16, 2)])
@pytest.mark.parametrize("renorm", [True, False])
def test_moe_gating_topk_on_vllm_ascends_kernel(be, dtype, T, E, k, renorm):
    """npu_kernels' moe_gating_topk on _C_ascend.moe_gating_top_k = ops.cpu: the same experts,
    weights within one rounding to the logits' dtype (the kernel renormalises in float32 and
    rounds once, as the specification)."""
    logits = _distinct_logits(T, E, dtype)
    w_ref, ids_ref = cpu.moe_gating_topk(logits, k, renorm)
    with _vllm_ascend_kernels(be) as (impl, calls):
        dev_logits = be.dev(logits)
        with _no_host_reads():
            w, ids = impl.moe_gating_topk(dev_logits, k, renorm)
        w, ids = be.host((w, ids))
        if calls is not None:
            assert calls.count("_C_ascend.moe_gating_top_k") == 1 and not calls.rejected
    exact(ids, ids_ref)
    assert w.dtype == w_ref.dtype == dtype
    close(w, w_ref, dtype, **({"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else
                              {"rtol": 2 ** -8, "atol": 0}))


@pytest.mark.parametrize("sizes", [[0, 40, 3, 0, 57], [12], [1, 0]])
@pytest.mark.parametrize("past", [0, 7])
def test_grouped_quant_swiglu_quant(be, sizes, past):
    """ops.npu (npu_grouped_matmul, npu_swiglu, npu_dynamic_quant) and npu_kernels' adapter on
    _C_ascend.grouped_matmul_swiglu_quant_weight_nz (after one cumsum) = ops.cpu on the rows of
    the groups: ops.npu to one int8 step, the fused kernel (no bf16 rounding of the GEMM's
    output) within one quantisation step of the float32 result, as the specification is.
    ``past``: rows after the last group (expert parallel), which nobody may read."""
    K, N = 128, 96
    M, G = sum(sizes) + past, len(sizes)
    xq, wq = _int8(M, K), _int8(G, K, N)
    scale = (torch.rand(G, N) * 1e-3 + 1e-4).bfloat16()
    pts = torch.rand(M) * 0.02 + 1e-3
    gs = torch.tensor(sizes, dtype=torch.int64)
    rows = sum(sizes)
    ref_q, ref_s = cpu.grouped_quant_swiglu_quant(xq, wq, scale.float(), pts, gs, torch.bfloat16)
    h = cpu.grouped_quant_matmul(xq, wq, scale.float(), pts, gs, torch.float16)  # no bf16 step
    truth = cpu.swiglu(h.float())[:rows]
    w_arg = be.npu.prepare_weight(be.dev(wq))
    s_arg = be.npu.prepare_expert_scale(be.dev(scale.float()), torch.bfloat16)
    args = (be.dev(xq), w_arg, s_arg, be.dev(pts), be.dev(gs), torch.bfloat16)
    with be.expect("npu_grouped_matmul", "npu_swiglu", "npu_dynamic_quant"):
        q, s = be.host(be.npu.grouped_quant_swiglu_quant(*args))
    assert (q.float()[:rows] - ref_q.float()[:rows]).abs().max() <= 1
    close(s[:rows], ref_s[:rows], torch.float32, rtol=1e-5, atol=0)
    with _vllm_ascend_kernels(be) as (impl, calls):
        with _no_host_reads():
            fq, fs = impl.grouped_quant_swiglu_quant(*args)
        fq, fs = be.host((fq, fs))
        if calls is not None:
            assert calls.count("_C_ascend.grouped_matmul_swiglu_quant_weight_nz") == 1
            assert not calls.rejected
    assert fq.dtype == torch.int8 and fs.dtype == torch.float32 and fq.shape == (M, N // 2)
    for qq, ss in ((fq, fs), (ref_q, ref_s)):
        deq = qq.float()[:rows] * ss[:rows, None]
        assert bool(((deq - truth).abs() <= ss[:rows, None] * 0.51 + truth.abs() * 8e-3).all())


def test_vllm_ascend_kernels_launches(be):
    """Kernels per call: vllm-ascend's path one for the prologue and the router, two for the
    experts' first half (the cumsum and the fused kernel); ops.npu's torch_npu path three,
    three (gating, sum, divide) and three."""
    if not be.emulated:
        pytest.skip("launches are counted by the emulator")
    from tests.npu_emulator.kernels import KernelCounter
    qkv, qw, kw, rope = _qkv_inputs(8, 4, 2, 128, torch.bfloat16)
    logits = _distinct_logits(8, 16, torch.bfloat16)
    xq, wq = _int8(8, 64), _int8(2, 64, 32)
    scale, pts, gs = torch.rand(2, 32).bfloat16(), torch.rand(8), torch.tensor([5, 3])
    w_arg = be.npu.prepare_weight(wq)

    def launched(impl):
        out = []
        for call in (lambda: impl.qkv_norm_rope(qkv, qw, kw, 1e-6, rope, 4, 2),
                     lambda: impl.moe_gating_topk(logits, 4, True),
                     lambda: impl.grouped_quant_swiglu_quant(xq, w_arg, scale, pts, gs)):
            counter = KernelCounter(be.calls)
            with counter:
                call()
            out.append([name for _, name in counter.kernels])
        return out
    with _vllm_ascend_kernels(be) as (impl, _):
        fused = launched(impl)
    assert fused == [["vllm.qkv_rmsnorm_rope"], ["_C_ascend.moe_gating_top_k"],
                     ["aten.cumsum", "_C_ascend.grouped_matmul_swiglu_quant_weight_nz"]], fused
    assert [len(k) for k in launched(be.npu)] == [3, 3, 3]


def test_emulated_moe_and_triton_kernels_fail_as_the_kernels_would(be):
    """The adapters' and tiling checks of moe_gating_top_k, the op definition's of
    grouped_matmul_swiglu_quant_weight_nz (an ND weight), and what qkv_rmsnorm_rope relies on
    unchecked (contiguous bf16 inputs, positions inside the cache)."""
    if not be.emulated:
        pytest.skip("the emulator's strictness")
    from tests.npu_emulator import c_ascend
    qkv, qw, kw, rope = _qkv_inputs(4, 4, 2, 128, torch.bfloat16, max_pos=64)
    xq, wq = _int8(8, 64), _int8(2, 64, 32)
    with c_ascend.installed(be.calls):
        k, t = torch.ops._C_ascend, torch.ops.vllm
        gating = lambda x, kk=2: k.moe_gating_top_k(x, kk, 1, 1, 1, 1, 0, False, 1.0, 1e-20, None)
        nz = be.npu.prepare_weight(wq)
        cases = [
            (lambda: gating(torch.randn(2, 3, 4)), "2-D"),
            (lambda: gating(torch.randn(4, 4096)), "exceeds 2048"),
            (lambda: gating(torch.randn(4, 16), 17), "k must lie"),
            (lambda: k.grouped_matmul_swiglu_quant_weight_nz(
                xq, wq, torch.rand(2, 32), torch.rand(8), torch.tensor([4, 8])), "FRACTAL_NZ"),
            (lambda: k.grouped_matmul_swiglu_quant_weight_nz(
                xq, nz, torch.rand(2, 32), torch.rand(8), torch.tensor([4, 8], dtype=torch.int32)),
             "int64"),
            (lambda: k.grouped_matmul_swiglu_quant_weight_nz(
                xq, nz, torch.rand(2, 32), torch.rand(8), torch.tensor([5, 3])), "cumulative"),
            (lambda: t.qkv_rmsnorm_rope(qkv.float(), rope[2], rope[3], qw, kw, 512, 256, 128, 1e-6),
             "must be bf16"),
            (lambda: t.qkv_rmsnorm_rope(qkv.t().contiguous().t(), rope[2], rope[3], qw, kw, 512,
                                        256, 128, 1e-6), "contiguous"),
            (lambda: t.qkv_rmsnorm_rope(qkv, rope[2][:2].contiguous(), rope[3], qw, kw, 512, 256,
                                        128, 1e-6), "below the cache"),
        ]
        for call, match in cases:
            with pytest.raises(NpuEmulatorError, match=match):
                call()
        assert len(be.calls.rejected) == len(cases)
    assert not c_ascend.present()
