"""What one person should see since a cursor: the progress of their operations and the notices
addressed to them, read from the database so any replica can serve it (the HTTP event stream,
a remote shell, a notebook).

Decisions:

- Two sources, each read in id order: `operation_events` (joined with their operation) of
  operations the actor started or on instances the actor owns, and `notices` that have a
  delivery row whose target is in `outbox.audience(actor)` — who hears a notice was decided when
  it was written (`outbox.targets`); this module only reads that decision, on any surface's rows.
  As on every personal surface (`Runtime.deliver_to_person`, the Deliverer's `recipient`), a
  notice the actor caused is not repeated to them: their own reply already told them.
- The cursor is opaque to callers: `e<last event id>.n<last notice id>`, at most 40 characters,
  validated (anything else is InvalidInput, never a 500). No cursor means "from now": the
  current high-water marks, so a new subscriber is not flooded with history; `e0.n0` asks for
  everything still in the database.
- A page merges the two sources by time while consuming each as a prefix of its id order, so
  every entry carries the cursor that resumes right after it (an SSE `id:`) and resuming never
  repeats or skips an item of a page.
- Known limit: ids are the database's autoincrement; on PostgreSQL a transaction that commits
  after a later id was already read is skipped by a cursor past it. Events and notices are
  written in short transactions, so the window is milliseconds; a client that needs every step
  of one boot can also read the operation's own events (`service.follow`).
- Items carry what a surface may show: a ProgressEvent, or a notice's id, kind, level, text,
  instance and actions. Notice text is written safe (no secrets) by core; nothing else of the
  record (owner, actor, targets) is exposed."""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field
from sqlalchemy import exists, func, or_, select
from sqlmodel import Session, col

from .actions import Action
from .auth import Actor
from .clock import as_utc
from .errors import InvalidInput
from .models import Instance, NoticeDelivery, NoticeRecord, OperationEvent, OperationRecord
from .operations import _event_model
from .outbox import Level, audience, stored_actions
from .results import ProgressEvent

log = logging.getLogger(__name__)
MAX_LIMIT = 500
MAX_CURSOR = 40
_CURSOR = re.compile(r"e(\d{1,18})\.n(\d{1,18})")
_LEVELS: dict[str, Level] = {"info": "info", "warning": "warning", "error": "error"}


class FeedNotice(BaseModel):
    """A notice as a personal feed shows it."""

    kind: Literal["notice"] = "notice"
    id: int
    notice_kind: str                    # instance.ready, instance.stopped, guard.warn_idle, ...
    level: Level
    text: str
    instance_id: str | None = None
    created_at: datetime
    simulated: bool = False
    actions: list[Action] = Field(default_factory=list)


FeedItem = Annotated[ProgressEvent | FeedNotice, Field(discriminator="kind")]


class FeedEntry(BaseModel):
    """One item and the cursor that resumes right after it."""

    cursor: str
    item: FeedItem


class FeedPage(BaseModel):
    kind: Literal["feed"] = "feed"
    entries: list[FeedEntry] = Field(default_factory=list)
    cursor: str                         # resumes after the last entry (the given one when empty)
    more: bool = False                  # a full page: ask again at once


def make_cursor(event_id: int, notice_id: int) -> str:
    return f"e{event_id}.n{notice_id}"


def read_cursor(cursor: str) -> tuple[int, int]:
    """(last event id, last notice id), or InvalidInput for anything the feed did not give out."""
    m = _CURSOR.fullmatch(cursor) if len(cursor) <= MAX_CURSOR else None
    if m is None:
        raise InvalidInput("That event cursor is not one gpuherd gave out (they look like e12.n3); "
                           "leave it out to start from now.")
    return int(m.group(1)), int(m.group(2))


def _notice(n: NoticeRecord) -> FeedNotice:
    assert n.id is not None
    return FeedNotice(id=n.id, notice_kind=n.kind, level=_LEVELS.get(n.level, "info"), text=n.text,
                      instance_id=n.instance_id, created_at=as_utc(n.created_at), simulated=n.simulated,
                      actions=stored_actions(n.actions, n.id))


def high_water(s: Session) -> tuple[int, int]:
    ev = s.execute(select(func.max(col(OperationEvent.id)))).scalar_one_or_none() or 0
    no = s.execute(select(func.max(col(NoticeRecord.id)))).scalar_one_or_none() or 0
    return int(ev), int(no)


def read_page(s: Session, actor: Actor, after: str | None, limit: int) -> FeedPage:
    """One page of what `actor` should see after `after` (see the module docstring)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"Ask for between 1 and {MAX_LIMIT} events a page, not {limit}.")
    if after is None:
        return FeedPage(cursor=make_cursor(*high_water(s)))
    last_event, last_notice = read_cursor(after)
    me = actor.principal
    # progress: operations the actor started, or on instances the actor owns
    owned = exists().where(col(Instance.id) == col(OperationRecord.instance_id), col(Instance.owner) == me)
    ev_rows = s.execute(
        select(OperationEvent, OperationRecord)
        .join(OperationRecord, col(OperationRecord.id) == col(OperationEvent.operation_id))
        .where(col(OperationEvent.id) > last_event, or_(col(OperationRecord.actor) == me, owned))
        .order_by(col(OperationEvent.id)).limit(limit + 1)).all()
    # notices: a delivery row addressed to one of the actor's destinations (outbox.audience)
    heard = exists().where(col(NoticeDelivery.notice_id) == col(NoticeRecord.id),
                           col(NoticeDelivery.target).in_(sorted(audience(actor))))
    no_rows = list(s.execute(
        select(NoticeRecord)
        .where(col(NoticeRecord.id) > last_notice, heard,
               or_(col(NoticeRecord.actor).is_(None), col(NoticeRecord.actor) != me))
        .order_by(col(NoticeRecord.id)).limit(limit + 1)).scalars())
    events = [(as_utc(ev.at), ev.id or 0, _event_model(op, ev)) for ev, op in ev_rows]
    notices = [(as_utc(n.created_at), n.id or 0, _notice(n)) for n in no_rows]
    entries: list[FeedEntry] = []
    i = j = 0
    while len(entries) < limit and (i < len(events) or j < len(notices)):
        take_event = j >= len(notices) or (i < len(events) and events[i][0] <= notices[j][0])
        item: ProgressEvent | FeedNotice
        if take_event:
            _, last_event, item = events[i]
            i += 1
        else:
            _, last_notice, item = notices[j]
            j += 1
        entries.append(FeedEntry(cursor=make_cursor(last_event, last_notice), item=item))
    more = i < len(events) or j < len(notices)
    return FeedPage(entries=entries, cursor=make_cursor(last_event, last_notice), more=more)
