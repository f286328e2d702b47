"""`gpuherd shell`: /gpu commands from the terminal (prompt and history) or from stdin when piped,
with the same grammar and replies as chat. Where chat shows a confirm dialog the shell asks y/N;
`--yes` accepts in scripts."""

from __future__ import annotations

import asyncio
import sys

from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from gpuherd.core.models import Role
from gpuherd.core.notify import Notice
from gpuherd.core.service import GpuService

from . import grammar
from .render_text import make_console, render
from .replies import Reply

PROMPT = "gpu> "


class Shell:
    def __init__(self, service: GpuService, *, yes: bool = False, console: Console | None = None,
                 stdin: TextIO | None = None, interactive: bool | None = None) -> None:
        self.service = service
        self.yes = yes
        self.console = console or make_console()
        self.stdin = stdin or sys.stdin
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self.actor = service.local_actor("shell")
        self.errors = 0
        service.hub.subscribe(self._notice)

    def _notice(self, notice: Notice) -> None:
        if notice.actor == self.actor.principal:
            return  # the reply to the user's own command says it already
        if notice.to_admins and not self.actor.at_least(Role.ADMIN):
            return  # machines gpuherd does not manage are the admins' business
        colour = {"warning": "yellow", "error": "red"}.get(notice.level, "cyan")
        self.console.print(f"[{colour}]» {escape(notice.text)}[/{colour}]")
        for action in notice.actions:
            self.console.print(f"  [dim]\\[{escape(action.label)}] {escape(action.command)}[/dim]")

    def _progress(self, text: str) -> None:
        self.console.print(f"[dim]… {escape(text)}[/dim]")

    async def run_line(self, line: str) -> Reply | None:
        line = line.strip()
        if not line or line.startswith("#"):
            return None
        ctx = grammar.Context(service=self.service, actor=self.actor, delivery_id=None,
                              progress=self._progress)
        if not self.interactive:
            self.console.print(f"[bold]{PROMPT}[/bold]{escape(line)}")
        reply = await grammar.dispatch(ctx, line)
        render(reply, self.console)
        if reply.level == "error":
            self.errors += 1
        if reply.confirmation is not None:
            if await self._confirm(reply):
                return await self.run_line(reply.confirmation.command)
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


