"""Two nodes simulated on one machine: the launcher starts a leader and a headless follower on
127.0.0.1, each from the same profile-shaped settings (``ascend-qwen3 serve ... --dp 2 --node-rank
0|1 --leader-address 127.0.0.1``), with the project's classes inside vLLM's CPU build:

- a dense model, data parallel 2 (each node one engine with its own requests);
- a MoE, data parallel 2 x TP 1 with expert parallel across both (EP 2: each node holds half of
  the experts and every MoE layer exchanges the two nodes' tokens, model/moe.py);

the leader serves the OpenAI endpoint; fp32 greedy tokens equal the single-process model on the
same checkpoint, both engines having served requests (vLLM's per-engine metrics); then one node
is killed (every process of it, as a machine that dies) and the other node's launcher must exit
non-zero within PEER_DEADLINE_S, leaving no process behind.

Each case boots two nodes (an engine each: over a minute on two cores); the two cases' four
nodes boot at the same time (a boot is mostly one process's imports per node, so two pairs side
by side take little longer than one), then each case is checked, and one of its nodes killed,
in turn.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.vllm_support import require_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 151936             # the real tokenizer's: vLLM's server loads it
N_NEW = 8
PROMPTS = [[5 + i, 17, 300 + 7 * i, 1000 + i, 42][: 2 + i % 4] + [9] * (i % 3) for i in range(8)]
# the peer link's heartbeat timeout is 10 s, a closed link is seen at once; then the server gets
# PEER_LOST_GRACE_S (10 s) to stop before it is killed
PEER_DEADLINE_S = 60


_PORTS: set[int] = set()      # handed out in this module: the two pairs' ports all differ


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS:
            _PORTS.add(port)
            return port


def _checkpoint(tmp, kind: str) -> str:
    from ascend_qwen3.serve.tokenizer import write_qwen3_tokenizer

    name, kw = {"dense": ("dense_tied", {}), "moe": ("moe_norm", {"head_dim": 32})}[kind]
    path = make_checkpoint(name, str(tmp / kind), vocab_size=VOCAB, **kw)
    write_qwen3_tokenizer(path)
    return path


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        p = psutil.Process(proc.pid)
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            pass
    return out


class Pair:
    """A leader and a follower launcher on this machine."""

    def __init__(self, tmp, model: str, extra: list[str]):
        self.tmp, self.port = tmp, _free_port()
        common = ["--model", model, "--dtype", "float32", "--dp", "2", *extra,
                  "--leader-address", "127.0.0.1", "--dp-rpc-port", str(_free_port()),
                  "--peer-port", str(_free_port()), "--port", str(self.port),
                  "--max-model-len", "512", "--max-num-seqs", "8", "--skip-check", "--",
                  "--enforce-eager"]
        base = dict(os.environ, PYTHONPATH=ROOT, VLLM_CPU_KVCACHE_SPACE="1")
        base.pop("VLLM_API_KEY", None)
        self.procs, self.logs = [], []
        for rank in (0, 1):
            # one core each, as two machines would have their own
            env = dict(base, VLLM_CPU_OMP_THREADS_BIND=str(rank % (os.cpu_count() or 1)))
            log = open(tmp / f"node{rank}.log", "w")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "ascend_qwen3.cli", "serve", "--node-rank", str(rank),
                 # one API server (vLLM's default with data parallel is one per rank)
                 *common, *(["--api-server-count", "1"] if rank == 0 else [])], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self, rank: int) -> str:
        return (self.tmp / f"node{rank}.log").read_text()[-4000:]

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
            if dead or time.time() > deadline:
                self.stop()
                raise AssertionError(f"the two nodes did not come up (node(s) {dead} exited); "
                                     f"leader log:\n{self.log(0)}\nfollower log:\n{self.log(1)}")
            time.sleep(1)

    def complete(self, prompt: list[int]) -> list[int]:
        body = json.dumps({"model": os.path.basename(self.model_name), "prompt": prompt,
                           "max_tokens": N_NEW, "temperature": 0, "ignore_eos": True,
                           "return_token_ids": True}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.load(r)["choices"][0]["token_ids"]

    def engines_served(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("vllm:request_success_total{") and 'finished_reason="length"' in line:
                engine = line.split('engine="')[1].split('"')[0]
                out[engine] = out.get(engine, 0) + float(line.rsplit(" ", 1)[1])
        return out

    def kill_node(self, rank: int) -> None:
        """Every process of that node at once (SIGKILL), as when its machine dies."""
        for p in _tree(self.procs[rank]):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        for p in self.procs:
            for q in _tree(p):
                try:
                    q.kill()
                except psutil.NoSuchProcess:
                    pass
        for p in self.procs:
            p.wait(30)
        for log in self.logs:
            log.close()


def _reference(model: str) -> list[list[int]]:
    from ascend_qwen3.loader import load_model
    from ascend_qwen3.runner.generate import SamplingParams, generate

    m, _ = load_model(model, dtype="float32")
    return [g.tokens for g in generate(m, PROMPTS, SamplingParams(max_new_tokens=N_NEW))]


# kind -> (launcher arguments, the node killed at the end)
CASES = {
    "dense": ([], 1),           # the follower dies: the leader's launcher must exit non-zero
    "moe": (["--ep"], 0),       # the leader dies: the follower's launcher must exit non-zero
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """kind -> (its two nodes, ready; the single-process model's tokens): every case's nodes
    started at once."""
    require_vllm()
    out = {}
    try:
        for kind, (extra, _) in CASES.items():
            tmp = tmp_path_factory.mktemp(f"two-nodes-{kind}")
            model = _checkpoint(tmp, kind)
            pair = Pair(tmp, model, extra)
            pair.model_name = model
            out[kind] = (pair, None)
        for kind, (pair, _) in out.items():       # computed while the nodes boot
            out[kind] = (pair, _reference(pair.model_name))
        for pair, _ in out.values():
            pair.wait_ready()
        yield out
    finally:
        for pair, _ in out.values():
            pair.stop()


@pytest.mark.parametrize("kind", list(CASES))
def test_two_nodes_serve_and_fail_together(pairs, kind):
    killed = CASES[kind][1]
    pair, want = pairs[kind]
    tmp_path = pair.tmp
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as ex:
            got = list(ex.map(pair.complete, PROMPTS))
        assert got == want, f"{kind}: greedy tokens differ from the single-process model"
        served = pair.engines_served()
        assert set(served) == {"0", "1"} and all(v > 0 for v in served.values()), served
        if kind == "moe":       # the project's class on both nodes, each with half of the experts
            for rank in (0, 1):
                assert "AscendQwen3MoeForCausalLM, tp 0/1 (expert parallel)" in \
                    (tmp_path / f"node{rank}.log").read_text(), rank
        survivor = 1 - killed
        everything = _tree(pair.procs[0]) + _tree(pair.procs[1])
        t0 = time.time()
        pair.kill_node(killed)
        code = pair.procs[survivor].wait(PEER_DEADLINE_S)
        took = time.time() - t0
        assert code != 0, f"node {survivor}'s launcher exited 0 after node {killed} died"
        assert "went away" in pair.log(survivor), pair.log(survivor)
        time.sleep(2)
        left = _alive(everything)
        assert not left, f"processes left after node {killed} died ({took:.0f} s): {left}"
        print(f"{kind}: node {survivor} exited {code} {took:.1f} s after node {killed} was killed")
    finally:
        pair.stop()
