"""A platform-neutral `Reply` as Discord messages: one embed each, with buttons; a notice; a boot's
progress. Every message passes `limits.violations` (the limits themselves are in `limits.py`).

Decisions:

- **One embed a message.** Title = the reply's title; description = the reply's text, then its
  tables; the reply's fields as embed fields (inline flag kept); footer = the notes, one a line;
  colour by level (`COLOURS`). Visually Discord shows the description above the fields.
- **What is clipped, visibly (with "…"), and nothing else:** a table cell wider than `CELL_MAX`
  (96, so that the key column and any other always share a line). The embed title is cut to
  256 characters too, but then the whole title opens the description of the first page, so
  nothing is lost. A button label is cut to 80 (Discord's limit; the button still does the whole
  action, which is its ref). Outside `render` two things are bounded because each is one
  message by contract: a notice's text (4096, one embed) and a progress text; core writes both
  as a sentence or two.
- **Pages, never cuts.** Content flows in reply order (the text, the fields, the tables, then
  what did not fit elsewhere) onto pages of at most 4096 characters of description, 25 fields
  and 6000 characters of embed text in all. The text is cut at a line break (else a space) in
  the second half of a page, never inside an escape, a mention or a link; a table is cut between
  rows and every piece repeats the header row and the rule (a caption says "(continued)"). A
  table wider than `TABLE_LINE_MAX` is shown as several tables of column groups, each repeating
  the first (key) column. A field that is too long for an embed field (name 256, value 1024)
  becomes a paragraph "**name**" + value in the description, at its place in the flow; fields
  past 25 go to the next page. When there is more than one page, each says "page i/n" in its
  footer and has a Previous/Next row: `custom_id` `f"{PAGE_PREFIX}{n}"` with n the 0-based page
  it shows; on the first/last page the button is disabled and carries `PREV_NONE`/`NEXT_NONE`
  (custom_ids are unique within a message). Notes longer than `FOOTER_NOTES_MAX` together go to
  the end of the description instead of the footer.
- **Buttons.** `custom_id` = the core action's ref (`stop|g-7f3a`, `confirm||c_9f…`; core
  guarantees ≤100 characters and a `|`); an action without a ref (typed-command-only) is not a
  button and is left out; a repeated ref is shown once. Style: primary→primary,
  danger→danger, default→secondary. `Action.confirm` is ignored: Discord has no confirm dialog,
  and core asks for a yes itself when the button comes back. A reply waiting for a yes
  (`Reply.confirmation`) gets its Yes first (danger when the confirmation is a danger action,
  i.e. destroy; else primary), then its other actions (Cancel); the question's text with its
  $/h, $/day and $/month is the description, and the cost fields are embed fields. Action
  buttons are on EVERY page (a paged message shows one page at a time, so a button only on the
  last page would be out of reach on the others): at most 25 (5 rows of 5), 20 when the paging
  row is there. Actions past that are listed as "Label: `/gpu …`" lines at the end of the flow.
- **Escaping.** Text outside code blocks where Discord renders markdown (description, field
  names and values, title) has `\\ * _ ~ ` | < > # [ ]` backslash-escaped, so user text cannot
  format, quote, make a heading, a masked link, a spoiler or a mention; links (`http(s)://…`)
  are left whole so they stay clickable. Then `discord:<id>` principals become mentions `<@id>`
  in the description and field values (they render as names and never ping in an embed), and
  display names from `names` (else the bare id) where mentions do not render: the title, field
  names, the footer, button labels and tables. The footer and button labels are plain text (no
  markdown there, so no escaping). Inside a table's code block a backtick becomes `ˋ` (U+02CB)
  so no cell can close the fence, and line breaks in a cell become spaces.
- **Placeholders.** Discord refuses empty field names and values: they become "—"; an empty title
  becomes "gpuherd"."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gpuherd.bot import replies
from gpuherd.bot.replies import Reply, Table

from . import limits

__all__ = ["COLOURS", "NEXT_NONE", "PAGE_PREFIX", "PREV_NONE", "Button", "DiscordMessage", "mention", "render",
           "render_notice", "render_progress"]

PAGE_PREFIX = "gpuherd:page:"
PREV_NONE = f"{PAGE_PREFIX}none-prev"     # the disabled Previous of a first page
NEXT_NONE = f"{PAGE_PREFIX}none-next"     # the disabled Next of a last page
COLOURS: dict[str, int] = {"info": 0x5865F2, "success": 0x57F287, "warning": 0xF0B232, "error": 0xED4245}

CELL_MAX = 96                             # a key and one column always fit a line
TABLE_LINE_MAX = 200                      # wider tables are split into column groups
CAPTION_MAX = 200                         # a longer caption is said once, not repeated on each piece
FOOTER_NOTES_MAX = 1000
PAGE_MARK_RESERVE = 24                    # "\npage 9999/9999" in a footer
MIN_PIECE = 400                           # no sliver of text at the foot of a page
URL_MAX = 512
COMMAND_ATOM_MAX = 300
BAR_WIDTH = 20
PLACEHOLDER = "—"
UNTITLED = "gpuherd"
SEP = "\n\n"
MAX_BUTTONS = limits.ACTION_ROWS * limits.BUTTONS_PER_ROW

Style = Literal["primary", "secondary", "success", "danger"]
_STYLE: dict[str, Style] = {"primary": "primary", "danger": "danger", "default": "secondary"}
_MARKDOWN = frozenset("\\*_~`|<>#[]")
_TOKEN = re.compile(r"(?P<who>(?<![A-Za-z0-9_])discord:(?P<id>\d{1,20})(?![A-Za-z0-9_]))"
                    rf"|(?P<url>https?://[^\s<>`]{{1,{URL_MAX}}})")
_PRINCIPAL = re.compile(r"(?<![A-Za-z0-9_])discord:(\d{1,20})(?![A-Za-z0-9_])")
_URL_TAIL = "*_~|]\\"                      # markdown characters a link does not end with
_CELL_SPACE = re.compile(r"[\r\n\t\v\f]+")
_NUMBER = re.compile(r"^[-+]?[$€£]?\d[\d,]*(\.\d+)?\s?(%|/h|GB|[smhd]|x\d+)?$")


@dataclass
class Button:
    label: str
    custom_id: str
    style: Style = "secondary"
    disabled: bool = False


@dataclass
class DiscordMessage:
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    rows: list[list[Button]] = field(default_factory=list)
    ephemeral: bool = False

    def payload(self) -> dict[str, Any]:
        """The message as Discord's JSON (what `limits.violations` checks)."""
        out: dict[str, Any] = {}
        if self.content:
            out["content"] = self.content
        out["embeds"] = self.embeds
        out["components"] = [{"type": limits.ACTION_ROW_TYPE, "components": [
            {"type": limits.BUTTON_TYPE, "style": limits.BUTTON_STYLES[b.style], "label": b.label,
             "custom_id": b.custom_id, "disabled": b.disabled} for b in row]} for row in self.rows if row]
        if self.ephemeral:
            out["flags"] = limits.EPHEMERAL
        return out

    def custom_ids(self) -> list[str]:
        return [b.custom_id for row in self.rows for b in row]


# --- text ------------------------------------------------------------------------------------------

def mention(text: str) -> str:
    """`discord:<snowflake>` principals in `text` as mentions `<@snowflake>` (in an embed they render
    as the user's name and do not ping). Nothing else is changed."""
    return _PRINCIPAL.sub(r"<@\1>", text)


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _MARKDOWN else c for c in text)


def _name(uid: str, names: dict[str, str] | None) -> str:
    return (names or {}).get(f"discord:{uid}") or uid


def _plain(raw: str, names: dict[str, str] | None) -> str:
    """Text where mentions do not render (footer, labels, code blocks): a principal by name."""
    return _PRINCIPAL.sub(lambda m: _name(m.group(1), names), raw)


def _atoms(raw: str, names: dict[str, str] | None, *, mentions: bool = True) -> list[str]:
    """`raw` as markdown in pieces that must not be cut: escaped characters, whole links, whole
    mentions (or, with `mentions=False`, a principal as its escaped name)."""
    out: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(raw):
        out.extend(_escape(c) for c in raw[pos:m.start()])
        if m["who"]:
            out.extend([f"<@{m['id']}>"] if mentions else [_escape(c) for c in _name(m["id"], names)])
        else:
            url = m["url"].rstrip(_URL_TAIL)
            out.append(url)
            out.extend(_escape(c) for c in m["url"][len(url):])
        pos = m.end()
    out.extend(_escape(c) for c in raw[pos:])
    return out


def _md(raw: str, names: dict[str, str] | None, *, mentions: bool = True) -> str:
    return "".join(_atoms(raw, names, mentions=mentions))


def _clip(atoms: Sequence[str], limit: int) -> tuple[str, bool]:
    """The atoms joined, at most `limit` characters: cut between atoms and ended with "…"."""
    if sum(map(len, atoms)) <= limit:
        return "".join(atoms), False
    out: list[str] = []
    size = 0
    for a in atoms:
        if size + len(a) > limit - 1:
            break
        out.append(a)
        size += len(a)
    return "".join(out) + "…", True


def _clip_plain(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- the flow of a page ---------------------------------------------------------------------------

class _Text:
    """Markdown atoms taken in pieces that fit the room left on a page."""

    def __init__(self, atoms: list[str]) -> None:
        self.atoms = atoms
        self.pos = 0
        self.left = sum(map(len, atoms))

    @property
    def done(self) -> bool:
        return self.pos >= len(self.atoms)

    def take(self, room: int, fresh: bool) -> str | None:
        """The next piece, at most `room` long; None when a new page should take it (`fresh`: the
        page is empty, so something is always given)."""
        atoms, start = self.atoms, self.pos
        if self.left <= room:
            self.pos, self.left = len(atoms), 0
            return "".join(atoms[start:])
        if not fresh and room < MIN_PIECE:
            return None
        end, size = start, 0
        while end < len(atoms) and size + len(atoms[end]) <= room:
            size += len(atoms[end])
            end += 1
        if end == start:
            if not fresh:
                return None
            end = start + 1                  # cannot happen: an atom is far below a page
        cut, skip = end, 0
        if end < len(atoms):                 # prefer a line break, then a space, in the second half
            for sep in ("\n", " "):
                at = next((i for i in range(end - 1, start + (end - start) // 2, -1) if atoms[i] == sep), None)
                if at is not None:
                    cut, skip = at, 1
                    break
        piece = "".join(atoms[start:cut])
        self.pos = cut + skip
        self.left -= sum(len(a) for a in atoms[start:self.pos])
        return piece


class _TableFlow:
    """One table's code blocks: rows taken in pieces, each repeating the header row and rule."""

    def __init__(self, caption: str, header: str, rule: str, rows: list[str]) -> None:
        self.caption, self.header, self.rule, self.rows = caption, header, rule, rows
        self.pos = 0
        self.pieces = 0

    @property
    def done(self) -> bool:
        return self.pieces > 0 and self.pos >= len(self.rows)

    def take(self, room: int, fresh: bool) -> str | None:
        prefix = f"**{self.caption}**{' (continued)' if self.pieces else ''}\n" if self.caption else ""
        head = f"{prefix}```\n{self.header}\n{self.rule}\n"
        size = len(head) + len("```")
        if not self.rows:
            body = "(no rows)\n"
            if size + len(body) > room and not fresh:
                return None
            self.pieces += 1
            return f"{head}{body}```"
        end = self.pos
        while end < len(self.rows) and size + len(self.rows[end]) + 1 <= room:
            size += len(self.rows[end]) + 1
            end += 1
        taken = end - self.pos
        if not fresh and (taken == 0 or taken < min(3, len(self.rows) - self.pos)):
            return None                      # no sliver of a table at the foot of a page
        end = max(end, self.pos + 1)
        body = "".join(row + "\n" for row in self.rows[self.pos:end])
        self.pos = end
        self.pieces += 1
        return f"{head}{body}```"


@dataclass
class _Field:
    name: str
    value: str
    inline: bool

    @property
    def size(self) -> int:
        return len(self.name) + len(self.value)


_Item = _Text | _TableFlow | _Field


def _cell(value: Any, names: dict[str, str] | None) -> str:
    text = _CELL_SPACE.sub(" ", _plain(str(value), names)).replace("`", "ˋ")
    return _clip_plain(text, CELL_MAX)


def _column_groups(widths: list[int]) -> list[list[int]]:
    """Columns in groups whose lines are at most `TABLE_LINE_MAX`, each after the first repeating
    column 0 (the key: an id, a name)."""
    if sum(widths) + 2 * (len(widths) - 1) <= TABLE_LINE_MAX:
        return [list(range(len(widths)))]
    groups: list[list[int]] = []
    cur = [0]
    for i in range(1, len(widths)):
        if len(cur) > 1 and sum(widths[j] for j in cur) + widths[i] + 2 * len(cur) > TABLE_LINE_MAX:
            groups.append(cur)
            cur = [0]
        cur.append(i)
    groups.append(cur)
    return groups


def _table_items(table: Table, names: dict[str, str] | None) -> list[_Item]:
    ncols = max([len(table.columns), *(len(r) for r in table.rows), 1])
    head = [_cell(c, names) for c in table.columns] + [""] * (ncols - len(table.columns))
    body = [[_cell(c, names) for c in row] + [""] * (ncols - len(row)) for row in table.rows]
    widths = [max([len(head[i]), *(len(r[i]) for r in body)]) for i in range(ncols)]
    align = table.align or []
    right = [align[i] == "right" if i < len(align) else
             (not table.align and any(r[i] for r in body) and all(_NUMBER.match(r[i]) for r in body if r[i]))
             for i in range(ncols)]
    groups = _column_groups(widths)
    items: list[_Item] = []
    caption = _md(_one_line(table.caption or ""), names)
    if len(caption) > CAPTION_MAX:           # said once, in full, above the table
        items.append(_Text(_atoms(_one_line(table.caption or ""), names)))
        caption = ""
    for cols in groups:
        def line(cells: list[str], cols: list[int] = cols) -> str:
            return "  ".join(cells[i].rjust(widths[i]) if right[i] else cells[i].ljust(widths[i])
                             for i in cols).rstrip()
        label = caption
        if len(groups) > 1:
            first = 1 if cols is groups[0] else cols[1] + 1
            label = (caption + " · " if caption else "") + f"columns {first}–{cols[-1] + 1} of {ncols}"
        rule = "─" * max(sum(widths[i] for i in cols) + 2 * (len(cols) - 1), 1)
        items.append(_TableFlow(label, line(head), rule, [line(r) for r in body]))
    return items


def _field_items(fields: Iterable[replies.ReplyField], names: dict[str, str] | None) -> list[_Item]:
    items: list[_Item] = []
    for f in fields:
        name = _md(_one_line(f.label), names, mentions=False) or PLACEHOLDER
        value = _md(f.value, names).strip() or PLACEHOLDER
        if len(name) <= limits.FIELD_NAME and len(value) <= limits.FIELD_VALUE:
            items.append(_Field(name, value, f.inline))
            continue
        head = [f"**{name}**"] if len(name) <= limits.FIELD_NAME else _atoms(_one_line(f.label), names)
        items.append(_Text([*head, "\n", *_atoms(f.value, names)]))
    return items


# --- buttons ---------------------------------------------------------------------------------------

def _label(text: str, names: dict[str, str] | None) -> str:
    return _clip_plain(_one_line(_plain(text, names)) or PLACEHOLDER, limits.BUTTON_LABEL)


def _buttons(actions: Sequence[replies.Action], names: dict[str, str] | None,
             confirmation: replies.Action | None = None) -> list[tuple[Button, replies.Action]]:
    """The buttons of a reply in order (its yes first), each with the action it stands for."""
    if confirmation is not None:
        actions = [confirmation, *actions]
    out: list[tuple[Button, replies.Action]] = []
    seen: set[str] = set()
    for a in actions:
        ref = a.ref
        if not ref or "|" not in ref or len(ref) > limits.CUSTOM_ID or ref.startswith(PAGE_PREFIX) or ref in seen:
            continue                         # typed-command-only, or shown already
        seen.add(ref)
        style: Style = _STYLE.get(a.style, "secondary")
        if confirmation is not None and a is confirmation:
            style = "danger" if a.style == "danger" else "primary"
        out.append((Button(label=_label(a.label, names), custom_id=ref, style=style), a))
    return out


def _rows(buttons: Sequence[Button]) -> list[list[Button]]:
    step = limits.BUTTONS_PER_ROW
    return [list(buttons[i:i + step]) for i in range(0, len(buttons), step)]


def _more(actions: Sequence[replies.Action], names: dict[str, str] | None) -> _Text | None:
    """The actions without room for a button, as lines "Label: `/gpu …`"."""
    if not actions:
        return None
    atoms = [*"More:"]
    for a in actions:
        command = _plain(a.command.strip(), names).replace("`", "ˋ")
        atoms += ["\n", *_atoms(_one_line(a.label) or PLACEHOLDER, names), ":", " "]
        atoms += [f"`{command}`"] if 0 < len(command) <= COMMAND_ATOM_MAX else [*_escape(command)]
    return _Text(atoms)


def _page_row(k: int, n: int) -> list[Button]:
    return [Button("Previous", PREV_NONE if k == 0 else f"{PAGE_PREFIX}{k - 1}", disabled=k == 0),
            Button("Next", NEXT_NONE if k == n - 1 else f"{PAGE_PREFIX}{k + 1}", disabled=k == n - 1)]


# --- a reply ---------------------------------------------------------------------------------------

@dataclass
class _Page:
    desc: list[str] = field(default_factory=list)
    fields: list[_Field] = field(default_factory=list)
    desc_len: int = 0
    used: int = 0

    @property
    def empty(self) -> bool:
        return not self.desc and not self.fields


def _paginate(items: Sequence[_Item], budget: int) -> list[_Page]:
    """The items in order onto pages: ≤4096 characters of description, ≤25 fields, ≤`budget`
    characters of both together."""
    pages = [_Page()]
    for item in items:
        if isinstance(item, _Field):
            page = pages[-1]
            if len(page.fields) >= limits.EMBED_FIELDS or page.used + item.size > budget:
                page = _Page()
                pages.append(page)
            page.fields.append(item)
            page.used += item.size
            continue
        while not item.done:
            page = pages[-1]
            sep = len(SEP) if page.desc else 0
            room = min(limits.EMBED_DESCRIPTION - page.desc_len, budget - page.used) - sep
            piece = item.take(room, page.empty) if room > 0 else None
            if piece is None:
                if page.empty:
                    raise AssertionError("an empty page took nothing")   # take() always gives on a fresh page
                pages.append(_Page())
                continue
            if piece.strip():
                page.desc.append(piece)
                page.desc_len += sep + len(piece)
                page.used += sep + len(piece)
    return [p for p in pages if not p.empty] or [_Page()]


def _layout(reply: Reply, names: dict[str, str] | None, title: str, full_title: list[str] | None,
            buttons: list[tuple[Button, replies.Action]], room: int, notes_footer: str) -> tuple[list[_Page], list[Button]]:
    items: list[_Item] = []
    if full_title is not None:
        items.append(_Text(full_title))
    if reply.text.strip():
        items.append(_Text(_atoms(reply.text.strip(), names)))
    items += _field_items(reply.fields, names)
    for table in reply.tables:
        items += _table_items(table, names)
    more = _more([a for _, a in buttons[room:]], names)
    if more is not None:
        items.append(more)
    notes = [n for n in reply.notes if n.strip()]
    if notes and not notes_footer:
        items.append(_Text([c for n in notes for c in ("\n", *_atoms(n.strip(), names))][1:]))
    budget = limits.EMBED_TOTAL - len(title) - len(notes_footer) - PAGE_MARK_RESERVE
    return _paginate(items, budget), [b for b, _ in buttons[:room]]


def render(reply: Reply, names: dict[str, str] | None = None) -> list[DiscordMessage]:
    """`reply` as one or more Discord messages (pages), each within every limit of `limits.py`;
    `names` maps principals to display names for where mentions do not render."""
    title_atoms = _atoms(_one_line(reply.title), names, mentions=False)
    title, clipped = _clip(title_atoms, limits.EMBED_TITLE)
    title = title or UNTITLED
    full_title = _atoms(_one_line(reply.title), names) if clipped else None
    notes = "\n".join(_plain(n.strip(), names) for n in reply.notes if n.strip())
    notes_footer = notes if len(notes) <= FOOTER_NOTES_MAX else ""
    buttons = _buttons(reply.actions, names, reply.confirmation)
    pages, shown = _layout(reply, names, title, full_title, buttons, MAX_BUTTONS, notes_footer)
    if len(pages) > 1:                       # the paging row takes one of the five rows
        pages, shown = _layout(reply, names, title, full_title, buttons, MAX_BUTTONS - limits.BUTTONS_PER_ROW,
                               notes_footer)
    n = len(pages)
    colour = COLOURS.get(reply.level, COLOURS["info"])
    out = []
    for k, page in enumerate(pages):
        embed: dict[str, Any] = {"title": title, "color": colour}
        if page.desc:
            embed["description"] = SEP.join(page.desc)
        if page.fields:
            embed["fields"] = [{"name": f.name, "value": f.value, "inline": f.inline} for f in page.fields]
        footer = "\n".join(p for p in (notes_footer, f"page {k + 1}/{n}" if n > 1 else "") if p)
        if footer:
            embed["footer"] = {"text": footer}
        rows = _rows(shown) + ([_page_row(k, n)] if n > 1 else [])
        out.append(DiscordMessage(embeds=[embed], rows=rows, ephemeral=reply.ephemeral))
    return out


def render_notice(text: str, level: str, actions: list[replies.Action]) -> DiscordMessage:
    """A notice (idle warning, budget alert…) as one message: one embed of the text (mentions,
    escaped; at most 4096 characters, clipped with "…" beyond), and its buttons."""
    buttons = _buttons(actions, None)
    atoms = _atoms(text.strip(), None) or [*"gpuherd notice"]
    more = _more([a for _, a in buttons[MAX_BUTTONS:]], None)
    if more is not None:
        atoms += ["\n", "\n", *more.atoms]
    description, _ = _clip(atoms, limits.EMBED_DESCRIPTION)
    embed = {"description": description, "color": COLOURS.get(level, COLOURS["info"])}
    return DiscordMessage(embeds=[embed], rows=_rows([b for b, _ in buttons[:MAX_BUTTONS]]))


def _bar(fraction: float) -> str:
    f = min(max(fraction, 0.0), 1.0)
    filled = round(f * BAR_WIDTH)
    return "█" * filled + "░" * (BAR_WIDTH - filled) + f" {round(f * 100)}%"


def render_progress(title: str, text: str, fraction: float | None = None) -> DiscordMessage:
    """A boot's progress, the one message edited in place: the title, the text and, when the
    fraction is known, a text bar (in inline code, so it keeps its width). Green when done."""
    bar = f"`{_bar(fraction)}`" if fraction is not None else ""
    room = limits.EMBED_DESCRIPTION - (len(bar) + 1 if bar else 0)
    body, _ = _clip(_atoms(text.strip(), None), room)
    description = "\n".join(p for p in (body, bar) if p)
    embed: dict[str, Any] = {"title": _clip(_atoms(_one_line(title), None, mentions=False), limits.EMBED_TITLE)[0]
                             or UNTITLED,
                             "color": COLOURS["success" if fraction is not None and fraction >= 1 else "info"]}
    if description:
        embed["description"] = description
    return DiscordMessage(embeds=[embed])
