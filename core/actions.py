"""Typed next steps. A result or a notice offers what its reader may do next as `Action`s that
core computes for that reader (a viewer is offered no Stop; nobody is offered Destroy on a
provider that cannot destroy). Each surface phrases them: a `/gpu keep g-7f3a 1h` line in the
shell and chat, a button in Slack, Discord and the panel, a link relation in HTTP.

An action carries no secret and no command line. `Action.ref` is a compact string for a
button's value or `custom_id` (at most 100 characters, Discord's limit); a surface hands it
back to `Action.from_ref` when the button is pressed, and core checks the presser again then —
the ref grants nothing by itself. A yes to a stored confirmation is the action `confirm` with
the confirmation's opaque token."""

from __future__ import annotations

import enum
import re
from typing import Literal

from pydantic import BaseModel, Field

from .errors import InvalidInput

MAX_REF = 100


class Op(str, enum.Enum):
    BOOT = "boot"
    START = "start"
    STOP = "stop"
    DESTROY = "destroy"
    KEEP = "keep"
    STATUS = "status"
    COSTS = "costs"
    SEARCH = "search"
    TEMPLATES = "templates"
    BUDGET = "budget"
    ATTACH = "attach"
    CONFIRM = "confirm"      # accept a stored confirmation (args: token)
    CANCEL = "cancel"        # decline it


class Style(str, enum.Enum):
    DEFAULT = "default"
    PRIMARY = "primary"
    DANGER = "danger"


# which argument of each op a ref carries, in order (nothing else fits in 100 characters)
_REF_ARGS: dict[Op, tuple[str, ...]] = {
    Op.BOOT: ("template", "offer"),
    Op.KEEP: ("duration",),
    Op.CONFIRM: ("token",),
    Op.CANCEL: ("token",),
    Op.COSTS: ("period",),
    Op.SEARCH: ("query",),
    Op.TEMPLATES: ("name",),
    Op.ATTACH: ("ref",),
}
_SAFE = re.compile(r"^[A-Za-z0-9_.:\-<>=$ ]*$")


class Action(BaseModel):
    kind: Literal["action"] = "action"
    op: Op
    instance_id: str | None = None
    args: dict[str, str] = Field(default_factory=dict)
    style: Style = Style.DEFAULT
    confirm: bool = False          # destructive: a surface asks "are you sure?" before sending it

    @property
    def ref(self) -> str:
        """`stop|g-7f3a`, `keep|g-7f3a|1h`, `confirm||c_9f…`: what a button carries."""
        parts = [self.op.value, self.instance_id or ""]
        parts += [self.args.get(name, "") for name in _REF_ARGS.get(self.op, ())]
        while len(parts) > 2 and parts[-1] == "":
            parts.pop()
        ref = "|".join(parts)
        if len(ref) > MAX_REF:
            raise ValueError(f"action ref longer than {MAX_REF} characters: {ref[:40]}…")
        return ref

    @classmethod
    def from_ref(cls, ref: str) -> Action:
        """The action a button carried. Anything malformed is refused with a message, never guessed."""
        if not ref or len(ref) > MAX_REF or "|" not in ref:
            raise InvalidInput("That button is not one of gpuherd's (or is from an older version); "
                               "run the command again.")
        op_name, instance_id, *rest = ref.split("|")
        try:
            op = Op(op_name)
        except ValueError:
            raise InvalidInput(f"Unknown button action '{op_name[:20]}'.") from None
        names = _REF_ARGS.get(op, ())
        if len(rest) > len(names) or not all(_SAFE.match(v) for v in rest):
            raise InvalidInput("That button's data is malformed; run the command again.")
        return cls(op=op, instance_id=instance_id or None, args=dict(zip(names, rest, strict=False)))


def act(op: Op, instance_id: str | None = None, *, style: Style = Style.DEFAULT, confirm: bool = False,
        **args: str) -> Action:
    return Action(op=op, instance_id=instance_id, args=args, style=style, confirm=confirm)
