"""Tokens: random, kept as sha256 hashes, compared in constant time; the embedded admin
token file is private and made once."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cotune.orchestrator.control.tokens import (
    check_name,
    load_or_create_admin_token,
    new_token,
    read_admin_token,
    token_hash,
    token_matches,
)


def test_tokens_are_random_and_say_their_kind() -> None:
    tokens = {new_token("join") for _ in range(100)}
    assert len(tokens) == 100
    assert all(t.startswith("ctj_") and len(t) > 40 for t in tokens)
    assert new_token("admin").startswith("cta_") and new_token("worker").startswith("ctw_")


def test_only_the_hash_is_compared() -> None:
    token = new_token("worker")
    stored = token_hash(token)
    assert stored == hashlib.sha256(token.encode()).hexdigest()
    assert token_matches(token, stored)
    assert not token_matches(token + "x", stored)
    assert not token_matches(None, stored) and not token_matches("", stored)
    assert not token_matches(token, None)


def test_the_admin_token_file_is_made_once_and_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert read_admin_token(home) is None
    token = load_or_create_admin_token(home)
    path = home / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_admin_token(home) == token == read_admin_token(home)


@pytest.mark.parametrize("bad", ["", " alice", "a/b", "x" * 65, "../etc"])
def test_contributor_names_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="name"):
        check_name(bad)
    assert check_name("alice@example.org") == "alice@example.org"
