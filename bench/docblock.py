"""Write a benchmark's results into a doc between its BEGIN / END markers."""

from __future__ import annotations

import os


def write_block(path: str, begin: str, end: str, block: str) -> None:
    """Replace the text from ``begin`` to ``end`` in ``path`` by ``block`` (which carries both
    markers); append it where the markers are not there yet."""
    text = open(path).read() if os.path.isfile(path) else ""
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text + "\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
