"""Run a function in ``tp`` local processes joined by a torch.distributed group (gloo on the CPU,
HCCL on the NPU), each with its ``ParallelContext``. Used by the tests of the parallel layers
and by ``bench/load_memory.py``; inside vLLM the engine's own tensor-parallel group is used
instead."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .context import ParallelContext


def _worker(rank: int, tp: int, ep: bool, init_file: str, out_dir: str, backend: str, threads: int,
            fn: Callable, args: tuple) -> None:
    torch.set_num_threads(threads)
    result: Any
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=tp)
        try:
            result = ("ok", fn(ParallelContext(rank, tp, ep), *args))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported to the parent with the traceback
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_parallel(fn: Callable, tp: int, *args, ep: bool = False, backend: str = "gloo",
                 threads: int | None = None) -> list[Any]:
    """Call ``fn(ctx, *args)`` on ``tp`` ranks; returns every rank's return value (rank order).

    ``fn`` must be importable (a module-level function). With tp == 1 it runs in this process
    without torch.distributed. Any rank's exception is re-raised here with its traceback.
    """
    if tp == 1:
        return [fn(ParallelContext(0, 1, ep), *args)]
    return run_parallel_spawned(fn, tp, *args, ep=ep, backend=backend, threads=threads)


def run_parallel_spawned(fn: Callable, tp: int, *args, ep: bool = False, backend: str = "gloo",
                         threads: int | None = None) -> list[Any]:
    """Like ``run_parallel`` but always in fresh processes, tp == 1 included."""
    threads = threads or max(1, (os.cpu_count() or 1) // tp)
    with tempfile.TemporaryDirectory(prefix="aq3-tp") as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(_worker, args=(tp, ep, init_file, tmp, backend, threads, fn, args),
                           nprocs=tp, join=True, start_method="spawn")
        results = []
        for r in range(tp):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"tensor-parallel worker failed: {value}")
            results.append(value)
    return results
