"""Idle deadline -> provider stop call: how late does the real guard scheduler act?
Target: max and p99 under 5 s with 1,000 running instances.

    python bench/bench_guard_delay.py [--instances 1000] [--spread 75] [--build boot|bulk] [--stop-latency 0.5]

What runs for real: the wall clock, `GuardScheduler` (APScheduler, one job re-armed for the
earliest `next_guard_at`) with its default leadership for an SQLite home (a file lock in the temp
home), `Guards.run_pass`, `GpuService.stop`, SQLite (WAL) in a temp directory.
What is simulated: the provider (the sandbox at time_scale=0: create/stop take effect at once,
unless --stop-latency adds an asyncio sleep to each stop call, as a real cloud API would), and the
deadlines: after building, every instance's `last_activity_at` is set so its idle deadline
(`last_activity_at + idle_window_s`) falls at a random moment `--lead` .. `--lead + --spread`
seconds after the scheduler starts, with `warn_lead_s = 0` (no warning step) and each row replanned
with `core.guard_plan.replan`. The probe phase (`guard_checked_at`) is spread over the last
minute, as it is in a scheduler that has been running for a while. The sandbox reports 0-3 % GPU
utilisation for a machine nobody uses, so every probe says quiet and every instance is stopped.

The delay of one instance is (wall time of the sandbox `stop` call) - (its idle deadline), split
into wake lag (the pass that stopped it started after the deadline by this much) and in-pass time
(from the start of that pass to the stop call).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import _path  # noqa: F401
from _fleet import clone_instance, settle
from sqlalchemy import func, select

from gpuherd.core.clock import Clock, epoch
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.guard_plan import idle_deadline, replan
from gpuherd.core.guards import PASS_BATCH
from gpuherd.core.ledger import COMPUTE
from gpuherd.core.models import BillingSegment, Instance, InstanceState
from gpuherd.core.notify import NotifierHub
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.scheduler import JOB_ID, GuardScheduler
from gpuherd.core.service import GpuService
from gpuherd.core.templates import TemplateCatalog

TEMPLATES = ["budget", "budget", "budget", "research", "high_performance"]
USERS = [f"slack:U{n:03d}" for n in range(12)]
TEAMS = ["ml", "vision", "nlp"]
REAL_BOOTS = 30
IDLE_WINDOW_S = 1800


async def no_sleep(_: float) -> None:
    return None


def nearest_rank(sorted_values: list[float], pct: float) -> float:
    return sorted_values[max(0, math.ceil(pct / 100 * len(sorted_values)) - 1)]


async def boot(svc: GpuService, n: int, rng: random.Random) -> None:
    admin = svc.local_actor()
    actors = []
    for i, principal in enumerate(USERS):
        await svc.set_user(admin, principal, role="member", team=TEAMS[i % len(TEAMS)])
        actors.append(svc.actor(principal, source="slack"))
    for i in range(n):
        await svc.boot(rng.choice(actors), rng.choice(TEMPLATES), wait=False)
        if (i + 1) % 250 == 0:
            print(f"  booted {i + 1:,} through the service", flush=True)
    await settle(svc, admin)  # provisioning -> running (instant at time_scale=0)


def clone(svc: GpuService, sandbox: SandboxProvider, n: int, rng: random.Random) -> None:
    """Copy the booted running rows under new ids: instance row, open compute segment, sandbox record."""
    now = svc.clock.now()
    with svc.db.session() as s, sandbox._state(write=True) as state:
        models = [m for m in s.exec(select(Instance)).scalars()  # type: ignore[call-overload]
                  if m.state == InstanceState.RUNNING.value]
        taken = {m.id for m in s.exec(select(Instance)).scalars()}  # type: ignore[call-overload]
        rows, segments = [], []
        for _ in range(n):
            model = rng.choice(models)
            owner_i = rng.randrange(len(USERS))
            started = now - timedelta(minutes=rng.randrange(40, 600))
            inst, _ = clone_instance(model, state, taken, owner=USERS[owner_i], team=TEAMS[owner_i % len(TEAMS)],
                                     created_at=started, updated_at=started, started_at=started,
                                     last_activity_at=started)
            segments.append(BillingSegment(instance_id=inst.id, kind=COMPUTE, rate_micros=inst.dph_micros,
                                           start_ts=epoch(started), owner=inst.owner, team=inst.team,
                                           template=inst.template, provider=inst.provider))
            rows.append(inst)
        s.add_all(rows)
        s.flush()
        s.add_all(segments)
        s.commit()


def set_deadlines(svc: GpuService, t0: float, lead: float, spread: float,
                  rng: random.Random) -> dict[str, float]:
    """Idle deadline of every running instance at t0 + lead + U(0, spread) (epoch seconds)."""
    deadlines: dict[str, float] = {}
    now = datetime.fromtimestamp(t0, UTC)
    with svc.db.session() as s:
        for inst in s.exec(select(Instance).where(  # type: ignore[call-overload]
                Instance.state == InstanceState.RUNNING.value)).scalars():
            deadline = datetime.fromtimestamp(t0 + lead + rng.uniform(0, spread), UTC)
            inst.idle_window_s = IDLE_WINDOW_S
            inst.warn_lead_s = 0
            inst.last_activity_at = deadline - timedelta(seconds=IDLE_WINDOW_S)
            inst.keep_until = None
            inst.idle_warned_at = None
            inst.max_lifetime_s = None
            inst.guard_checked_at = now - timedelta(seconds=rng.uniform(0, 60))
            replan(inst)
            s.add(inst)
            deadlines[inst.provider_id or ""] = idle_deadline(inst).timestamp()
        s.commit()
    return deadlines


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        url = f"sqlite:///{home / 'gpuherd.db'}"
        db = Database(url)
        db.upgrade()
        clock = Clock()
        sandbox = SandboxProvider(home / "sandbox.json" if args.sandbox_state == "file" else None,
                                  seed=7, time_scale=0, clock=clock)
        settings = Settings(home=home, database_url=url, local_user="bench", local_role="admin",
                            poll_interval_s=0.01)
        svc = GpuService(settings, db, ProviderRegistry({"sandbox": sandbox}), TemplateCatalog.load(None),
                         clock=clock, hub=NotifierHub(), sleep=no_sleep)
        t = time.perf_counter()
        real = args.instances if args.build == "boot" else min(REAL_BOOTS, args.instances)
        await boot(svc, real, rng)
        boot_s = time.perf_counter() - t
        if args.instances > real:
            clone(svc, sandbox, args.instances - real, rng)
        built = time.perf_counter() - t
        how = (f"all {real:,} booted through GpuService.boot" if real == args.instances else
               f"{real} booted through GpuService.boot ({boot_s / real * 1000:.0f} ms each), "
               f"{args.instances - real:,} cloned from them as instance rows + open compute segments + "
               "sandbox state records")
        print(f"{args.instances:,} running instances ({how}); built in {built:.1f} s")
        where = ("on disk, one JSON file per machine (a stop replaces that one file)"
                 if args.sandbox_state == "file" else "in memory")
        print(f"SQLite (WAL) in a temp dir; sandbox provider at time_scale=0, state {where}; "
              f"stop call latency {args.stop_latency * 1000:.0f} ms (simulated with asyncio.sleep)")

        # --- instrument: provider stop calls and passes -----------------------------------
        stops: dict[str, float] = {}
        pass_of_stop: dict[str, float] = {}
        current_pass: list[float] = [0.0]
        original_stop = sandbox.stop

        async def timed_stop(provider_id: str):
            at = time.time()
            stops.setdefault(provider_id, at)
            pass_of_stop.setdefault(provider_id, current_pass[0])
            if args.stop_latency:
                await asyncio.sleep(args.stop_latency)
            return await original_stop(provider_id)

        sandbox.stop = timed_stop  # type: ignore[method-assign]

        sched = GuardScheduler(svc)
        passes: list[tuple[float, float, int, int, int]] = []  # start, ms, checked, acted, errors
        errors: list[str] = []
        original_pass = sched.guards.run_pass

        async def counted_pass(now=None):
            current_pass[0] = time.time()
            report = await original_pass(now)
            passes.append((current_pass[0], report.elapsed_ms, report.checked, report.acted, len(report.errors)))
            errors.extend(report.errors)
            return report

        sched.guards.run_pass = counted_pass  # type: ignore[method-assign]

        t0 = time.time()
        deadlines = set_deadlines(svc, t0, args.lead, args.spread, rng)
        first, last = min(deadlines.values()) - t0, max(deadlines.values()) - t0
        print(f"idle deadlines: {len(deadlines):,}, from +{first:.1f} s to +{last:.1f} s after setup "
              f"(warn_lead_s=0, probes every 60 s, PASS_BATCH={PASS_BATCH}, "
              f"guard_max_sleep_s={settings.guard_max_sleep_s:g})")
        await sched.start()
        print(f"scheduler started {time.time() - t0:.2f} s after setup; leadership: {sched.leadership.describe()}",
              flush=True)
        give_up = t0 + args.lead + args.spread + args.timeout
        while len(stops) < len(deadlines) and time.time() < give_up:
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.5)  # let the last pass finish its bookkeeping
        # the scheduler keeps exactly one guard job armed; none left means no pass will ever run again
        armed = sched._scheduler is not None and sched._scheduler.get_job(JOB_ID) is not None
        await sched.stop()
        wall = time.time() - t0

        with svc.db.session() as s:
            by_state = dict(s.exec(select(Instance.state, func.count()).group_by(Instance.state)).all())  # type: ignore[call-overload]
        delays = sorted(stops[pid] - deadlines[pid] for pid in stops if pid in deadlines)
        lag = sorted(pass_of_stop[pid] - deadlines[pid] for pid in stops if pid in deadlines)
        inpass = sorted(stops[pid] - pass_of_stop[pid] for pid in stops if pid in deadlines)
        early = sum(1 for d in delays if d < 0)

        print()
        print(f"stopped by the guards: {len(delays):,} of {len(deadlines):,} within {wall:.0f} s "
              f"(database states after: {', '.join(f'{k} {v:,}' for k, v in sorted(by_state.items()))})")
        if delays:
            verdict = ("MEETS" if max(delays) < 5 and nearest_rank(delays, 99) < 5 and len(delays) == len(deadlines)
                       else "MISSES")
            print(f"delay idle deadline -> provider stop call: max {max(delays):.3f} s   "
                  f"p99 {nearest_rank(delays, 99):.3f} s   p50 {statistics.median(delays):.3f} s   "
                  f"min {min(delays):.3f} s   (target max and p99 < 5 s: {verdict})")
            print(f"  of which wake lag (pass start - deadline): max {max(lag):.3f} s  "
                  f"p99 {nearest_rank(lag, 99):.3f} s  "
                  f"p50 {statistics.median(lag):.3f} s")
            print(f"  of which in-pass (stop call - pass start): max {max(inpass):.3f} s  p99 "
                  f"{nearest_rank(inpass, 99):.3f} s  p50 {statistics.median(inpass):.3f} s")
            if early:
                print(f"  !! {early} stop calls came BEFORE the idle deadline")
        ms = sorted(p[1] for p in passes)
        acting = [p for p in passes if p[3]]
        print(f"passes: {len(passes):,} ({len(acting):,} of them stopped something); pass time median "
              f"{statistics.median(ms) if ms else 0:.1f} ms, p95 {nearest_rank(ms, 95) if ms else 0:.1f} ms, "
              f"max {max(ms) if ms else 0:.1f} ms; instances checked {sum(p[2] for p in passes):,} "
              f"(probes + stops), acted {sum(p[3] for p in passes):,}, errors {sum(p[4] for p in passes):,}")
        if acting:
            per_stop = sorted(p[1] / p[3] for p in acting)
            print(f"  passes that stopped: median {statistics.median(p[3] for p in acting):.0f} stops/pass, "
                  f"{statistics.median(per_stop):.1f} ms of pass per stop (median)")
        reported = sum(p[3] for p in passes)
        if reported != len(stops):
            print(f"  !! the passes' PassReport.acted add up to {reported:,} but {len(stops):,} provider stop calls were "
                  "made: the report's counters lose updates when checks overlap (`report.acted += await ...`)")
        if errors:
            print(f"  first errors: {errors[:3]}")
        missing = [pid for pid in deadlines if pid not in stops]
        if missing:
            print(f"  !! {len(missing)} instances were never stopped (e.g. {missing[:3]})")
        if not armed:
            print("  !! at the end no guard pass was armed any more: the scheduler had stopped waking (look for "
                  "APScheduler's 'skipped: maximum number of running instances reached' above)")
        await svc.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1000, help="running instances (default 1000)")
    ap.add_argument("--build", choices=["bulk", "boot"], default="boot",
                    help=f"bulk: boot {REAL_BOOTS} through the service, clone the rest; "
                         "boot: every instance through GpuService.boot (default; ~10 s for 1,000)")
    ap.add_argument("--lead", type=float, default=10.0, help="seconds from setup to the first possible deadline")
    ap.add_argument("--spread", type=float, default=75.0, help="deadlines are spread over this many seconds")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait after the last deadline")
    ap.add_argument("--stop-latency", type=float, default=0.0,
                    help="seconds each provider stop call takes (asyncio.sleep; a real API takes 0.2-2 s)")
    ap.add_argument("--sandbox-state", choices=["memory", "file"], default="memory",
                    help="sandbox state in memory (default) or on disk (a JSON file per machine)")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
