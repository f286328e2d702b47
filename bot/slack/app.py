"""The Slack surface: one slack-bolt `AsyncApp` for `/gpu`, its buttons, the App Home and the
notices core addresses to Slack. Socket Mode (`SLACK_APP_TOKEN`) and HTTP mode
(`/slack/events` in `gpuherd serve`, `SLACK_SIGNING_SECRET`) drive the same app.

Decisions a reader would otherwise have to rediscover:

- **Ack first, always.** Every listener calls `ack()` before anything that waits (the database,
  a provider, Slack's Web API), so the acknowledgement never depends on them. Bolt answers Slack
  as soon as `ack()` is called and keeps running the listener as a task. Authorization is ours
  (`_authorize`): one `auth.test` at start (retried on demand), so a slow Web API cannot delay
  an ack either. Slash commands are acked empty: the result follows.
- **Where a reply goes.** Errors, help and questions (confirmations) are ephemeral, through the
  request's `response_url`. Other results are posted in the channel through the `response_url`
  (it works in channels the bot has not joined, DMs and private channels). A boot or a start
  posts one message with the bot token (`chat.postMessage`) and edits it in place
  (`chat.update`, at most one edit a second, the last always) as the operation moves, ending with
  the result and its buttons; where the bot may not post (a private channel it is not in) it
  falls back to the `response_url`, replacing the message.
- **Who is who.** A Slack user is the principal `slack:<user id>`; core resolves the role and team
  (first seen: the default role; `slack_admins` and `admins` in config are admins). Principals
  shown in replies become mentions in text and display names (`users.info`, cached an hour) in
  tables.
- **Buttons** carry core's action refs (see `bot/presses.py`); a button whose action_id ends in
  `:c` had Slack's confirm dialog, which Slack shows before it sends the press. The idempotency
  key of a press is the message and the button, so double clicks, redeliveries and two people
  pressing one button do it once.
- **Redelivery.** A delivery seen before (Slack retrying with `X-Slack-Retry-Num`, Socket Mode's
  `retry_attempt`) is acked and not run again in this process; across replicas the idempotency
  key makes a second run a replay.
- **The App Home** shows the viewer's machines and this month's costs; it is published when the
  user opens it, after each of their commands and presses, after a notice reaches them, and every
  `HOME_REFRESH_S` while they looked at it in the last hour (accrued cost keeps moving).
- **Notices** are delivered by `SlackNotices` (`deliver.py`) through the core outbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from gpuherd.core.actions import Op
from gpuherd.core.auth import Actor
from gpuherd.core.config import Settings
from gpuherd.core.errors import GpuherdError
from gpuherd.core.results import ProgressEvent
from gpuherd.core.service import GpuService

from .. import grammar, presses, replies
from ..replies import Reply
from .blocks import ACTION_PREFIX, SlackMessage, render, render_home

log = logging.getLogger(__name__)
PRINCIPAL = "slack:"
HOME_REFRESH_S = 60.0
HOME_WATCH_S = 3600.0
NAME_TTL_S = 3600.0
EDIT_EVERY_S = 1.0
SEEN_TTL_S = 600.0
MAX_RESPONSES = 5                 # a response_url takes 5 posts in 30 minutes
_MENTIONABLE = re.compile(r"slack:([UW][A-Z0-9]+)")
_CONFIRMED = ":c"


def principal(user_id: str) -> str:
    return f"{PRINCIPAL}{user_id}"


@dataclass
class _Seen:
    """Deliveries handled in this process (redeliveries are acked and dropped)."""

    ttl_s: float = SEEN_TTL_S
    entries: dict[str, float] = field(default_factory=dict)

    def first(self, key: str) -> bool:
        now = time.monotonic()
        if len(self.entries) > 10_000:
            self.entries = {k: t for k, t in self.entries.items() if now - t < self.ttl_s}
        seen = self.entries.get(key)
        if seen is not None and now - seen < self.ttl_s:
            return False
        self.entries[key] = now
        return True


Respond = Callable[..., Awaitable[Any]]


class SlackSurface:
    """The bolt app and what it needs from core. Build one per process; `app` is what Socket
    Mode and the HTTP endpoint dispatch to."""

    def __init__(self, service: GpuService, settings: Settings | None = None, *,
                 client: AsyncWebClient | None = None) -> None:
        self.service = service
        self.settings = settings or service.settings
        s = self.settings
        if s.slack_bot_token is None:
            raise GpuherdError("Slack needs SLACK_BOT_TOKEN (the bot token, xoxb-…).")
        self.client = client or AsyncWebClient(token=s.slack_bot_token.get_secret_value(), base_url=s.slack_api_url)
        secret = s.slack_signing_secret.get_secret_value() if s.slack_signing_secret else ""
        # the app's own client carries no token (bolt takes the bot token from `_authorize`); the
        # Socket Mode handler uses it, with the app token, for apps.connections.open
        self.app = AsyncApp(signing_secret=secret, client=AsyncWebClient(base_url=s.slack_api_url),
                            authorize=self._bolt_authorize,
                            request_verification_enabled=True, logger=log,
                            ignoring_self_events_enabled=False)
        self._auth: AuthorizeResult | None = None
        self._auth_lock = asyncio.Lock()
        self._names: dict[str, tuple[float, str]] = {}
        self._seen = _Seen()
        self._home_seen: dict[str, float] = {}
        self._home_tasks: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.app.command("/gpu")(self._on_command)
        self.app.action(re.compile(f"^{ACTION_PREFIX}:"))(self._on_press)
        self.app.event("app_home_opened")(self._on_home_opened)

    # --- authorization (no Web API call on the ack path) -----------------------------------
    @property
    def _bolt_authorize(self) -> Callable[..., Awaitable[AuthorizeResult]]:
        # bolt passes arguments by the names in the signature, so no `self` and no **kwargs here
        async def authorize(enterprise_id: str | None = None, team_id: str | None = None) -> AuthorizeResult:
            return await self._authorize()
        return authorize

    async def _authorize(self) -> AuthorizeResult:
        if self._auth is None:
            async with self._auth_lock:
                if self._auth is None:
                    auth = await self.client.auth_test()
                    token = self.client.token or ""
                    self._auth = AuthorizeResult(enterprise_id=auth.get("enterprise_id"), team_id=auth.get("team_id"),
                                                 bot_token=token, bot_id=auth.get("bot_id"),
                                                 bot_user_id=auth.get("user_id"))
        return self._auth

    async def warm(self) -> None:
        """Ask `auth.test` once at start, so the first command's ack does not wait for it."""
        try:
            await self._authorize()
        except Exception as exc:   # Slack unreachable at start: the first request tries again
            log.warning("slack: auth.test failed at start (%s); will retry on the first request", type(exc).__name__)

    # --- identities and names --------------------------------------------------------------
    async def actor(self, user_id: str, display: str = "") -> Actor:
        return await self.service.resolve_actor(principal(user_id), source="slack", display=display)

    async def names(self, reply_or_text: Reply | str) -> dict[str, str]:
        """Display names of the Slack users a reply mentions (for tables, where mentions do not
        render). Unknown or failed lookups show the id."""
        blob = reply_or_text if isinstance(reply_or_text, str) else reply_or_text.model_dump_json()
        ids = list(dict.fromkeys(_MENTIONABLE.findall(blob)))[:20]
        now = time.monotonic()
        out: dict[str, str] = {}
        for uid in ids:
            cached = self._names.get(uid)
            if cached is not None and now - cached[0] < NAME_TTL_S:
                out[principal(uid)] = cached[1]
                continue
            name = uid
            try:
                info = await self.client.users_info(user=uid)
                user = info.get("user") or {}
                profile = user.get("profile") or {}
                name = profile.get("display_name") or user.get("real_name") or user.get("name") or uid
            except Exception as exc:
                log.debug("slack: users.info %s failed: %s", uid, type(exc).__name__)
            self._names[uid] = (now, str(name))
            out[principal(uid)] = str(name)
        return out

    async def pages(self, reply: Reply) -> list[SlackMessage]:
        return render(reply, await self.names(reply))

    # --- background work ---------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in [*self._tasks, *self._home_tasks.values()]:
            task.cancel()
        for task in [*self._tasks, *self._home_tasks.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- /gpu ----------------------------------------------------------------------------------
    async def _on_command(self, ack: Callable[..., Awaitable[Any]], body: dict[str, Any], respond: Respond,
                          request: Any) -> None:
        await ack()
        delivery = f"command:{body.get('trigger_id') or ''}:{body.get('user_id')}"
        if not self._seen.first(delivery):
            log.info("slack: a redelivered command (retry %s) was not run again", _retry_num(request))
            return
        await self.run_command(body, respond)

    async def run_command(self, body: dict[str, Any], respond: Respond) -> None:
        """The work after the ack: resolve the user, run the line, post the reply."""
        user_id = str(body.get("user_id") or "")
        channel = str(body.get("channel_id") or "")
        text = str(body.get("text") or "")
        try:
            actor = await self.actor(user_id, str(body.get("user_name") or ""))
        except GpuherdError as exc:
            await self.post_reply(respond, replies.error(exc.message, exc.hint))
            return
        except Exception:
            log.exception("slack: could not resolve user %s", user_id[:32])
            await self.post_reply(respond, replies.error("gpuherd could not look you up right now; try again in a moment.",
                                                    title="Internal error"))
            return
        verb = "Starting" if text.strip().lower().startswith("start") else "Booting"
        live = _Live(self, actor, channel, respond, verb=verb)
        ctx = grammar.Context(service=self.service, actor=actor, delivery_id=body.get("trigger_id") or None,
                              progress=live.progress, wait=True)
        reply = await grammar.dispatch(ctx, f"/gpu {text}")
        await live.finish(reply)
        self.touch_home(user_id)

    # --- buttons -------------------------------------------------------------------------------
    async def _on_press(self, ack: Callable[..., Awaitable[Any]], body: dict[str, Any], respond: Respond,
                        request: Any) -> None:
        await ack()
        pressed = (body.get("actions") or [{}])[0]
        user_id = str((body.get("user") or {}).get("id") or "")
        container = body.get("container") or {}
        message_ts = str(container.get("message_ts") or (body.get("message") or {}).get("ts") or
                         (body.get("view") or {}).get("id") or "")
        channel = str((body.get("channel") or {}).get("id") or container.get("channel_id") or "")
        ref = str(pressed.get("value") or "")
        action_id = str(pressed.get("action_id") or "")
        delivery = f"press:{channel}:{message_ts}:{action_id}:{user_id}:{pressed.get('action_ts')}"
        if not self._seen.first(delivery):
            return
        await self.run_press(user_id, str((body.get("user") or {}).get("username") or ""), channel, message_ts,
                             ref, action_id.endswith(_CONFIRMED), respond if body.get("response_url") else None,
                             ephemeral=container.get("is_ephemeral") is True)

    async def run_press(self, user_id: str, user_name: str, channel: str, message_ts: str, ref: str,
                        confirmed: bool, respond: Respond | None, *, ephemeral: bool = False) -> None:
        try:
            actor = await self.actor(user_id, user_name)
        except GpuherdError as exc:
            await self._answer_press(user_id, respond, replies.error(exc.message, exc.hint))
            return
        action = presses.parse(ref)
        if isinstance(action, Reply):
            await self._answer_press(user_id, respond, action)
            return
        if respond is None:                   # a press on the App Home: the answer goes to a DM
            channel = await self.dm_channel(user_id) or channel
        live = _Live(self, actor, channel, respond, verb="Starting" if action.op is Op.START else "Booting")
        ctx = grammar.Context(service=self.service, actor=actor,
                              delivery_id=presses.delivery_id("slack", channel, message_ts, ref),
                              progress=live.progress, wait=True)
        reply = await grammar.dispatch(ctx, presses.command_for(action, confirmed=confirmed))
        if ephemeral and respond is not None and reply.level != "error":
            # the question was answered: it goes away, the answer takes its place in the channel
            with contextlib.suppress(Exception):
                await respond(delete_original=True)
        await live.finish(reply)
        self.touch_home(user_id)

    async def _answer_press(self, user_id: str, respond: Respond | None, reply: Reply) -> None:
        if respond is not None:
            await self.post_reply(respond, reply)
            return
        channel = await self.dm_channel(user_id)
        if channel:
            for page in await self.pages(reply):
                await self.client.chat_postMessage(channel=channel, **page.payload())

    async def post_reply(self, respond: Respond, reply: Reply, *, replace: bool = False, channel: str = "",
                    user_id: str = "") -> None:
        """A reply through the response_url: ephemeral for errors, help and questions. A
        response_url takes five posts, so pages past the fourth go with the bot token
        (`chat.postMessage`, or `chat.postEphemeral` to the asker); where that is refused, one
        last page says how many pages could not be shown: cut, but never silently."""
        kind = "ephemeral" if reply.ephemeral or reply.level == "error" else "in_channel"
        pages = await self.pages(reply)
        direct = pages[:MAX_RESPONSES] if len(pages) <= MAX_RESPONSES else pages[:MAX_RESPONSES - 1]
        for i, page in enumerate(direct):
            try:
                await respond(response_type=kind, replace_original=replace and i == 0, **page.payload())
            except Exception as exc:
                log.warning("slack: response_url post failed: %s", type(exc).__name__)
                return
        rest = pages[len(direct):]
        for n, page in enumerate(rest):
            try:
                if not channel:
                    raise LookupError("no channel")
                if kind == "ephemeral":
                    await self.client.chat_postEphemeral(channel=channel, user=user_id, **page.payload())
                else:
                    await self.client.chat_postMessage(channel=channel, **page.payload())
            except Exception as exc:
                log.info("slack: page %d of a reply not posted: %s", len(direct) + n + 1, type(exc).__name__)
                missing = len(rest) - n
                note = Reply(title=reply.title, level="warning", ephemeral=reply.ephemeral,
                             text=f"{missing} more page{'s' if missing != 1 else ''} of this reply could not be "
                                  "posted here; narrow the command (a filter, a limit) to see the rest.")
                with contextlib.suppress(Exception):
                    await respond(response_type=kind, **(await self.pages(note))[0].payload())
                return

    async def dm_channel(self, user_id: str) -> str | None:
        try:
            opened = await self.client.conversations_open(users=user_id)
        except SlackApiError as exc:
            log.warning("slack: cannot open a DM with %s: %s", user_id[:32], exc.response.get("error"))
            return None
        return str((opened.get("channel") or {}).get("id") or "") or None

    # --- App Home ------------------------------------------------------------------------------
    async def _on_home_opened(self, ack: Callable[..., Awaitable[Any]], event: dict[str, Any]) -> None:
        await ack()
        if event.get("tab", "home") != "home":
            return
        user_id = str(event.get("user") or "")
        self._home_seen[user_id] = time.monotonic()
        await self.publish_home(user_id)
        if user_id not in self._home_tasks or self._home_tasks[user_id].done():
            self._home_tasks[user_id] = asyncio.ensure_future(self._refresh_home(user_id))

    async def home_view(self, user_id: str) -> dict[str, Any]:
        actor = await self.actor(user_id)
        parts: list[Reply] = []
        try:
            parts.append(replies.machines_reply(await self.service.status(actor, mine=True)))
        except GpuherdError as exc:
            parts.append(replies.error(exc.message, exc.hint, title="Your machines"))
        try:
            parts.append(replies.costs_reply(await self.service.costs(actor)))
        except GpuherdError as exc:
            parts.append(replies.error(exc.message, exc.hint, title="Costs"))
        names = await self.names(" ".join(p.model_dump_json() for p in parts))
        return render_home(parts, names)

    async def publish_home(self, user_id: str) -> None:
        try:
            view = await self.home_view(user_id)
            await self.client.views_publish(user_id=user_id, view=view)
        except Exception as exc:
            log.warning("slack: App Home for %s not published: %s", user_id[:32], type(exc).__name__)

    def touch_home(self, user_id: str) -> None:
        """Something changed for this user: refresh their Home if they have looked at it lately."""
        seen = self._home_seen.get(user_id)
        if seen is not None and time.monotonic() - seen < HOME_WATCH_S:
            self._spawn(self.publish_home(user_id), f"gpuherd-slack-home-{user_id[:16]}")

    async def _refresh_home(self, user_id: str) -> None:
        while time.monotonic() - self._home_seen.get(user_id, 0.0) < HOME_WATCH_S:
            await asyncio.sleep(HOME_REFRESH_S)
            await self.publish_home(user_id)


def _retry_num(request: Any) -> str:
    headers = getattr(request, "headers", None) or {}
    value = headers.get("x-slack-retry-num")
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value or 0)


class _Live:
    """The message of one command or press. Without progress it is a plain reply; with progress
    (a boot or a start) it is one message posted at the first event and edited as the operation
    moves, and the final reply replaces it."""

    def __init__(self, surface: SlackSurface, actor: Actor, channel: str, respond: Respond | None, *,
                 verb: str = "Booting") -> None:
        self.surface = surface
        self.actor = actor
        self.user_id = actor.principal.removeprefix(PRINCIPAL)
        self.channel = channel
        self.respond = respond
        self.verb = verb
        self.ts: str | None = None
        self.via_response_url = False
        self.last_edit = 0.0
        self.pending: Reply | None = None
        self.responses = 0

    async def progress(self, event: ProgressEvent) -> None:
        view = None
        with contextlib.suppress(GpuherdError):
            view = await self.surface.service.view(self.actor, event.instance_id)
        await self.show(replies.progress_reply(event, view, verb=self.verb), final=False)

    async def show(self, reply: Reply, *, final: bool) -> None:
        pages = await self.surface.pages(reply)
        page = pages[0]
        client = self.surface.client
        if self.ts is None and not self.via_response_url:
            try:
                posted = await client.chat_postMessage(channel=self.channel, **page.payload())
                self.ts = str(posted.get("ts"))
                self.channel = str(posted.get("channel") or self.channel)
                self.last_edit = time.monotonic()
            except SlackApiError as exc:
                log.info("slack: cannot post in %s (%s); using the response_url", self.channel[:16],
                         exc.response.get("error"))
                self.via_response_url = True
                if self.respond is not None:
                    await self._respond(page, replace=False)
            return
        if self.via_response_url:
            if final and self.respond is not None:
                await self._respond(page, replace=True)
            return
        if not final and time.monotonic() - self.last_edit < EDIT_EVERY_S:
            return                           # at most one edit a second; the final one always
        assert self.ts is not None
        try:
            await client.chat_update(channel=self.channel, ts=self.ts, **page.payload())
            self.last_edit = time.monotonic()
        except SlackApiError as exc:
            log.warning("slack: edit of %s failed: %s", self.ts, exc.response.get("error"))

    async def _respond(self, page: SlackMessage, *, replace: bool) -> None:
        if self.respond is None or self.responses >= MAX_RESPONSES:
            return
        self.responses += 1
        with contextlib.suppress(Exception):
            await self.respond(response_type="in_channel", replace_original=replace, **page.payload())

    async def finish(self, reply: Reply) -> None:
        if self.ts is not None or self.via_response_url:
            if reply.ephemeral and self.respond is not None:
                await self.surface.post_reply(self.respond, reply, channel=self.channel, user_id=self.user_id)
                return
            await self.show(reply, final=True)
            return
        if self.respond is not None:
            await self.surface.post_reply(self.respond, reply, channel=self.channel, user_id=self.user_id)
            return
        if self.channel:                      # a press on the App Home: the answer as a DM
            for page in await self.surface.pages(reply):
                with contextlib.suppress(Exception):
                    await self.surface.client.chat_postMessage(channel=self.channel, **page.payload())

