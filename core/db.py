"""Engine, sessions and migrations. SQLite (embedded default) is upgraded automatically at start;
a PostgreSQL deployment runs `gpuherd db upgrade` (or lets the first process do it).

Database work never runs on the event loop: `Database.run(fn)` runs one unit of work (a
function of a session) in a worker thread and awaits it. Threads rather than SQLAlchemy's
asyncio engine because every query in gpuherd is a short synchronous unit already, the same
code serves the sync CLI paths, and SQLite has no mature async driver; the pool of workers is
sized to the connection pool so a burst queues in Python, not on connections.

A database that cannot be used at start (PostgreSQL down or its database missing, a SQLite file
that is not a database or whose directory cannot be made) is a `ConfigError` naming
GPUHERD_DATABASE_URL, on one line and with any password hidden: `upgrade` and `is_current`
first `reach` the database, so the migrations never start on a connection that fails. Errors
after the start are not configuration and are left as they are."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlmodel import Session

from .errors import ConfigError

if TYPE_CHECKING:       # alembic loads only to migrate or read revisions (CLI start-up cost)
    from alembic.config import Config

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            parent = Path(path).parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"GPUHERD_DATABASE_URL ({shown_url(url)}) cannot be used: its directory "
                                  f"{parent} cannot be created ({' '.join(str(exc.strerror or exc).split())}).") from None
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    except Exception as exc:  # missing driver, malformed URL
        raise ConfigError(f"GPUHERD_DATABASE_URL cannot be used: {exc}") from None


def shown_url(url: str) -> str:
    """The URL with its password hidden, fit for a message."""
    try:
        return make_url(url).render_as_string(hide_password=True)[:200]
    except ArgumentError:
        return "(not a URL)"


def unusable(engine: Engine, exc: BaseException) -> ConfigError:
    """A failed connection as one line: the driver's first line, the URL without its password."""
    orig = getattr(exc, "orig", None) or exc
    first = " ".join((str(orig).strip().splitlines() or [""])[0].split())[:200]
    where = (f"{shown_url(engine.url.render_as_string(hide_password=False))}"
             if engine.dialect.name != "sqlite" else f"SQLite file {engine.url.database}")
    return ConfigError(f"The database cannot be used ({type(orig).__name__}: {first}). Check GPUHERD_DATABASE_URL "
                       f"({where}) and that the database is up (gpuherd db upgrade migrates it).")


def reach(engine: Engine) -> None:
    """Connect once (the SQLite pragmas run on connect, so a file that is not a database fails
    here), or raise `unusable`."""
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except DBAPIError as exc:
        raise unusable(engine, exc) from None


def rowcount(result: Result[*tuple[Any, ...]]) -> int:
    """Rows an UPDATE or DELETE matched. SQLModel's Session.execute is typed as returning a plain
    Result; for a DML statement it is always a CursorResult, which has the count."""
    assert isinstance(result, CursorResult)
    return result.rowcount


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    reach(engine)
    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    reach(engine)
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(create_engine("sqlite://"))).get_current_head()


def known_head(versions: Path) -> str | None:
    """The newest migration's id, read from the migration files without alembic (whose import
    alone costs a one-shot command about 0.15 s): each file must name exactly one `revision` and
    one `down_revision`, and exactly one revision may be no file's `down_revision`. None when
    anything does not fit that (then alembic decides)."""
    import re

    revisions: set[str] = set()
    downs: set[str] = set()
    for path in sorted(versions.glob("*.py")):
        if path.name.startswith("_"):
            continue
        text_ = path.read_text(encoding="utf-8")
        revs = re.findall(r"""^revision\s*(?::[^=\n]*)?=\s*['"]([^'"]+)['"]""", text_, re.M)
        down = re.findall(r"^down_revision\s*(?::[^=\n]*)?=\s*(.+)$", text_, re.M)
        if len(revs) != 1 or len(down) != 1:
            return None
        revisions.add(revs[0])
        downs.update(re.findall(r"""['"]([^'"]+)['"]""", down[0]))
    heads = revisions - downs
    return heads.pop() if len(heads) == 1 else None


def stored_revision(engine: Engine) -> str | None:
    """The revision the database records, with one plain query (None: no table yet, unreadable)."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except SQLAlchemyError:
        return None
    return rows[0] if len(rows) == 1 else None


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        # Four workers on either database. SQLite serialises writers anyway (WAL, busy timeout).
        # On PostgreSQL more workers do not mean more throughput: each holds the interpreter lock
        # for most of its unit of work (SQLAlchemy's ORM is Python), and the loop queues for that
        # lock behind them. Measured (bench_loop_lag boot100, 100 concurrent boots, 1,000
        # instances): 10 workers 1.3-2.0 s and loop stalls up to 124 ms; 4 workers 1.0-1.5 s and
        # 15-23 ms. The pool (5 + overflow 5) leaves connections for the leader lock and the rest.
        self._workers = 4
        self._executor: ThreadPoolExecutor | None = None

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def upgrade(self) -> None:
        upgrade(self.engine)

    def is_current(self) -> bool:
        return current_revision(self.engine) == head_revision()

    def at_head(self) -> bool:
        """`is_current` without alembic: True only when the stored revision is certainly the newest
        migration's; False when unsure (then `upgrade`, a no-op on a current database, decides)."""
        try:
            head = known_head(MIGRATIONS / "versions")
        except OSError:
            return False
        return head is not None and stored_revision(self.engine) == head

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    async def run(self, fn: Callable[[Session], T]) -> T:
        """Run `fn(session)` in a worker thread: the event loop keeps serving while the database
        works. `fn` commits what it wants kept; the session closes when it returns."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="gpuherd-db")
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, self._in_session, fn)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _in_session(self, fn: Callable[[Session], T]) -> T:
        with self.session() as s:
            return fn(s)

    async def call(self, fn: Callable[[], T]) -> T:
        """Other blocking work (no session) on the same workers."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="gpuherd-db")
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(ctx.run, fn))

    async def release(self, *held: list[Any] | dict[Any, Any]) -> None:
        """Empty `held` in a worker thread, so the rows in them are freed there: freeing ORM rows
        by the thousand (SQLAlchemy's per-object clean-up) held the loop 20-40 ms at 10,000 rows
        when the last reference went away in a coroutine. For callers that carry a whole table's
        rows across an await (reconcile); a few rows are not worth the thread hop."""
        if any(held):
            await self.call(lambda: [h.clear() for h in held])

    def dispose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.engine.dispose()
