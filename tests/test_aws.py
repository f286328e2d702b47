"""AWS EC2: offers from moto's instance-type data, prices from the Pricing API (botocore Stubber,
moto has none) or the shipped table, spot where asked, launches checked through moto over HTTP,
errors mapped to typed gpuherd errors, and the settings that decide whether AWS is configured."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import socket
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from botocore.stub import ANY, Stubber

from gpuherd.core.clock import VirtualClock
from gpuherd.core.config import Settings
from gpuherd.core.errors import (
    AuthError,
    CapacityError,
    ConfigError,
    GpuherdError,
    ProviderError,
    ProviderStateError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from gpuherd.core.offers import quote, storage_hourly
from gpuherd.core.providers import aws as aws_module
from gpuherd.core.providers.aws import (
    AwsProvider,
    PriceTable,
    gpu_memory_gb,
    gpu_name_for,
    offer_id_for,
    parse_offer_id,
    parse_price_list,
    user_data,
    wants_spot,
)
from gpuherd.core.providers.base import CreateRequest, ProviderInstance, ProviderState
from gpuherd.core.query import parse_query
from tests.fakes.aws_moto import (
    MOTO_AMI,
    REGION,
    SECRET_KEY,
    Answer,
    MotoProxy,
    clean_moto,
    ec2_error,
    moto_url,
    price_list_item,
    quick_retries,
    session,
    set_dummy_credentials,
)
from tests.fakes.loopback import LoopbackServer, Response

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
EBS = Decimal("0.08")
TABLE_DATE = "2025-07-01"
PRICING_FILTERS = [{"Type": "TERM_MATCH", "Field": f, "Value": v} for f, v in (
    ("regionCode", REGION), ("instanceFamily", "GPU instance"), ("operatingSystem", "Linux"),
    ("tenancy", "Shared"), ("preInstalledSw", "NA"), ("capacitystatus", "Used"), ("marketoption", "OnDemand"))]


@pytest.fixture(autouse=True)
def _fast_retries():
    with quick_retries():
        yield


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(T0)


@pytest.fixture
def proxy():
    upstream = moto_url()
    clean_moto(upstream)
    server = MotoProxy(upstream).start()
    yield server
    server.stop()


def build(proxy: MotoProxy, clock: VirtualClock, **kw) -> AwsProvider:
    options = dict(regions=[REGION], ami=MOTO_AMI, session=session(), endpoint_url=proxy.url, timeout_s=2.0,
                   connect_timeout_s=2.0, max_attempts=2, clock=clock)
    options.update(kw)
    return AwsProvider(**options)


@pytest.fixture
async def provider(proxy, clock):
    p = build(proxy, clock)
    yield p
    await p.aclose()


_catalogue: dict = {}


async def prime(provider: AwsProvider) -> None:
    """Give a fresh provider the GPU type list the first one fetched (moto's is ~0.3 s to fetch),
    for tests about machines rather than offers. Test-only reach into the provider's cache."""
    if not _catalogue:
        _catalogue.update(await provider._gpu_types(REGION))
    provider._cache[REGION].types = aws_module._Cached(dict(_catalogue), provider.clock.now())


def ec2(region: str = REGION):
    """A plain boto3 client straight at moto, to check what the provider did."""
    return session().client("ec2", region_name=region, endpoint_url=moto_url())


def by_id(offers):
    return {o.offer_id: o for o in offers}


def req(offer_id: str = "g5.xlarge@us-east-1", label: str = "gh-test-1", **kw) -> CreateRequest:
    fields = dict(image="vllm/vllm-openai:v0.6.3", ports=[8000], env={"HF_TOKEN": "hf_secret_value"},
                  args=["--model", "Qwen/Qwen2.5-Coder-7B-Instruct"], disk_gb=50, onstart="echo ready")
    fields.update(kw)
    return CreateRequest(offer_id=offer_id, label=label, **fields)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ offers

async def test_gpu_types_come_from_describe_instance_types(provider):
    offers = by_id(await provider.search())
    g5 = offers["g5.xlarge@us-east-1"]
    assert (g5.gpu_name, g5.num_gpus, g5.gpu_ram) == ("A10G", 1, 24.0)   # 22888 MiB is the 24 GB card
    assert (g5.cpu_cores, g5.cpu_ram) == (4, 16.0)
    assert g5.location == "Virginia, US, us-east-1" and g5.country == "US"
    assert g5.storage_cost == EBS and g5.reliability == 1.0 and not g5.interruptible and g5.verified
    assert g5.extra["instance_type"] == "g5.xlarge" and g5.extra["market"] == "on-demand"
    assert (offers["g4dn.xlarge@us-east-1"].gpu_name, offers["g4dn.xlarge@us-east-1"].gpu_ram) == ("T4", 16.0)
    assert (offers["g6e.xlarge@us-east-1"].gpu_name, offers["g6e.xlarge@us-east-1"].gpu_ram) == ("L40S", 48.0)
    p4de, p4d = offers["p4de.24xlarge@us-east-1"], offers["p4d.24xlarge@us-east-1"]
    assert (p4de.gpu_name, p4de.num_gpus, p4de.gpu_ram) == ("A100 80GB", 8, 80.0)
    assert (p4d.gpu_name, p4d.gpu_ram) == ("A100 40GB", 40.0)
    assert offers["p5.48xlarge@us-east-1"].gpu_name == "H100 SXM"
    assert offers["p3dn.24xlarge@us-east-1"].gpu_name == "V100 32GB"
    assert not [o for o in offers if o.startswith(("g6f.", "g5g.", "g4ad."))], \
        "GPU slices, arm64 and AMD types are not offered"
    assert all(not o.interruptible for o in offers.values()), "spot is opt-in"


def test_gpu_memory_and_names_follow_the_data_sheet():
    assert [gpu_memory_gb(m) for m in (16384, 22888, 45776, 40960, 81920, 144384)] == [16, 24, 48, 40, 80, 141]
    assert gpu_name_for("A100", "NVIDIA", 80) == "A100 80GB"
    assert gpu_name_for("A100", "NVIDIA", 40) == "A100 40GB"
    assert gpu_name_for("H100", "NVIDIA", 80) == "H100 SXM"
    assert gpu_name_for("T4g", "NVIDIA", 16) == "T4"
    assert gpu_name_for("L4", "NVIDIA", 24) == "L4"


async def test_types_are_limited_to_what_each_region_offers(proxy, clock):
    p = build(proxy, clock, regions=[REGION, "eu-west-1"])
    try:
        offers = by_id(await p.search())
    finally:
        await p.aclose()
    assert "p5.48xlarge@us-east-1" in offers and "p5.48xlarge@eu-west-1" not in offers
    ireland = offers["g5.xlarge@eu-west-1"]
    assert ireland.country == "IE" and "eu-west-1" in ireland.location
    # the shipped table is a us-east-1 list: an offer elsewhere says so
    assert ireland.price_source == f"gpuherd price table of {TABLE_DATE} (us-east-1 list price)"


async def test_offer_ids_round_trip(provider):
    offers = await provider.search()
    assert offers and all(not re.search(r"\s", o.offer_id) for o in offers)
    g5 = await provider.get_offer("g5.xlarge@us-east-1")
    assert g5 is not None and g5.gpu_name == "A10G"
    assert await provider.get_offer("g5.xlarge@eu-west-1") is None      # region not configured
    assert await provider.get_offer("not-an-offer") is None
    assert parse_offer_id(offer_id_for("p4de.24xlarge", "us-west-2", spot=True)) == ("p4de.24xlarge", "us-west-2", True)
    with pytest.raises(ProviderError, match="AWS EC2"):
        parse_offer_id("g5.xlarge")


# ------------------------------------------------------------------------------ prices

async def test_pricing_api_price_is_exact_and_cached(provider, clock, monkeypatch):
    calls: list[str] = []
    real = provider.pricing_client.get_products

    def counted(**kw):          # every call, also one the stub would refuse
        calls.append("GetProducts")
        return real(**kw)

    monkeypatch.setattr(provider.pricing_client, "get_products", counted)
    stub = Stubber(provider.pricing_client)
    expected = {"ServiceCode": "AmazonEC2", "Filters": PRICING_FILTERS, "FormatVersion": "aws_v1"}
    stub.add_response("get_products", {"FormatVersion": "aws_v1", "PriceList": [
        price_list_item("g5.xlarge", "5.6400000000", market="CapacityBlock"),   # first, and not $0
        price_list_item("g5.xlarge", "1.0060000000"), price_list_item("g4dn.xlarge", "0.5260000000")]},
        expected)
    with stub:
        first = by_id(await provider.search())
        stub.assert_no_pending_responses()
        g5 = first["g5.xlarge@us-east-1"]
        assert g5.dph == Decimal("1.011479") == quote(Decimal("1.006"), EBS)   # compute + 50 GB of gp3
        assert g5.price_source == "AWS Pricing API" and g5.priced_at == T0
        assert first["g6.xlarge@us-east-1"].price_source == f"gpuherd price table of {TABLE_DATE}"

        clock.advance(timedelta(hours=3))
        again = by_id(await provider.search())
        assert calls == ["GetProducts"], "the second search uses the cached prices"
        g5 = again["g5.xlarge@us-east-1"]
        assert g5.price_source == "AWS Pricing API" and g5.dph == Decimal("1.011479")
        assert g5.fetched_at == T0 + timedelta(hours=3) and g5.price_time == T0, "the price shows its age"

        clock.advance(timedelta(hours=22))          # a day after the fetch: asked again
        stub.add_response("get_products", {"FormatVersion": "aws_v1",
                                           "PriceList": [price_list_item("g5.xlarge", "0.9000000000")]}, expected)
        later = by_id(await provider.search())
        stub.assert_no_pending_responses()
    assert calls == ["GetProducts"] * 2
    assert later["g5.xlarge@us-east-1"].dph == quote(Decimal("0.9"), EBS)
    assert later["g5.xlarge@us-east-1"].priced_at == T0 + timedelta(hours=25)


def test_price_list_parsing_reads_on_demand_hours_only():
    prices = parse_price_list([price_list_item("p5.48xlarge", "31.4640000000", market="CapacityBlock"),
                               price_list_item("g5.xlarge", "1.0060000000"), "{not json",
                               price_list_item("g6.xlarge", "0.0000000000"),
                               price_list_item("p5.48xlarge", "55.0400000000")])
    # the Reserved term's 0.01 is not read, nor the Capacity Block SKU listed before the on-demand one
    assert prices == {"g5.xlarge": Decimal("1.0060000000"), "p5.48xlarge": Decimal("55.0400000000")}


async def test_pricing_filter_asks_for_on_demand_only_so_capacity_blocks_never_price_an_offer(proxy, clock):
    pricing = MotoProxy(moto_url()).start()
    pricing.prices[(REGION, "g5.xlarge")] = "1.1000000000"
    pricing.capacity_block_prices[(REGION, "g5.xlarge")] = "6.2500000000"     # a real, non-zero SKU
    p = build(proxy, clock, pricing_endpoint_url=pricing.url)
    try:
        offers = by_id(await p.search())
        sent = {f["Field"]: f["Value"] for f in pricing.pricing_filters}
        # what a client without the marketoption filter gets from the same data: both SKUs
        old = [f for f in pricing.pricing_filters if f["Field"] != "marketoption"]
        both = p.pricing_client.get_products(ServiceCode="AmazonEC2", Filters=old, FormatVersion="aws_v1")
    finally:
        await p.aclose()
        pricing.stop()
    assert sent["marketoption"] == "OnDemand" and sent["capacitystatus"] == "Used"
    g5 = offers["g5.xlarge@us-east-1"]
    assert g5.price_source == "AWS Pricing API" and g5.dph == quote(Decimal("1.1"), EBS)
    markets = [json.loads(i)["product"]["attributes"]["marketoption"] for i in both["PriceList"]]
    assert markets == ["CapacityBlock", "OnDemand"], "the fake filters server-side as AWS does"


async def test_unreachable_pricing_api_falls_back_to_the_table(proxy, clock, caplog):
    p = build(proxy, clock, pricing_endpoint_url=f"http://127.0.0.1:{closed_port()}")
    try:
        with caplog.at_level(logging.WARNING, logger="gpuherd.core.providers.aws"):
            offers = by_id(await p.search())
    finally:
        await p.aclose()
    g5 = offers["g5.xlarge@us-east-1"]
    assert g5.dph == quote(Decimal("1.006"), EBS)
    assert g5.price_source == f"gpuherd price table of {TABLE_DATE}"
    assert g5.priced_at == datetime(2025, 7, 1, tzinfo=UTC) and g5.price_time == g5.priced_at
    assert any("Pricing API" in r.getMessage() for r in caplog.records)


async def test_failed_pricing_api_is_asked_again_only_after_a_while(proxy, clock):
    pricing = MotoProxy(moto_url()).start()
    pricing.prices[(REGION, "g5.xlarge")] = "1.1000000000"
    p = build(proxy, clock, pricing_endpoint_url=pricing.url)
    try:
        pricing.fault("search", "server_error", times=2)         # both botocore attempts
        first = by_id(await p.search())
        assert first["g5.xlarge@us-east-1"].price_source.startswith("gpuherd price table")
        assert len(pricing.actions()) == 2
        clock.advance(timedelta(minutes=5))
        await p.search()
        assert len(pricing.actions()) == 2, "the table serves for a while instead of asking again"
        clock.advance(timedelta(minutes=11))
        later = by_id(await p.search())
        assert pricing.actions() == ["GetProducts"] * 3
        assert later["g5.xlarge@us-east-1"].price_source == "AWS Pricing API"
        assert later["g5.xlarge@us-east-1"].dph == quote(Decimal("1.1"), EBS)
    finally:
        await p.aclose()
        pricing.stop()


def test_shipped_price_table_is_valid():
    table = PriceTable.load()
    for itype in ("g4dn.xlarge", "g5.xlarge", "g5.48xlarge", "g6.xlarge", "g6e.xlarge", "p3dn.24xlarge",
                  "p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge"):
        assert table.prices[itype] > 0, itype
    assert table.region == "us-east-1" and table.as_of.isoformat() == TABLE_DATE
    assert table.estimates <= set(table.prices)


@pytest.mark.parametrize("content, why", [
    ("{not json", "not valid JSON"),
    ('{"prices": {"g5.xlarge": "1.0"}}', "'as_of'"),
    ('{"as_of": "2026-11-01", "prices": {}}', "'prices'"),
    ('{"as_of": "2026-11-01", "prices": {"g5.xlarge": "cheap"}}', "g5.xlarge"),
    ('{"as_of": "2026-11-01", "prices": {"g5.xlarge": -1}}', "outside"),
    ('[1, 2]', "top level"),
])
def test_broken_price_table_is_a_config_error(tmp_path, content, why):
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        PriceTable.load(path)
    assert why in err.value.message and str(path) in err.value.message and "AWS EC2" in err.value.message
    with pytest.raises(ConfigError):
        AwsProvider(session=session(), price_table=path, endpoint_url="http://127.0.0.1:9")


# ------------------------------------------------------------------------------ spot

async def test_spot_offers_only_where_asked(provider, proxy):
    proxy.spot_prices[(REGION, "g5.xlarge")] = ["0.4523", "0.3919", "0.5000"]
    plain = await provider.search(parse_query("a10g"))
    assert not [o for o in plain if o.interruptible]
    assert provider.search_key(parse_query("a10g")) != provider.search_key(parse_query("interruptible"))
    assert "DescribeSpotPriceHistory" not in proxy.actions()

    offers = by_id(await provider.search(parse_query("interruptible")))
    spot = offers["g5.xlarge@us-east-1.spot"]
    assert spot.interruptible and spot.reliability < 1.0
    assert spot.dph == quote(Decimal("0.3919"), EBS), "the lowest zone's price"
    assert spot.extra["spot_zone"] == "us-east-1b" and spot.price_source == "AWS spot price history"
    assert "g5.xlarge@us-east-1" in offers, "on-demand offers stay"
    assert "g4dn.xlarge@us-east-1.spot" not in offers, "no spot offer without a spot price"
    assert (await provider.get_offer("g5.xlarge@us-east-1.spot")).dph == spot.dph


async def test_emulator_dummy_spot_price_is_not_offered(provider):
    # moto answers 0.00001 for every type: far below any real spot price, so no spot offer
    offers = await provider.search(parse_query("interruptible"))
    assert offers and not [o for o in offers if o.interruptible]


def test_wants_spot_reads_the_query():
    assert wants_spot(parse_query("interruptible"))
    assert wants_spot(parse_query("interruptible!=false"))
    assert wants_spot(parse_query("interruptible in true,false"))
    assert wants_spot(parse_query("interruptible notin false"))
    assert wants_spot(parse_query("interruptible=any")), "no interruptible filter left: spot matches"
    assert not wants_spot(parse_query("interruptible=false"))
    assert not wants_spot(parse_query("interruptible!=true"))
    assert not wants_spot(parse_query("a100 x2"))
    assert not wants_spot(None)


@pytest.mark.parametrize("text", ["", "a10g", "interruptible", "interruptible=any", "interruptible=false",
                                  "interruptible!=true a10g", "interruptible in true,false dph<3",
                                  "gpu_ram>=20 interruptible notin false", "num_gpus>=4 interruptible=any"])
async def test_what_aws_is_asked_never_drops_an_offer_the_query_keeps(provider, proxy, text):
    proxy.spot_prices[(REGION, "g5.xlarge")] = ["0.4523", "0.3919"]
    proxy.spot_prices[(REGION, "g6.xlarge")] = ["0.3100"]
    query = parse_query(text)
    narrowed = query.apply(await provider.search(query))
    everything = query.apply(await provider.search(parse_query("interruptible")))   # spot fetched too
    assert everything, "a query that keeps nothing would prove nothing"
    assert [o.offer_id for o in narrowed] == [o.offer_id for o in everything]
    if text in ("interruptible=any", "num_gpus>=4 interruptible=any", "interruptible"):
        assert any(o.interruptible for o in narrowed) or "num_gpus" in text, "spot offers kept"


# ------------------------------------------------------------------------------ create

async def test_create_tags_user_data_and_client_token(provider, proxy):
    await prime(provider)
    created = await provider.create(req())
    assert created.label == "gh-test-1" and created.state is ProviderState.PROVISIONING
    assert created.offer_id == "g5.xlarge@us-east-1" and created.gpu_name == "A10G"
    sent = [r.body for r in proxy.requests if r.op == "create"]
    assert len(sent) == 1 and sent[0]["ClientToken"] == "gh-test-1"
    assert sent[0]["ImageId"] == MOTO_AMI and sent[0]["InstanceType"] == "g5.xlarge"
    assert not any(k.startswith("InstanceMarketOptions") for k in sent[0])

    client = ec2()
    instance = client.describe_instances(InstanceIds=[created.provider_id])["Reservations"][0]["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["Name"] == tags["gpuherd:label"] == "gh-test-1"
    assert tags["gpuherd:port"] == "8000" and tags["gpuherd:disk_gb"] == "50"
    assert instance["ClientToken"] == "gh-test-1"
    root = instance["BlockDeviceMappings"][0]
    assert root["DeviceName"] == "/dev/sda1"        # the AMI's root device, resized, not a second disk
    assert client.describe_volumes(VolumeIds=[root["Ebs"]["VolumeId"]])["Volumes"][0]["Size"] == 50

    raw = client.describe_instance_attribute(InstanceId=created.provider_id, Attribute="userData")
    script = base64.b64decode(raw["UserData"]["Value"]).decode()
    assert script.startswith("#!/bin/bash")
    assert "docker run -d --name gpuherd --gpus all --ipc=host -e HF_TOKEN -p 8000:8000 " \
           "vllm/vllm-openai:v0.6.3 --model Qwen/Qwen2.5-Coder-7B-Instruct" in script
    assert "echo ready" in script and "/var/lib/cloud/scripts/per-boot/" in script
    assert "hf_secret_value" not in script, "env values are not written in clear text"
    env_b64 = re.search(r"echo (\S+) \| base64 -d > /opt/gpuherd/env.sh", script).group(1)
    assert base64.b64decode(env_b64).decode() == "export HF_TOKEN=hf_secret_value\n"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_user_data_is_valid_bash(tmp_path):
    weird = req(command="python -m http.server 8000 && echo 'it''s up'", args=["a b", "$HOME"],
                env={"A": "x'y\"z", "B": "line1\nline2"}, onstart="echo GPUHERD_EOF\nexit 0",
                health_port=9000)
    for request in (req(), weird):
        script = user_data(request, 8000)
        path = tmp_path / "ud.sh"
        path.write_text(script)
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, script
        boot = script.split("<<'GPUHERD_EOF'\n", 1)[1].split("\nGPUHERD_EOF", 1)[0]
        path.write_text(boot)
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, boot
    script = user_data(weird, 8000)
    assert "--entrypoint /bin/sh vllm/vllm-openai:v0.6.3 -c" in script and "-p 9000:9000" in script
    injected = user_data(req(label="gh-x\ntouch /tmp/owned"), 8000)
    assert "\ntouch /tmp/owned" not in injected, "a label cannot add a line to the script"
    assert "GPUHERD_EOF_X" in script, "a heredoc delimiter never collides with the content"


def test_user_data_refuses_what_it_cannot_run():
    with pytest.raises(ProviderError, match="AWS EC2.*not valid"):
        user_data(req(env={"BAD-NAME": "1"}), 8000)
    with pytest.raises(ProviderError, match="16384"):
        user_data(req(onstart="x" * 20000), 8000)


async def test_spot_create_is_a_persistent_request_that_stops(provider, proxy):
    await prime(provider)
    created = await provider.create(req(offer_id="g5.xlarge@us-east-1.spot", label="gh-spot", bid_dph=Decimal("0.5")))
    sent = next(r.body for r in proxy.requests if r.op == "create")
    assert sent["InstanceMarketOptions.MarketType"] == "spot"
    assert sent["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "persistent"
    assert sent["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "stop"
    assert sent["InstanceMarketOptions.SpotOptions.MaxPrice"] == "0.5"
    assert created.interruptible and created.offer_id == "g5.xlarge@us-east-1.spot"
    stopped = await provider.stop(created.provider_id)
    assert stopped.state in (ProviderState.STOPPING, ProviderState.STOPPED)


async def test_newest_deep_learning_ami_and_its_root_size(proxy, clock):
    p = build(proxy, clock, ami=None)
    try:
        await prime(p)
        stub = Stubber(p.ec2_client())
        image = {"RootDeviceName": "/dev/sda1", "Architecture": "x86_64",
                 "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 75}}]}
        stub.add_response("describe_images", {"Images": [
            {**image, "ImageId": "ami-0aaaaaaaaaaaaaaaa", "CreationDate": "2026-09-01T00:00:00.000Z"},
            {**image, "ImageId": "ami-0bbbbbbbbbbbbbbbb", "CreationDate": "2026-11-10T00:00:00.000Z"}]},
            {"Owners": ["amazon"], "Filters": [
                {"Name": "name", "Values": ["Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu *"]},
                {"Name": "state", "Values": ["available"]}, {"Name": "architecture", "Values": ["x86_64"]}]})
        stub.add_response("run_instances", {"Instances": [{
            "InstanceId": "i-0123456789abcdef0", "InstanceType": "g5.xlarge", "State": {"Code": 0, "Name": "pending"},
            "Tags": [{"Key": "gpuherd:label", "Value": "gh-ami"}, {"Key": "gpuherd:disk_gb", "Value": "75"}]}]},
            {"ImageId": "ami-0bbbbbbbbbbbbbbbb", "InstanceType": "g5.xlarge", "MinCount": 1, "MaxCount": 1,
             "ClientToken": "gh-ami", "UserData": ANY, "TagSpecifications": ANY,
             "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {
                 "VolumeSize": 75, "VolumeType": "gp3", "DeleteOnTermination": True}}]})
        with stub:
            created = await p.create(req(label="gh-ami", disk_gb=40))
            stub.assert_no_pending_responses()
        assert created.provider_id == "i-0123456789abcdef0"
        assert created.storage_dph == storage_hourly(EBS, 75), "billed for the disk it really got"
    finally:
        await p.aclose()


# ------------------------------------------------------------------------------ lifecycle

async def test_lifecycle_over_http_and_ebs_cost_while_stopped(provider):
    await prime(provider)
    created = await provider.create(req(label="gh-life"))
    running = await provider.get(created.provider_id)
    assert running.state is ProviderState.RUNNING
    assert re.fullmatch(r"http://\d+\.\d+\.\d+\.\d+:8000", running.endpoint)
    assert running.started_at is not None and running.num_gpus == 1 and running.label == "gh-life"
    disk = storage_hourly(EBS, 50)
    assert running.dph == Decimal("1.006") + disk, "the running rate includes the disk"

    stopping = await provider.stop(created.provider_id)
    assert stopping.state is ProviderState.STOPPING
    stopped = await provider.get(created.provider_id)
    assert stopped.state is ProviderState.STOPPED and stopped.endpoint is None
    assert stopped.storage_dph == disk == Decimal("0.005479")
    assert "EBS" in stopped.message

    assert (await provider.start(created.provider_id)).state is ProviderState.PROVISIONING
    assert (await provider.get(created.provider_id)).state is ProviderState.RUNNING
    await provider.destroy(created.provider_id)
    assert (await provider.get(created.provider_id)).state is ProviderState.DESTROYED
    await provider.destroy(created.provider_id)             # twice is fine
    with pytest.raises(ProviderStateError, match="AWS EC2"):
        await provider.start(created.provider_id)
    assert created.provider_id not in {p.provider_id for p in await provider.list()
                                       if p.state is not ProviderState.DESTROYED}


async def test_list_sees_every_gpu_machine_but_labels_only_ours(provider):
    client = ec2()

    def run(itype: str, tags: dict[str, str] | None = None) -> str:
        spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}] if tags else []
        return client.run_instances(ImageId=MOTO_AMI, InstanceType=itype, MinCount=1, MaxCount=1,
                                    TagSpecifications=spec)["Instances"][0]["InstanceId"]

    foreign_gpu = run("g5.xlarge", {"Name": "someone-elses"})
    web = run("t3.micro")
    ours_small = run("t3.micro", {"gpuherd:label": "gh-small"})
    listed = {p.provider_id: p for p in await provider.list()}
    assert foreign_gpu in listed and listed[foreign_gpu].label is None, "only gpuherd:label is our label"
    assert web not in listed
    assert listed[ours_small].label == "gh-small"
    assert listed[foreign_gpu].gpu_name == "A10G"
    assert listed[foreign_gpu].storage_dph == storage_hourly(EBS, 8), "disk size read from its volume"


async def test_get_takes_plain_ids_and_finds_the_region(proxy, clock):
    p = build(proxy, clock, regions=[REGION, "us-west-2"])
    try:
        assert await p.get("i-0123456789abcdef0") is None
        assert await p.get("1") is None
        west = ec2("us-west-2").run_instances(ImageId=MOTO_AMI, InstanceType="g5.xlarge", MinCount=1,
                                              MaxCount=1)["Instances"][0]["InstanceId"]
        found = await p.get(west)
        assert found is not None and found.provider_id == west and found.offer_id == "g5.xlarge@us-west-2"
        assert (await p.get(f"{west}@us-west-2")).provider_id == west
        before = len(proxy.actions("get"))
        await p.get(west)
        assert len(proxy.actions("get")) == before + 1, "a known machine's region is remembered"
    finally:
        await p.aclose()


async def test_destroy_cancels_a_persistent_spot_request_first(provider):
    await prime(provider)
    stub = Stubber(provider.ec2_client())
    iid, sir = "i-0123456789abcdef0", "sir-0123456789abcdef"
    stub.add_response("describe_instances", {"Reservations": [{"Instances": [{
        "InstanceId": iid, "InstanceType": "g5.xlarge", "State": {"Code": 16, "Name": "running"},
        "InstanceLifecycle": "spot", "SpotInstanceRequestId": sir}]}]}, {"InstanceIds": [iid]})
    stub.add_response("cancel_spot_instance_requests", {"CancelledSpotInstanceRequests": [
        {"SpotInstanceRequestId": sir, "State": "cancelled"}]}, {"SpotInstanceRequestIds": [sir]})
    stub.add_response("terminate_instances", {"TerminatingInstances": []}, {"InstanceIds": [iid]})
    with stub:
        await provider.destroy(iid)
        stub.assert_no_pending_responses()


async def test_stopping_a_one_time_spot_instance_is_explained(provider, proxy):
    await prime(provider)
    created = await provider.create(req(offer_id="g5.xlarge@us-east-1.spot", label="gh-once"))
    proxy.pin("StopInstances", Answer(400, ec2_error(
        "UnsupportedOperation", f"You can't stop the Spot Instance '{created.provider_id}' because it is "
                                "associated with a one-time Spot Instance request.")))
    with pytest.raises(ProviderStateError) as err:
        await provider.stop(created.provider_id)
    assert "AWS EC2" in err.value.message and "only be destroyed" in err.value.message


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("op, answer, error, words", [
    ("create", Answer(400, ec2_error("VcpuLimitExceeded", "You have requested more vCPU capacity than your "
                                                          "current vCPU limit of 0 allows")), CapacityError, "quota"),
    ("create", Answer(400, ec2_error("InstanceLimitExceeded", "Your quota allows for 0 more running instance(s).")),
     CapacityError, "quota"),
    ("list", Answer(403, ec2_error("UnauthorizedOperation", "You are not authorized to perform this operation. "
                                                             "Encoded authorization failure message: AbC123")),
     AuthError, "refused"),
    ("list", Answer(401, ec2_error("AuthFailure", "AWS was not able to validate the provided access credentials")),
     AuthError, "refused"),
    ("list", Answer(503, ec2_error("RequestLimitExceeded", "Request limit exceeded.")), RateLimited, "too many"),
    ("list", Answer(500, ec2_error("InternalError", "An internal error has occurred")), ProviderUnavailable, "server"),
    ("list", Answer(400, ec2_error("InvalidParameterValue", "Value (xyz) for parameter is invalid")),
     ProviderError, "Value (xyz)"),
])
async def test_aws_errors_become_typed_errors(provider, proxy, caplog, op, answer, error, words):
    await prime(provider)
    action = {"create": "RunInstances", "list": "DescribeInstances"}[op]
    proxy.pin(action, answer, times=2)                     # every botocore attempt
    with caplog.at_level(logging.WARNING, logger="gpuherd.core.providers.aws"), pytest.raises(error) as err:
        if op == "create":
            await provider.create(req(label="gh-err"))
        else:
            await provider.list()
    message = err.value.message
    assert type(err.value) is error and message.startswith("AWS EC2: ") and words in message
    assert "Encoded authorization failure" not in message
    assert SECRET_KEY not in message and SECRET_KEY not in str(err.value)
    assert caplog.records and all(SECRET_KEY not in r.getMessage() for r in caplog.records)
    assert any("AWS EC2" in r.getMessage() for r in caplog.records)


async def test_capacity_shortage_is_a_capacity_error(provider, proxy):
    await prime(provider)
    proxy.fault("create", "capacity", times=2)
    with pytest.raises(CapacityError) as err:
        await provider.create(req(label="gh-cap"))
    assert "InsufficientInstanceCapacity" in err.value.message and "g5.xlarge" in err.value.message
    assert [r.body["Action"] for r in proxy.requests if r.op == "create"] == ["RunInstances"] * 2
    assert ec2().describe_instances()["Reservations"] == [], "nothing was launched"


async def test_an_answer_of_unexpected_shape_is_still_a_typed_error(provider, proxy, caplog):
    await prime(provider)
    proxy.pin("DescribeInstances", Answer(200, (
        '<?xml version="1.0" encoding="UTF-8"?>\n<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/'
        '2016-11-15/"><requestId>r</requestId><reservationSet><item><reservationId>r-1</reservationId>'
        "<instancesSet><item><instanceType>g5.xlarge</instanceType></item></instancesSet></item>"
        "</reservationSet></DescribeInstancesResponse>")))
    with caplog.at_level(logging.ERROR, logger="gpuherd.core.providers.aws"), pytest.raises(ProviderError) as err:
        await provider.list()
    assert err.value.message == "AWS EC2: list failed: AWS EC2 answered in an unexpected shape (KeyError)"
    assert any(r.exc_info for r in caplog.records), "the details are in the log"


async def test_stubbed_auth_failure_on_get(provider):
    stub = Stubber(provider.ec2_client())
    stub.add_client_error("describe_instances", "AuthFailure",
                          "AWS was not able to validate the provided access credentials", 401)
    with stub, pytest.raises(AuthError) as err:
        await provider.get("i-0123456789abcdef0")
    assert "refused" in err.value.message and SECRET_KEY not in err.value.message


async def test_malformed_answer_and_timeout_and_refused_connection(provider, proxy, clock):
    proxy.fault("list", "malformed", times=2)
    with pytest.raises(ProviderError, match="malformed"):
        await provider.list()
    proxy.fault("get", "timeout", times=2, hang_s=3)
    fast = build(proxy, clock, timeout_s=0.3)
    try:
        with pytest.raises(ProviderTimeout, match="AWS EC2"):
            await fast.get("i-0123456789abcdef0")
    finally:
        await fast.aclose()
    gone = build(proxy, clock, endpoint_url=f"http://127.0.0.1:{closed_port()}")
    try:
        with pytest.raises(ProviderUnavailable, match="cannot connect"):
            await gone.list()
    finally:
        await gone.aclose()


# ------------------------------------------------------------------------------ settings

def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


def test_no_credentials_means_not_configured():
    assert AwsProvider.from_settings(settings(aws="auto")) is None
    on = AwsProvider.from_settings(settings(aws="on"))
    assert isinstance(on, AwsProvider)


def test_off_means_off_even_with_credentials(monkeypatch):
    set_dummy_credentials(monkeypatch)
    assert AwsProvider.from_settings(settings(aws="off")) is None
    assert isinstance(AwsProvider.from_settings(settings(aws="auto")), AwsProvider)


def test_auto_without_any_aws_configuration_does_not_load_boto3(tmp_path):
    """`aws=auto` with no AWS variable and no ~/.aws files: the registry never imports boto3
    (every start would pay for it), while any one of them, or aws=on, does."""
    import os
    import subprocess
    import sys

    from gpuherd.core.providers.registry import aws_configuration_present

    assert not aws_configuration_present({}, tmp_path)
    assert aws_configuration_present({"AWS_PROFILE": "ml"}, tmp_path)
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[profile sso]\n")
    assert aws_configuration_present({}, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GPUHERD_"))}
    env.update(HOME=str(tmp_path / "nohome"), GPUHERD_HOME=str(tmp_path / "data"))
    probe = ("import sys; from gpuherd.core.config import load_settings; "
             "from gpuherd.core.providers.registry import build_registry; "
             "r = build_registry(load_settings()); print('boto3' in sys.modules, sorted(r.names()))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False", out
    on = subprocess.run([sys.executable, "-c", probe], env={**env, "GPUHERD_AWS": "on"},
                        capture_output=True, text=True, check=True).stdout
    assert on.split()[0] == "True" and "aws" in on, on


def test_missing_boto3_says_which_extra(monkeypatch, caplog):
    monkeypatch.setattr(aws_module, "boto3", None)
    monkeypatch.setattr(aws_module, "_warned", set())
    with caplog.at_level(logging.INFO, logger="gpuherd.core.providers.aws"):
        assert AwsProvider.from_settings(settings(aws="on")) is None
    assert any("gpuherd[aws]" in r.getMessage() for r in caplog.records)


async def test_aws_endpoint_url_redirects_boto3(monkeypatch, proxy, clock):
    set_dummy_credentials(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    p = AwsProvider.from_settings(settings(aws="auto", aws_ami=MOTO_AMI, aws_ebs_gb_month="0.1"), clock=clock)
    assert p is not None and p.ec2_client().meta.endpoint_url == proxy.url
    try:
        offers = by_id(await p.search())
        created = await p.create(req(label="gh-redirected"))
    finally:
        await p.aclose()
    assert offers["g5.xlarge@us-east-1"].storage_cost == Decimal("0.1")
    assert {"DescribeInstanceTypes", "GetProducts", "RunInstances"} <= set(proxy.actions())
    assert ec2().describe_instances(InstanceIds=[created.provider_id])["Reservations"], "it reached moto"


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="aws_ebs_gb_month"):
        AwsProvider(session=session(), ebs_gb_month="lots")
    with pytest.raises(ConfigError, match="region=ami-id"):
        AwsProvider(session=session(), ami="us-east-1=ami-1,eu-west-1")
    p = AwsProvider(session=session(), ami="us-east-1=ami-1, eu-west-1=ami-2", endpoint_url="http://127.0.0.1:9")
    assert p.ami == {"us-east-1": "ami-1", "eu-west-1": "ami-2"}


# ------------------------------------------------------------------------------ health

class _Model(LoopbackServer):
    def routes(self) -> None:
        self.route("GET", "/health", lambda r, p: Response(200, {"ok": True}), "health")


async def test_health_asks_the_model_server(provider):
    with _Model() as model:
        port = int(model.url.rsplit(":", 1)[1])
        inst = ProviderInstance(provider="aws", provider_id="i-1", state=ProviderState.RUNNING,
                                endpoint=f"http://127.0.0.1:{port}")
        assert await provider.health(inst, "/health", None)
        assert not await provider.health(inst, "/missing", None)
        assert not await provider.health(inst.model_copy(update={"state": ProviderState.STOPPED}), "/health", None)
        other = inst.model_copy(update={"endpoint": "http://127.0.0.1:1"})
        assert await provider.health(other, "/health", port), "the template's health port wins"
        assert not await provider.health(other, "/health", None)


def test_every_provider_error_is_a_gpuherd_error():
    assert issubclass(aws_module._NotFoundError, GpuherdError)
