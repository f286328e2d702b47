"""A button press, for every surface that has buttons (Slack, Discord, the panel).

A button carries a core action's `ref` (`stop|g-7f3a`, `confirm||c_9f…`), never a command line
or a secret. Pressing it runs the command line core's action stands for, through the same
grammar as a typed command, so the presser is checked by core exactly as if they had typed it
(a viewer's Stop is refused; a member's Stop on someone else's machine is refused).

Decisions:
- `delivery` names the press for idempotency: the same button on the same message. A surface
  passes the message and the ref, not the presser or the click, so a double click and a
  platform's redelivery carry the same idempotency key and a boot or a stop happens once; a
  second person pressing the same Boot button is told someone else already made that request
  (core's rule for a key used by another), and nothing boots twice.
- `confirmed` says the platform already asked "are you sure?" in its own dialog (Slack's confirm
  object, which sends the press only after a yes). Core's destroy asks for a yes of its own;
  after the platform's dialog that question is answered here with `confirm=yes`, so the user is
  not asked twice. Without a dialog (a surface that has none) core's question is shown."""

from __future__ import annotations

import hashlib

from gpuherd.core.actions import Action, Op
from gpuherd.core.errors import GpuherdError

from . import replies
from .replies import Reply


def delivery_id(*parts: str) -> str:
    """A short, stable id for one button on one message (idempotency keys are at most 200
    characters; a ref alone may be 100)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def command_for(action: Action, *, confirmed: bool = False) -> str:
    """The `/gpu` line a pressed action stands for."""
    line = replies.phrase(action).command
    if confirmed and action.op is Op.DESTROY:
        line += " confirm=yes"
    return line


def parse(ref: str) -> Action | Reply:
    """The action a button carried, or the error reply for a malformed one."""
    try:
        return Action.from_ref(ref)
    except GpuherdError as exc:
        return replies.error(exc.message, exc.hint)

