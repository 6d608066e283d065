"""vllm-ascend's own AscendC LoRA kernels, emulated: ``torch.ops._C_ascend.bgmv_shrink`` and
``torch.ops._C_ascend.bgmv_expand`` on CPU tensors.

These are not torch_npu kernels: vllm-ascend builds them (``csrc/kernels/bgmv_shrink.cpp``,
``csrc/kernels/bgmv_expand.cpp``) and binds them into the ``_C_ascend`` library
(``csrc/torch_binding.cpp``, v0.23.0), and its punica wrapper calls them
(``vllm_ascend/lora/lora_ops.py``). Everything below cites those files at tag v0.23.0
(https://github.com/vllm-project/vllm-ascend); the schemas are the binding's, verbatim.

Which kernels: the bgmv pair only. They take one LoRA slot per token (``indices`` [T]), so
they serve decode and prefill alike, which is what ``ops.lora_shrink`` / ``ops.lora_expand``
pass. The sgmv pair (``sgmv_shrink`` / ``sgmv_expand``) takes one slot per request plus the
requests' lengths, a form the ops' interface does not carry; vllm-ascend uses it for prefill
only to pass less index data (``vllm_ascend/lora/punica_npu.py`` ``_shrink_prefill``).

What is checked, and how it fails:

- the binding's ``TORCH_CHECK``s (torch_binding.cpp:426-434 for bgmv_shrink, 466-476 for
  bgmv_expand) raise ``NpuEmulatorError`` (a RuntimeError, as TORCH_CHECK raises) with the
  binding's own message;
- what the binding does not check but the kernel relies on (the dtype of each pointer, the
  index dtype, the weight's shape the kernel computes its offsets from, the ranks bgmv_expand
  has code for, the 32-byte lengths of its plain ``DataCopy`` moves, each index below the slot
  count, contiguous rows) is refused too, with "not checked by the kernel" in the message: on
  the device such a call reads or writes the wrong memory and returns garbage silently.

Maths, following the kernels: inputs cast to float32, products summed in float32;
bgmv_shrink multiplies by ``scale`` and writes float32 (``Y_T = float``); bgmv_expand adds the
16-bit ``y`` (cast to float32) and rounds to y's dtype (``CAST_RINT``: to nearest, ties to even).
Rows whose index is negative are skipped by both (left as they were: not zeroed).

``installed(calls)`` registers the two ops (CPU implementations) for the duration of a block and
removes them after; each accepted call is counted in ``calls`` (the torch_npu emulator's
``CallLog``) as ``_C_ascend.<name>``, each rejected one in ``calls.rejected``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ._base import CallLog, NpuEmulatorError, dt

NAMESPACE = "_C_ascend"

# csrc/torch_binding.cpp:2294, 2297-2299 (v0.23.0)
SCHEMAS = {
    "bgmv_shrink": "bgmv_shrink(Tensor! x, Tensor! weight, Tensor! indices, Tensor! y, float scale) -> ()",
    "bgmv_expand": ("bgmv_expand(Tensor! x, Tensor! weight, Tensor! indices, Tensor! y,"
                    "            int slice_offset, int slice_size) -> Tensor"),
}

KERNEL_DTYPES = (torch.float16, torch.bfloat16)     # "only support half and bf16"
EXPAND_RANKS = (8, 16, 32, 64)                      # bgmv_expand.cpp:27-31, 252-280
DATACOPY_BYTES = 32   # a plain AscendC DataCopy moves whole 32-byte blocks (DataCopyPad otherwise)


def _fail(op: str, what: str) -> None:
    raise NpuEmulatorError(f"torch.ops._C_ascend.{op} (emulated): {what}")


def _check(ok: bool, op: str, message: str) -> None:
    """A TORCH_CHECK of the binding: its own message."""
    if not ok:
        _fail(op, message)


def _unchecked(ok: bool, op: str, what: str, where: str) -> None:
    """A contract the kernel relies on without checking it."""
    if not ok:
        _fail(op, f"{what} (not checked by the kernel: on the device the call computes garbage "
                  f"or touches memory out of bounds; {where})")


def _aligned(op: str, name: str, count: int, dtype: torch.dtype, where: str) -> None:
    size = torch.empty((), dtype=dtype).element_size()
    _unchecked(count * size % DATACOPY_BYTES == 0, op,
               f"{name} = {count} {dt(torch.empty((), dtype=dtype))} elements is not a whole number "
               f"of {DATACOPY_BYTES}-byte blocks, which its DataCopy moves", where)


def _binding(op: str, x, weight, indices, y) -> None:
    """The TORCH_CHECKs both bindings make (torch_binding.cpp:428-433 / 468-473)."""
    _check(x.dim() == 2, op, "x should be [batch_size, hidden_in]")
    _check(weight.dim() in (3, 4), op, "weight should be [num_loras, hidden_out, hidden_in] or "
                                       "[num_loras, 1, hidden_out, hidden_in]")
    _check(y.dim() == 2, op, "y should be [batch_size, hidden_out]")
    _check(indices.dim() == 1, op, "indices should be [batch_size]")
    _check(x.size(0) == y.size(0) and x.size(0) == indices.size(0), op,
           "the first dimension of x, y, indices should be same")


def _kernel(op: str, x, weight, indices, y) -> torch.Tensor:
    """What both kernels rely on unchecked: int64 indices, contiguous rows, indices below the
    slot count; returns the weight as [S, rows, cols]."""
    # GlobalTensor<int64_t> indicesGm_ (bgmv_shrink.cpp:47, bgmv_expand.cpp:73)
    _unchecked(indices.dtype == torch.int64, op, f"indices must be int64, got {dt(indices)}",
               "the kernel reads them as int64_t")
    if weight.dim() == 4:
        _unchecked(weight.size(1) == 1, op, f"a 4-d weight must be [num_loras, 1, ., .], got "
                   f"{list(weight.shape)}", "the kernel skips no second dimension")
        weight = weight[:, 0]
    for name, t in (("x", x), ("weight", weight), ("indices", indices), ("y", y)):
        _unchecked(t.is_contiguous(), op, f"{name} must be contiguous",
                   "the kernel addresses rows by pointer arithmetic")
    bad = indices >= weight.size(0)     # the emulator may look: a real kernel reads blindly
    _unchecked(not bool(bad.any()), op, f"indices {sorted(set(indices[bad].tolist()))} are not "
               f"below num_loras = {weight.size(0)}", "the weight offset is index * one slot")
    return weight


def bgmv_shrink(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, y: torch.Tensor,
                scale: float) -> None:
    """y[t] = scale * weight[indices[t]] @ x[t] (float32), for indices[t] >= 0; other rows of y
    untouched. x [T, K] fp16/bf16; weight [S, R, K] (or [S, 1, R, K]) in x's dtype; indices [T]
    int64; y [T, R] float32 with R < K (bgmv_shrink.cpp; torch_binding.cpp:424-462)."""
    op = "bgmv_shrink"
    _check(x.dtype in KERNEL_DTYPES, op, "only support half and bf16")
    _binding(op, x, weight, indices, y)
    _check(x.size(1) > y.size(1), op, "hidden in should be greater than hidden out")
    w = _kernel(op, x, weight, indices, y)
    K, R = x.size(1), y.size(1)
    # X_T = W_T = scalar_t, Y_T = float (bgmv_shrink.cpp:23-25)
    _unchecked(weight.dtype == x.dtype, op, f"weight must be {dt(x)} like x, got {dt(weight)}",
               "bgmv_shrink.cpp:24 reads it as x's type")
    _unchecked(y.dtype == torch.float32, op, f"y must be float32, got {dt(y)}",
               "bgmv_shrink.cpp:25 writes float")
    # one slot is inputHiddenDim * maxLoRARank elements, maxLoRARank = y.size(1) (:41, :72, :129)
    _unchecked(tuple(w.shape[1:]) == (R, K), op, f"weight must be [num_loras, {R}, {K}] for x "
               f"[T, {K}] and y [T, {R}], got {list(weight.shape)}",
               "bgmv_shrink.cpp:41 computes the slot offset from y's and x's widths")
    _aligned(op, "hidden_in", K, x.dtype, "bgmv_shrink.cpp:122, 129 (x and weight rows)")
    _aligned(op, "the rank (y's width)", R, torch.float32, "bgmv_shrink.cpp:191 (y rows)")
    live = indices >= 0                 # rows with a negative index: skipped (:69-71)
    if bool(live.any()):
        idx = indices[live]
        acc = torch.einsum("tk,trk->tr", x[live].float(), w[idx].float())   # Cast + Mul + ReduceSum
        y[live] = acc * float(scale)                                       # Muls (:182)


def bgmv_expand(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, y: torch.Tensor,
                slice_offset: int, slice_size: int) -> torch.Tensor:
    """y[t, off:off+n] = rint(y[t, off:off+n] + weight[indices[t]] @ x[t]) in float32, for
    indices[t] >= 0; returns y itself (``y_out = y``). x [T, R] float32, R in {8, 16, 32, 64};
    weight [S, n, R] (or [S, 1, n, R]) in y's dtype; indices [T] int64; y [T, N] fp16/bf16
    (bgmv_expand.cpp; torch_binding.cpp:464-508)."""
    op = "bgmv_expand"
    _check(y.dtype in KERNEL_DTYPES, op, "only support half and bf16")
    _binding(op, x, weight, indices, y)
    _check(x.size(1) <= slice_size, op, "hidden in should be smaller than hidden out")
    _check(slice_offset >= 0, op, "slice offset should be no smaller than 0")
    _check(slice_size + slice_offset <= y.size(1), op,
           "slice_size + slice_offset should be smaller than the second dimension of y")
    w = _kernel(op, x, weight, indices, y)
    R, n = x.size(1), slice_size
    # X_T = float, W_T = Y_T = scalar_t (bgmv_expand.cpp:23-25)
    _unchecked(x.dtype == torch.float32, op, f"x must be float32, got {dt(x)}",
               "bgmv_expand.cpp:23 reads float")
    _unchecked(weight.dtype == y.dtype, op, f"weight must be {dt(y)} like y, got {dt(weight)}",
               "bgmv_expand.cpp:24 reads it as y's type")
    _unchecked(R in EXPAND_RANKS, op, f"the rank (x's width) must be one of {list(EXPAND_RANKS)}, "
               f"got {R}", "bgmv_expand.cpp:252-280 compute nothing for other ranks")
    # one slot is maxLoRARank * outputHiddenDim elements, outputHiddenDim = slice_size (:67, :108)
    _unchecked(tuple(w.shape[1:]) == (n, R), op, f"weight must be [num_loras, {n}, {R}] for "
               f"slice_size {n} and x [T, {R}], got {list(weight.shape)}",
               "bgmv_expand.cpp:67 computes the slot offset from slice_size and x's width")
    _aligned(op, "slice_size", n, y.dtype, "bgmv_expand.cpp:205, 286 (y tiles)")
    live = indices >= 0                 # rows with a negative index: skipped (:105-107)
    if bool(live.any()):
        idx = indices[live]
        acc = torch.einsum("tr,tnr->tn", x[live], w[idx].float())          # Cast, Mul, reduce sums
        cols = y[:, slice_offset:slice_offset + n]
        cols[live] = (cols[live].float() + acc).to(y.dtype)               # Add, Cast CAST_RINT (:221-229)
    return y


IMPLS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand}


def _counted(name: str, fn, calls: CallLog | None):
    def call(*args, **kwargs):
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            if calls is not None:
                calls.rejected.append((f"{NAMESPACE}.{name}", f"{type(exc).__name__}: {exc}"))
            raise
        if calls is not None:
            calls.counts[f"{NAMESPACE}.{name}"] += 1
            calls.calls.append(f"{NAMESPACE}.{name}")
        return out
    call.__name__ = name
    return call


def present() -> bool:
    """Does ``torch.ops._C_ascend`` already have a bgmv kernel (the real vllm-ascend's, or an
    emulation left installed)?"""
    try:
        getattr(getattr(torch.ops, NAMESPACE), "bgmv_shrink")
        return True
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def installed(calls: CallLog | None = None) -> Iterator[None]:
    """``torch.ops._C_ascend.bgmv_shrink`` / ``bgmv_expand`` (this module's implementations, for
    CPU tensors) while the block runs; removed after. Refuses to shadow a real vllm-ascend."""
    if present():
        raise RuntimeError("torch.ops._C_ascend.bgmv_shrink exists already (vllm-ascend is installed, "
                           "or an emulation is still installed): the emulation would shadow it")
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    try:
        for name, schema in SCHEMAS.items():
            lib.define(schema)
            lib.impl(name, _counted(name, IMPLS[name], calls), "CPU")
        yield
    finally:
        lib._destroy()
