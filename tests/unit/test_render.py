"""What a sequence_len keeps of rendered rows (`Fit`), and the verdict that fails a job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.protocol.render import (
    IGNORE_INDEX,
    WARN_FRACTION,
    Fit,
    fit_problem,
    percentile,
    render,
)

IGNORED = IGNORE_INDEX


def test_whole_cut_and_dropped_rows_are_told_apart() -> None:
    fit = Fit(sequence_len=4, keep_lengths=True)
    assert fit.add([1, 2, 3], [IGNORED, 2, 3]) is True  # fits whole
    assert fit.add([1, 2, 3, 4, 5, 6], [IGNORED, IGNORED, 3, 4, 5, 6]) is True  # cut
    assert fit.add([1, 2, 3, 4, 5, 6], [IGNORED] * 4 + [5, 6]) is False  # answer past 4: dropped
    assert fit.add([1, 2], [IGNORED, IGNORED]) is False  # nothing trained at all
    assert (fit.rows, fit.cut, fit.dropped) == (4, 1, 2)
    assert fit.counts() == {"rows": 4, "rows_cut": 1, "rows_dropped": 2, "sequence_len": 4}
    assert fit.summary() == (
        "of 4 rows at sequence_len 4: 1 whole, 1 cut (25.0%), 2 dropped (50.0%)"
    )
    dist = fit.distribution()
    assert (dist["p50"], dist["max"]) == (3, 6)
    # The third row needs 5 tokens to keep its first trained one; the untrained row, 3.
    assert dist["none_dropped"] == 5
    assert fit.warns


def test_lengths_are_kept_only_when_asked() -> None:
    fit = Fit(sequence_len=8)
    fit.add([1, 2, 3], [1, 2, 3])
    assert fit.lengths == [] and fit.distribution() == {}


def test_a_warning_needs_more_than_the_warn_fraction() -> None:
    fit = Fit(sequence_len=2)
    for _ in range(99):
        fit.add([1], [1])
    fit.add([1, 2, 3], [1, 2, 3])  # 1% cut: not warned
    assert fit.fraction(fit.cut) == 0.01 < WARN_FRACTION and not fit.warns


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([7], 99) == 7


@pytest.mark.parametrize(
    ("cut", "dropped", "expected"),
    [
        (0, 5, None),  # 5% dropped: at the limit, not past it
        (0, 6, "6 of 100 rows of the eval split (6.0%) lose every trained token"),
        (40, 0, None),  # max_cut_rows 1.0 by default: cutting never fails
    ],
)
def test_the_verdict_names_the_counts_the_limit_and_the_fix(
    cut: int, dropped: int, expected: str | None
) -> None:
    why = fit_problem(
        rows=100,
        cut=cut,
        dropped=dropped,
        sequence_len=64,
        max_dropped_rows=0.05,
        max_cut_rows=1.0,
        where="the eval split",
    )
    if expected is None:
        assert why is None
    else:
        assert why is not None and why.startswith(expected)
        assert "training.sequence_len 64, more than dataset.max_dropped_rows 0.05" in why
        assert "raise training.sequence_len" in why


def test_a_cut_limit_fails_too() -> None:
    why = fit_problem(
        rows=10,
        cut=5,
        dropped=0,
        sequence_len=32,
        max_dropped_rows=0.05,
        max_cut_rows=0.2,
        where="x",
    )
    assert why is not None and "are cut short" in why and "dataset.max_cut_rows 0.2" in why


def test_the_real_tokenizer_drops_an_alpaca_row_whose_prompt_fills_the_sequence(
    tiny_model_dir: Path,
) -> None:
    transformers = pytest.importorskip("transformers", reason="rendering needs the worker extra")
    tokenizer: Any = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    row = {"instruction": "Reverse the letters.", "input": "abc", "output": "cba"}
    ids, labels = render(row, "alpaca", tokenizer, train_on_inputs=False)
    prompt = next(i for i, label in enumerate(labels) if label != IGNORED)
    fit = Fit(sequence_len=prompt, keep_lengths=True)  # the answer starts just past the end
    assert fit.add(ids, labels) is False and fit.dropped == 1
    longer = Fit(sequence_len=prompt + 1)
    assert longer.add(ids, labels) is True and longer.cut == (len(ids) > prompt + 1)
    assert fit.distribution()["none_dropped"] == prompt + 1
