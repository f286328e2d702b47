"""What the notebook panel needs from core, tested in core: spend per day of a period
(`CostReport.daily`, `Ledger.daily`), a view's cost at a later moment (`InstanceView.accrued_at`,
the panel's ticking cost), the live feed of an in-process surface (`GpuService.watch`), who the
caller is (`whoami`) and a vLLM template's OpenAI base URL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

from gpuherd.core.feed import FeedNotice
from gpuherd.core.results import ProgressEvent, openai_base_url


async def test_daily_spend_splits_a_session_across_days_and_sums_to_the_total(service, admin, clock):
    boot = await service.boot(admin, "budget", wait=True)
    iid = boot.instance.id
    clock.advance(timedelta(hours=30))          # from Tuesday 09:00 to Wednesday 15:00
    await service.stop(admin, iid)
    report = await service.costs(admin, "week")
    days = {d.day.isoformat(): d.amount for d in report.daily}
    assert list(days) == ["2026-11-09", "2026-11-10", "2026-11-11"], "Monday to today, no future days"
    assert days["2026-11-09"] == 0
    rate = boot.instance.dph
    assert abs(days["2026-11-10"] - rate * 15) < Decimal("0.01"), days     # 09:00 to midnight
    assert abs(days["2026-11-11"] - rate * 15) < Decimal("0.01"), days     # midnight to 15:00 (then storage)
    assert sum(days.values()) == report.total
    today = await service.costs(admin, "today")
    assert [d.day.isoformat() for d in today.daily] == ["2026-11-11"]
    assert today.daily[0].amount == today.total


async def test_accrued_at_ticks_at_the_current_rate_from_when_the_view_was_read(service, admin, clock):
    boot = await service.boot(admin, "budget", wait=True)
    view = await service.view(admin, boot.instance.id)
    assert view.observed_at == clock.now()
    later = view.accrued_at(view.observed_at + timedelta(minutes=30))
    assert later == view.accrued + view.current_dph / 2
    assert view.accrued_at(view.observed_at - timedelta(hours=1)) == view.accrued, "never runs backwards"
    clock.advance(timedelta(minutes=30))
    assert abs((await service.view(admin, view.id)).accrued - later) < Decimal("0.000001"), "the ledger agrees"
    stopped = (await service.stop(admin, view.id)).instance
    assert stopped.accrued_at(clock.now() + timedelta(hours=5)) == stopped.accrued + stopped.storage_dph * 5


async def test_watch_streams_progress_and_notices_as_they_are_written(service, admin, member):
    got: list[object] = []

    async def consume() -> None:
        async for entry in service.watch(member, poll_s=0.05):
            got.append(entry.item)
    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    boot = await service.boot(member, "budget", wait=True)
    await service.stop(admin, boot.instance.id)          # someone else stops it: the owner is told
    for _ in range(100):
        if any(isinstance(i, FeedNotice) and "stopped" in i.text for i in got):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    progress = [i for i in got if isinstance(i, ProgressEvent)]
    assert progress and progress[-1].final and progress[0].instance_id == boot.instance.id
    assert any(isinstance(i, FeedNotice) and i.instance_id == boot.instance.id for i in got)


async def test_whoami_and_openai_base_url(service, member):
    me = await service.whoami(member)
    assert (me.principal, me.role, me.team) == ("slack:U2", "member", "ml")
    assert openai_base_url("http://h:8000/") == "http://h:8000/v1"
    assert openai_base_url(None) is None
    templates = {t.name: t for t in (await service.list_templates(member)).templates}
    assert any(t.openai_api for t in templates.values()), "the built-in vLLM templates say so"
    assert all(t.openai_api == (t.model is not None) for t in templates.values())
