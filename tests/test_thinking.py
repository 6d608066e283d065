"""Qwen3's thinking done by the project (``ascend_qwen3/thinking.py``, ``vllm_plugin/thinking.py``),
without an engine: the budget's arithmetic token by token, the logits processor driven through
vLLM's batch-update protocol as the model runner drives it (rows added, removed, moved, a
request preempted and resumed, async-scheduling placeholders), the request field taken over
from vLLM's own budget, and the reasoning parser held to the chat template's soft-switch rule.

The live server and the engine (streaming, n > 1, chunked prefill, preemption, TP = 2) are in
``test_vllm_server.py`` and ``test_thinking_engine.py``.
"""

from __future__ import annotations

import pytest
import torch

from ascend_qwen3.thinking import (FORCED_END_TEXT, THINKING_TRANSITION, BudgetState, ThinkingTokens,
                                   prompt_thinking, thinking_requested)

# small fake ids: <think> 1, </think> 2, <tool_call> 3; the forced text 7 8 2 9; anything else >= 10
TOK = ThinkingTokens(think_start=1, think_end=2, tool_call_start=3, forced_end=(7, 8, 2, 9))
OPEN = [10, 11, 1, 12]          # a prompt that ends inside <think> with one token after it
CLOSED = [10, 1, 12, 2, 13]     # a prompt whose think block is closed (thinking off)


def run(budget, prompt, model_tokens, steps=12):
    """Generate `steps` tokens: the forced token when there is one, else the model's next."""
    s, out, mine = BudgetState(TOK, budget, prompt), [], iter(model_tokens)
    for _ in range(steps):
        forced = s.forced_token()
        token = forced if forced is not None else next(mine, 50)
        out.append(token)
        s.feed(token)
    return out


def test_prompt_decides_where_thinking_starts():
    assert prompt_thinking(OPEN, 1, 2) == (True, 1)          # counted from <think>, as vLLM's
    assert prompt_thinking(CLOSED, 1, 2) == (False, 0)
    assert prompt_thinking([10, 11], 1, 2) == (False, 0)
    assert prompt_thinking([1, 2, 1], 1, 2) == (True, 0)     # the last <think> wins


@pytest.mark.parametrize("budget", [0, 1, 3, 5])
def test_budget_forces_the_text_after_n_thinking_tokens(budget):
    out = run(budget, OPEN, range(20, 40))
    thought = max(0, budget - 1)          # the prompt's token after <think> is the first counted
    assert out[:thought] == list(range(20, 20 + thought))
    assert out[thought:thought + 4] == [7, 8, 2, 9]           # then the forced text, whole
    assert out[thought + 4] == 20 + thought                   # then the model answers


def test_natural_end_stops_the_count():
    # the model closes thinking after 2 tokens; its long answer is never cut
    assert run(4, OPEN, [20, 21, 2] + list(range(30, 40))) == [20, 21, 2] + list(range(30, 39))


def test_closed_prompt_is_not_thinking_until_the_model_opens_it():
    assert run(2, CLOSED, range(20, 40)) == list(range(20, 32))
    # a model that opens <think> itself (Qwen3's original template) gets the budget from there
    assert run(2, [10], [20, 1, 21, 22, 23, 24]) == [20, 1, 21, 22, 7, 8, 2, 9, 23, 24, 50, 50]


def test_tool_call_ends_thinking_and_is_never_cut():
    # budget 3: one token left when <tool_call> comes; without the rule the next would be forced
    model = [20, 3] + list(range(30, 40)) + [2]
    assert run(3, OPEN, model) == model[:12]


def test_forcing_gives_way_when_something_else_wins_the_step():
    s = BudgetState(TOK, 1, OPEN)
    assert s.forced_token() == 7
    s.feed(7)
    s.feed(30)             # another processor forced its own token
    assert s.forcing == -1 and s.open and s.forced_token() == 7     # re-judged: force again
    s.feed(7), s.feed(8), s.feed(2)
    assert not s.open and s.forced_token() == 9
    s.feed(9)
    assert s.forced_token() is None


def test_placeholders_wait_for_the_real_token():
    s = BudgetState(TOK, 3, OPEN)
    out = [20, -1]
    assert s.feed_all(out)
    assert s.fed == 1 and s.count == 2
    out[1] = 21                         # the runner fills the previous step's token in
    assert not s.feed_all(out)
    assert s.fed == 2 and s.count == 3 and s.forced_token() == 7


def test_real_tokenizer_ids(qwen3_tokenizer):
    tok = ThinkingTokens.from_tokenizer(qwen3_tokenizer)
    assert (tok.think_start, tok.think_end, tok.tool_call_start) == (151667, 151668, 151657)
    assert qwen3_tokenizer.decode(list(tok.forced_end)) == FORCED_END_TEXT
    assert THINKING_TRANSITION in FORCED_END_TEXT and tok.forced_end.count(151668) == 1


def test_tokenizer_without_think_tokens_is_refused():
    class NoThink:
        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(ValueError, match="no <think> / </think> token.*Qwen3 checkpoint"):
        ThinkingTokens.from_tokenizer(NoThink())


# --- the logits processor, as vLLM's model runner drives it ----------------------------------------

class Params:
    """The two SamplingParams fields the processor reads and writes."""

    def __init__(self, thinking_token_budget=None, extra_args=None):
        self.thinking_token_budget, self.extra_args = thinking_token_budget, extra_args


def _processor():
    pytest.importorskip("vllm")
    from ascend_qwen3.vllm_plugin.thinking import ThinkingBudget
    return ThinkingBudget.for_tokens(TOK)


def _update(added=(), removed=(), moved=(), size=4):
    from vllm.v1.sample.logits_processor import BatchUpdate
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def _budgeted(budget):
    from ascend_qwen3.vllm_plugin.thinking import ThinkingBudget
    p = Params(budget)
    ThinkingBudget.validate_params(p)
    return p


def _step(proc, rows=4, vocab=60):
    logits = torch.zeros(rows, vocab)
    out = proc.apply(logits)
    return [int(r.argmax()) if torch.isinf(r).any() else None for r in out]


def test_validate_params_takes_the_budget_from_vllm():
    from ascend_qwen3.vllm_plugin.thinking import BUDGET_KEY, ThinkingBudget
    p = Params(5, {"other": 1})
    ThinkingBudget.validate_params(p)
    assert p.thinking_token_budget is None and p.extra_args == {"other": 1, BUDGET_KEY: 5}
    ThinkingBudget.validate_params(p)           # idempotent (n > 1 validates shared params again)
    assert p.extra_args == {"other": 1, BUDGET_KEY: 5}
    q = Params()
    ThinkingBudget.validate_params(q)
    assert q.extra_args is None


def test_request_field_is_validated_by_vllm():
    """-1 is unlimited (no budget at all), other negatives are refused naming the field."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    assert SamplingParams(thinking_token_budget=-1).thinking_token_budget is None
    with pytest.raises(Exception, match="thinking_token_budget. must be a non-negative integer or -1"):
        SamplingParams(thinking_token_budget=-3)


def test_processor_without_budgets_does_nothing():
    proc = _processor()
    logits = torch.randn(3, 60)
    before = logits.clone()
    proc.update_state(None)
    proc.update_state(_update(added=[(0, Params(), OPEN, [])]))
    assert proc.apply(logits) is logits and torch.equal(logits, before) and not proc.rows


def test_processor_rows_follow_the_batch():
    proc = _processor()
    outs = [[], [], []]
    proc.update_state(_update(added=[(0, _budgeted(1), OPEN, outs[0]),       # forced at once
                                     (1, Params(), OPEN, outs[1]),            # no budget
                                     (2, _budgeted(3), OPEN, outs[2])]))
    assert _step(proc) == [7, None, None, None]
    outs[0].append(7), outs[2].append(20)
    assert _step(proc) == [8, None, None, None]
    outs[0].append(8), outs[2].append(21)
    assert _step(proc) == [2, None, 7, None]
    # rows 0 and 2 swap places; then row 1 leaves and row 2 (the first request) moves into it
    outs[0].append(2), outs[2].append(7)
    proc.update_state(_update(moved=[(0, 2, _swap())]))
    assert _step(proc) == [8, None, 9, None]
    outs[0].append(9), outs[2].append(8)
    proc.update_state(_update(removed=[1], moved=[(2, 1, _one_way())]))
    assert _step(proc) == [2, None, None, None]
    assert set(proc.rows) == {0, 1}


def _swap():
    from vllm.v1.sample.logits_processor import MoveDirectionality
    return MoveDirectionality.SWAP


def _one_way():
    from vllm.v1.sample.logits_processor import MoveDirectionality
    return MoveDirectionality.UNIDIRECTIONAL


def test_preempted_request_keeps_its_count():
    """Preemption removes the row; resumption adds it back with all its output so far: the
    forced text comes after the same number of thinking tokens as without the preemption."""
    proc = _processor()
    out = []
    proc.update_state(_update(added=[(0, _budgeted(4), OPEN, out)]))
    assert _step(proc)[0] is None
    out.append(20)
    assert _step(proc)[0] is None
    out.append(21)
    proc.update_state(_update(removed=[0]))                   # preempted
    assert not proc.rows and _step(proc)[0] is None
    proc.update_state(_update(added=[(3, _budgeted(4), OPEN, out)]))    # resumed, another row
    assert _step(proc)[3] is None
    out.append(22)
    assert _step(proc)[3] == 7                                # 1 (prompt) + 3 generated = 4


def test_async_placeholder_is_filled_before_apply():
    proc = _processor()
    out = []
    proc.update_state(_update(added=[(0, _budgeted(2), OPEN, out)]))
    assert _step(proc)[0] is None
    out.append(-1)                      # async scheduling: the token is not back yet
    proc.update_state(None)
    out[-1] = 20                        # the runner fills it in before the processors run
    assert _step(proc)[0] == 7


def test_placeholder_left_unfilled_is_reported_once(caplog):
    """An engine that did not ask for real output ids (vllm-ascend's rebuilt input batch) leaves
    placeholders: the budget says so in the log, once."""
    proc = _processor()
    outs = [[20, -1], [-1]]
    proc.update_state(_update(added=[(0, _budgeted(9), OPEN, outs[0]),
                                     (1, _budgeted(9), OPEN, outs[1])]))
    with caplog.at_level("WARNING", logger="ascend_qwen3.vllm_plugin.thinking"):
        _step(proc)
        _step(proc)
    assert [r.message.count("placeholders") for r in caplog.records] == [1]


def test_forced_row_keeps_only_the_forced_token():
    proc = _processor()
    proc.update_state(_update(added=[(1, _budgeted(0), OPEN, [])]))
    logits = torch.randn(2, 60)
    other = logits[0].clone()
    proc.apply(logits)
    assert torch.equal(logits[0], other)
    assert logits[1, 7] == 0 and torch.isinf(logits[1]).sum() == 59


# --- the reasoning parser against the chat template ------------------------------------------------

SWITCH_TABLE = [
    ([{"role": "user", "content": "What is 2 + 2?"}], None),
    ([{"role": "user", "content": "What is 2 + 2? /no_think"}], None),
    ([{"role": "user", "content": "What is 2 + 2? /think"}], None),
    ([{"role": "user", "content": "a /no_think then /think"}], None),
    ([{"role": "user", "content": "a /think then /no_think"}], None),
    ([{"role": "user", "content": "hi /think"}], False),
    ([{"role": "user", "content": "hi /no_think"}], True),
    ([{"role": "user", "content": "hi"}], False),
    ([{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": "hi"}], None),
    ([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "hi /think"}], None),
    ([{"role": "user", "content": "q /no_think"}, {"role": "assistant", "content": "4"},
      {"role": "user", "content": "and 3 + 3?"}], None),
    ([{"role": "user", "content": "q /no_think"}, {"role": "assistant", "content": "4"},
      {"role": "user", "content": "and 3 + 3? /think"}], None),
    ([{"role": "user", "content": [{"type": "text", "text": "part one"},
                                   {"type": "text", "text": "/no_think"}]}], None),
    ([{"role": "user", "content": "the /no_think is quoted, then /think"}], None),
]


def _as_vllm_renders(messages):
    """Messages as vLLM hands them to this template: its content format is "string"
    (vllm/renderers/hf.py, _detect_content_format; checked below), for which vLLM joins a
    message's text parts with "\n" (vllm/renderers/chat_utils.py)."""
    return [dict(m, content="\n".join(p["text"] for p in m["content"]))
            if isinstance(m["content"], list) else m for m in messages]


def _prompt_ids(tokenizer, messages, enable):
    kw = {} if enable is None else {"enable_thinking": enable}
    ids = tokenizer.apply_chat_template(_as_vllm_renders(messages), add_generation_prompt=True,
                                        tokenize=True, **kw)
    return ids["input_ids"] if hasattr(ids, "keys") else ids


def test_vllm_renders_this_template_with_string_content():
    pytest.importorskip("vllm")
    from vllm.renderers.hf import _detect_content_format

    from ascend_qwen3.serve.chat_template import QWEN3_CHAT_TEMPLATE
    assert _detect_content_format(QWEN3_CHAT_TEMPLATE, default="openai") == "string"


@pytest.mark.parametrize("messages,enable", SWITCH_TABLE)
def test_template_and_rule_agree(qwen3_tokenizer, messages, enable):
    """The rendered prompt leaves thinking open exactly when thinking_requested says so."""
    ids = _prompt_ids(qwen3_tokenizer, messages, enable)
    tok = ThinkingTokens.from_tokenizer(qwen3_tokenizer)
    assert prompt_thinking(ids, tok.think_start, tok.think_end)[0] == thinking_requested(messages, enable)


def test_reasoning_parser_follows_the_template(qwen3_tokenizer):
    """Non-streaming answers are split by the rule the prompt was rendered with: the project's
    parser gives reasoning exactly when the template left thinking open, for every row of the
    table; vLLM's own qwen3 parser gets the /no_think rows wrong (vLLM #53284)."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.reasoning import ReasoningParserManager

    import ascend_qwen3.vllm_plugin as plugin
    plugin.register()
    ours = ReasoningParserManager.get_reasoning_parser(plugin.REASONING_PARSER_NAME)
    stock = ReasoningParserManager.get_reasoning_parser("qwen3")
    assert issubclass(ours, stock) and ours is not stock
    tok = ThinkingTokens.from_tokenizer(qwen3_tokenizer)
    stock_wrong = 0
    for messages, enable in SWITCH_TABLE:
        kw = {} if enable is None else {"chat_template_kwargs": {"enable_thinking": enable}}
        request = ChatCompletionRequest(model="m", messages=messages, **kw)
        ids = _prompt_ids(qwen3_tokenizer, messages, enable)
        open_ = prompt_thinking(ids, tok.think_start, tok.think_end)[0]
        answer = "The answer is 4."
        for cls, is_ours in ((ours, True), (stock, False)):
            parser = cls(qwen3_tokenizer, **kw)
            reasoning, content = parser.extract_reasoning(answer, request)
            if is_ours:
                assert (reasoning, content) == ((answer, None) if open_ else (None, answer)), messages
            else:
                stock_wrong += (reasoning is not None) != open_
        # a block the model closed itself (Qwen3's original template leaves /no_think to the
        # model, which then writes an empty think block) goes to vLLM's parser, which splits it
        # unless enable_thinking is false
        if enable is not False:
            parser = ours(qwen3_tokenizer, **kw)
            assert parser.extract_reasoning("why</think>\n\nok", request) == ("why", "\n\nok")
    assert stock_wrong >= 4



def test_rebuilt_halfway_through_the_forced_text_goes_on_with_it():
    """A request preempted while the forced text is being written is rebuilt from its output:
    the tokens already forced are recognised as such (not counted as thinking), and the rest
    of the text follows, once."""
    live = BudgetState(TOK, 2, OPEN)
    out = []
    for model_token in [20, None, None]:
        forced = live.forced_token()
        token = forced if forced is not None else model_token
        out.append(token)
        live.feed(token)
    assert out == [20, 7, 8]
    rebuilt = BudgetState(TOK, 2, OPEN)
    rebuilt.feed_all(out)
    assert (rebuilt.forcing, rebuilt.count) == (live.forcing, live.count) == (2, 2)
    assert rebuilt.forced_token() == 2
    rebuilt.feed(2)
    assert rebuilt.forced_token() == 9
    rebuilt.feed(9)
    assert rebuilt.forced_token() is None and not rebuilt.open
