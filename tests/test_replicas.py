"""Two `gpuherd serve` replicas on one PostgreSQL (SPEC §9): both answer the API, exactly one
runs the guards; an instance gone idle is stopped exactly once; SIGTERM the leader and the
other takes over within seconds and runs the guards from then on.

The replicas share a data directory only because the simulated sandbox keeps its machines
there (it stands in for a cloud both replicas talk to); the guard lock is PostgreSQL's advisory
lock, named per test so concurrent tests on the same server never contend for it. Idleness is
made by moving an instance's last activity ten minutes back in the database (the smallest idle
window a boot may ask for is a minute, too long to wait for in a test)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, create_engine, text

from gpuherd.bot import cli
from tests.conftest import PG_SKIP, PG_URL, _pg_database
from tests.test_serve import Served, wait_for

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not PG_URL:
        pytest.skip(PG_SKIP)
    yield from _pg_database()


def _guards(servers: list[Served]) -> list[str]:
    return [s.ready().json()["guards"] for s in servers]


def _state(engine: Engine, iid: str) -> str:
    with engine.connect() as conn:
        return conn.execute(text("SELECT state FROM instances WHERE id = :i"), {"i": iid}).scalar_one()


def _stops(engine: Engine, iid: str) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT actor, event FROM audit_events WHERE instance_id = :i AND event = 'stop' ORDER BY id"), {"i": iid})]


def _boot(server: Served, key: str, idem: str, engine: Engine, known: set[str]) -> str:
    """Boot through the API (the `/gpu` grammar) and wait until the leader's readiness watcher
    says it runs; the new instance's id."""
    r = httpx.post(server.url + "/api/v1/commands", json={"text": "/gpu boot budget idle=1m warn=0m"},
                   headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem}, timeout=20)
    assert r.status_code == 200 and r.json()["level"] != "error", r.text
    with engine.connect() as conn:
        ids = {row[0] for row in conn.execute(text("SELECT id FROM instances WHERE owner = 'api:alice'"))}
    [iid] = ids - known
    wait_for(lambda: _state(engine, iid) == "running", 15, f"{iid} to be running")
    return iid


def _go_idle(engine: Engine, iid: str) -> None:
    """Last sign of life ten minutes ago, and the guards due now."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(text("UPDATE instances SET last_activity_at = :then, started_at = :then, guard_checked_at = :then,"
                          " next_guard_at = :due WHERE id = :i"),
                     {"then": now - timedelta(minutes=10), "due": now - timedelta(seconds=1), "i": iid})


def test_two_replicas_one_guard_leader_and_failover(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("GPUHERD_DATABASE_URL", pg_url)
    # in order, as the README says: migrate, make a key, start the servers
    assert cli.main(["db", "upgrade"]) == 0
    assert cli.main(["keys", "create", "--user", "api:alice", "--role", "member"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    env = {"GPUHERD_DATABASE_URL": pg_url, "GPUHERD_SECRET_KEY": Fernet.generate_key().decode(),
           "GPUHERD_GUARD_LOCK_NAME": f"test-{uuid.uuid4().hex[:12]}", "GPUHERD_GUARD_LEADER_RETRY_S": "0.5",
           "GPUHERD_GUARD_MAX_SLEEP_S": "1", "GPUHERD_POLL_INTERVAL_S": "0.2"}
    servers = [Served(home, "replica-a", **env), Served(home, "replica-b", **env)]
    engine = create_engine(pg_url)
    try:
        for s in servers:
            s.wait_healthy()
        # exactly one leads, and it stays that way
        wait_for(lambda: sorted(_guards(servers)) == ["running", "standby"], 10, "one leader and one standby")
        for _ in range(5):
            time.sleep(0.3)
            assert sorted(_guards(servers)) == ["running", "standby"]
        leader, standby = sorted(servers, key=lambda s: s.ready().json()["guards"] != "running")
        assert all(s.ready().status_code == 200 for s in servers)            # a standby is ready too

        # both answer the API
        for s in servers:
            r = httpx.post(s.url + "/api/v1/commands", json={"text": "/gpu status"},
                           headers={"Authorization": f"Bearer {key}"}, timeout=10)
            assert r.status_code == 200 and r.json()["level"] != "error", r.text

        # boot through the standby; the leader's watcher sees it ready, its guards stop it once
        first = _boot(standby, key, "boot-1", engine, set())
        _go_idle(engine, first)
        wait_for(lambda: _state(engine, first) == "stopped", 10, f"{first} to be stopped as idle")
        time.sleep(2)                                  # passes of both replicas' schedulers
        assert _stops(engine, first) == [("system:idle", "stop")]

        # SIGTERM the leader: it exits 0 and the standby runs the guards within seconds
        code, took = leader.terminate()
        assert code == 0 and took < 10, leader.text()
        began = time.monotonic()
        wait_for(lambda: _guards([standby]) == ["running"], 5, "the standby to take over the guards")
        takeover = time.monotonic() - began
        assert takeover < 5

        # the new leader runs the guards: a second idle instance is stopped, once, and the first
        # one is not stopped again
        second = _boot(standby, key, "boot-2", engine, {first})
        _go_idle(engine, second)
        wait_for(lambda: _state(engine, second) == "stopped", 10, f"{second} to be stopped as idle")
        time.sleep(1.5)
        assert _stops(engine, second) == [("system:idle", "stop")]
        assert _stops(engine, first) == [("system:idle", "stop")]
        with engine.connect() as conn:
            notices = conn.execute(text("SELECT instance_id, count(*) FROM notices WHERE kind = 'guard.idle'"
                                        " GROUP BY instance_id")).all()
        assert sorted(notices) == sorted([(first, 1), (second, 1)])
        assert standby.terminate()[0] == 0
        for s in servers:
            assert "Traceback" not in s.text() and key not in s.text()
    finally:
        for s in servers:
            s.stop()
        engine.dispose()
