"""The one service every surface calls (SPEC §3). It owns every business rule: roles, the price
guard, crash-safe and idempotent boots, billing segments on every state change, the audit trail.
Surfaces parse text into these calls and render the typed results."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlmodel import Session

from . import audit as audit_log
from .auth import Actor, Directory, system_actor
from .clock import Clock, as_utc
from .config import Settings, load_settings
from .db import Database
from .guard_plan import plan as guard_plan
from .guard_plan import replan
from .errors import (
    CapacityError,
    Conflict,
    GpuherdError,
    InvalidInput,
    NoMatchingOffer,
    NotFound,
    PermissionDenied,
    ProviderError,
    ProviderTimeout,
)
from .ids import ID_RE, label_for, new_instance_id, normalise_instance_id
from .ledger import COMPUTE, STORAGE, Ledger, month_of, parse_period
from .models import ActionRecord, Budget, Instance, InstanceState, Role, SchedulerState, User
from .money import HOURS_PER_DAY, HOURS_PER_MONTH, from_micros, rate, to_decimal, to_micros, usd
from .notify import Notice, NotifierHub
from .offers import Offer
from .providers.base import CreateRequest, Provider, ProviderInstance, ProviderState
from .providers.registry import ProviderRegistry, build_registry
from .query import OfferQuery, parse_query
from .results import (
    AttachResult,
    AuditEntry,
    AuditResult,
    BootResult,
    BudgetResult,
    BudgetUse,
    Confirmation,
    CostReport,
    DestroyResult,
    GuardOverview,
    InstanceCost,
    InstanceView,
    KeepResult,
    PriceSource,
    ReconcileResult,
    SearchResult,
    StartResult,
    StatusResult,
    StopResult,
    TemplateDetail,
    TemplateList,
    TemplateSummary,
)
from .retry import provider_call
from .templates import Template, TemplateCatalog, format_duration, parse_duration, validate_overrides

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)
Progress = Callable[[str], Awaitable[None] | None]

MAX_BUDGET = Decimal("10000000")       # USD/month; anything above is a typo, not a budget
DEFAULT_KEEP = timedelta(hours=1)
MAX_KEEP = timedelta(days=7)
STALE_CLAIM = timedelta(minutes=10)   # a stop/destroy in flight longer than this died with its process
BOOT_CANDIDATES = 3                    # offers tried in turn when one is taken (capacity error)

_STATE_MAP = {
    ProviderState.PROVISIONING: InstanceState.PROVISIONING,
    ProviderState.LOADING: InstanceState.LOADING,
    ProviderState.RUNNING: InstanceState.RUNNING,
    ProviderState.STOPPING: InstanceState.STOPPING,
    ProviderState.STOPPED: InstanceState.STOPPED,
    ProviderState.STARTING: InstanceState.STARTING,
    ProviderState.DESTROYED: InstanceState.DESTROYED,
    ProviderState.ERROR: InstanceState.ERROR,
}
BILLED_AS_COMPUTE = {InstanceState.PROVISIONING, InstanceState.LOADING, InstanceState.RUNNING,
                     InstanceState.STARTING, InstanceState.STOPPING, InstanceState.ERROR}


async def _call(progress: Progress | None, text: str) -> None:
    if progress is None:
        return
    result = progress(text)
    if asyncio.iscoroutine(result):
        await result


class GpuService:
    def __init__(self, settings: Settings, db: Database, providers: ProviderRegistry,
                 templates: TemplateCatalog, *, clock: Clock | None = None,
                 hub: NotifierHub | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings = settings
        self.db = db
        self.providers = providers
        self.templates = templates
        self.clock = clock or Clock()
        self.hub = hub or NotifierHub()
        self.directory = Directory(settings.default_role, settings.default_team, settings.admins)
        self._sleep = sleep
        self._offer_cache: dict[tuple[str, str], tuple[float, datetime, list[Offer]]] = {}
        self._in_flight: dict[tuple[str, str], asyncio.Future[tuple[list[Offer], datetime]]] = {}

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
        self.db.dispose()

    # --- identity ------------------------------------------------------------------------
    def actor(self, principal: str, *, source: str, display: str = "", role_hint: str | None = None) -> Actor:
        with self.db.session() as s:
            return self.directory.resolve(s, principal, source=source, now=self.clock.now(),
                                          display=display, role_hint=role_hint)

    def local_actor(self, source: str = "shell") -> Actor:
        """The person at this terminal: `local:<user>`, with the configured local role."""
        return self.actor(f"local:{self.settings.local_user}", source=source,
                          display=self.settings.local_user, role_hint=self.settings.local_role)

    def set_user(self, actor: Actor, principal: str, *, role: str | None = None, team: str | None = None) -> User:
        actor.require(Role.ADMIN, "changing users")
        with self.db.session() as s:
            user = Directory.set_user(s, principal, role=role, team=team, now=self.clock.now())
            audit_log.record(s, actor, "user.set", now=self.clock.now(), principal=principal,
                             role=user.role, team=user.team)
            s.commit()
            return user

    @property
    def simulated(self) -> bool:
        return any(p.capabilities.simulated for p in self.providers.all())

    # --- search --------------------------------------------------------------------------
    async def _offers(self, provider: Provider, query: OfferQuery | None) -> tuple[list[Offer], datetime]:
        """One provider's offers, from the cache while fresh. Concurrent searches for the same
        thing share one request instead of each asking the provider."""
        key = (provider.name, provider.search_key(query))
        cached = self._offer_cache.get(key)
        now_mono = self.clock.monotonic()
        if cached and now_mono - cached[0] < self.settings.offer_cache_s:
            return cached[2], cached[1]
        flight = self._in_flight.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._fetch_offers(provider, query, key))
            self._in_flight[key] = flight
            flight.add_done_callback(lambda f, k=key: self._landed(k, f))
        return await asyncio.shield(flight)

    def _landed(self, key: tuple[str, str], flight: asyncio.Future[Any]) -> None:
        self._in_flight.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # retrieved: a search whose waiters all timed out must not warn later

    async def _fetch_offers(self, provider: Provider, query: OfferQuery | None,
                            key: tuple[str, str]) -> tuple[list[Offer], datetime]:
        offers = await provider_call(provider, lambda: provider.search(query), sleep=self._sleep,
                                     what=f"{provider.name} search")
        fetched = self.clock.now()
        self._offer_cache[key] = (self.clock.monotonic(), fetched, offers)
        if len(self._offer_cache) > 256:  # many distinct queries: drop the oldest
            oldest = min(self._offer_cache, key=lambda k: self._offer_cache[k][0])
            self._offer_cache.pop(oldest, None)
        return offers, fetched

    async def _gather_offers(self, names: list[str], query: OfferQuery | None = None) -> Gathered:
        """Ask every provider at once, each within the per-provider time limit; one failing or
        slow provider never holds up or breaks the others: its failure is named instead."""
        providers = [p for p in (self.providers.get(n) for n in names) if p.capabilities.can_search]
        limit = self.settings.provider_timeout_s

        async def one(p: Provider) -> tuple[list[Offer], datetime]:
            try:
                return await asyncio.wait_for(self._offers(p, query), timeout=limit)
            except TimeoutError:
                raise ProviderTimeout(p.display_name, f"no answer within {limit:g}s; "
                                                      "shown without its offers") from None

        results = await asyncio.gather(*(one(p) for p in providers), return_exceptions=True)
        out = Gathered()
        for provider, result in zip(providers, results, strict=True):
            if isinstance(result, BaseException):
                out.failures[provider.name] = (result.message if isinstance(result, GpuherdError)
                                               else f"{provider.name}: unexpected error ({type(result).__name__})")
                if not isinstance(result, GpuherdError):
                    log.error("search on %s failed", provider.name, exc_info=result)
                continue
            found, fetched = result
            out.offers.extend(found)
            out.fetched[provider.name] = fetched
        return out

    def _provider_names(self, wanted: set[str] | frozenset[str] | None) -> list[str]:
        if not wanted:
            return self.providers.names()
        for name in wanted:
            self.providers.get(name)  # NotFound naming it
        return [n for n in self.providers.names() if n in wanted]

    async def search(self, actor: Actor, text: str = "") -> SearchResult:
        actor.require(Role.VIEWER, "searching")
        query = parse_query(text)
        names = self._provider_names(query.providers)
        if names and not any(self.providers.get(n).capabilities.can_search for n in names):
            shown = ", ".join(self.providers.get(n).display_name for n in names)
            raise InvalidInput(f"{shown} has no offers to search: gpuherd attaches existing machines there "
                               f"(/gpu attach {names[0]}:<id>).")
        got = await self._gather_offers(names, query)
        matched = [o for o in got.offers if query.matches(o)]
        limit = query.limit or 10
        shown = query.sort(matched, limit)
        now = self.clock.now()
        ages = {name: max(0, int((now - at).total_seconds())) for name, at in got.fetched.items()}
        sources: dict[tuple[str, str], datetime | None] = {}
        for o in shown:
            if o.price_source:
                key = (o.provider, o.price_source)
                at = sources.get(key)
                sources[key] = o.priced_at if at is None or (o.priced_at and o.priced_at < at) else at
        searched = [n for n in names if self.providers.get(n).capabilities.can_search]
        return SearchResult(query=text, description=query.describe(), offers=shown,
                            total_matches=len(matched), providers=searched, failures=got.failures,
                            price_age_s=max(ages.values(), default=0), provider_ages=ages,
                            price_sources=[PriceSource(provider=p, source=src, priced_at=at,
                                                       age_s=int((now - at).total_seconds()) if at else None)
                                           for (p, src), at in sorted(sources.items())],
                            simulated=any(o.simulated for o in matched) or self._any_simulated(names))

    def _any_simulated(self, names: list[str]) -> bool:
        return any(self.providers.get(n).capabilities.simulated for n in names)

    # --- templates -----------------------------------------------------------------------
    def list_templates(self, actor: Actor) -> TemplateList:
        actor.require(Role.VIEWER, "listing templates")
        return TemplateList(templates=[_summary(t, self.templates) for t in self.templates.all()])

    def show_template(self, actor: Actor, name: str) -> TemplateDetail:
        actor.require(Role.VIEWER, "showing templates")
        t = self.templates.get(name)
        return TemplateDetail(summary=_summary(t, self.templates), fields=t.display_fields(),
                              overrides=self.templates.override_help(t))

    # --- boot ----------------------------------------------------------------------------
    async def boot(self, actor: Actor, template_name: str, *, offer: str | None = None,
                   provider: str | None = None, overrides: dict[str, str] | None = None,
                   idempotency_key: str | None = None, confirm: bool = False, wait: bool = False,
                   progress: Progress | None = None) -> BootResult | Confirmation:
        actor.require(Role.MEMBER, "booting an instance")
        template = self.templates.get(template_name)
        raw_overrides = dict(overrides or {})
        checked = validate_overrides(template, raw_overrides)
        template = checked.template
        cleaned = checked.as_json()           # secrets masked: this is what is stored and shown
        key = idempotency_key or f"gh-{uuid.uuid4().hex}"
        if len(key) > 200:
            raise InvalidInput("The idempotency key is too long (at most 200 characters).")

        with self.db.session() as s:
            existing = s.exec(select(Instance).where(Instance.idempotency_key == key)).scalars().first()  # type: ignore[call-overload]
            if existing is not None:
                return BootResult(instance=self._view(s, existing), offer=None, replayed=True,
                                  ready=existing.state == InstanceState.RUNNING.value,
                                  simulated=existing.simulated)

        spent = self._spent_budgets(actor)
        if spent and not confirm:
            over = "; ".join(f"{'team' if b.scope == 'team' else 'user'} {b.name} has spent {usd(b.spent)} "
                             f"of {usd(b.limit)}" for b in spent)
            if not actor.at_least(Role.ADMIN):
                raise PermissionDenied(f"Budget used up ({over}). New boots need an admin's confirmation "
                                       "or a higher budget (/gpu budget).")
            return Confirmation(action="boot", title="Budget used up",
                                prompt=f"This month's budget is used up: {over}. Boot anyway?",
                                command=_boot_command(template.name, offer, provider, raw_overrides, key))
        if spent and not actor.at_least(Role.ADMIN):
            raise PermissionDenied("Only an admin can boot past a used-up budget.")

        candidates = await self._choose_offers(template, offer=offer, provider=provider)
        chosen = candidates[0]
        max_dph = template.max_dph
        if max_dph is not None and chosen.dph > max_dph and not confirm:
            return self._price_confirmation(template, chosen, max_dph, key, raw_overrides, named=bool(offer))
        if max_dph is not None:
            # never silently fall through to a pricier offer than the one the user accepted
            candidates = [c for c in candidates if c.dph <= max(max_dph, chosen.dph)]

        await _call(progress, f"Booting {template.name} on {chosen.provider} ({chosen.gpu_name} "
                              f"x{chosen.num_gpus}, {rate(chosen.dph)})")
        instance = self._write_intent(actor, template, chosen, key, cleaned)
        last_error: GpuherdError | None = None
        for candidate in candidates[:BOOT_CANDIDATES]:
            try:
                pinst = await self._create_at_provider(instance, template, candidate, key)
            except CapacityError as exc:
                last_error = exc
                if offer:  # the user named this offer: do not swap it silently
                    break
                await _call(progress, f"{candidate.ref} was taken; trying the next cheapest offer")
                continue
            except GpuherdError as exc:
                last_error = exc
                break
            view = self._record_created(actor, instance.id, candidate, pinst, template)
            await self.hub.publish(Notice(kind="instance.booting", at=self.clock.now(), owner=actor.principal,
                                          actor=actor.principal,
                                          team=actor.team, instance_id=view.id, simulated=view.simulated,
                                          text=f"{actor.name} booted {view.id} ({template.name}) on "
                                               f"{view.provider}, {rate(view.dph)}"))
            ready = False
            if wait:
                view, ready = await self._wait_ready(view.id, template, progress)
            note = (f"Above the {rate(max_dph)} limit; confirmed by {actor.name}"
                    if max_dph is not None and candidate.dph > max_dph else None)
            return BootResult(instance=view, offer=candidate, ready=ready, price_note=note,
                              overrides={k: str(v) for k, v in cleaned.items()}, simulated=view.simulated)
        self._mark_failed(actor, instance.id, last_error)
        assert last_error is not None
        raise last_error

    def _price_confirmation(self, template: Template, offer: Offer, max_dph: Decimal, key: str,
                            overrides: dict[str, str], *, named: bool) -> Confirmation:
        return Confirmation(
            action="boot", title="Price above limit",
            command=_boot_command(template.name, offer.ref, None, overrides, key),
            prompt=(f"{'The offer you picked' if named else 'The cheapest matching offer'} is "
                    f"{offer.gpu_name} x{offer.num_gpus} on {offer.provider} at "
                    f"{rate(offer.dph)}, above the {rate(max_dph)} limit of '{template.name}'. "
                    f"That is {usd(offer.dph * HOURS_PER_DAY)} a day, "
                    f"{usd(offer.dph * HOURS_PER_MONTH)} a month if left running. Boot anyway?"),
            cost_per_hour=offer.dph, cost_per_day=offer.dph * HOURS_PER_DAY,
            cost_per_month=offer.dph * HOURS_PER_MONTH, simulated=offer.simulated)

    async def _choose_offers(self, template: Template, *, offer: str | None,
                             provider: str | None) -> list[Offer]:
        """Offers that fit the template, cheapest first at the template's disk size (price limit
        applied by the caller). Each is re-quoted with `dph` = what it will cost while running."""
        if offer:
            if ":" not in offer:
                raise InvalidInput(f"offer='{offer}' should look like <provider>:<id>, e.g. sandbox:sb-0042.")
            pname, oid = offer.split(":", 1)
            chosen = self.providers.get(pname)
            if not chosen.capabilities.can_create:
                raise InvalidInput(f"{chosen.display_name} has no offers to boot: gpuherd only attaches its "
                                   f"machines (gpuherd attach {pname}:<id>).")
            found = await provider_call(chosen, lambda: chosen.get_offer(oid), sleep=self._sleep,
                                        what=f"{pname} offer {oid}")
            if found is None:
                raise NotFound(f"Offer {offer} is not available any more. Run /gpu search for current offers.")
            problem = template.offer_rejection(found)
            if problem:
                raise InvalidInput(f"Offer {offer} does not fit template '{template.name}': {problem}.")
            return [self._priced_for(found, template)]
        allowed = set(template.providers) if template.providers else None
        if provider:
            self.providers.get(provider)
            if allowed is not None and provider not in allowed:
                raise InvalidInput(f"Template '{template.name}' may only boot on {', '.join(sorted(allowed))}.")
            allowed = {provider}
        names = self._provider_names(allowed) if allowed else self.providers.names()
        names = [n for n in names if self.providers.get(n).capabilities.can_create]
        real = [n for n in names if not self.providers.get(n).capabilities.simulated]
        if real and not provider:
            names = real  # the simulated sandbox is never picked for you beside a real cloud
        if not names:
            raise NoMatchingOffer(f"No configured provider can boot '{template.name}' "
                                  f"(allowed: {', '.join(sorted(allowed or [])) or 'none configured'}).")
        got = await self._gather_offers(names, template.offer_query())
        fitting = [self._priced_for(o, template) for o in got.offers
                   if not o.interruptible and template.offer_rejection(o) is None]
        fitting.sort(key=lambda o: (o.dph, -o.reliability, o.ref))
        if not fitting:
            failed = f" ({'; '.join(got.failures.values())})" if got.failures else ""
            raise NoMatchingOffer(f"No offer fits '{template.name}' right now: it needs "
                                  f"{template.constraint_text()}{failed}.")
        return fitting

    @staticmethod
    def _priced_for(offer: Offer, template: Template) -> Offer:
        """The offer as this template would pay for it: its disk, not the search's standard one."""
        return offer.model_copy(update={"dph": offer.dph_for(template.disk_gb)})

    def _write_intent(self, actor: Actor, template: Template, offer: Offer, key: str,
                      cleaned: dict[str, Any]) -> Instance:
        """The intent row is committed before the provider is called: a crash after the provider
        creates the machine leaves a row whose key matches the machine's label."""
        now = self.clock.now()
        with self.db.session() as s:
            taken = set(s.exec(select(Instance.id)).scalars())  # type: ignore[call-overload]
            inst = Instance(id=new_instance_id(taken), idempotency_key=key, provider=offer.provider,
                            offer_id=offer.offer_id, owner=actor.principal, team=actor.team,
                            template=template.name, state=InstanceState.PENDING.value,
                            gpu_name=offer.gpu_name, num_gpus=offer.num_gpus, dph_micros=to_micros(offer.dph),
                            storage_dph_micros=to_micros(offer.storage_rate(template.disk_gb)),
                            disk_gb=template.disk_gb, simulated=offer.simulated,
                            overrides=json.dumps(cleaned),
                            idle_window_s=int(template.idle_window.total_seconds()),
                            warn_lead_s=int(template.warn_lead.total_seconds()), idle_action=template.idle_action,
                            max_lifetime_s=_seconds(template.max_lifetime),
                            destroy_after_stopped_s=_seconds(template.destroy_after_stopped),
                            created_at=now, updated_at=now)
            s.add(inst)
            s.commit()
            return inst

    async def _create_at_provider(self, instance: Instance, template: Template, offer: Offer,
                                  key: str) -> ProviderInstance:
        provider = self.providers.get(offer.provider)
        request = CreateRequest(offer_id=offer.offer_id, label=label_for(key), **template.to_create_fields())
        try:
            # a create is not safely repeatable: on a timeout the machine may exist, so look for
            # our label instead of calling create again
            return await provider.create(request)
        except ProviderError as exc:
            if not exc.retryable:
                raise
            found = await self._find_by_label(provider, label_for(key))
            if found is not None:
                return found
            raise

    async def _find_by_label(self, provider: Provider, label: str) -> ProviderInstance | None:
        try:
            listed = await provider_call(provider, provider.list, sleep=self._sleep, what=f"{provider.name} list")
        except ProviderError:
            return None
        return next((p for p in listed if p.label == label), None)

    def _record_created(self, actor: Actor, instance_id: str, offer: Offer, pinst: ProviderInstance,
                        template: Template) -> InstanceView:
        """Tie the intent row to the machine and start billing. Exactly once: a boot that comes
        back late and a reconcile that found the machine first cannot both record it."""
        now = self.clock.now()
        with self.db.session() as s:
            claimed = s.exec(update(Instance).where(  # type: ignore[call-overload]
                Instance.id == instance_id, Instance.provider_id.is_(None))  # type: ignore[union-attr]
                .values(provider_id=pinst.provider_id))
            inst = s.get(Instance, instance_id)
            assert inst is not None
            if claimed.rowcount != 1:
                s.rollback()
                return self._view(s, inst)
            s.refresh(inst)
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
            inst.state = (_STATE_MAP.get(pinst.state) or InstanceState.PROVISIONING).value
            inst.endpoint = pinst.endpoint
            inst.started_at = now
            inst.last_activity_at = now
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
            s.commit()
            return self._view(s, inst)

    def _mark_failed(self, actor: Actor, instance_id: str, error: GpuherdError | None) -> None:
        """Close an intent whose machine was never made. Never touches one whose machine was
        recorded meanwhile (a slow create that came back while reconcile gave up on it)."""
        now = self.clock.now()
        message = (error.message if error else "create failed")[:500]
        with self.db.session() as s:
            failed = s.exec(update(Instance).where(  # type: ignore[call-overload]
                Instance.id == instance_id, Instance.provider_id.is_(None))  # type: ignore[union-attr]
                .values(state=InstanceState.FAILED.value, status_message=message, updated_at=now,
                        next_guard_at=None, version=Instance.version + 1))
            if failed.rowcount != 1:
                s.rollback()
                return
            inst = s.get(Instance, instance_id)
            audit_log.record(s, actor, "boot", now=now, instance_id=instance_id, ok=False,
                             template=inst.template if inst else None, error=message)
            s.commit()

    async def _wait_ready(self, instance_id: str, template: Template | None,
                          progress: Progress | None) -> tuple[InstanceView, bool]:
        """Poll the provider until the machine runs and its health check passes, or time out."""
        started = self.clock.monotonic()
        deadline = started + self.settings.boot_timeout_s
        last_state = None
        while True:
            with self.db.session() as s:
                inst = self._get(s, instance_id)
                provider = self.providers.get(inst.provider)
            pinst = await provider.get(inst.provider_id) if inst.provider_id else None
            view = self._sync(instance_id, pinst)
            if view.state != last_state:
                await _call(progress, f"{view.id}: {view.state}")
                last_state = view.state
            if pinst is not None and pinst.state is ProviderState.RUNNING:
                path = template.health_path if template else None
                port = template.health_port if template else None
                if await provider.health(pinst, path, port):
                    await _call(progress, f"{view.id}: healthy")
                    return view, True
            if view.state in (InstanceState.STOPPED.value, InstanceState.ERROR.value) or \
                    InstanceState(view.state).is_final:
                return view, False
            if self.clock.monotonic() >= deadline:
                await _call(progress, f"{view.id}: not healthy after {int(self.settings.boot_timeout_s)} s")
                return view, False
            await self._sleep(self.settings.poll_interval_s)

    # --- provider state sync -------------------------------------------------------------
    def _sync(self, instance_id: str, pinst: ProviderInstance | None) -> InstanceView:
        """Bring our record in line with what the provider reports; bill the transition."""
        now = self.clock.now()
        with self.db.session() as s:
            inst = self._get(s, instance_id)
            self._apply_provider_state(s, inst, pinst, now)
            s.commit()
            return self._view(s, inst)

    def _apply_provider_state(self, s: Session, inst: Instance, pinst: ProviderInstance | None,
                              now: datetime) -> None:
        """Fold what the provider reports into our record, billing any change it implies. Writes
        only when something changed; never touches a transition the service itself has in flight
        (stopping, destroying) unless that claim is stale (its process died)."""
        state = inst.state_enum
        if state.is_final or state is InstanceState.PENDING:
            return
        in_flight = state in (InstanceState.STOPPING, InstanceState.DESTROYING)
        if in_flight and now - as_utc(inst.updated_at) < STALE_CLAIM:
            return
        before = (inst.state, inst.endpoint, inst.status_message)
        if pinst is None or pinst.state is ProviderState.DESTROYED:
            Ledger.close(s, inst.id, now)
            inst.state = InstanceState.LOST.value if state is not InstanceState.DESTROYING else InstanceState.DESTROYED.value
            inst.status_message = "gone at the provider"
            inst.destroyed_at = now
            audit_log.record(s, system_actor("sync"), "instance.lost", now=now, instance_id=inst.id,
                             provider=inst.provider, provider_id=inst.provider_id)
        else:
            new = _STATE_MAP.get(pinst.state, state)
            if new is InstanceState.STOPPING:
                new = state if not in_flight else InstanceState.RUNNING  # billed as running until stopped
            if (state is InstanceState.STARTING and new is InstanceState.STOPPED
                    and now - as_utc(inst.updated_at) < STALE_CLAIM):
                return  # our start was accepted; the provider has not caught up yet (or it failed late)
            if new is InstanceState.RUNNING and state in (InstanceState.PROVISIONING, InstanceState.LOADING,
                                                          InstanceState.STARTING):
                # ready now: the idle clock starts when someone could first use it, not at the order
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
            inst.state = new.value
            inst.endpoint = pinst.endpoint or inst.endpoint
            inst.status_message = pinst.message
        if (inst.state, inst.endpoint, inst.status_message) == before:
            return
        inst.updated_at = now
        inst.version += 1
        replan(inst)
        s.add(inst)

    async def refresh(self, instances: list[Instance], *, list_providers: list[str] | None = None) -> Refresh:
        """One list call per provider, then sync each instance. Returns the fresh rows, what each
        provider reported, every listing (`list_providers` are listed even without rows: reconcile
        wants to see machines gpuherd does not know), and which providers could not be asked
        (their rows are left as they were)."""
        out = Refresh(rows={i.id: i for i in instances})
        by_provider: dict[str, list[Instance]] = {}
        for inst in instances:
            if not inst.state_enum.is_final and inst.state != InstanceState.PENDING.value and inst.provider_id:
                by_provider.setdefault(inst.provider, []).append(inst)
        names = [n for n in dict.fromkeys([*by_provider, *(list_providers or [])]) if n in self.providers]
        names = [n for n in names if self.providers.get(n).capabilities.can_list]
        if not names:
            return out
        listed = await asyncio.gather(*(self._list(self.providers.get(n)) for n in names), return_exceptions=True)
        missing: list[tuple[str, Instance]] = []
        for name, result in zip(names, listed, strict=True):
            if isinstance(result, BaseException):
                out.failed[name] = (result.message if isinstance(result, GpuherdError)
                                    else f"{name}: unexpected error ({type(result).__name__})")
                log.warning("could not list %s: %s", name, out.failed[name])
                continue
            out.listed[name] = result
            seen = {p.provider_id: p for p in result}
            for inst in by_provider.get(name, []):
                if inst.provider_id in seen:
                    out.views[inst.id] = seen[inst.provider_id]
                else:
                    missing.append((name, inst))
        if missing:
            # absent from a listing is not proof of death (a page that shifted, a filtered list):
            # ask for each one before closing its bill
            confirmed = await asyncio.gather(*(self._confirm(self.providers.get(n), i) for n, i in missing))
            for (_, inst), found in zip(missing, confirmed, strict=True):
                if found is not False:
                    out.views[inst.id] = found
        if not out.views:
            return out
        now = self.clock.now()
        with self.db.session() as s:
            fresh = {i.id: i for i in s.exec(select(Instance).where(  # type: ignore[call-overload]
                Instance.id.in_(list(out.views)))).scalars()}  # type: ignore[attr-defined]
            for iid, row in fresh.items():
                before = row.state
                self._apply_provider_state(s, row, out.views[iid], now)
                if row.state == InstanceState.LOST.value and before != row.state:
                    out.lost.append(iid)
            s.commit()
        out.rows.update(fresh)
        return out

    async def _list(self, provider: Provider) -> list[ProviderInstance]:
        return await provider_call(provider, provider.list, sleep=self._sleep, what=f"{provider.name} list")

    async def _confirm(self, provider: Provider, inst: Instance) -> ProviderInstance | None | bool:
        """The machine as `get` sees it; None when gone; False when the provider cannot say."""
        try:
            return await provider_call(provider, lambda: provider.get(inst.provider_id or ""),
                                       sleep=self._sleep, what=f"{provider.name} get")
        except GpuherdError as exc:
            log.warning("could not confirm %s at %s: %s", inst.id, provider.name, exc.message)
            return False

    # --- start / stop / destroy ----------------------------------------------------------
    def _get(self, s: Session, instance_id: str) -> Instance:
        iid = normalise_instance_id(instance_id)
        inst = s.get(Instance, iid) if ID_RE.match(iid) else None
        if inst is None:
            raise NotFound(f"No instance '{instance_id}'. /gpu status lists yours (ids look like g-7f3a).")
        return inst

    def _get_for_action(self, s: Session, actor: Actor, instance_id: str, doing: str) -> Instance:
        actor.require(Role.MEMBER, doing)
        inst = self._get(s, instance_id)
        if not actor.may_act_on(inst):
            raise PermissionDenied(f"{inst.id} belongs to {inst.owner}; members may only {doing.split()[0]} "
                                   "their own instances. Ask its owner or an admin.")
        return inst

    def _replay(self, key: str | None, action: str, model: type[R]) -> R | None:
        if not key:
            return None
        with self.db.session() as s:
            rec = s.get(ActionRecord, f"{action}:{key}")
            return model.model_validate_json(rec.result) if rec else None

    def _remember(self, s: Session, key: str | None, action: str, actor: Actor, instance_id: str,
                  result: BaseModel) -> None:
        if key:
            s.add(ActionRecord(key=f"{action}:{key}", action=action, actor=actor.principal,
                               instance_id=instance_id, result=result.model_dump_json(),
                               created_at=self.clock.now()))

    def _claim(self, s: Session, inst: Instance, to_state: InstanceState) -> bool:
        """Move to a transitional state only if nobody changed the row since we read it, so two
        processes (or a double click) never act on one instance twice."""
        result = s.exec(update(Instance).where(Instance.id == inst.id, Instance.version == inst.version)  # type: ignore[call-overload]
                        .values(state=to_state.value, version=inst.version + 1, updated_at=self.clock.now()))
        s.commit()
        if result.rowcount == 1:
            inst.state = to_state.value
            inst.version += 1
            return True
        return False

    async def stop(self, actor: Actor, instance_id: str, *, idempotency_key: str | None = None) -> StopResult:
        replay = self._replay(idempotency_key, "stop", StopResult)
        if replay:
            return replay
        with self.db.session() as s:
            inst = self._get_for_action(s, actor, instance_id, "stop an instance")
            state = inst.state_enum
            if state is InstanceState.STOPPED:
                since = as_utc(inst.stopped_at).strftime("%Y-%m-%d %H:%M UTC") if inst.stopped_at else "earlier"
                raise Conflict(f"{inst.id} is already stopped (since {since}); it is billed only for storage. "
                               f"/gpu destroy {inst.id} ends that too.")
            if state.is_final:
                raise Conflict(f"{inst.id} is {state.value}; there is nothing to stop.")
            if state in (InstanceState.PENDING, InstanceState.STOPPING, InstanceState.DESTROYING):
                raise Conflict(f"{inst.id} is {state.value}; try again in a moment.")
            provider = self.providers.get(inst.provider)
            if not provider.capabilities.can_stop:
                raise Conflict(f"{provider.display_name} cannot stop machines (only destroy): "
                               f"/gpu destroy {inst.id}.")
            previous = inst.state
            if not self._claim(s, inst, InstanceState.STOPPING):
                raise Conflict(f"{inst.id} changed while you asked (another stop or start?). Check /gpu status {inst.id}.")
        await self._at_provider(actor, inst, "stop", lambda: provider.stop(inst.provider_id or ""),
                                revert_to=previous, still="It is still running and billing; try again or destroy it.")
        now = self.clock.now()
        with self.db.session() as s:
            inst = self._get(s, inst.id)
            session_start = inst.started_at or inst.created_at
            Ledger.close(s, inst.id, now, COMPUTE)
            if provider.capabilities.storage_bills_while_stopped and inst.storage_dph_micros:
                Ledger.open(s, inst, STORAGE, inst.storage_dph_micros, now)
            inst.state = InstanceState.STOPPED.value
            inst.stopped_at = now
            inst.updated_at = now
            inst.version += 1
            inst.stopped_warned_at = None
            replan(inst)
            s.add(inst)
            s.flush()
            cost = Ledger.instance_cost(s, inst.id, now, since=session_start, kind=COMPUTE)
            seconds = max(0, int((now - as_utc(session_start)).total_seconds()))
            result = StopResult(instance=self._view(s, inst), session_cost=cost, session_s=seconds,
                                storage_dph=from_micros(inst.storage_dph_micros), simulated=inst.simulated)
            audit_log.record(s, actor, "stop", now=now, instance_id=inst.id, cost=cost, session_s=seconds)
            self._remember(s, idempotency_key, "stop", actor, inst.id, result)
            s.commit()
        if actor.source != "system":  # a guard reports its own action, with the reason
            await self.hub.publish(Notice(kind="instance.stopped", at=now, owner=inst.owner, team=inst.team,
                                          actor=actor.principal,
                                          instance_id=inst.id, simulated=inst.simulated,
                                          text=f"{actor.name} stopped {inst.id}: session cost {usd(cost)}"))
        return result

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
            now = self.clock.now()
            with self.db.session() as s:
                row = self._get(s, inst.id)
                row.state = revert_to
                row.updated_at = now
                row.version += 1
                s.add(row)
                audit_log.record(s, actor, action, now=now, instance_id=inst.id, ok=False, error=exc.message)
                s.commit()
            raise ProviderError(inst.provider, f"{action} of {inst.id} failed: {exc.message}. {still}") from None

    async def start(self, actor: Actor, instance_id: str, *, idempotency_key: str | None = None,
                    wait: bool = True, progress: Progress | None = None) -> StartResult:
        replay = self._replay(idempotency_key, "start", StartResult)
        if replay:
            return replay
        with self.db.session() as s:
            inst = self._get_for_action(s, actor, instance_id, "start an instance")
            state = inst.state_enum
            if state in (InstanceState.RUNNING, InstanceState.STARTING, InstanceState.LOADING,
                         InstanceState.PROVISIONING):
                raise Conflict(f"{inst.id} is already {state.value}.")
            if state is not InstanceState.STOPPED:
                raise Conflict(f"{inst.id} is {state.value}; only a stopped instance can be started.")
            provider = self.providers.get(inst.provider)
            if not self._claim(s, inst, InstanceState.STARTING):
                raise Conflict(f"{inst.id} changed while you asked. Check /gpu status {inst.id}.")
        await self._at_provider(actor, inst, "start", lambda: provider.start(inst.provider_id or ""),
                                revert_to=InstanceState.STOPPED.value, still="It is still stopped.")
        now = self.clock.now()
        with self.db.session() as s:
            inst = self._get(s, inst.id)
            Ledger.close(s, inst.id, now, STORAGE)
            Ledger.open(s, inst, COMPUTE, inst.dph_micros, now)
            inst.started_at = now
            inst.last_activity_at = now
            inst.updated_at = now
            inst.version += 1
            inst.idle_warned_at = None
            replan(inst)
            s.add(inst)
            audit_log.record(s, actor, "start", now=now, instance_id=inst.id, dph=str(from_micros(inst.dph_micros)))
            s.commit()
        await _call(progress, f"Starting {inst.id}…")
        template = self.templates.find(inst.template)
        began = self.clock.monotonic()
        view, ready = (await self._wait_ready(inst.id, template, progress) if wait
                       else (self._sync(inst.id, await provider.get(inst.provider_id or "")), False))
        result = StartResult(instance=view, ready=ready, waited_s=round(self.clock.monotonic() - began, 1),
                             simulated=inst.simulated)
        with self.db.session() as s:
            self._remember(s, idempotency_key, "start", actor, inst.id, result)
            s.commit()
        return result

    async def destroy(self, actor: Actor, instance_id: str, *, confirm: bool = False,
                      idempotency_key: str | None = None) -> DestroyResult | Confirmation:
        replay = self._replay(idempotency_key, "destroy", DestroyResult)
        if replay:
            return replay
        with self.db.session() as s:
            inst = self._get_for_action(s, actor, instance_id, "destroy an instance")
            state = inst.state_enum
            if state.is_final:
                raise Conflict(f"{inst.id} is already {state.value}.")
            if state is InstanceState.DESTROYING:
                raise Conflict(f"{inst.id} is being destroyed already.")
            if not confirm:
                key = f" key={idempotency_key}" if idempotency_key else ""
                return Confirmation(
                    action="destroy", title=f"Destroy {inst.id}?", command=f"/gpu destroy {inst.id} confirm=yes{key}",
                    prompt=(f"Destroy {inst.id} ({inst.template}, {inst.gpu_name} x{inst.num_gpus} on "
                            f"{inst.provider})? Its disk and everything on it are deleted; billing ends."),
                    simulated=inst.simulated)
            provider = self.providers.get(inst.provider)
            previous = inst.state
            if not self._claim(s, inst, InstanceState.DESTROYING):
                raise Conflict(f"{inst.id} changed while you asked. Check /gpu status {inst.id}.")
        if inst.provider_id:
            await self._at_provider(actor, inst, "destroy", lambda: provider.destroy(inst.provider_id or ""),
                                    revert_to=previous, still="It still exists and bills; try again.",
                                    done_anyway=lambda: self._gone(provider, inst.provider_id or ""))
        now = self.clock.now()
        with self.db.session() as s:
            inst = self._get(s, inst.id)
            Ledger.close(s, inst.id, now)
            inst.state = InstanceState.DESTROYED.value
            inst.destroyed_at = now
            inst.updated_at = now
            inst.version += 1
            inst.next_guard_at = None
            s.add(inst)
            s.flush()
            total = Ledger.instance_cost(s, inst.id, now)
            result = DestroyResult(instance=self._view(s, inst), total_cost=total, simulated=inst.simulated)
            audit_log.record(s, actor, "destroy", now=now, instance_id=inst.id, cost=total)
            self._remember(s, idempotency_key, "destroy", actor, inst.id, result)
            s.commit()
        if actor.source != "system":  # a guard reports its own action, with the reason
            await self.hub.publish(Notice(kind="instance.destroyed", at=now, owner=inst.owner, team=inst.team,
                                          actor=actor.principal,
                                          instance_id=inst.id, simulated=inst.simulated,
                                          text=f"{actor.name} destroyed {inst.id}: total cost {usd(total)}"))
        return result

    async def _gone(self, provider: Provider, provider_id: str) -> bool:
        """After a failed destroy: is the machine gone anyway? Unknown counts as no."""
        try:
            found = await provider.get(provider_id)
        except GpuherdError:
            return False
        return found is None or found.state is ProviderState.DESTROYED

    # --- keep / activity -----------------------------------------------------------------
    async def keep(self, actor: Actor, instance_id: str, duration: str | None = None) -> KeepResult:
        span = parse_duration(duration) if duration else DEFAULT_KEEP
        if span <= timedelta(0):
            raise InvalidInput(f"Keep for how long? '{duration}' is not a positive duration (try 1h, 30m, 2d).")
        if span > MAX_KEEP:
            raise InvalidInput(f"Keep for at most {format_duration(MAX_KEEP)}; '{duration}' is longer. "
                               "Idle machines cost money: ask again later.")
        now = self.clock.now()
        with self.db.session() as s:
            inst = self._get_for_action(s, actor, instance_id, "keep an instance")
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
            self._add_activity(s, inst.id, "keep", now, f"by {actor.principal} for {format_duration(span)}")
            audit_log.record(s, actor, "keep", now=now, instance_id=inst.id, until=until.isoformat())
            s.commit()
            return KeepResult(instance=self._view(s, inst), until=until, simulated=inst.simulated)

    def record_activity(self, actor: Actor, instance_id: str, source: str = "ping",
                        detail: str | None = None) -> InstanceView:
        """An explicit sign of use (API ping, notebook heartbeat)."""
        actor.require(Role.MEMBER, "reporting activity")
        now = self.clock.now()
        with self.db.session() as s:
            inst = self._get(s, instance_id)
            if inst.state_enum.is_final:
                raise Conflict(f"{inst.id} is {inst.state}; activity is not recorded for it.")
            inst.last_activity_at = now
            inst.idle_warned_at = None
            inst.version += 1
            replan(inst)
            s.add(inst)
            self._add_activity(s, inst.id, source, now, detail)
            s.commit()
            return self._view(s, inst)

    @staticmethod
    def _add_activity(s: Session, instance_id: str, source: str, now: datetime, detail: str | None) -> None:
        from .models import Activity
        s.add(Activity(instance_id=instance_id, ts=now, source=source, detail=(detail or "")[:256]))

    # --- status --------------------------------------------------------------------------
    async def status(self, actor: Actor, instance_id: str | None = None, *, include_ended: bool = False,
                     refresh: bool = True) -> StatusResult:
        actor.require(Role.VIEWER, "viewing status")
        with self.db.session() as s:
            if instance_id:
                rows = [self._get(s, instance_id)]
            else:
                stmt = select(Instance).order_by(Instance.created_at.desc())  # type: ignore[union-attr]
                if not include_ended:
                    stmt = stmt.where(Instance.state.not_in([st.value for st in InstanceState if st.is_final]))
                rows = list(s.exec(stmt).scalars())  # type: ignore[call-overload]
        synced = await self.refresh(rows) if refresh else Refresh(rows={r.id: r for r in rows})
        with self.db.session() as s:
            views = self._views(s, [synced.rows[r.id] for r in rows])
            run_rate = Ledger.run_rate(s)
        return StatusResult(instances=views, run_rate=run_rate, include_ended=include_ended,
                            stale=synced.failed,
                            simulated=any(v.simulated for v in views) or self.simulated)

    def _view(self, s: Session, inst: Instance) -> InstanceView:
        return self._views(s, [inst])[0]

    def _views(self, s: Session, rows: list[Instance]) -> list[InstanceView]:
        now = self.clock.now()
        accrued = Ledger.costs_by_instance(s, [r.id for r in rows], now)
        views = []
        for inst in rows:
            state = inst.state_enum
            up = state in BILLED_AS_COMPUTE
            current = (from_micros(inst.dph_micros) if up else
                       from_micros(inst.storage_dph_micros) if state is InstanceState.STOPPED else Decimal(0))
            started = as_utc(inst.started_at) if inst.started_at else None
            gp = guard_plan(inst)
            nxt = gp.next_action
            last = as_utc(inst.last_activity_at) if inst.last_activity_at else started
            views.append(InstanceView(
                id=inst.id, provider=inst.provider, provider_id=inst.provider_id, owner=inst.owner,
                team=inst.team, template=inst.template, state=inst.state, gpu_name=inst.gpu_name,
                num_gpus=inst.num_gpus, dph=from_micros(inst.dph_micros),
                storage_dph=from_micros(inst.storage_dph_micros), current_dph=current,
                accrued=accrued.get(inst.id, Decimal(0)),
                uptime_s=int((now - started).total_seconds()) if up and started else None,
                idle_for_s=int((now - last).total_seconds()) if up and last else None,
                keep_until=as_utc(inst.keep_until) if inst.keep_until and as_utc(inst.keep_until) > now else None,
                endpoint=inst.endpoint, created_at=as_utc(inst.created_at),
                stopped_at=as_utc(inst.stopped_at) if inst.stopped_at and state is InstanceState.STOPPED else None,
                message=inst.status_message, simulated=inst.simulated,
                next_action=nxt.text if nxt else None, next_action_at=nxt.at if nxt else None,
                guards=[(g.name, g.armed, g.detail) for g in gp.guards], guard_error=inst.guard_error,
                activity=inst.activity_status, activity_detail=inst.activity_detail))
        return views

    # --- money ---------------------------------------------------------------------------
    def costs(self, actor: Actor, period: str | None = None, by: str | None = None) -> CostReport:
        actor.require(Role.VIEWER, "viewing costs")
        group_by = (by or "user").lower()
        if group_by not in ("user", "team", "template", "provider"):
            raise InvalidInput(f"Cannot group costs by '{by}': use by=user, team, template or provider.")
        now = self.clock.now()
        span = parse_period(period, now)
        month = month_of(now)
        with self.db.session() as s:
            budgets = self._visible_budgets(s, actor)
            # one scan of the month, grouped by everything the report needs
            keys = list(dict.fromkeys([group_by, *(b.scope for b in budgets)]))
            month_rows = Ledger.grouped_by(s, month.start, month.end, now, keys)
            groups = (Ledger.rollup(month_rows, 0) if (span.start, span.end) == (month.start, month.end)
                      else Ledger.grouped(s, span.start, span.end, now, group_by))  # type: ignore[arg-type]
            mtd = sum((amount for _, amount in month_rows), Decimal(0))
            running_rows = list(s.exec(select(Instance).where(  # type: ignore[call-overload]
                Instance.state.in_([st.value for st in BILLED_AS_COMPUTE | {InstanceState.STOPPED}]))).scalars())
            running = [v for v in self._views(s, running_rows) if v.current_dph > 0]
            running.sort(key=lambda v: -v.current_dph)
            run_rate = Ledger.run_rate(s)
            uses = _budget_uses(budgets, {k: dict(Ledger.rollup(month_rows, i)) for i, k in enumerate(keys)})
        return CostReport(period=span.label, start=span.start, end=span.end, group_by=group_by,
                          total=sum((amount for _, amount in groups), Decimal(0)), groups=groups,
                          running=running, run_rate=run_rate, month_to_date=mtd,
                          projected_month_end=Ledger.projection(mtd, run_rate, now), budgets=uses,
                          simulated=self.simulated or any(v.simulated for v in running))

    def instance_cost(self, actor: Actor, instance_id: str) -> InstanceCost:
        actor.require(Role.VIEWER, "viewing costs")
        now = self.clock.now()
        with self.db.session() as s:
            inst = self._get(s, instance_id)
            view = self._view(s, inst)
            compute = Ledger.instance_cost(s, inst.id, now, kind=COMPUTE)
            storage = Ledger.instance_cost(s, inst.id, now, kind=STORAGE)
            seconds = sum(((seg.end_ts or int(now.timestamp())) - seg.start_ts)
                          for seg in Ledger.segments(s, inst.id) if seg.kind == COMPUTE)
        hourly = view.current_dph
        return InstanceCost(instance=view, hourly=hourly, total=compute + storage, compute=compute,
                            storage=storage, uptime_s=max(0, seconds), projected_day=hourly * HOURS_PER_DAY,
                            projected_month=hourly * HOURS_PER_MONTH, simulated=inst.simulated)

    def _spent_budgets(self, actor: Actor) -> list[BudgetUse]:
        """The actor's team and user budgets that are used up this month."""
        with self.db.session() as s:
            own = list(s.exec(select(Budget).where(  # type: ignore[call-overload]
                ((Budget.scope == "team") & (Budget.name == actor.team))
                | ((Budget.scope == "user") & (Budget.name == actor.principal)))).scalars())
            return [u for u in self.budget_uses(s, own) if u.spent >= u.limit]

    def budget_uses(self, s: Session, budgets: list[Budget]) -> list[BudgetUse]:
        """This month's spend against each budget, in one scan of the ledger."""
        if not budgets:
            return []
        now = self.clock.now()
        month = month_of(now)
        keys = list(dict.fromkeys(b.scope for b in budgets))
        rows = Ledger.grouped_by(s, month.start, month.end, now, keys)
        return _budget_uses(budgets, {k: dict(Ledger.rollup(rows, i)) for i, k in enumerate(keys)})

    def _visible_budgets(self, s: Session, actor: Actor) -> list[Budget]:
        """Admins see every budget; others their team's and their own."""
        stmt = select(Budget).order_by(Budget.scope, Budget.name)
        if not actor.at_least(Role.ADMIN):
            stmt = stmt.where(((Budget.scope == "team") & (Budget.name == actor.team))
                              | ((Budget.scope == "user") & (Budget.name == actor.principal)))
        return list(s.exec(stmt).scalars())  # type: ignore[call-overload]

    def budgets(self, actor: Actor) -> BudgetResult:
        actor.require(Role.VIEWER, "viewing budgets")
        with self.db.session() as s:
            uses = self.budget_uses(s, self._visible_budgets(s, actor))
        return BudgetResult(budgets=uses, period=month_of(self.clock.now()).label)

    def set_budget(self, actor: Actor, scope: str, name: str, amount: str | Decimal,
                   hard_cap: bool | None = None) -> BudgetResult:
        actor.require(Role.ADMIN, "setting budgets")
        if scope not in ("team", "user"):
            raise InvalidInput(f"Budgets are per team or per user, not '{scope}': /gpu budget set team=ml 500")
        if not name or len(name) > 128:
            raise InvalidInput("Name the team or user the budget is for.")
        try:
            value = to_decimal(amount)
        except ValueError:
            raise InvalidInput(f"'{amount}' is not an amount in USD (e.g. 500 or 1250.50).") from None
        if value <= 0:
            raise InvalidInput(f"A budget must be more than $0; got {amount}. To remove one: /gpu budget clear {scope}={name}")
        if value > MAX_BUDGET:
            raise InvalidInput(f"{usd(value)} a month is not a plausible budget (limit {usd(MAX_BUDGET)}); check the amount.")
        if value.as_tuple().exponent < -2:  # type: ignore[operator]
            raise InvalidInput(f"Budgets are in whole cents; got {amount}.")
        now = self.clock.now()
        with self.db.session() as s:
            b = s.exec(select(Budget).where(Budget.scope == scope, Budget.name == name)).scalars().first()  # type: ignore[call-overload]
            old = from_micros(b.monthly_micros) if b else None
            b = b or Budget(scope=scope, name=name, monthly_micros=0, updated_by=actor.principal, updated_at=now)
            b.monthly_micros = to_micros(value)
            if hard_cap is not None:
                b.hard_cap = hard_cap
            b.updated_by = actor.principal
            b.updated_at = now
            s.add(b)
            audit_log.record(s, actor, "budget.set", now=now, scope=scope, name=name, amount=str(value),
                             previous=str(old) if old is not None else None, hard_cap=b.hard_cap)
            s.commit()
        result = self.budgets(actor)
        changed = next((u for u in result.budgets if u.scope == scope and u.name == name), None)
        return result.model_copy(update={"changed": changed})

    def clear_budget(self, actor: Actor, scope: str, name: str) -> BudgetResult:
        actor.require(Role.ADMIN, "removing budgets")
        with self.db.session() as s:
            b = s.exec(select(Budget).where(Budget.scope == scope, Budget.name == name)).scalars().first()  # type: ignore[call-overload]
            if b is None:
                raise NotFound(f"There is no {scope} budget for '{name}'.")
            s.delete(b)
            audit_log.record(s, actor, "budget.clear", now=self.clock.now(), scope=scope, name=name)
            s.commit()
        return self.budgets(actor)

    # --- audit ---------------------------------------------------------------------------
    def audit(self, actor: Actor, n: int = 20, instance_id: str | None = None) -> AuditResult:
        actor.require(Role.ADMIN, "reading the audit log")
        if not 1 <= n <= 500:
            raise InvalidInput(f"Show between 1 and 500 audit events, not {n}.")
        with self.db.session() as s:
            iid = self._get(s, instance_id).id if instance_id else None
            rows = audit_log.recent(s, n, iid)
        return AuditResult(events=[AuditEntry(ts=as_utc(r.ts), actor=r.actor, source=r.source, event=r.event,
                                              instance_id=r.instance_id,
                                              cost=from_micros(r.cost_micros) if r.cost_micros is not None else None,
                                              ok=r.ok, details=json.loads(r.details or "{}")) for r in rows])

    # --- guards --------------------------------------------------------------------------
    def audit_system(self, guard: str, event: str, instance_id: str | None, text: str) -> None:
        """An audit event by a guard, with `system:<guard>` as the actor."""
        with self.db.session() as s:
            audit_log.record(s, system_actor(guard), event, now=self.clock.now(), instance_id=instance_id, text=text)
            s.commit()

    def guard_overview(self, actor: Actor, limit: int = 10) -> GuardOverview:
        actor.require(Role.VIEWER, "viewing the guards")
        final = [st.value for st in InstanceState if st.is_final]
        with self.db.session() as s:
            state = s.get(SchedulerState, "guards")
            live = list(s.exec(select(Instance).where(Instance.state.not_in(final))).scalars())  # type: ignore[call-overload]
            views = self._views(s, live)
        upcoming = sorted((v for v in views if v.next_action_at), key=lambda v: v.next_action_at)[:limit]  # type: ignore[arg-type,return-value]
        blind = [v for v in views if v.guard_error]
        return GuardOverview(
            leader=state.leader if state else None,
            last_run_at=as_utc(state.last_run_at) if state and state.last_run_at else None,
            last_pass_ms=state.last_pass_ms if state else None, last_checked=state.last_checked if state else 0,
            last_acted=state.last_acted if state else 0,
            next_wake_at=as_utc(state.next_wake_at) if state and state.next_wake_at else None,
            last_error=state.last_error if state else None,
            budgets_checked_at=as_utc(state.budgets_checked_at) if state and state.budgets_checked_at else None,
            upcoming=upcoming, blind=blind, simulated=any(v.simulated for v in views))

    # --- crash recovery ------------------------------------------------------------------
    async def resolve_pending(self) -> list[str]:
        """Boot intents left by a crash, at start: a reconcile pass adopts each machine that has
        the intent's label and fails the intents whose machine never appeared. Skipped (no
        provider is asked) when no intent is pending. Returns the ids adopted."""
        with self.db.session() as s:
            pending = s.exec(select(func.count()).select_from(Instance).where(  # type: ignore[call-overload]
                Instance.state == InstanceState.PENDING.value)).one()[0]
        if not pending:
            return []
        return (await self.reconcile()).adopted

    # --- reconcile / attach --------------------------------------------------------------
    async def reconcile(self, actor: Actor | None = None) -> ReconcileResult:
        """Compare every provider's machines with the database (see core.reconcile)."""
        from .reconcile import Reconciler
        result = await Reconciler(self).run(actor)
        return result.model_copy(update={"simulated": self.simulated})

    async def attach(self, actor: Actor, ref: str, *, template: str | None = None, idle: str | None = None,
                     owner: str | None = None) -> AttachResult:
        from .reconcile import Reconciler
        return await Reconciler(self).attach(actor, ref, template=template, idle=idle, owner=owner)

    async def attach_configured(self) -> list[str]:
        from .reconcile import Reconciler
        return await Reconciler(self).attach_configured()

    def instance_count(self) -> int:
        with self.db.session() as s:
            return int(s.exec(select(func.count()).select_from(Instance)).one()[0])  # type: ignore[call-overload]


@dataclass
class Gathered:
    offers: list[Offer] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)        # provider -> why it is missing
    fetched: dict[str, datetime] = field(default_factory=dict)    # provider -> when its offers were asked


@dataclass
class Refresh:
    rows: dict[str, Instance]                                         # by id, synced where possible
    views: dict[str, ProviderInstance | None] = field(default_factory=dict)  # None: gone at the provider
    failed: dict[str, str] = field(default_factory=dict)              # provider -> why it was not asked
    listed: dict[str, list[ProviderInstance]] = field(default_factory=dict)  # provider -> its machines
    lost: list[str] = field(default_factory=list)                     # ids found gone by this refresh


def _budget_uses(budgets: list[Budget], spend: dict[str, dict[str, Decimal]]) -> list[BudgetUse]:
    """`spend[scope][name]` is this month's spend of that team or user."""
    return [BudgetUse(scope=b.scope, name=b.name, limit=from_micros(b.monthly_micros),
                      spent=spend.get(b.scope, {}).get(b.name, Decimal(0)), hard_cap=b.hard_cap)
            for b in budgets]


def _seconds(td: timedelta | None) -> int | None:
    return int(td.total_seconds()) if td is not None else None


def _boot_command(template: str, offer: str | None, provider: str | None, overrides: dict[str, str],
                  key: str) -> str:
    """The /gpu boot line a confirm button re-runs: same request, same key, confirm=yes."""
    parts = [f"/gpu boot {template}"]
    if offer:
        parts.append(f"offer={offer}")
    if provider:
        parts.append(f"provider={provider}")
    parts += [f"{k}={_quote(str(v))}" for k, v in overrides.items()]
    parts += [f"key={key}", "confirm=yes"]
    return " ".join(parts)


def _quote(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value


def _summary(t: Template, catalog: TemplateCatalog) -> TemplateSummary:
    return TemplateSummary(name=t.name, description=t.description, model=t.model, min_gpu_ram=t.min_gpu_ram,
                           num_gpus=t.num_gpus, max_dph=t.max_dph, idle_minutes=t.idle_minutes,
                           source="built-in" if t.source == "builtin" else t.source)
