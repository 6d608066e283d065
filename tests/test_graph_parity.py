"""Graph parity with Hugging Face transformers on small random-weight checkpoints (tier 1).

fp32 logits agree within 1e-4 of the logit scale; bf16 within 3e-2 of it against the exact result
(bf16 has 8 bits of mantissa and the error compounds over layers; see the bf16 test); greedy
generation of 32 tokens for 3 prompts of different lengths is token-identical to
``transformers.generate`` in fp32, except where the reference itself has a near-tie.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ascend_qwen3.loader import load_model
from ascend_qwen3.runner.generate import SamplingParams, generate
from ascend_qwen3.runner.kv_cache import PagedKVCache
from tests.checkpoints import load_hf

PROMPTS = [[3, 17, 42, 9, 100, 5, 61], [11, 250], list(range(20, 20 + 45))]
FP32_TOL = 1e-4
BF16_TOL = 3e-2
# a reference top-2 margin below this fraction of the logit scale is a near-tie: rounding
# differences between two correct implementations may pick either token
TIE_MARGIN = 1e-4


def ours_prefill_logits(model, prompts, block_size=16, max_batch_tokens=None):
    """Logits of every prompt token, computed with all prompts packed into shared steps."""
    cache = PagedKVCache(model.config, 64, block_size)
    out = {i: [] for i in range(len(prompts))}
    budget = max_batch_tokens or sum(map(len, prompts))
    done = [0] * len(prompts)
    with torch.inference_mode():
        while any(d < len(p) for d, p in zip(done, prompts)):
            batch, used = [], 0
            for i, p in enumerate(prompts):
                n = min(budget - used, len(p) - done[i])
                if n > 0:
                    batch.append((i, p[done[i]:done[i] + n]))
                    used += n
            positions, meta = cache.prepare([(i, len(t)) for i, t in batch])
            ids = torch.tensor([t for _, toks in batch for t in toks])
            logits = model.compute_logits(model(ids, positions, meta, cache.caches)).float()
            starts = meta.query_start_loc.tolist()
            for r, (i, toks) in enumerate(batch):
                out[i].append(logits[starts[r]:starts[r + 1]])
                done[i] += len(toks)
    return [torch.cat(out[i]) for i in range(len(prompts))]


def hf_logits(hf, prompt):
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("chunk", [None, 13])
def test_fp32_logits_match_transformers(checkpoint, spec_name, chunk):
    path = checkpoint(spec_name)
    hf = load_hf(path)
    model, _ = load_model(path, dtype="float32")
    ours = ours_prefill_logits(model, PROMPTS, block_size=16, max_batch_tokens=chunk)
    for p, got in zip(PROMPTS, ours):
        ref = hf_logits(hf, p)
        assert rel_err(got, ref) < FP32_TOL, (spec_name, rel_err(got, ref))


def per_token_err(a, b):
    """Max |a - b| of each token's logits over the logit scale of b, [tokens]."""
    return (a - b).abs().amax(dim=-1) / b.abs().max()


def test_bf16_logits_match_transformers(checkpoint, spec_name):
    """bf16 error against the exact (fp32) result of the same bf16 weights: every dense token
    within BF16_TOL; for MoE 90% of tokens (a bf16 rounding may flip a near-tied router choice for
    a token, in transformers as in ours); on average no worse than transformers' own bf16 graph."""
    path = checkpoint(spec_name, dtype=torch.bfloat16)
    truth_model = load_hf(path, dtype=torch.float32)   # bf16 weights, exact fp32 compute
    hf_bf16 = load_hf(path, dtype=torch.bfloat16)
    model, cfg = load_model(path)                       # dtype from config.json
    assert cfg.dtype == torch.bfloat16
    ours = ours_prefill_logits(model, PROMPTS)
    errs, hf_errs = [], []
    for p, got in zip(PROMPTS, ours):
        truth = hf_logits(truth_model, p)
        errs.append(per_token_err(got, truth))
        hf_errs.append(per_token_err(hf_logits(hf_bf16, p), truth))
    errs, hf_errs = torch.cat(errs), torch.cat(hf_errs)
    q = 0.9 if cfg.is_moe else 1.0
    assert float(torch.quantile(errs, q)) < BF16_TOL, (spec_name, errs)
    assert float(errs.mean()) <= 1.5 * float(hf_errs.mean()) + 2e-3, (float(errs.mean()),
                                                                    float(hf_errs.mean()))


def test_greedy_generation_matches_transformers(checkpoint, spec_name):
    path = checkpoint(spec_name)
    hf = load_hf(path)
    model, _ = load_model(path, dtype="float32")
    n = 32
    ours = generate(model, PROMPTS, SamplingParams(max_new_tokens=n), block_size=16, keep_logits=True)
    ties = 0
    for p, got in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        ref_tokens = ref.sequences[0, len(p):].tolist()
        assert len(got.tokens) == n
        for step, (a, b) in enumerate(zip(got.tokens, ref_tokens)):
            if a == b:
                continue
            ref_step = ref.logits[step][0].float()
            top2 = torch.topk(ref_step, 2).values
            margin = float(top2[0] - top2[1]) / float(ref_step.abs().max())
            assert margin < TIE_MARGIN, (
                f"{spec_name}: token {step} differs ({a} vs {b}) with a clear reference margin {margin:.2e}")
            # a near-tie: the logits at this step must still agree; after it the sequences diverge
            assert rel_err(got.logits[step], ref_step) < FP32_TOL
            warnings.warn(f"{spec_name}: near-tie at step {step} (margin {margin:.1e}); compared "
                          f"logits instead of tokens from there")
            ties += 1
            break
    assert ties <= 1, "more than one near-tie in one test: suspicious"
