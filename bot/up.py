"""``triage up``: the whole product on embedded defaults, from a fresh data directory.

Migrates the database, trains the starter model from the bundled starter dataset if no model exists,
then serves the classifier (HTTP API and try-it page, in a child process) and, when Slack tokens are
configured, the bot, which classifies through that same server: the model is loaded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from pathlib import Path

import typer
from pydantic import SecretStr

from bot.settings import BotSettings, UpSettings
from classifier.child import ClassifierProcess, ClassifierStartError, spare_core_threads
from classifier.paths import STARTER_DATA, data_dir, registry_dir
from classifier.registry import Registry

log = logging.getLogger(__name__)

# Tuned on the starter set with all-MiniLM-L6-v2: a useful model in minutes on a laptop CPU.
STARTER_SETTINGS = {
    "epochs": 8,
    "learning_rate": 1e-4,
    "head_learning_rate": 2e-3,
    "max_length": 64,
    "batch_size": 16,
    "patience": 3,
}
TOKEN_FILE = "classifier_token"


def ensure_model(registry: Registry, max_steps: int | None = None) -> None:
    """Train the starter model when the registry has no active version; ``max_steps`` caps the training
    (a quick, weaker model for smoke tests)."""
    if registry.active_name() is not None:
        return
    from classifier.data import fingerprint, load_examples
    from classifier.schema import LabelSchema
    from classifier.train import TrainConfig, train

    how_long = f"at most {max_steps} steps" if max_steps else "minutes on free CPU cores, more on a busy one"
    typer.echo(f"no model yet: training the starter model on the bundled starter dataset ({how_long})")
    examples, schema = load_examples([STARTER_DATA], LabelSchema())
    result = train(
        examples,
        schema,
        TrainConfig(**STARTER_SETTINGS, max_steps=max_steps),
        registry,  # type: ignore[arg-type]
        data_info={"files": [{"path": "starter.csv", "sha256": fingerprint(STARTER_DATA)}]},
    )
    metrics = ", ".join(f"{h} accuracy {m['accuracy']:.2f}" for h, m in result.version.metrics.items())
    typer.echo(f"starter model {result.version.name} ready ({metrics})")


def token_file() -> Path:
    """Where a generated classifier token is kept."""
    return data_dir() / TOKEN_FILE


def classifier_token() -> str:
    """``CLASSIFIER_TOKEN``, or one generated once and kept (owner-only) in the data directory."""
    token = UpSettings().classifier_token
    if token:
        return token.get_secret_value()
    path = token_file()
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


async def run_up(host: str, port: int) -> None:
    """The classifier server in a child process (the model loads once, there), and the bot beside it as
    its client: forward passes never run on the bot's event loop."""
    from bot.main import RunningBot, StartupError, start_bot, until_stopped
    from bot.settings import settings_or_exit

    configured = UpSettings()
    settings = settings_or_exit() if configured.slack_bot_token else None
    token = classifier_token()
    token_source = "CLASSIFIER_TOKEN" if configured.classifier_token else token_file()
    # the bot's own, for /triage models and rollback, unless the operator set one for everyone
    admin_token = (
        configured.classifier_admin_token.get_secret_value()
        if configured.classifier_admin_token
        else secrets.token_urlsafe(24)
    )
    classifier = ClassifierProcess(
        host=host,
        port=port,
        token=token,
        admin_token=admin_token,
        cpu_threads=spare_core_threads() if settings else None,  # with a bot: leave its loop a core
    )
    stop = asyncio.Event()
    bot_task: asyncio.Task[RunningBot | None] | None = None
    failed: list[str] = []

    async def start_bot_meanwhile(settings: BotSettings) -> RunningBot | None:
        """The bot starts beside the classifier: waiting for Slack never keeps the page from serving."""
        try:
            bot = await until_stopped(start_bot(settings), stop)
        except StartupError as exc:  # e.g. a token Slack rejects: everything stops, with that one line
            failed.append(str(exc))
            stop.set()
            return None
        if bot is not None:
            mode = "Socket Mode" if settings.socket_mode else f"HTTP port {bot.port}"
            typer.echo(f"Slack bot running ({mode})")
        return bot

    if settings is None:
        typer.echo(
            "Slack bot not started: set SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET (or SLACK_APP_TOKEN for "
            "Socket Mode) in the environment or a .env file, then run this again. "
            "See README.md, 'Create the Slack app'."
        )

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    shown = "localhost" if host in ("0.0.0.0", "127.0.0.1", "::") else host
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    try:
        bound = await until_stopped(classifier.start(), stop)
        if bound is not None and settings is not None:
            bot_task = asyncio.ensure_future(
                start_bot_meanwhile(_client_of(settings, local, bound, classifier))
            )
        if bound is not None and await until_stopped(classifier.ready(), stop) is not None:
            typer.echo(
                f"classifier ready: http://{shown}:{bound}/#token={token}  (API token in {token_source}; "
                "Ctrl-C stops)"
            )
            status = await until_stopped(classifier.wait(), stop)
            if status is not None:
                failed.append(f"the classifier process exited with status {status}")
    except ClassifierStartError as exc:
        failed.append(str(exc))
    finally:
        stop.set()
        bot = await bot_task if bot_task is not None else None
        if bot is not None:
            await bot.stop()  # first: it drains its work through the classifier
        await classifier.stop()
    if failed:
        typer.echo(f"error: {failed[0]}", err=True)
        raise typer.Exit(2)


def _client_of(settings: BotSettings, host: str, port: int, classifier: ClassifierProcess) -> BotSettings:
    """The bot's settings, pointed at the classifier ``triage up`` runs (unless CLASSIFIER_URL names one)."""
    if settings.classifier_url:
        return settings
    return settings.model_copy(
        update={
            "classifier_url": f"http://{host}:{port}",
            "classifier_token": SecretStr(classifier.token),
            "classifier_admin_token": SecretStr(classifier.admin_token or ""),
        }
    )


def up_command(
    host: str = typer.Option("127.0.0.1", help="Interface for the classifier's API and page."),
    port: int = typer.Option(8080, min=0, max=65535, help="Port for the classifier's API and page."),
    starter_steps: int | None = typer.Option(
        None,
        min=1,
        help="Stop training the starter model after this many steps: a quick, weaker model for smoke "
        "tests [default: train it fully]",
    ),
) -> None:
    """Set up and run everything on embedded defaults: database, starter model, classifier, bot."""
    from bot.storage.database import resolve_database_url, upgrade_database

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = resolve_database_url()
    asyncio.run(upgrade_database(url))
    typer.echo(f"database ready: {url.render_as_string(hide_password=True)}")
    ensure_model(Registry(registry_dir()), max_steps=starter_steps)
    asyncio.run(run_up(host, port))
