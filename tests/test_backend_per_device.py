"""The ops backend follows the tensors' device, also on a host where torch_npu imports.

An Atlas host (and the vllm-ascend image) has torch_npu and NPUs. ``run --device cpu`` builds the
model on the CPU there, and the quantizer always runs an fp32 CPU graph: both must run ``ops.cpu``.
(Before, the backend was chosen once per process, ``npu`` as soon as torch_npu imported and an
NPU was visible, so both would have sent CPU tensors to torch_npu kernels.) Here that host is
imitated: the torch_npu emulator (tests/npu_emulator) is installed as ``torch_npu`` and
``torch.npu`` reports one visible device; every torch_npu call lands in the emulator's call log,
which must stay empty.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import types

import pytest
import torch

import ops
from ascend_qwen3.cli import main
from tests import npu_emulator
from tests.checkpoints import add_tokenizer


@contextlib.contextmanager
def atlas_host(monkeypatch):
    """torch_npu importable (the emulator) and torch.npu reporting one visible NPU."""
    with npu_emulator.installed() as emu:
        fake = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1)
        monkeypatch.setattr(torch, "npu", fake, raising=False)
        monkeypatch.delenv(ops.ENV_VAR, raising=False)
        yield emu


def test_backend_for_each_device(monkeypatch):
    with atlas_host(monkeypatch) as emu:
        assert ops.backend_for("cpu").NAME == "cpu" and ops.backend_for(None).NAME == "cpu"
        assert ops.backend_for("npu") is emu.npu_ops           # the emulated torch_npu backend
        assert ops.backend_for("npu:3").NAME == "npu"
        x = torch.randn(4, 8)
        ops.rms_norm(x, torch.ones(8), 1e-6)                    # dispatches on x's device: cpu
        monkeypatch.setenv(ops.ENV_VAR, "npu")                  # forcing still works
        assert ops.backend_for("cpu") is emu.npu_ops
        assert emu.calls.calls == []


def test_forcing_a_bad_backend_is_refused(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="not a backend"):
        ops.backend_for("cpu")


def test_bind_rejects_unknown_ops():
    with pytest.raises(ValueError, match="not an op"):
        ops.bind("cpu", "flash_attention")


def test_run_on_the_cpu_of_an_atlas_host(checkpoint, monkeypatch, capsys):
    path = checkpoint("dense_tied")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        add_tokenizer(path, 384)
    with atlas_host(monkeypatch) as emu:
        rc = main(["run", "--model", path, "--prompt", "Hello", "--max-new-tokens", "4",
                   "--device", "cpu"])
        assert emu.calls.calls == [], "torch_npu kernels called for a CPU run"
    assert rc == 0
    assert "cpu, backend cpu" in capsys.readouterr().err


def test_run_refuses_npu_without_one(checkpoint, capsys):
    """(on this machine no NPU is visible)"""
    path = checkpoint("dense_tied")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        add_tokenizer(path, 384)
    assert main(["run", "--model", path, "--prompt", "Hello", "--device", "npu"]) == 2
    assert "no NPU is visible" in capsys.readouterr().err


def test_quantize_on_an_atlas_host(checkpoint, tmp_path, monkeypatch):
    """The quantizer's fp32 CPU graph runs ops.cpu with torch_npu present, and writes exactly
    what it writes on a machine without torch_npu."""
    from ascend_qwen3.quantizer import quantize_checkpoint

    src = checkpoint("moe_norm")
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        add_tokenizer(src, 288)
    plain = tmp_path / "plain"
    quantize_checkpoint(src, str(plain), "w8a8", progress=False)
    with atlas_host(monkeypatch) as emu:
        on_atlas = tmp_path / "atlas"
        quantize_checkpoint(src, str(on_atlas), "w8a8", progress=False)
        assert emu.calls.calls == [], "torch_npu kernels called by the CPU quantizer"
    names = sorted(os.listdir(plain))
    assert names == sorted(os.listdir(on_atlas)) and "quant_model_description.json" in names
    match, mismatch, errors = filecmp.cmpfiles(plain, on_atlas, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
