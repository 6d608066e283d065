"""Tensor and expert parallelism: the process-group context and the parallel layers."""

from .context import ParallelContext, SINGLE  # noqa: F401
