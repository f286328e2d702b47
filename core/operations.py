"""Long work as records: a boot or a start returns as soon as the provider accepted the machine,
and its progress is an operation any process can follow.

- `open` writes the operation (and its first event) in the transaction that records the machine.
- `check` is one readiness step for one operation: ask the provider, fold its state in, probe the
  model server's health path. A healthy machine ends the operation with `instance.ready`; one
  not healthy by the deadline (`boot_timeout_s`) ends it with `boot.failed`, and the machine is
  STOPPED (or destroyed where the provider cannot stop) so a server that never came up does not
  bill compute all weekend; the owner is told what it cost and offered Start and Destroy.
- The readiness watcher (`watch_once`, run by the process holding the guard lock) checks every
  running operation with bounded concurrency. A follower in a process without a watcher (a
  one-shot CLI command, a test) drives the checks of the one operation it waits for itself.
  Either way each ending is claimed with a conditional UPDATE (`state = 'running'`), so two
  processes checking one operation end it once.
- Events are rows (`operation_events`, unique per operation and sequence number), so an HTTP
  client in one replica can follow a boot whose watcher runs in another."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from .actions import Op, Style, act
from .clock import Clock, as_utc
from .config import Settings
from .db import Database, rowcount
from .errors import GpuherdError
from .lifecycle import Lifecycle, get_instance
from .models import Instance, InstanceState, OperationEvent, OperationRecord
from .money import from_micros, rate
from .notify import NotifierHub
from .outbox import NoticeDraft
from .providers.base import ProviderInstance, ProviderState
from .providers.registry import ProviderRegistry
from .results import Phase, ProgressEvent
from .telemetry import TELEMETRY
from .templates import TemplateCatalog

log = logging.getLogger(__name__)
FINAL_EVENT_WAIT_S = 60.0          # how long a follower waits for the final event of an ended operation
WATCH_CONCURRENCY = 16

_PHASES = {InstanceState.PROVISIONING: Phase.PROVISIONING, InstanceState.LOADING: Phase.LOADING,
           InstanceState.STARTING: Phase.STARTING, InstanceState.RUNNING: Phase.RUNNING}

OnTimeout = Callable[[str], Awaitable[str]]   # stops (or destroys) a machine; returns what happened


def _event_model(op: OperationRecord, ev: OperationEvent) -> ProgressEvent:
    return ProgressEvent(operation_id=op.id, seq=ev.seq, instance_id=op.instance_id, phase=Phase(ev.phase),
                         provider_state=ev.provider_state, elapsed_s=ev.elapsed_s, text=ev.text, at=as_utc(ev.at))


class Operations:
    def __init__(self, settings: Settings, db: Database, clock: Clock, lifecycle: Lifecycle,
                 providers: ProviderRegistry, templates: TemplateCatalog, hub: NotifierHub,
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.lifecycle = lifecycle
        self.providers = providers
        self.templates = templates
        self.hub = hub
        self._sleep = sleep
        self.on_timeout: OnTimeout | None = None      # set by the service (it owns stop/destroy)
        self.watched_here = False                      # this process runs the readiness watcher
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    # --- records (sync, in the caller's session) -------------------------------------------
    def open(self, s: Session, kind: str, inst: Instance, actor: str, now: datetime) -> OperationRecord:
        """A new operation and its first event; committed with the caller's transaction."""
        op = OperationRecord(id=f"op-{uuid.uuid4().hex[:12]}", kind=kind, instance_id=inst.id, actor=actor,
                             state="running", phase=Phase.ACCEPTED.value, created_at=now, updated_at=now,
                             deadline_at=now + timedelta(seconds=self.settings.boot_timeout_s))
        s.add(op)
        verb = "Booting" if kind == "boot" else "Starting"
        self._add_event(s, op, Phase.ACCEPTED, None, now,
                        f"{verb} {inst.id} ({inst.template}) on {inst.provider}: {inst.gpu_name} "
                        f"x{inst.num_gpus}, {rate(from_micros(inst.dph_micros))}")
        return op

    def ordered(self, s: Session, operation_id: str, inst: Instance, now: datetime) -> None:
        """A detached boot's provider accepted the machine: say so (the caller commits)."""
        op = s.get(OperationRecord, operation_id)
        if op is not None and op.state == "running":
            self._add_event(s, op, Phase.PROVISIONING, inst.state, now,
                            f"{inst.id}: {inst.provider} accepted the order ({inst.gpu_name} x{inst.num_gpus})")

    async def fail(self, operation_id: str, text: str) -> bool:
        """End an operation as failed from outside the watcher (a detached boot whose provider
        refused): the final event and the owner's notice, exactly once."""
        return await self._end(operation_id, ok=False, text=text, provider_state=None)

    @staticmethod
    def _add_event(s: Session, op: OperationRecord, phase: Phase, provider_state: str | None, now: datetime,
                   text: str) -> OperationEvent:
        op.last_seq += 1
        op.phase = phase.value
        op.updated_at = now
        elapsed = max(0.0, (now - as_utc(op.created_at)).total_seconds())
        ev = OperationEvent(operation_id=op.id, seq=op.last_seq, at=now, phase=phase.value,
                            provider_state=provider_state, elapsed_s=round(elapsed, 1), text=text[:512])
        s.add(op)
        s.add(ev)
        return ev

    async def events(self, operation_id: str, after: int = 0) -> list[ProgressEvent]:
        def read(s: Session) -> list[ProgressEvent]:
            op = s.get(OperationRecord, operation_id)
            if op is None:
                return []
            rows = s.execute(select(OperationEvent).where(
                col(OperationEvent.operation_id) == operation_id, col(OperationEvent.seq) > after)
                .order_by(col(OperationEvent.seq))).scalars()
            return [_event_model(op, ev) for ev in rows]
        return await self.db.run(read)

    async def get(self, operation_id: str) -> OperationRecord | None:
        return await self.db.run(lambda s: s.get(OperationRecord, operation_id))

    def changed(self) -> None:
        """Wake followers in this process: an event was just written (and committed)."""
        self._changed.set()
        for fn in list(self._listeners):
            fn()

    def listen(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn` whenever `changed()` is (an event stream reads its feed at once instead of
        at its next poll; events written by another replica still arrive by that poll). `fn`
        must be quick and must not raise. Returns the function that unregisters it."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    async def follow(self, operation_id: str, *, drive: bool | None = None,
                     timeout_s: float | None = None) -> AsyncIterator[ProgressEvent]:
        """The operation's events, from the first, until it ends (or `timeout_s` of real time
        passes: the operation goes on, only this follower stops)."""
        drive = (not self.watched_here) if drive is None else drive
        seen = 0
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s if timeout_s is not None else None
        ended_at: float | None = None
        while True:
            if drive and ended_at is None:
                await self.check(operation_id)
            for ev in await self.events(operation_id, seen):
                seen = ev.seq
                yield ev
                if ev.final:
                    return
            op = await self.get(operation_id)
            if op is None:
                return
            if op.state != "running" and seen < op.last_seq:
                continue                   # its last events landed since we read: read them
            if until is not None and loop.time() >= until:
                return
            if op.state != "running":
                # claimed as ended, its final event not written yet: the claimer writes it once
                # its own work is done (a timed-out boot stops the machine first)
                if ended_at is None:
                    ended_at = loop.time()
                elif loop.time() - ended_at > FINAL_EVENT_WAIT_S:
                    log.warning("operation %s ended without a final event", operation_id)
                    return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=self.settings.poll_interval_s)
            except TimeoutError:
                pass
            await self._sleep(0)

    # --- one readiness step ------------------------------------------------------------------
    async def check(self, operation_id: str) -> bool:
        """One step; True when the operation has ended (now or before)."""
        loaded = await self.db.run(lambda s: _load(s, operation_id))
        if loaded is None:
            return True
        op, inst = loaded
        if op.state != "running":
            return True
        state = inst.state_enum
        if state is InstanceState.PENDING:
            # a detached boot still waiting for its provider: that task (or, after a crash,
            # resolve_pending and reconcile) ends it; the health clock starts once there is a machine
            return False
        if state.is_final or state in (InstanceState.STOPPED, InstanceState.STOPPING, InstanceState.DESTROYING,
                                       InstanceState.ERROR):
            return await self._end(op.id, ok=False, text=_never_ready(inst), provider_state=state.value)
        provider = self.providers.get(inst.provider)
        pinst: ProviderInstance | None = None
        try:
            pinst = await TELEMETRY.counted(provider.name, lambda: provider.get(inst.provider_id or ""))()
        except GpuherdError as exc:
            log.info("readiness of %s: %s did not answer: %s", inst.id, inst.provider, exc.message)
            return await self._maybe_time_out(op, inst)
        now = self.clock.now()

        def fold(s: Session) -> Instance:
            row = get_instance(s, inst.id)
            self.lifecycle.apply_provider_state(s, row, pinst, now)
            s.commit()
            return row
        inst = await self.db.run(fold)
        state = inst.state_enum
        if pinst is not None and pinst.state is ProviderState.RUNNING and state is InstanceState.RUNNING:
            template = self.templates.find(inst.template)
            path = template.health_path if template else None
            port = template.health_port if template else None
            try:
                healthy = await provider.health(pinst, path, port)
            except Exception:  # a probe that fails is not healthy; it is never fatal
                log.info("health probe of %s failed", inst.id, exc_info=True)
                healthy = False
            if healthy:
                return await self._end(op.id, ok=True, text=f"{inst.id}: healthy", provider_state=state.value)
        if state.is_final or state in (InstanceState.STOPPED, InstanceState.ERROR):
            return await self._end(op.id, ok=False, text=_never_ready(inst), provider_state=state.value)
        phase = _PHASES.get(state)
        if phase is not None and phase.value != op.phase:
            await self._progress(op.id, phase, state.value, f"{inst.id}: {state.value}")
        return await self._maybe_time_out(op, inst)

    async def _progress(self, operation_id: str, phase: Phase, provider_state: str | None, text: str) -> None:
        now = self.clock.now()

        def write(s: Session) -> None:
            op = s.get(OperationRecord, operation_id)
            if op is None or op.state != "running" or op.phase == phase.value:
                return
            self._add_event(s, op, phase, provider_state, now, text)
            try:
                s.commit()
            except IntegrityError:  # another process wrote this step first
                s.rollback()
        await self.db.run(write)
        self.changed()

    async def _maybe_time_out(self, op: OperationRecord, inst: Instance) -> bool:
        if self.clock.now() < as_utc(op.deadline_at):
            return False
        limit = int(self.settings.boot_timeout_s)
        claimed = await self._claim_end(op.id, "failed")
        if not claimed:
            return True
        what = "not handled"
        if self.on_timeout is not None:
            try:
                what = await self.on_timeout(inst.id)
            except GpuherdError as exc:
                what = f"could not be stopped ({exc.message}); it is still running and billing"
        text = f"{inst.id} did not pass its health check within {limit // 60 or 1} min: {what}."
        await self._finish(op.id, inst.id, ok=False, text=text, provider_state=inst.state)
        return True

    async def _claim_end(self, operation_id: str, state: str) -> bool:
        now = self.clock.now()

        def claim(s: Session) -> bool:
            done = s.execute(update(OperationRecord).where(
                col(OperationRecord.id) == operation_id, col(OperationRecord.state) == "running")
                .values(state=state, finished_at=now, updated_at=now))
            s.commit()
            return bool(rowcount(done))
        return await self.db.run(claim)

    async def _end(self, operation_id: str, *, ok: bool, text: str, provider_state: str | None) -> bool:
        loaded = await self.db.run(lambda s: _load(s, operation_id))
        if loaded is None:
            return True
        if not await self._claim_end(operation_id, "succeeded" if ok else "failed"):
            return True
        await self._finish(operation_id, loaded[1].id, ok=ok, text=text, provider_state=provider_state)
        return True

    async def _finish(self, operation_id: str, instance_id: str, *, ok: bool, text: str,
                      provider_state: str | None) -> None:
        """The final event, the instance's ready mark and the notice, in one transaction."""
        now = self.clock.now()

        def write(s: Session) -> NoticeDraft:
            op = s.get(OperationRecord, operation_id)
            inst = get_instance(s, instance_id)
            assert op is not None
            self._add_event(s, op, Phase.HEALTHY if ok else Phase.FAILED, provider_state, now, text)
            op.message = text[:512]
            if ok:
                inst.ready_at = now
                inst.updated_at = now
                s.add(inst)
                # the booter follows the operation itself (its progress ends with this), so the
                # ready notice is for the others: the owner if someone else booted it, the channel
                draft = NoticeDraft(
                    kind="instance.ready", level="info", owner=inst.owner, team=inst.team, instance_id=inst.id,
                    simulated=inst.simulated, actor=op.actor,
                    text=(f"{inst.id} ({inst.template}) is up and healthy"
                          + (f" at {inst.endpoint}" if inst.endpoint else "")
                          + f"; billing {rate(from_micros(inst.dph_micros))}."),
                    actions=[act(Op.KEEP, inst.id, duration="1h"), act(Op.STOP, inst.id, style=Style.PRIMARY)])
            else:
                stopped = inst.state_enum is InstanceState.STOPPED
                draft = NoticeDraft(
                    kind="boot.failed", level="error", owner=inst.owner, team=inst.team, instance_id=inst.id,
                    simulated=inst.simulated, actor=None, text=text,
                    actions=([act(Op.START, inst.id)] if stopped else [act(Op.STOP, inst.id, style=Style.PRIMARY)])
                    + ([act(Op.DESTROY, inst.id, style=Style.DANGER, confirm=True)]
                       if not inst.state_enum.is_final else []))
            self.lifecycle.notify(s, now, draft)
            s.commit()
            return draft
        draft = await self.db.run(write)
        self.changed()
        await self.hub.publish_draft(draft, now)

    # --- the watcher ---------------------------------------------------------------------------
    async def watch_once(self) -> int:
        """Check every running operation (bounded concurrency). Returns how many ended."""
        ids = await self.db.run(lambda s: list(s.execute(select(col(OperationRecord.id)).where(
            col(OperationRecord.state) == "running").order_by(col(OperationRecord.created_at))).scalars()))
        if not ids:
            return 0
        gate = asyncio.Semaphore(WATCH_CONCURRENCY)

        async def one(op_id: str) -> bool:
            async with gate:
                try:
                    return await self.check(op_id)
                except Exception:  # one broken operation must not stop the others
                    log.exception("readiness check of %s failed", op_id)
                    return False
        ended = await asyncio.gather(*(one(i) for i in ids))
        return sum(1 for e in ended if e)

    async def run(self, stop: asyncio.Event, is_leader: Callable[[], bool]) -> None:
        """The watcher loop of a runtime: checks while this process leads the guards."""
        while not stop.is_set():
            if is_leader():
                self.watched_here = True
                try:
                    await self.watch_once()
                except Exception:
                    log.exception("readiness watcher pass failed")
            else:
                self.watched_here = False
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.settings.poll_interval_s)
            except TimeoutError:
                pass
        self.watched_here = False


def _never_ready(inst: Instance) -> str:
    if inst.state_enum is InstanceState.FAILED and inst.status_message:
        return f"{inst.id}: the boot failed: {inst.status_message}"
    return f"{inst.id} is {inst.state}; it never became ready."


def _load(s: Session, operation_id: str) -> tuple[OperationRecord, Instance] | None:
    op = s.get(OperationRecord, operation_id)
    if op is None:
        return None
    inst = s.get(Instance, op.instance_id)
    if inst is None:
        return None
    return op, inst

