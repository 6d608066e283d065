"""Readers for the build files the deploy tests check, without running any of them: a
Dockerfile (instructions as ``docker build`` sees them before running anything), setup.py (its
``setup(...)`` literals), the Makefile's torch pin and uninstalls, and .dockerignore matching."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# A small Dockerfile reader: what `docker build` does with lines before it runs anything.

class Instr:
    def __init__(self, keyword: str, rest: str, line: int):
        self.keyword, self.rest, self.line = keyword, rest, line

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of CMD / ENTRYPOINT / RUN, or None for the shell form."""
        text = self.rest.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None  # Docker treats invalid JSON as the shell form
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None

    def __repr__(self):
        return f"{self.keyword} {self.rest} (line {self.line})"


def parse_dockerfile(text: str) -> list[Instr]:
    """Instructions in order: comment lines dropped (also inside a continuation), lines ending
    in the escape character `\\` joined with the next, keywords upper-cased."""
    assert not re.match(r"#\s*escape\s*=", text, re.I), "a parser directive changes the escape character"
    out, buf, start = [], [], 0
    for i, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not buf:
            start = i
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        line = " ".join(b for b in buf if b)
        buf = []
        keyword, _, rest = line.partition(" ")
        assert "<<" not in rest or keyword.upper() != "RUN", "heredocs are not parsed here"
        out.append(Instr(keyword.upper(), rest.strip(), start))
    assert not buf, "the file ends inside a continuation"
    return out


def substitute(text: str, values: dict) -> str:
    """${VAR}, ${VAR:-default} and $VAR from values (as Docker and sh do)."""
    def repl(m):
        name = m.group(1) or m.group(3)
        default = m.group(2)
        v = values.get(name)
        return v if v not in (None, "") else (default or "")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", repl, text)


class Dockerfile:
    def __init__(self, path: str):
        self.path = path
        with open(path) as f:
            self.text = f.read()
        self.instrs = parse_dockerfile(self.text)

    def all(self, keyword: str) -> list[Instr]:
        return [i for i in self.instrs if i.keyword == keyword]

    def last(self, keyword: str) -> Instr | None:
        found = self.all(keyword)
        return found[-1] if found else None

    @property
    def base_image(self) -> str:
        """The first FROM image with the ARG defaults declared before it substituted."""
        args = {}
        for ins in self.instrs:
            if ins.keyword == "ARG":
                name, _, default = ins.rest.partition("=")
                args[name.strip()] = default.strip().strip('"')
            elif ins.keyword == "FROM":
                words = [w for w in shlex.split(ins.rest) if not w.startswith("--")]
                return substitute(words[0], args)
        raise AssertionError(f"{self.path}: no FROM")

    @property
    def env(self) -> dict:
        values = {}
        for ins in self.all("ENV"):
            words = shlex.split(ins.rest)
            if words and "=" not in words[0]:          # legacy `ENV KEY value`
                values[words[0]] = substitute(" ".join(words[1:]), values)
                continue
            for w in words:
                k, _, v = w.partition("=")
                values[k] = substitute(v, values)
        return values

    @property
    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, absolute destination) of every COPY / ADD, after WORKDIR."""
        workdir, out = "/", []
        for ins in self.instrs:
            if ins.keyword == "WORKDIR":
                workdir = os.path.join(workdir, ins.rest.strip())
            elif ins.keyword in ("COPY", "ADD"):
                words = [w for w in shlex.split(ins.rest) if not w.startswith("--")]
                dest = words[-1]
                out.append((words[:-1], os.path.normpath(os.path.join(workdir, dest))
                            + ("/" if dest.endswith("/") else "")))
        return out

    def run_commands(self) -> list[list[str]]:
        """Every simple command of every RUN (split on &&), as argv words."""
        cmds = []
        for ins in self.all("RUN"):
            rest = ins.rest
            while rest.startswith("--"):             # BuildKit's RUN flags (--mount=...)
                rest = rest.split(None, 1)[1] if len(rest.split(None, 1)) > 1 else ""
            for part in re.split(r"\s&&\s", rest):
                if part.strip():
                    cmds.append(shlex.split(part))
        return cmds

    def pip(self, action: str) -> list[dict]:
        """pip <action> commands: {"flags": {flag: value or True}, "args": [requirements]}."""
        takes_value = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c",
                       "--constraint", "-f", "--find-links", "--target", "-t"}
        found = []
        for argv in self.run_commands():
            if not any(w.endswith("pip") or w == "pip3" for w in argv) or action not in argv:
                continue
            words = argv[argv.index(action) + 1:]
            flags, args, i = {}, [], 0
            while i < len(words):
                w = words[i]
                if w in takes_value:
                    flags[w] = words[i + 1]
                    i += 2
                    continue
                if w.startswith("-"):
                    k, eq, v = w.partition("=")
                    flags[k] = v if eq else True
                else:
                    args.append(w)
                i += 1
            found.append({"flags": flags, "args": args, "argv": argv})
        return found

    @property
    def healthcheck(self) -> tuple[dict, list[str]]:
        ins = self.last("HEALTHCHECK")
        assert ins is not None, f"{self.path}: no HEALTHCHECK"
        opts, rest = {}, ins.rest
        while rest.startswith("--"):
            opt, _, rest = rest.partition(" ")
            k, _, v = opt.partition("=")
            opts[k[2:]] = v
            rest = rest.strip()
        kind, _, cmd = rest.partition(" ")
        assert kind.upper() == "CMD", f"{self.path}: HEALTHCHECK {kind}"
        argv = Instr("CMD", cmd, ins.line).exec_form
        assert argv, f"{self.path}: HEALTHCHECK CMD should be the exec (JSON) form"
        return opts, argv


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    return total


# ---------------------------------------------------------------------------------------------
# setup.py and the Makefile, read without running them

def _setup_call() -> ast.Call:
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup":
            return node
    raise AssertionError("setup.py has no setup(...) call")


def setup_kw(name: str):
    for kw in _setup_call().keywords:
        if kw.arg == name:
            return kw.value
    raise AssertionError(f"setup.py: no {name}=")


def setup_literal(name: str):
    return ast.literal_eval(setup_kw(name))


def package_roots() -> set[str]:
    """Top-level packages setup.py installs (find_packages with its include patterns)."""
    from setuptools import find_packages
    call = setup_kw("packages")
    assert isinstance(call, ast.Call) and getattr(call.func, "id", "") == "find_packages"
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    return {p.split(".")[0] for p in find_packages(ROOT, **kwargs)}


def requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def makefile() -> str:
    with open(os.path.join(ROOT, "Makefile")) as f:
        return f.read()


def makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*\?=\s*(\S+)", makefile(), re.M)
    assert m, f"Makefile: no `{name} ?= ...`"
    return m.group(1)


def makefile_torch() -> str:
    return makefile_var("TORCH")


def makefile_uninstalled() -> set[str]:
    m = re.search(r"pip uninstall((?:\s+-\S+)*)((?:\s+[A-Za-z0-9_.-]+)+)\s*$", makefile(), re.M)
    assert m, "Makefile: no `pip uninstall ... packages`"
    return set(m.group(2).split())


def console_script() -> str:
    scripts = setup_literal("entry_points")["console_scripts"]
    assert len(scripts) == 1
    return scripts[0].split("=")[0].strip()


# ---------------------------------------------------------------------------------------------
# .dockerignore (Docker's rules: Go filepath.Match per pattern, `**` for any depth, a pattern
# excluding a directory excludes everything under it, `!` re-includes)

def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    out = []
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            pat = os.path.normpath(line.lstrip("!").lstrip("/"))
            rx = ""
            i = 0
            while i < len(pat):
                if pat.startswith("**/", i):
                    rx, i = rx + "(?:.*/)?", i + 3
                elif pat.startswith("**", i):
                    rx, i = rx + ".*", i + 2
                elif pat[i] == "*":
                    rx, i = rx + "[^/]*", i + 1
                elif pat[i] == "?":
                    rx, i = rx + "[^/]", i + 1
                else:
                    rx, i = rx + re.escape(pat[i]), i + 1
            out.append((neg, re.compile(rx + "$")))
    return out


def dockerignored(rel: str, patterns=None) -> bool:
    patterns = dockerignore_patterns() if patterns is None else patterns
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for neg, rx in patterns:
        if any(rx.match(p) for p in prefixes):
            excluded = not neg
    return excluded
