"""The benchmark code's arithmetic and rendering (no timing is asserted anywhere: speed figures
live in docs/BENCHMARKS.md), and the standalone cache's vectorised step preparation."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest

from ascend_qwen3.config import family_config
from ascend_qwen3.deploy.planner import weight_bytes_per_rank
from ascend_qwen3.runner.kv_cache import PagedKVCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import decode  # noqa: E402
import render  # noqa: E402
import roofline  # noqa: E402
import run  # noqa: E402


@pytest.mark.parametrize("name", ["Qwen3-0.6B", "Qwen3-8B", "Qwen3-32B"])
def test_dense_bytes_per_token_are_the_weights(name):
    """A dense model's batch-1 decode reads every weight once (the embedding matrix once, as
    the lm_head, tied or not): the roofline's count matches the planner's bytes from the
    sharding plan (which count the embedding twice when it is not tied, and norms alike)."""
    cfg = family_config(name)
    b = roofline.bytes_per_token(cfg, weight_bytes=2.0, context=0)
    stored = weight_bytes_per_rank(cfg, 1, False, "bf16")[0]
    embedding = cfg.vocab_size * cfg.hidden_size * 2
    read_twice = 0 if cfg.tie_word_embeddings else embedding
    assert b["kv_cache"] == 0
    assert b["weights"] == pytest.approx(stored - read_twice + cfg.hidden_size * 2, rel=1e-3)


def test_moe_bytes_per_token_count_the_routed_experts_only():
    cfg = family_config("Qwen3-30B-A3B")
    b = roofline.bytes_per_token(cfg, weight_bytes=2.0)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    unrouted = cfg.num_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    embedding = cfg.vocab_size * cfg.hidden_size * 2                 # not tied: read as lm_head
    stored = weight_bytes_per_rank(cfg, 1, False, "bf16")[0]
    assert b["weights"] == pytest.approx(stored - unrouted - embedding + cfg.hidden_size * 2,
                                         rel=1e-3)
    # TP and int8 divide the linear bytes; the KV cache grows with the context
    assert roofline.bytes_per_token(cfg, weight_bytes=1.0)["weights"] < b["weights"]
    assert roofline.bytes_per_token(cfg, weight_bytes=2.0, tp=4)["weights"] < b["weights"] / 2
    assert roofline.bytes_per_token(cfg, context=1000)["kv_cache"] == \
        cfg.num_layers * 2 * cfg.kv_size * 1000 * 2


def test_decode_speed_is_measured_without_prefill():
    """tokens/s = batch x (new - 1) / (t(new) - t(1)): a fake engine whose prefill costs 1 s
    and each token 0.1 s decodes at 10 tokens/s per sequence, whatever its prefill."""
    clock = {"t": 0.0}

    def fake(n):
        clock["t"] += 1.0 + 0.1 * n

    real = decode.time.perf_counter
    decode.time.perf_counter = lambda: clock["t"]
    try:
        out = decode._measure(fake, batch=4, prompt=100, new=11, repeats=3)
    finally:
        decode.time.perf_counter = real
    assert out["decode_tokens_per_s"] == pytest.approx(40.0)
    assert out["prefill_tokens_per_s"] == pytest.approx(4 * 100 / 1.1)


def _row(engine, ck, batch, tps):
    return {"engine": engine, "checkpoint": ck, "batch": batch, "decode_tokens_per_s": tps,
            "prefill_tokens_per_s": 10 * tps, "peak_rss_gib": 1.5, "runs": [tps] * 3,
            "prompt": 128, "new": 64}


def test_render_writes_tables_ratios_and_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "DOC", str(tmp_path / "BENCHMARKS.md"))
    monkeypatch.setattr(render, "FIG_DIR", str(tmp_path / "bench"))
    machine = {"cpu": "Test CPU", "cores": 2, "date": "2026-11-30 00:00 UTC", "commit": "abc"}
    results = {
        "roofline": {"bandwidth": {"read_GBps": 40.0, "read_GBps_best": 41.0, "bytes": 2**31,
                                   "repeats": 7, "threads": 2},
                     "models": {"dense bf16": {"weights": 1.2e9, "kv_cache": 0.0, "total": 1.2e9,
                                               "tokens_per_s": 33.3}},
                     "machine": machine, "command": "make bench"},
        "decode": {"results": [_row(e, ck, b, {"vllm-builtin": 40.0, "vllm-ours": 30.0}.get(e, 10.0))
                               for ck in ("dense", "moe") for b in (1, 8) for e in render.ENGINES],
                   "machine": machine, "command": "make bench BENCH_ARGS='--only decode'"},
    }
    for r in results["decode"]["results"]:
        if r["batch"] == 1:                  # batch 8: rows without a bandwidth of their own
            r["read_GBps"] = 30.0 if r["engine"] == "vllm-ours" else 40.0
    render.write(results)
    doc = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| dense | 1 | 10.0 | 10.0 | 40.0 | 30.0 | **0.75** |" in doc
    # share of the roofline, each engine against the bandwidth measured before it ran (the
    # section's 40 GB/s for rows from before bandwidths were measured per engine)
    assert "| dense | 1 | 40.0 | 33.3 | 30% | 30% | 120% | 120% |" in doc
    assert "| dense | 8 | 40.0 | 266.7 | 4% | 4% | 15% | 11% |" in doc
    assert "make bench BENCH_ARGS='--only decode'" in doc and "Test CPU" in doc
    assert (tmp_path / "bench" / "decode.png").stat().st_size > 1000
    assert "## On the NPU" in doc and "qwen3-32b-w8a8" in doc      # the per-profile bound
    json.dumps(results)                                            # results stay plain JSON


def test_cache_prepare_gives_each_token_its_position_and_slot():
    """The vectorised step preparation: token j of a request with `old` cached tokens sits at
    position old + j, in slot table[pos // BS] * BS + pos % BS."""
    cfg = family_config("Qwen3-0.6B")
    cache = PagedKVCache(dataclasses.replace(cfg, num_layers=1), num_blocks=16, block_size=4)
    cache.prepare([(7, 6), (3, 1)])
    positions, meta = cache.prepare([(3, 2), (9, 5), (7, 1)])
    want_pos, want_slots = [], []
    for seq, n in ((3, 2), (9, 5), (7, 1)):
        length = cache.lens[seq]
        for p in range(length - n, length):
            want_pos.append(p)
            want_slots.append(cache.tables[seq][p // 4] * 4 + p % 4)
    assert positions.tolist() == want_pos and meta.slot_mapping.tolist() == want_slots
    assert meta.query_start_loc_host == [0, 2, 7, 8] and meta.seq_lens_host == [3, 5, 7]
    assert meta.block_tables[1, :2].tolist() == cache.tables[9]


def test_rounds_interleave_the_vllm_engines_and_alternate_their_order():
    items = [("d", "dense", "transformers"), ("d", "dense", "vllm-builtin"), ("d", "dense", "vllm-ours"),
             ("w", "w8a8", "vllm-ours")]
    order = run._rounds(items, 3)
    assert order == items + [items[3], items[2], items[1]] + items[1:]
    assert run._rounds(items, 1) == items


def _spec_row(batch, method, engine, tps, best, al=None, same=8):
    return {"batch": batch, "method": method, "engine": engine, "tokens_per_s": tps,
            "best_round": best, "runs": [tps] * 4, "round_medians": [tps, best],
            "acceptance_length": al, "drafts": 10 if al else 0, "accepted": 15 if al else 0,
            "tokens": 500, "prompts": 8, "same_as_none": same}


def test_render_speculative_section_has_ratio_speed_ups_and_best_rounds(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "DOC", str(tmp_path / "BENCHMARKS.md"))
    monkeypatch.setattr(render, "FIG_DIR", str(tmp_path / "bench"))
    machine = {"cpu": "Test CPU", "cores": 2, "date": "2026-12-07 00:00 UTC", "commit": "abc"}
    tps = {"none": (100.0, 50.0), "eagle3": (250.0, 100.0), "draft_model": (150.0, 60.0),
           "ngram": (120.0, 40.0)}           # (ours, built-in) at batch 1; batch 8: 4x
    rows = []
    for b in (1, 8):
        for m, (ours, builtin) in tps.items():
            al = None if m == "none" else 2.5
            rows.append(_spec_row(b, m, "vllm-ours", ours * (1 + 3 * (b == 8)), ours + 10, al,
                                  same=7 if (b, m) == (8, "ngram") else 8))
            rows.append(_spec_row(b, m, "vllm-builtin", builtin * (1 + 3 * (b == 8)), builtin + 5,
                                  al))
    results = {"speculative": {"results": rows, "rounds": 2, "repeats": 2, "new": 64, "k": 3,
                               "draft": "random", "draft_layers": 2,
                               "prompt_kinds": ["addition", "topic question", "weather question"] * 2
                               + ["addition", "topic question"],
                               "machine": machine,
                               "command": "make bench BENCH_ARGS='--quick --only speculative'"}}
    render.write(results)
    doc = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Speculative decoding" in doc
    assert "| batch | method | ours tokens/s | ours best round | built-in tokens/s |" in doc
    # ratio ours / built-in, then each class's speed-up over its own `none`, acceptance lengths
    assert "| 1 | `none` | 100.0 | 110.0 | 50.0 | 55.0 | **2.00** | 1.00 | 1.00 | – | – |" in doc
    assert "| 1 | `eagle3` | 250.0 | 260.0 | 100.0 | 105.0 | **2.50** | 2.50 | 2.00 | 2.50 | 2.50 |" in doc
    assert "| 8 | `ngram` | 480.0 | 130.0 | 160.0 | 45.0 | **3.00** | 1.20 | 0.80 | 2.50 | 2.50 |" in doc
    assert "3 additions, 3 topic questions, 2 weather questions" in doc
    assert "random draft" in doc and "`ngram` on ours at batch 8: 7 of 8" in doc
    assert "make bench BENCH_ARGS='--quick --only speculative'" in doc and "Test CPU" in doc
    assert "speculative" in run.SECTIONS


def test_speculative_mixes_the_prompt_kinds_in_turn():
    import speculative

    groups = [["a1", "a2", "a3", "a4"], ["t1", "t2"], ["w1", "w2", "w3"]]
    assert speculative.mixed(groups, 8) == ["a1", "t1", "w1", "a2", "t2", "w2", "a3", "w3"]
    assert speculative.mixed(groups, 2) == ["a1", "t1"]
    with pytest.raises(ValueError):
        speculative.mixed(groups, 10)


def test_speculative_batch_one_is_total_tokens_over_total_time():
    """One request at a time: prompt A answers 10 tokens at 10 and 20 tokens/s (1 s, 0.5 s),
    prompt B 30 tokens at 30 and 10 tokens/s (1 s, 3 s): runs of 40/2 and 40/3.5 tokens/s."""
    import speculative

    parts = [{"runs": [10.0, 20.0], "token_ids": [[1] * 10], "drafts": 4, "accepted": 6},
             {"runs": [30.0, 10.0], "token_ids": [[2] * 30], "drafts": 6, "accepted": 3}]
    out = speculative.sequential(parts)
    assert out["runs"] == pytest.approx([20.0, 40 / 3.5])
    assert out["tokens_per_s"] == pytest.approx((20.0 + 40 / 3.5) / 2)
    assert out["acceptance_length"] == pytest.approx(1 + 9 / 10)
    assert out["token_ids"] == [[1] * 10, [2] * 30]
    assert speculative.sequential([dict(parts[0], drafts=0, accepted=0)])["acceptance_length"] is None


def test_speculative_merge_gives_medians_best_rounds_and_same_answers():
    import speculative

    def proc(method, engine, runs, ids, drafts=0, accepted=0):
        return {"method": method, "engine": engine,
                "batches": {"8": {"runs": runs, "token_ids": ids, "drafts": drafts,
                                  "accepted": accepted}}}

    a, b = [1, 2, 3], [4, 5]
    rows = speculative.merge([
        proc("none", "vllm-ours", [10.0, 12.0], [a, b]),
        proc("eagle3", "vllm-ours", [30.0, 20.0], [a, [4, 6]], drafts=10, accepted=12),
        proc("eagle3", "vllm-ours", [14.0, 16.0], [a, [4, 6]], drafts=10, accepted=8),
        proc("eagle3", "vllm-builtin", [9.0, 11.0], [a, b], drafts=20, accepted=20),
    ])
    by = {(r["method"], r["engine"]): r for r in rows}
    e = by[("eagle3", "vllm-ours")]
    assert e["tokens_per_s"] == pytest.approx(18.0)          # median of all four runs
    assert e["round_medians"] == [25.0, 15.0] and e["best_round"] == 25.0
    assert e["acceptance_length"] == pytest.approx(2.0)      # 1 + 20 / 20
    assert e["same_as_none"] == 1 and e["same_as_builtin"] == 1 and e["prompts"] == 2
    assert by[("none", "vllm-ours")]["acceptance_length"] is None
    assert "same_as_none" not in by[("eagle3", "vllm-builtin")]   # no built-in `none` here


def test_speculative_configs():
    import speculative

    paths = {"eagle3": "/d/eagle3", "cut": "/d/cut"}
    assert speculative.speculative_config("none", paths) is None
    assert speculative.speculative_config("eagle3", paths) == {
        "method": "eagle3", "model": "/d/eagle3", "num_speculative_tokens": 3}
    assert speculative.speculative_config("draft_model", paths)["model"] == "/d/cut"
    assert speculative.speculative_config("ngram", paths) == {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2}
    with pytest.raises(ValueError):
        speculative.speculative_config("medusa", paths)


def test_render_lora_section_has_ratios_costs_and_same_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "DOC", str(tmp_path / "BENCHMARKS.md"))
    monkeypatch.setattr(render, "FIG_DIR", str(tmp_path / "bench"))
    machine = {"cpu": "Test CPU", "cores": 2, "date": "2026-12-07 00:00 UTC", "commit": "abc"}
    tps = {"none": (100.0, 80.0), "1 adapter": (90.0, 60.0), "4 adapters": (50.0, 40.0)}
    rows = []
    for b in (1, 8):
        for c, (ours, builtin) in tps.items():
            rows.append({"batch": b, "config": c, "engine": "vllm-ours", "tokens_per_s": ours * b,
                         "best_round": ours * b + 1, "prompts": 8, "same_as_builtin": 8 - (c == "4 adapters")})
            rows.append({"batch": b, "config": c, "engine": "vllm-builtin",
                         "tokens_per_s": builtin * b, "best_round": builtin * b + 1, "prompts": 8,
                         "same_as_builtin": 8})
    results = {"lora": {"results": rows, "rounds": 2, "repeats": 2, "new": 64, "rank": 8,
                        "first_adapter": "trained", "prompt_kinds": ["addition"] * 8,
                        "machine": machine, "command": "make bench BENCH_ARGS='--only lora'"}}
    render.write(results)
    doc = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## LoRA adapters" in doc and "trained adapter" in doc and "rank 8" in doc
    # ours / built-in, then each class against its own engine without LoRA
    assert "| 1 | `none` | 100.0 | 101.0 | 80.0 | 81.0 | **1.25** | 1.00 | 1.00 |" in doc
    assert "| 8 | `4 adapters` | 400.0 | 401.0 | 320.0 | 321.0 | **1.25** | 0.50 | 0.50 |" in doc
    assert "`4 adapters` batch 8: 7 of 8" in doc
    assert "lora" in run.SECTIONS


def test_lora_bench_merge_and_random_adapter(tmp_path):
    import lora

    def proc(config, engine, runs, ids):
        return {"config": config, "engine": engine, "batches": {"8": {"runs": runs, "token_ids": ids}}}

    rows = lora.merge([proc("1 adapter", "vllm-ours", [10.0, 12.0], [[1], [2]]),
                       proc("1 adapter", "vllm-ours", [20.0, 22.0], [[1], [2]]),
                       proc("1 adapter", "vllm-builtin", [9.0, 9.0], [[1], [3]])])
    by = {r["engine"]: r for r in rows}
    assert by["vllm-ours"]["tokens_per_s"] == pytest.approx(16.0)
    assert by["vllm-ours"]["round_medians"] == [11.0, 21.0] and by["vllm-ours"]["best_round"] == 21.0
    assert by["vllm-ours"]["same_as_builtin"] == 1
    # a PEFT adapter with every projection of every layer, in the checkpoint's shapes
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "intermediate_size": 96, "num_hidden_layers": 2}))
    path = lora.random_adapter(str(model), str(tmp_path / "a"), rank=8, seed=1)
    from safetensors.torch import load_file
    t = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert len(t) == 2 * 7 * 2
    assert t["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (64, 8)
    assert t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (8, 96)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 8
