"""The durable notice outbox (SPEC §10: notices go to the owner's DM and the team's channel on
each surface, exactly once as far as a database can make it) and the deliverer that empties it.

Writing. `Outbox.add(session, draft, now)` adds one `NoticeRecord` and one `NoticeDelivery` per
(surface, destination) in the caller's session and transaction; it flushes for the ids and never
commits, so the notice and the change it reports are kept or lost together. Who hears a notice
is decided here and only here, when it is written (`targets`):

- `user:<owner>` when there is an owner, unless the notice is for admins or the owner caused it
  (their own reply already told them);
- `team:<team>` when there is a team, unless it is for admins: the team's channel hears it even
  when the owner caused it;
- `admins` when `to_admins` (a machine gpuherd does not manage has no owner to tell).

A `SurfaceRoute` says which kinds of destination a surface takes (`user`, `team`, `admins`; a
chat surface may also take only principals with its own prefix) and how long a delivery stays
worth sending (`ttl`: the shell's 1 h, chat's 24 h; a warning a day late is noise).

Delivering. A `Deliverer` serves one surface and a set of destinations. All its database work
goes through `Database.run` (a worker thread), never on the event loop. One round:

1. Rows of its surface whose `expires_at` has passed are given up (`last_error = "expired"`)
   without sending; this sweeps the whole surface, not only its own destinations, so a row
   nobody serves is closed too.
2. Due rows (not delivered, not given up, `next_attempt_at <= now`, lease free) are claimed in
   ONE statement: `WITH due AS MATERIALIZED (SELECT id … LIMIT batch FOR UPDATE SKIP LOCKED)
   UPDATE … SET claimed_by, claimed_until = now + lease WHERE id IN (SELECT id FROM due) AND
   <the same conditions again> RETURNING id` (materialized: a plain `IN (subquery)` may be
   rescanned per row by PostgreSQL, which then claims past the LIMIT). On
   PostgreSQL `SKIP LOCKED` keeps two replicas off the same rows without waiting on each other;
   on SQLite the statement runs under the database's single write lock, so it is atomic, and the
   re-checked conditions plus RETURNING mean only rows this statement actually took are used.
   Every later write to a claimed row (delivered, failed, released) is conditional on
   `claimed_by = identity AND claimed_until = <the lease this round set>`.
3. Rows whose notice's actor is the deliverer's `recipient` (the shell is one person) are marked
   delivered without sending: they caused it. With `collapse` (one terminal is one destination)
   several rows of the same notice are sent once and all marked delivered.
4. Each notice is sent, then marked delivered. A send is bounded by `send_timeout_s` (a third of
   the lease unless given) and is not started when less than that is left of the lease: the rest
   of the batch is released instead. So a send never outlives its lease, and two deliverers never
   both send one row while its lease holds (as long as their clocks agree within that margin).
5. A send that raises counts an attempt: `last_error` is the exception's type and message,
   scrubbed of secret-looking values and clipped to 512 characters; the n-th failure waits
   min(cap, base * 2**(n-1)) times a jitter in [0.5, 1] (never sooner than half the backoff, so a
   broken surface is not hammered); at `max_attempts` the row is given up and a warning logged.

At-least-once, never lost: a process killed (or cancelled) after a send and before its
delivered mark leaves the row claimed; when the lease runs out any deliverer claims and sends it
again. That one notice may go twice; with sends one at a time, at most one notice per killed
deliverer. Unsent rows of a killed deliverer's batch wait for their lease, then go once.

Slowing down. A send that raises `RetryLater(seconds)` (a platform's 429 with Retry-After)
counts an attempt like any failure, but its next attempt waits at least that long, the rest of
the round's batch is released unsent, and the deliverer itself pauses that long before its next
round: hammering a rate-limited platform only lengthens the wait.

Waking. `Deliverer.run(stop)` polls every `poll_s` and wakes at once on `nudge()` (thread-safe;
`Outbox.wake_on_commit(deliverer.nudge)` calls it after each commit of a session that added a
notice, so a notice written in this process goes out at once). `run` logs and continues on any
exception (backing off while the database is unreachable).

Housekeeping. `Outbox.reached_anyone` tells the guards whether a warning reached anybody;
`Outbox.purge` deletes old notices whose every delivery is delivered, given up or long expired.
Methods that take a session never commit: the caller does."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import CTE, Select, delete, event, exists, or_, select, update
from sqlmodel import Session, col

from .actions import Action
from .audit import scrub
from .auth import Actor
from .clock import Clock, as_utc
from .db import Database
from .models import NoticeDelivery, NoticeRecord, Role

log = logging.getLogger(__name__)

Level = Literal["info", "warning", "error"]
TargetKind = Literal["user", "team", "admins"]
TARGET_KINDS: tuple[TargetKind, ...] = get_args(TargetKind)
ADMINS = "admins"
SHELL_TTL = timedelta(hours=1)
CHAT_TTL = timedelta(hours=24)
MAX_ERROR = 512
EXPIRED = "expired"
_WAKE_KEY = "gpuherd.outbox.wakers"


# --- what is written ------------------------------------------------------------------------

class NoticeDraft(BaseModel):
    """A notice to write. `actor` is who caused it (None for the guards and other system work
    nobody asked for); `to_admins` sends it to the admins instead of an owner."""

    model_config = ConfigDict(frozen=True)

    kind: str = Field(min_length=1, max_length=48)
    text: str
    level: Level = "info"
    owner: str | None = Field(default=None, max_length=128)
    team: str | None = Field(default=None, max_length=64)
    instance_id: str | None = Field(default=None, max_length=16)
    actor: str | None = Field(default=None, max_length=128)
    simulated: bool = False
    to_admins: bool = False
    actions: list[Action] = Field(default_factory=list)


def user_target(principal: str) -> str:
    return f"user:{principal}"


def team_target(team: str) -> str:
    return f"team:{team}"


def target_kind(target: str) -> str:
    """`user`, `team` or `admins` (anything else is returned as written, and taken by no route)."""
    return target if target == ADMINS else target.split(":", 1)[0]


def targets(draft: NoticeDraft) -> list[str]:
    """Who hears a notice: the one place that decides it (see the module docstring)."""
    if draft.to_admins:
        return [ADMINS]
    out: list[str] = []
    if draft.owner and draft.owner != draft.actor:
        out.append(user_target(draft.owner))
    if draft.team:
        out.append(team_target(draft.team))
    return out


def audience(actor: Actor) -> set[str]:
    """The destinations one person reads on a personal surface (the shell, a notebook): their
    own, their team's channel, and the admins' when they are one. A team of `*` (every team) is
    no channel of its own."""
    out = {user_target(actor.principal)}
    if actor.team and actor.team != "*":
        out.add(team_target(actor.team))
    if actor.role is Role.ADMIN:
        out.add(ADMINS)
    return out


class SurfaceRoute(BaseModel):
    """Which destinations a surface takes and how long a delivery there stays worth sending.
    `principal_prefix` (e.g. `slack:`) limits `user:` destinations to principals the surface
    can reach; None takes every user. `teams` limits `team:` destinations to the teams that have
    a channel there (a delivery nobody can send would only wait to expire)."""

    model_config = ConfigDict(frozen=True)

    surface: str = Field(min_length=1, max_length=16)
    target_kinds: tuple[TargetKind, ...] = TARGET_KINDS
    ttl: timedelta = CHAT_TTL
    principal_prefix: str | None = None
    teams: frozenset[str] | None = None     # the teams with a channel on this surface; None: every team

    @classmethod
    def shell(cls) -> SurfaceRoute:
        return cls(surface="shell", target_kinds=TARGET_KINDS, ttl=SHELL_TTL)

    def takes(self, target: str) -> bool:
        kind = target_kind(target)
        if kind not in self.target_kinds:
            return False
        if kind == "user" and self.principal_prefix is not None:
            return target[len("user:"):].startswith(self.principal_prefix)
        if kind == "team" and self.teams is not None:
            return target[len("team:"):] in self.teams
        return True


class Outbox:
    def __init__(self, routes: Sequence[SurfaceRoute]) -> None:
        names = [r.surface for r in routes]
        if len(set(names)) != len(names):
            raise ValueError(f"one route per surface, got {names}")
        self.routes = list(routes)
        self._wakers: list[Callable[[], None]] = []

    def deliveries_for(self, draft: NoticeDraft) -> list[tuple[SurfaceRoute, str]]:
        return [(route, t) for route in self.routes for t in targets(draft) if route.takes(t)]

    def wake_on_commit(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn` (e.g. `Deliverer.nudge`, thread-safe) after every commit of a session that
        added a notice. Returns the function that unregisters it."""
        self._wakers.append(fn)
        return lambda: self._wakers.remove(fn) if fn in self._wakers else None

    def add(self, session: Session, draft: NoticeDraft, now: datetime) -> NoticeRecord:
        """Write the notice and its deliveries in the caller's transaction (flushed, not
        committed)."""
        now = as_utc(now)
        record = NoticeRecord(kind=draft.kind, level=draft.level, text=draft.text, created_at=now,
                              instance_id=draft.instance_id, owner=draft.owner, team=draft.team,
                              actor=draft.actor, simulated=draft.simulated,
                              actions=json.dumps([a.model_dump(mode="json") for a in draft.actions]))
        session.add(record)
        session.flush()
        assert record.id is not None
        session.add_all([NoticeDelivery(notice_id=record.id, surface=route.surface, target=t,
                                        next_attempt_at=now, expires_at=now + route.ttl)
                         for route, t in self.deliveries_for(draft)])
        session.flush()
        self._wake_after_commit(session)
        return record

    def _wake_after_commit(self, session: Session) -> None:
        if not self._wakers or session.info.get(_WAKE_KEY):
            return
        session.info[_WAKE_KEY] = True
        wakers = self._wakers

        def committed(_: Session) -> None:
            session.info.pop(_WAKE_KEY, None)
            for fn in list(wakers):
                try:
                    fn()
                except Exception:  # a waker is a hint; the deliverer polls anyway
                    log.exception("outbox waker failed")

        event.listen(session, "after_commit", committed, once=True)

    @staticmethod
    def reached_anyone(session: Session, instance_id: str, kind: str, since: datetime) -> bool:
        """Whether a notice of `kind` about `instance_id`, written at or after `since`, was
        delivered anywhere."""
        q = (select(col(NoticeDelivery.id))
             .join(NoticeRecord, col(NoticeRecord.id) == col(NoticeDelivery.notice_id))
             .where(col(NoticeRecord.instance_id) == instance_id, col(NoticeRecord.kind) == kind,
                    col(NoticeRecord.created_at) >= as_utc(since),
                    col(NoticeDelivery.delivered_at).is_not(None))
             .limit(1))
        return session.execute(q).first() is not None

    @staticmethod
    def purge(session: Session, older_than: datetime, *, chunk: int = 500) -> int:
        """Delete notices written before `older_than` whose every delivery is delivered, given up
        or expired before `older_than`, with their deliveries. Returns how many notices."""
        older_than = as_utc(older_than)
        d = NoticeDelivery
        pending = exists().where(col(d.notice_id) == col(NoticeRecord.id), col(d.delivered_at).is_(None),
                                 col(d.gave_up_at).is_(None),
                                 or_(col(d.expires_at).is_(None), col(d.expires_at) >= older_than))
        ids = list(session.execute(select(col(NoticeRecord.id))
                                   .where(col(NoticeRecord.created_at) < older_than, ~pending)).scalars())
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            session.execute(delete(NoticeDelivery).where(col(d.notice_id).in_(part))
                            .execution_options(synchronize_session=False))
            session.execute(delete(NoticeRecord).where(col(NoticeRecord.id).in_(part))
                            .execution_options(synchronize_session=False))
        return len(ids)


# --- what is sent ---------------------------------------------------------------------------

class DeliveredNotice(BaseModel):
    """What a surface's `send` receives: one notice for one destination (or, collapsed, for
    all of `targets` at once). `attempt` counts from 1."""

    notice_id: int
    delivery_ids: list[int]
    kind: str
    text: str
    level: Level
    created_at: datetime
    instance_id: str | None
    owner: str | None
    team: str | None
    actor: str | None
    simulated: bool
    actions: list[Action]
    targets: list[str]
    attempt: int


Send = Callable[[DeliveredNotice], Awaitable[None]]


class RetryLater(Exception):
    """Raised by a surface's send when the platform asked to be left alone for `seconds` (HTTP
    429 with Retry-After): the delivery and the rest of the round wait that long."""

    def __init__(self, seconds: float, message: str = "rate limited") -> None:
        super().__init__(f"{message} (retry after {seconds:g} s)")
        self.seconds = max(0.0, float(seconds))


Targets = AbstractSet[str] | Callable[[], AbstractSet[str]]


@dataclass(frozen=True)
class _Row:
    id: int
    target: str
    attempts: int


@dataclass(frozen=True)
class _Batch:
    until: datetime                                   # the lease this round set
    claimed: int
    groups: list[tuple[DeliveredNotice, list[_Row]]]


def stored_actions(raw: str, notice_id: int | None) -> list[Action]:
    """A notice's actions as stored (JSON); one that no longer parses is dropped, the notice kept."""
    out: list[Action] = []
    try:
        items: Any = json.loads(raw or "[]")
    except ValueError:
        items = []
    for item in items if isinstance(items, list) else []:
        try:
            out.append(Action.model_validate(item))
        except ValidationError:  # written by another version: the notice still goes, without it
            log.warning("notice %s: dropped an action that no longer parses", notice_id)
    return out


def _picked(query: Select[int | None], name: str) -> CTE:
    """The rows a claim may take, locked (PostgreSQL: `FOR UPDATE SKIP LOCKED`; SQLite ignores
    it, its statement holds the write lock) and MATERIALIZED: as a plain `IN (subquery)`
    PostgreSQL may rescan the subquery for every outer row, and each rescan skips the rows the
    statement already updated and takes the next ones, so the LIMIT would not hold."""
    return query.with_for_update(skip_locked=True).cte(name).prefix_with("MATERIALIZED")


_LEVELS: dict[str, Level] = {"info": "info", "warning": "warning", "error": "error"}


def _level(value: str) -> Level:
    return _LEVELS.get(value, "info")


def describe_error(exc: BaseException) -> str:
    """`Type: message`, secret-looking values masked, clipped to fit `last_error`."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return str(scrub(text))[:MAX_ERROR]


class Deliverer:
    def __init__(self, db: Database, clock: Clock, *, surface: str, targets: Targets | None, send: Send,
                 identity: str, recipient: str | None = None, collapse: bool = False,
                 lease_s: float = 30, poll_s: float = 0.5, batch: int = 50, max_attempts: int = 8,
                 backoff_base_s: float = 1, backoff_cap_s: float = 300,
                 send_timeout_s: float | None = None, rng: random.Random | None = None) -> None:
        if lease_s <= 0 or poll_s <= 0 or batch < 1 or max_attempts < 1:
            raise ValueError("lease_s and poll_s must be positive, batch and max_attempts at least 1")
        if not identity or len(identity) > 128:
            raise ValueError("a deliverer needs an identity of at most 128 characters")
        self.db = db
        self.clock = clock
        self.surface = surface
        self._targets = targets
        self._send = send
        self.identity = identity
        self.recipient = recipient
        self.collapse = collapse
        self.lease = timedelta(seconds=lease_s)
        self.poll_s = poll_s
        self.batch = batch
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.send_timeout_s = send_timeout_s if send_timeout_s is not None else lease_s / 3
        if self.send_timeout_s >= lease_s:
            raise ValueError("send_timeout_s must be shorter than the lease")
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.paused_until = 0.0            # monotonic time before which `run` starts no round (RetryLater)

    @staticmethod
    def _monotonic() -> float:
        return time.monotonic()

    # --- waking ---------------------------------------------------------------------------
    def nudge(self) -> None:
        """Deliver now instead of at the next poll. Safe from any thread."""
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)
        else:
            self._wake.set()

    def current_targets(self) -> list[str] | None:
        """The destinations served this round; None: every destination of the surface (a chat
        surface reaches all its users; its route already chose what is written for it)."""
        if self._targets is None:
            return None
        chosen = self._targets() if callable(self._targets) else self._targets
        return sorted(chosen)

    def backoff(self, failures: int) -> timedelta:
        """The wait after the `failures`-th failed attempt (jittered)."""
        delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** max(failures - 1, 0))
        return timedelta(seconds=delay * self._rng.uniform(0.5, 1.0))

    # --- one round ------------------------------------------------------------------------
    async def deliver_once(self) -> int:
        """Expire, claim and send what is due now; returns how many sends succeeded."""
        sent, _ = await self._round()
        return sent

    async def _round(self) -> tuple[int, int]:
        wanted = self.current_targets()
        batch = await self.db.run(partial(self._claim, wanted))
        sent = 0
        for i, (notice, rows) in enumerate(batch.groups):
            if self.clock.now() + timedelta(seconds=self.send_timeout_s) >= batch.until:
                # not enough lease left to send safely: let another round (or replica) take them
                await self.db.run(partial(self._release, [r.id for _, rs in batch.groups[i:] for r in rs],
                                          batch.until))
                break
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await self._send(notice)
            except RetryLater as exc:
                await self.db.run(partial(self._failed, rows, batch.until, describe_error(exc), notice,
                                          at_least_s=exc.seconds))
                rest = [r.id for _, rs in batch.groups[i + 1:] for r in rs]
                if rest:
                    await self.db.run(partial(self._release, rest, batch.until))
                self.paused_until = self._monotonic() + exc.seconds
                break
            except Exception as exc:
                await self.db.run(partial(self._failed, rows, batch.until, describe_error(exc), notice))
                continue
            await self.db.run(partial(self._delivered, [r.id for r in rows], batch.until))
            sent += 1
        return sent, batch.claimed

    def _mine(self, ids: Iterable[int], until: datetime) -> list[Any]:
        d = NoticeDelivery
        return [col(d.id).in_(sorted(ids)), col(d.claimed_by) == self.identity, col(d.claimed_until) == until]

    def _claim(self, wanted: list[str] | None, s: Session) -> _Batch:
        d = NoticeDelivery
        now = as_utc(self.clock.now())
        until = now + self.lease
        open_ = [col(d.surface) == self.surface, col(d.delivered_at).is_(None), col(d.gave_up_at).is_(None)]
        free = or_(col(d.claimed_until).is_(None), col(d.claimed_until) < now)
        expired = col(d.expires_at) < now
        stale = _picked(select(col(d.id)).where(*open_, free, expired), "stale")
        s.execute(update(d).where(col(d.id).in_(select(stale.c.id)), *open_, free, expired)
                  .values(gave_up_at=now, last_error=EXPIRED).execution_options(synchronize_session=False))
        ids: list[int] = []
        if wanted is None or wanted:
            due = [*open_, free, col(d.next_attempt_at) <= now,
                   or_(col(d.expires_at).is_(None), col(d.expires_at) >= now)]
            if wanted is not None:
                due.append(col(d.target).in_(wanted))
            pick = _picked(select(col(d.id)).where(*due).order_by(col(d.next_attempt_at), col(d.id))
                           .limit(self.batch), "due")
            ids = list(s.execute(update(d).where(col(d.id).in_(select(pick.c.id)), *due)
                                 .values(claimed_by=self.identity, claimed_until=until)
                                 .returning(col(d.id)).execution_options(synchronize_session=False)).scalars())
        groups: list[tuple[DeliveredNotice, list[_Row]]] = []
        if ids:
            rows = s.execute(select(d, NoticeRecord).join(NoticeRecord, col(NoticeRecord.id) == col(d.notice_id))
                             .where(*self._mine(ids, until))
                             .order_by(col(NoticeRecord.created_at), col(NoticeRecord.id), col(d.id))).all()
            skipped: list[int] = []
            by_notice: dict[int, tuple[NoticeRecord, list[_Row]]] = {}
            for delivery, notice in rows:
                assert delivery.id is not None and notice.id is not None
                if self.recipient is not None and notice.actor == self.recipient:
                    skipped.append(delivery.id)
                    continue
                row = _Row(delivery.id, delivery.target, delivery.attempts)
                if self.collapse:
                    by_notice.setdefault(notice.id, (notice, []))[1].append(row)
                else:
                    groups.append((self._notice(notice, [row]), [row]))
            groups.extend((self._notice(n, rs), rs) for n, rs in by_notice.values())
            if skipped:
                s.execute(update(d).where(*self._mine(skipped, until)).values(delivered_at=now)
                          .execution_options(synchronize_session=False))
        s.commit()
        return _Batch(until=until, claimed=len(ids), groups=groups)

    @staticmethod
    def _notice(n: NoticeRecord, rows: list[_Row]) -> DeliveredNotice:
        assert n.id is not None
        return DeliveredNotice(notice_id=n.id, delivery_ids=[r.id for r in rows], kind=n.kind, text=n.text,
                               level=_level(n.level),
                               created_at=as_utc(n.created_at), instance_id=n.instance_id, owner=n.owner,
                               team=n.team, actor=n.actor, simulated=n.simulated,
                               actions=stored_actions(n.actions, n.id), targets=[r.target for r in rows],
                               attempt=max(r.attempts for r in rows) + 1)

    def _delivered(self, ids: list[int], until: datetime, s: Session) -> int:
        now = as_utc(self.clock.now())
        done = len(s.execute(update(NoticeDelivery).where(*self._mine(ids, until)).values(delivered_at=now)
                             .returning(col(NoticeDelivery.id))
                             .execution_options(synchronize_session=False)).all())
        s.commit()
        if done < len(ids):  # the lease ran out during the send and another deliverer took it
            log.info("%s: %d of %d deliveries were no longer ours to mark", self.identity, len(ids) - done, len(ids))
        return done

    def _release(self, ids: list[int], until: datetime, s: Session) -> None:
        s.execute(update(NoticeDelivery).where(*self._mine(ids, until)).values(claimed_by=None, claimed_until=None)
                  .execution_options(synchronize_session=False))
        s.commit()

    def _failed(self, rows: list[_Row], until: datetime, error: str, notice: DeliveredNotice, s: Session, *,
                at_least_s: float = 0.0) -> None:
        now = as_utc(self.clock.now())
        for row in sorted(rows, key=lambda r: r.id):
            failures = row.attempts + 1
            values: dict[str, Any] = {"attempts": failures, "last_error": error, "claimed_by": None,
                                      "claimed_until": None}
            if failures >= self.max_attempts:
                values["gave_up_at"] = now
            else:
                values["next_attempt_at"] = now + max(self.backoff(failures), timedelta(seconds=at_least_s))
            matched = s.execute(update(NoticeDelivery).where(*self._mine([row.id], until)).values(**values)
                                .returning(col(NoticeDelivery.id))
                                .execution_options(synchronize_session=False)).first() is not None
            if matched and failures >= self.max_attempts:
                log.warning("%s: gave up on notice %s (%s) to %s after %d attempts: %s", self.surface,
                            notice.notice_id, notice.kind, row.target, failures, error)
        s.commit()

    # --- the loop -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set: a round, then wait `poll_s` or a nudge (no wait while
        full batches keep coming). Never dies of an exception."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        errors = 0
        while not stop.is_set():
            self._wake.clear()
            wait = self.poll_s
            try:
                _, claimed = await self._round()
                errors = 0
                if claimed >= self.batch:
                    wait = 0
            except Exception:
                errors += 1
                log.exception("%s: notice delivery failed (%d in a row)", self.identity, errors)
                wait = min(30.0, self.poll_s * 2 ** min(errors, 10))
            pause = self.paused_until - self._monotonic()
            if pause > 0:                   # the platform asked for quiet: not even a nudge wakes us
                await self._idle(stop, pause, nudges=False)
                continue
            if wait:
                await self._idle(stop, wait)
            else:
                await asyncio.sleep(0)

    async def _idle(self, stop: asyncio.Event, timeout: float, *, nudges: bool = True) -> None:
        waits = [asyncio.ensure_future(stop.wait())]
        if nudges:
            waits.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
