"""ascend-qwen3: the Qwen3 family on Huawei Ascend NPUs through vLLM(-Ascend), with CPU fallbacks."""

__version__ = "0.1.0"
