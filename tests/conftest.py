"""Shared fixtures: real databases, SQLite and PostgreSQL, fresh for every test.

``database_url`` is parametrized over both backends and names a new, empty database; ``engine`` and
``session_factory`` migrate it to head first. PostgreSQL comes from ``TRIAGE_TEST_PG_URL`` (default
``postgresql+asyncpg://postgres@127.0.0.1:5432/``): every test gets its own database, named after this
test session, dropped afterwards. If the server is unreachable the PostgreSQL cases skip with the reason,
or fail when ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.storage.database import create_db_engine, create_session_factory, upgrade_database
from classifier.paths import DATA_DIR_ENV

PG_URL_ENV = "TRIAGE_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/"

T = TypeVar("T")

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def run_outside_loop(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in another thread.

    Sync fixtures use this for admin work, so pytest-asyncio's own event loops are never touched.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, factory()).result()


@dataclass
class PostgresServer:
    """The test server, and the databases this test session made on it."""

    url: URL  # postgresql+asyncpg://..., database = the maintenance database
    prefix: str
    _counter: int = 0

    def _dsn(self) -> str:
        return self.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def url_for(self, database: str) -> URL:
        return self.url.set(database=database)

    async def _execute(self, *statements: str) -> None:
        connection = await asyncpg.connect(self._dsn(), timeout=10)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    def create_database(self) -> str:
        self._counter += 1
        name = f"{self.prefix}_{self._counter}"
        run_outside_loop(lambda: self._execute(f'CREATE DATABASE "{name}"'))
        return name

    def drop_database(self, name: str) -> None:
        run_outside_loop(lambda: self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def drop_leftovers(self) -> None:
        async def sweep() -> None:
            connection = await asyncpg.connect(self._dsn(), timeout=10)
            try:
                rows = await connection.fetch(
                    "SELECT datname FROM pg_database WHERE datname LIKE $1", f"{self.prefix}\\_%"
                )
                for row in rows:
                    await connection.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
            finally:
                await connection.close()

        run_outside_loop(sweep)


def _server_url() -> URL:
    url = make_url(os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL)
    return url.set(drivername="postgresql+asyncpg", database=url.database or "postgres")


@pytest.fixture(scope="session", autouse=True)
def _private_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test writes into the user's real data directory: TRIAGE_DATA_DIR points to a scratch folder
    for the whole session (tests that need their own set it again; subprocesses inherit it)."""
    saved = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(tmp_path_factory.mktemp("triage-data"))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = saved


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    url = _server_url()

    async def ping() -> None:
        connection = await asyncpg.connect(
            url.set(drivername="postgresql").render_as_string(hide_password=False), timeout=5
        )
        await connection.close()

    try:
        run_outside_loop(ping)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        reason = f"PostgreSQL not reachable at {url.render_as_string(hide_password=True)}: {exc!r}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the PostgreSQL tests must run)")
        pytest.skip(f"{reason} (set {PG_URL_ENV} to point elsewhere)")
    server = PostgresServer(url=url, prefix=f"triage_test_{os.getpid()}_{uuid.uuid4().hex[:6]}")
    try:
        yield server
    finally:
        server.drop_leftovers()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[URL]:
    """A new, empty database on each backend."""
    if backend == "sqlite":
        yield URL.create("sqlite+aiosqlite", database=str(tmp_path / "triage.db"))
        return
    # Looked up lazily, so SQLite-only runs never need the server.
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database()
    try:
        yield server.url_for(name)
    finally:
        server.drop_database(name)


@pytest.fixture
async def engine(database_url: URL) -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh database migrated to head."""
    await upgrade_database(database_url)
    engine = create_db_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_session_factory(engine)
