"""Result quality: federated rounds against central training with the same tokens.

    make bench-quality                         # python -m bench.quality
    python -m bench.quality --quick            # the suite's slow test: one setting, small budget
    python -m bench.quality --only=tiny --keep

What runs (bench/quality/runs.py: every figure is cotune's own pipeline):

- the task: bench/quality/tasks.py, a learnable key the project's files do not contain;
  4,000 training rows and a held-out eval file of 400 fresh ones;
- the budget: T optimizer steps of 8 rows (sequence_len 64, LoRA r 8, NF4 base, lr 3e-3,
  cosine with 10% warmup), the same total tokens for every setting;
- (b) one worker: `cotune train-local` for T steps, one schedule, on all the data; its eval
  loss after T/6, T/3, T/2 and T steps (each its own run and schedule) draws the central
  curve of the plot;
- (a) synchronous: the same with a global batch of 8 K (gradient accumulation K) for T/K
  steps: what K workers would do if they all-reduced every step (DiLoCo's baseline);
- cotune: `cotune run` with K shards and R rounds of T/(K R) steps a task, merged by svd, for
  K in {2, 4, 8} and R in {1, 3, 6}; at K 4, R 3 also by cat, linear and ties; at K 4 and
  K 8, R 3 with one learning-rate schedule over the trial (`lr_schedule_span: trial`); all of
  a model's settings are jobs of one `cotune up` with two local workers, and the central
  runs go on beside them;
- the models: the built-in tiny Llama (hidden 64, 2 layers) for all of it, and a larger
  random-init one (hidden 256, 4 layers, the same tokenizer) for (a), (b) and K 8, R 3.

Every adapter is scored by `cotune evaluate` (the coordinator's own scoring) on the same
eval file. Per setting the table gives the eval loss against (a) and (b), the fraction of
the base-to-baseline improvement it recovers, and the optimizer steps on its critical path
(rounds x steps a round, plus one merge a round) until its first round at or below (b)'s
final loss, against (b)'s T. Writes bench/out/quality.json and docs/images/quality.png,
and rewrites the tables of docs/quality.md between their markers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.quality.runs import Budget, Outcome, RunFailed, Setting, central, federated_all
from bench.quality.tasks import write as write_rows

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out" / "quality.json"
PLOT = ROOT / "docs" / "images" / "quality.png"
DOC = ROOT / "docs" / "quality.md"
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"

TINY = "cotune://tiny-llama"
LARGER = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4}


@dataclass(frozen=True)
class Plan:
    budget: Budget
    settings: tuple[Setting, ...]
    curve: tuple[int, ...]  # divisors of T: (b) is also run for T / d steps
    larger: tuple[Setting, ...]  # settings run on the larger model too


FULL = Plan(
    budget=Budget(steps=192),
    settings=(
        *(Setting(k, r) for k in (2, 4, 8) for r in (1, 3, 6)),
        *(Setting(4, 3, m) for m in ("cat", "linear", "ties")),
        *(Setting(k, 3, span="trial") for k in (4, 8)),
    ),
    curve=(6, 3, 2),
    larger=(Setting(8, 3),),
)
QUICK = Plan(budget=Budget(steps=48), settings=(Setting(2, 2),), curve=(2,), larger=())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one setting, T 48 (minutes)")
    parser.add_argument("--only", choices=("tiny", "larger"), help="one model only")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="cotune-bench-quality-"))
    started = time.perf_counter()
    try:
        report = measure(plan, work, only=args.only)
    except RunFailed as exc:
        print(f"a run failed (its folder is kept: {work}):\n{exc}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["quick"] = args.quick
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    if not args.quick:
        from bench.quality.report import plot, rewrite_doc

        plot(report, PLOT)
        rewrite_doc(report, DOC, BEGIN, END)
        print(f"wrote {PLOT} and the tables of {DOC}")
    return 0


def measure(plan: Plan, work: Path, *, only: str | None) -> dict[str, Any]:
    from bench.quality.report import table

    data = work / "data"
    train = write_rows(data / "train.jsonl", 4000, seed=1)
    eval_file = write_rows(data / "eval.jsonl", 400, seed=2)
    models: dict[str, tuple[str, tuple[Setting, ...]]] = {"tiny": (TINY, plan.settings)}
    if plan.larger:
        from cotune.worker.tinymodel import build_tiny_llama

        larger = build_tiny_llama(work / "larger-model", architecture=LARGER)
        models["larger"] = (str(larger), plan.larger)
    report: dict[str, Any] = {"budget": asdict(plan.budget), "models": {}}
    for label, (base, settings) in models.items():
        if only and label != only:
            continue
        print(f"== {label} model ({base})", flush=True)
        runs = model_runs(work / label, base, train, eval_file, plan, settings)
        report["models"][label] = runs
        print(table(runs, plan.budget.steps), flush=True)
    return report


def model_runs(
    work: Path, base: str, train: Path, eval_file: Path, plan: Plan, settings: tuple[Setting, ...]
) -> dict[str, Any]:
    budget, T = plan.budget, plan.budget.steps

    def show(outcome: Outcome) -> Outcome:
        losses = " ".join(f"{x:.3f}" for x in outcome.eval_losses)
        print(f"  {outcome.name:36} eval loss {losses}  ({outcome.seconds:.0f} s)", flush=True)
        return outcome

    def run_central(name: str, folder: str, steps: int, accumulation: int = 1) -> Outcome:
        return show(
            central(
                work / folder,
                base,
                train,
                eval_file,
                budget,
                name=name,
                steps=steps,
                accumulation=accumulation,
            )
        )

    done: dict[str, Any] = {}

    def centrals() -> None:
        """(b), its curve and each (a), while the stack trains the federated settings."""
        done["one"] = run_central("(b) one worker", "b", T)
        done["curve"] = [run_central(f"(b) T/{d}", f"b-{d}", T // d) for d in plan.curve]
        done["sync"] = {
            k: run_central(f"(a) sync, batch x{k}", f"a-{k}", T // k, k)
            for k in sorted({s.shards for s in settings})
        }

    fed = federated_all(
        work / "federated", base, train, eval_file, budget, settings, meanwhile=centrals
    )
    for outcome in fed:
        show(outcome)
    base_loss = next((f.base_eval_loss for f in fed if f.base_eval_loss is not None), None)
    return {
        "base_model": base,
        "base_eval_loss": base_loss,
        "one_worker": asdict(done["one"]),
        "one_worker_curve": [asdict(c) for c in done["curve"]],
        "sync": {str(k): asdict(v) for k, v in done["sync"].items()},
        "federated": [
            {**asdict(f), **asdict(s), "name": s.name} for f, s in zip(fed, settings, strict=True)
        ],
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
