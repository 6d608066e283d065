"""Qwen3-Embedding without an engine: the bare checkpoint naming, the head-less graph and plan,
the embedding profiles and launcher command, the generation server's guard, and how vLLM's
embedding adapter wraps the project's class (the engine itself: test_embeddings_engine.py)."""

from __future__ import annotations

import asyncio
import json
import types

import pytest
import torch

from ascend_qwen3.config import EMBEDDING_FAMILY, Qwen3Config, family_config
from ascend_qwen3.loader import CheckpointError, checkpoint_files, checkpoint_prefix, load_plan, load_weights
from ascend_qwen3.model import Qwen3Graph
from tests.checkpoints import make_embedding_checkpoint


@pytest.fixture(scope="module")
def embedding_ckpt(tmp_path_factory):
    """Bare, untied (like Qwen3-Embedding-8B): no lm_head anywhere."""
    return make_embedding_checkpoint(str(tmp_path_factory.mktemp("emb") / "untied"), "dense_yarn")


def test_naming_is_read_from_the_tensor_names():
    assert checkpoint_prefix({"model.embed_tokens.weight": 0, "lm_head.weight": 0}) == "model."
    assert checkpoint_prefix({"embed_tokens.weight": 0, "layers.0.mlp.up_proj.weight": 0}) == ""
    with pytest.raises(CheckpointError, match="found neither .*first names: foo.weight"):
        checkpoint_prefix({"foo.weight": 0}, "/ckpt")
    with pytest.raises(CheckpointError, match="both 'model.'-prefixed and bare"):
        checkpoint_prefix({"model.embed_tokens.weight": 0, "embed_tokens.weight": 0})


def test_head_less_plan_of_a_bare_checkpoint():
    cfg = family_config("Qwen3-Embedding-8B")            # untied
    full = load_plan(cfg)
    bare = load_plan(cfg, prefix="", head=False)
    assert "lm_head.weight" in {a.name for a in full}
    assert {a.name for a in bare} == {a.name[len("model."):] for a in full if a.name != "lm_head.weight"}
    assert [a.param for a in bare] == [a.param for a in full if a.name != "lm_head.weight"]


@torch.no_grad()
def test_bare_untied_checkpoint_loads_without_a_head_and_matches_transformers(embedding_ckpt):
    from transformers import AutoModel

    cfg = Qwen3Config.from_model_dir(embedding_ckpt)
    assert not cfg.tie_word_embeddings
    graph = Qwen3Graph(cfg, head=False)
    assert graph.lm_head is None and not [n for n, _ in graph.named_parameters() if "lm_head" in n]
    stats = load_weights(graph, embedding_ckpt, cfg)
    assert stats["tensors"] == 2 + 11 * cfg.num_layers
    graph.finalize_weights()
    from ascend_qwen3.runner.kv_cache import PagedKVCache

    ids = torch.tensor([5, 17, 42, 99, 3, 250, 7])
    cache = PagedKVCache.for_tokens(cfg, len(ids), block_size=16)
    positions, meta = cache.prepare([(0, len(ids))])
    ours = graph(ids, positions, meta, cache.caches)
    ref = AutoModel.from_pretrained(embedding_ckpt, dtype=torch.float32).eval()
    truth = ref(input_ids=ids[None]).last_hidden_state[0]
    assert torch.allclose(ours, truth, atol=2e-5, rtol=1e-4), (ours - truth).abs().max()
    with pytest.raises(RuntimeError, match="without an output head"):
        graph.compute_logits(ours)


def test_generation_on_a_head_less_checkpoint_says_use_pooling(embedding_ckpt):
    cfg = Qwen3Config.from_model_dir(embedding_ckpt)
    with pytest.raises(CheckpointError, match="lm_head.weight; a checkpoint without an output "
                                              "head .* --runner pooling"):
        load_weights(Qwen3Graph(cfg), embedding_ckpt, cfg)


def test_checkpoint_check_accepts_the_bare_export(embedding_ckpt):
    from ascend_qwen3.check import check_checkpoint

    report = check_checkpoint(embedding_ckpt)
    report.raise_for_problems("")
    assert set(checkpoint_files(embedding_ckpt)) and checkpoint_prefix(checkpoint_files(embedding_ckpt)) == ""


@pytest.mark.parametrize("name,nominal", [(n, v[1]) for n, v in EMBEDDING_FAMILY.items()])
def test_embedding_family_sizes_without_a_head(name, nominal):
    """The head-less count (what the published safetensors hold) is within the rounding of the
    model card's nominal size; 8B's nominal counts a head its checkpoint does not ship."""
    cfg = family_config(name)
    built = sum(p.numel() for p in Qwen3Graph(cfg, device="meta", head=False).parameters())
    assert abs(built - nominal) / nominal < (0.06 if name.endswith("8B") else 0.01), built
    base = family_config(name.replace("-Embedding", ""))
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) \
        == (base.hidden_size, base.num_layers, base.num_heads, base.num_kv_heads, base.intermediate_size)
    with pytest.raises(ValueError, match="no published YaRN"):
        family_config(name, yarn=True)


def test_embedding_profiles_plan_no_head_and_refuse_generation_keys():
    from ascend_qwen3.deploy.planner import plan
    from ascend_qwen3.deploy.profiles import ProfileError, load_profile, plan_of, validate

    p = load_profile("qwen3-embedding-8b-bf16")
    cfg = family_config("Qwen3-Embedding-8B")
    with_head = plan(cfg, hw="atlas-800i-a2-64g", precision="bf16", tp=1)
    assert with_head.weights_gib - plan_of(p).weights_gib == pytest.approx(
        cfg.vocab_size * cfg.hidden_size * 2 / 2**30)
    with pytest.raises(ProfileError, match="remove thinking, sampling"):
        validate(dict(p, thinking=True, sampling={}), "x")
    with pytest.raises(ProfileError, match="embedding model .* set runner: pooling"):
        validate({k: v for k, v in load_profile("qwen3-8b-bf16").items()} | {"model": "Qwen3-Embedding-8B"}, "x")
    with pytest.raises(ProfileError, match="is a generative model"):
        validate(dict(p, model="Qwen3-8B"), "x")


def test_launcher_pooling_command(tmp_path, embedding_ckpt):
    from ascend_qwen3.deploy.launcher import LaunchError, ServeSpec, build_command
    from ascend_qwen3.speculative import Speculative

    argv, _ = build_command(ServeSpec(model=embedding_ckpt, runner="pooling"), base_env={})
    assert argv[argv.index("--runner") + 1] == "pooling"
    assert json.loads(argv[argv.index("--hf-overrides") + 1]) == {"architectures": ["AscendQwen3ForCausalLM"]}
    for flag in ("--reasoning-parser", "--tool-call-parser", "--logits-processors",
                 "--override-generation-config", "--middleware"):
        assert flag not in argv
    generate, _ = build_command(ServeSpec(model=embedding_ckpt), base_env={})
    assert "--runner" not in generate
    assert generate[generate.index("--middleware") + 1] == \
        "ascend_qwen3.vllm_plugin.task_guard.RefusePoolingRequests"
    for bad, match in ((dict(extra_args=["--logits-processors", "a:B"]), "do not apply"),
                       (dict(speculative=Speculative("ngram", 3)), "generates none"),
                       (dict(extra_args=["--convert", "classify"]), "set by the launcher")):
        with pytest.raises(LaunchError, match=match):
            build_command(ServeSpec(model=embedding_ckpt, runner="pooling", **bad), base_env={})
    with pytest.raises(LaunchError, match="MoE model"):
        build_command(ServeSpec(model="/x", runner="pooling", config=family_config("Qwen3-30B-A3B")),
                      base_env={})


def _asgi(app, method: str, path: str, body: bytes = b"{}"):
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path}, receive, send))
    return sent


def test_generation_server_guard_answers_pooling_paths_only():
    from ascend_qwen3.vllm_plugin.task_guard import RefusePoolingRequests

    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    guard = RefusePoolingRequests(app)
    start, body = _asgi(guard, "POST", "/v1/embeddings/")
    assert start["status"] == 400 and not reached
    error = json.loads(body["body"])["error"]
    assert "/v1/embeddings" in error["message"] and "--runner pooling" in error["message"]
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/embeddings"),
                         ("POST", "/v1/completions")):
        assert _asgi(guard, method, path)[0]["status"] == 200
    assert reached == ["/v1/chat/completions", "/v1/embeddings", "/v1/completions"]


def test_runner_read_from_the_engine_config():
    from ascend_qwen3.vllm_plugin import compat
    from ascend_qwen3.vllm_plugin.model import check_pooling

    def cfg(**mc):
        return types.SimpleNamespace(model_config=types.SimpleNamespace(**mc))

    assert compat.runner_type(cfg(runner_type="pooling", runner="pooling")) == "pooling"
    assert compat.runner_type(cfg(runner="auto")) == "generate"
    assert check_pooling(cfg(runner_type="pooling", convert_type="embed"))
    assert not check_pooling(cfg(runner_type="generate", convert_type="none"))
    with pytest.raises(ValueError, match="--convert classify is not served"):
        check_pooling(cfg(runner_type="pooling", convert_type="classify"))


def test_vllm_embedding_adapter_keeps_the_project_loader():
    """vLLM's as_embedding_model subclasses the class; the subclass loads with the project's
    load_weights (which never reads vLLM's iterator), not the adapter's prefix probe (which
    would read and clone every tensor of the checkpoint)."""
    pytest.importorskip("vllm")
    from vllm.model_executor.models.adapters import as_embedding_model
    from vllm.model_executor.models.interfaces_base import is_pooling_model

    from ascend_qwen3.vllm_plugin.model import AscendQwen3ForCausalLM

    cls = as_embedding_model(AscendQwen3ForCausalLM)
    assert cls.__name__ == "AscendQwen3ForEmbedding" and is_pooling_model(cls)
    assert cls.load_weights is AscendQwen3ForCausalLM.load_weights
    assert not is_pooling_model(AscendQwen3ForCausalLM)
    assert AscendQwen3ForCausalLM.load_weights.__qualname__ == "AscendQwen3ForCausalLM.load_weights"
