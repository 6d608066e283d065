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
