"""W8A8 accuracy, weight bytes and quantizer memory, measured side by side in one run.

1. Accuracy of W8A8 / W8A8_DYNAMIC logits against the bf16 model on the same weights (cosine
   similarity per token, averaged; top-1 agreement), for the test suite's small random checkpoints
   and a Qwen3-0.6B-shaped random checkpoint.
2. SmoothQuant on a checkpoint with synthetic outlier channels (a few hidden channels of every
   norm output made 30x larger, the consuming weights' columns divided by 30: the float function is
   unchanged, the int8 activation ranges are not): error before and after smoothing.
3. Weight bytes of bf16 vs W8A8 for the eight family models (from the sharding plan and the
   stored format), and the measured file sizes of the 0.6B-shaped checkpoints.
4. Peak resident memory of the quantizer (a child process per run) on the 0.6B-shaped
   checkpoint, next to the checkpoint size and the peak of loading the whole bf16 model.

    .venv/bin/python bench/quant_report.py [--skip-06b]

Results go to docs/quantization.md (between the BENCH markers) and stdout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

BEGIN, END = "<!-- BENCH quant_report BEGIN -->", "<!-- BENCH quant_report END -->"


def logits(model, prompts):
    from tests.test_graph_parity import ours_prefill_logits
    return torch.cat(ours_prefill_logits(model, prompts, block_size=16)).float()


def agreement(a, b):
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float(cos.mean()), float(cos.min()), float((a.argmax(-1) == b.argmax(-1)).float().mean())


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


CHILD_QUANT = """
import sys, time
sys.path.insert(0, {root!r})
from ascend_qwen3.quantizer import quantize_checkpoint
t = time.perf_counter()
quantize_checkpoint({src!r}, {out!r}, {scheme!r}, smooth={smooth!r}, progress=False)
print(time.perf_counter() - t, [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""

CHILD_LOAD = """
import sys
sys.path.insert(0, {root!r})
from ascend_qwen3.loader import load_model
m, _ = load_model({src!r}, max_positions=4096)
print(0, [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""

CHILD_BASE = """
import sys
sys.path.insert(0, {root!r})
import torch, ascend_qwen3.quantizer, ascend_qwen3.loader, transformers
print(0, [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def child(code, **kw):
    out = subprocess.run([sys.executable, "-c", code.format(root=ROOT, **kw)], capture_output=True,
                         text=True, check=True).stdout.split()
    # VmHWM (peak resident set of this process image): ru_maxrss would not do, Linux carries it
    # over fork+exec from the parent, which holds models of its own here
    return float(out[-2]), int(out[-1]) / 1024  # seconds, peak MiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-06b", action="store_true", help="skip the 0.6B-shaped checkpoint")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "quantization.md"))
    args = ap.parse_args()

    from ascend_qwen3.checkpoint import write_random_checkpoint
    from ascend_qwen3.config import FAMILY, family_config
    from ascend_qwen3.loader import load_model
    from ascend_qwen3.loader import load_plan
    from ascend_qwen3.quant.description import QuantConfig
    from ascend_qwen3.quant.plan import assignment_bytes
    from ascend_qwen3.quantizer import quantize_checkpoint
    from tests.checkpoints import SPECS, add_tokenizer, make_checkpoint
    from tests.test_quant_model import add_outlier_channels

    lines = [BEGIN, "", f"Measured {time.strftime('%Y-%m-%d')} on this machine "
             f"({os.cpu_count()} CPUs, torch {torch.__version__}, CPU backend). Calibration: the "
             "built-in set, 2048 tokens.", ""]
    tmp = tempfile.mkdtemp(prefix="quant-report-")
    g = torch.Generator().manual_seed(0)

    # 1. small checkpoints -------------------------------------------------------------------
    lines += ["### W8A8 vs bf16 logits, small random checkpoints", "",
              "| checkpoint | scheme | smoothing | mean cosine | min cosine | top-1 agreement |",
              "|---|---|---|---|---|---|"]
    prompts = [[3, 17, 42, 9, 100, 5, 61], [11, 250], list(range(20, 65))]
    for name in ("dense_tied", "dense_yarn", "moe_norm"):
        src = os.path.join(tmp, name)
        make_checkpoint(name, src, dtype=torch.bfloat16)
        add_tokenizer(src, SPECS[name]["vocab_size"])
        ref = logits(load_model(src)[0], prompts)
        for scheme in ("w8a8", "w8a8_dynamic"):
            for smooth in (None, 0.5):
                out = os.path.join(tmp, f"{name}-{scheme}-{smooth}")
                quantize_checkpoint(src, out, scheme, smooth=smooth, progress=False)
                mean, low, top1 = agreement(logits(load_model(out)[0], prompts), ref)
                lines.append(f"| {name} | {scheme} | {smooth or '-'} | {mean:.4f} | {low:.4f} | {top1:.3f} |")
                print(lines[-1], flush=True)

    # 2. outliers ------------------------------------------------------------------------------
    lines += ["", "### Synthetic outlier channels (dense_yarn, fp32): error = 1 - mean cosine vs float",
              "", "| scheme | no smoothing | alpha 0.3 | alpha 0.5 | alpha 0.8 |", "|---|---|---|---|---|"]
    src = os.path.join(tmp, "outliers")
    make_checkpoint("dense_yarn", src)
    add_tokenizer(src, SPECS["dense_yarn"]["vocab_size"])
    add_outlier_channels(src)
    ref = logits(load_model(src)[0], prompts)
    for scheme in ("w8a8", "w8a8_dynamic"):
        row = []
        for smooth in (None, 0.3, 0.5, 0.8):
            out = os.path.join(tmp, f"outliers-{scheme}-{smooth}")
            quantize_checkpoint(src, out, scheme, smooth=smooth, progress=False)
            row.append(1 - agreement(logits(load_model(out)[0], prompts), ref)[0])
        lines.append(f"| {scheme} | " + " | ".join(f"{e:.2e}" for e in row) + " |")
        print(lines[-1], flush=True)

    # 3. bytes per family model ------------------------------------------------------------------
    lines += ["", "### Weight bytes, bf16 vs W8A8 (whole model, from the plan and the stored format)", "",
              "| model | bf16 GiB | w8a8 GiB | w8a8_dynamic GiB | w8a8 / bf16 |", "|---|---|---|---|---|"]
    for n in FAMILY:
        cfg = family_config(n)
        b = [sum(assignment_bytes(a, cfg.dtype) for a in load_plan(cfg, 1, 0, False, q))
             for q in (None, QuantConfig.for_scheme(cfg, "w8a8"), QuantConfig.for_scheme(cfg, "w8a8_dynamic"))]
        lines.append(f"| {n} | {b[0] / 2**30:.2f} | {b[1] / 2**30:.2f} | {b[2] / 2**30:.2f} | {b[1] / b[0]:.3f} |")
    print("\n".join(lines[-len(FAMILY):]), flush=True)

    # 4. the 0.6B-shaped checkpoint ------------------------------------------------------------------
    if not args.skip_06b:
        src = os.path.join(tmp, "qwen3-0.6b")
        write_random_checkpoint(FAMILY["Qwen3-0.6B"][0], src, dtype=torch.bfloat16,
                                max_shard_bytes=256 * 2**20)
        add_tokenizer(src, 384)
        _, base_mb = child(CHILD_BASE)
        _, load_mb = child(CHILD_LOAD, src=src)
        p06 = [torch.randint(0, 151936, (n,), generator=g).tolist() for n in (64, 17, 100)]
        ref = logits(load_model(src, max_positions=4096)[0], p06)
        lines += ["", "### Qwen3-0.6B-shaped random checkpoint (bf16, 28 layers)", "",
                  f"bf16 checkpoint {dir_bytes(src) / 2**20:.0f} MiB; a process that imports the "
                  f"project and torch peaks at {base_mb:.0f} MiB; loading the whole bf16 model peaks "
                  f"at {load_mb:.0f} MiB.", "",
                  "| scheme | smoothing | files MiB | quantizer s | quantizer peak RSS MiB | mean cosine | "
                  "min cosine | top-1 agreement |", "|---|---|---|---|---|---|---|---|"]
        for scheme, smooth in (("w8a8", None), ("w8a8", 0.5), ("w8a8_dynamic", None)):
            out = os.path.join(tmp, f"q06-{scheme}-{smooth}")
            secs, peak = child(CHILD_QUANT, src=src, out=out, scheme=scheme, smooth=smooth)
            mean, low, top1 = agreement(logits(load_model(out, max_positions=4096)[0], p06), ref)
            lines.append(f"| {scheme} | {smooth or '-'} | {dir_bytes(out) / 2**20:.0f} | {secs:.0f} | "
                         f"{peak:.0f} | {mean:.4f} | {low:.4f} | {top1:.3f} |")
            print(lines[-1], flush=True)
    lines += ["", END]
    from bench.docblock import write_block
    write_block(args.out, BEGIN, END, "\n".join(lines))


if __name__ == "__main__":
    main()
