"""Qwen3's thinking budget and soft switches inside vLLM and vllm-ascend, done by the project.

What vLLM does by itself, and why the project does it instead (docs/serving.md, "Thinking"):

- vLLM's own budget (``ThinkingBudgetStateHolder``, ``vllm/v1/sample/thinking_budget_state.py``
  in 0.23 and 0.32) recognises only its whole forced end string, so a natural ``</think>`` does
  not end thinking for it (vLLM issue #39697) and a prompt whose think block is already closed
  still counts as thinking; it forces text inside tool calls (#44676). vllm-ascend 0.23 has no
  budget at all: its ``NPUInputBatch`` sets ``thinking_budget_state_holder = None``
  (``vllm_ascend/worker/npu_input_batch.py``; vllm-ascend issue #13060), so a request's
  ``thinking_token_budget`` is accepted and ignored on the Atlas image.
- vLLM's ``qwen3`` reasoning parser, in non-streaming mode, decides "thinking off" from
  ``enable_thinking`` only, not from a ``/no_think`` soft switch (#53284): the answer comes back
  as reasoning.

``ThinkingBudget`` is a V1 logits processor (``vllm.v1.sample.logits_processor``, the same
interface in 0.23 and 0.32, loaded by vllm-ascend's ``NPUInputBatch`` too). The launcher passes
it with ``--logits-processors``, which is also what makes vLLM keep each request's output ids
up to date for it (``logitsprocs_need_output_token_ids``; under async scheduling the runner
fills in the previous step's token before the processors run). Per request it runs
``ascend_qwen3.thinking.BudgetState``: the budget's rules are written there.

Taking the request field over. The field stays ``thinking_token_budget`` (vLLM validates it: a
non-negative integer, or -1 for unlimited; anything else is a 400 naming the field). vLLM's own
budget acts on every request whose ``SamplingParams.thinking_token_budget`` is set, and it is on
whenever ``--reasoning-parser`` is (vLLM builds a ``ReasoningConfig`` from the parser). So
``ThinkingBudget.validate_params``, which vLLM runs in the API server for every request before
it checks that field (``InputProcessor._validate_params`` in 0.32, ``SamplingParams.verify`` in
0.23), moves the budget into the request's ``extra_args`` under ``BUDGET_KEY``: vLLM's budget
never sees it, and the project's processor, in the engine, reads it from there.
``tests/test_vllm_compat.py`` pins that order in both versions.

``AscendQwen3ReasoningParser`` is vLLM's ``qwen3`` reasoning parser (whichever class that name
has in the running version) with one change: a non-streaming answer whose conversation the chat
template's soft-switch rule answers without thinking is all content. The rule is the template's
own Jinja text (``ascend_qwen3.thinking.SOFT_SWITCH_RULE``), evaluated on the request's messages.
Streaming needs no change: vLLM checks the rendered prompt there.
"""

from __future__ import annotations

import logging

import torch
from vllm.reasoning import ReasoningParserManager
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from ..thinking import THINK_END, BudgetState, ThinkingTokens, thinking_requested
from . import LOGITS_PROCESSOR
from .budget import BUDGET_KEY, PLACEHOLDER_WARNING, follow_batch, force_rows

logger = logging.getLogger(__name__)


class PerRequestProcessor(LogitsProcessor):
    """A logits processor that keeps a state for some requests of the persistent batch, by batch
    row, following vLLM's batch updates (``follow_batch``). ``track`` says what to keep for a
    request joining the batch (None: nothing)."""

    rows: dict

    def track(self, params, prompt_ids, output_ids):
        raise NotImplementedError

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        follow_batch(self.rows, batch_update, self.track)


class ThinkingBudget(PerRequestProcessor):
    """Forces Qwen3's end-of-thinking text when a request's thinking reaches its budget.

    Requests without a budget are not tracked: with none in the batch, ``apply`` returns at once
    and ``update_state`` only reads the batch changes vLLM hands over.
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        budget = getattr(sampling_params, "thinking_token_budget", None)
        if budget is None:
            return
        extra = dict(sampling_params.extra_args or {})
        extra[BUDGET_KEY] = int(budget)
        sampling_params.extra_args = extra
        sampling_params.thinking_token_budget = None   # vLLM's own budget must not act on it too

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from vllm.tokenizers import cached_tokenizer_from_config

        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        if tokenizer is None:
            raise ValueError("ascend-qwen3's thinking budget needs the model's tokenizer (to find "
                             "<think> and </think>), but the engine was started with "
                             "skip_tokenizer_init; start it with a tokenizer, or without "
                             f"--logits-processors {LOGITS_PROCESSOR}")
        self._setup(ThinkingTokens.from_tokenizer(tokenizer))

    @classmethod
    def for_tokens(cls, tokens: ThinkingTokens) -> "ThinkingBudget":
        """A processor for known token ids, without an engine config (tests, benchmarks)."""
        self = cls.__new__(cls)
        self._setup(tokens)
        return self

    def _setup(self, tokens: ThinkingTokens) -> None:
        self.tokens = tokens
        self._warned = False
        self.rows: dict[int, tuple[BudgetState, list[int]]] = {}   # batch row -> (state, output ids)

    def track(self, params, prompt_ids, output_ids):
        budget = (getattr(params, "extra_args", None) or {}).get(BUDGET_KEY)
        if budget is None:
            return None
        # a resumed request brings all its output so far: the count is rebuilt from it
        return BudgetState(self.tokens, int(budget), prompt_ids), output_ids

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        rows, forced = [], []
        for index, (state, output_ids) in self.rows.items():
            if state.feed_all(output_ids) and not self._warned:
                self._warned = True
                logger.warning(PLACEHOLDER_WARNING)
            token = state.forced_token()
            if token is not None:
                rows.append(index)
                forced.append(token)
        return force_rows(logits, rows, forced)


def _qwen3_parser() -> type:
    return ReasoningParserManager.get_reasoning_parser("qwen3")


class AscendQwen3ReasoningParser(_qwen3_parser()):
    """vLLM's ``qwen3`` reasoning parser; a non-streaming answer to a conversation the
    template's soft-switch rule answers without thinking is all content (module docstring)."""

    def __init__(self, tokenizer, *args, **kwargs):
        super().__init__(tokenizer, *args, **kwargs)
        self._enable_thinking = (kwargs.get("chat_template_kwargs") or {}).get("enable_thinking")
        self._answer_only = False

    def extract_reasoning(self, model_output: str, request):
        messages = getattr(request, "messages", None)    # chat requests (not /v1/responses)
        self._answer_only = (messages is not None and THINK_END not in model_output
                             and not thinking_requested(messages, self._enable_thinking))
        if self._answer_only:
            return None, model_output
        return super().extract_reasoning(model_output, request)

    def count_reasoning_tokens(self, token_ids) -> int:
        return 0 if self._answer_only else super().count_reasoning_tokens(token_ids)
