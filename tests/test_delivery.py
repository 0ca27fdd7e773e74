"""Where triage shows up (TRIAGE_DELIVERY, TRIAGE_CHANNEL_DELIVERY, shared channels), end to end over HTTP."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from slack_sdk.web.async_client import AsyncWebClient

from bot.agents import Agents
from bot.delivery import DeliveryPolicy
from bot.settings import Delivery, SettingsError, load_settings
from bot.storage.models import Message, MessageState, Prediction
from tests.support.slack_standin import SlackStandIn
from tests.test_bot import AGENT, CHANNEL, CUSTOMER, ESCALATION, harness_factory  # noqa: F401

CARDS = "C0CARDS"
GUEST = "U0GUEST"  # a customer invited to the internal channel as a guest
MEMBER = "U0MEMBER"  # a customer who is a full member of the workspace (an employee asking IT, say)

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


def guest_and_member(slack: SlackStandIn) -> None:
    slack.add_user(GUEST, "guest", is_restricted=True)
    slack.add_user(MEMBER, "member")


def about(slack: SlackStandIn, ts: str) -> list[str]:
    """What the bot made visible in the channel about the message at ``ts``: replies, reactions, notes."""
    return [
        c.method
        for c in slack.calls
        if c.method in VISIBLE
        and c.args.get("channel") == CHANNEL
        and ts in (c.args.get("thread_ts"), c.args.get("timestamp"))
    ]


async def post_as(h: Any, user: str, text: str) -> str:
    event = h.slack.message_event(CHANNEL, user, text)
    assert (await h.slack.send_event(event)).status == 200
    return str(event["ts"])


async def test_a_guests_message_in_an_internal_thread_channel_gets_nothing_shown_there(
    harness_factory: Any,  # noqa: F811
) -> None:
    """A guest reads the thread under their message: no labels, confidence, hints or markers there; a
    full member's message in the same channel is answered in its thread as before."""
    h = await harness_factory(prepare=guest_and_member, triage_agents=AGENT, triage_urgent_labels=ALL_URGENT)
    guest_ts = await post_as(h, GUEST, "Our whole team is locked out since this morning")
    await classified_and_escalated(h, guest_ts)
    member_ts = await post_as(h, MEMBER, "The VPN drops every ten minutes")
    await h.reply_to(member_ts)
    await h.slack.wait_for("reactions.add", predicate=lambda c: c.args["timestamp"] == member_ts, timeout=8)
    assert about(h.slack, guest_ts) == []
    assert sorted(set(about(h.slack, member_ts))) == ["chat.postMessage", "reactions.add"]


async def test_a_guests_message_gets_its_card_when_a_card_channel_is_set(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory(
        prepare=guest_and_member,
        triage_agents=AGENT,
        triage_card_channel=CARDS,
        triage_channel_delivery=f"{CHANNEL}=thread",
    )
    ts = await post_as(h, GUEST, "Is there a way to export all invoices at once?")
    [card] = await h.slack.wait_for(
        "chat.postMessage", predicate=lambda c: c.args["channel"] == CARDS, timeout=8
    )
    assert "Topic" in str(card.args["blocks"])
    [message] = await h.rows(Message, Message.ts == ts)
    assert message.reply_ts is None
    assert visible_in(h.slack, CHANNEL) == []


async def test_a_failed_author_look_up_shows_nothing_and_is_logged_once(
    harness_factory: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """users.info failing: the author could be a guest, so nothing shows in the channel; one warning, not
    one a message."""
    h = await harness_factory(prepare=guest_and_member, triage_agents=AGENT)
    h.slack.fail_next("users.info", error="ratelimited", status=200, count=None)
    with caplog.at_level(logging.WARNING, logger="bot.agents"):
        first = await post_as(h, MEMBER, "The VPN drops every ten minutes")
        second = await post_as(h, MEMBER, "And now the printer is offline too")
        await h.settled()
        assert await h.eventually(
            lambda: _equals(h.count(Message, Message.state == MessageState.CLASSIFIED), 2)
        )
    assert about(h.slack, first) == [] and about(h.slack, second) == []
    assert h.slack.calls_to("users.info") and all(c.error for c in h.slack.calls_to("users.info"))
    warnings = [r.getMessage() for r in caplog.records if r.name == "bot.agents"]
    assert len(warnings) == 1 and "shown no labels" in warnings[0]


async def test_a_thread_a_guest_wrote_in_gets_no_marker_from_its_authors() -> None:
    """The urgent marker on a thread's first message: its author and the reply's both count."""
    async with SlackStandIn() as slack:
        guest_and_member(slack)
        client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
        policy = DeliveryPolicy(load_settings(**BASE), client, Agents(client, slack.team_id, admins=[]))
        assert await policy.mode_for(CHANNEL, [MEMBER]) == Delivery.THREAD
        assert await policy.mode_for(CHANNEL, [None]) == Delivery.THREAD  # a Workflow Builder post
        assert await policy.mode_for(CHANNEL, [MEMBER, GUEST]) == Delivery.SILENT
        assert await policy.mode_for(CHANNEL, [GUEST, MEMBER]) == Delivery.SILENT


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
