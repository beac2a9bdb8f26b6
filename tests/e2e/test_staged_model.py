"""A sweep whose base model comes only from the object store: no hub, no shared disk.

The tiny model's folder is uploaded to s3://<bucket>/uploads/tiny-llama/ (as an operator
would with `aws s3 cp --recursive`) and the spec names that prefix. The real coordinator
(Redis, SeaweedFS, Ray, the API on uvicorn) stages it once into models/<sha256>/model.tar;
a `cotune worker` process gets it as a presigned GET, caches it by sha256 and trains on it;
the coordinator's merge evaluation loads its own cached copy.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.control.records import StoredObject
from cotune.orchestrator.control.state import State
from cotune.orchestrator.data.objectstore import ObjectStore
from cotune.orchestrator.runtime.coordinator import CoordinatorService

from tests.e2e.sweep_stack import WorkerProcess, service_settings, wait_for_job, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]


def test_a_sweep_on_a_base_model_that_only_the_store_holds(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    ray_cluster: str,
    alpaca_dataset: Path,
    tiny_model_dir: Path,
) -> None:
    home = tmp_path / "home"
    settings = service_settings(home, redis_server, s3_server)
    store = ObjectStore.from_settings(settings)
    for path in sorted(tiny_model_dir.rglob("*")):
        if path.is_file():
            store.put_file(f"uploads/tiny-llama/{path.relative_to(tiny_model_dir)}", path)
    url = f"s3://{store.bucket}/uploads/tiny-llama/"
    spec_path = write_spec(
        tmp_path, alpaca_dataset, name="e2e-staged", base_model=url, training={"max_steps": 6}
    )
    spec = yaml.safe_load(spec_path.read_text())
    spec["dataset"]["shards"], spec["rounds"] = 1, 1  # one task, one merge
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    best_dir = tmp_path / "best"
    with (
        CoordinatorService(settings, workers=0, api_port=0) as service,
        CotuneClient(service.url, service.admin_token) as client,
    ):
        token = client.create_join_token("e2e-staged").token
        workers = [WorkerProcess(service.url, token, home, "worker-0")]
        try:
            job_id = client.submit(spec_path)
            job = wait_for_job(client, job_id, 600, workers)
            assert job.state == "succeeded", job.error
            client.download(job_id, best_dir)
        finally:
            workers[0].stop()

    # Staged once, content-addressed, and the bytes are what the record says.
    state = State(redis_client)
    staged = state.get_job(job_id).staged_model()
    assert staged is not None and staged.key == f"models/{staged.sha256}/model.tar"
    assert [o.key for o in store.list("models/")] == [staged.key]
    archive = tmp_path / "model.tar"
    store.get_file(staged.key, archive)
    data = archive.read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (staged.sha256, staged.bytes)
    # Every task was handed the archive, never the s3:// name a worker cannot load.
    tasks = state.tasks_of(job_id)
    assert tasks and all(t.state == "accepted" for t in tasks)
    assert all(isinstance(t.inputs().base_model, StoredObject) for t in tasks)
    assert {t.inputs().base_model for t in tasks} == {staged}
    # The worker (in its device's work folder) and the coordinator's evaluation each
    # unpacked it once, by its sha256.
    worker = home / "workers" / "worker-0"
    [cached] = worker.glob(f"*/models/{staged.sha256}")
    for cache in (cached, home / "models" / staged.sha256):
        assert (cache / ".complete").is_file() and (cache / "config.json").is_file()

    # The merged result was evaluated on that base: a finite loss, and it says where it is.
    results = json.loads((best_dir / "results.json").read_text())
    assert results["base_model"] == url
    assert results["base_model_archive"]["sha256"] == staged.sha256
    [trial] = results["trials"]
    assert trial["state"] == "complete" and len(trial["eval_losses"]) == 1
    assert math.isfinite(results["best_eval_loss"]) and math.isfinite(results["base_eval_loss"])
    config = json.loads((best_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == url  # not the coordinator's cache folder
    assert staged.key in (best_dir / "README.md").read_text()
