"""A finished job's results: the best trial's adapter in jobs/<id>/best/, its model card,
and results.json with every trial.

    jobs/<id>/best/adapter_config.json          the best trial's last merged adapter (PEFT)
    jobs/<id>/best/adapter_model.safetensors
    jobs/<id>/best/README.md                    model card: base, data, hyperparameters,
                                                eval loss per round, contributing workers
    jobs/<id>/best/results.json                 every trial: params, eval losses, state,
                                                and its accepted tasks with their tokens
                                                (and the rows their workers report cut or
                                                dropped); the data fit; a staged base
                                                model's archive (key, sha256)

The best trial is the complete trial with the best final eval loss (pruned and failed
trials never are). Exporting twice writes the same objects again: idempotent.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.datafit import data_fit_of
from cotune.orchestrator.data.layout import best_prefix, merged_prefix
from cotune.orchestrator.pipeline.rounds import START_ADAPTER_FILES

if TYPE_CHECKING:
    from cotune.orchestrator.control.records import JobRecord, TaskRecord, TrialRecord
    from cotune.orchestrator.data.manifest import Manifest
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.protocol.spec import SweepSpec

RESULTS_FILE = "results.json"
CARD_FILE = "README.md"


def best_trial(trials: Sequence[TrialRecord], direction: str = "minimize") -> TrialRecord | None:
    """The complete trial with the best final eval loss (lowest number on a tie)."""
    done = [t for t in trials if t.state == "complete" and t.eval_losses]
    if not done:
        return None
    sign = 1.0 if direction == "minimize" else -1.0
    return min(done, key=lambda t: (sign * t.eval_losses[-1], t.number))


def _trial_stats(
    tasks: Sequence[TaskRecord], number: int
) -> tuple[set[str], float, list[dict[str, Any]]]:
    """The trial's contributing workers, its trained tokens and one row per accepted task
    (redundancy duplicates included: they trained too). Tokens are the coordinator's count
    for each task (control/intake.py `task_tokens`), never a worker's claim."""
    workers: set[str] = set()
    tokens = 0.0
    rows = []
    for task in tasks:
        result = task.result() if task.trial == number and task.state == "accepted" else None
        if result is not None:
            workers.add(result.worker_id)
            tokens += result.tokens
            rows.append(
                {
                    "task_id": task.task_id,
                    "round": task.round,
                    "shard": task.shard,
                    "duplicate_of": task.duplicate_of,
                    "worker": result.worker_id,
                    "owner": result.owner,
                    "tokens": result.tokens,
                    # What sequence_len kept of the shard, as the worker reported it.
                    "rows_cut": result.metrics.get("rows_cut"),
                    "rows_dropped": result.metrics.get("rows_dropped"),
                }
            )
    return workers, tokens, rows


def results_document(
    *,
    job: JobRecord,
    spec: SweepSpec,
    manifest: Manifest,
    trials: Sequence[TrialRecord],
    tasks: Sequence[TaskRecord],
    best: TrialRecord | None,
    base_eval_loss: float | None,
) -> dict[str, Any]:
    """results.json: the job, the best trial, and every trial with its rounds."""
    rows = []
    everyone: set[str] = set()
    for trial in trials:
        workers, tokens, task_rows = _trial_stats(tasks, trial.number)
        everyone |= workers
        rows.append(
            {
                "number": trial.number,
                "params": trial.params,
                "state": trial.state,
                "eval_losses": trial.eval_losses,
                "rounds_done": trial.rounds_done,
                "error": trial.error,
                "workers": len(workers),
                "tokens": tokens,
                "tasks": task_rows,
            }
        )
    return {
        "job_id": job.job_id,
        "name": spec.name,
        "base_model": spec.base_model,
        "base_model_archive": staged.model_dump() if (staged := job.staged_model()) else None,
        "metric": spec.search.metric,
        "direction": spec.search.direction,
        "method": spec.search.method,
        "pruner": spec.search.pruner.type,
        "rounds": spec.rounds,
        "shards": len(manifest.shards),
        "merge_method": spec.merge.method,
        "dataset": {
            "source": manifest.source.uri,
            "format": manifest.format,
            "train_rows": sum(s.rows for s in manifest.shards),
            "eval_rows": manifest.eval.rows,
            # What training.sequence_len keeps of the rows, counted by the coordinator.
            "fit": fit.model_dump() if (fit := data_fit_of(job)) else None,
        },
        "base_eval_loss": base_eval_loss,
        "best_trial": best.number if best else None,
        "best_eval_loss": best.eval_losses[-1] if best else None,
        "workers": len(everyone),
        "trials": rows,
    }


def model_card(doc: dict[str, Any], spec: SweepSpec, best: TrialRecord) -> str:
    """README.md of the best adapter (Hugging Face model card layout)."""
    trial = next(t for t in doc["trials"] if t["number"] == best.number)
    concrete = spec.with_params(best.params)
    t, lora, data = concrete.training, concrete.lora, doc["dataset"]
    base = doc["base_eval_loss"]
    staged = doc.get("base_model_archive")
    pruned = sum(1 for row in doc["trials"] if row["state"] == "pruned")
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {spec.base_model}",
        "tags: [cotune, lora, qlora, federated]",
        "---",
        "",
        f"# {spec.name}: trial {best.number} of job {doc['job_id']}",
        "",
        f"A LoRA adapter trained by cotune: {doc['shards']} data shard(s) per round, "
        f"{doc['rounds']} federated round(s), the shard adapters of each round merged with "
        f"`{doc['merge_method']}`. It is the best of {len(doc['trials'])} trial(s) of a "
        f"`{doc['method']}` search ({pruned} pruned by the `{doc['pruner']}` pruner), judged "
        "by eval loss on a held-out split.",
        "",
        f"- Base model: `{spec.base_model}` (quantization {concrete.quantization.type})"
        + (f", staged as `{staged['key']}`" if staged else ""),
        f"- Data: `{data['source']}` ({data['format']}), {data['train_rows']} training rows in "
        f"{doc['shards']} shard(s), {data['eval_rows']} eval rows",
        *(
            [
                f"- Sequence length {fit['sequence_len']}: of {fit['rows']} rows of the "
                f"{fit['measured_on']}, {fit['rows_cut']} cut short, {fit['rows_dropped']} "
                "dropped (no trained token left)"
            ]
            if (fit := data.get("fit"))
            else []
        ),
        f"- Eval loss: **{best.eval_losses[-1]:.4f}** (base model: "
        + (f"{base:.4f})" if base is not None else "not measured)"),
        f"- Contributing workers: {trial['workers']} for this trial, {doc['workers']} for the "
        f"whole job; {trial['tokens']:.0f} tokens trained for this trial",
        "",
        "## Hyperparameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *(f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(best.params.items())),
        "",
        f"Settings: lora_r {lora.lora_r}, lora_alpha {lora.lora_alpha}, lora_dropout "
        f"{lora.lora_dropout}, target modules `{json.dumps(lora.lora_target_modules)}`; "
        f"learning_rate {t.learning_rate:.4g}, lr_scheduler {t.lr_scheduler}, max_steps "
        f"{t.max_steps}, micro_batch_size {t.micro_batch_size}, sequence_len {t.sequence_len}, "
        f"optimizer {t.optimizer}.",
        "",
        "## Eval loss per round",
        "",
        "| round | eval loss |",
        "|---|---|",
        *(f"| {r} | {loss:.4f} |" for r, loss in enumerate(best.eval_losses)),
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        'base = AutoModelForCausalLM.from_pretrained("<the base model>")',
        'model = PeftModel.from_pretrained(base, "<this folder>")',
        "```",
        "",
        "Every trial, with its parameters and eval losses, is in results.json.",
        "",
    ]
    return "\n".join(lines)


def export_best(
    store: ObjectStore,
    *,
    job: JobRecord,
    spec: SweepSpec,
    manifest: Manifest,
    trials: Sequence[TrialRecord],
    tasks: Sequence[TaskRecord],
    base_eval_loss: float | None,
) -> int | None:
    """Write jobs/<id>/best/; the best trial's number, or None if no trial completed (then
    only results.json is written, so the failure can be looked into)."""
    best = best_trial(trials, spec.search.direction)
    doc = results_document(
        job=job,
        spec=spec,
        manifest=manifest,
        trials=trials,
        tasks=tasks,
        best=best,
        base_eval_loss=base_eval_loss,
    )
    out = best_prefix(job.job_id)
    if best is not None:
        source = merged_prefix(job.job_id, best.number, len(best.eval_losses) - 1)
        with tempfile.TemporaryDirectory(prefix="cotune-best-") as tmp:
            for name in reversed(START_ADAPTER_FILES):  # weights first, config last
                path = Path(tmp) / name
                store.get_file(source + name, path)
                store.put_file(out + name, path)
        store.put_bytes(out + CARD_FILE, model_card(doc, spec, best).encode(), "text/markdown")
    body = (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()
    store.put_bytes(out + RESULTS_FILE, body, "application/json")
    return best.number if best else None
