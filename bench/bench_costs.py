"""`/gpu costs` for a month over a ledger of 1,000,000 billing segments on SQLite.
Target: under 100 ms. Prints build time, then median/p95 of the service's cost report.

    python bench/bench_costs.py [--segments 1000000] [--months 12]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import _path  # noqa: F401

from gpuherd.core.clock import VirtualClock
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.ledger import split_at_months
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.service import GpuService
from gpuherd.core.templates import TemplateCatalog

USERS = [f"slack:U{n:04d}" for n in range(40)]
TEAMS = ["ml", "vision", "nlp", "infra"]
TEMPLATES = ["budget", "research", "high_performance", "llava-34b", "llama-3.1-70b"]
PROVIDERS = ["vast", "runpod", "aws", "sandbox"]


def build(db: Database, segments: int, months: int, now: datetime) -> None:
    """A year of a busy team's ledger. Rows are written in start order, as a live ledger
    appends them (a segment opens at 'now'), and cut at month ends as Ledger.close stores them."""
    rng = random.Random(1)
    span = months * 30 * 86400
    start0 = int(now.timestamp()) - span
    rows: list[tuple] = []
    i = 0
    while len(rows) < segments:
        i += 1
        s = start0 + rng.randrange(span)
        length = rng.choice([600, 3600, 4 * 3600, 12 * 3600, 3 * 86400])
        end = None if i % 997 == 0 else min(s + length, int(now.timestamp()))
        u = rng.randrange(len(USERS))
        head = (f"g-{i % 50000:05x}", "compute" if i % 5 else "storage", rng.randrange(5_000, 4_000_000))
        tags = (USERS[u], TEAMS[u % 4], rng.choice(TEMPLATES), rng.choice(PROVIDERS))
        pieces = [(s, None)] if end is None else split_at_months(s, end)
        rows.extend((*head, lo, hi, *tags) for lo, hi in pieces)
    rows.sort(key=lambda r: r[3])
    raw = db.engine.raw_connection()
    cur = raw.cursor()
    cur.executemany("INSERT INTO billing_segments (instance_id, kind, rate_micros, start_ts, end_ts, owner,"
                    " team, template, provider) VALUES (?,?,?,?,?,?,?,?,?)", rows[:segments])
    raw.commit()
    cur.execute("ANALYZE")
    raw.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--segments", type=int, default=1_000_000)
    ap.add_argument("--months", type=int, default=12, help="months the segments are spread over")
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    now = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'bench.db'}")
        db.upgrade()
        t = time.perf_counter()
        build(db, args.segments, args.months, now)
        print(f"ledger: {args.segments:,} segments over {args.months} months, built in {time.perf_counter() - t:.1f} s")
        clock = VirtualClock(now)
        settings = Settings(home=Path(tmp), database_url=db.url, local_user="bench")
        svc = GpuService(settings, db, ProviderRegistry({"sandbox": SandboxProvider(None, clock=clock)}),
                         TemplateCatalog.load(None), clock=clock)
        asyncio.run(measure(svc, args.runs))


async def measure(svc: GpuService, runs: int) -> None:
    """Times the awaited report as a surface sees it (the query runs in a database worker thread)."""
    actor = svc.local_actor()
    await svc.set_budget(actor, "team", "ml", "5000")
    try:
        for period, by in (("month", "user"), ("month", "team"), ("month", "template"), ("month", "provider"),
                           ("week", "user"), ("today", "user"), ("2026-06", "user")):
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                report = await svc.costs(actor, period, by)
                times.append((time.perf_counter() - t) * 1000)
            times.sort()
            p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
            print(f"/gpu costs {period:<7} by={by:<9} median {statistics.median(times):6.1f} ms  p95 {p95:6.1f} ms  "
                  f"(total {report.total:,.2f} USD, {len(report.groups)} groups)  target < 100 ms")
    finally:
        await svc.aclose()


if __name__ == "__main__":
    main()
