"""Deploy profiles, the memory planner and the launcher's generated commands (no NPU needed).

- every profile under deploy/profiles validates against the schema and fits its hardware by the
  planner; edited to not fit (or malformed) it is rejected with the numbers / the key;
- the planner's weights, KV bytes per token and KV tokens for Qwen3-32B and Qwen3-235B-A22B equal
  a hand calculation written out below from the published config.json shapes;
- golden files hold the `vllm serve` command and environment of every profile
  (UPDATE_GOLDEN=1 rewrites them after a deliberate change).
"""

from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import yaml

from ascend_qwen3.cli import main
from ascend_qwen3.config import family_config
from ascend_qwen3.deploy.launcher import build_command
from ascend_qwen3.deploy.planner import GiB, kv_bytes_per_token, plan, weight_bytes_per_rank
from ascend_qwen3.deploy.profiles import ProfileError, plan_of, profile_names, profiles_dir, to_spec, validate
from ascend_qwen3.deploy.profiles import load_profile as _load_profile
from ascend_qwen3.speculative import Speculative
from ascend_qwen3.vllm_plugin.budget_guard import MIDDLEWARE as BUDGET_GUARD


@functools.lru_cache(maxsize=None)
def _loaded(name: str) -> dict:
    return _load_profile(name)


def load_profile(name: str) -> dict:
    """The committed profile ``name`` (validated and planned once per session: the planner
    builds every rank's load plan); a copy, so a test may change it."""
    return copy.deepcopy(_loaded(name))

PROFILES = profile_names()
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "serve_commands.json")
MULTI_NODE_ENV = {"HCCL_IF_IP": "192.0.2.10", "GLOO_SOCKET_IFNAME": "eth0",
                  "TP_SOCKET_IFNAME": "eth0", "HCCL_SOCKET_IFNAME": "eth0"}


def test_all_eight_models_have_profiles():
    models = {load_profile(n)["model"] for n in PROFILES}
    assert models == {"Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B",
                      "Qwen3-30B-A3B", "Qwen3-235B-A22B",
                      "Qwen3-Embedding-0.6B", "Qwen3-Embedding-4B", "Qwen3-Embedding-8B"}
    two_node = [load_profile(n) for n in PROFILES if load_profile(n).get("nodes", 1) == 2]
    assert [(p["model"], p["precision"], p["distributed_executor_backend"], p["dp"], p["tp"])
            for p in two_node] == [("Qwen3-235B-A22B", "bf16", "mp", 2, 8)]


@pytest.mark.parametrize("name", PROFILES)
def test_profile_validates_and_fits(name, capsys):
    p = load_profile(name)
    pl = plan_of(p)
    assert pl.fits and pl.kv_tokens >= p["max_model_len"]
    print(pl.report())
    assert "fits: margin" in capsys.readouterr().out


def _raw(name):
    with open(os.path.join(profiles_dir(), name + ".yaml")) as f:
        return yaml.safe_load(f)


def test_profile_that_does_not_fit_is_rejected_with_numbers(tmp_path):
    p = _raw("qwen3-32b-bf16")
    p.update(tp=1, devices=[0])          # 61 GiB of bf16 weights on one 64 GB NPU
    (tmp_path / "qwen3-32b-bf16.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(ProfileError) as e:
        _load_profile("qwen3-32b-bf16", directory=str(tmp_path))
    msg = str(e.value)
    assert "does not fit" in msg and "61.02 GiB" in msg and "DOES NOT FIT" in msg and "raise tp" in msg


@pytest.mark.parametrize("edit,needle", [
    (lambda p: p.update(tp=3), "tp = 3"),
    (lambda p: p.update(devices=[0, 1]), "device(s)"),
    (lambda p: p.update(yarn=False), "yarn: true"),
    (lambda p: p.update(block_size=16), "block_size"),
    (lambda p: p.update(precision="int4"), "precision"),
    (lambda p: p.update(model="Qwen3-70B"), "model"),
    (lambda p: p.update(colour="blue"), "unknown key"),
    (lambda p: p.pop("served_model_name"), "missing required key 'served_model_name'"),
    (lambda p: p["sampling"]["thinking"].update(temp=1), "sampling.thinking"),
    (lambda p: p.update(expert_parallel=True), "expert_parallel"),
    (lambda p: p.update(max_num_seqs="many"), "must be a int"),
    (lambda p: p.update(pipeline_parallel_size=3), "pipeline_parallel_size = 3 is not allowed"),
    (lambda p: p.update(pipeline_parallel_size=2), "tp 4 x pp 2 x 1 data-parallel rank(s) per "
                                                    "node need 8"),
    (lambda p: p.update(pipeline_parallel_size=2, devices=list(range(8)),
                        env={"VLLM_PP_LAYER_PARTITION": "30,30"}),
     "pipeline_parallel_size: VLLM_PP_LAYER_PARTITION='30,30' must give 2 layer counts"),
    (lambda p: p.update(pipeline_parallel_size=2, devices=list(range(8)),
                        speculative={"method": "ngram", "num_speculative_tokens": 2}),
     "speculative decoding with pipeline_parallel_size 2 is not supported"),
])
def test_malformed_profiles_are_rejected(edit, needle):
    p = copy.deepcopy(_raw("qwen3-32b-w8a8"))
    edit(p)
    with pytest.raises(ProfileError, match=None) as e:
        validate(p, "edited.yaml")
    assert needle in str(e.value)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError, match="qwen3-32b-w8a8"):
        load_profile("qwen3-70b")


# --- hand calculations ---------------------------------------------------------------------------

def test_planner_qwen3_32b_by_hand():
    # Qwen3-32B: 64 layers, hidden 5120, 64 query / 8 KV heads of 128, FFN 25600, vocab 151936,
    # untied. tp=4 -> per rank 16 query heads, 2 KV heads, FFN 6400, 37984 vocabulary rows.
    H, L, D, vocab_rows, ffn = 5120, 64, 128, 151936 // 4, 25600 // 4
    q, kv = 16 * D, 2 * D
    per_layer = (q + 2 * kv) * H + H * q + 2 * ffn * H + H * ffn + 2 * H + 2 * D
    params = 2 * vocab_rows * H + L * per_layer + H
    bf16_bytes = 2 * params
    cfg = family_config("Qwen3-32B")
    assert weight_bytes_per_rank(cfg, 4, False, "bf16") == [bf16_bytes] * 4
    kv_tok = 2 * L * 2 * D * 2                      # K and V, 64 layers, 2 heads, 128, bf16
    assert kv_bytes_per_token(cfg, 4) == kv_tok == 65536
    p = plan(cfg, hw="atlas-800i-a2-64g", precision="bf16", tp=4, max_model_len=131072)
    usable = 64 * GiB * 0.9
    expect_tokens = int((usable - bf16_bytes - 4 * GiB) // kv_tok)
    assert p.kv_tokens == expect_tokens and p.full_length_sequences == expect_tokens // 131072
    assert round(bf16_bytes / GiB, 2) == 15.26
    # static W8A8: int8 linears plus fp32 deq_scale and int32 quant_bias per output row (q/k/v and
    # gate/up per member; o_proj/down rows are full-width and replicated), bf16 embeddings/norms
    lin_out = (q + 2 * kv) + H + 2 * ffn + H        # output rows of the 4 linears on this rank
    lin_w = (q + 2 * kv) * H + H * q + 2 * ffn * H + H * ffn
    scales = 3 * 2 + 3 * 1 + 2 * 2 + 2 * 1 + 2 + 1 + 2 + 1   # input_scale bf16 / offset int8 per member
    w8a8 = (2 * (2 * vocab_rows * H + H)
            + L * (lin_w + 8 * lin_out + scales + 2 * (2 * H + 2 * D)))
    assert weight_bytes_per_rank(cfg, 4, False, "w8a8")[0] == w8a8


def test_planner_qwen3_235b_by_hand():
    # Qwen3-235B-A22B: 94 layers, hidden 4096, 64 query / 4 KV heads of 128, 128 experts of FFN
    # 1536, router 128 x 4096, vocab 151936, untied. The two-node profile: dp=2 x tp=8 with expert
    # parallel over all 16 NPUs -> per NPU 8 query heads, 1 KV head (each replicated on 2 ranks
    # of a node), 8 whole experts, 1/8 of the vocabulary.
    H, L, D, E_local, I, E = 4096, 94, 128, 8, 1536, 128
    vocab_rows = 151936 // 8
    per_layer = (8 * D + 2 * D) * H + H * 8 * D + E * H + E_local * 3 * H * I + 2 * H + 2 * D
    bf16_bytes = 2 * (2 * vocab_rows * H + L * per_layer + H)
    cfg = family_config("Qwen3-235B-A22B", yarn=True)
    per_rank = weight_bytes_per_rank(cfg, 8, True, "bf16", dp=2)
    assert len(per_rank) == 16 and set(per_rank) == {bf16_bytes}
    assert kv_bytes_per_token(cfg, 8) == 2 * L * 1 * D * 2 == 48128
    p = plan(cfg, hw="atlas-800i-a2-64g", precision="bf16", tp=8, ep=True, nodes=2, dp=2,
             max_model_len=131072)
    # KV tokens per data-parallel rank (each node's 8 NPUs hold one cache)
    assert p.kv_tokens == int((64 * GiB * 0.9 - bf16_bytes - 4 * GiB) // 48128)
    assert round(bf16_bytes / GiB, 1) == 28.5
    # one node (tp=8, 16 experts per rank) cannot hold it in bf16: ~55 GiB of weights per NPU
    one_node = plan(cfg, hw="atlas-800i-a2-64g", precision="bf16", tp=8, ep=True, max_model_len=131072)
    assert not one_node.fits and one_node.weights_gib > 54


def test_planner_pipeline_stages_by_hand():
    # Qwen3-32B (above) at tp=2 x pp=2: 32 layers per stage; stage 0 holds the embedding, stage 1
    # the final norm and the (untied) head; each stage's KV cache holds its own 32 layers
    H, D, vocab_rows, ffn = 5120, 128, 151936 // 2, 25600 // 2
    q, kv = 32 * D, 4 * D
    per_layer = (q + 2 * kv) * H + H * q + 2 * ffn * H + H * ffn + 2 * H + 2 * D
    first, last = 2 * (vocab_rows * H + 32 * per_layer), 2 * (32 * per_layer + H + vocab_rows * H)
    cfg = family_config("Qwen3-32B")
    assert weight_bytes_per_rank(cfg, 2, False, "bf16", stage=(0, 32)) == [first] * 2
    assert weight_bytes_per_rank(cfg, 2, False, "bf16", stage=(32, 64)) == [last] * 2
    # the two stages hold the whole tp=2 model, the embedding and head once each
    assert first + last == weight_bytes_per_rank(cfg, 2, False, "bf16")[0]
    kv_tok = 2 * 32 * 4 * D * 2
    p = plan(cfg, hw="atlas-800i-a2-64g", precision="bf16", tp=2, pp=2, max_model_len=32768)
    usable = 64 * GiB * 0.9
    assert [(st["layers"], st["kv_bytes_per_token"]) for st in p.stages] == [
        ((0, 32), kv_tok), ((32, 64), kv_tok)]
    assert [st["kv_tokens"] for st in p.stages] == [
        int((usable - w - 4 * GiB) // kv_tok) for w in (first, last)]
    assert p.kv_tokens == min(st["kv_tokens"] for st in p.stages) and p.devices == 4
    assert p.weights_gib == max(first, last) / GiB
    report = p.report()
    assert "pp=2 x tp=2 (4 NPUs)" in report and "stage 0: layers 0..31 + embedding" in report
    assert "stage 1: layers 32..63 + norm + head" in report
    # a tied model keeps the embedding on the last stage too (its head reads it)
    tied = family_config("Qwen3-4B")
    assert tied.tie_word_embeddings
    st = plan(tied, hw="atlas-800i-a2-64g", precision="bf16", tp=1, pp=2).stages
    assert st[0]["embed"] and st[1]["embed"] and st[1]["head"]


@pytest.mark.parametrize("kw,needle", [
    (dict(tp=4, pp=3), r"pipeline-parallel size 3 does not divide the 64 decoder layers of "
                       r"Qwen3-32B; use pp in \{1, 2, 4, 8, 16, 32, 64\}"),
    (dict(tp=8, pp=2), r"pp=2 x tp=8 needs 16 NPUs but 1 x Atlas 800I A2, 8 x 64 GB has 8"),
    (dict(tp=4, pp=2, draft="ngram"), r"speculative decoding \(ngram\) with pipeline parallel"),
])
def test_planner_refuses_bad_pipelines(kw, needle):
    from ascend_qwen3.deploy.planner import PlanError
    with pytest.raises(PlanError, match=needle):
        plan(family_config("Qwen3-32B"), hw="atlas-800i-a2-64g", precision="bf16", **kw)


def test_pipeline_profile_serves_with_its_stages():
    """A profile with pipeline_parallel_size: tp x pp devices, --pipeline-parallel-size on the
    command, and the plan per stage."""
    p = copy.deepcopy(_raw("qwen3-32b-w8a8"))
    p.update(tp=2, pipeline_parallel_size=2)
    validate(p, "pp.yaml")
    pl = plan_of(p)
    assert pl.pp == 2 and pl.devices == 4 and len(pl.stages) == 2 and pl.fits
    argv, env = build_command(to_spec(p), base_env={})
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3"
    # an explicit uneven partition in the profile's env is the planner's too
    p["env"] = {"VLLM_PP_LAYER_PARTITION": "30,34"}
    assert [st["layers"] for st in plan_of(p).stages] == [(0, 30), (30, 64)]
    argv, env = build_command(to_spec(p), base_env={})
    assert env["VLLM_PP_LAYER_PARTITION"] == "30,34"


def test_cli_plan_recommends_tp(capsys):
    assert main(["plan", "--model", "Qwen3-32B", "--hw", "atlas-800i-a2", "--precision", "w8a8"]) == 0
    out = capsys.readouterr().out
    assert "recommended: tp=2" in out and "fits: margin" in out
    assert main(["plan", "--model", "Qwen3-235B-A22B", "--hw", "atlas-800i-a2-32g",
                 "--precision", "bf16"]) == 1
    assert "two nodes" in capsys.readouterr().out


# --- golden commands -----------------------------------------------------------------------------

LEADER_IP = "192.0.2.10"


def _command(name, node_rank=None):
    p = load_profile(name)
    base = dict(MULTI_NODE_ENV) if p.get("nodes", 1) > 1 else {}
    spec = to_spec(p)
    if node_rank is not None:
        spec.node_rank, spec.leader_address = node_rank, LEADER_IP
    argv, env = build_command(spec, base_env=base)
    i = argv.index(p["model_path"])
    # the start is "vllm serve MODEL" or "python -m vllm...api_server --model MODEL" by packaging
    return {"argv": ["vllm", "serve"] + argv[i:], "env": {k: v for k, v in env.items() if k not in base}}


def _commands() -> dict:
    """Every profile's command; a multi-node profile's for each node (NAME@node0, NAME@node1)."""
    got = {}
    for name in PROFILES:
        nodes = load_profile(name).get("nodes", 1)
        if nodes == 1:
            got[name] = _command(name)
        for r in range(nodes if nodes > 1 else 0):
            got[f"{name}@node{r}"] = _command(name, r)
    return got


def test_golden_serve_commands():
    got = _commands()
    if os.environ.get("UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
    with open(GOLDEN) as f:
        want = json.load(f)
    assert sorted(got) == sorted(want), "profiles added or removed: UPDATE_GOLDEN=1 after review"
    for name in got:
        assert got[name] == want[name], f"{name}: the generated command changed"


def test_golden_commands_carry_the_profile():
    for key, c in _commands().items():
        name = key.split("@")[0]
        p = load_profile(name)
        argv, env = c["argv"], c["env"]
        flag = lambda f: argv[argv.index(f) + 1] if f in argv else None  # noqa: E731
        assert env["ASCEND_RT_VISIBLE_DEVICES"] == ",".join(map(str, p["devices"]))
        assert env["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
        assert flag("--tensor-parallel-size") == (str(p["tp"]) if p["tp"] > 1 else None)
        assert ("--enable-expert-parallel" in argv) == bool(p.get("expert_parallel"))
        assert flag("--max-model-len") == str(p["max_model_len"])
        assert flag("--block-size") == "128"
        overrides = json.loads(flag("--hf-overrides"))
        assert overrides["architectures"][0].startswith("AscendQwen3")
        assert ("rope_scaling" in overrides) == bool(p.get("yarn"))
        if p.get("runner") == "pooling":
            # an embedding server: --runner pooling and nothing that only generation uses
            assert flag("--runner") == "pooling"
            for generation_only in ("--override-generation-config", "--reasoning-parser",
                                    "--tool-call-parser", "--logits-processors", "--middleware",
                                    "--speculative-config", "--default-chat-template-kwargs"):
                assert generation_only not in argv, (name, generation_only)
            assert flag("--distributed-executor-backend") == "mp"
            continue
        assert "--runner" not in argv
        mode = "thinking" if p["thinking"] else "non_thinking"
        assert json.loads(flag("--override-generation-config")) == p["sampling"][mode]
        assert flag("--reasoning-parser") == "ascend_qwen3" and flag("--tool-call-parser") == "hermes"
        if p.get("speculative"):
            # vLLM refuses logits processors with speculation; on vllm-ascend nothing applies a
            # budget to drafted tokens, so budgeted requests are refused (budget_guard.py)
            assert json.loads(flag("--speculative-config")) == Speculative.from_dict(
                p["speculative"]).to_vllm()
            assert flag("--logits-processors") is None
            assert flag("--middleware") == "ascend_qwen3.vllm_plugin.budget_guard.RefuseThinkingBudget"
        else:
            assert flag("--logits-processors") == "ascend_qwen3.vllm_plugin.thinking:ThinkingBudget"
            assert "--speculative-config" not in argv and BUDGET_GUARD not in argv
        assert flag("--distributed-executor-backend") == "mp"
        if p.get("nodes", 1) > 1:
            assert flag("--data-parallel-size") == str(p["dp"])
            assert flag("--data-parallel-size-local") == "1"
            assert flag("--data-parallel-address") == LEADER_IP
            assert flag("--data-parallel-rpc-port") == "13389"
            follower = key.endswith("@node1")
            assert ("--headless" in argv) == follower
            assert flag("--data-parallel-start-rank") == ("1" if follower else None)


def test_two_node_commands_are_the_vendor_tested_ones():
    """The flags vllm-ascend v0.23.0's nightly passes for Qwen3-235B-A22B on two A2 nodes
    (tests/e2e/nightly/multi_node/internal_dp/config/Qwen3-235B-A22B-A2.yaml), on each node."""
    vendor = [("--data-parallel-size", "2"), ("--data-parallel-size-local", "1"),
              ("--data-parallel-address", LEADER_IP), ("--data-parallel-rpc-port", "13389"),
              ("--tensor-parallel-size", "8"), ("--enable-expert-parallel", None)]
    name = "qwen3-235b-a22b-bf16-2node"
    for rank, extra in ((0, []), (1, [("--headless", None), ("--data-parallel-start-rank", "1")])):
        c = _command(name, rank)
        argv = c["argv"]
        for flag, value in vendor + extra:
            assert flag in argv, (rank, flag)
            if value is not None:
                assert argv[argv.index(flag) + 1] == value, (rank, flag, argv)
        assert ("--headless" in argv) == (rank == 1)
        assert c["env"]["HCCL_BUFFSIZE"] == "1024" and c["env"]["OMP_PROC_BIND"] == "false"
        assert c["env"]["OMP_NUM_THREADS"] == "1"


def test_multi_node_profile_needs_the_network_settings(monkeypatch):
    from ascend_qwen3.deploy.launcher import LaunchError
    for k in MULTI_NODE_ENV:
        monkeypatch.delenv(k, raising=False)
    spec = to_spec(load_profile("qwen3-235b-a22b-bf16-2node"))
    spec.node_rank, spec.leader_address = 0, LEADER_IP
    with pytest.raises(LaunchError, match="HCCL_IF_IP"):
        build_command(spec, base_env={})


@pytest.mark.parametrize("rank,address,message", [
    (None, LEADER_IP, "--node-rank 0 on the leader"),
    (2, LEADER_IP, "2 is out of range"),
    (1, None, "needs the leader's address on every node"),
])
def test_two_node_profile_needs_its_place(rank, address, message):
    from ascend_qwen3.deploy.launcher import LaunchError
    spec = to_spec(load_profile("qwen3-235b-a22b-bf16-2node"))
    spec.node_rank, spec.leader_address = rank, address
    with pytest.raises(LaunchError, match=message):
        build_command(spec, base_env=dict(MULTI_NODE_ENV))


def test_cli_two_node_dry_runs(capsys, monkeypatch):
    """Each node's command from the same profile; the place from the flags, or from the
    variables a LeaderWorkerSet sets."""
    for k, v in MULTI_NODE_ENV.items():
        monkeypatch.setenv(k, v)
    name = "qwen3-235b-a22b-bf16-2node"
    assert main(["serve", "--profile", name, "--node-rank", "0", "--leader-address", LEADER_IP,
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    leader = out.strip().splitlines()[-1]
    assert "--data-parallel-address 192.0.2.10" in leader and "--headless" not in leader
    assert "# Qwen3-235B-A22B bf16 on atlas-800i-a2-64g: dp=2 x tp=8" in out
    monkeypatch.setenv("LWS_WORKER_INDEX", "1")
    monkeypatch.setenv("LWS_LEADER_ADDRESS", "leader.example")
    assert main(["serve", "--profile", name, "--dry-run"]) == 0
    follower = capsys.readouterr().out.strip().splitlines()[-1]
    assert "--headless --data-parallel-start-rank 1" in follower
    assert "--data-parallel-address leader.example" in follower
    monkeypatch.delenv("LWS_WORKER_INDEX")
    assert main(["serve", "--profile", name, "--dry-run"]) == 2
    assert "--node-rank 0 on the leader" in capsys.readouterr().err


def test_visible_devices_from_the_environment_win_if_they_count_right():
    """A pod's NPUs (Kubernetes device plugin) or an operator's choice are kept; a wrong count
    is refused with both numbers."""
    from ascend_qwen3.deploy.launcher import LaunchError
    spec = to_spec(load_profile("qwen3-32b-w8a8"))              # tp 4 on devices 0-3
    _, env = build_command(spec, base_env={"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"})
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == "4,5,6,7"
    with pytest.raises(LaunchError, match=r"names 2 NPU\(s\) but this deployment needs 4"):
        build_command(spec, base_env={"ASCEND_RT_VISIBLE_DEVICES": "0,1"})


def test_cli_serve_profile_dry_run(capsys):
    assert main(["serve", "--profile", "qwen3-32b-w8a8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# Qwen3-32B w8a8 on atlas-800i-a2-64g: tp=4" in out
    assert "ASCEND_RT_VISIBLE_DEVICES=0,1,2,3" in out and "--tensor-parallel-size 4" in out


def test_cli_serve_profile_explicit_host_and_port_win(capsys):
    assert main(["serve", "--profile", "qwen3-8b-bf16", "--host", "127.0.0.1", "--port", "8000",
                 "--dry-run"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "--host 127.0.0.1" in line and "--port 8000" in line
    assert main(["serve", "--profile", "qwen3-8b-bf16", "--port", "9001", "--dry-run"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "--host 0.0.0.0" in line and "--port 9001" in line


def test_cli_serve_profile_refuses_options_the_profile_sets(capsys):
    assert main(["serve", "--profile", "qwen3-32b-w8a8", "--tp", "8", "--device", "cpu",
                 "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--device cpu, --tp cannot be combined with --profile" in err
    assert "deploy/profiles/qwen3-32b-w8a8.yaml" in err


def test_report_states_the_plans_own_memory_utilization():
    from ascend_qwen3.config import family_config
    from ascend_qwen3.deploy.planner import MEMORY_UTILIZATION, plan

    cfg = family_config("Qwen3-8B")
    for util in (0.8, MEMORY_UTILIZATION):
        pl = plan(cfg, hw="atlas-800i-a2", precision="bf16", tp=2, memory_utilization=util)
        assert f"64 GiB HBM x {util:g} = {64 * util:.2f} GiB usable" in pl.report()
