"""A loopback stand-in for Discord's REST API (v10) and its gateway, for tests that drive a
discord.py bot through discord.py's own HTTP and websocket clients: point `discord.http.Route.BASE`
at `fake.api_url` (and `DiscordWebSocket.DEFAULT_GATEWAY` at `yarl.URL(fake.gateway_url)`, or
gpuherd's `GPUHERD_DISCORD_API_URL` / `GPUHERD_DISCORD_GATEWAY_URL`), feed interactions as raw
payloads (tests/discord_payloads.py) over the gateway or straight into the client, and read back
what the bot sent.

It is an aiohttp.web application on 127.0.0.1 (a free port) running on the test's own event loop
(`async with FakeDiscord() as fake:`); a delayed answer sleeps with asyncio.sleep, so it never
blocks the loop the bot runs on. A bot in another process (`gpuherd serve`) works too, as long as
the test never blocks that loop (poll with asyncio.sleep; blocking waits go to a thread).

What Discord documents and the fake does (developers/docs: reference, topics/rate-limits,
interactions/receiving-and-responding, resources/{user,channel,message,webhook,application},
interactions/application-commands):
- Bot routes need `Authorization: Bot <token>`; without it (or with another token) the answer is
  401 `{"message": "401: Unauthorized", "code": 0}`. Interaction callbacks and interaction
  webhooks (`/interactions/{id}/{token}/callback`, `/webhooks/{app_id}/{token}...`) need none.
- Unknown routes answer 404 `{"message": "404: Not Found", "code": 0}` (Discord's body for a route
  that does not exist); unknown things on known routes answer Discord's own codes: 10003 Unknown
  Channel, 10008 Unknown Message, 10015 Unknown Webhook, 10062 Unknown interaction, 10002 Unknown
  Application. A second callback for one interaction is 400 code 40060 ("Interaction has already
  been acknowledged."); a callback type invalid for the interaction type (when the fake knows the
  interaction) and content over 2000 characters / more than 10 embeds / embeds over 6000
  characters are 400 code 50035 "Invalid Form Body".
- Every answer carries `Via: 1.1 google`, as Discord's do. discord.py needs it: a 429 *without*
  `Via` (or with a non-JSON body) is taken for a Cloudflare ban and raised as HTTPException at once
  (http.py `HTTPClient.request`, and the webhook adapter likewise). JSON answers are sent with the
  bare `Content-Type: application/json` Discord uses: discord.py compares that header with `==`
  (`json_or_text`), so aiohttp's usual "application/json; charset=utf-8" would be read as text.
- 429 answers have the documented shape: body `{"message": "You are being rate limited.",
  "retry_after": <float>, "global": <bool>}`, headers `Retry-After` (whole seconds, rounded up),
  `X-RateLimit-Limit`, `-Remaining: 0`, `-Reset`, `-Reset-After`, `-Bucket`, `-Scope` (`user`), or
  for a global limit only `X-RateLimit-Global: true` and `-Scope: global`. Successful answers carry
  no rate-limit headers (a simplification: discord.py then never pre-emptively waits).
- Interaction callbacks: 204, or with `?with_response=true` 200 and an interaction callback
  response `{"interaction": {id, type, response_message_id?, response_message_loading?,
  response_message_ephemeral?}, "resource": {"type", "message"?}}`. discord.py 2.7 *always* sends
  `with_response=1` and reads `data["interaction"]` for types 4, 5, 6, 7 and 9 (only 1 and 8 ignore
  the body), so a bare 204 would break it. Type 4 creates the original response message; type 5
  creates it in the loading state (flag LOADING 1<<7, plus EPHEMERAL 1<<6 when deferred
  ephemerally); 6 and 7 make the component's message the original (7 edits it); 8 (choices) and
  9 (modal) create nothing.
- `POST /webhooks/{app_id}/{token}` (a follow-up, `wait` always true) returns a new message — except
  right after a type 5 defer while the loading message is untouched: then, as documented, it edits
  that loading message (keeping its ephemeral flag) instead of creating one, and answers it.
- `@original` and `/messages/{id}` of an interaction webhook are the messages of that interaction
  only. Interaction tokens never expire by themselves; `expire(token)` makes them.
- DMs: `POST /users/@me/channels {"recipient_id"}` gives one DM channel per user (the same id every
  time); after `close_dms(user_id)` sending to it answers 403 code 50007 (opening the channel still
  works, as on Discord).
- Application commands: bulk overwrite (`PUT`) keeps the id of a command whose name and type were
  already there and returns the stored commands with id, application_id, version (and guild_id).

Simplifications: the fake knows one bot user and one application (ids `APP_ID`); any channel id it
has not seen is a text channel in `fake.guild_id`, any user id a user; messages keep what was
sent (content, embeds, components, flags, attachments) with Discord's bookkeeping fields; no
mention parsing, no permissions, no per-route rate limiting of its own (only faults you ask for).

Recording: every request is a `Call` in `fake.calls` (arrival order) with the path without the
`/api/v10` prefix, the query, the JSON body (for multipart bodies the parsed `payload_json`, the
file parts in `files`), the headers (the Authorization value is kept for assertions but never
shown in a repr), the monotonic arrival time and, once answered, the status and the answer.
`wait_for` waits for a call the fake has acted on; the helper lists (`callbacks()`,
`followups()`, `edits()`) hold accepted (2xx) calls only, `calls` holds every attempt.

Interactions: `fake.dispatch(client, payload)` tells the fake about a payload
(`register_interaction`: its type, channel and, for a button, its message) and hands it to
`client._connection.parse_interaction_create` (in-process, no gateway); `await
fake.send_interaction(payload)` registers it likewise and sends it as an INTERACTION_CREATE over
every gateway session (any process). A callback or webhook call for an interaction the fake was
not told about is still accepted (no type check, messages without a channel).

Gateway (developers/events/gateway.mdx, gateway-events.mdx, topics/opcodes-and-status-codes.mdx),
a websocket at `fake.gateway_url` (ws://127.0.0.1:PORT/gateway) on the same app; GET /gateway and
GET /gateway/bot answer that URL (AutoShardedClient connects where /gateway/bot says: the real
`wss://gateway.discord.gg` there would take a test online).
- On connect: HELLO (op 10, `heartbeat_interval` = `heartbeat_interval_ms`, Discord's 41250 by
  default). `?v=` other than 10 closes 4012; `encoding` other than json closes 4002.
- Op 1 HEARTBEAT is answered with op 11 at once (also before IDENTIFY, as discord.py sends its
  first one right after HELLO); each heartbeat's `d` is kept in `conn.heartbeats`.
- Op 2 IDENTIFY (kept in `fake.identified` as an `Identify`, whose repr hides the token; compare
  with `has_token`): a wrong token closes 4004, intents missing or with undefined bits 4013, a
  privileged intent (members, presences, message content) not switched on in
  `fake.privileged_intents` 4014, a second IDENTIFY 4005. Otherwise a session: READY (`v`, `user`
  = the bot user, `guilds` = [fake.guild_id unavailable], `session_id`, `resume_gateway_url` =
  fake.gateway_url, `application` {id, flags}, `shard` when asked), then — only with the GUILDS
  intent, as on Discord — GUILD_CREATE for fake.guild_id (`discord_payloads.guild_create` with
  `fake.guild_roles`, the channels the fake knows in that guild, and the bot's own member).
- Any other op before IDENTIFY closes 4003; an unknown op 4001; binary or non-JSON frames 4002.
  Presence updates, voice states and member requests are accepted and ignored.
- Dispatches carry the session's sequence numbers (1 for READY); `dispatch_event(name, data)`
  sends any event. A session whose connection closed with a code that does not end it (4000,
  `disconnect()`'s default, unlike 1000/1001 and the 4004/4009-4014 refusals) keeps its events:
  op 6 RESUME with its id, the token and a seq replays what came after that seq, then RESUMED;
  an unknown or ended session gets op 9 INVALID_SESSION `false`. `request_reconnect()` sends op 7.
- Frames: discord.py asks `compress=zlib-stream` (zstd-stream when a zstd module is importable)
  and inflates only *binary* frames, reading text frames as they are, so both work. The fake
  honours zlib-stream (one zlib stream per connection, each message ended by a Z_SYNC_FLUSH,
  00 00 ff ff, one binary frame per message) and sends text frames for anything else (no
  compress, zstd-stream) or when `fake.gateway_compression` is False. The `compress: true` of
  discord.py's IDENTIFY (per-payload compression) is ignored: transport compression replaces it.
- Not done: heartbeat timeouts (a silent client is never dropped), the 120 events / 60 s send
  limit (4008), sharding checks (4010/4011), ETF encoding, messages split across frames.
- `fake.connections` holds every `GatewayConnection` (query, compression, ops received, when it
  was ready, who closed it with which code); `await fake.wait_connected(timeout)` returns the
  latest ready one, `wait_disconnected` waits until none is open. Leaving the `async with`
  closes open connections with 1001.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import math
import re
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import WSMsgType, web

from tests.discord_payloads import (
    APP_ID,
    CHANNEL_ID,
    GUILD_ID,
    dm_channel_object,
    guild_create,
    iso_now,
    next_snowflake,
    text_channel_object,
    user_object,
)

API_PREFIX = "/api/v10"
EPHEMERAL = 1 << 6
LOADING = 1 << 7
MAX_CONTENT = 2000
MAX_EMBEDS = 10
MAX_EMBED_CHARS = 6000
# callback types Discord accepts per interaction type (receiving-and-responding.mdx, callback type table)
VALID_CALLBACKS = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 4: {8}, 5: {4, 5, 6, 7}}

# --- gateway (developers/events/gateway.mdx, topics/opcodes-and-status-codes.mdx) ---------------
GATEWAY_PATH = "/gateway"
GATEWAY_VERSION = "10"
HEARTBEAT_INTERVAL_MS = 41250                   # what Discord's HELLO says
OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_RESUME, OP_RECONNECT = 0, 1, 2, 6, 7
OP_INVALID_SESSION, OP_HELLO, OP_HEARTBEAT_ACK = 9, 10, 11
CLIENT_OPS = {1, 2, 3, 4, 6, 8}                 # heartbeat, identify, presence, voice state, resume, request members
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1                   # privileged
INTENT_GUILD_PRESENCES = 1 << 8                 # privileged
INTENT_MESSAGE_CONTENT = 1 << 15                # privileged
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT
ALL_INTENTS = (1 << 26) - 1                     # bits Discord defines today (0..25); more is 4013
# application flags of an app (under 100 servers) whose privileged intents are on in the portal
_LIMITED_FLAGS = {INTENT_GUILD_PRESENCES: 1 << 13, INTENT_GUILD_MEMBERS: 1 << 15, INTENT_MESSAGE_CONTENT: 1 << 19}
# close codes after which Discord forgets the session (a RESUME cannot follow)
SESSION_ENDING_CLOSES = {1000, 1001, 4004, 4009, 4010, 4011, 4012, 4013, 4014}
ZLIB_SUFFIX = b"\x00\x00\xff\xff"


class Headers(dict[str, str]):
    """Request headers; the Authorization value never appears in a repr (pytest prints reprs)."""

    def __repr__(self) -> str:
        shown = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in self.items()}
        return f"Headers({shown!r})"


@dataclass
class Call:
    method: str
    path: str                                   # without the /api/v10 prefix
    query: dict[str, str]
    json: Any                                   # parsed body; payload_json for multipart
    headers: Headers = field(repr=False)
    received_at: float                          # time.monotonic() on arrival
    files: list[dict[str, Any]] = field(default_factory=list)   # multipart file parts: field, filename, size
    route: str = ""                             # the matched route template, "" when none matched
    status: int = 0                             # 0 until answered
    answer: Any = None                          # the JSON the fake answered
    answered_at: float | None = None

    @property
    def has_bot_auth(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bot ")


@dataclass(frozen=True)
class Callback:
    interaction_id: str
    token: str
    type: int
    data: dict[str, Any] | None
    call: Call


@dataclass
class _Interaction:
    id: str
    token: str
    type: int | None = None                     # None: the fake was not told about the interaction
    channel_id: str | None = None
    guild_id: str | None = None
    message_id: str | None = None               # the component's message
    responded: int | None = None                # the callback type, once acknowledged
    original_id: str | None = None
    followup_ids: list[str] = field(default_factory=list)
    expired: bool = False


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    body: Any
    retry_after: float | None
    is_global: bool


@dataclass
class _Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, answer: _Answer) -> None:
        self.answer = answer


def _error(status: int, message: str, code: int = 0, **extra: Any) -> _Refused:
    return _Refused(_Answer(status, {"message": message, "code": code, **extra}))


def _reason(status: int) -> str:
    try:
        return f"{status}: {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status}: Error"


Handler = Callable[[Call, dict[str, str]], Awaitable[_Answer]]


class Identify(dict[str, Any]):
    """The `d` of an IDENTIFY as the client sent it; the token never appears in a repr."""

    def __repr__(self) -> str:
        return f"Identify({ {k: ('<redacted>' if k == 'token' else v) for k, v in self.items()}!r})"

    def has_token(self, token: str) -> bool:
        """Whether it identified with `token` (compare here: an assert on the value would print it)."""
        return secrets.compare_digest(str(self.get("token", "")), token)

    @property
    def intents(self) -> int:
        return int(self.get("intents") or 0)


@dataclass
class _Session:
    id: str
    intents: int
    seq: int = 0                                # the last sequence number dispatched
    events: list[tuple[int, str]] = field(default_factory=list)    # (seq, frame) kept for a RESUME
    connection: GatewayConnection | None = None
    ended: bool = False


@dataclass
class GatewayConnection:
    """One websocket client of the fake gateway, as the fake saw it."""

    number: int                                 # 1, 2, ... in connection order
    query: dict[str, str]
    compress: str | None                        # "zlib-stream" when frames are zlib-stream binary, else None (text)
    opened_at: float
    ws: web.WebSocketResponse = field(repr=False)
    identify: Identify | None = None
    resumed: str | None = None                  # the session id a RESUME took over
    session: _Session | None = field(default=None, repr=False)
    ops: list[int] = field(default_factory=list)       # the opcodes received, in order
    heartbeats: list[int | None] = field(default_factory=list)    # each heartbeat's `d` (the client's last seq)
    ready_at: float | None = None               # READY (or RESUMED) sent
    closed_at: float | None = None
    close_code: int | None = None
    closed_by: str = ""                         # "client" or "fake"
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _zlib: Any = field(default=None, repr=False)

    @property
    def open(self) -> bool:
        return self.closed_at is None and not self.ws.closed

    @property
    def session_id(self) -> str | None:
        return self.session.id if self.session else None


class FakeDiscord:
    """Discord's REST API on 127.0.0.1; see the module docstring."""

    def __init__(self, *, token: str = "test-token", app_id: str = APP_ID, guild_id: str = GUILD_ID,
                 bot_name: str = "gpuherd", heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS) -> None:
        self.token = token
        self.app_id = str(app_id)
        self.bot_user_id = self.app_id
        self.guild_id = str(guild_id)
        self.bot_user: dict[str, Any] = {
            **user_object(self.bot_user_id, bot_name, bot=True),
            "mfa_enabled": False, "locale": "en-US", "verified": True, "email": None, "flags": 0,
            "banner": None, "accent_color": None, "premium_type": 0,
        }
        self.owner: dict[str, Any] = user_object("1310000000000000099", "owner")
        self.calls: list[Call] = []
        self.users: dict[str, dict[str, Any]] = {}
        self.channels: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}       # id -> current state, in creation order
        self.deleted: set[str] = set()
        self.commands: dict[str | None, list[dict[str, Any]]] = {}   # None: global; else guild id
        self.interactions: dict[str, _Interaction] = {}     # by token
        self._dm_by_user: dict[str, str] = {}
        self._closed_dms: set[str] = set()
        self._faults: list[_Fault] = []
        self._delays: list[tuple[str, re.Pattern[str], float]] = []
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.api_url = ""
        self._routes: list[tuple[str, re.Pattern[str], str, Handler, bool]] = []
        self._add_routes()
        # gateway
        self.gateway_url = ""
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.gateway_compression = True          # honour ?compress=zlib-stream; False: always text frames
        self.privileged_intents = 0              # privileged intents switched on "in the portal"
        self.guild_roles: dict[str, str] = {}    # {role id: name} of fake.guild_id, sent in its GUILD_CREATE
        self.guild_name = "gpuherd test"
        self.identified: list[Identify] = []
        self.connections: list[GatewayConnection] = []
        self.sessions: dict[str, _Session] = {}

    # --- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> FakeDiscord:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get(GATEWAY_PATH, self._gateway)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.api_url = f"http://127.0.0.1:{self.port}{API_PREFIX}"
        self.gateway_url = f"ws://127.0.0.1:{self.port}{GATEWAY_PATH}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in list(self.connections):           # else the server's shutdown waits on them
            if conn.open:
                await self._close(conn, 1001, "the fake is stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- test controls ---------------------------------------------------------------------
    def fail(self, method: str, path_regex: str, status: int, *, times: int = 1, body: Any = None,
             retry_after: float | None = None, is_global: bool = False) -> None:
        """The next `times` requests whose method is `method` ("*" for any) and whose path (without
        /api/v10) matches `path_regex` (re.search) answer `status`: a 429 in Discord's rate-limit
        shape (retry_after defaults to 1.0), anything else `body` or `{"message": "<status>: <reason>",
        "code": 0}`. Faults are checked in the order they were added, before authorization."""
        self._faults.append(_Fault(method.upper(), re.compile(path_regex), status, times, body, retry_after, is_global))

    def delay(self, path_regex: str, seconds: float, *, method: str = "*") -> None:
        """Answer matching requests `seconds` later (asyncio.sleep, before acting on them); 0 removes."""
        self._delays = [d for d in self._delays if not (d[0] == method.upper() and d[1].pattern == path_regex)]
        if seconds > 0:
            self._delays.append((method.upper(), re.compile(path_regex), seconds))

    def close_dms(self, user_id: str | int) -> None:
        """The user does not accept DMs from the bot: sends to their DM channel answer 403 50007."""
        self._closed_dms.add(str(user_id))

    def open_dms(self, user_id: str | int) -> None:
        self._closed_dms.discard(str(user_id))

    def expire(self, token: str) -> None:
        """The interaction's token is no longer valid (past 3 s for the callback, 15 min for the webhook)."""
        self._interaction(token).expired = True

    def add_user(self, user_id: str | int, username: str | None = None) -> dict[str, Any]:
        self.users[str(user_id)] = user_object(user_id, username)
        return self.users[str(user_id)]

    def add_channel(self, channel_id: str | int, *, guild_id: str | int | None = None, name: str = "gpu-ops") -> dict[str, Any]:
        self.channels[str(channel_id)] = text_channel_object(channel_id, guild_id or self.guild_id, name=name)
        return self.channels[str(channel_id)]

    def dm_channel_id(self, user_id: str | int) -> str:
        """The id of the bot's DM channel with this user (made on first use, then stable)."""
        uid = str(user_id)
        if uid not in self._dm_by_user:
            self._open_dm(uid, next_snowflake())
        return self._dm_by_user[uid]

    def register_interaction(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Tell the fake about an interaction payload before the bot sees it: its type (to check
        callback types), channel (where its messages live) and, for a component, its message (the
        message types 6 and 7 act on; stored if the fake did not have it). Returns the payload."""
        record = self._interaction(payload["token"], payload["id"])
        record.type = int(payload["type"])
        record.channel_id = payload.get("channel_id")
        record.guild_id = payload.get("guild_id")
        channel = payload.get("channel")
        if channel and channel.get("id") and channel["id"] not in self.channels:
            if channel.get("type") == 1 and "user" in payload:
                self._open_dm(payload["user"]["id"], channel["id"])
            elif channel.get("type") != 1:
                self.channels[channel["id"]] = {k: v for k, v in channel.items() if k != "permissions"}
        message = payload.get("message")
        if message:
            record.message_id = str(message["id"])
            if record.message_id not in self.messages:
                self.messages[record.message_id] = copy.deepcopy(message)
        return payload

    def dispatch(self, client: Any, payload: dict[str, Any]) -> None:
        """`register_interaction(payload)`, then hand it to discord.py as the gateway would
        (`client._connection.parse_interaction_create`: private API, pinned discord.py)."""
        self.register_interaction(payload)
        client._connection.parse_interaction_create(payload)

    # --- gateway controls ------------------------------------------------------------------
    @property
    def application_flags(self) -> int:
        """The application's flags: the *_LIMITED flag of each privileged intent switched on."""
        return sum(flag for intent, flag in _LIMITED_FLAGS.items() if self.privileged_intents & intent)

    async def send_interaction(self, payload: dict[str, Any]) -> float:
        """`register_interaction(payload)`, then an INTERACTION_CREATE dispatch to every gateway
        session (`dispatch_event`). Returns `time.monotonic()` taken just before the first frame
        was written. AssertionError when no client has a session (sent into the void)."""
        self.register_interaction(payload)
        return await self.dispatch_event("INTERACTION_CREATE", payload)

    async def dispatch_event(self, name: str, data: Any) -> float:
        """A dispatch (op 0, `t` = name) to every live session, each with its next sequence number;
        a session whose connection dropped (not with a session-ending code) keeps it for its
        RESUME, as Discord does. Returns the monotonic time just before the first write;
        AssertionError when there is no live session (nothing would ever receive it)."""
        live = [s for s in self.sessions.values() if not s.ended]
        if not live:
            raise AssertionError(f"no gateway connection to send {name} to; connections: {self.connections!r}")
        sent_at = time.monotonic()
        for session in live:
            await self._dispatch(session, name, data)
        return sent_at

    async def wait_connected(self, timeout: float = 5.0, count: int = 1) -> GatewayConnection:
        """The latest connection once `count` open connections have had their READY (or RESUMED);
        AssertionError listing the connections after `timeout` seconds."""
        def ready() -> list[GatewayConnection]:
            return [c for c in self.connections if c.open and c.ready_at is not None]
        await self._wait_until(lambda: len(ready()) >= count, timeout, f"{count} ready gateway connection(s)")
        return ready()[-1]

    async def wait_disconnected(self, timeout: float = 5.0) -> list[GatewayConnection]:
        """Every connection, once none is open any more."""
        await self._wait_until(lambda: bool(self.connections) and not any(c.open for c in self.connections),
                               timeout, "every gateway connection to close")
        return list(self.connections)

    async def disconnect(self, code: int = 4000, reason: str = "Unknown error.") -> None:
        """Close every open gateway connection with `code` (4000: Discord's "unknown error", after
        which a client RESUMEs; a code of SESSION_ENDING_CLOSES also ends the session)."""
        for conn in [c for c in self.connections if c.open]:
            await self._close(conn, code, reason)

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT to every open connection (the client should reconnect and RESUME)."""
        for conn in [c for c in self.connections if c.open]:
            await self._write(conn, {"op": OP_RECONNECT, "d": None, "s": None, "t": None})

    async def _wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            changed = self._changed
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout}s; connections: {self.connections!r}")
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    # --- reading back ----------------------------------------------------------------------
    def callbacks(self) -> list[Callback]:
        out = []
        for c in self.calls:
            if c.route == "POST /interactions/{id}/{token}/callback" and 200 <= c.status < 300:
                _, _, iid, token, _ = c.path.split("/", 4)
                body = c.json if isinstance(c.json, dict) else {}
                out.append(Callback(iid, token, int(body.get("type", 0)), body.get("data"), c))
        return out

    def followups(self) -> list[Call]:
        return [c for c in self.calls if c.route == "POST /webhooks/{app_id}/{token}" and 200 <= c.status < 300]

    def edits(self) -> list[Call]:
        """Accepted PATCHes of messages (interaction webhook @original/{id}, channel messages)."""
        return [c for c in self.calls if c.method == "PATCH" and "/messages/" in c.path and 200 <= c.status < 300]

    def message(self, message_id: str | int) -> dict[str, Any]:
        """The current state of a message (a copy); KeyError when unknown or deleted."""
        return copy.deepcopy(self.messages[str(message_id)])

    def channel_messages(self, channel_id: str | int) -> list[dict[str, Any]]:
        return [copy.deepcopy(m) for m in self.messages.values() if m["channel_id"] == str(channel_id)]

    def dm_messages(self, user_id: str | int) -> list[dict[str, Any]]:
        channel_id = self._dm_by_user.get(str(user_id))
        return self.channel_messages(channel_id) if channel_id else []

    def original(self, token: str) -> dict[str, Any]:
        """The current state of an interaction's original response message."""
        record = self.interactions[token]
        if record.original_id is None:
            raise KeyError(f"interaction {record.id} has no original response")
        return self.message(record.original_id)

    async def wait_for(self, predicate: Callable[[Call], bool], timeout: float = 5.0) -> Call:
        """The first recorded call the fake has acted on (status set) that matches `predicate`,
        waiting for it up to `timeout` seconds; AssertionError listing the calls otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed = self._changed
            for call in self.calls:
                if call.status and predicate(call):
                    return call
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = "\n".join(f"  {c.method} {c.path} -> {c.status or 'pending'}" for c in self.calls) or "  (none)"
                raise AssertionError(f"no matching Discord call within {timeout}s; calls:\n{seen}")
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    # --- HTTP plumbing ---------------------------------------------------------------------
    def _add_routes(self) -> None:
        r = self._route
        r("GET", "/users/@me", self._get_me)
        r("GET", "/users/{user_id}", self._get_user)
        r("GET", "/oauth2/applications/@me", self._get_application)
        r("GET", "/gateway/bot", self._get_gateway_bot)
        r("GET", "/gateway", self._get_gateway, auth=False)
        r("POST", "/users/@me/channels", self._open_dm_route)
        r("POST", "/interactions/{id}/{token}/callback", self._callback, auth=False)
        r("POST", "/webhooks/{app_id}/{token}", self._followup, auth=False)
        for method in ("GET", "PATCH", "DELETE"):
            r(method, "/webhooks/{app_id}/{token}/messages/{message_id}", self._webhook_message, auth=False)
        r("GET", "/channels/{channel_id}", self._get_channel)
        r("GET", "/channels/{channel_id}/messages", self._list_messages)
        r("POST", "/channels/{channel_id}/messages", self._post_message)
        r("POST", "/channels/{channel_id}/typing", self._typing)
        for method in ("GET", "PATCH", "DELETE"):
            r(method, "/channels/{channel_id}/messages/{message_id}", self._channel_message)
        for method in ("GET", "PUT"):
            r(method, "/applications/{app_id}/commands", self._commands)
            r(method, "/applications/{app_id}/guilds/{guild_id}/commands", self._commands)

    def _route(self, method: str, template: str, handler: Handler, *, auth: bool = True) -> None:
        pattern = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$")
        self._routes.append((method, pattern, f"{method} {template}", handler, auth))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        inner = path[len(API_PREFIX):] if path.startswith(API_PREFIX + "/") else None
        body, files = await self._read_body(request)
        headers = Headers({k.title(): v for k, v in request.headers.items()})
        call = Call(method=request.method, path=inner if inner is not None else path, query=dict(request.query),
                    json=body, headers=headers, received_at=time.monotonic(), files=files)
        self.calls.append(call)
        try:
            answer = await self._answer(call, inner)
        except _Refused as refused:
            answer = refused.answer
        call.status = answer.status
        call.answer = answer.body
        call.answered_at = time.monotonic()
        self._notify()
        sent = {"Via": "1.1 google", **answer.headers}
        if answer.body is None and answer.status == 204:
            return web.Response(status=204, headers=sent)
        raw = json.dumps(answer.body, separators=(",", ":")).encode()
        return web.Response(status=answer.status, body=raw, headers={**sent, "Content-Type": "application/json"})

    async def _read_body(self, request: web.Request) -> tuple[Any, list[dict[str, Any]]]:
        files: list[dict[str, Any]] = []
        if request.content_type.startswith("multipart/"):
            body: Any = None
            reader = await request.multipart()
            while True:
                part: Any = await reader.next()
                if part is None:
                    break
                data = await part.read(decode=False)
                if part.name == "payload_json":
                    body = json.loads(bytes(data).decode())
                else:
                    files.append({"field": part.name, "filename": part.filename, "size": len(data),
                                  "content_type": part.headers.get("Content-Type")})
            return body, files
        raw = await request.read()
        if not raw:
            return None, files
        try:
            return json.loads(raw), files
        except ValueError:
            return raw.decode(errors="replace"), files

    async def _answer(self, call: Call, inner: str | None) -> _Answer:
        if inner is None:
            raise _error(404, "404: Not Found")
        for method, pattern, seconds in self._delays:
            if method in ("*", call.method) and pattern.search(inner):
                await asyncio.sleep(seconds)
                break
        fault = self._take_fault(call.method, inner)
        match = None
        for method, pattern, name, handler, auth in self._routes:
            m = pattern.match(inner)
            if m and method == call.method:
                match = (name, handler, auth, m.groupdict())
                break
        if match:
            call.route = match[0]
        if fault is not None:
            return self._fault_answer(fault)
        if match is None:
            raise _error(404, "404: Not Found")
        _, handler, auth, params = match
        if auth and call.headers.get("Authorization") != f"Bot {self.token}":
            raise _error(401, "401: Unauthorized")
        return await handler(call, params)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.times > 0 and fault.method in ("*", method) and fault.pattern.search(path):
                fault.times -= 1
                return fault
        return None

    def _fault_answer(self, fault: _Fault) -> _Answer:
        headers: dict[str, str] = {}
        if fault.status == 429:
            wait = 1.0 if fault.retry_after is None else float(fault.retry_after)
            body = fault.body if fault.body is not None else {
                "message": "You are being rate limited.", "retry_after": wait, "global": fault.is_global}
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
            if fault.is_global:
                headers.update({"X-RateLimit-Global": "true", "X-RateLimit-Scope": "global"})
            else:
                bucket = hashlib.sha1(fault.pattern.pattern.encode()).hexdigest()[:16]
                headers.update({
                    "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": f"{time.time() + wait:.3f}", "X-RateLimit-Reset-After": f"{wait:.3f}",
                    "X-RateLimit-Bucket": bucket, "X-RateLimit-Scope": "user",
                })
            return _Answer(429, body, headers)
        if fault.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(fault.retry_after)))
        body = fault.body if fault.body is not None else {"message": _reason(fault.status), "code": 0}
        return _Answer(fault.status, body, headers)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- state helpers ---------------------------------------------------------------------
    def _interaction(self, token: str, interaction_id: str | None = None) -> _Interaction:
        record = self.interactions.get(token)
        if record is None:
            record = self.interactions[token] = _Interaction(id=str(interaction_id or ""), token=token)
        elif interaction_id and not record.id:
            record.id = str(interaction_id)
        return record

    def _open_dm(self, user_id: str, channel_id: str) -> dict[str, Any]:
        self._dm_by_user.setdefault(user_id, channel_id)
        cid = self._dm_by_user[user_id]
        if cid not in self.channels:
            self.channels[cid] = dm_channel_object(cid, self._user(user_id))
        return self.channels[cid]

    def _user(self, user_id: str) -> dict[str, Any]:
        if user_id == self.bot_user_id:
            return user_object(self.bot_user_id, self.bot_user["username"], bot=True)
        return self.users.setdefault(user_id, user_object(user_id))

    def _channel(self, channel_id: str) -> dict[str, Any]:
        if not channel_id.isdigit():
            raise _error(404, "Unknown Channel", 10003)
        if channel_id not in self.channels:
            self.channels[channel_id] = text_channel_object(channel_id, self.guild_id)
        return self.channels[channel_id]

    @staticmethod
    def _check_body(body: dict[str, Any]) -> None:
        errors: dict[str, Any] = {}
        content = body.get("content")
        if isinstance(content, str) and len(content) > MAX_CONTENT:
            errors["content"] = {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH",
                                              "message": f"Must be {MAX_CONTENT} or fewer in length."}]}
        embeds = body.get("embeds") or []
        if len(embeds) > MAX_EMBEDS:
            errors["embeds"] = {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH",
                                             "message": f"Must be {MAX_EMBEDS} or fewer in length."}]}
        total = 0
        for embed in embeds:
            total += len(embed.get("title") or "") + len(embed.get("description") or "")
            total += len((embed.get("footer") or {}).get("text") or "") + len((embed.get("author") or {}).get("name") or "")
            total += sum(len(f.get("name") or "") + len(f.get("value") or "") for f in embed.get("fields") or [])
        if total > MAX_EMBED_CHARS:
            errors["embeds"] = {"_errors": [{"code": "MAX_EMBED_SIZE_EXCEEDED", "message": "Embed size exceeds maximum size of 6000"}]}
        if errors:
            raise _error(400, "Invalid Form Body", 50035, errors=errors)

    def _new_message(self, channel_id: str, body: dict[str, Any], files: list[dict[str, Any]], *,
                     webhook: bool = False, kind: int = 0, flags: int | None = None) -> dict[str, Any]:
        self._check_body(body)
        message_id = next_snowflake()
        message: dict[str, Any] = {
            "id": message_id, "channel_id": channel_id, "author": self._user(self.bot_user_id),
            "content": body.get("content") or "", "timestamp": iso_now(), "edited_timestamp": None,
            "tts": bool(body.get("tts", False)), "mention_everyone": False, "mentions": [], "mention_roles": [],
            "attachments": self._attachments(body, files), "embeds": body.get("embeds") or [],
            "pinned": False, "type": kind, "flags": int(body.get("flags") or 0) if flags is None else flags,
            "components": body.get("components") or [],
        }
        channel = self.channels.get(channel_id)
        if channel and channel.get("guild_id"):
            message["guild_id"] = channel["guild_id"]
        if webhook:
            message["webhook_id"] = self.app_id
            message["application_id"] = self.app_id
        if body.get("message_reference"):
            message["message_reference"] = body["message_reference"]
        self.messages[message_id] = message
        if channel is not None:
            channel["last_message_id"] = message_id
        return message

    @staticmethod
    def _attachments(body: dict[str, Any], files: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for i, f in enumerate(files):
            described = next((a for a in body.get("attachments") or [] if str(a.get("id")) == str(i)), {})
            name = described.get("filename") or f["filename"] or f"file{i}"
            aid = next_snowflake()
            url = f"https://cdn.discordapp.com/attachments/0/{aid}/{name}"
            out.append({"id": aid, "filename": name, "size": f["size"], "url": url, "proxy_url": url,
                        "content_type": f.get("content_type")})
        return out

    def _edit(self, message: dict[str, Any], body: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, Any]:
        self._check_body(body)
        for key in ("content", "embeds", "components"):
            if key in body:
                message[key] = body[key] if body[key] is not None else ("" if key == "content" else [])
        if "flags" in body and body["flags"] is not None:
            # only SUPPRESS_EMBEDS (1<<2) can change on an edit; EPHEMERAL/LOADING stay as they were
            message["flags"] = (message["flags"] & ~4) | (int(body["flags"]) & 4)
        message["flags"] &= ~LOADING
        if "attachments" in body or files:
            kept = [a for a in message.get("attachments", []) if any(str(k.get("id")) == a["id"] for k in body.get("attachments") or [])]
            message["attachments"] = kept + self._attachments(body, files)
        message["edited_timestamp"] = iso_now()
        return message

    # --- routes: users, application, gateway ------------------------------------------------
    async def _get_me(self, call: Call, p: dict[str, str]) -> _Answer:
        return _Answer(200, self.bot_user)

    async def _get_user(self, call: Call, p: dict[str, str]) -> _Answer:
        if not p["user_id"].isdigit():
            raise _error(404, "Unknown User", 10013)
        return _Answer(200, self._user(p["user_id"]))

    async def _get_application(self, call: Call, p: dict[str, str]) -> _Answer:
        bot = user_object(self.bot_user_id, self.bot_user["username"], bot=True)
        return _Answer(200, {
            "id": self.app_id, "name": self.bot_user["username"], "icon": None, "description": "GPU chat-ops",
            "summary": "", "type": None, "bot": bot, "bot_public": False, "bot_require_code_grant": False,
            "verify_key": "0" * 64, "owner": self.owner, "team": None, "flags": self.application_flags, "hook": True,
            "redirect_uris": [], "interactions_endpoint_url": None, "role_connections_verification_url": None,
            "tags": [], "integration_types_config": {"0": {}}, "approximate_guild_count": 1,
            "install_params": {"scopes": ["bot", "applications.commands"], "permissions": "0"},
        })

    async def _get_gateway_bot(self, call: Call, p: dict[str, str]) -> _Answer:
        return _Answer(200, {"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1}})

    async def _get_gateway(self, call: Call, p: dict[str, str]) -> _Answer:
        return _Answer(200, {"url": self.gateway_url})

    async def _open_dm_route(self, call: Call, p: dict[str, str]) -> _Answer:
        body = call.json if isinstance(call.json, dict) else {}
        recipient = str(body.get("recipient_id", ""))
        if not recipient.isdigit():
            raise _error(400, "Invalid Form Body", 50035, errors={"recipient_id": {"_errors": [
                {"code": "NUMBER_TYPE_COERCE", "message": "Value is not snowflake."}]}})
        return _Answer(200, self._open_dm(recipient, next_snowflake()))

    # --- routes: interactions ---------------------------------------------------------------
    async def _callback(self, call: Call, p: dict[str, str]) -> _Answer:
        record = self._interaction(p["token"], p["id"])
        if record.id != p["id"] or record.expired:
            raise _error(404, "Unknown interaction", 10062)
        if record.responded is not None:
            raise _error(400, "Interaction has already been acknowledged.", 40060)
        body = call.json if isinstance(call.json, dict) else {}
        kind = int(body.get("type", 0))
        data = body.get("data") or {}
        if record.type is not None and kind not in VALID_CALLBACKS.get(record.type, set()):
            raise _error(400, "Invalid Form Body", 50035, errors={"type": {"_errors": [
                {"code": "INTERACTION_RESPONSE_TYPE_INVALID", "message": "Interaction response type is invalid."}]}})
        if kind not in (1, 4, 5, 6, 7, 8, 9, 10, 12):
            raise _error(400, "Invalid Form Body", 50035)
        channel_id = record.channel_id or ""
        message: dict[str, Any] | None = None
        if kind == 4:
            message = self._new_message(channel_id, data, call.files, webhook=True, kind=20 if record.type == 2 else 19)
            record.original_id = message["id"]
        elif kind == 5:
            message = self._new_message(channel_id, {}, [], webhook=True, kind=20 if record.type == 2 else 19,
                                        flags=LOADING | (int(data.get("flags") or 0) & EPHEMERAL))
            record.original_id = message["id"]
        elif kind in (6, 7):
            record.original_id = record.message_id
            if kind == 7 and record.message_id in self.messages:
                message = self._edit(self.messages[record.message_id], data, call.files)
        record.responded = kind
        if call.query.get("with_response", "").lower() not in ("true", "1"):
            return _Answer(204)
        inferred = record.type or (4 if kind == 8 else 3 if kind in (6, 7) else 2)
        interaction: dict[str, Any] = {"id": record.id, "type": inferred}
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5, 7) and record.original_id:
            interaction["response_message_id"] = record.original_id
            interaction["response_message_loading"] = kind == 5
            flags = self.messages[record.original_id]["flags"] if record.original_id in self.messages else 0
            interaction["response_message_ephemeral"] = bool(flags & EPHEMERAL)
        if kind in (4, 7) and message is not None:
            resource["message"] = copy.deepcopy(message)
        return _Answer(200, {"interaction": interaction, "resource": resource})

    def _webhook_interaction(self, p: dict[str, str]) -> _Interaction:
        if p["app_id"] != self.app_id:
            raise _error(404, "Unknown Webhook", 10015)
        record = self._interaction(p["token"])
        if record.expired:
            raise _error(404, "Unknown Webhook", 10015)
        return record

    async def _followup(self, call: Call, p: dict[str, str]) -> _Answer:
        record = self._webhook_interaction(p)
        body = call.json if isinstance(call.json, dict) else {}
        original = self.messages.get(record.original_id or "")
        if record.responded == 5 and original is not None and original["flags"] & LOADING:
            return _Answer(200, copy.deepcopy(self._edit(original, body, call.files)))
        flags = int(body.get("flags") or 0) & (EPHEMERAL | 4 | 4096 | 32768)
        message = self._new_message(record.channel_id or "", body, call.files, webhook=True, flags=flags)
        record.followup_ids.append(message["id"])
        return _Answer(200, copy.deepcopy(message))

    async def _webhook_message(self, call: Call, p: dict[str, str]) -> _Answer:
        record = self._webhook_interaction(p)
        wanted = record.original_id if p["message_id"] == "@original" else p["message_id"]
        owned = {record.original_id, *record.followup_ids}
        if wanted is None or wanted not in owned or wanted not in self.messages:
            raise _error(404, "Unknown Message", 10008)
        return self._message_op(call, wanted)

    def _message_op(self, call: Call, message_id: str) -> _Answer:
        message = self.messages[message_id]
        if call.method == "GET":
            return _Answer(200, copy.deepcopy(message))
        if call.method == "DELETE":
            del self.messages[message_id]
            self.deleted.add(message_id)
            return _Answer(204)
        body = call.json if isinstance(call.json, dict) else {}
        return _Answer(200, copy.deepcopy(self._edit(message, body, call.files)))

    # --- routes: channels and messages ------------------------------------------------------
    async def _get_channel(self, call: Call, p: dict[str, str]) -> _Answer:
        return _Answer(200, copy.deepcopy(self._channel(p["channel_id"])))

    async def _list_messages(self, call: Call, p: dict[str, str]) -> _Answer:
        self._channel(p["channel_id"])
        limit = min(max(int(call.query.get("limit", "50")), 1), 100)
        found = self.channel_messages(p["channel_id"])
        return _Answer(200, list(reversed(found))[:limit])       # newest first, as Discord answers

    async def _post_message(self, call: Call, p: dict[str, str]) -> _Answer:
        channel = self._channel(p["channel_id"])
        if channel.get("type") == 1 and channel["recipients"][0]["id"] in self._closed_dms:
            raise _error(403, "Cannot send messages to this user", 50007)
        body = call.json if isinstance(call.json, dict) else {}
        if not (body.get("content") or body.get("embeds") or body.get("components") or call.files
                or body.get("sticker_ids") or body.get("poll")):
            raise _error(400, "Cannot send an empty message", 50006)
        flags = int(body.get("flags") or 0) & (4 | 4096 | 32768)     # SUPPRESS_EMBEDS, SUPPRESS_NOTIFICATIONS, COMPONENTS_V2
        return _Answer(200, copy.deepcopy(self._new_message(p["channel_id"], body, call.files, flags=flags)))

    async def _typing(self, call: Call, p: dict[str, str]) -> _Answer:
        self._channel(p["channel_id"])
        return _Answer(204)

    async def _channel_message(self, call: Call, p: dict[str, str]) -> _Answer:
        self._channel(p["channel_id"])
        message = self.messages.get(p["message_id"])
        if message is None or message["channel_id"] != p["channel_id"]:
            raise _error(404, "Unknown Message", 10008)
        if call.method == "PATCH" and message["author"]["id"] != self.bot_user_id:
            raise _error(403, "Cannot edit a message authored by another user", 50005)
        return self._message_op(call, p["message_id"])

    # --- routes: application commands -------------------------------------------------------
    async def _commands(self, call: Call, p: dict[str, str]) -> _Answer:
        if p["app_id"] != self.app_id:
            raise _error(404, "Unknown Application", 10002)
        guild = p.get("guild_id")
        if call.method == "GET":
            return _Answer(200, copy.deepcopy(self.commands.get(guild, [])))
        wanted = call.json if isinstance(call.json, list) else None
        if wanted is None:
            raise _error(400, "Invalid Form Body", 50035)
        before = {(c["name"], c.get("type", 1)): c for c in self.commands.get(guild, [])}
        stored = []
        for spec in wanted:
            old = before.get((spec["name"], spec.get("type", 1)))
            command = {
                "type": 1, "description": "", "options": [], "default_member_permissions": None, "nsfw": False,
                **spec,
                "id": old["id"] if old else next_snowflake(),
                "application_id": self.app_id,
                "version": next_snowflake(),
            }
            if guild is not None:
                command["guild_id"] = guild
            stored.append(command)
        self.commands[guild] = stored
        return _Answer(200, copy.deepcopy(stored))

    # --- gateway (websocket) ----------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        wanted = request.query.get("compress")
        conn = GatewayConnection(number=len(self.connections) + 1, query=dict(request.query),
                                 compress="zlib-stream" if self.gateway_compression and wanted == "zlib-stream" else None,
                                 opened_at=time.monotonic(), ws=ws)
        if conn.compress:
            conn._zlib = zlib.compressobj()
        self.connections.append(conn)
        self._notify()
        try:
            if request.query.get("v", GATEWAY_VERSION) != GATEWAY_VERSION:
                await self._close(conn, 4012, "Invalid API version.")
            elif request.query.get("encoding", "json") != "json":
                await self._close(conn, 4002, "Error while decoding payload (the fake speaks JSON only).")
            else:
                await self._write(conn, {"op": OP_HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms},
                                         "s": None, "t": None})
                async for msg in ws:
                    if msg.type is WSMsgType.TEXT:
                        await self._gateway_message(conn, msg.data)
                    elif msg.type is WSMsgType.BINARY:        # clients send JSON text; Discord does not inflate
                        await self._close(conn, 4002, "Error while decoding payload.")
                    if not conn.open:
                        break
        finally:
            if conn.closed_at is None:
                conn.closed_at = time.monotonic()
                conn.close_code = ws.close_code
                conn.closed_by = "client"
            session = conn.session
            if session is not None and session.connection is conn:
                session.connection = None
                if conn.close_code in SESSION_ENDING_CLOSES:
                    session.ended = True
            self._notify()
        return ws

    async def _gateway_message(self, conn: GatewayConnection, text: str) -> None:
        try:
            frame = json.loads(text)
            op = frame["op"]
            data = frame.get("d")
        except (ValueError, KeyError, TypeError):
            await self._close(conn, 4002, "Error while decoding payload.")
            return
        conn.ops.append(op)
        if op == OP_HEARTBEAT:
            conn.heartbeats.append(data)
            await self._write(conn, {"op": OP_HEARTBEAT_ACK, "d": None, "s": None, "t": None})
        elif op not in CLIENT_OPS:
            await self._close(conn, 4001, "Unknown opcode.")
        elif op == OP_IDENTIFY:
            await self._identify(conn, data)
        elif op == OP_RESUME:
            await self._resume(conn, data)
        elif conn.session is None:
            await self._close(conn, 4003, "Not authenticated.")
        # presence updates, voice states and member requests are accepted and ignored

    async def _identify(self, conn: GatewayConnection, data: Any) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("properties"), dict):
            await self._close(conn, 4002, "Error while decoding payload.")
            return
        identify = Identify(copy.deepcopy(data))
        self.identified.append(identify)              # every IDENTIFY received, refused ones too
        if conn.session is not None:
            await self._close(conn, 4005, "Already authenticated.")
            return
        conn.identify = identify
        intents = data.get("intents")
        if not identify.has_token(self.token):
            await self._close(conn, 4004, "Authentication failed.")
            return
        if not isinstance(intents, int) or isinstance(intents, bool) or intents < 0 or intents & ~ALL_INTENTS:
            await self._close(conn, 4013, "Invalid intent(s).")
            return
        if intents & PRIVILEGED_INTENTS & ~self.privileged_intents:
            await self._close(conn, 4014, "Disallowed intent(s).")
            return
        session = _Session(id=secrets.token_hex(16), intents=intents, connection=conn)
        self.sessions[session.id] = session
        conn.session = session
        ready: dict[str, Any] = {
            "v": int(GATEWAY_VERSION), "user": copy.deepcopy(self.bot_user),
            "guilds": [{"id": self.guild_id, "unavailable": True}],
            "session_id": session.id, "resume_gateway_url": self.gateway_url,
            "application": {"id": self.app_id, "flags": self.application_flags},
        }
        if isinstance(data.get("shard"), list):
            ready["shard"] = data["shard"]
        await self._dispatch(session, "READY", ready)
        conn.ready_at = time.monotonic()
        if intents & INTENT_GUILDS:
            await self._dispatch(session, "GUILD_CREATE", self._guild_create())
        self._notify()

    async def _resume(self, conn: GatewayConnection, data: Any) -> None:
        if conn.session is not None:
            await self._close(conn, 4005, "Already authenticated.")
            return
        data = data if isinstance(data, dict) else {}
        session = self.sessions.get(str(data.get("session_id")))
        if not secrets.compare_digest(str(data.get("token", "")), self.token):
            await self._close(conn, 4004, "Authentication failed.")
            return
        if session is None or session.ended or (session.connection is not None and session.connection.open):
            await self._write(conn, {"op": OP_INVALID_SESSION, "d": False, "s": None, "t": None})
            return
        seq = data.get("seq") if isinstance(data.get("seq"), int) else 0
        if seq > session.seq:
            await self._close(conn, 4007, "Invalid seq.")
            return
        conn.session, conn.resumed = session, session.id
        async with conn.lock:
            # attached and snapshotted at once: later dispatches queue behind the replay on the lock
            session.connection = conn
            missed = [frame for s, frame in session.events if s > seq]
            for frame in missed:
                await self._send_text(conn, frame)
        await self._dispatch(session, "RESUMED", {})
        conn.ready_at = time.monotonic()
        self._notify()

    def _guild_create(self) -> dict[str, Any]:
        channels = [CHANNEL_ID, *(cid for cid, c in self.channels.items()
                                          if c.get("guild_id") == self.guild_id and c.get("type") == 0)]
        payload = guild_create(self.guild_id, self.guild_roles, name=self.guild_name,
                               channels=list(dict.fromkeys(channels)))
        payload["members"] = [{   # Discord includes the bot's own member (discord.py's guild.me)
            "user": user_object(self.bot_user_id, self.bot_user["username"], bot=True), "roles": [],
            "joined_at": payload["joined_at"], "premium_since": None, "nick": None, "avatar": None,
            "deaf": False, "mute": False, "pending": False, "flags": 0, "communication_disabled_until": None,
        }]
        return payload

    async def _dispatch(self, session: _Session, name: str, data: Any) -> None:
        session.seq += 1
        frame = json.dumps({"op": OP_DISPATCH, "d": data, "s": session.seq, "t": name}, separators=(",", ":"))
        session.events.append((session.seq, frame))
        del session.events[:-1000]
        conn = session.connection
        if conn is not None and conn.open:
            async with conn.lock:     # taken with no await since the seq: frames leave in seq order
                await self._send_text(conn, frame)

    async def _write(self, conn: GatewayConnection, frame: dict[str, Any]) -> None:
        async with conn.lock:
            await self._send_text(conn, json.dumps(frame, separators=(",", ":")))

    async def _send_text(self, conn: GatewayConnection, text: str) -> None:
        """One gateway message: a text frame, or with zlib-stream a binary frame holding the
        message deflated on the connection's one zlib stream up to a Z_SYNC_FLUSH (00 00 ff ff)."""
        if conn.ws.closed:
            return
        try:
            if conn._zlib is not None:
                await conn.ws.send_bytes(conn._zlib.compress(text.encode()) + conn._zlib.flush(zlib.Z_SYNC_FLUSH))
            else:
                await conn.ws.send_str(text)
        except (ConnectionError, RuntimeError):
            pass                       # the client went away mid-send; the handler records the close

    async def _close(self, conn: GatewayConnection, code: int, reason: str) -> None:
        if conn.closed_at is not None:
            return
        conn.closed_at, conn.close_code, conn.closed_by = time.monotonic(), code, "fake"
        session = conn.session
        if session is not None and session.connection is conn:
            session.connection = None
            if code in SESSION_ENDING_CLOSES:
                session.ended = True
        self._notify()
        await conn.ws.close(code=code, message=reason.encode()[:123])
