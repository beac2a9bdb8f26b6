"""Every error answer is a `wire.ErrorBody`; its HTTP status follows from its code."""

from __future__ import annotations

import logging
import math
from typing import Any

from cotune.orchestrator.protocol.problems import Problem
from cotune.orchestrator.protocol.wire import ErrorBody, ErrorCode, ErrorDetail, ErrorIssue
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

STATUS: dict[str, int] = {
    "invalid_request": 422,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "lease_expired": 409,
    "stale_lease": 409,
    "rejected": 422,
    "too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
}


def error_response(
    code: ErrorCode,
    message: str,
    field: str | None = None,
    issues: list[tuple[str, str]] | None = None,
    status: int | None = None,
    retry_after_s: float | None = None,
) -> JSONResponse:
    body = ErrorBody(
        error=ErrorDetail(
            code=code,
            message=message,
            field=field,
            issues=[ErrorIssue(field=f, message=m) for f, m in issues] if issues else None,
        )
    )
    headers = {"WWW-Authenticate": "Bearer"} if code == "unauthorized" else {}
    if retry_after_s is not None:  # whole seconds (RFC 9110), never 0: "now" would spin
        headers["Retry-After"] = str(max(math.ceil(retry_after_s), 1))
    return JSONResponse(
        status_code=status or STATUS[code],
        content=body.model_dump(mode="json", exclude_none=True),
        headers=headers,
    )


def _location(loc: Any) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "path", "query", "header")]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem) -> JSONResponse:
        retry_after = getattr(exc, "retry_after_s", None)
        return error_response(
            exc.code, exc.message, exc.field, exc.issues, retry_after_s=retry_after
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        issues = [(_location(e.get("loc", ())) or "body", str(e.get("msg"))) for e in errors]
        first_field, first_message = issues[0] if issues else (None, "invalid request")
        return error_response("invalid_request", first_message, first_field, issues)

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response("not_found", f"no route {request.url.path}")
        code: ErrorCode = "unavailable" if exc.status_code >= 500 else "invalid_request"
        if exc.status_code == 413:  # api/limits.py: a body over its route's limit
            code = "too_large"
        return error_response(code, str(exc.detail), status=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        from cotune.orchestrator.control.metrics import count_error
        from cotune.orchestrator.control.state import is_unavailable
        from cotune.orchestrator.data.s3errors import ObjectStoreError

        count_error(exc)
        if is_unavailable(exc):
            return error_response("unavailable", f"Redis does not answer: {exc}")
        if isinstance(exc, ObjectStoreError):
            return error_response("unavailable", f"the object store failed: {exc}")
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(
            "unavailable",
            f"internal error ({type(exc).__name__}); see the coordinator's log",
            status=500,
        )
