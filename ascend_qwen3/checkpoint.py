"""Write random-weight Qwen3 checkpoints in the Hugging Face layout (config.json + safetensors).

Tensor names and shapes come from the tp=1 sharding plan, so any config the project can load can
be written, from a tiny test model to a full family shape, without transformers and tensor by
tensor (bounded memory). Used by benchmarks and by the embedded default model.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

from .config import Qwen3Config
from .parallel.plan import rank_plan


QWEN3_TRANSFORMERS_VERSION = "4.51.0"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_random_checkpoint(config: dict, path: str, *, dtype=torch.bfloat16, seed: int = 0,
                            max_shard_bytes: int = 2 * 2**30, progress=None) -> str:
    """config: a Hugging Face style config dict. Writes model-0000i-of-0000n.safetensors (or a
    single model.safetensors) plus the index and config.json; returns ``path``."""
    cfg = Qwen3Config.from_dict(config)
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    plan = rank_plan(cfg, 1, 0)
    names = list(dict.fromkeys(a.name for a in plan))
    shapes = {a.name: a.shape for a in plan}
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[str, list[str]]] = []   # (temporary file, tensor names)
    size = total = 0

    def flush():
        nonlocal shard, size
        tmp = os.path.join(path, f".shard-{len(written)}.tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard, size = {}, 0

    for i, name in enumerate(names):
        shape = shapes[name]
        if len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            std = (0.05 if cfg.tie_word_embeddings else 1.0) if "embed_tokens" in name \
                else 1.0 / math.sqrt(shape[-1])
            t = torch.randn(shape, generator=g) * std
        t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
        if progress:
            progress(i + 1, len(names))
    flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i, (tmp, keys) in enumerate(written):
            fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(tmp, os.path.join(path, fname))
            weight_map.update({k: fname for k in keys})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    # model_type and transformers_version as in the published Qwen3 config.json files (4.51.0
    # introduced Qwen3). Without a transformers_version, transformers >= 5 warns that a local
    # tokenizer may have "an incorrect regex pattern" (a check meant for Mistral checkpoints).
    out = dict(config, torch_dtype=_dtype_name(dtype))
    out.setdefault("model_type", "qwen3_moe" if cfg.is_moe else "qwen3")
    out.setdefault("transformers_version", QWEN3_TRANSFORMERS_VERSION)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(out, f, indent=2)
    make_readable(path)
    return path


def make_readable(path: str) -> None:
    """Give the files in ``path`` (or the file ``path``) the process's usual permissions
    (0666 less the umask). safetensors' ``save_file`` creates its files 0600, which an image
    that builds a model as root and serves it as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    files = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
    for f in files:
        if os.path.isfile(f):
            os.chmod(f, 0o666 & ~umask)
