"""A platform-neutral `Reply` as Slack Block Kit: one or more messages, a notice, the App Home.

Decisions (the limits themselves are in `limits.py`):

- **Layout of a message.** A `header` (the title, plain text, the level as a leading emoji:
  :white_check_mark: success, :warning: warning, :x: error, none for info), the reply's text in
  section(s), the fields, the tables, the notes (`context`), the commands of actions that have no
  button (`context`), and last the buttons (one `actions` block). Inline fields are section
  `fields` ("*label*" on one line, the value under it), at most 10 and 3000 characters a
  section; a run of inline fields is split into as many sections as needed, and a non-inline
  field is a section of its own, so the reply's order is kept.
- **Tables** are monospace code blocks in section text: columns padded to the widest cell,
  right-aligned where the table's `align` says so, two spaces apart, a rule under the header row;
  a caption is bold above the block. Every code block repeats the header row, so a table cut
  into several sections (≤3000 characters each) or several pages reads on its own; a later piece
  says "(continued)" after the caption. Rows are never dropped from a message.
- **Pages.** A message holds at most 50 blocks and, although Slack does not document it, about
  12,000 characters of text in all (`msg_blocks_too_long`; `limits.MESSAGE_TEXT_TOTAL`). Blocks
  flow onto pages kept under 50 blocks and `limits.PAGE_TEXT_BUDGET` characters; when there is more
  than one page, each carries a context line "Title (page 2 of 3)" (under the header on page 1,
  first on the others) and its own fallback text. The buttons are the last block, so they are on
  the last page, under everything they act on.
- **Escaping.** Every text that goes into mrkdwn (text, fields, captions, notes, table contents,
  the fallback `text`) has `&`, `<` and `>` escaped, so user text can never form `<!channel>`, a
  mention or a link; then Slack principals (`slack:U…`/`slack:W…`) become mentions `<@U…>`.
  Slack's formatting characters (`*`, `_`, `~`) are left alone: Slack has no way to escape them,
  and they can only change how text looks. Plain-text places (the header, buttons, confirm
  dialogs, and code blocks, where a mention does not render) show a principal as its display
  name from `names`, else the bare user id (`U123`). A backtick in a table cell becomes `ˋ`
  (U+02CB, as wide), so no cell can close the code fence; line breaks in a cell become spaces.
- **What is clipped, visibly.** Everything clipped ends in "…": the header (150), a table cell
  (40), a table line (800, a table with very many wide columns), a field (2000; 3000 for a
  non-inline one), a note (500), a button's text (75), a confirm dialog's parts (100/300/30/30).
  The reply's text is split into sections at line breaks (or spaces) and never cut inside a
  mention or an entity; past `TEXT_SECTIONS` sections it ends with "… (text clipped: N characters
  in all)". At most `MAX_BUTTONS` buttons (and `BUTTONS_TEXT` characters of them, confirm dialogs
  included) a message; an action past that, one without a `ref` (nothing for a button to carry),
  or one whose ref is too long for a button value is shown as its command, "Label: `/gpu …`", in
  a context line. A ref is never clipped: a clipped ref would be a different, broken button.
- **Buttons.** `value` is the core action's ref; `action_id` is `gpuherd:<op>:<n>` (n counts the
  buttons of the message, or of the whole Home view), with `:c` appended when the button carries a
  Slack confirm dialog — Slack sends such a press only after its "yes", and the app (`app.py`,
  `_CONFIRMED`) then answers core's own destroy question for the user instead of asking twice.
  `style` only when primary or danger. The confirm dialog's text is plain text; the dialog's
  style is danger for a danger button, else primary. For a reply that waits for a yes
  (`Reply.confirmation`), the yes button's dialog states the reply's text, the question core
  asked with its price per hour, day and month; when that is over 300 characters the sentences
  with a `$` amount are kept first, and only then is it clipped.
- **Fallback `text`:** the title and the first line of the text (escaped, mentions, ≤1000
  characters), never empty; a notice's is the notice's text.
- **The App Home** puts the parts one after another with a divider between them, in at most 100
  blocks. When they would not fit, table rows are left out from the end (the last table first)
  and a context line says how many and to run `/gpu status`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpuherd.bot import replies
from gpuherd.bot.replies import Reply

from . import limits
from .limits import blocks_text_length

__all__ = ["ACTION_PREFIX", "SlackMessage", "mention", "render", "render_home", "render_notice"]

ACTION_PREFIX = "gpuherd"
CONFIRMED_SUFFIX = ":c"                 # the button had Slack's confirm dialog (see app.py)
LEVEL_EMOJI = {"info": "", "success": ":white_check_mark:", "warning": ":warning:", "error": ":x:"}

CELL_MAX = 40
TABLE_LINE_MAX = 800                    # escaped; header + rule + one row + caption < 3000
CAPTION_MAX = 200
NOTE_MAX = 500
COMMAND_MAX = 300
FALLBACK_MAX = 1000
PAGE_TITLE_MAX = 100
TEXT_SECTIONS = 4                       # the reply's text: at most 4 sections (~12,000 characters)
MAX_BUTTONS = 25                        # one actions block
BUTTONS_TEXT = 4000                     # characters of text the buttons of a message may carry
PAGE_CONTEXT_RESERVE = 160              # text kept free on each page for "Title (page k of n)"

PRINCIPAL = re.compile(r"(?<![A-Za-z0-9_])slack:([UW][A-Z0-9]+)(?![A-Za-z0-9])")
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_CELL_SPACE = re.compile(r"[\r\n\t\v\f]+")
_SENTENCE = re.compile(r"(?<=[.?!])\s+")
_OP = re.compile(r"[^a-z0-9_-]")

Names = Mapping[str, str]
Block = dict[str, Any]


@dataclass(frozen=True)
class SlackMessage:
    text: str                           # the plain-text fallback (notifications, accessibility); never empty
    blocks: list[dict[str, Any]]

    def payload(self) -> dict[str, Any]:
        return {"text": self.text, "blocks": self.blocks}


# --- text ----------------------------------------------------------------------------------------

def escape(text: str) -> str:
    """Slack's three control characters as entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:max(limit - 1, 0)] + "…"


def _atoms(raw: str) -> list[str]:
    """`raw` as mrkdwn pieces that must not be cut: characters (escaped) and whole mentions."""
    out: list[str] = []
    pos = 0
    for m in PRINCIPAL.finditer(raw):
        out.extend(_ESCAPES.get(c, c) for c in raw[pos:m.start()])
        out.append(f"<@{m.group(1)}>")
        pos = m.end()
    out.extend(_ESCAPES.get(c, c) for c in raw[pos:])
    return out


def mrkdwn(raw: str, limit: int | None = None) -> str:
    """User text for mrkdwn: escaped, principals as mentions, at most `limit` characters
    (clipped with "…", never inside a mention or an entity)."""
    text = PRINCIPAL.sub(lambda m: f"<@{m.group(1)}>", escape(raw))
    if limit is None or len(text) <= limit:
        return text
    out: list[str] = []
    size = 0
    for atom in _atoms(raw):
        if size + len(atom) > limit - 1:
            break
        out.append(atom)
        size += len(atom)
    return "".join(out) + "…"


def plain(raw: str, names: Names | None, limit: int | None = None) -> str:
    """User text for plain_text (and code blocks): a principal shown by name, else its bare id."""
    text = PRINCIPAL.sub(lambda m: (names or {}).get(f"slack:{m.group(1)}") or m.group(1), raw)
    return text if limit is None else _clip(text, limit)


def mention(principal: str, names: Names | None) -> str:
    """A principal in mrkdwn: `slack:U123` -> `<@U123>`; anyone else by name, escaped."""
    m = PRINCIPAL.fullmatch(principal)
    if m:
        return f"<@{m.group(1)}>"
    return escape((names or {}).get(principal) or replies.who(principal))


def split_mrkdwn(raw: str, limit: int) -> list[str]:
    """`raw` as mrkdwn in pieces of at most `limit` characters, cut at a line break (or else a
    space) in the second half of a piece when there is one; nothing is lost but the whitespace
    at the cuts."""
    whole = mrkdwn(raw)
    if len(whole) <= limit:
        return [whole] if whole.strip() else []
    pieces: list[str] = []
    cur: list[str] = []
    size = 0
    for atom in _atoms(raw):
        if size + len(atom) > limit:
            cut = len(cur)
            half = sum(len(a) for a in cur) // 2
            for want in ("\n", " "):
                at, seen = None, 0
                for i, a in enumerate(cur):
                    seen += len(a)
                    if a == want and seen >= half:
                        at = i + 1
                if at is not None:
                    cut = at
                    break
            pieces.append("".join(cur[:cut]))
            cur = cur[cut:]
            size = sum(len(a) for a in cur)
        cur.append(atom)
        size += len(atom)
    pieces.append("".join(cur))
    return [p.strip() for p in pieces if p.strip()]


def _pt(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text, "emoji": True}


def _md(text: str) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": text}


def _section(text: str) -> Block:
    return {"type": "section", "text": _md(text)}


def _context(texts: Sequence[str]) -> list[Block]:
    """Context blocks of at most 10 elements and `SECTION_TEXT` characters each."""
    blocks: list[Block] = []
    cur: list[str] = []
    size = 0
    for text in texts:
        if cur and (len(cur) >= limits.CONTEXT_ELEMENTS or size + len(text) > limits.SECTION_TEXT):
            blocks.append({"type": "context", "elements": [_md(t) for t in cur]})
            cur, size = [], 0
        cur.append(text)
        size += len(text)
    if cur:
        blocks.append({"type": "context", "elements": [_md(t) for t in cur]})
    return blocks


def _code(text: str) -> str:
    """Text for inside backticks: no backtick can close them."""
    return escape(text.replace("`", "ˋ"))


# --- tables --------------------------------------------------------------------------------------

def _cell(value: Any, names: Names | None) -> str:
    text = _CELL_SPACE.sub(" ", plain(str(value), names)).replace("`", "ˋ")
    return _clip(text, CELL_MAX)


def _code_line(raw: str) -> str:
    """One line of a code block, escaped, at most `TABLE_LINE_MAX` characters."""
    line = escape(raw)
    if len(line) <= TABLE_LINE_MAX:
        return line
    out: list[str] = []
    size = 0
    for c in raw:
        e = _ESCAPES.get(c, c)
        if size + len(e) > TABLE_LINE_MAX - 1:
            break
        out.append(e)
        size += len(e)
    return "".join(out) + "…"


class _TableFlow:
    """A table handed out as code-block sections of a size the page still has room for."""

    def __init__(self, table: replies.Table, names: Names | None) -> None:
        ncols = max([len(table.columns), *(len(r) for r in table.rows)])
        head = [_cell(c, names) for c in table.columns] + [""] * (ncols - len(table.columns))
        body = [[_cell(c, names) for c in row] + [""] * (ncols - len(row)) for row in table.rows]
        widths = [max([len(head[i]), *(len(r[i]) for r in body)]) for i in range(ncols)]
        align = table.align or []
        right = [i < len(align) and align[i] == "right" for i in range(ncols)]

        def line(cells: list[str]) -> str:
            return _code_line("  ".join(c.rjust(w) if r else c.ljust(w)
                                        for c, w, r in zip(cells, widths, right, strict=True)).rstrip())

        self.caption = mrkdwn(table.caption, CAPTION_MAX) if table.caption else ""
        self.header = line(head)
        self.rule = _code_line("─" * max(sum(widths) + 2 * (ncols - 1), 1))
        self.rows = [line(r) for r in body]
        self.pos = 0
        self.pieces = 0

    @property
    def total(self) -> int:
        return len(self.rows)

    @property
    def done(self) -> bool:
        return self.pieces > 0 and self.pos >= len(self.rows)

    def _prefix(self) -> str:
        if not self.caption:
            return ""
        return f"*{self.caption}*" + (" (continued)" if self.pieces else "") + "\n"

    def next_block(self, room: int) -> Block | None:
        """The next section (at most `room` characters of text, and 3000); None when not even
        the rows worth a section fit (start a new page). With a full section of room it always
        gives a section."""
        room = min(room, limits.SECTION_TEXT)
        prefix = self._prefix()
        size = len(prefix) + len("```\n") + len(self.header) + 1 + len(self.rule) + 1 + len("```")
        if not self.rows:
            empty = "(no rows)\n"
            if size + len(empty) > room:
                return None
            self.pieces += 1
            return _section(f"{prefix}```\n{self.header}\n{self.rule}\n{empty}```")
        end = self.pos
        while end < len(self.rows) and size + len(self.rows[end]) + 1 <= room:
            size += len(self.rows[end]) + 1
            end += 1
        taken = end - self.pos
        if taken == 0 or (taken < min(3, len(self.rows) - self.pos) and room < limits.SECTION_TEXT):
            return None                  # no sliver of a table at the foot of a page
        body = "".join(row + "\n" for row in self.rows[self.pos:end])
        self.pos = end
        self.pieces += 1
        return _section(f"{prefix}```\n{self.header}\n{self.rule}\n{body}```")

    def remaining(self) -> int:
        return len(self.rows) - self.pos

    def reset(self) -> None:
        self.pos = self.pieces = 0


# --- buttons -------------------------------------------------------------------------------------

class _Ids:
    """Numbers the buttons of one message (or one Home view)."""

    def __init__(self) -> None:
        self.n = 0

    def next(self, ref: str, confirmed: bool) -> str:
        self.n += 1
        op = _OP.sub("", ref.split("|", 1)[0].lower())[:40] or "press"
        return f"{ACTION_PREFIX}:{op}:{self.n}" + (CONFIRMED_SUFFIX if confirmed else "")


def _dialog_text(text: str, names: Names | None) -> str:
    """A confirm dialog's text from a question: whole when it fits; else its sentences with a
    price first (and the question at its end), then clipped."""
    full = " ".join(plain(text, names).split())
    if len(full) <= limits.CONFIRM_TEXT:
        return full
    sentences = _SENTENCE.split(full)
    priced = [s for s in sentences if "$" in s]
    if priced and sentences[-1].endswith("?") and sentences[-1] not in priced:
        priced.append(sentences[-1])
    return _clip(" ".join(priced) if priced else full, limits.CONFIRM_TEXT)


def _same(a: replies.Action, b: replies.Action | None) -> bool:
    return b is not None and a.ref == b.ref and a.command == b.command


def _button(action: replies.Action, ids: _Ids, names: Names | None, *, question: Reply | None) -> Block:
    label = plain(action.label, names).strip() or plain(action.command, names).strip() or "Go"
    button: Block = {"type": "button", "text": _pt(_clip(label, limits.BUTTON_TEXT)), "value": action.ref}
    if action.style in limits.BUTTON_STYLES:
        button["style"] = action.style
    confirm = action.confirm
    dialog_text = confirm.text if confirm else ""
    if question is not None:          # the yes of a reply that waits for one: the price, stated
        confirm = confirm or replies.Confirm(title=question.title, text=question.text)
        dialog_text = question.text or confirm.text
    if confirm is not None:
        title = plain(confirm.title, names).strip() or "Are you sure?"
        button["confirm"] = {
            "title": _pt(_clip(title, limits.CONFIRM_TITLE)),
            "text": _pt(_dialog_text(dialog_text, names) or _clip(title, limits.CONFIRM_TEXT)),
            "confirm": _pt(_clip(plain(confirm.yes, names).strip() or "Confirm", limits.CONFIRM_CONFIRM)),
            "deny": _pt(_clip(plain(confirm.no, names).strip() or "Cancel", limits.CONFIRM_DENY)),
            "style": "danger" if action.style == "danger" else "primary",
        }
    button["action_id"] = ids.next(action.ref, confirm is not None)
    return button


def _command_line(action: replies.Action) -> str:
    label = mrkdwn(action.label.strip(), 80)
    command = _clip(_code(action.command.strip()), COMMAND_MAX)
    if not command.strip():
        return label or "—"
    return f"{label}: `{command}`" if label else f"`{command}`"


def _actions(actions: Sequence[replies.Action], ids: _Ids, names: Names | None,
             confirmation: replies.Action | None = None, question: Reply | None = None) -> list[Block]:
    """The context lines of commands without a button, then one actions block of buttons."""
    if confirmation is not None and not any(_same(a, confirmation) for a in actions):
        actions = [confirmation, *actions]
    buttons: list[Block] = []
    commands: list[str] = []
    size = 0
    for action in actions:
        if not action.ref or len(action.ref) > limits.BUTTON_VALUE or len(buttons) >= MAX_BUTTONS:
            commands.append(_command_line(action))
            continue
        button = _button(action, ids, names, question=question if _same(action, confirmation) else None)
        cost = blocks_text_length(button)
        if size + cost > BUTTONS_TEXT:
            ids.n -= 1
            commands.append(_command_line(action))
            continue
        size += cost
        buttons.append(button)
    blocks = _context(commands)
    if buttons:
        blocks.append({"type": "actions", "elements": buttons})
    return blocks


# --- a reply's blocks ----------------------------------------------------------------------------

Item = Block | _TableFlow


def _header(reply: Reply, names: Names | None) -> Block:
    emoji = LEVEL_EMOJI.get(reply.level, "")
    title = plain(reply.title, names).strip() or "gpuherd"
    return {"type": "header", "text": _pt(_clip(f"{emoji} {title}" if emoji else title, limits.HEADER_TEXT))}


def _field_text(field: replies.ReplyField, limit: int) -> str:
    label = mrkdwn(field.label.strip(), 200)
    head = f"*{label}*\n" if label else ""
    return head + (mrkdwn(field.value, limit - len(head)) if field.value.strip() else "—")


def _text_blocks(text: str) -> list[Block]:
    # more than TEXT_SECTIONS full sections of raw text is clipped anyway: split only that much
    pieces = split_mrkdwn(text[:TEXT_SECTIONS * limits.SECTION_TEXT + 1], limits.SECTION_TEXT)
    if len(pieces) > TEXT_SECTIONS:
        note = f" (text clipped: {len(text):,} characters in all)"
        last = mrkdwn_clip(pieces[TEXT_SECTIONS - 1], limits.SECTION_TEXT - len(note) - 1)
        pieces = [*pieces[:TEXT_SECTIONS - 1], (last if last.endswith("…") else last + "…") + note]
    return [_section(p) for p in pieces]


def _items(reply: Reply, names: Names | None, ids: _Ids) -> list[Item]:
    """Everything of a reply but its header, in order; tables as flows."""
    items: list[Item] = list(_text_blocks(reply.text)) if reply.text.strip() else []
    run: list[str] = []

    def flush() -> None:
        # at most 10 fields a section, and no more text than a section's (pages count text)
        group: list[str] = []
        for text in run:
            if group and (len(group) >= limits.SECTION_FIELDS or sum(map(len, group)) + len(text) > limits.SECTION_TEXT):
                items.append({"type": "section", "fields": [_md(t) for t in group]})
                group = []
            group.append(text)
        if group:
            items.append({"type": "section", "fields": [_md(t) for t in group]})
        run.clear()

    for field in reply.fields:
        if field.inline:
            run.append(_field_text(field, limits.SECTION_FIELD_TEXT))
        else:
            flush()
            items.append(_section(_field_text(field, limits.SECTION_TEXT)))
    flush()
    items.extend(_TableFlow(t, names) for t in reply.tables)
    items.extend(_context([mrkdwn(n, NOTE_MAX) for n in reply.notes if n.strip()]))
    items.extend(_actions(reply.actions, ids, names, reply.confirmation,
                          reply if reply.confirmation is not None else None))
    return items


def _fallback(reply: Reply) -> str:
    title = mrkdwn(" ".join(reply.title.split()) or "gpuherd", FALLBACK_MAX)
    first = next((line.strip() for line in reply.text.splitlines() if line.strip()), "")
    text = f"{title}: {mrkdwn(first)}" if first else title
    return mrkdwn_clip(text, FALLBACK_MAX)


def mrkdwn_clip(text: str, limit: int) -> str:
    """Already-escaped mrkdwn at most `limit` long, not cut inside an entity or a mention."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    for opener, closer in (("&", ";"), ("<", ">")):
        at = cut.rfind(opener)
        if at != -1 and closer not in cut[at:]:
            cut = cut[:at]
    return cut + "…"


def _paginate(header: Block, items: list[Item], reserve: bool) -> list[list[Block]]:
    cap_blocks = limits.BLOCKS_PER_MESSAGE - (1 if reserve else 0)
    cap_text = limits.PAGE_TEXT_BUDGET - (PAGE_CONTEXT_RESERVE if reserve else 0)
    pages: list[list[Block]] = []
    cur: list[Block] = [header]
    used = blocks_text_length(header)

    def turn() -> None:
        nonlocal cur, used
        pages.append(cur)
        cur, used = [], 0

    for item in items:
        if isinstance(item, _TableFlow):
            while not item.done:
                block = item.next_block(cap_text - used) if len(cur) < cap_blocks else None
                if block is None:
                    turn()
                    continue
                cur.append(block)
                used += blocks_text_length(block)
            continue
        size = blocks_text_length(item)
        if cur and (len(cur) + 1 > cap_blocks or used + size > cap_text):
            turn()
        cur.append(item)
        used += size
    pages.append(cur)
    return [p for p in pages if p]


def render(reply: Reply, names: Mapping[str, str] | None = None) -> list[SlackMessage]:
    """`reply` as one or more Slack messages (pages), each within every Block Kit limit."""
    header = _header(reply, names)
    pages = _paginate(header, _items(reply, names, _Ids()), reserve=False)
    fallback = _fallback(reply)
    if len(pages) == 1:
        return [SlackMessage(text=fallback, blocks=pages[0])]
    pages = _paginate(header, _items(reply, names, _Ids()), reserve=True)
    n = len(pages)
    title = mrkdwn(" ".join(reply.title.split()) or "gpuherd", PAGE_TITLE_MAX)
    out = []
    for k, blocks in enumerate(pages, start=1):
        marker = {"type": "context", "elements": [_md(f"{title} (page {k} of {n})")]}
        blocks = [blocks[0], marker, *blocks[1:]] if k == 1 else [marker, *blocks]
        text = fallback if k == 1 else mrkdwn_clip(f"{title} (page {k} of {n})", FALLBACK_MAX)
        out.append(SlackMessage(text=text, blocks=blocks))
    return out


def render_notice(text: str, level: str, actions: Sequence[replies.Action],
                  names: Mapping[str, str] | None = None) -> SlackMessage:
    """A notice (idle warning, budget alert…) as one message: the text, then its buttons."""
    emoji = LEVEL_EMOJI.get(level, "")
    body = mrkdwn(text.strip() or "gpuherd notice", limits.SECTION_TEXT - len(emoji) - 1)
    blocks: list[Block] = [_section(f"{emoji} {body}" if emoji else body)]
    blocks += _actions(actions, _Ids(), names)[:limits.BLOCKS_PER_MESSAGE - 1]
    fallback = mrkdwn(text.strip() or "gpuherd notice", limits.TOP_LEVEL_TEXT)
    return SlackMessage(text=fallback, blocks=blocks)


def render_home(parts: Sequence[Reply], names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Several replies as one App Home view, a divider between them, at most 100 blocks."""
    ids = _Ids()
    built: list[list[Item]] = []
    for part in parts:
        built.append([_header(part, names), *_items(part, names, ids)])
    if not built:
        built = [[_section("Nothing to show yet. `/gpu help` lists the commands.")]]
    fixed = sum(1 for items in built for it in items if not isinstance(it, _TableFlow)) + len(built) - 1

    def pieces(flow: _TableFlow, budget: int | None) -> list[Block]:
        out: list[Block] = []
        while not flow.done and (budget is None or len(out) < budget):
            block = flow.next_block(limits.SECTION_TEXT)
            if block is None:             # cannot happen: a whole section always takes a row
                break
            out.append(block)
        return out

    flows = [it for items in built for it in items if isinstance(it, _TableFlow)]
    whole = sum(len(pieces(f, None)) for f in flows)
    for f in flows:
        f.reset()
    room = None if fixed + whole <= limits.BLOCKS_PER_VIEW else max(limits.BLOCKS_PER_VIEW - fixed - 1, 0)
    blocks: list[Block] = []
    dropped = 0
    for i, items in enumerate(built):
        if i:
            blocks.append({"type": "divider"})
        for it in items:
            if not isinstance(it, _TableFlow):
                blocks.append(it)
                continue
            if room is None:
                blocks.extend(pieces(it, None))
                continue
            got = pieces(it, room) if room > 0 else []
            room -= len(got)
            blocks.extend(got)
            dropped += it.remaining() if it.pieces else it.total
    if dropped:
        blocks.append({"type": "context", "elements": [_md(
            f"{dropped:,} table row{'s' if dropped != 1 else ''} left out to fit the Home tab; "
            "run `/gpu status` for the full list.")]})
    if len(blocks) > limits.BLOCKS_PER_VIEW:
        blocks = blocks[:limits.BLOCKS_PER_VIEW - 1]
        blocks.append({"type": "context", "elements": [_md(
            "More than the Home tab holds: run `/gpu status` and `/gpu costs` for everything.")]})
    return {"type": "home", "blocks": blocks}
