"""One QLoRA training run: a TrainTask and its data in, a PEFT adapter and metrics out.

The run is transformers' Trainer over a PEFT model; this module only chooses its settings
from the task and reports through `TrainingHooks`:

    base model   loaded 4-bit (NF4 or FP4, double-quantized scales), 8-bit or unquantized
                 with bitsandbytes; compute in bf16 where the device supports it, else fp32;
                 `prepare_model_for_kbit_training` (norms in fp32, input grads for
                 gradient checkpointing)
    adapter      a fresh LoRA init (seeded from the task) or the round's start adapter,
                 loaded trainable; explicit target modules or "all-linear"
    optimizer    any of TrainTask.optimizer (AdamW, bitsandbytes 8-bit / paged AdamW),
                 warmup then the task's decay schedule (over its own steps, or its slice
                 of a schedule spanning the trial's rounds: `schedule_steps`,
                 `schedule_offset`), gradient clipping and accumulation
    data         worker/data.py (labels on the responses only unless train_on_inputs;
                 optional packing), shuffled by the Trainer's seeded sampler
    checkpoints  every `checkpoint_steps` and when a hook asks to stop (worker/checkpoint.py)

Outputs in `work_dir`: `adapter/` (adapter_config.json + adapter_model.safetensors),
`metrics.json`, and `checkpoints/checkpoint-<step>/`.

Example (what `cotune train-local` runs):
    run_training(task, Path("out"), train_files=[Path("train.jsonl")], eval_file=None)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cotune.orchestrator.protocol.task import TrainTask
from cotune.worker.basemodel import load_error, resolve_base_model
from cotune.worker.checkpoint import check_checkpoint, tidy
from cotune.worker.data import Collator, Example, Fit, load_examples, pack_examples
from cotune.worker.schedule import trainer_class

if TYPE_CHECKING:
    import torch

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
# Checkpoints kept on disk: the newest, and the one before while the newest is handed on.
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class Progress:
    step: int
    max_steps: int
    loss: float | None
    learning_rate: float
    tokens_per_s: float
    tokens_seen: int
    memory_bytes: int


class TrainingHooks(Protocol):
    def on_progress(self, progress: Progress) -> bool:
        """After each optimizer step; False stops: a checkpoint is saved, the run returns."""
        ...

    def on_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
        """After each checkpoint is written locally (every checkpoint_steps, and on stop)."""
        ...


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, float | int]
    stopped: bool
    # (step, loss) for every optimizer step of this session, as the Trainer logged them.
    losses: tuple[tuple[int, float], ...] = ()


class TrainingError(RuntimeError):
    """The task cannot run here (device, settings); the message says which setting."""


def compute_dtype(task: TrainTask) -> torch.dtype:
    """The dtype matmuls run in: the task's choice, or bf16 where supported else fp32."""
    import torch

    cuda = torch.cuda.is_available()
    choice = task.quantization.compute_dtype
    if choice == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if choice == "fp16" and not cuda:
        raise TrainingError("quantization.compute_dtype fp16 needs a CUDA device; use fp32 or auto")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


def quantization_config(task: TrainTask, dtype: torch.dtype) -> Any:
    """The bitsandbytes config of the task (None: load unquantized)."""
    from transformers import BitsAndBytesConfig

    quant = task.quantization
    if quant.type == "none":
        return None
    if quant.type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_base(task: TrainTask, *, models_dir: Path | None = None) -> tuple[Any, Any]:
    """(quantized base model, tokenizer) of the task; BaseModelError if it cannot load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_base_model(task.base_model, task.base_model_revision, cache_dir=models_dir)
    dtype = compute_dtype(task)
    quant = quantization_config(task, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, **source.pretrained_kwargs()}
    if quant is not None:
        kwargs["quantization_config"] = quant
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.pretrained_kwargs())
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as e:
        raise load_error(source, e) from e
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id serves; EOS is the usual one.
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False  # no KV cache while training
    return model, tokenizer


def peft_model(task: TrainTask, model: Any, start_adapter: Path | None) -> Any:
    """The base wrapped for k-bit training with a trainable LoRA (fresh or `start_adapter`)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    checkpointing = {"use_reentrant": False}
    if task.quantization.type != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=task.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing,
        )
    elif task.gradient_checkpointing:
        model.activation_checkpointing_enable(checkpointing)
        model.enable_input_require_grads()
    if start_adapter is not None:
        if not (Path(start_adapter) / "adapter_config.json").is_file():
            raise TrainingError(f"start adapter {start_adapter}: no adapter_config.json there")
        return PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True)
    lora = task.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # LoRA's A factors are drawn from torch's global RNG: seed it from the task.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.seed)
        return get_peft_model(model, config)


def training_arguments(task: TrainTask, output_dir: Path, dtype: torch.dtype) -> Any:
    """The Trainer's arguments for the task."""
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    if task.warmup_ratio is not None:
        # The Trainer reads a warmup_steps below 1 as a fraction of the run.
        warmup: float = min(task.warmup_ratio, 0.999)
    else:
        warmup = task.warmup_steps or 0
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=task.micro_batch_size,
        gradient_accumulation_steps=task.gradient_accumulation_steps,
        learning_rate=task.learning_rate,
        lr_scheduler_type=task.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=task.weight_decay,
        optim=task.optimizer,
        max_steps=task.max_steps or -1,
        num_train_epochs=task.num_epochs,
        max_grad_norm=task.max_grad_norm,
        activation_checkpointing=task.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not cuda,
        seed=task.seed,
        data_seed=task.seed,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps" if task.checkpoint_steps else "no",
        save_steps=task.checkpoint_steps or 500,
        save_total_limit=KEEP_CHECKPOINTS,
        include_num_input_tokens_seen="non_padding",
        label_names=["labels"],
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        report_to="none",
        disable_tqdm=True,
    )


def memory_in_use() -> int:
    """Peak CUDA memory allocated, or this process's resident memory on CPU."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import psutil

    return int(psutil.Process().memory_info().rss)


def _callback(task: TrainTask, hooks: TrainingHooks | None) -> Any:
    from transformers import TrainerCallback

    class HooksCallback(TrainerCallback):
        """Turns the Trainer's events into Progress reports, checkpoint notices and stops."""

        def __init__(self) -> None:
            self.stopped = False
            self.losses: list[tuple[int, float]] = []
            self.started = time.perf_counter()
            self.tokens_at_start = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()
            self.tokens_at_start = state.num_input_tokens_seen

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # The Trainer checkpoints the last step too; the adapter is the result there.
            every = task.checkpoint_steps
            if state.global_step >= state.max_steps and (not every or state.global_step % every):
                control.should_save = False

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if not logs or "loss" not in logs:
                return
            loss = float(logs["loss"])
            self.losses.append((state.global_step, loss))
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            progress = Progress(
                step=state.global_step,
                max_steps=state.max_steps,
                loss=loss,
                learning_rate=float(logs.get("learning_rate", 0.0)),
                tokens_per_s=(state.num_input_tokens_seen - self.tokens_at_start) / elapsed,
                tokens_seen=int(state.num_input_tokens_seen),
                memory_bytes=memory_in_use(),
            )
            if hooks is not None and not hooks.on_progress(progress):
                self.stopped = True
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tidy(path)
            if hooks is not None:
                hooks.on_checkpoint(path, state.global_step)

    return HooksCallback()


def run_training(
    task: TrainTask,
    work_dir: Path,
    *,
    train_files: list[Path],
    eval_file: Path | None = None,
    start_adapter: Path | None = None,
    resume_from: Path | None = None,
    hooks: TrainingHooks | None = None,
    models_dir: Path | None = None,
) -> TrainResult:
    """Train `task` on `train_files` into `work_dir` (see the module docstring).

    `resume_from` (a checkpoint folder) continues that run: same batches, same losses.
    `models_dir` caches built-in base models [default: $COTUNE_HOME/models].
    """
    from transformers import PrinterCallback

    work_dir = Path(work_dir)
    if not train_files:
        raise TrainingError("train_files is empty: a task needs at least one data file")
    if resume_from is not None:
        check_checkpoint(resume_from)
    model, tokenizer = load_base(task, models_dir=models_dir)
    fit = Fit(task.sequence_len)
    examples = load_examples(
        train_files,
        task.dataset_format,
        tokenizer,
        sequence_len=task.sequence_len,
        train_on_inputs=task.train_on_inputs,
        fit=fit,
    )
    eval_examples = None
    if eval_file is not None:
        eval_examples = load_examples(
            [eval_file],
            task.dataset_format,
            tokenizer,
            sequence_len=task.sequence_len,
            train_on_inputs=task.train_on_inputs,
        )
    dataset: list[Any] = list(examples)
    if task.sample_packing:
        dataset = list(pack_examples(examples, task.sequence_len, tokenizer.pad_token_id))

    model = peft_model(task, model, start_adapter)
    dtype = compute_dtype(task)
    callback = _callback(task, hooks)
    trainer = trainer_class(task)(
        model=model,
        args=training_arguments(task, work_dir / CHECKPOINTS_DIR, dtype),
        train_dataset=dataset,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through the hooks instead
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    adapter_dir = work_dir / ADAPTER_DIR
    trained: Any = trainer.model
    trained.save_pretrained(str(adapter_dir), safe_serialization=True)
    losses = [loss for _, loss in callback.losses]
    runtime = float(output.metrics.get("train_runtime", 0.0))
    session_tokens = trainer.state.num_input_tokens_seen - callback.tokens_at_start
    metrics: dict[str, float | int] = {
        "tokens": int(trainer.state.num_input_tokens_seen),
        "steps": int(trainer.state.global_step),
        "train_loss": float(output.training_loss),
        "examples": len(examples),
        # What sequence_len kept of the shard: rows cut short, rows that trained nothing.
        "rows": fit.rows,
        "rows_cut": fit.cut,
        "rows_dropped": fit.dropped,
        "train_runtime_s": runtime,
        "tokens_per_s": session_tokens / runtime if runtime > 0 else 0.0,
        "peak_memory_bytes": memory_in_use(),
    }
    if losses:
        metrics.update(first_loss=losses[0], last_loss=losses[-1])
    if eval_examples is not None:
        metrics["eval_loss"] = mean_loss(
            trained, eval_examples, task.micro_batch_size, tokenizer.pad_token_id
        )
        metrics["eval_tokens"] = sum(e.trained_tokens for e in eval_examples)
    (work_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return TrainResult(adapter_dir, metrics, callback.stopped, tuple(callback.losses))


def mean_loss(model: Any, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean cross-entropy of `model` over the trained tokens of `examples`."""
    import torch

    collate = Collator(pad_id)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = {
                    k: v.to(device)
                    for k, v in collate(examples[start : start + batch_size]).items()
                }
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                # Position t predicts token t+1.
                labels = batch["labels"][:, 1:]
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                total += float(losses)
                count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise TrainingError("no trained tokens in the evaluation data")
    return total / count


def evaluate_adapter(
    task: TrainTask, adapter_dir: Path, eval_file: Path, *, models_dir: Path | None = None
) -> float:
    """Mean eval loss of `adapter_dir` on `eval_file`, the base loaded as the task says."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise TrainingError(f"adapter {adapter_dir}: no adapter_config.json there")
    model, tokenizer = load_base(task, models_dir=models_dir)
    examples = load_examples(
        [eval_file],
        task.dataset_format,
        tokenizer,
        sequence_len=task.sequence_len,
        train_on_inputs=task.train_on_inputs,
    )
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return mean_loss(model, examples, task.micro_batch_size, tokenizer.pad_token_id)
