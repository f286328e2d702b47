"""Replies as terminal text (rich). Used by the shell and the CLI."""

from __future__ import annotations

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .replies import Reply

STYLES = {"info": "bold cyan", "success": "bold green", "warning": "bold yellow", "error": "bold red"}


def renderable(reply: Reply) -> RenderableType:
    parts: list[RenderableType] = [Text(reply.title, style=STYLES[reply.level])]
    if reply.text:
        parts.append(Text(reply.text))
    if reply.fields:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column()
        for f in reply.fields:
            grid.add_row(Text(f.label), Text(f.value))
        parts.append(grid)
    for t in reply.tables:
        table = Table(box=box.SIMPLE_HEAD, caption=Text(t.caption) if t.caption else None, show_edge=False,
                      pad_edge=False)
        for i, col in enumerate(t.columns):
            justify = (t.align[i] if t.align and i < len(t.align) else "left")
            table.add_column(Text(col), justify=justify, overflow="fold")
        for row in t.rows:
            table.add_row(*(Text(cell) for cell in row))
        parts.append(table)
    if reply.actions and not reply.confirmation:
        parts.append(Text("  ".join(f"[{a.label}] {a.command}" for a in reply.actions), style="dim"))
    for note in reply.notes:
        parts.append(Text(note, style="dim italic"))
    return Group(*parts)


def make_console(stderr: bool = False) -> Console:
    """Piped output is read by scripts and logs: keep rows on one line instead of 80 columns."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=160)
    return console


def render(reply: Reply, console: Console) -> None:
    console.print(renderable(reply))
    console.print()


def to_text(reply: Reply, width: int = 120) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    with console.capture() as cap:
        render(reply, console)
    return cap.get()
