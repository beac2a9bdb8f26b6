"""Job submission: a spec from an API body, checked, stored, and a `pending` job created.

The spec arrives as YAML (application/yaml) or JSON; it is validated like `cotune validate`
does (every problem reported, with its field path), then its inputs are checked where the
coordinator will read them: a local dataset path must be absolute and exist on the
coordinator's machine (`cotune submit FILE` resolves paths relative to the file first), an
s3:// one must exist in the store. Only then is anything written: the spec to
jobs/<id>/spec.yaml, then the job record. The reconciler takes the job from `pending` on.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.data.layout import spec_key
from cotune.orchestrator.protocol.problems import InvalidRequest, Unavailable
from cotune.orchestrator.protocol.spec import (
    SpecError,
    SweepSpec,
    implied,
    parse_spec,
    parse_spec_yaml,
)
from cotune.orchestrator.protocol.spec.files import MAX_SPEC_BYTES

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.data.objectstore import ObjectStore

Stores = Callable[[str | None], "ObjectStore"]

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")
JSON_TYPES = ("application/json",)
SOURCE = "<request body>"


def new_job_id(spec: SweepSpec) -> str:
    """A readable, unique job id: the spec's name and 8 random hex digits."""
    return f"{spec.name}-{secrets.token_hex(4)}"


def parse_body(body: bytes, content_type: str | None) -> SweepSpec:
    """The spec in a request body; InvalidRequest listing every problem otherwise."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in YAML_TYPES + JSON_TYPES:
        raise InvalidRequest(
            f"send the spec as application/yaml or application/json, not {media or 'nothing'}",
            "content-type",
        )
    if len(body) > MAX_SPEC_BYTES:
        raise InvalidRequest(f"the spec is {len(body)} bytes; at most {MAX_SPEC_BYTES}", "body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the spec is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        if media in JSON_TYPES:
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise InvalidRequest(f"the body is not JSON: {exc}", "body") from None
            if not isinstance(data, dict):
                raise InvalidRequest("the spec must be a JSON object", "body")
            return parse_spec(data)
        return parse_spec_yaml(text, SOURCE)
    except SpecError as exc:
        raise _spec_problem(exc.errors) from None


def check_inputs(spec: SweepSpec, stores: Stores) -> None:
    """The dataset (and a local or s3:// base model) exist where the coordinator reads them."""
    issues: list[tuple[str, str]] = []
    locations = [("dataset.path", spec.dataset.path)]
    if isinstance(spec.dataset.eval_split, str):
        locations.append(("dataset.eval_split", spec.dataset.eval_split))
    for field, location in locations:
        problem = _missing(location, stores, model=False)
        if problem:
            issues.append((field, problem))
    if spec.base_model_kind in ("local", "s3"):
        problem = _missing(spec.base_model, stores, model=True)
        if problem:
            issues.append(("base_model", problem))
    if issues:
        raise _spec_problem(issues)


def submit(state: State, stores: Stores, body: bytes, content_type: str | None) -> str:
    """Check and store a submitted spec; the new job's id. Nothing is written on a refusal.

    `stores(bucket)` is the object store for a bucket (None: the coordinator's own).
    """
    from cotune.orchestrator.data.s3errors import ObjectStoreError

    spec = parse_body(body, content_type)
    check_inputs(spec, stores)
    job_id = new_job_id(spec)
    spec_yaml = spec.to_yaml()
    try:
        stores(None).put_bytes(spec_key(job_id), spec_yaml.encode(), "application/yaml")
    except ObjectStoreError as exc:
        raise Unavailable(f"cannot store the spec: {exc}") from exc
    state.create_job(
        job_id, spec.name, spec_yaml, trials=implied(spec).n_trials, rounds=spec.rounds
    )
    return job_id


def _missing(location: str, stores: Stores, *, model: bool) -> str | None:
    if location.startswith("s3://"):
        return _missing_s3(location, stores)
    path = Path(location)
    if not path.is_absolute():
        return (
            f"{location!r} is relative, which means nothing on the coordinator: give an "
            "absolute path, or submit the file with `cotune submit FILE` (it resolves paths)"
        )
    if not path.exists():
        return f"no such file or folder on the coordinator: {location}"
    if model and not (path / "config.json").is_file():
        return f"{location} has no config.json (not a Hugging Face model folder)"
    return None


def _missing_s3(url: str, stores: Stores) -> str | None:
    from cotune.orchestrator.data.s3errors import ObjectStoreError

    bucket, _, key = url.removeprefix("s3://").partition("/")
    try:
        store = stores(bucket)
        if store.head(key) is not None:
            return None
        prefix = key if key.endswith("/") else key + "/"
        if next(iter(store.list(prefix)), None) is not None:
            return None
    except ObjectStoreError as exc:
        return f"cannot read {url}: {exc}"
    return f"nothing in the store at {url}"


def _spec_problem(issues: list[Any]) -> InvalidRequest:
    pairs = [(str(path), str(message)) for path, message in issues]
    summary = "; ".join(f"{p}: {m}" for p, m in pairs)
    return InvalidRequest(
        f"the spec has {len(pairs)} problem(s): {summary}",
        pairs[0][0] if pairs else None,
        pairs,
    )
