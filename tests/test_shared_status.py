"""`status(share=True)`: one person's clients polling the same page share one build a second;
any change made through the service is seen by the next call at once."""

from __future__ import annotations

import asyncio

from gpuherd.core.results import BootResult


async def test_shared_pages_are_built_once_and_forgotten_by_a_change(service, admin, monkeypatch):
    booted = await service.boot(admin, "budget", wait=True)
    assert isinstance(booted, BootResult)
    builds = []
    original = service._status

    async def counted(*a, **kw):
        builds.append(1)
        return await original(*a, **kw)
    monkeypatch.setattr(service, "_status", counted)
    pages = await asyncio.gather(*(service.status(admin, share=True) for _ in range(20)))
    assert len(builds) == 1 and all(p is pages[0] for p in pages)
    assert pages[0].instances[0].state.value == "running"
    await service.stop(admin, booted.instance.id)                 # a change through the façade
    after = await service.status(admin, share=True)
    assert len(builds) == 2 and after.instances[0].state.value == "stopped"
    unshared = await service.status(admin)                        # the default never shares
    assert len(builds) == 3 and unshared is not after


async def test_pages_are_per_person(service, admin, member):
    await service.boot(admin, "budget", wait=True)
    mine = await service.status(member, share=True)
    theirs = await service.status(admin, share=True)
    assert mine is not theirs
    assert all(a.op.value not in ("stop", "destroy") for v in mine.instances for a in v.actions)
