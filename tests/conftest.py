"""Shared fixtures. Database tests run on SQLite always and on PostgreSQL when
GPUHERD_TEST_POSTGRES_URL is set (CI sets it; see DEVELOPERS.md); otherwise the PostgreSQL
variants skip with the reason."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from gpuherd.core.clock import VirtualClock
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.notify import NotifierHub
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.service import GpuService
from gpuherd.core.templates import TemplateCatalog

PG_URL = os.environ.get("GPUHERD_TEST_POSTGRES_URL")


def gpuherd_cmd() -> list[str]:
    """The installed `gpuherd` script beside this interpreter (what a user runs), else the module."""
    import sys

    script = Path(sys.executable).with_name("gpuherd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gpuherd.bot.cli"]


def cli_environment(home: Path) -> dict[str, str]:
    """The environment for a real `gpuherd` subprocess: this one without gpuherd's settings, a
    fresh data directory, instant sandbox boots, fast polling and wide piped output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHERD_")}
    env.update(GPUHERD_HOME=str(home), GPUHERD_SANDBOX_TIME_SCALE="0", GPUHERD_POLL_INTERVAL_S="0.05",
               COLUMNS="160")
    return env
PG_SKIP = "PostgreSQL tests need GPUHERD_TEST_POSTGRES_URL (CI sets it; see DEVELOPERS.md)"
START = datetime(2026, 11, 10, 9, 0, tzinfo=UTC)   # a Tuesday
PROVIDER_ENV = {"VAST_API_KEY", "VAST_URL", "RUNPOD_API_KEY", "RUNPOD_API_BASE_URL", "SURF_API_TOKEN"}


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's own config or data directory."""
    for key in list(os.environ):
        if (key.startswith(("GPUHERD_", "AWS_")) and key != "GPUHERD_TEST_POSTGRES_URL") or key in PROVIDER_ENV:
            monkeypatch.delenv(key)
    # boto3 must not find the developer's ~/.aws either
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("GPUHERD_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _collector_as_it_was() -> Iterator[None]:
    """A test that runs a serving entry point in-process (the CLI's shell) sets the collector up
    as a server does (core/collector.py); later tests get CPython's settings back."""
    import gc
    before = gc.get_threshold()
    yield
    if gc.get_threshold() != before:
        gc.unfreeze()
        gc.set_threshold(*before)


def _pg_database() -> Iterator[str]:
    """A fresh schema on the CI PostgreSQL for one test, dropped afterwards."""
    assert PG_URL
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        _drop_schema(admin, schema)
        admin.dispose()


def _drop_schema(admin: Engine, schema: str, attempts: int = 5) -> None:
    """DROP SCHEMA, again after a moment when PostgreSQL picks it as a deadlock's victim: a
    worker thread or kernel of the test may still be finishing a query in that schema while the
    fixture tears down (seen once in CI: AccessExclusiveLock against an AccessShareLock)."""
    import time

    from sqlalchemy.exc import OperationalError

    for attempt in range(attempts):
        try:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            return
        except OperationalError as exc:
            if "deadlock" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gpuherd.db'}"
    else:
        if not PG_URL:
            pytest.skip(PG_SKIP)
        yield from _pg_database()


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    db = Database(db_url)
    db.upgrade()
    yield db
    db.dispose()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(START)


@pytest.fixture
def sandbox(tmp_path: Path, clock: VirtualClock) -> SandboxProvider:
    return SandboxProvider(tmp_path / "sandbox.json", seed=7, time_scale=0, clock=clock)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(home=tmp_path / "home", database_url=db_url, local_user="alice", local_role="admin",
                    poll_interval_s=0.01, boot_timeout_s=30)


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture
def service(settings: Settings, database: Database, sandbox: SandboxProvider, clock: VirtualClock) -> Iterator[GpuService]:
    svc = GpuService(settings, database, ProviderRegistry({"sandbox": sandbox}), TemplateCatalog.load(None),
                     clock=clock, hub=NotifierHub(), sleep=_no_sleep)
    yield svc


@pytest.fixture
def admin(service):
    """The shell user, an admin of their own install."""
    return service.local_actor()


@pytest.fixture
async def member(service, admin):
    """A chat user in team ml who may act only on their own instances."""
    await service.set_user(admin, "slack:U2", role="member", team="ml")
    return service.actor("slack:U2", source="slack")
