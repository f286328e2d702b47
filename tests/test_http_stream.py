"""`POST /api/v1/commands` and the `GET /api/v1/events` stream against a real server: uvicorn on
a loopback port in a thread, the core's Runtime in the app's lifespan (so the readiness watcher
drives boots to healthy as in `gpuherd serve`), over real HTTP with httpx, on SQLite and
PostgreSQL.

The server is tests/live_server.py's, shared with the other HTTP tests."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpuherd.bot.http.routes_stream import open_streams
from tests.live_server import LiveServer, start_live, stop_live


@pytest.fixture
def live(tmp_path: Path, db_url: str) -> Iterator[LiveServer]:
    server = start_live(tmp_path, db_url, time_scale=0.002, boot_timeout_s=60)
    try:
        yield server
    finally:
        stop_live(server)


# --- SSE reading -------------------------------------------------------------------------------

@dataclass
class Sse:
    event: str
    id: str | None
    data: Any


async def sse_messages(response: httpx.Response) -> AsyncIterator[Sse]:
    """Messages of an SSE response (comments skipped)."""
    event, ident, data = "message", None, []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield Sse(event=event, id=ident, data=json.loads("\n".join(data)))
            event, ident, data = "message", None, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "id":
                ident = value
            elif name == "data":
                data.append(value)


async def collect(client: httpx.AsyncClient, headers: dict[str, str], until, *, timeout: float = 20,
                  ready: asyncio.Event | None = None, params: dict[str, str] | None = None,
                  seen: list[Sse] | None = None) -> list[Sse]:
    """Read the stream until `until(messages)` holds (or `timeout`); `ready` is set once live."""
    got: list[Sse] = seen if seen is not None else []
    async with asyncio.timeout(timeout):
        async with client.stream("GET", "/api/v1/events", headers=headers, params=params) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            async for msg in sse_messages(r):
                got.append(msg)
                if msg.event == "ready" and ready is not None:
                    ready.set()
                if until(got):
                    return got
    return got


def _ids(reply: dict[str, Any]) -> list[str]:
    """The instance ids a reply names (g-7f3a)."""
    return sorted(set(re.findall(r"\bg-[0-9a-f]{4,}\b", json.dumps(reply))))


def _items(msgs: list[Sse], kind: str) -> list[Sse]:
    return [m for m in msgs if m.event == kind]


# --- /commands ---------------------------------------------------------------------------------

async def test_commands_search_status_and_errors(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.url, timeout=20) as c:
        r = await c.post("/api/v1/commands", json={"text": "/gpu search 4090"}, headers=live.headers("alice"))
        assert r.status_code == 200
        reply = r.json()
        assert reply["level"] != "error" and reply["tables"], reply
        assert any("4090" in " ".join(row) for row in reply["tables"][0]["rows"])

        r = await c.post("/api/v1/commands", json={"text": "/gpu status"}, headers=live.headers("alice"))
        assert r.status_code == 200 and r.json()["level"] != "error"

        # a command that does not parse is an ordinary reply with level error (as in chat)
        r = await c.post("/api/v1/commands", json={"text": "/gpu bogus"}, headers=live.headers("alice"))
        assert r.status_code == 200
        assert r.json()["level"] == "error" and "Unknown command" in r.json()["text"]

        # core refuses a viewer's boot: a reply, and nothing booted
        r = await c.post("/api/v1/commands", json={"text": "/gpu boot budget"}, headers=live.headers("viewer"))
        assert r.status_code == 200 and r.json()["level"] == "error"
        assert await live.service.instance_count() == 0

        # what stops the command from being read at all is a problem detail
        r = await c.post("/api/v1/commands", json={"text": "/gpu status"})
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
        r = await c.post("/api/v1/commands", json={"text": "x" * 5000}, headers=live.headers("alice"))
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.text"
        r = await c.post("/api/v1/commands", json={}, headers=live.headers("alice"))
        assert r.status_code == 422


async def test_boot_with_idempotency_key_twice_boots_once(live: LiveServer) -> None:
    headers = live.headers("alice", **{"Idempotency-Key": "nb-42-cell-7"})
    async with httpx.AsyncClient(base_url=live.url, timeout=20) as c:
        first = await c.post("/api/v1/commands", json={"text": "/gpu boot budget"}, headers=headers)
        again = await c.post("/api/v1/commands", json={"text": "/gpu boot budget"}, headers=headers)
        other = await c.post("/api/v1/commands", json={"text": "/gpu boot budget"},
                             headers=live.headers("alice", **{"Idempotency-Key": "nb-42-cell-8"}))
    assert first.status_code == again.status_code == 200
    assert first.json()["level"] != "error", first.json()
    assert await live.service.instance_count() == 2            # the retry booted nothing; another key did
    ids = {i for r in (first, again) for i in _ids(r.json())}
    assert len(ids) == 1, ids
    assert other.json()["level"] != "error"
    bad = await (httpx.AsyncClient(base_url=live.url)).post(
        "/api/v1/commands", json={"text": "/gpu status"}, headers=live.headers("alice", **{"Idempotency-Key": "a b"}))
    assert bad.status_code == 422


# --- /events -----------------------------------------------------------------------------------

async def test_stream_follows_a_boot_to_healthy_and_resumes(live: LiveServer) -> None:
    ready = asyncio.Event()
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
        def healthy(msgs: list[Sse]) -> bool:
            return any(m.event == "progress" and m.data["phase"] == "healthy" for m in msgs)

        reader = asyncio.create_task(collect(c, live.headers("alice"), healthy, ready=ready))
        await asyncio.wait_for(ready.wait(), 10)
        r = await c.post("/api/v1/commands", json={"text": "/gpu boot budget"}, headers=live.headers("alice"))
        assert r.json()["level"] != "error", r.json()
        msgs = await reader
        progress = _items(msgs, "progress")
        assert healthy(msgs), [m.data for m in msgs]
        phases = [m.data["phase"] for m in progress]
        assert phases[0] == "accepted" and phases[-1] == "healthy"
        assert len({m.data["operation_id"] for m in progress}) == 1
        seqs = [m.data["seq"] for m in progress]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert all(m.id for m in progress)

        # resume from the middle with Last-Event-ID: only what came after, nothing repeated
        middle = progress[0]
        rest = progress[1:]
        resumed = await collect(c, live.headers("alice", **{"Last-Event-ID": middle.id}),
                                lambda ms: len(_items(ms, "progress")) >= len(rest), timeout=10)
        assert [m.data["seq"] for m in _items(resumed, "progress")] == [m.data["seq"] for m in rest]
        assert resumed[0].event == "ready" and resumed[0].id == middle.id
        # ?after= is the same; from the last cursor there is nothing new
        quiet: list[Sse] = []
        with pytest.raises(TimeoutError):
            await collect(c, live.headers("alice"), lambda ms: False, timeout=1.0,
                          params={"after": progress[-1].id}, seen=quiet)
        assert [m.event for m in quiet] == ["ready"] and quiet[0].id == progress[-1].id
        # bob (another team) saw none of it
        theirs: list[Sse] = []
        try:
            await collect(c, live.headers("bob"), lambda ms: False, timeout=1.0, params={"after": "e0.n0"},
                          seen=theirs)
        except TimeoutError:
            pass
        assert theirs and theirs[0].event == "ready"
        assert not _items(theirs, "progress") and not _items(theirs, "notice")

        # a cursor gpuherd never gave out is a 400 problem, before any stream starts
        r = await c.get("/api/v1/events", headers=live.headers("alice", **{"Last-Event-ID": "e1;drop"}))
        assert r.status_code == 400 and r.json()["code"] == "invalid_input"
        r = await c.get("/api/v1/events", params={"after": "e" + "9" * 30 + ".n1"}, headers=live.headers("alice"))
        assert r.status_code == 400
        r = await c.get("/api/v1/events")
        assert r.status_code == 401


async def test_a_progress_event_reaches_the_stream_at_once_not_at_the_next_poll(live: LiveServer) -> None:
    """Events written in this process wake the streams (`Operations.listen`); the poll is only
    for other replicas. With a 30 s poll, a boot's first event must still arrive in seconds."""
    live.app.state.stream_poll_s = 30.0
    live.service.providers.get("sandbox").latency_s = 4.0   # every call, search and create alike
    ready = asyncio.Event()
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
        def accepted(msgs: list[Sse]) -> bool:
            return any(m.event == "progress" for m in msgs)

        reader = asyncio.create_task(collect(c, live.headers("alice"), accepted, ready=ready, timeout=10))
        await asyncio.wait_for(ready.wait(), 10)
        await asyncio.sleep(0.3)          # the stream has read its (empty) feed and waits
        r = await c.post("/api/v1/instances", json={"template": "budget"},
                         headers=live.headers("alice", **{"Idempotency-Key": "wake-1"}))
        answered = time.monotonic()       # the search took 4 s; the provider's create takes 4 more
        assert r.status_code == 202, r.text
        msgs = await reader
        assert time.monotonic() - answered < 2.5, "the stream waited for its poll (or for a notice)"
        assert _items(msgs, "progress")[0].data["operation_id"] == r.json()["operation_id"]


async def test_notice_reaches_the_owner_not_another_team(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
        r = await c.post("/api/v1/commands", json={"text": "/gpu boot budget"}, headers=live.headers("alice"))
        iid = _ids(r.json())[0]
        start = (await live.service.feed(live.service.local_actor(), None)).cursor   # "now", for everyone
        stopped = await c.post("/api/v1/commands", json={"text": f"/gpu stop {iid}"}, headers=live.headers("admin"))
        assert stopped.json()["level"] != "error", stopped.json()

        def stop_notice(ms: list[Sse]) -> bool:
            return any(m.event == "notice" and m.data["notice_kind"] == "instance.stopped" for m in ms)
        alice = await collect(c, live.headers("alice"), stop_notice, params={"after": start}, timeout=10)
        notice = next(m.data for m in alice if m.event == "notice")
        assert notice["instance_id"] == iid and notice["kind"] == "notice"
        assert set(notice) >= {"id", "level", "text", "created_at", "actions"}
        assert "owner" not in notice and "actor" not in notice

        for who in ("bob", "admin"):      # another team; and the admin who caused it is not told again
            seen: list[Sse] = []
            try:
                await collect(c, live.headers(who), lambda ms: False, params={"after": start}, timeout=1.0, seen=seen)
            except TimeoutError:
                pass
            assert seen and not stop_notice(seen), who


async def test_stream_heartbeats_and_ends_on_disconnect_and_shutdown(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.url, timeout=10) as c:
        async with c.stream("GET", "/api/v1/events", headers=live.headers("alice")) as r:
            lines: list[str] = []
            async with asyncio.timeout(5):
                async for line in r.aiter_lines():
                    lines.append(line)
                    if line.startswith(": keep-alive"):
                        break
            assert lines[0] == "retry: 2000" and any(ln.startswith("event: ready") for ln in lines)
            assert open_streams(live.app) == 1
        for _ in range(50):                        # the client left: the server's stream ended too
            if open_streams(live.app) == 0:
                break
            await asyncio.sleep(0.1)
        assert open_streams(live.app) == 0

        # the server shutting down ends an open stream (the response completes, no hang)
        async with c.stream("GET", "/api/v1/events", headers=live.headers("alice")) as r:
            began = time.monotonic()
            live.server.should_exit = True
            async for _ in r.aiter_lines():
                pass
            assert time.monotonic() - began < 5
