"""`gpuherd shell`: /gpu commands from the terminal (prompt and history) or from stdin when piped,
with the same grammar and replies as chat. Where chat shows a confirm dialog the shell asks y/N;
`--yes` accepts in scripts. Boots and starts wait for the health check and show its progress
(`--no-wait` returns as soon as the provider accepted). Notices reach the shell as one of the
outbox's destinations (core decides who hears what); they are printed above the prompt."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.markup import escape

from gpuherd.core.outbox import DeliveredNotice
from gpuherd.core.results import ProgressEvent
from gpuherd.core.runtime import Runtime
from gpuherd.core.service import GpuService

from . import grammar
from .render_text import make_console, render
from .replies import Reply, phrase

PROMPT = "gpu> "


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
        if runtime is not None:
            runtime.deliver_to_person("shell", self.actor, self.show_notice)

    async def show_notice(self, notice: DeliveredNotice) -> None:
        """A notice core addressed to this user: printed on its own line(s) above the prompt."""
        colour = {"warning": "yellow", "error": "red"}.get(notice.level, "cyan")
        lines = [f"[{colour}]» {escape(notice.text)}[/{colour}]"]
        for action in notice.actions:
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

    async def run_line(self, line: str) -> Reply | None:
        line = line.strip()
        if not line or line.startswith("#"):
            return None
        ctx = grammar.Context(service=self.service, actor=self.actor, delivery_id=None,
                              progress=self._progress, wait=self.wait)
        if not self.interactive:
            self.console.print(f"[bold]{PROMPT}[/bold]{escape(line)}")
        reply = await grammar.dispatch(ctx, line)
        render(reply, self.console)
        if reply.level == "error":
            self.errors += 1
        if reply.confirmation is not None:
            if await self._confirm(reply):
                return await self.run_line(reply.confirmation.command)
            no = next((a for a in reply.actions if a.command.startswith("/gpu cancel ")), None)
            if no is not None and (self.interactive or self.yes):
                await grammar.dispatch(ctx, no.command)   # a clear no closes the question
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
            _enable_history(self.service.settings.home / "shell_history")
            self.console.print("gpuherd shell: type /gpu help (or just `help`); Ctrl-D to leave.")
            if self.service.simulated:
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


