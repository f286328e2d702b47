"""The guards on real SQLite/PostgreSQL, the sandbox and a virtual clock: idle warnings and stops,
activity, lifetime, stopped-too-long, budgets, provider faults, restarts and clock jumps."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select

from gpuherd.core.errors import PermissionDenied
from gpuherd.core.guards import Guards
from gpuherd.core.ledger import COMPUTE, STORAGE, Ledger
from gpuherd.core.models import AuditEvent, BudgetAlert, Instance
from gpuherd.core.providers.base import Capabilities
from gpuherd.core.results import BootResult, Confirmation
from gpuherd.core.templates import TemplateCatalog


@pytest.fixture
def notices(service):
    seen = []
    service.hub.subscribe(lambda n: seen.append(n) if n.kind.startswith(("guard.", "budget.")) else None)
    return seen


@pytest.fixture
async def guards(service):
    g = Guards(service, http=httpx.AsyncClient(transport=httpx.MockTransport(_refuse)))
    yield g
    await g.aclose()


def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def _boot(service, actor, template="budget", **overrides) -> str:
    r = await service.boot(actor, template, wait=True, overrides={k: str(v) for k, v in overrides.items()})
    assert isinstance(r, BootResult)
    return r.instance.id


def _inst(service, iid) -> Instance:
    with service.db.session() as s:
        return s.get(Instance, iid)


def _events(service, event: str) -> list[AuditEvent]:
    with service.db.session() as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.event == event)).scalars())


async def _run_until(guards, clock, minutes: float, step_s: float = 30):
    """Run passes as the scheduler would: at each step of virtual time."""
    end = clock.now() + timedelta(minutes=minutes)
    while clock.now() < end:
        clock.advance(step_s)
        await guards.run_pass()


async def test_idle_instance_is_warned_then_stopped_with_its_cost(service, admin, guards, clock, notices):
    iid = await _boot(service, admin)          # budget: 30 min idle, warned 5 min before
    await _run_until(guards, clock, 24)
    assert _inst(service, iid).state == "running" and not notices
    await _run_until(guards, clock, 1.5)
    [warning] = notices
    assert warning.kind == "guard.warn_idle" and warning.owner == admin.principal
    assert f"{iid} idle for 25 min — stops in 5 min" == warning.text
    assert [(a.op.value, a.instance_id, a.args) for a in warning.actions] == [
        ("keep", iid, {"duration": "1h"}), ("stop", iid, {})]
    await _run_until(guards, clock, 2)
    assert len(notices) == 1                    # warned once, however many passes
    await _run_until(guards, clock, 3)
    assert _inst(service, iid).state == "stopped"
    stop = notices[-1]
    assert stop.kind == "guard.idle" and "after 30 min without activity: stopped; session cost $" in stop.text
    [audit] = _events(service, "stop")
    assert audit.actor == "system:idle" and audit.cost_micros > 0
    with service.db.session() as s:
        assert [seg.kind for seg in Ledger.open_segments(s, iid)] == [STORAGE]


async def test_stop_happens_within_seconds_of_the_deadline(service, admin, guards, clock):
    iid = await _boot(service, admin, idle="10m", warn="0m")
    passes = 0
    # wake only when the database says a step is due, as the scheduler does
    while _inst(service, iid).state == "running":
        clock.set(max(await guards.next_wake(), clock.now()))
        await guards.run_pass()
        passes += 1
        assert passes < 20, "the guard kept waking without acting"
    [audit] = _events(service, "stop")
    idle_deadline = _inst(service, iid).started_at + timedelta(minutes=10)
    delay = audit.ts.replace(tzinfo=None) - idle_deadline.replace(tzinfo=None)
    assert timedelta(0) <= delay <= timedelta(seconds=5)
    assert passes <= 11            # a probe a minute, then the stop: no polling in between


async def test_activity_pushes_the_deadline(service, admin, guards, clock, notices, sandbox):
    iid = await _boot(service, admin)
    await _run_until(guards, clock, 20)
    await service.record_activity(admin, iid, "heartbeat", "notebook")
    await _run_until(guards, clock, 20)          # 40 min after boot, 20 after the heartbeat
    assert _inst(service, iid).state == "running" and not notices
    # GPU busy counts too (the sandbox reports utilisation)
    sandbox.set_gpu_util(_inst(service, iid).provider_id, 85)
    await _run_until(guards, clock, 60)
    assert _inst(service, iid).state == "running" and not notices
    assert _inst(service, iid).activity_status == "active"
    sandbox.set_gpu_util(_inst(service, iid).provider_id, 1)
    await _run_until(guards, clock, 31)
    assert _inst(service, iid).state == "stopped"


async def test_keep_snoozes_and_re_arms_the_warning(service, admin, guards, clock, notices):
    iid = await _boot(service, admin)
    await _run_until(guards, clock, 26)
    assert [n.kind for n in notices] == ["guard.warn_idle"]
    await service.keep(admin, iid, "1h")
    await _run_until(guards, clock, 50)
    assert _inst(service, iid).state == "running" and len(notices) == 1
    await _run_until(guards, clock, 12)
    assert [n.kind for n in notices] == ["guard.warn_idle", "guard.warn_idle", "guard.idle"]


async def test_unknown_activity_is_never_idle_and_is_shown(service, admin, guards, clock, notices, sandbox):
    """A real (not simulated) provider without GPU metrics whose model server cannot be reached."""
    sandbox.capabilities = Capabilities(simulated=False, reports_gpu_utilisation=False)
    iid = await _boot(service, admin)
    await _run_until(guards, clock, 90)
    inst = _inst(service, iid)
    assert inst.state == "running" and inst.activity_status == "unknown"
    assert inst.guard_error and "activity unknown" in inst.guard_error and "connection refused" in inst.guard_error
    assert not [n for n in notices if n.kind.startswith("guard.warn") or n.kind == "guard.idle"]
    status = await service.status(admin, iid)
    assert "activity unknown" in status.instances[0].guard_error
    # blind, with its deadline long past: probed once a minute, not on every pass
    probes = {"n": 0}

    def count(request: httpx.Request) -> httpx.Response:
        probes["n"] += 1
        raise httpx.ConnectError("connection refused", request=request)

    guards.http = httpx.AsyncClient(transport=httpx.MockTransport(count))
    await _run_until(guards, clock, 10, step_s=5)
    assert 9 <= probes["n"] <= 11


async def test_vllm_request_counters_count_as_activity(service, admin, clock, sandbox, notices):
    sandbox.capabilities = Capabilities(simulated=False, reports_gpu_utilisation=False)
    served = {"n": 0}

    def metrics(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/metrics"
        body = ("# TYPE vllm:num_requests_running gauge\n"
                'vllm:num_requests_running{model_name="m"} 0\n'
                "# TYPE vllm:request_success_total counter\n"
                f'vllm:request_success_total{{finished_reason="stop",model_name="m"}} {served["n"]}\n')
        return httpx.Response(200, text=body)

    guards = Guards(service, http=httpx.AsyncClient(transport=httpx.MockTransport(metrics)))
    iid = await _boot(service, admin)
    for _ in range(6):                           # requests keep arriving for an hour
        served["n"] += 3
        await _run_until(guards, clock, 10)
    assert _inst(service, iid).state == "running" and not notices
    await _run_until(guards, clock, 31)          # then nothing
    assert _inst(service, iid).state == "stopped"
    await guards.aclose()


async def test_provider_down_is_loud_and_nothing_is_stopped(service, admin, guards, clock, sandbox, notices):
    iid = await _boot(service, admin)
    sandbox.inject("unavailable", count=1000, on="list")
    await _run_until(guards, clock, 45)
    assert _inst(service, iid).state == "running"
    blind = [n for n in notices if n.kind == "guard.blind"]
    assert len(blind) == 1 and blind[0].level == "error" and "sandbox did not answer" in blind[0].text
    assert "did not answer" in (await service.guard_overview(admin)).blind[0].guard_error
    sandbox.clear_faults()
    await _run_until(guards, clock, 2)
    assert _inst(service, iid).state == "stopped"   # 47 min idle: acted on once it could check


async def test_failed_stop_warns_the_owner_retries_and_never_marks_stopped(service, admin, guards, clock,
                                                                           sandbox, notices):
    iid = await _boot(service, admin, warn="0m")
    sandbox.inject("unavailable", count=4, on="stop")      # the stop's retries all fail once
    await _run_until(guards, clock, 30.5)
    inst = _inst(service, iid)
    assert inst.state == "running" and "stop failed" in inst.guard_error
    failed = [n for n in notices if n.kind == "guard.idle.failed"]
    assert len(failed) == 1 and failed[0].level == "error" and "Retrying in 60 s" in failed[0].text
    with service.db.session() as s:
        assert [seg.kind for seg in Ledger.open_segments(s, iid)] == [COMPUTE]
    await _run_until(guards, clock, 2)
    assert _inst(service, iid).state == "stopped"
    assert len(_events(service, "stop")) == 2      # one failed (ok=False), one done
    assert [e.ok for e in _events(service, "stop")] == [False, True]


async def test_deadline_passed_while_down_is_acted_on_at_start(service, admin, clock, notices):
    iid = await _boot(service, admin)
    clock.advance(timedelta(hours=3))               # gpuherd was not running
    fresh = Guards(service)                         # a new process: everything it needs is in the DB
    await fresh.run_pass()
    await fresh.aclose()
    assert _inst(service, iid).state == "stopped"
    assert "no warning could go out in time" in notices[-1].text


async def test_clock_stepping_back_does_not_act_or_bill_negative(service, admin, guards, clock):
    iid = await _boot(service, admin)
    clock.advance(timedelta(minutes=20))
    await guards.run_pass()
    clock.advance(timedelta(hours=-2))
    await guards.run_pass()
    assert _inst(service, iid).state == "running"
    with service.db.session() as s:
        assert Ledger.instance_cost(s, iid, clock.now()) >= 0


async def test_idle_action_destroy(service, admin, guards, clock):
    iid = await _boot(service, admin, idle_action="destroy")
    await _run_until(guards, clock, 31)
    assert _inst(service, iid).state == "destroyed"
    [audit] = _events(service, "destroy")
    assert audit.actor == "system:idle"


async def test_max_lifetime_stops_even_a_busy_instance(service, admin, guards, clock, sandbox, notices):
    iid = await _boot(service, admin, max_lifetime="2h")
    sandbox.set_gpu_util(_inst(service, iid).provider_id, 95)
    await _run_until(guards, clock, 116)
    assert _inst(service, iid).state == "running"
    assert [n.kind for n in notices] == ["guard.warn_lifetime"]
    await _run_until(guards, clock, 5)
    assert _inst(service, iid).state == "stopped"
    assert _events(service, "stop")[0].actor == "system:lifetime"


async def test_stopped_too_long_is_warned_then_destroyed(service, admin, clock, notices):
    service.templates = TemplateCatalog.from_toml(
        '[templates.scratch]\nextends = "budget"\ndestroy_after_stopped_days = 2\n')
    guards = Guards(service)
    iid = await _boot(service, admin, "scratch")
    await service.stop(admin, iid)
    await _run_until(guards, clock, 24 * 60 + 10, step_s=600)
    warn = [n for n in notices if n.kind == "guard.warn_stopped"]
    assert len(warn) == 1 and "still bills storage" in warn[0].text and "destroyed in" in warn[0].text
    await _run_until(guards, clock, 24 * 60, step_s=600)
    assert _inst(service, iid).state == "destroyed"
    assert _events(service, "destroy")[0].actor == "system:stopped"
    await guards.aclose()


async def test_stopped_instance_gets_one_storage_reminder(service, admin, guards, clock, notices):
    iid = await _boot(service, admin)
    await service.stop(admin, iid)
    await _run_until(guards, clock, 4 * 24 * 60, step_s=3600)
    nudges = [n for n in notices if n.kind == "guard.nudge"]
    assert len(nudges) == 1 and "stopped for 3 days" in nudges[0].text
    assert _inst(service, iid).state == "stopped"


async def test_budget_thresholds_warn_once_each_and_block_boots(service, admin, member, guards, clock, notices):
    await service.set_budget(admin, "team", "ml", "1")
    iid = await _boot(service, member)              # the cheapest fitting offer, well under $1/h
    dph = _inst(service, iid).dph_micros / 1e6
    await service.record_activity(member, iid)
    # keep it busy so the idle guard stays out of the way
    hours_to_spend_it = 1 / dph
    for _ in range(int(hours_to_spend_it * 2) + 4):
        clock.advance(timedelta(minutes=30))
        await service.record_activity(member, iid)
        await guards.run_pass()
        if _inst(service, iid).state != "running":
            break
    with service.db.session() as s:
        alerts = sorted(a.threshold for a in s.exec(select(BudgetAlert)).scalars())
    assert alerts == [50, 80, 100]
    budget_notices = [n for n in notices if n.kind == "budget.threshold"]
    assert len(budget_notices) == 3 and all(n.team == "ml" for n in budget_notices)
    assert "New boots now need an admin's confirmation" in budget_notices[-1].text
    assert [n.text.split(" has passed ")[1].split("%")[0] for n in budget_notices] == ["50", "80", "100"]
    await guards.run_pass()
    assert len([n for n in notices if n.kind == "budget.threshold"]) == 3   # once each, not every pass
    with pytest.raises(PermissionDenied, match="Budget used up"):
        await service.boot(member, "budget")
    asked = await service.boot(admin, "budget")     # admins may boot past it, after a yes
    assert not isinstance(asked, Confirmation)      # the admin's own team has no budget
    await service.set_user(admin, admin.principal, team="ml")
    admin_in_ml = service.local_actor()
    asked = await service.boot(admin_in_ml, "budget")
    assert isinstance(asked, Confirmation) and asked.reason.value == "budget"
    with pytest.raises(PermissionDenied):        # the yes is the admin's own: nobody else may give it
        await service.confirm(member, asked.token)
    booted = await service.confirm(admin_in_ml, asked.token)
    assert isinstance(booted, BootResult) and booted.instance.owner == admin_in_ml.principal


async def test_hard_cap_stops_the_teams_running_instances(service, admin, member, guards, clock, notices):
    await service.set_budget(admin, "team", "ml", "0.5", hard_cap=True)
    iid = await _boot(service, member)
    other = await _boot(service, admin)             # team default: not capped
    for _ in range(200):
        clock.advance(timedelta(minutes=10))
        await service.record_activity(member, iid)
        await service.record_activity(admin, other)
        await guards.run_pass()
        if _inst(service, iid).state == "stopped":
            break
    assert _inst(service, iid).state == "stopped"
    assert _inst(service, other).state == "running"
    [cap] = [e for e in _events(service, "stop") if e.instance_id == iid]
    assert cap.actor == "system:budget"


async def test_two_guard_objects_never_warn_or_stop_twice(service, admin, clock, notices):
    """Two processes' passes interleaved on one database (the lock normally prevents this)."""
    a, b = Guards(service), Guards(service)
    iids = [await _boot(service, admin) for _ in range(3)]
    for _ in range(80):
        clock.advance(30)
        await a.run_pass()
        await b.run_pass()
    for iid in iids:
        assert _inst(service, iid).state == "stopped"
        assert len([n for n in notices if n.instance_id == iid and n.kind == "guard.warn_idle"]) == 1
        assert len([e for e in _events(service, "stop") if e.instance_id == iid]) == 1
    await a.aclose()
    await b.aclose()


async def test_status_shows_next_action_and_armed_guards(service, admin, clock):
    iid = await _boot(service, admin, max_lifetime="8h")
    view = (await service.status(admin, iid)).instances[0]
    assert view.next_action == "warn (stop in 5 min)"
    assert view.next_action_at == view.created_at + timedelta(minutes=25)
    guards = {g.name: g.armed for g in view.guards}
    assert guards == {"idle": True, "lifetime": True}
    with service.db.session() as s:
        n = s.exec(select(func.count()).select_from(Instance).where(Instance.next_guard_at.is_not(None))).one()[0]
    assert n == 1


async def test_invalid_guard_durations_are_refused(service, admin):
    from gpuherd.core.errors import InvalidInput

    for bad in ({"idle": "-5m"}, {"idle": "forever"}, {"max_lifetime": "0m"}):
        with pytest.raises(InvalidInput):
            await service.boot(admin, "budget", overrides=bad)
    with service.db.session() as s:
        assert s.exec(select(func.count()).select_from(Instance)).one()[0] == 0


async def test_pass_report_counts_every_action_when_provider_calls_wait(service, admin, guards, clock, sandbox,
                                                                        monkeypatch):
    iids = [await _boot(service, admin, warn="0m") for _ in range(4)]
    real_stop = sandbox.stop

    async def slow_stop(pid):
        await asyncio.sleep(0.01)          # a real API call yields to the other checks
        return await real_stop(pid)

    monkeypatch.setattr(sandbox, "stop", slow_stop)
    clock.advance(timedelta(minutes=31))
    report = await guards.run_pass()
    assert all(_inst(service, i).state == "stopped" for i in iids)
    assert report.acted == 4 and report.checked == 4


async def test_warnings_are_audited_as_the_guard_that_gave_them(service, admin, guards, clock, sandbox):
    iid = await _boot(service, admin, max_lifetime="2h")
    await _run_until(guards, clock, 26)                       # idle warning at 25 min
    sandbox.set_gpu_util(_inst(service, iid).provider_id, 90)  # then busy until the lifetime warning
    await _run_until(guards, clock, 90)
    actors = {e.event: e.actor for e in _events(service, "guard.warn_idle") + _events(service, "guard.warn_lifetime")}
    assert actors == {"guard.warn_idle": "system:idle", "guard.warn_lifetime": "system:lifetime"}


async def test_a_warning_that_reached_nobody_does_not_postpone_the_stop(service, admin, guards, clock, notices):
    """One machine's warning is delivered (a shell is open), the other's reaches no surface: both
    are stopped at their deadline, and only the second stop notice says nobody was warned."""
    from gpuherd.core.outbox import Deliverer, audience

    heard = await _boot(service, admin)
    unheard = await _boot(service, admin)
    shown: list[str] = []

    async def show(notice) -> None:
        if notice.instance_id == heard:
            shown.append(notice.text)
        else:
            raise RuntimeError("this terminal is gone")        # the platform fails every time

    shell = Deliverer(service.db, clock, surface="shell", targets=audience(admin), send=show,
                      identity="test-shell", recipient=admin.principal, max_attempts=1)
    await _run_until(guards, clock, 26)                        # both warned at 25 min
    await shell.deliver_once()
    assert any("idle for" in text for text in shown)
    await _run_until(guards, clock, 6)                         # the deadline, 30 min
    assert _inst(service, heard).state == "stopped" and _inst(service, unheard).state == "stopped"
    stops = {n.instance_id: n.text for n in notices if n.kind == "guard.idle"}
    assert "reached nobody" not in stops[heard]
    assert "the warning before it reached nobody" in stops[unheard]
