"""Check a checkpoint directory before loading it: ``ascend-qwen3 check MODEL`` and ``serve``'s
pre-start check.

``check_checkpoint(model_dir)`` looks at a Hugging Face Qwen3 / Qwen3-MoE checkpoint without
building the model and collects every problem it finds, in this order:

1. config.json: present, JSON, and a valid Qwen3 config (``Qwen3Config.from_dict``: required
   keys, values in range, a torch_dtype the project runs); ``tp`` / ``ep`` can shard it.
2. safetensors files, headers only (no tensor data is read): every file the index lists exists
   and holds the tensors the index maps to it; each header parses; each file is exactly
   8 + header length + data bytes long, so a truncated download is caught here with the number
   of bytes missing.
3. quant_model_description.json (W8A8 checkpoints): ``QuantConfig.from_model_dir``, plus a
   description type that disagrees with the stored dtype of a weight (W8A8 for a float weight,
   FLOAT for an int8 one).
4. tensors against the sharding plan (``loader.load_plan`` at tp=1 reads every tensor): none missing,
   none unexpected, each with the planned shape and a dtype the plan accepts.
5. tokenizer: tokenizer.json / tokenizer_config.json are present (``serve`` and ``run`` need
   them) and hold ``<|im_start|>``, ``<|im_end|>``, ``<think>`` and ``</think>`` as single
   tokens whose ids fit the model's vocabulary.
6. ``deep=True`` only: every float tensor is read and checked for NaN / Inf.

Every problem names its file (relative to the checkpoint directory), the tensor if there is one,
and says what was expected, what was found and what to do.

Tensors that no plan entry reads are refused (config.json and the weights disagree), except
those the loader deliberately ignores: ``lm_head.weight`` in a checkpoint with tied embeddings
(some exporters write the tied head; it must still have the embedding's shape and a float
dtype), ``rotary_emb.inv_freq`` buffers, the ``weight_scale`` / ``weight_offset`` that static
W8A8 linears carry but do not use, and the float ``.bias`` msModelSlim writes next to quantised
linears (docs/w8a8_format.md).
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError

from .config import ConfigError, Qwen3Config
from .loader import (CheckpointError, checkpoint_prefix, count_non_finite, load_plan,
                     open_safetensors)
from .parallel.plan import ShardingError, check_parallel
from .quant.description import QuantConfig
from .quant.format import DESCRIPTION_FILE, FLOAT, FLOAT_ST, TENSORS, W8A8, W8A8_DYNAMIC, quant_groups

INDEX_FILE = "model.safetensors.index.json"
# bytes per element of the safetensors dtypes whose size is a whole number of bytes
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
READ_DTYPES = {"F16", "BF16", "F32", "F64"}        # read by the deep check
# the tokens Qwen3's chat template and reasoning parser are built on
QWEN3_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# per-tensor problems of one kind shown before the rest are counted in one line
SHOW = 10
DEEP_CHUNK_BYTES = 256 * 2**20
_REDOWNLOAD = "re-download or re-copy it (an interrupted download or copy leaves such files)"
# what serve adds when its pre-start check fails
SKIP_ADVICE = ("found by the header-only check before starting vLLM; fix the checkpoint, or serve with "
               "--skip-check to start anyway")


# the advice closing several problems: which files were made apart, and what to do
_MIXED_EXPORTS = "the index and the shards are from different exports: re-download them together"
_DESCRIPTION_DISAGREES = ("the description and the safetensors files disagree: regenerate them "
                          "together (`ascend-qwen3 quantize` or msModelSlim)")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: where (file, tensor) and a sentence saying what was
    expected, what was found and what to do."""

    file: str                 # relative to the checkpoint directory; "" for the directory itself
    tensor: str | None
    message: str

    def __str__(self) -> str:
        where = self.file or "checkpoint"
        return f"{where}: {self.tensor}: {self.message}" if self.tensor else f"{where}: {self.message}"


@dataclass
class CheckReport:
    """What ``check_checkpoint`` found; ``ok`` when there is no problem."""

    model_dir: str
    deep: bool = False
    problems: list[Problem] = field(default_factory=list)
    files: int = 0            # safetensors files whose header was read
    tensors: int = 0          # tensors listed in those headers
    bytes_read: int = 0       # tensor data read (deep check)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, file: str, tensor: str | None, message: str) -> None:
        self.problems.append(Problem(file, tensor, message))

    def summary(self) -> str:
        mode = (f"deep: {self.bytes_read / 2**20:.1f} MiB of weights read" if self.deep
                else "header-only; --deep also reads every weight")
        what = f"{self.files} safetensors file(s), {self.tensors} tensor(s) ({mode}) in {self.seconds:.2f}s"
        if self.ok:
            return f"OK: {self.model_dir}: {what}"
        n = len(self.problems)
        return f"FAILED: {self.model_dir}: {n} problem{'s' if n > 1 else ''} in {what}"

    def raise_for_problems(self, advice: str = "") -> None:
        """Raise CheckFailed (a CheckpointError) listing the problems, if there are any."""
        if not self.ok:
            raise CheckFailed(self, advice)


class CheckFailed(CheckpointError):
    """A checkpoint with problems; ``report`` holds them, the message lists them one a line."""

    def __init__(self, report: CheckReport, advice: str = ""):
        self.report = report
        n = len(report.problems)
        head = (f"checkpoint {report.model_dir} has {n} problem{'s' if n > 1 else ''}"
                + (f" ({advice})" if advice else "") + ":")
        super().__init__("\n".join([head] + [f"  {p}" for p in report.problems]))


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as a safetensors header describes it."""

    file: str                  # path relative to the checkpoint directory
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]   # data_offsets: [begin, end) within the data section


class _FileProblem(Exception):
    """A safetensors file whose header cannot be used at all (the message is the problem)."""


def _short(names, n: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _capped(report: CheckReport, items: list[Problem], what: str) -> None:
    """Add per-tensor problems of one kind: the first SHOW, then one line counting the rest."""
    report.problems.extend(items[:SHOW])
    if len(items) > SHOW:
        files = {p.file for p in items[SHOW:]}
        report.add(files.pop() if len(files) == 1 else "", None,
                   f"... and {len(items) - SHOW} more {what} ({len(items)} in all); fix the cause "
                   f"shown above and run the check again")


# ------------------------------------------------------------------------------------------------
# 1. config.json
# ------------------------------------------------------------------------------------------------

def _check_config(model_dir: str, report: CheckReport) -> Qwen3Config | None:
    """config.json present, JSON and a valid Qwen3 config (ranges checked by from_dict)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        report.add("config.json", None, f"expected a Hugging Face Qwen3 config.json, found none in "
                                        f"{model_dir}; copy it from the original checkpoint")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except OSError as exc:
        report.add("config.json", None, f"cannot be read ({exc}); make it readable")
        return None
    except ValueError as exc:
        report.add("config.json", None, f"expected JSON, found invalid JSON ({exc}); fix it or copy "
                                        f"it from the original checkpoint")
        return None
    try:
        return Qwen3Config.from_dict(d, name=path)
    except ConfigError as exc:
        report.add("config.json", None, str(exc))
        return None


# ------------------------------------------------------------------------------------------------
# 2. safetensors headers and sizes
# ------------------------------------------------------------------------------------------------

def read_header(path: str, rel: str) -> tuple[dict[str, TensorInfo], list[str]]:
    """Parse the header of one safetensors file and check its size, reading no tensor data.

    A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
    (``name -> {dtype, shape, data_offsets}`` plus optional ``__metadata__``), then the tensors'
    bytes back to back. Returns (tensors, problems that leave the header usable: per-tensor byte
    counts, gaps, a truncated or over-long file). Raises _FileProblem when the header itself
    cannot be read.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _FileProblem(f"expected a safetensors file (8-byte header length, JSON header, "
                                   f"data), found only {size} bytes; {_REDOWNLOAD}")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise _FileProblem(f"its first 8 bytes give a header of {n} bytes, larger than the "
                                   f"whole file ({size} bytes); expected a safetensors header that "
                                   f"fits in the file: the file is truncated or not safetensors, "
                                   f"{_REDOWNLOAD}")
            raw = f.read(n)
    except OSError as exc:
        raise _FileProblem(f"cannot be read ({exc}); make it readable or re-copy it") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _FileProblem(f"expected a JSON safetensors header of {n} bytes, found bytes that are "
                           f"not JSON ({exc}); the file is corrupt or not safetensors, "
                           f"{_REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise _FileProblem(f"expected a JSON object as safetensors header, found "
                           f"{type(header).__name__}; the file is corrupt, {_REDOWNLOAD}")
    tensors: dict[str, TensorInfo] = {}
    notes: list[str] = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
              and all(isinstance(s, int) and s >= 0 for s in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
              and all(isinstance(o, int) for o in e["data_offsets"])
              and 0 <= e["data_offsets"][0] <= e["data_offsets"][1])
        if not ok:
            raise _FileProblem(f"header entry {name!r} is malformed ({str(e)[:80]}); expected "
                               f"dtype, shape and data_offsets: the file is corrupt, {_REDOWNLOAD}")
        info = TensorInfo(rel, e["dtype"], tuple(e["shape"]), tuple(e["data_offsets"]))
        tensors[name] = info
        if info.dtype in DTYPE_BYTES:
            want = DTYPE_BYTES[info.dtype]
            for s in info.shape:
                want *= s
            have = info.offsets[1] - info.offsets[0]
            if have != want:
                notes.append(f"tensor {name!r}: expected {want} bytes for {info.dtype} "
                             f"{list(info.shape)}, found data_offsets spanning {have}; the header is "
                             f"corrupt, {_REDOWNLOAD}")
    end = 0
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].offsets):
        if info.offsets[0] != end:
            notes.append(f"tensor {name!r} starts at data byte {info.offsets[0]}, expected {end} "
                         f"(tensors are stored back to back); the header is corrupt, {_REDOWNLOAD}")
            break
        end = info.offsets[1]
    end = max((i.offsets[1] for i in tensors.values()), default=0)
    expected = 8 + n + end
    if size < expected:
        notes.append(f"expected {expected} bytes (8 + {n}-byte header + {end} bytes of tensor data), "
                     f"found {size}: {expected - size} bytes are missing at the end, the file is "
                     f"truncated; {_REDOWNLOAD}")
    elif size > expected:
        notes.append(f"expected {expected} bytes (8 + {n}-byte header + {end} bytes of tensor data), "
                     f"found {size}: {size - expected} bytes follow the last tensor and safetensors "
                     f"refuses the file; {_REDOWNLOAD}")
    return tensors, notes


@dataclass
class _Files:
    tensors: dict[str, TensorInfo]       # every tensor the loader would see -> where it is
    broken: set[str]                     # files (relative) safetensors cannot open or are absent
    unknown: set[str]                    # files whose tensor list is unknown (absent, no header)
    index: bool                          # sharded with an index (tensor -> file known up front)
    # index: tensors mapped to an unknown file or to a shard without them (not reported again
    # as missing: the shard or the index entry is)
    unaccounted: set[str] = field(default_factory=set)


def _headers(model_dir: str, rels: list[str], report: CheckReport
             ) -> tuple[dict[str, dict[str, TensorInfo]], set[str], set[str]]:
    """read_header of every listed file: (file -> tensors of the files whose header parses,
    files safetensors would refuse, files whose header cannot be read)."""
    out, broken, unknown = {}, set(), set()
    for rel in rels:
        try:
            tensors, notes = read_header(os.path.join(model_dir, rel), rel)
        except _FileProblem as exc:
            report.add(rel, None, str(exc))
            broken.add(rel)
            unknown.add(rel)
            continue
        report.files += 1
        report.tensors += len(tensors)
        for note in notes:
            report.add(rel, None, note)
        if notes:
            broken.add(rel)
        out[rel] = tensors
    return out, broken, unknown


def _check_files(model_dir: str, report: CheckReport) -> _Files | None:
    """The safetensors files and the index: existence, headers, sizes, index vs shard contents."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except OSError as exc:
            report.add(INDEX_FILE, None, f"cannot be read ({exc}); make it readable or re-copy it")
            return None
        except (ValueError, AttributeError) as exc:
            report.add(INDEX_FILE, None, f"expected a JSON object with a 'weight_map', found invalid "
                                         f"content ({exc}); regenerate it or copy it from the original "
                                         f"checkpoint")
            return None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            report.add(INDEX_FILE, None, "expected a 'weight_map' object mapping tensor names to file "
                                         "names, found none; regenerate it or copy it from the "
                                         "original checkpoint")
            return None
        by_file: dict[str, list[str]] = {}
        for name, rel in weight_map.items():
            by_file.setdefault(rel, []).append(name)
        present = []
        for rel, names in sorted(by_file.items()):
            if os.path.isfile(os.path.join(model_dir, rel)):
                present.append(rel)
            else:
                report.add(rel, None, f"expected this shard, which {INDEX_FILE} lists for "
                                      f"{len(names)} tensor(s) ({_short(names, 2)}), found no such "
                                      f"file in {model_dir}; copy it from the original checkpoint "
                                      f"(an incomplete download or copy)")
        headers, broken, unknown = _headers(model_dir, present, report)
        broken |= set(by_file) - set(present)
        unknown |= set(by_file) - set(present)
        tensors: dict[str, TensorInfo] = {}
        lacking, unlisted = [], []
        for rel, held in headers.items():
            for name in by_file[rel]:
                if name in held:
                    tensors[name] = held[name]
                else:
                    lacking.append(Problem(rel, name, f"{INDEX_FILE} maps it to {rel}, which does not "
                                                      f"contain it; {_MIXED_EXPORTS}"))
            for name in held:
                if weight_map.get(name) != rel:
                    unlisted.append(Problem(rel, name, f"expected every tensor of the shard in "
                                                       f"{INDEX_FILE}, found this one missing or mapped "
                                                       f"to {weight_map.get(name)!r}, so it is never "
                                                       f"read; {_MIXED_EXPORTS}"))
        _capped(report, lacking, "tensors the index maps to a shard without them")
        _capped(report, unlisted, "shard tensors the index does not map to their shard")
        return _Files(tensors, broken, unknown, True,
                      {n for rel in unknown for n in by_file[rel]} | {p.tensor for p in lacking})

    rels = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not rels:
        report.add("", None, f"expected model.safetensors (or shards with {INDEX_FILE}), found no "
                             f"*.safetensors file in {model_dir}; convert the checkpoint to "
                             f"safetensors (pytorch_model.bin is not read)")
        return None
    headers, broken, unknown = _headers(model_dir, rels, report)
    tensors = {}
    twice = []
    for rel, held in headers.items():
        for name, info in held.items():
            if name in tensors:
                twice.append(Problem(rel, name, f"expected each tensor in one file, found it in "
                                                f"{tensors[name].file} too; remove the stale file "
                                                f"(or add a {INDEX_FILE} naming the right one)"))
            tensors[name] = info
    _capped(report, twice, "tensors stored in two files")
    return _Files(tensors, broken, unknown, False)


# ------------------------------------------------------------------------------------------------
# 3. quant_model_description.json
# ------------------------------------------------------------------------------------------------

def _check_description(model_dir: str, cfg: Qwen3Config, files: _Files,
                       report: CheckReport) -> tuple[QuantConfig | None, bool, set[str]]:
    """(quant config, description usable, tensors already reported for a dtype the description
    contradicts). No description: (None, True, set())."""
    path = os.path.join(model_dir, DESCRIPTION_FILE)
    if not os.path.isfile(path):
        return None, True, set()
    lied: list[Problem] = []
    try:
        with open(path, encoding="utf-8") as f:
            desc = json.load(f)
    except (OSError, ValueError):
        desc = None   # from_model_dir below reports it
    if isinstance(desc, dict):
        for name, kind in desc.items():
            info = files.tensors.get(name)
            if info is None or not name.endswith(".weight") or not isinstance(kind, str):
                continue
            if kind in (W8A8, W8A8_DYNAMIC) and info.dtype != "I8":
                lied.append(Problem(DESCRIPTION_FILE, name, f"described as {kind}, whose weight is "
                                    f"stored as int8 (I8), but {info.file} stores it as {info.dtype}; "
                                    f"{_DESCRIPTION_DISAGREES}"))
            elif kind == FLOAT and info.dtype not in FLOAT_ST:
                lied.append(Problem(DESCRIPTION_FILE, name, f"described as FLOAT (stored as "
                                    f"{', '.join(FLOAT_ST)}), but {info.file} stores it as "
                                    f"{info.dtype}; {_DESCRIPTION_DISAGREES}"))
    _capped(report, lied, "weights whose description contradicts their dtype")
    names = set(files.tensors) if not files.unknown else None
    try:
        quant = QuantConfig.from_model_dir(model_dir, cfg, names)
    except (ValueError, OSError) as exc:   # QuantFormatError is a ValueError
        report.add(DESCRIPTION_FILE, None, str(exc))
        return None, False, {p.tensor for p in lied}
    return quant, True, {p.tensor for p in lied}


# ------------------------------------------------------------------------------------------------
# 4. tensors against the sharding plan
# ------------------------------------------------------------------------------------------------

def _optional_tensors(cfg: Qwen3Config, quant: QuantConfig | None) -> dict[str, tuple[tuple, tuple]]:
    """Tensors the loader ignores but a checkpoint may carry: name -> (shape, accepted dtypes)."""
    out = {}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = ((cfg.vocab_size, cfg.hidden_size), FLOAT_ST)
    if quant is not None:
        for g in quant_groups(cfg):
            kind = quant.scheme(g.module)
            if kind is None:
                continue
            for m, (o, i) in zip(g.members, g.shapes):
                for spec in TENSORS[kind]:
                    if not spec.required:
                        out[f"{m}.{spec.suffix}"] = (spec.dims(o, i), spec.dtypes)
                # msModelSlim's static export writes a float .bias next to quantised linears
                out[f"{m}.bias"] = ((o,), FLOAT_ST)
    return out


def _extra_hint(cfg: Qwen3Config, quant: QuantConfig | None, names: list[str]) -> str:
    """Why tensors may be unexpected: layers or experts beyond what config.json says, or W8A8
    tensors without a description."""
    layers = [int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    if layers and max(layers) >= cfg.num_layers:
        return (f"config.json says num_hidden_layers={cfg.num_layers} but the files hold layers up "
                f"to {max(layers)}")
    experts = [int(m.group(1)) for n in names if (m := re.search(r"\.experts\.(\d+)\.", n))]
    if experts and cfg.is_moe and max(experts) >= cfg.num_experts:
        return (f"config.json says num_experts={cfg.num_experts} but the files hold experts up to "
                f"{max(experts)}")
    if experts and not cfg.is_moe:
        return f"config.json describes a dense {cfg.architecture} but the files hold MoE experts"
    scales = {spec.suffix for kind in (W8A8, W8A8_DYNAMIC) for spec in TENSORS[kind]} - {"weight"}
    if quant is None and any(n.rsplit(".", 1)[-1] in scales for n in names):
        return f"they look like W8A8 tensors, but there is no {DESCRIPTION_FILE}"
    return ""


def _check_tensors(cfg: Qwen3Config, quant: QuantConfig | None, files: _Files, dtype_reported: set[str],
                   report: CheckReport) -> None:
    """Every tensor the tp=1 plan reads is present with its shape and an accepted dtype; no
    tensor is left over."""
    expected = {}
    try:   # a bare Qwen3Model export (Qwen3-Embedding: no "model." prefix, no head) or the usual
        prefix = checkpoint_prefix(files.tensors)
    except CheckpointError:
        prefix = "model."          # neither: the missing tensors are reported below
    for a in load_plan(cfg, 1, 0, False, quant, prefix=prefix, head=prefix == "model."):
        expected.setdefault(a.name, (a.shape, a.dtypes))
    optional = _optional_tensors(cfg, quant)
    model = f"{cfg.architecture}, {cfg.num_layers} layers" \
        + (f", {cfg.num_experts} experts" if cfg.is_moe else "")

    missing = [n for n in expected if n not in files.tensors and n not in files.unaccounted]
    if missing and (files.index or not files.unknown):
        where = INDEX_FILE if files.index or not files.tensors else next(iter(files.tensors.values())).file
        report.add(where, missing[0] if len(missing) == 1 else None,
                   f"expected every tensor config.json implies ({model}), found {len(missing)} "
                   f"missing: {_short(missing)}; the files are incomplete or from a different model: "
                   f"re-download the checkpoint, or use the config.json that came with these weights")

    # the scales of a linear whose weight the description contradicts are reported with it
    contradicted = {n[:-len("weight")] for n in dtype_reported}
    extra_by_file: dict[str, list[str]] = {}
    for name, info in files.tensors.items():
        if name not in expected and name not in optional and not name.endswith("rotary_emb.inv_freq") \
                and name[:name.rfind(".") + 1] not in contradicted:
            extra_by_file.setdefault(info.file, []).append(name)
    for rel, names in sorted(extra_by_file.items()):
        hint = _extra_hint(cfg, quant, names)
        report.add(rel, names[0] if len(names) == 1 else None,
                   f"expected only tensors config.json implies ({model}), found {len(names)} that no "
                   f"part of the model reads: {_short(names)}" + (f" ({hint})" if hint else "")
                   + "; remove them, or use the config.json that came with these weights")

    shapes, dtypes = [], []
    for name, info in files.tensors.items():
        want = expected.get(name) or optional.get(name)
        if want is None:
            continue
        shape, accepted = want
        if info.shape != tuple(shape):
            shapes.append(Problem(info.file, name, f"expected shape {list(shape)} from config.json, found "
                                                   f"{list(info.shape)}; the weights and config.json "
                                                   f"disagree: use the config.json that came with them"))
        if info.dtype not in accepted and name not in dtype_reported:
            if quant is None and info.dtype not in FLOAT_ST:
                fix = (f"if this is a quantised checkpoint its {DESCRIPTION_FILE} is missing, add "
                       f"it; otherwise re-export the checkpoint in a float dtype")
            else:
                fix = (f"{'its quantisation type' if quant else 'a float checkpoint'} needs "
                       f"{' or '.join(accepted)}; re-export the checkpoint"
                       + (f" (or fix {DESCRIPTION_FILE})" if quant else ""))
            dtypes.append(Problem(info.file, name, f"expected dtype {' or '.join(accepted)}, found "
                                                   f"{info.dtype}: {fix}"))
    _capped(report, shapes, "tensors with the wrong shape")
    _capped(report, dtypes, "tensors with the wrong dtype")


# ------------------------------------------------------------------------------------------------
# 5. tokenizer
# ------------------------------------------------------------------------------------------------

def _load_json(model_dir: str, rel: str, report: CheckReport):
    try:
        with open(os.path.join(model_dir, rel), encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        report.add(rel, None, f"cannot be read ({exc}); make it readable or re-copy it")
    except ValueError as exc:
        report.add(rel, None, f"expected JSON, found invalid JSON ({exc}); copy the file from the "
                              f"original checkpoint")
    return None


def _one_of(value, wanted: set[str]) -> bool:
    return isinstance(value, str) and value in wanted


def tokenizer_ids(model_dir: str, report: CheckReport,
                  tokens: tuple[str, ...] = QWEN3_TOKENS) -> dict[str, int] | None:
    """token -> id of those of ``tokens`` that the tokenizer files hold as single tokens (added
    tokens or vocabulary entries), read as JSON without loading a tokenizer.

    Sources, later ones filling gaps: tokenizer.json (``added_tokens``, ``model.vocab``),
    tokenizer_config.json (``added_tokens_decoder``), added_tokens.json and vocab.json (the slow
    tokenizer's files). None, with a problem added, when the directory has no usable tokenizer."""
    has = {n for n in TOKENIZER_FILES + ("vocab.json", "merges.txt", "added_tokens.json")
           if os.path.isfile(os.path.join(model_dir, n))}
    if not has & set(TOKENIZER_FILES):
        report.add("", None, f"expected the Qwen3 tokenizer files ({' and '.join(TOKENIZER_FILES)}), "
                             f"which serve and run need, found none in {model_dir}; copy them from "
                             f"the original checkpoint")
        return None
    if "tokenizer.json" not in has and not {"vocab.json", "merges.txt"} <= has:
        report.add("tokenizer_config.json", None, "expected tokenizer.json (or vocab.json and "
                                                  "merges.txt) next to it, found neither, so no "
                                                  "tokenizer can be built; copy tokenizer.json from "
                                                  "the original checkpoint")
        return None
    wanted = set(tokens)
    ids: dict[str, int] = {}
    bad = False
    for rel in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "vocab.json"):
        if rel not in has:
            continue
        d = _load_json(model_dir, rel, report)
        if d is None:
            bad = True
            continue
        if not isinstance(d, dict):
            report.add(rel, None, f"expected a JSON object, found {type(d).__name__}; copy the file "
                                  f"from the original checkpoint")
            bad = True
            continue
        if rel == "tokenizer.json":
            for t in d.get("added_tokens") or ():
                if isinstance(t, dict) and isinstance(t.get("id"), int) \
                        and _one_of(t.get("content"), wanted):
                    ids.setdefault(t["content"], t["id"])
            vocab = d["model"].get("vocab") if isinstance(d.get("model"), dict) else None
            if isinstance(vocab, dict):
                for tok in wanted & set(vocab):
                    if isinstance(vocab[tok], int):
                        ids.setdefault(tok, vocab[tok])
            elif isinstance(vocab, list):      # Unigram: [[piece, score], ...], id = position
                for i, piece in enumerate(vocab):
                    if isinstance(piece, list) and piece and _one_of(piece[0], wanted):
                        ids.setdefault(piece[0], i)
        elif rel == "tokenizer_config.json":
            decoder = d.get("added_tokens_decoder")
            for i, t in (decoder.items() if isinstance(decoder, dict) else ()):
                if isinstance(t, dict) and _one_of(t.get("content"), wanted) and str(i).isdigit():
                    ids.setdefault(t["content"], int(i))
        else:
            for tok in wanted & set(d):
                if isinstance(d[tok], int):
                    ids.setdefault(tok, d[tok])
    return None if bad else ids


def _check_tokenizer(model_dir: str, cfg: Qwen3Config | None, report: CheckReport) -> None:
    """The Qwen3 chat and thinking tokens are single tokens with ids inside the vocabulary."""
    ids = tokenizer_ids(model_dir, report)
    if ids is None:
        return
    rel = "tokenizer.json" if os.path.isfile(os.path.join(model_dir, "tokenizer.json")) \
        else "tokenizer_config.json"
    absent = [t for t in QWEN3_TOKENS if t not in ids]
    if absent:
        report.add(rel, None, f"expected {', '.join(QWEN3_TOKENS)} as single tokens (Qwen3's chat "
                              f"and thinking markers), found no {', '.join(absent)} in the vocabulary "
                              f"or added tokens: this is not a Qwen3 tokenizer; use the tokenizer "
                              f"files of the checkpoint (Qwen3's tokenizer.json and "
                              f"tokenizer_config.json)")
    if cfg is not None:
        outside = [f"{t}={ids[t]}" for t in QWEN3_TOKENS if t in ids and not 0 <= ids[t] < cfg.vocab_size]
        if outside:
            report.add(rel, None, f"expected token ids below the model's vocab_size {cfg.vocab_size}, "
                                  f"found {', '.join(outside)}: the tokenizer belongs to another model; "
                                  f"use the tokenizer files of the checkpoint")


# ------------------------------------------------------------------------------------------------
# 6. deep: every float value finite
# ------------------------------------------------------------------------------------------------

def _check_finite(model_dir: str, files: _Files, report: CheckReport) -> None:
    """Read every float tensor (and fp16 models' int64 deq_scale) in row chunks and count
    NaN / Inf; files whose header is broken are skipped (already reported)."""
    by_file: dict[str, list[tuple[str, TensorInfo]]] = {}
    for name, info in files.tensors.items():
        by_file.setdefault(info.file, []).append((name, info))
    bad: list[Problem] = []
    for rel, items in sorted(by_file.items()):
        if rel in files.broken:
            continue
        path = os.path.join(model_dir, rel)
        try:
            with open_safetensors(path) as f:
                for name, info in items:
                    bits = info.dtype == "I64" and name.endswith(".deq_scale")
                    if info.dtype not in READ_DTYPES and not bits:
                        continue
                    nbytes = info.offsets[1] - info.offsets[0]
                    if len(info.shape) < 2 or nbytes <= DEEP_CHUNK_BYTES:
                        chunks = [lambda: f.get_tensor(name)]
                    else:   # bounded memory for large tensors: blocks of rows
                        sl, rows = f.get_slice(name), info.shape[0]
                        step = max(1, DEEP_CHUNK_BYTES // max(1, nbytes // max(rows, 1)))
                        chunks = [lambda r=r: sl[r:r + step] for r in range(0, rows, step)]
                    nan = inf = 0
                    for read in chunks:
                        t = read()
                        report.bytes_read += t.numel() * t.element_size()
                        if bits:   # fp32 bit patterns widened to int64 (msModelSlim, fp16 models)
                            t = t.to(torch.int32).view(torch.float32)
                        a, b = count_non_finite(t)
                        nan, inf = nan + a, inf + b
                    if nan or inf:
                        numel = 1
                        for s in info.shape:
                            numel *= s
                        bad.append(Problem(rel, name, f"expected finite weights, found {nan + inf} "
                                                      f"non-finite value(s) ({nan} NaN, {inf} Inf) of "
                                                      f"{numel}; the file is corrupt or the export "
                                                      f"overflowed: re-download or re-export it"))
        except CheckpointError as exc:
            report.add(rel, None, str(exc))
        except (SafetensorError, OSError) as exc:
            report.add(rel, None, f"expected readable tensor data, found an error reading it "
                                  f"({exc}); {_REDOWNLOAD}")
    _capped(report, bad, "tensors with NaN / Inf values")


# ------------------------------------------------------------------------------------------------

def check_checkpoint(model_dir: str, *, deep: bool = False, tp: int = 1, ep: bool = False) -> CheckReport:
    """Check ``model_dir`` as described in the module docstring and return every problem found.

    Header-only by default (seconds even for the largest models); ``deep=True`` also reads every
    weight for NaN / Inf. ``tp`` / ``ep``: the parallel layout to check the config against.
    Never raises for a bad checkpoint; ``report.raise_for_problems()`` turns problems into a
    CheckpointError.
    """
    t0 = time.perf_counter()
    report = CheckReport(model_dir=model_dir, deep=deep)
    if not os.path.isdir(model_dir):
        report.add("", None, f"expected a checkpoint directory, found no directory {model_dir!r}; "
                             f"pass the directory holding config.json and the safetensors files")
        report.seconds = time.perf_counter() - t0
        return report
    cfg = _check_config(model_dir, report)
    if cfg is not None:
        try:
            check_parallel(cfg, tp, ep)
        except ShardingError as exc:
            report.add("config.json", None, str(exc))
    files = _check_files(model_dir, report)
    if cfg is not None and files is not None:
        quant, usable, reported = _check_description(model_dir, cfg, files, report)
        if usable:
            _check_tensors(cfg, quant, files, reported, report)
    _check_tokenizer(model_dir, cfg, report)
    if deep and files is not None:
        _check_finite(model_dir, files, report)
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["CheckFailed", "CheckReport", "Problem", "SKIP_ADVICE", "TensorInfo", "check_checkpoint",
           "read_header", "tokenizer_ids"]
