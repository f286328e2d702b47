"""When each guard next needs to look at an instance, and what it will do then. Pure functions
over the instance's stored fields: the service calls `replan` after every change so the
scheduler can wake at the earliest deadline in the database, and `/gpu status` shows the plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .clock import as_utc
from .models import Instance, InstanceState

PROBE_INTERVAL = timedelta(seconds=60)       # activity probes of a running instance
STOPPED_NUDGE_AFTER = timedelta(days=3)      # "still billing storage" when no auto-destroy is set
STOPPED_WARN_LEAD = timedelta(days=1)        # warning before destroy-after-N-days-stopped
WATCHED = {InstanceState.RUNNING, InstanceState.LOADING, InstanceState.PROVISIONING, InstanceState.STARTING}


@dataclass(frozen=True)
class Step:
    at: datetime
    kind: str            # probe | warn_idle | idle | warn_lifetime | lifetime | warn_stopped | stopped | nudge
    text: str            # "stop (idle)", "destroy (max lifetime)"


@dataclass(frozen=True)
class GuardState:
    name: str
    armed: bool
    detail: str


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    guards: list[GuardState] = field(default_factory=list)

    @property
    def next_at(self) -> datetime | None:
        return min((s.at for s in self.steps), default=None)

    @property
    def next_action(self) -> Step | None:
        """The next step a user cares about (probes are bookkeeping)."""
        return min((s for s in self.steps if s.kind != "probe"), key=lambda s: s.at, default=None)

    def due(self, now: datetime) -> list[Step]:
        return sorted((s for s in self.steps if s.at <= now), key=lambda s: s.at)


def _t(value: datetime | None) -> datetime | None:
    return as_utc(value) if value else None


def idle_deadline(inst: Instance) -> datetime:
    """Last sign of activity plus the idle window, or the end of a /gpu keep if later."""
    last = _t(inst.last_activity_at) or _t(inst.started_at) or as_utc(inst.created_at)
    deadline = last + timedelta(seconds=inst.idle_window_s)
    keep = _t(inst.keep_until)
    return max(deadline, keep) if keep else deadline


def plan(inst: Instance, *, probe_interval: timedelta = PROBE_INTERVAL) -> Plan:
    p = Plan()
    state = inst.state_enum
    action = inst.idle_action
    window = timedelta(seconds=inst.idle_window_s)
    lead = timedelta(seconds=inst.warn_lead_s)
    if state in WATCHED:
        p.guards.append(GuardState("idle", True, f"{action} after {_mins(window)} without activity"))
        if state is InstanceState.RUNNING:
            deadline = idle_deadline(inst)
            if lead and inst.idle_warned_at is None:
                p.steps.append(Step(deadline - lead, "warn_idle", f"warn ({action} in {_mins(lead)})"))
            p.steps.append(Step(deadline, "idle", f"{action} (idle)"))
        last_probe = _t(inst.guard_checked_at) or _t(inst.started_at) or as_utc(inst.created_at)
        # booting or running: look again soon (state changes arm the idle guard; activity is sampled)
        p.steps.append(Step(last_probe + probe_interval, "probe", "check activity"))
    else:
        p.guards.append(GuardState("idle", False, "only while running"))

    if inst.max_lifetime_s:
        if state in WATCHED or state is InstanceState.STOPPING:
            end = as_utc(inst.created_at) + timedelta(seconds=inst.max_lifetime_s)
            if lead and inst.lifetime_warned_at is None:
                p.steps.append(Step(end - lead, "warn_lifetime", f"warn ({action} at max lifetime)"))
            p.steps.append(Step(end, "lifetime", f"{action} (max lifetime)"))
            p.guards.append(GuardState("lifetime", True, f"{action} {_hours(inst.max_lifetime_s)} after boot"))
        else:
            p.guards.append(GuardState("lifetime", False, "only while up"))
    else:
        p.guards.append(GuardState("lifetime", False, "no max lifetime set"))

    stopped = state is InstanceState.STOPPED
    if inst.destroy_after_stopped_s:
        if stopped and inst.stopped_at:
            end = as_utc(inst.stopped_at) + timedelta(seconds=inst.destroy_after_stopped_s)
            keep = _t(inst.keep_until)
            end = max(end, keep) if keep else end
            if inst.stopped_warned_at is None:
                p.steps.append(Step(end - min(STOPPED_WARN_LEAD, timedelta(seconds=inst.destroy_after_stopped_s) / 2),
                                    "warn_stopped", "warn (destroy: stopped too long)"))
            p.steps.append(Step(end, "stopped", "destroy (stopped too long)"))
        p.guards.append(GuardState("stopped", stopped,
                                   f"destroy after {inst.destroy_after_stopped_s / 86400:g} days stopped"))
    elif stopped and inst.stopped_at and inst.stopped_warned_at is None:
        p.steps.append(Step(as_utc(inst.stopped_at) + STOPPED_NUDGE_AFTER, "nudge", "remind: storage still billed"))
        p.guards.append(GuardState("stopped", True, f"reminder after {STOPPED_NUDGE_AFTER.days} days stopped"))
    return p


def replan(inst: Instance, *, probe_interval: timedelta = PROBE_INTERVAL) -> None:
    """Store the earliest step so the scheduler wakes for it (None: nothing to watch)."""
    inst.next_guard_at = None if inst.state_enum.is_final else plan(inst, probe_interval=probe_interval).next_at


def _mins(td: timedelta) -> str:
    seconds = int(td.total_seconds())
    if seconds < 60:
        return f"{seconds} s"
    m = seconds // 60
    return f"{m} min" if m < 120 else f"{m / 60:g} h"


def _hours(seconds: int) -> str:
    return f"{seconds / 3600:g} h"
