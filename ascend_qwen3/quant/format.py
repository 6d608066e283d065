"""The msModelSlim W8A8 checkpoint format, as the project reads and writes it (docs/w8a8_format.md).

A quantised checkpoint is a Hugging Face Qwen3 checkpoint whose quantised linears carry extra
tensors next to an int8 ``weight``, plus ``quant_model_description.json`` mapping every tensor
name to ``FLOAT``, ``W8A8`` or ``W8A8_DYNAMIC``. This module is the single table of those extra
tensors (suffix, shape, stored dtype) and of the modules that may be quantised, shared by the
loader (what to expect), the quantizer (what to write) and the format tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Qwen3Config

FLOAT, W8A8, W8A8_DYNAMIC = "FLOAT", "W8A8", "W8A8_DYNAMIC"
TYPES = (FLOAT, W8A8, W8A8_DYNAMIC)
DESCRIPTION_FILE = "quant_model_description.json"
# model_quant_type values the project reads; msModelSlim has others (W4A8_DYNAMIC, W8A16, ...)
MODEL_QUANT_TYPES = (W8A8, W8A8_DYNAMIC)

# safetensors dtype names accepted for each stored role
FLOAT_ST = ("F32", "BF16", "F16")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a quantised linear: ``<module>.<suffix>``, its shape given the linear's
    [out, in] and the safetensors dtypes it may be stored in."""

    suffix: str
    shape: str          # "out,in" | "out,1" | "out" | "1"
    dtypes: tuple[str, ...]
    # read and used by the forward; False: written (the format lists it) but not needed to load
    # (msModelSlim omits static W8A8's weight_scale/weight_offset, which no kernel uses)
    required: bool = True

    def dims(self, out: int, inp: int) -> tuple[int, ...]:
        return {"out,in": (out, inp), "out,1": (out, 1), "out": (out,), "1": (1,)}[self.shape]


# What each type stores per linear (docs/w8a8_format.md, read from vllm-ascend 0.23's source). Scales may be
# stored in the model dtype or fp32; deq_scale is fp32 for bf16 models and an int64 carrying the
# fp32 bit pattern for fp16 models; input_offset is int8 or a float holding an integer.
TENSORS: dict[str, tuple[TensorSpec, ...]] = {
    W8A8: (
        TensorSpec("weight", "out,in", ("I8",)),
        TensorSpec("input_scale", "1", FLOAT_ST),
        TensorSpec("input_offset", "1", ("I8",) + FLOAT_ST),
        TensorSpec("quant_bias", "out", ("I32",)),
        TensorSpec("deq_scale", "out", ("F32", "I64")),
        TensorSpec("weight_scale", "out,1", FLOAT_ST, required=False),
        TensorSpec("weight_offset", "out,1", FLOAT_ST + ("I8",), required=False),
    ),
    W8A8_DYNAMIC: (
        TensorSpec("weight", "out,in", ("I8",)),
        TensorSpec("weight_scale", "out,1", FLOAT_ST),
        TensorSpec("weight_offset", "out,1", FLOAT_ST + ("I8",)),
    ),
    FLOAT: (TensorSpec("weight", "out,in", FLOAT_ST),),
}

@dataclass(frozen=True)
class QuantGroup:
    """Checkpoint linears that one module of the graph fuses; they must share one type.

    ``module``: the graph's module path (``layers.0.self_attn.qkv_proj``); ``members``: the
    checkpoint module names (``model.layers.0.self_attn.q_proj`` ...); ``role``: column, row or
    experts; ``shapes``: each member's [out, in].
    """

    module: str
    members: tuple[str, ...]
    role: str
    shapes: tuple[tuple[int, int], ...]


def quant_groups(cfg: Qwen3Config) -> list[QuantGroup]:
    """Every group of linears the description may quantise, in checkpoint order."""
    H = cfg.hidden_size
    groups = []
    for i in range(cfg.num_layers):
        c, p = f"model.layers.{i}.", f"layers.{i}."
        a = c + "self_attn."
        groups.append(QuantGroup(p + "self_attn.qkv_proj", (a + "q_proj", a + "k_proj", a + "v_proj"),
                                 "column", ((cfg.q_size, H), (cfg.kv_size, H), (cfg.kv_size, H))))
        groups.append(QuantGroup(p + "self_attn.o_proj", (a + "o_proj",), "row", ((H, cfg.q_size),)))
        m = c + "mlp."
        if cfg.is_moe_layer(i):
            I = cfg.moe_intermediate_size
            members, shapes = [], []
            for e in range(cfg.num_experts):
                for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                    members.append(f"{m}experts.{e}.{proj}")
                    shapes.append(shape)
            groups.append(QuantGroup(p + "mlp.experts", tuple(members), "experts", tuple(shapes)))
        else:
            I = cfg.intermediate_size
            groups.append(QuantGroup(p + "mlp.gate_up_proj", (m + "gate_proj", m + "up_proj"), "column",
                                     ((I, H), (I, H))))
            groups.append(QuantGroup(p + "mlp.down_proj", (m + "down_proj",), "row", ((H, I),)))
    return groups


def float_only_tensors(cfg: Qwen3Config) -> list[str]:
    """Checkpoint tensors that must stay FLOAT: embeddings, norms, QK-norms, router, LM head."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        c = f"model.layers.{i}."
        names += [c + "input_layernorm.weight", c + "post_attention_layernorm.weight",
                  c + "self_attn.q_norm.weight", c + "self_attn.k_norm.weight"]
        if cfg.is_moe_layer(i):
            names.append(c + "mlp.gate.weight")
    return names
