"""Peak memory per rank while loading a sharded checkpoint, TP=1 vs TP=2 vs TP=4, side by side.

Writes a random-weight checkpoint of a family shape (default: Qwen3-0.6B in bf16, ~1.2 GB,
sharded in 256 MB files), then loads it in 1, 2 and 4 gloo processes. Each rank reports its
parameter bytes, the growth of its anonymous memory (RssAnon: what the loaded weights really
occupy) and of its peak resident set (VmHWM, which also counts mmapped checkpoint pages touched
while reading). Results go to docs/parallel.md (section between the BENCH markers) and stdout.

    .venv/bin/python bench/load_memory.py [--model Qwen3-0.6B] [--tp 1 2 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _load_job(ctx, path):
    import torch

    from ascend_qwen3.loader import load_model
    anon0, hwm0, rss0 = _status_kb("RssAnon"), _status_kb("VmHWM"), _status_kb("VmRSS")
    t0 = time.perf_counter()
    model, _ = load_model(path, ctx=ctx, max_positions=4096)
    secs = time.perf_counter() - t0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    anon = _status_kb("RssAnon") - anon0
    peak = _status_kb("VmHWM") - max(hwm0, rss0)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"params_mb": params / 2**20, "anon_mb": anon / 1024, "peak_mb": peak / 1024, "secs": secs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen3-0.6B")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "parallel.md"))
    args = ap.parse_args()

    from ascend_qwen3.checkpoint import write_random_checkpoint
    from ascend_qwen3.config import FAMILY
    from ascend_qwen3.parallel.launch import run_parallel

    with tempfile.TemporaryDirectory(prefix="aq3-bench") as tmp:
        t0 = time.perf_counter()
        path = write_random_checkpoint(FAMILY[args.model][0], os.path.join(tmp, "ckpt"),
                                       max_shard_bytes=256 * 2**20)
        files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        ckpt_mb = sum(os.path.getsize(os.path.join(path, f)) for f in files) / 2**20
        print(f"checkpoint {args.model} bf16: {ckpt_mb:.0f} MB in {len(files)} files "
              f"({time.perf_counter() - t0:.0f}s to write)")
        rows = {tp: [] for tp in args.tp}
        for rep in range(args.repeats):          # interleaved: tp sizes side by side per repeat
            for tp in args.tp:
                res = run_parallel(_load_job, tp, path) if tp > 1 else _spawned_single(path)
                rows[tp].append(res)
                print(f"repeat {rep} tp={tp}: " + ", ".join(
                    f"rank{r} anon {x['anon_mb']:.0f} MB peak +{x['peak_mb']:.0f} MB" for r, x in enumerate(res)))

    lines = [f"Model: {args.model} shape, random bf16 weights, checkpoint {ckpt_mb:.0f} MB in "
             f"{len(files)} safetensors files; {args.repeats} interleaved repeats, medians over "
             f"repeats and ranks. Machine: {os.cpu_count()} cores.", "",
             "| tp | params per rank (MB) | anon growth per rank (MB) | peak RSS growth per rank (MB) "
             "| params / checkpoint | load time (s) |", "|---|---|---|---|---|---|"]
    for tp, reps in rows.items():
        flat = [x for res in reps for x in res]
        med = {k: statistics.median(x[k] for x in flat) for k in flat[0]}
        lines.append(f"| {tp} | {med['params_mb']:.0f} | {med['anon_mb']:.0f} | {med['peak_mb']:.0f} | "
                     f"{med['params_mb'] / ckpt_mb:.2f} | {med['secs']:.1f} |")
    table = "\n".join(lines)
    print(table)
    _write_section(args.out, table)


def _spawned_single(path):
    # tp=1 also in a fresh process, so every row starts from the same baseline
    from ascend_qwen3.parallel.launch import run_parallel_spawned
    return run_parallel_spawned(_load_job, 1, path)


def _write_section(out: str, table: str) -> None:
    begin, end = "<!-- BENCH load_memory BEGIN -->", "<!-- BENCH load_memory END -->"
    text = open(out).read() if os.path.exists(out) else ""
    block = f"{begin}\n{table}\n{end}"
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
