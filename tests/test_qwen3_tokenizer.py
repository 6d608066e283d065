"""The Qwen3 tokenizer built from quicktok-v1 and the project's chat template (Qwen3's thinking modes)."""

from __future__ import annotations

import os

import pytest
import quicktok  # a dependency of the package (setup.py): missing it fails, never skips

from ascend_qwen3.serve.tokenizer import write_qwen3_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    "Hello world, 你好! It's 2026-11-23 and we've 12345 tokens.\n\n  def f(x):\n\treturn x**2  ",
    "Ünïcödé façade — naïve café; Привет мир; مرحبا بالعالم; 東京タワー 🎉🎉 \r\n\r\n  \t end",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\n<tool_call>",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("qwen3-tokenizer"))
    write_qwen3_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def test_ids_equal_quicktok(tok):
    enc = quicktok.get_encoding("qwen3")
    with open(os.path.join(ROOT, "ascend_qwen3", "quant", "data", "calibration.txt"), encoding="utf-8") as f:
        texts = TEXTS + [f.read()]
    for s in texts:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert ids == enc.encode_with_special_tokens(s)
        assert tok.decode(ids) == s
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                      "</think>", "<tool_call>", "</tool_call>"]) == \
        [151643, 151644, 151645, 151667, 151668, 151657, 151658]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def chat(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


USER = [{"role": "user", "content": "hi"}]
OPEN, EMPTY = "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_thinking_switches(tok):
    assert chat(tok, USER) == "<|im_start|>user\nhi<|im_end|>\n" + OPEN
    assert chat(tok, USER, enable_thinking=True).endswith(OPEN)
    assert chat(tok, USER, enable_thinking=False).endswith(EMPTY)
    no = [{"role": "user", "content": "hi /no_think"}]
    assert chat(tok, no).endswith(EMPTY)
    # the last switch wins, across turns and in the system message
    back = no + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "why? /think"}]
    assert chat(tok, back).endswith(OPEN)
    sys_no = [{"role": "system", "content": "Answer fast. /no_think"}] + USER
    assert chat(tok, sys_no).startswith("<|im_start|>system\nAnswer fast. /no_think<|im_end|>\n")
    assert chat(tok, sys_no).endswith(EMPTY)
    assert chat(tok, [{"role": "user", "content": "x /think"}], enable_thinking=False).endswith(EMPTY)


def test_history_drops_reasoning(tok):
    msgs = USER + [{"role": "assistant", "content": "<think>\nlong thoughts\n</think>\n\nHello!"},
                   {"role": "user", "content": "again"}]
    text = chat(tok, msgs)
    assert "long thoughts" not in text and "<|im_start|>assistant\nHello!<|im_end|>\n" in text


def test_tools_rendered_hermes_style(tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "content": '{"t": 21}'}, {"role": "tool", "content": '{"t": 25}'}]
    text = chat(tok, msgs, tools=tools)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert '<tools>\n{"name": "get_weather", "description": "Weather"' in text
    assert ('<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Rome"}}\n</tool_call><|im_end|>\n') in text
    assert ('<|im_start|>user\n<tool_response>\n{"t": 21}\n</tool_response>\n<tool_response>\n'
            '{"t": 25}\n</tool_response><|im_end|>\n') in text
    assert text.endswith(OPEN)
