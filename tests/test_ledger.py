"""The ledger on real SQLite and PostgreSQL: clipping, grouping, run-rate, projection, exactness."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from gpuherd.core.errors import InvalidInput
from gpuherd.core.ledger import COMPUTE, STORAGE, Ledger, month_of, parse_period
from gpuherd.core.models import Instance
from gpuherd.core.money import to_micros

T0 = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)


def _inst(id_: str, owner: str = "local:a", team: str = "ml", template: str = "budget",
          provider: str = "sandbox") -> Instance:
    return Instance(id=id_, idempotency_key=f"k-{id_}", provider=provider, owner=owner, team=team,
                    template=template, state="running", created_at=T0, updated_at=T0)


def test_cost_is_clipped_to_the_period(database):
    with database.session() as s:
        inst = _inst("g-0001")
        s.add(inst)
        # Oct 31 22:00 -> Nov 1 02:00 at $0.50/h: 2 h fall in November
        Ledger.open(s, inst, COMPUTE, to_micros("0.5"), T0 - timedelta(hours=2))
        Ledger.close(s, "g-0001", T0 + timedelta(hours=2))
        s.commit()
        # stored cut at the month boundary, so a month's costs are an index range
        assert [(g.start_ts, g.end_ts) for g in Ledger.segments(s, "g-0001")] == [
            (int((T0 - timedelta(hours=2)).timestamp()), int(T0.timestamp())),
            (int(T0.timestamp()), int((T0 + timedelta(hours=2)).timestamp()))]
        nov = month_of(T0)
        oct_ = month_of(T0 - timedelta(days=1))
        now = T0 + timedelta(days=3)
        assert Ledger.total(s, nov.start, nov.end, now) == Decimal("1.0")
        assert Ledger.total(s, oct_.start, oct_.end, now) == Decimal("1.0")
        assert Ledger.instance_cost(s, "g-0001", now) == Decimal("2.0")


def test_open_segment_runs_to_now_and_is_exact(database):
    with database.session() as s:
        inst = _inst("g-0002")
        s.add(inst)
        Ledger.open(s, inst, COMPUTE, to_micros("0.347"), T0)
        s.commit()
        now = T0 + timedelta(minutes=7, seconds=13)  # 433 s
        expected = Decimal(347000 * 433) / Decimal(3600 * 10**6)
        assert Ledger.instance_cost(s, "g-0002", now) == expected
        assert Ledger.run_rate(s) == Decimal("0.347")
        Ledger.close(s, "g-0002", now)
        s.commit()
        assert Ledger.run_rate(s) == Decimal(0)
        later = now + timedelta(hours=5)
        assert Ledger.instance_cost(s, "g-0002", later) == expected  # closed: no more charges


def test_grouping_by_user_team_template_provider(database):
    with database.session() as s:
        a = _inst("g-000a", owner="local:ann", team="ml", template="budget", provider="sandbox")
        b = _inst("g-000b", owner="local:bob", team="vision", template="research", provider="vast")
        s.add(a)
        s.add(b)
        Ledger.open(s, a, COMPUTE, to_micros("1"), T0)
        Ledger.open(s, b, COMPUTE, to_micros("2"), T0)
        Ledger.open(s, b, STORAGE, to_micros("0.01"), T0 + timedelta(hours=1))
        s.commit()
        now = T0 + timedelta(hours=3)
        end = T0 + timedelta(days=30)
        by_user = dict(Ledger.grouped(s, T0, end, now, "user"))
        assert by_user == {"local:ann": Decimal(3), "local:bob": Decimal("6.02")}
        assert [k for k, _ in Ledger.grouped(s, T0, end, now, "team")] == ["vision", "ml"]  # largest first
        assert dict(Ledger.grouped(s, T0, end, now, "provider"))["vast"] == Decimal("6.02")
        assert dict(Ledger.grouped(s, T0, end, now, "kind"))[STORAGE] == Decimal("0.02")
        assert Ledger.total(s, T0, end, now, team="ml") == Decimal(3)
        assert Ledger.total(s, T0, end, now, user="local:bob") == Decimal("6.02")


def test_segment_outside_period_or_in_future_costs_nothing(database):
    with database.session() as s:
        inst = _inst("g-0003")
        s.add(inst)
        Ledger.open(s, inst, COMPUTE, to_micros("1"), T0 + timedelta(days=2))
        s.commit()
        # asked before the segment started
        assert Ledger.total(s, T0, T0 + timedelta(days=30), T0 + timedelta(days=1)) == Decimal(0)
        # a period that ends before it
        assert Ledger.total(s, T0, T0 + timedelta(days=1), T0 + timedelta(days=5)) == Decimal(0)


def test_close_never_ends_a_segment_before_it_starts(database):
    """A clock that stepped back must not produce a negative charge."""
    with database.session() as s:
        inst = _inst("g-0004")
        s.add(inst)
        Ledger.open(s, inst, COMPUTE, to_micros("1"), T0)
        s.commit()
        Ledger.close(s, "g-0004", T0 - timedelta(hours=1))
        s.commit()
        [seg] = Ledger.segments(s, "g-0004")
        assert seg.end_ts == seg.start_ts
        assert Ledger.instance_cost(s, "g-0004", T0 + timedelta(days=1)) == Decimal(0)


def test_projection_uses_run_rate_to_month_end():
    now = datetime(2026, 11, 30, 0, 0, tzinfo=UTC)  # 24 h left in November
    assert Ledger.projection(Decimal("100"), Decimal("0.5"), now) == Decimal("112.0")


@pytest.mark.parametrize("text,label,days", [("today", "today", 1), ("week", "this week", 7),
                                              ("month", "this month (2026-11)", 30), ("2026-02", "2026-02", 28)])
def test_periods(text, label, days):
    now = datetime(2026, 11, 12, 15, 30, tzinfo=UTC)  # Thursday
    p = parse_period(text, now)
    assert p.label == label
    assert (p.end - p.start).days == days
    if text == "week":
        assert p.start.weekday() == 0 and p.start.day == 9


@pytest.mark.parametrize("bad", ["yesterday", "2026-13", "26-11", "1999-01", "month;drop"])
def test_bad_periods_are_named(bad):
    with pytest.raises(InvalidInput, match=bad.split(";")[0][:4]):
        parse_period(bad, datetime(2026, 11, 12, tzinfo=UTC))



def test_groups_that_billed_nothing_are_left_out_and_a_total_is_always_a_figure(database):
    """A zero-rate or zero-length segment leaves no roll-up row, so neither path lists its group;
    a total over nothing is $0, not a missing row."""
    with database.session() as s:
        free = _inst("g-0005", owner="local:free")
        paid = _inst("g-0006", owner="local:paid")
        Ledger.open(s, free, COMPUTE, 0, T0)
        Ledger.open(s, paid, COMPUTE, to_micros("1"), T0)
        Ledger.close(s, "g-0005", T0 + timedelta(hours=2))
        Ledger.close(s, "g-0006", T0 + timedelta(hours=2))
        s.commit()
        now = T0 + timedelta(days=1)
        nov = month_of(T0)
        assert Ledger.grouped(s, nov.start, nov.end, now, "user") == [("local:paid", Decimal(2))]
        assert Ledger.grouped_by_scan(s, nov.start, nov.end, now, ("user",)) == [(("local:paid",), Decimal(2))]
        dec = month_of(T0 + timedelta(days=31))
        assert Ledger.total(s, dec.start, dec.end, now) == Decimal(0)
        assert Ledger.grouped(s, dec.start, dec.end, now, "team") == []


def test_an_unknown_period_is_quoted_clipped_and_without_control_characters() -> None:
    """The period is quoted back by the ledger itself, so every surface (chat, HTTP) gets a short
    message with no escape sequence in it, not only the ones with a net of their own."""
    from datetime import UTC, datetime

    import pytest

    from gpuherd.core.errors import InvalidInput
    from gpuherd.core.ledger import parse_period

    now = datetime(2026, 11, 20, tzinfo=UTC)
    with pytest.raises(InvalidInput) as err:
        parse_period("\x1b[2J" + "y" * 10_000, now)
    assert "\x1b" not in err.value.message and len(err.value.message) < 200
    assert "use today, week, month" in err.value.message
