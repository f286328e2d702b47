"""Detached boots (`boot(..., detach=True)`): the answer comes once the intent and its operation
are written, before the provider has answered, and the provider's answer becomes the
operation's next events. What an HTTP API answering 202 in milliseconds is built on."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select

from gpuherd.core.errors import CapacityError
from gpuherd.core.models import Instance, NoticeRecord
from gpuherd.core.results import BootResult, Phase


async def _events(service, actor, op_id):
    return [ev async for ev in service.follow(actor, op_id, timeout_s=10)]


async def test_a_detached_boot_answers_before_the_provider(service, member, sandbox):
    await service.booting.choose_offers(service.templates.get("budget"), offer=None, provider=None)  # offers cached
    sandbox.latency_s = 2.0          # far above what a loaded CI machine adds to the answer itself
    began = time.perf_counter()
    got = await service.boot(member, "budget", detach=True)
    answered = time.perf_counter() - began
    sandbox.latency_s = 0.0          # the create in flight still takes its 2 s; the rest goes quickly
    assert isinstance(got, BootResult) and got.operation_id
    assert got.instance.state.value == "pending" and not got.ready
    assert answered < 1.5, f"a detached boot waited for the provider ({answered:.2f} s)"
    events = await _events(service, member, got.operation_id)
    phases = [ev.phase for ev in events]
    assert phases[0] is Phase.ACCEPTED and phases[-1] is Phase.HEALTHY
    assert any("accepted the order" in ev.text for ev in events)
    view = await service.view(member, got.instance.id)
    assert view.state.value == "running" and view.ready


async def test_the_same_key_twice_is_one_machine(service, member, sandbox):
    sandbox.latency_s = 0.2
    a, b = await asyncio.gather(service.boot(member, "budget", idempotency_key="K1", detach=True),
                                service.boot(member, "budget", idempotency_key="K1", detach=True))
    assert isinstance(a, BootResult) and isinstance(b, BootResult)
    assert a.instance.id == b.instance.id
    await service.booting.drain()
    with service.db.session() as s:
        assert len(list(s.execute(select(Instance)).scalars())) == 1
    assert len(await sandbox.list()) == 1


async def test_a_refusal_after_the_answer_ends_the_operation_and_tells_the_team(service, member, sandbox,
                                                                                 monkeypatch):
    async def no_capacity(request):
        await asyncio.sleep(0.05)
        raise CapacityError("sandbox", "no machine left at this price")
    monkeypatch.setattr(sandbox, "create", no_capacity)
    got = await service.boot(member, "budget", offer=None, detach=True)
    assert isinstance(got, BootResult) and got.instance.state.value == "pending"
    events = await _events(service, member, got.operation_id)
    assert events[-1].phase is Phase.FAILED and events[-1].final
    assert "no machine left" in events[-1].text
    view = await service.view(member, got.instance.id)
    assert view.state.value == "failed"
    with service.db.session() as s:
        notices = list(s.execute(select(NoticeRecord).where(NoticeRecord.kind == "boot.failed")).scalars())
    assert len(notices) == 1 and notices[0].instance_id == got.instance.id and notices[0].team == member.team


async def test_the_answer_of_a_detached_boot_is_the_view_the_database_gives(service, member, sandbox):
    """The 202's view is built without a query (`views.fresh_view`); it must equal what
    `build_views` reads back for the same row at the same moment."""
    from gpuherd.core.views import build_views

    sandbox.latency_s = 0.3
    got = await service.boot(member, "budget", detach=True)
    assert isinstance(got, BootResult)
    with service.db.session() as s:
        row = s.get(Instance, got.instance.id)
        assert row is not None
        read = build_views(s, [row], service.clock.now(), member, service.providers.capabilities())[0]
    await service.booting.drain()
    fields = set(type(read).model_fields) - {"uptime_s", "idle_for_s"}
    assert read.operation_id == got.operation_id
    assert {f: getattr(got.instance, f) for f in fields} == {f: getattr(read, f) for f in fields}
