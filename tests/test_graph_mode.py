"""The graph-mode policy on vllm-ascend 0.23, checked against its published source.

vllm-ascend 0.23 defaults to ``cudagraph_mode=FULL_AND_PIECEWISE``: FULL decode graphs around
the whole model, whose attention kernels it refreshes after each replay for the calls recorded
in its graph params. The project's attention records its own captured call there
(vllm_plugin/attention.py, tests/test_full_graph_emulated.py runs it), so:

- on the NPU the project's backend declares ``AttentionCGSupport.ALWAYS`` through its metadata
  builder's ``get_cudagraph_support`` (the hook vLLM and vllm-ascend consult for every layer's
  backend), as vllm-ascend's own builder does; on the CPU the platform builder's answer stands;
- vLLM then keeps FULL_AND_PIECEWISE (and an explicit FULL);
- the NPU launcher states the mode: ``--compilation-config {"cudagraph_mode":
  "FULL_AND_PIECEWISE"}`` by default, PIECEWISE or ``--enforce-eager`` (NONE) as profile choices.

What is proven here, without an NPU: each hook exists in the vLLM 0.23 / vllm-ascend 0.23 wheels
(read as text, like tests/test_vllm_compat.py), vllm-ascend's runner asks the layers' own
backends, the resolution run for real in the installed vLLM 0.32, and every NPU command carries
its mode. What the FULL participation relies on in vllm-ascend is pinned in
tests/test_full_graph_protocol.py. Not proven: a capture on an Atlas machine.
"""

from __future__ import annotations

import ast
import json

import pytest

from ascend_qwen3.config import family_config
from ascend_qwen3.deploy.launcher import LaunchError, ServeSpec, build_command
from tests.test_deploy import GOLDEN
from tests.test_vllm_compat import vllm_023, vllm_ascend_023  # noqa: F401  (fixtures)


def _function(tree, module: str, path: str) -> ast.FunctionDef:
    found = tree.resolve(module, path)
    assert found.kind == "function", (module, path, found.kind)
    return found.node


def _attr_chain(node) -> str:
    """'a.b.c' for an attribute chain (calls kept as '()')."""
    if isinstance(node, ast.Attribute):
        return f"{_attr_chain(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return f"{_attr_chain(node.func)}()"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _names(node) -> set[str]:
    return {_attr_chain(n) for n in ast.walk(node) if isinstance(n, (ast.Attribute, ast.Name))}


# --- the project's backend ---------------------------------------------------------------------

def test_backend_declares_full_graph_support_on_the_npu(monkeypatch):
    """ALWAYS on the NPU (replays get fresh lengths), the platform builder's own answer on the
    CPU (here, vLLM 0.32's CPU build)."""
    from vllm.v1.attention.backend import AttentionCGSupport

    from ascend_qwen3.vllm_plugin import compat
    from ascend_qwen3.vllm_plugin.attention import ops_attention_backend

    ours, base = ops_attention_backend(), compat.platform_attention_backend()
    builder = ours.get_builder_cls()
    assert issubclass(ours, base) and issubclass(builder, base.get_builder_cls())
    assert builder.get_cudagraph_support(None, None) == \
        base.get_builder_cls().get_cudagraph_support(None, None)
    monkeypatch.setattr(compat, "on_npu", lambda: True)
    assert builder.get_cudagraph_support(None, None) == AttentionCGSupport.ALWAYS
    assert ours.get_name() == base.get_name() and ours.forward_includes_kv_cache_update


# --- vLLM 0.23 and vllm-ascend 0.23, read from their wheels ------------------------------------

def test_vllm_023_keeps_full_graphs_for_an_always_backend(vllm_023):
    """vLLM 0.23 downgrades the mode only for less support than ALWAYS: its resolution tests
    the support against NEVER / ALWAYS before touching a FULL mode."""
    fn = _function(vllm_023, "vllm.config.compilation",
                   "CompilationConfig.resolve_cudagraph_mode_and_sizes")
    tests = {x for n in ast.walk(fn) if isinstance(n, ast.If) for x in _names(n.test)}
    assert {"AttentionCGSupport.NEVER", "AttentionCGSupport.ALWAYS"} <= tests, tests
    modes = vllm_023.resolve("vllm.config.compilation", "CUDAGraphMode").node
    members = {t.id for s in modes.body if isinstance(s, ast.Assign) for t in s.targets}
    assert {"NONE", "PIECEWISE", "FULL", "FULL_AND_PIECEWISE"} <= members
    assert "cudagraph_mode" in vllm_023.dataclass_fields("vllm.config.compilation", "CompilationConfig")


def test_vllm_ascend_023_asks_every_layer_backend(vllm_ascend_023):
    """vllm-ascend's runner builds the attention groups from each layer's own backend and takes
    the minimum graph support over their builders: our declaration is what it reads."""
    module, runner = "vllm_ascend.worker.model_runner_v1", "NPUModelRunner"
    check = _function(vllm_ascend_023, module, f"{runner}._check_and_update_cudagraph_mode")
    calls = {_attr_chain(n.func) for n in ast.walk(check) if isinstance(n, ast.Call)}
    assert any(c.endswith(".get_builder_cls") for c in calls), calls
    assert any(c.endswith(".get_cudagraph_support") for c in calls), calls
    assert any("resolve_cudagraph_mode_and_sizes" in c for c in calls), calls
    init = _function(vllm_ascend_023, module, f"{runner}.initialize_attn_backend")
    calls = {_attr_chain(n.func) for n in ast.walk(init) if isinstance(n, ast.Call)}
    assert any(c.endswith(".get_attn_backend") for c in calls), calls


def test_the_resolution_runs_as_read_in_vllm_032():
    """The same resolution, run for real in the installed vLLM (0.32): an ALWAYS backend keeps
    FULL_AND_PIECEWISE, PIECEWISE and FULL; a NEVER one (what the project declared before it
    recorded its captured attention) turns FULL_AND_PIECEWISE into PIECEWISE and refuses FULL."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode, CUDAGraphMode
    from vllm.v1.attention.backend import AttentionCGSupport

    def resolve(mode, support):
        cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode)
        cc.splitting_ops = list(CompilationConfig._attention_ops)   # as piecewise modes set them
        assert cc.splitting_ops_contain_attention()
        return cc.resolve_cudagraph_mode_and_sizes(support, "OpsAttentionBackend")

    for mode in (CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL):
        assert resolve(mode, AttentionCGSupport.ALWAYS) == mode
    assert resolve(CUDAGraphMode.FULL_AND_PIECEWISE, AttentionCGSupport.NEVER) == CUDAGraphMode.PIECEWISE
    with pytest.raises(ValueError, match="not supported"):
        resolve(CUDAGraphMode.FULL, AttentionCGSupport.NEVER)


# --- the launcher states the mode -------------------------------------------------------------

def _mode_flags(argv):
    if "--enforce-eager" in argv:
        return "NONE"
    cc = argv[argv.index("--compilation-config") + 1] if "--compilation-config" in argv else None
    return json.loads(cc)["cudagraph_mode"] if cc else None


def test_every_npu_profile_command_carries_its_graph_mode():
    from ascend_qwen3.deploy.profiles import load_profile

    with open(GOLDEN) as f:
        golden = json.load(f)
    for name, cmd in golden.items():
        assert _mode_flags(cmd["argv"]) == load_profile(name.split("@")[0]).get("graph_mode",
                                                                  "FULL_AND_PIECEWISE"), name


def test_launcher_graph_mode_rules():
    cfg = family_config("Qwen3-8B")

    def argv(**kw):
        return build_command(ServeSpec(model="/models/m", config=cfg, **kw), base_env={})[0]

    assert _mode_flags(argv(device="npu")) == "FULL_AND_PIECEWISE"      # vllm-ascend's default
    assert _mode_flags(argv(device="npu", graph_mode="PIECEWISE")) == "PIECEWISE"
    assert _mode_flags(argv(device="npu", graph_mode="NONE")) == "NONE"
    assert _mode_flags(argv(device="cpu")) is None                   # no graphs on the CPU build
    user = argv(device="npu", extra_args=["--enforce-eager"])      # the user's own flag decides
    assert user.count("--enforce-eager") == 1 and "--compilation-config" not in user
    with pytest.raises(LaunchError, match="FULL_AND_PIECEWISE, PIECEWISE or NONE"):
        argv(device="npu", graph_mode="FULL")
    with pytest.raises(LaunchError, match="NPU setting"):
        argv(device="cpu", graph_mode="PIECEWISE")
    with pytest.raises(LaunchError, match="given twice"):
        argv(device="npu", graph_mode="NONE", extra_args=["-cc", "{}"])
