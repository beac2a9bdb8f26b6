"""Training checkpoints: what one holds, how to check it, and where the latest one is.

A checkpoint is the folder transformers' Trainer writes (`checkpoint-<step>/`), so resuming
is `Trainer.train(resume_from_checkpoint=...)`; this module only knows its contents:

    adapter_config.json, adapter_model.safetensors   the LoRA weights (safetensors)
    optimizer.pt, scheduler.pt                       optimizer moments, LR schedule position
    rng_state.pth                                    python/numpy/torch RNG states
    trainer_state.json                               global step, tokens seen, log history

The data position needs no file of its own: the Trainer's sampler is seeded from the task's
seed, and on resume it skips the batches already consumed (global step x accumulation), so
the resumed run sees the same batches in the same order as an uninterrupted one.

Safety: checkpoints may come from another worker, so nothing in them is unpickled freely.
The Trainer reads the .pt/.pth files with `torch.load(weights_only=True)` (tensors and plain
containers only) and the weights from safetensors. `training_args.bin` (a pickled
TrainingArguments the Trainer writes but never reads back) is deleted by `tidy` before a
checkpoint leaves the machine, and `check_checkpoint` refuses a folder that carries one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
REQUIRED_FILES = ADAPTER_FILES + STATE_FILES
# Pickles the Trainer writes for its own bookkeeping but never loads on resume.
PICKLE_ONLY_FILES = ("training_args.bin",)
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A folder that is not a usable checkpoint; the message names the folder and file."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    tokens_seen: int


def tidy(path: Path) -> None:
    """Drop what a checkpoint must not carry off this machine (pickles never read back)."""
    for name in PICKLE_ONLY_FILES:
        (Path(path) / name).unlink(missing_ok=True)


def check_checkpoint(path: Path) -> CheckpointInfo:
    """The step and tokens of a complete checkpoint folder; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such folder")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing {', '.join(missing)}")
    pickles = [name for name in PICKLE_ONLY_FILES if (path / name).exists()]
    if pickles:
        raise CheckpointError(
            f"checkpoint {path}: carries {', '.join(pickles)} (a pickle); refusing to use it"
        )
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        step = int(state["global_step"])
        tokens = int(state.get("num_input_tokens_seen") or 0)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable trainer_state.json ({e})") from None
    if step < 0 or tokens < 0:
        raise CheckpointError(f"checkpoint {path}: negative step or token count")
    return CheckpointInfo(path=path, step=step, tokens_seen=tokens)


def latest_checkpoint(folder: Path) -> Path | None:
    """The `checkpoint-<step>` folder with the highest step under `folder`, if any."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))
    ]
    return max(found)[1] if found else None
