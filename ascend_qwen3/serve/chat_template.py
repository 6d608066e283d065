"""A Qwen3 chat template with Qwen3's thinking behaviour (model card, technical report), written for this project.

- Turns: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; generation prompt ``<|im_start|>assistant\\n``.
- Thinking: on by default; the generation prompt then opens ``<think>\\n`` so that a thinking budget
  counts from the first generated token (vLLM's qwen3 reasoning parser accepts a response that
  starts inside the think block). Off (``enable_thinking=False``, or a ``/no_think`` soft switch
  being the last switch in the user/system messages): the prompt carries the empty block
  ``<think>\\n\\n</think>\\n\\n`` and the model answers directly. An explicit
  ``enable_thinking=True`` does not override a later ``/no_think``; the last word wins, as the
  model was trained to follow it.
- Earlier assistant turns are rendered without their reasoning (text up to ``</think>`` dropped).
- Tools (Hermes style, parsed by vLLM's ``hermes`` tool parser): the tool signatures go into the
  system turn inside ``<tools></tools>``; assistant tool calls are rendered as
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``; tool results become a user turn
  of ``<tool_response>`` blocks.
"""

from ..thinking import SOFT_SWITCH_RULE

# the soft-switch rule (ascend_qwen3/thinking.py) sets `thinking.on`; the reasoning parser
# evaluates the same text, so a non-streaming answer is split by the rule its prompt was made with
QWEN3_CHAT_TEMPLATE = SOFT_SWITCH_RULE + "\n" + r"""
{%- set ns = namespace(system='') -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.system = messages[0].content -%}{%- endif -%}
{%- if tools -%}
<|im_start|>system
{% if ns.system %}{{ ns.system }}

{% endif %}# Tools

Functions you can call are listed inside <tools></tools>, one JSON signature per line:
<tools>
{% for t in tools %}{{ (t.function if t.function is defined else t) | tojson }}
{% endfor %}</tools>

To call a function, answer with one JSON object per call inside <tool_call></tool_call> tags:
<tool_call>
{"name": "<function name>", "arguments": {<arguments as a JSON object>}}
</tool_call><|im_end|>
{% elif ns.system %}<|im_start|>system
{{ ns.system }}<|im_end|>
{% endif -%}
{%- for m in messages -%}
  {%- if m.role == 'system' and loop.first -%}
  {%- elif m.role == 'user' or m.role == 'system' -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' -%}
  {%- set text = m.content if m.content is string else '' -%}
  {%- if '</think>' in text -%}{%- set text = text.split('</think>')[-1].lstrip('\n') -%}{%- endif -%}
<|im_start|>assistant
{{ text }}
{%- if m.tool_calls -%}
  {%- for c in m.tool_calls -%}
    {%- set f = c.function if c.function is defined else c -%}
{% if text or not loop.first %}{{ '\n' }}{% endif %}<tool_call>
{"name": "{{ f.name }}", "arguments": {{ f.arguments if f.arguments is string else (f.arguments | tojson) }}}
</tool_call>
  {%- endfor -%}
{%- endif -%}
<|im_end|>
{% elif m.role == 'tool' -%}
  {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user\n' }}{% else %}{{ '\n' }}{% endif %}<tool_response>
{{ m.content }}
</tool_response>
  {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if thinking.on %}<think>
{% else %}<think>

</think>

{% endif -%}
{%- endif -%}
""".strip()
