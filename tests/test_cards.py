"""Triage cards in TRIAGE_CARD_CHANNEL, end to end over HTTP against the Slack stand-in, on both databases."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import URL, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import cards
from bot.agents import Agents
from bot.blocks import LabelView, classify_blocks
from bot.settings import load_settings
from bot.slack_output import SlackOutput
from bot.storage import repository as repo
from bot.storage.database import create_db_engine, create_session_factory
from bot.storage.models import (
    Card,
    Correction,
    CorrectionSource,
    EscalationState,
    Incident,
    Message,
    MessageState,
    Prediction,
    utcnow,
)
from classifier.data import Example, write_jsonl
from classifier.model import MultiHeadClassifier
from classifier.neighbors import save_training_embeddings
from classifier.registry import Registry
from classifier.results import Neighbor
from classifier.schema import DEFAULT_HEADS, LabelSchema
from tests.support.slack_standin import ApiCall, ApiError, SlackStandIn
from tests.support.tiny_model import make_tiny_version
from tests.test_bot import AGENT, CHANNEL, CUSTOMER, ESCALATION, harness_factory  # noqa: F401
from tests.test_delivery import visible_in

CARDS = "C0CARDS"
PARTNER = "U0ACMEJOE"  # a customer from another organization
NONE_URGENT = "no_such_label"  # the model escalates nothing by itself: only people do


async def card_for(h: Any, text: str, within_s: float = 8) -> ApiCall:
    [card] = await h.slack.wait_for(
        "chat.postMessage",
        predicate=lambda c: c.ok and c.args["channel"] == CARDS and text[:40] in str(c.args),
        timeout=within_s,
    )
    return card


async def card_update(h: Any, card: ApiCall, needle: str) -> ApiCall:
    [update] = await h.slack.wait_for(
        "chat.update",
        predicate=lambda c: c.args["ts"] == card.response["ts"] and needle in str(c.args["blocks"]),
        timeout=8,
    )
    return update


def button_ids(card: ApiCall) -> list[str]:
    return [e["action_id"] for b in card.args["blocks"] if b["type"] == "actions" for e in b["elements"]]


async def test_card_mode_posts_one_card_per_message_and_nothing_in_the_channel(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory(triage_card_channel=CARDS, triage_urgent_labels=NONE_URGENT)
    texts = [f"Message {n}: the export to CSV fails with error {n}" for n in range(3)]
    events = [(await h.post_customer_message(text))[0] for text in texts]
    posted = [await card_for(h, text) for text in texts]
    assert len(h.slack.calls_to("chat.postMessage")) == 3 and visible_in(h.slack, CHANNEL) == []
    card = posted[0]
    shown = str(card.args["blocks"])
    assert f"in <#{CHANNEL}>" in shown and f"> {texts[0]}" in shown
    assert f"/archives/{CHANNEL}/p{events[0]['ts'].replace('.', '')}" in shown  # chat.getPermalink's link
    assert "*Topic:*" in shown and "%" in shown
    assert button_ids(card) == [
        cards.FIX_ACTION,
        cards.CLAIM_ACTION,
        cards.NOT_REQUEST_ACTION,
        cards.ESCALATE_ACTION,
    ]

    async def all_recorded() -> list[Card]:
        rows = await h.rows(Card)
        return rows if all(r.ts for r in rows) else []

    rows = await h.eventually(all_recorded)
    assert sorted(r.ts for r in rows) == sorted(c.response["ts"] for c in posted)
    assert all(r.channel_id == CARDS and r.due_at is None for r in rows)


async def test_claim_is_recorded_and_shown_and_customers_cannot(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory(triage_card_channel=CARDS)
    await h.post_customer_message("Can someone look at invoice 4471?")
    card = await card_for(h, "Can someone look at invoice 4471?")
    h.slack.add_user(PARTNER, "joe", team_id="T0ACME")
    ts = card.response["ts"]
    refused = await h.slack.send_block_actions(
        [{"action_id": cards.CLAIM_ACTION}], user_id=PARTNER, channel_id=CARDS, message_ts=ts
    )
    assert refused.status == 200
    await h.slack.wait_for("chat.postEphemeral", predicate=lambda c: c.args["user"] == PARTNER, timeout=5)
    assert [r.claimed_by for r in await h.rows(Card)] == [None]
    response = await h.slack.send_block_actions(
        [{"action_id": cards.CLAIM_ACTION}], user_id=AGENT, channel_id=CARDS, message_ts=ts
    )
    assert response.status == 200
    await card_update(h, card, f"claimed by <@{AGENT}>")
    [row] = await h.rows(Card)
    assert row.claimed_by == AGENT and row.claimed_at is not None


async def test_an_agents_reaction_updates_the_card(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory(triage_card_channel=CARDS)
    event, _ = await h.post_customer_message("Export to CSV crashes the app every time")
    card = await card_for(h, "Export to CSV crashes the app every time")
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "moneybag", CHANNEL, event["ts"]))
    update = await card_update(h, card, f"corrected by <@{AGENT}>")
    assert "billing" in str(update.args["blocks"])
    # the card is not in that channel: the agent (only) gets a note there
    [note] = await h.slack.wait_for("chat.postEphemeral", timeout=5)
    assert (note.args["channel"], note.args["user"]) == (CHANNEL, AGENT) and "Topic: billing" in note.args[
        "text"
    ]
    assert visible_in(h.slack, CHANNEL) == ["chat.postEphemeral"]


async def test_a_deleted_message_is_marked_on_its_card(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory(triage_card_channel=CARDS)
    event, _ = await h.post_customer_message("Please cancel my subscription today")
    card = await card_for(h, "Please cancel my subscription today")
    await h.slack.send_event(h.slack.message_deleted_event(CHANNEL, event["ts"]))
    update = await card_update(h, card, "deleted by its author")
    assert "cancel my subscription" not in str(update.args)


async def test_fix_labels_modal_stores_the_corrections_and_updates_the_card(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory(triage_card_channel=CARDS)
    await h.post_customer_message("We were charged twice this month")
    card = await card_for(h, "We were charged twice this month")
    await h.slack.send_block_actions(
        [{"action_id": cards.FIX_ACTION}], user_id=AGENT, channel_id=CARDS, message_ts=card.response["ts"]
    )
    [opened] = await h.slack.wait_for("views.open", timeout=5)
    view = opened.args["view"]
    selects = {e["action_id"]: e for _, e in _elements(view["blocks"]) if e["type"] == "static_select"}
    assert set(selects) == {"label:topic", "label:urgency", "label:sentiment"}
    [message] = await h.rows(Message)
    assert all("initial_option" in s for s in selects.values()) and view["private_metadata"] == str(
        message.id
    )
    current_topic = selects["label:topic"]["initial_option"]["value"]
    new_topic = "outage" if current_topic != "outage" else "billing"
    h.slack.add_user(PARTNER, "joe", team_id="T0ACME")
    forged = await h.slack.send_view_submission({"label:topic": new_topic}, user_id=PARTNER)
    assert forged.status == 200  # a customer's submission (however they got the view) changes nothing
    response = await h.slack.send_view_submission(
        {"label:topic": new_topic, "label:urgency": "critical"}, user_id=AGENT
    )
    assert response.status == 200
    await card_update(h, card, f"corrected by <@{AGENT}>")
    stored = {c.head: (c.new_label, c.user_id) for c in await h.rows(Correction)}
    assert all(c.user_id == AGENT for c in await h.rows(Correction))
    assert stored["topic"] == (new_topic, AGENT)
    assert "urgency" not in stored or stored["urgency"] == ("critical", AGENT)


async def test_a_customer_from_another_organization_is_named_with_it(harness_factory: Any) -> None:  # noqa: F811
    def shared(slack: SlackStandIn) -> None:
        slack.add_team("T0ACME", "Acme Corp")
        slack.add_user(PARTNER, "joe", real_name="Joe Partner", display_name="Joe", team_id="T0ACME")
        slack.add_channel(CHANNEL, "acme-support", shared_with=["T0ACME"])

    h = await harness_factory(
        prepare=shared, triage_card_channel=CARDS, triage_channel_delivery=f"{CHANNEL}=thread"
    )
    await h.slack.send_event(h.slack.message_event(CHANNEL, PARTNER, "Our SSO login is broken"))
    card = await card_for(h, "Our SSO login is broken")  # thread asked for; shared: a card instead
    assert "*Joe* (Acme Corp)" in str(card.args["blocks"])
    assert visible_in(h.slack, CHANNEL) == []


async def test_cards_wait_in_the_database_when_slack_refuses_and_are_never_dropped(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory(triage_card_channel=CARDS)
    # the first try fails with its two retries (the client's 5xx policy); the card waits, then goes out
    h.slack.fail_next("chat.postMessage", status=500, count=3, predicate=lambda a: a.get("channel") == CARDS)
    await h.post_customer_message("Nothing loads in the dashboard")
    card = await card_for(h, "Nothing loads in the dashboard", within_s=20)

    async def recorded() -> list[Card]:
        return await h.rows(Card, Card.ts == card.response["ts"])

    [row] = await h.eventually(recorded)
    assert row.attempts == 2 and row.due_at is None
    assert len([c for c in h.slack.calls_to("chat.postMessage") if c.ok]) == 1


async def test_the_card_queue_takes_urgent_cards_first(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    now = utcnow()
    async with session_factory.begin() as session:
        ids = []
        for n, urgent in enumerate([False, False, True, False]):
            message, _ = await repo.store_message(
                session, team_id="T1", channel_id="C1", ts=f"1.{n}", user_id=CUSTOMER, text=f"m{n}"
            )
            await repo.queue_card(session, message.id, urgent=urgent, now=now + timedelta(seconds=n))
            ids.append(message.id)
    order = []
    while True:
        async with session_factory.begin() as session:
            card = await repo.claim_due_card(session, now=now + timedelta(seconds=10))
        if card is None:
            break
        order.append(card.message_id)
    assert order == [ids[2], ids[0], ids[1], ids[3]]  # leased: each taken once


async def test_raising_urgency_escalates_and_lowering_edits_the_escalation_post(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory(triage_card_channel=CARDS, triage_urgent_labels="critical")
    event, _ = await h.post_customer_message("The checkout page shows a blank screen")
    card = await card_for(h, "The checkout page shows a blank screen")
    ts = event["ts"]

    async def react(emoji: str, added: bool = True) -> None:
        make = h.slack.reaction_added_event if added else h.slack.reaction_removed_event
        assert (await h.slack.send_event(make(AGENT, emoji, CHANNEL, ts))).status == 200

    await react("large_green_circle")  # urgency low: whatever the model said, not urgent now
    await h.slack.wait_for("chat.postEphemeral", timeout=8)  # the agent's feedback comes last
    await react("red_circle")  # urgency critical: escalated, by the agent
    [post] = await h.slack.wait_for(
        "chat.postMessage",
        predicate=lambda c: (
            c.args["channel"] == ESCALATION and f"escalated by <@{AGENT}>" in str(c.args["blocks"])
        ),
        timeout=8,
    )
    assert button_ids(post) == [cards.ACKNOWLEDGE_ACTION, cards.ESCALATION_CLAIM_ACTION]
    await card_update(h, card, f"escalated by <@{AGENT}>")

    acked = await h.slack.send_block_actions(
        [{"action_id": cards.ACKNOWLEDGE_ACTION}],
        user_id=AGENT,
        channel_id=ESCALATION,
        message_ts=post.response["ts"],
    )
    assert acked.status == 200
    await card_update(h, post, f"acknowledged by <@{AGENT}>")

    await react("red_circle", added=False)  # back to the agent's "low": de-escalated, the post edited
    edited = await card_update(h, post, f"de-escalated by <@{AGENT}>")
    assert button_ids(edited) == []
    await card_update(h, card, f"de-escalated by <@{AGENT}>")
    [row] = await h.rows(Card)
    assert (row.escalation_state, row.escalation_ts) == (EscalationState.DEESCALATED, post.response["ts"])


async def test_card_buttons_escalate_and_de_escalate(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory(triage_card_channel=CARDS, triage_urgent_labels=NONE_URGENT)
    await h.post_customer_message("Please call me back about the contract")
    card = await card_for(h, "Please call me back about the contract")
    ts = card.response["ts"]
    await h.slack.send_block_actions(
        [{"action_id": cards.ESCALATE_ACTION}], user_id=AGENT, channel_id=CARDS, message_ts=ts
    )
    [post] = await h.slack.wait_for(
        "chat.postMessage", predicate=lambda c: c.args["channel"] == ESCALATION, timeout=8
    )
    shown = await card_update(h, card, f"escalated by <@{AGENT}>")
    assert cards.DEESCALATE_ACTION in button_ids(shown)
    await h.slack.send_block_actions(
        [{"action_id": cards.DEESCALATE_ACTION}], user_id=AGENT, channel_id=CARDS, message_ts=ts
    )
    edited = await card_update(h, post, f"de-escalated by <@{AGENT}>")
    # its notification text says so too, not the alarm it replaced
    assert edited.args["text"].startswith(":arrow_down: *de-escalated* · ")
    assert edited.args["blocks"][0]["text"]["text"].startswith(edited.args["text"])
    assert len([c for c in h.slack.calls_to("chat.postMessage") if c.args["channel"] == ESCALATION]) == 1


async def test_a_burst_of_one_topic_becomes_one_possible_incident(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory(
        triage_card_channel=CARDS, triage_urgent_labels=NONE_URGENT, triage_incident_count=2
    )
    texts = ["Site down for us", "Cannot reach the dashboard", "Everything times out"]
    for n, text in enumerate(texts, 1):
        event, _ = await h.post_customer_message(text)
        card = await card_for(h, text)
        await h.slack.send_event(h.slack.reaction_added_event(AGENT, "fire", CHANNEL, event["ts"]))  # outage
        await h.slack.wait_for("chat.postEphemeral", count=n, timeout=8)
        await h.slack.send_block_actions(
            [{"action_id": cards.ESCALATE_ACTION}],
            user_id=AGENT,
            channel_id=CARDS,
            message_ts=card.response["ts"],
        )
        await h.slack.wait_for(
            "chat.postMessage",
            predicate=lambda c, t=text: c.args["channel"] == ESCALATION and t in str(c.args),
            timeout=8,
        )
    posts = [c for c in h.slack.calls_to("chat.postMessage") if c.args["channel"] == ESCALATION]
    [incident] = [c for c in posts if "Possible incident" in c.args["text"]]
    assert "2 urgent messages about *outage*" in incident.args["text"]
    threads = {
        texts[i]: next(c for c in posts if texts[i] in str(c.args)).args.get("thread_ts") for i in range(3)
    }
    assert threads == {texts[0]: None, texts[1]: incident.response["ts"], texts[2]: incident.response["ts"]}
    [row] = await h.rows(Incident)
    assert (row.topic, row.escalations, row.ts) == ("outage", 3, incident.response["ts"])


def test_an_unsure_urgent_prediction_is_flagged_not_escalated() -> None:
    settings = load_settings(_env_file=None, slack_bot_token="xoxb-1", slack_signing_secret="s")
    unsure = {"urgency": LabelView("critical", confidence=0.3)}
    sure = {"urgency": LabelView("critical", confidence=0.9)}
    set_by_agent = {"urgency": LabelView("critical", predicted="low", by=AGENT)}
    assert cards.unsure_urgent(unsure, settings) and not cards.unsure_urgent(sure, settings)
    assert not cards.unsure_urgent(set_by_agent, settings)
    assert ":eyes: possibly urgent" in cards.status_line(Card(), unsure_urgent=True)


def _elements(blocks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for block in blocks:
        if "element" in block:
            found.append((block.get("block_id", ""), block["element"]))
        for element in block.get("elements", []) if block["type"] == "actions" else []:
            found.append((block.get("block_id", ""), element))
    return found


async def test_an_organization_slack_cannot_name_is_looked_up_once_a_minute() -> None:
    """``team.info`` failing (an organization the app may not read) must not cost a look-up and a warning
    for every message of that organization's people."""
    async with SlackStandIn() as slack:
        for n in range(3):
            slack.add_user(f"U0GUEST{n}", f"guest{n}", team_id="T0UNKNOWN")  # no such team in the stand-in
        client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
        people = cards.People(Agents(client, slack.team_id, admins=[]))
        found = [await people.requester(f"U0GUEST{n}", own_team=slack.team_id) for n in range(3)]
    assert [r.organization for r in found] == ["T0UNKNOWN"] * 3
    assert len(slack.calls_to("team.info")) == 1


async def test_a_card_names_its_requester_by_mention_when_slack_cannot_say_who_it_is() -> None:
    """``users.info`` failing must not fail the card: it names the person by mention (Slack shows the name),
    and one cached look-up serves the card and the agent check alike."""

    def no_such_user(call: ApiCall) -> dict[str, Any]:
        raise ApiError("user_not_found")

    async with SlackStandIn() as slack:
        slack.add_user("U0ANNA", "anna", display_name="Anna K", team_id="T0ACME")
        slack.add_team("T0ACME", "Acme Corp")
        client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
        agents = Agents(client, slack.team_id, admins=[])
        people = cards.People(agents)
        anna = await people.requester("U0ANNA", own_team=slack.team_id)
        slack.register_method("users.info", no_such_user)
        unknown = await people.requester("U0GONE", own_team=slack.team_id)
        assert not await agents.is_agent("U0GONE") and not await agents.is_agent("U0ANNA")  # both cached
    assert (anna.name, anna.organization) == ("Anna K", "Acme Corp")
    assert (unknown.name, unknown.organization) == ("<@U0GONE>", None)
    assert [c.args["user"] for c in slack.calls_to("users.info")] == ["U0ANNA", "U0GONE"]


def _plain(text: str) -> dict[str, str]:
    return {"type": "plain_text", "text": text}


async def note_to(h: Any, user: str, channel: str, needle: str) -> ApiCall:
    [note] = await h.slack.wait_for(
        "chat.postEphemeral",
        predicate=lambda c: (
            (c.args["user"], c.args["channel"]) == (user, channel) and needle in c.args["text"]
        ),
        timeout=8,
    )
    return note


async def test_a_label_the_model_lacks_is_refused_with_a_note_that_says_why(
    harness_factory: Any,  # noqa: F811
    tiny_bert: Path,
    data_dir: Path,
) -> None:
    heads = {**DEFAULT_HEADS, "topic": ["bug", "outage", "other"]}  # no billing
    make_tiny_version(Registry(data_dir / "models"), tiny_bert, LabelSchema(heads=heads))
    h = await harness_factory(with_model=False, triage_card_channel=CARDS)
    event, _ = await h.post_customer_message("We were charged twice this month")
    await card_for(h, "We were charged twice this month")
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "moneybag", CHANNEL, event["ts"]))
    note = await note_to(h, AGENT, CHANNEL, "*Topic: billing* was not stored")
    assert "no such topic label (it knows bug, other, outage)" in note.args["text"]
    [message] = await h.rows(Message)
    older_modal = {
        "id": "V0OLDER",
        "type": "modal",
        "callback_id": cards.FIX_LABELS_CALLBACK,
        "private_metadata": str(message.id),
    }
    chosen = {"type": "static_select", "selected_option": {"text": _plain("billing"), "value": "billing"}}
    await h.slack.send_view_submission(
        values={"head:topic": {"label:topic": chosen}}, view=older_modal, user_id=AGENT
    )
    await note_to(h, AGENT, CARDS, "*Topic: billing* was not stored")
    assert await h.count(Correction) == 0


async def test_a_correction_made_before_classification_applies_once_classified(
    harness_factory: Any,  # noqa: F811
    tiny_bert: Path,
    data_dir: Path,
) -> None:
    h = await harness_factory(with_model=False, triage_card_channel=CARDS)
    event, _ = await h.post_customer_message("The invoice total is wrong")
    assert await h.eventually(lambda: h.count(Message, Message.last_error.is_not(None)))  # no classifier
    for emoji in ("moneybag", "bulb"):  # billing; feature_request, which the coming model lacks
        await h.slack.send_event(h.slack.reaction_added_event(AGENT, emoji, CHANNEL, event["ts"]))
        kept = await note_to(h, AGENT, CHANNEL, "* is kept: it applies once the message is classified")
        assert kept.args["text"].startswith("*Topic: ")  # the head named as replies and cards name it
    assert sorted(c.new_label for c in await h.rows(Correction)) == ["billing", "feature_request"]
    heads = {**DEFAULT_HEADS, "topic": ["billing", "bug", "other"]}
    make_tiny_version(Registry(data_dir / "models"), tiny_bert, LabelSchema(heads=heads))
    card = await card_for(h, "The invoice total is wrong", within_s=15)
    assert "billing" in str(card.args["blocks"]) and f"<@{AGENT}>" in str(card.args["blocks"])
    await note_to(h, AGENT, CHANNEL, "*Topic: feature_request* was not stored")
    [message] = await h.rows(Message)
    assert message.state == MessageState.CLASSIFIED
    by_label = {c.new_label: c for c in await h.rows(Correction)}
    assert by_label["billing"].old_label is not None and by_label["billing"].retracted_at is None
    assert by_label["feature_request"].retracted_at is not None


async def test_not_a_request_stores_the_noise_label_as_the_agents_correction(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory(triage_card_channel=CARDS)
    await h.post_customer_message("ok thanks, that did it")
    card = await card_for(h, "ok thanks, that did it")
    await h.slack.send_block_actions(
        [{"action_id": cards.NOT_REQUEST_ACTION}],
        user_id=AGENT,
        channel_id=CARDS,
        message_ts=card.response["ts"],
    )
    update = await card_update(h, card, f"not a request (<@{AGENT}>)")
    assert "not_a_request" in str(update.args["blocks"])
    [correction] = await h.rows(Correction)
    assert (correction.head, correction.new_label, correction.user_id, correction.source) == (
        "topic",
        "not_a_request",
        AGENT,
        CorrectionSource.BUTTON,
    )


async def test_two_replicas_racing_through_one_burst_make_one_possible_incident(
    database_url: URL, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    """Escalations of one topic handled at once by two replicas (two engines on one database): the
    database lets one of them start the incident; the other threads its escalations under it."""
    settings = load_settings(
        _env_file=None,
        slack_bot_token="xoxb-1",
        slack_signing_secret="s",
        triage_escalation_channel=ESCALATION,
        triage_incident_count=2,
    )
    async with session_factory.begin() as session:
        burst = []
        for n in range(8):
            message, _ = await repo.store_message(
                session, team_id="T1", channel_id="C1", ts=f"1.{n}", user_id=CUSTOMER, text=f"down {n}"
            )
            await repo.ensure_card(session, message.id)
            burst.append(message)
    views = {"topic": LabelView("outage", confidence=0.9)}
    second = create_db_engine(database_url)
    try:
        async with SlackStandIn() as slack:
            output = SlackOutput(AsyncWebClient(token=slack.bot_token, base_url=slack.api_url))
            replicas = [
                cards.CardDesk(settings, sessions, output)
                for sessions in (session_factory, create_session_factory(second))
            ]
            requester = cards.Requester(CUSTOMER, "customer")
            threads = await asyncio.gather(
                *(
                    replicas[n % 2]._incident_thread(
                        cards.CardContent(m, Card(), views, {}, "v1", requester, None)
                    )
                    for n, m in enumerate(burst)
                )
            )
            [post] = [c for c in slack.calls_to("chat.postMessage") if "Possible incident" in c.args["text"]]
    finally:
        await second.dispose()
    [incident] = await _rows(session_factory, Incident)
    assert (incident.topic, incident.open_topic, incident.ts) == ("outage", "outage", post.response["ts"])
    assert set(threads) <= {None, post.response["ts"]} and threads.count(post.response["ts"]) >= 1


async def _rows(sessions: async_sessionmaker[AsyncSession], model: Any) -> list[Any]:
    async with sessions() as session:
        return list((await session.scalars(select(model))).all())


async def test_a_card_posted_just_before_the_bot_died_is_adopted_not_posted_again(
    harness_factory: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = await harness_factory(triage_card_channel=CARDS)
    died = asyncio.Event()
    recorded = repo.card_posted

    async def dies_before_recording(session: Any, card_id: int, **where: str) -> None:
        if not died.is_set():  # the instant after chat.postMessage succeeded, before its ts is stored
            died.set()
            raise asyncio.CancelledError  # the card loop stops here, as a killed process would
        await recorded(session, card_id, **where)

    monkeypatch.setattr(repo, "card_posted", dies_before_recording)
    await h.post_customer_message("The mobile app logs me out every hour")
    posted = await card_for(h, "The mobile app logs me out every hour")
    await asyncio.wait_for(died.wait(), timeout=8)
    await h.restart()
    [card] = await h.rows(Card)
    assert card.ts is None and card.attempts == 1
    async with h.sessions.begin() as session:  # no need to wait a minute for the dead replica's lease
        await session.execute(update(Card).values(due_at=utcnow()))

    async def recorded_card() -> list[Card]:
        return await h.rows(Card, Card.ts.is_not(None))

    [card] = await h.eventually(recorded_card)
    assert card.ts == posted.response["ts"] and card.channel_id == CARDS  # the card already in Slack
    assert [c for c in h.slack.calls_to("chat.postMessage") if c.args["channel"] == CARDS] == [posted]
    [lookup] = [c for c in h.slack.calls_to("conversations.history") if c.args["channel"] == CARDS]
    assert lookup.args["include_all_metadata"] in (True, "1", "true")
    [message] = await h.rows(Message)
    assert posted.args["metadata"] == {
        "event_type": "triage_card",
        "event_payload": {"message_id": message.id},
    }


FORMER = "U0FORMER"  # a customer whose earlier message the model was trained on, later forgotten
TRAINED_ON = "My card was declined at the shop yesterday"


def _version_trained_on_slack_and_dataset_rows(registry: Registry, tiny_bert: Path) -> None:
    """A version whose saved training embeddings (why this label) hold, for every topic, the first Slack
    message (``slack:1``) and two rows of the operator's dataset with mrkdwn control characters."""
    info = make_tiny_version(registry, tiny_bert)
    folder = Path(info.path)
    rows = [
        row
        for label in DEFAULT_HEADS["topic"]
        for row in (
            Example(TRAINED_ON, {"topic": label}, "slack:1"),
            Example(f"Refund <b>now</b> & fast ({label})", {"topic": label}, f"import:{label}:0"),
            Example(f"Where is my {label} thing", {"topic": label}, f"import:{label}:1"),
        )
    ]
    write_jsonl(info.files.dataset, rows)
    model, tokenizer, max_length = MultiHeadClassifier.load(folder)
    save_training_embeddings(
        info.files.neighbors, model, tokenizer, rows, rows, max_length, 8, torch.device("cpu")
    )


def _why_texts(blocks: list[dict[str, Any]]) -> list[str]:
    [why] = [b for b in blocks if b.get("block_id") == "why"]
    assert why["type"] == "context"
    return [e["text"] for e in why["elements"]]


async def test_cards_and_the_modal_show_why_and_forgetting_the_trained_on_author_removes_it(
    harness_factory: Any,  # noqa: F811
    tiny_bert: Path,
    data_dir: Path,
) -> None:
    _version_trained_on_slack_and_dataset_rows(Registry(data_dir / "models"), tiny_bert)
    h = await harness_factory(
        with_model=False,
        prepare=lambda slack: slack.add_user(FORMER, "former", team_id="T0CUSTOMER"),
        triage_card_channel=CARDS,
        triage_urgent_labels=NONE_URGENT,
    )
    await h.slack.send_event(h.slack.message_event(CHANNEL, FORMER, TRAINED_ON))
    await card_for(h, TRAINED_ON)
    await h.post_customer_message("My card was declined at the till today")
    card = await card_for(h, "My card was declined at the till today")
    first, second = sorted(await h.rows(Message), key=lambda m: m.id)
    assert first.id == 1 and first.user_id == FORMER  # the version's slack:1

    # the card: the predicted topic, three snippets with their similarity; dataset text escaped
    [prediction] = await h.rows(Prediction, Prediction.message_id == second.id)
    topic = prediction.by_head()["topic"].label
    shown = _why_texts(card.args["blocks"])
    assert f"_{topic}_" in shown[0] and len(shown) == 4
    assert any(f"“{TRAINED_ON}”" in s for s in shown[1:])
    assert any(f"“Refund &lt;b&gt;now&lt;/b&gt; &amp; fast ({topic})”" in s for s in shown[1:])
    assert all(s.split(" ", 1)[0].replace(".", "").lstrip("-").isdigit() for s in shown[1:])
    # stored by reference: the Slack message's text is not copied into the prediction
    assert prediction.neighbors is not None and {"message_id": 1} in [
        {k: v for k, v in n.items() if k == "message_id"} for n in prediction.neighbors
    ]
    assert TRAINED_ON not in str(prediction.neighbors)
    assert visible_in(h.slack, CHANNEL) == []  # never in the customer's channel

    async def modal_why() -> list[str]:
        opened = len(h.slack.calls_to("views.open")) + 1
        await h.slack.send_block_actions(
            [{"action_id": cards.FIX_ACTION}], user_id=AGENT, channel_id=CARDS, message_ts=card.response["ts"]
        )
        views = await h.slack.wait_for("views.open", count=opened, timeout=5)
        return _why_texts(views[-1].args["view"]["blocks"])

    assert await modal_why() == shown
    async with h.sessions.begin() as session:
        await repo.forget_user(session, FORMER)
    after = await modal_why()
    assert len(after) == 3 and not any(TRAINED_ON in s for s in after)  # the dataset rows stay


def test_why_snippets_are_one_line_cut_whole_and_escaped_once() -> None:
    dataset = Neighbor("Fees <b>\n & charges " + "x" * 200, "billing", 0.8123)
    slack = Neighbor("a" * (cards.WHY_CHARS - 4) + " &amp; <@U123> more", "billing", 0.5, "slack:7")
    block = cards.why_block([dataset, slack])
    assert block is not None and block["block_id"] == "why" and block["type"] == "context"
    title, first, second = (e["text"] for e in block["elements"])
    assert "_billing_" in title
    assert first.startswith("0.81 “Fees &lt;b&gt; &amp; charges xxx") and first.endswith("…”")
    assert second == "0.50 “" + "a" * (cards.WHY_CHARS - 4) + " …”"  # not half of "&amp;"
    assert cards.why_block([]) is None


def test_a_quoted_customer_message_never_pings_a_channel_and_is_cut_whole() -> None:
    """A customer who writes <!channel> (or <!here>, a user group) must not make a card, an escalation post,
    the Fix labels modal or /classify notify everyone; a long text is cut short of Slack's limits and
    never in half a mention."""
    settings = load_settings(_env_file=None, slack_bot_token="xoxb-1", slack_signing_secret="s")
    text = (
        "<!channel> <!here|here> <!everyone> <!subteam^S0SUPPORT|@support> *down* `500` "
        + "x" * (cards.QUOTE_CHARS - 80)
        + " <@U0SOMEONE|someone> "
        + "lorem ipsum " * 400
    )
    message = Message(id=7, channel_id=CHANNEL, ts="1.2", text=text)
    views = {"urgency": LabelView("critical", confidence=0.9)}
    content = cards.CardContent(
        message,
        Card(message_id=7, escalation_state=EscalationState.ESCALATED),
        views,
        {"urgency": ["low", "critical"]},
        "v1",
        cards.Requester(CUSTOMER, "Joe", "Acme"),
        None,
        [Neighbor("<!here> " + "y" * 200, "outage", 0.9, "slack:3")],
    )
    shown = {
        "card": cards.card_blocks(content, settings),
        "escalation": cards.escalation_blocks(content, settings),
        "modal": cards.fix_labels_view(content)["blocks"],
        "/classify": classify_blocks(text, views, "v1"),
    }
    for where, rendered in shown.items():
        payload = str(rendered)
        for ping in ("<!channel", "<!here", "<!everyone", "<!subteam"):
            assert ping not in payload, (where, ping)
        assert "@channel" in payload and "@support" in payload, where
        assert "<@U0SOMEONE|some…" not in payload and "<@U0SOMEONE…" not in payload, where
        for block in rendered:
            section = (block.get("text") or {}).get("text", "")
            assert len(section) <= 3000, where
    [quote] = [b for b in shown["card"] if b.get("block_id") == "quote"]
    assert quote["text"]["text"].startswith("> @channel @here @everyone @support *down*")
    assert quote["text"]["text"].endswith("…") and len(quote["text"]["text"]) <= cards.QUOTE_CHARS + 2
