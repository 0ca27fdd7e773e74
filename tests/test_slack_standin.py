"""Tests of the Slack stand-in itself (tests/support/slack_standin.py): what it sends verifies and parses
like Slack's requests (slack_sdk's SignatureVerifier, a real Bolt AsyncApp), what it serves works with a real
AsyncWebClient, and its fault injection does what it says."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond, AsyncSay
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from tests.support.slack_standin import (
    DEFAULT_CHANNEL_ID,
    DEFAULT_USER_ID,
    SlackStandIn,
    WaitTimeout,
    button_action,
    compute_signature,
    select_action,
)

SECRET = "test-signing-secret-0123456789"
TOKEN = "xoxb-1234-5678-standin"

FIX_LABELS_BLOCKS: list[dict[str, Any]] = [
    {"type": "section", "block_id": "verdict", "text": {"type": "mrkdwn", "text": "*billing* (0.93)"}},
    {
        "type": "actions",
        "block_id": "feedback",
        "elements": [
            {
                "type": "button",
                "action_id": "fix_labels",
                "text": {"type": "plain_text", "text": "Fix labels"},
                "value": "msg-42",
            },
            {
                "type": "static_select",
                "action_id": "label",
                "placeholder": {"type": "plain_text", "text": "Label"},
                "options": [
                    {"text": {"type": "plain_text", "text": "Billing"}, "value": "billing"},
                    {"text": {"type": "plain_text", "text": "Bug"}, "value": "bug"},
                ],
            },
        ],
    },
]

FIX_LABELS_MODAL: dict[str, Any] = {
    "type": "modal",
    "callback_id": "fix_labels_modal",
    "private_metadata": '{"message": "msg-42"}',
    "title": {"type": "plain_text", "text": "Fix labels"},
    "submit": {"type": "plain_text", "text": "Save"},
    "blocks": [
        {
            "type": "input",
            "block_id": "topic_block",
            "label": {"type": "plain_text", "text": "Topic"},
            "element": {
                "type": "static_select",
                "action_id": "topic",
                "options": [
                    {"text": {"type": "plain_text", "text": "Billing"}, "value": "billing"},
                    {"text": {"type": "plain_text", "text": "Bug"}, "value": "bug"},
                ],
            },
        },
        {
            "type": "input",
            "block_id": "note_block",
            "label": {"type": "plain_text", "text": "Note"},
            "element": {"type": "plain_text_input", "action_id": "note"},
        },
    ],
}


@dataclass
class Received:
    headers: CIMultiDict[str]
    body: bytes
    valid: bool  # per slack_sdk's SignatureVerifier

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode(), keep_blank_values=True, strict_parsing=True))

    def payload(self) -> Any:
        return json.loads(self.form()["payload"])


@dataclass
class Receiver:
    """The smallest possible bot: verifies and records what arrives, optionally slowly."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    delay: float = 0.0
    reply: Callable[[Received], web.Response] | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        verifier = SignatureVerifier(SECRET)
        got = Received(
            CIMultiDict(request.headers), body, verifier.is_valid_request(body, dict(request.headers))
        )
        self.received.append(got)
        if self.delay:
            await asyncio.sleep(self.delay)
        if not got.valid:
            return web.Response(status=401, text="invalid signature")
        return self.reply(got) if self.reply else web.Response(text="")


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    bot = Receiver()
    app = web.Application()
    app.router.add_post("/slack/events", bot.handle)
    runner, port = await serve(app)
    bot.url = f"http://127.0.0.1:{port}/slack/events"
    try:
        yield bot
    finally:
        await runner.cleanup()


@pytest.fixture
async def slack(receiver: Receiver) -> AsyncIterator[SlackStandIn]:
    async with SlackStandIn(signing_secret=SECRET, bot_token=TOKEN, bot_url=receiver.url) as standin:
        yield standin


@pytest.fixture
def client(slack: SlackStandIn) -> AsyncWebClient:
    return AsyncWebClient(token=TOKEN, base_url=slack.api_url)


# ---- sending to the bot ----------------------------------------------------------------------------------


async def test_event_callback_is_signed_and_shaped_like_slack(
    slack: SlackStandIn, receiver: Receiver
) -> None:
    assert slack.api_url.startswith("http://127.0.0.1:") and slack.api_url.endswith("/api/")
    event = slack.message_event("C0SUPPORT", "U0CUSTOMER", "refund <@U0BOT> &amp; <https://x.example|link>")
    result = await slack.send_event(event)

    assert result.status == 200 and result.elapsed > 0 and result.acked_in_time
    [got] = receiver.received
    assert got.valid
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Slack-Signature"] == compute_signature(
        SECRET, got.headers["X-Slack-Request-Timestamp"], got.body
    )
    envelope = got.json()
    assert envelope == result.payload
    assert set(envelope) == {
        "token", "team_id", "context_team_id", "context_enterprise_id", "api_app_id", "event", "type",
        "event_id", "event_time", "authorizations", "is_ext_shared_channel", "event_context",
    }  # fmt: skip
    assert envelope["type"] == "event_callback" and envelope["team_id"] == "T0001"
    assert envelope["event_id"].startswith("Ev") and isinstance(envelope["event_time"], int)
    assert envelope["authorizations"] == [
        {"enterprise_id": None, "team_id": "T0001", "user_id": "U0BOT", "is_bot": True,
         "is_enterprise_install": False}
    ]  # fmt: skip
    assert envelope["is_ext_shared_channel"] is False and envelope["event_context"].startswith("4-")
    message = envelope["event"]
    assert {"type", "channel", "user", "text", "ts", "event_ts", "channel_type", "client_msg_id", "team",
            "blocks"} <= set(message)  # fmt: skip
    assert message["ts"] == message["event_ts"] and message["channel_type"] == "channel"
    assert int(float(message["ts"])) == envelope["event_time"]
    [section] = message["blocks"][0]["elements"]
    assert section["elements"] == [
        {"type": "text", "text": "refund "},
        {"type": "user", "user_id": "U0BOT"},
        {"type": "text", "text": " & "},
        {"type": "link", "url": "https://x.example", "text": "link"},
    ]


@pytest.mark.parametrize(
    ("options", "valid"),
    [
        ({}, True),
        ({"timestamp": int(time.time()) - 600}, False),  # stale: Slack's window is 5 minutes
        ({"bad_signature": True}, False),
        ({"signature": "v0=deadbeef"}, False),
        ({"unsigned": True}, False),
    ],
)
async def test_signature_options(
    slack: SlackStandIn, receiver: Receiver, options: dict[str, Any], valid: bool
) -> None:
    result = await slack.send_event(slack.message_event(text="hi"), **options)
    assert receiver.received[0].valid is valid
    assert result.status == (200 if valid else 401)


async def test_retries_carry_headers_and_the_same_event_id(slack: SlackStandIn, receiver: Receiver) -> None:
    first = await slack.send_event(slack.message_event(text="hi"), event_id="Ev0000000001")
    again = await slack.send_envelope(first.payload, retry_num=1)
    await slack.send_envelope(first.payload, retry_num=2, retry_reason="http_error")
    original, retry, second_retry = receiver.received
    assert "X-Slack-Retry-Num" not in original.headers
    assert (retry.headers["X-Slack-Retry-Num"], retry.headers["X-Slack-Retry-Reason"]) == (
        "1",
        "http_timeout",
    )
    assert (second_retry.headers["X-Slack-Retry-Num"], second_retry.headers["X-Slack-Retry-Reason"]) == (
        "2",
        "http_error",
    )
    assert retry.valid and retry.json()["event_id"] == original.json()["event_id"] == "Ev0000000001"
    assert again.payload is first.payload


async def test_elapsed_measures_the_ack(slack: SlackStandIn, receiver: Receiver) -> None:
    receiver.delay = 0.2
    result = await slack.send_event(slack.message_event(text="slow"))
    assert 0.2 <= result.elapsed < 2 and result.acked_in_time


async def test_url_verification(slack: SlackStandIn, receiver: Receiver) -> None:
    receiver.reply = lambda got: web.json_response({"challenge": got.json()["challenge"]})
    result = await slack.send_url_verification("3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P")
    assert receiver.received[0].json() == {
        "token": "verification-token",
        "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
        "type": "url_verification",
    }
    assert result.json() == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}


async def test_event_builders(slack: SlackStandIn) -> None:
    slack.add_user("U0ANNA", "anna", real_name="Anna Example")
    original = slack.message_event("C0SUPPORT", "U0ANNA", "it crashed")
    reply = slack.message_event("C0SUPPORT", "U0BOB", "me too", thread_ts=original["ts"])
    assert reply["thread_ts"] == original["ts"] and reply["parent_user_id"] == "U0ANNA"
    assert float(reply["ts"]) > float(original["ts"])

    changed = slack.message_changed_event("C0SUPPORT", original["ts"], "it crashed twice")
    assert (changed["type"], changed["subtype"], changed["hidden"]) == ("message", "message_changed", True)
    assert changed["message"]["ts"] == original["ts"] and changed["message"]["text"] == "it crashed twice"
    assert changed["message"]["edited"] == {"user": "U0ANNA", "ts": changed["event_ts"]}
    assert changed["previous_message"]["text"] == "it crashed"

    deleted = slack.message_deleted_event("C0SUPPORT", original["ts"])
    assert deleted["subtype"] == "message_deleted" and deleted["deleted_ts"] == original["ts"]
    assert deleted["previous_message"]["text"] == "it crashed twice"
    assert slack.message("C0SUPPORT", original["ts"]) is None

    join = slack.channel_join_event("C0SUPPORT", "U0ANNA", inviter="U0BOB")
    assert (join["subtype"], join["text"], join["inviter"]) == (
        "channel_join",
        "<@U0ANNA|anna> has joined the channel",
        "U0BOB",
    )
    bot = slack.bot_message_event("C0SUPPORT", "deploy finished")
    assert bot["subtype"] == "bot_message" and bot["bot_id"] == "B0OTHER" and "user" not in bot
    other_app = slack.message_event("C0SUPPORT", "U0OTHERBOT", "beep", bot_id="B0OTHER")
    assert other_app["bot_id"] == "B0OTHER" and "client_msg_id" not in other_app

    added = slack.reaction_added_event("U0BOB", "thumbsup", "C0SUPPORT", reply["ts"])
    assert added == {
        "type": "reaction_added",
        "user": "U0BOB",
        "reaction": "thumbsup",
        "item_user": "U0BOB",
        "item": {"type": "message", "channel": "C0SUPPORT", "ts": reply["ts"]},
        "event_ts": added["event_ts"],
    }
    removed = slack.reaction_removed_event("U0BOB", "thumbsup", "C0SUPPORT", reply["ts"], item_user="U0X")
    assert removed["type"] == "reaction_removed" and removed["item_user"] == "U0X"

    mention = slack.app_mention_event("C0SUPPORT", "U0ANNA", "classify this")
    assert mention["type"] == "app_mention" and mention["text"] == "<@U0BOT> classify this"
    assert mention["blocks"][0]["elements"][0]["elements"][0] == {"type": "user", "user_id": "U0BOT"}

    invited = slack.member_joined_channel_event("C0NEW", "U0BOT", inviter="U0ANNA")
    assert invited["channel_type"] == "C" and slack.channel("C0NEW")["is_member"]
    slack.add_channel("D0DM", user="U0ANNA")
    assert slack.message_event("D0DM", "U0ANNA", "psst")["channel_type"] == "im"

    envelope = slack.event_envelope(added)
    assert envelope["event"]["event_ts"] == added["event_ts"]


async def test_slash_command_form_and_response_url(slack: SlackStandIn, receiver: Receiver) -> None:
    receiver.reply = lambda got: web.json_response({"response_type": "ephemeral", "text": "Classifying…"})
    result = await slack.send_command(
        "/classify", "my invoice is wrong", user_id="U0ANNA", channel_id="C0SUPPORT"
    )
    got = receiver.received[0]
    assert got.valid and got.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = got.form()
    assert list(form) == [
        "token", "team_id", "team_domain", "channel_id", "channel_name", "user_id", "user_name", "command",
        "text", "api_app_id", "is_enterprise_install", "response_url", "trigger_id",
    ]  # fmt: skip
    assert form == result.payload
    assert (form["command"], form["text"], form["user_id"], form["channel_id"], form["team_id"]) == (
        "/classify",
        "my invoice is wrong",
        "U0ANNA",
        "C0SUPPORT",
        "T0001",
    )
    assert form["is_enterprise_install"] == "false" and form["api_app_id"] == "A0APP"
    assert form["response_url"].startswith(f"{slack.response_url_base}/commands/")
    assert result.json()["text"] == "Classifying…"

    enterprise = await slack.send_command("/classify", "x", enterprise_id="E0001")
    assert enterprise.payload["enterprise_id"] == "E0001" and "enterprise_name" in enterprise.payload

    webhook = AsyncWebhookClient(form["response_url"])
    answer = await webhook.send(text="*billing* (0.93)", response_type="in_channel")
    assert answer.status_code == 200 and json.loads(answer.body) == {"ok": True}
    [posted] = await slack.wait_for_response(response_url=form["response_url"])
    assert posted.kind == "commands" and posted.text == "*billing* (0.93)"
    assert posted.body["response_type"] == "in_channel"
    assert posted.context == {"command": "/classify", "channel_id": "C0SUPPORT", "user_id": "U0ANNA"}

    for _ in range(4):
        assert (await webhook.send(text="again")).status_code == 200
    used_up = await webhook.send(text="one too many")  # Slack allows 5 posts per response_url
    assert used_up.status_code == 404 and json.loads(used_up.body)["error"] == "used_url"


async def test_block_actions_payload_from_the_bots_message(
    slack: SlackStandIn, receiver: Receiver, client: AsyncWebClient
) -> None:
    posted = await client.chat_postMessage(
        channel="C0SUPPORT", text="billing (0.93)", blocks=FIX_LABELS_BLOCKS
    )
    result = await slack.send_block_actions(
        [button_action("fix_labels"), select_action("label", "bug")],
        user_id="U0ANNA",
        channel_id="C0SUPPORT",
        message_ts=posted["ts"],
    )
    got = receiver.received[0]
    assert got.valid and got.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert list(got.form()) == ["payload"]
    payload = got.payload()
    assert payload == result.payload
    assert payload["type"] == "block_actions"
    assert payload["user"] == {"id": "U0ANNA", "username": "u0anna", "name": "u0anna", "team_id": "T0001"}
    assert payload["container"] == {
        "type": "message",
        "message_ts": posted["ts"],
        "channel_id": "C0SUPPORT",
        "is_ephemeral": False,
    }
    assert payload["team"] == {"id": "T0001", "domain": "triage-test"}
    assert payload["channel"] == {"id": "C0SUPPORT", "name": "c0support"}
    assert payload["enterprise"] is None and payload["is_enterprise_install"] is False
    assert payload["message"]["ts"] == posted["ts"] and payload["message"]["blocks"] == FIX_LABELS_BLOCKS
    assert payload["message"]["bot_id"] == "B0BOT" and payload["state"] == {"values": {}}
    assert payload["trigger_id"] and payload["api_app_id"] == "A0APP" and payload["token"]
    button, select = payload["actions"]
    assert button == {
        "type": "button",
        "action_id": "fix_labels",
        "block_id": "feedback",
        "text": {"type": "plain_text", "text": "Fix labels"},
        "value": "msg-42",
        "action_ts": button["action_ts"],
    }
    assert select["type"] == "static_select" and select["block_id"] == "feedback"
    assert select["selected_option"] == {"text": {"type": "plain_text", "text": "Bug"}, "value": "bug"}
    assert "value" not in select and float(select["action_ts"]) > 0

    # replace_original through the response_url rewrites the stored message, as Slack would.
    webhook = AsyncWebhookClient(payload["response_url"])
    await webhook.send(text="Saved: bug", replace_original=True)
    [response] = await slack.wait_for_response(predicate=lambda r: r.kind == "actions")
    assert response.context["message_ts"] == posted["ts"]
    assert slack.message("C0SUPPORT", posted["ts"])["text"] == "Saved: bug"  # type: ignore[index]


async def test_ephemeral_block_actions_have_no_message(slack: SlackStandIn, receiver: Receiver) -> None:
    result = await slack.send_block_actions(
        [button_action("undo", "1", block_id="b1")], message_ts="1700000000.000100", is_ephemeral=True
    )
    assert "message" not in result.payload and result.payload["container"]["is_ephemeral"] is True
    assert result.payload["actions"][0]["block_id"] == "b1"


async def test_modal_open_action_and_submission(
    slack: SlackStandIn, receiver: Receiver, client: AsyncWebClient
) -> None:
    command = await slack.send_command("/classify", "fix")
    opened = await client.views_open(trigger_id=command.payload["trigger_id"], view=FIX_LABELS_MODAL)
    view = opened["view"]
    assert view["id"].startswith("V") and view["callback_id"] == "fix_labels_modal"
    assert view["private_metadata"] == '{"message": "msg-42"}' and view["state"] == {"values": {}}
    assert view["root_view_id"] == view["id"] and view["blocks"] == FIX_LABELS_MODAL["blocks"]

    in_view = await slack.send_block_actions([select_action("topic", "billing")], view_id=view["id"])
    assert in_view.payload["container"] == {"type": "view", "view_id": view["id"]}
    assert in_view.payload["actions"][0]["block_id"] == "topic_block"

    updated = await client.views_update(view_id=view["id"], view=FIX_LABELS_MODAL, hash=view["hash"])
    assert updated["view"]["id"] == view["id"]
    with pytest.raises(SlackApiError) as stale:
        await client.views_update(view_id=view["id"], view=FIX_LABELS_MODAL, hash=view["hash"])
    assert stale.value.response["error"] == "hash_conflict"

    receiver.received.clear()
    result = await slack.send_view_submission({"topic": "bug", "note": "was a crash"}, user_id="U0ANNA")
    payload = receiver.received[0].payload()
    assert payload == result.payload
    assert payload["type"] == "view_submission" and payload["response_urls"] == []
    assert payload["user"]["id"] == "U0ANNA" and payload["team"]["id"] == "T0001"
    submitted = payload["view"]
    assert submitted["id"] == view["id"] and submitted["callback_id"] == "fix_labels_modal"
    assert submitted["private_metadata"] == '{"message": "msg-42"}'
    assert submitted["state"]["values"] == {
        "topic_block": {
            "topic": {
                "type": "static_select",
                "selected_option": {"text": {"type": "plain_text", "text": "Bug"}, "value": "bug"},
            }
        },
        "note_block": {"note": {"type": "plain_text_input", "value": "was a crash"}},
    }
    with pytest.raises(KeyError):
        await slack.send_view_submission({"nope": "x"})


async def test_trigger_ids_are_checked(slack: SlackStandIn, client: AsyncWebClient) -> None:
    with pytest.raises(SlackApiError) as unknown:
        await client.views_open(trigger_id="123.456.abc", view=FIX_LABELS_MODAL)
    assert unknown.value.response["error"] == "invalid_trigger_id"
    slack.trigger_id_ttl = 0.05
    command = await slack.send_command()
    await asyncio.sleep(0.1)
    with pytest.raises(SlackApiError) as expired:
        await client.views_open(trigger_id=command.payload["trigger_id"], view=FIX_LABELS_MODAL)
    assert expired.value.response["error"] == "expired_trigger_id"


async def test_echo_bot_messages(receiver: Receiver) -> None:
    async with SlackStandIn(signing_secret=SECRET, bot_token=TOKEN, bot_url=receiver.url,
                            echo_bot_messages=True) as slack:  # fmt: skip
        client = AsyncWebClient(token=TOKEN, base_url=slack.api_url)
        posted = await client.chat_postMessage(channel="C0SUPPORT", text="billing")
        for _ in range(100):
            if receiver.received:
                break
            await asyncio.sleep(0.01)
    event = receiver.received[0].json()["event"]
    assert (event["type"], event["bot_id"], event["user"], event["ts"]) == (
        "message",
        "B0BOT",
        "U0BOT",
        posted["ts"],
    )
    assert "subtype" not in event and not slack.echo_errors


# ---- Web API -----------------------------------------------------------------------------------------------


async def test_web_api_response_shapes(slack: SlackStandIn, client: AsyncWebClient) -> None:
    auth = await client.auth_test()
    assert auth.data == {
        "ok": True,
        "url": "https://triage-test.slack.com/",
        "team": "Triage Test",
        "user": "triage",
        "team_id": "T0001",
        "user_id": "U0BOT",
        "bot_id": "B0BOT",
        "is_enterprise_install": False,
    }
    first = await client.chat_postMessage(channel="C0SUPPORT", text="one")
    second = await client.chat_postMessage(channel="C0SUPPORT", text="two", thread_ts=first["ts"])
    assert first["ok"] and first["channel"] == "C0SUPPORT" and first["ts"] != second["ts"]
    assert first["message"]["text"] == "one" and first["message"]["bot_id"] == "B0BOT"
    assert first["message"]["user"] == "U0BOT" and second["message"]["thread_ts"] == first["ts"]
    [call, _] = slack.calls_to("chat.postMessage")
    assert call.args == {"channel": "C0SUPPORT", "text": "one"} and call.ok
    assert call.headers["Authorization"] == f"Bearer {TOKEN}" and call.http_method == "POST"

    updated = await client.chat_update(channel="C0SUPPORT", ts=first["ts"], text="one (edited)")
    assert (updated["channel"], updated["ts"], updated["text"]) == ("C0SUPPORT", first["ts"], "one (edited)")
    assert updated["message"]["text"] == "one (edited)"
    user_message = slack.message_event("C0SUPPORT", DEFAULT_USER_ID, "hello")
    with pytest.raises(SlackApiError) as not_ours:
        await client.chat_update(channel="C0SUPPORT", ts=user_message["ts"], text="x")
    assert not_ours.value.response["error"] == "cant_update_message"

    ephemeral = await client.chat_postEphemeral(channel="C0SUPPORT", user=DEFAULT_USER_ID, text="only you")
    assert set(ephemeral.data) == {"ok", "message_ts"}

    link = await client.chat_getPermalink(channel="C0SUPPORT", message_ts=second["ts"])
    assert link["channel"] == "C0SUPPORT"
    assert link["permalink"] == (
        f"https://triage-test.slack.com/archives/C0SUPPORT/p{second['ts'].replace('.', '')}"
        f"?thread_ts={first['ts']}&cid=C0SUPPORT"
    )

    assert (
        await client.reactions_add(channel="C0SUPPORT", timestamp=user_message["ts"], name="eyes")
    ).data == {"ok": True}
    with pytest.raises(SlackApiError) as twice:
        await client.reactions_add(channel="C0SUPPORT", timestamp=user_message["ts"], name="eyes")
    assert twice.value.response["error"] == "already_reacted"

    slack.add_user("U0ANNA", "anna", real_name="Anna Example", display_name="Anna")
    user = (await client.users_info(user="U0ANNA"))["user"]
    assert (user["id"], user["name"], user["is_bot"]) == ("U0ANNA", "anna", False)
    assert user["profile"]["display_name"] == "Anna" and user["profile"]["real_name"] == "Anna Example"
    assert (await client.users_info(user="U0BOT"))["user"]["is_bot"] is True
    assert (user["team_id"], user["is_restricted"], user["is_ultra_restricted"]) == ("T0001", False, False)
    slack.add_user("U0GUEST", is_ultra_restricted=True)  # a single-channel guest is restricted too
    slack.add_user("U0PARTNER", team_id="T0OTHER", deleted=True)
    guest = (await client.users_info(user="U0GUEST"))["user"]
    assert (guest["team_id"], guest["is_restricted"], guest["is_ultra_restricted"]) == ("T0001", True, True)
    partner = (await client.users_info(user="U0PARTNER"))["user"]
    assert (partner["team_id"], partner["profile"]["team"], partner["deleted"]) == ("T0OTHER",) * 2 + (True,)
    customer = (await client.users_info(user=DEFAULT_USER_ID))["user"]  # the default user: a customer
    assert customer["team_id"] == "T0CUSTOMER" != slack.team_id
    slack.add_usergroup("S0SUPPORT", ["U0ANNA", "W0GRID"])
    assert (await client.usergroups_users_list(usergroup="S0SUPPORT"))["users"] == ["U0ANNA", "W0GRID"]
    with pytest.raises(SlackApiError) as unknown:
        await client.usergroups_users_list(usergroup="S0NOSUCH")
    assert unknown.value.response["error"] == "no_such_subteam"

    slack.add_channel("C0QUIET", "quiet", is_member=False)
    channel = (await client.conversations_info(channel="C0QUIET"))["channel"]
    assert (channel["id"], channel["name"], channel["is_channel"], channel["is_member"]) == (
        "C0QUIET",
        "quiet",
        True,
        False,
    )
    with pytest.raises(SlackApiError) as outside:
        await client.chat_postMessage(channel="C0QUIET", text="hi")
    assert outside.value.response["error"] == "not_in_channel"

    slack.add_channel("C0CONNECT", "acme-support", shared_with=["T0ACME"])
    shared = (await client.conversations_info(channel="C0CONNECT"))["channel"]
    assert (shared["is_shared"], shared["is_ext_shared"], shared["shared_team_ids"]) == (
        True,
        True,
        [slack.team_id, "T0ACME"],
    )
    assert channel["is_ext_shared"] is False and channel["shared_team_ids"] == [slack.team_id]

    slack.add_team("T0ACME", "Acme Corp")
    acme = (await client.team_info(team="T0ACME"))["team"]
    assert (acme["id"], acme["name"], acme["domain"]) == ("T0ACME", "Acme Corp", "acme-corp")
    assert (await client.team_info())["team"]["id"] == slack.team_id  # omitted: the bot's own team
    with pytest.raises(SlackApiError) as no_team:
        await client.team_info(team="T0NOBODY")
    assert no_team.value.response["error"] == "team_not_found"

    history = await client.conversations_history(channel="C0SUPPORT")
    assert [m["text"] for m in history["messages"]] == ["hello", "one (edited)"]  # newest first, no replies
    replies = await client.conversations_replies(channel="C0SUPPORT", ts=first["ts"])
    assert [m["text"] for m in replies["messages"]] == ["one (edited)", "two"]

    # paging as Slack documents it: newest first, `limit` a page, `cursor` from response_metadata
    for i in range(5):
        slack.message_event("C0PAGED", DEFAULT_USER_ID, f"m{i}")
    pages, cursor = [], None
    while True:
        page = await client.conversations_history(channel="C0PAGED", limit=2, cursor=cursor)
        pages.append([m["text"] for m in page["messages"]])
        cursor = page["response_metadata"]["next_cursor"]
        assert page["has_more"] == bool(cursor)
        if not cursor:
            break
    assert pages == [["m4", "m3"], ["m2", "m1"], ["m0"]]
    ts = [m["ts"] for m in slack.messages_in("C0PAGED")]
    between = await client.conversations_history(channel="C0PAGED", oldest=ts[1], latest=ts[3])
    assert [m["text"] for m in between["messages"]] == ["m2"]  # exclusive ...
    both = await client.conversations_history(channel="C0PAGED", oldest=ts[1], latest=ts[3], inclusive=True)
    assert [m["text"] for m in both["messages"]] == ["m3", "m2", "m1"]  # ... unless inclusive
    member_of = await client.users_conversations(types="public_channel,private_channel", limit=1)
    assert len(member_of["channels"]) == 1 and member_of["response_metadata"]["next_cursor"]

    with pytest.raises(SlackApiError) as unknown:
        await client.api_call("nonexistent.method")
    assert unknown.value.response["error"] == "unknown_method"
    assert slack.calls[-1].method == "nonexistent.method" and slack.calls[-1].error == "unknown_method"


async def test_threads_in_history_and_replies_as_slack_documents_them(
    slack: SlackStandIn, client: AsyncWebClient
) -> None:
    """conversations.history lists parents with their thread's summary, not the replies;
    conversations.replies gives the parent first on every page, then the replies oldest first."""
    parent = slack.message_event("C0THREADS", DEFAULT_USER_ID, "Export fails")
    lone = slack.message_event("C0THREADS", DEFAULT_USER_ID, "Another question")
    replies = [
        slack.message_event("C0THREADS", user, text, thread_ts=parent["ts"])
        for user, text in [(DEFAULT_USER_ID, "r0"), ("U0AGENT", "r1"), (DEFAULT_USER_ID, "r2")]
    ]
    slack.message_changed_event("C0THREADS", lone["ts"], "Another question, edited")
    history = (await client.conversations_history(channel="C0THREADS"))["messages"]
    assert [m["ts"] for m in history] == [lone["ts"], parent["ts"]]  # no replies
    summary = {k: history[1][k] for k in ("thread_ts", "reply_count", "reply_users_count", "latest_reply")}
    assert summary == {
        "thread_ts": parent["ts"],
        "reply_count": 3,
        "reply_users_count": 2,
        "latest_reply": replies[-1]["ts"],
    }
    assert history[1]["reply_users"] == [DEFAULT_USER_ID, "U0AGENT"] and "edited" not in history[1]
    assert "reply_count" not in history[0] and history[0]["edited"]["user"] == DEFAULT_USER_ID
    assert history[0]["text"] == "Another question, edited"

    pages, cursor = [], None
    while True:
        page = await client.conversations_replies(
            channel="C0THREADS", ts=parent["ts"], limit=2, cursor=cursor
        )
        assert page["messages"][0]["ts"] == parent["ts"] and page["messages"][0]["reply_count"] == 3
        pages.append([m.get("text") for m in page["messages"][1:]])
        cursor = page["response_metadata"]["next_cursor"]
        assert page["has_more"] == bool(cursor)
        if not cursor:
            break
    assert pages == [["r0", "r1"], ["r2"]]
    since = await client.conversations_replies(
        channel="C0THREADS", ts=replies[1]["ts"], oldest=replies[0]["ts"]
    )
    assert [m["text"] for m in since["messages"]] == ["Export fails", "r1", "r2"]  # ts may name a reply
    both = await client.conversations_replies(
        channel="C0THREADS", ts=parent["ts"], oldest=replies[0]["ts"], latest=replies[1]["ts"], inclusive=True
    )
    assert [m["text"] for m in both["messages"]] == ["Export fails", "r0", "r1"]
    slack.thread_parent_deleted_event("C0THREADS", parent["ts"])  # a parent with replies: a tombstone stays
    [_, tombstone] = (await client.conversations_history(channel="C0THREADS"))["messages"]
    assert (tombstone["subtype"], tombstone["reply_count"], tombstone["user"]) == (
        "tombstone",
        3,
        "USLACKBOT",
    )
    alone = await client.conversations_replies(channel="C0THREADS", ts=lone["ts"])
    assert [m["ts"] for m in alone["messages"]] == [lone["ts"]]  # no replies: just the message
    for bad, error in [
        ({"ts": "1.000001"}, "thread_not_found"),
        ({"ts": parent["ts"], "cursor": "x"}, "invalid_cursor"),
    ]:
        with pytest.raises(SlackApiError) as refused:
            await client.conversations_replies(channel="C0THREADS", **bad)
        assert refused.value.response["error"] == error


async def test_arguments_from_query_form_and_json(slack: SlackStandIn) -> None:
    url = f"{slack.api_url}chat.postMessage"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "hi"}}]
    async with aiohttp.ClientSession() as http:
        form = {"token": TOKEN, "channel": "C0SUPPORT", "blocks": json.dumps(blocks)}
        async with http.post(url, data=form) as response:
            assert (await response.json())["ok"]
        async with http.get(url, params={"channel": "C0SUPPORT", "text": "q"}, headers=bearer) as response:
            assert (await response.json())["ok"]
        async with http.post(
            url + "?channel=C0SUPPORT", json={"text": "j", "blocks": blocks}, headers=bearer
        ) as r:
            assert (await r.json())["ok"] and r.headers["Content-Type"].startswith("application/json")
        async with http.post(url, json={"token": TOKEN, "channel": "C0SUPPORT", "text": "x"}) as response:
            assert await response.json() == {"ok": False, "error": "not_authed"}  # JSON needs the header
        async with http.post(url, data={"channel": "C0SUPPORT", "text": "x"}) as response:
            assert await response.json() == {"ok": False, "error": "not_authed"}
        wrong = {"Authorization": "Bearer xoxb-wrong"}
        async with http.post(url, data={"channel": "C0SUPPORT", "text": "x"}, headers=wrong) as response:
            assert await response.json() == {"ok": False, "error": "invalid_auth"}
    form_call, get_call, json_call, *_ = slack.calls_to("chat.postMessage")
    assert form_call.args["blocks"] == blocks and form_call.args["token"] == TOKEN  # JSON string decoded
    assert get_call.http_method == "GET" and get_call.args == {"channel": "C0SUPPORT", "text": "q"}
    assert json_call.args == {"channel": "C0SUPPORT", "text": "j", "blocks": blocks}
    assert [c.error for c in slack.calls_to("chat.postMessage")[3:]] == [
        "not_authed",
        "not_authed",
        "invalid_auth",
    ]


async def test_file_upload_v2_end_to_end(slack: SlackStandIn, client: AsyncWebClient) -> None:
    result = await client.files_upload_v2(
        channel="C0SUPPORT", content="text,label\nhi,bug\n", filename="report.csv", title="Weekly report",
        initial_comment="here you go",
    )  # fmt: skip
    file_id = result["file"]["id"]
    assert result["files"] == [{"id": file_id, "title": "Weekly report"}]
    uploaded = slack.files[file_id]
    assert uploaded.content == b"text,label\nhi,bug\n" and uploaded.filename == "report.csv"
    assert (
        uploaded.completed
        and uploaded.channel_id == "C0SUPPORT"
        and uploaded.initial_comment == "here you go"
    )
    assert [c.method for c in slack.calls] == ["files.getUploadURLExternal", "files.completeUploadExternal"]


async def test_wait_for(slack: SlackStandIn, client: AsyncWebClient) -> None:
    async def reply_later() -> None:
        await asyncio.sleep(0.05)
        await client.chat_postMessage(channel="C0SUPPORT", text="first")
        await client.chat_postMessage(channel="C0OTHER", text="second")

    task = asyncio.create_task(reply_later())
    calls = await slack.wait_for("chat.postMessage", predicate=lambda c: c.args["channel"] == "C0OTHER")
    assert [c.args["text"] for c in calls] == ["second"]
    assert len(await slack.wait_for("chat.postMessage", count=2, timeout=1)) == 2
    await task
    with pytest.raises(WaitTimeout, match=r"chat\.postMessage -> 200 ok"):
        await slack.wait_for("chat.update", timeout=0.05)
    with pytest.raises(WaitTimeout):
        await slack.wait_for_response(timeout=0.05)


# ---- fault injection ---------------------------------------------------------------------------------------


async def test_fail_next_rate_limits_once(slack: SlackStandIn, client: AsyncWebClient) -> None:
    fault = slack.fail_next("chat.postMessage", retry_after=7)
    with pytest.raises(SlackApiError) as limited:
        await client.chat_postMessage(channel="C0SUPPORT", text="hi")
    response = limited.value.response
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert response.data == {"ok": False, "error": "ratelimited"}
    assert (await client.chat_postMessage(channel="C0SUPPORT", text="hi"))["ok"]
    assert fault.hits == 1 and fault.remaining == 0
    assert [c.status for c in slack.calls_to("chat.postMessage")] == [429, 200]


async def test_fail_next_server_error_and_ok_false(slack: SlackStandIn, client: AsyncWebClient) -> None:
    slack.fail_next("chat.postMessage", status=500)
    slack.fail_next("chat.postMessage", error="channel_not_found")
    with pytest.raises(SlackApiError) as server_error:
        await client.chat_postMessage(channel="C0SUPPORT", text="hi")
    assert server_error.value.response.status_code == 500
    assert server_error.value.response["error"] == "internal_error"
    with pytest.raises(SlackApiError) as not_found:
        await client.chat_postMessage(channel="C0SUPPORT", text="hi")
    assert not_found.value.response.status_code == 200
    assert not_found.value.response.data == {"ok": False, "error": "channel_not_found"}
    assert (await client.chat_postMessage(channel="C0SUPPORT", text="hi"))["ok"]


async def test_fault_counts_and_predicates(slack: SlackStandIn, client: AsyncWebClient) -> None:
    async def outcome(call: Awaitable[Any]) -> str:
        try:
            await call
        except SlackApiError as exc:
            return str(exc.response["error"])
        return "ok"

    slack.fail_next("reactions.add", error="missing_scope", count=2)
    results = [
        await outcome(client.reactions_add(channel="C1", timestamp=f"1.{i}", name="x")) for i in range(3)
    ]
    assert results == ["missing_scope", "missing_scope", "ok"]

    slack.fail_next("*", status=503, count=None, predicate=lambda args: args.get("channel") == "C0DOWN")
    for _ in range(3):
        assert await outcome(client.chat_postMessage(channel="C0DOWN", text="x")) == "internal_error"
    assert await outcome(client.chat_postMessage(channel="C0UP", text="x")) == "ok"
    slack.clear_faults()
    assert await outcome(client.chat_postMessage(channel="C0DOWN", text="x")) == "ok"


async def test_slack_sdk_retry_handler_recovers_from_injected_429(slack: SlackStandIn) -> None:
    retrying = AsyncWebClient(
        token=TOKEN,
        base_url=slack.api_url,
        retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)],
    )
    slack.fail_next("chat.postMessage", retry_after=0)
    assert (await retrying.chat_postMessage(channel="C0SUPPORT", text="hi"))["ok"]
    assert [c.status for c in slack.calls_to("chat.postMessage")] == [429, 200]


async def test_channel_rate_limit(slack: SlackStandIn, client: AsyncWebClient) -> None:
    slack.limit_channel_rate(per_second=1.0, retry_after=2)
    assert (await client.chat_postMessage(channel="C0SUPPORT", text="1"))["ok"]
    with pytest.raises(SlackApiError) as limited:
        await client.chat_postMessage(channel="C0SUPPORT", text="2")
    assert limited.value.response.status_code == 429 and limited.value.response.headers["Retry-After"] == "2"
    assert (await client.chat_postMessage(channel="C0ELSEWHERE", text="3"))["ok"]
    slack.limit_channel_rate(None)
    assert (await client.chat_postMessage(channel="C0SUPPORT", text="4"))["ok"]


async def test_response_url_faults(slack: SlackStandIn, receiver: Receiver) -> None:
    command = await slack.send_command()
    slack.fail_next("response_url", status=500)
    webhook = AsyncWebhookClient(command.payload["response_url"])
    assert (await webhook.send(text="x")).status_code == 500
    assert (await webhook.send(text="x")).status_code == 200
    assert [r.status for r in slack.responses] == [500, 200]


async def test_api_latency_and_fault_delay(slack: SlackStandIn, client: AsyncWebClient) -> None:
    slack.fail_next("auth.test", error="fatal_error", delay=0.1)
    started = time.perf_counter()
    with pytest.raises(SlackApiError):
        await client.auth_test()
    assert time.perf_counter() - started >= 0.1


# ---- a real Bolt app against the stand-in ------------------------------------------------------------------


async def test_bolt_app_accepts_what_the_stand_in_sends(slack: SlackStandIn) -> None:
    """Bolt verifies the signatures, parses every payload kind and answers through the stand-in's Web API."""
    bolt = AsyncApp(client=AsyncWebClient(token=TOKEN, base_url=slack.api_url), signing_secret=SECRET)
    submitted: list[dict[str, Any]] = []

    @bolt.event("message")
    async def on_message(event: dict[str, Any], say: AsyncSay) -> None:
        await say(text=f"classified: {event['text']}", thread_ts=event["ts"])

    @bolt.command("/classify")
    async def on_command(ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond) -> None:
        await ack()
        await respond(f"classified: {command['text']}")

    @bolt.action("fix_labels")
    async def on_fix(ack: AsyncAck, body: dict[str, Any], client: AsyncWebClient) -> None:
        await ack()
        await client.views_open(trigger_id=body["trigger_id"], view=FIX_LABELS_MODAL)

    @bolt.view("fix_labels_modal")
    async def on_submit(ack: AsyncAck, view: dict[str, Any]) -> None:
        await ack()
        submitted.append(view["state"]["values"])

    runner, port = await serve(bolt.web_app(path="/slack/events"))
    slack.bot_url = f"http://127.0.0.1:{port}/slack/events"
    try:
        event = slack.message_event(DEFAULT_CHANNEL_ID, DEFAULT_USER_ID, "charged twice")
        assert (await slack.send_event(event)).status == 200
        [reply] = await slack.wait_for("chat.postMessage")
        assert (reply.args["channel"], reply.args["text"], reply.args["thread_ts"]) == (
            DEFAULT_CHANNEL_ID,
            "classified: charged twice",
            event["ts"],
        )
        assert slack.calls_to("auth.test")  # Bolt's single-workspace authorization

        assert (await slack.send_command("/classify", "refund please")).status == 200
        [response] = await slack.wait_for_response()
        assert response.text == "classified: refund please"

        ts = (await AsyncWebClient(token=TOKEN, base_url=slack.api_url).chat_postMessage(
            channel=DEFAULT_CHANNEL_ID, text="billing", blocks=FIX_LABELS_BLOCKS))["ts"]  # fmt: skip
        assert (await slack.send_block_actions([button_action("fix_labels")], message_ts=ts)).status == 200
        [opened] = await slack.wait_for("views.open", predicate=lambda c: c.ok)
        assert opened.args["view"]["callback_id"] == "fix_labels_modal"

        assert (await slack.send_view_submission({"topic": "bug", "note": "crash"})).status == 200
        assert submitted[0]["topic_block"]["topic"]["selected_option"]["value"] == "bug"

        assert (await slack.send_event(event, bad_signature=True)).status == 401
        stale = await slack.send_event(event, timestamp=int(time.time()) - 3600)
        assert stale.status == 401
    finally:
        await runner.cleanup()


async def test_app_home_opened_carries_the_published_home_and_publish_takes_home_views_only(
    slack: SlackStandIn, client: AsyncWebClient
) -> None:
    first = slack.app_home_opened_event("U0AGENT")
    assert (first["type"], first["user"], first["tab"]) == ("app_home_opened", "U0AGENT", "home")
    assert first["channel"].startswith("D") and "view" not in first  # nothing published yet
    home = {"type": "home", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "hi"}}]}
    published = await client.views_publish(user_id="U0AGENT", view=home)
    again = slack.app_home_opened_event("U0AGENT")
    assert again["view"]["id"] == published["view"]["id"] and again["view"]["type"] == "home"
    assert again["channel"] == first["channel"]
    assert "view" not in slack.app_home_opened_event("U0AGENT", tab="messages")
    with pytest.raises(SlackApiError, match="invalid_arguments"):
        await client.views_publish(user_id="U0AGENT", view={**home, "type": "modal"})
    with pytest.raises(SlackApiError, match="invalid_arguments"):
        await client.views_publish(user_id="U0AGENT", view={**home, "blocks": home["blocks"] * 101})
