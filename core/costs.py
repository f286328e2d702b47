"""Costs and budgets (SPEC §6, §7): reports for any period grouped by user, team, template or
provider; per-instance cost analysis; monthly budgets per team and per user. Every figure a
reply shows (run-rate per day, projection, budget use) is computed here, once, in one scan of
the month where a report needs several groupings. All database work runs off the loop.

Month figures (budget use, month to date, the budget check before a boot) come from the ledger's
maintained roll-up (the month rows of `cost_rollup` plus the open segments), so a boot's budget
check reads a few rows, not the month's segments. `CostReport.current` says whether the period
includes now: run-rate and projection describe this month and mean nothing for another period."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select
from sqlmodel import Session, col

from . import audit as audit_log
from .auth import Actor
from .clock import Clock
from .db import Database
from .errors import InvalidInput, NotFound
from .ledger import COMPUTE, STORAGE, Ledger, month_of, parse_period
from .lifecycle import BILLED_AS_COMPUTE, get_instance
from .models import Budget, Instance, InstanceState, Role, User
from .money import from_micros, parse_amount, to_micros, usd
from .names import check_budget_name
from .providers.base import Capabilities
from .results import (
    BudgetResult,
    BudgetScope,
    BudgetUse,
    CostGroup,
    CostReport,
    DailySpend,
    GroupBy,
    InstanceCost,
    Money,
)
from .shared import SharedCalls
from .text import clip
from .views import build_views

BUDGET_WINDOW_S = 2.0                  # a burst of boots by one person shares one month scan for its budget check
MAX_BUDGET = Decimal("10000000")       # USD/month; anything above is a typo, not a budget
RUNNING_SHOWN = 25                     # instances billing now listed in a cost report, costliest first


def current_micros(inst: Instance) -> int:
    """What the row bills per hour right now (compute while up, storage while stopped)."""
    state = inst.state_enum
    if state in BILLED_AS_COMPUTE:
        return inst.dph_micros
    return inst.storage_dph_micros if state is InstanceState.STOPPED else 0


def budget_uses(s: Session, budgets: list[Budget], now: datetime) -> list[BudgetUse]:
    """This month's spend against each budget: one statement over the month's roll-up rows and
    the open segments of just the budgets' teams and users (a boot's check reads its own two)."""
    if not budgets:
        return []
    month = month_of(now)
    teams, users = Ledger.spend_of(s, month.start, month.end, now,
                                   [b.name for b in budgets if b.scope == BudgetScope.TEAM.value],
                                   [b.name for b in budgets if b.scope == BudgetScope.USER.value])
    return _uses(budgets, {BudgetScope.TEAM.value: teams, BudgetScope.USER.value: users})


def _uses(budgets: list[Budget], spend: dict[str, dict[str, Decimal]]) -> list[BudgetUse]:
    """`spend[scope][name]` is this month's spend of that team or user."""
    return [BudgetUse(scope=BudgetScope(b.scope), name=b.name, limit=from_micros(b.monthly_micros),
                      spent=spend.get(b.scope, {}).get(b.name, Decimal(0)), hard_cap=b.hard_cap)
            for b in budgets]


def _own_budgets(s: Session, actor: Actor) -> list[Budget]:
    return list(s.execute(select(Budget).where(
        ((col(Budget.scope) == "team") & (col(Budget.name) == actor.team))
        | ((col(Budget.scope) == "user") & (col(Budget.name) == actor.principal)))).scalars())


def _visible_budgets(s: Session, actor: Actor) -> list[Budget]:
    """Admins see every budget; others their team's and their own."""
    if not actor.at_least(Role.ADMIN):
        return _own_budgets(s, actor)
    return list(s.execute(select(Budget).order_by(col(Budget.scope), col(Budget.name))).scalars())


class Costs:
    def __init__(self, db: Database, clock: Clock, caps: Callable[[], dict[str, Capabilities]]) -> None:
        self.db = db
        self.clock = clock
        self._caps = caps
        self._spent: SharedCalls[list[BudgetUse]] = SharedCalls(clock.monotonic)

    def spent_budgets(self, s: Session, actor: Actor) -> list[BudgetUse]:
        """The actor's team and user budgets that are used up this month."""
        now = self.clock.now()
        return [u for u in budget_uses(s, _own_budgets(s, actor), now) if u.spent >= u.limit]

    async def used_up(self, actor: Actor) -> list[BudgetUse]:
        """`spent_budgets` as a boot asks it: concurrent boots by the same person (a script's
        burst, a double click) share one scan of the month for `BUDGET_WINDOW_S`. A boot is
        checked against spend at most that old; changing a budget forgets the shared answer."""
        return await self._spent.get((actor.team, actor.principal),
                                     lambda: self.db.run(lambda s: self.spent_budgets(s, actor)), BUDGET_WINDOW_S)

    def all_budget_uses(self, s: Session) -> list[BudgetUse]:
        return budget_uses(s, list(s.execute(select(Budget)).scalars()), self.clock.now())

    async def report(self, actor: Actor, period: str | None = None, by: str | None = None) -> CostReport:
        actor.require(Role.VIEWER, "viewing costs")
        try:
            group_by = GroupBy((by or "user").lower())
        except ValueError:
            raise InvalidInput(f"Costs cannot be grouped by '{clip(by or '', 20)}': use user, team, template "
                               "or provider.") from None
        now = self.clock.now()
        span = parse_period(period, now)
        month = month_of(now)
        caps = self._caps()

        def work(s: Session) -> CostReport:
            budgets = _visible_budgets(s, actor)
            # one read of the month's roll-up rows, grouped by everything the report needs
            keys = list(dict.fromkeys([group_by.value, *(b.scope for b in budgets)]))
            month_rows = Ledger.grouped_by(s, month.start, month.end, now, keys)
            groups = (Ledger.rollup(month_rows, 0) if (span.start, span.end) == (month.start, month.end)
                      else Ledger.grouped(s, span.start, span.end, now, group_by.value))
            mtd = sum((amount for _, amount in month_rows), Decimal(0))
            running_rows = list(s.execute(select(Instance).where(
                col(Instance.state).in_([st.value for st in BILLED_AS_COMPUTE | {InstanceState.STOPPED}]))).scalars())
            billing = [r for r in running_rows if current_micros(r) > 0]
            billing.sort(key=lambda r: (-current_micros(r), r.id))
            # the costliest few in full; a team with thousands running gets the count, not a
            # thousand views built for a report that shows a screenful
            running = build_views(s, billing[:RUNNING_SHOWN], now, actor, caps)
            run_rate = Ledger.run_rate(s)
            uses = _uses(budgets, {k: dict(Ledger.rollup(month_rows, i)) for i, k in enumerate(keys)})
            return CostReport(period=span.label, start=span.start, end=span.end, group_by=group_by,
                              total=sum((amount for _, amount in groups), Decimal(0)),
                              groups=[CostGroup(key=k, amount=v) for k, v in groups],
                              running=running, running_count=len(billing), run_rate=Money.of(run_rate), month_to_date=mtd,
                              projected_month_end=Ledger.projection(mtd, run_rate, now), budgets=uses,
                              daily=[DailySpend(day=d, amount=a) for d, a in Ledger.daily(s, span.start, span.end, now)],
                              simulated=any(v.simulated for v in running), current=span.start <= now < span.end)
        return await self.db.run(work)

    async def instance_cost(self, actor: Actor, instance_id: str) -> InstanceCost:
        actor.require(Role.VIEWER, "viewing costs")
        now = self.clock.now()
        caps = self._caps()

        def work(s: Session) -> InstanceCost:
            inst = get_instance(s, instance_id)
            view = build_views(s, [inst], now, actor, caps)[0]
            compute = Ledger.instance_cost(s, inst.id, now, kind=COMPUTE)
            storage = Ledger.instance_cost(s, inst.id, now, kind=STORAGE)
            seconds = sum(((seg.end_ts or int(now.timestamp())) - seg.start_ts)
                          for seg in Ledger.segments(s, inst.id) if seg.kind == COMPUTE)
            return InstanceCost(instance=view, hourly=Money.of(view.current_dph), total=compute + storage,
                                compute=compute, storage=storage, uptime_s=max(0, seconds),
                                simulated=inst.simulated)
        return await self.db.run(work)

    async def budgets(self, actor: Actor, changed: tuple[str, str] | None = None) -> BudgetResult:
        actor.require(Role.VIEWER, "viewing budgets")

        def work(s: Session) -> BudgetResult:
            uses = budget_uses(s, _visible_budgets(s, actor), self.clock.now())
            hit = next((u for u in uses if changed and (u.scope.value, u.name) == changed), None)
            return BudgetResult(budgets=uses, period=month_of(self.clock.now()).label, changed=hit)
        return await self.db.run(work)

    async def set_budget(self, actor: Actor, scope: str, name: str, amount: str | Decimal,
                         hard_cap: bool | None = None) -> BudgetResult:
        actor.require(Role.ADMIN, "setting budgets")
        try:
            kind = BudgetScope(scope)
        except ValueError:
            raise InvalidInput(f"Budgets are per team or per user, not '{clip(scope, 20)}'.") from None
        check_budget_name(kind.value, name)
        try:
            value = parse_amount(amount)
        except ValueError:
            raise InvalidInput(f"'{clip(str(amount), 20)}' is not an amount in USD (e.g. 500 or 1250.50).") from None
        if value <= 0:
            raise InvalidInput(f"A budget must be more than $0; got {clip(str(amount), 20)}. "
                               "Clearing the budget removes it.")
        if value > MAX_BUDGET:
            raise InvalidInput(f"{usd(value)} a month is not a plausible budget (limit {usd(MAX_BUDGET)}); "
                               "check the amount.")
        exponent = value.as_tuple().exponent  # 'n'/'N'/'F' only for NaN or infinity
        if isinstance(exponent, int) and exponent < -2:
            raise InvalidInput(f"Budgets are in whole cents; got {clip(str(amount), 20)}.")
        now = self.clock.now()

        def work(s: Session) -> None:
            if kind is BudgetScope.USER and s.get(User, name) is None:
                raise NotFound(f"gpuherd does not know the user '{name}': a user budget is for someone who has "
                               "used gpuherd or was added (gpuherd users set).")
            b = s.execute(select(Budget).where(col(Budget.scope) == kind.value, col(Budget.name) == name)).scalars().first()
            old = from_micros(b.monthly_micros) if b else None
            b = b or Budget(scope=kind.value, name=name, monthly_micros=0, updated_by=actor.principal, updated_at=now)
            b.monthly_micros = to_micros(value)
            if hard_cap is not None:
                b.hard_cap = hard_cap
            b.updated_by = actor.principal
            b.updated_at = now
            s.add(b)
            audit_log.record(s, actor, "budget.set", now=now, scope=kind.value, name=name, amount=str(value),
                             previous=str(old) if old is not None else None, hard_cap=b.hard_cap)
            s.commit()
        await self.db.run(work)
        self._spent.clear()
        return await self.budgets(actor, changed=(kind.value, name))

    async def clear_budget(self, actor: Actor, scope: str, name: str) -> BudgetResult:
        actor.require(Role.ADMIN, "removing budgets")
        check_budget_name(scope, name)

        def work(s: Session) -> None:
            b = s.execute(select(Budget).where(col(Budget.scope) == scope, col(Budget.name) == name)).scalars().first()
            if b is None:
                raise NotFound(f"There is no {clip(scope, 10)} budget for '{clip(name, 40)}'.")
            s.delete(b)
            audit_log.record(s, actor, "budget.clear", now=self.clock.now(), scope=scope, name=name)
            s.commit()
        await self.db.run(work)
        self._spent.clear()
        return await self.budgets(actor)
