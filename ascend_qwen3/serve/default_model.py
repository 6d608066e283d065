"""The embedded default model: what ``make serve`` serves when no checkpoint is given.

The trained tiny Qwen3 (``train_tiny.py``: 4 layers, hidden 256, 4 query / 2 KV heads of 64,
tied embeddings, the full 151,936-entry vocabulary, trained on Python's reference documentation
with thinking and non-thinking chats): the user's own ``ascend-qwen3 train-tiny`` result when
there is one, else the copy that ships with the package. It answers in words from its corpus
and closes its own ``<think>`` blocks.

Where neither is there (the packaged file removed, or ``tiny --random``), the fallback is the
same architecture with random weights: it exercises the whole serving path (tokenizer,
template, engine, parsers) and answers with fluent-looking nonsense.

Either way: the real Qwen3 tokenizer (built from quicktok-v1), the project's chat template with
Qwen3's thinking behaviour, Qwen3's generation defaults for thinking mode; about 80 MB in bf16;
built in seconds, once, and rebuilt when its source changes.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..checkpoint import write_random_checkpoint
from .generation_config import write_generation_config
from .tokenizer import write_qwen3_tokenizer
from .train_tiny import CONFIGS, NAMES, export, file_digest

NAME = "qwen3-tiny-random"
TRAINED_NAME = NAMES["dense"]

CONFIG = CONFIGS["dense"]

STAMP = "ascend_qwen3_default_model.json"
# bumped whenever the files written below change, so an older build is rebuilt
BUILD_VERSION = 4


def _stamp(path: str) -> dict:
    try:
        with open(os.path.join(path, STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def is_built(path: str, source: str | None = None) -> bool:
    """Built by this version, from ``source`` (a trained compact file) or random if None."""
    s = _stamp(path)
    return (s.get("build") == BUILD_VERSION
            and s.get("source_digest") == (file_digest(source) if source else None))


def served_name(path: str) -> str:
    """The name clients use for the default model in ``path``."""
    return _stamp(path).get("name", NAME)


def build_default_draft(path: str, *, source: str, target_source: str, log=print) -> str:
    """The default model's EAGLE-3 draft in ``path`` (a no-op if it is already there), exported
    from the compact draft file ``source`` (``train_draft.py``), which must have been trained for
    the target exported from ``target_source``."""
    from .train_draft import draft_info, export_draft

    info = draft_info(source)
    if info.get("target_digest") != file_digest(target_source):
        raise ValueError(f"the EAGLE-3 draft {source} was trained for another tiny Qwen3 than the "
                         f"one served ({target_source}); run `make train-tiny`, which trains the "
                         f"draft for the model it trains")
    want = {"build": BUILD_VERSION, "source_digest": file_digest(source)}
    if all(_stamp(path).get(k) == v for k, v in want.items()):
        return path
    tmp = path.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"building the default model's EAGLE-3 draft (from {source}) in {path}")
    export_draft(source, tmp, log=lambda m: None)
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump(dict(want, name=info["name"], source=source), f)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def build_default_model(path: str, *, source: str | None = None, seed: int = 0,
                        force: bool = False, log=print) -> str:
    """Build the default model in ``path`` (a no-op if it is already there): exported from the
    trained compact file ``source``, or random weights when ``source`` is None. Written to
    ``path + '.partial'`` and renamed at the end, so an interrupted build never looks finished."""
    if is_built(path, source) and not force:
        return path
    tmp = path.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if source:
        log(f"building the embedded default model ({TRAINED_NAME}: trained, from {source}) in {path}")
        export(source, tmp, log=lambda m: None)
        stamp = {"name": TRAINED_NAME, "weights": "trained (ascend-qwen3 train-tiny)",
                 "source": source, "source_digest": file_digest(source)}
    else:
        log(f"building the embedded default model ({NAME}: random weights, real Qwen3 tokenizer) in {path}")
        write_random_checkpoint(CONFIG, tmp, dtype=torch.bfloat16, seed=seed)
        write_qwen3_tokenizer(tmp)
        write_generation_config(tmp)
        stamp = {"name": NAME, "seed": seed, "weights": "random (not a trained model)",
                 "source_digest": None}
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump(dict(stamp, build=BUILD_VERSION), f)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
