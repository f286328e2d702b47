"""Short, stable instance ids users can type (`g-7f3a`), never the provider's id."""

from __future__ import annotations

import re
import secrets

from .text import MAX_NAME, bounded

ID_RE = re.compile(r"^g-[0-9a-f]{4,8}$")


def new_instance_id(taken: set[str] | None = None, length: int = 4) -> str:
    """A fresh id; grows past 4 hex digits only if the short ones are crowded."""
    taken = taken or set()
    for attempt in range(64):
        n = length + attempt // 16
        candidate = f"g-{secrets.token_hex(4)[:n]}"
        if candidate not in taken:
            return candidate
    return f"g-{secrets.token_hex(4)}"


def normalise_instance_id(text: str) -> str:
    """Accept `G-7F3A` or `7f3a` as well as `g-7f3a`. Longer than any name (`text.MAX_NAME`):
    InvalidInput, before any pattern runs."""
    t = bounded(text, MAX_NAME, "instance id").strip().lower()
    if not t.startswith("g-") and re.fullmatch(r"[0-9a-f]{4,8}", t):
        t = "g-" + t
    return t


LABEL_PREFIX = "gh-"


def label_for(key: str) -> str:
    """The label a machine carries at its provider: the boot's idempotency key, marked as
    gpuherd's so reconcile can tell our machines from ones made by hand. Keys gpuherd generates
    already start with the mark; keys a surface supplies get it added."""
    return key if key.startswith(LABEL_PREFIX) else f"{LABEL_PREFIX}{key}"


def is_gpuherd_label(label: str | None) -> bool:
    return bool(label and label.startswith(LABEL_PREFIX))
