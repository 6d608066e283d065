"""Qwen3-Embedding served by the project's class: ``--runner pooling`` through /v1/embeddings.

A tiny Qwen3-Embedding-shaped checkpoint (``tests/checkpoints.py`` make_embedding_checkpoint: a
bare ``Qwen3Model`` export, tensor names without ``model.``, no ``lm_head``, tied like
Qwen3-Embedding-0.6B, with the Sentence-Transformers ``modules.json`` / ``1_Pooling`` files that
give vLLM its pooler defaults: last token, normalised) is served twice, in fp32, at the same
time: by the project's class (``ascend-qwen3``'s launcher, ``runner="pooling"``: vLLM wraps the
class with ``as_embedding_model``) and by vLLM's built-in ``Qwen3ForCausalLM``. The two must
agree on every input of a batch of different lengths (cosine > 0.9999), and both must match an
independent truth: Hugging Face ``transformers``' Qwen3 on the same weights, last token,
L2-normalised (Qwen3-Embedding's published recipe).

No pooler settings are passed: what is checked is what a user gets from the checkpoint's own
files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from tests.checkpoints import CORPUS, make_embedding_checkpoint
from tests.vllm_support import ROOT, ops_seen, require_vllm

pytestmark = pytest.mark.vllm

NAME = "qwen3-embedding-tiny"
MAX_MODEL_LEN = 512
INPUTS = ["Hi", CORPUS[0], CORPUS[1] + " " + CORPUS[4], CORPUS[3], CORPUS[2] * 3]


def _free_port() -> int:
    from tests.test_vllm_server import _free_port as free
    return free()


def _wait(proc, url: str, log_path, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the embedding server did not come up (exit {proc.poll()}); log:\n"
                                 + open(log_path).read()[-5000:])
        time.sleep(1)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers, started together: the project's class (through the launcher) and vLLM's
    built-in class (vLLM's own server module, no plugin override)."""
    require_vllm()
    from ascend_qwen3.deploy.launcher import ServeSpec, build_command

    work = tmp_path_factory.mktemp("embeddings")
    ckpt = make_embedding_checkpoint(str(work / "ckpt"))
    base = dict(os.environ, PYTHONPATH=ROOT, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    base.pop("VLLM_API_KEY", None)
    base.pop("ASCEND_QWEN3_TAKE_OVER", None)
    ports = {"ours": _free_port(), "builtin": _free_port()}
    # one core each (vLLM's CPU worker binds its OpenMP threads to core 0 by default: two
    # servers started together would share it)
    cores = os.cpu_count() or 1
    bind = {name: str(i % cores) for i, name in enumerate(ports)}
    argv, env = build_command(ServeSpec(model=ckpt, served_model_name=NAME, port=ports["ours"],
                                        dtype="float32", runner="pooling",
                                        max_model_len=MAX_MODEL_LEN,
                                        extra_args=["--enforce-eager"]),
                              base_env=dict(base, ASCEND_QWEN3_OPS_LOG=str(work / "ops"),
                                            VLLM_CPU_OMP_THREADS_BIND=bind["ours"]))
    commands = {"ours": (argv, env),
                "builtin": ([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                             "--model", ckpt, "--served-model-name", NAME, "--host", "127.0.0.1",
                             "--port", str(ports["builtin"]), "--dtype", "float32",
                             "--runner", "pooling", "--max-model-len", str(MAX_MODEL_LEN),
                             "--enforce-eager"], dict(base, VLLM_CPU_OMP_THREADS_BIND=bind["builtin"]))}
    t0 = time.time()
    running = {}
    for name, (cmd, e) in commands.items():
        log = open(work / f"{name}.log", "w")
        running[name] = (subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True), log)
    try:
        for name, (proc, log) in running.items():
            _wait(proc, f"http://127.0.0.1:{ports[name]}", work / f"{name}.log", t0 + 900)
        print(f"\nembedding servers up in {time.time() - t0:.1f} s (both, started together)")
        yield {"ckpt": ckpt, "work": work, "argv": argv,
               "url": {n: f"http://127.0.0.1:{p}" for n, p in ports.items()},
               "log": {n: work / f"{n}.log" for n in ports}}
    finally:
        for proc, log in running.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
            log.close()


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def embed(servers, which: str, inputs) -> tuple[torch.Tensor, dict]:
    status, out = post(servers["url"][which], "/v1/embeddings", {"model": NAME, "input": inputs})
    assert status == 200, out
    data = sorted(out["data"], key=lambda d: d["index"])
    assert len(data) == (1 if isinstance(inputs, str) else len(inputs)), out
    return torch.tensor([d["embedding"] for d in data], dtype=torch.float64), out["usage"]


@torch.no_grad()
def reference(ckpt: str, inputs) -> tuple[torch.Tensor, list[int]]:
    """transformers' Qwen3 on the same weights, fp32: the last token's final hidden state,
    L2-normalised (Qwen3-Embedding's model card: last_token_pool, F.normalize)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModel.from_pretrained(ckpt, dtype=torch.float32).eval()
    rows, lengths = [], []
    for text in inputs:
        ids = tok(text, return_tensors="pt").input_ids
        lengths.append(ids.shape[1])
        rows.append(model(input_ids=ids).last_hidden_state[0, -1].double())
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1), lengths


def test_the_two_classes_agree_through_v1_embeddings(servers):
    """The same batch of different lengths through /v1/embeddings: the project's class and
    vLLM's built-in one agree (cosine > 0.9999 in fp32), and both match transformers."""
    ours, usage = embed(servers, "ours", INPUTS)
    builtin, usage_builtin = embed(servers, "builtin", INPUTS)
    truth, lengths = reference(servers["ckpt"], INPUTS)
    assert len(set(lengths)) >= 4, lengths                 # really different lengths
    assert usage["prompt_tokens"] == usage_builtin["prompt_tokens"] == sum(lengths)
    assert ours.shape == builtin.shape == truth.shape == (len(INPUTS), 96)
    # the checkpoint's pooling files: normalised embeddings (last token: the reference)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(INPUTS), dtype=torch.float64), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity
    between, to_truth = cos(ours, builtin, dim=-1), cos(ours, truth, dim=-1)
    print(f"\n1 - cosine, largest over {len(INPUTS)} inputs: ours/built-in "
          f"{(1 - between).max():.2e}, ours/transformers {(1 - to_truth).max():.2e}, "
          f"built-in/transformers {(1 - cos(builtin, truth, dim=-1)).max():.2e}")
    assert between.min() > 0.9999, between
    assert to_truth.min() > 0.9999, to_truth
    # different inputs give different embeddings (a constant output would pass the above)
    off = ours @ ours.T - torch.eye(len(INPUTS), dtype=torch.float64)
    assert off.abs().max() < 0.99, off


def test_single_requests_match_the_batch(servers):
    """Each input alone gives what it gave in the batch (no cross-talk between sequences)."""
    batch, _ = embed(servers, "ours", INPUTS)
    for i in (0, 2, 4):
        alone, _ = embed(servers, "ours", INPUTS[i])
        assert torch.nn.functional.cosine_similarity(alone[0], batch[i], dim=0) > 0.99999


def test_served_by_the_project_graph_without_a_head(servers):
    """The project's server ran the project's graph (the op log), wrapped by vLLM as an
    embedding model, read the bare checkpoint itself (no head), and the launcher left out what
    only generation uses."""
    ran = set().union(*ops_seen(str(servers["work"] / "ops")).values())
    assert {"paged_attention", "write_kv_cache", "qkv_norm_rope", "swiglu"} <= ran
    log = servers["log"]["ours"].read_text()
    assert "ascend-qwen3 AscendQwen3ForEmbedding" in log, log[-3000:]
    assert ("runner pooling: the graph has no output head; checkpoint tensors named without "
            "the model. prefix") in log
    assert "ascend-qwen3" not in servers["log"]["builtin"].read_text()
    argv = servers["argv"]
    assert argv[argv.index("--runner") + 1] == "pooling"
    for flag in ("--reasoning-parser", "--logits-processors", "--tool-call-parser",
                 "--override-generation-config", "--middleware"):
        assert flag not in argv, flag


def test_chat_is_refused_by_an_embedding_server(servers):
    """An embedding server generates nothing: vLLM registers no chat route for it."""
    status, out = post(servers["url"]["ours"], "/v1/chat/completions",
                       {"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404, out
    again, _ = embed(servers, "ours", ["still serving"])
    assert again.shape == (1, 96)
