"""Tests of the Socket Mode stand-in itself (tests/support/socket_mode_standin.py): its link opens like
Slack's for a real AsyncWebClient and aiohttp WebSocket, and its ack checks catch what breaks the protocol,
so the bot's tests that find no protocol errors mean something."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from tests.support.slack_standin import WaitTimeout
from tests.support.socket_mode_standin import SocketModeStandIn


@pytest.fixture
async def slack() -> AsyncIterator[SocketModeStandIn]:
    async with SocketModeStandIn() as standin:
        standin.ack_timeout = 0.5
        yield standin


async def open_link(
    slack: SocketModeStandIn, session: aiohttp.ClientSession
) -> aiohttp.ClientWebSocketResponse:
    client = AsyncWebClient(base_url=slack.api_url)
    response = await client.apps_connections_open(app_token=slack.app_token)
    assert response["url"].startswith("ws://127.0.0.1:")
    return await session.ws_connect(response["url"])


async def test_apps_connections_open_takes_only_the_app_token(slack: SocketModeStandIn) -> None:
    client = AsyncWebClient(base_url=slack.api_url)
    with pytest.raises(SlackApiError) as refused:
        await client.apps_connections_open(app_token=slack.bot_token)
    assert refused.value.response["error"] == "not_allowed_token_type"
    with pytest.raises(SlackApiError) as bot_method:
        await AsyncWebClient(token=slack.app_token, base_url=slack.api_url).auth_test()
    assert bot_method.value.response["error"] == "not_allowed_token_type"


async def test_hello_then_envelopes_and_each_ack_is_checked(slack: SocketModeStandIn) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await open_link(slack, session)
        hello = json.loads((await ws.receive()).data)
        assert hello["type"] == "hello" and hello["num_connections"] == 1
        assert hello["connection_info"] == {"app_id": slack.api_app_id}

        async def ack_with(extra: dict[str, object]) -> None:
            envelope = json.loads((await ws.receive()).data)
            await ws.send_str(json.dumps({"envelope_id": envelope["envelope_id"], **extra}))

        event = slack.message_event(text="hello")
        delivery = asyncio.ensure_future(slack.deliver_event(event))
        envelope = json.loads((await ws.receive()).data)
        assert set(envelope) == {
            "envelope_id",
            "payload",
            "type",
            "accepts_response_payload",
            "retry_attempt",
            "retry_reason",
        }
        assert (envelope["type"], envelope["retry_attempt"], envelope["retry_reason"]) == (
            "events_api",
            0,
            "",
        )
        assert envelope["payload"]["event"]["ts"] == event["ts"] and not envelope["accepts_response_payload"]
        await ws.send_str(json.dumps({"envelope_id": envelope["envelope_id"], "payload": {"text": "no"}}))
        await ws.send_str(json.dumps({"envelope_id": envelope["envelope_id"]}))
        await delivery
        assert len(slack.protocol_errors) == 2  # a payload where none is accepted; a second ack
        assert "accepts none" in slack.protocol_errors[0] and "second ack" in slack.protocol_errors[1]

        command = asyncio.ensure_future(slack.deliver_command("/classify", "hi"))
        await ack_with({"payload": {"response_type": "shout"}})
        assert (await command).accepts_response_payload
        assert "neither text nor blocks" in slack.protocol_errors[-1]
        await ws.send_str(json.dumps({"envelope_id": "not-one-of-ours"}))
        await slack._wait(lambda: len(slack.protocol_errors) == 4, 2)
        assert "unknown envelope_id" in slack.protocol_errors[-1]
        await ws.close()


async def test_an_unacknowledged_event_is_delivered_again_then_given_up(slack: SocketModeStandIn) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await open_link(slack, session)
        await ws.receive()  # hello
        delivery = asyncio.ensure_future(slack.deliver_event(slack.message_event(text="anyone?")))
        received = [json.loads((await ws.receive()).data) for _ in range(4)]
        assert [(e["retry_attempt"], e["retry_reason"]) for e in received] == [
            (0, ""),
            (1, "timeout"),
            (2, "timeout"),
            (3, "timeout"),
        ]
        assert len({e["envelope_id"] for e in received}) == 4
        assert len({e["payload"]["event_id"] for e in received}) == 1
        with pytest.raises(WaitTimeout):
            await delivery
        assert len(slack.unanswered()) == 4
        await ws.close()


async def test_disconnect_and_silent_links(slack: SocketModeStandIn) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await open_link(slack, session)
        await ws.receive()  # hello
        link = slack.links[0]
        link.answer_pings = False
        await ws.ping(b"are you there")
        await slack._wait(lambda: link.pings == 1, 2)
        slack.send_hello = False
        second = await open_link(slack, session)
        await slack.wait_for_link(2)
        assert slack.links[1].hello_at is None and slack.current_link() is link
        await slack.disconnect("link_disabled", link)
        message = json.loads((await ws.receive()).data)
        assert message == {
            "type": "disconnect",
            "reason": "link_disabled",
            "debug_info": message["debug_info"],
        }
        assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await second.close()
