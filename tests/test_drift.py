"""Drift alerts: the week's label mix and confidence against the active version's held-out split, posted
once per schedule across replicas (real HTTP to the stand-in), and the Prometheus gauges."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import drift
from bot.settings import load_settings
from bot.slack_output import SlackOutput
from bot.storage import repository as repo
from bot.storage.models import Correction, Prediction, utcnow
from classifier.registry import Registry, VersionInfo
from classifier.results import HeadPrediction
from tests.support.slack_standin import SlackStandIn
from tests.test_bot import AGENT, CHANNEL, harness_factory  # noqa: F401

SUMMARY = "C0SUMMARY"
REFERENCE = {
    "topic": {
        "per_class": {"billing": {"support": 50}, "outage": {"support": 50}},
        "mean_confidence": 0.9,
    },
    "urgency": {"per_class": {"low": {"support": 90}, "high": {"support": 10}}, "mean_confidence": 0.8},
}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A registry whose active v1 was judged on REFERENCE (no weights: drift reads only the metrics)."""
    registry = Registry(tmp_path / "models")
    with registry.staging() as staging:
        registry.commit(staging, VersionInfo(name="", created="", base_model="base", metrics=REFERENCE))
    return registry


def test_the_population_stability_index() -> None:
    even = {"billing": 0.5, "outage": 0.5}
    assert drift.population_stability_index(even, even) == 0
    shifted = drift.population_stability_index(even, {"billing": 0.1, "outage": 0.9})
    assert shifted == pytest.approx(0.4 * 0.5878 + 0.4 * 1.6094, abs=1e-3)
    gone = drift.population_stability_index(even, {"billing": 1.0})  # a label gone: smoothed, finite
    assert 4 < gone < 5


async def _week_of_traffic(sessions: async_sessionmaker[AsyncSession], n: int) -> None:
    async with sessions.begin() as session:
        for i in range(n):
            topic = "outage" if i % 10 else "billing"  # 90% outage where the held-out split had 50%
            urgency = "high" if i % 10 == 0 else "low"
            message, _ = await repo.store_message(
                session, team_id="T1", channel_id="C1", ts=f"1.{i:06d}", user_id="U1", text=f"m{i}"
            )
            message.received_at = utcnow() - timedelta(days=i % 6)
            heads = {
                "topic": HeadPrediction(topic, 0.6, {topic: 0.6}),
                "urgency": HeadPrediction(urgency, 0.8, {urgency: 0.8}),
            }
            await repo.add_prediction(session, message.id, "v1", heads)
            if i < 4:  # people looked at four: three kept the topic
                label = topic if i else "how_to"
                await repo.add_correction(
                    session, message.id, "topic", label, user_id="U0AGENT", source="button"
                )


async def test_a_drifted_head_is_alerted_once_across_replicas_and_exported(
    session_factory: async_sessionmaker[AsyncSession], registry: Registry
) -> None:
    await _week_of_traffic(session_factory, 60)
    settings = load_settings(
        _env_file=None,
        slack_bot_token="xoxb-test-token",
        slack_signing_secret="s",
        triage_summary_channel=SUMMARY,
    )
    async with SlackStandIn() as slack:
        replicas = [
            drift.DriftMonitor(
                settings,
                session_factory,
                SlackOutput(AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)),
                registry,
            )
            for _ in range(2)
        ]
        now = utcnow()
        posted = await asyncio.gather(*(m.check(now) for m in replicas))
        assert sorted(posted) == [False, True]
        [alert] = slack.calls_to("chat.postMessage")
    text = alert.args["text"]
    assert alert.args["channel"] == SUMMARY and "the past week's messages differ from what v1" in text
    assert "*Topic* (60 messages): label mix PSI 0.88 (alert above 0.2)" in text
    assert "outage 50% → 90%" in text
    assert "mean confidence 90% → 60% (alert at a drop above 10 points)" in text
    assert "*Urgency*" not in text and "/triage review" in text

    registry = CollectorRegistry()
    registry.register(drift.DriftCollector(replicas[0]))

    def gauge(name: str) -> float | None:
        return registry.get_sample_value(name, {"head": "topic"})

    assert gauge("triage_bot_drift_psi") == pytest.approx(0.8789, abs=1e-3)
    assert gauge("triage_bot_confidence_drop") == pytest.approx(0.3)
    assert gauge("triage_bot_live_accuracy") == 0.75
    assert "triage_bot_drift_psi" in generate_latest(registry).decode()


async def test_no_alert_under_the_thresholds_or_with_too_little_traffic(
    session_factory: async_sessionmaker[AsyncSession], registry: Registry
) -> None:
    await _week_of_traffic(session_factory, 60)

    async def alerts(**overrides: Any) -> bool:
        settings = load_settings(
            _env_file=None,
            slack_bot_token="xoxb-test-token",
            slack_signing_secret="s",
            triage_summary_channel=SUMMARY,
            **overrides,
        )
        async with SlackStandIn() as slack:
            client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
            monitor = drift.DriftMonitor(settings, session_factory, SlackOutput(client), registry)
            posted = await monitor.check()
            assert bool(slack.calls_to("chat.postMessage")) == posted
            return posted

    assert not await alerts(triage_drift_psi=1.0, triage_drift_confidence_drop=0.5)
    assert await alerts(triage_drift_psi=1.0)  # the confidence drop alone
    figures = drift.head_drift("topic", REFERENCE["topic"], [repo.LabelProfile("topic", "outage", 49, 30.0)])
    assert figures is None  # a quiet week says nothing


async def test_the_bots_metrics_export_live_accuracy(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory()
    event, _ = await h.post_customer_message("The dashboard is down for everyone")
    assert await h.eventually(lambda: h.rows(Prediction))
    await h.slack.send_event(
        h.slack.reaction_added_event(AGENT, "dart", CHANNEL, event["ts"])
    )  # confirms all
    assert await h.eventually(lambda: h.rows(Correction))
    await h.bot.triage.drift.refresh()  # what the hourly job does
    url = f"http://127.0.0.1:{h.bot.port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        exported = await response.text()
    for head in ("topic", "urgency", "sentiment"):
        assert f'triage_bot_live_accuracy{{head="{head}"}} 1.0' in exported
