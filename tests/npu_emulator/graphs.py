"""ACL graphs (torch.npu's NPUGraph), task groups and external events, emulated:
``torch_npu.npu.*`` of the emulated module.

Sources (Ascend Extension for PyTorch, "context" API pages, and the torch_npu PR that
introduced the task-group API, https://gitee.com/ascend/pytorch/pulls/20264):
torch_npu-npu-NPUGraph.md, torch_npu-npu-graph.md, torch_npu-npu-graph_task_group_begin.md,
torch_npu-npu-graph_task_group_end.md, torch_npu-npu-graph_task_update_begin.md,
torch_npu-npu-graph_task_update_end.md, torch_npu-npu-ExternalEvent.md (record / wait /
reset); CANN runtime aclmdlRICaptureTaskGrpBegin / End ("only single-operator tasks can be
delivered between the two APIs").

What is modelled:

- **Capture.** Inside ``graph(g)`` (or ``g.capture_begin() .. capture_end()``) every kernel
  launched (``kernels.KernelMode``: emulated torch_npu functions and device-launching PyTorch
  operators) is recorded with its arguments: the tensors themselves (their storage is the
  graph's) and the host values (ints, lists) as they were. Kernels also run while capturing
  (the emulator needs their results' shapes to go on); a real capture only records them, so
  what a capture run computes must not matter, as on hardware.
- **Replay.** ``g.replay()`` re-executes the recorded kernels in order with their recorded
  arguments, writing each result into the tensor the capture produced: no Python of the model
  runs, so a value the host computed during capture (a length, a slice) is replayed as it was.
- **External events.** ``event.wait(stream)`` / ``event.reset(stream)`` during capture are
  recorded as graph nodes. At replay a wait on an event nobody has recorded yet pauses the
  graph (the device would block); ``event.record(stream)`` from the host (another stream) sets
  it and lets a paused replay run on, to the next unrecorded wait or to its end; a wait
  consumes the record (the page: the wait resets the event). Synchronising while a replay is
  paused is an error: on hardware that step would never finish.
- **Task groups and updates.** ``graph_task_group_begin(stream)`` .. ``graph_task_group_end(
  stream)`` during capture mark the single kernel between them and return its handle.
  ``graph_task_update_begin(stream, handle)`` .. ``graph_task_update_end(stream)`` on a stream
  other than the capture's: the one kernel issued between them is not run; it replaces the
  arguments of the recorded kernel (same function, or an error), which a paused or later
  replay then runs with.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ._base import NpuEmulatorError
from .kernels import KernelMode


def _fail(what: str) -> None:
    raise NpuEmulatorError(f"torch_npu.npu (emulated graphs): {what}")


class Stream:
    """An NPU stream (identity only: the emulator runs everything in order)."""

    _next = 0

    def __init__(self, device=None, priority: int = 0):
        Stream._next += 1
        self.id = Stream._next

    def synchronize(self) -> None:
        _STATE.synchronize()

    def __repr__(self) -> str:
        return f"<emulated npu stream {self.id}>"


@dataclass
class _Task:
    kind: str                   # "kernel" | "wait" | "reset"
    name: str = ""
    fn: object = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    result: object = None
    event: "ExternalEvent | None" = None
    layer: str = ""             # the decoder layer that launched it (kernels.attach)


def _write_back(recorded, fresh) -> None:
    """Put a re-run kernel's result into the tensors its capture produced."""
    if isinstance(recorded, torch.Tensor) and isinstance(fresh, torch.Tensor):
        if recorded.data_ptr() != fresh.data_ptr() or recorded.stride() != fresh.stride():
            recorded.copy_(fresh)
    elif isinstance(recorded, (tuple, list)) and isinstance(fresh, (tuple, list)):
        for r, f in zip(recorded, fresh):
            _write_back(r, f)


class TaskGroupHandle:
    def __init__(self, graph: "NPUGraph", index: int):
        self.graph, self.index = graph, index


class ExternalEvent:
    def __init__(self):
        self.recorded = False

    def record(self, stream=None) -> None:
        if _STATE.capturing is not None:
            _fail("ExternalEvent.record inside a capture is not emulated (vllm-ascend records "
                  "from the update stream, outside the graph)")
        self.recorded = True
        _STATE.resume(self)

    def wait(self, stream=None) -> None:
        if _STATE.capturing is None:
            _fail("ExternalEvent.wait outside a capture is not emulated")
        _STATE.capturing.tasks.append(_Task("wait", event=self))

    def reset(self, stream=None) -> None:
        if _STATE.capturing is not None:
            _STATE.capturing.tasks.append(_Task("reset", event=self))
        else:
            self.recorded = False


class NPUGraph:
    def __init__(self):
        self.tasks: list[_Task] = []
        self.paused_at: int | None = None
        self.captured = False
        self.replays = 0

    # --- capture ---------------------------------------------------------------------------------

    def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
        if _STATE.capturing is not None:
            _fail("a capture is already running")
        if self.captured:
            _fail("this graph is captured already (reset() it first)")
        _STATE.capturing = self
        _STATE.recorder = _Recorder(self, _STATE.log)
        _STATE.recorder.__enter__()

    def capture_end(self) -> None:
        if _STATE.capturing is not self:
            _fail("capture_end without capture_begin on this graph")
        if _STATE.group_start is not None:
            _fail("graph_task_group_begin without graph_task_group_end in the capture")
        _STATE.recorder.__exit__(None, None, None)
        _STATE.capturing = _STATE.recorder = None
        self.captured = True

    def reset(self) -> None:
        self.tasks, self.paused_at, self.captured = [], None, False

    # --- replay ----------------------------------------------------------------------------------

    def replay(self) -> None:
        if not self.captured:
            _fail("replay of a graph that was not captured")
        if self.paused_at is not None:
            _fail("replay while the previous replay is still waiting for an event")
        self.replays += 1
        self._run(0)

    def _run(self, start: int) -> None:
        for i in range(start, len(self.tasks)):
            t = self.tasks[i]
            if t.kind == "wait":
                if not t.event.recorded:
                    self.paused_at = i
                    _STATE.waiting[id(t.event)] = self
                    return
                t.event.recorded = False            # the wait consumes the record
            elif t.kind == "reset":
                t.event.recorded = False
            else:
                _write_back(t.result, t.fn(*t.args, **t.kwargs))
        self.paused_at = None

    def resume(self) -> None:
        i, self.paused_at = self.paused_at, None
        self._run(i)

    def kernels(self) -> list[_Task]:
        return [t for t in self.tasks if t.kind == "kernel"]

    def recorder(self):
        """The mode recording this graph's capture (to attribute kernels to layers)."""
        return _STATE.recorder


class _Recorder(KernelMode):
    """Records every kernel launched during a capture as a task of the graph."""

    def __init__(self, graph: NPUGraph, call_log):
        super().__init__(call_log)
        self.graph = graph

    def launched(self, name, fn, args, kwargs, result) -> None:
        self.graph.tasks.append(_Task("kernel", name, fn, tuple(args), dict(kwargs), result,
                                      layer=self.layer))


class _State:
    def __init__(self):
        self.log = None
        self.capturing: NPUGraph | None = None
        self.recorder: _Recorder | None = None
        self.group_start: int | None = None
        self.updating: TaskGroupHandle | None = None
        self.update_calls = 0
        self.waiting: dict[int, NPUGraph] = {}
        self.stream_stack: list[Stream] = []
        self.default_stream = Stream()

    def resume(self, event: ExternalEvent) -> None:
        graph = self.waiting.pop(id(event), None)
        if graph is not None:
            graph.resume()

    def synchronize(self) -> None:
        if self.waiting:
            _fail(f"synchronize while {len(self.waiting)} replay(s) wait for an ExternalEvent "
                  f"nobody records: on hardware the step would never finish")

    def intercept(self, name, fn, args, kwargs):
        """While a task update is open: the kernel is not run, it re-parameterises the group's
        recorded kernel; returns that kernel's recorded result."""
        task = self.updating.graph.tasks[self.updating.index]
        if f"torch_npu.{name}" != task.name:
            _fail(f"graph_task_update: the captured task is {task.name}, the update issued "
                  f"torch_npu.{name} (an update must issue the same operator)")
        self.update_calls += 1
        if self.update_calls > 1:
            _fail("graph_task_update: more than one operator issued between update_begin and "
                  "update_end (the group holds one)")
        task.args, task.kwargs = tuple(args), dict(kwargs)
        return task.result


_STATE = _State()


def install(module, call_log) -> None:
    """Give the emulated torch_npu module its ``npu`` namespace (what ``torch.npu`` is on a
    real install) and route the call log's updates through the graph state."""
    global _STATE
    _STATE = _State()
    _STATE.log = call_log
    npu = type(module)("torch_npu.npu")
    npu.Stream, npu.NPUGraph, npu.ExternalEvent = Stream, NPUGraph, ExternalEvent
    npu.current_stream = lambda device=None: (_STATE.stream_stack[-1] if _STATE.stream_stack
                                              else _STATE.default_stream)
    npu.synchronize = lambda device=None: _STATE.synchronize()
    npu.graph = _graph
    npu.stream = _stream
    npu.graph_task_group_begin = _group_begin
    npu.graph_task_group_end = _group_end
    npu.graph_task_update_begin = _update_begin
    npu.graph_task_update_end = _update_end
    npu.state = _STATE
    module.npu = npu


@contextlib.contextmanager
def _graph(graph: NPUGraph, pool=None, stream=None, capture_error_mode: str = "global"):
    graph.capture_begin(pool=pool)
    try:
        yield graph
    finally:
        graph.capture_end()


@contextlib.contextmanager
def _stream(stream: Stream):
    _STATE.stream_stack.append(stream)
    try:
        yield stream
    finally:
        _STATE.stream_stack.pop()


def _group_begin(stream) -> None:
    if _STATE.capturing is None:
        _fail("graph_task_group_begin outside a capture (its stream must be capturing)")
    if _STATE.group_start is not None:
        _fail("graph_task_group_begin inside an open task group")
    _STATE.group_start = len(_STATE.capturing.tasks)


def _group_end(stream) -> TaskGroupHandle:
    g = _STATE.capturing
    if g is None or _STATE.group_start is None:
        _fail("graph_task_group_end without graph_task_group_begin in a capture")
    inside = g.tasks[_STATE.group_start:]
    _STATE.group_start = None
    if len(inside) != 1 or inside[0].kind != "kernel":
        _fail(f"a task group holds exactly one operator (CANN: only single-operator tasks "
              f"between the two calls), got {[t.name or t.kind for t in inside]}")
    return TaskGroupHandle(g, len(g.tasks) - 1)


def _update_begin(stream, handle: TaskGroupHandle) -> None:
    if _STATE.capturing is not None:
        _fail("graph_task_update_begin during a capture (updates run on another stream, after it)")
    if not isinstance(handle, TaskGroupHandle):
        raise TypeError("graph_task_update_begin(): handle must come from graph_task_group_end")
    if _STATE.updating is not None:
        _fail("graph_task_update_begin inside an open update")
    _STATE.updating, _STATE.update_calls = handle, 0
    _STATE.log.intercept = _STATE.intercept


def _update_end(stream) -> None:
    if _STATE.updating is None:
        _fail("graph_task_update_end without graph_task_update_begin")
    if _STATE.update_calls != 1:
        _fail("graph_task_update_end: the update issued no operator (one is expected)")
    _STATE.updating = None
    _STATE.log.intercept = None
