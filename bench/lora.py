"""LoRA adapters inside vLLM: what serving one adapter, and four, costs on decode, the project's
class and vLLM's built-in Qwen3 class side by side with the same adapters.

The base is the embedded default model (the trained tiny Qwen3, bf16: what ``make serve``
serves). The adapters are PEFT LoRA adapters on every projection of attention and MLP, the rank
of the default model's trained adapter: the trained adapter itself (``serve/train_lora.py``, its
``build_default_lora``;
a random adapter of its shape stands in, and the results say so, while the trained file is not
there) and, for the four-adapter runs, three more random adapters of the same shape. Configs:

- ``none``: an engine without LoRA (the reference of each class's cost);
- ``1 adapter``: an engine with LoRA on (``max_loras`` 1), every request on the first adapter;
- ``4 adapters``: ``max_loras`` 4, request i on adapter i mod 4 (a batch of 8 mixes all four).

Engines: ``vllm-ours`` (architecture overridden to AscendQwen3ForCausalLM) and ``vllm-builtin``
(vLLM's Qwen3ForCausalLM). Each (config, engine) runs in a process of its own that measures
batch 1 and batch 8; ``bench/run.py`` runs them in interleaved rounds, every other round in
reverse order (``run._rounds``), as the decode section. What is timed is what the speculative
section times (``bench/speculative.py``): greedy answers to held-out chat prompts of the default
model's domain, stopping where the model stops, at most ``new`` tokens each; batch 8 all at once,
batch 1 the same prompts one at a time.

    .venv/bin/python bench/lora.py [--new 64] [--repeats 2] [--rounds 2] [--json OUT]
    .venv/bin/python bench/lora.py --one vllm-ours --config "4 adapters" --batches 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import speculative  # noqa: E402  (bench/: the default model, its prompts, batch-1 totals)

CONFIGS = {"none": 0, "1 adapter": 1, "4 adapters": 4}
ENGINES = ("vllm-builtin", "vllm-ours")
BATCHES = (1, 8)
MAX_MODEL_LEN = 1024
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _projection_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each target projection of a Qwen3 config (Hugging Face names)."""
    h, d = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv, f = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d, cfg["intermediate_size"]
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


def random_adapter(model: str, path: str, rank: int, seed: int, alpha: int | None = None) -> str:
    """A PEFT LoRA adapter for ``model`` with random A and B (B is zero in a freshly initialised
    adapter; here it is not, so the adapter changes the answers as a trained one does), on every
    projection of every layer, written once under ``path``."""
    import torch
    from safetensors.torch import save_file

    if os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        return path
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, (out, inp) in _projection_shapes(cfg).items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.02
    os.makedirs(path + ".partial", exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              os.path.join(path + ".partial", "adapter_model.safetensors"))
    with open(os.path.join(path + ".partial", "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
                   "lora_alpha": alpha or rank, "lora_dropout": 0.0, "bias": "none",
                   "target_modules": list(TARGETS), "base_model_name_or_path": model}, f, indent=1)
    os.replace(path + ".partial", path)
    return path


def adapters(model: str, base: str, log=print) -> dict:
    """Four adapters for ``model``: the trained one first (or a random stand-in of its shape)."""
    from ascend_qwen3.serve import train_lora
    from ascend_qwen3.serve.train_tiny import PACKAGED

    trained, kind = None, "random"
    try:     # the served default model's adapter, for the packaged model the bench serves
        trained = train_lora.build_default_lora(speculative.home(), base_source=PACKAGED, log=log)
        kind = "trained"
    except (FileNotFoundError, ValueError) as exc:
        log(f"lora: no trained adapter ({exc}): a random adapter stands in")
    if trained:
        with open(os.path.join(trained, "adapter_config.json")) as f:
            rank = int(json.load(f)["r"])
    else:
        rank = 8
        trained = random_adapter(model, os.path.join(base, "random-0"), rank, seed=0)
    paths = [trained] + [random_adapter(model, os.path.join(base, f"random-{i}"), rank, seed=i)
                         for i in range(1, 4)]
    return {"paths": paths, "rank": rank, "first": kind}


def run_engine(job: dict) -> dict:
    """In this process: one engine in one config, measured at each batch of the job."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from ascend_qwen3.vllm_plugin.engine_run import answer_rate, project_architecture

    n = CONFIGS[job["config"]]
    # eager for every config: vLLM's CPU build runs an engine with LoRA eagerly (its platform
    # sets the compilation mode to NONE), so the `none` engines are eager too and the cost
    # measured is LoRA's alone
    kw = dict(model=job["model"], skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              enable_prefix_caching=False, max_model_len=MAX_MODEL_LEN,
              max_num_seqs=max(job["batches"]), enforce_eager=True, disable_log_stats=False)
    if n:
        kw.update(enable_lora=True, max_loras=n, max_lora_rank=max(8, job["rank"]))
    if job["engine"] == "vllm-ours":
        kw["hf_overrides"] = {"architectures": [project_architecture(job["model"])]}
    elif job["engine"] != "vllm-builtin":
        raise ValueError(f"engine {job['engine']!r}: use one of {', '.join(ENGINES)}")
    t0 = time.perf_counter()
    llm = LLM(**kw)
    out = {"engine": job["engine"], "config": job["config"], "adapters": n,
           "start_seconds": time.perf_counter() - t0, "batches": {}}
    ps, new, repeats = job["prompts"], job["new"], job["repeats"]
    loras = [LoRARequest(f"adapter-{i}", i + 1, p) for i, p in enumerate(job["adapters"][:n])]

    def lora(i):
        return loras[i % n] if n else None

    for batch in job["batches"]:
        if batch == 1:
            r = speculative.sequential([answer_rate(llm, [p], new, repeats, lora=[lora(i)])
                                        for i, p in enumerate(ps)])
        else:
            r = answer_rate(llm, ps[:batch], new, repeats, lora=[lora(i) for i in range(batch)])
        out["batches"][str(batch)] = r
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def run_in_subprocess(job: dict, timeout: float = 3600) -> dict:
    """``run_engine`` in a process of its own, with the speculative section's environment."""
    return speculative.job_process(os.path.abspath(__file__), job, {},
                                   f"{job['engine']} with {job['config']}", timeout)


def merge(results: list[dict]) -> list[dict]:
    """Per (batch, config, engine), over that engine's processes (rounds): ``tokens_per_s`` the
    median of all timed runs, ``round_medians`` each process's median, ``best_round`` the best
    of those, and ``same_as_builtin`` (prompts answered with the tokens vLLM's built-in class
    gives with the same adapters, in the first rounds: bf16, so a near-tie may differ)."""
    groups = speculative.by_batch(results, "config")
    rows = [{"batch": batch, "config": config, "engine": engine, **speculative.round_stats(rs)}
            for (batch, config, engine), rs in groups.items()]
    answers = {key: rs[0]["token_ids"] for key, rs in groups.items()}
    for row in rows:
        other = answers.get((row["batch"], row["config"], "vllm-builtin"))
        if other is not None:
            mine = answers[(row["batch"], row["config"], row["engine"])]
            row["same_as_builtin"] = sum(a == b for a, b in zip(mine, other))
    return rows


def measure(model: str, lora: dict, prompt_ids, new: int, repeats: int, rounds: int, order,
            batches=BATCHES, configs=tuple(CONFIGS), log=print) -> list[dict]:
    items = [(config, config, engine) for config in configs for engine in ENGINES]
    results = []
    for config, _, engine in order(items, rounds):
        job = {"engine": engine, "config": config, "model": model, "adapters": lora["paths"],
               "rank": lora["rank"], "prompts": prompt_ids, "batches": list(batches),
               "new": new, "repeats": repeats}
        res = run_in_subprocess(job)
        results.append(res)
        for b, r in res["batches"].items():
            log(f"{config:>11} {engine:>13} batch {b:>2}: {r['tokens_per_s']:8.1f} tokens/s "
                f"(runs {', '.join(f'{x:.1f}' for x in r['runs'])})", flush=True)
    return merge(results)


def setup(log=print) -> tuple[str, dict]:
    base = os.path.join(speculative.home(), "bench", "lora")
    model = speculative.models(log=log)["model"]
    return model, adapters(model, base, log=log)


def section(a, order, log=print) -> dict:
    """The ``lora`` section of ``make bench`` (``a``: bench/run.py's arguments)."""
    model, lora = setup(log)
    ids, kinds = speculative.prompts(model, max(BATCHES))
    new = 2 * a.new
    rows = measure(model, lora, ids, new, a.repeats, a.rounds, order, log=log)
    return {"results": rows, "rounds": a.rounds, "repeats": a.repeats, "new": new,
            "rank": lora["rank"], "first_adapter": lora["first"], "prompt_kinds": kinds,
            "prompt_tokens": [len(p) for p in ids]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", type=int, default=64, help="at most this many tokens per answer")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per (config, engine)")
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, choices=ENGINES,
                    help="one engine with --config, in a process of its own; prints its result")
    ap.add_argument("--config", default="1 adapter", choices=list(CONFIGS))
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)    # internal: run_engine here
    a = ap.parse_args(argv)
    if a.job:
        with open(a.job) as f:
            res = run_engine(json.load(f))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    model, lora = setup()
    ids, _ = speculative.prompts(model, max(BATCHES))
    if a.one:
        res = run_in_subprocess({"engine": a.one, "config": a.config, "model": model,
                                 "adapters": lora["paths"], "rank": lora["rank"], "prompts": ids,
                                 "batches": a.batches, "new": a.new, "repeats": a.repeats})
        print(json.dumps({k: v for k, v in res.items()}, indent=1))
        return 0
    from run import _rounds

    rows = measure(model, lora, ids, a.new, a.repeats, a.rounds, _rounds, batches=a.batches,
                   configs=a.configs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    for r in sorted(rows, key=lambda r: (r["batch"], r["config"], r["engine"])):
        print(f"batch {r['batch']:>2} {r['config']:>11} {r['engine']:>13}: "
              f"{r['tokens_per_s']:8.1f} tokens/s (best round {r['best_round']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
