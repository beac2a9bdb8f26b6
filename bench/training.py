"""Training throughput: cotune's training path against plain Trainer + PEFT, same settings.

    python -m bench training                 # 6 rounds of 40 steps each side
    python -m bench training --quick         # 2 rounds of 15 steps
    python -m bench training --steps=60 --rounds=8 --threads=2

Both sides train the tiny Llama (worker/tinymodel.py) with a 4-bit NF4 base (double quant,
fp32 compute on CPU), LoRA r=8 on all linear layers, gradient checkpointing, AdamW, cosine
schedule, on the same rendered alpaca rows (sequence 128, micro-batch 8). "ours" is
`worker.training.run_training`; the baseline builds the same model, LoRA and
TrainingArguments by hand and calls `Trainer.train` with transformers' own padding collator.
Each run is a fresh process. A round runs one of each side at once, each pinned to a core of
its own (which side gets which core alternates by round), so both see the same machine at
the same time; on one core they run one after the other. Throughput is the Trainer's
non-padding input tokens over time, reported three ways: the median over rounds of tokens /
`train_runtime`; the paired step ratio (the median over every (round, step) of the
baseline's time for the step over ours); and best-of-rounds (each step at its fastest over
the rounds, timed at the same point of the Trainer loop on both sides: the step's log
event), which the target applies to.

Why best-of-rounds, over six rounds: this VM runs a whole process fast or slow (step times
of 0.055-0.065 s or 0.085-0.095 s for the same work, the process's CPU time equal to its wall
time, so it is not time spent waiting for a core), and a process keeps its speed. A figure
from one pair of processes is a coin toss: 3-round runs of unchanged code gave
best-of-rounds 0.924 and 1.207 and paired ratios of 0.958, 0.828 and 1.19 within an hour.
The per-step minimum over six processes a side finds each side's fast steps.
Writes bench/out/training.json. Target: best-of-rounds ratio ours / baseline >= 0.97.
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
        self.cpu: list[float] = []
        self.tokens: list[int] = []

    def tick(self, tokens_seen: int) -> None:
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.tokens.append(tokens_seen)

    def figures(self, tokens: int, runtime: float) -> dict[str, Any]:
        return {
            "tokens": tokens,
            "train_runtime_s": runtime,
            "tokens_per_s": tokens / runtime,
            "step_s": [b - a for a, b in zip(self.times, self.times[1:], strict=False)],
            "step_cpu_s": [b - a for a, b in zip(self.cpu, self.cpu[1:], strict=False)],
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


def _start(
    side: str, model_dir: Path, data: Path, steps: int, work: Path, threads: int, cpu: int | None
) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "bench.training", "--child", side, str(model_dir), str(data)]
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    return subprocess.Popen(
        [*cmd, str(steps), str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=pin,
    )


def _result(side: str, proc: subprocess.Popen[str], started: float) -> dict[str, Any]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{err[-3000:]}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "wall_s": time.perf_counter() - started}


def _round(
    round_: int, model_dir: Path, folder: Path, data: Path, steps: int, threads: int
) -> dict[str, dict[str, Any]]:
    """One run of each side: at once, each pinned to a core of its own (swapped every
    round), where the machine has two; else one after the other."""
    cpus = sorted(os.sched_getaffinity(0))
    started = time.perf_counter()
    if len(cpus) >= 2 and threads == 1:
        sides = ("ours", "baseline") if round_ % 2 == 0 else ("baseline", "ours")
        procs = {
            side: _start(side, model_dir, data, steps, folder / f"{side}-{round_}", threads, cpu)
            for side, cpu in zip(sides, cpus[:2], strict=True)
        }
        return {side: _result(side, procs[side], started) for side in ("ours", "baseline")}
    figures = {}
    for side in ("ours", "baseline"):
        proc = _start(side, model_dir, data, steps, folder / f"{side}-{round_}", threads, None)
        figures[side] = _result(side, proc, time.perf_counter())
    return figures


def main(argv: list[str]) -> int:
    """Run the benchmark; exit 1 when the ratio misses its target."""
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench training", description=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=6, help="runs per side (pairs at once)")
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
            both = _round(round_, model_dir, folder, data, args.steps, args.threads)
            for side, figures in both.items():
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
    paired = _paired_ratio(runs["ours"], runs["baseline"])
    ratio = best_ratio
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
        "paired_step_ratio": paired,
        "ratio": ratio,  # best-of-rounds: the one the target applies to
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
    print(f"paired step ratio (median of baseline / ours per step): {paired:.3f}")
    print(
        f"best-of-rounds tokens/s: ours {best['ours']:.0f}, baseline {best['baseline']:.0f} "
        f"(ratio {best_ratio:.3f}, target >= {TARGET}); tokens identical: {same_tokens}"
    )
    print(f"wrote {args.out}")
    return 0 if ratio >= TARGET and same_tokens else 1


def _paired_ratio(ours: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> float:
    """The median over every (round, step) of the baseline's step time over ours: the two
    runs of a round ran at once and train the same batch at step i. Reported beside the
    target's figure; it cannot see past a round whose two processes run at different
    speeds (the module docstring)."""
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
