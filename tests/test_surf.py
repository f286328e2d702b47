"""SURF Research Cloud provider against its loopback fake, over real HTTP: discovery by name across
pages, the bare token, the pause/resume walk, failed resumes, refusals that send nothing, faults,
and where the token may (and may not) go."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from gpuherd.core.config import Settings
from gpuherd.core.errors import (
    AuthError,
    CapacityError,
    ProviderError,
    ProviderStateError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from gpuherd.core.providers.base import CreateRequest, ProviderState
from gpuherd.core.providers.surf import SurfProvider, gpu_from_flavour, surf_error_text
from tests.fakes.surf_fake import NO_GPUS, TOKEN, FakeSurf

DISPLAY = "SURF Research Cloud"


class Sleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture(scope="module")
def _server() -> Iterator[FakeSurf]:
    with FakeSurf() as server:   # one server for the module: stopping one takes half a second
        yield server


@pytest.fixture
def fake(_server: FakeSurf) -> Iterator[FakeSurf]:
    _server.reset()
    yield _server
    _server.reset()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def make(fake: FakeSurf, sleeps: Sleeps, *, token: str = TOKEN, **kw) -> SurfProvider:
    kw.setdefault("base_url", fake.url + fake.prefix)
    kw.setdefault("timeout_s", 2.0)
    return SurfProvider(token, sleep=sleeps, backoff_s=0.01, **kw)


@pytest.fixture
async def surf(fake: FakeSurf, sleeps: Sleeps) -> AsyncIterator[SurfProvider]:
    provider = make(fake, sleeps)
    yield provider
    await provider.aclose()


def auth_header(request) -> str | None:
    return next((v for k, v in request.headers.items() if k.lower() == "authorization"), None)


# ---------------------------------------------------------------------------- discovery

async def test_discovers_workspaces_by_name_filter_across_pages(fake: FakeSurf, sleeps: Sleeps):
    wanted = {fake.add("gpuherd-llm-1", flavor="gpu-a10-11core-88gb"),
              fake.add("GPUHERD-vision", "paused"),
              fake.add("my-GpuHerd-notebook", "resuming")}
    fake.add("someone-elses-desktop")
    fake.add("analysis-box")
    fake.add("scratch")
    fake.add("gpuherd-data", application_type="Storage")      # not a Compute workspace
    gone = fake.add("gpuherd-old")
    fake.delete(gone)                                         # hidden by deleted=false
    wanted.add(fake.add("team-gpuherd-8", "creating"))        # lands on the third page
    provider = make(fake, sleeps, name_filter="gpuherd")
    try:
        listed = await provider.list()
    finally:
        await provider.aclose()

    assert {p.provider_id for p in listed} == wanted
    pages = fake.calls("list")
    assert len(pages) == 3, "7 workspaces listed, 3 a page"
    assert [r.query.get("page") for r in pages] == [None, "2", "3"]
    assert all(r.query["application_type"] == "Compute" and r.query["deleted"] == "false" for r in pages)
    by_name = {p.message.split(" ")[0]: p for p in listed}
    llm = by_name["gpuherd-llm-1"]
    assert llm.state is ProviderState.RUNNING and llm.gpu_name == "A10" and llm.num_gpus == 1
    assert llm.label is None and llm.endpoint is None and llm.provider == "surf"
    assert "145.100.0.10" in llm.message
    assert by_name["GPUHERD-vision"].state is ProviderState.STOPPED
    assert by_name["GPUHERD-vision"].gpu_name == "" and by_name["GPUHERD-vision"].num_gpus == 0
    assert by_name["my-GpuHerd-notebook"].state is ProviderState.STARTING
    assert by_name["team-gpuherd-8"].state is ProviderState.PROVISIONING
    assert all(p.dph == Decimal(0) and p.storage_dph == Decimal(0) for p in listed)


async def test_no_filter_lists_every_compute_workspace(fake: FakeSurf, surf: SurfProvider):
    ids = {fake.add(f"ws-{i}") for i in range(4)}
    fake.add("archive", application_type="Storage")
    assert {p.provider_id for p in await surf.list()} == ids


async def test_states_are_mapped_and_unknown_ones_say_so(fake: FakeSurf, surf: SurfProvider):
    expected = {"running": ProviderState.RUNNING, "pausing": ProviderState.STOPPING,
                "paused": ProviderState.STOPPED, "resuming": ProviderState.STARTING,
                "creating": ProviderState.PROVISIONING, "updating": ProviderState.LOADING,
                "rebooting": ProviderState.STARTING, "deleting": ProviderState.DESTROYED,
                "failed": ProviderState.ERROR, "unhealthy": ProviderState.ERROR,
                "unknown": ProviderState.UNKNOWN, "hibernating": ProviderState.UNKNOWN}
    ids = {fake.add(f"ws-{status}", status): status for status in expected}
    got = {p.provider_id: p for p in await surf.list()}
    for ws_id, status in ids.items():
        assert got[ws_id].state is expected[status], status
    assert "hibernating" in got[next(i for i, s in ids.items() if s == "hibernating")].message


async def test_sends_the_bare_token_and_the_fake_refuses_bearer(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-1")
    await surf.list()
    await surf.get(ws)
    await surf.stop(ws)
    assert fake.requests and all(auth_header(r) == TOKEN for r in fake.requests)
    async with httpx.AsyncClient() as client:   # the fake holds the API to the bare token
        bearer = await client.get(f"{fake.url}/v1/workspace/workspaces/",
                                  headers={"authorization": f"Bearer {TOKEN}"})
        bare = await client.get(f"{fake.url}/v1/workspace/workspaces/", headers={"authorization": TOKEN})
    assert bearer.status_code == 401 and bare.status_code == 200


# ---------------------------------------------------------------------------- pause / resume

async def test_pause_and_resume_walk(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-llm", flavor="2gpu-a100-80gb-22core")
    assert (await surf.get(ws)).state is ProviderState.RUNNING

    stopping = await surf.stop(ws)
    assert stopping.state is ProviderState.STOPPING
    assert len(fake.calls("stop")) == 1
    stopped = await surf.get(ws)
    assert stopped.state is ProviderState.STOPPED and stopped.gpu_name == "A100 80GB" and stopped.num_gpus == 2

    again = await surf.stop(ws)                     # already paused: success, nothing sent
    assert again.state is ProviderState.STOPPED and len(fake.calls("stop")) == 1

    starting = await surf.start(ws)
    assert starting.state is ProviderState.STARTING and len(fake.calls("start")) == 1
    running = await surf.get(ws)
    assert running.state is ProviderState.RUNNING and "145.100.0.10" in running.message
    assert (await surf.start(ws)).state is ProviderState.RUNNING and len(fake.calls("start")) == 1
    assert [r.path for r in fake.calls("stop") + fake.calls("start")] == [
        f"/v1/workspace/workspaces/{ws}/actions/pause/", f"/v1/workspace/workspaces/{ws}/actions/resume/"]


async def test_failed_resume_is_a_capacity_error_with_surfs_text(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-llm", "paused")
    fake.fail_resume()
    with pytest.raises(CapacityError) as err:
        await surf.start(ws)
    message = err.value.message
    assert message.startswith(f"{DISPLAY}: ") and "no free GPUs" in message
    assert f"the resume failed: {NO_GPUS}" in message
    after = await surf.get(ws)
    assert after.state is ProviderState.STOPPED and "the last resume failed" in after.message


async def test_resume_failing_for_another_reason_is_a_state_error(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-llm", "paused")
    fake.fail_resume("Wallet has no credits left")
    with pytest.raises(ProviderStateError) as err:
        await surf.start(ws)
    assert not isinstance(err.value, CapacityError)
    assert "the resume failed: Wallet has no credits left" in err.value.message


async def test_a_resume_failure_recorded_later_shows_in_get(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-llm", "paused")
    fake.fail_resume(after_reads=3)
    assert (await surf.start(ws)).state is ProviderState.STARTING     # read 1
    assert (await surf.get(ws)).state is ProviderState.STARTING       # read 2
    later = await surf.get(ws)                                        # read 3: it failed
    assert later.state is ProviderState.STOPPED and NO_GPUS in later.message


async def test_an_old_failed_resume_is_not_blamed_on_a_new_one(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-llm", "paused")
    fake.fail_resume()
    with pytest.raises(CapacityError):
        await surf.start(ws)
    fake.late_actions = True        # the new resume is not listed yet; the failed one still is
    resumed = await surf.start(ws)                  # GPUs are free again
    assert resumed.state is ProviderState.STARTING
    assert (await surf.get(ws)).state is ProviderState.RUNNING


@pytest.mark.parametrize("op", ["stop", "start"])
async def test_an_action_repeated_after_a_lost_answer_succeeds(fake: FakeSurf, surf: SurfProvider, op: str):
    ws = fake.add("gpuherd-1", "running" if op == "stop" else "paused")
    fake.lose_answer(op)      # SURF acts, the gateway answers 502; the retry is refused as a repeat
    got = await (surf.stop(ws) if op == "stop" else surf.start(ws))
    assert got.state is (ProviderState.STOPPING if op == "stop" else ProviderState.STARTING)
    assert len(fake.calls(op)) == 2
    assert len(fake.workspaces[ws].actions) == 1, "the repeat did not start a second action"


async def test_refused_action_is_a_state_error(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-llm", "creating")
    with pytest.raises(ProviderStateError) as err:
        await surf.stop(ws)
    assert "cannot be paused while creating" in err.value.message and "HTTP 400" in err.value.message


async def test_actions_on_unknown_or_deleted_workspaces(fake: FakeSurf, surf: SurfProvider):
    gone = fake.add("gpuherd-old")
    fake.delete(gone)
    for ws in ("no-such-workspace", gone):
        with pytest.raises(ProviderStateError) as err:
            await surf.stop(ws)
        assert "does not know" in err.value.message
    assert fake.calls("stop") == []


# ---------------------------------------------------------------------------- lookups

async def test_unknown_or_deleted_workspace_is_none(fake: FakeSurf, surf: SurfProvider):
    gone = fake.add("gpuherd-old", "paused")
    fake.delete(gone)
    assert await surf.get("8d1c5e0a-0000-4000-8000-000000000000") is None
    assert await surf.get(gone) is None
    assert len(fake.calls("get")) == 2
    assert await surf.get("  ") is None and len(fake.requests) == 2   # nothing to ask


async def test_get_ignores_the_name_filter(fake: FakeSurf, sleeps: Sleeps):
    ws = fake.add("attached-by-hand")
    provider = make(fake, sleeps, name_filter="gpuherd")
    try:
        assert await provider.list() == []
        got = await provider.get(ws)
        assert got is not None and got.provider_id == ws
    finally:
        await provider.aclose()


# ---------------------------------------------------------------------------- refusals

async def test_create_and_destroy_are_refused_without_a_request(fake: FakeSurf, surf: SurfProvider):
    caps = surf.capabilities
    assert not caps.can_search and not caps.can_create and not caps.can_destroy
    assert caps.can_stop and caps.can_start and caps.can_list and not caps.storage_bills_while_stopped
    assert await surf.search() == []
    with pytest.raises(ProviderError) as created:
        await surf.create(CreateRequest(offer_id="x", label="gh-1", image="vllm/vllm-openai:v0.6.3"))
    assert "portal" in created.value.message and "attach it to gpuherd" in created.value.message
    with pytest.raises(ProviderError) as destroyed:
        await surf.destroy("ws-1")
    assert "portal" in destroyed.value.message and "pause" in destroyed.value.message
    assert DISPLAY in created.value.message and DISPLAY in destroyed.value.message
    assert fake.requests == []


async def test_storage_billing_and_price_are_configurable(fake: FakeSurf, sleeps: Sleeps):
    ws = fake.add("gpuherd-rccs", "paused")
    provider = make(fake, sleeps, dph=Decimal("1.25"), storage_dph=Decimal("0.02"),
                    storage_bills_while_stopped=True)
    try:
        got = await provider.get(ws)
    finally:
        await provider.aclose()
    assert provider.capabilities.storage_bills_while_stopped
    assert not SurfProvider.capabilities.storage_bills_while_stopped   # the class default is untouched
    assert got.dph == Decimal("1.25") and got.storage_dph == Decimal("0.02")


# ---------------------------------------------------------------------------- faults

async def test_rate_limit_retry_after_is_honoured(fake: FakeSurf, surf: SurfProvider, sleeps: Sleeps):
    ws = fake.add("gpuherd-1")
    fake.fault("list", "rate_limit", retry_after=1.5)
    assert [p.provider_id for p in await surf.list()] == [ws]
    assert sleeps == [1.5] and len(fake.calls("list")) == 2


async def test_rate_limit_that_persists_is_rate_limited(fake: FakeSurf, surf: SurfProvider):
    fake.fault("get", "rate_limit", times=5, retry_after=0.5)
    with pytest.raises(RateLimited) as err:
        await surf.get("ws-1")
    assert err.value.retry_after == 0.5 and DISPLAY in err.value.message
    assert len(fake.calls("get")) == 3


async def test_server_error_is_mapped(fake: FakeSurf, surf: SurfProvider):
    fake.fault("get", "server_error", times=5)
    with pytest.raises(ProviderUnavailable) as err:
        await surf.get("ws-1")
    assert DISPLAY in err.value.message and "HTTP 500" in err.value.message
    assert len(fake.calls("get")) == 1, "a 500 is not retried"


async def test_bad_gateway_on_an_action_is_retried(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-1")
    fake.fault("stop", "bad_gateway")
    assert (await surf.stop(ws)).state is ProviderState.STOPPING
    assert len(fake.calls("stop")) == 2


async def test_capacity_refusal_of_a_resume_request(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-1", "paused")
    fake.fault("start", "capacity")
    with pytest.raises(CapacityError) as err:
        await surf.start(ws)
    assert "No GPUs available" in err.value.message


async def test_malformed_json_is_named(fake: FakeSurf, surf: SurfProvider):
    fake.fault("list", "malformed")
    with pytest.raises(ProviderError) as err:
        await surf.list()
    assert "malformed" in err.value.message and DISPLAY in err.value.message


async def test_timeout_is_bounded(fake: FakeSurf, sleeps: Sleeps):
    provider = make(fake, sleeps, timeout_s=0.2, attempts=2)
    fake.fault("get", "timeout", times=2, hang_s=0.6)
    started = time.monotonic()
    try:
        with pytest.raises(ProviderTimeout) as err:
            await provider.get("ws-1")
    finally:
        await provider.aclose()
    assert DISPLAY in err.value.message and time.monotonic() - started < 2


@pytest.mark.parametrize("how", ["wrong token", "refused token"])
async def test_auth_failure_names_surf_and_never_the_token(fake: FakeSurf, sleeps: Sleeps,
                                                           caplog: pytest.LogCaptureFixture, how: str):
    secret = "surf-wrong-token-7c1d" if how == "wrong token" else TOKEN
    provider = make(fake, sleeps, token=secret)
    if how == "refused token":
        fake.fault("list", "auth", times=3)
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(AuthError) as err:
            await provider.list()
    finally:
        await provider.aclose()
    message = err.value.message
    assert message.startswith(f"{DISPLAY}: ") and "refused" in message and "SURF_API_TOKEN" in message
    assert "Invalid token" in message, "SURF's own words are kept, scrubbed"
    assert secret not in message and secret not in str(err.value) and secret not in repr(err.value)
    assert caplog.records, "logging was captured"
    assert not [r for r in caplog.records if secret in r.getMessage()]


# ---------------------------------------------------------------------------- where requests go

async def test_surf_url_from_settings_redirects_every_request(tmp_path: Path):
    with FakeSurf(prefix="/proxy/surf/v1", public_url="https://gw.live.surfresearchcloud.nl/v1") as proxy:
        ids = {proxy.add(f"gpuherd-{i}") for i in range(5)}
        proxy.add("other")
        settings = Settings(home=tmp_path / "home", surf_api_token=TOKEN,
                            surf_url=f"{proxy.url}/proxy/surf/v1/workspace/", surf_name_filter="GPUHERD")
        provider = SurfProvider.from_settings(settings)
        assert provider is not None
        try:
            listed = await provider.list()
        finally:
            await provider.aclose()
        assert {p.provider_id for p in listed} == ids
        assert [r.query.get("page") for r in proxy.calls("list")] == [None, "2"]
        assert all(r.path == "/proxy/surf/v1/workspace/workspaces/" for r in proxy.requests)
    assert SurfProvider.from_settings(Settings(home=tmp_path / "home")) is None
    assert SurfProvider.from_settings(Settings(home=tmp_path / "home", surf_api_token="  ")) is None


async def test_next_link_on_another_host_never_gets_the_token(fake: FakeSurf, sleeps: Sleeps,
                                                              caplog: pytest.LogCaptureFixture):
    with FakeSurf(token="other-host-token") as elsewhere:
        fake.public_url = f"{elsewhere.url}/v1"
        ids = {fake.add(f"gpuherd-{i}") for i in range(7)}
        provider = make(fake, sleeps)
        caplog.set_level(logging.INFO, logger="gpuherd.core.providers.surf")
        try:
            listed = await provider.list()
        finally:
            await provider.aclose()
        assert elsewhere.requests == [], "nothing, and so no token, went to the other host"
    assert {p.provider_id for p in listed} == ids
    assert [r.query.get("page") for r in fake.calls("list")] == [None, "2", "3"]
    assert any("next-page link names" in r.getMessage() for r in caplog.records)


async def test_a_next_link_that_repeats_is_an_error(fake: FakeSurf, surf: SurfProvider):
    for i in range(5):
        fake.add(f"gpuherd-{i}")
    fake._link = lambda request, page: f"{fake.url}/v1/workspace/workspaces/?page=1"  # type: ignore[method-assign]
    try:
        with pytest.raises(ProviderError) as err:
            await surf.list()
    finally:
        del fake._link
    assert "repeats" in err.value.message and len(fake.calls("list")) == 2


# ---------------------------------------------------------------------------- as SURF's own clients speak

def header(request, name: str) -> str | None:
    return next((v for k, v in request.headers.items() if k.lower() == name), None)


async def test_actions_send_an_empty_object_as_application_json_action(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-1")
    await surf.stop(ws)
    for _ in range(3):
        await surf.get(ws)                          # paused now
    await surf.start(ws)
    (pause,), (resume,) = fake.calls("stop"), fake.calls("start")
    assert pause.raw == b"{}" and header(pause, "content-type") == "application/json;pause"
    assert resume.raw == b"{}" and header(resume, "content-type") == "application/json;resume"
    assert header(pause, "x-csrftoken") is None, "no CSRF token unless one is configured"
    assert all(header(r, "content-type") is None for r in fake.calls("get")), "reads send no body"


async def test_the_fake_refuses_an_action_without_body_or_media_type(fake: FakeSurf):
    ws = fake.add("gpuherd-1")
    url = f"{fake.url}/v1/workspace/workspaces/{ws}/actions/pause/"
    async with httpx.AsyncClient(headers={"authorization": TOKEN}) as client:
        bare = await client.post(url)                                    # what gpuherd used to send
        plain = await client.post(url, json={})                          # application/json alone
        empty = await client.post(url, headers={"content-type": "application/json;pause"})
        right = await client.post(url, content=b"{}", headers={"content-type": "application/json;pause"})
    assert (bare.status_code, plain.status_code, empty.status_code, right.status_code) == (415, 415, 400, 202)
    assert isinstance(bare.json()["message"], list), "SURF's 4xx carry message as a list"
    assert fake.workspaces[ws].status == "pausing" and len(fake.workspaces[ws].actions) == 1


async def test_csrf_token_is_sent_on_actions_when_configured(fake: FakeSurf, sleeps: Sleeps):
    ws = fake.add("gpuherd-1")
    provider = make(fake, sleeps, csrf_token="csrf-abc123")
    try:
        await provider.stop(ws)
    finally:
        await provider.aclose()
    assert header(fake.calls("stop")[0], "x-csrftoken") == "csrf-abc123"


async def test_a_refusal_carries_surfs_list_valued_message(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-llm", "resuming")
    fake.workspaces[ws].plan = []                   # stuck resuming: SURF refuses a pause
    with pytest.raises(ProviderStateError) as err:
        await surf.stop(ws)
    assert "no reason given" not in err.value.message
    assert "Workspace cannot be paused while resuming." in err.value.message


async def test_a_list_valued_capacity_refusal_is_a_capacity_error(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-1", "paused")
    fake.fault("start", "capacity")                 # 400 {"message": ["No GPUs available ..."]}
    with pytest.raises(CapacityError) as err:
        await surf.start(ws)
    assert "No GPUs available for this flavour" in err.value.message and "no reason given" not in err.value.message
    assert err.value.hint and "stays paused" in err.value.hint


@pytest.mark.parametrize(("body", "text"), [
    ({"code": 400, "status": "Bad Request", "message": ["Workspace is locked.", "Try later."]},
     "Workspace is locked.; Try later."),
    ({"code": 404, "status": "Not Found", "message": "Not found."}, "Not found."),
    ({"message": [{"detail": "nested"}]}, "nested"),
    ({"detail": "Invalid token."}, "Invalid token."),
    ({"message": []}, ""),
    ("<html>502</html>", ""),
])
def test_surf_error_text_reads_every_message_shape(body, text):
    assert surf_error_text(body) == text


@pytest.mark.parametrize(("flavour", "gpu", "count"), [
    ("gpu-a10-11core-88gb", "A10", 1),
    ("2gpu-a100-80gb-22core", "A100 80GB", 2),
    ("gpu-h100x4", "H100 SXM", 4),
    ("GPU V100 2x", "V100", 2),
    ("ubuntu-4core-16gb", "", 0),
    ("", "", 0),
])
def test_gpu_is_read_from_the_flavour_name(flavour, gpu, count):
    assert gpu_from_flavour(flavour) == (gpu, count)


async def test_gpu_comes_from_flavor_name_not_from_a_gpu_field(fake: FakeSurf, surf: SurfProvider):
    with_flavour = fake.add("gpuherd-a", flavor="gpu-a10-11core-88gb")
    cpu_only = fake.add("gpuherd-b", flavor="4core-16gb")
    body = fake.workspaces[with_flavour].body()
    assert "gpu" not in body["resource_meta"] and body["resource_meta"]["flavor_name"]
    got = {p.provider_id: p for p in await surf.list()}
    assert (got[with_flavour].gpu_name, got[with_flavour].num_gpus) == ("A10", 1)
    assert (got[cpu_only].gpu_name, got[cpu_only].num_gpus) == ("", 0)


async def test_auth_falls_back_to_token_form_once_and_remembers_it(fake: FakeSurf, surf: SurfProvider):
    fake.auth = "token"                             # this server takes only "Token <tok>"
    ws = fake.add("gpuherd-1")
    assert surf.auth_form == "bare"
    assert [p.provider_id for p in await surf.list()] == [ws]
    assert surf.auth_form == "token"
    await surf.get(ws)
    await surf.stop(ws)
    forms = [auth_header(r) for r in fake.requests]
    assert forms[0] == TOKEN, "the documented (bare) form is tried first"
    assert forms[1:] == [f"Token {TOKEN}"] * (len(forms) - 1), "one 401, then the working form only"
    assert len(fake.calls("stop")) == 1 and fake.workspaces[ws].status == "pausing"


async def test_auth_starting_with_token_form_falls_back_to_bare(fake: FakeSurf, sleeps: Sleeps):
    ws = fake.add("gpuherd-1")
    provider = make(fake, sleeps, auth="token")
    try:
        assert (await provider.get(ws)) is not None
        assert (await provider.get(ws)) is not None
    finally:
        await provider.aclose()
    assert [auth_header(r) for r in fake.requests] == [f"Token {TOKEN}", TOKEN, TOKEN]
    assert provider.auth_form == "bare"


async def test_a_refused_token_tries_each_form_once_and_then_stops_switching(fake: FakeSurf, sleeps: Sleeps):
    secret = "surf-revoked-token-99"
    provider = make(fake, sleeps, token=secret)
    try:
        for _ in range(2):
            with pytest.raises(AuthError) as err:
                await provider.list()
            assert secret not in err.value.message
    finally:
        await provider.aclose()
    assert [auth_header(r) for r in fake.requests] == [secret, f"Token {secret}", secret]


async def test_either_form_accepted_means_no_retry(fake: FakeSurf, surf: SurfProvider):
    fake.auth = "either"
    fake.add("gpuherd-1")
    await surf.list()
    assert len(fake.requests) == 1 and surf.auth_form == "bare"


async def test_a_form_that_worked_is_kept_when_the_token_is_later_refused(fake: FakeSurf, surf: SurfProvider):
    ws = fake.add("gpuherd-1")
    assert await surf.get(ws) is not None          # the bare form works
    fake.auth = "token"                             # the server changes its mind (or revokes)
    with pytest.raises(AuthError):
        await surf.get(ws)
    assert [auth_header(r) for r in fake.requests] == [TOKEN, TOKEN], "no switching once a form worked"
