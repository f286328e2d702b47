"""The Discord surface: a discord.py client with the `/gpu` command group, its buttons and the
answers to both. `run.py` connects it (inside `gpuherd serve`, or `gpuherd discord`);
`deliver.py` sends core's notices through it.

Decisions a reader would otherwise have to rediscover:

- **Answer or defer first.** Discord drops an interaction not answered within 3 s. A command is
  first parsed without running (`grammar.check`, pure and fast): bad input and help are answered
  at once, ephemeral; anything else is deferred ("thinking…") before any database or provider
  work, and the result edits that response. Autocomplete answers from core within the same
  budget (no provider call: templates, the database's view of the asker's machines, GPU words).
- **Ephemeral is fixed at defer time**, so a deferred public response whose outcome is for the
  asker only (an error from core, a question asking for a yes) is deleted and the answer sent
  as an ephemeral follow-up.
- **A boot edits one response as it moves** (created → loading → healthy; at most one edit a
  second, the last always), ending with the result and its buttons. The interaction token
  lasts 15 minutes; after `TOKEN_S` the final reply is posted in the channel with the bot token
  instead, so a slow boot still reports.
- **Buttons** are `DynamicItem`s whose `custom_id` is core's action ref (`stop|g-7f3a`,
  `confirm||c_9f…`; never a command line or a secret, at most 100 characters), registered with
  `client.add_dynamic_items`: any gpuherd button on any message, also from before a restart,
  dispatches here. A press is deferred (no visible change), run through the grammar as the
  presser (core checks them), and answered as a follow-up: public for results, ephemeral for
  errors and questions. Its idempotency key is the message and the button, so a double click
  or two people pressing one Boot boot once. A press answering an ephemeral question replaces
  the question by its outcome.
- **Discord has no confirm dialog.** Destroy and a boot above the price limit come back from
  core as a question (its $/h, $/day and $/month), shown as an ephemeral message with Yes and
  Cancel buttons carrying the confirmation's token.
- **Pages.** A reply too long for one message is paged (`embeds.render`) with Previous/Next; the
  pages of a message are kept in memory (`MAX_PAGED` messages). A page button on a message from
  before a restart says so and asks for the command again: never a silent cut.
- **Who is who.** A Discord user is the principal `discord:<user id>`; core resolves the role
  and team, raised for this request by Discord roles mapped in `discord_roles` (by name or id;
  needs the guild's roles, which the `guilds` intent delivers — the only intent asked for).
- **Servers.** With `discord_guilds` set, commands and autocomplete answer only there; a press
  is always checked by core (it may come from a DM notice)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import aiohttp
import discord
from discord import app_commands

from gpuherd.core.actions import Op
from gpuherd.core.auth import Actor
from gpuherd.core.config import Settings
from gpuherd.core.errors import ConfigError, GpuherdError
from gpuherd.core.money import rate
from gpuherd.core.query import GPU_MODELS
from gpuherd.core.results import ProgressEvent
from gpuherd.core.service import GpuService

from .. import grammar, presses, replies
from ..replies import Reply
from .commands import MAX_CHOICES, build_group
from .embeds import PAGE_PREFIX, DiscordMessage, render

log = logging.getLogger(__name__)
PRINCIPAL = "discord:"
TOKEN_S = 14 * 60.0          # interaction tokens last 15 minutes; leave a margin
EDIT_EVERY_S = 1.0
MAX_PAGED = 500
NAME_TTL_S = 3600.0
NAME_WAIT_S = 2.0
DURATIONS = ("30m", "1h", "2h", "4h", "8h", "12h", "1d", "3d", "7d")
_MENTION = re.compile(r"discord:(\d{15,21})")
_STYLES = {"primary": discord.ButtonStyle.primary, "secondary": discord.ButtonStyle.secondary,
           "success": discord.ButtonStyle.success, "danger": discord.ButtonStyle.danger}


def principal(user_id: int | str) -> str:
    return f"{PRINCIPAL}{user_id}"


class GpuClient(discord.Client):
    """discord.py's client, knowing its surface (a button's callback finds it here)."""

    surface: DiscordSurface


class GpuTree(app_commands.CommandTree[GpuClient]):
    async def interaction_check(self, interaction: discord.Interaction[GpuClient]) -> bool:
        return await interaction.client.surface.allowed(interaction)

    async def on_error(self, interaction: discord.Interaction[GpuClient],
                       error: app_commands.AppCommandError) -> None:
        await interaction.client.surface.failed(interaction, error)


class ActionButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"(?P<ref>[a-z]+\|.{0,98})"):
    """A button carrying a core action ref; works on any message, also after a restart."""

    def __init__(self, ref: str, label: str = "…", style: discord.ButtonStyle = discord.ButtonStyle.secondary,
                 disabled: bool = False) -> None:
        super().__init__(discord.ui.Button(label=label, custom_id=ref, style=style, disabled=disabled))
        self.ref = ref

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any],
                             match: re.Match[str]) -> ActionButton:
        return cls(match["ref"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.client.surface.pressed(interaction, self.ref)


class PageButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=re.escape(PAGE_PREFIX) + r"(?P<n>\d{1,4})"):
    """Previous/Next of a paged reply."""

    def __init__(self, n: int, label: str = "…", disabled: bool = False) -> None:
        super().__init__(discord.ui.Button(label=label, custom_id=f"{PAGE_PREFIX}{n}", disabled=disabled))
        self.n = n

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any],
                             match: re.Match[str]) -> PageButton:
        return cls(int(match["n"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.client.surface.turn_page(interaction, self.n)


def make_client(settings: Settings) -> GpuClient:
    """The least intents: `guilds` (the servers' roles, for `discord_roles`); interactions need
    none and message content is never read. A 429 longer than 30 s raises instead of sleeping
    inside discord.py, so the notice outbox can wait it out (`RetryLater`)."""
    intents = discord.Intents.none()
    intents.guilds = True
    # gpuherd has no voice: discord.py's start-up warnings about voice libraries are noise
    discord.VoiceClient.warn_nacl = False
    discord.VoiceClient.warn_dave = False
    return GpuClient(intents=intents, max_ratelimit_timeout=30.0)


class DiscordUnreachable(ConfigError):
    """Discord (or the proxy standing in for it) did not answer the login."""


async def login(client: discord.Client, settings: Settings) -> None:
    """Log in (two REST calls, no gateway) or raise a ConfigError that says why: a refused token,
    or Discord (or the configured proxy) not reachable. The client is closed on failure."""
    assert settings.discord_bot_token is not None
    try:
        await client.login(settings.discord_bot_token.get_secret_value())
    except discord.LoginFailure:
        await client.close()
        raise ConfigError("Discord refused DISCORD_BOT_TOKEN (401): check the token.") from None
    except (TimeoutError, discord.HTTPException, aiohttp.ClientError, OSError) as exc:
        await client.close()
        raise DiscordUnreachable(f"Cannot reach Discord at {settings.discord_api_url} ({type(exc).__name__}); "
                          "check the network or GPUHERD_DISCORD_API_URL.") from None


def point_at(settings: Settings) -> None:
    """Discord's REST and gateway base URLs from settings (a proxy or a test server). discord.py
    keeps them as class attributes, so this is per process."""
    import yarl
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    Route.BASE = settings.discord_api_url
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


class DiscordSurface:
    """The client, its command tree and what they need from core. One per process."""

    def __init__(self, service: GpuService, settings: Settings | None = None, *,
                 client: GpuClient | None = None) -> None:
        self.service = service
        self.settings = settings or service.settings
        if self.settings.discord_bot_token is None:
            raise GpuherdError("Discord needs DISCORD_BOT_TOKEN (the bot token from the Developer Portal).")
        point_at(self.settings)
        self.client = client or make_client(self.settings)
        self.client.surface = self
        self.tree = GpuTree(self.client)
        self.group = build_group(self)
        self.tree.add_command(self.group)
        self.client.add_dynamic_items(ActionButton, PageButton)
        self.pages: OrderedDict[int, list[DiscordMessage]] = OrderedDict()
        self._names: dict[int, tuple[float, str]] = {}

    # --- identities --------------------------------------------------------------------------
    async def actor(self, interaction: discord.Interaction[Any]) -> Actor:
        user = interaction.user
        held: list[str] = []
        if isinstance(user, discord.Member):
            for role in user.roles:
                held += [role.name, str(role.id)]
        return await self.service.resolve_actor(principal(user.id), source="discord",
                                                display=getattr(user, "display_name", "") or user.name,
                                                platform_roles=held)

    async def names(self, reply: Reply | str) -> dict[str, str]:
        """Display names of the Discord users a reply shows (tables, where mentions do not
        render). Cached an hour; a failed lookup shows the id."""
        blob = reply if isinstance(reply, str) else reply.model_dump_json()
        now = time.monotonic()
        wanted = [int(raw) for raw in list(dict.fromkeys(_MENTION.findall(blob)))[:20]]

        async def lookup(uid: int) -> None:
            user = self.client.get_user(uid)
            name = user.display_name if user is not None else str(uid)
            if user is None:
                with contextlib.suppress(Exception):
                    name = (await self.client.fetch_user(uid)).display_name
            self._names[uid] = (now, name)

        stale = [uid for uid in wanted if uid not in self._names or now - self._names[uid][0] > NAME_TTL_S]
        if stale:                       # all at once, and never more than NAME_WAIT_S for a reply
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(lookup(uid) for uid in stale)), NAME_WAIT_S)
        return {principal(uid): self._names[uid][1] if uid in self._names else str(uid) for uid in wanted}

    async def render(self, reply: Reply) -> list[DiscordMessage]:
        return render(reply, await self.names(reply))

    async def allowed(self, interaction: discord.Interaction[Any]) -> bool:
        guilds = self.settings.discord_guilds
        if not guilds or (interaction.guild_id is not None and interaction.guild_id in guilds):
            return True
        if interaction.type is discord.InteractionType.autocomplete:
            await interaction.response.autocomplete([])
        else:
            await self.answer(interaction, replies.error("gpuherd does not answer in this server or DM.",
                                                         "An admin can add it to discord_guilds."))
        return False

    async def failed(self, interaction: discord.Interaction[Any], error: Exception) -> None:
        """Anything a command raised: logged with a reference, the user told without a traceback."""
        if isinstance(error, app_commands.CheckFailure):
            return                           # `allowed` answered already
        ref = f"{int(time.time() * 1000) % 0xFFFFFFFF:08x}"
        log.error("discord: interaction failed (ref %s)", ref, exc_info=error)
        with contextlib.suppress(Exception):
            await self.answer(interaction, replies.error(
                f"Something went wrong on our side (ref {ref}). Check /gpu status before trying again.",
                title="Internal error"))

    # --- answering ---------------------------------------------------------------------------
    def view(self, message: DiscordMessage) -> discord.ui.View | None:
        """The buttons of one message (persistent: no timeout; every item has a custom_id)."""
        if not message.rows:
            return None
        view = discord.ui.View(timeout=None)
        for row, buttons in enumerate(message.rows):
            for b in buttons:
                style = _STYLES.get(b.style, discord.ButtonStyle.secondary)
                if b.custom_id.startswith(PAGE_PREFIX) and b.custom_id[len(PAGE_PREFIX):].isdigit():
                    item: discord.ui.Item[Any] = PageButton(int(b.custom_id[len(PAGE_PREFIX):]), b.label, b.disabled)
                elif "|" in b.custom_id:
                    item = ActionButton(b.custom_id, b.label, style, b.disabled)
                else:
                    item = discord.ui.Button(label=b.label, custom_id=b.custom_id, style=style, disabled=b.disabled)
                item.row = row
                view.add_item(item)
        return view

    def send_kwargs(self, message: DiscordMessage) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"embeds": [discord.Embed.from_dict(e) for e in message.embeds]}
        if message.content:
            kwargs["content"] = message.content
        view = self.view(message)
        if view is not None:
            kwargs["view"] = view
        return kwargs

    def edit_kwargs(self, message: DiscordMessage) -> dict[str, Any]:
        kwargs = self.send_kwargs(message)
        kwargs.setdefault("content", message.content or None)
        kwargs.setdefault("view", None)
        return kwargs

    def remember(self, message_id: int | None, pages: list[DiscordMessage]) -> None:
        if message_id is None or len(pages) < 2:
            return
        self.pages[message_id] = pages
        self.pages.move_to_end(message_id)
        while len(self.pages) > MAX_PAGED:
            self.pages.popitem(last=False)

    async def answer(self, interaction: discord.Interaction[Any], reply: Reply) -> None:
        """A reply as the interaction's answer: the initial response when none was given yet,
        else follow-ups (ephemeral when the reply is for the asker only)."""
        pages = await self.render(reply)
        first, ephemeral = pages[0], reply.ephemeral or reply.level == "error"
        if not interaction.response.is_done():
            await interaction.response.send_message(ephemeral=ephemeral, **self.send_kwargs(first))
            if len(pages) > 1:
                with contextlib.suppress(discord.HTTPException):
                    self.remember((await interaction.original_response()).id, pages)
            return
        sent = await interaction.followup.send(ephemeral=ephemeral, wait=True, **self.send_kwargs(first))
        self.remember(sent.id, pages)

    # --- /gpu ----------------------------------------------------------------------------------
    async def run(self, interaction: discord.Interaction[Any], command: str, values: dict[str, Any]) -> None:
        """One `/gpu <command>`: checked at once, deferred, run as the user, answered."""
        try:
            line = grammar.line_for(command, values)
            grammar.check(line)
            if command == "help":
                await self.answer(interaction, grammar.help_reply(values.get("command")))
                return
        except GpuherdError as exc:
            await self.answer(interaction, replies.error(exc.message, exc.hint))
            return
        await interaction.response.defer(thinking=True)
        try:
            actor = await self.actor(interaction)
        except GpuherdError as exc:
            await self._final_original(interaction, replies.error(exc.message, exc.hint))
            return
        live = _Live(self, interaction, actor, original=True,
                     verb="Starting" if command == "start" else "Booting")
        ctx = grammar.Context(service=self.service, actor=actor, delivery_id=str(interaction.id),
                              progress=live.progress, wait=True)
        reply = await grammar.dispatch(ctx, line)
        await live.finish(reply)

    async def _final_original(self, interaction: discord.Interaction[Any], reply: Reply) -> None:
        await _Live(self, interaction, None, original=True).finish(reply)

    # --- buttons -------------------------------------------------------------------------------
    async def pressed(self, interaction: discord.Interaction[Any], ref: str) -> None:
        action = presses.parse(ref)
        if isinstance(action, Reply):
            await self.answer(interaction, action)
            return
        await interaction.response.defer()          # a deferred update: the message stays as it is
        message = interaction.message
        question = bool(message is not None and message.flags.ephemeral)
        try:
            actor = await self.actor(interaction)
        except GpuherdError as exc:
            await self.answer(interaction, replies.error(exc.message, exc.hint))
            return
        channel = str(interaction.channel_id or "")
        ctx = grammar.Context(service=self.service, actor=actor,
                              delivery_id=presses.delivery_id("discord", channel, str(message.id if message else ""), ref),
                              wait=True)
        live = _Live(self, interaction, actor, original=False,
                     verb="Starting" if action.op is Op.START else "Booting")
        ctx.progress = live.progress
        reply = await grammar.dispatch(ctx, presses.command_for(action))
        if question and reply.level != "error":
            # the question was answered: its buttons go, its outcome takes their place
            with contextlib.suppress(Exception):
                await interaction.edit_original_response(
                    content=None, view=None,
                    embeds=[discord.Embed(title="Answered", description=reply.title[:256])])
        await live.finish(reply)

    async def turn_page(self, interaction: discord.Interaction[Any], n: int) -> None:
        message = interaction.message
        pages = self.pages.get(message.id) if message is not None else None
        if not pages or not 0 <= n < len(pages):
            await self.answer(interaction, replies.error(
                "This list was shown before gpuherd restarted (its pages are gone); run the command again.",
                title="Pages expired"))
            return
        await interaction.response.edit_message(**self.edit_kwargs(pages[n]))

    # --- autocomplete --------------------------------------------------------------------------
    async def complete(self, interaction: discord.Interaction[Any], kind: grammar.Complete,
                       current: str) -> list[app_commands.Choice[str]]:
        """Suggestions from core (no provider call), at most 25, each name and value at most
        100 characters. A failure suggests nothing rather than an error."""
        try:
            return [app_commands.Choice(name=n[:100], value=v[:100])
                    for n, v in (await self._suggest(interaction, kind, current.strip()))[:MAX_CHOICES]]
        except Exception as exc:
            log.info("discord: no suggestions for %s: %s", kind, type(exc).__name__)
            return []

    async def _suggest(self, interaction: discord.Interaction[Any], kind: grammar.Complete,
                       current: str) -> list[tuple[str, str]]:
        low = current.lower()
        if kind == "command":
            return [(f"{c.name} — {c.summary}", c.name) for c in grammar.REGISTRY.all() if c.name.startswith(low)]
        if kind == "duration":
            return [(d, d) for d in DURATIONS if d.startswith(low)] or ([(current, current)] if current else [])
        if kind == "period":
            now = datetime.now(UTC)
            months = []
            year, month = now.year, now.month
            for _ in range(12):
                months.append(f"{year:04d}-{month:02d}")
                year, month = (year, month - 1) if month > 1 else (year - 1, 12)
            return [(p, p) for p in ("today", "week", "month", *months) if p.startswith(low)]
        if kind == "gpu":
            head, _, last = current.rpartition(" ")
            words = sorted(w for w in GPU_MODELS if w.startswith(last.lower()))
            if not current:
                return [(w, w) for w in sorted(GPU_MODELS, key=lambda w: (len(w), w))]
            return [(f"{head} {w}".strip(), f"{head} {w}".strip()) for w in words] or [(current, current)]
        actor = await self.actor(interaction)
        if kind == "template":
            listed = await self.service.list_templates(actor)
            return [(f"{t.name} — {t.description}" if getattr(t, "description", "") else t.name, t.name)
                    for t in listed.templates if low in t.name.lower()]
        if kind == "instance":
            mine = await self.service.status(actor, refresh=False, mine=True, limit=100)
            out = []
            for v in mine.instances:
                if low and low not in v.id.lower() and low not in (v.template or "").lower():
                    continue
                label = f"{v.id} · {v.state.value} · {rate(v.dph)} · {v.template} · {v.gpu_name}"
                out.append((label, v.id))
            return out
        return []


class _Live:
    """The message of one command or press. A command's is its original response; a press's is
    a follow-up created at the first event. Progress edits it (at most once a second, the last
    always); the final reply replaces it — or, when it is for the asker only, the public
    response is deleted and the reply sent ephemeral."""

    def __init__(self, surface: DiscordSurface, interaction: discord.Interaction[Any], actor: Actor | None, *,
                 original: bool, verb: str = "Booting") -> None:
        self.surface = surface
        self.interaction = interaction
        self.actor = actor
        self.original = original
        self.verb = verb
        self.message: discord.WebhookMessage | None = None
        self.last_edit = 0.0
        self.started = time.monotonic()

    @property
    def token_alive(self) -> bool:
        created = self.interaction.created_at
        age = (datetime.now(UTC) - created).total_seconds() if created else 0.0
        return max(age, time.monotonic() - self.started) < TOKEN_S

    async def progress(self, event: ProgressEvent) -> None:
        if not event.final and time.monotonic() - self.last_edit < EDIT_EVERY_S:
            return
        view = None
        if self.actor is not None:
            with contextlib.suppress(GpuherdError):
                view = await self.surface.service.view(self.actor, event.instance_id)
        await self._show((await self.surface.render(replies.progress_reply(event, view, verb=self.verb)))[0])

    async def _show(self, page: DiscordMessage) -> None:
        if not self.token_alive:
            return
        try:
            if self.original:
                await self.interaction.edit_original_response(**self.surface.edit_kwargs(page))
            elif self.message is None:
                self.message = await self.interaction.followup.send(wait=True, **self.surface.send_kwargs(page))
            else:
                await self.message.edit(**self.surface.edit_kwargs(page))
            self.last_edit = time.monotonic()
        except discord.HTTPException as exc:
            log.warning("discord: progress not shown: HTTP %s", exc.status)

    async def finish(self, reply: Reply) -> None:
        pages = await self.surface.render(reply)
        private = reply.ephemeral or reply.level == "error"
        if not self.token_alive:
            await self._post_in_channel(reply, pages)
            return
        try:
            if private:
                if self.original:
                    with contextlib.suppress(discord.HTTPException):
                        await self.interaction.delete_original_response()
                elif self.message is not None:
                    with contextlib.suppress(discord.HTTPException):
                        await self.message.delete()
                sent = await self.interaction.followup.send(ephemeral=True, wait=True,
                                                            **self.surface.send_kwargs(pages[0]))
                self.surface.remember(sent.id, pages)
            elif self.original:
                edited = await self.interaction.edit_original_response(**self.surface.edit_kwargs(pages[0]))
                self.surface.remember(edited.id, pages)
            elif self.message is not None:
                again = await self.message.edit(**self.surface.edit_kwargs(pages[0]))
                self.surface.remember(again.id, pages)
            else:
                sent = await self.interaction.followup.send(wait=True, **self.surface.send_kwargs(pages[0]))
                self.surface.remember(sent.id, pages)
        except discord.NotFound:             # the token ran out after all
            await self._post_in_channel(reply, pages)

    async def _post_in_channel(self, reply: Reply, pages: list[DiscordMessage]) -> None:
        """After the token's 15 minutes: the result as a channel message with the bot token (a
        result for the asker only goes to their DMs)."""
        try:
            if reply.ephemeral or reply.level == "error":
                target: Any = await self.surface.client.create_dm(self.interaction.user)
            else:
                target = self.surface.client.get_partial_messageable(self.interaction.channel_id or 0)
            sent = await target.send(**self.surface.send_kwargs(pages[0]))
            self.surface.remember(sent.id, pages)
        except discord.HTTPException as exc:
            log.warning("discord: the result of %s could not be posted: HTTP %s", reply.title[:40], exc.status)

