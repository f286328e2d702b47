"""What the core counts about itself, and the database figures a metrics scrape reports.

The core knows nothing of Prometheus (core never imports a surface's libraries); a surface
(bot/http/metrics.py) turns these into its exposition format.

Decisions:

- **In-process counters, one process-wide `TELEMETRY`.** Provider calls are made through the
  module-level `retry.provider_call` from five modules (search, sync, booting, power, reconcile)
  that hold no reference to their `GpuService`; threading a per-service object through them would
  change five constructors for a counter. A `gpuherd serve` process hosts one service, so the
  process-wide object is the service's in practice. Tests that build several services read
  differences between two scrapes, never absolute values.
- **What a provider call counts.** Each attempt gpuherd makes is counted once with its outcome:
  `ok`, or the kind of the error from core's error codes (`rate_limited`, `unavailable`,
  `timeout`, `capacity`, `auth`, anything else `error`). A call that is retried counts each
  attempt: rate limiting shows as the 429s gpuherd really received. A client that retries
  internally (its SDK's own retries) counts as one attempt. A cancelled call (shutdown, a
  timeout around it) is not counted: it has no outcome.
- **Guard passes** record what `Guards.run_pass` reports: passes, total and last duration,
  instances checked, warned and acted on, errors, and the instances the last pass could not
  check ("blind": the provider did not answer, or the machine's activity could not be told).
  Only the replica holding the guard lock runs passes, so these are zero on the others; sums
  across replicas are right.
- **The gauges come from the database, not from the process** (`read_gauges`, one unit of
  work of SQL aggregates): instances by state and provider, what is billed per hour now, this
  month's spend per team, team budget use, notices not yet delivered. Every replica reports the
  same figures; a dashboard takes `max` (or one replica), not `sum`. Money stays Decimal here.
- **Bounded labels only.** Providers, outcome kinds, states, teams and surfaces are bounded sets;
  no principal, instance id, key or message is ever kept as a key here. User budgets are left
  out on purpose (their name is a principal).

Thread-safety: counters are updated under a lock; they may be touched from the event loop and
from worker threads (a sync CLI path)."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

from sqlalchemy import func, select
from sqlmodel import Session, col

from .clock import Clock
from .costs import budget_uses
from .db import Database
from .errors import GpuherdError
from .ledger import Ledger, month_of
from .models import Budget, Instance, InstanceState, NoticeDelivery
from .results import BudgetUse

T = TypeVar("T")

OUTCOMES = ("ok", "rate_limited", "unavailable", "timeout", "capacity", "auth", "error")
_KIND_OF_CODE = {"rate_limited": "rate_limited", "provider_unavailable": "unavailable",
                 "provider_timeout": "timeout", "capacity": "capacity", "auth": "auth"}
BLIND_REASONS = ("provider_unreachable", "activity_unknown")


def outcome_of(exc: BaseException | None) -> str:
    """The outcome kind of a provider call that ended with `exc` (None: it answered)."""
    if exc is None:
        return "ok"
    if isinstance(exc, GpuherdError):
        return _KIND_OF_CODE.get(exc.code, "error")
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "error"


@dataclass(frozen=True)
class GuardStats:
    """A copy of the guard counters (`Telemetry.guards`)."""

    passes: int = 0
    seconds_total: float = 0.0
    last_seconds: float | None = None
    last_started: datetime | None = None
    checked: int = 0
    warned: int = 0
    acted: int = 0
    errors: int = 0
    blind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BLIND_REASONS, 0))


class Telemetry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str], int] = {}
        self._guards = GuardStats()

    # --- provider calls -----------------------------------------------------------------
    def provider_call(self, provider: str, outcome: str) -> None:
        if outcome not in OUTCOMES:
            outcome = "error"
        with self._lock:
            self._calls[(provider, outcome)] = self._calls.get((provider, outcome), 0) + 1

    def counted(self, provider: str, call: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        """`call` that records its outcome each time it is awaited (each retry attempt)."""
        async def attempt() -> T:
            try:
                result = await call()
            except Exception as exc:
                self.provider_call(provider, outcome_of(exc))
                raise
            self.provider_call(provider, "ok")
            return result
        return attempt

    def provider_calls(self) -> dict[tuple[str, str], int]:
        """{(provider, outcome): attempts} since the process started."""
        with self._lock:
            return dict(self._calls)

    # --- guard passes -------------------------------------------------------------------
    def guard_pass(self, *, started: datetime, seconds: float, checked: int, warned: int, acted: int,
                   errors: int, blind_provider: int, blind_activity: int) -> None:
        with self._lock:
            g = self._guards
            self._guards = GuardStats(
                passes=g.passes + 1, seconds_total=g.seconds_total + seconds, last_seconds=seconds,
                last_started=started, checked=g.checked + checked, warned=g.warned + warned,
                acted=g.acted + acted, errors=g.errors + errors,
                blind={"provider_unreachable": blind_provider, "activity_unknown": blind_activity})

    def guards(self) -> GuardStats:
        with self._lock:
            return self._guards


TELEMETRY = Telemetry()


# --- the gauges, from the database --------------------------------------------------------

@dataclass(frozen=True)
class Gauges:
    """What a scrape reports from the database at `at`. Money is Decimal USD."""

    at: datetime
    month: str                                        # YYYY-MM, UTC
    instances: dict[tuple[str, str], int]             # (state, provider) -> count, zeros included
    billed_per_hour: Decimal                          # the cost report's run rate
    month_spend: dict[str, Decimal]                   # team -> spend this month
    team_budgets: list[BudgetUse]
    notices_pending: dict[str, int]                   # surface -> deliveries not delivered, not given up


def read_gauges(s: Session, now: datetime, providers: list[str] | None = None) -> Gauges:
    """One unit of work of SQL aggregates (no row is loaded but budgets). `providers` (the
    configured ones) get zero rows too, so a series does not vanish when its last machine goes.

    `billed_per_hour` is `Ledger.run_rate`: the sum of the open billing segments, i.e. compute of
    machines that are up and storage of stopped ones — the figure `/gpu costs` shows, so a
    dashboard and the cost report never disagree."""
    counted = {(str(state), str(provider)): int(n) for state, provider, n in s.execute(
        select(col(Instance.state), col(Instance.provider), func.count())
        .group_by(col(Instance.state), col(Instance.provider))).all()}
    names = sorted({p for _, p in counted} | set(providers or []))
    instances = {(st.value, p): counted.get((st.value, p), 0) for st in InstanceState for p in names}
    instances.update(counted)   # a state written by a newer version is still reported
    month = month_of(now)
    spend = dict(Ledger.grouped(s, month.start, month.end, now, "team"))
    teams = list(s.execute(select(Budget).where(col(Budget.scope) == "team").order_by(col(Budget.name))).scalars())
    d = NoticeDelivery
    pending = {str(surface): int(n) for surface, n in s.execute(
        select(col(d.surface), func.count()).where(col(d.delivered_at).is_(None), col(d.gave_up_at).is_(None))
        .group_by(col(d.surface))).all()}
    return Gauges(at=now, month=month.label, instances=instances, billed_per_hour=Ledger.run_rate(s),
                  month_spend=spend, team_budgets=budget_uses(s, teams, now), notices_pending=pending)


async def gauges(db: Database, clock: Clock, providers: list[str] | None = None) -> Gauges:
    """`read_gauges` off the event loop."""
    return await db.run(lambda s: read_gauges(s, clock.now(), providers))


__all__ = ["BLIND_REASONS", "OUTCOMES", "TELEMETRY", "Gauges", "GuardStats", "Telemetry", "gauges",
           "outcome_of", "read_gauges"]
