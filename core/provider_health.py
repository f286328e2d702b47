"""Providers at a glance (`/gpu providers`): for each configured provider, whether its
credentials work, when it last answered and its last error, how old its prices are, and its
account balance where it reports one, with how long that lasts at what gpuherd bills there now.
And the low-balance warning: vast.ai stops every instance when its credit reaches zero, so the
team hears once when a balance will run out within a day.

Decisions:

- **What a process saw is kept in memory, one process-wide `HEALTH`**, for the reason
  `telemetry.TELEMETRY` is: provider calls go through the module-level `retry.provider_call`
  from modules that hold no service, and that is where an answer or an error is recorded
  (`ProviderHealth.watched`), as search records when it fetched prices (`priced`). A
  `gpuherd serve` process hosts one service; `GpuService` gives `HEALTH` its clock so times are
  the service's (a test's virtual clock). Each replica talks to the providers itself, so "last
  answered" is this replica's view; nothing here is lost with a restart that matters.
- **Credentials and balance are asked live** (`HealthMonitor.check`): every provider at once,
  each bounded by `provider_timeout_s`, one attempt (the next check comes soon; a retried
  check only makes `/gpu providers` slow). The call is `balance()`; a provider that reports no
  balance is asked for its machine list instead, the cheapest authenticated call every provider
  has. An `auth` error means the credentials were refused ("failed"); any other failure means
  gpuherd could not tell ("unknown"), with the error shown. Concurrent askers share one check,
  reused for `CHECK_TTL_S` (`/gpu providers`) or `BALANCE_TTL_S` (`/gpu costs`, which must stay
  quick: it only shows the last known balances, asking at most once per ten minutes).
- **Errors are shown scrubbed**: the error's kind (core's error codes: auth, rate_limited,
  unavailable, timeout, …) and its message, which for core's errors is already fit for chat
  (the HTTP client scrubs keys out), passed through `audit.scrub` and clipped again anyway.
  Unexpected exceptions show their type only.
- **The low-balance warning is durable and once** (`HealthMonitor.warn_low_balances`, run by
  the guard leader every `BALANCE_CHECK_S`): the mark is a `scheduler_state` row named
  `balance:<provider>` whose `last_acted` is 1 while a warning stands, claimed with
  `UPDATE … WHERE last_acted = 0` in the same transaction as the notices (as the guards claim
  theirs), so two replicas or two passes never both warn. It is re-armed when the balance lasts
  more than `REARM_HOURS` again (a top-up, or the machines stopped), so a later drop warns again;
  the gap between 24 h and 48 h keeps a balance hovering around a day from warning every pass.
  Who hears it: the admins, and each team with machines billed at that provider (their
  machines are the ones that stop).
- Run-rate is `Ledger.run_rate` by provider: the open billing segments there, compute of
  machines that are up and storage of stopped ones — what that account is charged per hour."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.sql.dml import Insert
from sqlmodel import Session, col

from .actions import Op, act
from .audit import scrub
from .auth import Actor
from .clock import Clock
from .db import Database, rowcount
from .errors import GpuherdError
from .models import BillingSegment, Role, SchedulerState
from .money import MICRO, rate, usd
from .outbox import NoticeDraft
from .providers.base import Provider
from .providers.registry import ProviderRegistry
from .results import ProviderBalance
from .shared import SharedCalls
from .telemetry import TELEMETRY, outcome_of

log = logging.getLogger(__name__)
T = TypeVar("T")

WARN_HOURS = Decimal(24)          # warn when the balance lasts at most this long
REARM_HOURS = Decimal(48)         # a warning stands until the balance lasts longer than this again
BALANCE_CHECK_S = 600.0           # how often the guard leader checks balances
CHECK_TTL_S = 30.0                # /gpu providers reuses a check this long
BALANCE_TTL_S = 600.0             # /gpu costs reuses the balances this long
MAX_MESSAGE = 300
MAX_TEAMS = 20                    # teams told about one provider's low balance
MARK_PREFIX = "balance:"

Credentials = Literal["ok", "failed", "unknown"]


# --- results -------------------------------------------------------------------------------

class ProviderError(BaseModel):
    kind: str                     # ok-less outcome kind: auth, rate_limited, unavailable, timeout, capacity, error
    message: str                  # scrubbed, fit for chat
    at: datetime


class ProviderHealthView(BaseModel):
    provider: str
    display_name: str
    credentials: Credentials
    checked_at: datetime | None = None
    last_answered_at: datetime | None = None
    last_error: ProviderError | None = None
    prices_at: datetime | None = None      # when the offers (or price list) shown were fetched
    price_age_s: int | None = None
    balance: ProviderBalance | None = None
    simulated: bool = False


class ProvidersResult(BaseModel):
    kind: Literal["providers"] = "providers"
    providers: list[ProviderHealthView]
    checked_at: datetime
    simulated: bool = False


# --- what this process saw ------------------------------------------------------------------

@dataclass
class _Seen:
    answered_at: datetime | None = None
    error: ProviderError | None = None
    priced_at: datetime | None = None


def describe(exc: BaseException) -> tuple[str, str]:
    """(kind, message) of a failed provider call, safe to show: core's errors carry a chat-fit
    message; anything else shows its type only (its text may hold a URL with a key)."""
    kind = outcome_of(exc)
    text = exc.message if isinstance(exc, GpuherdError) else f"unexpected error ({type(exc).__name__})"
    if isinstance(exc, TimeoutError):
        text = "no answer in time"
    return kind, str(scrub(text))[:MAX_MESSAGE]


class ProviderHealth:
    """Per provider: last answer, last error, when prices were fetched. Thread-safe."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self._lock = threading.Lock()
        self._seen: dict[str, _Seen] = {}

    def _entry(self, provider: str) -> _Seen:
        return self._seen.setdefault(provider, _Seen())

    def answered(self, provider: str, at: datetime | None = None) -> None:
        with self._lock:
            self._entry(provider).answered_at = at or self.clock.now()

    def failed(self, provider: str, exc: BaseException, at: datetime | None = None) -> None:
        kind, message = describe(exc)
        with self._lock:
            self._entry(provider).error = ProviderError(kind=kind, message=message, at=at or self.clock.now())

    def priced(self, provider: str, at: datetime) -> None:
        """Offers (prices) of `provider` were fetched at `at` (search, before its cache)."""
        with self._lock:
            self._entry(provider).priced_at = at

    def watched(self, provider: str, call: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        """`call` that records its answer or error each time it is awaited; a cancelled call
        has no outcome and records nothing."""
        async def attempt() -> T:
            try:
                result = await call()
            except Exception as exc:
                self.failed(provider, exc)
                raise
            self.answered(provider)
            return result
        return attempt

    def seen(self, provider: str) -> _Seen:
        with self._lock:
            s = self._seen.get(provider) or _Seen()
            return _Seen(answered_at=s.answered_at, error=s.error, priced_at=s.priced_at)

    def forget(self) -> None:
        with self._lock:
            self._seen.clear()


HEALTH = ProviderHealth()


# --- live checks, the overview and the warning -------------------------------------------

@dataclass(frozen=True)
class Checked:
    provider: str
    at: datetime
    credentials: Credentials
    balance: Decimal | None = None
    error: ProviderError | None = None


@dataclass(frozen=True)
class Check:
    at: datetime
    results: dict[str, Checked]


class HealthMonitor:
    def __init__(self, db: Database, clock: Clock, providers: ProviderRegistry, timeout_s: float,
                 health: ProviderHealth = HEALTH) -> None:
        self.db = db
        self.clock = clock
        self.timeout_s = timeout_s
        self.health = health
        self._shared: SharedCalls[Check] = SharedCalls(clock.monotonic, max_entries=4)
        self._providers = providers

    @property
    def providers(self) -> ProviderRegistry:
        return self._providers

    @providers.setter
    def providers(self, registry: ProviderRegistry) -> None:
        """Other providers: a check of the old ones says nothing about them."""
        self._providers = registry
        self._shared.clear()

    async def aclose(self) -> None:
        """Stop a check still in flight (a cost report stops waiting for balances after
        COSTS_BALANCE_WAIT_S; the check goes on, shared, until the service closes)."""
        await self._shared.aclose()

    async def _check_one(self, name: str, provider: Provider) -> Checked:
        async def ask() -> Decimal | None:
            balance = await provider.balance()
            if balance is None:
                await provider.list()       # no balance to read: prove the credentials another way
            return balance
        call = TELEMETRY.counted(name, self.health.watched(name, ask))
        try:
            balance = await asyncio.wait_for(call(), timeout=self.timeout_s)
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                self.health.failed(name, exc)   # wait_for cancelled it: nothing recorded it
            elif not isinstance(exc, GpuherdError):
                log.warning("provider check of %s failed: %s", name, type(exc).__name__)
            kind, message = describe(exc)
            error = ProviderError(kind=kind, message=message, at=self.clock.now())
            return Checked(provider=name, at=self.clock.now(), credentials="failed" if kind == "auth" else "unknown",
                           error=error)
        return Checked(provider=name, at=self.clock.now(), credentials="ok", balance=balance)

    async def _check_all(self) -> Check:
        names = self.providers.names()
        results = await asyncio.gather(*(self._check_one(n, self.providers.get(n)) for n in names))
        return Check(at=self.clock.now(), results={c.provider: c for c in results})

    async def check(self, *, max_age_s: float = CHECK_TTL_S, fresh: bool = False) -> Check:
        """Every provider at once (bounded by the provider time limit); shared by concurrent
        askers and reused for `max_age_s`. `fresh` asks again whatever was kept."""
        if fresh:
            self._shared.forget("check")
        return await self._shared.get("check", self._check_all, max_age_s)

    @staticmethod
    def _run_rates(s: Session, names: list[str]) -> dict[str, Decimal]:
        """USD/h billed now at each provider: its open segments (`Ledger.run_rate` by provider,
        in one grouped query)."""
        seg = BillingSegment
        found = {str(p): Decimal(int(total or 0)) / MICRO for p, total in s.execute(
            select(col(seg.provider), func.sum(col(seg.rate_micros))).where(
                col(seg.end_ts).is_(None), col(seg.provider).in_(names)).group_by(col(seg.provider))).all()}
        return {n: found.get(n, Decimal(0)) for n in names}

    def _balances(self, check: Check, rates: dict[str, Decimal]) -> dict[str, ProviderBalance]:
        out: dict[str, ProviderBalance] = {}
        for name, c in check.results.items():
            if c.balance is None:
                continue
            per_hour = rates.get(name, Decimal(0))
            out[name] = ProviderBalance(provider=name, balance=c.balance, run_rate=per_hour,
                                        hours_left=hours_left(c.balance, per_hour), checked_at=c.at)
        return out

    async def balances(self, *, wait_s: float | None = None) -> list[ProviderBalance]:
        """The balances providers report, with their run-rate (for `/gpu costs`): a check at
        most `BALANCE_TTL_S` old, so a cost report asks the providers at most that often.
        `wait_s` bounds the wait for a check in flight: past it, no balances (the check goes on,
        shared, and the next report has them)."""
        try:
            check = await asyncio.wait_for(self.check(max_age_s=BALANCE_TTL_S), timeout=wait_s)
        except TimeoutError:
            return []
        rates = await self.db.run(lambda s: self._run_rates(s, list(check.results)))
        return list(self._balances(check, rates).values())

    async def overview(self, actor: Actor) -> ProvidersResult:
        """Every configured provider: credentials, last answer and error, price age, balance."""
        actor.require(Role.VIEWER, "viewing providers")
        check = await self.check()
        rates = await self.db.run(lambda s: self._run_rates(s, list(check.results)))
        balances = self._balances(check, rates)
        now = self.clock.now()
        views: list[ProviderHealthView] = []
        for name in self.providers.names():
            p = self.providers.get(name)
            c = check.results.get(name)
            seen = self.health.seen(name)
            error = seen.error
            if c is not None and c.error is not None and (error is None or c.error.at >= error.at):
                error = c.error
            views.append(ProviderHealthView(
                provider=name, display_name=p.display_name, credentials=c.credentials if c else "unknown",
                checked_at=c.at if c else None, last_answered_at=seen.answered_at, last_error=error,
                prices_at=seen.priced_at,
                price_age_s=max(0, int((now - seen.priced_at).total_seconds())) if seen.priced_at else None,
                balance=balances.get(name), simulated=p.capabilities.simulated))
        return ProvidersResult(providers=views, checked_at=check.at, simulated=any(v.simulated for v in views))

    async def warn_low_balances(self, outbox_notify: Callable[[Session, datetime, NoticeDraft], None]
                                ) -> list[NoticeDraft]:
        """Check balances now and warn, once, for each provider whose balance lasts at most
        `WARN_HOURS` at its run-rate; re-arm those that last longer than `REARM_HOURS` again.
        Returns the notices written (the caller publishes them in-process)."""
        check = await self.check(fresh=True)
        rates = await self.db.run(lambda s: self._run_rates(s, list(check.results)))
        sent: list[NoticeDraft] = []
        for name, b in self._balances(check, rates).items():
            display = self.providers.get(name).display_name if name in self.providers else name
            simulated = self.providers.get(name).capabilities.simulated if name in self.providers else False
            if b.hours_left is not None and b.hours_left <= WARN_HOURS:
                def claim(s: Session, b: ProviderBalance = b, display: str = display,
                          simulated: bool = simulated) -> list[NoticeDraft]:
                    return _claim_and_warn(s, b, display, simulated, self.clock.now(), outbox_notify)
                sent += await self.db.run(claim)
            elif b.hours_left is None or b.hours_left > REARM_HOURS:
                def rearm(s: Session, name: str = name) -> None:
                    _rearm(s, name)
                await self.db.run(rearm)
        return sent


def hours_left(balance: Decimal, per_hour: Decimal) -> Decimal | None:
    """How long `balance` lasts at `per_hour` (None: nothing bills; 0: nothing left)."""
    if per_hour <= 0:
        return None
    if balance <= 0:
        return Decimal(0)
    return (balance / per_hour).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


def _mark(provider: str) -> str:
    return (MARK_PREFIX + provider)[:32]


def _ensure_mark(s: Session, name: str) -> None:
    """INSERT … ON CONFLICT DO NOTHING of the provider's mark row (two replicas may race)."""
    values: dict[str, Any] = dict(name=name, last_checked=0, last_acted=0)
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        stmt: Insert = pg_insert(SchedulerState).values(**values).on_conflict_do_nothing()
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        stmt = sqlite_insert(SchedulerState).values(**values).on_conflict_do_nothing()
    s.execute(stmt)


def _claim_and_warn(s: Session, b: ProviderBalance, display: str, simulated: bool, now: datetime,
                    notify: Callable[[Session, datetime, NoticeDraft], None]) -> list[NoticeDraft]:
    """Claim the provider's warning (`last_acted` 0 -> 1) and write its notices, one transaction."""
    name = _mark(b.provider)
    _ensure_mark(s, name)
    claimed = rowcount(s.execute(update(SchedulerState).where(
        col(SchedulerState.name) == name, col(SchedulerState.last_acted) == 0)
        .values(last_acted=1, last_run_at=now)))
    if not claimed:
        s.rollback()
        return []
    teams = [str(t) for t in s.execute(select(col(BillingSegment.team)).where(
        col(BillingSegment.provider) == b.provider, col(BillingSegment.end_ts).is_(None))
        .distinct().order_by(col(BillingSegment.team)).limit(MAX_TEAMS)).scalars() if t and t != "*"]
    if b.balance <= 0:
        text = (f"{display} balance is {usd(b.balance)}: nothing is left to bill the {rate(b.run_rate)} "
                f"running there. {display} may stop those machines at any moment; add credit now.")
    else:
        text = (f"{display} balance is {usd(b.balance)}: at the current {rate(b.run_rate)} it runs out in about "
                f"{_hours(b.hours_left)}. {display} stops the machines there when it reaches zero; add credit "
                f"before then.")
    level: Literal["warning", "error"] = "error" if b.balance <= 0 else "warning"
    drafts = [NoticeDraft(kind="provider.low_balance", text=text, level=level, to_admins=True, simulated=simulated,
                          actions=[act(Op.COSTS, None)])]
    drafts += [NoticeDraft(kind="provider.low_balance", text=text, level=level, team=t, simulated=simulated,
                           actions=[act(Op.COSTS, None)]) for t in teams]
    for d in drafts:
        notify(s, now, d)
    s.commit()
    return drafts


def _rearm(s: Session, provider: str) -> None:
    changed = rowcount(s.execute(update(SchedulerState).where(
        col(SchedulerState.name) == _mark(provider), col(SchedulerState.last_acted) != 0).values(last_acted=0)))
    if changed:
        s.commit()
    else:
        s.rollback()


def _hours(h: Decimal | None) -> str:
    if h is None:
        return "—"
    if h < 1:
        return f"{int(h * 60)} min"
    return f"{h.normalize():f} h" if h < 10 else f"{int(h)} h"


__all__ = ["BALANCE_CHECK_S", "HEALTH", "REARM_HOURS", "WARN_HOURS", "Check", "Checked", "HealthMonitor",
           "ProviderError", "ProviderHealth", "ProviderHealthView", "ProvidersResult", "describe", "hours_left"]
