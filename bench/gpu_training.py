"""GPU training throughput and peak memory: cotune's path against plain Trainer + PEFT.

    python -m bench gpu_training                  # 3 rounds of 30 steps each side
    python -m bench gpu_training --quick          # 2 rounds of 10 steps
    python -m bench gpu_training --steps=50 --rounds=5 --micro-batch=8

Needs a CUDA device; without one it says so and exits 0 (nothing to measure, nothing
written). The base model has the shape of Llama-3.2-1B (its config written out here, weights
random: no download), saved once in bf16, loaded 4-bit NF4 (double quant, bf16 compute) by
both sides. LoRA r=16 on all linear layers, gradient checkpointing, paged 8-bit AdamW,
sequence 1024 with packing (full blocks), micro-batch 4. Each run is a fresh subprocess,
alternating ours, baseline; tokens/s is the Trainer's non-padding input tokens over its
train_runtime, peak memory is torch.cuda.max_memory_allocated over the whole run (model
load included). The memory estimator's prediction (protocol/memory.py) is reported beside the
measured peak. Writes bench/out/gpu_training.json. Target: tokens/s ratio >= 0.97 and peak
memory ratio <= 1.03.
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
OUT = ROOT / "bench" / "out" / "gpu_training.json"
SPEED_TARGET, MEMORY_TARGET = 0.97, 1.03
SEQUENCE = 1024

# Llama-3.2-1B's architecture (meta-llama/Llama-3.2-1B config.json), random weights.
LLAMA_32_1B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def _settings(micro_batch: int) -> dict[str, Any]:
    return {
        "dataset_format": "alpaca",
        "sequence_len": SEQUENCE,
        "micro_batch_size": micro_batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-4,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "optimizer": "paged_adamw_8bit",
        "gradient_checkpointing": True,
        "sample_packing": True,
        "max_grad_norm": 1.0,
        "seed": 0,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "quantization": {"type": "nf4", "double_quant": True, "compute_dtype": "bf16"},
    }


def _build_model(folder: Path) -> Path:
    """The 1B-shaped model in bf16 plus the tiny model's tokenizer (ids < 1024 fit)."""
    import torch
    from cotune.worker.tinymodel import build_tiny_llama
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tiny = build_tiny_llama(folder / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    config = LlamaConfig(
        **{k: v for k, v in LLAMA_32_1B.items() if k not in ("architectures", "model_type")},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = folder / "llama-3.2-1b-shape"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _measure(run: Any) -> dict[str, float]:
    import torch

    torch.cuda.reset_peak_memory_stats()
    tokens, runtime = run()
    return {
        "tokens": tokens,
        "train_runtime_s": runtime,
        "tokens_per_s": tokens / runtime,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
    }


def _ours(model_dir: Path, data: Path, steps: int, micro_batch: int, work: Path) -> dict:
    from cotune.orchestrator.protocol.task import TrainTask
    from cotune.worker.training import run_training

    fields = {**_settings(micro_batch), "base_model": str(model_dir), "max_steps": steps}
    task = TrainTask.model_validate(fields)

    def run() -> tuple[int, float]:
        result = run_training(task, work, train_files=[data])
        return int(result.metrics["tokens"]), float(result.metrics["train_runtime_s"])

    return _measure(run)


def _baseline(model_dir: Path, data: Path, steps: int, micro_batch: int, work: Path) -> dict:
    """Transformers + PEFT as their docs show them, the same settings written out."""
    import torch
    from cotune.worker.data import load_examples, pack_examples
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    def run() -> tuple[int, float]:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}
        )
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        torch.manual_seed(0)
        lora = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        examples = load_examples(
            [data], "alpaca", tokenizer, sequence_len=SEQUENCE, train_on_inputs=False
        )
        blocks = pack_examples(examples, SEQUENCE, tokenizer.pad_token_id)
        rows = [
            {"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids}
            for b in blocks
        ]
        args = TrainingArguments(
            output_dir=str(work),
            per_device_train_batch_size=micro_batch,
            gradient_accumulation_steps=1,
            learning_rate=2e-4,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            optim="paged_adamw_8bit",
            max_steps=steps,
            max_grad_norm=1.0,
            activation_checkpointing=True,
            activation_checkpointing_kwargs={"use_reentrant": False},
            bf16=True,
            seed=0,
            data_seed=0,
            logging_steps=1,
            save_strategy="no",
            include_num_input_tokens_seen="non_padding",
            remove_unused_columns=False,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=default_data_collator,
            processing_class=tokenizer,
        )
        output = trainer.train()
        return int(trainer.state.num_input_tokens_seen), float(output.metrics["train_runtime"])

    return _measure(run)


def _child(argv: list[str]) -> int:
    side, model_dir, data, steps, micro_batch, work = argv
    import warnings

    warnings.filterwarnings("ignore")
    run = _ours if side == "ours" else _baseline
    figures = run(Path(model_dir), Path(data), int(steps), int(micro_batch), Path(work))
    print("RESULT " + json.dumps(figures), flush=True)
    return 0


def _spawn(side: str, *args: Any) -> dict:
    cmd = [sys.executable, "-m", "bench.gpu_training", "--child", side, *map(str, args)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "wall_s": time.perf_counter() - started}


def _estimate(micro_batch: int) -> int:
    from cotune.orchestrator.protocol.memory import ModelShape, estimate_memory

    estimate = estimate_memory(
        ModelShape.from_config(LLAMA_32_1B),
        "nf4",
        16,
        "all-linear",
        SEQUENCE,
        micro_batch,
        True,
        "paged_adamw_8bit",
        lora_dropout=0.0,
    )
    return estimate.total


def main(argv: list[str]) -> int:
    """Run the benchmark (exit 0 without CUDA: nothing to measure); 1 when a target is missed."""
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench gpu_training", description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 10 steps")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 10, 2

    import torch

    if not torch.cuda.is_available():
        print("gpu_training: skipped, no CUDA device here (this benchmark measures GPU training)")
        return 0

    from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl

    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="cotune-bench-gpu-") as tmp:
        folder = Path(tmp)
        model_dir = _build_model(folder)
        torch.cuda.empty_cache()
        data = folder / "train.jsonl"
        # Enough rows for steps x micro-batch full 1024-token blocks (~57 tokens a row).
        rows = args.steps * args.micro_batch * SEQUENCE // 50 + 100
        write_jsonl(data, generate_rows("alpaca", rows, seed=0))
        for round_ in range(args.rounds):
            for side in ("ours", "baseline"):
                work = folder / f"{side}-{round_}"
                figures = _spawn(side, model_dir, data, args.steps, args.micro_batch, work)
                runs[side].append(figures)
                print(
                    f"round {round_ + 1} {side:8} {figures['tokens_per_s']:9.0f} tokens/s, "
                    f"peak {figures['peak_memory_bytes'] / 2**30:.2f} GiB",
                    flush=True,
                )
    speed = {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    memory = {s: max(r["peak_memory_bytes"] for r in rs) for s, rs in runs.items()}
    speed_ratio = speed["ours"] / speed["baseline"]
    memory_ratio = memory["ours"] / memory["baseline"]
    report = {
        "benchmark": "gpu_training",
        "device": torch.cuda.get_device_name(0),
        "model": "Llama-3.2-1B shape, random weights",
        "settings": {**_settings(args.micro_batch), "max_steps": args.steps},
        "runs": runs,
        "median_tokens_per_s": speed,
        "peak_memory_bytes": memory,
        "estimated_memory_bytes": _estimate(args.micro_batch),
        "speed_ratio": speed_ratio,
        "memory_ratio": memory_ratio,
        "targets": {"speed_ratio_min": SPEED_TARGET, "memory_ratio_max": MEMORY_TARGET},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"device: {report['device']}")
    print(f"median tokens/s: ours {speed['ours']:.0f}, baseline {speed['baseline']:.0f}")
    print(f"speed ratio {speed_ratio:.3f} (>= {SPEED_TARGET}); memory ratio {memory_ratio:.3f}")
    print(
        f"estimated {report['estimated_memory_bytes'] / 2**30:.2f} GiB (estimator, overhead incl.)"
    )
    print(f"wrote {args.out}")
    return 0 if speed_ratio >= SPEED_TARGET and memory_ratio <= MEMORY_TARGET else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
