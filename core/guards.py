"""The guards (SPEC §7): idle shutdown with a warning first, max lifetime, destroy after days
stopped, and budgets. One pass looks only at instances whose stored deadline has come
(`instances.next_guard_at`, indexed), so its cost follows what is due, not what is tracked.

Exactly-once: a warning is claimed with a conditional UPDATE (`idle_warned_at IS NULL`), an
action goes through the service with an idempotency key derived from the deadline (and the
service's own version claim), a budget threshold by a unique row. So two processes, or a pass
repeated after a crash, never warn or stop twice."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError

from .auth import system_actor
from .clock import as_utc
from .errors import Conflict, GpuherdError, NotFound
from .guard_plan import PROBE_INTERVAL, Step, idle_deadline, plan
from .ledger import month_of
from .models import Activity, BudgetAlert, Budget, Instance, InstanceState, SchedulerState
from .money import from_micros, to_micros, usd
from .notify import Notice, NoticeAction
from .probes import ActivityStatus, MetricsSample, ProbeResult, combine, gpu_activity, probe_vllm
from .providers.base import ProviderInstance
from .results import BudgetUse
from .service import GpuService

log = logging.getLogger(__name__)
THRESHOLDS = (50, 80, 100)
RETRY_AFTER_FAILURE = timedelta(seconds=60)
BUDGET_INTERVAL = timedelta(seconds=60)
DEADLINE_PROBE_TIMEOUT_S = 2.0        # at a deadline the stop must follow within seconds
PASS_BATCH = 500


@dataclass
class PassReport:
    started: datetime
    checked: int = 0
    warned: int = 0
    acted: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0
    next_wake: datetime | None = None


class Guards:
    def __init__(self, service: GpuService, *, http: httpx.AsyncClient | None = None,
                 probe_interval: timedelta = PROBE_INTERVAL) -> None:
        self.service = service
        self.http = http or httpx.AsyncClient(follow_redirects=False)
        self.probe_interval = probe_interval

    @property
    def clock(self):  # noqa: ANN201
        return self.service.clock

    async def aclose(self) -> None:
        await self.http.aclose()

    # --- the pass ------------------------------------------------------------------------
    async def run_pass(self, now: datetime | None = None) -> PassReport:
        now = now or self.clock.now()
        began = time.perf_counter()
        report = PassReport(started=now)
        due = self._due(now)
        if due:
            synced = await self.service.refresh(due)
            await asyncio.gather(*(self._check(synced.rows[inst.id], synced.views.get(inst.id),
                                               synced.failed.get(inst.provider), now, report) for inst in due))
        if self._budgets_due(now):
            await self.check_budgets(now, report)
        report.next_wake = self.next_wake()
        report.elapsed_ms = (time.perf_counter() - began) * 1000
        return report

    def _due(self, now: datetime) -> list[Instance]:
        final = [s.value for s in InstanceState if s.is_final]
        with self.service.db.session() as s:
            stmt = (select(Instance)
                    .where(Instance.next_guard_at <= now, Instance.state.not_in(final))
                    .order_by(Instance.next_guard_at).limit(PASS_BATCH))
            return list(s.exec(stmt).scalars())  # type: ignore[call-overload]

    def plan_unplanned(self) -> int:
        """Give a deadline to live rows that have none (written before the guards existed, or by
        a process that died mid-change). Run once when a scheduler starts."""
        final = [s.value for s in InstanceState if s.is_final]
        with self.service.db.session() as s:
            rows = list(s.exec(select(Instance).where(  # type: ignore[call-overload]
                Instance.next_guard_at.is_(None), Instance.state.not_in(final))).scalars())
            for row in rows:
                row.next_guard_at = plan(row, probe_interval=self.probe_interval).next_at
                s.add(row)
            s.commit()
        return len(rows)

    def next_wake(self) -> datetime | None:
        final = [s.value for s in InstanceState if s.is_final]
        with self.service.db.session() as s:
            value = s.exec(select(func.min(Instance.next_guard_at)).where(  # type: ignore[call-overload]
                Instance.state.not_in(final))).one()[0]
        return as_utc(value) if value else None

    # --- one instance --------------------------------------------------------------------
    async def _check(self, inst: Instance, pinst: ProviderInstance | None, provider_error: str | None,
                     now: datetime, report: PassReport) -> None:
        """One due instance. The common case (a probe, nothing to do) costs one UPDATE."""
        report.checked += 1
        if inst.state_enum.is_final:
            return
        if provider_error is not None:
            await self._cannot_check(inst, f"{inst.provider} did not answer ({provider_error})", now)
            report.errors.append(f"{inst.id}: {provider_error}")
            return
        status = None
        values: dict[str, object] = {}
        activity = None
        if inst.state_enum is InstanceState.RUNNING:
            upcoming = plan(inst, probe_interval=self.probe_interval).due(now)
            if any(step.kind in ("probe", "warn_idle", "idle") for step in upcoming):
                status, values, activity = await self._probe(inst, pinst, now, at_deadline=any(
                    step.kind == "idle" for step in upcoming))
                for key, value in values.items():  # plan on what the probe just learned
                    setattr(inst, key, value)
        steps = [step for step in plan(inst, probe_interval=self.probe_interval).due(now)
                 if step.kind != "probe"
                 and not (step.kind in ("warn_idle", "idle") and status is ActivityStatus.UNKNOWN)]
        # blind to activity: its idle steps stay overdue, so look again at the probe interval, not at once
        at_least = now + self.probe_interval if status is ActivityStatus.UNKNOWN else None
        if not steps:
            self._write(inst, now, values, activity, at_least=at_least)
            return
        if values:
            self._write(inst, now, values, activity, plan_next=False)
        for step in steps:
            if step.kind.startswith("warn_") or step.kind == "nudge":
                warned = await self._warn(inst, step, now)
                report.warned += warned
            else:
                acted = await self._act(inst, step, now, report)
                report.acted += acted
                return  # the action replanned the instance
        self._save_plan(inst.id, now, at_least=at_least)

    async def _probe(self, inst: Instance, pinst: ProviderInstance | None, now: datetime, *,
                     at_deadline: bool) -> tuple[ActivityStatus, dict[str, object], Activity | None]:
        """Ask every activity signal the instance has; returns the status and the fields to store."""
        provider = self.service.providers.get(inst.provider)
        statuses: list[ActivityStatus] = []
        details: list[str] = []
        sample_json = inst.metrics_sample
        if inst.endpoint and not provider.capabilities.simulated:
            previous = MetricsSample.model_validate_json(inst.metrics_sample) if inst.metrics_sample else None
            result: ProbeResult = await probe_vllm(
                self.http, inst.endpoint, previous, now=now,
                timeout=DEADLINE_PROBE_TIMEOUT_S if at_deadline else 5.0)
            statuses.append(result.status)
            details.append(f"model server: {result.detail}")
            if result.sample is not None:
                sample_json = result.sample.model_dump_json()
        if provider.capabilities.reports_gpu_utilisation:
            util = pinst.gpu_util if pinst is not None else None
            statuses.append(gpu_activity(util))
            details.append(f"GPU {util:.0f}%" if util is not None else "GPU utilisation not reported")
        status = combine(*statuses) if statuses else ActivityStatus.QUIET
        detail = "; ".join(details) or "no probe: only pings, the notebook heartbeat and /gpu keep count"
        values: dict[str, object] = dict(activity_status=status.value, activity_detail=detail[:256],
                                         metrics_sample=sample_json, guard_checked_at=now,
                                         guard_error=f"activity unknown: {detail}"[:512]
                                         if status is ActivityStatus.UNKNOWN else None)
        activity = None
        if status is ActivityStatus.ACTIVE:
            values.update(last_activity_at=now, idle_warned_at=None)
            activity = Activity(instance_id=inst.id, ts=now, source="probe", detail=detail[:256])
        return status, values, activity

    def _write(self, inst: Instance, now: datetime, values: dict[str, object], activity: Activity | None, *,
               plan_next: bool = True, at_least: datetime | None = None) -> None:
        """Store probe results and, unless an action follows, the next deadline: one UPDATE."""
        values = dict(values)
        if plan_next:
            values["next_guard_at"] = self._next_at(inst, now, at_least)
            if inst.guard_checked_at is None:
                values.setdefault("guard_checked_at", now)
        if not values and activity is None:
            return
        with self.service.db.session() as s:
            if activity is not None:
                s.add(activity)
            if values:
                s.exec(update(Instance).where(Instance.id == inst.id).values(**values))  # type: ignore[call-overload]
            s.commit()

    def _next_at(self, inst: Instance, now: datetime, at_least: datetime | None) -> datetime | None:
        nxt = None if inst.state_enum.is_final else plan(inst, probe_interval=self.probe_interval).next_at
        if nxt is not None and at_least is not None:
            nxt = max(nxt, at_least)
        if nxt is not None and nxt <= now:  # never spin on a step that cannot run now
            nxt = now + timedelta(seconds=5)
        return nxt

    def _save_plan(self, instance_id: str, now: datetime, *, at_least: datetime | None = None) -> None:
        """Re-read the row (a warning or action just changed it) and store its next deadline."""
        with self.service.db.session() as s:
            inst = s.get(Instance, instance_id)
            if inst is None:
                return
            s.exec(update(Instance).where(Instance.id == instance_id).values(  # type: ignore[call-overload]
                next_guard_at=self._next_at(inst, now, at_least),
                guard_checked_at=func.coalesce(Instance.guard_checked_at, now)))
            s.commit()

    async def _cannot_check(self, inst: Instance, why: str, now: datetime) -> None:
        """Loud, once per outage: the owner hears that the guard is blind, not silence."""
        message = f"guards cannot check {inst.id}: {why}"[:512]
        with self.service.db.session() as s:
            first = s.exec(update(Instance).where(  # type: ignore[call-overload]
                Instance.id == inst.id, or_(Instance.guard_error.is_(None), Instance.guard_error != message))
                .values(guard_error=message, next_guard_at=now + RETRY_AFTER_FAILURE)).rowcount
            s.commit()
        if first:
            await self._notify(inst, "guard.blind", f"⚠ {message}. It keeps running and billing until the "
                                                    f"provider answers; check it yourself.", now, level="error")

    # --- warnings ------------------------------------------------------------------------
    async def _warn(self, inst: Instance, step: Step, now: datetime) -> int:
        column = {"warn_idle": Instance.idle_warned_at, "warn_lifetime": Instance.lifetime_warned_at,
                  "warn_stopped": Instance.stopped_warned_at, "nudge": Instance.stopped_warned_at}[step.kind]
        with self.service.db.session() as s:
            claimed = s.exec(update(Instance).where(Instance.id == inst.id, column.is_(None))  # type: ignore[call-overload]
                             .values({column: now})).rowcount
            s.commit()
        if not claimed:
            return 0  # someone (another process, an earlier pass) already warned
        p = plan(inst, probe_interval=self.probe_interval)
        act = {"warn_idle": "idle", "warn_lifetime": "lifetime", "warn_stopped": "stopped"}.get(step.kind)
        action_step = next((x for x in p.steps if x.kind == act), None)
        in_text = _until(action_step.at - now) if action_step else ""
        verb = "destroyed" if inst.idle_action == "destroy" or step.kind == "warn_stopped" else "stopped"
        if step.kind == "warn_idle":
            idle_for = _until(now - (idle_deadline(inst) - timedelta(seconds=inst.idle_window_s)))
            text = f"{inst.id} idle for {idle_for} — {'stops' if verb == 'stopped' else 'destroyed'} in {in_text}"
            actions = (NoticeAction("Keep 1 h", f"/gpu keep {inst.id} 1h", "primary"),
                       NoticeAction("Stop now", f"/gpu stop {inst.id}", "danger"))
        elif step.kind == "warn_lifetime":
            text = f"{inst.id} reaches its max lifetime in {in_text} and will be {verb}"
            actions = (NoticeAction("Stop now", f"/gpu stop {inst.id}", "danger"),)
        else:
            days = (now - as_utc(inst.stopped_at or now)).days
            storage = from_micros(inst.storage_dph_micros)
            text = (f"{inst.id} has been stopped for {days} days and still bills storage "
                    f"({usd(storage * 24)}/day)")
            text += f" — destroyed in {in_text}" if step.kind == "warn_stopped" else ""
            actions = ((NoticeAction("Keep 7 days", f"/gpu keep {inst.id} 7d", "primary"),)
                       if step.kind == "warn_stopped" else ()) + (
                NoticeAction("Destroy now", f"/gpu destroy {inst.id}", "danger"),
                NoticeAction("Start", f"/gpu start {inst.id}"))
        await self._notify(inst, f"guard.{step.kind}", text, now, actions=actions, level="warning")
        self.service.audit_system(act or "stopped", f"guard.{step.kind}", inst.id, text)  # nudge: stopped guard
        return 1

    # --- actions -------------------------------------------------------------------------
    async def _act(self, inst: Instance, step: Step, now: datetime, report: PassReport) -> int:
        guard = {"idle": "idle", "lifetime": "lifetime", "stopped": "stopped"}[step.kind]
        action = "destroy" if step.kind == "stopped" else inst.idle_action
        actor = system_actor(guard)
        key = f"guard:{guard}:{inst.id}:{int(step.at.timestamp())}"
        warned = (inst.idle_warned_at if guard == "idle" else inst.lifetime_warned_at if guard == "lifetime"
                  else inst.stopped_warned_at)
        try:
            if action == "destroy":
                result = await self.service.destroy(actor, inst.id, confirm=True, idempotency_key=key)
                cost = result.total_cost  # type: ignore[union-attr]
                what = f"destroyed; total cost {usd(cost)}"
            else:
                stopped = await self.service.stop(actor, inst.id, idempotency_key=key)
                what = f"stopped; session cost {usd(stopped.session_cost)}"
                if stopped.storage_dph > 0:
                    what += f", its disk bills {usd(stopped.storage_dph * 24)}/day until destroyed"
        except (Conflict, NotFound) as exc:
            log.info("guard %s on %s skipped: %s", guard, inst.id, exc.message)
            self._save_plan(inst.id, now, at_least=now + RETRY_AFTER_FAILURE)
            return 0
        except GpuherdError as exc:
            report.errors.append(f"{inst.id}: {exc.message}")
            with self.service.db.session() as s:
                s.exec(update(Instance).where(Instance.id == inst.id).values(  # type: ignore[call-overload]
                    guard_error=f"{guard} {action} failed: {exc.message}"[:512]))
                s.commit()
            self._save_plan(inst.id, now, at_least=now + RETRY_AFTER_FAILURE)
            await self._notify(inst, f"guard.{guard}.failed",
                               f"⚠ {guard} guard could not {action} {inst.id}: {exc.message} Retrying in "
                               f"{int(RETRY_AFTER_FAILURE.total_seconds())} s.", now, level="error",
                               actions=(NoticeAction("Stop now", f"/gpu stop {inst.id}", "danger"),))
            return 0
        reason = {"idle": f"after {_until(timedelta(seconds=inst.idle_window_s))} without activity",
                  "lifetime": f"at its max lifetime of {_until(timedelta(seconds=inst.max_lifetime_s or 0))}",
                  "stopped": "after being stopped too long"}[guard]
        late = "" if warned else " (no warning could go out in time: gpuherd was not running)"
        await self._notify(inst, f"guard.{guard}", f"{inst.id} {reason}: {what}{late}", now)
        return 1

    async def _notify(self, inst: Instance, kind: str, text: str, now: datetime, *,
                      actions: tuple[NoticeAction, ...] = (), level: str = "info") -> None:
        await self.service.hub.publish(Notice(kind=kind, text=text, at=now, owner=inst.owner, team=inst.team,
                                              instance_id=inst.id, actions=actions, simulated=inst.simulated,
                                              actor=None, level=level))

    # --- budgets -------------------------------------------------------------------------
    def _budgets_due(self, now: datetime) -> bool:
        with self.service.db.session() as s:
            row = s.get(SchedulerState, "guards")
            last = as_utc(row.budgets_checked_at) if row and row.budgets_checked_at else None
        return last is None or now - last >= BUDGET_INTERVAL or now < last

    async def check_budgets(self, now: datetime, report: PassReport | None = None) -> list[str]:
        """Warn once per threshold per month; enforce hard caps. Returns the warnings sent."""
        month = month_of(now)
        sent: list[str] = []
        with self.service.db.session() as s:
            uses = self.service.budget_uses(s, list(s.exec(select(Budget)).scalars()))  # type: ignore[call-overload]
            state = s.get(SchedulerState, "guards") or SchedulerState(name="guards")
            state.budgets_checked_at = now
            s.add(state)
            s.commit()
        for b in uses:
            limit, spent = b.limit, b.spent
            pct = spent * 100 / limit if limit else Decimal(0)
            crossed = [t for t in THRESHOLDS if pct >= t and self._claim_alert(b, month.label, t, spent, now)]
            if crossed:
                who = f"Team {b.name}" if b.scope == "team" else f"{b.name}"
                text = (f"{who} has passed {max(crossed)}% of its {usd(limit)} monthly budget: {usd(spent)} "
                        f"spent in {month.label} ({int(pct)}%).")
                if max(crossed) >= 100:
                    text += (" Running machines are being stopped (hard cap)." if b.hard_cap
                             else " New boots now need an admin's confirmation.")
                await self.service.hub.publish(Notice(
                    kind="budget.threshold", text=text, at=now, level="warning" if max(crossed) < 100 else "error",
                    team=b.name if b.scope == "team" else None, owner=b.name if b.scope == "user" else None,
                    actions=(NoticeAction("Costs", "/gpu costs"),)))
                self.service.audit_system("budget", "budget.threshold", None, text)
                sent.append(text)
            if b.hard_cap and pct >= 100:
                await self._enforce_cap(b, month.label, now, report)
        return sent

    def _claim_alert(self, b: BudgetUse, period: str, threshold: int, spent: Decimal, now: datetime) -> bool:
        with self.service.db.session() as s:
            s.add(BudgetAlert(scope=b.scope, name=b.name, period=period, threshold=threshold,
                              spent_micros=to_micros(spent), created_at=now))
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                return False
        return True

    async def _enforce_cap(self, b: BudgetUse, period: str, now: datetime, report: PassReport | None) -> None:
        column = Instance.team if b.scope == "team" else Instance.owner
        with self.service.db.session() as s:
            running = list(s.exec(select(Instance).where(  # type: ignore[call-overload]
                column == b.name, Instance.state.in_([InstanceState.RUNNING.value, InstanceState.LOADING.value,
                                                      InstanceState.PROVISIONING.value]))).scalars())
        actor = system_actor("budget")
        for inst in running:
            key = f"guard:cap:{inst.id}:{period}:{int(as_utc(inst.started_at or inst.created_at).timestamp())}"
            try:
                r = await self.service.stop(actor, inst.id, idempotency_key=key)
            except GpuherdError as exc:
                if report is not None:
                    report.errors.append(f"{inst.id}: {exc.message}")
                continue
            if report is not None:
                report.acted += 1
            await self._notify(inst, "guard.budget", f"{inst.id} stopped: the {b.scope} budget of {b.name} is "
                                                     f"used up (hard cap); session cost {usd(r.session_cost)}", now,
                               level="warning")


def _until(td: timedelta) -> str:
    seconds = max(0, int(td.total_seconds()))
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes / 60
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} days"
