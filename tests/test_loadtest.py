"""``ascend-qwen3 loadtest`` (ascend_qwen3/loadtest.py).

Without a server: the SSE decoder, the statistics, the stream bookkeeping and the metrics parser
on canned data, and whole runs against a small fake server (stdlib asyncio, below) that streams
canned chunks and can answer with an HTTP error, stall, or notice a client that went away.
The live run (``make serve`` driven by the command itself, with dropping clients, then the
server's own metrics back to 0) is ``tests/test_vllm_server.py::test_loadtest_on_make_serve``,
on that module's server: one server start fewer.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from ascend_qwen3 import loadtest as lt
from ascend_qwen3.loadtest import (MODES, RUNNING, WAITING, LoadSpec, RequestResult, SSEDecoder,
                                   StreamState, parse_metrics, percentile, request_body, run_load,
                                   sse_data, summarize)

# --- SSE -------------------------------------------------------------------------------------------

BODY = ('data: {"a": 1}\n\n'
        ': a comment\n'
        'event: message\nid: 7\ndata: first line\ndata:second line\n\n'
        'data: {"b": 2}\r\n\r\n'
        'data: [DONE]\n\n')
EVENTS = ['{"a": 1}', "first line\nsecond line", '{"b": 2}', "[DONE]"]


def test_sse_whole_body():
    assert sse_data(BODY) == EVENTS


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_sse_every_split_point_and_line_ending(newline):
    body = BODY.replace("\r\n", "\n").replace("\n", newline)
    for cut in range(len(body) + 1):
        dec = SSEDecoder()
        got = dec.feed(body[:cut]) + dec.feed(body[cut:]) + dec.close()
        assert got == EVENTS, (newline, cut)


def test_sse_random_chunking():
    rng = random.Random(0)
    for _ in range(200):
        dec, got, i = SSEDecoder(), [], 0
        while i < len(BODY):
            n = rng.randint(1, 7)
            got += dec.feed(BODY[i:i + n])
            i += n
        assert got + dec.close() == EVENTS


def test_sse_last_event_without_blank_line_and_empty_data():
    assert sse_data("data: x\ndata: y") == ["x\ny"]
    assert sse_data("data: x\r") == ["x"]
    assert sse_data("data:\n\n") == [""]          # an empty data field is an (empty) event
    assert sse_data("\n\n: only comments\n\n") == []
    assert sse_data("data:  two spaces\n\n") == [" two spaces"]   # only one space is dropped


# --- statistics ------------------------------------------------------------------------------------

def test_percentile_matches_linear_interpolation():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for n in (1, 2, 3, 10, 101, 192):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([1, 2, 3, 4], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summarize_counts_errors_by_kind_and_aggregates_successes_only():
    ok = [RequestResult(index=i, mode=MODES[i % 4], ok=True, latency_s=1.0 + i, ttft_s=0.1 * (i + 1),
                        completion_tokens=10, content_chunks=1) for i in range(4)]
    bad = [RequestResult(index=4, mode=MODES[0], error="http_500", latency_s=99.0, completion_tokens=5),
           RequestResult(index=5, mode=MODES[1], error="timeout"),
           RequestResult(index=6, mode=MODES[2], error="timeout")]
    s = summarize(ok + bad, wall_s=8.0)
    assert (s["requests"], s["ok"], s["errors"]) == (7, 4, 3)
    assert s["errors_by_kind"] == {"http_500": 1, "timeout": 2}
    assert s["latency_p50_s"] == pytest.approx(2.5)            # of 1, 2, 3, 4: the error's 99 is out
    assert s["latency_p99_s"] == pytest.approx(3.97)
    assert s["ttft_p50_s"] == pytest.approx(0.25)
    assert s["completion_tokens"] == 40 and s["tokens_per_s"] == pytest.approx(5.0)
    assert s["modes"]["thinking"] == {"requests": 2, "errors": 1, "with_reasoning": 0, "with_content": 1}
    empty = summarize([], wall_s=0.0)
    assert empty["requests"] == 0 and empty["latency_p50_s"] is None and empty["tokens_per_s"] is None


# --- one stream ------------------------------------------------------------------------------------

def chunk(content=None, reasoning=None, finish=None, usage=None) -> str:
    choices = [] if usage else [{"index": 0, "delta": {k: v for k, v in (("content", content),
                                                                         ("reasoning", reasoning)) if v},
                                 "finish_reason": finish}]
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices}
    if usage:
        obj["usage"] = usage
    return "data: " + json.dumps(obj) + "\n\n"


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def feed(body: str, clock: Clock | None = None, steps: float = 0.0) -> RequestResult:
    """Run ``body`` through StreamState; the clock advances ``steps`` per event."""
    clock = clock or Clock()
    st = StreamState(RequestResult(index=0, mode="thinking"), t_sent=0.0, clock=clock)
    for data in sse_data(body):
        clock.t += steps
        st.event(data)
    return st.finish()


def test_stream_reasoning_then_content_with_usage():
    body = (chunk(content="") + chunk(reasoning="Let me") + chunk(reasoning=" think")
            + chunk(content="Four.", finish="length") + chunk(usage=USAGE) + "data: [DONE]\n\n")
    r = feed(body, steps=0.5)
    assert r.ok and r.error is None
    assert r.ttft_s == pytest.approx(1.0)         # the empty role chunk does not count
    assert r.latency_s == pytest.approx(3.0)
    assert (r.reasoning_chunks, r.content_chunks) == (2, 1)
    assert (r.prompt_tokens, r.completion_tokens, r.finish_reason) == (12, 3, "length")


def test_stream_reasoning_content_field_of_older_servers():
    body = ('data: {"choices": [{"delta": {"reasoning_content": "hm"}}]}\n\n'
            + chunk(usage=USAGE) + "data: [DONE]\n\n")
    assert feed(body).ok


@pytest.mark.parametrize("body, kind", [
    (chunk(content="a") + chunk(usage=USAGE), "incomplete"),
    (chunk(content="") + chunk(usage=USAGE) + "data: [DONE]\n\n", "empty_stream"),
    (chunk(content="a") + "data: [DONE]\n\n", "no_usage"),
    (chunk(content="a") + 'data: {"error": {"message": "EngineCore encountered an issue", "code": 500}}'
     "\n\ndata: [DONE]\n\n", "stream_error"),
    ("data: {not json\n\n" + chunk(content="a") + chunk(usage=USAGE) + "data: [DONE]\n\n", "bad_event"),
])
def test_stream_errors(body, kind):
    r = feed(body)
    assert not r.ok and r.error == kind, r


# --- requests and metrics --------------------------------------------------------------------------

def test_request_bodies_rotate_the_thinking_modes():
    bodies = [request_body(i, "m", 32, 8) for i in range(8)]
    assert [m for m, _ in bodies] == list(MODES) * 2
    for mode, b in bodies:
        assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["model"] == "m" and b["max_tokens"] == 32
        text = b["messages"][0]["content"]
        assert ("chat_template_kwargs" in b) == (mode == "no_think_kwarg")
        assert text.endswith("/no_think") == (mode == "no_think_switch")
        assert b.get("thinking_token_budget") == (8 if mode == "thinking_budget" else None)
    assert bodies[1][1]["chat_template_kwargs"] == {"enable_thinking": False}
    assert len({b["messages"][0]["content"].replace(" /no_think", "") for _, b in
                (request_body(i, "m", 8, 2) for i in range(len(lt.PROMPTS)))}) == len(lt.PROMPTS)


METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen3-tiny-random"} 2.0
vllm:num_requests_running{engine="1",model_name="qwen3-tiny-random"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen3-tiny-random"} 0.0 1700000000000
vllm:num_requests_waiting_by_reason{engine="0",model_name="qwen3-tiny-random",reason="capacity"} 7.0
vllm:num_requests_running_total 5
"""


def test_parse_metrics():
    assert parse_metrics(METRICS) == {RUNNING: 3.0, WAITING: 0.0}
    assert parse_metrics("vllm:num_requests_running 4\n") == {RUNNING: 4.0}
    assert parse_metrics("# nothing\nother_metric 1\n") == {}


def test_cli_wiring():
    from ascend_qwen3.cli import _loadtest, build_parser

    args = build_parser().parse_args(["loadtest", "--url", "http://h:1", "--drop", "2", "--json", "o"])
    assert args.func is _loadtest
    spec = lt.spec_from_args(args)
    assert (spec.concurrency, spec.rounds, spec.max_tokens, spec.timeout_s) == (64, 3, 32, 600.0)
    assert (spec.url, spec.drop, spec.budget()) == ("http://h:1", 2, 8)
    with pytest.raises(ValueError):
        lt.spec_from_args(build_parser().parse_args(["loadtest", "--rounds", "0"]))


def test_no_server_is_a_clear_error(capsys):
    import socket

    with socket.socket() as sock:       # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert lt.main(["--url", f"http://127.0.0.1:{port}"]) == 2
    assert "is the server up?" in capsys.readouterr().err


# --- whole runs against a fake server --------------------------------------------------------------

class FakeServer:
    """A minimal HTTP/1.1 server speaking just enough of the OpenAI streaming API.

    Every response closes its connection. A chat request streams ``max_tokens`` reasoning or
    content chunks (``delay`` apart), a usage chunk and ``[DONE]``; a prompt containing
    ``FAIL`` gets HTTP 500, one containing ``STALL`` never answers. ``/metrics`` reports the
    streams still being written as running (a stream whose client left is noticed at the next
    write), like vLLM's gauge.
    """

    def __init__(self, delay: float = 0.002):
        self.delay = delay
        self.running = 0
        self.dropped = 0
        self.requests: list[dict] = []
        self.auth: list[str | None] = []      # the Authorization header of each request

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            method, path, _ = head.split("\r\n")[0].split(" ")
            self.auth.append(next((h.split(":", 1)[1].strip() for h in head.split("\r\n")
                                   if h.lower().startswith("authorization:")), None))
            length = next((int(h.split(":")[1]) for h in head.split("\r\n")
                           if h.lower().startswith("content-length:")), 0)
            body = json.loads(await reader.readexactly(length)) if length else None
            if path == "/v1/models":
                await self.reply(writer, 200, json.dumps({"data": [{"id": "fake-model"}]}))
            elif path == "/health":
                await self.reply(writer, 200, "")
            elif path == "/metrics":
                await self.reply(writer, 200, f'{RUNNING}{{engine="0"}} {self.running}.0\n'
                                              f'{WAITING}{{engine="0"}} 0.0\n')
            elif path == "/v1/chat/completions":
                await self.chat(writer, body)
            else:
                await self.reply(writer, 404, "not found")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def reply(self, writer, status: int, text: str):
        data = text.encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data)
        await writer.drain()

    async def chat(self, writer, body):
        self.requests.append(body)
        text = body["messages"][0]["content"]
        if "FAIL" in text:
            return await self.reply(writer, 500, '{"error": {"message": "boom"}}')
        if "STALL" in text:
            await asyncio.sleep(3600)
        thinking = not (body.get("chat_template_kwargs") or "/no_think" in text)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        self.running += 1
        try:
            await writer.drain()
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(self.delay)
                writer.write(chunk(**({"reasoning": "r"} if thinking else {"content": "c"})).encode())
                await writer.drain()
            writer.write((chunk(usage={"prompt_tokens": 5, "completion_tokens": body["max_tokens"],
                                       "total_tokens": 5 + body["max_tokens"]})
                          + "data: [DONE]\n\n").encode())
            await writer.drain()
        except ConnectionError:
            self.dropped += 1
        finally:
            self.running -= 1


def fake_run(spec_kw: dict, server_kw: dict | None = None, patch=None):
    async def go():
        fake = FakeServer(**(server_kw or {}))
        url = await fake.start()
        if patch:
            patch(fake)
        try:
            rep = await run_load(LoadSpec(url=url, **spec_kw))
        finally:
            fake.server.close()
        return rep, fake
    return asyncio.run(go())


def test_fake_run_all_ok():
    rep, fake = fake_run(dict(concurrency=6, rounds=3, max_tokens=5))
    s = rep.summary
    assert rep.ok and rep.spec["model"] == "fake-model"
    assert (s["requests"], s["ok"], s["errors"], s["completion_tokens"]) == (18, 18, 0, 90)
    assert len(fake.requests) == 18 and [r["index"] for r in rep.results] == list(range(18))
    assert s["modes"]["no_think_kwarg"]["with_content"] == s["modes"]["no_think_kwarg"]["requests"] > 0
    assert s["modes"]["thinking"]["with_reasoning"] == s["modes"]["thinking"]["requests"] > 0
    assert rep.server["ok"] and rep.server["health"] == 200
    assert 0 < s["ttft_p50_s"] <= s["latency_p50_s"] <= s["latency_p99_s"]
    assert "PASS" in lt.format_report(rep)


def test_fake_run_sends_the_api_key():
    _, fake = fake_run(dict(concurrency=2, rounds=1, max_tokens=2, api_key="k3y"))
    assert fake.auth and set(fake.auth) == {"Bearer k3y"}
    _, fake = fake_run(dict(concurrency=2, rounds=1, max_tokens=2))
    assert set(fake.auth) == {None}


def test_fake_run_counts_http_errors(monkeypatch):
    monkeypatch.setattr(lt, "PROMPTS", ("FAIL please",) + lt.PROMPTS[1:])
    rep, _ = fake_run(dict(concurrency=4, rounds=len(lt.PROMPTS), max_tokens=2))
    n = 4 * len(lt.PROMPTS)
    failing = sum(1 for i in range(n) if i % len(lt.PROMPTS) == 0)
    assert rep.summary["errors_by_kind"] == {"http_500": failing} and not rep.ok
    assert rep.summary["ok"] == n - failing
    assert "FAIL" in lt.format_report(rep)


def test_fake_run_global_deadline_cancels_and_counts_timeouts(monkeypatch):
    monkeypatch.setattr(lt, "PROMPTS", ("STALL",) + lt.PROMPTS[1:])
    t0 = time.perf_counter()
    rep, _ = fake_run(dict(concurrency=2, rounds=3, max_tokens=2, timeout_s=1.0))
    assert time.perf_counter() - t0 < 8
    s = rep.summary
    # worker 0 stalls on request 0 (its requests 2 and 4 never start); worker 1 finishes
    assert s["errors_by_kind"] == {"timeout": 3} and s["ok"] == 3 and not rep.ok
    assert [r["index"] for r in rep.results if r["error"]] == [0, 2, 4]


def test_fake_run_dropping_clients_close_their_streams():
    rep, fake = fake_run(dict(concurrency=2, rounds=1, max_tokens=3, drop=3, drop_after=2,
                              settle_s=5), server_kw={"delay": 0.02})
    assert rep.ok, lt.format_report(rep)
    assert rep.drop == {"clients": 3, "dropped": 3, "errors": 0, "errors_by_kind": {}}
    assert fake.dropped == 3 and fake.running == 0     # the server saw each client go
    # the dropping clients ask for long streams, so they leave while the server is generating
    assert sorted(b["max_tokens"] for b in fake.requests) == [3, 3] + [lt.DROP_MAX_TOKENS] * 3


def test_fake_run_reports_a_server_that_keeps_running_requests():
    rep, _ = fake_run(dict(concurrency=1, rounds=1, max_tokens=1, settle_s=0.5),
                      patch=lambda fake: setattr(fake, "running", 1))   # a leaked request
    assert rep.summary["errors"] == 0 and not rep.ok
    assert rep.server["metrics_zero"] is False and rep.server["last"][RUNNING] == 1.0
    assert "running 1.0 / waiting 0.0" in lt.format_report(rep)
