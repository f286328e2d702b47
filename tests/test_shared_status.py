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


async def test_a_stale_page_is_answered_while_it_is_rebuilt_but_never_after_a_change(service, admin, monkeypatch):
    """Past STATUS_SHARE_S the last page is still answered at once (pollers never all wait for
    the rebuild) while one rebuild runs; a change through the façade is seen at once regardless."""
    from gpuherd.core.service import STATUS_SHARE_S

    now = [0.0]
    monkeypatch.setattr(service._pages, "_monotonic", lambda: now[0])   # pages age on real time otherwise
    booted = await service.boot(admin, "budget", wait=True)
    first = await service.status(admin, share=True)
    builds = []
    hold = asyncio.Event()
    original = service._status

    async def slow(*a, **kw):
        builds.append(1)
        await hold.wait()
        return await original(*a, **kw)
    monkeypatch.setattr(service, "_status", slow)
    now[0] += STATUS_SHARE_S * 1.5
    stale = await asyncio.wait_for(asyncio.gather(*(service.status(admin, share=True) for _ in range(10))), 1)
    await asyncio.sleep(0)                                           # the background rebuild starts
    assert all(p is first for p in stale) and len(builds) == 1      # one rebuild, nobody waited for it
    await service.stop(admin, booted.instance.id)                    # a change while it runs
    hold.set()
    after = await service.status(admin, share=True)
    assert after.instances[0].state.value == "stopped" and len(builds) == 2


async def test_a_balance_check_a_cost_report_stopped_waiting_for_ends_with_the_service(service, admin,
                                                                                     monkeypatch):
    """`/gpu costs` waits COSTS_BALANCE_WAIT_S at most for provider balances; the check goes on,
    shared, and closing the service cancels it before the providers are closed."""
    import gpuherd.core.service as service_module

    stopped = asyncio.Event()

    async def hanging(*_a, **_kw):
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()
    monkeypatch.setattr(service.health, "_check_all", hanging)
    monkeypatch.setattr(service_module, "COSTS_BALANCE_WAIT_S", 0.05)
    report = await asyncio.wait_for(service.costs(admin), 2)
    assert report.balances == [] and not stopped.is_set()      # answered without them; still asking
    await asyncio.wait_for(service.aclose(), 5)
    assert stopped.is_set()
