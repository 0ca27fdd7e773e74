"""The ``triage`` command line: one app, with the classifier's commands and the bot's own."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer

from bot.storage.cli import register as register_storage_commands
from bot.up import up_command
from classifier.cli import data_app
from classifier.cli import register as register_classifier_commands
from classifier.paths import DATA_DIR_ENV, default_data_dir, describe_data_dir

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
def bot_command(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Run the Slack bot (HTTP on $PORT, or Socket Mode when SLACK_APP_TOKEN is set)."""
    from bot.main import StartupError, run_bot
    from bot.settings import settings_or_exit

    settings = settings_or_exit()
    _logging(verbose)
    try:
        asyncio.run(run_bot(settings))
    except StartupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


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
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs [default: the active model's]")] = None,
    accept_after_hours: Annotated[
        float, typer.Option(min=0, help="Train on predictions nobody corrected for this long.")
    ] = 24.0,
    max_accepted: Annotated[
        int, typer.Option(min=0, help="At most this many such messages, newest first (0: none).")
    ] = 20_000,
) -> None:
    """Retrain on the corrections in the database; promote the candidate only if the gate passes."""
    from bot.retrain import _main

    args = (
        ["--trigger", "cli"]
        + (["--dry-run"] if dry_run else [])
        + (["--epochs", str(epochs)] if epochs else [])
        + ["--accept-after-hours", str(accept_after_hours), "--max-accepted", str(max_accepted)]
    )
    raise typer.Exit(asyncio.run(_main(args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
