"""Schema validation of the Kubernetes manifests (tests/k8s_schema.py), offline:

- every committed deploy/k8s/*.yaml (a Deployment or, for the two-node profile, a
  LeaderWorkerSet, and a Service) is valid, strictly, for the
  pinned Kubernetes version (the schemas bundled by kubernetes-validate,
  https://pypi.org/project/kubernetes-validate/);
- planted mistakes are reported: an unknown (misspelled) field, a wrong type, a restartPolicy a
  Deployment cannot have, unknown apiVersion/kind;
- a LeaderWorkerSet (sample_lws) is valid against the CRD of kubernetes-sigs/lws v0.10.0
  (config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml, in tests/data/lws/) made
  strict, with its pod templates as core PodTemplates; planted mistakes there are reported too.
"""

from __future__ import annotations

import copy
import glob
import os

import pytest
import yaml

from tests import k8s_schema
from tests.k8s_schema import LWS_CRD, problems, problems_in_file, sample_lws, strict_crd_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFESTS = sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml")))
SAMPLE = os.path.join(ROOT, "deploy", "k8s", "qwen3-8b-bf16.yaml")


def _reported(found: list[str], *needles: str) -> bool:
    """Some problem mentions all of `needles`."""
    return any(all(n in p for n in needles) for p in found)


# --- the set-up --------------------------------------------------------------------------------

def test_pinned_kubernetes_version_is_bundled():
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions

    bundled = all_versions()  # 1.25.0 ... 1.37.0 in kubernetes-validate 1.37.0
    assert f"{k8s_schema.KUBERNETES_VERSION}.0" in bundled, bundled
    # a valid object validates against exactly the pinned minor, not an older fallback
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    assert kubernetes_validate.validate(cm, k8s_schema.KUBERNETES_VERSION, strict=True) \
        == k8s_schema.KUBERNETES_VERSION


def test_lws_crd_is_stored_with_its_source_and_licence():
    folder = os.path.dirname(LWS_CRD)
    with open(os.path.join(folder, "SOURCE.md")) as f:
        source = f.read()
    for needle in ("kubernetes-sigs/lws", "v0.10.0", "Apache-2.0",
                   "config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml"):
        assert needle in source
    with open(os.path.join(folder, "LICENSE")) as f:
        assert "Apache License" in f.read(200)
    crd = k8s_schema.lws_crd()
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "leaderworkerset.x-k8s.io"
    assert crd["spec"]["names"]["kind"] == "LeaderWorkerSet"
    assert "v1" in [v["name"] for v in crd["spec"]["versions"]]


def test_strict_transform_works_on_a_copy():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"x": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"y": {"type": "integer"}}}},
        "port": {"x-kubernetes-int-or-string": True},
    }}
    before = copy.deepcopy(schema)
    strict = strict_crd_schema(schema)
    assert schema == before
    assert strict["additionalProperties"] is False
    assert strict["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]["open"]
    assert strict["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert strict["properties"]["list"]["items"]["additionalProperties"] is False
    # the stored CRD is untouched by the checks (a fresh parse equals the cached one)
    with open(LWS_CRD) as f:
        assert yaml.load(f, Loader=k8s_schema._Loader) == k8s_schema.lws_crd()


# --- the committed manifests -------------------------------------------------------------------

def test_there_are_manifests():
    assert len(MANIFESTS) >= 10


@pytest.mark.parametrize("path", MANIFESTS, ids=os.path.basename)
def test_committed_manifest_is_valid(path):
    docs = k8s_schema.load_manifest(path)
    assert sorted(d["kind"] for d in docs) in (["Deployment", "Service"],
                                               ["LeaderWorkerSet", "Service"])
    assert problems_in_file(path) == []


# --- planted mistakes in a Deployment / Service ------------------------------------------------

def _deployment_and_service():
    docs = k8s_schema.load_manifest(SAMPLE)
    return docs, next(d for d in docs if d["kind"] == "Deployment"), \
        next(d for d in docs if d["kind"] == "Service")


def test_misspelled_container_key():
    docs, dep, _ = _deployment_and_service()
    container = dep["spec"]["template"]["spec"]["containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")
    found = problems(docs)
    assert _reported(found, "Deployment/", "spec.template.spec.containers[0]", "imagePulPolicy",
                     "strict"), found


@pytest.mark.parametrize("value", ["Sometimes", "Never", "OnFailure", "always"])
def test_bad_restart_policy_in_a_deployment(value):
    docs, dep, _ = _deployment_and_service()
    dep["spec"]["template"]["spec"]["restartPolicy"] = value
    found = problems(docs)
    assert _reported(found, "spec.template.spec.restartPolicy", repr(value)), found


def test_restart_policy_always_is_fine():
    docs, dep, _ = _deployment_and_service()
    dep["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    assert problems(docs) == []


@pytest.mark.parametrize("mutate, needles", [
    (lambda dep, svc: dep["spec"].__setitem__("replicas", "1"),
     ("spec.replicas", "'1' is not of type 'integer'")),
    (lambda dep, svc: dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]
     .__setitem__("containerPort", "8000"), ("containerPort", "is not of type")),
    (lambda dep, svc: dep["spec"]["template"]["spec"].__setitem__("volumes", {"name": "x"}),
     ("spec.template.spec.volumes", "is not of type 'array'")),
    (lambda dep, svc: dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .__setitem__("memory", "4GB"), ("resources.limits.memory", "not a quantity")),
    (lambda dep, svc: dep["spec"].__setitem__("strategy", {"type": "Rolling"}),
     ("spec.strategy.type", "'Rolling'")),
    (lambda dep, svc: dep["spec"]["selector"]["matchLabels"]
     .__setitem__("app.kubernetes.io/instance", "other"),
     ("spec.selector.matchLabels", "must match the template")),
    (lambda dep, svc: dep["metadata"].__setitem__("name", "Qwen3_8B"), ("metadata.name", "DNS-1123")),
    (lambda dep, svc: dep["metadata"].pop("name"), ("metadata.name: missing",)),
    (lambda dep, svc: dep["metadata"].__setitem__("lables", {}), ("metadata", "'lables' was unexpected")),
    (lambda dep, svc: svc["spec"].__setitem__("type", "Cluster"), ("Service/", "spec.type", "'Cluster'")),
    (lambda dep, svc: svc["spec"]["ports"][0].__setitem__("prot", "TCP"),
     ("Service/", "'prot' was unexpected")),
    (lambda dep, svc: svc["metadata"].__setitem__("name", "8b-server"), ("Service/", "DNS-1035")),
    (lambda dep, svc: dep.__setitem__("apiVersion", "apps/v1beta2"),
     ("unknown apiVersion/kind apps/v1beta2 Deployment",)),
    (lambda dep, svc: svc.__setitem__("kind", "Servce"), ("unknown apiVersion/kind v1 Servce",)),
    (lambda dep, svc: dep.pop("kind"), ("apiVersion and kind must both be set",)),
], ids=["replicas-string", "port-string", "volumes-not-list", "bad-quantity", "bad-strategy",
        "selector-mismatch", "bad-name", "no-name", "misspelled-metadata", "bad-service-type",
        "misspelled-service-port-key", "service-name-dns1035", "unknown-apiversion",
        "unknown-kind", "no-kind"])
def test_planted_mistakes_are_reported(mutate, needles):
    docs, dep, svc = _deployment_and_service()
    mutate(dep, svc)
    found = problems(docs)
    assert _reported(found, *needles), found


def test_empty_documents_are_skipped_and_non_mappings_reported():
    docs, _, _ = _deployment_and_service()
    assert problems([None] + docs + [None]) == []
    assert _reported(problems(docs + ["text"]), "not a mapping")


# --- LeaderWorkerSet ---------------------------------------------------------------------------

def test_sample_lws_is_valid():
    lws = sample_lws()
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert len(lwt["leaderTemplate"]["spec"]["containers"]) == 1
    assert len(lwt["workerTemplate"]["spec"]["containers"]) == 1
    assert problems([lws]) == []
    # and as YAML, next to a Service, the way a generated manifest would be read back
    _, _, svc = _deployment_and_service()
    text = yaml.safe_dump_all([lws, svc], sort_keys=False)
    assert problems(list(yaml.safe_load_all(text))) == []


@pytest.mark.parametrize("policy", ["Default", "RecreateGroupAfterStart", "None"])
def test_other_lws_restart_policies_are_valid(policy):
    lws = sample_lws()
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = policy
    assert problems([lws]) == []


def test_lws_worker_template_only_is_valid():
    lws = sample_lws(size=4)
    del lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    assert problems([lws]) == []


def _worker_container(lws):
    return lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]


def test_lws_misspelled_key_under_leader_worker_template():
    lws = sample_lws()
    lwt = lws["spec"]["leaderWorkerTemplate"]
    lwt["restartPolicyy"] = lwt.pop("restartPolicy")
    found = problems([lws])
    assert _reported(found, "LeaderWorkerSet/qwen3-sample", "spec.leaderWorkerTemplate:",
                     "'restartPolicyy' was unexpected", "LWS CRD"), found


def test_lws_bad_restart_policy():
    lws = sample_lws()
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "RecreateGroupOnRestart"
    found = problems([lws])
    assert _reported(found, "spec.leaderWorkerTemplate.restartPolicy", "'RecreateGroupOnRestart'",
                     "is not one of"), found


def test_lws_misspelled_key_in_the_worker_container():
    lws = sample_lws()
    container = _worker_container(lws)
    container["imagePulPolicy"] = container.pop("imagePullPolicy")
    found = problems([lws])
    where = "spec.leaderWorkerTemplate.workerTemplate.spec.containers[0]"
    # both the CRD's embedded pod schema and the core PodTemplate check see it
    assert _reported(found, where, "'imagePulPolicy' was unexpected", "LWS CRD"), found
    assert _reported(found, where, "'imagePulPolicy' was unexpected", "Kubernetes"), found


def test_lws_template_checked_as_a_core_pod_template():
    """What only the core check sees: the CRD's template metadata is loose; the PodTemplate's
    ObjectMeta is not."""
    lws = sample_lws()
    lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]["role"] = 1
    found = problems([lws])
    assert _reported(found, "spec.leaderWorkerTemplate.leaderTemplate.metadata.labels.role"), found


@pytest.mark.parametrize("mutate, needles", [
    (lambda lws: lws["spec"]["leaderWorkerTemplate"].__setitem__("size", "2"),
     ("spec.leaderWorkerTemplate.size", "is not of type 'integer'")),
    (lambda lws: lws["spec"].__setitem__("startupPolicy", "LeaderStarted"), ("spec.startupPolicy",)),
    (lambda lws: lws["spec"]["leaderWorkerTemplate"].pop("workerTemplate"),
     ("'workerTemplate' is a required property",)),
    (lambda lws: lws.__setitem__("specs", {}), ("'specs' was unexpected",)),
    (lambda lws: lws["metadata"].__setitem__("name", "2-nodes"), ("metadata.name", "DNS-1035")),
    (lambda lws: lws["metadata"].__setitem__("lables", {}), ("metadata", "'lables' was unexpected")),
    (lambda lws: lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
     .__setitem__("restartPolicy", "Never"), ("workerTemplate.spec.restartPolicy", "'Never'")),
    (lambda lws: _worker_container(lws)["resources"]["limits"].__setitem__("memory", "4 GiB"),
     ("workerTemplate.spec.containers[0].resources.limits.memory", "not a quantity")),
    (lambda lws: lws.__setitem__("apiVersion", "leaderworkerset.x-k8s.io/v1beta1"),
     ("unknown apiVersion/kind leaderworkerset.x-k8s.io/v1beta1",)),
], ids=["size-string", "bad-startup-policy", "no-worker-template", "misspelled-top-level",
        "name-dns1035", "misspelled-metadata", "worker-restart-never", "bad-quantity",
        "unknown-version"])
def test_lws_planted_mistakes_are_reported(mutate, needles):
    lws = sample_lws()
    mutate(lws)
    found = problems([lws])
    assert _reported(found, *needles), found


# --- the generated LeaderWorkerSet (the two-node profile) ---------------------------------------

TWO_NODE = os.path.join(ROOT, "deploy", "k8s", "qwen3-235b-a22b-bf16-2node.yaml")


def _generated_lws() -> list[dict]:
    from ascend_qwen3.deploy import manifests
    from ascend_qwen3.deploy.profiles import load_profile

    return manifests.k8s(load_profile("qwen3-235b-a22b-bf16-2node"))


def test_generated_leader_worker_set_is_valid():
    docs = _generated_lws()
    assert [d["kind"] for d in docs] == ["LeaderWorkerSet", "Service"]
    assert problems(docs) == []
    assert [d for d in k8s_schema.load_manifest(TWO_NODE)] == docs


@pytest.mark.parametrize("mutate, needles", [
    (lambda d: d["spec"]["leaderWorkerTemplate"].update(sze=2), ["sze"]),
    (lambda d: d["spec"]["leaderWorkerTemplate"].update(restartPolicy="RecreateOnFailure"),
     ["RecreateOnFailure"]),
    (lambda d: d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
     .update(volumeMount=[]), ["volumeMount"]),
    (lambda d: d["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
     .update(restartPolicy="Never"), ["restartPolicy"]),
])
def test_generated_leader_worker_set_planted_mistakes(mutate, needles):
    docs = copy.deepcopy(_generated_lws())
    mutate(docs[0])
    found = problems(docs)
    assert _reported(found, *needles), found
