"""Drift: is the past week's traffic still what the active model was judged on?

Per head, the label mix the model predicted over the past week is compared with the label mix of the
version's held-out split (``per_class`` support in its metrics) by the population stability index, and
its mean confidence with the held-out one. Above ``TRIAGE_DRIFT_PSI`` or a confidence drop above
``TRIAGE_DRIFT_CONFIDENCE_DROP`` an alert goes to the admins' summary channel with the figures and what to
do (review, retrain), once per schedule across replicas. The figures, and live accuracy per head, are
Prometheus gauges (refreshed hourly; a scrape never queries the database).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.blocks import head_title
from bot.digest import MISFIRE_GRACE_S, schedule_slot
from bot.settings import BotSettings
from bot.slack_output import SlackOutput
from bot.storage import repository as repo
from bot.storage.models import utcnow
from classifier.paths import registry_dir
from classifier.registry import Registry, VersionInfo

log = logging.getLogger(__name__)

JOB = "drift"
WINDOW = timedelta(days=7)
MIN_PREDICTIONS = 50  # fewer in a week say nothing about drift
EPSILON = 1e-4  # a share of zero on either side would make the PSI infinite
REFRESH = timedelta(hours=1)  # the gauges


def population_stability_index(expected: Mapping[str, float], actual: Mapping[str, float]) -> float:
    """PSI of two label shares (each summing to 1): 0 when alike; above 0.2 is commonly called a shift."""
    psi = 0.0
    for label in set(expected) | set(actual):
        e, a = max(expected.get(label, 0.0), EPSILON), max(actual.get(label, 0.0), EPSILON)
        psi += (a - e) * math.log(a / e)
    return psi


def shares(counts: Mapping[str, float]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


@dataclass(frozen=True)
class HeadDrift:
    head: str
    psi: float
    reference_confidence: float
    live_confidence: float
    reference_mix: dict[str, float]
    live_mix: dict[str, float]
    predictions: int

    @property
    def confidence_drop(self) -> float:
        return self.reference_confidence - self.live_confidence

    def biggest_moves(self, n: int = 3) -> list[tuple[str, float, float]]:
        """(label, held-out share, live share) of the labels whose share moved most."""
        labels = set(self.reference_mix) | set(self.live_mix)
        moved = sorted(
            labels, key=lambda lb: -abs(self.live_mix.get(lb, 0.0) - self.reference_mix.get(lb, 0.0))
        )
        return [(lb, self.reference_mix.get(lb, 0.0), self.live_mix.get(lb, 0.0)) for lb in moved[:n]]


def head_drift(head: str, reference: Mapping[str, Any], live: list[repo.LabelProfile]) -> HeadDrift | None:
    """One head's drift, or ``None`` when the version's metrics or the week's traffic cannot tell."""
    support = {
        label: float(c.get("support", 0))
        for label, c in (reference.get("per_class") or {}).items()
        if isinstance(c, Mapping)
    }
    count = sum(p.count for p in live)
    if not sum(support.values()) or count < MIN_PREDICTIONS:
        return None
    reference_mix = shares(support)
    live_mix = shares({p.label: float(p.count) for p in live})
    return HeadDrift(
        head=head,
        psi=population_stability_index(reference_mix, live_mix),
        reference_confidence=float(reference.get("mean_confidence") or 0.0),
        live_confidence=sum(p.confidence_sum for p in live) / count,
        reference_mix=reference_mix,
        live_mix=live_mix,
        predictions=count,
    )


@dataclass(frozen=True)
class Figures:
    version: str
    drift: list[HeadDrift]
    live_accuracy: dict[str, float]  # head -> right / judged over the window


class DriftMonitor:
    def __init__(
        self,
        settings: BotSettings,
        sessions: async_sessionmaker[AsyncSession],
        output: SlackOutput,
        registry: Registry | None = None,  # default: the data directory's, which the classifier shares
    ):
        self.settings = settings
        self.sessions = sessions
        self.output = output
        self.registry = registry or Registry(registry_dir())
        self.figures: Figures | None = None  # as of the last refresh: for /metrics

    async def refresh(self, now: datetime | None = None) -> Figures | None:
        """This week's figures for the active version (``None`` without one); kept for the gauges."""
        now = now or utcnow()
        active = await asyncio.to_thread(self._active_version)
        if active is None:
            return None
        async with self.sessions() as session:
            profile = await repo.prediction_profile(session, active.name, since=now - WINDOW, until=now)
            judged = await repo.live_accuracy(session, since=now - WINDOW, until=now)
        by_head: dict[str, list[repo.LabelProfile]] = {}
        for p in profile:
            by_head.setdefault(p.head, []).append(p)
        drift = [
            found
            for head, reference in (active.metrics or {}).items()
            if isinstance(reference, Mapping)
            and (found := head_drift(head, reference, by_head.get(head, []))) is not None
        ]
        accuracy: dict[str, tuple[int, int]] = {}
        for j in judged:
            right, total = accuracy.get(j.head, (0, 0))
            accuracy[j.head] = (right + j.right, total + j.judged)
        self.figures = Figures(active.name, drift, {h: r / n for h, (r, n) in accuracy.items() if n})
        return self.figures

    def _active_version(self) -> VersionInfo | None:
        name = self.registry.active_name()
        return self.registry.get(name) if name else None

    def drifted(self, figures: Figures) -> list[HeadDrift]:
        return [
            d
            for d in figures.drift
            if d.psi > self.settings.triage_drift_psi
            or d.confidence_drop > self.settings.triage_drift_confidence_drop
        ]

    async def check(self, now: datetime | None = None) -> bool:
        """The daily job: refresh, and alert the admins if a head drifted (one replica per slot)."""
        now = now or utcnow()
        figures = await self.refresh(now)
        channel = self.settings.triage_summary_channel or self.settings.triage_escalation_channel
        drifted = self.drifted(figures) if figures is not None else []
        if figures is None or not drifted or channel is None:
            return False
        async with self.sessions.begin() as session:
            if not await repo.claim_scheduled_post(session, JOB, schedule_slot(now)):
                return False
        return (
            await self.output.post(channel, alert_text(figures.version, drifted, self.settings)) is not None
        )


def alert_text(version: str, drifted: list[HeadDrift], settings: BotSettings) -> str:
    headline = f"the past week's messages differ from what {version} was judged on"
    lines = [f":chart_with_downwards_trend: *Drift:* {headline}"]
    for d in drifted:
        moves = ", ".join(f"{label} {before:.0%} → {after:.0%}" for label, before, after in d.biggest_moves())
        lines.append(  # confidence in percent, as the replies and cards show it
            f"• *{head_title(d.head)}* ({d.predictions} messages): label mix PSI {d.psi:.2f} "
            f"(alert above {settings.triage_drift_psi:g}): {moves}; mean confidence "
            f"{d.reference_confidence:.0%} → {d.live_confidence:.0%} "
            f"(alert at a drop above {settings.triage_drift_confidence_drop * 100:g} points)"
        )
    lines.append(
        "Suggestion: label what `/triage review` shows (the messages the model is least sure of), then "
        "`/triage retrain --dry-run` and `/triage retrain` so the model learns the new traffic."
    )
    return "\n".join(lines)


class DriftCollector(Collector):
    """Drift and live accuracy per head, as of the monitor's last refresh."""

    def __init__(self, monitor: DriftMonitor):
        self.monitor = monitor

    def collect(self) -> Iterable[Metric]:
        figures = self.monitor.figures
        if figures is None:
            return
        psi = GaugeMetricFamily(
            "triage_bot_drift_psi", "Label-mix PSI, past week vs the held-out split", labels=["head"]
        )
        drop = GaugeMetricFamily(
            "triage_bot_confidence_drop",
            "Held-out mean confidence minus the past week's",
            labels=["head"],
        )
        for d in figures.drift:
            psi.add_metric([d.head], d.psi)
            drop.add_metric([d.head], d.confidence_drop)
        accuracy = GaugeMetricFamily(
            "triage_bot_live_accuracy",
            "Share of the past week's human-labelled messages that kept the model's label",
            labels=["head"],
        )
        for head, value in sorted(figures.live_accuracy.items()):
            accuracy.add_metric([head], value)
        yield from (psi, drop, accuracy)


def add_drift(scheduler: AsyncIOScheduler, monitor: DriftMonitor) -> None:
    """The daily check on ``TRIAGE_DRIFT_CRON`` (none when empty) and an hourly refresh of the gauges."""
    if monitor.settings.triage_drift_cron:
        scheduler.add_job(
            monitor.check,
            CronTrigger.from_crontab(monitor.settings.triage_drift_cron, timezone="UTC"),
            id=JOB,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=MISFIRE_GRACE_S,
        )
    scheduler.add_job(
        monitor.refresh,
        IntervalTrigger(seconds=REFRESH.total_seconds()),
        id="drift_gauges",
        max_instances=1,
        coalesce=True,
        next_run_time=utcnow(),
    )
