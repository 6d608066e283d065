"""Faults on the live server (``ascend-qwen3 serve`` on vLLM's CPU build): what happens when a
tensor-parallel worker dies, when the server is told to stop with requests in flight, when it is
started again, and when a client goes away while its prompt is still being prefilled.

Every wait has a deadline, every server runs in a session of its own (``start_new_session``) and
its process group is killed in a ``finally``: a fault that makes vLLM hang fails a test, it never
hangs the suite. Each test prints what it measured (run with ``-s`` to see it).

The servers are started through the CLI module with the venv's python (``python -m
ascend_qwen3.cli serve``): the process started here is the launcher, which runs vLLM's API server
as its child and supervises it (``ascend_qwen3.deploy.launcher.supervise``).

What vLLM 0.32 does by itself, and what the launcher adds (measured here; docs/loadtest.md has
the figures):

- a TP worker killed (SIGKILL): the engine core notices at once, the API server's watchdog
  (every 5 s, ``vllm/entrypoints/launchers/launcher.py``) stops uvicorn, and the process exits
  within seconds, leaving no process behind; in-flight streams end with an ``error`` event and
  ``[DONE]``. But vLLM's exit code is 0 (``run_server`` simply returns), which a process manager
  that restarts on failure takes for a clean stop: the launcher, not having been signalled,
  exits 1 instead.
- SIGTERM: with vLLM's default ``--shutdown-timeout 0`` the engine is killed at once and the
  in-flight requests are cut; sometimes the API server then waits for their connections forever
  (uvicorn's "Waiting for connections to close", the streams never finish). With
  ``--shutdown-timeout N`` the engine drains: in-flight requests run to completion (up to N
  seconds), then the process exits 0. The launcher passes ``--shutdown-timeout
  SHUTDOWN_TIMEOUT_S`` and forwards SIGTERM to the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil      # a dependency of vLLM itself
import pytest

from ascend_qwen3.deploy.launcher import SHUTDOWN_TIMEOUT_S
from ascend_qwen3.loadtest import (RUNNING, WAITING, RequestResult, parse_metrics, request_body,
                                   stream_chat)
from tests.vllm_support import ROOT, require_vllm


MODEL = "qwen3-tiny"
PROMPT_TOKENS, GENERATED = "vllm:prompt_tokens_total", "vllm:generation_tokens_total"
# the drain window the launcher gives vLLM (``--shutdown-timeout``): far longer than the
# in-flight requests of the SIGTERM test need (3 x 64 tokens: a few seconds here)
DRAIN_S = SHUTDOWN_TIMEOUT_S
SERVE_ARGS = "-- --max-model-len 1024 --enforce-eager --max-num-batched-tokens 64"


# --- servers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    port: int
    home: Path
    log: Path
    root: str
    startup_s: float
    children: list = field(default_factory=list)   # psutil.Process of each descendant at start
    launched: float = 0.0                           # time.perf_counter() when it was started

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_server(work: Path, args: str = "", *, via: str = "make", port: int | None = None,
                 home: Path | None = None, timeout_s: float = 600) -> Served:
    """Start the server on the embedded default model (built under ``home``, default
    ``work/home``) and wait for ``/health``. ``via="make"``: ``make -s serve`` as a user would
    (``args`` is SERVE_ARGS); ``via="cli"``: ``python -m ascend_qwen3.cli serve`` (``args``
    after ``serve``), whose process is the API server itself."""
    return wait_ready(launch_server(work, args, via=via, port=port, home=home), timeout_s)


def launch_server(work: Path, args: str = "", *, via: str = "make", port: int | None = None,
                  home: Path | None = None) -> Served:
    """``start_server`` without the wait: the process is started, ``wait_ready`` waits for it."""
    require_vllm()
    work.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    home = home or work / "home"
    env = dict(os.environ, ASCEND_QWEN3_HOME=str(home), PYTHONPATH=ROOT, VLLM_CPU_KVCACHE_SPACE="1")
    if via == "make":
        venv = os.path.dirname(os.path.dirname(sys.executable))
        cmd = ["make", "-s", "serve", f"VENV={venv}", f"PORT={port}", f"SERVE_ARGS={args}"]
    else:
        cmd = [sys.executable, "-m", "ascend_qwen3.cli", "serve", "--port", str(port),
               *shlex.split(args)]
    log = work / f"server-{port}-{int(time.time() * 1000)}.log"
    launched = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Served(proc=proc, url=f"http://127.0.0.1:{port}", port=port, home=home, log=log,
                  root=ROOT, startup_s=0.0, launched=launched)


def wait_ready(srv: Served, timeout_s: float = 600) -> Served:
    """Wait for a launched server's ``/health`` (its start is then ``startup_s``, its processes
    ``children``); kill it if it exits or takes longer than ``timeout_s`` from its launch."""
    t0, proc = srv.launched, srv.proc
    try:
        while http_status(srv.url + "/health") != 200:
            if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                raise AssertionError(f"the server did not come up (exit {proc.poll()}, "
                                     f"{time.perf_counter() - t0:.0f} s); log {srv.log}:\n"
                                     f"{srv.log_tail()}")
            time.sleep(0.5)
    except BaseException:
        kill_group(proc)
        raise
    srv.startup_s = time.perf_counter() - t0
    srv.children = descendants(proc.pid)
    return srv


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)          # the session started for it: its pgid is its pid
    except (ProcessLookupError, PermissionError):
        pass


def stop_server(srv: Served | None, grace_s: float = 30) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``grace_s``; then make sure no
    process it started is left (killing stragglers by pid)."""
    if srv is None:
        return
    kill_group(srv.proc, signal.SIGTERM)
    try:
        srv.proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    kill_group(srv.proc, signal.SIGKILL)
    try:
        srv.proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    for p in alive(srv.children):
        try:
            p.kill()
        except psutil.Error:
            pass


def descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs) -> list:
    """Those of ``procs`` still running (a zombie has exited: it only waits to be reaped)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs, timeout_s: float) -> tuple[list, float]:
    """Wait up to ``timeout_s`` for ``procs`` to exit; (still running, seconds waited)."""
    t0 = time.perf_counter()
    while alive(procs) and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.2)
    return alive(procs), time.perf_counter() - t0


def title(p) -> str:
    """A process's title (vLLM sets e.g. ``VLLM::Worker_TP1``) or command line."""
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "?"


def wait_exit(proc: subprocess.Popen, timeout_s: float) -> tuple[int | None, float]:
    """(exit code or None if still running after ``timeout_s``, seconds waited)."""
    t0 = time.perf_counter()
    try:
        rc = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
    return rc, time.perf_counter() - t0


def http_status(url: str, timeout: float = 3) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")[:500]}
    except OSError as e:                  # refused, reset, timed out: no status at all
        return None, {"error": f"{e.__class__.__name__}: {e}"}


def metrics(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode(), names=(RUNNING, WAITING, PROMPT_TOKENS, GENERATED))


def wait_idle(url: str, timeout_s: float) -> tuple[bool, float, dict]:
    """Wait for 0 running and 0 waiting requests on /metrics; (reached, seconds, last values)."""
    t0 = time.perf_counter()
    while True:
        m = metrics(url)
        if m.get(RUNNING) == 0 and m.get(WAITING) == 0:
            return True, time.perf_counter() - t0, m
        if time.perf_counter() - t0 > timeout_s:
            return False, time.perf_counter() - t0, m
        time.sleep(0.05)


def chat_ok(url: str, max_tokens: int = 4) -> dict:
    status, out = post_json(url + "/v1/chat/completions", {
        "model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hello"}],
        "chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True})
    assert status == 200, (status, out)
    assert out["usage"]["completion_tokens"] == max_tokens and out["choices"][0]["message"]["content"]
    return out


class Streams:
    """``n`` streaming chat requests run by the load-test client in a thread of their own,
    all like the load test's request ``body_index`` (1: thinking off, so the text is content)."""

    def __init__(self, url: str, n: int, max_tokens: int, body_index: int = 1):
        import httpx

        self.results: list[RequestResult] = []
        self.error: BaseException | None = None

        async def go():
            async with httpx.AsyncClient(timeout=300) as client:
                jobs = []
                for i in range(n):
                    mode, body = request_body(body_index, MODEL, max_tokens, 8)
                    body["ignore_eos"] = True  # run to max_tokens: the trained model stops sooner
                    jobs.append(stream_chat(client, url, i, mode, body))
                self.results = list(await asyncio.gather(*jobs))

        def run():
            try:
                asyncio.run(go())
            except BaseException as exc:           # noqa: BLE001 - reported by the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout_s: float) -> bool:
        self.thread.join(timeout_s)
        return not self.thread.is_alive()


def wait_generating(url: str, n: int, before: dict, timeout_s: float = 120,
                    running: bool = True) -> float:
    """Wait until ``n`` requests have produced at least ``n`` tokens since ``before`` (and, with
    ``running``, the running gauge shows ``n``: it is refreshed once per engine step, so a short
    request may finish between two polls without ever being seen running)."""
    t0 = time.perf_counter()
    while True:
        m = metrics(url)
        if (m.get(RUNNING, 0) >= n or not running) and m.get(GENERATED, 0) - before.get(GENERATED, 0) >= n:
            return time.perf_counter() - t0
        assert time.perf_counter() - t0 < timeout_s, f"{n} requests not generating: {m}"
        time.sleep(0.05)


def report(what: str, **figures) -> None:
    print(f"\n[fault] {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


# --- 1. a tensor-parallel worker killed ------------------------------------------------------------

@pytest.fixture(scope="module")
def worker_killed(tmp_path_factory, current):
    """Serve at TP=2, start a stream, SIGKILL ``VLLM::Worker_TP1``; observe the server, its
    other processes and the stream (once, for the tests below). The module's TP=1 server
    (``Current``) is launched first, to start while this one does."""
    work = tmp_path_factory.mktemp("tp2-kill")
    if current.srv is None:
        current.launch()
    port = free_port()
    while port == current.port:
        port = free_port()
    srv = start_server(work, "--tp 2 -- --max-model-len 1024 --enforce-eager", via="cli",
                       port=port)
    try:
        tree = {p.pid: title(p) for p in srv.children}
        workers = [p for p in srv.children if "Worker_TP1" in title(p)]
        assert len(workers) == 1, f"no single VLLM::Worker_TP1 among the server's processes: {tree}"
        before = metrics(srv.url)
        # a stream far longer than the kill takes (about 30 s of decoding here), seen generating
        streams = Streams(srv.url, 1, max_tokens=900)
        wait_generating(srv.url, 1, before, running=False)
        assert streams.thread.is_alive(), "the stream ended before the worker could be killed"
        workers[0].kill()
        rc, exit_s = wait_exit(srv.proc, 120)
        left, gone_s = wait_gone(srv.children, 30)
        streams.join(30)
        obs = {"rc": rc, "exit_s": exit_s, "left": {p.pid: title(p) for p in left},
               "gone_s": gone_s, "tree": tree, "stream": streams.results,
               "stream_error": streams.error, "startup_s": srv.startup_s, "log": srv.log}
        stream = streams.results[0] if streams.results else None
        report("TP=2, Worker_TP1 SIGKILLed", startup_s=f"{srv.startup_s:.1f}", exit_code=rc,
               exit_after_s=f"{exit_s:.1f}", processes_before=len(tree),
               left_running=obs["left"] or "none",
               in_flight_stream=(stream.error, (stream.detail or "")[:80]) if stream else streams.error)
        yield obs
    finally:
        stop_server(srv, grace_s=5)


@pytest.mark.vllm
@pytest.mark.slow
def test_worker_killed_server_exits_and_leaves_no_process(worker_killed):
    obs = worker_killed
    assert obs["rc"] is not None, (f"the API server still runs 120 s after a TP worker was killed "
                                   f"(log {obs['log']})")
    assert not obs["left"], (f"processes of the server still running {obs['gone_s']:.0f} s after "
                             f"it exited: {obs['left']} (all: {obs['tree']})")
    # the in-flight stream was ended, with an error: not left hanging, not reported complete
    assert obs["stream_error"] is None and len(obs["stream"]) == 1, obs["stream_error"]
    r = obs["stream"][0]
    assert not r.ok and r.error in ("stream_error", "disconnect", "incomplete"), r


@pytest.mark.vllm
@pytest.mark.slow
def test_worker_killed_server_exits_nonzero(worker_killed):
    """vLLM exits 0 when its engine dies; the launcher, not having been signalled, says why and
    exits 1, so a restart-on-failure process manager restarts the server."""
    assert worker_killed["rc"] == 1, worker_killed["rc"]
    assert "stopped without being asked to" in worker_killed["log"].read_text(errors="replace")


# --- 2-4. one server: SIGTERM drain, restart, cancel during prefill --------------------------------

class Current:
    """The module's TP=1 server: started once, stopped by the SIGTERM test, started again by
    the restart test (same port and home: the default model is built once). The first start
    overlaps the TP=2 server's (``worker_killed`` launches it first, the SIGTERM test waits for
    it): two starts side by side on two cores take little longer than one."""

    def __init__(self, work: Path):
        self.work, self.port, self.srv, self.ready = work, free_port(), None, False

    def launch(self) -> None:
        self.srv = launch_server(self.work, SERVE_ARGS, via="cli", port=self.port,
                                 home=self.work / "home")
        self.ready = False

    def start(self) -> Served:
        self.launch()
        return self.running()

    def running(self) -> Served:
        if self.srv is not None and not self.ready:      # launched: wait for it
            wait_ready(self.srv)
            self.ready = True
        elif self.srv is None or self.srv.proc.poll() is not None:
            self.start()
        return self.srv


@pytest.fixture(scope="module")
def current(tmp_path_factory):
    cur = Current(tmp_path_factory.mktemp("faults"))
    try:
        yield cur
    finally:
        stop_server(cur.srv)


@pytest.mark.vllm
@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(current):
    """SIGTERM with 3 streams in flight (64 tokens each, thinking off): with
    ``--shutdown-timeout`` the streams run to their end and the server exits 0, well within the
    drain window."""
    srv = current.running()
    before = metrics(srv.url)
    streams = Streams(srv.url, 3, max_tokens=64)
    try:
        wait_generating(srv.url, 3, before)
        t0 = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)    # the launcher, which forwards it to the server
        time.sleep(0.5)
        during = {"health": http_status(srv.url + "/health"),
                  "new_request": post_json(srv.url + "/v1/chat/completions", {
                      "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
                      timeout=10)[0] if srv.proc.poll() is None else "exited"}
        rc, _ = wait_exit(srv.proc, DRAIN_S + 60)
        exit_s = time.perf_counter() - t0
        finished = streams.join(30)
        left, _ = wait_gone(srv.children, 30)
        report("SIGTERM with 3 streams in flight", startup_s=f"{srv.startup_s:.1f}", exit_code=rc,
               exit_after_s=f"{exit_s:.1f}", streams=[(r.error or "ok", r.completion_tokens,
                                                       r.finish_reason) for r in streams.results],
               during_drain=during, left_running=[title(p) for p in left] or "none")
        assert rc is not None, f"still running {DRAIN_S + 60} s after SIGTERM; log {srv.log}"
        assert finished and streams.error is None, streams.error
        for r in streams.results:   # drained: every stream ran to its end
            assert r.ok and r.completion_tokens == 64 and r.finish_reason == "length", r
        assert rc == 0, f"exit code {rc}; log {srv.log}:\n{srv.log_tail()}"
        assert exit_s < DRAIN_S, f"the drain took {exit_s:.0f} s"
        assert not left, [title(p) for p in left]
    finally:
        if srv.proc.poll() is None:
            stop_server(srv)


@pytest.mark.vllm
@pytest.mark.slow
def test_restart_serves_again(current):
    """Started again on the same port and home after the SIGTERM test (the default model is
    already built): it serves a chat request."""
    if current.srv is not None and current.srv.proc.poll() is None:
        stop_server(current.srv)            # run alone: stop the first server here
    srv = current.start()
    out = chat_ok(srv.url, max_tokens=8)
    report("restart on the same port", port=srv.port, startup_s=f"{srv.startup_s:.1f}",
           reply_tokens=out["usage"]["completion_tokens"])


def _long_prompt(url: str, tokens: int) -> tuple[str, int]:
    """A user message of about ``tokens`` tokens (counted by the server's /tokenize), unique
    per call so that the prefix cache cannot skip its prefill."""
    text = f"{random.random()} " + "hello " * (tokens - 20)
    status, out = post_json(url + "/tokenize", {"model": MODEL, "add_generation_prompt": True,
                                                "messages": [{"role": "user", "content": text}]})
    assert status == 200, out
    return text, out["count"]


@pytest.mark.vllm
@pytest.mark.slow
def test_client_gone_during_prefill_is_aborted(current):
    """A ~900-token prompt prefilled in 64-token chunks (``--max-num-batched-tokens 64``): the
    client closes its connection once the request runs and before any token came back. The
    request is aborted: running/waiting back to 0 within seconds, no prompt finished prefilling
    and no token generated (the counters did not move), and the server serves the next request."""
    srv = current.running()
    for attempt in range(3):           # a prefill that beat the poll is retried with a new prompt
        text, n = _long_prompt(srv.url, 900)
        assert 850 <= n <= 1024 - 100, n
        before = metrics(srv.url)
        body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 100,
                           "messages": [{"role": "user", "content": text}]}).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            t0 = time.perf_counter()
            while metrics(srv.url).get(RUNNING, 0) < 1:
                assert time.perf_counter() - t0 < 60, "the request was never scheduled"
                time.sleep(0.01)
            sock.setblocking(False)
            try:
                got = sock.recv(1 << 16)
            except BlockingIOError:
                got = b""
        finally:
            sock.close()
        t_closed = time.perf_counter()
        idle, settle_s, after = wait_idle(srv.url, 30)
        if b"data:" not in got:
            break
        report("prefill-cancel attempt missed (a token came first)", attempt=attempt)
    report("client gone during prefill", prompt_tokens=n, closed_after_s=f"{t_closed - t0:.2f}",
           idle_after_s=f"{settle_s:.2f}", prompt_tokens_counted=after.get(PROMPT_TOKENS, 0)
           - before.get(PROMPT_TOKENS, 0), generated=after.get(GENERATED, 0) - before.get(GENERATED, 0))
    assert b"data:" not in got, "every attempt got a token before it could close"
    assert idle and settle_s < 5, f"requests still running/waiting {settle_s:.1f} s later: {after}"
    assert after.get(GENERATED, 0) == before.get(GENERATED, 0), (before, after)
    assert after.get(PROMPT_TOKENS, 0) == before.get(PROMPT_TOKENS, 0), (before, after)
    assert http_status(srv.url + "/health") == 200
    chat_ok(srv.url)
