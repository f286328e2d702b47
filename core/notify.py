"""The notifier seam: core publishes events (instance ready, stopped, and later the guards'
warnings); whichever surfaces are running subscribe and deliver them to the owner and the team
channel. Core never imports a surface; surfaces register a callable here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoticeAction:
    label: str
    command: str                 # a /gpu command line that performs it, e.g. "/gpu keep g-7f3a 1h"
    style: str = "default"       # default | primary | danger


@dataclass(frozen=True)
class Notice:
    kind: str                    # instance.ready, instance.stopped, boot.failed, ...
    text: str
    at: datetime
    owner: str | None = None     # principal to tell directly
    team: str | None = None      # team channel to tell
    instance_id: str | None = None
    actions: tuple[NoticeAction, ...] = field(default_factory=tuple)
    simulated: bool = False
    actor: str | None = None     # who caused it (a user's own command, or system:idle)
    level: str = "info"          # info | warning | error
    to_admins: bool = False      # for the admins (a machine gpuherd does not manage), not an owner


Subscriber = Callable[[Notice], Awaitable[None] | None]


class NotifierHub:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    async def publish(self, notice: Notice) -> None:
        """Deliver to every subscriber; one failing surface never stops the others."""
        for fn in list(self._subscribers):
            try:
                result = fn(notice)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # a broken surface must not break the service call
                log.exception("notifier subscriber failed for %s", notice.kind)
