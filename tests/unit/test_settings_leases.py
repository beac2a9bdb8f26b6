"""The coordinator settings the API and leases read: COTUNE_COORDINATOR and the lease knobs."""

from __future__ import annotations

import pytest
from cotune.orchestrator.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COTUNE_COORDINATOR", "COTUNE_LEASE_TTL_S", "COTUNE_HEARTBEAT_INTERVAL_S",
                 "COTUNE_MAX_ATTEMPTS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def test_defaults_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    default = Settings.from_env()
    assert (default.coordinator_url, default.lease_ttl_s) == (None, 120.0)
    assert (default.heartbeat_interval_s, default.max_attempts) == (10.0, 3)
    monkeypatch.setenv("COTUNE_COORDINATOR", "https://cotune.example.org")
    monkeypatch.setenv("COTUNE_LEASE_TTL_S", "45.5")
    monkeypatch.setenv("COTUNE_HEARTBEAT_INTERVAL_S", "3")
    monkeypatch.setenv("COTUNE_MAX_ATTEMPTS", "5")
    got = Settings.from_env()
    assert got.coordinator_url == "https://cotune.example.org"
    assert (got.lease_ttl_s, got.heartbeat_interval_s, got.max_attempts) == (45.5, 3.0, 5)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("COTUNE_LEASE_TTL_S", "soon", "must be a number"),
        ("COTUNE_LEASE_TTL_S", "0", "must be > 0"),
        ("COTUNE_HEARTBEAT_INTERVAL_S", "-1", "must be > 0"),
        ("COTUNE_MAX_ATTEMPTS", "2.5", "must be a whole number"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} {message}"):
        Settings.from_env()
