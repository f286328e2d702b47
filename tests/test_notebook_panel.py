"""The Jupyter panel (notebook_ext/panel.py) headless: widgets without a kernel (DummyComm), on
the `service` fixture's core through `Gpu(LocalBackend(service, guards=False), core=InlineCore())`,
so everything a button schedules runs on the test's loop and `panel.settle()` awaits it.

Covered: the first render (tabs, connection sentence, templates, offers, costs) and the pickers
(template, sort, order, period, group by); Boot -> a progress bar at 100 and healthy, a running
machine owned by the local user in core; a double-clicked Boot boots once; Stop, Start, Keep;
Destroy's Yes/No row (No keeps it, Yes destroys); a boot above the template's price limit asks
with $/h, $/day and $/month (No cancels, Yes boots); a viewer gets no Boot or Stop; an idle
warning from a guard pass appears with Keep and Stop and Keep keeps; errors from core and
others are a sentence, never a traceback; the cost ticks with the clock without a backend call;
the periodic refresh shows a machine booted elsewhere; Use in this notebook; close() stops it all."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from gpuherd.core.auth import Actor
from gpuherd.core.clock import VirtualClock
from gpuherd.core.guards import Guards
from gpuherd.core.models import InstanceState
from gpuherd.core.results import BootResult, InstanceView, ProgressEvent
from gpuherd.core.service import GpuService
from gpuherd.notebook_ext.api import Gpu
from gpuherd.notebook_ext.backend import LocalBackend
from gpuherd.notebook_ext.corethread import InlineCore
from gpuherd.notebook_ext.panel import GpuPanel, InstanceRow, gpu_panel


async def _connect(service: GpuService) -> Gpu:
    gpu = Gpu(LocalBackend(service, guards=False), core=InlineCore())
    await gpu.aconnect()
    return gpu


async def _disconnect(gpu: Gpu) -> None:
    gpu.activity.close()
    await gpu.backend.close()
    gpu.closed = True
    for _ in range(3):
        await asyncio.sleep(0)        # the pinger's cancel, queued with call_soon_threadsafe


@pytest.fixture
async def gpu(service: GpuService) -> AsyncIterator[Gpu]:
    g = await _connect(service)
    yield g
    await _disconnect(g)


@pytest.fixture
async def panel(gpu: Gpu) -> AsyncIterator[GpuPanel]:
    p = gpu_panel(gpu, refresh_s=60)
    await p.settle()
    yield p
    p.close()


async def until(panel: GpuPanel, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        await panel.settle()
        if cond():
            return
        assert loop.time() < end, "the panel never got there"
        await asyncio.sleep(0.05)


async def view(service: GpuService, admin: Actor, iid: str) -> InstanceView:
    return await service.view(admin, iid)


async def mine(service: GpuService, admin: Actor) -> list[InstanceView]:
    return (await service.status(admin, include_ended=False, mine=True)).instances


def shown_ids(panel: GpuPanel) -> list[str]:
    """The machines the Instances tab shows, in its order."""
    by_box = {id(r.box): i for i, r in panel.instance_rows.items()}
    return [by_box[id(box)] for box in panel.instances_box.children]


def no_traceback(panel: GpuPanel) -> None:
    text = panel.status_line.value
    assert "Traceback" not in text and 'File "' not in text, text


async def boot_first(panel: GpuPanel) -> InstanceRow:
    """Boot the first offer with a Boot button; the machine's row once healthy."""
    row = next(r for r in panel.offer_rows if r.boot is not None)
    assert row.boot is not None
    row.boot.click()
    await panel.settle()
    assert panel.progress.value == 100, panel.phase.value
    (iid,) = [i for i, r in panel.instance_rows.items() if r.view.state is InstanceState.RUNNING]
    return panel.instance_rows[iid]


# --- first render and pickers -------------------------------------------------------------------

async def test_first_render_and_the_pickers_change_the_widgets(panel: GpuPanel, gpu: Gpu) -> None:
    assert [panel.tabs.get_title(i) for i in range(3)] == ["Offers", "Instances", "Costs"]
    assert panel.connection_line.value.count("Connected to local gpuherd") == 1
    assert "gpuherd-query" in panel.query._dom_classes and "gpuherd-progress" in panel.progress._dom_classes
    assert {"gpuherd-btn", "gpuherd-search"} <= set(panel.search_button._dom_classes)
    names = [value for _, value in panel.template.options]
    assert names[:3] == ["budget", "research", "high_performance"] and panel.template.value == "budget"
    assert len(panel.offer_rows) == 10 and all(r.boot is not None for r in panel.offer_rows)
    assert all(r.boot.description == "Boot" and "gpuherd-boot" in r.boot._dom_classes
               for r in panel.offer_rows if r.boot)
    assert 'data-running="0"' in panel.indicator.value and "none running" in panel.indicator.value
    assert 'data-period="this month' in panel.costs_html.value
    assert panel.confirm_row.layout.display == "none"

    # a query with one- and two-GPU offers; the template decides which get Boot
    panel.query.value = "limit=40"
    await panel.settle()
    assert len(panel.offer_rows) == 40
    singles = [r for r in panel.offer_rows if r.offer.num_gpus == 1]
    doubles = [r for r in panel.offer_rows if r.offer.num_gpus == 2]
    assert singles and doubles and all(r.boot is not None for r in singles) and all(r.boot is None for r in doubles)
    panel.template.value = "llama-3.1-70b"
    # core's fit rule decides (two GPUs, and a disk that holds the template's 120 GB)
    assert all((r.boot is not None) == ("llama-3.1-70b" in r.offer_view.fits) for r in panel.offer_rows)
    assert all(r.offer.num_gpus == 2 for r in panel.offer_rows if r.boot is not None)
    single = next(r for r in panel.offer_rows if r.offer.num_gpus == 1)
    assert "does not fit llama-3.1-70b" in single.box.children[1].value
    panel.query.value = "x2 limit=40"
    await panel.settle()
    assert any(r.boot is not None for r in panel.offer_rows)          # two-GPU offers with the disk
    assert all((r.boot is not None) == ("llama-3.1-70b" in r.offer_view.fits) for r in panel.offer_rows)

    # sorting: reliability descending, GPU RAM ascending, location
    panel.sort.value = "reliability"
    panel.order.value = "desc"
    rel = [r.offer.reliability for r in panel.offer_rows]
    assert rel == sorted(rel, reverse=True) and rel != [r.reliability for r in sorted(
        (r.offer for r in panel.offer_rows), key=lambda o: o.dph)]
    assert "reliability ▼" in panel.offers_head.value
    panel.sort.value = "gpu_ram"
    panel.order.value = "asc"
    ram = [r.offer.gpu_ram for r in panel.offer_rows]
    assert ram == sorted(ram)
    panel.sort.value = "dph"
    dph = [r.offer.dph for r in panel.offer_rows]
    assert dph == sorted(dph)

    # costs pickers
    panel.period.value = "today"
    await panel.settle()
    assert 'data-period="today"' in panel.costs_html.value
    panel.group_by.value = "template"
    await panel.settle()
    assert 'data-group-by="template"' in panel.costs_html.value and "by template" in panel.costs_html.value


# --- boot -----------------------------------------------------------------------------------------

async def test_boot_shows_progress_to_healthy_and_core_has_the_machine(panel: GpuPanel, service: GpuService,
                                                                        admin: Actor) -> None:
    row = await boot_first(panel)
    assert 'data-phase="healthy"' in panel.phase.value and panel.progress.bar_style == "success"
    assert panel.progress_box.layout.display == "flex"
    [v] = await mine(service, admin)
    assert v.id == row.view.id and v.state is InstanceState.RUNNING and v.owner == "local:alice"
    assert f'data-id="{v.id}" data-state="running"' in row.info.value
    assert set(row.buttons) == {"keep", "stop", "destroy"} and row.buttons["stop"].description == "Stop"
    assert {"gpuherd-btn", "gpuherd-stop"} <= set(row.buttons["stop"]._dom_classes)
    assert row.use is not None and "gpuherd-use" in row.use._dom_classes
    assert 'data-running="1"' in panel.indicator.value and "1 running · $" in panel.indicator.value
    assert "Booted" in panel.status_line.value
    no_traceback(panel)


async def test_double_click_boot_boots_once(panel: GpuPanel, service: GpuService, admin: Actor) -> None:
    boot = panel.offer_rows[0].boot
    assert boot is not None
    boot.click()
    boot.click()
    await panel.settle()
    assert len(await mine(service, admin)) == 1
    boot.click()                     # the same button on the same search, later: core replays the first answer
    await panel.settle()
    assert len(await mine(service, admin)) == 1
    assert "already booted with this request" in panel.status_line.value


# --- stop, start, keep, destroy --------------------------------------------------------------------

async def test_stop_then_start_and_the_buttons_follow_core(panel: GpuPanel, service: GpuService, admin: Actor) -> None:
    row = await boot_first(panel)
    iid = row.view.id
    row.buttons["stop"].click()
    row.buttons["stop"].click()
    await panel.settle()
    assert (await view(service, admin, iid)).state is InstanceState.STOPPED
    row = panel.instance_rows[iid]
    assert set(row.buttons) == {"start", "destroy"} and row.use is None
    assert 'data-state="stopped"' in row.info.value and "Stopped" in panel.status_line.value
    assert 'data-running="0"' in panel.indicator.value

    row.buttons["start"].click()
    await panel.settle()
    assert (await view(service, admin, iid)).state is InstanceState.RUNNING
    assert set(panel.instance_rows[iid].buttons) == {"keep", "stop", "destroy"}
    assert panel.progress.value == 100 and 'data-phase="healthy"' in panel.phase.value


async def test_keep_sets_keep_until(panel: GpuPanel, service: GpuService, admin: Actor) -> None:
    row = await boot_first(panel)
    assert (await view(service, admin, row.view.id)).keep_until is None
    keep = row.buttons["keep"]
    assert keep.description == "Keep 1 h" and "gpuherd-keep" in keep._dom_classes
    keep.click()
    await panel.settle()
    assert (await view(service, admin, row.view.id)).keep_until is not None
    assert "Keeping" in panel.status_line.value and "kept until" in panel.instance_rows[row.view.id].info.value


async def test_destroy_asks_no_keeps_it_yes_destroys(panel: GpuPanel, service: GpuService, admin: Actor) -> None:
    row = await boot_first(panel)
    iid = row.view.id
    row.buttons["destroy"].click()
    await panel.settle()
    assert panel.confirm_row.layout.display == "flex"
    assert iid in panel.question.value and re.search(r"\$\d+\.\d+/h", panel.question.value)
    assert "/day" in panel.question.value
    assert {"gpuherd-yes"} <= set(panel.confirm_yes._dom_classes) and "gpuherd-no" in panel.confirm_no._dom_classes
    assert panel.confirm_row.yes is panel.confirm_yes and panel.confirm_row.no is panel.confirm_no
    panel.confirm_no.click()
    await panel.settle()
    assert panel.confirm_row.layout.display == "none"
    assert (await view(service, admin, iid)).state is InstanceState.RUNNING
    assert iid in panel.instance_rows

    panel.instance_rows[iid].buttons["destroy"].click()
    await panel.settle()
    assert panel.confirm_row.layout.display == "flex"
    panel.confirm_yes.click()
    panel.confirm_yes.click()        # a double yes answers once
    await panel.settle()
    assert (await view(service, admin, iid)).state is InstanceState.DESTROYED
    assert iid not in panel.instance_rows and "Destroyed" in panel.status_line.value
    assert panel.confirm_row.layout.display == "none"


async def test_boot_above_the_price_limit_asks_with_its_cost(panel: GpuPanel, service: GpuService,
                                                            admin: Actor) -> None:
    panel.query.value = "dph>0.6 num_gpus=1"
    await panel.settle()
    assert panel.template.value == "budget"          # max $0.50/h
    row = panel.offer_rows[0]
    assert row.offer.dph > Decimal("0.5") and row.boot is not None
    row.boot.click()
    await panel.settle()
    assert panel.confirm_row.layout.display == "flex"
    q = panel.question.value
    assert "Price above limit" in q and re.search(r"\$\d+\.\d+/h · \$[\d,]+\.\d\d/day · \$[\d,]+\.\d\d/month", q), q
    panel.confirm_no.click()
    await panel.settle()
    assert panel.confirm_row.layout.display == "none" and await mine(service, admin) == []
    assert "Not done" in panel.status_line.value

    row.boot.click()
    await panel.settle()
    assert panel.confirm_row.layout.display == "flex"
    panel.confirm_yes.click()
    await panel.settle()
    [v] = await mine(service, admin)
    assert v.state is InstanceState.RUNNING and v.dph == row.offer.dph
    assert panel.progress.value == 100 and 'data-phase="healthy"' in panel.phase.value


# --- roles ------------------------------------------------------------------------------------------

async def test_a_viewer_gets_no_boot_and_no_stop(service: GpuService, admin: Actor) -> None:
    booted = await service.boot(admin, "budget", wait=True)
    assert isinstance(booted, BootResult)
    service.settings = service.settings.model_copy(update={"local_role": "viewer"})   # the configured local role
    gpu = await _connect(service)
    panel = gpu_panel(gpu, refresh_s=60)
    try:
        await panel.settle()
        assert gpu.connection is not None and gpu.connection.role == "viewer"
        assert panel.offer_rows and all(r.boot is None for r in panel.offer_rows)
        assert "viewers cannot boot" in panel.offer_rows[0].box.children[1].value
        row = panel.instance_rows[booted.instance.id]
        assert row.buttons == {} and 'data-state="running"' in row.info.value
    finally:
        panel.close()
        await _disconnect(gpu)


# --- notices -------------------------------------------------------------------------------------------

def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def test_idle_warning_appears_with_keep_and_stop_and_keep_keeps(panel: GpuPanel, service: GpuService,
                                                                     admin: Actor, clock: VirtualClock) -> None:
    row = await boot_first(panel)
    iid = row.view.id
    guards = Guards(service, http=httpx.AsyncClient(transport=httpx.MockTransport(_refuse)))
    try:
        clock.advance(timedelta(minutes=26))            # budget: idle 30 min, warned 5 min before
        report = await guards.run_pass()
        assert report.warned == 1
    finally:
        await guards.aclose()
    await until(panel, lambda: any(r.notice.notice_kind == "guard.warn_idle" for r in panel.notice_rows))
    [notice] = [r for r in panel.notice_rows if r.notice.notice_kind == "guard.warn_idle"]
    assert notice.notice.instance_id == iid and "idle for 26 min" in notice.box.children[0].value
    assert [b.description for b in notice.buttons.values()] == ["Keep 1 h", "Stop now"]
    assert "gpuherd-keep" in notice.buttons["keep"]._dom_classes and "gpuherd-stop" in notice.buttons["stop"]._dom_classes
    assert notice.box in panel.notices.children
    notice.buttons["keep"].click()
    await panel.settle()
    v = await view(service, admin, iid)
    assert v.keep_until is not None and v.keep_until > clock.now() and v.state is InstanceState.RUNNING
    assert notice.buttons["keep"].disabled
    assert notice.dismiss is not None and "gpuherd-dismiss" in notice.dismiss._dom_classes
    notice.dismiss.click()
    assert notice not in panel.notice_rows and notice.box not in panel.notices.children


async def test_notices_are_bounded_newest_first(panel: GpuPanel) -> None:
    from datetime import UTC, datetime

    from gpuherd.core.feed import FeedNotice

    for i in range(1, 14):
        panel._feed_item(FeedNotice(id=i, notice_kind="instance.ready", level="info", text=f"notice {i}",
                                    created_at=datetime(2026, 11, 10, tzinfo=UTC)))
    panel._feed_item(FeedNotice(id=13, notice_kind="instance.ready", level="info", text="again",
                                created_at=datetime(2026, 11, 10, tzinfo=UTC)))
    assert [r.notice.id for r in panel.notice_rows] == list(range(13, 3, -1))
    assert len(panel.notices.children) == 10 and "notice 13" in panel.notices.children[0].children[0].value


# --- errors -----------------------------------------------------------------------------------------------

async def test_errors_are_sentences_never_tracebacks(panel: GpuPanel, gpu: Gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    before = len(panel.offer_rows)
    panel.query.value = "gpu_ram>>"
    panel.search_button.click()
    await panel.settle()
    assert "Unknown operator" in panel.status_line.value and 'data-level="error"' in panel.status_line.value
    assert len(panel.offer_rows) == before              # the last good offers stay
    no_traceback(panel)

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug\nTraceback (most recent call last):")
    monkeypatch.setattr(gpu.backend, "costs", broken)
    panel.group_by.value = "team"
    await panel.settle()
    assert "gpuherd could not do that (RuntimeError)" in panel.status_line.value
    no_traceback(panel)


# --- ticking cost, periodic refresh, use, close --------------------------------------------------------------

async def test_the_cost_ticks_with_the_clock_without_a_backend_call(gpu: Gpu, service: GpuService,
                                                                   clock: VirtualClock,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    unsubscribe = gpu.backend.subscribe(seen.append)
    panel = gpu_panel(gpu, refresh_s=60)
    try:
        await panel.settle()
        row = await boot_first(panel)
        # the feed's own copy of the boot's last event reloads the tab once more: let it come first
        await until(panel, lambda: any(isinstance(e.item, ProgressEvent) and e.item.final for e in seen))
        calls: list[str] = []
        original = gpu.backend.status

        async def counted(*a: Any, **kw: Any) -> Any:
            calls.append("status")
            return await original(*a, **kw)
        monkeypatch.setattr(gpu.backend, "status", counted)

        def shown() -> Decimal:
            m = re.search(r">\$([\d,]+\.\d{4})<", row.cost.value)
            assert m, row.cost.value
            return Decimal(m.group(1).replace(",", ""))
        start = shown()
        clock.advance(timedelta(hours=1))
        panel.tick()
        after = shown()
        assert after - start == pytest.approx(row.view.current_dph, abs=Decimal("0.0001"))
        clock.advance(timedelta(hours=1))
        await until(panel, lambda: shown() > after, timeout=3)   # the periodic task's own tick
        assert calls == []
    finally:
        unsubscribe()
        panel.close()


async def test_the_periodic_refresh_shows_a_machine_booted_elsewhere(gpu: Gpu, service: GpuService,
                                                                    admin: Actor) -> None:
    panel = gpu_panel(gpu, refresh_s=0.2)
    try:
        await panel.settle()
        assert panel.instance_rows == {}
        booted = await service.boot(admin, "budget", wait=True)
        assert isinstance(booted, BootResult)
        await until(panel, lambda: booted.instance.id in panel.instance_rows, timeout=5)
    finally:
        panel.close()


async def test_use_in_this_notebook(panel: GpuPanel, gpu: Gpu) -> None:
    row = await boot_first(panel)
    assert row.use is not None and row.use.description == "Use in this notebook"
    row.use.click()
    assert gpu.activity.instance_id == row.view.id
    assert f"Keeping {row.view.id} alive" in panel.activity_line.value
    assert panel.instance_rows[row.view.id].use.disabled


async def test_close_stops_the_tasks_and_listening(gpu: Gpu) -> None:
    listeners = len(gpu.backend._listeners)
    panel = gpu_panel(gpu, refresh_s=0.2)
    assert len(gpu.backend._listeners) == listeners + 1
    await panel.settle()
    ticker = panel.ticker
    assert ticker is not None and not ticker.done()
    panel.search_button.click()                          # a task in flight when closing
    panel.close()
    await asyncio.sleep(0.05)
    assert ticker.done() and all(t.done() for t in panel._tasks)
    assert len(gpu.backend._listeners) == listeners
    assert panel.comm is None and panel.tabs.comm is None and panel.progress.comm is None
    panel.close()                                        # twice is fine
    panel.search_button.click()                          # a closed panel schedules nothing
    assert not [t for t in panel._tasks if not t.done()]


async def test_machines_beyond_a_page_are_paged(gpu: Gpu, service: GpuService, admin: Actor) -> None:
    panel = GpuPanel(gpu, refresh_s=60, page_rows=2)
    panel.start()
    try:
        await panel.settle()
        assert panel.page.layout.display == "none"
        ids = []
        for _ in range(3):
            booted = await service.boot(admin, "budget", wait=True)
            assert isinstance(booted, BootResult)
            ids.append(booted.instance.id)
        await panel.refresh()
        newest = [v.id for v in await mine(service, admin)]
        assert sorted(newest) == sorted(ids)
        assert shown_ids(panel) == newest[:2] and panel.page.layout.display == "flex"
        assert [label for label, _ in panel.page.options] == ["1–2 of 3", "3–3 of 3"]
        assert 'data-running="3"' in panel.indicator.value      # the light counts every machine, not the page
        panel.page.value = 1
        await panel.settle()
        assert shown_ids(panel) == newest[2:] and list(panel.instance_rows) == newest[2:]
    finally:
        panel.close()
