"""Names that are stored: teams, budgets, users (principals), API key labels and idempotency keys.

Every way a name enters gpuherd (`/gpu budget`, `gpuherd users set`, `gpuherd keys create`,
first sight of a chat user, `key=` on a command, the HTTP API) passes one of the checks here
before any query, so a refusal reads the same on SQLite and PostgreSQL and no row changes.

The patterns (this docstring is their documentation; every refusal restates the rule):

* team, and the name of a team budget: `[a-z0-9][a-z0-9._-]{0,63}` (`TEAM_PATTERN`). Lowercase
  ASCII so that `ML`, `ml` and a Cyrillic `мl` cannot be three teams that look like one;
  no `/`, so a team name is never a path (`../../etc`); at most 64 characters.
* principal (a user, and the name of a user budget): `<platform>:<id>` (`PRINCIPAL_PATTERN`);
  platform `[a-z][a-z0-9]{0,15}` (local, slack, discord, api, system, …), id ASCII letters,
  digits and `. _ @ + -`, starting with a letter or digit; at most 128 characters in all.
  Chat ids (Slack `U…`, Discord snowflakes), login names and e-mail-like names all fit.
* idempotency key (`key=`, HTTP `Idempotency-Key`): `[A-Za-z0-9._:-]{1,200}`, as the HTTP
  API has always required.
* API key label: at most 64 printable characters (spaces allowed: it is a description).

Decisions:

- Control characters (C0, DEL, C1), and invisible format characters (bidi overrides, zero
  widths) are refused, never stripped: a name that reaches a terminal through `/gpu budget`
  must be the one the admin typed, and a NUL is an error on PostgreSQL but not on SQLite.
- Refusals quote the value through `text.clip`, which shows invisible characters as escapes,
  so an escape sequence in a refused name never reaches the asker's terminal either.
- Lookups by a name (clearing a budget) use the same check as storing one: a name that could
  not have been stored cannot be found, and the refusal says why.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import InvalidInput
from .text import MAX_NAME, clip

__all__ = ["KEY_PATTERN", "MAX_KEY", "MAX_KEY_LABEL", "MAX_TEAM", "PRINCIPAL_PATTERN", "TEAM_PATTERN",
           "check_budget_name", "check_idempotency_key", "check_key_label", "check_principal", "check_team",
           "has_control", "safe_principal"]

MAX_TEAM = 64
MAX_KEY = 200
MAX_KEY_LABEL = 64
TEAM_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
PRINCIPAL_PATTERN = r"[a-z][a-z0-9]{0,15}:[A-Za-z0-9][A-Za-z0-9._@+-]*"
KEY_PATTERN = r"[A-Za-z0-9._:-]{1,200}"

_TEAM = re.compile(TEAM_PATTERN)
_PRINCIPAL = re.compile(PRINCIPAL_PATTERN)
_KEY = re.compile(KEY_PATTERN)


def has_control(text: str) -> bool:
    """Whether `text` has a control or invisible format character (Unicode categories Cc, Cf,
    and line/paragraph separators): a NUL, an ESC starting a terminal sequence, a bidi override."""
    return not text.isprintable() or any(unicodedata.category(c) == "Cf" for c in text)


def _shown(value: str) -> str:
    return f" ('{clip(value)}')" if value else ""


def check_team(team: str, what: str = "team name") -> str:
    """A team name that may be stored or looked up, else InvalidInput naming `what`."""
    if not isinstance(team, str) or len(team) > MAX_TEAM or not _TEAM.fullmatch(team):
        shown = _shown(team) if isinstance(team, str) else ""
        hint = ""
        if isinstance(team, str) and team and team.lower() != team and _TEAM.fullmatch(team.lower()):
            hint = f" Did you mean '{team.lower()}'?"
        raise InvalidInput(f"That {what}{shown} cannot be used: 1 to {MAX_TEAM} characters of lowercase "
                           "letters a-z, digits, '.', '_' or '-', starting with a letter or digit "
                           f"(no spaces, slashes or control characters).{hint}")
    return team


def check_principal(principal: str, what: str = "user id") -> str:
    """A principal (`<platform>:<id>`) that may be stored or looked up, else InvalidInput."""
    if not isinstance(principal, str) or len(principal) > MAX_NAME or not _PRINCIPAL.fullmatch(principal):
        shown = _shown(principal) if isinstance(principal, str) else ""
        raise InvalidInput(f"That {what}{shown} cannot be used: name a principal such as api:alice or "
                           "slack:U123 (<platform>:<id>; ASCII letters, digits, '.', '_', '@', '+' or '-'; "
                           f"no spaces or control characters, at most {MAX_NAME} characters).")
    return principal


def check_budget_name(scope: str, name: str) -> str:
    """The name of a team budget is a team name, of a user budget a principal."""
    if scope == "user":
        return check_principal(name, "budget user")
    return check_team(name, "budget team")


def check_idempotency_key(key: str) -> str:
    """An idempotency key that may be stored: `[A-Za-z0-9._:-]{1,200}`."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        shown = f" ('{clip(key)}')" if isinstance(key, str) and key else ""
        raise InvalidInput(f"That idempotency key{shown} cannot be used: 1 to {MAX_KEY} characters of ASCII "
                           "letters, digits, '.', '_', ':' or '-'.")
    return key


def check_key_label(label: str) -> str:
    """An API key's label: a short description, printable, at most 64 characters."""
    if len(label) > MAX_KEY_LABEL:
        raise InvalidInput(f"A key's name is at most {MAX_KEY_LABEL} characters.")
    if has_control(label):
        raise InvalidInput(f"A key's name ('{clip(label)}') cannot have control or invisible characters.")
    return label


def safe_principal(raw: str, platform: str = "local") -> str:
    """A principal made from an outside name that may not fit (a login name with a space): the
    characters the pattern does not allow become '-'. Used for defaults only, never for input."""
    cleaned = re.sub(r"[^A-Za-z0-9._@+-]", "-", raw.encode("ascii", "replace").decode()).strip("-._@+")
    return f"{platform}:{cleaned[:MAX_NAME - len(platform) - 1] or 'user'}"
