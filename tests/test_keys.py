"""API keys (core/keys.py) on SQLite and PostgreSQL, and `gpuherd keys create|list|revoke`:
create, list and revoke; a key's role caps its user's; revoked, unknown and malformed keys are
refused without the key in the message; after creation the key is in no audit row, no column of
any table and no log record — only in the one answer that created it."""

from __future__ import annotations

import logging
import re

import pytest
from sqlalchemy import inspect, select, text

from gpuherd.bot import cli
from gpuherd.core.clock import as_utc
from gpuherd.core.errors import InvalidInput, NotFound, PermissionDenied, Unauthenticated
from gpuherd.core.keys import key_id_of
from gpuherd.core.models import Role
from gpuherd.core.service import GpuService

KEY = re.compile(r"ghk_k[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


def _every_row_as_text(service: GpuService) -> str:
    """Every row of every table, as text (what a leak would look like in a dump)."""
    engine = service.db.engine
    out: list[str] = []
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                out.append(f"{table}: {tuple(row)!r}")
    return "\n".join(out)


def _audit_text(service: GpuService) -> str:
    with service.db.engine.connect() as conn:
        return "\n".join(repr(tuple(r)) for r in conn.execute(text("SELECT * FROM audit_events")))


async def test_create_list_revoke(service: GpuService, admin) -> None:
    created = await service.create_key(admin, "api:alice", role="member", name="notebook")
    assert KEY.fullmatch(created.key) and key_id_of(created.key) == created.view.id
    view = created.view
    assert (view.principal, view.role, view.name, view.created_by) == ("api:alice", "member", "notebook",
                                                                       admin.principal)
    other = await service.create_key(admin, "api:bob")
    assert [k.id for k in await service.list_keys(admin)] == [view.id, other.view.id]   # by principal
    actor = await service.actor_for_key(created.key)
    assert (actor.principal, actor.role, actor.source) == ("api:alice", Role.MEMBER, "api")

    revoked = await service.revoke_key(admin, view.id)
    assert revoked.revoked_at is not None
    assert [k.id for k in await service.list_keys(admin)] == [other.view.id]
    assert {k.id for k in await service.list_keys(admin, include_revoked=True)} == {view.id, other.view.id}
    with pytest.raises(Unauthenticated, match=f"API key {view.id} was revoked"):
        await service.actor_for_key(created.key)      # at once on this process, cache or not
    again = await service.revoke_key(admin, view.id)                                  # idempotent
    assert as_utc(again.revoked_at) == as_utc(revoked.revoked_at)
    with pytest.raises(NotFound):
        await service.revoke_key(admin, "k00000000")
    with service.db.engine.connect() as conn:
        events = [r[0] for r in conn.execute(text("SELECT event FROM audit_events WHERE event LIKE 'key.%' ORDER BY id"))]
    assert events == ["key.create", "key.create", "key.revoke"]


async def test_only_admins_manage_keys_and_bad_input_is_named(service: GpuService, admin, member) -> None:
    for call in (service.create_key(member, "api:x"), service.list_keys(member), service.revoke_key(member, "k1")):
        with pytest.raises(PermissionDenied):
            await call
    with pytest.raises(InvalidInput, match="no spaces"):
        await service.create_key(admin, "api:has space")
    with pytest.raises(InvalidInput, match="Unknown role 'root'"):
        await service.create_key(admin, "api:x", role="root")
    with pytest.raises(InvalidInput, match="at most 64"):
        await service.create_key(admin, "api:x", name="n" * 65)
    assert await service.list_keys(admin) == []       # nothing made by the refusals


async def test_a_keys_role_caps_its_user(service: GpuService, admin) -> None:
    await service.set_user(admin, "api:boss", role="admin", team="ml")
    capped = await service.create_key(admin, "api:boss", role="viewer", name="dashboard")
    full = await service.create_key(admin, "api:boss")
    a = await service.actor_for_key(capped.key)
    assert (a.principal, a.role, a.team) == ("api:boss", Role.VIEWER, "ml")
    assert (await service.actor_for_key(full.key)).role is Role.ADMIN
    # a cap never raises: an admin-capped key of a member acts as a member
    await service.set_user(admin, "api:carol", role="member")
    high = await service.create_key(admin, "api:carol", role="admin")
    assert (await service.actor_for_key(high.key)).role is Role.MEMBER


async def test_bad_keys_are_refused_without_echoing_them(service: GpuService, admin) -> None:
    real = (await service.create_key(admin, "api:alice")).key
    key_id = key_id_of(real)
    assert key_id is not None
    secret = real.split("_", 2)[2]
    forged = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")      # right id, wrong secret
    unknown = f"ghk_k12345678_{secret}"
    malformed = ["", "Bearer " + real, real + "x", "ghk_" + secret, "not-a-key", real.replace("ghk_", "ghx_")]
    for presented in [forged, unknown, *malformed]:
        with pytest.raises(Unauthenticated) as err:
            await service.actor_for_key(presented)
        assert secret not in err.value.message and (not presented or presented not in err.value.message)
    assert (await service.actor_for_key(real)).principal == "api:alice"      # the real one still works


async def test_the_key_is_nowhere_after_creation(service: GpuService, admin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    created = await service.create_key(admin, "api:alice", role="member", name="ci")
    key, secret = created.key, created.key.split("_", 2)[2]
    await service.actor_for_key(key)                   # used,
    with pytest.raises(Unauthenticated):
        await service.actor_for_key(key[:-1] + ("A" if key[-1] != "A" else "B"))   # forged,
    await service.revoke_key(admin, created.view.id)   # and revoked
    with pytest.raises(Unauthenticated):
        await service.actor_for_key(key)
    dump = _every_row_as_text(service)
    assert "api_keys" in dump and created.view.id in dump            # the scan did read the key's row
    assert secret not in dump and key not in dump
    audit = _audit_text(service)
    assert created.view.id in audit and secret not in audit
    logged = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records)
    assert secret not in logged


# --- the CLI ----------------------------------------------------------------------------------

@pytest.fixture
def cli_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CLI's database: SQLite in GPUHERD_HOME (the autouse fixture's), or the test's PostgreSQL."""
    if not db_url.startswith("sqlite"):
        monkeypatch.setenv("GPUHERD_DATABASE_URL", db_url)
    return db_url


def test_cli_create_list_revoke(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "create", "--user", "api:bob", "--role", "viewer", "--name", "grafana"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert KEY.fullmatch(key), out                    # stdout is the key alone (KEY=$(gpuherd keys create …))
    key_id = key_id_of(key)
    assert "shown only once" in err and key_id in err and "capped at viewer" in err and key not in err

    assert cli.main(["keys", "list"]) == 0
    out, _ = capsys.readouterr()
    [line] = out.strip().splitlines()
    assert line.split()[:4] == [key_id, "api:bob", "viewer", "grafana"] and "active" in line
    assert key not in out and key.split("_", 2)[2] not in out

    assert cli.main(["keys", "revoke", key_id]) == 0
    assert f"Revoked API key {key_id} of api:bob" in capsys.readouterr().out
    assert cli.main(["keys", "list"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "No API keys yet" in err
    assert cli.main(["keys", "list", "--all"]) == 0
    assert "revoked" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "revoke", "k00000000"]) == 1      # refused (exit codes: bot/cli.py)
    _, err = capsys.readouterr()
    assert "There is no API key 'k00000000'" in err and "Traceback" not in err
    assert cli.main(["keys", "create", "--user", "has space"]) == 2
    _, err = capsys.readouterr()
    assert "no spaces" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:           # argparse: the missing option, with the usage
        cli.main(["keys", "create"])
    assert exit_.value.code == 2 and "--user" in capsys.readouterr().err


def test_cli_keys_need_an_admin(cli_db: str, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUHERD_LOCAL_ROLE", "viewer")
    assert cli.main(["keys", "create", "--user", "api:bob"]) == 1      # refused: not an admin
    out, err = capsys.readouterr()
    assert out == "" and "admin" in err.lower() and "Traceback" not in err


def test_cli_database_down_is_one_clear_line(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUHERD_DATABASE_URL", "postgresql+psycopg://gpuherd:s3cret-pw@127.0.0.1:1/nowhere")
    assert cli.main(["keys", "list"]) == 2
    _, err = capsys.readouterr()
    assert "The database cannot be used" in err and "GPUHERD_DATABASE_URL" in err
    assert "Traceback" not in err and "s3cret-pw" not in err


@pytest.mark.parametrize("principal", ["", "a b", "api:al\x00ice", "api:al\nice", "x" * 129])
async def test_a_principal_that_cannot_be_stored_is_refused_by_core_everywhere(service, admin, principal):
    """users set, keys create and first sight go through one check (core/auth.check_principal):
    each refuses with a message naming the rule, and nothing is written."""
    from gpuherd.core.errors import InvalidInput
    from gpuherd.core.models import User

    with pytest.raises(InvalidInput, match="cannot be used"):
        await service.set_user(admin, principal, role="member")
    with pytest.raises(InvalidInput, match="cannot be used"):
        await service.create_key(admin, principal)
    with service.db.session() as s:
        assert all(u.principal != principal for u in s.execute(select(User)).scalars())


@pytest.mark.parametrize("team", ["", "t\x00x", "a\nb", "t" * 65])
async def test_a_team_that_cannot_be_stored_is_refused(service, admin, team):
    from gpuherd.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="team name"):
        await service.set_user(admin, "api:ok", team=team)
