"""Starting Discord: inside `gpuherd serve` when `DISCORD_BOT_TOKEN` is set, or on its own
(`gpuherd discord`); and `gpuherd discord sync`, which registers the `/gpu` commands.

The surface registers its notice deliverer with the core `Runtime` before the runtime starts
(`prepare`); its gateway connection lives inside the runtime (`around`): it logs in (a wrong
token is an error at start, not a silent bot; Discord unreachable is a warning, and the login is
retried in the background, so the team server's API does not depend on Discord), connects in
the background (discord.py reconnects on its own; what it gives up on is retried with backoff),
and closes before the guards stop.

Commands are not synced at every start: Discord allows 200 command creates a day per server
and global commands take time to propagate, so `gpuherd discord sync [--guild ID]` does it on
purpose (a guild sync is instant: use it while trying gpuherd out)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import discord

from gpuherd.core.config import Settings
from gpuherd.core.errors import ConfigError
from gpuherd.core.runtime import Runtime, run_until_signalled
from gpuherd.core.service import GpuService

from .app import DiscordSurface, DiscordUnreachable, login
from .deliver import DiscordNotices

log = logging.getLogger(__name__)
RETRY_MIN_S = 5.0
RETRY_MAX_S = 300.0


def check(settings: Settings) -> None:
    if settings.discord_bot_token is None or not settings.discord_bot_token.get_secret_value().strip():
        raise ConfigError("Discord needs DISCORD_BOT_TOKEN (the bot token from the Developer Portal; README, Discord).")


class DiscordRunner:
    """The Discord surface of one process: the client, its deliverer, its gateway connection."""

    def __init__(self, service: GpuService, settings: Settings | None = None) -> None:
        self.settings = settings or service.settings
        check(self.settings)
        self.surface = DiscordSurface(service, self.settings)
        self.notices = DiscordNotices(self.surface)
        self._task: asyncio.Task[None] | None = None

    def prepare(self, runtime: Runtime) -> None:
        runtime.deliver("discord", self.notices.send, targets=None)

    @contextlib.asynccontextmanager
    async def around(self, runtime: Runtime) -> AsyncIterator[None]:
        client = self.surface.client
        try:
            await login(client, self.settings)
            logged_in = True
        except DiscordUnreachable as exc:    # the server starts anyway; Discord joins when it answers
            log.warning("discord: %s Retrying in the background.", exc.message)
            logged_in = False
        self._task = asyncio.ensure_future(self._connect(logged_in))
        try:
            yield
        finally:
            # the connection's task first, then the client: closed the other way round,
            # discord.py's receive loop closes the gateway with 4000 (a drop Discord keeps
            # resumable, the bot shown online) instead of 1000 (a logout)
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
            with contextlib.suppress(Exception):
                await client.close()

    async def _connect(self, logged_in: bool) -> None:
        """Log in (when start-up could not) and hold the gateway connection; discord.py
        reconnects on its own, and anything it gives up on is retried here with backoff (a
        refused token is not: that needs a person)."""
        client = self.surface.client
        wait = RETRY_MIN_S
        while True:
            try:
                if not logged_in:
                    client.clear()
                    await login(client, self.settings)
                    logged_in = True
                await client.connect(reconnect=True)
                return                          # closed on purpose
            except asyncio.CancelledError:
                raise
            except DiscordUnreachable as exc:
                log.warning("discord: %s Next try in %.0f s.", exc.message, wait)
            except ConfigError as exc:
                log.error("discord: %s Discord stays off until gpuherd restarts.", exc.message)
                return
            except Exception as exc:
                log.warning("discord: the gateway connection ended (%s); next try in %.0f s.", type(exc).__name__, wait)
            if client.is_closed() and logged_in:
                logged_in = False
            await asyncio.sleep(wait)
            wait = min(RETRY_MAX_S, wait * 2)

    def mount(self, app: Any) -> None:
        """Discord has no HTTP routes here: interactions come over the gateway."""


async def run_gateway(settings: Settings | None = None) -> int:
    """`gpuherd discord`: the bot with the core runtime, until SIGINT or SIGTERM."""
    service = GpuService.from_settings(settings)
    runner = DiscordRunner(service)
    return await run_until_signalled(service, runner, "discord")


async def sync(settings: Settings, guild: int | None = None) -> list[str]:
    """Register `/gpu` globally or in one server; returns the names Discord now has."""
    check(settings)
    service = GpuService.from_settings(settings)
    try:
        surface = DiscordSurface(service, settings)
        await login(surface.client, settings)
        try:
            target = discord.Object(guild) if guild else None
            if target is not None:
                surface.tree.copy_global_to(guild=target)
            synced = await surface.tree.sync(guild=target)
            return [c.name for c in synced]
        finally:
            await surface.client.close()
    finally:
        await service.aclose()
