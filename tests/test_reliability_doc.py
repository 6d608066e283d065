"""docs/RELIABILITY.md: every row of its tables names at least one test, and every test it
names exists (``tests/x.py::name``, ``tests/x.py`` for a whole file, or a bare ``name`` in the
file named before it in the same cell or by the section's "All in `tests/x.py`" line)."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "RELIABILITY.md")


def _defined(path: str) -> set[str]:
    with open(os.path.join(ROOT, path)) as f:
        return set(re.findall(r"^def (test_\w+)", f.read(), re.M))


def named_tests(doc: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """(row's first cell, [(file, test name or None)]) for every table row of ``doc``."""
    rows, section_file = [], None
    for line in doc.splitlines():
        if line.startswith("## "):
            section_file = None
        m = re.search(r"All in `(tests/[\w/]+\.py)`", line)
        if m:
            section_file = m.group(1)
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 3 or cells[0] in ("case", "") or set(cells[0]) <= {"-"}:
            continue
        current, refs = section_file, []
        for token in re.findall(r"`([^`]+)`", cells[-1]):
            path, _, name = token.partition("::")
            if path.startswith("tests/") and path.endswith(".py"):
                current = path
                refs.append((path, name.split("[")[0] or None))
            elif re.fullmatch(r"test_\w+(\[.*\])?", token):
                refs.append((current, token.split("[")[0]))
        rows.append((cells[0], refs))
    return rows


def test_every_row_names_an_existing_test():
    with open(DOC) as f:
        rows = named_tests(f.read())
    assert len(rows) >= 40, f"only {len(rows)} rows found: is the table format still parsed?"
    problems = []
    for case, refs in rows:
        if not refs:
            problems.append(f"{case!r}: names no test")
        for path, name in refs:
            if path is None or not os.path.isfile(os.path.join(ROOT, path)):
                problems.append(f"{case!r}: {path} is not a test file")
            elif name is not None and name not in _defined(path):
                problems.append(f"{case!r}: {path} has no {name}")
    assert not problems, "\n".join(problems)


def test_the_check_can_fail():
    doc = ("## S\n| case | what | test |\n|---|---|---|\n| a | b | `tests/test_reliability_doc.py::test_nope` |\n"
           "| c | d | nothing |\n")
    rows = named_tests(doc)
    assert rows == [("a", [("tests/test_reliability_doc.py", "test_nope")]), ("c", [])]
    assert "test_nope" not in _defined("tests/test_reliability_doc.py")
