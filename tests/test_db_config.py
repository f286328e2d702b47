"""Migrations and configuration: the migrated schema is exactly the models', on SQLite and
PostgreSQL; a bad setting stops the start with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from gpuherd.core import models  # noqa: F401
from gpuherd.core.config import load_settings
from gpuherd.core.db import Database, current_revision, head_revision
from gpuherd.core.errors import ConfigError
from gpuherd.core.service import GpuService


def test_migrations_produce_exactly_the_models_schema(database):
    assert current_revision(database.engine) == head_revision()
    with database.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
    assert diff == []


def test_upgrade_is_idempotent(database):
    database.upgrade()
    assert database.is_current()


def test_embedded_sqlite_is_created_and_migrated_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUHERD_HOME", str(tmp_path / "fresh"))
    svc = GpuService.from_settings(load_settings())
    assert (tmp_path / "fresh" / "gpuherd.db").exists()
    assert svc.db.is_current()
    assert svc.providers.names() == ["sandbox"] and svc.simulated


def test_env_overrides_toml_and_toml_overrides_defaults(tmp_path, monkeypatch):
    home = tmp_path / "h"
    home.mkdir()
    (home / "config.toml").write_text('default_team = "vision"\nsandbox_seed = 3\n')
    monkeypatch.setenv("GPUHERD_HOME", str(home))
    monkeypatch.setenv("GPUHERD_SANDBOX_SEED", "9")
    s = load_settings()
    assert s.default_team == "vision" and s.sandbox_seed == 9
    assert s.resolved_database_url == f"sqlite:///{home / 'gpuherd.db'}"


def test_dotenv_file_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text("GPUHERD_DEFAULT_ROLE=viewer\n")
    assert load_settings().default_role == "viewer"


@pytest.mark.parametrize("key,value,named", [
    ("GPUHERD_SANDBOX_TIME_SCALE", "fast", "GPUHERD_SANDBOX_TIME_SCALE"),
    ("GPUHERD_DEFAULT_ROLE", "boss", "GPUHERD_DEFAULT_ROLE"),
    ("GPUHERD_BOOT_TIMEOUT_S", "-1", "GPUHERD_BOOT_TIMEOUT_S"),
    ("GPUHERD_SANDBOX", "maybe", "GPUHERD_SANDBOX"),
])
def test_bad_env_value_names_the_key(monkeypatch, key, value, named):
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert named in err.value.message
    assert value not in ("",) and "Traceback" not in err.value.message


def test_unknown_or_malformed_toml_is_named(tmp_path, monkeypatch):
    home = tmp_path / "h"
    home.mkdir()
    monkeypatch.setenv("GPUHERD_HOME", str(home))
    (home / "config.toml").write_text('sandbox_sed = 3\n')
    with pytest.raises(ConfigError, match="SANDBOX_SED"):
        load_settings()
    (home / "config.toml").write_text('sandbox_seed = \n')
    with pytest.raises(ConfigError, match="config.toml"):
        load_settings()


def test_unusable_database_url_is_a_config_error():
    with pytest.raises(ConfigError, match="GPUHERD_DATABASE_URL"):
        Database("nosuchdb+driver://x/y")
