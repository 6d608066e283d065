"""The Qwen3 graph (dense and MoE) on top of ``ops`` and ``parallel``."""

from .causal_lm import Qwen3ForCausalLM  # noqa: F401
from .metadata import AttentionMetadata  # noqa: F401
