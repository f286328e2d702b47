"""The Slack surface without a server, on a virtual clock. Notices through core's outbox: the
idle warning reaches the owner's DM with working Keep and Stop buttons and the team's channel
with the owner's mention; a Slack outage (500, then 429 with Retry-After) delays the warning,
which then arrives exactly once. Long replies: more pages than a response_url takes go with the
bot token, and what cannot be posted is said."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from slack_bolt.request.async_request import AsyncBoltRequest

from gpuherd.bot.slack.app import SlackSurface
from gpuherd.bot.slack.deliver import SlackNotices
from gpuherd.core.clock import VirtualClock
from gpuherd.core.config import Settings
from gpuherd.core.guards import Guards
from gpuherd.core.models import Instance
from gpuherd.core.outbox import Deliverer
from gpuherd.core.results import BootResult
from gpuherd.core.service import GpuService
from tests.fakes.slack_fake import FakeSlack, block_actions_payload

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def fake() -> Iterator[FakeSlack]:
    f = FakeSlack().start()
    yield f
    f.stop()


@pytest.fixture
def settings(tmp_path: Path, db_url: str, fake: FakeSlack) -> Settings:
    """conftest's settings, with Slack configured (so the outbox writes Slack deliveries)."""
    return Settings(home=tmp_path / "home", database_url=db_url, local_user="alice", local_role="admin",
                    poll_interval_s=0.01, boot_timeout_s=30, slack_bot_token=fake.bot_token,
                    slack_app_token=fake.app_token, slack_api_url=fake.api_url, slack_channels={"ml": "CML"})


def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.fixture
async def guards(service: GpuService) -> Any:
    g = Guards(service, http=httpx.AsyncClient(transport=httpx.MockTransport(_refuse)))
    yield g
    await g.aclose()


async def _until(guards: Guards, clock: VirtualClock, minutes: float) -> None:
    end = clock.now() + timedelta(minutes=minutes)
    while clock.now() < end:
        clock.advance(30)
        await guards.run_pass()


def _state(service: GpuService, iid: str) -> str:
    with service.db.session() as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        return inst.state


async def _owned_machine(service: GpuService) -> str:
    root = service.local_actor()
    await service.set_user(root, "slack:U1", role="member", team="ml")
    actor = await service.resolve_actor("slack:U1", source="slack")
    r = await service.boot(actor, "budget", wait=True)
    assert isinstance(r, BootResult)
    return r.instance.id


def _deliverer(service: GpuService, clock: VirtualClock, notices: SlackNotices) -> Deliverer:
    return Deliverer(service.db, clock, surface="slack", targets=None, send=notices.send, identity="test:slack",
                     backoff_base_s=1, backoff_cap_s=4)


def _posted_ok(fake: FakeSlack, channel: str, needle: str) -> list[dict[str, Any]]:
    return [c.params for c in fake.calls_to("chat.postMessage")
            if c.status == 200 and c.params.get("channel") == channel and needle in json.dumps(c.params)]


async def test_idle_warning_reaches_the_owners_dm_and_keep_postpones_the_stop(service: GpuService, clock: VirtualClock,
                                                                              guards: Guards, fake: FakeSlack) -> None:
    iid = await _owned_machine(service)
    surface = SlackSurface(service)
    deliver = _deliverer(service, clock, SlackNotices(surface))
    assert await deliver.deliver_once() == 2, "the team's channel hears the boot: booted, then ready"
    await _until(guards, clock, 26)                                      # warned 5 min before the 30 min stop
    assert await deliver.deliver_once() == 2
    [dm] = _posted_ok(fake, "DU1", "idle for")
    buttons = [e for b in dm["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert [b["text"]["text"] for b in buttons] == ["Keep 1 h", "Stop now"]
    assert [b["value"] for b in buttons] == [f"keep|{iid}|1h", f"stop|{iid}"]
    [team] = _posted_ok(fake, "CML", "idle for")
    assert "<@U1>" in json.dumps(team["blocks"]), "the owner is mentioned in the team's channel"

    keep = buttons[0]
    url = fake.response_url("keep")
    body = block_actions_payload(keep["value"], keep["action_id"], channel_id="DU1", response_url=url)
    response = await surface.app.async_dispatch(AsyncBoltRequest(body=body, mode="socket_mode"))
    assert response.status == 200
    [answer] = [c.params for c in await fake.wait_for("response_url:keep", 1)]
    assert "Keeping" in json.dumps(answer)
    await _until(guards, clock, 40)                                      # past the old deadline
    assert _state(service, iid) == "running", "Keep 1 h postponed the idle stop"
    await _until(guards, clock, 60)
    assert _state(service, iid) == "stopped", "and the guard stops it once the hour is over"
    await surface.aclose()


async def test_an_outage_then_a_rate_limit_delay_the_warning_and_it_arrives_once(
        service: GpuService, clock: VirtualClock, guards: Guards, fake: FakeSlack) -> None:
    await _owned_machine(service)
    surface = SlackSurface(service)
    deliver = _deliverer(service, clock, SlackNotices(surface))
    assert await deliver.deliver_once() == 2
    await _until(guards, clock, 26)
    fake.fail("chat.postMessage", status=500, times=2)                  # the DM and the channel both fail
    assert await deliver.deliver_once() == 0
    assert _posted_ok(fake, "DU1", "idle for") == [] and _posted_ok(fake, "CML", "idle for") == []
    clock.advance(5)
    fake.fail("chat.postMessage", status=429, retry_after=30)
    assert await deliver.deliver_once() == 0, "the first send meets the 429; the second is not sent into it"
    assert deliver.paused_until > 0, "a 429 pauses the deliverer"
    assert len([c for c in fake.calls_to("chat.postMessage") if c.status == 429]) == 1
    clock.advance(10)
    assert await deliver.deliver_once() == 1, "the released one goes; the limited one waits its 30 s"
    clock.advance(25)
    assert await deliver.deliver_once() == 1
    clock.advance(60)
    assert await deliver.deliver_once() == 0
    assert len(_posted_ok(fake, "DU1", "idle for")) == 1 and len(_posted_ok(fake, "CML", "idle for")) == 1
    await surface.aclose()


def _long_reply(rows: int) -> Any:
    from gpuherd.bot.replies import Reply, Table

    return Reply(title="Many machines", tables=[Table(columns=["id", "gpu", "$/h"],
                                                      rows=[[f"g-{i:04x}", "RTX 4090 x1", "$0.40/h"] for i in range(rows)])])


async def test_pages_past_what_a_response_url_takes_are_posted_with_the_bot_token(service: GpuService,
                                                                                  fake: FakeSlack) -> None:
    from slack_bolt.context.respond.async_respond import AsyncRespond

    from gpuherd.bot.slack.blocks import render

    surface = SlackSurface(service)
    reply = _long_reply(2500)
    pages = render(reply)
    assert len(pages) > 5, "the case needs more pages than a response_url takes"
    respond = AsyncRespond(response_url=fake.response_url("long"))
    await surface.post_reply(respond, reply, channel="C1", user_id="U1")
    via_url = fake.calls_to("response_url:long")
    via_bot = [c for c in fake.calls_to("chat.postMessage") if c.params.get("channel") == "C1"]
    assert len(via_url) == 4 and len(via_bot) == len(pages) - 4
    shown = json.dumps([c.params["blocks"] for c in via_url + via_bot])
    assert all(f"g-{i:04x}" in shown for i in range(2500)), "no row is lost"

    fake.fail("chat.postMessage", error="not_in_channel", times=10)
    await surface.post_reply(AsyncRespond(response_url=fake.response_url("cut")), reply, channel="C1", user_id="U1")
    cut = fake.calls_to("response_url:cut")
    assert len(cut) == 5 and f"{len(pages) - 4} more pages" in json.dumps(cut[-1].params), "a cut is said"
    await surface.aclose()


def test_gpuherd_slack_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from gpuherd.bot.cli import main

    monkeypatch.setenv("GPUHERD_HOME", str(tmp_path / "h"))
    for name in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert main(["slack"]) == 2
    assert "SLACK_BOT_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "s")
    assert main(["slack"]) == 2
    err = capsys.readouterr().err
    assert "SLACK_APP_TOKEN" in err and "Traceback" not in err and "xoxb-1" not in err
    monkeypatch.setenv("SLACK_APP_TOKEN", "xoxb-wrong-kind")
    assert main(["slack"]) == 2
    assert "xapp-" in capsys.readouterr().err


async def test_each_destination_finds_its_slack_channel_or_says_why_not(service: GpuService, fake: FakeSlack) -> None:
    from gpuherd.bot.slack.deliver import Undeliverable
    from gpuherd.core.outbox import ADMINS

    surface = SlackSurface(service)
    notices = SlackNotices(surface)
    assert await notices.channel_for("user:slack:U1") == "DU1"
    assert await notices.channel_for("user:slack:U1") == "DU1"
    assert len(fake.calls_to("conversations.open")) == 1, "a DM channel is opened once per process"
    assert await notices.channel_for("team:ml") == "CML"
    for target in ("team:vision", ADMINS, "user:local:bob"):
        with pytest.raises(Undeliverable):
            await notices.channel_for(target)
    surface.settings = surface.settings.model_copy(update={"slack_admin_channel": "CADM"})
    assert await notices.channel_for(ADMINS) == "CADM"
    await surface.aclose()
