"""The embedded default model: a small random-weight Qwen3 with the real Qwen3 tokenizer.

What ``make serve`` serves on a machine without a checkpoint: the Qwen3 architecture at toy
size (4 layers, hidden 256, 4 query / 2 KV heads of 64, tied embeddings) with the full
151,936-entry vocabulary, the real tokenizer (built from quicktok-v1), the project's chat
template with Qwen3's thinking behaviour and Qwen3's generation defaults for thinking mode. Its
weights are random: it exercises the whole serving path (tokenizer, template, engine, parsers)
and answers with fluent-looking nonsense. About 80 MB in bf16; built in seconds, once.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..checkpoint import write_random_checkpoint
from .tokenizer import write_qwen3_tokenizer

NAME = "qwen3-tiny-random"

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
    "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 768,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "max_position_embeddings": 40960, "tie_word_embeddings": True, "attention_bias": False,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    "use_sliding_window": False, "sliding_window": None, "max_window_layers": 4,
    "bos_token_id": 151643, "eos_token_id": 151645,
}

# A request that sets no max_tokens gets this many (vLLM reads ``max_new_tokens`` from
# generation_config.json as the default of max_tokens). A random-weight model almost never emits
# end-of-sequence, so without it such a request would run to max_model_len (40,960 tokens: about
# 25 minutes here); 256 tokens take seconds. A request may still ask for more.
DEFAULT_MAX_TOKENS = 256

# Qwen3's published generation_config.json (the thinking-mode sampling defaults and both stop
# ids), plus the default output length above
GENERATION_CONFIG = {
    "bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
    "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
    "max_new_tokens": DEFAULT_MAX_TOKENS,
}

STAMP = "ascend_qwen3_default_model.json"
# bumped whenever the files written below change, so an older build is rebuilt
BUILD_VERSION = 2


def is_built(path: str) -> bool:
    try:
        with open(os.path.join(path, STAMP)) as f:
            return json.load(f).get("build") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def build_default_model(path: str, *, seed: int = 0, force: bool = False, log=print) -> str:
    """Build the default model in ``path`` (a no-op if it is already there). Written to
    ``path + '.partial'`` and renamed at the end, so an interrupted build never looks finished."""
    if is_built(path) and not force:
        return path
    tmp = path.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"building the embedded default model ({NAME}: random weights, real Qwen3 tokenizer) in {path}")
    write_random_checkpoint(CONFIG, tmp, dtype=torch.bfloat16, seed=seed)
    write_qwen3_tokenizer(tmp)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump({"name": NAME, "seed": seed, "build": BUILD_VERSION,
                   "weights": "random (not a trained model)"}, f)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
