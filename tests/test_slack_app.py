"""Slack end to end: signed requests in Slack's exact format over real HTTP to `gpuherd serve`'s
`/slack/events` (the real bolt AsyncApp inside the real server), Socket Mode through the loopback
Socket Mode server, and the Web API and response_urls answered by the loopback fake
(`tests/fakes/slack_fake.py`), which records every call."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select
from sqlmodel import col

from gpuherd.bot.http.server import make_app
from gpuherd.bot.slack.run import SlackRunner
from gpuherd.core.config import Settings
from gpuherd.core.models import AuditEvent, Instance
from gpuherd.core.money import rate
from gpuherd.core.results import BootResult
from gpuherd.core.service import GpuService
from tests.fakes.slack_fake import (
    FakeSlack,
    app_home_opened_event,
    block_actions_payload,
    form_body,
    interactive_form,
    sign,
    slash_command_form,
)
from tests.live_server import free_port

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@dataclass
class SlackServer:
    url: str
    fake: FakeSlack
    service: GpuService
    server: uvicorn.Server
    thread: threading.Thread
    _n: int = 0

    def hook(self, prefix: str = "r") -> tuple[str, str]:
        self._n += 1
        name = f"{prefix}{self._n}"
        return name, self.fake.response_url(name)

    async def post(self, fields: dict[str, str], *, headers: dict[str, str] | None = None,
                   secret: str = SECRET, timestamp: int | None = None) -> httpx.Response:
        body = form_body(fields)
        signed = sign(secret, body, timestamp)
        async with httpx.AsyncClient(timeout=10) as c:
            return await c.post(self.url + "/slack/events", content=body, headers={
                **signed, "Content-Type": "application/x-www-form-urlencoded", **(headers or {})})

    async def command(self, text: str, *, user: str = "U1", **kw: Any) -> tuple[httpx.Response, str, float]:
        """A slash command; returns the response, the response_url's name and the ack time."""
        name, url = self.hook()
        began = time.monotonic()
        r = await self.post(slash_command_form(text, user_id=user, response_url=url, **kw))
        return r, name, time.monotonic() - began

    async def press(self, value: str, action_id: str, *, user: str = "U1", message_ts: str = "1700000000.000100",
                    container_type: str = "message", **kw: Any) -> tuple[httpx.Response, str]:
        name, url = self.hook("p")
        kw.setdefault("response_url", url)
        payload = block_actions_payload(value, action_id, user_id=user, message_ts=message_ts,
                                        container_type=container_type, **kw)
        return await self.post(interactive_form(payload)), name

    async def replies(self, name: str, n: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
        return [c.params for c in await self.fake.wait_for(f"response_url:{name}", n, timeout=timeout)]

    def count(self, model: Any, *where: Any) -> int:
        with self.service.db.session() as s:
            return int(s.execute(select(func.count()).select_from(model).where(*where)).scalar_one())


def _settings(tmp_path: Path, db_url: str, fake: FakeSlack, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "home": tmp_path / "home", "database_url": db_url, "local_user": "root", "local_role": "admin",
        "sandbox_time_scale": 0.0, "poll_interval_s": 0.05, "boot_timeout_s": 30,
        "slack_bot_token": fake.bot_token, "slack_signing_secret": SECRET, "slack_api_url": fake.api_url,
        "slack_channels": {"ml": "CML"}, "slack_admins": ["U0ADMIN"]}
    base.update(kw)
    return Settings(**base)


def _start(service: GpuService, fake: FakeSlack) -> SlackServer:
    runner = SlackRunner(service)
    app = make_app(service, hosted=[runner])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return SlackServer(f"http://127.0.0.1:{port}", fake, service, server, thread)


def _stop(s: SlackServer) -> None:
    s.server.should_exit = True
    s.thread.join(timeout=20)
    assert not s.thread.is_alive(), "the server did not shut down"


@pytest.fixture
def fake() -> Iterator[FakeSlack]:
    f = FakeSlack().start()
    f.users.update({"U2": {"name": "bob", "real_name": "Bob B", "display_name": "bobby"},
                    "U3": {"name": "vic", "real_name": "Vic Viewer", "display_name": "vic"}})
    yield f
    f.stop()


@pytest.fixture
def slack(tmp_path: Path, db_url: str, fake: FakeSlack) -> Iterator[SlackServer]:
    service = GpuService.from_settings(_settings(tmp_path, db_url, fake))

    async def users() -> None:
        root = service.local_actor("cli")
        await service.set_user(root, "slack:U1", role="member", team="ml")
        await service.set_user(root, "slack:U2", role="member", team="ml")
        await service.set_user(root, "slack:U3", role="viewer", team="ml")
    asyncio.run(users())
    s = _start(service, fake)
    yield s
    _stop(s)


def _buttons(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for b in blocks if b.get("type") == "actions" for e in b.get("elements", [])]


def _text(blocks: list[dict[str, Any]]) -> str:
    return json.dumps(blocks)


async def _boot_as(s: SlackServer, user: str, template: str = "budget") -> str:
    actor = await s.service.resolve_actor(f"slack:{user}", source="slack")
    r = await s.service.boot(actor, template, wait=True)
    assert isinstance(r, BootResult)
    return r.instance.id


# --- commands ---------------------------------------------------------------------------------

async def test_a_command_is_acked_at_once_and_its_result_follows(slack: SlackServer) -> None:
    slack.service.providers.get("sandbox").latency_s = 2.0        # every provider call takes 2 s
    r, name, acked = await slack.command("search 24gb")
    assert r.status_code == 200 and acked < 1.0, f"ack took {acked:.2f} s"
    assert r.text == "", "an empty ack: the result follows"
    [reply] = await slack.replies(name, timeout=20)
    assert reply["response_type"] == "in_channel"
    assert "offer" in _text(reply["blocks"]) and reply["text"]
    boot_buttons = [b for b in _buttons(reply["blocks"]) if b["value"].startswith("boot|")]
    assert boot_buttons and all("/gpu" not in b["value"] for b in boot_buttons), "buttons carry refs, not lines"


async def test_tables_show_display_names_and_text_shows_mentions(slack: SlackServer) -> None:
    await _boot_as(slack, "U2")
    _, name, _ = await slack.command("status")
    [reply] = await slack.replies(name)
    tables = [b["text"]["text"] for b in reply["blocks"] if b.get("type") == "section"
              and b.get("text", {}).get("text", "").startswith("```")]
    assert tables and "bobby" in tables[0] and "slack:U2" not in tables[0], "users.info's display name in the table"
    assert slack.fake.calls_to("users.info"), "names come from Slack"


async def test_help_and_errors_are_ephemeral(slack: SlackServer) -> None:
    _, name, _ = await slack.command("frobnicate")
    [err] = await slack.replies(name)
    assert err["response_type"] == "ephemeral" and "Unknown command" in _text(err["blocks"])
    _, name, _ = await slack.command("help")
    [hlp] = await slack.replies(name)
    assert hlp["response_type"] == "ephemeral" and "/gpu boot" in _text(hlp["blocks"])


async def test_a_boot_posts_one_message_and_edits_it_to_the_endpoint(slack: SlackServer) -> None:
    slack.service.providers.get("sandbox").time_scale = 0.02       # a few seconds of simulated boot
    _, name, _ = await slack.command("boot budget", channel_id="CML")
    updates = await slack.fake.wait_for("chat.update", 1, timeout=20,
                                        where=lambda c: "endpoint" in json.dumps(c.params.get("blocks")))
    ts = updates[-1].params["ts"]
    posts = slack.fake.calls_to("chat.postMessage")
    live = [c for c in posts if "Booting" in json.dumps(c.params)]
    assert len(live) == 1 and live[0].params["channel"] == "CML", [c.params.get("text") for c in posts]
    notices = [c for c in posts if c not in live]          # core tells the team's channel: booted, then ready
    assert [c.params["channel"] for c in notices] == ["CML"] * len(notices) and len(notices) <= 2
    assert all(c.params["ts"] == ts for c in slack.fake.calls_to("chat.update")), "one message, edited in place"
    final = slack.fake.message("CML", ts)
    assert final is not None
    values = [b["value"] for b in _buttons(final["blocks"])]
    assert any(v.startswith("stop|g-") for v in values) and "healthy" in json.dumps(final["blocks"])
    assert slack.fake.calls_to(f"response_url:{name}") == [], "the live message replaces a response_url reply"
    assert slack.count(Instance) == 1


async def test_a_redelivered_command_runs_once(slack: SlackServer) -> None:
    _, url = slack.hook()
    fields = slash_command_form("boot budget", response_url=url, trigger_id="13345224609.738474920.8088930838d88f")
    first = await slack.post(fields)
    again = await slack.post(fields, headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    assert first.status_code == again.status_code == 200
    await slack.fake.wait_for("chat.update", 1, timeout=20, where=lambda c: "endpoint" in json.dumps(c.params))
    await asyncio.sleep(0.5)
    live = [c for c in slack.fake.calls_to("chat.postMessage") if c.params["channel"] == "C1"]
    assert slack.count(Instance) == 1 and len(live) == 1, "one boot, one live message"


async def test_bad_old_and_garbled_requests_are_refused_and_run_nothing(slack: SlackServer) -> None:
    name, url = slack.hook()
    fields = slash_command_form("boot budget", response_url=url)
    bad = await slack.post(fields, secret="not-the-secret")
    old = await slack.post(fields, timestamp=int(time.time()) - 6 * 60)
    assert bad.status_code == 401 and old.status_code == 401
    garbled = await slack.post({"payload": "{not json"})
    assert garbled.status_code in (400, 401, 404)
    async with httpx.AsyncClient() as c:
        unsigned = await c.post(slack.url + "/slack/events", content=form_body(fields),
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert unsigned.status_code == 401
    await asyncio.sleep(0.5)
    assert slack.count(Instance) == 0 and slack.fake.calls_to(f"response_url:{name}") == []


# --- buttons ----------------------------------------------------------------------------------

async def test_a_double_click_and_two_people_stop_once(slack: SlackServer) -> None:
    iid = await _boot_as(slack, "U1")
    presses = await asyncio.gather(*(slack.press(f"stop|{iid}", "gpuherd:stop:1", user=u) for u in ("U1", "U1", "U0ADMIN")))
    assert all(r.status_code == 200 for r, _ in presses)
    answers = [await slack.replies(name) for _, name in presses]
    with slack.service.db.session() as s:
        assert s.get(Instance, iid).state == "stopped"
    assert slack.count(AuditEvent, col(AuditEvent.event) == "stop", col(AuditEvent.instance_id) == iid) == 1
    assert all(a[0]["text"] for a in answers)


async def test_two_people_pressing_one_boot_button_boot_once(slack: SlackServer) -> None:
    presses = await asyncio.gather(*(slack.press("boot||budget", "gpuherd:boot:0", user=u, message_ts="1700000000.000500")
                                     for u in ("U1", "U2", "U1")))
    names = {f"response_url:{name}" for _, name in presses}

    def refusals() -> list[Any]:
        return [c for c in slack.fake.calls if c.method in names
                and "Someone else already made this request" in json.dumps(c.params)]
    deadline = time.monotonic() + 20
    while not refusals() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert refusals() and all(r.params["response_type"] == "ephemeral" for r in refusals()), \
        "whoever came second is told so, alone"
    await slack.fake.wait_for("chat.update", 1, timeout=20, where=lambda c: "endpoint" in json.dumps(c.params))
    await asyncio.sleep(0.5)
    assert slack.count(Instance) == 1, "one button on one message: one machine, however many presses"


async def test_a_viewer_press_is_refused_ephemerally_and_changes_nothing(slack: SlackServer) -> None:
    iid = await _boot_as(slack, "U1")
    _, name = await slack.press(f"stop|{iid}", "gpuherd:stop:1", user="U3")
    [reply] = await slack.replies(name)
    assert reply["response_type"] == "ephemeral" and "viewer" in _text(reply["blocks"])
    with slack.service.db.session() as s:
        assert s.get(Instance, iid).state == "running"


async def test_destroy_after_slacks_own_dialog_is_not_asked_again(slack: SlackServer) -> None:
    iid = await _boot_as(slack, "U1")
    _, name = await slack.press(f"destroy|{iid}", "gpuherd:destroy:2:c")
    [reply] = await slack.replies(name)
    assert "Destroyed" in _text(reply["blocks"])
    with slack.service.db.session() as s:
        assert s.get(Instance, iid).state == "destroyed"


async def test_a_price_question_is_ephemeral_with_the_costs_and_a_yes_boots_once(slack: SlackServer) -> None:
    _, name, _ = await slack.command("boot budget max_dph=0.01")
    [question] = await slack.replies(name)
    blob = _text(question["blocks"])
    assert question["response_type"] == "ephemeral"
    yes = [b for b in _buttons(question["blocks"]) if b["value"].startswith("confirm|")]
    assert yes, blob
    dialog = yes[0]["confirm"]["text"]["text"]
    assert "/h" in dialog and "a day" in dialog and "a month" in dialog
    assert "/gpu" not in yes[0]["value"] and "env." not in yes[0]["value"]
    clicks = await asyncio.gather(*(slack.press(yes[0]["value"], yes[0]["action_id"], container_type="ephemeral",
                                                message_ts="1700000000.000900") for _ in range(2)))
    await slack.fake.wait_for("chat.update", 1, timeout=20, where=lambda c: "endpoint" in json.dumps(c.params))
    await asyncio.sleep(0.5)
    assert slack.count(Instance) == 1, "the same yes twice boots once"
    assert all(r.status_code == 200 for r, _ in clicks)


async def test_a_button_from_before_a_restart_still_works(slack: SlackServer, tmp_path: Path, db_url: str,
                                                          fake: FakeSlack) -> None:
    iid = await _boot_as(slack, "U1")
    _stop(slack)
    again = _start(GpuService.from_settings(_settings(tmp_path, db_url, fake)), fake)
    try:
        _, name = await again.press(f"stop|{iid}", "gpuherd:stop:1")
        [reply] = await again.replies(name)
        assert "Stopped" in _text(reply["blocks"])
    finally:
        _stop(again)
        slack.server.should_exit = True


# --- the App Home -----------------------------------------------------------------------------

async def test_the_app_home_shows_the_viewers_machines_and_costs(slack: SlackServer) -> None:
    iid = await _boot_as(slack, "U1")
    theirs = await _boot_as(slack, "U2")
    body = json.dumps(app_home_opened_event("U1")).encode()
    async with httpx.AsyncClient() as c:
        r = await c.post(slack.url + "/slack/events", content=body,
                         headers={**sign(SECRET, body), "Content-Type": "application/json"})
    assert r.status_code == 200
    await slack.fake.wait_for("views.publish", 1)
    home = slack.fake.home("U1")
    assert home is not None and home["type"] == "home"
    blob = json.dumps(home["blocks"])
    assert iid in blob and "Costs" in blob and f"stop|{iid}" in blob
    mine = await slack.service.view(await slack.service.resolve_actor("slack:U1", source="slack"), iid)
    assert not [b for b in _buttons(home["blocks"]) if theirs in b["value"]], "buttons for the viewer's own only"
    assert home["blocks"][0]["text"]["text"] == f"Your machines · 1 · spending {rate(mine.current_dph)}", \
        "with their own run-rate, not the fleet's"
    # a press on the Home answers in a DM and refreshes the Home
    _, _ = await slack.press(f"stop|{iid}", "gpuherd:stop:1", container_type="view", response_url=None)
    dm = await slack.fake.wait_for("chat.postMessage", 1, where=lambda c: c.params.get("channel") == "DU1")
    assert "Stopped" in json.dumps(dm[-1].params)
    await slack.fake.wait_for("views.publish", 2)
    assert "stopped" in json.dumps(slack.fake.home("U1"))


# --- Socket Mode --------------------------------------------------------------------------------

async def test_socket_mode_acks_through_the_socket_and_posts_the_result(tmp_path: Path, db_url: str,
                                                                        fake: FakeSlack) -> None:
    service = GpuService.from_settings(_settings(tmp_path, db_url, fake, slack_signing_secret=None,
                                                 slack_app_token=fake.app_token))
    runner = SlackRunner(service)
    from gpuherd.core.runtime import Runtime

    runtime = Runtime(service, guards=False)
    runner.prepare(runtime)
    service.providers.get("sandbox").latency_s = 2.0
    async with runtime, runner.around(runtime):
        await fake.wait_connected()
        url = fake.response_url("sock")
        began = time.monotonic()
        eid = await fake.send("slash_commands", slash_command_form("search 24gb", response_url=url))
        await fake.ack(eid)
        assert fake.acked_at(eid) is not None and fake.acked_at(eid) - began < 1.0   # type: ignore[operator]
        [reply] = [c.params for c in await fake.wait_for("response_url:sock", 1, timeout=20)]
        assert reply["response_type"] == "in_channel" and "offer" in json.dumps(reply["blocks"])
