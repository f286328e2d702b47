"""Power and care of one machine: start, stop, destroy, keep, activity pings. Each is a claimed
transition (core.lifecycle) around one provider call, idempotent per key and per actor, with
capabilities and permissions checked before the provider is asked (core.views.allowed).

- A claim lost to a concurrent change is a Conflict, except when the same idempotency key is in
  flight (a double click, a retried delivery): then the first call's answer is awaited and given.
- A provider that refuses leaves the row as it was (the claim is undone) and says in what state
  the machine is left; a destroy that failed but whose machine is gone anyway counts as done.
- A stop or destroy ends any boot or start still waiting for readiness.
- Notices are written in the transaction of the change; a guard phrases its own (`tell`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import update
from sqlmodel import Session, col

from .actions import Op
from .auth import Actor, system_actor
from .booting import confirmation
from .clock import Clock, as_utc
from .confirmations import ConfirmationStore
from .costs import current_micros
from .db import Database
from .errors import Conflict, GpuherdError, InvalidInput, PermissionDenied, ProviderError
from .guard_plan import replan
from .lifecycle import Lifecycle, earlier_use, get_instance
from .models import (
    ActionRecord,
    Activity,
    Instance,
    InstanceState,
    OperationRecord,
    Role,
)
from .money import from_micros, usd
from .notify import NotifierHub
from .operations import Operations
from .outbox import NoticeDraft
from .providers.base import Capabilities, Provider, ProviderState
from .providers.registry import ProviderRegistry
from .results import (
    ActivityResult,
    Confirmation,
    ConfirmReason,
    DestroyResult,
    KeepResult,
    Money,
    StartResult,
    StopResult,
)
from .retry import provider_call
from .sync import InstanceSync
from .telemetry import TELEMETRY
from .templates import format_duration, parse_duration
from .text import clip
from .views import allowed, build_views

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")
DEFAULT_KEEP = timedelta(hours=1)
MAX_KEEP = timedelta(days=7)
Tell = Callable[[Session, Instance, Any], NoticeDraft]   # (session, row, result) -> the notice to write


class Power:
    def __init__(self, db: Database, clock: Clock, providers: ProviderRegistry, lifecycle: Lifecycle,
                 sync: InstanceSync, operations: Operations, confirmations: ConfirmationStore, hub: NotifierHub,
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.db = db
        self.clock = clock
        self.providers = providers
        self.lifecycle = lifecycle
        self.sync = sync
        self.operations = operations
        self.confirmations = confirmations
        self.hub = hub
        self._sleep = sleep

    async def stop_unhealthy(self, instance_id: str) -> str:
        """A machine whose model server never answered: stopped so it bills no compute."""
        actor = system_actor("boot")
        inst = await self.db.run(lambda s: get_instance(s, instance_id))
        caps = self.providers.get(inst.provider).capabilities
        if caps.can_stop:
            stopped = await self.stop(actor, instance_id, idempotency_key=f"boot-timeout:{instance_id}:{inst.version}")
            cost = usd(stopped.session_cost)
            return (f"it was stopped so it bills no compute (session cost {cost}; its disk bills "
                    f"{usd(stopped.storage.per_day)}/day until destroyed)")
        if caps.can_destroy:
            done = await self.destroy(actor, instance_id, confirmed=True,
                                      idempotency_key=f"boot-timeout:{instance_id}:{inst.version}")
            assert isinstance(done, DestroyResult)  # confirmed: it never asks
            return f"it was destroyed (total cost {usd(done.total_cost)})"
        return "it keeps running: its provider can neither stop nor destroy it from here"

    # --- start / stop / destroy ----------------------------------------------------------
    def _for_action(self, s: Session, actor: Actor, instance_id: str, op: Op) -> Instance:
        inst = get_instance(s, instance_id)
        caps = self.providers.get(inst.provider).capabilities if inst.provider in self.providers else Capabilities()
        why = allowed(actor, inst, op, caps)
        if why:
            raise PermissionDenied(why) if "belongs to" in why or "viewer" in why else Conflict(why)
        return inst

    def _replay(self, s: Session, actor: Actor, key: str | None, action: str, instance_id: str,
                model: type[R]) -> R | None:
        if not key:
            return None
        iid = get_instance(s, instance_id).id
        rec = earlier_use(s, actor, key, action=action, instance_id=iid)
        if not isinstance(rec, ActionRecord):
            rec = s.get(ActionRecord, f"{action}:{key}")   # recorded before keys were per request
            if rec is None or rec.actor != actor.principal or rec.instance_id != iid:
                return None
        return model.model_validate_json(rec.result)

    def _remember(self, s: Session, key: str | None, action: str, actor: Actor, instance_id: str,
                  result: BaseModel) -> None:
        if key:
            s.add(ActionRecord(key=key, action=action, actor=actor.principal, instance_id=instance_id,
                               result=result.model_dump_json(), created_at=self.clock.now()))

    async def _first_answer(self, actor: Actor, key: str | None, action: str, instance_id: str,
                            model: type[R]) -> R | None:
        """The same key in flight elsewhere (a double click): wait briefly for its answer."""
        if not key:
            return None
        for _ in range(100):
            found = await self.db.run(lambda s: self._replay(s, actor, key, action, instance_id, model))
            if found is not None:
                return found
            await asyncio.sleep(0.05)
        return None

    async def _at_provider(self, actor: Actor, inst: Instance, action: str, call: Callable[[], Awaitable[object]],
                           *, revert_to: str, still: str,
                           done_anyway: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Run a claimed action at the provider, retrying where safe. On failure the claim is
        undone, the failure audited, and the user told what state the machine is left in."""
        try:
            await provider_call(self.providers.get(inst.provider), call, sleep=self._sleep,
                                what=f"{action} {inst.id}")
        except GpuherdError as exc:
            if done_anyway is not None and await done_anyway():
                return
            message = exc.message
            await self.db.run(lambda s: self.lifecycle.revert(s, actor, inst.id, action, revert_to, message,
                                                              self.clock.now()))
            raise ProviderError(inst.provider, f"{action} of {inst.id} failed: {message}. {still}") from None
        finally:
            self.sync.forget_listings()

    async def _claim(self, claim: Callable[[Session], T], actor: Actor, key: str | None, action: str,
                     instance_id: str, model: type[R], guess: str = "") -> T | R:
        """Run a transition's claim: a lost version race is tried again on a fresh read (see
        `_Lost`); a claim that still loses answers with the first request's result when the
        same key is in flight (a double click), else refuses."""
        for attempt in range(CLAIM_TRIES):
            try:
                return await self.db.run(claim)
            except _Lost:
                if attempt < CLAIM_TRIES - 1:
                    continue
                lost: _Changed = _Changed(instance_id)
            except _Changed as exc:
                lost = exc
            break
        found = await self._first_answer(actor, key, action, instance_id, model)
        if found is not None:
            return found
        raise Conflict(f"{lost.instance_id} changed while you asked{f' {guess}' if guess else ''}; "
                       "look at its status.")

    async def stop(self, actor: Actor, instance_id: str, *, idempotency_key: str | None = None,
                   tell: Tell | None = None) -> StopResult:
        """Stop (disk kept, storage still billed); reports the session's cost. `tell` (guards)
        phrases the notice, written in the stop's own transaction."""
        now = self.clock.now()

        def claim(s: Session) -> StopResult | tuple[Instance, str]:
            replay = self._replay(s, actor, idempotency_key, "stop", instance_id, StopResult)
            if replay:
                return replay
            inst = self._for_action(s, actor, instance_id, Op.STOP)
            state = inst.state_enum
            if state is InstanceState.STOPPED:
                since = as_utc(inst.stopped_at).strftime("%Y-%m-%d %H:%M UTC") if inst.stopped_at else "earlier"
                raise Conflict(f"{inst.id} is already stopped (since {since}); it is billed only for storage. "
                               "Destroying it ends that too.")
            if state.is_final:
                raise Conflict(f"{inst.id} is {state.value}; there is nothing to stop.")
            if state in (InstanceState.PENDING, InstanceState.STOPPING, InstanceState.DESTROYING):
                if idempotency_key and state is InstanceState.STOPPING:
                    raise _Changed(inst.id)   # the same request in flight (a double click): its answer
                raise Conflict(f"{inst.id} is {state.value}; try again in a moment.")
            previous = inst.state
            if not self.lifecycle.claim(s, inst, InstanceState.STOPPING, now):
                raise _Lost(inst.id)
            return inst, previous
        got = await self._claim(claim, actor, idempotency_key, "stop", instance_id, StopResult,
                                "(another stop or start?)")
        if isinstance(got, StopResult):
            return got
        inst, previous = got
        provider = self.providers.get(inst.provider)
        await self._at_provider(actor, inst, "stop", lambda: provider.stop(inst.provider_id or ""),
                                revert_to=previous, still="It is still running and billing; try again or destroy it.")
        now = self.clock.now()

        def finish(s: Session) -> tuple[StopResult, NoticeDraft | None]:
            row, cost, seconds = self.lifecycle.stopped(
                s, actor, inst.id, storage_bills=provider.capabilities.storage_bills_while_stopped, now=now)
            self._end_operations(s, row.id, now)
            view = build_views(s, [row], now, actor, self.providers.capabilities())[0]
            result = StopResult(instance=view, session_cost=cost, session_s=seconds,
                                storage=Money.of(from_micros(row.storage_dph_micros)), simulated=row.simulated)
            return self._settled(s, actor, row, result, idempotency_key, "stop", tell, "stopped",
                                 f"session cost {usd(cost)}", now)
        return await self._told(await self.db.run(finish), now)

    def _settled(self, s: Session, actor: Actor, row: Instance, result: R, key: str | None, action: str,
                 tell: Tell | None, verb: str, cost_words: str, now: datetime) -> tuple[R, NoticeDraft | None]:
        """The end of a stop or destroy, in its transaction: the answer a repeated key gets, the
        notice (a system actor without `tell` reports its own action), one commit."""
        self._remember(s, key, action, actor, row.id, result)
        draft = _notice(s, actor, row, result, tell, verb, cost_words)
        if draft is not None:
            self.lifecycle.notify(s, now, draft)
        s.commit()
        return result, draft

    async def _told(self, done: tuple[R, NoticeDraft | None], now: datetime) -> R:
        result, draft = done
        if draft is not None:
            await self.hub.publish_draft(draft, now)
        return result

    def _end_operations(self, s: Session, instance_id: str, now: datetime) -> None:
        """A stop or destroy ends any boot or start still waiting for readiness."""
        s.execute(update(OperationRecord).where(col(OperationRecord.instance_id) == instance_id,
                                                col(OperationRecord.state) == "running")
                  .values(state="failed", finished_at=now, updated_at=now, message="stopped before it was ready"))

    async def start(self, actor: Actor, instance_id: str, *, idempotency_key: str | None = None) -> StartResult:
        """Resume a stopped instance. Returns once the provider accepted; `operation_id` follows
        it to its health check (`wait` does that before returning)."""
        now = self.clock.now()

        def claim(s: Session) -> StartResult | Instance:
            replay = self._replay(s, actor, idempotency_key, "start", instance_id, StartResult)
            if replay:
                return replay
            inst = self._for_action(s, actor, instance_id, Op.START)
            state = inst.state_enum
            if state in (InstanceState.RUNNING, InstanceState.STARTING, InstanceState.LOADING,
                         InstanceState.PROVISIONING):
                if idempotency_key and state is InstanceState.STARTING:
                    raise _Changed(inst.id)
                raise Conflict(f"{inst.id} is already {state.value}.")
            if state is not InstanceState.STOPPED:
                raise Conflict(f"{inst.id} is {state.value}; only a stopped instance can be started.")
            if not self.lifecycle.claim(s, inst, InstanceState.STARTING, now):
                raise _Lost(inst.id)
            return inst
        got = await self._claim(claim, actor, idempotency_key, "start", instance_id, StartResult)
        if isinstance(got, StartResult):
            return got
        inst = got
        provider = self.providers.get(inst.provider)
        await self._at_provider(actor, inst, "start", lambda: provider.start(inst.provider_id or ""),
                                revert_to=InstanceState.STOPPED.value, still="It is still stopped.")
        now = self.clock.now()

        def finish(s: Session) -> StartResult:
            row = self.lifecycle.started(s, actor, inst.id, now)
            op = self.operations.open(s, "start", row, actor.principal, now)
            view = build_views(s, [row], now, actor, self.providers.capabilities())[0]
            result = StartResult(instance=view.model_copy(update={"operation_id": op.id}), operation_id=op.id,
                                 ready=False, waited_s=0, simulated=row.simulated)
            self._remember(s, idempotency_key, "start", actor, row.id, result)
            s.commit()
            return result
        result = await self.db.run(finish)
        self.operations.changed()
        return result

    async def destroy(self, actor: Actor, instance_id: str, *, confirmed: bool = False,
                      idempotency_key: str | None = None, tell: Tell | None = None) -> DestroyResult | Confirmation:
        """Destroy (no further charges). Without `confirmed` it asks (a stored confirmation)."""
        now = self.clock.now()

        def claim(s: Session) -> DestroyResult | Confirmation | tuple[Instance, str]:
            replay = self._replay(s, actor, idempotency_key, "destroy", instance_id, DestroyResult)
            if replay:
                return replay
            inst = self._for_action(s, actor, instance_id, Op.DESTROY)
            state = inst.state_enum
            if state.is_final:
                raise Conflict(f"{inst.id} is already {state.value}.")
            if state is InstanceState.DESTROYING:
                if idempotency_key:
                    raise _Changed(inst.id)
                raise Conflict(f"{inst.id} is being destroyed already.")
            if not confirmed:
                issued = self.confirmations.create(s, actor, operation="destroy", reason=ConfirmReason.DESTROY.value,
                                                   args={"key": idempotency_key or ""}, secrets=None,
                                                   accepted_dph=None, instance_id=inst.id)
                s.commit()
                billing = Money.of(from_micros(current_micros(inst)))
                ends = (f"billing of {usd(billing.per_hour, 3)}/h ({usd(billing.per_day)}/day, "
                        f"{usd(billing.per_month)}/month) ends" if billing.per_hour > 0 else "nothing is billed now")
                return confirmation(
                    issued.token, issued.expires_at, "destroy", ConfirmReason.DESTROY, f"Destroy {inst.id}?",
                    f"Destroy {inst.id} ({inst.template}, {inst.gpu_name} x{inst.num_gpus} on {inst.provider})? "
                    f"Its disk and everything on it are deleted; {ends}.", inst.id, billing, inst.simulated)
            previous = inst.state
            if not self.lifecycle.claim(s, inst, InstanceState.DESTROYING, now):
                raise _Lost(inst.id)
            return inst, previous
        got = await self._claim(claim, actor, idempotency_key, "destroy", instance_id, DestroyResult)
        if not isinstance(got, tuple):
            return got
        inst, previous = got
        provider = self.providers.get(inst.provider)
        if inst.provider_id:
            await self._at_provider(actor, inst, "destroy", lambda: provider.destroy(inst.provider_id or ""),
                                    revert_to=previous, still="It still exists and bills; try again.",
                                    done_anyway=lambda: _gone(provider, inst.provider_id or ""))
        now = self.clock.now()

        def finish(s: Session) -> tuple[DestroyResult, NoticeDraft | None]:
            row, total = self.lifecycle.destroyed(s, actor, inst.id, now)
            self._end_operations(s, row.id, now)
            view = build_views(s, [row], now, actor, self.providers.capabilities())[0]
            result = DestroyResult(instance=view, total_cost=total, simulated=row.simulated)
            return self._settled(s, actor, row, result, idempotency_key, "destroy", tell, "destroyed",
                                 f"total cost {usd(total)}", now)
        return await self._told(await self.db.run(finish), now)

    # --- keep / activity -----------------------------------------------------------------
    async def keep(self, actor: Actor, instance_id: str, duration: str | None = None) -> KeepResult:
        """Postpone idle shutdown (1 h by default, at most 7 days)."""
        span = parse_duration(duration) if duration else DEFAULT_KEEP
        if span <= timedelta(0):
            raise InvalidInput(f"Keep for how long? '{clip(duration or '', 20)}' is not a positive duration "
                               "(try 1h, 30m, 2d).")
        if span > MAX_KEEP:
            raise InvalidInput(f"Keep for at most {format_duration(MAX_KEEP)}; '{clip(duration or '', 20)}' is "
                               "longer. Idle machines cost money: ask again later.")
        now = self.clock.now()

        def work(s: Session) -> KeepResult:
            inst = self._for_action(s, actor, instance_id, Op.KEEP)
            until = Lifecycle.kept(s, actor, inst, now, span, format_duration(span))
            s.commit()
            view = build_views(s, [inst], now, actor, self.providers.capabilities())[0]
            return KeepResult(instance=view, until=until, simulated=inst.simulated)
        return await self.db.run(work)

    async def record_activity(self, actor: Actor, instance_id: str, source: str = "ping",
                              detail: str | None = None) -> ActivityResult:
        """An explicit sign of use (API ping, notebook heartbeat): the idle clock restarts."""
        actor.require(Role.MEMBER, "reporting activity")
        now = self.clock.now()

        def work(s: Session) -> ActivityResult:
            inst = get_instance(s, instance_id)
            if inst.state_enum.is_final:
                raise Conflict(f"{inst.id} is {inst.state}; activity is not recorded for it.")
            inst.last_activity_at = now
            inst.idle_warned_at = None
            inst.version += 1
            replan(inst)
            s.add(inst)
            s.add(Activity(instance_id=inst.id, ts=now, source=source[:32], detail=(detail or "")[:256]))
            s.commit()
            return ActivityResult(instance=build_views(s, [inst], now, actor, self.providers.capabilities())[0])
        return await self.db.run(work)


def _notice(s: Session, actor: Actor, row: Instance, result: Any, tell: Tell | None, verb: str,
            cost: str) -> NoticeDraft | None:
    """The notice a stop or destroy writes: the guard's own words (`tell`), none for another
    system actor (it reports its own action), else `<who> stopped g-7f3a: session cost $x`."""
    if tell is not None:
        return tell(s, row, result)
    if actor.source == "system":
        return None
    return NoticeDraft(kind=f"instance.{verb}", owner=row.owner, team=row.team, actor=actor.principal,
                       instance_id=row.id, simulated=row.simulated, text=f"{actor.name} {verb} {row.id}: {cost}")


class _Changed(GpuherdError):
    """A claim lost to another change (internal: turned into a Conflict or a replay)."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"{instance_id} changed")
        self.instance_id = instance_id


class _Lost(_Changed):
    """The row's version moved between reading and claiming it: often only the readiness
    watcher or a sync folding the provider's state in. The claim is tried again on a fresh
    read, which re-checks the state, so a real conflict still refuses."""


CLAIM_TRIES = 3


async def _gone(provider: Provider, provider_id: str) -> bool:
    """After a failed destroy: is the machine gone anyway? Unknown counts as no."""
    try:
        found = await TELEMETRY.counted(provider.name, lambda: provider.get(provider_id))()
    except GpuherdError:
        return False
    return found is None or found.state is ProviderState.DESTROYED


