"""`gpuherd.client` (async and sync) against a live server (tests/test_http_stream.py's
LiveServer: uvicorn on loopback, the Runtime in its lifespan): core's result models come back,
errors become `ApiError`s that are also core's error classes, and the API key appears in no
exception text, repr or log record. The remote shell runs against the same server."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest
from rich.console import Console

from gpuherd.bot.replies import Reply
from gpuherd.bot.shell import run_remote
from gpuherd.client import ApiError, AsyncClient, Client
from gpuherd.core.errors import InvalidInput, NotFound, PermissionDenied, Unauthenticated
from gpuherd.core.feed import FeedNotice
from gpuherd.core.results import BootResult, InstanceView, ProgressEvent, SearchResult, StatusResult, StopResult
from tests.live_server import LiveServer
from tests.test_http_stream import live  # noqa: F401  (the fixture)


async def test_async_client_search_boot_status_stop(live: LiveServer) -> None:  # noqa: F811
    async with AsyncClient(live.url, live.keys["alice"]) as gh:
        found = await gh.search("4090")
        assert isinstance(found, SearchResult) and found.offers
        assert all("4090" in o.offer.gpu_name.replace(" ", "") for o in found.offers)

        boot = await gh.boot("budget", idempotency_key="client-test-1")
        again = await gh.boot("budget", idempotency_key="client-test-1")
        assert isinstance(boot, BootResult) and isinstance(again, BootResult)
        assert again.instance.id == boot.instance.id
        assert await live.service.instance_count() == 1

        status = await gh.status()
        assert isinstance(status, StatusResult) and [v.id for v in status.instances] == [boot.instance.id]
        one = await gh.instance(boot.instance.id)
        assert isinstance(one, InstanceView) and one.id == boot.instance.id

        for _ in range(100):                      # the server's watcher drives the boot
            if (await gh.instance(boot.instance.id)).ready:
                break
            await asyncio.sleep(0.1)
        stopped = await gh.stop(boot.instance.id)
        assert isinstance(stopped, StopResult) and stopped.instance.state.value == "stopped"

        with pytest.raises(NotFound) as err:
            await gh.instance("g-0000")
        assert isinstance(err.value, ApiError) and err.value.status == 404 and err.value.code == "not_found"

        reply = await gh.command("/gpu status")
        assert isinstance(reply, Reply) and reply.level != "error"


async def test_async_events_follow_and_resume(live: LiveServer) -> None:  # noqa: F811
    async with AsyncClient(live.url, live.keys["alice"]) as gh:
        got: list[ProgressEvent] = []

        async def follow() -> None:
            async for entry in gh.events():
                if isinstance(entry.item, ProgressEvent):
                    got.append(entry.item)
                    if entry.item.final:
                        return
        task = asyncio.create_task(follow())
        for _ in range(100):
            if gh.cursor is not None:
                break
            await asyncio.sleep(0.02)
        assert gh.cursor is not None
        reply = await gh.command("/gpu boot budget", idempotency_key="ev-1")
        assert reply.level != "error", reply
        await asyncio.wait_for(task, 20)
        assert got[0].phase.value == "accepted" and got[-1].phase.value == "healthy"

        # resume from the first event's cursor: the rest, once each
        first = None
        async for entry in gh.events(after="e0.n0"):
            first = entry
            break
        assert first is not None
        rest: list[int] = []
        async for entry in gh.events(after=first.cursor):
            if isinstance(entry.item, ProgressEvent):
                rest.append(entry.item.seq)
                if entry.item.final:
                    break
        assert rest == [e.seq for e in got[1:]]


def test_sync_client(live: LiveServer) -> None:  # noqa: F811
    with Client(live.url, live.keys["alice"]) as gh:
        assert isinstance(gh.search("a100"), SearchResult)
        boot = gh.boot("budget")
        assert isinstance(boot, BootResult)
        assert boot.instance.id in {v.id for v in gh.status().instances}
        with pytest.raises(NotFound):
            gh.stop("g-0000")
        reply = gh.command("/gpu nonsense")
        assert reply.level == "error"
        events = list(gh.events(after="e0.n0", timeout_s=1.0))
        assert events and all(isinstance(e.item, ProgressEvent | FeedNotice) for e in events)
        assert gh.cursor == events[-1].cursor
    with Client(live.url, live.keys["viewer"]) as viewer, pytest.raises(PermissionDenied) as err:
        viewer.boot("budget")
    assert err.value.status == 403 and live.keys["viewer"] not in str(err.value) + repr(err.value)


async def test_key_never_in_errors_reprs_or_logs(live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.DEBUG)
    real = live.keys["alice"]
    revoked_like = real[:-4] + ("0000" if not real.endswith("0000") else "1111")
    async with AsyncClient(live.url, revoked_like) as gh:
        assert revoked_like not in repr(gh)
        with pytest.raises(Unauthenticated) as err:
            await gh.status()
        with pytest.raises(Unauthenticated):
            await gh.command("/gpu status")
    assert err.value.status == 401
    async with AsyncClient(live.url, real) as gh:
        with pytest.raises(InvalidInput) as bad:
            await gh.search("gpu_ram>>>24")
        assert bad.value.status in (400, 422)
    text = str(err.value) + repr(err.value) + str(bad.value) + repr(bad.value)
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    for key in (real, revoked_like):
        assert key not in text and key not in logged
        secret = key.split("_", 2)[2]      # the secret itself may hold "_": split off only the prefix and id
        assert secret not in text and secret not in logged
    assert caplog.records, "the server and httpx did log something"


async def test_remote_shell(live: LiveServer) -> None:  # noqa: F811
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None)
    script = "/gpu boot budget\n/gpu status\n/gpu bogus\n"
    code = await run_remote(live.url, live.keys["alice"], console=console, stdin=io.StringIO(script),
                            interactive=False)
    text = out.getvalue()
    assert code == 1                                  # a piped script with an error exits 1
    assert "gpu> /gpu boot budget" in text and "Unknown command" in text
    assert "… g-" in text                             # progress from the event stream
    assert await live.service.instance_count() == 1

    # a bad key: the commands say so as replies; nothing runs, the key is not printed
    out2 = io.StringIO()
    code = await run_remote(live.url, "ghk_knothing_x", console=Console(file=out2, width=160, color_system=None),
                            stdin=io.StringIO("/gpu boot budget\n"), interactive=False, ready_timeout_s=1)
    assert code == 1 and "ghk_knothing_x" not in out2.getvalue()
    assert await live.service.instance_count() == 1


def test_me_and_my_own_machines(live: LiveServer) -> None:  # noqa: F811
    """A notebook says who its key is, and its Instances tab lists only the caller's machines."""
    with Client(live.url, live.keys["alice"]) as alice, Client(live.url, live.keys["bob"]) as bob:
        me = alice.me()
        assert (me.principal, me.role, me.team) == ("api:alice", "member", "ml")
        mine = alice.boot("budget").instance.id
        theirs = bob.boot("budget").instance.id
        own = alice.status(mine=True)
        assert mine in {v.id for v in own.instances} and theirs not in {v.id for v in own.instances}
        assert all(v.owner == "api:alice" for v in own.instances)
        assert own.run_rate.per_hour == sum((v.current_dph for v in own.instances), start=own.run_rate.per_hour * 0)
        everyone = alice.status()
        assert theirs in {v.id for v in everyone.instances}, "without mine, a member sees the team's machines"
