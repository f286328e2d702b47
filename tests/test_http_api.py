"""The REST API over real HTTP: uvicorn serving `create_app` on a loopback port in a thread,
with the core's Runtime in the lifespan (readiness watcher, guards) as `gpuherd serve` runs it,
on SQLite and on PostgreSQL, with the sandbox provider at time scale 0 (instant boots).

What is checked: search (query language plus structured filters), templates, a boot whose
`Idempotency-Key` is sent twice (one machine), start, stop, destroy through the confirmation
flow and with `confirmed=true`, cancel, keep, the activity ping, per-instance cost, costs,
statistics, audit paging, users, budgets and keys; and the refusals: no key (401), a viewer's
boot (403, nothing changed in the database), a bad body (422 naming the field), core's own
input checks (400 with core's message), an unknown instance (404), the rate limit (429 with
`Retry-After`). Every error must be an RFC 9457 problem detail."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gpuherd.bot.http.routes_api import search_text
from gpuherd.core.models import Activity, ApiKeyRecord, AuditEvent, Budget, Instance, User
from tests.live_server import LiveServer, start_live, stop_live

PROBLEM = "application/problem+json"
COUNTED = (Instance, Budget, User, ApiKeyRecord)


Live = LiveServer


@pytest.fixture
def live(tmp_path: Path, db_url: str) -> Iterator[LiveServer]:
    server = start_live(tmp_path, db_url)
    try:
        yield server
    finally:
        stop_live(server)


def assert_problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert {"type", "title", "status", "detail", "code"} <= body.keys()
    assert body["status"] == status and body["type"].endswith(body["code"])
    assert "Traceback" not in r.text
    if code:
        assert body["code"] == code, body
    return body


def boot(c: httpx.Client, template: str = "budget", key: str | None = None, **body: Any) -> dict[str, Any]:
    r = c.post("/instances", json={"template": template, **body},
               headers={"Idempotency-Key": key} if key else {})
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer["instance"]["state"] in ("pending", "loading", "running") and answer["operation_id"]
    # the answer comes before the provider's (a detached order): wait until it has a machine
    answer["instance"] = wait_ordered(c, answer["instance"]["id"])
    return answer


def wait_ordered(c: httpx.Client, instance_id: str, timeout: float = 15) -> dict[str, Any]:
    """Poll the instance until the provider has accepted (or refused) the order."""
    deadline = time.monotonic() + timeout
    while True:
        view = c.get(f"/instances/{instance_id}").json()
        if view["state"] != "pending" or time.monotonic() > deadline:
            return view
        time.sleep(0.02)


def wait_ready(c: httpx.Client, instance_id: str, timeout: float = 15) -> dict[str, Any]:
    """Poll the instance until the readiness watcher has seen its health check pass."""
    deadline = time.monotonic() + timeout
    while True:
        view = c.get(f"/instances/{instance_id}").json()
        if view["ready"] or time.monotonic() > deadline:
            return view
        time.sleep(0.05)


# --- offers and templates -------------------------------------------------------------------------

def test_search_text_appends_structured_filters_as_clauses() -> None:
    assert search_text("") == ""
    assert search_text(" 4090 ", num_gpus=2, max_dph=Decimal("0.50"), min_gpu_ram=Decimal("24"),
                       provider="sandbox", gpu="A100_80GB") == \
        "4090 gpu=A100_80GB gpu_ram>=24 dph<=0.5 num_gpus=2 provider=sandbox"


def test_search_with_query_language_and_filters(live: Live) -> None:
    with live.client("viewer") as c:
        r = c.get("/offers", params={"q": "-o dph", "num_gpus": 1, "max_dph": "2.5", "limit": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["kind"] == "search" and body["providers"] == ["sandbox"] and body["simulated"]
        offers = [o["offer"] for o in body["offers"]]
        assert 0 < len(offers) <= 5
        prices = [Decimal(o["dph"]) for o in offers]   # money is a decimal string, never a float
        assert all(isinstance(o["dph"], str) for o in offers)
        assert prices == sorted(prices) and all(p <= Decimal("2.5") for p in prices)
        assert all(o["num_gpus"] == 1 for o in offers)
        assert "dph<=2.5" in body["query"]
        if body["next_cursor"]:
            page2 = c.get("/offers", params={"q": "-o dph", "num_gpus": 1, "max_dph": "2.5", "limit": 5,
                                             "cursor": body["next_cursor"]}).json()
            assert {o["offer"]["offer_id"] for o in page2["offers"]}.isdisjoint({o["offer_id"] for o in offers})
        # a query core cannot parse: 400 with core's message naming the token
        bad = assert_problem(c.get("/offers", params={"q": "gpu_ram>>=lots"}), 400, "bad_query")
        assert "gpu_ram" in bad["detail"] or "lots" in bad["detail"]
        # a filter outside its bounds never reaches core: 422 naming it
        body = assert_problem(c.get("/offers", params={"num_gpus": 0}), 422, "validation")
        assert body["errors"][0]["field"] == "query.num_gpus"
        assert_problem(c.get("/offers", params={"gpu": "4090 dph<9"}), 422, "validation")  # no clause injection


def test_templates(live: Live) -> None:
    with live.client("viewer") as c:
        listed = c.get("/templates").json()
        names = [t["name"] for t in listed["templates"]]
        assert listed["kind"] == "templates" and "budget" in names
        one = c.get("/templates/budget").json()
        assert one["kind"] == "template" and one["summary"]["name"] == "budget" and one["actions"] == []
        assert_problem(c.get("/templates/nope"), 404, "not_found")
    with live.client("alice") as c:  # a member gets the Boot action
        assert [a["op"] for a in c.get("/templates/budget").json()["actions"]] == ["boot"]


# --- instances ----------------------------------------------------------------------------------

def test_boot_with_the_same_idempotency_key_twice_is_one_machine(live: Live) -> None:
    with live.client("alice") as c:
        first = c.post("/instances", json={"template": "budget"}, headers={"Idempotency-Key": "nb-42:boot"})
        again = c.post("/instances", json={"template": "budget"}, headers={"Idempotency-Key": "nb-42:boot"})
        assert first.status_code == again.status_code == 202
        a, b = first.json(), again.json()
        assert a["kind"] == "boot" and a["operation_id"] and not a["replayed"]
        assert b["replayed"] and b["instance"]["id"] == a["instance"]["id"]
        assert first.headers["location"] == f"/api/v1/instances/{a['instance']['id']}"
        assert isinstance(a["instance"]["dph"], str) and Decimal(a["instance"]["dph"]) > 0
        # the same key for another request is a conflict, not a second machine
        assert_problem(c.post("/instances", json={"template": "research"}, headers={"Idempotency-Key": "nb-42:boot"}),
                       409, "conflict")
    assert live.counts()["instances"] == 1
    with live.client("bob") as c:   # someone else's key reveals nothing
        assert_problem(c.post("/instances", json={"template": "budget"}, headers={"Idempotency-Key": "nb-42:boot"}),
                       403, "forbidden")
    assert live.counts()["instances"] == 1


def test_stop_start_keep_activity_cost_and_destroy(live: Live) -> None:
    with live.client("alice") as c:
        booted = boot(c)
        iid = booted["instance"]["id"]
        view = wait_ready(c, iid)
        assert view["ready"] and view["state"] == "running"

        ping = c.post(f"/instances/{iid}/activity", json={"source": "gateway", "detail": "3 requests"})
        assert ping.status_code == 200 and ping.json()["kind"] == "activity"
        with live.service.db.session() as s:
            rows = list(s.execute(select(Activity).where(Activity.instance_id == iid)).scalars())
            assert [(a.source, a.detail) for a in rows] == [("gateway", "3 requests")]
        assert c.post(f"/instances/{iid}/activity").status_code == 200        # the body is optional

        kept = c.post(f"/instances/{iid}/keep", json={"duration": "2h"}).json()
        assert kept["kind"] == "keep" and kept["until"] > view["created_at"]
        assert_problem(c.post(f"/instances/{iid}/keep", json={"duration": "30d"}), 400, "invalid_input")

        stopped = c.post(f"/instances/{iid}/stop", headers={"Idempotency-Key": "stop-1"})
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["instance"]["state"] == "stopped" and "session_cost" in stopped.json()
        again = c.post(f"/instances/{iid}/stop", headers={"Idempotency-Key": "stop-1"})
        assert again.json() == stopped.json()                      # the first answer, once
        assert_problem(c.post(f"/instances/{iid}/stop"), 409, "conflict")

        started = c.post(f"/instances/{iid}/start", headers={"Idempotency-Key": "start-1"})
        assert started.status_code == 202 and started.json()["kind"] == "start"
        assert started.json()["operation_id"]
        assert wait_ready(c, iid)["ready"]

        cost = c.get(f"/instances/{iid}/cost").json()
        assert cost["kind"] == "instance_cost" and Decimal(cost["total"]) >= 0
        assert Decimal(cost["hourly"]["per_day"]) == Decimal(cost["hourly"]["per_hour"]) * 24

        asked = c.post(f"/instances/{iid}/destroy")
        assert asked.status_code == 200 and asked.json()["kind"] == "confirmation"
        question = asked.json()
        assert question["reason"] == "destroy" and question["instance_id"] == iid
        assert c.get(f"/instances/{iid}").json()["state"] == "running"   # nothing happened yet
        with live.client("bob") as other:   # a token is bound to who was asked
            assert other.post(f"/confirmations/{question['token']}").status_code in (403, 404)
        done = c.post(f"/confirmations/{question['token']}")
        assert done.status_code == 200 and done.json()["kind"] == "destroy"
        assert done.json()["instance"]["state"] == "destroyed"
        assert c.post(f"/confirmations/{question['token']}").json() == done.json()   # the same yes twice
        assert_problem(c.post(f"/instances/{iid}/destroy"), 409, "conflict")

        # cancel: the question closes and the machine stays; confirmed=true destroys at once
        second = boot(c)["instance"]["id"]
        wait_ready(c, second)   # a destroy racing the readiness watcher's own update is a 409 (retry)
        token = c.post(f"/instances/{second}/destroy").json()["token"]
        cancelled = c.delete(f"/confirmations/{token}")
        assert cancelled.status_code == 200 and cancelled.json()["kind"] == "cancelled"
        assert c.post(f"/confirmations/{token}").status_code in (404, 409)
        assert c.get(f"/instances/{second}").json()["state"] not in ("destroyed", "destroying")
        now = c.post(f"/instances/{second}/destroy", params={"confirmed": "true"})
        assert now.status_code == 200, now.text
        assert now.json()["kind"] == "destroy"

        listed = c.get("/instances", params={"include_ended": "true", "refresh": "false"}).json()
        assert listed["kind"] == "status" and listed["total"] == 2
        assert c.get("/instances").json()["total"] == 0    # ended ones only when asked


def test_instance_paging(live: Live) -> None:
    with live.client("alice") as c:
        ids = {boot(c, key=f"page-{i}")["instance"]["id"] for i in range(3)}
        first = c.get("/instances", params={"limit": 2}).json()
        assert first["total"] == 3 and len(first["instances"]) == 2 and first["next_cursor"]
        rest = c.get("/instances", params={"limit": 2, "cursor": first["next_cursor"]}).json()
        assert len(rest["instances"]) == 1 and rest["next_cursor"] is None
        assert {v["id"] for v in first["instances"] + rest["instances"]} == ids
        assert_problem(c.get("/instances", params={"cursor": "garbage"}), 400, "invalid_input")


# --- money, statistics, audit, administration ----------------------------------------------------

def test_costs_statistics_and_audit_paging(live: Live) -> None:
    with live.client("alice") as c:
        a = boot(c, "budget")["instance"]
        b = boot(c, "research")["instance"]
        c.post(f"/instances/{b['id']}/stop")
    with live.client("viewer") as c:
        costs = c.get("/costs", params={"period": "month", "by": "template"})
        assert costs.status_code == 200, costs.text
        report = costs.json()
        assert report["kind"] == "costs" and report["group_by"] == "template"
        assert {g["key"] for g in report["groups"]} <= {"budget", "research"}
        assert Decimal(report["run_rate"]["per_hour"]) >= Decimal(a["dph"])
        assert_problem(c.get("/costs", params={"period": "yesterday"}), 400, "invalid_input")
        assert_problem(c.get("/costs", params={"by": "colour"}), 422, "validation")

        stats = c.get("/statistics").json()
        assert stats["kind"] == "statistics"
        assert (stats["total"], stats["active"], stats["stopped"], stats["destroyed"]) == (2, 1, 1, 0)
        assert Decimal(stats["average_dph"]) == Decimal(a["dph"])
        assert {g["key"]: g["count"] for g in stats["by_state"]} == {"running": 1, "stopped": 1} or \
            {g["key"]: g["count"] for g in stats["by_state"]}.get("stopped") == 1
        assert [g["key"] for g in stats["by_provider"]] == ["sandbox"]
        assert_problem(c.get("/audit"), 403, "forbidden")       # the audit log is for admins
    with live.client("admin") as c:
        whole = c.get("/audit", params={"limit": 500}).json()["events"]
        assert len(whole) >= 3
        seen: list[int] = []
        cursor = None
        while True:
            page = c.get("/audit", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            assert len(page["events"]) <= 2
            seen += [e["id"] for e in page["events"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == [e["id"] for e in whole] and seen == sorted(seen, reverse=True)
        only_b = c.get("/audit", params={"instance": b["id"]}).json()["events"]
        assert only_b and {e["instance_id"] for e in only_b} == {b["id"]}
        assert_problem(c.get("/audit", params={"cursor": "zzz"}), 400, "invalid_input")


def test_users_budgets_and_keys(live: Live) -> None:
    with live.client("admin") as c:
        assert {"api:alice", "api:viewer"} <= {u["principal"] for u in c.get("/users").json()}
        changed = c.put("/users/api:carol", json={"role": "viewer", "team": "ml"})
        assert changed.status_code == 200 and changed.json() == {"kind": "user", "principal": "api:carol",
                                                                   "role": "viewer", "team": "ml"}
        assert_problem(c.put("/users/api:carol", json={"role": "owner"}), 422, "validation")

        budget = c.put("/budgets/team/ml", json={"amount": "500", "hard_cap": True})
        assert budget.status_code == 200, budget.text
        assert budget.json()["changed"]["limit"] == "500" and budget.json()["changed"]["hard_cap"] is True
        assert c.put("/budgets/user/api:alice", json={"amount": 120.5}).json()["changed"]["limit"] == "120.5"
        assert_problem(c.put("/budgets/team/ml", json={"amount": "12.345"}), 400, "invalid_input")  # whole cents
        assert_problem(c.put("/budgets/team/ml", json={"amount": "-3"}), 422, "validation")
        assert_problem(c.put("/budgets/galaxy/ml", json={"amount": "3"}), 422, "validation")
        assert {(u["scope"], u["name"]) for u in c.get("/budgets").json()["budgets"]} == \
            {("team", "ml"), ("user", "api:alice")}
        cleared = c.delete("/budgets/team/ml").json()
        assert [(u["scope"], u["name"]) for u in cleared["budgets"]] == [("user", "api:alice")]

        made = c.post("/keys", json={"principal": "api:carol", "name": "dashboard"})
        assert made.status_code == 201 and made.headers["cache-control"] == "no-store"
        created = made.json()
        assert created["kind"] == "key.created" and created["key"].startswith("ghk_")
        secret, key_id = created["key"], created["view"]["id"]
        listed = c.get("/keys")
        assert key_id in {k["id"] for k in listed.json()} and secret not in listed.text
    with httpx.Client(base_url=live.url + "/api/v1", headers={"X-API-Key": secret}) as carol:
        assert carol.get("/instances").status_code == 200          # X-API-Key works as well as Bearer
        assert_problem(carol.post("/instances", json={"template": "budget"}), 403, "forbidden")
    with live.client("admin") as c:
        revoked = c.delete(f"/keys/{key_id}").json()
        assert revoked["revoked_at"] is not None and secret not in str(revoked)
        assert_problem(c.delete("/keys/knothere"), 404, "not_found")
    with httpx.Client(base_url=live.url + "/api/v1", headers={"Authorization": f"Bearer {secret}"}) as carol:
        assert_problem(carol.get("/instances"), 401, "unauthenticated")
    with live.client("alice") as c:   # members may not administer
        for r in (c.get("/users"), c.get("/keys"), c.put("/budgets/team/ml", json={"amount": 5}),
                  c.post("/keys", json={"principal": "api:alice", "role": "admin"})):
            assert_problem(r, 403, "forbidden")


# --- refusals ---------------------------------------------------------------------------------

def test_no_key_bad_key_and_viewer_boot_change_nothing(live: Live) -> None:
    before = live.counts()
    with live.client(None) as c:
        body = assert_problem(c.get("/instances"), 401, "unauthenticated")
        assert "API key" in body["detail"]
        assert_problem(c.post("/instances", json={"template": "budget"}), 401, "unauthenticated")
        # a body that is not JSON is refused before FastAPI runs the key check: still 401, and
        # nothing of what was wrong with the body is told to a caller without a key
        junk = assert_problem(c.post("/instances", content=b"{not json", headers={"content-type": "application/json"}),
                              401, "unauthenticated")
        assert "errors" not in junk
        assert_problem(c.put("/users/api:carol", json={"role": "owner"}), 401, "unauthenticated")
    with live.client(None, Authorization="Bearer not-a-key") as c:
        assert_problem(c.get("/instances"), 401, "unauthenticated")
        assert_problem(c.post("/instances", content=b"[", headers={"content-type": "application/json"}), 401)
    with live.client(None, Authorization="Bearer ghk_k00000000_" + "A" * 43) as c:   # the right shape, unknown
        assert_problem(c.get("/statistics"), 401, "unauthenticated")
    with live.client("viewer") as c:
        denied = assert_problem(c.post("/instances", json={"template": "budget"},
                                       headers={"Idempotency-Key": "viewer-1"}), 403, "forbidden")
        assert "viewer" in denied["detail"]
        assert c.get("/instances").status_code == 200
    assert live.counts() == before
    with live.service.db.session() as s:   # and no boot was recorded as done
        assert not list(s.execute(select(AuditEvent).where(AuditEvent.event == "boot")).scalars())


def test_bad_bodies_name_the_field_and_unknown_ids_are_404(live: Live) -> None:
    with live.client("alice") as c:
        missing = assert_problem(c.post("/instances", json={}), 422, "validation")
        assert [e["field"] for e in missing["errors"]] == ["body.template"] and "body.template" in missing["detail"]
        typo = assert_problem(c.post("/instances", json={"template": "budget", "overides": {}}), 422)
        assert "body.overides" in [e["field"] for e in typo["errors"]]
        huge = assert_problem(c.post("/instances", json={"template": "x" * 100_000}), 422)
        assert huge["errors"][0]["field"] == "body.template" and len(c.get("/templates").text) < 100_000
        assert_problem(c.post("/instances", json={"template": "budget", "overrides": {"max_model_len": 5}}), 422)
        assert_problem(c.post("/instances", content=b"{not json", headers={"content-type": "application/json"}),
                       422, "validation")
        assert_problem(c.post("/instances", json={"template": "budget"}, headers={"Idempotency-Key": "a b"}), 422)
        # core's own checks: 400 with core's message
        bad = assert_problem(c.post("/instances", json={"template": "budget",
                                                        "overrides": {"max_model_len": "lots"}}), 400)
        assert "max_model_len" in bad["detail"]
        unknown = assert_problem(c.post("/instances", json={"template": "budgte"}), 404, "not_found")
        assert "budgte" in unknown["detail"]
        for r in (c.get("/instances/g-0000"), c.post("/instances/g-0000/stop"), c.get("/instances/g-0000/cost"),
                  c.post("/instances/g-0000/activity")):
            assert_problem(r, 404, "not_found")
        assert_problem(c.post("/confirmations/c_nothing"), 422, "validation")         # not a token's shape
        assert_problem(c.post("/confirmations/c_" + "A" * 24), 404, "not_found")      # no such question
        assert_problem(c.get("/nothing-here"), 404, "not_found")
        assert_problem(c.get("/instances", params={"limit": 0}), 422, "validation")
    assert live.counts()["instances"] == 0


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path, db_url: str) -> None:
    live = start_live(tmp_path, db_url, api_burst=3, api_rate_per_minute=1)
    try:
        with live.client("viewer") as c:
            codes = [c.get("/templates").status_code for _ in range(3)]
            assert codes == [200, 200, 200]
            refused = c.get("/templates")
            body = assert_problem(refused, 429, "too_many_requests")
            assert int(refused.headers["retry-after"]) >= 1 and "try again" in body["detail"]
        with live.client("alice") as c:    # the limit is per key
            assert c.get("/templates").status_code == 200
    finally:
        stop_live(live)


def test_a_key_still_works_once_its_cached_resolution_expires(live: Live) -> None:
    """A key is looked up again after `keys.CACHE_S`; its stored `last_used_at` (naive when
    SQLite reads it back) must compare with now, not fail the request with a 500."""
    with live.client("viewer") as c:
        assert c.get("/statistics").status_code == 200      # resolves the key, writes last_used_at
        live.service.keys._cache.clear()                   # as if CACHE_S had passed
        again = c.get("/statistics")
        assert again.status_code == 200, again.text
    with live.client("admin") as c:
        viewer = next(k for k in c.get("/keys").json() if k["principal"] == "api:viewer")
        assert datetime.fromisoformat(viewer["last_used_at"]).utcoffset() == timedelta(0)   # with its offset
