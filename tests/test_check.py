"""``ascend-qwen3 check`` / ``check_checkpoint``, serve's pre-start check, and the loader's own
refusals of unreadable files and non-finite weights: each bad checkpoint is named with its file
(and tensor) and the fix."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_qwen3.check import check_checkpoint
from ascend_qwen3.cli import main
from ascend_qwen3.config import ConfigError
from ascend_qwen3.loader import SKIP_FINITE_ENV, CheckpointError, load_model
from tests.checkpoints import SPECS, add_tokenizer

ST = "model.safetensors"
INDEX = "model.safetensors.index.json"
DESC = "quant_model_description.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json")
L0 = "model.layers.0."


@pytest.fixture(scope="module")
def with_tokenizer(checkpoint, tmp_path_factory):
    """with_tokenizer(name) -> a clean checkpoint directory with a small Qwen-style tokenizer
    (made once per module; copy it before changing it)."""
    made = {}

    def get(name):
        if name not in made:
            d = str(tmp_path_factory.mktemp(f"{name}-tok") / "m")
            shutil.copytree(checkpoint(name), d)
            if not os.path.isfile(os.path.join(d, "tokenizer.json")):
                add_tokenizer(d, SPECS[name]["vocab_size"])
            made[name] = d
        return made[name]

    return get


@pytest.fixture
def copy(with_tokenizer, quantized, tmp_path):
    """copy(name) / copy(name, scheme) -> a writable copy of a clean (quantised) checkpoint."""
    def make(name="dense_tied", scheme=None):
        src = quantized(name, scheme) if scheme else with_tokenizer(name)
        dst = tmp_path / f"{name}-{scheme or 'float'}"
        shutil.copytree(src, dst)
        return str(dst)
    return make


def _rewrite(path, fn, fname=ST):
    f = os.path.join(path, fname)
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _edit_json(path, fname, fn):
    p = os.path.join(path, fname)
    with open(p) as f:
        d = json.load(f)
    fn(d)
    with open(p, "w") as f:
        json.dump(d, f)


def _shard(path):
    """Split model.safetensors into two shards with an index; returns the shard names."""
    tensors = load_file(os.path.join(path, ST))
    os.remove(os.path.join(path, ST))
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, part in parts.items():
        save_file({n: tensors[n] for n in part}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return list(parts)


def _only(report):
    """The message of the report's single problem (the check must find exactly one)."""
    assert len(report.problems) == 1, [str(p) for p in report.problems]
    return str(report.problems[0])


# ------------------------------------------------------------------------------------------------
# clean checkpoints pass
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dense_tied", "moe_norm"])
def test_clean_float_checkpoints_pass(with_tokenizer, name):
    for deep in (False, True):
        report = check_checkpoint(with_tokenizer(name), deep=deep)
        assert report.ok, [str(p) for p in report.problems]
    assert report.files == 1 and report.tensors > 0 and report.bytes_read > 0


def test_clean_sharded_and_w8a8_checkpoints_pass(copy):
    path = copy("dense_tied")
    _shard(path)
    assert check_checkpoint(path).ok
    report = check_checkpoint(copy("dense_tied", "w8a8"), deep=True)
    assert report.ok, [str(p) for p in report.problems]


def test_embedded_default_model_passes(tmp_path, capsys):
    from ascend_qwen3.serve.default_model import build_default_model

    path = build_default_model(str(tmp_path / "default"), log=lambda m: None)
    assert check_checkpoint(path, deep=True).ok
    assert main(["check", path]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [out[-1]] and out[-1].startswith(f"OK: {path}")


def test_tied_checkpoint_may_carry_its_lm_head(copy):
    """A duplicated lm_head.weight in a tied checkpoint is ignored by the loader, so allowed;
    one that cannot be the tied head (wrong shape) is refused."""
    path = copy()
    _rewrite(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert check_checkpoint(path).ok
    load_model(path)
    _rewrite(path, lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:-1].clone()}))
    msg = _only(check_checkpoint(path))
    assert "lm_head.weight" in msg and "expected shape [384, 96]" in msg and "found [383, 96]" in msg


# ------------------------------------------------------------------------------------------------
# safetensors files: truncated, corrupt, index problems
# ------------------------------------------------------------------------------------------------

def test_truncated_file_is_named_with_missing_bytes(copy, capsys):
    path = copy()
    f = os.path.join(path, ST)
    os.truncate(f, os.path.getsize(f) - 1000)
    msg = _only(check_checkpoint(path))
    assert msg.startswith(f"{ST}: ") and "1000 bytes are missing" in msg and "truncated" in msg
    assert "re-download or re-copy" in msg
    assert main(["check", path]) == 2
    out = capsys.readouterr().out
    assert "1000 bytes are missing" in out and out.strip().splitlines()[-1].startswith("FAILED:")


def test_loader_names_a_truncated_file(copy):
    path = copy()
    f = os.path.join(path, ST)
    os.truncate(f, os.path.getsize(f) - 10)
    with pytest.raises(CheckpointError, match=rf"{ST} is not a readable safetensors file.*re-download"):
        load_model(path)


def test_corrupt_header_is_named(copy):
    path = copy()
    f = os.path.join(path, ST)
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\x00garbage" * 4)
    msg = _only(check_checkpoint(path))
    assert msg.startswith(f"{ST}: ") and "not JSON" in msg and "re-download" in msg
    with pytest.raises(CheckpointError, match=f"{ST} is not a readable safetensors file"):
        load_model(path)


def test_header_length_larger_than_file(copy):
    path = copy()
    f = os.path.join(path, ST)
    with open(f, "r+b") as fh:
        fh.write((10 ** 12).to_bytes(8, "little"))
    msg = _only(check_checkpoint(path))
    assert f"header of {10 ** 12} bytes, larger than the whole file" in msg and ST in msg


def test_file_shorter_than_a_header(copy):
    path = copy()
    with open(os.path.join(path, ST), "wb") as fh:
        fh.write(b"abc")
    msg = _only(check_checkpoint(path))
    assert "found only 3 bytes" in msg and "re-download" in msg


def test_index_pointing_at_a_missing_shard(copy):
    path = copy()
    first, second = _shard(path)
    assert check_checkpoint(path).ok
    os.remove(os.path.join(path, second))
    # one problem, for the shard; its tensors are not listed again as missing
    msg = _only(check_checkpoint(path))
    assert msg.startswith(f"{second}: ") and INDEX in msg and "copy it from the original" in msg
    with pytest.raises(CheckpointError, match=f"{second}.*copy {second} from the original"):
        load_model(path)


def test_index_naming_a_tensor_its_shard_lacks(copy):
    path = copy()
    first, second = _shard(path)
    moved = sorted(load_file(os.path.join(path, first)))[0]
    _edit_json(path, INDEX, lambda d: d["weight_map"].update({moved: second}))
    msgs = [str(p) for p in check_checkpoint(path).problems]
    assert any(m.startswith(f"{second}: {moved}: ") and "does not contain it" in m
               and "re-download them together" in m for m in msgs), msgs


def test_tensor_in_two_files(copy):
    path = copy()
    save_file({"model.norm.weight": torch.ones(96)}, os.path.join(path, "stale.safetensors"))
    msg = _only(check_checkpoint(path))
    assert msg.startswith("stale.safetensors: model.norm.weight: ") and f"found it in {ST} too" in msg
    assert "remove the stale file" in msg


def test_invalid_index_json(copy):
    path = copy()
    _shard(path)
    with open(os.path.join(path, INDEX), "w") as f:
        f.write("{not json")
    msg = _only(check_checkpoint(path))
    assert msg.startswith(f"{INDEX}: ") and "invalid" in msg and "regenerate it" in msg


# ------------------------------------------------------------------------------------------------
# tensors against the plan
# ------------------------------------------------------------------------------------------------

def test_missing_tensor(copy, capsys):
    path = copy("moe_norm")
    gone = [L0 + "mlp.experts.3.down_proj.weight", "model.layers.2.self_attn.k_norm.weight"]
    _rewrite(path, lambda t: [t.pop(n) for n in gone])
    msg = _only(check_checkpoint(path))
    assert "found 2 missing" in msg and all(n in msg for n in gone) and "re-download" in msg
    assert main(["check", path]) == 2
    assert gone[0] in capsys.readouterr().out


def test_extra_tensor_is_refused(copy):
    path = copy()
    _rewrite(path, lambda t: t.update({L0 + "mlp.extra_proj.weight": torch.zeros(4, 4)}))
    msg = _only(check_checkpoint(path))
    assert f"{L0}mlp.extra_proj.weight" in msg and "no part of the model reads" in msg
    assert "remove them" in msg


def test_linear_bias_only_next_to_quantised_linears(copy):
    """msModelSlim writes a float .bias (described FLOAT) next to quantised linears, which the
    loader ignores; in a float Qwen3 checkpoint a linear bias has no place."""
    name = L0 + "self_attn.q_proj.bias"
    path = copy("dense_tied", "w8a8")
    fname = json.load(open(os.path.join(path, INDEX)))["weight_map"][L0 + "self_attn.q_proj.weight"]
    _rewrite(path, lambda t: t.update({name: torch.zeros(192)}), fname)
    _edit_json(path, INDEX, lambda d: d["weight_map"].update({name: fname}))
    _edit_json(path, DESC, lambda d: d.update({name: "FLOAT"}))
    assert check_checkpoint(path).ok
    path = copy()
    _rewrite(path, lambda t: t.update({name: torch.zeros(192)}))
    msg = _only(check_checkpoint(path))
    assert msg.startswith(f"{ST}: {name}: ") and "no part of the model reads" in msg


def test_extra_layer_names_the_config_mismatch(copy):
    path = copy()
    _rewrite(path, lambda t: t.update({"model.layers.3.input_layernorm.weight": torch.ones(96)}))
    msg = _only(check_checkpoint(path))
    assert "num_hidden_layers=3 but the files hold layers up to 3" in msg


def test_wrong_dtype(copy):
    path = copy()
    name = L0 + "mlp.gate_proj.weight"
    _rewrite(path, lambda t: t.update({name: t[name].to(torch.int32)}))
    msg = _only(check_checkpoint(path))
    assert f"{L0}mlp.gate_proj.weight" in msg and "expected dtype F32 or BF16 or F16, found I32" in msg
    assert "re-export the checkpoint in a float dtype" in msg


def test_wrong_shape(copy):
    path = copy()
    name = L0 + "mlp.up_proj.weight"
    _rewrite(path, lambda t: t.update({name: t[name][:-1].clone()}))
    msg = _only(check_checkpoint(path))
    assert name in msg and "expected shape [192, 96]" in msg and "found [191, 96]" in msg


def test_tp_that_cannot_shard(copy, capsys):
    path = copy()
    assert main(["check", path, "--tp", "4"]) == 2     # 6 query heads
    assert "tp=4 does not divide 6 query heads" in capsys.readouterr().out
    assert main(["check", path, "--ep"]) == 2
    assert "drop --ep" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# NaN / Inf: deep check and at load
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weight(copy, bad, word):
    path = copy()
    name = "model.layers.1.self_attn.o_proj.weight"

    def poison(t):
        t[name][3, :5] = bad
    _rewrite(path, poison)
    assert check_checkpoint(path).ok               # header-only: the values are not read
    msg = _only(check_checkpoint(path, deep=True))
    counts = "(5 NaN, 0 Inf)" if word == "NaN" else "(0 NaN, 5 Inf)"
    assert msg.startswith(f"{ST}: {name}: ") and f"5 non-finite value(s) {counts}" in msg
    assert "re-download or re-export" in msg
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    assert name in str(exc.value) and f"{ST} has 5 non-finite value(s) {counts}" in str(exc.value)


def test_non_finite_opt_out(copy, monkeypatch):
    path = copy()
    name = "model.norm.weight"
    _rewrite(path, lambda t: t[name].__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match=SKIP_FINITE_ENV):
        load_model(path)
    model, _ = load_model(path, check_finite=False)
    assert torch.isnan(model.norm.weight).sum() == 1
    monkeypatch.setenv(SKIP_FINITE_ENV, "1")
    model, _ = load_model(path)
    assert torch.isnan(model.norm.weight).sum() == 1


# ------------------------------------------------------------------------------------------------
# quant_model_description.json that lies
# ------------------------------------------------------------------------------------------------

def test_description_says_w8a8_for_a_float_weight(copy):
    path = copy("dense_tied", "w8a8")
    name = L0 + "self_attn.q_proj.weight"
    fname = json.load(open(os.path.join(path, INDEX)))["weight_map"][name]
    _rewrite(path, lambda t: t.update({name: t[name].float()}), fname)
    msg = _only(check_checkpoint(path))
    assert msg.startswith(f"{DESC}: {name}: described as W8A8") and "stores it as F32" in msg
    assert "regenerate them together" in msg


def test_description_says_float_for_an_int8_weight(copy):
    path = copy("dense_tied", "w8a8")
    names = [L0 + f"self_attn.{p}_proj.weight" for p in "qkv"]
    _edit_json(path, DESC, lambda d: d.update({n: "FLOAT" for n in names}))
    msgs = [str(p) for p in check_checkpoint(path).problems]
    # one problem per weight; their scales are not reported again as unexpected tensors
    assert len(msgs) == 3, msgs
    for n, m in zip(names, msgs):
        assert m.startswith(f"{DESC}: {n}: described as FLOAT") and "stores it as I8" in m


def test_quantised_checkpoint_without_its_description(copy):
    path = copy("dense_tied", "w8a8")
    os.remove(os.path.join(path, DESC))
    msgs = [str(p) for p in check_checkpoint(path).problems]
    assert any("found I8" in m and f"its {DESC} is missing, add it" in m for m in msgs), msgs
    assert any("look like W8A8 tensors, but there is no" in m for m in msgs), msgs


def test_description_missing_an_entry(copy):
    path = copy("dense_tied", "w8a8")
    _edit_json(path, DESC, lambda d: d.pop(L0 + "self_attn.o_proj.weight"))
    msg = _only(check_checkpoint(path))
    assert msg.startswith(f"{DESC}: ") and f"no entry for '{L0}self_attn.o_proj.weight'" in msg


def test_description_names_an_absent_tensor(copy):
    path = copy("dense_tied", "w8a8")
    _edit_json(path, DESC, lambda d: d.update({L0 + "self_attn.q_proj.smooth_scale": "W8A8"}))
    msg = _only(check_checkpoint(path))
    assert f"does not contain: {L0}self_attn.q_proj.smooth_scale" in msg and "different exports" in msg


# ------------------------------------------------------------------------------------------------
# config.json out of range
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,changes,match", [
    ("dense_tied", {"hidden_size": -96}, r"'hidden_size' must be a positive integer, found -96"),
    ("dense_tied", {"num_hidden_layers": 0}, r"'num_hidden_layers' must be a positive integer, found 0"),
    ("dense_tied", {"hidden_size": "abc"}, r"'hidden_size' must be a positive integer, found 'abc'"),
    ("dense_tied", {"hidden_size": 12.5}, r"'hidden_size' must be a positive integer, found 12.5"),
    ("dense_tied", {"vocab_size": 0}, r"'vocab_size' must be a positive integer"),
    ("dense_tied", {"rms_norm_eps": 0}, r"'rms_norm_eps' must be a number > 0 and < 1, found 0"),
    ("dense_tied", {"rms_norm_eps": 1.5}, r"'rms_norm_eps' must be a number > 0 and < 1, found 1.5"),
    ("dense_tied", {"rope_parameters": {"rope_type": "default", "rope_theta": 0}},
     r"'rope_theta' must be a number > 0, found 0"),
    ("dense_tied", {"max_position_embeddings": -1}, r"'max_position_embeddings' must be a positive"),
    ("dense_tied", {"rope_parameters": {"rope_type": "yarn", "factor": 0.5, "rope_theta": 1e6}},
     r"yarn rope scaling 'factor' must be a number >= 1.*found 0.5"),
    ("moe_norm", {"num_experts_per_tok": 9}, r"num_experts_per_tok=9 exceeds num_experts=8"),
    ("moe_norm", {"num_experts": 0}, r"'num_experts' must be a positive integer, found 0"),
    ("moe_norm", {"decoder_sparse_step": 0}, r"'decoder_sparse_step' must be a positive integer"),
])
def test_config_out_of_range(copy, name, changes, match):
    path = copy(name)
    _edit_json(path, "config.json", lambda d: d.update(changes))
    msg = _only(check_checkpoint(path))
    assert msg.startswith("config.json: ")
    assert re.search(match, msg), msg
    with pytest.raises(ConfigError, match=match):
        load_model(path)


def test_config_absent_or_not_json(copy, capsys):
    path = copy()
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{not json")
    msg = _only(check_checkpoint(path))
    assert msg.startswith("config.json: expected JSON, found invalid JSON")
    os.remove(os.path.join(path, "config.json"))
    assert "found none" in _only(check_checkpoint(path))
    assert main(["check", path]) == 2
    assert "config.json: expected a Hugging Face Qwen3 config.json" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------

def _drop_tokens(path, tokens):
    def edit(d):
        d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] not in tokens]
        for t in tokens:
            d["model"]["vocab"].pop(t, None)
    _edit_json(path, "tokenizer.json", edit)
    def edit_config(d):
        kept = {k: v for k, v in d.get("added_tokens_decoder", {}).items() if v["content"] not in tokens}
        d["added_tokens_decoder"] = kept
    _edit_json(path, "tokenizer_config.json", edit_config)


def test_tokenizer_without_think_tokens(copy, capsys):
    path = copy()
    _drop_tokens(path, ["<think>", "</think>"])
    msg = _only(check_checkpoint(path))
    assert msg.startswith("tokenizer.json: ") and "found no <think>, </think>" in msg
    assert "use the tokenizer files of the checkpoint" in msg
    assert main(["check", path]) == 2
    assert "found no <think>, </think>" in capsys.readouterr().out


def test_tokenizer_ids_outside_the_vocabulary(copy):
    path = copy()
    _edit_json(path, "tokenizer.json", lambda d: [t.update(id=1000) for t in d["added_tokens"]
                                                  if t["content"] == "</think>"])
    _edit_json(path, "tokenizer.json", lambda d: d["model"]["vocab"].pop("</think>", None))
    msg = _only(check_checkpoint(path))
    assert "below the model's vocab_size 384, found </think>=1000" in msg


def test_tokenizer_json_not_json(copy):
    path = copy()
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("[1, 2")
    msg = _only(check_checkpoint(path))
    assert msg.startswith("tokenizer.json: expected JSON") and "copy the file" in msg


def test_no_tokenizer_files(copy):
    path = copy()
    for fname in TOKENIZER_FILES:
        if os.path.exists(os.path.join(path, fname)):
            os.remove(os.path.join(path, fname))
    msg = _only(check_checkpoint(path))
    assert "expected the Qwen3 tokenizer files" in msg and "found none" in msg and "copy them" in msg
    load_model(path)   # the loader itself does not need a tokenizer


# ------------------------------------------------------------------------------------------------
# serve checks first
# ------------------------------------------------------------------------------------------------

def test_serve_refuses_a_bad_checkpoint_before_vllm(copy, capsys):
    path = copy()
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    assert main(["serve", "--model", path, "--dry-run"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""                          # no command was built
    last = cap.err.strip().splitlines()[-1]
    assert "model.layers.1.self_attn.k_proj.weight" in last and "re-download" in last
    assert "--skip-check" in cap.err and "Traceback" not in cap.err
    assert main(["serve", "--model", path, "--dry-run", "--skip-check"]) == 0


def test_serve_profile_checks_its_checkpoint_when_present(copy, monkeypatch, capsys):
    """--profile: the profile's model_path is checked when it exists on this machine (here a bad
    local copy stands in for it; the deploy tests cover the absent container path)."""
    import ascend_qwen3.deploy.profiles as profiles

    path = copy()
    _rewrite(path, lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1].clone()}))
    real = profiles.to_spec

    def here(p, **kw):
        spec = real(p, **kw)
        spec.model = path
        return spec
    monkeypatch.setattr(profiles, "to_spec", here)
    assert main(["serve", "--profile", "qwen3-8b-bf16", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.norm.weight" in err.strip().splitlines()[-1] and "expected shape [96]" in err


def test_serve_dry_run_of_a_clean_checkpoint(with_tokenizer, capsys):
    path = with_tokenizer("dense_tied")
    assert main(["serve", "--model", path, "--dry-run"]) == 0
    assert path in capsys.readouterr().out
