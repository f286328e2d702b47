"""Discord's message limits, and a checker for a message payload in Discord's JSON shape.

Sources. The embed and message numbers are those of `/work/shared/reference/chat_and_notebook_platforms.md`
§2.4 (discord-api-docs `developers/resources/message.mdx:603-619` for the embed limits, and the
6000-character sum over all embeds of a message; `message.mdx:1078-1080` for content ≤2000 and
≤10 embeds). The component numbers are its §2.3 (`developers/components/reference.mdx`: custom_id
1–100 characters and unique per message, ≤5 buttons per action row, ≤40 components per
message). Two are not in the reference file and come from discord.py 2.7.1, which mirrors the
API docs: a button label is at most 80 characters (`discord/ui/button.py:75`) and a message has at
most 5 action rows (`button.py:80`; `ui/view.py:756`, at most 25 items in a View).

What counts toward `EMBED_TOTAL` is what Discord counts (and `discord.Embed.__len__`): titles,
descriptions, field names and values, footer texts and author names of all embeds of the message.

`violations` returns sentences, not exceptions: the tests assert the list is empty, and a failing
test then says which embed or button of which page broke which limit and by how much. It is
stricter than Discord in one way on purpose: a title, description, footer, field name or value
that is present but blank is reported (Discord refuses empty field names and values, and a blank
title is a rendering bug)."""

from __future__ import annotations

from typing import Any

# --- embeds (§2.4) --------------------------------------------------------------------------------
EMBED_TITLE = 256
EMBED_DESCRIPTION = 4096
EMBED_FIELDS = 25
FIELD_NAME = 256
FIELD_VALUE = 1024
FOOTER_TEXT = 2048
AUTHOR_NAME = 256
EMBED_TOTAL = 6000                    # all embed text of one message together
EMBEDS_PER_MESSAGE = 10
COLOUR_MAX = 0xFFFFFF

# --- the message ------------------------------------------------------------------------------------
CONTENT = 2000
EPHEMERAL = 64
# flags a bot may set when sending: SUPPRESS_EMBEDS, EPHEMERAL (interaction responses),
# SUPPRESS_NOTIFICATIONS, IS_VOICE_MESSAGE, IS_COMPONENTS_V2 (message.mdx, message flags)
SENDABLE_FLAGS = 4 | EPHEMERAL | 4096 | 8192 | 32768

# --- components (§2.3, and discord.py for the label and the rows) -----------------------------------
ACTION_ROWS = 5
BUTTONS_PER_ROW = 5
COMPONENTS = 40                       # every component, action rows included
BUTTON_LABEL = 80
CUSTOM_ID = 100
ACTION_ROW_TYPE = 1
BUTTON_TYPE = 2
SELECT_TYPES = frozenset({3, 5, 6, 7, 8})
BUTTON_STYLES = {"primary": 1, "secondary": 2, "success": 3, "danger": 4}
LINK_STYLE = 5
PREMIUM_STYLE = 6

__all__ = ["ACTION_ROWS", "AUTHOR_NAME", "BUTTONS_PER_ROW", "BUTTON_LABEL", "BUTTON_STYLES", "COMPONENTS",
           "CONTENT", "CUSTOM_ID", "EMBEDS_PER_MESSAGE", "EMBED_DESCRIPTION", "EMBED_FIELDS", "EMBED_TITLE",
           "EMBED_TOTAL", "EPHEMERAL", "FIELD_NAME", "FIELD_VALUE", "FOOTER_TEXT", "embed_length", "violations"]


def embed_length(embed: dict[str, Any]) -> int:
    """The characters of one embed that count toward `EMBED_TOTAL`."""
    def text(value: Any) -> int:
        return len(value) if isinstance(value, str) else 0

    total = text(embed.get("title")) + text(embed.get("description"))
    for part, key in (("footer", "text"), ("author", "name")):
        if isinstance(embed.get(part), dict):
            total += text(embed[part].get(key))
    fields = embed.get("fields")
    if isinstance(fields, list):
        total += sum(text(f.get("name")) + text(f.get("value")) for f in fields if isinstance(f, dict))
    return total


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.custom_ids: dict[str, str] = {}

    def add(self, where: str, problem: str) -> None:
        self.problems.append(f"{where}: {problem}")

    def text(self, where: str, what: str, value: Any, limit: int, *, required: bool = False) -> None:
        """A string of 1..`limit` characters, not blank (absent is fine unless `required`)."""
        if value is None:
            if required:
                self.add(where, f"{what} is missing")
            return
        if not isinstance(value, str):
            self.add(where, f"{what} is not a string")
        elif not value.strip():
            self.add(where, f"{what} is empty")
        elif len(value) > limit:
            self.add(where, f"{what} is {len(value):,} characters; at most {limit:,}")

    def embed(self, where: str, embed: Any) -> None:
        if not isinstance(embed, dict):
            self.add(where, "embed is not an object")
            return
        self.text(where, "title", embed.get("title"), EMBED_TITLE)
        self.text(where, "description", embed.get("description"), EMBED_DESCRIPTION)
        for part, key, limit in (("footer", "text", FOOTER_TEXT), ("author", "name", AUTHOR_NAME)):
            if part in embed:
                if not isinstance(embed[part], dict):
                    self.add(where, f"{part} is not an object")
                else:
                    self.text(where, f"{part} {key}", embed[part].get(key), limit, required=True)
        colour = embed.get("color")
        if colour is not None and (not isinstance(colour, int) or isinstance(colour, bool)
                                   or not 0 <= colour <= COLOUR_MAX):
            self.add(where, f"color {colour!r} is not an integer 0..0xFFFFFF")
        fields = embed.get("fields")
        if fields is not None:
            if not isinstance(fields, list):
                self.add(where, "fields is not a list")
                fields = []
            if len(fields) > EMBED_FIELDS:
                self.add(where, f"{len(fields)} fields; at most {EMBED_FIELDS}")
            for i, f in enumerate(fields):
                if not isinstance(f, dict):
                    self.add(f"{where} field {i}", "field is not an object")
                    continue
                self.text(f"{where} field {i}", "name", f.get("name"), FIELD_NAME, required=True)
                self.text(f"{where} field {i}", "value", f.get("value"), FIELD_VALUE, required=True)
                if "inline" in f and not isinstance(f["inline"], bool):
                    self.add(f"{where} field {i}", "inline is not a boolean")
        if not any(embed.get(k) for k in ("title", "description", "fields", "footer", "author", "image",
                                          "thumbnail")):
            self.add(where, "embed is empty")

    def component(self, where: str, c: Any) -> None:
        if not isinstance(c, dict):
            self.add(where, "component is not an object")
            return
        kind = c.get("type")
        if kind == BUTTON_TYPE:
            style = c.get("style")
            if style not in (*BUTTON_STYLES.values(), LINK_STYLE, PREMIUM_STYLE):
                self.add(where, f"button style {style!r}; 1 to 6")
            if style == LINK_STYLE:
                if not c.get("url"):
                    self.add(where, "a link button needs a url")
                if "custom_id" in c:
                    self.add(where, "a link button cannot have a custom_id")
            elif style != PREMIUM_STYLE:
                self.custom_id(where, c.get("custom_id"))
            if c.get("label") is None and c.get("emoji") is None and style != PREMIUM_STYLE:
                self.add(where, "a button needs a label or an emoji")
            else:
                self.text(where, "label", c.get("label"), BUTTON_LABEL)
            if "disabled" in c and not isinstance(c["disabled"], bool):
                self.add(where, "disabled is not a boolean")
        elif kind in SELECT_TYPES:
            self.custom_id(where, c.get("custom_id"))
        else:
            self.add(where, f"component type {kind!r} cannot be in an action row")

    def custom_id(self, where: str, value: Any) -> None:
        if not isinstance(value, str) or not value:
            self.add(where, "custom_id is missing or empty")
            return
        if len(value) > CUSTOM_ID:
            self.add(where, f"custom_id is {len(value):,} characters; at most {CUSTOM_ID}")
        if value in self.custom_ids:
            self.add(where, f"custom_id {value[:60]!r} is used twice (also at {self.custom_ids[value]})")
        else:
            self.custom_ids[value] = where

    def components(self, rows: Any) -> None:
        if not isinstance(rows, list):
            self.add("components", "not a list")
            return
        if len(rows) > ACTION_ROWS:
            self.add("components", f"{len(rows)} action rows; at most {ACTION_ROWS}")
        count = 0
        for r, row in enumerate(rows):
            where = f"components[{r}]"
            if not isinstance(row, dict) or row.get("type") != ACTION_ROW_TYPE:
                self.add(where, "top-level components must be action rows (type 1)")
                continue
            children = row.get("components")
            if not isinstance(children, list) or not children:
                self.add(where, "an action row needs 1 to 5 components")
                continue
            count += 1 + len(children)
            if len(children) > BUTTONS_PER_ROW:
                self.add(where, f"{len(children)} components in a row; at most {BUTTONS_PER_ROW}")
            for i, c in enumerate(children):
                self.component(f"{where}[{i}]", c)
        if count > COMPONENTS:
            self.add("components", f"{count} components in all; at most {COMPONENTS}")


def violations(payload: dict[str, Any]) -> list[str]:
    """Every documented limit `payload` breaks, one sentence each; empty when Discord would take
    it. The shape is Discord's message JSON: `content`, `embeds` (embed objects), `components`
    (action rows of buttons), `flags`."""
    if not isinstance(payload, dict):
        return ["the payload is not an object"]
    check = _Checker()
    content = payload.get("content")
    if content is not None:
        if not isinstance(content, str):
            check.add("message", "content is not a string")
        elif len(content) > CONTENT:
            check.add("message", f"content is {len(content):,} characters; at most {CONTENT:,}")
    embeds = payload.get("embeds")
    if embeds is None:
        embeds = []
    if not isinstance(embeds, list):
        check.add("message", "embeds is not a list")
        embeds = []
    if len(embeds) > EMBEDS_PER_MESSAGE:
        check.add("message", f"{len(embeds)} embeds; at most {EMBEDS_PER_MESSAGE}")
    for i, embed in enumerate(embeds):
        check.embed(f"embeds[{i}]", embed)
    total = sum(embed_length(e) for e in embeds if isinstance(e, dict))
    if total > EMBED_TOTAL:
        check.add("message", f"{total:,} characters of embed text in all; at most {EMBED_TOTAL:,}")
    if not (isinstance(content, str) and content.strip()) and not embeds:
        check.add("message", "no content and no embed (Discord refuses an empty message)")
    if "components" in payload:
        check.components(payload["components"])
    flags = payload.get("flags")
    if flags is not None:
        if not isinstance(flags, int) or isinstance(flags, bool) or flags < 0:
            check.add("message", f"flags {flags!r} is not a non-negative integer")
        elif flags & ~SENDABLE_FLAGS:
            check.add("message", f"flags {flags} sets bits a bot cannot send ({flags & ~SENDABLE_FLAGS})")
    return check.problems
