"""Run a function in ``tp`` (x ``dp``) local processes joined by a torch.distributed group (gloo on the CPU,
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


def _context(rank: int, tp: int, dp: int, ep: bool) -> ParallelContext:
    """This rank's context in a world of dp x tp ranks (rank = dp_rank x tp + tp_rank, as vLLM
    orders them): its tensor-parallel group, and with dp > 1 its data-parallel group. Every
    rank creates every group, in the same order (torch.distributed.new_group requires it)."""
    if dp == 1:
        return ParallelContext(rank, tp, ep)
    tp_groups = [dist.new_group(list(range(d * tp, (d + 1) * tp))) for d in range(dp)]
    dp_groups = [dist.new_group(list(range(t, dp * tp, tp))) for t in range(tp)]
    d, t = divmod(rank, tp)
    return ParallelContext(t, tp, ep, group=tp_groups[d], dp_rank=d, dp_size=dp,
                           dp_group=dp_groups[t], ep_group=None)


def _worker(rank: int, tp: int, ep: bool, init_file: str, out_dir: str, backend: str, threads: int,
            fn: Callable, args: tuple, dp: int = 1) -> None:
    torch.set_num_threads(threads)
    result: Any
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=tp * dp)
        try:
            result = ("ok", fn(_context(rank, tp, dp, ep), *args))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported to the parent with the traceback
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_parallel(fn: Callable, tp: int, *args, ep: bool = False, backend: str = "gloo",
                 threads: int | None = None, dp: int = 1) -> list[Any]:
    """Call ``fn(ctx, *args)`` on ``dp x tp`` ranks; returns every rank's return value (rank
    order: data-parallel rank major).

    ``fn`` must be importable (a module-level function). With one rank it runs in this process
    without torch.distributed. Any rank's exception is re-raised here with its traceback.
    """
    if tp * dp == 1:
        return [fn(ParallelContext(0, 1, ep), *args)]
    return run_parallel_spawned(fn, tp, *args, ep=ep, backend=backend, threads=threads, dp=dp)


def run_parallel_spawned(fn: Callable, tp: int, *args, ep: bool = False, backend: str = "gloo",
                         threads: int | None = None, dp: int = 1) -> list[Any]:
    """Like ``run_parallel`` but always in fresh processes, a single rank included."""
    world = tp * dp
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory(prefix="aq3-tp") as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(_worker, args=(tp, ep, init_file, tmp, backend, threads, fn, args, dp),
                           nprocs=world, join=True, start_method="spawn")
        results = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"tensor-parallel worker failed: {value}")
            results.append(value)
    return results
