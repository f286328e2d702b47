"""The Discord fake (tests/discord_fake.py) and the payload builders (tests/discord_payloads.py)
against discord.py's real client: login, slash commands through a CommandTree, autocomplete, a
DynamicItem button, DMs, rate limits and server errors, as discord.py 2.7.1 really handles them.

What these tests pin down about discord.py (so a bot built on it can rely on it):
- `Client.login` asks GET /users/@me (a 401 there is `LoginFailure`) then GET
  /oauth2/applications/@me, whose id becomes `client.application_id`. No gateway call.
- Interaction callbacks always carry `?with_response=1`; discord.py reads the callback response body.
- A 429 is slept on for its `retry_after` and retried in the same request; `max_ratelimit_timeout`
  is clamped to at least 30 s (`HTTPClient.__init__`), so `Client(max_ratelimit_timeout=0.5)` still
  waits out a 5 s retry_after, and only a retry_after above 30 s raises `discord.RateLimited`
  (without a second attempt).
- 500, 502, 504 and 524 are retried after 1 + 2*attempt seconds, up to 5 attempts in all; other
  5xx (503) raise `DiscordServerError` at once. Tests use one failure so they stay near 1 s.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.http import Route, handle_message_parameters

from tests import discord_payloads as P
from tests.discord_fake import LOADING, FakeDiscord

TOKEN = "test-token"
MESSAGES = r"^/channels/\d+/messages$"


@pytest.fixture(autouse=True)
def _no_discord_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """discord.py logs (and swallows) exceptions raised in view/item callbacks and event handlers:
    a test passes only if it logged none."""
    caplog.set_level(logging.ERROR, logger="discord")
    yield
    errors = [r for r in caplog.records if r.name.startswith("discord") and r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(token=TOKEN) as server:
        before = Route.BASE
        Route.BASE = server.api_url
        try:
            yield server
        finally:
            Route.BASE = before


async def _client(**options: Any) -> discord.Client:
    client = discord.Client(intents=discord.Intents.default(), **options)
    await client.login(TOKEN)
    return client


async def _until(condition: Any, timeout: float = 2.0) -> None:
    """Yield to the loop until the bot-side `condition()` holds (the fake's `wait_for` covers
    the Discord side; this covers discord.py reading the answer)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture
async def client(fake: FakeDiscord) -> AsyncIterator[discord.Client]:
    c = await _client()
    try:
        yield c
    finally:
        await c.close()


class Bot:
    """A tiny `/gpu` tree: `search` defers then follows up, `whoami` answers with role names."""

    def __init__(self, client: discord.Client) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.errors: list[BaseException] = []
        self.failed = asyncio.Event()
        self.tree = app_commands.CommandTree(client)
        gpu = app_commands.Group(name="gpu", description="GPU machines")

        @gpu.command(name="search", description="Find offers")
        async def search(interaction: discord.Interaction, gpu: str, count: int = 1, spot: bool = False) -> None:
            self.seen.append(("search", (gpu, count, spot)))
            await interaction.response.defer(ephemeral=True, thinking=True)
            await interaction.followup.send(f"{count}x {gpu} (spot={spot})")

        @search.autocomplete("gpu")
        async def gpu_names(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
            self.seen.append(("autocomplete", current))
            return [app_commands.Choice(name=n, value=n) for n in ("H100", "A100", "L4") if n.startswith(current.upper())]

        @gpu.command(name="whoami", description="Who am I")
        async def whoami(interaction: discord.Interaction) -> None:
            assert isinstance(interaction.user, discord.Member)
            names = [r.name for r in interaction.user.roles]
            self.seen.append(("whoami", names))
            await interaction.response.send_message(", ".join(names) or "no roles")

        @gpu.command(name="admin", description="Admins only")
        @app_commands.checks.has_role("gpu-admin")
        async def admin(interaction: discord.Interaction) -> None:
            self.seen.append(("admin", None))
            await interaction.response.send_message("ok")

        @self.tree.error
        async def on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
            self.errors.append(error)
            self.failed.set()

        self.tree.add_command(gpu)


class StopButton(discord.ui.DynamicItem[discord.ui.Button], template=r"gpu:stop:(?P<iid>\d+)"):
    pressed: list[int] = []  # noqa: RUF012  (a class-level log the test resets)
    answered: list[discord.InteractionCallbackResponse] = []  # noqa: RUF012

    def __init__(self, iid: int) -> None:
        super().__init__(discord.ui.Button(label="Stop", style=discord.ButtonStyle.danger, custom_id=f"gpu:stop:{iid}"))
        self.iid = iid

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]) -> StopButton:
        return cls(int(match["iid"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        StopButton.pressed.append(self.iid)
        answer = await interaction.response.edit_message(content=f"stopping {self.iid}", view=None)
        assert answer is not None
        StopButton.answered.append(answer)


# --- login ------------------------------------------------------------------------------------

async def test_login_fetches_the_bot_user_and_the_application(fake: FakeDiscord, client: discord.Client) -> None:
    assert client.user is not None and str(client.user.id) == fake.bot_user_id and client.user.bot
    assert client.application_id == int(fake.app_id)
    assert [(c.method, c.path) for c in fake.calls] == [("GET", "/users/@me"), ("GET", "/oauth2/applications/@me")]
    assert all(c.headers["Authorization"] == f"Bot {TOKEN}" and c.status == 200 for c in fake.calls)
    assert "test-token" not in repr(fake.calls[0])
    shards, url, limits = await client.http.get_bot_gateway()
    assert (shards, url, limits["max_concurrency"]) == (1, fake.gateway_url, 1)


async def test_a_wrong_token_is_a_login_failure(fake: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.default())
    try:
        with pytest.raises(discord.LoginFailure):
            await client.login("not-the-token")
    finally:
        await client.close()
    assert [(c.path, c.status) for c in fake.calls] == [("/users/@me", 401)]
    assert fake.calls[0].answer == {"message": "401: Unauthorized", "code": 0}


async def test_bot_routes_need_the_token_and_interaction_webhooks_do_not(fake: FakeDiscord) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{fake.api_url}/users/@me") as r:
            assert r.status == 401
        async with http.post(f"{fake.api_url}/webhooks/{fake.app_id}/sometoken", json={"content": "hi"}) as r:
            assert r.status == 200 and (await r.json())["content"] == "hi"
        async with http.get(f"{fake.api_url}/guilds/1/nonsense", headers={"Authorization": f"Bot {TOKEN}"}) as r:
            assert r.status == 404 and await r.json() == {"message": "404: Not Found", "code": 0}
    assert [c.status for c in fake.calls] == [401, 200, 404]


# --- slash commands, autocomplete, role names -------------------------------------------------

async def test_subcommand_defers_then_follows_up(fake: FakeDiscord, client: discord.Client) -> None:
    bot = Bot(client)
    payload = P.command("gpu", "search", {"gpu": "H100", "count": 2, "spot": True}, user_id=P.USER_ID)
    assert payload["data"]["options"][0]["options"] == [
        {"name": "gpu", "type": 3, "value": "H100"}, {"name": "count", "type": 4, "value": 2},
        {"name": "spot", "type": 5, "value": True}]
    fake.dispatch(client, payload)
    await fake.wait_for(lambda c: c.route == "POST /webhooks/{app_id}/{token}")
    assert bot.errors == [] and bot.seen == [("search", ("H100", 2, True))]
    [callback] = fake.callbacks()
    assert (callback.interaction_id, callback.type, callback.data) == (payload["id"], 5, {"flags": 64})
    assert callback.call.query == {"with_response": "1"}
    assert callback.call.received_at < fake.followups()[0].received_at
    # Discord: the first follow-up after a defer edits the loading message (and keeps it ephemeral)
    original = fake.original(payload["token"])
    assert original["content"] == "2x H100 (spot=True)"
    assert original["flags"] == 64 and not original["flags"] & LOADING
    assert fake.channel_messages(P.CHANNEL_ID) == [original]


async def test_a_command_in_a_dm(fake: FakeDiscord, client: discord.Client) -> None:
    bot = Bot(client)
    payload = P.command("gpu", "search", {"gpu": "L4"}, guild_id=None, user_id="1310000000000000801")
    fake.dispatch(client, payload)
    await fake.wait_for(lambda c: c.route == "POST /webhooks/{app_id}/{token}")
    assert bot.errors == [] and bot.seen == [("search", ("L4", 1, False))]
    assert fake.dm_channel_id("1310000000000000801") == payload["channel_id"]
    assert [m["content"] for m in fake.dm_messages("1310000000000000801")] == ["1x L4 (spot=False)"]


async def test_autocomplete_answers_choices(fake: FakeDiscord, client: discord.Client) -> None:
    bot = Bot(client)
    payload = P.autocomplete("gpu", "search", {"gpu": "h", "count": 1}, focused="gpu")
    assert payload["type"] == 4 and payload["data"]["options"][0]["options"][0] == {
        "name": "gpu", "type": 3, "value": "h", "focused": True}
    fake.dispatch(client, payload)
    await fake.wait_for(lambda c: "/callback" in c.path)
    assert bot.errors == [] and bot.seen == [("autocomplete", "h")]
    [callback] = fake.callbacks()
    assert callback.type == 8 and callback.data == {"choices": [{"name": "H100", "value": "H100"}]}
    assert fake.messages == {}


async def test_role_names_need_the_guild_in_the_cache(fake: FakeDiscord, client: discord.Client) -> None:
    bot = Bot(client)
    admins, ops = "1310000000000000501", "1310000000000000502"
    fake.dispatch(client, P.command("gpu", "whoami", {}, roles=[admins, ops]))
    await fake.wait_for(lambda c: "/callback" in c.path)
    assert bot.seen == [("whoami", [])]       # ids in the payload, but no guild roles known

    guild = P.add_guild(client, P.GUILD_ID, roles={admins: "gpu-admin", ops: "ops"})
    assert guild is not None and {r.name for r in guild.roles} == {"@everyone", "gpu-admin", "ops"}
    payload = P.command("gpu", "whoami", {}, roles=[admins, ops])
    fake.dispatch(client, payload)
    await fake.wait_for(lambda c: payload["token"] in c.path)
    assert bot.seen[-1] == ("whoami", ["@everyone", "gpu-admin", "ops"])
    [_, callback] = fake.callbacks()
    assert callback.type == 4 and fake.original(payload["token"])["content"] == "@everyone, gpu-admin, ops"

    fake.dispatch(client, P.command("gpu", "admin", {}, roles=[ops], user_id="1310000000000000777"))
    fake.dispatch(client, second := P.command("gpu", "admin", {}, roles=[admins]))
    await fake.wait_for(lambda c: second["token"] in c.path)
    await asyncio.wait_for(bot.failed.wait(), 1)
    assert len(bot.errors) == 1 and isinstance(bot.errors[0], app_commands.MissingRole)
    assert bot.seen[-1] == ("admin", None)


async def test_resolved_roles_feed_role_options(fake: FakeDiscord, client: discord.Client) -> None:
    tree = app_commands.CommandTree(client)
    got: list[str] = []

    @tree.command(name="grant", description="Grant a role")
    async def grant(interaction: discord.Interaction, role: discord.Role) -> None:
        got.append(role.name)
        await interaction.response.send_message("granted", ephemeral=True)

    rid = "1310000000000000601"
    payload = P.command("grant", None, [{"name": "role", "type": 8, "value": rid}], resolved_roles={rid: "gpu-admin"})
    assert payload["data"]["resolved"]["roles"][rid]["name"] == "gpu-admin"
    fake.dispatch(client, payload)
    await fake.wait_for(lambda c: "/callback" in c.path)
    assert got == ["gpu-admin"]
    assert fake.original(payload["token"])["flags"] == 64


async def test_edit_and_delete_the_original_response(fake: FakeDiscord, client: discord.Client) -> None:
    tree = app_commands.CommandTree(client)
    done = asyncio.Event()
    deleted: list[str] = []

    @tree.command(name="ping", description="Ping")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")
        message = await interaction.original_response()
        await interaction.edit_original_response(content=f"pong {message.id}")
        extra = await interaction.followup.send("and another", wait=True)
        await extra.edit(content="edited follow-up")
        temporary = await interaction.followup.send("gone soon", wait=True)
        await temporary.delete()
        deleted.append(str(temporary.id))
        done.set()

    payload = P.command("ping", None, {})
    fake.dispatch(client, payload)
    await asyncio.wait_for(done.wait(), 3)
    original = fake.original(payload["token"])
    assert original["content"] == f"pong {original['id']}" and original["edited_timestamp"]
    [followup] = [m for m in fake.channel_messages(P.CHANNEL_ID) if m["id"] != original["id"]]
    assert followup["content"] == "edited follow-up" and followup["webhook_id"] == fake.app_id
    assert [c.path.rsplit("/", 1)[-1] for c in fake.edits()] == ["@original", followup["id"]]
    assert len(fake.followups()) == 2 and fake.deleted == set(deleted)
    with pytest.raises(KeyError):
        fake.message(deleted[0])


async def test_a_second_callback_is_refused(fake: FakeDiscord, client: discord.Client) -> None:
    payload = fake.register_interaction(P.command("gpu", "search", {"gpu": "L4"}))
    url = f"{fake.api_url}/interactions/{payload['id']}/{payload['token']}/callback"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"type": 5}) as r:
            assert r.status == 204
        async with http.post(url, json={"type": 4, "data": {"content": "late"}}) as r:
            assert r.status == 400 and (await r.json())["code"] == 40060
        other = fake.register_interaction(P.command("gpu", "search", {"gpu": "L4"}))
        async with http.post(f"{fake.api_url}/interactions/{other['id']}/{other['token']}/callback",
                             json={"type": 7, "data": {"content": "no"}}) as r:
            assert r.status == 400 and (await r.json())["code"] == 50035   # type 7 is for components only
        fake.expire(other["token"])
        async with http.post(f"{fake.api_url}/webhooks/{fake.app_id}/{other['token']}", json={"content": "late"}) as r:
            assert r.status == 404 and (await r.json())["code"] == 10015
    assert len(fake.callbacks()) == 1


# --- buttons ------------------------------------------------------------------------------------

async def test_dynamic_button_updates_its_message(fake: FakeDiscord, client: discord.Client) -> None:
    StopButton.pressed, StopButton.answered = [], []
    client.add_dynamic_items(StopButton)
    view = discord.ui.View(timeout=None)
    view.add_item(StopButton(7))
    # sent through the raw HTTP layer, so only add_dynamic_items (as after a restart) can route the press
    with handle_message_parameters(content="H100 is running", view=view) as params:
        sent = await client.http.send_message(int(P.CHANNEL_ID), params=params)
    stored = fake.message(sent["id"])
    assert stored["components"][0]["components"][0]["custom_id"] == "gpu:stop:7"

    payload = P.component("gpu:stop:7", message=stored, user_id=P.USER_ID)
    assert payload["type"] == 3 and payload["data"] == {"custom_id": "gpu:stop:7", "component_type": 2}
    fake.dispatch(client, payload)
    await fake.wait_for(lambda c: "/callback" in c.path)
    await _until(lambda: StopButton.answered)
    assert StopButton.pressed == [7]
    assert StopButton.answered[0].message_id == int(sent["id"])
    [callback] = fake.callbacks()
    assert callback.type == 7 and callback.data is not None and callback.data["content"] == "stopping 7"
    now = fake.message(sent["id"])
    assert now["content"] == "stopping 7" and now["components"] == [] and now["edited_timestamp"]


async def test_a_minimal_message_gets_the_pressed_button(fake: FakeDiscord, client: discord.Client) -> None:
    StopButton.pressed, StopButton.answered = [], []
    client.add_dynamic_items(StopButton)
    payload = P.component("gpu:stop:9", message={"id": P.next_snowflake(), "channel_id": P.CHANNEL_ID})
    assert payload["message"]["components"][0]["components"][0]["custom_id"] == "gpu:stop:9"
    fake.dispatch(client, payload)
    await fake.wait_for(lambda c: "/callback" in c.path)
    await _until(lambda: StopButton.answered)
    assert StopButton.pressed == [9]
    assert fake.message(payload["message"]["id"])["content"] == "stopping 9"


# --- DMs ----------------------------------------------------------------------------------------

async def test_dm_send_and_closed_dms(fake: FakeDiscord, client: discord.Client) -> None:
    alice, bob = "1310000000000000701", "1310000000000000702"
    user = await client.fetch_user(int(alice))
    dm = await user.create_dm()
    await dm.send("your H100 is ready")
    assert [m["content"] for m in fake.dm_messages(alice)] == ["your H100 is ready"]
    assert str(dm.id) == fake.dm_channel_id(alice)
    again = await client.http.start_private_message(int(alice))
    assert again["id"] == str(dm.id) and again["type"] == 1 and again["recipients"][0]["id"] == alice

    fake.close_dms(bob)
    channel = await (await client.fetch_user(int(bob))).create_dm()
    with pytest.raises(discord.Forbidden) as refused:
        await channel.send("hello?")
    assert refused.value.code == 50007 and refused.value.status == 403
    assert fake.dm_messages(bob) == []


# --- rate limits, server errors, latency --------------------------------------------------------

async def test_429_is_waited_out_and_retried(fake: FakeDiscord, client: discord.Client) -> None:
    fake.fail("POST", MESSAGES, 429, retry_after=0.3)
    await client.get_partial_messageable(int(P.CHANNEL_ID)).send("after the limit")
    attempts = [c for c in fake.calls if c.method == "POST"]
    assert [c.status for c in attempts] == [429, 200]
    assert attempts[1].received_at - attempts[0].received_at >= 0.3
    assert attempts[0].answer == {"message": "You are being rate limited.", "retry_after": 0.3, "global": False}
    assert [m["content"] for m in fake.channel_messages(P.CHANNEL_ID)] == ["after the limit"]


async def test_max_ratelimit_timeout_is_at_least_30_seconds(fake: FakeDiscord) -> None:
    client = await _client(max_ratelimit_timeout=0.5)
    try:
        assert client.http.max_ratelimit_timeout == 30.0
        channel = client.get_partial_messageable(int(P.CHANNEL_ID))
        fake.fail("POST", MESSAGES, 429, retry_after=5)
        with pytest.raises(TimeoutError):          # 5 s < 30 s: discord.py sleeps instead of raising
            await asyncio.wait_for(channel.send("waits"), 0.5)
        fake.fail("POST", MESSAGES, 429, retry_after=60)
        with pytest.raises(discord.RateLimited) as limited:
            await client.get_partial_messageable(int(P.CHANNEL_ID) + 1).send("too long")
        assert limited.value.retry_after == 60
        assert [c.status for c in fake.calls if c.method == "POST"] == [429, 429]     # no second attempt
    finally:
        await client.close()


async def test_500_is_retried_and_503_is_not(fake: FakeDiscord, client: discord.Client) -> None:
    channel = client.get_partial_messageable(int(P.CHANNEL_ID))
    fake.fail("POST", MESSAGES, 500)
    started = time.monotonic()
    await channel.send("second try")
    assert 0.9 < time.monotonic() - started < 2.5            # discord.py waits 1 s before attempt 2
    fake.fail("POST", MESSAGES, 503, body={"message": "upstream gone", "code": 0})
    with pytest.raises(discord.DiscordServerError) as failed:
        await channel.send("no retry")
    assert failed.value.status == 503
    assert [c.status for c in fake.calls if c.method == "POST"] == [500, 200, 503]


async def test_followup_429_is_retried_by_the_webhook_adapter(fake: FakeDiscord, client: discord.Client) -> None:
    Bot(client)
    fake.fail("POST", r"^/webhooks/", 429, retry_after=0.2)
    payload = P.command("gpu", "search", {"gpu": "A100"})
    fake.dispatch(client, payload)
    await fake.wait_for(lambda c: c.path.startswith("/webhooks/") and c.status == 200)
    assert [c.status for c in fake.calls if c.path.startswith("/webhooks/")] == [429, 200]
    assert fake.original(payload["token"])["content"] == "1x A100 (spot=False)"


async def test_delay_does_not_block_the_loop(fake: FakeDiscord, client: discord.Client) -> None:
    fake.delay(MESSAGES, 0.3, method="POST")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    await client.get_partial_messageable(int(P.CHANNEL_ID)).send("slow")
    elapsed = time.monotonic() - started
    ticker.cancel()
    assert 0.3 <= elapsed < 1.5 and ticks >= 8


async def test_wait_for_times_out_with_the_calls_seen(fake: FakeDiscord, client: discord.Client) -> None:
    with pytest.raises(AssertionError, match="GET /oauth2/applications/@me -> 200"):
        await fake.wait_for(lambda c: c.method == "DELETE", timeout=0.1)


# --- messages, files, limits, commands ---------------------------------------------------------

async def test_multipart_bodies_and_message_edits(fake: FakeDiscord, client: discord.Client, tmp_path: Any) -> None:
    channel = client.get_partial_messageable(int(P.CHANNEL_ID))
    (tmp_path / "costs.csv").write_text("gpu,usd\nH100,2.10\n")
    sent = await channel.send("costs attached", file=discord.File(tmp_path / "costs.csv"))
    call = fake.calls[-1]
    assert call.json["content"] == "costs attached" and call.files[0]["filename"] == "costs.csv"
    assert sent.attachments[0].filename == "costs.csv" and sent.attachments[0].size == call.files[0]["size"]
    await sent.edit(content="costs (edited)", embed=discord.Embed(title="Costs"))
    fetched = await channel.fetch_message(sent.id)
    assert fetched.content == "costs (edited)" and fetched.embeds[0].title == "Costs"
    [embed] = fake.message(sent.id)["embeds"]
    assert (embed["title"], embed["type"]) == ("Costs", "rich")
    with pytest.raises(discord.HTTPException) as too_long:
        await channel.send("x" * 2001)
    assert too_long.value.status == 400 and too_long.value.code == 50035
    with pytest.raises(discord.NotFound) as unknown:
        await channel.fetch_message(12345)
    assert unknown.value.code == 10008
    fetched_channel = await client.fetch_channel(int(P.CHANNEL_ID))
    assert isinstance(fetched_channel, discord.TextChannel) and str(fetched_channel.guild.id) == fake.guild_id


async def test_command_sync_keeps_ids(fake: FakeDiscord, client: discord.Client) -> None:
    bot = Bot(client)
    synced = await bot.tree.sync()
    assert [c.name for c in synced] == ["gpu"] and synced[0].application_id == int(fake.app_id)
    [put] = [c for c in fake.calls if c.method == "PUT"]
    assert put.path == f"/applications/{fake.app_id}/commands"
    assert {o["name"] for o in put.json[0]["options"]} == {"search", "whoami", "admin"}
    again = await bot.tree.sync()
    fetched = await bot.tree.fetch_commands()
    assert again[0].id == synced[0].id == fetched[0].id
    guild = discord.Object(int(P.GUILD_ID))
    bot.tree.copy_global_to(guild=guild)
    in_guild = await bot.tree.sync(guild=guild)
    assert in_guild[0].guild_id == int(P.GUILD_ID) and in_guild[0].id != synced[0].id
    assert [c.name for c in await bot.tree.fetch_commands(guild=guild)] == ["gpu"]


def test_snowflakes_increase_and_carry_the_time() -> None:
    ids = [int(P.next_snowflake()) for _ in range(1000)]
    assert ids == sorted(set(ids))
    assert abs(P.snowflake_time(ids[-1]).timestamp() - time.time()) < 5
    dm = P.command("gpu", "search", {"gpu": "H100"}, guild_id=None, user_id="42")
    assert "member" not in dm and dm["user"]["id"] == "42" and dm["context"] == 1 and dm["channel"]["type"] == 1
    with pytest.raises(TypeError):
        P.command("gpu", "search", {"gpu": object()})
