"""Training data: dataset rows (alpaca, chat, text, completion) rendered into token ids.

Each row becomes one `Example`: `input_ids` and `labels`, where labels are -100 (ignored by
the loss) on the prompt part unless `train_on_inputs` is set, so the model learns the
responses only. How each format renders:

    alpaca      bos + ALPACA template(instruction, input) | output + eos
    completion  bos + prompt | completion + eos
    chat        the tokenizer's chat template; labels on the assistant turns (each turn's
                text from the end of the generation prompt before it to the end of the turn)
    text        bos + text + eos, all of it trained

(`|` marks where the labels start.) Examples longer than `sequence_len` are cut at the end;
an example left with no trained token is dropped. With packing, whole examples are laid
greedily, in order, into blocks of exactly `sequence_len` tokens; position ids restart at 0
for each example, which transformers turns into a block-diagonal causal mask, so packed
examples never attend to each other and train as they would alone.

Shards are JSON lines, plain (`.jsonl`) or zstd-compressed (`.jsonl.zst`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.orchestrator.protocol.formats import row_checker

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True)
class Block:
    """A packed training sequence: several examples, then padding, `sequence_len` long."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    position_ids: tuple[int, ...]


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line of a .jsonl or .jsonl.zst file."""
    path = Path(path)
    if not path.name.endswith((".jsonl", ".jsonl.zst")):
        raise DataError(f"{path}: expected a .jsonl or .jsonl.zst file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    stream_errors: tuple[type[Exception], ...] = ()
    with path.open("rb") as raw:
        if path.name.endswith(".zst"):
            import zstandard

            stream: Any = zstandard.ZstdDecompressor().stream_reader(raw)
            stream_errors = (zstandard.ZstdError,)
        else:
            stream = raw
        text = io.TextIOWrapper(stream, encoding="utf-8")
        try:
            for lineno, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
        except stream_errors as e:
            raise DataError(f"{path}: not a valid zstd stream ({e})") from None


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _prompt_response(
    tokenizer: Any, prompt: str, response: str, train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    # Prompt and response are tokenized apart so the label boundary is a token boundary.
    prompt_ids = _bos(tokenizer) + _ids(tokenizer, prompt)
    response_ids = _ids(tokenizer, response) + _eos(tokenizer)
    prompt_labels = prompt_ids if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return prompt_ids + response_ids, prompt_labels + response_ids


def _chat(
    tokenizer: Any, messages: list[dict[str, str]], train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        if not msgs and not generation_prompt:
            return ""
        return str(
            tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        # Templates that rewrite earlier turns (rare) break the prefix property this relies on.
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise DataError("the chat template does not render conversations prefix by prefix")
        spans.append((len(prefix), len(upto)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    if train_on_inputs:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for k, (lo, _hi) in enumerate(encoded["offset_mapping"]):
        if any(start <= lo < end for start, end in spans):
            labels[k] = ids[k]
    return ids, labels


def render_row(
    row: dict[str, Any], fmt: str, tokenizer: Any, *, train_on_inputs: bool, sequence_len: int
) -> Example:
    """One checked row of format `fmt` as token ids and labels, cut to `sequence_len`."""
    if fmt == "alpaca":
        extra = row.get("input")
        template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=row["instruction"], input=extra or "")
        ids, labels = _prompt_response(tokenizer, prompt, row["output"], train_on_inputs)
    elif fmt == "completion":
        ids, labels = _prompt_response(tokenizer, row["prompt"], row["completion"], train_on_inputs)
    elif fmt == "chat":
        ids, labels = _chat(tokenizer, row["messages"], train_on_inputs)
    elif fmt == "text":
        ids = _bos(tokenizer) + _ids(tokenizer, row["text"]) + _eos(tokenizer)
        labels = list(ids)
    else:
        raise DataError(f"unknown dataset format {fmt!r}")
    return Example(tuple(ids[:sequence_len]), tuple(labels[:sequence_len]))


def load_examples(
    files: Sequence[Path],
    fmt: str,
    tokenizer: Any,
    *,
    sequence_len: int,
    train_on_inputs: bool,
) -> list[Example]:
    """Every usable row of `files`, rendered; DataError naming file:line on a bad row."""
    check = row_checker(fmt)
    examples: list[Example] = []
    for path in files:
        for lineno, row in read_rows(path):
            reason = check(row)
            if reason:
                raise DataError(f"{path}:{lineno}: not a {fmt} row: {reason}")
            try:
                example = render_row(
                    row, fmt, tokenizer, train_on_inputs=train_on_inputs, sequence_len=sequence_len
                )
            except DataError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            if example.trained_tokens:
                examples.append(example)
    if not examples:
        names = ", ".join(str(p) for p in files) or "(no files)"
        raise DataError(f"{names}: no usable {fmt} rows (empty, or every response cut away)")
    return examples


def pack_examples(examples: Sequence[Example], sequence_len: int, pad_id: int) -> list[Block]:
    """Lay whole examples, in order, into `sequence_len` blocks (see the module docstring)."""
    blocks: list[Block] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []

    def close() -> None:
        free = sequence_len - len(ids)
        # Padding is a segment of its own (positions restart), masked out of the loss.
        blocks.append(
            Block(
                tuple(ids + [pad_id] * free),
                tuple(labels + [IGNORE_INDEX] * free),
                tuple(positions + list(range(free))),
            )
        )
        ids.clear()
        labels.clear()
        positions.clear()

    for example in examples:
        if ids and len(ids) + len(example.input_ids) > sequence_len:
            close()
        ids.extend(example.input_ids)
        # An example's first label is never predicted when it trains alone; packed, the
        # previous example's last token would predict it, so it is masked.
        labels.append(IGNORE_INDEX)
        labels.extend(example.labels[1:])
        positions.extend(range(len(example.input_ids)))
    if ids:
        close()
    return blocks


class Collator:
    """Batches for the Trainer: padded examples, or stacked packed blocks (no padding mask)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Example | Block]) -> dict[str, Any]:
        import torch

        if isinstance(items[0], Block):
            # No attention_mask: transformers derives the per-example mask from position_ids.
            return {
                "input_ids": torch.tensor([b.input_ids for b in items]),
                "labels": torch.tensor([b.labels for b in items]),
                "position_ids": torch.tensor([b.position_ids for b in items]),  # type: ignore[union-attr]
            }
        width = max(len(e.input_ids) for e in items)
        ids, labels, mask = [], [], []
        for e in items:
            free = width - len(e.input_ids)
            ids.append(list(e.input_ids) + [self.pad_id] * free)
            labels.append(list(e.labels) + [IGNORE_INDEX] * free)
            mask.append([1] * len(e.input_ids) + [0] * free)
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }
