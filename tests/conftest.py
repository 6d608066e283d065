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


@pytest.fixture(params=sorted(SPECS))
def spec_name(request):
    return request.param
