"""Command line: ``ascend-qwen3 <command>``.

Commands:
  run       generate text from a local Hugging Face Qwen3 checkpoint with the project's own graph
  plan      print the tensor / expert parallel sharding plan and per-rank weight bytes
  quantize  write an msModelSlim-format W8A8 / W8A8_DYNAMIC checkpoint from a float one
  serve     start vLLM's OpenAI-compatible server on a checkpoint with the project's plugin
            (default: the embedded trained tiny Qwen3; random weights where there is none)
  train-tiny  train the tiny Qwen3 models (dense, MoE) on an offline corpus, real tokenizer,
              and the dense one's EAGLE-3 draft and LoRA adapter
  tiny      build the embedded default model into a directory
  loadtest  concurrent streaming chat load on a live server (latency, TTFT, tokens/s, errors)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _run(args: argparse.Namespace) -> int:
    import ops
    from .loader import load_model
    from .runner.generate import SamplingParams, generate

    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        print(f"error: cannot load a tokenizer from {args.model!r} ({exc.__class__.__name__}); the "
              f"checkpoint directory needs tokenizer.json / tokenizer_config.json", file=sys.stderr)
        return 2
    if args.chat:
        if not getattr(tok, "chat_template", None):
            print(f"error: --chat needs a chat template in {args.model!r}'s tokenizer_config.json",
                  file=sys.stderr)
            return 2
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True,
                                       enable_thinking=not args.no_think)
    else:
        text = args.prompt
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        print("error: the prompt encodes to zero tokens; give a non-empty --prompt", file=sys.stderr)
        return 2

    device = _run_device(args.device)
    t0 = time.perf_counter()
    if args.lora:      # the adapter merged into the float weights (W + alpha / r * B A)
        from .lora_adapter import load_model_with_lora
        model, cfg = load_model_with_lora(args.model, args.lora, dtype=args.dtype, device=device)
    else:
        model, cfg = load_model(args.model, dtype=args.dtype, device=device)
    load_s = time.perf_counter() - t0
    stops = tuple(t for t in {tok.eos_token_id, tok.pad_token_id} if t is not None)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop_token_ids=() if args.ignore_eos else stops)
    t1 = time.perf_counter()
    out = generate(model, [ids], params)[0]
    gen_s = time.perf_counter() - t1
    tokens = out.tokens[:-1] if out.finished_by_stop else out.tokens
    print(tok.decode(tokens, skip_special_tokens=False))
    print(f"[{cfg.architecture} {str(cfg.dtype).replace('torch.', '')}, {device}, backend {ops.backend_name_for(device)}: "
          f"{len(ids)} prompt + {len(out.tokens)} generated tokens, load {load_s:.1f}s, "
          f"generate {gen_s:.1f}s ({len(out.tokens) / max(gen_s, 1e-9):.1f} tok/s)]", file=sys.stderr)
    return 0


def _run_device(choice: str) -> str:
    """``run``'s device: the NPU when asked for, or by default when one is visible; else the CPU.
    The ops follow the device (ops.backend_for), so a CPU run on an Atlas host runs ops.cpu."""
    from ops import npu_visible

    if choice == "auto":
        return "npu" if npu_visible() else "cpu"
    if choice == "npu" and not npu_visible():
        raise ValueError("--device npu: no NPU is visible (torch_npu is not importable or "
                         "torch.npu.is_available() is False); run with --device cpu")
    return choice


def _resolve_config(model: str):
    import os

    from .config import EMBEDDING_FAMILY, FAMILY, Qwen3Config, family_config
    if model in FAMILY or model in EMBEDDING_FAMILY:
        return family_config(model)
    if os.path.isdir(model):
        return Qwen3Config.from_model_dir(model)
    raise ValueError(f"--model {model!r} is neither a Qwen3 family name "
                     f"({', '.join(list(FAMILY) + list(EMBEDDING_FAMILY))}) nor a checkpoint directory")


def _plan(args: argparse.Namespace) -> int:
    from .parallel.plan import plan_summary

    cfg = _resolve_config(args.model)
    if args.hw or args.precision or args.pp > 1:
        return _memory_plan(args, cfg)
    if args.dtype:
        cfg = cfg.with_dtype(args.dtype)
    print(plan_summary(cfg, args.tp, args.ep))
    return 0


def _memory_plan(args: argparse.Namespace, cfg) -> int:
    import os

    from .deploy.planner import plan, recommend
    from .parallel.plan import PP_PARTITION_ENV

    from .config import is_embedding_model

    hw, precision = args.hw or "atlas-800i-a2", args.precision or "bf16"
    head = not is_embedding_model(args.model)     # Qwen3-Embedding: no output head
    best, plans = recommend(cfg, hw=hw, precision=precision, max_model_len=args.max_model_len,
                            head=head)
    print(f"{'tp':>3} {'weights GiB/NPU':>16} {'KV tokens/NPU':>14} {'full-length seqs':>17}")
    for p in plans:
        print(f"{p.tp:>3} {p.weights_gib:>16.2f} {p.kv_tokens:>14,} {p.full_length_sequences:>17}"
              + ("" if p.fits else "  does not fit"))
    if best is None:
        print(f"\nno tp on one {hw} fits {cfg.name} {precision} at max_model_len {args.max_model_len}: "
              f"use w8a8, a shorter context or two nodes")
        return 1
    print(f"\nrecommended: tp={best} (the smallest tp holding 8 full-length sequences, else the "
          f"smallest that fits)\n")
    print(plan(cfg, hw=hw, precision=precision, tp=args.tp if args.tp > 1 else best, ep=cfg.is_moe,
               max_model_len=args.max_model_len, pp=args.pp,
               pp_partition=os.environ.get(PP_PARTITION_ENV), head=head).report())
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .quant.description import SCHEMES
    from .quantizer import quantize_checkpoint

    s = quantize_checkpoint(args.model, args.out, args.scheme, calib=args.calib, smooth=args.smooth,
                            max_calib_tokens=args.calib_tokens, progress=not args.no_progress)
    print(f"wrote {s['out_dir']}: {s['scheme']} ({SCHEMES[s['scheme']]}; {s['dtype']}), "
          f"{s['tensors']} tensors, "
          f"{s['bytes_out'] / 2**20:.1f} MiB (float weights {s['bytes_in'] / 2**20:.1f} MiB), "
          f"calibrated on {s['calib_tokens']} tokens from {s['calib_samples']} samples"
          + (f", smoothing alpha {s['smooth']}" if s['smooth'] is not None else "")
          + f", {s['seconds']:.1f}s")
    return 0


def _home() -> str:
    import os
    return os.environ.get("ASCEND_QWEN3_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                "ascend-qwen3")


def _tiny(args: argparse.Namespace) -> int:
    from .serve.default_model import build_default_model
    from .serve.train_tiny import default_source

    if args.draft:
        # the default model's EAGLE-3 draft (what `serve --speculative eagle3` uses with it)
        from .deploy.launcher import LaunchError
        from .serve.default_model import build_default_draft
        from .serve.train_draft import default_draft_source

        source, target = default_draft_source(_home()), default_source(_home())
        if args.random or source is None or target is None:
            raise LaunchError("the embedded default model's EAGLE-3 draft is trained, not random: "
                              "it is neither packaged nor trained here (run `make train-tiny`)"
                              if not args.random else "--draft and --random do not go together: "
                              "the draft is made for the trained model")
        if args.force:
            import shutil

            shutil.rmtree(args.out, ignore_errors=True)
        build_default_draft(args.out, source=source, target_source=target,
                            log=lambda m: print(m, file=sys.stderr))
        print(args.out)
        return 0
    source = None if args.random else default_source(_home())
    build_default_model(args.out, source=source, force=args.force,
                        log=lambda m: print(m, file=sys.stderr))
    print(args.out)
    return 0


def _train_tiny(args: argparse.Namespace) -> int:
    from .serve.train_tiny import Recipe, train_tiny

    kinds = ("dense", "moe") if args.kind == "both" else (args.kind,)
    recipe = Recipe(seed=args.seed) if args.steps is None else Recipe(seed=args.seed, steps=args.steps)
    t = time.perf_counter()
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    out = train_tiny(args.home or _home(), kinds, recipe, force=args.force, package=args.package,
                     log=say)
    for kind in kinds:
        print(out[kind])
    if "dense" in kinds and not args.no_draft:
        # the default model's EAGLE-3 draft, trained on what the dense model just became
        from .serve.train_draft import DraftRecipe, train_tiny_draft
        print(train_tiny_draft(args.home or _home(), DraftRecipe(seed=args.seed), force=args.force,
                               package=args.package, log=say))
    if "dense" in kinds and not args.no_lora:
        # the default model's LoRA adapter (serve --lora default), trained on the same base
        from .serve.train_lora import LoraRecipe, train_tiny_lora
        print(train_tiny_lora(args.home or _home(), LoraRecipe(seed=args.seed), force=args.force,
                              package=args.package, log=say))
    print(f"train-tiny: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> int:
    """Print every problem of the checkpoint, one a line, then a summary; 2 if there is any."""
    from .check import check_checkpoint

    report = check_checkpoint(args.model, deep=args.deep, tp=args.tp, ep=args.ep)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 0 if report.ok else 2


def _default_model() -> str:
    """The embedded default model's directory, built on first use (the trained tiny Qwen3, or
    random weights where there is none, said on stderr)."""
    import os

    from .serve.default_model import build_default_model
    from .serve.train_tiny import default_source

    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    source = default_source(_home())
    if source is None:
        say("no trained tiny Qwen3 here (neither packaged nor trained): using random weights; "
            "`make train-tiny` trains one (about 10 minutes on 2 cores), which is used from then on")
    return build_default_model(os.path.join(_home(), "default-model"), source=source, log=say)


def _npu_acceptance(args: argparse.Namespace) -> int:
    """Tier-3 tests, then each model with the project's and the built-in class in each graph
    mode; writes acceptance.md / acceptance.json; 1 if any section failed (deploy/acceptance.py)."""
    from .check import check_checkpoint
    from .deploy.acceptance import run_acceptance

    for m in args.model or []:      # a bad checkpoint fails here, before anything runs
        check_checkpoint(m, tp=args.tp).raise_for_problems(
            "found by the header-only check; fix it, or name another checkpoint with --model")
    default = _default_model()
    models = [("default (embedded tiny Qwen3)", default, 1)]
    models += [(m, m, args.tp) for m in args.model or []]
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    report = run_acceptance(models, args.out, log=say,
                            skip_tests="--skip-tests was given" if args.skip_tests else "",
                            cpu_graph_mode="NONE" if args.cpu_eager else None,
                            decode={"batch": args.decode_batch, "prompt": args.decode_prompt,
                                    "new": args.decode_new, "repeats": args.repeats},
                            speculative=_speculative_check(default))
    failed = [s["title"] for s in report["sections"] if s["status"] == "failed"]
    if failed:
        say(f"npu-acceptance: failed: {'; '.join(failed)} (see the report)")
    return 1 if failed else 0


def _speculative_check(default: str):
    """(the default model, its EAGLE-3 draft or None, held-out chat prompts of its domain as
    token ids) for npu-acceptance's speculative section."""
    from transformers import AutoTokenizer

    from .deploy.launcher import LaunchError
    from .serve.train_draft import chat_prompt_ids, heldout_prompts

    try:
        draft = _default_draft(default)
    except LaunchError as exc:
        print(f"npu-acceptance: no EAGLE-3 draft: {exc}", file=sys.stderr)
        draft = None
    tok = AutoTokenizer.from_pretrained(default)
    return default, draft, chat_prompt_ids(tok, heldout_prompts())


def _serve(args: argparse.Namespace) -> int:
    import os

    from .check import SKIP_ADVICE, check_checkpoint
    from .deploy.launcher import ServeSpec, launch
    from .serve.default_model import served_name

    if args.profile:
        from .deploy.launcher import LaunchError
        from .deploy.profiles import load_profile, plan_of, to_spec
        # the profile decides the model, parallelism, context, batch and thinking default
        clash = [flag for flag, given in (
            ("--model", args.model), ("--served-model-name", args.served_model_name),
            ("--device cpu", args.device == "cpu"), ("--dtype", args.dtype), ("--tp", args.tp),
            ("--pp", args.pp), ("--ep", args.ep), ("--max-model-len", args.max_model_len),
            ("--max-num-seqs", args.max_num_seqs), ("--no-thinking", args.no_thinking),
            ("--graph-mode", args.graph_mode), ("--dp", args.dp),
            ("--speculative", args.speculative), ("--draft", args.draft),
            ("--speculative-tokens", args.speculative_tokens), ("--runner", args.runner)) if given]
        if clash:
            raise LaunchError(f"{', '.join(clash)} cannot be combined with --profile (the profile "
                              f"sets them, on the NPU); edit deploy/profiles/{args.profile}.yaml, "
                              f"or serve with --model instead of --profile")
        p = load_profile(args.profile)
        print("# " + plan_of(p).report().replace("\n", "\n# "))
        spec = to_spec(p, host=args.host or "0.0.0.0", port=args.port)
        _place_node(spec, args)
        spec.api_key_file = args.api_key_file
        if not args.skip_check and os.path.isdir(spec.model):  # the container path may not be here
            check_checkpoint(spec.model).raise_for_problems(SKIP_ADVICE)
        spec.extra_args += [a for a in args.vllm_args if a != "--"]
        spec.loras.update(_loras(args, default_model=False, model=spec.model))
        _lora_options(spec, args)
        return launch(spec, dry_run=args.dry_run)
    model, name = args.model, args.served_model_name
    if model is None:
        model = _default_model()
        name = name or served_name(model)
    if not args.skip_check:  # header-only: a bad checkpoint fails here, before vLLM starts
        check_checkpoint(model).raise_for_problems(SKIP_ADVICE)
    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    speculative = _speculative(args, default_model=args.model is None, model=model)
    spec = ServeSpec(model=model, served_model_name=name, host=args.host or "127.0.0.1",
                     port=args.port or 8000, device=args.device or "cpu", dtype=args.dtype or "auto",
                     tp=args.tp or 1, pp=args.pp or 1, expert_parallel=args.ep,
                     max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                     thinking=not args.no_thinking, api_key_file=args.api_key_file,
                     graph_mode=args.graph_mode, dp=args.dp or 1, speculative=speculative,
                     runner=args.runner or "generate", extra_args=extra,
                     loras=_loras(args, default_model=args.model is None, model=model))
    _lora_options(spec, args)
    if args.node_rank is not None or ((args.dp or 1) > 1 and args.leader_address):
        spec.nodes = spec.dp            # one data-parallel rank per node
    _place_node(spec, args)
    return launch(spec, dry_run=args.dry_run)


def _loras(args: argparse.Namespace, default_model: bool, model: str) -> dict:
    """The serve command's LoRA adapters (name -> directory): each --lora NAME=PATH; ``--lora
    default`` is the default model's shipped adapter (serve/train_lora.py), written beside it on
    first use."""
    import os

    from .deploy.launcher import LaunchError

    out = {}
    for item in args.lora or []:
        if item == "default":
            if not default_model:
                raise LaunchError("--lora default is the adapter trained for the embedded default "
                                  "model; with --model or --profile pass --lora NAME=PATH")
            from .serve.default_model import TRAINED_NAME, served_name
            from .serve.train_lora import LORA_NAME, build_default_lora
            from .serve.train_tiny import default_source

            base = default_source(_home())
            if base is None or served_name(model) != TRAINED_NAME:
                raise LaunchError("--lora default needs the trained default model (neither packaged "
                                  "nor trained here): run `make train-tiny`")
            try:
                out[LORA_NAME] = build_default_lora(_home(), base_source=base,
                                                    log=lambda m: print(m, file=sys.stderr))
            except (FileNotFoundError, ValueError) as exc:
                raise LaunchError(str(exc)) from None
            continue
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise LaunchError(f"--lora {item!r}: expected NAME=PATH (the name clients send as the "
                              f"request's model, the PEFT adapter directory), or `default`")
        if name in out:
            raise LaunchError(f"--lora {name} is given twice; give each adapter its own name")
        out[name] = os.path.abspath(path)
    return out


def _lora_options(spec, args: argparse.Namespace) -> None:
    from .deploy.launcher import LaunchError

    if args.max_loras is not None:
        if args.max_loras < 1:
            raise LaunchError(f"--max-loras {args.max_loras} must be >= 1")
        spec.max_loras = args.max_loras
    spec.allow_runtime_lora = spec.allow_runtime_lora or args.allow_runtime_lora


def _speculative(args: argparse.Namespace, default_model: bool, model: str):
    """The serve command's speculative setting (None without --speculative). EAGLE-3 on the
    embedded default model drafts with its shipped draft unless --draft names another."""
    from .deploy.launcher import LaunchError
    from .speculative import Speculative, SpeculativeError

    if args.speculative is None:
        if args.draft or args.speculative_tokens:
            raise LaunchError("--draft and --speculative-tokens need --speculative METHOD")
        return None
    draft = args.draft
    if draft is None and args.speculative == "eagle3" and default_model:
        draft = _default_draft(model)
    d = {"method": args.speculative, "num_speculative_tokens": args.speculative_tokens or 3}
    if draft:
        d["model"] = draft
    try:
        return Speculative.from_dict(d, "--speculative")
    except SpeculativeError as exc:
        raise LaunchError(str(exc).replace("--speculative.model", "--draft")) from None


def _default_draft(model_dir: str) -> str:
    """The embedded default model's EAGLE-3 draft, built beside it on first use."""
    import os

    from .deploy.launcher import LaunchError
    from .serve.default_model import build_default_draft
    from .serve.train_draft import default_draft_source
    from .serve.train_tiny import default_source

    home, target = _home(), default_source(_home())
    source = default_draft_source(home)
    if source is None or target is None:
        raise LaunchError("the embedded default model has no EAGLE-3 draft here (neither packaged "
                          "nor trained): run `make train-tiny`, or pass --draft DIR")
    try:
        return build_default_draft(os.path.join(home, "default-model-eagle3"), source=source,
                                   target_source=target, log=lambda m: print(m, file=sys.stderr))
    except ValueError as exc:
        raise LaunchError(str(exc)) from None


def _place_node(spec, args: argparse.Namespace) -> None:
    """This node's place in a multi-node deployment: --node-rank / --leader-address, else the
    variables a Kubernetes LeaderWorkerSet sets in each pod; the ports when given."""
    import os

    from .deploy.launcher import LWS_INDEX_ENV, LWS_LEADER_ENV, LaunchError

    if spec.nodes == 1:
        if args.node_rank not in (None, 0) or args.leader_address:
            raise LaunchError("--node-rank and --leader-address are for multi-node deployments "
                              "(a 2-node profile, or --dp N with one rank per node)")
        return
    rank = args.node_rank
    if rank is None and os.environ.get(LWS_INDEX_ENV, "").isdigit():
        rank = int(os.environ[LWS_INDEX_ENV])
    spec.node_rank = rank
    spec.leader_address = args.leader_address or os.environ.get(LWS_LEADER_ENV) or None
    if args.dp_rpc_port:
        spec.dp_rpc_port = args.dp_rpc_port
    if args.peer_port:
        spec.peer_port = args.peer_port


def _loadtest(args: argparse.Namespace) -> int:
    """Concurrent streaming chat load on a live server; 1 if any request failed (loadtest.py)."""
    from .loadtest import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from .quant.description import SCHEMES

    p = argparse.ArgumentParser(prog="ascend-qwen3", description="Qwen3 on Ascend NPUs (with a CPU fallback)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="generate text from a checkpoint with the project's graph")
    r.add_argument("--model", required=True, help="Hugging Face Qwen3 checkpoint directory")
    r.add_argument("--prompt", required=True)
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    r.add_argument("--no-think", action="store_true", help="with --chat: enable_thinking=False")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: config's)")
    r.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    r.add_argument("--lora", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter directory, merged into the weights")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "npu"],
                   help="where to build and run the model (auto: the NPU if one is visible); "
                        "the ops follow the device")
    r.set_defaults(func=_run)

    pl = sub.add_parser("plan", help="print the tensor/expert-parallel sharding plan of a model")
    pl.add_argument("--model", required=True, help="a family name (e.g. Qwen3-32B) or a checkpoint dir")
    pl.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    pl.add_argument("--ep", action="store_true", help="expert parallel (MoE): whole experts per rank")
    pl.add_argument("--pp", type=int, default=1,
                    help="pipeline-parallel size for the memory plan (with --hw): each stage's "
                         "weights and KV cache (VLLM_PP_LAYER_PARTITION, if set, is the split)")
    pl.add_argument("--dtype", default=None, help="weight dtype for byte counts (default: config's)")
    pl.add_argument("--hw", default=None, help="memory plan for a machine: atlas-800i-a2 (64 GB), "
                    "atlas-800i-a2-64g, atlas-800i-a2-32g")
    pl.add_argument("--precision", default=None, choices=["bf16", *SCHEMES],
                    help="memory plan at this precision (with --hw; default bf16; the W8A8 ones "
                         "as `quantize --scheme` makes them)")
    pl.add_argument("--max-model-len", type=int, default=32768, help="context for the memory plan")
    pl.set_defaults(func=_plan)

    q = sub.add_parser("quantize", help="quantise a float checkpoint to msModelSlim W8A8 format")
    q.add_argument("--model", required=True, help="float Hugging Face Qwen3 checkpoint directory")
    q.add_argument("--out", required=True, help="new output directory (must not exist or be empty)")
    q.add_argument("--scheme", required=True, choices=list(SCHEMES),
                   help="; ".join(f"{k}: {v}" for k, v in SCHEMES.items()))
    q.add_argument("--calib", default=None,
                   help="calibration text file, samples separated by blank lines (default: built-in "
                        "multilingual set)")
    q.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant migration strength in [0, 1] (e.g. 0.5); default: no smoothing")
    q.add_argument("--calib-tokens", type=int, default=2048, help="calibration token budget")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_quantize)

    sv = sub.add_parser("serve", help="serve a checkpoint on vLLM's OpenAI endpoint with the plugin")
    sv.add_argument("--profile", default=None,
                    help="a deploy profile (deploy/profiles/NAME.yaml): validated against the memory "
                         "planner, served on the NPU (host 0.0.0.0)")
    sv.add_argument("--model", default=None,
                    help="Qwen3 checkpoint directory (default: the embedded default model, trained, "
                         "built on first use under $ASCEND_QWEN3_HOME or ~/.cache/ascend-qwen3)")
    sv.add_argument("--served-model-name", default=None, help="name clients use (default: dir name)")
    sv.add_argument("--host", default=None, help="default 127.0.0.1 (0.0.0.0 with --profile)")
    sv.add_argument("--port", type=int, default=None, help="default 8000 (or the profile's port)")
    sv.add_argument("--device", default=None, choices=["cpu", "npu"],
                    help="cpu (default): vLLM's CPU build (here); npu: vllm-ascend (Atlas)")
    sv.add_argument("--dtype", default=None, help="auto (default) | bfloat16 | float16 | float32")
    sv.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default 1)")
    sv.add_argument("--pp", type=int, default=None,
                    help="pipeline-parallel size (default 1): the decoder layers split into this "
                         "many stages, tp devices each (it must divide the layers, unless "
                         "VLLM_PP_LAYER_PARTITION lists each stage's layers)")
    sv.add_argument("--ep", action="store_true", help="expert parallel (MoE models)")
    sv.add_argument("--dp", type=int, default=None,
                    help="data-parallel size (default 1); with --node-rank, one rank per node "
                         "(with --ep, the MoE experts are spread over dp x tp ranks)")
    sv.add_argument("--node-rank", type=int, default=None,
                    help="multi-node: this node (0 = the leader, serving the API; 1.. = headless "
                         "followers); default $LWS_WORKER_INDEX")
    sv.add_argument("--leader-address", default=None,
                    help="multi-node: the leader node's address, on every node; default "
                         "$LWS_LEADER_ADDRESS")
    sv.add_argument("--dp-rpc-port", type=int, default=None,
                    help="multi-node: vLLM's data-parallel RPC port on the leader (default 13389)")
    sv.add_argument("--peer-port", type=int, default=None,
                    help="multi-node: the launchers' supervision link on the leader (default 13390)")
    sv.add_argument("--graph-mode", default=None, choices=["FULL_AND_PIECEWISE", "PIECEWISE", "NONE"],
                    help="NPU only: FULL_AND_PIECEWISE (default, vllm-ascend's: full ACL graphs for "
                         "decode steps, graph pieces for the rest), PIECEWISE (graph pieces, "
                         "attention eager between them) or NONE (eager)")
    sv.add_argument("--max-model-len", type=int, default=None)
    sv.add_argument("--max-num-seqs", type=int, default=None)
    sv.add_argument("--runner", default=None, choices=["generate", "pooling"],
                    help="pooling: an embedding server (/v1/embeddings) for a Qwen3-Embedding "
                         "checkpoint (docs/serving.md, Embeddings); default generate")
    sv.add_argument("--no-thinking", action="store_true",
                    help="server default enable_thinking=false (and non-thinking sampling defaults)")
    sv.add_argument("--speculative", default=None, choices=["eagle3", "eagle", "draft_model", "ngram"],
                    help="speculative decoding: eagle3 (on the default model: its trained draft), "
                         "eagle, draft_model (--draft: a smaller Qwen3 of the same vocabulary) or "
                         "ngram (prompt lookup); the thinking budget still applies (docs/serving.md)")
    sv.add_argument("--draft", default=None, help="the draft checkpoint directory (eagle3, eagle, "
                    "draft_model)")
    sv.add_argument("--speculative-tokens", type=int, default=None,
                    help="tokens drafted per step (default 3; at most 14 on the NPU)")
    sv.add_argument("--api-key-file", default=None,
                    help="a file holding the API key clients must send (e.g. a mounted Kubernetes "
                         "Secret); default: $VLLM_API_KEY if set, else no key")
    sv.add_argument("--lora", action="append", default=None, metavar="NAME=PATH",
                    help="serve a LoRA adapter (PEFT directory, safetensors) under NAME "
                         "(repeatable); `--lora default`: the default model's shipped adapter")
    sv.add_argument("--max-loras", type=int, default=None,
                    help="LoRA adapters in one batch (default: as many as --lora gives)")
    sv.add_argument("--allow-runtime-lora", action="store_true",
                    help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter (needs an API "
                         "key off 127.0.0.1)")
    sv.add_argument("--dry-run", action="store_true", help="print the vllm command and exit")
    sv.add_argument("--skip-check", action="store_true",
                    help="do not check the checkpoint (ascend-qwen3 check, header-only) before starting")
    sv.add_argument("vllm_args", nargs=argparse.REMAINDER,
                    help="after --: extra arguments passed to `vllm serve` unchanged")
    sv.set_defaults(func=_serve)

    na = sub.add_parser("npu-acceptance", help="on an Atlas host: the tier-3 tests, then the default "
                        "model and any --model with the project's and vllm-ascend's built-in Qwen3 "
                        "class in FULL_AND_PIECEWISE and PIECEWISE (logprob distance, decode "
                        "tokens/s), into a Markdown + JSON report; off the NPU, what it can")
    na.add_argument("--model", action="append", default=None,
                    help="a Qwen3 checkpoint directory to run too (repeatable)")
    na.add_argument("--out", default="acceptance-report",
                    help="directory for acceptance.md and acceptance.json (default: %(default)s)")
    na.add_argument("--tp", type=int, default=1, help="tensor-parallel size for --model (default 1)")
    na.add_argument("--skip-tests", action="store_true", help="do not run pytest -m npu")
    na.add_argument("--cpu-eager", action="store_true",
                    help="off the NPU: run the CPU engines eagerly (quicker to start; by default "
                         "vLLM compiles them, as make serve does)")
    na.add_argument("--decode-batch", type=int, default=8, help="decode batch (default %(default)s)")
    na.add_argument("--decode-prompt", type=int, default=128, help="prompt tokens (default %(default)s)")
    na.add_argument("--decode-new", type=int, default=64, help="new tokens (default %(default)s)")
    na.add_argument("--repeats", type=int, default=3, help="timed decodes per engine (default %(default)s)")
    na.set_defaults(func=_npu_acceptance)

    ck = sub.add_parser("check", help="check a checkpoint (config, safetensors headers and sizes, "
                        "tensors, quant description, tokenizer) without loading it")
    ck.add_argument("model", metavar="MODEL", help="Hugging Face Qwen3 checkpoint directory")
    ck.add_argument("--deep", action="store_true", help="also read every weight and refuse NaN / Inf")
    ck.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check against")
    ck.add_argument("--ep", action="store_true", help="expert parallel (MoE) to check against")
    ck.set_defaults(func=_check)

    from .loadtest import add_arguments as loadtest_arguments   # standard library only
    lt = sub.add_parser("loadtest", help="drive a live server with concurrent streaming chat "
                        "requests in mixed thinking modes; report latency, TTFT, tokens/s, errors")
    loadtest_arguments(lt).set_defaults(func=_loadtest)

    tt = sub.add_parser("train-tiny", help="train the tiny Qwen3 (dense and MoE, real tokenizer) on "
                        "the offline corpus; cached under $ASCEND_QWEN3_HOME/trained")
    tt.add_argument("--kind", default="both", choices=["dense", "moe", "both"])
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    tt.add_argument("--home", default=None, help="default: $ASCEND_QWEN3_HOME or ~/.cache/ascend-qwen3")
    tt.add_argument("--force", action="store_true", help="train again even if it is there")
    tt.add_argument("--no-draft", action="store_true", help="do not train the dense model's "
                    "EAGLE-3 draft (speculative decoding: serve --speculative eagle3)")
    tt.add_argument("--no-lora", action="store_true", help="do not train the dense model's "
                    "LoRA adapter (a sign-off line: serve --lora default)")
    tt.add_argument("--package", action="store_true",
                    help="maintainers: copy the dense result into the package (what make serve "
                         "serves on a fresh clone)")
    tt.set_defaults(func=_train_tiny)

    t = sub.add_parser("tiny", help="build the embedded default model into a directory (the trained "
                       "tiny Qwen3, or random weights where there is none)")
    t.add_argument("--out", required=True, help="directory to create")
    t.add_argument("--force", action="store_true", help="rebuild even if it is there")
    t.add_argument("--random", action="store_true", help="random weights, even where a trained "
                   "model is there")
    t.add_argument("--draft", action="store_true", help="build the default model's EAGLE-3 draft "
                   "instead (what `serve --speculative eagle3` takes with the default model)")
    t.set_defaults(func=_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError
    from .loader import CheckpointError
    from .parallel.plan import ShardingError
    from .deploy.launcher import LaunchError
    from .deploy.planner import PlanError
    from .deploy.profiles import ProfileError
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ShardingError, LaunchError, PlanError, ProfileError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
