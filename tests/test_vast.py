"""vast.ai beyond the conformance suite: the real client against FakeVast over loopback HTTP.
What vast.ai is sent (search bodies, create bodies, list paging), how its answers are read (units,
prices, states, ports), and how its failures are handled (retries, quota, create never
repeated, errors that name vast.ai and never the key)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from gpuherd.core.config import Settings
from gpuherd.core.errors import (
    AuthError,
    CapacityError,
    GpuherdError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from gpuherd.core.offers import SEARCH_DISK_GB, quote, storage_hourly
from gpuherd.core.providers.base import CreateRequest, ProviderState
from gpuherd.core.providers.vast import (
    SEARCH_LIMIT,
    VastProvider,
    _gpu_ram_terms,
    build_search_body,
    gpu_ram_gb,
    normalise_offers,
    vast_state,
)
from gpuherd.core.query import parse_query
from tests.fakes.loopback import Response
from tests.fakes.vast_fake import FakeVast, make_offers

KEY = "vk-7a1b2c3d4e5f60718293a4b5c6d7e8f9-secret"
DEFAULTS = {"verified": {"eq": True}, "external": {"eq": False}, "rentable": {"eq": True}}
TAIL = {"type": "on-demand", "limit": SEARCH_LIMIT, "allocated_storage": 50.0}
DEFAULT_ORDER = [["dph_total", "asc"], ["reliability", "desc"]]


class Sleeps:
    """An injected sleep that records what the client waited."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def fake() -> Iterator[FakeVast]:
    server = FakeVast(api_key=KEY).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def loopback() -> httpx.AsyncHTTPTransport:
    """Plain HTTP to 127.0.0.1: no TLS context to build (30 ms a client, most of a test)."""
    return httpx.AsyncHTTPTransport(verify=False)


@pytest.fixture
async def vast(fake: FakeVast, sleeps: Sleeps) -> AsyncIterator[VastProvider]:
    provider = VastProvider(KEY, base_url=fake.url, timeout_s=1.0, backoff_s=0.01, sleep=sleeps,
                            transport=loopback())
    try:
        yield provider
    finally:
        await provider.aclose()


def last_body(fake: FakeVast, op: str) -> Any:
    calls = fake.calls(op)
    assert calls, f"no {op} request reached the fake"
    return calls[-1].body


async def running_instance(vast: VastProvider, fake: FakeVast, **request: Any):
    offer = min(await vast.search(), key=lambda o: o.dph)
    fields = {"label": "gh-test", "image": "vllm/vllm-openai:v0.6.3", "args": ["--model", "m"],
              "ports": [8000], "disk_gb": 40, **request}
    created = await vast.create(CreateRequest(offer_id=offer.offer_id, **fields))
    for _ in range(10):
        got = await vast.get(created.provider_id)
        assert got is not None
        if got.state is ProviderState.RUNNING:
            return got, fake.instances[int(created.provider_id)]
    raise AssertionError("never ran")


# ------------------------------------------------------------------------ search requests

async def test_search_body_for_the_reference_cli_example(vast: VastProvider, fake: FakeVast):
    """reference §2.2 example 1 in our language: numbers as numbers, our units translated."""
    query = parse_query("gpu_ram>=16 num_gpus=1 reliability>0.98")
    await vast.search(query)
    body = last_body(fake, "search")
    expected = {**DEFAULTS, "gpu_ram": {"gte": 15872.0}, "num_gpus": {"eq": 1}, "reliability": {"gt": 0.98},
                "order": DEFAULT_ORDER, **TAIL}
    assert body == expected
    assert list(body) == list(expected), "key order as the CLI sends it: defaults, filters, controls"
    assert vast.search_key(query) == json.dumps(expected, separators=(",", ":"))
    assert fake.calls("search")[-1].headers.get("Content-Type", "").startswith("application/json")


@pytest.mark.parametrize(("text", "expected"), [
    # §2.2 example 3: a wildcard removes the default
    ("verified=any", {"external": {"eq": False}, "rentable": {"eq": True}, "order": DEFAULT_ORDER, **TAIL}),
    # §2.2 example 4: +dph,-reliability
    ("num_gpus=1 -o +dph,-reliability", {**DEFAULTS, "num_gpus": {"eq": 1}, "order": DEFAULT_ORDER, **TAIL}),
    ("-o -reliability", {**DEFAULTS, "order": [["reliability", "desc"], ["dph_total", "asc"]], **TAIL}),
    # sorting by something vast cannot sort by: fall back to cheapest first
    ("-o gpu_name", {**DEFAULTS, "order": [["dph_total", "asc"]], **TAIL}),
    ("verified=false cpu_ram>=64 disk_space>=100 cuda>=12.4",
     {"verified": {"eq": False}, "external": {"eq": False}, "rentable": {"eq": True},
      "cpu_ram": {"gte": 64000.0}, "disk_space": {"gte": 100.0}, "cuda_max_good": {"gte": 12.4},
      "order": DEFAULT_ORDER, **TAIL}),
    ("num_gpus in [1,2] gpu_ram>=24 gpu_ram>=48 dph<0.5",
     {**DEFAULTS, "num_gpus": {"in": [1, 2]}, "gpu_ram": {"gte": 48000.0}, "dph_total": {"lte": 0.555},
      "order": DEFAULT_ORDER, **TAIL}),
    ("offer_id=9000003", {**DEFAULTS, "id": {"eq": 9000003}, "order": DEFAULT_ORDER, **TAIL}),
])
def test_search_bodies(text: str, expected: dict[str, Any]):
    assert build_search_body(parse_query(text)) == expected


def test_gpu_place_and_total_memory_are_narrowed_server_side():
    """The filters main used to keep local (issue: `/gpu search h100` came back empty on the real
    market): model words become vast's exact spellings, countries go as codes, total memory in MB."""
    body = build_search_body(parse_query("4090 location=US gpu_total_ram>=48 num_gpus<=2"))
    assert body["gpu_name"] == {"in": ["RTX 4090", "RTX 4090 Ti"]}
    assert body["geolocation"] == {"eq": "US"}
    # round(MB/1024) x n >= 48 with n <= 2  =>  MB x n >= (48 - 1) x 1024; the CLI's 48000 is looser still
    assert body["gpu_total_ram"] == {"gte": 48000.0} and body["num_gpus"] == {"lte": 2}
    assert build_search_body(parse_query("gpu in a100,h100"))["gpu_name"] == {
        "in": ["A100 PCIE", "A100 SXM4", "A100 SXM", "A100X", "H100 PCIE", "H100 SXM", "H100 NVL"]}
    assert build_search_body(parse_query("gpu_name=A100_80GB"))["gpu_name"] == {
        "in": ["A100 PCIE", "A100 SXM4", "A100 SXM", "A100X", "A100 80GB"]}


def test_filters_that_could_drop_offers_are_not_sent():
    """Kept local: a place part (vast compares country codes only), per-GPU price, a model word
    vast's list has no spelling for, total memory upper bounds without a GPU count."""
    body = build_search_body(parse_query(
        "location=Oregon dph_per_gpu<1 gpu=mi300x gpu_total_ram<=48 gpu_ram!=24 cpu_ram!=64"))
    assert body == {**DEFAULTS, "order": DEFAULT_ORDER, **TAIL}


def test_negated_gpu_filters_drop_only_what_we_drop():
    """`gpu_name!=A100_80GB`: an "A100 SXM4" can be a 40 GB card we keep, so only the spellings
    that are always 80 GB go in vast's notin list."""
    body = build_search_body(parse_query("gpu_name!=A100_80GB gpu notin 4090 country notin [CN,VN]"))
    assert body["gpu_name"] == {"notin": ["A100 SXM", "A100X", "A100 80GB", "RTX 4090", "RTX 4090 Ti"]}
    assert body["geolocation"] == {"notin": ["CN", "VN"]}


def test_cli_fields_gpuherd_does_not_carry_are_sent_in_the_clis_units():
    body = build_search_body(parse_query(
        "duration>=3 driver_version>=535.86.05 datacenter compute_cap>=800 cpu_arch=arm64 external=true "
        "rentable=any cpu_cores_effective>=8"))
    assert body["duration"] == {"gte": 3 * 86400.0} and body["driver_version"] == {"gte": 535086005}
    assert body["datacenter"] == {"eq": True} and body["compute_cap"] == {"gte": 800}
    assert body["cpu_arch"] == {"eq": "arm64"} and body["external"] == {"eq": True} and "rentable" not in body
    assert body["cpu_cores_effective"] == {"gte": 8.0} and body["cpu_cores"] == {"gte": 8.0}
    minimal = build_search_body(parse_query("-n"))
    assert set(minimal) == {"order", "type", "limit", "allocated_storage"}, "-n drops every default, as the CLI's"


@pytest.mark.parametrize("op", ["gt", "gte", "lt", "lte", "eq"])
@pytest.mark.parametrize("value", [1, 16, 24, 47.5, 48, 80, 160, 640])
@pytest.mark.parametrize("cap", [None, 1, 2, 8])
def test_total_memory_bounds_keep_every_offer_shown_as_matching(op: str, value: float, cap: int | None):
    """round(MB/1024) x n op v (what we show) => the MB total passes the server terms, for any
    count the query allows."""
    import operator as o

    from gpuherd.core.providers.vast import _total_ram_terms
    cmp = {"gt": o.gt, "gte": o.ge, "lt": o.lt, "lte": o.le, "eq": o.eq}[op]
    terms = _total_ram_terms(op, value, float(cap) if cap else math.inf)
    assert terms or (op in ("lt", "lte") and cap is None), "sent whenever it can be"
    accept = {"gte": o.ge, "lte": o.le, "eq": o.eq}
    for n in range(1, (cap or 16) + 1):
        for mb in [*range(0, 200_000, 211), 24564, 24576, 46068, 81559, 81920, 143771]:
            if cmp(gpu_ram_gb(mb) * n, value):
                assert all(accept[t](mb * n, x) for t, x in terms), (mb, n, op, value, terms)


def test_gpu_name_matches_gpuherds_name_or_vasts_spelling():
    [a100] = normalise_offers([_raw(gpu_name="A100 SXM4", gpu_ram=81920)], fetched_at=None)
    assert a100.gpu_name == "A100 80GB" and a100.extra["gpu_name"] == "A100 SXM4"
    for text, hit in [("gpu_name=A100_SXM4", True), ("gpu_name=a100_80gb", True), ("gpu_name!=A100_SXM4", False),
                      ("gpu_name in [RTX_4090,A100_SXM4]", True), ("gpu_name notin [A100_80GB]", False),
                      ("gpu_name=A100_PCIE", False)]:
        assert parse_query(f"verified=any {text}").matches(a100) is hit, text


async def test_the_fake_applies_every_filter_the_cli_sends(vast: VastProvider, fake: FakeVast):
    """geolocation by country code, duration in seconds, datacenter as hosting_type, exact GPU
    spellings, total memory in MB: what vast.ai returns already satisfies them."""
    query = parse_query("location in [US,SE] duration>=30 datacenter gpu in 4090,h100 gpu_total_ram>=24 "
                        "driver_version>=550.54.15 verified=any")
    offers = await vast.search(query)
    assert offers and len(offers) < len(fake.catalogue) / 5
    for offer in offers:
        raw = fake.catalogue[int(offer.offer_id)]
        assert offer.country in ("US", "SE") and raw["duration"] >= 30 * 86400 and raw["hosting_type"] == 1
        assert raw["gpu_name"] in ("RTX 4090", "H100 SXM", "H100 PCIE") and raw["gpu_total_ram"] >= 24000
    everything = await vast.search(parse_query("verified=any"))
    assert len(everything) == len(fake.catalogue) - sum(bool(not o["rentable"] or o["external"]) for o in
                                                        fake.catalogue.values())
    # the fields gpuherd also checks itself: narrowed at vast then filtered == filtered here alone
    ours = parse_query("location in [US,SE] gpu in 4090,h100 gpu_total_ram>=24 verified=any")
    assert [o.ref for o in ours.apply(await vast.search(ours))] == [o.ref for o in ours.apply(everything)] != []
    assert build_search_body(query)["driver_version"] == {"gte": 550054015}


def test_cli_only_fields_keep_no_offer_of_other_providers():
    [offer] = normalise_offers([_raw()], fetched_at=None)
    query = parse_query("verified=any duration>1")
    assert query.matches(offer) and not query.matches(offer.model_copy(update={"provider": "runpod"}))


def test_interruptible_searches_bids_without_price_filters():
    body = build_search_body(parse_query("interruptible dph<0.3 num_gpus=1"))
    assert body["type"] == "bid"
    assert "dph_total" not in body and body["num_gpus"] == {"eq": 1}
    assert build_search_body(parse_query("interruptible=false"))["type"] == "on-demand"


def test_no_query_sends_only_what_the_official_client_always_sends():
    assert build_search_body(None) == {"external": {"eq": False}, "rentable": {"eq": True},
                                       "order": DEFAULT_ORDER, **TAIL}


NARROWING_QUERIES = [
    "gpu_ram>=24", "gpu_ram<=24", "gpu_ram=24", "gpu_ram>23.5", "gpu_ram<80", "gpu_ram!=24",
    "cpu_ram>=64.3", "cpu_ram<65.5", "cpu_ram=65.536", "dph<0.5", "dph>=1.2", "dph<=0.41",
    "num_gpus in [1,2]", "num_gpus!=1", "num_gpus notin [1]", "reliability>0.98", "reliability<=0.95",
    "disk_space>=200", "cuda>=12.4", "cuda=12.2", "inet_down>1000", "inet_up<500", "storage_cost<=0.2",
    "storage_cost>0.3", "verified=false", "verified=any", "cpu_cores>=16", "4090 24gb", "h100 x8",
    "a100 48gb <$2", "gpu_ram>=16 num_gpus=1 reliability>0.98 gpu_name=RTX_4090 dph<0.6",
    "interruptible dph<0.3", "interruptible gpu_ram>=24 num_gpus=1",
    "h100", "4090 3090", "a100 x2", "gpu=rtx_6000_ada", "gpu_name=A100_80GB", "gpu_name!=A100_80GB",
    "gpu_name=A100_SXM4", "gpu notin a100,h100", "gpu_name in [RTX_4090,H100_SXM]", "location=US",
    "location notin [CN,TW]", "country in [US,DE]", "location in [us,se]", "gpu_total_ram>=48",
    "gpu_total_ram>=100 num_gpus in [2,4]", "num_gpus<=2 gpu_total_ram<=48", "cpu_cores<=16", "cpu_cores>16",
    "cpu_cores=8", "offer_id notin [9000001,9000002]",
]


async def test_server_side_filters_never_drop_an_offer_the_query_keeps(vast: VastProvider):
    """Narrowed at vast.ai then filtered here == everything filtered here, for every kind of term."""
    everything = await vast._search(build_search_body(None))
    bid_body = build_search_body(None)
    bid_body["type"] = "bid"
    every_bid = await vast._search(bid_body)
    narrowed_somewhere = 0
    for text in NARROWING_QUERIES:
        query = parse_query(text)
        answer = await vast.search(query)
        reference = every_bid if "interruptible" in text else everything
        assert [o.ref for o in query.apply(answer)] == [o.ref for o in query.apply(reference)], text
        narrowed_somewhere += len(answer) < len(reference)
    assert narrowed_somewhere >= len(NARROWING_QUERIES) // 2, "most of these are narrowed server-side"


async def test_server_side_filters_do_narrow(vast: VastProvider, fake: FakeVast):
    everything = await vast.search(None)
    narrowed = await vast.search(parse_query("gpu_ram>=48 num_gpus=1 dph<1"))
    assert 0 < len(narrowed) < len(everything) / 2
    assert all(o.gpu_ram >= 48 and o.num_gpus == 1 for o in narrowed)


async def test_interruptible_offers_are_priced_by_their_minimum_bid(vast: VastProvider, fake: FakeVast):
    bids = await vast.search(parse_query("interruptible"))
    assert bids and all(o.interruptible for o in bids)
    base = fake.catalogue[int(bids[0].offer_id)]
    storage = Decimal(str(base["storage_cost"]))
    assert bids[0].dph == quote(Decimal(str(base["min_bid"])), storage)
    again = await vast.get_offer(bids[0].offer_id)
    assert again is not None and again.interruptible and last_body(fake, "search")["type"] == "bid"


async def test_get_offer_asks_for_one_id(vast: VastProvider, fake: FakeVast):
    offer = (await vast.search())[3]
    found = await vast.get_offer(offer.offer_id)
    assert found is not None and found.offer_id == offer.offer_id and found.dph == offer.dph
    assert last_body(fake, "search")["id"] == {"eq": int(offer.offer_id)}
    assert await vast.get_offer("not-a-vast-id") is None
    assert await vast.get_offer("123") is None


# ------------------------------------------------------------------------------- offers

def _raw(**fields: Any) -> dict[str, Any]:
    raw = make_offers(1, seed=3)[0]
    raw.update(fields)
    return raw


def test_units_of_a_normalised_offer():
    now = datetime(2026, 11, 10, 9, tzinfo=UTC)
    raw = _raw(id=123, gpu_name="RTX 4090", gpu_ram=24564, cpu_ram=65536, disk_space=250.5, num_gpus=2,
               dph_base=0.7, storage_cost=0.15, dph_total=0.71, geolocation="Oregon, US",
               verification="deverified", reliability=0.991, cuda_max_good=12.4, inet_down=812.5,
               cpu_cores_effective=16.0)
    [offer] = normalise_offers([raw], fetched_at=now)
    assert (offer.provider, offer.offer_id, offer.gpu_name, offer.num_gpus) == ("vast", "123", "RTX 4090", 2)
    assert offer.gpu_ram == 24.0 and offer.gpu_total_ram == 48.0
    assert offer.cpu_ram == pytest.approx(65.536) and offer.disk_space == 250.5 and offer.cpu_cores == 16.0
    assert offer.dph == quote(Decimal("0.7"), Decimal("0.15")) == Decimal("0.7") + storage_hourly(
        Decimal("0.15"), SEARCH_DISK_GB)
    assert offer.storage_cost == Decimal("0.15") and isinstance(offer.dph, Decimal)
    assert (offer.location, offer.country) == ("Oregon, US", "US")
    assert offer.verified is False and offer.reliability == 0.991 and offer.cuda == 12.4
    assert offer.inet_down == 812.5 and offer.fetched_at == now and offer.interruptible is False


@pytest.mark.parametrize(("mb", "gb"), [(24576, 24.0), (24564, 24.0), (81559, 80.0), (81920, 80.0),
                                        (49140, 48.0), (46068, 45.0), (143771, 140.0), (16384, 16.0),
                                        (12288, 12.0), (32607, 32.0)])
def test_gpu_ram_is_shown_in_whole_gb(mb: int, gb: float):
    assert gpu_ram_gb(mb) == gb
    [offer] = normalise_offers([_raw(gpu_ram=mb)], fetched_at=None)
    assert offer.gpu_ram == gb


@pytest.mark.parametrize("op", ["gt", "gte", "lt", "lte", "eq"])
@pytest.mark.parametrize("value", [0, 8, 15.5, 16, 23.99, 24, 24.5, 80, 141])
def test_gpu_ram_server_bounds_keep_every_card_shown_as_matching(op: str, value: float):
    import operator as o
    cmp = {"gt": o.gt, "gte": o.ge, "lt": o.lt, "lte": o.le, "eq": o.eq}[op]
    terms = _gpu_ram_terms(op, value)
    edges = {int(t) + d for _, t in terms for d in (-2, -1, 0, 1, 2)}
    for mb in sorted(set(range(0, 160_000, 97)) | edges):
        if cmp(gpu_ram_gb(mb), value):
            assert all(cmp2(mb, bound) for cmp2, bound in
                       (({"gte": o.ge, "lt": o.lt}[t_op], t) for t_op, t in terms)), (mb, op, value, terms)


def test_every_fake_offer_quotes_compute_plus_fifty_gb():
    raws = make_offers(500, seed=5)
    offers = normalise_offers(raws, fetched_at=None)
    assert len(offers) == len(raws)
    for raw, offer in zip(raws, offers, strict=True):
        assert offer.dph == quote(Decimal(str(raw["dph_base"])), Decimal(str(raw["storage_cost"])))
        assert offer.dph.as_tuple().exponent == -6


def test_odd_offers_are_read_forgivingly_or_skipped():
    good = _raw(id="77", num_gpus="2", dph_base="0.5", gpu_ram="24576", storage_cost=None,
                reliability=None, reliability2=0.97, geolocation=None, verification=None, verified=True)
    missing = {"id": 78, "num_gpus": 1, "dph_total": 0.31, "storage_total_cost": 0.01, "gpu_name": "RTX_3090"}
    skipped = [_raw(id=None), _raw(num_gpus=0), _raw(dph_base=float("nan")), _raw(dph_base=None, dph_total=None),
               "not an offer", _raw(id=True), _raw(dph_base=-1.0)]
    offers = normalise_offers([good, missing, *skipped], fetched_at=None)
    assert [o.offer_id for o in offers] == ["77", "78"]
    first, second = offers
    assert first.num_gpus == 2 and first.gpu_ram == 24.0 and first.dph == Decimal("0.5")
    assert first.reliability == 0.97 and first.verified is True and first.country == ""
    assert second.gpu_name == "RTX 3090" and second.dph == Decimal("0.300000")


# ------------------------------------------------------------------------------- create

async def test_create_body_for_a_vllm_server(vast: VastProvider, fake: FakeVast):
    offer = (await vast.search())[0]
    created = await vast.create(CreateRequest(
        offer_id=offer.offer_id, label="gh-1234", image="vllm/vllm-openai:v0.6.3",
        args=["--model", "Qwen/Qwen2.5-Coder-7B-Instruct", "--port", "8000"], env={"HF_TOKEN": "hf_x"},
        ports=[8000], disk_gb=50, onstart="nvidia-smi", health_port=8001, health_path="/health"))
    assert fake.calls("create")[-1].path == f"/api/v0/asks/{offer.offer_id}/"
    assert last_body(fake, "create") == {
        "client_id": "me", "image": "vllm/vllm-openai:v0.6.3",
        "env": {"HF_TOKEN": "hf_x", "-p 8000:8000": "1", "-p 8001:8001": "1"},
        "price": None, "disk": 50.0, "label": "gh-1234", "extra": None, "onstart": "nvidia-smi",
        "image_login": None, "python_utf8": False, "lang_utf8": False, "use_jupyter_lab": False,
        "jupyter_dir": None, "force": False, "cancel_unavail": True, "template_hash_id": None, "user": None,
        "runtype": "args", "args": ["--model", "Qwen/Qwen2.5-Coder-7B-Instruct", "--port", "8000"]}
    assert created.provider_id == str(min(fake.instances)) and created.label == "gh-1234"
    assert created.offer_id == offer.offer_id and created.state in (ProviderState.PROVISIONING,
                                                                   ProviderState.LOADING)


async def test_create_body_for_a_command_and_for_a_bid(vast: VastProvider, fake: FakeVast):
    first, second = (await vast.search())[:2]
    await vast.create(CreateRequest(offer_id=first.offer_id, label="gh-cmd", image="python:3.11",
                                    command="python -m http.server 8000", onstart="pip install x",
                                    ports=[8000]))
    body = last_body(fake, "create")
    assert body["runtype"] == "ssh" and "args" not in body
    assert body["onstart"] == "pip install x\npython -m http.server 8000"
    bid = fake.catalogue[int(second.offer_id)]["min_bid"] + 0.05
    created = await vast.create(CreateRequest(offer_id=second.offer_id, label="gh-bid", image="x/y:1",
                                              interruptible=True, bid_dph=Decimal(str(bid))))
    body = last_body(fake, "create")
    assert body["price"] == bid and body["cancel_unavail"] is False and body["runtype"] == "ssh"
    assert (await vast.get(created.provider_id)).interruptible is True  # type: ignore[union-attr]
    with pytest.raises(ProviderError, match="needs a bid"):
        await vast.create(CreateRequest(offer_id=second.offer_id, label="gh-nobid", image="x/y:1",
                                        interruptible=True))
    assert len(fake.calls("create")) == 2, "nothing was sent without a bid"


async def test_create_of_an_unknown_or_taken_offer_is_a_capacity_error(vast: VastProvider, fake: FakeVast):
    with pytest.raises(CapacityError, match=r"vast\.ai: offer 123 is no longer available"):
        await vast.create(CreateRequest(offer_id="123", label="gh-a", image="x/y:1"))
    assert fake.calls("create")[-1].path == "/api/v0/asks/123/"
    offer = (await vast.search())[0]
    await vast.create(CreateRequest(offer_id=offer.offer_id, label="gh-b", image="x/y:1"))
    with pytest.raises(CapacityError, match=f"offer {offer.offer_id} is no longer available"):
        await vast.create(CreateRequest(offer_id=offer.offer_id, label="gh-c", image="x/y:1"))
    with pytest.raises(CapacityError, match="not a vast.ai offer id"):
        await vast.create(CreateRequest(offer_id="sb-0001", label="gh-d", image="x/y:1"))


async def test_create_refusals_carry_vasts_message(vast: VastProvider, fake: FakeVast):
    offer = (await vast.search())[0]
    request = CreateRequest(offer_id=offer.offer_id, label="gh-e", image="x/y:1")
    with pytest.raises(ProviderError, match="Invalid args: disk must be at least 8 GB") as err:
        await vast.create(request.model_copy(update={"disk_gb": 4}))
    assert not isinstance(err.value, CapacityError) and err.value.message.startswith("vast.ai: ")
    fake.respond("create", Response(200, {"success": False, "error": "missing_billing",
                                          "msg": "Add a payment method first"}))
    with pytest.raises(ProviderError, match="Add a payment method first"):
        await vast.create(request)
    fake.respond("create", Response(200, {"success": False, "error": "no_such_ask", "msg": "gone"}))
    with pytest.raises(CapacityError):
        await vast.create(request)
    fake.respond("create", Response(200, {"success": True}))
    with pytest.raises(ProviderError, match="names no new instance"):
        await vast.create(request)
    assert fake.instances == {}, "none of these rented anything"


@pytest.mark.parametrize("kind", ["server_error", "bad_gateway", "timeout", "rate_limit_then_ok"])
async def test_create_is_never_repeated_after_it_may_have_reached_vast(vast: VastProvider, fake: FakeVast,
                                                                        sleeps: Sleeps, kind: str):
    offer = (await vast.search())[0]
    request = CreateRequest(offer_id=offer.offer_id, label="gh-once", image="x/y:1")
    if kind == "rate_limit_then_ok":     # a 429 was certainly not acted on: that one is retried
        fake.fault("create", "rate_limit", retry_after=0.5)
        created = await vast.create(request)
        assert created.label == "gh-once" and len(fake.calls("create")) == 2 and sleeps.waits == [0.5]
        return
    if kind == "server_error":
        fake.respond("create", Response(503, {"detail": "Service Unavailable"}), times=3)
    else:
        fake.fault("create", kind, times=3, hang_s=2.5)   # past the fixture's 1 s timeout
    expected = ProviderTimeout if kind == "timeout" else ProviderUnavailable
    with pytest.raises(expected) as err:
        await vast.create(request)
    assert "vast.ai" in err.value.message
    assert len(fake.calls("create")) == 1, "exactly one PUT /asks/"


# ----------------------------------------------------------------------------- retries

async def test_retry_after_is_honoured(vast: VastProvider, fake: FakeVast, sleeps: Sleeps):
    fake.fault("list", "rate_limit", times=2, retry_after=2)
    assert await vast.list() == []
    assert sleeps.waits == [2.0, 2.0] and len(fake.calls("list")) == 3


async def test_retry_after_over_a_minute_is_not_waited(vast: VastProvider, fake: FakeVast, sleeps: Sleeps):
    fake.fault("list", "rate_limit", retry_after=120)
    with pytest.raises(RateLimited) as err:
        await vast.list()
    assert err.value.retry_after == 120 and "vast.ai" in err.value.message
    assert sleeps.waits == [] and len(fake.calls("list")) == 1


async def test_rate_limit_without_retry_after_backs_off_then_gives_up(vast: VastProvider, fake: FakeVast,
                                                                       sleeps: Sleeps):
    fake.fault("get", "rate_limit", times=3)
    with pytest.raises(RateLimited):
        await vast.get("20000001")
    assert len(sleeps.waits) == 2 and len(fake.calls("get")) == 3
    assert 0.005 <= sleeps.waits[0] <= 0.015 and sleeps.waits[1] >= 0.0075  # 0.01 then x1.5, +-50 % jitter


async def test_search_quota_is_not_retried_and_says_when_it_resets(vast: VastProvider, fake: FakeVast,
                                                                    sleeps: Sleeps):
    reset = datetime(2026, 11, 11, 0, 0, tzinfo=UTC).timestamp()
    fake.quota_exceeded(reset=reset)
    with pytest.raises(ProviderError) as err:
        await vast.search()
    assert not isinstance(err.value, RateLimited) and not err.value.retryable
    assert "daily search quota" in err.value.message and "2026-11-11 00:00 UTC" in err.value.message
    assert err.value.message.startswith("vast.ai: ")
    assert len(fake.calls("search")) == 1 and sleeps.waits == []
    fake.quota_exceeded()
    with pytest.raises(ProviderError, match="midnight UTC"):
        await vast.search()


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_gateway_errors_are_retried_then_succeed(vast: VastProvider, fake: FakeVast, sleeps: Sleeps,
                                                       status: int):
    fake.respond("search", Response(status, "<html>busy</html>", content_type="text/html"), times=2)
    offers = await vast.search()
    assert offers and len(fake.calls("search")) == 3 and len(sleeps.waits) == 2


async def test_server_error_500_is_not_retried(vast: VastProvider, fake: FakeVast, sleeps: Sleeps):
    fake.fault("search", "server_error", times=3)
    with pytest.raises(ProviderUnavailable, match="vast.ai"):
        await vast.search()
    assert len(fake.calls("search")) == 1 and sleeps.waits == []


# ---------------------------------------------------------------------- list and states

async def test_list_follows_next_token_across_pages(vast: VastProvider, fake: FakeVast):
    ids = fake.seed_instances(60)
    listed = await vast.list()
    assert [int(p.provider_id) for p in listed] == ids
    assert {p.label for p in listed} == {f"seeded-{i}" for i in range(60)}
    calls = fake.calls("list")
    assert len(calls) == 3, "25 + 25 + 10"
    first = calls[0].query
    assert json.loads(first["select_filters"]) == {}
    assert json.loads(first["order_by"]) == [{"col": "id", "dir": "asc"}]
    assert json.loads(first["limit"]) == 25 and "after_token" not in first
    tokens = [c.query.get("after_token") for c in calls[1:]]
    assert all(tokens) and len(set(tokens)) == 2


async def test_list_stops_when_the_token_repeats(vast: VastProvider, fake: FakeVast):
    page = {"success": True, "instances": [], "next_token": "same"}
    fake.respond("list", Response(200, page), times=3)
    with pytest.raises(ProviderError, match="pages repeat"):
        await vast.list()


STATE_TABLE = [
    (None, "running", None, ProviderState.PROVISIONING),
    ("created", "running", "running", ProviderState.PROVISIONING),
    ("scheduling", "running", "running", ProviderState.PROVISIONING),
    (None, "stopped", "stopped", ProviderState.STOPPED),
    ("loading", "running", "running", ProviderState.LOADING),
    ("loading", "stopped", "stopped", ProviderState.STOPPING),
    ("running", "running", "running", ProviderState.RUNNING),
    ("running", "stopped", "stopped", ProviderState.STOPPING),
    ("running", "frozen", "running", ProviderState.RUNNING),
    ("stopped", "stopped", "stopped", ProviderState.STOPPED),
    ("stopped", "running", "running", ProviderState.STARTING),
    ("rebooting", "running", "running", ProviderState.STARTING),
    ("frozen", "frozen", "running", ProviderState.RUNNING),
    ("frozen", "stopped", "stopped", ProviderState.STOPPING),
    ("exited", "running", "running", ProviderState.ERROR),
    ("exited", "stopped", "stopped", ProviderState.STOPPED),
    ("unknown", "running", "running", ProviderState.UNKNOWN),
    ("offline", "running", "running", ProviderState.UNKNOWN),
    ("destroyed", None, None, ProviderState.DESTROYED),
    ("stopped", "stopped", "unloaded", ProviderState.DESTROYED),
    ("mystery", "running", "running", ProviderState.UNKNOWN),
]


@pytest.mark.parametrize(("actual", "intended", "cur", "expected"), STATE_TABLE)
def test_state_mapping(actual: str | None, intended: str | None, cur: str | None, expected: ProviderState):
    state, note = vast_state(actual, intended, cur)
    assert state is expected
    if expected in (ProviderState.ERROR, ProviderState.UNKNOWN):
        assert note, "a failure state always says why"


async def test_states_read_through_the_api(vast: VastProvider, fake: FakeVast):
    running, _ = await running_instance(vast, fake)
    pid = running.provider_id
    fake.set_instance(pid, actual_status="exited", status_msg="Error: OOM")
    failed = await vast.get(pid)
    assert failed is not None and failed.state is ProviderState.ERROR
    assert "exited" in (failed.message or "") and "OOM" in (failed.message or "")
    assert failed.endpoint is None and failed.gpu_util is None
    fake.set_instance(pid, actual_status="frozen", intended_status="frozen")
    frozen = await vast.get(pid)
    assert frozen is not None and frozen.state is ProviderState.RUNNING and frozen.healthy is False
    assert frozen.endpoint is None and "frozen" in (frozen.message or "")
    assert await vast.health(frozen, "/health", 8000) is False


async def test_running_instance_reports_util_endpoint_and_prices(vast: VastProvider, fake: FakeVast):
    running, record = await running_instance(vast, fake)
    host_port = record["ports"]["8000/tcp"][0]["HostPort"]
    assert running.endpoint == f"http://{record['public_ipaddr']}:{host_port}"
    assert running.gpu_util == 37.5
    assert running.label == "gh-test" and running.image == "vllm/vllm-openai:v0.6.3"
    assert running.gpu_name and running.num_gpus == record["num_gpus"]
    assert running.started_at == datetime.fromtimestamp(record["start_date"], UTC)
    storage = Decimal(str(record["storage_total_cost"]))
    assert running.storage_dph == storage > 0
    assert running.dph == Decimal(str(record["dph_base"])) + storage == Decimal(str(record["dph_total"]))
    assert (running.message or "").startswith("success, running")


async def test_stopped_instance_keeps_billing_storage(vast: VastProvider, fake: FakeVast):
    running, record = await running_instance(vast, fake)
    stopping = await vast.stop(running.provider_id)
    assert last_body(fake, "stop") == {"state": "stopped"}
    assert stopping.state in (ProviderState.STOPPING, ProviderState.STOPPED)
    stopped = await vast.get(running.provider_id)
    assert stopped is not None and stopped.state is ProviderState.STOPPED
    assert record["instance"]["gpuCostPerHour"] == 0, "the fake bills no GPU while stopped"
    assert stopped.storage_dph == Decimal(str(record["instance"]["diskHour"])) > 0
    assert stopped.storage_dph == running.storage_dph and stopped.dph == running.dph
    assert stopped.endpoint is None and stopped.gpu_util is None
    started = await vast.start(running.provider_id)
    assert last_body(fake, "start") == {"state": "running"}
    assert started.state in (ProviderState.STARTING, ProviderState.LOADING, ProviderState.RUNNING)


async def test_storage_rate_without_storage_total_cost():
    provider = VastProvider(KEY, base_url="http://127.0.0.1:9", transport=loopback())
    try:
        inst = provider._instance({"id": 5, "actual_status": "stopped", "intended_status": "stopped",
                                   "storage_cost": 0.2, "disk_space": 100, "dph_base": 0.5,
                                   "gpu_util": 0.5, "gpu_name": "RTX_4090"})
    finally:
        await provider.aclose()
    assert inst.storage_dph == storage_hourly(Decimal("0.2"), 100) == Decimal("0.027397")
    assert inst.dph == Decimal("0.527397") and inst.gpu_name == "RTX 4090" and inst.gpu_util is None


async def test_unknown_and_destroyed_machines(vast: VastProvider, fake: FakeVast):
    assert await vast.get("99999999") is None
    assert fake.calls("get")[-1].query == {"owner": "me"}
    fake.respond("get", Response(404, {"success": False, "error": "no_such_instance", "msg": "not found"}))
    assert await vast.get("20000001") is None
    await vast.destroy("99999999")                 # 404 no_such_instance: already gone is fine
    fake.respond("destroy", Response(200, {"success": False, "error": "no_such_instance", "msg": "gone"}))
    await vast.destroy("20000002")
    running, _ = await running_instance(vast, fake)
    await vast.destroy(running.provider_id)
    assert fake.calls("destroy")[-1].body == {}
    assert await vast.get(running.provider_id) is None
    with pytest.raises(ProviderError, match="no longer knows it"):
        await vast.start(running.provider_id)


async def test_manage_refusal_on_http_200_is_an_error(vast: VastProvider, fake: FakeVast):
    running, _ = await running_instance(vast, fake)
    fake.respond("stop", Response(200, {"success": False, "error": "missing_billing",
                                        "msg": "Your account lacks credit"}))
    with pytest.raises(ProviderError, match="Your account lacks credit"):
        await vast.stop(running.provider_id)


async def test_balance_is_the_account_credit(vast: VastProvider, fake: FakeVast):
    assert await vast.balance() == Decimal("25")
    assert fake.calls("user")[-1].path == "/api/v0/users/current" and fake.calls("user")[-1].query == {}
    fake.user = {"balance": 3.5}
    assert await vast.balance() == Decimal("3.5")


# ------------------------------------------------------------------------ keys and config

async def test_the_key_never_appears_in_errors_urls_or_logs(fake: FakeVast, caplog: pytest.LogCaptureFixture,
                                                            sleeps: Sleeps):
    caplog.set_level(logging.DEBUG)
    wrong = VastProvider("wrong-" + KEY, base_url=fake.url, timeout_s=0.3, backoff_s=0.01, sleep=sleeps,
                         transport=loopback())
    right = VastProvider(KEY, base_url=fake.url, timeout_s=0.3, backoff_s=0.01, sleep=sleeps,
                         transport=loopback())
    messages: list[str] = []
    try:
        with pytest.raises(AuthError) as err:
            await wrong.list()
        assert "refused" in err.value.message and "vast.ai" in err.value.message
        messages.append(str(err.value))
        fake.respond("search", Response(400, {"success": False, "error": "invalid_args",
                                              "msg": f"bad key {KEY} in query"}))
        fake.fault("list", "rate_limit", times=3)
        fake.fault("get", "server_error")
        for call in (right.search, right.list, lambda: right.get("20000001")):
            try:
                await call()
            except GpuherdError as exc:
                messages.append(str(exc))
                messages.append(exc.message)
    finally:
        await wrong.aclose()
        await right.aclose()
    assert len(messages) == 7
    assert any("***" in m for m in messages), "an echoed key is scrubbed, not dropped silently"
    for text in messages:
        assert KEY not in text and "vast.ai" in text
    for record in caplog.records:
        assert KEY not in record.getMessage()
    for request in fake.requests:
        assert "api_key" not in request.query and KEY not in request.path
    assert {r.headers.get("Authorization") or r.headers.get("authorization") for r in fake.requests
            if "wrong" not in str(r.headers)} == {f"Bearer {KEY}"}


async def test_vast_url_and_key_come_from_the_official_variables(fake: FakeVast,
                                                                 monkeypatch: pytest.MonkeyPatch):
    assert VastProvider.from_settings(Settings()) is None
    monkeypatch.setenv("VAST_API_KEY", KEY)
    monkeypatch.setenv("VAST_URL", fake.url + "/api/v0/")
    provider = VastProvider.from_settings(Settings())
    assert provider is not None and provider.base_url == fake.url
    try:
        offers = await provider.search(parse_query("num_gpus=1"))
    finally:
        await provider.aclose()
    assert offers and fake.calls("search")[-1].path == "/api/v0/bundles/"
    assert KEY not in repr(provider.__dict__)   # the key lives only in the HTTP client's headers
