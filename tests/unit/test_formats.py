"""Row formats: the fast check, its agreement with the pydantic models, and synthetic data."""

from __future__ import annotations

import pytest
from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl
from cotune.orchestrator.protocol.formats import FORMATS, check_row, parse_row, row_checker
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

GOOD = {
    "alpaca": [
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Say hi.", "input": None, "output": "hi"},
        {"instruction": "Say hi.", "input": "", "output": "hi", "id": 7, "source": "x"},
    ],
    "chat": [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {
            "messages": [
                {"role": "system", "content": ""},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo", "name": "bot"},
            ],
            "id": "a1",
        },
        {"messages": [{"role": "assistant", "content": "alone"}]},
    ],
    "text": [{"text": "some text"}, {"text": "x", "meta": {"a": 1}}],
    "completion": [{"prompt": "2+2=", "completion": "4"}, {"prompt": "a", "completion": " b"}],
}

BAD = {
    "alpaca": [
        ([1, 2], "row must be a JSON object, got an array"),
        ("text", "row must be a JSON object, got a string"),
        ({"output": "x"}, "missing 'instruction'"),
        ({"instruction": "x"}, "missing 'output'"),
        ({"instruction": "", "output": "x"}, "'instruction' is empty"),
        ({"instruction": "x", "output": "  \n"}, "'output' is empty"),
        ({"instruction": 3, "output": "x"}, "'instruction' must be a string, got a number"),
        ({"instruction": "x", "output": None}, "'output' must be a string, got null"),
        ({"instruction": "x", "output": "y", "input": 5}, "'input' must be a string, got a number"),
        ({"instruction": True, "output": "y"}, "'instruction' must be a string, got a boolean"),
    ],
    "chat": [
        ({}, "missing 'messages'"),
        ({"messages": "hi"}, "'messages' must be an array, got a string"),
        ({"messages": []}, "'messages' needs at least one assistant message"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "needs at least one assistant"),
        ({"messages": ["hi"]}, "messages[0] must be an object, got a string"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "messages[0].role must be one of system, user, assistant, got 'bot'",
        ),
        ({"messages": [{"role": "assistant"}]}, "messages[0]: missing 'content'"),
        (
            {"messages": [{"role": "assistant", "content": ["x"]}]},
            "messages[0].content must be a string, got an array",
        ),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
            "messages[0].content is empty",
        ),
    ],
    "text": [
        ({}, "missing 'text'"),
        ({"text": ""}, "'text' is empty"),
        ({"text": 1.5}, "'text' must be a string, got a number"),
        (None, "row must be a JSON object, got null"),
    ],
    "completion": [
        ({"prompt": "a"}, "missing 'completion'"),
        ({"completion": "a"}, "missing 'prompt'"),
        ({"prompt": "a", "completion": ""}, "'completion' is empty"),
        ({"prompt": {}, "completion": "b"}, "'prompt' must be a string, got an object"),
    ],
}


@pytest.mark.parametrize(("fmt", "row"), [(f, r) for f, rows in GOOD.items() for r in rows])
def test_good_rows_pass_both_checks(fmt: str, row: object) -> None:
    assert check_row(fmt, row) is None
    parse_row(fmt, row)


@pytest.mark.parametrize(
    ("fmt", "row", "reason"), [(f, r, why) for f, cases in BAD.items() for r, why in cases]
)
def test_bad_rows_name_what_is_wrong(fmt: str, row: object, reason: str) -> None:
    got = check_row(fmt, row)
    assert got is not None and reason in got
    with pytest.raises(ValidationError):
        parse_row(fmt, row)


def test_unknown_format_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset format 'sharegpt'.*alpaca, chat"):
        check_row("sharegpt", {"text": "x"})
    with pytest.raises(ValueError, match="'sharegpt'"):
        parse_row("sharegpt", {"text": "x"})


def test_parsed_rows_are_typed() -> None:
    row = parse_row("chat", GOOD["chat"][1])
    assert [m.role for m in row.messages] == ["system", "user", "assistant"]  # type: ignore[attr-defined]


# Values of every JSON type, with strings that are sometimes blank: enough to hit each branch.
_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, width=32),
    st.sampled_from(["", " ", "\n", "x", "hello world"]),
)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
_message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "user", "assistant", "bot"]) | _json,
        "content": st.sampled_from(["", " ", "hi"]) | _json,
    },
)
_KEYS = {
    "alpaca": ["instruction", "input", "output"],
    "text": ["text"],
    "completion": ["prompt", "completion"],
}


def _row_strategy(fmt: str) -> st.SearchStrategy[object]:
    if fmt == "chat":
        good_message = st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant"]),
                "content": st.sampled_from(["hi", "yo", "", " "]),
            }
        )
        messages = st.lists(good_message, min_size=1, max_size=3)
        messages_or_not = st.lists(good_message | _message, max_size=3) | _json
        return (
            st.fixed_dictionaries({"messages": messages}, optional={"id": _json})
            | st.fixed_dictionaries({}, optional={"messages": messages_or_not})
            | _json
        )
    good_or_any = st.sampled_from(["", " ", "ok", "a b"]) | _json
    return st.fixed_dictionaries({}, optional={k: good_or_any for k in [*_KEYS[fmt], "id"]}) | _json


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fast_check_agrees_with_the_models(fmt: str, data: st.DataObject) -> None:
    row = data.draw(_row_strategy(fmt))
    reason = row_checker(fmt)(row)
    try:
        parse_row(fmt, row)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert (reason is None) == model_ok, reason


@pytest.mark.parametrize("fmt", FORMATS)
def test_synthetic_rows_fit_and_are_deterministic(fmt: str) -> None:
    rows = list(generate_rows(fmt, 300, seed=3))
    assert len(rows) == 300
    assert all(check_row(fmt, row) is None for row in rows)
    assert rows == list(generate_rows(fmt, 300, seed=3))
    assert rows != list(generate_rows(fmt, 300, seed=4))


def test_synthetic_answers_follow_from_the_prompt() -> None:
    # The pattern is learnable only if every answer is a function of its prompt.
    seen: dict[str, str] = {}
    for row in generate_rows("completion", 2000, seed=0):
        assert seen.setdefault(row["prompt"], row["completion"]) == row["completion"]
        task, _, arg = row["prompt"].removesuffix(" =>").partition(": ")
        answer = row["completion"].strip()
        if task == "reverse":
            assert answer == arg[::-1]
        elif task == "repeat twice":
            assert answer == f"{arg} {arg}"
        elif task == "uppercase":
            assert answer == arg.upper()
        elif task == "sort":
            assert answer == "".join(sorted(arg))
        else:
            start = task.removeprefix("next letters after ").removesuffix(":")
            assert [ord(c) - ord(start) for c in answer.split()] == [1, 2, 3]
    assert len(seen) > 200  # varied enough not to be memorised as a handful of strings


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'tsv'"):
        next(generate_rows("tsv", 1, 0))
    with pytest.raises(ValueError, match="n must be >= 0"):
        next(generate_rows("text", -1, 0))


def test_write_jsonl_writes_one_object_a_line(tmp_path) -> None:
    import json

    path = tmp_path / "x.jsonl"
    assert write_jsonl(path, generate_rows("chat", 5, 1)) == 5
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == list(generate_rows("chat", 5, 1))
