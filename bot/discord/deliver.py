"""Discord's notice deliverer: what core's outbox addresses to the `discord` surface, sent with
the bot token. Core decided who hears a notice when it wrote it (`core.outbox.targets` and the
`discord` route of `core.service.default_routes`); this module only finds the Discord channel
for each destination and posts.

- `user:discord:<id>` → the user's DM with the bot (opened once per process, cached by
  discord.py). When the user's DMs are closed (Discord's 403, code 50007) the owner is reached
  in their team's channel (`discord_channels`): the notice's own `team:` delivery goes there
  with the owner mentioned (outbox rule: every notice with a team is also the team's), so the
  DM delivery is marked done instead of posting it twice; without a team channel it is posted
  to `discord_admin_channel` if there is one, else given up with the reason (retrying a closed
  DM only delays the warning).
- `team:<team>` → the team's channel; the owner's mention goes in the message content, so they
  are pinged (mentions inside embeds do not ping).
- `admins` → `discord_admin_channel`.
- Buttons are the notice's core actions ("Keep 1 h", "Stop now"), working like any gpuherd
  button (`ActionButton`), also after a restart.
- A 429 that discord.py does not wait out itself (`max_ratelimit_timeout`) raises `RetryLater`
  with Discord's retry_after; a 5xx (after discord.py's own few retries), a timeout or a refusal
  raises, and the outbox retries with backoff. Marked delivered only after Discord answered,
  so an outage delays a notice, never loses it."""

from __future__ import annotations

import logging
from typing import Any

import discord

from gpuherd.core.errors import GpuherdError
from gpuherd.core.outbox import ADMINS, DeliveredNotice, RetryLater, target_kind

from ..replies import phrase
from .app import PRINCIPAL, DiscordSurface
from .embeds import render_notice

log = logging.getLogger(__name__)
DM_CLOSED = 50007


class Undeliverable(GpuherdError):
    """A destination Discord has no channel for (given up after the outbox's attempts)."""


class DiscordNotices:
    def __init__(self, surface: DiscordSurface) -> None:
        self.surface = surface

    def _channel(self, channel_id: int) -> Any:
        return self.surface.client.get_partial_messageable(channel_id)

    def team_channel(self, team: str | None) -> int | None:
        return self.surface.settings.discord_channels.get(team) if team else None

    async def send(self, notice: DeliveredNotice) -> None:
        """Post one notice to each of its destinations (the outbox gives one per call)."""
        actions = [phrase(a, notice=True) for a in notice.actions]
        message = render_notice(notice.text, notice.level, actions)
        kwargs = self.surface.send_kwargs(message)
        owner = notice.owner[len(PRINCIPAL):] if notice.owner and notice.owner.startswith(PRINCIPAL) else None
        for target in notice.targets:
            try:
                await self._send_one(target, notice, kwargs, owner)
            except discord.RateLimited as exc:
                raise RetryLater(exc.retry_after, "Discord rate limit") from None
            except discord.HTTPException as exc:
                if exc.status == 429:
                    raise RetryLater(float(getattr(exc.response, "headers", {}).get("Retry-After", 30) or 30),
                                     "Discord rate limit") from None
                raise RuntimeError(f"Discord refused the notice: HTTP {exc.status} (code {exc.code})") from None

    async def _send_one(self, target: str, notice: DeliveredNotice, kwargs: dict[str, Any], owner: str | None) -> None:
        settings = self.surface.settings
        kind = target_kind(target)
        if kind == "user":
            who = target[len("user:"):]
            if not who.startswith(PRINCIPAL) or not who[len(PRINCIPAL):].isdigit():
                raise Undeliverable(f"{who[:40]} is not a Discord user")
            user_id = int(who[len(PRINCIPAL):])
            try:
                dm = await self.surface.client.create_dm(discord.Object(user_id))
                await dm.send(**kwargs)
                return
            except discord.Forbidden as exc:
                if exc.code != DM_CLOSED:
                    raise
            await self._dm_closed(notice, kwargs, user_id)
            return
        if kind == "team":
            team = target[len("team:"):]
            channel = self.team_channel(team)
            if channel is None:
                raise Undeliverable(f"no Discord channel configured for {target[:70]}")
            content = f"<@{owner}>" if owner else None
            await self._channel(channel).send(content=content, **kwargs)
            return
        if target == ADMINS and settings.discord_admin_channel:
            await self._channel(settings.discord_admin_channel).send(**kwargs)
            return
        raise Undeliverable(f"no Discord destination for {target[:70]}")

    async def _dm_closed(self, notice: DeliveredNotice, kwargs: dict[str, Any], user_id: int) -> None:
        if self.team_channel(notice.team) is not None:
            log.info("discord: DMs of %s are closed; notice %s reaches them in team %s's channel",
                     user_id, notice.notice_id, notice.team)
            return
        admin = self.surface.settings.discord_admin_channel
        if admin:
            await self._channel(admin).send(content=f"<@{user_id}> (DMs closed)", **kwargs)
            return
        raise Undeliverable(f"the DMs of discord:{user_id} are closed and no team channel is configured")
