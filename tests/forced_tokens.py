"""A test-only vLLM logits processor that makes a random-weight model say a given text.

Loaded into the live test server with ``--logits-processors tests.forced_tokens:ForcedTokens``.
A request that sends ``vllm_xargs={"forced_token_ids": "1,2,3"}`` (ids as a comma-separated
string) gets those tokens as its first generated tokens, in order: at each step every other
logit is set to -inf. Requests without it are untouched. The test server uses it to make the model
emit what a trained Qwen3 would (a ``<tool_call>`` block, a natural ``</think>``) so that vLLM's
parsers and the thinking budget can be tested on real output.
"""

from __future__ import annotations

import torch

from ascend_qwen3.vllm_plugin.thinking import PerRequestProcessor

KEY = "forced_token_ids"


def _ids(params) -> list[int] | None:
    extra = getattr(params, "extra_args", None) or {}
    raw = extra.get(KEY)
    if raw is None:
        return None
    if isinstance(raw, str):
        return [int(t) for t in raw.split(",") if t.strip()]
    return [int(t) for t in raw]


class ForcedTokens(PerRequestProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, tuple[list[int], list[int]]] = {}   # row -> (forced ids, output ids)

    @classmethod
    def validate_params(cls, params):
        try:
            _ids(params)
        except (TypeError, ValueError):
            raise ValueError(f"vllm_xargs.{KEY} must be comma-separated token ids") from None

    def track(self, params, prompt_ids, output_ids):
        ids = _ids(params)
        return (ids, output_ids) if ids else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (ids, out) in self.rows.items():
            if len(out) < len(ids):
                forced = ids[len(out)]
                keep = logits[row, forced].clone()
                logits[row].fill_(float("-inf"))
                logits[row, forced] = keep if torch.isfinite(keep) else 0.0
        return logits
