"""The real provider clients inside the whole product: configured from the official tools'
variables, searched together with partial results and price ages, booted where asked, and a boot
killed between the provider's create and the database write leaving no untracked machine. Every
provider is a loopback fake reached over real HTTP through its redirected endpoint."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from gpuherd.bot import grammar
from gpuherd.bot.render_text import to_text as render_plain
from gpuherd.core.clock import Clock
from gpuherd.core.config import load_settings
from gpuherd.core.errors import NoMatchingOffer
from gpuherd.core.ids import label_for
from gpuherd.core.models import AuditEvent, BillingSegment, Instance
from gpuherd.core.providers.registry import build_registry
from gpuherd.core.reconcile import BOOT_GRACE
from gpuherd.core.results import Confirmation
from gpuherd.core.service import GpuService
from tests.fakes.runpod_fake import FakeRunPod
from tests.fakes.surf_fake import FakeSurf
from tests.fakes.vast_fake import FakeVast

VAST_KEY = "vast-9f8e7d6c5b4a39281706-integration"
RUNPOD_KEY = "rpa_4B3C2D1E0F9A8B7C6D5E-integration"
SURF_TOKEN = "surf-a1b2c3d4e5f6a7b8c9d0-integration"
SECRETS = (VAST_KEY, RUNPOD_KEY, SURF_TOKEN)
REPO = Path(__file__).resolve().parents[1]


class Later(Clock):
    """The real clock, shifted: 'reconcile a few minutes after the crash' without waiting."""

    def __init__(self, shift: timedelta) -> None:
        self.shift = shift

    def now(self):
        return super().now() + self.shift


@pytest.fixture
def vast():
    with FakeVast(api_key=VAST_KEY) as fake:
        yield fake


@pytest.fixture
def runpod():
    with FakeRunPod(RUNPOD_KEY) as fake:
        yield fake


@pytest.fixture
def surf():
    with FakeSurf(token=SURF_TOKEN) as fake:
        yield fake


@pytest.fixture
def cloud_env(monkeypatch, vast, runpod, surf, tmp_path):
    """The variables a user of the official tools already has, pointed at the fakes."""
    monkeypatch.setenv("VAST_API_KEY", VAST_KEY)
    monkeypatch.setenv("VAST_URL", vast.url)
    monkeypatch.setenv("RUNPOD_API_KEY", RUNPOD_KEY)
    monkeypatch.setenv("RUNPOD_API_BASE_URL", runpod.url)
    monkeypatch.setenv("SURF_API_TOKEN", SURF_TOKEN)
    monkeypatch.setenv("GPUHERD_SURF_URL", surf.url + "/v1")
    monkeypatch.setenv("GPUHERD_AWS", "off")
    monkeypatch.setenv("GPUHERD_PROVIDER_TIMEOUT_S", "3")
    return tmp_path / "home"


@pytest.fixture
async def service(cloud_env):
    svc = GpuService.from_settings(load_settings())
    yield svc
    await svc.aclose()


async def run(service: GpuService, line: str) -> str:
    reply = await grammar.dispatch(grammar.Context(service=service, actor=service.local_actor(), wait=False), line)
    return render_plain(reply)


# ------------------------------------------------------------------------------- configuration

def test_providers_are_configured_by_their_credentials(cloud_env, monkeypatch):
    registry = build_registry(load_settings())
    assert registry.names() == ["vast", "runpod", "surf"], "no sandbox beside real clouds"
    monkeypatch.delenv("RUNPOD_API_KEY")
    monkeypatch.setenv("GPUHERD_SANDBOX", "on")
    registry = build_registry(load_settings())
    assert registry.names() == ["vast", "surf", "sandbox"]
    for name in ("VAST_API_KEY", "SURF_API_TOKEN"):
        monkeypatch.delenv(name)
    monkeypatch.delenv("GPUHERD_SANDBOX")
    assert build_registry(load_settings()).names() == ["sandbox"], "nothing configured: the sandbox"


def test_gpuherd_prefixed_and_config_file_credentials_work(tmp_path, monkeypatch, vast):
    home = tmp_path / "cfg"
    home.mkdir()
    (home / "config.toml").write_text(f'vast_api_key = "{VAST_KEY}"\nvast_url = "{vast.url}"\naws = "off"\n')
    monkeypatch.setenv("GPUHERD_HOME", str(home))
    settings = load_settings()
    assert settings.vast_api_key.get_secret_value() == VAST_KEY and VAST_KEY not in repr(settings)
    assert build_registry(settings).names() == ["vast"]


# ------------------------------------------------------------------------------------- search

async def test_search_asks_every_provider_and_sorts_them_together(service, vast, runpod):
    result = await service.search(service.local_actor(), "gpu_ram>=24 limit=200")
    providers = {v.offer.provider for v in result.offers}
    assert providers == {"vast", "runpod"}, "SURF has no offers; both marketplaces answered"
    prices = [v.offer.dph for v in result.offers]
    assert prices == sorted(prices), "one ranking across providers"
    assert set(result.provider_ages) == {"vast", "runpod"} and result.failures == []
    text = await run(service, "/gpu search gpu_ram>=24 limit=5")
    assert "Prices asked: vast" in text and "runpod" in text and "includes a 50 GB disk" in text


async def test_one_failing_provider_leaves_the_others_and_is_named(service, vast, runpod):
    runpod.fault("search", "server_error", times=10)
    result = await service.search(service.local_actor(), "limit=50")
    assert result.offers and {v.offer.provider for v in result.offers} == {"vast"}
    assert [f.provider for f in result.failures] == ["runpod"] and "RunPod" in result.failures[0].message
    text = await run(service, "/gpu search provider=runpod")
    assert "RunPod" in text and "500" in text and "Traceback" not in text


async def test_a_slow_provider_is_cut_at_its_time_limit(service, vast, runpod):
    runpod.latency_s = 2.0
    service.settings.provider_timeout_s = 0.5
    started = time.monotonic()
    result = await service.search(service.local_actor(), "limit=5")
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"waited {elapsed:.2f}s for a provider past its limit"
    assert {v.offer.provider for v in result.offers} == {"vast"}
    assert "no answer within 0.5s" in {f.provider: f.message for f in result.failures}["runpod"]


async def test_offers_are_cached_briefly_and_concurrent_searches_share_a_request(service, vast):
    actor = service.local_actor()
    await asyncio.gather(*(service.search(actor, "provider=vast gpu_ram>=24") for _ in range(5)))
    assert len(vast.calls("search")) == 1, "five at once: one request"
    again = await service.search(actor, "provider=vast gpu_ram>=24")
    assert len(vast.calls("search")) == 1 and again.provider_ages["vast"] >= 0
    await service.search(actor, "provider=vast gpu_ram>=80")
    assert len(vast.calls("search")) == 2, "a different request is not served from the cache"
    service.settings.offer_cache_s = 0
    await service.search(actor, "provider=vast gpu_ram>=24")
    assert len(vast.calls("search")) == 3


# --------------------------------------------------------------------------------------- boot

async def _yes(service, actor, result):
    """Say yes when the boot asked (an offer above the template's limit)."""
    return await service.confirm(actor, result.token) if isinstance(result, Confirmation) else result


async def test_boot_takes_the_cheapest_offer_anywhere_or_the_named_provider(service, vast, runpod):
    actor = service.local_actor()
    budget = service.templates.get("budget")
    everything = await service.booting.choose_offers(budget, offer=None, provider=None)
    assert {o.provider for o in everything} == {"vast", "runpod"}
    cheapest = everything[0]
    on_runpod = (await service.booting.choose_offers(budget, offer=None, provider="runpod"))[0]
    assert on_runpod.provider == "runpod" and on_runpod.dph >= cheapest.dph

    r = await _yes(service, actor, await service.boot(actor, "budget", provider="runpod"))
    assert r.instance.provider == "runpod" and r.offer.ref == on_runpod.ref
    [pod] = [p for p in runpod.pods.values()]
    assert pod["name"].startswith("gh-"), "the pod carries our label"
    r2 = await _yes(service, actor, await service.boot(actor, "budget"))
    assert r2.offer.provider == cheapest.provider and r2.offer.dph == cheapest.dph
    with pytest.raises(NoMatchingOffer) as err:
        await service.boot(actor, "budget", provider="surf")
    assert "No configured provider can boot 'budget'" in err.value.message


async def test_keys_appear_in_no_reply_log_or_audit_record(service, vast, runpod, surf, caplog):
    caplog.set_level(logging.DEBUG)
    vast.fault("search", "auth", times=10)
    runpod.fault("search", "auth", times=10)
    texts = [await run(service, "/gpu search"), await run(service, "/gpu boot budget")]
    assert "refused" in texts[0] and "vast.ai" in texts[0] and "RunPod" in texts[0]
    vast.clear_faults()
    runpod.clear_faults()
    texts.append(await run(service, "/gpu boot budget env.HF_TOKEN=hf_abcdefghijklmnop"))
    texts += [await run(service, "/gpu status"), await run(service, "/gpu reconcile"), await run(service, "/gpu audit 50")]
    with service.db.session() as s:
        audit = " ".join(e.details for e in s.exec(select(AuditEvent)).scalars())
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    for secret in SECRETS:
        for where, blob in (("reply", "\n".join(texts)), ("audit", audit), ("log", logged)):
            assert secret not in blob, f"{secret[:8]}… leaked into a {where}"
    assert "hf_abcdefghijklmnop" not in audit and "hf_abcdefghijklmnop" not in "\n".join(texts)


# ------------------------------------------------------------------- crash between create and write

def test_a_boot_killed_after_the_provider_created_the_machine_leaves_nothing_untracked(cloud_env, vast):
    """A real `gpuherd boot` process is SIGKILLed while vast.ai has made the machine and before
    the answer reaches it. A later reconcile (or the next start) adopts the machine by its label."""
    env = {k: v for k, v in os.environ.items()}
    env.update(GPUHERD_HOME=str(cloud_env), GPUHERD_PROVIDERS='["vast"]')
    victim: dict[str, subprocess.Popen] = {}

    def kill_now(request) -> None:
        victim["proc"].send_signal(signal.SIGKILL)
        victim["proc"].wait(timeout=10)

    vast.after["create"] = kill_now
    log = (cloud_env.parent / "boot.out").open("w")
    victim["proc"] = subprocess.Popen([sys.executable, "-m", "gpuherd.bot.cli", "--yes", "boot", "budget"],
                                      env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    assert victim["proc"].wait(timeout=60) == -signal.SIGKILL
    [machine] = vast.instances.values()
    assert str(machine["label"]).startswith("gh-")

    async def later() -> None:
        settings = load_settings(providers=["vast"])
        service = GpuService.from_settings(settings, clock=Later(BOOT_GRACE + timedelta(seconds=5)))
        try:
            with service.db.session() as s:
                [row] = s.exec(select(Instance)).scalars().all()
            assert row.state == "pending" and row.provider_id is None, "the intent was written first"
            assert machine["label"] == label_for(row.idempotency_key), "the machine carries the intent's key"
            result = await service.reconcile()
            assert result.adopted == [row.id] and result.unmanaged == []
            with service.db.session() as s:
                adopted = s.get(Instance, row.id)
                segments = s.exec(select(BillingSegment).where(BillingSegment.instance_id == row.id)).scalars().all()
            assert adopted.provider_id == str(machine["id"]) and adopted.state != "pending"
            assert len(segments) == 1 and segments[0].end_ts is None, "billed from now on, once"
            assert (await service.reconcile()).adopted == []
        finally:
            await service.aclose()

    asyncio.run(later())
    out = (cloud_env / "gpuherd.log").read_text() if (cloud_env / "gpuherd.log").exists() else ""
    assert VAST_KEY not in out


async def test_search_reply_says_where_a_price_not_read_live_came_from(service):
    from gpuherd.bot.replies import duration, search_reply
    from gpuherd.core.results import PriceSource, SearchResult

    r = SearchResult(query="", description="", offers=[], total_matches=0, providers=["aws"],
                     provider_ages={"aws": 4},
                     price_sources=[PriceSource(provider="aws", source="AWS Pricing API", age_s=3 * 3600),
                                    PriceSource(provider="aws", source="gpuherd price table of 2025-07-01",
                                                age_s=400 * 86400)])
    notes = search_reply(r).notes
    assert f"aws prices from AWS Pricing API, {duration(3 * 3600)} old." in notes
    assert "aws prices from gpuherd price table of 2025-07-01." in notes
    assert any(n.startswith("Prices asked: aws") for n in notes)


async def test_running_is_not_healthy_until_the_model_server_answers():
    """vast.ai or RunPod say 'running' when the container starts; vLLM then loads for minutes."""
    from gpuherd.core.providers.base import ProviderInstance, ProviderState
    from gpuherd.core.providers.runpod import RunPodProvider
    from tests.fakes.loopback import LoopbackServer, Response

    class ModelServer(LoopbackServer):
        ready = False

        def routes(self) -> None:
            self.route("GET", "/health", lambda req, params: Response(200 if self.ready else 503, {}), "health")

    provider = RunPodProvider("unused-key", base_url="http://127.0.0.1:9")
    with ModelServer() as server:
        pinst = ProviderInstance(provider="runpod", provider_id="p1", state=ProviderState.RUNNING,
                                 endpoint=server.url)
        assert await provider.health(pinst, "/health", 8000) is False
        server.ready = True
        assert await provider.health(pinst, "/health", 8000) is True
        assert len(server.calls("health")) == 2
        loading = pinst.model_copy(update={"state": ProviderState.LOADING})
        assert await provider.health(loading, "/health", 8000) is False
    gone = pinst.model_copy(update={"endpoint": "http://127.0.0.1:9"})
    assert await provider.health(gone, "/health", 8000) is False, "no answer is not healthy"
    assert await provider.health(pinst.model_copy(update={"endpoint": None}), "/health", 8000) is True
    await provider.aclose()


async def test_searching_only_a_provider_without_offers_says_so(service):
    text = await run(service, "/gpu search provider=surf")
    assert "SURF Research Cloud has no offers" in text and "attaches existing machines" in text
