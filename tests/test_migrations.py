"""Migrations and models agree, migrate both ways, and guard start-up; on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import logging.config
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, inspect
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.storage import repository as repo
from bot.storage.database import (
    SchemaMismatchError,
    alembic_config,
    check_schema,
    create_db_engine,
    create_session_factory,
    current_revision,
    downgrade_database,
    head_revision,
    migrations_dir,
    upgrade_database,
)
from bot.storage.models import Base, CorrectionSource
from tests.conftest import run_outside_loop

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLES = {
    "messages",
    "slack_events",
    "predictions",
    "prediction_heads",
    "corrections",
    "forgotten_users",
    "training_runs",
    "training_run_events",
    "audit_log",
    "cards",
    "incidents",
}


def _diff(connection: Connection, metadata: MetaData) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True, "render_as_batch": True})
    return list(compare_metadata(context, metadata))


async def schema_diff(engine: AsyncEngine, metadata: MetaData = Base.metadata) -> list[Any]:
    async with engine.connect() as connection:
        return await connection.run_sync(_diff, metadata)


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))


def test_one_head_in_the_packaged_migrations() -> None:
    config = alembic_config()
    assert Path(config.get_main_option("script_location") or "") == REPO_ROOT / "migrations"
    assert migrations_dir() == REPO_ROOT / "migrations"
    assert ScriptDirectory.from_config(config).get_heads() == [head_revision()]
    assert head_revision() == "0008"


async def test_models_and_migrations_agree(engine: AsyncEngine) -> None:
    assert await schema_diff(engine) == []
    assert await table_names(engine) >= TABLES


async def test_the_comparison_would_notice_a_difference(engine: AsyncEngine) -> None:
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["messages"].append_column(Column("language", Integer))
    diff = await schema_diff(engine, drifted)
    assert [entry[0] for entry in diff] == ["add_column"]


async def test_upgrade_downgrade_upgrade(database_url: URL) -> None:
    await upgrade_database(database_url)
    engine = create_db_engine(database_url)
    try:
        async with create_session_factory(engine).begin() as session:
            message, _ = await repo.store_message(
                session, team_id="T1", channel_id="C1", ts="1.0", user_id="U1", text="hi"
            )
            await repo.add_correction(
                session, message.id, "topic", "bug", user_id="U2", source=CorrectionSource.BUTTON
            )
        assert await current_revision(engine) == head_revision()

        await downgrade_database(database_url, "base")
        assert await current_revision(engine) is None
        assert not (await table_names(engine)) & TABLES

        await upgrade_database(database_url)
        assert await current_revision(engine) == head_revision()
        assert await schema_diff(engine) == []
        await check_schema(engine)
    finally:
        await engine.dispose()


async def test_check_schema_refuses_an_outdated_database(database_url: URL) -> None:
    engine = create_db_engine(database_url)
    try:
        with pytest.raises(SchemaMismatchError) as empty:
            await check_schema(engine)
        assert str(empty.value) == (
            f"database schema is at empty (no tables yet), the code needs {head_revision()}: "
            "run `triage db upgrade`"
        )
        await upgrade_database(database_url)
        await check_schema(engine)
        # A database migrated by newer code: upgrading the database cannot help.
        async with engine.begin() as connection:
            await connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
        with pytest.raises(SchemaMismatchError, match="database schema is at 9999, which this version"):
            await check_schema(engine)
    finally:
        await engine.dispose()


def test_alembic_command_line_uses_alembic_ini(database_url: URL, monkeypatch: pytest.MonkeyPatch) -> None:
    """``alembic upgrade head`` from the repository root: env.py opens its own async engine."""
    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    # alembic.ini configures logging for the command line; keep the test process's logging as it is.
    monkeypatch.setattr(logging.config, "fileConfig", lambda *args, **kwargs: None)
    config = Config(str(REPO_ROOT / "alembic.ini"))
    command.upgrade(config, "head")

    async def revision() -> str | None:
        engine = create_db_engine(database_url)
        try:
            return await current_revision(engine)
        finally:
            await engine.dispose()

    assert run_outside_loop(revision) == head_revision()
    command.downgrade(config, "base")
    assert run_outside_loop(revision) is None


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:////nonexistent/t.db", "postgresql+asyncpg://u@h/db"])
def test_offline_sql(url: str) -> None:
    """``alembic upgrade head --sql`` prints the DDL without a database."""
    buffer = io.StringIO()
    config = alembic_config(url)
    config.output_buffer = buffer
    command.upgrade(config, "head", sql=True)
    sql = buffer.getvalue()
    assert "CREATE TABLE messages" in sql
    assert "CONSTRAINT uq_messages_team_id_channel_id_ts UNIQUE (team_id, channel_id, ts)" in sql
    assert ("JSONB" in sql) == url.startswith("postgresql")


# PostgreSQL only: there migrations take an advisory lock; an embedded SQLite file has a single process.
@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_concurrent_upgrades_wait_for_each_other(database_url: URL) -> None:
    """Two processes upgrading one database at once: the second waits, then has nothing to do."""
    script = (
        "import asyncio, sys; from bot.storage.database import upgrade_database; "
        "asyncio.run(upgrade_database(sys.argv[1]))"
    )
    url = database_url.render_as_string(hide_password=False)
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, url, cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    for process in processes:
        _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    engine = create_db_engine(database_url)
    try:
        await check_schema(engine)
    finally:
        await engine.dispose()
