"""The cost ledger: billing segments (compute while running, storage while stopped) and every
cost figure derived from them. Costs for a period are sums over segments clipped to the period,
computed in SQL on integer micro-dollar-seconds, so they are exact and fast on a large ledger."""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, TypeVar

from sqlalchemy import ColumnElement, Select, and_, case, func, literal, or_, select
from sqlmodel import Session, col

from .clock import as_utc, epoch, from_epoch
from .errors import InvalidInput
from .models import BillingSegment, Instance
from .money import MICRO

GroupBy = Literal["user", "team", "template", "provider", "instance", "kind"]
GROUP_COLUMNS = {
    "user": col(BillingSegment.owner),
    "team": col(BillingSegment.team),
    "template": col(BillingSegment.template),
    "provider": col(BillingSegment.provider),
    "instance": col(BillingSegment.instance_id),
    "kind": col(BillingSegment.kind),
}

MAX_DAYS = 31          # Ledger.daily: a period is at most one month

COMPUTE = "compute"
STORAGE = "storage"


@dataclass(frozen=True)
class Period:
    label: str
    start: datetime
    end: datetime            # exclusive

    @property
    def hours(self) -> Decimal:
        return Decimal(int((self.end - self.start).total_seconds())) / 3600


def month_of(when: datetime) -> Period:
    when = as_utc(when)
    start = when.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(start.year, start.month)[1]
    return Period(start.strftime("%Y-%m"), start, start + timedelta(days=days))


def parse_period(text: str | None, now: datetime) -> Period:
    """today | week | month | YYYY-MM (UTC). `week` starts on Monday."""
    now = as_utc(now)
    key = (text or "month").strip().lower()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if key == "today":
        return Period("today", midnight, midnight + timedelta(days=1))
    if key == "week":
        monday = midnight - timedelta(days=midnight.weekday())
        return Period("this week", monday, monday + timedelta(days=7))
    if key == "month":
        period = month_of(now)
        return Period(f"this month ({period.label})", period.start, period.end)
    m = re.fullmatch(r"(\d{4})-(\d{2})", key)
    if m and 1 <= int(m.group(2)) <= 12 and 2000 <= int(m.group(1)) <= 2999:
        return month_of(now.replace(year=int(m.group(1)), month=int(m.group(2)), day=1))
    raise InvalidInput(f"Unknown period '{text}': use today, week, month or a month like 2026-11.")


def _clipped_micros_expr(start_ts: int, end_ts: int, now_ts: int) -> ColumnElement[int]:
    """SQL for rate x seconds-inside-[start, end) of one segment, open segments running to now."""
    seg_end = func.coalesce(col(BillingSegment.end_ts), literal(now_ts))
    lo = case((col(BillingSegment.start_ts) > start_ts, col(BillingSegment.start_ts)), else_=literal(start_ts))
    hi = case((seg_end < end_ts, seg_end), else_=literal(end_ts))
    return col(BillingSegment.rate_micros) * (hi - lo)


def month_start_ts(ts: int) -> int:
    return epoch(month_of(from_epoch(ts)).start)


def split_at_months(start_ts: int, end_ts: int) -> list[tuple[int, int]]:
    """[start, end) cut at every month boundary inside it; at least one piece."""
    pieces = []
    lo = start_ts
    while True:
        boundary = epoch(month_of(from_epoch(lo)).end)
        if end_ts <= boundary:
            pieces.append((lo, end_ts))
            return pieces
        pieces.append((lo, boundary))
        lo = boundary


def _candidates(start_ts: int, end_ts: int, now_ts: int) -> ColumnElement[bool]:
    """Segments overlapping [start, end) at `now`, in a form both databases answer from indexes:
    closed segments never cross a month boundary, so they start at or after the period's month
    start; open segments are few and found through the end_ts index."""
    lo = month_start_ts(start_ts)
    hi = min(end_ts, now_ts)
    return (
        or_(and_(col(BillingSegment.start_ts) >= lo, col(BillingSegment.start_ts) < hi),
            and_(col(BillingSegment.end_ts).is_(None), col(BillingSegment.start_ts) < lo))
        & (func.coalesce(col(BillingSegment.end_ts), literal(now_ts)) > start_ts)
    )


def _overlaps(start_ts: int, end_ts: int, now_ts: int) -> ColumnElement[bool]:
    """Plain overlap test, for queries already narrowed by instance id."""
    return (
        (col(BillingSegment.start_ts) < end_ts)
        & (col(BillingSegment.start_ts) < now_ts)
        & (func.coalesce(col(BillingSegment.end_ts), literal(now_ts)) > start_ts)
    )


def _to_usd(micro_seconds: int | Decimal | None) -> Decimal:
    return Decimal(int(micro_seconds or 0)) / (3600 * MICRO)


class Ledger:
    """Stateless: every method takes the session so callers decide the transaction."""

    # --- writing -------------------------------------------------------------------------
    @staticmethod
    def open(session: Session, instance: Instance, kind: str, rate_micros: int, at: datetime) -> BillingSegment:
        seg = BillingSegment(instance_id=instance.id, kind=kind, rate_micros=rate_micros,
                             start_ts=epoch(at), owner=instance.owner, team=instance.team,
                             template=instance.template, provider=instance.provider)
        session.add(seg)
        return seg

    @staticmethod
    def close(session: Session, instance_id: str, at: datetime, kind: str | None = None) -> int:
        """Close the instance's open segments (of one kind, or all) at `at`. Returns how many.

        A closed segment never spans a month boundary: it is split into one piece per month, so a
        period's costs are found by an index range from the start of its month (see _candidates)."""
        ts = epoch(at)
        stmt = select(BillingSegment).where(col(BillingSegment.instance_id) == instance_id,
                                            col(BillingSegment.end_ts).is_(None))
        if kind:
            stmt = stmt.where(col(BillingSegment.kind) == kind)
        segs = list(session.execute(stmt).scalars())
        for seg in segs:
            end = max(ts, seg.start_ts)  # never before it started, even if the clock stepped back
            pieces = split_at_months(seg.start_ts, end)
            seg.end_ts = pieces[0][1]
            session.add(seg)
            for start, stop in pieces[1:]:
                session.add(BillingSegment(instance_id=seg.instance_id, kind=seg.kind, rate_micros=seg.rate_micros,
                                           start_ts=start, end_ts=stop, owner=seg.owner, team=seg.team,
                                           template=seg.template, provider=seg.provider))
        session.flush()
        return len(segs)

    # --- reading -------------------------------------------------------------------------
    @staticmethod
    def total(session: Session, start: datetime, end: datetime, now: datetime,
              **where: str | Sequence[str]) -> Decimal:
        s, e, n = epoch(start), epoch(end), epoch(now)
        stmt = select(func.sum(_clipped_micros_expr(s, e, n))).where(_candidates(s, e, n))
        stmt = _filter(stmt, where)
        return _to_usd(session.execute(stmt).scalar_one())

    @staticmethod
    def grouped(session: Session, start: datetime, end: datetime, now: datetime, by: GroupBy,
                **where: str | Sequence[str]) -> list[tuple[str, Decimal]]:
        """[(group, USD)] largest first."""
        return [(keys[0], amount) for keys, amount in Ledger.grouped_by(session, start, end, now, (by,), **where)]

    @staticmethod
    def grouped_by(session: Session, start: datetime, end: datetime, now: datetime, by: Sequence[str],
                   **where: str | Sequence[str]) -> list[tuple[tuple[str, ...], Decimal]]:
        """[((k1, k2, ...), USD)] largest first: one indexed scan however many keys, so a report
        that needs spend by template and by team (for a budget) reads the ledger once."""
        cols = [GROUP_COLUMNS[k] for k in by]
        s, e, n = epoch(start), epoch(end), epoch(now)
        stmt = (select(*cols, func.sum(_clipped_micros_expr(s, e, n))).where(_candidates(s, e, n))
                .group_by(*cols))
        stmt = _filter(stmt, where)
        rows = [(tuple(str(k) for k in row[:-1]), _to_usd(row[-1])) for row in session.execute(stmt).all()]
        rows.sort(key=lambda r: (-r[1], r[0]))
        return rows

    @staticmethod
    def daily(session: Session, start: datetime, end: datetime, now: datetime,
              **where: str | Sequence[str]) -> list[tuple[date, Decimal]]:
        """[(day, USD)] for each UTC day of [start, end) up to today, in one indexed scan: one
        clipped sum per day in a single SELECT (a period is at most a month, so at most 31 sums),
        since segments are only split at month boundaries and a day's share must be clipped."""
        s, e, n = epoch(start), epoch(end), epoch(now)
        first = as_utc(start).replace(hour=0, minute=0, second=0, microsecond=0)
        days: list[tuple[date, int, int]] = []
        day = first
        while epoch(day) < min(e, n) and len(days) < MAX_DAYS:
            lo, hi = max(s, epoch(day)), min(e, epoch(day + timedelta(days=1)))
            days.append((day.date(), lo, hi))
            day += timedelta(days=1)
        if not days:
            return []
        sums = [func.sum(case((_overlaps(lo, hi, n), _clipped_micros_expr(lo, hi, n)), else_=literal(0)))
                for _, lo, hi in days]
        stmt = _filter(select(*sums).where(_candidates(s, e, n)), where)
        row = session.execute(stmt).one()
        return [(d, _to_usd(v)) for (d, _, _), v in zip(days, row, strict=True)]

    @staticmethod
    def instance_cost(session: Session, instance_id: str, now: datetime,
                      since: datetime | None = None, kind: str | None = None) -> Decimal:
        n = epoch(now)
        s = epoch(since) if since else 0
        stmt = select(func.sum(_clipped_micros_expr(s, n + 1, n))).where(
            col(BillingSegment.instance_id) == instance_id, _overlaps(s, n + 1, n))
        if kind:
            stmt = stmt.where(col(BillingSegment.kind) == kind)
        return _to_usd(session.execute(stmt).scalar_one())

    @staticmethod
    def costs_by_instance(session: Session, instance_ids: Sequence[str], now: datetime) -> dict[str, Decimal]:
        """Accrued cost of many instances in one query (for /gpu status)."""
        if not instance_ids:
            return {}
        n = epoch(now)
        stmt = (select(col(BillingSegment.instance_id), func.sum(_clipped_micros_expr(0, n + 1, n)))
                .where(col(BillingSegment.instance_id).in_(list(instance_ids)), _overlaps(0, n + 1, n))
                .group_by(col(BillingSegment.instance_id)))
        return {iid: _to_usd(v) for iid, v in session.execute(stmt).all()}

    @staticmethod
    def run_rate(session: Session, **where: str | Sequence[str]) -> Decimal:
        """USD/hour being charged right now: the sum of open segments' rates."""
        stmt = select(func.sum(col(BillingSegment.rate_micros))).where(col(BillingSegment.end_ts).is_(None))
        stmt = _filter(stmt, where)
        return Decimal(int(session.execute(stmt).scalar_one() or 0)) / MICRO

    @staticmethod
    def open_segments(session: Session, instance_id: str) -> list[BillingSegment]:
        stmt = select(BillingSegment).where(col(BillingSegment.instance_id) == instance_id,
                                            col(BillingSegment.end_ts).is_(None))
        return list(session.execute(stmt).scalars())

    @staticmethod
    def segments(session: Session, instance_id: str) -> list[BillingSegment]:
        stmt = (select(BillingSegment).where(col(BillingSegment.instance_id) == instance_id)
                .order_by(col(BillingSegment.start_ts), col(BillingSegment.id)))
        return list(session.execute(stmt).scalars())

    @staticmethod
    def rollup(rows: Sequence[tuple[tuple[str, ...], Decimal]], index: int) -> list[tuple[str, Decimal]]:
        """Sum a multi-key grouping down to one of its keys, largest first."""
        sums: dict[str, Decimal] = {}
        for keys, amount in rows:
            sums[keys[index]] = sums.get(keys[index], Decimal(0)) + amount
        return sorted(sums.items(), key=lambda r: (-r[1], r[0]))

    @staticmethod
    def projection(spent_so_far: Decimal, run_rate: Decimal, now: datetime) -> Decimal:
        """Month-end spend if the current run-rate holds until the end of the month."""
        month = month_of(now)
        remaining = Decimal(max(0, int((month.end - as_utc(now)).total_seconds()))) / 3600
        return spent_so_far + run_rate * remaining


_S = TypeVar("_S", bound="Select[*tuple[Any, ...]]")


def _filter(stmt: _S, where: dict[str, str | Sequence[str]]) -> _S:
    for key, value in where.items():
        column = GROUP_COLUMNS[key]
        stmt = stmt.where(column.in_(list(value)) if isinstance(value, (list, tuple, set)) else column == value)
    return stmt


__all__ = ["COMPUTE", "STORAGE", "Ledger", "Period", "month_of", "parse_period", "split_at_months"]
