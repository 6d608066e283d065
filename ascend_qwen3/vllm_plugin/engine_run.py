"""One vLLM engine on one checkpoint, measured: a process of ``ascend-qwen3 npu-acceptance``.

    python -m ascend_qwen3.vllm_plugin.engine_run JOB.json RESULT.json

JOB: ``{"model": dir, "arch": "project" | "builtin", "graph_mode": "FULL_AND_PIECEWISE" |
"PIECEWISE" | "NONE" | null, "tp": 1, "dtype": "bfloat16", "max_model_len": 2048,
"forced_prompts": [[ids...], ...], "greedy": {"prefix": 32, "new": 32}, "decode": {"batch": 8,
"prompt": 128, "new": 64, "repeats": 3}, "vocab": 1000, "speculative": {vLLM's speculative
config} | null, "answers": {"prompts": [[ids...], ...], "new": 64, "repeats": 3}}``. "project" serves the checkpoint with the project's class
(architecture overridden to AscendQwen3[Moe]ForCausalLM), "builtin" with the platform's own
Qwen3 class (vLLM's, with vllm-ascend's layers on an Atlas host). ``graph_mode`` None leaves
vLLM's default (the CPU build captures no graphs); "NONE" runs eagerly.

RESULT: ``{"forced": [{"token_ids", "token_logprobs", "top2"}, ...]`` (teacher forcing, see
``teacher_forced``), ``"greedy": [{"token_ids", "top2"}, ...]`` (each forced prompt's first
``prefix`` tokens continued greedily for ``new`` tokens: the decode path, which on the NPU runs
in the full graphs that prefill never uses), ``"decode_tokens_per_s"``: the median of ``decode_runs`` (tokens/s of a
greedy batch decode, prompts of random ids below ``vocab``), ``"start_seconds"``, and for
``answers`` (chat prompts of the model's domain, where a draft has something to predict):
``"answers": {"tokens_per_s", "runs", "acceptance_length", "drafts", "accepted", "token_ids"}``
(``answer_rate``).

The test suite's engine runner and its judge (tests/vllm_runner.py, tests/vllm_support.py) use
``project_architecture``, ``teacher_forced`` and ``forced_distance`` from here, so the
acceptance report measures engines exactly as the CPU suite judges them.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time


def project_architecture(model_dir: str) -> str:
    """The project's class for a checkpoint: AscendQwen3MoeForCausalLM or AscendQwen3ForCausalLM."""
    from ..config import PROJECT_DENSE_ARCH, PROJECT_MOE_ARCH, Qwen3Config
    return PROJECT_MOE_ARCH if Qwen3Config.from_model_dir(model_dir).is_moe else PROJECT_DENSE_ARCH


def top2(d) -> list:
    """The two most likely (id, logprob) pairs of one step's vLLM logprobs dict."""
    return sorted(((tid, lp.logprob) for tid, lp in d.items()), key=lambda t: -t[1])[:2]


def teacher_forced(llm, prompts: list[list[int]]) -> list[dict]:
    """Score every prompt instead of continuing it (vLLM's ``prompt_logprobs``): per prompt and
    per position i >= 1, ``token_ids`` (the prompt's own token i), ``token_logprobs`` (the
    logprob the engine gives it) and ``top2`` (the two most likely (id, logprob) pairs there).
    Every engine sees the same tokens, so engines compare position by position however their
    own greedy choices would have drifted apart."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2, detokenize=False)
    out = []
    for ids, o in zip(prompts, llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                            sp, use_tqdm=False)):
        steps = o.prompt_logprobs[1:]       # position 0 has none: nothing precedes it
        out.append({"token_ids": list(ids[1:]),
                    "token_logprobs": [d[t].logprob for t, d in zip(ids[1:], steps)],
                    "top2": [top2(d) for d in steps]})
    return out


# an error this large at one position is a discrete event (in a MoE: an expert chosen differently
# somewhere below), not rounding noise; a top-2 margin this large is not a near-tie
LARGE_ERR, CLEAR_MARGIN = 0.1, 0.05


def forced_distance(run: list[dict], truth: list[dict]) -> dict:
    """How far one engine's teacher-forced scores are from another's on the same prompts.

    Per position: the absolute difference of the logprob given to the forced token, and whether
    the top choice differs where ``truth`` is clear about it. Returns {"positions",
    "mean_abs_err", "p50_abs_err", "p90_abs_err", "max_abs_err", "large_errs" (positions with an
    error > LARGE_ERR nats), "clear_top1_disagree" (positions where the truth's top-1 leads its
    top-2 by > CLEAR_MARGIN nats and the run's top-1 is another token)}. Raises ValueError if
    the two did not score the same tokens.
    """
    errs, disagree = [], 0
    for p, (a, b) in enumerate(zip(run, truth, strict=True)):
        if a["token_ids"] != b["token_ids"] or len(a["token_logprobs"]) != len(b["token_logprobs"]):
            raise ValueError(f"prompt {p} was not scored on the same tokens by both runs")
        errs += [abs(x - y) for x, y in zip(a["token_logprobs"], b["token_logprobs"])]
        disagree += sum(ta[0][0] != tb[0][0] and tb[0][1] - tb[1][1] > CLEAR_MARGIN
                        for ta, tb in zip(a["top2"], b["top2"]))
    if not errs:
        raise ValueError("no positions were scored")
    errs.sort()
    n = len(errs)
    return {"positions": n, "mean_abs_err": sum(errs) / n, "p50_abs_err": errs[(n - 1) // 2],
            "p90_abs_err": errs[int(0.9 * (n - 1))], "max_abs_err": errs[-1],
            "large_errs": sum(e > LARGE_ERR for e in errs), "clear_top1_disagree": disagree}


def greedy(llm, prompts: list[list[int]], new: int) -> list[dict]:
    """Continue every prompt greedily for ``new`` tokens (EOS ignored): per prompt the generated
    ``token_ids`` and the ``top2`` of every step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=new, logprobs=2, ignore_eos=True,
                        detokenize=False)
    return [{"token_ids": list(o.outputs[0].token_ids), "top2": [top2(d) for d in o.outputs[0].logprobs]}
            for o in llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp,
                                  use_tqdm=False)]


def greedy_distance(run: list[dict], truth: list[dict]) -> dict:
    """How far one engine's greedy continuations are from another's, of the same prompts.

    Compared up to each prompt's first differing token: there the truth's top-2 margin says
    whether it was a near-tie (< CLEAR_MARGIN nats: rounding may pick either) or a clear
    divergence. Returns {"prompts", "identical" (prompts continued identically), "tokens"
    (positions compared), "max_abs_err" (of the chosen token's logprob where both chose it),
    "near_ties", "clear_divergences"}."""
    same = ties = clear = n = 0
    worst = 0.0
    for a, b in zip(run, truth, strict=True):
        for step, (ta, tb) in enumerate(zip(a["token_ids"], b["token_ids"])):
            if ta != tb:
                margin = b["top2"][step][0][1] - b["top2"][step][1][1]
                ties += margin < CLEAR_MARGIN
                clear += margin >= CLEAR_MARGIN
                break
            worst = max(worst, abs(a["top2"][step][0][1] - b["top2"][step][0][1]))
            n += 1
        else:
            same += len(a["token_ids"]) == len(b["token_ids"])
    return {"prompts": len(run), "identical": same, "tokens": n, "max_abs_err": worst,
            "near_ties": ties, "clear_divergences": clear}


def decode_rate(llm, batch: int, prompt: int, new: int, repeats: int = 3,
                vocab: int = 1000) -> list[float]:
    """Tokens/s of ``repeats`` greedy decodes of ``batch`` random prompts (after a warm-up)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(vocab) for _ in range(prompt)])
               for _ in range(batch)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                         detokenize=False), use_tqdm=False)
    sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        runs.append(batch * new / (time.perf_counter() - t0))
    return runs


SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens")


def _spec_counts(llm) -> dict:
    if not getattr(llm.llm_engine, "log_stats", True):
        raise ValueError("answer_rate reads vLLM's spec-decode counters: start the engine with "
                         "disable_log_stats=False")
    return {m.name: getattr(m, "value", 0) for m in llm.get_metrics() if m.name in SPEC_COUNTERS}


def answer_rate(llm, prompts: list[list[int]], new: int, repeats: int = 3, lora=None) -> dict:
    """Greedy answers to ``prompts`` (all at once: the batch is their number), at most ``new``
    tokens each, stopping where the model stops: generated tokens per second of each of
    ``repeats`` runs (after a warm-up), and, with speculative decoding, vLLM's mean acceptance
    length over the timed runs (1 + accepted draft tokens / drafts; the engine must be started
    with ``disable_log_stats=False``). ``lora``: one ``LoRARequest`` (or None, the base model)
    per prompt, on an engine started with LoRA on."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    sp = SamplingParams(temperature=0.0, max_tokens=new, detokenize=False)
    kw = {"lora_request": list(lora)} if lora is not None and any(lora) else {}
    llm.generate(reqs, sp, use_tqdm=False, **kw)                   # warm-up
    before, runs, ids = _spec_counts(llm), [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(reqs, sp, use_tqdm=False, **kw)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        runs.append(sum(map(len, ids)) / (time.perf_counter() - t0))
    after = _spec_counts(llm)
    drafts = after.get(SPEC_COUNTERS[0], 0) - before.get(SPEC_COUNTERS[0], 0)
    accepted = after.get(SPEC_COUNTERS[1], 0) - before.get(SPEC_COUNTERS[1], 0)
    return {"tokens_per_s": statistics.median(runs), "runs": runs, "token_ids": ids,
            "drafts": drafts, "accepted": accepted,
            "acceptance_length": 1 + accepted / drafts if drafts else None}


def run(job: dict) -> dict:
    from vllm import LLM

    kw = dict(model=job["model"], dtype=job.get("dtype", "bfloat16"), seed=0,
              max_model_len=job.get("max_model_len", 2048), skip_tokenizer_init=True,
              tensor_parallel_size=job.get("tp", 1))
    if job["arch"] == "project":
        kw["hf_overrides"] = {"architectures": [project_architecture(job["model"])]}
    elif job["arch"] != "builtin":
        raise ValueError(f"job arch {job['arch']!r}: use 'project' or 'builtin'")
    if job.get("speculative"):
        kw["speculative_config"] = job["speculative"]
    if job.get("speculative") or job.get("answers"):
        kw["disable_log_stats"] = False     # answer_rate reads the engine's spec-decode counters
    mode = job.get("graph_mode")
    if mode == "NONE":
        kw["enforce_eager"] = True
    elif mode:
        kw["compilation_config"] = {"cudagraph_mode": mode}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    out = {"job": job, "start_seconds": time.perf_counter() - t0, "forced": [], "greedy": [],
           "decode_tokens_per_s": None, "decode_runs": []}
    if job.get("forced_prompts"):
        out["forced"] = teacher_forced(llm, job["forced_prompts"])
    if job.get("greedy"):
        g = job["greedy"]
        out["greedy"] = greedy(llm, [p[:g["prefix"]] for p in job["forced_prompts"]], g["new"])
    dec = job.get("decode")
    if dec:
        out["decode_runs"] = decode_rate(llm, dec["batch"], dec["prompt"], dec["new"],
                                         dec.get("repeats", 3), job.get("vocab", 1000))
        out["decode_tokens_per_s"] = statistics.median(out["decode_runs"])
    ans = job.get("answers")
    if ans:
        out["answers"] = answer_rate(llm, ans["prompts"], ans.get("new", 64), ans.get("repeats", 3))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m ascend_qwen3.vllm_plugin.engine_run JOB.json RESULT.json",
              file=sys.stderr)
        return 2
    job_path, out_path = argv
    with open(job_path) as f:
        job = json.load(f)
    result = run(job)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
