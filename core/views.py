"""Instance rows as readers see them, with the next steps this reader may take.

`actions_for` is the one place that decides which buttons a person gets: by role (a viewer gets
none), ownership (a member acts on their own machines only; an admin on any), state, and what
the provider can do (no Destroy where the provider cannot destroy, no Start where it cannot
start). The service enforces the same rules when the action comes back (`allowed`), so a
button that should not have been there is refused anyway.

What the provider last said (`status_message`) and the endpoint are shown only while the
provider may still have the machine: a destroyed (or destroying) row keeps the last words it
heard, often "running", and showing them would tell a reader a gone machine still runs. A
failed or lost row keeps its message, which is the reason (see `shown_message`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select
from sqlmodel import Session, col

from .actions import Action, Op, Style, act
from .auth import Actor
from .clock import as_utc
from .guard_plan import plan as guard_plan
from .ledger import Ledger
from .lifecycle import BILLED_AS_COMPUTE
from .models import Instance, InstanceState, OperationRecord, Role
from .money import HOURS_PER_DAY, from_micros
from .providers.base import Capabilities
from .results import GuardInfo, InstanceView

UP = (InstanceState.RUNNING, InstanceState.LOADING, InstanceState.PROVISIONING, InstanceState.STARTING)
GONE = (InstanceState.DESTROYING, InstanceState.DESTROYED)   # what the provider said no longer holds


def shown_message(state: InstanceState, message: str | None) -> str | None:
    """The status message a reader sees: for a destroyed machine the fact, not the provider's
    stale last words; a failed boot's or a lost machine's message is its reason and stays."""
    if state is InstanceState.DESTROYED:
        return "destroyed; nothing is billed any more"
    if state is InstanceState.DESTROYING:
        return "being destroyed"
    return message


def allowed(actor: Actor, inst: Instance, op: Op, caps: Capabilities) -> str | None:
    """Why `actor` may not do `op` to `inst` now, or None when they may. The reasons are
    sentences fit to show; the service raises them as errors."""
    if op in (Op.STATUS, Op.COSTS):
        return None
    if not actor.at_least(Role.MEMBER):
        return f"You ({actor.name}) are a viewer; changing instances needs the member role."
    if not actor.may_act_on(inst):
        return (f"{inst.id} belongs to {inst.owner}; members may only change their own instances. "
                "Ask its owner or an admin.")
    if op is Op.DESTROY and not caps.can_destroy:
        return f"{inst.provider} machines cannot be destroyed by gpuherd; delete it in the provider's portal."
    if op is Op.STOP and not caps.can_stop:
        return f"{inst.provider} cannot stop machines (only destroy them)."
    if op is Op.START and not caps.can_start:
        return f"{inst.provider} machines cannot be started by gpuherd."
    return None


def actions_for(actor: Actor, inst: Instance, caps: Capabilities) -> list[Action]:
    """The next steps offered to `actor` on this instance, most useful first."""
    state = inst.state_enum
    wanted: list[Action] = []
    if state in UP:
        wanted = [act(Op.KEEP, inst.id, duration="1h"), act(Op.STOP, inst.id, style=Style.PRIMARY),
                  act(Op.DESTROY, inst.id, style=Style.DANGER, confirm=True)]
    elif state is InstanceState.STOPPED:
        wanted = [act(Op.START, inst.id, style=Style.PRIMARY),
                  act(Op.DESTROY, inst.id, style=Style.DANGER, confirm=True)]
    elif state is InstanceState.ERROR:
        wanted = [act(Op.DESTROY, inst.id, style=Style.DANGER, confirm=True)]
    return [a for a in wanted if allowed(actor, inst, a.op, caps) is None]


def build_views(s: Session, rows: Sequence[Instance], now: datetime, actor: Actor | None,
                caps: dict[str, Capabilities]) -> list[InstanceView]:
    """Views of many rows with two queries (accrued costs, open operations), whatever their number."""
    ids = [r.id for r in rows]
    accrued = Ledger.costs_by_instance(s, ids, now)
    ops: dict[str, str] = {}
    if ids:
        for op_id, iid in s.execute(select(col(OperationRecord.id), col(OperationRecord.instance_id)).where(
                col(OperationRecord.instance_id).in_(ids), col(OperationRecord.state) == "running")):
            ops[iid] = op_id
    default = Capabilities()
    return [_view(inst, now, accrued.get(inst.id, Decimal(0)), ops.get(inst.id), actor,
                  caps.get(inst.provider, default)) for inst in rows]


def fresh_view(inst: Instance, now: datetime, operation_id: str, actor: Actor | None,
               caps: dict[str, Capabilities]) -> InstanceView:
    """The view of a row written in this unit of work (an intent, or a machine just recorded):
    nothing has accrued yet and its one open operation is known, so neither of `build_views`'
    queries is needed (a burst of boots answers each 202, and records each machine, sooner)."""
    return _view(inst, now, Decimal(0), operation_id, actor, caps.get(inst.provider, Capabilities()))


def _view(inst: Instance, now: datetime, accrued: Decimal, operation_id: str | None, actor: Actor | None,
          caps: Capabilities) -> InstanceView:
    state = inst.state_enum
    up = state in BILLED_AS_COMPUTE
    current = (from_micros(inst.dph_micros) if up else
               from_micros(inst.storage_dph_micros) if state is InstanceState.STOPPED else Decimal(0))
    started = as_utc(inst.started_at) if inst.started_at else None
    gp = guard_plan(inst)
    nxt = gp.next_action
    last = as_utc(inst.last_activity_at) if inst.last_activity_at else started
    keep = as_utc(inst.keep_until) if inst.keep_until else None
    return InstanceView(
        id=inst.id, provider=inst.provider, provider_id=inst.provider_id, owner=inst.owner,
        team=inst.team, template=inst.template, state=state, gpu_name=inst.gpu_name,
        num_gpus=inst.num_gpus, dph=from_micros(inst.dph_micros),
        storage_dph=from_micros(inst.storage_dph_micros), current_dph=current,
        current_per_day=current * HOURS_PER_DAY, accrued=accrued,
        uptime_s=int((now - started).total_seconds()) if up and started else None,
        idle_for_s=int((now - last).total_seconds()) if up and last else None,
        keep_until=keep if keep and keep > now else None,
        endpoint=None if state in GONE or state.is_final else inst.endpoint,
        ready=inst.ready_at is not None and state is InstanceState.RUNNING,
        created_at=as_utc(inst.created_at),
        stopped_at=as_utc(inst.stopped_at) if inst.stopped_at and state is InstanceState.STOPPED else None,
        message=shown_message(state, inst.status_message), simulated=inst.simulated,
        next_action=nxt.text if nxt else None, next_action_at=nxt.at if nxt else None,
        guards=[GuardInfo(name=g.name, armed=g.armed, detail=g.detail) for g in gp.guards],
        guard_error=inst.guard_error, activity=inst.activity_status, activity_detail=inst.activity_detail,
        operation_id=operation_id, observed_at=now,
        actions=actions_for(actor, inst, caps) if actor is not None else [])
