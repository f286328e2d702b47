"""`gpuherd shell`: /gpu commands from the terminal (prompt and history) or from stdin when piped,
with the same grammar and replies as chat. Where chat shows a confirm dialog the shell asks y/N;
`--yes` accepts in scripts. Boots and starts wait for the health check and show its progress
(`--no-wait` returns as soon as the provider accepted). Notices reach the shell as one of the
outbox's destinations (core decides who hears what); they are printed above the prompt.

Remote mode (`gpuherd shell --server URL`, `run_remote`): the same loop, but each line goes to
the server's `POST /api/v1/commands` (the server runs the grammar, so there is none to keep in
step here) and the Reply comes back as JSON, rendered by the same text renderer. The server
answers a boot at once; its progress and the notices addressed to this user arrive on the
server's event stream (`GET /api/v1/events`), read in the background and printed as they come.
The stream is live before the first line is sent, so the first boot's progress is not missed.

Decisions (the terminal, as a user of bash expects it):
* On a real terminal with GNU readline the prompt is read through readline's callback interface
  on the event loop (`Readline`): a notice arriving while the user types is printed above the
  line and the prompt is redrawn with what they typed; Ctrl-C clears the line (^C and a fresh
  prompt), Ctrl-D on an empty line leaves. Elsewhere `input()` runs in a thread, and a notice
  clears the line and redraws the prompt with `readline.get_line_buffer()`.
* Ctrl-C while a command waits stops the *wait*, not the work: the machine keeps booting (the
  Runtime's readiness watcher goes on) and the shell says what it is doing, what it bills and
  the lines that follow or stop it. A boot or start whose provider order is not placed yet is
  let place it first (a cut order leaves a machine nobody knows about); a second Ctrl-C stops
  at once. Piped scripts keep Python's Ctrl-C (exit 130).
* A piped script's lines are echoed after `gpu> ` (so a log reads as a session); a one-shot
  (`gpuherd status`, which calls `run_line` without `run`) prints only the reply.
* A confirmation not given (no `--yes` in a script, `n` at the prompt) counts as an error: the
  thing was not done, and a script's exit code says so.
* Leaving: `farewell` lists the person's machines still billing and says whether another
  process runs the guards; `gpuherd shell` calls it after its Runtime let go of the guard lock."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from gpuherd.core.actions import Action as CoreAction
from gpuherd.core.actions import Op
from gpuherd.core.auth import Actor
from gpuherd.core.errors import GpuherdError
from gpuherd.core.leader import guards_held_elsewhere
from gpuherd.core.money import rate
from gpuherd.core.outbox import DeliveredNotice
from gpuherd.core.results import ProgressEvent
from gpuherd.core.runtime import Runtime
from gpuherd.core.service import GpuService

from . import grammar, replies
from .render_text import make_console, render
from .replies import Reply, phrase

if TYPE_CHECKING:
    from gpuherd.client import AsyncClient

PROMPT = "gpu> "
Dispatch = Callable[[str], Awaitable[Reply]]
log = logging.getLogger(__name__)


class _Interrupted:
    """What a read gives back when Ctrl-C cleared the line (not a line, not the end of input)."""


INTERRUPTED = _Interrupted()
Read = str | None | _Interrupted
# lines whose provider order must not be cut in half by Ctrl-C: the wait stops once it is placed
ORDERING = frozenset({"boot", "start", "confirm"})

_LineHandler = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class Readline:
    """GNU readline's callback interface (through ctypes), so the prompt is read on the event loop
    itself: a notice can be printed above the line being typed and the prompt redrawn with what
    was typed so far (`rl_forced_update_display`, which Python's readline module does not
    expose), and Ctrl-C can clear the line the way bash does. Keystrokes are read only when the
    terminal has them (`add_reader`), one at a time, so the loop is never blocked waiting.
    `load()` answers None where this is not GNU readline (libedit, Windows): the shell then
    reads with `input()` in a thread, as before."""

    def __init__(self, lib: ctypes.CDLL, fd: int) -> None:
        self.lib = lib
        self.fd = fd
        self.libc = ctypes.CDLL(None)
        self.active = False
        self.generation = 0
        self._future: asyncio.Future[Read] | None = None
        self._handler = _LineHandler(self._line)      # kept alive while readline holds it
        ctypes.c_int.in_dll(lib, "rl_catch_signals").value = 0    # Ctrl-C is the loop's (run())

    @classmethod
    def load(cls, stdin: TextIO) -> Readline | None:
        if stdin is not sys.stdin or not (sys.stdin.isatty() and sys.stdout.isatty()):
            return None
        try:
            import readline
        except ImportError:
            return None
        if "libedit" in (readline.__doc__ or ""):
            return None
        try:
            # through the readline module's own handle: its libreadline, never a second copy
            lib = ctypes.CDLL(readline.__file__) if readline.__file__ else ctypes.CDLL("libreadline.so.8")
            if ctypes.c_char_p.in_dll(lib, "rl_readline_name").value != b"python":
                return None
            for name in ("rl_callback_handler_install", "rl_callback_read_char", "rl_callback_handler_remove",
                         "rl_forced_update_display", "rl_free_line_state"):
                getattr(lib, name)
            lib.rl_callback_handler_install.argtypes = [ctypes.c_char_p, _LineHandler]
            return cls(lib, sys.stdin.fileno())
        except (OSError, AttributeError, ValueError):
            return None

    async def read(self, prompt: str) -> Read:
        """One line (None at Ctrl-D on an empty line, INTERRUPTED after Ctrl-C)."""
        loop = asyncio.get_running_loop()
        self._future = loop.create_future()
        self.generation += 1
        self.lib.rl_callback_handler_install(prompt.encode(), self._handler)
        self.active = True
        loop.add_reader(self.fd, self.lib.rl_callback_read_char)
        try:
            return await self._future
        finally:
            self._close()

    def _close(self) -> None:
        if self.active:
            self.active = False
            asyncio.get_running_loop().remove_reader(self.fd)
            self.lib.rl_callback_handler_remove()      # the terminal back to how it was

    def _line(self, raw: int | None) -> None:
        """Readline's line handler (called from C: an exception here would be printed by ctypes
        as a traceback, so it is logged and the read ends as if cleared)."""
        try:
            self._took(raw)
        except Exception:
            log.exception("reading a line failed")
            self._close()
            if self._future is not None and not self._future.done():
                self._future.set_result(INTERRUPTED)

    def _took(self, raw: int | None) -> None:
        """The line is done (raw is NULL at end of input)."""
        text: str | None = None
        if raw:
            text = ctypes.string_at(raw).decode(errors="replace")
            self.libc.free(ctypes.c_void_p(raw))
        self._close()
        if text is None:
            sys.stdout.write("\n")             # readline leaves the cursor after the prompt
            sys.stdout.flush()
        elif text.strip():
            import readline
            n = readline.get_current_history_length()
            if not n or readline.get_history_item(n) != text:
                readline.add_history(text)
        if self._future is not None and not self._future.done():
            self._future.set_result(text)

    def interrupt(self) -> bool:
        """Ctrl-C: drop the line being typed, show ^C and end this read (the caller prompts
        again). False when no prompt is up."""
        if not self.active:
            return False
        self.lib.rl_free_line_state()
        if hasattr(self.lib, "rl_callback_sigcleanup"):
            self.lib.rl_callback_sigcleanup()
        self._close()
        sys.stdout.write("^C\n")
        sys.stdout.flush()
        if self._future is not None and not self._future.done():
            self._future.set_result(INTERRUPTED)
        return True

    async def above(self, write: Callable[[], None]) -> None:
        """Run `write` (printing a notice) with the prompt out of its way, then redraw the prompt
        and the typed text. Keystrokes wait in the terminal meanwhile; the write itself runs in
        a thread (a paused terminal must not stall the loop)."""
        if not self.active:
            await asyncio.to_thread(write)
            return
        loop = asyncio.get_running_loop()
        generation = self.generation
        loop.remove_reader(self.fd)
        if hasattr(self.lib, "rl_clear_visible_line"):
            self.lib.rl_clear_visible_line()
        else:
            sys.stdout.write("\r\x1b[K")
        sys.stdout.flush()
        try:
            await asyncio.to_thread(write)
        finally:
            if self.active and self.generation == generation:
                self.lib.rl_forced_update_display()
                loop.add_reader(self.fd, self.lib.rl_callback_read_char)


class Shell:
    def __init__(self, service: GpuService, *, yes: bool = False, console: Console | None = None,
                 stdin: TextIO | None = None, interactive: bool | None = None, wait: bool = True,
                 runtime: Runtime | None = None) -> None:
        self.service = service
        self.yes = yes
        self.wait = wait
        self.console = console or make_console()
        self.stdin = stdin or sys.stdin
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self.actor = service.local_actor("shell")
        self.errors = 0
        self.history: Path | None = service.settings.home / "shell_history"
        self.simulated = service.simulated
        self.dispatch: Dispatch = self._local
        self._init_terminal()
        if runtime is not None:
            runtime.deliver_to_person("shell", self.actor, self.show_notice)

    def _init_terminal(self) -> None:
        self.echo = False                        # a piped script's lines are echoed (run())
        self.readline: Readline | None = None    # set by run() on a real terminal
        self._at_prompt = False                  # input() in a thread is waiting (no Readline)
        self._command: asyncio.Task[Reply | None] | None = None
        self._command_line = ""
        self._stop_asked = False
        self._stopped = False
        self._following: str | None = None       # the machine whose boot or start is being followed

    @classmethod
    def remote(cls, client: AsyncClient, *, yes: bool = False, console: Console | None = None,
               stdin: TextIO | None = None, interactive: bool | None = None) -> Shell:
        """A shell whose lines run on a gpuherd server (see the module docstring)."""
        shell = cls.__new__(cls)
        shell.service = None  # type: ignore[assignment,unused-ignore]
        shell.yes = yes
        shell.wait = False
        shell.console = console or make_console()
        shell.stdin = stdin or sys.stdin
        shell.interactive = shell.stdin.isatty() if interactive is None else interactive
        shell.errors = 0
        shell.history = None
        shell.simulated = False
        shell._init_terminal()

        async def over_http(line: str) -> Reply:
            try:
                return await client.command(line)
            except GpuherdError as exc:            # the client's ApiError: status, code, detail
                return replies.error(exc.message, exc.hint)
            except Exception as exc:               # the server is unreachable: say so, go on
                return replies.error(f"Cannot reach the gpuherd server at {client.base_url}: "
                                     f"{type(exc).__name__}.", title="Server unreachable")
        shell.dispatch = over_http
        return shell

    async def _local(self, line: str) -> Reply:
        ctx = grammar.Context(service=self.service, actor=self.actor, delivery_id=None,
                              progress=self._progress, wait=self.wait)
        return await grammar.dispatch(ctx, line)

    # --- notices and progress -----------------------------------------------------------------

    async def show_notice(self, notice: DeliveredNotice) -> None:
        """A notice core addressed to this user: printed on its own line(s) above the prompt."""
        await self.print_notice(notice.level, notice.text, notice.actions)

    async def print_notice(self, level: str, text: str, actions: Sequence[CoreAction]) -> None:
        colour = {"warning": "yellow", "error": "red"}.get(level, "cyan")
        body = Text(f"» {text}", style=colour)
        phrased = [phrase(a, notice=True) for a in actions]
        lines = [Text(f"  [{p.label}] {p.command}", style="dim") for p in phrased]
        await self._above(body, lines)

    async def show_progress(self, event: ProgressEvent) -> None:
        """A progress event from the server's stream, printed above the prompt."""
        await self._above(Text(f"… {event.text}", style="dim"), [])

    async def _above(self, body: Text, unbroken: list[Text]) -> None:
        """Print above the prompt when one is up (redrawn after, with what was typed so far),
        else where the output is. Written from a thread: a terminal that blocks (a full pipe, a
        paused tty) must not stall the event loop the guards run on."""
        def write() -> None:
            self.console.print(body)
            for line in unbroken:          # a command to copy: never wrapped, never cropped
                self.console.print(line, soft_wrap=True)

        if self.readline is not None:
            await self.readline.above(write)
            return
        if self._at_prompt:               # input() in a thread: clear its line, print, redraw it
            def over_prompt() -> None:
                self.console.file.write("\r\x1b[K")
                write()
                self.console.file.write(PROMPT + _typed_so_far())
                self.console.file.flush()
            await asyncio.to_thread(over_prompt)
            return
        await asyncio.to_thread(write)

    def _progress(self, event: ProgressEvent) -> None:
        self._following = event.instance_id
        self.console.print(Text(f"… {event.text}", style="dim"))
        if self._stop_asked and self._command is not None:      # Ctrl-C came before the order was placed
            self._stopped = True
            self._command.cancel()

    # --- lines -----------------------------------------------------------------------------------

    async def run_line(self, line: str) -> Reply | None:
        line = line.strip()
        if not line or line.startswith("#"):
            return None
        if self.echo:
            self.console.print(Text(PROMPT, style="bold") + Text(line), soft_wrap=True)
        reply = await self.dispatch(line)
        render(reply, self.console)
        if reply.level == "error":
            self.errors += 1
        if reply.confirmation is not None:
            if await self._confirm(reply):
                return await self.run_line(reply.confirmation.command)
            self.errors += 1                      # not done: a script (and its exit code) must know
            no = next((a for a in reply.actions if a.command.startswith("/gpu cancel ")), None)
            if no is not None and (self.interactive or self.yes):
                await self.dispatch(no.command)   # a clear no closes the question
            self.console.print("[dim]Not done.[/dim]\n")
        return reply

    async def _confirm(self, reply: Reply) -> bool:
        if self.yes:
            self.console.print("[dim](--yes: confirmed)[/dim]")
            return True
        if not self.interactive:
            assert reply.confirmation is not None
            self.console.print(Text(f"Needs a yes: run `{reply.confirmation.command}`", style="dim"),
                               soft_wrap=True)
            self.console.print("[dim]or use --yes to confirm in scripts.[/dim]")
            return False
        answer = await self._read("Confirm? [y/N] ")
        return isinstance(answer, str) and answer.strip().lower() in ("y", "yes")

    async def _read(self, prompt: str) -> Read:
        """Read off the event loop so background work (scheduler, notices) keeps running."""
        if self.readline is not None:
            return await self.readline.read(prompt)
        loop = asyncio.get_running_loop()
        try:
            if self.interactive:
                self._at_prompt = True
                try:
                    return await loop.run_in_executor(None, input, prompt)
                finally:
                    self._at_prompt = False
            line = await loop.run_in_executor(None, self.stdin.readline)
            return line if line else None
        except EOFError:
            return None

    # --- Ctrl-C ------------------------------------------------------------------------------

    def _on_interrupt(self) -> None:
        """Ctrl-C: at a prompt, clear the line; while a command waits, stop waiting (a boot or
        start whose provider order is not placed yet first lets it be placed, unless asked twice)."""
        if self.readline is not None and self.readline.interrupt():
            return
        if self._at_prompt:
            self.console.file.write("^C (Ctrl-D or exit leaves)\n" + PROMPT + _typed_so_far())
            self.console.file.flush()
            return
        task = self._command
        if task is None or task.done():
            return
        if self._following is None and not self._stop_asked and _verb(self._command_line) in ORDERING:
            self._stop_asked = True
            self.console.print("[dim]^C: stopping the wait once the provider has the order "
                               "(Ctrl-C again to stop now)…[/dim]")
            return
        self._stopped = True
        task.cancel()

    async def _command_task(self, line: str) -> None:
        """A line run so that Ctrl-C can stop waiting for it (see `_on_interrupt`)."""
        self._command_line, self._following = line, None
        self._stop_asked = self._stopped = False
        self._command = asyncio.create_task(self.run_line(line), name="gpuherd-shell-line")
        try:
            await self._command
        except asyncio.CancelledError:
            if not self._stopped:
                raise
            self.errors += 1
            await self._stopped_waiting()
        finally:
            self._command = None

    async def _stopped_waiting(self) -> None:
        """After Ctrl-C stopped a wait: what the machine does now, and how to follow or stop it."""
        iid = self._following
        view = None
        if iid is not None and self.service is not None:
            try:
                view = await self.service.view(self.actor, iid)
            except GpuherdError:
                view = None
        self.console.print()                    # past the ^C the terminal echoed
        if view is None:
            self.console.print("Stopped waiting for that command; what it started goes on. /gpu status "
                               "shows your machines.\n", highlight=False)
            return
        if view.state.is_final:                 # it ended meanwhile: nothing keeps going
            self.console.print(f"Stopped waiting. {view.id} is {view.state.value}; nothing is billed.\n",
                               highlight=False)
            return
        billing = f" and billing {rate(view.current_dph)}" if view.current_dph > 0 else ""
        self.console.print(f"Stopped waiting. {view.id} is still {view.state.value}{billing}; it keeps going.",
                           highlight=False)
        steps = [(f"/gpu status {view.id}", "to follow it")]
        steps += [(phrase(a).command, "to stop paying, disk kept" if a.op is Op.STOP else "to stop paying for good")
                  for a in view.actions if a.op in (Op.STOP, Op.DESTROY)]
        pad = max(len(command) for command, _ in steps)
        for command, words in steps:
            self.console.print(Text(f"  {command.ljust(pad)}", style="bold") + Text(f"   {words}"), soft_wrap=True)
        self.console.print()

    def _catch_interrupts(self) -> Callable[[], None]:
        """Ctrl-C handled on the loop while the shell runs on a terminal; undone on leaving."""
        if not self.interactive:
            return lambda: None
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
        except (NotImplementedError, RuntimeError, ValueError):   # Windows, or not the main thread
            return lambda: None

        def release() -> None:
            loop.remove_signal_handler(signal.SIGINT)
        return release

    async def run(self) -> int:
        self.echo = not self.interactive
        if self.interactive:
            if self.history is not None:
                _enable_history(self.history)
            self.readline = Readline.load(self.stdin)
            self.console.print("gpuherd shell: type /gpu help (or just `help`); Ctrl-D to leave.")
            if self.simulated:
                self.console.print("[dim]Using the simulated sandbox provider: no real machines, no real charges.[/dim]")
        release = self._catch_interrupts()
        try:
            while True:
                line = await self._read(PROMPT)
                if isinstance(line, _Interrupted):
                    continue
                if line is None:
                    break
                if line.strip() in ("exit", "quit"):
                    break
                await self._command_task(line)
        finally:
            release()
            self.readline = None
        return 1 if self.errors and not self.interactive else 0


def _verb(line: str) -> str:
    """The command word of a line (`/gpu boot x` and `boot x` both give boot)."""
    words = line.split()
    if words and words[0] == "/gpu":
        words = words[1:]
    return words[0].lower() if words else ""


def _typed_so_far() -> str:
    try:
        import readline
        return readline.get_line_buffer()
    except ImportError:
        return ""


async def farewell(service: GpuService, actor: Actor, console: Console) -> None:
    """Leaving the shell: the person's machines still billing, and whether anything still
    guards them. Call it after the shell's Runtime has ended, so its own guard lock is
    released and `guards_held_elsewhere` sees only other processes. Which machines bill is the
    service's answer (their current rate), not a rule of this surface."""
    try:
        mine = await service.status(actor, mine=True, refresh=False)
    except GpuherdError as exc:
        console.print(f"[yellow]Could not list your machines on the way out: {escape(exc.message)}[/yellow]")
        return
    except Exception:                      # the database went away: the log has it, no traceback
        log.exception("farewell: listing the machines failed")
        return
    billing = [v for v in mine.instances if v.current_dph > 0]
    if not billing:
        return
    settings = service.settings
    try:
        guarded = await asyncio.to_thread(guards_held_elsewhere, settings.resolved_database_url, settings.home)
    except Exception:
        log.exception("farewell: the guard lock could not be checked")
        guarded = False
    total = sum((v.current_dph for v in billing), Decimal(0))
    n = len(billing)
    console.print(f"You leave {n} machine{'s' if n != 1 else ''} billing, {rate(total)} in all:")
    for v in billing:
        console.print(Text(f"  {v.id}  {v.template}  {v.state.value}  {rate(v.current_dph)}"), soft_wrap=True)
    if mine.total > len(mine.instances):
        console.print(f"  (and maybe more: the newest {len(mine.instances)} of {mine.total} are listed)")
    if guarded:
        console.print("Another gpuherd process runs the guards: idle stops, lifetimes and budgets still "
                      "apply to them.")
    else:
        console.print("[yellow]Nothing guards them now: no idle stop, lifetime or budget check runs until "
                      "gpuherd runs again (gpuherd shell, or gpuherd guards --run).[/yellow]")
    for v in billing:
        stop = next((a for a in v.actions if a.op is Op.STOP), None) or next(
            (a for a in v.actions if a.op is Op.DESTROY), None)
        if stop is not None:
            console.print(Text(f"  gpuherd {phrase(stop).command.removeprefix('/gpu ')}", style="bold"),
                          soft_wrap=True)


def _enable_history(path: Path) -> None:
    try:
        import readline
    except ImportError:  # Windows without pyreadline: no history, still works
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
        readline.set_history_length(1000)
        import atexit

        atexit.register(readline.write_history_file, path)
    except OSError:
        pass


async def run_remote(url: str, api_key: str, *, yes: bool = False, console: Console | None = None,
                     stdin: TextIO | None = None, interactive: bool | None = None,
                     ready_timeout_s: float = 5.0) -> int:
    """`gpuherd shell --server URL`: the shell against a gpuherd server, with the server's event
    stream (progress and notices) printed while it runs."""
    from gpuherd.client import AsyncClient
    from gpuherd.core.feed import FeedNotice

    async with AsyncClient(url, api_key) as client:
        shell = Shell.remote(client, yes=yes, console=console, stdin=stdin, interactive=interactive)

        async def follow() -> None:
            try:
                async for entry in client.events():
                    item = entry.item
                    if isinstance(item, FeedNotice):
                        await shell.print_notice(item.level, item.text, item.actions)
                    else:
                        await shell.show_progress(item)
            except GpuherdError as exc:        # a refused key: said once, the commands say it too
                shell.console.print(f"[red]Event stream: {escape(exc.message)}[/red]")
        stream = asyncio.create_task(follow(), name="gpuherd-remote-events")
        loop = asyncio.get_running_loop()
        until = loop.time() + ready_timeout_s
        while client.cursor is None and not stream.done() and loop.time() < until:
            await asyncio.sleep(0.02)        # live before the first line, so nothing is missed
        try:
            code = await shell.run()
            await asyncio.sleep(0.3 if not shell.interactive else 0)   # what the last lines caused
            return code
        finally:
            stream.cancel()
            try:
                await stream
            except (asyncio.CancelledError, Exception):
                pass
