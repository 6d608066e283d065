"""Serving: the embedded default model (real Qwen3 tokenizer, random weights) and, next, the vLLM
plugin and launcher."""
