"""Bad input gets a clear error that names the problem and the fix."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_qwen3.cli import main
from ascend_qwen3.config import ConfigError, Qwen3Config
from ascend_qwen3.loader import CheckpointError, load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        d = json.load(f)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    with open(cfg_path, "w") as f:
        json.dump(d, f)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_missing_config_key(checkpoint, tmp_path, key):
    path = _copy(checkpoint("dense_tied"), tmp_path / "m")
    _edit_config(path, **{key: None})
    with pytest.raises(ConfigError, match=f"missing required key.*{key}"):
        load_model(path)


def test_missing_moe_key(checkpoint, tmp_path):
    path = _copy(checkpoint("moe_plain"), tmp_path / "m")
    _edit_config(path, num_experts=None, num_local_experts=None)
    with pytest.raises(ConfigError, match="num_experts"):
        load_model(path)


def test_unknown_architecture(checkpoint, tmp_path):
    path = _copy(checkpoint("dense_tied"), tmp_path / "m")
    _edit_config(path, architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match="unknown architecture 'LlamaForCausalLM'.*Qwen3ForCausalLM"):
        load_model(path)


def test_no_config_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(str(tmp_path))


def test_inconsistent_heads():
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads"):
        Qwen3Config.from_dict({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                               "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2,
                               "intermediate_size": 8, "rope_theta": 1e6})


def _rewrite_tensors(path, fn):
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint("dense_tied"), tmp_path / "m")
    _rewrite_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\).*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(path)


def test_missing_expert_tensor_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint("moe_plain"), tmp_path / "m")
    _rewrite_tensors(path, lambda t: t.pop("model.layers.0.mlp.experts.3.down_proj.weight"))
    with pytest.raises(CheckpointError, match="experts.3.down_proj"):
        load_model(path)


def test_misshaped_tensor_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint("dense_tied"), tmp_path / "m")

    def cut(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    _rewrite_tensors(path, cut)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*shape \[191, 96\].*\[192, 96\]"):
        load_model(path)


def test_integer_tensor_rejected(checkpoint, tmp_path):
    path = _copy(checkpoint("dense_tied"), tmp_path / "m")

    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
    _rewrite_tensors(path, to_int)
    with pytest.raises(CheckpointError, match="model.norm.weight.*dtype I32"):
        load_model(path)


def test_unsupported_dtype(checkpoint, tmp_path):
    path = _copy(checkpoint("dense_tied"), tmp_path / "m")
    with pytest.raises(ConfigError, match="unsupported dtype 'float64'"):
        load_model(path, dtype="float64")
    _edit_config(path, torch_dtype="int4", dtype=None)
    with pytest.raises(ConfigError, match="unsupported dtype 'int4'"):
        load_model(path)


def test_no_safetensors(checkpoint, tmp_path):
    path = _copy(checkpoint("dense_tied"), tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(path)


def test_cli_reports_errors_cleanly(checkpoint, tmp_path, capsys):
    path = _copy(checkpoint("dense_tied"), tmp_path / "m")
    _edit_config(path, architectures=["GPT2LMHeadModel"])
    from tests.checkpoints import add_tokenizer
    add_tokenizer(path, 384)
    assert main(["run", "--model", path, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown architecture 'GPT2LMHeadModel'")
    assert "Traceback" not in err
