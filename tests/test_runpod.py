"""The RunPod client against its loopback GraphQL fake, over real HTTP: the documents and variables
it sends, spot rentals and resumes, GraphQL error mapping, retries, price arithmetic, pod
normalisation, configuration, and the API key kept out of URLs, messages and logs."""

from __future__ import annotations

import asyncio
import logging
import shlex
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest

from gpuherd.core.config import Settings, load_settings
from gpuherd.core.errors import (
    AuthError,
    CapacityError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from gpuherd.core.offers import storage_hourly
from gpuherd.core.providers import runpod as rp_module
from gpuherd.core.providers.base import CreateRequest, ProviderState
from gpuherd.core.providers.runpod import RunPodProvider, encode_type_id, parse_offer_id
from tests.fakes.runpod_fake import INPUTS, OBJECTS, SOMETHING_WRONG, FakeRunPod

KEY = "rp_test_9f8e7d6c5b4a3210"
RTX = "NVIDIA GeForce RTX 4090"
A5000 = "NVIDIA RTX A5000"       # sold out on the Secure Cloud only
IN_STOCK = {RTX, "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", A5000}


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def fake():
    server = FakeRunPod(api_key=KEY).start()
    yield server
    server.stop()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def rp(fake, clock, sleeps):
    provider = RunPodProvider(KEY, base_url=fake.url, timeout_s=0.5, backoff_s=0.01, sleep=sleeps, clock=clock)
    yield provider
    await provider.aclose()


def request(offer_id: str = "NVIDIA_GeForce_RTX_4090.secure.x1", label: str = "gh-rp-1", **kw) -> CreateRequest:
    kw.setdefault("image", "vllm/vllm-openai:v0.6.3")
    kw.setdefault("ports", [8000])
    kw.setdefault("disk_gb", 50)
    return CreateRequest(offer_id=offer_id, label=label, **kw)


async def walk(rp: RunPodProvider, pod_id: str, want: ProviderState, steps: int = 10) -> list[ProviderState]:
    seen: list[ProviderState] = []
    for _ in range(steps):
        got = await rp.get(pod_id)
        assert got is not None
        seen.append(got.state)
        if got.state is want:
            return seen
    raise AssertionError(f"never reached {want.value}: {seen}")


def last_call(fake: FakeRunPod, op: str) -> dict:
    calls = fake.calls(op)
    assert calls, f"no {op} request was sent"
    return calls[-1].body


def running(cost: Decimal, volume_gb: float = 50) -> Decimal:
    """What a pod bills while running: its rate plus its volume at $0.10/GB-month."""
    return cost + storage_hourly(Decimal("0.10"), volume_gb)


running_rate = running


# ------------------------------------------------------------------------------ transport

async def test_every_call_is_a_graphql_post_with_a_bearer_key_and_no_key_in_the_url(rp, fake):
    await rp.search()
    await rp.list()
    await rp.balance()
    assert {r.op for r in fake.requests} == {"search", "list", "balance"}
    for r in fake.requests:
        assert (r.method, r.path, r.query) == ("POST", "/graphql", {})
        assert r.headers["Authorization"] == f"Bearer {KEY}"
        assert "api_key" not in r.raw.decode() and KEY not in r.raw.decode()
    query = last_call(fake, "search")["query"]
    assert "gpuTypes" in query
    assert "secureStock: lowestPrice(input: {gpuCount: 1, secureCloud: true})" in query
    assert "communityStock: lowestPrice(input: {gpuCount: 1, secureCloud: false})" in query
    assert "secureSpotPrice" in query and "communitySpotPrice" in query and "stockStatus" in query


async def test_the_fake_takes_only_the_header_form_of_the_key(fake):
    async with httpx.AsyncClient(base_url=fake.url) as client:
        answer = await client.post(f"/graphql?api_key={KEY}", json={"query": "{ myself { id } }"})
    assert answer.status_code == 401


# --------------------------------------------------------------------------------- offers

async def test_search_skips_the_unknown_pseudo_type_and_types_without_stock(rp):
    offers = await rp.search()
    assert {o.extra["gpu_type_id"] for o in offers} == IN_STOCK
    assert all("unknown" not in o.offer_id.lower() for o in offers)
    by_id = {o.offer_id: o for o in offers}
    # RTX 4090: 2 clouds x (on-demand, spot) x counts [1,2,4,8]; A100 PCIe: 2 x 2 x [1,2];
    # H100: secure only, counts from maxGpuCount; A100 SXM: secure, on-demand only, [1,2,4];
    # A5000: community only (the Secure Cloud's own stock is "None"), 2 kinds x [1,2]
    assert len(offers) == 16 + 8 + 8 + 3 + 4 == len(by_id)
    assert not any(o.extra["gpu_type_id"] == "NVIDIA H100 80GB HBM3" and o.extra["cloud"] == "COMMUNITY"
                   for o in offers)
    h100_counts = sorted(o.num_gpus for o in offers if o.extra["gpu_type_id"] == "NVIDIA H100 80GB HBM3")
    assert h100_counts == [1, 1, 2, 2, 4, 4, 8, 8]
    assert "NVIDIA_A100-SXM4-80GB.secure.x4" in by_id and "NVIDIA_A100-SXM4-80GB.secure.x1.spot" not in by_id


async def test_prices_are_per_gpu_times_count_plus_a_50gb_volume_exactly(rp, clock):
    by_id = {o.offer_id: o for o in await rp.search()}
    community = by_id["NVIDIA_GeForce_RTX_4090.community.x2"]
    # 2 x $0.34 + 50 GB x $0.10/GB-month / 730 h (0.0068493.. -> 0.006849)
    assert community.dph == Decimal("0.686849")
    assert community.storage_cost == Decimal("0.20") and community.running_storage_cost == Decimal("0.10")
    assert community.storage_rate(50) == Decimal("0.013699")          # stopped: $0.20/GB-month
    assert community.dph_for(100) == Decimal("0.693699")              # re-quoted for a 100 GB volume
    assert (community.gpu_name, community.gpu_ram, community.interruptible) == ("RTX 4090", 24.0, False)
    assert community.fetched_at == clock.now() and community.provider == "runpod"

    spot = by_id["NVIDIA_GeForce_RTX_4090.secure.x8.spot"]
    assert spot.dph == Decimal("4.006849") and spot.interruptible           # 8 x $0.50 spot
    assert spot.extra["minimum_bid"] == "0.2"
    h100 = by_id["NVIDIA_H100_80GB_HBM3.secure.x8"]
    assert h100.dph == Decimal("21.526849") and h100.gpu_name == "H100 SXM"  # 8 x 2.69, no float drift
    assert by_id["NVIDIA_A100-SXM4-80GB.secure.x1"].gpu_name == "A100 80GB"


async def test_offer_ids_round_trip_through_get_offer(rp, fake):
    offers = await rp.search()
    for offer in offers:
        key = parse_offer_id(offer.offer_id)
        assert key is not None and key.offer_id == offer.offer_id and key.gpu_type_id == offer.extra["gpu_type_id"]
        assert await rp.get_offer(offer.offer_id) == offer
    lookups = [r.body for r in fake.calls("search")][1:]
    assert all(b["variables"]["id"] in IN_STOCK and "$id: String!" in b["query"] for b in lookups)

    before = len(fake.requests)
    for bad in ("garbage", "NVIDIA GeForce RTX 4090.secure.x1", "NVIDIA_GeForce_RTX_4090.cloudy.x1",
                "NVIDIA_GeForce_RTX_4090.secure.x0", "NVIDIA_GeForce_RTX_4090.SECURE.x1",
                "NVIDIA_GeForce_RTX_4090.secure.x1.spot.x", "NVIDIA%20GeForce_RTX_4090.secure.x1", ""):
        assert parse_offer_id(bad) is None and await rp.get_offer(bad) is None
    assert len(fake.requests) == before, "a malformed id is refused without asking RunPod"
    assert parse_offer_id(f"{encode_type_id('a_b.c%d é')}.community.x2.spot").gpu_type_id == "a_b.c%d é"

    fake.gpu_types[0]["lowestPrice"]["stockStatus"] = "None"          # the 4090 sold out since
    assert await rp.get_offer("NVIDIA_GeForce_RTX_4090.secure.x1") is None
    assert await rp.get_offer("Made_Up_GPU.secure.x1") is None


# --------------------------------------------------------------------------------- create

async def test_on_demand_create_sends_its_values_as_escaped_variables(rp, fake):
    label = 'gh-"quoted" } { label\nwith a newline'
    env = {"HF_TOKEN": 'hf_"x"}', "MULTI": "a\nb"}
    created = await rp.create(request(label=label, env=env, args=["--model", "meta/llama 3"], disk_gb=50.5))
    body = last_call(fake, "create")
    assert "mutation Deploy($input: PodFindAndDeployOnDemandInput!)" in body["query"]
    assert "podFindAndDeployOnDemand(input: $input)" in body["query"]
    assert "quoted" not in body["query"] and "hf_" not in body["query"], "values travel as variables"
    assert body["variables"] == {"input": {
        "cloudType": "SECURE", "gpuTypeId": RTX, "gpuCount": 1, "name": label,
        "imageName": "vllm/vllm-openai:v0.6.3", "volumeInGb": 51, "containerDiskInGb": 20,
        "volumeMountPath": "/workspace", "ports": "8000/http,22/tcp",
        "env": [{"key": "HF_TOKEN", "value": 'hf_"x"}'}, {"key": "MULTI", "value": "a\nb"}],
        "supportPublicIp": True, "startSsh": True,
        "dockerArgs": "--model 'meta/llama 3'"}}
    assert created.state is ProviderState.PROVISIONING and created.label == label
    assert created.dph == running(Decimal("0.69"), 51) and created.num_gpus == 1 and not created.interruptible
    assert created.offer_id == "NVIDIA_GeForce_RTX_4090.secure.x1"
    assert fake.pods[created.provider_id]["name"] == label
    assert [p.provider_id for p in await rp.list() if p.label == label] == [created.provider_id]


async def test_command_runs_under_bash_after_onstart_and_the_health_port_comes_first(rp, fake):
    await rp.create(request(command="python serve.py --port 9000", onstart="pip install x", ports=[8000, 22],
                            health_port=9000, health_path="/health"))
    spec = last_call(fake, "create")["variables"]["input"]
    assert spec["dockerArgs"] == shlex.join(["bash", "-c", "pip install x\npython serve.py --port 9000"])
    assert spec["ports"] == "9000/http,8000/http,22/tcp"


async def test_a_spot_offer_rents_an_interruptable_pod_bidding_its_spot_price(rp, fake):
    created = await rp.create(request("NVIDIA_GeForce_RTX_4090.community.x2.spot"))
    lookup = last_call(fake, "search")
    assert lookup["variables"] == {"id": RTX}
    body = last_call(fake, "create")
    assert "mutation RentSpot($input: PodRentInterruptableInput!)" in body["query"]
    assert "podRentInterruptable(input: $input)" in body["query"]
    spec = body["variables"]["input"]
    assert (spec["bidPerGpu"], spec["cloudType"], spec["gpuCount"]) == (0.2, "COMMUNITY", 2)
    assert created.interruptible and created.dph == running(Decimal("0.4")) and created.num_gpus == 2


async def test_a_bid_is_split_per_gpu_and_rounded_down(rp, fake):
    created = await rp.create(request("NVIDIA_A100_80GB_PCIe.secure.x2", interruptible=True,
                                      bid_dph=Decimal("1.66667")))
    assert fake.calls("search") == [], "with a bid there is nothing to look up"
    spec = last_call(fake, "create")["variables"]["input"]
    assert "podRentInterruptable" in last_call(fake, "create")["query"] and spec["bidPerGpu"] == 0.8333
    assert created.interruptible and created.dph == running(Decimal("1.6666"))

    with pytest.raises(ProviderError) as low:
        await rp.create(request("NVIDIA_A100_80GB_PCIe.secure.x2", interruptible=True, bid_dph=Decimal("0.5")))
    assert not isinstance(low.value, CapacityError)
    assert low.value.message.startswith("RunPod: ") and "below the minimum bid" in low.value.message


async def test_a_malformed_offer_id_is_refused_without_a_request(rp, fake):
    with pytest.raises(ProviderError) as err:
        await rp.create(request("RTX 4090"))
    assert "RunPod" in err.value.message and "not a RunPod offer id" in err.value.message
    assert fake.requests == []


# ------------------------------------------------------------------------- lifecycle, state

async def test_pods_walk_from_provisioning_to_running_with_utilisation_and_an_endpoint(rp, fake, clock):
    created = await rp.create(request("NVIDIA_GeForce_RTX_4090.secure.x2"))
    fake.set_gpu_util(created.provider_id, 40, 70)
    assert created.state is ProviderState.PROVISIONING and created.endpoint is None
    assert await walk(rp, created.provider_id, ProviderState.RUNNING) == [
        ProviderState.LOADING, ProviderState.LOADING, ProviderState.RUNNING]
    running = await rp.get(created.provider_id)
    assert running.gpu_util == 55.0 and running.num_gpus == 2 and running.gpu_name == "RTX 4090"
    assert running.endpoint == f"https://{created.provider_id}-8000.proxy.runpod.net"
    assert running.started_at == clock.now() - timedelta(seconds=20)        # uptimeInSeconds 20
    assert running.image == "vllm/vllm-openai:v0.6.3" and running.dph == running_rate(Decimal("1.38"))


async def test_a_public_tcp_mapping_is_the_endpoint_and_ssh_alone_is_none(rp, fake):
    public = fake.seed_pod(name="direct", ports="8000/tcp,22/tcp")
    ssh_only = fake.seed_pod(name="ssh-only", ports="22/tcp")
    got = await rp.get(public)
    mapping = fake._runtime(fake.pods[public])["ports"][0]
    assert mapping["isIpPublic"] and mapping["privatePort"] == 8000
    assert got.endpoint == f"http://{mapping['ip']}:{mapping['publicPort']}"
    assert (await rp.get(ssh_only)).endpoint is None


async def test_status_and_runtime_map_onto_gpuherd_states(rp, fake):
    labels = {
        "up": ("RUNNING", True), "booting": ("RUNNING", False), "stopping": ("EXITED", True),
        "stopped": ("EXITED", False), "gone": ("TERMINATED", False), "dead": ("DEAD", False),
        "odd": ("SOMETHING_NEW", False),
    }
    for label, (status, up) in labels.items():
        fake.seed_pod(name=label, status=status, up=up)
    states = {p.label: p.state for p in await rp.list()}
    assert states == {"up": ProviderState.RUNNING, "booting": ProviderState.LOADING,
                      "stopping": ProviderState.STOPPING, "stopped": ProviderState.STOPPED,
                      "gone": ProviderState.DESTROYED, "dead": ProviderState.ERROR,
                      "odd": ProviderState.UNKNOWN}


async def test_a_stopped_pod_reports_its_volume_cost(rp, fake):
    created = await rp.create(request(disk_gb=50))
    await walk(rp, created.provider_id, ProviderState.RUNNING)
    stopping = await rp.stop(created.provider_id)
    assert stopping.state is ProviderState.STOPPING
    assert "podStop(input: {podId: $podId})" in last_call(fake, "stop")["query"]
    assert await walk(rp, created.provider_id, ProviderState.STOPPED) == [ProviderState.STOPPING,
                                                                        ProviderState.STOPPED]
    stopped = await rp.get(created.provider_id)
    assert stopped.storage_dph == storage_hourly(Decimal("0.20"), 50) == Decimal("0.013699")
    assert stopped.dph == Decimal("0.69") and stopped.endpoint is None and stopped.gpu_util is None


async def test_on_demand_pods_resume_with_pod_resume(rp, fake):
    created = await rp.create(request())
    await walk(rp, created.provider_id, ProviderState.RUNNING)
    await rp.stop(created.provider_id)
    await walk(rp, created.provider_id, ProviderState.STOPPED)
    started = await rp.start(created.provider_id)
    body = last_call(fake, "start")
    assert "podResume(input: {podId: $podId, gpuCount: $gpuCount})" in body["query"]
    assert body["variables"] == {"podId": created.provider_id, "gpuCount": 1}
    assert started.state is ProviderState.STARTING
    await walk(rp, created.provider_id, ProviderState.RUNNING)


async def test_spot_pods_resume_with_a_bid_at_their_previous_price(rp, fake):
    created = await rp.create(request("NVIDIA_GeForce_RTX_4090.community.x2.spot"))
    await walk(rp, created.provider_id, ProviderState.RUNNING)
    await rp.stop(created.provider_id)
    await walk(rp, created.provider_id, ProviderState.STOPPED)
    started = await rp.start(created.provider_id)
    body = last_call(fake, "start")
    assert "podBidResume(input: {podId: $podId, bidPerGpu: $bidPerGpu, gpuCount: $gpuCount})" in body["query"]
    assert body["variables"] == {"podId": created.provider_id, "bidPerGpu": 0.2, "gpuCount": 2}
    assert started.state is ProviderState.STARTING and started.interruptible
    await walk(rp, created.provider_id, ProviderState.RUNNING)


async def test_a_spot_pod_without_a_known_price_resumes_above_either_clouds_floor(rp, fake):
    # a Secure Cloud spot pod (floor $0.50) whose cost RunPod shows as 0 while stopped: the
    # type's minimumBidPrice ($0.20, the Community floor) would be refused
    pod_id = fake.seed_pod(name="old-spot", status="EXITED", up=False, spot=True, cost_per_hr=0, gpu_count=1)
    started = await rp.start(pod_id)
    assert last_call(fake, "start")["variables"] == {"podId": pod_id, "bidPerGpu": 0.5, "gpuCount": 1}
    assert started.state is ProviderState.STARTING and started.dph == running(Decimal("0.5"))


async def test_unknown_pods_are_none_whether_null_or_an_error(rp, fake):
    assert await rp.get("zzzzzzzzzzzzzz") is None
    fake.missing_pod_error = True
    assert await rp.get("zzzzzzzzzzzzzz") is None


async def test_destroy_is_idempotent_but_believes_a_refusal_only_when_the_pod_is_gone(rp, fake):
    created = await rp.create(request())
    await rp.destroy(created.provider_id)
    assert "podTerminate(input: {podId: $podId})" in last_call(fake, "destroy")["query"]
    assert await rp.get(created.provider_id) is None
    await rp.destroy(created.provider_id)                     # "Pod not found." -> already gone

    kept = await rp.create(request(label="gh-kept"))
    fake.graphql_error("destroy", "Pod is locked by a running job.")
    with pytest.raises(ProviderError) as refused:
        await rp.destroy(kept.provider_id)
    assert "RunPod" in refused.value.message and "locked" in refused.value.message
    fake.forget(kept.provider_id)
    fake.graphql_error("destroy", "Cannot terminate this pod.")
    await rp.destroy(kept.provider_id)                        # refused, but gone: success


async def test_balance_is_read_from_myself(rp, fake):
    assert await rp.balance() == Decimal("123.45")
    assert "clientBalance" in last_call(fake, "balance")["query"]


# --------------------------------------------------------------------------------- errors

async def test_no_capacity_on_create_is_a_capacity_error_sent_once(rp, fake):
    fake.fault("create", "capacity")
    with pytest.raises(CapacityError) as err:
        await rp.create(request())
    assert err.value.message.startswith("RunPod: create 1x NVIDIA GeForce RTX 4090 (secure cloud, on-demand)")
    assert "no longer any instances available" in err.value.message
    assert len(fake.calls("create")) == 1

    fake.gpu_types[1]["lowestPrice"]["stockStatus"] = "None"     # sold out: the fake's own refusal
    with pytest.raises(CapacityError):
        await rp.create(request("NVIDIA_A100_80GB_PCIe.community.x1"))


async def test_a_resume_without_free_gpus_on_the_host_is_a_capacity_error(rp, fake):
    created = await rp.create(request())
    await rp.stop(created.provider_id)
    fake.fault("start", "capacity")
    with pytest.raises(CapacityError) as err:
        await rp.start(created.provider_id)
    assert "not enough free GPUs on the host machine" in err.value.message and "RunPod" in err.value.message
    assert "host" in (err.value.hint or "")


async def test_graphql_errors_are_typed(rp, fake):
    fake.graphql_error("list", SOMETHING_WRONG)
    assert isinstance(await rp.list(), list), "a passing 'try again' error inside a 200 is retried"
    assert len(fake.calls("list")) == 2
    fake.graphql_error("list", SOMETHING_WRONG, times=3)
    with pytest.raises(ProviderUnavailable) as generic:
        await rp.list()
    assert generic.value.retryable
    assert generic.value.message == f"RunPod: list pods failed: {SOMETHING_WRONG}"

    fake.graphql_error("search", "Field 'gpuTypes' is under maintenance.")
    with pytest.raises(ProviderError) as other:
        await rp.search()
    assert type(other.value) is ProviderError and not other.value.retryable
    assert "under maintenance" in other.value.message

    fake.graphql_error("list", "Unauthorized request, please check your API key.")
    with pytest.raises(AuthError):
        await rp.list()
    fake.graphql_error("get", "API key not found.")               # not "no such pod": get must not say None
    with pytest.raises(AuthError):
        await rp.get("abc")


async def test_rate_limits_are_waited_out_for_their_retry_after(rp, fake, sleeps):
    fake.fault("list", "rate_limit", retry_after=2)
    assert await rp.list() == []
    assert sleeps.waits == [2.0] and len(fake.calls("list")) == 2

    fake.fault("list", "rate_limit", retry_after=120)                 # longer than 60 s: give up
    with pytest.raises(RateLimited) as err:
        await rp.list()
    assert err.value.retry_after == 120 and len(fake.calls("list")) == 3 and sleeps.waits == [2.0]


async def test_a_create_is_not_repeated_after_a_server_error_but_a_read_is(rp, fake):
    for kind in ("bad_gateway", "server_error", "timeout"):
        fake.fault("create", kind, times=3, hang_s=0.8)
        before = len(fake.calls("create"))
        with pytest.raises((ProviderUnavailable, ProviderTimeout)) as err:
            await rp.create(request())
        assert "RunPod" in err.value.message and len(fake.calls("create")) == before + 1, kind
        fake.clear_faults()
    assert fake.pods == {}
    fake.fault("list", "bad_gateway")
    assert await rp.list() == [] and len(fake.calls("list")) == 2


async def test_a_create_whose_answer_is_lost_is_found_by_its_label(rp, fake):
    """The pod exists but the client never hears of it: a retryable timeout, not a second pod,
    and the label (the pod's name) finds it."""
    import time

    fake.after["create"] = lambda request: time.sleep(0.8)          # past the 0.5 s client timeout
    with pytest.raises(ProviderTimeout) as err:
        await rp.create(request(label="gh-lost-1"))
    assert err.value.retryable and len(fake.calls("create")) == 1 and len(fake.pods) == 1
    fake.after.clear()
    found = [p for p in await rp.list() if p.label == "gh-lost-1"]
    assert [p.provider_id for p in found] == list(fake.pods)


async def test_a_refused_key_is_an_auth_error(fake, clock):
    wrong = RunPodProvider("rp_wrong_key_000", base_url=fake.url, timeout_s=0.5, clock=clock)
    try:
        with pytest.raises(AuthError) as err:
            await wrong.search()
    finally:
        await wrong.aclose()
    assert "RunPod: the API key was refused (HTTP 401" in err.value.message
    assert "rp_wrong_key_000" not in err.value.message


async def test_invalid_documents_are_http_400_and_named(rp, fake):
    with pytest.raises(ProviderError) as err:
        await rp._gql("query { gpuTypes { id nope } }", what="probe")
    assert "HTTP 400" in err.value.message and 'Cannot query field "nope"' in err.value.message
    bad = [
        ("query Q($podId: String!) { pod(input: {podId: $podId}) { id } }", {"podId": 5}),   # wrong type
        ("query { pod(input: {podId: $podId}) { id } }", {"podId": "x"}),                     # undeclared
        ("query { pod(input: {podId: \"x\"}) { machine } }", None),                           # no sub-selection
        ("mutation M($i: PodFindAndDeployOnDemandInput!) { podFindAndDeployOnDemand(input: $i) { id } }",
         {"i": {"gpuTypeId": RTX, "gpuCount": 1, "imageName": "x", "labels": ["a"]}}),        # unknown input field
        ("query { gpuTypes { id ", None),                                                      # syntax
    ]
    async with httpx.AsyncClient(base_url=fake.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        for query, variables in bad:
            answer = await client.post("/graphql", json={"query": query, "variables": variables})
            assert answer.status_code == 400 and answer.json()["errors"][0]["message"], query


# ------------------------------------------------------------------------- configuration, key

async def test_from_settings_needs_a_key_and_follows_the_base_url(fake, monkeypatch):
    assert RunPodProvider.from_settings(Settings()) is None
    default = RunPodProvider.from_settings(Settings(runpod_api_key="x"))
    assert default is not None and default.base_url == "https://api.runpod.io"
    await default.aclose()
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    monkeypatch.setenv("RUNPOD_API_BASE_URL", fake.url)
    provider = RunPodProvider.from_settings(load_settings(), timeout_s=0.5)
    assert provider is not None and provider.base_url == fake.url
    try:
        assert await provider.search()
    finally:
        await provider.aclose()
    assert fake.calls("search")[0].headers["Authorization"] == f"Bearer {KEY}"


async def test_the_key_is_in_no_message_and_no_log_record(rp, fake, caplog):
    caplog.set_level(logging.DEBUG)
    failures: list[Exception] = []
    fake.graphql_error("list", f"Something went wrong with key {KEY}", times=3)
    fake.fault("search", "auth")
    fake.fault("get", "timeout", hang_s=0.8)
    fake.fault("stop", "rate_limit", retry_after=0.01)
    for call in (rp.list, rp.search, lambda: rp.get("abc"), lambda: rp.stop("missing-pod")):
        try:
            assert await call() is None                       # get: retried past the timeout
        except ProviderError as exc:
            failures.append(exc)
    assert [type(f).__name__ for f in failures] == ["ProviderUnavailable", "AuthError", "NotFoundAtProvider"]
    assert "***" in failures[0].message
    for exc in failures:
        assert exc.message.startswith("RunPod") and KEY not in exc.message and KEY not in str(exc)
    messages = [record.getMessage() for record in caplog.records]
    assert any("retrying" in m for m in messages), "the retries were logged"
    assert all(KEY not in m and KEY not in repr(r.args) for m, r in zip(messages, caplog.records, strict=True))


# ------------------------------------------------------------------------ schema cross-check

def _sdl() -> str:
    """The fake's schema subset as SDL, for a real GraphQL implementation to judge."""
    lines = ["scalar Void", "enum CloudTypeEnum { ALL SECURE COMMUNITY }"]
    for name, fields in INPUTS.items():
        lines.append(f"input {name} {{ " + " ".join(f"{k}: {v}" for k, v in fields.items()) + " }")
    for name, fields in OBJECTS.items():
        rendered = []
        for field_name, (type_, args) in fields.items():
            arg_text = "(" + ", ".join(f"{a}: {t}" for a, t in args.items()) + ")" if args else ""
            rendered.append(f"{field_name}{arg_text}: {type_}")
        lines.append(f"type {name} {{ " + " ".join(rendered) + " }")
    lines.append("schema { query: Query mutation: Mutation }")
    return "\n".join(lines)


def test_the_client_documents_validate_against_a_real_graphql_implementation():
    graphql = pytest.importorskip("graphql")
    schema = graphql.build_schema(_sdl())
    documents = {name: value for name, value in vars(rp_module).items()
                 if name.startswith(("Q_", "M_")) and isinstance(value, str)}
    assert len(documents) == 11
    for name, document in documents.items():
        errors = graphql.validate(schema, graphql.parse(document))
        assert errors == [], f"{name}: {errors}"
    spot_input = {"cloudType": "SECURE", "gpuTypeId": RTX, "gpuCount": 1, "name": "x", "imageName": "i",
                  "volumeInGb": 50, "containerDiskInGb": 20, "volumeMountPath": "/workspace",
                  "ports": "8000/http,22/tcp", "env": [{"key": "A", "value": "b"}], "bidPerGpu": 0.2}
    result = graphql.graphql_sync(schema, rp_module.M_RENT_SPOT, variable_values={"input": spot_input})
    assert result.errors is None


# ------------------------------------------------------------------- as the official clients ask

async def test_stock_is_asked_per_cloud_so_a_sold_out_cloud_offers_nothing(rp, fake):
    by_id = {o.offer_id: o for o in await rp.search()}
    a5000 = sorted(i for i in by_id if i.startswith("NVIDIA_RTX_A5000."))
    assert a5000 == ["NVIDIA_RTX_A5000.community.x1", "NVIDIA_RTX_A5000.community.x1.spot",
                     "NVIDIA_RTX_A5000.community.x2", "NVIDIA_RTX_A5000.community.x2.spot"]
    assert by_id["NVIDIA_RTX_A5000.community.x2"].extra["stock"] == "High"
    # the combined lowestPrice (what an unfiltered query returns) still says "High" for the type
    async with httpx.AsyncClient(base_url=fake.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        combined = await client.post("/graphql", json={"query": '{ gpuTypes(input: {id: "NVIDIA RTX A5000"}) '
                                                                 "{ lowestPrice(input: {gpuCount: 1}) { stockStatus } } }"})
    assert combined.json()["data"]["gpuTypes"][0]["lowestPrice"]["stockStatus"] == "High"
    assert await rp.get_offer("NVIDIA_RTX_A5000.secure.x1") is None
    with pytest.raises(CapacityError):                 # the fake refuses the sold-out cloud too
        await rp.create(request("NVIDIA_RTX_A5000.secure.x1"))
    created = await rp.create(request("NVIDIA_RTX_A5000.community.x2"))
    assert created.num_gpus == 2


async def test_community_pods_ask_for_a_public_ip_and_ssh_and_get_a_public_tcp_port(rp, fake):
    created = await rp.create(request("NVIDIA_GeForce_RTX_4090.community.x1", ports=[8000]))
    spec = last_call(fake, "create")["variables"]["input"]
    assert spec["supportPublicIp"] is True and spec["startSsh"] is True
    await walk(rp, created.provider_id, ProviderState.RUNNING)
    runtime = fake._pod_view(fake.pods[created.provider_id], observe=False)["runtime"]
    ssh = [p for p in runtime["ports"] if p["privatePort"] == 22]
    assert ssh and ssh[0]["isIpPublic"] is True
    # what the fake does to a community pod created without supportPublicIp (as gpuherd did)
    mutation = ("mutation M($i: PodFindAndDeployOnDemandInput!) { podFindAndDeployOnDemand(input: $i) "
                "{ id } }")
    spec = {k: v for k, v in spec.items() if k not in ("supportPublicIp", "startSsh")}
    async with httpx.AsyncClient(base_url=fake.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        answer = await client.post("/graphql", json={"query": mutation, "variables": {"i": spec}})
    bare_id = answer.json()["data"]["podFindAndDeployOnDemand"]["id"]
    await walk(rp, bare_id, ProviderState.RUNNING)
    bare = fake._pod_view(fake.pods[bare_id], observe=False)["runtime"]["ports"]
    assert not any(p["isIpPublic"] for p in bare if p["type"] == "tcp")


@pytest.mark.parametrize("pod_type", ["INTERRUPTABLE", "BID"])
async def test_bid_and_interruptable_pods_are_spot_and_resume_with_a_bid(rp, fake, pod_type):
    pod_id = fake.seed_pod(name="spot", status="EXITED", up=False, spot=True, cost_per_hr=0.5,
                           pod_type=pod_type)
    got = await rp.get(pod_id)
    assert got is not None and got.interruptible
    started = await rp.start(pod_id)                # podResume would be refused for a spot pod
    assert "podBidResume" in last_call(fake, "start")["query"] and fake.calls("start")[-1].body["variables"][
        "bidPerGpu"] == 0.5
    assert started.state is ProviderState.STARTING and started.interruptible


async def test_a_fake_renting_bid_pods_round_trips_through_stop_and_start(clock, sleeps):
    with FakeRunPod(api_key=KEY, spot_pod_type="BID") as fake:
        provider = RunPodProvider(KEY, base_url=fake.url, timeout_s=0.5, backoff_s=0.01, sleep=sleeps, clock=clock)
        try:
            created = await provider.create(request("NVIDIA_GeForce_RTX_4090.community.x1.spot"))
            assert fake.pods[created.provider_id]["podType"] == "BID" and created.interruptible
            await walk(provider, created.provider_id, ProviderState.RUNNING)
            await provider.stop(created.provider_id)
            await walk(provider, created.provider_id, ProviderState.STOPPED)
            await provider.start(created.provider_id)
        finally:
            await provider.aclose()
        assert [r.body["query"].split("(")[0] for r in fake.calls("start")] == ["mutation BidResume"]


async def test_spot_create_without_the_mutation_is_a_clear_400_and_on_demand_still_works(clock, sleeps):
    # podRentInterruptable has no current official source: if RunPod drops it, only spot breaks
    with FakeRunPod(api_key=KEY, spot_create=False) as fake:
        provider = RunPodProvider(KEY, base_url=fake.url, timeout_s=0.5, backoff_s=0.01, sleep=sleeps, clock=clock)
        try:
            with pytest.raises(ProviderError) as err:
                await provider.create(request("NVIDIA_GeForce_RTX_4090.community.x1.spot"))
            on_demand = await provider.create(request("NVIDIA_GeForce_RTX_4090.community.x1", label="gh-od"))
        finally:
            await provider.aclose()
    assert not isinstance(err.value, (CapacityError, AuthError))
    assert err.value.message.startswith("RunPod: ") and "HTTP 400" in err.value.message
    assert 'Cannot query field "podRentInterruptable"' in err.value.message
    creates = [r.body["query"] for r in fake.calls("create")]
    assert len(creates) == 2 and "podRentInterruptable" in creates[0], "the 400 was not retried"
    assert on_demand.label == "gh-od" and not on_demand.interruptible


@pytest.mark.parametrize("text", ["", "interruptible", "interruptible=any", "gpu=4090 num_gpus>=2",
                                  "dph<1 num_gpus=1", "gpu_ram>=48 interruptible=any", "provider=runpod a5000",
                                  "verified=any order=-dph limit=3"])
async def test_what_runpod_is_asked_never_drops_an_offer_the_query_keeps(rp, text):
    from gpuherd.core.query import parse_query

    query = parse_query(text)
    assert rp.search_key(query) == "", "nothing query-dependent is sent to RunPod"
    narrowed = query.apply(await rp.search(query))
    everything = query.apply(await rp.search())
    assert everything, "a query that keeps nothing would prove nothing"
    assert [o.offer_id for o in narrowed] == [o.offer_id for o in everything]
