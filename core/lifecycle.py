"""The instance lifecycle: every state change of a machine's record, with its billing segment,
audit event and notice written in one transaction. The service, the guards, the readiness
watcher and reconcile all move instances through these functions, so there is one copy of each
transition and no module reaches into another's private names.

Every function here is synchronous and takes the session: callers run it off the event loop
with `Database.run`, and decide when to commit (most functions commit themselves where the
transition is a claim that must be visible to other processes at once).

Decisions kept from the first service:
- A boot's intent row is committed before the provider is called; its key is the machine's
  label, so a crash between the create and our write leaves a row that reconcile can adopt.
- Recording a machine is exactly-once: a conditional UPDATE on `provider_id IS NULL` (a late
  create and a reconcile that found the machine first cannot both record it).
- A stop, start or destroy first claims the row (a version check) into a transitional state, so
  two processes or a double click never act on one machine twice.
- Folding what a provider reports never touches a transition we have in flight unless its claim
  is stale (its process died).
- `keep` on a stopped machine postpones only its destroy-after-stopped guard and records no
  activity (nobody used it); without that guard it is refused (`Lifecycle.kept`).
- Idempotency keys are checked against `names.KEY_PATTERN` before any lookup (`earlier_use`)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlmodel import Session, col

from . import audit as audit_log
from .auth import Actor, system_actor
from .clock import as_utc
from .db import rowcount
from .errors import Conflict, GpuherdError, NotFound, PermissionDenied
from .guard_plan import replan
from .ids import ID_RE, new_instance_id, normalise_instance_id
from .ledger import COMPUTE, STORAGE, Ledger
from .models import ActionRecord, Activity, Instance, InstanceState
from .money import from_micros, to_micros
from .names import check_idempotency_key
from .offers import Offer
from .outbox import NoticeDraft, Outbox
from .providers.base import ProviderInstance, ProviderState
from .templates import Template
from .text import clip

STALE_CLAIM = timedelta(minutes=10)   # a stop/destroy in flight longer than this died with its process

STATE_MAP = {
    ProviderState.PROVISIONING: InstanceState.PROVISIONING,
    ProviderState.LOADING: InstanceState.LOADING,
    ProviderState.RUNNING: InstanceState.RUNNING,
    ProviderState.STOPPING: InstanceState.STOPPING,
    ProviderState.STOPPED: InstanceState.STOPPED,
    ProviderState.STARTING: InstanceState.STARTING,
    ProviderState.DESTROYED: InstanceState.DESTROYED,
    ProviderState.ERROR: InstanceState.ERROR,
}
BILLED_AS_COMPUTE = frozenset({InstanceState.PROVISIONING, InstanceState.LOADING, InstanceState.RUNNING,
                               InstanceState.STARTING, InstanceState.STOPPING, InstanceState.ERROR})
FINAL_STATES = [st.value for st in InstanceState if st.is_final]


def request_hash(**parts: Any) -> str:
    """What a request asked for, hashed: the same idempotency key with another request is refused.
    Callers pass secrets masked (the hash is stored)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def get_instance(s: Session, instance_id: str) -> Instance:
    iid = normalise_instance_id(instance_id)
    inst = s.get(Instance, iid) if ID_RE.match(iid) else None
    if inst is None:
        raise NotFound(f"There is no instance '{clip(iid, 20)}' (ids look like g-7f3a).")
    return inst


def earlier_use(s: Session, actor: Actor, key: str, *, action: str, instance_id: str | None = None,
                fingerprint: str | None = None) -> Instance | ActionRecord | None:
    """The one rule for idempotency keys: a key belongs to one actor, one operation and one
    request. Returns what the key was used for when this is a retry of exactly that request (the
    boot's row, or the action's record), None when the key is new. Any other use is refused:
    another user's key reveals nothing; the same user's names what it was used for. A key that
    could not have been stored (a NUL, a space, over 200 characters) is refused before the lookup,
    so it fails alike on SQLite and PostgreSQL."""
    check_idempotency_key(key)
    booted = s.execute(select(Instance).where(col(Instance.idempotency_key) == key)).scalars().first()
    record = s.get(ActionRecord, key) if booted is None else None
    if booted is None and record is None:
        return None
    owner = booted.owner if booted is not None else record.actor if record is not None else None
    if owner != actor.principal:
        raise PermissionDenied("Someone else already made this request (the same idempotency key, or the same "
                               "button pressed first); nothing was done for you. A new request needs a new key.")
    if booted is not None:
        if action != "boot":
            raise Conflict(f"This idempotency key was already used to boot {booted.id}; use a new key for a new request.")
        if booted.request_hash and fingerprint and booted.request_hash != fingerprint:
            raise Conflict(f"This idempotency key was already used to boot {booted.id} ({booted.template}) "
                           "with other settings; use a new key for a new request.")
        return booted
    assert record is not None
    if record.action != action or record.instance_id != instance_id:
        raise Conflict(f"This idempotency key was already used to {record.action} {record.instance_id}; "
                       "use a new key for a new request.")
    return record


def fresh_id(s: Session) -> str:
    """A short id no row has: candidates are looked up one by one (ids are random, so the first
    is almost always free), never by reading every id in the table."""
    tried: set[str] = set()
    while True:
        candidate = new_instance_id(tried)
        if s.get(Instance, candidate) is None:
            return candidate
        tried.add(candidate)


def _seconds(td: timedelta | None) -> int | None:
    return int(td.total_seconds()) if td is not None else None


class Lifecycle:
    """Transitions of instance rows. Holds only what every transition needs: the outbox that
    notices go to (in the same transaction as the change they report)."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def notify(self, s: Session, now: datetime, draft: NoticeDraft) -> None:
        self.outbox.add(s, draft, now)

    # --- boot --------------------------------------------------------------------------------
    def write_intent(self, s: Session, actor: Actor, template: Template, offer: Offer, key: str,
                     cleaned: dict[str, Any], req_hash: str, now: datetime, *, commit: bool = True) -> Instance:
        """The intent row, committed before the provider is called. `commit=False`: the caller
        commits it together with what it adds (a detached boot's operation), one transaction
        instead of two and no re-read of the row after the first commit."""
        inst = Instance(id=fresh_id(s), idempotency_key=key, provider=offer.provider,
                        offer_id=offer.offer_id, owner=actor.principal, team=actor.team,
                        template=template.name, state=InstanceState.PENDING.value,
                        gpu_name=offer.gpu_name, num_gpus=offer.num_gpus, dph_micros=to_micros(offer.dph),
                        storage_dph_micros=to_micros(offer.storage_rate(template.disk_gb)),
                        disk_gb=template.disk_gb, simulated=offer.simulated,
                        overrides=json.dumps(cleaned), request_hash=req_hash,
                        idle_window_s=int(template.idle_window.total_seconds()),
                        warn_lead_s=int(template.warn_lead.total_seconds()), idle_action=template.idle_action,
                        max_lifetime_s=_seconds(template.max_lifetime),
                        destroy_after_stopped_s=_seconds(template.destroy_after_stopped),
                        created_at=now, updated_at=now)
        s.add(inst)
        if commit:
            s.commit()
        return inst

    def record_created(self, s: Session, actor: Actor, instance_id: str, offer: Offer, pinst: ProviderInstance,
                       template: Template, now: datetime) -> tuple[Instance, bool]:
        """Tie the intent row to the machine and start billing. Returns (row, whether this call
        recorded it). Exactly once (see the module docstring). Does not commit: the caller adds
        the operation and commits."""
        claimed = s.execute(update(Instance).where(
            col(Instance.id) == instance_id, col(Instance.provider_id).is_(None))
            .values(provider_id=pinst.provider_id))
        inst = s.get(Instance, instance_id, populate_existing=True)    # as the update left it
        if inst is None:
            raise NotFound(f"The boot record {instance_id} vanished.")
        if rowcount(claimed) != 1:
            s.rollback()
            s.refresh(inst)
            return inst, False
        inst.status_message = None
        inst.destroyed_at = None
        inst.provider = offer.provider
        inst.provider_id = pinst.provider_id
        inst.offer_id = offer.offer_id
        inst.gpu_name = pinst.gpu_name or offer.gpu_name
        inst.num_gpus = pinst.num_gpus or offer.num_gpus
        if pinst.dph:
            inst.dph_micros = to_micros(pinst.dph)
        if pinst.storage_dph:
            inst.storage_dph_micros = to_micros(pinst.storage_dph)
        inst.state = (STATE_MAP.get(pinst.state) or InstanceState.PROVISIONING).value
        inst.endpoint = pinst.endpoint
        inst.started_at = now
        inst.last_activity_at = now
        inst.ready_at = None
        inst.updated_at = now
        inst.version += 1
        replan(inst)
        s.add(inst)
        if inst.state == InstanceState.STOPPED.value:  # adopted after it was stopped
            inst.stopped_at = now
            if inst.storage_dph_micros:
                Ledger.open(s, inst, STORAGE, inst.storage_dph_micros, now)
        else:
            Ledger.open(s, inst, COMPUTE, inst.dph_micros, now)
        audit_log.record(s, actor, "boot", now=now, instance_id=inst.id, template=template.name,
                         provider=inst.provider, offer=offer.ref, gpu=f"{inst.gpu_name} x{inst.num_gpus}",
                         dph=str(from_micros(inst.dph_micros)), overrides=json.loads(inst.overrides))
        return inst, True

    def mark_failed(self, s: Session, actor: Actor, instance_id: str, error: GpuherdError | None,
                    now: datetime) -> bool:
        """Close an intent whose machine was never made. Never touches one whose machine was
        recorded meanwhile (a slow create that came back while reconcile gave up on it)."""
        message = (error.message if error else "create failed")[:500]
        failed = s.execute(update(Instance).where(
            col(Instance.id) == instance_id, col(Instance.provider_id).is_(None))
            .values(state=InstanceState.FAILED.value, status_message=message, updated_at=now,
                    next_guard_at=None, version=col(Instance.version) + 1))
        if rowcount(failed) != 1:
            s.rollback()
            return False
        inst = s.get(Instance, instance_id)
        audit_log.record(s, actor, "boot", now=now, instance_id=instance_id, ok=False,
                         template=inst.template if inst else None, error=message)
        s.commit()
        return True

    # --- claims ------------------------------------------------------------------------------
    @staticmethod
    def claim(s: Session, inst: Instance, to_state: InstanceState, now: datetime) -> bool:
        """Move to a transitional state only if nobody changed the row since we read it."""
        result = s.execute(update(Instance).where(col(Instance.id) == inst.id, col(Instance.version) == inst.version)
                           .values(state=to_state.value, version=inst.version + 1, updated_at=now))
        s.commit()
        if rowcount(result) == 1:
            inst.state = to_state.value
            inst.version += 1
            return True
        return False

    @staticmethod
    def revert(s: Session, actor: Actor, instance_id: str, action: str, to_state: str, error: str,
               now: datetime) -> None:
        """A claimed action the provider refused: the row goes back, the failure is audited."""
        row = get_instance(s, instance_id)
        row.state = to_state
        row.updated_at = now
        row.version += 1
        s.add(row)
        audit_log.record(s, actor, action, now=now, instance_id=instance_id, ok=False, error=error)
        s.commit()

    # --- stop / start / destroy ----------------------------------------------------------------
    @staticmethod
    def stopped(s: Session, actor: Actor, instance_id: str, *, storage_bills: bool,
                now: datetime) -> tuple[Instance, Any, int]:
        """The provider stopped it: compute ends, storage begins. Returns (row, session cost,
        session seconds). Does not commit."""
        inst = get_instance(s, instance_id)
        session_start = inst.started_at or inst.created_at
        Ledger.close(s, inst.id, now, COMPUTE)
        if storage_bills and inst.storage_dph_micros:
            Ledger.open(s, inst, STORAGE, inst.storage_dph_micros, now)
        inst.state = InstanceState.STOPPED.value
        inst.stopped_at = now
        inst.updated_at = now
        inst.ready_at = None
        inst.version += 1
        inst.stopped_warned_at = None
        replan(inst)
        s.add(inst)
        s.flush()
        cost = Ledger.instance_cost(s, inst.id, now, since=session_start, kind=COMPUTE)
        seconds = max(0, int((now - as_utc(session_start)).total_seconds()))
        audit_log.record(s, actor, "stop", now=now, instance_id=inst.id, cost=cost, session_s=seconds)
        return inst, cost, seconds

    @staticmethod
    def started(s: Session, actor: Actor, instance_id: str, now: datetime) -> Instance:
        """The provider accepted a start: storage ends, compute begins. Does not commit."""
        inst = get_instance(s, instance_id)
        Ledger.close(s, inst.id, now, STORAGE)
        Ledger.open(s, inst, COMPUTE, inst.dph_micros, now)
        inst.started_at = now
        inst.last_activity_at = now
        inst.ready_at = None
        inst.updated_at = now
        inst.version += 1
        inst.idle_warned_at = None
        replan(inst)
        s.add(inst)
        audit_log.record(s, actor, "start", now=now, instance_id=inst.id, dph=str(from_micros(inst.dph_micros)))
        return inst

    @staticmethod
    def kept(s: Session, actor: Actor, inst: Instance, now: datetime, span: timedelta, shown: str) -> datetime:
        """`keep`: postpone what the guards would do next to `inst` by `span` (`shown` is the span
        in words). A machine that is up is also marked used (the idle clock restarts). A stopped
        one is not in use: only its destroy-after-stopped guard is postponed, no activity is
        recorded, and one without that guard has nothing to keep (refused, nothing written).
        Returns the new `keep_until`. Does not commit."""
        state = inst.state_enum
        if state.is_final:
            raise Conflict(f"{inst.id} is {inst.state}; there is nothing to keep.")
        if state in (InstanceState.STOPPING, InstanceState.DESTROYING, InstanceState.PENDING):
            raise Conflict(f"{inst.id} is {inst.state}; there is nothing to keep yet.")
        if state is InstanceState.STOPPED and not inst.destroy_after_stopped_s:
            raise Conflict(f"{inst.id} is stopped and no guard will destroy it, so there is nothing to keep "
                           "(keeping postpones an idle stop). Start it to use it again.")
        until = now + span
        inst.keep_until = until
        inst.updated_at = now
        inst.version += 1
        inst.stopped_warned_at = None
        if state is not InstanceState.STOPPED:
            inst.last_activity_at = now
            inst.idle_warned_at = None
            s.add(Activity(instance_id=inst.id, ts=now, source="keep",
                           detail=f"by {actor.principal} for {shown}"[:256]))
        replan(inst)
        s.add(inst)
        audit_log.record(s, actor, "keep", now=now, instance_id=inst.id, until=until.isoformat())
        return until

    @staticmethod
    def destroyed(s: Session, actor: Actor, instance_id: str, now: datetime) -> tuple[Instance, Any]:
        """Gone: every charge ends. Returns (row, total cost). Does not commit."""
        inst = get_instance(s, instance_id)
        Ledger.close(s, inst.id, now)
        inst.state = InstanceState.DESTROYED.value
        inst.destroyed_at = now
        inst.updated_at = now
        inst.version += 1
        inst.next_guard_at = None
        s.add(inst)
        s.flush()
        total = Ledger.instance_cost(s, inst.id, now)
        audit_log.record(s, actor, "destroy", now=now, instance_id=inst.id, cost=total)
        return inst, total

    # --- what the provider says ----------------------------------------------------------------
    def apply_provider_state(self, s: Session, inst: Instance, pinst: ProviderInstance | None,
                             now: datetime) -> bool:
        """Fold what the provider reports into our record, billing any change it implies. Writes
        only when something changed; returns whether it did. Does not commit."""
        state = inst.state_enum
        if state.is_final or state is InstanceState.PENDING:
            return False
        in_flight = state in (InstanceState.STOPPING, InstanceState.DESTROYING)
        if in_flight and now - as_utc(inst.updated_at) < STALE_CLAIM:
            return False
        before = (inst.state, inst.endpoint, inst.status_message)
        if pinst is None or pinst.state is ProviderState.DESTROYED:
            Ledger.close(s, inst.id, now)
            inst.state = (InstanceState.LOST.value if state is not InstanceState.DESTROYING
                          else InstanceState.DESTROYED.value)
            inst.status_message = "gone at the provider"
            inst.destroyed_at = now
            audit_log.record(s, system_actor("sync"), "instance.lost", now=now, instance_id=inst.id,
                             provider=inst.provider, provider_id=inst.provider_id)
        else:
            new = STATE_MAP.get(pinst.state, state)
            if new is InstanceState.STOPPING:
                new = state if not in_flight else InstanceState.RUNNING  # billed as running until stopped
            if (state is InstanceState.STARTING and new is InstanceState.STOPPED
                    and now - as_utc(inst.updated_at) < STALE_CLAIM):
                return False  # our start was accepted; the provider has not caught up yet
            if new is InstanceState.RUNNING and state in (InstanceState.PROVISIONING, InstanceState.LOADING,
                                                          InstanceState.STARTING):
                # the idle clock starts when someone could first use it, not at the order
                last = as_utc(inst.last_activity_at) if inst.last_activity_at else None
                inst.last_activity_at = now if last is None or last < now else last
            was_compute = state in BILLED_AS_COMPUTE or in_flight
            if state is InstanceState.STOPPED and new in BILLED_AS_COMPUTE:
                # started outside gpuherd: storage ends, compute begins
                Ledger.close(s, inst.id, now, STORAGE)
                Ledger.open(s, inst, COMPUTE, inst.dph_micros, now)
                inst.started_at = now
            elif was_compute and new is InstanceState.STOPPED:
                # stopped outside gpuherd (or by a stop whose process died)
                Ledger.close(s, inst.id, now, COMPUTE)
                if inst.storage_dph_micros:
                    Ledger.open(s, inst, STORAGE, inst.storage_dph_micros, now)
                inst.stopped_at = now
                inst.ready_at = None
            inst.state = new.value
            inst.endpoint = pinst.endpoint or inst.endpoint
            inst.status_message = pinst.message
        if (inst.state, inst.endpoint, inst.status_message) == before:
            return False
        inst.updated_at = now
        inst.version += 1
        replan(inst)
        s.add(inst)
        return True

    # --- attach / adopt ------------------------------------------------------------------------
    def insert_found(self, s: Session, actor: Actor, provider: str, machine: ProviderInstance, *, owner: str,
                     team: str, template: str, key: str, idle: timedelta, warn: timedelta, simulated: bool,
                     event: str, now: datetime, tmpl: Template | None = None) -> Instance:
        """A machine made elsewhere, tracked and billed from now on (attach, or reconcile adopting
        a labelled machine it had no row for). Does not commit."""
        state = STATE_MAP.get(machine.state) or InstanceState.RUNNING
        inst = Instance(
            id=fresh_id(s), idempotency_key=key[:200], provider=provider,
            provider_id=machine.provider_id, offer_id=machine.offer_id, owner=owner, team=team,
            template=template, state=state.value, gpu_name=machine.gpu_name[:64], num_gpus=machine.num_gpus,
            dph_micros=to_micros(machine.dph), storage_dph_micros=to_micros(machine.storage_dph),
            endpoint=machine.endpoint, simulated=simulated, status_message=machine.message,
            idle_window_s=int(idle.total_seconds()), warn_lead_s=int(warn.total_seconds()),
            idle_action=tmpl.idle_action if tmpl else "stop",
            max_lifetime_s=_seconds(tmpl.max_lifetime) if tmpl else None,
            destroy_after_stopped_s=_seconds(tmpl.destroy_after_stopped) if tmpl else None,
            created_at=now, updated_at=now, started_at=now, last_activity_at=now,
            ready_at=now if state is InstanceState.RUNNING else None,
            stopped_at=now if state is InstanceState.STOPPED else None)
        replan(inst)
        s.add(inst)
        s.flush()
        if state in BILLED_AS_COMPUTE:
            Ledger.open(s, inst, COMPUTE, inst.dph_micros, now)
        elif state is InstanceState.STOPPED and inst.storage_dph_micros:
            Ledger.open(s, inst, STORAGE, inst.storage_dph_micros, now)
        audit_log.record(s, actor, event, now=now, instance_id=inst.id, provider=provider,
                         provider_id=machine.provider_id, label=machine.label, owner=owner,
                         dph=str(machine.dph), state=state.value)
        return inst
