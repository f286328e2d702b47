"""Stored confirmations (SPEC §10): a yes is an opaque token, not a command line.

A question that needs a yes (a boot above a template's price limit, a boot past a used-up
budget, a destroy) is written to the `confirmations` table and the user is handed a token. The
yes carries only that token; what it accepts (the operation, its arguments, the price said yes
to) comes back from the database, so a yes can neither change the request nor skip the price
check, and no override value travels through chat, button values or audit records.

Decisions:

- Token: ``"c_"`` + 24 url-safe characters from `secrets.token_urlsafe(18)` (144 random bits),
  26 characters in all — well inside a Discord `custom_id` (100) next to an action ref's
  ``confirm||`` prefix. Only ``sha256(token)`` (hex, 64 characters) is stored, as the primary
  key: a database dump grants no yes. Anything not shaped like a token (wrong prefix, other
  characters, shorter than a token or longer than 64) is refused as bad input before any lookup,
  quoting at most 20 characters of it.
- Secrets: the caller passes `args` already masked (for display; stored as JSON in `args`) and
  the secret values apart in `secrets`; only the latter are stored, sealed with Fernet (AES-128-CBC
  plus HMAC-SHA256) in `sealed`. `create` refuses (ValueError: a caller bug) `args` that still hold
  a secret's value. The seal is wiped when the yes finishes, is replaced, is declined, or has
  expired (at the next `purge`): a secret is kept only while a yes can still use it. `release`
  keeps it, because the user may say yes again.
- Key: `Settings.secret_key` (GPUHERD_SECRET_KEY) or, when unset, ``secret.key`` in the data
  directory, made on first use with mode 0600. The file is written under a temporary name and
  hard-linked into place, so a second process starting at the same moment either wins or reads
  the winner's complete key — never a half-written one, never an overwritten one. Several
  replicas on one PostgreSQL must share GPUHERD_SECRET_KEY; a token sealed elsewhere is refused
  with a message saying exactly that (a `ConfigError`, never a traceback, never the key).
- Who: a confirmation belongs to the principal it was asked of. Another principal (an admin
  too) is refused with a message that names neither the operation nor the machine; the check
  comes before the expiry check so even the expiry time is not revealed.
- Exactly once: `take` claims with ``UPDATE … SET used_at = now WHERE token_hash = … AND actor =
  … AND used_at IS NULL AND expires_at > now``; of two concurrent yeses only one updates a row.
  The caller commits right after `take` (so other replicas see the claim), does the work, then
  `finish`es with the result as JSON; a later yes of the same user (a double click, a retried
  delivery) gets that result back as `Replayed` until the row is purged. A yes while the first
  is still running is a Conflict. `release` undoes a claim when the work failed before it did
  anything.
- Replaced and declined questions keep their row with a marker in `result` (``superseded``,
  ``declined``: not JSON, so no real result can be mistaken for them) and answer a later yes
  with a Conflict that says which.
- Retention: `purge` wipes the seal of every expired row at once and deletes rows a day after
  they expired, so replays of a finished yes keep working for that day.
- Every function takes a SQLModel `Session`, runs synchronously (callers use `Database.run`)
  and leaves the commit to the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets as random_source
import threading
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sqlalchemy import CursorResult, Delete, Update, delete, func, select, update
from sqlmodel import Session, col

from .auth import Actor
from .clock import Clock, as_utc
from .config import Settings
from .errors import ConfigError, Conflict, InvalidInput, NotFound, PermissionDenied
from .models import ConfirmationRecord
from .money import from_micros, to_micros

TOKEN_PREFIX = "c_"
TOKEN_BYTES = 18                    # 24 url-safe characters
MAX_TOKEN = 64                      # longest string looked at as a token
KEY_FILE = "secret.key"
DEFAULT_TTL = timedelta(minutes=15)
RETENTION = timedelta(days=1)       # a finished or expired row is kept this long past its expiry
SUPERSEDED = "superseded"           # markers in `result`; not JSON, so never a real result
DECLINED = "declined"
_TOKEN = re.compile(rf"^{TOKEN_PREFIX}[A-Za-z0-9_-]{{22,{MAX_TOKEN - len(TOKEN_PREFIX)}}}$")
_MIN_SECRET_SCAN = 8                # shorter secret values are compared whole, not searched for


class WrongSecretKey(ConfigError):
    """A sealed value this server cannot open: another key sealed it, or it is damaged."""

    code = "secret_key"


class Sealer:
    """Authenticated encryption of a small str -> str dict. The key is read (or the key file
    made) on first use, once per process; `repr` never shows it."""

    def __init__(self, *, key: SecretStr | None = None, key_file: Path | None = None) -> None:
        if (key is None) == (key_file is None):
            raise ValueError("Sealer needs exactly one of key and key_file")
        self._key = key
        self._key_file = key_file
        self._fernet: Fernet | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Sealer:
        if settings.secret_key is not None:
            return cls(key=settings.secret_key)
        return cls(key_file=settings.home / KEY_FILE)

    @staticmethod
    def generate_key() -> str:
        """A new key, as GPUHERD_SECRET_KEY wants it."""
        return Fernet.generate_key().decode("ascii")

    def __repr__(self) -> str:
        source = "GPUHERD_SECRET_KEY" if self._key is not None else str(self._key_file)
        return f"Sealer(key from {source})"

    def seal(self, data: dict[str, str]) -> str:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise TypeError("Sealer.seal takes a dict of str to str")
        plain = json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return self._cipher().encrypt(plain).decode("ascii")

    def unseal(self, token: str) -> dict[str, str]:
        try:
            plain = self._cipher().decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise WrongSecretKey(
                "This confirmation was made by a server with another secret key; set the same "
                "GPUHERD_SECRET_KEY on every replica.",
                hint="Then ask again: this question cannot be answered here.") from None
        try:
            data = json.loads(plain)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in data.items()):
            raise WrongSecretKey("The sealed arguments of this confirmation are damaged; ask again.")
        return data

    def _cipher(self) -> Fernet:
        if self._fernet is None:
            with self._lock:
                if self._fernet is None:
                    self._fernet = self._load()
        return self._fernet

    def _load(self) -> Fernet:
        if self._key is not None:
            return _fernet(self._key.get_secret_value().encode("ascii", "replace"),
                           "GPUHERD_SECRET_KEY (or `secret_key` in config.toml)")
        assert self._key_file is not None
        return _fernet(_read_or_make_key(self._key_file), str(self._key_file))


def _fernet(key: bytes, where: str) -> Fernet:
    try:
        return Fernet(key.strip())
    except ValueError:
        raise ConfigError(
            f"{where} is not a usable secret key: it must be 32 url-safe base64-encoded bytes "
            "(44 characters).",
            hint="Make one with: python -c \"from cryptography.fernet import Fernet; "
                 "print(Fernet.generate_key().decode())\"") from None


def _read_or_make_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"Cannot read the secret key file {path}: {exc.strerror}.") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Fernet.generate_key()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{random_source.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(key + b"\n")
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, path)        # atomic, and never replaces a key another process made
            except FileExistsError:
                return path.read_bytes()
        finally:
            tmp.unlink(missing_ok=True)
        return key
    except OSError as exc:
        raise ConfigError(f"Cannot create the secret key file {path}: {exc.strerror}.",
                          hint="Set GPUHERD_SECRET_KEY instead.") from None


class Issued(BaseModel):
    """What the asker is handed: the token to say yes with, and until when it works."""

    model_config = ConfigDict(frozen=True)

    token: str = Field(repr=False)
    expires_at: datetime


class Pending(BaseModel):
    """A confirmation this call has claimed: carry it out, then `finish` (or `release`)."""

    model_config = ConfigDict(frozen=True)

    operation: str
    reason: str
    instance_id: str | None
    args: dict[str, str] = Field(repr=False)          # the request as asked, secrets included
    masked_args: dict[str, str]                       # as stored, for display
    secret_names: tuple[str, ...] = ()
    accepted_dph: Decimal | None
    token_hash: str
    expires_at: datetime

    def secrets(self) -> dict[str, str]:
        """The secret arguments alone (to seal them again in a new question)."""
        return {name: self.args[name] for name in self.secret_names}


class Replayed(BaseModel):
    """The same user's yes again after the first finished: what the first one did."""

    model_config = ConfigDict(frozen=True)

    result_json: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _check_token(token: str) -> str:
    if not isinstance(token, str) or len(token) > MAX_TOKEN or not _TOKEN.fullmatch(token):
        shown = "".join(c if c.isprintable() else "?" for c in str(token)[:20])
        more = "…" if len(str(token)) > 20 else ""
        raise InvalidInput(f"'{shown}{more}' is not a confirmation token.",
                           hint="Use the button or token from the question.")
    return token_hash(token)


def _rows(result: object) -> int:
    assert isinstance(result, CursorResult)
    return result.rowcount


def _update() -> Update:
    # rows are read fresh (populate_existing) after every write, so the session's copies are
    # not synchronised; SQLite hands back naive times the ORM could not compare anyway
    return update(ConfirmationRecord).execution_options(synchronize_session=False)


def _delete() -> Delete:
    return delete(ConfirmationRecord).execution_options(synchronize_session=False)


class ConfirmationStore:
    def __init__(self, sealer: Sealer, clock: Clock, ttl: timedelta = DEFAULT_TTL) -> None:
        if ttl <= timedelta(0):
            raise ValueError("ttl must be positive")
        self.sealer = sealer
        self.clock = clock
        self.ttl = ttl

    def _now(self) -> datetime:
        return as_utc(self.clock.now())

    def create(self, s: Session, actor: Actor, *, operation: str, reason: str, args: dict[str, str],
               secrets: dict[str, str] | None, accepted_dph: Decimal | None,
               instance_id: str | None) -> Issued:
        secrets = dict(secrets or {})
        for name, value in secrets.items():
            if not value:
                continue
            if args.get(name) == value or (len(value) >= _MIN_SECRET_SCAN and any(
                    value in text for pair in args.items() for text in pair)):
                raise ValueError(f"args hold the value of the secret argument {name!r}: mask it")
        if accepted_dph is not None and not isinstance(accepted_dph, Decimal):
            raise TypeError("accepted_dph is a Decimal")
        for field, value, longest in (("operation", operation, 32), ("reason", reason, 16),
                                      ("instance_id", instance_id or "", 16),
                                      ("actor", actor.principal, 128)):
            if len(value) > longest:
                raise ValueError(f"{field} longer than the column ({longest} characters)")
        token = TOKEN_PREFIX + random_source.token_urlsafe(TOKEN_BYTES)
        now = self._now()
        record = ConfirmationRecord(
            token_hash=token_hash(token), actor=actor.principal, operation=operation, reason=reason,
            instance_id=instance_id,
            args=json.dumps(args, sort_keys=True, ensure_ascii=False),
            sealed=self.sealer.seal(secrets) if secrets else None,
            accepted_dph_micros=to_micros(accepted_dph) if accepted_dph is not None else None,
            created_at=now, expires_at=now + self.ttl)
        s.add(record)
        s.flush()
        return Issued(token=token, expires_at=record.expires_at)

    def _read(self, s: Session, digest: str) -> ConfirmationRecord | None:
        stmt = (select(ConfirmationRecord).where(col(ConfirmationRecord.token_hash) == digest)
                .execution_options(populate_existing=True))
        return s.execute(stmt).scalars().one_or_none()

    def _own(self, s: Session, actor: Actor, token: str) -> tuple[str, ConfirmationRecord]:
        """The question `token` answers, if it was asked of `actor` (else refused, revealing nothing)."""
        digest = _check_token(token)
        row = self._read(s, digest)
        if row is None:
            raise NotFound("That confirmation is not known or already cleaned up; ask again.")
        if row.actor != actor.principal:
            raise PermissionDenied("That confirmation was asked of someone else; only they can answer it.")
        return digest, row

    def take(self, s: Session, actor: Actor, token: str) -> Pending | Replayed:
        digest, row = self._own(s, actor, token)
        now = self._now()
        if row.used_at is not None:
            return self._answered(row)
        if as_utc(row.expires_at) <= now:
            raise Conflict(f"That confirmation expired at {as_utc(row.expires_at):%Y-%m-%d %H:%M} UTC; "
                           "ask again.")
        secret = self.sealer.unseal(row.sealed) if row.sealed else {}
        claimed = s.execute(
            _update()
            .where(col(ConfirmationRecord.token_hash) == digest,
                   col(ConfirmationRecord.actor) == actor.principal,
                   col(ConfirmationRecord.used_at).is_(None),
                   col(ConfirmationRecord.expires_at) > now)
            .values(used_at=now))
        if _rows(claimed) != 1:       # another yes claimed it between the read and the update
            again = self._read(s, digest)
            if again is None:
                raise NotFound("That confirmation is not known or already cleaned up; ask again.")
            if again.used_at is not None:
                return self._answered(again)
            raise Conflict(f"That confirmation expired at {as_utc(again.expires_at):%Y-%m-%d %H:%M} UTC; "
                           "ask again.")
        masked = json.loads(row.args)
        return Pending(
            operation=row.operation, reason=row.reason, instance_id=row.instance_id,
            args={**masked, **secret}, masked_args=masked, secret_names=tuple(sorted(secret)),
            accepted_dph=(from_micros(row.accepted_dph_micros)
                          if row.accepted_dph_micros is not None else None),
            token_hash=digest, expires_at=as_utc(row.expires_at))

    @staticmethod
    def _answered(row: ConfirmationRecord) -> Replayed:
        if row.result is None:
            raise Conflict("That confirmation is being carried out already.")
        if row.result == SUPERSEDED:
            raise Conflict("That confirmation was replaced by a newer question; answer that one.")
        if row.result == DECLINED:
            raise Conflict("That confirmation was declined; ask again.")
        return Replayed(result_json=row.result)

    def finish(self, s: Session, token_hash: str, result_json: str) -> None:
        """Record what the yes did (JSON, no secrets in it) and wipe the sealed secrets."""
        json.loads(result_json)       # a marker or garbage must not pass for a result
        done = s.execute(
            _update()
            .where(col(ConfirmationRecord.token_hash) == token_hash,
                   col(ConfirmationRecord.used_at).is_not(None),
                   col(ConfirmationRecord.result).is_(None))
            .values(result=result_json, sealed=None))
        if _rows(done) != 1:
            raise Conflict("That confirmation is not being carried out.")

    def release(self, s: Session, token_hash: str) -> None:
        """Undo a claim whose work failed before doing anything: the user may say yes again.
        The sealed secrets stay."""
        s.execute(
            _update()
            .where(col(ConfirmationRecord.token_hash) == token_hash,
                   col(ConfirmationRecord.used_at).is_not(None),
                   col(ConfirmationRecord.result).is_(None))
            .values(used_at=None))

    def supersede(self, s: Session, token_hash: str) -> None:
        """The yes was answered with a new question (the price rose): this one is spent."""
        self._close(s, token_hash, SUPERSEDED)

    def cancel(self, s: Session, actor: Actor, token: str) -> None:
        """The user said no: the question is spent and its secrets wiped."""
        digest, row = self._own(s, actor, token)
        if row.used_at is not None:
            self._answered(row)
            raise Conflict("That confirmation was carried out already.")
        self._close(s, digest, DECLINED)

    def _close(self, s: Session, digest: str, marker: str) -> None:
        s.execute(
            _update()
            .where(col(ConfirmationRecord.token_hash) == digest, col(ConfirmationRecord.result).is_(None))
            .values(result=marker, sealed=None,
                    used_at=func.coalesce(col(ConfirmationRecord.used_at), self._now())))

    def purge(self, s: Session, now: datetime) -> int:
        """Wipe the seals of expired questions; delete rows a day past their expiry. Returns the
        number of rows deleted."""
        now = as_utc(now)
        s.execute(
            _update()
            .where(col(ConfirmationRecord.expires_at) <= now, col(ConfirmationRecord.sealed).is_not(None))
            .values(sealed=None))
        gone = s.execute(_delete()
                         .where(col(ConfirmationRecord.expires_at) < now - RETENTION))
        return _rows(gone)
