"""``ascend-qwen3 loadtest``: drive a live OpenAI-compatible server with concurrent streaming
chat completions and report what it did.

What one run does:

- ``concurrency`` workers each send ``rounds`` streaming ``/v1/chat/completions`` requests one
  after the other (``concurrency x rounds`` requests, at most ``concurrency`` in flight, over one
  HTTP connection pool of that size). Request ``i`` uses the thinking mode ``MODES[i % 4]``:
  thinking on (the server's default), thinking off through ``chat_template_kwargs``, thinking off
  through the ``/no_think`` soft switch in the user message, and thinking on with a
  ``thinking_token_budget``. Prompts rotate through a list of short, varied questions. Sampling
  is the server's default.
- Each request asks for ``stream_options.include_usage``; its completion tokens are read from
  the final ``usage`` chunk. The SSE stream is parsed here (``SSEDecoder``): only ``data:``
  fields matter, an event ends at a blank line, ``[DONE]`` ends the stream.
- Optionally (``--drop N``) N more clients open a stream each, read the first few chunks and
  close the connection: the server must abort those requests and carry on.
- A global deadline (``--timeout-s``) bounds the whole run: requests not finished by then
  (running or not yet started) are cancelled and counted as ``timeout`` errors.
- Afterwards the server is checked: ``vllm:num_requests_running`` and
  ``vllm:num_requests_waiting`` on ``/metrics`` must come back to 0 within ``--settle-s``
  seconds (no request left behind, e.g. by a dropped client) and ``/health`` must answer 200.

A request counts as an error (by kind) when it gets a non-200 status (``http_<status>``), a
timeout (``timeout``), a broken connection (``disconnect``), an ``{"error": ...}`` event in the
stream (``stream_error``), a stream that ends without ``[DONE]`` (``incomplete``), no usage
chunk (``no_usage``), an unparsable event (``bad_event``), or no content or reasoning token at
all (``empty_stream``). Latency is end to end (request sent to end of stream); TTFT is the time
to the first chunk carrying content or reasoning text. Tokens/s is the sum of the successful
requests' completion tokens over the wall time of the load.

The exit code is 0 only when every request succeeded, every dropping client got its first
chunks, and the server check passed. ``--json OUT`` writes the whole report (settings, summary,
per-mode counts, error samples, the server check, one record per request).

Only the standard library is imported at module level; ``httpx`` is imported when a run starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

# the four thinking modes, rotated by request index
MODES = ("thinking", "no_think_kwarg", "no_think_switch", "thinking_budget")

PROMPTS = (
    "What is 2 + 2?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "Why is the sky blue? One sentence.",
    "Translate 'good morning' into French.",
    "Give me a synonym for 'quick'.",
    "What is the capital of Japan?",
    "List two prime numbers greater than 10.",
    "Explain recursion to a child in one sentence.",
    "What does HTTP stand for?",
    "Suggest a name for a grey cat.",
    "Is 91 a prime number?",
    "How many legs does a spider have?",
    "Summarise the plot of Hamlet in ten words.",
)

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"

# max_tokens of a dropping client's request: the stream must outlast the client by far, so that a
# server that did not abort it would still be running it when the run is checked
DROP_MAX_TOKENS = 200


# --- server-sent events ----------------------------------------------------------------------------

class SSEDecoder:
    """Incremental decoder of a ``text/event-stream`` body into the ``data`` of each event.

    Feed it text as it arrives (any chunking: lines and events may be split anywhere, line ends
    may be ``\\n``, ``\\r\\n`` or ``\\r``); ``feed`` returns the data of the events completed so
    far, ``close`` the data of a last event not followed by a blank line. Several ``data:`` lines
    of one event are joined with ``\\n``; comments (lines starting with ``:``) and other fields
    (``event:``, ``id:``, ``retry:``) are ignored; one space after the colon is dropped.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[str]:
        self._buf += text
        out: list[str] = []
        while True:
            cut = _line_end(self._buf)
            if cut is None:
                return out
            end, nxt = cut
            line, self._buf = self._buf[:end], self._buf[nxt:]
            self._line(line, out)

    def close(self) -> list[str]:
        out: list[str] = []
        if self._buf:   # a last line without its line end (a lone "\r" is one)
            self._line(self._buf[:-1] if self._buf.endswith("\r") else self._buf, out)
            self._buf = ""
        self._line("", out)
        return out

    def _line(self, line: str, out: list[str]) -> None:
        if line == "":
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)


_EOL = re.compile(r"\r\n|\r|\n")


def _line_end(buf: str):
    """(end of the first complete line, start of the next) in ``buf``, or None. A ``\\r`` at the
    very end may be the first half of ``\\r\\n``: wait for more text."""
    m = _EOL.search(buf)
    if m is None or (m.group() == "\r" and m.end() == len(buf)):
        return None
    return m.start(), m.end()


def sse_data(body: str) -> list[str]:
    """The data of every event of a complete ``text/event-stream`` body."""
    dec = SSEDecoder()
    return dec.feed(body) + dec.close()


# --- statistics ------------------------------------------------------------------------------------

def percentile(values, q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values`` with linear interpolation between closest
    ranks (numpy's default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in [0, 100]")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class RequestResult:
    index: int
    mode: str
    ok: bool = False
    error: str | None = None          # kind: http_<status>, timeout, disconnect, stream_error, ...
    detail: str | None = None
    status: int | None = None
    latency_s: float | None = None    # request sent -> end of stream
    ttft_s: float | None = None       # request sent -> first content or reasoning text
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    content_chunks: int = 0
    reasoning_chunks: int = 0
    finish_reason: str | None = None


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    """Requests, errors (total and by kind), latency and TTFT p50/p99, completion tokens and
    aggregate tokens/s (over ``wall_s``) of ``results``."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    modes: dict[str, dict] = {}
    for r in results:
        m = modes.setdefault(r.mode, {"requests": 0, "errors": 0, "with_reasoning": 0,
                                      "with_content": 0})
        m["requests"] += 1
        m["errors"] += not r.ok
        m["with_reasoning"] += r.reasoning_chunks > 0
        m["with_content"] += r.content_chunks > 0
    return {
        "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "errors_by_kind": dict(sorted(errors.items())),
        "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "wall_s": wall_s, "modes": modes,
    }


def parse_metrics(text: str, names=(RUNNING, WAITING)) -> dict[str, float]:
    """Sum of each named gauge over its label sets in Prometheus text format (a name that does
    not appear is absent from the result; ``vllm:num_requests_waiting_by_reason`` is not
    ``vllm:num_requests_waiting``)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        for name in names:
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
                try:
                    # `name{labels} value [timestamp]` or `name value [timestamp]`
                    rest = line.rsplit("}", 1)[1] if "}" in line else line[len(name):]
                    value = float(rest.split()[0])
                except (IndexError, ValueError):
                    continue
                out[name] = out.get(name, 0.0) + value
    return out


# --- requests --------------------------------------------------------------------------------------

def request_body(index: int, model: str, max_tokens: int, budget: int) -> tuple[str, dict]:
    """(mode, JSON body) of request ``index``: the mode and prompt rotate with the index."""
    mode = MODES[index % len(MODES)]
    prompt = PROMPTS[index % len(PROMPTS)]
    body: dict = {"model": model, "stream": True, "max_tokens": max_tokens,
                  "stream_options": {"include_usage": True}}
    if mode == "no_think_kwarg":
        body["chat_template_kwargs"] = {"enable_thinking": False}
    elif mode == "no_think_switch":
        prompt += " /no_think"
    elif mode == "thinking_budget":
        body["thinking_token_budget"] = budget
    body["messages"] = [{"role": "user", "content": prompt}]
    return mode, body


def _reasoning_of(delta: dict) -> str | None:
    # vLLM 0.23 / 0.32 call it `reasoning`; older servers `reasoning_content`
    return delta.get("reasoning") or delta.get("reasoning_content")


class StreamState:
    """What a chat-completion stream has shown so far; ``event`` takes each event's data."""

    def __init__(self, result: RequestResult, t_sent: float, clock=time.perf_counter):
        self.r, self.t_sent, self.clock = result, t_sent, clock
        self.done = False

    def event(self, data: str) -> None:
        r = self.r
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            self.fail("bad_event", data[:200])
            return
        if not isinstance(obj, dict):
            self.fail("bad_event", data[:200])
            return
        if "error" in obj:
            err = obj["error"]
            self.fail("stream_error", (err.get("message") if isinstance(err, dict) else str(err))[:300])
            return
        if obj.get("usage"):
            r.prompt_tokens = obj["usage"].get("prompt_tokens")
            r.completion_tokens = obj["usage"].get("completion_tokens")
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            content, reasoning = delta.get("content"), _reasoning_of(delta)
            r.content_chunks += bool(content)
            r.reasoning_chunks += bool(reasoning)
            if (content or reasoning) and r.ttft_s is None:
                r.ttft_s = self.clock() - self.t_sent
            r.finish_reason = choice.get("finish_reason") or r.finish_reason

    def fail(self, kind: str, detail: str) -> None:
        if self.r.error is None:          # the first problem is the one reported
            self.r.error, self.r.detail = kind, detail

    def finish(self) -> RequestResult:
        r = self.r
        r.latency_s = self.clock() - self.t_sent
        if r.error is None:
            if not self.done:
                self.fail("incomplete", "the stream ended without [DONE]")
            elif r.content_chunks + r.reasoning_chunks == 0:
                self.fail("empty_stream", f"no content or reasoning (finish_reason {r.finish_reason})")
            elif r.completion_tokens is None:
                self.fail("no_usage", "no usage chunk although stream_options.include_usage was set")
        r.ok = r.error is None
        return r


def _error_kind(exc: BaseException) -> str:
    import httpx

    if isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
                        httpx.ConnectError, httpx.CloseError, ConnectionError)):
        return "disconnect"
    return "client_error"


async def stream_chat(client, url: str, index: int, mode: str, body: dict,
                      drop_after: int | None = None) -> RequestResult:
    """Send one streaming chat completion and read it to the end (or, with ``drop_after``,
    close the connection once that many content/reasoning chunks have arrived)."""
    r = RequestResult(index=index, mode=mode)
    t0 = time.perf_counter()
    state = StreamState(r, t0)
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                state.fail(f"http_{resp.status_code}", text[:300])
                state.done = True
                return state.finish()
            dec = SSEDecoder()
            async for text in resp.aiter_text():
                for data in dec.feed(text):
                    state.event(data)
                if drop_after is not None and r.content_chunks + r.reasoning_chunks >= drop_after:
                    # leaving the block unread closes this connection: the client is gone
                    r.latency_s = time.perf_counter() - t0
                    r.ok = True
                    return r
            for data in dec.close():
                state.event(data)
    except asyncio.CancelledError:
        raise
    except Exception as exc:                           # noqa: BLE001 - every failure is counted
        state.fail(_error_kind(exc), f"{exc.__class__.__name__}: {exc}"[:300])
    if drop_after is not None and r.error is None:
        state.fail("ended_before_drop",
                   f"the stream ended after {r.content_chunks + r.reasoning_chunks} chunks")
    return state.finish()


# --- the run ---------------------------------------------------------------------------------------

@dataclass
class LoadSpec:
    url: str
    model: str | None = None
    concurrency: int = 64
    rounds: int = 3
    max_tokens: int = 32
    timeout_s: float = 600.0
    drop: int = 0
    drop_after: int = 3               # chunks a dropping client reads before it disconnects
    thinking_budget: int | None = None  # default: max(1, max_tokens // 4)
    settle_s: float = 5.0             # how long /metrics may take to come back to 0 after the run
    api_key: str | None = None        # sent as "Authorization: Bearer <key>" when set

    def budget(self) -> int:
        return self.thinking_budget or max(1, self.max_tokens // 4)


@dataclass
class LoadReport:
    spec: dict
    summary: dict
    drop: dict
    server: dict
    error_samples: list = field(default_factory=list)
    results: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.summary["errors"] == 0 and self.drop["errors"] == 0
                and self.server.get("ok", False))

    def to_json(self) -> dict:
        return dict(asdict(self), ok=self.ok)


async def _first_model(client, url: str) -> str:
    import httpx

    try:
        r = await client.get(url + "/v1/models")
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot list the models of {url} ({exc.__class__.__name__}: {exc}); is "
                         f"the server up?") from None
    data = r.json().get("data") or []
    if not data:
        raise ValueError(f"{url}/v1/models lists no model; pass --model")
    return data[0]["id"]


async def check_server(client, url: str, settle_s: float, poll_s: float = 0.25) -> dict:
    """Wait up to ``settle_s`` for running + waiting requests on ``/metrics`` to be 0, then ask
    ``/health``. Returns what was seen, with ``ok``."""
    t0 = time.perf_counter()
    out: dict = {"metrics_zero": False, "settle_s": None, "last": None, "health": None}
    while True:
        try:
            r = await client.get(url + "/metrics")
            values = parse_metrics(r.text) if r.status_code == 200 else {}
            out["last"] = values
            if r.status_code == 200 and RUNNING in values and WAITING in values \
                    and values[RUNNING] == 0 and values[WAITING] == 0:
                out["metrics_zero"], out["settle_s"] = True, time.perf_counter() - t0
                break
            if r.status_code == 200 and (RUNNING not in values or WAITING not in values):
                out["detail"] = f"/metrics has no {RUNNING} / {WAITING}"
        except Exception as exc:                       # noqa: BLE001
            out["detail"] = f"/metrics: {exc.__class__.__name__}: {exc}"
        if time.perf_counter() - t0 > settle_s:
            break
        await asyncio.sleep(poll_s)
    try:
        out["health"] = (await client.get(url + "/health")).status_code
    except Exception as exc:                           # noqa: BLE001
        out["health"] = f"{exc.__class__.__name__}: {exc}"
    out["ok"] = out["metrics_zero"] and out["health"] == 200
    return out


async def run_load(spec: LoadSpec) -> LoadReport:
    import httpx

    url = spec.url.rstrip("/")
    n = spec.concurrency * spec.rounds
    timeout = httpx.Timeout(spec.timeout_s, connect=min(30.0, spec.timeout_s))
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client, \
            httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=max(spec.drop, 1)),
                              headers=headers) as drop_client, \
            httpx.AsyncClient(timeout=10, headers=headers) as probe:
        model = spec.model or await _first_model(probe, url)
        results: dict[int, RequestResult] = {}
        drops: dict[int, RequestResult] = {}

        async def worker(w: int) -> None:
            for k in range(spec.rounds):
                i = w + k * spec.concurrency
                mode, body = request_body(i, model, spec.max_tokens, spec.budget())
                results[i] = await stream_chat(client, url, i, mode, body)

        async def dropper(d: int) -> None:
            # long enough that the server is still generating when the client goes
            mode, body = request_body(d, model, max(spec.max_tokens, DROP_MAX_TOKENS), spec.budget())
            drops[d] = await stream_chat(drop_client, url, d, mode, body, drop_after=spec.drop_after)

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker(w)) for w in range(spec.concurrency)]
        tasks += [asyncio.create_task(dropper(d)) for d in range(spec.drop)]
        _, pending = await asyncio.wait(tasks, timeout=spec.timeout_s)
        for t in pending:                      # the global deadline: cancel what is left
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
        for i in range(n):
            if i not in results:
                results[i] = RequestResult(index=i, mode=MODES[i % len(MODES)], error="timeout",
                                           detail=f"not finished within the {spec.timeout_s:g} s deadline")
        for d in range(spec.drop):
            if d not in drops:
                drops[d] = RequestResult(index=d, mode=MODES[d % len(MODES)], error="timeout",
                                         detail=f"not finished within the {spec.timeout_s:g} s deadline")
        ordered = [results[i] for i in range(n)]
        summary = summarize(ordered, wall)
        drop_errors: dict[str, int] = {}
        for r in drops.values():
            if not r.ok:
                drop_errors[r.error] = drop_errors.get(r.error, 0) + 1
        drop = {"clients": spec.drop, "dropped": sum(r.ok for r in drops.values()),
                "errors": spec.drop - sum(r.ok for r in drops.values()),
                "errors_by_kind": dict(sorted(drop_errors.items()))}
        server = await check_server(probe, url, spec.settle_s)
    samples = [{"index": r.index, "mode": r.mode, "error": r.error, "detail": r.detail}
               for r in ordered + [drops[d] for d in range(spec.drop)] if not r.ok][:20]
    spec_d = dict(asdict(spec), model=model, requests=n, thinking_budget=spec.budget())
    return LoadReport(spec=spec_d, summary=summary, drop=drop, server=server,
                      error_samples=samples, results=[asdict(r) for r in ordered])


# --- presentation and command line -----------------------------------------------------------------

def _ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def format_report(rep: LoadReport) -> str:
    s, sp = rep.summary, rep.spec
    kinds = ", ".join(f"{k} {v}" for k, v in s["errors_by_kind"].items()) or "none"
    rows = [
        ("server", f"{sp['url']} ({sp['model']})"),
        ("load", f"{sp['concurrency']} concurrent x {sp['rounds']} rounds, max_tokens "
                 f"{sp['max_tokens']}, modes {'/'.join(MODES)} (budget {sp['thinking_budget']})"),
        ("requests", f"{s['requests']} ({s['ok']} ok)"),
        ("errors", f"{s['errors']} ({kinds})"),
        ("latency p50 / p99", f"{_ms(s['latency_p50_s'])} / {_ms(s['latency_p99_s'])}"),
        ("TTFT p50 / p99", f"{_ms(s['ttft_p50_s'])} / {_ms(s['ttft_p99_s'])}"),
        ("completion tokens", f"{s['completion_tokens']}"),
        ("tokens/s (aggregate)", "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}"),
        ("wall time", f"{s['wall_s']:.1f} s"),
    ]
    if rep.drop["clients"]:
        dk = ", ".join(f"{k} {v}" for k, v in rep.drop["errors_by_kind"].items())
        rows.append(("dropping clients", f"{rep.drop['clients']}: {rep.drop['dropped']} dropped after "
                     f"{sp['drop_after']} chunks" + (f", {rep.drop['errors']} failed ({dk})" if dk else "")))
    sv = rep.server
    last = sv.get("last") or {}
    rows.append(("server after the run",
                 (f"running/waiting 0 after {sv['settle_s']:.1f} s" if sv["metrics_zero"] else
                  f"running {last.get(RUNNING)} / waiting {last.get(WAITING)} after {sp['settle_s']:g} s"
                  + (f" ({sv['detail']})" if sv.get("detail") else ""))
                 + f", /health {sv['health']}"))
    rows.append(("result", "PASS" if rep.ok else "FAIL"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for e in rep.error_samples[:5]:
        lines.append(f"  error: request {e['index']} ({e['mode']}): {e['error']}: {e['detail']}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (and connections)")
    p.add_argument("--rounds", type=int, default=3, help="requests per concurrent client")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--thinking-budget", type=int, default=None,
                   help="thinking_token_budget of the budget mode (default max_tokens // 4, at least 1)")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="global deadline: unfinished requests are cancelled and count as errors")
    p.add_argument("--drop", type=int, default=0, metavar="N",
                   help="N extra clients that disconnect after the first chunks of a stream")
    p.add_argument("--drop-after", type=int, default=3, help="chunks a dropping client reads")
    p.add_argument("--settle-s", type=float, default=5.0,
                   help="time /metrics may take to show 0 running and waiting requests after the run")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report as JSON")
    p.add_argument("--api-key-file", default=None,
                   help="a file holding the server's API key (default: $VLLM_API_KEY, if set)")
    return p


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    for name in ("concurrency", "rounds", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.drop < 0 or args.drop_after < 1 or args.timeout_s <= 0 or args.settle_s < 0:
        raise ValueError("--drop must be >= 0, --drop-after >= 1, --timeout-s > 0, --settle-s >= 0")
    api_key = os.environ.get("VLLM_API_KEY") or None
    if getattr(args, "api_key_file", None):
        try:
            with open(args.api_key_file) as f:
                api_key = f.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --api-key-file {args.api_key_file!r} ({exc.strerror})") from None
    return LoadSpec(url=args.url, model=args.model, concurrency=args.concurrency, rounds=args.rounds,
                    max_tokens=args.max_tokens, timeout_s=args.timeout_s, drop=args.drop,
                    drop_after=args.drop_after, thinking_budget=args.thinking_budget,
                    settle_s=args.settle_s, api_key=api_key)


def run(args: argparse.Namespace, out=None) -> int:
    """Run the load of ``args`` (``add_arguments``), print the table, write ``--json``; 0 when
    everything passed, 1 otherwise (ValueError: bad options, or no server to ask for a model)."""
    out = out or sys.stdout
    rep = asyncio.run(run_load(spec_from_args(args)))
    print(format_report(rep), file=out, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.to_json(), f, indent=1)
    return 0 if rep.ok else 1


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="loadtest", description=__doc__.split("\n")[0]))
    try:
        return run(p.parse_args(argv))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
