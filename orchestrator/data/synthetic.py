"""Synthetic datasets with a learnable pattern, for the tiny example, tests and benchmarks.

Each row is one of a handful of letter-string tasks ("reverse: abc" -> "cba", "repeat
twice: ab" -> "ab ab", "next letters after c:" -> "d e f", ...): short strings over a small
alphabet whose answers follow from the prompt, so a tiny random-init model's loss falls
visibly within tens of steps. Rows are a pure function of (format, n, seed). Stdlib only.

    from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl
    write_jsonl("train.jsonl", generate_rows("alpaca", 2000, seed=0))
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from cotune.orchestrator.protocol.formats import FORMATS

ALPHABET = "abcdefghij"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 5)))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return "Reverse the letters.", f"reverse: {word}", word[::-1]


def _repeat(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return "Repeat the word twice.", f"repeat twice: {word}", f"{word} {word}"


def _next_letters(rng: random.Random) -> tuple[str, str, str]:
    start = rng.randrange(len(_LETTERS) - 3)
    answer = " ".join(_LETTERS[start + 1 : start + 4])
    return "Say the three letters that follow.", f"next letters after {_LETTERS[start]}:", answer


def _upper(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return "Write the word in capitals.", f"uppercase: {word}", word.upper()


def _sort(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return "Sort the letters.", f"sort: {word}", "".join(sorted(word))


# Each task: (instruction, prompt, answer); the prompt carries the task name and its argument.
_TASKS: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _reverse,
    _repeat,
    _next_letters,
    _upper,
    _sort,
)


def _row(fmt: str, instruction: str, prompt: str, answer: str) -> dict[str, Any]:
    if fmt == "alpaca":
        # The alpaca split keeps the argument in `input`, as alpaca data does.
        task, _, argument = prompt.partition(": ")
        if argument:
            return {"instruction": f"{instruction} ({task})", "input": argument, "output": answer}
        return {"instruction": prompt, "output": answer}
    if fmt == "chat":
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
        }
    if fmt == "text":
        return {"text": f"{prompt} => {answer}"}
    return {"prompt": f"{prompt} =>", "completion": f" {answer}"}


def generate_rows(fmt: str, n: int, seed: int) -> Iterator[dict[str, Any]]:
    """`n` rows of format `fmt`, deterministic from `seed`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    for _ in range(n):
        yield _row(fmt, *rng.choice(_TASKS)(rng))


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines (UTF-8, compact, keys in given order); return the row count."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
            f.write("\n")
            count += 1
    return count
