"""Operator micro-benchmarks per backend, at the shapes of the benchmark checkpoints.

Each op of ``ops`` is timed on the backend of the device it runs on (``cpu``: the PyTorch
specification; ``npu``: torch_npu, when an NPU is present) at decode and prefill shapes of the
Qwen3-0.6B shape (hidden 1024, 16 / 8 heads of 128, FFN 3072) and of the MoE benchmark shape
(128 experts of FFN 384, top-8). The figure is the median of ``--repeats`` timed calls after
warm-up, in microseconds; where an op streams a known number of bytes (weights, KV cache), the
effective GB/s is printed beside it. On the CPU the decode attention is timed twice: eager (the
reference) and "(compiled)", as a serving engine that compiles the model runs it
(``ops.compile_kernels``).

    .venv/bin/python bench/op_speed.py [--device cpu|npu] [--repeats 50] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

H, HQ, HKV, D, FFN = 1024, 16, 8, 128, 3072
EXPERTS, TOPK, EFFN = 128, 8, 384
BS = 128


def _sync(device):
    if device.type == "npu":
        torch.npu.synchronize()


# a case run with ops.compile_kernels() on (the CPU backend's decode attention compiled)
COMPILED = " (compiled)"


def timed(fn, device, repeats: int) -> float:
    """Median microseconds of ``fn()`` over ``repeats`` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def cases(be, device, dtype):
    """(name, callable, bytes streamed or 0) for every benchmarked op and shape."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).to(device)

    def int8(*shape):
        return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(device)

    out = []
    for m in (1, 8, 32, 256):
        x = rnd(m, H)
        for n, k in ((2 * FFN, H), (H, FFN)):
            w = be.prepare_linear_weight(rnd(n, k))
            xk = x if k == H else rnd(m, k)
            out.append((f"linear {m}x{k} @ {k}x{n} {str(dtype)[6:]}", lambda xk=xk, w=w: be.linear(xk, w),
                        n * k * dtype.itemsize))
            wq = be.prepare_weight(int8(k, n))
            scale = be.prepare_quant_scale(torch.rand(n, generator=g).to(device), dtype, True)
            out.append((f"dynamic_quant + quant_matmul {m}x{k} @ {k}x{n}",
                        lambda xk=xk, wq=wq, scale=scale: be.quant_matmul(
                            *_dq(be, xk, wq, scale), output_dtype=dtype), n * k))
        out.append((f"rms_norm {m}x{H}", lambda x=x, w=rnd(H): be.rms_norm(x, w, 1e-6), 0))
        out.append((f"swiglu {m}x{2 * FFN}", lambda h=rnd(m, 2 * FFN): be.swiglu(h), 0))
        q, kk = rnd(m, HQ, D), rnd(m, HKV, D)
        import ops
        cos, sin = ops.rope_cos_sin(ops.rope_table(ops.rope_cos_sin_cache(D, 4096, 1e6), dtype)
                                    .to(device), torch.arange(m, device=device))
        out.append((f"rotary_embedding {m} tokens", lambda q=q, kk=kk, cos=cos, sin=sin:
                    be.rotary_embedding(q, kk, cos, sin), 0))
    for reqs, ctx in ((1, 256), (8, 256), (32, 256), (8, 2048)):
        out.append(_attention_case(be, device, dtype, rnd, reqs, ctx, decode=True))
    if be.NAME == "cpu":          # the decode requests as a compiling engine runs them
        for reqs, ctx in ((1, 256), (8, 256), (32, 256), (8, 2048)):
            name, fn, nbytes = _attention_case(be, device, dtype, rnd, reqs, ctx, decode=True)
            out.append((name + COMPILED, fn, nbytes))
    out.append(_attention_case(be, device, dtype, rnd, 1, 1024, decode=False))
    for m in (1, 8, 32):
        x = rnd(m, H)
        w13, w2 = rnd(EXPERTS, H, 2 * EFFN), rnd(EXPERTS, EFFN, H)
        logits = rnd(m, EXPERTS)

        def moe(x=x, w13=w13, w2=w2, logits=logits):
            wts, ids = be.moe_gating_topk(logits, TOPK, True)
            sx, rows, counts = be.moe_route(x, ids, EXPERTS)
            h = be.grouped_matmul(be.swiglu(be.grouped_matmul(sx, w13, counts)), w2, counts)
            return be.moe_combine(h, rows, wts)
        active = min(EXPERTS, m * TOPK) * 3 * H * EFFN * dtype.itemsize
        out.append((f"moe (route, grouped matmuls, combine) {m} tokens", moe, active))
    return out


def _dq(be, x, wq, scale):
    xq, ts = be.dynamic_quant(x)
    return xq, wq, scale, ts


def _attention_case(be, device, dtype, rnd, reqs, ctx, decode):
    """Paged attention: ``reqs`` requests of ``ctx`` keys each; one query each (decode) or all
    ``ctx`` queries (prefill)."""
    blocks = reqs * -(-ctx // BS) + 1
    kc, vc = rnd(blocks, BS, HKV, D), rnd(blocks, BS, HKV, D)
    tables = torch.arange(1, blocks, dtype=torch.int32).view(reqs, -1).to(device)
    lq = 1 if decode else ctx
    starts = [i * lq for i in range(reqs + 1)]
    lens = [ctx] * reqs
    q = rnd(reqs * lq, HQ, D)
    qsl = torch.tensor(starts, dtype=torch.int32, device=device)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    kind = "decode" if decode else "prefill"
    return (f"paged_attention {kind} {reqs} req x {ctx} keys",
            lambda: be.paged_attention(q, kc, vc, tables, qsl, sl, D ** -0.5,
                                       query_start_loc_host=starts, seq_lens_host=lens),
            2 * reqs * ctx * HKV * D * dtype.itemsize)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import ops

    device = torch.device(a.device)
    if device.type == "npu":
        import torch_npu  # noqa: F401
    be = ops.backend_for(device)
    dtype = getattr(torch, a.dtype)
    results = []
    with torch.inference_mode():
        for name, fn, nbytes in cases(be, device, dtype):
            ops.compile_kernels(name.endswith(COMPILED))     # compiling: in the warm-up calls
            us = timed(fn, device, a.repeats)
            ops.compile_kernels(False)
            r = {"op": name, "backend": be.NAME, "us": us}
            if nbytes:
                r["GBps"] = nbytes / us / 1e3
            results.append(r)
            extra = f"  {r['GBps']:6.1f} GB/s" if nbytes else ""
            print(f"{be.NAME:>4} {name:<58} {us:10.1f} us{extra}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(),
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
