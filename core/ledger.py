"""The cost ledger: billing segments (compute while running, storage while stopped) and every
cost figure derived from them. Costs for a period are sums over segments clipped to the period,
computed in SQL on integer micro-dollar-seconds, so they are exact and fast on a large ledger."""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from sqlalchemy import case, func, literal, select, update
from sqlmodel import Session

from .clock import as_utc, epoch, from_epoch
from .errors import InvalidInput
from .models import BillingSegment, Instance
from .money import MICRO

GroupBy = Literal["user", "team", "template", "provider", "instance", "kind"]
GROUP_COLUMNS = {
    "user": BillingSegment.owner,
    "team": BillingSegment.team,
    "template": BillingSegment.template,
    "provider": BillingSegment.provider,
    "instance": BillingSegment.instance_id,
    "kind": BillingSegment.kind,
}

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


def _clipped_micros_expr(start_ts: int, end_ts: int, now_ts: int):
    """SQL for rate x seconds-inside-[start, end) of one segment, open segments running to now."""
    seg_end = func.coalesce(BillingSegment.end_ts, literal(now_ts))
    lo = case((BillingSegment.start_ts > start_ts, BillingSegment.start_ts), else_=literal(start_ts))
    hi = case((seg_end < end_ts, seg_end), else_=literal(end_ts))
    return BillingSegment.rate_micros * (hi - lo)


def _overlaps(start_ts: int, end_ts: int, now_ts: int):
    return (
        (BillingSegment.start_ts < end_ts)
        & (BillingSegment.start_ts < now_ts)
        & (func.coalesce(BillingSegment.end_ts, literal(now_ts)) > start_ts)
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
        """Close the instance's open segments (of one kind, or all) at `at`. Returns how many."""
        ts = epoch(at)
        stmt = update(BillingSegment).where(BillingSegment.instance_id == instance_id,
                                            BillingSegment.end_ts.is_(None))
        if kind:
            stmt = stmt.where(BillingSegment.kind == kind)
        # a segment never ends before it starts, even if the clock stepped back
        stmt = stmt.values(end_ts=case((BillingSegment.start_ts > ts, BillingSegment.start_ts), else_=ts))
        return session.exec(stmt).rowcount  # type: ignore[call-overload]

    # --- reading -------------------------------------------------------------------------
    @staticmethod
    def total(session: Session, start: datetime, end: datetime, now: datetime,
              **where: str | Sequence[str]) -> Decimal:
        s, e, n = epoch(start), epoch(end), epoch(now)
        stmt = select(func.sum(_clipped_micros_expr(s, e, n))).where(_overlaps(s, e, n))
        stmt = _filter(stmt, where)
        return _to_usd(session.exec(stmt).one()[0])  # type: ignore[call-overload]

    @staticmethod
    def grouped(session: Session, start: datetime, end: datetime, now: datetime, by: GroupBy,
                **where: str | Sequence[str]) -> list[tuple[str, Decimal]]:
        """[(group, USD)] largest first."""
        col = GROUP_COLUMNS[by]
        s, e, n = epoch(start), epoch(end), epoch(now)
        amount = func.sum(_clipped_micros_expr(s, e, n))
        stmt = select(col, amount).where(_overlaps(s, e, n)).group_by(col)
        stmt = _filter(stmt, where)
        rows = [(str(key), _to_usd(value)) for key, value in session.exec(stmt).all()]  # type: ignore[call-overload]
        rows.sort(key=lambda r: (-r[1], r[0]))
        return rows

    @staticmethod
    def instance_cost(session: Session, instance_id: str, now: datetime,
                      since: datetime | None = None, kind: str | None = None) -> Decimal:
        n = epoch(now)
        s = epoch(since) if since else 0
        stmt = select(func.sum(_clipped_micros_expr(s, n + 1, n))).where(
            BillingSegment.instance_id == instance_id, _overlaps(s, n + 1, n))
        if kind:
            stmt = stmt.where(BillingSegment.kind == kind)
        return _to_usd(session.exec(stmt).one()[0])  # type: ignore[call-overload]

    @staticmethod
    def costs_by_instance(session: Session, instance_ids: Sequence[str], now: datetime) -> dict[str, Decimal]:
        """Accrued cost of many instances in one query (for /gpu status)."""
        if not instance_ids:
            return {}
        n = epoch(now)
        stmt = (select(BillingSegment.instance_id, func.sum(_clipped_micros_expr(0, n + 1, n)))
                .where(BillingSegment.instance_id.in_(list(instance_ids)), _overlaps(0, n + 1, n))
                .group_by(BillingSegment.instance_id))
        return {iid: _to_usd(v) for iid, v in session.exec(stmt).all()}  # type: ignore[call-overload]

    @staticmethod
    def run_rate(session: Session, **where: str | Sequence[str]) -> Decimal:
        """USD/hour being charged right now: the sum of open segments' rates."""
        stmt = select(func.sum(BillingSegment.rate_micros)).where(BillingSegment.end_ts.is_(None))
        stmt = _filter(stmt, where)
        return Decimal(int(session.exec(stmt).one()[0] or 0)) / MICRO  # type: ignore[call-overload]

    @staticmethod
    def open_segments(session: Session, instance_id: str) -> list[BillingSegment]:
        stmt = select(BillingSegment).where(BillingSegment.instance_id == instance_id,
                                            BillingSegment.end_ts.is_(None))
        return list(session.exec(stmt).scalars())  # type: ignore[call-overload]

    @staticmethod
    def segments(session: Session, instance_id: str) -> list[BillingSegment]:
        stmt = (select(BillingSegment).where(BillingSegment.instance_id == instance_id)
                .order_by(BillingSegment.start_ts, BillingSegment.id))
        return list(session.exec(stmt).scalars())  # type: ignore[call-overload]

    @staticmethod
    def projection(spent_so_far: Decimal, run_rate: Decimal, now: datetime) -> Decimal:
        """Month-end spend if the current run-rate holds until the end of the month."""
        month = month_of(now)
        remaining = Decimal(max(0, int((month.end - as_utc(now)).total_seconds()))) / 3600
        return spent_so_far + run_rate * remaining


def _filter(stmt, where: dict[str, str | Sequence[str]]):
    for key, value in where.items():
        col = GROUP_COLUMNS[key]  # type: ignore[index]
        stmt = stmt.where(col.in_(list(value)) if isinstance(value, (list, tuple, set)) else col == value)
    return stmt


__all__ = ["COMPUTE", "STORAGE", "Ledger", "Period", "month_of", "parse_period", "from_epoch"]
