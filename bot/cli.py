"""The ``triage`` command line: one app, with the classifier's commands and the bot's own."""

from __future__ import annotations

import asyncio
import json
import logging
import typing
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import click
import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from bot.storage.cli import DatabaseUrlOption
from bot.storage.cli import register as register_storage_commands
from bot.up import up_command
from classifier.cli import EXIT_USAGE, USER_ERRORS, data_app
from classifier.cli import register as register_classifier_commands
from classifier.paths import DATA_DIR_ENV, default_data_dir, describe_data_dir


class _PlainHelp:
    """Help as people read it: a flag shows no ``<bool>`` value (it takes none), and a repeatable option
    the type of one value (``<path>``, not typer's ``<list[Path]>``; its help says it repeats)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag:
                param.metavar = ""
            elif getattr(getattr(param, "type_descriptor", None), "is_list", False):  # a typer that has it
                label = _one_value_type(param.type_descriptor.annotation)
                param.display_type_rich = lambda ctx, label=label: label  # type: ignore[method-assign]
        return params


def _one_value_type(annotation: Any) -> str:
    """``<path>`` for ``list[Path]``: the type of each value of a repeatable parameter."""
    (one, *_) = typing.get_args(annotation) or (str,)
    return f"<{getattr(one, '__name__', 'value').lower()}>"


class _Command(_PlainHelp, TyperCommand):
    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """``FILE...`` and ``[NAME]`` for arguments (typer writes ``{files}...``: it reads as a choice)."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or (param.name or "").upper()
                name = (name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else "")
                pieces.append(name)
        return pieces


class _Group(_PlainHelp, TyperGroup):
    pass


F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(command: F) -> F:
    """Every command's way to fail: ``error: ...`` on stderr (one line per problem) and a documented exit
    code (README, "Command line"), never a traceback for a problem the user can act on."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # the command's own exit status, or a usage error click reports
        except Exception as exc:
            failure = _expected_failure(exc)
            if failure is None:
                raise  # a bug: its traceback is what helps
        code, lines = failure
        for line in lines:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(code)

    return wrapper  # type: ignore[return-value]


def _expected_failure(exc: Exception) -> tuple[int, list[str]] | None:
    """The exit code and message lines of an expected failure; ``None`` for anything else."""
    from sqlalchemy.exc import SQLAlchemyError

    from bot.main import StartupError
    from bot.retrain import EXIT_FAILED
    from bot.storage.database import DatabaseConfigError, SchemaMismatchError

    if isinstance(exc, (*USER_ERRORS, StartupError, DatabaseConfigError)):
        return EXIT_USAGE, str(exc).strip().splitlines() or [type(exc).__name__]
    if isinstance(exc, SchemaMismatchError):  # as the db and data commands say it
        return EXIT_FAILED, str(exc).strip().splitlines()
    if isinstance(exc, (SQLAlchemyError, OSError)):
        detail = str(getattr(exc, "orig", None) or exc).strip()  # a driver's message: no SQL, no password
        return EXIT_FAILED, [detail.splitlines()[0] if detail else type(exc).__name__]
    return None


def _finish(typer_app: typer.Typer) -> None:
    """Give every command and group of ``typer_app``, wherever declared, the plain help and the one way
    to fail."""
    typer_app.info.cls = _Group
    for command in typer_app.registered_commands:
        if command.cls in (None, TyperCommand):
            command.cls = _Command
        if command.callback is not None:
            command.callback = _one_line_errors(command.callback)
    for group in typer_app.registered_groups:
        group.cls = _Group
        if group.typer_instance is not None:
            _finish(group.typer_instance)


app = typer.Typer(
    name="triage",
    help="Triage customer messages in Slack with a fine-tuned multi-head BERT classifier.",
    epilog=(
        f"State (models, runs, reports, the SQLite database) lives in {DATA_DIR_ENV}, by default "
        f"{default_data_dir()}; every command names the one it uses on stderr."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _name_the_data_dir() -> None:
    # stderr, so that `--json` output on stdout stays one clean object.
    typer.echo(describe_data_dir(), err=True)


register_classifier_commands(app)
register_storage_commands(app, data_app=data_app)
app.command("up")(up_command)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command("bot")
def bot_command(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages too.")] = False,
) -> None:
    """Run the Slack bot (HTTP on $PORT, or Socket Mode when SLACK_APP_TOKEN is set)."""
    from bot.main import run_bot
    from bot.settings import settings_or_exit

    settings = settings_or_exit()
    _logging(verbose)
    asyncio.run(run_bot(settings))


@app.command("worker")
def worker_command() -> None:
    """Claim queued retraining runs from PostgreSQL and run them on this machine's GPU (or CPU).

    Needs DATABASE_URL (postgresql://) and the model registry in TRIAGE_DATA_DIR; no Slack tokens. While a
    worker is up, the bot, its schedule and `triage retrain` queue their runs for it.
    """
    from bot.worker import main

    raise typer.Exit(main())


@app.command("retrain")
def retrain_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be trained; train nothing.")
    ] = False,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs.", show_default="TRIAGE_RETRAIN_EPOCHS")
    ] = None,
    accept_after_hours: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Train on predictions nobody corrected for this long.",
            show_default="TRIAGE_RETRAIN_ACCEPT_AFTER_HOURS",
        ),
    ] = None,
    max_accepted: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="At most this many such messages, newest first (0: none).",
            show_default="TRIAGE_RETRAIN_MAX_ACCEPTED",
        ),
    ] = None,
) -> None:
    """Retrain on the corrections in the database; promote the candidate only if the gate passes.

    The gate and the run read the same settings as the bot (TRIAGE_GATE_*, TRIAGE_RETRAIN_*); an option
    given here wins over its variable.
    """
    from bot.retrain import RunRequest, dry_run_text, print_progress, start_run
    from bot.settings import retrain_settings_or_exit
    from bot.storage.models import TrainingTrigger

    given = {
        "triage_retrain_epochs": epochs,
        "triage_retrain_accept_after_hours": accept_after_hours,
        "triage_retrain_max_accepted": max_accepted,
    }
    settings = retrain_settings_or_exit(**{k: v for k, v in given.items() if v is not None})
    options = settings.run_options()
    if dry_run:
        typer.echo(asyncio.run(dry_run_text(options, settings.database_url)))
        return
    run = RunRequest(options, TrainingTrigger.CLI, database_url=settings.database_url)
    raise typer.Exit(asyncio.run(start_run(run, print_progress, slack=False)))


@app.command("audit")
def audit_command(
    user: Annotated[str | None, typer.Option("--user", help="Only this Slack user's requests (U…).")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action: retrain, rollback.")] = None,
    days: Annotated[float | None, typer.Option(min=0, help="Only the last N days.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Who asked for an admin action in Slack (/triage retrain, rollback), when, and whether it was
    allowed: the audit log, newest first."""
    from datetime import timedelta

    from bot.storage import repository as repo
    from bot.storage.database import check_schema, create_db_engine, create_session_factory
    from bot.storage.models import utcnow

    since = utcnow() - timedelta(days=days) if days is not None else None

    async def read() -> list[Any]:
        db_engine = create_db_engine(database_url)
        try:
            await check_schema(db_engine)
            async with create_session_factory(db_engine)() as session:
                return await repo.list_audit_entries(
                    session, limit=limit, user_id=user, action=action, since=since
                )
        finally:
            await db_engine.dispose()

    for entry in asyncio.run(read()):
        if as_json:
            fields = ("user_id", "action", "args", "allowed", "reason")
            row = {"at": entry.created_at.isoformat(), **{f: getattr(entry, f) for f in fields}}
            typer.echo(json.dumps(row))
            continue
        verdict = "allowed" if entry.allowed else "refused"
        reason = f" ({entry.reason})" if entry.reason else ""
        typer.echo(
            f"{entry.created_at:%Y-%m-%d %H:%M} UTC  {entry.user_id}  {entry.action} "
            f"{json.dumps(entry.args)}  {verdict}{reason}"
        )


_finish(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
