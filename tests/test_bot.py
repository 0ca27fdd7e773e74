"""The bot end to end over real HTTP: a Slack stand-in sends signed requests and records the Web API calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import URL

from bot.main import RunningBot, start_bot
from bot.retrain import run_lock
from bot.scheduler import build_scheduler, scheduled_retrain
from bot.settings import BotSettings, load_settings
from bot.storage import repository as repo
from bot.storage.database import create_db_engine, create_session_factory, upgrade_database
from bot.storage.models import (
    AuditEntry,
    Base,
    Correction,
    Message,
    MessageState,
    Prediction,
    SlackEvent,
    TrainingTrigger,
    utcnow,
)
from classifier.client import ChildClassifier
from classifier.registry import Registry
from classifier.schema import LabelSchema
from tests.support.slack_standin import SlackStandIn
from tests.support.tcp_proxy import TcpProxy
from tests.support.tiny_model import make_tiny_version
from tests.support.waiting import eventually
from tests.test_child import forward_passes_here

CHANNEL = "C0TRIAGE"
ESCALATION = "C0ESCAL8"
CUSTOMER = "U0CUSTOMER"
AGENT = "U0AGENT"
ADMIN = "U0ADMIN"


class Harness:
    def __init__(
        self, slack: SlackStandIn, bot: RunningBot, database_url: URL, config: BotSettings | None = None
    ):
        self.slack = slack
        self.bot = bot
        self.config = config
        self.engine = create_db_engine(database_url)
        self.sessions = create_session_factory(self.engine)

    async def restart(self) -> None:
        """Stop the bot and start a new one on the same database and Slack (a restart after a crash)."""
        assert self.config is not None
        await self.bot.stop()
        self.bot = await start_bot(self.config)
        self.slack.bot_url = f"http://127.0.0.1:{self.bot.port}/slack/events"

    async def count(self, model: Any, *where: Any) -> int:
        async with self.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    async def rows(self, model: Any, *where: Any) -> list[Any]:
        async with self.sessions() as session:
            return list((await session.scalars(select(model).where(*where))).all())

    async def eventually(self, check: Callable[[], Any], within_s: float = 8.0) -> Any:
        deadline = time.monotonic() + within_s
        while True:
            result = await check()
            if result or time.monotonic() > deadline:
                return result
            await asyncio.sleep(0.05)

    async def settled(self) -> None:
        """Every message queued so far was classified and answered: the bot's work queue is drained.

        Each delivery is handled before Slack gets its 200 (what is stored is queued by then), so after the
        deliveries a test sent, this is the signal that whatever they were going to cause has happened."""
        await asyncio.wait_for(self.bot.triage.queue.join(), timeout=15)

    async def post_customer_message(self, text: str, **kwargs: Any) -> tuple[dict[str, Any], Any]:
        event = self.slack.message_event(CHANNEL, CUSTOMER, text, **kwargs)
        response = await self.slack.send_event(event)
        assert response.status == 200, response.text
        return event, response

    async def reply_to(self, ts: str) -> Any:
        calls = await self.slack.wait_for(
            "chat.postMessage", predicate=lambda c: c.args.get("thread_ts") == ts, timeout=8
        )
        return calls[0]


async def caught_up(bot: RunningBot) -> bool:
    return bot.backfill is not None and bot.backfill.runs > 0


@pytest.fixture
async def harness_factory(tiny_bert: Path, data_dir: Path, database_url: URL) -> AsyncIterator[Any]:
    await upgrade_database(database_url)
    started: list[tuple[SlackStandIn, Harness]] = []

    async def make(
        with_model: bool = True, prepare: Callable[[SlackStandIn], Any] | None = None, **settings: Any
    ) -> Harness:
        """``prepare`` seeds the stand-in (channels, users, user groups, history) before the bot starts."""
        if with_model:
            make_tiny_version(Registry(data_dir / "models"), tiny_bert, with_onnx=True)
        slack = SlackStandIn()
        await slack.start()
        if prepare is not None:  # Slack as it is before the bot starts (channels, users, history)
            prepare(slack)
        config = load_settings(
            _env_file=None,
            slack_bot_token=slack.bot_token,
            slack_signing_secret=slack.signing_secret,
            slack_api_url=slack.api_url,
            host="127.0.0.1",
            port=0,
            triage_admins=ADMIN,
            triage_escalation_channel=ESCALATION,
            triage_pending_interval_s=0.2,
            triage_retry_base_s=0.2,
            triage_retrain_cron="",
            **{
                "triage_embedded_classifier": "thread",  # the default's child: test_child.py
                "triage_channels": CHANNEL,  # a test may watch every channel instead
                "database_url": database_url.render_as_string(hide_password=False),
                **settings,
            },
        )
        bot = await start_bot(config)
        slack.bot_url = f"http://127.0.0.1:{bot.port}/slack/events"
        harness = Harness(slack, bot, database_url, config)
        started.append((slack, harness))
        await harness.eventually(lambda: caught_up(bot))  # the start-up backfill read the channel
        return harness

    yield make
    for slack, harness in started:
        await harness.bot.stop()
        await harness.engine.dispose()
        await slack.close()


async def test_message_gets_threaded_reply_and_is_stored(harness_factory: Any) -> None:
    h = await harness_factory()
    event, response = await h.post_customer_message("We were charged twice for invoice 4471, please refund")
    assert response.elapsed < 1.0  # acknowledged at once; the work happens after
    reply = await h.reply_to(event["ts"])
    assert reply.args["channel"] == CHANNEL
    text = str(reply.args["blocks"])
    for head in ("Topic", "Urgency", "Sentiment"):
        assert f"*{head}:*" in text
    assert "%" in text and "Fix labels" in text
    assert await h.eventually(lambda: h.count(Prediction)) == 1
    [message] = await h.rows(Message)
    assert message.state == MessageState.CLASSIFIED and message.reply_ts == reply.response["ts"]
    assert message.text == "We were charged twice for invoice 4471, please refund"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_by_default_no_forward_pass_runs_in_the_bots_process(harness_factory: Any) -> None:
    """Without CLASSIFIER_URL the engine runs in a child process: inference never competes with the event
    loop that acknowledges Slack's deliveries."""
    assert BotSettings.model_fields["triage_embedded_classifier"].default == "process"
    before = forward_passes_here()
    h = await harness_factory(triage_embedded_classifier="process")
    event, _ = await h.post_customer_message("We were charged twice for invoice 4471, please refund")
    reply = await h.reply_to(event["ts"])
    assert "*Topic:*" in str(reply.args["blocks"])
    classifier = h.bot.triage.classifier
    assert isinstance(classifier, ChildClassifier)
    assert classifier.process is not None and classifier.process.pid != os.getpid()
    assert forward_passes_here() == before
    await h.bot.stop()
    assert classifier.process is None  # stopped with the bot


async def test_retried_and_racing_deliveries_give_one_reply(harness_factory: Any) -> None:
    h = await harness_factory()
    event = h.slack.message_event(CHANNEL, CUSTOMER, "The dashboard is down for our whole team")
    envelope = h.slack.event_envelope(event)
    first, second = await asyncio.gather(
        h.slack.send_envelope(envelope), h.slack.send_envelope(envelope, retry_num=1)
    )
    third = await h.slack.send_envelope(envelope, retry_num=2, retry_reason="http_error")
    assert {first.status, second.status, third.status} == {200}
    await h.reply_to(event["ts"])
    await h.settled()
    replies = [c for c in h.slack.calls_to("chat.postMessage") if c.args.get("thread_ts") == event["ts"]]
    assert len(replies) == 1
    assert await h.count(Message) == 1 and await h.count(Prediction) == 1


async def test_bad_signature_and_stale_timestamp_are_refused(harness_factory: Any) -> None:
    h = await harness_factory()
    forged = await h.slack.send_event(h.slack.message_event(CHANNEL, CUSTOMER, "hello"), bad_signature=True)
    stale = await h.slack.send_event(
        h.slack.message_event(CHANNEL, CUSTOMER, "hello again"), timestamp=int(time.time()) - 6 * 60
    )
    assert forged.status == 401 and stale.status == 401
    signed, _ = await h.post_customer_message("hello, signed this time")  # handled after the two above
    await h.reply_to(signed["ts"])
    await h.settled()
    [message] = await h.rows(Message)
    assert message.ts == signed["ts"] and len(h.slack.calls_to("chat.postMessage")) == 1


async def test_ignored_events_are_acknowledged(harness_factory: Any) -> None:
    h = await harness_factory()
    original, _ = await h.post_customer_message("first message")
    await h.reply_to(original["ts"])
    # edits, deletions, thread replies and Workflow Builder posts: tests/test_bot_lifecycle.py
    events = [
        h.slack.channel_join_event(CHANNEL, "U0NEWBIE"),
        h.slack.message_event(CHANNEL, "U0OTHERBOT", "another app's bot user posting", bot_id="B0OTHER"),
        h.slack.message_event("C0ELSEWHERE", CUSTOMER, "not a triage channel"),
        h.slack.message_event(CHANNEL, CUSTOMER, "a reply in an untriaged thread", thread_ts="1.000001"),
        h.slack.member_joined_channel_event(CHANNEL, "U0NEWBIE"),
        h.slack.message_event(CHANNEL, CUSTOMER, "   "),
    ]
    for event in events:
        response = await h.slack.send_event(event)
        assert response.status == 200, (event, response.status)
    last, _ = await h.post_customer_message("a message after the ignored events")
    await h.reply_to(last["ts"])
    await h.settled()
    assert len(h.slack.calls_to("chat.postMessage")) == 2  # the first message's reply and the last one's
    assert await h.count(Prediction) == 2


async def test_reaction_corrects_and_removal_retracts(harness_factory: Any) -> None:
    h = await harness_factory()
    event, _ = await h.post_customer_message("Export to CSV crashes the app every time")
    reply = await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Prediction))
    # on the original message
    response = await h.slack.send_event(h.slack.reaction_added_event(AGENT, "bug", CHANNEL, event["ts"]))
    assert response.status == 200
    assert await h.eventually(lambda: h.count(Correction, Correction.head == "topic"))
    [correction] = await h.rows(Correction)
    assert (correction.new_label, correction.user_id, str(correction.source)) == ("bug", AGENT, "reaction")
    update = await h.slack.wait_for("chat.update", timeout=5)
    assert update[-1].args["ts"] == reply.response["ts"] and f"<@{AGENT}>" in str(update[-1].args["blocks"])
    # on the bot's reply, by someone else: both kept, the later wins
    await h.slack.send_event(h.slack.reaction_added_event(ADMIN, "rage", CHANNEL, reply.response["ts"]))
    assert await h.eventually(lambda: h.count(Correction, Correction.head == "sentiment"))
    # removing the reaction retracts it
    await h.slack.send_event(h.slack.reaction_removed_event(AGENT, "bug", CHANNEL, event["ts"]))
    assert await h.eventually(lambda: h.count(Correction, Correction.retracted_at.is_not(None)))
    # an emoji that means nothing is ignored: the reaction after it counts, it does not
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "tada", CHANNEL, event["ts"]))
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "bug", CHANNEL, event["ts"]))
    assert await h.eventually(
        lambda: h.count(Correction, Correction.head == "topic", Correction.retracted_at.is_(None))
    )
    assert await h.count(Correction) == 3


async def test_fix_labels_button_opens_a_modal_not_menus_in_the_channel(harness_factory: Any) -> None:
    h = await harness_factory()
    event, _ = await h.post_customer_message("How do I add a teammate to my workspace?")
    reply = await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Message, Message.reply_ts.is_not(None)))
    fix = reply.args["blocks"][-1]["elements"][0]
    assert fix["action_id"] == "triage_fix"
    response = await h.slack.send_block_actions(
        [{"action_id": fix["action_id"]}], user_id=AGENT, channel_id=CHANNEL, message_ts=reply.response["ts"]
    )
    assert response.status == 200
    [opened] = await h.slack.wait_for("views.open", timeout=5)
    assert not h.slack.calls_to("chat.update")  # nothing opened in the channel for everyone to see
    selects = [b["element"] for b in opened.args["view"]["blocks"] if b["type"] == "input"]
    assert [s["action_id"] for s in selects] == ["label:topic", "label:urgency", "label:sentiment"]
    topic = "how_to" if selects[0]["initial_option"]["value"] != "how_to" else "account"
    await h.slack.send_view_submission({"label:topic": topic}, user_id=AGENT)
    assert await h.eventually(lambda: h.count(Correction))
    [correction] = await h.rows(Correction)
    assert (correction.head, correction.new_label, str(correction.source)) == ("topic", topic, "button")
    [updated] = await h.slack.wait_for("chat.update", timeout=5)
    assert updated.args["ts"] == reply.response["ts"] and f"corrected by <@{AGENT}>" in str(
        updated.args["blocks"]
    )


async def test_a_menu_choice_on_a_reply_with_menus_still_stores(harness_factory: Any) -> None:
    """Replies whose menus an earlier version opened in the channel keep working."""
    h = await harness_factory()
    event, _ = await h.post_customer_message("How do I add a teammate to my workspace?")
    reply = await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Message, Message.reply_ts.is_not(None)))
    option = {"text": {"type": "plain_text", "text": "how_to"}, "value": "how_to"}
    await h.slack.send_block_actions(
        [
            {
                "type": "static_select",
                "action_id": "triage_set:topic",
                "block_id": reply.args["blocks"][-1]["block_id"],
                "selected_option": option,
                "action_ts": str(time.time()),
            }
        ],
        user_id=AGENT,
        channel_id=CHANNEL,
        message_ts=reply.response["ts"],
    )
    assert await h.eventually(lambda: h.count(Correction))
    [correction] = await h.rows(Correction)
    assert (correction.head, correction.new_label, str(correction.source)) == ("topic", "how_to", "button")


async def test_classify_command_answers_privately(harness_factory: Any) -> None:
    h = await harness_factory()
    response = await h.slack.send_command(
        "/classify", "Our API returns 503 for every request", user_id=AGENT, channel_id=CHANNEL
    )
    assert response.status == 200 and response.elapsed < 3.0
    body = response.json()
    assert body["response_type"] == "ephemeral" and "Topic" in str(body["blocks"])
    usage = await h.slack.send_command("/classify", "", user_id=AGENT, channel_id=CHANNEL)
    assert "Usage" in usage.json()["text"]


async def test_classify_is_refused_to_customers_and_guests(harness_factory: Any) -> None:
    """A customer (another organization's, or a guest) never sees labels or confidences."""
    h = await harness_factory()
    h.slack.add_user("U0GUEST", "guest", is_restricted=True)
    for outsider in (CUSTOMER, "U0GUEST"):
        refused = await h.slack.send_command(
            "/classify", "Our API is down", user_id=outsider, channel_id=CHANNEL
        )
        body = refused.json()
        assert body["response_type"] == "ephemeral" and "support team" in body["text"]
        assert "blocks" not in body and "%" not in body["text"] and "Topic" not in body["text"]
    assert h.slack.responses == []


async def test_admin_commands_are_refused_to_others_and_audited(harness_factory: Any) -> None:
    h = await harness_factory()
    response = await h.slack.send_command("/triage", "retrain", user_id=AGENT, channel_id=CHANNEL)
    assert response.status == 200 and "admins only" in response.json()["text"]
    [entry] = await h.rows(AuditEntry)
    assert (entry.user_id, entry.action, entry.allowed) == (AGENT, "retrain", False)
    status = await h.slack.send_command("/triage", "status", user_id=AGENT, channel_id=CHANNEL)
    assert status.status == 200
    [posted] = await h.slack.wait_for_response(timeout=5)
    assert "v1" in str(posted.body)


async def test_classifier_down_then_back_replies_later(
    harness_factory: Any, tiny_bert: Path, data_dir: Path
) -> None:
    h = await harness_factory(with_model=False)
    event, _ = await h.post_customer_message("Login fails with SSO since this morning")
    assert await h.eventually(lambda: h.count(Message, Message.last_error.is_not(None)))
    [message] = await h.rows(Message)
    assert message.state == MessageState.PENDING and not h.slack.calls_to("chat.postMessage")
    make_tiny_version(Registry(data_dir / "models"), tiny_bert)  # the classifier comes back
    await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Message, Message.state == MessageState.CLASSIFIED))


async def test_rate_limited_post_is_retried(harness_factory: Any) -> None:
    h = await harness_factory(triage_urgent_labels="low,medium,high,critical")
    h.slack.fail_next("chat.postMessage", status=429, retry_after=1)
    event, _ = await h.post_customer_message("Everything is broken, production is down!")
    calls = await h.slack.wait_for(
        "chat.postMessage", count=2, timeout=8, predicate=lambda c: c.args.get("thread_ts") == event["ts"]
    )
    assert [c.status for c in calls] == [429, 200]  # slack_sdk waited Retry-After and posted again
    assert calls[1].time - calls[0].time >= 0.9
    # every urgency counts as urgent here: the original gets a reaction and the escalation channel a post
    await h.slack.wait_for("reactions.add", timeout=5)
    [escalated] = await h.slack.wait_for(
        "chat.postMessage", predicate=lambda c: c.args["channel"] == ESCALATION, timeout=5
    )
    assert "http" in escalated.args["text"]


async def test_very_long_message_is_classified_on_its_beginning_and_stored_whole(
    harness_factory: Any,
) -> None:
    h = await harness_factory()
    text = "Our invoice export keeps failing. " * 1200  # ~40k characters, Slack's own limit
    event, _ = await h.post_customer_message(text)
    reply = await h.reply_to(event["ts"])
    assert "classified on its beginning" in str(reply.args["blocks"])
    assert await h.eventually(lambda: h.count(Prediction))
    [message] = await h.rows(Message)
    assert message.text == text


async def test_message_is_stored_before_the_acknowledgement(harness_factory: Any) -> None:
    h = await harness_factory()
    event = h.slack.message_event(CHANNEL, CUSTOMER, "Is there a way to export all invoices at once?")
    response = await h.slack.send_event(event)
    assert response.status == 200
    assert await h.count(Message) == 1  # no waiting: a 200 means it is in the database


async def test_a_retry_after_a_reply_updates_it_instead_of_answering_twice(harness_factory: Any) -> None:
    h = await harness_factory()
    event, _ = await h.post_customer_message("Two-factor codes never arrive by SMS")
    reply = await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Message, Message.state == MessageState.CLASSIFIED))
    async with h.sessions.begin() as session:  # as if the bookkeeping after the reply had failed
        await session.execute(update(Message).values(state=MessageState.PENDING))
    [message] = await h.rows(Message)
    await h.bot.triage.classify_and_reply(message)
    [updated] = await h.slack.wait_for("chat.update", timeout=5)
    assert updated.args["ts"] == reply.response["ts"]
    assert (
        len([c for c in h.slack.calls_to("chat.postMessage") if c.args.get("thread_ts") == event["ts"]]) == 1
    )
    assert await h.count(Prediction) == 2


async def test_overload_waits_in_the_database_and_every_message_is_answered(harness_factory: Any) -> None:
    h = await harness_factory(triage_workers=1, triage_queue_size=1)
    events = [
        h.slack.message_event(CHANNEL, CUSTOMER, f"Problem number {i} with the invoices page")
        for i in range(6)
    ]
    responses = await asyncio.gather(*(h.slack.send_event(e) for e in events))
    assert [r.status for r in responses] == [200] * 6
    assert await h.count(Message) == 6
    await h.slack.wait_for("chat.postMessage", count=6, timeout=20)
    replied = {c.args["thread_ts"] for c in h.slack.calls_to("chat.postMessage")}
    assert replied == {e["ts"] for e in events}


async def test_malformed_signed_payloads_are_acknowledged_and_nothing_is_stored(
    harness_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Signed, so from Slack (or someone holding the secret): a 200 so Slack does not retry, a warning, no
    row. One bad payload must not keep the next one from being answered."""
    h = await harness_factory()
    no_ts = h.slack.message_event(CHANNEL, CUSTOMER, "where is my ts")
    del no_ts["ts"]
    number_text = h.slack.message_event(CHANNEL, CUSTOMER, "x")
    number_text["text"] = 12345
    list_event = h.slack.event_envelope(h.slack.message_event(CHANNEL, CUSTOMER, "y"))
    list_event["event"] = ["not", "an", "object"]
    bad_authorizations = h.slack.event_envelope(h.slack.message_event(CHANNEL, CUSTOMER, "z"))
    bad_authorizations["authorizations"] = 7  # Bolt reads its context from it before any listener
    actions = {"type": "block_actions", "user": {"id": AGENT}, "team": {"id": h.slack.team_id}}
    interactions = [
        {**actions, "actions": []},
        {**actions, "actions": [{"block_id": "b", "value": "1"}]},  # no action_id
        {**actions, "actions": [{"action_id": 7}]},
        {**actions, "actions": [{"action_id": "triage_fix"}], "enterprise": True},
        {"type": "shortcut", "user": {"id": AGENT}, "team": {"id": h.slack.team_id}},  # no callback_id
    ]
    caplog.set_level("WARNING")
    responses = [
        await h.slack.send_event(no_ts),
        await h.slack.send_event(number_text),
        await h.slack.send_envelope(list_event),
        await h.slack.send_envelope(bad_authorizations),
        *[
            await h.slack.send_raw(
                urllib.parse.urlencode({"payload": json.dumps(p)}).encode(),
                "application/x-www-form-urlencoded",
            )
            for p in interactions
        ],
        await h.slack.send_raw(b"{not json", "application/json"),
        await h.slack.send_raw(b"[1, 2]", "application/json"),
        await h.slack.send_raw(b'{"type": "event_callback", "x": "\xff\xfe"}', "application/json"),
        await h.slack.send_raw(b"payload=%7Bnot+json", "application/x-www-form-urlencoded"),
        await h.slack.send_raw(b"[" * 200_000 + b"]" * 200_000, "application/json"),  # RecursionError
    ]
    assert [r.status for r in responses] == [200] * len(responses), [r.text for r in responses]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert sum("malformed Slack request" in r.getMessage() for r in caplog.records) == len(responses)
    assert await h.count(Message) == 0
    event, _ = await h.post_customer_message("The export button does nothing")  # the next one is answered
    await h.reply_to(event["ts"])


async def test_unsigned_or_malformed_timestamps_are_refused_quietly(
    harness_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = await harness_factory()
    body = json.dumps(h.slack.event_envelope(h.slack.message_event(CHANNEL, CUSTOMER, "hi"))).encode()
    caplog.set_level("WARNING")
    responses = [
        await h.slack.send_raw(body, "application/json", headers={"X-Slack-Request-Timestamp": "abc"}),
        await h.slack.send_raw(body, "application/json", timestamp="abc"),  # signed over "abc"
        await h.slack.send_raw(body, "application/json", timestamp="1e9"),
        await h.slack.send_raw(body, "application/json", unsigned=True),
        await h.slack.send_raw(body, "application/json", unsigned=True, headers={"X-Slack-Signature": "v0="}),
        await h.slack.send_raw(b"\xff\xfe not utf-8", "application/json", bad_signature=True),
        await h.slack.send_raw(b"\xff\xfe not utf-8", "application/json", timestamp="abc"),
        await h.slack.send_raw(b"[" * 200_000 + b"]" * 200_000, "application/json", unsigned=True),
        # Slack's certificate check is unsigned: one that Bolt could not read is not passed on
        await h.slack.send_raw(b'{"ssl_check": "1", "authorizations": 7}', "application/json", unsigned=True),
        await h.slack.send_raw(
            b"payload=" + urllib.parse.quote(json.dumps({"ssl_check": "1", "enterprise": 7})).encode(),
            "application/x-www-form-urlencoded",
            unsigned=True,
        ),
    ]
    assert [r.status for r in responses] == [401] * len(responses), [r.text for r in responses]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert await h.count(Message) == 0
    handshake = await h.slack.send_url_verification("the-challenge")  # still answered, as Slack signs it
    assert handshake.status == 200 and "the-challenge" in handshake.text
    ssl_check = f"ssl_check=1&token={h.slack.verification_token}".encode()  # as Slack sends it: unsigned
    check = await h.slack.send_raw(ssl_check, "application/x-www-form-urlencoded", unsigned=True)
    assert check.status == 200


async def test_retraining_asked_in_a_customer_channel_reports_in_the_admins_channel(
    harness_factory: Any,
) -> None:
    """Progress, figures and errors of a run are for admins: asked in a triaged channel (customers read
    it), they go to the summary channel, and the answer names it."""
    h = await harness_factory()
    response = await h.slack.send_command("/triage", "retrain", user_id=ADMIN, channel_id=CHANNEL)
    # the acknowledgement itself says where the run reports (it is started before Slack hears back)
    assert response.json()["text"] == f"Retraining started; progress follows in <#{ESCALATION}>."
    await h.slack.wait_for(  # the run's end (here: it fails, the tiny model has no dataset)
        "chat.postMessage", predicate=lambda c: "Retraining" in str(c.args.get("text")), timeout=60
    )
    assert [c.args["channel"] for c in h.slack.calls_to("chat.postMessage")] == [ESCALATION]


async def test_retrain_while_one_runs_is_answered_in_the_acknowledgement(harness_factory: Any) -> None:
    h = await harness_factory()
    async with h.sessions.begin() as session:
        await repo.start_training_run(session, trigger=TrainingTrigger.SCHEDULE)
    async with run_lock(h.engine):  # a run in progress, in another process or replica
        response = await h.slack.send_command("/triage", "retrain", user_id=ADMIN, channel_id=CHANNEL)
    assert response.status == 200
    assert response.json()["text"].startswith("Retraining is already running, started by schedule at")
    assert h.bot.retrainer.process is None  # nothing started, and nothing more to say later
    [entry] = await h.rows(AuditEntry)
    assert (entry.action, entry.allowed, entry.reason) == ("retrain", True, "already running")


async def test_a_long_classifier_outage_delays_the_answer_and_never_loses_it(
    harness_factory: Any, tiny_bert: Path, data_dir: Path
) -> None:
    """Retries go on past the ten attempts that used to skip a message for good, at a capped interval;
    the backlog shows in /healthz, /metrics and /triage status meanwhile."""
    h = await harness_factory(with_model=False, triage_retry_max_s=0.2)
    event, _ = await h.post_customer_message("Nothing loads since the update")
    assert await h.eventually(lambda: h.count(Message, Message.attempts >= 12), within_s=30)
    [message] = await h.rows(Message)
    assert message.state == MessageState.PENDING and message.last_error
    base = f"http://127.0.0.1:{h.bot.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as response:
            assert await response.json() == {"ok": True, "waiting": 1, "retrying": 1}
        async with http.get(f"{base}/metrics") as response:
            metrics = await response.text()
    assert "triage_bot_messages_waiting 1.0" in metrics and "triage_bot_messages_retrying 1.0" in metrics
    await h.slack.send_command("/triage", "status", user_id=ADMIN, channel_id=CHANNEL)
    [status] = await h.slack.wait_for_response(timeout=5)
    assert "*Waiting:* 1 message(s) not answered yet, 1 of them after failures" in str(status.body)
    make_tiny_version(Registry(data_dir / "models"), tiny_bert)  # the classifier comes back
    await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Message, Message.state == MessageState.CLASSIFIED))


async def test_a_reply_slack_will_never_take_skips_the_message(harness_factory: Any) -> None:
    h = await harness_factory()
    h.slack.fail_next("chat.postMessage", error="is_archived")
    await h.post_customer_message("Is anyone there?")
    assert await h.eventually(lambda: h.count(Message, Message.state == MessageState.SKIPPED))
    [message] = await h.rows(Message)
    assert message.last_error == "chat.postMessage: is_archived"


async def test_status_and_models_are_for_agents_only(harness_factory: Any) -> None:
    """Guests and people from other organizations in a shared channel get a private refusal, not the
    model's internals or the last run's error; the workspace's own members get both."""
    h = await harness_factory()
    outsiders = [
        h.slack.add_user("U0GUEST", "guest", is_restricted=True),
        h.slack.add_user("U0SINGLE", "single.channel.guest", is_ultra_restricted=True),
        h.slack.add_user("U0PARTNER", "partner", team_id="T0OTHERORG"),
        h.slack.add_user("U0LEFT", "left.the.company", deleted=True),
    ]
    for user in outsiders:
        for sub in ("status", "models"):
            response = await h.slack.send_command("/triage", sub, user_id=user["id"], channel_id=CHANNEL)
            assert response.status == 200
            body = response.json()
            assert body["response_type"] == "ephemeral", body
            assert body["text"] == f"Sorry, `/triage {sub}` is for the support team of this workspace only."
    h.slack.add_user(AGENT, "agent")
    for _ in range(2):
        response = await h.slack.send_command("/triage", "models", user_id=AGENT, channel_id=CHANNEL)
        assert response.json()["text"] == "Listing models…"
    posted = await h.slack.wait_for_response(count=2, timeout=5)
    assert all("v1" in str(p.body) for p in posted)
    assert all(p.context["user_id"] == AGENT for p in h.slack.responses)  # nothing went to the others
    lookups = [c.args["user"] for c in h.slack.calls_to("users.info")]
    assert sorted(lookups) == sorted([u["id"] for u in outsiders] + [AGENT])  # each looked up once


async def test_text_that_is_not_valid_unicode_is_stored_cleaned_and_answered(
    harness_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """JSON may carry a lone surrogate (\\ud800) or NUL: neither database stores them, so they are replaced;
    a 500 here would make Slack deliver the event again and again."""
    h = await harness_factory()
    event, response = await h.post_customer_message("refund \ud800 please\x00 now")
    assert response.status == 200
    await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Message, Message.state == MessageState.CLASSIFIED))
    [message] = await h.rows(Message)
    assert message.text == "refund \ufffd please\ufffd now"
    assert any(
        r.levelno == logging.WARNING
        and "not valid Unicode" in r.getMessage()
        and event["ts"] in r.getMessage()
        for r in caplog.records
    )


async def test_command_arguments_that_cannot_be_stored_are_audited_cleaned(harness_factory: Any) -> None:
    """%00 in a slash command's text: PostgreSQL's jsonb refuses NUL, which made the command a 500."""
    h = await harness_factory()
    response = await h.slack.send_command("/triage", "rollback v1\x00", user_id=AGENT, channel_id=CHANNEL)
    assert response.status == 200 and "admins only" in response.json()["text"]
    [entry] = await h.rows(AuditEntry)
    assert (entry.action, entry.args, entry.allowed) == ("rollback", {"args": ["v1\ufffd"]}, False)


async def test_bot_access_log_cannot_be_forged(
    harness_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the path nor a header (NEL, U+2028: line breaks to many log readers) starts a log line."""
    caplog.set_level(logging.INFO)
    h = await harness_factory()
    forged = "2026-12-01 18:00:00,000 WARNING bot.triage: forged"
    reader, writer = await asyncio.open_connection("127.0.0.1", h.bot.port)
    writer.write(
        b"GET /x%0A" + forged.replace(" ", "%20").encode() + b"%C2%85 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"User-Agent: probe\xc2\x85" + forged.encode() + b"\xe2\x80\xa8\r\nConnection: close\r\n\r\n"
    )
    assert (await reader.read()).startswith(b"HTTP/1.1 404")
    writer.close()

    async def access_lines() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if r.name == "aiohttp.access" and "/x" in r.getMessage()
        ]

    [line] = await h.eventually(access_lines)
    assert line.splitlines() == [line]
    assert f"/x\\n{forged}\\x85 404" in line


async def test_classifier_url_credentials_reach_no_log_and_no_row(
    harness_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-pass-0123456789"
    with socket.socket() as probe:  # a port nobody listens on: every classifier call fails
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    h = await harness_factory(classifier_url=f"http://triage:{secret}@127.0.0.1:{port}")
    await h.post_customer_message("Login fails with SSO since this morning")
    assert await h.eventually(lambda: h.count(Message, Message.attempts >= 2), within_s=15)
    classify = await h.slack.send_command("/classify", "Is the API down?", user_id=AGENT, channel_id=CHANNEL)
    assert classify.status == 200  # answered in the acknowledgement or later through the response URL
    for text in ("status", "rollback v1"):
        response = await h.slack.send_command("/triage", text, user_id=ADMIN, channel_id=CHANNEL)
        assert response.status == 200
    await h.slack.wait_for_response(
        count=2, timeout=15, predicate=lambda r: "failed" in str(r.body) or "Could not" in str(r.body)
    )
    assert await h.eventually(lambda: h.count(AuditEntry, AuditEntry.action == "rollback"))
    [message] = await h.rows(Message)
    assert "classifier at http://***@127.0.0.1" in str(message.last_error)
    async with h.sessions() as session:
        for table in Base.metadata.sorted_tables:
            rows = (await session.execute(select(table))).all()
            assert secret not in str(rows), table.name
    assert [r for r in caplog.records if secret in r.getMessage()] == []
    assert secret not in caplog.text  # tracebacks included
    assert "http://***@127.0.0.1" in caplog.text


async def test_a_model_without_urgency_is_reported_at_start_and_in_status(
    harness_factory: Any, tiny_bert: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topics = LabelSchema(heads={"topic": ["billing", "bug", "outage"]})
    make_tiny_version(Registry(data_dir / "models"), tiny_bert, topics)  # v1, active
    make_tiny_version(Registry(data_dir / "models"), tiny_bert, activate=False)  # v2: every head
    with caplog.at_level(logging.WARNING, logger="bot.main"):
        h = await harness_factory(with_model=False)
    assert "the active model v1 lacks a head the bot uses: without urgency: escalation" in caplog.text
    await h.slack.send_command("/triage", "status", user_id=ADMIN, channel_id=CHANNEL)
    [posted] = await h.slack.wait_for_response(timeout=5)
    status = str(posted.body)
    assert ":warning: without urgency: escalation" in status
    assert ":warning: without sentiment: the sentiment on cards stops working" in status
    assert "without topic" not in status
    created = datetime.fromisoformat(Registry(data_dir / "models").get("v1").created)
    assert f"*Model:* v1 (created {created:%Y-%m-%d %H:%M} UTC)" in status  # as other times: no ISO
    await h.slack.send_command("/triage", "models", user_id=ADMIN, channel_id=CHANNEL)
    [_, listed] = await h.slack.wait_for_response(count=2, timeout=5)
    assert "*v1* active: no held-out metrics" in str(listed.body["text"])  # never a bare "active: "

    await h.slack.send_command("/triage", "rollback v2", user_id=ADMIN, channel_id=CHANNEL)
    [posted] = await h.slack.wait_for_response(timeout=10, predicate=lambda r: "v2 is now" in str(r.body))
    assert ":warning:" not in str(posted.body)
    await h.slack.send_command("/triage", "rollback v1", user_id=ADMIN, channel_id=CHANNEL)
    [posted] = await h.slack.wait_for_response(timeout=10, predicate=lambda r: "v1 is now" in str(r.body))
    assert ":warning: without urgency: escalation" in str(posted.body)


# ---- /triage models and rollback, the scheduled jobs -------------------------------------------------


async def test_models_lists_every_version_newest_first(
    harness_factory: Any, tiny_bert: Path, data_dir: Path
) -> None:
    registry = Registry(data_dir / "models")
    make_tiny_version(registry, tiny_bert)  # v1, active
    make_tiny_version(registry, tiny_bert, activate=False)  # v2
    registry.update_metrics("v1", {"topic": {"macro_f1": 0.8125}, "urgency": {"macro_f1": 0.5}})
    registry.set_status("v2", "rejected", "no better than v1 on the same rows")
    h = await harness_factory(with_model=False)
    response = await h.slack.send_command("/triage", "models", user_id=ADMIN, channel_id=CHANNEL)
    assert response.json()["text"] == "Listing models…"
    [posted] = await h.slack.wait_for_response(timeout=10)
    assert posted.body["text"].splitlines() == [
        "*v2* rejected (no better than v1 on the same rows): no held-out metrics",
        ":white_check_mark: *v1* active: topic F1 0.812, urgency F1 0.500",
    ]


async def test_rollback_makes_the_bot_answer_with_that_version(
    harness_factory: Any, tiny_bert: Path, data_dir: Path
) -> None:
    registry = Registry(data_dir / "models")
    make_tiny_version(registry, tiny_bert)  # v1
    make_tiny_version(registry, tiny_bert, seed=1, activate=False)
    registry.activate("v2")
    h = await harness_factory(with_model=False)
    response = await h.slack.send_command("/triage", "rollback v1", user_id=ADMIN, channel_id=CHANNEL)
    assert response.json()["text"] == "Switching to v1…"
    [posted] = await h.slack.wait_for_response(timeout=20)
    assert posted.body["text"] == "v1 is now the active model. Every classifier picks it up within seconds."
    assert registry.active_name() == "v1"
    [entry] = await h.rows(AuditEntry)
    assert (entry.user_id, entry.action, entry.args, entry.allowed) == (
        ADMIN,
        "rollback",
        {"version": "v1"},
        True,
    )
    event, _ = await h.post_customer_message("Where can I download last month's invoice?")
    await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Prediction))
    [prediction] = await h.rows(Prediction)
    assert prediction.model_version == "v1"


async def test_scheduled_retraining_waits_for_enough_new_labels(harness_factory: Any) -> None:
    h = await harness_factory(triage_retrain_min_corrections=2)
    event, _ = await h.post_customer_message("Export to CSV crashes the app every time")
    reply = await h.reply_to(event["ts"])
    await h.settled()  # the prediction is stored: a label is a correction of it
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "bug", CHANNEL, event["ts"]))
    assert await h.eventually(lambda: h.count(Correction))
    waiting = await scheduled_retrain(h.bot.settings, h.sessions, h.bot.retrainer)
    assert waiting.startswith("1 new labels since ") and waiting.endswith("; retraining waits for 2")
    await h.slack.send_event(h.slack.reaction_added_event(ADMIN, "rage", CHANNEL, reply.response["ts"]))
    assert await h.eventually(lambda: h.count(Correction, Correction.head == "sentiment"))
    async with h.sessions.begin() as session:
        await repo.start_training_run(session, trigger=TrainingTrigger.COMMAND)
    async with run_lock(h.engine):  # the retrainer is asked; a run in progress answers for it
        asked = await scheduled_retrain(h.bot.settings, h.sessions, h.bot.retrainer)
    assert asked.startswith("Retraining is already running, started by command at")
    assert h.bot.retrainer.process is None
    nightly = h.bot.settings.model_copy(update={"triage_retrain_cron": "30 2 * * 1-5"})
    job = build_scheduler(nightly, h.engine, h.sessions, h.bot.retrainer).get_job("retrain")
    assert job is not None and job.func is scheduled_retrain
    assert str(job.trigger) == "cron[month='*', day='*', day_of_week='1-5', hour='2', minute='30']"
    assert str(job.trigger.timezone) == "UTC"


async def test_the_scheduler_runs_housekeeping(harness_factory: Any, tiny_bert: Path, data_dir: Path) -> None:
    """Event ids older than a day are forgotten, texts past the retention removed, old versions pruned."""
    h = await harness_factory(triage_retention_days=1, triage_keep_versions=1)
    registry = Registry(data_dir / "models")
    for seed in (1, 2):
        make_tiny_version(registry, tiny_bert, seed=seed, activate=False)  # v2, v3; v1 stays active
    event, _ = await h.post_customer_message("Our SSO login loops forever")
    await h.reply_to(event["ts"])
    two_days_ago = utcnow() - timedelta(days=2)
    async with h.sessions.begin() as session:
        await repo.record_event(session, "Ev0LONGAGO", now=two_days_ago)
        await session.execute(update(Message).values(received_at=two_days_ago))
    scheduler = build_scheduler(h.bot.settings, h.engine, h.sessions, h.bot.retrainer)
    assert [job.id for job in scheduler.get_jobs()] == ["housekeeping"]  # TRIAGE_RETRAIN_CRON is empty
    scheduler.start()
    try:
        scheduler.modify_job("housekeeping", next_run_time=datetime.now(UTC))

        async def pruned() -> bool:  # its last step
            return await asyncio.to_thread(registry.names) == ["v1", "v3"]

        assert await eventually(pruned)
    finally:
        scheduler.shutdown(wait=False)
    assert await h.count(SlackEvent, SlackEvent.event_id == "Ev0LONGAGO") == 0
    assert await h.count(SlackEvent) == 1  # the message's own, from today
    [message] = await h.rows(Message)
    assert message.text is None


# ---- faults: exactly one reply whenever the bot dies or the database drops (issue 16) -----------------


def _replies_per_thread(slack: SlackStandIn) -> dict[str, int]:
    """How many replies each customer message got (the escalation posts have no thread_ts)."""
    counts: dict[str, int] = {}
    for call in slack.calls_to("chat.postMessage"):
        if call.ok and call.args.get("thread_ts"):
            counts[call.args["thread_ts"]] = counts.get(call.args["thread_ts"], 0) + 1
    return counts


async def test_a_reply_posted_just_before_the_bot_died_is_adopted_not_posted_again(
    harness_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = await harness_factory()
    died = asyncio.Event()
    recorded = repo.set_reply

    async def dies_before_recording(session: Any, message_id: int, **where: str) -> None:
        if not died.is_set():  # the instant after chat.postMessage succeeded, before its ts is stored
            died.set()
            raise asyncio.CancelledError  # the worker stops here, as a killed process would
        await recorded(session, message_id, **where)

    monkeypatch.setattr(repo, "set_reply", dies_before_recording)
    event, _ = await h.post_customer_message("Exports to CSV have been timing out all week")
    posted = await h.reply_to(event["ts"])
    await asyncio.wait_for(died.wait(), timeout=8)
    await h.restart()
    [message] = await h.rows(Message)
    assert message.reply_ts is None and message.state == MessageState.PENDING
    async with h.sessions.begin() as session:  # no need to wait 2 minutes for the dead worker's lease
        await repo.release_message(session, message.id, message.attempts)

    assert await h.eventually(lambda: h.count(Message, Message.state == MessageState.CLASSIFIED))
    [message] = await h.rows(Message)
    assert message.reply_ts == posted.response["ts"]  # the reply already in Slack, adopted
    assert _replies_per_thread(h.slack) == {event["ts"]: 1}
    [lookup] = h.slack.calls_to("conversations.replies")
    assert lookup.args["include_all_metadata"] in (True, "1", "true")
    assert posted.args["metadata"] == {
        "event_type": "triage_reply",
        "event_payload": {"message_id": message.id, "attempt": 0},
    }


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_database_outage_under_load_loses_and_duplicates_nothing(
    harness_factory: Any, database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TcpProxy(database_url.host or "127.0.0.1", database_url.port or 5432)
    await proxy.start()
    try:
        proxied = database_url.set(host="127.0.0.1", port=proxy.port)
        h = await harness_factory(database_url=proxied.render_as_string(hide_password=False))
        caplog.set_level("WARNING", logger="bot")
        events = [
            h.slack.message_event(CHANNEL, CUSTOMER, f"Invoice {i} shows the wrong VAT") for i in range(40)
        ]

        async def deliver(event: dict[str, Any]) -> None:
            """As Slack: delivered again (X-Slack-Retry-Num) until some delivery is answered 200."""
            envelope = h.slack.event_envelope(event)  # Slack's retries: the same envelope
            for attempt in range(60):
                response = await h.slack.send_envelope(
                    envelope, **({"retry_num": attempt} if attempt else {})
                )
                if response.status == 200:
                    return
                assert response.status == 503 and response.elapsed < 3.0  # never held past Slack's 3 s
                await asyncio.sleep(0.25)
            raise AssertionError(f"{event['ts']} never acknowledged")

        async def load() -> None:
            deliveries = []
            for event in events:
                deliveries.append(asyncio.ensure_future(deliver(event)))
                await asyncio.sleep(0.05)  # 20 messages/s
            await asyncio.gather(*deliveries)

        async def outage() -> None:
            await h.slack.wait_for("chat.postMessage", count=3, timeout=20)  # in the middle of the load
            await proxy.cut()
            await asyncio.sleep(3)
            await proxy.restore()

        await asyncio.gather(load(), outage())
        await h.slack.wait_for(
            "chat.postMessage",
            count=len(events),
            timeout=60,
            predicate=lambda c: bool(c.args.get("thread_ts")),
        )

        async def all_classified() -> bool:
            return await h.count(Message, Message.state == MessageState.CLASSIFIED) == len(events)

        assert await h.eventually(all_classified, within_s=30)
    finally:
        await proxy.close()
    assert _replies_per_thread(h.slack) == {e["ts"]: 1 for e in events}  # 0 lost, 0 duplicated
    assert await h.count(Message) == len(events)
    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("bot")]
    assert len(tracebacks) <= 1, [r.getMessage() for r in tracebacks]


async def test_acknowledgement_never_waits_past_slacks_3_seconds(
    harness_factory: Any, database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    h = await harness_factory()
    caplog.set_level("WARNING", logger="bot")
    events = [h.slack.message_event(CHANNEL, CUSTOMER, f"Refund {i} is still missing") for i in range(3)]
    envelopes = [h.slack.event_envelope(e) for e in events]
    async with _database_locked(h):  # another writer holds the database: storing would wait 15 s
        responses = await asyncio.gather(*(h.slack.send_envelope(e) for e in envelopes))
        assert [r.status for r in responses] == [503] * 3
        assert all(r.elapsed < 3.0 for r in responses)
    retried = await asyncio.gather(*(h.slack.send_envelope(e, retry_num=1) for e in envelopes))
    assert [r.status for r in retried] == [200] * 3
    await h.slack.wait_for(
        "chat.postMessage", count=3, timeout=20, predicate=lambda c: bool(c.args.get("thread_ts"))
    )
    assert _replies_per_thread(h.slack) == {e["ts"]: 1 for e in events}
    failures = [r for r in caplog.records if r.name == "bot.triage" and "not stored" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info  # one traceback per outage; the rest counted:
    lines = [r.getMessage() for r in caplog.records if r.name == "bot.triage"]
    assert "database reachable again; 2 more failures since the last line" in lines


@contextlib.asynccontextmanager
async def _database_locked(h: Harness) -> AsyncIterator[None]:
    """A write lock held by another connection, as a long migration or a backup on SQLite, or a lock on
    PostgreSQL's tables, would hold it."""
    async with h.engine.connect() as connection:
        if h.engine.dialect.name == "sqlite":
            await connection.exec_driver_sql("BEGIN EXCLUSIVE")
        else:
            await connection.exec_driver_sql("BEGIN")
            await connection.exec_driver_sql("LOCK TABLE messages, slack_events IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await connection.exec_driver_sql("ROLLBACK")


def _gate_classifier(h: Harness, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The bot's classifier waits for the returned event before each answer (a slow or stuck model)."""
    gate = asyncio.Event()
    classify = h.bot.triage.classifier.classify

    async def gated(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await classify(*args, **kwargs)

    monkeypatch.setattr(h.bot.triage.classifier, "classify", gated)
    return gate


def _sweeps_past(monkeypatch: pytest.MonkeyPatch, seconds: float, sweeps: int = 3) -> asyncio.Event:
    """Set once the pending-message sweep (of every bot here) has looked for due work ``sweeps`` times
    after ``seconds`` from now: by then any lease given before now has run out unless it was renewed."""
    done = asyncio.Event()
    claim = repo.claim_due_messages
    after = time.monotonic() + seconds
    seen = 0

    async def counted(session: Any, **kwargs: Any) -> list[Message]:
        nonlocal seen
        claimed = await claim(session, **kwargs)
        if time.monotonic() > after:
            seen += 1
            if seen >= sweeps:
                done.set()
        return claimed

    monkeypatch.setattr(repo, "claim_due_messages", counted)
    return done


async def test_messages_that_wait_longer_than_their_lease_are_answered_once(
    harness_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work that waits in memory (or in a slow classifier) past its lease is not taken and answered again."""
    h = await harness_factory(triage_workers=1, triage_lease_s=0.5)
    gate = _gate_classifier(h, monkeypatch)
    events = [(await h.post_customer_message(f"Invoice {i} shows the wrong VAT"))[0] for i in range(4)]
    await asyncio.wait_for(_sweeps_past(monkeypatch, seconds=1.5).wait(), timeout=10)  # three leases
    gate.set()
    await h.slack.wait_for("chat.postMessage", count=len(events), timeout=15)
    await h.settled()
    assert _replies_per_thread(h.slack) == {e["ts"]: 1 for e in events}
    assert await h.count(Prediction) == len(events)
    assert await h.count(Message, Message.state == MessageState.CLASSIFIED) == len(events)
    assert h.bot.triage.held == {}


async def test_a_replica_leaves_the_others_leases_alone_and_takes_over_when_it_dies(
    harness_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas on one database: B answers none of A's messages while A works on them (however slow),
    and every message A held when it died, once its lease has run out."""
    a = await harness_factory(triage_workers=1, triage_lease_s=2)
    b = await harness_factory(triage_lease_s=2)
    gate = _gate_classifier(a, monkeypatch)
    first = [(await a.post_customer_message(f"Export {i} times out"))[0] for i in range(2)]
    await asyncio.wait_for(_sweeps_past(monkeypatch, seconds=6, sweeps=6).wait(), timeout=20)
    gate.set()
    await a.slack.wait_for("chat.postMessage", count=len(first), timeout=15)
    await a.settled()
    assert _replies_per_thread(a.slack) == {e["ts"]: 1 for e in first}
    assert _replies_per_thread(b.slack) == {}

    gate.clear()  # A is stuck on the next ones, then dies
    second = [(await a.post_customer_message(f"Login {i} loops back to the start"))[0] for i in range(2)]
    await a.bot.stop()
    await b.slack.wait_for("chat.postMessage", count=len(second), timeout=15)
    assert _replies_per_thread(a.slack) == {e["ts"]: 1 for e in first}
    assert _replies_per_thread(b.slack) == {e["ts"]: 1 for e in second}

    async def all_classified() -> bool:
        return await b.count(Message, Message.state == MessageState.CLASSIFIED) == len(first) + len(second)

    assert await b.eventually(all_classified, within_s=10)
    assert await b.count(Prediction) == len(first) + len(second)


async def test_every_web_api_call_goes_over_one_shared_session_closed_at_stop(harness_factory: Any) -> None:
    """Kept-alive connections for every Web API call (not a new connection each), closed with the bot."""
    h = await harness_factory(triage_urgent_labels="low,medium,high,critical")  # a reaction and a post too
    session = h.bot.triage.client.session
    assert isinstance(session, aiohttp.ClientSession) and not session.closed
    assert (
        h.bot.triage.output.client.session is session
        and h.bot.triage.cards.output.client is h.bot.triage.client
    )
    event, _ = await h.post_customer_message("Everything is broken, production is down!")
    await h.reply_to(event["ts"])
    await h.slack.wait_for("reactions.add", timeout=5)
    assert h.bot.triage.client.session is session and not session.closed  # reused, never replaced
    await h.bot.stop()
    assert session.closed


async def test_two_retrains_asked_at_once_start_one_and_the_other_hears_it_in_its_acknowledgement(
    harness_factory: Any,
) -> None:
    """Two admins (or one double click): the second must not be told "Starting…" and then "already
    running"; whichever comes second is told in its acknowledgement, and nothing more later."""
    h = await harness_factory()
    asked = await asyncio.gather(
        *(h.slack.send_command("/triage", "retrain", user_id=ADMIN, channel_id=CHANNEL) for _ in range(2))
    )
    texts = [r.json()["text"] for r in asked]
    assert sum(t.startswith("Retraining is already running") for t in texts) == 1, texts
    [started] = [t for t in texts if not t.startswith("Retraining is already running")]
    process = h.bot.retrainer.process
    assert process is not None
    await asyncio.wait_for(process.wait(), timeout=120)  # the run this bot started ends
    audited = await h.rows(AuditEntry, AuditEntry.action == "retrain")  # written with each acknowledgement
    assert sorted(str(e.reason) for e in audited) == ["None", "already running"]
    later = [str(r.body) for r in h.slack.responses]
    assert not [b for b in later if "already running" in b], (started, later)


async def test_under_overload_a_message_without_room_is_stored_due_in_the_acknowledgements_one_write(
    harness_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message the full queue has no room for is stored due now, for the sweep to queue: no second
    transaction to release it, which waited for the database behind the background work while Slack
    waited for the acknowledgement."""
    h = await harness_factory(triage_workers=1, triage_queue_size=1)
    gate = _gate_classifier(h, monkeypatch)
    released: list[int] = []
    release = repo.release_message

    async def counted(session: Any, message_id: int, attempt: int, **kwargs: Any) -> None:
        released.append(message_id)
        await release(session, message_id, attempt, **kwargs)

    monkeypatch.setattr(repo, "release_message", counted)
    events = [(await h.post_customer_message(f"Invoice {i} is missing"))[0] for i in range(4)]
    waiting = await h.rows(Message, Message.next_attempt_at <= Message.received_at)
    assert len(waiting) >= 2 and all(m.attempts == 0 for m in waiting)  # one worked on, one queued
    gate.set()
    await h.slack.wait_for("chat.postMessage", count=len(events), timeout=20)
    await h.settled()
    assert _replies_per_thread(h.slack) == {e["ts"]: 1 for e in events}
    assert released == []


async def test_a_route_post_without_a_permalink_says_so_plainly(harness_factory: Any) -> None:
    """Slack giving no permalink: the route post says there is no link, never a raw message ts."""
    route = "C0ROUTED"
    h = await harness_factory(
        triage_routes=",".join(f"{label}={route}" for label in LabelSchema().heads["topic"]),
        triage_not_a_request_above=1.0,  # every message is routed, whatever the tiny model says
    )
    h.slack.fail_next("chat.getPermalink", error="message_not_found", count=None)
    event, _ = await h.post_customer_message("We were charged twice for invoice 4471, please refund")
    [post] = await h.slack.wait_for(
        "chat.postMessage", predicate=lambda c: c.args["channel"] == route, timeout=8
    )
    assert post.args["text"].endswith("\n(no link: Slack did not give one)")
    assert event["ts"] not in post.args["text"] and "Topic: " in post.args["text"]
