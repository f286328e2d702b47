"""The notice outbox: who hears a notice, written in the caller's transaction, delivered once,
retried with backoff, expired, collapsed, skipped for whoever caused it; a lease that runs out
is sent again; several deliverers (tasks, threads with their own engines, processes killed
mid-way) never send one row twice while its lease holds."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlmodel import Session, col

from gpuherd.core.actions import Op, Style, act
from gpuherd.core.auth import Actor
from gpuherd.core.clock import Clock, VirtualClock, as_utc
from gpuherd.core.db import Database
from gpuherd.core.models import NoticeDelivery, NoticeRecord, Role, User
from gpuherd.core.outbox import (
    ADMINS,
    CHAT_TTL,
    SHELL_TTL,
    DeliveredNotice,
    Deliverer,
    NoticeDraft,
    Outbox,
    Send,
    SurfaceRoute,
    Targets,
    audience,
    targets,
)

SHELL = SurfaceRoute.shell()
SLACK = SurfaceRoute(surface="slack", target_kinds=("user", "team"), ttl=CHAT_TTL, principal_prefix="slack:")
ALICE = "local:alice"
WORKER = Path(__file__).with_name("outbox_worker.py")


def draft(**kw: object) -> NoticeDraft:
    fields: dict[str, object] = {"kind": "instance.ready", "text": "g-1 is up", "owner": ALICE, "team": "ml",
                                 "instance_id": "g-1"}
    fields.update(kw)
    return NoticeDraft.model_validate(fields)


def write(db: Database, outbox: Outbox, clock: Clock, *drafts: NoticeDraft) -> list[int]:
    with db.session() as s:
        ids = [outbox.add(s, d, clock.now()).id for d in drafts]
        s.commit()
    assert all(i is not None for i in ids)
    return [i for i in ids if i is not None]


def deliveries(db: Database) -> list[NoticeDelivery]:
    with db.session() as s:
        return list(s.execute(select(NoticeDelivery).order_by(col(NoticeDelivery.id))).scalars())


def pending(db: Database) -> int:
    with db.session() as s:
        return s.execute(select(func.count()).select_from(NoticeDelivery).where(
            col(NoticeDelivery.delivered_at).is_(None), col(NoticeDelivery.gave_up_at).is_(None))).scalar_one()


class Recorder:
    """A surface's send: records what it got; `fail(notice)` may raise first."""

    def __init__(self, fail: Callable[[DeliveredNotice], None] | None = None) -> None:
        self.sent: list[DeliveredNotice] = []
        self.calls = 0
        self.fail = fail

    async def __call__(self, notice: DeliveredNotice) -> None:
        self.calls += 1
        if self.fail is not None:
            self.fail(notice)
        self.sent.append(notice)

    @property
    def ids(self) -> list[int]:
        return [n.notice_id for n in self.sent]


def deliverer(db: Database, clock: Clock, send: Send, *, identity: str = "d1",
              wanted: Targets = frozenset({f"user:{ALICE}"}), **kw: Any) -> Deliverer:
    return Deliverer(db, clock, surface="shell", targets=wanted, send=send, identity=identity, **kw)


# --- who hears what ---------------------------------------------------------------------------

def test_targets_owner_team_actor_and_admins() -> None:
    assert targets(draft(actor=None)) == [f"user:{ALICE}", "team:ml"]
    # the owner caused it: their own reply told them, the team's channel still hears it
    assert targets(draft(actor=ALICE)) == ["team:ml"]
    assert targets(draft(actor="slack:U2")) == [f"user:{ALICE}", "team:ml"]
    assert targets(draft(team=None, actor=ALICE)) == []
    assert targets(draft(owner=None, team="ml")) == ["team:ml"]
    # for admins instead of an owner: nobody else
    assert targets(draft(to_admins=True, owner=None, team=None)) == [ADMINS]
    assert targets(draft(to_admins=True)) == [ADMINS]


def test_routes_decide_which_surface_takes_which_target() -> None:
    outbox = Outbox([SHELL, SLACK])
    got = {(r.surface, t) for r, t in outbox.deliveries_for(draft(owner="slack:U2"))}
    assert got == {("shell", "user:slack:U2"), ("shell", "team:ml"), ("slack", "user:slack:U2"), ("slack", "team:ml")}
    # slack cannot DM a shell principal, and takes no admins notices
    got = {(r.surface, t) for r, t in outbox.deliveries_for(draft())}
    assert got == {("shell", f"user:{ALICE}"), ("shell", "team:ml"), ("slack", "team:ml")}
    assert [(r.surface, t) for r, t in outbox.deliveries_for(draft(to_admins=True))] == [("shell", ADMINS)]
    assert SHELL.ttl == SHELL_TTL == timedelta(hours=1) and CHAT_TTL == timedelta(hours=24)
    with pytest.raises(ValueError):
        Outbox([SHELL, SHELL])


def test_audience_of_a_person() -> None:
    assert audience(Actor(principal=ALICE, role=Role.ADMIN, team="ml")) == {f"user:{ALICE}", "team:ml", ADMINS}
    assert audience(Actor(principal="slack:U2", role=Role.MEMBER, team="ml")) == {"user:slack:U2", "team:ml"}
    assert audience(Actor(principal="system:x", role=Role.VIEWER, team="*")) == {"user:system:x"}


# --- writing ----------------------------------------------------------------------------------

def test_add_is_part_of_the_callers_transaction(database: Database, clock: VirtualClock) -> None:
    outbox = Outbox([SHELL])
    with database.session() as s:
        s.add(User(principal="slack:U9", role="member", team="ml", created_at=clock.now()))
        record = outbox.add(s, draft(), clock.now())
        assert record.id is not None               # flushed for its id
        s.rollback()                               # the change failed: so did its notice
    with database.session() as s:
        assert s.execute(select(func.count()).select_from(NoticeRecord)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(NoticeDelivery)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(User)).scalar_one() == 0

    with database.session() as s:
        s.add(User(principal="slack:U9", role="member", team="ml", created_at=clock.now()))
        outbox.add(s, draft(actions=[act(Op.KEEP, "g-1", duration="1h")]), clock.now())
        s.commit()
    rows = deliveries(database)
    assert sorted(r.target for r in rows) == ["team:ml", f"user:{ALICE}"]
    for r in rows:
        assert r.surface == "shell" and r.attempts == 0 and r.delivered_at is None
        assert as_utc(r.next_attempt_at) == clock.now()
        assert r.expires_at is not None and as_utc(r.expires_at) == clock.now() + SHELL_TTL


# --- delivering -------------------------------------------------------------------------------

async def test_delivered_once_with_everything_a_surface_needs(database: Database, clock: VirtualClock) -> None:
    outbox = Outbox([SHELL])
    actions = [act(Op.KEEP, "g-1", duration="1h"), act(Op.STOP, "g-1", style=Style.DANGER, confirm=True)]
    [nid] = write(database, outbox, clock, draft(level="warning", simulated=True, actions=actions, actor=None))
    send = Recorder()
    d = deliverer(database, clock, send)
    assert await d.deliver_once() == 1
    assert await d.deliver_once() == 0
    [got] = send.sent
    assert got.notice_id == nid and got.kind == "instance.ready" and got.text == "g-1 is up"
    assert got.level == "warning" and got.simulated and got.owner == ALICE and got.team == "ml"
    assert got.instance_id == "g-1" and got.actor is None and got.attempt == 1
    assert got.actions == actions and got.targets == [f"user:{ALICE}"] and len(got.delivery_ids) == 1
    assert got.created_at == clock.now()
    by_target = {r.target: r for r in deliveries(database)}
    assert by_target[f"user:{ALICE}"].delivered_at is not None
    assert by_target["team:ml"].delivered_at is None          # nobody serving it yet
    clock.advance(timedelta(hours=2))
    assert await d.deliver_once() == 0 and len(send.sent) == 1
    assert by_target[f"user:{ALICE}"].gave_up_at is None


async def test_failures_back_off_then_give_up(database: Database, clock: VirtualClock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox([SHELL])
    write(database, outbox, clock, draft())

    def boom(_: DeliveredNotice) -> None:
        raise RuntimeError("slack said no to xoxb-123456789012-abcdefabcdef " + "x" * 600)

    send = Recorder(boom)
    d = deliverer(database, clock, send, max_attempts=3, backoff_base_s=10, backoff_cap_s=15, rng=random.Random(3))
    t0 = clock.now()
    assert await d.deliver_once() == 0 and send.calls == 1
    [row] = [r for r in deliveries(database) if r.target.startswith("user:")]
    assert row.attempts == 1 and row.claimed_by is None and row.delivered_at is None and row.gave_up_at is None
    assert row.last_error is not None and row.last_error.startswith("RuntimeError: slack said no to ")
    assert "xoxb" not in row.last_error and len(row.last_error) == 512
    wait = as_utc(row.next_attempt_at) - t0
    assert timedelta(seconds=5) <= wait <= timedelta(seconds=10)           # base, jittered
    assert await d.deliver_once() == 0 and send.calls == 1                  # not due yet

    clock.advance(wait)
    assert await d.deliver_once() == 0 and send.calls == 2
    [row] = [r for r in deliveries(database) if r.target.startswith("user:")]
    wait = as_utc(row.next_attempt_at) - clock.now()
    assert row.attempts == 2 and timedelta(seconds=7.5) <= wait <= timedelta(seconds=15)   # 2 x base, capped

    clock.advance(wait)
    with caplog.at_level(logging.WARNING, logger="gpuherd.core.outbox"):
        assert await d.deliver_once() == 0 and send.calls == 3
    [row] = [r for r in deliveries(database) if r.target.startswith("user:")]
    assert row.attempts == 3 and row.gave_up_at is not None
    assert any("gave up" in rec.message and "after 3 attempts" in rec.message for rec in caplog.records)
    clock.advance(timedelta(minutes=50))
    assert await d.deliver_once() == 0 and send.calls == 3

    # a surface that recovers: the retry goes out, and says which attempt it is
    def first_fails(_: DeliveredNotice) -> None:
        if flaky.calls == 1:
            raise ConnectionError("reset")

    flaky = Recorder(first_fails)
    write(database, outbox, clock, draft(kind="instance.stopped"))
    d2 = deliverer(database, clock, flaky, identity="d2", backoff_base_s=1)
    assert await d2.deliver_once() == 0
    clock.advance(1)
    assert await d2.deliver_once() == 1 and [n.attempt for n in flaky.sent] == [2]


async def test_a_send_that_hangs_is_a_failed_attempt(database: Database, clock: VirtualClock) -> None:
    write(database, Outbox([SHELL]), clock, draft())

    async def hang(_: DeliveredNotice) -> None:
        await asyncio.sleep(30)

    d = deliverer(database, clock, hang, send_timeout_s=0.05)
    started = time.monotonic()
    assert await d.deliver_once() == 0
    assert time.monotonic() - started < 5
    [row] = [r for r in deliveries(database) if r.target.startswith("user:")]
    assert row.attempts == 1 and row.last_error == "TimeoutError" and row.claimed_by is None


async def test_expired_deliveries_are_given_up_unsent(database: Database, clock: VirtualClock) -> None:
    outbox = Outbox([SHELL])
    [nid] = write(database, outbox, clock, draft())
    clock.advance(SHELL_TTL + timedelta(seconds=1))
    send = Recorder()
    assert await deliverer(database, clock, send).deliver_once() == 0
    assert send.calls == 0
    rows = deliveries(database)
    # the whole surface is swept, also the team row this deliverer does not serve
    assert [(r.gave_up_at is not None, r.last_error, r.delivered_at) for r in rows] == [(True, "expired", None)] * 2
    with database.session() as s:
        assert not Outbox.reached_anyone(s, "g-1", "instance.ready", clock.now() - timedelta(days=1))
    assert nid


async def test_the_recipient_is_not_told_what_they_did_and_collapse(database: Database,
                                                                    clock: VirtualClock) -> None:
    outbox = Outbox([SHELL])
    alice = Actor(principal=ALICE, role=Role.ADMIN, team="ml")
    own, guard, admins = write(database, outbox, clock, draft(actor=ALICE, text="you stopped g-1"),
                               draft(actor=None, text="g-1 is idle"),
                               draft(to_admins=True, owner=None, team=None, text="unmanaged box"))
    send = Recorder()
    d = deliverer(database, clock, send, wanted=audience(alice), recipient=ALICE, collapse=True)
    assert await d.deliver_once() == 2
    assert send.ids == [guard, admins]                        # own: marked, not sent
    assert [r.delivered_at is not None for r in deliveries(database) if r.notice_id == own] == [True]
    collapsed = send.sent[0]
    assert sorted(collapsed.targets) == ["team:ml", f"user:{ALICE}"] and len(collapsed.delivery_ids) == 2
    assert all(r.delivered_at is not None for r in deliveries(database))
    assert pending(database) == 0

    # without collapse every destination is a send of its own
    [again] = write(database, outbox, clock, draft(actor=None, kind="guard.warn_idle"))
    send2 = Recorder()
    d2 = deliverer(database, clock, send2, identity="d2", wanted=audience(alice))
    assert await d2.deliver_once() == 2
    assert send2.ids == [again, again] and sorted(t for n in send2.sent for t in n.targets) == [
        "team:ml", f"user:{ALICE}"]


async def test_a_lease_that_runs_out_is_sent_again(database: Database, clock: VirtualClock) -> None:
    """A deliverer that dies after its send, before the delivered mark: the row stays claimed
    until the lease runs out, then another deliverer sends it again (at least once)."""
    [nid] = write(database, Outbox([SHELL]), clock, draft())

    def die(_: DeliveredNotice) -> None:
        raise asyncio.CancelledError

    dying = Recorder(die)
    a = deliverer(database, clock, dying, identity="a", lease_s=30)
    with pytest.raises(asyncio.CancelledError):
        await a.deliver_once()
    assert dying.calls == 1
    [row] = [r for r in deliveries(database) if r.target.startswith("user:")]
    assert row.claimed_by == "a" and row.delivered_at is None and row.attempts == 0

    send = Recorder()
    b = deliverer(database, clock, send, identity="b", lease_s=30)
    assert await b.deliver_once() == 0                        # the lease holds
    clock.advance(29)
    assert await b.deliver_once() == 0 and send.calls == 0
    clock.advance(2)
    assert await b.deliver_once() == 1 and send.ids == [nid]
    [row] = [r for r in deliveries(database) if r.target.startswith("user:")]
    assert row.claimed_by == "b" and row.delivered_at is not None and row.attempts == 0


async def test_no_send_starts_without_enough_lease_left(database: Database, clock: VirtualClock) -> None:
    """Slow sends eat the lease: what cannot be sent safely in time is released, not sent late."""
    ids = write(database, Outbox([SHELL]), clock, *[draft(text=f"n{i}") for i in range(5)])

    async def slow(n: DeliveredNotice) -> None:
        got.append(n.notice_id)
        clock.advance(12)

    got: list[int] = []
    d = deliverer(database, clock, slow, lease_s=30, send_timeout_s=10)
    assert await d.deliver_once() == 2                        # t=0 and t=12; at t=24 only 6 s are left
    assert got == ids[:2]
    mine = [r for r in deliveries(database) if r.target.startswith("user:")]
    assert [r.delivered_at is not None for r in mine] == [True, True, False, False, False]
    assert all(r.claimed_by is None for r in mine[2:])         # released at once, for anybody
    other = Recorder()
    assert await deliverer(database, clock, other, identity="e").deliver_once() == 3
    assert other.ids == ids[2:]


async def test_two_deliverers_interleaved_never_double_send(database: Database, clock: VirtualClock) -> None:
    wanted = {f"user:u{i}" for i in range(5)}
    ids = write(database, Outbox([SHELL]), clock,
                *[draft(owner=f"u{i % 5}", team=None, text=f"n{i}") for i in range(60)])
    sent: list[tuple[str, int]] = []

    def recorder(name: str) -> Send:
        async def send(n: DeliveredNotice) -> None:
            await asyncio.sleep(0)
            sent.append((name, n.notice_id))
            await asyncio.sleep(0)
        return send

    ds = [deliverer(database, clock, recorder(name), identity=name, wanted=wanted, batch=5) for name in ("a", "b")]

    rounds: list[int] = []

    async def drain(d: Deliverer) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and await database.run(_pending) > 0:
            rounds.append(await d.deliver_once())
            await asyncio.sleep(0)

    await asyncio.gather(*(drain(d) for d in ds))
    counts = Counter(i for _, i in sent)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    assert {name for name, _ in sent} == {"a", "b"}            # both did work, on different rows
    assert max(rounds) <= 5                                    # a claim takes at most a batch
    assert pending(database) == 0


def _pending(s: Session) -> int:
    return s.execute(select(func.count()).select_from(NoticeDelivery).where(
        col(NoticeDelivery.delivered_at).is_(None), col(NoticeDelivery.gave_up_at).is_(None))).scalar_one()


def test_deliverers_in_two_threads_with_their_own_engines(database: Database) -> None:
    clock = Clock()
    ids = write(database, Outbox([SHELL]), clock, *[draft(team=None, text=f"n{i}") for i in range(200)])
    sent: list[tuple[str, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        db = Database(database.url)

        async def send(n: DeliveredNotice) -> None:
            with lock:
                sent.append((name, n.notice_id))
            await asyncio.sleep(0)

        async def main() -> None:
            d = deliverer(db, clock, send, identity=name, batch=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and await db.run(_pending) > 0:
                await d.deliver_once()

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors and not any(t.is_alive() for t in threads)
    counts = Counter(i for _, i in sent)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    assert pending(database) == 0


async def test_run_wakes_on_commit_and_survives_errors(database: Database, clock: VirtualClock,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox([SHELL])
    send = Recorder()
    asked = 0

    def wanted() -> set[str]:
        nonlocal asked
        asked += 1
        if asked == 1:
            raise RuntimeError("directory unavailable")
        return {f"user:{ALICE}"}

    d = deliverer(database, clock, send, wanted=wanted, poll_s=30)   # only a nudge can be quick
    outbox.wake_on_commit(d.nudge)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    deadline = time.monotonic() + 5
    while asked < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert asked == 1 and not task.done()

    def add(s: Session) -> int | None:
        record = outbox.add(s, draft(), clock.now())
        s.commit()                                    # in a worker thread: wakes the loop thread-safely
        return record.id

    started = time.monotonic()
    nid = await database.run(add)
    while not send.sent and time.monotonic() - started < 5:
        await asyncio.sleep(0.01)
    assert send.ids == [nid] and time.monotonic() - started < 5
    assert any("notice delivery failed" in r.message for r in caplog.records)
    stop.set()
    await asyncio.wait_for(task, timeout=5)


async def test_reached_anyone_and_purge(database: Database, clock: VirtualClock) -> None:
    outbox = Outbox([SHELL])
    t0 = clock.now()
    warn = {"kind": "guard.warn_idle", "team": None, "actor": None}
    delivered, failed, waiting, nobody = write(
        database, outbox, clock, draft(**warn), draft(**warn, instance_id="g-2"),
        draft(**warn, instance_id="g-3", owner="u9"), draft(kind="instance.stopped", actor=ALICE, team=None))

    def fail(n: DeliveredNotice) -> None:
        if n.instance_id == "g-2":
            raise RuntimeError("no")

    assert await deliverer(database, clock, Recorder(fail), max_attempts=1).deliver_once() == 1
    with database.session() as s:
        assert Outbox.reached_anyone(s, "g-1", "guard.warn_idle", t0)
        assert not Outbox.reached_anyone(s, "g-1", "guard.warn_idle", t0 + timedelta(seconds=1))
        assert not Outbox.reached_anyone(s, "g-1", "instance.ready", t0)
        assert not Outbox.reached_anyone(s, "g-2", "guard.warn_idle", t0)     # gave up
        assert not Outbox.reached_anyone(s, "g-3", "guard.warn_idle", t0)     # still waiting

    clock.advance(timedelta(minutes=10))
    with database.session() as s:
        assert Outbox.purge(s, clock.now()) == 3       # delivered, given up, and one with nobody to tell
        s.commit()
    with database.session() as s:
        assert list(s.execute(select(col(NoticeRecord.id))).scalars()) == [waiting]
        assert {r.notice_id for r in s.execute(select(NoticeDelivery)).scalars()} == {waiting}
        assert Outbox.purge(s, t0 + timedelta(hours=2)) == 1                   # long expired
        s.commit()
    with database.session() as s:
        assert s.execute(select(func.count()).select_from(NoticeDelivery)).scalar_one() == 0
    assert delivered and failed and nobody


# --- a real process, killed -------------------------------------------------------------------

def _lines(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(x) for x in path.read_text().splitlines() if x.strip()]


def _start_worker(url: str, out: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OUTBOX_DB_URL": url, "OUTBOX_OUT": str(out), "OUTBOX_TARGET": f"user:{ALICE}",
           "OUTBOX_IDENTITY": "worker", "OUTBOX_LEASE_S": "1", "OUTBOX_PAUSE_S": "0.01"}
    with log.open("ab") as err:
        return subprocess.Popen([sys.executable, str(WORKER)], env=env, stdout=err, stderr=err)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_a_killed_deliverer_process_loses_nothing(database: Database, tmp_path: Path) -> None:
    if not database.is_postgres:
        pytest.skip("the multi-process delivery test runs on PostgreSQL")
    n = 150
    ids = write(database, Outbox([SHELL]), Clock(), *[draft(team=None, text=f"n{i}") for i in range(n)])
    out, log = tmp_path / "sent.txt", tmp_path / "worker.log"
    first = _start_worker(database.url, out, log)
    try:
        deadline = time.monotonic() + 15
        while len(_lines(out)) < 20 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.01)
        assert len(_lines(out)) >= 20, log.read_text()
        first.send_signal(signal.SIGKILL)                  # anywhere: mid-send, mid-mark, mid-claim
        first.wait(timeout=10)
        assert len(_lines(out)) < n                        # killed with work left
    finally:
        _stop(first)
    second = _start_worker(database.url, out, log)
    try:
        deadline = time.monotonic() + 20
        while pending(database) > 0 and time.monotonic() < deadline and second.poll() is None:
            time.sleep(0.05)
        assert pending(database) == 0, log.read_text()
    finally:
        _stop(second)
    counts = Counter(_lines(out))
    assert sorted(counts) == ids                           # every notice at least once
    twice = [i for i, c in counts.items() if c > 1]
    assert len(twice) <= 1 and max(counts.values()) <= 2, counts.most_common(3)


# --- what chat surfaces need: Retry-After, every destination of a surface, teams with a channel ---

async def test_retry_later_waits_what_the_platform_asked_and_pauses_the_round(database: Database,
                                                                             clock: VirtualClock) -> None:
    from gpuherd.core.outbox import RetryLater

    outbox = Outbox([SHELL])
    write(database, outbox, clock, draft(), draft(kind="instance.stopped"), draft(kind="budget.warning"))

    def limited(_: DeliveredNotice) -> None:
        if send.calls == 1:
            raise RetryLater(120, "Slack rate limit")

    send = Recorder(limited)
    d = deliverer(database, clock, send, backoff_base_s=1, backoff_cap_s=5)
    assert await d.deliver_once() == 0 and send.calls == 1, "the rest of the round is not sent into a 429"
    rows = [r for r in deliveries(database) if r.target.startswith("user:")]
    first = rows[0]
    assert first.attempts == 1 and first.last_error and "retry after 120" in first.last_error
    assert as_utc(first.next_attempt_at) - clock.now() >= timedelta(seconds=120), "Retry-After beats the backoff"
    assert all(r.claimed_by is None and r.attempts == 0 for r in rows[1:]), "the others were released unsent"
    assert d.paused_until > time.monotonic() + 100

    assert await d.deliver_once() == 2, "the released rows go at the next round"
    clock.advance(timedelta(seconds=121))
    assert await d.deliver_once() == 1 and sorted(n.kind for n in send.sent) == [
        "budget.warning", "instance.ready", "instance.stopped"]


async def test_a_deliverer_for_every_destination_of_its_surface(database: Database, clock: VirtualClock) -> None:
    outbox = Outbox([SHELL, SLACK])
    write(database, outbox, clock, draft(owner="slack:U1", team="ml"), draft(owner="slack:U2", team="cv"))
    send = Recorder()
    d = Deliverer(database, clock, surface="slack", targets=None, send=send, identity="slack-1")
    assert d.current_targets() is None
    assert await d.deliver_once() == 4
    assert sorted(t for n in send.sent for t in n.targets) == ["team:cv", "team:ml", "user:slack:U1", "user:slack:U2"]
    assert all(r.delivered_at is not None for r in deliveries(database) if r.surface == "slack")
    assert any(r.delivered_at is None for r in deliveries(database) if r.surface == "shell"), "other surfaces untouched"


def test_a_route_takes_only_the_teams_that_have_a_channel() -> None:
    route = SurfaceRoute(surface="slack", target_kinds=("user", "team"), principal_prefix="slack:",
                         teams=frozenset({"ml"}))
    assert route.takes("team:ml") and not route.takes("team:cv")
    assert route.takes("user:slack:U1") and not route.takes("user:local:bob") and not route.takes(ADMINS)


def test_slack_settings_make_a_slack_route(tmp_path: Path) -> None:
    from gpuherd.core.config import Settings
    from gpuherd.core.errors import ConfigError
    from gpuherd.core.service import default_routes

    plain = Settings(home=tmp_path)
    assert [r.surface for r in default_routes(plain)] == ["shell"] and not plain.slack_configured
    s = Settings(home=tmp_path, slack_bot_token="xoxb-1", slack_app_token="xapp-1", slack_channels={"ml": "C1"},
                 slack_admins=["U0ADMIN"], slack_api_url="http://127.0.0.1:9/api")
    [_, slack] = default_routes(s)
    assert slack.surface == "slack" and slack.teams == frozenset({"ml"}) and "admins" not in slack.target_kinds
    assert s.slack_api_url.endswith("/api/") and "slack:U0ADMIN" in s.all_admins
    with_admins = Settings(home=tmp_path, slack_bot_token="xoxb-1", slack_signing_secret="s", slack_admin_channel="C9")
    assert "admins" in default_routes(with_admins)[1].target_kinds
    from gpuherd.core.config import load_settings

    with pytest.raises(ConfigError, match="SLACK_ADMINS"):
        load_settings(home=tmp_path, slack_admins=["alice"])
