"""The standalone runner: the project's graph with its own paged KV cache and a generation loop
(``ascend-qwen3 run``, the tests, the benchmarks), without a serving engine."""
