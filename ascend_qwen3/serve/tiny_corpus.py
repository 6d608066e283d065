"""The training corpus of the trained tiny Qwen3 (``train_tiny.py``): text available offline.

Sources, both shipped with CPython (Python Software Foundation License 2.0,
https://docs.python.org/3/license.html):

- ``pydoc_data.topics``: the ~80 help topics of the Python language reference that ``help()``
  prints ("The "for" statement", "Boolean operations", ...), about 460 KB of English prose and
  grammar. Every tenth topic (by sorted name, starting at the fourth) is held out: it is in no
  training sample, and the held-out perplexity is measured on its text.
- ``this``: the Zen of Python.

From them, and from generated examples, the samples (all rendered with the project's chat
template, ``chat_template.py``):

- documents: the text of every training topic, as plain language-model text;
- questions about a topic, answered with the topic's first paragraph, in thinking mode (the
  reasoning quotes the topic's opening sentence and ends with ``</think>``) and in non-thinking
  mode (``enable_thinking=False``, or the ``/no_think`` soft switch in the user message);
- two-digit additions with digit-by-digit reasoning (thinking) or a direct answer;
- tool calls: with a ``get_weather`` / ``get_time`` tool list in the prompt, a question about a
  city is answered with a Hermes-style ``<tool_call>``;
- the Zen of Python on request.

Everything is a function of the seed and of the Python version's ``pydoc_data`` (its digest is
recorded with the model), so the same seed gives the same samples.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
import re
from dataclasses import dataclass

SOURCES = ("pydoc_data.topics and this (CPython, Python Software Foundation License 2.0)")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon",
          "Dublin", "Oslo", "Helsinki", "Athens", "Cairo", "Nairobi", "Lagos", "Tokyo", "Seoul",
          "Beijing", "Shanghai", "Shenzhen", "Hangzhou", "Delhi", "Mumbai", "Sydney", "Lima",
          "Bogota", "Toronto", "Chicago", "Boston", "Denver", "Austin", "Mexico City", "Santiago"]

TOPIC_QUESTIONS = ["What does the Python reference say about {t}?", "Explain {t}.",
                   "Tell me about {t} in Python.", "How does Python define {t}?"]


@dataclass(frozen=True)
class Topic:
    name: str          # the pydoc key, e.g. "for"
    title: str         # its heading, e.g. 'The "for" statement'
    text: str          # the whole help text
    first_paragraph: str


@dataclass(frozen=True)
class Chat:
    """One chat sample: ``messages`` rendered with the template, then ``answer`` (what the
    model is trained to generate after the generation prompt, <|im_end|> excluded)."""
    messages: list
    answer: str
    thinking: bool
    tools: list | None = None


def _prose(body: str) -> str:
    """The first paragraph of running text (not grammar, code or a list), lines joined."""
    for para in re.split(r"\n\s*\n", body):
        lines = para.strip("\n").split("\n")
        if lines and not para.startswith(" ") and len(para) > 60:
            return " ".join(line.strip() for line in lines)
    return ""


def topics() -> list[Topic]:
    import pydoc_data.topics as pt

    out = []
    for name in sorted(pt.topics):
        text = pt.topics[name].strip()
        title, _, body = text.partition("\n")
        body = body.lstrip("*").lstrip("\n")
        para = _prose(body)
        if para:
            out.append(Topic(name, title.strip(), text, para))
    return out


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def split_topics() -> tuple[list[Topic], list[Topic]]:
    """(training topics, held-out topics): every tenth topic, from the fourth, is held out.
    Some topics repeat others' text ("in" is part of "comparisons"): a training topic loses
    every paragraph that also appears in a held-out topic, so no held-out text is trained on."""
    ts = topics()
    held = [t for i, t in enumerate(ts) if i % 10 == 3]
    seen = {p for t in held for p in _paragraphs(t.text)}
    train = []
    for i, t in enumerate(ts):
        if i % 10 == 3:
            continue
        text = "\n\n".join(p for p in re.split(r"\n\s*\n", t.text) if " ".join(p.split()) not in seen)
        if " ".join(t.first_paragraph.split()) not in seen:
            train.append(Topic(t.name, t.title, text, t.first_paragraph))
    return train, held


def corpus_digest() -> str:
    return hashlib.sha256(json.dumps([(t.name, t.text) for t in topics()]).encode()).hexdigest()[:16]


def zen() -> str:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing it prints the Zen
        import this
    return codecs.decode(this.s, "rot13")  # its text is this.s, rot13-coded


def _subject(title: str) -> str:
    return title[0].lower() + title[1:] if title.startswith("The ") else title


def _sentences(text: str, n: int) -> str:
    parts = re.split(r"(?<=[.:])\s+(?=[A-Z\"(])", text)
    return " ".join(parts[:n])


def _no_think(rng: random.Random, question: str) -> tuple[str, dict]:
    """A non-thinking request: half by the /no_think soft switch, half by enable_thinking=False."""
    if rng.random() < 0.5:
        return question + " /no_think", {}
    return question, {"enable_thinking": False}


def topic_chats(ts: list[Topic], rng: random.Random) -> list[tuple[Chat, dict]]:
    out = []
    for t in ts:
        for q in TOPIC_QUESTIONS:
            question = q.format(t=_subject(t.title))
            reasoning = (f"The question is about {_subject(t.title)}. The Python reference has a "
                         f"section \"{t.title}\". It starts: {_sentences(t.first_paragraph, 1)} "
                         f"I will answer with that section's first paragraph.")
            out.append((Chat([{"role": "user", "content": question}],
                             f"{reasoning}\n</think>\n\n{t.first_paragraph}", True), {}))
            text, kw = _no_think(rng, question)
            out.append((Chat([{"role": "user", "content": text}], t.first_paragraph, False), kw))
    return out


def addition_reasoning(a: int, b: int) -> str:
    u = a % 10 + b % 10
    steps = [f"I add {a} and {b}, digit by digit.", f"Units: {a % 10} + {b % 10} = {u}."]
    carry = u // 10
    tens = a // 10 + b // 10 + carry
    if carry:
        steps.append(f"Write {u % 10}, carry 1.")
        steps.append(f"Tens: {a // 10} + {b // 10} + 1 = {tens}.")
    else:
        steps.append(f"Tens: {a // 10} + {b // 10} = {tens}.")
    steps.append(f"So {a} + {b} = {a + b}.")
    return " ".join(steps)


def addition_chats(n: int, rng: random.Random) -> list[tuple[Chat, dict]]:
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        question = rng.choice(["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.",
                               "Compute {a} + {b}."]).format(a=a, b=b)
        answer = f"{a} + {b} = {a + b}."
        if rng.random() < 0.6:
            out.append((Chat([{"role": "user", "content": question}],
                             f"{addition_reasoning(a, b)}\n</think>\n\n{answer}", True), {}))
        else:
            text, kw = _no_think(rng, question)
            out.append((Chat([{"role": "user", "content": text}], answer, False), kw))
    return out


def tool_chats(n: int, rng: random.Random) -> list[tuple[Chat, dict]]:
    out = []
    for _ in range(n):
        city = rng.choice(CITIES)
        name, question = rng.choice([
            ("get_weather", f"What is the weather in {city}?"),
            ("get_weather", f"Weather in {city}?"),
            ("get_time", f"What time is it in {city}?"),
            ("get_time", f"Local time in {city}?")])
        call = ("<tool_call>\n" + json.dumps({"name": name, "arguments": {"city": city}})
                + "\n</tool_call>")
        if rng.random() < 0.5:
            what = "weather" if name == "get_weather" else "local time"
            reasoning = f"The user wants the {what} in {city}. I will call {name} with city {city}."
            out.append((Chat([{"role": "user", "content": question}],
                             f"{reasoning}\n</think>\n\n{call}", True, TOOLS), {}))
        else:
            text, kw = _no_think(rng, question)
            out.append((Chat([{"role": "user", "content": text}], call, False, TOOLS), kw))
    return out


def zen_chats(rng: random.Random) -> list[tuple[Chat, dict]]:
    text = zen().strip()
    out = []
    for q in ["What is the Zen of Python?", "Recite the Zen of Python.", "import this"]:
        reasoning = "The user asks for the Zen of Python, by Tim Peters. I will recite its aphorisms."
        out.append((Chat([{"role": "user", "content": q}], f"{reasoning}\n</think>\n\n{text}", True), {}))
        t, kw = _no_think(rng, q)
        out.append((Chat([{"role": "user", "content": t}], text, False), kw))
    return out
