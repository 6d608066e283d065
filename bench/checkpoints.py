"""The benchmark checkpoints (random weights), written once under $ASCEND_QWEN3_HOME/bench.

- ``dense``: the Qwen3-0.6B shape (28 layers, hidden 1024, 16 / 8 heads of 128, FFN 3072, tied
  151,936-token vocabulary), bf16, about 1.2 GB;
- ``moe``: a Qwen3-MoE with Qwen3-30B-A3B's ratios at a quarter of its width and few layers
  (hidden 1024, 16 / 2 heads of 128, 128 experts of FFN 384, top-8, norm_topk_prob, 4 layers,
  the full vocabulary), bf16, about 1.9 GB.

    .venv/bin/python bench/checkpoints.py [dense] [moe]      # prints the directories
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ascend_qwen3.config import FAMILY  # noqa: E402

MOE_30B_RATIOS = dict(FAMILY["Qwen3-30B-A3B"][0], hidden_size=1024, num_attention_heads=16,
                      num_key_value_heads=2, moe_intermediate_size=384, intermediate_size=1536,
                      num_hidden_layers=4)
SHAPES = {"dense": dict(FAMILY["Qwen3-0.6B"][0]), "moe": MOE_30B_RATIOS}


def home() -> str:
    return os.environ.get("ASCEND_QWEN3_HOME") or os.path.join(ROOT, ".cache")


def checkpoint(name: str) -> str:
    """The directory of benchmark checkpoint ``name``, written on first use."""
    import torch

    from ascend_qwen3.checkpoint import write_random_checkpoint

    path = os.path.join(home(), "bench", name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        print(f"writing the {name} benchmark checkpoint to {path}", file=sys.stderr, flush=True)
        tmp = path + ".partial"
        write_random_checkpoint(SHAPES[name], tmp, dtype=torch.bfloat16, seed=0)
        os.replace(tmp, path)
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or sorted(SHAPES):
        print(checkpoint(name))
