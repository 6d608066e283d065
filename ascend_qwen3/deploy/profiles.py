"""Deployment profiles: one YAML per (model, precision, machine) under ``deploy/profiles/``.

A profile says how to serve one Qwen3 model on Atlas 800I A2 servers: parallelism, context,
batch, KV block size, parsers, sampling defaults per thinking mode, devices and environment.
``load_profile`` validates it against ``SCHEMA`` (every key, type and allowed value; unknown keys
are errors) and against the memory planner (it must fit its hardware); ``to_spec`` turns it into
the launcher's ``ServeSpec``.
"""

from __future__ import annotations

import os

import yaml

from ..config import EMBEDDING_FAMILY, FAMILY, NO_YARN, family_config
from ..speculative import NPU_MAX_SPECULATIVE_TOKENS, Speculative, SpeculativeError, check_tokens
from .launcher import DP_RPC_PORT, ServeSpec
from .planner import HARDWARE, PRECISIONS, Plan, plan

# key -> (type(s), required, check or None, help)
_int, _bool, _str = int, bool, str
SCHEMA: dict[str, tuple] = {
    "name": (_str, True, None, "profile name, equal to the file name without .yaml"),
    "description": (_str, False, None, "one line for humans"),
    "model": (_str, True, lambda v: v in FAMILY or v in EMBEDDING_FAMILY,
              f"one of {', '.join(list(FAMILY) + list(EMBEDDING_FAMILY))}"),
    "runner": (_str, False, lambda v: v in ("generate", "pooling"),
               "generate (default: chat and completions) or pooling (embeddings on "
               "/v1/embeddings: the Qwen3-Embedding models, which need it)"),
    "model_path": (_str, True, lambda v: v.startswith("/"), "absolute checkpoint path in the container"),
    "served_model_name": (_str, True, None, "the name clients send as `model`"),
    "precision": (_str, True, lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "hardware": (_str, True, lambda v: v in HARDWARE, f"one of {', '.join(HARDWARE)}"),
    "nodes": (_int, False, lambda v: v in (1, 2), "1, or 2 (one data-parallel rank per node)"),
    "dp": (_int, False, lambda v: v in (1, 2), "data-parallel size (1 or 2; one rank per node "
           "when nodes is 2)"),
    "tp": (_int, True, lambda v: v in (1, 2, 4, 8), "tensor-parallel size per data-parallel rank "
           "(1, 2, 4, 8)"),
    "pipeline_parallel_size": (_int, False, lambda v: v in (1, 2, 4, 8),
                               "pipeline stages per data-parallel rank (1, 2, 4, 8; default 1), "
                               "tp NPUs each; it must divide the model's layers unless env sets "
                               "VLLM_PP_LAYER_PARTITION"),
    "expert_parallel": (_bool, False, None, "MoE: whole experts per rank (EP = dp x tp)"),
    "max_model_len": (_int, True, lambda v: 1024 <= v <= 131072, "context length (1024 to 131072)"),
    "yarn": (_bool, False, None, "YaRN rope scaling x4 (needed past 32768 tokens)"),
    "max_num_seqs": (_int, True, lambda v: 1 <= v <= 1024, "concurrent sequences (1 to 1024)"),
    "max_num_batched_tokens": (_int, False, lambda v: v >= 256, "tokens per engine step"),
    "block_size": (_int, True, lambda v: v == 128, "KV-cache block size: 128 on the NPU"),
    "memory_utilization": (float, False, lambda v: 0.5 <= v <= 0.95, "fraction of HBM vLLM may use"),
    "thinking": (_bool, True, None, "server default for enable_thinking"),
    "reasoning_parser": (_str, True, lambda v: v == "qwen3", "qwen3"),
    "tool_call_parser": (_str, True, lambda v: v == "hermes", "hermes (Qwen3's tool-call format)"),
    "sampling": (dict, True, lambda v: set(v) == {"thinking", "non_thinking"},
                 "{thinking: {...}, non_thinking: {...}} sampling defaults"),
    "devices": (list, True, lambda v: all(isinstance(d, int) and 0 <= d <= 7 for d in v),
                "NPU ids per node (ASCEND_RT_VISIBLE_DEVICES)"),
    "port": (_int, False, lambda v: 1 <= v <= 65535, "server port (default 8000)"),
    "distributed_executor_backend": (_str, False, lambda v: v == "mp",
                                     "mp (vLLM's multiprocessing executor, on every node)"),
    "dp_rpc_port": (_int, False, lambda v: 1024 <= v <= 65535,
                    "multi-node: vLLM's data-parallel RPC port on the leader (default 13389)"),
    "env": (dict, False, lambda v: all(isinstance(x, str) for x in v.values()),
            "extra environment variables (string values)"),
    "graph_mode": (_str, False, lambda v: v in ("FULL_AND_PIECEWISE", "PIECEWISE", "NONE"),
                   "FULL_AND_PIECEWISE (default, vllm-ascend's: full ACL graphs for decode, "
                   "graph pieces for the rest), PIECEWISE (graph pieces, attention eager between "
                   "them) or NONE (eager, --enforce-eager)"),
    "speculative": (dict, False, None,
                    "speculative decoding: {method: eagle3 | eagle | draft_model | ngram, model: "
                    "the draft's absolute path in the container (not for ngram), "
                    f"num_speculative_tokens: 1..{NPU_MAX_SPECULATIVE_TOKENS}, family: the draft "
                    "model's Qwen3 family (draft_model: for the memory plan)}"),
    "api_key": (_str, False, lambda v: v in ("optional", "required"),
                "optional (default: clients authenticate when VLLM_API_KEY / --api-key-file gives "
                "a key) or required (refuse to start without one)"),
    "lora_modules": (dict, False, lambda v: v and all(
        isinstance(k, str) and k and "=" not in k and isinstance(x, str) and x.startswith("/")
        for k, x in v.items()),
        "LoRA adapters served: {name: the PEFT adapter directory's absolute path in the "
        "container} (clients send the name as the request's model)"),
    "max_lora_rank": (_int, False, lambda v: v in (1, 8, 16, 32, 64, 128, 256, 320, 512),
                      "the largest adapter rank to serve, one of vLLM's 1, 8, 16, 32, 64, 128, "
                      "256, 320, 512 (default: the adapters' own, read where they are here, "
                      "else 16)"),
}
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "presence_penalty"}
# what only a text-generation server has: required there, refused in an embedding profile
GENERATION_KEYS = ("thinking", "reasoning_parser", "tool_call_parser", "sampling", "speculative")


class ProfileError(ValueError):
    """A profile that is malformed or does not fit; the message names the key and the fix."""


def profiles_dir() -> str:
    """$ASCEND_QWEN3_PROFILES, else deploy/profiles of the source tree, else the image's copy."""
    env = os.environ.get("ASCEND_QWEN3_PROFILES")
    if env:
        return env
    here = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "profiles")
    for d in (os.path.normpath(here), "/opt/ascend-qwen3/deploy/profiles"):
        if os.path.isdir(d):
            return d
    raise ProfileError("no profiles directory: set ASCEND_QWEN3_PROFILES to the deploy/profiles "
                       "directory of the ascend-qwen3 sources")


def profile_names(directory: str | None = None) -> list[str]:
    d = directory or profiles_dir()
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml"))


def validate(p: dict, where: str = "profile") -> None:
    if not isinstance(p, dict):
        raise ProfileError(f"{where} must be a YAML mapping, found {type(p).__name__}")
    unknown = sorted(set(p) - set(SCHEMA))
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SCHEMA)}")
    pooling = p.get("runner") == "pooling"
    if pooling and any(k in p for k in GENERATION_KEYS):
        raise ProfileError(f"{where}: runner pooling (an embedding server) generates no text; "
                           f"remove {', '.join(k for k in GENERATION_KEYS if k in p)}")
    for key, (typ, required, check, help_) in SCHEMA.items():
        if key not in p:
            if required and not (pooling and key in GENERATION_KEYS):
                raise ProfileError(f"{where}: missing required key {key!r} ({help_})")
            continue
        v = p[key]
        ok_type = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
        if typ is float:
            ok_type = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok_type:
            raise ProfileError(f"{where}: {key} = {v!r} must be a {typ.__name__} ({help_})")
        if check is not None and not check(v):
            raise ProfileError(f"{where}: {key} = {v!r} is not allowed; expected {help_}")
    for mode, values in p.get("sampling", {}).items():
        bad = set(values) - SAMPLING_KEYS if isinstance(values, dict) else {"(not a mapping)"}
        if bad:
            raise ProfileError(f"{where}: sampling.{mode} has {', '.join(sorted(bad))}; allowed: "
                               f"{', '.join(sorted(SAMPLING_KEYS))}")
    if "VLLM_API_KEY" in p.get("env", {}):
        raise ProfileError(f"{where}: env sets VLLM_API_KEY; a key does not belong in a profile "
                           f"file: export it, or use serve --api-key-file (e.g. a mounted Secret)")
    nodes, dp = p.get("nodes", 1), p.get("dp", 1)
    if dp % nodes:
        raise ProfileError(f"{where}: {nodes} nodes need dp to be a multiple of {nodes} (each node "
                           f"runs dp / nodes data-parallel ranks; tensor parallel stays inside a "
                           f"node); set dp: {nodes}")
    pp = p.get("pipeline_parallel_size", 1)
    if len(p["devices"]) != p["tp"] * pp * dp // nodes:
        stages = f" x pp {pp}" if pp > 1 else ""
        raise ProfileError(f"{where}: {len(p['devices'])} device(s) per node but tp {p['tp']}{stages} x "
                           f"{dp // nodes} data-parallel rank(s) per node need "
                           f"{p['tp'] * pp * dp // nodes}; list that many NPU ids in devices")
    cfg = family_config(p["model"])
    if pooling != (p["model"] in EMBEDDING_FAMILY):
        raise ProfileError(f"{where}: {p['model']} " + (
            "is an embedding model (no output head): set runner: pooling" if not pooling else
            f"is a generative model; runner pooling serves the embedding models "
            f"({', '.join(EMBEDDING_FAMILY)})"))
    if pp > 1:
        from ..parallel.plan import PP_PARTITION_ENV, check_pipeline
        try:
            check_pipeline(cfg, pp, p.get("env", {}).get(PP_PARTITION_ENV))
        except ValueError as exc:
            raise ProfileError(f"{where}: pipeline_parallel_size: {exc}") from None
        if "speculative" in p:
            raise ProfileError(f"{where}: speculative decoding with pipeline_parallel_size {pp} is "
                               f"not supported by the project's classes; remove one of them "
                               f"(tensor parallel spreads the model with speculative decoding)")
    if p["max_model_len"] > 32768 and not p.get("yarn"):
        raise ProfileError(f"{where}: max_model_len {p['max_model_len']} is past Qwen3's native 32768; "
                           f"set yarn: true (models from Qwen3-4B up) or lower max_model_len")
    if p.get("yarn") and p["model"] in NO_YARN:
        raise ProfileError(f"{where}: {p['model']} has a 32K context without YaRN; set yarn: false")
    if p.get("expert_parallel") and not cfg.is_moe:
        raise ProfileError(f"{where}: expert_parallel is for MoE models; {p['model']} is dense")
    if "speculative" in p:
        try:
            s = Speculative.from_dict(p["speculative"], f"{where}: speculative")
            check_tokens(s, "npu", f"{where}: speculative")
        except SpeculativeError as exc:
            raise ProfileError(str(exc)) from None
        if s.model and not s.model.startswith("/"):
            raise ProfileError(f"{where}: speculative.model {s.model!r} must be an absolute path in "
                               f"the container (e.g. /models/qwen3-8b-eagle3)")
        if s.method == "draft_model" and s.family is None:
            raise ProfileError(f"{where}: speculative.family must name the draft model's Qwen3 "
                               f"family (e.g. Qwen3-0.6B): the memory plan counts its weights and "
                               f"KV cache")


def plan_of(p: dict) -> Plan:
    cfg = family_config(p["model"], yarn=bool(p.get("yarn")))
    spec = p.get("speculative") or {}
    return plan(cfg, hw=p["hardware"], precision=p["precision"], tp=p["tp"],
                ep=bool(p.get("expert_parallel")), nodes=p.get("nodes", 1), dp=p.get("dp", 1),
                max_model_len=p["max_model_len"], max_num_seqs=p["max_num_seqs"],
                memory_utilization=p.get("memory_utilization", 0.9), draft=spec.get("method"),
                draft_cfg=family_config(spec["family"]) if spec.get("family") else None,
                pp=p.get("pipeline_parallel_size", 1),
                pp_partition=p.get("env", {}).get("VLLM_PP_LAYER_PARTITION"),
                head=p.get("runner", "generate") != "pooling")


def load_profile(name_or_path: str, directory: str | None = None, check_fit: bool = True) -> dict:
    path = name_or_path if name_or_path.endswith(".yaml") else \
        os.path.join(directory or profiles_dir(), name_or_path + ".yaml")
    if not os.path.isfile(path):
        raise ProfileError(f"no profile {name_or_path!r} ({path}); available: "
                           f"{', '.join(profile_names(os.path.dirname(path)))}")
    try:
        with open(path) as f:
            p = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path} is not valid YAML: {exc}") from None
    where = os.path.basename(path)
    validate(p, where)
    if p["name"] != where[:-5]:
        raise ProfileError(f"{where}: name {p['name']!r} must equal the file name {where[:-5]!r}")
    if check_fit:
        pl = plan_of(p)
        if not pl.fits:
            raise ProfileError(f"{where} does not fit its hardware:\n{pl.report()}\nraise tp, lower "
                               f"max_model_len or use w8a8")
    return p


def to_spec(p: dict, host: str = "0.0.0.0", port: int | None = None) -> ServeSpec:
    """The launcher spec of a validated profile (device npu)."""
    mode = "thinking" if p.get("thinking", True) else "non_thinking"
    extra = ["--block-size", str(p["block_size"]),
             "--gpu-memory-utilization", str(p.get("memory_utilization", 0.9))]
    if p.get("max_num_batched_tokens"):
        extra += ["--max-num-batched-tokens", str(p["max_num_batched_tokens"])]
    if p.get("distributed_executor_backend"):
        extra += ["--distributed-executor-backend", p["distributed_executor_backend"]]
    env = dict(p.get("env", {}))
    return ServeSpec(require_api_key=p.get("api_key", "optional") == "required",
                     graph_mode=p.get("graph_mode", "FULL_AND_PIECEWISE"), model=p["model_path"], served_model_name=p["served_model_name"], host=host,
                     port=port or p.get("port", 8000), device="npu", dtype="bfloat16", tp=p["tp"],
                     pp=p.get("pipeline_parallel_size", 1),
                     expert_parallel=bool(p.get("expert_parallel")), max_model_len=p["max_model_len"],
                     max_num_seqs=p["max_num_seqs"], thinking=p.get("thinking", True),
                     sampling=p["sampling"][mode] if "sampling" in p else None,
                     runner=p.get("runner", "generate"), yarn=bool(p.get("yarn")),
                     config=family_config(p["model"], yarn=bool(p.get("yarn"))),
                     nodes=p.get("nodes", 1), dp=p.get("dp", 1), devices=list(p["devices"]),
                     dp_rpc_port=p.get("dp_rpc_port", DP_RPC_PORT), env=env,
                     speculative=Speculative.from_dict(p["speculative"]) if "speculative" in p
                     else None,
                     loras=dict(p.get("lora_modules", {})), max_lora_rank=p.get("max_lora_rank"),
                     extra_args=extra)
