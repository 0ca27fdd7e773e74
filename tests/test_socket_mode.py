"""The bot end to end in Socket Mode: a stand-in Slack (tests/support/socket_mode_standin.py) hands out a real
WebSocket, delivers envelopes over it, checks every ack and records the Web API calls."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.engine import URL

from bot.main import RunningBot, start_bot
from bot.settings import SettingsError, load_settings
from bot.storage.database import upgrade_database
from bot.storage.models import Correction, Message, MessageState, Prediction
from classifier.registry import Registry
from tests.support.socket_mode_standin import Link, SocketModeStandIn
from tests.support.tiny_model import make_tiny_version
from tests.test_bot import ADMIN, AGENT, CHANNEL, CUSTOMER, ESCALATION, Harness, caught_up

SocketBot = Callable[..., Awaitable[Harness]]


@pytest.fixture
def backend() -> str:
    return "sqlite"  # the transport is under test here; test_bot.py covers both databases


@pytest.fixture
async def socket_bot(tiny_bert: Path, data_dir: Path, database_url: URL) -> AsyncIterator[SocketBot]:
    """Start the bot in Socket Mode against a fresh stand-in; returns once its first link said hello."""
    await upgrade_database(database_url)
    make_tiny_version(Registry(data_dir / "models"), tiny_bert)
    started: list[tuple[SocketModeStandIn, RunningBot, Harness]] = []

    async def make(**settings: Any) -> Harness:
        slack = SocketModeStandIn()
        await slack.start()
        config = load_settings(
            _env_file=None,
            slack_bot_token=slack.bot_token,
            slack_app_token=slack.app_token,
            slack_api_url=slack.api_url,
            database_url=database_url.render_as_string(hide_password=False),
            host="127.0.0.1",
            port=0,
            triage_channels=CHANNEL,
            triage_admins=ADMIN,
            triage_escalation_channel=ESCALATION,
            triage_pending_interval_s=0.2,
            triage_retry_base_s=0.2,
            triage_retrain_cron="",
            **{"triage_embedded_classifier": "thread", **settings},  # the default's child: test_child.py
        )
        bot = await start_bot(config)
        harness = Harness(slack, bot, database_url)
        started.append((slack, bot, harness))
        await slack.wait_for_link(1)
        await harness.eventually(lambda: caught_up(bot))  # the start-up backfill read the channel
        return harness

    yield make
    for slack, bot, harness in started:
        await bot.stop()
        await harness.engine.dispose()
        await slack.close()


def standin(h: Harness) -> SocketModeStandIn:
    assert isinstance(h.slack, SocketModeStandIn)
    return h.slack


def replies_to(slack: SocketModeStandIn, ts: str) -> list[Any]:
    return [c for c in slack.calls_to("chat.postMessage") if c.args.get("thread_ts") == ts]


async def test_the_link_is_opened_with_the_app_token(socket_bot: SocketBot) -> None:
    h = await socket_bot()
    slack = standin(h)
    [opened] = slack.calls_to("apps.connections.open")
    assert opened.ok and opened.headers["Authorization"] == f"Bearer {slack.app_token}"
    assert "token" not in opened.args  # never in the body: Slack refuses the app token there
    assert slack.links[0].open and slack.links[0].hello_at is not None


async def test_message_is_triaged_once_and_a_reaction_corrects_it(socket_bot: SocketBot) -> None:
    h = await socket_bot()
    slack = standin(h)
    event = slack.message_event(CHANNEL, CUSTOMER, "We were charged twice for invoice 4471, please refund")
    delivered = await slack.deliver_event(event)
    assert delivered.ack.payload is None  # an events_api ack carries nothing
    assert await h.count(Message) == 1  # stored before the ack
    reply = await h.reply_to(event["ts"])
    assert "*Topic:*" in str(reply.args["blocks"])
    assert await h.eventually(lambda: h.count(Prediction))

    await slack.deliver_event(slack.reaction_added_event(AGENT, "bug", CHANNEL, event["ts"]))
    assert await h.eventually(lambda: h.count(Correction, Correction.head == "topic"))
    [correction] = await h.rows(Correction)
    assert (correction.new_label, correction.user_id, str(correction.source)) == ("bug", AGENT, "reaction")
    [update] = await slack.wait_for("chat.update", timeout=5)
    assert update.args["ts"] == reply.response["ts"]
    assert len(replies_to(slack, event["ts"])) == 1
    assert slack.protocol_errors == [] and slack.unanswered() == []


async def test_classify_command_is_answered_in_the_ack(socket_bot: SocketBot) -> None:
    h = await socket_bot()
    slack = standin(h)
    envelope = await slack.deliver_command(
        "/classify", "Our API returns 503 for every request", user_id=AGENT
    )
    assert envelope.accepts_response_payload
    answer = envelope.ack.payload
    assert answer is not None and answer["response_type"] == "ephemeral" and "Topic" in str(answer["blocks"])
    usage = await slack.deliver_command("/classify", "", user_id=AGENT)
    assert usage.ack.payload is not None and "Usage" in usage.ack.payload["text"]
    assert slack.protocol_errors == []


async def test_fix_labels_button_opens_the_modal(socket_bot: SocketBot) -> None:
    h = await socket_bot()
    slack = standin(h)
    event = slack.message_event(CHANNEL, CUSTOMER, "How do I add a teammate to my workspace?")
    await slack.deliver_event(event)
    reply = await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Message, Message.reply_ts.is_not(None)))
    envelope = await slack.deliver_block_actions(
        [{"action_id": "triage_fix"}], user_id=AGENT, channel_id=CHANNEL, message_ts=reply.response["ts"]
    )
    assert envelope.type == "interactive" and not envelope.accepts_response_payload
    assert envelope.ack.payload is None
    [opened] = await slack.wait_for("views.open", timeout=5)  # the trigger_id works over Socket Mode too
    selects = [b["element"]["action_id"] for b in opened.args["view"]["blocks"] if b["type"] == "input"]
    assert selects == ["label:topic", "label:urgency", "label:sentiment"]
    assert slack.protocol_errors == []


async def test_refresh_requested_reconnects_and_nothing_is_lost_or_answered_twice(
    socket_bot: SocketBot,
) -> None:
    h = await socket_bot()
    slack = standin(h)
    before = slack.message_event(CHANNEL, CUSTOMER, "The dashboard is down for our whole team")
    first = await slack.deliver_event(before)
    await h.reply_to(before["ts"])

    old = await slack.disconnect("refresh_requested")
    # delivered on the old link while the bot replaces it: acked there or, if the ack is lost in the
    # switch, delivered again on the new link
    during = slack.message_event(CHANNEL, CUSTOMER, "Exports fail with a timeout since the upgrade")
    await slack.deliver_event(during, link=old)
    new = await slack.wait_for_link(2)
    after = slack.message_event(CHANNEL, CUSTOMER, "How do I change the billing email?")
    await slack.deliver_event(after, link=new)
    # Slack retries an event whose ack it missed: the same event_id in a new envelope
    retried = await slack.redeliver(first, link=new)
    assert retried.retry_attempt == 1 and retried.retry_reason == "timeout" and retried.acks

    opens = await slack.wait_for("apps.connections.open", count=2)
    assert all(call.ok and call.headers["Authorization"] == f"Bearer {slack.app_token}" for call in opens)
    assert await h.eventually(lambda: _closed(old))
    assert new.open
    for event in (before, during, after):
        await h.reply_to(event["ts"])
    assert await h.eventually(lambda: _all_replied(h, 3))
    assert await h.count(Message) == 3
    assert [len(replies_to(slack, e["ts"])) for e in (before, during, after)] == [1, 1, 1]
    assert slack.protocol_errors == [] and slack.unanswered() == []


async def test_a_message_lost_while_the_link_was_down_is_backfilled_after_the_reconnect(
    socket_bot: SocketBot,
) -> None:
    """Slack does not redeliver what it could not send while no link was open: the bot reads the
    channel's history after every new hello (bot/backfill.py)."""
    h = await socket_bot()
    slack = standin(h)
    await slack.disconnect("refresh_requested")
    lost = slack.message_event(CHANNEL, CUSTOMER, "Our SSO login broke an hour ago")  # never delivered
    await slack.wait_for_link(2)
    await h.reply_to(lost["ts"])
    assert await h.eventually(lambda: _backfills(h, 2))
    assert len(replies_to(slack, lost["ts"])) == 1 and await h.count(Message) == 1


async def _backfills(h: Harness, runs: int) -> bool:
    return h.bot.backfill is not None and h.bot.backfill.runs >= runs


async def _closed(link: Link) -> bool:
    return not link.open


async def _all_replied(h: Harness, count: int) -> bool:
    return await h.count(Message, Message.state == MessageState.CLASSIFIED) == count


# ---- the liveness watchdog and /healthz -------------------------------------------------------------

FAST_WATCHDOG = {"triage_socket_ping_interval_s": 0.2, "triage_socket_dead_after_s": 1.5}
BOUND_S = FAST_WATCHDOG["triage_socket_dead_after_s"] + 1.0  # the bound, plus a check and a connect


async def healthz(h: Harness) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{h.bot.port}/healthz") as response,
    ):
        return response.status, await response.json()


async def health_is(h: Harness, status: int, state: str) -> bool:
    code, body = await healthz(h)
    return code == status and body["socket_mode"]["state"] == state


async def test_healthz_reports_the_link(socket_bot: SocketBot) -> None:
    h = await socket_bot(**FAST_WATCHDOG)
    assert await h.eventually(lambda: health_is(h, 200, "connected"))
    _, body = await healthz(h)
    assert body["ok"] is True and body["socket_mode"]["connections"] == 1


@pytest.mark.parametrize("reason", ["refresh_requested", "link_disabled"])
async def test_a_new_link_without_hello_is_replaced_within_the_bound(
    socket_bot: SocketBot, reason: str
) -> None:
    h = await socket_bot(**FAST_WATCHDOG)
    slack = standin(h)
    assert await h.eventually(lambda: health_is(h, 200, "connected"))
    # after the reconnect Slack never says hello on the new link: no error, no events (bolt-python #1529)
    slack.send_hello = False
    await slack.disconnect(reason)
    zombie = await slack.wait_for_link(2)
    assert await h.eventually(lambda: health_is(h, 503, "reconnecting"))
    _, body = await healthz(h)
    assert body["ok"] is False and reason in body["socket_mode"]["why"]

    assert await h.eventually(lambda: _reconnected(h), within_s=BOUND_S)
    assert time.monotonic() - zombie.opened_at <= BOUND_S + 0.5  # 0.5: a healthz poll
    _, body = await healthz(h)
    assert "no hello" in body["socket_mode"]["last_problem"]
    assert await h.eventually(lambda: _closed(zombie))  # the dead link is let go
    slack.send_hello = True  # Slack is well again: the next link the watchdog opens works
    fresh = await slack.wait_for_hello(after=zombie.number, timeout=2 * BOUND_S)
    assert await h.eventually(lambda: health_is(h, 200, "connected"))
    assert all(call.ok for call in slack.calls_to("apps.connections.open"))

    event = slack.message_event(CHANNEL, CUSTOMER, "Nobody can log in since this morning")
    await slack.deliver_event(event, link=fresh)
    await h.reply_to(event["ts"])
    assert len(replies_to(slack, event["ts"])) == 1 and slack.protocol_errors == []


async def _reconnected(h: Harness) -> bool:
    _, body = await healthz(h)
    return bool(body["socket_mode"]["reconnects"])


async def test_a_link_that_stops_answering_pings_is_replaced_within_the_bound(socket_bot: SocketBot) -> None:
    h = await socket_bot(**FAST_WATCHDOG)
    slack = standin(h)
    first = slack.links[0]
    assert await h.eventually(lambda: health_is(h, 200, "connected"))
    first.answer_pings = False  # the link stays open, but nothing comes back
    stopped = time.monotonic()
    fresh = await slack.wait_for_hello(after=first.number, timeout=BOUND_S + 2)
    assert fresh.opened_at - stopped <= BOUND_S and first.pings >= 1
    assert await h.eventually(lambda: _closed(first))
    assert await h.eventually(lambda: health_is(h, 200, "connected"))
    _, body = await healthz(h)
    assert body["socket_mode"]["connections"] >= 2

    event = slack.message_event(CHANNEL, CUSTOMER, "Invoices page shows someone else's data")
    await slack.deliver_event(event)
    await h.reply_to(event["ts"])
    assert len(replies_to(slack, event["ts"])) == 1 and slack.protocol_errors == []


@pytest.mark.parametrize(
    ("pings_answered", "problem"),
    [(True, "nothing heard"), (False, "the client did not reconnect")],
)
async def test_a_link_the_client_stopped_watching_is_replaced(
    socket_bot: SocketBot, pings_answered: bool, problem: str
) -> None:
    h = await socket_bot(**FAST_WATCHDOG)
    slack = standin(h)
    first = slack.links[0]
    assert await h.eventually(lambda: health_is(h, 200, "connected"))
    # the client's own monitor (its pings and its reconnects) stops, without an error, as the client
    # in bolt-python #1529 did; the link stays quiet, or stops answering pings so aiohttp closes it
    assert h.bot.link is not None
    monitor = h.bot.link._handler.client.current_session_monitor
    assert monitor is not None
    monitor.cancel()
    first.answer_pings = pings_answered
    stopped = time.monotonic()
    fresh = await slack.wait_for_hello(after=first.number, timeout=BOUND_S + 2)
    assert fresh.opened_at - stopped <= BOUND_S + FAST_WATCHDOG["triage_socket_ping_interval_s"]
    assert await h.eventually(lambda: _closed(first))
    assert await h.eventually(lambda: health_is(h, 200, "connected"))
    _, body = await healthz(h)
    assert body["socket_mode"]["reconnects"] == 1 and problem in body["socket_mode"]["last_problem"]

    event = slack.message_event(CHANNEL, CUSTOMER, "Password reset emails never arrive")
    await slack.deliver_event(event)
    await h.reply_to(event["ts"])
    assert len(replies_to(slack, event["ts"])) == 1 and slack.protocol_errors == []


def test_watchdog_settings_are_validated() -> None:
    with pytest.raises(SettingsError, match="TRIAGE_SOCKET_DEAD_AFTER_S must be at least twice"):
        load_settings(
            _env_file=None,
            slack_bot_token="xoxb-1",
            slack_app_token="xapp-1",
            triage_socket_ping_interval_s=10,
            triage_socket_dead_after_s=15,
        )
    with pytest.raises(SettingsError, match="TRIAGE_SOCKET_PING_INTERVAL_S"):
        load_settings(_env_file=None, slack_bot_token="xoxb-1", triage_socket_ping_interval_s=0)
