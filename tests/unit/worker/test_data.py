"""Rendering rows into token ids and labels (each format), packing, and reading shards."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard
from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl
from cotune.worker.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    load_examples,
    pack_examples,
    render_row,
)

transformers = pytest.importorskip("transformers", reason="rendering needs the worker extra")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _trained_text(tokenizer: Any, row: dict[str, Any], fmt: str, **kw: Any) -> str:
    example = render_row(row, fmt, tokenizer, sequence_len=kw.pop("sequence_len", 1024), **kw)
    assert len(example.input_ids) == len(example.labels)
    return str(
        tokenizer.decode(
            [
                t
                for t, lab in zip(example.input_ids, example.labels, strict=True)
                if lab != IGNORE_INDEX
            ]
        )
    )


def test_alpaca_trains_on_the_output_only(tokenizer: Any) -> None:
    row = {"instruction": "Reverse the letters.", "input": "abc", "output": "cba"}
    assert _trained_text(tokenizer, row, "alpaca", train_on_inputs=False) == "cba</s>"
    everything = _trained_text(tokenizer, row, "alpaca", train_on_inputs=True)
    assert everything.startswith("<s>Below is an instruction")
    assert "### Input:\nabc" in everything and everything.endswith("cba</s>")
    no_input = {"instruction": "Say hi.", "output": "hi"}
    assert "### Input" not in _trained_text(tokenizer, no_input, "alpaca", train_on_inputs=True)


def test_completion_trains_on_the_completion_only(tokenizer: Any) -> None:
    row = {"prompt": "sort: cab =>", "completion": " abc"}
    assert _trained_text(tokenizer, row, "completion", train_on_inputs=False) == " abc</s>"
    assert _trained_text(tokenizer, row, "completion", train_on_inputs=True) == (
        "<s>sort: cab => abc</s>"
    )


def test_chat_trains_on_every_assistant_turn(tokenizer: Any) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "reverse: ab"},
            {"role": "assistant", "content": "ba"},
            {"role": "user", "content": "reverse: cd"},
            {"role": "assistant", "content": "dc"},
        ]
    }
    trained = _trained_text(tokenizer, row, "chat", train_on_inputs=False)
    assert trained == "ba</s>\ndc</s>\n"
    full = _trained_text(tokenizer, row, "chat", train_on_inputs=True)
    assert full == tokenizer.apply_chat_template(row["messages"], tokenize=False)


def test_text_trains_on_everything(tokenizer: Any) -> None:
    row = {"text": "reverse: abc => cba"}
    assert _trained_text(tokenizer, row, "text", train_on_inputs=False) == (
        "<s>reverse: abc => cba</s>"
    )


def test_long_rows_are_cut_and_prompt_only_rows_dropped(tokenizer: Any, tmp_path: Path) -> None:
    row = {"instruction": "x " * 200, "output": "y"}
    example = render_row(row, "alpaca", tokenizer, train_on_inputs=False, sequence_len=64)
    assert len(example.input_ids) == 64 and example.trained_tokens == 0
    path = tmp_path / "long.jsonl"
    write_jsonl(path, [row, {"instruction": "Say hi.", "output": "hi"}])
    examples = load_examples([path], "alpaca", tokenizer, sequence_len=64, train_on_inputs=False)
    assert len(examples) == 1


def test_packing_keeps_examples_whole_and_restarts_positions(tokenizer: Any) -> None:
    rows = list(generate_rows("completion", 40, seed=3))
    examples = [
        render_row(r, "completion", tokenizer, train_on_inputs=False, sequence_len=64) for r in rows
    ]
    blocks = pack_examples(examples, 64, tokenizer.pad_token_id)
    assert all(len(b.input_ids) == len(b.labels) == len(b.position_ids) == 64 for b in blocks)
    assert len(blocks) < len(examples) / 3  # several examples per block
    # Unpacking the blocks (segments start where positions restart) gives the examples back.
    segments = []
    for block in blocks:
        starts = [i for i, p in enumerate(block.position_ids) if p == 0] + [64]
        for lo, hi in itertools.pairwise(starts):
            segments.append((block.input_ids[lo:hi], block.labels[lo:hi]))
    real = [s for s in segments if any(label != IGNORE_INDEX for label in s[1])]
    # Packed, an example's first label is masked (nothing in its own segment predicts it).
    assert [(e.input_ids, (IGNORE_INDEX, *e.labels[1:])) for e in examples] == real


def test_packed_examples_do_not_see_each_other(tiny_model_dir: Path, tokenizer: Any) -> None:
    """A packed block's loss equals the sum of its examples' losses, each computed alone."""
    torch = pytest.importorskip("torch")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    rows = list(generate_rows("text", 6, seed=5))
    examples = [
        render_row(r, "text", tokenizer, train_on_inputs=False, sequence_len=64) for r in rows
    ]
    blocks = pack_examples(examples, 128, tokenizer.pad_token_id)
    assert len(blocks) == 1
    with torch.no_grad():
        packed = Collator(tokenizer.pad_token_id)(blocks)
        # No KV cache: with one, transformers skips the packed-sequence mask (as in training).
        packed_sum = model(**packed, use_cache=False).loss * sum(
            e.trained_tokens - 1 for e in examples
        )
        alone = sum(
            model(**Collator(tokenizer.pad_token_id)([e])).loss * (e.trained_tokens - 1)
            for e in examples
        )
    assert float(packed_sum) == pytest.approx(float(alone), rel=1e-4)


def test_reads_zstd_shards(tokenizer: Any, tmp_path: Path) -> None:
    rows = list(generate_rows("alpaca", 20, seed=1))
    plain = tmp_path / "rows.jsonl"
    write_jsonl(plain, rows)
    packed = tmp_path / "rows.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    kw: dict[str, Any] = {"sequence_len": 128, "train_on_inputs": False}
    assert load_examples([packed], "alpaca", tokenizer, **kw) == load_examples(
        [plain], "alpaca", tokenizer, **kw
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"instruction": "a", "output": "b"}\n{not json\n', r"rows\.jsonl:2: not valid JSON"),
        ('{"instruction": "a"}\n', r"rows\.jsonl:1: not a alpaca row: missing 'output'"),
        ("\n\n", r"no usable alpaca rows"),
        ("[1, 2]\n", r"rows\.jsonl:1: .*JSON object"),
    ],
)
def test_bad_data_names_the_file_and_line(
    tokenizer: Any, tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_examples([path], "alpaca", tokenizer, sequence_len=64, train_on_inputs=False)


def test_bad_files_are_refused(tokenizer: Any, tmp_path: Path) -> None:
    kw: dict[str, Any] = {"sequence_len": 64, "train_on_inputs": False}
    with pytest.raises(DataError, match=r"expected a \.jsonl or \.jsonl\.zst"):
        load_examples([tmp_path / "rows.csv"], "alpaca", tokenizer, **kw)
    with pytest.raises(DataError, match="no such file"):
        load_examples([tmp_path / "missing.jsonl"], "alpaca", tokenizer, **kw)
    broken = tmp_path / "broken.jsonl.zst"
    broken.write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"broken\.jsonl\.zst"):
        load_examples([broken], "alpaca", tokenizer, **kw)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(json.dumps({"text": "a"}).encode() + b"\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples([binary], "text", tokenizer, **kw)
