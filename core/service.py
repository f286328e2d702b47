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
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar, cast

from pydantic import BaseModel, TypeAdapter
from sqlalchemy import ColumnElement, func, select
from sqlmodel import Session, col

from . import audit as audit_log
from .actions import Op, Style, act
from .auth import Actor, Directory, granted_role
from .booting import Accepted, Booting
from .clock import Clock, as_utc
from .config import Settings, load_settings
from .confirmations import ConfirmationStore, Pending, Replayed, Sealer
from .costs import Costs
from .db import Database
from .errors import InvalidInput, NotFound, PermissionDenied
from .feed import FeedEntry, FeedPage, read_page
from .keys import KeyStore
from .lifecycle import FINAL_STATES, Lifecycle, get_instance
from .models import (
    AuditEvent,
    Instance,
    InstanceState,
    Role,
    SchedulerState,
    User,
)
from .money import from_micros
from .notify import NotifierHub
from .operations import Operations
from .outbox import Outbox, SurfaceRoute, TargetKind
from .power import Power, Tell
from .provider_health import HEALTH, HealthMonitor, ProvidersResult
from .providers.base import Capabilities
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
    CreatedKey,
    DestroyResult,
    Field_,
    GuardOverview,
    InstanceCost,
    InstanceView,
    KeepResult,
    KeyView,
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
from .search import OfferSearch
from .shared import SharedCalls
from .statistics import StatisticsResult
from .statistics import statistics as fleet_statistics
from .sync import InstanceSync, Refresh
from .templates import Template, TemplateCatalog
from .text import clip
from .views import build_views

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")
Waited = TypeVar("Waited", BootResult, StartResult)

MAX_PAGE = 500
COSTS_BALANCE_WAIT_S = 2.0             # a cost report waits this long at most for provider balances
STATUS_SHARE_S = 1.0                   # how long a shared status page (status(share=True)) is reused
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _changes(method: F) -> F:
    """A façade method that changes instances, budgets or users: shared status pages are
    forgotten once it is done (whether it succeeded or not)."""
    @functools.wraps(method)
    async def wrapped(self: GpuService, *args: Any, **kw: Any) -> Any:
        try:
            return await method(self, *args, **kw)
        finally:
            self.changed()
    return cast(F, wrapped)
_ANSWERS: TypeAdapter[BootResult | DestroyResult | Confirmation] = TypeAdapter(
    BootResult | DestroyResult | Confirmation)


def default_routes(settings: Settings) -> list[SurfaceRoute]:
    """Where notices go: the shell always (the terminal of whoever runs one); Slack and Discord
    when configured: DMs to their users, the channel of each team that has one there, the
    admins' channel when there is one."""
    routes = [SurfaceRoute.shell()]
    if settings.slack_configured:
        kinds: tuple[TargetKind, ...] = ("user", "team", "admins") if settings.slack_admin_channel else ("user", "team")
        routes.append(SurfaceRoute(surface="slack", target_kinds=kinds, principal_prefix="slack:",
                                   teams=frozenset(settings.slack_channels)))
    if settings.discord_configured:
        kinds = ("user", "team", "admins") if settings.discord_admin_channel else ("user", "team")
        routes.append(SurfaceRoute(surface="discord", target_kinds=kinds, principal_prefix="discord:",
                                   teams=frozenset(settings.discord_channels)))
    return routes


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
        self.directory = Directory(settings.default_role, settings.default_team, settings.all_admins)
        self._sleep = sleep
        self.lifecycle = Lifecycle(self.outbox)
        self.confirmations = ConfirmationStore(Sealer.from_settings(settings), self.clock)
        self.offers = OfferSearch(settings, providers, templates, self.clock, sleep)
        self.sync = InstanceSync(db, self.clock, providers, self.lifecycle, sleep)
        self.costs_ = Costs(db, self.clock, self.capabilities)
        self.operations = Operations(settings, db, self.clock, self.lifecycle, providers, templates, self.hub, sleep)
        self.power = Power(db, self.clock, providers, self.lifecycle, self.sync, self.operations,
                           self.confirmations, self.hub, sleep)
        self.operations.on_timeout = self.power.stop_unhealthy
        self.booting = Booting(settings, db, self.clock, providers, templates, self.offers, self.lifecycle,
                               self.operations, self.costs_, self.confirmations, self.sync, self.hub, sleep)
        self.keys = KeyStore(db, self.clock, self.directory)
        self._pages: SharedCalls[StatusResult] = SharedCalls(time.monotonic, max_entries=512)
        self.reconciler = Reconciler(settings, db, self.clock, providers, templates, self.lifecycle, self.sync,
                                     self.hub, self.capabilities)
        HEALTH.clock = self.clock       # provider answers are timed by the service's clock (provider_health.py)
        self.health = HealthMonitor(db, self.clock, providers, settings.provider_timeout_s)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kw: Any) -> GpuService:
        """Build from configuration; an embedded SQLite database is migrated automatically."""
        settings = settings or load_settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url)
        if not db.at_head():        # a quick look first: alembic loads only when there is work
            db.upgrade()
        templates = TemplateCatalog.load(settings.resolved_templates_file)
        return cls(settings, db, build_registry(settings), templates, **kw)

    async def aclose(self) -> None:
        await self.booting.drain()
        await self.health.aclose()          # before the providers it may still be asking
        await self.providers.aclose()
        await asyncio.to_thread(self.db.dispose)

    @property
    def providers(self) -> ProviderRegistry:
        return self._providers

    @providers.setter
    def providers(self, registry: ProviderRegistry) -> None:
        """Swap the providers everywhere at once (tests and benchmarks build fleets this way)."""
        self._providers = registry
        for part in (self.offers, self.sync, self.booting, self.operations, self.reconciler, self.power,
                     self.health):
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
        return self.providers.capabilities()

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
                            role_hint: str | None = None, platform_roles: Iterable[str] = ()) -> Actor:
        """Who is asking: the principal's role and team (first seen: the default role), raised
        for this request by the platform roles it holds that config maps (`discord_roles`)."""
        grant = granted_role(self.settings.discord_roles, platform_roles) if source == "discord" else None
        return await self.db.run(lambda s: self.directory.resolve(
            s, principal, source=source, now=self.clock.now(), display=display, role_hint=role_hint, grant=grant))

    def local_actor(self, source: str = "shell") -> Actor:
        """The person at this terminal: `local:<user>`, with the configured local role — every
        time, not only when first seen: whoever edits the configuration decides what the
        terminal may do (set to viewer, an admin's terminal can no longer boot)."""
        actor = self.actor(f"local:{self.settings.local_user}", source=source,
                           display=self.settings.local_user, role_hint=self.settings.local_role)
        role = Role(self.settings.local_role)
        return actor if actor.role is role else dataclasses.replace(actor, role=role)

    @_changes
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

    async def whoami(self, actor: Actor) -> UserView:
        """Who the caller is to gpuherd (a notebook or a script says which key it uses)."""
        return UserView(principal=actor.principal, role=actor.role.value, team=actor.team)

    async def users(self, actor: Actor) -> list[UserView]:
        """Every known principal (admins)."""
        actor.require(Role.ADMIN, "listing users")
        return await self.db.run(lambda s: [UserView(principal=u.principal, role=u.role, team=u.team)
                                            for u in s.execute(select(User).order_by(User.principal)).scalars()])

    # --- API keys (keys.py) --------------------------------------------------------------
    async def create_key(self, actor: Actor, principal: str, *, role: str | None = None, name: str = "") -> CreatedKey:
        """A new API key for `principal` (admins); the only time the key is shown."""
        return await self.keys.create(actor, principal, role=role, name=name)

    async def list_keys(self, actor: Actor, *, include_revoked: bool = False) -> list[KeyView]:
        return await self.keys.list(actor, include_revoked=include_revoked)

    async def revoke_key(self, actor: Actor, key_id: str) -> KeyView:
        return await self.keys.revoke(actor, key_id)

    async def actor_for_key(self, presented: str, *, source: str = "api") -> Actor:
        """Who a presented API key speaks for (raises Unauthenticated)."""
        return await self.keys.actor_for(presented, source=source)

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
    @_changes
    async def boot(self, actor: Actor, template_name: str, *, offer: str | None = None,
                   provider: str | None = None, overrides: dict[str, str] | None = None,
                   idempotency_key: str | None = None, wait: bool = False,
                   detach: bool = False) -> BootResult | Confirmation:
        """Create an instance from a template. Returns once the provider accepted the machine
        (follow `operation_id` for readiness), or a Confirmation when it needs a yes.
        `detach` returns as soon as the intent and its operation are written (the instance is
        `pending`; the provider call goes on in this process and its outcome is the operation's
        next event): what an HTTP API answering `202` within milliseconds needs.
        `wait` follows the operation to its end before returning (scripts and tests)."""
        result = await self.booting.boot(actor, template_name, offer=offer, provider=provider,
                                         overrides=overrides, idempotency_key=idempotency_key, detach=detach)
        if wait and isinstance(result, BootResult) and result.operation_id:
            return await self._waited(actor, result)
        return result

    @_changes
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

    @_changes
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

    async def feed(self, actor: Actor, after: str | None = None, limit: int = 100) -> FeedPage:
        """What `actor` should see since the cursor `after` (None: from now): the progress of
        their operations and the notices addressed to them, from the database, so any replica
        can serve a person's event stream (see core.feed)."""
        actor.require(Role.VIEWER, "following events")
        return await self.db.run(lambda s: read_page(s, actor, after, limit))

    async def watch(self, actor: Actor, after: str | None = None, *, poll_s: float = 1.0) -> AsyncIterator[FeedEntry]:
        """`feed` as a live stream for an in-process surface (a notebook on the local core): woken
        at once by notices and progress events written in this process, polling every `poll_s`
        for those other processes write (the guards of a `gpuherd serve` on the same database).
        Runs until the caller stops iterating."""
        cursor = after if after is not None else (await self.feed(actor, None, limit=1)).cursor
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def nudge(*_: Any) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(wake.set)
        unsubscribe = [self.hub.subscribe(nudge), self.operations.listen(nudge)]
        try:
            while True:
                wake.clear()
                page = await self.feed(actor, cursor)
                for entry in page.entries:
                    yield entry
                cursor = page.cursor
                if page.more:
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), timeout=poll_s)
                except TimeoutError:
                    pass
        finally:
            for off in unsubscribe:
                off()

    async def _waited(self, actor: Actor, result: Waited) -> Waited:
        op_id = result.operation_id
        instance = result.instance
        if op_id:
            async for _ in self.operations.follow(op_id):
                pass
        view = await self.view(actor, instance.id)
        return result.model_copy(update={"instance": view, "ready": view.ready})

    @_changes
    async def stop(self, actor: Actor, instance_id: str, *, idempotency_key: str | None = None,
                   tell: Tell | None = None) -> StopResult:
        """Stop (disk kept, storage still billed); reports the session's cost. `tell` (guards)
        phrases the notice, written in the stop's own transaction."""
        return await self.power.stop(actor, instance_id, idempotency_key=idempotency_key, tell=tell)

    @_changes
    async def start(self, actor: Actor, instance_id: str, *, idempotency_key: str | None = None,
                    wait: bool = False) -> StartResult:
        """Resume a stopped instance. Returns once the provider accepted; `operation_id` follows
        it to its health check (`wait` does that before returning)."""
        result = await self.power.start(actor, instance_id, idempotency_key=idempotency_key)
        if wait and result.operation_id:
            began = self.clock.monotonic()
            waited = await self._waited(actor, result)
            return waited.model_copy(update={"waited_s": round(self.clock.monotonic() - began, 1)})
        return result

    @_changes
    async def destroy(self, actor: Actor, instance_id: str, *, confirmed: bool = False,
                      idempotency_key: str | None = None, tell: Tell | None = None) -> DestroyResult | Confirmation:
        """Destroy (no further charges). Without `confirmed` it asks (a stored confirmation)."""
        return await self.power.destroy(actor, instance_id, confirmed=confirmed, idempotency_key=idempotency_key,
                                        tell=tell)

    @_changes
    async def keep(self, actor: Actor, instance_id: str, duration: str | None = None) -> KeepResult:
        """Postpone idle shutdown (1 h by default, at most 7 days)."""
        return await self.power.keep(actor, instance_id, duration)

    @_changes
    async def record_activity(self, actor: Actor, instance_id: str, source: str = "ping",
                              detail: str | None = None) -> ActivityResult:
        """An explicit sign of use (API ping, notebook heartbeat): the idle clock restarts."""
        return await self.power.record_activity(actor, instance_id, source, detail)

    # --- status --------------------------------------------------------------------------
    async def view(self, actor: Actor, instance_id: str) -> InstanceView:
        """One instance as the database has it now (no provider call)."""
        actor.require(Role.VIEWER, "viewing status")
        return await self.db.run(lambda s: build_views(s, [get_instance(s, instance_id)], self.clock.now(), actor,
                                                       self.capabilities())[0])

    async def status(self, actor: Actor, instance_id: str | None = None, *, include_ended: bool = False,
                     refresh: bool = True, limit: int = 100, cursor: str | None = None,
                     share: bool = False, mine: bool = False) -> StatusResult:
        """Instances, newest first, one page. `instance_id` asks the provider for that one only;
        `mine` keeps the asker's own (an App Home, the notebook's Instances tab), and its run-rate
        is theirs too.
        `share` (an API polled by dashboards and panels): the same page asked by the same person
        within `STATUS_SHARE_S` is built once and answered to all of them, and for as long
        again it is still answered at once while one rebuild runs (no poller waits for it); any
        change made through this service forgets the shared pages, another replica's change
        shows within twice that window."""
        actor.require(Role.VIEWER, "viewing status")
        if share and instance_id is None:
            key = (actor.principal, actor.role, actor.team, include_ended, refresh, limit, cursor, mine)
            return await self._pages.get(key, lambda: self._status(actor, None, include_ended=include_ended,
                                                                   refresh=refresh, limit=limit, cursor=cursor,
                                                                   mine=mine),
                                         STATUS_SHARE_S, stale=STATUS_SHARE_S)
        return await self._status(actor, instance_id, include_ended=include_ended, refresh=refresh, limit=limit,
                                  cursor=cursor, mine=mine)

    def changed(self) -> None:
        """Something was changed through this service: shared status pages are out of date."""
        self._pages.clear()

    async def _status(self, actor: Actor, instance_id: str | None, *, include_ended: bool, refresh: bool,
                      limit: int, cursor: str | None, mine: bool = False) -> StatusResult:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"Show between 1 and {MAX_PAGE} instances a page, not {limit}.")
        after = _read_cursor(cursor)

        def rows(s: Session) -> tuple[list[Instance], int]:
            if instance_id:
                return [get_instance(s, instance_id)], 1
            where: list[ColumnElement[bool]] = [] if include_ended else [col(Instance.state).not_in(FINAL_STATES)]
            if mine:
                where.append(col(Instance.owner) == actor.principal)
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
                    Ledger.run_rate(s, user=actor.principal) if mine else Ledger.run_rate(s))
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
        balances = await self.health.balances(wait_s=COSTS_BALANCE_WAIT_S)
        return report.model_copy(update={"simulated": report.simulated or self.simulated, "balances": balances})

    # --- providers (provider_health.py) ---------------------------------------------------
    async def provider_overview(self, actor: Actor) -> ProvidersResult:
        """Every configured provider: whether its credentials work, when it last answered and
        its last error, how old its prices are, its balance and how long that lasts."""
        return await self.health.overview(actor)

    async def warn_low_balances(self) -> list[str]:
        """Check every balance now; warn once for each that runs out within a day at its
        run-rate (the guard leader runs this every few minutes). Returns the warnings sent."""
        drafts = await self.health.warn_low_balances(self.lifecycle.notify)
        await self.hub.published(drafts, self.clock.now())
        return [d.text for d in drafts if d.to_admins]

    async def statistics(self, actor: Actor) -> StatisticsResult:
        """Fleet statistics: counts by state, average $/h of the active instances, the
        distributions by GPU model, state and provider, this month's spend (statistics.py)."""
        result = await fleet_statistics(self.db, self.clock, actor)
        return result.model_copy(update={"simulated": result.simulated or self.simulated})

    async def instance_cost(self, actor: Actor, instance_id: str) -> InstanceCost:
        """One instance's cost analysis."""
        return await self.costs_.instance_cost(actor, instance_id)

    async def budgets(self, actor: Actor) -> BudgetResult:
        """This month's budgets and their use (admins see all)."""
        return await self.costs_.budgets(actor)

    @_changes
    async def set_budget(self, actor: Actor, scope: str, name: str, amount: str, hard_cap: bool | None = None) -> BudgetResult:
        """Set a team's or user's monthly budget (admins)."""
        return await self.costs_.set_budget(actor, scope, name, amount, hard_cap)

    @_changes
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

    @_changes
    async def reconcile(self, actor: Actor | None = None) -> ReconcileResult:
        """Compare every provider's machines with the database (see core.reconcile)."""
        result = await self.reconciler.run(actor)
        return result.model_copy(update={"simulated": self.simulated})

    @_changes
    async def attach(self, actor: Actor, ref: str, *, template: str | None = None, idle: str | None = None,
                     owner: str | None = None) -> AttachResult:
        """Put a machine created elsewhere under gpuherd's guards and ledger (admins)."""
        return await self.reconciler.attach(actor, ref, template=template, idle=idle, owner=owner)

    async def attach_configured(self) -> list[str]:
        """The machines listed under `attach` in the configuration, attached once each."""
        return await self.reconciler.attach_configured()

    async def instance_count(self) -> int:
        return await self.db.run(lambda s: int(s.execute(select(func.count()).select_from(Instance)).scalar_one()))


def _committing(fn: Callable[[Session], T]) -> Callable[[Session], T]:
    """`fn`, then a commit (a failing `fn` commits nothing)."""
    def work(s: Session) -> T:
        value = fn(s)
        s.commit()
        return value
    return work


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
                           source="built-in" if t.source == "builtin" else t.source, openai_api=t.is_vllm)

