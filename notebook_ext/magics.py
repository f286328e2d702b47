"""`%gpu`: any /gpu command of the shared grammar from a notebook cell, its reply shown with
working buttons (`render_html`).

    %load_ext gpuherd.notebook_ext      says where gpuherd runs (local core or team server) and who runs the guards
    %gpu search 4090 <$0.5              any /gpu command (`%gpu /gpu status` works too)
    %gpu                                help (also `%gpu help`, `%gpu help boot`)
    %gpu panel                          the panel (`gpu_panel()`)
    %gpu use g-7f3a                     keep that machine alive while this notebook's cells run

Decisions:
- One shared connection: `api.connect()` (the team server when GPUHERD_SERVER and
  GPUHERD_API_KEY are set, else the local core), the same one `connect()` gives the user's code
  and the panel. State lives on the module-level `STATE`, so `%reload_ext` (unload, then load)
  re-registers the one magic and does not open a second connection.
- A command blocks the cell until its reply (commands answer at once; a boot answers when the
  provider took the order, it does not wait for health). The boot's or start's progress is then
  followed in the background: an IntProgress and a phase line under the reply, fed by
  `backend.follow` on the core loop and updated on the kernel's loop.
- A button press never blocks: it schedules a coroutine on the kernel's running loop
  (`asyncio.ensure_future`, the reference kept in `STATE.tasks` until it is done) that runs the
  /gpu line core's action stands for (`presses.command_for`) on the core loop, with the
  idempotency key of that button on that reply (`presses.delivery_id(display id, ref)`): a double
  click stops once. An action that asked its Yes/No inline (a destroy) is sent as confirmed, as
  Slack's dialog does, so the user is not asked twice. Without a running loop (plain IPython in
  a terminal, some tests) the coroutine runs on the core loop instead. Answers go to an Output
  below the buttons through `outputs`/`append_display_data` (never `with out:`, which needs the
  kernel's parent message and is wrong from a callback).
- Help is the grammar's own (`grammar.help_reply`) with the usages said as `%gpu …`, plus the
  notebook's own words (`panel`, `use`); it needs no connection.
- No traceback reaches the cell: a GpuherdError is shown as an error reply (`replies.error`),
  anything else as one sentence; the details go to this module's logger at INFO (Python's
  last-resort handler would print WARNING and up, traceback included, into the cell)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from IPython.core.magic import no_var_expand
from IPython.display import display

from gpuherd.bot import presses, replies
from gpuherd.bot.replies import Action, Reply, Table
from gpuherd.core.errors import GpuherdError
from gpuherd.core.results import Phase, ProgressEvent

from . import api
from .render_html import RichReply, button_actions

if TYPE_CHECKING:
    import ipywidgets

    from .api import Gpu

log = logging.getLogger(__name__)
MAGIC = "gpu"
NOTEBOOK_WORDS = (("%gpu panel", "The gpuherd panel (offers, your machines, costs, notices) in this notebook"),
                  ("%gpu use <id>", "Keep that machine alive while this notebook's cells run (activity pings)"))
STEPS = {Phase.ACCEPTED: 1, Phase.PROVISIONING: 2, Phase.LOADING: 3, Phase.STARTING: 4, Phase.RUNNING: 5,
         Phase.HEALTHY: 6, Phase.FAILED: 6}
Task = asyncio.Future[Any] | concurrent.futures.Future[Any]


@dataclass
class MagicState:
    """What `%gpu` keeps between cells (one per process: `STATE`)."""

    shell: Any = None                     # the shell the magic is registered in
    gpu: Gpu | None = None                # the connection the last command used
    announced: Gpu | None = None          # the connection whose sentence was shown
    tasks: set[Task] = field(default_factory=set)
    last: RichReply | None = None         # the last reply shown (tests, debugging)

    # --- the connection ------------------------------------------------------------------------
    def connection(self) -> Gpu:
        self.gpu = api.connect()
        return self.gpu

    def announce(self) -> None:
        """The connection sentence, once per connection (and again after `%reload_ext`)."""
        try:
            gpu = self.connection()
            if self.announced is gpu:
                return
            sentence = gpu.connect().sentence()
            self.announced = gpu
            self.show(Reply(title="gpuherd", text=sentence))
        except (Exception, KeyboardInterrupt) as exc:        # never a traceback from %load_ext
            self.show(failure(exc, self.gpu))

    # --- one line ----------------------------------------------------------------------------------
    def run(self, line: str) -> None:
        try:
            self._run(line)
        except (Exception, KeyboardInterrupt) as exc:
            self.show(failure(exc, self.gpu))

    def _run(self, line: str) -> None:
        from gpuherd.bot import grammar

        text = grammar.strip_prefix(line)
        word, _, rest = text.partition(" ")
        verb, rest = word.lower(), rest.strip()
        if not text or verb == "help":
            self.show(help_reply(rest or None))
            return
        if verb == "panel" and not rest:
            try:
                from gpuherd.notebook_ext import gpu_panel

                panel = gpu_panel()
            except ImportError as exc:
                self.show(replies.error(f"The gpuherd panel cannot be loaded here: {exc}.",
                                        "It needs ipywidgets 8 (pip install 'gpuherd[notebook]')."))
                return
            display(panel)
            return
        if verb == "use":
            self.show(self.use(rest))
            return
        self.show(self.connection().command(f"/gpu {text}"))

    def use(self, rest: str) -> Reply:
        gpu = self.connection()
        if not rest:
            return Reply(title="This notebook's machine", text=gpu.activity.describe())
        if " " in rest:
            return replies.error("Usage: %gpu use <instance id> (ids look like g-7f3a; %gpu status lists them).")
        machine = gpu.get(rest)                      # unknown or not yours: core says so
        gpu.use(machine)
        return Reply(title=f"Using {machine.id} in this notebook", text=gpu.activity.describe(), level="success")

    # --- showing a reply ---------------------------------------------------------------------------
    def show(self, reply: Reply) -> RichReply:
        shown = self.view(reply)
        display(shown, display_id=shown.display_id)
        return shown

    def view(self, reply: Reply) -> NotebookReply:
        """The reply with its buttons wired to this connection, its answers' Output, and the
        progress of its operation when one is still running."""
        shown = NotebookReply(self, reply)
        self.last = shown
        return shown

    # --- background work ---------------------------------------------------------------------------
    def schedule(self, coro: Coroutine[Any, Any, None], gpu: Gpu) -> Task:
        """On the kernel's running loop; without one (plain IPython), on the core loop."""
        task: Task
        try:
            asyncio.get_running_loop()
            task = asyncio.ensure_future(coro)
        except RuntimeError:
            task = gpu.core.submit(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


class NotebookReply(RichReply):
    """A reply shown by `%gpu` (or as the answer to one of its buttons)."""

    def __init__(self, state: MagicState, reply: Reply) -> None:
        import ipywidgets as w

        self.state = state
        self.gpu = state.gpu
        self.display_id = uuid.uuid4().hex
        self.out: ipywidgets.Output | None = None
        self.progress: ipywidgets.IntProgress | None = None
        self.phase: ipywidgets.HTML | None = None
        below: list[ipywidgets.Widget] = []
        if reply.operation_id and self.gpu is not None:
            self.progress = w.IntProgress(value=0, min=0, max=max(STEPS.values()), layout=w.Layout(width="320px"))
            self.phase = w.HTML(value=_phase_html("following its progress…"))
            below.append(w.HBox([self.progress, self.phase], layout=w.Layout(align_items="center")))
        if self.gpu is not None and button_actions(reply):
            self.out = w.Output()
            below.append(self.out)
        super().__init__(reply, self.pressed if self.gpu is not None else None, below=below)
        if self.progress is not None and self.gpu is not None and reply.operation_id:
            state.schedule(self.follow(self.gpu, reply.operation_id, reply.instance_id), self.gpu)

    # --- a button ------------------------------------------------------------------------------------
    def pressed(self, action: Action) -> None:
        """Called by the button on the kernel's loop: schedule the press and return."""
        gpu = self.gpu
        if gpu is None or self.out is None:
            return
        self.out.outputs = ({"output_type": "stream", "name": "stdout", "text": f"{action.label}…\n"},)
        self.state.schedule(self.answer(gpu, action), gpu)

    async def answer(self, gpu: Gpu, action: Action) -> None:
        parsed = presses.parse(action.ref)
        try:
            if isinstance(parsed, Reply):
                reply = parsed
            else:
                line = presses.command_for(parsed, confirmed=action.confirm is not None)
                key = presses.delivery_id("notebook", self.display_id, action.ref)
                if gpu.closed:
                    raise GpuherdError("This gpuherd connection is closed; run %gpu again.")
                reply = await gpu.acommand(line, key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reply = failure(exc, gpu)
        if self.out is not None:
            self.out.outputs = ()
            self.out.append_display_data(self.state.view(reply))

    # --- a boot or start in progress -----------------------------------------------------------------
    async def follow(self, gpu: Gpu, operation_id: str, instance_id: str | None) -> None:
        here = asyncio.get_running_loop()

        def shown(event: ProgressEvent) -> None:
            if asyncio.get_running_loop() is here:
                self.step(event)
            else:
                here.call_soon_threadsafe(self.step, event)

        async def pump() -> ProgressEvent | None:            # on the core loop
            last = None
            async for event in gpu.backend.follow(operation_id, instance_id):
                last = event
                shown(event)
            return last

        try:
            last = await gpu.core.call(pump())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("gpuherd %%gpu: following %s failed", operation_id, exc_info=True)
            if self.phase is not None:
                self.phase.value = _phase_html(f"stopped following it ({type(exc).__name__}); %gpu status shows where it is")
            return
        if last is None or not last.final:
            self.finish("it is no longer booting; %gpu status shows where it is")

    def step(self, event: ProgressEvent) -> None:
        if self.progress is None or self.phase is None:
            return
        self.progress.value = STEPS.get(event.phase, self.progress.value)
        if event.phase is Phase.HEALTHY:
            self.progress.bar_style = "success"
        elif event.phase is Phase.FAILED:
            self.progress.bar_style = "danger"
        self.phase.value = _phase_html(event.text, event.phase.value, replies.duration(event.elapsed_s))

    def finish(self, text: str) -> None:
        if self.phase is not None:
            self.phase.value = _phase_html(text)


def _phase_html(text: str, phase: str | None = None, elapsed: str | None = None) -> str:
    import html

    head = f"<b>{html.escape(phase)}</b> · {html.escape(elapsed or '')} · " if phase else ""
    return f'<span class="gpuherd-phase" style="margin-left:8px;">{head}{html.escape(text)}</span>'


def help_reply(name: str | None = None) -> Reply:
    """The grammar's help as it is typed here (`%gpu …`), and the notebook's own words."""
    from gpuherd.bot import grammar

    try:
        reply = grammar.help_reply(name)
    except GpuherdError as exc:
        return replies.error(exc.message.replace("`/gpu help`", "`%gpu help`"), exc.hint)
    if name:
        usage = next((f.value for f in reply.fields if f.label == "usage"), "")
        return reply.with_note(f"In a notebook: {_as_magic(usage)}")
    rows = [[_as_magic(usage), does] for usage, does in reply.tables[0].rows] + [list(w) for w in NOTEBOOK_WORDS]
    return reply.model_copy(update={
        "title": "gpuherd in this notebook: %gpu <command>",
        "tables": [Table(columns=["command", "does"], rows=rows)],
        "notes": ["%gpu help <command> for details and examples. The /gpu prefix is optional (%gpu /gpu status works).",
                  "From Python: from gpuherd.notebook_ext import connect; gpu = connect()"]})


def _as_magic(usage: str) -> str:
    return "%gpu " + usage[len("/gpu "):] if usage.startswith("/gpu ") else usage


def failure(exc: BaseException, gpu: Gpu | None) -> Reply:
    """What the cell shows instead of a traceback."""
    if isinstance(exc, GpuherdError):
        return replies.error(exc.message, exc.hint)
    if isinstance(exc, KeyboardInterrupt):
        return replies.error("Interrupted. What was asked may still happen: %gpu status shows where things are.",
                             title="Interrupted")
    log.info("gpuherd %%gpu failed", exc_info=exc)
    name = type(exc).__name__
    url = getattr(gpu.backend, "url", None) if gpu is not None else None
    if url and (isinstance(exc, OSError) or type(exc).__module__.startswith(("httpx", "httpcore"))):
        return replies.error(f"Cannot reach the gpuherd server {url}: {name}.",
                             "Check GPUHERD_SERVER and that the server runs, then try again.")
    return replies.error(f"gpuherd could not do that ({name}). The details are in the log "
                         f"(logger {__name__}).", title="Something went wrong")


@no_var_expand
def gpu_magic(line: str) -> None:
    """%gpu <command>: any /gpu command (`%gpu help` lists them)."""
    STATE.run(line)


def load(ipython: Any) -> None:
    """Register `%gpu` (once however often it is loaded) and say where gpuherd runs."""
    ipython.register_magic_function(gpu_magic, magic_kind="line", magic_name=MAGIC)
    if STATE.shell is ipython:
        return
    STATE.shell = ipython
    STATE.announced = None
    STATE.announce()
    gpu = STATE.gpu
    if gpu is not None and not gpu.closed and gpu.activity.instance_id is not None:
        gpu.activity.attach(ipython)              # after %reload_ext: keep pinging the machine in use


def unload(ipython: Any) -> None:
    """Remove `%gpu` and stop listening to the kernel's cells (the connection stays open)."""
    manager = ipython.magics_manager
    if manager.magics["line"].get(MAGIC) is gpu_magic:
        del manager.magics["line"][MAGIC]
        if getattr(manager.user_magics, MAGIC, None) is gpu_magic:
            delattr(manager.user_magics, MAGIC)
    if STATE.gpu is not None:
        STATE.gpu.activity.detach()
    if STATE.shell is ipython:
        STATE.shell = None


STATE = MagicState()
__all__ = ["STATE", "MagicState", "NotebookReply", "failure", "gpu_magic", "help_reply", "load", "unload"]
