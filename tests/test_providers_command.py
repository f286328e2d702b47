"""`/gpu providers` and the low-balance warning (core/provider_health.py), against the sandbox
(with a simulated balance) and the vast.ai loopback fake (its account credit, a refused key, a
failing API), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import col

from gpuherd.bot.grammar import Context, dispatch
from gpuherd.bot.render_text import to_text
from gpuherd.core.auth import Actor
from gpuherd.core.clock import VirtualClock
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.models import NoticeDelivery, NoticeRecord
from gpuherd.core.notify import NotifierHub
from gpuherd.core.provider_health import HEALTH, ProviderHealth, hours_left
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.providers.vast import VastProvider
from gpuherd.core.scheduler import GuardScheduler
from gpuherd.core.service import GpuService
from gpuherd.core.templates import TemplateCatalog
from tests.fakes.vast_fake import FakeVast

KEY = "vast-7a6b5c4d3e2f1a0b9c8d-providers"


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture(autouse=True)
def _fresh_health() -> Iterator[None]:
    """What earlier tests' provider calls left in the process-wide record is not ours."""
    HEALTH.forget()
    yield
    HEALTH.forget()


@pytest.fixture
def fake() -> Iterator[FakeVast]:
    with FakeVast(api_key=KEY) as server:
        yield server


def _vast(fake: FakeVast, key: str = KEY) -> VastProvider:
    return VastProvider(key, base_url=fake.url, timeout_s=0.5, backoff_s=0.01, sleep=_no_sleep,
                        transport=httpx.AsyncHTTPTransport(verify=False))


def _service(settings: Settings, database: Database, clock: VirtualClock, **providers) -> GpuService:
    return GpuService(settings, database, ProviderRegistry(providers), TemplateCatalog.load(None), clock=clock,
                      hub=NotifierHub(), sleep=_no_sleep)


@pytest.fixture
async def both(settings: Settings, database: Database, clock: VirtualClock, sandbox: SandboxProvider,
               fake: FakeVast) -> AsyncIterator[GpuService]:
    """The sandbox (simulated credit $40) and vast.ai (the fake's credit, $25)."""
    sandbox.balance_usd = Decimal("40")
    svc = _service(settings, database, clock, sandbox=sandbox, vast=_vast(fake))
    yield svc
    await svc.providers.aclose()


def _row(reply, provider: str) -> list[str]:
    return next(r for r in reply.tables[0].rows if r[0] == provider)


def _notices(service: GpuService, kind: str = "provider.low_balance") -> list[NoticeRecord]:
    with service.db.session() as s:
        return list(s.execute(select(NoticeRecord).where(col(NoticeRecord.kind) == kind)
                              .order_by(col(NoticeRecord.id))).scalars())


async def test_providers_shows_credentials_last_answer_price_age_and_balance(both: GpuService, clock: VirtualClock,
                                                                             fake: FakeVast) -> None:
    admin = both.local_actor()
    await both.search(admin, "limit=3")                  # both providers' prices are fetched now
    clock.advance(90)
    r = await both.provider_overview(admin)
    by = {p.provider: p for p in r.providers}
    assert set(by) == {"sandbox", "vast"}
    assert by["vast"].credentials == "ok" and by["sandbox"].credentials == "ok"
    assert by["vast"].balance is not None and by["vast"].balance.balance == Decimal("25")
    assert by["sandbox"].balance is not None and by["sandbox"].balance.balance == Decimal("40")
    assert by["vast"].balance.hours_left is None          # nothing bills there: it lasts
    assert by["vast"].price_age_s == 90 and by["sandbox"].price_age_s == 90
    assert by["vast"].last_answered_at == clock.now() and by["vast"].last_error is None
    assert fake.calls("user"), "the check asked vast.ai for the account"

    reply = await dispatch(Context(service=both, actor=admin), "/gpu providers")
    assert reply.title == "Providers · 2 configured" and reply.level == "info"
    assert _row(reply, "vast.ai") == ["vast.ai", "✓ ok", "0s ago", "1m old", "$25.00"]
    assert _row(reply, "Sandbox (simulated)")[4] == "$40.00"
    assert "$25.00" in to_text(reply)


async def test_prices_never_fetched_and_no_balance_are_said_so(service: GpuService) -> None:
    reply = await dispatch(Context(service=service, actor=service.local_actor()), "/gpu providers")
    assert _row(reply, "Sandbox (simulated)") == ["Sandbox (simulated)", "✓ ok", "0s ago", "not fetched yet",
                                                  "not reported"]
    assert (await dispatch(Context(service=service, actor=service.local_actor()), "/gpu providers now")).level == "error"


async def test_a_refused_key_shows_as_failed_with_its_error_and_never_the_key(
        settings: Settings, database: Database, clock: VirtualClock, fake: FakeVast) -> None:
    wrong = "vast-0000000000000000dead-wrongkey"
    svc = _service(settings, database, clock, vast=_vast(fake, key=wrong))
    try:
        r = await svc.provider_overview(svc.local_actor())
        [vast] = r.providers
        assert vast.credentials == "failed" and vast.balance is None and vast.last_answered_at is None
        assert vast.last_error is not None and vast.last_error.kind == "auth"
        reply = await dispatch(Context(service=svc, actor=svc.local_actor()), "/gpu providers")
        assert _row(reply, "vast.ai")[1:3] == ["✗ refused", "never"] and reply.level == "warning"
        text = to_text(reply) + r.model_dump_json()
        assert "last error" in text and "(auth)" in text
        assert wrong not in text and KEY not in text
    finally:
        await svc.providers.aclose()


async def test_a_failing_api_is_unknown_not_refused_and_keeps_the_last_answer(
        both: GpuService, clock: VirtualClock, fake: FakeVast) -> None:
    admin = both.local_actor()
    first = await both.provider_overview(admin)
    answered = {p.provider: p for p in first.providers}["vast"].last_answered_at
    assert answered is not None
    clock.advance(60)                                  # past the shared check's 30 s
    fake.fault("user", "server_error", times=20)
    r = await both.provider_overview(admin)
    vast = {p.provider: p for p in r.providers}["vast"]
    assert vast.credentials == "unknown"
    assert vast.last_error is not None and vast.last_error.kind == "unavailable"
    assert vast.last_answered_at == answered and vast.balance is None


async def test_low_balance_warns_once_and_again_only_after_a_top_up(service: GpuService, sandbox: SandboxProvider,
                                                                    clock: VirtualClock) -> None:
    admin = service.local_actor()
    await service.boot(admin, "budget", wait=True)
    per_hour = (await service.costs(admin)).run_rate.per_hour
    assert per_hour > 0
    sandbox.balance_usd = per_hour * 10                  # ten hours left
    sent = await service.warn_low_balances()
    assert len(sent) == 1 and "runs out in about 10 h" in sent[0]
    assert await service.warn_low_balances() == []       # the second check: already warned
    notices = _notices(service)
    assert [n.team for n in notices] == [None, admin.team]   # the admins and the team billing there
    with service.db.session() as s:
        targets = {d.target for d in s.execute(select(NoticeDelivery).where(
            col(NoticeDelivery.notice_id).in_([n.id for n in notices]))).scalars()}
    assert "admins" in targets

    sandbox.balance_usd = per_hour * 100                 # a top-up: 100 h, the warning re-arms
    assert await service.warn_low_balances() == []
    sandbox.balance_usd = Decimal(0)
    again = await service.warn_low_balances()
    assert len(again) == 1 and "nothing is left" in again[0]
    assert len(_notices(service)) == 4


async def test_no_warning_while_the_balance_lasts_more_than_a_day(service: GpuService, sandbox: SandboxProvider
                                                                  ) -> None:
    admin = service.local_actor()
    await service.boot(admin, "budget", wait=True)
    per_hour = (await service.costs(admin)).run_rate.per_hour
    sandbox.balance_usd = per_hour * Decimal("24.5")
    assert await service.warn_low_balances() == []
    sandbox.balance_usd = None                           # no balance at all: nothing to warn about
    assert await service.warn_low_balances() == []
    assert _notices(service) == []


async def test_the_vast_credit_warns_when_its_machines_burn_it_within_a_day(both: GpuService, fake: FakeVast) -> None:
    admin = both.local_actor()
    await both.boot(admin, "budget", provider="vast")
    vast = {b.provider: b for b in (await both.costs(admin)).balances}["vast"]
    assert vast.run_rate > 0 and vast.balance == Decimal("25")
    fake.user["credit"] = float(vast.run_rate * 20)      # twenty hours at the rate billed there
    sent = await both.warn_low_balances()
    assert len(sent) == 1 and sent[0].startswith("vast.ai balance is $") and "runs out in about 20 h" in sent[0]
    assert await both.warn_low_balances() == []


async def test_costs_shows_the_balance_beside_the_spend(both: GpuService) -> None:
    admin = both.local_actor()
    await both.boot(admin, "budget", provider="sandbox", wait=True)
    report = await both.costs(admin)
    balances = {b.provider: b for b in report.balances}
    assert balances["vast"].balance == Decimal("25") and balances["sandbox"].balance == Decimal("40")
    sb = balances["sandbox"]
    assert sb.run_rate == report.run_rate.per_hour and sb.hours_left == hours_left(Decimal("40"), sb.run_rate)
    reply = await dispatch(Context(service=both, actor=admin), "/gpu costs")
    fields = {f.label: f.value for f in reply.fields}
    assert fields["vast balance"] == "$25.00"
    assert fields["sandbox balance"].startswith("$40.00 · lasts ") and fields["sandbox balance"].endswith("/h")


async def test_viewers_see_providers_as_they_see_costs(service: GpuService, admin: Actor) -> None:
    await service.set_user(admin, "slack:V1", role="viewer", team="ml")
    viewer = service.actor("slack:V1", source="slack")
    assert (await service.provider_overview(viewer)).providers[0].credentials == "ok"
    reply = await dispatch(Context(service=service, actor=viewer), "/gpu providers")
    assert reply.level != "error" and reply.tables


async def test_the_scheduler_leader_runs_the_balance_check(service: GpuService, sandbox: SandboxProvider) -> None:
    admin = service.local_actor()
    await service.boot(admin, "budget", wait=True)
    sandbox.balance_usd = Decimal("0.01")
    scheduler = GuardScheduler(service)
    await scheduler.balance_tick()                       # not the leader: nothing asked, nothing sent
    assert _notices(service) == []
    scheduler.is_leader = True
    await scheduler.balance_tick()
    await scheduler.balance_tick()
    assert len(_notices(service)) == 2                   # admins + the team, once


def test_the_record_keeps_answers_errors_and_price_times_apart() -> None:
    clock = VirtualClock()
    health = ProviderHealth(clock)
    health.answered("vast")
    clock.advance(timedelta(minutes=5))
    health.failed("vast", RuntimeError("https://x/?api_key=SECRETSECRET"))
    seen = health.seen("vast")
    assert seen.answered_at is not None and seen.error is not None
    assert clock.now() - seen.answered_at == timedelta(minutes=5)
    assert seen.error.kind == "error" and "SECRETSECRET" not in seen.error.message
    assert health.seen("runpod").answered_at is None


def test_hours_left() -> None:
    assert hours_left(Decimal("25"), Decimal("0")) is None
    assert hours_left(Decimal("-1"), Decimal("1")) == 0
    assert hours_left(Decimal("10"), Decimal("0.4")) == Decimal("25.0")


async def test_a_hanging_provider_is_cut_off_at_the_time_limit_and_the_others_still_answer(
        settings: Settings, database: Database, clock: VirtualClock, sandbox: SandboxProvider, fake: FakeVast) -> None:
    import time

    sandbox.balance_usd = Decimal("7")
    quick = settings.model_copy(update={"provider_timeout_s": 0.3})
    svc = _service(quick, database, clock, sandbox=sandbox, vast=_vast(fake))
    fake.fault("user", "timeout", hang_s=2.0)
    try:
        began = time.monotonic()
        r = await svc.provider_overview(svc.local_actor())
        took = time.monotonic() - began
        by = {p.provider: p for p in r.providers}
        assert took < 1.5, f"the check took {took:.2f}s"
        assert by["vast"].credentials == "unknown"
        assert by["vast"].last_error is not None and by["vast"].last_error.kind == "timeout"
        assert by["sandbox"].credentials == "ok" and by["sandbox"].balance is not None
        assert by["sandbox"].balance.balance == Decimal("7")
    finally:
        await svc.providers.aclose()
