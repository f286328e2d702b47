"""`/gpu status` as the shell does it (dispatch + render to text) with 1,000 live instances on
SQLite and the sandbox provider (instant timings). Prints median and p95 of the round trip with
and without the refresh from the provider, and where the time goes. The reply is one page (the
newest 100, the service's default page) of the whole fleet; the bench also times every instance
walked through the cursor in the largest pages (500), the figure a 1,000-row reply would cost.

    python bench/bench_status.py [--instances 1000] [--runs 20] [--build bulk|service]

--build service boots every instance through GpuService.boot (slow: 1-2 min of building).
--build bulk (default) boots 40 through the service, then clones those rows for the rest:
  instance rows, their open billing segments and the sandbox's own machine records (through its
  bulk hook, `SandboxProvider._state(write=True)`: one file per machine), so the database
  and the provider look exactly as if every instance had been booted (and ~15 % stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import math
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _path  # noqa: F401
from _fleet import clone_instance, settle
from sqlalchemy import select

from gpuherd.bot.grammar import Context, dispatch
from gpuherd.bot.render_text import to_text
from gpuherd.bot.replies import status_reply
from gpuherd.core.clock import VirtualClock, epoch
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.ledger import COMPUTE, STORAGE
from gpuherd.core.models import BillingSegment, Instance, InstanceState
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.results import StatusResult
from gpuherd.core.service import MAX_PAGE, GpuService
from gpuherd.core.templates import TemplateCatalog

TEMPLATES = ["budget", "budget", "budget", "research", "high_performance"]
USERS = [f"slack:U{n:03d}" for n in range(12)]
TEAMS = ["ml", "vision", "nlp"]
STOPPED_SHARE = 0.15
REAL_BOOTS = 40


async def boot_through_service(svc: GpuService, clock: VirtualClock, n: int, rng: random.Random) -> None:
    admin = svc.local_actor()
    actors = []
    for i, principal in enumerate(USERS):
        await svc.set_user(admin, principal, role="member", team=TEAMS[i % len(TEAMS)])
        actors.append(svc.actor(principal, source="slack"))
    ids = []
    for i in range(n):
        r = await svc.boot(rng.choice(actors), rng.choice(TEMPLATES), wait=False)
        ids.append(r.instance.id)  # type: ignore[union-attr]
        clock.advance(rng.randrange(30, 600))
        if (i + 1) % 200 == 0:
            print(f"  booted {i + 1:,} through the service")
    for iid in rng.sample(ids, int(n * STOPPED_SHARE)):
        await svc.stop(admin, iid)
        clock.advance(rng.randrange(5, 60))
    await settle(svc, admin)  # provisioning -> running, as the first real /gpu status would


def clone_the_rest(svc: GpuService, sandbox: SandboxProvider, clock: VirtualClock, n: int,
                   rng: random.Random) -> None:
    """Copy real rows (instance, open segments, sandbox record) under new ids and times. The
    sandbox records go in through its bulk hook, which writes one file per new machine."""
    now = clock.now()
    with sandbox._state(write=True) as state, svc.db.session() as s:
        models = list(s.exec(select(Instance)).scalars())  # type: ignore[call-overload]
        running = [m for m in models if m.state == InstanceState.RUNNING.value]
        stopped = [m for m in models if m.state == InstanceState.STOPPED.value]
        taken = {m.id for m in models}
        rows: list[Instance] = []
        segments: list[BillingSegment] = []
        for _ in range(n):
            model = rng.choice(stopped if rng.random() < STOPPED_SHARE and stopped else running)
            owner_i = rng.randrange(len(USERS))
            created = now - timedelta(minutes=rng.randrange(10, 3 * 24 * 60))
            started = created
            inst, _ = clone_instance(model, state, taken, owner=USERS[owner_i], team=TEAMS[owner_i % len(TEAMS)],
                                     created_at=created, updated_at=created, started_at=started,
                                     last_activity_at=started + timedelta(minutes=rng.randrange(0, 60)))
            base = dict(instance_id=inst.id, owner=inst.owner, team=inst.team, template=inst.template,
                        provider=inst.provider)
            if inst.state == InstanceState.STOPPED.value:
                stopped_at = created + (now - created) * rng.uniform(0.2, 0.9)
                inst.stopped_at = stopped_at
                segments.append(BillingSegment(kind=COMPUTE, rate_micros=inst.dph_micros, start_ts=epoch(started),
                                               end_ts=epoch(stopped_at), **base))
                segments.append(BillingSegment(kind=STORAGE, rate_micros=inst.storage_dph_micros,
                                               start_ts=epoch(stopped_at), **base))
            else:
                segments.append(BillingSegment(kind=COMPUTE, rate_micros=inst.dph_micros, start_ts=epoch(started),
                                               **base))
            rows.append(inst)
        s.add_all(rows)
        s.flush()
        s.add_all(segments)
        s.commit()


def sandbox_dir(sandbox: SandboxProvider) -> Path:
    """Where the sandbox keeps its machines: one file each in `<state_path>.d/machines/`."""
    assert sandbox.state_path is not None
    return sandbox.state_path.with_name(sandbox.state_path.name + ".d")


def timed(runs: int, fn: Callable[[], Awaitable[Any]]) -> tuple[list[float], Any]:
    async def go() -> tuple[list[float], Any]:
        out = None
        for _ in range(2):  # warm up
            out = await fn()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            out = await fn()
            times.append((time.perf_counter() - t) * 1000)
        return sorted(times), out
    return asyncio.run(go())


def p95(times: list[float]) -> float:
    """Nearest rank: with 20 sorted runs, the 19th (the slowest but one)."""
    return times[max(0, math.ceil(0.95 * len(times)) - 1)]


def line(label: str, times: list[float]) -> str:
    return f"  {label:<52} median {statistics.median(times):7.1f} ms   p95 {p95(times):7.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--breakdown-runs", type=int, default=8, help="runs for the where-the-time-goes lines")
    ap.add_argument("--build", choices=["bulk", "service"], default="bulk")
    args = ap.parse_args()
    rng = random.Random(3)
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'bench.db'}")
        db.upgrade()
        clock = VirtualClock(datetime(2026, 11, 18, 9, 0, tzinfo=UTC) - timedelta(days=2))
        sandbox = SandboxProvider(Path(tmp) / "sandbox.json", seed=7, time_scale=0, clock=clock)
        settings = Settings(home=Path(tmp), database_url=db.url, local_user="bench", local_role="admin")
        svc = GpuService(settings, db, ProviderRegistry({"sandbox": sandbox}), TemplateCatalog.load(None),
                         clock=clock)
        t = time.perf_counter()
        real = args.instances if args.build == "service" else min(REAL_BOOTS, args.instances)
        asyncio.run(boot_through_service(svc, clock, real, rng))
        if args.instances > real:
            clone_the_rest(svc, sandbox, clock, args.instances - real, rng)
        clock.advance(timedelta(minutes=5))
        built = time.perf_counter() - t
        how = ("every instance booted through GpuService.boot (wait=False), "
               f"{int(STOPPED_SHARE * 100)} % stopped through GpuService.stop" if args.build == "service" else
               f"{real} booted through GpuService.boot (some stopped), {args.instances - real:,} cloned from them "
               "as rows + open billing segments + sandbox state records")
        print(f"{args.instances:,} live instances ({how}); built in {built:.1f} s")
        files = sorted(sandbox_dir(sandbox).glob("machines/*.json")) if sandbox.state_path else []
        print(f"SQLite {db.url.split('///')[-1].split('/')[-1]}, sandbox provider at time_scale=0, "
              f"sandbox state {len(files):,} machine files, {sum(f.stat().st_size for f in files) // 1024} KiB")

        actor = svc.local_actor()
        ctx = Context(svc, actor)
        page_size = inspect.signature(GpuService.status).parameters["limit"].default
        shown = min(page_size, args.instances)

        # Provider listings are shared for a few seconds of the service clock (core.sync), and the
        # bench's virtual clock stands still: each call forgets them first, so every press asks
        # the provider as a press seconds after the last one would.
        async def round_trip() -> str:
            svc.sync.forget_listings()
            return to_text(await dispatch(ctx, "/gpu status"))

        refreshing, text = timed(args.runs, round_trip)
        rows = sum(1 for ln in text.splitlines() if ln.startswith("g-"))
        title = text.splitlines()[0]
        assert rows == shown and title.startswith(f"{args.instances} instance"), (rows, title)

        async def shared_listing() -> str:
            return to_text(await dispatch(ctx, "/gpu status"))

        sharing, _ = timed(args.runs, shared_listing)

        async def service_only(refresh: bool) -> Any:
            svc.sync.forget_listings()
            return await svc.status(actor, refresh=refresh)

        async def every_page(refresh: bool) -> StatusResult:
            """Every instance, walking the cursor in the largest pages (one listing for the walk)."""
            svc.sync.forget_listings()
            first = page = await svc.status(actor, refresh=refresh, limit=MAX_PAGE)
            views = list(page.instances)
            while page.next_cursor:
                page = await svc.status(actor, refresh=refresh, limit=MAX_PAGE, cursor=page.next_cursor)
                views.extend(page.instances)
            return first.model_copy(update={"instances": views, "next_cursor": None})

        svc_refresh, _ = timed(args.breakdown_runs, functools.partial(service_only, True))
        svc_plain, result = timed(args.breakdown_runs, functools.partial(service_only, False))
        all_refresh, _ = timed(args.breakdown_runs, functools.partial(every_page, True))
        all_plain, everything = timed(args.breakdown_runs, functools.partial(every_page, False))
        assert len(everything.instances) == args.instances, len(everything.instances)

        async def render(r: StatusResult) -> str:
            return to_text(status_reply(r))

        rendering, _ = timed(args.breakdown_runs, functools.partial(render, result))
        rendering_all, _ = timed(args.breakdown_runs, functools.partial(render, everything))

        original = svc.status
        svc.status = functools.partial(original, refresh=False)  # type: ignore[method-assign]
        plain, _ = timed(args.runs, round_trip)
        svc.status = original  # type: ignore[method-assign]

        print(f"reply: '{title}', {rows:,} table rows (the first page), {len(text) // 1024} KiB of text")
        print(f"{args.runs} timed runs per round-trip figure, {args.breakdown_runs} per breakdown figure, each after "
              "2 warm-ups; p95 by nearest rank")
        print(f"shell round trip: dispatch('/gpu status') + bot.render_text.to_text (newest {shown:,} of "
              f"{args.instances:,})")
        print(line("with refresh from the provider (as shipped)", refreshing))
        print(line("same, listing shared (a press < 2 s after another)", sharing))
        print(line("without refresh (service.status(refresh=False))", plain))
        print(f"where the time goes (first page, {args.breakdown_runs} runs each):")
        print(line("GpuService.status, refresh from the provider", svc_refresh))
        print(line("GpuService.status, database only", svc_plain))
        print(line(f"status_reply + to_text (render {rows:,} rows)", rendering))
        print(f"every instance, pages of {MAX_PAGE} through the cursor ({args.breakdown_runs} runs each):")
        print(line(f"GpuService.status x{-(-args.instances // MAX_PAGE)}, refresh from the provider", all_refresh))
        print(line(f"GpuService.status x{-(-args.instances // MAX_PAGE)}, database only", all_plain))
        print(line(f"status_reply + to_text (render {args.instances:,} rows)", rendering_all))
        asyncio.run(svc.aclose())


if __name__ == "__main__":
    main()
