"""Guard leadership (SPEC §9): a file lock for the embedded deployment, a PostgreSQL advisory lock
for replicas sharing one database. Cross-process tests start a real child that takes the lock,
SIGKILL it, and measure how long the parent needs to take over."""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PG_SKIP, PG_URL
from sqlalchemy import create_engine, text

from gpuherd.core.leader import (
    GUARDS_LOCK_KEY,
    FileLeadership,
    Leadership,
    PostgresAdvisoryLeadership,
    derive_key,
    guards_held_elsewhere,
    leadership_for,
)

REPO = Path(__file__).resolve().parents[1]
needs_pg = pytest.mark.skipif(not PG_URL, reason=PG_SKIP)


# ---------------------------------------------------------------- helpers

def _spawn_holder(setup: str) -> subprocess.Popen[str]:
    """A child that builds `lead` from `setup`, prints "<try_acquire> <holds>", then sleeps."""
    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from gpuherd.core.leader import FileLeadership, PostgresAdvisoryLeadership
        {setup}
        print(lead.try_acquire(), lead.holds(), flush=True)
        time.sleep(120)
    """).format(setup=setup)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _first_line(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        pytest.fail(f"child printed nothing in {timeout}s; stderr: {proc.stderr.read() if proc.stderr else ''}")
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(5)
        pytest.fail(f"child exited early; stderr: {proc.stderr.read() if proc.stderr else ''}")
    return line


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _kill_and_take_over(child: subprocess.Popen[str], lead: Leadership, limit_s: float) -> float:
    """SIGKILL the child, then poll try_acquire every 0.5 s; the seconds it took to take over."""
    child.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    child.wait(10)
    while True:
        if lead.try_acquire():
            return time.monotonic() - killed
        if time.monotonic() - killed > limit_s:
            pytest.fail(f"no takeover within {limit_s}s of SIGKILL: {lead.describe()}")
        time.sleep(0.5)


# ---------------------------------------------------------------- pure

def test_default_key_is_the_fixed_derivation_of_the_name() -> None:
    assert GUARDS_LOCK_KEY == derive_key("gpuherd-guards")
    assert -(2 ** 63) <= GUARDS_LOCK_KEY < 2 ** 63
    assert derive_key("gpuherd-guards") != derive_key("gpuherd-guards-2")


def test_leadership_for_picks_the_mechanism(tmp_path: Path) -> None:
    home = tmp_path / "home"
    sqlite = leadership_for(f"sqlite:///{home / 'gpuherd.db'}", home)
    assert isinstance(sqlite, FileLeadership)
    assert sqlite.path == home / "guards.lock"
    for url in ("postgresql+psycopg://u@db.invalid:5432/gpuherd", "postgresql://u@db.invalid/gpuherd",
                "postgres://u@db.invalid/gpuherd"):
        pg = leadership_for(url, home)   # constructing it must not connect
        assert isinstance(pg, PostgresAdvisoryLeadership), url
        assert pg.key == GUARDS_LOCK_KEY
        assert pg.url.drivername == "postgresql+psycopg"
        assert pg.describe().startswith(f"PostgreSQL advisory lock {GUARDS_LOCK_KEY} on db.invalid")
        assert "(not held" in pg.describe()


def test_guards_held_elsewhere_sees_another_holder_and_leaves_the_lock_free(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert guards_held_elsewhere(url, tmp_path) is False
    with FileLeadership(tmp_path / "guards.lock") as holder:
        assert holder.try_acquire()
        assert guards_held_elsewhere(url, tmp_path) is True
    with FileLeadership(tmp_path / "guards.lock") as after:
        assert after.try_acquire()          # the probe did not keep the lock


def test_postgres_key_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        PostgresAdvisoryLeadership("postgresql+psycopg://u@db.invalid/x", key=2 ** 63)


def test_unreachable_postgres_means_not_leader_quickly() -> None:
    # Port 1 on localhost refuses at once: no exception, just "not the leader", and a reason.
    lead = PostgresAdvisoryLeadership("postgresql+psycopg://postgres@127.0.0.1:1/test", key=1)
    started = time.monotonic()
    assert lead.try_acquire() is False
    assert lead.holds() is False
    assert time.monotonic() - started < 6
    assert "last error" in lead.describe()
    lead.release()   # harmless when nothing is held


# ---------------------------------------------------------------- file lock

def test_file_lock_two_instances_in_one_process_conflict(tmp_path: Path) -> None:
    path = tmp_path / "home" / "guards.lock"
    a, b = FileLeadership(path), FileLeadership(path)
    assert a.try_acquire() is True
    assert path.read_text().strip() == str(os.getpid())
    assert b.try_acquire() is False, "a second open()+flock in the same process must conflict"
    assert (a.holds(), b.holds()) == (True, False)
    assert a.try_acquire() is True   # already held: still True
    assert a.describe() == f"file lock {path} (held)"
    assert b.describe() == f"file lock {path} (not held)"
    a.release()
    assert a.holds() is False
    assert b.try_acquire() is True
    assert a.try_acquire() is False
    b.release()
    b.release()   # idempotent


def test_file_lock_lost_when_the_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "guards.lock"
    a, b = FileLeadership(path), FileLeadership(path)
    assert a.try_acquire()
    path.unlink()                    # someone cleans the data directory
    assert b.try_acquire() is True   # locks a fresh file at the same path
    assert a.holds() is False, "a must notice that its locked file is no longer the lock file"
    assert b.holds() is True
    b.release()


def test_file_lock_between_processes_and_takeover_after_sigkill(
        tmp_path: Path, children: list[subprocess.Popen[str]]) -> None:
    path = tmp_path / "guards.lock"
    child = _spawn_holder(f"lead = FileLeadership(Path({str(path)!r}))")
    children.append(child)
    assert _first_line(child) == "True True"
    mine = FileLeadership(path)
    assert mine.try_acquire() is False
    assert path.read_text().strip() == str(child.pid)
    took = _kill_and_take_over(child, mine, limit_s=5)
    print(f"\nfile lock takeover after SIGKILL: {took:.3f}s")
    assert took < 5
    assert mine.holds()
    mine.release()


# ---------------------------------------------------------------- PostgreSQL

@pytest.fixture
def pg_key() -> int:
    """A random key per test, so parallel runs and tests never contend for the same lock."""
    return random.randint(-(2 ** 63), 2 ** 63 - 1)


@pytest.fixture
def pg_leads() -> Iterator[list[PostgresAdvisoryLeadership]]:
    made: list[PostgresAdvisoryLeadership] = []
    yield made
    for lead in made:
        lead.close()


@pytest.mark.postgres
@needs_pg
def test_pg_only_one_of_two_in_process_acquires(pg_key: int, pg_leads: list[PostgresAdvisoryLeadership],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    assert PG_URL
    a, b = PostgresAdvisoryLeadership(PG_URL, key=pg_key), PostgresAdvisoryLeadership(PG_URL, key=pg_key)
    pg_leads += [a, b]
    with caplog.at_level(logging.INFO, logger="gpuherd.core.leader"):
        assert a.try_acquire() is True
    said = [r.getMessage() for r in caplog.records if "acquired" in r.getMessage()]
    assert said and "(held" in said[0], said     # the log line describes the lock as it now is
    assert b.try_acquire() is False
    assert (a.holds(), b.holds()) == (True, False)
    assert a.try_acquire() is True   # re-asking must not stack a second lock on the session
    assert "(held, backend pid" in a.describe()
    session = a.backend_pid
    a.release()
    assert a.holds() is False
    assert a.backend_pid == session, "release keeps the idle session for the next try_acquire"
    # a's session is still open, so b gets the lock only if release() unlocked it and the repeated
    # try_acquire did not stack a second lock on that session.
    assert b.try_acquire() is True, "one release must free the lock even after repeated try_acquire"
    assert a.try_acquire() is False
    b.release()
    assert a.try_acquire() is True
    a.close()
    assert a.backend_pid is None
    assert b.try_acquire() is True


@pytest.mark.postgres
@needs_pg
def test_pg_uses_its_own_connection_not_the_pool(pg_key: int,
                                                  pg_leads: list[PostgresAdvisoryLeadership]) -> None:
    assert PG_URL
    engine = create_engine(PG_URL, pool_size=1, max_overflow=0)
    try:
        lead = PostgresAdvisoryLeadership(engine, key=pg_key)
        pg_leads.append(lead)
        assert lead.try_acquire()
        assert engine.pool.checkedout() == 0
        with engine.connect() as conn:   # the app's single pooled connection is still free
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            assert pid != lead.backend_pid
            holder = conn.execute(text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid = CAST(:hi AS bigint)::oid AND objid = CAST(:lo AS bigint)::oid"),
                {"hi": (pg_key & (2 ** 64 - 1)) >> 32, "lo": pg_key & 0xFFFFFFFF}).scalar()
            assert holder == lead.backend_pid
            app = conn.execute(text("SELECT application_name FROM pg_stat_activity WHERE pid = :p"),
                               {"p": lead.backend_pid}).scalar()
            assert app == "gpuherd-guards-leader"
        # short connect timeout and TCP keepalives on the dedicated connection (client side) ...
        dbapi = lead._conn.connection.dbapi_connection  # type: ignore[union-attr]
        params = dbapi.info.get_parameters()
        assert params["connect_timeout"] == "5"
        assert params["keepalives"] == "1" and int(params["keepalives_idle"]) <= 30
        # ... and on the server side of that session, so a vanished leader host frees the lock.
        with lead._conn.connection.dbapi_connection.cursor() as cur:  # type: ignore[union-attr]
            cur.execute("SELECT current_setting('tcp_keepalives_idle')::int, current_setting('statement_timeout')")
            idle, statement_timeout = cur.fetchone()
        assert 0 < idle <= 30
        assert statement_timeout == "5s"
    finally:
        engine.dispose()


@pytest.mark.postgres
@needs_pg
def test_pg_terminated_connection_loses_leadership_and_reconnects(
        pg_key: int, pg_leads: list[PostgresAdvisoryLeadership]) -> None:
    assert PG_URL
    a, b = PostgresAdvisoryLeadership(PG_URL, key=pg_key), PostgresAdvisoryLeadership(PG_URL, key=pg_key)
    pg_leads += [a, b]
    assert a.try_acquire()
    old_pid = a.backend_pid
    assert old_pid is not None
    admin = create_engine(PG_URL)
    try:
        with admin.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": old_pid}).scalar() is True
    finally:
        admin.dispose()
    assert a.holds() is False
    assert a.backend_pid is None
    assert "last error" in a.describe()
    deadline = time.monotonic() + 5          # the killed backend exits asynchronously
    while not b.try_acquire():
        assert time.monotonic() < deadline, "terminating the leader's session must free the lock"
        time.sleep(0.05)
    assert a.try_acquire() is False          # reconnected, but b leads now
    assert a.backend_pid not in (None, old_pid)
    b.release()
    assert a.try_acquire() is True
    assert a.holds() is True


@pytest.mark.postgres
@needs_pg
def test_pg_between_processes_and_takeover_after_sigkill(
        pg_key: int, pg_leads: list[PostgresAdvisoryLeadership],
        children: list[subprocess.Popen[str]]) -> None:
    assert PG_URL
    child = _spawn_holder(f"lead = PostgresAdvisoryLeadership({PG_URL!r}, key={pg_key})")
    children.append(child)
    assert _first_line(child) == "True True"   # the child holds it, and holds() says so
    mine = PostgresAdvisoryLeadership(PG_URL, key=pg_key)
    pg_leads.append(mine)
    assert mine.try_acquire() is False
    assert mine.holds() is False
    took = _kill_and_take_over(child, mine, limit_s=60)
    print(f"\nPostgreSQL advisory lock takeover after SIGKILL: {took:.3f}s")
    assert took < 10, f"takeover took {took:.1f}s; expected well under a minute"
    assert mine.holds()
