"""All eight published Qwen3 models build on the meta device with the published sizes."""

import pytest
import torch

from ascend_qwen3.config import FAMILY, family_config
from ascend_qwen3.model import Qwen3Graph
from ascend_qwen3.parallel.plan import parameter_counts


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_builds_on_meta_with_published_size(name):
    cfg = family_config(name)
    model = Qwen3Graph(cfg, device="meta")
    built = sum(p.numel() for p in model.parameters())
    total, active = parameter_counts(cfg)
    assert built == total  # the model and the sharding plan count the same parameters
    published_total, published_active = FAMILY[name][1], FAMILY[name][2]
    assert abs(total - published_total) / published_total < 0.02, (name, total / 1e9)
    if published_active is None:
        assert active == total
    else:
        assert abs(active - published_active) / published_active < 0.02, (name, active / 1e9)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name", ["Qwen3-0.6B", "Qwen3-30B-A3B"])
def test_family_shapes(name):
    cfg = family_config(name)
    model = Qwen3Graph(cfg, device="meta")
    attn = model.layers[0].self_attn
    assert attn.qkv_proj.weight.shape == ((cfg.num_heads + 2 * cfg.num_kv_heads) * 128, cfg.hidden_size)
    assert model.rope_table.shape == (2, cfg.max_position_embeddings, 128)
    if cfg.is_moe:
        assert model.layers[0].mlp.experts.w13.shape == (128, cfg.hidden_size, 2 * cfg.moe_intermediate_size)
    assert ("lm_head.weight" in dict(model.named_parameters())) == (not cfg.tie_word_embeddings)


def test_family_yarn():
    cfg = family_config("Qwen3-32B", yarn=True)
    assert cfg.rope_scaling["factor"] == 4.0 and cfg.max_position_embeddings == 131072
    with pytest.raises(ValueError, match="no published YaRN"):
        family_config("Qwen3-0.6B", yarn=True)
    with pytest.raises(ValueError, match="unknown Qwen3 model"):
        family_config("Qwen3-7B")
    assert family_config("Qwen3-8B", dtype="fp32").dtype == torch.float32
