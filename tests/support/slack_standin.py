"""A Slack stand-in for the bot's tests: one real aiohttp server on 127.0.0.1 that plays both sides of Slack.

slack.com is unreachable from the test machines, so instead of mocking slack_sdk the tests point the bot at
this server and talk HTTP, exactly as Slack would:

* towards the bot it sends signed Events API callbacks, slash commands and interactivity payloads
  (``send_event``, ``send_command``, ``send_block_actions``, ``send_view_submission``) and reports the
  bot's ack (status, headers, body, elapsed time);
* towards the bot's Web API client it serves ``{api_url}{method}`` with Slack's response shapes, records
  every call (``calls``, ``calls_to``, ``wait_for``) and injects faults on demand (``fail_next``);
* it serves the ``response_url`` hooks and the file upload URLs it hands out, and records what arrives.

    async with SlackStandIn(bot_url="http://127.0.0.1:3000/slack/events") as slack:
        client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
        await slack.send_event(slack.message_event("C0SUPPORT", "U0CUSTOMER", "I was charged twice"))
        [reply] = await slack.wait_for("chat.postMessage")

Payload shapes follow Slack's documented formats (Events API envelope, slash command form fields,
``block_actions`` / ``view_submission`` payloads, Web API responses). State (users, channels, messages,
views, files) lives in plain dicts so tests can seed and inspect it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import hmac
import inspect
import json
import re
import secrets
import string
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

JSON = dict[str, Any]

DEFAULT_USER_ID = "U0CUSTOMER"  # a customer: a user of another organization (Slack Connect)
CUSTOMER_TEAM_ID = "T0CUSTOMER"
DEFAULT_CHANNEL_ID = "C0SUPPORT"
SLACK_USER_AGENT = "Slackbot 1.0 (+https://api.slack.com/robots)"
MAX_VIEW_BLOCKS = 100  # a modal's or Home tab's blocks
SLACK_ACK_TIMEOUT_S = 3.0  # Slack gives up on (and later retries) a request not acked within 3 seconds

_ALNUM = string.ascii_uppercase + string.digits
# Arguments that Slack takes as JSON: slack_sdk sends them as objects in JSON bodies, but as strings in
# form bodies. Decoding them once makes `call.args["blocks"]` the same whichever way the bot sent them.
_JSON_ARGS = frozenset({"blocks", "attachments", "view", "files", "metadata", "unfurls", "user_auth_blocks"})
_SELECT_TYPES = frozenset({"static_select", "external_select", "overflow", "radio_buttons"})
_MULTI_SELECT_TYPES = frozenset({"multi_static_select", "multi_external_select", "checkboxes"})
_SLACK_TOKEN_RE = re.compile(r"<([@#!])?([^>|]+)(?:\|([^>]*))?>")


# --------------------------------------------------------------------------------------------------
# Pure helpers


def compute_signature(signing_secret: str, timestamp: str | int, body: bytes) -> str:
    """``v0=`` + hex HMAC-SHA256 of ``v0:{timestamp}:{body}``: Slack's request signature."""
    base = f"v0:{timestamp}:".encode() + body
    return "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()


def slack_id(prefix: str, length: int = 10) -> str:
    """A random Slack-style ID: ``slack_id("Ev")`` -> ``Ev0B7XK2M4QZ``."""
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


def plain_text(text: str) -> JSON:
    return {"type": "plain_text", "text": text, "emoji": True}


def _unescape(text: str) -> str:
    # Message text arrives in Slack's wire format (&amp; &lt; &gt;); rich_text blocks carry it unescaped.
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def rich_text_blocks(text: str) -> list[JSON]:
    """The ``rich_text`` blocks Slack attaches to a plain message, mentions and links included."""
    elements: list[JSON] = []
    position = 0
    for match in _SLACK_TOKEN_RE.finditer(text):
        if match.start() > position:
            elements.append({"type": "text", "text": _unescape(text[position : match.start()])})
        sigil, target, label = match.groups()
        if sigil == "@":
            elements.append({"type": "user", "user_id": target})
        elif sigil == "#":
            elements.append({"type": "channel", "channel_id": target})
        elif sigil == "!" and target.startswith("subteam^"):
            elements.append({"type": "usergroup", "usergroup_id": target.removeprefix("subteam^")})
        elif sigil == "!":
            elements.append({"type": "broadcast", "range": target})
        else:
            link: JSON = {"type": "link", "url": target}
            if label:
                link["text"] = label
            elements.append(link)
        position = match.end()
    if position < len(text):
        elements.append({"type": "text", "text": _unescape(text[position:])})
    if not elements:
        return []
    section = {"type": "rich_text_section", "elements": elements}
    return [{"type": "rich_text", "block_id": slack_id("", 5), "elements": [section]}]


def button_action(
    action_id: str, value: str | None = None, *, block_id: str | None = None, text: str | None = None
) -> JSON:
    """A ``button`` action for ``send_block_actions``; missing text/value/block_id come from the message."""
    action: JSON = {"type": "button", "action_id": action_id}
    if value is not None:
        action["value"] = value
    if text is not None:
        action["text"] = plain_text(text)
    if block_id is not None:
        action["block_id"] = block_id
    return action


def select_action(
    action_id: str,
    value: str,
    *,
    text: str | None = None,
    block_id: str | None = None,
    element_type: str = "static_select",
) -> JSON:
    """A select-menu action. Without ``text`` the chosen option is looked up in the message's blocks."""
    action: JSON = {"type": element_type, "action_id": action_id}
    if text is None:
        action["value"] = value  # resolved into selected_option by send_block_actions
    else:
        action["selected_option"] = {"text": plain_text(text), "value": value}
    if block_id is not None:
        action["block_id"] = block_id
    return action


def _iter_elements(blocks: Iterable[JSON]) -> Iterator[tuple[str | None, JSON]]:
    """(block_id, element) for every interactive element in actions, section and input blocks."""
    for block in blocks:
        for element in block.get("elements") or []:
            if block.get("type") == "actions":
                yield block.get("block_id"), element
        for key in ("accessory", "element"):
            if isinstance(block.get(key), dict):
                yield block.get("block_id"), block[key]


def _find_option(element: JSON, value: str) -> JSON:
    options = list(element.get("options") or [])
    for group in element.get("option_groups") or []:
        options.extend(group.get("options") or [])
    for option in options:
        if option.get("value") == value:
            return copy.deepcopy(option)
    return {"text": plain_text(value), "value": value}


def state_value(element: JSON, value: Any) -> JSON:
    """The ``state.values`` entry Slack reports for ``element`` holding ``value``."""
    kind = element.get("type", "plain_text_input")
    if kind in _SELECT_TYPES:
        return {"type": kind, "selected_option": None if value is None else _find_option(element, value)}
    if kind in _MULTI_SELECT_TYPES:
        return {"type": kind, "selected_options": [_find_option(element, v) for v in value]}
    singles = {
        "users_select": "selected_user",
        "conversations_select": "selected_conversation",
        "channels_select": "selected_channel",
        "datepicker": "selected_date",
        "timepicker": "selected_time",
    }
    multis = {
        "multi_users_select": "selected_users",
        "multi_conversations_select": "selected_conversations",
        "multi_channels_select": "selected_channels",
    }
    if kind in singles:
        return {"type": kind, singles[kind]: value}
    if kind in multis:
        return {"type": kind, multis[kind]: list(value)}
    return {"type": kind, "value": value}


def _encode_cursor(position: str) -> str:
    """An opaque page cursor in Slack's style (base64 of where the next page starts)."""
    return base64.b64encode(f"next_ts:{position}".encode()).decode()


def _decode_cursor(cursor: str) -> str:
    try:
        return base64.b64decode(cursor, validate=True).decode().removeprefix("next_ts:")
    except ValueError:
        raise ApiError("invalid_cursor") from None


def _page(
    items: list[JSON], args: JSON, *, key: str, default_limit: int, max_limit: int
) -> tuple[list[JSON], str]:
    """One page of ``items`` (already in the method's order) and the cursor of the next ("": the last).
    The cursor names the ``key`` of the next page's first item, so every paged method pages alike."""
    limit = max(1, min(int(args.get("limit") or default_limit), max_limit))
    start = 0
    if args.get("cursor"):
        position = _decode_cursor(str(args["cursor"]))
        start = next((i for i, item in enumerate(items) if str(item[key]) == position), -1)
        if start < 0:
            raise ApiError("invalid_cursor")
    page = items[start : start + limit]
    more = start + limit < len(items)
    return page, _encode_cursor(str(items[start + limit][key])) if more else ""


def _in_time_range(ts: str, args: JSON) -> bool:
    """Whether ``ts`` lies between ``oldest`` and ``latest`` (exclusive unless ``inclusive``)."""
    oldest = float(args.get("oldest") or 0)
    latest = float(args["latest"]) if args.get("latest") else float("inf")
    if _truthy(args.get("inclusive")):
        return oldest <= float(ts) <= latest
    return oldest < float(ts) < latest


def _truthy(value: Any) -> bool:
    return value in (True, 1, "1", "true", "True")


def _decode_json_args(args: JSON) -> JSON:
    for key in _JSON_ARGS & args.keys():
        value = args[key]
        if isinstance(value, str) and value[:1] in ("[", "{"):
            # A bad value stays raw: that is the bot's bug, and the test should see it as sent.
            with contextlib.suppress(json.JSONDecodeError):
                args[key] = json.loads(value)
    return args


def _parse_hook_body(raw: bytes) -> JSON:
    """A response_url body: JSON (slack_sdk, Bolt), or a form with a ``payload`` field (older clients)."""
    with contextlib.suppress(ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if not raw:
            return {}
        if raw.lstrip()[:1] in (b"{", b"["):
            body = json.loads(raw)
        else:
            form = dict(urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True))
            body = json.loads(form["payload"]) if "payload" in form else form
        return body if isinstance(body, dict) else {"_": body}
    return {"_raw": raw.decode("utf-8", errors="replace")}


class _TsClock:
    """Message timestamps: real epoch time with microsecond ticks, strictly increasing, hence unique."""

    def __init__(self) -> None:
        self._last_us = 0

    def next(self) -> str:
        self._last_us = max(int(time.time() * 1_000_000), self._last_us + 1)
        return f"{self._last_us // 1_000_000}.{self._last_us % 1_000_000:06d}"


# --------------------------------------------------------------------------------------------------
# Records


@dataclass
class ApiCall:
    """One Web API call as the stand-in received and answered it."""

    method: str
    args: JSON  # query string, form body and JSON body merged; JSON-valued args (blocks, view...) decoded
    headers: dict[str, str]
    time: float  # time.time() on arrival
    http_method: str = "POST"
    body: bytes = b""
    status: int = 0  # HTTP status answered
    response: JSON = field(default_factory=dict)  # JSON answered

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.response.get("ok"))

    @property
    def error(self) -> str | None:
        return self.response.get("error")


@dataclass
class ResponseUrlPost:
    """One POST to a ``response_url`` the stand-in handed out (slash commands, block actions)."""

    kind: str  # "commands" or "actions"
    url: str
    body: JSON  # the JSON posted (text, blocks, response_type, replace_original, ...)
    raw: bytes
    headers: dict[str, str]
    time: float
    status: int
    context: JSON  # what the URL was issued for: channel_id, user_id, command / message_ts

    @property
    def text(self) -> str | None:
        return self.body.get("text")


@dataclass
class UploadedFile:
    """A file uploaded through files.getUploadURLExternal + the upload URL + files.completeUploadExternal."""

    file_id: str
    filename: str
    length: int  # as declared to files.getUploadURLExternal
    content: bytes | None = None  # None until the upload URL received it
    title: str | None = None
    channel_id: str | None = None
    initial_comment: str | None = None
    thread_ts: str | None = None
    completed: bool = False


@dataclass
class BotResponse:
    """What the bot answered to one request the stand-in sent it."""

    status: int
    headers: CIMultiDict[str]
    body: bytes
    elapsed: float  # seconds from sending the request to having read the whole answer
    payload: JSON  # what was sent: the event envelope, the command's fields or the interactivity payload
    request_headers: dict[str, str]
    request_body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def acked_in_time(self) -> bool:
        """A 2xx within Slack's 3-second window (otherwise Slack reports a failure and retries)."""
        return 200 <= self.status < 300 and self.elapsed < SLACK_ACK_TIMEOUT_S


@dataclass
class Fault:
    """A planned failure of the Web API (or of ``"response_url"`` posts); see ``SlackStandIn.fail_next``."""

    method: str  # a method name, "*" for every method, or "response_url"
    status: int
    error: str
    retry_after: int | None
    remaining: int | None  # None: every matching call until clear_faults()
    predicate: Callable[[JSON], bool] | None = None
    delay: float = 0.0
    hits: int = 0

    def matches(self, method: str, args: JSON) -> bool:
        if self.remaining == 0 or self.method not in ("*", method):
            return False
        if self.method == "*" and method == "response_url":
            return False  # "*" means the Web API; response_url faults are asked for by name
        return self.predicate is None or self.predicate(args)

    def answer(self) -> tuple[int, JSON, dict[str, str]]:
        headers: dict[str, str] = {}
        if self.status == 429 and self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return self.status, {"ok": False, "error": self.error}, headers


class ApiError(Exception):
    """Raised by a method handler to answer ``{"ok": false, "error": error, **extra}``."""

    def __init__(self, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.error = error
        self.extra = extra


class WaitTimeout(AssertionError):
    """``wait_for`` / ``wait_for_response`` ran out of time (an AssertionError, so pytest shows the story)."""


class SendOptions(TypedDict, total=False):
    """Options every ``send_*`` method takes, for testing the bot's request verification and ack."""

    url: str  # instead of bot_url
    timestamp: int | str  # X-Slack-Request-Timestamp (and the signed one); e.g. time.time() - 600 for stale
    signature: str  # sent verbatim instead of the computed signature
    bad_signature: bool  # sign, then corrupt the signature
    unsigned: bool  # send neither signature header
    retry_num: int  # X-Slack-Retry-Num
    retry_reason: str  # X-Slack-Retry-Reason (default "http_timeout" when retry_num is set)
    headers: Mapping[str, str]  # extra or overriding headers
    timeout: float  # client-side limit in seconds (default 10)


MethodHandler = Callable[[ApiCall], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]


# --------------------------------------------------------------------------------------------------
# The stand-in


class SlackStandIn:
    """Slack, as far as the bot can tell. Use as ``async with SlackStandIn(...) as slack:``.

    Once started: ``api_url`` (``http://127.0.0.1:PORT/api/``, the bot's SLACK_API_URL / slack_sdk
    ``base_url``), ``response_url_base``, ``port``. Recordings: ``calls`` (ApiCall), ``responses``
    (ResponseUrlPost), ``sent`` (BotResponse). State: ``users``, ``channels``, ``messages``, ``views``,
    ``home_views``, ``files``, ``faults``. Knobs: ``bot_url``, ``api_latency``, ``trigger_id_ttl``,
    ``response_url_max_uses``, ``echo_bot_messages``. All of it lives on the event loop that entered it.
    """

    def __init__(
        self,
        *,
        signing_secret: str = "test-signing-secret",
        bot_token: str = "xoxb-test-token",
        team_id: str = "T0001",
        team_domain: str = "triage-test",
        team_name: str = "Triage Test",
        bot_user_id: str = "U0BOT",
        bot_id: str = "B0BOT",
        bot_name: str = "triage",
        api_app_id: str = "A0APP",
        verification_token: str = "verification-token",  # the deprecated `token` field in payloads
        bot_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        trigger_id_ttl: float | None = 3.0,  # Slack: a trigger_id opens a view within 3 s; None: no checks
        response_url_max_uses: int | None = 5,  # Slack: a response_url takes up to 5 posts
        echo_bot_messages: bool = False,  # Slack echoes the bot's own posts back as message events
    ) -> None:
        self.signing_secret = signing_secret
        self.bot_token = bot_token
        self.team_id = team_id
        self.team_domain = team_domain
        self.team_name = team_name
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.bot_name = bot_name
        self.api_app_id = api_app_id
        self.verification_token = verification_token
        self.bot_url = bot_url
        self.host = host
        self.trigger_id_ttl = trigger_id_ttl
        self.response_url_max_uses = response_url_max_uses
        self.echo_bot_messages = echo_bot_messages
        self.api_latency = 0.0  # seconds added before every Web API answer (a slow Slack)

        # Recordings.
        self.calls: list[ApiCall] = []
        self.responses: list[ResponseUrlPost] = []
        self.sent: list[BotResponse] = []
        self.echo_errors: list[BaseException] = []  # failed deliveries of echo_bot_messages
        self.errors: list[BaseException] = []  # exceptions raised by method handlers (answered as HTTP 500)
        # Workspace state, seeded by add_user / add_channel and grown by the bot's calls.
        self.users: dict[str, JSON] = {}
        self.channels: dict[str, JSON] = {}
        self.messages: dict[tuple[str, str], JSON] = {}  # (channel, ts) -> message as Slack stores it
        self.views: dict[str, JSON] = {}  # view id -> view, in the order opened
        self.home_views: dict[str, JSON] = {}  # user id -> published App Home view
        self.files: dict[str, UploadedFile] = {}
        self.faults: list[Fault] = []
        self.teams: dict[str, JSON] = {}  # team id -> team as team.info reports it

        self._port = port
        self._clock = _TsClock()
        self._triggers: dict[str, float] = {}  # trigger_id -> time.monotonic() when issued
        self._response_urls: dict[str, JSON] = {}  # url -> context (+ "uses")
        self._dm_channels: dict[str, str] = {}
        self._rate_per_second: float | None = None
        self._rate_retry_after = 1
        self._rate_methods: frozenset[str] = frozenset()
        self._rate_last: dict[tuple[str, str], float] = {}
        self._methods: dict[str, MethodHandler] = self._builtin_methods()
        # Methods that take another kind of token than the bot's (app-level xapp- tokens): method -> token.
        self.method_tokens: dict[str, str] = {}
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.api_url = ""
        self.response_url_base = ""
        self.add_team(team_id, team_name, team_domain)
        self.usergroups: dict[str, list[str]] = {}  # user group id (S…) -> member user ids
        self.add_user(bot_user_id, bot_name, is_bot=True)
        # Made-up users are members of this workspace; the default user is a customer from elsewhere.
        self.add_user(DEFAULT_USER_ID, "customer", team_id=CUSTOMER_TEAM_ID)

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024 * 1024)  # file uploads
        app.router.add_route("*", "/api/{method}", self._handle_api)
        app.router.add_post("/{kind:commands|actions}/{rest:.+}", self._handle_response_url)
        app.router.add_post("/upload/v1/{file_id}", self._handle_upload)
        self.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.port = port
        base = f"http://{host}:{port}"
        self.api_url = f"{base}/api/"  # slack_sdk appends the method name to base_url
        self.response_url_base = base
        # force_close: no keep-alive connections left behind to hold up the bot's server shutdown.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    def add_routes(self, app: web.Application) -> None:
        """Extensions serve more of Slack here (e.g. the Socket Mode WebSocket); called once by start()."""

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- workspace state ----------------------------------------------------------------------------

    def next_ts(self) -> str:
        """A fresh, unique message timestamp ("1700000000.000100" style, real epoch time)."""
        return self._clock.next()

    def add_user(
        self,
        user_id: str,
        name: str | None = None,
        *,
        real_name: str | None = None,
        display_name: str | None = None,
        is_bot: bool = False,
        email: str | None = None,
        team_id: str | None = None,
        is_restricted: bool = False,
        is_ultra_restricted: bool = False,
        deleted: bool = False,
    ) -> JSON:
        """Register a user as users.info reports it (unknown users are made up on first use).

        ``team_id``: the user's home workspace; another one is someone from another organization in a
        shared (Slack Connect) channel. Guests as Slack marks them: multi-channel ``is_restricted``,
        single-channel ``is_restricted`` and ``is_ultra_restricted``. ``deleted``: deactivated.
        """
        team_id = team_id or self.team_id
        is_restricted = is_restricted or is_ultra_restricted
        name = name or user_id.lower()
        real_name = real_name or name.replace(".", " ").title()
        display_name = name if display_name is None else display_name
        profile: JSON = {
            "title": "",
            "phone": "",
            "skype": "",
            "real_name": real_name,
            "real_name_normalized": real_name,
            "display_name": display_name,
            "display_name_normalized": display_name,
            "fields": None,
            "status_text": "",
            "status_emoji": "",
            "status_expiration": 0,
            "avatar_hash": "g" + secrets.token_hex(5),
            "first_name": (real_name.split() or [""])[0],
            "last_name": " ".join(real_name.split()[1:]),
            **{
                f"image_{size}": f"https://avatars.example/{user_id}_{size}.png"
                for size in (24, 32, 48, 72, 192)
            },
            "team": team_id,
        }
        if is_bot:
            profile.update(
                {
                    "bot_id": self.bot_id if user_id == self.bot_user_id else slack_id("B"),
                    "api_app_id": self.api_app_id,
                    "always_active": True,
                }
            )
        else:
            profile["email"] = email or f"{name}@{self.team_domain}.example"
        user: JSON = {
            "id": user_id,
            "team_id": team_id,
            "name": name,
            "deleted": deleted,
            "color": "9f69e7",
            "real_name": real_name,
            "tz": "Etc/UTC",
            "tz_label": "Coordinated Universal Time",
            "tz_offset": 0,
            "profile": profile,
            "is_admin": False,
            "is_owner": False,
            "is_primary_owner": False,
            "is_restricted": is_restricted,
            "is_ultra_restricted": is_ultra_restricted,
            "is_bot": is_bot,
            "is_app_user": False,
            "updated": int(time.time()),
            "is_email_confirmed": not is_bot,
        }
        self.users[user_id] = user
        return user

    def add_team(self, team_id: str, name: str, domain: str | None = None) -> JSON:
        """Register a workspace as team.info reports it: the bot's own, or another organization whose
        people are in a shared channel (team.info answers for those too)."""
        domain = domain or name.lower().replace(" ", "-")
        team: JSON = {
            "id": team_id,
            "name": name,
            "url": f"https://{domain}.slack.com/",
            "domain": domain,
            "email_domain": f"{domain}.example",
            "icon": {
                **{
                    f"image_{size}": f"https://avatars.example/{team_id}_{size}.png"
                    for size in (34, 44, 68, 88, 102, 132)
                },
                "image_default": True,
            },
            "avatar_base_url": "https://ca.slack-edge.com/",
            "is_verified": False,
        }
        self.teams[team_id] = team
        return team

    def add_channel(
        self,
        channel_id: str,
        name: str | None = None,
        *,
        is_private: bool | None = None,
        is_member: bool = True,
        user: str | None = None,
        shared_with: Iterable[str] = (),
    ) -> JSON:
        """Register a conversation as conversations.info reports it (unknown ones are made up on first use).

        ``shared_with``: team ids of other organizations in the channel (Slack Connect): it is then
        ``is_shared`` and ``is_ext_shared``, and ``shared_team_ids`` lists every team in it.

        IDs decide the kind, as in Slack: ``D…`` is a DM (``user`` is the other side), ``G…`` a legacy
        private channel, ``C…`` a channel (private when ``is_private``). A bot that is not a member gets
        ``not_in_channel`` (public) or ``channel_not_found`` (private) from chat.postMessage.
        """
        is_im = channel_id.startswith("D")
        is_group = channel_id.startswith("G")
        private = is_group if is_private is None else is_private
        name = name or channel_id.lower()
        others = [t for t in shared_with if t != self.team_id]
        channel: JSON = {
            "id": channel_id,
            "name": name,
            "is_channel": not (is_im or is_group),
            "is_group": is_group,
            "is_im": is_im,
            "is_mpim": False,
            "is_private": private or is_im,
            "created": 1700000000,
            "is_archived": False,
            "is_general": False,
            "unlinked": 0,
            "name_normalized": name,
            "is_shared": bool(others),
            "is_org_shared": False,
            "is_ext_shared": bool(others),
            "is_pending_ext_shared": False,
            "pending_shared": [],
            "context_team_id": self.team_id,
            "shared_team_ids": [self.team_id, *others],
            "pending_connected_team_ids": [],
            "updated": int(time.time() * 1000),
            "parent_conversation": None,
            "creator": "U0ADMIN",
            "is_member": is_member or is_im,
            **({"conversation_host_id": self.team_id} if others else {}),
            "topic": {"value": "", "creator": "", "last_set": 0},
            "purpose": {"value": "", "creator": "", "last_set": 0},
            "previous_names": [],
        }
        if is_im:
            channel["user"] = user
        self.channels[channel_id] = channel
        return channel

    def add_usergroup(self, group_id: str, users: Iterable[str]) -> list[str]:
        """Register a user group (``S…``) as usergroups.users.list reports it; set it again to change it."""
        self.usergroups[group_id] = list(users)
        return self.usergroups[group_id]

    def user(self, user_id: str) -> JSON:
        return self.users.get(user_id) or self.add_user(user_id)

    def channel(self, channel_id: str) -> JSON:
        return self.channels.get(channel_id) or self.add_channel(channel_id)

    def channel_type(self, channel_id: str) -> str:
        """The Events API ``channel_type``: channel, group, im or mpim."""
        info = self.channel(channel_id)
        if info["is_im"]:
            return "im"
        if info["is_mpim"]:
            return "mpim"
        return "group" if info["is_private"] else "channel"

    def _channel_name_for_payload(self, channel_id: str) -> str:
        # Slash commands and interactivity name DMs and private channels generically.
        info = self.channel(channel_id)
        if info["is_im"]:
            return "directmessage"
        return "privategroup" if info["is_private"] else info["name"]

    def message(self, channel: str, ts: str) -> JSON | None:
        return self.messages.get((channel, ts))

    def messages_in(self, channel: str) -> list[JSON]:
        """Messages stored for ``channel``, oldest first (thread replies included)."""
        found = [m for (c, _), m in self.messages.items() if c == channel]
        return sorted(found, key=lambda m: float(m["ts"]))

    def _remember(self, channel: str, message: Mapping[str, Any]) -> JSON:
        stored = {k: v for k, v in message.items() if k not in ("channel", "event_ts", "channel_type")}
        self.messages[(channel, stored["ts"])] = stored
        return stored

    def _new_trigger_id(self) -> str:
        trigger_id = f"{secrets.randbelow(10**13)}.{secrets.randbelow(10**13)}.{secrets.token_hex(16)}"
        self._triggers[trigger_id] = time.monotonic()
        return trigger_id

    def _new_response_url(self, kind: str, context: JSON) -> str:
        url = f"{self.response_url_base}/{kind}/{self.team_id}/{secrets.randbelow(10**13)}/{slack_id('', 24)}"
        self._response_urls[url] = {**context, "uses": 0}
        return url

    def _interaction_user(self, user_id: str) -> JSON:
        name = self.user(user_id)["name"]
        return {"id": user_id, "username": name, "name": name, "team_id": self.team_id}

    def _bot_message(self, channel: str, text: str, blocks: list[JSON] | None, **extra: Any) -> JSON:
        message: JSON = {
            "user": self.bot_user_id,
            "type": "message",
            "ts": self.next_ts(),
            "bot_id": self.bot_id,
            "app_id": self.api_app_id,
            "text": text,
            "team": self.team_id,
            "bot_profile": {
                "id": self.bot_id,
                "deleted": False,
                "name": self.bot_name,
                "updated": 1700000000,
                "app_id": self.api_app_id,
                "icons": {"image_36": "https://avatars.example/bot_36.png"},
                "team_id": self.team_id,
            },
            # Slack renders a text-only post into rich_text blocks and reports them back.
            "blocks": blocks if blocks is not None else rich_text_blocks(text),
        }
        message.update({k: v for k, v in extra.items() if v is not None})
        return self._remember(channel, message)

    # ---- event builders -----------------------------------------------------------------------------

    def message_event(
        self,
        channel: str = DEFAULT_CHANNEL_ID,
        user: str = DEFAULT_USER_ID,
        text: str = "",
        *,
        ts: str | None = None,
        thread_ts: str | None = None,
        subtype: str | None = None,
        bot_id: str | None = None,
        channel_type: str | None = None,
        blocks: list[JSON] | None = None,
        **extra: Any,
    ) -> JSON:
        """A ``message`` event as a person posts it (or, with ``bot_id``, as another app's bot user does).

        ``text`` is in Slack's wire format (``<@U123>`` mentions, ``&amp;`` escapes); the message is also
        stored, so reactions, edits and chat.getPermalink know about it.
        """
        ts = ts or self.next_ts()
        event: JSON = {"user": user, "type": "message", "ts": ts}
        if bot_id is None:
            event["client_msg_id"] = str(uuid.uuid4())
        if subtype is not None:
            event["subtype"] = subtype
        event.update(
            {
                "text": text,
                "team": self.team_id,
                "blocks": rich_text_blocks(text) if blocks is None else blocks,
            }
        )
        if bot_id is not None:
            event.update(
                {
                    "bot_id": bot_id,
                    "app_id": "A0OTHER",
                    "bot_profile": {
                        "id": bot_id,
                        "deleted": False,
                        "name": self.user(user)["name"],
                        "app_id": "A0OTHER",
                        "team_id": self.team_id,
                    },
                }
            )
        if thread_ts is not None:
            event["thread_ts"] = thread_ts
            parent = self.message(channel, thread_ts)
            event["parent_user_id"] = parent.get("user", user) if parent else user
        event.update(
            {
                "channel": channel,
                "event_ts": ts,
                "channel_type": channel_type or self.channel_type(channel),
                **extra,
            }
        )
        self._remember(channel, event)
        return event

    def app_mention_event(
        self,
        channel: str = DEFAULT_CHANNEL_ID,
        user: str = DEFAULT_USER_ID,
        text: str = "",
        *,
        ts: str | None = None,
        thread_ts: str | None = None,
        **extra: Any,
    ) -> JSON:
        """An ``app_mention``; ``<@bot_user_id>`` is prepended to ``text`` unless it mentions the bot."""
        mention = f"<@{self.bot_user_id}>"
        if mention not in text:
            text = f"{mention} {text}".rstrip()
        ts = ts or self.next_ts()
        event: JSON = {
            "client_msg_id": str(uuid.uuid4()),
            "type": "app_mention",
            "text": text,
            "user": user,
            "ts": ts,
            "blocks": rich_text_blocks(text),
            "team": self.team_id,
        }
        if thread_ts is not None:
            event["thread_ts"] = thread_ts
        event.update({"channel": channel, "event_ts": ts, **extra})
        self._remember(channel, {k: v for k, v in event.items() if k != "type"} | {"type": "message"})
        return event

    def message_changed_event(
        self,
        channel: str,
        ts: str,
        text: str,
        *,
        user: str | None = None,
        previous_text: str | None = None,
        **extra: Any,
    ) -> JSON:
        """A ``message_changed`` event for an edit of message ``ts``; updates the stored message."""
        event_ts = self.next_ts()
        previous = copy.deepcopy(self.message(channel, ts)) or {
            "type": "message",
            "user": user or DEFAULT_USER_ID,
            "text": previous_text or "",
            "ts": ts,
            "team": self.team_id,
            "blocks": rich_text_blocks(previous_text or ""),
        }
        if previous_text is not None:
            previous.update({"text": previous_text, "blocks": rich_text_blocks(previous_text)})
        author = user or previous.get("user", DEFAULT_USER_ID)
        current = {
            **previous,
            "user": author,
            "text": text,
            "blocks": rich_text_blocks(text),
            "edited": {"user": author, "ts": event_ts},
        }
        current.pop("reactions", None)
        self._remember(channel, current)
        return {
            "type": "message",
            "subtype": "message_changed",
            "message": current,
            "previous_message": previous,
            "channel": channel,
            "hidden": True,
            "ts": event_ts,
            "event_ts": event_ts,
            "channel_type": self.channel_type(channel),
            **extra,
        }

    def message_deleted_event(
        self,
        channel: str,
        ts: str,
        *,
        previous_text: str | None = None,
        user: str | None = None,
        **extra: Any,
    ) -> JSON:
        """A ``message_deleted`` event for message ``ts``; forgets the stored message."""
        event_ts = self.next_ts()
        previous = self.messages.pop((channel, ts), None) or {
            "type": "message",
            "user": user or DEFAULT_USER_ID,
            "text": previous_text or "",
            "ts": ts,
            "team": self.team_id,
            "blocks": rich_text_blocks(previous_text or ""),
        }
        return {
            "type": "message",
            "subtype": "message_deleted",
            "previous_message": previous,
            "channel": channel,
            "hidden": True,
            "deleted_ts": ts,
            "event_ts": event_ts,
            "ts": event_ts,
            "channel_type": self.channel_type(channel),
            **extra,
        }

    def thread_parent_deleted_event(self, channel: str, ts: str, **extra: Any) -> JSON:
        """Deleting a message with replies leaves a ``tombstone`` in its place (history lists it, with its
        thread): Slack sends ``message_changed`` whose message is the tombstone."""
        event = self.message_changed_event(channel, ts, "This message was deleted.", **extra)
        tombstone = {**event["message"], "subtype": "tombstone", "hidden": True, "user": "USLACKBOT"}
        for gone in ("edited", "client_msg_id", "blocks", "team"):
            tombstone.pop(gone, None)
        event["message"] = self._remember(channel, tombstone)
        return event

    def channel_join_event(
        self, channel: str, user: str, *, inviter: str | None = None, **extra: Any
    ) -> JSON:
        """The ``channel_join`` message Slack posts when ``user`` joins ``channel``."""
        ts = self.next_ts()
        name = self.user(user)["name"]
        event: JSON = {
            "subtype": "channel_join",
            "user": user,
            "text": f"<@{user}|{name}> has joined the channel",
            "type": "message",
            "ts": ts,
        }
        if inviter is not None:
            event["inviter"] = inviter
        event.update(
            {"channel": channel, "event_ts": ts, "channel_type": self.channel_type(channel), **extra}
        )
        self._remember(channel, event)
        return event

    def member_joined_channel_event(
        self, channel: str, user: str, *, inviter: str | None = None, **extra: Any
    ) -> JSON:
        """``member_joined_channel`` (e.g. the bot being invited); ``channel_type`` is "C" or "G" here."""
        event: JSON = {
            "type": "member_joined_channel",
            "user": user,
            "channel": channel,
            "channel_type": "G" if self.channel(channel)["is_private"] else "C",
            "team": self.team_id,
            "event_ts": self.next_ts(),
            **extra,
        }
        if inviter is not None:
            event["inviter"] = inviter
        if user == self.bot_user_id:
            self.channel(channel)["is_member"] = True
        return event

    def bot_message_event(
        self,
        channel: str = DEFAULT_CHANNEL_ID,
        text: str = "",
        *,
        bot_id: str = "B0OTHER",
        username: str = "other-bot",
        ts: str | None = None,
        thread_ts: str | None = None,
        **extra: Any,
    ) -> JSON:
        """A classic ``bot_message`` (integrations, webhooks): subtype bot_message, no user."""
        ts = ts or self.next_ts()
        event: JSON = {
            "subtype": "bot_message",
            "text": text,
            "username": username,
            "bot_id": bot_id,
            "type": "message",
            "ts": ts,
        }
        if thread_ts is not None:
            event["thread_ts"] = thread_ts
        event.update(
            {"channel": channel, "event_ts": ts, "channel_type": self.channel_type(channel), **extra}
        )
        self._remember(channel, event)
        return event

    def own_message_event(self, channel: str, ts: str) -> JSON:
        """The ``message`` event Slack sends the bot for its own post: bot_id set, no subtype."""
        stored = self.message(channel, ts)
        if stored is None:
            raise KeyError(f"no stored message {channel}/{ts}")
        return {
            **copy.deepcopy(stored),
            "channel": channel,
            "event_ts": ts,
            "channel_type": self.channel_type(channel),
        }

    def app_home_opened_event(self, user: str, tab: str = "home") -> JSON:
        """``app_home_opened``: ``user`` entered the app's App Home (``tab`` "home" or "messages"). Slack
        sends the Home tab's current ``view`` once one was published for the user, and the app's DM."""
        event: JSON = {"type": "app_home_opened", "user": user, "channel": self._dm_with(user), "tab": tab}
        event["event_ts"] = self.next_ts()
        if tab == "home" and user in self.home_views:
            event["view"] = copy.deepcopy(self.home_views[user])
        return event

    def _reaction_event(
        self, kind: str, user: str, reaction: str, channel: str, ts: str, item_user: str | None, extra: JSON
    ) -> JSON:
        stored = self.message(channel, ts)
        item_user = item_user or (stored or {}).get("user")
        event: JSON = {"type": kind, "user": user, "reaction": reaction}
        if item_user is not None:
            event["item_user"] = item_user
        event.update(
            {"item": {"type": "message", "channel": channel, "ts": ts}, "event_ts": self.next_ts(), **extra}
        )
        return event

    def reaction_added_event(
        self, user: str, reaction: str, channel: str, ts: str, item_user: str | None = None, **extra: Any
    ) -> JSON:
        """``reaction_added`` on message (channel, ts); ``item_user`` defaults to the stored author."""
        return self._reaction_event("reaction_added", user, reaction, channel, ts, item_user, extra)

    def reaction_removed_event(
        self, user: str, reaction: str, channel: str, ts: str, item_user: str | None = None, **extra: Any
    ) -> JSON:
        return self._reaction_event("reaction_removed", user, reaction, channel, ts, item_user, extra)

    def event_envelope(
        self, event: Mapping[str, Any], *, event_id: str | None = None, event_time: int | None = None
    ) -> JSON:
        """The ``event_callback`` envelope Slack wraps every Events API event in."""
        event = dict(event)
        event.setdefault("event_ts", self.next_ts())
        context = {"et": event.get("type"), "tid": self.team_id, "aid": self.api_app_id}
        channel = event.get("channel") or (event.get("item") or {}).get("channel")
        if isinstance(channel, str):
            context["cid"] = channel
        # Opaque to apps; Slack's are "4-" + base64url(JSON) without padding, so this one is too.
        event_context = "4-" + base64.urlsafe_b64encode(json.dumps(context).encode()).decode().rstrip("=")
        return {
            "token": self.verification_token,
            "team_id": self.team_id,
            "context_team_id": self.team_id,
            "context_enterprise_id": None,
            "api_app_id": self.api_app_id,
            "event": event,
            "type": "event_callback",
            "event_id": event_id or slack_id("Ev"),
            "event_time": event_time if event_time is not None else int(float(event["event_ts"])),
            "authorizations": [
                {
                    "enterprise_id": None,
                    "team_id": self.team_id,
                    "user_id": self.bot_user_id,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
            "is_ext_shared_channel": False,
            "event_context": event_context,
        }

    # ---- sending to the bot -------------------------------------------------------------------------

    def sign(self, body: bytes, timestamp: int | str | None = None) -> dict[str, str]:
        """The two headers Slack signs a request with."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        return {
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": compute_signature(self.signing_secret, ts, body),
        }

    async def send_raw(
        self, body: bytes, content_type: str, payload: JSON | None = None, **options: Unpack[SendOptions]
    ) -> BotResponse:
        """POST ``body`` to the bot, signed like Slack (subject to ``options``)."""
        url = options.get("url") or self.bot_url
        if not url:
            raise RuntimeError("SlackStandIn.bot_url is not set (pass bot_url= or url=)")
        if self._session is None:
            raise RuntimeError("SlackStandIn is not started (use `async with`)")
        headers = {"Content-Type": content_type, "User-Agent": SLACK_USER_AGENT, "Accept": "*/*"}
        if not options.get("unsigned"):
            signed = self.sign(body, options.get("timestamp"))
            if "signature" in options:
                signed["X-Slack-Signature"] = options["signature"]
            elif options.get("bad_signature"):
                good = signed["X-Slack-Signature"]
                signed["X-Slack-Signature"] = good[:-1] + ("0" if good[-1] != "0" else "1")
            headers.update(signed)
        if options.get("retry_num") is not None:
            headers["X-Slack-Retry-Num"] = str(options["retry_num"])
            headers["X-Slack-Retry-Reason"] = options.get("retry_reason") or "http_timeout"
        headers.update(options.get("headers") or {})
        timeout = aiohttp.ClientTimeout(total=options.get("timeout", 10.0))
        started = time.perf_counter()
        async with self._session.post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            content = await response.read()
        result = BotResponse(
            status=response.status,
            headers=CIMultiDict(response.headers),
            body=content,
            elapsed=time.perf_counter() - started,
            payload=payload or {},
            request_headers=headers,
            request_body=body,
        )
        self.sent.append(result)
        return result

    async def send_envelope(self, envelope: JSON, **options: Unpack[SendOptions]) -> BotResponse:
        """Send an already built envelope, e.g. again with ``retry_num=1`` to play a Slack retry."""
        event = envelope.get("event")
        event = event if isinstance(event, dict) else {}  # tests send malformed envelopes on purpose
        if event.get("type") == "message" and "subtype" not in event and "channel" in event and "ts" in event:
            self._remember(event["channel"], event)  # hand-built events become known messages too
        body = json.dumps(envelope).encode()
        return await self.send_raw(body, "application/json", envelope, **options)

    async def send_event(
        self,
        event: Mapping[str, Any],
        *,
        event_id: str | None = None,
        event_time: int | None = None,
        **options: Unpack[SendOptions],
    ) -> BotResponse:
        """Deliver one Events API event in its ``event_callback`` envelope (``payload`` is the envelope)."""
        envelope = self.event_envelope(event, event_id=event_id, event_time=event_time)
        return await self.send_envelope(envelope, **options)

    async def send_url_verification(
        self, challenge: str | None = None, **options: Unpack[SendOptions]
    ) -> BotResponse:
        """The ``url_verification`` handshake; the bot must echo ``challenge``."""
        payload = {
            "token": self.verification_token,
            "challenge": challenge or secrets.token_urlsafe(36),
            "type": "url_verification",
        }
        return await self.send_raw(json.dumps(payload).encode(), "application/json", payload, **options)

    def command_payload(
        self,
        command: str = "/classify",
        text: str = "",
        *,
        user_id: str = DEFAULT_USER_ID,
        channel_id: str = DEFAULT_CHANNEL_ID,
        user_name: str | None = None,
        channel_name: str | None = None,
        enterprise_id: str | None = None,
        enterprise_name: str | None = None,
        trigger_id: str | None = None,
        response_url: str | None = None,
    ) -> dict[str, str]:
        """A slash command's fields as Slack sends them; its ``response_url`` points at the stand-in."""
        fields: dict[str, str] = {
            "token": self.verification_token,
            "team_id": self.team_id,
            "team_domain": self.team_domain,
        }
        if enterprise_id is not None:
            fields.update(
                {"enterprise_id": enterprise_id, "enterprise_name": enterprise_name or enterprise_id}
            )
        fields.update(
            {
                "channel_id": channel_id,
                "channel_name": channel_name or self._channel_name_for_payload(channel_id),
                "user_id": user_id,
                "user_name": user_name or self.user(user_id)["name"],
                "command": command,
                "text": text,
                "api_app_id": self.api_app_id,
                "is_enterprise_install": "false",
                "response_url": response_url
                or self._new_response_url(
                    "commands", {"command": command, "channel_id": channel_id, "user_id": user_id}
                ),
                "trigger_id": trigger_id or self._new_trigger_id(),
            }
        )
        return fields

    async def send_command(
        self,
        command: str = "/classify",
        text: str = "",
        *,
        user_id: str = DEFAULT_USER_ID,
        channel_id: str = DEFAULT_CHANNEL_ID,
        user_name: str | None = None,
        channel_name: str | None = None,
        enterprise_id: str | None = None,
        enterprise_name: str | None = None,
        trigger_id: str | None = None,
        response_url: str | None = None,
        **options: Unpack[SendOptions],
    ) -> BotResponse:
        """A slash command, form-encoded with Slack's fields (see ``command_payload``)."""
        fields = self.command_payload(
            command,
            text,
            user_id=user_id,
            channel_id=channel_id,
            user_name=user_name,
            channel_name=channel_name,
            enterprise_id=enterprise_id,
            enterprise_name=enterprise_name,
            trigger_id=trigger_id,
            response_url=response_url,
        )
        body = urllib.parse.urlencode(fields).encode()
        return await self.send_raw(body, "application/x-www-form-urlencoded", fields, **options)

    def _complete_action(self, action: Mapping[str, Any], blocks: list[JSON]) -> JSON:
        # Fill in what Slack would from the element's definition, so tests need only name the action_id.
        action = dict(action)
        found = next(
            ((b, e) for b, e in _iter_elements(blocks) if e.get("action_id") == action.get("action_id")), None
        )
        block_id, element = found if found is not None else (None, {})
        if found is not None:
            action.setdefault("block_id", block_id)
            action.setdefault("type", element.get("type", "button"))
            if action["type"] == "button":
                for key in ("text", "value", "style"):
                    if key in element:
                        action.setdefault(key, copy.deepcopy(element[key]))
            elif "placeholder" in element:
                action.setdefault("placeholder", copy.deepcopy(element["placeholder"]))
        kind = action.setdefault("type", "button")
        if kind == "button":
            action.setdefault("text", plain_text(action.get("action_id", "button")))  # Slack always sends it
        if kind in _SELECT_TYPES and "selected_option" not in action and "value" in action:
            action["selected_option"] = _find_option(element, action.pop("value"))
        if "block_id" not in action or action["block_id"] is None:
            action["block_id"] = slack_id("", 5)
        action.setdefault("action_ts", f"{time.time():.6f}")
        return action

    def block_actions_payload(
        self,
        actions: Iterable[Mapping[str, Any]],
        *,
        user_id: str = DEFAULT_USER_ID,
        channel_id: str = DEFAULT_CHANNEL_ID,
        message_ts: str | None = None,
        message: JSON | None = None,
        container: JSON | None = None,
        state_values: JSON | None = None,
        is_ephemeral: bool = False,
        view_id: str | None = None,
        trigger_id: str | None = None,
        response_url: str | None = None,
    ) -> JSON:
        """The payload of a ``block_actions`` interaction on a message, or on a view.

        The message defaults to the stored one at (channel_id, message_ts) - typically what the bot posted
        with chat.postMessage - and actions are completed from its blocks: ``[{"action_id": "fix"}]`` or
        ``button_action("fix")`` gets its block_id, text and value. With ``view_id`` the action comes from
        that (opened) view instead, and the payload carries ``view`` rather than message/channel.
        """
        user = self._interaction_user(user_id)
        payload: JSON = {
            "type": "block_actions",
            "user": user,
            "api_app_id": self.api_app_id,
            "token": self.verification_token,
        }
        if view_id is not None:
            view = copy.deepcopy(self.views.get(view_id)) or {"id": view_id, "type": "modal", "blocks": []}
            if state_values is not None:
                view["state"] = {"values": state_values}
            blocks = view.get("blocks") or []
            payload.update(
                {
                    "container": container or {"type": "view", "view_id": view_id},
                    "trigger_id": trigger_id or self._new_trigger_id(),
                    "team": {"id": self.team_id, "domain": self.team_domain},
                    "enterprise": None,
                    "is_enterprise_install": False,
                    "view": view,
                }
            )
        else:
            if message is None and message_ts is None:
                raise ValueError("send_block_actions needs message_ts (or message, or view_id)")
            if message is None and not is_ephemeral:
                assert message_ts is not None
                message = copy.deepcopy(self.message(channel_id, message_ts)) or self._bot_message(
                    channel_id, "", [], ts=message_ts
                )
            message_ts = message_ts or (message or {})["ts"]
            blocks = (message or {}).get("blocks") or []
            payload.update(
                {
                    "container": container
                    or {
                        "type": "message",
                        "message_ts": message_ts,
                        "channel_id": channel_id,
                        "is_ephemeral": is_ephemeral,
                    },
                    "trigger_id": trigger_id or self._new_trigger_id(),
                    "team": {"id": self.team_id, "domain": self.team_domain},
                    "enterprise": None,
                    "is_enterprise_install": False,
                    "channel": {"id": channel_id, "name": self._channel_name_for_payload(channel_id)},
                }
            )
            if message is not None:  # Slack omits the message for ephemeral ones
                payload["message"] = message
            payload["state"] = {"values": state_values or {}}
            payload["response_url"] = response_url or self._new_response_url(
                "actions",
                {
                    "channel_id": channel_id,
                    "user_id": user_id,
                    "message_ts": message_ts,
                    "is_ephemeral": is_ephemeral,
                },
            )
        payload["actions"] = [self._complete_action(action, blocks) for action in actions]
        return payload

    async def send_block_actions(
        self,
        actions: Iterable[Mapping[str, Any]],
        *,
        user_id: str = DEFAULT_USER_ID,
        channel_id: str = DEFAULT_CHANNEL_ID,
        message_ts: str | None = None,
        message: JSON | None = None,
        container: JSON | None = None,
        state_values: JSON | None = None,
        is_ephemeral: bool = False,
        view_id: str | None = None,
        trigger_id: str | None = None,
        response_url: str | None = None,
        **options: Unpack[SendOptions],
    ) -> BotResponse:
        """A ``block_actions`` interaction (``payload=<json>`` form body); see ``block_actions_payload``."""
        payload = self.block_actions_payload(
            actions,
            user_id=user_id,
            channel_id=channel_id,
            message_ts=message_ts,
            message=message,
            container=container,
            state_values=state_values,
            is_ephemeral=is_ephemeral,
            view_id=view_id,
            trigger_id=trigger_id,
            response_url=response_url,
        )
        body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
        return await self.send_raw(body, "application/x-www-form-urlencoded", payload, **options)

    def message_action_payload(
        self,
        callback_id: str,
        channel_id: str,
        message_ts: str,
        *,
        user_id: str = DEFAULT_USER_ID,
        trigger_id: str | None = None,
    ) -> JSON:
        """A message shortcut (``message_action``) on the stored message at (channel_id, message_ts):
        the message's full structure, the channel, who used it, a trigger_id and a response_url."""
        message = copy.deepcopy(self.message(channel_id, message_ts))
        if message is None:
            raise KeyError(f"no stored message {channel_id}/{message_ts}")
        user = self._interaction_user(user_id)
        return {
            "type": "message_action",
            "token": self.verification_token,
            "action_ts": f"{time.time():.6f}",
            "team": {"id": self.team_id, "domain": self.team_domain},
            "user": {**user, "username": user["name"]},
            "channel": {"id": channel_id, "name": self._channel_name_for_payload(channel_id)},
            "is_enterprise_install": False,
            "enterprise": None,
            "callback_id": callback_id,
            "trigger_id": trigger_id or self._new_trigger_id(),
            "response_url": self._new_response_url(
                "actions", {"channel_id": channel_id, "user_id": user_id, "message_ts": message_ts}
            ),
            "message_ts": message_ts,
            "message": {"type": "message", **message},
        }

    async def send_message_action(
        self,
        callback_id: str,
        channel_id: str,
        message_ts: str,
        *,
        user_id: str = DEFAULT_USER_ID,
        trigger_id: str | None = None,
        **options: Unpack[SendOptions],
    ) -> BotResponse:
        """A message shortcut (``payload=<json>`` form body); see ``message_action_payload``."""
        payload = self.message_action_payload(
            callback_id, channel_id, message_ts, user_id=user_id, trigger_id=trigger_id
        )
        body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
        return await self.send_raw(body, "application/x-www-form-urlencoded", payload, **options)

    async def send_view_submission(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        values: JSON | None = None,
        view_id: str | None = None,
        view: JSON | None = None,
        user_id: str = DEFAULT_USER_ID,
        trigger_id: str | None = None,
        **options: Unpack[SendOptions],
    ) -> BotResponse:
        """A ``view_submission`` of a modal the bot opened (default: the one opened last).

        ``inputs`` maps action_id -> value(s) and is turned into ``state.values`` from the view's input
        elements (select options looked up); ``values`` gives ``state.values`` verbatim instead.
        """
        if view is None:
            if view_id is None and not self.views:
                raise ValueError("no view opened yet: pass view= or view_id=")
            view_id = view_id or next(reversed(self.views))
            if view_id not in self.views:
                raise KeyError(f"unknown view {view_id}")
            view = self.views[view_id]
        view = copy.deepcopy(view)
        state = dict(values or {})
        for block_id, element in _iter_elements(view.get("blocks") or []):
            action_id = element.get("action_id")
            if inputs is not None and action_id in inputs:
                state.setdefault(block_id or "", {})[action_id] = state_value(element, inputs[action_id])
        unknown = set(inputs or {}) - {a for v in state.values() for a in v}
        if unknown:
            raise KeyError(f"view {view.get('id')} has no input element(s) {sorted(unknown)}")
        view["state"] = {"values": state}
        payload: JSON = {
            "type": "view_submission",
            "team": {"id": self.team_id, "domain": self.team_domain},
            "user": self._interaction_user(user_id),
            "api_app_id": self.api_app_id,
            "token": self.verification_token,
            "trigger_id": trigger_id or self._new_trigger_id(),
            "view": view,
            "response_urls": [],
            "is_enterprise_install": False,
            "enterprise": None,
        }
        body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
        return await self.send_raw(body, "application/x-www-form-urlencoded", payload, **options)

    # ---- recordings ---------------------------------------------------------------------------------

    def calls_to(self, method: str) -> list[ApiCall]:
        return [call for call in self.calls if call.method == method]

    def clear(self) -> None:
        """Forget recorded calls, response_url posts and sent requests (state and faults stay)."""
        self.calls.clear()
        self.responses.clear()
        self.sent.clear()

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def _wait(self, ready: Callable[[], bool], timeout: float) -> bool:  # noqa: ASYNC109
        if self._changed is None:
            raise RuntimeError("SlackStandIn is not started (use `async with`)")
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(ready)
        except TimeoutError:
            return False
        return True

    async def wait_for(
        self,
        method: str | None,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
        predicate: Callable[[ApiCall], bool] | None = None,
    ) -> list[ApiCall]:
        """Wait until ``count`` calls to ``method`` (None: any) matching ``predicate`` were recorded.

        Returns every matching call so far (at least ``count``); raises ``WaitTimeout`` listing what did
        arrive.
        """

        def matching() -> list[ApiCall]:
            return [
                c
                for c in self.calls
                if (method is None or c.method == method) and (predicate is None or predicate(c))
            ]

        if not await self._wait(lambda: len(matching()) >= count, timeout):
            seen = [f"{c.method} -> {c.status} {c.response.get('error') or 'ok'}" for c in self.calls]
            raise WaitTimeout(
                f"waited {timeout}s for {count} matching call(s) to {method or 'any method'}, "
                f"got {len(matching())}; all calls: {seen}"
            )
        return matching()

    async def wait_for_response(
        self,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
        predicate: Callable[[ResponseUrlPost], bool] | None = None,
        response_url: str | None = None,
    ) -> list[ResponseUrlPost]:
        """Wait until ``count`` posts to response URLs (or to ``response_url``) matching ``predicate``."""

        def matching() -> list[ResponseUrlPost]:
            return [
                r
                for r in self.responses
                if (response_url is None or r.url == response_url) and (predicate is None or predicate(r))
            ]

        if not await self._wait(lambda: len(matching()) >= count, timeout):
            seen = [f"{r.kind} {r.status}: {r.body}" for r in self.responses]
            raise WaitTimeout(
                f"waited {timeout}s for {count} response_url post(s), got {len(matching())}: {seen}"
            )
        return matching()

    # ---- fault injection ----------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        *,
        status: int | None = None,
        error: str | None = None,
        retry_after: int | None = 1,
        count: int | None = 1,
        predicate: Callable[[JSON], bool] | None = None,
        delay: float = 0.0,
    ) -> Fault:
        """Make the next ``count`` calls to ``method`` fail (``count=None``: all, until ``clear_faults``).

        * default / ``status=429``: HTTP 429, ``Retry-After: retry_after``,
          ``{"ok": false, "error": "ratelimited"}``
        * ``status=500`` (any 5xx): that status with ``{"ok": false, "error": error or "internal_error"}``
        * ``error="channel_not_found"`` alone: HTTP 200 with ``{"ok": false, "error": "channel_not_found"}``

        ``method`` may be "*" (any Web API method) or "response_url"; ``predicate`` sees the call's args;
        ``delay`` holds the answer back first (to test client timeouts). Faults are consumed in order added.
        """
        if status is None:
            status = 200 if error is not None else 429
        if error is None:
            error = {429: "ratelimited", 200: "fatal_error"}.get(status, "internal_error")
        fault = Fault(
            method=method,
            status=status,
            error=error,
            retry_after=retry_after,
            remaining=count,
            predicate=predicate,
            delay=delay,
        )
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Drop every planned fault, and the channel rate limit."""
        self.faults.clear()
        self._rate_per_second = None

    def limit_channel_rate(
        self,
        per_second: float | None = 1.0,
        *,
        retry_after: int = 1,
        methods: Iterable[str] = ("chat.postMessage",),
    ) -> None:
        """Slack's per-channel posting limit (about one message per second per channel): posts to a channel
        closer together than ``1/per_second`` get HTTP 429 + Retry-After. ``None`` turns it off."""
        self._rate_per_second = per_second
        self._rate_retry_after = retry_after
        self._rate_methods = frozenset(methods)
        self._rate_last.clear()

    def _take_fault(self, method: str, args: JSON) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, args):
                fault.hits += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
                return fault
        return None

    def _rate_limited(self, method: str, args: JSON) -> bool:
        if self._rate_per_second is None or method not in self._rate_methods:
            return False
        key = (method, str(args.get("channel", "")))
        now = time.monotonic()
        last = self._rate_last.get(key)
        if last is not None and now - last < 1.0 / self._rate_per_second:
            return True
        self._rate_last[key] = now
        return False

    # ---- Web API server -----------------------------------------------------------------------------

    def register_method(self, method: str, handler: MethodHandler) -> MethodHandler | None:
        """Serve (or override) ``method``: ``handler(call)`` returns the response fields besides ``ok``, or
        raises ``ApiError("some_error")``. It may be a coroutine function. Returns the handler it replaces
        (``None`` for a new method), for a wrapper that still does what Slack does."""
        replaced = self._methods.get(method)
        self._methods[method] = handler
        return replaced

    async def _read_args(self, request: web.Request) -> tuple[JSON, bytes, str | None]:
        args: JSON = dict(request.query)
        if request.content_type.startswith("multipart/"):
            form = await request.post()  # files.upload v1 style; file parts become {filename, content}
            for key, value in form.items():
                args[key] = (
                    {"filename": value.filename, "content": value.file.read()}
                    if isinstance(value, web.FileField)
                    else value
                )
            return _decode_json_args(args), b"", None
        raw = await request.read()
        if not raw:
            return _decode_json_args(args), raw, None
        if request.content_type == "application/json":
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                return args, raw, "invalid_json"
            if not isinstance(body, dict):
                return args, raw, "invalid_json"
            args.update(body)
        else:  # application/x-www-form-urlencoded, or a body sent without a content type
            args.update(urllib.parse.parse_qsl(raw.decode("utf-8", errors="replace"), keep_blank_values=True))
        return _decode_json_args(args), raw, None

    async def _handle_api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args, raw, body_error = await self._read_args(request)
        call = ApiCall(
            method=method,
            args=args,
            headers=dict(request.headers),
            time=time.time(),
            http_method=request.method,
            body=raw,
        )
        if self.api_latency:
            await asyncio.sleep(self.api_latency)
        status, response, headers = await self._answer(call, request, body_error)
        call.status, call.response = status, response
        self.calls.append(call)
        await self._notify()
        headers["X-Slack-Req-Id"] = secrets.token_hex(16)
        return web.json_response(response, status=status, headers=headers)

    async def _answer(
        self, call: ApiCall, request: web.Request, body_error: str | None
    ) -> tuple[int, JSON, dict[str, str]]:
        if body_error is not None:
            return 200, {"ok": False, "error": body_error}, {}
        authorization = request.headers.get("Authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        token = credentials.strip() if scheme.lower() == "bearer" else None
        # Slack takes the token from the header, or from a form/query `token` (never from a JSON body).
        token = token or (call.args.get("token") if request.content_type != "application/json" else None)
        if not token:
            return 200, {"ok": False, "error": "not_authed"}, {}
        expected = self.method_tokens.get(call.method, self.bot_token)
        if token != expected:
            known = token == self.bot_token or token in self.method_tokens.values()
            return 200, {"ok": False, "error": "not_allowed_token_type" if known else "invalid_auth"}, {}
        fault = self._take_fault(call.method, call.args)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            return fault.answer()
        handler = self._methods.get(call.method)
        if handler is None:
            return 200, {"ok": False, "error": "unknown_method", "req_method": call.method}, {}
        if self._rate_limited(call.method, call.args):
            return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(self._rate_retry_after)}
        try:
            result = handler(call)
            if inspect.isawaitable(result):
                result = await result
        except ApiError as exc:
            return 200, {"ok": False, "error": exc.error, **exc.extra}, {}
        except Exception as exc:  # a stand-in (or custom handler) bug: answer, record, keep serving
            self.errors.append(exc)
            return 500, {"ok": False, "error": "internal_error", "standin_exception": repr(exc)}, {}
        return 200, {"ok": True, **result}, {}

    def _builtin_methods(self) -> dict[str, MethodHandler]:
        return {
            "auth.test": self._auth_test,
            "chat.postMessage": self._chat_post_message,
            "chat.update": self._chat_update,
            "chat.delete": self._chat_delete,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "chat.getPermalink": self._chat_get_permalink,
            "reactions.add": self._reactions_add,
            "users.info": self._users_info,
            "team.info": self._team_info,
            "usergroups.users.list": self._usergroups_users_list,
            "conversations.info": self._conversations_info,
            "conversations.history": self._conversations_history,
            "users.conversations": self._users_conversations,
            "conversations.replies": self._conversations_replies,
            "views.open": self._views_open,
            "views.update": self._views_update,
            "views.publish": self._views_publish,
            "files.getUploadURLExternal": self._files_get_upload_url,
            "files.completeUploadExternal": self._files_complete_upload,
        }

    def _auth_test(self, call: ApiCall) -> JSON:
        return {
            "url": f"https://{self.team_domain}.slack.com/",
            "team": self.team_name,
            "user": self.bot_name,
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _resolve_channel(self, value: Any) -> str:
        """chat.postMessage's ``channel``: an ID, a ``#name``, or a user ID (meaning the DM with them)."""
        if not value or not isinstance(value, str):
            raise ApiError("channel_not_found")
        if value.startswith("#"):
            for channel_id, info in self.channels.items():
                if info["name"] == value[1:]:
                    return channel_id
            raise ApiError("channel_not_found")
        if value[0] in "UW":
            return self._dm_with(value)
        return value

    def _dm_with(self, user_id: str) -> str:
        if user_id not in self._dm_channels:
            channel_id = "D" + slack_id("", 10)
            self.add_channel(channel_id, user=user_id)
            self._dm_channels[user_id] = channel_id
        return self._dm_channels[user_id]

    def _check_can_post(self, channel_id: str) -> JSON:
        info = self.channel(channel_id)
        if info["is_archived"]:
            raise ApiError("is_archived")
        if not info["is_member"]:
            raise ApiError("channel_not_found" if info["is_private"] else "not_in_channel")
        return info

    def _chat_post_message(self, call: ApiCall) -> JSON:
        args = call.args
        channel = self._resolve_channel(args.get("channel"))
        self._check_can_post(channel)
        text, blocks, attachments = args.get("text"), args.get("blocks"), args.get("attachments")
        if not text and not blocks and not attachments:
            raise ApiError("no_text")
        message = self._bot_message(
            channel,
            text or "",
            blocks,
            attachments=attachments,
            thread_ts=args.get("thread_ts") or None,
            metadata=args.get("metadata"),
        )
        if self.echo_bot_messages and self.bot_url:
            task = asyncio.get_running_loop().create_task(self._echo(channel, message["ts"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return {"channel": channel, "ts": message["ts"], "message": copy.deepcopy(message)}

    async def _echo(self, channel: str, ts: str) -> None:
        # As Slack does, deliver the bot's own post back to it, after the API call has been answered.
        await asyncio.sleep(0.01)
        try:
            await self.send_event(self.own_message_event(channel, ts))
        except (aiohttp.ClientError, TimeoutError, KeyError) as exc:
            self.echo_errors.append(exc)

    def _own_message(self, args: JSON, not_own_error: str) -> tuple[str, JSON]:
        channel = self._resolve_channel(args.get("channel"))
        message = self.message(channel, str(args.get("ts", "")))
        if message is None:
            raise ApiError("message_not_found")
        if message.get("bot_id") != self.bot_id:
            raise ApiError(not_own_error)
        return channel, message

    def _chat_update(self, call: ApiCall) -> JSON:
        channel, message = self._own_message(call.args, "cant_update_message")
        for key in ("text", "blocks", "attachments", "metadata"):
            if key in call.args:
                message[key] = call.args[key]
        if "text" in call.args and "blocks" not in call.args:
            message["blocks"] = rich_text_blocks(message["text"])
        message["edited"] = {"user": self.bot_user_id, "ts": self.next_ts()}
        return {
            "channel": channel,
            "ts": message["ts"],
            "text": message.get("text", ""),
            "message": copy.deepcopy(message),
        }

    def _chat_delete(self, call: ApiCall) -> JSON:
        channel, message = self._own_message(call.args, "cant_delete_message")
        del self.messages[(channel, message["ts"])]
        return {"channel": channel, "ts": message["ts"]}

    def _chat_post_ephemeral(self, call: ApiCall) -> JSON:
        args = call.args
        channel = self._resolve_channel(args.get("channel"))
        self._check_can_post(channel)
        if not args.get("user"):
            raise ApiError("user_not_found")
        if not args.get("text") and not args.get("blocks") and not args.get("attachments"):
            raise ApiError("no_text")
        return {"message_ts": self.next_ts()}

    def _chat_get_permalink(self, call: ApiCall) -> JSON:
        channel, ts = call.args.get("channel"), call.args.get("message_ts")
        if not channel:
            raise ApiError("channel_not_found")
        if not ts:
            raise ApiError("message_not_found")
        permalink = f"https://{self.team_domain}.slack.com/archives/{channel}/p{str(ts).replace('.', '')}"
        thread_ts = (self.message(channel, ts) or {}).get("thread_ts")
        if thread_ts and thread_ts != ts:
            permalink += f"?thread_ts={thread_ts}&cid={channel}"
        return {"channel": channel, "permalink": permalink}

    def _reaction_target(self, args: JSON) -> tuple[str, JSON]:
        name, channel, ts = args.get("name"), args.get("channel"), args.get("timestamp")
        if not name:
            raise ApiError("invalid_name")
        if not channel or not ts:
            raise ApiError("no_item_specified")
        # Lenient on unknown messages: tests often hand-build the events the bot reacts to.
        message = self.messages.setdefault((channel, ts), {"type": "message", "ts": ts})
        return str(name), message

    def _reactions_add(self, call: ApiCall) -> JSON:
        name, message = self._reaction_target(call.args)
        reactions: list[JSON] = message.setdefault("reactions", [])
        entry = next((r for r in reactions if r["name"] == name), None)
        if entry is None:
            entry = {"name": name, "users": [], "count": 0}
            reactions.append(entry)
        if self.bot_user_id in entry["users"]:
            raise ApiError("already_reacted")
        entry["users"].append(self.bot_user_id)
        entry["count"] += 1
        return {}

    def _users_info(self, call: ApiCall) -> JSON:
        user_id = call.args.get("user")
        if not user_id:
            raise ApiError("user_not_found")
        return {"user": copy.deepcopy(self.user(str(user_id)))}

    def _team_info(self, call: ApiCall) -> JSON:
        team = self.teams.get(str(call.args.get("team") or self.team_id))
        if team is None:
            raise ApiError("team_not_found")
        return {"team": copy.deepcopy(team)}

    def _usergroups_users_list(self, call: ApiCall) -> JSON:
        group_id = call.args.get("usergroup")
        if not group_id:
            raise ApiError("invalid_arguments")
        if group_id not in self.usergroups:
            raise ApiError("no_such_subteam")
        return {"users": list(self.usergroups[str(group_id)])}

    def _conversations_info(self, call: ApiCall) -> JSON:
        channel_id = call.args.get("channel")
        if not channel_id:
            raise ApiError("channel_not_found")
        return {"channel": copy.deepcopy(self.channel(str(channel_id)))}

    def _readable_channel(self, args: JSON) -> str:
        channel_id = args.get("channel")
        if not channel_id:
            raise ApiError("channel_not_found")
        info = self.channel(str(channel_id))
        if not info["is_member"]:
            raise ApiError("channel_not_found" if info["is_private"] else "not_in_channel")
        return str(channel_id)

    def _conversations_history(self, call: ApiCall) -> JSON:
        """Top-level messages (and thread broadcasts), newest first, between ``oldest`` and ``latest``
        (exclusive unless ``inclusive``), ``limit`` a page (default 100, at most 999), paged by
        ``cursor`` / ``response_metadata.next_cursor`` as Slack documents. A thread's parent carries
        ``thread_ts``, ``reply_count``, ``reply_users_count``, ``latest_reply`` and ``reply_users``."""
        args = call.args
        channel = self._readable_channel(args)
        top_level = [
            m
            for m in self.messages_in(channel)
            if m.get("thread_ts") in (None, m["ts"]) or m.get("subtype") == "thread_broadcast"
        ]
        newest_first = [m for m in reversed(top_level) if _in_time_range(m["ts"], args)]
        page, next_cursor = _page(newest_first, args, key="ts", default_limit=100, max_limit=999)
        return {
            "messages": self._as_listed(channel, page, args),
            "has_more": bool(next_cursor),
            "pin_count": 0,
            "channel_actions_ts": None,
            "channel_actions_count": 0,
            "response_metadata": {"next_cursor": next_cursor},
        }

    def _users_conversations(self, call: ApiCall) -> JSON:
        """The conversations the bot is a member of, of ``types`` (default public_channel), paged."""
        args = call.args
        types = set(str(args.get("types") or "public_channel").split(","))

        def kind(info: JSON) -> str:
            if info["is_im"]:
                return "im"
            if info["is_mpim"]:
                return "mpim"
            return "private_channel" if info["is_private"] else "public_channel"

        found = [
            info
            for info in self.channels.values()
            if info["is_member"]
            and kind(info) in types
            and not (_truthy(args.get("exclude_archived")) and info["is_archived"])
        ]
        page, next_cursor = _page(found, args, key="id", default_limit=100, max_limit=1000)
        return {"channels": copy.deepcopy(page), "response_metadata": {"next_cursor": next_cursor}}

    def _as_listed(self, channel: str, messages: list[JSON], args: JSON) -> list[JSON]:
        """Copies of ``messages`` as history and replies list them: a parent with its thread's summary,
        and, as Slack does, ``metadata`` only given include_all_metadata."""
        copies = copy.deepcopy(messages)
        for message in copies:
            replies = self._replies_to(channel, message["ts"])
            if replies:
                users = list(dict.fromkeys(str(r.get("user") or r.get("bot_id")) for r in replies))
                message.update(
                    {
                        "thread_ts": message["ts"],
                        "reply_count": len(replies),
                        "reply_users_count": len(users),
                        "latest_reply": replies[-1]["ts"],
                        "reply_users": users,
                    }
                )
            if not _truthy(args.get("include_all_metadata")):
                message.pop("metadata", None)
        return copies

    def _replies_to(self, channel: str, ts: str) -> list[JSON]:
        """The replies in the thread of ``ts`` (not the parent), oldest first."""
        return [m for m in self.messages_in(channel) if m.get("thread_ts") == ts and m["ts"] != ts]

    def _conversations_replies(self, call: ApiCall) -> JSON:
        """A thread: on every page its parent first, then up to ``limit`` replies (default 1000) between
        ``oldest`` and ``latest`` (exclusive unless ``inclusive``), oldest first, paged by ``cursor``.
        ``ts`` may name the parent or any reply; a message without replies comes back alone."""
        args = call.args
        channel = self._readable_channel(args)
        named = self.message(channel, str(args.get("ts") or ""))
        if named is None:
            raise ApiError("thread_not_found")
        parent = self.message(channel, str(named.get("thread_ts") or named["ts"])) or named
        replies = [r for r in self._replies_to(channel, parent["ts"]) if _in_time_range(r["ts"], args)]
        page, next_cursor = _page(replies, args, key="ts", default_limit=1000, max_limit=1000)
        return {
            "messages": self._as_listed(channel, [parent, *page], args),
            "has_more": bool(next_cursor),
            "response_metadata": {"next_cursor": next_cursor},
        }

    def _check_trigger(self, trigger_id: Any) -> None:
        if self.trigger_id_ttl is None:
            return
        issued = self._triggers.get(str(trigger_id))
        if issued is None:
            raise ApiError("invalid_trigger_id")
        if time.monotonic() - issued > self.trigger_id_ttl:
            raise ApiError("expired_trigger_id")

    def _view_arg(self, args: JSON) -> JSON:
        view = args.get("view")
        if not isinstance(view, dict) or view.get("type") not in ("modal", "home"):
            raise ApiError(
                "invalid_arguments", response_metadata={"messages": ["[ERROR] missing or invalid view"]}
            )
        return view

    def _materialize_view(
        self, spec: JSON, *, view_id: str | None = None, previous: JSON | None = None
    ) -> JSON:
        view_id = view_id or slack_id("V")
        view: JSON = {
            "id": view_id,
            "team_id": self.team_id,
            "type": spec.get("type", "modal"),
            "blocks": copy.deepcopy(spec.get("blocks") or []),
            "private_metadata": spec.get("private_metadata", ""),
            "callback_id": spec.get("callback_id", ""),
            "state": {"values": {}},
            "hash": f"{int(time.time())}.{secrets.token_hex(4)}",
            "title": spec.get("title"),
            "clear_on_close": bool(spec.get("clear_on_close", False)),
            "notify_on_close": bool(spec.get("notify_on_close", False)),
            "close": spec.get("close"),
            "submit": spec.get("submit"),
            "previous_view_id": (previous or {}).get("previous_view_id"),
            "root_view_id": (previous or {}).get("root_view_id", view_id),
            "app_id": self.api_app_id,
            "external_id": spec.get("external_id", ""),
            "app_installed_team_id": self.team_id,
            "bot_id": self.bot_id,
        }
        self.views[view_id] = view
        return view

    def _views_open(self, call: ApiCall) -> JSON:
        self._check_trigger(call.args.get("trigger_id"))
        return {"view": copy.deepcopy(self._materialize_view(self._view_arg(call.args)))}

    def _views_update(self, call: ApiCall) -> JSON:
        spec = self._view_arg(call.args)
        view_id, external_id = call.args.get("view_id"), call.args.get("external_id")
        current = (
            self.views.get(str(view_id))
            if view_id
            else next(
                (v for v in self.views.values() if external_id and v.get("external_id") == external_id), None
            )
        )
        if current is None:
            raise ApiError("not_found")
        if call.args.get("hash") and call.args["hash"] != current["hash"]:
            raise ApiError("hash_conflict")
        updated = self._materialize_view(spec, view_id=current["id"], previous=current)
        return {"view": copy.deepcopy(updated)}

    def _views_publish(self, call: ApiCall) -> JSON:
        user_id = call.args.get("user_id")
        if not user_id:
            raise ApiError("invalid_arguments")
        spec = self._view_arg(call.args)
        if spec.get("type") != "home":  # views.publish takes Home tab views only
            raise ApiError("invalid_arguments", response_metadata={"messages": ["[ERROR] must be home"]})
        if len(spec.get("blocks") or []) > MAX_VIEW_BLOCKS:
            raise ApiError("invalid_arguments", response_metadata={"messages": ["[ERROR] too many blocks"]})
        view = self._materialize_view(spec)
        self.home_views[str(user_id)] = view
        return {"view": copy.deepcopy(view)}

    def _files_get_upload_url(self, call: ApiCall) -> JSON:
        filename, length = call.args.get("filename"), call.args.get("length")
        if not filename or length in (None, ""):
            raise ApiError("invalid_arguments")
        file_id = slack_id("F")
        self.files[file_id] = UploadedFile(file_id=file_id, filename=str(filename), length=int(length))
        return {"upload_url": f"{self.response_url_base}/upload/v1/{file_id}", "file_id": file_id}

    def _files_complete_upload(self, call: ApiCall) -> JSON:
        entries = call.args.get("files")
        if not isinstance(entries, list) or not entries:
            raise ApiError("invalid_arguments")
        completed = []
        for entry in entries:
            uploaded = self.files.get(str(entry.get("id")))
            if uploaded is None or uploaded.content is None:
                raise ApiError("file_not_found")
            uploaded.title = entry.get("title") or uploaded.filename
            uploaded.channel_id = call.args.get("channel_id") or None
            uploaded.initial_comment = call.args.get("initial_comment") or None
            uploaded.thread_ts = call.args.get("thread_ts") or None
            uploaded.completed = True
            completed.append({"id": uploaded.file_id, "title": uploaded.title})
        return {"files": completed}

    async def _handle_upload(self, request: web.Request) -> web.Response:
        uploaded = self.files.get(request.match_info["file_id"])
        if uploaded is None:
            return web.Response(status=404, text="not found")
        uploaded.content = await request.read()
        await self._notify()
        # Slack's upload endpoint answers in plain text.
        return web.Response(text=f"OK - {len(uploaded.content)}", content_type="text/plain")

    # ---- response_url hooks -------------------------------------------------------------------------

    async def _handle_response_url(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        url = f"{self.response_url_base}/{kind}/{request.match_info['rest']}"
        raw = await request.read()
        body = _parse_hook_body(raw)
        context = self._response_urls.get(url)
        status, answer, headers = 200, {"ok": True}, {}
        if context is None:
            status, answer = 404, {"ok": False, "error": "invalid_url"}
        elif self.response_url_max_uses is not None and context["uses"] >= self.response_url_max_uses:
            status, answer = 404, {"ok": False, "error": "used_url"}
        elif (fault := self._take_fault("response_url", body)) is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            status, answer, headers = fault.answer()
        elif not any(body.get(key) for key in ("text", "blocks", "attachments", "delete_original")):
            status, answer = 400, {"ok": False, "error": "no_text"}
        else:
            context["uses"] += 1
            self._apply_response(context, body)
        self.responses.append(
            ResponseUrlPost(
                kind=kind,
                url=url,
                body=body,
                raw=raw,
                headers=dict(request.headers),
                time=time.time(),
                status=status,
                context={k: v for k, v in (context or {}).items() if k != "uses"},
            )
        )
        await self._notify()
        return web.json_response(answer, status=status, headers=headers)

    def _apply_response(self, context: JSON, body: JSON) -> None:
        # replace_original / delete_original act on the message a block action came from.
        key = (str(context.get("channel_id")), str(context.get("message_ts")))
        message = self.messages.get(key)
        if message is None:
            return
        if _truthy(body.get("delete_original")):
            del self.messages[key]
        elif _truthy(body.get("replace_original")):
            for field_name in ("text", "blocks", "attachments"):
                if field_name in body:
                    message[field_name] = body[field_name]
