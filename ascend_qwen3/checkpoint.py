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


def _copy_side_files(src: str, dst: str) -> None:
    """Tokenizer and generation files of ``src`` (everything but config and weights)."""
    import shutil

    for f in os.listdir(src):
        if f.endswith((".json", ".jinja", ".txt", ".model")) and f != "config.json" \
                and not f.startswith("model.safetensors"):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))


def _read_dense(src: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if Qwen3Config.from_dict(config).is_moe:
        raise ValueError(f"{src} is a Qwen3-MoE checkpoint; a dense Qwen3 is needed here")
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    state = {}
    for f in files:
        state.update(load_file(os.path.join(src, f)))
    return config, state


def write_truncated_checkpoint(src: str, path: str, num_layers: int) -> str:
    """A smaller Qwen3 from a dense one: its first ``num_layers`` decoder layers, its
    embedding, final norm and head (a draft model of the same vocabulary for speculative
    decoding, e.g. a 2-layer cut of a 4-layer model)."""
    config, state = _read_dense(src)
    if not 1 <= num_layers <= config["num_hidden_layers"]:
        raise ValueError(f"num_layers must be 1..{config['num_hidden_layers']}, not {num_layers}")
    keep = {k: v for k, v in state.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in keep.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(config, num_hidden_layers=num_layers,
                       max_window_layers=min(config.get("max_window_layers", num_layers),
                                             num_layers)), f, indent=2)
    _copy_side_files(src, path)
    make_readable(path)
    return path


def write_upcycled_moe_checkpoint(src: str, path: str, num_experts: int = 4, top_k: int = 2,
                                  seed: int = 0) -> str:
    """A Qwen3-MoE that computes what the dense Qwen3 ``src`` computes: every expert a copy of
    the dense MLP, a random router, renormalised top-k weights (so any routing gives the dense
    MLP's output, up to rounding). Exercises the MoE classes on a trained model's behaviour."""
    config, state = _read_dense(src)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if ".mlp." not in k:
            out[k] = v
            continue
        prefix, proj = k.split(".mlp.")
        for e in range(num_experts):
            out[f"{prefix}.mlp.experts.{e}.{proj}"] = v.clone()
        gate = f"{prefix}.mlp.gate.weight"
        if gate not in out:
            out[gate] = (torch.randn(num_experts, config["hidden_size"], generator=g)
                         / math.sqrt(config["hidden_size"])).to(v.dtype)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    moe = dict(config, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
               moe_intermediate_size=config["intermediate_size"], num_experts=num_experts,
               num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1,
               mlp_only_layers=[], router_aux_loss_coef=0.001, output_router_logits=False)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(moe, f, indent=2)
    _copy_side_files(src, path)
    make_readable(path)
    return path
