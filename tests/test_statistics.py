"""Fleet statistics (core/statistics.py) on SQLite and PostgreSQL with the sandbox provider: the
counts by state, the average $/h of the active instances, the distributions by GPU model, state
and provider, and this month's spend, checked against figures computed independently from the
instances' own views and the ledger."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from sqlalchemy import event

from gpuherd.core.ledger import Ledger, month_of
from gpuherd.core.results import BootResult, Confirmation, DestroyResult
from gpuherd.core.statistics import StatisticsResult


async def _boot(service, actor, template: str, **kw) -> BootResult:
    result = await service.boot(actor, template, wait=True, **kw)
    assert isinstance(result, BootResult), result
    return result


async def test_empty_fleet_has_zero_figures(service, admin):
    stats = await service.statistics(admin)
    assert isinstance(stats, StatisticsResult) and stats.kind == "statistics"
    assert (stats.total, stats.active, stats.stopped, stats.destroyed, stats.ended) == (0, 0, 0, 0, 0)
    assert stats.average_dph == Decimal(0) and stats.month_to_date == Decimal(0)
    assert stats.by_gpu == stats.by_state == stats.by_provider == []
    assert stats.period == "2026-11" and stats.simulated


async def test_counts_average_and_distributions_match_the_fleet(service, admin, clock):
    running = [await _boot(service, admin, "budget"), await _boot(service, admin, "research"),
               await _boot(service, admin, "high_performance")]
    to_stop = await _boot(service, admin, "budget", idempotency_key="stop-me")
    to_destroy = await _boot(service, admin, "research", idempotency_key="destroy-me")
    clock.advance(timedelta(hours=2))
    stopped = await service.stop(admin, to_stop.instance.id)
    done = await service.destroy(admin, to_destroy.instance.id, confirmed=True)
    assert isinstance(done, DestroyResult)
    clock.advance(timedelta(minutes=30))

    stats = await service.statistics(admin)

    assert stats.total == 5 and stats.active == 3 and stats.stopped == 1 and stats.destroyed == 1
    assert stats.ended == 1
    dphs = [r.instance.dph for r in running]
    assert stats.average_dph == (sum(dphs, Decimal(0)) / 3).quantize(Decimal("0.000001"))
    # what the fleet costs per hour now: compute of the running three plus the stopped disk
    assert stats.run_rate == sum(dphs, Decimal(0)) + stopped.storage.per_hour
    states = {g.key: g for g in stats.by_state}
    assert {k: g.count for k, g in states.items()} == {"running": 3, "stopped": 1, "destroyed": 1}
    assert states["running"].active == 3 and states["running"].dph == sum(dphs, Decimal(0))
    assert states["stopped"].dph == stopped.storage.per_hour and states["destroyed"].dph == 0
    assert [g.key for g in stats.by_provider] == ["sandbox"] and stats.by_provider[0].count == 5
    # by GPU model: the same counts as the instances themselves, each group's $/h its members'
    everyone = [*running, to_stop, to_destroy]
    expected: dict[str, int] = {}
    for r in everyone:
        expected[r.instance.gpu_name] = expected.get(r.instance.gpu_name, 0) + 1
    assert {g.key: g.count for g in stats.by_gpu} == expected
    assert sum(g.dph for g in stats.by_gpu) == stats.run_rate
    assert [g.count for g in stats.by_gpu] == sorted((g.count for g in stats.by_gpu), reverse=True)
    # the month's spend is the ledger's, to the micro-dollar
    with service.db.session() as s:
        month = month_of(clock.now())
        assert stats.month_to_date == Ledger.total(s, month.start, month.end, clock.now())
    assert stats.month_to_date > 0


async def test_statistics_is_aggregated_in_sql(service, admin):
    """However many instances, the figures come from a fixed number of statements (GROUP BY),
    not one per instance."""
    for i in range(6):
        await _boot(service, admin, "budget", idempotency_key=f"many-{i}")
    seen: list[str] = []

    def count(conn, cursor, statement, *args):
        seen.append(statement)

    event.listen(service.db.engine, "before_cursor_execute", count)
    try:
        stats = await service.statistics(admin)
    finally:
        event.remove(service.db.engine, "before_cursor_execute", count)
    assert stats.total == 6
    selects = [s for s in seen if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2, selects
    assert "GROUP BY" in selects[0].upper()


async def test_viewers_may_read_it_and_a_pending_question_changes_nothing(service, admin):
    await service.set_user(admin, "slack:V9", role="viewer")
    viewer = service.actor("slack:V9", source="slack")
    booted = await _boot(service, admin, "budget")
    asked = await service.destroy(admin, booted.instance.id)
    assert isinstance(asked, Confirmation)
    stats = await service.statistics(viewer)
    assert stats.active == 1 and stats.destroyed == 0

