"""The worker wire protocol's models: strict at the edge, errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import (
    ADAPTER_FILES,
    CompleteRequest,
    HeartbeatRequest,
    LeaseResponse,
    PresignedGet,
    PresignedPost,
    TaskLease,
    TaskOutputs,
)
from pydantic import ValidationError

SHA = "0" * 64


def post(key: str) -> dict[str, Any]:
    return {"url": "http://s3/b", "fields": {"key": key}, "key": key, "max_bytes": 10}


def outputs(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "adapter": {name: post(f"a/{name}") for name in ADAPTER_FILES},
        "checkpoint": post("a/ckpt/0000/checkpoint.tar"),
    }
    data.update(changes)
    return data


def lease(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "task_id": "job1:t0:r0:s0",
        "attempt": 1,
        "lease_id": "l-1",
        "deadline": 1000.0,
        "server_time": 970.0,
        "task": TrainTask(base_model="cotune://tiny-llama").model_dump(),
        "inputs": {
            "base_model": "cotune://tiny-llama",
            "train": [{"url": "http://s3/x?sig=1", "sha256": SHA, "bytes": 3}],
        },
        "outputs": outputs(),
        "heartbeat_interval_s": 10,
    }
    data.update(changes)
    return data


def field_of(error: ValidationError) -> str:
    return ".".join(str(p) for p in error.errors()[0]["loc"])


def test_a_lease_round_trips_through_json() -> None:
    parsed = TaskLease.model_validate(lease())
    assert TaskLease.model_validate_json(parsed.model_dump_json()) == parsed
    assert isinstance(parsed.inputs.base_model, str)


def test_a_staged_base_model_is_a_presigned_get() -> None:
    archive = {"url": "http://s3/models/m.tar", "sha256": SHA, "bytes": 9}
    parsed = TaskLease.model_validate(lease(inputs={"base_model": archive, "train": [archive]}))
    assert isinstance(parsed.inputs.base_model, PresignedGet)


def test_unknown_fields_are_refused_with_their_path() -> None:
    with pytest.raises(ValidationError) as e:
        HeartbeatRequest.model_validate({"step": 1, "max_steps": 2, "gpu_temp": 80})
    assert field_of(e.value) == "gpu_temp"


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(loss: float) -> None:
    with pytest.raises(ValidationError) as e:
        HeartbeatRequest(step=1, max_steps=2, loss=loss)
    assert field_of(e.value) == "loss"


def test_a_lease_answer_is_a_task_or_a_wait_never_both() -> None:
    assert LeaseResponse(retry_after_s=2).task is None
    with pytest.raises(ValidationError, match="exactly one of task and retry_after_s"):
        LeaseResponse()
    with pytest.raises(ValidationError, match="exactly one"):
        LeaseResponse(task=TaskLease.model_validate(lease()), retry_after_s=1)


def test_outputs_name_a_target_for_every_adapter_file() -> None:
    adapter = {name: post(name) for name in ADAPTER_FILES[:2]}
    with pytest.raises(ValidationError, match=f"no upload target for {ADAPTER_FILES[2]}"):
        TaskOutputs.model_validate(outputs(adapter=adapter))


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "", "x" * 200])
def test_file_names_are_flat(name: str) -> None:
    ref = {"key": "k", "sha256": SHA, "bytes": 1}
    with pytest.raises(ValidationError):
        CompleteRequest.model_validate({"artifacts": {name: ref}})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"sha256": "ABC"}, "sha256"),
        ({"bytes": -1}, "bytes"),
        ({"url": "file:///etc/passwd"}, "url"),
    ],
)
def test_presigned_gets_are_checked(changes: dict[str, Any], field: str) -> None:
    data = {"url": "https://s3.example.org/b/k?X-Amz-Signature=1", "sha256": SHA, "bytes": 1}
    with pytest.raises(ValidationError) as e:
        PresignedGet.model_validate({**data, **changes})
    assert field_of(e.value) == field


def test_presigned_urls_are_kept_verbatim() -> None:
    # A URL type would normalise them and break the signature.
    url = "http://127.0.0.1:8333/b/k%2Fx?X-Amz-Credential=a%2Fb&X-Amz-Signature=ff"
    assert PresignedPost(url=url, fields={}, key="k", max_bytes=1).url == url
