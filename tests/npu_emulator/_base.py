"""Shared machinery of the torch_npu emulator: errors, the call log, argument checks.

Nothing here knows the project's ops: the emulator is written from the torch_npu / aclnn
documentation only (see each op module for the pages it follows).

Error policy, mirroring how the real bindings fail:
  * a wrong Python kind of argument (a list where a Tensor is needed, a Tensor where an int list
    is needed, an unknown keyword) raises ``TypeError``, like the generated pybind signatures;
  * a documented constraint that is violated (dtype, rank, layout, value range, a missing
    required argument) raises ``NpuEmulatorError`` (a ``RuntimeError``, as the kernels' parameter
    checks do on device), with a message naming the op, the argument, what the doc expects and
    what was found;
  * a documented feature this emulator does not implement raises ``NotImplementedError``, so a
    test never silently passes through an un-emulated code path.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterable, Sequence

import torch

FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_TYPES = (torch.float16, torch.bfloat16)


class NpuEmulatorError(RuntimeError):
    """A call that the real torch_npu kernel documents as invalid."""


def fail(op: str, what: str) -> None:
    raise NpuEmulatorError(f"torch_npu.{op} (emulated): {what}")


def unsupported(op: str, what: str) -> None:
    raise NotImplementedError(f"torch_npu.{op} (emulated): {what} is documented but not emulated")


def dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------

def tensor(op: str, name: str, value: Any, *, dtypes: Sequence[torch.dtype] | None = None,
           dims: Sequence[int] | None = None, optional: bool = False,
           nonempty: bool = False, contiguous: bool = False) -> torch.Tensor | None:
    """Check one Tensor argument (kind, dtype, rank, emptiness, contiguity)."""
    if value is None:
        if optional:
            return None
        fail(op, f"argument '{name}' is required, got None")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"torch_npu.{op}(): argument '{name}' must be Tensor, not "
                        f"{type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        fail(op, f"'{name}' must have dtype {names(dtypes)}, got {dt(value)}")
    if dims is not None and value.dim() not in dims:
        fail(op, f"'{name}' must have {'/'.join(map(str, dims))} dims, got shape "
                 f"{list(value.shape)}")
    if nonempty and value.numel() == 0:
        fail(op, f"'{name}' must not be empty (shape {list(value.shape)})")
    if contiguous and not value.is_contiguous():
        fail(op, f"'{name}' must be contiguous")
    return value


def _sequence_arg(op: str, name: str, value: Any, optional: bool, what: str) -> bool:
    """False for an allowed None; raises for a missing required value or a non-list (a bare
    Tensor included, as the real bindings do); True for a list or tuple to check further."""
    if value is None:
        if optional:
            return False
        fail(op, f"argument '{name}' is required, got None")
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"torch_npu.{op}(): argument '{name}' must be {what}, not "
                        f"{type(value).__name__}")
    return True


def tensor_list(op: str, name: str, value: Any, *, optional: bool = False,
                max_len: int = 128) -> list[torch.Tensor] | None:
    """A ``List[Tensor]`` argument: a bare Tensor is a TypeError, as in the real binding."""
    if not _sequence_arg(op, name, value, optional, "a list of Tensors (List[Tensor])"):
        return None
    if not 1 <= len(value) <= max_len:
        fail(op, f"'{name}' must hold 1..{max_len} tensors, got {len(value)}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"torch_npu.{op}(): element {i} of '{name}' must be Tensor, not "
                            f"{type(t).__name__}")
    return list(value)


def int_list(op: str, name: str, value: Any, *, optional: bool = False) -> list[int] | None:
    """An ``int[]`` / ``SymInt[]`` argument: Python ints only (a Tensor is a TypeError)."""
    if not _sequence_arg(op, name, value, optional, "a list of ints (int[])"):
        return None
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"torch_npu.{op}(): argument '{name}' must hold Python ints, "
                            f"found {type(v).__name__}")
        out.append(int(v))
    return out


def integer(op: str, name: str, value: Any, *, choices: Iterable[int] | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"torch_npu.{op}(): argument '{name}' must be int, not "
                        f"{type(value).__name__}")
    if choices is not None:
        choices = tuple(choices)
        if value not in choices:
            fail(op, f"'{name}' must be one of {list(choices)}, got {value}")
    return int(value)


def real(op: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"torch_npu.{op}(): argument '{name}' must be float, not "
                        f"{type(value).__name__}")
    return float(value)


def boolean(op: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"torch_npu.{op}(): argument '{name}' must be bool, not "
                        f"{type(value).__name__}")
    return value


def must_be_none(op: str, **kwargs: Any) -> None:
    """Arguments the emulator does not implement must be left at None."""
    for name, value in kwargs.items():
        if value is not None:
            unsupported(op, f"argument '{name}'")


def fill_undefined(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Memory the kernel documents as 'not written / undefined': NaN for floats, a sentinel for
    integers, so that any use of it shows up in a comparison."""
    if dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype)
    return torch.full(tuple(shape), torch.iinfo(dtype).min, dtype=dtype)


# --------------------------------------------------------------------------------------------
# call log and op registry
# --------------------------------------------------------------------------------------------

class CallLog:
    """Which emulated torch_npu functions were called, how often, and which calls were rejected.

    ``depth`` is above 0 while an emulated function runs (the PyTorch ops it computes with are
    the emulator's, not the caller's); ``listeners`` are called after every accepted call with
    ``(name, args, kwargs, result)``: the kernel counter and the graph capture listen there."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.calls: list[str] = []
        self.rejected: list[tuple[str, str]] = []
        self.depth = 0
        self.listeners: list[Callable[[str, tuple, dict, Any], None]] = []
        self.raw: dict[str, Callable[..., Any]] = {}      # name -> the function, unlogged
        # set while an ACL-graph task update is open (graphs.py): the call is handed to it
        self.intercept: Callable[[str, Callable, tuple, dict], Any] | None = None

    def count(self, name: str) -> int:
        return self.counts[name]

    def called(self, name: str) -> bool:
        return self.counts[name] > 0

    def names(self) -> set[str]:
        return set(self.counts)

    def reset(self) -> None:
        self.counts.clear()
        self.calls.clear()
        self.rejected.clear()

    def __repr__(self) -> str:
        return f"CallLog({dict(self.counts)})"


OPS: dict[str, Callable[..., Any]] = {}


def op(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register an emulated torch_npu function under its own name."""
    OPS[fn.__name__] = fn
    return fn


def bind(fn: Callable[..., Any], log: CallLog) -> Callable[..., Any]:
    """Wrap an op so that every call is recorded in ``log`` (successes and rejections)."""

    log.raw[fn.__name__] = fn

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if log.intercept is not None and log.depth == 0:
            return log.intercept(fn.__name__, fn, args, kwargs)
        log.depth += 1
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            log.rejected.append((fn.__name__, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            log.depth -= 1
        log.counts[fn.__name__] += 1
        log.calls.append(fn.__name__)
        for listener in list(log.listeners):
            listener(fn.__name__, args, kwargs, out)
        return out

    return call
