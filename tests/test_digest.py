"""The daily digest: its content, and one post per schedule slot from two bots sharing a database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bot import review
from bot.digest import JOB, Digest, add_digest
from bot.main import RunningBot
from bot.settings import load_settings
from bot.storage.models import Card, Correction, Prediction, ScheduledPost, utcnow
from tests.support.slack_standin import ApiCall
from tests.test_bot import AGENT, CHANNEL, ESCALATION, harness_factory  # noqa: F401

DIGEST = "C0DIGEST1"


def digest_of(bot: RunningBot) -> Digest:
    """The digest a bot's scheduler runs (``bot.main`` builds it from these same parts)."""
    return Digest(bot.settings, bot.triage.sessions, bot.triage.output, bot.commands.review)


def digest_posts(*harnesses: Any) -> list[ApiCall]:
    return [c for h in harnesses for c in h.slack.calls_to("chat.postMessage") if c.args["channel"] == DIGEST]


async def test_two_replicas_post_one_digest_per_schedule_with_yesterdays_figures(
    harness_factory: Any,  # noqa: F811
) -> None:
    settings = {"triage_digest_channel": DIGEST, "triage_unsure_below": 0.999}
    first = await harness_factory(**settings)
    second = await harness_factory(with_model=False, **settings)  # another replica, the same database
    texts = ["The dashboard is down for everyone", "Please send me last month's invoice"]
    events = [(await first.post_customer_message(text))[0] for text in texts]

    async def classified() -> bool:
        return await first.count(Prediction) == len(texts)

    assert await first.eventually(classified)
    send = first.slack.send_event
    await send(first.slack.reaction_added_event(AGENT, "fire", CHANNEL, events[0]["ts"]))
    await send(first.slack.reaction_added_event(AGENT, "red_circle", CHANNEL, events[0]["ts"]))
    await first.slack.wait_for("chat.postMessage", predicate=lambda c: c.args["channel"] == ESCALATION)
    assert await first.eventually(lambda: first.rows(Card, Card.escalated_at.is_not(None)))
    labels = {c.head: c for c in await first.rows(Correction)}
    right = int(labels["topic"].kind == "confirmation")

    tomorrow_9am = datetime.combine(utcnow().date() + timedelta(days=1), time(9), tzinfo=UTC)
    replicas = [digest_of(first.bot), digest_of(second.bot)]
    posted = await asyncio.gather(
        *(d.run_scheduled(tomorrow_9am + timedelta(seconds=n)) for n, d in enumerate(replicas))
    )
    assert sorted(posted) == [False, True]
    [post] = digest_posts(first, second)
    shown = str(post.args["blocks"])
    assert post.args["text"].endswith(": 2 messages, 1 escalated")
    assert "outage 1" in shown and "critical 1" in shown  # people's labels over the model's
    assert f"Topic {right:.0%} ({right}/1)" in shown and "Urgency " in shown
    assert "*Last retraining:* none yet" in shown
    assert "Review queue:* 1 message would" in shown and texts[1] in shown  # the labelled one is not in it
    assert review.CONFIRM_ACTION in shown

    # the same slot again: nobody posts; the next day's slot: one of them does
    assert not any([await d.run_scheduled(tomorrow_9am + timedelta(seconds=20)) for d in replicas])
    next_day = await asyncio.gather(*(d.run_scheduled(tomorrow_9am + timedelta(days=1)) for d in replicas))
    assert sorted(next_day) == [False, True] and len(digest_posts(first, second)) == 2
    assert len(await first.rows(ScheduledPost)) == 2


def test_the_digest_is_scheduled_on_its_cron_only_with_a_channel() -> None:
    def scheduled(**overrides: Any) -> AsyncIOScheduler:
        settings = load_settings(
            _env_file=None, slack_bot_token="xoxb-1", slack_signing_secret="s", **overrides
        )
        scheduler = AsyncIOScheduler(timezone="UTC")
        add_digest(scheduler, Digest(settings, None, None, None))  # type: ignore[arg-type]
        return scheduler

    [job] = scheduled(triage_card_channel="C0CARDS").get_jobs()  # the default channel: the card channel
    saturday = datetime(2026, 12, 5, 12, tzinfo=UTC)
    assert job.id == JOB  # weekdays at 09:00 UTC by default
    assert job.trigger.get_next_fire_time(None, saturday) == datetime(2026, 12, 7, 9, tzinfo=UTC)
    assert scheduled(triage_digest_channel=DIGEST, triage_digest_cron="").get_jobs() == []
    assert scheduled().get_jobs() == []  # no channel to post to
