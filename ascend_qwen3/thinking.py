"""Qwen3's thinking, written once: the tags, the soft-switch rule, and the budget's arithmetic.

Everything here is plain Python (no vLLM, no torch), used by three places that must agree:

- the chat template (``serve/chat_template.py``) embeds ``SOFT_SWITCH_RULE``, the Jinja text
  that decides whether a conversation is answered with thinking on;
- the project's reasoning parser for vLLM (``vllm_plugin/thinking.py``) evaluates the same
  Jinja text on a request's messages (``thinking_requested``), so a non-streaming answer is
  split by the rule the prompt was rendered with;
- the project's thinking-budget logits processor (``vllm_plugin/thinking.py``) runs one
  ``BudgetState`` per request: where thinking is open, how many thinking tokens have been
  spent, and which token to force next.

**The soft switches** (Qwen3 model card: "the model follows the last one seen"): thinking is on
unless ``enable_thinking`` is false; a user or system message whose last switch is
``/no_think`` turns it off, one whose last switch is ``/think`` turns it back on (unless
``enable_thinking`` is false); the last message carrying a switch wins.

**The budget** (Qwen3 technical report, section 3.3.3): when a request's thinking reaches its
``thinking_token_budget`` N, the text ``FORCED_END_TEXT`` (the report's transition sentence,
then ``</think>``) is forced token by token and the model answers from what it has thought.

- *Where thinking is open.* After the prompt: when the prompt's last ``<think>`` comes after its
  last ``</think>`` (the template opens ``<think>\\n`` for thinking and writes the closed empty
  block when thinking is off). While generating: a generated ``<think>`` opens it, a generated
  ``</think>`` closes it, and so does a generated ``<tool_call>`` (see below).
- *What counts.* Every token after the last ``<think>``, the prompt's included, while thinking is
  open: the count starts where vLLM's own budget starts it (``ThinkingBudgetStateHolder`` in
  ``vllm/v1/sample/thinking_budget_state.py``, 0.23 and 0.32: ``len(prompt) - (last_start +
  len(start))``), so with the template's ``<think>\\n`` the newline is the first thinking token
  and at most N - 1 tokens are generated before the forced text. The forced tokens do not count.
- *Tool calls.* A ``<tool_call>`` generated while thinking ends the thinking for the budget, as it
  ends the reasoning section for vLLM's ``qwen3`` reasoning parser (0.23
  ``Qwen3ReasoningParser.is_reasoning_end``; 0.32 the ``REASONING -> TOOL_PREAMBLE`` transition
  of ``vllm/parser/qwen3.py``). So the budget never forces text into a tool call's arguments
  (vLLM issue #44676), and never after it into the answer: a tool call is an answer.
- *Budget 0* forces the text at the first generated token of an open thinking section.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# Qwen3 technical report, section 3.3.3: the text that ends thinking when the budget runs out.
# The report's stray "." after </think> is left out so the answer does not start with it.
THINKING_TRANSITION = ("Considering the limited time by the user, I have to give the solution "
                       "based on the thinking directly now.")
FORCED_END_TEXT = f"\n\n{THINKING_TRANSITION}\n{THINK_END}\n\n"

# The soft-switch rule, in the chat template's language. It leaves `thinking.on` true when the
# conversation is to be answered with thinking. The chat template embeds it verbatim and
# `thinking_requested` evaluates it: one text, two users.
SOFT_SWITCH_RULE = r"""
{%- set thinking = namespace(on=not (enable_thinking is defined and enable_thinking is false)) -%}
{%- for m in messages -%}
  {%- if m.role in ['user', 'system'] and m.content is string -%}
    {%- set a = m.content.rfind('/think') -%}
    {%- set b = m.content.rfind('/no_think') -%}
    {%- if b >= 0 and b >= a -%}{%- set thinking.on = false -%}
    {%- elif a >= 0 -%}{%- set thinking.on = not (enable_thinking is defined and enable_thinking is false) -%}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
""".strip()


@lru_cache(maxsize=1)
def _rule_template():
    # the environment transformers renders chat templates in (ImmutableSandboxedEnvironment with
    # trim_blocks / lstrip_blocks and the loop controls; transformers/utils/chat_template_utils.py)
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    return env.from_string(SOFT_SWITCH_RULE + "{{ 'on' if thinking.on else 'off' }}")


def _plain(message) -> dict:
    """A chat message as the template sees it: role and string content. A content given as a
    list of parts is joined as vLLM joins text parts for a string-content template ("\\n")."""
    get = message.get if isinstance(message, dict) else lambda k, d=None: getattr(message, k, d)
    content = get("content")
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) else getattr(part, "text", None)
            if isinstance(text, str):
                texts.append(text)
        content = "\n".join(texts)
    return {"role": get("role"), "content": content}


def thinking_requested(messages, enable_thinking: bool | None = None) -> bool:
    """True when ``messages`` are answered with thinking on, by ``SOFT_SWITCH_RULE`` (the chat
    template's rule); ``enable_thinking`` None means the request did not set it."""
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return _rule_template().render(messages=[_plain(m) for m in messages or []], **kw) == "on"


def _last(ids, token: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1


def prompt_thinking(prompt_ids, think_start: int, think_end: int) -> tuple[bool, int]:
    """(open, tokens already counted) at the end of a prompt: open when its last ``<think>``
    comes after its last ``</think>``; the count is the tokens after that ``<think>``."""
    start, end = _last(prompt_ids, think_start), _last(prompt_ids, think_end)
    if start > end:
        return True, len(prompt_ids) - start - 1
    return False, 0


@dataclass(frozen=True)
class ThinkingTokens:
    """The token ids the budget works with, looked up in the served model's tokenizer."""

    think_start: int
    think_end: int
    tool_call_start: int | None
    forced_end: tuple[int, ...]      # FORCED_END_TEXT, tokenised

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ThinkingTokens":
        vocab = tokenizer.get_vocab()
        missing = [t for t in (THINK_START, THINK_END) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no {' / '.join(missing)} token, so Qwen3's thinking "
                             f"budget cannot be applied; serve a Qwen3 checkpoint with its own "
                             f"tokenizer (one that has <think> and </think>)")
        forced = tuple(tokenizer.encode(FORCED_END_TEXT, add_special_tokens=False))
        if forced.count(vocab[THINK_END]) != 1:
            raise ValueError(f"the tokenizer does not encode {THINK_END} in the budget's forced "
                             f"text as its single special token ({list(forced)}); serve a Qwen3 "
                             f"tokenizer")
        return cls(vocab[THINK_START], vocab[THINK_END], vocab.get(TOOL_CALL_START), forced)


class BudgetState:
    """One request's thinking under a budget: fed every generated token, asked which token (if
    any) must be forced next. Rebuilt from the prompt and all output tokens when a request
    (re)joins a batch, so a preempted and resumed request keeps its count, and a request
    preempted halfway through the forced text goes on with the rest of it: feeding a token
    replays the decision the step was made under."""

    __slots__ = ("tokens", "budget", "open", "count", "forcing", "fed")

    def __init__(self, tokens: ThinkingTokens, budget: int, prompt_ids):
        if budget < 0:
            raise ValueError(f"thinking_token_budget must be >= 0 here (got {budget})")
        self.tokens, self.budget = tokens, budget
        self.open, self.count = prompt_thinking(prompt_ids or (), tokens.think_start,
                                                tokens.think_end)
        self.forcing = -1           # position in tokens.forced_end of the next forced token, or -1
        self.fed = 0                # output tokens consumed

    def feed(self, token: int) -> None:
        t = self.tokens
        self.fed += 1
        self._due()                 # a step the budget forces (replayed alike on a rebuild)
        if self.forcing >= 0:
            if token == t.forced_end[self.forcing]:
                self.forcing += 1
                if self.forcing == len(t.forced_end):
                    self.forcing = -1
                if token == t.think_end:
                    self.open = False
                return
            self.forcing = -1       # something else won the step (another processor): re-judge
        if token == t.think_start:
            self.open, self.count = True, 0
        elif token == t.think_end or (token == t.tool_call_start and self.open):
            self.open = False
        elif self.open:
            self.count += 1

    def feed_all(self, output_ids) -> bool:
        """Consume the output tokens not fed yet; stops at a placeholder (-1: under async
        scheduling vLLM fills the previous step's token in just before the processors run).
        True when it stopped at one."""
        for i in range(self.fed, len(output_ids)):
            token = output_ids[i]
            if token < 0:
                return True
            self.feed(token)
        return False

    def copy(self) -> "BudgetState":
        """An independent state at the same point (to try tokens on, e.g. a draft's)."""
        c = BudgetState.__new__(BudgetState)
        for name in self.__slots__:
            setattr(c, name, getattr(self, name))
        return c

    def _due(self) -> None:
        if self.forcing < 0 and self.open and self.count >= self.budget:
            self.forcing = 0

    def forced_token(self) -> int | None:
        """The token the next step must produce, or None to let the model choose."""
        self._due()
        return self.tokens.forced_end[self.forcing] if self.forcing >= 0 else None
