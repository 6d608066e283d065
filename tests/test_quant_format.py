"""The msModelSlim W8A8 format written by the quantizer and read by the loader (docs/w8a8_format.md),
and clear errors for malformed quantised checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ascend_qwen3.config import Qwen3Config
from ascend_qwen3.loader import CheckpointError, checkpoint_files, load_model
from ascend_qwen3.quant.description import QuantFormatError

DESC = "quant_model_description.json"
ST = {torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.float32: "F32",
      torch.bfloat16: "BF16", torch.float16: "F16"}


def _tensors(path):
    out = {}
    for name, f in checkpoint_files(path).items():
        with safe_open(f, "pt") as h:
            out[name] = h.get_tensor(name)
    return out


def _expected(cfg: Qwen3Config, scheme: str, model_dtype: torch.dtype) -> dict:
    """name -> (shape, dtype, description type), written out by hand from docs/w8a8_format.md."""
    H, D, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    exp = {"model.embed_tokens.weight": ((V, H), model_dtype, "FLOAT"),
           "model.norm.weight": ((H,), model_dtype, "FLOAT")}
    if not cfg.tie_word_embeddings:
        exp["lm_head.weight"] = ((V, H), model_dtype, "FLOAT")
    deq = torch.int64 if model_dtype == torch.float16 else torch.float32

    def linear(name, out, inp, kind):
        exp[name + ".weight"] = ((out, inp), torch.int8, kind)
        exp[name + ".weight_scale"] = ((out, 1), torch.float32, kind)
        exp[name + ".weight_offset"] = ((out, 1), torch.float32, kind)
        if kind == "W8A8":
            exp[name + ".input_scale"] = ((1,), model_dtype, kind)
            exp[name + ".input_offset"] = ((1,), torch.int8, kind)
            exp[name + ".quant_bias"] = ((out,), torch.int32, kind)
            exp[name + ".deq_scale"] = ((out,), deq, kind)

    kind = {"w8a8": "W8A8", "w8a8_dynamic": "W8A8_DYNAMIC"}[scheme]
    for i in range(cfg.num_layers):
        c = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            exp[c + n + ".weight"] = ((H,), model_dtype, "FLOAT")
        exp[c + "self_attn.q_norm.weight"] = ((D,), model_dtype, "FLOAT")
        exp[c + "self_attn.k_norm.weight"] = ((D,), model_dtype, "FLOAT")
        linear(c + "self_attn.q_proj", cfg.num_heads * D, H, kind)
        linear(c + "self_attn.k_proj", cfg.num_kv_heads * D, H, kind)
        linear(c + "self_attn.v_proj", cfg.num_kv_heads * D, H, kind)
        linear(c + "self_attn.o_proj", H, cfg.num_heads * D, kind)
        if cfg.is_moe_layer(i):
            exp[c + "mlp.gate.weight"] = ((cfg.num_experts, H), model_dtype, "FLOAT")
            I = cfg.moe_intermediate_size
            for e in range(cfg.num_experts):  # experts: dynamic only
                linear(c + f"mlp.experts.{e}.gate_proj", I, H, "W8A8_DYNAMIC")
                linear(c + f"mlp.experts.{e}.up_proj", I, H, "W8A8_DYNAMIC")
                linear(c + f"mlp.experts.{e}.down_proj", H, I, "W8A8_DYNAMIC")
        else:
            I = cfg.intermediate_size
            linear(c + "mlp.gate_proj", I, H, kind)
            linear(c + "mlp.up_proj", I, H, kind)
            linear(c + "mlp.down_proj", H, I, kind)
    return exp


@pytest.mark.parametrize("name,scheme,dtype", [
    ("dense_tied", "w8a8", torch.bfloat16), ("dense_yarn", "w8a8_dynamic", torch.bfloat16),
    ("moe_norm", "w8a8", torch.bfloat16), ("moe_norm", "w8a8_dynamic", torch.float32),
    ("dense_tied", "w8a8", torch.float16)])
def test_written_format_is_the_documented_one(quantized, name, scheme, dtype):
    path = quantized(name, scheme, dtype=dtype)
    cfg = Qwen3Config.from_model_dir(path)
    exp = _expected(cfg, scheme, dtype)
    got = _tensors(path)
    assert set(got) == set(exp), (sorted(set(got) ^ set(exp)))[:10]
    for n, (shape, dt, _) in exp.items():
        assert tuple(got[n].shape) == shape and got[n].dtype == dt, (n, got[n].shape, got[n].dtype)
    with open(os.path.join(path, DESC)) as f:
        desc = json.load(f)
    assert desc["model_quant_type"] == {"w8a8": "W8A8", "w8a8_dynamic": "W8A8_DYNAMIC"}[scheme]
    assert desc["version"] == "1.0.0" and "metadata" in desc and "group_size" in desc
    entries = {k: v for k, v in desc.items() if "." in k}
    assert entries == {n: t for n, (_, _, t) in exp.items()}
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config  # vllm-ascend would take it over the description
    # the quantisation maths of one static layer: offset folded into quant_bias, deq = s_x * s_w
    if scheme == "w8a8":
        p = "model.layers.0.self_attn.q_proj."
        wq, ws = got[p + "weight"], got[p + "weight_scale"]
        s_x, o_x = got[p + "input_scale"].float(), got[p + "input_offset"].long()
        assert torch.equal(got[p + "quant_bias"].long(), -o_x * wq.long().sum(dim=1))
        deq = got[p + "deq_scale"]
        if deq.dtype == torch.int64:  # fp16 model: fp32 bits as int64
            deq = deq.to(torch.int32).view(torch.float32)
        torch.testing.assert_close(deq, (s_x * ws.reshape(-1)).float(), rtol=1e-6, atol=0)
        # q, k and v share one input range (one input): identical per-tensor values
        for proj in ("k_proj", "v_proj"):
            q = "model.layers.0.self_attn." + proj + "."
            assert torch.equal(got[q + "input_scale"], got[p + "input_scale"])
            assert torch.equal(got[q + "input_offset"], got[p + "input_offset"])
        # weights are symmetric per output channel: max |wq| is 127 in each nonzero row
        assert int(wq.abs().amax(dim=1).min()) == 127


# --------------------------------------------------------------------------------------------
# malformed checkpoints
# --------------------------------------------------------------------------------------------

@pytest.fixture
def broken(quantized, tmp_path):
    """broken(scheme, name='dense_tied') -> a writable copy of a quantised checkpoint."""
    def make(scheme, name="dense_tied"):
        dst = tmp_path / f"{name}-{scheme}"
        shutil.copytree(quantized(name, scheme), dst)
        return str(dst)
    return make


def _edit_desc(path, fn):
    p = os.path.join(path, DESC)
    with open(p) as f:
        d = json.load(f)
    fn(d)
    with open(p, "w") as f:
        json.dump(d, f)


def _edit_tensors(path, fn):
    """fn(dict of one shard's tensors) for every shard; shards and index rewritten in place."""
    index = os.path.join(path, "model.safetensors.index.json")
    weight_map = {}
    for f in sorted({v for v in checkpoint_files(path).values()}):
        t = load_file(f)
        fn(t)
        save_file(t, f, metadata={"format": "pt"})
        weight_map.update({n: os.path.basename(f) for n in t})
    with open(index, "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)


def _drop(name):
    return lambda t: t.pop(name, None)


L0 = "model.layers.0."


@pytest.mark.parametrize("scheme,edit,exc,match", [
    # a scale the type needs is missing
    ("w8a8", lambda p: _edit_tensors(p, _drop(L0 + "self_attn.q_proj.deq_scale")), QuantFormatError,
     r"q_proj\.deq_scale"),
    ("w8a8_dynamic", lambda p: _edit_tensors(p, _drop(L0 + "mlp.down_proj.weight_scale")),
     QuantFormatError, r"down_proj\.weight_scale"),
    # wrong dtype: an int8 weight stored as float, a quant_bias stored as int64
    ("w8a8_dynamic", lambda p: _edit_tensors(p, lambda t: t.update(
        {L0 + "mlp.gate_proj.weight": t[L0 + "mlp.gate_proj.weight"].float()})
        if L0 + "mlp.gate_proj.weight" in t else None), CheckpointError,
     r"gate_proj\.weight.*F32.*I8"),
    ("w8a8", lambda p: _edit_tensors(p, lambda t: t.update(
        {L0 + "self_attn.o_proj.quant_bias": t[L0 + "self_attn.o_proj.quant_bias"].long()})
        if L0 + "self_attn.o_proj.quant_bias" in t else None), CheckpointError,
     r"o_proj\.quant_bias.*I64.*I32"),
    # one fused module with two types
    ("w8a8", lambda p: _edit_desc(p, lambda d: d.update({L0 + "self_attn.k_proj.weight": "W8A8_DYNAMIC"})),
     QuantFormatError, r"qkv_proj mix.*W8A8:.*W8A8_DYNAMIC:"),
    ("w8a8_dynamic", lambda p: _edit_desc(p, lambda d: d.update({L0 + "mlp.up_proj.weight": "FLOAT"})),
     QuantFormatError, r"gate_up_proj mix"),
    # the description names a tensor that is not in the checkpoint
    ("w8a8_dynamic", lambda p: _edit_desc(p, lambda d: d.update({L0 + "self_attn.q_proj.smooth_scale": "W8A8_DYNAMIC"})),
     QuantFormatError, r"does not contain: model\.layers\.0\.self_attn\.q_proj\.smooth_scale"),
    # the description lacks an entry for a weight
    ("w8a8", lambda p: _edit_desc(p, lambda d: d.pop(L0 + "self_attn.o_proj.weight")),
     QuantFormatError, r"no entry for 'model\.layers\.0\.self_attn\.o_proj\.weight'"),
    # unsupported types
    ("w8a8", lambda p: _edit_desc(p, lambda d: d.update(model_quant_type="W4A8_DYNAMIC")),
     QuantFormatError, r"W4A8_DYNAMIC.*not supported"),
    ("w8a8", lambda p: _edit_desc(p, lambda d: d.update({L0 + "mlp.down_proj.weight": "W8A16"})),
     QuantFormatError, r"'W8A16'.*FLOAT, W8A8, W8A8_DYNAMIC"),
    ("w8a8", lambda p: _edit_desc(p, lambda d: d.update({"model.norm.weight": "W8A8"})),
     QuantFormatError, r"must stay FLOAT"),
    # the description itself is not JSON
    ("w8a8", lambda p: open(os.path.join(p, DESC), "w").write("{not json"), QuantFormatError,
     r"not valid JSON"),
    # the float weights of a fused module's shards disagree on the shared input range
    ("w8a8", lambda p: _edit_tensors(p, lambda t: t.update(
        {L0 + "self_attn.v_proj.input_scale": t[L0 + "self_attn.v_proj.input_scale"] * 2})
        if L0 + "self_attn.v_proj.input_scale" in t else None), CheckpointError,
     r"v_proj\.input_scale.*share one input_scale"),
    # an int8 checkpoint without its description
    ("w8a8", lambda p: os.remove(os.path.join(p, DESC)), CheckpointError,
     r"dtype I8.*quant_model_description\.json"),
])
def test_malformed_quantized_checkpoint(broken, scheme, edit, exc, match):
    path = broken(scheme)
    edit(path)
    with pytest.raises(exc, match=match):
        load_model(path)


def test_static_experts_rejected(broken):
    path = broken("w8a8", "moe_norm")
    _edit_desc(path, lambda d: d.update({k: "W8A8" for k in list(d) if ".experts." in k}))
    with pytest.raises(QuantFormatError, match=r"experts.*W8A8 \(static\).*W8A8_DYNAMIC"):
        load_model(path)


def test_missing_scale_is_reported_before_the_model_is_built(broken):
    """The loader names the missing tensor (it is listed with the others it lacks)."""
    path = broken("w8a8")
    _edit_tensors(path, _drop(L0 + "self_attn.k_proj.input_offset"))
    with pytest.raises(QuantFormatError, match=r"k_proj\.input_offset"):
        load_model(path)
