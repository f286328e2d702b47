"""Offers from every configured provider at once (SPEC §3, §9).

Each provider is asked within the per-provider time limit; one failing or slow provider never
holds up or breaks the others, its failure is named instead. Offers are reused for
`offer_cache_s` per distinct request, and concurrent identical searches share one request
(`SharedCalls`). Paging: the cursor is the offset into the sorted matches of the same query
(offers are live, so a later page may shift by the offers that came or went).

Decisions:
- A search that heard from no provider at all is an error (`SearchUnanswered`) naming each
  provider and its error, never an empty result: "no offer matches, loosen the query" would
  send the user after the wrong problem. When some answered, the result carries the others in
  `failures` and the reply names them.
- An offer's Boot action names the first template that fits it by `Template.offer_rejection`,
  the same rule a boot applies to a named offer, so a button never names a boot that must
  fail. An offer no template fits gets no Boot action and an `unfit` sentence saying why.
  Interruptible (spot) offers get none either: they are booted only when named."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from .actions import Op, Style, act
from .auth import Actor
from .clock import Clock
from .config import Settings
from .errors import GpuherdError, InvalidInput, ProviderError, ProviderTimeout
from .models import Role
from .offers import SEARCH_DISK_GB, Offer
from .provider_health import HEALTH
from .providers.base import Provider
from .providers.registry import ProviderRegistry
from .query import OfferQuery, parse_query
from .results import OfferView, PriceSource, ProviderFailure, SearchResult
from .retry import provider_call
from .shared import SharedCalls
from .templates import Template, TemplateCatalog

log = logging.getLogger(__name__)
MAX_PAGE = 1000   # the query language's own limit=N bound


@dataclass
class Gathered:
    offers: list[Offer] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)        # provider -> why it is missing
    fetched: dict[str, datetime] = field(default_factory=dict)    # provider -> when its offers were asked
    codes: dict[str, str] = field(default_factory=dict)           # provider -> its error's code


class SearchUnanswered(ProviderError):
    """Every provider a search asked failed: there is nothing to show, and saying "no offer
    matches" would blame the query. Names each provider with its own error. The code is the
    providers' common error code (a rate limit stays a rate limit), else provider_unavailable."""

    code = "provider_unavailable"
    retryable = True

    def __init__(self, failures: dict[str, str], codes: dict[str, str], *, what: str = "No offers to show",
                 hint: str = "Nothing is wrong with the query; search again in a moment.") -> None:
        which = "the only provider asked" if len(failures) == 1 else f"all {len(failures)} providers asked"
        reasons = " ".join(f"{m.rstrip('.')}." for m in failures.values())
        GpuherdError.__init__(self, f"{what}: {which} failed. {reasons}", hint=hint)
        self.provider = ", ".join(failures)
        common = set(codes.values())
        if len(common) == 1 and len(codes) == len(failures):
            self.code = common.pop()


def _cursor(offset: int) -> str:
    return f"o{offset}"


def _offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    if not (cursor.startswith("o") and cursor[1:].isdigit() and len(cursor) < 10):
        raise InvalidInput("That page cursor is not one this search gave out; search again.")
    return int(cursor[1:])


class OfferSearch:
    def __init__(self, settings: Settings, providers: ProviderRegistry, templates: TemplateCatalog, clock: Clock,
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.settings = settings
        self.providers = providers
        self.templates = templates
        self.clock = clock
        self._sleep = sleep
        self._shared: SharedCalls[tuple[list[Offer], datetime]] = SharedCalls(clock.monotonic)

    def provider_names(self, wanted: set[str] | frozenset[str] | None) -> list[str]:
        if not wanted:
            return self.providers.names()
        for name in wanted:
            self.providers.get(name)  # NotFound naming it
        return [n for n in self.providers.names() if n in wanted]

    async def _offers(self, provider: Provider, query: OfferQuery | None) -> tuple[list[Offer], datetime]:
        async def fetch() -> tuple[list[Offer], datetime]:
            offers = await provider_call(provider, lambda: provider.search(query), sleep=self._sleep,
                                         what=f"{provider.name} search")
            fetched = self.clock.now()
            HEALTH.priced(provider.name, fetched)      # the price age /gpu providers shows
            return offers, fetched
        return await self._shared.get((provider.name, provider.search_key(query)), fetch,
                                      self.settings.offer_cache_s)

    async def gather(self, names: list[str], query: OfferQuery | None = None) -> Gathered:
        providers = [p for p in (self.providers.get(n) for n in names) if p.capabilities.can_search]
        limit = self.settings.provider_timeout_s

        async def one(p: Provider) -> tuple[list[Offer], datetime]:
            try:
                return await asyncio.wait_for(self._offers(p, query), timeout=limit)
            except TimeoutError:
                raise ProviderTimeout(p.display_name, f"no answer within {limit:g}s") from None

        results = await asyncio.gather(*(one(p) for p in providers), return_exceptions=True)
        out = Gathered()
        for provider, result in zip(providers, results, strict=True):
            if isinstance(result, BaseException):
                out.failures[provider.name] = (result.message if isinstance(result, GpuherdError)
                                               else f"{provider.name}: unexpected error ({type(result).__name__})")
                if isinstance(result, GpuherdError):
                    out.codes[provider.name] = result.code
                else:
                    log.error("search on %s failed", provider.name, exc_info=result)
                continue
            found, fetched = result
            out.offers.extend(found)
            out.fetched[provider.name] = fetched
        return out

    async def search(self, actor: Actor, text: str = "", *, limit: int | None = None,
                     cursor: str | None = None) -> SearchResult:
        actor.require(Role.VIEWER, "searching")
        query = parse_query(text)
        names = self.provider_names(query.providers)
        if names and not any(self.providers.get(n).capabilities.can_search for n in names):
            listed = ", ".join(self.providers.get(n).display_name for n in names)
            raise InvalidInput(f"{listed} has no offers to search: gpuherd attaches existing machines there instead.")
        page = limit or query.limit or 10
        if not 1 <= page <= MAX_PAGE:
            raise InvalidInput(f"Show between 1 and {MAX_PAGE} offers a page, not {page}.")
        offset = _offset(cursor)
        got = await self.gather(names, query)
        if got.failures and not got.fetched:
            raise SearchUnanswered(got.failures, got.codes)
        matched = [o for o in got.offers if query.matches(o)]
        ordered = query.sort(matched, offset + page)
        shown = ordered[offset:offset + page]
        now = self.clock.now()
        ages = {name: max(0, int((now - at).total_seconds())) for name, at in got.fetched.items()}
        sources: dict[tuple[str, str], datetime | None] = {}
        for o in shown:
            if o.price_source:
                key = (o.provider, o.price_source)
                at = sources.get(key)
                sources[key] = o.priced_at if at is None or (o.priced_at and o.priced_at < at) else at
        searched = [n for n in names if self.providers.get(n).capabilities.can_search]
        more = offset + page < len(matched)
        return SearchResult(
            query=text, description=query.describe(), offers=[self._offer_view(actor, o) for o in shown],
            total_matches=len(matched), providers=searched,
            failures=[ProviderFailure(provider=p, message=m) for p, m in got.failures.items()],
            price_age_s=max(ages.values(), default=0), provider_ages=ages,
            price_sources=[PriceSource(provider=p, source=src, priced_at=at,
                                       age_s=int((now - at).total_seconds()) if at else None)
                           for (p, src), at in sorted(sources.items())],
            search_disk_gb=SEARCH_DISK_GB, next_cursor=_cursor(offset + page) if more else None,
            simulated=any(o.simulated for o in matched) or any(
                self.providers.get(n).capabilities.simulated for n in names))

    def _offer_view(self, actor: Actor, offer: Offer) -> OfferView:
        """The offer with the templates it can boot (the boot's own fit rule); members get a
        Boot action for the first. None fits: no Boot action, and `unfit` says why."""
        templates = self.templates.all()
        fits = [t.name for t in templates if t.offer_rejection(offer) is None] \
            if not offer.interruptible else []
        creatable = self.providers.get(offer.provider).capabilities.can_create
        actions = ([act(Op.BOOT, None, style=Style.PRIMARY, template=fits[0], offer=offer.ref)]
                   if fits and creatable and actor.at_least(Role.MEMBER) else [])
        return OfferView(offer=offer, fits=fits, actions=actions,
                         unfit=None if fits else unfit_reason(offer, templates))


def unfit_reason(offer: Offer, templates: list[Template]) -> str:
    """Why no template fits `offer`, in one neutral sentence. Templates asking for another GPU
    count are summed up by the counts they use; those with the offer's count say their own
    reason (GPU RAM, disk, GPU model, provider)."""
    if offer.interruptible:
        return "it is an interruptible (spot) offer, booted only when named with a template"
    if not templates:
        return "there are no templates to boot"
    same = [t for t in templates if t.num_gpus == offer.num_gpus]
    if not same:
        counts = sorted({t.num_gpus for t in templates})
        listed = ", ".join(str(c) for c in counts[:-1]) + (" or " if len(counts) > 1 else "") + str(counts[-1])
        return f"no template uses {offer.num_gpus} GPU{'s' if offer.num_gpus != 1 else ''} (they use {listed})"
    reasons = [f"{t.name}: {t.offer_rejection(offer)}" for t in same[:3]]
    more = f"; {len(same) - 3} more" if len(same) > 3 else ""
    return f"no template fits ({'; '.join(reasons)}{more})"
