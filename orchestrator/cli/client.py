"""CotuneClient: the Python client of the coordinator's job and admin API (the CLI uses it).

    with CotuneClient("http://127.0.0.1:8470", admin_token) as api:
        job_id = api.submit(Path("examples/tiny/sweep.yaml"))
        for event in api.events(job_id):        # follows until the job has finished
            print(event.kind, event.data)
        api.download(job_id, Path("out/best"))

Every error answer raises `ApiError(status, code, message, field)`; a coordinator that
cannot be reached raises it with status 0 and code "unavailable". Light: httpx, pydantic.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from cotune.orchestrator.protocol.admin import (
    API_FILE,
    DownloadList,
    EventBody,
    JobDetail,
    JobList,
    JobSummary,
    JoinTokenList,
    JoinTokenRequest,
    JoinTokenResponse,
    JoinTokenRevoked,
    JoinTokenView,
    Leaderboard,
    LeaderboardEntry,
    OwnerList,
    OwnerPardoned,
    OwnerQuarantined,
    SubmitResponse,
    TrialList,
    TrialView,
    WorkerList,
    WorkerView,
)
from cotune.orchestrator.protocol.wire import API_PREFIX, ErrorBody
from pydantic import BaseModel, ValidationError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

M = TypeVar("M", bound=BaseModel)
_CHUNK = 1 << 20
_RECONNECTS = 5


class ApiError(Exception):
    """An error answer (or none): HTTP status (0: no answer), wire code, message, field."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        issues: list[tuple[str, str]] | None = None,
    ) -> None:
        self.status, self.code, self.message, self.field = status, code, message, field
        self.issues = issues or []
        where = f" (field {field})" if field and not self.issues else ""
        super().__init__(f"{message}{where}")


def discover_url(home: Path) -> str | None:
    """The URL of the API serving the embedded stack on `home`, if its process is alive."""
    try:
        data = json.loads((home / API_FILE).read_text())
        url, pid = str(data["url"]), int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by someone else
    return url


class CotuneClient:
    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout_s: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = http or httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers
        )
        if http is not None:
            self._http.headers.update(headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CotuneClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- jobs -------------------------------------------------------------------------------

    def submit(self, spec: Path | str) -> str:
        """Submit a spec file (relative paths in it resolved against its folder) or YAML text.

        A spec file that cannot be read raises cotune.orchestrator.protocol.spec.SpecError.
        """
        if isinstance(spec, Path):
            from cotune.orchestrator.protocol.spec.files import read_spec_file, resolve_paths

            data = resolve_paths(read_spec_file(spec), spec.resolve().parent)
            body, media = json.dumps(data).encode(), "application/json"
        else:
            body, media = spec.encode(), "application/yaml"
        answer = self._call("POST", "/jobs", content=body, headers={"Content-Type": media})
        return SubmitResponse.model_validate_json(answer.content).job_id

    def jobs(self, states: list[str] | None = None) -> list[JobSummary]:
        params = {"state": states} if states else None
        return self._get("/jobs", JobList, params=params).jobs

    def job(self, job_id: str) -> JobDetail:
        return self._get(f"/jobs/{job_id}", JobDetail)

    def trials(self, job_id: str) -> list[TrialView]:
        return self._get(f"/jobs/{job_id}/trials", TrialList).trials

    def cancel(self, job_id: str) -> JobDetail:
        answer = self._call("POST", f"/jobs/{job_id}/cancel")
        return _parse(JobDetail, answer)

    def events(
        self, job_id: str, follow: bool = True, after: str | None = None
    ) -> Iterator[EventBody]:
        """The job's events, oldest first (after the id `after`). With `follow`, waits for
        new ones until the job has finished, reconnecting where it left off if cut."""
        cursor = after
        drops = 0
        while True:
            params: dict[str, Any] = {"follow": "true" if follow else "false"}
            headers = {"Accept": "text/event-stream"}
            if cursor:
                headers["Last-Event-ID"] = cursor
            try:
                with self._http.stream(
                    "GET",
                    f"{self.url}{API_PREFIX}/jobs/{job_id}/events",
                    params=params,
                    headers=headers,
                    timeout=httpx.Timeout(60.0, connect=10.0),
                ) as response:
                    if response.status_code >= 300:
                        response.read()
                        raise _error(response)
                    for event in _sse(response.iter_lines()):
                        cursor = event.id
                        drops = 0
                        yield event
                return  # the server ended the stream: everything was sent
            except httpx.TransportError as exc:
                drops += 1
                if not follow or drops > _RECONNECTS:
                    raise ApiError(
                        0, "unavailable", f"event stream from {self.url}: {exc}"
                    ) from exc
                time.sleep(min(0.5 * 2**drops, 10.0))

    def download(self, job_id: str, out_dir: Path) -> list[Path]:
        """Fetch every file of the job's best adapter into `out_dir`, sha256 checked."""
        listing = self._get(f"/jobs/{job_id}/download", DownloadList)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for item in listing.files:
            parts = PurePosixPath(item.name).parts
            if not parts or item.name.startswith("/") or ".." in parts:
                raise ApiError(0, "rejected", f"unsafe file name {item.name!r} in the listing")
            target = out_dir.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            for attempt in Retrying(
                stop=stop_after_attempt(DOWNLOAD_TRIES),
                wait=wait_exponential(multiplier=0.5, max=8.0),
                retry=retry_if_exception(_transient),
                reraise=True,
            ):
                with attempt:
                    _fetch(item.url, item.name, item.sha256, target)
            written.append(target)
        return written

    # --- workers, tokens --------------------------------------------------------------------

    def create_join_token(
        self,
        name: str = "volunteer",
        kind: str = "volunteer",
        ttl_s: float | None = None,
        max_uses: int | None = None,
    ) -> JoinTokenResponse:
        body = JoinTokenRequest.model_validate(
            {"name": name, "kind": kind, "ttl_s": ttl_s, "max_uses": max_uses}
        )
        answer = self._call(
            "POST",
            "/tokens/join",
            content=body.model_dump_json().encode(),
            headers={"Content-Type": "application/json"},
        )
        return _parse(JoinTokenResponse, answer)

    def join_tokens(self) -> list[JoinTokenView]:
        """Every join token on record (never the tokens themselves)."""
        return self._get("/tokens/join", JoinTokenList).tokens

    def revoke_join_tokens(self, name: str) -> JoinTokenRevoked:
        """Revoke every join token of `name` and the worker tokens enrolled with them."""
        answer = self._call("DELETE", f"/tokens/join/{quote(name, safe='')}")
        return _parse(JoinTokenRevoked, answer)

    def workers(self) -> list[WorkerView]:
        return self._get("/workers", WorkerList).workers

    def leaderboard(self, limit: int = 100) -> list[LeaderboardEntry]:
        return self._get("/leaderboard", Leaderboard, params={"limit": limit}).entries

    # --- owners: strikes and quarantine -----------------------------------------------------

    def owners(self) -> OwnerList:
        """Every owner with a worker, a strike or a quarantine, and the strike limit."""
        return self._get("/owners", OwnerList)

    def quarantine_owner(self, name: str) -> OwnerQuarantined:
        """Quarantine `name` now (a name no join token has yet is banned in advance)."""
        answer = self._call("POST", f"/owners/{quote(name, safe='')}/quarantine")
        return _parse(OwnerQuarantined, answer)

    def pardon_owner(self, name: str) -> OwnerPardoned:
        """Clear the strikes of `name` and lift its quarantine (404: neither to lift)."""
        answer = self._call("DELETE", f"/owners/{quote(name, safe='')}/quarantine")
        return _parse(OwnerPardoned, answer)

    # --- transport --------------------------------------------------------------------------

    def _get(self, path: str, model: type[M], params: dict[str, Any] | None = None) -> M:
        return _parse(model, self._call("GET", path, params=params))

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, f"{self.url}{API_PREFIX}{path}", **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                0, "unavailable", f"cannot reach the coordinator at {self.url}: {exc}"
            ) from exc
        if response.status_code >= 300:
            raise _error(response)
        return response


def _parse(model: type[M], response: httpx.Response) -> M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ApiError(
            response.status_code,
            "invalid_request",
            f"the coordinator's answer does not match the API (a version mismatch?): {exc}",
        ) from None


def _error(response: httpx.Response) -> ApiError:
    try:
        detail = ErrorBody.model_validate_json(response.content).error
    except ValidationError:
        text = response.content[:300].decode("utf-8", "replace").strip()
        return ApiError(response.status_code, "unknown", text or response.reason_phrase)
    issues = [(i.field, i.message) for i in detail.issues or []]
    return ApiError(response.status_code, detail.code, detail.message, detail.field, issues)


def _sse(lines: Iterator[str]) -> Iterator[EventBody]:
    """Events of a text/event-stream (each `data:` is one EventBody as JSON)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield EventBody.model_validate_json("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # id:, event:, retry: and ": ping" comments add nothing the data does not hold
    if data:
        yield EventBody.model_validate_json("\n".join(data))


#: Tries per file of `download`: a dropped connection, a 5xx or a corrupted transfer is
#: fetched again (with backoff), a 4xx is not.
DOWNLOAD_TRIES = 4


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, ApiError) and exc.code == "unavailable"


def _fetch(url: str, name: str, sha256: str, target: Path) -> None:
    """One file from a presigned GET into `target`, sha256 checked (written only if right)."""
    partial = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    try:
        with httpx.stream("GET", url, timeout=60.0) as response:
            if response.status_code != 200:
                code = "unavailable" if response.status_code >= 500 else "rejected"
                raise ApiError(
                    response.status_code,
                    code,
                    f"download of {name} failed: HTTP {response.status_code}",
                )
            with partial.open("wb") as out:
                for chunk in response.iter_bytes(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ApiError(
                0, "unavailable", f"{name}: sha256 {digest.hexdigest()}, expected {sha256}"
            )
        os.replace(partial, target)
    except httpx.TransportError as exc:
        raise ApiError(0, "unavailable", f"download of {name}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
