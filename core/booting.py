"""Booting: from a template and a request to an accepted machine, with the checks that guard the
money in front of the provider call.

1. The template's overrides are validated (a bad key or value is refused with the field named).
2. The idempotency key: one key belongs to one actor, one operation and one request. The same
   key with the same request returns the first boot; another user's key is refused revealing
   nothing; the same key with another template, offer or overrides is refused, saying what it
   was used for.
3. Budget: at 100 % a member's boot is refused; an admin's asks (a stored confirmation).
4. The offer: the cheapest that fits (or the one named), priced at the template's disk. "Fits" is
   `Template.offer_rejection` (GPU count and RAM, disk, GPU model, provider), the rule search uses
   for its Boot buttons; a provider that answered no search at all is named with its error
   (`search.SearchUnanswered`), and a create that fails in an unexpected way still closes the
   intent as failed (never a `pending` row left behind).
5. Price: above the template's max $/h the boot asks, stating $/h, $/day and $/month. The yes
   is bound to that price: accepted later, the offer is priced again and a higher price asks
   again with the new figures instead of booting.
6. Intent row, provider create (never repeated blindly: on a timeout we look for our label),
   record, ledger, audit, the operation and its first notice — then the call returns. Readiness
   follows as the operation's events (core.operations).

Secret overrides (env values of secret-looking names) never enter a result, an action, a
token, an audit event or a plain-text database column: shown and stored masked; a
confirmation keeps their values sealed until the yes."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from .actions import Op, Style, act
from .auth import Actor
from .clock import Clock
from .config import Settings
from .confirmations import ConfirmationStore
from .costs import Costs
from .db import Database
from .errors import (
    CapacityError,
    Conflict,
    GpuherdError,
    InvalidInput,
    NoMatchingOffer,
    NotFound,
    PermissionDenied,
    ProviderError,
)
from .ids import label_for
from .lifecycle import Lifecycle, earlier_use, request_hash
from .models import Instance, InstanceState, Role
from .money import HOURS_PER_DAY, HOURS_PER_MONTH, rate, usd
from .notify import NotifierHub
from .offers import Offer
from .operations import Operations
from .outbox import NoticeDraft
from .providers.base import CreateRequest, Provider, ProviderInstance
from .providers.registry import ProviderRegistry
from .results import BootResult, Confirmation, ConfirmReason, InstanceView, Money
from .retry import provider_call
from .search import OfferSearch, SearchUnanswered
from .shared import SharedCalls
from .sync import InstanceSync
from .telemetry import TELEMETRY
from .templates import MASK, Template, TemplateCatalog, is_secret_env, validate_overrides
from .text import clip
from .views import build_views, fresh_view

log = logging.getLogger(__name__)
ID_ATTEMPTS = 5          # intents retried when a concurrent boot took the same short id
BOOT_CANDIDATES = 3                    # offers tried in turn when one is taken (capacity error)
MAX_KEY = 200


@dataclass(frozen=True)
class Accepted:
    """What a stored yes already agreed to."""

    dph: Decimal | None = None         # the price said yes to (None: no price question was asked)
    past_budget: bool = False          # an admin said yes to booting past a used-up budget


def split_secrets(overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(overrides with secret values masked, the secret values by key)."""
    masked: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for key, value in overrides.items():
        name = key[4:] if key.lower().startswith("env.") else None
        if name is not None and value and is_secret_env(name):
            masked[key] = MASK
            secrets[key] = value
        else:
            masked[key] = value
    return masked, secrets


class Booting:
    def __init__(self, settings: Settings, db: Database, clock: Clock, providers: ProviderRegistry,
                 templates: TemplateCatalog, search: OfferSearch, lifecycle: Lifecycle, operations: Operations,
                 costs: Costs, confirmations: ConfirmationStore, sync: InstanceSync, hub: NotifierHub,
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.providers = providers
        self.templates = templates
        self.search = search
        self.lifecycle = lifecycle
        self.operations = operations
        self.costs = costs
        self.confirmations = confirmations
        self.sync = sync
        self.hub = hub
        self._sleep = sleep
        self._ordering: set[asyncio.Task[None]] = set()   # detached boots still calling a provider
        self._fitted: SharedCalls[tuple[object, list[Offer]]] = SharedCalls(clock.monotonic, max_entries=64)

    def _views(self, s: Session, rows: list[Instance], actor: Actor | None) -> list[InstanceView]:
        return build_views(s, rows, self.clock.now(), actor, self.providers.capabilities())

    async def boot(self, actor: Actor, template_name: str, *, offer: str | None = None,
                   provider: str | None = None, overrides: dict[str, str] | None = None,
                   idempotency_key: str | None = None, accepted: Accepted | None = None,
                   detach: bool = False) -> BootResult | Confirmation:
        actor.require(Role.MEMBER, "booting an instance")
        template = self.templates.get(template_name)
        raw = {str(k): str(v) for k, v in (overrides or {}).items()}
        checked = validate_overrides(template, raw)
        template = checked.template
        cleaned = checked.as_json()           # secrets masked: this is what is stored and shown
        masked_raw, secrets = split_secrets(raw)
        key = idempotency_key or f"gh-{uuid.uuid4().hex}"
        if len(key) > MAX_KEY:
            raise InvalidInput(f"The idempotency key is too long ({len(key)} characters; at most {MAX_KEY}).")
        fingerprint = request_hash(op="boot", template=template.name, offer=offer, provider=provider,
                                   overrides=masked_raw)

        replay = await self.db.run(lambda s: self._replay(s, actor, key, fingerprint))
        if replay is not None:
            return replay
        spent = [] if accepted and accepted.past_budget else await self.costs.used_up(actor)
        args = {"template": template.name, "offer": offer or "", "provider": provider or "", "key": key,
                "overrides": json.dumps(masked_raw, sort_keys=True)}
        if spent:
            over = "; ".join(f"{b.scope.value} {b.name} has spent {usd(b.spent)} of {usd(b.limit)}" for b in spent)
            if not actor.at_least(Role.ADMIN):
                raise PermissionDenied(f"Budget used up ({over}). New boots need an admin's "
                                       "confirmation or a higher budget.")
            return await self._ask(actor, ConfirmReason.BUDGET, args, secrets, None, "Budget used up",
                                   f"This month's budget is used up: {over}. Boot anyway?", None, False)

        candidates = await self.choose_offers(template, offer=offer, provider=provider)
        chosen = candidates[0]
        max_dph = template.max_dph
        agreed = accepted.dph if accepted else None
        if agreed is not None and chosen.dph > agreed:
            return await self._ask(
                actor, ConfirmReason.PRICE, args, secrets, chosen.dph, "Price went up",
                f"The price rose since you said yes: {machine_words(chosen)} now costs "
                f"{rate(chosen.dph)}, not {rate(agreed)}. That is {usd(chosen.dph * HOURS_PER_DAY)} a day, "
                f"{usd(chosen.dph * HOURS_PER_MONTH)} a month if left running. Boot at the new price?",
                chosen.dph, chosen.simulated)
        if agreed is None and max_dph is not None and chosen.dph > max_dph:
            return await self._ask(
                actor, ConfirmReason.PRICE, args, secrets, chosen.dph, "Price above limit",
                f"{'The offer you picked' if offer else 'The cheapest matching offer'} is {machine_words(chosen)} "
                f"at {rate(chosen.dph)}, above the {rate(max_dph)} limit "
                f"of '{template.name}'. That is {usd(chosen.dph * HOURS_PER_DAY)} a day, "
                f"{usd(chosen.dph * HOURS_PER_MONTH)} a month if left running. Boot anyway?",
                chosen.dph, chosen.simulated)
        ceiling = agreed if agreed is not None else max(max_dph, chosen.dph) if max_dph is not None else None
        if ceiling is not None:
            # never silently fall through to a pricier offer than the one accepted; the list is
            # sorted, so the first few that qualify are all a boot may try (a burst of boots
            # each filtering every offer on the loop showed as lateness)
            candidates = list(itertools.islice((c for c in candidates if c.dph <= ceiling), BOOT_CANDIDATES))
        return await self._create(actor, template, candidates, key, cleaned, fingerprint, named=bool(offer),
                                  confirmed_above=max_dph if (max_dph is not None and chosen.dph > max_dph) else None,
                                  detach=detach)

    def _replay(self, s: Session, actor: Actor, key: str, fingerprint: str) -> BootResult | None:
        existing = earlier_use(s, actor, key, action="boot", fingerprint=fingerprint)
        if not isinstance(existing, Instance):
            return None
        view = self._views(s, [existing], actor)[0]
        return BootResult(instance=view, offer=None, replayed=True, ready=view.ready, simulated=existing.simulated,
                          cost=Money.of(view.dph))

    async def _ask(self, actor: Actor, reason: ConfirmReason, args: dict[str, str], secrets: dict[str, str],
                   dph: Decimal | None, title: str, prompt: str, price: Decimal | None,
                   simulated: bool) -> Confirmation:
        def store(s: Session) -> Confirmation:
            issued = self.confirmations.create(s, actor, operation="boot", reason=reason.value, args=args,
                                               secrets=secrets or None, accepted_dph=dph, instance_id=None)
            s.commit()
            return confirmation(issued.token, issued.expires_at, "boot", reason, title, prompt, None,
                                Money.of(price) if price is not None else None, simulated)
        return await self.db.run(store)

    async def choose_offers(self, template: Template, *, offer: str | None, provider: str | None) -> list[Offer]:
        """Offers that fit the template, cheapest first, each re-quoted with `dph` = what it
        costs while running at the template's disk (the price limit is applied by the caller)."""
        if offer:
            if ":" not in offer:
                raise InvalidInput(f"offer='{clip(offer, 40)}' should look like <provider>:<id>, e.g. sandbox:sb-0042.")
            pname, oid = offer.split(":", 1)
            chosen = self.providers.get(pname)
            if not chosen.capabilities.can_create:
                raise InvalidInput(f"{chosen.display_name} has no offers to boot: gpuherd only attaches its machines.")
            found = await provider_call(chosen, lambda: chosen.get_offer(oid), sleep=self._sleep,
                                        what=f"{pname} offer {oid}")
            if found is None:
                raise NotFound(f"Offer {clip(offer, 60)} is not available any more; search again for current offers.")
            problem = template.offer_rejection(found)
            if problem:
                raise InvalidInput(f"Offer {clip(offer, 60)} does not fit template '{template.name}': {problem}.")
            return [_priced_for(found, template)]
        allowed = set(template.providers) if template.providers else None
        if provider:
            self.providers.get(provider)
            if allowed is not None and provider not in allowed:
                raise InvalidInput(f"Template '{template.name}' may only boot on {', '.join(sorted(allowed))}.")
            allowed = {provider}
        names = self.search.provider_names(allowed) if allowed else self.providers.names()
        names = [n for n in names if self.providers.get(n).capabilities.can_create]
        real = [n for n in names if not self.providers.get(n).capabilities.simulated]
        if real and not provider:
            names = real  # the simulated sandbox is never picked for you beside a real cloud
        if not names:
            raise NoMatchingOffer(f"No configured provider can boot '{template.name}' "
                                  f"(allowed: {', '.join(sorted(allowed or [])) or 'none configured'}).")
        got = await self.search.gather(names, template.offer_query())
        if got.failures and not got.fetched:
            raise SearchUnanswered(got.failures, got.codes, what=f"No offer to boot '{template.name}' on",
                                   hint="Nothing was started; try again in a moment.")

        def fit() -> tuple[object, list[Offer]]:
            chosen = [_priced_for(o, template) for o in got.offers
                      if not o.interruptible and template.offer_rejection(o) is None]
            chosen.sort(key=lambda o: (o.dph, -o.reliability, o.ref))
            return got, chosen
        # pricing every offer takes a millisecond or more: off the loop, and once per shared
        # search and template shape for a burst of boots (the entry pins the search result it
        # was made from, so an id reused later cannot match)
        shape = (id(got), template.num_gpus, template.min_gpu_ram, template.disk_gb,
                 tuple(template.gpu_names or ()), tuple(template.providers or ()))
        pinned, fitting = await self._fitted.get(shape, lambda: asyncio.to_thread(fit), self.settings.offer_cache_s)
        if pinned is not got:
            self._fitted.forget(shape)
            _, fitting = await asyncio.to_thread(fit)
        if not fitting:
            failed = f" ({'; '.join(got.failures.values())})" if got.failures else ""
            raise NoMatchingOffer(f"No offer fits '{template.name}' right now: it needs "
                                  f"{template.constraint_text()}; disk {template.disk_gb} GB{failed}.")
        return fitting

    async def _create(self, actor: Actor, template: Template, candidates: list[Offer], key: str,
                      cleaned: dict, fingerprint: str, *, named: bool,
                      confirmed_above: Decimal | None, detach: bool = False) -> BootResult:
        first = candidates[0]
        now = self.clock.now()

        def intent(s: Session) -> tuple[Instance, str | None, InstanceView | None]:
            inst = self.lifecycle.write_intent(s, actor, template, first, key, cleaned, fingerprint, now,
                                               commit=not detach)
            if not detach:
                return inst, None, None
            op = self.operations.open(s, "boot", inst, actor.principal, now)
            # the answer, built before the commit expires the rows (no re-read, no query)
            view = fresh_view(inst, self.clock.now(), op.id, actor, self.providers.capabilities())
            op_id = op.id
            s.commit()
            return inst, op_id, view
        for _ in range(ID_ATTEMPTS):
            try:
                instance, op_id, view = await self.db.run(intent)
                break
            except IntegrityError:
                replay = await self.db.run(lambda s: self._replay(s, actor, key, fingerprint))
                if replay is None:
                    # no row holds this key: a concurrent boot took the same short instance id
                    # between our check and our insert (seen with 10,000 rows and 100 boots at once)
                    continue
                # the same key at the same moment (a double click): the first boot answers both
                return replay if detach else await self._wait_for_first(actor, key, fingerprint)
        else:
            raise Conflict("No free instance id was found; try the boot again.")
        if op_id is not None and view is not None:
            self.operations.changed()
            task = asyncio.create_task(self._order(actor, instance.id, op_id, template, candidates, cleaned, key,
                                                   named=named, confirmed_above=confirmed_above),
                                       name=f"gpuherd-boot-{instance.id}")
            self._ordering.add(task)
            task.add_done_callback(self._ordering.discard)
            return BootResult(instance=view, offer=first, operation_id=op_id, ready=False,
                              overrides={k: str(v) for k, v in cleaned.items()}, cost=Money.of(view.dph),
                              simulated=view.simulated)
        return await self._try_candidates(actor, instance.id, None, template, candidates, cleaned, key, named=named,
                                          confirmed_above=confirmed_above)

    async def _order(self, actor: Actor, instance_id: str, op_id: str, template: Template,
                     candidates: list[Offer], cleaned: dict, key: str, *, named: bool,
                     confirmed_above: Decimal | None) -> None:
        """A detached boot's provider calls (the intent and operation are written, the caller
        has its answer): a failure ends the operation and tells the owner, nothing is raised.
        The readiness watcher may see the failed record first and end the operation itself; its
        final event carries the same reason (the record's status message)."""
        first = candidates[0]
        try:
            await self._try_candidates(actor, instance_id, op_id, template, candidates, cleaned, key, named=named,
                                       confirmed_above=confirmed_above)
        except GpuherdError as exc:
            await self.operations.fail(op_id, f"{instance_id}: the boot failed: {exc.message}")
        except Exception:
            log.exception("detached boot of %s failed", instance_id)
            err = ProviderError(first.provider, "create failed unexpectedly; see gpuherd's log")
            await self.db.run(lambda s: self.lifecycle.mark_failed(s, actor, instance_id, err, self.clock.now()))
            await self.operations.fail(op_id, f"{instance_id}: the boot failed: {err.message}")

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Let detached boots finish their provider call before the process leaves (an order cut
        off mid-call is adopted or closed by `resolve_pending` at the next start)."""
        if self._ordering:
            await asyncio.wait(list(self._ordering), timeout=timeout_s)

    async def _try_candidates(self, actor: Actor, instance_id: str, op_id: str | None, template: Template,
                              candidates: list[Offer], cleaned: dict, key: str, *, named: bool,
                              confirmed_above: Decimal | None) -> BootResult:
        first = candidates[0]
        last_error: GpuherdError | None = None
        for candidate in candidates[:BOOT_CANDIDATES]:
            try:
                pinst = await self._create_at_provider(template, candidate, key)
            except CapacityError as exc:
                last_error = exc
                if named:  # the user named this offer: do not swap it silently
                    break
                continue
            except GpuherdError as exc:
                last_error = exc
                break
            except Exception:
                # a bug or a damaged store under the provider: the intent must not stay pending
                # (and no traceback reaches the user); the log keeps the details
                log.exception("create of %s on %s failed unexpectedly", instance_id, candidate.provider)
                last_error = ProviderError(candidate.provider, "create failed unexpectedly; see gpuherd's log")
                break
            return await self._record(actor, instance_id, candidate, pinst, template, cleaned, confirmed_above, op_id)
        err = last_error or ProviderError(first.provider, "create failed")
        await self.db.run(lambda s: self.lifecycle.mark_failed(s, actor, instance_id, err, self.clock.now()))
        raise err

    async def _wait_for_first(self, actor: Actor, key: str, fingerprint: str) -> BootResult:
        for _ in range(100):
            replay = await self.db.run(lambda s: self._replay(s, actor, key, fingerprint))
            if replay is not None and replay.instance.state is not InstanceState.PENDING:
                return replay
            await asyncio.sleep(0.05)
        if replay is not None:
            return replay
        raise Conflict("A boot with this idempotency key is still in progress; look at the instance list.")

    async def _create_at_provider(self, template: Template, offer: Offer, key: str) -> ProviderInstance:
        provider = self.providers.get(offer.provider)
        request = CreateRequest(offer_id=offer.offer_id, label=label_for(key), **template.to_create_fields())
        try:
            # a create is not safely repeatable: on a timeout the machine may exist, so look for
            # our label instead of calling create again
            return await TELEMETRY.counted(provider.name, lambda: provider.create(request))()
        except ProviderError as exc:
            if not exc.retryable:
                raise
            found = await self._find_by_label(provider, label_for(key))
            if found is not None:
                return found
            raise

    async def _find_by_label(self, provider: Provider, label: str) -> ProviderInstance | None:
        try:
            listed = await self.sync.listing(provider, fresh=True)
        except ProviderError:
            return None
        return next((p for p in listed if p.label == label), None)

    async def _record(self, actor: Actor, instance_id: str, offer: Offer, pinst: ProviderInstance,
                      template: Template, cleaned: dict, confirmed_above: Decimal | None,
                      opened: str | None = None) -> BootResult:
        now = self.clock.now()
        self.sync.forget_listings()

        def work(s: Session) -> tuple[BootResult, NoticeDraft | None]:
            inst, mine = self.lifecycle.record_created(s, actor, instance_id, offer, pinst, template, now)
            draft = None
            op_id = opened
            if mine:
                if opened is None:
                    op_id = self.operations.open(s, "boot", inst, actor.principal, now).id
                else:
                    self.operations.ordered(s, opened, inst, now)
                draft = NoticeDraft(kind="instance.booting", level="info", owner=inst.owner, team=inst.team,
                                    actor=actor.principal, instance_id=inst.id, simulated=inst.simulated,
                                    text=f"{actor.name} booted {inst.id} ({template.name}) on {inst.provider}, "
                                         f"{rate(offer.dph)}",
                                    actions=[act(Op.STATUS, inst.id)])
                self.lifecycle.notify(s, now, draft)
                s.commit()
            # recorded here: billing began at `now` and its one open operation is known, so the
            # view needs neither of build_views' queries (a burst of boots spent 9 % on them)
            view = (fresh_view(inst, now, op_id, actor, self.providers.capabilities()) if mine and op_id
                    else self._views(s, [inst], actor)[0])
            note = (f"Above the {rate(confirmed_above)} limit; confirmed by {actor.name}"
                    if confirmed_above is not None else None)
            return BootResult(instance=view, offer=offer, operation_id=op_id, ready=view.ready, price_note=note,
                              overrides={k: str(v) for k, v in cleaned.items()}, cost=Money.of(view.dph),
                              simulated=view.simulated), draft
        result, draft = await self.db.run(work)
        if draft is not None:
            self.operations.changed()
            await self.hub.publish_draft(draft, now)
        return result


def _priced_for(offer: Offer, template: Template) -> Offer:
    """The offer as this template would pay for it: its disk, not the search's standard one."""
    return offer.model_copy(update={"dph": offer.dph_for(template.disk_gb)})


def machine_words(offer: Offer) -> str:
    return f"{offer.gpu_name} x{offer.num_gpus} on {offer.provider}"


def confirmation(token: str, expires_at: datetime, operation: str, reason: ConfirmReason, title: str, prompt: str,
                 instance_id: str | None, cost: Money | None, simulated: bool) -> Confirmation:
    return Confirmation(
        operation=operation, reason=reason, title=title, prompt=prompt, token=token, expires_at=expires_at,
        instance_id=instance_id, cost=cost, simulated=simulated,
        actions=[act(Op.CONFIRM, instance_id, style=Style.DANGER if operation == "destroy" else Style.PRIMARY,
                     token=token),
                 act(Op.CANCEL, instance_id, token=token)])
