"""Speculative decoding inside vLLM: decode speed of the project's class and vLLM's built-in
Qwen3 class with each speculative method, side by side.

The target is the embedded default model (the trained tiny Qwen3, bf16: what ``make serve``
serves); the methods, all with ``num_speculative_tokens`` K = 3:

- ``none``: no speculation (the reference of each class's speed-up);
- ``eagle3``: the default model's trained EAGLE-3 draft (``serve/train_draft.py``; a random
  draft of the same shape stands in, and the results say so, while the trained file is not
  there);
- ``draft_model``: the default model cut to its first 2 layers
  (``checkpoint.write_truncated_checkpoint``);
- ``ngram``: prompt lookup, ``prompt_lookup_max`` 4, ``prompt_lookup_min`` 2.

Engines: ``vllm-ours`` (architecture overridden to AscendQwen3ForCausalLM; the draft model on the
project's class too, through ``ASCEND_QWEN3_TAKE_OVER=1``) and ``vllm-builtin`` (vLLM's
Qwen3ForCausalLM, the draft model on it too), the same draft for both. Each (method, engine) runs
in a process of its own that measures batch 1 and batch 8; ``bench/run.py`` runs them in
interleaved rounds, every other round in reverse order (``run._rounds``), as the decode section.

What is timed: greedy answers to held-out chat prompts of the default model's domain
(``train_draft.heldout_prompts``: two-digit additions, questions on its topics, weather
questions), stopping where the model stops, at most ``new`` tokens each
(``engine_run.answer_rate``: generated tokens / wall time of the whole ``generate``, after a
warm-up). Batch 8: eight prompts mixing the kinds, all at once. Batch 1: the same eight prompts
one at a time (one request in flight), total tokens / total time. vLLM's counters give the mean
acceptance length, 1 + accepted draft tokens / drafts.

    .venv/bin/python bench/speculative.py [--new 64] [--repeats 2] [--rounds 2] [--json OUT]
    .venv/bin/python bench/speculative.py --one vllm-ours --method eagle3 --batches 1 --new 16
    .venv/bin/python bench/speculative.py --breakdown vllm-ours --method eagle3

``--breakdown``: where a decode step's time goes (batch 1), from wall-clock timers around vLLM's
runner, drafter, rejection sampler and scheduler and the target's and draft's forward and logits,
in one process (the engine core in it); ms per engine step, and per generated token.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("none", "eagle3", "draft_model", "ngram")
ENGINES = ("vllm-builtin", "vllm-ours")
BATCHES = (1, 8)
K = 3
DRAFT_LAYERS = 2
MAX_MODEL_LEN = 1024


def home() -> str:
    return os.environ.get("ASCEND_QWEN3_HOME") or os.path.join(ROOT, ".cache")


def models(base: str | None = None, log=print) -> dict:
    """The target and the drafts, built once under ``base`` (default $ASCEND_QWEN3_HOME/bench/
    speculative): {"model", "eagle3", "cut", "draft": "trained" | "random", "draft_steps"}."""
    from ascend_qwen3.checkpoint import write_truncated_checkpoint
    from ascend_qwen3.serve import eagle3_draft
    from ascend_qwen3.serve.default_model import STAMP, build_default_draft, build_default_model
    from ascend_qwen3.serve.train_draft import PACKAGED_DRAFT
    from ascend_qwen3.serve.train_tiny import PACKAGED

    base = base or os.path.join(home(), "bench", "speculative")
    os.makedirs(base, exist_ok=True)
    model = build_default_model(os.path.join(base, "model"), source=PACKAGED, log=log)
    with open(os.path.join(model, STAMP)) as f:
        stamp = f.read()
    cut = os.path.join(base, f"cut-{DRAFT_LAYERS}")
    # cut again whenever the target was built again (its stamp is copied beside the cut)
    if not os.path.isfile(os.path.join(cut, "source-" + STAMP)) or \
            open(os.path.join(cut, "source-" + STAMP)).read() != stamp:
        import shutil

        shutil.rmtree(cut + ".partial", ignore_errors=True)
        write_truncated_checkpoint(model, cut + ".partial", DRAFT_LAYERS)
        with open(os.path.join(cut + ".partial", "source-" + STAMP), "w") as f:
            f.write(stamp)
        shutil.rmtree(cut, ignore_errors=True)
        os.replace(cut + ".partial", cut)
    if os.path.isfile(PACKAGED_DRAFT):
        from ascend_qwen3.serve.train_draft import draft_info

        eagle3 = build_default_draft(os.path.join(base, "eagle3"), source=PACKAGED_DRAFT,
                                     target_source=PACKAGED, log=log)
        kind, steps = "trained", draft_info(PACKAGED_DRAFT).get("steps")
    else:
        eagle3 = os.path.join(base, "eagle3-random")
        if not os.path.isfile(os.path.join(eagle3, "config.json")):
            with open(os.path.join(model, "config.json")) as f:
                target_cfg = json.load(f)
            cfg = eagle3_draft.draft_config(target_cfg, draft_vocab=64, layer_ids=[1, 2, 3])
            eagle3_draft.save(eagle3_draft.init_draft(cfg), eagle3, vocab_ids=range(64),
                              info={"name": "random EAGLE-3 draft (bench stand-in)"})
        log(f"speculative: {PACKAGED_DRAFT} is not there: a random EAGLE-3 draft stands in")
        kind, steps = "random", None
    return {"model": model, "eagle3": eagle3, "cut": cut, "draft": kind, "draft_steps": steps}


def speculative_config(method: str, paths: dict, k: int = K) -> dict | None:
    """vLLM's ``speculative_config`` for ``method`` (None for ``none``)."""
    if method == "none":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2}
    if method == "eagle3":
        return {"method": "eagle3", "model": paths["eagle3"], "num_speculative_tokens": k}
    if method == "draft_model":
        return {"method": "draft_model", "model": paths["cut"], "num_speculative_tokens": k}
    raise ValueError(f"unknown speculative method {method!r}; use one of {', '.join(METHODS)}")


def mixed(groups: list[list], n: int) -> list:
    """``n`` items taken from ``groups`` in turn (the first of each group, then the second of
    each, ...), so every kind is represented."""
    out, i = [], 0
    while len(out) < n:
        if all(i >= len(g) for g in groups):
            raise ValueError(f"only {len(out)} items in the groups, {n} wanted")
        out += [g[i] for g in groups if i < len(g)][:n - len(out)]
        i += 1
    return out


KINDS = ("addition", "topic question", "weather question")


def prompts(model: str, n: int = 8) -> tuple[list[list[int]], list[str]]:
    """``n`` held-out chat prompts mixing the kinds, as token ids, and the kind of each."""
    from transformers import AutoTokenizer

    from ascend_qwen3.serve.train_draft import chat_prompt_ids, heldout_prompts

    n_add, n_topic, n_tools = 16, 8, 8
    chats = heldout_prompts(n_additions=n_add, n_tools=n_tools)
    bounds = (0, n_add, n_add + n_topic, n_add + n_topic + n_tools)
    groups = [[(kind, c) for c in chats[bounds[j]:bounds[j + 1]]] for j, kind in enumerate(KINDS)]
    picked = mixed(groups, n)
    tok = AutoTokenizer.from_pretrained(model)
    return chat_prompt_ids(tok, [c for _, c in picked]), [kind for kind, _ in picked]


def sequential(parts: list[dict]) -> dict:
    """One request at a time: ``parts`` are ``answer_rate`` results of one prompt each, with the
    same number of runs; run r's rate is the total of its tokens over the total of its times."""
    repeats = {len(p["runs"]) for p in parts}
    if len(repeats) != 1:
        raise ValueError(f"parts with different numbers of runs: {sorted(repeats)}")
    tokens = [sum(map(len, p["token_ids"])) for p in parts]
    runs = [sum(tokens) / sum(n / p["runs"][r] for n, p in zip(tokens, parts))
            for r in range(repeats.pop())]
    drafts = sum(p["drafts"] for p in parts)
    accepted = sum(p["accepted"] for p in parts)
    return {"tokens_per_s": statistics.median(runs), "runs": runs, "drafts": drafts,
            "accepted": accepted, "acceptance_length": 1 + accepted / drafts if drafts else None,
            "token_ids": [ids for p in parts for ids in p["token_ids"]]}


def run_engine(job: dict) -> dict:
    """In this process: one engine with one method, measured at each batch of the job."""
    from vllm import LLM

    from ascend_qwen3.vllm_plugin.engine_run import answer_rate, project_architecture

    kw = dict(model=job["model"], skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              enable_prefix_caching=False, max_model_len=MAX_MODEL_LEN,
              max_num_seqs=max(job["batches"]), disable_log_stats=False)
    if job["engine"] == "vllm-ours":
        kw["hf_overrides"] = {"architectures": [project_architecture(job["model"])]}
    elif job["engine"] != "vllm-builtin":
        raise ValueError(f"engine {job['engine']!r}: use one of {', '.join(ENGINES)}")
    sc = speculative_config(job["method"], job["paths"])
    if sc:
        kw["speculative_config"] = sc
    t0 = time.perf_counter()
    llm = LLM(**kw)
    out = {"engine": job["engine"], "method": job["method"], "speculative_config": sc,
           "start_seconds": time.perf_counter() - t0, "batches": {}}
    ps, new, repeats = job["prompts"], job["new"], job["repeats"]
    for batch in job["batches"]:
        if batch == 1:
            r = sequential([answer_rate(llm, [p], new, repeats) for p in ps])
        else:
            r = answer_rate(llm, ps[:batch], new, repeats)
        out["batches"][str(batch)] = r
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def run_in_subprocess(job: dict, timeout: float = 3600) -> dict:
    """``run_engine`` in a process of its own (``job_process``); ``vllm-ours`` with
    ASCEND_QWEN3_TAKE_OVER=1 (the draft model on the project's class too), ``vllm-builtin``
    without it."""
    from ascend_qwen3.vllm_plugin import TAKE_OVER_ENV

    env = {TAKE_OVER_ENV: "1" if job["engine"] == "vllm-ours" else None}
    return job_process(os.path.abspath(__file__), job, env, f"{job['engine']} with "
                       f"{job['method']}", timeout)


def job_process(script: str, job: dict, env_changes: dict, what: str, timeout: float = 3600) -> dict:
    """Run ``script --job JOB.json`` in a process of its own, with decode.run_in_subprocess's
    environment (the engine in that process, the CPU server's allocator settings) changed by
    ``env_changes`` (None: removed), and return the result it prints ("RESULT {...}")."""
    from ascend_qwen3.deploy.launcher import CPU_MALLOC_ENV

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    for k, v in CPU_MALLOC_ENV.items():
        env.setdefault(k, v)
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "job.json")
        with open(path, "w") as f:
            json.dump(job, f)
        done = subprocess.run([sys.executable, script, "--job", path], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def by_batch(results: list[dict], kind: str) -> dict[tuple, list[dict]]:
    """(batch, results' ``kind`` (method, config, ...), engine) -> that batch's result of each of
    the engine's processes (rounds)."""
    groups: dict[tuple, list[dict]] = {}
    for res in results:
        for batch, r in res["batches"].items():
            groups.setdefault((int(batch), res[kind], res["engine"]), []).append(r)
    return groups


def round_stats(rs: list[dict]) -> dict:
    """One engine's rounds at one batch: ``tokens_per_s`` the median of all timed runs, each
    process's median and the best of those, and the first round's token and prompt counts."""
    runs = [x for r in rs for x in r["runs"]]
    medians = [statistics.median(r["runs"]) for r in rs]
    return {"tokens_per_s": statistics.median(runs), "runs": runs, "round_medians": medians,
            "best_round": max(medians), "tokens": sum(map(len, rs[0]["token_ids"])),
            "prompts": len(rs[0]["token_ids"])}


def merge(results: list[dict]) -> list[dict]:
    """Per (batch, method, engine), over that engine's processes (rounds): ``tokens_per_s`` the
    median of all timed runs, ``round_medians`` each process's median, ``best_round`` the best
    of those, the acceptance length from the drafts and accepted tokens of all runs, and
    ``same_as_none`` (prompts answered with the very tokens the engine gives without speculation,
    in its first round) and ``same_as_builtin`` (the same against vLLM's built-in class)."""
    groups = by_batch(results, "method")
    rows = []
    for (batch, method, engine), rs in groups.items():
        drafts, accepted = sum(r["drafts"] for r in rs), sum(r["accepted"] for r in rs)
        rows.append({"batch": batch, "method": method, "engine": engine, **round_stats(rs),
                     "drafts": drafts, "accepted": accepted,
                     "acceptance_length": 1 + accepted / drafts if drafts else None})
    answers = {key: rs[0]["token_ids"] for key, rs in groups.items()}
    for row in rows:
        ids = answers[(row["batch"], row["method"], row["engine"])]
        for name, key in (("same_as_none", (row["batch"], "none", row["engine"])),
                          ("same_as_builtin", (row["batch"], row["method"], "vllm-builtin"))):
            if key in answers:
                row[name] = sum(a == b for a, b in zip(ids, answers[key]))
    return rows


def measure(paths: dict, prompt_ids: list[list[int]], new: int, repeats: int, rounds: int,
            order, batches=BATCHES, methods=METHODS, log=print) -> list[dict]:
    """Every (method, engine) in ``rounds`` rounds in the order ``order`` gives (``run._rounds``),
    each a process measuring every batch; merged by ``merge``."""
    items = [(method, method, engine) for method in methods for engine in ENGINES]
    results = []
    for method, _, engine in order(items, rounds):
        job = {"engine": engine, "method": method, "model": paths["model"], "paths": paths,
               "prompts": prompt_ids, "batches": list(batches), "new": new, "repeats": repeats}
        res = run_in_subprocess(job)
        results.append(res)
        for b, r in res["batches"].items():
            al = r["acceptance_length"]
            log(f"{method:>12} {engine:>13} batch {b:>2}: {r['tokens_per_s']:8.1f} tokens/s "
                f"(runs {', '.join(f'{x:.1f}' for x in r['runs'])})"
                + (f", acceptance length {al:.2f}" if al else ""), flush=True)
    return merge(results)


def section(a, order, log=print) -> dict:
    """The ``speculative`` section of ``make bench`` (``a``: bench/run.py's arguments)."""
    paths = models(log=log)
    ids, kinds = prompts(paths["model"], max(BATCHES))
    new = 2 * a.new
    rows = measure(paths, ids, new, a.repeats, a.rounds, order, log=log)
    return {"results": rows, "rounds": a.rounds, "repeats": a.repeats, "new": new, "k": K,
            "draft": paths["draft"], "draft_steps": paths["draft_steps"],
            "draft_layers": DRAFT_LAYERS, "prompt_kinds": kinds,
            "prompt_tokens": [len(p) for p in ids]}


# (module, class, method, label) timed by --breakdown; a missing one is left out, said so. Not
# the n-gram proposer: importing it before the engine starts loads numba, after which vLLM 0.32's
# CPU engine cannot start (vllm/triton_utils/dispatcher.py, _rebind_kernels)
TIMED = [
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model", "runner: execute_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward", "  target forward"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "sample_tokens", "runner: sample_tokens"),
    ("vllm.v1.sample.rejection_sampler", "RejectionSampler", "forward", "  rejection sampler"),
    ("vllm.v1.spec_decode.llm_base_proposer", "SpecDecodeBaseProposer", "propose",
     "  drafter propose (EAGLE / draft model)"),
    ("vllm.model_executor.models.llama_eagle3", "Eagle3LlamaForCausalLM", "forward",
     "    draft forward"),
    ("vllm.model_executor.models.llama_eagle3", "Eagle3LlamaForCausalLM", "compute_logits",
     "    draft logits"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule", "scheduler: schedule"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output", "scheduler: update"),
]


def breakdown(engine: str, method: str, paths: dict, prompt_ids, new: int) -> dict:
    """In this process: ms per engine step in each timed part, batch 1, after a warm-up."""
    import collections
    import functools
    import importlib

    from vllm import LLM

    from ascend_qwen3.vllm_plugin.engine_run import answer_rate, project_architecture

    spent, calls = collections.defaultdict(float), collections.Counter()

    def timed(cls, name, label):
        f = cls.__dict__[name]

        @functools.wraps(f)
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t
                calls[label] += 1
        setattr(cls, name, g)

    for mod, cls, name, label in TIMED:
        try:
            timed(getattr(importlib.import_module(mod), cls), name, label)
        except (ImportError, AttributeError, KeyError):
            print(f"breakdown: {mod}.{cls}.{name} is not in this vLLM; not timed", flush=True)
    if engine == "vllm-ours":
        from ascend_qwen3.vllm_plugin import model as ours
        timed(ours.AscendQwen3ForCausalLM, "compute_logits", "  target logits (lm_head)")
        arch = {"hf_overrides": {"architectures": [project_architecture(paths["model"])]}}
    else:
        from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
        timed(Qwen3ForCausalLM, "compute_logits", "  target logits (lm_head)")
        arch = {}
    kw = dict(model=paths["model"], skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              enable_prefix_caching=False, max_model_len=MAX_MODEL_LEN, max_num_seqs=1,
              disable_log_stats=False, **arch)
    sc = speculative_config(method, paths)
    if sc:
        kw["speculative_config"] = sc
    llm = LLM(**kw)
    answer_rate(llm, [prompt_ids[0]], new, 1)
    spent.clear()
    calls.clear()
    tokens = sum(len(answer_rate(llm, [p], new, 1)["token_ids"][0]) for p in prompt_ids)
    # answer_rate runs a warm-up generate and a timed one: both counted, so tokens twice
    tokens *= 2
    steps = calls["runner: execute_model"]
    return {"engine": engine, "method": method, "steps": steps, "tokens": tokens,
            "tokens_per_step": tokens / steps,
            "ms_per_step": {k: 1000 * v / steps for k, v in spent.items()},
            "calls_per_step": {k: v / steps for k, v in calls.items()}}


def TIMED_ORDER(label: str) -> int:
    order = [t[3] for t in TIMED]
    if label in order:
        return order.index(label)
    return order.index("  target forward")        # the target's logits: beside its forward


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", type=int, default=64, help="at most this many tokens per answer")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per (method, engine)")
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, choices=ENGINES,
                    help="one engine with --method, in a process of its own; prints its result")
    ap.add_argument("--method", default="eagle3", choices=METHODS)
    ap.add_argument("--breakdown", default=None, choices=ENGINES,
                    help="one engine with --method at batch 1, in this process: where a step's "
                    "time goes")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)    # internal: run_engine here
    a = ap.parse_args(argv)
    if a.job:
        with open(a.job) as f:
            res = run_engine(json.load(f))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    paths = models()
    ids, kinds = prompts(paths["model"], max(BATCHES))
    if a.breakdown:
        r = breakdown(a.breakdown, a.method, paths, ids, a.new)
        step = sum(v for k, v in r["ms_per_step"].items() if not k.startswith(" "))
        print(f"{a.method} on {a.breakdown}, batch 1: {r['steps']} steps, "
              f"{r['tokens_per_step']:.2f} tokens per step; top-level parts "
              f"{step:.2f} ms per step = {step / r['tokens_per_step']:.2f} ms per token")
        for k, v in sorted(r["ms_per_step"].items(), key=lambda kv: TIMED_ORDER(kv[0])):
            print(f"  {k:44s} {v:7.2f} ms/step  ({r['calls_per_step'][k]:.2f} calls/step)")
        return 0
    if a.one:
        job = {"engine": a.one, "method": a.method, "model": paths["model"], "paths": paths,
               "prompts": ids, "batches": a.batches, "new": a.new, "repeats": a.repeats}
        res = run_in_subprocess(job)
        for b, r in res["batches"].items():
            print(f"{a.method} {a.one} batch {b}: {r['tokens_per_s']:.1f} tokens/s, runs "
                  f"{[round(x, 1) for x in r['runs']]}, drafts {r['drafts']}, accepted "
                  f"{r['accepted']}, acceptance length {r['acceptance_length']}, tokens "
                  f"{[len(t) for t in r['token_ids']]}", flush=True)
        print(f"engine start {res['start_seconds']:.1f} s, peak {res['peak_rss_gib']:.2f} GiB")
        return 0
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from run import _rounds

    rows = measure(paths, ids, a.new, a.repeats, a.rounds, _rounds, batches=a.batches,
                   methods=a.methods)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
