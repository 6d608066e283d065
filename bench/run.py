"""``make bench``: every benchmark of the project in one run, written to docs/BENCHMARKS.md.

Sections (each runs its engines side by side, one after another, in this run):

- ``roofline``: measured read bandwidth and the decode roofline of each checkpoint;
- ``ops``: operator micro-benchmarks of the CPU backend (and the NPU backend where present);
- ``decode``: decode and prefill speed and peak memory of transformers, the project's standalone
  graph, vLLM's built-in class and the project's class inside vLLM, batch 1 / 8 / 32, on the
  0.6B-shaped dense checkpoint and the 30B-A3B-ratio MoE checkpoint (``bench/checkpoints.py``);
- ``w8a8``: the dense checkpoint in bf16, W8A8 (static) and W8A8_DYNAMIC, through the
  standalone graph and the project's class inside vLLM;
- ``serving``: TTFT / TPOT / ITL / end-to-end latency from ``vllm bench serve`` against the
  server ``make serve`` starts, the project's class vs vLLM's built-in;
- ``thinking``: what the thinking-budget logits processor costs per decode step at batch 1 and
  64, without and with budgets (``bench/thinking_budget.py``);
- ``speculative``: decode speed of the embedded default model at batch 1 and 8 without
  speculation and with EAGLE-3, a draft model and n-gram, the project's class and vLLM's
  built-in in the same interleaved rounds (``bench/speculative.py``);
- ``lora``: decode speed of the embedded default model at batch 1 and 8 without LoRA, with one
  adapter and with four, the project's class and vLLM's built-in with the same adapters in the
  same interleaved rounds (``bench/lora.py``).

Results are kept in docs/bench/results.json (a section run again replaces its own entry, with
its date, machine and command) and rendered into docs/BENCHMARKS.md with PNG figures in
docs/bench/.

    .venv/bin/python bench/run.py [--only decode w8a8 ...] [--repeats 3] [--quick]
    .venv/bin/python bench/run.py --render        # re-render the doc from results.json
    python bench/run.py --profile NAME            # on an Atlas server (make bench BENCH_ARGS=...)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

RESULTS = os.path.join(ROOT, "docs", "bench", "results.json")
SECTIONS = ("roofline", "ops", "decode", "w8a8", "serving", "thinking", "speculative", "lora")


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True).stdout.strip()
    except OSError:
        commit = ""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC")}


def run_section(name: str, a) -> dict:
    import checkpoints
    import decode

    if name == "roofline":
        import roofline

        from ascend_qwen3.config import Qwen3Config, family_config
        if a.profile:      # on an Atlas server: the NPU's HBM and the profile's model
            from ascend_qwen3.deploy.profiles import load_profile
            p = load_profile(a.profile)
            bw = roofline.measure_read_bandwidth(device="npu")
            cfg, tp = family_config(p["model"]), p["tp"]
            named = [(p["name"], cfg, 1.0 if p["precision"].startswith("w8a8") else 2.0, tp)]
        else:
            bw = roofline.measure_read_bandwidth()
            named = [(f"{ck} {scheme}", Qwen3Config.from_model_dir(checkpoints.checkpoint(ck)), wb, 1)
                     for ck in ("dense", "moe") for scheme, wb in (("bf16", 2.0), ("w8a8", 1.0))]
        models = {}
        for label, cfg, wb, tp in named:
            b = roofline.bytes_per_token(cfg, weight_bytes=wb, context=a.prompt + a.new // 2, tp=tp)
            models[label] = dict(b, tokens_per_s=bw["read_GBps"] * 1e9 / b["total"])
        return {"bandwidth": bw, "models": models}
    if name == "ops":
        import op_speed
        import torch

        import ops

        rows = []
        devices = ["cpu"] + (["npu"] if ops.npu_visible() else [])
        for dev in devices:
            path = os.path.join(ROOT, "docs", "bench", f".ops-{dev}.json")
            op_speed.main(["--device", dev, "--json", path, "--repeats", str(20 if a.quick else 50)])
            with open(path) as f:
                rows += json.load(f)["results"]
            os.remove(path)
        return {"results": rows, "threads": torch.get_num_threads()}
    if name == "decode":
        rows = []
        for ck in ("dense", "moe"):
            path = checkpoints.checkpoint(ck)
            for batch in a.batch:
                rows += _side_by_side(decode, decode.ENGINES, [(path, ck)], batch, a)
        return {"results": rows, "rounds": a.rounds}
    if name == "w8a8":
        rows = []
        variants = [(checkpoints.checkpoint(v), v) for v in ("dense", "dense-w8a8", "dense-w8a8_dynamic")]
        for batch in a.batch[:1 if a.quick else 2]:
            # vLLM's built-in class on the bf16 file, in the same rounds: the project's
            # quantised checkpoints against the platform's own Qwen3
            rows += _side_by_side(decode, ("standalone", "vllm-ours"), variants, batch, a,
                                  extra=[(variants[0][0], "dense", "vllm-builtin")])
        return {"results": rows, "rounds": a.rounds}
    if name == "thinking":
        import thinking_budget

        return {"results": thinking_budget.measure((1, 64), repeats=3 if a.quick else 5)}
    if name == "speculative":
        import speculative

        # answers of at most 2 x --new tokens (64 with --quick), a.repeats runs per process,
        # a.rounds processes per (method, engine) in _rounds' order
        return speculative.section(a, _rounds)
    if name == "lora":
        import lora

        # the speculative section's prompts and timing, at most 2 x --new tokens per answer
        return lora.section(a, _rounds)
    if name == "serving":
        import serving

        out = os.path.join(ROOT, "docs", "bench", ".serving.json")
        target = ["--profile", a.profile] if a.profile else ["--model", checkpoints.checkpoint("dense")]
        serving.main([*target, "--json", out, "--concurrency", *map(str, a.concurrency)])
        with open(out) as f:
            rows = json.load(f)
        os.remove(out)
        return {"results": rows}
    raise ValueError(name)


def _side_by_side(decode, engines, checkpoints, batch, a, extra=()) -> list[dict]:
    """Every (checkpoint, engine) pair at ``batch`` (and the (path, label, engine) triples of
    ``extra``), the vLLM engines in ``a.rounds`` interleaved rounds (``_rounds``), the others
    once; each pair's figures are the medians over all its runs."""
    import statistics

    runs: dict[tuple, list[dict]] = {}
    pairs = [(path, label, engine) for path, label in checkpoints for engine in engines]
    for path, label, engine in _rounds(pairs + list(extra), a.rounds):
        runs.setdefault((label, engine), []).append(_decode(decode, engine, path, label, batch, a))
    merged = []
    for (label, engine), rs in runs.items():
        r = dict(rs[0])
        r["runs"] = [x for one in rs for x in one["runs"]]
        r["decode_tokens_per_s"] = statistics.median(r["runs"])
        for key in ("prefill_tokens_per_s", "generate_seconds_median"):
            r[key] = statistics.median(one[key] for one in rs)
        r["peak_rss_gib"] = max(one["peak_rss_gib"] for one in rs)
        r["read_GBps"] = statistics.median(one["read_GBps"] for one in rs)
        merged.append(r)
    return merged


def _rounds(items: list[tuple], rounds: int) -> list[tuple]:
    """The order of the runs: every (path, label, engine) in the first round; the vLLM engines
    (whose ratio is the target) again in each later round, every other round in reverse
    (A B C, C B A, A B C, ...). This shared machine drifts, by up to 1.4x over half an hour
    between processes of one engine: interleaving puts a slow spell on every engine alike, and
    the reversal keeps a steady drift from always favouring whichever engine runs first."""
    order = []
    for round_ in range(rounds):
        now = items if round_ == 0 else [i for i in items if i[2].startswith("vllm")]
        order += now[::-1] if round_ % 2 else now
    return order


def _decode(decode, engine, path, label, batch, a) -> dict:
    import roofline

    # the read bandwidth right before the engine runs: this shared machine's bandwidth drifts
    # (2x between runs an hour apart was seen), so each result's roofline share uses its own
    bw = roofline.measure_read_bandwidth(gib=1.0, repeats=5)["read_GBps"]
    r = decode.run_in_subprocess(engine, path, batch, a.prompt, a.new, a.repeats, "bfloat16")
    r["checkpoint"], r["read_GBps"] = label, bw
    print(f"{label:>20} {engine:>13} batch {batch:>2}: decode {r['decode_tokens_per_s']:8.1f} "
          f"tokens/s, prefill {r['prefill_tokens_per_s']:8.1f} tokens/s, peak "
          f"{r['peak_rss_gib']:.2f} GiB", flush=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine process")
    ap.add_argument("--rounds", type=int, default=2, help="engine processes per engine, interleaved")
    ap.add_argument("--quick", action="store_true",
                    help="batch 1 and 8, 32 new tokens, 2 runs per process (28 minutes on 2 "
                         "cores, a fraction of the full run)")
    ap.add_argument("--render", action="store_true", help="only re-render docs/BENCHMARKS.md")
    ap.add_argument("--profile", default=None,
                    help="on an Atlas server: measure the NPU (HBM bandwidth, the NPU ops, "
                         "vllm bench serve against this served deploy profile)")
    a = ap.parse_args(argv)
    from ascend_qwen3.deploy.launcher import CPU_MALLOC_ENV
    if any(os.environ.get(k) != v for k, v in CPU_MALLOC_ENV.items()):
        # measure with the allocator settings `ascend-qwen3 serve` gives a CPU server (they must
        # be in the environment when the process starts): run again with them
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or [])],
                  dict(os.environ, **CPU_MALLOC_ENV))
    if a.quick:
        a.batch, a.new, a.repeats = [1, 8], 32, 2
    if a.profile:
        skipped = [n for n in a.only if n in ("decode", "w8a8", "speculative", "lora")]
        if skipped:
            print(f"--profile: {', '.join(skipped)} skipped (they compare engines on vLLM's CPU "
                  f"build); the NPU sections are roofline, ops and serving", flush=True)
        a.only = [n for n in a.only if n not in skipped]
    import render

    results = {}
    if os.path.isfile(RESULTS):
        with open(RESULTS) as f:
            results = json.load(f)
    if not a.render:
        command = "make bench" + (f" BENCH_ARGS={shlex.quote(' '.join(argv))}" if argv else "")
        for name in a.only:
            print(f"== {name}", flush=True)
            results[name] = dict(run_section(name, a), machine=machine(), command=command)
            os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
            with open(RESULTS, "w") as f:
                json.dump(results, f, indent=1)
    render.write(results)
    print(f"wrote docs/BENCHMARKS.md and docs/bench/*.png from {os.path.relpath(RESULTS, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
