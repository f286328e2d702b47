"""`POST /api/v1/commands` (the `/gpu` grammar over HTTP) and `GET /api/v1/events` (the caller's
progress events and notices as Server-Sent Events).

Decisions:

- `/commands` answers every command with `200` and the platform-neutral `Reply` as JSON — an
  unknown command, a parse error, a refusal (viewer booting) or a core error included, with
  `level: "error"`: in chat these are ordinary answers, and a remote shell or a notebook `%gpu`
  line renders them like any other. Only what stops the command from being read at all is a
  problem detail: no or a bad API key (401), the rate limit (429), a body that does not validate
  (422: missing `text`, over `MAX_LINE` characters).
- The grammar runs with `wait=False`: a boot answers as soon as the provider accepted; its
  progress is on the event stream. The `Idempotency-Key` header is the delivery id, so a retried
  POST of the same boot boots once (core scopes the key to the actor and the request).
- `/events` reads `GpuService.feed` (the database), so any replica serves any person's stream.
  The first message is `event: ready` whose `id:` and data carry the starting cursor (a client
  that starts a boot after it knows the stream is live misses nothing). Then each item is
  `id: <cursor>`, `event: progress|notice`, `data: <JSON>`. `Last-Event-ID` (what an
  EventSource sends when it reconnects) or `?after=` resumes; a bad cursor is a 400 problem
  before the stream starts. The stream polls about every second, and is woken earlier by
  notices this process publishes (`NotifierHub`); a comment (`: keep-alive`) goes out after
  ~15 s of silence so proxies keep the connection.
- The stream ends when the client disconnects (Starlette cancels it), after `stream_max_s`
  (300 s; the client reconnects with `Last-Event-ID`, so nothing is lost and a replica being
  drained is left within bounded time), or when `stop_streams(app)` is called: the server calls
  it when it starts shutting down, because uvicorn waits for open responses before it runs the
  lifespan's shutdown. Timing knobs are read from `app.state` (`stream_poll_s`,
  `stream_heartbeat_s`, `stream_max_s`) so tests can shorten them."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from gpuherd.core.auth import Actor
from gpuherd.core.feed import MAX_CURSOR, FeedEntry, read_cursor
from gpuherd.core.service import GpuService
from gpuherd.core.text import MAX_LINE

from .. import grammar
from ..replies import Reply
from .auth import CurrentActor, get_service
from .problems import RESPONSES

log = logging.getLogger(__name__)
router = APIRouter(tags=["commands and events"])

POLL_S = 1.0
HEARTBEAT_S = 15.0
MAX_STREAM_S = 300.0
PAGE = 100
MAX_KEY = 100
KEY_PATTERN = r"^[A-Za-z0-9._:\-]{1,100}$"
SSE_MEDIA = "text/event-stream"


class CommandIn(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_LINE, description="a /gpu command line, e.g. `/gpu status`",
                      examples=["/gpu search 4090 <$0.5", "/gpu status"])


@router.post("/commands", response_model=Reply, responses=RESPONSES,
             summary="Run one /gpu command line and answer its reply")
async def run_command(request: Request, body: CommandIn, actor: CurrentActor,
                      idempotency_key: Annotated[str | None, Header(
                          alias="Idempotency-Key", pattern=KEY_PATTERN, max_length=MAX_KEY,
                          description="the same key for a retried request: a boot or start runs once")] = None,
                      ) -> Reply:
    """The same grammar as chat and the shell; errors in the command are replies with level
    `error` (see the module docstring)."""
    ctx = grammar.Context(service=get_service(request), actor=actor, delivery_id=idempotency_key, wait=False)
    return await grammar.dispatch(ctx, body.text)


# --- the event stream -------------------------------------------------------------------------

@dataclass
class _Streams:
    """The app's open streams: how to wake them (from any thread) and how to stop them."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=set)
    open: int = 0
    unsubscribe: list[Callable[[], None]] = field(default_factory=list)

    def wake_all(self, *_: Any) -> None:
        for loop, event in list(self.waiters):
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)


def _streams(app: FastAPI) -> _Streams:
    streams: _Streams | None = getattr(app.state, "streams", None)
    if streams is None:
        streams = app.state.streams = _Streams()
        service: GpuService = app.state.service
        # a notice or a progress event was just written in this process: read now, not at the next poll
        streams.unsubscribe = [service.hub.subscribe(streams.wake_all), service.operations.listen(streams.wake_all)]
    return streams


def stop_streams(app: FastAPI) -> None:
    """End every open event stream of `app` now (the server calls this when shutdown begins)."""
    streams = _streams(app)
    streams.stop.set()
    streams.wake_all()
    for unsubscribe in streams.unsubscribe:   # the service may outlive this app (tests, a restart in-process)
        unsubscribe()
    streams.unsubscribe.clear()


def open_streams(app: FastAPI) -> int:
    """How many event streams `app` is serving (readiness pages and tests)."""
    return _streams(app).open


def _message(event: str, cursor: str, data: str) -> bytes:
    return f"id: {cursor}\nevent: {event}\ndata: {data}\n\n".encode()


def _entry(entry: FeedEntry) -> bytes:
    return _message(entry.item.kind, entry.cursor, entry.item.model_dump_json())


async def _stream(request: Request, service: GpuService, actor: Actor, cursor: str) -> AsyncIterator[bytes]:
    app = request.app
    streams = _streams(app)
    state = app.state
    poll = float(getattr(state, "stream_poll_s", POLL_S))
    heartbeat = float(getattr(state, "stream_heartbeat_s", HEARTBEAT_S))
    lifetime = float(getattr(state, "stream_max_s", MAX_STREAM_S))
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    waiter = (loop, wake)
    streams.waiters.add(waiter)
    streams.open += 1
    began = last_sent = loop.time()
    try:
        yield b"retry: 2000\n" + _message("ready", cursor, json.dumps({"cursor": cursor}))
        while not streams.stop.is_set() and loop.time() - began < lifetime:
            wake.clear()
            page = await service.feed(actor, cursor, limit=PAGE)
            for entry in page.entries:
                yield _entry(entry)
            cursor = page.cursor
            if page.entries:
                last_sent = loop.time()
            if page.more:
                continue
            if loop.time() - last_sent >= heartbeat:
                yield b": keep-alive\n\n"
                last_sent = loop.time()
            timeout = max(0.0, min(poll, lifetime - (loop.time() - began)))
            try:
                await asyncio.wait_for(wake.wait(), timeout=timeout)
            except TimeoutError:
                pass
    except Exception:  # the stream ends; the client reconnects with Last-Event-ID
        log.exception("event stream of %s failed", actor.principal)
    finally:
        streams.waiters.discard(waiter)
        streams.open -= 1


@router.get("/events", response_class=StreamingResponse, summary="Your progress events and notices (SSE)",
            responses={**RESPONSES, 200: {"description": "Server-Sent Events: `ready`, then `progress` and "
                                                         "`notice` events; `id:` is the resume cursor",
                                          "content": {SSE_MEDIA: {"schema": {"type": "string"}}}}})
async def events(request: Request, actor: CurrentActor,
                 after: Annotated[str | None, Query(max_length=MAX_CURSOR,
                                                    description="resume after this cursor (an event's id)")] = None,
                 last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=MAX_CURSOR)] = None,
                 ) -> StreamingResponse:
    """Follow boots and starts without polling; `Last-Event-ID` (or `?after=`) resumes where a
    dropped connection left off."""
    service = get_service(request)
    wanted = last_event_id or after
    if wanted is not None:
        read_cursor(wanted)                       # a bad cursor is a 400 before the stream starts
    start = wanted or (await service.feed(actor, None, limit=1)).cursor
    return StreamingResponse(_stream(request, service, actor, start), media_type=SSE_MEDIA,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
