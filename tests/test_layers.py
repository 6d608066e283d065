"""The package's layers: every import points down, and no module reaches itself through others.

Read from the source (every ``import`` statement, those inside functions included), so the check
needs nothing installed and sees lazy imports too. docs/ARCHITECTURE.md draws the same layers.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module may import modules of its own unit and of units in lower layers; units
# of one layer are siblings and import nothing from each other (e.g. parallel and quant: a
# linear layer gets its int8 behaviour as a method object the model hands it).
LAYERS: list[tuple[str, list[str]]] = [
    ("operators", ["ops"]),
    ("configuration", ["ascend_qwen3", "ascend_qwen3.config", "ascend_qwen3.thinking"]),
    ("parallel and quantised layers", ["ascend_qwen3.parallel", "ascend_qwen3.quant"]),
    ("the graph", ["ascend_qwen3.model"]),
    ("checkpoints", ["ascend_qwen3.loader", "ascend_qwen3.checkpoint", "ascend_qwen3.speculative"]),
    ("the standalone runner", ["ascend_qwen3.runner"]),
    ("applications of the graph", ["ascend_qwen3.quantizer", "ascend_qwen3.vllm_plugin",
                                   "ascend_qwen3.check", "ascend_qwen3.lora_adapter"]),
    ("deployment and serving", ["ascend_qwen3.deploy", "ascend_qwen3.serve",
                                "ascend_qwen3.loadtest"]),
    ("command line", ["ascend_qwen3.cli"]),
]

# third-party packages only some units may import (the rest of the code runs without them)
CONFINED = {"vllm": ["ascend_qwen3.vllm_plugin"], "vllm_ascend": ["ascend_qwen3.vllm_plugin"],
            "torch_npu": ["ops"]}


def _modules() -> dict[str, str]:
    """Every module of ``ops`` and ``ascend_qwen3``: dotted name -> file."""
    found = {}
    for top in ("ops", "ascend_qwen3"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement of module ``name``; names imported
    from a package resolve to the package's module when they are one."""
    path = MODULES[name]
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in MODULES else target, node.lineno))
    return out


def _own(target: str) -> str | None:
    """The project module an imported name lives in (None: a third-party import)."""
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    return target if target in MODULES else None


def _unit(name: str) -> tuple[int, str]:
    """(layer index, unit) of a module: the longest unit that is the module or a package of it
    (the root package ``ascend_qwen3`` is a unit of its own module only)."""
    best = None
    for i, (_, units) in enumerate(LAYERS):
        for u in units:
            if name == u or (u != "ascend_qwen3" and name.startswith(u + ".")):
                if best is None or len(u) > len(best[1]):
                    best = (i, u)
    if best is None:
        raise AssertionError(f"module {name} belongs to no layer: add it (or its package) to "
                             f"LAYERS in tests/test_layers.py and to docs/ARCHITECTURE.md")
    return best


def test_every_module_has_a_layer():
    for name in MODULES:
        _unit(name)


def test_imports_point_down():
    wrong = []
    for name in sorted(MODULES):
        layer, unit = _unit(name)
        for target, line in _imports(name):
            own = _own(target)
            if own is None:
                top = target.partition(".")[0]
                if top in CONFINED and not any(unit == u or unit.startswith(u + ".")
                                               for u in CONFINED[top]):
                    wrong.append(f"{MODULES[name]}:{line}: {name} imports {target}, which only "
                                 f"{', '.join(CONFINED[top])} may import")
                continue
            t_layer, t_unit = _unit(own)
            if t_unit == unit or t_layer < layer:
                continue
            how = "a higher layer" if t_layer > layer else "a sibling unit of its layer"
            wrong.append(f"{os.path.relpath(MODULES[name], ROOT)}:{line}: {name} "
                         f"({LAYERS[layer][0]}) imports {own} ({LAYERS[t_layer][0]}): {how}")
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: sorted({o for t, _ in _imports(name) if (o := _own(t)) and o != name})
             for name in MODULES}
    # a package's __init__ importing its own submodules is how Python packages work: a
    # submodule importing its package back (``from . import x``) is what could close a cycle
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("source, expected", [
    ("import vllm", "only ascend_qwen3.vllm_plugin"),
    ("from ..cli import main", "a higher layer"),
    ("from ..quant.layers import linear_method", "a sibling unit"),
])
def test_the_checks_catch_violations(tmp_path, monkeypatch, source, expected):
    """A module of the parallel layer given each bad import: the check names it."""
    bad = tmp_path / "bad.py"
    bad.write_text(source + "\n")
    monkeypatch.setitem(MODULES, "ascend_qwen3.parallel.bad", str(bad))
    with pytest.raises(AssertionError, match=expected):
        test_imports_point_down()


def test_the_cycle_check_catches_a_cycle(tmp_path, monkeypatch):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import b\n")
    b.write_text("from .a import x\n")
    monkeypatch.setitem(MODULES, "ascend_qwen3.model.a", str(a))
    monkeypatch.setitem(MODULES, "ascend_qwen3.model.b", str(b))
    with pytest.raises(AssertionError, match="ascend_qwen3.model.a -> ascend_qwen3.model.b"):
        test_no_import_cycles()
