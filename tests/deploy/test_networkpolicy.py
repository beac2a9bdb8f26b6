"""The rendered NetworkPolicies admit traffic from outside the release to the API port only;
Redis, Ray and Ray's metrics only from the release's own pods (and, for metrics, the peers
networkPolicy.metricsFrom names).

A small evaluator of networking.k8s.io/v1 ingress rules (podSelector, namespaceSelector,
matchLabels and matchExpressions, named and numbered ports) answers "would this connection
be admitted?" for the pods the chart makes, on the ports their containers open.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.deploy import chart as c

NAMESPACE_LABELS = {"kubernetes.io/metadata.name": c.NAMESPACE}


@dataclass(frozen=True)
class Pod:
    where: str
    labels: dict[str, str]
    namespace_labels: dict[str, str] = field(default_factory=lambda: dict(NAMESPACE_LABELS))
    ports: dict[str, int] = field(default_factory=dict)  # name -> number


def matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """A LabelSelector against labels; an empty selector matches everything."""
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def peer_admits(peer: dict, source: Pod) -> bool:
    if "ipBlock" in peer:
        return True  # an address range: anything outside the cluster may fall in it
    pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
    same_namespace = source.namespace_labels == NAMESPACE_LABELS
    if namespaces is None:  # podSelector alone: pods of the policy's own namespace
        return same_namespace and matches(pods, source.labels)
    if not matches(namespaces, source.namespace_labels):
        return False
    return pods is None or matches(pods, source.labels)


def port_admits(rule_ports: list[dict] | None, target: Pod, port: int) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        wanted = p.get("port")
        if wanted is None or wanted == port or target.ports.get(str(wanted)) == port:
            return True
    return False


def admitted(policies: list[dict], source: Pod, target: Pod, port: int) -> bool:
    """Kubernetes semantics: a pod no policy selects (for Ingress) admits everything; one
    that some policy selects admits what at least one of their rules admits."""
    selecting = [
        p
        for p in policies
        if matches(p["spec"]["podSelector"], target.labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            sources = rule.get("from")
            if port_admits(rule.get("ports"), target, port) and (
                not sources or any(peer_admits(peer, source) for peer in sources)
            ):
                return True
    return False


def release_pods(docs) -> list[Pod]:
    """The pods the manifests make, with the labels KubeRay copies from the templates."""
    pods = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            meta, spec = d["spec"]["template"]["metadata"], d["spec"]["template"]["spec"]
            pods.append(_pod(d["kind"], meta, spec))
        elif d["kind"] == "RayCluster":
            head = d["spec"]["headGroupSpec"]["template"]
            pods.append(_pod("ray head", head["metadata"], head["spec"]))
            for g in d["spec"]["workerGroupSpecs"]:
                pods.append(
                    _pod(f"ray {g['groupName']}", g["template"]["metadata"], g["template"]["spec"])
                )
    return pods


def _pod(where: str, meta: dict, spec: dict) -> Pod:
    ports = {
        p["name"]: p["containerPort"]
        for container in spec["containers"]
        for p in container.get("ports", [])
        if "name" in p
    }
    component = meta["labels"].get("app.kubernetes.io/component", "?")
    return Pod(f"{where} ({component})", dict(meta["labels"]), ports=ports)


# Ray also listens on ports it picks at start (raylet, object manager, workers): stand-ins.
RAY_DYNAMIC_PORTS = [10002, 20000, 45000]

STRANGER = Pod("a pod of another app", {"app": "other"}, {"kubernetes.io/metadata.name": "web"})
NEIGHBOUR = Pod("another app in the namespace", {"app": "other"})
INGRESS = Pod(
    "the ingress controller",
    {"app.kubernetes.io/name": "ingress-nginx"},
    {"kubernetes.io/metadata.name": "ingress-nginx"},
)
PROMETHEUS = Pod("Prometheus", {"app": "prometheus"}, {"kubernetes.io/metadata.name": "monitoring"})


def open_ports(pod: Pod) -> list[int]:
    extra = RAY_DYNAMIC_PORTS if pod.labels["app.kubernetes.io/component"].startswith("ray") else []
    return sorted(set(pod.ports.values()) | set(extra))


def reachable(docs, source: Pod) -> set[tuple[str, int]]:
    policies = c.by_kind(docs, "NetworkPolicy")
    return {
        (pod.labels["app.kubernetes.io/component"], port)
        for pod in release_pods(docs)
        for port in open_ports(pod)
        if admitted(policies, source, pod, port)
    }


def an_insider(docs) -> Pod:
    (deployment,) = c.by_kind(docs, "Deployment")
    return Pod("the coordinator", dict(deployment["spec"]["template"]["metadata"]["labels"]))


API = {("coordinator", 8470)}


@pytest.mark.parametrize("case", ["defaults", "monitoring-on", "gpu-large", "existing-secret"])
def test_from_outside_the_release_only_the_api_port_is_reachable(case) -> None:
    docs = c.render_case(c.CHART / "ci" / f"{case}-values.yaml")
    assert {p.labels["app.kubernetes.io/component"] for p in release_pods(docs)} >= {
        "coordinator",
        "redis",
        "ray-head",
        "ray-worker",
    }
    for outsider in (STRANGER, NEIGHBOUR, INGRESS):
        assert reachable(docs, outsider) == API, outsider.where


def test_inside_the_release_redis_and_every_ray_port_are_reachable() -> None:
    docs = c.render_case(c.CHART / "ci" / "defaults-values.yaml")
    everything = {
        (pod.labels["app.kubernetes.io/component"], port)
        for pod in release_pods(docs)
        for port in open_ports(pod)
    }
    assert {("redis", 6379), ("ray-head", 10001), ("ray-head", 6379)} <= everything
    assert reachable(docs, an_insider(docs)) == everything
    # A worker pod reaches the head's GCS and the coordinator's API (where its agents enroll).
    (worker,) = [
        p for p in release_pods(docs) if p.labels["app.kubernetes.io/component"] == "ray-worker"
    ]
    assert {("ray-head", 6379), ("coordinator", 8470), ("redis", 6379)} <= reachable(docs, worker)


def test_metrics_peers_reach_rays_metrics_and_nothing_else_inside() -> None:
    docs = c.render_case(c.CHART / "ci" / "monitoring-on-values.yaml")
    assert reachable(docs, PROMETHEUS) == API | {("ray-head", 8080), ("ray-worker", 8080)}
    # Without metricsFrom, Prometheus is any outsider: the API port (it serves /metrics).
    plain = c.render_case(c.CHART / "ci" / "defaults-values.yaml")
    assert reachable(plain, PROMETHEUS) == API


def test_api_from_narrows_who_reaches_the_api() -> None:
    docs = c.render_case(c.CHART / "ci" / "ingress-values.yaml")
    assert reachable(docs, INGRESS) == API
    assert reachable(docs, STRANGER) == set()
    assert reachable(docs, an_insider(docs)) >= API  # the release itself (helm test, Ray)


def test_the_evaluator_sees_an_open_cluster_as_open() -> None:
    """Without the policies every port is reachable from anywhere: the checks above fail if
    the chart stops rendering them."""
    docs = c.render_case(c.CHART / "ci" / "monitoring-off-values.yaml")
    assert c.by_kind(docs, "NetworkPolicy") == []
    assert {("redis", 6379)} <= reachable(docs, STRANGER)
