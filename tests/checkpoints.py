"""Small random-weight Qwen3 / Qwen3-MoE checkpoints made with transformers, for the test suite.

Weights are re-drawn with scales that give varied, non-degenerate logits (transformers' default
init of std 0.02 makes tiny models repeat one token), then saved with ``save_pretrained``.
"""

from __future__ import annotations

import math
import os

import torch

# name -> config kwargs (transformers spelling); each covers a different corner of the family
SPECS: dict[str, dict] = {
    # dense, tied embeddings, GQA 2, small head_dim
    "dense_tied": dict(kind="dense", vocab_size=384, hidden_size=96, intermediate_size=192,
                       num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                       tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=4096),
    # dense, untied, YaRN, head_dim 128, GQA 4
    "dense_yarn": dict(kind="dense", vocab_size=320, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                       tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=131072,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 32768}),
    # MoE, norm_topk_prob true, GQA 8, one dense layer via mlp_only_layers
    "moe_norm": dict(kind="moe", vocab_size=288, hidden_size=64, intermediate_size=160,
                     moe_intermediate_size=48, num_hidden_layers=3, num_attention_heads=8,
                     num_key_value_heads=1, head_dim=16, num_experts=8, num_experts_per_tok=2,
                     norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False,
                     rope_theta=1000000.0, max_position_embeddings=4096),
    # MoE, norm_topk_prob false, GQA 1 (MHA), top-4 of 16
    "moe_plain": dict(kind="moe", vocab_size=256, hidden_size=64, intermediate_size=128,
                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=16, num_experts=16, num_experts_per_tok=4,
                      norm_topk_prob=False, tie_word_embeddings=False, rope_theta=1000000.0,
                      max_position_embeddings=4096),
}


def hf_config(spec: dict):
    from transformers import Qwen3Config, Qwen3MoeConfig

    kw = {k: v for k, v in spec.items() if k != "kind"}
    rope = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    if "rope_scaling" in kw:
        rope = dict(kw.pop("rope_scaling"), rope_theta=rope["rope_theta"])
    kw["rope_parameters"] = rope
    cls = Qwen3MoeConfig if spec["kind"] == "moe" else Qwen3Config
    return cls(**kw)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norm weights around 1
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p.shape[-1]
            std = 1.0 / math.sqrt(fan_in)
            if "embed" in name:
                # with tied embeddings a large embedding makes the LM head echo the input token
                std = 0.05 if model.config.tie_word_embeddings else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make_checkpoint(name: str, path: str, *, dtype=torch.float32, seed: int = 0,
                    max_shard_size: str | None = None, **overrides) -> str:
    """Write checkpoint ``name`` of SPECS (with overrides) to ``path``; returns path."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    spec = dict(SPECS[name], **overrides)
    cfg = hf_config(spec)
    torch.manual_seed(seed)
    cls = Qwen3MoeForCausalLM if spec["kind"] == "moe" else Qwen3ForCausalLM
    model = cls(cfg)
    randomize(model, seed)
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, **kw)
    return path


def load_hf(path: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ascend NPUs run large language models; Qwen3 thinks before it answers.",
    "Hello world! Bonjour le monde. Hallo Welt. 你好，世界。",
    "def add(a, b):\n    return a + b\n",
    "Tensor parallelism splits attention heads and feed-forward columns over devices.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def add_tokenizer(path: str, vocab_size: int) -> None:
    """A small byte-level BPE tokenizer (trained here on CORPUS) with Qwen-style specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer needs {tok.get_vocab_size()} ids, the model has {vocab_size}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


# the projections a LoRA adapter may target, by Hugging Face / PEFT name
LORA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_MLP = ("gate_proj", "up_proj", "down_proj")


def make_lora_adapter(path: str, model_dir: str, *, r: int, target_modules=LORA_ATTENTION + LORA_MLP,
                      lora_alpha: float | None = None, seed: int = 0, strength: float = 0.3,
                      hidden_size: int | None = None, layers=None, extra: dict | None = None) -> str:
    """Write a random PEFT LoRA adapter for the checkpoint in ``model_dir`` to ``path``:
    ``adapter_config.json`` (peft_type LORA, r, lora_alpha, target_modules,
    base_model_name_or_path) and ``adapter_model.safetensors`` with PEFT's names,
    ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in] and
    ``...lora_B.weight`` [out, r] (vLLM reads them with vllm/lora/utils.py
    parse_fine_tuned_lora_name). Unlike PEFT's initialisation (B = 0), both matrices are random,
    so the adapter changes the model's output: B A x has about ``strength`` x the size of the
    base projection's output (lora_alpha defaults to r, a scaling of 1).

    MLP modules go to the layers that have a dense MLP (all, or a MoE model's
    ``mlp_only_layers``); ``hidden_size`` overrides the model's (an adapter for another model);
    ``layers``: the layer ids to cover (default: all); ``extra``: more modules, PEFT path after
    ``base_model.model.`` -> (in, out), e.g. ``{"lm_head": (hidden, vocab)}``."""
    import json

    from safetensors.torch import save_file

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    hidden = hidden_size or cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    inter = cfg["intermediate_size"]
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    moe = "num_experts" in cfg
    dense_layers = set(cfg.get("mlp_only_layers") or []) if moe else None
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in (range(cfg["num_hidden_layers"]) if layers is None else layers):
        for name in target_modules:
            if name in LORA_MLP and dense_layers is not None and i not in dense_layers:
                continue
            where = "self_attn" if name in LORA_ATTENTION else "mlp"
            k, n = shapes[name]
            key = f"base_model.model.model.layers.{i}.{where}.{name}"
            tensors[key + ".lora_A.weight"] = torch.randn(r, k, generator=g) / math.sqrt(k)
            tensors[key + ".lora_B.weight"] = torch.randn(n, r, generator=g) * strength / math.sqrt(r)
    for key, (k, n) in (extra or {}).items():
        key = "base_model.model." + key
        tensors[key + ".lora_A.weight"] = torch.randn(r, k, generator=g) / math.sqrt(k)
        tensors[key + ".lora_B.weight"] = torch.randn(n, r, generator=g) * strength / math.sqrt(r)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha or r,
                   "target_modules": list(target_modules) + [k.rsplit(".", 1)[-1] for k in extra or {}],
                   "base_model_name_or_path": model_dir,
                   "bias": "none", "task_type": "CAUSAL_LM", "lora_dropout": 0.0}, f, indent=1)
    return path


# Sentence-Transformers files as Qwen3-Embedding ships them (https://huggingface.co/Qwen/
# Qwen3-Embedding-0.6B: modules.json, 1_Pooling/config.json): the transformer, last-token
# pooling, L2 normalisation. vLLM reads them (vllm/transformers_utils/config.py
# get_pooling_config) for the pooler's defaults: LAST pooling, normalised.
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def st_pooling(hidden: int) -> dict:
    return {"word_embedding_dimension": hidden, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True, "include_prompt": True}


def make_embedding_checkpoint(path: str, name: str = "dense_tied", *, dtype=torch.float32,
                              seed: int = 0, **overrides) -> str:
    """A Qwen3-Embedding-shaped checkpoint of SPECS[name] (dense) at ``path``: the backbone only,
    saved as a bare ``Qwen3Model`` (tensor names without the ``model.`` prefix, no
    ``lm_head``), config.json naming ``Qwen3ForCausalLM`` (as Qwen3-Embedding's does), the
    Sentence-Transformers pooling files and a small tokenizer. Returns path."""
    import json

    from safetensors.torch import save_file
    from transformers import Qwen3ForCausalLM

    spec = dict(SPECS[name], **overrides)
    if spec["kind"] != "dense":
        raise ValueError(f"{name} is not a dense spec; Qwen3-Embedding is dense")
    cfg = hf_config(spec)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    randomize(model, seed)
    backbone = model.model.to(dtype)
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.torch_dtype = dtype
    cfg.to_json_file(os.path.join(path, "config.json"))
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(ST_MODULES, f, indent=2)
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump(st_pooling(spec["hidden_size"]), f, indent=2)
    add_tokenizer(path, spec["vocab_size"])
    return path
