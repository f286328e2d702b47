"""The simulated marketplace: deterministic offers, a lazily computed state machine on a virtual
clock, persistence across processes, and injected faults."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from gpuherd.core.clock import VirtualClock
from gpuherd.core.errors import (
    CapacityError,
    ProviderError,
    ProviderStateError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from gpuherd.core.offers import quote
from gpuherd.core.providers import sandbox as sandbox_module
from gpuherd.core.providers.base import CreateRequest, ProviderState
from gpuherd.core.providers.sandbox import SIMULATED_NOTE, SandboxProvider, parse_faults

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MODELS = ("RTX 3090", "RTX 4090", "RTX A6000", "L40S", "A100 40GB", "A100 80GB", "H100 SXM",
          "H100 PCIE", "H200")


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(T0)


@pytest.fixture
def state_file(tmp_path):
    return tmp_path / "sandbox.json"


@pytest.fixture
def sandbox(state_file, clock) -> SandboxProvider:
    return SandboxProvider(state_file, clock=clock)


def request(offer_id: str = "sb-0001", label: str = "gh-test-1", **kw) -> CreateRequest:
    return CreateRequest(offer_id=offer_id, label=label, image="vllm/vllm-openai:latest", **kw)


def dumped(offers):
    return [o.model_dump() for o in offers]


def machines_dir(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".d") / "machines"


def machine_file(state_file: Path, provider_id: str) -> dict:
    return json.loads((machines_dir(state_file) / f"{provider_id}.json").read_text())


# ---------------------------------------------------------------------------- offers


async def test_same_seed_gives_identical_offers(clock):
    a = await SandboxProvider(seed=7, clock=clock).search()
    b = await SandboxProvider(seed=7, clock=clock).search()
    assert dumped(a) == dumped(b)


async def test_different_seed_gives_different_offers(clock):
    a = await SandboxProvider(seed=1, clock=clock).search()
    b = await SandboxProvider(seed=2, clock=clock).search()
    assert dumped(a) != dumped(b)


async def test_catalogue_covers_models_with_plausible_fields(sandbox, clock):
    offers = await sandbox.search()
    assert 250 <= len(offers) <= 350
    assert {o.gpu_name for o in offers} == set(MODELS)
    ids = [o.offer_id for o in offers]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"sb-\d{4}", i) for i in ids)
    for o in offers:
        assert o.provider == "sandbox" and o.simulated
        assert o.fetched_at == clock.now()
        assert o.num_gpus in (1, 2, 4, 8)
        # compute (to the tenth of a cent) plus a SEARCH_DISK_GB disk, exact to the micro-dollar
        assert o.dph == o.dph.quantize(Decimal("0.000001")) and o.dph > 0
        assert o.dph - quote(Decimal(0), o.storage_cost) == (o.dph - quote(Decimal(0), o.storage_cost)).quantize(Decimal("0.001"))
        assert 0.90 <= o.reliability <= 0.999
        assert Decimal("0.10") <= o.storage_cost <= Decimal("0.30")
        assert re.fullmatch(r".+, [A-Z]{2}", o.location) and o.location.endswith(o.country)
        assert o.cpu_cores > 0 and o.cpu_ram > 0 and o.disk_space >= 20 and o.inet_down > 0
    by_model = {m: [o for o in offers if o.gpu_name == m] for m in MODELS}
    assert {o.gpu_ram for o in by_model["RTX 4090"]} == {24}
    assert {o.gpu_ram for o in by_model["A100 80GB"]} == {80}
    assert {o.gpu_ram for o in by_model["H200"]} == {141}
    # the model token is a word of its own, so "a100" / "h100" / "4090" match it
    assert all("4090" in o.gpu_name.lower().split() for o in by_model["RTX 4090"])
    assert all("h100" in o.gpu_name.lower().split() for o in by_model["H100 SXM"])
    # a few unverified, most of them single-GPU
    unverified = sum(not o.verified for o in offers)
    assert 0.03 * len(offers) <= unverified <= 0.2 * len(offers)
    assert sum(o.num_gpus == 1 for o in offers) > sum(o.num_gpus == 8 for o in offers)


async def test_price_ordering_is_plausible(sandbox):
    offers = await sandbox.search()

    def median(model: str) -> float:
        return statistics.median(float(o.dph_per_gpu) for o in offers if o.gpu_name == model)

    assert median("H200") > median("H100 SXM") > median("A100 80GB") > median("RTX 4090")
    assert median("RTX 4090") > median("RTX 3090")
    assert median("A100 80GB") > median("A100 40GB")
    assert 0.14 <= min(float(o.dph_per_gpu) for o in offers if o.gpu_name == "RTX 3090")
    assert max(float(o.dph_per_gpu) for o in offers if o.gpu_name == "H200") <= 4.6


async def test_dph_is_per_gpu_price_times_gpus(sandbox):
    offers = await sandbox.search()
    multi = [o for o in offers if o.num_gpus > 1]
    assert multi
    for o in multi:
        assert abs(o.dph - o.dph_per_gpu * o.num_gpus) < Decimal("0.001")


async def test_prices_drift_slightly_and_deterministically(clock):
    sandbox = SandboxProvider(clock=clock)
    before = {o.offer_id: o.dph for o in await sandbox.search()}
    clock.advance(timedelta(days=1))
    after = {o.offer_id: o.dph for o in await sandbox.search()}
    assert before != after
    assert all(abs(after[k] - before[k]) <= before[k] * Decimal("0.05") for k in before)
    again = {o.offer_id: o.dph for o in await SandboxProvider(clock=clock).search()}
    assert again == after
    flat = SandboxProvider(clock=clock, price_drift=0)
    clock.advance(timedelta(days=1))
    first = dumped(await flat.search())
    clock.advance(timedelta(days=3))
    assert [o["dph"] for o in first] == [o.dph for o in await flat.search()]


async def test_get_offer_finds_by_id(sandbox):
    offer = await sandbox.get_offer("sb-0003")
    assert offer is not None and offer.offer_id == "sb-0003"
    assert await sandbox.get_offer("sb-9999") is None


def test_identity_and_capabilities():
    assert SandboxProvider.name == "sandbox"
    assert SandboxProvider.display_name == "Sandbox (simulated)"
    caps = SandboxProvider.capabilities
    assert caps.simulated and caps.reports_gpu_utilisation and caps.storage_bills_while_stopped
    assert caps.can_stop and caps.can_start
    assert "Simulated" in SIMULATED_NOTE and "no real charges" in SIMULATED_NOTE


# ---------------------------------------------------------------------------- state machine


async def test_full_state_walk(sandbox, clock):
    offer = await sandbox.get_offer("sb-0005")
    created = await sandbox.create(request("sb-0005", disk_gb=50))
    assert re.fullmatch(r"sbx-\d{6}", created.provider_id)
    assert created.state is ProviderState.PROVISIONING
    assert created.endpoint is None and created.gpu_util is None and created.healthy is False
    assert created.gpu_name == offer.gpu_name and created.num_gpus == offer.num_gpus
    assert created.dph == offer.dph
    assert created.storage_dph == offer.storage_rate(50) > 0
    pid = created.provider_id

    seen = []
    for _ in range(120):  # two virtual minutes, one second at a time
        inst = await sandbox.get(pid)
        if not seen or seen[-1] is not inst.state:
            seen.append(inst.state)
        if inst.healthy:
            break
        clock.advance(1)
    assert seen == [ProviderState.PROVISIONING, ProviderState.LOADING, ProviderState.RUNNING]
    assert inst.state is ProviderState.RUNNING and inst.healthy is True
    assert inst.endpoint and ".invalid" in inst.endpoint
    assert inst.gpu_util is not None and 0 <= inst.gpu_util <= 100
    assert inst.started_at is not None and T0 < inst.started_at <= clock.now()
    # nominal 10 s + 40 s + 5 s, each within +-30 %
    assert 35 <= (clock.now() - T0).total_seconds() <= 75

    stopping = await sandbox.stop(pid)
    assert stopping.state is ProviderState.STOPPING
    clock.advance(10)
    stopped = await sandbox.get(pid)
    assert stopped.state is ProviderState.STOPPED
    assert stopped.endpoint is None and stopped.gpu_util is None and stopped.healthy is False
    assert stopped.storage_dph == created.storage_dph

    starting = await sandbox.start(pid)
    assert starting.state is ProviderState.STARTING
    clock.advance(8)  # starting takes 15 s +-30 %, i.e. at least 10.5 s
    assert (await sandbox.get(pid)).state is ProviderState.STARTING
    clock.advance(20)
    running = await sandbox.get(pid)
    assert running.state is ProviderState.RUNNING
    assert running.started_at > inst.started_at

    await sandbox.destroy(pid)
    assert await sandbox.get(pid) is None
    assert pid not in [i.provider_id for i in await sandbox.list()]


async def test_durations_vary_per_instance_but_are_deterministic(state_file, clock):
    sandbox = SandboxProvider(state_file, clock=clock)
    a = await sandbox.create(request(label="a"))
    b = await sandbox.create(request(label="b"))
    raw = {i.provider_id: machine_file(state_file, i.provider_id) for i in (a, b)}
    assert raw[a.provider_id]["durations"] != raw[b.provider_id]["durations"]
    other = SandboxProvider(clock=clock)  # in memory, same seed: same ids, same timings
    a2 = await other.create(request(label="a"))
    assert a2.provider_id == a.provider_id
    assert other._memory["instances"][a2.provider_id]["durations"] == raw[a.provider_id]["durations"]


async def test_time_scale_zero_is_instant(state_file, clock):
    sandbox = SandboxProvider(state_file, clock=clock, time_scale=0)
    inst = await sandbox.create(request())
    assert inst.state is ProviderState.RUNNING and inst.healthy is True and inst.endpoint
    assert (await sandbox.stop(inst.provider_id)).state is ProviderState.STOPPED
    assert (await sandbox.start(inst.provider_id)).state is ProviderState.RUNNING


async def test_time_scale_stretches_durations(clock):
    slow = SandboxProvider(clock=clock, time_scale=10)
    inst = await slow.create(request())
    clock.advance(300)  # past even the slowest unscaled boot (65 s); scaled it needs >= 350 s
    assert (await slow.get(inst.provider_id)).state in (ProviderState.PROVISIONING,
                                                         ProviderState.LOADING)
    clock.advance(1200)  # scaled boot takes at most 650 s, model load at most 65 s more
    booted = await slow.get(inst.provider_id)
    assert booted.state is ProviderState.RUNNING and booted.healthy is True


async def test_negative_time_scale_rejected():
    with pytest.raises(ValueError):
        SandboxProvider(time_scale=-1)


async def test_endpoint_uses_requested_port(clock):
    sandbox = SandboxProvider(clock=clock, time_scale=0)
    inst = await sandbox.create(request(ports=[8080]))
    assert inst.endpoint.endswith(":8080")
    assert (await sandbox.create(request(label="x"))).endpoint.endswith(":8000")


async def test_gpu_util_is_deterministic_and_idle_until_used(clock):
    a = SandboxProvider(clock=clock, time_scale=0)
    b = SandboxProvider(clock=clock, time_scale=0)
    pa = (await a.create(request())).provider_id
    pb = (await b.create(request())).provider_id
    readings_a, readings_b = [], []
    for _ in range(60):
        clock.advance(60)
        readings_a.append((await a.get(pa)).gpu_util)
        readings_b.append((await b.get(pb)).gpu_util)
    assert readings_a == readings_b
    # nobody uses a freshly booted server: it reads as idle, which is what the idle guard needs
    assert all(u <= 5 for u in readings_a)
    a.set_gpu_util(pa, 87)
    assert (await a.get(pa)).gpu_util == 87
    a.set_gpu_util(pa, None)
    assert (await a.get(pa)).gpu_util == readings_a[-1]


async def test_fail_puts_instance_in_error_and_start_recovers(clock):
    sandbox = SandboxProvider(clock=clock, time_scale=0)
    pid = (await sandbox.create(request())).provider_id
    sandbox.fail(pid, "host lost power")
    broken = await sandbox.get(pid)
    assert broken.state is ProviderState.ERROR and "host lost power" in broken.message
    assert (await sandbox.start(pid)).state is ProviderState.RUNNING


# ---------------------------------------------------------------------------- persistence


async def test_persistence_across_provider_objects(state_file, clock):
    first = SandboxProvider(state_file, clock=clock)
    inst = await first.create(request(label="gh-team-alice-7"))
    second = SandboxProvider(state_file, clock=clock)
    seen = await second.get(inst.provider_id)
    assert seen is not None
    assert seen.label == "gh-team-alice-7"
    assert seen.dph == inst.dph and seen.gpu_name == inst.gpu_name
    clock.advance(120)
    assert (await second.get(inst.provider_id)).state is ProviderState.RUNNING
    await second.stop(inst.provider_id)
    clock.advance(30)
    assert (await first.get(inst.provider_id)).state is ProviderState.STOPPED
    # ids keep counting across objects
    other = await second.create(request(label="b"))
    assert other.provider_id != inst.provider_id
    await first.destroy(inst.provider_id)
    assert [i.provider_id for i in await second.list()] == [other.provider_id]
    assert not list(state_file.parent.rglob("*.tmp"))


async def test_in_memory_provider_writes_nothing(tmp_path, clock, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sandbox = SandboxProvider(clock=clock)
    await sandbox.create(request())
    assert len(await sandbox.list()) == 1
    assert list(tmp_path.iterdir()) == []
    assert await SandboxProvider(clock=clock).list() == []


async def test_label_round_trips_and_list_finds_it(sandbox):
    inst = await sandbox.create(request(label="gh-default-bob-42"))
    assert inst.label == "gh-default-bob-42"
    assert (await sandbox.get(inst.provider_id)).label == "gh-default-bob-42"
    assert [i.label for i in await sandbox.list()] == ["gh-default-bob-42"]


async def test_corrupt_state_file_is_reported(state_file, clock):
    state_file.write_text("{not json")
    with pytest.raises(ProviderError) as info:
        await SandboxProvider(state_file, clock=clock).list()
    assert str(state_file) in info.value.message


# ---------------------------------------------------------------------------- errors


async def test_unknown_offer_is_capacity_error(sandbox):
    with pytest.raises(CapacityError) as info:
        await sandbox.create(request("sb-9999"))
    assert "sb-9999" in info.value.message and "no longer available" in info.value.message
    assert await sandbox.list() == []


async def test_disk_larger_than_offer_is_refused(sandbox):
    offer = (await sandbox.search())[0]
    with pytest.raises(CapacityError):
        await sandbox.create(request(offer.offer_id, disk_gb=offer.disk_space + 1))


async def test_state_errors(sandbox, clock):
    assert await sandbox.get("sbx-999999") is None
    await sandbox.destroy("sbx-999999")  # destroying what is gone is not an error
    for call in (sandbox.start, sandbox.stop):
        with pytest.raises(ProviderStateError) as info:
            await call("sbx-999999")
        assert "sbx-999999" in info.value.message
        assert info.value.provider == "sandbox"

    pid = (await sandbox.create(request())).provider_id
    with pytest.raises(ProviderStateError):
        await sandbox.start(pid)  # provisioning
    clock.advance(120)
    with pytest.raises(ProviderStateError) as info:
        await sandbox.start(pid)  # running
    assert "running" in info.value.message
    await sandbox.stop(pid)
    with pytest.raises(ProviderStateError):
        await sandbox.stop(pid)  # stopping
    clock.advance(60)
    with pytest.raises(ProviderStateError) as info:
        await sandbox.stop(pid)  # stopped
    assert "stopped" in info.value.message
    await sandbox.destroy(pid)
    await sandbox.destroy(pid)
    assert await sandbox.get(pid) is None


async def test_stop_while_loading_is_allowed(sandbox, clock):
    pid = (await sandbox.create(request())).provider_id
    clock.advance(20)
    assert (await sandbox.get(pid)).state is ProviderState.LOADING
    assert (await sandbox.stop(pid)).state is ProviderState.STOPPING


# ---------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("kind", "error"),
    [("capacity", CapacityError), ("timeout", ProviderTimeout), ("rate_limit", RateLimited),
     ("unavailable", ProviderUnavailable)],
)
async def test_injected_fault_kinds(clock, kind, error):
    sandbox = SandboxProvider(clock=clock)
    sandbox.inject(kind, count=2, on="create")
    for _ in range(2):
        with pytest.raises(error) as info:
            await sandbox.create(request())
        assert info.value.provider == "sandbox"
    assert await sandbox.list() == []  # the failed calls had no effect
    assert (await sandbox.create(request())).state is ProviderState.PROVISIONING
    if kind == "rate_limit":
        sandbox.inject("rate_limit")
        with pytest.raises(RateLimited) as info:
            await sandbox.search()
        assert info.value.retry_after and info.value.retry_after > 0


async def test_inject_on_filters_methods(clock):
    sandbox = SandboxProvider(clock=clock)
    sandbox.inject("timeout", on="stop")
    assert len(await sandbox.search()) > 0
    pid = (await sandbox.create(request())).provider_id
    with pytest.raises(ProviderTimeout):
        await sandbox.stop(pid)
    assert (await sandbox.stop(pid)).state is ProviderState.STOPPING


async def test_inject_without_on_hits_next_call(clock):
    sandbox = SandboxProvider(clock=clock)
    sandbox.inject("unavailable")
    with pytest.raises(ProviderUnavailable):
        await sandbox.list()
    assert await sandbox.list() == []
    sandbox.inject("capacity")  # capacity waits for a call that claims GPUs
    assert await sandbox.search()
    with pytest.raises(CapacityError):
        await sandbox.create(request())


async def test_timeout_after_takes_effect_then_raises(clock):
    sandbox = SandboxProvider(clock=clock)
    sandbox.inject("timeout_after", on="create")
    with pytest.raises(ProviderTimeout):
        await sandbox.create(request(label="gh-lost-1"))
    assert [i.label for i in await sandbox.list()] == ["gh-lost-1"]


async def test_inject_rejects_unknown_kind_and_method(sandbox):
    with pytest.raises(ValueError, match="explode"):
        sandbox.inject("explode")
    with pytest.raises(ValueError, match="reboot"):
        sandbox.inject("timeout", on="reboot")


@pytest.mark.parametrize(
    ("kind", "error", "method"),
    [("capacity", CapacityError, "create"), ("timeout", ProviderTimeout, "search"),
     ("rate_limit", RateLimited, "list"), ("unavailable", ProviderUnavailable, "get")],
)
async def test_fault_string_certain_failure(clock, kind, error, method):
    sandbox = SandboxProvider(clock=clock, faults=f"{kind}=1")
    call = {"create": lambda: sandbox.create(request()), "search": sandbox.search,
            "list": sandbox.list, "get": lambda: sandbox.get("sbx-000001")}[method]
    with pytest.raises(error):
        await call()


async def test_fault_string_rates_are_deterministic_and_roughly_right(clock):
    async def outcomes(seed: int) -> list[str]:
        sandbox = SandboxProvider(clock=clock, seed=seed, faults="timeout=0.2, rate_limit=0.1")
        result = []
        for _ in range(400):
            try:
                await sandbox.list()
                result.append("ok")
            except ProviderTimeout:
                result.append("timeout")
            except RateLimited:
                result.append("rate_limit")
        return result

    first = await outcomes(3)
    assert first == await outcomes(3)
    assert first != await outcomes(4)
    assert 40 <= first.count("timeout") <= 120
    assert 15 <= first.count("rate_limit") <= 70
    assert first.count("ok") >= 220


async def test_capacity_rate_spares_calls_that_claim_nothing(clock):
    sandbox = SandboxProvider(clock=clock, faults="capacity=1")
    assert await sandbox.search()
    assert await sandbox.list() == []
    with pytest.raises(CapacityError):
        await sandbox.create(request())


def test_parse_faults():
    assert parse_faults("") == {}
    assert parse_faults(" capacity=0.2 , timeout=0.1,rate_limit=0.1,unavailable=0.05") == {
        "capacity": 0.2, "timeout": 0.1, "rate_limit": 0.1, "unavailable": 0.05}
    with pytest.raises(ValueError, match="gremlins"):
        parse_faults("capacity=0.1,gremlins=0.5")
    with pytest.raises(ValueError, match="gremlins"):
        SandboxProvider(faults="gremlins=0.5")
    with pytest.raises(ValueError):
        parse_faults("timeout=lots")
    with pytest.raises(ValueError):
        parse_faults("timeout=1.5")
    with pytest.raises(ValueError):
        parse_faults("timeout=0.7,capacity=0.7")


async def test_clear_faults(clock):
    sandbox = SandboxProvider(clock=clock, faults="unavailable=1")
    sandbox.inject("timeout")
    sandbox.clear_faults()
    assert await sandbox.list() == []


# ---------------------------------------------------------------------------- storage at scale


def seed_machines(sandbox: SandboxProvider, n: int) -> list[str]:
    """n running machines (at time_scale=0), written in one go through the bulk hook."""
    with sandbox._state(write=True) as state:
        template = {
            "label": None, "offer_id": "sb-0001", "gpu_name": "RTX 4090", "num_gpus": 1,
            "gpu_ram": 24, "location": "Oregon, US", "dph": "0.4", "storage_dph": "0.01",
            "disk_gb": 20, "image": "vllm/vllm-openai:latest", "port": 8000,
            "created_at": T0.isoformat(), "action": "create", "action_at": T0.isoformat(),
            "durations": {"provisioning": 0.0, "loading": 0.0, "model": 0.0}, "gpu_util": None,
        }
        first = int(state["next_id"])
        ids = [f"sbx-{number:06d}" for number in range(first, first + n)]
        for number, pid in enumerate(ids, start=first):
            state["instances"][pid] = {**template, "provider_id": pid, "label": f"gh-seed-{number}"}
        state["next_id"] = first + n
    return ids


class IoLog:
    """Counts the sandbox's file reads and writes and notes the threads they ran on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = self.writes = self.bytes_written = self.scans = 0
        self.threads: set[int] = set()
        load, write, scandir = (sandbox_module._DirectoryStore._load, sandbox_module._write_json,
                                sandbox_module.os.scandir)

        def counted_load(store, path):
            self.reads += 1
            self.threads.add(threading.get_ident())
            return load(store, path)

        def counted_write(path, value):
            self.writes += 1
            self.bytes_written += len(sandbox_module._dumps(value))
            self.threads.add(threading.get_ident())
            return write(path, value)

        def counted_scandir(path):
            self.scans += 1
            self.threads.add(threading.get_ident())
            return scandir(path)

        monkeypatch.setattr(sandbox_module._DirectoryStore, "_load", counted_load)
        monkeypatch.setattr(sandbox_module, "_write_json", counted_write)
        monkeypatch.setattr(sandbox_module.os, "scandir", counted_scandir)

    def reset(self) -> None:
        self.reads = self.writes = self.bytes_written = self.scans = 0
        self.threads.clear()


async def test_event_loop_keeps_its_heartbeat_under_load(tmp_path):
    sandbox = SandboxProvider(tmp_path / "sandbox.json", time_scale=0)
    existing = seed_machines(sandbox, 2000)
    gc.collect()        # a full collection of what earlier tests left is not the sandbox's lateness
    lateness: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            due = loop.time() + 0.005
            await asyncio.sleep(0.005)
            lateness.append(loop.time() - due)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.02)
    creates = [sandbox.create(request(label=f"gh-load-{k}")) for k in range(200)]
    stops = [sandbox.stop(pid) for pid in existing[:200]]
    results = await asyncio.gather(*creates, *stops, sandbox.list(), sandbox.list())
    done.set()
    await beat
    await sandbox.aclose()
    assert {r.state for r in results[:200]} == {ProviderState.RUNNING}
    assert {r.state for r in results[200:400]} == {ProviderState.STOPPED}
    assert len({r.provider_id for r in results[:200]}) == 200
    assert len(await SandboxProvider(tmp_path / "sandbox.json", time_scale=0).list()) == 2200
    # A regression guard, not a benchmark: rewriting a 2,000-machine file on the loop per call
    # kept the heartbeat waiting for seconds. 0.5 s as in test_loop_lag: late in a full suite run,
    # the test process's own collector pauses (its heap holds every earlier test's leftovers)
    # reached 0.2 s on this 2-core machine.
    assert max(lateness) < 0.5, f"heartbeat was {max(lateness) * 1000:.0f} ms late"
    assert len(lateness) > 5


async def test_no_file_io_on_the_event_loop_thread(tmp_path, monkeypatch, clock):
    log = IoLog(monkeypatch)
    sandbox = SandboxProvider(tmp_path / "sandbox.json", clock=clock, time_scale=0)
    pid = (await sandbox.create(request())).provider_id
    await sandbox.get(pid)
    await sandbox.list()
    await sandbox.stop(pid)
    await sandbox.start(pid)
    await sandbox.destroy(pid)
    assert log.reads and log.writes and log.scans
    assert threading.get_ident() not in log.threads


async def _stop_cost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> tuple[float, IoLog]:
    sandbox = SandboxProvider(tmp_path / f"sandbox-{size}.json", time_scale=0)
    ids = seed_machines(sandbox, size)
    await sandbox.get(ids[0])  # the worker thread is up
    log = IoLog(monkeypatch)
    started = time.perf_counter()
    for pid in ids[:50]:
        await sandbox.stop(pid)
    elapsed = time.perf_counter() - started
    await sandbox.get(ids[-1])
    await sandbox.aclose()
    monkeypatch.undo()
    return elapsed, log


async def test_a_change_costs_the_same_at_100_and_5000_machines(tmp_path, monkeypatch):
    small_s, small = await _stop_cost(tmp_path, monkeypatch, 100)
    large_s, large = await _stop_cost(tmp_path, monkeypatch, 5000)
    # 50 stops read and write 50 records, and one get reads one, whatever the account holds
    assert (small.reads, small.writes, small.scans) == (51, 50, 0)
    assert (large.reads, large.writes, large.scans) == (51, 50, 0)
    assert large.bytes_written == small.bytes_written < 50 * 1024
    # generous: the single-file store took ~50 times longer at 5,000 machines
    assert large_s < 3 * small_s + 0.25, f"{small_s * 1000:.0f} ms vs {large_s * 1000:.0f} ms"


async def test_list_reads_only_what_changed(tmp_path, monkeypatch):
    path = tmp_path / "sandbox.json"
    sandbox = SandboxProvider(path, time_scale=0)
    ids = seed_machines(sandbox, 300)
    old = time.time() - 60  # as if written a minute ago: nothing is too recent to trust
    for name in os.listdir(machines_dir(path)):
        os.utime(machines_dir(path) / name, (old, old))
    os.utime(machines_dir(path), (old, old))
    log = IoLog(monkeypatch)
    assert len(await sandbox.list()) == 300
    assert log.reads == 300
    log.reset()
    assert len(await sandbox.list()) == 300
    assert (log.reads, log.scans) == (0, 0)  # the directory has not changed: nothing to read
    await SandboxProvider(path, time_scale=0).stop(ids[7])  # another process, say
    log.reset()
    listed = await sandbox.list()
    assert log.reads == 1 and log.scans == 1
    assert listed[7].state is ProviderState.STOPPED
    assert {i.state for i in listed[:7] + listed[8:]} == {ProviderState.RUNNING}
    log.reset()
    assert (await sandbox.get(ids[3])).state is ProviderState.RUNNING
    assert log.reads == 1 and log.scans == 0  # get reads one machine


# ---------------------------------------------------------------------------- several processes


async def test_two_providers_stopping_the_same_machines_never_both_win(tmp_path):
    path = tmp_path / "sandbox.json"
    a = SandboxProvider(path, time_scale=0)
    b = SandboxProvider(path, time_scale=0)  # its own worker thread: a real race on the lock
    ids = seed_machines(a, 100)
    outcomes = await asyncio.gather(*(p.stop(pid) for pid in ids for p in (a, b)),
                                    return_exceptions=True)
    for k in range(len(ids)):
        pair = outcomes[2 * k: 2 * k + 2]
        assert sum(not isinstance(o, BaseException) for o in pair) == 1
        assert sum(isinstance(o, ProviderStateError) for o in pair) == 1
    assert {i.state for i in await b.list()} == {ProviderState.STOPPED}
    created = await asyncio.gather(*(p.create(request(label=f"c{k}")) for k in range(40)
                                     for p in (a, b)))
    assert len({c.provider_id for c in created}) == 80
    assert len(await a.list()) == 180
    assert machine_file(path, ids[0])["action"] == "stop"
    assert not list(tmp_path.rglob("*.tmp"))


CHILD = r"""
import asyncio, sys, time
from pathlib import Path
from gpuherd.core.errors import ProviderStateError
from gpuherd.core.providers.base import CreateRequest
from gpuherd.core.providers.sandbox import SandboxProvider

async def main(path, go, command, *ids):
    sandbox = SandboxProvider(Path(path), time_scale=0)
    await sandbox.list()
    if command == "visit":
        await sandbox.stop(ids[0])
        made = await sandbox.create(CreateRequest(offer_id="sb-0002", label="gh-from-child",
                                                  image="img"))
        print(made.provider_id)
        return
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.001)
    won = 0
    for pid in ids:
        try:
            await sandbox.stop(pid)
            won += 1
        except ProviderStateError:
            pass
    print(won)

asyncio.run(main(*sys.argv[1:]))
"""


async def _child(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_a_machine_made_in_one_process_is_seen_in_another(tmp_path):
    path = tmp_path / "sandbox.json"
    sandbox = SandboxProvider(path, time_scale=0)
    mine = await sandbox.create(request(label="gh-mine"))
    assert [i.provider_id for i in await sandbox.list()] == [mine.provider_id]
    child = await _child(str(path), "-", "visit", mine.provider_id)
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, err.decode()
    theirs = out.decode().strip()
    assert theirs != mine.provider_id
    seen = await sandbox.get(theirs)
    assert seen is not None and seen.label == "gh-from-child"
    assert (await sandbox.get(mine.provider_id)).state is ProviderState.STOPPED
    assert [i.provider_id for i in await sandbox.list()] == sorted([mine.provider_id, theirs])


async def test_processes_racing_to_stop_the_same_machines(tmp_path):
    path, go = tmp_path / "sandbox.json", tmp_path / "go"
    sandbox = SandboxProvider(path, time_scale=0)
    ids = seed_machines(sandbox, 200)
    child = await _child(str(path), str(go), "race", *ids)
    assert child.stdout is not None
    assert (await asyncio.wait_for(child.stdout.readline(), 60)).strip() == b"ready"
    go.touch()
    won = 0
    for pid in ids:
        try:
            await sandbox.stop(pid)
            won += 1
        except ProviderStateError:
            pass
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, err.decode()
    assert won + int(out.decode()) == len(ids)  # every machine stopped exactly once
    listed = await sandbox.list()
    assert len(listed) == 200 and {i.state for i in listed} == {ProviderState.STOPPED}


# ---------------------------------------------------------------------------- old state file


async def test_old_single_file_state_is_migrated_once(state_file, clock):
    old = SandboxProvider(clock=clock)  # the records as version 1 stored them
    a = await old.create(request(label="gh-a"))
    b = await old.create(request(label="gh-b"))
    await old.destroy((await old.create(request(label="gh-gone"))).provider_id)
    clock.advance(120)
    await old.stop(b.provider_id)
    version_1 = {**old._memory, "version": 1}
    state_file.write_text(json.dumps(version_1, indent=1, sort_keys=True))
    (state_file.parent / "sandbox.json.lock").touch()

    migrated = SandboxProvider(state_file, clock=clock)
    listed = await migrated.list()
    assert [i.model_dump() for i in listed] == [i.model_dump() for i in await old.list()]
    assert [i.label for i in listed] == ["gh-a", "gh-b"]
    assert not state_file.exists()
    assert json.loads(state_file.with_name("sandbox.json.migrated").read_text()) == version_1
    # the counter carried over: ids are not reused
    fresh = await migrated.create(request(label="gh-c"))
    assert fresh.provider_id == "sbx-000004"
    again = SandboxProvider(state_file, clock=clock)
    await again.destroy(a.provider_id)
    assert [i.label for i in await SandboxProvider(state_file, clock=clock).list()] == ["gh-b", "gh-c"]


async def test_empty_old_state_file_migrates_to_nothing(state_file, clock):
    state_file.write_text("\n")
    sandbox = SandboxProvider(state_file, clock=clock)
    assert await sandbox.list() == []
    assert (await sandbox.create(request())).provider_id == "sbx-000001"


async def test_old_file_of_another_shape_is_reported(state_file, clock):
    state_file.write_text('{"machines": []}')
    with pytest.raises(ProviderError) as info:
        await SandboxProvider(state_file, clock=clock).get("sbx-000001")
    assert str(state_file) in info.value.message
    assert state_file.exists()  # left for the user to look at


async def test_corrupt_machine_file_is_reported(state_file, clock):
    sandbox = SandboxProvider(state_file, clock=clock)
    pid = (await sandbox.create(request())).provider_id
    (machines_dir(state_file) / f"{pid}.json").write_text("{half a rec")
    with pytest.raises(ProviderError) as info:
        await sandbox.get(pid)
    assert pid in info.value.message


async def test_ids_that_cannot_name_a_file_are_unknown(sandbox, state_file):
    await sandbox.create(request())
    for bad in ("../sandbox.json", "", ".hidden", "a/b", "sbx-000001.json/.."):
        assert await sandbox.get(bad) is None
        with pytest.raises(ProviderStateError):
            await sandbox.stop(bad)
        await sandbox.destroy(bad)
    assert len(await sandbox.list()) == 1


# ---------------------------------------------------------------------------- latency


async def test_latency_is_awaited_on_every_call_concurrently(clock):
    sandbox = SandboxProvider(clock=clock, time_scale=0, latency_s=0.05)
    loop = asyncio.get_running_loop()

    async def timed(call) -> float:
        started = loop.time()
        await call
        return loop.time() - started

    pid = (await sandbox.create(request())).provider_id
    for call in (sandbox.search(), sandbox.get(pid), sandbox.list(), sandbox.stop(pid),
                 sandbox.start(pid), sandbox.get_offer("sb-0001"), sandbox.destroy(pid)):
        assert await timed(call) >= 0.049
    # the latency is a wait, not work: twenty calls at once take one latency, not twenty
    assert await timed(asyncio.gather(*(sandbox.list() for _ in range(20)))) < 0.5
    sandbox.inject("unavailable", on="list")
    started = loop.time()
    with pytest.raises(ProviderUnavailable):
        await sandbox.list()
    assert loop.time() - started >= 0.049  # a failing call is slow too
    assert await timed(SandboxProvider(clock=clock).list()) < 0.049
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="latency_s"):
            SandboxProvider(latency_s=bad)


async def test_faults_under_latency_stay_in_call_order(clock):
    async def outcomes(latency: float) -> list[str]:
        sandbox = SandboxProvider(clock=clock, seed=5, faults="timeout=0.3", latency_s=latency)
        results = await asyncio.gather(*(sandbox.list() for _ in range(60)), return_exceptions=True)
        return ["timeout" if isinstance(r, ProviderTimeout) else "ok" for r in results]

    assert await outcomes(0.01) == await outcomes(0.0)


# ---------------------------------------------------------------------------- fit, config, damage


@pytest.mark.parametrize("seed", range(0, 40))
def test_every_builtin_template_has_offers_within_its_limits(seed):
    """Each seed's catalogue can boot every built-in: offers that pass the boot's fit rule
    (GPU count and RAM, disk) and, where the template has a price limit, are within it."""
    from gpuherd.core.templates import BUILTIN_TEMPLATES

    offers = [o for o in SandboxProvider(seed=seed)._offers_at(T0)]
    for template in BUILTIN_TEMPLATES:
        fitting = [o for o in offers if template.offer_rejection(o) is None]
        assert all(o.disk_space >= template.disk_gb for o in fitting)
        affordable = [o for o in fitting
                      if template.max_dph is None or o.dph_for(template.disk_gb) <= template.max_dph]
        assert len(affordable) >= 3, (seed, template.name)   # a boot tries up to three


@pytest.mark.parametrize("spec", ["timeout=1.5", "gremlins=0.1", "timeout=lots", "timeout", "timeout=nan",
                                  "timeout=0.7,capacity=0.7"])
def test_bad_faults_are_a_config_error_naming_the_setting(spec):
    from gpuherd.core.errors import ConfigError
    from gpuherd.core.providers.sandbox import SandboxFaultsError

    with pytest.raises(SandboxFaultsError) as info:
        SandboxProvider(faults=spec)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert info.value.message.startswith("GPUHERD_SANDBOX_FAULTS (or `sandbox_faults` in config.toml): ")
    assert "\n" not in info.value.message


def test_bad_faults_env_gives_one_line_and_exit_2(monkeypatch, capsys):
    from gpuherd.bot import cli

    monkeypatch.setenv("GPUHERD_SANDBOX_FAULTS", "timeout=1.5")
    assert cli.main(["search", "h100"]) == 2
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())   # the console wraps long lines
    assert "GPUHERD_SANDBOX_FAULTS" in text and "probability 1.5 is outside 0..1" in text
    assert "Traceback" not in text and "ValueError" not in text


async def test_state_file_that_is_not_text_is_reported(state_file, clock):
    state_file.write_bytes(b"\xff\xfe\x00garbage\x9c")
    with pytest.raises(ProviderError) as info:
        await SandboxProvider(state_file, clock=clock).create(request())
    assert str(state_file) in info.value.message and "not text" in info.value.message


async def test_state_directory_in_the_way_is_reported(state_file, clock):
    state_file.with_name(state_file.name + ".d").write_text("a file where the directory goes")
    with pytest.raises(ProviderError) as info:
        await SandboxProvider(state_file, clock=clock).create(request())
    assert str(state_file) in info.value.message


async def test_machine_record_missing_fields_is_reported(state_file, clock):
    sandbox = SandboxProvider(state_file, clock=clock)
    pid = (await sandbox.create(request())).provider_id
    (machines_dir(state_file) / f"{pid}.json").write_text(json.dumps({"provider_id": pid}))
    with pytest.raises(ProviderError) as info:
        await sandbox.get(pid)
    assert "damaged machine record" in info.value.message and str(state_file) in info.value.message
