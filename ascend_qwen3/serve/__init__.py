"""Serving: the embedded default model (the trained tiny Qwen3 with the real Qwen3 tokenizer,
its training code and corpus, and its trained EAGLE-3 draft), exported where `ascend-qwen3
serve` looks for it; the vLLM plugin and the launcher live in ``vllm_plugin`` and ``deploy``."""
