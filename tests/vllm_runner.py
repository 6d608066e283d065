"""Run greedy generations in vLLM's engine (CPU build) and write tokens and logprobs as JSON.

Used by the vLLM tests in a subprocess of their own (vLLM starts processes, holds global state and
needs a ``__main__`` guard)::

    python -m tests.vllm_runner JOBS.json RESULTS.json

JOBS.json is a list of jobs: ``{"model": dir, "arch": "ours" | "builtin", "dtype": "float32",
"tp": 1, "ep": false, "prompts": [[ids...], ...], "max_tokens": 16, "ops_log": dir | null}``.
"ours" serves the checkpoint with the project's class (the architecture overridden to
AscendQwen3[Moe]ForCausalLM); "builtin" with vLLM's own Qwen3 / Qwen3-MoE class. Every result
holds, per prompt, the generated ids and the two most likely (id, logprob) pairs of each step.
Jobs with tp 1 run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine in-process,
which the caller sets); tp > 1 needs the multiprocessing executor.
"""

from __future__ import annotations

import json
import os
import sys
import time


def run_job(job: dict) -> dict:
    import ops
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    from ascend_qwen3.config import Qwen3Config

    if job.get("ops_log"):
        os.environ[ops.LOG_ENV_VAR] = job["ops_log"]
        ops._logged.clear()     # record this job's first calls afresh (in-process engines)
    else:
        os.environ.pop(ops.LOG_ENV_VAR, None)
    kw = {}
    if job["arch"] == "ours":
        cfg = Qwen3Config.from_model_dir(job["model"])
        kw["hf_overrides"] = {"architectures": [
            "AscendQwen3MoeForCausalLM" if cfg.is_moe else "AscendQwen3ForCausalLM"]}
    if job.get("ep"):
        kw["enable_expert_parallel"] = True
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype=job.get("dtype", "float32"),
              max_model_len=job.get("max_model_len", 512), tensor_parallel_size=job.get("tp", 1),
              enforce_eager=True, seed=0,
              max_num_batched_tokens=job.get("max_num_batched_tokens"), **kw)
    started = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 16), logprobs=2,
                        detokenize=False, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], sp,
                        use_tqdm=False)
    result = {"job": job, "start_seconds": started, "outputs": []}
    for o in outs:
        c = o.outputs[0]
        steps = [sorted(((tid, lp.logprob) for tid, lp in d.items()), key=lambda t: -t[1])[:2]
                 for d in c.logprobs]
        result["outputs"].append({"token_ids": list(c.token_ids), "top2": steps})
    del llm
    cleanup_dist_env_and_memory()
    return result


def main(argv: list[str]) -> int:
    jobs_path, out_path = argv
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = [run_job(job) for job in jobs]
    with open(out_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
