"""A loopback stand-in for Slack: the Web API, response_urls and a Socket Mode websocket on
127.0.0.1, driven by the real slack_sdk / slack-bolt clients, as bolt-python tests itself offline
(a mock Web API server in a thread, `base_url` pointed at it, response_urls pointed at it; see
shared/reference/chat_and_notebook_platforms.md §1.8). Plus helpers that build Slack's exact
request bodies (slash command form, block_actions payload, app_home_opened event) and sign them.

Decisions:

* aiohttp's web server, not tests/fakes/loopback.py: Socket Mode needs a websocket, and one server
  for all three surfaces keeps a single port and a single request log. It runs in its OWN thread
  with its own event loop, so it answers while the test's loop is busy (or blocked); the test
  side reads state under a lock and waits by polling (`wait_for`, `ack`, `wait_connected`).
* Paths: Web API methods at `/api/<method>` (GET or POST; `api_url` ends with "/" as slack_sdk
  needs), response_urls at `/response/<name>`, the websocket at `/link/` (Slack's own path).
* Bodies: JSON, form-encoded, and query parameters are merged into `Call.params` (slack_sdk
  sends JSON for chat.*/views.*, query parameters for users.info and apps.connections.open, and
  form bodies when called with `data=`). Form fields that carry JSON (blocks, attachments, view,
  metadata, ...) are decoded, so a test sees the same objects whichever way they were sent.
* Tokens: `Authorization: Bearer` (or a `token` field, the legacy way). Missing -> `not_authed`;
  a token of the other kind (bot token on apps.connections.open, app token on a bot method) ->
  `not_allowed_token_type`, as Slack answers; anything else wrong -> `invalid_auth`. All HTTP 200.
* `fail()` is checked before the token, like a rate limiter in front of the API. A failing HTTP
  status answers JSON `{"ok": false, "error": ...}` (429 -> "ratelimited", which slack_sdk's
  Socket Mode client also looks for; 5xx -> "internal_error"/"service_unavailable") so that
  `SlackApiError.response["error"]` works; `Retry-After` is sent as whole seconds, as Slack does
  (rounded up; slack_sdk's RateLimitErrorRetryHandler parses it with int()).
* Messages: `ts` comes from one counter for the whole fake, "1700000000.000100", ".000200", ...
  so it is strictly increasing and the first posted message has the ts that
  `block_actions_payload` assumes by default. Posting to a user id ("U..."/"W...") lands in the
  DM "D<user id>", the channel `conversations.open` returns. chat.postMessage checks what Slack
  checks cheaply: a channel (`channel_not_found`), some text/blocks/attachments (`no_text`),
  blocks a list of ≤50 objects with a "type" (`invalid_blocks`).
* response_url answers HTTP 200 with the plain text "ok", as Slack does (slack_sdk's
  (Async)WebhookClient reads any text; bolt's `respond()` uses it), rather than `{"ok": true}`.
  A response_url may be bound to a message (`response_url(name, channel=, ts=)`); then
  `replace_original` / `delete_original` act on `message(channel, ts)`. `fail()` on
  "response_url:<name>" answers `status` with a text body, or with `error`, 404 and that text
  (e.g. "expired_url").
* Socket Mode: `apps.connections.open` returns `socket_url`. On connect the fake sends `hello`
  (`num_connections`, `debug_info`, `connection_info.app_id`), answers pings (aiohttp's autoping)
  and records every text frame; a frame with an `envelope_id` is that envelope's ack. Envelopes
  carry `accepts_response_payload` (true for slash_commands and for the interactive types that
  take a response: view_submission, block_suggestion) and, for events_api only (as Slack sends
  them), `retry_attempt`/`retry_reason`. `send()` waits up to `timeout` for a connection. The
  app sends to the newest open connection; `disconnect()` sends Slack's `disconnect` message
  (slack_sdk then reconnects through apps.connections.open).
* `wait_for` returns every matching call seen by then (at least `n`), in order.
* `users` starts with U1 = alice, the default user of the helpers.

Stop the Socket Mode client before the fake: stopping closes the websocket, and a still-running
client then retries apps.connections.open against a closed port until it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from aiohttp import WSMsgType, web

BOT_ID = "B0BOT"
BOT_NAME = "gpuherd"
TEAM_DOMAIN = "gpuherd-test"
TS_BASE = 1_700_000_000
JSON_FIELDS = frozenset({"blocks", "attachments", "view", "metadata", "unfurls", "user_auth_blocks", "options"})
BOT_METHODS = frozenset({"auth.test", "chat.postMessage", "chat.update", "chat.postEphemeral", "conversations.open",
                         "views.publish", "users.info"})
APP_METHODS = frozenset({"apps.connections.open"})
RESPONSE_PREFIX = "response_url:"
STATUS_ERRORS = {429: "ratelimited", 500: "internal_error", 502: "internal_error", 503: "service_unavailable",
                 504: "request_timeout"}
INTERACTIVE_WITH_RESPONSE = frozenset({"view_submission", "block_suggestion"})


@dataclass
class Call:
    method: str                  # "chat.postMessage", ..., or "response_url:<name>"
    params: dict[str, Any]       # decoded body and query (JSON-string fields decoded to objects)
    headers: dict[str, str]
    at: float                    # time.monotonic() when received
    status: int = 200            # the HTTP status the fake answered
    raw: bytes = b""             # the body as received


@dataclass
class _Failure:
    status: int
    retry_after: float | None
    error: str | None


@dataclass
class _Hook:
    channel: str | None = None
    ts: str | None = None


@dataclass
class _Ack:
    message: dict[str, Any]
    at: float


@dataclass
class _State:
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, deque[_Failure]] = field(default_factory=dict)
    messages: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    homes: dict[str, dict[str, Any]] = field(default_factory=dict)
    hooks: dict[str, _Hook] = field(default_factory=dict)
    acks: dict[str, _Ack] = field(default_factory=dict)
    envelopes: list[dict[str, Any]] = field(default_factory=list)
    socket_messages: list[dict[str, Any]] = field(default_factory=list)
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    connections_opened: int = 0
    ts_counter: int = 0
    view_counter: int = 0


class FakeSlack:
    def __init__(self, *, bot_token: str = "xoxb-test", app_token: str = "xapp-test", team_id: str = "T0TEAM",
                 bot_user_id: str = "UB0T", app_id: str = "A0APP") -> None:
        self.bot_token = bot_token
        self.app_token = app_token
        self.team_id = team_id
        self.bot_user_id = bot_user_id
        self.app_id = app_id
        self.users: dict[str, dict[str, Any]] = {
            "U1": {"name": "alice", "real_name": "Alice Example", "display_name": "alice"},
        }
        self._lock = threading.RLock()
        self._state = _State()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> FakeSlack:
        if self._thread is not None:
            return self
        ready = threading.Event()
        problem: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:  # reported to start()'s caller
                problem.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="FakeSlack", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("FakeSlack did not start within 10 s")
        if problem:
            self._thread.join()
            self._thread = None
            raise RuntimeError("FakeSlack failed to start") from problem[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FakeSlack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _startup(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{name}", self._response_url)
        app.router.add_get("/link/", self._socket)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._port = runner.addresses[0][1]

    async def _shutdown(self) -> None:
        with self._lock:
            sockets = list(self._state.sockets)
        for ws in sockets:
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"server stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- addresses -----------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._port is not None, "FakeSlack not started"
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/"

    @property
    def socket_url(self) -> str:
        assert self._port is not None, "FakeSlack not started"
        return f"ws://127.0.0.1:{self._port}/link/?ticket=fake-ticket&app_id={self.app_id}"

    def response_url(self, name: str, *, channel: str | None = None, ts: str | None = None) -> str:
        """A response_url under the fake; POSTs to it are recorded as "response_url:<name>". Bound
        to (channel, ts), `replace_original` / `delete_original` act on that stored message."""
        with self._lock:
            self._state.hooks[name] = _Hook(channel, ts)
        return f"{self.base_url}/response/{quote(name, safe='')}"

    # --- the record ----------------------------------------------------------------------
    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._state.calls)

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self._state.calls if c.method == method]

    async def wait_for(self, method: str, n: int = 1, *, timeout: float = 5.0,
                       where: Callable[[Call], bool] | None = None) -> list[Call]:
        deadline = time.monotonic() + timeout
        while True:
            found = [c for c in self.calls_to(method) if where is None or where(c)]
            if len(found) >= n:
                return found
            if time.monotonic() >= deadline:
                seen = "\n  ".join(f"{c.method} [{c.status}] {_brief(c.params)}" for c in self.calls) or "(nothing)"
                raise AssertionError(f"wanted {n} call(s) to {method}{' matching' if where else ''} within {timeout:g} s, "
                                     f"got {len(found)}; seen:\n  {seen}")
            await asyncio.sleep(0.005)

    def message(self, channel: str, ts: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._state.messages.get((channel, ts))
            return copy.deepcopy(found) if found is not None else None

    def home(self, user_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._state.homes.get(user_id)
            return copy.deepcopy(found) if found is not None else None

    def fail(self, method: str, *, status: int = 500, times: int = 1, retry_after: float | None = None,
             error: str | None = None) -> None:
        with self._lock:
            queue = self._state.failures.setdefault(method, deque())
            for _ in range(times):
                queue.append(_Failure(status, retry_after, error))

    # --- Socket Mode (test side) ---------------------------------------------------------
    @property
    def envelopes(self) -> list[dict[str, Any]]:
        """Every envelope pushed to the app, in order."""
        with self._lock:
            return copy.deepcopy(self._state.envelopes)

    @property
    def socket_messages(self) -> list[dict[str, Any]]:
        """Every text frame the app sent (acks included), decoded."""
        with self._lock:
            return copy.deepcopy(self._state.socket_messages)

    @property
    def connections_opened(self) -> int:
        with self._lock:
            return self._state.connections_opened

    def _live_socket(self) -> web.WebSocketResponse | None:
        with self._lock:
            live = [ws for ws in self._state.sockets if not ws.closed]
        return live[-1] if live else None

    async def wait_connected(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self._live_socket() is None:
            if time.monotonic() >= deadline:
                raise AssertionError(f"no Socket Mode connection within {timeout:g} s "
                                     f"(apps.connections.open calls: {len(self.calls_to('apps.connections.open'))})")
            await asyncio.sleep(0.005)

    async def send(self, type: str, payload: dict[str, Any], *, retry_attempt: int = 0, retry_reason: str = "",
                   envelope_id: str | None = None, accepts_response_payload: bool | None = None,
                   timeout: float = 5.0) -> str:
        await self.wait_connected(timeout)
        eid = envelope_id or str(uuid.uuid4())
        if accepts_response_payload is None:
            accepts_response_payload = type == "slash_commands" or (
                type == "interactive" and payload.get("type") in INTERACTIVE_WITH_RESPONSE)
        envelope: dict[str, Any] = {"envelope_id": eid, "type": type, "payload": payload,
                                    "accepts_response_payload": accepts_response_payload}
        if type == "events_api" or retry_attempt or retry_reason:
            envelope["retry_attempt"] = retry_attempt
            envelope["retry_reason"] = retry_reason
        await self._on_loop(self._push(envelope))
        return eid

    async def disconnect(self, reason: str = "refresh_requested") -> None:
        """Slack's `disconnect` message; slack_sdk answers by opening a new connection."""
        await self.wait_connected()
        await self._on_loop(self._push({"type": "disconnect", "reason": reason,
                                        "debug_info": {"host": "applink-fake"}}, record=False))

    async def ack(self, envelope_id: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = self._state.acks.get(envelope_id)
            if found is not None:
                return copy.deepcopy(found.message)
            if time.monotonic() >= deadline:
                with self._lock:
                    acked = list(self._state.acks)
                raise AssertionError(f"no ack for envelope {envelope_id} within {timeout:g} s; acked: {acked or 'none'}")
            await asyncio.sleep(0.005)

    def acked_at(self, envelope_id: str) -> float | None:
        with self._lock:
            found = self._state.acks.get(envelope_id)
        return found.at if found is not None else None

    async def _on_loop(self, coro: Any) -> Any:
        assert self._loop is not None, "FakeSlack not started"
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _push(self, message: dict[str, Any], *, record: bool = True) -> None:
        ws = self._live_socket()
        if ws is None:
            raise AssertionError("no Socket Mode connection")
        if record:
            with self._lock:
                self._state.envelopes.append(copy.deepcopy(message))
        await ws.send_str(json.dumps(message))

    # --- Socket Mode (server side) -------------------------------------------------------
    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        with self._lock:
            self._state.sockets.append(ws)
            self._state.connections_opened += 1
            live = sum(1 for s in self._state.sockets if not s.closed)
        await ws.send_str(json.dumps({
            "type": "hello", "num_connections": live,
            "debug_info": {"host": "applink-fake", "build_number": 1, "approximate_connection_time": 18060},
            "connection_info": {"app_id": self.app_id},
        }))
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                at = time.monotonic()
                try:
                    message = json.loads(frame.data)
                except ValueError:
                    message = {"_raw": frame.data}
                with self._lock:
                    self._state.socket_messages.append(message)
                    if isinstance(message, dict) and message.get("envelope_id"):
                        self._state.acks.setdefault(str(message["envelope_id"]), _Ack(message, at))
        finally:
            with self._lock:
                self._state.sockets = [s for s in self._state.sockets if s is not ws]
        return ws

    # --- Web API -------------------------------------------------------------------------
    async def _read(self, request: web.Request) -> tuple[dict[str, Any], bytes]:
        params: dict[str, Any] = dict(request.query)
        raw = b""
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            for key, value in form.items():
                params[key] = value if isinstance(value, str) else getattr(value, "filename", "")
        else:
            raw = await request.read()
            if raw:
                if request.content_type == "application/json":
                    body = json.loads(raw)
                    params.update(body if isinstance(body, dict) else {"_body": body})
                else:
                    params.update(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        for key in JSON_FIELDS & params.keys():
            value = params[key]
            if isinstance(value, str) and value[:1] in ("[", "{"):
                with contextlib.suppress(ValueError):
                    params[key] = json.loads(value)
        return params, raw

    def _record(self, method: str, params: dict[str, Any], request: web.Request, raw: bytes, at: float) -> Call:
        call = Call(method, params, dict(request.headers), at, raw=raw)
        with self._lock:
            self._state.calls.append(call)
        return call

    def _next_failure(self, method: str) -> _Failure | None:
        with self._lock:
            queue = self._state.failures.get(method)
            return queue.popleft() if queue else None

    async def _api(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        method = request.match_info["method"]
        params, raw = await self._read(request)
        with self._lock:
            call = self._record(method, params, request, raw, at)
            failure = self._next_failure(method)
            if failure is not None:
                if failure.error is not None:
                    return _json({"ok": False, "error": failure.error})
                call.status = failure.status
                headers = {}
                if failure.retry_after is not None:
                    headers["Retry-After"] = str(max(0, math.ceil(failure.retry_after)))
                return _json({"ok": False, "error": STATUS_ERRORS.get(failure.status, "internal_error")},
                             status=failure.status, headers=headers)
            denied = self._check_token(method, params, request)
            if denied is not None:
                return _json({"ok": False, "error": denied})
            handler = getattr(self, "_m_" + method.replace(".", "_"), None)
            if handler is None:
                return _json({"ok": False, "error": "unknown_method"})
            return _json(handler(params))

    def _check_token(self, method: str, params: dict[str, Any], request: web.Request) -> str | None:
        if method == "api.test":
            return None
        auth = request.headers.get("Authorization", "")
        token = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else str(params.get("token") or "")
        if not token:
            return "not_authed"
        wanted, other = (self.app_token, self.bot_token) if method in APP_METHODS else (self.bot_token, self.app_token)
        if token == wanted:
            return None
        return "not_allowed_token_type" if token == other else "invalid_auth"

    def _next_ts(self) -> str:
        self._state.ts_counter += 100
        n = self._state.ts_counter
        return f"{TS_BASE + n // 1_000_000}.{n % 1_000_000:06d}"

    @staticmethod
    def _channel_for(channel: str) -> str:
        return "D" + channel if channel[:1] in ("U", "W") else channel

    # Each _m_<method> runs under the lock and returns the JSON answer.
    def _m_api_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "args": {k: v for k, v in params.items() if k != "token"}}

    def _m_auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": f"https://{TEAM_DOMAIN}.slack.com/", "team": TEAM_DOMAIN, "user": BOT_NAME,
                "team_id": self.team_id, "user_id": self.bot_user_id, "bot_id": BOT_ID, "is_enterprise_install": False}

    def _m_apps_connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": self.socket_url}

    def _m_chat_postMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        blocks = params.get("blocks")
        if not (params.get("text") or blocks or params.get("attachments")):
            return {"ok": False, "error": "no_text"}
        if blocks is not None and not _valid_blocks(blocks, 50):
            return {"ok": False, "error": "invalid_blocks"}
        channel = self._channel_for(channel)
        ts = self._next_ts()
        message: dict[str, Any] = {"type": "message", "user": self.bot_user_id, "bot_id": BOT_ID, "team": self.team_id,
                                   "text": params.get("text") or "", "ts": ts}
        if blocks is not None:
            message["blocks"] = blocks
        if params.get("attachments"):
            message["attachments"] = params["attachments"]
        if params.get("thread_ts"):
            message["thread_ts"] = str(params["thread_ts"])
        if params.get("metadata"):
            message["metadata"] = params["metadata"]
        self._state.messages[(channel, ts)] = message
        return {"ok": True, "channel": channel, "ts": ts, "message": copy.deepcopy(message)}

    def _m_chat_update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(params.get("channel") or ""), str(params.get("ts") or "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        stored = self._state.messages.get((channel, ts))
        if stored is None:
            return {"ok": False, "error": "message_not_found"}
        blocks = params.get("blocks")
        if blocks is not None and not _valid_blocks(blocks, 50):
            return {"ok": False, "error": "invalid_blocks"}
        for key in ("text", "blocks", "attachments", "metadata"):
            if key in params:
                stored[key] = params[key]
        stored["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
        return {"ok": True, "channel": channel, "ts": ts, "text": stored.get("text", ""), "message": copy.deepcopy(stored)}

    def _m_chat_postEphemeral(self, params: dict[str, Any]) -> dict[str, Any]:
        if not params.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        if not params.get("user"):
            return {"ok": False, "error": "user_not_found"}
        if not (params.get("text") or params.get("blocks") or params.get("attachments")):
            return {"ok": False, "error": "no_text"}
        return {"ok": True, "message_ts": self._next_ts()}

    def _m_conversations_open(self, params: dict[str, Any]) -> dict[str, Any]:
        users = params.get("users") or ""
        ids = [u.strip() for u in (users if isinstance(users, list) else str(users).split(",")) if u.strip()]
        if not ids:
            return {"ok": False, "error": "users_list_not_supplied"}
        channel_id = "D" + ids[0] if len(ids) == 1 else "G" + "".join(sorted(ids))
        return {"ok": True, "channel": {"id": channel_id}}

    def _m_views_publish(self, params: dict[str, Any]) -> dict[str, Any]:
        user_id, view = params.get("user_id"), params.get("view")
        if not user_id or not isinstance(view, dict):
            return {"ok": False, "error": "invalid_arguments"}
        previous = self._state.homes.get(str(user_id))
        if params.get("hash") and previous is not None and params["hash"] != previous["hash"]:
            return {"ok": False, "error": "hash_conflict"}
        self._state.view_counter += 1
        view_id = previous["id"] if previous is not None else f"V{self._state.view_counter:08X}"
        published = {
            "private_metadata": "", "callback_id": "", "external_id": "", "state": {"values": {}},
            **copy.deepcopy(view),
            "id": view_id, "team_id": self.team_id, "app_id": self.app_id, "bot_id": BOT_ID,
            "hash": f"{int(time.time())}.{uuid.uuid4().hex[:8]}", "root_view_id": view_id, "previous_view_id": None,
        }
        self._state.homes[str(user_id)] = published
        return {"ok": True, "view": copy.deepcopy(published)}

    def _m_users_info(self, params: dict[str, Any]) -> dict[str, Any]:
        user_id = str(params.get("user") or "")
        known = self.users.get(user_id)
        if known is None:
            return {"ok": False, "error": "user_not_found"}
        real_name = known.get("real_name", "")
        display = known.get("display_name", "")
        return {"ok": True, "user": {
            "id": user_id, "team_id": self.team_id, "name": known.get("name", ""), "deleted": False,
            "real_name": real_name, "tz": "Europe/Amsterdam", "is_bot": False, "is_admin": False,
            "profile": {"real_name": real_name, "display_name": display, "real_name_normalized": real_name,
                        "display_name_normalized": display, "team": self.team_id},
        }}

    # --- response_url --------------------------------------------------------------------
    async def _response_url(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        name = unquote(request.match_info["name"])
        method = RESPONSE_PREFIX + name
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        params = body if isinstance(body, dict) else {"_body": body}
        with self._lock:
            call = self._record(method, params, request, raw, at)
            failure = self._next_failure(method)
            if failure is not None:
                call.status = 404 if failure.error is not None else failure.status
                return web.Response(status=call.status, text=failure.error or "internal_error", content_type="text/plain")
            hook = self._state.hooks.get(name)
            if hook is None:
                call.status = 404
                return web.Response(status=404, text="no_active_hooks", content_type="text/plain")
            key = (hook.channel or "", hook.ts or "")
            stored = self._state.messages.get(key)
            if stored is not None and params.get("delete_original"):
                del self._state.messages[key]
            elif stored is not None and params.get("replace_original"):
                for k in ("text", "blocks", "attachments"):
                    if k in params:
                        stored[k] = params[k]
        return web.Response(text="ok", content_type="text/plain")


def _json(body: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def _valid_blocks(blocks: Any, limit: int) -> bool:
    return (isinstance(blocks, list) and len(blocks) <= limit
            and all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in blocks))


def _brief(params: dict[str, Any], limit: int = 160) -> str:
    text = json.dumps({k: v for k, v in params.items() if k != "token"}, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- request builders for the app's HTTP-mode tests ----------------------------------------
def sign(secret: str, body: bytes | str, timestamp: int | None = None) -> dict[str, str]:
    """Slack's v0 signature headers: HMAC-SHA256 over "v0:{ts}:{body}" keyed by the signing secret."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    data = body if isinstance(body, bytes) else body.encode("utf-8")
    digest = hmac.new(secret.encode("utf-8"), b"v0:" + ts.encode() + b":" + data, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


def _trigger_id() -> str:
    return f"{int(time.time() * 1000)}.{uuid.uuid4().int % 10**10}.{uuid.uuid4().hex}"


def slash_command_form(text: str, *, user_id: str = "U1", user_name: str = "alice", channel_id: str = "C1",
                       team_id: str = "T0TEAM", response_url: str, trigger_id: str | None = None, command: str = "/gpu",
                       channel_name: str = "gpus", api_app_id: str = "A0APP") -> dict[str, str]:
    """Every field Slack POSTs for a slash command (no enterprise_* fields: not a Grid workspace)."""
    return {
        "token": "verification-token-fake", "team_id": team_id, "team_domain": TEAM_DOMAIN, "channel_id": channel_id,
        "channel_name": channel_name, "user_id": user_id, "user_name": user_name, "command": command, "text": text,
        "api_app_id": api_app_id, "is_enterprise_install": "false", "response_url": response_url,
        "trigger_id": trigger_id or _trigger_id(),
    }


def form_body(fields: dict[str, str]) -> bytes:
    return urlencode(fields).encode("utf-8")


def interactive_form(payload: dict[str, Any]) -> dict[str, str]:
    """How HTTP mode carries an interaction payload: one form field `payload` holding JSON."""
    return {"payload": json.dumps(payload, separators=(",", ":"))}


def block_actions_payload(value: str, action_id: str, *, user_id: str = "U1", user_name: str = "alice",
                          channel_id: str = "C1", message_ts: str = "1700000000.000100", response_url: str | None,
                          container_type: str = "message", trigger_id: str | None = None, team_id: str = "T0TEAM",
                          block_id: str = "actions", message: dict[str, Any] | None = None, view_id: str = "V00000001",
                          api_app_id: str = "A0APP", bot_user_id: str = "UB0T") -> dict[str, Any]:
    """A button click. container_type "message" (a channel message), "ephemeral" (an ephemeral
    message: no `message` in the payload) or "view" (the Home tab: a `view`, no channel, and no
    response_url unless one is given)."""
    now = time.time()
    payload: dict[str, Any] = {
        "type": "block_actions",
        "user": {"id": user_id, "username": user_name, "name": user_name, "team_id": team_id},
        "api_app_id": api_app_id,
        "token": "verification-token-fake",
        "trigger_id": trigger_id or _trigger_id(),
        "team": {"id": team_id, "domain": TEAM_DOMAIN},
        "enterprise": None,
        "is_enterprise_install": False,
        "state": {"values": {}},
        "actions": [{
            "action_id": action_id, "block_id": block_id, "value": value, "type": "button",
            "text": {"type": "plain_text", "text": action_id, "emoji": True}, "action_ts": f"{now:.6f}",
        }],
    }
    if container_type == "view":
        payload["container"] = {"type": "view", "view_id": view_id}
        payload["view"] = {"id": view_id, "team_id": team_id, "type": "home", "blocks": [], "private_metadata": "",
                           "callback_id": "", "state": {"values": {}}, "hash": "1.fake", "app_id": api_app_id,
                           "bot_id": BOT_ID, "root_view_id": view_id, "previous_view_id": None}
    else:
        ephemeral = container_type == "ephemeral"
        payload["container"] = {"type": "message", "message_ts": message_ts, "channel_id": channel_id,
                                "is_ephemeral": ephemeral}
        payload["channel"] = {"id": channel_id, "name": "gpus"}
        if not ephemeral:
            payload["message"] = message or {"type": "message", "user": bot_user_id, "bot_id": BOT_ID, "ts": message_ts,
                                             "text": "", "team": team_id, "blocks": []}
    if response_url is not None:
        payload["response_url"] = response_url
    return payload


def app_home_opened_event(user_id: str, *, team_id: str = "T0TEAM", api_app_id: str = "A0APP",
                          bot_user_id: str = "UB0T") -> dict[str, Any]:
    """The Events API body (type event_callback) Slack sends when a user opens the app's Home tab."""
    now = time.time()
    return {
        "token": "verification-token-fake",
        "team_id": team_id,
        "api_app_id": api_app_id,
        "event": {"type": "app_home_opened", "user": user_id, "channel": "D" + user_id, "tab": "home",
                  "event_ts": f"{now:.6f}"},
        "type": "event_callback",
        "event_id": "Ev" + uuid.uuid4().hex[:10].upper(),
        "event_time": int(now),
        "authorizations": [{"enterprise_id": None, "team_id": team_id, "user_id": bot_user_id, "is_bot": True,
                            "is_enterprise_install": False}],
        "is_ext_shared_channel": False,
    }
