"""Tensor and expert parallelism on the CPU over gloo: TP=1/2/4/8 and EP give the TP=1 result."""

from __future__ import annotations

import pytest
import torch

from ascend_qwen3.loader import load_model
from ascend_qwen3.model.generate import SamplingParams, generate
from ascend_qwen3.parallel.launch import run_parallel

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], list(range(60, 93))]
N_NEW = 8


def _job(ctx, path):
    """Runs on every rank: greedy tokens and the logits of every generated step."""
    model, _ = load_model(path, dtype="float32", ctx=ctx)
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=N_NEW), keep_logits=True, block_size=16)
    return [o.tokens for o in out], [torch.stack(o.logits) for o in out]


def _check(path, tp, ep, ref):
    results = run_parallel(_job, tp, path, ep=ep)
    ref_tokens, ref_logits = ref
    for rank, (tokens, logits) in enumerate(results):
        assert tokens == ref_tokens, f"tp={tp} ep={ep} rank {rank}: tokens differ from tp=1"
        for a, b in zip(logits, ref_logits):
            # fp32: the all-reduce sums partial products in another order than one big matmul
            assert float((a - b).abs().max() / b.abs().max()) < 1e-5


CASES = [  # (checkpoint, overrides, tp sizes)
    ("dense_yarn", {}, [2, 4, 8]),                                    # 2 KV heads: replicated at 4, 8
    ("dense_yarn", {"tie_word_embeddings": True, "vocab_size": 330}, [4]),  # padded vocab shard, tied
    ("moe_norm", {}, [2, 4, 8]),                                      # 1 KV head, a dense layer too
]


@pytest.mark.parametrize("name,overrides,tps", CASES, ids=["dense", "dense_tied_padded_vocab", "moe"])
def test_tp_matches_tp1(checkpoint, name, overrides, tps):
    path = checkpoint(name, **overrides)
    ref = run_parallel(_job, 1, path)[0]
    for tp in tps:
        _check(path, tp, False, ref)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_expert_parallel_matches(checkpoint, tp):
    path = checkpoint("moe_norm")
    ref = run_parallel(_job, 1, path)[0]
    _check(path, tp, True, ref)
