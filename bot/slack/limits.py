"""Slack's Block Kit limits, and a checker for a message payload or a Home view.

The numbers are those of the limits table in `/work/shared/reference/chat_and_notebook_platforms.md`
§1.2 (python-slack-sdk's validators, which mirror the Block Kit reference). One more is not in
that table: `chat.postMessage` refuses a message whose blocks carry too much text in total
(`msg_blocks_too_long`), although every block is within its own limit. Slack does not document
it; a Slack maintainer put it at "12,000 text characters with a buffer for block containers"
(slackapi/bolt-js#2509, and #2867 reports a refusal a little below that). `MESSAGE_TEXT_TOTAL`
records that figure; the renderer keeps each page well under it (`PAGE_TEXT_BUDGET`), and
`violations` reports a message over it. A Home view (`views.publish`) is not held to it.

`violations` returns sentences, not exceptions: the tests assert the list is empty, and a
failing test then says which block of which page broke which limit and by how much."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# --- the reference table (§1.2) -------------------------------------------------------------------
BLOCKS_PER_MESSAGE = 50
BLOCKS_PER_VIEW = 100                 # a modal or the Home tab
TOP_LEVEL_TEXT = 40_000               # Slack truncates a message's `text` beyond this
SECTION_TEXT = 3000
SECTION_FIELDS = 10
SECTION_FIELD_TEXT = 2000
HEADER_TEXT = 150
ACTIONS_ELEMENTS = 25
CONTEXT_ELEMENTS = 10
ACTION_ID = 255
BLOCK_ID = 255
BUTTON_TEXT = 75
BUTTON_VALUE = 2000
BUTTON_URL = 3000
BUTTON_STYLES = frozenset({"primary", "danger"})
CONFIRM_TITLE = 100
CONFIRM_TEXT = 300
CONFIRM_CONFIRM = 30
CONFIRM_DENY = 30
CONFIRM_STYLES = BUTTON_STYLES

# --- not in the table: the cumulative text of one message's blocks (see the module docstring) --
MESSAGE_TEXT_TOTAL = 12_000
PAGE_TEXT_BUDGET = 10_000             # what the renderer allows itself: room for block containers

TEXT_TYPES = frozenset({"plain_text", "mrkdwn"})

__all__ = ["ACTIONS_ELEMENTS", "ACTION_ID", "BLOCKS_PER_MESSAGE", "BLOCKS_PER_VIEW", "BLOCK_ID", "BUTTON_STYLES",
           "BUTTON_TEXT", "BUTTON_URL", "BUTTON_VALUE", "CONFIRM_CONFIRM", "CONFIRM_DENY", "CONFIRM_STYLES",
           "CONFIRM_TEXT", "CONFIRM_TITLE", "CONTEXT_ELEMENTS", "HEADER_TEXT", "MESSAGE_TEXT_TOTAL",
           "PAGE_TEXT_BUDGET", "SECTION_FIELDS", "SECTION_FIELD_TEXT", "SECTION_TEXT", "TOP_LEVEL_TEXT",
           "blocks_text_length", "violations"]


def _text_objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every text object (`{"type": "plain_text"|"mrkdwn", "text": …}`) under `node`."""
    if isinstance(node, dict):
        if node.get("type") in TEXT_TYPES and isinstance(node.get("text"), str):
            yield node
            return
        for value in node.values():
            yield from _text_objects(value)
    elif isinstance(node, list):
        for item in node:
            yield from _text_objects(item)


def blocks_text_length(blocks: Any) -> int:
    """The characters of text the blocks carry (what `MESSAGE_TEXT_TOTAL` counts)."""
    return sum(len(t["text"]) for t in _text_objects(blocks))


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.action_ids: dict[str, str] = {}
        self.block_ids: dict[str, str] = {}

    def add(self, where: str, problem: str) -> None:
        self.problems.append(f"{where}: {problem}")

    def length(self, where: str, what: str, value: Any, limit: int) -> None:
        if isinstance(value, str) and len(value) > limit:
            self.add(where, f"{what} is {len(value):,} characters; at most {limit:,}")

    def text(self, where: str, what: str, obj: Any, limit: int | None, *, plain: bool = False) -> None:
        """A text object: its type, not empty, at most `limit` characters."""
        if not isinstance(obj, dict):
            self.add(where, f"{what} is missing or not a text object")
            return
        kind = obj.get("type")
        if kind not in TEXT_TYPES:
            self.add(where, f"{what} has type {kind!r}; plain_text or mrkdwn")
        elif plain and kind != "plain_text":
            self.add(where, f"{what} must be plain_text, not {kind}")
        value = obj.get("text")
        if not isinstance(value, str) or not value.strip():
            self.add(where, f"{what} is empty")
            return
        if limit is not None:
            self.length(where, what, value, limit)

    def element(self, where: str, el: Any) -> None:
        if not isinstance(el, dict):
            self.add(where, "element is not an object")
            return
        kind = el.get("type")
        if kind in TEXT_TYPES:              # a context block's text element
            self.text(where, "text", el, None)
            return
        if kind != "button":
            return                          # images, selects…: gpuherd sends none
        self.text(where, "button text", el.get("text"), BUTTON_TEXT, plain=True)
        action_id = el.get("action_id")
        if action_id is not None:
            if not isinstance(action_id, str) or not action_id:
                self.add(where, "action_id is empty")
            else:
                self.length(where, "action_id", action_id, ACTION_ID)
                if action_id in self.action_ids:
                    self.add(where, f"action_id {action_id[:80]!r} is used twice (also at {self.action_ids[action_id]})")
                else:
                    self.action_ids[action_id] = where
        self.length(where, "button value", el.get("value"), BUTTON_VALUE)
        self.length(where, "button url", el.get("url"), BUTTON_URL)
        if "style" in el and el["style"] not in BUTTON_STYLES:
            self.add(where, f"button style {el['style']!r}; primary, danger or none")
        if "confirm" in el:
            self.confirm(where, el["confirm"])

    def confirm(self, where: str, dialog: Any) -> None:
        where = f"{where} confirm"
        if not isinstance(dialog, dict):
            self.add(where, "the confirm dialog is not an object")
            return
        self.text(where, "title", dialog.get("title"), CONFIRM_TITLE, plain=True)
        self.text(where, "text", dialog.get("text"), CONFIRM_TEXT)
        self.text(where, "confirm", dialog.get("confirm"), CONFIRM_CONFIRM, plain=True)
        self.text(where, "deny", dialog.get("deny"), CONFIRM_DENY, plain=True)
        if "style" in dialog and dialog["style"] not in CONFIRM_STYLES:
            self.add(where, f"style {dialog['style']!r}; primary, danger or none")

    def block(self, where: str, block: Any) -> None:
        if not isinstance(block, dict):
            self.add(where, "block is not an object")
            return
        kind = block.get("type")
        where = f"{where} ({kind})"
        block_id = block.get("block_id")
        if block_id is not None:
            self.length(where, "block_id", block_id, BLOCK_ID)
            if block_id in self.block_ids:
                self.add(where, f"block_id {str(block_id)[:80]!r} is used twice (also at {self.block_ids[block_id]})")
            else:
                self.block_ids[block_id] = where
        if kind == "header":
            self.text(where, "header text", block.get("text"), HEADER_TEXT, plain=True)
        elif kind == "section":
            text, fields = block.get("text"), block.get("fields")
            if text is None and not fields:
                self.add(where, "a section needs text or fields")
            if text is not None:
                self.text(where, "section text", text, SECTION_TEXT)
            if fields is not None:
                if not isinstance(fields, list):
                    self.add(where, "fields is not a list")
                else:
                    if len(fields) > SECTION_FIELDS:
                        self.add(where, f"{len(fields)} fields; at most {SECTION_FIELDS}")
                    for i, field in enumerate(fields):
                        self.text(where, f"field {i}", field, SECTION_FIELD_TEXT)
            if "accessory" in block:
                self.element(f"{where} accessory", block["accessory"])
        elif kind in ("actions", "context"):
            elements = block.get("elements")
            limit = ACTIONS_ELEMENTS if kind == "actions" else CONTEXT_ELEMENTS
            if not isinstance(elements, list) or not elements:
                self.add(where, "no elements")
                return
            if len(elements) > limit:
                self.add(where, f"{len(elements)} elements; at most {limit}")
            for i, el in enumerate(elements):
                self.element(f"{where} element {i}", el)
        elif kind not in ("divider", "image", "rich_text", "input", "file", "video", "markdown"):
            self.add(where, f"unknown block type {kind!r}")


def violations(payload: dict[str, Any], *, home: bool = False) -> list[str]:
    """Every Block Kit limit `payload` breaks, one sentence each; empty when Slack would take it.
    A message is `{"text": …, "blocks": […]}`; with `home=True`, a Home view
    `{"type": "home", "blocks": […]}`."""
    check = _Checker()
    if not isinstance(payload, dict):
        return ["the payload is not an object"]
    blocks = payload.get("blocks")
    if home:
        if payload.get("type") != "home":
            check.add("view", f"type is {payload.get('type')!r}, not 'home'")
        limit = BLOCKS_PER_VIEW
    else:
        text = payload.get("text")
        if not isinstance(text, str) or not text.strip():
            check.add("message", "top-level text (the notification fallback) is missing or empty")
        else:
            check.length("message", "top-level text", text, TOP_LEVEL_TEXT)
        limit = BLOCKS_PER_MESSAGE
    if not isinstance(blocks, list):
        check.add("blocks", "missing or not a list")
        return check.problems
    if home and not blocks:
        check.add("view", "no blocks (a view needs 1 to 100)")
    if len(blocks) > limit:
        check.add("blocks", f"{len(blocks)} blocks; at most {limit}")
    for i, block in enumerate(blocks):
        check.block(f"blocks[{i}]", block)
    if not home:
        total = blocks_text_length(blocks)
        if total > MESSAGE_TEXT_TOTAL:
            check.add("blocks", f"{total:,} characters of text in all; Slack refuses more than about "
                                f"{MESSAGE_TEXT_TOTAL:,} (msg_blocks_too_long)")
    return check.problems
