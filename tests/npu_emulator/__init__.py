"""A test-only torch_npu emulator (tier 2 of the three tiers in the README).

``build()`` returns a fresh fake ``torch_npu`` module whose functions implement, on CPU
tensors, the documented argument names, defaults, layouts, dtypes, output tuples and maths of
the Ascend Extension for PyTorch kernels the NPU backend may use, and reject wrong usage the way
the documentation says the real kernels do. Every function call is recorded in the module's
``call_log`` (a ``CallLog``).

``installed()`` puts such a module into ``sys.modules["torch_npu"]``, (re)imports ``ops.npu``
so that the backend binds to it, yields an ``Emulation`` handle and restores everything after.

The emulator is written from the torch_npu / aclnn documentation only (each module cites its
pages) and imports nothing from the project.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from dataclasses import dataclass
from typing import Iterator

from ._base import OPS, CallLog, NpuEmulatorError, bind
from .attention import OUT_OVERLOADS
from . import attention, formats, gmm, kv_cache, mc2, moe, norm_act, quant  # noqa: F401 (registers ops)
from . import graphs
from .formats import Format

__all__ = ["build", "installed", "emulated_npu", "Emulation", "CallLog", "NpuEmulatorError",
           "Format", "EMULATED_FUNCTIONS"]

EMULATED_FUNCTIONS = tuple(sorted(OPS))


def build() -> types.ModuleType:
    """A fresh emulated ``torch_npu`` module with its own call log."""
    mod = types.ModuleType("torch_npu")
    mod.__doc__ = "Emulated torch_npu (tests/npu_emulator): CPU tensors, documented semantics."
    mod.__version__ = "emulated"
    mod.__file__ = __file__
    mod.IS_NPU_EMULATOR = True
    log = CallLog()
    mod.call_log = log
    mod.Format = Format
    mod.NpuEmulatorError = NpuEmulatorError
    for name, fn in OPS.items():
        setattr(mod, name, bind(fn, log))
    for name, fn in OUT_OVERLOADS.items():      # torch_npu.<op>.out, as the real ops have
        getattr(mod, name).out = bind(fn, log)
    graphs.install(mod, log)                    # torch_npu.npu: graphs, streams, events
    return mod


@dataclass
class Emulation:
    """What ``installed()`` yields: the fake module, its call log and the rebound ops.npu."""

    torch_npu: types.ModuleType
    calls: CallLog
    npu_ops: types.ModuleType


_MISSING = object()


@contextlib.contextmanager
def installed(backend_module: str = "ops.npu") -> Iterator[Emulation]:
    """Install the emulator as ``torch_npu`` and import ``backend_module`` against it.

    Restores ``sys.modules["torch_npu"]``, ``sys.modules[backend_module]`` and the attribute the
    import sets on the parent package, so later code sees exactly what it saw before.
    """
    emu = build()
    saved_tn = sys.modules.get("torch_npu", _MISSING)
    saved_backend = sys.modules.get(backend_module, _MISSING)
    parent_name, _, child = backend_module.rpartition(".")
    parent = sys.modules.get(parent_name) if parent_name else None
    saved_attr = getattr(parent, child, _MISSING) if parent is not None else _MISSING
    sys.modules["torch_npu"] = emu
    sys.modules.pop(backend_module, None)
    try:
        backend = importlib.import_module(backend_module)
        parent = sys.modules.get(parent_name) if parent_name else None
        yield Emulation(torch_npu=emu, calls=emu.call_log, npu_ops=backend)
    finally:
        if saved_tn is _MISSING:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = saved_tn
        if saved_backend is _MISSING:
            sys.modules.pop(backend_module, None)
        else:
            sys.modules[backend_module] = saved_backend
        if parent is not None:
            if saved_attr is _MISSING:
                if hasattr(parent, child):
                    delattr(parent, child)
            else:
                setattr(parent, child, saved_attr)


try:  # a ready-made pytest fixture: ``from tests.npu_emulator import emulated_npu`` in a test
    import pytest as _pytest     # module makes ``emulated_npu`` (an ``Emulation``) available

    @_pytest.fixture
    def emulated_npu() -> Iterator[Emulation]:
        """The emulator installed as torch_npu for one test, with ops.npu bound to it."""
        with installed() as emu:
            yield emu
except ImportError:  # pragma: no cover - the emulator itself does not need pytest
    pass
