"""The default model's EAGLE-3 draft (``serve/train_draft.py``, ``serve/eagle3_draft.py``): its
training maths, determinism, the checkpoint format vLLM 0.23 and 0.32 load, and the packaged
draft belonging to the packaged target. How well it drafts inside vLLM (the mean acceptance
length on held-out prompts) is measured in test_speculative_engine.py."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from ascend_qwen3.serve import eagle3_draft as E
from ascend_qwen3.serve import train_draft as D
from ascend_qwen3.serve import train_tiny as T

SMALL = D.DraftRecipe(steps=3, batch=2, seq_len=48, warmup=1)


@pytest.fixture(scope="module")
def small_run(qwen3_tokenizer):
    return D.train_draft(T.PACKAGED, qwen3_tokenizer, SMALL, log=lambda m: None)


def test_same_seed_same_draft(small_run, qwen3_tokenizer):
    again = D.train_draft(T.PACKAGED, qwen3_tokenizer, SMALL, log=lambda m: None)[0]
    first = small_run[0].state_for_checkpoint()
    assert all(torch.equal(first[k], v) for k, v in again.state_for_checkpoint().items())


def test_the_unrolled_attention_is_the_drafters_cache(small_run):
    """Step j of anchor t attends to the step-1 keys of positions <= t (what the draft's cache
    holds from the target's features) and to its own anchor's keys of steps 2..j (what vLLM's
    drafter writes in this round), nothing else: compared with a loop over anchors."""
    draft = small_run[0]
    g = torch.Generator().manual_seed(0)
    B, T_, N, H, Hkv, Dh = 2, 7, 5, draft.heads, draft.kv_heads, draft.head_dim
    q = torch.randn(B, N, H, Dh, generator=g)
    keys = [torch.randn(B, T_, Hkv, Dh, generator=g)] + [torch.randn(B, N, Hkv, Dh, generator=g)
                                                         for _ in range(2)]
    values = [torch.randn(B, T_, Hkv, Dh, generator=g)] + [torch.randn(B, N, Hkv, Dh, generator=g)
                                                           for _ in range(2)]
    got = D._attend_ttt(draft, q, keys, values, 3)
    rep = H // Hkv
    for b in range(B):
        for t in range(N):
            k = torch.cat([keys[0][b, :t + 1], keys[1][b, t:t + 1], keys[2][b, t:t + 1]])
            v = torch.cat([values[0][b, :t + 1], values[1][b, t:t + 1], values[2][b, t:t + 1]])
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            s = torch.einsum("hd,shd->hs", q[b, t], k) / math.sqrt(Dh)
            want = torch.einsum("hs,shd->hd", s.softmax(-1), v)
            assert torch.allclose(got[b, t], want, atol=1e-5), (b, t)


def test_checkpoint_is_vllms_llama_eagle3_format(small_run, tmp_path):
    """What vLLM 0.23's and 0.32's Llama EAGLE-3 class loads (vllm/model_executor/models/
    llama_eagle3.py): a Llama config with the layer ids inside eagle_config, a draft vocabulary
    below the target's with d2t (target id = k + d2t[k]), its own lm_head, no embed_tokens, and
    no weight named model.* (the loader adds that prefix)."""
    from safetensors import safe_open

    draft, short, stats = small_run
    path = str(tmp_path / "d.safetensors")
    D.save_compact_draft(draft, short, path, stats, SMALL)
    out = D.export_draft(path, str(tmp_path / "draft"), log=lambda m: None)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert cfg["vocab_size"] == T.VOCAB and cfg["draft_vocab_size"] == len(short) < T.VOCAB
    assert cfg["target_hidden_size"] == cfg["hidden_size"] == 256 and cfg["rope_theta"] == 1e6
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        d2t = f.get_tensor("d2t")
    assert shapes["fc.weight"] == (256, 3 * 256)
    assert shapes["midlayer.self_attn.q_proj.weight"] == (256, 2 * 256)
    assert shapes["midlayer.self_attn.k_proj.weight"] == (128, 2 * 256)
    assert shapes["lm_head.weight"] == (len(short), 256) and shapes["d2t"] == (len(short),)
    assert not [k for k in shapes if k.startswith("model.") or "embed_tokens" in k]
    assert d2t.dtype == torch.int64
    assert (torch.arange(len(short)) + d2t).tolist() == short
    # the exported draft computes what was trained (bf16 weights)
    loaded = E.load(out)
    ref = {k: v.to(torch.bfloat16) for k, v in draft.state_for_checkpoint().items()}
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_for_checkpoint().items())


def test_the_packaged_draft_belongs_to_the_packaged_target(tmp_path):
    """The shipped draft was trained (with the shipped recipe) for the shipped target; a draft
    for another target is refused by name when the default draft is built."""
    from ascend_qwen3.serve.default_model import build_default_draft

    if not os.path.exists(D.PACKAGED_DRAFT):
        pytest.fail(f"{D.PACKAGED_DRAFT} is missing: `ascend-qwen3 train-tiny --kind dense "
                    f"--package` writes it")
    info = D.draft_info(D.PACKAGED_DRAFT)
    assert info["target_digest"] == T.file_digest(T.PACKAGED)
    assert info["recipe"] == D.DRAFT_RECIPE_VERSION and info["steps"] == D.DraftRecipe().steps
    out = build_default_draft(str(tmp_path / "draft"), source=D.PACKAGED_DRAFT,
                              target_source=T.PACKAGED, log=lambda m: None)
    assert json.load(open(os.path.join(out, "config.json")))["draft_vocab_size"] == 6085
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not the target")
    with pytest.raises(ValueError, match="trained for another tiny Qwen3.*make train-tiny"):
        build_default_draft(str(tmp_path / "x"), source=D.PACKAGED_DRAFT, target_source=str(other),
                            log=lambda m: None)


def test_heldout_prompts_are_not_training_samples():
    from ascend_qwen3.serve import tiny_corpus as corpus
    import random

    train = {json.dumps(c.messages) for c, _ in
             corpus.topic_chats(corpus.split_topics()[0], random.Random(0))
             + corpus.addition_chats(3000, random.Random(0)) + corpus.tool_chats(300, random.Random(0))}
    held = D.heldout_prompts()
    assert len(held) == 32 and not [m for m, _ in held if json.dumps(m) in train]
