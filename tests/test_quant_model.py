"""W8A8 models: integer compute, accuracy against the float model, smoothing on outlier
channels, the quantizer command and its errors. Measured numbers go to docs/quantization.md
(bench/quant_accuracy.py); the thresholds here are loose floors that catch broken maths."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_qwen3.cli import main
from ascend_qwen3.loader import checkpoint_files, load_model
from ascend_qwen3.quantizer import QuantizeError, quantize_checkpoint
from tests.checkpoints import SPECS, add_tokenizer, make_checkpoint
from tests.test_graph_parity import ours_prefill_logits

PROMPTS = [[3, 17, 42, 9, 100, 5, 61], [11, 250], list(range(20, 20 + 45))]


def compare(model, ref_model):
    """(mean cosine similarity of the logits, top-1 agreement) over PROMPTS."""
    a = torch.cat(ours_prefill_logits(model, PROMPTS)).float()
    b = torch.cat(ours_prefill_logits(ref_model, PROMPTS)).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
    return cos, (a.argmax(-1) == b.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("name", ["dense_tied", "dense_yarn", "moe_norm"])
@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_dynamic"])
def test_w8a8_close_to_float(checkpoint, quantized, name, scheme):
    ref, _ = load_model(checkpoint(name), dtype="float32")
    model, _ = load_model(quantized(name, scheme), dtype="float32")
    cos, top1 = compare(model, ref)
    assert cos > 0.99 and top1 > 0.75, (name, scheme, cos, top1)


def test_linears_run_int8_matmuls(quantized, monkeypatch):
    """Every quantised linear and expert GEMM goes through int8 x int8 -> int32
    (ops.cpu.int8_matmul); the float path (ops.cpu.linear) only serves the float router and LM
    head."""
    from ops import cpu

    model, cfg = load_model(quantized("moe_norm", "w8a8"), dtype="float32")
    calls = {"int_mm": 0, "linear": 0}
    real_int_mm, real_linear = cpu.int8_matmul, cpu.linear

    def int_mm(a, b):
        assert a.dtype == torch.int8 and b.dtype == torch.int8
        calls["int_mm"] += 1
        return real_int_mm(a, b)

    def linear(x, w, *args):
        assert w.is_floating_point()
        calls["linear"] += 1
        return real_linear(x, w, *args)

    monkeypatch.setattr(cpu, "int8_matmul", int_mm)
    monkeypatch.setattr(cpu, "linear", linear)
    with torch.inference_mode():
        ours_prefill_logits(model, [[5, 6, 7, 8]])
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    # qkv + o per layer, gate_up + down per dense layer; >= 2 GEMMs per MoE layer (one per
    # active expert and projection)
    assert calls["int_mm"] >= 2 * cfg.num_layers + 2 * (cfg.num_layers - moe_layers) + 2 * moe_layers
    assert calls["linear"] == moe_layers + 1  # routers + LM head


def test_static_linear_is_the_documented_integer_formula(quantized):
    """y = (clamp(round(x / s + o)) @ Wq^T + quant_bias) * deq_scale, computed here in int64."""
    path = quantized("dense_yarn", "w8a8")
    model, _ = load_model(path, dtype="float32")
    t = {}
    for f in set(checkpoint_files(path).values()):
        t.update(load_file(f))
    p = "model.layers.1.mlp.down_proj."
    x = torch.randn(9, t[p + "weight"].shape[1]) * 3
    s, o = t[p + "input_scale"].float(), t[p + "input_offset"].float()
    xq = torch.round(x / s + o).clamp(-128, 127).long()
    acc = xq @ t[p + "weight"].long().T + t[p + "quant_bias"].long()
    expected = acc.double() * t[p + "deq_scale"].double()
    got = model.layers[1].mlp.down_proj.matmul(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# synthetic outlier channels: SmoothQuant lowers the error
# --------------------------------------------------------------------------------------------

OUTLIER_CHANNELS, OUTLIER_FACTOR = (3, 17, 40), 30.0


def add_outlier_channels(path: str, channels=OUTLIER_CHANNELS, factor=OUTLIER_FACTOR) -> None:
    """Make a few hidden channels of every norm output ``factor`` times larger and divide the
    consuming weights' columns by the same factor: the float model computes the same function
    (up to rounding) but its linear inputs now have outlier channels, as real LLMs do."""
    files = checkpoint_files(path)
    for f in set(files.values()):
        t = load_file(f)
        for n in list(t):
            if n.endswith("input_layernorm.weight") or n.endswith("post_attention_layernorm.weight"):
                t[n][list(channels)] *= factor
            # every reader of a norm output (input dim = hidden): q/k/v, gate/up, the router
            if any(n.endswith(s) for s in ("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                           "gate_proj.weight", "up_proj.weight", "mlp.gate.weight")):
                t[n][:, list(channels)] /= factor
        save_file(t, f, metadata={"format": "pt"})


def test_smoothing_lowers_error_on_outlier_channels(tmp_path):
    src = str(tmp_path / "outliers")
    make_checkpoint("dense_yarn", src)
    add_tokenizer(src, SPECS["dense_yarn"]["vocab_size"])
    add_outlier_channels(src)
    ref, _ = load_model(src, dtype="float32")
    errors = {}
    for smooth in (None, 0.5):
        out = str(tmp_path / f"q-{smooth}")
        quantize_checkpoint(src, out, "w8a8", smooth=smooth, progress=False)
        model, _ = load_model(out, dtype="float32")
        cos, _ = compare(model, ref)
        errors[smooth] = 1 - cos
    assert errors[0.5] < 0.5 * errors[None], errors


# --------------------------------------------------------------------------------------------
# the command and its errors
# --------------------------------------------------------------------------------------------

def _src(checkpoint, name="dense_tied"):
    path = checkpoint(name)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        add_tokenizer(path, SPECS[name]["vocab_size"])
    return path


def test_quantize_command_with_user_calibration(checkpoint, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("Hello world, a first sample.\n\nThe quick brown fox, a second one.\n")
    out = tmp_path / "q"
    rc = main(["quantize", "--model", _src(checkpoint), "--out", str(out), "--scheme", "w8a8",
               "--calib", str(calib), "--smooth", "0.5", "--no-progress"])
    assert rc == 0
    msg = capsys.readouterr().out
    assert "from 2 samples" in msg and "smoothing alpha 0.5" in msg
    assert os.path.isfile(out / "quant_model_description.json")
    assert os.path.isfile(out / "tokenizer.json") and os.path.isfile(out / "config.json")
    assert not any(p.name.startswith(".q.partial") for p in tmp_path.iterdir())
    rc = main(["run", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "4"])
    assert rc == 0


@pytest.mark.parametrize("args,match", [
    (["--scheme", "w8a8", "--smooth", "1.5"], r"--smooth 1.5 is outside \[0, 1\]"),
    (["--scheme", "w8a8", "--calib", "/nonexistent/calib.txt"], r"calibration file .* does not exist"),
    (["--scheme", "w8a8", "--OUT-EXISTS"], r"exists and is not empty"),
])
def test_quantize_errors(checkpoint, tmp_path, capsys, args, match):
    out = tmp_path / "q"
    if "--OUT-EXISTS" in args:
        args = [a for a in args if a != "--OUT-EXISTS"]
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    rc = main(["quantize", "--model", _src(checkpoint), "--out", str(out), "--no-progress"] + args)
    assert rc == 2
    import re
    assert re.search(match, capsys.readouterr().err)
    if (out / "keep.txt").exists():
        assert (out / "keep.txt").read_text() == "user data"  # nothing overwritten


def test_quantize_refuses_quantized_input_and_missing_tokenizer(quantized, checkpoint, tmp_path):
    with pytest.raises(QuantizeError, match="already quantised"):
        quantize_checkpoint(quantized("dense_tied", "w8a8"), str(tmp_path / "x"), "w8a8")
    bare = str(tmp_path / "bare")
    make_checkpoint("dense_tied", bare)
    with pytest.raises(QuantizeError, match="tokenizer"):
        quantize_checkpoint(bare, str(tmp_path / "y"), "w8a8")
    with open(os.path.join(bare, "config.json")) as f:
        assert "architectures" in json.load(f)  # the source is untouched
