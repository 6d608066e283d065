"""``ascend-qwen3 npu-acceptance`` (ascend_qwen3/deploy/acceptance.py): the report an Atlas host
attaches to an issue.

- Here, in its CPU mode, for real: the command line builds the default model, runs the
  project's class and vLLM's built-in on vLLM's CPU build, and writes acceptance.md / .json with
  the tier-3 tests and both NPU graph modes marked skipped, and why.
- Its NPU sections through the emulator (tier 2): the report's engine is the project's graph on
  the emulated torch_npu, driven as vllm-ascend 0.23's runner drives it (the ``Runner`` of
  tests/test_full_graph_emulated.py): FULL_AND_PIECEWISE replays the captured decode graph with
  the per-step update, PIECEWISE runs decode eagerly; vllm-ascend's built-in class is not
  emulated, so its runs are reported skipped. The FULL vs PIECEWISE comparison of the report
  agrees, and catches a graph replayed without the update.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from ascend_qwen3.deploy.acceptance import EngineUnavailable, run_acceptance, tier3_tests
from tests.checkpoints import add_tokenizer
from tests.test_full_graph_emulated import S, Requests, Runner, emulated_vllm_ascend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EmulatedEngine:
    """``engine(job)`` for ``run_acceptance`` on the emulated NPU: what ``engine_run`` measures
    in vLLM (teacher-forced scores and greedy continuations), of the project's graph with the
    plugin's attention, prefill eager (vllm-ascend runs it piecewise in both modes), decode
    replayed from the captured graph in FULL_AND_PIECEWISE and eager in PIECEWISE."""

    def __init__(self, emu, runners, update=True):
        self.emu, self.runners, self.update = emu, runners, update
        self.replays = 0

    def __call__(self, job):
        if job["arch"] == "builtin":
            raise EngineUnavailable("vllm-ascend's built-in Qwen3 runs vllm-ascend's own layers "
                                    "and kernels, which the emulator does not model")
        assert job["device"] == "npu" and job["tp"] == 1, job
        full = job["graph_mode"] == "FULL_AND_PIECEWISE"
        run = Runner(self.emu, job["model"])
        if full:
            self.runners[:] = [run]
            run.capture()
        reqs = Requests(run.cfg.vocab_size)

        def logprobs(hidden):
            with torch.inference_mode():
                return torch.log_softmax(run.model.compute_logits(hidden).float(), dim=-1)

        def top2(lp):
            v, i = lp.topk(2)
            return [[int(a), float(b)] for a, b in zip(i.tolist(), v.tolist())]

        forced = []
        for r, ids in enumerate(job["forced_prompts"]):
            lp = logprobs(run.eager(*reqs.step([(r, ids)]))[:-1])
            nxt = torch.tensor(ids[1:])
            forced.append({"token_ids": list(ids[1:]),
                           "token_logprobs": lp.gather(1, nxt[:, None])[:, 0].tolist(),
                           "top2": [top2(row) for row in lp]})
        g, base = job["greedy"], len(job["forced_prompts"])
        rids = [base + i for i in range(len(job["forced_prompts"]))]
        assert len(rids) <= S, "the captured decode size holds every greedy request"
        greedy = [{"token_ids": [], "top2": []} for _ in rids]
        last = []
        for rid, ids in zip(rids, job["forced_prompts"]):       # prefill: eager in both modes
            lp = logprobs(run.eager(*reqs.step([(rid, ids[:g["prefix"]])]))[-1:])
            last.append(lp[0])
        for step in range(g["new"]):
            for out, lp in zip(greedy, last):
                out["top2"].append(top2(lp))
                out["token_ids"].append(out["top2"][-1][0][0])
            if step == g["new"] - 1:
                break
            batch = reqs.step([(rid, [out["token_ids"][-1]]) for rid, out in zip(rids, greedy)])
            if full:
                hidden = run.replay(*batch, update=self.update)
                self.replays += 1
            else:
                hidden = run.eager(*batch)
            last = list(logprobs(hidden))
        return {"forced": forced, "greedy": greedy, "decode_tokens_per_s": None,
                "start_seconds": None, "note": "emulated (tier 2): numbers only, no speed"}


@pytest.fixture(scope="module")
def dense(checkpoint):
    path = checkpoint("dense_yarn", dtype=torch.bfloat16)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        from ascend_qwen3.config import Qwen3Config
        add_tokenizer(path, Qwen3Config.from_model_dir(path).vocab_size)
    return path


def test_npu_sections_through_the_emulator(monkeypatch, tmp_path, dense):
    """On an emulated Atlas host: the tier-3 tests run (and, with no torch_npu here, every one
    skips: the section fails and says so), the project's class runs in both graph modes, the
    built-in class is reported skipped with the reason, FULL_AND_PIECEWISE agrees with
    PIECEWISE on prefill and decode, and the report is written in both formats."""
    tier3 = functools.partial(tier3_tests, paths=("tests/test_ops_npu_emulated.py",))
    with emulated_vllm_ascend(monkeypatch) as (emu, runners):
        engine = EmulatedEngine(emu, runners)
        report = run_acceptance([("dense bf16", dense, 1)], str(tmp_path), npu=True, engine=engine,
                                tier3=tier3, log=lambda m: None)
    assert engine.replays > 0
    tests, model = report["sections"]
    assert tests["status"] == "failed" and "no tier-3 test ran" in tests["why"], tests
    assert "skipped" in tests["data"]["summary"] and "torch_npu" in tests["data"]["tail"]
    runs = model["data"]["runs"]
    assert {k: r["status"] for k, r in runs.items()} == {
        "project / FULL_AND_PIECEWISE": "ok", "builtin / FULL_AND_PIECEWISE": "skipped",
        "project / PIECEWISE": "ok", "builtin / PIECEWISE": "skipped"}, runs
    assert model["status"] == "ok", model["why"]
    assert list(model["data"]["distances"]) == ["project, FULL_AND_PIECEWISE vs PIECEWISE"]
    d = model["data"]["distances"]["project, FULL_AND_PIECEWISE vs PIECEWISE"]
    assert d["forced"]["positions"] == 4 * 95 and d["forced"]["max_abs_err"] == 0.0, d
    g = d["greedy"]
    assert g["clear_divergences"] == 0 and g["tokens"] >= 4 * 16 and g["max_abs_err"] < 0.05, g
    with open(tmp_path / "acceptance.json") as f:
        assert json.load(f) == report
    md = (tmp_path / "acceptance.md").read_text()
    assert "## tier-3 tests (pytest -m npu): failed" in md
    assert "| builtin / PIECEWISE | skipped |" in md and "emulator does not model" in md
    assert "| project, FULL_AND_PIECEWISE vs PIECEWISE | 380 |" in md


def test_report_catches_a_stale_graph(monkeypatch, tmp_path, dense):
    """The same run with the graph replayed without vllm-ascend's per-step update: decode reads
    the capture's lengths, and the report's FULL vs PIECEWISE comparison shows it."""
    with emulated_vllm_ascend(monkeypatch) as (emu, runners):
        report = run_acceptance([("dense bf16", dense, 1)], str(tmp_path), npu=True,
                                engine=EmulatedEngine(emu, runners, update=False),
                                skip_tests="not here", log=lambda m: None)
    assert report["sections"][0]["status"] == "skipped" and report["sections"][0]["why"] == "not here"
    g = report["sections"][1]["data"]["distances"]["project, FULL_AND_PIECEWISE vs PIECEWISE"]["greedy"]
    assert g["identical"] < g["prompts"] and (g["clear_divergences"] > 0 or g["max_abs_err"] > 0.5), g


def test_cpu_mode_writes_the_report(tmp_path):
    """The command itself, here (no vllm-ascend): the default model with the project's class
    and vLLM's built-in on vLLM's CPU build (eager, a small decode), close to each other; the
    tier-3 tests and both NPU graph modes marked skipped, and why."""
    out = tmp_path / "report"
    env = dict(os.environ, ASCEND_QWEN3_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-m", "ascend_qwen3.cli", "npu-acceptance", "--out", str(out),
                        "--cpu-eager", "--decode-batch", "2", "--decode-new", "8", "--repeats", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "acceptance.json").read_text())
    assert report["npu"] is False and "vllm-ascend is not installed" in report["npu_why"]
    tests, model, spec = report["sections"]
    assert tests["status"] == "skipped" and tests["why"].startswith("no NPU here")
    assert model["status"] == "ok" and "FULL_AND_PIECEWISE and PIECEWISE skipped: no NPU here" in model["why"]
    runs = model["data"]["runs"]
    assert sorted(runs) == ["builtin / cpu", "project / cpu"]
    assert all(r["status"] == "ok" and r["decode_tokens_per_s"] > 0 for r in runs.values()), runs
    d = model["data"]["distances"]["project vs builtin, cpu"]
    # bf16 engines on one machine: rounding apart, never a discrete event (the CPU suite's
    # bf16 judgement, tests/test_vllm_engine.py, allows far more)
    assert d["forced"]["positions"] == 380 and d["forced"]["p90_abs_err"] < 0.05, d
    assert d["greedy"]["clear_divergences"] == 0, d
    # the default model with and without its trained EAGLE-3 draft, answering chat prompts
    assert spec["status"] == "ok" and "FULL_AND_PIECEWISE) skipped: no NPU here" in spec["why"], spec
    runs = spec["data"]["runs"]
    assert sorted(runs) == ["project EAGLE-3 / cpu", "project without / cpu"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in runs.values()), runs
    assert runs["project EAGLE-3 / cpu"]["acceptance_length"] > 1.0
    assert runs["project without / cpu"]["acceptance_length"] is None
    assert spec["data"]["speedup"] > 0
    md = (out / "acceptance.md").read_text()
    assert "## tier-3 tests (pytest -m npu): skipped" in md and "| project / cpu | ok |" in md
    assert "## speculative decoding: EAGLE-3, 3 tokens: ok" in md and "Speed-up of EAGLE-3" in md


def test_bad_checkpoint_is_refused_first(tmp_path):
    """A --model that is not a checkpoint is refused before anything runs, with the fix."""
    r = subprocess.run([sys.executable, "-m", "ascend_qwen3.cli", "npu-acceptance", "--model",
                        str(tmp_path / "nope"), "--out", str(tmp_path / "r")], cwd=ROOT,
                       env=dict(os.environ, ASCEND_QWEN3_HOME=str(tmp_path / "home")),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope" in r.stderr and "--model" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "home").exists()
