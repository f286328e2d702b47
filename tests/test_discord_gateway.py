"""The fake Discord gateway (tests/discord_fake.py) against raw websockets and discord.py's real
`Client.connect()`, then `gpuherd serve` as a real process connected to it.

What these tests pin down about discord.py 2.7.1's gateway client (and so about gpuherd's bot):
- `Client` (not `AutoShardedClient`) never asks GET /gateway/bot: it connects to
  `DiscordWebSocket.DEFAULT_GATEWAY` with `?v=10&encoding=json&compress=zlib-stream`
  (`zstd-stream` instead when `zstandard` or Python 3.14's `compression.zstd` is importable; this
  venv has neither). It inflates binary frames on one zlib stream per connection, each message
  ending in 00 00 ff ff, and reads text frames as they are: both work, whatever it asked for.
- It heartbeats once right after HELLO (before IDENTIFY, `d` null), then every interval with the
  last sequence number; `on_ready` comes `guild_ready_timeout` (2 s) after the last GUILD_CREATE.
- A close with 4000 makes it RESUME at `resume_gateway_url` at once (no new IDENTIFY); a
  privileged intent the application lacks (close 4014) raises `PrivilegedIntentsRequired`.
- `Client.close()` closes the gateway with **4000**, not the 1000 it asks for: its `ws.close(1000)`
  runs in another task than `poll_event`'s receive, aiohttp wakes that receive with CLOSING, and
  `poll_event` closes first with 4000. Discord keeps a 4000-closed session resumable (the bot
  shows online until it times out); a 1000 would end it. The tests accept both codes, and
  require the close to come from the client.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from gpuherd.bot.discord.app import make_client
from gpuherd.core.config import Settings
from tests import discord_payloads as P
from tests.discord_fake import (
    INTENT_GUILD_MEMBERS,
    LOADING,
    PRIVILEGED_INTENTS,
    ZLIB_SUFFIX,
    FakeDiscord,
    GatewayConnection,
)
from tests.test_serve import Served

TOKEN = "discord-gateway-token-0123456789"
ADMINS, OPS = "1310000000000000501", "1310000000000000502"
CLIENT_CLOSES = {1000, 4000}          # see the module docstring: discord.py's close sends 4000


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    before = (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
    async with FakeDiscord(token=TOKEN) as server:
        server.guild_roles = {ADMINS: "gpu-admin", OPS: "ops"}
        Route.BASE = server.api_url
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(server.gateway_url)
        try:
            yield server
        finally:
            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = before


async def until(condition: Callable[[], Any], timeout: float = 5.0, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (got := condition()):
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        await asyncio.sleep(0.01)
    return got


# --- the protocol, over a raw websocket ----------------------------------------------------------

class Raw:
    """A bare gateway client: reads text frames, or zlib-stream binary frames on one inflater."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.inflate = zlib.decompressobj()
        self.kinds: list[aiohttp.WSMsgType] = []

    async def next(self) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), 2)
        self.kinds.append(msg.type)
        if msg.type is aiohttp.WSMsgType.BINARY:
            assert msg.data.endswith(ZLIB_SUFFIX), "each message ends with a Z_SYNC_FLUSH"
            return json.loads(self.inflate.decompress(msg.data))
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        return json.loads(msg.data)

    async def send(self, op: int, d: Any) -> None:
        await self.ws.send_str(json.dumps({"op": op, "d": d}))

    async def closed_with(self) -> int | None:
        msg = await asyncio.wait_for(self.ws.receive(), 2)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        return self.ws.close_code


def identify(token: str = TOKEN, intents: int = 1) -> dict[str, Any]:
    return {"token": token, "intents": intents, "properties": {"os": "linux", "browser": "t", "device": "t"}}


async def test_hello_identify_ready_guild_create_heartbeats_and_sequence_numbers(fake: FakeDiscord) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{fake.api_url}/gateway/bot", headers={"Authorization": f"Bot {TOKEN}"}) as r:
            assert (await r.json())["url"] == fake.gateway_url
        async with http.ws_connect(f"{fake.gateway_url}?v=10&encoding=json") as ws:
            raw = Raw(ws)
            hello = await raw.next()
            assert hello == {"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None}
            await raw.send(1, None)                       # a heartbeat before IDENTIFY is fine
            assert (await raw.next())["op"] == 11
            await raw.send(2, identify())
            ready, guild = await raw.next(), await raw.next()
            assert (ready["op"], ready["t"], ready["s"]) == (0, "READY", 1)
            d = ready["d"]
            assert d["user"]["id"] == fake.bot_user_id and d["user"]["bot"] is True
            assert d["application"] == {"id": fake.app_id, "flags": 0}
            assert d["guilds"] == [{"id": fake.guild_id, "unavailable": True}]
            assert d["resume_gateway_url"] == fake.gateway_url and len(d["session_id"]) == 32
            assert (guild["t"], guild["s"], guild["d"]["id"]) == ("GUILD_CREATE", 2, fake.guild_id)
            assert {r["name"] for r in guild["d"]["roles"]} == {"@everyone", "gpu-admin", "ops"}
            assert [m["user"]["id"] for m in guild["d"]["members"]] == [fake.bot_user_id]
            connected = await fake.wait_connected()
            payload = P.command("gpu", "status", {})
            sent_at = await fake.send_interaction(payload)
            event = await raw.next()
            assert (event["t"], event["s"], event["d"]["token"]) == ("INTERACTION_CREATE", 3, payload["token"])
            assert sent_at <= time.monotonic() and fake.interactions[payload["token"]].type == 2
            await raw.send(1, 3)
            assert (await raw.next())["op"] == 11
            assert raw.kinds == [aiohttp.WSMsgType.TEXT] * 6, "no compress asked: text frames"
            assert connected.ops == [1, 2, 1] and connected.heartbeats == [None, 3]
            assert connected.compress is None and connected.query == {"v": "10", "encoding": "json"}
        [gone] = await fake.wait_disconnected()
        assert gone.closed_by == "client" and gone.close_code == 1000
    assert fake.identified[0].intents == 1 and fake.identified[0].has_token(TOKEN)
    assert TOKEN not in repr(fake.identified) and TOKEN not in repr(fake.connections)


async def test_zlib_stream_frames_and_refusals(fake: FakeDiscord) -> None:
    with pytest.raises(AssertionError, match="no gateway connection"):
        await fake.send_interaction(P.command("gpu", "status", {}))   # nobody connected: not silently lost
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{fake.gateway_url}?v=10&encoding=json&compress=zlib-stream") as ws:
            raw = Raw(ws)
            assert (await raw.next())["op"] == 10
            await raw.send(2, identify())
            assert [(await raw.next())["t"] for _ in range(2)] == ["READY", "GUILD_CREATE"]
            assert raw.kinds == [aiohttp.WSMsgType.BINARY] * 3
            await raw.send(2, identify())
            assert await raw.closed_with() == 4005                       # already authenticated
        refusals = [
            ("?v=9&encoding=json", None, 4012),                          # invalid API version
            ("?v=10&encoding=etf", None, 4002),                          # the fake speaks JSON only
            ("?v=10&encoding=json", (3, {"status": "online"}), 4003),    # not authenticated yet
            ("?v=10&encoding=json", (42, {}), 4001),                     # unknown opcode
            ("?v=10&encoding=json", (2, identify("not-the-token")), 4004),
            ("?v=10&encoding=json", (2, identify(intents=1 | INTENT_GUILD_MEMBERS)), 4014),
            ("?v=10&encoding=json", (2, identify(intents=1 << 40)), 4013),
        ]
        for query, frame, code in refusals:
            async with http.ws_connect(fake.gateway_url + query) as ws:
                raw = Raw(ws)
                if frame is not None:
                    assert (await raw.next())["op"] == 10
                    await raw.send(*frame)
                assert await raw.closed_with() == code, (query, frame)
    assert [c.close_code for c in fake.connections] == [4005, *(code for _, _, code in refusals)]
    assert all(c.closed_by == "fake" for c in fake.connections)
    assert [i.has_token(TOKEN) for i in fake.identified] == [True, True, False, True, True]
    [session] = fake.sessions.values()          # only the first connection got one; 4005 keeps it resumable
    assert session.id == fake.connections[0].session_id and not session.ended and session.connection is None


# --- discord.py's own client ---------------------------------------------------------------------

class Whoami:
    """A `/whoami` tree on a client: answers with the member's role names (from the guild cache)."""

    def __init__(self, client: discord.Client) -> None:
        self.tree = app_commands.CommandTree(client)
        self.seen: list[list[str]] = []

        @self.tree.command(name="whoami", description="Who am I")
        async def whoami(interaction: discord.Interaction) -> None:
            assert isinstance(interaction.user, discord.Member)
            self.seen.append([r.name for r in interaction.user.roles])
            await interaction.response.send_message(", ".join(self.seen[-1]))


async def _connected(client: discord.Client, fake: FakeDiscord) -> tuple[asyncio.Task[None], GatewayConnection]:
    await client.login(TOKEN)
    task = asyncio.create_task(client.connect(reconnect=True))
    return task, await fake.wait_connected()


async def _closed(client: discord.Client, task: asyncio.Task[None], fake: FakeDiscord) -> None:
    await client.close()
    await asyncio.wait_for(task, 5)
    assert all(c.closed_by in ("client", "fake") and not c.open for c in await fake.wait_disconnected())


@pytest.mark.parametrize("compression", [True, False], ids=["zlib-stream", "text"])
async def test_discord_py_connects_with_gpuherds_intents_and_gets_the_guilds_roles(
        fake: FakeDiscord, tmp_path: Path, compression: bool) -> None:
    fake.gateway_compression = compression
    client = make_client(Settings(home=tmp_path / "home"))
    ready = asyncio.Event()
    client.event(_setter("on_ready", ready))
    bot = Whoami(client)
    task, conn = await _connected(client, fake)
    try:
        assert conn.query == {"v": "10", "encoding": "json", "compress": "zlib-stream"}
        assert conn.compress == ("zlib-stream" if compression else None)
        [identified] = fake.identified
        assert identified.has_token(TOKEN) and TOKEN not in repr(identified)
        assert identified.intents == discord.Intents(guilds=True).value == 1
        assert identified.intents & PRIVILEGED_INTENTS == 0
        intents = discord.Intents._from_value(identified.intents)
        assert not (intents.members or intents.presences or intents.message_content)
        await asyncio.wait_for(ready.wait(), 5)          # guild_ready_timeout (2 s) after GUILD_CREATE
        assert client.user is not None and str(client.user.id) == fake.bot_user_id
        guild = client.get_guild(int(fake.guild_id))
        assert guild is not None and not guild.unavailable
        assert {r.name for r in guild.roles} == {"@everyone", "gpu-admin", "ops"}
        assert guild.me is not None and str(guild.me.id) == fake.bot_user_id
        assert not any(c.path.startswith("/gateway") for c in fake.calls), "Client never asks /gateway/bot"

        payload = P.command("whoami", None, {}, roles=[ADMINS, OPS])
        await fake.send_interaction(payload)
        await fake.wait_for(lambda c: payload["token"] in c.path)
        assert bot.seen == [["@everyone", "gpu-admin", "ops"]]    # the gateway's GUILD_CREATE, no add_guild
        assert fake.original(payload["token"])["content"] == "@everyone, gpu-admin, ops"
    finally:
        await _closed(client, task, fake)
    assert conn.closed_by == "client" and conn.close_code in CLIENT_CLOSES


def _setter(name: str, event: asyncio.Event) -> Any:
    async def handler(*args: Any) -> None:
        event.set()
    handler.__name__ = name
    return handler


async def test_a_privileged_intent_the_app_lacks_is_refused_with_4014(fake: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.all())
    await client.login(TOKEN)
    try:
        with pytest.raises(discord.PrivilegedIntentsRequired):
            await asyncio.wait_for(client.connect(reconnect=True), 5)
    finally:
        await client.close()
    assert [c.close_code for c in fake.connections] == [4014]

    fake.privileged_intents = INTENT_GUILD_MEMBERS       # switched on in the portal: now it may
    client = discord.Client(intents=discord.Intents(guilds=True, members=True))
    task, conn = await _connected(client, fake)
    try:
        assert conn.identify is not None and conn.identify.intents & INTENT_GUILD_MEMBERS
        assert client.application_flags.gateway_guild_members_limited
    finally:
        await _closed(client, task, fake)


async def test_a_dropped_connection_resumes_and_gets_what_it_missed(fake: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents(guilds=True))
    bot = Whoami(client)
    task, first = await _connected(client, fake)
    try:
        dropping = asyncio.ensure_future(fake.disconnect(4000))
        await asyncio.sleep(0)                       # the session is detached; the client has not seen the close
        payload = P.command("whoami", None, {}, roles=[OPS])
        await fake.send_interaction(payload)         # kept for the RESUME
        await dropping
        second = await fake.wait_connected()
        assert second is not first and second.resumed == first.session_id and second.identify is None
        await fake.wait_for(lambda c: payload["token"] in c.path)
        assert bot.seen == [["@everyone", "ops"]] and len(fake.identified) == 1
        assert first.close_code == 4000 and first.closed_by == "fake"
        assert second.heartbeats[0] == 2, "the first heartbeat carries the last seq before the drop"
        payload = P.command("whoami", None, {})
        await fake.request_reconnect()               # op 7: reconnect and resume again
        await until(lambda: not second.open, what="the client to close after op 7")
        third = await fake.wait_connected()
        assert second.closed_by == "client"
        assert third is not second and third.resumed == first.session_id
        await fake.send_interaction(payload)
        await fake.wait_for(lambda c: payload["token"] in c.path)
        assert bot.seen[-1] == ["@everyone"]
    finally:
        await _closed(client, task, fake)


# --- gpuherd serve -------------------------------------------------------------------------------

def _original_has(fake: FakeDiscord, token: str, needle: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        try:
            message = fake.original(token)
        except KeyError:
            return None
        return message if needle in json.dumps(message) else None
    return check


async def test_gpuherd_serve_connects_answers_over_the_gateway_and_closes_on_sigterm(
        fake: FakeDiscord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET", "DISCORD_BOT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    server = Served(home, "serve-discord", DISCORD_BOT_TOKEN=TOKEN, GPUHERD_DISCORD_API_URL=fake.api_url,
                    GPUHERD_DISCORD_GATEWAY_URL=fake.gateway_url, GPUHERD_SANDBOX_TIME_SCALE="0")   # boots at once
    try:
        await asyncio.to_thread(server.wait_healthy)            # blocking polls off the loop the fake runs on
        conn = await fake.wait_connected(timeout=15)
        [identified] = fake.identified
        assert identified.has_token(TOKEN) and identified.intents == 1
        assert [c.path for c in fake.calls[:2]] == ["/users/@me", "/oauth2/applications/@me"]

        status = P.command("gpu", "status", {}, user_id="1310000000000000201")
        sent = await fake.send_interaction(status)
        first = await fake.wait_for(lambda c: status["token"] in c.path and "/callback" in c.path, timeout=5)
        [callback] = [c for c in fake.callbacks() if c.token == status["token"]]
        assert callback.type == 5, "deferred before any core work"
        assert first.received_at - sent < 3.0
        edited = await until(lambda: _edited_original(fake, status["token"]), 10, "the status edit")
        assert not edited["flags"] & LOADING, "no longer 'thinking'"
        [embed] = edited["embeds"]
        assert embed["title"].startswith("0 instances · spending $0.000/h"), embed
        assert "sandbox" in embed["footer"]["text"]

        boot = P.command("gpu", "boot", {"template": "budget"}, user_id="1310000000000000202")
        await fake.send_interaction(boot)
        booted = await until(_original_has(fake, boot["token"], "Booted g-"), 15, "Booted g-")
        assert [c.type for c in fake.callbacks() if c.token == boot["token"]] == [5]
        assert any("@original" in c.path and boot["token"] in c.path for c in fake.edits())
        assert booted["author"]["id"] == fake.bot_user_id

        code, took = await asyncio.to_thread(server.terminate)
        assert code == 0, server.text()
        assert took < 10
        [gone] = await fake.wait_disconnected(timeout=5)
        assert gone is conn and gone.closed_by == "client" and gone.close_code == 1000, "gpuherd logs out (1000), not drops (4000)"
        log = server.text()
        assert TOKEN not in log, "the bot token never reaches the log"
        assert "Traceback" not in log, log
    finally:
        await asyncio.to_thread(server.stop)                  # kills it if still running


def _edited_original(fake: FakeDiscord, token: str) -> dict[str, Any] | None:
    try:
        message = fake.original(token)
    except KeyError:
        return None
    return message if message["edited_timestamp"] else None
