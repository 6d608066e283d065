"""vLLM integration: the only package of the project that imports vLLM.

``register()`` is the ``vllm.general_plugins`` entry point (setup.py). vLLM calls it in every
process it starts (API server, engine core, each tensor-parallel worker, the model-inspection
subprocess), and it registers the project's graph under the project's own architecture names:

- ``AscendQwen3ForCausalLM``     -> ``ascend_qwen3.vllm_plugin.model:AscendQwen3ForCausalLM``
- ``AscendQwen3MoeForCausalLM``  -> ``ascend_qwen3.vllm_plugin.model:AscendQwen3MoeForCausalLM``

A checkpoint is served by the project's classes when its architecture is overridden:
``vllm serve DIR --hf-overrides '{"architectures": ["AscendQwen3ForCausalLM"]}'``. Because the
names are the project's own, it never matters whether vllm-ascend's plugin registers its models
before or after ours. ``ASCEND_QWEN3_TAKE_OVER=1`` also registers the classes under the stock
names (``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM``), so unmodified configs pick them up; that
opt-in *is* order dependent (the last registration of a name wins), which is why it is not the
default. Registration is lazy (``"module:Class"``): vLLM imports the model module only when it
builds or inspects the model.

It also registers the project's reasoning parser, ``ascend_qwen3`` (vLLM's ``qwen3`` with the
chat template's soft-switch rule applied to non-streaming answers; ``thinking.py``), lazily too.
vLLM loads general plugins while it builds its command-line parser, before it checks the
``--reasoning-parser`` name, so the launcher's ``--reasoning-parser ascend_qwen3`` is known by
then.
"""

from __future__ import annotations

import logging
import os

from ..config import DENSE_ARCHS, MOE_ARCHS, PROJECT_DENSE_ARCH, PROJECT_MOE_ARCH

logger = logging.getLogger("ascend_qwen3.vllm_plugin")

TAKE_OVER_ENV = "ASCEND_QWEN3_TAKE_OVER"
MODEL_MODULE = "ascend_qwen3.vllm_plugin.model"
# entry-point name (setup.py); VLLM_PLUGINS, when set, must list it
PLUGIN_NAME = "ascend_qwen3"


def architectures(take_over: bool | None = None) -> dict[str, str]:
    """Architecture name -> lazy "module:Class" that ``register`` installs."""
    if take_over is None:
        take_over = os.environ.get(TAKE_OVER_ENV, "").strip().lower() in ("1", "true", "yes")
    out = {PROJECT_DENSE_ARCH: f"{MODEL_MODULE}:AscendQwen3ForCausalLM",
           PROJECT_MOE_ARCH: f"{MODEL_MODULE}:AscendQwen3MoeForCausalLM"}
    if take_over:
        out.update({arch: out[PROJECT_DENSE_ARCH] for arch in DENSE_ARCHS})
        out.update({arch: out[PROJECT_MOE_ARCH] for arch in MOE_ARCHS})
    return out


# what the launcher passes to --reasoning-parser and --logits-processors (thinking.py)
REASONING_PARSER_NAME = "ascend_qwen3"
THINKING_MODULE = f"{__name__}.thinking"
LOGITS_PROCESSOR = f"{THINKING_MODULE}:ThinkingBudget"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.reasoning import ReasoningParserManager

    archs = architectures()
    for arch, target in archs.items():
        ModelRegistry.register_model(arch, target)
    ReasoningParserManager.register_lazy_module(REASONING_PARSER_NAME, THINKING_MODULE,
                                                "AscendQwen3ReasoningParser")
    # the budget under speculative decoding, where vLLM refuses logits processors: the input
    # batch's thinking-budget holder, the project's when its parser runs with speculation
    from .budget import install_speculative_budget
    install_speculative_budget(REASONING_PARSER_NAME)
    # vLLM 0.32's CPU fallback of a sampling kernel writes nowhere (cpu_kernels.py): with
    # speculation every sampling (non-greedy) request failed, on any model class
    from .cpu_kernels import fix_cpu_expand_kernel
    fix_cpu_expand_kernel()
    logger.debug("ascend-qwen3 registered %s and the reasoning parser %s", ", ".join(archs),
                 REASONING_PARSER_NAME)
