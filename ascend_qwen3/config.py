"""Qwen3 / Qwen3-MoE configuration: a validated view of a Hugging Face ``config.json``.

Accepts both the classic keys (``rope_theta``, ``rope_scaling``, ``num_experts``) and the
transformers-5 spelling (``rope_parameters``, ``num_local_experts``). ``FAMILY`` holds the eight
published Qwen3 models with their published parameter counts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace

import torch


class ConfigError(ValueError):
    """A config.json that cannot describe a Qwen3 model; the message says what to fix."""


DENSE_ARCHS = ("Qwen3ForCausalLM",)
MOE_ARCHS = ("Qwen3MoeForCausalLM",)
# The project's own architecture names (registered with vLLM under these, selected with
# --hf-overrides); they describe the same checkpoints.
PROJECT_DENSE_ARCH = "AscendQwen3ForCausalLM"
PROJECT_MOE_ARCH = "AscendQwen3MoeForCausalLM"
SUPPORTED_ARCHS = DENSE_ARCHS + MOE_ARCHS + (PROJECT_DENSE_ARCH, PROJECT_MOE_ARCH)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32"}


def parse_dtype(value) -> torch.dtype:
    """'bfloat16' | 'float16' | 'float32' (or bf16/fp16/fp32, or a torch.dtype) -> torch.dtype."""
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        value = str(value).replace("torch.", "")
    name = _DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {value!r}; use one of bfloat16, float16, float32")
    return DTYPES[name]


def _count(d: dict, key: str, where: str, *, minimum: int = 1, default: int | None = None) -> int:
    """``d[key]`` as an int >= ``minimum`` (``default`` when absent or null, if one is given).

    JSON integers and integral floats (``4096.0``) are accepted; strings, booleans, fractions and
    values below ``minimum`` raise a ConfigError naming the key."""
    v = d.get(key)
    if v is None and default is not None:
        return default
    integral = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
    if isinstance(v, bool) or not integral or v < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"config{where}: {key!r} must be {kind}, found {v!r}; correct it in "
                          f"config.json (the original checkpoint's config.json has the value)")
    return int(v)


def _real(value, key: str, where: str, low: float, high: float | None = None) -> float:
    """A finite JSON number strictly above ``low`` (and below ``high``), else a ConfigError."""
    bound = f"> {low:g}" + (f" and < {high:g}" if high is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= low or (high is not None and value >= high):
        raise ConfigError(f"config{where}: {key!r} must be a number {bound}, found {value!r}; correct "
                          f"it in config.json (Qwen3 uses e.g. rms_norm_eps 1e-06, rope_theta 1000000)")
    return float(value)


@dataclass(frozen=True)
class Qwen3Config:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: torch.dtype
    # MoE (num_experts == 0 for dense models)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = field(default_factory=tuple)
    name: str = ""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_dtype(self, dtype) -> "Qwen3Config":
        return replace(self, dtype=parse_dtype(dtype))

    # ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, name: str = "") -> "Qwen3Config":
        where = f" in {name}" if name else ""
        if not isinstance(d, dict):
            raise ConfigError(f"config{where} must be a JSON object, found {type(d).__name__}")
        archs = d.get("architectures") or []
        if not archs:
            mt = d.get("model_type")
            archs = {"qwen3": ["Qwen3ForCausalLM"], "qwen3_moe": ["Qwen3MoeForCausalLM"]}.get(mt, [])
        if not archs:
            raise ConfigError(f"config{where} names no architecture (no 'architectures' list and no "
                              f"qwen3/qwen3_moe 'model_type'); supported: {', '.join(SUPPORTED_ARCHS)}")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHS:
            raise ConfigError(f"unknown architecture {arch!r}{where}; this project runs "
                              f"{', '.join(SUPPORTED_ARCHS)}")
        moe = arch in MOE_ARCHS or arch == PROJECT_MOE_ARCH

        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
        required += ["moe_intermediate_size", "num_experts_per_tok"] if moe else ["intermediate_size"]
        missing = [k for k in required if k not in d]
        if moe and "num_experts" not in d and "num_local_experts" not in d:
            missing.append("num_experts")
        rope = d.get("rope_parameters") or {}
        for key, value in (("rope_parameters", rope), ("rope_scaling", d.get("rope_scaling") or {})):
            if not isinstance(value, dict):
                raise ConfigError(f"config{where}: {key!r} must be a JSON object, found {value!r}; "
                                  f"correct it in config.json")
        theta = d.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            missing.append("rope_theta")
        if missing:
            raise ConfigError(f"config{where} ({arch}) is missing required key(s): {', '.join(missing)}; "
                              f"a Hugging Face Qwen3 config.json has them")

        # sizes and counts: positive integers (a zero, negative or non-integer value would
        # otherwise surface as a Python error or an empty model far from config.json)
        vocab = _count(d, "vocab_size", where)
        layers = _count(d, "num_hidden_layers", where)
        heads = _count(d, "num_attention_heads", where)
        kv_heads = _count(d, "num_key_value_heads", where, default=heads)
        hidden = _count(d, "hidden_size", where)
        inter = _count(d, "intermediate_size", where, minimum=0 if moe else 1, default=0 if moe else None)
        max_pos = _count(d, "max_position_embeddings", where, default=32768)
        eps = d.get("rms_norm_eps")
        eps = _real(1e-6 if eps is None else eps, "rms_norm_eps", where, 0.0, 1.0)
        theta = _real(theta, "rope_theta", where, 0.0)
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}{where}")
        if d.get("head_dim") is None and hidden % heads:
            raise ConfigError(f"config{where} has no head_dim and hidden_size={hidden} is not a "
                              f"multiple of num_attention_heads={heads}; set head_dim in config.json "
                              f"(Qwen3 uses 128) or correct hidden_size")
        head_dim = _count(d, "head_dim", where, default=hidden // heads)
        if head_dim % 2:
            raise ConfigError(f"head_dim={head_dim}{where} must be even for rotary embedding")

        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") not in ("default", None):
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            rtype = scaling.get("rope_type", scaling.get("type"))
            if rtype == "yarn":
                if "factor" not in scaling:
                    raise ConfigError(f"yarn rope scaling{where} needs 'factor'")
                factor = scaling["factor"]
                if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
                        or not math.isfinite(factor) or factor < 1:
                    raise ConfigError(f"config{where}: yarn rope scaling 'factor' must be a number "
                                      f">= 1 (the context extension, 4.0 for Qwen3's 128K), found "
                                      f"{factor!r}; correct rope_scaling in config.json")
                scaling.setdefault("original_max_position_embeddings", max_pos)
                _count(scaling, "original_max_position_embeddings", f"{where} (rope_scaling)")
                scaling["rope_type"] = "yarn"
            elif rtype in (None, "default"):
                scaling = None
            else:
                raise ConfigError(f"rope scaling type {rtype!r}{where} is not supported; Qwen3 uses "
                                  f"none or 'yarn'")

        dtype_name = d.get("torch_dtype") or d.get("dtype") or "bfloat16"
        try:
            dtype = parse_dtype(dtype_name)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{where} (config 'torch_dtype')") from None

        kw = dict(
            architecture=arch, vocab_size=vocab, hidden_size=hidden,
            num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
            head_dim=head_dim, intermediate_size=inter,
            rms_norm_eps=eps, rope_theta=theta,
            rope_scaling=scaling, max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), dtype=dtype, name=name,
        )
        if d.get("attention_bias"):
            raise ConfigError(f"attention_bias=true{where}: Qwen3 has no QKV bias")
        if moe:
            experts_key = "num_experts" if d.get("num_experts") is not None else "num_local_experts"
            only = d.get("mlp_only_layers") or []
            if not isinstance(only, list):
                raise ConfigError(f"config{where}: 'mlp_only_layers' must be a list of layer "
                                  f"indices, found {only!r}; correct it in config.json")
            kw.update(
                num_experts=_count(d, experts_key, where),
                num_experts_per_tok=_count(d, "num_experts_per_tok", where),
                moe_intermediate_size=_count(d, "moe_intermediate_size", where),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                decoder_sparse_step=_count(d, "decoder_sparse_step", where, default=1),
                mlp_only_layers=tuple(_count({"mlp_only_layers": i}, "mlp_only_layers", where,
                                             minimum=0) for i in only),
            )
            if kw["num_experts_per_tok"] > kw["num_experts"]:
                raise ConfigError(f"num_experts_per_tok={kw['num_experts_per_tok']} exceeds "
                                  f"num_experts={kw['num_experts']}{where}")
            cfg = cls(**kw)
            dense_layers = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
            if dense_layers and cfg.intermediate_size <= 0:
                raise ConfigError(f"layers {dense_layers} are dense (mlp_only_layers / "
                                  f"decoder_sparse_step){where} but intermediate_size is missing")
            return cfg
        return cls(**kw)

    @classmethod
    def from_model_dir(cls, path: str) -> "Qwen3Config":
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise ConfigError(f"no config.json in {path!r}; point --model at a Hugging Face Qwen3 "
                              f"checkpoint directory")
        try:
            with open(cfg) as f:
                d = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cfg} is not valid JSON: {exc}") from None
        return cls.from_dict(d, name=cfg)


# ---------------------------------------------------------------------------------------------
# The published Qwen3 family (values from the models' Hugging Face config.json files).
# ---------------------------------------------------------------------------------------------

def _dense(layers, heads, kv, hidden, ffn, tied):
    return {"architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "hidden_size": hidden,
            "intermediate_size": ffn, "tie_word_embeddings": tied, "head_dim": 128,
            "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 40960, "torch_dtype": "bfloat16"}


def _moe(layers, heads, kv, hidden, ffn, expert_ffn):
    d = _dense(layers, heads, kv, hidden, ffn, False)
    d.update({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128, "num_experts_per_tok": 8,
              "moe_intermediate_size": expert_ffn, "norm_topk_prob": True, "decoder_sparse_step": 1,
              "mlp_only_layers": []})
    return d


# name -> (config.json dict, published total parameters, published active parameters or None)
FAMILY: dict[str, tuple[dict, float, float | None]] = {
    "Qwen3-0.6B": (_dense(28, 16, 8, 1024, 3072, True), 0.6e9, None),
    "Qwen3-1.7B": (_dense(28, 16, 8, 2048, 6144, True), 1.7e9, None),
    "Qwen3-4B": (_dense(36, 32, 8, 2560, 9728, True), 4.0e9, None),
    "Qwen3-8B": (_dense(36, 32, 8, 4096, 12288, False), 8.2e9, None),
    "Qwen3-14B": (_dense(40, 40, 8, 5120, 17408, False), 14.8e9, None),
    "Qwen3-32B": (_dense(64, 64, 8, 5120, 25600, False), 32.8e9, None),
    "Qwen3-30B-A3B": (_moe(48, 32, 4, 2048, 6144, 768), 30.5e9, 3.3e9),
    "Qwen3-235B-A22B": (_moe(94, 64, 4, 4096, 12288, 1536), 235e9, 22e9),
}

# the published 128K extension (YaRN x4 over the native 32K) of the models from Qwen3-4B up;
# Qwen3-0.6B and Qwen3-1.7B have none
YARN_128K = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
YARN_MAX_POSITIONS = 131072
NO_YARN = ("Qwen3-0.6B", "Qwen3-1.7B")


# The Qwen3-Embedding models (https://huggingface.co/Qwen/Qwen3-Embedding-0.6B, -4B, -8B): the
# Qwen3-0.6B / 4B / 8B backbones, published as a bare Qwen3Model (no "model." prefix, no lm_head:
# tie_word_embeddings is as in their config.json, but no head is loaded), a 151,669 / 151,665-token
# vocabulary, a 32K context (no YaRN extension); served with vLLM's --runner pooling (last token,
# normalised: their Sentence-Transformers modules.json / 1_Pooling). Kept apart from FAMILY (the
# generative models) and looked up by the same family_config.
def _embedding(layers, heads, kv, hidden, ffn, tied, vocab, max_pos):
    d = _dense(layers, heads, kv, hidden, ffn, tied)
    d.update(vocab_size=vocab, max_position_embeddings=max_pos)
    return d


# name -> (config.json dict, published parameters (the model card's nominal size), None)
EMBEDDING_FAMILY: dict[str, tuple[dict, float, float | None]] = {
    "Qwen3-Embedding-0.6B": (_embedding(28, 16, 8, 1024, 3072, True, 151669, 32768), 0.6e9, None),
    "Qwen3-Embedding-4B": (_embedding(36, 32, 8, 2560, 9728, True, 151665, 40960), 4.0e9, None),
    "Qwen3-Embedding-8B": (_embedding(36, 32, 8, 4096, 12288, False, 151665, 40960), 8.0e9, None),
}
NO_YARN = NO_YARN + tuple(EMBEDDING_FAMILY)


def is_embedding_model(name: str) -> bool:
    """A published Qwen3-Embedding model (served with --runner pooling)."""
    return name in EMBEDDING_FAMILY


def family_config(name: str, yarn: bool = False, dtype=None) -> Qwen3Config:
    """The config of a published Qwen3 model (or Qwen3-Embedding model) by name; ``yarn=True``
    adds the 128K YaRN scaling."""
    table = EMBEDDING_FAMILY if name in EMBEDDING_FAMILY else FAMILY
    if name not in table:
        raise ConfigError(f"unknown Qwen3 model {name!r}; known: {', '.join(FAMILY)}, "
                          f"{', '.join(EMBEDDING_FAMILY)}")
    d = dict(table[name][0])
    if yarn:
        if name in NO_YARN:
            raise ConfigError(f"{name} has a native 32K context and no published YaRN extension")
        d["rope_scaling"] = dict(YARN_128K)
        d["max_position_embeddings"] = YARN_MAX_POSITIONS
    cfg = Qwen3Config.from_dict(d, name=name)
    return cfg.with_dtype(dtype) if dtype is not None else cfg
