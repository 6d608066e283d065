"""docs/BENCHMARKS.md and its figures (docs/bench/*.png), from docs/bench/results.json.

Called by ``bench/run.py`` after every run (``bench/run.py --render`` alone re-renders). Each
table and figure names the command that measured it and the machine it ran on.
"""

from __future__ import annotations

import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")
FIG_DIR = os.path.join(ROOT, "docs", "bench")
ENGINES = ("transformers", "standalone", "vllm-builtin", "vllm-ours")

# NPU decode roofline: Huawei publishes no HBM bandwidth for the Atlas 800I A2's NPUs (Ascend
# 910B family); third-party reports range from about 1.2 to 2 TB/s. The table below is computed
# for that range and must be replaced by a measurement (bench/roofline.py --device npu) once
# it has run on the hardware.
NPU_HBM_TBPS = (1.2, 1.6, 2.0)


def _f(x, digits=1):
    return "–" if x is None else f"{x:,.{digits}f}"


def _provenance(section: dict) -> str:
    m = section.get("machine", {})
    return (f"Measured {m.get('date', '?')} at commit `{m.get('commit', '?')}` on {m.get('cpu', '?')} "
            f"({m.get('cores', '?')} cores, {m.get('memory_gib', '?')} GiB, PyTorch "
            f"{m.get('torch', '?')}, kernels {m.get('cpu_capability', '?')}); command: "
            f"`{section.get('command', 'make bench')}`.")


def _by(rows, *keys):
    out = {}
    for r in rows:
        out[tuple(r[k] for k in keys)] = r
    return out


def _plot_decode(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoints = sorted({r["checkpoint"] for r in rows}, key=lambda c: (len(c), c))
    batches = sorted({r["batch"] for r in rows})
    engines = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    idx = _by(rows, "checkpoint", "engine", "batch")
    fig, axes = plt.subplots(1, len(checkpoints), figsize=(5.5 * len(checkpoints), 4), squeeze=False)
    width = 0.8 / len(engines)
    for ax, ck in zip(axes[0], checkpoints):
        for i, e in enumerate(engines):
            ys = [idx.get((ck, e, b), {}).get("decode_tokens_per_s", 0) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], ys, width, label=e)
        ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(batches))])
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{title}: {ck}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_serving(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = sorted({r["concurrency"] for r in rows})
    idx = _by(rows, "engine", "concurrency")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        for i, e in enumerate(("ours", "builtin")):
            for k, p in enumerate(("p50", "p99")):
                ys = [idx.get((e, c), {}).get(f"{p}_{metric}_ms", 0) for c in conc]
                ax.bar([j + (2 * i + k) * 0.2 for j in range(len(conc))], ys, 0.2,
                       label=f"{e} {p}")
        ax.set_xticks([j + 0.3 for j in range(len(conc))])
        ax.set_xticklabels([f"concurrency {c}" for c in conc])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _figure(lines, figures, name, caption, section) -> None:
    """A figure of docs/bench/ under its table, with the command and machine that made it."""
    figures.append(name)
    m = section.get("machine", {})
    lines += ["", f"![{caption}](bench/{name})", "",
              f"Figure: {caption}. Command: `{section.get('command', 'make bench')}`, on "
              f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), {m.get('date', '?')}.", ""]


def _roofline(results) -> tuple[float | None, dict]:
    sec = results.get("roofline")
    if not sec:
        return None, {}
    return sec["bandwidth"]["read_GBps"], sec["models"]


def _engine_table(idx, batches, key, digits=1, ratio=None) -> list[str]:
    """A markdown table of ``key`` for every engine, per checkpoint and batch; with ``ratio``
    (the markup around it), a last column ours / built-in."""
    head = "| checkpoint | batch | transformers | standalone | vLLM built-in | ours in vLLM |"
    out = [head + (" ours / built-in |" if ratio is not None else ""),
           "|---|---|---|---|---|---|" + ("---|" if ratio is not None else "")]
    for ck in ("dense", "moe"):
        for b in batches:
            v = {e: idx.get((ck, e, b), {}).get(key) for e in ENGINES}
            line = f"| {ck} | {b} | " + " | ".join(_f(v[e], digits) for e in ENGINES) + " |"
            if ratio is not None:
                r = v["vllm-ours"] / v["vllm-builtin"] if v["vllm-ours"] and v["vllm-builtin"] else None
                line += f" {ratio}{_f(r, 2)}{ratio} |"
            out.append(line)
    return out


def _decode_section(results, lines, figures) -> None:
    sec = results.get("decode")
    if not sec:
        return
    rows = sec["results"]
    _, roof = _roofline(results)
    idx = _by(rows, "checkpoint", "engine", "batch")
    lines += ["## Decode and prefill, four engines side by side", "",
              "Random-weight bf16 checkpoints written by `bench/checkpoints.py`: `dense` is the "
              "Qwen3-0.6B shape (28 layers, hidden 1024, 16 / 8 heads, FFN 3072, tied 151,936 "
              "vocabulary); `moe` has Qwen3-30B-A3B's ratios at a quarter of its width (4 layers, "
              "hidden 1024, 16 / 2 heads, 128 experts of FFN 384, top-8). Prompts of "
              f"{rows[0]['prompt']} random tokens, {rows[0]['new']} new tokens (greedy, end of "
              "sequence ignored); decode tokens/s is batch x (new - 1) / (time(new) - time(1)), "
              "so prefill drops out; prefill tokens/s is batch x prompt / time(1). Each engine "
              f"runs in a process of its own; vLLM's two engines in {sec.get('rounds', 1)} processes "
              "each, interleaved, every other round in reverse order (A B, B A: a slow spell "
              "of this shared machine then touches both alike, and a steady drift favours "
              "neither); medians of all timed runs after a warm-up per process. vLLM's engines run with their default compilation (vLLM's CPU build: "
              "Dynamo traced once, Inductor), all engines with the allocator settings "
              "`ascend-qwen3 serve` gives a CPU server.", "",
              _provenance(sec), ""]
    batches = sorted({r["batch"] for r in rows})
    lines += _engine_table(idx, batches, "decode_tokens_per_s", ratio="**")
    if roof:
        lines += ["", "Share of the memory-bandwidth roofline: at batch B one step reads the "
                  "weights once and B requests' KV caches, so the bound is B x bandwidth / "
                  "(weights + B x KV bytes) tokens/s (bytes per token: roofline section). The "
                  "read bandwidth of this shared machine drifts, so it is measured again (a 1 GiB "
                  "sum, median of 5) right before each engine's process, and each engine's share "
                  "is taken against its own measurement; the bandwidth column is the median of "
                  "those, the roofline column the bound at that median.", "",
                  "| checkpoint | batch | bandwidth GB/s | roofline tokens/s | transformers | "
                  "standalone | vLLM built-in | ours in vLLM |", "|---|---|---|---|---|---|---|---|"]
        for ck in ("dense", "moe"):
            m = roof.get(f"{ck} bf16")
            for b in batches:
                if not m:
                    continue
                found = {e: idx[(ck, e, b)] for e in ENGINES if (ck, e, b) in idx}
                # results from before bandwidths were measured per engine: the section's one
                bws = {e: r.get("read_GBps", results["roofline"]["bandwidth"]["read_GBps"])
                       for e, r in found.items()}
                bw = statistics.median(bws.values()) if bws else None

                def bound(gbps):
                    return b * gbps * 1e9 / (m["weights"] + b * m["kv_cache"])

                lines.append(f"| {ck} | {b} | {_f(bw)} | {_f(bw and bound(bw))} | " + " | ".join(
                    f"{found[e]['decode_tokens_per_s'] / bound(bws[e]):.0%}" if e in found
                    else "–" for e in ENGINES) + " |")
    lines += ["", "Prefill tokens/s (same runs):", ""]
    lines += _engine_table(idx, batches, "prefill_tokens_per_s", ratio="")
    lines += ["", "Peak resident memory of each engine's process (GiB; vLLM's includes the KV "
              "cache it reserves up front, `VLLM_CPU_KVCACHE_SPACE=2`):", ""]
    lines += _engine_table(idx, batches, "peak_rss_gib", digits=2)
    _plot_decode(rows, os.path.join(FIG_DIR, "decode.png"), "decode")
    _figure(lines, figures, "decode.png", "decode tokens/s of the table above", sec)
    lines += ["**What runs where.** Inside vLLM on the CPU the heavy work of both classes is "
              "vLLM's own C++ kernels: `_C::onednn_mm` for every float linear, "
              "`_C::cpu_attn_reshape_and_cache` and `_C::cpu_attention_with_kv_cache` for the "
              "attention of decode and prefill requests, `_C::cpu_fused_moe` for the float "
              "experts. The project's class reaches them through its ops: the plugin registers "
              "them as the implementation of `ops.linear`, `ops.write_kv_cache` / "
              "`ops.paged_attention` and `ops.moe_experts` (`ascend_qwen3/vllm_plugin/"
              "cpu_kernels.py`, each held to the `ops.cpu` specification by "
              "`tests/test_cpu_kernels.py`). What differs is the rest: the project's graph "
              "(QK-norm, rotary embedding, residual adds and norms, SwiGLU, the router), compiled "
              "by Inductor in both; the Python around each layer's attention call (the project "
              "writes the cache inside its attention op, vLLM in an op of its own); and the MoE "
              "routing around the fused kernel. `bench/engine_profile.py --engine ours|builtin` "
              "prints where each engine's time goes (PyTorch's profiler around one `generate`). "
              "With `ASCEND_QWEN3_ENGINE_KERNELS=0` the project's class runs the specification "
              "instead (oneDNN-prepacked linears through a custom op, the attention compiled by "
              "`torch.compile`, a per-expert loop for the MoE): that was the state before, at "
              "0.73-0.98 of the built-in class. On an Atlas server none of these CPU kernels "
              "runs.", ""]


def _w8a8_section(results, lines, figures) -> None:
    sec = results.get("w8a8")
    if not sec:
        return
    rows = sec["results"]
    idx = _by(rows, "checkpoint", "engine", "batch")
    _, roof = _roofline(results)
    lines += ["## W8A8 vs bf16", "",
              "The dense checkpoint in bf16 and quantised by the project's quantizer "
              "(`ascend-qwen3 quantize --scheme w8a8` / `w8a8_dynamic`, built-in calibration, no "
              "smoothing). On the CPU the int8 linears are int8 x int8 GEMMs with int32 "
              "accumulation (`torch._int_mm`, oneDNN), weights stored int8, activations quantised "
              "per tensor (static) or per token (dynamic); the embedding, norms and lm_head stay "
              "bf16. Same measurement as above.", "", _provenance(sec), "",
              "| engine | batch | bf16 | W8A8 static | W8A8 dynamic | static / bf16 | dynamic / bf16 |",
              "|---|---|---|---|---|---|---|"]
    builtin = {b: idx.get(("dense", "vllm-builtin", b), {}).get("decode_tokens_per_s")
               for b in sorted({r["batch"] for r in rows})}
    for e in ("standalone", "vllm-ours"):
        for b in sorted({r["batch"] for r in rows}):
            v = [idx.get((ck, e, b), {}).get("decode_tokens_per_s")
                 for ck in ("dense", "dense-w8a8", "dense-w8a8_dynamic")]
            r1 = v[1] / v[0] if v[0] and v[1] else None
            r2 = v[2] / v[0] if v[0] and v[2] else None
            lines.append(f"| {e} | {b} | " + " | ".join(_f(x) for x in v)
                         + f" | **{_f(r1, 2)}** | **{_f(r2, 2)}** |")
    if any(builtin.values()):
        lines += ["", "Against vLLM's built-in class on the bf16 checkpoint (same rounds):", "",
                  "| batch | vLLM built-in bf16 | ours W8A8 static | ours W8A8 dynamic | "
                  "static / built-in | dynamic / built-in |", "|---|---|---|---|---|---|"]
        for b, base in builtin.items():
            v = [idx.get((ck, "vllm-ours", b), {}).get("decode_tokens_per_s")
                 for ck in ("dense-w8a8", "dense-w8a8_dynamic")]
            rs = [x / base if x and base else None for x in v]
            lines.append(f"| {b} | {_f(base)} | {_f(v[0])} | {_f(v[1])} | **{_f(rs[0], 2)}** | "
                         f"**{_f(rs[1], 2)}** |")
    if roof.get("dense w8a8"):
        lines += ["", f"Batch-1 roofline of the W8A8 dense checkpoint: "
                  f"{roof['dense w8a8']['tokens_per_s']:.1f} tokens/s "
                  f"({roof['dense w8a8']['total'] / 1e9:.2f} GB per token)."]
    _plot_decode(rows, os.path.join(FIG_DIR, "w8a8.png"), "W8A8")
    _figure(lines, figures, "w8a8.png", "decode tokens/s of bf16 and W8A8", sec)


SPEC_METHODS = ("none", "eagle3", "draft_model", "ngram")


def _speculative_section(results, lines) -> None:
    sec = results.get("speculative")
    if not sec:
        return
    rows = sec["results"]
    idx = _by(rows, "batch", "method", "engine")
    batches = sorted({r["batch"] for r in rows})
    methods = [m for m in SPEC_METHODS if any(r["method"] == m for r in rows)]
    kinds = sec.get("prompt_kinds", [])
    counts = ", ".join(f"{kinds.count(k)} {k}{'s' if kinds.count(k) > 1 else ''}"
                       for k in dict.fromkeys(kinds))
    steps = f", {sec['draft_steps']} steps" if sec.get("draft_steps") else ""
    draft = (f"the model's trained EAGLE-3 draft, `serve/train_draft.py`{steps}"
             if sec.get("draft") == "trained" else
             "**a random draft of the trained draft's shape** (the trained draft was not there "
             "yet: its acceptance and speed-up say nothing of the trained one)")
    lines += ["## Speculative decoding", "",
              "The embedded default model (the trained tiny Qwen3 of `make serve`, bf16) with "
              f"vLLM's speculative decoding, {sec.get('k', 3)} speculative tokens: `none` (no "
              f"speculation), `eagle3` ({draft}), `draft_model` (the model cut to its first "
              f"{sec.get('draft_layers', 2)} layers), `ngram` (prompt lookup, 2 to 4 tokens); each "
              "on the project's class (its draft model on the project's class too) and on "
              "vLLM's built-in Qwen3 class with the same draft. Timed: greedy answers to "
              f"{len(kinds)} held-out chat prompts of the model's domain ({counts}), stopping "
              f"where the model stops, at most {sec.get('new', '?')} tokens each; tokens/s is "
              "the generated tokens over the wall time of the whole `generate` (prefill "
              f"included), after a warm-up. Batch {batches[-1]}: the prompts all at once; "
              "batch 1: the same prompts one at a time (one request in flight), total tokens "
              "over total time. Each (method, class) runs in a process of its own that measures "
              f"both batches, {sec.get('rounds', 1)} processes each, interleaved, every other "
              f"round in reverse order (as the decode section); {sec.get('repeats', '?')} runs "
              "per process; the median of all runs, and beside it the best process's median "
              "(best round). Speed-up: a method's tokens/s over the same class's without "
              "speculation. Acceptance length: vLLM's counters, 1 + accepted draft tokens / "
              "drafts.", "", _provenance(sec), "",
              "| batch | method | ours tokens/s | ours best round | built-in tokens/s | "
              "built-in best round | ours / built-in | speed-up ours | speed-up built-in | "
              "acceptance length ours | acceptance length built-in |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    differ = []
    for b in batches:
        base = {e: idx.get((b, "none", e), {}).get("tokens_per_s")
                for e in ("vllm-ours", "vllm-builtin")}
        for m in methods:
            o, bi = idx.get((b, m, "vllm-ours"), {}), idx.get((b, m, "vllm-builtin"), {})
            v = {"vllm-ours": o.get("tokens_per_s"), "vllm-builtin": bi.get("tokens_per_s")}
            ratio = (v["vllm-ours"] / v["vllm-builtin"]
                     if v["vllm-ours"] and v["vllm-builtin"] else None)
            up = {e: v[e] / base[e] if v[e] and base[e] else None for e in v}
            lines.append(f"| {b} | `{m}` | {_f(v['vllm-ours'])} | {_f(o.get('best_round'))} | "
                         f"{_f(v['vllm-builtin'])} | {_f(bi.get('best_round'))} | "
                         f"**{_f(ratio, 2)}** | {_f(up['vllm-ours'], 2)} | "
                         f"{_f(up['vllm-builtin'], 2)} | {_f(o.get('acceptance_length'), 2)} | "
                         f"{_f(bi.get('acceptance_length'), 2)} |")
            for r, name in ((o, "ours"), (bi, "built-in")):
                if m != "none" and r.get("same_as_none", r.get("prompts")) != r.get("prompts"):
                    differ.append(f"`{m}` on {name} at batch {b}: {r['same_as_none']} of "
                                  f"{r['prompts']}")
    lines += ["", "Same answers: with speculation each class answered "
              + ("every prompt with the very tokens it gives without" if not differ else
                 "these prompts with the tokens it gives without (bf16: the verification step "
                 "scores several positions at once, and a near-tie may fall the other way): "
                 + "; ".join(differ)) + "."]
    lines += ["", "Where speculation is slower than none here, the reason is measured, not guessed: "
              "`bench/speculative.py --breakdown ENGINE --method M` times the parts of an engine "
              "step; docs/serving.md (Speed: what speculation buys here) has the table and its "
              "reading (the default model's output layer is most of a step, and on a CPU without "
              "bf16 matrix units 1 + k rows of logits cost nearly 1 + k times one row).", ""]


LORA_CONFIGS = ("none", "1 adapter", "4 adapters")


def _lora_section(results, lines) -> None:
    sec = results.get("lora")
    if not sec:
        return
    rows = sec["results"]
    idx = _by(rows, "batch", "config", "engine")
    batches = sorted({r["batch"] for r in rows})
    configs = [c for c in LORA_CONFIGS if any(r["config"] == c for r in rows)]
    first = ("the default model's trained adapter (`serve/train_lora.py`)"
             if sec.get("first_adapter") == "trained" else
             "**a random adapter** of the trained adapter's shape (the trained adapter was not "
             "there)")
    lines += ["## LoRA adapters", "",
              "The embedded default model (bf16) served with vLLM's LoRA: `none` (LoRA off), "
              f"`1 adapter` ({first}; every request on it), `4 adapters` (that one and three "
              f"random adapters of the same shape, rank {sec.get('rank', '?')}, on every "
              "projection of attention and MLP; request i on adapter i mod 4, so a batch of 8 "
              "mixes all four); each on the project's class and on vLLM's built-in Qwen3 class "
              "with the same adapters, every engine eager (vLLM's CPU build runs LoRA engines "
              "eagerly, so the `none` engines are eager too). Timed as the speculative section: "
              "greedy answers to "
              f"{len(sec.get('prompt_kinds', []))} held-out chat prompts, at most "
              f"{sec.get('new', '?')} tokens each, tokens/s over the whole `generate`; batch "
              f"{batches[-1]} all at once, batch 1 one at a time. Each (config, class) is a "
              f"process measuring both batches, {sec.get('rounds', 1)} processes each, "
              "interleaved, every other round reversed; the median of all runs and the best "
              "process's median. Cost: a config's tokens/s over the same class's without LoRA.",
              "", _provenance(sec), "",
              "| batch | config | ours tokens/s | ours best round | built-in tokens/s | "
              "built-in best round | ours / built-in | ours vs none | built-in vs none |",
              "|---|---|---|---|---|---|---|---|---|"]
    for b in batches:
        base = {e: idx.get((b, "none", e), {}).get("tokens_per_s")
                for e in ("vllm-ours", "vllm-builtin")}
        for c in configs:
            o, bi = idx.get((b, c, "vllm-ours"), {}), idx.get((b, c, "vllm-builtin"), {})
            v = {"vllm-ours": o.get("tokens_per_s"), "vllm-builtin": bi.get("tokens_per_s")}
            ratio = (v["vllm-ours"] / v["vllm-builtin"]
                     if v["vllm-ours"] and v["vllm-builtin"] else None)
            rel = {e: v[e] / base[e] if v[e] and base[e] else None for e in v}
            lines.append(f"| {b} | `{c}` | {_f(v['vllm-ours'])} | {_f(o.get('best_round'))} | "
                         f"{_f(v['vllm-builtin'])} | {_f(bi.get('best_round'))} | "
                         f"**{_f(ratio, 2)}** | {_f(rel['vllm-ours'], 2)} | "
                         f"{_f(rel['vllm-builtin'], 2)} |")
    same = [f"`{r['config']}` batch {r['batch']}: {r['same_as_builtin']} of {r['prompts']}"
            for r in rows if r["engine"] == "vllm-ours" and "same_as_builtin" in r]
    if same:
        lines += ["", "Answers equal to the built-in class's with the same adapters (bf16: a "
                  "near-tie may fall the other way; the fp32 equality is the suite's, "
                  "tests/test_lora_engine.py): " + "; ".join(same) + "."]
    lines.append("")


def _serving_section(results, lines, figures) -> None:
    sec = results.get("serving")
    if not sec:
        return
    rows = sec["results"]
    lines += ["## Serving latency (vLLM's serving benchmark)", "",
              "`vllm bench serve` against the server `make serve` starts "
              f"(`ascend-qwen3 serve --model <dense>`), random prompts of {rows[0]['input_len']} "
              f"tokens, {rows[0]['output_len']} output tokens each, end of sequence ignored; "
              "then the same server command with vLLM's built-in class (`-- --hf-overrides "
              "'{\"architectures\": [\"Qwen3ForCausalLM\"]}'`).", "", _provenance(sec), "",
              "| engine | concurrency | requests | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | "
              "ITL p50 | ITL p99 | E2E p50 | E2E p99 | output tokens/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['concurrency']} | {r['completed']} | "
                     + " | ".join(_f(r.get(f"{p}_{m}_ms"), 0 if m in ("ttft", "e2el") else 1)
                                  for m in ("ttft", "tpot", "itl", "e2el") for p in ("p50", "p99"))
                     + f" | {_f(r['output_throughput'])} |")
    lines += ["", "Times in ms."]
    _plot_serving(rows, os.path.join(FIG_DIR, "serving.png"))
    _figure(lines, figures, "serving.png", "TTFT and TPOT, p50 and p99", sec)


def _ops_section(results, lines) -> None:
    sec = results.get("ops")
    if not sec:
        return
    lines += ["## Operator micro-benchmarks", "",
              "Each op of `ops` on its backend at the benchmark shapes (bf16; median of repeated "
              f"calls after warm-up, {sec.get('threads')} threads). GB/s where the op streams "
              "weights or KV cache (bytes / time); repeated calls find their operands in the "
              "CPU's caches, so small operands exceed the memory bandwidth above (decode reads "
              "them from memory).", "", _provenance(sec), "",
              "| backend | op | µs | GB/s |", "|---|---|---|---|"]
    for r in sec["results"]:
        lines.append(f"| {r['backend']} | {r['op']} | {_f(r['us'])} | {_f(r.get('GBps'))} |")
    lines.append("")


def _thinking_section(results, lines) -> None:
    sec = results.get("thinking")
    if not sec:
        return
    rows = _by(sec["results"], "batch", "case")
    batches = sorted({b for b, _ in rows})
    cases = [c for c in ("no processor", "no budgets", "budgets, thinking", "budgets, forcing")
             if any((b, c) in rows for b in batches)]
    lines += ["## Thinking budget", "",
              "What the thinking-budget logits processor (`vllm_plugin/thinking.py`) adds to a "
              "decode step: `update_state` and `apply` as vLLM calls them, on fp32 logits of "
              "151,936 tokens, each request's output growing by a token a step "
              "(`bench/thinking_budget.py`; median µs per step). \"no budgets\": the processor "
              "is loaded (as `make serve` loads it) and no request has a budget; \"thinking\": "
              "every request counts towards its budget; \"forcing\": every request is writing "
              "the forced text, so each row is masked (all its logits written), the worst case. "
              "A request forces 24 tokens (the transition text) once in its life.", "",
              _provenance(sec), "",
              "| case | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|" + "---|" * len(batches)]
    for c in cases:
        lines.append(f"| {c} | " + " | ".join(_f(rows[(b, c)]["us"]) if (b, c) in rows else "–"
                                               for b in batches) + " |")
    step = {r["batch"]: 1e6 * r["batch"] / r["decode_tokens_per_s"]
            for r in (results.get("decode") or {}).get("results", [])
            if r["engine"] == "vllm-ours" and r["checkpoint"] == "dense" and r.get("decode_tokens_per_s")}
    if step:
        lines += ["", "For scale, a decode step of the project's class on the dense (0.6B-shaped) "
                  "checkpoint in the decode section above takes " + ", ".join(
                      f"{us / 1000:,.1f} ms at batch {b}" for b, us in sorted(step.items())) + "."]
    lines.append("")


def _roofline_section(results, lines) -> None:
    sec = results.get("roofline")
    if not sec:
        return
    bw = sec["bandwidth"]
    lines += ["## The memory-bandwidth roofline", "",
              f"Read bandwidth measured here: **{bw['read_GBps']:.1f} GB/s** (median of "
              f"{bw['repeats']} sums of a {bw['bytes'] / 2**30:.0f} GiB fp32 tensor, "
              f"{bw['threads']} threads; best {bw['read_GBps_best']:.1f}). Batch-1 decode reads "
              "every weight it uses once per token, so bandwidth / bytes per token bounds it "
              "(`bench/roofline.py`; KV cache of the mean context included):", "",
              _provenance(sec), "", "| checkpoint | GB per token | roofline tokens/s |",
              "|---|---|---|"]
    for name, m in sec["models"].items():
        lines.append(f"| {name} | {m['total'] / 1e9:.3f} | {m['tokens_per_s']:.1f} |")
    lines.append("")


def _npu_section(lines) -> None:
    from ascend_qwen3.config import family_config
    from ascend_qwen3.deploy.launcher import graph_mode_args
    from ascend_qwen3.deploy.profiles import load_profile, profile_names, to_spec
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import roofline

    lines += ["## On the NPU: what to expect until it is measured", "",
              "`make bench` runs the same operator benchmarks on an NPU when torch_npu sees one, "
              "and `bench/serving.py --profile NAME` runs vLLM's serving benchmark against a "
              "served profile. No Atlas hardware was available for these figures, so this "
              "section is a computed bound, not a measurement: per-NPU bytes read per batch-1 "
              "decode token (weights of the profile's precision, split by its TP size; MoE: "
              "router and the top-8 experts of each layer, spread evenly over the expert-parallel "
              "ranks; the two-node profile's batch-1 token runs on one data-parallel rank; KV "
              "cache of a 4,096-token context) "
              "divided by HBM bandwidth. Huawei publishes no HBM bandwidth figure for the "
              "Atlas 800I A2's NPUs; third-party reports range from about 1.2 to 2 TB/s, so the "
              f"bound is given at {', '.join(f'{x} TB/s' for x in NPU_HBM_TBPS)}. Replace it "
              "with `bench/roofline.py --device npu` (a device read stream) on the hardware. "
              "Collectives, kernel launch gaps and attention arithmetic are not counted: real "
              "decode is below these bounds.", "",
              "| profile | model | precision | TP (DP x TP) | graph mode | GB per token per NPU | "
              + " | ".join(f"tokens/s at {x} TB/s" for x in NPU_HBM_TBPS) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(NPU_HBM_TBPS)]
    for name in profile_names():
        p = load_profile(name, check_fit=False)
        if p.get("runner") == "pooling":     # an embedding server decodes no token
            continue
        cfg = family_config(p["model"])
        wb = 1.0 if p["precision"].startswith("w8a8") else 2.0
        dp = p.get("dp", 1)
        ep = p["tp"] * dp if p.get("expert_parallel") else None
        b = roofline.bytes_per_token(cfg, weight_bytes=wb, context=4096, tp=p["tp"], ep=ep)
        mode = graph_mode_args(to_spec(p))
        mode = mode[mode.index("--compilation-config") + 1] if "--compilation-config" in mode else \
            ("eager" if "--enforce-eager" in mode else "vLLM default")
        layout = f"{dp} x {p['tp']}" if dp > 1 else f"{p['tp']}"
        lines.append(f"| {name} | {p['model']} | {p['precision']} | {layout} | "
                     f"`{mode}` | {b['total'] / 1e9:.2f} | "
                     + " | ".join(f"{x * 1e12 / b['total']:.0f}" for x in NPU_HBM_TBPS) + " |")
    lines.append("")


def write(results: dict) -> None:
    os.makedirs(FIG_DIR, exist_ok=True)
    lines = ["# Benchmarks", "",
             "Written by `make bench` (`bench/run.py`; results kept in `docs/bench/results.json`). "
             "Every ratio compares engines measured one after another in the same run on the same "
             "checkpoint; the tables say when and where. CPU figures are from vLLM's CPU build and "
             "say how the project's code performs off the NPU; they are not NPU figures. Speed "
             "targets live here, never in the test suite.", ""]
    figures: list[str] = []
    _roofline_section(results, lines)
    _decode_section(results, lines, figures)
    _w8a8_section(results, lines, figures)
    _speculative_section(results, lines)
    _lora_section(results, lines)
    _serving_section(results, lines, figures)
    _ops_section(results, lines)
    _thinking_section(results, lines)
    _npu_section(lines)
    with open(DOC, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    import json

    with open(os.path.join(FIG_DIR, "results.json")) as f:
        write(json.load(f))
    print("rendered " + DOC)
