"""Storage: the bot's database (SQLite embedded, PostgreSQL in production) behind async SQLAlchemy.

``database`` connects and checks the schema, ``models`` defines the tables, ``repository`` holds the
queries, ``cli`` the ``triage db`` and ``triage data forget/purge`` commands; migrations live in the
top-level ``migrations`` package.
"""

from bot.storage.database import (
    DatabaseConfigError,
    SchemaMismatchError,
    check_schema,
    create_db_engine,
    create_session_factory,
    resolve_database_url,
    upgrade_database,
)

__all__ = [
    "DatabaseConfigError",
    "SchemaMismatchError",
    "check_schema",
    "create_db_engine",
    "create_session_factory",
    "resolve_database_url",
    "upgrade_database",
]
