"""Render helm/cotune offline and validate what comes out (tests/deploy/test_chart.py).

Rendering, linting and schema checks run in Helm's own Go code through helm-python-sdk
(`helm_python`); manifests are checked with kubernetes-validate's strict schemas, and the
custom resources (RayCluster, ServiceMonitor, PrometheusRule) against their CRDs' schemas
kept in tests/deploy/data/, with unknown fields refused.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import latest_version, schema_contents
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cotune"
MATRIX = sorted((CHART / "ci").glob("*-values.yaml"))
DATA = Path(__file__).parent / "data"
CRDS = {
    ("ray.io/v1", "RayCluster"): DATA / "kuberay-raycluster-crd.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): DATA / "prometheus-operator-crds.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): DATA / "prometheus-operator-crds.yaml",
}
RELEASE, NAMESPACE = "rel", "cotune"
KUBE_VERSION = latest_version()
_CORE_PREFIX = "io.k8s."
_DEFS = "https://kubernetes.io/api/_definitions.json"


def values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def case_id(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


@functools.cache
def _chart() -> Any:
    import helm_python as helm

    helm.disable_logging()
    return helm.Chart.load(CHART)


def render(vals: dict[str, Any], *, name: str = RELEASE) -> list[dict[str, Any]]:
    """Every manifest the chart renders for `vals` (NOTES.txt left out), as dicts."""
    out = _chart().render(copy.deepcopy(vals), name=name, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@functools.cache
def render_case(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(render(values(path)))


def notes(vals: dict[str, Any]) -> str:
    out = _chart().render(copy.deepcopy(vals), name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def by_kind(docs: Iterator[dict[str, Any]] | tuple[dict[str, Any], ...], kind: str) -> list:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod the manifests would make."""
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield name, d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield name, d["spec"]
        elif d["kind"] == "RayCluster":
            yield f"{name} head", d["spec"]["headGroupSpec"]["template"]["spec"]
            for group in d["spec"].get("workerGroupSpecs", []):
                yield f"{name} {group['groupName']}", group["template"]["spec"]


def kube_validate(doc: dict[str, Any]) -> None:
    """kubernetes-validate --strict on a built-in kind; raises its ValidationError."""
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _strict_dir() -> str:
    return f"kubernetes-json-schema/v{KUBE_VERSION}-local-strict"


@functools.cache
def _core_registry() -> Registry:
    defs = schema_contents(f"{_strict_dir()}/_definitions.json", KUBE_VERSION)
    return Resource.from_contents(defs) @ Registry()


def _strict_schema(node: Any) -> Any:
    """A CRD's structural schema as JSON Schema that refuses unknown fields; nodes standing
    for a core type become a reference to that type's strict kubernetes-validate schema."""
    if isinstance(node, list):
        return [_strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    description = node.get("description", "")
    if node.get("x-kubernetes-preserve-unknown-fields") and description.startswith(_CORE_PREFIX):
        return {"$ref": f"{_DEFS}#/$defs/{description.split()[0]}"}
    out = {k: _strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    out.pop("default", None)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    group, _, version = api_version.partition("/")
    for crd in yaml.safe_load_all(CRDS[(api_version, kind)].read_text()):
        spec = crd["spec"]
        if spec["group"] != group or spec["names"]["kind"] != kind:
            continue
        for v in spec["versions"]:
            if v["name"] == version:
                schema = _strict_schema(v["schema"]["openAPIV3Schema"])
                cls = jsonschema.validators.Draft202012Validator
                return cls(schema, registry=_core_registry())
    raise LookupError(f"no CRD for {api_version} {kind} in {CRDS[(api_version, kind)]}")


def is_custom(doc: dict[str, Any]) -> bool:
    return (doc["apiVersion"], doc["kind"]) in CRDS


def validate(doc: dict[str, Any]) -> None:
    """Strict validation of any rendered manifest: kubernetes-validate for built-in kinds,
    the CRD's schema for custom resources. Raises with the path of the first problem."""
    if is_custom(doc):
        crd_validator(doc["apiVersion"], doc["kind"]).validate(doc)
    else:
        kube_validate(doc)
