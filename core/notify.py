"""In-process observers of notices. Delivery is durable and lives elsewhere: a notice is written
to the outbox (`core.outbox`) in the transaction of the change it reports, and each surface's
deliverer sends it, once per destination, from whichever process runs that surface. This hub
only tells listeners in THIS process that a notice was just written, right after the commit:
deliverers use it to send at once instead of at their next poll, and tests and benchmarks use
it to watch what the core says. Nothing that must not be lost goes through here alone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from .actions import Action
from .outbox import NoticeDraft

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notice:
    kind: str                    # instance.ready, instance.stopped, boot.failed, guard.warn_idle, ...
    text: str
    at: datetime
    owner: str | None = None     # principal to tell directly
    team: str | None = None      # team channel to tell
    instance_id: str | None = None
    actions: tuple[Action, ...] = field(default_factory=tuple)
    simulated: bool = False
    actor: str | None = None     # who caused it (a user's own command, or None for a guard)
    level: str = "info"          # info | warning | error
    to_admins: bool = False      # for the admins (a machine gpuherd does not manage), not an owner

    @classmethod
    def of(cls, draft: NoticeDraft, at: datetime) -> Notice:
        return cls(kind=draft.kind, text=draft.text, at=at, owner=draft.owner, team=draft.team,
                   instance_id=draft.instance_id, actions=tuple(draft.actions), simulated=draft.simulated,
                   actor=draft.actor, level=draft.level, to_admins=draft.to_admins)


Subscriber = Callable[[Notice], Awaitable[None] | None]


class NotifierHub:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    async def publish(self, notice: Notice) -> None:
        """Tell every listener; one failing listener never stops the others or the caller."""
        for fn in list(self._subscribers):
            try:
                result = fn(notice)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # a broken listener must not break the service call
                log.exception("notice listener failed for %s", notice.kind)

    async def publish_draft(self, draft: NoticeDraft, at: datetime) -> None:
        await self.publish(Notice.of(draft, at))

    async def published(self, drafts: list[NoticeDraft], at: datetime) -> None:
        for draft in drafts:
            await self.publish_draft(draft, at)
