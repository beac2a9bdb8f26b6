"""Regenerate the tiny example's dataset: 2,000 synthetic alpaca rows, seed 0.

    python examples/tiny/make_data.py

The rows are letter tasks with a learnable pattern (orchestrator/data/synthetic.py), so the tiny
random-init model's loss falls visibly within tens of steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl

ROWS = 2000
SEED = 0


def main() -> int:
    path = Path(__file__).parent / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    count = write_jsonl(path, generate_rows("alpaca", ROWS, seed=SEED))
    print(f"wrote {count} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
