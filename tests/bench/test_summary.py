"""The summary table of docs/benchmarks.md (bench/_summary.py): rows from each benchmark's
figures file, written between the markers and nowhere else."""

from __future__ import annotations

import json
from pathlib import Path

from bench._summary import BEGIN, END, regenerate, table


def test_rows_come_from_the_files_present_and_only_the_marked_table_changes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "training.json").write_text(json.dumps({"ratio": 0.991, "target": 0.97}))
    (out / "dispatch.json").write_text(
        json.dumps(
            {
                "targets": {
                    "open_lease_p99_ms": {
                        "target": 25.0,
                        "reached": 12.5,
                        "at_most": True,
                        "met": True,
                    },
                    "closed_100_ratio_to_noop_ceiling": {
                        "target": 0.7,
                        "reached": 0.41,
                        "at_most": False,
                        "met": False,
                    },
                }
            }
        )
    )
    (out / "scrape.json").write_text("{}")  # a file of another shape: named, not fatal
    rows = table(out).splitlines()
    assert any("training" in r and "0.991" in r and "| yes |" in r for r in rows)
    assert any("open lease p99 ms" in r and "12.5" in r and "<= 25" in r for r in rows)
    assert any("ratio to noop ceiling" in r and "0.41" in r and "**no**" in r for r in rows)
    assert any("scrape" in r and "unreadable" in r for r in rows)
    assert not any("sharding" in r for r in rows)  # no file, no row

    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## Sharding\nrest\n")
    assert regenerate(doc, out)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n" + BEGIN)
    assert text.endswith(END + "\n\n## Sharding\nrest\n")
    assert "old table" not in text and "0.991" in text
    unmarked = tmp_path / "plain.md"
    unmarked.write_text("no markers\n")
    assert not regenerate(unmarked, out) and unmarked.read_text() == "no markers\n"
