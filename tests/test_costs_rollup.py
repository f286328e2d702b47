"""The cost roll-up (cost_rollup) on real SQLite and PostgreSQL: every period and grouping it
answers equals, to the micro-dollar, both the scan of the raw segments and a plain-Python sum
over the segments as written (a property test over random ledgers with segments across
midnights and month ends, open ones accruing until now); two writers closing segments at once
keep it exact; the migration fills it from an existing ledger; the budget check before a boot
reads it, not the month's segments; and the costs reply's display rules."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, event, insert, select
from sqlmodel import SQLModel

from gpuherd.bot.replies import costs_reply
from gpuherd.core.clock import epoch
from gpuherd.core.db import Database, make_engine, upgrade
from gpuherd.core.ledger import COMPUTE, STORAGE, Ledger, add_to_rollup, month_of, parse_period
from gpuherd.core.models import BillingSegment, CostRollup, Instance
from gpuherd.core.results import CostGroup, CostReport, GroupBy, Money

BASE = datetime(2026, 10, 29, 0, 0, tzinfo=UTC)          # a few days before a month end
OWNERS = ["local:ann", "local:bob", "slack:U3"]
TEAMS = ["ml", "vision"]
TEMPLATES = ["budget", "research"]
PROVIDERS = ["sandbox", "vast"]
GROUPINGS: list[tuple[str, ...]] = [(), ("user",), ("team",), ("template",), ("provider",), ("kind",),
                                    ("team", "user"), ("template", "provider", "kind")]


def _inst(n: int, owner: str, team: str, template: str, provider: str) -> Instance:
    return Instance(id=f"g-{n:04x}", idempotency_key=f"k-{n}", provider=provider, owner=owner, team=team,
                    template=template, state="running", created_at=BASE, updated_at=BASE)


# an offset from BASE: often on the hour or at a midnight, so edges are hit exactly
offsets = st.one_of(st.integers(0, 9 * 86400), st.integers(0, 9 * 24).map(lambda h: h * 3600),
                    st.integers(0, 9).map(lambda d: d * 86400))
# how long a segment lasts (None: still open): across midnights and the month end as often as not
lengths = st.one_of(st.none(), st.integers(0, 4 * 86400),
                    st.sampled_from([0, 600, 3600, 4 * 3600, 13 * 3600, 86400, 30 * 3600, 3 * 86400 + 7]))
segment = st.tuples(st.sampled_from(OWNERS), st.sampled_from(TEAMS), st.sampled_from(TEMPLATES),
                    st.sampled_from(PROVIDERS), st.sampled_from([COMPUTE, STORAGE]),
                    st.integers(0, 4_000_000), offsets, lengths)
ledgers = st.lists(segment, min_size=0, max_size=25)
# one ledger that surely crosses midnights, the month end (Oct 31 -> Nov 1) and stays open
CROSSING = [("local:ann", "ml", "budget", "vast", COMPUTE, 1_234_567, 20 * 3600 + 17, 3 * 86400 + 7),
            ("local:bob", "vision", "research", "sandbox", STORAGE, 4_001, 2 * 86400, None),
            ("slack:U3", "ml", "research", "vast", COMPUTE, 999_999, 3 * 86400 - 1, 2)]


def _write(database: Database, segs: list[tuple], now_ts: int) -> list[tuple[tuple[str, ...], int, int, int | None]]:
    """Write the ledger through Ledger.open/close (as the service does). Returns what was
    written as (tags, rate, start, end or None)."""
    written = []
    with database.session() as s:
        s.execute(delete(BillingSegment))
        s.execute(delete(CostRollup))
        s.commit()
        for n, (owner, team, template, provider, kind, rate, start_off, length) in enumerate(segs):
            start = min(epoch(BASE) + start_off, now_ts)
            inst = _inst(n, owner, team, template, provider)
            Ledger.open(s, inst, kind, rate, datetime.fromtimestamp(start, UTC))
            end = None if length is None else min(start + length, now_ts)
            if end is not None:
                Ledger.close(s, inst.id, datetime.fromtimestamp(end, UTC))
            s.commit()         # one transaction per write, as in the service
            written.append(((kind, owner, team, template, provider), rate, start, end))
    return written


def _oracle(written: list, s: int, e: int, now_ts: int, key: int | None = None, value: str | None = None) -> Decimal:
    """Plain Python: rate x seconds inside [s, e), open segments to now, in USD."""
    total = 0
    for tags, rate, start, end in written:
        if key is not None and tags[key] != value:
            continue
        hi = min(e, now_ts if end is None else end)
        total += rate * max(0, hi - max(s, start))
    return Decimal(total) / Decimal(3600 * 10**6)


def _spans(now: datetime) -> list[tuple[datetime, datetime]]:
    periods = [parse_period(p, now) for p in ("today", "week", "month", "2026-10", "2026-11")]
    days = [(BASE, 2), (BASE + timedelta(days=2), 3), (BASE + timedelta(days=3), 1), (BASE + timedelta(days=8), 6)]
    return [(p.start, p.end) for p in periods] + [(a, a + timedelta(days=k)) for a, k in days]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segs=ledgers, now_off=st.one_of(st.integers(0, 10 * 86400), st.integers(4, 10).map(lambda d: d * 86400)))
@example(segs=CROSSING, now_off=6 * 86400 + 3600)
def test_rollup_equals_the_raw_segments_to_the_micro_dollar(database, segs, now_off):
    now = BASE + timedelta(seconds=now_off)
    now_ts = epoch(now)
    written = _write(database, segs, now_ts)
    with database.session() as s:
        for start, end in _spans(now):
            for by in GROUPINGS:
                fast = Ledger.grouped_by(s, start, end, now, by)
                assert fast == Ledger.grouped_by_scan(s, start, end, now, by), (start, end, by)
            filtered = Ledger.grouped_by(s, start, end, now, ("user",), team="ml", kind=[COMPUTE])
            assert filtered == Ledger.grouped_by_scan(s, start, end, now, ("user",), team="ml", kind=[COMPUTE])
            assert Ledger.total(s, start, end, now) == _oracle(written, epoch(start), epoch(end), now_ts)
            teams, users = Ledger.spend_of(s, start, end, now, ["ml", "nobody"], ["local:bob"])
            assert teams["nobody"] == 0
            assert users["local:bob"] == _oracle(written, epoch(start), epoch(end), now_ts, key=1, value="local:bob")
            team_total = Ledger.total(s, start, end, now, team="ml")
            assert teams["ml"] == team_total
            assert team_total == _oracle(written, epoch(start), epoch(end), now_ts, key=2, value="ml")
            assert team_total == sum((a for _, a in Ledger.grouped_by_scan(s, start, end, now, (), team="ml")),
                                     Decimal(0))
            if end - start <= timedelta(days=31):
                daily = Ledger.daily(s, start, end, now)
                assert daily == Ledger.daily_scan(s, start, end, now), (start, end)
                assert daily == Ledger.daily(s, start, end, now, user=OWNERS)
                for day, amount in daily:      # each day exactly; their sum to far below a micro-dollar
                    lo = max(epoch(start), epoch(datetime(day.year, day.month, day.day, tzinfo=UTC)))
                    assert amount == _oracle(written, lo, min(epoch(end), lo - lo % 86400 + 86400), now_ts), day
                whole = _oracle(written, epoch(start), epoch(end), now_ts)
                assert abs(sum((a for _, a in daily), Decimal(0)) - whole) < Decimal("1e-20")


def test_non_day_spans_and_instance_grouping_use_the_scan(database):
    """Spans off midnight, or keys the roll-up does not carry, are answered from the segments."""
    with database.session() as s:
        inst = _inst(1, "local:ann", "ml", "budget", "sandbox")
        Ledger.open(s, inst, COMPUTE, 1_000_000, BASE + timedelta(hours=1))
        Ledger.close(s, inst.id, BASE + timedelta(hours=5))
        s.commit()
        now = BASE + timedelta(days=1)
        assert Ledger.total(s, BASE + timedelta(hours=2), BASE + timedelta(hours=3), now) == Decimal(1)
        assert Ledger.grouped(s, BASE, now, now, "instance") == [(inst.id, Decimal(4))]
        assert Ledger.spend_of(s, BASE + timedelta(hours=2), BASE + timedelta(hours=3), now, ["ml"], ["local:ann"]) \
            == ({"ml": Decimal(1)}, {"local:ann": Decimal(1)})


def test_a_segment_across_a_month_end_lands_in_both_months_and_days(database):
    with database.session() as s:
        inst = _inst(2, "local:ann", "ml", "budget", "sandbox")
        end_of_oct = datetime(2026, 11, 1, tzinfo=UTC)
        Ledger.open(s, inst, COMPUTE, 2_000_000, end_of_oct - timedelta(hours=3))
        Ledger.close(s, inst.id, end_of_oct + timedelta(hours=1))
        s.commit()
        rows = {(r.grain, r.start_ts): r.amount for r in s.execute(select(CostRollup)).scalars()}
        assert rows == {("day", epoch(end_of_oct) - 86400): 2_000_000 * 3 * 3600,
                        ("month", epoch(datetime(2026, 10, 1, tzinfo=UTC))): 2_000_000 * 3 * 3600,
                        ("day", epoch(end_of_oct)): 2_000_000 * 3600,
                        ("month", epoch(end_of_oct)): 2_000_000 * 3600,
                        ("total", epoch(end_of_oct) - 86400): 2_000_000 * 3 * 3600,
                        ("total", epoch(end_of_oct)): 2_000_000 * 3600}


def _close_many(url: str, worker: int, count: int, barrier: threading.Barrier) -> None:
    """One writer with its own engine and connections, as another process would have."""
    db = Database(url)
    try:
        barrier.wait()
        for i in range(count):
            with db.session() as s:
                inst = _inst(worker * 1000 + i, "local:ann", "ml", "budget", "sandbox")  # the same roll-up rows
                start = BASE + timedelta(hours=i)
                Ledger.open(s, inst, COMPUTE, 1_000_000 + worker, start)
                Ledger.close(s, inst.id, start + timedelta(hours=30, seconds=worker))
                s.commit()
    finally:
        db.dispose()


def test_two_writers_closing_segments_at_once_keep_the_rollup_exact(database):
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=_close_many, args=(database.url, w, 40, barrier)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with database.session() as s:
        segs = list(s.execute(select(BillingSegment)).scalars())
        assert len({seg.instance_id for seg in segs}) == 80 and all(seg.end_ts is not None for seg in segs)
        expected: dict = {}
        for seg in segs:
            assert seg.end_ts is not None
            add_to_rollup(expected, (seg.kind, seg.owner, seg.team, seg.template, seg.provider), seg.rate_micros,
                          seg.start_ts, seg.end_ts)
        stored = {(r.grain, r.start_ts, r.kind, r.owner, r.team, r.template, r.provider): r.amount
                  for r in s.execute(select(CostRollup)).scalars()}
        assert stored == expected
        now = BASE + timedelta(days=10)
        month = month_of(BASE)
        assert Ledger.grouped_by(s, month.start, month.end, now, ("user",)) == \
            Ledger.grouped_by_scan(s, month.start, month.end, now, ("user",))


def test_a_rolled_back_close_leaves_no_rollup(database):
    with database.session() as s:
        inst = _inst(3, "local:ann", "ml", "budget", "sandbox")
        Ledger.open(s, inst, COMPUTE, 1_000_000, BASE)
        s.commit()
        Ledger.close(s, inst.id, BASE + timedelta(hours=2))
        s.rollback()
        assert list(s.execute(select(CostRollup)).scalars()) == []
        assert Ledger.total(s, BASE, BASE + timedelta(days=1), BASE + timedelta(hours=3)) == Decimal(3)


def test_the_migration_fills_the_rollup_from_an_existing_ledger(db_url):
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0005")
        with engine.begin() as conn:
            conn.execute(insert(SQLModel.metadata.tables["billing_segments"]), [
                dict(instance_id="g-0001", kind=COMPUTE, rate_micros=500_000, start_ts=epoch(BASE) + 3600,
                     end_ts=epoch(BASE) + 3 * 86400, owner="local:ann", team="ml", template="budget", provider="vast"),
                dict(instance_id="g-0002", kind=STORAGE, rate_micros=10_000, start_ts=epoch(BASE),
                     end_ts=None, owner="local:bob", team="ml", template="budget", provider="vast")])
        upgrade(engine)
        db = Database(db_url)
        try:
            with db.session() as s:
                now = BASE + timedelta(days=4)
                month = month_of(BASE)
                assert Ledger.grouped_by(s, month.start, month.end, now, ("user",)) == \
                    Ledger.grouped_by_scan(s, month.start, month.end, now, ("user",))
                assert Ledger.total(s, month.start, month.end, now, user="local:ann") == Decimal("35.5")
                assert Ledger.rebuild_rollup(s) == len(list(s.execute(select(CostRollup)).scalars())) == 7
        finally:
            db.dispose()
    finally:
        engine.dispose()


async def test_the_budget_check_before_a_boot_reads_the_rollup_not_the_segments(service, admin, member, clock):
    await service.set_budget(admin, "team", "ml", "0.10")
    boot = await service.boot(member, "budget")
    clock.advance(timedelta(hours=3))
    await service.stop(admin, boot.instance.id)           # closes the compute segment: rolled up
    statements: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:
        statements.append(statement)
    event.listen(service.db.engine, "before_cursor_execute", seen)
    try:
        used = await service.db.run(lambda s: service.costs_.spent_budgets(s, member))
    finally:
        event.remove(service.db.engine, "before_cursor_execute", seen)
    assert [u.name for u in used] == ["ml"]
    assert used[0].spent == boot.instance.dph * 3
    segment_reads = [q for q in statements if "billing_segments" in q]
    assert segment_reads and all("end_ts IS NULL" in q for q in segment_reads), segment_reads
    assert any("cost_rollup" in q for q in statements)
    # a boot's few budgets are read one filtered total each; many share one grouped read: same figures
    await service.set_budget(admin, "user", "slack:U2", "50")
    await service.set_budget(admin, "team", "vision", "50")
    every = {(u.scope.value, u.name): u.spent for u in await service.db.run(service.costs_.all_budget_uses)}
    assert len(every) == 3 and every[("team", "ml")] == every[("user", "slack:U2")] == used[0].spent


def _report(**kw) -> CostReport:
    now = datetime(2026, 11, 20, tzinfo=UTC)
    base = dict(period="this month (2026-11)", start=month_of(now).start, end=month_of(now).end,
                group_by=GroupBy.USER, total=Decimal("0.03"), groups=[], running=[], run_rate=Money.of(Decimal("1.5")),
                month_to_date=Decimal("7"), projected_month_end=Decimal("99"), budgets=[])
    return CostReport(**{**base, **kw})


def test_costs_reply_says_when_rounded_rows_do_not_add_up():
    groups = [CostGroup(key=k, amount=Decimal("0.004")) for k in ("local:a", "local:b", "local:c")]
    reply = costs_reply(_report(groups=groups, total=Decimal("0.012")))
    assert any("add up to $0.00" in n and "$0.01" in n for n in reply.notes), reply.notes
    even = costs_reply(_report(groups=[CostGroup(key="local:a", amount=Decimal("0.5"))], total=Decimal("0.5")))
    assert not any("rounded" in n for n in even.notes)


def test_costs_reply_for_a_past_month_has_no_run_rate_or_projection():
    past = costs_reply(_report(period="2026-06", current=False))
    labels = [f.label for f in past.fields]
    assert "run-rate" not in labels and "month-end projection" not in labels and "spend" in labels
    assert any("not the current period" in n for n in past.notes)
    now = costs_reply(_report())
    assert {"run-rate", "month-end projection"} <= {f.label for f in now.fields}


async def test_costs_reply_lists_stopped_machines_apart_from_running_ones(service, admin, clock):
    up = await service.boot(admin, "budget", wait=True)
    down = await service.boot(admin, "budget", wait=True)
    clock.advance(timedelta(hours=1))
    await service.stop(admin, down.instance.id)
    report = await service.costs(admin, "month")
    assert report.current
    reply = costs_reply(report)
    tables = {t.columns[0]: [row[0] for row in t.rows] for t in reply.tables}
    assert tables["running"] == [up.instance.id]
    assert tables["stopped"] == [down.instance.id]
    past = await service.costs(admin, "2026-06")
    assert not past.current and "run-rate" not in [f.label for f in costs_reply(past).fields]
