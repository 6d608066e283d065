"""Run vLLM's engine (CPU build) on token prompts and write tokens and logprobs as JSON.

Used by the vLLM tests in a subprocess of their own (vLLM starts processes, holds global state and
needs a ``__main__`` guard)::

    python -m tests.vllm_runner JOBS.json RESULTS.json

JOBS.json is a list of jobs: ``{"model": dir, "arch": "ours" | "builtin", "dtype": "float32",
"tp": 1, "ep": false, "prompts": [[ids...], ...], "max_tokens": 16,
"forced_prompts": [[ids...], ...], "ops_log": dir | null, "compile": false,
"engine_args": {...}, "tokenizer": false, "sampling": {...}, "metrics": false}`` (``compile``: let
vLLM compile the model, as it does by default, instead of ``enforce_eager``; ``engine_args``: more
keyword arguments for ``vllm.LLM``; ``tokenizer``: load the checkpoint's tokenizer, which the
engine otherwise skips; ``sampling``: more ``SamplingParams`` for ``prompts``, e.g.
``thinking_token_budget`` or ``n``; ``metrics``: the engine's counters after the run).
Optional ``"lora"``: ``{"engine": {"enable_lora": true, "max_lora_rank": 16, "max_loras": 2},
"adapters": [{"name": ..., "path": ...} | null, one per prompt], "batches": [[prompt indices],
...], "bad": [{"name": ..., "path": ...}]}``: the engine arguments join ``engine_args``; each
prompt runs with its adapter (a ``LoRARequest``, ids numbered by name; null: the base model);
``batches`` (default: all prompts at once) are ``generate`` calls in turn, the outputs kept in
prompt order; every ``bad`` adapter is first offered to the running engine
(``llm_engine.add_lora``) and its error recorded in ``lora_errors`` (name -> message, or null
if it loaded), then the prompts run on the same engine.
"ours" serves the checkpoint with the project's class (the architecture overridden to
AscendQwen3[Moe]ForCausalLM); "builtin" with vLLM's own Qwen3 / Qwen3-MoE class. One engine per
job does up to two things, and its result says which CPU capability PyTorch ran with:

- ``prompts`` -> ``outputs``: greedy generation (unless ``sampling`` says otherwise); per prompt, the generated ids and the two most
  likely (id, logprob) pairs of each step (and ``choices``: every choice's ids, for ``n`` > 1).
- ``forced_prompts`` -> ``forced``: every prompt is scored, not continued (vLLM's
  ``prompt_logprobs``, i.e. teacher forcing; ``ascend_qwen3.vllm_plugin.engine_run.teacher_forced``,
  which ``ascend-qwen3 npu-acceptance`` uses too): per prompt and per position i >= 1, the
  logprob the engine gives the prompt's own token i and the two most likely (id, logprob) pairs
  there.

The caller sets VLLM_ENABLE_V1_MULTIPROCESSING=0: every job's engine core runs in this process.
Jobs with tp 1 run here entirely; tp > 1 (or pipeline_parallel_size > 1) starts vLLM's
multiprocessing executor, one worker process per rank. Jobs of any world sizes may share a
process, in any order: each job sets the OpenMP binding for its own ranks.
"""

from __future__ import annotations

import json
import os
import sys
import time


JOB_MARK = "[tests.vllm_runner] job "
OMP_BIND = "VLLM_CPU_OMP_THREADS_BIND"
OMP_BIND_AT_START = os.environ.get(OMP_BIND)


def run_job(job: dict) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    import ops
    from ascend_qwen3.vllm_plugin.engine_run import project_architecture, teacher_forced, top2

    if job.get("ops_log"):
        os.environ[ops.LOG_ENV_VAR] = job["ops_log"]
        ops._logged.clear()     # record this job's first calls afresh (in-process engines)
    else:
        os.environ.pop(ops.LOG_ENV_VAR, None)
    kw = {}
    if job["arch"] == "ours":
        kw["hf_overrides"] = {"architectures": [project_architecture(job["model"])]}
    if job.get("ep"):
        kw["enable_expert_parallel"] = True
    kw.update(job.get("engine_args") or {})
    lora = job.get("lora") or {}
    kw.update(lora.get("engine") or {})
    world = job.get("tp", 1) * int(kw.get("pipeline_parallel_size", 1))
    if world > 1:
        # one OpenMP thread per rank, round-robin over the cores (vLLM's CPU worker wants exactly
        # one entry per local rank): set per job, so a process may run engines of several world
        # sizes one after another (the workers are new processes each time and read the
        # variable when they start; vLLM's cache of its variables is reset by
        # cleanup_dist_env_and_memory after each job)
        cores = os.cpu_count() or 1
        os.environ[OMP_BIND] = "|".join(str(r % cores) for r in range(world))
    elif OMP_BIND_AT_START and "|" not in OMP_BIND_AT_START:
        os.environ[OMP_BIND] = OMP_BIND_AT_START    # the caller's binding for one rank
    else:   # vLLM's default for one rank (also after a job of a larger world)
        os.environ.pop(OMP_BIND, None)
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], skip_tokenizer_init=not job.get("tokenizer"),
              dtype=job.get("dtype", "float32"),
              max_model_len=job.get("max_model_len", 512), tensor_parallel_size=job.get("tp", 1),
              enforce_eager=not job.get("compile", False), seed=0,
              max_num_batched_tokens=job.get("max_num_batched_tokens"), **kw)
    t1 = time.perf_counter()
    result = {"job": job, "start_seconds": t1 - t0, "outputs": [],
              "forced": [], "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if job.get("prompts"):
        kw = dict(temperature=0.0, max_tokens=job.get("max_tokens", 16), logprobs=2,
                  detokenize=False, ignore_eos=True)
        sp = SamplingParams(**dict(kw, **(job.get("sampling") or {})))
        requests = _lora_requests(lora, len(job["prompts"]))
        if lora.get("bad"):
            result["lora_errors"] = _offer_bad_adapters(llm, lora["bad"], requests)
        batches = lora.get("batches") or [list(range(len(job["prompts"])))]
        outputs = {}
        for batch in batches:
            outs = llm.generate([TokensPrompt(prompt_token_ids=job["prompts"][i]) for i in batch],
                                sp, use_tqdm=False,
                                lora_request=[requests[i] for i in batch] if lora else None)
            for i, o in zip(batch, outs):
                c = o.outputs[0]
                outputs[i] = {"token_ids": list(c.token_ids), "top2": [top2(d) for d in c.logprobs],
                              "choices": [list(x.token_ids) for x in o.outputs]}
        result["outputs"] = [outputs[i] for i in sorted(outputs)]
    if job.get("metrics"):
        result["metrics"] = {m.name: getattr(m, "value", None) for m in llm.get_metrics()
                             if isinstance(getattr(m, "value", None), (int, float))}
    if job.get("forced_prompts"):
        result["forced"] = teacher_forced(llm, job["forced_prompts"])
    t2 = time.perf_counter()
    del llm
    cleanup_dist_env_and_memory()
    # where a job's time went (the suite's time is mostly engine starts): the engine's start,
    # its requests, its shutdown
    result["run_seconds"], result["stop_seconds"] = t2 - t1, time.perf_counter() - t2
    return result


def _lora_ids(names) -> dict[str, int]:
    ids: dict[str, int] = {}
    for name in names:
        ids.setdefault(name, len(ids) + 1)
    return ids


def _lora_requests(lora: dict, n: int) -> list:
    """One ``LoRARequest`` (or None: the base model) per prompt."""
    from vllm.lora.request import LoRARequest

    adapters = lora.get("adapters") or [None] * n
    assert len(adapters) == n, f"lora.adapters has {len(adapters)} entries for {n} prompts"
    ids = _lora_ids([a["name"] for a in adapters if a] + [a["name"] for a in lora.get("bad", [])])
    return [LoRARequest(a["name"], ids[a["name"]], a["path"]) if a else None for a in adapters]


def _offer_bad_adapters(llm, bad: list[dict], requests: list) -> dict:
    from vllm.lora.request import LoRARequest

    ids = _lora_ids([r.lora_name for r in requests if r] + [a["name"] for a in bad])
    errors = {}
    for a in bad:
        try:
            llm.llm_engine.add_lora(LoRARequest(a["name"], ids[a["name"]], a["path"]))
            errors[a["name"]] = None
        except Exception as exc:      # what a user sees: the message, whatever its type
            errors[a["name"]] = f"{type(exc).__name__}: {exc}"
    return errors


def main(argv: list[str]) -> int:
    jobs_path, out_path = argv
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = []
    for i, job in enumerate(jobs):
        # the caller splits the process's log at these lines: each result gets its own job's
        # lines (``vllm_support.run_jobs``)
        print(f"{JOB_MARK}{i}", flush=True)
        results.append(run_job(job))
    print(f"{JOB_MARK}end", flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
