"""Generation loop, loader variants (sharded, fp16) and the `run` command."""

import subprocess
import sys

import pytest
import torch

from ascend_qwen3.cli import main
from ascend_qwen3.loader import load_model
from ascend_qwen3.runner.generate import SamplingParams, generate, sample
from ascend_qwen3.runner.kv_cache import CacheFullError, PagedKVCache
from tests.checkpoints import add_tokenizer, load_hf

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], list(range(60, 93))]


def test_sampling_is_seeded_and_differs_from_greedy(checkpoint):
    model, _ = load_model(checkpoint("dense_tied"), dtype="float32")
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    a = [g.tokens for g in generate(model, PROMPTS, p)]
    b = [g.tokens for g in generate(model, PROMPTS, p)]
    c = [g.tokens for g in generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0,
                                                                    top_p=0.9, top_k=20, seed=8))]
    greedy = [g.tokens for g in generate(model, PROMPTS, SamplingParams(max_new_tokens=12))]
    assert a == b
    assert a != c and a != greedy


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 2000)
    g = torch.Generator().manual_seed(0)
    k2 = sample(logits, SamplingParams(temperature=1.0, top_k=2), g)
    assert set(k2.tolist()) == {0, 1}
    # probabilities 0.636, 0.234, 0.086, ...: top_p=0.8 keeps the first two only
    p8 = sample(logits, SamplingParams(temperature=1.0, top_p=0.8), g)
    assert set(p8.tolist()) == {0, 1}
    full = sample(logits, SamplingParams(temperature=1.0), g)
    assert len(set(full.tolist())) >= 4


def test_chunked_prefill_and_block_sizes_agree(checkpoint):
    model, _ = load_model(checkpoint("moe_norm"), dtype="float32")
    p = SamplingParams(max_new_tokens=10)
    ref = [g.tokens for g in generate(model, PROMPTS, p, block_size=128)]
    for bs, chunk in [(4, None), (16, 5), (7, 11)]:
        got = [g.tokens for g in generate(model, PROMPTS, p, block_size=bs, max_batch_tokens=chunk)]
        assert got == ref, (bs, chunk)


def test_stop_tokens_end_generation(checkpoint):
    model, _ = load_model(checkpoint("dense_tied"), dtype="float32")
    first = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=8))[0].tokens
    stopped = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=8, stop_token_ids=(first[2],)))[0]
    assert stopped.finished_by_stop and stopped.tokens == first[:first.index(first[2]) + 1]


def test_cache_full_error(checkpoint):
    model, cfg = load_model(checkpoint("dense_tied"), dtype="float32")
    cache = PagedKVCache(cfg, num_blocks=2, block_size=4)
    with pytest.raises(CacheFullError, match="needs 3 more block"):
        cache.prepare([(0, 9)])


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_sharded_index_checkpoint_loads_identically(checkpoint):
    one = checkpoint("dense_yarn")
    sharded = checkpoint("dense_yarn", max_shard_size="200KB")
    import os
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    a, _ = load_model(one, dtype="float32")
    b, _ = load_model(sharded, dtype="float32")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_fp16_checkpoint(checkpoint):
    path = checkpoint("dense_tied", dtype=torch.float16)
    model, cfg = load_model(path)
    assert cfg.dtype == torch.float16 and model.embed_tokens.weight.dtype == torch.float16
    hf = load_hf(path, dtype=torch.float32)
    got = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=4), keep_logits=True)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert float((got.logits[0] - ref).abs().max() / ref.abs().max()) < 2e-2


def test_run_command_prints_generated_text(checkpoint, tmp_path, capsys):
    import shutil
    path = str(tmp_path / "m")
    shutil.copytree(checkpoint("dense_tied"), path)
    add_tokenizer(path, 384)
    assert main(["run", "--model", path, "--prompt", "The quick brown fox", "--max-new-tokens", "8",
                 "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "8 generated tokens" in err and "backend cpu" in err
    # the printed text is the decoding of the graph's greedy tokens
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model, _ = load_model(path)
    ids = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    toks = generate(model, [ids], SamplingParams(max_new_tokens=8))[0].tokens
    assert out.rstrip("\n") == tok.decode(toks)
    assert main(["run", "--model", path, "--prompt", "hi", "--chat", "--no-think",
                 "--max-new-tokens", "3"]) == 0


def test_console_script_entry_point(checkpoint, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ascend_qwen3.cli", "run", "--model", str(tmp_path),
                        "--prompt", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr
