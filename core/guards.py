"""The guards (SPEC §7): idle shutdown with a warning first, max lifetime, destroy after days
stopped, and budgets. One pass looks only at instances whose stored deadline has come
(`instances.next_guard_at`, indexed), so its cost follows what is due, not what is tracked.

Nothing here blocks the event loop: database work goes through `Database.run`, a pass probes
due instances with bounded concurrency and writes every probe result in one batch, warnings are
claimed and written (with their notices) in one transaction, and actions (stops, destroys) run
at most `ACT_CONCURRENCY` at a time.

Exactly-once: a warning is claimed with a conditional UPDATE (`idle_warned_at IS NULL`) in the
transaction that writes its notice, an action goes through the service with an idempotency key
derived from the deadline (and the service's own version claim), a budget threshold by a unique
row. So two processes, or a pass repeated after a crash, never warn or stop twice.

A warning that reached nobody before the deadline (no surface delivered it: chat down, nobody's
shell open) does not postpone the stop: the stop protects the money, and its notice says the
warning reached nobody."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy import Insert, func, or_, select, update
from sqlmodel import Session, col

from . import audit as audit_log
from .actions import Action, Op, Style, act
from .auth import system_actor
from .clock import Clock, as_utc
from .db import rowcount
from .errors import Conflict, GpuherdError, NotFound
from .guard_plan import PROBE_INTERVAL, Step, idle_deadline, plan
from .ledger import month_of
from .lifecycle import FINAL_STATES
from .models import Activity, BudgetAlert, Instance, InstanceState, SchedulerState
from .money import from_micros, to_micros, usd
from .outbox import NoticeDraft
from .probes import ActivityStatus, MetricsSample, ProbeResult, combine, gpu_activity, probe_vllm
from .providers.base import ProviderInstance
from .results import BudgetUse, DestroyResult, StopResult
from .service import GpuService
from .telemetry import TELEMETRY

log = logging.getLogger(__name__)
THRESHOLDS = (50, 80, 100)
RETRY_AFTER_FAILURE = timedelta(seconds=60)
BUDGET_INTERVAL = timedelta(seconds=60)
DEADLINE_PROBE_TIMEOUT_S = 2.0        # at a deadline the stop must follow within seconds
PASS_BATCH = 500
PROBE_CONCURRENCY = 32                # activity probes in flight at once
ACT_CONCURRENCY = 16                  # stops/destroys in flight at once
WARN_KINDS = {"warn_idle": "idle_warned_at", "warn_lifetime": "lifetime_warned_at",
              "warn_stopped": "stopped_warned_at", "nudge": "stopped_warned_at"}


@dataclass
class PassReport:
    started: datetime
    checked: int = 0
    warned: int = 0
    acted: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0
    next_wake: datetime | None = None
    blind: int = 0              # due instances not checked: their provider did not answer
    activity_unknown: int = 0   # running instances whose activity no probe could tell


@dataclass
class _Checked:
    """What a probe learned about one due instance, and what is due for it now."""

    inst: Instance
    values: dict[str, Any]
    activity: Activity | None
    steps: list[Step]
    at_least: datetime | None
    warned: dict[str, datetime | None]      # each guard's warning as it stood before this pass


class Guards:
    def __init__(self, service: GpuService, *, http: httpx.AsyncClient | None = None,
                 probe_interval: timedelta = PROBE_INTERVAL) -> None:
        self.service = service
        self.db = service.db
        self.http = http or httpx.AsyncClient(follow_redirects=False)
        self.probe_interval = probe_interval

    @property
    def clock(self) -> Clock:
        return self.service.clock

    async def aclose(self) -> None:
        await self.http.aclose()

    # --- the pass ------------------------------------------------------------------------
    async def run_pass(self, now: datetime | None = None) -> PassReport:
        now = now or self.clock.now()
        began = time.perf_counter()
        report = PassReport(started=now)
        due = await self.db.run(lambda s: self._due(s, now))
        if due:
            synced = await self.service.refresh(due)
            gate = asyncio.Semaphore(PROBE_CONCURRENCY)

            async def probe(inst: Instance) -> _Checked | None:
                async with gate:
                    return await self._check(synced.rows[inst.id], synced.views.get(inst.id),
                                             synced.failed.get(inst.provider), now, report)
            checked = [c for c in await asyncio.gather(*(probe(i) for i in due)) if c is not None]
            await self._store(checked, now)
            await self._warn_all(checked, now, report)
            acting = [c for c in checked if any(not _is_warning(st) for st in c.steps)]
            act_gate = asyncio.Semaphore(ACT_CONCURRENCY)

            async def act_on(c: _Checked) -> None:
                async with act_gate:
                    step = next(st for st in c.steps if not _is_warning(st))
                    done = await self._act(c, step, now, report)
                    report.acted += done   # after the await: concurrent tasks must not lose counts
            await asyncio.gather(*(act_on(c) for c in acting))
        if await self.db.run(lambda s: self._budgets_due(s, now)):
            await self.check_budgets(now, report)
        report.next_wake = await self.next_wake()
        report.elapsed_ms = (time.perf_counter() - began) * 1000
        TELEMETRY.guard_pass(started=report.started, seconds=report.elapsed_ms / 1000, checked=report.checked,
                             warned=report.warned, acted=report.acted, errors=len(report.errors),
                             blind_provider=report.blind, blind_activity=report.activity_unknown)
        return report

    @staticmethod
    def _due(s: Session, now: datetime) -> list[Instance]:
        stmt = (select(Instance)
                .where(col(Instance.next_guard_at) <= now, col(Instance.state).not_in(FINAL_STATES))
                .order_by(col(Instance.next_guard_at)).limit(PASS_BATCH))
        return list(s.execute(stmt).scalars())

    def plan_unplanned(self) -> int:
        """Give a deadline to live rows that have none (written before the guards existed, or by
        a process that died mid-change). Run once when a scheduler starts (in a thread)."""
        with self.db.session() as s:
            rows = list(s.execute(select(Instance).where(
                col(Instance.next_guard_at).is_(None), col(Instance.state).not_in(FINAL_STATES))).scalars())
            for row in rows:
                row.next_guard_at = plan(row, probe_interval=self.probe_interval).next_at
                s.add(row)
            s.commit()
        return len(rows)

    async def next_wake(self) -> datetime | None:
        value = await self.db.run(lambda s: s.execute(select(func.min(col(Instance.next_guard_at))).where(
            col(Instance.state).not_in(FINAL_STATES))).scalar_one())
        return as_utc(value) if value else None

    # --- one instance --------------------------------------------------------------------
    async def _check(self, inst: Instance, pinst: ProviderInstance | None, provider_error: str | None,
                     now: datetime, report: PassReport) -> _Checked | None:
        """Probe one due instance; what to store and what is due is returned, written in batch."""
        report.checked += 1
        if inst.state_enum.is_final:
            return None
        if provider_error is not None:
            await self._cannot_check(inst, f"{inst.provider} did not answer ({provider_error})", now)
            report.errors.append(f"{inst.id}: {provider_error}")
            report.blind += 1
            return None
        status = None
        values: dict[str, Any] = {}
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
        # an action is taken alone; warnings due before it go out first
        first_action = next((i for i, st in enumerate(steps) if not _is_warning(st)), None)
        if first_action is not None:
            steps = steps[:first_action + 1]
        # blind to activity: its idle steps stay overdue, so look again at the probe interval, not at once
        at_least = now + self.probe_interval if status is ActivityStatus.UNKNOWN else None
        if status is ActivityStatus.UNKNOWN:
            report.activity_unknown += 1
        return _Checked(inst=inst, values=values, activity=activity, steps=steps, at_least=at_least,
                        warned={"idle": inst.idle_warned_at, "lifetime": inst.lifetime_warned_at,
                                "stopped": inst.stopped_warned_at})

    async def _probe(self, inst: Instance, pinst: ProviderInstance | None, now: datetime, *,
                     at_deadline: bool) -> tuple[ActivityStatus, dict[str, Any], Activity | None]:
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
        detail = "; ".join(details) or "no probe: only pings, the notebook heartbeat and keep count"
        values: dict[str, Any] = dict(activity_status=status.value, activity_detail=detail[:256],
                                      metrics_sample=sample_json, guard_checked_at=now,
                                      guard_error=f"activity unknown: {detail}"[:512]
                                      if status is ActivityStatus.UNKNOWN else None)
        activity = None
        if status is ActivityStatus.ACTIVE:
            values.update(last_activity_at=now, idle_warned_at=None)
            activity = Activity(instance_id=inst.id, ts=now, source="probe", detail=detail[:256])
        return status, values, activity

    async def _store(self, checked: list[_Checked], now: datetime) -> None:
        """Every probe result and next deadline of the pass in one transaction. An instance with
        an action due gets its deadline from the action (the service replans it)."""
        def work(s: Session) -> None:
            for c in checked:
                values = dict(c.values)
                if not c.steps:
                    values["next_guard_at"] = self._next_at(c.inst, now, c.at_least)
                    if c.inst.guard_checked_at is None:
                        values.setdefault("guard_checked_at", now)
                if c.activity is not None:
                    s.add(Activity(instance_id=c.activity.instance_id, ts=c.activity.ts, source=c.activity.source,
                                   detail=c.activity.detail))
                if values:
                    s.execute(update(Instance).where(col(Instance.id) == c.inst.id).values(**values))
            s.commit()
        if checked:
            await self.db.run(work)

    def _next_at(self, inst: Instance, now: datetime, at_least: datetime | None) -> datetime | None:
        nxt = None if inst.state_enum.is_final else plan(inst, probe_interval=self.probe_interval).next_at
        if nxt is not None and at_least is not None:
            nxt = max(nxt, at_least)
        if nxt is not None and nxt <= now:  # never spin on a step that cannot run now
            nxt = now + timedelta(seconds=5)
        return nxt

    def _save_plan(self, s: Session, instance_id: str, now: datetime, *, at_least: datetime | None = None) -> None:
        """Re-read the row (a warning or action just changed it) and store its next deadline."""
        inst = s.get(Instance, instance_id)
        if inst is None:
            return
        s.refresh(inst)
        s.execute(update(Instance).where(col(Instance.id) == instance_id).values(
            next_guard_at=self._next_at(inst, now, at_least),
            guard_checked_at=func.coalesce(col(Instance.guard_checked_at), now)))

    async def _cannot_check(self, inst: Instance, why: str, now: datetime) -> None:
        """Loud, once per outage: the owner hears that the guard is blind, not silence."""
        message = f"guards cannot check {inst.id}: {why}"[:512]
        draft = _draft(inst, "guard.blind", f"⚠ {message}. It keeps running and billing until the provider "
                                            "answers; check it yourself.", level="error")

        def work(s: Session) -> bool:
            first = rowcount(s.execute(update(Instance).where(
                col(Instance.id) == inst.id, or_(col(Instance.guard_error).is_(None), col(Instance.guard_error) != message))
                .values(guard_error=message, next_guard_at=now + RETRY_AFTER_FAILURE)))
            if first:
                self.service.lifecycle.notify(s, now, draft)
            s.commit()
            return bool(first)
        if await self.db.run(work):
            await self.service.hub.publish_draft(draft, now)

    # --- warnings ------------------------------------------------------------------------
    async def _warn_all(self, checked: list[_Checked], now: datetime, report: PassReport) -> None:
        """Every warning due in this pass: claimed, written with its notice and audit event, and
        replanned, in one transaction."""
        warnings = [(c, st) for c in checked for st in c.steps if _is_warning(st)]
        if not warnings:
            return

        def work(s: Session) -> list[NoticeDraft]:
            drafts = []
            for c, step in warnings:
                column = getattr(Instance, WARN_KINDS[step.kind])
                claimed = rowcount(s.execute(update(Instance).where(col(Instance.id) == c.inst.id, column.is_(None))
                                             .values({column: now})))
                if not claimed:
                    continue  # someone (another process, an earlier pass) already warned
                setattr(c.inst, WARN_KINDS[step.kind], now)
                draft = self._warning(c.inst, step, now)
                self.service.lifecycle.notify(s, now, draft)
                guard = {"warn_idle": "idle", "warn_lifetime": "lifetime"}.get(step.kind, "stopped")
                audit_log.record(s, system_actor(guard), f"guard.{step.kind}", now=now, instance_id=c.inst.id,
                                 text=draft.text)
                drafts.append(draft)
            for c in {id(c): c for c, _ in warnings}.values():
                if not any(not _is_warning(st) for st in c.steps):
                    self._save_plan(s, c.inst.id, now, at_least=c.at_least)
            s.commit()
            return drafts
        drafts = await self.db.run(work)
        report.warned += len(drafts)
        await self.service.hub.published(drafts, now)

    def _warning(self, inst: Instance, step: Step, now: datetime) -> NoticeDraft:
        p = plan(inst, probe_interval=self.probe_interval)
        act_kind = {"warn_idle": "idle", "warn_lifetime": "lifetime", "warn_stopped": "stopped"}.get(step.kind)
        action_step = next((x for x in p.steps if x.kind == act_kind), None)
        in_text = _until(action_step.at - now) if action_step else ""
        verb = "destroyed" if inst.idle_action == "destroy" or step.kind == "warn_stopped" else "stopped"
        actions: list[Action]
        if step.kind == "warn_idle":
            idle_for = _until(now - (idle_deadline(inst) - timedelta(seconds=inst.idle_window_s)))
            text = f"{inst.id} idle for {idle_for} — {'stops' if verb == 'stopped' else 'destroyed'} in {in_text}"
            actions = [act(Op.KEEP, inst.id, style=Style.PRIMARY, duration="1h"),
                       act(Op.STOP, inst.id, style=Style.DANGER)]
        elif step.kind == "warn_lifetime":
            text = f"{inst.id} reaches its max lifetime in {in_text} and will be {verb}"
            actions = [act(Op.STOP, inst.id, style=Style.DANGER)]
        else:
            days = (now - as_utc(inst.stopped_at or now)).days
            storage = from_micros(inst.storage_dph_micros)
            text = (f"{inst.id} has been stopped for {days} days and still bills storage "
                    f"({usd(storage * 24)}/day)")
            text += f" — destroyed in {in_text}" if step.kind == "warn_stopped" else ""
            actions = ([act(Op.KEEP, inst.id, style=Style.PRIMARY, duration="7d")]
                       if step.kind == "warn_stopped" else []) + [
                act(Op.DESTROY, inst.id, style=Style.DANGER, confirm=True), act(Op.START, inst.id)]
        return _draft(inst, f"guard.{step.kind}", text, actions=actions, level="warning")

    # --- actions -------------------------------------------------------------------------
    async def _act(self, checked: _Checked, step: Step, now: datetime, report: PassReport) -> int:
        inst = checked.inst
        guard = {"idle": "idle", "lifetime": "lifetime", "stopped": "stopped"}[step.kind]
        action = "destroy" if step.kind == "stopped" else inst.idle_action
        actor = system_actor(guard)
        key = f"guard:{guard}:{inst.id}:{int(step.at.timestamp())}"
        warned = checked.warned.get(guard)   # a warning given in this same pass came too late to help
        reason = {"idle": f"after {_until(timedelta(seconds=inst.idle_window_s))} without activity",
                  "lifetime": f"at its max lifetime of {_until(timedelta(seconds=inst.max_lifetime_s or 0))}",
                  "stopped": "after being stopped too long"}[guard]
        outbox = self.service.outbox

        def tell(s: Session, row: Instance, result: Any) -> NoticeDraft:
            if isinstance(result, DestroyResult):
                what = f"destroyed; total cost {usd(result.total_cost)}"
            else:
                assert isinstance(result, StopResult)
                what = f"stopped; session cost {usd(result.session_cost)}"
                if result.storage.per_hour > 0:
                    what += f", its disk bills {usd(result.storage.per_day)}/day until destroyed"
            if warned is None:
                late = " (no warning could go out in time: gpuherd was not running)"
            elif not outbox.reached_anyone(s, row.id, f"guard.warn_{guard}", as_utc(warned)):
                late = " (the warning before it reached nobody)"
            else:
                late = ""
            after = [act(Op.START, row.id)] if isinstance(result, StopResult) else []
            return _draft(row, f"guard.{guard}", f"{row.id} {reason}: {what}{late}", actions=after)
        try:
            if action == "destroy":
                await self.service.destroy(actor, inst.id, confirmed=True, idempotency_key=key, tell=tell)
            else:
                await self.service.stop(actor, inst.id, idempotency_key=key, tell=tell)
        except (Conflict, NotFound) as exc:
            log.info("guard %s on %s skipped: %s", guard, inst.id, exc.message)

            def retry_later(s: Session) -> None:
                self._save_plan(s, inst.id, now, at_least=now + RETRY_AFTER_FAILURE)
                s.commit()
            await self.db.run(retry_later)
            return 0
        except GpuherdError as exc:
            message = exc.message
            report.errors.append(f"{inst.id}: {message}")
            draft = _draft(inst, f"guard.{guard}.failed",
                           f"⚠ {guard} guard could not {action} {inst.id}: {message} Retrying in "
                           f"{int(RETRY_AFTER_FAILURE.total_seconds())} s.", level="error",
                           actions=[act(Op.STOP, inst.id, style=Style.DANGER)])

            def failed(s: Session) -> None:
                s.execute(update(Instance).where(col(Instance.id) == inst.id).values(
                    guard_error=f"{guard} {action} failed: {message}"[:512]))
                self._save_plan(s, inst.id, now, at_least=now + RETRY_AFTER_FAILURE)
                self.service.lifecycle.notify(s, now, draft)
                s.commit()
            await self.db.run(failed)
            await self.service.hub.publish_draft(draft, now)
            return 0
        return 1

    # --- budgets -------------------------------------------------------------------------
    @staticmethod
    def _budgets_due(s: Session, now: datetime) -> bool:
        row = s.get(SchedulerState, "guards")
        last = as_utc(row.budgets_checked_at) if row and row.budgets_checked_at else None
        return last is None or now - last >= BUDGET_INTERVAL or now < last

    async def check_budgets(self, now: datetime, report: PassReport | None = None) -> list[str]:
        """Warn once per threshold per month; enforce hard caps. Returns the warnings sent."""
        month = month_of(now)

        def read(s: Session) -> list[BudgetUse]:
            uses = self.service.costs_.all_budget_uses(s)
            state = s.get(SchedulerState, "guards") or SchedulerState(name="guards")
            state.budgets_checked_at = now
            s.add(state)
            s.commit()
            return uses
        uses = await self.db.run(read)
        sent: list[str] = []
        for b in uses:
            limit, spent = b.limit, b.spent
            pct = spent * 100 / limit if limit else Decimal(0)
            reached = [t for t in THRESHOLDS if pct >= t]
            if reached:
                def alert(s: Session, b: BudgetUse = b, reached: list[int] = reached,
                          pct: Decimal = pct) -> NoticeDraft | None:
                    return self._alert(s, b, month.label, reached, pct, now)
                draft = await self.db.run(alert)
                if draft is not None:
                    sent.append(draft.text)
                    await self.service.hub.publish_draft(draft, now)
            if b.hard_cap and pct >= 100:
                await self._enforce_cap(b, month.label, now, report)
        return sent

    def _alert(self, s: Session, b: BudgetUse, period: str, reached: list[int], pct: Decimal,
               now: datetime) -> NoticeDraft | None:
        """Claim each threshold crossed (a unique row each; a row already there is skipped) and
        write one notice for them, in one transaction."""
        crossed = [t for t in reached if _insert_ignore(s, dict(
            scope=b.scope.value, name=b.name, period=period, threshold=t, spent_micros=to_micros(b.spent),
            created_at=now))]
        if not crossed:
            s.rollback()
            return None
        who = f"Team {b.name}" if b.scope.value == "team" else f"{b.name}"
        text = (f"{who} has passed {max(crossed)}% of its {usd(b.limit)} monthly budget: {usd(b.spent)} "
                f"spent in {period} ({int(pct)}%).")
        if max(crossed) >= 100:
            text += (" Running machines are being stopped (hard cap)." if b.hard_cap
                     else " New boots now need an admin's confirmation.")
        draft = NoticeDraft(kind="budget.threshold", text=text, level="warning" if max(crossed) < 100 else "error",
                            team=b.name if b.scope.value == "team" else None,
                            owner=b.name if b.scope.value == "user" else None,
                            actions=[act(Op.COSTS, None)])
        self.service.lifecycle.notify(s, now, draft)
        audit_log.record(s, system_actor("budget"), "budget.threshold", now=now, text=text)
        s.commit()
        return draft

    async def _enforce_cap(self, b: BudgetUse, period: str, now: datetime, report: PassReport | None) -> None:
        column = col(Instance.team) if b.scope.value == "team" else col(Instance.owner)
        running = await self.db.run(lambda s: list(s.execute(select(Instance).where(
            column == b.name, col(Instance.state).in_([InstanceState.RUNNING.value, InstanceState.LOADING.value,
                                                       InstanceState.PROVISIONING.value]))).scalars()))
        actor = system_actor("budget")

        def tell(s: Session, row: Instance, result: Any) -> NoticeDraft:
            return _draft(row, "guard.budget", f"{row.id} stopped: the {b.scope.value} budget of {b.name} is used up "
                                               f"(hard cap); session cost {usd(result.session_cost)}", level="warning")
        for inst in running:
            key = f"guard:cap:{inst.id}:{period}:{int(as_utc(inst.started_at or inst.created_at).timestamp())}"
            try:
                await self.service.stop(actor, inst.id, idempotency_key=key, tell=tell)
            except GpuherdError as exc:
                if report is not None:
                    report.errors.append(f"{inst.id}: {exc.message}")
                continue
            if report is not None:
                report.acted += 1


def _insert_ignore(s: Session, values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING: whether this call added the row."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        stmt: Insert = pg_insert(BudgetAlert).values(**values).on_conflict_do_nothing()
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        stmt = sqlite_insert(BudgetAlert).values(**values).on_conflict_do_nothing()
    # RETURNING, not rowcount: an ORM-enabled INSERT reports a row count of 1 either way
    return s.execute(stmt.returning(col(BudgetAlert.id))).first() is not None


def _is_warning(step: Step) -> bool:
    return step.kind in WARN_KINDS


def _draft(inst: Instance, kind: str, text: str, *, actions: list[Action] | None = None,
           level: str = "info") -> NoticeDraft:
    return NoticeDraft(kind=kind, text=text, owner=inst.owner, team=inst.team, instance_id=inst.id,
                       simulated=inst.simulated, actor=None, level=level, actions=actions or [])


def _until(td: timedelta) -> str:
    seconds = max(0, int(td.total_seconds()))
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes / 60
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} days"
