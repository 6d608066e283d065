"""Container manifests generated from the deploy profiles: ``deploy/compose.yaml`` (one docker
compose service per single-node profile, plus ``cpu``) and ``deploy/k8s/<profile>.yaml``
(a Deployment and a ClusterIP Service per single-node profile; a LeaderWorkerSet and a Service
on its leader per multi-node profile).

The committed files are this module's output; a test checks they are equal, so a profile change
that touches devices, tp, port or model path shows up as a stale manifest::

    python -m ascend_qwen3.deploy.manifests --check    # exit 1 and name the stale files
    python -m ascend_qwen3.deploy.manifests --write    # regenerate them

Everything here follows from a profile: the NPUs (``devices``; tp / nodes of them), the port,
and the checkpoint mount (host ``/data/models/<basename of model_path>`` on ``model_path``).
A multi-node profile is a LeaderWorkerSet (kubernetes-sigs/lws, ``leaderworkerset.x-k8s.io/v1``):
one group of ``nodes`` pods, the leader running ``serve --profile NAME --node-rank 0`` (the API
server), the worker ``--node-rank 1`` (headless); both find the leader through the
``LWS_LEADER_ADDRESS`` variable LWS sets in every pod, and the group is recreated as a whole
when one pod fails (``restartPolicy: RecreateGroupOnPodRestart``; the launchers exit non-zero
when the other node goes: peers.py). Compose has no two-node form: it runs on one host.

What is checked where: the files parse and agree with the profiles on any machine (tests); the
device mounts, driver paths and the Ascend device plugin's resource name follow the vllm-ascend
and MindCluster documentation, and have only been exercised on an Atlas server, not here.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from .. import __version__
from .launcher import MULTI_NODE_ENV, PEER_PORT, SHUTDOWN_TIMEOUT_S
from .profiles import load_profile, profile_names

IMAGE = f"ascend-qwen3:{__version__}"           # `docker build -t ascend-qwen3:<version> .`
CPU_IMAGE = f"ascend-qwen3:{__version__}-cpu"   # `docker build -f deploy/Dockerfile.cpu ...`
MODELS_HOST_DIR = "/data/models"                # checkpoints on the host, one directory each
CONTAINER_PORT = 8000                           # EXPOSE in both Dockerfiles, the probes' port
SHM = "4g"                                      # vLLM's shared-memory queues (vllm-ascend's docker run example: >= 1g)
SHM_K8S = "4Gi"
# the Ascend device plugin's extended resource for Atlas 800I A2 NPUs (MindCluster docs: "Atlas
# 800I A2 inference server: huawei.com/Ascend910: <number of chips>", equal in requests and limits)
NPU_RESOURCE = "huawei.com/Ascend910"
# management devices every NPU container needs besides its /dev/davinciN
NPU_CONTROL_DEVICES = ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
# host paths of the Ascend driver the container reads (vllm-ascend's `docker run` example)
DRIVER_MOUNTS = {"dcmi": "/usr/local/dcmi", "npu-smi": "/usr/local/bin/npu-smi",
                 "driver-lib64": "/usr/local/Ascend/driver/lib64",
                 "driver-version": "/usr/local/Ascend/driver/version.info",
                 "ascend-install-info": "/etc/ascend_install.info"}
# loading a 235B checkpoint from local disk takes many minutes: liveness and readiness start
# only after the startup probe has seen /health answer, for up to this long
STARTUP_BUDGET_S = 3600
PROBE_PERIOD_S = 10
# after SIGTERM the server drains for up to SHUTDOWN_TIMEOUT_S; the container manager waits a
# little longer before it SIGKILLs (Kubernetes' default is 30 s, Docker's 10 s)
STOP_GRACE_S = SHUTDOWN_TIMEOUT_S + 30
# the API key: vLLM reads VLLM_API_KEY (empty = no key). compose passes the host's variable;
# Kubernetes takes it from this Secret (`kubectl create secret generic ascend-qwen3-api-key
# --from-literal=api-key=<key>`), optional unless the profile says `api_key: required`
API_KEY_ENV = "VLLM_API_KEY"
API_KEY_SECRET, API_KEY_SECRET_KEY = "ascend-qwen3-api-key", "api-key"

COMPOSE_HEADER = """\
# Generated from deploy/profiles/*.yaml by `python -m ascend_qwen3.deploy.manifests --write`;
# do not edit by hand (tests/test_deploy_assets.py checks it is up to date).
#
# One service per single-node profile (docker compose profile "npu": started only when named)
# and `cpu`, the CPU image serving the embedded default model (the trained tiny Qwen3):
#   docker compose -f deploy/compose.yaml up cpu
#   docker compose -f deploy/compose.yaml up qwen3-32b-w8a8
# An NPU service maps the profile's NPUs and the driver paths read-only, and mounts the
# checkpoint from /data/models/<name> on the profile's model_path. The NPU services all use
# NPUs from 0 and host port 8000: run one at a time per machine.
# API key: `VLLM_API_KEY=<key> docker compose ... up ...` makes the server require
# `Authorization: Bearer <key>` on /v1 (unset or empty: no key; /health stays open).
"""

K8S_HEADER = """\
# Generated from deploy/profiles/{name}.yaml by
# `python -m ascend_qwen3.deploy.manifests --write`; do not edit by hand
# (tests/test_deploy_assets.py checks it is up to date).
#
# {description}
# Needs the Ascend device plugin (MindCluster) on the node: {n} x {resource}.
# The plugin gives the container the NPUs it allocated, which the runtime numbers 0..{last}
# (logical ids); the launcher sets ASCEND_RT_VISIBLE_DEVICES to the profile's devices unless
# the pod's environment already has it.
# The checkpoint is read from the node's hostPath {models}/{model_dir}:
# put it on every NPU node or replace the volume with a PersistentVolumeClaim. Push the image
# to your registry and set `image` to it. Not exercised here (no cluster, no NPU): written from
# the vllm-ascend and MindCluster documentation.
# API key ({key_rule}): kubectl create secret generic {secret} --from-literal={secret_key}=<key>
"""


LWS_HEADER = """\
# Generated from deploy/profiles/{name}.yaml by
# `python -m ascend_qwen3.deploy.manifests --write`; do not edit by hand
# (tests/test_deploy_assets.py checks it is up to date).
#
# {description}
# A LeaderWorkerSet (https://github.com/kubernetes-sigs/lws; install its controller first) of
# {nodes} pods, each on its own Atlas node with {n} x {resource} (the Ascend device plugin,
# MindCluster): the leader serves the API (the Service selects it only), the worker runs
# headless; each finds the leader through LWS_LEADER_ADDRESS. When one pod fails the whole
# group is recreated ({restart}); each node's launcher exits non-zero when the other node
# goes away. HCCL_IF_IP is the pod's IP; the *_IFNAME variables name {interface}, the pod
# network's interface: change them if your pods reach each other on another network.
# The checkpoint is read from the node's hostPath {models}/{model_dir}:
# put it on every NPU node or replace the volume with a PersistentVolumeClaim. Push the image
# to your registry and set `image` to it. Not exercised here (no cluster, no NPU): checked
# against the LWS CRD's schema and Kubernetes' pod schema (tests/test_k8s_schema.py); the
# two-node layout was simulated on one machine (docs/multi-node.md).
# API key ({key_rule}): kubectl create secret generic {secret} --from-literal={secret_key}=<key>
"""


class _Dumper(yaml.SafeDumper):
    """Block-style YAML without anchors/aliases (every repeated list is written out)."""

    def ignore_aliases(self, data):  # noqa: D401
        return True


def _dump(doc) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def single_node_profiles(directory: str | None = None) -> list[dict]:
    """Every valid profile that runs on one machine, sorted by name."""
    return [p for p in all_profiles(directory) if p.get("nodes", 1) == 1]


def all_profiles(directory: str | None = None) -> list[dict]:
    return [load_profile(n, directory) for n in profile_names(directory)]


def _model_dir(p: dict) -> str:
    return os.path.basename(p["model_path"].rstrip("/"))


def _checkpoints(p: dict) -> list[tuple[str, str]]:
    """(volume name, container path) of the checkpoints a profile reads: the model, and a
    speculative draft's directory when it has one; each from the host's MODELS_HOST_DIR under
    the same last path component."""
    out = [("model", p["model_path"])]
    draft = (p.get("speculative") or {}).get("model")
    if draft:
        out.append(("draft", draft))
    return out


def _compose_api_key(p: dict | None) -> dict:
    required = p is not None and p.get("api_key") == "required"
    value = (f"${{{API_KEY_ENV}:?profile {p['name']} requires an API key: set {API_KEY_ENV}}}"
             if required else f"${{{API_KEY_ENV}:-}}")
    return {API_KEY_ENV: value}


def _npu_service(p: dict) -> dict:
    port = p.get("port", CONTAINER_PORT)
    devices = [f"/dev/davinci{d}" for d in p["devices"]] + list(NPU_CONTROL_DEVICES)
    volumes = [f"{path}:{path}:ro" for path in DRIVER_MOUNTS.values()]
    volumes += [f"{MODELS_HOST_DIR}/{os.path.basename(path.rstrip('/'))}:{path}:ro"
                for _, path in _checkpoints(p)]
    return {
        "image": IMAGE,
        "build": {"context": "..", "dockerfile": "Dockerfile"},
        "profiles": ["npu"],
        "command": ["--profile", p["name"]],
        "devices": devices,
        "volumes": volumes,
        "environment": _compose_api_key(p),
        "stop_grace_period": f"{STOP_GRACE_S}s",
        "shm_size": SHM,
        "ports": [f"{port}:{port}"],
        "restart": "unless-stopped",
    }


def compose(profiles: list[dict]) -> dict:
    """The docker compose document: the given (single-node) profiles plus the CPU service."""
    services = {}
    for p in profiles:
        if p.get("nodes", 1) != 1:
            raise ValueError(f"profile {p['name']} spans {p['nodes']} nodes; compose and the "
                             f"Kubernetes Deployment are for single-node profiles")
        services[p["name"]] = _npu_service(p)
    services["cpu"] = {
        "image": CPU_IMAGE,
        "build": {"context": "..", "dockerfile": "deploy/Dockerfile.cpu"},
        "environment": _compose_api_key(None),
        "stop_grace_period": f"{STOP_GRACE_S}s",
        "shm_size": "2g",
        "ports": [f"{CONTAINER_PORT}:{CONTAINER_PORT}"],
        "restart": "unless-stopped",
    }
    return {"name": "ascend-qwen3", "services": services}


def k8s_name(p: dict) -> str:
    """The profile name as a Kubernetes object name: a Service name must be a DNS-1035 label
    (lowercase letters, digits and '-'; no '.'), so qwen3-0.6b-bf16 becomes qwen3-0-6b-bf16."""
    return p["name"].replace(".", "-")


def _labels(p: dict) -> dict:
    return {"app.kubernetes.io/name": "ascend-qwen3", "app.kubernetes.io/instance": k8s_name(p)}


def _probes() -> dict:
    """Start-up, readiness and liveness on the server's /health."""
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": PROBE_PERIOD_S,
             "timeoutSeconds": 5}
    return {"startupProbe": {**probe, "failureThreshold": STARTUP_BUDGET_S // PROBE_PERIOD_S},
            "readinessProbe": {**probe, "failureThreshold": 3},
            "livenessProbe": {**probe, "periodSeconds": 30, "failureThreshold": 5}}


def _volumes(p: dict) -> tuple[list[dict], list[dict]]:
    """(pod volumes, container mounts): the driver paths, the checkpoint, /dev/shm."""
    volumes, mounts = [], []
    for name, path in DRIVER_MOUNTS.items():
        volumes.append({"name": name, "hostPath": {"path": path}})
        mounts.append({"name": name, "mountPath": path, "readOnly": True})
    for name, path in _checkpoints(p):
        volumes.append({"name": name, "hostPath": {
            "path": f"{MODELS_HOST_DIR}/{os.path.basename(path.rstrip('/'))}", "type": "Directory"}})
        mounts.append({"name": name, "mountPath": path, "readOnly": True})
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_K8S}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _container(p: dict, args: list[str], ports: list[dict], env: list[dict], mounts: list[dict]
               ) -> dict:
    n = len(p["devices"])
    return {
        "name": "server",
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "args": ["--profile", p["name"], *args],
        "ports": ports,
        "env": [{"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": API_KEY_SECRET, "key": API_KEY_SECRET_KEY,
            "optional": p.get("api_key", "optional") != "required"}}}, *env],
        "resources": {"requests": {NPU_RESOURCE: n}, "limits": {NPU_RESOURCE: n}},
        "volumeMounts": mounts,
    }


def _service(p: dict, selector: dict, suffix: str = "") -> dict:
    port = p.get("port", CONTAINER_PORT)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": k8s_name(p) + suffix, "labels": _labels(p)},
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "http", "port": port, "targetPort": "http"}]},
    }


def k8s(p: dict) -> list[dict]:
    """[Deployment, Service] serving one single-node profile on Ascend NPUs; for a multi-node
    profile [LeaderWorkerSet, Service] (``lws``)."""
    if p.get("nodes", 1) != 1:
        return lws(p)
    port = p.get("port", CONTAINER_PORT)
    labels = _labels(p)
    volumes, mounts = _volumes(p)
    container = {**_container(p, [], [{"name": "http", "containerPort": port}], [], mounts),
                 **_probes()}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": k8s_name(p), "labels": labels},
        "spec": {
            "replicas": 1,
            # NPUs are exclusive: a rolling update would need a second set of them
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"terminationGracePeriodSeconds": STOP_GRACE_S,
                                  "containers": [container], "volumes": volumes}},
        },
    }
    return [deployment, _service(p, labels)]


# Kubernetes network settings of a node's pod (the launcher refuses to start a multi-node
# server without them): HCCL_IF_IP is the pod's own IP (the downward API), the interfaces are
# the pod network's (eth0 in a pod with the cluster's default network). A cluster that gives
# the pods a second, faster network names that interface here instead.
POD_INTERFACE = "eth0"
LWS_RESTART = "RecreateGroupOnPodRestart"


def lws(p: dict) -> list[dict]:
    """[LeaderWorkerSet, Service] for a multi-node profile: one group of ``nodes`` pods (the
    leader: node 0 with the API server, probes and the Service; the workers: headless), each
    pod the NPUs, mounts, Secret and grace period of the single-node Deployments, the group
    recreated as a whole when one pod fails."""
    from .launcher import DP_RPC_PORT
    nodes = p.get("nodes", 1)
    if nodes < 2:
        raise ValueError(f"profile {p['name']} runs on one node: it is a Deployment (k8s)")
    port = p.get("port", CONTAINER_PORT)
    labels = _labels(p)
    leader_labels = {**labels, "app.kubernetes.io/component": "leader"}
    worker_labels = {**labels, "app.kubernetes.io/component": "worker"}
    volumes, mounts = _volumes(p)
    network = [{"name": "HCCL_IF_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    network += [{"name": k, "value": POD_INTERFACE} for k in MULTI_NODE_ENV if k != "HCCL_IF_IP"]
    leader_ports = [{"name": "http", "containerPort": port},
                    {"name": "dp-rpc", "containerPort": p.get("dp_rpc_port", DP_RPC_PORT)},
                    {"name": "peers", "containerPort": PEER_PORT}]

    def pod(labels_: dict, container: dict) -> dict:
        return {"metadata": {"labels": labels_},
                "spec": {"terminationGracePeriodSeconds": STOP_GRACE_S,
                         "containers": [container], "volumes": volumes}}

    # the leader address comes from LWS_LEADER_ADDRESS in each pod (the launcher reads it)
    leader = {**_container(p, ["--node-rank", "0"], leader_ports, network, mounts), **_probes()}
    worker = _container(p, ["--node-rank", "1"], [], network, mounts)
    del worker["ports"]
    group = {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": k8s_name(p), "labels": labels},
        "spec": {
            "replicas": 1,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": nodes,
                "restartPolicy": LWS_RESTART,
                "leaderTemplate": pod(leader_labels, leader),
                "workerTemplate": pod(worker_labels, worker),
            },
        },
    }
    # the LWS controller makes a headless Service named like the group (the pods' DNS names,
    # LWS_LEADER_ADDRESS): the API's Service takes another name
    return [group, _service(p, leader_labels, "-leader")]


def render(directory: str | None = None) -> dict[str, str]:
    """{path relative to deploy/: file text} for every generated manifest."""
    profiles = all_profiles(directory)
    out = {"compose.yaml": COMPOSE_HEADER + _dump(compose(
        [p for p in profiles if p.get("nodes", 1) == 1]))}
    for p in profiles:
        template = K8S_HEADER if p.get("nodes", 1) == 1 else LWS_HEADER
        header = template.format(name=p["name"], description=p.get("description", p["name"]),
                                   n=len(p["devices"]), last=len(p["devices"]) - 1,
                                   resource=NPU_RESOURCE,
                                   models=MODELS_HOST_DIR, model_dir=" and ".join(
                                       os.path.basename(path.rstrip("/"))
                                       for _, path in _checkpoints(p)),
                                   key_rule=("required" if p.get("api_key") == "required" else
                                             "optional: no Secret, no key"),
                                   secret=API_KEY_SECRET, secret_key=API_KEY_SECRET_KEY,
                                   nodes=p.get("nodes", 1), restart=LWS_RESTART,
                                   interface=POD_INTERFACE)
        body = "".join("---\n" + _dump(doc) for doc in k8s(p))
        out[f"k8s/{p['name']}.yaml"] = header + body
    return out


def default_out_dir() -> str:
    """deploy/ of the source tree this module lives in."""
    return os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "deploy"))


def stale(out_dir: str | None = None, directory: str | None = None) -> list[str]:
    """Paths under out_dir whose content differs from the generated one, is missing, or is a
    k8s manifest no profile generates."""
    out_dir = out_dir or default_out_dir()
    files = render(directory)
    bad = []
    for rel, text in files.items():
        path = os.path.join(out_dir, rel)
        if not os.path.isfile(path):
            bad.append(f"{rel} (missing)")
            continue
        with open(path) as f:
            if f.read() != text:
                bad.append(f"{rel} (differs)")
    k8s_dir = os.path.join(out_dir, "k8s")
    if os.path.isdir(k8s_dir):
        for name in sorted(os.listdir(k8s_dir)):
            if f"k8s/{name}" not in files:
                bad.append(f"k8s/{name} (no profile generates it)")
    return bad


def render_all(out_dir: str | None = None, directory: str | None = None) -> list[str]:
    """Write every manifest under out_dir (default: the source tree's deploy/), remove k8s
    manifests of profiles that no longer exist; return the paths written."""
    out_dir = out_dir or default_out_dir()
    files = render(directory)
    written = []
    os.makedirs(os.path.join(out_dir, "k8s"), exist_ok=True)
    for rel, text in files.items():
        path = os.path.join(out_dir, rel)
        with open(path, "w") as f:
            f.write(text)
        written.append(path)
    k8s_dir = os.path.join(out_dir, "k8s")
    for name in os.listdir(k8s_dir):
        if name.endswith(".yaml") and f"k8s/{name}" not in files:
            os.remove(os.path.join(k8s_dir, name))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ascend_qwen3.deploy.manifests",
                                 description="compose and Kubernetes manifests from the profiles")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if a committed file is stale")
    mode.add_argument("--write", action="store_true", help="regenerate the files")
    ap.add_argument("--out", default=None, help="deploy directory (default: the source tree's)")
    args = ap.parse_args(argv)
    if args.write:
        for path in render_all(args.out):
            print(path)
        return 0
    bad = stale(args.out)
    if bad:
        print("stale manifests (run `python -m ascend_qwen3.deploy.manifests --write`):\n  "
              + "\n  ".join(bad), file=sys.stderr)
        return 1
    print("manifests up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
