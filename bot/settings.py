"""The bot's configuration: read once at start-up from the environment (and a ``.env`` file), then
passed down.

A missing or malformed setting stops start-up with one line per problem, naming the variable.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.retrain import Acceptance, RunOptions
from classifier.logsafe import redact_url
from classifier.promotion import Gate
from classifier.results import DEFAULT_BACKEND, DEFAULT_QUANTIZE, UNSURE_BELOW, Backend, Quantize
from classifier.schema import HEAD_USES, describe_lost_heads

CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")
USER_ID = re.compile(r"^[UW][A-Z0-9]{2,}$")
BOT_ID = re.compile(r"^B[A-Z0-9]{2,}$")
AGENT_ID = re.compile(r"^[UWS][A-Z0-9]{2,}$")  # a user, or a user group (S…)

CommaList = Annotated[list[str], NoDecode]
S = TypeVar("S", bound=BaseSettings)


class Delivery(StrEnum):
    """Where triage shows up for a message (``TRIAGE_DELIVERY``, ``TRIAGE_CHANNEL_DELIVERY``)."""

    CARD = "card"  # a card in TRIAGE_CARD_CHANNEL; nothing in the source channel
    THREAD = "thread"  # a reply in the message's thread (and a reaction on urgent ones)
    SILENT = "silent"  # nothing posted anywhere but escalations and routes


class SettingsError(ValueError):
    """Invalid configuration; ``str()`` has one line per problem."""


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# Every process reads the environment and a .env file the same way; an empty variable counts as unset.
ENV_CONFIG = SettingsConfigDict(
    env_file=".env",
    env_file_encoding="utf-8",
    extra="ignore",
    case_sensitive=False,
    env_ignore_empty=True,
)


def _stripped(value: Any) -> Any:
    # Secrets mounted from files often end with a newline; a blank variable means "not set".
    return (value.strip() or None) if isinstance(value, str) else value


OptionalSecret = Annotated[SecretStr | None, BeforeValidator(_stripped)]


class DatabaseSettings(BaseSettings):
    """``DATABASE_URL``, for every command that opens the database (``resolve_database_url`` validates it)."""

    model_config = ENV_CONFIG

    database_url: str | None = None  # default: SQLite in the data directory


class UpSettings(BaseSettings):
    """What `triage up` reads before it knows whether to start a bot (it starts one with a bot token)."""

    model_config = ENV_CONFIG

    slack_bot_token: OptionalSecret = None
    classifier_token: OptionalSecret = None  # default: one generated once, kept in the data directory
    classifier_admin_token: OptionalSecret = None  # default: a new one for the bot, each run


class RetrainSettings(DatabaseSettings):
    """What a retraining run is asked to do. Every entry point that starts one (the bot, its schedule,
    `/triage retrain`, `triage retrain`) builds the run's options from these; the defaults are the
    gate's and the acceptance rule's own."""

    # the backend that serves the model (as `triage serve` reads them): the in-process engine runs on it
    # and the retraining gate judges candidates on it
    classifier_backend: Backend = DEFAULT_BACKEND
    classifier_quantize: Quantize = DEFAULT_QUANTIZE
    triage_retrain_epochs: int | None = Field(None, ge=1)  # default: the active model's own setting
    # a prediction nobody corrected for this long is trained on as a label (never judged on)
    triage_retrain_accept_after_hours: float = Field(Acceptance.after_hours, ge=0)
    triage_retrain_max_accepted: int = Field(Acceptance.max_rows, ge=0)  # newest such messages (0: none)
    triage_gate_tolerance: float = Field(Gate.tolerance, ge=0, le=1)
    triage_gate_max_recall_drop: float = Field(Gate.max_recall_drop, ge=0, le=1)
    # a class's fall must be beyond chance
    triage_gate_recall_drop_alpha: float = Field(Gate.recall_drop_alpha, gt=0, le=1)

    def run_options(self) -> RunOptions:
        return RunOptions(
            gate=Gate(
                tolerance=self.triage_gate_tolerance,
                max_recall_drop=self.triage_gate_max_recall_drop,
                recall_drop_alpha=self.triage_gate_recall_drop_alpha,
                backend=self.classifier_backend,
                quantize=self.classifier_quantize,
            ),
            acceptance=Acceptance(
                after_hours=self.triage_retrain_accept_after_hours,
                max_rows=self.triage_retrain_max_accepted,
            ),
            epochs=self.triage_retrain_epochs,
        )


class BotSettings(RetrainSettings):
    model_config = ENV_CONFIG

    slack_bot_token: SecretStr = Field(description="Bot token (xoxb-...)")
    slack_signing_secret: SecretStr | None = Field(None, description="Signing secret; required in HTTP mode")
    slack_app_token: SecretStr | None = Field(None, description="App-level token (xapp-...): Socket Mode")
    slack_api_url: str = "https://slack.com/api/"
    classifier_url: str | None = None
    classifier_token: SecretStr | None = None
    classifier_admin_token: SecretStr | None = None  # lets /triage models|status|rollback use `triage serve`
    # without CLASSIFIER_URL: the engine in a child process the bot starts and stops ("process"), or on a
    # thread in the bot's own process ("thread": tests; it competes with the event loop under load)
    triage_embedded_classifier: Literal["process", "thread"] = "process"
    triage_channels: CommaList = Field(default_factory=list)  # empty: every channel the bot is in
    triage_admins: CommaList = Field(default_factory=list)
    triage_agents: CommaList = Field(default_factory=list)  # user and user-group ids; empty: workspace rule
    triage_triage_agents: bool = False  # also triage messages agents write
    triage_backfill_hours: float = Field(24.0, ge=0)  # how far back a backfill reads history (0: never)
    triage_allowed_bots: CommaList = Field(default_factory=list)  # bot ids (B…) whose posts are triaged
    triage_escalation_channel: str | None = None
    triage_card_channel: str | None = None  # internal channel: each triaged message becomes a card there
    triage_delivery: Delivery | None = None  # default: card with a card channel, otherwise thread
    triage_channel_delivery: str = ""  # per-channel override, "C0123=thread,C0456=silent"
    # this many escalations of one topic within this many minutes: one "possible incident" post
    triage_incident_count: int = Field(3, ge=2)
    triage_incident_minutes: float = Field(15.0, gt=0)
    triage_urgent_labels: CommaList = Field(default_factory=lambda: ["high", "critical"])
    triage_urgency_head: str = "urgency"
    # a message the model calls not_a_request (topic) at least this sure gets no reply and no escalation
    triage_not_a_request_above: float = Field(0.8, ge=0.0, le=1.0)
    # confidence under which a label is "unsure" (calibrated: see classifier/calibration.py)
    triage_unsure_below: float = Field(UNSURE_BELOW, ge=0.0, le=1.0)
    triage_routes: str = ""  # topic → channel routing, "outage=C123,billing=C456"
    triage_reactions_file: Path | None = None  # YAML emoji map replacing the default
    triage_pending_interval_s: float = Field(5.0, gt=0)  # how often the retry worker looks for pending work
    triage_retry_base_s: float = Field(30.0, gt=0)  # first retry delay of an unclassified message; doubles
    triage_retry_max_s: float = Field(600.0, gt=0)  # ... up to this; a message is never given up
    # a message is reserved to the replica answering it (renewed while it works); one that died frees
    # its messages to the others after this
    triage_lease_s: float = Field(120.0, gt=0)
    triage_workers: int = Field(32, ge=1, le=1024)  # messages classified and answered at once
    triage_queue_size: int = Field(512, ge=1)  # messages waiting in memory; more wait in the database
    triage_retrain_cron: str = "0 3 * * *"  # when the scheduled retrain looks for new feedback ("" = never)
    triage_retrain_min_corrections: int = Field(20, ge=1)  # new labels needed before a scheduled run trains
    triage_summary_channel: str | None = None  # where run summaries go (default: the escalation channel)
    # the daily digest: when (UTC cron, "" = never) and where (default: the card channel; neither: none)
    triage_digest_cron: str = "0 9 * * mon-fri"  # APScheduler: a numeric 1-5 would be Tue-Sat
    triage_digest_channel: str | None = None
    # drift: when the daily check runs ("" = never); a head's label-mix PSI or mean-confidence drop (past
    # week vs the active version's held-out split) above these alerts the summary channel
    triage_drift_cron: str = "0 8 * * *"
    triage_drift_psi: float = Field(0.2, gt=0)
    triage_drift_confidence_drop: float = Field(0.1, gt=0, le=1)
    triage_keep_versions: int = Field(10, ge=1)  # model versions kept in the registry (the active one always)
    triage_retention_days: int = Field(0, ge=0)  # remove message texts after this many days (0: keep)
    # Socket Mode: how often the client pings Slack, and how long a link may go without a hello (after
    # connecting) or without a pong or message before the watchdog replaces it
    triage_socket_ping_interval_s: float = Field(10.0, gt=0)
    triage_socket_dead_after_s: float = Field(30.0, gt=0)
    host: str = "0.0.0.0"
    port: int = Field(3000, ge=0, le=65535)  # 0: any free port (tests)

    _split_lists = field_validator(
        "triage_channels",
        "triage_admins",
        "triage_agents",
        "triage_allowed_bots",
        "triage_urgent_labels",
        mode="before",
    )(_split)

    @field_validator("slack_bot_token")
    @classmethod
    def _bot_token(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith("xoxb-"):
            raise ValueError("must be a bot token starting with xoxb-")
        return v

    @field_validator("slack_app_token")
    @classmethod
    def _app_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith("xapp-"):
            raise ValueError("must be an app-level token starting with xapp-")
        return v

    @field_validator("slack_api_url", "classifier_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if not v:
            return None
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"must be an http(s) URL, got {redact_url(v)!r}")
        return v

    @field_validator("slack_api_url")
    @classmethod
    def _api_base(cls, v: str | None) -> str | None:
        return v if v is None or v.endswith("/") else v + "/"  # slack_sdk appends method names

    @field_validator("triage_channels")
    @classmethod
    def _channels(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if not CHANNEL_ID.match(c)]
        if bad:
            raise ValueError(f"not Slack channel ids: {', '.join(bad)} (expected ids like C0123ABCD)")
        return v

    @field_validator("triage_retrain_cron", "triage_digest_cron", "triage_drift_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if v.strip():
            from apscheduler.triggers.cron import CronTrigger

            CronTrigger.from_crontab(v.strip(), timezone="UTC")
        return v.strip()

    @field_validator(
        "triage_escalation_channel", "triage_summary_channel", "triage_card_channel", "triage_digest_channel"
    )
    @classmethod
    def _channel(cls, v: str | None) -> str | None:
        if v and not CHANNEL_ID.match(v):
            raise ValueError(f"not a Slack channel id: {v!r} (expected an id like C0123ABCD)")
        return v or None

    @field_validator("triage_admins")
    @classmethod
    def _admins(cls, v: list[str]) -> list[str]:
        bad = [u for u in v if not USER_ID.match(u)]
        if bad:
            raise ValueError(f"not Slack user ids: {', '.join(bad)} (expected ids like U0123ABCD)")
        return v

    @field_validator("triage_agents")
    @classmethod
    def _agents(cls, v: list[str]) -> list[str]:
        bad = [u for u in v if not AGENT_ID.match(u)]
        if bad:
            raise ValueError(
                f"not Slack user or user-group ids: {', '.join(bad)} "
                "(expected ids like U0123ABCD or S0123ABCD)"
            )
        return v

    @field_validator("triage_allowed_bots")
    @classmethod
    def _bots(cls, v: list[str]) -> list[str]:
        bad = [b for b in v if not BOT_ID.match(b)]
        if bad:
            raise ValueError(f"not Slack bot ids: {', '.join(bad)} (expected ids like B0123ABCD)")
        return v

    @field_validator("triage_routes")
    @classmethod
    def _routes(cls, v: str) -> str:
        parse_routes(v)
        return v

    @field_validator("triage_channel_delivery")
    @classmethod
    def _channel_delivery(cls, v: str) -> str:
        parse_channel_delivery(v)
        return v

    @model_validator(mode="after")
    def _mode(self) -> BotSettings:
        if self.slack_app_token is None and self.slack_signing_secret is None:
            raise ValueError(
                "SLACK_SIGNING_SECRET is required in HTTP mode (or set SLACK_APP_TOKEN for Socket Mode)"
            )
        if self.slack_api_url is None:
            self.slack_api_url = "https://slack.com/api/"
        if self.triage_retry_max_s < self.triage_retry_base_s:
            raise ValueError("TRIAGE_RETRY_MAX_S must not be less than TRIAGE_RETRY_BASE_S")
        if (
            self.classifier_url
            and self.classifier_token
            and redact_url(self.classifier_url) != self.classifier_url
        ):
            raise ValueError(  # both would be the one Authorization header: the HTTP client refuses the pair
                "CLASSIFIER_URL carries a user and password, and CLASSIFIER_TOKEN is set: use one of them"
            )
        cards = [c for c, d in self.channel_delivery.items() if d == Delivery.CARD]
        if self.triage_card_channel is None and (self.triage_delivery == Delivery.CARD or cards):
            where = (
                "TRIAGE_DELIVERY=card" if self.triage_delivery == Delivery.CARD else "TRIAGE_CHANNEL_DELIVERY"
            )
            raise ValueError(f"{where} needs TRIAGE_CARD_CHANNEL (the internal channel cards go to)")
        if self.triage_socket_dead_after_s < 2 * self.triage_socket_ping_interval_s:
            raise ValueError(
                "TRIAGE_SOCKET_DEAD_AFTER_S must be at least twice TRIAGE_SOCKET_PING_INTERVAL_S "
                "(one late pong must not drop the link)"
            )
        return self

    @property
    def routes(self) -> dict[str, str]:
        return parse_routes(self.triage_routes)

    @property
    def channel_delivery(self) -> dict[str, Delivery]:
        return parse_channel_delivery(self.triage_channel_delivery)

    @property
    def digest_channel(self) -> str | None:
        """Where the daily digest goes: TRIAGE_DIGEST_CHANNEL, else the card channel (neither: no digest)."""
        return self.triage_digest_channel or self.triage_card_channel

    def delivery_for(self, channel_id: str) -> Delivery:
        """How triage shows up for ``channel_id`` by the settings (a shared channel is stricter still)."""
        default = self.triage_delivery or (Delivery.CARD if self.triage_card_channel else Delivery.THREAD)
        return self.channel_delivery.get(channel_id, default)

    @property
    def own_channels(self) -> dict[str, list[str]]:
        """The channels the bot posts its own work to, each with the settings that name it."""
        named: dict[str, list[str]] = {}
        singles = {
            "TRIAGE_CARD_CHANNEL": self.triage_card_channel,
            "TRIAGE_ESCALATION_CHANNEL": self.triage_escalation_channel,
            "TRIAGE_SUMMARY_CHANNEL": self.triage_summary_channel,
            "TRIAGE_DIGEST_CHANNEL": self.triage_digest_channel,
        }
        for name, channel in [*singles.items(), *(("TRIAGE_ROUTES", c) for c in self.routes.values())]:
            if channel and name not in named.setdefault(channel, []):
                named[channel].append(name)
        return named

    @property
    def socket_mode(self) -> bool:
        return self.slack_app_token is not None

    def missing_heads(self, heads: list[str]) -> list[str]:
        """What stops working with a model that has only ``heads``: one line per head the bot uses that is
        missing (the urgency head's name is TRIAGE_URGENCY_HEAD)."""
        uses = {self.triage_urgency_head if h == "urgency" else h: use for h, use in HEAD_USES.items()}
        return describe_lost_heads([h for h in uses if h not in heads], uses)

    def is_admin(self, user_id: str) -> bool:
        return user_id in self.triage_admins

    def watches(self, channel_id: str) -> bool:
        """Whether messages in ``channel_id`` are triaged; never the bot's own channels (cards, escalations,
        routes, summaries): triaging its own posts would loop."""
        if channel_id in self.own_channels:
            return False
        return not self.triage_channels or channel_id in self.triage_channels


def parse_routes(value: str) -> dict[str, str]:
    """``"outage=C123,billing=C456"`` → ``{"outage": "C123", "billing": "C456"}``."""
    routes: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        topic, _, channel = part.partition("=")
        if not topic.strip() or not CHANNEL_ID.match(channel.strip()):
            raise ValueError(f"route {part!r} must look like topic=C0123ABCD")
        routes[topic.strip()] = channel.strip()
    return routes


def parse_channel_delivery(value: str) -> dict[str, Delivery]:
    """``"C0123=thread,C0456=silent"`` → ``{"C0123": Delivery.THREAD, "C0456": Delivery.SILENT}``."""
    overrides: dict[str, Delivery] = {}
    choices = "|".join(Delivery)
    for part in filter(None, (p.strip() for p in value.split(","))):
        channel, _, mode = (x.strip() for x in part.partition("="))
        if not CHANNEL_ID.match(channel) or mode not in set(Delivery):
            raise ValueError(f"{part!r} must look like C0123ABCD={choices}")
        overrides[channel] = Delivery(mode)
    return overrides


class WorkerSettings(BaseSettings):
    """`triage worker`: the database to take training runs from, and nothing of Slack's."""

    model_config = ENV_CONFIG

    database_url: str = Field(description="postgresql://...: the queue of training runs")
    triage_worker_poll_s: float = Field(2.0, gt=0, le=3600)  # how often an idle worker looks for queued runs
    triage_worker_name: str | None = Field(None, max_length=100)  # recorded on the runs it claims

    @field_validator("database_url")
    @classmethod
    def _postgresql(cls, v: str) -> str:
        if not v.startswith(("postgresql:", "postgresql+asyncpg:", "postgres:")):
            raise ValueError(
                "must be a postgresql:// URL: the worker takes its runs from PostgreSQL (with SQLite, "
                "the bot runs retraining itself)"
            )
        return v


def _validated(cls: type[S], overrides: dict[str, Any]) -> S:
    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "_".join(str(p) for p in err["loc"]).upper() or "configuration"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                message = "is required but not set"
            lines.append(f"{name}: {message}" if name != "configuration" else message)
        raise SettingsError("\n".join(lines)) from None


def load_settings(**overrides: Any) -> BotSettings:
    """Read the settings, or raise ``SettingsError`` with one line per bad or missing variable."""
    return _validated(BotSettings, overrides)


def load_worker_settings(**overrides: Any) -> WorkerSettings:
    return _validated(WorkerSettings, overrides)


def load_retrain_settings(**overrides: Any) -> RetrainSettings:
    return _validated(RetrainSettings, overrides)


def _or_exit(load: Callable[[], S]) -> S:
    try:
        return load()
    except SettingsError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def settings_or_exit() -> BotSettings:
    """For command-line entry points: the settings, or each problem on stderr and exit status 2."""
    return _or_exit(load_settings)


def worker_settings_or_exit() -> WorkerSettings:
    return _or_exit(load_worker_settings)


def retrain_settings_or_exit(**overrides: Any) -> RetrainSettings:
    """``triage retrain``'s settings (``overrides``: its command-line options), or exit status 2."""
    return _or_exit(lambda: load_retrain_settings(**overrides))
