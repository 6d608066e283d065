"""The Qwen3 graph (dense and MoE) on top of ``ops`` and ``parallel``."""

from .graph import Qwen3Graph  # noqa: F401
from .metadata import AttentionMetadata  # noqa: F401
