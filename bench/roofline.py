"""The memory-bandwidth roofline of decode: measured bandwidth / bytes read per decode step.

Batch-1 decode reads every weight the step uses once (all of a dense model; for a MoE the
shared part plus the experts the token is routed to) and the KV cache of the request, and does
little arithmetic per byte, so a machine's sustained read bandwidth bounds its tokens/s:

    roofline tokens/s = bandwidth / bytes read per token

``bandwidth`` is measured here: the median time to sum a 2 GiB fp32 tensor (a read stream far
larger than any cache), on all of the process's threads. ``bytes_per_token`` is counted from the
checkpoint's config and dtype. For the NPU, the per-profile table in docs/BENCHMARKS.md uses the
same formula with a stated HBM figure (no measurement is possible without the hardware).

    .venv/bin/python bench/roofline.py [--model DIR ...] [--device npu]
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


def measure_read_bandwidth(gib: float = 2.0, repeats: int = 7, device: str = "cpu") -> dict:
    """Sustained read bandwidth in GB/s (10^9 bytes/s): median over ``repeats`` sums of a
    ``gib`` GiB fp32 tensor on ``device`` (an NPU's HBM with ``device="npu"``)."""
    import torch

    if device.startswith("npu"):
        import torch_npu  # noqa: F401
    sync = torch.npu.synchronize if device.startswith("npu") else (lambda: None)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    x.sum()                                            # touch every page once
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        sync()
        times.append(time.perf_counter() - t0)
    nbytes = x.numel() * 4
    return {"read_GBps": nbytes / statistics.median(times) / 1e9,
            "read_GBps_best": nbytes / min(times) / 1e9,
            "bytes": nbytes, "repeats": repeats, "threads": torch.get_num_threads()}


def bytes_per_token(cfg, weight_bytes: float = 2.0, context: int = 0, kv_bytes: float = 2.0,
                    tp: int = 1, ep: int | None = None) -> dict:
    """Bytes one batch-1 decode step reads per rank: weights (``weight_bytes`` per element:
    2 for bf16, about 1 for W8A8, whose scales are negligible) and the KV cache of ``context``
    tokens. Embedding: one row (the lm_head reads the whole matrix, tied or not). Norms are
    counted in the model dtype. MoE: the router and the top-k experts of each layer, spread
    over ``ep`` ranks (default tp; data parallel x tp when expert parallel spans data-parallel
    ranks)."""
    H, L, D = cfg.hidden_size, cfg.num_layers, cfg.head_dim
    q, kv = cfg.q_size, cfg.kv_size
    attn = H * (q + 2 * kv) + q * H                            # qkv + o projections
    if cfg.is_moe:
        ffn = cfg.num_experts_per_tok * 3 * H * cfg.moe_intermediate_size
        router = cfg.num_experts * H
    else:
        ffn, router = 3 * H * cfg.intermediate_size, 0
    linear = L * (attn / tp + ffn / (ep or tp))
    float_elems = L * (router + 2 * H + 2 * D) + H + cfg.vocab_size * H / tp   # router, norms, lm_head
    weights = linear * weight_bytes + float_elems * 2.0 + H * 2.0
    kv_cache = L * 2 * cfg.kv_size * context * kv_bytes / tp
    return {"weights": weights, "kv_cache": kv_cache, "total": weights + kv_cache}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="*", default=[])
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--device", default="cpu", help="cpu, or npu to measure an NPU's HBM")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from ascend_qwen3.config import Qwen3Config

    bw = measure_read_bandwidth(device=a.device)
    out = {"bandwidth": bw, "models": {}}
    print(f"read bandwidth: {bw['read_GBps']:.1f} GB/s (median; best {bw['read_GBps_best']:.1f})")
    for path in a.model:
        cfg = Qwen3Config.from_model_dir(path)
        for name, wb in (("bf16", 2.0), ("w8a8", 1.0)):
            b = bytes_per_token(cfg, weight_bytes=wb, context=a.context)
            tps = bw["read_GBps"] * 1e9 / b["total"]
            out["models"].setdefault(path, {})[name] = dict(b, roofline_tokens_per_s=tps)
            print(f"{os.path.basename(path)} {name}: {b['total'] / 1e9:.3f} GB per token -> "
                  f"{tps:.1f} tokens/s at batch 1")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
