"""The sharding plan of a W8A8 checkpoint: the float plan with each quantised weight's extra tensors.

Every extra tensor follows its weight's output rows: column-parallel linears (q/k/v, gate/up)
split ``weight_scale``/``weight_offset``/``deq_scale``/``quant_bias`` like the weight's rows;
row-parallel linears (o_proj, down_proj) keep their full output, so those tensors are replicated,
except ``quant_bias``, which only TP rank 0 reads (it is added once, before the all-reduce).
``input_scale``/``input_offset`` are per-tensor and replicated; the q/k/v (or gate/up) shards of a
fused module carry one each and must agree. MoE expert scales go into the grouped layout
``[experts, out]`` next to the transposed int8 expert weights.

The entries are the float plan's (``ascend_qwen3.parallel.plan.Assignment``); new ones are made
from their weight's entry with ``dataclasses.replace``, so this module imports nothing from the
parallel layers (the two sit side by side; the loader composes them).
"""

from __future__ import annotations

from dataclasses import replace

from ..config import Qwen3Config
from .description import QuantConfig
from .format import TENSORS, W8A8_DYNAMIC, quant_groups


def _module_of(param: str) -> tuple[str, str] | None:
    """(graph module, parameter stem) of a linear weight parameter, or None."""
    if param.endswith(".weight"):
        return param[:-len(".weight")], ""
    for stem in ("experts.w13", "experts.w2"):
        if param.endswith("." + stem):
            return param[:-len(stem) - 1] + ".experts", stem
    return None


ALL = slice(None)


def _entry(weight, name: str, shape: tuple, param: str, src: tuple, dst: tuple, *, dtypes,
           shared: bool = False, reshape: bool = False):
    """A plan entry of the same type as ``weight``'s entry (every field given)."""
    return replace(weight, name=name, shape=shape, param=param, src=src, dst=dst,
                   transpose=False, dtypes=dtypes, shared=shared, reshape=reshape)


def expand_plan(plan: list, cfg: Qwen3Config, quant: QuantConfig, rank: int) -> list:
    """``plan`` (a rank's float plan) with the int8 dtype for quantised weights and, after each,
    the tensors its scheme adds, sliced for ``rank``."""
    roles = {g.module: g.role for g in quant_groups(cfg)}
    out = []
    for a in plan:
        found = _module_of(a.param)
        kind = quant.scheme(found[0]) if found else None
        if kind is None:
            out.append(a)
            continue
        module, stem = found
        member = a.name[:-len(".weight")]
        role = roles[module]
        rows_src, rows_dst = a.src[0], a.dst[0]
        out_full = a.shape[0]
        specs = {s.suffix: s for s in TENSORS[kind]}
        out.append(replace(a, dtypes=specs["weight"].dtypes))
        if role == "experts":
            # weight_scale/offset [out, 1] -> <stem>_scale/_offset [E_l, out_l]: the rows of the
            # (transposed) weight are the last index of the destination
            dst = (a.dst[0], a.dst[2])
            for suffix in ("weight_scale", "weight_offset"):
                out.append(_entry(a, f"{member}.{suffix}", (out_full, 1),
                                  f"{module}.{stem[len('experts.'):]}_{suffix.split('_')[1]}",
                                  (rows_src, ALL), dst, dtypes=specs[suffix].dtypes, reshape=True))
            continue
        if kind == W8A8_DYNAMIC:
            for suffix in ("weight_scale", "weight_offset"):
                out.append(_entry(a, f"{member}.{suffix}", (out_full, 1), f"{module}.{suffix}",
                                  (rows_src, ALL), (rows_dst, ALL), dtypes=specs[suffix].dtypes))
        else:  # static W8A8: deq_scale already folds weight_scale in (weight_scale/offset unused)
            for suffix in ("input_scale", "input_offset"):
                out.append(_entry(a, f"{member}.{suffix}", (1,), f"{module}.{suffix}", (ALL,), (ALL,),
                                  dtypes=specs[suffix].dtypes, shared=True))
            out.append(_entry(a, f"{member}.deq_scale", (out_full,), f"{module}.deq_scale",
                              (rows_src,), (rows_dst,), dtypes=specs["deq_scale"].dtypes))
            if role != "row" or rank == 0:
                out.append(_entry(a, f"{member}.quant_bias", (out_full,), f"{module}.quant_bias",
                                  (rows_src,), (rows_dst,), dtypes=specs["quant_bias"].dtypes))
    return out


def assignment_bytes(a: Assignment, model_dtype) -> int:
    """Bytes this rank holds for one plan entry, stored as the quantizer writes it."""
    import torch

    model = torch.empty(0, dtype=model_dtype).element_size()
    suffix = a.name.rsplit(".", 1)[-1]
    if a.dtypes == ("I8",):
        size = 1
    elif suffix in ("quant_bias", "weight_scale", "weight_offset"):
        size = 4
    elif suffix == "deq_scale":
        size = 8 if model_dtype == torch.float16 else 4
    else:  # float weights, norms, input_scale/offset (offset is int8: negligible either way)
        size = 1 if suffix == "input_offset" else model
    return a.numel * size
