"""The ``generation_config.json`` the project's own small models ship with.

vLLM reads a model's generation_config.json for the request defaults (sampling, stop ids, and
``max_new_tokens`` as the default of ``max_tokens``).
"""

from __future__ import annotations

import json
import os

# A request that sets no max_tokens gets this many. A random-weight model almost never emits
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


def write_generation_config(path: str) -> None:
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
