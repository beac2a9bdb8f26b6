"""Where a trial's shard tasks are placed: the accelerator memory one needs, and so its tier.

`requirements.gpu_memory_gb` wins when the spec gives it. Otherwise the memory estimator
(protocol/memory.py) runs on the trial's own settings (rank, sequence length, micro-batch,
quantization: the trials of one job differ) and the base model's architecture, read from:

    cotune://tiny-llama   protocol/builtin_models.py (the numbers the worker builds it from)
    /path/to/folder       its config.json, on the coordinator
    s3://bucket/prefix    prefix/config.json in the coordinator's store (its own bucket only)
    org/name              nothing: the coordinator has no hub access

Where the architecture cannot be had (a hub id, an unreadable config.json, a config the
estimator does not know), a task is given DEFAULT_TASK_BYTES (16 GB) and a log line says why
and how to place it exactly (`requirements.gpu_memory_gb`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.tiers import GB
from cotune.orchestrator.protocol.builtin_models import builtin_config
from cotune.orchestrator.protocol.memory import estimate_task_memory
from cotune.orchestrator.protocol.task import TrainTask

if TYPE_CHECKING:
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.protocol.spec import SweepSpec

log = logging.getLogger(__name__)

DEFAULT_TASK_BYTES = 16 * GB  # a 7B model in 4 bits at modest sequence lengths
CONFIG_FILE = "config.json"


class ModelConfigUnavailable(LookupError):
    """The coordinator cannot read the base model's config.json; the message says why."""


def requirement_bytes(spec: SweepSpec, store: ObjectStore | None = None) -> int:
    """Accelerator memory one shard task of the concrete `spec` needs (module docstring).

    `store` is the coordinator's object store, for an s3:// base model in its bucket.
    """
    if spec.requirements.gpu_memory_gb is not None:
        return int(spec.requirements.gpu_memory_gb * GB)
    try:
        config = model_config(spec, store)
        return estimate_task_memory(TrainTask.from_spec(spec), config).total
    except ModelConfigUnavailable as exc:
        why = str(exc)
    except ValueError as exc:  # an architecture or target module the estimator does not know
        why = f"the memory estimator cannot size it ({exc})"
    # A hub id is expected here; an unreadable local or stored config is worth a look.
    level = logging.INFO if spec.base_model_kind == "hf" else logging.WARNING
    log.log(
        level,
        "base model %s: %s; its tasks are placed as needing %.0f GB (set "
        "requirements.gpu_memory_gb to place them exactly)",
        spec.base_model,
        why,
        DEFAULT_TASK_BYTES / GB,
    )
    return DEFAULT_TASK_BYTES


def model_config(spec: SweepSpec, store: ObjectStore | None = None) -> Mapping[str, Any]:
    """The base model's config.json, as the coordinator can read it; ModelConfigUnavailable."""
    kind = spec.base_model_kind
    if kind == "builtin":
        builtin = builtin_config(spec.base_model)
        if builtin is None:
            raise ModelConfigUnavailable("no such built-in model")
        return builtin
    if kind == "s3":
        return _config_in_store(spec.base_model, store)
    if kind == "hf":
        raise ModelConfigUnavailable(
            "a Hugging Face hub id, and the coordinator does not reach the hub"
        )
    where = Path(spec.base_model).expanduser() / CONFIG_FILE
    try:
        text = where.read_text()
    except OSError as exc:
        raise ModelConfigUnavailable(f"cannot read {where}: {exc}") from None
    return _parsed(text, str(where))


def _config_in_store(url: str, store: ObjectStore | None) -> Mapping[str, Any]:
    from cotune.orchestrator.data.objectstore import ObjectStoreError

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if store is None or store.bucket != bucket:
        own = f" ({store.bucket!r})" if store is not None else ""
        raise ModelConfigUnavailable(
            f"it is in bucket {bucket!r}, and the coordinator reads config.json from its own "
            f"bucket{own} only"
        )
    key = prefix.rstrip("/") + "/" + CONFIG_FILE if prefix else CONFIG_FILE
    try:
        data = store.get_bytes(key)
    except ObjectStoreError as exc:
        raise ModelConfigUnavailable(f"cannot read s3://{bucket}/{key}: {exc}") from None
    return _parsed(data.decode("utf-8", "replace"), f"s3://{bucket}/{key}")


def _parsed(text: str, where: str) -> Mapping[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ModelConfigUnavailable(f"{where} is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelConfigUnavailable(f"{where} is not a JSON object")
    return config
