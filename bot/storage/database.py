"""Where the database is, how to connect to it, and whether its schema matches the code.

SQLite (the embedded default, under the data directory) and PostgreSQL (production) behind one
``AsyncEngine``; the schema is owned by the Alembic migrations in the ``migrations`` package.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import event, pool, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.util.queue import AsyncAdaptedQueue

DATABASE_URL_ENV = "DATABASE_URL"
SQLITE_DRIVER = "sqlite+aiosqlite"
POSTGRES_DRIVER = "postgresql+asyncpg"
# How long a SQLite writer waits for another writer's lock before failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 15_000


class DatabaseConfigError(ValueError):
    """A database URL that cannot be used."""


class SchemaMismatchError(RuntimeError):
    """The database schema is not the one this code was written for."""

    def __init__(self, current: str | None, required: str, *, known: bool) -> None:
        self.current = current
        self.required = required
        shown = current or "empty (no tables yet)"
        if known:
            message = f"database schema is at {shown}, the code needs {required}: run `triage db upgrade`"
        else:
            message = (
                f"database schema is at {shown}, which this version of triage does not know "
                f"(the code needs {required}): the database was migrated by a newer triage; upgrade triage"
            )
        super().__init__(message)


def default_database_url() -> URL:
    """``sqlite+aiosqlite:///<data dir>/triage.db``; the data directory honours ``TRIAGE_DATA_DIR``."""
    from classifier.paths import data_dir

    return URL.create(SQLITE_DRIVER, database=str(data_dir() / "triage.db"))


def resolve_database_url(url: str | URL | None = None) -> URL:
    """The URL to use: ``url`` if given, else ``$DATABASE_URL``, else the SQLite file in the data directory.

    ``postgresql://`` and ``postgres://`` are rewritten to asyncpg, ``sqlite://`` to aiosqlite. Raises
    ``DatabaseConfigError`` naming the problem; the password never appears in a message.
    """
    source = "the database URL" if url is not None else DATABASE_URL_ENV
    if url is None:
        from bot.settings import DatabaseSettings  # here: the settings import the storage layer

        url = DatabaseSettings().database_url
    if url is None:
        return default_database_url()
    if isinstance(url, str):
        try:
            parsed = make_url(url.strip())
        except ArgumentError:
            # Not echoed: an unparsable URL may still hold a password.
            raise DatabaseConfigError(
                f"{source} cannot be parsed; expected e.g. sqlite+aiosqlite:////path/to/triage.db "
                f"or postgresql+asyncpg://user:password@host:5432/dbname"
            ) from None
    else:
        parsed = url
    return _normalise(parsed, source)


def _normalise(url: URL, source: str) -> URL:
    shown = url.render_as_string(hide_password=True)
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "asyncpg"):
            raise DatabaseConfigError(
                f"{source} {shown} uses the driver {driver!r}; triage talks to PostgreSQL through asyncpg: "
                f"use {POSTGRES_DRIVER}://..."
            )
        url = url.set(drivername=POSTGRES_DRIVER)
        # libpq spells it sslmode (as hosted providers' URLs do); asyncpg takes the same values as ssl.
        if "sslmode" in url.query and "ssl" not in url.query:
            url = url.difference_update_query(["sslmode"]).update_query_dict({"ssl": url.query["sslmode"]})
        if not url.host and not url.query.get("host"):
            raise DatabaseConfigError(f"{source} {shown} names no host")
        return url
    if backend == "sqlite":
        if driver not in ("", "aiosqlite"):
            raise DatabaseConfigError(
                f"{source} {shown} uses the driver {driver!r}; use {SQLITE_DRIVER}:///path/to/triage.db"
            )
        if not url.database or url.database == ":memory:" or url.query.get("mode") == "memory":
            # Every connection would see its own empty database, and the migrations would vanish.
            raise DatabaseConfigError(
                f"{source} {shown} is an in-memory SQLite database; give a file: "
                f"{SQLITE_DRIVER}:////path/to/triage.db"
            )
        return url.set(drivername=SQLITE_DRIVER)
    raise DatabaseConfigError(
        f"{source} {shown}: unsupported database {backend!r}; use {SQLITE_DRIVER}:///... "
        f"or {POSTGRES_DRIVER}://..."
    )


# --- connections first in line ------------------------------------------------------------------------

_FIRST_IN_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar("first_in_line", default=False)


@contextlib.contextmanager
def first_in_line() -> Iterator[None]:
    """Sessions opened in this block (this task and those it starts) get the next free pooled connection
    before everyone already waiting: for storing Slack events before their acknowledgement, which must not
    queue behind the background work when every connection is busy (SQLite has only one)."""
    token = _FIRST_IN_LINE.set(True)
    try:
        yield
    finally:
        _FIRST_IN_LINE.reset(token)


class _WaitLine(asyncio.Queue[Any]):
    """asyncio's FIFO of free connections, except that a waiter in ``first_in_line`` is handed the next
    connection returned before the waiters asyncio keeps."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._ahead: deque[asyncio.Future[Any]] = deque()
        self.waiting = 0

    async def get(self) -> Any:
        self.waiting += 1
        try:
            if not _FIRST_IN_LINE.get() or not self.empty():
                return await super().get()
            return await self._get_first()
        finally:
            self.waiting -= 1

    async def _get_first(self) -> Any:
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ahead.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed over as it gave up: pass it on
                self.put_nowait(waiter.result())
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._ahead.remove(waiter)

    def put_nowait(self, item: Any) -> None:
        while self._ahead:
            waiter = self._ahead.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return
        super().put_nowait(item)


class _WaitLineQueue(AsyncAdaptedQueue[Any]):
    @functools.cached_property
    def _queue(self) -> asyncio.Queue[Any]:  # type: ignore[override]
        return _WaitLine(self.maxsize)  # made on first use, in the running loop, as SQLAlchemy does


class FirstInLinePool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio pool, with ``first_in_line`` waiters served before the others."""

    _queue_class = _WaitLineQueue

    def waiting(self) -> int:
        """Sessions waiting for a connection now."""
        line = self._pool._queue
        return line.waiting if isinstance(line, _WaitLine) else 0


def create_db_engine(
    url: str | URL | None = None,
    *,
    echo: bool = False,
    sqlite_foreign_keys: bool = True,
    poolclass: type[pool.Pool] | None = None,
    **kwargs: Any,
) -> AsyncEngine:
    """An ``AsyncEngine`` for ``url`` (resolved as in ``resolve_database_url``).

    SQLite connections get WAL (readers do not block the writer), foreign keys, and a busy timeout. The
    pool serves ``first_in_line`` sessions first.
    ``sqlite_foreign_keys=False`` is for migrations: SQLite's batch mode recreates tables, and dropping a
    parent table with foreign keys on would cascade-delete its children.
    """
    resolved = resolve_database_url(url)
    kwargs["poolclass"] = poolclass or FirstInLinePool
    if resolved.get_backend_name() == "sqlite":
        if resolved.database and not resolved.database.startswith("file:"):
            Path(resolved.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        db_engine = create_async_engine(resolved, echo=echo, **kwargs)
        _configure_sqlite(db_engine, foreign_keys=sqlite_foreign_keys)
        return db_engine
    # pool_pre_ping: a PostgreSQL restart should cost one reconnect, not a failed Slack event.
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(resolved, echo=echo, **kwargs)


def _configure_sqlite(db_engine: AsyncEngine, *, foreign_keys: bool) -> None:
    @event.listens_for(db_engine.sync_engine, "connect")
    def _set_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable enough with WAL, and much faster
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            # Overwrite deleted content with zeros, so a removed text does not linger in free space.
            cursor.execute("PRAGMA secure_delete=ON")
        finally:
            cursor.close()


async def erase_freed_space(db_engine: AsyncEngine, *, vacuum: bool = True) -> bool:
    """After texts were removed: make the database files stop holding them, as far as the database allows.

    SQLite (``secure_delete`` already zeroes what a statement removes): ``VACUUM`` rebuilds the file, for
    pages freed before that, then ``wal_checkpoint(TRUNCATE)`` moves the WAL into the file and empties
    it. Returns ``False`` when a reader kept the WAL from being emptied (run again when it is idle).
    PostgreSQL: ``VACUUM`` of the message table removes the dead row versions from the table; the bytes
    may stay in the data files until the space is reused, in the WAL until its segments are recycled,
    and in backups. ``VACUUM FULL messages`` (it locks the table) rewrites the table into a new file.
    """
    async with db_engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        if db_engine.dialect.name != "sqlite":
            await autocommit.execute(text("VACUUM messages"))
            return True
        if vacuum:
            await autocommit.execute(text("VACUUM"))
        busy = (await autocommit.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))).scalar()
        return not busy


def create_session_factory(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for units of work: ``async with factory.begin() as session: ...``.

    ``expire_on_commit=False`` so rows returned by the repository stay readable after the commit.
    """
    return async_sessionmaker(db_engine, expire_on_commit=False)


# --- schema version ----------------------------------------------------------------------------------


async def in_transaction(
    sessions: async_sessionmaker[AsyncSession],
    work: Callable[[AsyncSession], Awaitable[Any]],
    within_s: float = 60.0,
) -> None:
    """Run ``work`` in a transaction, retried with back-off (0.2 s doubling to 5 s) on database errors for
    up to ``within_s``: for bookkeeping after something went out to Slack, where giving up would mean
    posting it twice later."""
    deadline = time.monotonic() + within_s
    delay = 0.2
    while True:
        try:
            async with sessions.begin() as session:
                await work(session)
            return
        except (SQLAlchemyError, OSError, TimeoutError):
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def migrations_dir() -> Path:
    """The ``migrations`` package folder (works from a source checkout and from an installed wheel)."""
    import migrations

    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic ``Config`` built in code, so ``triage db upgrade`` needs no ``alembic.ini``.

    The URL travels in ``config.attributes`` rather than the ini options, whose %-interpolation would
    mangle passwords containing ``%``.
    """
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.attributes["database_url"] = resolve_database_url(url)
    return config


def head_revision() -> str:
    """The schema revision this code needs."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads ({', '.join(heads)}); merge them")
    return heads[0]


def _current_revision(connection: Connection) -> str | None:
    heads = MigrationContext.configure(connection).get_current_heads()
    return ",".join(sorted(heads)) if heads else None


async def current_revision(db_engine: AsyncEngine) -> str | None:
    """The revision the database is at; ``None`` for a database never migrated."""
    async with db_engine.connect() as connection:
        return await connection.run_sync(_current_revision)


async def check_schema(db_engine: AsyncEngine) -> None:
    """Raise ``SchemaMismatchError`` unless the database is exactly at the code's revision.

    The bot and the server call this at start-up and refuse to run on an outdated (or newer) schema.
    """
    required = head_revision()
    current = await current_revision(db_engine)
    if current == required:
        return
    script = ScriptDirectory.from_config(alembic_config())
    known = current is None or all(_is_known(script, rev) for rev in current.split(","))
    raise SchemaMismatchError(current, required, known=known)


def _is_known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except (CommandError, RevisionError):  # an id this code's migrations do not have
        return False


async def _run_alembic(url: str | URL | None, operation: str, revision: str) -> None:
    """Run an Alembic command on a private connection (inside the running event loop, no ``asyncio.run``)."""
    resolved = resolve_database_url(url)
    config = alembic_config(resolved)
    # NullPool: the migration connection is not reused; no foreign keys on SQLite (see create_db_engine).
    db_engine = create_db_engine(resolved, sqlite_foreign_keys=False, poolclass=pool.NullPool)
    try:
        async with db_engine.begin() as connection:

            def run(sync_connection: Connection) -> None:
                config.attributes["connection"] = sync_connection
                getattr(command, operation)(config, revision)

            await connection.run_sync(run)
    finally:
        await db_engine.dispose()


async def upgrade_database(url: str | URL | None = None, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (default: the newest)."""
    await _run_alembic(url, "upgrade", revision)


async def downgrade_database(url: str | URL | None, revision: str) -> None:
    """Migrate the database back to ``revision`` (``"base"``: drop every table)."""
    await _run_alembic(url, "downgrade", revision)
