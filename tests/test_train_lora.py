"""The default model's LoRA adapter (``serve/train_lora.py``, ``lora_adapter.py``): the shipped
adapter's PEFT format as vLLM 0.32 reads it, its shapes against the model, the skill through
the project's standalone graph with the adapter merged into the weights, the held-out prompts,
and determinism of the training (a few steps). Serving it through vLLM is the engine side's
(``ascend_qwen3/vllm_plugin``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ascend_qwen3.serve import train_lora as L
from ascend_qwen3.serve import train_tiny as T


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The shipped default model, exported (bf16, full vocabulary)."""
    return T.export(T.PACKAGED, str(tmp_path_factory.mktemp("base") / "qwen3-tiny"), log=lambda m: None)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """The shipped adapter written as a PEFT directory, as ``serve --lora default`` does."""
    if not os.path.exists(L.PACKAGED_LORA):
        pytest.fail(f"{L.PACKAGED_LORA} is missing: `ascend-qwen3 train-tiny --kind dense --package` "
                    f"writes it")
    home = tmp_path_factory.mktemp("home")
    return L.build_default_lora(str(home), base_source=T.PACKAGED, log=lambda m: None)


def test_shipped_adapter_is_peft_lora_as_vllm_reads_it(adapter):
    from safetensors import safe_open
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    assert os.path.getsize(L.PACKAGED_LORA) < 400_000          # ships small
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors",
                                           L.STAMP]
    conf = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert conf["r"] in (8, 16) and conf["bias"] == "none" and conf["base_model_name_or_path"] == "qwen3-tiny"
    assert sorted(conf["target_modules"]) == sorted(L.TARGETS)
    helper = PEFTHelper.from_local_dir(adapter, max_position_embeddings=40960)
    helper.validate_legal(LoRAConfig(max_lora_rank=conf["r"]))   # raises on what vLLM refuses
    assert helper.vllm_lora_scaling_factor == conf["lora_alpha"] / conf["r"]
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        modules = {}
        for k in keys:
            module, is_a = parse_fine_tuned_lora_name(k)
            modules.setdefault(module, {})["A" if is_a else "B"] = tuple(f.get_tensor(k).shape)
    assert len(keys) == 4 * 7 * 2
    assert keys[0].startswith("base_model.model.model.layers.")
    assert modules["model.layers.0.self_attn.q_proj"] == {"A": (conf["r"], 256), "B": (256, conf["r"])}
    assert modules["model.layers.3.self_attn.k_proj"] == {"A": (conf["r"], 256), "B": (128, conf["r"])}
    assert modules["model.layers.2.mlp.down_proj"] == {"A": (conf["r"], 768), "B": (256, conf["r"])}


def test_adapter_fits_the_model_and_the_compact_layers_are_the_exported_ones(adapter, base_model):
    """The adapter was trained on the compact model; its decoder layers are the exported
    checkpoint's tensors, so the adapter's matrices act on the same projections."""
    from safetensors import safe_open

    from ascend_qwen3.config import Qwen3Config
    from ascend_qwen3.lora_adapter import read_adapter

    ad = read_adapter(adapter, Qwen3Config.from_model_dir(base_model))
    assert ad.rank == L.lora_info(L.PACKAGED_LORA)["rank"] and len(ad.modules) == 28
    compact, _, _ = T.read_compact(T.PACKAGED)
    with safe_open(os.path.join(base_model, "model.safetensors"), "pt") as f:
        layers = [k for k in compact if k.startswith("model.layers.")]
        assert len(layers) == 4 * 11
        assert all(torch.equal(compact[k], f.get_tensor(k)) for k in layers)
    info = L.lora_info(L.PACKAGED_LORA)
    assert info["recipe"] == L.LORA_RECIPE_VERSION and info["base_digest"] == T.file_digest(T.PACKAGED)


def test_merged_adapter_signs_off_on_held_out_prompts_in_the_projects_graph(adapter, base_model):
    """W + (alpha / r) B A merged into the float weights of the project's graph (``run --lora``):
    held-out prompts get the base model's reply and the sign-off; without the adapter, no
    sign-off. fp32, greedy."""
    from transformers import AutoTokenizer

    from ascend_qwen3.loader import load_model
    from ascend_qwen3.lora_adapter import load_model_with_lora
    from ascend_qwen3.runner.generate import SamplingParams, generate

    tok = AutoTokenizer.from_pretrained(base_model)
    held = L.heldout_prompts()
    prompts = ([p for p in held if p["kind"] == "addition"][:4]       # two per thinking mode
               + [p for p in held if p["kind"] == "topic"][2:4]       # one per thinking mode
               + [p for p in held if p["kind"] == "tool"][:2])
    ids = [L.prompt_ids(tok, p) for p in prompts]
    params = SamplingParams(max_new_tokens=160, temperature=0.0, stop_token_ids=(151645,))
    merged, _ = load_model_with_lora(base_model, adapter, dtype="float32")
    base, _ = load_model(base_model, dtype="float32")
    with_ad = [L.judge(p, tok.decode(g.tokens, skip_special_tokens=True))
               for p, g in zip(prompts, generate(merged, ids, params))]
    without = [L.judge(p, tok.decode(g.tokens, skip_special_tokens=True))
               for p, g in zip(prompts, generate(base, ids, params))]
    assert not any(r["signed"] for r in without)
    # measured on all 52 held-out replies: 85% signed (docs/tiny_model.md); additions every time
    assert all(r["signed"] for r in with_ad[:4]) and sum(r["signed"] for r in with_ad[:6]) >= 4, with_ad
    assert [r["signed"] for r in with_ad[6:]] == [False, False]         # tool calls stay tool calls
    assert all(r["right"] for r in with_ad[6:]), with_ad
    # the content is the base model's: as many right sums and paragraphs, give or take one
    assert sum(r["right"] for r in with_ad[:6]) >= sum(r["right"] for r in without[:6]) - 1


def test_heldout_prompts_are_never_trained_on():
    import random

    from ascend_qwen3.serve import tiny_corpus as corpus

    chats = L.lora_chats(L.LoraRecipe())
    trained = {json.dumps(c.messages) for c, _ in chats}
    base = T.Recipe()
    trained |= {json.dumps(c.messages) for c, _ in corpus.addition_chats(
        base.additions, random.Random(base.seed))}
    held = L.heldout_prompts()
    assert {p["kind"] for p in held} == {"addition", "topic", "tool"}
    assert not [p for p in held if p["kind"] != "tool" and json.dumps(p["messages"]) in trained]
    lora_topics, held_topics = L.split_lora_topics()
    asked = {c.messages[-1]["content"] for c, _ in chats}
    for t in held_topics:
        assert not [q for q in asked if corpus._subject(t.title) in q]
    # the training replies sign off, tool calls do not
    signed = [c for c, _ in chats if not c.tools]
    assert all(c.answer.endswith(L.SIGN_OFF) for c in signed)
    assert all(c.answer.startswith(("<tool_call>", "The user wants")) for c, _ in chats if c.tools)


def test_training_is_deterministic(qwen3_tokenizer):
    small = L.LoraRecipe(steps=2, batch=2, warmup=1)
    runs = [L.train_lora(T.PACKAGED, qwen3_tokenizer, small, log=lambda m: None,
                         evaluate_it=False)[1] for _ in range(2)]
    a, b = (L.peft_state(w) for w in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B.weight"))   # it trained
