"""Agents and customers, and the whole life of a message, end to end over real HTTP on both databases.

The stand-in's default user (``U0CUSTOMER``) belongs to another organization: a customer. Users it makes
up on first use (``U0AGENT``) are full members of the bot's workspace: agents.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from slack_sdk.web.async_client import AsyncWebClient

from bot import agents as agents_module
from bot import backfill as backfill_module
from bot import triage as triage_module
from bot.agents import Agents
from bot.blocks import LabelView
from bot.main import start_bot
from bot.settings import load_settings
from bot.storage import repository as repo
from bot.storage.models import Correction, Message, MessageState, Prediction, SlackEvent, utcnow
from bot.triage import Triage
from classifier.registry import Registry
from classifier.schema import DEFAULT_HEADS, LabelSchema
from tests.support.slack_standin import SlackStandIn
from tests.support.tiny_model import make_tiny_version
from tests.test_bot import ADMIN, AGENT, CHANNEL, CUSTOMER, ESCALATION, caught_up, harness_factory  # noqa: F401

# Web API calls a bot makes whatever it is told (start-up, agents, backfill)
SETUP_CALLS = {
    "auth.test",
    "conversations.info",  # is the channel shared with another organization?
    "users.info",
    "usergroups.users.list",
    "conversations.history",
    "users.conversations",
}
UNIT_SETTINGS = {"_env_file": None, "slack_bot_token": "xoxb-1-2", "slack_signing_secret": "s3cret"}


async def test_a_customers_reaction_stores_nothing_and_an_agents_stores_a_correction(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory()
    event, _ = await h.post_customer_message("Export to CSV crashes the app every time")
    reply = await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Prediction))
    events_before = await h.count(SlackEvent)
    for ts in (event["ts"], reply.response["ts"]):  # on the message and on the bot's reply
        response = await h.slack.send_event(h.slack.reaction_added_event(CUSTOMER, "bug", CHANNEL, ts))
        assert response.status == 200  # acknowledged: not an error
    assert await h.count(Correction) == 0 and await h.count(SlackEvent) == events_before
    assert not h.slack.calls_to("chat.update")
    response = await h.slack.send_event(h.slack.reaction_added_event(AGENT, "bug", CHANNEL, event["ts"]))
    assert response.status == 200
    [correction] = await h.rows(Correction)
    assert (correction.user_id, correction.head, correction.new_label) == (AGENT, "topic", "bug")
    await h.slack.wait_for("chat.update", timeout=5)


async def test_agents_messages_are_not_triaged_unless_asked(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory()
    agent_said = h.slack.message_event(CHANNEL, AGENT, "We are looking into it, hang on")
    assert (await h.slack.send_event(agent_said)).status == 200
    assert await h.eventually(lambda: h.count(Message, Message.state == MessageState.SKIPPED))
    [message] = await h.rows(Message)
    assert (message.text, message.last_error) == (None, "written by an agent")
    customer, _ = await h.post_customer_message("The dashboard is blank since this morning")
    await h.reply_to(customer["ts"])
    assert {c.args.get("thread_ts") for c in h.slack.calls_to("chat.postMessage")} == {customer["ts"]}

    h2 = await harness_factory(triage_triage_agents=True)
    agent_asks = h2.slack.message_event(CHANNEL, AGENT, "Does the export work for anyone?")
    await h2.slack.send_event(agent_asks)
    await h2.reply_to(agent_asks["ts"])


async def test_triage_agents_names_users_and_user_groups(harness_factory: Any) -> None:  # noqa: F811
    """With TRIAGE_AGENTS set, agents are exactly those people and the groups' members (looked up with
    usergroups.users.list): a workspace member outside them is a customer, whose labels do not count."""
    member, lead, groupie = "U0MEMBER", "U0LEAD", "U0GROUPIE"
    h = await harness_factory(
        triage_agents="U0LEAD,S0SUPPORT", prepare=lambda slack: slack.add_usergroup("S0SUPPORT", [groupie])
    )
    [lookup] = h.slack.calls_to("usergroups.users.list")
    assert lookup.args["usergroup"] == "S0SUPPORT" and lookup.response["users"] == [groupie]
    asked = h.slack.message_event(CHANNEL, member, "How do I export all invoices?")
    await h.slack.send_event(asked)
    await h.reply_to(asked["ts"])  # a member of the workspace, but not an agent: triaged
    assert await h.eventually(lambda: h.count(Prediction))
    for user in (member, lead, groupie):
        await h.slack.send_event(h.slack.reaction_added_event(user, "bug", CHANNEL, asked["ts"]))
    assert sorted(c.user_id for c in await h.rows(Correction)) == [groupie, lead]
    assert len(h.slack.calls_to("usergroups.users.list")) == 1  # cached


async def _triaged(h: Any, text: str) -> tuple[dict[str, Any], Any]:
    event, _ = await h.post_customer_message(text)
    reply = await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Message, Message.state == MessageState.CLASSIFIED))
    return event, reply


async def test_an_edit_is_classified_again_and_the_reply_updated(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory()
    event, reply = await _triaged(h, "Export to CSV crashes the app every time")
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "bug", CHANNEL, event["ts"]))
    await h.slack.wait_for("chat.update", timeout=5)
    # an unfurl: Slack sends message_changed with the same text; nothing happens
    unfurl = h.slack.message_changed_event(CHANNEL, event["ts"], event["text"])
    unfurl["message"]["attachments"] = [{"id": 1, "title": "example.com", "from_url": "https://example.com"}]
    assert (await h.slack.send_event(unfurl)).status == 200
    [message] = await h.rows(Message)
    assert message.edited_at is None and message.state == MessageState.CLASSIFIED
    new_text = "Actually the whole site is down for all our users, nobody can log in"
    edit = h.slack.message_changed_event(CHANNEL, event["ts"], new_text)
    assert (await h.slack.send_event(edit)).status == 200
    [message] = await h.rows(Message)
    assert message.text == new_text and message.edited_at is not None  # replaced before the ack
    assert await h.eventually(lambda: h.count(Prediction)) and await h.eventually(
        lambda: h.count(Message, Message.state == MessageState.CLASSIFIED)
    )
    assert await h.count(Prediction) == 2
    updates = await h.slack.wait_for("chat.update", count=2, timeout=5)
    assert updates[-1].args["ts"] == reply.response["ts"]
    assert "_(given before the message was edited)_" in str(updates[-1].args["blocks"])
    posted = [c for c in h.slack.calls_to("chat.postMessage") if c.args.get("thread_ts") == event["ts"]]
    assert len(posted) == 1  # updated, never answered twice
    [correction] = await h.rows(Correction)  # kept, shown as given to the earlier text, not trained on
    assert correction.new_label == "bug"
    async with h.sessions() as session:
        assert await repo.export_training_set(session, until=utcnow()) == []
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "fire", CHANNEL, event["ts"]))
    async with h.sessions() as session:  # a label given to the new text is
        [example] = await repo.export_training_set(session, until=utcnow())
    assert (example.text, example.labels) == (new_text, {"topic": "outage"})


async def test_a_deleted_message_loses_its_text_and_its_reply(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory()
    event, reply = await _triaged(h, "Please refund invoice 4471, we were charged twice")
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "moneybag", CHANNEL, event["ts"]))
    assert await h.eventually(lambda: h.count(Correction))
    response = await h.slack.send_event(h.slack.message_deleted_event(CHANNEL, event["ts"]))
    assert response.status == 200
    [message] = await h.rows(Message)
    assert message.text is None and message.text_removed_at and message.deleted_at  # gone before the ack
    [deleted] = await h.slack.wait_for("chat.delete", timeout=5)
    assert (deleted.args["channel"], deleted.args["ts"], deleted.status) == (
        CHANNEL,
        reply.response["ts"],
        200,
    )
    assert h.slack.message(CHANNEL, reply.response["ts"]) is None
    async with h.sessions() as session:  # its labels are not trained on
        assert await repo.export_training_set(session, until=utcnow()) == []
    # Slack then tells of the reply's deletion too: nothing more happens
    assert (
        await h.slack.send_event(h.slack.message_deleted_event(CHANNEL, reply.response["ts"]))
    ).status == 200
    assert len(h.slack.calls_to("chat.delete")) == 1


async def test_a_deleted_thread_parent_leaves_a_tombstone_and_is_deleted(harness_factory: Any) -> None:  # noqa: F811
    """A message with replies (the bot's, at least) is replaced by a tombstone when deleted: Slack sends
    message_changed whose message has subtype tombstone."""
    h = await harness_factory()
    event, reply = await _triaged(h, "Our exports have been failing since Monday")
    tombstone = h.slack.thread_parent_deleted_event(CHANNEL, event["ts"])
    assert (await h.slack.send_event(tombstone)).status == 200
    [message] = await h.rows(Message)
    assert message.text is None and message.deleted_at is not None
    [deleted] = await h.slack.wait_for("chat.delete", timeout=5)
    assert deleted.args["ts"] == reply.response["ts"]


async def test_a_customer_reply_that_raises_the_threads_urgency_escalates_and_an_agent_lowers_it(
    harness_factory: Any,  # noqa: F811
    tiny_bert: Path,
    data_dir: Path,
) -> None:
    """Two one-label urgency models make the tiny model's calls certain: v1 says low (the thread is
    triaged, not escalated), v2 says critical (the customer's reply raises the thread: escalated once).
    An agent then setting the thread's urgency to low de-escalates the reply's escalation post."""
    registry = Registry(data_dir / "models")
    make_tiny_version(registry, tiny_bert, LabelSchema(heads={**DEFAULT_HEADS, "urgency": ["low"]}))
    make_tiny_version(
        registry, tiny_bert, LabelSchema(heads={**DEFAULT_HEADS, "urgency": ["critical"]}), activate=False
    )
    h = await harness_factory(with_model=False)
    event, _ = await _triaged(h, "Where can I find the invoices page?")
    await h.slack.send_command("/triage", "rollback v2", user_id=ADMIN, channel_id=CHANNEL)
    await h.slack.wait_for_response(timeout=10, predicate=lambda r: "v2 is now" in str(r.body))
    agent_reply = h.slack.message_event(CHANNEL, AGENT, "Checking, one moment", thread_ts=event["ts"])
    await h.slack.send_event(agent_reply)
    customer_reply = h.slack.message_event(CHANNEL, CUSTOMER, "Now nobody can log in!", thread_ts=event["ts"])
    assert (await h.slack.send_event(customer_reply)).status == 200
    [escalation] = await h.slack.wait_for(
        "chat.postMessage", predicate=lambda c: c.args["channel"] == ESCALATION, timeout=8
    )
    assert "*critical*" in escalation.args["text"]
    assert customer_reply["ts"].replace(".", "") in escalation.args["text"]  # links the reply
    marker = await h.slack.wait_for("reactions.add", timeout=5)
    assert (marker[-1].args["timestamp"], marker[-1].args["name"]) == (event["ts"], "rotating_light")
    # another critical reply does not raise it further: no second escalation
    again = h.slack.message_event(CHANNEL, CUSTOMER, "Still nobody can log in", thread_ts=event["ts"])
    await h.slack.send_event(again)
    assert await h.eventually(lambda: _classified(h, 3))
    by_ts = {m.ts: m for m in await h.rows(Message)}
    assert by_ts[agent_reply["ts"]].last_error == "written by an agent"
    assert by_ts[customer_reply["ts"]].thread_ts == event["ts"]
    assert len([c for c in h.slack.calls_to("chat.postMessage") if c.args["channel"] == ESCALATION]) == 1
    # no reply of its own in the thread: the bot answered the thread once
    assert [c.args.get("thread_ts") for c in h.slack.calls_to("chat.postMessage")].count(event["ts"]) == 1
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "large_green_circle", CHANNEL, event["ts"]))
    [edited] = await h.slack.wait_for(
        "chat.update",
        predicate=lambda c: (
            c.args["ts"] == escalation.response["ts"]
            and f"de-escalated by <@{AGENT}>" in str(c.args["blocks"])
        ),
        timeout=8,
    )
    assert edited.args["channel"] == ESCALATION


async def _classified(h: Any, count: int) -> bool:
    return await h.count(Message, Message.state == MessageState.CLASSIFIED) == count


async def test_workflow_builder_posts_are_triaged_and_other_bots_are_not(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory(triage_allowed_bots="B0FORMS")
    h.slack.add_user("U0FORMSBOT", "forms", is_bot=True)
    form = h.slack.bot_message_event(CHANNEL, "", username="Support request form")
    form["attachments"] = [{"fallback": "New request", "text": "Our SSO login fails for every user"}]
    allowed = h.slack.message_event(CHANNEL, "U0FORMSBOT", "Request: refund invoice 88", bot_id="B0FORMS")
    other = h.slack.message_event(CHANNEL, "U0OTHERBOT", "Deploy finished", bot_id="B0OTHER")
    for event in (form, allowed, other):
        assert (await h.slack.send_event(event)).status == 200
    await h.reply_to(form["ts"])
    await h.reply_to(allowed["ts"])
    texts = {m.ts: m.text for m in await h.rows(Message)}
    assert texts == {
        form["ts"]: "Our SSO login fails for every user",
        allowed["ts"]: "Request: refund invoice 88",
    }


async def test_messages_posted_while_the_bot_was_stopped_are_triaged_exactly_once(
    harness_factory: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backfill_module, "PAGE_SIZE", 2)  # several pages of conversations.history
    before: list[dict[str, Any]] = []

    def while_down(slack: SlackStandIn) -> None:
        slack.message_event(CHANNEL, CUSTOMER, "Posted two days ago", ts=f"{time.time() - 2 * 86400:.6f}")
        for text in ("Invoices page is blank", "Cannot add a teammate", "Refund for invoice 12 please"):
            before.append(slack.message_event(CHANNEL, CUSTOMER, text))
        before.append(slack.message_event(CHANNEL, AGENT, "We are on it"))
        slack.message_event(CHANNEL, CUSTOMER, "Any news?", thread_ts=before[0]["ts"])

    h = await harness_factory(prepare=while_down)
    *customers, _ = before
    for event in customers:
        await h.reply_to(event["ts"])
    assert (await h.slack.send_event(before[0])).status == 200  # Slack's late redelivery: no second reply
    assert await h.eventually(lambda: _classified(h, 4))  # the three and the reply in a thread
    await h.bot.stop()

    after = [h.slack.message_event(CHANNEL, CUSTOMER, t) for t in ("SSO is broken", "Export fails")]
    bot = await start_bot(h.bot.settings)  # the same database and Slack: a restart
    try:
        for event in after:
            await h.reply_to(event["ts"])
        assert await h.eventually(lambda: caught_up(bot))
        [*_, history] = h.slack.calls_to("conversations.history")
        assert float(history.args["oldest"]) == pytest.approx(time.time() - 24 * 3600, abs=60)  # the horizon
    finally:
        await bot.stop()
    replied = [c.args.get("thread_ts") for c in h.slack.calls_to("chat.postMessage")]
    assert sorted(replied) == sorted(e["ts"] for e in customers + after)  # each exactly once
    texts = {m.text for m in await h.rows(Message, Message.thread_ts.is_(None))}
    assert "Posted two days ago" not in texts and len(texts) == 6  # five customers' and the agent's (no text)


async def test_a_stopped_bot_hands_its_queued_messages_to_the_next_start_at_once(
    harness_factory: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop (a deploy, Ctrl-C) gives back the leases of the messages waiting in its queue: the restarted
    bot answers each once within seconds, not after the two-minute lease. The answer under way that does
    not finish within the drain keeps its lease (its reply could still reach Slack)."""
    monkeypatch.setattr(triage_module, "STOP_DRAIN_S", 0.5)
    h = await harness_factory(triage_workers=1, triage_lease_s=120.0)
    started = asyncio.Event()

    async def stuck(*args: Any, **kwargs: Any) -> Any:  # the classifier never answers this bot
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(h.bot.triage.classifier, "classify", stuck)
    texts = ("SSO is down", "Refund 12", "Export fails")
    first, *queued = [h.slack.message_event(CHANNEL, CUSTOMER, t) for t in texts]
    for event in (first, *queued):
        assert (await h.slack.send_event(event)).status == 200
    await asyncio.wait_for(started.wait(), timeout=8)
    assert len(h.bot.triage.held) == 3  # one being answered, two queued: all leased to this bot

    await h.restart()
    for event in queued:
        await h.reply_to(event["ts"])  # within 8 s: the lease would have held them for 120
    await h.settled()
    replies = [c.args["thread_ts"] for c in h.slack.calls_to("chat.postMessage")]
    assert sorted(replies) == sorted(e["ts"] for e in queued)  # each exactly once
    [cut_short] = await h.rows(Message, Message.ts == first["ts"])
    assert cut_short.state == MessageState.PENDING  # still leased to the first bot's attempt:
    lease_ends = cut_short.next_attempt_at.replace(tzinfo=None)
    assert lease_ends > utcnow().replace(tzinfo=None) + timedelta(seconds=60)


async def test_a_stop_lets_the_answers_under_way_finish(
    harness_factory: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Answers under way when the bot stops get a moment (``STOP_DRAIN_S``) to finish: a slow classifier's
    answer is posted by the stopping bot, not left to a lease."""
    h = await harness_factory(triage_workers=1)
    started, release = asyncio.Event(), asyncio.Event()
    classify = h.bot.triage.classifier.classify

    async def slow(*args: Any, **kwargs: Any) -> Any:
        started.set()
        await release.wait()
        return await classify(*args, **kwargs)

    monkeypatch.setattr(h.bot.triage.classifier, "classify", slow)
    event, _ = await h.post_customer_message("Our invoices page is blank")
    await asyncio.wait_for(started.wait(), timeout=8)
    draining = asyncio.Event()
    finish_answers = h.bot.triage._finish_answers

    async def drain() -> None:
        draining.set()
        await finish_answers()

    monkeypatch.setattr(h.bot.triage, "_finish_answers", drain)
    stopping = asyncio.ensure_future(h.bot.stop())
    await asyncio.wait_for(draining.wait(), timeout=8)  # the stop has begun before the classifier answers
    release.set()
    await asyncio.wait_for(stopping, timeout=15)
    assert [c.args["thread_ts"] for c in h.slack.calls_to("chat.postMessage")] == [event["ts"]]
    [message] = await h.rows(Message)
    assert message.state == MessageState.CLASSIFIED


async def test_thread_replies_and_edits_made_while_the_bot_was_stopped_are_handled_once(
    harness_factory: Any,  # noqa: F811
    tiny_bert: Path,
    data_dir: Path,
) -> None:
    """Slack lists no replies in conversations.history and sends no edit twice: with the bot stopped, a
    customer replies in one triaged thread, edits another triaged message and deletes a third. The
    restarted bot reads the thread with news (conversations.replies, through a 429) and handles the reply
    once as a live one (critical: escalated); the edit is classified again, its label from before kept and
    marked; the deleted message (a tombstone in history) loses its text and reply. A second restart, and
    Slack's late redelivery of the reply, do nothing more."""
    registry = Registry(data_dir / "models")
    make_tiny_version(registry, tiny_bert, LabelSchema(heads={**DEFAULT_HEADS, "urgency": ["low"]}))
    make_tiny_version(
        registry, tiny_bert, LabelSchema(heads={**DEFAULT_HEADS, "urgency": ["critical"]}), activate=False
    )
    h = await harness_factory(with_model=False)
    asked, _ = await _triaged(h, "Where can I find the invoices page?")
    edited, edited_reply = await _triaged(h, "How do I export a report?")
    gone, gone_reply = await _triaged(h, "Can I change the invoice address?")
    assert await h.eventually(lambda: _classified(h, 3))  # labels are given to a classified message
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "bug", CHANNEL, edited["ts"]))
    await h.slack.wait_for("chat.update", timeout=5)
    await h.slack.send_command("/triage", "rollback v2", user_id=ADMIN, channel_id=CHANNEL)
    await h.slack.wait_for_response(timeout=10, predicate=lambda r: "v2 is now" in str(r.body))
    await h.bot.stop()

    reply = h.slack.message_event(CHANNEL, CUSTOMER, "Now nobody can log in!", thread_ts=asked["ts"])
    new_text = "Exports fail for every user and we have a board meeting in an hour"
    h.slack.message_changed_event(CHANNEL, edited["ts"], new_text)  # never delivered: the bot is down
    h.slack.thread_parent_deleted_event(CHANNEL, gone["ts"])  # its thread has the bot's reply
    h.slack.clear()
    rate_limited = h.slack.fail_next("conversations.replies", retry_after=1)  # waited out, then read
    await _restart(h)
    escalations = await h.slack.wait_for(
        "chat.postMessage", predicate=lambda c: c.args["channel"] == ESCALATION, count=2, timeout=15
    )
    linked = {
        ts for ts in (reply["ts"], edited["ts"]) for e in escalations if ts.replace(".", "") in e.args["text"]
    }
    assert linked == {reply["ts"], edited["ts"]}  # the reply raised its thread, the edit its message
    [*_, update] = await h.slack.wait_for(
        "chat.update", predicate=lambda c: c.args["ts"] == edited_reply.response["ts"], timeout=8
    )
    assert "_(given before the message was edited)_" in str(update.args["blocks"])
    [deleted] = await h.slack.wait_for("chat.delete", timeout=8)
    assert deleted.args["ts"] == gone_reply.response["ts"]
    await h.settled()
    [read] = [c for c in h.slack.calls_to("conversations.replies") if c.ok]  # the thread with news only
    assert rate_limited.hits == 1
    assert (read.args["ts"], read.args["oldest"]) == (asked["ts"], _own_reply_ts(h, asked["ts"]))
    by_ts = {m.ts: m for m in await h.rows(Message)}
    assert by_ts[reply["ts"]].thread_ts == asked["ts"] and by_ts[edited["ts"]].text == new_text
    assert by_ts[gone["ts"]].deleted_at is not None and by_ts[gone["ts"]].text is None
    assert len(await h.rows(Prediction)) == 5  # three messages, the reply, the edit: each once
    assert [c.args.get("thread_ts") for c in h.slack.calls_to("chat.postMessage")].count(asked["ts"]) == 0

    assert (await h.slack.send_event(reply)).status == 200  # Slack's late redelivery
    h.slack.clear()
    await _restart(h)
    await h.settled()
    assert [c.method for c in h.slack.calls if c.method not in SETUP_CALLS] == []  # nothing more
    assert len(await h.rows(Prediction)) == 5 and len(await h.rows(Message)) == 4


async def test_a_reply_missed_while_down_is_not_hidden_by_a_live_reply_after_it(
    harness_factory: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the bot is down a customer replies in a triaged thread; after the restart, and before the
    backfill reads the channel, they reply again and that one is heard live. The missed reply is older
    than the live one, but it is still read from the thread and handled, once."""
    h = await harness_factory()
    asked, _ = await _triaged(h, "Where can I find the invoices page?")
    await h.bot.stop()
    missed = h.slack.message_event(CHANNEL, CUSTOMER, "It is still not there", thread_ts=asked["ts"])
    live = h.slack.message_event(CHANNEL, CUSTOMER, "Hello? Anyone?", thread_ts=asked["ts"])
    live_stored = asyncio.Event()
    stored_since = repo.stored_since

    async def after_the_live_reply(*args: Any, **kwargs: Any) -> Any:  # the backfill reads the database
        await live_stored.wait()
        return await stored_since(*args, **kwargs)

    monkeypatch.setattr(repo, "stored_since", after_the_live_reply)
    await h.restart()
    assert (await h.slack.send_event(live)).status == 200  # stored before the backfill looks
    live_stored.set()
    assert await h.eventually(lambda: caught_up(h.bot), within_s=15)
    await h.settled()
    replies = {m.ts: m for m in await h.rows(Message, Message.thread_ts == asked["ts"])}
    assert set(replies) == {missed["ts"], live["ts"]}  # each stored once
    [read] = h.slack.calls_to("conversations.replies")
    assert read.args["oldest"] == _own_reply_ts(h, asked["ts"])  # from what was heard before the stop


async def _restart(h: Any) -> None:
    """Start the bot again on the same database and Slack, and wait for its backfill."""
    await h.restart()
    assert await h.eventually(lambda: caught_up(h.bot), within_s=15)


def _own_reply_ts(h: Any, thread_ts: str) -> str:
    [own] = [m for m in h.slack.messages_in(CHANNEL) if m.get("thread_ts") == thread_ts and m.get("bot_id")]
    return str(own["ts"])


async def test_a_message_the_model_calls_not_a_request_is_stored_and_not_answered(
    harness_factory: Any,  # noqa: F811
    tiny_bert: Path,
    data_dir: Path,
) -> None:
    """A model whose topic head knows only not_a_request calls every message that, surely (the tiny
    model is untrained): classified and stored, and nothing is posted or reacted for it."""
    heads = {**DEFAULT_HEADS, "topic": ["not_a_request"]}
    make_tiny_version(Registry(data_dir / "models"), tiny_bert, LabelSchema(heads=heads))
    h = await harness_factory(with_model=False, triage_urgent_labels="low,medium,high,critical")
    await h.post_customer_message("thanks, works now!")
    assert await h.eventually(lambda: h.count(Message, Message.state == MessageState.CLASSIFIED))
    [stored] = await h.rows(Message)
    [prediction] = await h.rows(Prediction)
    assert stored.text == "thanks, works now!" and stored.reply_ts is None
    assert {h.head: h.label for h in prediction.heads}["topic"] == "not_a_request"
    assert [c.method for c in h.slack.calls if c.method not in SETUP_CALLS] == []  # no reply, marker, post


def test_not_a_request_needs_the_models_confidence() -> None:
    settings = load_settings(**UNIT_SETTINGS, triage_not_a_request_above=0.8)
    triage = SimpleNamespace(settings=settings)

    def noise(label: str, confidence: float | None) -> bool:
        return Triage.is_not_a_request(triage, {"topic": LabelView(label, confidence=confidence)})  # type: ignore[arg-type]

    assert noise("not_a_request", 0.8) and noise("not_a_request", 0.97)
    assert not noise("not_a_request", 0.79) and not noise("billing", 0.99)
    assert not noise("not_a_request", None)  # a person's label is not the model's call


async def test_user_groups_are_looked_up_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRIAGE_AGENTS' groups change: the new members count within the cache time; a failed lookup keeps
    the members last known (and is tried again soon, not at every message)."""
    clock = [1000.0]
    monkeypatch.setattr(agents_module.time, "monotonic", lambda: clock[0])
    async with SlackStandIn() as slack:
        client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
        slack.add_usergroup("S0SUPPORT", ["U0ANNA"])
        agents = Agents(
            client, team_id=slack.team_id, admins=[], ttl_s=600, configured=["U0LEAD", "S0SUPPORT"]
        )
        assert await agents.is_agent("U0ANNA") and await agents.is_agent("U0LEAD")
        assert not await agents.is_agent("U0BEN")
        slack.add_usergroup("S0SUPPORT", ["U0BEN"])  # Anna moved on, Ben joined
        assert await agents.is_agent("U0ANNA") and not await agents.is_agent("U0BEN")  # cached
        clock[0] += 601
        assert await agents.is_agent("U0BEN") and not await agents.is_agent("U0ANNA")
        slack.fail_next("usergroups.users.list", error="ratelimited", status=200)
        clock[0] += 601
        assert await agents.is_agent("U0BEN")  # the lookup failed: Ben still counts
        lookups = slack.calls_to("usergroups.users.list")
        assert len(lookups) == 3 and lookups[-1].error == "ratelimited"  # not again at every question
        assert not slack.calls_to("users.info")  # TRIAGE_AGENTS set: the workspace rule is not used


async def test_a_backfill_that_cannot_list_channels_says_why_and_the_bot_works_on(
    harness_factory: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_scope(slack: SlackStandIn) -> None:
        slack.fail_next("users.conversations", error="missing_scope")

    h = await harness_factory(prepare=no_scope, triage_channels="")  # every channel: they must be listed
    assert await h.eventually(lambda: caught_up(h.bot))
    assert "users.conversations: missing_scope); set TRIAGE_CHANNELS or add the channels:read" in caplog.text
    event, _ = await h.post_customer_message("Is the API down?")
    await h.reply_to(event["ts"])
