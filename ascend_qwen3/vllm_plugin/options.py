"""vLLM engine options the project's model classes do not implement, refused at start-up.

The project's classes replace parts of vLLM that some engine options configure: the attention
kernel and its KV cache (``ops.paged_attention`` reads and writes the cache in the model dtype,
with no k/v scales), the weight loader (the project's loader reads safetensors itself, and finds
msModelSlim W8A8 checkpoints by their ``quant_model_description.json``). (Pipeline parallel is
served; a pipeline size that does not split the model's layers evenly, without an explicit
``VLLM_PP_LAYER_PARTITION``, is refused by ``parallel.plan.check_pipeline``, called by the
launcher and the model class, as it needs the model's layer count.) Without a check, such options would be accepted and then
ignored, or worse: an fp8 KV cache would be written without the scales vLLM's own kernels apply.

Each ``Refused`` entry names the ``vllm serve`` flag, where vLLM keeps its value in
``VllmConfig``, the values the project supports and what to do instead. The same table is
checked twice: by the launcher on the command line it builds (so ``ascend-qwen3 serve`` fails in
a second, with this message last, before vLLM starts) and by the model class on the engine's
config (so ``LLM(...)`` or a hand-written ``vllm serve`` fails too, before any weight is read).
This module does not import vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refused:
    flag: str                     # the `vllm serve` flag
    config: str                   # attribute path in vLLM's VllmConfig
    allowed: tuple                # values the project's classes implement (as vLLM stores them)
    fix: str                      # what to do instead
    bool_flag: bool = False       # a switch (no value on the command line)

    def message(self, found) -> str:
        shown = ", ".join("unset" if a is None else str(a) for a in self.allowed)
        return (f"{self.flag} {found} is not supported by ascend-qwen3's model classes "
                f"(supported: {shown}); {self.fix}")


REFUSED: tuple[Refused, ...] = (
    Refused("--kv-cache-dtype", "cache_config.cache_dtype", ("auto", "bfloat16", "float16"),
            "the project's attention stores K/V in a float cache without quantisation scales; "
            "remove the flag (auto = the model dtype)"),
    Refused("--quantization", "model_config.quantization", (None, "ascend"),
            "the project reads msModelSlim W8A8 checkpoints by their quant_model_description.json "
            "and implements no other vLLM quantisation method; remove the flag (W8A8 checkpoints "
            "need none)"),
    Refused("--load-format", "load_config.load_format", ("auto", "safetensors"),
            "the project's loader reads the checkpoint's safetensors files itself; remove the flag"),
    Refused("--trust-remote-code", "model_config.trust_remote_code", (False,),
            "the project runs its own Qwen3 graph and never executes code shipped with a "
            "checkpoint; remove the flag", bool_flag=True),
)

_SHORT = {"-q": "--quantization"}


def _norm(value):
    return value.lower() if isinstance(value, str) else value


def refusals_from_argv(argv: list[str]) -> list[str]:
    """Messages for the refused options on a ``vllm serve`` command line (empty: none)."""
    by_flag = {r.flag: r for r in REFUSED}
    out = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        flag = _SHORT.get(flag, flag).replace("_", "-") if flag.startswith("-") else flag
        r = by_flag.get(flag)
        if r is None:
            continue
        if r.bool_flag:
            out.append(r.message("(set)"))
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        allowed = {_norm(str(a)) for a in r.allowed if a is not None}
        if _norm(value) not in allowed:
            out.append(r.message(value))
    return out


def refusals_from_config(vllm_config) -> list[str]:
    """Messages for the refused options in an engine's ``VllmConfig`` (empty: none)."""
    out = []
    missing = object()
    for r in REFUSED:
        value = vllm_config
        for part in r.config.split("."):
            value = getattr(value, part, missing)
            if value is missing:       # this vLLM version has no such setting
                break
        if value is not missing and _norm(value) not in {_norm(a) for a in r.allowed}:
            out.append(r.message(value))
    return out
