"""`GET /metrics` on the app over a real service (SQLite and PostgreSQL, the sandbox, a virtual
clock): parsed with prometheus-client's own text parser, every figure compared with the database
or with the core's own reports; `promtool check metrics` where Debian's `prometheus` package is
installed. Requests go through httpx's ASGI transport (the app's middleware and routes as served;
no socket is needed to read an exposition)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import func, select

from gpuherd.bot.http.app import create_app
from gpuherd.bot.http.metrics import observe, status_class
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.errors import (
    AuthError,
    CapacityError,
    NotFound,
    ProviderStateError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from gpuherd.core.guards import Guards
from gpuherd.core.lifecycle import BILLED_AS_COMPUTE
from gpuherd.core.models import Instance, InstanceState, NoticeDelivery
from gpuherd.core.money import from_micros
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.results import BootResult
from gpuherd.core.service import GpuService
from gpuherd.core.telemetry import TELEMETRY, Telemetry, outcome_of
from gpuherd.core.templates import TemplateCatalog

INSTANCE_ROUTE = "/api/v1/instances/{instance_id}"


def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.fixture
async def client(service) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(service)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gpuherd.test") as c:
        yield c


async def _scrape(client: httpx.AsyncClient) -> tuple[str, dict[str, list[Sample]], dict[str, str]]:
    """The text, the samples of each family and each family's type."""
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(r.text))
    return r.text, {f.name: f.samples for f in families}, {f.name: f.type for f in families}


def _value(samples: list[Sample], name: str | None = None, **labels: str) -> float:
    hits = [s.value for s in samples if s.labels == labels and (name is None or s.name == name)]
    assert len(hits) == 1, (labels, samples)
    return hits[0]


def _calls(families: dict[str, list[Sample]], provider: str, kind: str) -> float:
    return _value(families["gpuherd_provider_calls"], "gpuherd_provider_calls_total", provider=provider, kind=kind)


async def _boot(service, actor, template: str = "budget") -> str:
    r = await service.boot(actor, template, wait=True)
    assert isinstance(r, BootResult)
    return r.instance.id


async def test_metrics_match_the_database_and_the_core(service, admin, member, client, clock, sandbox):
    # state: two running (two teams), one stopped, one destroyed; an hour of billing; a team budget
    keep = await _boot(service, admin)
    theirs = await _boot(service, member)
    stopped = await _boot(service, admin)
    gone = await _boot(service, admin)
    await service.stop(admin, stopped)
    await service.destroy(admin, gone, confirmed=True)
    await service.set_budget(admin, "team", "ml", "100")
    clock.advance(3600)
    created = await service.create_key(admin, "api:alice", role="member")

    _, before, _ = await _scrape(client)

    # provider calls: a rate-limited search attempt, then its retry; a create refused for capacity
    sandbox.inject("rate_limit", on="search")
    await service.search(admin, "")
    sandbox.inject("capacity", on="create")
    try:
        await service.boot(admin, "budget", wait=True)
    except CapacityError:
        pass

    # guard passes: one blind (the provider does not answer), one that acts (30 min idle: a stop)
    guards = Guards(service, http=httpx.AsyncClient(transport=httpx.MockTransport(_refuse)))
    try:
        sandbox.inject("unavailable", count=1000, on="list")
        blind = await guards.run_pass()
        sandbox.clear_faults()
        clock.advance(120)
        acting = await guards.run_pass()
    finally:
        await guards.aclose()
    assert blind.blind >= 1 and acting.acted >= 1

    # HTTP: a templated route with an id (unauthenticated and authenticated), an unmatched path
    assert (await client.get(f"/api/v1/instances/{keep}")).status_code == 401
    ok = await client.get(f"/api/v1/instances/{keep}", headers={"Authorization": f"Bearer {created.key}"})
    assert ok.status_code == 200, ok.text
    assert (await client.get("/no/such/i-secret42")).status_code == 404
    assert (await client.get("/health")).status_code == 200

    text, after, types = await _scrape(client)
    assert all(name.startswith("gpuherd_") for name in after)

    # nothing unbounded or secret in the text: no instance id, no key, no raw path
    assert created.key not in text and "i-secret42" not in text and "api:alice" not in text
    with service.db.session() as s:
        rows = list(s.execute(select(Instance)).scalars())
        pending = dict(s.execute(select(NoticeDelivery.surface, func.count()).where(
            NoticeDelivery.delivered_at.is_(None), NoticeDelivery.gave_up_at.is_(None))
            .group_by(NoticeDelivery.surface)).all())
    assert {keep, theirs, stopped, gone} <= {r.id for r in rows}
    assert not any(r.id in text for r in rows)

    # instances by state and provider: exactly the database's counts, zeros for the rest
    assert types["gpuherd_instances"] == "gauge"
    for st in InstanceState:
        expected = sum(1 for r in rows if r.state == st.value and r.provider == "sandbox")
        assert _value(after["gpuherd_instances"], state=st.value, provider="sandbox") == expected
    assert _value(after["gpuherd_instances"], state="running", provider="sandbox") >= 1
    assert _value(after["gpuherd_instances"], state="stopped", provider="sandbox") >= 1

    # $/h billed now: compute of every machine up plus storage of stopped ones, from the rows
    billed = sum((from_micros(r.dph_micros) if r.state_enum in BILLED_AS_COMPUTE
                  else from_micros(r.storage_dph_micros) if r.state_enum is InstanceState.STOPPED
                  else Decimal(0)) for r in rows)
    assert billed > 0
    assert _value(after["gpuherd_running_dollars_per_hour"]) == pytest.approx(float(billed), rel=1e-9)

    # this month's spend per team and team budget use: the cost report's own figures
    report = await service.costs(admin, by="team")
    assert {g.key for g in report.groups} >= {"ml"}
    for g in report.groups:
        assert _value(after["gpuherd_month_spend_dollars"], team=g.key) == pytest.approx(float(g.amount), rel=1e-9)
    [ml] = [b for b in (await service.budgets(admin)).budgets if b.name == "ml"]
    assert ml.spent > 0
    assert _value(after["gpuherd_budget_used_ratio"], team="ml") == pytest.approx(float(ml.spent / ml.limit))
    assert _value(after["gpuherd_budget_limit_dollars"], team="ml") == 100.0

    # notices not yet delivered (no deliverer runs here): the database's count per surface
    assert pending.get("shell", 0) > 0
    assert _value(after["gpuherd_notices_pending"], surface="shell") == pending["shell"]

    # provider calls: the injected faults and the retries that followed, by kind
    assert _calls(after, "sandbox", "rate_limited") - _calls(before, "sandbox", "rate_limited") == 1
    assert _calls(after, "sandbox", "capacity") - _calls(before, "sandbox", "capacity") >= 1
    assert _calls(after, "sandbox", "unavailable") - _calls(before, "sandbox", "unavailable") >= 4  # 4 attempts
    assert _calls(after, "sandbox", "ok") - _calls(before, "sandbox", "ok") >= 3
    assert _calls(after, "sandbox", "auth") - _calls(before, "sandbox", "auth") == 0
    assert types["gpuherd_provider_calls"] == "counter"

    # guard passes: two more, their duration, the acted count, and the last pass's blind guards
    passes = after["gpuherd_guard_pass_seconds"]
    assert (_value(passes, "gpuherd_guard_pass_seconds_count") - _value(
        before["gpuherd_guard_pass_seconds"], "gpuherd_guard_pass_seconds_count")) == 2
    grew = (_value(passes, "gpuherd_guard_pass_seconds_sum")
            - _value(before["gpuherd_guard_pass_seconds"], "gpuherd_guard_pass_seconds_sum"))
    assert grew == pytest.approx((blind.elapsed_ms + acting.elapsed_ms) / 1000, rel=1e-6)
    assert _value(after["gpuherd_guard_last_pass_seconds"]) == pytest.approx(acting.elapsed_ms / 1000)
    acted_before = _value(before["gpuherd_guard_acted"]) if "gpuherd_guard_acted" in before else 0
    assert _value(after["gpuherd_guard_acted"], "gpuherd_guard_acted_total") - acted_before == acting.acted
    # the last pass could check everything again
    assert _value(after["gpuherd_guards_blind"], reason="provider_unreachable") == acting.blind == 0

    # HTTP latency by route template, method and status class
    assert types["gpuherd_http_request_duration_seconds"] == "histogram"
    hist = after["gpuherd_http_request_duration_seconds"]
    counts = {(s.labels["route"], s.labels["method"], s.labels["status_class"]): s.value for s in hist
              if s.name == "gpuherd_http_request_duration_seconds_count"}
    assert counts[(INSTANCE_ROUTE, "GET", "4xx")] == 1
    assert counts[(INSTANCE_ROUTE, "GET", "2xx")] == 1
    assert counts[("unmatched", "GET", "4xx")] == 1
    assert counts[("/health", "GET", "2xx")] == 1
    assert counts[("/metrics", "GET", "2xx")] == 1         # the first scrape, seen by the second
    assert {route for route, _, _ in counts} <= {INSTANCE_ROUTE, "unmatched", "/health", "/metrics"}
    assert _value(after["gpuherd_database_up"]) == 1


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian's `prometheus` package provides it; .ci/run installs it)")
async def test_promtool_accepts_the_exposition(service, admin, member, client, clock, sandbox):
    """Every family kind present (gauges with labels, counters, a summary, a histogram, budgets,
    guard figures), checked by Prometheus' own linter."""
    await _boot(service, member)
    await service.set_budget(admin, "team", "ml", "50")
    clock.advance(600)
    guards = Guards(service, http=httpx.AsyncClient(transport=httpx.MockTransport(_refuse)))
    try:
        await guards.run_pass()
    finally:
        await guards.aclose()
    assert (await client.get("/health")).status_code == 200
    await client.get("/metrics")
    text, fams, _ = await _scrape(client)
    assert {"gpuherd_budget_used_ratio", "gpuherd_guard_last_pass_seconds", "gpuherd_instances",
            "gpuherd_http_request_duration_seconds"} <= set(fams)
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked.stdout + checked.stderr


async def test_blind_guards_and_a_registry_per_app(service, admin, clock, sandbox):
    """The blind gauge reports the last pass; each app counts its own requests."""
    await _boot(service, admin)
    clock.advance(600)
    first, second = create_app(service), create_app(service)
    guards = Guards(service, http=httpx.AsyncClient(transport=httpx.MockTransport(_refuse)))
    try:
        sandbox.inject("unavailable", count=1000, on="list")
        report = await guards.run_pass()
    finally:
        await guards.aclose()
    assert report.blind >= 1
    async with (httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://a") as a,
                httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://b") as b):
        for _ in range(3):
            assert (await a.get("/health")).status_code == 200
        _, fams, _ = await _scrape(b)
    assert _value(fams["gpuherd_guards_blind"], reason="provider_unreachable") == report.blind
    health = [s for s in fams["gpuherd_http_request_duration_seconds"] if s.labels.get("route") == "/health"]
    assert health == []                                   # app a's requests are not in app b's registry
    a_counts = first.state.metrics.latency.labels("/health", "GET", "2xx")
    assert a_counts._sum.get() > 0                        # ...they are in app a's


async def test_scrape_survives_a_database_that_does_not_answer(tmp_path, sandbox):
    """The in-process metrics still go out, with gpuherd_database_up 0 and no database figure."""
    settings = Settings(home=tmp_path / "home", database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
                        sandbox_time_scale=0)
    service = GpuService(settings, Database(settings.database_url), ProviderRegistry({"sandbox": sandbox}),
                         TemplateCatalog.load(None))
    app = create_app(service)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gpuherd.test") as c:
        text, fams, _ = await _scrape(c)
    assert _value(fams["gpuherd_database_up"]) == 0
    assert "gpuherd_instances" not in fams and "gpuherd_running_dollars_per_hour" not in fams
    assert _calls(fams, "sandbox", "ok") >= 0 and "nobody" not in text
    service.db.dispose()


@pytest.mark.parametrize(("exc", "kind"), [
    (None, "ok"), (RateLimited("p", "429"), "rate_limited"), (ProviderUnavailable("p", "503"), "unavailable"),
    (ProviderTimeout("p", "slow"), "timeout"), (TimeoutError(), "timeout"), (CapacityError("p", "gone"), "capacity"),
    (AuthError("p", "bad key"), "auth"), (ProviderStateError("p", "busy"), "error"), (NotFound("x"), "error"),
    (ValueError("bug"), "error"),
])
def test_outcome_kinds_come_from_core_error_codes(exc, kind):
    assert outcome_of(exc) == kind


async def test_counted_records_each_attempt_and_reraises():
    t = Telemetry()
    attempts = iter([ProviderUnavailable("p", "503"), None])

    async def call() -> str:
        err = next(attempts)
        if err is not None:
            raise err
        return "answer"
    counted = t.counted("p", call)
    with pytest.raises(ProviderUnavailable):
        await counted()
    assert await counted() == "answer"
    assert t.provider_calls() == {("p", "unavailable"): 1, ("p", "ok"): 1}
    assert TELEMETRY is not t


def test_labels_stay_bounded(service):
    app = create_app(service)
    observe(app, "unmatched", "BREW", 599, 0.01)
    observe(app, "/health", "get", 200, -1.0)     # a clock step never makes a negative sample
    samples = {tuple(sorted(s.labels.items())) for m in app.state.metrics.registry.collect()
               if m.name == "gpuherd_http_request_duration_seconds" for s in m.samples if s.name.endswith("_count")}
    assert samples == {(("method", "OTHER"), ("route", "unmatched"), ("status_class", "5xx")),
                       (("method", "GET"), ("route", "/health"), ("status_class", "2xx"))}
    assert [status_class(c) for c in (101, 204, 302, 404, 503, 42)] == ["1xx", "2xx", "3xx", "4xx", "5xx", "other"]
