"""Settings: COTUNE_* variables, overrides, defaults and the errors bad values get."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cotune.orchestrator.settings import Settings

VARIABLES = {
    "COTUNE_HOME": "/srv/cotune",
    "COTUNE_REDIS_URL": "redis://redis.internal:6379/2",
    "COTUNE_S3_ENDPOINT": "https://s3.example.com",
    "COTUNE_S3_BUCKET": "artifacts",
    "COTUNE_S3_ACCESS_KEY": "AK",
    "COTUNE_S3_SECRET_KEY": "SK",
    "COTUNE_S3_REGION": "eu-west-1",
    "RAY_ADDRESS": "ray://head:10001",
    "COTUNE_API_HOST": "0.0.0.0",
    "COTUNE_API_PORT": "9000",
    "COTUNE_ADMIN_TOKEN": "admin-token",
    "COTUNE_JOIN_TOKEN": "join-token-of-a-deployment-secret-0123456789",
    "COTUNE_AGENT_URL": "http://coordinator.cotune.svc:8470",
    "COTUNE_RAY_GPUS": "16",
    "COTUNE_API_PROCESSES": "4",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the variables it sets, whatever the developer exported."""
    for name in list(os.environ):
        if name.startswith("COTUNE_") or name == "RAY_ADDRESS":
            monkeypatch.delenv(name)


def test_defaults_mean_the_embedded_stack() -> None:
    settings = Settings.from_env()
    assert settings == Settings()
    assert settings.home == Path("~/.cotune").expanduser()
    assert settings.s3_bucket == "cotune"
    assert settings.s3_region == "us-east-1"
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8470)
    assert settings.embedded


def test_every_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in VARIABLES.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert settings == Settings(
        home=Path("/srv/cotune"),
        redis_url="redis://redis.internal:6379/2",
        s3_endpoint="https://s3.example.com",
        s3_bucket="artifacts",
        s3_access_key="AK",
        s3_secret_key="SK",
        s3_region="eu-west-1",
        ray_address="ray://head:10001",
        api_host="0.0.0.0",
        api_port=9000,
        admin_token="admin-token",
        join_token="join-token-of-a-deployment-secret-0123456789",
        agent_url="http://coordinator.cotune.svc:8470",
        ray_gpus=16.0,
        api_processes=4,
    )
    assert not settings.embedded


@pytest.mark.parametrize("configured", ["COTUNE_REDIS_URL", "COTUNE_S3_ENDPOINT"])
def test_either_external_service_leaves_embedded_mode(
    monkeypatch: pytest.MonkeyPatch, configured: str
) -> None:
    monkeypatch.setenv(configured, VARIABLES[configured])
    assert not Settings.from_env().embedded


def test_empty_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.setenv(name, "")
    assert Settings.from_env() == Settings()


def test_home_expands_the_user_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("COTUNE_HOME", "~/state")
    assert Settings.from_env().home == Path("/home/someone/state")
    assert Settings.from_env(home="~/other").home == Path("/home/someone/other")


def test_overrides_win_and_none_overrides_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_HOME", "/from/env")
    monkeypatch.setenv("COTUNE_S3_BUCKET", "env-bucket")
    settings = Settings.from_env(home=Path("/from/flag"), s3_bucket=None)
    assert settings.home == Path("/from/flag")
    assert settings.s3_bucket == "env-bucket"
    assert Settings.from_env(home=None).home == Path("/from/env")


def test_unknown_override_is_refused() -> None:
    with pytest.raises(TypeError, match="s3_bukket"):
        Settings.from_env(s3_bukket="typo")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("http", r"COTUNE_API_PORT must be a port number, got 'http'"),
        ("0", r"COTUNE_API_PORT must be in 1\.\.65535, got 0"),
        ("70000", r"COTUNE_API_PORT must be in 1\.\.65535, got 70000"),
    ],
)
def test_bad_port_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str, message: str
) -> None:
    monkeypatch.setenv("COTUNE_API_PORT", raw)
    with pytest.raises(ValueError, match=message):
        Settings.from_env()


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.redis_url = "redis://elsewhere"  # type: ignore[misc]


SECRETS = ["ADMIN_TOKEN", "JOIN_TOKEN", "S3_ACCESS_KEY", "S3_SECRET_KEY"]


@pytest.mark.parametrize("name", SECRETS)
def test_a_secret_can_come_from_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    """A mounted Secret: COTUNE_<NAME>_FILE names it, and the trailing newline goes."""
    (tmp_path / "secret").write_text("from-the-file\n")
    monkeypatch.setenv(f"COTUNE_{name}_FILE", str(tmp_path / "secret"))
    assert getattr(Settings.from_env(), name.lower()) == "from-the-file"


@pytest.mark.parametrize("name", SECRETS)
def test_a_secret_file_that_is_missing_empty_or_doubled_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    monkeypatch.setenv(f"COTUNE_{name}_FILE", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=f"COTUNE_{name}_FILE: cannot read .*absent"):
        Settings.from_env()
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv(f"COTUNE_{name}_FILE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=f"COTUNE_{name}_FILE: .*empty is empty"):
        Settings.from_env()
    monkeypatch.setenv(f"COTUNE_{name}", "inline")
    with pytest.raises(ValueError, match=f"COTUNE_{name} and COTUNE_{name}_FILE are both set"):
        Settings.from_env()


def test_the_redis_password_goes_into_the_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "pw").write_text("p@ss/word:1\n")
    monkeypatch.setenv("COTUNE_REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    monkeypatch.setenv("COTUNE_REDIS_URL", "rediss://redis.internal:6380/2")
    url = Settings.from_env().redis_url
    assert url == "rediss://:p%40ss%2Fword%3A1@redis.internal:6380/2"
    import redis

    kwargs = redis.connection.parse_url(url)
    assert (kwargs["password"], kwargs["host"], kwargs["port"]) == (
        "p@ss/word:1",
        "redis.internal",
        6380,
    )
    monkeypatch.setenv("COTUNE_REDIS_URL", "redis://app@redis.internal:6379/0")
    assert Settings.from_env().redis_url == "redis://app:p%40ss%2Fword%3A1@redis.internal:6379/0"
    monkeypatch.setenv("COTUNE_REDIS_URL", "redis://:inline@redis.internal:6379/0")
    with pytest.raises(
        ValueError, match="COTUNE_REDIS_URL has a password and COTUNE_REDIS_PASSWORD"
    ):
        Settings.from_env()


def test_ray_gpus_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_RAY_GPUS", "0")
    with pytest.raises(ValueError, match="COTUNE_RAY_GPUS must be > 0"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("0", "COTUNE_API_PROCESSES must be > 0"),
        ("2.5", "COTUNE_API_PROCESSES must be a whole number"),
        ("many", "COTUNE_API_PROCESSES must be a number"),
    ],
)
def test_api_processes_must_be_a_whole_positive_number(
    monkeypatch: pytest.MonkeyPatch, raw: str, message: str
) -> None:
    monkeypatch.setenv("COTUNE_API_PROCESSES", raw)
    with pytest.raises(ValueError, match=message):
        Settings.from_env()


def test_an_api_process_gets_the_same_settings_secrets_from_files_included(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """runtime/apiserver.py child_env: what a child API process reads back is what its
    parent had, a Redis password from a file included (put into the URL exactly once)."""
    from cotune.orchestrator.runtime.apiserver import child_env

    (tmp_path / "redis-password").write_text("s3cr3t/+\n")
    monkeypatch.setenv("COTUNE_REDIS_URL", "redis://redis.internal:6379/0")
    monkeypatch.setenv("COTUNE_REDIS_PASSWORD_FILE", str(tmp_path / "redis-password"))
    monkeypatch.setenv("COTUNE_S3_ENDPOINT", "https://s3.example.com")
    monkeypatch.setenv("COTUNE_WORKER_RATE_PER_S", "7.5")
    parent = Settings.from_env(home=tmp_path / "home")
    env = child_env(parent, "the-admin-token")
    for name in [k for k in os.environ if k.startswith("COTUNE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("COTUNE_"):
            monkeypatch.setenv(name, value)
    child = Settings.from_env()
    assert child.redis_url == parent.redis_url and "s3cr3t" in (child.redis_url or "")
    assert child.worker_rate_per_s == 7.5 and child.home == parent.home
    assert child.admin_token == "the-admin-token"
