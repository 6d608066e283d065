"""Speculative decoding settings: what a deploy profile or ``serve`` asks for, and whether a draft
fits its target, checked before any engine starts.

vLLM's ``--speculative-config`` takes ``{"method", "model", "num_speculative_tokens", ...}``.
The methods the project's classes serve (docs/serving.md, "Speculative decoding"):

- ``eagle3``: a one-layer draft that reads the target's residual stream after three of its
  layers (``eagle_aux_hidden_state_layer_ids``), its token embedding shared with the target.
  vLLM 0.23 (what vllm-ascend 0.23 runs) has only Llama-architecture EAGLE-3 draft classes
  (``vllm/model_executor/models/registry.py``: ``Eagle3LlamaForCausalLM``), so a draft for the
  NPU says ``"architectures": ["LlamaForCausalLM"]`` (vLLM renames it ``Eagle3...``).
- ``eagle``: an EAGLE-1 draft reading the target's final hidden states.
- ``draft_model``: a smaller Qwen3 with the same vocabulary (vLLM requires it:
  ``SpeculativeConfig.verify_equal_vocab_size_if_draft_model``).
- ``ngram``: prompt lookup, no draft model.

On the NPU, vllm-ascend's fused attention serves at most 16 query tokens per decode request
(``AscendAttentionMetadataBuilder`` asserts ``1 + num_speculative_tokens <= 16``,
``vllm_ascend/attention/attention_v1.py``; its speculative-decoding guide asks for
``num_speculative_tokens + 1 <= 15``): the project holds the guide's bound.

Nothing here imports vLLM; the launcher checks a profile with it, and the model class checks the
engine's own speculative config with it (so a hand-written ``vllm serve`` fails as clearly).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .config import ConfigError, Qwen3Config

METHODS = ("eagle3", "eagle", "draft_model", "ngram")
DRAFT_METHODS = ("eagle3", "eagle", "draft_model")
# vllm-ascend's speculative-decoding guide: (num_speculative_tokens + 1) <= 15 on the NPU
NPU_MAX_SPECULATIVE_TOKENS = 14
# the EAGLE-3 draft classes vLLM 0.23 registers (vllm/model_executor/models/registry.py);
# EAGLEConfig renames an architecture X to Eagle3X unless it already says Eagle3
EAGLE3_ARCHS_023 = ("LlamaForCausalLM", "Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle3")
NGRAM_DEFAULTS = {"prompt_lookup_max": 4, "prompt_lookup_min": 2}


class SpeculativeError(ValueError):
    """A speculative setting that cannot work; the message says what was expected and found."""


@dataclass(frozen=True)
class Speculative:
    method: str
    num_speculative_tokens: int
    model: str | None = None           # the draft's directory (None for ngram)
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    family: str | None = None          # a draft model's Qwen3 family name (for the memory plan)

    @classmethod
    def from_dict(cls, d: dict, where: str = "speculative") -> "Speculative":
        if not isinstance(d, dict):
            raise SpeculativeError(f"{where} must be a mapping with method, num_speculative_tokens "
                                   f"and (for a draft) model; found {d!r}")
        unknown = sorted(set(d) - {"method", "model", "num_speculative_tokens",
                                   "prompt_lookup_max", "prompt_lookup_min", "family"})
        if unknown:
            raise SpeculativeError(f"{where}: unknown key(s) {unknown}; the keys are method, model, "
                                   f"num_speculative_tokens, prompt_lookup_max, prompt_lookup_min, "
                                   f"family")
        method = d.get("method")
        if method not in METHODS:
            raise SpeculativeError(f"{where}.method {method!r} is not one the project serves; use "
                                   f"one of {', '.join(METHODS)}")
        k = d.get("num_speculative_tokens")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SpeculativeError(f"{where}.num_speculative_tokens must be a positive integer "
                                   f"(tokens drafted per step, e.g. 3), found {k!r}")
        model = d.get("model")
        if method in DRAFT_METHODS and not model:
            raise SpeculativeError(f"{where}: method {method} needs the draft's directory in "
                                   f"{where}.model")
        if method == "ngram" and model:
            raise SpeculativeError(f"{where}: method ngram drafts from the prompt and takes no "
                                   f"model; remove {where}.model ({model!r})")
        look = {}
        for key in ("prompt_lookup_max", "prompt_lookup_min"):
            v = d.get(key)
            if v is None:
                continue
            if method != "ngram":
                raise SpeculativeError(f"{where}.{key} applies to method ngram only")
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpeculativeError(f"{where}.{key} must be a positive integer, found {v!r}")
            look[key] = v
        family = d.get("family")
        if family is not None:
            from .config import FAMILY
            if method != "draft_model" or family not in FAMILY:
                raise SpeculativeError(f"{where}.family names a draft model's Qwen3 family (one of "
                                       f"{', '.join(FAMILY)}) for method draft_model; found "
                                       f"{family!r} with method {method}")
        if method == "ngram":
            look = dict(NGRAM_DEFAULTS, **look)
            if look["prompt_lookup_min"] > look["prompt_lookup_max"]:
                raise SpeculativeError(f"{where}: prompt_lookup_min {look['prompt_lookup_min']} "
                                       f"exceeds prompt_lookup_max {look['prompt_lookup_max']}")
        return cls(method, k, model, family=family, **look)

    def to_vllm(self) -> dict:
        """vLLM's ``--speculative-config`` value."""
        out = {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens}
        if self.model:
            out["model"] = self.model
        for key in ("prompt_lookup_max", "prompt_lookup_min"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def with_model(self, model: str | None) -> "Speculative":
        return Speculative(self.method, self.num_speculative_tokens, model,
                           self.prompt_lookup_max, self.prompt_lookup_min, self.family)


def check_tokens(spec: Speculative, device: str, where: str = "speculative") -> None:
    if device == "npu" and spec.num_speculative_tokens > NPU_MAX_SPECULATIVE_TOKENS:
        raise SpeculativeError(
            f"{where}.num_speculative_tokens {spec.num_speculative_tokens} is too many for the NPU: "
            f"vllm-ascend's fused attention takes at most 16 query tokens per decode request and "
            f"its guide asks for num_speculative_tokens + 1 <= 15; use at most "
            f"{NPU_MAX_SPECULATIVE_TOKENS}")


def read_draft_config(path: str) -> dict:
    """The draft's config.json as a dict (a clear error when it is not there or not JSON)."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise SpeculativeError(f"draft model directory {path!r} does not exist; give the directory "
                               f"of the draft checkpoint (config.json and safetensors)")
    try:
        with open(cfg) as f:
            d = json.load(f)
    except OSError:
        raise SpeculativeError(f"the draft directory {path!r} has no readable config.json; give "
                               f"the directory of a draft checkpoint") from None
    except ValueError as exc:
        raise SpeculativeError(f"the draft's {cfg} is not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise SpeculativeError(f"the draft's {cfg} is not a JSON object")
    return d


def draft_view(draft: dict) -> dict:
    """A draft's config as vLLM reads it: a speculators-format checkpoint
    (``speculators_model_type``, e.g. RedHatAI's ``*-speculator.eagle3``) is its
    ``transformer_layer_config`` with the algorithm's fields on top and, for EAGLE-3, vLLM
    0.23's class (``vllm/transformers_utils/configs/speculators/algos.py``); others as they are."""
    kind = draft.get("speculators_model_type")
    if kind is None:
        return draft
    out = dict(draft.get("transformer_layer_config") or {})
    for key in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids"):
        if draft.get(key) is not None:
            out[key] = draft[key]
    if kind == "eagle3":
        out["architectures"] = ["Eagle3LlamaForCausalLM"]
    return out


def eagle3_layer_ids(draft: dict) -> list[int] | None:
    """The target layers an EAGLE-3 draft reads, as vLLM's runner looks for them: top-level
    ``eagle_aux_hidden_state_layer_ids``, else inside ``eagle_config`` (None: the target's
    default, vLLM's (2, n // 2, n - 3))."""
    ids = draft.get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        ids = (draft.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return None if ids is None else list(ids)


def default_eagle3_layers(num_layers: int) -> tuple[int, ...]:
    """vLLM's default EAGLE-3 layers (``SupportsEagle3.get_eagle3_default_aux_hidden_state_layers``)."""
    return (2, num_layers // 2, num_layers - 3)


def draft_problems(target: Qwen3Config, method: str, draft: dict, device: str = "cpu") -> list[str]:
    """What makes ``draft`` (a config.json dict) unfit to draft for ``target`` (empty: it fits)."""
    out = []
    draft = draft_view(draft)
    vocab = draft.get("vocab_size")
    if method in ("eagle3", "eagle"):
        hidden = draft.get("target_hidden_size") or draft.get("hidden_size")
        if hidden != target.hidden_size:
            out.append(f"the {method} draft reads hidden states of size {hidden} "
                       f"(target_hidden_size / hidden_size in its config.json) but the target's "
                       f"hidden size is {target.hidden_size}; use a draft trained for this model")
        if vocab is not None and vocab != target.vocab_size:
            out.append(f"the draft's vocab_size is {vocab} but the target's is {target.vocab_size}; "
                       f"use a draft trained for this model's tokenizer")
        dv = draft.get("draft_vocab_size")
        if dv is not None and not (isinstance(dv, int) and 0 < dv <= target.vocab_size):
            out.append(f"the draft's draft_vocab_size {dv!r} must be between 1 and the target's "
                       f"vocabulary ({target.vocab_size})")
    if method == "eagle3":
        ids = eagle3_layer_ids(draft)
        if ids is None:
            ids = list(default_eagle3_layers(target.num_layers))
            where = f"(none in its config.json: vLLM's default for {target.num_layers} layers)"
        else:
            where = "(eagle_aux_hidden_state_layer_ids)"
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i <= target.num_layers]
        if bad:
            out.append(f"the EAGLE-3 draft reads the target after layer(s) {ids} {where}, but the "
                       f"target has {target.num_layers} layers (ids 0..{target.num_layers}); "
                       f"use a draft trained for this model")
        elif len(set(ids)) != len(ids):
            out.append(f"the EAGLE-3 draft names layer ids {ids} {where} with repeats; vLLM reads "
                       f"each layer once, so the draft would get fewer hidden states than it "
                       f"was trained on; use a draft whose config names distinct ids")
        archs = draft.get("architectures") or []
        if device == "npu" and not set(archs) & set(EAGLE3_ARCHS_023):
            out.append(f"the EAGLE-3 draft's architectures {archs} have no EAGLE-3 class in vLLM "
                       f"0.23 (vllm-ascend's), which loads only Llama-architecture drafts "
                       f"({', '.join(EAGLE3_ARCHS_023)}); use such a draft")
    if method == "draft_model":
        try:
            d = Qwen3Config.from_dict(draft, name="draft")
        except ConfigError as exc:
            out.append(f"the draft model is not a Qwen3 checkpoint the project's class can serve "
                       f"({exc})")
        else:
            if d.vocab_size != target.vocab_size:
                out.append(f"the draft model's vocab_size is {d.vocab_size} but the target's is "
                           f"{target.vocab_size}; vLLM's draft_model method needs one vocabulary "
                           f"(use a smaller model of the same family)")
    return out


def check_draft(target: Qwen3Config, spec: Speculative, device: str = "cpu",
                draft: dict | None = None) -> None:
    """Raise SpeculativeError naming every problem of ``spec`` against ``target``; reads the
    draft's config.json from ``spec.model`` unless ``draft`` is given."""
    check_tokens(spec, device)
    if spec.method not in DRAFT_METHODS:
        return
    if draft is None:
        draft = read_draft_config(spec.model)
    problems = draft_problems(target, spec.method, draft, device)
    if problems:
        raise SpeculativeError(f"draft {spec.model!r} does not fit the target: " + "; ".join(problems))
