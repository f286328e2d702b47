"""The FastAPI app of `gpuherd serve`: the HTTP API under `/api/v1`, `/health`, `/ready` and
`/metrics`, OpenAPI at `/docs` and `/openapi.json`.

A thin surface (SPEC §10): routes parse, call `GpuService` with the caller's `Actor`, and
answer core's result models as JSON (money as decimal strings, never floats). Every error is a
problem detail (problems.py); nothing a route raises reaches a client as a traceback.

Where things are: auth.py (API keys, rate limit), problems.py (error code -> status),
routes_api.py (offers, templates, instances, confirmations, costs, statistics, budgets, audit,
users, keys), routes_stream.py (`/api/v1/commands`, the `/api/v1/events` stream),
routes_meta.py (`/health`, `/ready`), metrics.py (`/metrics`, request latency), server.py
(`gpuherd serve`: uvicorn, the core's Runtime in the app's lifespan, clean SIGTERM)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpuherd.core.errors import GpuherdError
from gpuherd.core.service import GpuService

from . import metrics, routes_api, routes_meta, routes_stream
from .auth import RateLimiter, TooManyRequests, authenticate_late
from .problems import MEDIA_TYPE, FieldProblem, Problem, from_error, internal, problem, retry_after

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]
VERSION = "1"


def _answer(p: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(p.model_dump(exclude_none=True), status_code=p.status, media_type=MEDIA_TYPE,
                        headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc)


def create_app(service: GpuService, *, lifespan: Lifespan | None = None) -> FastAPI:
    """The app over one service. `lifespan` (server.py's) enters the core's Runtime; tests that
    drive the app in-process may leave it out."""
    app = FastAPI(title="gpuherd", version=VERSION, lifespan=lifespan,
                  description="Rent cloud GPUs without wasting money: the team server's API. "
                              "Authenticate with an API key (`gpuherd keys create`).")
    app.state.service = service
    app.state.limiter = RateLimiter(service.settings.api_rate_per_minute, service.settings.api_burst)
    app.state.runtime = None

    @app.exception_handler(GpuherdError)
    async def _gpuherd_error(request: Request, exc: GpuherdError) -> JSONResponse:
        headers = retry_after(exc) if isinstance(exc, TooManyRequests) or exc.code == "rate_limited" else None
        return _answer(from_error(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith("/api/"):
            try:
                await authenticate_late(request)      # who you are is answered before what is wrong
            except GpuherdError as refused:
                return await _gpuherd_error(request, refused)
        errors = [FieldProblem(field=_field(e.get("loc", ())), message=str(e.get("msg", "invalid")))
                  for e in exc.errors()]
        names = ", ".join(e.field for e in errors[:5]) or "the request"
        return _answer(problem("validation", f"Invalid {names}: {errors[0].message if errors else 'invalid'}.",
                               errors=errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthenticated", 403: "forbidden"}.get(
            exc.status_code, "invalid_input" if exc.status_code < 500 else "internal")
        return _answer(problem(code, str(exc.detail), status=exc.status_code), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _answer(internal(exc, f"{request.method} {request.url.path}"))

    app.add_middleware(_Timed)

    app.include_router(routes_meta.router)
    app.include_router(metrics.router)
    app.include_router(routes_api.router, prefix="/api/v1")
    app.include_router(routes_stream.router, prefix="/api/v1")
    return app




class _Timed:
    """Request latency by route, as a plain ASGI middleware (Starlette's `BaseHTTPMiddleware`
    costs more per request than a whole shared status page). Timed to the moment the response
    starts, so an event stream counts its answer, not its life; an exception that escapes the
    handlers counts as the 500 it becomes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                metrics.observe_request(Request(scope), int(message["status"]), time.perf_counter() - began)
            await send(message)
        try:
            await self.app(scope, receive, sending)
        except Exception:
            if not started:
                metrics.observe_request(Request(scope), 500, time.perf_counter() - began)
            raise
