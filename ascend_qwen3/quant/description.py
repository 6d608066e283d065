"""Reading and validating ``quant_model_description.json`` against a config and its checkpoint.

``QuantConfig.from_model_dir`` returns None for a float checkpoint (no description file) and
otherwise the type of every quantisable module of the graph, after checking that the description
is well formed, that the linears one graph module fuses share one type, that MoE experts are
W8A8_DYNAMIC or FLOAT, that embeddings/norms/router/LM head stay FLOAT, and that every tensor the
description names exists in the checkpoint (and vice versa for quantised modules).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..config import Qwen3Config
from .format import (DESCRIPTION_FILE, FLOAT, MODEL_QUANT_TYPES, TENSORS, TYPES, W8A8, W8A8_DYNAMIC,
                     float_only_tensors, quant_groups)


# the quantizer's schemes, in words (the CLI's help and its summary line print these)
SCHEMES = {
    "w8a8": "static W8A8 attention and dense-MLP linears; MoE experts W8A8_DYNAMIC (msModelSlim's "
            "format has no static experts)",
    "w8a8_dynamic": "every linear and every MoE expert W8A8_DYNAMIC",
}


class QuantFormatError(ValueError):
    """A quantised checkpoint that does not follow the msModelSlim W8A8 format; names the fix."""


def _short(names, n=6) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


@dataclass(frozen=True)
class QuantConfig:
    """The quantisation of one checkpoint: module path of the graph -> type (FLOAT omitted)."""

    model_quant_type: str
    schemes: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def scheme(self, module: str) -> str | None:
        """W8A8 / W8A8_DYNAMIC for a quantised module of the graph, None if it stays float."""
        return self.schemes.get(module)

    # -----------------------------------------------------------------------------------
    @classmethod
    def for_scheme(cls, cfg: Qwen3Config, scheme: str) -> "QuantConfig":
        """What ``ascend-qwen3 quantize --scheme`` produces for cfg (``SCHEMES`` says what each
        scheme means), for planning and byte counts."""
        kind = {"w8a8": W8A8, "w8a8_dynamic": W8A8_DYNAMIC}.get(scheme.lower())
        if kind is None:
            raise QuantFormatError(f"unknown scheme {scheme!r}; use w8a8 or w8a8_dynamic")
        return cls(model_quant_type=kind, source=f"--scheme {scheme}", schemes={
            g.module: (W8A8_DYNAMIC if g.role == "experts" else kind) for g in quant_groups(cfg)})

    @classmethod
    def from_model_dir(cls, model_dir: str, cfg: Qwen3Config,
                       tensor_names: set[str] | None = None) -> "QuantConfig | None":
        path = os.path.join(model_dir, DESCRIPTION_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                desc = json.load(f)
        except json.JSONDecodeError as exc:
            raise QuantFormatError(f"{path} is not valid JSON ({exc}); regenerate it with "
                                   f"`ascend-qwen3 quantize` or msModelSlim") from None
        return cls.from_description(desc, cfg, tensor_names, source=path)

    @classmethod
    def from_description(cls, desc: dict, cfg: Qwen3Config, tensor_names: set[str] | None = None,
                         source: str = DESCRIPTION_FILE) -> "QuantConfig":
        if not isinstance(desc, dict):
            raise QuantFormatError(f"{source} must be a JSON object mapping tensor names to types")
        mqt = desc.get("model_quant_type")
        if mqt is None:
            raise QuantFormatError(f"{source} has no 'model_quant_type'; expected one of "
                                   f"{', '.join(MODEL_QUANT_TYPES)}")
        if mqt not in MODEL_QUANT_TYPES:
            raise QuantFormatError(f"{source}: model_quant_type {mqt!r} is not supported; this project "
                                   f"reads {' and '.join(MODEL_QUANT_TYPES)} checkpoints (quantise "
                                   f"with --scheme w8a8 or w8a8_dynamic)")
        types = {k: v for k, v in desc.items() if isinstance(v, str) and "." in k}
        bad = {k: v for k, v in types.items() if v not in TYPES}
        if bad:
            k, v = next(iter(bad.items()))
            raise QuantFormatError(f"{source}: {k!r} has type {v!r}; supported types are "
                                   f"{', '.join(TYPES)} ({len(bad)} entr{'y' if len(bad) == 1 else 'ies'} "
                                   f"affected)")

        def type_of(module: str) -> str:
            key = module + ".weight"
            if key not in types:
                raise QuantFormatError(f"{source} has no entry for {key!r}; every weight of the "
                                       f"checkpoint needs one (FLOAT, W8A8 or W8A8_DYNAMIC)")
            return types[key]

        schemes: dict[str, str] = {}
        for g in quant_groups(cfg):
            found = {m: type_of(m) for m in g.members}
            kinds = set(found.values())
            if len(kinds) > 1:
                by = {}
                for m, t in found.items():
                    by.setdefault(t, []).append(m)
                detail = "; ".join(f"{t}: {_short(ms, 3)}" for t, ms in sorted(by.items()))
                raise QuantFormatError(f"{source}: the linears fused into {g.module} mix quantisation "
                                       f"types ({detail}); one fused module must use one type")
            kind = kinds.pop()
            if g.role == "experts" and kind == W8A8:
                raise QuantFormatError(f"{source}: MoE experts of {g.module} are W8A8 (static), which "
                                       f"is not supported for experts; quantise experts as "
                                       f"W8A8_DYNAMIC (or leave them FLOAT)")
            if kind != FLOAT:
                schemes[g.module] = kind
            # every tensor of the type is described with the same type
            for m, (out, inp) in zip(g.members, g.shapes):
                for spec in TENSORS[kind]:
                    key = f"{m}.{spec.suffix}"
                    if spec.suffix != "weight" and key in types and types[key] != kind:
                        raise QuantFormatError(f"{source}: {key!r} is described as {types[key]} but "
                                               f"{m}.weight as {kind}")
        for name in float_only_tensors(cfg):
            t = types.get(name)
            if t not in (None, FLOAT):
                raise QuantFormatError(f"{source}: {name!r} is {t}, but embeddings, norms, the MoE "
                                       f"router and the LM head must stay FLOAT")
        if not schemes:
            raise QuantFormatError(f"{source}: model_quant_type is {mqt} but no linear is quantised; "
                                   f"remove the description to load the checkpoint as float")
        if tensor_names is not None:
            absent = sorted(k for k in types if k not in tensor_names)
            if absent:
                raise QuantFormatError(f"{source} describes tensor(s) the checkpoint does not contain: "
                                       f"{_short(absent)}; the description and the safetensors files "
                                       f"are from different exports")
        return cls(model_quant_type=mqt, schemes=schemes, source=source)


__all__ = ["QuantConfig", "QuantFormatError", "W8A8", "W8A8_DYNAMIC", "FLOAT"]
