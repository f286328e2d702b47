"""`/health` and `/ready`, for load balancers and orchestrators; no API key.

Decisions:

- `/health` says only that the process answers (a liveness probe must not fail because the
  database is down: restarting the server would not bring the database back).
- `/ready` says whether this replica should get traffic: the database answers a trivial query
  and its schema is at the migrations' head (a replica of a newer version facing an older
  schema, or the reverse, must not serve). It also says whether this replica runs the guards
  (`guards`: `running` on the leader, `standby` on the others, `off` when no Runtime runs here),
  but that is information, not a condition: a standby serves the API as well as the leader does.
  While the server shuts down it answers 503, so a balancer stops sending it requests.
- The check runs in a thread (never on the event loop), bounded by `TIMEOUT_S`; concurrent
  probes share one check in flight, so a flood of probes costs one connection. Not ready is a
  503 problem detail listing every reason; database errors are named by their type only (their
  text may name hosts and users), the details go to the log."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Literal

from alembic.runtime.migration import MigrationContext
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import Engine, text

from gpuherd.core.db import head_revision

from .problems import MEDIA_TYPE, TYPE_BASE

log = logging.getLogger(__name__)
router = APIRouter(tags=["meta"])
TIMEOUT_S = 3.0


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Migrations(BaseModel):
    current: str | None = Field(description="the database's revision")
    head: str | None = Field(description="the revision this gpuherd expects")


class Checks(BaseModel):
    database: Literal["ok", "unreachable"]
    migrations: Migrations | None = Field(description="null when the database could not be asked")
    guards: Literal["running", "standby", "off"] = Field(
        description="running: this replica holds the guard lock and runs the guards; standby: "
                    "another replica does (this one takes over if it stops)")
    replica: str | None = Field(description="host:pid of this process")


class Ready(Checks):
    status: Literal["ready"] = "ready"


class NotReady(Checks):
    """A problem detail (RFC 9457) with the checks."""

    type: str
    title: str
    status: int
    detail: str
    code: Literal["not_ready"] = "not_ready"
    reasons: list[str]


@functools.cache
def _head() -> str | None:
    return head_revision()


def _probe(engine: Engine) -> str | None:
    """One trivial query and the schema's revision, on one pooled connection."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        return MigrationContext.configure(conn).get_current_revision()


async def _shared_probe(app: FastAPI) -> str | None:
    task: asyncio.Task[str | None] | None = getattr(app.state, "ready_probe", None)
    if task is None or task.done():
        engine = app.state.service.db.engine
        task = asyncio.ensure_future(asyncio.to_thread(_probe, engine))
        app.state.ready_probe = task
    return await asyncio.wait_for(asyncio.shield(task), timeout=TIMEOUT_S)


def _guards(app: FastAPI) -> tuple[Literal["running", "standby", "off"], str | None]:
    runtime = getattr(app.state, "runtime", None)
    if runtime is None:
        return "off", None
    if runtime.scheduler is None:
        return "off", runtime.identity
    return ("running" if runtime.is_leader else "standby"), runtime.identity


@router.get("/health", response_model=Health, summary="Alive: the process answers")
async def health() -> Health:
    return Health()


@router.get("/ready", response_model=Ready, summary="Ready for traffic: database reachable, migrations current",
            responses={503: {"model": NotReady, "description": "Not ready (the reasons are listed)",
                             "content": {MEDIA_TYPE: {}}}})
async def ready(request: Request) -> Ready | JSONResponse:
    app = request.app
    reasons: list[str] = []
    database: Literal["ok", "unreachable"] = "ok"
    migrations: Migrations | None = None
    try:
        current = await _shared_probe(app)
    except Exception as exc:  # TimeoutError, a SQLAlchemy error: the database does not answer
        log.warning("readiness: the database did not answer (%s)", type(exc).__name__, exc_info=exc)
        database = "unreachable"
        reasons.append(f"the database did not answer ({type(exc).__name__})")
    else:
        migrations = Migrations(current=current, head=_head())
        if current != migrations.head:
            reasons.append(f"the database schema is at {current or 'nothing'}, this gpuherd needs {migrations.head} "
                           "(run gpuherd db upgrade)")
    guards, replica = _guards(app)
    if getattr(app.state, "stopping", False):     # set by server.py at the first SIGTERM
        reasons.append("shutting down")
    checks = {"database": database, "migrations": migrations, "guards": guards, "replica": replica}
    if not reasons:
        return Ready(**checks)
    body = NotReady(type=TYPE_BASE + "not_ready", title="Not ready", status=503, detail="; ".join(reasons) + ".",
                    reasons=reasons, **checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=503, media_type=MEDIA_TYPE)
