"""Event-loop lag: how late does a 10 ms heartbeat wake up while the core works in the same loop?
Target: max lateness < 50 ms in every cell.

    python bench/bench_loop_lag.py [--sizes 1000,10000] [--db sqlite,postgres] [--latency 0,0.3]
                                   [--loads stop,warn,reconcile,status,costs,status100,boot100,delay]
                                   [--pg-url URL] [--gc default|serve|freeze|off]

A heartbeat task (`asyncio.sleep(0.01)` in a loop, recording how far past 10 ms each wake-up
comes) runs in the same event loop as one unit of work, and each cell prints its max and p99
lateness with the work's wall time. Loads, at each fleet size, database and provider latency:

  stop       one `Guards.run_pass` that stops 100 idle instances (deadline passed, warned before)
  warn       one pass that warns 100 (four minutes from their idle deadline)
  reconcile  `GpuService.reconcile()`: list the provider, fold every tracked row, unmanaged check
  status     a full `/gpu status`: `GpuService.status(admin, limit=500)` paged through next_cursor
  costs      `/gpu costs`: `GpuService.costs(admin)` (this month, by user, with running + budgets)
  status100  100 concurrent `status(admin, <id>)` (one provider `get` each); target total < 1 s at 0.3 s
  boot100    100 concurrent `boot(member, "budget")` (a shared offer search, a create each);
             target total < 2 s at 0.3 s
  delay      the REAL `GuardScheduler` on the real clock: 100 instances whose idle deadline falls
             3-5 s after the scheduler starts, among a fleet whose activity probes are spread over
             the last minute (so probes run throughout, as in a running process); measured from
             each deadline to the sandbox's `stop` call; target max < 5 s

Fleets (bench/_loop_fleet.py): 1,000 or 10,000 tracked instances, ~82 % running, ~15 % stopped,
~3 % loading, a dozen booted through `GpuService.boot` and the rest copied (row, billing segments,
sandbox machine file); 4 team and 8 user budgets. Databases: SQLite (WAL) in a temp dir, and
PostgreSQL in a fresh schema per fleet, dropped afterwards. The provider is the sandbox at
time_scale=0 with one JSON file per machine, answering at once or after `latency_s` (an asyncio
sleep before each call, as a slow cloud API). The fleet's clock is frozen (wall time) for the
single-pass loads so exactly the instances made due are due; `delay` uses the real clock.
Loads run in the order listed, each fleet once, both latencies on it (a stop burst consumes 100
running instances, a boot burst adds 100).

The "gc (full)" column is the longest pause of CPython's cyclic garbage collector during the cell
and how many full (generation 2) collections ran; a collection stops every thread, the loop's
included, so a max lateness close to it is the collector's, and the notes name the gpuherd
function whose allocation set off each full collection. `--gc serve` sets the collector up as a
serving process does (`core.collector.tune_for_serving`, which `Runtime(tune_collector=True)`
calls once start-up is done: here after each fleet's warm-up); `--gc freeze` only calls
gc.freeze() after the imports; `--gc off` disables the collector: what is left is the core's own
work on, or competing for the GIL with, the loop. Each fleet prints the load
average; on a shared 2-core machine other processes' load shows as lateness too (see the idle
baseline printed per fleet).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from _loop_fleet import Fleet, Heartbeat, build_fleet, make_due, make_service, nearest_rank, stop_due, warn_due
from sqlalchemy import create_engine, func, select, text
from sqlmodel import Session, col

from gpuherd.core.clock import Clock
from gpuherd.core.collector import tune_for_serving
from gpuherd.core.guard_plan import WATCHED, idle_deadline, replan
from gpuherd.core.guards import Guards, PassReport
from gpuherd.core.models import Instance, InstanceState
from gpuherd.core.providers.base import ProviderInstance
from gpuherd.core.providers.sandbox import RACY_S
from gpuherd.core.results import BootResult
from gpuherd.core.scheduler import GuardScheduler

LAG_TARGET_MS = 50.0
DUE = 100
LOADS = ("stop", "warn", "reconcile", "status", "costs", "status100", "boot100", "delay")
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
T = TypeVar("T")


@dataclass
class Run:
    """One measured unit of work."""

    wall_s: float
    hb: Heartbeat
    note: str
    target: str = ""          # the load's own target and whether it was met, e.g. "total < 1 s: met"


@dataclass
class Cell:
    size: int
    db: str
    latency: float
    load: str
    run: Run

    @property
    def lag_ok(self) -> bool:
        return self.run.hb.max_ms < LAG_TARGET_MS

    def line(self) -> str:
        r, hb = self.run, self.run.hb
        mark = "" if self.lag_ok else "  <-- MISSES lag target"
        target = f"  [{r.target}]" if r.target else ""
        where = f"; full gc in {hb.gc_where()}" if hb.full_collections else ""
        return (f"| {self.size:>6,} | {self.db:<8} | {self.latency:>4g} s | {self.load:<9} | {_secs(r.wall_s):>9} "
                f"| {hb.max_ms:>8.1f} | {hb.p99_ms:>7.1f} | {hb.beats:>5} | {hb.gc_max_ms:>6.1f} ({hb.full_collections}) "
                f"| {r.note}{where}{target}{mark} |")


HEADER = ("| fleet  | database | latency | load      | work      | max (ms) | p99 (ms) | beats | gc (full) | notes |\n"
          "|-------:|----------|--------:|-----------|----------:|---------:|---------:|------:|----------:|-------|")


def _secs(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


@contextlib.contextmanager
def pg_schema(pg_url: str) -> Iterator[str]:
    """A fresh schema on the PostgreSQL server, dropped afterwards; yields the URL that uses it."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_url else "?"
    try:
        yield f"{pg_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


async def measured(work: Callable[[], Awaitable[T]]) -> tuple[T, float, Heartbeat]:
    async with Heartbeat() as hb:
        began = time.perf_counter()
        result = await work()
        wall = time.perf_counter() - began
    return result, wall, hb


def _count_states(s: Session, ids: list[str]) -> dict[str, int]:
    rows = s.execute(select(Instance.state, func.count()).where(col(Instance.id).in_(ids))
                     .group_by(Instance.state)).all()
    return {state: n for state, n in rows}


# --- the loads ------------------------------------------------------------------------------
# Each checks that the work was really done (and raises SystemExit when not): a fast cell that did
# nothing would be a false figure.

async def load_pass(fleet: Fleet, guards: Guards, kind: str) -> Run:
    svc = fleet.service
    ids = fleet.take(DUE)
    await make_due(svc, ids, stop_due if kind == "stop" else warn_due)
    svc.sync.forget_listings()
    report, wall, hb = await measured(lambda: guards.run_pass(svc.clock.now()))
    if report.errors:
        raise SystemExit(f"{kind} pass errors: {report.errors[:3]}")
    done = report.acted if kind == "stop" else report.warned
    states = await svc.db.run(lambda s: _count_states(s, ids))
    if done != DUE or (kind == "stop" and states.get("stopped") != DUE):
        raise SystemExit(f"{kind} pass did {done} of {DUE} (states {states})")
    return Run(wall, hb, f"{'stopped' if kind == 'stop' else 'warned'} {done}, checked {report.checked}")


async def load_reconcile(fleet: Fleet) -> Run:
    result, wall, hb = await measured(fleet.service.reconcile)
    listed = result.checked.get("sandbox", 0)
    if result.failed or not listed:
        raise SystemExit(f"reconcile failed: {result}")
    return Run(wall, hb, f"{listed:,} machines listed, {len(result.lost)} lost")


async def load_status(fleet: Fleet) -> Run:
    svc = fleet.service
    svc.sync.forget_listings()

    async def all_pages() -> tuple[int, int, int]:
        shown, pages, cursor = 0, 0, None
        while True:
            page = await svc.status(fleet.admin, limit=500, cursor=cursor)
            shown += len(page.instances)
            pages += 1
            cursor = page.next_cursor
            if not cursor:
                return shown, pages, page.total
    (shown, pages, total), wall, hb = await measured(all_pages)
    if shown != total:
        raise SystemExit(f"status showed {shown} of {total}")
    return Run(wall, hb, f"{shown:,} instances in {pages} pages")


async def load_costs(fleet: Fleet) -> Run:
    report, wall, hb = await measured(lambda: fleet.service.costs(fleet.admin))
    if not report.running:
        raise SystemExit("costs report lists nothing running")
    return Run(wall, hb, f"{report.running_count:,} billing ({len(report.running)} listed), {len(report.groups)} groups")


async def load_status100(fleet: Fleet, latency: float) -> Run:
    svc = fleet.service
    ids = fleet.pool[:DUE]       # read only: they stay in the pool
    results, wall, hb = await measured(lambda: asyncio.gather(*(svc.status(fleet.admin, i) for i in ids)))
    bad = [r for r in results if len(r.instances) != 1 or r.stale]
    if bad:
        raise SystemExit(f"{len(bad)} single-instance status calls failed: {bad[0]}")
    return Run(wall, hb, f"{len(results):,} answered", f"total < 1 s: {_met(wall < 1)}" if latency >= 0.3 else "")


async def load_boot100(fleet: Fleet, latency: float) -> Run:
    svc = fleet.service
    svc.offers._shared.clear()    # every burst pays for its (shared) offer search
    results, wall, hb = await measured(lambda: asyncio.gather(
        *(svc.boot(fleet.members[i % len(fleet.members)], "budget") for i in range(DUE))))
    booted = [r for r in results if isinstance(r, BootResult)]
    if len(booted) != DUE:
        raise SystemExit(f"only {len(booted)} of {DUE} boots were accepted")
    return Run(wall, hb, f"{len(booted)} accepted", f"total < 2 s: {_met(wall < 2)}" if latency >= 0.3 else "")


async def load_delay(fleet: Fleet, url: str, home: Path, latency: float, *, lead: float = 3.0,
                     spread: float = 2.0, timeout: float = 60.0) -> Run:
    """The real scheduler on the real clock, over the same database and machine files."""
    svc = fleet.service
    clock = Clock()
    rt, sandbox = make_service(url, home, clock, db=svc.db, latency_s=latency)
    ids = fleet.take(DUE)
    await sandbox.list()            # a running process has its listing cache warm
    rt.sync.forget_listings()
    deadlines = await svc.db.run(lambda s: _rebase(s, ids, clock.now(), lead, spread))
    stops: dict[str, float] = {}
    original_stop = sandbox.stop

    async def timed_stop(provider_id: str) -> ProviderInstance:
        stops.setdefault(provider_id, time.time())
        return await original_stop(provider_id)
    sandbox.stop = timed_stop
    sched = GuardScheduler(rt)
    passes: list[PassReport] = []
    original_pass = sched.guards.run_pass

    async def counted(now: datetime | None = None) -> PassReport:
        report = await original_pass(now)
        passes.append(report)
        return report
    sched.guards.run_pass = counted

    async with Heartbeat() as hb:
        began = time.perf_counter()
        await sched.start()
        give_up = time.time() + lead + spread + timeout
        while len(stops) < len(deadlines) and time.time() < give_up:
            await asyncio.sleep(0.05)
        # until the stops are recorded and no pass is running (stopping the scheduler cancels one)
        while time.time() < give_up and (
                (await svc.db.run(lambda s: _count_states(s, ids))).get("stopped") != len(ids)
                or sched._lock.locked()):
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - began
        led = sched.is_leader              # stopping releases the lock (and is_leader with it)
        await sched.stop()
    await sandbox.aclose()
    if not led:
        raise SystemExit("the scheduler never took the guard lock")
    delays = sorted(stops[p] - d for p, d in deadlines.items() if p in stops)
    if len(delays) != DUE:
        raise SystemExit(f"delay: only {len(delays)} of {DUE} instances were stopped within {timeout:g} s")
    ms = [p.elapsed_ms for p in passes]
    note = (f"deadline->stop max {max(delays):.2f} s, p99 {nearest_rank(delays, 99):.2f} s, "
            f"p50 {statistics.median(delays):.2f} s; {len(passes)} passes (median {statistics.median(ms):.0f} ms, "
            f"max {max(ms):.0f} ms), {sum(p.checked for p in passes):,} checked")
    target = f"max delay < 5 s: {_met(max(delays) < 5)}"
    if min(delays) < 0:
        target += f"; {sum(1 for d in delays if d < 0)} stops BEFORE the deadline"
    return Run(wall, hb, note, target)


def _rebase(s: Session, targets: list[str], now: datetime, lead: float, spread: float) -> dict[str, float]:
    """Onto the real clock: every watched instance probed within the last minute, no idle deadline
    of an untouched instance within the next hour, and the targets' idle deadlines `lead` ..
    `lead + spread` s from now (warned five minutes before). Returns provider id -> deadline."""
    rng = random.Random(len(targets))
    chosen = set(targets)
    deadlines: dict[str, float] = {}
    rows = s.execute(select(Instance).where(col(Instance.state).in_([st.value for st in WATCHED]))).scalars()
    for inst in rows:
        inst.guard_checked_at = now - timedelta(seconds=rng.uniform(0.5, 59.5))
        if inst.state == InstanceState.RUNNING.value:
            if inst.id in chosen:
                deadline = now + timedelta(seconds=lead + rng.uniform(0, spread))
                inst.keep_until = None
                inst.last_activity_at = deadline - timedelta(seconds=inst.idle_window_s)
                inst.idle_warned_at = deadline - timedelta(seconds=inst.warn_lead_s)
                deadlines[inst.provider_id or ""] = idle_deadline(inst).timestamp()
            elif idle_deadline(inst) < now + timedelta(hours=1):
                inst.keep_until = now + timedelta(seconds=rng.uniform(3600, 86400))
                inst.idle_warned_at = None
        replan(inst)
        s.add(inst)
    s.commit()
    return deadlines


# --- one fleet ------------------------------------------------------------------------------

async def run_fleet(size: int, db_name: str, url: str, home: Path, args: argparse.Namespace,
                    cells: list[Cell]) -> None:
    svc, sandbox = make_service(url, home)
    fleet = await build_fleet(svc, sandbox, size, seed=args.seed)
    c = fleet.counts
    print(f"\n{size:,} instances on {db_name}: {c['running']:,} running, {c['stopped']:,} stopped, "
          f"{c['loading']:,} loading; built in {fleet.build_s:.1f} s; load average {_loadavg()}", flush=True)
    await asyncio.sleep(RACY_S + 0.2)      # the sandbox caches only files older than RACY_S
    guards = Guards(svc)
    await svc.reconcile()                  # warm-up: listing cache, rows folded, budgets checked
    await guards.run_pass(svc.clock.now())
    await svc.reconcile()
    if args.gc == "serve":
        tune_for_serving()                 # as Runtime(tune_collector=True) does once start-up is done
    _, _, idle = await measured(lambda: asyncio.sleep(1.0))
    print(f"  idle loop baseline: heartbeat max {idle.max_ms:.1f} ms, p99 {idle.p99_ms:.1f} ms over {idle.beats} beats; "
          f"{len(gc.get_objects()):,} objects tracked by the collector", flush=True)

    def add(latency: float, load: str, run: Run) -> None:
        cell = Cell(size, db_name, latency, load, run)
        cells.append(cell)
        print(cell.line(), flush=True)

    for latency in args.latency:
        sandbox.latency_s = latency
        for load in args.loads:
            if load in ("stop", "warn"):
                add(latency, load, await load_pass(fleet, guards, load))
            elif load == "reconcile":
                add(latency, load, await load_reconcile(fleet))
            elif load == "status":
                add(latency, load, await load_status(fleet))
            elif load == "costs":
                add(latency, load, await load_costs(fleet))
            elif load == "status100":
                add(latency, load, await load_status100(fleet, latency))
            elif load == "boot100":
                add(latency, load, await load_boot100(fleet, latency))
    await guards.aclose()
    if "delay" in args.loads:
        for latency in args.latency:       # last: it moves the fleet onto the real clock
            add(latency, "delay", await load_delay(fleet, url, home, latency))
    print(f"  load average after: {_loadavg()}", flush=True)
    await svc.aclose()


def _loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


async def run(args: argparse.Namespace) -> None:
    cells: list[Cell] = []
    began = time.perf_counter()
    if args.gc == "freeze":
        gc.collect()
        gc.freeze()    # as a process could right after start-up: imported modules never collected again
    elif args.gc == "off":
        gc.disable()   # what is left is the core's own work on (or contending with) the loop
    print(f"heartbeat: asyncio.sleep(0.01) in a loop, lateness = wake-up - 10 ms; target max < {LAG_TARGET_MS:g} ms. "
          f"{DUE} due / concurrent per load. {os.cpu_count()} CPUs. gc: longest collector pause in the cell "
          f"(number of full collections); collector: {args.gc}. Load average at start {_loadavg()}.")
    print(HEADER, flush=True)
    for size in args.sizes:
        for db_name in args.db:
            with tempfile.TemporaryDirectory() as tmp:
                home = Path(tmp)
                if db_name == "sqlite":
                    await run_fleet(size, db_name, f"sqlite:///{home / 'gpuherd.db'}", home, args, cells)
                else:
                    with pg_schema(args.pg_url) as url:
                        await run_fleet(size, db_name, url, home, args, cells)
    print(f"\nall cells ({time.perf_counter() - began:.0f} s in all):")
    print(HEADER)
    for cell in cells:
        print(cell.line())
    missed = [c for c in cells if not c.lag_ok]
    print(f"\nlag target (max < {LAG_TARGET_MS:g} ms): met in {len(cells) - len(missed)} of {len(cells)} cells"
          + (f"; missed in: {', '.join(f'{c.size:,}/{c.db}/{c.latency:g}s/{c.load}' for c in missed)}" if missed else ""))
    for c in cells:
        if "NOT MET" in c.run.target:
            print(f"target not met: {c.size:,}/{c.db}/{c.latency:g}s/{c.load}: {c.run.target}")


def _floats(text_: str) -> list[float]:
    return [float(x) for x in text_.split(",") if x.strip()]


def _ints(text_: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text_.split(",") if x.strip()]


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text_: str) -> list[str]:
        names = [x.strip() for x in text_.split(",") if x.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (known: {', '.join(allowed)})")
        return [n for n in allowed if n in names]   # always in the documented order
    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=_ints, default=[1000, 10000], help="fleet sizes, comma-separated")
    ap.add_argument("--db", type=_names(("sqlite", "postgres")), default=["sqlite", "postgres"])
    ap.add_argument("--latency", type=_floats, default=[0.0, 0.3], help="sandbox latency_s values")
    ap.add_argument("--loads", type=_names(LOADS), default=list(LOADS))
    ap.add_argument("--pg-url", default=os.environ.get("GPUHERD_TEST_POSTGRES_URL") or DEFAULT_PG)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--gc", choices=["default", "serve", "freeze", "off"], default="default",
                    help="CPython's cyclic collector left at its defaults, set up as a serving gpuherd process "
                         "sets it (serve), frozen after imports (gc.freeze()), or off")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
