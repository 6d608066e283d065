"""The sharding plan for all eight family models, invalid combinations, and slice-only loading."""

from __future__ import annotations

import itertools

import pytest

from ascend_qwen3.cli import main
from ascend_qwen3.config import FAMILY, family_config
from ascend_qwen3.loader import load_model
from ascend_qwen3.model import Qwen3Graph
from ascend_qwen3.parallel import ParallelContext
from ascend_qwen3.parallel.plan import ShardingError, parameter_counts, shard_plan

TPS = [1, 2, 4, 8]
CASES = [(n, tp, ep) for n in FAMILY for tp in TPS for ep in ([False, True] if FAMILY[n][0].get("num_experts") else [False])]


def _ranges(a):
    return tuple(s.indices(n)[:2] for s, n in zip(a.src, a.shape))


def _area(rect):
    out = 1
    for lo, hi in rect:
        out *= hi - lo
    return out


def _overlap(r1, r2):
    return all(max(a[0], b[0]) < min(a[1], b[1]) for a, b in zip(r1, r2))


@pytest.mark.parametrize("name,tp,ep", CASES, ids=[f"{n}-tp{t}{'-ep' if e else ''}" for n, t, e in CASES])
def test_plan_covers_every_tensor_exactly(name, tp, ep):
    cfg = family_config(name)
    plans = shard_plan(cfg, tp, ep)
    by_tensor: dict[str, list] = {}
    for plan in plans:
        for a in plan:
            by_tensor.setdefault(a.name, []).append(a)
    total, _ = parameter_counts(cfg)
    hq, hkv = cfg.num_heads // tp, max(1, cfg.num_kv_heads // tp)
    kv_copies = max(1, tp // cfg.num_kv_heads)
    rank_sum = 0
    expected_sum = 0
    for tname, assigns in by_tensor.items():
        shape = assigns[0].shape
        numel = _area([(0, n) for n in shape])
        groups: dict[tuple, int] = {}
        for a in assigns:
            groups[_ranges(a)] = groups.get(_ranges(a), 0) + 1
        rects = list(groups)
        for r1, r2 in itertools.combinations(rects, 2):
            assert not _overlap(r1, r2), f"{tname}: two ranks read overlapping, different slices"
        assert sum(map(_area, rects)) == numel, f"{tname}: slices do not cover the tensor"
        copies = set(groups.values())
        assert len(copies) == 1
        c = copies.pop()
        # replication is only for tensors every rank needs whole, and for KV heads beyond tp
        if ".k_proj." in tname or ".v_proj." in tname:
            assert c == kv_copies
        elif len(rects) == 1 and c == tp:
            pass  # replicated (norms, router, or tp == 1)
        else:
            assert c == 1, f"{tname}: {c} copies"
        rank_sum += sum(_area(_ranges(a)) for a in assigns)
        expected_sum += numel * c
    assert rank_sum == expected_sum
    # per-rank element counts add up to the whole model plus the replicas
    assert sum(sum(a.numel for a in p) for p in plans) == rank_sum >= total
    # and the model built for a rank has exactly the parameters its plan fills (vocab padding aside)
    ctx = ParallelContext(tp - 1, tp, ep)
    model = Qwen3Graph(cfg, ctx, device="meta")
    params = dict(model.named_parameters())
    filled = {}
    for a in plans[tp - 1]:
        filled[a.param] = filled.get(a.param, 0) + a.numel
    assert set(filled) == set(params)
    for pname, p in params.items():
        if pname in ("embed_tokens.weight", "lm_head.weight"):
            assert 0 < filled[pname] <= p.numel()
        else:
            assert filled[pname] == p.numel(), pname
    assert model.layers[0].self_attn.num_heads == hq and model.layers[0].self_attn.num_kv_heads == hkv


@pytest.mark.parametrize("name,tp,ep,message", [
    ("Qwen3-14B", 16, False, r"tp=16 does not divide 40 query heads of Qwen3-14B; use tp in \{1, 2, 4, 8\}"),
    ("Qwen3-14B", 5, False, r"tp=5 neither divides nor is a multiple of 8 KV heads.*\{1, 2, 4, 8\}"),
    ("Qwen3-30B-A3B", 256, True, r"expert parallel size 256 exceeds the 128 experts"),
    ("Qwen3-30B-A3B", 3, True, r"tp=3 does not divide 32 query heads"),
    ("Qwen3-8B", 2, True, r"dense model; drop --ep"),
])
def test_invalid_combinations_name_valid_choices(name, tp, ep, message):
    with pytest.raises(ShardingError, match=message):
        shard_plan(family_config(name), tp, ep)


def test_invalid_tp_fails_before_reading_weights(checkpoint, tmp_path, monkeypatch):
    import ascend_qwen3.loader as loader
    path = checkpoint("dense_yarn")

    def no_read(*a, **k):
        raise AssertionError("weights were read")
    monkeypatch.setattr(loader, "safe_open", no_read)
    monkeypatch.setattr(loader, "checkpoint_files", no_read)
    with pytest.raises(ShardingError, match=r"tp=3 does not divide 8 query heads.*use tp in \{1, 2, 4, 8\}"):
        load_model(path, ctx=ParallelContext(0, 3))


def test_rank_reads_only_its_slices(checkpoint):
    path = checkpoint("dense_yarn")
    from ascend_qwen3.config import Qwen3Config
    from ascend_qwen3.loader import load_weights
    cfg = Qwen3Config.from_model_dir(path)
    full = None
    for tp in (1, 4):
        read = []
        for rank in range(tp):
            ctx = ParallelContext(rank, tp)
            model = Qwen3Graph(cfg, ctx)
            read.append(load_weights(model, path, cfg, ctx)["bytes"])
        if tp == 1:
            full = read[0]
        else:
            # about a quarter each: only norms and the replicated KV heads are read twice
            for b in read:
                assert 0.24 * full < b < 0.34 * full, (b / full)


def test_plan_command(capsys):
    assert main(["plan", "--model", "Qwen3-32B", "--tp", "4"]) == 0
    out = capsys.readouterr().out
    assert "tp=4" in out and "16 query heads, 2 KV head(s)" in out and " sum " in out
    assert main(["plan", "--model", "Qwen3-30B-A3B", "--tp", "8", "--ep"]) == 0
    out = capsys.readouterr().out
    assert "16 experts x FFN 768 (whole experts)" in out and "replicated on 2 ranks" in out
    assert main(["plan", "--model", "Qwen3-14B", "--tp", "16"]) == 2
    assert "use tp in {1, 2, 4, 8}" in capsys.readouterr().err
