"""Every Redis key comes from one table; no two templates can produce the same key."""

from __future__ import annotations

import itertools
import re

import pytest
from cotune.orchestrator.control.keys import PREFIX, TEMPLATES, Keys, check_id


def test_every_template_is_prefixed_and_lua_ready() -> None:
    keys = Keys("test:")
    templates = keys.templates()
    assert set(templates) == set(TEMPLATES)
    assert all(t.startswith("test:") for t in templates.values())
    # Lua's string.format reads %s only: no other directive may slip in.
    assert all(re.fullmatch(r"[a-z_:]*(%s[a-z_:]*)*", t) for t in TEMPLATES.values())
    assert Keys().task("t1") == PREFIX + "task:t1"
    assert keys.round_tasks("j", 1, 2) == "test:tasks:j:1:2"
    assert keys.pattern() == "test:*"


def test_templates_never_collide_for_valid_ids() -> None:
    """Ids hold no ':', so two keys of the same length (in ':'-parts) can only be equal if
    their templates agree on every literal part: each such pair must differ in a literal."""
    parts = {name: t.split(":") for name, t in TEMPLATES.items()}
    for (a, pa), (b, pb) in itertools.combinations(parts.items(), 2):
        if len(pa) == len(pb):
            literals = [(x, y) for x, y in zip(pa, pb, strict=True) if "%s" not in (x, y)]
            assert any(x != y for x, y in literals), f"{a} and {b} can name the same key"


@pytest.mark.parametrize("bad", ["", "a:b", "a b", "x" * 161, "ä"])
def test_ids_that_would_break_keys_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        check_id(bad, "job id")


def test_a_prefix_must_be_usable() -> None:
    for bad in ("", "50%:"):
        with pytest.raises(ValueError, match="prefix"):
            Keys(bad)
