"""Replies as terminal text (rich). Used by the shell and the CLI.

Decisions:
* A table fits the console's width by dropping whole columns, never by splitting a cell across
  lines mid-word: a narrow terminal (80 columns) gets the columns that matter most, every row on
  one line. Which columns go first is decided here, by the column's name (`KEEP`): the neutral
  reply says what a column is, how much room a terminal has is this surface's business (Slack
  and Discord have no width to fit). The first column (the id a next command needs) always
  stays. A note names the columns left out, so a reader knows the table is not whole.
* Only the last column may wrap, and only when it is prose (words, e.g. `does` in help) with at
  least `PROSE_MIN` columns to wrap in; anything still too wide is shortened with "…" at a word
  boundary's place, never folded.
* Action lines (a `/gpu` command to copy) are never broken: all on one line when they fit,
  otherwise one per line, printed with `soft_wrap` so rich neither wraps nor crops them (the
  terminal may show a long one over two rows, but a copy gives the whole command).
* A field value with a word too long for the space beside its label (an endpoint URL) is put
  on a line of its own below the label, unbroken, for the same reason.
* Piped output is read by scripts and logs: 160 columns instead of the default 80, unless
  COLUMNS is set (the README transcripts are made with COLUMNS=80)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from .replies import Reply
from .replies import Table as Table_

STYLES = {"info": "bold cyan", "success": "bold green", "warning": "bold yellow", "error": "bold red"}


PLAIN_ROWS = 50   # past this many rows a table is laid out as plain text: rich's layout is per cell
GAP = 3           # rich's SIMPLE_HEAD without edges: a padding, the (blank) divider, a padding
PROSE_MIN = 24    # a wrapping last column gets at least this many columns, or it is dropped
ACTION_GAP = "  "

# How long a column stays when the terminal is narrow: the lowest goes first (ties: the rightmost
# first). Unlisted columns are 50. The first column of every table always stays.
KEEP: dict[str, int] = {
    "state": 90, "spend": 90, "does": 90, "takes": 90, "$/h": 85, "event": 85, "gpu": 80,
    "next": 75, "next action": 75, "at": 70, "instance": 70, "details": 65, "template": 78,
    "model": 60, "actor": 60, "accrued": 55, "GPU RAM": 55, "max $/h": 50, "owner": 50, "GB": 50,
    "cost": 45, "n": 40, "GPUs": 40, "rel.": 35, "idle": 30, "where": 30, "label": 30,
    "uptime": 25, "from": 20, "via": 20,
}
# Columns of sentences: the only ones that may wrap (as the last column shown), at word boundaries.
PROSE = frozenset({"does", "takes", "details"})


@dataclass(frozen=True)
class Layout:
    """Which columns of a table are shown at a width, and whether the last one wraps."""

    keep: list[int]
    widths: list[int]          # natural width of every column (header and cells)
    wrap_last: bool
    dropped: list[str]
    stacked: bool = False      # not even two columns fit: each row as a record (see `_stacked`)


def _is_prose(t: Table_, i: int) -> bool:
    return t.columns[i] in PROSE and any(" " in row[i] for row in t.rows if i < len(row))


def _longest_word(t: Table_, i: int) -> int:
    return max((cell_len(w) for row in t.rows if i < len(row) for w in row[i].split()), default=0)


def layout(t: Table_, width: int) -> Layout:
    """The columns that fit `width` (see the module docstring)."""
    n = len(t.columns)
    widths = [max([cell_len(c)] + [cell_len(r[i]) for r in t.rows if i < len(r)]) for i, c in enumerate(t.columns)]
    keep = list(range(n))

    def need(cols: list[int]) -> tuple[int, bool]:
        """Columns needed for `cols`, and whether the last one must wrap to get there."""
        full = sum(widths[i] for i in cols) + GAP * (len(cols) - 1)
        if full <= width or not cols:
            return full, False
        last = cols[-1]
        if len(cols) > 1 and _is_prose(t, last):
            least = max(min(widths[last], PROSE_MIN), _longest_word(t, last), cell_len(t.columns[last]))
            return full - widths[last] + least, True
        return full, False

    order = sorted(range(1, n), key=lambda i: (KEEP.get(t.columns[i], 50), -i))
    dropped: list[int] = []
    total, wrap = need(keep)
    for i in order:
        if total <= width:
            break
        keep.remove(i)
        dropped.append(i)
        total, wrap = need(keep)
    # back-fill: a wide column dropped late may have made room for narrower ones dropped before it
    for i in sorted(dropped, key=lambda i: (-KEEP.get(t.columns[i], 50), i)):
        trial = sorted([*keep, i])
        t_total, t_wrap = need(trial)
        if t_total <= width:
            keep, total, wrap = trial, t_total, t_wrap
            dropped.remove(i)
    if len(keep) == 1 and n > 1:
        return Layout(keep=list(range(n)), widths=widths, wrap_last=False, dropped=[], stacked=True)
    return Layout(keep=keep, widths=widths, wrap_last=wrap and total <= width,
                  dropped=[t.columns[i] for i in sorted(dropped)])


def _shorten(cell: str, room: int) -> str:
    if cell_len(cell) <= room:
        return cell
    out = ""
    for ch in cell:
        if cell_len(out + ch) > room - 1:
            break
        out += ch
    return out.rstrip() + "…"


def plain_table(t: Table_, width: int | None = None) -> str:
    """Fixed-width columns, the same look as rich's SIMPLE_HEAD box, in linear time; at most
    `width` columns wide (the same columns as `layout` keeps, the last shortened if need be)."""
    lay = layout(t, width) if width else Layout(list(range(len(t.columns))),
                                                [max(len(c), *(len(r[i]) for r in t.rows)) for i, c in
                                                 enumerate(t.columns)], False, [])
    widths = [lay.widths[i] for i in lay.keep]
    if width:
        over = sum(widths) + GAP * (len(widths) - 1) - width
        if over > 0:
            widths[-1] = max(1, widths[-1] - over)
    right = [bool(t.align and i < len(t.align) and t.align[i] == "right") for i in lay.keep]
    sep = " " * GAP

    def line(cells: list[str]) -> str:
        picked = [_shorten(cells[i] if i < len(cells) else "", w) for i, w in zip(lay.keep, widths, strict=True)]
        return sep.join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(picked, widths, right, strict=True)).rstrip()

    out = [line(t.columns), "─" * (sum(widths) + GAP * (len(widths) - 1))]
    out += [line(row) for row in t.rows]
    if t.caption:
        out.append(t.caption)
    return "\n".join(out)


def _stacked(t: Table_) -> RenderableType:
    """A table too wide for even two columns (help's usage lines at 80 columns): each row's first
    cell on a line, the others below it, indented and wrapped at words."""
    out: list[RenderableType] = []
    for row in t.rows:
        out.append(Text(row[0] if row else "", style="bold"))
        rest = [(c, row[i]) for i, c in enumerate(t.columns) if 0 < i < len(row) and row[i]]
        if len(t.columns) == 2:
            below = rest[0][1] if rest else ""
        else:
            below = " · ".join(f"{c} {v}" for c, v in rest)
        if below:
            out.append(Padding(Text(below, overflow="ellipsis"), (0, 0, 0, 4)))
    if t.caption:
        out.append(Text(t.caption))
    return Group(*out)


def _table(t: Table_, width: int | None) -> tuple[RenderableType, list[str]]:
    """The table and the names of the columns it leaves out."""
    lay = layout(t, width) if width else Layout(list(range(len(t.columns))), [], False, [])
    if lay.stacked:
        return _stacked(t), []
    if len(t.rows) > PLAIN_ROWS:
        return Text(plain_table(t, width)), lay.dropped
    table = Table(box=box.SIMPLE_HEAD, caption=Text(t.caption) if t.caption else None, show_edge=False,
                  pad_edge=False)
    for pos, i in enumerate(lay.keep):
        justify = (t.align[i] if t.align and i < len(t.align) else "left")
        wraps = lay.wrap_last and pos == len(lay.keep) - 1
        table.add_column(Text(t.columns[i]), justify=justify, no_wrap=not wraps, overflow="ellipsis")
    for row in t.rows:
        table.add_row(*(Text(row[i] if i < len(row) else "") for i in lay.keep))
    return table, lay.dropped


def _fields(reply: Reply, width: int | None) -> list[RenderableType]:
    """The label/value grid; a value whose longest word cannot sit beside its label goes below it."""
    label_w = max(cell_len(f.label) for f in reply.fields)
    room = (width - label_w - 2) if width else None
    out: list[RenderableType] = []
    grid: Table | None = None
    for f in reply.fields:
        longest = max((cell_len(w) for w in f.value.split()), default=0)
        if room is not None and longest > room:
            grid = None
            out.append(Text(f.label, style="dim"))
            out.append(Unbroken(f"  {f.value}"))
            continue
        if grid is None:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="dim", no_wrap=True, min_width=label_w)
            grid.add_column(overflow="fold")
            out.append(grid)
        grid.add_row(Text(f.label), Text(f.value))
    return out


class Unbroken:
    """A line that must reach the reader whole (a command to copy): `render` prints it with
    `soft_wrap`, so rich neither wraps nor crops it."""

    def __init__(self, text: str, style: str = "") -> None:
        self.text = Text(text, style=style, no_wrap=True, overflow="ignore")

    def __rich__(self) -> Text:
        return self.text


def action_lines(reply: Reply, width: int | None) -> list[str]:
    """The reply's next steps, each `[label] /gpu …`: on one line when all fit `width`, else one
    a line (never a command broken in two)."""
    if not reply.actions or reply.confirmation:
        return []
    each = [f"[{a.label}] {a.command}" for a in reply.actions]
    joined = ACTION_GAP.join(each)
    if width is None or cell_len(joined) <= width:
        return [joined]
    return each


def parts(reply: Reply, width: int | None = None) -> list[RenderableType]:
    """What a reply shows, in order, laid out for `width` columns (None: as wide as it needs)."""
    out: list[RenderableType] = [Text(reply.title, style=STYLES[reply.level])]
    if reply.text:
        out.append(Text(reply.text))
    if reply.fields:
        out += _fields(reply, width)
    for t in reply.tables:
        table, hidden = _table(t, width)
        out.append(table)
        if hidden:
            out.append(Text(f"Not shown at {width} columns: {', '.join(hidden)}.", style="dim"))
    out += [Unbroken(line, style="dim") for line in action_lines(reply, width)]
    for note in reply.notes:
        out.append(Text(note, style="dim italic"))
    return out


class _Laid:
    """A reply laid out when rich prints it, at the width it prints into (the notebook's text
    form, any console)."""

    def __init__(self, reply: Reply, width: int | None) -> None:
        self.reply, self.width = reply, width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from parts(self.reply, self.width or options.max_width)


def renderable(reply: Reply, width: int | None = None) -> RenderableType:
    """The reply as one renderable, laid out for `width` or, by default, for where it is printed."""
    return _Laid(reply, width)


def make_console(stderr: bool = False) -> Console:
    """Piped output is read by scripts and logs: keep rows on one line instead of 80 columns,
    unless COLUMNS says how wide the reader is (the README's transcripts are made at 80)."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isascii() and columns.isdigit() and 20 <= int(columns) <= 1000 else 160
        console = Console(stderr=stderr, width=width)
    return console


def render(reply: Reply, console: Console) -> None:
    """Print a reply at the console's width: consecutive ordinary parts as one group, each
    unbroken line on its own with `soft_wrap`."""
    pending: list[RenderableType] = []
    for part in parts(reply, console.width):
        if isinstance(part, Unbroken):
            if pending:
                console.print(Group(*pending))
                pending = []
            console.print(part.text, soft_wrap=True)
        else:
            pending.append(part)
    if pending:
        console.print(Group(*pending))
    console.print()


def to_text(reply: Reply, width: int = 120) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    with console.capture() as cap:
        render(reply, console)
    return cap.get()
