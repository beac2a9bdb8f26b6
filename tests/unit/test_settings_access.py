"""The access settings: lease age cap, worker token lifetime, rate limits and the strike limit
that quarantines an owner."""

from __future__ import annotations

import pytest
from cotune.orchestrator.settings import Settings

NAMES = (
    "COTUNE_LEASE_MAX_AGE_S",
    "COTUNE_WORKER_TOKEN_TTL_S",
    "COTUNE_WORKER_RATE_PER_S",
    "COTUNE_WORKER_RATE_BURST",
    "COTUNE_MAX_STRIKES",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    default = Settings.from_env()
    assert (default.lease_max_age_s, default.worker_token_ttl_s) == (6 * 3600.0, 24 * 3600.0)
    assert (default.worker_rate_per_s, default.worker_rate_burst) == (20.0, 60.0)
    assert default.max_strikes == 3.0
    for name, value in zip(NAMES, ("3600", "7200", "5", "10", "1.5"), strict=True):
        monkeypatch.setenv(name, value)
    got = Settings.from_env()
    assert (got.lease_max_age_s, got.worker_token_ttl_s) == (3600.0, 7200.0)
    assert (got.worker_rate_per_s, got.worker_rate_burst) == (5.0, 10.0)
    assert got.max_strikes == 1.5


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("COTUNE_LEASE_MAX_AGE_S", "0", "must be > 0"),
        ("COTUNE_WORKER_TOKEN_TTL_S", "a day", "must be a number"),
        ("COTUNE_WORKER_TOKEN_TTL_S", "30", "must be over 60 s"),
        ("COTUNE_WORKER_RATE_PER_S", "-2", "must be > 0"),
        ("COTUNE_WORKER_RATE_BURST", "0.5", "must be >= 1"),
        ("COTUNE_MAX_STRIKES", "three", "must be a number"),
        ("COTUNE_MAX_STRIKES", "0", "must be > 0"),
        ("COTUNE_MAX_STRIKES", "0.5", "must be >= 1"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} {message}"):
        Settings.from_env()
