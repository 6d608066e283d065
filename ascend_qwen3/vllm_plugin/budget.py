"""The thinking budget's engine-side pieces that do not need the reasoning parser: following
vLLM's persistent batch, forcing rows, and the budget under speculative decoding (the input
batch's thinking-budget holder), loaded by the plugin's ``register()`` in every process.

With speculation on, vLLM refuses custom logits processors ("Custom logits processors are not
supported when speculative decoding is enabled.", ``vllm/v1/sample/logits_processor/__init__.py``
in 0.23 and 0.32), so the project's ``ThinkingBudget`` processor (``thinking.py``) cannot run.
What vLLM's V1 runner still calls at every step, in the sampler of the bonus token and in the
rejection sampler of the draft tokens, is its thinking-budget holder
(``vllm/v1/sample/sampler.py`` and ``rejection_sampler.py``, ``apply_logits_processors``),
which the input batch creates through the name ``ThinkingBudgetStateHolder`` of
``vllm.v1.sample.thinking_budget_state`` (``maybe_create_thinking_budget_state_holder``).
``install_speculative_budget`` puts a subclass under that name: vLLM's own behaviour, unless the
engine runs the project's reasoning parser with speculative decoding (docs/serving.md, "The
budget under speculation"). vllm-ascend 0.23 has no holder (its ``NPUInputBatch`` sets it to
None) and its rejection sampler applies none: there the launcher refuses budgeted requests when
speculation is on (``budget_guard.py``).
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from ..thinking import BudgetState, ThinkingTokens

# where ThinkingBudget.validate_params moves a request's budget (thinking.py)
BUDGET_KEY = "ascend_qwen3_thinking_token_budget"
logger = logging.getLogger("vllm.ascend_qwen3.thinking_budget")   # in the engine's log


def follow_batch(rows: dict, batch_update: BatchUpdate | None, track) -> None:
    """Keep ``rows`` (batch row -> state) in step with vLLM's batch updates, applied in vLLM's
    order: removed, added, moved. ``track(params, prompt_ids, output_ids)`` says what to keep
    for a request joining the batch (None: nothing)."""
    if not batch_update:
        return
    for index in batch_update.removed:
        rows.pop(index, None)
    for index, params, prompt_ids, output_ids in batch_update.added:
        state = track(params, prompt_ids, output_ids)
        if state is None:
            rows.pop(index, None)
        else:
            rows[index] = state
    for a, b, direction in batch_update.moved:
        row_a, row_b = rows.pop(a, None), rows.pop(b, None)
        if row_a is not None:
            rows[b] = row_a
        if row_b is not None and direction == MoveDirectionality.SWAP:
            rows[a] = row_b


def force_rows(logits: torch.Tensor, rows: list[int], tokens: list[int]) -> torch.Tensor:
    """Each row in ``rows`` keeps one finite logit (0) at its token: it can only sample that."""
    if rows:
        r = torch.tensor(rows, dtype=torch.long, device=logits.device)
        t = torch.tensor(tokens, dtype=torch.long, device=logits.device)
        logits.index_fill_(0, r, float("-inf"))
        logits[r, t] = 0.0
    return logits


PLACEHOLDER_WARNING = (
    "ascend-qwen3 thinking budget: a request's output ids still hold async-scheduling placeholders "
    "when the budget is applied, so its budget cannot count them and comes late or not at all. "
    "The engine did not ask for real output ids (vllm-ascend 0.23 forgets --logits-processors' "
    "need for them when it rebuilds its input batch for a KV block size other than --block-size); "
    "serve with --block-size 128 or --no-async-scheduling")


def budget_of(params) -> int | None:
    """A request's thinking budget: vLLM's ``thinking_token_budget`` field, or where
    ``ThinkingBudget.validate_params`` moved it; None (or vLLM's -1, unlimited): no budget."""
    budget = getattr(params, "thinking_token_budget", None)
    if budget is None:
        budget = (getattr(params, "extra_args", None) or {}).get(BUDGET_KEY)
    return None if budget is None or int(budget) < 0 else int(budget)


def _speculative_holder(base: type, parser: str) -> type:
    """vLLM's ``ThinkingBudgetStateHolder`` (``base``) with the project's budget under
    speculative decoding (module docstring). vLLM's behaviour except when the engine runs the
    project's reasoning parser (``parser``) with speculative decoding; then it applies
    ``ascend_qwen3.thinking.BudgetState``, position by position through the draft:

    - a verification step scores, for a request with drafts d1..dk, the rows "after the output
      so far" (predicting d1), "after d1" (predicting d2), ..., "after dk" (the bonus token);
    - for row j the budget's state is the request's (fed its output) fed d1..dj as if they were
      accepted; where that state forces a token, the row keeps that token alone, so the rejection
      sampler accepts dj+1 only if it is the forced token and otherwise puts the forced token
      there (the target distribution is one-hot: greedy or random, the same outcome);
    - rows after a draft the budget rejects are not forced (the sampler discards them).

    The tokens produced are those of the same request without speculation: the budget, the
    natural ``</think>``, a tool call and a closed think block in the prompt are judged by the
    same ``BudgetState`` as ``ThinkingBudget`` judges them.
    """

    class AscendQwen3ThinkingBudgetHolder(base):
        _ascend_qwen3 = True

        def __init__(self, reasoning_config, max_num_seqs: int, num_spec_tokens: int, device,
                     is_pin_memory: bool):
            super().__init__(reasoning_config, max_num_seqs, num_spec_tokens, device, is_pin_memory)
            self.ours = (num_spec_tokens > 0
                         and getattr(reasoning_config, "reasoning_parser", "") == parser)
            self.rows: dict = {}
            self._warned = False
            if self.ours:
                self.tokens = ThinkingTokens.from_tokenizer(_engine_tokenizer(parser))
                logger.info("ascend-qwen3 thinking budget: the project's, applied through the "
                            "draft (%d speculative tokens)", num_spec_tokens)

        def has_tracked_requests(self) -> bool:
            return bool(self.rows) if self.ours else super().has_tracked_requests()

        def sync_batch(self, batch_update) -> None:
            if not self.ours:
                return super().sync_batch(batch_update)
            follow_batch(self.rows, batch_update, self._track)

        def _track(self, params, prompt_ids, output_ids):
            budget = budget_of(params)
            if budget is None:
                return None
            return BudgetState(self.tokens, budget, prompt_ids), output_ids

        def update_state(self, output_token_ids, spec_token_ids, repeat_indices=None) -> None:
            # the rows keep the batch's live output lists (as ThinkingBudget does): nothing to
            # copy here (vLLM 0.23 passes them with the drafts appended, 0.32 without)
            if not self.ours:
                super().update_state(output_token_ids, spec_token_ids, repeat_indices)

        def apply_to_logits(self, logits: torch.Tensor, predict_bonus_token: bool,
                            spec_token_ids) -> torch.Tensor:
            if not self.ours:
                return super().apply_to_logits(logits, predict_bonus_token, spec_token_ids)
            return self.force(logits, predict_bonus_token, spec_token_ids or [])

        def force(self, logits: torch.Tensor, bonus: bool, drafts: list) -> torch.Tensor:
            """``bonus``: one row per request (its bonus token); else the rows of every
            request's drafts, request after request in batch order."""
            if not self.rows:
                return logits
            starts, at = {}, 0
            for index in range(max(len(drafts), max(self.rows) + 1)):
                starts[index] = at
                at += 1 if bonus else len(drafts[index] if index < len(drafts) else ())
            rows, forced = [], []
            for index, (state, output_ids) in self.rows.items():
                if state.feed_all(output_ids) and not self._warned:
                    self._warned = True
                    logger.warning(PLACEHOLDER_WARNING)
                mine = list(drafts[index]) if index < len(drafts) else []
                walk = state.copy()
                for j, token in enumerate(mine):
                    want = walk.forced_token()
                    if want is not None and not bonus:
                        rows.append(starts[index] + j)
                        forced.append(want)
                    if want is not None and token != want:
                        break              # rejected here: later rows are discarded
                    walk.feed(token)
                else:
                    want = walk.forced_token()
                    if bonus and want is not None:
                        rows.append(starts[index])
                        forced.append(want)
            return force_rows(logits, rows, forced)

    return AscendQwen3ThinkingBudgetHolder


def _engine_tokenizer(parser: str):
    from vllm.config import get_current_vllm_config_or_none
    from vllm.tokenizers import cached_tokenizer_from_config

    cfg = get_current_vllm_config_or_none()
    tokenizer = None if cfg is None else cached_tokenizer_from_config(cfg.model_config)
    if tokenizer is None:
        raise ValueError("ascend-qwen3's thinking budget needs the model's tokenizer (to find "
                         "<think> and </think>), but the engine has none (skip_tokenizer_init); "
                         f"start it with a tokenizer, or without --reasoning-parser {parser}")
    return tokenizer


def install_speculative_budget(parser: str) -> None:
    """Make vLLM's input batches create ``_speculative_holder``'s class (idempotent). Its
    behaviour is vLLM's own unless the reasoning parser ``parser`` (the project's) runs with
    speculative decoding."""
    import vllm.v1.sample.thinking_budget_state as tbs

    if not getattr(tbs.ThinkingBudgetStateHolder, "_ascend_qwen3", False):
        tbs.ThinkingBudgetStateHolder = _speculative_holder(tbs.ThinkingBudgetStateHolder, parser)
