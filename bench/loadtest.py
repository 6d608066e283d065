"""Concurrent streaming chat load on a live server: the same as ``ascend-qwen3 loadtest``.

Start a server first (``make serve``), then, e.g. the full-size run of docs/loadtest.md:

    .venv/bin/python bench/loadtest.py --url http://127.0.0.1:8000 --concurrency 64 --rounds 3 \\
        --max-tokens 32 --drop 32 --json /tmp/loadtest.json

Options and what is measured: ``ascend_qwen3/loadtest.py``. Figures go to docs/loadtest.md.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ascend_qwen3.loadtest import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
