"""LoRA adapters in PEFT's format: read and check one against a Qwen3 config, and merge it into
a checkpoint's float weights for the project's standalone graph (``ascend-qwen3 run --lora``).

The format (what transformers/PEFT write and vLLM reads: vllm/lora/peft_helper.py,
vllm/lora/lora_model.py ``LoRAModel.from_local_checkpoint``, vllm/lora/utils.py
``parse_fine_tuned_lora_name``): a directory with

- ``adapter_config.json``: ``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules``,
  ``bias`` "none", optional ``rank_pattern`` / ``alpha_pattern`` / ``use_rslora``;
- ``adapter_model.safetensors``: for each adapted linear ``base_model.model.<module>.lora_A.weight``
  [r, in] and ``...lora_B.weight`` [out, r], ``<module>`` as in the base checkpoint
  (``model.layers.3.mlp.down_proj``).

The adapted layer computes W x + scale * B A x, scale = lora_alpha / r (lora_alpha / sqrt(r) with
rsLoRA), so merging is W' = W + scale * B A. No vLLM here.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

# the linears of a Qwen3 decoder layer an adapter may target (the project's classes adapt these)
DENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vLLM's allowed --max-lora-rank values (vllm/config/lora.py MaxLoRARanks, vLLM 0.32)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<ab>lora_A|lora_B)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?P<block>self_attn|mlp)\.(?P<rest>.+)$")


class AdapterError(ValueError):
    """An adapter that cannot be served or merged; the message names the fix."""


@dataclass
class Adapter:
    path: str
    rank: int                        # the largest rank (r and any rank_pattern entry)
    config: dict
    modules: dict = field(default_factory=dict)   # module -> (A shape, B shape)

    def scale(self, module: str) -> float:
        """PEFT's scaling for ``module`` (rank_pattern / alpha_pattern / rsLoRA honoured)."""
        c = self.config
        r, alpha = c["r"], c["lora_alpha"]
        for key, v in (c.get("rank_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                r = v
                break
        for key, v in (c.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = v
                break
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r


def max_lora_rank(rank: int) -> int:
    """The smallest of vLLM's allowed --max-lora-rank values that holds ``rank``."""
    for r in VLLM_LORA_RANKS:
        if rank <= r:
            return r
    raise AdapterError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank "
                       f"{VLLM_LORA_RANKS[-1]}; use an adapter of rank <= {VLLM_LORA_RANKS[-1]}")


def read_adapter(path: str, cfg=None) -> Adapter:
    """Read and check the PEFT adapter directory ``path``; with ``cfg`` (the base model's
    ``Qwen3Config``), also its modules and shapes against the model. Header-only: no tensor is
    read."""
    from safetensors import safe_open

    if not os.path.isdir(path):
        raise AdapterError(f"LoRA adapter {path!r} is not a directory; pass the directory holding "
                           f"adapter_config.json and adapter_model.safetensors (a PEFT "
                           f"save_pretrained output)")
    cfg_path = os.path.join(path, "adapter_config.json")
    st_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(st_path):
        pickled = [f for f in ("adapter_model.bin", "adapter_model.pt")
                   if os.path.isfile(os.path.join(path, f))]
        if pickled:
            raise AdapterError(f"LoRA adapter {path!r} has only {pickled[0]} (pickled); adapters are "
                               f"read as safetensors only (a pickle can run code when loaded): "
                               f"convert it with safetensors.torch.save_file into "
                               f"adapter_model.safetensors")
        raise AdapterError(f"LoRA adapter {path!r} has no adapter_model.safetensors; expected a PEFT "
                           f"adapter directory (adapter_config.json + adapter_model.safetensors)")
    try:
        with open(cfg_path) as f:
            conf = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"LoRA adapter {path!r} has no adapter_config.json; expected a PEFT "
                           f"adapter directory (adapter_config.json + adapter_model.safetensors)") from None
    except ValueError as exc:
        raise AdapterError(f"{cfg_path} is not valid JSON ({exc})") from None
    where = f"LoRA adapter {path!r}"
    if conf.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where} is a {conf.get('peft_type')} adapter; only LoRA adapters "
                           f"(peft_type LORA) are served")
    for k in ("r", "lora_alpha", "target_modules"):
        if k not in conf:
            raise AdapterError(f"{where}: adapter_config.json lacks {k!r}; a PEFT LoRA config has "
                               f"r, lora_alpha and target_modules")
    if conf.get("bias", "none") != "none":
        raise AdapterError(f"{where} trains biases (bias {conf['bias']!r}); vLLM serves LoRA without "
                           f"bias only: retrain with bias='none'")
    if conf.get("use_dora"):
        raise AdapterError(f"{where} is a DoRA adapter; vLLM does not serve DoRA")
    if conf.get("modules_to_save"):
        raise AdapterError(f"{where} saves whole modules ({conf['modules_to_save']}); vLLM serves "
                           f"only the LoRA matrices: retrain without modules_to_save")
    ranks = [conf["r"], *(conf.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise AdapterError(f"{where}: ranks {ranks} must be positive integers")
    rank = max(ranks)
    max_lora_rank(rank)     # within vLLM's limit
    modules: dict = {}
    try:
        with safe_open(st_path, "pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if not m:
                    raise AdapterError(f"{where}: tensor {key!r} is not a LoRA matrix of a linear "
                                       f"(base_model.model.<module>.lora_A/lora_B.weight); adapters "
                                       f"of embeddings or the output head are not served")
                shape = tuple(f.get_slice(key).get_shape())
                a, b = modules.get(m["module"], (None, None))
                modules[m["module"]] = (shape, b) if m["ab"] == "lora_A" else (a, shape)
    except AdapterError:
        raise
    except Exception as exc:     # safetensors' own error type for a corrupt file
        raise AdapterError(f"{st_path} is not a readable safetensors file ({exc}); re-copy it") from None
    if not modules:
        raise AdapterError(f"{where}: adapter_model.safetensors holds no LoRA matrices")
    ad = Adapter(path, rank, conf, modules)
    _check_modules(ad, cfg)
    return ad


def _check_modules(ad: Adapter, cfg) -> None:
    where = f"LoRA adapter {ad.path!r}"
    for module, (a, b) in ad.modules.items():
        if a is None or b is None:
            raise AdapterError(f"{where}: {module} has only lora_{'B' if a is None else 'A'}; each "
                               f"adapted linear needs lora_A and lora_B")
        m = _LAYER.match(module)
        name = module.rsplit(".", 1)[-1]
        if m and m["rest"].startswith("experts."):
            raise AdapterError(f"{where} adapts MoE experts ({module}); LoRA on experts is not served "
                               f"by the project's MoE class: adapt the attention (q/k/v/o_proj) "
                               f"only, or the shared linears of a dense model")
        block = "self_attn" if name in DENSE_TARGETS[:4] else "mlp"
        if m is None or name not in DENSE_TARGETS or m["rest"] != name or m["block"] != block:
            raise AdapterError(f"{where} adapts {module}, which is not one of the linears a Qwen3 "
                               f"decoder layer offers to LoRA ({', '.join(DENSE_TARGETS)}); retrain "
                               f"with target_modules among those")
        r = a[0]
        if a[0] != b[1] or r > ad.rank:
            raise AdapterError(f"{where}: {module} has lora_A {list(a)} and lora_B {list(b)}; expected "
                               f"[r, in] and [out, r] with r <= {ad.rank}")
        if cfg is None:
            continue
        if int(m["i"]) >= cfg.num_layers:
            raise AdapterError(f"{where} adapts layer {m['i']} but the model has {cfg.num_layers} "
                               f"layers: it was trained for another model")
        if cfg.is_moe and m["block"] == "mlp":
            raise AdapterError(f"{where} adapts {module}; on an MoE model the MLP is the experts, "
                               f"which LoRA is not served on: adapt the attention only")
        want = _shape(cfg, name)
        if (b[0], a[1]) != want:
            raise AdapterError(f"{where}: {module} maps {a[1]} -> {b[0]} features but the model's "
                               f"{name} maps {want[1]} -> {want[0]}: the adapter was trained for "
                               f"another model")


def _shape(cfg, name: str) -> tuple[int, int]:
    """(out, in) of a decoder layer's linear ``name``."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {"q_proj": (cfg.num_heads * d, h), "k_proj": (cfg.num_kv_heads * d, h),
            "v_proj": (cfg.num_kv_heads * d, h), "o_proj": (h, cfg.num_heads * d),
            "gate_proj": (cfg.intermediate_size, h), "up_proj": (cfg.intermediate_size, h),
            "down_proj": (h, cfg.intermediate_size)}[name]


def merged_tensors(tensors: dict[str, torch.Tensor], adapter_dir: str) -> dict[str, torch.Tensor]:
    """``tensors`` (checkpoint name -> float tensor) with the adapter merged in:
    ``<module>.weight`` + scale * B @ A, in fp32 (the graph casts it to its own dtype)."""
    from safetensors import safe_open

    ad = read_adapter(adapter_dir)
    out = dict(tensors)
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        for module in ad.modules:
            name = module + ".weight"
            if name not in out:
                raise AdapterError(f"LoRA adapter {adapter_dir!r} adapts {module}, which the "
                                   f"checkpoint does not have ({name})")
            a = f.get_tensor(f"base_model.model.{module}.lora_A.weight").float()
            b = f.get_tensor(f"base_model.model.{module}.lora_B.weight").float()
            out[name] = out[name].float() + ad.scale(module) * (b @ a)
    return out


def load_model_with_lora(model_dir: str, adapter_dir: str, dtype=None, device="cpu"):
    """The project's graph of the float checkpoint ``model_dir`` with the adapter merged into its
    weights (W + scale * B A). Returns (model, config), as ``loader.load_model``."""
    from safetensors import safe_open

    from .config import Qwen3Config, parse_dtype
    from .loader import checkpoint_files, fill_from_tensors, load_plan
    from .model import Qwen3Graph

    cfg = Qwen3Config.from_model_dir(model_dir)
    if dtype is not None:
        cfg = cfg.with_dtype(parse_dtype(dtype))
    read_adapter(adapter_dir, cfg)
    files = checkpoint_files(model_dir)
    if any(n.endswith(("weight_scale", "weight_offset", "deq_scale")) for n in files):
        raise AdapterError(f"{model_dir!r} is quantised; an adapter is merged into float weights "
                           f"only: merge it into the float checkpoint, then quantise")
    tensors = {}
    for name, path in files.items():
        with safe_open(path, "pt") as f:
            tensors[name] = f.get_tensor(name)
    tensors = merged_tensors(tensors, adapter_dir)
    model = Qwen3Graph(cfg, device=device)
    fill_from_tensors(model, load_plan(cfg), tensors)
    model.finalize_weights()
    return model.eval(), cfg
