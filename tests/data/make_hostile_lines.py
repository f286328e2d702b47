"""Writes `hostile_lines.txt`: `/gpu` lines a careless or hostile user might type, each with the
words its reply must contain. Run it after changing the lists (`python tests/data/make_hostile_lines.py`);
`tests/test_hostile_input.py` fails when the file and this script disagree.

Each line of the file is a JSON array `[line, expected]`: JSON so that NUL, ESC, bidi overrides
and line separators survive a text file and a diff. `{run}` and `{stopped}` stand for the ids of
a running and a stopped machine of the test's database.

Names are never the last word of a line: the shell trims whitespace from the ends of a line
(Python's whitespace, which includes VT, FF, FS to US and NEL), as it trims spaces.

The expectations are written from the documented rules (core/names.py's docstring), not from
the code's behaviour: a name is hostile here when it has a character outside the documented
alphabet, so a check that is too lax fails the test instead of the value being left out.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "hostile_lines.txt"

# the documented alphabets (core/names.py's docstring)
TEAM_OK = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
PRINCIPAL_OK = re.compile(r"[a-z][a-z0-9]{0,15}:[A-Za-z0-9][A-Za-z0-9._@+-]{0,111}")
KEY_OK = re.compile(r"[A-Za-z0-9._:-]{1,200}")
OFFER_OK = re.compile(r"[a-z][a-z0-9]{0,31}:[A-Za-z0-9][A-Za-z0-9._@%+=:-]{0,99}")   # /gpu search's offer refs

# one shlex word each (no whitespace, no quotes): names that must never be stored
NAMES = [
    # control and escape characters
    "ml\x00", "\x00", "a\x00b", "ml\x1b[31m", "\x1b[2J\x1b[H", "\x1b]0;pwned\x07", "\x1b]8;;http://evil/\x07x",
    "ml\x07", "ml\x08\x08", "ml\x7f", "ml\x85", "ml\x9b31m", "\x1bc", "ml\x0b", "ml\x0c",
    "ml\x1c", "ml\x1f", "\u202eml", "ml\u202e", "m\u200bl", "\ufeffml", "ml\u2028x", "ml\u2029x",
    "m\u00adl", "\u2066ml\u2069", "ml\u200d",
    # unicode look-alikes
    "\u043cl", "ml\u0301", "\uff4d\uff4c", "ML", "Ml", "\u217f\u217c", "\u0391\u0399", "te\u0430m",
    "\u24dc\u24db", "ml\u0660", "\U0001d5c6\U0001d5c5", "ﬁ", "straße", "ｔｅａｍ",
    # paths
    "../../etc", "../../../etc/passwd", "/etc/passwd", "..", ".", ".hidden", "a/b", "C:\\Windows",
    "~root", "team/../admin", "%2e%2e%2f", "file:///etc/passwd", "\\\\server\\share",
    # SQL and wildcards
    "x';DROP-TABLE-budgets;--", "1;DELETE", "%", "_%", "*", "ml%", "ml*", "a|b", "a&b", "$(id)",
    "`id`", "a>b", "<script>", "ml;", "ml,ds", "[red]ml[/red]", "ml=x", "-ml", "_ml", "@here",
    "<!channel>", "{ml}", "ml#1", "ml!", "ml?", "ml+",
    # whitespace Python trims but shlex keeps inside a word
    "m\x0bl", "m\x0cl", "m\x1cl", "m\x85l", "m\u00a0l", "m\u3000l",
    # lengths
    "a" * 65, "t" * 200, "ab" * 64,
]

# numbers a user might give as an amount, with the words of the refusal
NOT_USD = "not an amount in USD"
NUMBERS = {
    **{n: NOT_USD for n in ["1e309", "NaN", "nan", "Infinity", "-inf", "0x10", "0b1", "1_000", "1,000", "1.2.3",
                            "1e-9", "١٠", "５", "²", "Ⅻ", "½", "five", "5$", "€5", "5USD", "  ", ".5.",
                            "+-5", "5-", "1/2", "∞", ".", "1e3", "0e0", "5\x00", "\x1b[31m5", "5\u202e"]},
    "10" * 60: NOT_USD, "9" * 127: NOT_USD, "0.": NOT_USD, "10000001": "not a plausible budget",
    "-0": "more than $0", "-5": "more than $0", "0": "more than $0", "00": "more than $0",
    "0.001": "whole cents", "--5": "has no option",
}

# durations for keep, with the words of the refusal
NOT_DURATION = "is not a duration"
DURATIONS = {
    **{d: NOT_DURATION for d in ["h", "1x", "١h", "１h", "1h\x00", "nan h", "1h2", "P1D", "1hh", "∞h", "1.5.5h",
                                 "1e9h", "\x1b[31m1h", "1h\u202e"]},
    "0s": "more than zero", "-1h": "cannot be negative", "8d": "at most 7d", "1000w": "at most 365d",
    "99999999999999999999d": "at most 365d", "9" * 100 + "s": "at most 365d",
}


def word(value: str) -> str:
    """`value` as one word of a command line (shlex-quoted when it must be)."""
    return shlex.quote(value) if any(c.isspace() for c in value) or value == "" else value


def _parsed(name: str) -> str | None:
    """What the grammar's shlex makes of `name` as one word; None when it cannot be read."""
    try:
        words = shlex.split(name)
    except ValueError:
        return None
    return words[0] if len(words) == 1 else "\x00split"


def cases() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def add(line: str, expected: str) -> None:
        out.append((line, expected))

    for name in NAMES:
        value = _parsed(name)
        if value is None:                  # an unclosed quote: the whole line is refused
            for line in (f"/gpu budget set team={name} 5", f"/gpu stop key={name} {{run}}",
                         f"/gpu status {name} all=yes", f"/gpu boot offer=sandbox:{name} budget"):
                add(line, "check your quotes")
            continue
        assert not TEAM_OK.fullmatch(value), name

        def too_long(size: int, limit: int = 128) -> bool:
            return size > limit

        def user(platform: str, verb: str, value: str = value) -> str:
            principal = f"{platform}:{value}"
            if too_long(len(principal)):
                return "is too long"
            if PRINCIPAL_OK.fullmatch(principal):     # well-formed, but nobody gpuherd knows
                return "does not know the user" if verb == "set" else "There is no user budget"
            return "That budget user"

        add(f"/gpu budget set team={name} 5", "is too long" if too_long(len(value)) else "That budget team")
        add(f"/gpu budget team={name} clear", "is too long" if too_long(len(value)) else "That budget team")
        add(f"/gpu budget set user={name} 5", "is too long" if too_long(len(value)) else "That budget user")
        add(f"/gpu budget user=local:{name} clear", user("local", "clear"))
        add(f"/gpu budget set user=slack:{name} 5", user("slack", "set"))
        if not KEY_OK.fullmatch(value):
            shown = "is too long" if too_long(len(value)) else "That idempotency key"
            add(f"/gpu stop key={name} {{run}}", shown)
            add(f"/gpu start key={name} {{stopped}}", shown)
            add(f"/gpu destroy key={name} {{run}} confirm=yes", shown)
        add(f"/gpu boot offer=sandbox:{name} budget", "not available any more"
            if OFFER_OK.fullmatch(f"sandbox:{value}") else "should look like <provider>:<id>")
        add(f"/gpu boot provider={name} budget", "is not a provider name")
        if "=" in value.lstrip("="):       # a word with '=' is an option, not an argument
            continue
        positional = "is too long" if too_long(len(value)) else None
        add(f"/gpu status {name} all=yes", positional or "There is no instance")
        add(f"/gpu keep {name} 1h", positional or "There is no instance")
        add(f"/gpu boot {name}", positional or "Unknown template")
        add(f"/gpu templates {name}", positional or "Unknown template")
        principal = f"slack:{value}"
        if not PRINCIPAL_OK.fullmatch(principal):
            add(f"/gpu attach owner=slack:{name} sandbox:{{run}}",
                "is too long" if too_long(len(principal)) else "cannot be used")

    for n, expected in NUMBERS.items():
        add(f"/gpu budget set team=ml {word(n)}", expected)
    for n in ("1e309", "NaN", "-5", "0", "10" * 60, "9" * 127, "١٠", "５", "²", "0x10", "1_000", "five", "00"):
        add(f"/gpu audit {n}", "neither a count" if not (n.isascii() and n.isdigit()) else "audit events")
    for d, expected in DURATIONS.items():
        add(f"/gpu keep {{run}} {word(d)}", expected)

    # conflicting, repeated or empty options and arguments
    for line, expected in [
        ("/gpu boot budget offer=sandbox:sb-0001 provider=vast", "names another provider"),
        ("/gpu boot budget offer=vast:123 provider=sandbox", "names another provider"),
        ("/gpu audit 10 20", "Two counts"),
        ("/gpu audit {run} {stopped}", "Two instances"),
        ("/gpu status ''", "empty argument"),
        ('/gpu status ""', "empty argument"),
        ("/gpu keep '' 1h", "empty argument"),
        ("/gpu stop ''", "empty argument"),
        ("/gpu templates ''", "empty argument"),
        ("/gpu costs ''", "empty argument"),
        ("/gpu budget set '' team=ml", "empty argument"),
        ("/gpu budget set team=ml team=cv 5", "given twice"),
        ("/gpu budget set team=ml user=local:alice 5", "exactly one of"),
        ("/gpu budget set team= 5", "That budget team"),
        ("/gpu budget set user= 5", "That budget user"),
        ("/gpu budget set user=local:nobody 5", "does not know the user"),
        ("/gpu budget set user=slack:U404 5", "does not know the user"),
        ("/gpu budget clear team=nobody", "There is no team budget"),
        ("/gpu keep {stopped}", "nothing to keep"),
        ("/gpu keep {stopped} 2h", "nothing to keep"),
        ("/gpu stop {run} key=", "That idempotency key"),
        ("/gpu boot budget key=", "That idempotency key"),
        ("/gpu stop {stopped}", "stopped"),
        ("/gpu boot budget offer=sandbox:", "should look like <provider>:<id>"),
        ("/gpu boot budget offer=:sb-0001", "should look like <provider>:<id>"),
        ("/gpu boot budget offer=sandbox", "should look like <provider>:<id>"),
        ("/gpu boot budget offer=SANDBOX:sb-0001", "should look like <provider>:<id>"),
        ("/gpu boot budget offer=sandbox::", "should look like <provider>:<id>"),
        ("/gpu boot budget offer=sandbox:sb-0001:", "not available any more"),
        ("/gpu boot budget offer=sandbox:sb-99999", "not available any more"),
        ("/gpu boot budget offer=nowhere:1", "nowhere"),
        ("/gpu boot budget provider=nowhere", "nowhere"),
        ("/gpu boot budget provider=", "is not a provider name"),
        ("/gpu boot budget offer=", "should look like <provider>:<id>"),
        ("/gpu boot budget offer=sandbox:sb-0001 offer=sandbox:sb-0002", "given twice"),
        ("/gpu destroy {run} confirm=maybe", "takes yes or no"),
        ("/gpu destroy {run} confirm=\x1b[31m", "takes yes or no"),
        ("/gpu status all=\x00", "takes yes or no"),
        ("/gpu budget set team=ml 5 hard_cap=\u202eyes", "takes yes or no"),
        ("/gpu budget frobnicate team=ml", "Unknown budget action"),
        ("/gpu budget \x1b[2Jset team=ml 5", "Unknown budget action"),
        ("/gpu status {run} extra", "Unexpected"),
        ("/gpu keep {run} 1h 2h", "Unexpected"),
        ("/gpu costs by=galaxy", "galaxy"),
        ("/gpu costs 2026-13", "2026-13"),
        ("/gpu costs 9999-99", "9999-99"),
        ("/gpu costs \x1b[31mweek", "\\u001b"),
        ("/gpu confirm c_\x00", "question"),
        ("/gpu confirm ../../etc", "question"),
        ("/gpu cancel ' OR '1'='1", "has no option"),
        ("/gpu cancel \"' OR '1'\"", "question"),
        ("/gpu attach nowhere:1", "nowhere"),
        ("/gpu attach sandbox:", "provider"),
        ("/gpu attach ../../etc", "provider"),
    ]:
        add(line, expected)

    # numbers in boot overrides, search queries and attach: ASCII digits only, bounded
    for line, expected in [
        ("/gpu boot budget max_dph=٠.٥", "max_dph must be"),
        ("/gpu boot budget max_dph=1e309", "max_dph must be"),
        ("/gpu boot budget max_dph=NaN", "max_dph must be"),
        ("/gpu boot budget max_dph=-1", "max_dph must be"),
        ("/gpu boot research max_model_len=٤٠٩٦", "max_model_len must be"),
        ("/gpu boot research max_model_len=" + "9" * 40, "max_model_len must be"),
        ("/gpu boot budget disk_gb=１００", "disk_gb must be"),
        ("/gpu boot budget num_gpus=²", "num_gpus must be"),
        ("/gpu boot research gpu_memory_utilization=٠.٩", "gpu_memory_utilization must be"),
        ("/gpu boot research gpu_memory_utilization=inf", "gpu_memory_utilization must be"),
        ("/gpu boot budget idle=١h", "idle must be"),
        ("/gpu boot budget idle=\x00", "idle must be"),
        ("/gpu search gpu_ram>=٤٨", "gpu_ram expects a number"),
        ("/gpu search num_gpus=١", "num_gpus expects a whole number"),
        ("/gpu search 4090 x٢", "Unknown word"),
        ("/gpu search dph<NaN", "dph expects"),
        ("/gpu search dph<\x1b[31m", "Unbalanced bracket"),
        ("/gpu search dph<\x1b5", "dph expects"),
        ("/gpu attach sandbox:x idle=١h", "is not a duration"),
    ]:
        add(line, expected)

    # quoting
    for line, expected in [
        ('/gpu budget set team="ml 5', "check your quotes"),
        ("/gpu budget set team='ml 5", "check your quotes"),
        ("/gpu status 'g-", "check your quotes"),
        ('/gpu keep "', "check your quotes"),
        ("/gpu boot budget env.X='unterminated", "check your quotes"),
        ("/gpu budget set team=ml\\", "check your quotes"),
        ("/gpu budget set 'team=m l' 5", "That budget team"),
        ('/gpu budget set "team=ml;" 5', "That budget team"),
        ("/gpu budget set team=\"'\" 5", "That budget team"),
        ('/gpu budget set team="\\"" 5', "That budget team"),
        ("/gpu budget set team='\\x00' 5", "That budget team"),
        ("/gpu status 'g-1234 OR 1=1'", "has no option"),
        ("/gpu status 'g-1234 OR 1' all=yes", "There is no instance"),
        ("/gpu status '{run}; DROP TABLE instances'", "There is no instance"),
        ("/gpu stop '{run}' key='a b'", "That idempotency key"),
        ("/gpu stop {run} key=\"'\"", "That idempotency key"),
    ]:
        add(line, expected)

    # very long values and lines
    for line, expected in [
        ("/gpu budget set team=" + "a" * 10_000 + " 5", "is too long"),
        ("/gpu status " + "g-" + "f" * 5000, "is too long"),
        ("/gpu stop {run} key=" + "k" * 201, "is too long"),
        ("/gpu stop {run} key=" + "k" * 128 + "/", "is too long"),
        ("/gpu stop {run} key=" + "k" * 120 + "/", "That idempotency key"),
        ("/gpu boot budget env.HF_TOKEN=" + "s" * 3000, "too long"),
        ("/gpu " + "x" * 3000, "is too long"),
        ("/gpu budget set team=ml " + "9" * 1500, "is too long"),
        ("/gpu keep {run} " + "1" * 2500 + "h", "is too long"),
        ("/gpu search " + "4090 " * 500, "is too long"),
    ]:
        add(line, expected)
    return out


def render(rows: list[tuple[str, str]]) -> str:
    return "".join(json.dumps([line, expected], ensure_ascii=True) + "\n" for line, expected in rows)


if __name__ == "__main__":
    rows = cases()
    OUT.write_text(render(rows), encoding="utf-8")
    print(f"{len(rows)} lines written to {OUT}")
