"""Errors as RFC 9457 problem details (`application/problem+json`): `type`, `title`, `status`,
`detail`, plus gpuherd's error `code` (and `errors`, naming each bad field, for a body that does
not validate). `STATUS` is the one table from core's error codes to HTTP statuses; every route
raises core's typed errors and this module answers them, so no route picks a status of its own.

Decisions: bad input is 400 (core's own checks) or 422 (a body or parameter FastAPI could not
validate); a provider's refusal or fault is 502/503/504 (the request was fine, the cloud was
not); `no_offer` and `capacity` are 409 (the market has nothing that fits right now); an
unexpected exception is a 500 carrying only a reference that is also in the log (never a
traceback)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from pydantic import BaseModel

from gpuherd.core.errors import GpuherdError

log = logging.getLogger(__name__)
TYPE_BASE = "https://gpuherd.dev/problems/"
MEDIA_TYPE = "application/problem+json"

STATUS: dict[str, int] = {
    "invalid_input": 400,
    "bad_query": 400,
    "validation": 422,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "no_offer": 409,
    "capacity": 409,
    "too_many_requests": 429,
    "config": 500,
    "error": 500,
    "internal": 500,
    "provider": 502,
    "auth": 502,
    "provider_state": 502,
    "provider_unavailable": 503,
    "rate_limited": 503,
    "provider_timeout": 504,
}

TITLES: dict[int, str] = {
    400: "Bad request", 401: "Not signed in", 403: "Not allowed", 404: "Not found", 405: "Method not allowed",
    409: "Conflict", 422: "Invalid request", 429: "Too many requests", 500: "Internal error",
    502: "Provider error", 503: "Provider unavailable", 504: "Provider timed out",
}


class FieldProblem(BaseModel):
    field: str            # dotted path, e.g. body.overrides.max_model_len or query.limit
    message: str


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
    hint: str | None = None
    errors: list[FieldProblem] | None = None


def status_for(code: str) -> int:
    return STATUS.get(code, 500)


def problem(code: str, detail: str, *, status: int | None = None, hint: str | None = None,
            errors: list[FieldProblem] | None = None) -> Problem:
    st = status or status_for(code)
    return Problem(type=TYPE_BASE + code, title=TITLES.get(st, "Error"), status=st, detail=detail, code=code,
                   hint=hint, errors=errors)


def from_error(exc: GpuherdError) -> Problem:
    return problem(exc.code, exc.message, hint=exc.hint)


def internal(exc: BaseException, where: str) -> Problem:
    ref = uuid.uuid4().hex[:8]
    log.error("request failed (ref %s) in %s", ref, where, exc_info=exc)
    return problem("internal", f"Something went wrong on our side (ref {ref}); the details are in gpuherd's log.")


def retry_after(exc: BaseException) -> dict[str, str]:
    seconds: Any = getattr(exc, "retry_after", None)
    return {"Retry-After": str(max(1, int(float(seconds))))} if seconds else {}


# what every route may answer besides its success, for the OpenAPI document
RESPONSES: dict[int | str, dict[str, Any]] = {
    st: {"model": Problem, "description": TITLES[st],   # `model` puts Problem in components; errors go out as:
         "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    for st in (400, 401, 403, 404, 409, 422, 429, 500, 502, 503, 504)
}
