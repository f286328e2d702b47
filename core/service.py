"""The façade every surface calls (SPEC §3, §10). Each public operation takes the actor first,
checks what that actor may do, and returns a typed result; the work lives in focused modules:

- booting.py      template, overrides, idempotency, budget and price checks, provider create
- lifecycle.py    every state change of a record with its ledger segment, audit and notice
- operations.py   long work (boot, start) as records with progress events and readiness
- confirmations.py  stored yeses (opaque token, sealed secrets, accepted price, expiry)
- search.py, sync.py, costs.py, views.py, reconcile.py, outbox.py

Nothing here blocks the event loop: database work runs in worker threads (`Database.run`),
provider calls are awaited. A process starts what it needs around this façade with
`core.runtime.Runtime`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter
from sqlalchemy import func, select, update
from sqlmodel import Session, col

from . import audit as audit_log
from .actions import Op, Style, act
from .auth import Actor, Directory, system_actor
from .booting import Accepted, Booting, confirmation
from .clock import Clock, as_utc
from .config import Settings, load_settings
from .confirmations import ConfirmationStore, Pending, Replayed, Sealer
from .costs import Costs
from .db import Database
from .errors import Conflict, GpuherdError, InvalidInput, NotFound, PermissionDenied, ProviderError
from .guard_plan import replan
from .lifecycle import FINAL_STATES, Lifecycle, get_instance
from .models import (
    ActionRecord,
    Activity,
    AuditEvent,
    Instance,
    InstanceState,
    OperationRecord,
    Role,
    SchedulerState,
    User,
)
from .money import from_micros, usd
from .notify import NotifierHub
from .operations import Operations
from .outbox import NoticeDraft, Outbox, SurfaceRoute
from .providers.base import Capabilities, Provider, ProviderState
from .providers.registry import ProviderRegistry, build_registry
from .reconcile import Reconciler
from .results import (
    ActivityResult,
    AttachResult,
    AuditEntry,
    AuditResult,
    BootResult,
    BudgetResult,
    Cancelled,
    Confirmation,
    ConfirmReason,
    CostReport,
    DestroyResult,
    Field_,
    GuardOverview,
    InstanceCost,
    InstanceView,
    KeepResult,
    Money,
    OverrideHelp,
    ProgressEvent,
    ProviderFailure,
    ReconcileResult,
    SearchResult,
    StartResult,
    StatusResult,
    StopResult,
    TemplateDetail,
    TemplateList,
    TemplateSummary,
    UserView,
)
from .retry import provider_call
from .search import OfferSearch
from .sync import InstanceSync, Refresh
from .templates import Template, TemplateCatalog, format_duration, parse_duration
from .text import clip
from .views import allowed, build_views

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")
Waited = TypeVar("Waited", BootResult, StartResult)

DEFAULT_KEEP = timedelta(hours=1)
MAX_KEEP = timedelta(days=7)
MAX_PAGE = 500
Tell = Callable[[Session, Instance, Any], NoticeDraft]   # (session, row, result) -> the notice to write
_ANSWERS: TypeAdapter[BootResult | DestroyResult | Confirmation] = TypeAdapter(
    BootResult | DestroyResult | Confirmation)


def default_routes(settings: Settings) -> list[SurfaceRoute]:
    """Where notices go: the shell always (the terminal of whoever runs one); chat surfaces add
    their routes when configured (later issues)."""
    return [SurfaceRoute.shell()]


class GpuService:
    def __init__(self, settings: Settings, db: Database, providers: ProviderRegistry,
                 templates: TemplateCatalog, *, clock: Clock | None = None,
                 hub: NotifierHub | None = None, outbox: Outbox | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings = settings
        self.db = db
        self._providers = providers
        self._templates = templates
        self.clock = clock or Clock()
        self.hub = hub or NotifierHub()
        self.outbox = outbox or Outbox(default_routes(settings))
        self.directory = Directory(settings.default_role, settings.default_team, settings.admins)
        self._sleep = sleep
        self.lifecycle = Lifecycle(self.outbox)
        self.confirmations = ConfirmationStore(Sealer.from_settings(settings), self.clock)
        self.offers = OfferSearch(settings, providers, templates, self.clock, sleep)
        self.sync = InstanceSync(db, self.clock, providers, self.lifecycle, sleep)
        self.costs_ = Costs(db, self.clock, self.capabilities)
        self.operations = Operations(settings, db, self.clock, self.lifecycle, providers, templates, self.hub, sleep)
        self.operations.on_timeout = self._stop_unhealthy
        self.booting = Booting(settings, db, self.clock, providers, templates, self.offers, self.lifecycle,
                               self.operations, self.costs_, self.confirmations, self.sync, self.hub, sleep)
        self.reconciler = Reconciler(settings, db, self.clock, providers, templates, self.lifecycle, self.sync,
                                     self.hub, self.capabilities)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kw: Any) -> GpuService:
        """Build from configuration; an embedded SQLite database is migrated automatically."""
        settings = settings or load_settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url)
        if settings.is_embedded_sqlite or not db.is_current():
            db.upgrade()
        templates = TemplateCatalog.load(settings.resolved_templates_file)
        return cls(settings, db, build_registry(settings), templates, **kw)

    async def aclose(self) -> None:
        await self.providers.aclose()
        await asyncio.to_thread(self.db.dispose)

    @property
    def providers(self) -> ProviderRegistry:
        return self._providers

    @providers.setter
    def providers(self, registry: ProviderRegistry) -> None:
        """Swap the providers everywhere at once (tests and benchmarks build fleets this way)."""
        self._providers = registry
        for part in (self.offers, self.sync, self.booting, self.operations, self.reconciler):
            part.providers = registry

    @property
    def templates(self) -> TemplateCatalog:
        return self._templates

    @templates.setter
    def templates(self, catalog: TemplateCatalog) -> None:
        self._templates = catalog
        for part in (self.offers, self.booting, self.operations, self.reconciler):
            part.templates = catalog

    def capabilities(self) -> dict[str, Capabilities]:
        return {n: self.providers.get(n).capabilities for n in self.providers.names()}

    @property
    def simulated(self) -> bool:
        return any(p.capabilities.simulated for p in self.providers.all())

    # --- identity ------------------------------------------------------------------------
    def actor(self, principal: str, *, source: str, display: str = "", role_hint: str | None = None) -> Actor:
        """Synchronous: for start-up and tests. Surfaces resolve per request with `resolve_actor`."""
        with self.db.session() as s:
            return self.directory.resolve(s, principal, source=source, now=self.clock.now(),
                                          display=display, role_hint=role_hint)

    async def resolve_actor(self, principal: str, *, source: str, display: str = "",
                            role_hint: str | None = None) -> Actor:
        """Who is asking: the principal's role and team (first seen: the default role)."""
        return await self.db.run(lambda s: self.directory.resolve(
            s, principal, source=source, now=self.clock.now(), display=display, role_hint=role_hint))

    def local_actor(self, source: str = "shell") -> Actor:
        """The person at this terminal: `local:<user>`, with the configured local role."""
        return self.actor(f"local:{self.settings.local_user}", source=source,
                          display=self.settings.local_user, role_hint=self.settings.local_role)

    async def set_user(self, actor: Actor, principal: str, *, role: str | None = None,
                       team: str | None = None) -> UserView:
        """Set a principal's role or team (admins)."""
        actor.require(Role.ADMIN, "changing users")

        def work(s: Session) -> UserView:
            user = Directory.set_user(s, principal, role=role, team=team, now=self.clock.now())
            audit_log.record(s, actor, "user.set", now=self.clock.now(), principal=principal,
                             role=user.role, team=user.team)
            s.commit()
            return UserView(principal=user.principal, role=user.role, team=user.team)
        return await self.db.run(work)

    async def users(self, actor: Actor) -> list[UserView]:
        """Every known principal (admins)."""
        actor.require(Role.ADMIN, "listing users")
        return await self.db.run(lambda s: [UserView(principal=u.principal, role=u.role, team=u.team)
                                            for u in s.execute(select(User).order_by(User.principal)).scalars()])

    # --- search and templates ------------------------------------------------------------
    async def search(self, actor: Actor, text: str = "", *, limit: int | None = None,
                     cursor: str | None = None) -> SearchResult:
        """Live offers from every configured provider, cheapest first (one page)."""
        return await self.offers.search(actor, text, limit=limit, cursor=cursor)

    async def list_templates(self, actor: Actor) -> TemplateList:
        """Every template, built-in and the team's."""
        actor.require(Role.VIEWER, "listing templates")
        return TemplateList(templates=[_summary(t) for t in self.templates.all()])

    async def show_template(self, actor: Actor, name: str) -> TemplateDetail:
        """One template in full, with the overrides it takes."""
        actor.require(Role.VIEWER, "showing templates")
        t = self.templates.get(name)
        actions = [act(Op.BOOT, None, style=Style.PRIMARY, template=t.name)] if actor.at_least(Role.MEMBER) else []
        return TemplateDetail(summary=_summary(t), fields=[Field_(label=k, value=v) for k, v in t.display_fields()],
                              overrides=[OverrideHelp(key=k, takes=v) for k, v in self.templates.override_help(t)],
                              actions=actions)

    # --- boot and confirmations ----------------------------------------------------------
    async def boot(self, actor: Actor, template_name: str, *, offer: str | None = None,
                   provider: str | None = None, overrides: dict[str, str] | None = None,
                   idempotency_key: str | None = None, wait: bool = False) -> BootResult | Confirmation:
        """Create an instance from a template. Returns once the provider accepted the machine
        (follow `operation_id` for readiness), or a Confirmation when it needs a yes.
        `wait` follows the operation to its end before returning (scripts and tests)."""
        result = await self.booting.boot(actor, template_name, offer=offer, provider=provider,
                                         overrides=overrides, idempotency_key=idempotency_key)
        if wait and isinstance(result, BootResult) and result.operation_id:
            return await self._waited(actor, result)
        return result

    async def confirm(self, actor: Actor, token: str, *, wait: bool = False) -> BootResult | DestroyResult | Confirmation:
        """Say yes to a stored question. The price and the budget are checked again: a price
        that rose asks again with the new figures. The same yes twice does the work once."""
        got = await self.db.run(_committing(lambda s: self.confirmations.take(s, actor, token)))
        if isinstance(got, Replayed):
            return _ANSWERS.validate_json(got.result_json)
        pending: Pending = got
        try:
            result = await self._carry_out(actor, pending)
        except BaseException:
            await self.db.run(_committing(lambda s: self.confirmations.release(s, pending.token_hash)))
            raise
        if isinstance(result, Confirmation):
            await self.db.run(_committing(lambda s: self.confirmations.supersede(s, pending.token_hash)))
            return result
        await self.db.run(_committing(lambda s: self.confirmations.finish(s, pending.token_hash,
                                                                          result.model_dump_json())))
        if wait and isinstance(result, BootResult) and result.operation_id:
            return await self._waited(actor, result)
        return result

    async def cancel(self, actor: Actor, token: str) -> Cancelled:
        """Say no: the question is closed and its sealed secrets are wiped."""
        await self.db.run(_committing(lambda s: self.confirmations.cancel(s, actor, token)))
        return Cancelled(simulated=self.simulated)

    async def _carry_out(self, actor: Actor, p: Pending) -> BootResult | DestroyResult | Confirmation:
        if p.operation == "boot":
            overrides = json.loads(p.args.get("overrides") or "{}")
            overrides.update({k: v for k, v in p.args.items() if k in overrides})   # sealed secret values
            return await self.booting.boot(
                actor, p.args["template"], offer=p.args.get("offer") or None,
                provider=p.args.get("provider") or None, overrides=overrides,
                idempotency_key=p.args.get("key"),
                accepted=Accepted(dph=p.accepted_dph, past_budget=p.reason == ConfirmReason.BUDGET.value))
        if p.operation == "destroy" and p.instance_id:
            return await self.destroy(actor, p.instance_id, confirmed=True,
                                      idempotency_key=p.args.get("key") or None)
        raise InvalidInput("That confirmation is for something gpuherd no longer does; ask again.")

    async def follow(self, actor: Actor, operation_id: str, *, timeout_s: float | None = None,
                     drive: bool | None = None) -> AsyncIterator[ProgressEvent]:
        """The progress events of one operation, until it ends (its actor, the machine's owner
        and admins may follow it)."""
        op = await self.operations.get(operation_id)
        if op is None:
            raise NotFound(f"There is no operation '{clip(operation_id, 40)}'.")
        if op.actor != actor.principal and not actor.at_least(Role.ADMIN):
            owner = await self.db.run(lambda s: s.get(Instance, op.instance_id))
            if owner is None or owner.owner != actor.principal:
                raise PermissionDenied("That operation is someone else's.")
        async for ev in self.operations.follow(operation_id, timeout_s=timeout_s, drive=drive):
            yield ev

    async def _waited(self, actor: Actor, result: Waited) -> Waited:
        op_id = result.operation_id
        instance = result.instance
        if op_id:
            async for _ in self.operations.follow(op_id):
                pass
        view = await self.view(actor, instance.id)
        return result.model_copy(update={"instance": view, "ready": view.ready})

    async def _stop_unhealthy(self, instance_id: str) -> str:
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
        rec = s.get(ActionRecord, key) or s.get(ActionRecord, f"{action}:{key}")
        if rec is None:
            booted = s.execute(select(Instance).where(col(Instance.idempotency_key) == key)).scalars().first()
            if booted is not None:
                if booted.owner != actor.principal:
                    raise PermissionDenied("This idempotency key was used by someone else; use a new key.")
                raise Conflict(f"This idempotency key was already used to boot {booted.id}; "
                               "use a new key for a new request.")
            return None
        if rec.actor != actor.principal:
            raise PermissionDenied("This idempotency key was used by someone else; use a new key.")
        iid = get_instance(s, instance_id).id
        if rec.action != action or rec.instance_id != iid:
            raise Conflict(f"This idempotency key was already used to {rec.action} {rec.instance_id}; "
                           "use a new key for a new request.")
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
                raise _Changed(inst.id)
            return inst, previous
        try:
            got = await self.db.run(claim)
        except _Changed as exc:
            found = await self._first_answer(actor, idempotency_key, "stop", instance_id, StopResult)
            if found is not None:
                return found
            raise Conflict(f"{exc.instance_id} changed while you asked (another stop or start?); "
                           "look at its status.") from None
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
            view = build_views(s, [row], now, actor, self.capabilities())[0]
            result = StopResult(instance=view, session_cost=cost, session_s=seconds,
                                storage=Money.of(from_micros(row.storage_dph_micros)), simulated=row.simulated)
            self._remember(s, idempotency_key, "stop", actor, row.id, result)
            draft = (tell(s, row, result) if tell is not None else None if actor.source == "system" else
                     NoticeDraft(kind="instance.stopped", owner=row.owner, team=row.team, actor=actor.principal,
                                 instance_id=row.id, simulated=row.simulated,
                                 text=f"{actor.name} stopped {row.id}: session cost {usd(cost)}"))
            if draft is not None:  # a system actor without `tell` reports its own action
                self.lifecycle.notify(s, now, draft)
            s.commit()
            return result, draft
        result, draft = await self.db.run(finish)
        if draft is not None:
            await self.hub.publish_draft(draft, now)
        return result

    def _end_operations(self, s: Session, instance_id: str, now: datetime) -> None:
        """A stop or destroy ends any boot or start still waiting for readiness."""
        s.execute(update(OperationRecord).where(col(OperationRecord.instance_id) == instance_id,
                                                col(OperationRecord.state) == "running")
                  .values(state="failed", finished_at=now, updated_at=now, message="stopped before it was ready"))

    async def start(self, actor: Actor, instance_id: str, *, idempotency_key: str | None = None,
                    wait: bool = False) -> StartResult:
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
                raise _Changed(inst.id)
            return inst
        try:
            got = await self.db.run(claim)
        except _Changed as exc:
            found = await self._first_answer(actor, idempotency_key, "start", instance_id, StartResult)
            if found is not None:
                return found
            raise Conflict(f"{exc.instance_id} changed while you asked; look at its status.") from None
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
            view = build_views(s, [row], now, actor, self.capabilities())[0]
            result = StartResult(instance=view.model_copy(update={"operation_id": op.id}), operation_id=op.id,
                                 ready=False, waited_s=0, simulated=row.simulated)
            self._remember(s, idempotency_key, "start", actor, row.id, result)
            s.commit()
            return result
        result = await self.db.run(finish)
        self.operations.changed()
        if wait and result.operation_id:
            began = self.clock.monotonic()
            waited = await self._waited(actor, result)
            return waited.model_copy(update={"waited_s": round(self.clock.monotonic() - began, 1)})
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
                return confirmation(
                    issued.token, issued.expires_at, "destroy", ConfirmReason.DESTROY, f"Destroy {inst.id}?",
                    f"Destroy {inst.id} ({inst.template}, {inst.gpu_name} x{inst.num_gpus} on {inst.provider})? "
                    "Its disk and everything on it are deleted; billing ends.", inst.id, None, inst.simulated)
            previous = inst.state
            if not self.lifecycle.claim(s, inst, InstanceState.DESTROYING, now):
                raise _Changed(inst.id)
            return inst, previous
        try:
            got = await self.db.run(claim)
        except _Changed as exc:
            found = await self._first_answer(actor, idempotency_key, "destroy", instance_id, DestroyResult)
            if found is not None:
                return found
            raise Conflict(f"{exc.instance_id} changed while you asked; look at its status.") from None
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
            view = build_views(s, [row], now, actor, self.capabilities())[0]
            result = DestroyResult(instance=view, total_cost=total, simulated=row.simulated)
            self._remember(s, idempotency_key, "destroy", actor, row.id, result)
            draft = (tell(s, row, result) if tell is not None else None if actor.source == "system" else
                     NoticeDraft(kind="instance.destroyed", owner=row.owner, team=row.team, actor=actor.principal,
                                 instance_id=row.id, simulated=row.simulated,
                                 text=f"{actor.name} destroyed {row.id}: total cost {usd(total)}"))
            if draft is not None:  # a system actor without `tell` reports its own action
                self.lifecycle.notify(s, now, draft)
            s.commit()
            return result, draft
        result, draft = await self.db.run(finish)
        if draft is not None:
            await self.hub.publish_draft(draft, now)
        return result

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
            if inst.state_enum.is_final:
                raise Conflict(f"{inst.id} is {inst.state}; there is nothing to keep.")
            until = now + span
            inst.keep_until = until
            inst.last_activity_at = now
            inst.updated_at = now
            inst.version += 1
            inst.idle_warned_at = None
            inst.stopped_warned_at = None
            replan(inst)
            s.add(inst)
            s.add(Activity(instance_id=inst.id, ts=now, source="keep",
                           detail=f"by {actor.principal} for {format_duration(span)}"[:256]))
            audit_log.record(s, actor, "keep", now=now, instance_id=inst.id, until=until.isoformat())
            s.commit()
            view = build_views(s, [inst], now, actor, self.capabilities())[0]
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
            return ActivityResult(instance=build_views(s, [inst], now, actor, self.capabilities())[0])
        return await self.db.run(work)

    # --- status --------------------------------------------------------------------------
    async def view(self, actor: Actor, instance_id: str) -> InstanceView:
        """One instance as the database has it now (no provider call)."""
        actor.require(Role.VIEWER, "viewing status")
        return await self.db.run(lambda s: build_views(s, [get_instance(s, instance_id)], self.clock.now(), actor,
                                                       self.capabilities())[0])

    async def status(self, actor: Actor, instance_id: str | None = None, *, include_ended: bool = False,
                     refresh: bool = True, limit: int = 100, cursor: str | None = None) -> StatusResult:
        """Instances, newest first, one page. `instance_id` asks the provider for that one only."""
        actor.require(Role.VIEWER, "viewing status")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"Show between 1 and {MAX_PAGE} instances a page, not {limit}.")
        after = _read_cursor(cursor)

        def rows(s: Session) -> tuple[list[Instance], int]:
            if instance_id:
                return [get_instance(s, instance_id)], 1
            where = [] if include_ended else [col(Instance.state).not_in(FINAL_STATES)]
            total = int(s.execute(select(func.count()).select_from(Instance).where(*where)).scalar_one())
            stmt = select(Instance).where(*where)
            if after is not None:
                at, iid = after
                stmt = stmt.where((col(Instance.created_at) < at)
                                  | ((col(Instance.created_at) == at) & (col(Instance.id) < iid)))
            stmt = stmt.order_by(col(Instance.created_at).desc(), col(Instance.id).desc()).limit(limit + 1)
            return list(s.execute(stmt).scalars()), total
        found, total = await self.db.run(rows)
        page, more = found[:limit], len(found) > limit
        if refresh and instance_id:
            synced = await self.sync.refresh_one(page[0])
        elif refresh:
            synced = await self.sync.refresh(page)
        else:
            synced = Refresh(rows={r.id: r for r in page})
        now = self.clock.now()

        def views(s: Session) -> tuple[list[InstanceView], Decimal]:
            from .ledger import Ledger
            return (build_views(s, [synced.rows[r.id] for r in page], now, actor, self.capabilities()),
                    Ledger.run_rate(s))
        shown, run_rate = await self.db.run(views)
        last = page[-1] if page else None
        return StatusResult(instances=shown, total=total, run_rate=Money.of(run_rate), include_ended=include_ended,
                            stale=[ProviderFailure(provider=p, message=m) for p, m in synced.failed.items()],
                            next_cursor=_make_cursor(last) if more and last else None,
                            simulated=any(v.simulated for v in shown) or self.simulated)

    async def refresh(self, instances: list[Instance], *, list_providers: list[str] | None = None) -> Refresh:
        """Sync rows with their providers (guards and reconcile)."""
        return await self.sync.refresh(instances, list_providers=list_providers)

    # --- money ---------------------------------------------------------------------------
    async def costs(self, actor: Actor, period: str | None = None, by: str | None = None) -> CostReport:
        """Spend in a period by group, running instances, budgets, run-rate, projection."""
        report = await self.costs_.report(actor, period, by)
        return report.model_copy(update={"simulated": report.simulated or self.simulated})

    async def instance_cost(self, actor: Actor, instance_id: str) -> InstanceCost:
        """One instance's cost analysis."""
        return await self.costs_.instance_cost(actor, instance_id)

    async def budgets(self, actor: Actor) -> BudgetResult:
        """This month's budgets and their use (admins see all)."""
        return await self.costs_.budgets(actor)

    async def set_budget(self, actor: Actor, scope: str, name: str, amount: str, hard_cap: bool | None = None) -> BudgetResult:
        """Set a team's or user's monthly budget (admins)."""
        return await self.costs_.set_budget(actor, scope, name, amount, hard_cap)

    async def clear_budget(self, actor: Actor, scope: str, name: str) -> BudgetResult:
        """Remove a budget (admins)."""
        return await self.costs_.clear_budget(actor, scope, name)

    # --- audit and guards ----------------------------------------------------------------
    async def audit(self, actor: Actor, n: int = 20, instance_id: str | None = None,
                    cursor: str | None = None) -> AuditResult:
        """Recent audit events, newest first (admins), one page of `n`."""
        actor.require(Role.ADMIN, "reading the audit log")
        if not 1 <= n <= MAX_PAGE:
            raise InvalidInput(f"Show between 1 and {MAX_PAGE} audit events, not {n}.")
        if cursor is not None and not (cursor.startswith("a") and cursor[1:].isdigit() and len(cursor) < 20):
            raise InvalidInput("That page cursor is not one the audit log gave out.")
        before = int(cursor[1:]) if cursor else None

        def work(s: Session) -> AuditResult:
            stmt = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(n + 1)
            if instance_id:
                stmt = stmt.where(col(AuditEvent.instance_id) == get_instance(s, instance_id).id)
            if before is not None:
                stmt = stmt.where(col(AuditEvent.id) < before)
            rows = list(s.execute(stmt).scalars())
            page = rows[:n]
            return AuditResult(events=[AuditEntry(
                id=r.id or 0, ts=as_utc(r.ts), actor=r.actor, source=r.source, event=r.event,
                instance_id=r.instance_id, cost=from_micros(r.cost_micros) if r.cost_micros is not None else None,
                ok=r.ok, details=json.loads(r.details or "{}")) for r in page],
                next_cursor=f"a{page[-1].id}" if len(rows) > n and page else None)
        return await self.db.run(work)

    async def guard_overview(self, actor: Actor, limit: int = 10) -> GuardOverview:
        """The guard scheduler: last pass, next wake-up, what is coming, what it cannot see."""
        actor.require(Role.VIEWER, "viewing the guards")
        now = self.clock.now()

        def work(s: Session) -> GuardOverview:
            state = s.get(SchedulerState, "guards")
            upcoming_rows = list(s.execute(select(Instance).where(
                col(Instance.state).not_in(FINAL_STATES), col(Instance.next_guard_at).is_not(None))
                .order_by(col(Instance.next_guard_at)).limit(limit * 4)).scalars())
            blind_rows = list(s.execute(select(Instance).where(
                col(Instance.state).not_in(FINAL_STATES), col(Instance.guard_error).is_not(None))
                .limit(limit)).scalars())
            views = build_views(s, upcoming_rows, now, actor, self.capabilities())
            upcoming = sorted((v for v in views if v.next_action_at), key=lambda v: v.next_action_at or now)[:limit]
            blind = build_views(s, blind_rows, now, actor, self.capabilities())
            return GuardOverview(
                leader=state.leader if state else None,
                last_run_at=as_utc(state.last_run_at) if state and state.last_run_at else None,
                last_pass_ms=state.last_pass_ms if state else None, last_checked=state.last_checked if state else 0,
                last_acted=state.last_acted if state else 0,
                next_wake_at=as_utc(state.next_wake_at) if state and state.next_wake_at else None,
                last_error=state.last_error if state else None,
                budgets_checked_at=as_utc(state.budgets_checked_at) if state and state.budgets_checked_at else None,
                upcoming=upcoming, blind=blind, simulated=any(v.simulated for v in views) or self.simulated)
        return await self.db.run(work)

    # --- crash recovery, reconcile, attach -----------------------------------------------
    async def resolve_pending(self) -> list[str]:
        """Boot intents left by a crash, at start: a reconcile pass adopts each machine that has
        the intent's label and fails the intents whose machine never appeared. Skipped (no
        provider is asked) when no intent is pending. Returns the ids adopted."""
        pending = await self.db.run(lambda s: int(s.execute(select(func.count()).select_from(Instance).where(
            col(Instance.state) == InstanceState.PENDING.value)).scalar_one()))
        if not pending:
            return []
        return (await self.reconcile()).adopted

    async def reconcile(self, actor: Actor | None = None) -> ReconcileResult:
        """Compare every provider's machines with the database (see core.reconcile)."""
        result = await self.reconciler.run(actor)
        return result.model_copy(update={"simulated": self.simulated})

    async def attach(self, actor: Actor, ref: str, *, template: str | None = None, idle: str | None = None,
                     owner: str | None = None) -> AttachResult:
        """Put a machine created elsewhere under gpuherd's guards and ledger (admins)."""
        return await self.reconciler.attach(actor, ref, template=template, idle=idle, owner=owner)

    async def attach_configured(self) -> list[str]:
        """The machines listed under `attach` in the configuration, attached once each."""
        return await self.reconciler.attach_configured()

    async def instance_count(self) -> int:
        return await self.db.run(lambda s: int(s.execute(select(func.count()).select_from(Instance)).scalar_one()))


class _Changed(GpuherdError):
    """A claim lost to another change (internal: turned into a Conflict or a replay)."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"{instance_id} changed")
        self.instance_id = instance_id


def _committing(fn: Callable[[Session], T]) -> Callable[[Session], T]:
    """`fn`, then a commit (a failing `fn` commits nothing)."""
    def work(s: Session) -> T:
        value = fn(s)
        s.commit()
        return value
    return work


async def _gone(provider: Provider, provider_id: str) -> bool:
    """After a failed destroy: is the machine gone anyway? Unknown counts as no."""
    try:
        found = await provider.get(provider_id)
    except GpuherdError:
        return False
    return found is None or found.state is ProviderState.DESTROYED


def _make_cursor(inst: Instance) -> str:
    return f"{as_utc(inst.created_at).isoformat()}|{inst.id}"


def _read_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor:
        return None
    try:
        at, iid = cursor.rsplit("|", 1)
        return datetime.fromisoformat(at), iid[:16]
    except ValueError:
        raise InvalidInput("That page cursor is not one the instance list gave out.") from None


def _summary(t: Template) -> TemplateSummary:
    return TemplateSummary(name=t.name, description=t.description, model=t.model, min_gpu_ram=t.min_gpu_ram,
                           num_gpus=t.num_gpus, max_dph=t.max_dph, idle_minutes=t.idle_minutes,
                           source="built-in" if t.source == "builtin" else t.source)

