"""Bounds on user input, and user input quoted back short.

Every text a user typed is bounded before it is parsed and clipped before it is echoed: a
100,000-character word must cost microseconds and produce a reply of a few lines, not stall
the event loop the guards share.

The limits, and why:

* `MAX_LINE` = 2,000 characters: one whole command line (`/gpu …`). The longest line in the
  README and the tests is about 100 characters; a boot that sets every override (16 keys) plus
  a long env token (about 1,000 characters) stays near 1,400.
* `MAX_WORD` = 1,024 characters: one boot override value (`key=value`). Env values carry
  tokens: Hugging Face and GitHub tokens are under 100 characters, JWTs and AWS session tokens
  run to several hundred; 1,024 leaves room. Core keeps its own, larger bound on env values
  (4,096, `templates._env_value`) for callers that do not come through chat.
* `MAX_NAME` = 128 characters: a name, id or short value: template names (64 at most by
  their pattern), instance ids (10), principals (`slack:U2…`, `discord:<18 digits>`), provider
  refs (`surf:<uuid>`), option names, durations, amounts. Every positional argument and every
  option value of a command other than boot is one of these.
* `MAX_QUERY` = 2,000 characters: a search query (the length `query.parse_query` has always
  accepted); in chat the line bound comes first.
* `QUOTE` = 40 characters: how much of a value an error message quotes.
* `MAX_SUGGEST` = 40 characters: no "did you mean" (difflib) for a longer word; every
  candidate is shorter than 30 characters, so nothing close is lost.
"""

from __future__ import annotations

from .errors import InvalidInput

MAX_LINE = 2000
MAX_WORD = 1024
MAX_NAME = 128
MAX_QUERY = 2000
QUOTE = 40
MAX_SUGGEST = 40

__all__ = ["MAX_LINE", "MAX_NAME", "MAX_QUERY", "MAX_SUGGEST", "MAX_WORD", "QUOTE", "bounded",
           "clip", "suggestible", "too_long"]


def _printable(text: str) -> str:
    """Control and invisible characters (line breaks, bidi overrides) shown as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def clip(value: str, limit: int = QUOTE, *, stop: str | None = None) -> str:
    """`value` for a message, unquoted (callers write `'{clip(v)}'`): as is when it has at most
    `limit` characters, else its first `limit` characters, "…" and its length
    (`xxxxx… (10,000 characters)`). With `stop`, it also ends before the first `stop` (a whole
    command line is shown up to its first `=`, so no option value is). Line breaks and other
    invisible characters are shown as escapes. Costs O(limit) whatever the length of `value`."""
    if not isinstance(value, str):
        value = str(value)
    limit = max(limit, 1)
    head = value[:limit + 1]
    cut = len(value) > limit
    if stop:
        at = head.find(stop)
        if at != -1:
            head, cut = head[:at], True
    if not cut:
        return _printable(value)
    return f"{_printable(head[:limit])[:limit]}… ({len(value):,} characters)"


def too_long(value: str, limit: int, what: str, *, stop: str | None = None) -> str:
    """The message for a value over its bound: "Template name is too long: 'xxx… (10,000
    characters)'; at most 128 characters." """
    return f"{what[:1].upper()}{what[1:]} is too long: '{clip(value, stop=stop)}'; at most {limit:,} characters."


def bounded(value: str, limit: int, what: str, *, stop: str | None = None) -> str:
    """`value` unchanged when it is text of at most `limit` characters; otherwise InvalidInput
    naming `what` and the limit and quoting the value clipped. `stop` as in `clip`."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what[:1].upper()}{what[1:]} must be text, not {type(value).__name__}.")
    if len(value) > limit:
        raise InvalidInput(too_long(value, limit, what, stop=stop))
    return value


def suggestible(word: str) -> bool:
    """Whether a "did you mean" search is worth running for `word` (short enough)."""
    return len(word) <= MAX_SUGGEST
