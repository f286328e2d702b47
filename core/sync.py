"""Bringing instance rows in line with what the providers report.

`refresh` asks each provider for its listing once (callers within `LISTING_SHARE_S` of each
other share one listing, so a burst of status requests asks a provider once), confirms a
machine missing from a listing with `get` before closing its bill (one missing row is not proof
of death), and folds every answer into the rows in one unit of database work off the loop.
`refresh_one` asks for one machine only: `status <id>` does not list the whole account."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from sqlalchemy import select
from sqlmodel import Session, col

from .clock import Clock
from .db import Database
from .errors import GpuherdError
from .lifecycle import Lifecycle
from .models import Instance, InstanceState
from .providers.base import Provider, ProviderInstance
from .providers.registry import ProviderRegistry
from .retry import provider_call
from .shared import SharedCalls

log = logging.getLogger(__name__)
T = TypeVar("T")
LISTING_SHARE_S = 2.0
PER_ROW_OFF_LOOP = 1000            # rows from which per-row work goes to a worker thread


@dataclass
class Refresh:
    rows: dict[str, Instance]                                         # by id, synced where possible
    views: dict[str, ProviderInstance | None] = field(default_factory=dict)  # None: gone at the provider
    failed: dict[str, str] = field(default_factory=dict)              # provider -> why it was not asked
    listed: dict[str, list[ProviderInstance]] = field(default_factory=dict)  # provider -> its machines
    lost: list[str] = field(default_factory=list)                     # ids found gone by this refresh


# states whose rows the providers are not asked about; compared as stored strings because a
# reconcile calls this for every tracked row (an enum per row cost ~10 ms at 10,000)
_UNSYNCED = frozenset(st.value for st in InstanceState if st.is_final or st is InstanceState.PENDING)


def _syncable(inst: Instance) -> bool:
    return inst.state not in _UNSYNCED and bool(inst.provider_id)


def _by_provider(instances: list[Instance]) -> dict[str, list[Instance]]:
    """The rows worth asking a provider about, by provider."""
    grouped: dict[str, list[Instance]] = {}
    for inst in instances:
        if _syncable(inst):
            grouped.setdefault(inst.provider, []).append(inst)
    return grouped


def _match(rows: list[Instance], listed: list[ProviderInstance], views: dict[str, ProviderInstance | None]
           ) -> list[Instance]:
    """Each row's machine in the provider's listing, into `views`; returns the rows not listed."""
    seen = {p.provider_id: p for p in listed}
    missing = []
    for inst in rows:
        found = seen.get(inst.provider_id or "")
        if found is not None:
            views[inst.id] = found
        else:
            missing.append(inst)
    return missing


class InstanceSync:
    def __init__(self, db: Database, clock: Clock, providers: ProviderRegistry, lifecycle: Lifecycle,
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.db = db
        self.clock = clock
        self.providers = providers
        self.lifecycle = lifecycle
        self._sleep = sleep
        self._listings: SharedCalls[list[ProviderInstance]] = SharedCalls(clock.monotonic)

    async def listing(self, provider: Provider, *, fresh: bool = False) -> list[ProviderInstance]:
        """The provider's machines, shared with callers of the last few seconds. `fresh` skips
        the shared result (reconcile wants the provider's answer now)."""
        async def fetch() -> list[ProviderInstance]:
            return await provider_call(provider, provider.list, sleep=self._sleep, what=f"{provider.name} list")
        if fresh:
            self._listings.forget(provider.name)
        return await self._listings.get(provider.name, fetch, 0.0 if fresh else LISTING_SHARE_S)

    def forget_listings(self) -> None:
        """A change we made (stop, start, destroy, create): the next listing is asked anew."""
        self._listings.clear()

    async def refresh(self, instances: list[Instance], *, list_providers: list[str] | None = None,
                      fresh: bool = False, keep_rows: bool = True) -> Refresh:
        """The providers' word on `instances`, folded into their rows. `keep_rows=False` hands
        back only the rows that became lost (`Refresh.rows` keeps the rows passed in): a
        reconcile folds every tracked row and needs no other, and 10,000 more rows alive on the
        loop are what a garbage collection in the middle of it would walk."""
        out = Refresh(rows={i.id: i for i in instances})
        by_provider = await self._per_row(len(instances), lambda: _by_provider(instances))
        names = [n for n in dict.fromkeys([*by_provider, *(list_providers or [])]) if n in self.providers]
        names = [n for n in names if self.providers.get(n).capabilities.can_list]
        if not names:
            return out
        listed = await asyncio.gather(*(self.listing(self.providers.get(n), fresh=fresh) for n in names),
                                      return_exceptions=True)
        missing: list[tuple[str, Instance]] = []
        for name, result in zip(names, listed, strict=True):
            if isinstance(result, BaseException):
                out.failed[name] = (result.message if isinstance(result, GpuherdError)
                                    else f"{name}: unexpected error ({type(result).__name__})")
                log.warning("could not list %s: %s", name, out.failed[name])
                continue
            out.listed[name] = result
            rows = by_provider.get(name, [])
            missing += [(name, inst) for inst in
                        await self._per_row(len(rows) + len(result), functools.partial(_match, rows, result, out.views))]
        if missing:
            confirmed = await asyncio.gather(*(self.confirm_gone(self.providers.get(n), i) for n, i in missing))
            for (_, inst), found in zip(missing, confirmed, strict=True):
                if found is not False:
                    out.views[inst.id] = found
        await self._fold(out, keep_rows=keep_rows)
        return out

    async def _per_row(self, rows: int, work: Callable[[], T]) -> T:
        """`work`, a loop over rows: in a worker thread when there are many (a reconcile's
        10,000 rows took 10-30 ms of attribute reads, a stall of the loop), inline otherwise
        (a page of 50 is not worth the thread hop)."""
        return await self.db.call(work) if rows >= PER_ROW_OFF_LOOP else work()

    async def refresh_one(self, inst: Instance) -> Refresh:
        """One machine, asked with `get` (no listing)."""
        out = Refresh(rows={inst.id: inst})
        if not _syncable(inst) or inst.provider not in self.providers:
            return out
        provider = self.providers.get(inst.provider)
        try:
            found = await provider_call(provider, lambda: provider.get(inst.provider_id or ""),
                                        sleep=self._sleep, what=f"{provider.name} get")
        except GpuherdError as exc:
            out.failed[inst.provider] = exc.message
            return out
        out.views[inst.id] = found
        await self._fold(out)
        return out

    async def _fold(self, out: Refresh, *, keep_rows: bool = True) -> None:
        if not out.views:
            return
        now = self.clock.now()

        def work(s: Session) -> dict[str, Instance]:
            fresh = {i.id: i for i in s.execute(select(Instance).where(
                col(Instance.id).in_(list(out.views)))).scalars()}
            for iid, row in fresh.items():
                before = row.state
                self.lifecycle.apply_provider_state(s, row, out.views[iid], now)
                if row.state == InstanceState.LOST.value and before != row.state:
                    out.lost.append(iid)
            s.commit()
            if not keep_rows:
                lost = set(out.lost)
                return {iid: row for iid, row in fresh.items() if iid in lost}   # the rest is freed here
            return fresh
        out.rows.update(await self.db.run(work))

    async def confirm_gone(self, provider: Provider, inst: Instance) -> ProviderInstance | Literal[False] | None:
        """The machine as `get` sees it; None when gone; False when the provider cannot say."""
        try:
            return await provider_call(provider, lambda: provider.get(inst.provider_id or ""),
                                       sleep=self._sleep, what=f"{provider.name} get")
        except GpuherdError as exc:
            log.warning("could not confirm %s at %s: %s", inst.id, provider.name, exc.message)
            return False
