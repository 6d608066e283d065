"""Schema validation of Kubernetes manifests, offline, for the test suite.

    problems(docs) -> list[str]     # human-readable errors; [] = valid

What is checked, per document:

* core kinds (Deployment, Service, ConfigMap, PodTemplate, ...): the JSON schemas that
  kubernetes-validate bundles (https://pypi.org/project/kubernetes-validate/, release 1.37.0;
  source https://github.com/willthames/kubernetes-validate), through its Python API
  `kubernetes_validate.validate(doc, version, strict=True)`, against KUBERNETES_VERSION.
  Strict = the "-local-strict" schemas, whose objects have `additionalProperties: false`, so an
  unknown (e.g. misspelled) field is an error, as with `kubectl apply --validate=strict`.
  kubernetes-validate raises on the first error it finds, so at most one schema error is
  reported per object;
* `leaderworkerset.x-k8s.io/v1` LeaderWorkerSet: `jsonschema` against the v1
  openAPIV3Schema of the LeaderWorkerSet CRD of kubernetes-sigs/lws (release v0.10.0,
  config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml, kept unchanged with its
  licence in tests/data/lws/), made strict on a copy (see strict_crd_schema); its metadata
  as a core ObjectMeta; its pod templates (spec.leaderWorkerTemplate.leaderTemplate and
  .workerTemplate) each as a core `v1 PodTemplate` through kubernetes-validate, strict;
* what the API server checks beyond the OpenAPI schema and these schemas cannot express
  (value_problems): the schemas kubernetes-validate bundles come from the OpenAPI v2 document,
  which lists no enums, so e.g. `restartPolicy: Sometimes` passes them. A short table of
  enumerated fields (values as documented in the Kubernetes API reference,
  https://kubernetes.io/docs/reference/kubernetes-api/), names (DNS-1123 / DNS-1035, see
  https://kubernetes.io/docs/concepts/overview/working-with-objects/names/), resource
  quantities, and a controller's selector matching its pod template's labels;
* an apiVersion/kind with no schema (neither a core kind of KUBERNETES_VERSION nor the LWS
  CRD) is an error, never passed silently.

No cluster, no network: everything is on disk.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from typing import Any, Iterable

import jsonschema
import kubernetes_validate
import yaml

# kubernetes-validate 1.37.0 bundles schemas for Kubernetes 1.25 ... 1.37 (the .0 release of
# each minor, plain and "-strict"). 1.36: the Kubernetes API that the LWS release below is
# built against (its go.mod: k8s.io/api v0.36.3), so the pod template inside its CRD and the
# core PodTemplate schema here describe the same PodSpec; a released, supported minor, and
# not the newest one, which clusters pick up last.
KUBERNETES_VERSION = "1.36"

HERE = os.path.dirname(os.path.abspath(__file__))
# https://github.com/kubernetes-sigs/lws/blob/v0.10.0/config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml
LWS_CRD = os.path.join(HERE, "data", "lws", "leaderworkerset.x-k8s.io_leaderworkersets.yaml")
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_KIND = "LeaderWorkerSet"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1.3 MB: libyaml if present


# --- reading manifests -------------------------------------------------------------------------

def load_manifest(path: str) -> list[dict]:
    """The documents of a (multi-document) YAML file, empty documents left out."""
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]


def problems_in_file(path: str) -> list[str]:
    """problems() of the documents of a YAML file, each prefixed with the file's name."""
    name = os.path.basename(path)
    return [f"{name}: {p}" for p in problems(load_manifest(path))]


# --- the entry point ---------------------------------------------------------------------------

def problems(docs: Iterable[Any]) -> list[str]:
    """Human-readable errors for the Kubernetes objects `docs` (parsed YAML); [] when all are
    valid. None entries (empty YAML documents) are skipped."""
    out: list[str] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        out.extend(object_problems(doc, index=i))
    return out


def object_problems(doc: Any, index: int = 0) -> list[str]:
    """Errors of one object, each prefixed with `Kind/name`."""
    if not isinstance(doc, dict):
        return [f"document {index}: not a mapping but {type(doc).__name__}"]
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    name = _get(doc, ("metadata", "name"))
    label = f"{kind or '?'}/{name or f'<document {index}>'}"
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [f"{label}: apiVersion and kind must both be set (strings)"]
    if (api_version, kind) == (LWS_API_VERSION, LWS_KIND):
        found = lws_problems(doc)
    elif kind == LWS_KIND or api_version.startswith("leaderworkerset.x-k8s.io/"):
        return [f"{label}: unknown apiVersion/kind {api_version} {kind}: the LWS CRD here "
                f"({os.path.basename(LWS_CRD)}) serves only {LWS_API_VERSION} {LWS_KIND}"]
    else:
        found = core_problems(doc)
        if found and found[0].startswith("unknown apiVersion/kind"):
            return [f"{label}: {found[0]}"]
    found += metadata_problems(doc) + value_problems(doc)
    return [f"{label}: {p}" for p in found]


# --- core kinds: kubernetes-validate -----------------------------------------------------------

def core_problems(doc: dict) -> list[str]:
    """The strict kubernetes-validate check of a core object (at most one error: the first)."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"unknown apiVersion/kind {doc.get('apiVersion')} {doc.get('kind')}: no schema "
                f"for it in Kubernetes {KUBERNETES_VERSION} (kubernetes-validate)"]
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e.absolute_path) or '<root>'}: {e.message} "
                f"[Kubernetes {e.version} schema, strict]"]
    return []


# --- LeaderWorkerSet: the CRD's schema, made strict -------------------------------------------

def strict_crd_schema(schema: dict) -> dict:
    """A copy of a CRD's openAPIV3Schema that rejects unknown fields the way the API server does
    for `kubectl --validate=strict`: an object schema that lists `properties`, without
    `x-kubernetes-preserve-unknown-fields: true` and without `additionalProperties`, gets
    `additionalProperties: false`. Also, for jsonschema, which does not know these OpenAPI
    extensions: `x-kubernetes-int-or-string: true` becomes "an integer or a string", and
    `nullable: true` admits null."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if ("properties" in node and "additionalProperties" not in node
                and node.get("x-kubernetes-preserve-unknown-fields") is not True):
            node["additionalProperties"] = False
        if node.get("x-kubernetes-int-or-string") is True and "anyOf" not in node:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable") is True and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        for key, value in node.items():
            if key in ("properties", "patternProperties", "definitions", "$defs"):
                for sub in value.values():
                    walk(sub)
            elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
                walk(value)

    walk(schema)
    return schema


@functools.lru_cache(maxsize=None)
def lws_crd() -> dict:
    """The LeaderWorkerSet CRD (parsed, as stored)."""
    with open(LWS_CRD) as f:
        return yaml.load(f, Loader=_Loader)


def lws_schema(version: str = "v1") -> dict:
    """The openAPIV3Schema of `version` of the LWS CRD, as published (not strict)."""
    for v in lws_crd()["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"the LWS CRD has no version {version}")


@functools.lru_cache(maxsize=None)
def _lws_validator() -> jsonschema.protocols.Validator:
    # an OpenAPI v3 (structural) schema: no $schema; draft 2020-12 reads all its keywords alike
    return jsonschema.Draft202012Validator(strict_crd_schema(lws_schema("v1")))


def lws_problems(doc: dict) -> list[str]:
    """A LeaderWorkerSet against the strict CRD schema, and its pod templates as core
    PodTemplates (metadata and value checks are done by object_problems)."""
    out = []
    errors = sorted(_lws_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    for e in errors:
        out.append(f"{_path(e.absolute_path) or '<root>'}: {e.message} [LWS CRD v1 schema, strict]")
    lwt = _get(doc, ("spec", "leaderWorkerTemplate"))
    if isinstance(lwt, dict):
        name = (doc.get("metadata") or {}).get("name") or "lws"
        for which in ("leaderTemplate", "workerTemplate"):
            template = lwt.get(which)
            if isinstance(template, dict):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": f"{name}-{which.lower()}"}, "template": template}
                # errors come back at template.<...>; report them where they are in the LWS
                out += [re.sub(r"^template", f"spec.leaderWorkerTemplate.{which}", p)
                        for p in core_problems(wrapped)]
    return out


def sample_lws(name: str = "qwen3-sample", size: int = 2,
               image: str = "ascend-qwen3:0.1.0") -> dict:
    """A small valid LeaderWorkerSet: one group of `size` pods (a leader and size-1 workers),
    a container each, the whole group recreated when one of its pods restarts."""
    def template(role: str) -> dict:
        return {
            "metadata": {"labels": {"app.kubernetes.io/name": "ascend-qwen3",
                                    "app.kubernetes.io/instance": name, "role": role}},
            "spec": {"containers": [{
                "name": role,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "args": ["--profile", name],
                "ports": [{"name": "http", "containerPort": 8000}],
                "resources": {"limits": {"cpu": "2", "memory": "4Gi"}},
            }]},
        }

    return {
        "apiVersion": LWS_API_VERSION,
        "kind": LWS_KIND,
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "ascend-qwen3"}},
        "spec": {
            "replicas": 1,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": size,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": template("leader"),
                "workerTemplate": template("worker"),
            },
        },
    }


# --- metadata ----------------------------------------------------------------------------------

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")            # at most 63
DNS1123_SUBDOMAIN = re.compile(                                         # at most 253
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")              # at most 63

# kinds whose names must be DNS-1035 labels (start with a letter): a Service (Kubernetes docs,
# "Object Names and IDs"); a LeaderWorkerSet, whose name also names its headless Service (the
# LWS webhook, pkg/webhooks/leaderworkerset_webhook.go at v0.10.0). Other kinds: DNS-1123
# subdomains.
_DNS1035_KINDS = {("v1", "Service"), (LWS_API_VERSION, LWS_KIND)}


def name_problem(name: Any, rule: str = "subdomain") -> str | None:
    """Why `name` is not a valid DNS-1123 subdomain / DNS-1123 label / DNS-1035 label, or None."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if rule == "subdomain":
        ok, limit, what = DNS1123_SUBDOMAIN.match(name), 253, "a DNS-1123 subdomain (lower-case " \
            "letters, digits, '-' and '.', starting and ending with a letter or digit)"
    elif rule == "label":
        ok, limit, what = DNS1123_LABEL.match(name), 63, "a DNS-1123 label (lower-case letters, " \
            "digits and '-', starting and ending with a letter or digit)"
    else:
        ok, limit, what = DNS1035_LABEL.match(name), 63, "a DNS-1035 label (lower-case letters, " \
            "digits and '-', starting with a letter, ending with a letter or digit)"
    if not ok:
        return f"{name!r} is not {what}"
    if len(name) > limit:
        return f"{name!r} is longer than {limit} characters"
    return None


def metadata_problems(doc: dict) -> list[str]:
    """metadata: present, with a valid name (and namespace); for a LeaderWorkerSet, whose
    CRD schema says only `metadata: {type: object}`, also the core ObjectMeta schema."""
    md = doc.get("metadata")
    if not isinstance(md, dict):
        return ["metadata: missing (it needs at least a name)"]
    out = []
    if "name" not in md:
        out.append("metadata.name: missing")
    else:
        rule = "dns1035" if (doc.get("apiVersion"), doc.get("kind")) in _DNS1035_KINDS else "subdomain"
        why = name_problem(md["name"], rule)
        if why:
            out.append(f"metadata.name: {why}")
    if "namespace" in md:
        why = name_problem(md["namespace"], "label")
        if why:
            out.append(f"metadata.namespace: {why}")
    if (doc.get("apiVersion"), doc.get("kind")) == (LWS_API_VERSION, LWS_KIND):
        # the ObjectMeta schema through a ConfigMap, which is nothing but metadata + data
        out += core_problems({"apiVersion": "v1", "kind": "ConfigMap", "metadata": md})
    return out


# --- values the API server checks and the schemas don't ---------------------------------------

# Enumerated values, from the Kubernetes API reference (the OpenAPI v2 document that
# kubernetes-validate's schemas come from has them only in descriptions).
RESTART_POLICIES = {"Always", "OnFailure", "Never"}
DNS_POLICIES = {"ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"}
PULL_POLICIES = {"Always", "Never", "IfNotPresent"}
PROTOCOLS = {"TCP", "UDP", "SCTP"}
TERMINATION_MESSAGE_POLICIES = {"File", "FallbackToLogsOnError"}
PROBE_SCHEMES = {"HTTP", "HTTPS"}
HOST_PATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket",
                   "CharDevice", "BlockDevice"}
SERVICE_TYPES = {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"}
SESSION_AFFINITIES = {"None", "ClientIP"}
TRAFFIC_POLICIES = {"Cluster", "Local"}
DEPLOYMENT_STRATEGIES = {"Recreate", "RollingUpdate"}
# a Quantity (resource requests and limits, emptyDir sizeLimit): a signed decimal number with
# an optional binary-SI (Ki ... Ei), decimal-SI (n u m k M G T P E) or exponent (e3) suffix
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")

# where the pod spec is, per kind, and the restart policies allowed there. Deployments,
# ReplicaSets, StatefulSets and DaemonSets only run restartPolicy Always; so do a
# LeaderWorkerSet's templates, which its controller turns into StatefulSets.
_APPS = {"Always"}
_POD_SPECS: dict[tuple[str, str], list[tuple[tuple[str, ...], set[str]]]] = {
    ("apps/v1", "Deployment"): [(("spec", "template", "spec"), _APPS)],
    ("apps/v1", "ReplicaSet"): [(("spec", "template", "spec"), _APPS)],
    ("apps/v1", "StatefulSet"): [(("spec", "template", "spec"), _APPS)],
    ("apps/v1", "DaemonSet"): [(("spec", "template", "spec"), _APPS)],
    ("batch/v1", "Job"): [(("spec", "template", "spec"), {"OnFailure", "Never"})],
    ("batch/v1", "CronJob"): [(("spec", "jobTemplate", "spec", "template", "spec"), {"OnFailure", "Never"})],
    ("v1", "Pod"): [(("spec",), RESTART_POLICIES)],
    ("v1", "PodTemplate"): [(("template", "spec"), RESTART_POLICIES)],
    (LWS_API_VERSION, LWS_KIND): [
        (("spec", "leaderWorkerTemplate", "leaderTemplate", "spec"), _APPS),
        (("spec", "leaderWorkerTemplate", "workerTemplate", "spec"), _APPS)],
}
_SELECTING = {("apps/v1", k) for k in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet")}


def value_problems(doc: dict) -> list[str]:
    """Enumerated values, names, quantities and selectors of `doc` (its pod specs, a Service,
    a Deployment's strategy) that the API server would reject; type errors are left to the
    schemas (anything of an unexpected type is skipped here)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    out: list[str] = []
    for path, restart in _POD_SPECS.get(key, []):
        spec = _get(doc, path)
        if isinstance(spec, dict):
            out += _pod_spec_problems(spec, ".".join(path), restart)
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    if key == ("apps/v1", "Deployment"):
        _enum(out, spec, ("strategy", "type"), DEPLOYMENT_STRATEGIES, "spec")
    if key in _SELECTING:
        selector = _get(spec, ("selector", "matchLabels"))
        labels = _get(spec, ("template", "metadata", "labels")) or {}
        if isinstance(selector, dict) and isinstance(labels, dict):
            missing = {k: v for k, v in selector.items() if labels.get(k) != v}
            if missing:
                out.append(f"spec.selector.matchLabels: {missing} not among "
                           "spec.template.metadata.labels (the selector must match the template)")
    if key == ("v1", "Service"):
        _enum(out, spec, ("type",), SERVICE_TYPES, "spec")
        _enum(out, spec, ("sessionAffinity",), SESSION_AFFINITIES, "spec")
        _enum(out, spec, ("externalTrafficPolicy",), TRAFFIC_POLICIES, "spec")
        _enum(out, spec, ("internalTrafficPolicy",), TRAFFIC_POLICIES, "spec")
        for i, port in _items(spec.get("ports")):
            _enum(out, port, ("protocol",), PROTOCOLS, f"spec.ports[{i}]")
    return out


def _pod_spec_problems(spec: dict, where: str, restart: set[str]) -> list[str]:
    out: list[str] = []
    _enum(out, spec, ("restartPolicy",), restart, where)
    _enum(out, spec, ("dnsPolicy",), DNS_POLICIES, where)
    for field in ("initContainers", "containers"):
        for i, c in _items(spec.get(field)):
            at = f"{where}.{field}[{i}]"
            if "name" in c:
                why = name_problem(c["name"], "label")
                if why:
                    out.append(f"{at}.name: {why}")
            _enum(out, c, ("imagePullPolicy",), PULL_POLICIES, at)
            _enum(out, c, ("terminationMessagePolicy",), TERMINATION_MESSAGE_POLICIES, at)
            for j, port in _items(c.get("ports")):
                _enum(out, port, ("protocol",), PROTOCOLS, f"{at}.ports[{j}]")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                _enum(out, c, (probe, "httpGet", "scheme"), PROBE_SCHEMES, at)
            for bound in ("requests", "limits"):
                amounts = _get(c, ("resources", bound))
                if isinstance(amounts, dict):
                    for res, q in amounts.items():
                        out += _quantity(q, f"{at}.resources.{bound}.{res}")
    for i, v in _items(spec.get("volumes")):
        at = f"{where}.volumes[{i}]"
        _enum(out, v, ("hostPath", "type"), HOST_PATH_TYPES, at)
        medium = _get(v, ("emptyDir", "medium"))
        if isinstance(medium, str) and medium not in ("", "Memory", "HugePages") \
                and not medium.startswith("HugePages-"):
            out.append(f"{at}.emptyDir.medium: unsupported value {medium!r}: "
                       "supported: '', 'Memory', 'HugePages', 'HugePages-<size>'")
        if _get(v, ("emptyDir", "sizeLimit")) is not None:
            out += _quantity(_get(v, ("emptyDir", "sizeLimit")), f"{at}.emptyDir.sizeLimit")
    return out


# --- small helpers -----------------------------------------------------------------------------

def _get(node: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _items(value: Any) -> list[tuple[int, dict]]:
    return [(i, x) for i, x in enumerate(value) if isinstance(x, dict)] if isinstance(value, list) else []


def _enum(out: list[str], node: Any, path: tuple[str, ...], allowed: set[str], where: str) -> None:
    value = _get(node, path)
    if isinstance(value, str) and value not in allowed:
        out.append(f"{where}.{'.'.join(path)}: unsupported value {value!r}: supported: "
                   + ", ".join(repr(a) for a in sorted(allowed)))


def _quantity(q: Any, where: str) -> list[str]:
    if isinstance(q, bool) or not isinstance(q, (int, float, str)):
        return []  # a type error: the schema's
    if isinstance(q, str) and not QUANTITY.match(q):
        return [f"{where}: {q!r} is not a quantity (e.g. 8, 500m, 4Gi)"]
    return []


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out

