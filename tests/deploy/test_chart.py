"""helm/cotune, checked offline with the real tools: Helm's own lint, schema and renderer
(helm-python-sdk), kubernetes-validate --strict, and the CRDs' schemas for the RayCluster,
ServiceMonitor and PrometheusRule (tests/deploy/chart.py says how)."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import tomllib

import pytest
import yaml

from tests.deploy import chart as c

CASES = [pytest.param(p, id=c.case_id(p)) for p in c.MATRIX]
DEFAULTS = c.values(c.CHART / "ci" / "defaults-values.yaml")


def with_values(base: dict, **changes: object) -> dict:
    """`base` with dotted keys set: with_values(v, **{"redis.enabled": False})."""
    out = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = out
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def helm_errors(report: dict) -> list:
    return [m for m in report["messages"] if m["severity"] >= 2] + list(report["errors"])


# --- lint and schema --------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_strict_lint_passes(case) -> None:
    import helm_python as helm

    report = helm.lint(c.CHART, c.values(case), strict=True)
    assert helm_errors(report) == [], report


def test_strict_lint_fails_on_a_broken_value() -> None:
    """The lint above can fail: a value the schema refuses is an error it reports."""
    import helm_python as helm

    report = helm.lint(c.CHART, with_values(DEFAULTS, **{"coordinator.replicas": 0}), strict=True)
    assert any("/coordinator/replicas" in str(m) for m in helm_errors(report)), report


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"coordinator": {"replicaz": 2}}, "replicaz"),  # misspelt key
        ({"monitoring": {"servicemonitor": {"enabled": True}}}, "servicemonitor"),
        ({"coordinator": {"replicas": "two"}}, "/coordinator/replicas"),  # wrong type
        ({"redis": {"enabled": "yes"}}, "/redis/enabled"),
        ({"rayCluster": {"gpuWorkers": {"gpusPerPod": 0}}}, "/rayCluster/gpuWorkers/gpusPerPod"),
        ({"externalRedis": {"url": "redis://:hunter2@redis:6379/0"}}, "/externalRedis/url"),
        ({"ingress": {"host": "Not A Host"}}, "/ingress/host"),
    ],
)
def test_the_schema_refuses_bad_values(bad, where) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError) as err:
        c._chart().validate_schema(with_values(DEFAULTS) | bad)
    assert where in str(err.value)


def test_the_schema_refuses_unknown_keys_everywhere() -> None:
    """Every object in values.schema.json says additionalProperties: false (or gives a
    schema for the extra keys), so no misspelling anywhere is silently ignored."""
    schema = json.loads((c.CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node: dict, path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            if node.get("additionalProperties") is not False:
                open_objects.append(path)
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}")

    walk(schema, "$")
    assert open_objects == []
    # ... and it describes every key values.yaml has, and nothing values.yaml lacks.
    defaults = yaml.safe_load((c.CHART / "values.yaml").read_text())
    mismatched = []

    def compare(vals: dict, node: dict, path: str) -> None:
        props = node["properties"]
        mismatched.extend(f"{path}.{k} (not in the schema)" for k in set(vals) - set(props))
        mismatched.extend(f"{path}.{k} (not in values.yaml)" for k in set(props) - set(vals))
        for key, sub in props.items():
            if isinstance(vals.get(key), dict) and sub.get("additionalProperties") is False:
                compare(vals[key], sub, f"{path}.{key}")

    compare(defaults, schema, "$")
    assert mismatched == ["$.global (not in values.yaml)"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"s3.endpoint": ""}, "s3.endpoint is required"),
        ({"redis.enabled": False}, "externalRedis.url is required when redis.enabled is false"),
        ({"externalRedis.url": "redis://r:6379/0"}, "set redis.enabled=false"),
        ({"rayCluster.gpuWorkers.minReplicas": 5}, "minReplicas (5) is above maxReplicas (4)"),
        ({"rayCluster.gpuWorkers.replicas": 9}, "replicas (9) must lie in"),
        ({"ingress.enabled": True, "ingress.tls.enabled": False}, "serves HTTPS only"),
        ({"s3.accessKeyId": "only-one", "s3.secretAccessKey": ""}, "give both keys or neither"),
    ],
)
def test_values_that_do_not_fit_together_fail_with_a_message(changes, message) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmError) as err:
        c.render(with_values(DEFAULTS, **changes))
    assert message in str(err.value)


# --- every manifest, strictly -------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_manifest_validates_strictly(case) -> None:
    docs = c.render_case(case)
    assert docs
    problems = []
    for doc in docs:
        try:
            c.validate(doc)
        except Exception as exc:
            path = "/".join(str(p) for p in getattr(exc, "absolute_path", []))
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc}"[:400])
    assert problems == []


def test_the_crd_check_refuses_unknown_fields() -> None:
    """The RayCluster check is strict at every level: the CRD's own fields and the pod
    templates inside it (the part kept as kubernetes-validate's PodTemplateSpec)."""
    import jsonschema

    (cluster,) = c.by_kind(c.render_case(c.MATRIX[0]), "RayCluster")
    c.validate(cluster)
    for mutate in (
        lambda rc: rc["spec"].__setitem__("enableInTreeAutoscale", True),
        lambda rc: rc["spec"]["headGroupSpec"].__setitem__("rayStartparams", {}),
        lambda rc: rc["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "4"),
        lambda rc: rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][
            0
        ].__setitem__("imagePullPolicy", 3),
        lambda rc: rc["spec"]["headGroupSpec"]["template"]["spec"].__setitem__("nodeselector", {}),
        lambda rc: rc["spec"]["gcsFaultToleranceOptions"].pop("redisAddress"),
    ):
        broken = copy.deepcopy(cluster)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            c.validate(broken)


def test_the_images_carry_the_ray_and_cotune_versions_the_chart_names() -> None:
    chart = yaml.safe_load((c.CHART / "Chart.yaml").read_text())
    project = tomllib.loads((c.ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    defaults = yaml.safe_load((c.CHART / "values.yaml").read_text())
    assert defaults["rayCluster"]["rayVersion"] == importlib.metadata.version("ray")
    (cluster,) = c.by_kind(c.render_case(c.MATRIX[0]), "RayCluster")
    assert cluster["spec"]["rayVersion"] == importlib.metadata.version("ray")
    for _, spec in c.pod_specs((cluster,)):
        assert spec["containers"][0]["image"] == f"cotune/worker:{project['version']}"


# --- what each value set makes ------------------------------------------------------------


def env_of(doc: dict, container: int = 0) -> dict[str, dict]:
    spec = doc["spec"]["template"]["spec"]
    return {e["name"]: e for e in spec["containers"][container]["env"]}


def secret_files(doc: dict) -> dict[str, tuple[str, str]]:
    """file name -> (Secret, key) of the coordinator's projected secrets volume, checked
    against the COTUNE_*_FILE variables that point into it."""
    spec = doc["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "secrets"]
    files = {
        item["path"]: (source["secret"]["name"], item["key"])
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "secrets"]
    pointed = {
        e["value"].removeprefix(mount["mountPath"] + "/")
        for e in spec["containers"][0]["env"]
        if e["name"].endswith("_FILE")
    }
    assert pointed == set(files), "every secret file is read, and every _FILE exists"
    # No secret value travels in the environment.
    assert not [e for e in spec["containers"][0]["env"] if "valueFrom" in e]
    return files


def coordinator(docs) -> dict:
    (deployment,) = c.by_kind(docs, "Deployment")
    return deployment


def test_defaults_make_the_whole_system() -> None:
    docs = c.render_case(c.CHART / "ci" / "defaults-values.yaml")
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == [
        "ConfigMap", "Deployment", "NetworkPolicy", "Pod", "RayCluster", "Secret", "Service",
        "ServiceAccount", "StatefulSet",
    ]  # fmt: skip
    env = env_of(coordinator(docs))
    assert env["COTUNE_REDIS_URL"]["value"] == "redis://rel-cotune-redis:6379/0"
    assert env["COTUNE_REDIS_PASSWORD_FILE"]["value"] == "/run/secrets/cotune/redis-password"
    assert env["RAY_ADDRESS"]["value"] == "ray://rel-cotune-ray-head-svc.cotune.svc:10001"
    assert env["COTUNE_AGENT_URL"]["value"] == "http://rel-cotune-coordinator.cotune.svc:8470"
    assert env["COTUNE_RAY_GPUS"]["value"] == "4"  # maxReplicas 4 x 1 GPU
    assert secret_files(coordinator(docs)) == {
        "admin-token": ("rel-cotune-auth", "admin-token"),
        "redis-password": ("rel-cotune-auth", "redis-password"),
        "s3-access-key-id": ("rel-cotune-s3", "access-key-id"),
        "s3-secret-access-key": ("rel-cotune-s3", "secret-access-key"),
    }
    (cluster,) = c.by_kind(docs, "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    ft = cluster["spec"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "rel-cotune-redis:6379"  # the same Redis as cotune's state
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "rel-cotune-auth"
    (group,) = cluster["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 1
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 4)
    (redis,) = c.by_kind(docs, "StatefulSet")
    assert "--appendonly yes" in redis["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
        "storage": "8Gi"
    }
    secrets = {s["metadata"]["name"]: s for s in c.by_kind(docs, "Secret")}
    assert set(secrets["rel-cotune-auth"]["data"]) == {"admin-token", "redis-password"}
    assert set(secrets["rel-cotune-s3"]["data"]) == {"access-key-id", "secret-access-key"}


def test_external_redis_and_no_s3_keys() -> None:
    docs = c.render_case(c.CHART / "ci" / "external-redis-values.yaml")
    assert c.by_kind(docs, "StatefulSet") == []
    env = env_of(coordinator(docs))
    assert env["COTUNE_REDIS_URL"]["value"] == "rediss://redis.data.svc:6380/2"
    assert secret_files(coordinator(docs)) == {
        "admin-token": ("rel-cotune-auth", "admin-token"),
        "redis-password": ("my-redis", "password"),
    }  # no S3 keys: boto3's own chain (IRSA, instance roles)
    (cluster,) = c.by_kind(docs, "RayCluster")
    assert cluster["spec"]["gcsFaultToleranceOptions"]["redisAddress"] == (
        "rediss://redis.data.svc:6380"
    )
    assert [s["metadata"]["name"] for s in c.by_kind(docs, "Secret")] == ["rel-cotune-auth"]


def test_existing_secrets_replace_the_charts_own() -> None:
    docs = c.render_case(c.CHART / "ci" / "existing-secret-values.yaml")
    assert c.by_kind(docs, "Secret") == []
    assert secret_files(coordinator(docs)) == {
        "admin-token": ("my-cotune-auth", "admin-token"),
        "join-token": ("my-cotune-auth", "join-token"),
        "redis-password": ("my-redis", "redis-password"),
        "s3-access-key-id": ("my-s3", "access-key-id"),
        "s3-secret-access-key": ("my-s3", "secret-access-key"),
    }
    (redis,) = c.by_kind(docs, "StatefulSet")
    (volume,) = redis["spec"]["template"]["spec"]["volumes"]
    assert volume["secret"]["secretName"] == "my-redis"
    assert "valueFrom" not in str(redis)


def test_ray_pods_hold_no_secret() -> None:
    """Merges get store access in each request; cluster workers enroll over HTTP."""
    (cluster,) = c.by_kind(c.render_case(c.CHART / "ci" / "defaults-values.yaml"), "RayCluster")
    for where, spec in c.pod_specs((cluster,)):
        text = str(spec)
        assert "secretKeyRef" not in text and "secret" not in [
            v.get("name") for v in spec["volumes"]
        ], where
    # Only KubeRay reads Redis's password, for the GCS tables (from the Secret, by reference).
    ref = cluster["spec"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]
    assert ref["secretKeyRef"]["name"] == "rel-cotune-auth"


def test_ingress_serves_the_api_over_tls() -> None:
    docs = c.render_case(c.CHART / "ci" / "ingress-values.yaml")
    (ingress,) = c.by_kind(docs, "Ingress")
    assert ingress["spec"]["tls"] == [
        {"hosts": ["cotune.example.org"], "secretName": "cotune-example-tls"}
    ]
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rel-cotune-coordinator", "port": {"name": "http"}}
    assert "https://cotune.example.org" in c.notes(c.values(c.CHART / "ci" / "ingress-values.yaml"))


def test_monitoring_on_ships_the_deploy_folders_rules_and_dashboards() -> None:
    docs = c.render_case(c.CHART / "ci" / "monitoring-on-values.yaml")
    (rule,) = c.by_kind(docs, "PrometheusRule")
    source = yaml.safe_load((c.ROOT / "deploy/prometheus/rules/cotune.yml").read_text())
    assert rule["spec"]["groups"] == source["groups"]  # the same file, not a copy
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (monitor,) = c.by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["jobLabel"] == "cotune.dev/prometheus-job"
    services = {s["metadata"]["name"]: s for s in c.by_kind(docs, "Service")}
    labels = services["rel-cotune-coordinator"]["metadata"]["labels"]
    # Prometheus's job label becomes "cotune-coordinator", the name the rules select.
    assert labels[monitor["spec"]["jobLabel"]] == "cotune-coordinator"
    assert 'job="cotune-coordinator"' in (c.ROOT / "deploy/prometheus/rules/cotune.yml").read_text()
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())
    dashboards = {}
    for cm in c.by_kind(docs, "ConfigMap"):
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1":
            ((name, text),) = cm["data"].items()
            dashboards[name] = json.loads(text)
    files = sorted((c.ROOT / "deploy/grafana/dashboards").glob("*.json"))
    assert sorted(dashboards) == [f"cotune-{f.name}" for f in files]  # one ConfigMap each
    for f in files:
        assert dashboards[f"cotune-{f.name}"] == json.loads(f.read_text())
    (datasource,) = [
        cm
        for cm in c.by_kind(docs, "ConfigMap")
        if "grafana_datasource" in cm["metadata"]["labels"]
    ]
    ds = yaml.safe_load(datasource["data"]["cotune-datasource.yaml"])["datasources"][0]
    assert ds["uid"] == "cotune-prometheus"  # the uid every dashboard panel names
    assert '"uid": "cotune-prometheus"' in files[0].read_text()


def test_monitoring_off_and_no_ray_cluster() -> None:
    docs = c.render_case(c.CHART / "ci" / "monitoring-off-values.yaml")
    kinds = {d["kind"] for d in docs}
    assert kinds.isdisjoint({"ServiceMonitor", "PrometheusRule", "ConfigMap", "RayCluster"})
    assert kinds.isdisjoint({"NetworkPolicy", "Pod"})
    env = env_of(coordinator(docs))
    assert "RAY_ADDRESS" not in env and "COTUNE_RAY_GPUS" not in env
    assert coordinator(docs)["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "coordinator",
        "--workers",
        "0",
    ]


@pytest.mark.parametrize(
    ("case", "gpus", "bounds", "ray_gpus"),
    [("defaults", 1, (0, 4), "4"), ("gpu-large", 8, (2, 16), "128"), ("gpu-none", 1, (0, 0), None)],
)
def test_gpu_group_sizes(case, gpus, bounds, ray_gpus) -> None:
    docs = c.render_case(c.CHART / "ci" / f"{case}-values.yaml")
    (cluster,) = c.by_kind(docs, "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert (group["minReplicas"], group["maxReplicas"]) == bounds
    assert env_of(coordinator(docs)).get("COTUNE_RAY_GPUS", {}).get("value") == ray_gpus


def test_two_coordinators_get_a_disruption_budget() -> None:
    docs = c.render_case(c.CHART / "ci" / "gpu-large-values.yaml")
    assert coordinator(docs)["spec"]["replicas"] == 2
    (pdb,) = c.by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert (
        c.by_kind(c.render_case(c.CHART / "ci" / "defaults-values.yaml"), "PodDisruptionBudget")
        == []
    )


# --- pods: non-root, read-only, bounded -----------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_every_pod_is_non_root_read_only_and_bounded(case) -> None:
    problems = []
    for where, spec in c.pod_specs(c.render_case(case)):
        pod = spec.get("securityContext", {})
        if not pod.get("runAsNonRoot") or not pod.get("runAsUser"):
            problems.append(f"{where}: not runAsNonRoot with a uid")
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        for container in spec["containers"]:
            sc = container.get("securityContext", {})
            name = f"{where} {container['name']}"
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: privilege escalation allowed")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: writable root filesystem")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}: capabilities not dropped")
            res = container.get("resources", {})
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(kind, {})):
                    problems.append(f"{name}: no cpu and memory {kind}")
    assert problems == []


def test_helm_test_hook_checks_the_api_and_redis() -> None:
    docs = c.render_case(c.CHART / "ci" / "defaults-values.yaml")
    (pod,) = c.by_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    compile(script, "helm-test", "exec")  # the check itself is valid Python
    assert "http://rel-cotune-coordinator:8470" in script
    assert "cotune_state_up" in script


def test_notes_tell_how_to_reach_the_api_and_get_the_token() -> None:
    text = c.notes(DEFAULTS)
    assert "kubectl -n cotune port-forward svc/rel-cotune-coordinator 8470" in text
    assert "get secret rel-cotune-auth -o jsonpath='{.data.admin-token}'" in text
    assert "helm test rel -n cotune" in text
