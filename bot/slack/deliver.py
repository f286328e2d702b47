"""Slack's notice deliverer: what core's outbox addresses to the `slack` surface, sent with the
bot token. Core decided who hears a notice when it wrote it (`core.outbox.targets`, and the
`slack` route in `core.service.default_routes`); this module only finds the Slack channel for
each destination and posts.

- `user:slack:<id>` → the user's DM with the bot (`conversations.open`, cached per process).
- `team:<team>` → the channel configured for the team (`slack_channels`); the owner is mentioned.
- `admins` → `slack_admin_channel`.
- Buttons are the notice's core actions, phrased for a notice ("Keep 1 h", "Stop now").
- A 429 raises `RetryLater` with Slack's Retry-After, so the outbox waits that long before this
  delivery and before its next round; any other failure (a 5xx, a timeout, `ok: false`) raises,
  and the outbox retries with backoff. A send is marked delivered only after Slack said ok, so a
  notice is delayed by an outage, never lost; it may go twice only if this process dies between
  Slack's ok and the delivered mark (the outbox's at-least-once)."""

from __future__ import annotations

import logging

from slack_sdk.errors import SlackApiError

from gpuherd.core.errors import GpuherdError
from gpuherd.core.outbox import ADMINS, DeliveredNotice, RetryLater, target_kind

from ..replies import phrase
from .app import PRINCIPAL, SlackSurface
from .blocks import render_notice

log = logging.getLogger(__name__)
DEFAULT_RETRY_AFTER_S = 30.0


class Undeliverable(GpuherdError):
    """A destination Slack has no channel for (retried like any failure, then given up)."""


class SlackNotices:
    def __init__(self, surface: SlackSurface) -> None:
        self.surface = surface
        self._dms: dict[str, str] = {}

    async def channel_for(self, target: str) -> str:
        settings = self.surface.settings
        kind = target_kind(target)
        if kind == "user":
            principal = target[len("user:"):]
            if not principal.startswith(PRINCIPAL):
                raise Undeliverable(f"{principal[:40]} is not a Slack user")
            user_id = principal[len(PRINCIPAL):]
            if user_id not in self._dms:
                opened = await self.surface.client.conversations_open(users=user_id)
                self._dms[user_id] = str((opened.get("channel") or {}).get("id") or "")
            if not self._dms[user_id]:
                raise Undeliverable(f"no DM channel for {user_id[:32]}")
            return self._dms[user_id]
        if kind == "team":
            channel = settings.slack_channels.get(target[len("team:"):])
            if not channel:
                raise Undeliverable(f"no Slack channel configured for {target[:70]}")
            return channel
        if target == ADMINS and settings.slack_admin_channel:
            return settings.slack_admin_channel
        raise Undeliverable(f"no Slack destination for {target[:70]}")

    async def send(self, notice: DeliveredNotice) -> None:
        """Post one notice to each of its destinations (the outbox gives one per call)."""
        actions = [phrase(a, notice=True) for a in notice.actions]
        for target in notice.targets:
            text = notice.text
            if target_kind(target) == "team" and notice.owner and notice.owner.startswith(PRINCIPAL) \
                    and notice.owner not in text:
                text = f"{text} · {notice.owner}"     # the owner's mention in the team's channel
            message = render_notice(text, notice.level, actions, await self.surface.names(text))
            try:
                channel = await self.channel_for(target)
                await self.surface.client.chat_postMessage(channel=channel, **message.payload())
            except SlackApiError as exc:
                status = getattr(exc.response, "status_code", 0)
                if status == 429:
                    raw = (exc.response.headers or {}).get("Retry-After") or (exc.response.headers or {}).get("retry-after")
                    try:
                        wait = float(raw[0] if isinstance(raw, list) else raw) if raw else DEFAULT_RETRY_AFTER_S
                    except ValueError:
                        wait = DEFAULT_RETRY_AFTER_S
                    raise RetryLater(wait, "Slack rate limit") from None
                raise RuntimeError(f"Slack refused the notice: HTTP {status}, "
                                   f"{exc.response.get('error') if isinstance(exc.response.data, dict) else ''}") from None
            if target_kind(target) == "user":
                self.surface.touch_home(target[len("user:") + len(PRINCIPAL):])
