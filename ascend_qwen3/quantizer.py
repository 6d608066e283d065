"""``ascend-qwen3 quantize``: a float Qwen3 checkpoint -> an msModelSlim-format W8A8 checkpoint.

Layer by layer, with bounded memory (one decoder layer's weights in fp32 plus the calibration
hidden states): read the layer's float tensors, run the calibration tokens through it with the
project's own graph (fp32, CPU ops) recording per-channel activation ranges at every quantised
linear's input, optionally smooth (SmoothQuant: per-channel factors moved from the activations
into the weights, folded into the producing norm / up_proj rows, the float router compensated),
quantise, and write that layer's shard before reading the next.

Schemes: ``w8a8`` quantises attention and dense-MLP linears as static W8A8 (calibrated
input_scale/input_offset) and MoE experts as W8A8_DYNAMIC (static experts do not exist in the
format); ``w8a8_dynamic`` makes every linear and expert W8A8_DYNAMIC. Embeddings, norms, QK-norms,
the router and the LM head stay FLOAT. Smoothing points: input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up (and every expert's gate/up), up_proj -> down_proj (per expert
too); o_proj is not smoothed (its input is the attention output, with no per-channel producer
to fold into without touching v_proj per GQA group).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from importlib import resources

import torch

from .config import Qwen3Config
from .loader import CheckpointError, checkpoint_files, fill_from_tensors
from .parallel import SINGLE
from .parallel.plan import rank_plan
from .quant.format import DESCRIPTION_FILE, FLOAT, W8A8, W8A8_DYNAMIC, quant_groups
from .quant.maths import activation_params, quantize_weight, smooth_scales, static_linear_params

logger = logging.getLogger("ascend_qwen3.quantize")

SCHEMES = {"w8a8": W8A8, "w8a8_dynamic": W8A8_DYNAMIC}


class QuantizeError(ValueError):
    """A quantisation request that cannot be carried out; the message says what to change."""


# ------------------------------------------------------------------------------------------------
# calibration text
# ------------------------------------------------------------------------------------------------

def builtin_calibration() -> list[str]:
    text = resources.files("ascend_qwen3.quant").joinpath("data/calibration.txt").read_text("utf-8")
    return split_samples(text)


def split_samples(text: str) -> list[str]:
    """Samples separated by blank lines; '#' comment lines dropped."""
    samples, cur = [], []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if line.strip():
            cur.append(line)
        elif cur:
            samples.append("\n".join(cur))
            cur = []
    if cur:
        samples.append("\n".join(cur))
    return samples


def load_calibration(path: str | None) -> list[str]:
    if path is None:
        return builtin_calibration()
    if not os.path.isfile(path):
        raise QuantizeError(f"calibration file {path!r} does not exist; pass a UTF-8 text file "
                            f"(samples separated by blank lines) or omit --calib for the built-in set")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise QuantizeError(f"calibration file {path!r} is not UTF-8 text ({exc})") from None
    samples = split_samples(text)
    if not samples:
        raise QuantizeError(f"calibration file {path!r} holds no text; give at least one sample")
    return samples


def calibration_tokens(tokenizer, samples: list[str], max_tokens: int, max_len: int,
                       vocab_size: int) -> list[list[int]]:
    seqs, total = [], 0
    for s in samples:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"][:max_len]
        ids = [i for i in ids if i < vocab_size]
        if len(ids) < 2:
            continue
        ids = ids[:max(0, max_tokens - total)]
        if not ids:
            break
        seqs.append(ids)
        total += len(ids)
    if not seqs:
        raise QuantizeError("the calibration text encodes to no usable tokens with this tokenizer")
    return seqs


# ------------------------------------------------------------------------------------------------
# one layer: float weights in, activation statistics out
# ------------------------------------------------------------------------------------------------

class _ChannelRange:
    """Running per-channel min and max of a linear's input."""

    def __init__(self):
        self.lo = self.hi = None

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        lo, hi = x.amin(dim=0), x.amax(dim=0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def range_after(self, s: torch.Tensor | None) -> tuple[float, float]:
        """Tensor-wide (min, max) once the channels are divided by s (s > 0)."""
        lo, hi = (self.lo, self.hi) if s is None else (self.lo / s, self.hi / s)
        return float(lo.min()), float(hi.max())


def _layer_names(cfg: Qwen3Config, i: int) -> list[str]:
    prefix = f"model.layers.{i}."
    return [a.name for a in rank_plan(cfg, 1, 0) if a.name.startswith(prefix)]


@torch.no_grad()
def _calibrate_layer(layer, cfg32: Qwen3Config, h, residual, rope, meta, kv, is_moe):
    """Run the calibration tokens through ``layer``; returns (stats, h_out, residual_out)."""
    import ops

    stats: dict[str, _ChannelRange] = {}
    experts_down: dict[int, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            stats.setdefault(name, _ChannelRange()).update(args[0])
        return hook

    hooks = [layer.self_attn.qkv_proj.register_forward_pre_hook(record("attn_in")),
             layer.self_attn.o_proj.register_forward_pre_hook(record("o_in"))]
    if is_moe:
        block = layer.mlp

        def moe_hook(module, args):
            x = args[0]
            stats.setdefault("mlp_in", _ChannelRange()).update(x)
            logits = torch.nn.functional.linear(x, module.gate)
            _, ids = ops.moe_gating_topk(logits, module.top_k, module.renormalize)
            for e in range(module.num_experts):
                rows = (ids == e).any(dim=-1)
                if not bool(rows.any()):
                    continue
                a = ops.swiglu(x[rows] @ module.experts.w13[e])
                m = a.abs().amax(dim=0)
                experts_down[e] = m if e not in experts_down else torch.maximum(experts_down[e], m)
        hooks.append(block.register_forward_pre_hook(moe_hook))
    else:
        hooks.append(layer.mlp.gate_up_proj.register_forward_pre_hook(record("mlp_in")))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(record("down_in")))
    try:
        out, res = layer(h, residual, rope, meta, kv)
    finally:
        for hk in hooks:
            hk.remove()
    return stats, experts_down, out, res


# ------------------------------------------------------------------------------------------------
# smoothing and quantisation of one layer's tensors
# ------------------------------------------------------------------------------------------------

def _fold(absmax: torch.Tensor, consumers: list[torch.Tensor], producer: torch.Tensor,
          alpha: float) -> torch.Tensor:
    """SmoothQuant at one activation point, in place: the factors s of the activation (per-channel
    ``absmax``) against its ``consumers`` (weights [N, K] reading it), the consumers' input
    columns times s, the ``producer``'s output divided by s (a norm weight [K] or up_proj rows
    [K, H]), so the float function is unchanged. Returns s."""
    s = smooth_scales(absmax, consumers, alpha)
    producer /= s if producer.dim() == 1 else s.unsqueeze(-1)
    for w in consumers:
        w *= s
    return s


def _smooth(W: dict, cfg: Qwen3Config, i: int, stats, experts_down, alpha: float) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant factors into W in place; returns the factor per activation point."""
    c = f"model.layers.{i}."
    a, m = c + "self_attn.", c + "mlp."
    qkv = [W[a + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")]
    factors = {"attn_in": _fold(stats["attn_in"].absmax(), qkv, W[c + "input_layernorm.weight"],
                                alpha)}
    post_norm = W[c + "post_attention_layernorm.weight"]
    if cfg.is_moe_layer(i):
        ups = [W[f"{m}experts.{e}.{p}.weight"] for e in range(cfg.num_experts)
               for p in ("gate_proj", "up_proj")]
        s = factors["mlp_in"] = _fold(stats["mlp_in"].absmax(), ups, post_norm, alpha)
        W[m + "gate.weight"] *= s  # the float router sees the smoothed input: compensate exactly
        for e, act in experts_down.items():
            _fold(act, [W[f"{m}experts.{e}.down_proj.weight"]], W[f"{m}experts.{e}.up_proj.weight"],
                  alpha)
    else:
        gu = [W[m + "gate_proj.weight"], W[m + "up_proj.weight"]]
        factors["mlp_in"] = _fold(stats["mlp_in"].absmax(), gu, post_norm, alpha)
        factors["down_in"] = _fold(stats["down_in"].absmax(), [W[m + "down_proj.weight"]],
                                   W[m + "up_proj.weight"], alpha)
    return factors


def _model_dtype_value(x: float, dtype: torch.dtype) -> float:
    return float(torch.tensor([x], dtype=torch.float32).to(dtype).float())


def _quantize_linear(name: str, w: torch.Tensor, kind: str, dtype: torch.dtype,
                     act_range: tuple[float, float] | None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantised linear ``name`` (HF module name)."""
    wq, ws = quantize_weight(w)
    out = {f"{name}.weight": wq,
           f"{name}.weight_scale": ws.float(),
           f"{name}.weight_offset": torch.zeros_like(ws, dtype=torch.float32)}
    if kind == W8A8:
        scale, offset = activation_params(*act_range)
        scale = _model_dtype_value(scale, dtype)  # stored in the model dtype: use what is stored
        _, offset = activation_params(*act_range, scale=scale)
        quant_bias, deq = static_linear_params(wq, ws, scale, offset)
        if dtype == torch.float16:  # fp16 models: the fp32 bit pattern as int64 (msModelSlim)
            deq_t = deq.float().view(torch.int32).to(torch.int64)
        else:
            deq_t = deq.float()
        out.update({f"{name}.input_scale": torch.tensor([scale], dtype=dtype),
                    f"{name}.input_offset": torch.tensor([offset], dtype=torch.int8),
                    f"{name}.quant_bias": quant_bias,
                    f"{name}.deq_scale": deq_t})
    return out


# ------------------------------------------------------------------------------------------------
# the whole checkpoint
# ------------------------------------------------------------------------------------------------

def _read(files: dict[str, str], names: list[str], dtype=torch.float32) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out, by_file = {}, {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for path, ns in by_file.items():
        with safe_open(path, "pt") as f:
            for n in ns:
                out[n] = f.get_tensor(n).to(dtype)
    return out


def _check_out_dir(out_dir: str, model_dir: str) -> None:
    if os.path.abspath(out_dir) == os.path.abspath(model_dir):
        raise QuantizeError("--out must differ from --model; the float checkpoint is kept as is")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise QuantizeError(f"--out {out_dir!r} exists and is not empty; choose a new directory "
                            f"(nothing is overwritten)")


def quantize_checkpoint(model_dir: str, out_dir: str, scheme: str = "w8a8_dynamic",
                        calib: str | None = None, smooth: float | None = None,
                        max_calib_tokens: int = 2048, max_sample_len: int = 512,
                        progress: bool = True) -> dict:
    """Quantise ``model_dir`` into ``out_dir``; returns a summary (tensors, bytes, seconds)."""
    t0 = time.perf_counter()
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if smooth is not None and not 0.0 <= smooth <= 1.0:
        raise QuantizeError(f"--smooth {smooth} is outside [0, 1]; SmoothQuant's alpha is usually 0.5")
    if os.path.isfile(os.path.join(model_dir, DESCRIPTION_FILE)):
        raise QuantizeError(f"{model_dir!r} is already quantised (it has {DESCRIPTION_FILE}); "
                            f"quantise the float checkpoint")
    cfg = Qwen3Config.from_model_dir(model_dir)
    _check_out_dir(out_dir, model_dir)
    kind = SCHEMES[scheme]
    files = checkpoint_files(model_dir)
    plan = rank_plan(cfg, 1, 0)
    missing = sorted({a.name for a in plan if a.name not in files})
    if missing:
        raise CheckpointError(f"checkpoint {model_dir!r} is missing tensor(s): {', '.join(missing[:6])}")
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise QuantizeError(f"calibration needs the checkpoint's tokenizer, but none loads from "
                            f"{model_dir!r} ({exc.__class__.__name__}); add tokenizer.json / "
                            f"tokenizer_config.json") from None
    seqs = calibration_tokens(tokenizer, load_calibration(calib), max_calib_tokens, max_sample_len,
                              cfg.vocab_size)
    n_tokens = sum(map(len, seqs))
    dtype = cfg.dtype

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    work = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.partial")
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    try:
        summary = _quantize_into(work, model_dir, cfg, files, kind, seqs, smooth, progress)
        for fname in sorted(os.listdir(model_dir)):  # tokenizer, generation config, ...
            src = os.path.join(model_dir, fname)
            if (os.path.isfile(src) and not fname.endswith(".safetensors")
                    and fname not in ("model.safetensors.index.json", "config.json")):
                shutil.copy2(src, os.path.join(work, fname))
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        config.pop("quantization_config", None)  # vllm-ascend would read it instead of the description
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    summary.update(scheme=scheme, smooth=smooth, calib_tokens=n_tokens, calib_samples=len(seqs),
                   seconds=time.perf_counter() - t0, out_dir=out_dir, dtype=str(dtype).replace("torch.", ""))
    return summary


def _quantize_into(work: str, model_dir: str, cfg: Qwen3Config, files: dict, kind: str,
                   seqs: list[list[int]], smooth: float | None, progress: bool) -> dict:
    import ops
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .model.decoder import Qwen3DecoderLayer
    from .runner.kv_cache import PagedKVCache

    dtype = cfg.dtype
    cfg32 = cfg.with_dtype(torch.float32)
    float_plan = rank_plan(cfg, 1, 0)          # the layers are filled as the loader fills them
    n_shards = cfg.num_layers + 1
    shard = lambda k: f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731
    weight_map: dict[str, str] = {}
    description: dict[str, str] = {}
    bytes_in = bytes_out = 0

    # calibration inputs: all samples packed into one prefill step
    one = dataclasses.replace(cfg32, num_layers=1)
    cache = PagedKVCache.for_tokens(one, sum(map(len, seqs)) + 16 * len(seqs), block_size=16)
    positions, meta = cache.prepare([(r, len(s)) for r, s in enumerate(seqs)])
    ids = torch.tensor([t for s in seqs for t in s])
    rope_cache = ops.rope_cos_sin_cache(cfg.head_dim, int(positions.max()) + 1, cfg.rope_theta,
                                        cfg.rope_scaling)
    rope = ops.rope_step(ops.rope_table(rope_cache, torch.float32), rope_cache, positions)

    # shard 0: embeddings, final norm, LM head (FLOAT)
    top = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        top.append("lm_head.weight")
    # read in the model dtype (the embedding is the largest tensor of small models: no fp32 copy)
    out = {n: t.contiguous() for n, t in _read(files, top, dtype).items()}
    h = torch.nn.functional.embedding(ids, out["model.embed_tokens.weight"]).float()
    residual = None
    for n, t in out.items():
        weight_map[n], description[n] = shard(0), FLOAT
        bytes_in += t.numel() * t.element_size()
        bytes_out += t.numel() * t.element_size()
    save_file(out, os.path.join(work, shard(0)), metadata={"format": "pt"})
    del out

    groups = {g.module: g for g in quant_groups(cfg)}
    bar = tqdm(range(cfg.num_layers), desc=f"quantize {kind}", unit="layer", disable=not progress)
    for i in bar:
        names = _layer_names(cfg, i)
        W = _read(files, names)
        bytes_in += sum(t.numel() for t in W.values()) * torch.empty(0, dtype=dtype).element_size()
        is_moe = cfg.is_moe_layer(i)
        layer = Qwen3DecoderLayer(cfg32, i, SINGLE)
        fill_from_tensors(layer, float_plan, W, prefix=f"layers.{i}.")
        stats, experts_down, h_next, res_next = _calibrate_layer(
            layer, cfg32, h, residual, rope, meta, cache.caches[0], is_moe)
        factors = _smooth(W, cfg, i, stats, experts_down, smooth) if smooth else {}

        out: dict[str, torch.Tensor] = {}
        kinds: dict[str, str] = {}
        p = f"layers.{i}."
        for module, point in ((p + "self_attn.qkv_proj", "attn_in"), (p + "self_attn.o_proj", "o_in"),
                              (p + "mlp.gate_up_proj", "mlp_in"), (p + "mlp.down_proj", "down_in"),
                              (p + "mlp.experts", None)):
            g = groups.get(module)
            if g is None:
                continue
            k = W8A8_DYNAMIC if g.role == "experts" else kind
            rng = stats[point].range_after(factors.get(point)) if k == W8A8 else None
            for member in g.members:
                t = _quantize_linear(member, W.pop(member + ".weight"), k, dtype, rng)
                out.update(t)
                kinds.update({n: k for n in t})
        for n, t in W.items():  # norms, QK-norms, router: FLOAT in the model dtype
            out[n] = t.to(dtype)
            kinds[n] = FLOAT
        out = {n: t.contiguous() for n, t in out.items()}
        save_file(out, os.path.join(work, shard(i + 1)), metadata={"format": "pt"})
        for n, t in out.items():
            weight_map[n], description[n] = shard(i + 1), kinds[n]
            bytes_out += t.numel() * t.element_size()
        h, residual = h_next, res_next
        del W, out, layer

    with open(os.path.join(work, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": bytes_out}, "weight_map": weight_map}, f, indent=2)
    desc = {"model_quant_type": kind, "version": "1.0.0", "metadata": {}, "group_size": 0}
    desc.update(description)
    with open(os.path.join(work, DESCRIPTION_FILE), "w") as f:
        json.dump(desc, f, indent=2)
    return {"tensors": len(weight_map), "bytes_in": bytes_in, "bytes_out": bytes_out,
            "layers": cfg.num_layers}


__all__ = ["quantize_checkpoint", "QuantizeError", "SCHEMES", "builtin_calibration",
           "load_calibration", "split_samples"]
