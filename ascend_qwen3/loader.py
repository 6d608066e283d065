"""Load a Hugging Face Qwen3 / Qwen3-MoE safetensors checkpoint into the project's graph.

Reads a single ``model.safetensors``, a sharded set with ``model.safetensors.index.json``, or any
``*.safetensors`` files in the directory. Each rank reads only its slices of each tensor
(``safe_open(...).get_slice(name)[slices]``), as given by the sharding plan. Every problem is
reported with the tensor name, what was expected and what was found; a file safetensors cannot
open (truncated, corrupt header) is reported with its name, and float weights are checked for
NaN / Inf as they are read (``ASCEND_QWEN3_SKIP_FINITE_CHECK=1`` turns that off). The fuller,
header-only check of a whole checkpoint is ``ascend_qwen3.check`` (``ascend-qwen3 check``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import replace

import torch
from safetensors import SafetensorError, safe_open

from .config import Qwen3Config, parse_dtype
from .parallel import SINGLE, ParallelContext
from .parallel.plan import Assignment, check_parallel, rank_plan
from .quant.plan import expand_plan

logger = logging.getLogger("ascend_qwen3.loader")

FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# set to 1 to load weights without the NaN / Inf check (e.g. through the vLLM plugin)
SKIP_FINITE_ENV = "ASCEND_QWEN3_SKIP_FINITE_CHECK"


def load_plan(cfg: Qwen3Config, tp: int = 1, rank: int = 0, ep: bool = False,
              quant=None, dp: int = 1, dp_rank: int = 0,
              stage: tuple[int, int] | None = None, *, prefix: str = "model.",
              head: bool = True) -> list[Assignment]:
    """Every checkpoint tensor a rank reads: the sharding plan of the float tensors
    (``parallel.plan.rank_plan``) and, with ``quant`` (a ``QuantConfig``), the extra tensors of
    its W8A8 / W8A8_DYNAMIC modules, sliced like their weights (``quant.plan.expand_plan``).
    ``stage``: the (start, end) decoder layers of the rank's pipeline stage (None: all).

    ``prefix``: how the checkpoint names the backbone's tensors (``checkpoint_prefix``):
    "model." (a ``*ForCausalLM`` export) or "" (a bare ``Qwen3Model`` export, as Qwen3-Embedding
    is published). ``head=False``: no output head (a pooling model's graph has none), so an
    untied checkpoint's ``lm_head.weight`` is neither needed nor read."""
    plan = rank_plan(cfg, tp, rank, ep, dp, dp_rank, stage)
    plan = plan if quant is None else expand_plan(plan, cfg, quant, rank)
    if not head:
        plan = [a for a in plan if a.param.split(".")[0] != "lm_head"]
    if prefix != "model.":
        plan = [replace(a, name=prefix + a.name[len("model."):]) if a.name.startswith("model.")
                else a for a in plan]
    return plan


# backbone tensors every Qwen3 checkpoint has, by which its naming is recognised
_BACKBONE = ("embed_tokens.weight", "norm.weight")


def checkpoint_prefix(files, model_dir: str = "") -> str:
    """The prefix of the backbone's tensor names in a checkpoint (``files``: its tensor names):
    "model." for a ``Qwen3ForCausalLM`` export (``model.embed_tokens.weight``,
    ``model.layers.N...``, ``lm_head.weight``), "" for a bare ``Qwen3Model`` export
    (``embed_tokens.weight``, ``layers.N...``, no head), which is how Qwen3-Embedding is
    published. Decided once, from the names, before anything is read."""
    names = set(files)
    prefixed = any(n.startswith("model.layers.") for n in names) or \
        any("model." + b in names for b in _BACKBONE)
    bare = any(n.startswith("layers.") for n in names) or any(b in names for b in _BACKBONE)
    if prefixed != bare:
        return "model." if prefixed else ""
    where = f" in {model_dir!r}" if model_dir else ""
    shown = ", ".join(sorted(names)[:6]) or "(none)"
    found = ("both 'model.'-prefixed and bare backbone names (two exports mixed in one "
             "directory)" if prefixed else f"neither (first names: {shown})")
    raise CheckpointError(f"cannot tell how the checkpoint{where} names its tensors: expected the "
                          f"Qwen3 backbone as model.embed_tokens.weight / model.layers.N... "
                          f"(Qwen3ForCausalLM) or as embed_tokens.weight / layers.N... (Qwen3Model, "
                          f"e.g. Qwen3-Embedding), found {found}; point the server at one "
                          f"complete Hugging Face Qwen3 checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor and the fix."""


def unreadable(path: str, exc: BaseException) -> CheckpointError:
    """The error for a safetensors file that cannot be opened or read (truncated, corrupt)."""
    return CheckpointError(f"{path} is not a readable safetensors file ({exc}); expected a complete "
                           f"safetensors file, as written by save_pretrained: it is probably "
                           f"truncated or corrupt (an interrupted download or copy), so re-download "
                           f"or re-copy it (`ascend-qwen3 check {os.path.dirname(path) or '.'}` "
                           f"checks every file)")


def open_safetensors(path: str):
    """``safe_open(path)``, raising CheckpointError naming the file instead of SafetensorError."""
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as exc:
        raise unreadable(path, exc) from None


def finite_check_enabled(check_finite: bool = True) -> bool:
    """False when the caller or ``ASCEND_QWEN3_SKIP_FINITE_CHECK=1`` (true/yes) turns it off."""
    return check_finite and os.environ.get(SKIP_FINITE_ENV, "").strip().lower() not in ("1", "true", "yes")


def count_non_finite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, +/-Inf count) of a float tensor; (0, 0) for integer tensors.

    A finite sum proves every value finite (a NaN or Inf anywhere makes it NaN or Inf) and costs
    a fraction of ``isfinite`` on bf16 / fp16; only a non-finite sum (or one that overflowed)
    is followed by the exact count."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return 0, 0
    nan = int(torch.isnan(t).sum())
    return nan, int((~torch.isfinite(t)).sum()) - nan


def checkpoint_files(model_dir: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file holding it."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except OSError as exc:
            raise CheckpointError(f"cannot read {index} ({exc}); make it readable or re-copy it") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); it needs a "
                                  f"'weight_map' object") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index: its 'weight_map' must map "
                                  f"tensor names to file names; regenerate the index")
        out = {}
        for name, fname in weight_map.items():
            path = os.path.join(model_dir, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index} maps {name!r} to {fname!r}, which is not in {model_dir}; "
                                      f"copy {fname} from the original checkpoint (an incomplete "
                                      f"download or copy)")
            out[name] = path
        return out
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir!r}; convert the checkpoint to "
                              f"safetensors (pytorch_model.bin is not read)")
    out = {}
    for path in files:
        with open_safetensors(path) as f:
            for name in f.keys():
                out[name] = path
    return out



def _convert(a, t: torch.Tensor, st_dtype: str, dst: torch.Tensor) -> torch.Tensor:
    """A checkpoint slice in the destination's dtype (and shape, for grouped scale layouts)."""
    if st_dtype == "I64" and dst.dtype == torch.float32:
        # msModelSlim's fp16-model deq_scale: the fp32 bit pattern read as int32, widened to int64
        t = t.to(torch.int32).view(torch.float32)
    if a.reshape:
        t = t.reshape(dst.shape)
    return t


def fill_from_tensors(module: torch.nn.Module, plan: list[Assignment],
                      tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Fill ``module``'s parameters from checkpoint tensors already in memory (``tensors``:
    checkpoint name -> whole tensor), following ``plan`` as ``load_weights`` follows it for files.
    ``module`` may be a part of the graph (one decoder layer for the quantizer): the plan's
    parameter names lose ``prefix``, and entries outside it are skipped."""
    params = dict(module.named_parameters())
    for a in plan:
        if not a.param.startswith(prefix):
            continue
        t = tensors[a.name][a.src]
        if a.transpose:
            t = t.transpose(-1, -2)
        dst = params[a.param[len(prefix):]].data[a.dst]
        if tuple(dst.shape) != tuple(t.shape):
            raise CheckpointError(f"slice of {a.name!r} has shape {list(t.shape)} but parameter "
                                  f"{a.param} expects {list(dst.shape)} at {a.dst}")
        dst.copy_(t.to(dst.dtype))


def load_weights(model: torch.nn.Module, model_dir: str, cfg: Qwen3Config,
                 ctx: ParallelContext = SINGLE, quant=None, files: dict | None = None, *,
                 check_finite: bool = True) -> dict:
    """Fill ``model``'s parameters from ``model_dir`` following the sharding plan of ctx's rank.

    ``quant``: the checkpoint's ``QuantConfig`` (W8A8) or None. A pipeline stage (a graph built
    with ``layers=``) reads only its own layers' tensors, and the embedding, final norm and head
    only where it holds them. Returns stats: tensors read, bytes read, seconds.

    Every float slice is checked for NaN / Inf as it is read (one ``isfinite`` pass over data
    already in memory) and a CheckpointError names the tensor, its file and the count.
    ``check_finite=False``, or the environment variable ``ASCEND_QWEN3_SKIP_FINITE_CHECK=1``
    (which reaches the vLLM plugin's load without code changes), loads such weights anyway.
    A safetensors file that cannot be opened or sliced raises CheckpointError naming the file.
    """
    check_finite = finite_check_enabled(check_finite)
    t0 = time.perf_counter()
    files = files or checkpoint_files(model_dir)
    stage = (getattr(model, "start_layer", 0), getattr(model, "end_layer", cfg.num_layers))
    stage = None if stage == (0, cfg.num_layers) else stage
    # the checkpoint's naming ("model." or a bare Qwen3Model export), and whether the graph has
    # an output head at all (a pooling model's has none: Qwen3Graph(head=False))
    prefix = checkpoint_prefix(files, model_dir)
    head = getattr(model, "lm_head", "absent") is not None
    plan = load_plan(cfg, ctx.tp_size, ctx.tp_rank, ctx.expert_parallel, quant, ctx.dp_size,
                     ctx.dp_rank, stage, prefix=prefix, head=head)
    params = dict(model.named_parameters())
    missing = sorted({a.name for a in plan if a.name not in files})
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        hint = (f"; a checkpoint without an output head (e.g. Qwen3-Embedding) serves embeddings: "
                f"start vLLM with --runner pooling" if missing == ["lm_head.weight"] else "")
        raise CheckpointError(f"checkpoint {model_dir!r} is missing tensor(s) required by its config "
                              f"({cfg.architecture}, {cfg.num_layers} layers): {shown}{hint}")
    filled = {name: 0 for name in params}
    nbytes = 0
    with ExitStack() as stack:
        handles = {}
        for a in plan:
            path = files[a.name]
            if path not in handles:
                handles[path] = stack.enter_context(open_safetensors(path))
            try:
                sl = handles[path].get_slice(a.name)
            except Exception as exc:  # safetensors raises its own error type for absent names
                raise CheckpointError(f"tensor {a.name!r} is listed in model.safetensors.index.json "
                                      f"under {os.path.basename(path)}, which does not contain it "
                                      f"({exc}); the index and the shards are from different "
                                      f"exports") from None
            shape, dt = tuple(sl.get_shape()), sl.get_dtype()
            if shape != a.shape:
                raise CheckpointError(f"tensor {a.name!r} in {os.path.basename(path)} has shape "
                                      f"{list(shape)}, but the config implies {list(a.shape)}; the "
                                      f"checkpoint and config.json disagree")
            if dt not in a.dtypes:
                if quant is None and dt not in FLOAT_DTYPES:
                    raise CheckpointError(f"tensor {a.name!r} has dtype {dt}; a float checkpoint needs "
                                          f"F32, BF16 or F16 (quantised checkpoints need a "
                                          f"quant_model_description.json)")
                raise CheckpointError(f"tensor {a.name!r} has dtype {dt}, but "
                                      f"{'its quantisation type' if quant else 'a float checkpoint'} "
                                      f"needs {' or '.join(a.dtypes)}; re-export the checkpoint "
                                      f"(or fix quant_model_description.json)")
            try:
                t = sl[a.src]
            except (SafetensorError, OSError) as exc:
                raise unreadable(path, exc) from None
            if a.transpose:
                t = t.transpose(-1, -2)
            p = params.get(a.param)
            if p is None:
                raise CheckpointError(f"internal: plan names parameter {a.param!r} that the model lacks")
            dst = p.data[a.dst]
            t = _convert(a, t, dt, dst)
            if check_finite:
                nan, inf = count_non_finite(t)
                if nan or inf:
                    raise CheckpointError(
                        f"tensor {a.name!r} in {path} has {nan + inf} non-finite value(s) ({nan} NaN, "
                        f"{inf} Inf) among the {t.numel()} this rank reads; expected finite weights: "
                        f"the file is corrupt or the export overflowed, so re-download or re-export "
                        f"it ({SKIP_FINITE_ENV}=1 or check_finite=False loads it anyway)")
            if tuple(dst.shape) != tuple(t.shape):
                raise CheckpointError(f"slice of {a.name!r} has shape {list(t.shape)} but parameter "
                                      f"{a.param} expects {list(dst.shape)} at {a.dst}")
            if a.shared and filled[a.param]:
                # q/k/v (or gate/up) each carry the fused module's per-tensor value: they must agree
                if not torch.equal(dst, t.to(p.dtype)):
                    raise CheckpointError(f"tensor {a.name!r} = {t.flatten().tolist()} differs from the "
                                          f"value its fused module already has ({dst.flatten().tolist()}); "
                                          f"the linears fused into {a.param.rsplit('.', 1)[0]} must "
                                          f"share one input_scale/input_offset")
                continue
            if not p.dtype.is_floating_point and t.is_floating_point():
                if not torch.equal(t, t.round()):
                    raise CheckpointError(f"tensor {a.name!r} must hold integers (it is stored as "
                                          f"{dt}) but has fractional values")
            dst.copy_(t.to(p.dtype))
            filled[a.param] += t.numel()
            nbytes += t.numel() * t.element_size()
    for name, p in params.items():
        if filled[name] != p.numel():
            # the only legitimate gap: vocabulary padding rows of the last rank
            if name in ("embed_tokens.weight", "lm_head.weight") and filled[name] < p.numel():
                p.data[filled[name] // p.shape[1]:].zero_()
                continue
            raise CheckpointError(f"parameter {name} received {filled[name]} of {p.numel()} values "
                                  f"from the checkpoint")
    stats = {"tensors": len(plan), "bytes": nbytes, "seconds": time.perf_counter() - t0}
    logger.info("loaded %d tensors (%.1f MB) from %s in %.2fs (rank %d/%d%s)", stats["tensors"],
                nbytes / 1e6, model_dir, stats["seconds"], ctx.tp_rank, ctx.tp_size,
                f", layers {stage[0]}..{stage[1] - 1}" if stage else "")
    return stats


def load_model(model_dir: str, dtype=None, ctx: ParallelContext = SINGLE, device="cpu",
               max_positions: int | None = None, *, check_finite: bool = True, attention=None,
               layers: tuple[int, int] | None = None):
    """Build the graph for ``model_dir``'s config and load its weights. Returns (model, config).

    ``check_finite``: refuse float weights holding NaN / Inf (see ``load_weights``);
    ``attention``: an attention core factory (``model.attention.Qwen3Attention``), None for the
    standalone paged attention; ``layers``: (start, end), one pipeline stage (``Qwen3Graph``)."""
    from .model import Qwen3Graph

    from .quant.description import QuantConfig

    cfg = Qwen3Config.from_model_dir(model_dir)
    if dtype is not None:
        cfg = cfg.with_dtype(parse_dtype(dtype))
    check_parallel(cfg, ctx.tp_size, ctx.expert_parallel, ctx.dp_size)  # before any weight is read
    files = checkpoint_files(model_dir)
    quant = QuantConfig.from_model_dir(model_dir, cfg, set(files))
    model = Qwen3Graph(cfg, ctx, device=device, max_positions=max_positions, quant=quant,
                       attention=attention, layers=layers)
    load_weights(model, model_dir, cfg, ctx, quant, files, check_finite=check_finite)
    model.finalize_weights()
    return model.eval(), cfg
