"""Pipeline parallel without vLLM: the stage partition (vLLM's rule), stage graphs that hold and
read only their share, and stage graphs chained on the standalone KV cache giving the whole
graph's logits (fp32)."""

from __future__ import annotations

import pytest
import torch

from ascend_qwen3.config import Qwen3Config
from ascend_qwen3.loader import load_model, load_plan
from ascend_qwen3.parallel import SINGLE
from ascend_qwen3.parallel.launch import run_parallel
from ascend_qwen3.parallel.plan import (PP_PARTITION_ENV, ShardingError, check_pipeline,
                                        stage_layers, stage_sizes)
from ascend_qwen3.runner.kv_cache import PagedKVCache

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], list(range(60, 93))]
DECODE_STEPS = 3


def _run(stages, cfg, ctx) -> list[torch.Tensor]:
    """Logits of a prefill of PROMPTS and DECODE_STEPS greedy decode steps, the stages chained
    (each stage on its own layers' caches)."""
    cache = PagedKVCache.for_tokens(cfg, 256, block_size=16, ctx=ctx)
    out, ids = [], None
    with torch.inference_mode():
        for step in range(DECODE_STEPS + 1):
            if step == 0:
                steps = [(s, len(p)) for s, p in enumerate(PROMPTS)]
                tokens = torch.tensor([t for p in PROMPTS for t in p])
            else:
                steps = [(s, 1) for s in range(len(PROMPTS))]
                tokens = ids
            positions, meta = cache.prepare(steps)
            x = None
            for g in stages:
                x = g(tokens, positions, meta, cache.caches[g.start_layer:g.end_layer],
                      intermediate=x)
            ends = torch.tensor([n for _, n in steps]).cumsum(0) - 1
            logits = stages[-1].compute_logits(x[ends])
            out.append(logits)
            ids = logits.argmax(-1)
    return out


def _stages(path, ctx, sizes):
    cfg = Qwen3Config.from_model_dir(path)
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return [load_model(path, dtype="float32", ctx=ctx, layers=b)[0] for b in bounds], cfg


def _job(ctx, path, partitions):
    """Every rank: the whole graph's logits and, per partition, the chained stages'."""
    whole, cfg = load_model(path, dtype="float32", ctx=ctx)
    ref = _run([whole], cfg, ctx)
    return ref, [_run(_stages(path, ctx, sizes)[0], cfg, ctx) for sizes in partitions]


CASES = [  # checkpoint, overrides, partitions (layers per stage)
    ("dense_tied", {}, [[1, 2], [2, 1], [1, 1, 1]]),          # tied: the last stage holds the embedding
    ("dense_yarn", {}, [[1, 1]]),                             # untied head on the last stage
    ("moe_norm", {"num_hidden_layers": 4}, [[2, 2], [1, 3]]),  # MoE and the dense layer 1
]


@pytest.mark.parametrize("name,overrides,partitions", CASES, ids=[c[0] for c in CASES])
def test_chained_stages_equal_the_whole_graph(checkpoint, name, overrides, partitions):
    path = checkpoint(name, **overrides)
    ref, runs = _job(SINGLE, path, partitions)
    for sizes, run in zip(partitions, runs):
        for step, (a, b) in enumerate(zip(run, ref)):
            # the same ops on the same tensors in the same order: identical in fp32
            assert torch.equal(a, b), f"{name} stages {sizes} step {step}: max diff {(a - b).abs().max()}"


def test_chained_stages_under_tensor_parallel(checkpoint):
    """TP 2 x PP 2: each rank's two stages, chained, give its whole TP graph's logits."""
    path = checkpoint("moe_norm", num_hidden_layers=4)
    for rank, (ref, runs) in enumerate(run_parallel(_job, 2, path, [[2, 2]])):
        for a, b in zip(runs[0], ref):
            assert torch.equal(a, b), f"tp rank {rank}: max diff {(a - b).abs().max()}"


@pytest.mark.parametrize("name,overrides,stage,holds", [
    ("dense_tied", {}, (0, 1), {"embed"}),
    ("dense_tied", {}, (1, 2), set()),
    ("dense_tied", {}, (2, 3), {"embed", "norm"}),             # tied head: the embedding's weight
    ("dense_yarn", {}, (1, 2), {"norm", "head"}),
])
def test_stage_holds_and_reads_only_its_share(checkpoint, name, overrides, stage, holds):
    path = checkpoint(name, **overrides)
    model, cfg = load_model(path, dtype="float32", layers=stage)
    params = {n for n, _ in model.named_parameters()}
    layers = {int(n.split(".")[1]) for n in params if n.startswith("layers.")}
    assert layers == set(range(*stage))
    assert ("embed_tokens.weight" in params) == ("embed" in holds)
    assert ("norm.weight" in params) == ("norm" in holds)
    assert ("lm_head.weight" in {n for n, _ in model.named_buffers()}) == (
        stage[1] == cfg.num_layers)
    read = {a.name for a in load_plan(cfg, stage=stage)}
    assert {n for n in read if not n.startswith("model.layers.")} == {
        {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
         "head": "lm_head.weight"}[h] for h in holds}
    assert {int(n.split(".")[2]) for n in read if n.startswith("model.layers.")} == set(range(*stage))
    if stage[1] < cfg.num_layers:
        with pytest.raises(RuntimeError, match="last pipeline stage"):
            model.compute_logits(torch.zeros(1, cfg.hidden_size))
    if stage[0] > 0:
        with pytest.raises(ValueError, match="intermediate="):
            model(torch.tensor([1]), torch.tensor([0]))
        with pytest.raises(ValueError, match="whole model in one pipeline stage"):
            model.set_aux_layers([1])


# (layers, pp): even splits, remainders of 1 and 2 (vLLM gives them to the stages before the
# last), and the Qwen3 family's layer counts
PAIRS = [(3, 2), (4, 2), (5, 3), (7, 4), (28, 4), (36, 8), (40, 3), (48, 5), (94, 8), (64, 1)]


@pytest.mark.parametrize("layers,pp", PAIRS)
def test_stage_layers_agree_with_vllm(layers, pp, monkeypatch):
    pytest.importorskip("vllm")
    from vllm.distributed.utils import get_pp_indices

    monkeypatch.delenv(PP_PARTITION_ENV, raising=False)
    ours = [stage_layers(layers, r, pp) for r in range(pp)]
    assert ours == [get_pp_indices(layers, r, pp) for r in range(pp)]
    assert ours[0][0] == 0 and ours[-1][1] == layers
    assert all(a[1] == b[0] for a, b in zip(ours, ours[1:]))


@pytest.mark.parametrize("layers,partition", [(28, "10,18"), (36, "4,12,12,8"), (5, "1,1,3")])
def test_explicit_partition_agrees_with_vllm(layers, partition, monkeypatch):
    pytest.importorskip("vllm")
    import vllm.envs as envs
    from vllm.distributed.utils import get_pp_indices

    monkeypatch.setenv(PP_PARTITION_ENV, partition)
    if hasattr(envs, "disable_envs_cache"):        # vLLM may cache its environment reads
        envs.disable_envs_cache()
    pp = partition.count(",") + 1
    ours = [stage_layers(layers, r, pp) for r in range(pp)]
    assert ours == [get_pp_indices(layers, r, pp) for r in range(pp)]
    assert [e - s for s, e in ours] == [int(x) for x in partition.split(",")]


def _cfg(layers: int) -> Qwen3Config:
    from tests.checkpoints import SPECS
    d = dict(SPECS["dense_tied"], num_hidden_layers=layers, architectures=["Qwen3ForCausalLM"])
    return Qwen3Config.from_dict(d, name="tiny")


@pytest.mark.parametrize("layers,pp,partition,message", [
    (28, 3, None, r"pipeline-parallel size 3 does not divide the 28 decoder layers of tiny; use pp "
                  r"in \{1, 2, 4, 7, 14, 28\}, or set VLLM_PP_LAYER_PARTITION to 3 layer counts "
                  r"summing to 28 \(e.g. 9,10,9\)"),
    (3, 4, None, r"exceeds the 3 decoder layers of tiny; use pp in \{1, 3\}"),
    (28, 3, "10,10,10", r"must give 3 layer counts .* summing to the model's 28 layers; found 3 "
                        r"count\(s\) summing to 30"),
    (28, 2, "28", r"found 1 count"),
    (28, 2, "14,x", r"not a comma-separated list of layer counts; write e.g. "
                    r"VLLM_PP_LAYER_PARTITION=14,14"),
    (28, 0, None, r"must be >= 1"),
])
def test_bad_pipeline_sizes_name_the_valid_ones(layers, pp, partition, message):
    with pytest.raises(ShardingError, match=message):
        check_pipeline(_cfg(layers), pp, partition)


def test_uneven_split_allowed_with_an_explicit_partition():
    check_pipeline(_cfg(28), 3, "9,10,9")
    check_pipeline(_cfg(28), 4, None)
    assert stage_sizes(28, 3, "9,10,9") == [9, 10, 9]
    assert stage_sizes(28, 3, None) == [9, 10, 9]      # vLLM's own uneven rule


@pytest.mark.parametrize("method", ["eagle3", "ngram"])
def test_engine_refuses_speculation_with_pipeline_parallel(method):
    """The model class's start-up check on the engine's config (``LLM(...)`` users), before any
    weight is read: speculative decoding with pipeline parallel is refused, naming the way out."""
    from types import SimpleNamespace as NS

    from ascend_qwen3.vllm_plugin.model import check_speculative

    config = NS(speculative_config=NS(method=method, num_speculative_tokens=2,
                                      draft_model_config=None),
                model_config=NS(runner="generate"),
                parallel_config=NS(pipeline_parallel_size=2))
    with pytest.raises(ValueError, match=rf"speculative decoding \({method}\) with pipeline "
                                         r"parallel \(--pipeline-parallel-size 2\) is not "
                                         r"supported .* --pipeline-parallel-size 1"):
        check_speculative(config, _cfg(4))
