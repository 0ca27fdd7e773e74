"""``triage db upgrade|current``, ``triage messages retry`` and ``triage data forget|purge``.

Wiring (``bot/cli.py``): ``register(app)`` adds the ``db`` group; ``forget_command`` and ``purge_command``
are plain typer commands to attach to the ``data`` group the classifier's CLI creates, e.g.
``register_data_commands(data_app)`` or ``data_app.command("forget")(forget_command)``.
"""

from __future__ import annotations

import asyncio
import getpass
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from bot.storage import repository
from bot.storage.database import (
    DatabaseConfigError,
    SchemaMismatchError,
    check_schema,
    create_db_engine,
    create_session_factory,
    current_revision,
    head_revision,
    resolve_database_url,
    upgrade_database,
)
from bot.storage.models import utcnow

RETENTION_DAYS_ENV = "TRIAGE_RETENTION_DAYS"
# Slack retries a delivery within minutes; event ids older than this are of no use.
EVENT_ID_RETENTION_DAYS = 1
SLACK_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,31}$")

T = TypeVar("T")

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="DATABASE_URL",
        show_envvar=True,
        show_default=False,
        help="Database URL; default: SQLite in the data directory (TRIAGE_DATA_DIR).",
    ),
]

db_app = typer.Typer(
    name="db",
    help="The database schema: migrate it, or show where it stands.",
    no_args_is_help=True,
)


messages_app = typer.Typer(
    name="messages",
    help="Stored Slack messages: bring skipped ones back.",
    no_args_is_help=True,
)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _run(database_url: str | None, work: Callable[[URL], Coroutine[Any, Any, T]]) -> T:
    """Resolve the URL and run ``work``, turning configuration and connection errors into messages."""
    try:
        url = resolve_database_url(database_url)
    except DatabaseConfigError as exc:
        raise _fail(str(exc), code=2) from None
    try:
        return asyncio.run(work(url))
    except SchemaMismatchError as exc:
        raise _fail(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        # The URL is shown without its password; driver messages never contain it.
        detail = getattr(exc, "orig", None) or exc
        raise _fail(f"cannot use the database {_shown(url)}: {detail}") from None


async def _in_session(url: URL, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """One unit of work on a database whose schema is current."""
    db_engine = create_db_engine(url)
    try:
        await check_schema(db_engine)
        async with create_session_factory(db_engine).begin() as session:
            return await work(session)
    finally:
        await db_engine.dispose()


async def _removing_texts(url: URL, work: Callable[[AsyncSession], Awaitable[T]]) -> tuple[T, str]:
    """``work`` removes texts from the database; then every other copy goes too (model versions under the
    data directory, free pages and the WAL of the database files). Returns its result and what was done."""
    from bot.retrain import erase_removed_texts  # the feedback loop knows where versions copy Slack rows
    from classifier.paths import registry_dir
    from classifier.registry import Registry

    db_engine = create_db_engine(url)
    try:
        await check_schema(db_engine)
        sessions = create_session_factory(db_engine)
        async with sessions.begin() as session:
            result = await work(session)
        erased, clean = await erase_removed_texts(db_engine, sessions, Registry(registry_dir()), vacuum=True)
    finally:
        await db_engine.dispose()
    note = f"; erased {erased} row(s) from model versions"
    if not clean:
        note += "; the database's WAL is still in use: run the command again when the bot is idle"
    return result, note


async def _current(url: URL) -> str | None:
    db_engine = create_db_engine(url)
    try:
        return await current_revision(db_engine)
    finally:
        await db_engine.dispose()


def _operator() -> str:
    """Who ran a command line action, for the audit log."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        name = "unknown"
    return f"cli:{name}"[:32]


@db_app.command("upgrade")
def upgrade_command(
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create or migrate the database schema (Alembic) to the version this code needs."""

    async def work(url: URL) -> tuple[str, str | None]:
        await upgrade_database(url, revision)
        return _shown(url), await _current(url)

    shown, current = _run(database_url, work)
    typer.echo(f"{shown}: schema at revision {current}")


@db_app.command("current")
def current_command(
    check: Annotated[
        bool, typer.Option("--check", help="Exit with status 1 unless the schema is up to date.")
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Show the database's schema revision and the one this code needs."""

    async def work(url: URL) -> tuple[str, str | None]:
        return _shown(url), await _current(url)

    shown, current = _run(database_url, work)
    head = head_revision()
    typer.echo(f"database: {shown}")
    typer.echo(f"current:  {current or 'none (empty database)'}")
    typer.echo(f"required: {head}")
    if current == head:
        typer.echo("the schema is up to date")
        return
    typer.echo("the schema is out of date: run `triage db upgrade`")
    if check:
        raise typer.Exit(1)


@messages_app.command("retry")
def retry_command(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be queued.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Queue skipped messages again (those with text): a running bot classifies and answers them.

    Messages are skipped when they cannot be classified or posted, or (in earlier versions) after ten
    failed attempts. A reply already posted is updated, never posted twice.
    """
    operator = _operator()

    async def work(session: AsyncSession) -> int:
        if dry_run:
            return await repository.count_skipped(session)
        queued = await repository.requeue_skipped(session)
        await repository.add_audit_entry(
            session, user_id=operator, action="messages.retry", args={"queued": queued}, allowed=True
        )
        return queued

    count = _run(database_url, lambda url: _in_session(url, work))
    typer.echo(f"would queue {count} skipped message(s)" if dry_run else f"queued {count} skipped message(s)")


def forget_command(
    user: Annotated[
        str, typer.Option("--user", "-u", help="Slack user id (U… or W…) of the person to forget.")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Forget a person: remove their message texts now, store none later, never train on them.

    The texts also leave the model versions' training data and reports, and the database's free pages
    and WAL. Labels stay (they hold no text). The action is recorded in the audit log.
    """
    user = user.strip().upper()
    if not SLACK_USER_ID.match(user):
        raise _fail(f"{user!r} does not look like a Slack user id (U… or W…)", code=2)
    if not yes:
        typer.confirm(f"Remove every stored message text of {user}? This cannot be undone.", abort=True)
    operator = _operator()

    async def work(session: AsyncSession) -> int:
        removed = await repository.forget_user(session, user, requested_by=operator)
        await repository.add_audit_entry(
            session, user_id=operator, action="data.forget", args={"user": user}, allowed=True
        )
        return removed

    removed, note = _run(database_url, lambda url: _removing_texts(url, work))
    typer.echo(
        f"forgot {user}: removed {removed} message text(s){note}; "
        "their future messages are stored without text"
    )


def purge_command(
    days: Annotated[
        int | None,
        typer.Option(
            "--days",
            min=1,
            envvar=RETENTION_DAYS_ENV,
            show_envvar=True,
            help="Remove the text of messages older than this many days (labels stay).",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be removed.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Apply the retention policy: remove old message texts (everywhere, as `triage data forget` does) and
    old Slack event ids."""
    if days is None:
        raise _fail(f"give --days or set {RETENTION_DAYS_ENV}", code=2)
    now = utcnow()
    cutoff = repository.retention_cutoff(days, now=now)
    operator = _operator()

    if dry_run:

        async def count(session: AsyncSession) -> int:
            return await repository.count_purgeable_texts(session, older_than=cutoff)

        texts = _run(database_url, lambda url: _in_session(url, count))
        typer.echo(f"would remove {texts} message text(s) received before {cutoff:%Y-%m-%d %H:%M} UTC")
        return

    async def work(session: AsyncSession) -> tuple[int, int]:
        texts = await repository.purge_message_texts(session, older_than=cutoff, now=now)
        events = await repository.delete_events_before(
            session, repository.retention_cutoff(EVENT_ID_RETENTION_DAYS, now=now)
        )
        await repository.add_audit_entry(
            session,
            user_id=operator,
            action="data.purge",
            args={"days": days, "texts": texts, "events": events},
            allowed=True,
        )
        return texts, events

    (texts, events), note = _run(database_url, lambda url: _removing_texts(url, work))
    typer.echo(
        f"removed {texts} message text(s) received before {cutoff:%Y-%m-%d %H:%M} UTC "
        f"and {events} old Slack event id(s){note}"
    )


def register_data_commands(data_app: typer.Typer) -> None:
    """Attach ``forget`` and ``purge`` to the ``data`` group."""
    data_app.command("forget")(forget_command)
    data_app.command("purge")(purge_command)


def register(app: typer.Typer, *, data_app: typer.Typer | None = None) -> None:
    """Add the ``db`` and ``messages`` groups to the root app (and the data commands to ``data_app``)."""
    app.add_typer(db_app, name="db")
    app.add_typer(messages_app, name="messages")
    if data_app is not None:
        register_data_commands(data_app)
