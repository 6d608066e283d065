"""What the thinking-budget logits processor costs per decode step, at batch 1 and 64.

vLLM calls every custom logits processor once per step: ``update_state`` (with the batch's
changes, ``None`` on most decode steps) and then ``apply`` on the step's logits (fp32,
[batch, vocab], vocab 151,936 for Qwen3). This drives ``ThinkingBudget`` exactly so, with the
real Qwen3 tokenizer's ids and each row's output growing by one token per step, in four cases:

- ``no processor``: the step without it (nothing to call; the floor, for reference);
- ``no budgets``: the processor loaded, no request in the batch has a budget (the cost every
  request pays for the feature being on);
- ``budgets, thinking``: every request has a budget not yet reached (counting only);
- ``budgets, forcing``: every request is writing the forced text (a masked row per request).

Each figure is the median over ``--steps`` steps of ``--repeats`` runs, in microseconds.

    .venv/bin/python bench/thinking_budget.py [--batch 1 64] [--steps 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = 151936
CASES = ("no processor", "no budgets", "budgets, thinking", "budgets, forcing")


def _tokens():
    import tempfile

    from transformers import AutoTokenizer

    from ascend_qwen3.serve.tokenizer import write_qwen3_tokenizer
    from ascend_qwen3.thinking import ThinkingTokens
    with tempfile.TemporaryDirectory() as d:
        write_qwen3_tokenizer(d)
        return ThinkingTokens.from_tokenizer(AutoTokenizer.from_pretrained(d))


def _one(case: str, batch: int, steps: int, tokens) -> list[float]:
    """Seconds per step over ``steps`` decode steps of one batch."""
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate

    from ascend_qwen3.vllm_plugin.thinking import ThinkingBudget

    class Params:
        thinking_token_budget, extra_args = None, None

    prompt = [151644, 872, 198, 3838, 374, 220, 17, 488, 220, 17, 30, 151645, 198, 151644,
              77091, 198, tokens.think_start, 198]            # "...<|im_start|>assistant\n<think>\n"
    proc = None if case == "no processor" else ThinkingBudget.for_tokens(tokens)
    outputs = [[] for _ in range(batch)]
    if proc is not None:
        added = []
        for i in range(batch):
            p = Params()
            if case != "no budgets":
                p.thinking_token_budget = 0 if case == "budgets, forcing" else 10**6
                ThinkingBudget.validate_params(p)
            added.append((i, p, prompt, outputs[i]))
        proc.update_state(BatchUpdate(batch_size=batch, removed=[], added=added, moved=[]))
    logits = torch.randn(batch, VOCAB)
    times = []
    out = None
    for step in range(steps):
        out = None                     # free the last step's logits before the clock starts
        fresh = logits.clone()         # the sampler's logits of this step (not timed)
        t0 = time.perf_counter()
        if proc is not None:
            proc.update_state(None)
            out = proc.apply(fresh)
        else:
            out = fresh
        times.append(time.perf_counter() - t0)
        chosen = out.argmax(dim=-1).tolist()   # the sampler's pick (not timed)
        for row, token in zip(outputs, chosen):
            row.append(token)
    if case == "budgets, forcing":       # every timed step forced a token in every row
        assert all(r[:steps] == list(tokens.forced_end[:steps]) for r in outputs), outputs[0]
    return times


def measure(batches=(1, 64), steps: int = 20, repeats: int = 5) -> list[dict]:
    import torch

    tokens = _tokens()
    steps = min(steps, len(tokens.forced_end))      # forcing lasts as long as the forced text
    rows = []
    for batch in batches:
        for case in CASES:
            per_step = []
            for _ in range(repeats):
                per_step += _one(case, batch, steps, tokens)
            rows.append({"batch": batch, "case": case, "us": statistics.median(per_step) * 1e6,
                         "us_p90": sorted(per_step)[int(0.9 * (len(per_step) - 1))] * 1e6,
                         "steps": len(per_step)})
            print(f"batch {batch:3d}  {case:18s}  {rows[-1]['us']:9.1f} µs/step", flush=True)
    return [dict(r, threads=torch.get_num_threads()) for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = measure(a.batch, a.steps, a.repeats)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
