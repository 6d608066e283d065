"""End-to-end decode speed of four engines on the same checkpoint, side by side.

Engines (each in a process of its own, one after another, in one run):

- ``transformers``: Hugging Face's Qwen3 / Qwen3-MoE classes, ``generate`` (greedy);
- ``standalone``: the project's graph with its own paged KV cache (``ascend_qwen3.runner.generate``);
- ``vllm-builtin``: vLLM's own Qwen3 / Qwen3-MoE class (vLLM's CPU build, compiled as it is by
  default);
- ``vllm-ours``: the project's class inside the same vLLM.

Each engine decodes ``--new`` tokens for a batch of random prompts of ``--prompt`` tokens
(greedy, end-of-sequence ignored). Decode speed is measured as the difference of two timed runs,
``--new`` tokens and 1 token, so prefill drops out: tokens/s = batch x (new - 1) / (t_new - t_1).
The median of ``--repeats`` such pairs is reported, after a warm-up run.

    .venv/bin/python bench/decode.py --model DIR [--batch 1 8] [--engines ...] [--json OUT]

Checkpoints: ``bench/checkpoints.py`` writes the benchmark shapes (random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("transformers", "standalone", "vllm-builtin", "vllm-ours")


def _prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def _timed(fn, n_new: int) -> float:
    t0 = time.perf_counter()
    fn(n_new)
    return time.perf_counter() - t0


def _measure(fn, batch: int, prompt: int, new: int, repeats: int) -> dict:
    fn(8)                                          # warm-up (and compilation, for vLLM)
    speeds, totals, firsts = [], [], []
    for _ in range(repeats):
        t_new, t_one = _timed(fn, new), _timed(fn, 1)
        speeds.append(batch * (new - 1) / max(t_new - t_one, 1e-9))
        totals.append(t_new)
        firsts.append(t_one)
    return {"decode_tokens_per_s": statistics.median(speeds), "runs": speeds,
            "generate_seconds_median": statistics.median(totals),
            # a 1-token run is the prefill of the whole batch plus one sampling step
            "prefill_tokens_per_s": batch * prompt / statistics.median(firsts)}


def run_engine(engine: str, model: str, batch: int, prompt: int, new: int, repeats: int,
               dtype: str) -> dict:
    """In this process: build ``engine`` on ``model`` and measure it."""
    import torch

    from ascend_qwen3.config import Qwen3Config

    cfg = Qwen3Config.from_model_dir(model)
    prompts = _prompts(cfg.vocab_size, batch, prompt)
    torch_dtype = getattr(torch, dtype)
    if engine == "transformers":
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
        ids = torch.tensor(prompts)

        def fn(n):
            with torch.inference_mode():
                m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
    elif engine == "standalone":
        from ascend_qwen3.loader import load_model
        from ascend_qwen3.runner.generate import SamplingParams, generate

        m, _ = load_model(model, dtype=dtype, max_positions=prompt + new + 16)

        def fn(n):
            generate(m, prompts, SamplingParams(max_new_tokens=n))
    else:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        kw = {}
        if engine == "vllm-ours":
            kw["hf_overrides"] = {"architectures": [
                "AscendQwen3MoeForCausalLM" if cfg.is_moe else "AscendQwen3ForCausalLM"]}
        llm = LLM(model=model, skip_tokenizer_init=True, dtype=dtype, seed=0, enable_prefix_caching=False,
                  max_model_len=prompt + new + 16, max_num_seqs=max(batch, 1), **kw)
        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]

        def fn(n):
            llm.generate(reqs, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                              detokenize=False), use_tqdm=False)
    out = _measure(fn, batch, prompt, new, repeats)
    out.update(engine=engine, model=model, batch=batch, prompt=prompt, new=new, dtype=dtype,
               cpu_capability=torch.backends.cpu.get_cpu_capability(),
               # the process's peak resident memory: weights, activations and, for vLLM, the
               # KV cache it reserves up front (VLLM_CPU_KVCACHE_SPACE)
               peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return out


def run_in_subprocess(engine: str, model: str, batch: int, prompt: int, new: int, repeats: int,
                      dtype: str, timeout: float = 3600) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from ascend_qwen3.deploy.launcher import CPU_MALLOC_ENV
    for k, v in CPU_MALLOC_ENV.items():     # what `ascend-qwen3 serve` sets; every engine alike
        env.setdefault(k, v)
    args = [sys.executable, os.path.abspath(__file__), "--one", engine, "--model", model,
            "--batch", str(batch), "--prompt", str(prompt), "--new", str(new),
            "--repeats", str(repeats), "--dtype", dtype]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: one engine here
    a = ap.parse_args(argv)
    if a.one:
        res = run_engine(a.one, a.model, a.batch[0], a.prompt, a.new, a.repeats, a.dtype)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    results = []
    for batch in a.batch:
        for engine in a.engines:
            r = run_in_subprocess(engine, a.model, batch, a.prompt, a.new, a.repeats, a.dtype)
            results.append(r)
            print(f"{engine:>13} batch {batch:>2}: {r['decode_tokens_per_s']:8.1f} tokens/s "
                  f"(runs {', '.join(f'{x:.1f}' for x in r['runs'])})", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
