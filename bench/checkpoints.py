"""The benchmark checkpoints (random weights), written once under $ASCEND_QWEN3_HOME/bench.

- ``dense``: the Qwen3-0.6B shape (28 layers, hidden 1024, 16 / 8 heads of 128, FFN 3072, tied
  151,936-token vocabulary), bf16, about 1.2 GB;
- ``moe``: a Qwen3-MoE with Qwen3-30B-A3B's ratios at a quarter of its width and few layers
  (hidden 1024, 16 / 2 heads of 128, 128 experts of FFN 384, top-8, norm_topk_prob, 4 layers,
  the full vocabulary), bf16, about 1.9 GB.

- ``dense-w8a8`` / ``dense-w8a8_dynamic`` (and the same for ``moe``): quantised by the
  project's quantizer from those.

    .venv/bin/python bench/checkpoints.py [dense] [moe] [dense-w8a8] ...  # prints the directories
"""

from __future__ import annotations

import os
import shutil
import subprocess
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


QUANTIZED = ("w8a8", "w8a8_dynamic")


def checkpoint(name: str) -> str:
    """The directory of benchmark checkpoint ``name``, written on first use: a shape of SHAPES
    (random weights and the real Qwen3 tokenizer, so a server can take text), or
    ``<shape>-<scheme>`` for that checkpoint quantised to W8A8 by the project's quantizer
    (built-in calibration text, no smoothing)."""
    path = os.path.join(home(), "bench", name)
    if os.path.isfile(os.path.join(path, "config.json")):
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):   # written by an older version
            from ascend_qwen3.serve.tokenizer import write_qwen3_tokenizer
            write_qwen3_tokenizer(path)
        return path
    shape, _, scheme = name.partition("-")
    if shape not in SHAPES or (scheme and scheme not in QUANTIZED):
        raise SystemExit(f"no benchmark checkpoint {name!r}; use one of "
                         f"{', '.join(sorted(SHAPES))}, optionally with -{' or -'.join(QUANTIZED)}")
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if scheme:
        source = checkpoint(shape)
        print(f"quantising {source} to {scheme} in {path}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "ascend_qwen3.cli", "quantize", "--model", source,
                        "--out", tmp, "--scheme", scheme], check=True, cwd=ROOT)
        if not os.path.isfile(os.path.join(tmp, "tokenizer.json")):
            from ascend_qwen3.serve.tokenizer import write_qwen3_tokenizer
            write_qwen3_tokenizer(tmp)
    else:
        import torch

        from ascend_qwen3.checkpoint import write_random_checkpoint
        from ascend_qwen3.serve.tokenizer import write_qwen3_tokenizer

        print(f"writing the {name} benchmark checkpoint to {path}", file=sys.stderr, flush=True)
        write_random_checkpoint(SHAPES[name], tmp, dtype=torch.bfloat16, seed=0)
        write_qwen3_tokenizer(tmp)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or sorted(SHAPES):
        print(checkpoint(name))
