"""Bringing instance rows in line with what the providers report.

`refresh` asks each provider for its listing once (callers within `LISTING_SHARE_S` of each
other share one listing, so a burst of status requests asks a provider once), confirms a
machine missing from a listing with `get` before closing its bill (one missing row is not proof
of death), and folds every answer into the rows in one unit of database work off the loop.
`refresh_one` asks for one machine only: `status <id>` does not list the whole account."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

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
LISTING_SHARE_S = 2.0


@dataclass
class Refresh:
    rows: dict[str, Instance]                                         # by id, synced where possible
    views: dict[str, ProviderInstance | None] = field(default_factory=dict)  # None: gone at the provider
    failed: dict[str, str] = field(default_factory=dict)              # provider -> why it was not asked
    listed: dict[str, list[ProviderInstance]] = field(default_factory=dict)  # provider -> its machines
    lost: list[str] = field(default_factory=list)                     # ids found gone by this refresh


def _syncable(inst: Instance) -> bool:
    return not inst.state_enum.is_final and inst.state != InstanceState.PENDING.value and bool(inst.provider_id)


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
                      fresh: bool = False) -> Refresh:
        out = Refresh(rows={i.id: i for i in instances})
        by_provider: dict[str, list[Instance]] = {}
        for inst in instances:
            if _syncable(inst):
                by_provider.setdefault(inst.provider, []).append(inst)
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
            seen = {p.provider_id: p for p in result}
            for inst in by_provider.get(name, []):
                if inst.provider_id in seen:
                    out.views[inst.id] = seen[inst.provider_id]
                else:
                    missing.append((name, inst))
        if missing:
            confirmed = await asyncio.gather(*(self.confirm_gone(self.providers.get(n), i) for n, i in missing))
            for (_, inst), found in zip(missing, confirmed, strict=True):
                if found is not False:
                    out.views[inst.id] = found
        await self._fold(out)
        return out

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

    async def _fold(self, out: Refresh) -> None:
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
