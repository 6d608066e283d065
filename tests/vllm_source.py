"""Read a Python package's source as text and answer "does this symbol exist, with this
signature?" from its AST, without importing or installing it.

Used by ``test_vllm_compat.py`` to check the vLLM (and vllm-ascend) symbols the project relies on
(``ascend_qwen3.vllm_plugin.compat.VLLM_USES``) against published wheels of versions that are not
installed here. A name is resolved the way Python would find it:

- in a module: a top-level ``class``/``def``/assignment/annotation (also inside ``if``/``try``
  blocks, e.g. ``if TYPE_CHECKING``), a ``from x import y [as z]`` re-export (relative imports
  included), ``from x import *``, a submodule, a lazy table such as ``vllm.MODULE_ATTRS``
  (``name -> "module:attr"``), or a module ``__getattr__`` that handles the name;
- in a class: its body, ``self.<name> = ...`` in its methods, then its base classes (resolved in
  the class's own module; bases outside the tree end the search).
"""

from __future__ import annotations

import ast
import copy
import os
import zipfile
from dataclasses import dataclass


class NotFound(LookupError):
    pass


@dataclass
class Found:
    kind: str          # "class" | "function" | "value" | "module" | "lazy"
    module: str        # dotted module the definition lives in
    node: ast.AST | None = None


def _module_statements(body):
    """Top-level statements, descending into if/try/with blocks (not into defs)."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If):
            yield from _module_statements(stmt.body)
            yield from _module_statements(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for part in (stmt.body, stmt.orelse, stmt.finalbody):
                yield from _module_statements(part)
            for h in stmt.handlers:
                yield from _module_statements(h.body)
        elif isinstance(stmt, ast.With):
            yield from _module_statements(stmt.body)


def _targets(stmt) -> list[str]:
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    return []


def _is_overload(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A ``typing.overload`` stub (its signature is one of several; the implementation follows)."""
    return any((isinstance(d, ast.Name) and d.id == "overload")
               or (isinstance(d, ast.Attribute) and d.attr == "overload") for d in fn.decorator_list)


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[str, bool]]:
    """(name, has_default) for every named parameter, in order (``*args``/``**kw`` excluded)."""
    a = fn.args
    positional = a.posonlyargs + a.args
    first_default = len(positional) - len(a.defaults)
    out = [(p.arg, i >= first_default) for i, p in enumerate(positional)]
    out += [(p.arg, d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    return out


def is_static(fn) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)


class SourceTree:
    """The ``.py`` files of one or more top-level packages, from a wheel or a directory."""

    def __init__(self, read, names: set[str], label: str):
        self._read = read            # relative path -> text
        self._names = names          # every relative .py path
        self.label = label
        self._cache: dict[str, ast.Module] = {}

    @classmethod
    def from_wheel(cls, path: str) -> "SourceTree":
        zf = zipfile.ZipFile(path)
        names = {n for n in zf.namelist() if n.endswith(".py")}
        return cls(lambda n: zf.read(n).decode("utf-8"), names, os.path.basename(path))

    @classmethod
    def from_dir(cls, root: str) -> "SourceTree":
        """``root`` holds the package directories (e.g. site-packages)."""
        names = set()
        for pkg in os.listdir(root):
            top = os.path.join(root, pkg)
            if not os.path.isfile(os.path.join(top, "__init__.py")):
                continue
            for d, _, files in os.walk(top):
                names.update(os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py"))

        def read(n):
            with open(os.path.join(root, n), encoding="utf-8") as f:
                return f.read()
        return cls(read, names, root)

    @classmethod
    def from_files(cls, files: dict[str, str], label: str = "test tree") -> "SourceTree":
        return cls(files.__getitem__, set(files), label)

    def with_changes(self, files: dict[str, str], label: str | None = None) -> "SourceTree":
        """This tree with some files replaced (or added): to show a check fails on a change."""
        read = self._read
        return SourceTree(lambda n: files[n] if n in files else read(n), self._names | set(files),
                          label or f"{self.label} (changed)")

    def text(self, path: str) -> str:
        return self._read(path)

    # --- modules ------------------------------------------------------------------------------

    def _path(self, module: str) -> tuple[str, bool] | None:
        base = module.replace(".", "/")
        if f"{base}/__init__.py" in self._names:
            return f"{base}/__init__.py", True
        if f"{base}.py" in self._names:
            return f"{base}.py", False
        return None

    def has_module(self, module: str) -> bool:
        return self._path(module) is not None

    def module(self, module: str) -> ast.Module:
        if module not in self._cache:
            p = self._path(module)
            if p is None:
                raise NotFound(f"no module {module} in {self.label}")
            self._cache[module] = ast.parse(self._read(p[0]), filename=p[0])
        return self._cache[module]

    def _absolute(self, module: str, target: str | None, level: int) -> str:
        if level == 0:
            return target or ""
        is_pkg = self._path(module)[1]
        parts = module.split(".")
        base = parts if is_pkg else parts[:-1]
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([target] if target else []))

    def string_constants(self, module: str) -> set[str]:
        return {n.value for n in ast.walk(self.module(module))
                if isinstance(n, ast.Constant) and isinstance(n.value, str)}

    # --- resolution ---------------------------------------------------------------------------

    def resolve(self, module: str, path: str) -> Found:
        """The definition ``module.path`` names (``path`` may be dotted: ``Class.method``)."""
        head, *rest = path.split(".")
        found = self._top(module, head, set())
        for part in rest:
            if found.kind == "module":
                found = self._top(found.module, part, set())
            elif found.kind == "class":
                found = self._member(found, part, set())
            else:
                raise NotFound(f"{module}.{path}: cannot look inside {found.kind} for {part!r}")
        return found

    def _top(self, module: str, name: str, seen: set) -> Found:
        key = (module, name)
        if key in seen:
            raise NotFound(f"import cycle at {module}.{name}")
        seen.add(key)
        tree = self.module(module)
        stars, getattr_fns = [], []
        for stmt in _module_statements(tree.body):
            if isinstance(stmt, ast.ClassDef) and stmt.name == name:
                return Found("class", module, stmt)
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if stmt.name == name and not _is_overload(stmt):   # the implementation, not a stub
                    return Found("function", module, stmt)
                if stmt.name == "__getattr__":
                    getattr_fns.append(stmt)
            if name in _targets(stmt):
                return Found("value", module, stmt)
            if isinstance(stmt, ast.ImportFrom):
                target = self._absolute(module, stmt.module, stmt.level)
                for alias in stmt.names:
                    if alias.name == "*":
                        stars.append(target)
                    elif (alias.asname or alias.name) == name:
                        sub = f"{target}.{alias.name}"
                        if self.has_module(sub):
                            return Found("module", sub)
                        if not self.has_module(target):
                            raise NotFound(f"{module}.{name} is imported from {target}, "
                                           f"which is not in {self.label}")
                        return self._top(target, alias.name, seen)
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname == name and self.has_module(alias.name):
                        return Found("module", alias.name)
        for target in stars:
            if self.has_module(target):
                try:
                    return self._top(target, name, seen)
                except NotFound:
                    pass
        # lazy attribute tables: NAME = {"attr": "module:attr", ...}
        for stmt in _module_statements(tree.body):
            value = getattr(stmt, "value", None)
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(value, ast.Dict):
                for k, v in zip(value.keys, value.values):
                    if (isinstance(k, ast.Constant) and k.value == name and isinstance(v, ast.Constant)
                            and isinstance(v.value, str) and ":" in v.value):
                        mod, attr = v.value.split(":", 1)
                        level = len(mod) - len(mod.lstrip("."))
                        return self._top(self._absolute(module, mod.lstrip(".") or None, level),
                                         attr, seen)
        # a module __getattr__ that handles this name
        for fn in getattr_fns:
            if any(isinstance(n, ast.Constant) and n.value == name for n in ast.walk(fn)):
                return Found("lazy", module, fn)
        sub = f"{module}.{name}"
        if self.has_module(sub):
            return Found("module", sub)
        raise NotFound(f"{module} has no {name!r} in {self.label}")

    def _member(self, cls: Found, name: str, seen: set) -> Found:
        node = cls.node
        if (cls.module, node.name) in seen:
            raise NotFound(f"class cycle at {node.name}")
        seen.add((cls.module, node.name))
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                return Found("function", cls.module, stmt)
            if isinstance(stmt, ast.ClassDef) and stmt.name == name:
                return Found("class", cls.module, stmt)
            if name in _targets(stmt):
                return Found("value", cls.module, stmt)
        for stmt in node.body:   # self.<name> = ... in a method
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(stmt):
                    targets = n.targets if isinstance(n, ast.Assign) else \
                        [n.target] if isinstance(n, (ast.AnnAssign, ast.AugAssign)) else []
                    for t in targets:
                        if (isinstance(t, ast.Attribute) and t.attr == name
                                and isinstance(t.value, ast.Name) and t.value.id == "self"):
                            return Found("value", cls.module, n)
        for base in node.bases:
            base_cls = self._base(cls.module, base)
            if base_cls is not None:
                try:
                    return self._member(base_cls, name, seen)
                except NotFound:
                    pass
        raise NotFound(f"class {cls.module}.{node.name} has no attribute {name!r} (nor its bases) "
                       f"in {self.label}")

    def _base(self, module: str, expr: ast.expr) -> Found | None:
        if isinstance(expr, ast.Subscript):          # Generic[T], Protocol[T], Base[T]
            expr = expr.value
        dotted = []
        while isinstance(expr, ast.Attribute):
            dotted.insert(0, expr.attr)
            expr = expr.value
        if not isinstance(expr, ast.Name):
            return None
        try:
            found = self.resolve(module, ".".join([expr.id] + dotted))
        except NotFound:
            return None                              # a base outside this tree (object, ABC, ...)
        return found if found.kind == "class" else None

    # --- checks -------------------------------------------------------------------------------

    def check(self, use) -> list[str]:
        """Problems with one ``compat.Use`` in this tree (empty: compatible)."""
        where = f"{use.module}.{use.path}"
        try:
            found = self.resolve(use.module, use.path)
        except NotFound as exc:
            return [f"{where}: {exc}"]
        if use.how == "exists":
            return []
        if use.how == "attrs":
            if found.kind != "class":
                return [f"{where}: expected a class, found a {found.kind}"]
            problems = []
            for name in use.names:
                try:
                    self._member(found, name, set())
                except NotFound as exc:
                    problems.append(f"{where}: {exc}")
            return problems
        if found.kind != "function":
            return [f"{where}: expected a function, found a {found.kind}"]
        params = parameters(found.node)
        if params and params[0][0] in ("self", "cls") and not is_static(found.node):
            params = params[1:]
        names = [p for p, _ in params]
        if use.how == "call":
            problems = [f"{where}: no parameter {n!r} (has {', '.join(names) or 'none'})"
                        for n in use.names if n not in names]
            problems += [f"{where}: required parameter {p!r} is not passed"
                         for p, has_default in params if not has_default and p not in use.names]
            return problems
        if use.how == "override":
            if names != list(use.names):
                return [f"{where}: parameters are ({', '.join(names)}); the override expects "
                        f"({', '.join(use.names)})"]
            return []
        raise ValueError(f"unknown use kind {use.how!r}")

    def dataclass_fields(self, module: str, cls: str) -> list[str]:
        """Annotated class-level names of a class and its bases in this tree (CLI dataclasses)."""
        found = self.resolve(module, cls)
        out, todo = [], [found]
        while todo:
            c = todo.pop()
            out += [s.target.id for s in c.node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
            todo += [b for b in (self._base(c.module, e) for e in c.node.bases) if b is not None]
        return out

    def function(self, module: str, path: str):
        """Compile one self-contained function (e.g. a ``get_kv_cache_shape``) from the source
        and return it; it is run on plain ints, so it must not need the module's globals."""
        found = self.resolve(module, path)
        fn = copy.deepcopy(found.node)
        fn.decorator_list, fn.returns = [], None
        for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs:
            a.annotation = None
        code = compile(ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[])),
                       f"<{self.label}:{module}.{path}>", "exec")
        ns: dict = {}
        exec(code, ns)
        return ns[fn.name]

    def cli_flags(self, module: str) -> set[str]:
        """Every ``--flag`` string literal passed to an ``add_argument`` call in a module."""
        out = set()
        for n in ast.walk(self.module(module)):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr == "add_argument"):
                out.update(a.value for a in n.args
                           if isinstance(a, ast.Constant) and isinstance(a.value, str)
                           and a.value.startswith("--"))
        return out
