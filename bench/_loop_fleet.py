"""Fleets and a heartbeat for measuring event-loop lag (bench/bench_loop_lag.py and
tests/test_loop_lag.py).

A fleet: a few instances booted through `GpuService.boot`, the rest copies of them (instance row,
billing segments, a sandbox machine file each), given states and deadlines directly so that at
the fleet's clock nothing is due:

- running ~82 %: booted 0.2-30 h ago, idle deadlines between 1 h and a day away (a varied idle
  window, or a /gpu keep past it), the last activity probe spread over the last minute;
- stopped ~15 %: stopped 1-71 h ago (compute segments cut at month boundaries, storage open), so
  no 3-day storage reminder falls within the next hour;
- loading ~3 %: ordered minutes ago, the sandbox still pulling their image;
- each instance has two earlier closed compute sessions of its own (within the last few days: in
  this month or the last, depending on the date).

Only gpuherd's public pieces are used, plus the sandbox's bulk hook `SandboxProvider._state`. A
fleet is built before anything is measured (the bulk copy is one unit of work in a thread);
`make_due` then readies a load's instances through `Database.run`.

`Heartbeat` is the measurement: a task sleeping 10 ms at a time in the loop under test, noting
how late each wake-up comes, and the garbage collector's pauses meanwhile."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import delete, select, text
from sqlmodel import Session, col

from gpuherd.core.auth import Actor
from gpuherd.core.clock import VirtualClock, epoch
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.guard_plan import replan
from gpuherd.core.ids import new_instance_id
from gpuherd.core.ledger import COMPUTE, STORAGE, Ledger, split_at_months
from gpuherd.core.models import BillingSegment, Instance, InstanceState
from gpuherd.core.notify import NotifierHub
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.results import BootResult
from gpuherd.core.service import GpuService
from gpuherd.core.templates import TemplateCatalog

TEMPLATES = ("budget", "budget", "budget", "research", "high_performance")
TEAMS = ("ml", "vision", "nlp", "infra")
USERS = tuple(f"slack:U{n:03d}" for n in range(40))
WINDOWS = (1800, 1800, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600)   # idle windows, seconds
STOPPED_SHARE, LOADING_SHARE = 0.15, 0.03
REAL_BOOTS = 12
HISTORY = 2            # earlier closed compute sessions per instance
WARN_LEAD_S = 300
RUNNING_MSG = "running (simulated)"
STOPPED_MSG = "stopped; disk kept, storage still billed (simulated)"


class FrozenClock(VirtualClock):
    """Wall time stays where it is put (the fleet's deadlines do not come due while a load runs);
    monotonic time is real, so shared provider listings expire as they do in a running process."""

    def monotonic(self) -> float:
        return time.monotonic()


async def _no_sleep(_: float) -> None:
    return None


def make_service(url: str, home: Path, clock: VirtualClock | None = None, *, db: Database | None = None,
                 latency_s: float = 0.0, lock_name: str | None = None,
                 sandbox_clock: Any = None) -> tuple[GpuService, SandboxProvider]:
    """A service over one sandbox whose machines live in `home/sandbox.json.d/` (a file each)."""
    home.mkdir(parents=True, exist_ok=True)
    clock = clock or FrozenClock(datetime.now(UTC).replace(microsecond=0))
    sandbox = SandboxProvider(home / "sandbox.json", seed=7, time_scale=0, clock=sandbox_clock or clock,
                              latency_s=latency_s)
    settings = Settings(home=home / "home", database_url=url, local_user="bench", local_role="admin",
                        poll_interval_s=0.05, guard_lock_name=lock_name or f"loop-lag-{uuid.uuid4().hex[:8]}")
    if db is None:
        db = Database(url)
        db.upgrade()
    svc = GpuService(settings, db, ProviderRegistry({"sandbox": sandbox}), TemplateCatalog.load(None),
                     clock=clock, hub=NotifierHub(), sleep=_no_sleep)
    return svc, sandbox


@dataclass
class Fleet:
    service: GpuService
    sandbox: SandboxProvider
    admin: Actor
    members: list[Actor]
    pool: list[str]                     # running instances no load has touched yet (shuffled)
    counts: dict[str, int] = field(default_factory=dict)
    build_s: float = 0.0

    def take(self, n: int) -> list[str]:
        if len(self.pool) < n:
            raise RuntimeError(f"the fleet has only {len(self.pool)} untouched running instances left, {n} wanted")
        taken, self.pool = self.pool[-n:], self.pool[:-n]
        return taken


async def build_fleet(svc: GpuService, sandbox: SandboxProvider, n: int, *, seed: int = 11,
                      real_boots: int = REAL_BOOTS, budgets: bool = True) -> Fleet:
    """`n` tracked instances (see the module docstring). The sandbox answers instantly while
    building (its `latency_s` is restored afterwards)."""
    began = time.perf_counter()
    rng = random.Random(seed)
    latency, sandbox.latency_s = sandbox.latency_s, 0.0
    try:
        admin = svc.local_actor()
        for i, principal in enumerate(USERS):
            await svc.set_user(admin, principal, role="member", team=TEAMS[i % len(TEAMS)])
        members = [svc.actor(p, source="slack") for p in USERS]
        for i in range(min(real_boots, n)):
            booted = await svc.boot(members[i % len(members)], TEMPLATES[i % len(TEMPLATES)])
            if not isinstance(booted, BootResult):
                raise RuntimeError(f"a fleet boot asked for confirmation instead: {booted}")
        counts = await asyncio.to_thread(_clone_all, svc, sandbox, n, rng)
        if budgets:
            for team in TEAMS:
                await svc.set_budget(admin, "team", team, "1000000")
            for user in USERS[:8]:
                await svc.set_budget(admin, "user", user, "200000")
    finally:
        sandbox.latency_s = latency
    await asyncio.to_thread(analyze, svc.db)

    def running(s: Session) -> list[str]:
        return list(s.execute(select(Instance.id).where(
            Instance.state == InstanceState.RUNNING.value).order_by(Instance.id)).scalars())
    pool = await svc.db.run(running)
    rng.shuffle(pool)
    return Fleet(svc, sandbox, admin, members, pool, counts, time.perf_counter() - began)


def analyze(db: Database) -> None:
    """Fresh planner statistics for the tables the loads read (only this schema's on PostgreSQL)."""
    with db.engine.begin() as conn:
        conn.execute(text("ANALYZE instances, billing_segments" if db.is_postgres else "ANALYZE"))


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _copy(model: Instance, state: dict[str, Any], taken: set[str]) -> tuple[Instance, dict[str, Any]]:
    """A new row and sandbox machine record shaped like `model`, under fresh ids and key."""
    number = int(state["next_id"])
    state["next_id"] = number + 1
    pid = f"sbx-{number:06d}"
    key = f"gh-{uuid.uuid4().hex}"
    data = model.model_dump()
    data.update(id=new_instance_id(taken), idempotency_key=key, provider_id=pid,
                endpoint=(model.endpoint or "").replace(model.provider_id or "?", pid) or None)
    inst = Instance(**data)
    taken.add(inst.id)
    record = {**state["instances"][model.provider_id], "provider_id": pid, "label": key}
    state["instances"][pid] = record
    return inst, record


def _clone_all(svc: GpuService, sandbox: SandboxProvider, n: int, rng: random.Random) -> dict[str, int]:
    now = svc.clock.now()
    counts = {"running": 0, "stopped": 0, "loading": 0}
    with svc.db.session() as s, sandbox._state(write=True) as state:
        booted = [i for i in s.execute(select(Instance).order_by(Instance.id)).scalars() if i.provider_id]
        if not booted:
            raise RuntimeError("no booted instance to copy")
        taken = {b.id for b in booted}
        # the booted rows get their segments rebuilt below, like every copy
        s.execute(delete(BillingSegment))
        new_rows: list[Instance] = []
        segments: list[BillingSegment] = []
        for k in range(n):
            model = booted[k % len(booted)]
            if k < len(booted):
                inst, record = model, state["instances"][model.provider_id]
            else:
                inst, record = _copy(model, state, taken)
                new_rows.append(inst)
            owner_i = rng.randrange(len(USERS))
            inst.owner, inst.team = USERS[owner_i], TEAMS[owner_i % len(TEAMS)]
            inst.version = 1
            inst.keep_until = inst.idle_warned_at = inst.lifetime_warned_at = inst.stopped_warned_at = None
            inst.stopped_at = inst.destroyed_at = inst.guard_error = None
            inst.max_lifetime_s = inst.destroy_after_stopped_s = None
            inst.warn_lead_s = WARN_LEAD_S
            inst.idle_window_s = window = rng.choice(WINDOWS)
            inst.activity_status, inst.activity_detail = "quiet", "GPU 2%"
            seg = {"instance_id": inst.id, "owner": inst.owner, "team": inst.team, "template": inst.template,
                   "provider": inst.provider, "kind": COMPUTE, "rate_micros": inst.dph_micros}
            roll = rng.random()
            if roll < STOPPED_SHARE:
                counts["stopped"] += 1
                started = now - timedelta(hours=rng.uniform(74, 200))
                stopped = now - timedelta(hours=rng.uniform(1, 71))
                inst.state = InstanceState.STOPPED.value
                inst.last_activity_at = stopped - timedelta(minutes=30)
                inst.stopped_at = stopped
                inst.ready_at = None
                inst.guard_checked_at = None
                inst.status_message = STOPPED_MSG
                record.update(action="stop", action_at=_iso(stopped), durations={"stopping": 0.0})
                segments += [BillingSegment(start_ts=a, end_ts=b, **seg)
                             for a, b in split_at_months(epoch(started), epoch(stopped))]
                if inst.storage_dph_micros:
                    segments.append(BillingSegment(**{**seg, "kind": STORAGE, "rate_micros": inst.storage_dph_micros},
                                                   start_ts=epoch(stopped)))
            elif roll < STOPPED_SHARE + LOADING_SHARE:
                counts["loading"] += 1
                started = now - timedelta(minutes=rng.uniform(1, 10))
                inst.state = InstanceState.LOADING.value
                inst.last_activity_at = started
                inst.ready_at = None
                inst.guard_checked_at = now - timedelta(seconds=rng.uniform(0.5, 59.5))
                inst.status_message = f"pulling image {record['image']} (0%) (simulated)"
                record.update(action="create", action_at=_iso(started),
                              durations={"provisioning": 0.0, "loading": 1e9, "model": 0.0}, gpu_util=None)
                segments.append(BillingSegment(start_ts=epoch(started), **seg))
            else:
                counts["running"] += 1
                started = now - timedelta(hours=rng.uniform(0.2, 30))
                inst.state = InstanceState.RUNNING.value
                up_s = (now - started).total_seconds()
                inst.last_activity_at = now - timedelta(seconds=rng.uniform(0, min(1200.0, up_s)))
                if inst.last_activity_at + timedelta(seconds=window) < now + timedelta(hours=1):
                    inst.keep_until = now + timedelta(seconds=rng.uniform(3600, 86400))   # a /gpu keep
                inst.ready_at = started
                inst.guard_checked_at = now - timedelta(seconds=rng.uniform(0.5, 59.5))
                inst.status_message = RUNNING_MSG
                record.update(action="create", action_at=_iso(started),
                              durations={"provisioning": 0.0, "loading": 0.0, "model": 0.0}, gpu_util=None)
                segments.append(BillingSegment(start_ts=epoch(started), **seg))
            inst.created_at = inst.updated_at = inst.started_at = started
            record["created_at"] = _iso(started)
            end = epoch(started)
            for _ in range(HISTORY):   # earlier sessions, cut at month boundaries as Ledger.close cuts them
                end -= int(rng.uniform(3600, 48 * 3600))
                start = end - int(rng.uniform(1800, 8 * 3600))
                segments += [BillingSegment(start_ts=a, end_ts=b, **seg) for a, b in split_at_months(start, end)]
                end = start
            replan(inst)
            if k < len(booted):
                s.add(inst)
        s.add_all(new_rows)
        s.flush()
        s.add_all(segments)
        s.flush()
        Ledger.rebuild_rollup(s)   # segments written in bulk, not through Ledger.close
        s.commit()
    return counts


# --- making steps due ---------------------------------------------------------------------

def stop_due(inst: Instance, now: datetime) -> None:
    """Idle past its deadline, warned five minutes before it: the next pass stops it."""
    inst.keep_until = None
    inst.last_activity_at = now - timedelta(seconds=inst.idle_window_s + 1)
    inst.idle_warned_at = now - timedelta(seconds=inst.warn_lead_s + 1)


def warn_due(inst: Instance, now: datetime) -> None:
    """Four minutes from its idle deadline, not yet warned: the next pass warns it."""
    inst.keep_until = None
    inst.idle_warned_at = None
    inst.last_activity_at = now - timedelta(seconds=inst.idle_window_s - 240)


async def make_due(svc: GpuService, ids: list[str], how: Callable[[Instance, datetime], None]) -> None:
    now = svc.clock.now()

    def work(s: Session) -> None:
        rows = list(s.execute(select(Instance).where(col(Instance.id).in_(ids))).scalars())
        if len(rows) != len(ids):
            raise RuntimeError(f"{len(ids) - len(rows)} of the chosen instances are missing")
        for inst in rows:
            how(inst, now)
            replan(inst)
            s.add(inst)
        s.commit()
    await svc.db.run(work)


# --- the heartbeat ------------------------------------------------------------------------

def nearest_rank(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)] if ordered else 0.0


def _allocating_site() -> str:
    """The innermost gpuherd function on the stack of the thread whose allocation set off a
    collection (the callback runs in that thread), e.g. "views.py:build_views"."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}core{os.sep}" in name and "site-packages" not in name:
            return f"{Path(name).name}:{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "outside gpuherd"


class Heartbeat:
    """A task on the running loop that sleeps `interval` seconds at a time and records how late
    each wake-up came (seconds past the interval). Used as `async with Heartbeat() as hb:` around
    the work; leaving waits for the beat in progress, so a block at the very end is counted.
    It also records the pauses of CPython's cyclic garbage collector meanwhile (`gc.callbacks`):
    a collection stops every thread, the loop's included."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.lateness: list[float] = []
        self.gc_pauses: list[tuple[int, float]] = []      # (generation, seconds)
        self.gc_sites: Counter[str] = Counter()           # where full collections were triggered
        self._gc_began = 0.0
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Heartbeat:
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.create_task(self._beat(), name="heartbeat")
        await asyncio.sleep(0)   # the first beat is asleep before the work starts
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._stop = True
        try:
            if self._task is not None:
                await self._task
        finally:
            gc.callbacks.remove(self._on_gc)

    async def _beat(self) -> None:
        while not self._stop:
            before = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.lateness.append(max(0.0, time.perf_counter() - before - self.interval))

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_began = time.perf_counter()
            if info["generation"] == 2:
                self.gc_sites[_allocating_site()] += 1
        else:
            self.gc_pauses.append((info["generation"], time.perf_counter() - self._gc_began))

    @property
    def beats(self) -> int:
        return len(self.lateness)

    @property
    def max_ms(self) -> float:
        return max(self.lateness, default=0.0) * 1000

    @property
    def p99_ms(self) -> float:
        return nearest_rank(self.lateness, 99) * 1000

    @property
    def gc_max_ms(self) -> float:
        return max((p for _, p in self.gc_pauses), default=0.0) * 1000

    @property
    def full_collections(self) -> int:
        return sum(1 for g, _ in self.gc_pauses if g == 2)

    def gc_where(self, top: int = 2) -> str:
        """Where the full collections began, most frequent first: "views.py:build_views x2"."""
        return ", ".join(f"{site}{f' x{n}' if n > 1 else ''}" for site, n in self.gc_sites.most_common(top))
