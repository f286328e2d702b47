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
The stream is live before the first line is sent, so the first boot's progress is not missed."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.markup import escape

from gpuherd.core.actions import Action as CoreAction
from gpuherd.core.errors import GpuherdError
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
        if runtime is not None:
            runtime.deliver_to_person("shell", self.actor, self.show_notice)

    @classmethod
    def remote(cls, client: AsyncClient, *, yes: bool = False, console: Console | None = None,
               stdin: TextIO | None = None, interactive: bool | None = None) -> Shell:
        """A shell whose lines run on a gpuherd server (see the module docstring)."""
        shell = cls.__new__(cls)
        shell.service = None  # type: ignore[assignment]
        shell.yes = yes
        shell.wait = False
        shell.console = console or make_console()
        shell.stdin = stdin or sys.stdin
        shell.interactive = shell.stdin.isatty() if interactive is None else interactive
        shell.errors = 0
        shell.history = None
        shell.simulated = False

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

    async def show_notice(self, notice: DeliveredNotice) -> None:
        """A notice core addressed to this user: printed on its own line(s) above the prompt."""
        await self.print_notice(notice.level, notice.text, notice.actions)

    async def print_notice(self, level: str, text: str, actions: Sequence[CoreAction]) -> None:
        colour = {"warning": "yellow", "error": "red"}.get(level, "cyan")
        lines = [f"[{colour}]» {escape(text)}[/{colour}]"]
        for action in actions:
            phrased = phrase(action, notice=True)
            lines.append(f"  [dim]\\[{escape(phrased.label)}] {escape(phrased.command)}[/dim]")
        # a prompt may be waiting for input: start on a fresh line, then show the prompt again.
        # Written from a thread: a terminal that blocks (a full pipe, a paused tty) must not
        # stall the event loop the guards run on.
        text = ("\n" if self.interactive else "") + "\n".join(lines)
        await asyncio.to_thread(self._write_notice, text)

    def _write_notice(self, text: str) -> None:
        self.console.print(text)
        if self.interactive:
            self.console.print(PROMPT, end="")

    def _progress(self, event: ProgressEvent) -> None:
        self.console.print(f"[dim]… {escape(event.text)}[/dim]")

    async def show_progress(self, event: ProgressEvent) -> None:
        """A progress event from the server's stream, printed above the prompt."""
        text = ("\n" if self.interactive else "") + f"[dim]… {escape(event.text)}[/dim]"
        await asyncio.to_thread(self._write_notice, text)

    async def run_line(self, line: str) -> Reply | None:
        line = line.strip()
        if not line or line.startswith("#"):
            return None
        if not self.interactive:
            self.console.print(f"[bold]{PROMPT}[/bold]{escape(line)}")
        reply = await self.dispatch(line)
        render(reply, self.console)
        if reply.level == "error":
            self.errors += 1
        if reply.confirmation is not None:
            if await self._confirm(reply):
                return await self.run_line(reply.confirmation.command)
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
            self.console.print(f"[dim]Needs a yes: run `{escape(reply.confirmation.command)}`, or use --yes to "
                               "confirm in scripts.[/dim]")
            return False
        answer = await self._read("Confirm? [y/N] ")
        return (answer or "").strip().lower() in ("y", "yes")

    async def _read(self, prompt: str) -> str | None:
        """Read off the event loop so background work (scheduler, notices) keeps running."""
        loop = asyncio.get_running_loop()
        try:
            if self.interactive:
                return await loop.run_in_executor(None, input, prompt)
            line = await loop.run_in_executor(None, self.stdin.readline)
            return line if line else None
        except EOFError:
            return None

    async def run(self) -> int:
        if self.interactive:
            if self.history is not None:
                _enable_history(self.history)
            self.console.print("gpuherd shell: type /gpu help (or just `help`); Ctrl-D to leave.")
            if self.simulated:
                self.console.print("[dim]Using the simulated sandbox provider: no real machines, no real charges.[/dim]")
        while True:
            line = await self._read(PROMPT)
            if line is None:
                break
            if line.strip() in ("exit", "quit"):
                break
            await self.run_line(line)
        return 1 if self.errors and not self.interactive else 0


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
