"""A month of a synthetic team's GPU money under three policies: (a) no guards, (b) a simple
once-a-minute cron that stops anything without activity for 30 min, (c) gpuherd's guards with
default settings (warning 5 min before an idle stop, `/gpu keep` answers).

    python bench/sim_month.py [--people 8] [--days 30] [--seed 1] [--policies abc] [--jobs 2]

About 5-6 minutes on 2 cores: policy (c) runs the real guard pass at every wake-up (one per running
machine per minute, ~57,000 passes of ~5 ms in the month); --days 7 for a quick look.

Everything below is SIMULATED and says so:
- time: a VirtualClock over November 2026 (UTC taken as the team's local time), advanced event by
  event (user actions, guard wake-ups, cron ticks), never second by second;
- machines: the sandbox provider at time_scale=0 (boots, starts and stops take effect at once;
  prices are the sandbox's simulated offers; an unused machine reports 0-3 % GPU utilisation);
- people: a seeded synthetic team (the same plan of work for every policy): workdays with bursts
  of real work (a training/inference job: the sandbox's GPU utilisation pinned at 80 %; or
  notebook work: an activity ping through `GpuService.record_activity` every 5 min), gaps between
  bursts (5-90 min: reading, coding, meetings), a lunch break, going home (stopping the machine
  with `GpuService.stop`, or forgetting to: 20 % of evenings, 35 % on Fridays; 10 % of days end
  with a job left running for 1-6 h), absences, rare weekend sessions, and two machines forgotten
  for days (an owner away for a long weekend, and one for a week). A person has one machine: they
  start it again when it is stopped, and destroy it and boot another when the day needs another
  template. In (a) a forgotten machine runs until its owner comes back and notices it.
- answers to warnings, policy (c) only: an owner who is in the office and has more work planned
  that day answers a warning with `/gpu keep` (1 h) within 0.5-3 min (90 %); in the office with no
  more work planned: `Stop now` (50 %) or nothing; away (lunch, home, absent): nothing.
Real: GpuService, the ledger, Guards.run_pass at Guards.next_wake(), SQLite (one temp database per
policy). The money is the ledger's: `GpuService.costs(period=2026-11)`.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import random
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import _path  # noqa: F401
from sqlalchemy import func, select

from gpuherd.core.auth import Actor, system_actor
from gpuherd.core.clock import VirtualClock, as_utc, epoch
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.guards import Guards
from gpuherd.core.ledger import COMPUTE
from gpuherd.core.models import BillingSegment, Instance, InstanceState
from gpuherd.core.notify import Notice, NotifierHub
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.results import BootResult, Confirmation
from gpuherd.core.service import GpuService
from gpuherd.core.templates import TemplateCatalog

START = datetime(2026, 11, 1, tzinfo=UTC)          # a Sunday; the month is November 2026
MAIN_TEMPLATES = (("budget", 0.45), ("research", 0.4), ("high_performance", 0.15))
PING_EVERY = timedelta(minutes=5)
CRON_EVERY = 60                                     # seconds
CRON_IDLE = timedelta(minutes=30)
CRON_UTIL_ACTIVE = 10.0                             # the same threshold the guards use
NAMES = ["ana", "ben", "chen", "dara", "eli", "fay", "gus", "hana", "ivo", "jun", "kai", "lea"]


# --- the plan: what people do, the same for every policy ----------------------------------------
@dataclass(order=True)
class Event:
    at: datetime
    seq: int
    kind: str = field(compare=False)        # arrive | burst_start | ping | burst_end | leave | keep | stop_now
    person: int = field(compare=False)
    data: dict = field(compare=False, default_factory=dict)


@dataclass
class Person:
    index: int
    principal: str
    main: str
    p_gpu: float
    ping_share: float
    presence: list[tuple[datetime, datetime]] = field(default_factory=list)   # in the office
    bursts: list[tuple[datetime, datetime]] = field(default_factory=list)
    leaves: list[datetime] = field(default_factory=list)


def _weighted(rng: random.Random, pairs: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([p[0] for p in pairs], [p[1] for p in pairs])[0]


def make_plan(args: argparse.Namespace) -> tuple[list[Person], list[Event], dict[str, int]]:
    rng = random.Random(args.seed)
    seq = itertools.count()
    people = [Person(i, f"slack:U{i:03d}", _weighted(rng, MAIN_TEMPLATES), rng.uniform(0.6, 0.95),
                     rng.uniform(0.3, 0.7)) for i in range(args.people)]
    events: list[Event] = []
    stats: Counter[str] = Counter()
    end = START + timedelta(days=args.days)
    workdays = [START + timedelta(days=d) for d in range(args.days) if (START + timedelta(days=d)).weekday() < 5]
    # two machines forgotten for days: (person, the day they forget, workdays away afterwards)
    trips: dict[tuple[int, datetime], int] = {}
    thursdays = [d for d in workdays if d.weekday() == 3 and d + timedelta(days=4) < end]
    fridays = [d for d in workdays if d.weekday() == 4 and d + timedelta(days=10) < end]
    if args.people >= 2 and thursdays and fridays:
        a, b = rng.sample(range(args.people), 2)
        trips[(a, thursdays[min(1, len(thursdays) - 1)])] = 1          # long weekend: back on Monday
        trips[(b, fridays[min(2, len(fridays) - 1)])] = 5              # a week away
    away: set[tuple[int, datetime]] = set()
    for (p, day), n in trips.items():
        later = [d for d in workdays if d > day][:n]
        away.update((p, d) for d in later)

    def add(at: datetime, kind: str, p: int, **data: object) -> None:
        if START <= at < end:
            events.append(Event(at, next(seq), kind, p, dict(data)))

    def work(person: Person, begin: datetime, stop: datetime, template: str, overnight: timedelta | None) -> None:
        """Bursts of work between begin and stop; the last one may run on past stop (a job left running)."""
        t = begin
        while t < stop - timedelta(minutes=15):
            length = timedelta(minutes=rng.uniform(20, 150))
            b_end = min(t + length, stop - timedelta(minutes=rng.uniform(0, 10)))
            if b_end <= t + timedelta(minutes=5):
                break
            mode = "ping" if rng.random() < person.ping_share else "util"
            last = b_end + timedelta(minutes=rng.uniform(25, 60)) >= stop
            if last and overnight is not None:
                mode, b_end = "util", stop + overnight
            add(t, "burst_start", person.index, template=template, mode=mode)
            if mode == "ping":
                ping = t + PING_EVERY
                while ping < b_end:
                    add(ping, "ping", person.index)
                    ping += PING_EVERY
            add(b_end, "burst_end", person.index, mode=mode)
            person.bursts.append((t, b_end))
            stats["bursts"] += 1
            roll = rng.random()
            gap = (rng.uniform(5, 20) if roll < 0.6 else rng.uniform(20, 45) if roll < 0.9 else rng.uniform(45, 90))
            t = b_end + timedelta(minutes=gap)
            if overnight is not None and b_end > stop:
                break

    for d in range(args.days):
        day = START + timedelta(days=d)
        for person in people:
            p = person.index
            if day.weekday() >= 5:  # weekend: rarely, a short session
                if rng.random() < 0.06:
                    begin = day + timedelta(hours=rng.uniform(10, 14))
                    leave = begin + timedelta(hours=rng.uniform(1.5, 4))
                    person.presence.append((begin, leave))
                    add(begin, "arrive", p, needs=person.main)
                    work(person, begin + timedelta(minutes=5), leave, person.main, None)
                    forget = rng.random() < 0.3
                    add(leave, "leave", p, action="forget" if forget else "stop")
                    person.leaves.append(leave)
                    stats["weekend sessions"] += 1
                    stats["forgotten evenings"] += forget
                continue
            if (p, day) in away or rng.random() < 0.05:
                stats["days absent"] += 1
                continue
            arrive = day + timedelta(hours=min(10.5, max(7.5, rng.gauss(9.0, 0.5))))
            lunch = day + timedelta(hours=12, minutes=rng.uniform(-30, 45))
            lunch_end = lunch + timedelta(minutes=rng.uniform(30, 75))
            leave = arrive + timedelta(hours=rng.uniform(7.5, 9.5))
            person.presence += [(arrive, lunch), (lunch_end, leave)]
            person.leaves.append(leave)
            uses = rng.random() < person.p_gpu
            template = (person.main if rng.random() < 0.85 else
                        _weighted(rng, tuple(t for t in MAIN_TEMPLATES if t[0] != person.main))) if uses else None
            add(arrive, "arrive", p, needs=template)
            if not uses:
                continue
            stats["GPU days"] += 1
            overnight = timedelta(hours=rng.uniform(1, 6)) if rng.random() < 0.10 else None
            work(person, arrive + timedelta(minutes=rng.uniform(5, 40)), lunch, template, None)
            work(person, lunch_end + timedelta(minutes=rng.uniform(2, 15)), leave, template, overnight)
            trip = (p, day) in trips
            forget = trip or rng.random() < (args.forget_friday if day.weekday() == 4 else args.forget)
            action = "job" if overnight is not None else "forget" if forget else "stop"
            if trip and overnight is not None:
                action = "job"
            add(leave, "leave", p, action=action)
            stats["forgotten evenings"] += action == "forget"
            stats["jobs left running"] += action == "job"
            stats["forgotten before days away"] += trip
    events.sort()
    stats["events"] = len(events)
    return people, events, stats


# --- one policy --------------------------------------------------------------------------------
async def _no_sleep(_: float) -> None:
    return None


class Sim:
    def __init__(self, policy: str, people: list[Person], plan: list[Event], tmp: Path,
                 args: argparse.Namespace) -> None:
        self.policy = policy
        self.people = people
        self.args = args
        self.end = START + timedelta(days=args.days)
        self.clock = VirtualClock(START)
        url = f"sqlite:///{tmp / f'policy_{policy}.db'}"
        self.db = Database(url)
        self.db.upgrade()
        self.sandbox = SandboxProvider(None, seed=7, time_scale=0, clock=self.clock)
        self.hub = NotifierHub()
        settings = Settings(home=tmp / f"home_{policy}", database_url=url, local_user="admin",
                            local_role="admin", poll_interval_s=0.01)
        self.svc = GpuService(settings, self.db, ProviderRegistry({"sandbox": self.sandbox}),
                              TemplateCatalog.load(None), clock=self.clock, hub=self.hub, sleep=_no_sleep)
        self.admin = self.svc.local_actor()
        self.actors: list[Actor] = []
        self.queue = list(plan)
        heapq.heapify(self.queue)
        self.seq = itertools.count(10**9)
        self.rng = random.Random(f"answers:{args.seed}")       # only policy (c) draws from it
        self.machine: dict[int, str | None] = {p.index: None for p in people}
        self.work: dict[str, list[tuple[datetime, datetime]]] = {}
        self.open_burst: dict[int, tuple[str, datetime, str]] = {}
        self.stopped_by: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.notices: list[Notice] = []
        self.hub.subscribe(self.notices.append)
        self.cron_seen: dict[str, datetime] = {}
        self.passes = 0
        self.pass_ms = 0.0

    async def setup(self) -> None:
        for person in self.people:
            await self.svc.set_user(self.admin, person.principal, role="member", team="ml")
            self.actors.append(self.svc.actor(person.principal, source="slack"))

    async def _watch(self) -> None:
        """The readiness watcher of a gpuherd process (it runs beside the guards): a boot or start
        returns once the provider accepted, and the watcher marks the machine up; at time_scale=0
        its first check finds it running and healthy."""
        await self.svc.operations.watch_once()

    def _move_to(self, when: datetime) -> None:
        """Time passes up to `when` (never back): `advance`, not `set`, so the clock's monotonic
        time moves too and what the service caches for a few seconds (provider listings, offers)
        expires as it would in a running process; `VirtualClock.set` leaves monotonic time still."""
        if when > self.clock.now():
            self.clock.advance(when - self.clock.now())

    # state helpers
    def _inst(self, iid: str | None) -> Instance | None:
        if iid is None:
            return None
        with self.db.session() as s:
            return s.get(Instance, iid)

    def _present(self, p: int, at: datetime) -> bool:
        return any(a <= at < b for a, b in self.people[p].presence)

    def _more_work_today(self, p: int, at: datetime) -> bool:
        leave = next((lv for lv in self.people[p].leaves if lv > at), None)
        return leave is not None and any(at < s < leave for s, _ in self.people[p].bursts)

    async def _stop(self, actor: Actor, iid: str, who: str) -> None:
        await self.svc.stop(actor, iid)
        self.stopped_by[iid] = who
        self.counts[f"stops by {who}"] += 1

    async def _ensure_machine(self, p: int, template: str) -> str:
        actor = self.actors[p]
        inst = self._inst(self.machine[p])
        if inst is not None and (inst.state_enum.is_final or inst.template != template):
            if not inst.state_enum.is_final:
                await self.svc.destroy(actor, inst.id, confirmed=True)
                self.counts["destroyed (other template needed)"] += 1
            inst = None
        if inst is None:
            result = await self.svc.boot(actor, template, wait=False)
            if isinstance(result, Confirmation):   # above the template's price limit: say yes
                result = await self.svc.confirm(actor, result.token)
            assert isinstance(result, BootResult), result
            await self._watch()
            self.machine[p] = result.instance.id
            self.counts["boots"] += 1
            return result.instance.id
        if inst.state_enum is InstanceState.STOPPED:
            await self.svc.start(actor, inst.id, wait=False)
            await self._watch()
            self.counts["starts"] += 1
            by = self.stopped_by.get(inst.id, "user")
            if by != "user":
                self.counts[f"starts after a stop by {by}"] += 1
                if inst.stopped_at is not None and as_utc(inst.stopped_at).date() == self.clock.now().date():
                    self.counts["restarts the same workday (work interrupted)"] += 1
        return inst.id

    async def handle(self, ev: Event) -> None:
        p = ev.person
        actor = self.actors[p]
        now = self.clock.now()
        if ev.kind == "arrive":
            inst = self._inst(self.machine[p])
            if inst is not None and inst.state_enum is InstanceState.RUNNING and ev.data["needs"] != inst.template:
                if ev.data["needs"] is None:
                    await self._stop(actor, inst.id, "user")     # noticed a machine left running
                else:
                    await self.svc.destroy(actor, inst.id, confirmed=True)
                    self.counts["destroyed (other template needed)"] += 1
        elif ev.kind == "burst_start":
            iid = await self._ensure_machine(p, ev.data["template"])
            self.open_burst[p] = (iid, now, ev.data["mode"])
            inst = self._inst(iid)
            if ev.data["mode"] == "util":
                self.sandbox.set_gpu_util(inst.provider_id or "", 80)
            else:
                await self.svc.record_activity(actor, iid, source="heartbeat")
                self.counts["pings"] += 1
        elif ev.kind == "ping":
            burst = self.open_burst.get(p)
            if burst is not None:
                await self.svc.record_activity(actor, burst[0], source="heartbeat")
                self.counts["pings"] += 1
        elif ev.kind == "burst_end":
            burst = self.open_burst.pop(p, None)
            if burst is not None:
                iid, began, mode = burst
                self.work.setdefault(iid, []).append((began, now))
                inst = self._inst(iid)
                if mode == "util" and inst is not None and not inst.state_enum.is_final:
                    self.sandbox.set_gpu_util(inst.provider_id or "", None)
        elif ev.kind == "leave":
            inst = self._inst(self.machine[p])
            if ev.data["action"] == "stop" and inst is not None and inst.state_enum is InstanceState.RUNNING:
                await self._stop(actor, inst.id, "user")
        elif ev.kind in ("keep", "stop_now"):
            inst = self._inst(ev.data["iid"])
            if inst is not None and inst.state_enum is InstanceState.RUNNING:
                if ev.kind == "keep":
                    await self.svc.keep(actor, inst.id)
                    self.counts["/gpu keep after a warning"] += 1
                else:
                    await self._stop(actor, inst.id, "user")
                    self.counts["'Stop now' after a warning"] += 1

    def _push(self, at: datetime, kind: str, p: int, **data: object) -> None:
        heapq.heappush(self.queue, Event(at, next(self.seq), kind, p, dict(data)))

    def _answer_warnings(self) -> None:
        by_principal = {person.principal: person.index for person in self.people}
        for notice in self.notices:
            self.counts[f"notice {notice.kind}"] += 1
            if self.policy != "c" or notice.kind != "guard.warn_idle" or notice.owner not in by_principal:
                continue
            p = by_principal[notice.owner]
            now = self.clock.now()
            delay = timedelta(seconds=self.rng.uniform(30, 180))
            if self._present(p, now):
                if self._more_work_today(p, now):
                    if self.rng.random() < 0.9:
                        self._push(now + delay, "keep", p, iid=notice.instance_id)
                elif self.rng.random() < 0.5:
                    self._push(now + delay, "stop_now", p, iid=notice.instance_id)
        self.notices.clear()

    def _running_count(self) -> int:
        with self.db.session() as s:
            return int(s.exec(select(func.count()).select_from(Instance).where(  # type: ignore[call-overload]
                Instance.state == InstanceState.RUNNING.value)).one()[0])

    async def _cron_sweep(self) -> None:
        now = self.clock.now()
        with self.db.session() as s:
            running = list(s.exec(select(Instance).where(  # type: ignore[call-overload]
                Instance.state == InstanceState.RUNNING.value)).scalars())
        if not running:
            return
        util = {pi.provider_id: pi.gpu_util for pi in await self.sandbox.list()}
        for inst in running:
            u = util.get(inst.provider_id or "")
            if u is not None and u >= CRON_UTIL_ACTIVE:
                self.cron_seen[inst.id] = now
            last = max(as_utc(inst.last_activity_at or inst.started_at or inst.created_at),
                       self.cron_seen.get(inst.id, START))
            if now - last >= CRON_IDLE:
                await self._stop(system_actor("cron"), inst.id, "cron")

    async def run(self) -> None:
        guards = Guards(self.svc) if self.policy in "cd" else None
        wake = None
        cron_tick = START
        while True:
            next_event = self.queue[0].at if self.queue else self.end
            if guards is not None and wake is not None and wake < next_event and wake < self.end:
                self._move_to(wake)
                report = await guards.run_pass()
                wake = report.next_wake          # Guards.next_wake(), read at the end of the pass
                self.passes += 1
                self.pass_ms += report.elapsed_ms
                self.counts["guard warnings"] += report.warned
                self.counts["guard stops"] += report.acted
                for iid in {n.instance_id for n in self.notices if n.kind == "guard.idle" and n.instance_id}:
                    self.stopped_by[iid] = "guards"
                if report.errors:
                    self.counts["guard errors"] += len(report.errors)
                if report.checked == 0 and wake is not None and wake <= self.clock.now():
                    self.clock.advance(1)       # never spin on the same instant
                    self.counts["guard passes that did nothing at an overdue wake"] += 1
                self._answer_warnings()
                continue
            if self.policy == "b":
                tick = max(cron_tick, START + timedelta(
                    seconds=-(-int((self.clock.now() - START).total_seconds()) // CRON_EVERY) * CRON_EVERY))
                if tick < next_event and tick < self.end and self._running_count():
                    self._move_to(tick)
                    await self._cron_sweep()
                    self.passes += 1
                    cron_tick = tick + timedelta(seconds=CRON_EVERY)
                    continue
            if not self.queue or next_event >= self.end:
                break
            ev = heapq.heappop(self.queue)
            self._move_to(ev.at)
            await self.handle(ev)
            if guards is not None:
                self._answer_warnings()
                wake = await guards.next_wake()      # the user's action may have moved a deadline
        self._move_to(self.end)
        for (iid, began, _mode) in self.open_burst.values():
            self.work.setdefault(iid, []).append((began, self.end))
        if guards is not None:
            await guards.aclose()

    # --- figures -------------------------------------------------------------------------
    async def figures(self) -> dict[str, object]:
        report = await self.svc.costs(self.admin, START.strftime("%Y-%m"), by="user")
        s0, s1 = epoch(START), epoch(self.end)
        grace = self.args.grace
        compute = storage = wasted = wasted_away = Decimal(0)
        seconds = 0
        presence = {p.index: [(epoch(a), epoch(b)) for a, b in p.presence] for p in self.people}
        with self.db.session() as s:
            owners = {i.id: i.owner for i in s.exec(select(Instance)).scalars()}  # type: ignore[call-overload]
            segs = list(s.exec(select(BillingSegment)).scalars())  # type: ignore[call-overload]
        index = {p.principal: p.index for p in self.people}
        for seg in segs:
            a, b = max(seg.start_ts, s0), min(seg.end_ts if seg.end_ts is not None else s1, s1)
            if b <= a:
                continue
            amount = Decimal(seg.rate_micros) * (b - a) / 3600 / 1_000_000
            if seg.kind != COMPUTE:
                storage += amount
                continue
            compute += amount
            seconds += b - a
            busy = _union([(epoch(x), epoch(y) + grace) for x, y in self.work.get(seg.instance_id, [])])
            idle = _subtract([(a, b)], busy)
            idle_s = sum(y - x for x, y in idle)
            here = presence.get(index.get(owners.get(seg.instance_id, ""), -1), [])
            away_s = idle_s - sum(y - x for x, y in _intersect(idle, here))
            wasted += Decimal(seg.rate_micros) * idle_s / 3600 / 1_000_000
            wasted_away += Decimal(seg.rate_micros) * away_s / 3600 / 1_000_000
        return {"total": report.total, "compute": compute, "storage": storage, "wasted": wasted,
                "wasted_away": wasted_away, "hours": seconds / 3600, "counts": self.counts, "passes": self.passes,
                "pass_ms": self.pass_ms}


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _subtract(base: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a, b in base:
        cur = a
        for x, y in minus:
            if y <= cur or x >= b:
                continue
            if x > cur:
                out.append((cur, x))
            cur = max(cur, y)
        if cur < b:
            out.append((cur, b))
    return out


def _intersect(xs: list[tuple[int, int]], ys: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(max(a, c), min(b, d)) for a, b in xs for c, d in ys if max(a, c) < min(b, d)]


async def _simulate(sim: Sim) -> dict[str, object]:
    try:
        await sim.setup()
        await sim.run()
        return await sim.figures()
    finally:
        await sim.svc.aclose()


def run_policy(policy: str, args: argparse.Namespace) -> dict[str, object]:
    """One policy in its own process (the plan is rebuilt from the seed: the same for all)."""
    began = time.perf_counter()
    people, plan, _ = make_plan(args)
    with tempfile.TemporaryDirectory() as tmp:
        sim = Sim(policy, people, plan, Path(tmp), args)
        figures = asyncio.run(_simulate(sim))
    figures["elapsed"] = time.perf_counter() - began
    return figures


POLICY_NAMES = {"a": "(a) no guards", "b": "(b) cron: 60 s sweep, 30 min idle", "c": "(c) gpuherd guards (defaults)",
                "d": "(d) guards, warnings ignored"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--people", type=int, default=8)
    ap.add_argument("--days", type=int, default=30, help="days from 2026-11-01 (at most 30: the month's ledger)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--forget", type=float, default=0.20, help="chance of forgetting to stop, Monday-Thursday")
    ap.add_argument("--forget-friday", type=float, default=0.35)
    ap.add_argument("--grace", type=int, default=300, help="seconds after a burst that still count as work")
    ap.add_argument("--policies", default="abc",
                    help="which policies to run: any of a, b, c and d = (c) with every warning ignored "
                         "(no /gpu keep, no Stop now), to separate the effect of the warnings")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (policies run in parallel)")
    args = ap.parse_args()
    args.days = max(1, min(30, args.days))
    if not args.policies or set(args.policies) - set(POLICY_NAMES):
        ap.error(f"--policies takes letters from {''.join(POLICY_NAMES)}, e.g. abc")
    args.policies = "".join(dict.fromkeys(args.policies))
    people, _plan, stats = make_plan(args)
    print(f"SIMULATED: {args.people} people, {args.days} days from {START:%a %Y-%m-%d} (VirtualClock, sandbox provider "
          f"at time_scale=0, seed {args.seed}); the same plan for every policy:")
    print("  " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items())))
    print("  main templates: " + ", ".join(f"{NAMES[p.index % len(NAMES)]} {p.main}" for p in people))
    results: dict[str, dict[str, object]] = {}
    order = sorted(args.policies, key=lambda x: x not in "cd")  # the longest first
    began = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = dict(zip(order, pool.map(run_policy, order, [args] * len(order)), strict=True))
    for policy in args.policies:
        r = results[policy] = done[policy]
        counts = r["counts"]  # type: ignore[assignment]
        what = ("guard passes" if policy in "cd" else "cron sweeps (ticks with nothing running skipped)"
                if policy == "b" else "")
        print(f"{POLICY_NAMES[policy]}: simulated in {r['elapsed']:.0f} s"
              + (f"; {r['passes']:,} {what}" if what else "")
              + (f", {r['pass_ms'] / max(1, r['passes']):.1f} ms per pass" if policy in "cd" else ""))
        print("  " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))  # type: ignore[union-attr]
    print(f"wall time {time.perf_counter() - began:.0f} s with {args.jobs} worker process(es)")

    print()
    print(f"wasted = compute billed on a machine while none of its owner's work bursts on it was in progress, "
          f"beyond a {args.grace // 60}-minute grace after each burst (gaps while the owner is in the office "
          f"count too; 'away' is the part while the owner was not in the office). Storage of stopped "
          f"machines is in the total, not in 'wasted'.")
    head = (f"{'policy':<36} {'total $':>10} {'compute $':>10} {'storage $':>10} {'wasted $':>10} "
            f"{'of it away':>10} {'mach-h':>8} {'auto stops':>10}")
    print(head)
    print("-" * len(head))
    for policy, r in results.items():
        counts = r["counts"]  # type: ignore[assignment]
        stops = counts.get("guard stops", 0) + counts.get("stops by cron", 0)  # type: ignore[union-attr]
        print(f"{POLICY_NAMES[policy]:<36} {r['total']:>10,.2f} {r['compute']:>10,.2f} {r['storage']:>10,.2f} "
              f"{r['wasted']:>10,.2f} {r['wasted_away']:>10,.2f} {r['hours']:>8,.0f} {stops:>10,}")
    interrupted = "restarts the same workday (work interrupted)"
    print("restarts of a machine on the day an automatic stop stopped it (the owner had to start it again): "
          + ", ".join(f"{POLICY_NAMES[k].split(' ')[0]} {r['counts'].get(interrupted, 0)}"  # type: ignore[union-attr]
                      for k, r in results.items()))
    if "c" in results:
        c = results["c"]
        for other in "abd":
            if other not in results:
                continue
            o = results[other]
            saved = o["total"] - c["total"]  # type: ignore[operator]
            pct = saved * 100 / o["total"] if o["total"] else Decimal(0)  # type: ignore[operator]
            word = "saves" if saved >= 0 else "costs MORE:"
            print(f"(c) vs ({other}): {word} {abs(saved):,.2f} USD ({abs(pct):.1f} % of ({other})'s total); wasted "
                  f"{o['wasted']:,.2f} -> {c['wasted']:,.2f} USD, machine-hours {o['hours']:,.0f} -> {c['hours']:,.0f}")
        cc = c["counts"]
        stop_now = cc.get("'Stop now' after a warning", 0)  # type: ignore[union-attr]
        print(f"(c): {cc.get('guard warnings', 0)} warnings, {cc.get('/gpu keep after a warning', 0)} answered with "  # type: ignore[union-attr]
              f"/gpu keep (1 h), {stop_now} with Stop now, "  # type: ignore[union-attr]
              f"{cc.get('guard stops', 0)} idle stops by the guards")  # type: ignore[union-attr]
        if "b" in results:
            b = results["b"]
            diff = b["total"] - c["total"]  # type: ignore[operator]
            share = diff * 100 / b["total"] if b["total"] else Decimal(0)  # type: ignore[operator]
            how = ("cheaper" if share > 5 else "NOT meaningfully cheaper (within 5 %)" if share >= -5
                   else "MORE expensive (by more than 5 %)")
            print(f"verdict: against the simple cron the guards are {how} here. Both stop a machine 30 min after "
                  "its last sign of activity, from the same signals. The guards act at the deadline instead of "
                  "up to 60 s after it, which is worth little; their warnings let people who are still working "
                  "keep a machine through a gap (/gpu keep, 1 h), which costs compute but spares them restarts.")
            if "d" in results:
                d = results["d"]
                print(f"  decomposed: sweep granularity (b) - (d) = {b['total'] - d['total']:,.2f} USD; "  # type: ignore[operator]
                      f"answering warnings (c) - (d) = {c['total'] - d['total']:,.2f} USD for "  # type: ignore[operator]
                      f"{d['counts'].get(interrupted, 0) - cc.get(interrupted, 0)} fewer same-day restarts"  # type: ignore[union-attr]
                      )
            else:
                print("  run with --policies abcd to separate the sweep granularity from the effect of the warnings")


if __name__ == "__main__":
    main()
