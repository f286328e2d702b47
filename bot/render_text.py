"""Replies as terminal text (rich). Used by the shell and the CLI."""

from __future__ import annotations

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .replies import Reply
from .replies import Table as Table_

STYLES = {"info": "bold cyan", "success": "bold green", "warning": "bold yellow", "error": "bold red"}


PLAIN_ROWS = 50   # past this many rows a table is laid out as plain text: rich's layout is per cell


def plain_table(t: Table_) -> str:
    """Fixed-width columns, the same look as rich's SIMPLE_HEAD box, in linear time."""
    widths = [max(len(c), *(len(r[i]) for r in t.rows)) for i, c in enumerate(t.columns)]
    right = [bool(t.align and i < len(t.align) and t.align[i] == "right") for i in range(len(widths))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=False)).rstrip()

    out = [line(t.columns), "─" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [line(row) for row in t.rows]
    if t.caption:
        out.append(t.caption)
    return "\n".join(out)


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
        if len(t.rows) > PLAIN_ROWS:
            parts.append(Text(plain_table(t)))
            continue
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
