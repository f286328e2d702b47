"""One suite, every provider: the sandbox directly, the real clients through their loopback fakes
(moto's server for AWS). What the service relies on is checked here once for all of them:
normalised offers, create with our label, the state walk, stop/start/destroy, unknown ids, and
the faults every cloud produces, each turned into a typed error that names the provider and never
the key."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from gpuherd.core.errors import AuthError, CapacityError, GpuherdError, ProviderError, ProviderTimeout
from gpuherd.core.offers import normalise_gpu_name
from gpuherd.core.providers.base import CreateRequest, ProviderInstance, ProviderState
from gpuherd.core.retry import provider_call

from .harness import Harness, make_harness

PROVIDERS = ["sandbox", "vast", "runpod", "aws", "surf"]
BOOTING = {ProviderState.PROVISIONING, ProviderState.LOADING, ProviderState.STARTING, ProviderState.RUNNING}


@pytest.fixture(params=PROVIDERS)
async def h(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Harness]:
    harness = await make_harness(request.param, tmp_path)
    try:
        yield harness
    finally:
        await harness.close()


async def _no_sleep(_: float) -> None:
    await asyncio.sleep(0)


async def call(h: Harness, fn):
    """As the service calls a provider: retried unless the client retries itself."""
    return await provider_call(h.provider, fn, sleep=_no_sleep)


def a_read(h: Harness):
    """The read a fault test breaks: search, or list where the provider has no offers."""
    return ("search", h.provider.search) if h.provider.capabilities.can_search else ("list", h.provider.list)


def needs(h: Harness, capability: str) -> None:
    if not getattr(h.provider.capabilities, capability):
        pytest.skip(f"{h.name} does not {capability.removeprefix('can_')} (checked in test_refused_operations)")


async def cheapest(h: Harness, *, max_gpus: int = 1):
    offers = await call(h, h.provider.search)
    fitting = [o for o in offers if o.num_gpus <= max_gpus] or offers
    return min(fitting, key=lambda o: o.dph)


async def boot(h: Harness, label: str = "gh-conformance-1") -> ProviderInstance:
    if not h.provider.capabilities.can_create:
        return await h.existing(label)
    offer = await cheapest(h)
    return await h.provider.create(CreateRequest(offer_id=offer.offer_id, label=label,
                                                 image="vllm/vllm-openai:v0.6.3", ports=[8000],
                                                 env={"HF_TOKEN": "hf_secret_value"}, disk_gb=50,
                                                 onstart="echo ready"))


async def walk_until(h: Harness, provider_id: str, want: ProviderState, allowed: set[ProviderState],
                     steps: int = 60) -> list[ProviderState]:
    seen: list[ProviderState] = []
    for _ in range(steps):
        got = await call(h, lambda: h.provider.get(provider_id))
        assert got is not None, f"{h.name} lost {provider_id} while waiting for {want.value}"
        if not seen or seen[-1] is not got.state:
            seen.append(got.state)
        assert got.state in allowed | {want}, f"{h.name}: unexpected {got.state.value} on the way to {want.value}: {seen}"
        if got.state is want:
            return seen
        await h.settle()
        await asyncio.sleep(0.01)
    raise AssertionError(f"{h.name}: never reached {want.value}: {seen}")


# ------------------------------------------------------------------------------------ offers

async def test_search_returns_normalised_offers(h: Harness):
    needs(h, "can_search")
    offers = await call(h, h.provider.search)
    assert offers, f"{h.name} returned no offers"
    for o in offers[:200]:
        assert o.provider == h.name
        assert o.offer_id and not re.search(r"\s", o.offer_id), o.offer_id
        assert o.gpu_name == normalise_gpu_name(o.gpu_name), o.gpu_name
        assert 1 <= o.num_gpus <= 16
        assert 4 <= o.gpu_ram <= 300, f"{o.gpu_name}: gpu_ram {o.gpu_ram} is not GB per GPU"
        assert isinstance(o.dph, Decimal) and Decimal("0.01") < o.dph < Decimal(200)
        assert isinstance(o.storage_cost, Decimal) and o.storage_cost >= 0
        assert o.price_time is not None, "every offer says how old its price is"
    refs = [o.ref for o in offers]
    assert len(refs) == len(set(refs)), "offer ids are unique"


async def test_an_offer_can_be_looked_up_by_id(h: Harness):
    needs(h, "can_search")
    offer = await cheapest(h)
    again = await call(h, lambda: h.provider.get_offer(offer.offer_id))
    assert again is not None and again.offer_id == offer.offer_id and again.gpu_name == offer.gpu_name


# ------------------------------------------------------------------------------- lifecycle

async def test_full_lifecycle(h: Harness):
    caps = h.provider.capabilities
    created = await boot(h)
    assert created.provider == h.name and created.provider_id
    if caps.can_create:
        assert created.label == "gh-conformance-1"
    assert created.state in BOOTING

    listed = await call(h, h.provider.list)
    mine = [p for p in listed if p.provider_id == created.provider_id]
    assert len(mine) == 1 and mine[0].label == created.label, "list finds the machine (by its label)"

    await walk_until(h, created.provider_id, ProviderState.RUNNING, BOOTING)
    running = await call(h, lambda: h.provider.get(created.provider_id))
    assert running is not None
    if caps.can_create:  # SURF bills credits from a wallet, not dollars, and names no GPU
        assert running.dph > 0 and running.num_gpus >= 1

    if caps.can_stop:
        await call(h, lambda: h.provider.stop(created.provider_id))
        await walk_until(h, created.provider_id, ProviderState.STOPPED, {ProviderState.RUNNING, ProviderState.STOPPING})
        stopped = await call(h, lambda: h.provider.get(created.provider_id))
        assert stopped is not None
        if caps.storage_bills_while_stopped:
            assert stopped.storage_dph > 0, "a stopped machine's storage cost is known"
        await call(h, lambda: h.provider.start(created.provider_id))
        await walk_until(h, created.provider_id, ProviderState.RUNNING, BOOTING | {ProviderState.STOPPED})

    if not caps.can_destroy:
        with pytest.raises(ProviderError) as err:
            await h.provider.destroy(created.provider_id)
        assert h.display in err.value.message
        return
    await call(h, lambda: h.provider.destroy(created.provider_id))
    for _ in range(30):
        gone = await call(h, lambda: h.provider.get(created.provider_id))
        if gone is None or gone.state is ProviderState.DESTROYED:
            break
        await h.settle()
    else:
        raise AssertionError(f"{h.name}: still there after destroy: {gone}")
    await call(h, lambda: h.provider.destroy(created.provider_id))  # twice is fine
    after = [p for p in await call(h, h.provider.list)
             if p.provider_id == created.provider_id and p.state is not ProviderState.DESTROYED]
    assert after == []


async def test_unknown_machine_is_none_not_an_error(h: Harness):
    unknown = {"sandbox": "sb-i-999999", "vast": "99999999", "runpod": "zzzzzzzzzzzzzz",
               "aws": "i-0123456789abcdef0", "surf": "00000000-0000-4000-8000-000000000000"}[h.name]
    assert await call(h, lambda: h.provider.get(unknown)) is None


# ----------------------------------------------------------------------------------- faults

async def test_rate_limit_with_retry_after_is_waited_out(h: Harness):
    h.inject("list", "rate_limit", retry_after=0.05)
    listed = await call(h, h.provider.list)
    assert isinstance(listed, list)


async def test_server_error_is_a_provider_error(h: Harness):
    if "server_error" not in h.faults:
        pytest.skip(f"{h.name} cannot inject server errors")
    op, fn = a_read(h)
    h.inject(op, "server_error", times=10)
    with pytest.raises(ProviderError) as err:
        await call(h, fn)
    assert h.display in err.value.message


async def test_timeout_is_a_provider_timeout_and_bounded(h: Harness):
    h.inject("get", "timeout", times=10)
    started = time.monotonic()
    with pytest.raises(ProviderTimeout) as err:
        await call(h, lambda: h.provider.get("1"))
    assert h.display in err.value.message
    assert time.monotonic() - started < 10


async def test_malformed_json_is_named(h: Harness):
    if "malformed" not in h.faults:
        pytest.skip(f"{h.name} answers no JSON to break")
    op, fn = a_read(h)
    h.inject(op, "malformed", times=10)
    with pytest.raises(ProviderError) as err:
        await call(h, fn)
    assert "malformed" in err.value.message.lower() and h.display in err.value.message


async def test_capacity_error_on_create(h: Harness):
    needs(h, "can_create")
    offer = await cheapest(h)
    h.inject("create", "capacity")
    with pytest.raises(CapacityError) as err:
        await h.provider.create(CreateRequest(offer_id=offer.offer_id, label="gh-cap", image="x/y:1"))
    assert h.display in err.value.message


async def test_auth_failure_names_provider_not_key(h: Harness):
    if "auth" not in h.faults:
        pytest.skip(f"{h.name} has no credentials to refuse")
    h.inject("list", "auth", times=10)
    with pytest.raises(AuthError) as err:
        await call(h, h.provider.list)
    message = err.value.message
    assert h.display in message and ("refused" in message or "rejected" in message)
    assert h.secret and h.secret not in message and h.secret not in str(err.value)


async def test_errors_are_typed_not_raw(h: Harness):
    """Whatever the fault, nothing but a GpuherdError leaves a provider."""
    for kind in sorted(h.faults - {"timeout"}):
        op = "create" if kind == "capacity" else "list"
        if op == "create" and not h.provider.capabilities.can_create:
            continue
        h.inject(op, kind, times=10)
        try:
            if op == "create":
                await h.provider.create(CreateRequest(offer_id=(await cheapest(h)).offer_id,
                                                      label=f"gh-{kind}", image="x/y:1"))
            else:
                await h.provider.list()
        except GpuherdError:
            pass
        h.clear()


async def test_refused_operations_say_so_without_a_request(h: Harness):
    """What a provider cannot do is refused with a message naming it, before anything is sent."""
    caps = h.provider.capabilities
    if caps.can_create and caps.can_search and caps.can_destroy:
        pytest.skip(f"{h.name} refuses nothing")
    if not caps.can_search:
        assert await h.provider.search() == []
    if not caps.can_create:
        with pytest.raises(ProviderError) as err:
            await h.provider.create(CreateRequest(offer_id="x", label="gh-x", image="x/y:1"))
        assert h.display in err.value.message
