"""W8A8 accuracy on trained weights: the tiny Qwen3 models of ``ascend-qwen3 train-tiny``.

For the dense and the MoE model (trained, or taken from $ASCEND_QWEN3_HOME/trained when already
there), the bf16 checkpoint and four quantised ones (W8A8 and W8A8_DYNAMIC, each without and with
SmoothQuant alpha 0.5; calibrated on training text, never on the held-out text) are measured:

- held-out perplexity: the held-out pydoc topics (in no training sample), scored in windows of
  512 tokens, over the full 151,936-token vocabulary; next to it the perplexity of the
  random-weight default model of the same shape on the same text;
- teacher-forced top-1 agreement with bf16 on that text (the same tokens for every model);
- greedy agreement on chat prompts (held-out topic questions, new additions, tool questions, in
  thinking mode): the share of answers (up to <|im_end|>, at most 200 tokens) identical to
  bf16's, and the mean share of bf16's tokens before the first difference; plus, for bf16, the share of thinking answers
  that close ``</think>`` and end with ``<|im_end|>`` by themselves.

Each is measured twice: through the project's standalone graph (``runner``) and inside vLLM
(the project's model class, vLLM's CPU engine, ``tests/vllm_runner.py``).

    .venv/bin/python bench/trained_accuracy.py [--skip-vllm]

Results go to docs/quantization.md (between the BENCH trained_accuracy markers) and stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

BEGIN, END = "<!-- BENCH trained_accuracy BEGIN -->", "<!-- BENCH trained_accuracy END -->"
WINDOW = 512
GREEDY_TOKENS = 200
VARIANTS = [("bf16", None, None), ("w8a8", "w8a8", None), ("w8a8 + smooth 0.5", "w8a8", 0.5),
            ("w8a8_dynamic", "w8a8_dynamic", None), ("w8a8_dynamic + smooth 0.5", "w8a8_dynamic", 0.5)]


def windows(texts: list[list[int]]) -> list[list[int]]:
    return [ids[i:i + WINDOW] for ids in texts for i in range(0, len(ids) - 1, WINDOW)
            if len(ids[i:i + WINDOW]) > 1]


def chat_prompts(tok) -> list[list[int]]:
    from ascend_qwen3.serve import tiny_corpus as corpus

    _, held = corpus.split_topics()
    rng = random.Random(1234)
    questions = [q.format(t=corpus._subject(t.title)) for t in held for q in corpus.TOPIC_QUESTIONS[:2]]
    questions += [f"What is {rng.randrange(100)} + {rng.randrange(100)}?" for _ in range(8)]
    questions += ["What is the weather in Paris?", "What time is it in Tokyo?"]
    out = []
    for i, q in enumerate(questions):
        tools = corpus.TOOLS if "weather" in q or "time" in q else None
        text = tok.apply_chat_template([{"role": "user", "content": q}], tools=tools,
                                       add_generation_prompt=True, tokenize=False)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


def standalone(model_dir: str, texts: list[list[int]], prompts: list[list[int]]) -> dict:
    """NLL per scored token, argmax per position, greedy generations, with the project's graph."""
    from ascend_qwen3.loader import load_model
    from ascend_qwen3.runner.generate import SamplingParams, generate
    from tests.test_graph_parity import ours_prefill_logits

    model, _ = load_model(model_dir, max_positions=4096)
    nll, top1 = [], []
    for w in texts:
        (logits,) = ours_prefill_logits(model, [w], block_size=16)
        lp = torch.log_softmax(logits[:-1].float(), -1)
        tgt = torch.tensor(w[1:])
        nll.append(-lp.gather(1, tgt[:, None])[:, 0])
        top1.append(lp.argmax(-1))
    gens = generate(model, prompts, SamplingParams(max_new_tokens=GREEDY_TOKENS, stop_token_ids=()))
    return {"nll": torch.cat(nll), "top1": torch.cat(top1), "greedy": [g.tokens for g in gens]}


def in_vllm(models: dict[str, str], texts, prompts, workdir: str) -> dict[str, dict]:
    """The same measures inside vLLM (bf16 engine, the project's class), one runner process."""
    from tests.vllm_support import run_jobs

    jobs = [{"key": k, "model": m, "arch": "ours", "dtype": "bfloat16", "prompts": prompts,
             "forced_prompts": texts, "max_tokens": GREEDY_TOKENS, "max_model_len": 1024,
             "max_num_batched_tokens": 1024, "ops_log": None} for k, m in models.items()]
    out = {}
    for r in run_jobs(jobs, workdir, timeout=3600):
        nll = torch.tensor([-x for f in r["forced"] for x in f["token_logprobs"]])
        top1 = torch.tensor([f2[0][0] for f in r["forced"] for f2 in f["top2"]])
        out[r["job"]["key"]] = {"nll": nll, "top1": top1,
                                "greedy": [o["token_ids"] for o in r["outputs"]]}
    return out


def answer(tokens: list[int], im_end: int) -> list[int]:
    """A generation up to and including its first <|im_end|> (the engines run past it)."""
    return tokens[:tokens.index(im_end) + 1] if im_end in tokens else tokens


def greedy_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of identical answers, mean share of ``b``'s tokens before the first difference)."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(n / max(1, len(y)))
    return same, sum(prefix) / len(prefix)


def ends_thinking(gens: list[list[int]], end_think: int, im_end: int) -> float:
    ok = [end_think in g and im_end in g[g.index(end_think):] for g in gens]
    return sum(ok) / len(ok)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-vllm", action="store_true", help="only the standalone graph")
    ap.add_argument("--kinds", default="dense,moe", help="which trained models (default dense,moe)")
    ap.add_argument("--home", default=os.environ.get("ASCEND_QWEN3_HOME") or os.path.join(ROOT, ".cache"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "quantization.md"))
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from ascend_qwen3.quantizer import quantize_checkpoint
    from ascend_qwen3.serve import tiny_corpus as corpus
    from ascend_qwen3.serve.default_model import build_default_model
    from ascend_qwen3.serve.train_tiny import heldout_ids, train_tiny

    t_start = time.perf_counter()
    kinds = tuple(args.kinds.split(","))
    trained = train_tiny(args.home, kinds)
    tok = AutoTokenizer.from_pretrained(trained[kinds[0]])
    texts = windows(heldout_ids(tok))
    prompts = chat_prompts(tok)
    im_end, end_think = (tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "</think>"))
    tmp = tempfile.mkdtemp(prefix="trained-accuracy-")
    calib = os.path.join(tmp, "calib.txt")
    train_topics, _ = corpus.split_topics()
    with open(calib, "w") as f:  # training text only: calibration never sees the held-out topics
        f.write("\n\n".join(t.first_paragraph for t in train_topics))
    random_dir = build_default_model(os.path.join(tmp, "random"), log=lambda m: None)
    random_ppl = math.exp(float(standalone(random_dir, texts, prompts[:1])["nll"].mean()))
    n_tokens = sum(len(w) - 1 for w in texts)

    lines = [BEGIN, "", f"Measured {time.strftime('%Y-%m-%d')} on this machine ({os.cpu_count()} "
             f"CPUs, torch {torch.__version__}), `.venv/bin/python bench/trained_accuracy.py`. Held-out "
             f"text: {len(corpus.split_topics()[1])} pydoc topics, {n_tokens} scored tokens in windows "
             f"of {WINDOW}. Chat prompts: {len(prompts)}, greedy, {GREEDY_TOKENS} tokens. "
             f"Calibration: training text (first paragraphs of the training topics), 2048 tokens.", "",
             f"Random-weight model of the dense shape (`qwen3-tiny-random`), same text: perplexity "
             f"**{random_ppl:,.0f}** (a uniform guess over the vocabulary: 151,936).", ""]
    for kind in kinds:
        src = trained[kind]
        dirs = {}
        for label, scheme, smooth in VARIANTS:
            if scheme is None:
                dirs[label] = src
                continue
            out = os.path.join(tmp, f"{kind}-{scheme}-{smooth}")
            quantize_checkpoint(src, out, scheme, calib=calib, smooth=smooth, progress=False)
            dirs[label] = out
        engines = {"standalone graph": {k: standalone(d, texts, prompts) for k, d in dirs.items()}}
        if not args.skip_vllm:
            engines["vLLM (CPU engine)"] = in_vllm(dirs, texts, prompts, os.path.join(tmp, f"vllm-{kind}"))
        lines += [f"### {kind}: `{os.path.basename(src)}`", "",
                  "| engine | weights | held-out perplexity | vs bf16 | top-1 agreement | identical "
                  "greedy | tokens before first difference |", "|---|---|---|---|---|---|---|"]
        for engine, res in engines.items():
            ref = res["bf16"]
            base = math.exp(float(ref["nll"].mean()))
            for label, _, _ in VARIANTS:
                r = res[label]
                ppl = math.exp(float(r["nll"].mean()))
                agree = float((r["top1"] == ref["top1"]).float().mean())
                same, prefix = greedy_agreement([answer(g, im_end) for g in r["greedy"]],
                                                [answer(g, im_end) for g in ref["greedy"]])
                lines.append(f"| {engine} | {label} | {ppl:.2f} | {100 * (ppl / base - 1):+.2f}% | "
                             f"{agree:.4f} | {same:.2f} | {prefix:.2f} |")
                print(lines[-1], flush=True)
            lines.append(f"| {engine} | bf16: share of the thinking answers that close `</think>` "
                         f"and end by themselves within {GREEDY_TOKENS} tokens | "
                         f"{ends_thinking(ref['greedy'], end_think, im_end):.2f} | | | | |")
        lines.append("")
    lines += [f"Whole run: {(time.perf_counter() - t_start) / 60:.0f} minutes.", "", END]
    from bench.docblock import write_block
    write_block(args.out, BEGIN, END, "\n".join(lines))


if __name__ == "__main__":
    main()
