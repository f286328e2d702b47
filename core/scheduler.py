"""Runs the guards with APScheduler. There is one job, re-armed after every pass for the earliest
deadline stored in the database (never later than `max_sleep`, so changes made by another
process are seen). So a deadline is acted on within a pass's duration of coming due, not up to a
minute later as a once-a-minute sweep would, and a deadline that passed while gpuherd was down is
acted on by the first pass at start.

Only the process holding the leadership (a PostgreSQL advisory lock; a file lock with SQLite)
runs passes; the others retry every `leader_retry` seconds and take over when the leader dies."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlmodel import Session

from .clock import as_utc
from .guards import Guards, PassReport
from .leader import Leadership, leadership_for
from .models import SchedulerState
from .provider_health import BALANCE_CHECK_S
from .service import GpuService

log = logging.getLogger(__name__)
JOB_ID = "guards"
RECONCILE_ID = "reconcile"
BALANCE_ID = "balances"


class GuardScheduler:
    def __init__(self, service: GpuService, *, leadership: Leadership | None = None, guards: Guards | None = None,
                 max_sleep: float | None = None, leader_retry: float | None = None) -> None:
        self.service = service
        self.guards = guards or Guards(service)
        self.leadership = leadership or leadership_for(service.settings.resolved_database_url,
                                                       service.settings.home, service.settings.guard_lock_name)
        self.max_sleep = max_sleep or service.settings.guard_max_sleep_s
        self.leader_retry = leader_retry or service.settings.guard_leader_retry_s
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.last_report: PassReport | None = None
        self.is_leader = False
        self._scheduler: AsyncIOScheduler | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.guards.plan_unplanned)
        except Exception:
            log.exception("guards: could not plan instances without a deadline")
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.start()
        self._arm(datetime.now(UTC))
        interval = self.service.settings.reconcile_interval_s
        self._scheduler.add_job(self.reconcile_tick, "interval", seconds=interval, id=RECONCILE_ID,
                                next_run_time=datetime.now(UTC) + timedelta(seconds=min(30.0, interval)),
                                coalesce=True, max_instances=1, misfire_grace_time=None)
        self._scheduler.add_job(self.balance_tick, "interval", seconds=BALANCE_CHECK_S, id=BALANCE_ID,
                                next_run_time=datetime.now(UTC) + timedelta(seconds=min(30.0, BALANCE_CHECK_S)),
                                coalesce=True, max_instances=1, misfire_grace_time=None)

    async def stop(self) -> None:
        """Stop after the pass in progress (a pass cancelled mid-stop would leave its claim on the
        machine until the stale-claim sync, minutes later), then release the lock at once."""
        if self._scheduler is not None:
            held = False
            try:
                await asyncio.wait_for(self._lock.acquire(), timeout=60)
                held = True
            except TimeoutError:
                log.warning("guards: a pass still runs after 60 s; stopping anyway")
            try:
                self._scheduler.shutdown(wait=False)   # a pass waiting for the lock is cancelled unstarted
                self._scheduler = None
            finally:
                if held:
                    self._lock.release()
        await asyncio.to_thread(self.leadership.release)
        self.is_leader = False        # /ready and the readiness watcher must not read a released lock as held
        await self.guards.aclose()

    def _arm(self, when: datetime) -> None:
        if self._scheduler is None:
            return
        self._scheduler.add_job(self.tick, "date", run_date=when, id=JOB_ID, replace_existing=True,
                                misfire_grace_time=None, coalesce=True,
                                # a pass re-arms itself before it has returned: if the new date is
                                # already due, APScheduler must run it (it waits for the pass lock)
                                # instead of dropping it as "maximum instances reached", which left
                                # no guard job at all
                                max_instances=2)

    async def tick(self) -> PassReport | None:
        """One wake-up: make sure we lead, run a pass, re-arm for the next deadline."""
        async with self._lock:
            now = self.service.clock.now()
            try:
                leading = await asyncio.to_thread(self._lead)
            except Exception:  # the database is down: say so and try again
                log.exception("guards: cannot check leadership")
                self._arm(datetime.now(UTC) + timedelta(seconds=self.leader_retry))
                return None
            if not leading:
                self._arm(datetime.now(UTC) + timedelta(seconds=self.leader_retry))
                return None
            report: PassReport | None = None
            error = None
            try:
                report = await self.guards.run_pass(now)
            except Exception as exc:  # a pass must never kill the scheduler
                log.exception("guard pass failed")
                error = f"pass failed: {type(exc).__name__}: {exc}"[:500]
            self.last_report = report
            wake = self._next_wake(report)
            try:
                await self.service.db.run(lambda s: self._record(s, now, report, wake, error))
            except Exception:  # the record is for people; the next pass must happen regardless
                log.exception("guards: could not record the scheduler state")
            finally:
                self._arm(wake)
            return report

    async def reconcile_tick(self) -> None:
        """Periodic reconcile, run by the guard leader only (one process asks the providers)."""
        if not self.is_leader:
            return
        now = self.service.clock.now()
        error = None
        result = None
        try:
            result = await self.service.reconcile()
        except Exception as exc:  # never kill the scheduler
            log.exception("reconcile failed")
            error = f"reconcile failed: {type(exc).__name__}: {exc}"[:500]
        def record(s: Session) -> None:
            row = s.get(SchedulerState, RECONCILE_ID) or SchedulerState(name=RECONCILE_ID)
            row.leader = self.identity
            row.last_run_at = now
            row.last_checked = sum(result.checked.values()) if result else 0
            row.last_acted = len(result.adopted) + len(result.lost) if result else 0
            problems = [f"{f.provider}: {f.message}" for f in result.failed] if result else []
            row.last_error = error or ("; ".join(problems)[:500] or None)
            s.add(row)
            s.commit()
        try:
            await self.service.db.run(record)
        except Exception:
            log.exception("reconcile: could not record its state")

    async def balance_tick(self) -> None:
        """Periodic provider balance check and low-balance warning (provider_health.py), by the
        guard leader only; each provider is asked within the provider time limit."""
        if not self.is_leader:
            return
        try:
            await self.service.warn_low_balances()
        except Exception:  # never kill the scheduler
            log.exception("balance check failed")

    def _lead(self) -> bool:
        held = self.leadership.holds() or self.leadership.try_acquire()
        if held != self.is_leader:
            log.warning("guards: %s leadership (%s)", "took" if held else "lost", self.leadership.describe())
        self.is_leader = held
        return held

    def _next_wake(self, report: PassReport | None) -> datetime:
        real_now = datetime.now(UTC)
        latest = real_now + timedelta(seconds=self.max_sleep)
        if report is None or report.next_wake is None:
            return latest
        # the database holds the service clock's times; map the delay onto the real clock
        delay = (as_utc(report.next_wake) - self.service.clock.now()).total_seconds()
        return min(latest, real_now + timedelta(seconds=max(0.05, delay)))

    def _record(self, s: Session, now: datetime, report: PassReport | None, wake: datetime,
                error: str | None) -> None:
        row = s.get(SchedulerState, JOB_ID) or SchedulerState(name=JOB_ID)
        row.leader = self.identity
        row.last_run_at = now
        row.next_wake_at = wake
        if report is not None:
            row.last_pass_ms = round(report.elapsed_ms, 1)
            row.last_checked = report.checked
            row.last_acted = report.acted
            row.last_error = "; ".join(report.errors)[:500] or None
        if error:
            row.last_error = error
        s.add(row)
        s.commit()
