"""Migrations and configuration: the migrated schema is exactly the models', on SQLite and
PostgreSQL; a bad setting stops the start with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import gpuherd_cmd
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


# --- every unusable setting: one line naming it, exit 2, no traceback -------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402

from sqlalchemy.engine import make_url  # noqa: E402

from gpuherd.core.templates import TemplateCatalog  # noqa: E402


def _start(tmp_path: Path, **env: str) -> tuple[int, str]:
    """`gpuherd status` in a clean environment plus `env`: exit code and stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPUHERD_")}
    clean.update(GPUHERD_HOME=str(tmp_path / "home"), GPUHERD_SANDBOX_TIME_SCALE="0", COLUMNS="80")
    clean.update(env)
    proc = subprocess.run([*gpuherd_cmd(), "status"], capture_output=True, text=True, env=clean, timeout=60,
                          cwd=tmp_path)
    return proc.returncode, proc.stdout + proc.stderr


def _missing_database_url() -> str:
    base = os.environ.get("GPUHERD_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("needs a PostgreSQL server: GPUHERD_TEST_POSTGRES_URL (CI sets it; see DEVELOPERS.md)")
    return make_url(base).set(database="nonexistent_db").render_as_string(hide_password=False)


@pytest.mark.parametrize("case", ["home_is_a_file", "home_cannot_be_created", "config_is_a_directory",
                                  "unknown_provider", "unknown_provider_csv", "postgres_unreachable",
                                  "postgres_database_missing", "database_file_is_garbage", "local_user_with_space"])
def test_an_unusable_setting_stops_the_start_with_one_line_naming_it(tmp_path: Path, case: str) -> None:
    home = tmp_path / "home"
    env: dict[str, str] = {}
    if case == "home_is_a_file":
        home.write_text("not a directory")
        named = "GPUHERD_HOME"
    elif case == "home_cannot_be_created":
        (tmp_path / "file").write_text("x")
        env["GPUHERD_HOME"] = str(tmp_path / "file" / "sub")
        named = "GPUHERD_HOME"
    elif case == "config_is_a_directory":
        (home / "config.toml").mkdir(parents=True)
        named = "config.toml"
    elif case == "unknown_provider":
        env["GPUHERD_PROVIDERS"] = '["sandbox", "nosuchcloud"]'
        named = "GPUHERD_PROVIDERS"
    elif case == "unknown_provider_csv":
        env["GPUHERD_PROVIDERS"] = "vast,sandbx"
        named = "GPUHERD_PROVIDERS"
    elif case == "postgres_unreachable":
        env["GPUHERD_DATABASE_URL"] = "postgresql+psycopg://gpuherd:s3cret@127.0.0.1:1/gpuherd"
        named = "GPUHERD_DATABASE_URL"
    elif case == "postgres_database_missing":
        env["GPUHERD_DATABASE_URL"] = _missing_database_url()
        named = "GPUHERD_DATABASE_URL"
    elif case == "database_file_is_garbage":
        home.mkdir()
        (home / "gpuherd.db").write_bytes(bytes(range(256)) * 40)
        named = "GPUHERD_DATABASE_URL"
    else:
        env["GPUHERD_LOCAL_USER"] = "alice smith"
        named = "GPUHERD_LOCAL_USER"
    code, out = _start(tmp_path, **env)
    assert code == 2, out
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out          # one line, even at 80 columns
    assert named in out
    assert "s3cret" not in out
    if case == "unknown_provider_csv":
        assert "did you mean sandbox" in out
    if case == "postgres_database_missing":
        assert "nonexistent_db" in out


def test_a_comma_separated_provider_list_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUHERD_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("GPUHERD_PROVIDERS", "sandbox, vast")
    assert load_settings().providers == ["sandbox", "vast"]
    monkeypatch.setenv("GPUHERD_PROVIDERS", "[]")
    with pytest.raises(ConfigError, match="GPUHERD_PROVIDERS.*names no provider"):
        load_settings()


@pytest.mark.parametrize("key,value", [
    ("GPUHERD_ADMINS", '["slack:U1", "alice smith"]'),
    ("GPUHERD_ADMINS", '["slack:U1\\u0000"]'),
    ("GPUHERD_DEFAULT_TEAM", "ML"),
    ("GPUHERD_DEFAULT_TEAM", "../../etc"),
    ("GPUHERD_LOCAL_USER", "al\x1bice"),
])
def test_names_in_settings_follow_the_name_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 key: str, value: str) -> None:
    monkeypatch.setenv("GPUHERD_HOME", str(tmp_path / "h"))
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = err.value.message
    assert key in message and "\n" not in message and "\x1b" not in message


def test_the_default_local_user_is_made_to_fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import getpass

    monkeypatch.setattr(getpass, "getuser", lambda: "Jane Doe (admin)")
    monkeypatch.setenv("GPUHERD_HOME", str(tmp_path / "h"))
    assert load_settings().local_user == "Jane-Doe--admin"


def test_a_template_that_extends_itself_is_named_so(tmp_path: Path) -> None:
    path = tmp_path / "templates.toml"
    path.write_text('[templates.mine]\nextends = "mine"\nmax_dph = 1\n')
    with pytest.raises(ConfigError) as err:
        TemplateCatalog.load(path)
    assert "cannot extend itself" in err.value.message and "unknown template" not in err.value.message
    path.write_text('[templates.budget]\nextends = "budget"\nmax_dph = 1\n')    # replacing a built-in
    assert TemplateCatalog.load(path).get("budget").max_dph is not None
