"""The trained tiny Qwen3 (``ascend-qwen3 train-tiny``): its corpus, its training maths, its
reproducibility, and what the packaged model does.

The packaged model (``ascend_qwen3/serve/data/qwen3-tiny.compact.safetensors``) is what
``make serve`` serves on a fresh clone; its numbers are measured here in fp32 through the
project's graph (bf16 results would depend on the machine's ISA).
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from ascend_qwen3.serve import tiny_corpus as corpus
from ascend_qwen3.serve import train_tiny as T

SMALL = T.Recipe(steps=3, batch=2, seq_len=64, additions=40, tool_calls=8, warmup=2)


@pytest.fixture(scope="session")
def tok(qwen3_tokenizer):
    return qwen3_tokenizer


# --- the corpus ----------------------------------------------------------------------------------

def test_held_out_topics_are_in_no_training_sample():
    train, held = corpus.split_topics()
    assert len(held) >= 7 and len(train) >= 60
    assert not {t.name for t in train} & {t.name for t in held}
    import random
    rng = random.Random(0)
    chats = (corpus.topic_chats(train, rng) + corpus.addition_chats(50, rng)
             + corpus.tool_chats(20, rng) + corpus.zen_chats(rng))
    texts = [" ".join((c.answer + json.dumps(c.messages)).split()) for c, _ in chats]
    texts += [" ".join(t.text.split()) for t in train]
    for t in held:
        # topics repeat each other's text ("in" is a part of "comparisons"): the split removes it
        for para in corpus._paragraphs(t.text):
            if len(para) > 40:
                assert not any(para in x for x in texts), (t.name, para)


def test_samples_follow_the_chat_template(tok):
    samples = T.training_samples(tok, SMALL)
    think, end_think, im_end = (tok.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<|im_end|>"))
    chats = [(ids, mask) for ids, mask in samples if mask[0] == 0]
    assert chats and len(chats) < len(samples)        # chats and plain documents
    for ids, mask in chats:
        answer = [t for t, m in zip(ids, mask) if m]
        prompt = ids[:len(ids) - len(answer)]
        assert answer[-1] == im_end and prompt[-1] != im_end
        assert ids[:len(prompt)] == prompt and all(mask[len(prompt):])
        # every answer closes the think block its prompt opened (thinking mode), or the prompt
        # already closed it (non-thinking)
        assert think in prompt[-4:] or end_think in prompt[-6:]
        assert (end_think in answer) == (end_think not in prompt[-6:])
    thinking = sum(end_think in [t for t, m in zip(ids, mask) if m] for ids, mask in chats)
    assert 0.3 < thinking / len(chats) < 0.8


def test_addition_reasoning_is_right():
    for a in range(0, 100, 7):
        for b in range(0, 100, 11):
            text = corpus.addition_reasoning(a, b)
            assert text.endswith(f"So {a} + {b} = {a + b}.")
            m = re.search(r"Tens: (\d+) \+ (\d+)(?: \+ 1)? = (\d+)\.", text)
            assert int(m.group(3)) == (a + b) // 10


# --- the training maths --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tok):
    return T.train("dense", tok, SMALL, log=lambda m: None)


def test_the_compact_loss_is_the_full_vocabulary_loss(small_run, tok):
    """The shortlist + shared-row loss equals the cross-entropy of the exported full-vocabulary
    model (fp32, transformers' own Qwen3, all 151,936 logits)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model, short, samples, _ = small_run
    full = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in T.CONFIGS["dense"].items()
                                          if k not in ("architectures", "model_type")}))
    sd = T.expand_state({k: v.float() for k, v in model.state_dict().items()}, short)
    missing, unexpected = full.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    full.tie_weights()
    remap = {t: i for i, t in enumerate(short)}
    ids = torch.tensor([samples[0][0][:50], samples[-1][0][:50]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        compact = T.compact_loss(model, torch.tensor([[remap[t] for t in r] for r in ids.tolist()]),
                                 mask, T.VOCAB - len(short))
        logits = full(input_ids=ids[:, :-1]).logits
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, T.VOCAB), ids[:, 1:].reshape(-1))
    assert abs(float(compact) - float(ref)) < 1e-5 * float(ref)


def test_same_seed_same_weights_other_seed_other_weights(small_run, tok):
    again = T.train("dense", tok, SMALL, log=lambda m: None)[0].state_dict()
    first = small_run[0].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = T.train("dense", tok, T.Recipe(**{**SMALL.__dict__, "seed": 1}), log=lambda m: None)[0]
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"],
                           other.state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_export_round_trip(small_run, tmp_path):
    """compact file -> Hugging Face checkpoint that the project loads and checks; every unused
    embedding row is the shared row; the stamp names the corpus and the recipe."""
    from ascend_qwen3.check import check_checkpoint

    model, short, _, stats = small_run
    path = str(tmp_path / "c.safetensors")
    T.save_compact("dense", model, short, path, stats, SMALL)
    out = T.export(path, str(tmp_path / "hf"), log=lambda m: None)
    assert check_checkpoint(out, deep=True).ok
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.shape == (T.VOCAB, 256) and emb.dtype == torch.bfloat16
    unused = torch.ones(T.VOCAB, dtype=torch.bool)
    unused[torch.tensor(short)] = False
    assert torch.equal(emb[unused], emb[unused][:1].expand(int(unused.sum()), -1))
    stamp = json.load(open(os.path.join(out, T.STAMP)))
    assert stamp["corpus_digest"] == corpus.corpus_digest() and stamp["steps"] == SMALL.steps
    assert T.is_trained(out) and not os.path.exists(out + ".partial")
    # readable by other users (an image builds it as root and serves it as uid 1000)
    assert all(os.stat(os.path.join(out, f)).st_mode & 0o044 == 0o044 for f in os.listdir(out))
    assert os.stat(path).st_mode & 0o044 == 0o044


# --- the packaged model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    if not os.path.exists(T.PACKAGED):
        pytest.fail(f"{T.PACKAGED} is missing: `ascend-qwen3 train-tiny --kind dense --package` "
                    "writes it")
    return T.export(T.PACKAGED, str(tmp_path_factory.mktemp("packaged") / "qwen3-tiny"),
                    log=lambda m: None)


@pytest.fixture(scope="module")
def packaged_fp32(packaged):
    from ascend_qwen3.loader import load_model
    return load_model(packaged, dtype=torch.float32)[0]


def _ppl(model, texts) -> float:
    from tests.test_graph_parity import ours_prefill_logits

    nll = []
    for ids in texts:
        (logits,) = ours_prefill_logits(model, [ids], block_size=16)
        lp = torch.log_softmax(logits[:-1].float(), -1)
        nll.append(-lp.gather(1, torch.tensor(ids[1:])[:, None]))
    return math.exp(float(torch.cat(nll).mean()))


def test_held_out_perplexity_far_below_random(packaged_fp32, tok, tmp_path):
    from ascend_qwen3.loader import load_model
    from ascend_qwen3.serve.default_model import build_default_model

    texts = [ids[:256] for ids in T.heldout_ids(tok)]
    trained = _ppl(packaged_fp32, texts)
    rnd = build_default_model(str(tmp_path / "random"), log=lambda m: None)
    random_ppl = _ppl(load_model(rnd, dtype=torch.float32)[0], texts)
    # measured 578 against 219,326 (fp32): a tiny model trained on 0.4 M tokens generalises little,
    # but hundreds of times better than chance
    assert trained < 2000 and random_ppl > 50_000 and random_ppl > 100 * trained, (trained, random_ppl)


def _answer(model, tok, question, **kw) -> str:
    from ascend_qwen3.runner.generate import SamplingParams, generate

    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False, **kw)
    (g,) = generate(model, [tok.encode(text, add_special_tokens=False)],
                    SamplingParams(max_new_tokens=200, stop_token_ids=(tok.convert_tokens_to_ids("<|im_end|>"),)))
    assert g.finished_by_stop, "the model must end its answer by itself"
    return tok.decode(g.tokens[:-1])


def test_thinking_answer_closes_its_reasoning(packaged_fp32, tok):
    """Thinking mode (the template opened <think>): reasoning, </think>, an answer, <|im_end|>."""
    for q in ["What is 2 + 2?", "Tell me about the \"while\" statement in Python."]:
        text = _answer(packaged_fp32, tok, q)
        reasoning, sep, answer = text.partition("</think>")
        assert sep and reasoning.strip() and answer.strip(), text


def test_non_thinking_answer_has_no_reasoning(packaged_fp32, tok):
    for kw, q in [({"enable_thinking": False}, "What is 23 + 45?"), ({}, "What is 23 + 45? /no_think")]:
        text = _answer(packaged_fp32, tok, q, **kw)
        assert "</think>" not in text and re.fullmatch(r"23 \+ 45 = \d+\.", text.strip()), text


def test_reasoning_helps_additions(packaged_fp32, tok):
    """40 additions of two-digit numbers (not a training list: a seed of their own), greedy:
    with digit-by-digit reasoning the model gets most right, answering directly far fewer
    (measured 38/40 and 15/40 in fp32)."""
    import random

    from ascend_qwen3.runner.generate import SamplingParams, generate

    rng = random.Random(7)
    pairs = [(rng.randrange(100), rng.randrange(100)) for _ in range(40)]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    right = {}
    for think in (True, False):
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}],
                                                      add_generation_prompt=True, tokenize=False,
                                                      enable_thinking=think), add_special_tokens=False)
                   for a, b in pairs]
        gens = generate(packaged_fp32, prompts, SamplingParams(max_new_tokens=120, stop_token_ids=(im_end,)))
        right[think] = sum(tok.decode(g.tokens[:-1]).split("</think>")[-1].strip() == f"{a} + {b} = {a + b}."
                           for (a, b), g in zip(pairs, gens))
    assert right[True] >= 30 and right[False] <= right[True] - 10, right


def test_serve_default_is_the_trained_model(small_run, tmp_path, monkeypatch, capsys):
    """`serve` without --model: the user's own train-tiny result, else the packaged one, else
    random weights (with a hint); the served name follows."""
    from ascend_qwen3.cli import main
    from ascend_qwen3.serve.default_model import served_name

    home = tmp_path / "home"
    monkeypatch.setenv("ASCEND_QWEN3_HOME", str(home))

    def served() -> tuple[str, str]:
        assert main(["serve", "--dry-run"]) == 0
        out = capsys.readouterr()
        return served_name(str(home / "default-model")), out.err

    if os.path.exists(T.PACKAGED):
        assert T.default_source(str(home)) == T.PACKAGED
        assert served()[0] == "qwen3-tiny"
    model, short, _, stats = small_run
    own = T.compact_path(str(home), "dense")
    T.save_compact("dense", model, short, own, stats, SMALL)
    assert T.default_source(str(home)) == own
    name, err = served()
    assert name == "qwen3-tiny" and "building the embedded default model (qwen3-tiny: trained" in err
    with open(home / "default-model" / T.STAMP) as f:
        assert json.load(f)["steps"] == SMALL.steps          # rebuilt from the user's own file
    os.remove(own)
    monkeypatch.setattr(T, "PACKAGED", str(tmp_path / "absent.safetensors"))
    name, err = served()
    assert name == "qwen3-tiny-random" and "make train-tiny" in err


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_exported_checkpoint_is_the_trained_model(kind, tok, tmp_path):
    """transformers loads the exported checkpoint (MoE: one tensor per expert, as Qwen3-MoE
    checkpoints are stored) and gives the trained compact model's logits, exactly."""
    from transformers import AutoModelForCausalLM

    model, short, _, stats = T.train(kind, tok, SMALL, log=lambda m: None)
    path = str(tmp_path / "c.safetensors")
    T.save_compact(kind, model, short, path, stats, SMALL)
    out = T.export(path, str(tmp_path / kind), log=lambda m: None)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    compact, short, _ = T.read_compact(path)
    ref = T.compact_model(kind, len(short) + 1, 0)
    ref.load_state_dict({k: v.float() for k, v in compact.items()}, strict=False)
    ref.tie_weights()
    ids = short[10:40]
    with torch.no_grad():
        full = hf(input_ids=torch.tensor([ids])).logits[0]
        small = ref(input_ids=torch.tensor([list(range(10, 40))])).logits[0]
    assert torch.equal(full[:, short], small[:, :-1])
    others = torch.ones(T.VOCAB, dtype=torch.bool)
    others[torch.tensor(short)] = False
    assert torch.equal(full[:, others], small[:, -1:].expand(-1, int(others.sum())))
