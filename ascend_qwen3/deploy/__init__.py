"""Deployment: the ``vllm serve`` command builder and launcher (profiles and the memory planner
build on it)."""
