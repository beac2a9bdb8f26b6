"""`cotune evaluate`: the eval loss of a PEFT adapter (or of the bare base model) on held-out rows.

The coordinator's trusted evaluation step runs this command as a subprocess: the command
line is the contract between the roles (orchestrator/ never imports worker/). It loads the
base model exactly as a training task of the same TrainTask would (quantization included),
puts the adapter on it, and writes the token-weighted mean cross-entropy to a JSON file:

    cotune evaluate --task task.json --adapter merged/ --eval eval.jsonl.zst --out result.json
    cotune evaluate --task task.json --base-only --eval eval.jsonl.zst --out base.json

result.json: {"eval_loss": 2.31, "eval_tokens": 1520, "examples": 40, "rows": 42,
"rows_cut": 3, "rows_dropped": 2, "sequence_len": 512, "seconds": 3.2,
"adapter": "merged/" or null, "base_model": the folder (or hub id) the base loaded from}.
Exit codes: 0 done, 1 evaluation failed, 2 bad input, 3 no usable rows (every eval row
dropped at the task's sequence_len, or none at all; the message says which).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cotune.orchestrator.protocol.task import TrainTask
from pydantic import ValidationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_ROWS = 0, 1, 2, 3


class UsageError(ValueError):
    """Bad command-line input; the message names the flag or file."""


@dataclass(frozen=True)
class EvaluateOptions:
    task: Path
    eval_file: Path
    out: Path
    adapter: Path | None = None
    base_only: bool = False
    models_dir: Path | None = None


def read_task(path: Path) -> TrainTask:
    """The TrainTask in the JSON file `path`; UsageError naming the file and the field."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--task {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return TrainTask.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise UsageError(f"--task {path}: {where}: {first['msg']}") from None


def check_options(options: EvaluateOptions) -> TrainTask:
    """Validate the flags before anything heavy loads; the task to evaluate under."""
    if options.base_only == (options.adapter is not None):
        raise UsageError("give exactly one of --adapter DIR and --base-only")
    if options.adapter is not None and not (options.adapter / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {options.adapter}: no adapter_config.json in that folder")
    if not options.eval_file.is_file():
        raise UsageError(f"--eval {options.eval_file}: no such file")
    if options.out.exists() and options.out.is_dir():
        raise UsageError(f"--out {options.out}: is a folder; give a file name")
    return read_task(options.task)


def evaluate(options: EvaluateOptions, task: TrainTask) -> dict[str, object]:
    """Load the base (and adapter), compute the eval loss; the result mapping."""
    from cotune.worker.data import Fit, load_examples
    from cotune.worker.training import TrainingError, load_base, mean_loss

    started = time.perf_counter()
    model, tokenizer = load_base(task, models_dir=options.models_dir)
    fit = Fit(task.sequence_len)
    examples = load_examples(
        [options.eval_file],
        task.dataset_format,
        tokenizer,
        sequence_len=task.sequence_len,
        train_on_inputs=task.train_on_inputs,
        fit=fit,
    )
    if not examples:
        raise TrainingError(f"--eval {options.eval_file}: no usable rows")
    base_location = str(model.name_or_path)  # the folder (or hub id) the base came from
    if options.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(options.adapter))
    loss = mean_loss(model, examples, task.micro_batch_size, tokenizer.pad_token_id)
    if not math.isfinite(loss):
        raise TrainingError(f"the eval loss is not finite ({loss})")
    return {
        "eval_loss": loss,
        "eval_tokens": sum(e.trained_tokens for e in examples),
        "examples": len(examples),
        **fit.counts(),  # rows, rows_cut, rows_dropped, sequence_len: what the eval rows kept
        "seconds": round(time.perf_counter() - started, 3),
        "adapter": str(options.adapter) if options.adapter is not None else None,
        "base_model": base_location,
    }


def evaluate_command(options: EvaluateOptions) -> int:
    """Run `cotune evaluate`; the process exit code. Errors go to stderr, one line each."""
    try:
        task = check_options(options)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from cotune.worker.data import NoUsableRows

    try:
        result = evaluate(options, task)
    except NoUsableRows as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_ROWS
    except Exception as exc:  # a failed evaluation of any kind: report it, exit 1
        print(f"error: evaluation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    options.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = options.out.with_name(options.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(options.out)  # a reader never sees half a result
    print(f"eval_loss {result['eval_loss']:.6f} over {result['eval_tokens']} tokens")
    return EXIT_OK
