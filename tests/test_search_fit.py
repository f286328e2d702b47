"""Search and boot agree on which offers fit which template (one rule, `Template.offer_rejection`),
and a search that heard from no provider says so instead of blaming the query.

Runs the real service on SQLite/PostgreSQL with the sandbox; the only stand-in is a second
sandbox renamed "other" that is made to fail."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import func, select

from gpuherd.bot.replies import search_reply
from gpuherd.core.errors import InvalidInput, ProviderError
from gpuherd.core.models import Instance
from gpuherd.core.offers import Offer
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.results import BootResult
from gpuherd.core.search import SearchUnanswered, unfit_reason
from gpuherd.core.templates import BUILTIN_TEMPLATES, TemplateCatalog


def _instances(service) -> list[Instance]:
    with service.db.session() as s:
        return list(s.execute(select(Instance)).scalars())


def _count(service) -> int:
    with service.db.session() as s:
        return int(s.execute(select(func.count()).select_from(Instance)).scalar_one())


def _offer(**kw) -> Offer:
    base = dict(provider="sandbox", offer_id="sb-1", gpu_name="RTX 4090", num_gpus=2, gpu_ram=24,
                disk_space=200, dph=Decimal("0.80"))
    return Offer(**{**base, **kw})


# --- the rule -----------------------------------------------------------------------------------

def test_disk_smaller_than_the_templates_is_no_fit():
    llama = TemplateCatalog.builtins().get("llama-3.1-70b")
    assert llama.disk_gb == 120
    assert llama.offer_rejection(_offer(disk_space=200)) is None
    assert llama.offer_rejection(_offer(disk_space=120)) is None
    why = llama.offer_rejection(_offer(disk_space=50))
    assert why == "at most 50 GB of disk, the template needs 120 GB"
    # 0: the provider states no limit in its offers (RunPod picks the disk at create)
    assert llama.offer_rejection(_offer(disk_space=0)) is None


def test_unfit_reason_says_what_no_template_offers():
    templates = list(BUILTIN_TEMPLATES)
    assert unfit_reason(_offer(num_gpus=8), templates) == "no template uses 8 GPUs (they use 1, 2 or 4)"
    small_disk = unfit_reason(_offer(num_gpus=2, disk_space=100), templates)
    assert small_disk == "no template fits (llama-3.1-70b: at most 100 GB of disk, the template needs 120 GB)"
    assert "spot" in unfit_reason(_offer(interruptible=True), templates)


# --- search offers only boots that work -----------------------------------------------------------

async def test_search_h100_x2_buttons_name_templates_that_fit_and_boot(service, admin):
    r = await service.search(admin, "h100 x2")
    assert r.offers
    catalog = service.templates
    for v in r.offers:
        assert "budget" not in v.fits
        for a in v.actions:
            template = catalog.get(a.args["template"])
            assert template.offer_rejection(v.offer) is None, (a.args, v.offer.ref)
            assert template.num_gpus == 2
    press = next(a for v in r.offers for a in v.actions)
    booted = await service.boot(admin, press.args["template"], offer=press.args["offer"], wait=True)
    assert isinstance(booted, BootResult) and booted.ready and booted.instance.state == "running"


async def test_offers_no_template_fits_get_no_boot_button_and_a_note(service, admin):
    r = await service.search(admin, "x8 limit=5")
    assert r.offers and all(v.offer.num_gpus == 8 for v in r.offers)
    assert all(v.actions == [] and v.fits == [] for v in r.offers)
    assert {v.unfit for v in r.offers} == {"no template uses 8 GPUs (they use 1, 2 or 4)"}
    reply = search_reply(r)
    assert reply.actions == []
    [note] = [n for n in reply.notes if n.startswith("No Boot button")]
    assert r.offers[0].offer.ref in note and "no template uses 8 GPUs" in note


async def test_too_small_disk_is_no_button_in_search_and_refused_by_boot(service, admin):
    r = await service.search(admin, "gpu_ram>=24 x2 disk_space<120 limit=50")
    assert r.offers, "the sandbox has 2-GPU offers with less disk than llama-3.1-70b needs"
    for v in r.offers:
        assert "llama-3.1-70b" not in v.fits and v.actions == []
        assert "llama-3.1-70b: at most" in (v.unfit or "")
    small = r.offers[0].offer
    with pytest.raises(InvalidInput, match="does not fit template 'llama-3.1-70b': at most .* GB of disk"):
        await service.boot(admin, "llama-3.1-70b", offer=small.ref)
    assert _count(service) == 0   # refused before any row was written


async def test_disk_override_is_held_to_the_same_rule(service, admin):
    r = await service.search(admin, "gpu_ram>=8 x1 disk_space<=100 limit=1")
    offer = r.offers[0].offer
    assert "budget" in r.offers[0].fits   # 50 GB fits
    with pytest.raises(InvalidInput, match="GB of disk, the template needs 500 GB"):
        await service.boot(admin, "budget", offer=offer.ref, overrides={"disk_gb": "500"})
    assert _count(service) == 0


# --- providers that fail -------------------------------------------------------------------------

def _failing(clock, name: str = "other") -> SandboxProvider:
    broken = SandboxProvider(None, seed=9, time_scale=0, clock=clock)
    broken.name = name
    broken.inject("unavailable", count=50, on="search")
    return broken


async def test_search_with_the_only_provider_failing_names_it_and_its_error(service, admin, sandbox):
    sandbox.inject("unavailable", count=50, on="search")
    with pytest.raises(SearchUnanswered) as info:
        await service.search(admin, "4090")
    msg = info.value.message
    assert "only provider asked failed" in msg and "sandbox: service unavailable (503)" in msg
    assert "No offer matches" not in msg and "Loosen" not in msg
    assert info.value.code == "provider_unavailable" and isinstance(info.value, ProviderError)


async def test_search_with_every_provider_failing_names_each(service, admin, sandbox, clock):
    sandbox.inject("rate_limit", count=50, on="search")
    service.providers = ProviderRegistry({"sandbox": sandbox, "other": _failing(clock)})
    with pytest.raises(SearchUnanswered) as info:
        await service.search(admin, "4090")
    msg = info.value.message
    assert "all 2 providers asked failed" in msg
    assert "sandbox: too many requests" in msg and "sandbox: service unavailable" in msg
    assert info.value.code == "provider_unavailable"   # two different causes


async def test_partial_failure_with_nothing_matching_says_who_was_not_heard_from(service, admin, sandbox, clock):
    service.providers = ProviderRegistry({"sandbox": sandbox, "other": _failing(clock)})
    r = await service.search(admin, "h100 <$0.01")
    assert r.offers == [] and [f.provider for f in r.failures] == ["other"]
    reply = search_reply(r)
    assert "No offer from sandbox matches; other was not heard from" in reply.text
    assert "Loosen" not in reply.text and reply.level == "warning"
    assert any(n.startswith("⚠ Not heard from other") for n in reply.notes)
    # with offers: the table, and still the note naming the silent one
    shown = search_reply(await service.search(admin, "4090"))
    assert shown.tables and shown.text == ""
    assert any(n.startswith("⚠ Not heard from other") and "unavailable" in n for n in shown.notes)


async def test_boot_with_every_provider_failing_says_so_and_writes_nothing(service, admin, sandbox):
    sandbox.inject("unavailable", count=50, on="search")
    with pytest.raises(SearchUnanswered, match="No offer to boot 'budget' on: the only provider asked failed"):
        await service.boot(admin, "budget")
    assert _instances(service) == []
