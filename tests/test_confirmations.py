"""Stored confirmations: opaque tokens, sealed secrets, one yes per question."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlmodel import Session

from gpuherd.core.auth import Actor
from gpuherd.core.clock import VirtualClock
from gpuherd.core.config import Settings, load_settings
from gpuherd.core.confirmations import (
    KEY_FILE,
    ConfirmationStore,
    Issued,
    Pending,
    Replayed,
    Sealer,
    WrongSecretKey,
    token_hash,
)
from gpuherd.core.db import Database
from gpuherd.core.errors import (
    ConfigError,
    Conflict,
    GpuherdError,
    InvalidInput,
    NotFound,
    PermissionDenied,
)
from gpuherd.core.models import Role

HF = "hf_" + "Q7xK2mP9vLr4TzW8nB3cY6dF1gH5jA"          # 30 characters after the prefix
ALICE = Actor(principal="slack:U1", role=Role.MEMBER, team="ml")
BOB = Actor(principal="slack:U2", role=Role.ADMIN, team="ml")
MASKED = {"template": "llm", "offer": "vast:991", "env.HF_TOKEN": "hf_…(masked)", "disk": "80"}


def _sealer() -> Sealer:
    return Sealer(key=SecretStr(Sealer.generate_key()))


@pytest.fixture
def store(clock: VirtualClock) -> ConfirmationStore:
    return ConfirmationStore(_sealer(), clock)


def _ask(database: Database, store: ConfirmationStore, actor: Actor = ALICE, *, operation: str = "boot",
         reason: str = "price", args: dict[str, str] | None = None,
         secrets: dict[str, str] | None = None, accepted_dph: Decimal | None = Decimal("2.345"),
         instance_id: str | None = None, no_secrets: bool = False) -> Issued:
    with database.session() as s:
        issued = store.create(s, actor, operation=operation, reason=reason,
                              args=MASKED if args is None else args,
                              secrets=None if no_secrets else (secrets or {"env.HF_TOKEN": HF}),
                              accepted_dph=accepted_dph, instance_id=instance_id)
        s.commit()
    return issued


def _in(database: Database, fn: Callable[[Session], object]) -> object:
    with database.session() as s:
        out = fn(s)
        s.commit()
    return out


def _take(database: Database, store: ConfirmationStore, token: str, actor: Actor = ALICE) -> Pending | Replayed:
    with database.session() as s:
        got = store.take(s, actor, token)
        s.commit()
    return got


def _raw_rows(database: Database) -> list[tuple[object, ...]]:
    with database.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text("SELECT * FROM confirmations"))]


# --- tokens and what is stored -------------------------------------------------------------

def test_token_is_opaque_short_and_only_its_hash_is_stored(database: Database, store: ConfirmationStore,
                                                           clock: VirtualClock) -> None:
    tokens = {_ask(database, store).token for _ in range(5)}
    assert len(tokens) == 5
    for token in tokens:
        assert token.startswith("c_") and 24 <= len(token) <= 40
        assert all(c.isalnum() or c in "-_" for c in token[2:])
        assert len(token[2:]) >= 22
    rows = _raw_rows(database)
    assert {row[0] for row in rows} == {token_hash(t) for t in tokens}
    for row in rows:
        for column in row:
            assert not any(t in str(column) for t in tokens)
    issued = _ask(database, store)
    assert issued.expires_at == clock.now() + timedelta(minutes=15)
    assert issued.token not in repr(issued)


def test_a_secret_appears_in_no_column_in_plain_text(database: Database, store: ConfirmationStore) -> None:
    _ask(database, store)
    (row,) = _raw_rows(database)
    assert all(HF not in str(column) and HF[3:] not in str(column) for column in row)
    with database.engine.connect() as conn:
        args, sealed = conn.execute(text("SELECT args, sealed FROM confirmations")).one()
    assert "hf_…(masked)" in args
    assert sealed and HF not in sealed


def test_args_that_still_hold_a_secret_are_refused(database: Database, store: ConfirmationStore) -> None:
    with database.session() as s:
        with pytest.raises(ValueError, match="env.HF_TOKEN") as err:
            store.create(s, ALICE, operation="boot", reason="price",
                         args={**MASKED, "env.HF_TOKEN": HF}, secrets={"env.HF_TOKEN": HF},
                         accepted_dph=None, instance_id=None)
        assert HF not in str(err.value)
        with pytest.raises(ValueError):   # the value hidden inside another argument
            store.create(s, ALICE, operation="boot", reason="price",
                         args={**MASKED, "cmd": f"serve --token {HF}"}, secrets={"env.HF_TOKEN": HF},
                         accepted_dph=None, instance_id=None)
    assert _raw_rows(database) == []


def test_take_gives_back_the_request_with_its_secrets(database: Database, store: ConfirmationStore) -> None:
    issued = _ask(database, store, instance_id="g-7f3a", operation="destroy", reason="destroy")
    got = _take(database, store, issued.token)
    assert isinstance(got, Pending)
    assert (got.operation, got.reason, got.instance_id) == ("destroy", "destroy", "g-7f3a")
    assert got.args == {**MASKED, "env.HF_TOKEN": HF}
    assert got.masked_args == MASKED
    assert got.secrets() == {"env.HF_TOKEN": HF}
    assert got.accepted_dph == Decimal("2.345") and isinstance(got.accepted_dph, Decimal)
    assert got.token_hash == token_hash(issued.token)
    assert got.expires_at == issued.expires_at
    assert HF not in repr(got)


def test_without_secrets_nothing_is_sealed(database: Database, store: ConfirmationStore) -> None:
    issued = _ask(database, store, no_secrets=True, accepted_dph=None, args={"template": "llm"})
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT sealed, accepted_dph_micros FROM confirmations")).one() == (None, None)
    got = _take(database, store, issued.token)
    assert isinstance(got, Pending) and got.args == {"template": "llm"} and got.accepted_dph is None


# --- the sealer and its key ----------------------------------------------------------------

def test_sealer_round_trip_and_another_key_is_refused_clearly() -> None:
    key = Sealer.generate_key()
    one, other = Sealer(key=SecretStr(key)), _sealer()
    sealed = one.seal({"env.HF_TOKEN": HF, "x": "ü"})
    assert HF not in sealed
    assert one.unseal(sealed) == {"env.HF_TOKEN": HF, "x": "ü"}
    with pytest.raises(WrongSecretKey) as err:
        other.unseal(sealed)
    assert isinstance(err.value, ConfigError)
    assert "another secret key" in err.value.message and "GPUHERD_SECRET_KEY" in err.value.message
    assert HF not in err.value.message and "Traceback" not in err.value.message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(WrongSecretKey):
        one.unseal("not a fernet token")
    assert key not in repr(one) and "GPUHERD_SECRET_KEY" in repr(one)


def test_a_yes_on_a_replica_with_another_key_is_refused_and_not_spent(database: Database,
                                                                     store: ConfirmationStore,
                                                                     clock: VirtualClock) -> None:
    issued = _ask(database, store)
    elsewhere = ConfirmationStore(_sealer(), clock)
    with pytest.raises(WrongSecretKey, match="same GPUHERD_SECRET_KEY on every replica"):
        _take(database, elsewhere, issued.token)
    assert isinstance(_take(database, store, issued.token), Pending)


def test_key_file_is_made_0600_once_and_reused(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    first = Sealer.from_settings(settings)
    key_file = tmp_path / "home" / KEY_FILE
    assert not key_file.exists()                       # made on first use, not at construction
    sealed = first.seal({"a": "b"})
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    second = Sealer.from_settings(settings)
    assert second.unseal(sealed) == {"a": "b"}
    assert key_file.read_bytes() == key
    assert [p.name for p in key_file.parent.iterdir()] == [KEY_FILE]   # no temporary left behind


def test_processes_racing_to_make_the_key_file_agree(tmp_path: Path) -> None:
    path = tmp_path / "home" / KEY_FILE
    sealers = [Sealer(key_file=path) for _ in range(8)]
    barrier = threading.Barrier(len(sealers))
    sealed: list[str] = [""] * len(sealers)

    def run(i: int) -> None:
        barrier.wait(timeout=10)
        sealed[i] = sealers[i].seal({"n": str(i)})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sealers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    reader = Sealer(key_file=path)
    assert [reader.unseal(v) for v in sealed] == [{"n": str(i)} for i in range(len(sealers))]
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]


def test_secret_key_setting_is_used_instead_of_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = Sealer.generate_key()
    monkeypatch.setenv("GPUHERD_SECRET_KEY", key)
    settings = load_settings(home=tmp_path / "home")
    assert settings.secret_key is not None and key not in repr(settings)
    sealed = Sealer.from_settings(settings).seal({"a": "b"})
    assert Sealer(key=SecretStr(key)).unseal(sealed) == {"a": "b"}
    assert not (tmp_path / "home" / KEY_FILE).exists()


def test_an_unusable_secret_key_is_a_config_error_without_the_key(tmp_path: Path) -> None:
    sealer = Sealer.from_settings(Settings(home=tmp_path, secret_key=SecretStr("hunter2-not-a-key")))
    with pytest.raises(ConfigError, match="GPUHERD_SECRET_KEY") as err:
        sealer.seal({"a": "b"})
    assert "hunter2" not in err.value.message + (err.value.hint or "")
    bad_file = tmp_path / "bad" / KEY_FILE
    bad_file.parent.mkdir()
    bad_file.write_text("garbage-key\n")
    with pytest.raises(ConfigError, match="not a usable secret key") as err:
        Sealer(key_file=bad_file).seal({"a": "b"})
    assert "garbage" not in err.value.message


# --- taking a yes --------------------------------------------------------------------------

@pytest.mark.parametrize("token", ["", "c_", "c_short", "x_" + "a" * 24, "c_" + "a" * 22 + "!",
                                   "c_" + "a" * 63, "c_" + "a" * 22 + "\n", "<@here> " * 20])
def test_malformed_tokens_are_bad_input_quoting_little(database: Database, store: ConfirmationStore,
                                                       token: str) -> None:
    with pytest.raises(InvalidInput) as err:
        _take(database, store, token)
    quoted = err.value.message.split("'")[1]
    assert len(quoted.rstrip("…")) <= 20
    assert "\n" not in err.value.message and "/gpu" not in err.value.message


def test_unknown_token_is_not_found(database: Database, store: ConfirmationStore) -> None:
    with pytest.raises(NotFound, match="not known or already cleaned up; ask again"):
        _take(database, store, "c_" + "A" * 24)


def test_expired_is_refused_with_its_time(database: Database, store: ConfirmationStore,
                                          clock: VirtualClock) -> None:
    issued = _ask(database, store)
    clock.advance(timedelta(minutes=15))               # exactly at the expiry: too late
    with pytest.raises(Conflict) as err:
        _take(database, store, issued.token)
    assert "expired at 2026-11-10 09:15 UTC" in err.value.message and "ask again" in err.value.message
    assert _raw_rows(database)[0][10] is None          # used_at untouched


def test_another_actor_is_refused_learning_nothing(database: Database, store: ConfirmationStore,
                                                   clock: VirtualClock) -> None:
    issued = _ask(database, store, operation="destroy", reason="destroy", instance_id="g-7f3a")
    with pytest.raises(PermissionDenied) as err:
        _take(database, store, issued.token, actor=BOB)
    clock.advance(timedelta(hours=1))
    with pytest.raises(PermissionDenied) as later:     # not even that it expired
        _take(database, store, issued.token, actor=BOB)
    for message in (err.value.message, later.value.message):
        for leak in ("destroy", "g-7f3a", "slack:U1", "expired", "llm", "vast"):
            assert leak not in message
    clock.advance(timedelta(hours=-1))
    assert isinstance(_take(database, store, issued.token), Pending)


def test_a_second_yes_replays_the_result_and_the_secrets_are_gone(database: Database,
                                                                  store: ConfirmationStore) -> None:
    issued = _ask(database, store)
    pending = _take(database, store, issued.token)
    assert isinstance(pending, Pending)
    with pytest.raises(Conflict, match="being carried out already"):
        _take(database, store, issued.token)
    _in(database, lambda s: store.finish(s, pending.token_hash, '{"instance": "g-7f3a"}'))
    assert _take(database, store, issued.token) == Replayed(result_json='{"instance": "g-7f3a"}')
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT sealed FROM confirmations")).scalar_one() is None
    with pytest.raises(PermissionDenied):
        _take(database, store, issued.token, actor=BOB)
    with pytest.raises(Conflict):                      # finished once
        _in(database, lambda s: store.finish(s, pending.token_hash, "{}"))


class _MeetingSealer(Sealer):
    """Holds each unseal until both takers have read the row: both reach the claim together."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__(key=SecretStr(Sealer.generate_key()))
        self.barrier = barrier

    def unseal(self, token: str) -> dict[str, str]:
        self.barrier.wait(timeout=10)
        return super().unseal(token)


def test_two_concurrent_yeses_claim_once(database: Database, clock: VirtualClock) -> None:
    store = ConfirmationStore(_MeetingSealer(threading.Barrier(2)), clock)
    issued = _ask(database, store)
    results: list[object] = []
    lock = threading.Lock()

    def say_yes() -> None:
        try:
            got: object = _take(database, store, issued.token)
        except GpuherdError as exc:
            got = exc
        with lock:
            results.append(got)

    threads = [threading.Thread(target=say_yes) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2
    assert sum(isinstance(r, Pending) for r in results) == 1
    (refused,) = [r for r in results if not isinstance(r, Pending)]
    assert isinstance(refused, Conflict) and "being carried out already" in refused.message


def test_release_lets_the_user_say_yes_again_with_the_secrets(database: Database,
                                                              store: ConfirmationStore) -> None:
    issued = _ask(database, store)
    first = _take(database, store, issued.token)
    assert isinstance(first, Pending)
    _in(database, lambda s: store.release(s, first.token_hash))
    again = _take(database, store, issued.token)
    assert isinstance(again, Pending) and again.secrets() == {"env.HF_TOKEN": HF}


def test_supersede_answers_the_old_token_with_a_conflict(database: Database, store: ConfirmationStore) -> None:
    old = _ask(database, store)
    pending = _take(database, store, old.token)
    assert isinstance(pending, Pending)
    _in(database, lambda s: store.supersede(s, pending.token_hash))
    new = _ask(database, store, accepted_dph=Decimal("2.9"), secrets=pending.secrets())
    with pytest.raises(Conflict, match="replaced by a newer question"):
        _take(database, store, old.token)
    rows = {row[0]: row for row in _raw_rows(database)}
    assert rows[pending.token_hash][6] is None         # the old seal is wiped
    got = _take(database, store, new.token)
    assert isinstance(got, Pending) and got.accepted_dph == Decimal("2.9") and got.secrets()["env.HF_TOKEN"] == HF


def test_cancel_declines_and_wipes(database: Database, store: ConfirmationStore) -> None:
    issued = _ask(database, store)
    with pytest.raises(PermissionDenied):
        _in(database, lambda s: store.cancel(s, BOB, issued.token))
    _in(database, lambda s: store.cancel(s, ALICE, issued.token))
    with pytest.raises(Conflict, match="declined"):
        _take(database, store, issued.token)
    assert _raw_rows(database)[0][6] is None


def test_purge_wipes_expired_seals_and_deletes_day_old_rows(database: Database, store: ConfirmationStore,
                                                            clock: VirtualClock) -> None:
    old = _ask(database, store)
    clock.advance(timedelta(hours=12))
    recent = _ask(database, store)
    clock.advance(timedelta(hours=12, minutes=16))     # old expired a day and a minute ago
    deleted = _in(database, lambda s: store.purge(s, clock.now()))
    assert deleted == 1
    rows = {row[0]: row for row in _raw_rows(database)}
    assert set(rows) == {token_hash(recent.token)}
    assert rows[token_hash(recent.token)][6] is None   # expired: its seal is gone at once
    with pytest.raises(NotFound):
        _take(database, store, old.token)
    live = _ask(database, store)
    assert _in(database, lambda s: store.purge(s, clock.now())) == 0
    assert isinstance(_take(database, store, live.token), Pending)


def test_create_refuses_oversized_fields(database: Database, store: ConfirmationStore) -> None:
    with database.session() as s, pytest.raises(ValueError, match="instance_id"):
        store.create(s, ALICE, operation="destroy", reason="destroy", args={}, secrets=None,
                     accepted_dph=None, instance_id="g-" + "x" * 20)


def test_key_file_directory_is_private_when_made(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    Sealer(key_file=home / KEY_FILE).seal({})
    assert stat.S_IMODE(os.stat(home).st_mode) & 0o077 == 0
