"""The thinking budget inside vLLM's engine where the live server cannot easily go: chunked
prefill mixed with decode, preemption and resumption, and tensor parallelism (TP = 2). Several
choices per request (n > 1) are on the live server (``test_vllm_server.py``): vLLM allows them
only with sampling, and its CPU runner cannot replay a seeded request's generator across a
chunked prefill ("CPU Generator does not use offset"), so they are not compared token for token
across the engines here.

One checkpoint, the default model's architecture with random weights (it never closes its
thinking by itself, so the budget always has to), fp32, greedy; chat prompts rendered with the
project's template, so every prompt ends inside ``<think>\\n``. Four engines get the same
requests, each with ``thinking_token_budget`` B:

- ``plain``: the engine as ``make serve`` runs it (TP = 1, vLLM's default batch sizes);
- ``chunked``: at most 24 tokens per step, so the long prompt is prefilled in chunks while the
  others decode;
- ``preempted``: 32-token KV blocks and too few of them for all requests, so vLLM preempts
  requests mid-thinking and resumes them later (the engine's counter must show it);
- ``tp2``: tensor parallel over two processes.

Each choice must carry exactly B - 1 generated thinking tokens (the prompt's newline after
``<think>`` is the first counted) followed by the whole forced text and then the model's answer;
and every engine must give the same tokens (fp32), which is what "a resumed request keeps its
count" means: a count restarted after a preemption would move the forced text.
"""

from __future__ import annotations

import pytest

from ascend_qwen3.thinking import FORCED_END_TEXT
from tests.vllm_support import require_vllm, run_jobs

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BUDGET = 20
MAX_TOKENS = 56
PROCESSOR = "ascend_qwen3.vllm_plugin.thinking:ThinkingBudget"
# the same question twice: two rows of the batch with identical histories, counted apart
QUESTIONS = ["What is 2 + 2?", "Name a colour.", "Why is the sky blue? " * 40, "hi", "hi"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    require_vllm()
    from transformers import AutoTokenizer

    from ascend_qwen3.serve.default_model import build_default_model
    work = tmp_path_factory.mktemp("thinking-engine")
    model = build_default_model(str(work / "tiny-random"), source=None, log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    assert max(map(len, prompts)) > 200 and all(tok.decode(p[-2:]) == "<think>\n" for p in prompts)
    base = {"model": model, "arch": "ours", "dtype": "float32", "tokenizer": True,
            "prompts": prompts, "max_tokens": MAX_TOKENS, "max_model_len": 512, "metrics": True,
            "sampling": {"thinking_token_budget": BUDGET}}
    args = {"logits_processors": [PROCESSOR], "disable_log_stats": False}
    jobs = {
        "plain": dict(base, engine_args=args),
        "chunked": dict(base, engine_args=args, max_num_batched_tokens=24),
        # 32-token blocks (the smallest vLLM's CPU attention takes): the long prompt needs 10 by
        # its end, the others 3 each; 14 blocks do not hold them all at once (and vLLM wants
        # room for one max_model_len request)
        "preempted": dict(base, max_model_len=320,
                          engine_args=dict(args, block_size=32, num_gpu_blocks_override=14)),
    }
    jobs["tp2"] = dict(base, tp=2, engine_args=args)
    # one runner process for the four (the TP 2 engine's workers are processes of their own)
    names = list(jobs)
    out = dict(zip(names, run_jobs([jobs[n] for n in names], str(work / "engines"), tp=2)))
    return {"runs": out, "tok": tok, "prompts": prompts}


def _forced_ids(tok) -> list[int]:
    return tok.encode(FORCED_END_TEXT, add_special_tokens=False)


@pytest.mark.parametrize("name", ["plain", "chunked", "preempted", "tp2"])
def test_every_choice_is_cut_at_the_budget(engines, name):
    forced = _forced_ids(engines["tok"])
    run = engines["runs"][name]
    assert len(run["outputs"]) == len(QUESTIONS)
    for p, out in enumerate(run["outputs"]):
        ids = out["token_ids"]
        assert len(ids) == MAX_TOKENS, (name, p)
        assert ids[BUDGET - 1:BUDGET - 1 + len(forced)] == forced, (name, p, ids)
        assert engines["tok"].convert_tokens_to_ids("</think>") not in ids[:BUDGET - 1]


def test_engines_agree_token_for_token(engines):
    runs = engines["runs"]
    ref = [o["token_ids"] for o in runs["plain"]["outputs"]]
    assert ref[-1] == ref[-2]
    for name in ("chunked", "preempted", "tp2"):
        assert [o["token_ids"] for o in runs[name]["outputs"]] == ref, name


def test_the_engines_did_chunk_and_preempt(engines):
    runs = engines["runs"]
    preempted = runs["preempted"]["metrics"].get("vllm:num_preemptions", 0)
    assert preempted > 0, runs["preempted"]["metrics"]
    assert runs["plain"]["metrics"].get("vllm:num_preemptions", 0) == 0
    # 24 tokens a step cannot hold the long prompt: its prefill took several steps
    assert runs["chunked"]["job"]["max_num_batched_tokens"] < max(map(len, engines["prompts"]))
