"""The quality benchmark's task: learnable patterns that none of the project's files contain.

Two kinds of completion rows, mixed, from one secret key (a seeded permutation of the
digits and a seeded letter shift), so the whole task is a fixed function a model can learn
and an eval file of fresh inputs measures whether it did:

    {"prompt": "code 4 0 7 2 =", "completion": " 9 3 1 8"}   each digit through the key,
                                                              in reverse order
    {"prompt": "turn k f p =", "completion": " q l v"}      each letter shifted by the key

Train and eval rows are drawn from disjoint seeds; a row's inputs are 3-6 symbols, so a row
is 20-35 tokens of the tiny tokenizer and fits sequence_len 64 whole.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

KEY_SEED = 1729


def _key() -> tuple[dict[str, str], int]:
    rng = random.Random(KEY_SEED)
    digits = list(string.digits)
    rng.shuffle(digits)
    return dict(zip(string.digits, digits, strict=True)), rng.randint(3, 23)


def rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` rows of the task, deterministic from `seed`."""
    table, shift = _key()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = rng.randint(3, 6)
        if rng.random() < 0.5:
            symbols = [rng.choice(string.digits) for _ in range(size)]
            answer = [table[d] for d in reversed(symbols)]
            prompt = "code"
        else:
            symbols = [rng.choice(string.ascii_lowercase) for _ in range(size)]
            answer = [chr((ord(c) - 97 + shift) % 26 + 97) for c in symbols]
            prompt = "turn"
        out.append(
            {"prompt": f"{prompt} {' '.join(symbols)} =", "completion": " " + " ".join(answer)}
        )
    return out


def write(path: Path, n: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)))
    return path
