"""The guard scheduler in real time: it wakes at the earliest stored deadline, and with
PostgreSQL exactly one of several real processes runs the guards, another taking over when
it dies, with no instance ever warned or stopped twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import PG_SKIP, PG_URL, _pg_database
from sqlalchemy import select, update

from gpuherd.core.clock import as_utc
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.guard_plan import replan
from gpuherd.core.models import AuditEvent, Instance, SchedulerState
from gpuherd.core.notify import NotifierHub
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.scheduler import GuardScheduler
from gpuherd.core.service import GpuService
from gpuherd.core.templates import TemplateCatalog


def _real_service(tmp_path: Path, url: str, **settings) -> GpuService:
    s = Settings(home=tmp_path / "home", database_url=url, local_user="alice", poll_interval_s=0.01,
                 sandbox_time_scale=0, **settings)
    s.home.mkdir(parents=True, exist_ok=True)
    db = Database(url)
    db.upgrade()
    sandbox = SandboxProvider(s.home / "sandbox.json", seed=3, time_scale=0)
    return GpuService(s, db, ProviderRegistry({"sandbox": sandbox}), TemplateCatalog.load(None), hub=NotifierHub())


def _make_idle_soon(service: GpuService, iid: str, seconds: float, warn_s: int = 0) -> datetime:
    """Give an instance an idle deadline `seconds` from now (the schema's minimum window is a
    minute; tests need seconds)."""
    now = datetime.now(UTC)
    with service.db.session() as s:
        inst = s.get(Instance, iid)
        inst.idle_window_s = 60
        inst.warn_lead_s = warn_s
        inst.last_activity_at = now + timedelta(seconds=seconds) - timedelta(seconds=60)
        inst.guard_checked_at = now
        replan(inst)
        s.add(inst)
        s.commit()
    return now + timedelta(seconds=seconds)


async def test_scheduler_stops_within_seconds_of_the_deadline(tmp_path):
    service = _real_service(tmp_path, f"sqlite:///{tmp_path / 'g.db'}", guard_max_sleep_s=10)
    actor = service.local_actor()
    iid = (await service.boot(actor, "budget", wait=True)).instance.id
    deadline = _make_idle_soon(service, iid, 2.5)
    stopped_at: list[datetime] = []
    sandbox = service.providers.get("sandbox")
    real_stop = sandbox.stop

    async def timed_stop(pid):
        stopped_at.append(datetime.now(UTC))
        return await real_stop(pid)

    sandbox.stop = timed_stop
    scheduler = GuardScheduler(service)
    await scheduler.start()
    try:
        for _ in range(100):
            if stopped_at:
                break
            await asyncio.sleep(0.1)
    finally:
        await scheduler.stop()
    assert stopped_at, "the idle instance was not stopped"
    delay = (stopped_at[0] - deadline).total_seconds()
    assert 0 <= delay < 5, delay
    with service.db.session() as s:
        state = s.get(SchedulerState, "guards")
        assert state.leader == scheduler.identity and state.last_acted >= 1
        assert s.get(Instance, iid).state == "stopped"
    overview = await service.guard_overview(actor)
    assert overview.leader == scheduler.identity and overview.last_run_at is not None
    await service.aclose()


async def test_a_second_scheduler_on_the_same_home_stands_by(tmp_path):
    service = _real_service(tmp_path, f"sqlite:///{tmp_path / 'g.db'}")
    first, second = GuardScheduler(service), GuardScheduler(service)
    assert await first.tick() is not None          # leads, ran a pass
    assert await second.tick() is None             # file lock held: stands by
    assert first.is_leader and not second.is_leader
    await first.stop()
    assert not first.is_leader                     # a stopped scheduler no longer claims the lock
    assert await second.tick() is not None         # the first let go: the second takes over
    await second.stop()
    await service.aclose()


def _spawn_guards(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpuherd.bot.cli", "guards", "--run"], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[1])


@pytest.mark.postgres
def test_two_processes_one_leader_takeover_and_exactly_once(tmp_path):
    if not PG_URL:
        pytest.skip(PG_SKIP)
    gen = _pg_database()
    url = next(gen)
    procs: list[subprocess.Popen] = []
    try:
        lock = f"test-{uuid.uuid4().hex[:8]}"
        service = _real_service(tmp_path, url, guard_lock_name=lock)
        actor = service.local_actor()
        iids = [asyncio.run(service.boot(actor, "budget", wait=True)).instance.id for _ in range(6)]
        env = {**os.environ, "GPUHERD_HOME": str(service.settings.home), "GPUHERD_DATABASE_URL": url,
               "GPUHERD_SANDBOX_TIME_SCALE": "0", "GPUHERD_SANDBOX_SEED": "3", "GPUHERD_GUARD_LOCK_NAME": lock,
               "GPUHERD_GUARD_LEADER_RETRY_S": "1", "GPUHERD_GUARD_MAX_SLEEP_S": "1"}
        procs = [_spawn_guards(env, tmp_path / f"guards{i}.log") for i in range(2)]
        # the first three go idle soon, the rest after the leader has been killed
        for n, iid in enumerate(iids):
            _make_idle_soon(service, iid, 4 + n if n < 3 else 14 + n, warn_s=2)

        def leader() -> str | None:
            with service.db.session() as s:
                row = s.get(SchedulerState, "guards")
                return row.leader if row else None

        def states() -> dict[str, str]:
            with service.db.session() as s:
                return {i.id: i.state for i in s.exec(select(Instance)).scalars()}

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and [states()[i] for i in iids[:3]] != ["stopped"] * 3:
            time.sleep(0.2)
        assert [states()[i] for i in iids[:3]] == ["stopped"] * 3, (tmp_path / "guards0.log").read_text()
        first_leader = leader()
        pid = int(first_leader.rsplit(":", 1)[1])
        victim = next(p for p in procs if p.pid == pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        killed_at = time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(states()[i] != "stopped" for i in iids):
            time.sleep(0.2)
        assert all(states()[i] == "stopped" for i in iids), states()
        new_leader = leader()
        assert new_leader != first_leader
        assert time.monotonic() - killed_at < 60
        with service.db.session() as s:
            events = list(s.exec(select(AuditEvent)).scalars())
        for iid in iids:
            stops = [e for e in events if e.instance_id == iid and e.event == "stop"]
            warns = [e for e in events if e.instance_id == iid and e.event == "guard.warn_idle"]
            assert len(stops) == 1 and stops[0].actor == "system:idle", (iid, stops)
            assert len(warns) <= 1, (iid, warns)
        asyncio.run(service.aclose())
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        next(gen, None)


def test_guard_settings_in_the_database_survive_a_restart(tmp_path):
    """Nothing the guards need is kept in memory: a new service on the same database plans the same."""
    url = f"sqlite:///{tmp_path / 'g.db'}"
    service = _real_service(tmp_path, url)
    iid = asyncio.run(service.boot(service.local_actor(), "budget", wait=True)).instance.id
    with service.db.session() as s:
        s.exec(update(Instance).where(Instance.id == iid).values(keep_until=datetime.now(UTC) + timedelta(hours=3)))
        s.commit()
        before = s.get(Instance, iid)
        replan(before)
        s.add(before)
        s.commit()
        planned = as_utc(before.next_guard_at)
    asyncio.run(service.aclose())
    again = _real_service(tmp_path, url)
    view = asyncio.run(again.status(again.local_actor(), iid, refresh=False)).instances[0]
    assert view.next_action == "warn (stop in 5 min)"
    assert abs((view.next_action_at - (view.keep_until + timedelta(minutes=-5))).total_seconds()) < 1
    with again.db.session() as s:
        assert as_utc(s.get(Instance, iid).next_guard_at) == planned
    asyncio.run(again.aclose())


async def test_a_failure_to_record_state_does_not_stop_the_scheduler(tmp_path, monkeypatch):
    service = _real_service(tmp_path, f"sqlite:///{tmp_path / 'g.db'}")
    scheduler = GuardScheduler(service, max_sleep=0.2)

    def broken(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(scheduler, "_record", broken)
    await scheduler.start()
    try:
        await asyncio.sleep(0.8)
        assert scheduler._scheduler is not None and scheduler._scheduler.get_job("guards") is not None
        assert scheduler.last_report is not None
    finally:
        await scheduler.stop()
    await service.aclose()


async def test_reconcile_runs_on_its_own_for_the_leader_only(tmp_path):
    from gpuherd.core.models import UnmanagedInstance
    from gpuherd.core.providers.base import CreateRequest

    service = _real_service(tmp_path, f"sqlite:///{tmp_path / 'g.db'}", reconcile_interval_s=10)
    sandbox = service.providers.get("sandbox")
    offer = (await sandbox.search())[0]
    stranger = await sandbox.create(CreateRequest(offer_id=offer.offer_id, label="by-hand", image="x/y:1"))
    leader, standby = GuardScheduler(service), GuardScheduler(service)
    await standby.reconcile_tick()                    # not leading yet: does nothing
    with service.db.session() as s:
        assert s.get(SchedulerState, "reconcile") is None
    assert await leader.tick() is not None
    await leader.reconcile_tick()
    with service.db.session() as s:
        state = s.get(SchedulerState, "reconcile")
        assert state.leader == leader.identity and state.last_checked == 1 and state.last_error is None
        [row] = s.exec(select(UnmanagedInstance)).scalars().all()
        assert row.provider_id == stranger.provider_id
    await leader.start()
    try:
        jobs = {j.id: j for j in leader._scheduler.get_jobs()}
        assert jobs["reconcile"].trigger.interval == timedelta(seconds=10)
    finally:
        await leader.stop()
        await standby.stop()
        await service.aclose()
