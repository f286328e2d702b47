"""A burst of boots by one person shares one month scan for the budget check (costs.used_up),
and changing a budget takes effect at once, not after the sharing window."""

from __future__ import annotations

import asyncio

import pytest

from gpuherd.core.errors import PermissionDenied
from gpuherd.core.results import BootResult


async def test_concurrent_boots_scan_the_month_once(service, member, monkeypatch):
    scans = []
    original = service.costs_.spent_budgets

    def counted(s, actor):
        scans.append(actor.principal)
        return original(s, actor)
    monkeypatch.setattr(service.costs_, "spent_budgets", counted)
    results = await asyncio.gather(*(service.boot(member, "budget") for _ in range(8)))
    assert all(isinstance(r, BootResult) for r in results)
    assert scans == [member.principal]                 # eight boots, one scan


async def test_a_budget_set_during_the_window_applies_to_the_next_boot(service, admin, member, clock):
    assert isinstance(await service.boot(member, "budget"), BootResult)   # caches "nothing used up"
    iid = (await service.status(admin)).instances[0].id
    clock.advance(3600 * 5)                             # five hours of spend ...
    await service.stop(admin, iid)
    await service.set_budget(admin, "team", "ml", "0.01")   # ... far past a one-cent budget
    with pytest.raises(PermissionDenied, match="Budget used up"):
        await service.boot(member, "budget")


async def test_the_shared_answer_expires(service, admin, member, clock):
    await service.set_budget(admin, "team", "ml", "0.05")
    assert isinstance(await service.boot(member, "budget"), BootResult)   # nothing spent yet: shared "no"
    clock.advance(3600 * 5)                # the window is long gone; five hours of spend past 5 cents
    with pytest.raises(PermissionDenied, match="Budget used up"):
        await service.boot(member, "budget")
