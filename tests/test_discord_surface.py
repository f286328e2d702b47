"""The Discord surface end to end, offline: raw `INTERACTION_CREATE` payloads in Discord's
documented shape go through discord.py's own dispatch (`parse_interaction_create` → the
`CommandTree`, or the `DynamicItem` buttons), and discord.py's own HTTP client answers a
loopback stand-in for Discord's REST API (tests/discord_fake.py), which records the callbacks,
follow-ups, edits and DMs. The core is the real one on the sandbox provider.

Each command is answered or deferred at once (callback before any core work); results edit the
deferred response; errors and questions are ephemeral; buttons carry core action refs and work
on messages from before a restart; the clicker is checked by core; a double click boots once;
Discord roles mapped in config raise a member's role; notices reach DMs with working buttons,
and the team's channel when DMs are closed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from discord.gateway import DiscordWebSocket
from discord.http import Route

from gpuherd.bot.discord import app as discord_app
from gpuherd.bot.discord.app import DiscordSurface
from gpuherd.bot.discord.deliver import DiscordNotices
from gpuherd.bot.discord.embeds import PAGE_PREFIX
from gpuherd.bot.discord.limits import violations
from gpuherd.core.clock import VirtualClock
from gpuherd.core.config import Settings
from gpuherd.core.models import Instance
from gpuherd.core.outbox import Deliverer
from gpuherd.core.service import GpuService
from tests import discord_payloads as P
from tests.discord_fake import EPHEMERAL, FakeDiscord

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOKEN = "discord-test-token-0123456789"
ALICE = P.USER_ID                      # a member of team ml
BOB = "1310000000000000041"            # a viewer
CAROL = "1310000000000000042"          # holds the Discord role gpu-admin
ADMIN_ROLE = "1310000000000000050"
TEAM_CHANNEL = 1310000000000000060


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    before = (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
    async with FakeDiscord(token=TOKEN) as server:
        server.add_channel(TEAM_CHANNEL)
        try:
            yield server
        finally:
            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = before


@pytest.fixture
def settings(tmp_path: Path, db_url: str, fake: FakeDiscord) -> Settings:
    return Settings(home=tmp_path / "home", database_url=db_url, local_user="root", local_role="admin",
                    poll_interval_s=0.01, boot_timeout_s=30, discord_bot_token=TOKEN, discord_api_url=fake.api_url,
                    discord_channels={"ml": TEAM_CHANNEL}, discord_roles={"gpu-admin": "admin"})


async def _surface(service: GpuService) -> DiscordSurface:
    surface = DiscordSurface(service)
    await surface.client.login(TOKEN)
    P.add_guild(surface.client, roles={ADMIN_ROLE: "gpu-admin"})
    return surface


@pytest.fixture
async def surface(service: GpuService) -> AsyncIterator[DiscordSurface]:
    root = service.local_actor()
    await service.set_user(root, f"discord:{ALICE}", role="member", team="ml")
    await service.set_user(root, f"discord:{BOB}", role="viewer", team="ml")
    s = await _surface(service)
    try:
        yield s
    finally:
        await s.client.close()


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


def final_original(fake: FakeDiscord, token: str, needle: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        try:
            message = fake.original(token)
        except KeyError:
            return None
        return message if needle in json.dumps(message) else None
    return check


def custom_ids(message: dict[str, Any]) -> list[str]:
    return [c["custom_id"] for row in message.get("components") or [] for c in row["components"]]


def callback_of(fake: FakeDiscord, payload: dict[str, Any]) -> Callable[[], Any]:
    return lambda: next((c for c in fake.callbacks() if c.token == payload["token"]), None)


def new_followup(fake: FakeDiscord, token: str, needle: str, *, ephemeral: bool | None = None) -> Callable[[], Any]:
    def check() -> Any:
        for call in fake.followups():
            if f"/{token}" not in call.path or needle not in json.dumps(call.json):
                continue
            flags = int((call.json or {}).get("flags") or 0)
            if ephemeral is None or bool(flags & EPHEMERAL) == ephemeral:
                return call
        return None
    return check


def state(service: GpuService, iid: str) -> str:
    with service.db.session() as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        return inst.state


async def boot(fake: FakeDiscord, surface: DiscordSurface, user: str = ALICE) -> tuple[str, dict[str, Any]]:
    payload = P.command("gpu", "boot", {"template": "budget"}, user_id=user)
    fake.dispatch(surface.client, payload)
    message = await until(final_original(fake, payload["token"], "Booted g-"))
    iid = next(w for w in json.dumps(message).replace('"', " ").split() if w.startswith("g-"))
    return iid.rstrip(",.:)"), message


# --- commands ------------------------------------------------------------------------------------

async def test_a_command_is_deferred_before_any_core_work_then_edited_with_the_result(
        fake: FakeDiscord, surface: DiscordSurface) -> None:
    payload = P.command("gpu", "search", {"query": "4090"})
    started = time.monotonic()
    fake.dispatch(surface.client, payload)
    first = await until(callback_of(fake, payload))
    assert first.type == 5, "deferred (thinking) first"
    assert first.call.received_at - started < 1.0
    message = await until(final_original(fake, payload["token"], "offer"))
    assert not violations({"content": message.get("content") or "", "embeds": message["embeds"],
                           "components": message.get("components") or []})
    assert any(i.startswith("boot|") for i in custom_ids(message)), "Boot buttons carry core action refs"
    assert all(len(i) <= 100 and "/gpu" not in i for i in custom_ids(message))


async def test_bad_input_and_help_are_answered_at_once_and_only_to_the_asker(
        fake: FakeDiscord, surface: DiscordSurface, service: GpuService) -> None:
    bad = P.command("gpu", "stop", {"instance": "g-" + "x" * 500})
    fake.dispatch(surface.client, bad)
    answer = await until(callback_of(fake, bad))
    assert answer.type == 4 and answer.data is not None
    assert answer.data["flags"] & EPHEMERAL
    assert "too long" in json.dumps(answer.data).lower()
    assert "Traceback" not in json.dumps(answer.data)
    helped = P.command("gpu", "help", {"command": "boot"})
    fake.dispatch(surface.client, helped)
    answer = await until(callback_of(fake, helped))
    assert answer.type == 4 and answer.data is not None and answer.data["flags"] & EPHEMERAL
    assert "/gpu boot" in json.dumps(answer.data)


async def test_an_error_from_core_replaces_the_public_response_by_an_ephemeral_one(
        fake: FakeDiscord, surface: DiscordSurface) -> None:
    payload = P.command("gpu", "stop", {"instance": "g-0000"})
    fake.dispatch(surface.client, payload)
    await until(new_followup(fake, payload["token"], "g-0000", ephemeral=True))
    assert any(c.method == "DELETE" and payload["token"] in c.path for c in fake.calls), "the public 'thinking' went"


async def test_a_boot_edits_one_response_as_it_moves_then_stop_by_its_button(
        fake: FakeDiscord, surface: DiscordSurface, service: GpuService) -> None:
    iid, message = await boot(fake, surface)
    assert state(service, iid) == "running"
    payload_edits = [c for c in fake.edits() if "@original" in c.path]
    assert len(payload_edits) >= 2, "progress, then the result, in the same response"
    assert f"stop|{iid}" in custom_ids(message)
    press = P.component(f"stop|{iid}", message=message, user_id=ALICE)
    fake.dispatch(surface.client, press)
    assert (await until(callback_of(fake, press))).type == 6
    await until(new_followup(fake, press["token"], f"Stopped {iid}", ephemeral=False))
    assert state(service, iid) == "stopped"


async def test_a_viewers_click_is_refused_by_core_and_changes_nothing(
        fake: FakeDiscord, surface: DiscordSurface, service: GpuService) -> None:
    iid, message = await boot(fake, surface)
    press = P.component(f"stop|{iid}", message=message, user_id=BOB)
    fake.dispatch(surface.client, press)
    await until(new_followup(fake, press["token"], "viewer", ephemeral=True))
    assert state(service, iid) == "running"


async def test_a_double_click_on_boot_boots_once(fake: FakeDiscord, surface: DiscordSurface,
                                                 service: GpuService) -> None:
    search = P.command("gpu", "search", {"query": "4090"})
    fake.dispatch(surface.client, search)
    message = await until(final_original(fake, search["token"], "boot|"))
    ref = next(i for i in custom_ids(message) if i.startswith("boot|"))
    first, second = (P.component(ref, message=message, user_id=ALICE) for _ in range(2))
    fake.dispatch(surface.client, first)
    fake.dispatch(surface.client, second)
    # both presses are answered, about one machine (the later one is the earlier one's replay)
    answers = [await until(new_followup(fake, press["token"], "sandbox")) for press in (first, second)]
    ids = [{w for w in json.dumps(a.json).replace('"', " ").split() if w.startswith("g-")} for a in answers]
    assert ids[0] & ids[1]
    with service.db.session() as s:
        from sqlmodel import select
        booted = s.exec(select(Instance)).all()
    assert len(booted) == 1


async def test_destroy_asks_in_an_ephemeral_question_with_the_cost_and_yes_destroys(
        fake: FakeDiscord, surface: DiscordSurface, service: GpuService) -> None:
    iid, message = await boot(fake, surface)
    press = P.component(f"destroy|{iid}", message=message, user_id=ALICE)
    fake.dispatch(surface.client, press)
    asked = await until(new_followup(fake, press["token"], f"Destroy {iid}", ephemeral=True))
    text = json.dumps(asked.json)
    assert "/h" in text and "/day" in text and "/month" in text
    assert state(service, iid) == "running", "nothing happens before the yes"
    question = fake.message(asked.answer["id"])
    yes = next(i for i in custom_ids(question) if i.startswith("confirm|"))
    click = P.component(yes, message=question, user_id=ALICE)
    fake.dispatch(surface.client, click)
    await until(lambda: state(service, iid) == "destroyed")
    await until(lambda: "Answered" in json.dumps(fake.message(asked.answer["id"])))
    assert not custom_ids(fake.message(asked.answer["id"])), "the question's buttons are gone"


async def test_a_boot_above_the_price_limit_asks_with_dollars_per_hour_day_and_month(
        fake: FakeDiscord, surface: DiscordSurface, service: GpuService) -> None:
    payload = P.command("gpu", "boot", {"template": "budget", "overrides": "max_dph=0.01"})
    fake.dispatch(surface.client, payload)
    asked = await until(new_followup(fake, payload["token"], "per month", ephemeral=True))
    question = fake.message(asked.answer["id"])
    ids = custom_ids(question)
    assert any(i.startswith("confirm|") for i in ids) and any(i.startswith("cancel|") for i in ids)
    with service.db.session() as s:
        from sqlmodel import select
        assert not s.exec(select(Instance)).all(), "no machine before the yes"
    no = next(i for i in ids if i.startswith("cancel|"))
    fake.dispatch(surface.client, P.component(no, message=question, user_id=ALICE))
    await until(lambda: "Answered" in json.dumps(fake.message(asked.answer["id"])))


async def test_a_button_from_before_a_restart_still_works(fake: FakeDiscord, surface: DiscordSurface,
                                                          service: GpuService) -> None:
    iid, message = await boot(fake, surface)
    await surface.client.close()
    restarted = await _surface(service)          # a new process: a new client, nothing remembered
    try:
        press = P.component(f"stop|{iid}", message=message, user_id=ALICE)
        fake.dispatch(restarted.client, press)
        await until(new_followup(fake, press["token"], f"Stopped {iid}"))
        assert state(service, iid) == "stopped"
    finally:
        await restarted.client.close()


async def test_a_discord_role_mapped_in_config_raises_the_role_for_that_request(
        fake: FakeDiscord, surface: DiscordSurface) -> None:
    plain = P.command("gpu", "audit", {}, user_id=CAROL)
    fake.dispatch(surface.client, plain)
    await until(new_followup(fake, plain["token"], "admin role", ephemeral=True))
    mapped = P.command("gpu", "audit", {}, user_id=CAROL, roles=(ADMIN_ROLE,))
    fake.dispatch(surface.client, mapped)
    await until(final_original(fake, mapped["token"], "Audit"))


async def test_servers_not_configured_get_a_refusal(fake: FakeDiscord, surface: DiscordSurface) -> None:
    surface.settings = surface.settings.model_copy(update={"discord_guilds": [42]})
    payload = P.command("gpu", "status", {})
    fake.dispatch(surface.client, payload)
    answer = await until(callback_of(fake, payload))
    assert answer.type == 4 and answer.data is not None and answer.data["flags"] & EPHEMERAL
    assert "does not answer" in json.dumps(answer.data)
    suggest = P.autocomplete("gpu", "boot", {"template": "b"}, focused="template")
    fake.dispatch(surface.client, suggest)
    answer = await until(callback_of(fake, suggest))
    assert answer.type == 8 and answer.data == {"choices": []}


# --- autocomplete --------------------------------------------------------------------------------

async def _choices(fake: FakeDiscord, surface: DiscordSurface, sub: str, options: dict[str, Any], focused: str,
                   user: str = ALICE) -> list[dict[str, Any]]:
    payload = P.autocomplete("gpu", sub, options, focused=focused, user_id=user)
    fake.dispatch(surface.client, payload)
    answer = await until(callback_of(fake, payload))
    assert answer.type == 8 and answer.data is not None
    choices: list[dict[str, Any]] = answer.data["choices"]
    assert len(choices) <= 25 and all(len(c["name"]) <= 100 and len(c["value"]) <= 100 for c in choices)
    return choices


async def test_autocomplete_of_templates_gpus_periods_durations_and_commands(
        fake: FakeDiscord, surface: DiscordSurface) -> None:
    templates = await _choices(fake, surface, "boot", {"template": "bud"}, "template")
    assert [c["value"] for c in templates] == ["budget"]
    gpus = await _choices(fake, surface, "search", {"query": "reliability>0.9 h1"}, "query")
    assert gpus and all(c["value"].startswith("reliability>0.9 h1") for c in gpus)
    periods = await _choices(fake, surface, "costs", {"period": "mo"}, "period")
    assert [c["value"] for c in periods] == ["month"]
    durations = await _choices(fake, surface, "keep", {"instance": "g-1", "duration": "1"}, "duration")
    assert [c["value"] for c in durations] == ["1h", "12h", "1d"]
    commands = await _choices(fake, surface, "help", {"command": "st"}, "command")
    assert [c["value"] for c in commands] == ["start", "stop", "status"]


async def test_autocomplete_of_instances_shows_the_users_own_with_state_and_rate(
        fake: FakeDiscord, surface: DiscordSurface, service: GpuService) -> None:
    mine, _ = await boot(fake, surface, ALICE)
    await service.set_user(service.local_actor(), f"discord:{CAROL}", role="member", team="ml")
    theirs, _ = await boot(fake, surface, CAROL)
    choices = await _choices(fake, surface, "stop", {"instance": ""}, "instance")
    assert [c["value"] for c in choices] == [mine]
    assert "running" in choices[0]["name"] and "/h" in choices[0]["name"]
    assert theirs not in json.dumps(choices)


# --- pages ---------------------------------------------------------------------------------------

async def test_a_long_reply_is_paged_with_previous_and_next(fake: FakeDiscord, surface: DiscordSurface,
                                                           service: GpuService) -> None:
    payload = P.command("gpu", "search", {"query": "limit=100 provider=sandbox"})
    fake.dispatch(surface.client, payload)
    message = await until(final_original(fake, payload["token"], PAGE_PREFIX))
    nxt = next(i for i in custom_ids(message) if i == f"{PAGE_PREFIX}1")
    press = P.component(nxt, message=message, user_id=ALICE)
    fake.dispatch(surface.client, press)
    answer = await until(callback_of(fake, press))
    assert answer.type == 7, "the message itself turns to page 2"
    assert "2/" in json.dumps(answer.data)
    # a page button on a message this process never paged (from before a restart) says so
    stale = P.component(nxt, message={**message, "id": P.next_snowflake()}, user_id=ALICE)
    fake.dispatch(surface.client, stale)
    answer = await until(callback_of(fake, stale))
    assert answer.type == 4 and answer.data is not None and "restarted" in json.dumps(answer.data)


async def test_after_the_token_expires_the_result_is_posted_in_the_channel(
        fake: FakeDiscord, surface: DiscordSurface, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord_app, "TOKEN_S", 0.0)
    payload = P.command("gpu", "boot", {"template": "budget"})
    fake.dispatch(surface.client, payload)
    posted = await until(lambda: [m for m in fake.channel_messages(payload["channel_id"])
                                  if "Booted g-" in json.dumps(m)])
    assert posted[0]["components"], "with its buttons"


# --- notices -------------------------------------------------------------------------------------

def _deliverer(service: GpuService, clock: VirtualClock, notices: DiscordNotices) -> Deliverer:
    return Deliverer(service.db, clock, surface="discord", targets=None, send=notices.send, identity="test:discord",
                     backoff_base_s=1, backoff_cap_s=4)


async def _warned(service: GpuService, clock: VirtualClock, iid: str) -> None:
    import httpx

    from gpuherd.core.guards import Guards

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    guards = Guards(service, http=httpx.AsyncClient(transport=httpx.MockTransport(refuse)))
    try:
        for _ in range(52):                      # 26 minutes: warned 5 min before the 30 min stop
            clock.advance(30)
            await guards.run_pass()
    finally:
        await guards.aclose()


async def test_an_idle_warning_reaches_the_owners_dm_with_working_buttons(
        fake: FakeDiscord, surface: DiscordSurface, service: GpuService, clock: VirtualClock) -> None:
    iid, _ = await boot(fake, surface)
    deliver = _deliverer(service, clock, DiscordNotices(surface))
    await deliver.deliver_once()
    await _warned(service, clock, iid)
    assert await deliver.deliver_once() >= 1
    [dm] = [m for m in fake.dm_messages(ALICE) if "idle" in json.dumps(m)]
    assert custom_ids(dm) == [f"keep|{iid}|1h", f"stop|{iid}"]
    team = [m for m in fake.channel_messages(TEAM_CHANNEL) if "idle" in json.dumps(m)]
    assert team and f"<@{ALICE}>" in (team[0].get("content") or ""), "the owner is pinged in the team's channel"
    press = P.component(f"stop|{iid}", message=dm, user_id=ALICE, guild_id=None)
    fake.dispatch(surface.client, press)
    await until(lambda: state(service, iid) == "stopped")


async def test_closed_dms_fall_back_to_the_team_channel_and_429_waits(
        fake: FakeDiscord, surface: DiscordSurface, service: GpuService, clock: VirtualClock) -> None:
    iid, _ = await boot(fake, surface)
    fake.close_dms(ALICE)
    deliver = _deliverer(service, clock, DiscordNotices(surface))
    await deliver.deliver_once()
    await _warned(service, clock, iid)
    fake.fail("POST", rf"^/channels/{TEAM_CHANNEL}/messages$", 429, retry_after=60)
    await deliver.deliver_once()             # the team post is rate limited: not delivered yet
    assert not [m for m in fake.channel_messages(TEAM_CHANNEL) if "idle" in json.dumps(m)]
    clock.advance(120)
    await deliver.deliver_once()
    team = [m for m in fake.channel_messages(TEAM_CHANNEL) if "idle" in json.dumps(m)]
    assert len(team) == 1 and f"<@{ALICE}>" in (team[0].get("content") or "")
    assert not [m for m in fake.dm_messages(ALICE) if "idle" in json.dumps(m)]
    with service.db.session() as s:
        from sqlalchemy import text
        pending = s.execute(text("SELECT count(*) FROM notice_deliveries WHERE surface = 'discord' "
                                 "AND delivered_at IS NULL AND gave_up_at IS NULL")).scalar()
    assert pending == 0, "the closed DM's delivery is done (the team's channel carries it), not retried"


# --- every command -------------------------------------------------------------------------------

def _every_command(iid: str, stopped: str) -> list[tuple[str, dict[str, Any], str]]:
    """(subcommand, options, what its answer says): one typical use of each registry command."""
    return [
        ("help", {}, "gpuherd commands"),
        ("search", {"query": "24gb <$2"}, "offer"),
        ("templates", {}, "budget"),
        ("templates", {"name": "budget"}, "budget"),
        ("status", {}, iid),
        ("status", {"instance": iid}, iid),
        ("status", {"guards": True}, "uard"),
        ("guards", {}, "uard"),
        ("keep", {"instance": iid, "duration": "2h"}, iid),
        ("costs", {}, "month"),
        ("costs", {"period": "week", "by": "template"}, "week"),
        ("costs", {"period": iid}, iid),
        ("start", {"instance": stopped}, stopped),
        ("stop", {"instance": stopped}, stopped),
        ("confirm", {"token": "c_not-a-token"}, "question"),
        ("cancel", {"token": "c_not-a-token"}, "question"),
        ("destroy", {"instance": iid}, f"Destroy {iid}"),
        ("audit", {"count": 5}, "Audit"),
        ("budget", {}, "udget"),
        ("budget", {"action": "set", "amount": 250.0, "team": "ml"}, "250"),
        ("attach", {"machine": "sandbox:sb-404"}, "sb-404"),
        ("reconcile", {}, "econcil"),
        ("providers", {}, "rovider"),
        ("boot", {"template": "budget", "provider": "sandbox"}, "Booted g-"),
    ]


async def test_every_command_runs_through_discord(fake: FakeDiscord, surface: DiscordSurface,
                                                  service: GpuService) -> None:
    from gpuherd.bot.grammar import REGISTRY

    await service.set_user(service.local_actor(), f"discord:{ALICE}", role="admin", team="ml")
    iid, _ = await boot(fake, surface)
    stopped, _ = await boot(fake, surface)
    await service.stop(await service.resolve_actor(f"discord:{ALICE}", source="discord"), stopped)
    plan = _every_command(iid, stopped)
    assert {sub for sub, _, _ in plan} == {c.name for c in REGISTRY.all()}, "one use of every command"
    for sub, options, needle in plan:
        payload = P.command("gpu", sub, options, user_id=ALICE)
        fake.dispatch(surface.client, payload)
        token = payload["token"]

        def answered(token: str = token, needle: str = needle) -> bool:
            bodies = [c.json for c in fake.calls if token in c.path and 200 <= c.status < 300 and c.method != "DELETE"]
            return any(needle in json.dumps(b) for b in bodies) and not any(
                "Internal error" in json.dumps(b) for b in bodies)
        try:
            await until(answered)
        except AssertionError:
            seen = [json.dumps(c.json)[:300] for c in fake.calls if token in c.path]
            raise AssertionError(f"/gpu {sub} {options}: {needle!r} not answered; saw {seen}") from None
        assert (await until(callback_of(fake, payload))).type in (4, 5)


async def test_a_discord_outage_delays_a_notice_and_it_arrives_once(
        fake: FakeDiscord, surface: DiscordSurface, service: GpuService, clock: VirtualClock) -> None:
    iid, _ = await boot(fake, surface)
    deliver = _deliverer(service, clock, DiscordNotices(surface))
    await deliver.deliver_once()
    await _warned(service, clock, iid)
    dm = fake.dm_channel_id(ALICE)
    fake.fail("POST", rf"^/channels/{dm}/messages$", 503, times=1)
    await deliver.deliver_once()
    assert not [m for m in fake.dm_messages(ALICE) if "idle" in json.dumps(m)], "Discord answered 503"
    with service.db.session() as s:
        from sqlalchemy import text
        errors = s.execute(text("SELECT last_error FROM notice_deliveries WHERE surface = 'discord' "
                                "AND target = :t AND delivered_at IS NULL"), {"t": f"user:discord:{ALICE}"}).scalars().all()
    assert any("503" in (e or "") for e in errors), "the outbox keeps the reason and retries"
    clock.advance(10)
    await deliver.deliver_once()
    assert len([m for m in fake.dm_messages(ALICE) if "idle" in json.dumps(m)]) == 1
