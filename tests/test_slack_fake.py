"""The Slack fake (tests/fakes/slack_fake.py) behaves as its docstring says, checked with the real
slack_sdk clients (AsyncWebClient, AsyncWebhookClient, SignatureVerifier and the aiohttp Socket
Mode client), so the app's tests can trust what it records and answers."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from tests.fakes.slack_fake import (
    FakeSlack,
    app_home_opened_event,
    block_actions_payload,
    form_body,
    interactive_form,
    sign,
    slash_command_form,
)


@pytest.fixture
def fake() -> Iterator[FakeSlack]:
    with FakeSlack() as slack:
        yield slack


def bot(fake: FakeSlack, token: str | None = None) -> AsyncWebClient:
    return AsyncWebClient(token=token or fake.bot_token, base_url=fake.api_url)


# --- Web API ---------------------------------------------------------------------------------
async def test_post_then_update_keeps_the_latest_version(fake: FakeSlack) -> None:
    client = bot(fake)
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*booting*"}}]
    posted = await client.chat_postMessage(channel="C1", text="booting", blocks=blocks)
    assert posted["ok"] and posted["channel"] == "C1"
    assert posted["ts"] == "1700000000.000100"             # the ts block_actions_payload assumes
    assert posted["message"]["blocks"] == blocks and posted["message"]["text"] == "booting"
    second = await client.chat_postMessage(channel="C1", text="another")
    assert float(second["ts"]) > float(posted["ts"])

    updated = await client.chat_update(channel="C1", ts=posted["ts"], text="running",
                                       blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": "*running*"}}])
    assert (updated["channel"], updated["ts"], updated["text"]) == ("C1", posted["ts"], "running")
    stored = fake.message("C1", posted["ts"])
    assert stored is not None and stored["text"] == "running"
    assert stored["blocks"][0]["text"]["text"] == "*running*"
    assert fake.message("C1", "1.2") is None

    [call] = fake.calls_to("chat.update")
    assert call.headers["Authorization"] == f"Bearer {fake.bot_token}"
    assert [c.method for c in fake.calls] == ["chat.postMessage", "chat.postMessage", "chat.update"]
    assert fake.calls[0].at <= fake.calls[1].at <= fake.calls[2].at


async def test_update_of_an_unknown_message_and_post_checks(fake: FakeSlack) -> None:
    client = bot(fake)
    with pytest.raises(SlackApiError) as missing:
        await client.chat_update(channel="C1", ts="1700000099.000100", text="x")
    assert missing.value.response["error"] == "message_not_found"
    with pytest.raises(SlackApiError) as empty, pytest.warns(UserWarning, match="text"):
        await client.chat_postMessage(channel="C1")
    assert empty.value.response["error"] == "no_text"
    with pytest.raises(SlackApiError) as bad:
        await client.chat_postMessage(channel="C1", text="x", blocks=[{"type": "section"}] * 51)
    assert bad.value.response["error"] == "invalid_blocks"
    dm = await client.chat_postMessage(channel="U1", text="hello")
    assert dm["channel"] == "DU1" and fake.message("DU1", dm["ts"]) is not None


async def test_tokens_are_checked(fake: FakeSlack) -> None:
    with pytest.raises(SlackApiError) as wrong:
        await bot(fake, "xoxb-wrong").chat_postMessage(channel="C1", text="x")
    assert wrong.value.response.status_code == 200
    assert wrong.value.response["error"] == "invalid_auth"
    with pytest.raises(SlackApiError) as app_token_on_bot_method:
        await bot(fake, fake.app_token).auth_test()
    assert app_token_on_bot_method.value.response["error"] == "not_allowed_token_type"
    with pytest.raises(SlackApiError) as bot_token_on_socket:
        await bot(fake).apps_connections_open(app_token=fake.bot_token)
    assert bot_token_on_socket.value.response["error"] == "not_allowed_token_type"
    opened = await bot(fake).apps_connections_open(app_token=fake.app_token)
    assert opened["url"] == fake.socket_url and opened["url"].startswith("ws://127.0.0.1:")
    assert fake.message("C1", "1700000000.000100") is None   # the refused post stored nothing


async def test_auth_test_answers_the_bot_identity(fake: FakeSlack) -> None:
    me = await bot(fake).auth_test()
    assert (me["user"], me["user_id"], me["bot_id"], me["team_id"]) == ("gpuherd", "UB0T", "B0BOT", "T0TEAM")
    assert me["url"].startswith("https://") and me["team"]


async def test_rate_limit_then_success(fake: FakeSlack) -> None:
    client = bot(fake)
    fake.fail("chat.postMessage", status=429, retry_after=1)
    with pytest.raises(SlackApiError) as limited:
        await client.chat_postMessage(channel="C1", text="x")
    assert limited.value.response.status_code == 429
    assert limited.value.response.headers["Retry-After"] == "1"
    assert limited.value.response["error"] == "ratelimited"
    again = await client.chat_postMessage(channel="C1", text="x")
    assert again["ok"]
    assert [c.status for c in fake.calls_to("chat.postMessage")] == [429, 200]


async def test_error_answers_and_server_errors(fake: FakeSlack) -> None:
    client = bot(fake)
    fake.fail("chat.postMessage", error="channel_not_found")
    with pytest.raises(SlackApiError) as gone:
        await client.chat_postMessage(channel="C1", text="x")
    assert gone.value.response.status_code == 200 and gone.value.response["error"] == "channel_not_found"

    fake.fail("chat.update", status=500, times=2)
    posted = await client.chat_postMessage(channel="C1", text="x")
    for _ in range(2):
        with pytest.raises(SlackApiError) as broken:
            await client.chat_update(channel="C1", ts=posted["ts"], text="y")
        assert broken.value.response.status_code == 500
    assert (await client.chat_update(channel="C1", ts=posted["ts"], text="y"))["ok"]
    assert [c.status for c in fake.calls_to("chat.update")] == [500, 500, 200]
    assert fake.calls_to("chat.postMessage")[0].status == 200    # an `error` answer is still HTTP 200


async def test_users_info(fake: FakeSlack) -> None:
    fake.users["U2"] = {"name": "bob", "real_name": "Bob Builder", "display_name": "bobby"}
    info = await bot(fake).users_info(user="U2")
    assert info["user"]["id"] == "U2" and info["user"]["name"] == "bob"
    assert info["user"]["profile"]["display_name"] == "bobby" and info["user"]["real_name"] == "Bob Builder"
    with pytest.raises(SlackApiError) as unknown:
        await bot(fake).users_info(user="U404")
    assert unknown.value.response["error"] == "user_not_found"


async def test_views_publish_and_home(fake: FakeSlack) -> None:
    client = bot(fake)
    view = {"type": "home", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "2 running"}}]}
    first = await client.views_publish(user_id="U1", view=view)
    assert first["view"]["id"].startswith("V") and first["view"]["type"] == "home"
    home = fake.home("U1")
    assert home is not None and home["blocks"] == view["blocks"]
    view["blocks"][0]["text"]["text"] = "1 running"
    second = await client.views_publish(user_id="U1", view=view)
    assert second["view"]["id"] == first["view"]["id"]
    assert fake.home("U1")["blocks"][0]["text"]["text"] == "1 running"   # type: ignore[index]
    assert fake.home("U2") is None
    with pytest.raises(SlackApiError) as conflict:
        await client.views_publish(user_id="U1", view=view, hash="stale")
    assert conflict.value.response["error"] == "hash_conflict"


async def test_other_methods_and_form_bodies(fake: FakeSlack) -> None:
    client = bot(fake)
    opened = await client.conversations_open(users="U7")
    assert opened["channel"]["id"] == "DU7"
    ephemeral = await client.chat_postEphemeral(channel="C1", user="U1", text="only you")
    assert ephemeral["message_ts"]
    with pytest.raises(SlackApiError) as unknown:
        await client.api_call("chat.scheduleMessage", json={"channel": "C1", "text": "x", "post_at": 1})
    assert unknown.value.response["error"] == "unknown_method"

    blocks = [{"type": "divider"}]
    form = await client.api_call("chat.postMessage", data={"channel": "C9", "text": "form", "blocks": json.dumps(blocks)})
    call = fake.calls_to("chat.postMessage")[-1]
    assert call.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert call.params["blocks"] == blocks and call.params["channel"] == "C9"
    assert fake.message("C9", form["ts"])["blocks"] == blocks   # type: ignore[index]


async def test_wait_for_and_its_failure_message(fake: FakeSlack) -> None:
    client = bot(fake)

    async def later() -> None:
        await asyncio.sleep(0.05)
        await client.chat_postMessage(channel="C1", text="one")
        await client.chat_postMessage(channel="C2", text="two")

    task = asyncio.create_task(later())
    found = await fake.wait_for("chat.postMessage", where=lambda c: c.params.get("channel") == "C2")
    assert [c.params["text"] for c in found] == ["two"]
    await task
    with pytest.raises(AssertionError, match=r"(?s)chat\.update.*chat\.postMessage"):
        await fake.wait_for("chat.update", timeout=0.1)
    with pytest.raises(AssertionError):
        await fake.wait_for("chat.postMessage", n=3, timeout=0.1)


async def test_answers_while_the_test_loop_is_blocked(fake: FakeSlack) -> None:
    """A synchronous request from the test's own thread (its loop blocked) is answered: the fake
    runs on its own thread and loop."""
    request = urllib.request.Request(fake.api_url + "auth.test", data=b"",
                                     headers={"Authorization": f"Bearer {fake.bot_token}"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert json.loads(answer.read())["user_id"] == "UB0T"


# --- response_url ------------------------------------------------------------------------------
async def test_response_url_records_and_can_replace_the_message(fake: FakeSlack) -> None:
    posted = await bot(fake).chat_postMessage(channel="C1", text="card")
    url = fake.response_url("click", channel="C1", ts=posted["ts"])
    answer = await AsyncWebhookClient(url).send(text="booting…", replace_original=True,
                                                blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": "b"}}])
    assert answer.status_code == 200 and answer.body == "ok"
    [call] = await fake.wait_for("response_url:click")
    assert call.params["text"] == "booting…" and call.params["replace_original"] is True
    assert fake.message("C1", posted["ts"])["text"] == "booting…"   # type: ignore[index]

    fake.fail("response_url:click", error="expired_url")
    expired = await AsyncWebhookClient(url).send(text="late")
    assert (expired.status_code, expired.body) == (404, "expired_url")
    await AsyncWebhookClient(url).send(delete_original=True)
    assert fake.message("C1", posted["ts"]) is None

    plain = fake.response_url("cmd")
    assert (await AsyncWebhookClient(plain).send(text="hi", response_type="ephemeral")).status_code == 200
    assert fake.calls_to("response_url:cmd")[0].params["response_type"] == "ephemeral"


# --- signing and request builders ------------------------------------------------------------
def test_sign_is_what_slack_sdk_verifies() -> None:
    verifier = SignatureVerifier("s3cret")
    body = form_body(slash_command_form("search h100", response_url="http://x/r"))
    headers = sign("s3cret", body)
    assert headers["X-Slack-Signature"].startswith("v0=")
    assert verifier.is_valid_request(body, headers)
    assert verifier.is_valid_request(body.decode(), sign("s3cret", body.decode()))
    assert not verifier.is_valid_request(body + b"x", headers)
    assert not verifier.is_valid_request(body, sign("other", body))
    assert not verifier.is_valid_request(body, sign("s3cret", body, timestamp=int(time.time()) - 600))


def test_request_builders_have_slacks_fields() -> None:
    form = slash_command_form("search h100 --max 2.5", response_url="http://x/r", trigger_id="1.2.3")
    assert {"token", "team_id", "team_domain", "channel_id", "channel_name", "user_id", "user_name", "command",
            "text", "api_app_id", "is_enterprise_install", "response_url", "trigger_id"} <= form.keys()
    assert (form["command"], form["text"], form["trigger_id"]) == ("/gpu", "search h100 --max 2.5", "1.2.3")
    assert dict(parse_qsl(form_body(form).decode())) == form

    click = block_actions_payload("g-7f3a", "gpu_stop", response_url="http://x/r")
    assert click["type"] == "block_actions" and click["actions"][0]["value"] == "g-7f3a"
    assert click["container"] == {"type": "message", "message_ts": "1700000000.000100", "channel_id": "C1",
                                  "is_ephemeral": False}
    assert click["message"]["ts"] == "1700000000.000100" and click["trigger_id"]
    assert json.loads(interactive_form(click)["payload"]) == click
    ephemeral = block_actions_payload("v", "a", response_url="http://x/r", container_type="ephemeral")
    assert "message" not in ephemeral and ephemeral["container"]["is_ephemeral"] is True
    home_click = block_actions_payload("v", "a", response_url=None, container_type="view")
    assert home_click["container"]["type"] == "view" and "channel" not in home_click and "response_url" not in home_click

    event = app_home_opened_event("U3")
    assert event["type"] == "event_callback" and event["event"]["tab"] == "home"
    assert (event["event"]["user"], event["event"]["channel"], event["team_id"]) == ("U3", "DU3", "T0TEAM")


# --- Socket Mode --------------------------------------------------------------------------------
@asynccontextmanager
async def socket_client(fake: FakeSlack, seen: list[SocketModeRequest], raw: list[dict[str, Any]], *,
                        reply: bool = True) -> AsyncIterator[SocketModeClient]:
    client = SocketModeClient(app_token=fake.app_token, ping_interval=1,
                              web_client=AsyncWebClient(base_url=fake.api_url, token=fake.app_token))

    async def on_request(c: Any, request: SocketModeRequest) -> None:
        seen.append(request)
        if reply:
            await c.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id, payload={"text": "hi"}))

    async def on_message(c: Any, message: dict[str, Any], _raw: str | None) -> None:
        raw.append(message)

    client.socket_mode_request_listeners.append(on_request)
    client.message_listeners.append(on_message)
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def test_socket_mode_envelope_and_ack(fake: FakeSlack) -> None:
    seen: list[SocketModeRequest] = []
    raw: list[dict[str, Any]] = []
    async with socket_client(fake, seen, raw):
        await fake.wait_connected()
        [opened] = fake.calls_to("apps.connections.open")
        assert opened.headers["Authorization"] == f"Bearer {fake.app_token}"
        command = slash_command_form("search h100", response_url=fake.response_url("cmd"))
        sent_at = time.monotonic()
        eid = await fake.send("slash_commands", command)
        acked = await fake.ack(eid)
        assert acked == {"envelope_id": eid, "payload": {"text": "hi"}}
        at = fake.acked_at(eid)
        assert at is not None and at >= sent_at
        [request] = seen
        assert (request.type, request.envelope_id, request.payload) == ("slash_commands", eid, command)
        assert request.accepts_response_payload is True
        assert request.retry_attempt is None               # Slack sends retry fields with events only

        eid2 = await fake.send("events_api", app_home_opened_event("U1"), retry_attempt=1, retry_reason="timeout")
        await fake.ack(eid2)
        assert (seen[1].retry_attempt, seen[1].retry_reason, seen[1].accepts_response_payload) == (1, "timeout", False)
    assert raw[0]["type"] == "hello" and raw[0]["connection_info"]["app_id"] == fake.app_id
    assert raw[0]["num_connections"] == 1 and "debug_info" in raw[0]
    assert [e["envelope_id"] for e in fake.envelopes] == [eid, eid2]


async def test_socket_mode_missing_ack_and_reconnect(fake: FakeSlack) -> None:
    seen: list[SocketModeRequest] = []
    raw: list[dict[str, Any]] = []
    async with socket_client(fake, seen, raw, reply=False):
        eid = await fake.send("interactive", block_actions_payload("g-1", "gpu_stop", response_url=None))
        with pytest.raises(AssertionError, match="no ack"):
            await fake.ack(eid, timeout=0.2)
        assert fake.acked_at(eid) is None and seen[0].payload["type"] == "block_actions"

        await fake.disconnect()
        await fake.wait_for("apps.connections.open", n=2)
        for _ in range(200):
            if fake.connections_opened == 2 and sum(1 for m in raw if m.get("type") == "hello") == 2:
                break
            await asyncio.sleep(0.01)
        assert fake.connections_opened == 2
        await fake.send("events_api", app_home_opened_event("U1"))
        for _ in range(200):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        assert seen[1].payload["event"]["type"] == "app_home_opened"


async def test_send_without_a_connection_fails(fake: FakeSlack) -> None:
    with pytest.raises(AssertionError, match="no Socket Mode connection"):
        await fake.send("slash_commands", {"text": "x"}, timeout=0.1)
