"""A notebook keeps the machine it works on alive while its cells run (notebook_ext/activity.py):
unit tests of the pinger against the core on a virtual clock, and two real kernels against a
live `gpuherd serve` whose guards run on real time — the busy kernel's machine outlives its idle
deadline, the idle kernel's machine is stopped."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlmodel import col

from gpuherd.core.guard_plan import replan
from gpuherd.core.models import Activity, Instance
from gpuherd.notebook_ext.activity import KernelActivity, interval_from_env
from gpuherd.notebook_ext.api import Gpu
from gpuherd.notebook_ext.backend import LocalBackend
from gpuherd.notebook_ext.corethread import InlineCore
from tests.live_server import start_live, stop_live


class _Events:
    """IPython's `shell.events` as far as the pinger uses it."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Any]] = {"pre_run_cell": [], "post_run_cell": []}

    def register(self, name: str, fn: Any) -> None:
        self.callbacks[name].append(fn)

    def unregister(self, name: str, fn: Any) -> None:
        self.callbacks[name].remove(fn)

    def trigger(self, name: str) -> None:
        for fn in list(self.callbacks[name]):
            fn(None)


class _Shell:
    def __init__(self) -> None:
        self.events = _Events()


def _notebook_pings(service: Any, iid: str) -> int:
    with service.db.session() as s:
        return int(s.execute(select(func.count()).select_from(Activity).where(
            col(Activity.instance_id) == iid, col(Activity.source) == "notebook")).scalar_one())


async def _settle(times: int = 20) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


async def _pings_once_quiet(service, iid: str, quiet_s: float = 0.1, within_s: float = 5.0) -> int:
    """The ping count once it has not moved for `quiet_s`: a ping sent just before the cell ended
    may still be writing (seen on a loaded CI machine with PostgreSQL), and is not a ping sent
    while idle."""
    await _settle()
    count, deadline = _notebook_pings(service, iid), asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(quiet_s)
        now = _notebook_pings(service, iid)
        if now == count:
            return count
        count = now
    return count


async def test_pings_while_a_cell_runs_and_not_while_idle(service, admin, clock):
    gpu = Gpu(LocalBackend(service, guards=False), core=InlineCore(), ping_interval_s=0.05)
    await gpu.aconnect()
    boot = await service.boot(admin, "budget", wait=True)
    iid = boot.instance.id
    shell = _Shell()
    gpu.activity.use(iid, in_cell=False, ipython=shell)
    await asyncio.sleep(0.15)
    assert _notebook_pings(service, iid) == 0, "a button press between cells is no activity"

    shell.events.trigger("pre_run_cell")
    await asyncio.sleep(0.2)
    during = _notebook_pings(service, iid)
    assert during >= 2, "a running cell pings at once and then every interval"
    clock.advance(timedelta(minutes=5))
    await asyncio.sleep(0.1)
    view = await service.view(admin, iid)
    assert view.idle_for_s is not None and view.idle_for_s < 60, "the ping restarted the idle clock"

    shell.events.trigger("post_run_cell")
    after = await _pings_once_quiet(service, iid)      # a ping already on its way to the database lands
    await asyncio.sleep(0.2)
    assert _notebook_pings(service, iid) == after, "an idle kernel sends no pings"

    gpu.activity.close()
    assert shell.events.callbacks == {"pre_run_cell": [], "post_run_cell": []}, "the hooks are removed"
    shell.events.trigger("pre_run_cell")
    await asyncio.sleep(0.15)
    assert _notebook_pings(service, iid) == after


async def test_a_refused_ping_is_reported_and_pinging_goes_on(service, admin):
    gpu = Gpu(LocalBackend(service, guards=False), core=InlineCore(), ping_interval_s=0.05)
    await gpu.aconnect()
    boot = await service.boot(admin, "budget", wait=True)
    iid = boot.instance.id
    await service.destroy(admin, iid, confirmed=True)
    shell = _Shell()
    gpu.activity.use(iid, in_cell=True, ipython=shell)
    await asyncio.sleep(0.15)
    assert gpu.activity.last_error and "destroyed" in gpu.activity.last_error
    assert "last ping failed" in gpu.activity.describe()
    assert gpu.activity._task is not None and not gpu.activity._task.done(), "it keeps trying while the cell runs"
    gpu.activity.close()


async def test_outside_ipython_the_process_is_busy_while_it_uses_the_machine(service, admin):
    gpu = Gpu(LocalBackend(service, guards=False), core=InlineCore(), ping_interval_s=0.05)
    await gpu.aconnect()
    iid = (await service.boot(admin, "budget", wait=True)).instance.id
    activity = KernelActivity(gpu.core, gpu._ping, interval_s=0.05)
    activity.use(iid, in_cell=False)              # a script: no IPython here
    await asyncio.sleep(0.2)
    assert _notebook_pings(service, iid) >= 2
    activity.release()
    await _settle()
    n = _notebook_pings(service, iid)
    await asyncio.sleep(0.15)
    assert _notebook_pings(service, iid) == n
    assert activity.describe() == "No machine is kept alive by this notebook."


def test_interval_from_env(monkeypatch):
    monkeypatch.setenv("GPUHERD_NOTEBOOK_PING_S", "7.5")
    assert interval_from_env() == 7.5
    monkeypatch.setenv("GPUHERD_NOTEBOOK_PING_S", "soon")
    assert interval_from_env() == 20.0
    monkeypatch.setenv("GPUHERD_NOTEBOOK_PING_S", "0")
    assert interval_from_env() == 0.2


# --- real kernels against a live server ------------------------------------------------------------

DEADLINE_S = 10          # both machines' idle deadline from the start of the test (a 1-minute window)
BUSY_S = 18              # the busy kernel's cell runs past that deadline


def _idle_soon(service: Any, iid: str, seconds: float) -> None:
    """A 1-minute idle window whose last activity was `60 - seconds` ago, so the deadline falls
    `seconds` from now (the schema's minimum window is a minute; the test needs less waiting)."""
    now = datetime.now(UTC)
    with service.db.session() as s:
        inst = s.get(Instance, iid)
        assert inst is not None and inst.idle_window_s == 60
        inst.warn_lead_s = 0
        inst.last_activity_at = now + timedelta(seconds=seconds) - timedelta(seconds=60)
        inst.guard_checked_at = now
        replan(inst)
        s.add(inst)
        s.commit()


def _state(service: Any, iid: str) -> str:
    with service.db.session() as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        return inst.state


def _kernel(tmp_path: Path, name: str, env: dict[str, str]) -> tuple[Any, Any]:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env={**os.environ, **env}, cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def _run(kc: Any, code: str, timeout: float = 60) -> None:
    outputs: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] in ("stream", "error"):
            outputs.append(str(msg["content"].get("text") or msg["content"].get("evalue")))
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok", outputs


def test_a_busy_kernel_keeps_its_machine_and_an_idle_kernel_lets_it_stop(tmp_path):
    """Real time (about 25 s), so on SQLite only: what is tested is the kernel, not the database."""
    live = start_live(tmp_path, f"sqlite:///{tmp_path / 'live.db'}", guard_max_sleep_s=2)
    kernels: list[tuple[Any, Any]] = []
    try:
        with live.client("alice") as http:
            ids = []
            for _ in range(2):
                answer = http.post("/instances", json={"template": "budget", "overrides": {"idle": "1m"}})
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["instance"]["id"])
            until = time.monotonic() + 30
            while any(http.get(f"/instances/{i}").json()["state"] != "running" for i in ids):
                assert time.monotonic() < until, "the machines did not come up"
                time.sleep(0.2)
        busy_id, idle_id = ids
        env = {"GPUHERD_SERVER": live.url, "GPUHERD_API_KEY": live.keys["alice"], "GPUHERD_NOTEBOOK_PING_S": "2",
               "GPUHERD_HOME": str(tmp_path / "kernel-home")}
        busy = _kernel(tmp_path, "busy", env)
        idle = _kernel(tmp_path, "idle", env)
        kernels += [busy, idle]
        for (_, kc), iid in ((busy, busy_id), (idle, idle_id)):
            _run(kc, f"from gpuherd.notebook_ext import connect\ngpu = connect()\ngpu.use({iid!r})")
        for iid in ids:
            _idle_soon(live.service, iid, DEADLINE_S)
        began = time.monotonic()
        _run(busy[1], f"import time\ntime.sleep({BUSY_S})", timeout=BUSY_S + 30)   # blocks the busy kernel's loop
        assert time.monotonic() - began >= BUSY_S
        assert _state(live.service, idle_id) == "stopped", "the idle kernel's machine passed its deadline and was stopped"
        assert _state(live.service, busy_id) == "running", "the busy kernel's pings kept its machine"
        pinged = _notebook_pings(live.service, busy_id)
        assert pinged >= BUSY_S // 2 - 2, f"about one ping every 2 s while the cell ran, got {pinged}"
        time.sleep(4)                     # two ping intervals
        assert _notebook_pings(live.service, busy_id) == pinged, "no pings once the kernel is idle"
        with live.service.db.session() as s:
            stopper = s.execute(select(col(Instance.state)).where(col(Instance.id) == idle_id)).scalar_one()
        assert stopper == "stopped"
    finally:
        for km, kc in kernels:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
        stop_live(live)
