"""Leadership for the guard scheduler (SPEC §9): at most one process runs the guards at a time, and
another takes over soon after the leader dies.

* PostgreSQL deployments (several bot replicas on one database): a session-level advisory lock
  (`pg_try_advisory_lock`) held on ONE dedicated connection that is not taken from the pool. The
  server drops the lock as soon as that session ends: when the leader process dies its kernel
  closes the socket and the backend exits at once; when the leader's *host* vanishes, the
  server-side TCP keepalives set on the session (about 25 s) end it.
* Embedded SQLite deployments: an exclusive `fcntl.flock` on `<home>/guards.lock`, so two shells on
  one machine don't both run guards. The OS drops it when the process dies.

Use: the scheduler calls `try_acquire()` on every tick and runs the guards only when it returns
True; a leader calls `holds()` (or `try_acquire()`, which re-verifies) before each round so a
leader that lost its connection stops. All methods are synchronous and quick: usually one round
trip to PostgreSQL (a few more plus a connect when (re)connecting), each bounded by short timeouts
(connect 5 s, statements 5 s). Async callers may call them directly, or through
`asyncio.to_thread` so an unreachable database never stalls the event loop for those seconds.
They never raise for a database that is unreachable: they report "not the leader" and log why
(see `describe()`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Self

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

# int.from_bytes(sha256(b"gpuherd-guards").digest()[:8], "big", signed=True); fixed so that every
# replica of every version agrees on it (tests check the derivation).
GUARDS_LOCK_KEY = 8116395735250043604
GUARDS_LOCK_FILE = "guards.lock"

CONNECT_TIMEOUT_S = 5
# Client side: notice a dead server/peer on the dedicated connection.
_CLIENT_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
_TCP_USER_TIMEOUT_MS = 15_000        # libpq >= 12: unacknowledged data gives up after this
# Server side (session GUCs): the server notices a vanished leader host and frees the lock.
_SERVER_SETTINGS = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3",
                    "statement_timeout": "5s", "lock_timeout": "5s"}


def derive_key(name: str) -> int:
    """A signed 64-bit advisory-lock key from a name (the first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class Leadership(ABC):
    """Who runs the guards. Synchronous and quick; safe to call from several threads."""

    @abstractmethod
    def try_acquire(self) -> bool:
        """Non-blocking. True if this process now holds leadership or already held it (re-verified)."""

    @abstractmethod
    def holds(self) -> bool:
        """True only if leadership is still held, checked now (e.g. the dedicated connection is alive)."""

    @abstractmethod
    def release(self) -> None:
        """Give leadership up (idempotent); another process can acquire it right after this returns."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and `status`, e.g. "PostgreSQL advisory lock 7267011 (held)"."""

    def close(self) -> None:
        """Release and free any resources (connections); the object may be used again afterwards."""
        self.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class FileLeadership(Leadership):
    """An exclusive, non-blocking `flock` on a lock file. flock belongs to the open file description,
    so a second instance in the same process conflicts just like another process does."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._mutex = threading.Lock()

    def try_acquire(self) -> bool:
        import fcntl

        with self._mutex:
            if self._fd is not None:
                if self._still_ours():
                    return True
                self._drop()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:          # BlockingIOError: someone else holds it
                os.close(fd)
                return False
            self._fd = fd
            try:                     # for people wondering who holds it
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass
            if not self._still_ours():   # the file was replaced between open and flock
                self._drop()
                return False
            log.info("guard leadership acquired: %s", self._describe())
            return True

    def holds(self) -> bool:
        with self._mutex:
            if self._fd is None:
                return False
            if self._still_ours():
                return True
            log.warning("guard lock file %s was removed or replaced; leadership lost", self.path)
            self._drop()
            return False

    def release(self) -> None:
        with self._mutex:
            self._drop()

    def describe(self) -> str:
        with self._mutex:
            return self._describe()

    def _describe(self) -> str:
        return f"file lock {self.path} ({'held' if self._fd is not None else 'not held'})"

    def _still_ours(self) -> bool:
        """The locked file is still the one at `path` (deleting it and locking a new one elsewhere
        would otherwise let two processes lead)."""
        assert self._fd is not None
        try:
            mine, there = os.fstat(self._fd), os.stat(self.path)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    def _drop(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)     # closing the last descriptor of the description releases the flock


def _postgres_url(url: str | URL) -> URL:
    u = make_url(url)
    backend, _, driver = u.drivername.partition("+")
    if backend in ("postgres", "postgresql") and not driver:
        u = u.set(drivername="postgresql+psycopg")   # as core.db.make_engine does
    elif backend == "postgres":
        u = u.set(drivername=f"postgresql+{driver}")
    return u


def _connect_args() -> dict[str, object]:
    args: dict[str, object] = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "gpuherd-guards-leader",
                               **_CLIENT_KEEPALIVES}
    try:
        import psycopg

        if psycopg.pq.version() >= 120000:
            args["tcp_user_timeout"] = _TCP_USER_TIMEOUT_MS
    except ImportError:  # psycopg2 or another libpq driver: skip the optional parameter
        pass
    return args


class PostgresAdvisoryLeadership(Leadership):
    """A session-level PostgreSQL advisory lock on one dedicated connection (never the pool's).
    The lock lives exactly as long as that session; a connection error means leadership is lost
    and the next `try_acquire` reconnects. Nothing connects before the first `try_acquire`."""

    def __init__(self, url_or_engine: str | URL | Engine, key: int = GUARDS_LOCK_KEY) -> None:
        if not -(2 ** 63) <= key < 2 ** 63:
            raise ValueError(f"advisory lock key {key} does not fit in a signed 64-bit integer")
        url = url_or_engine.url if isinstance(url_or_engine, Engine) else url_or_engine
        self.key = key
        self.url = _postgres_url(url)
        # A private engine without a pool: each connect() is a fresh session that we keep open.
        self._engine = create_engine(self.url, poolclass=NullPool, connect_args=_connect_args())
        self._conn: Connection | None = None
        self._held = False
        self._pid: int | None = None
        self._last_error: str | None = None
        self._mutex = threading.Lock()

    @property
    def backend_pid(self) -> int | None:
        """The server pid of the dedicated session, while connected."""
        return self._pid if self._conn is not None else None

    def try_acquire(self) -> bool:
        with self._mutex:
            if self._held and self._check():
                return True
            try:
                conn = self._connection()
                # Never call this twice on a session that holds the lock: advisory locks stack.
                got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
            except (SQLAlchemyError, OSError) as exc:
                self._fail("try_acquire", exc)
                return False
            self._last_error = None
            newly = got and not self._held
            self._held = got
            if newly:
                log.info("guard leadership acquired: %s", self._describe())
            return got

    def holds(self) -> bool:
        with self._mutex:
            return self._held and self._check()

    def release(self) -> None:
        """Unlock explicitly (so another replica can acquire at once) and keep the idle session for
        the next `try_acquire`; `close()` also ends the session."""
        with self._mutex:
            held, self._held = self._held, False
            if self._conn is None or not held:
                return
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            except (SQLAlchemyError, OSError) as exc:   # the session is gone, and the lock with it
                self._fail("release", exc)
                return
            log.info("guard leadership released: %s", self._describe())

    def describe(self) -> str:
        with self._mutex:
            return self._describe()

    def close(self) -> None:
        """Release, end the dedicated session and dispose of the private engine."""
        self.release()
        with self._mutex:
            conn, self._conn = self._conn, None
            if conn is not None:
                self._close(conn)
        self._engine.dispose()

    # -- internals (called with the mutex held) --

    def _describe(self) -> str:
        where = f"{self.url.host or 'localhost'}:{self.url.port or 5432}/{self.url.database or ''}"
        state = "held" if self._held else "not held"
        if self._held and self._pid is not None:
            state += f", backend pid {self._pid}"
        if self._last_error:
            state += f"; last error: {self._last_error}"
        return f"PostgreSQL advisory lock {self.key} on {where} ({state})"

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                pid, version = conn.execute(text(
                    "SELECT pg_backend_pid(), current_setting('server_version_num')::int")).one()
                settings = dict(_SERVER_SETTINGS)
                if version >= 140000:
                    settings["idle_session_timeout"] = "0"   # the session is idle between ticks
                conn.execute(text("SELECT " + ", ".join(f"set_config('{name}', :v{i}, false)"
                                                        for i, name in enumerate(settings))),
                             {f"v{i}": value for i, value in enumerate(settings.values())})
            except BaseException:
                self._close(conn)
                raise
            self._conn, self._pid = conn, pid
        return self._conn

    def _check(self) -> bool:
        """One round trip: the session is alive and pg_locks shows our pid holding our key."""
        if self._conn is None:
            self._held = False
            return False
        unsigned = self.key & 0xFFFF_FFFF_FFFF_FFFF
        try:
            ok = bool(self._conn.execute(text(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND pid = pg_backend_pid() AND objsubid = 1"
                " AND classid = CAST(:hi AS bigint)::oid AND objid = CAST(:lo AS bigint)::oid)"),
                {"hi": unsigned >> 32, "lo": unsigned & 0xFFFF_FFFF}).scalar())
        except (SQLAlchemyError, OSError) as exc:
            self._fail("holds", exc)
            return False
        if not ok:
            log.warning("advisory lock %s is no longer held by this session; leadership lost", self.key)
        self._held = ok
        return ok

    def _fail(self, what: str, exc: BaseException) -> None:
        was_held = self._held
        first_line = (str(exc).strip().splitlines() or [""])[0]
        self._last_error = f"{type(exc).__name__}: {first_line}"
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            self._close(conn)
        if was_held:
            log.warning("guard leadership lost (%s failed: %s)", what, self._last_error)
        else:
            log.warning("guard leadership unavailable (%s failed: %s)", what, self._last_error)

    @staticmethod
    def _close(conn: Connection) -> None:
        with contextlib.suppress(Exception):
            conn.invalidate()     # don't try a graceful rollback on a possibly dead socket
        with contextlib.suppress(Exception):
            conn.close()


def is_postgres_url(url: str) -> bool:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return scheme.split("+", 1)[0] in ("postgresql", "postgres")


def leadership_for(database_url: str, home: Path, name: str = "gpuherd-guards") -> Leadership:
    """PostgreSQL URL -> advisory lock on that database; anything else (SQLite) -> `home/guards.lock`.
    `name` picks the lock key, so two deployments sharing one database can each have a leader."""
    if is_postgres_url(database_url):
        return PostgresAdvisoryLeadership(database_url, key=derive_key(name))
    return FileLeadership(Path(home) / GUARDS_LOCK_FILE)


def guards_held_elsewhere(database_url: str, home: Path, name: str = "gpuherd-guards") -> bool:
    """Whether another process runs the guards for this database right now: the lock cannot be
    taken. Used to tell a one-shot `gpuherd boot` (which runs no guards itself) and a user leaving
    the shell whether the idle and budget guards are watching their machines. Synchronous (one
    lock attempt, released at once if won); call it off the loop."""
    with leadership_for(database_url, home, name) as probe:
        won = probe.try_acquire()
        if won:
            probe.release()
        return not won
