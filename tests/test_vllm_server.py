"""The live server: ``make serve`` on loopback, driven with the official ``openai`` client.

The server is started exactly as a user starts it (``make serve``, the embedded default model:
the trained tiny Qwen3 that ships with the package, the real Qwen3 tokenizer, the project's chat
template), plus a test-only logits processor (``tests/forced_tokens.py``) that lets a request
dictate the first tokens the model generates, for the cases where an exact text is needed. The
model's own behaviour (reasoning that ends, answers that stop, tool calls) is tested as it
comes.

The thinking budget and the soft switches are the project's here (``vllm_plugin/thinking.py``):
the tests that pinned vLLM's own behaviour as strict xfails now pass, and say in their
docstrings what vLLM alone did (docs/serving.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from ascend_qwen3.thinking import THINKING_TRANSITION
from tests.vllm_support import ROOT, ops_seen, require_vllm

pytestmark = pytest.mark.vllm

MODEL = "qwen3-tiny"
MAX_MODEL_LEN = 1024
API_KEY = "test-key-" + os.urandom(8).hex()
USER = [{"role": "user", "content": "What is 2 + 2?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path_factory, name: str, serve_args: str, taken=()) -> dict:
    """Start ``make serve`` (PORT free, the default model built under a temporary home, an API
    key through a file, as a mounted Kubernetes Secret would give it) with ``serve_args``; not
    waiting for it (``_ready``)."""
    require_vllm()
    work = tmp_path_factory.mktemp(name)
    port = _free_port()
    while port in taken:
        port = _free_port()
    venv = os.path.dirname(os.path.dirname(sys.executable))
    (work / "api-key").write_text(API_KEY + "\n")
    env = dict(os.environ, ASCEND_QWEN3_HOME=str(work / "home"), PYTHONPATH=ROOT,
               ASCEND_QWEN3_OPS_LOG=str(work / "ops"), VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_API_KEY", None)
    args = f"--api-key-file {work / 'api-key'} {serve_args}"
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(["make", "-s", "serve", f"VENV={venv}", f"PORT={port}",
                             f"SERVE_ARGS={args}"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return {"url": f"http://127.0.0.1:{port}", "port": port, "work": work, "proc": proc, "log": log}


def _ready(server: dict) -> dict:
    """Wait for a launched server's /health; then its ``openai`` client and tokenizer."""
    url, work, proc = server["url"], server["work"], server["proc"]
    deadline = time.time() + 600
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"make serve did not come up (exit {proc.poll()}); log:\n"
                                 + (work / "server.log").read_text()[-5000:])
        time.sleep(1)
    from openai import OpenAI
    from transformers import AutoTokenizer

    client = OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    tok = AutoTokenizer.from_pretrained(str(work / "home" / "default-model"))
    return dict(server, client=client, tok=tok)


def _stop(server):
    try:
        os.killpg(server["proc"].pid, 15)
        server["proc"].wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(server["proc"].pid, 9)
    except ProcessLookupError:      # already gone (a start that failed)
        pass
    server["log"].close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The module's two servers, started at the same time (a start is a minute of mostly one
    process's work: two side by side take little longer than one on two cores):

    - "plain": ``make serve`` as a user starts it, plus the test-only ForcedTokens processor;
    - "eagle3": ``make serve SERVE_ARGS="--speculative eagle3"``: the default model with its
      trained EAGLE-3 draft (no logits processors: vLLM refuses them with speculation; the
      budget goes through the draft).
    """
    require_vllm()
    # the set-up step of ``make serve`` once, before two of them run side by side (nothing to
    # do when ``make test`` has just run it)
    venv = os.path.dirname(os.path.dirname(sys.executable))
    subprocess.run(["make", "-s", "setup", f"VENV={venv}"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    launched = {}
    try:
        launched["plain"] = _launch(tmp_path_factory, "serve", (
            f"-- --max-model-len {MAX_MODEL_LEN} --enforce-eager "
            f"--logits-processors tests.forced_tokens:ForcedTokens"))
        launched["eagle3"] = _launch(tmp_path_factory, "serve-eagle3", (
            f"--speculative eagle3 -- --max-model-len {MAX_MODEL_LEN} --enforce-eager"),
            taken={launched["plain"]["port"]})
        ready = {name: _ready(s) for name, s in launched.items()}
    except BaseException:
        for s in launched.values():
            _stop(s)
        raise
    yield ready
    for s in ready.values():
        _stop(s)


@pytest.fixture(scope="module")
def server(servers):
    """``make serve`` as a user starts it, plus the test-only ForcedTokens processor."""
    return servers["plain"]


@pytest.fixture(scope="module")
def spec_server(servers):
    """``make serve SERVE_ARGS="--speculative eagle3"``."""
    return servers["eagle3"]


@pytest.fixture(params=["plain", "eagle3"])
def any_server(request):
    """The thinking tests run on both: what a user gets with speculation is what they get
    without."""
    return request.getfixturevalue("server" if request.param == "plain" else "spec_server")


def forced(tok, text: str, end: bool = True) -> dict:
    """vllm_xargs that make the model's first tokens spell ``text`` (then <|im_end|>)."""
    ids = tok.encode(text, add_special_tokens=False) + ([tok.convert_tokens_to_ids("<|im_end|>")]
                                                        if end else [])
    return {"forced_token_ids": ",".join(map(str, ids))}


def reasoning_of(message) -> str | None:
    # vLLM 0.23 and 0.32 name the field `reasoning` (it was `reasoning_content` before)
    return getattr(message, "reasoning", None) or getattr(message, "reasoning_content", None)


def chat(server, **kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", USER)
    kw.setdefault("temperature", 0)
    return server["client"].chat.completions.create(**kw)


# --- the endpoints -------------------------------------------------------------------------------

def test_api_key_is_required_and_never_printed(server):
    """/v1 needs the key from --api-key-file; /health stays open for probes; the key is not
    in the server's log (the launcher prints the command it runs)."""
    import openai
    from openai import OpenAI

    bad = OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    req = urllib.request.Request(server["url"] + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401
    with urllib.request.urlopen(server["url"] + "/health", timeout=30) as r:
        assert r.status == 200
    log = (server["work"] / "server.log").read_text()
    assert API_KEY not in log and "VLLM_API_KEY=<hidden>" in log


def test_the_image_checks_pass_on_the_server_make_serve_starts(server):
    """tools/image.py's checks of a running CPU image (make image-test), here against the
    server make serve starts: the same requests and verdicts, without a container."""
    sys.path.insert(0, ROOT)
    from tools.image import check_server

    done = check_server(server["url"], API_KEY)
    assert len(done) == 8, done


def test_models_lists_the_default(server):
    ids = [m.id for m in server["client"].models.list().data]
    assert ids == [MODEL]


def test_served_by_the_project_graph(server):
    chat(server, max_tokens=2)
    ran = set().union(*ops_seen(str(server["work"] / "ops")).values())
    assert {"paged_attention", "write_kv_cache", "qkv_norm_rope", "swiglu"} <= ran


def test_chat_completion(server):
    r = chat(server, max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason == "length" and r.usage.completion_tokens == 4


def test_answer_ends_by_itself(server):
    """Without max_tokens the trained model ends its answer with <|im_end|> (finish "stop"),
    well before the model's default output length."""
    from ascend_qwen3.serve.generation_config import DEFAULT_MAX_TOKENS

    r = chat(server, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content
    assert r.usage.completion_tokens < DEFAULT_MAX_TOKENS


def test_chat_completion_streaming(server):
    stream = chat(server, max_tokens=5, stream=True,
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text and finish == "length"
    ref = chat(server, max_tokens=5, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert text == ref.choices[0].message.content   # greedy: the same answer either way


def test_completions(server):
    r = server["client"].completions.create(model=MODEL, prompt="The capital of France is",
                                            max_tokens=8, temperature=0, logprobs=2)
    c = r.choices[0]
    assert c.text and len(c.logprobs.tokens) == r.usage.completion_tokens
    # the trained model may end the text (<|endoftext|>) before 8 tokens
    assert (c.finish_reason, r.usage.completion_tokens) == ("length", 8) or c.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(server["tok"].encode("The capital of France is"))


# --- thinking ------------------------------------------------------------------------------------

def test_thinking_off_gives_no_reasoning(any_server):
    m = chat(any_server, max_tokens=16, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
             ).choices[0].message
    assert not reasoning_of(m) and m.content


def test_thinking_on_splits_reasoning_and_content(server):
    # a natural end of thinking (what a trained model emits), forced into the random model
    m = chat(server, max_tokens=40,
             extra_body={"vllm_xargs": forced(server["tok"], "Two plus two is four.\n</think>\n\nIt is 4.")}
             ).choices[0].message
    assert reasoning_of(m).strip() == "Two plus two is four."
    assert m.content.strip() == "It is 4."


def test_thinking_answer_has_reasoning_that_ends(any_server):
    """Thinking is on by default: the model reasons, closes </think> by itself, answers, stops."""
    for question in ["What is 2 + 2?", "Tell me about the \"while\" statement in Python."]:
        r = chat(any_server, max_tokens=400, messages=[{"role": "user", "content": question}])
        c = r.choices[0]
        assert c.finish_reason == "stop", c
        assert reasoning_of(c.message).strip() and c.message.content.strip()
        assert "</think>" not in c.message.content and "<think>" not in reasoning_of(c.message)


def test_no_think_soft_switch_closes_thinking_in_the_prompt(any_server):
    """The template honours the last /no_think: the prompt ends with the empty think block
    (checked on the server's own rendering, /tokenize) and the answer streams as content."""
    tok = any_server["tok"]

    def rendered(content):
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}],
                           "add_generation_prompt": True}).encode()
        req = urllib.request.Request(any_server["url"] + "/tokenize", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return tok.decode(json.load(r)["tokens"])

    assert rendered("hi /no_think").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert rendered("hi /no_think then /think").endswith("<|im_start|>assistant\n<think>\n")
    assert rendered("hi").endswith("<|im_start|>assistant\n<think>\n")
    stream = chat(any_server, max_tokens=20, stream=True,
                  messages=[{"role": "user", "content": "What is 23 + 45? /no_think"}])
    reasoning, content = "", ""
    for chunk in stream:
        if chunk.choices:
            reasoning += reasoning_of(chunk.choices[0].delta) or ""
            content += chunk.choices[0].delta.content or ""
    assert content and not reasoning


def test_no_think_non_streaming_answer_is_content(any_server):
    """Non-streaming follows the template's soft-switch rule too (the project's reasoning
    parser; vLLM's own returns this answer as reasoning, vLLM #53284)."""
    # a question the model answers in plain text (a <tool_call> would end the reasoning section
    # for vLLM's parser by itself, whatever the prompt said)
    for content in ["What is 23 + 45? /no_think", "What is 23 + 45? /think then /no_think"]:
        r = chat(any_server, max_tokens=20, messages=[{"role": "user", "content": content}])
        m = r.choices[0].message
        assert m.content and not reasoning_of(m), content
        assert r.usage.completion_tokens_details is None or \
            not r.usage.completion_tokens_details.reasoning_tokens
    m = chat(any_server, max_tokens=20, messages=[{"role": "user", "content": "What is 2 + 2? /no_think /think"}]
             ).choices[0].message
    assert reasoning_of(m)                    # the last switch turns thinking back on


def _thinking_split(tok, ids: list[int]) -> tuple[list[int], list[int] | None]:
    """(the thinking tokens the model generated, the tokens after </think>) of one choice; the
    second is None when the transition text was not forced (the model ended by itself)."""
    end = tok.convert_tokens_to_ids("</think>")
    phrase = tok.encode(f"\n\n{THINKING_TRANSITION}\n", add_special_tokens=False)
    cut = ids.index(end)
    if ids[max(0, cut - len(phrase)):cut] != phrase:
        return ids[:cut], None
    return ids[:cut - len(phrase)], ids[cut + 1:]


@pytest.mark.parametrize("budget", [1, 5, 12])
def test_thinking_budget_forces_the_transition(any_server, budget):
    """At most N thinking tokens, then the report's transition text and </think>, then the
    answer. The count starts at <think>, as vLLM's: the template's newline after it is the
    first thinking token, so exactly N - 1 are generated (this question's free thinking is
    longer than 12 tokens)."""
    r = chat(any_server, max_tokens=budget + 60, extra_body={"thinking_token_budget": budget,
                                                        "return_token_ids": True})
    m, ids = r.choices[0].message, r.choices[0].token_ids
    thought, answer = _thinking_split(any_server["tok"], ids)
    assert answer is not None, "the transition text must come right before </think>"
    assert len(thought) == budget - 1 <= budget
    assert reasoning_of(m).rstrip().endswith(THINKING_TRANSITION)
    assert m.content and answer                        # the answer follows </think>
    assert THINKING_TRANSITION not in m.content


def test_thinking_budget_streaming_and_non_streaming_agree(any_server):
    for budget in (3, 9):
        extra = {"thinking_token_budget": budget}
        full = chat(any_server, max_tokens=60, extra_body=extra).choices[0].message
        stream = chat(any_server, max_tokens=60, stream=True, extra_body=extra)
        reasoning, content = "", ""
        for chunk in stream:
            if chunk.choices:
                reasoning += reasoning_of(chunk.choices[0].delta) or ""
                content += chunk.choices[0].delta.content or ""
        assert reasoning.rstrip().endswith(THINKING_TRANSITION) and content
        assert (reasoning, content) == (reasoning_of(full), full.content)


def test_thinking_budget_with_several_choices(any_server):
    """n > 1: every choice is its own request to the engine, each with its own count."""
    r = chat(any_server, max_tokens=50, n=3, temperature=1.0, seed=1,
             extra_body={"thinking_token_budget": 6, "return_token_ids": True})
    assert len(r.choices) == 3
    for c in r.choices:
        thought, answer = _thinking_split(any_server["tok"], c.token_ids)
        assert answer is not None and len(thought) == 5, c
        assert reasoning_of(c.message).rstrip().endswith(THINKING_TRANSITION)


def test_thinking_budget_with_thinking_off_changes_nothing(any_server):
    """The prompt's think block is closed: there is no thinking to cut (vLLM's own budget
    forced the transition text into this answer)."""
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {}):
        messages = [{"role": "user", "content": "What is 23 + 45?" + ("" if extra else " /no_think")}]
        plain = chat(any_server, max_tokens=30, messages=messages, extra_body=extra).choices[0].message
        budgeted = chat(any_server, max_tokens=30, messages=messages,
                        extra_body=dict(extra, thinking_token_budget=2)).choices[0].message
        assert THINKING_TRANSITION not in (budgeted.content or "")
        assert budgeted.content == plain.content and not reasoning_of(budgeted)


def test_thinking_budget_after_a_natural_end(any_server):
    """The model's own reasoning ends inside the budget; its answer runs past the budget and is
    not cut (vLLM's own budget counted the answer as thinking, vLLM #39697)."""
    end = any_server["tok"].convert_tokens_to_ids("</think>")
    free = chat(any_server, max_tokens=200, extra_body={"return_token_ids": True}).choices[0]
    assert free.finish_reason == "stop" and end in free.token_ids
    budget = free.token_ids.index(end) + 3     # </think> within it, the answer's end beyond it
    assert budget < len(free.token_ids)
    m = chat(any_server, max_tokens=200, extra_body={"thinking_token_budget": budget}).choices[0].message
    assert reasoning_of(m).strip() == reasoning_of(free.message).strip()
    assert m.content == free.message.content and THINKING_TRANSITION not in m.content


def test_thinking_budget_larger_than_the_thinking_changes_nothing(any_server):
    question = [{"role": "user", "content": "Tell me about the \"while\" statement in Python."}]
    free = chat(any_server, max_tokens=300, messages=question, extra_body={"return_token_ids": True})
    big = chat(any_server, max_tokens=300, messages=question,
               extra_body={"return_token_ids": True, "thinking_token_budget": 1000})
    assert free.choices[0].finish_reason == "stop"
    assert big.choices[0].token_ids == free.choices[0].token_ids
    assert big.choices[0].message.content == free.choices[0].message.content


def test_speculation_changes_no_token_of_a_budgeted_answer(server, spec_server):
    """Greedy, the EAGLE-3 server answers token for token as the plain server does, budgets
    included (the budget forced through the draft: vllm_plugin/budget.py), and it did speculate
    (vLLM's counters on /metrics)."""
    questions = ["What is 17 + 25?", "Tell me about the \"for\" statement in Python.",
                 "What is the weather in Paris?"]
    for q in questions:
        for budget in (None, 1, 11):
            extra = {"return_token_ids": True}
            if budget is not None:
                extra["thinking_token_budget"] = budget
            kw = dict(max_tokens=80, messages=[{"role": "user", "content": q}], extra_body=extra)
            plain, spec = chat(server, **kw).choices[0], chat(spec_server, **kw).choices[0]
            assert spec.token_ids == plain.token_ids, (q, budget)
            assert spec.message.content == plain.message.content
    with urllib.request.urlopen(spec_server["url"] + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    counts = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode_num_")}
    assert counts.get("vllm:spec_decode_num_accepted_tokens_total", 0) > 0, counts
    log = (spec_server["work"] / "server.log").read_text()
    assert "the project's, applied through the draft (3 speculative tokens)" in log


def test_thinking_budget_never_cuts_a_tool_call(server):
    """A <tool_call> written while thinking ends the thinking (as vLLM's qwen3 parser reads it):
    the budget runs out one token into the call, and the call still comes out whole (vLLM's own
    budget forces its text inside tool-call arguments, vLLM #44676)."""
    from ascend_qwen3.serve.tiny_corpus import TOOLS as CORPUS_TOOLS

    tok = server["tok"]
    before = "I should check.\n"
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    budget = 1 + len(tok.encode(before, add_special_tokens=False)) + 1
    r = chat(server, max_tokens=80, tools=CORPUS_TOOLS,
             messages=[{"role": "user", "content": "What is the weather in Paris?"}],
             extra_body={"thinking_token_budget": budget, "return_token_ids": True,
                         "vllm_xargs": forced(tok, before + call)})
    c = r.choices[0]
    assert THINKING_TRANSITION not in tok.decode(c.token_ids)
    assert c.finish_reason == "tool_calls", c
    (tc,) = c.message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    assert reasoning_of(c.message).strip() == before.strip()


@pytest.mark.parametrize("thinking", [False, True])
def test_tool_call_by_the_model_itself(server, thinking):
    """With the tools in the prompt, the model answers a weather question with a tool call,
    which vLLM's hermes parser returns as a tool call (after the reasoning, in thinking mode)."""
    from ascend_qwen3.serve.tiny_corpus import TOOLS as CORPUS_TOOLS

    r = chat(server, max_tokens=120, tools=CORPUS_TOOLS,
             messages=[{"role": "user", "content": "What is the weather in Paris?"}],
             extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    (tc,) = c.message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    assert bool(reasoning_of(c.message)) == thinking


def test_tool_call_is_parsed(server):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    r = chat(server, max_tokens=60, tools=TOOLS,
             messages=[{"role": "user", "content": "Weather in Paris?"}],
             extra_body={"chat_template_kwargs": {"enable_thinking": False},
                         "vllm_xargs": forced(server["tok"], call)})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    (tc,) = c.message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}


def test_tools_reach_the_prompt(server):
    body = json.dumps({"model": MODEL, "messages": USER, "tools": TOOLS,
                       "add_generation_prompt": True}).encode()
    req = urllib.request.Request(server["url"] + "/tokenize", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        text = server["tok"].decode(json.load(r)["tokens"])
    assert "<tools>" in text and '"get_weather"' in text and "<tool_call>" in text


# --- bad requests --------------------------------------------------------------------------------

def _still_serving(server):
    assert chat(server, max_tokens=2).choices[0].finish_reason == "length"


def test_unknown_model(server):
    import openai
    with pytest.raises(openai.NotFoundError) as e:
        chat(server, model="qwen3-does-not-exist", max_tokens=2)
    assert "qwen3-does-not-exist" in str(e.value)
    _still_serving(server)


def test_prompt_longer_than_the_context(server):
    import openai
    long = " ".join(["word"] * (MAX_MODEL_LEN + 50))
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, max_tokens=2, messages=[{"role": "user", "content": long}])
    assert str(MAX_MODEL_LEN) in str(e.value)
    _still_serving(server)


def test_negative_thinking_budget(server):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, max_tokens=2, extra_body={"thinking_token_budget": -3})
    assert "thinking_token_budget" in str(e.value)
    _still_serving(server)


@pytest.mark.parametrize("kwargs", ["enable_thinking=false", ["enable_thinking"]])
def test_malformed_chat_template_kwargs(server, kwargs):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, max_tokens=2, extra_body={"chat_template_kwargs": kwargs})
    assert "chat_template_kwargs" in str(e.value)
    _still_serving(server)


@pytest.mark.slow
def test_loadtest_on_make_serve(server, tmp_path):
    """``ascend-qwen3 loadtest`` against ``make serve`` (this module's server, its API key from the
    same file): 16 concurrent streams in the four thinking modes and 4 clients that disconnect
    after 3 chunks of a 200-token stream; nothing fails and the server's running/waiting gauges
    are 0 within 3 s (the dropped requests were aborted: unaborted they would run for several
    more seconds)."""
    out = tmp_path / "load.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ascend_qwen3.cli", "loadtest", "--url", server["url"],
                           "--concurrency", "16", "--rounds", "1", "--max-tokens", "8",
                           "--drop", "4", "--settle-s", "3", "--timeout-s", "240",
                           "--api-key-file", str(server["work"] / "api-key"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(proc.stdout, f"\n[loadtest took {time.perf_counter() - t0:.1f} s]")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(out.read_text())
    s = rep["summary"]
    assert rep["ok"] and s["requests"] == 16 and s["ok"] == 16 and s["errors"] == 0
    # at most 8 tokens each: the trained default model may end an answer sooner
    assert 16 <= s["completion_tokens"] <= 16 * 8
    assert all(m["requests"] == 4 and m["errors"] == 0 for m in s["modes"].values())
    assert s["modes"]["no_think_kwarg"]["with_content"] == 4
    assert s["modes"]["no_think_kwarg"]["with_reasoning"] == 0
    assert s["modes"]["no_think_switch"]["with_content"] == 4
    assert s["modes"]["no_think_switch"]["with_reasoning"] == 0
    assert s["modes"]["thinking"]["with_reasoning"] == 4
    assert rep["drop"] == {"clients": 4, "dropped": 4, "errors": 0, "errors_by_kind": {}}
    assert rep["server"]["metrics_zero"] and rep["server"]["health"] == 200


def test_embeddings_request_to_a_chat_server(server):
    """A chat server computes no embeddings. vLLM alone registers no /v1/embeddings route for a
    generative model and answers a bare 404 {"detail": "Not Found"}; the launcher's guard
    (vllm_plugin/task_guard.py) answers 400 naming the task and how to get it (an embedding model
    on a --runner pooling server), and the server keeps serving."""
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        server["client"].embeddings.create(model=MODEL, input=["What is 2 + 2?"])
    message = str(e.value)
    assert "/v1/embeddings" in message and "--runner pooling" in message, message
    _still_serving(server)
