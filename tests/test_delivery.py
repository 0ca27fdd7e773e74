"""Where triage shows up (TRIAGE_DELIVERY, TRIAGE_CHANNEL_DELIVERY, shared channels), end to end over HTTP."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from bot.settings import Delivery, SettingsError, load_settings
from bot.storage.models import Message, MessageState, Prediction
from tests.support.slack_standin import SlackStandIn
from tests.test_bot import CHANNEL, CUSTOMER, ESCALATION, harness_factory  # noqa: F401

# every urgency label is urgent here: each message is escalated, so a thread-mode bot would also react
ALL_URGENT = "low,medium,high,critical"
# Web API methods that put something in front of the people of a channel
VISIBLE = {"chat.postMessage", "chat.postEphemeral", "chat.update", "reactions.add", "views.open"}
BASE = {"_env_file": None, "slack_bot_token": "xoxb-1", "slack_signing_secret": "s"}


async def _equals(count: Any, expected: int) -> bool:
    return await count == expected


def shared_channel(slack: SlackStandIn) -> None:
    slack.add_team("T0ACME", "Acme Corp")
    slack.add_channel(CHANNEL, "acme-support", shared_with=["T0ACME"])


def visible_in(slack: SlackStandIn, channel: str) -> list[str]:
    return [c.method for c in slack.calls if c.args.get("channel") == channel and c.method in VISIBLE]


async def classified_and_escalated(h: Any, ts: str) -> None:
    await h.slack.wait_for("chat.postMessage", predicate=lambda c: c.args["channel"] == ESCALATION, timeout=8)
    [message] = await h.rows(Message, Message.ts == ts)
    assert message.state == MessageState.CLASSIFIED and message.reply_ts is None
    assert await h.count(Prediction) == 1


async def test_a_shared_channel_gets_no_triage_at_all(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory(prepare=shared_channel, triage_urgent_labels=ALL_URGENT)
    event, _ = await h.post_customer_message("Our whole team is locked out since this morning")
    await classified_and_escalated(h, event["ts"])
    assert visible_in(h.slack, CHANNEL) == []
    assert {c.method for c in h.slack.calls if c.args.get("channel") == CHANNEL} <= {
        "conversations.info",
        "conversations.history",  # the start-up backfill reads; it posts nothing
        "chat.getPermalink",
    }
    # the look-up is cached: a second message asks Slack nothing new about the channel
    await h.post_customer_message("Still locked out")
    assert await h.eventually(lambda: _equals(h.count(Prediction), 2))
    assert len(h.slack.calls_to("conversations.info")) == 1 + 1  # start-up check of ESCALATION, then one
    assert visible_in(h.slack, CHANNEL) == []


async def test_silent_channel_is_classified_and_escalated_without_a_word_there(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory(triage_urgent_labels=ALL_URGENT, triage_channel_delivery=f"{CHANNEL}=silent")
    event, _ = await h.post_customer_message("The API returns 500 for every request")
    await classified_and_escalated(h, event["ts"])
    assert visible_in(h.slack, CHANNEL) == []


async def test_thread_mode_in_an_internal_channel_is_unchanged(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory(triage_urgent_labels=ALL_URGENT)
    event, _ = await h.post_customer_message("The API returns 500 for every request")
    await h.reply_to(event["ts"])
    await h.slack.wait_for("reactions.add", timeout=8)
    assert sorted(set(visible_in(h.slack, CHANNEL))) == ["chat.postMessage", "reactions.add"]


async def test_start_up_names_each_missing_invite(
    harness_factory: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    def outside(slack: SlackStandIn) -> None:
        slack.add_channel(ESCALATION, "escalations", is_member=False)

    with caplog.at_level(logging.ERROR, logger="bot.main"):
        await harness_factory(prepare=outside, triage_summary_channel=ESCALATION)
    [line] = [r.getMessage() for r in caplog.records if "cannot post" in r.getMessage()]
    assert f"TRIAGE_ESCALATION_CHANNEL and TRIAGE_SUMMARY_CHANNEL {ESCALATION}: not a member" in line


def test_delivery_settings() -> None:
    assert load_settings(**BASE).delivery_for("C0ANY") == Delivery.THREAD
    carded = load_settings(**BASE, triage_card_channel="C0CARDS", triage_channel_delivery="C0LOUD=thread")
    assert carded.delivery_for("C0ANY") == Delivery.CARD and carded.delivery_for("C0LOUD") == Delivery.THREAD
    assert load_settings(**BASE, triage_delivery="silent").delivery_for("C0ANY") == Delivery.SILENT


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"triage_delivery": "card"}, "TRIAGE_DELIVERY=card needs TRIAGE_CARD_CHANNEL"),
        ({"triage_channel_delivery": "C0123=card"}, "TRIAGE_CHANNEL_DELIVERY needs TRIAGE_CARD_CHANNEL"),
        ({"triage_delivery": "loud"}, "TRIAGE_DELIVERY: Input should be 'card', 'thread' or 'silent'"),
        (
            {"triage_channel_delivery": "C0123=loud"},
            "'C0123=loud' must look like C0123ABCD=card|thread|silent",
        ),
        ({"triage_channel_delivery": "general=thread"}, "must look like C0123ABCD="),
        ({"triage_card_channel": "#cards"}, "TRIAGE_CARD_CHANNEL: not a Slack channel id"),
    ],
)
def test_delivery_settings_are_validated(settings: dict[str, str], problem: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(**BASE, **settings)
    assert problem in str(err.value)


def test_the_bots_own_channels_are_never_triaged() -> None:
    s = load_settings(
        **BASE,
        triage_card_channel="C0CARDS",
        triage_escalation_channel="C0ESC",
        triage_summary_channel="C0SUM",
        triage_routes="billing=C0BILL",
    )
    assert set(s.own_channels) == {"C0CARDS", "C0ESC", "C0SUM", "C0BILL"}
    assert not any(s.watches(c) for c in s.own_channels) and s.watches("C0CUSTOMERS")
