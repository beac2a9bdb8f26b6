"""A whole sweep: real Redis, SeaweedFS, Ray, the API on uvicorn and two worker processes.

4 trials (a grid of two learning rates x two ranks) x 2 shards x 2 rounds, two trials at a
time, under a median pruner that may prune after round 0 once one trial has completed. One
learning rate is useless (1e-6: the adapter barely moves), so its trials' eval loss after
round 0 is far above the median of the completed trials: Optuna's pruner prunes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.data.objectstore import ObjectStore
from cotune.orchestrator.protocol.spec import load_spec
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.runtime.coordinator import CoordinatorService

from tests.e2e.sweep_stack import (
    WorkerProcess,
    service_settings,
    wait_for_job,
    write_spec,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

GOOD_LR, USELESS_LR = 5.0e-3, 1.0e-6
# The grid sampler shuffles the grid with the search seed and gives trial n the n-th point;
# with seed 10 both trials that start first have the good learning rate (checked below).
GRID_SEED = 10


def eval_loss(task: TrainTask, eval_file: Path, models_dir: Path, adapter: Path | None) -> float:
    """The eval loss, computed here in the test process, independently of the coordinator."""
    from cotune.worker.data import load_examples
    from cotune.worker.training import load_base, mean_loss

    model, tokenizer = load_base(task, models_dir=models_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    examples = load_examples(
        [eval_file],
        task.dataset_format,
        tokenizer,
        sequence_len=task.sequence_len,
        train_on_inputs=task.train_on_inputs,
    )
    return mean_loss(model, examples, task.micro_batch_size, tokenizer.pad_token_id)


def test_sweep_on_two_workers_prunes_and_its_best_adapter_beats_the_base_model(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    ray_cluster: str,
    alpaca_dataset: Path,
) -> None:
    home = tmp_path / "home"
    settings = service_settings(home, redis_server, s3_server)
    spec_path = write_spec(
        tmp_path,
        alpaca_dataset,
        name="e2e-sweep",
        training={"learning_rate": [GOOD_LR, USELESS_LR]},
        lora={"lora_r": [4, 8]},
        search={
            "method": "grid",
            "n_trials": 4,
            "max_concurrent_trials": 2,
            "seed": GRID_SEED,
            "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        },
    )
    best_dir = tmp_path / "best"
    with (
        CoordinatorService(settings, workers=0, api_port=0) as service,
        CotuneClient(service.url, service.admin_token) as client,
    ):
        token = client.create_join_token("e2e-volunteers").token
        workers = [WorkerProcess(service.url, token, home, f"worker-{i}") for i in range(2)]
        try:
            job_id = client.submit(spec_path)
            job = wait_for_job(client, job_id, 900, workers)
            assert job.state == "succeeded", job.error
            client.download(job_id, best_dir)
            enrolled = client.workers()
        finally:
            for worker in workers:
                worker.stop()

    results = json.loads((best_dir / "results.json").read_text())
    trials = {t["number"]: t for t in results["trials"]}
    assert len(trials) == 4
    first_two = [trials[n]["params"]["training.learning_rate"] for n in (0, 1)]
    assert first_two == [GOOD_LR, GOOD_LR], "the grid order changed: pick another GRID_SEED"
    for n in (2, 3):  # the useless learning rate, started once a good trial had completed
        assert trials[n]["params"]["training.learning_rate"] == USELESS_LR
        assert trials[n]["state"] == "pruned", trials[n]
        assert len(trials[n]["eval_losses"]) == 1
    for n in (0, 1):
        assert trials[n]["state"] == "complete"
        assert len(trials[n]["eval_losses"]) == 2
        assert trials[n]["eval_losses"][1] < trials[n]["eval_losses"][0]  # round 1 helped
    assert results["best_trial"] in (0, 1)

    # Both worker processes trained, as volunteers.
    assert len(enrolled) == 2
    assert all(w.kind == "volunteer" and w.tasks_accepted >= 1 for w in enrolled)
    assert sum(w.tasks_accepted for w in enrolled) == 2 * 2 * 2 + 2 * 1 * 2

    # The downloaded adapter is the one evaluated, and it beats the base model: both eval
    # losses recomputed here, not taken from the coordinator.
    assert {p.name for p in best_dir.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "results.json",
    }
    spec = load_spec(spec_path).with_params(trials[results["best_trial"]]["params"])
    task = TrainTask.from_spec(spec)
    store = ObjectStore.from_settings(settings)
    eval_file = tmp_path / "eval.jsonl.zst"
    store.get_file(f"jobs/{job_id}/data/eval.jsonl.zst", eval_file)
    base = eval_loss(task, eval_file, home / "models", None)
    best = eval_loss(task, eval_file, home / "models", best_dir)
    assert best == pytest.approx(results["best_eval_loss"], rel=1e-4)
    assert results["base_eval_loss"] == pytest.approx(base, rel=1e-4)
    assert best < base - 0.5, (best, base)
    card = (best_dir / "README.md").read_text()
    assert f"trial {results['best_trial']}" in card and "base model:" in card.lower()
