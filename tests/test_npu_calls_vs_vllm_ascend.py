"""A second, independent reading of every torch_npu call in ``ops/npu.py``: its argument names,
literal values, index dtypes and layouts are compared with vllm-ascend 0.23's own calls of the
same kernels, read from the published wheel as ``test_vllm_compat`` reads it (zipfile + ast;
nothing imported or installed; the wheel is downloaded once into ``.cache/`` by the same helper).

What is compared, per kernel ``ops/npu.py`` calls (``torch_npu.<k>``, ``torch.ops.npu.<k>``,
``import torch_npu as x`` / ``from torch_npu import <k>`` aliases, ``.out`` overloads):

- argument names. Positional arguments are named by the kernel's schema (``SCHEMAS``), so
  ``npu_quantize(x, s, z, torch.qint8, -1, False)`` and ``npu_quantize(x, s, z, torch.qint8,
  axis=-1, div_mode=False)`` read the same. Every name ops.npu passes must be passed by at least
  one vllm-ascend call of that kernel, and every name all of vllm-ascend's fully readable calls
  pass must be passed by ops.npu. vllm-ascend's ``**kwargs`` forwarders (``DeviceOperator.x(...,
  **kwargs)``, the way its A2 attention reaches the kernel) are followed to their callers, and
  ``**d`` of a dict built in the same function (or returned by a method of the class it calls
  for it) is expanded;
- literal values (constants, ``torch.<dtype>``, module constants such as vllm-ascend's
  ``ACL_FORMAT_FRACTAL_NZ``): where ops.npu passes a literal and vllm-ascend passes literals for
  the same argument, ours must be one of theirs;
- where vllm-ascend calls the kernel: nowhere (``<k>.not_called``; a kernel it reaches only
  through its own ``torch.ops._C_ascend`` ops counts as not called), or only in its 310P package
  / A5 device adaptor (``<k>.not_called_on_A2``);
- a few targeted facts the AST can show (``Facts``): int32 slot indices, block tables and expert
  ids, the int64 group list, which weight dtypes go to FRACTAL_NZ (format 29), fp32 inputs of the
  unpermute, what attention reads as K/V in a prefill without cache, and where vllm-ascend's A2
  path uses its own custom op instead of the kernel.

Every difference found must have an entry in ``ops.npu.NPU_CALL_DIFFERENCES`` (read from the
file's AST) saying why ours is right or why it is an accepted risk, and every entry must still be
a difference: the test names unlisted differences with both call sites, and stale entries.
"""

from __future__ import annotations

import ast
import os
import re
import zipfile
from dataclasses import dataclass

import pytest

from tests.test_vllm_compat import _wheel
from tests.vllm_source import NotFound, SourceTree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPU_PY = os.path.join(REPO, "ops", "npu.py")
TABLE = "NPU_CALL_DIFFERENCES"

# Positional parameters of each kernel, in schema order (keyword-only ones omitted), from op-plugin:
# op_plugin/config/op_plugin_functions.yaml; _npu_reshape_and_cache: its schema in
# op_plugin/ops/atb/ReshapeAndCachAtb.cpp; npu_format_cast: docs/zh/custom_APIs/torch_npu/
# (beta)torch_npu-npu_format_cast.md. ``.out`` overloads share their kernel's entry.
SCHEMAS: dict[str, tuple[str, ...]] = {
    "npu_rms_norm": ("self", "gamma", "epsilon"),
    "npu_add_rms_norm": ("x1", "x2", "gamma", "epsilon"),
    "npu_add_rms_norm_quant": ("x1", "x2", "gamma", "scales1", "zero_points1", "beta", "scales2",
                               "zero_points2"),
    "npu_add_rms_norm_dynamic_quant": ("x1", "x2", "gamma"),
    "npu_apply_rotary_pos_emb": ("query", "key", "cos", "sin", "layout", "rotary_mode"),
    "npu_swiglu": ("self", "dim"),
    "_npu_reshape_and_cache": ("key", "value", "key_cache", "value_cache", "slot_indices"),
    "npu_fused_infer_attention_score": ("query", "key", "value"),
    "npu_fused_infer_attention_score.out": ("query", "key", "value"),
    "_npu_fused_infer_attention_score_get_max_workspace": ("query", "key", "value"),
    "npu_dynamic_quant": ("input",),
    "npu_quantize": ("self", "scales", "zero_points", "dtype", "axis", "div_mode"),
    "npu_quant_matmul": ("x1", "x2", "scale"),
    "npu_trans_quant_param": ("scale", "offset", "round_mode"),
    "npu_moe_gating_top_k_softmax": ("x", "finished", "k"),
    "npu_moe_init_routing_v2": ("x", "expert_idx"),
    "npu_grouped_matmul": ("x", "weight"),
    "npu_moe_distribute_dispatch_v2": ("x", "expert_ids", "group_ep", "ep_world_size",
                                       "ep_rank_id", "moe_expert_num"),
    "npu_moe_distribute_combine_v2": ("expand_x", "expert_ids", "assist_info_for_combine",
                                      "ep_send_counts", "expert_scales", "group_ep",
                                      "ep_world_size", "ep_rank_id", "moe_expert_num"),
    "npu_moe_token_unpermute": ("permuted_tokens", "sorted_indices", "probs", "padded_mode",
                                "restore_shape"),
    "npu_moe_finalize_routing": ("expanded_permuted_rows", "skip1", "skip2", "bias", "scales",
                                 "expanded_src_to_dst_row", "export_for_source_row"),
    "npu_format_cast": ("self", "acl_format", "customize_dtype"),
}


# ============================================================================================
# reading calls
# ============================================================================================

@dataclass
class Call:
    kernel: str
    where: str                  # "path:line Class.function"
    platform: str               # "A2" (shared A2/A3 code) | "310P" | "A5"
    args: dict                  # argument name -> expression (positional ones named by SCHEMAS)
    literals: dict              # argument name -> literal value as text ("3", "'TND'", "torch.int32")
    complete: bool = True       # False when a ``**mapping`` / ``*args`` could not be read
    fn: ast.AST | None = None   # the enclosing function
    positional: int = 0         # how many arguments were passed by position

    def __str__(self) -> str:
        shown = ", ".join(f"{n}={self.literals[n]}" if n in self.literals else n for n in self.args)
        return f"{self.where}: {self.kernel}({shown}{', **...' if not self.complete else ''})"


def _dotted(e: ast.AST) -> str | None:
    parts = []
    while isinstance(e, ast.Attribute):
        parts.insert(0, e.attr)
        e = e.value
    return ".".join([e.id] + parts) if isinstance(e, ast.Name) else None


def _is_kernel(name: str) -> bool:
    base, _, overload = name.partition(".")
    return base.startswith(("npu_", "_npu_")) and overload in ("", "out")


def _platform(path: str, scope: tuple[str, ...]) -> str:
    if path.startswith("vllm_ascend/_310p/"):
        return "310P"
    if any(s.startswith("A5") for s in scope):       # vllm_ascend/device/device_op.py A5DeviceAdaptor
        return "A5"
    return "A2"


def _str_dict(v) -> dict | None:
    """The entries of a dict display with string keys, or of ``dict(k=v, ...)``."""
    if isinstance(v, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str)
                                       for k in v.keys):
        return {k.value: x for k, x in zip(v.keys, v.values)}
    if (isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "dict"
            and not v.args and all(k.arg for k in v.keywords)):
        return {k.arg: k.value for k in v.keywords}
    return None


def _local_dict(fn, expr, method=None) -> dict | None:
    """The entries of ``**expr`` when expr names a dict built in ``fn`` from string keys
    (``d = {...}``, ``d = dict(...)``, ``d["k"] = v``, ``d.update({...})`` or ``d.update(e)`` of
    another such dict; ``d = self.m(...)`` where ``method(fn, call)`` finds the method m of the
    class and m returns such a dict, as vllm-ascend's MC2 dispatcher builds its kwargs); None if
    it cannot be read."""
    if fn is None or not isinstance(expr, ast.Name):
        return None
    out, seen = {}, False
    for n in ast.walk(fn):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "update"
                and isinstance(n.func.value, ast.Name) and n.func.value.id == expr.id):
            if len(n.args) != 1 or n.keywords:
                return None
            more = _str_dict(n.args[0])
            if more is None:
                more = _local_dict(fn, n.args[0], method)
            if more is None:
                return None
            out.update(more)
            continue
        if not isinstance(n, ast.Assign):
            continue
        for t in n.targets:
            if isinstance(t, ast.Name) and t.id == expr.id:
                v = n.value
                entries = _str_dict(v)
                if entries is None and method is not None and isinstance(v, ast.Call):
                    m = method(fn, v)
                    returned = [r.value for r in ast.walk(m) if isinstance(r, ast.Return)] \
                        if m is not None else []
                    if len(returned) == 1:
                        entries = _local_dict(m, returned[0], method)
                if entries is None:
                    return None
                out.update(entries)
                seen = True
            elif (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == expr.id
                  and isinstance(t.slice, ast.Constant) and isinstance(t.slice.value, str)):
                out[t.slice.value] = n.value
    return out if seen else None


def _local_names(fn) -> set[str]:
    """Parameters and assigned names of a function (kept on the node: asked once per argument)."""
    names = getattr(fn, "_local_names", None)
    if names is None:
        a = fn.args
        names = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs}
        names |= {p.arg for p in (a.vararg, a.kwarg) if p is not None}
        names |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        fn._local_names = names
    return names


class ModuleCalls:
    """The kernel calls of one module, plus its ``**kwargs`` forwarders of kernels."""

    def __init__(self, path: str, source: str, tree: SourceTree | None):
        self.path, self.tree = path, tree
        self.module = path[:-3].replace("/", ".").removesuffix(".__init__")
        self.ast = ast.parse(source, filename=path)
        self.functions = {s.name: s for s in self.ast.body if isinstance(s, ast.FunctionDef)}
        self.mods, self.funcs = {"torch_npu"}, {}
        self.all_calls = []                      # (Call node, enclosing scope names, function)
        self.methods: dict[int, dict[str, ast.FunctionDef]] = {}   # id(method) -> its class's
        for cls in ast.walk(self.ast):
            if isinstance(cls, ast.ClassDef):
                own = {m.name: m for m in cls.body if isinstance(m, ast.FunctionDef)}
                self.methods.update({id(m): own for m in own.values()})
        todo = [(self.ast, (), None)]
        while todo:                              # one pass: every call with its scope, and imports
            node, scope, fn = todo.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef):
                    todo.append((child, scope + (child.name,), fn))
                    continue
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    todo.append((child, scope + (child.name,), child))
                    continue
                if isinstance(child, ast.Call):
                    self.all_calls.append((child, scope, fn))
                elif isinstance(child, ast.Import):
                    self.mods |= {a.asname for a in child.names if a.name == "torch_npu" and a.asname}
                elif isinstance(child, ast.ImportFrom) and child.module == "torch_npu" and not child.level:
                    self.funcs.update({a.asname or a.name: a.name for a in child.names if _is_kernel(a.name)})
                todo.append((child, scope, fn))
        self.all_calls.sort(key=lambda c: (c[0].lineno, c[0].col_offset))
        self.calls: list[Call] = []
        self.forwarders: list[tuple[str, Call, set[str]]] = []   # (function name, call, own params)
        for node, scope, fn in self.all_calls:
            kernel = self.kernel_of(node.func)
            if kernel is None:
                continue
            call = self.record(node, kernel, scope, fn)
            self.calls.append(call)
            kwarg = fn.args.kwarg.arg if fn is not None and fn.args.kwarg else None
            if kwarg and any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == kwarg
                             for k in node.keywords):
                a = fn.args
                own = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs}
                self.forwarders.append((fn.name, call, own))

    def method(self, fn, call: ast.Call):
        """The method ``self.<name>(...)`` calls, in ``fn``'s class; None otherwise."""
        f = call.func
        if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self"
                and id(fn) in self.methods):
            return self.methods[id(fn)].get(f.attr)
        return None

    def kernel_of(self, func: ast.AST) -> str | None:
        d = _dotted(func)
        if d is None:
            return None
        for prefix in sorted(self.mods) + ["torch.ops.npu"]:
            if d.startswith(prefix + "."):
                name = d[len(prefix) + 1:]
                break
        else:
            head, _, rest = d.partition(".")
            if head not in self.funcs:
                return None
            name = self.funcs[head] + (f".{rest}" if rest else "")
        name = name.removesuffix(".default")
        return name if _is_kernel(name) else None

    def literal(self, expr, fn) -> str | None:
        if isinstance(expr, ast.Constant):
            return repr(expr.value)
        if (isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.USub)
                and isinstance(expr.operand, ast.Constant) and isinstance(expr.operand.value, (int, float))):
            return repr(-expr.operand.value)
        d = _dotted(expr)
        if d and d.split(".")[0] in ("torch", "torch_npu") and "." in d:
            return d                                    # torch.int32, torch.qint8, ...
        if (isinstance(expr, ast.Name) and self.tree is not None
                and (fn is None or expr.id not in _local_names(fn))):
            try:                                        # a module constant, maybe imported
                found = self.tree.resolve(self.module, expr.id)
            except (NotFound, TypeError):
                return None
            value = getattr(found.node, "value", None)
            if found.kind == "value" and isinstance(value, (ast.Constant, ast.UnaryOp)):
                return self.literal(value, None)
        return None

    def record(self, node: ast.Call, kernel: str, scope, fn, keywords=None, positional=True) -> Call:
        params = SCHEMAS.get(kernel.split(".")[0], ())
        args, complete = {}, True
        for i, a in enumerate(node.args if positional else ()):
            if isinstance(a, ast.Starred):
                complete = False
            else:
                args[params[i] if i < len(params) else f"#{i}"] = a
        for k in node.keywords if keywords is None else keywords:
            if k.arg is not None:
                args[k.arg] = k.value
            else:
                expanded = _local_dict(fn, k.value, self.method)
                if expanded is None:
                    complete = False
                else:
                    args.update(expanded)
        literals = {n: v for n, e in args.items() if (v := self.literal(e, fn)) is not None}
        where = f"{self.path}:{node.lineno} {'.'.join(scope) or '<module>'}"
        return Call(kernel, where, _platform(self.path, scope), args, literals, complete, fn,
                    len(node.args) if positional else 0)


def _forwarded_calls(modules: list[ModuleCalls], callers: list[ModuleCalls]) -> list[Call]:
    """Calls that reach a kernel through a ``def f(..., **kwargs): torch_npu.k(..., **kwargs)``
    forwarder: the forwarder's own arguments plus the caller's keywords that land in kwargs."""
    by_name: dict[str, list] = {}
    for m in modules:
        for name, call, own in m.forwarders:
            by_name.setdefault(name, []).append((call, own))
    out = []
    for m in callers:
        for node, scope, fn in m.all_calls:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else \
                node.func.id if isinstance(node.func, ast.Name) else None
            if name not in by_name or m.kernel_of(node.func) is not None:
                continue
            for inner, own in by_name[name]:
                # the caller's positionals and named parameters bind to the forwarder; the rest
                # of its keywords land in **kwargs, i.e. in the kernel call
                site = m.record(node, inner.kernel, scope, fn, positional=False,
                                keywords=[k for k in node.keywords if k.arg not in own])
                args = {**site.args, **inner.args}
                literals = {**site.literals, **inner.literals}
                platform = inner.platform if inner.platform != "A2" else site.platform
                out.append(Call(inner.kernel, f"{site.where} via {inner.where}", platform, args,
                                literals, site.complete, fn))
    return out


@dataclass
class Reading:
    calls: list[Call]
    modules: dict[str, ModuleCalls]
    tree: SourceTree | None = None


def read_ours(source: str, path: str = "ops/npu.py") -> Reading:
    """The kernel calls of one source file (ops/npu.py, or a synthetic one in the tests below)."""
    tree = SourceTree.from_files({path: source}, label=path)
    m = ModuleCalls(path, source, tree)
    return Reading(m.calls, {m.module: m}, tree)


def read_vllm_ascend(wheel: str) -> Reading:
    """Every kernel call in the wheel's ``vllm_ascend/`` sources, forwarded ones included."""
    zf = zipfile.ZipFile(wheel)
    tree = SourceTree.from_wheel(wheel)
    sources = {n: zf.read(n).decode("utf-8") for n in sorted(zf.namelist())
               if n.startswith("vllm_ascend/") and n.endswith(".py")}
    modules = {n: ModuleCalls(n, s, tree) for n, s in sources.items()
               if "torch_npu" in s or "torch.ops.npu" in s}
    forwarders = {name for m in modules.values() for name, _, _ in m.forwarders}
    callers = [modules.get(n) or ModuleCalls(n, s, tree) for n, s in sources.items()
               if any(f in s for f in forwarders)]
    calls = [c for m in modules.values() for c in m.calls]
    calls += _forwarded_calls(list(modules.values()), callers)
    return Reading(calls, {m.module: m for m in modules.values()}, tree)


# ============================================================================================
# comparing
# ============================================================================================

def _examples(sites: list[Call], n: int = 2) -> str:
    ranked = sorted(sites, key=lambda s: (s.platform != "A2", not s.complete))
    more = f" and {len(sites) - n} more" if len(sites) > n else ""
    return "; ".join(str(s) for s in ranked[:n]) + more


def compare_calls(ours: list[Call], theirs: list[Call]) -> dict[str, str]:
    """Argument-name, literal-value and where-called differences: ``{key: what differs}``."""
    found: dict[str, str] = {}
    for kernel in sorted({c.kernel for c in ours}):
        mine = [c for c in ours if c.kernel == kernel]
        sites = [s for s in theirs if s.kernel == kernel]
        if not sites:
            found[f"{kernel}.not_called"] = (f"{'; '.join(map(str, mine))}; vllm-ascend 0.23 never "
                                             f"calls torch_npu.{kernel}")
            continue
        if all(s.platform != "A2" for s in sites):
            found[f"{kernel}.not_called_on_A2"] = (
                f"{'; '.join(map(str, mine))}; vllm-ascend calls it only on "
                f"{'/'.join(sorted({s.platform for s in sites}))}: {_examples(sites, 3)}")
        passed = {n for s in sites for n in s.args}
        readable = [set(s.args) for s in sites if s.complete]
        always = set.intersection(*readable) if readable else set()
        for c in mine:
            for name in c.args:
                if name not in passed:
                    found[f"{kernel}.{name}"] = (f"ours {c} passes {name}; no vllm-ascend call of "
                                                 f"{kernel} does, e.g. {_examples(sites)}")
                elif name in c.literals:
                    theirs_values = [s for s in sites if name in s.literals]
                    if theirs_values and c.literals[name] not in {s.literals[name] for s in theirs_values}:
                        values = sorted({s.literals[name] for s in theirs_values})
                        found[f"{kernel}.{name}"] = (
                            f"ours {c} passes {name}={c.literals[name]}; vllm-ascend passes "
                            f"{name}={' or '.join(values)}: {_examples(theirs_values)}")
            for name in sorted(always - set(c.args)):
                found[f"{kernel}.{name}"] = (f"ours {c} omits {name}, which every readable vllm-ascend "
                                             f"call of {kernel} passes, e.g. {_examples(sites)}")
    return found


# --- targeted dtype / layout facts ----------------------------------------------------------

_METHOD_DTYPES = {"float": "float32", "half": "float16", "bfloat16": "bfloat16", "long": "int64",
                  "int": "int32"}


def _definitions(fn, name: str) -> list[ast.expr]:
    out = []
    for n in ast.walk(fn):
        if isinstance(n, (ast.AnnAssign, ast.AugAssign)) and isinstance(n.target, ast.Name) \
                and n.target.id == name and n.value is not None:
            out.append(n.value)
        if not isinstance(n, ast.Assign):
            continue
        for t in n.targets:
            if isinstance(t, ast.Name) and t.id == name:
                out.append(n.value)
            elif isinstance(t, (ast.Tuple, ast.List)):
                for i, el in enumerate(t.elts):
                    if isinstance(el, ast.Name) and el.id == name:
                        same = isinstance(n.value, (ast.Tuple, ast.List)) and len(n.value.elts) == len(t.elts)
                        out.append(n.value.elts[i] if same else n.value)
    return out


def _reaching(expr, fn, functions: dict) -> list[ast.AST]:
    """expr and every expression that defines a name it reads: assignments in its function, and
    the return values of same-module helper functions it calls (each followed once)."""
    out, todo, seen = [], [(expr, fn)], set()
    while todo:
        e, f = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        for n in ast.walk(e):
            if isinstance(n, ast.Name) and f is not None:
                todo += [(v, f) for v in _definitions(f, n.id)]
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in functions:
                g = functions[n.func.id]
                todo += [(r.value, g) for r in ast.walk(g) if isinstance(r, ast.Return) and r.value]
    return out


def _dtypes(exprs) -> set[str]:
    """Dtypes these expressions cast to or create: ``.to(torch.X)``, ``.float()``/``.long()``/...,
    ``dtype=torch.X``."""
    out = set()
    for e in exprs:
        for n in ast.walk(e):
            if not isinstance(n, ast.Call):
                continue
            if isinstance(n.func, ast.Attribute) and n.func.attr == "to":
                out |= {d[6:] for a in n.args + [k.value for k in n.keywords]
                        if (d := _dotted(a) or "").startswith("torch.")}
            elif isinstance(n.func, ast.Attribute) and n.func.attr in _METHOD_DTYPES and not n.args:
                out.add(_METHOD_DTYPES[n.func.attr])
            out |= {d[6:] for k in n.keywords if k.arg == "dtype"
                    if (d := _dotted(k.value) or "").startswith("torch.")}
    return out


def _function(tree: SourceTree, module: str, qualname: str):
    try:
        found = tree.resolve(module, qualname)
    except NotFound:
        return None
    return found.node if found.kind == "function" else None


def _assigned_dtypes(fn, target: str) -> set[str]:
    if fn is None:
        return set()
    return _dtypes([n.value for n in ast.walk(fn) if isinstance(n, ast.Assign)
                    and any(ast.unparse(t) == target for t in n.targets)])


def _compared_dtypes(fn) -> set[str]:
    """torch dtypes a function tests a tensor against (``x.dtype == torch.float32``, ``in {...}``)."""
    return {d[6:] for c in ast.walk(fn) if isinstance(c, ast.Compare)
            for n in ast.walk(c) if (d := _dotted(n) or "").startswith("torch.")}


class Facts:
    """Targeted dtype / layout checks, each only for kernels ``ours`` calls. Each method returns
    ``{key: what differs}``; a vllm-ascend function a check relies on that is missing from the
    wheel makes the check report (index dtypes) or drop (the others: its entry turns STALE)."""

    # (kernel, argument, dtype, where vllm-ascend makes that tensor: module, function, assigned name)
    INDEX_DTYPES = [
        ("_npu_reshape_and_cache", "slot_indices", "int32",
         ("vllm_ascend.worker.block_table", "BlockTable.__init__", "self.slot_mapping")),
        ("npu_fused_infer_attention_score", "block_table", "int32",
         ("vllm_ascend.worker.block_table", "BlockTable.__init__", "self.block_table")),
        ("npu_moe_init_routing_v2", "expert_idx", "int32",
         ("vllm_ascend.ops.fused_moe.experts_selector", "_native_select_experts", "topk_ids")),
        ("npu_grouped_matmul", "group_list", "int64",
         ("vllm_ascend.ops.fused_moe.token_dispatcher", "TokenDispatcherWithAllGather.token_dispatch",
          "expert_tokens")),
    ]

    # (kernel, the vllm-ascend function on the A2 path ops.npu mirrors, the custom op it calls)
    A2_CUSTOM_OPS = [
        ("npu_moe_init_routing_v2", "vllm_ascend.device.device_op",
         "BaseDeviceAdaptor.npu_moe_init_routing", "npu_moe_init_routing_custom"),
        ("npu_add_rms_norm", "vllm_ascend.ops.layernorm", "AscendRMSNorm.forward_oot",
         "npu_add_rms_norm_bias"),
    ]

    def __init__(self, ours: Reading, theirs: Reading):
        self.ours, self.theirs = ours, theirs
        self.helpers = {n: f for m in ours.modules.values() for n, f in m.functions.items()}

    def all(self) -> dict[str, str]:
        return {**self.index_dtypes(), **self.nz_weights(), **self.prefill_kv(),
                **self.unpermute_dtype(), **self.a2_custom_ops()}

    def mine(self, kernel: str) -> list[Call]:
        return [c for c in self.ours.calls if c.kernel == kernel]

    def traced(self, c: Call, arg: str) -> set[str]:
        """Dtypes ours casts ``arg`` to, through its local definitions and helper functions."""
        return _dtypes(_reaching(c.args[arg], c.fn, self.helpers)) if arg in c.args else set()

    def index_dtypes(self) -> dict[str, str]:
        """Slot indices, block tables and expert ids are int32 and the group list int64, on both
        sides: ours casts each argument; vllm-ascend makes the tensor it passes in that dtype."""
        found = {}
        for kernel, arg, dtype, (module, qualname, target) in self.INDEX_DTYPES:
            if not self.mine(kernel):
                continue
            bad = [c for c in self.mine(kernel) if dtype not in self.traced(c, arg)]
            made = _assigned_dtypes(_function(self.theirs.tree, module, qualname), target)
            if bad or dtype not in made:
                found[f"{kernel}.{arg}.{dtype}"] = (
                    f"{arg} should be {dtype} on both sides. Ours casts it: "
                    f"{'no, at ' + '; '.join(map(str, bad)) if bad else 'yes'}. vllm-ascend "
                    f"{module}.{qualname} makes {target} {dtype}: {'yes' if dtype in made else 'no'}")
        return found

    def nz_weights(self) -> dict[str, str]:
        """Which weights go to FRACTAL_NZ (29): ours gates only fp32 out; vllm-ascend's
        _should_trans_nz gates bf16/fp16 on weight_nz_mode == 2, whose default is not 2."""
        tree = self.theirs.tree
        should = _function(tree, "vllm_ascend.utils", "_should_trans_nz")
        default = next((ast.unparse(n.args[1]) for n in ast.walk(tree.module("vllm_ascend.envs"))
                        if isinstance(n, ast.Call) and _dotted(n.func) == "os.getenv" and len(n.args) == 2
                        and ast.unparse(n.args[0]) == "'VLLM_ASCEND_ENABLE_NZ'"), None)
        gated = should is not None and "bfloat16" in _compared_dtypes(should) and default != "2"
        found = {}
        for c in self.mine("npu_format_cast"):
            if gated and c.literals.get("acl_format") == "29" \
                    and not {"bfloat16", "float16"} & _compared_dtypes(c.fn):
                found["npu_format_cast.half_weights_to_nz"] = (
                    f"ours {c} sends bf16/fp16 weights to format 29 ({c.fn.name} only keeps fp32 in "
                    f"ND); vllm_ascend/utils.py _should_trans_nz converts bf16/fp16 only when "
                    f"weight_nz_mode == 2, and vllm_ascend/envs.py defaults VLLM_ASCEND_ENABLE_NZ to "
                    f"{default}")
        return found

    def prefill_kv(self) -> dict[str, str]:
        """What attention reads as K/V in a prefill without cache: ours the paged cache (key
        derived from key_cache, a block table); vllm-ascend the fresh K/V (block_table = None
        in _get_fia_params' PrefillNoCache branch)."""
        fia = self.mine("npu_fused_infer_attention_score")
        params = _function(self.theirs.tree, "vllm_ascend.attention.attention_v1",
                           "AscendAttentionBackendImpl._get_fia_params")
        fresh = params is not None and any(
            "PrefillNoCache" in ast.unparse(n.test) and any(
                isinstance(s, ast.Assign) and ast.unparse(s) == "block_table = None" for s in n.body)
            for n in ast.walk(params) if isinstance(n, ast.If))

        def paged(c: Call) -> bool:
            read = _reaching(c.args.get("key", ast.Constant(None)), c.fn, self.helpers)
            return ("key_cache" in {x.id for e in read for x in ast.walk(e) if isinstance(x, ast.Name)}
                    and "block_table" in c.args and c.literals.get("block_table") != "None")

        if fia and fresh and all(map(paged, fia)):
            return {"npu_fused_infer_attention_score.prefill_no_cache_kv": (
                f"ours {'; '.join(map(str, fia))} always reads K/V from the paged cache with a block "
                f"table; vllm_ascend/attention/attention_v1.py _get_fia_params passes the fresh K/V "
                f"with block_table=None for PrefillNoCache")}
        return {}

    def unpermute_dtype(self) -> dict[str, str]:
        """fp32 inputs to the unpermute: ours casts permuted_tokens and/or probs to fp32 (key
        ``fp32_inputs`` for both, else ``fp32_<name>``); no vllm-ascend call does."""
        mine = self.mine("npu_moe_token_unpermute")
        theirs = [s for s in self.theirs.calls if s.kernel == "npu_moe_token_unpermute"]
        names = ("permuted_tokens", "probs")
        cast = [a for a in names if any("float32" in self.traced(c, a) for c in mine)]
        theirs_cast = [s for s in theirs
                       if any("float32" in _dtypes([s.args[a]]) for a in names if a in s.args)]
        if cast and not theirs_cast:
            key = "fp32_inputs" if len(cast) == 2 else f"fp32_{cast[0]}"
            return {f"npu_moe_token_unpermute.{key}": (
                f"ours {'; '.join(map(str, mine))} casts {' and '.join(cast)} to float32; no "
                f"vllm-ascend call does, e.g. {_examples(theirs)}")}
        return {}

    def a2_custom_ops(self) -> dict[str, str]:
        """Kernels whose A2 path in vllm-ascend (the one ops.npu mirrors) is its own
        torch.ops._C_ascend op, although the torch_npu kernel is called elsewhere."""
        found = {}
        for kernel, module, qualname, op in self.A2_CUSTOM_OPS:
            fn = _function(self.theirs.tree, module, qualname)
            if self.mine(kernel) and fn is not None and any(
                    isinstance(n, ast.Call) and _dotted(n.func) == f"torch.ops._C_ascend.{op}"
                    for n in ast.walk(fn)):
                found[f"{kernel}.a2_custom_op"] = (
                    f"ours {'; '.join(map(str, self.mine(kernel)))}; on A2 vllm-ascend's "
                    f"{module}.{qualname} calls its own torch.ops._C_ascend.{op} instead")
        return found


def differences(ours: Reading, theirs: Reading) -> dict[str, str]:
    return {**compare_calls(ours.calls, theirs.calls), **Facts(ours, theirs).all()}


def read_table(source: str) -> dict[str, str]:
    """``NPU_CALL_DIFFERENCES`` from the module's AST (importing ops.npu needs torch_npu)."""
    for stmt in ast.parse(source).body:
        target = stmt.target if isinstance(stmt, ast.AnnAssign) else \
            stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id == TABLE:
            table = ast.literal_eval(stmt.value)
            assert isinstance(table, dict), f"{TABLE} is not a dict literal"
            return table
    raise AssertionError(f"ops/npu.py has no module-level {TABLE} = {{...}} table")


def problems(found: dict[str, str], table: dict[str, str]) -> list[str]:
    out = [f"UNLISTED {k}: {found[k]}" for k in sorted(found) if k not in table]
    out += [f"STALE {k}: the table lists it, but no such difference exists any more (delete the entry)"
            for k in sorted(table) if k not in found]
    return out


# ============================================================================================
# fixtures
# ============================================================================================

@pytest.fixture(scope="module")
def vllm_ascend() -> Reading:
    # the wheel test_vllm_compat checks against: cached in .cache/vllm-ascend-0.23 (or
    # $ASCEND_QWEN3_HOME), downloaded with `pip download --no-deps` on first use; a missing wheel
    # without PyPI access fails with the command to run and the directory to put it in.
    return read_vllm_ascend(_wheel("vllm-ascend==0.23.0", "vllm_ascend-0.23.0-*.whl", "vllm-ascend-0.23"))


@pytest.fixture(scope="module")
def npu_source() -> str:
    with open(NPU_PY, encoding="utf-8") as f:
        return f.read()


# ============================================================================================
# tests
# ============================================================================================

def test_every_difference_from_vllm_ascend_is_documented(vllm_ascend, npu_source):
    """The differences between ops/npu.py's torch_npu calls and vllm-ascend 0.23's are exactly
    the entries of ops.npu.NPU_CALL_DIFFERENCES."""
    found = differences(read_ours(npu_source), vllm_ascend)
    bad = problems(found, read_table(npu_source))
    assert not bad, (f"{len(bad)} problem(s) with {TABLE} (add an entry saying why ours is right, "
                     f"or fix the call):\n" + "\n".join(bad))


def test_table_entries_say_why_and_cite_a_source(npu_source):
    """Each entry is an explanation (not a placeholder) that cites the vllm-ascend file or the
    torch_npu / op-plugin page it relies on."""
    table = read_table(npu_source)
    assert table
    for key, why in table.items():
        assert re.fullmatch(r"_?npu_\w+\.\w+(\.\w+)?", key), key
        assert len(why) > 80 and why.strip().endswith("."), (key, why)
        assert "vllm_ascend/" in why or "torch_npu-" in why or "op-plugin" in why, (key, why)


def test_every_torch_npu_use_in_ops_npu_is_read(npu_source):
    """The collector sees each ``torch_npu.<x>`` of ops/npu.py as a call of a kernel with a schema
    (so nothing is compared by accident against nothing); ``torch_npu.npu`` (streams, events,
    graph task groups: the runtime, not kernels) aside."""
    ours = read_ours(npu_source)
    uses = [n for n in ast.walk(ast.parse(npu_source)) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "torch_npu" and n.attr != "npu"]
    assert len(uses) == len(ours.calls) >= 15, ([ast.unparse(u) for u in uses],
                                                [str(c) for c in ours.calls])
    assert {c.kernel for c in ours.calls} <= set(SCHEMAS)
    for c in ours.calls:
        assert c.complete and c.positional <= len(SCHEMAS[c.kernel]), str(c)


def test_the_wheel_reader_sees_vllm_ascends_production_calls(vllm_ascend):
    """What the comparison stands on: the A2 attention call reached through
    DeviceOperator.npu_fused_infer_attention_score(**kwargs), the ATB cache write, the
    positional npu_quantize and the resolved ACL_FORMAT_FRACTAL_NZ constant."""
    calls = vllm_ascend.calls
    fia = [c for c in calls if c.kernel == "npu_fused_infer_attention_score" and "via" in c.where
           and c.platform == "A2" and "attention_v1.py" in c.where]
    assert fia and fia[0].literals.get("input_layout") == "'TND'"
    assert fia[0].literals.get("sparse_mode") == "3"
    assert {"query", "key", "value", "atten_mask", "block_table", "actual_seq_lengths_kv",
            "num_heads", "num_key_value_heads", "scale", "block_size"} <= set(fia[0].args)
    assert not {"head_size", "key_cache", "current_key"} & set(fia[0].args)   # the forwarder's own
    cache = [c for c in calls if c.kernel == "_npu_reshape_and_cache" and c.platform == "A2"]
    assert any("device_op.py" in c.where and "slot_indices" in c.args for c in cache)
    quantize = [c for c in calls if c.kernel == "npu_quantize" and "register_custom_ops.py" in c.where]
    assert quantize and quantize[0].literals.get("div_mode") == "False"
    assert quantize[0].literals.get("axis") == "-1"
    assert "29" in {c.literals.get("acl_format") for c in calls if c.kernel == "npu_format_cast"}
    assert any(c.platform == "310P" for c in calls) and any(c.platform == "A5" for c in calls)


FAKE_OURS = '''
import torch
import torch_npu as tnpu
from torch_npu import npu_rms_norm as rms


def route(x, w, g, eps, kc, vc, slots):
    y = tnpu.npu_grouped_matmul([x], [w], group_list=g, group_list_typ=1, split_item=3, group_type=2)
    rms(x, w, eps=eps)
    tnpu._npu_reshape_and_cache(x, x, kc, vc, slots)
    return tnpu.npu_moe_finalize_routing(y, None, None, None, w, g, g)
'''

# the same kernels called as vllm-ascend 0.23 calls them (vllm_ascend/ops/fused_moe/moe_mlp.py
# unquant_apply_mlp, device/device_op.py reshape_and_cache, ops/register_custom_ops.py
# _quantize_impl, attention/sfa_v1.py custom_kv_rmsnorm_rope), with the casts vllm-ascend makes
# upstream (token_dispatcher.py expert_tokens.to(torch.int64), int32 slot buffers)
FAITHFUL_OURS = '''
import torch
import torch_npu


def mlp(h, w1, counts, t, s, o, gamma, kc, vc, slot_mapping):
    g = counts.to(torch.int64)
    torch_npu.npu_grouped_matmul(x=[h], weight=[w1], split_item=2, group_list_type=t, group_type=0,
                                 group_list=g)
    slots = slot_mapping.to(torch.int32)
    torch_npu._npu_reshape_and_cache(key=h, value=h, key_cache=kc, value_cache=vc, slot_indices=slots)
    torch_npu.npu_quantize(h, s, o, torch.qint8, -1, False)
    return torch_npu.npu_rms_norm(h, gamma, epsilon=1e-6)
'''


def test_the_comparison_reports_a_wrong_call(vllm_ascend, npu_source):
    """A misspelt keyword, a group_type vllm-ascend never passes, a keyword name from the wrong
    kernel (through a ``from torch_npu import ... as`` alias), a kernel vllm-ascend never calls,
    and missing int64 / int32 casts of the group list and the slots are each reported as
    UNLISTED; split_item=3 is not (vllm-ascend passes it in ops/fused_moe/moe_mlp.py)."""
    found = differences(read_ours(FAKE_OURS, "fake/ours.py"), vllm_ascend)
    expected = {"npu_grouped_matmul.group_list_typ", "npu_grouped_matmul.group_type",
                "npu_rms_norm.eps", "npu_moe_finalize_routing.not_called",
                "npu_grouped_matmul.group_list.int64", "_npu_reshape_and_cache.slot_indices.int32"}
    assert expected <= set(found), sorted(found)
    assert "npu_grouped_matmul.split_item" not in found
    assert "fake/ours.py:8 route" in found["npu_grouped_matmul.group_type"]
    assert "vllm_ascend/" in found["npu_grouped_matmul.group_type"]           # their call site too
    reported = problems(found, read_table(npu_source))
    for key in expected:
        assert any(p.startswith(f"UNLISTED {key}:") for p in reported), (key, reported)


def test_a_call_made_as_vllm_ascend_makes_it_has_no_difference(vllm_ascend):
    """The same kernels called as vllm-ascend calls them (one positional npu_quantize) differ in
    nothing, so the failures above come from the wrong arguments alone."""
    assert differences(read_ours(FAITHFUL_OURS, "fake/ours.py"), vllm_ascend) == {}


def test_stale_entries_are_reported(vllm_ascend, npu_source):
    """An entry for a difference that does not exist is reported, with what to do."""
    found = differences(read_ours(npu_source), vllm_ascend)
    table = {**read_table(npu_source), "npu_swiglu.no_such_difference": "."}
    assert "STALE npu_swiglu.no_such_difference" in "\n".join(problems(found, table))


# ============================================================================================
# vllm-ascend's own LoRA kernels (torch.ops._C_ascend.bgmv_*): the emulator's schemas
# ============================================================================================

# what vllm_ascend/lora/lora_ops.py passes -> the schema parameter it must land on
LORA_ARGUMENT_ROLES = {"inputs": "x", "lora_a_weights": "weight", "lora_b_weights": "weight",
                       "lora_indices_tensor": "indices", "output_tensor": "y", "scaling": "scale",
                       "slice_offset": "slice_offset", "slice_size": "slice_size",
                       "0": "slice_offset", "output_tensor.size(1)": "slice_size"}


def test_emulated_c_ascend_schemas_match_vllm_ascends_lora_calls():
    """tests/npu_emulator/c_ascend.py takes the schemas of bgmv_shrink / bgmv_expand from
    vllm-ascend's csrc/torch_binding.cpp (not in the wheel); the wheel's
    vllm_ascend/lora/lora_ops.py calls them positionally, one argument per schema parameter in the
    schema's order: activations, weights, indices, output, then scale or the slice."""
    import torch

    from tests.npu_emulator import c_ascend

    wheel = _wheel("vllm-ascend==0.23.0", "vllm_ascend-0.23.0-*.whl", "vllm-ascend-0.23")
    src = zipfile.ZipFile(wheel).read("vllm_ascend/lora/lora_ops.py").decode("utf-8")
    calls = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
             and (_dotted(n.func) or "").startswith("torch.ops._C_ascend.bgmv_")]
    seen = set()
    for call in calls:
        kernel = _dotted(call.func).rsplit(".", 1)[1]
        schema = torch._C.parse_schema(c_ascend.SCHEMAS[kernel])
        passed = [LORA_ARGUMENT_ROLES.get(ast.unparse(a), ast.unparse(a)) for a in call.args]
        assert not call.keywords and passed == [p.name for p in schema.arguments], (
            f"vllm_ascend/lora/lora_ops.py:{call.lineno} calls {kernel} with "
            f"{[ast.unparse(a) for a in call.args]}; the emulated schema is {schema}")
        seen.add(kernel)
    assert seen == {k for k in c_ascend.SCHEMAS if k.startswith("bgmv_")}, seen


# ============================================================================================
# vllm-ascend's own MoE and Triton kernels: the emulator's schemas against the wheel's callers
# ============================================================================================

def _wheel_source(path: str) -> str:
    wheel = _wheel("vllm-ascend==0.23.0", "vllm_ascend-0.23.0-*.whl", "vllm-ascend-0.23")
    return zipfile.ZipFile(wheel).read(path).decode("utf-8")


def test_emulated_schemas_take_vllm_ascends_moe_and_triton_calls():
    """tests/npu_emulator/c_ascend.py's schemas of moe_gating_top_k and
    grouped_matmul_swiglu_quant_weight_nz (from csrc/torch_binding.cpp, not in the wheel) take
    every keyword vllm_ascend/device/device_op.py passes them, its first positional argument
    where it passes one; the Triton qkv_rmsnorm_rope's schema lists the parameters of the
    wheel's split_qkv_rmsnorm_rope_impl, in order."""
    import torch

    from tests.npu_emulator import c_ascend

    src = _wheel_source("vllm_ascend/device/device_op.py")
    seen = set()
    for call in ast.walk(ast.parse(src)):
        name = _dotted(call.func) if isinstance(call, ast.Call) else None
        if not name or not name.startswith("torch.ops._C_ascend."):
            continue
        kernel = name.rsplit(".", 1)[1]
        if kernel not in ("moe_gating_top_k", "grouped_matmul_swiglu_quant_weight_nz"):
            continue
        schema = torch._C.parse_schema(c_ascend.SCHEMAS[kernel])
        params = [a.name for a in schema.arguments]
        assert len(call.args) <= 1 and {k.arg for k in call.keywords} <= set(params[len(call.args):]), (
            f"device_op.py:{call.lineno} calls {kernel} with {ast.unparse(call)}; the emulated "
            f"schema is {schema}")
        seen.add(kernel)
    assert seen == {"moe_gating_top_k", "grouped_matmul_swiglu_quant_weight_nz"}, seen

    src = _wheel_source("vllm_ascend/ops/triton/linearnorm/split_qkv_rmsnorm_rope.py")
    impl = next(n for n in ast.walk(ast.parse(src))
                if isinstance(n, ast.FunctionDef) and n.name == "split_qkv_rmsnorm_rope_impl")
    schema = torch._C.parse_schema(c_ascend.TRITON_SCHEMAS["qkv_rmsnorm_rope"])
    assert [a.arg for a in impl.args.args] == [a.name for a in schema.arguments]
    registered = {(kw["op_name"], kw["op_func"]) for call in ast.walk(ast.parse(src))
                  if isinstance(call, ast.Call) and _dotted(call.func) == "direct_register_custom_op"
                  for kw in [{k.arg: ast.unparse(k.value) for k in call.keywords}]}
    assert ("'qkv_rmsnorm_rope'", "split_qkv_rmsnorm_rope_impl") in registered, registered
