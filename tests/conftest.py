import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests.checkpoints import SPECS, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name, dtype=..., **overrides) -> directory, cached per session."""
    import torch

    made = {}

    def get(name: str, dtype=torch.float32, **kw):
        key = (name, str(dtype), tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(name)
            made[key] = make_checkpoint(name, str(d), dtype=dtype, **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def qwen3_tokenizer(tmp_path_factory):
    """The real Qwen3 tokenizer with the project's chat template (what the default model ships)."""
    from transformers import AutoTokenizer

    from ascend_qwen3.serve.tokenizer import write_qwen3_tokenizer
    d = tmp_path_factory.mktemp("qwen3-tokenizer")
    write_qwen3_tokenizer(str(d))
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(params=sorted(SPECS))
def spec_name(request):
    return request.param


@pytest.fixture(scope="session")
def quantized(checkpoint, tmp_path_factory):
    """quantized(name, scheme, smooth=None, dtype=..., **overrides) -> W8A8 checkpoint directory,
    made with the project's quantizer from checkpoint(name, ...) plus a small tokenizer."""
    import torch

    from ascend_qwen3.quantizer import quantize_checkpoint
    from tests.checkpoints import add_tokenizer

    made = {}

    def get(name: str, scheme: str, smooth=None, dtype=torch.float32, **kw):
        key = (name, scheme, smooth, str(dtype), tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in made:
            src = checkpoint(name, dtype=dtype, **kw)
            if not os.path.isfile(os.path.join(src, "tokenizer.json")):
                add_tokenizer(src, kw.get("vocab_size", SPECS[name]["vocab_size"]))
            out = str(tmp_path_factory.mktemp(f"{name}-{scheme}") / "q")
            quantize_checkpoint(src, out, scheme, smooth=smooth, progress=False)
            made[key] = out
        return made[key]

    return get
