"""The default model's trained LoRA adapter on a running server: the adapter's held-out prompts
(``ascend_qwen3.serve.train_lora.heldout_prompts``) sent, greedy, to the base model and to the
adapter, each reply judged as training judges it (``train_lora.judge``: signed off, content
right). Start the server first::

    make serve PORT=8123 SERVE_ARGS="--lora default -- --max-model-len 1024"
    .venv/bin/python tools/lora_served_check.py --url http://127.0.0.1:8123
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascend_qwen3.serve.train_lora import LORA_NAME, heldout_prompts, judge  # noqa: E402


def reply(url: str, model: str, p: dict, key: str | None) -> str:
    """The reply as the model wrote it (a parsed tool call written back as its <tool_call>)."""
    body = {"model": model, "messages": p["messages"], "max_tokens": 300, "temperature": 0,
            "chat_template_kwargs": p["kw"]}
    if p["tools"]:
        body["tools"] = p["tools"]
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=300) as r:
        m = json.load(r)["choices"][0]["message"]
    if m.get("tool_calls"):
        f = m["tool_calls"][0]["function"]
        return ("<tool_call>\n" + json.dumps({"name": f["name"], "arguments": json.loads(f["arguments"])})
                + "\n</tool_call>")
    return m.get("content") or ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--base", default="qwen3-tiny", help="the served base model's name")
    ap.add_argument("--adapter", default=LORA_NAME, help="the adapter's served name")
    ap.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"))
    a = ap.parse_args(argv)
    for model in (a.base, a.adapter):
        by: dict[str, dict[str, int]] = {}
        for p in heldout_prompts():
            j = judge(p, reply(a.url, model, p, a.api_key))
            d = by.setdefault(p["kind"], {"prompts": 0, "signed": 0, "right": 0})
            d["prompts"] += 1
            d["signed"] += j["signed"]
            d["right"] += j["right"]
        print(model, json.dumps(by), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
