"""gpuherd's Jupyter panel (ipywidgets 8): `gpu_panel()`, also what `%gpu panel` shows.

    Header    a light ("● 2 running · $1.20/h", grey when none run), where gpuherd runs and who
              runs its guards (`Connection.sentence`), and one line for the last answer or error.
    Notices   the user's notices (`backend.subscribe`), newest first, at most `MAX_NOTICES`, each
              with core's buttons (an idle warning's Keep and Stop) and Dismiss.
    Progress  the last boot (or start): an IntProgress fed by `backend.follow`, and core's
              questions (a price above the template's limit, a budget passed, a destroy) as a
              Yes/No row with what a yes costs.
    Offers    query (the shared query language) · template picker · sort · a row per offer with
              Boot where the offer fits the chosen template and core lets this user boot.
    Instances the user's own machines (`backend.status`, mine=True; a page of them at a time):
              state, $/h, a cost that ticks every second (`InstanceView.accrued_at`), idle for,
              next guard action, and core's buttons for each; "Use in this notebook" on a running
              one (`gpu.use`) and which machine this notebook keeps alive.
    Costs     period and grouping pickers -> `backend.costs`: run-rate, projection, budget bars,
              daily spend as CSS bars.

Decisions:
- A surface holds no business rule. Which buttons a machine has is `InstanceView.actions`, which
  a notice has is `FeedNotice.actions`; their words are `bot.replies.phrase`'s; pressing one is
  `backend.perform(action, key)`. An offer gets Boot only when core offered this user a boot of
  it (`OfferView.actions`) and the chosen template is one it fits (`OfferView.fits`); a viewer
  gets none. Answers are shown with the reply builders' own words (`stop_reply`, ...).
- Idempotency: a press's key is `presses.delivery_id(panel id, ref, the row's observed_at)` — the
  same button on the same render — and a boot's `(panel id, search number, offer ref, template)`,
  so a double click stops or boots once (core replays the first answer). A press whose key is
  still in flight is not sent twice either, which only saves a round trip.
- Nothing blocks the kernel. Every handler schedules a coroutine on the panel's loop (the
  kernel's, captured when the panel is built or first clicked) and returns; the coroutine awaits
  the core with `gpu.core.call(...)` (the core runs on its own thread in a kernel, `corethread`).
  Tasks are kept in `_tasks` until done; `settle()` awaits them all (tests, the benchmark).
  Without a running loop (a plain script) the first load runs with `gpu.core.run` and presses
  are scheduled on the core loop; the periodic task then does not run.
- Listener callbacks (`backend.subscribe`) and a followed boot's events come on the core loop;
  they hop to the panel's loop with `call_soon_threadsafe` before touching a widget.
- One periodic task per panel: every `TICK_S` it re-renders the ticking costs from the last
  status (no backend call), every `refresh_s` it reloads the Instances tab. A notice about a
  machine, or the end of an operation, reloads it at once (coalesced). The Costs tab reloads
  when a picker changes, when it is selected and after a boot, stop or destroy.
- The ticking cost uses the clock of the answer's own source: `observed_at` plus the time since
  the answer arrived, measured on the local core's clock (a `VirtualClock` in tests) or this
  process's monotonic clock remotely, so a notebook whose clock differs from the server's ticks
  from the right figure.
- Rows are kept across refreshes: a refresh updates the HTML of a machine's row and rebuilds its
  buttons only when core's actions changed. A row is seven widgets (~2.5 ms to build, and as
  many views for the front end to draw), so the tab shows `PAGE_ROWS` machines at a time with a
  page picker beyond (the header's light and the run-rate still count them all), new rows are
  built `ROW_CHUNK` at a time with the loop let go in between, and rows, buttons and cells share
  their Layout and Style widgets (`bench/bench_panel.py` has the figures).
- No traceback reaches the user: a GpuherdError shows its message and hint in the status line;
  anything else a short sentence, with the details logged at INFO (Python's last-resort handler
  would print WARNING and up, traceback included, into the cell).
- Stock widgets only, no `icon=` (icons load from a CDN in Voila), no Output (it needs the
  kernel's parent message in a callback). Every Button has the class `gpuherd-btn` and one of
  `gpuherd-{search,boot,start,stop,keep,destroy,use,yes,no,dismiss}`; the query has
  `gpuherd-query`, the progress bar `gpuherd-progress`. HTML conventions: `panel_html.py`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import ipywidgets as w
from ipywidgets.widgets.widget_string import HTMLStyle

from gpuherd.bot import presses, replies
from gpuherd.bot.replies import Reply
from gpuherd.core.actions import Action, Op
from gpuherd.core.errors import GpuherdError
from gpuherd.core.feed import FeedEntry, FeedNotice
from gpuherd.core.models import InstanceState
from gpuherd.core.money import rate
from gpuherd.core.results import (
    BootResult,
    Cancelled,
    Confirmation,
    CostReport,
    DestroyResult,
    InstanceView,
    KeepResult,
    OfferView,
    Phase,
    ProgressEvent,
    SearchResult,
    StartResult,
    StatusResult,
    StopResult,
    TemplateList,
)

from . import panel_html as ph
from .corethread import InlineCore

if TYPE_CHECKING:
    from .api import Gpu

log = logging.getLogger(__name__)
TICK_S = 1.0
MAX_NOTICES = 10
PAGE_ROWS = 20              # machines shown at once in the Instances tab (a page picker beyond)
ROW_CHUNK = 5               # new machine rows built before the loop is let go
TITLES = ("Offers", "Instances", "Costs")
SORTS = (("$/h", "dph"), ("GPU", "gpu"), ("GPU RAM", "gpu_ram"), ("reliability", "reliability"),
         ("location", "location"))
SORT_KEYS: dict[str, Callable[[OfferView], Any]] = {
    "dph": lambda v: v.offer.dph,
    "gpu": lambda v: (v.offer.gpu_name.lower(), v.offer.num_gpus),
    "gpu_ram": lambda v: (v.offer.gpu_ram, v.offer.num_gpus),
    "reliability": lambda v: v.offer.reliability,
    "location": lambda v: (v.offer.location or "~").lower(),
}
PERIODS = (("today", "today"), ("this week", "week"), ("this month", "month"))
GROUPS = ("user", "team", "template", "provider")
STYLES = {"default": "", "primary": "primary", "danger": "danger"}
Task = asyncio.Future[Any] | concurrent.futures.Future[Any]


def _close_tree(widget: w.Widget, shared: frozenset[int] = frozenset()) -> None:
    """Close a widget, its children and their own layouts and styles (not the shared ones, which
    other rows still use: `shared` holds their ids)."""
    for child in getattr(widget, "children", ()):
        _close_tree(child, shared)
    for name in ("layout", "style"):
        part = getattr(widget, name, None)
        if isinstance(part, w.Widget) and id(part) not in shared:
            with contextlib.suppress(Exception):
                part.close()
    with contextlib.suppress(Exception):
        widget.close()


@dataclass
class OfferRow:
    """One offer in the Offers tab; `boot` is None where it cannot be booted with the template."""

    offer_view: OfferView
    box: w.HBox
    boot: w.Button | None

    @property
    def offer(self) -> Any:
        return self.offer_view.offer


@dataclass
class InstanceRow:
    """One machine in the Instances tab: core's view as last read and its widgets."""

    view: InstanceView
    box: w.HBox
    info: w.HTML
    cost: w.HTML
    received: float                         # the panel clock's monotonic time when `view` arrived
    stamp: str                              # the render this row shows (its key part)
    buttons: dict[str, w.Button] = field(default_factory=dict)
    use: w.Button | None = None
    refs: tuple[str, ...] = ()


@dataclass
class NoticeRow:
    notice: FeedNotice
    box: w.HBox
    buttons: dict[str, w.Button] = field(default_factory=dict)
    dismiss: w.Button | None = None


class GpuPanel(w.VBox):
    """The panel (see the module docstring). Build it with `gpu_panel()`."""

    def __init__(self, gpu: Gpu, *, refresh_s: float = 5.0, page_rows: int = PAGE_ROWS,
                 monotonic: Callable[[], float] | None = None) -> None:
        self._closed = True                 # until built: a half-built panel's close() does nothing
        self.gpu = gpu
        self.refresh_s = max(0.1, float(refresh_s))
        self.page_rows = max(1, int(page_rows))
        # shared by every row, button and cell (never changed per widget): a Button with its own
        # Layout and ButtonStyle is three widgets, with shared ones one (a third of the time to build)
        self._row_layout = w.Layout(align_items="center", flex_flow="row wrap")
        self._btn_layout = w.Layout(width="auto")
        self._btn_style = w.ButtonStyle()
        self._html_layout = w.Layout()
        self._html_style = HTMLStyle()
        self._shared = frozenset(id(x) for x in (self._row_layout, self._btn_layout, self._btn_style,
                                                 self._html_layout, self._html_style))
        self._order: list[str] = []
        self._views: dict[str, InstanceView] = {}
        self._received = 0.0
        self._paging = False
        self.panel_id = uuid.uuid4().hex
        self._monotonic = monotonic
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[Task] = set()
        self.ticker: asyncio.Task[None] | None = None
        self._in_flight: set[str] = set()
        self._search_no = 0
        self._shown_search = 0               # the search number of the offers shown (boot keys)
        self._searching: str | None = None
        self._result: SearchResult | None = None
        self._status: StatusResult | None = None
        self._status_seq = self._status_applied = 0
        self._costs_seq = self._costs_applied = 0
        self._render = 0
        self._question: Confirmation | None = None
        self._question_about: InstanceView | None = None
        self._following: str | None = None
        self._want: dict[str, Task] = {}
        self.offer_rows: list[OfferRow] = []
        self.instance_rows: dict[str, InstanceRow] = {}
        self.notice_rows: list[NoticeRow] = []
        self.last_error: str | None = None

        # header
        self.indicator = self._html(ph.indicator(0, None))
        self.connection_line = self._html(ph.status("Connecting…", "info"))
        self.status_line = self._html("")
        header = w.VBox([w.HBox([self.indicator, self.connection_line], layout=w.Layout(align_items="center")),
                         self.status_line])
        header.add_class("gpuherd-header")
        # notices
        self.notices = w.VBox([])
        self.notices.add_class("gpuherd-notices")
        # progress and questions
        self.progress = w.IntProgress(value=0, min=0, max=100, layout=w.Layout(width="320px"))
        self.progress.add_class("gpuherd-progress")
        self.phase = self._html(ph.phase("idle", "no boot yet"))
        self.progress_box = w.HBox([self.progress, self.phase], layout=w.Layout(display="none", align_items="center"))
        self.question = self._html("")
        self.confirm_yes = self._button("Yes", "yes", style="primary")
        self.confirm_no = self._button("Cancel", "no")
        self.confirm_row = w.HBox([self.question, self.confirm_yes, self.confirm_no],
                                  layout=w.Layout(display="none", align_items="center", flex_flow="row wrap"))
        self.confirm_row.add_class("gpuherd-confirm")
        self.confirm_row.yes, self.confirm_row.no = self.confirm_yes, self.confirm_no  # type: ignore[attr-defined]
        self.confirm_yes.on_click(lambda _: self._answer_question(True))
        self.confirm_no.on_click(lambda _: self._answer_question(False))
        # Offers
        self.query = w.Text(value="", placeholder="4090 <$0.5 reliability>0.95 limit=20", continuous_update=False,
                            layout=w.Layout(width="340px"))
        self.query.add_class("gpuherd-query")
        self.search_button = self._button(replies.phrase(Action(op=Op.SEARCH)).label, "search", style="primary")
        self.template = w.Dropdown(options=[], description="template", layout=w.Layout(width="300px"))
        self.sort = w.Dropdown(options=SORTS, value="dph", description="sort by", layout=w.Layout(width="200px"))
        self.order = w.Dropdown(options=(("ascending", "asc"), ("descending", "desc")), value="asc",
                                layout=w.Layout(width="120px"))
        self.offers_note = self._html("")
        self.offers_head = self._html(ph.offers_header("$/h"))
        self.offers_box = w.VBox([])
        offers_tab = w.VBox([w.HBox([self.query, self.search_button], layout=w.Layout(flex_flow="row wrap")),
                             w.HBox([self.template, self.sort, self.order], layout=w.Layout(flex_flow="row wrap")),
                             self.offers_note, self.offers_head, self.offers_box])
        self.query.observe(lambda _: self._spawn(self.search()), names="value")
        self.search_button.on_click(lambda _: self._spawn(self.search()))
        self.template.observe(lambda _: self._render_offers(), names="value")
        self.sort.observe(lambda _: self._render_offers(), names="value")
        self.order.observe(lambda _: self._render_offers(), names="value")
        # Instances
        self.instances_summary = self._html("")
        self.activity_line = self._html("")
        self.instances_box = w.VBox([])
        self.page = w.Dropdown(options=[("1–0 of 0", 0)], value=0, description="machines",
                               layout=w.Layout(width="240px", display="none"))
        self.page.observe(self._page_changed, names="value")
        instances_tab = w.VBox([self.instances_summary, self.activity_line, self.page, self.instances_box])
        # Costs
        self.period = w.Dropdown(options=PERIODS, value="month", description="period", layout=w.Layout(width="220px"))
        self.group_by = w.Dropdown(options=GROUPS, value="user", description="by", layout=w.Layout(width="200px"))
        self.costs_html = self._html("")
        costs_tab = w.VBox([w.HBox([self.period, self.group_by]), self.costs_html])
        self.period.observe(lambda _: self._spawn(self.refresh_costs()), names="value")
        self.group_by.observe(lambda _: self._spawn(self.refresh_costs()), names="value")

        self.tabs = w.Tab(children=[offers_tab, instances_tab, costs_tab], titles=TITLES)
        self.tabs.observe(self._tab_changed, names="selected_index")
        super().__init__([header, self.notices, self.progress_box, self.confirm_row, self.tabs])
        self.add_class("gpuherd-panel")
        self._closed = False
        self._unsubscribe: Callable[[], None] | None = gpu.backend.subscribe(self._on_feed)

    def __repr__(self) -> str:
        return f"GpuPanel({self.panel_id[:8]})"

    def _button(self, description: str, kind: str, *, style: str = "", tooltip: str = "",
                disabled: bool = False) -> w.Button:
        """Every button: `gpuherd-btn` and `gpuherd-<kind>` (the browser test's handles)."""
        return w.Button(description=description, button_style=style, tooltip=tooltip, disabled=disabled,
                        layout=self._btn_layout, style=self._btn_style, _dom_classes=("gpuherd-btn", f"gpuherd-{kind}"))

    def _close(self, widget: w.Widget) -> None:
        _close_tree(widget, self._shared)

    def _html(self, value: str = "") -> w.HTML:
        return w.HTML(value=value, layout=self._html_layout, style=self._html_style)

    # --- starting, refreshing, closing -----------------------------------------------------------
    def start(self) -> None:
        """The first loads (connection, templates, offers, instances, costs) and the periodic task."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._loop = loop
            self._spawn(self.load())
            self.ticker = loop.create_task(self._run_ticker(), name="gpuherd-panel-ticker")
        elif not isinstance(self.gpu.core, InlineCore):
            self.gpu.core.run(self.load())          # a script: nothing else would run it
        else:
            self._say("No event loop runs here: await panel.load() to fill the panel.", "warning")

    async def load(self) -> None:
        """Connect, then load everything once (each part reports its own error)."""
        try:
            connection = await self.gpu.aconnect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.connection_line.value = ph.status("Not connected.", "error")
            self._error(exc)
            return
        self.connection_line.value = ph.status(connection.sentence(), "info")
        results = await asyncio.gather(self.load_templates(), self.search(""), self.refresh_instances(),
                                       self.refresh_costs(), return_exceptions=True)
        for outcome in results:
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                self._error(outcome)

    async def refresh(self) -> None:
        """Reload the Instances and Costs tabs now."""
        await asyncio.gather(self.refresh_instances(), self.refresh_costs())

    async def settle(self) -> None:
        """Until every task a handler or a listener started is done (tests, the benchmark)."""
        while True:
            await asyncio.sleep(0)               # hops queued with call_soon_threadsafe run first
            pending = [t for t in self._tasks if not t.done()]
            if not pending:
                return
            await asyncio.gather(*(asyncio.wrap_future(t) if isinstance(t, concurrent.futures.Future) else t
                                   for t in pending), return_exceptions=True)

    def close(self) -> None:
        """Stop the periodic task and every task in flight, stop listening, close the widgets."""
        if getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                super().close()
            return
        self._closed = True
        if self._unsubscribe is not None:
            with contextlib.suppress(Exception):
                self._unsubscribe()
            self._unsubscribe = None
        tasks: list[Task] = [t for t in self._tasks if not t.done()]
        if self.ticker is not None:
            tasks.append(self.ticker)
        for task in tasks:
            self._cancel(task)
        for child in self.children:
            self._close(child)
        for row in self.offer_rows:
            self._close(row.box)
        for irow in self.instance_rows.values():
            self._close(irow.box)
        for shared in (self._row_layout, self._btn_layout, self._btn_style, self._html_layout, self._html_style,
                       self.layout):
            with contextlib.suppress(Exception):
                shared.close()
        with contextlib.suppress(Exception):
            super().close()

    def _cancel(self, task: Task) -> None:
        if isinstance(task, concurrent.futures.Future):
            task.cancel()
            return
        loop = self._loop
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or here is loop or loop.is_closed():
            task.cancel()
        else:
            loop.call_soon_threadsafe(task.cancel)

    @property
    def closed(self) -> bool:
        return self._closed

    # --- scheduling ---------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> Task | None:
        """Run `coro` without waiting for it: on the panel's loop, else on the core loop."""
        if self._closed:
            coro.close()
            return None
        guarded = self._guarded(coro)
        task: Task
        loop = self._loop
        if loop is None or loop.is_closed():
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        if loop is not None:
            try:
                here = asyncio.get_running_loop()
            except RuntimeError:
                here = None
            task = loop.create_task(guarded) if here is loop else asyncio.run_coroutine_threadsafe(guarded, loop)
        elif not isinstance(self.gpu.core, InlineCore):
            task = self.gpu.core.submit(guarded)
        else:
            guarded.close()
            self._say("No event loop runs here: await the panel's coroutines (load, search, refresh).", "warning")
            return None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: coro.close())     # cancelled before it started: no "never awaited"
        return task

    async def _guarded(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._error(exc)

    def _hop(self, fn: Callable[..., None], *args: Any) -> None:
        """From the core loop (a listener, a followed operation) to the panel's loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            fn(*args)
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):     # the kernel's loop closed under us
                loop.call_soon_threadsafe(fn, *args)

    async def _core(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await `coro` on the core loop (connecting first if need be)."""
        gpu = self.gpu
        if gpu.closed or self._closed:
            coro.close()
            raise GpuherdError("This gpuherd panel or its connection is closed; run gpu_panel() again.")
        if not gpu.backend.started:
            await gpu.aconnect()
        return await gpu.core.call(coro)

    def _want_refresh(self, what: str) -> None:
        """A reload of `what` (instances | costs) soon; one at a time, however many ask."""
        current = self._want.get(what)
        if current is not None and not current.done():
            return
        task = self._spawn(self.refresh_instances() if what == "instances" else self.refresh_costs())
        if task is not None:
            self._want[what] = task

    async def _run_ticker(self) -> None:
        loop = asyncio.get_running_loop()
        step = min(TICK_S, self.refresh_s)
        last = loop.time()
        while not self._closed:
            await asyncio.sleep(step)
            try:
                self.tick()
                if loop.time() - last >= self.refresh_s:
                    last = loop.time()
                    await self.refresh_instances()
            except asyncio.CancelledError:
                raise
            except Exception as exc:        # said once a period; the ticker goes on (the server may be back)
                self._error(exc)

    # --- the status line ------------------------------------------------------------------------------
    def _say(self, text: str, level: str = "info") -> None:
        if not self._closed:
            self.status_line.value = ph.status(text, level)

    def _reply(self, reply: Reply) -> None:
        text = f"{reply.title} — {reply.text}" if reply.text else reply.title
        self._say(text, "error" if reply.level == "error" else reply.level)

    def _error(self, exc: BaseException) -> None:
        """An error as one line: core's message and hint, or a short sentence (logged)."""
        if isinstance(exc, GpuherdError):
            text = exc.message + (f" {exc.hint}" if exc.hint else "")
        else:
            log.info("gpuherd panel: a call failed", exc_info=exc)
            name = type(exc).__name__
            url = getattr(self.gpu.backend, "url", None)
            if url and (isinstance(exc, OSError) or type(exc).__module__.startswith(("httpx", "httpcore"))):
                text = f"Cannot reach the gpuherd server {url}: {name}. Check that it runs, then try again."
            else:
                text = f"gpuherd could not do that ({name}). The details are in the log (logger {__name__})."
        self.last_error = text
        self._say(text, "error")

    # --- Offers -------------------------------------------------------------------------------------
    async def load_templates(self) -> None:
        listing: TemplateList = await self._core(self.gpu.backend.templates())
        options = []
        for t in listing.templates:
            limit = f" · ≤ {rate(t.max_dph)}" if t.max_dph is not None else ""
            options.append((f"{t.name} · {t.min_gpu_ram:g} GB x{t.num_gpus}{limit}", t.name))
        keep = self.template.value
        self.template.options = options
        names = [name for _, name in options]
        if keep in names:
            self.template.value = keep
        elif names:
            self.template.value = names[0]
        self._render_offers()

    async def search(self, query: str | None = None) -> None:
        """Offers for `query` (default: what the query box says)."""
        text = self.query.value if query is None else query
        if self._searching == text:
            return                                # that search is on its way
        self._searching = text
        self._search_no += 1
        number = self._search_no
        try:
            result: SearchResult = await self._core(self.gpu.backend.search(text))
        finally:
            if self._searching == text:
                self._searching = None
        if number < self._shown_search or self._closed:
            return                                # a later search already answered
        self._result, self._shown_search = result, number
        reply = replies.search_reply(result)
        notes = [n for n in reply.notes if "simulated" not in n.lower()]
        self.offers_note.value = (f'<div class="gpuherd-offers-note"><b>{ph.e(reply.title)}</b>'
                                  + (f" · {ph.e(reply.text)}" if reply.text else "")
                                  + "".join(f'<div style="color:{ph.MUTED};font-size:0.85em;">{ph.e(n)}</div>'
                                            for n in notes) + "</div>")
        self._render_offers()

    def _render_offers(self) -> None:
        if self._closed:
            return
        old = self.offer_rows
        result = self._result
        views = list(result.offers) if result is not None else []
        key = SORT_KEYS.get(self.sort.value, SORT_KEYS["dph"])
        descending = self.order.value == "desc"
        views.sort(key=key, reverse=descending)
        label = next((lbl for lbl, value in SORTS if value == self.sort.value), "$/h")
        self.offers_head.value = ph.offers_header(label, descending)
        self.offer_rows = [self._offer_row(v) for v in views]
        self.offers_box.children = [r.box for r in self.offer_rows]
        for row in old:
            self._close(row.box)

    def _offer_row(self, view: OfferView) -> OfferRow:
        template = self.template.value
        may_boot = any(a.op is Op.BOOT for a in view.actions)
        boot: w.Button | None = None
        tail: w.Widget
        if not template:
            tail = self._html(ph.no_boot("pick a template to boot"))
        elif not may_boot:
            role = self.gpu.connection.role if self.gpu.connection is not None else ""
            tail = self._html(ph.no_boot("viewers cannot boot" if role == "viewer" else "not bootable by you"))
        elif template not in view.fits:
            fits = ", ".join(view.fits) or "no template"
            tail = self._html(ph.no_boot(f"does not fit {template} (fits {fits})"))
        else:
            boot = tail = self._button("Boot", "boot", style="primary", tooltip=f"Boot {template} on {view.offer.ref}")
            boot.on_click(lambda _, v=view, t=template, n=self._shown_search: self._press_boot(v, t, n))
        box = w.HBox([self._html(ph.offer_cells(view)), tail], layout=self._row_layout)
        return OfferRow(offer_view=view, box=box, boot=boot)

    def _press_boot(self, view: OfferView, template: str, number: int) -> None:
        key = presses.delivery_id(self.panel_id, str(number), view.offer.ref, template)
        if key in self._in_flight:
            return
        self._in_flight.add(key)
        self._say(f"Booting {template} on {view.offer.gpu_name} x{view.offer.num_gpus} ({rate(view.offer.dph)})…")
        self._spawn(self._boot(template, view.offer.ref, key))

    async def _boot(self, template: str, offer: str, key: str) -> None:
        try:
            answer = await self._core(self.gpu.backend.boot(template, offer=offer, key=key))
        finally:
            self._in_flight.discard(key)
        await self._answered(answer, None)

    # --- answers ------------------------------------------------------------------------------------
    async def _answered(self, result: Any, about: InstanceView | None) -> None:
        """Show what core answered to a press, and follow what it started."""
        if isinstance(result, Confirmation):
            self._ask(result, about)
            return
        if isinstance(result, BootResult):
            self._reply(replies.boot_reply(result))        # a replay says "already booted with this request"
            self._apply_view(result.instance)
            self._want_refresh("costs")
            if result.operation_id and not result.replayed:
                await self.follow(result.operation_id, result.instance.id)
            return
        if isinstance(result, StartResult):
            self._reply(replies.start_reply(result))
            self._apply_view(result.instance)
            if result.operation_id and not result.ready:
                await self.follow(result.operation_id, result.instance.id)
            return
        if isinstance(result, StopResult):
            self._reply(replies.stop_reply(result))
            self._apply_view(result.instance)
            self._want_refresh("costs")
        elif isinstance(result, KeepResult):
            self._reply(replies.keep_reply(result))
            self._apply_view(result.instance)
        elif isinstance(result, DestroyResult):
            self._reply(replies.destroy_reply(result))
            self._apply_view(result.instance)
            self._want_refresh("costs")
        elif isinstance(result, Cancelled):
            self._reply(replies.cancelled_reply(result))
        elif isinstance(result, Reply):
            self._reply(result)
        self._want_refresh("instances")

    def _ask(self, c: Confirmation, about: InstanceView | None) -> None:
        """Core's question as the Yes/No row, with what a yes costs."""
        self._question, self._question_about = c, about
        self.question.value = ph.question(c, about)
        yes = next((a for a in c.actions if a.op is Op.CONFIRM), None)
        no = next((a for a in c.actions if a.op is Op.CANCEL), None)
        self.confirm_yes.description = replies.phrase(yes).label if yes is not None else "Yes"
        self.confirm_yes.button_style = STYLES.get(yes.style.value if yes is not None else "primary", "primary")
        self.confirm_no.description = replies.phrase(no).label if no is not None else "Cancel"
        self.confirm_row.layout.display = "flex"
        self._say(c.title, "warning")

    def _answer_question(self, yes: bool) -> None:
        c = self._question
        if c is None:
            return                                 # already answered (a double click)
        self._question, about = None, self._question_about
        self._question_about = None
        self.confirm_row.layout.display = "none"
        self._spawn(self._confirm(c, about) if yes else self._cancel_question(c))

    async def _confirm(self, c: Confirmation, about: InstanceView | None) -> None:
        await self._answered(await self._core(self.gpu.backend.confirm(c.token)), about)

    async def _cancel_question(self, c: Confirmation) -> None:
        await self._answered(await self._core(self.gpu.backend.cancel(c.token)), None)

    # --- progress -------------------------------------------------------------------------------------
    async def follow(self, operation_id: str, instance_id: str | None = None) -> None:
        """The operation's progress in the bar, until it ends."""
        self._following = operation_id
        self.progress.value = 0
        self.progress.bar_style = "info"
        self.progress_box.layout.display = "flex"
        self.phase.value = ph.phase("pending", f"{instance_id or operation_id}: waiting for the provider…")
        backend = self.gpu.backend

        async def pump() -> ProgressEvent | None:          # on the core loop
            last = None
            async for event in backend.follow(operation_id, instance_id):
                last = event
                self._hop(self._step, event)
            return last

        try:
            last: ProgressEvent | None = await self._core(pump())
        finally:
            self._want_refresh("instances")
        if (last is None or not last.final) and self._following == operation_id:
            self.phase.value = ph.phase(last.phase.value if last else "pending",
                                        "it is no longer booting; the Instances tab shows where it is")

    def _step(self, event: ProgressEvent) -> None:
        if self._closed or event.operation_id != self._following:
            return
        if event.phase is Phase.FAILED:
            self.progress.bar_style = "danger"
        else:
            self.progress.value = ph.PERCENT.get(event.phase, self.progress.value)
            self.progress.bar_style = "success" if event.phase is Phase.HEALTHY else "info"
        self.phase.value = ph.phase(event.phase.value, event.text, event.elapsed_s)
        if event.phase is Phase.FAILED:
            self._say(event.text, "error")

    # --- Instances ------------------------------------------------------------------------------------
    def _clock(self) -> float:
        if self._monotonic is not None:
            return self._monotonic()
        clock = getattr(getattr(self.gpu.backend, "service", None), "clock", None)
        return float(clock.monotonic()) if clock is not None else time.monotonic()

    async def refresh_instances(self) -> None:
        self._status_seq += 1
        seq = self._status_seq
        status: StatusResult = await self._core(self.gpu.backend.status())
        if seq < self._status_applied or self._closed:
            return                                # a later answer is already shown
        self._status_applied = seq
        await self._show_status(status)

    async def _show_status(self, status: StatusResult) -> None:
        """A status answer on the tab: the machines' order and views, then the shown page's rows."""
        self._status = status
        self._order = [v.id for v in status.instances]
        self._views = {v.id: v for v in status.instances}
        self._received = self._clock()
        self.instances_summary.value = ph.instances_summary(status)
        self._show_pages()
        self._show_indicator()
        self._show_activity()
        await self._place_page()

    def _show_pages(self) -> None:
        n = len(self._order)
        pages = max(1, -(-n // self.page_rows))
        options = [(f"{i * self.page_rows + 1}–{min(n, (i + 1) * self.page_rows)} of {n}", i) for i in range(pages)]
        if list(self.page.options) != options:
            value = min(self.page.value or 0, pages - 1)
            self._paging = True
            try:
                self.page.options = options
                self.page.value = value
            finally:
                self._paging = False
        self.page.layout.display = "flex" if pages > 1 else "none"

    def _page_changed(self, _: Any) -> None:
        if not self._paging:
            self._spawn(self._place_page())

    async def _place_page(self) -> None:
        """The rows of the shown page: existing ones updated in place, new ones built `ROW_CHUNK`
        at a time with the loop let go in between (a row is a handful of widgets, ~2 ms: a page
        of new rows at once would hold the kernel's loop for tens of milliseconds)."""
        self._render += 1
        render = self._render
        missing = self._place(ROW_CHUNK)
        while missing and render == self._render and not self._closed:
            await asyncio.sleep(0)
            if render == self._render:
                missing = self._place(ROW_CHUNK, update=False)

    def _place(self, build: int, *, update: bool = True) -> int:
        """Update the shown page's rows (unless `update` is False: a later chunk of the same
        render), build at most `build` new ones; how many are left to build."""
        first = (self.page.value or 0) * self.page_rows
        ids = [i for i in self._order[first:first + self.page_rows] if i in self._views]
        keep = set(ids)
        for gone in [i for i in self.instance_rows if i not in keep]:
            self._close(self.instance_rows.pop(gone).box)
        left = 0
        for i in ids:
            if i in self.instance_rows:
                if update:
                    self._put_row(self._views[i], self._received)
            elif build > 0:
                self._put_row(self._views[i], self._received)
                build -= 1
            else:
                left += 1
        boxes = [self.instance_rows[i].box for i in ids if i in self.instance_rows]
        if list(self.instances_box.children) != boxes:
            self.instances_box.children = boxes
        return left

    def _show_indicator(self) -> None:
        status = self._status
        if status is None:
            return
        running = sum(1 for v in self._views.values() if v.state is InstanceState.RUNNING)
        self.indicator.value = ph.indicator(running, status.run_rate.per_hour)

    def _apply_view(self, view: InstanceView) -> None:
        """A machine as an answer showed it (a stop, a boot): its row at once, before the reload."""
        if self._closed:
            return
        if view.state.is_final:
            self._views.pop(view.id, None)
            self._order = [i for i in self._order if i != view.id]
        else:
            if view.id not in self._views:
                self._order.insert(0, view.id)          # the newest first, as status orders them
            self._views[view.id] = view
        if view.id in self.instance_rows and not view.state.is_final:
            self._put_row(view, self._clock())        # in place: its own clock, the others keep theirs
        else:
            self._received = self._clock()
            self._place(1)
        self._show_indicator()

    def _put_row(self, v: InstanceView, now: float) -> None:
        row = self.instance_rows.get(v.id)
        stamp = v.observed_at.isoformat() if v.observed_at is not None else f"r{self._render}"
        if row is None:
            info, cost = self._html(), self._html()
            box = w.HBox([info, cost], layout=self._row_layout, _dom_classes=("gpuherd-instance-row",))
            row = InstanceRow(view=v, box=box, info=info, cost=cost, received=now, stamp=stamp)
            self.instance_rows[v.id] = row
        if row.view is not v:
            row.view, row.received, row.stamp = v, now, stamp
        row.info.value = ph.instance_line(v)
        row.cost.value = ph.accrued(v, self._accrued(row))
        refs = tuple(a.ref for a in v.actions)
        running = v.state is InstanceState.RUNNING
        used = self.gpu.activity.instance_id == v.id
        if refs != row.refs or (row.use is not None) != running or (row.use is not None and row.use.disabled != used):
            self._build_buttons(row, used)

    def _build_buttons(self, row: InstanceRow, used: bool) -> None:
        v = row.view
        old = [*row.buttons.values(), *([row.use] if row.use is not None else [])]
        row.buttons = {}
        for action in v.actions:
            said = replies.phrase(action)
            b = self._button(said.label, action.op.value, style=STYLES.get(said.style, ""), tooltip=said.command)
            b.on_click(lambda _, r=row, a=action: self._press(r, a))
            row.buttons[action.op.value] = b
        row.use = None
        if v.state is InstanceState.RUNNING:
            row.use = self._button("Used in this notebook" if used else "Use in this notebook", "use", disabled=used,
                                   tooltip="Send activity pings while this notebook's cells run")
            row.use.on_click(lambda _, iid=v.id: self._use(iid))
        row.refs = tuple(a.ref for a in v.actions)
        row.box.children = [row.info, row.cost, *row.buttons.values(), *([row.use] if row.use is not None else [])]
        for b in old:
            self._close(b)

    def _press(self, row: InstanceRow, action: Action) -> None:
        key = presses.delivery_id(self.panel_id, action.ref, row.stamp)
        if key in self._in_flight:
            return
        self._in_flight.add(key)
        self._say(f"{replies.phrase(action).label} {action.instance_id or ''}…".strip())
        self._spawn(self._perform(action, key, row.view))

    async def _perform(self, action: Action, key: str, about: InstanceView | None) -> None:
        try:
            result = await self._core(self.gpu.backend.perform(action, key))
        finally:
            self._in_flight.discard(key)
        await self._answered(result, about)

    def _use(self, instance_id: str) -> None:
        self.gpu.use(instance_id, in_cell=False)
        for row in self.instance_rows.values():
            if row.view.state is InstanceState.RUNNING:
                self._build_buttons(row, row.view.id == instance_id)
        self._show_activity()
        self._say(f"Using {instance_id} in this notebook: it is kept alive while cells run.", "success")

    def _accrued(self, row: InstanceRow, now: float | None = None) -> Decimal:
        """Core's accrued figure carried forward at its current rate (`accrued_at`), by the time
        since the answer arrived on the panel's clock (see the module docstring)."""
        v = row.view
        if v.observed_at is None or v.current_dph <= 0:
            return v.accrued
        elapsed = max(0.0, (self._clock() if now is None else now) - row.received)
        return v.accrued_at(v.observed_at + timedelta(seconds=elapsed))

    def _show_activity(self) -> None:
        self.activity_line.value = (f'<div class="gpuherd-activity" style="color:{ph.MUTED};">'
                                    f"{ph.e(self.gpu.activity.describe())}</div>")

    def tick(self) -> None:
        """Re-render the ticking costs from the last status (no backend call)."""
        if self._closed:
            return
        now = self._clock()
        for row in self.instance_rows.values():
            if row.view.current_dph > 0:
                row.cost.value = ph.accrued(row.view, self._accrued(row, now))
        if self.gpu.activity.instance_id is not None:
            self._show_activity()

    # --- Costs ------------------------------------------------------------------------------------------
    async def refresh_costs(self) -> None:
        self._costs_seq += 1
        seq = self._costs_seq
        report: CostReport = await self._core(self.gpu.backend.costs(self.period.value, self.group_by.value))
        if seq < self._costs_applied or self._closed:
            return
        self._costs_applied = seq
        self.costs_html.value = ph.costs(report)

    def _tab_changed(self, change: dict[str, Any]) -> None:
        if change.get("new") == 2:
            self._want_refresh("costs")

    # --- notices ------------------------------------------------------------------------------------------
    def _on_feed(self, entry: FeedEntry) -> None:
        """A listener on the core loop: hop to the panel's."""
        if not self._closed:
            self._hop(self._feed_item, entry.item)

    def _feed_item(self, item: FeedNotice | ProgressEvent) -> None:
        if self._closed:
            return
        if isinstance(item, FeedNotice):
            self._add_notice(item)
            if item.instance_id:
                self._want_refresh("instances")
        elif item.final:
            self._want_refresh("instances")

    def _add_notice(self, n: FeedNotice) -> None:
        if any(r.notice.id == n.id for r in self.notice_rows):
            return
        row = NoticeRow(notice=n, box=w.HBox([], layout=self._row_layout, _dom_classes=("gpuherd-notice-row",)))
        for action in n.actions:
            said = replies.phrase(action, notice=True)
            b = self._button(said.label, action.op.value, style=STYLES.get(said.style, ""), tooltip=said.command)
            b.on_click(lambda _, r=row, a=action: self._press_notice(r, a))
            row.buttons[action.op.value] = b
        row.dismiss = self._button("Dismiss", "dismiss")
        row.dismiss.on_click(lambda _, r=row: self.dismiss(r))
        row.box.children = [self._html(ph.notice(n)), *row.buttons.values(), row.dismiss]
        self.notice_rows.insert(0, row)
        for old in self.notice_rows[MAX_NOTICES:]:
            self._close(old.box)
        del self.notice_rows[MAX_NOTICES:]
        self.notices.children = [r.box for r in self.notice_rows]

    def dismiss(self, row: NoticeRow) -> None:
        if row in self.notice_rows:
            self.notice_rows.remove(row)
            self.notices.children = [r.box for r in self.notice_rows]
            self._close(row.box)

    def _press_notice(self, row: NoticeRow, action: Action) -> None:
        key = presses.delivery_id(self.panel_id, "notice", str(row.notice.id), action.ref)
        if key in self._in_flight:
            return
        self._in_flight.add(key)
        self._spawn(self._perform_notice(row, action, key))

    async def _perform_notice(self, row: NoticeRow, action: Action, key: str) -> None:
        about = self.instance_rows[action.instance_id].view if action.instance_id in self.instance_rows else None
        try:
            result = await self._core(self.gpu.backend.perform(action, key))
        finally:
            self._in_flight.discard(key)
        for b in row.buttons.values():          # done: the notice stays, its buttons are spent
            b.disabled = True
        await self._answered(result, about)


def gpu_panel(gpu: Gpu | None = None, *, refresh_s: float = 5.0, start: bool = True) -> GpuPanel:
    """The panel on `gpu` (default: the notebook's shared connection, `api.connect()`). With
    `start`, the first loads and the periodic refresh are scheduled on the running loop (or, in a
    script without one, the first load is done before this returns)."""
    if gpu is None:
        from .api import connect

        gpu = connect()
    panel = GpuPanel(gpu, refresh_s=refresh_s)
    if start:
        panel.start()
    return panel


__all__ = ["GpuPanel", "InstanceRow", "NoticeRow", "OfferRow", "gpu_panel"]
