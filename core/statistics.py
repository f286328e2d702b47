"""Fleet statistics (seed B's `/statistics`, `GET /api/v1/statistics`): how many instances there
are and in which states, what the active ones cost on average per hour, the distribution by GPU
model, by state and by provider, and this month's spend so far.

Decisions:

- "Active" is what bills compute: `lifecycle.BILLED_AS_COMPUTE` (provisioning, loading, running,
  starting, stopping, error). One definition, shared with the ledger, so the active count and
  the run-rate in a cost report never disagree.
- A group's `dph` is what its instances cost per hour *now*: compute while active, storage
  while stopped, nothing once ended (the same rule as `costs.current_micros`). `average_dph` is
  the mean compute $/h of the active instances.
- One SQL statement groups the instances by (state, GPU model, provider) and sums in SQL; the
  three distributions and the totals are rolled up from those few grouped rows (at most
  states x GPU models x providers, never one per instance). Being one statement, it reads one
  snapshot, so the totals always add up even while other processes change rows. The month's
  spend is a second statement over the ledger in the same session.
- Money stays integer micro-dollars until the end; Decimals are built from those integers
  (never from a float average the database might compute).
- Viewers and up may read it, like `/gpu status` (it names no one). `simulated` is set by the
  façade when the sandbox is configured, as for every other result."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import case, func, literal, select
from sqlmodel import Session, col

from .auth import Actor
from .clock import Clock
from .db import Database
from .ledger import Ledger, month_of
from .lifecycle import BILLED_AS_COMPUTE
from .models import Instance, InstanceState, Role
from .money import MICRO, from_micros

ACTIVE_STATES = sorted(st.value for st in BILLED_AS_COMPUTE)


class StatGroup(BaseModel):
    """One line of a distribution."""

    key: str                        # a GPU model, a state or a provider
    count: int                      # instances in the group, ended ones included
    active: int = 0                 # of them, billing compute now
    dph: Decimal = Decimal(0)       # what the group costs per hour now (USD)


class StatisticsResult(BaseModel):
    kind: Literal["statistics"] = "statistics"
    total: int                      # every instance gpuherd has recorded
    active: int                     # billing compute now (see ACTIVE_STATES)
    stopped: int
    destroyed: int
    ended: int                      # destroyed, failed or lost
    average_dph: Decimal            # mean compute $/h of the active instances (0 when none)
    run_rate: Decimal               # what the whole fleet costs per hour now
    by_gpu: list[StatGroup] = Field(default_factory=list)
    by_state: list[StatGroup] = Field(default_factory=list)
    by_provider: list[StatGroup] = Field(default_factory=list)
    period: str                     # the month of month_to_date, YYYY-MM (UTC)
    month_to_date: Decimal
    simulated: bool = False


def _rollup(rows: list[tuple[str, str, str, int, int, int]], index: int) -> list[StatGroup]:
    sums: dict[str, list[int]] = {}
    for row in rows:
        key = str(row[index]) or "unknown"
        acc = sums.setdefault(key, [0, 0, 0])
        acc[0] += row[3]
        acc[1] += row[4]
        acc[2] += row[5]
    groups = [StatGroup(key=k, count=c, active=a, dph=from_micros(d)) for k, (c, a, d) in sums.items()]
    groups.sort(key=lambda g: (-g.count, g.key))
    return groups


def compute(s: Session, now_clock: Clock) -> StatisticsResult:
    """The figures, in one session (synchronous: run it with `Database.run`)."""
    state = col(Instance.state)
    is_active = state.in_(ACTIVE_STATES)
    current = case((is_active, col(Instance.dph_micros)),
                   (state == InstanceState.STOPPED.value, col(Instance.storage_dph_micros)),
                   else_=literal(0))
    active_one = case((is_active, literal(1)), else_=literal(0))
    stmt = (select(state, col(Instance.gpu_name), col(Instance.provider), func.count(),
                   func.sum(active_one), func.sum(current),
                   func.sum(case((is_active, col(Instance.dph_micros)), else_=literal(0))))
            .group_by(state, col(Instance.gpu_name), col(Instance.provider)))
    raw = s.execute(stmt).all()
    rows = [(str(r[0]), str(r[1] or ""), str(r[2]), int(r[3]), int(r[4] or 0), int(r[5] or 0)) for r in raw]
    active_compute = sum(int(r[6] or 0) for r in raw)
    by_state = _rollup(rows, 0)
    counts = {g.key: g.count for g in by_state}
    active = sum(g.active for g in by_state)
    now = now_clock.now()
    month = month_of(now)
    average = (Decimal(active_compute) / active / MICRO).quantize(Decimal("0.000001")) if active else Decimal(0)
    return StatisticsResult(
        total=sum(counts.values()), active=active, stopped=counts.get(InstanceState.STOPPED.value, 0),
        destroyed=counts.get(InstanceState.DESTROYED.value, 0),
        ended=sum(n for k, n in counts.items() if k in {st.value for st in InstanceState if st.is_final}),
        average_dph=average, run_rate=from_micros(sum(r[5] for r in rows)),
        by_gpu=_rollup(rows, 1), by_state=by_state, by_provider=_rollup(rows, 2),
        period=month.label, month_to_date=Ledger.total(s, month.start, month.end, now))


async def statistics(db: Database, clock: Clock, actor: Actor) -> StatisticsResult:
    """Fleet statistics for `actor` (viewer and up), in one unit of work off the event loop."""
    actor.require(Role.VIEWER, "viewing statistics")
    return await db.run(lambda s: compute(s, clock))
