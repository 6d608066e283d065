"""Speculative decoding without an engine: the settings and their checks against the target
(``ascend_qwen3/speculative.py``), the serve command and profiles that carry them, the thinking
budget applied through the draft (``vllm_plugin/budget.py``) driven as vLLM's samplers drive it,
and the guard that refuses budgets where the platform cannot apply them
(``vllm_plugin/budget_guard.py``). The engines and the live server: test_speculative_engine.py
and test_vllm_server.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random

import pytest
import torch

from ascend_qwen3.config import Qwen3Config
from ascend_qwen3.speculative import (Speculative, SpeculativeError, check_draft, draft_problems,
                                      read_draft_config)
from ascend_qwen3.thinking import BudgetState, ThinkingTokens

TARGET = Qwen3Config.from_dict({
    "architectures": ["Qwen3ForCausalLM"], "vocab_size": 1000, "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "max_position_embeddings": 4096, "tie_word_embeddings": True})
EAGLE3 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "target_hidden_size": 256,
          "vocab_size": 1000, "draft_vocab_size": 300,
          "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}}


# --- the settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("d,match", [
    ({"method": "medusa", "num_speculative_tokens": 3}, "not one the project serves"),
    ({"method": "eagle3", "num_speculative_tokens": 0}, "positive integer"),
    ({"method": "eagle3", "num_speculative_tokens": True}, "positive integer"),
    ({"method": "eagle3", "num_speculative_tokens": 3}, "needs the draft's directory"),
    ({"method": "ngram", "num_speculative_tokens": 3, "model": "/d"}, "takes no model"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 5}, "exceeds"),
    ({"method": "eagle3", "num_speculative_tokens": 3, "model": "/d", "prompt_lookup_max": 2},
     "ngram only"),
    ({"method": "ngram", "num_speculative_tokens": 3, "tokens": 2}, "unknown key"),
    ("eagle3", "must be a mapping")])
def test_bad_settings_are_refused_by_name(d, match):
    with pytest.raises(SpeculativeError, match=match):
        Speculative.from_dict(d)


def test_settings_become_vllms_config():
    s = Speculative.from_dict({"method": "ngram", "num_speculative_tokens": 4})
    assert s.to_vllm() == {"method": "ngram", "num_speculative_tokens": 4,
                           "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    e = Speculative.from_dict({"method": "eagle3", "num_speculative_tokens": 3, "model": "/d"})
    assert e.to_vllm() == {"method": "eagle3", "num_speculative_tokens": 3, "model": "/d"}


def test_the_npu_takes_at_most_14_speculative_tokens():
    ok = Speculative("ngram", 14)
    check_draft(TARGET, ok, "npu")
    with pytest.raises(SpeculativeError, match="at most 16 query tokens.*use at most 14"):
        check_draft(TARGET, Speculative("ngram", 15), "npu")
    check_draft(TARGET, Speculative("ngram", 15), "cpu")


@pytest.mark.parametrize("change,match", [
    ({"target_hidden_size": 512}, "hidden states of size 512.*target's hidden size is 256"),
    ({"vocab_size": 32000}, "vocab_size is 32000 but the target's is 1000"),
    ({"draft_vocab_size": 5000}, "draft_vocab_size 5000 must be between 1 and the target's"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 9]}},
     r"after layer\(s\) \[1, 2, 9\].*has 4 layers \(ids 0..4\)"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [2, 2, 3]}}, "with repeats"),
    # no ids: vLLM's default for 4 layers is (2, 2, 1), which reads only two distinct layers
    ({"eagle_config": {}}, r"none in its config.json: vLLM's default for 4 layers.*repeats")])
def test_an_eagle3_draft_that_does_not_fit_is_named(change, match):
    with pytest.raises(SpeculativeError, match=match):
        check_draft(TARGET, Speculative("eagle3", 3, "/d"), draft=dict(EAGLE3, **change))


def test_top_level_layer_ids_are_read_first():
    draft = dict(EAGLE3, eagle_aux_hidden_state_layer_ids=[0, 2, 4], eagle_config={})
    assert draft_problems(TARGET, "eagle3", draft) == []


def test_the_npu_needs_a_llama_architecture_eagle3_draft():
    qwen = dict(EAGLE3, architectures=["Qwen3ForCausalLM"])
    assert draft_problems(TARGET, "eagle3", qwen, "cpu") == []
    (problem,) = draft_problems(TARGET, "eagle3", qwen, "npu")
    assert "vLLM 0.23" in problem and "LlamaForCausalLM" in problem


def test_a_speculators_format_draft_is_read_as_vllm_reads_it():
    """RedHatAI's *-speculator.eagle3 drafts: the layer config nested, the EAGLE-3 fields on top;
    vLLM 0.23 loads them as its Llama EAGLE-3 class, so the NPU takes them."""
    spec = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
            "draft_vocab_size": 300, "target_hidden_size": 256,
            "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
            "transformer_layer_config": {"hidden_size": 256, "vocab_size": 1000,
                                         "model_type": "llama"}}
    assert draft_problems(TARGET, "eagle3", spec, "npu") == []
    wide = dict(spec, transformer_layer_config={"hidden_size": 512, "vocab_size": 1000},
                target_hidden_size=512)
    (problem,) = draft_problems(TARGET, "eagle3", wide)
    assert "hidden states of size 512" in problem


def test_a_draft_model_needs_the_targets_vocabulary():
    small = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 999, "hidden_size": 128,
             "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
             "max_position_embeddings": 4096, "tie_word_embeddings": True}
    (problem,) = draft_problems(TARGET, "draft_model", small)
    assert "vocab_size is 999 but the target's is 1000" in problem
    assert draft_problems(TARGET, "draft_model", dict(small, vocab_size=1000)) == []
    (problem,) = draft_problems(TARGET, "draft_model", {"architectures": ["LlamaForCausalLM"]})
    assert "not a Qwen3 checkpoint" in problem


def test_a_missing_draft_directory_is_named(tmp_path):
    with pytest.raises(SpeculativeError, match="does not exist"):
        read_draft_config(str(tmp_path / "nowhere"))
    with pytest.raises(SpeculativeError, match="no readable config.json"):
        read_draft_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(SpeculativeError, match="not valid JSON"):
        read_draft_config(str(tmp_path))


# --- the serve command and the profiles ------------------------------------------------------------

def _flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    from ascend_qwen3.serve.default_model import build_default_model
    from ascend_qwen3.serve.train_tiny import PACKAGED
    return build_default_model(str(tmp_path_factory.mktemp("home") / "default-model"),
                               source=PACKAGED, log=lambda m: None)


@pytest.fixture(scope="module")
def draft_dir(default_model, tmp_path_factory):
    """A (random) EAGLE-3 draft shaped for the embedded default model."""
    from ascend_qwen3.serve import eagle3_draft

    with open(os.path.join(default_model, "config.json")) as f:
        target = json.load(f)
    cfg = eagle3_draft.draft_config(target, draft_vocab=64, layer_ids=[1, 2, 3])
    path = str(tmp_path_factory.mktemp("draft") / "eagle3")
    return eagle3_draft.save(eagle3_draft.init_draft(cfg), path, vocab_ids=range(64))


def test_serve_command_with_speculation(default_model, draft_dir):
    from ascend_qwen3.deploy.launcher import ServeSpec, build_command

    spec = ServeSpec(model=default_model, speculative=Speculative("eagle3", 3, draft_dir))
    argv, env = build_command(spec, base_env={})
    assert json.loads(_flag(argv, "--speculative-config")) == {
        "method": "eagle3", "num_speculative_tokens": 3, "model": draft_dir}
    # no logits processors (vLLM refuses them with speculation); the reasoning parser stays,
    # which turns the project's budget on through the draft; no guard on the CPU
    from ascend_qwen3.vllm_plugin.budget_guard import MIDDLEWARE
    assert "--logits-processors" not in argv and MIDDLEWARE not in argv
    assert _flag(argv, "--reasoning-parser") == "ascend_qwen3"
    assert "ASCEND_QWEN3_TAKE_OVER" not in env


def test_serve_command_with_a_draft_model_serves_it_with_the_projects_class(default_model):
    from ascend_qwen3.deploy.launcher import ServeSpec, build_command

    spec = ServeSpec(model=default_model, speculative=Speculative("draft_model", 2, default_model))
    argv, env = build_command(spec, base_env={})
    assert json.loads(_flag(argv, "--speculative-config"))["method"] == "draft_model"
    assert env["ASCEND_QWEN3_TAKE_OVER"] == "1"


def test_serve_command_refuses_a_draft_that_does_not_fit(default_model, checkpoint, draft_dir):
    from ascend_qwen3.deploy.launcher import LaunchError, ServeSpec, build_command

    other = checkpoint("dense_tied")               # another vocabulary and width
    with pytest.raises(LaunchError, match="does not fit the target.*hidden states of size 256"):
        build_command(ServeSpec(model=other, speculative=Speculative("eagle3", 3, draft_dir)),
                      base_env={})
    with pytest.raises(LaunchError, match="given twice"):
        build_command(ServeSpec(model=default_model, speculative=Speculative("ngram", 3),
                                extra_args=["--speculative-config", "{}"]), base_env={})


def test_a_missing_draft_stops_the_launch_not_the_dry_run(default_model, tmp_path):
    from ascend_qwen3.deploy.launcher import LaunchError, ServeSpec, launch

    missing = str(tmp_path / "no-draft")
    spec = ServeSpec(model=default_model, config=Qwen3Config.from_model_dir(default_model),
                     speculative=Speculative("eagle3", 3, missing))
    assert launch(spec, dry_run=True, out=open(os.devnull, "w")) == 0
    with pytest.raises(LaunchError, match="draft directory .* does not exist"):
        launch(spec, out=open(os.devnull, "w"))


def test_npu_profile_with_speculation(tmp_path):
    """An NPU server with speculation gets the guard that refuses budgeted requests (vllm-ascend
    cannot apply a budget to drafted tokens) and keeps the reasoning parser."""
    from ascend_qwen3.deploy.launcher import build_command
    from ascend_qwen3.deploy.profiles import load_profile, to_spec
    from ascend_qwen3.vllm_plugin.budget_guard import MIDDLEWARE

    p = load_profile("qwen3-8b-bf16")
    p["speculative"] = {"method": "eagle3", "model": "/models/qwen3-8b-eagle3",
                        "num_speculative_tokens": 3}
    path = tmp_path / "qwen3-8b-spec.yaml"
    import yaml
    path.write_text(yaml.safe_dump(dict(p, name="qwen3-8b-spec")))
    argv, env = build_command(to_spec(load_profile(str(path))), base_env={})
    assert json.loads(_flag(argv, "--speculative-config"))["model"] == "/models/qwen3-8b-eagle3"
    assert _flag(argv, "--middleware") == MIDDLEWARE
    assert "--logits-processors" not in argv and _flag(argv, "--reasoning-parser") == "ascend_qwen3"


@pytest.mark.parametrize("speculative,match", [
    ({"method": "eagle3", "model": "/m", "num_speculative_tokens": 15}, "use at most 14"),
    ({"method": "eagle3", "model": "m/d", "num_speculative_tokens": 3}, "absolute path"),
    ({"method": "eagle9", "num_speculative_tokens": 3}, "not one the project serves"),
    ({"method": "ngram"}, "positive integer")])
def test_profile_speculative_key_is_validated(tmp_path, speculative, match):
    import yaml

    from ascend_qwen3.deploy.profiles import ProfileError, load_profile

    p = load_profile("qwen3-8b-bf16")
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(dict(p, name="x", speculative=speculative)))
    with pytest.raises(ProfileError, match=match):
        load_profile(str(path))


# --- the budget through the draft, as vLLM's samplers apply it --------------------------------------

# small fake ids: <think> 1, </think> 2, <tool_call> 3; the forced text 7 8 2 9; anything else >= 10
TOK = ThinkingTokens(think_start=1, think_end=2, tool_call_start=3, forced_end=(7, 8, 2, 9))
OPEN = [10, 11, 1, 12]
CLOSED = [10, 1, 12, 2, 13]
VOCAB = 60


class Params:
    def __init__(self, thinking_token_budget=None, extra_args=None):
        self.thinking_token_budget, self.extra_args = thinking_token_budget, extra_args


def _holder():
    pytest.importorskip("vllm")
    from vllm.v1.sample.thinking_budget_state import ThinkingBudgetStateHolder

    from ascend_qwen3.vllm_plugin.budget import _speculative_holder
    cls = _speculative_holder(ThinkingBudgetStateHolder, "ascend_qwen3")
    h = cls.__new__(cls)
    h.ours, h.rows, h._warned, h.tokens = True, {}, False, TOK
    return h


def _add(holder, rows):
    from vllm.v1.sample.logits_processor import BatchUpdate
    holder.sync_batch(BatchUpdate(batch_size=len(rows), removed=[], moved=[],
                                  added=[(i, Params(b), prompt, out) for i, (b, prompt, out) in rows.items()]))


def _chosen(row: torch.Tensor, free: int) -> int:
    """The sampled token of a row: the forced one (one finite logit) or the model's own."""
    finite = torch.isfinite(row).nonzero().flatten()
    return int(finite[0]) if len(finite) == 1 else free


def _script(seed: int, n: int = 80) -> list[int]:
    """What the model would say at each output position (natural </think> and tool calls now
    and then)."""
    rng = random.Random(seed)
    return [rng.choice([2, 3] + list(range(20, 40)) * 6) for _ in range(n)]


def _plain(budget, prompt, script, steps):
    s, out = BudgetState(TOK, budget, prompt), []
    while len(out) < steps:
        forced = s.forced_token()
        token = forced if forced is not None else script[len(out)]
        out.append(token)
        s.feed(token)
    return out


def _speculative(budget, prompt, script, steps, k, rng):
    """Greedy verification as vLLM's rejection sampler does it: draft j is accepted while it is
    the row's choice; the first row that disagrees gives its own token; all accepted: the bonus.
    The drafts are right, forced text, or wrong, at random."""
    holder, out = _holder(), []
    _add(holder, {0: (budget, prompt, out)})
    truth = _plain(budget, prompt, script, steps + k + 1)
    while len(out) < steps:
        drafts = [truth[len(out) + j] if rng.random() < 0.7 else rng.choice([7, 8, 2, 9, 3, 25])
                  for j in range(rng.randint(0, k))]
        target = holder.apply_to_logits(torch.zeros(len(drafts), VOCAB), False, [drafts])
        bonus = holder.apply_to_logits(torch.zeros(1, VOCAB), True, [drafts])
        for j, d in enumerate(drafts):
            choice = _chosen(target[j], script[len(out)])
            out.append(choice)
            if choice != d:
                break
        else:
            out.append(_chosen(bonus[0], script[len(out)]))
    return out[:steps]


@pytest.mark.parametrize("prompt", [OPEN, CLOSED], ids=["thinking", "closed"])
@pytest.mark.parametrize("budget", [0, 1, 2, 5, 9])
def test_speculation_gives_the_tokens_of_plain_decoding(budget, prompt):
    """Whatever the drafter proposes, the budget forced through the draft gives the tokens the
    project's budget gives without speculation: exactly N thinking tokens then the transition,
    a natural </think> or a tool call ending thinking, a closed think block left alone."""
    for seed in range(25):
        script = _script(seed)
        want = _plain(budget, prompt, script, 40)
        got = _speculative(budget, prompt, script, 40, k=3, rng=random.Random(seed))
        assert got == want, (seed, got, want)


def test_rows_of_several_requests_are_laid_out_as_vllm_orders_them():
    """Drafted rows come request after request (batch order, each its drafts); bonus rows one
    per request; rows of requests without a budget are untouched."""
    holder = _holder()
    a, b = [], []
    _add(holder, {0: (1, OPEN, a), 1: (None, OPEN, []), 2: (2, OPEN, b)})
    drafts = [[20, 21], [22, 23, 24], [25]]
    target = holder.apply_to_logits(torch.zeros(6, VOCAB), False, drafts)
    # request 0 (budget 1: the prompt's token after <think> is the first): 7 forced at once; its
    # draft 20 is then rejected, so its second row is not forced
    assert [_chosen(r, None) for r in target] == [7, None, None, None, None, None]
    # request 2 (budget 2): one free token, then forced: its draft row 0 free, bonus row forced
    bonus = holder.apply_to_logits(torch.zeros(3, VOCAB), True, drafts)
    assert [_chosen(r, None) for r in bonus] == [None, None, 7]


def test_holder_is_vllms_own_without_the_projects_parser():
    pytest.importorskip("vllm")
    from vllm.v1.sample.thinking_budget_state import ThinkingBudgetStateHolder

    from ascend_qwen3.vllm_plugin.budget import install_speculative_budget
    install_speculative_budget("ascend_qwen3")
    install_speculative_budget("ascend_qwen3")          # idempotent
    import vllm.v1.sample.thinking_budget_state as tbs
    cls = tbs.ThinkingBudgetStateHolder
    assert getattr(cls, "_ascend_qwen3", False) and issubclass(cls, ThinkingBudgetStateHolder)

    class Config:
        reasoning_parser = "qwen3"
        reasoning_start_token_ids, reasoning_end_token_ids = [1], [2]

    h = cls(Config(), 4, 3, torch.device("cpu"), False)
    assert not h.ours and not h.has_tracked_requests()
    # with no speculation the project's logits processor applies the budget: not the holder
    Config.reasoning_parser = "ascend_qwen3"
    assert not cls(Config(), 4, 0, torch.device("cpu"), False).ours


# --- the guard where the budget cannot be applied ------------------------------------------------

def _call(app, path, body, method="POST"):
    sent, seen = [], []

    async def inner(scope, receive, send):
        msg = await receive()
        seen.append(msg["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    from ascend_qwen3.vllm_plugin.budget_guard import RefuseThinkingBudget
    asyncio.run(RefuseThinkingBudget(inner)({"type": "http", "method": method, "path": path},
                                            receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), seen


def test_guard_refuses_a_budget_naming_both_ways_out():
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        status, body, seen = _call(None, path, json.dumps({"thinking_token_budget": 5}).encode())
        err = json.loads(body)["error"]
        assert status == 400 and not seen
        assert err["param"] == "thinking_token_budget" and err["code"] == 400
        assert "without thinking_token_budget" in err["message"]
        assert "serve without speculative decoding" in err["message"]


@pytest.mark.parametrize("path,body,method", [
    ("/v1/chat/completions", {"messages": []}, "POST"),
    ("/v1/chat/completions", {"thinking_token_budget": -1}, "POST"),     # unlimited
    ("/v1/chat/completions", {"thinking_token_budget": None}, "POST"),
    ("/tokenize", {"thinking_token_budget": 3}, "POST"),
    ("/v1/models", {}, "GET")])
def test_guard_passes_everything_else_through_untouched(path, body, method):
    raw = json.dumps(body).encode()
    status, out, seen = _call(None, path, raw, method)
    assert status == 200 and out == b"ok" and seen == [raw]


def test_guard_leaves_non_json_to_the_endpoint():
    status, _, seen = _call(None, "/v1/completions", b"not json")
    assert status == 200 and seen == [b"not json"]


# --- vLLM's CPU fallback of the rejection sampler's expand kernel, fixed --------------------------

@pytest.mark.parametrize("dtype,values", [(torch.int32, [20, 0, 7]), (torch.float32, [0.6, -1.0, 1.0]),
                                          (torch.int64, [3, 4, 0])])
def test_expand_writes_each_requests_value_over_its_drafts(dtype, values):
    """The semantics of vLLM's Triton expand_kernel (request i's value over
    output[cu[i-1]:cu[i]], replace_from -> replace_to), in the output's own dtype: what the
    rejection sampler needs for the temperature (float32), top-k (int32) and top-p; vLLM 0.32's
    CPU fallback wrote into a temporary int64 copy and left the output uninitialised."""
    pytest.importorskip("vllm")
    from ascend_qwen3.vllm_plugin.cpu_kernels import expand_kernel_impl

    x = torch.tensor(values, dtype=dtype)
    cu = torch.tensor([2, 2, 5], dtype=torch.int32)          # the second request drafted nothing
    out = torch.full((6,), 99, dtype=dtype)
    expand_kernel_impl(out, x, cu, -1 if dtype.is_floating_point else 0, 1)
    first, third = values[0], values[2]
    if dtype.is_floating_point:
        want = [first, first, third, third, third, 99]
    else:
        first = 1 if first == 0 else first
        third = 1 if third == 0 else third
        want = [first, first, third, third, third, 99]
    assert out.tolist() == pytest.approx(want)


def test_the_fix_is_where_vllms_cpu_platform_takes_its_fallback():
    pytest.importorskip("vllm")
    from vllm.utils import cpu_triton_utils

    from ascend_qwen3.vllm_plugin.cpu_kernels import expand_kernel_impl, fix_cpu_expand_kernel
    assert fix_cpu_expand_kernel()
    assert cpu_triton_utils._expand_kernel_impl is expand_kernel_impl
