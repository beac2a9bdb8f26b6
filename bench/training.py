"""Training throughput: cotune's training path against plain Trainer + PEFT, same settings.

    python -m bench training                 # 3 rounds of 60 steps each side
    python -m bench training --quick         # 2 rounds of 15 steps
    python -m bench training --steps=60 --rounds=5 --threads=2

Both sides train the tiny Llama (worker/tinymodel.py) with a 4-bit NF4 base (double quant,
fp32 compute on CPU), LoRA r=8 on all linear layers, gradient checkpointing, AdamW, cosine
schedule, on the same rendered alpaca rows (sequence 128, micro-batch 8). "ours" is
`worker.training.run_training`; the baseline builds the same model, LoRA and
TrainingArguments by hand and calls `Trainer.train` with transformers' own padding collator.
Each run is a fresh subprocess, alternating ours, baseline, ours, baseline, ...; throughput
is the Trainer's non-padding input tokens over time on both sides, reported three ways:
the median over rounds of tokens / `train_runtime`; best-of-rounds (each step at its
fastest over the rounds, timed at the same point of the Trainer loop on both sides: the
step's log event); and the paired step ratio, the median over every (round, step) of the
baseline's time for that step over ours, from the two runs of the round (adjacent in time,
the same batch). The machine these run on is shared, and other jobs add up to +-25% to
whole runs. Best-of-rounds is one minimum per step, so one lucky run moves it: the same
code gave 0.924 and 1.207 in two 3-round runs minutes apart; the second run's paired
median was 1.086, as the run before had 1.084 best-of-rounds. The target applies to the
paired ratio.
Writes bench/out/training.json. Target: paired step ratio ours / baseline >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "training.json"
TARGET = 0.97

SETTINGS: dict[str, Any] = {
    "dataset_format": "alpaca",
    "sequence_len": 128,
    "micro_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5e-3,
    "lr_scheduler": "cosine",
    "warmup_steps": 2,
    "weight_decay": 0.0,
    "optimizer": "adamw_torch",
    "gradient_checkpointing": True,
    "max_grad_norm": 1.0,
    "seed": 0,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
    "quantization": {"type": "nf4", "double_quant": True, "compute_dtype": "fp32"},
}


class StepClock:
    """When each optimizer step was logged, and the tokens seen by then (both sides alike)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []

    def tick(self, tokens_seen: int) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(tokens_seen)

    def figures(self, tokens: int, runtime: float) -> dict[str, Any]:
        return {
            "tokens": tokens,
            "train_runtime_s": runtime,
            "tokens_per_s": tokens / runtime,
            "step_s": [b - a for a, b in zip(self.times, self.times[1:], strict=False)],
            "step_tokens": [b - a for a, b in zip(self.tokens, self.tokens[1:], strict=False)],
        }


def _ours(model_dir: Path, data: Path, steps: int, work: Path) -> dict[str, Any]:
    from cotune.orchestrator.protocol.task import TrainTask
    from cotune.worker.training import run_training

    clock = StepClock()

    class Hooks:
        def on_progress(self, progress: Any) -> bool:
            clock.tick(progress.tokens_seen)
            return True

        def on_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
            pass

    task = TrainTask.model_validate({**SETTINGS, "base_model": str(model_dir), "max_steps": steps})
    result = run_training(task, work, train_files=[data], hooks=Hooks())
    return clock.figures(int(result.metrics["tokens"]), float(result.metrics["train_runtime_s"]))


def _baseline(model_dir: Path, data: Path, steps: int, work: Path) -> dict[str, Any]:
    """Transformers + PEFT as their docs show it, with the settings above written out."""
    import torch
    from cotune.worker.data import load_examples
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    clock = StepClock()

    class Clock(TrainerCallback):  # the same measuring point as ours: each step's log
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                clock.tick(state.num_input_tokens_seen)

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=quant, dtype=torch.float32
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    torch.manual_seed(0)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    # The same token ids and labels as ours (rendering is not what is timed).
    examples = load_examples([data], "alpaca", tokenizer, sequence_len=128, train_on_inputs=False)
    rows = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]
    args = TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.0,
        optim="adamw_torch",
        max_steps=steps,
        max_grad_norm=1.0,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        data_seed=0,
        logging_steps=1,
        save_strategy="no",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    output = trainer.train()
    runtime = float(output.metrics["train_runtime"])
    return clock.figures(int(trainer.state.num_input_tokens_seen), runtime)


def _child(argv: list[str]) -> int:
    side, model_dir, data, steps, work = argv
    import warnings

    warnings.filterwarnings("ignore")
    run = _ours if side == "ours" else _baseline
    figures = run(Path(model_dir), Path(data), int(steps), Path(work))
    print("RESULT " + json.dumps(figures), flush=True)
    return 0


def _spawn(side: str, model_dir: Path, data: Path, steps: int, work: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "bench.training", "--child", side, str(model_dir), str(data)]
    started = time.perf_counter()
    proc = subprocess.run(
        [*cmd, str(steps), str(work)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "wall_s": time.perf_counter() - started}


def main(argv: list[str]) -> int:
    """Run the benchmark; exit 1 when the ratio misses its target."""
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench training", description=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 15 steps")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 15, 2

    from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl
    from cotune.worker.tinymodel import build_tiny_llama

    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="cotune-bench-training-") as tmp:
        folder = Path(tmp)
        model_dir = build_tiny_llama(folder / "tiny-llama")
        data = folder / "train.jsonl"
        write_jsonl(data, generate_rows("alpaca", 2000, seed=0))
        for round_ in range(args.rounds):
            for side in ("ours", "baseline"):
                work = folder / f"{side}-{round_}"
                figures = _spawn(side, model_dir, data, args.steps, work, args.threads)
                runs[side].append(figures)
                print(
                    f"round {round_ + 1} {side:8} {figures['tokens_per_s']:9.0f} tokens/s "
                    f"({figures['tokens']} tokens in {figures['train_runtime_s']:.2f} s)",
                    flush=True,
                )
    medians = {side: statistics.median(r["tokens_per_s"] for r in rs) for side, rs in runs.items()}
    median_ratio = medians["ours"] / medians["baseline"]
    best = {side: _best_of_rounds(rs) for side, rs in runs.items()}
    best_ratio = best["ours"] / best["baseline"]
    ratio = _paired_ratio(runs["ours"], runs["baseline"])
    same_tokens = len({r["tokens"] for rs in runs.values() for r in rs}) == 1
    report = {
        "benchmark": "training",
        "settings": {**SETTINGS, "max_steps": args.steps, "threads": args.threads},
        "rounds": args.rounds,
        "runs": runs,
        "median_tokens_per_s": medians,
        "median_ratio": median_ratio,
        "best_of_rounds_tokens_per_s": best,
        "best_of_rounds_ratio": best_ratio,
        "ratio": ratio,  # the paired step ratio: the one the target applies to
        "target": TARGET,
        "same_tokens": same_tokens,
        "device": "cuda" if _cuda() else "cpu",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"median tokens/s: ours {medians['ours']:.0f}, baseline {medians['baseline']:.0f} "
        f"(ratio {median_ratio:.3f})"
    )
    print(
        f"best-of-rounds tokens/s: ours {best['ours']:.0f}, baseline {best['baseline']:.0f} "
        f"(ratio {best_ratio:.3f})"
    )
    print(
        f"paired step ratio (median of baseline / ours per step): {ratio:.3f}, target >= "
        f"{TARGET}; tokens identical: {same_tokens}"
    )
    print(f"wrote {args.out}")
    return 0 if ratio >= TARGET and same_tokens else 1


def _paired_ratio(ours: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> float:
    """The median over every (round, step) of the baseline's step time over ours.

    The two runs of a round are adjacent in time and train the same batch at step i, so the
    ratio of their step times cancels most of what the shared machine adds to both; the
    median of all of them ignores the steps a burst of other work hit on one side only.
    """
    ratios = [
        b_s / o_s
        for o, b in zip(ours, baseline, strict=True)
        for o_s, b_s in zip(o["step_s"], b["step_s"], strict=False)
        if o_s > 0
    ]
    return statistics.median(ratios)


def _best_of_rounds(runs: list[dict[str, Any]]) -> float:
    """Tokens/s with each step at its fastest over the rounds.

    Both sides train the same batches in the same order, so step i costs the same work in
    every run; on a shared machine other jobs only ever add time to a step, so the fastest
    of the rounds is the least disturbed measure of that step.
    """
    steps = min(len(r["step_s"]) for r in runs)
    fastest = [min(r["step_s"][i] for r in runs) for i in range(steps)]
    return sum(runs[0]["step_tokens"][:steps]) / sum(fastest)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
