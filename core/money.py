"""Exact money. Amounts are Decimal USD; the ledger stores integer micro-dollars so sums are
exact and fast in both SQLite and PostgreSQL (SQLite has no true decimal column)."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

MICRO = 1_000_000
CENT = Decimal("0.01")
HOURS_PER_DAY = 24
HOURS_PER_MONTH = 730  # the 365*24/12 month that cloud price sheets use


def to_decimal(value: object) -> Decimal:
    """Decimal from str/int/Decimal; floats go through str() so 0.1 stays 0.1."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value!r} is not an amount")
        return value
    if isinstance(value, bool):
        raise ValueError("a boolean is not an amount")
    if isinstance(value, float):
        value = repr(value)
    try:
        result = Decimal(str(value).strip().lstrip("$"))
    except (InvalidOperation, ValueError) as exc:
        raise ValueError(f"{value!r} is not an amount") from exc
    if not result.is_finite():
        raise ValueError(f"{value!r} is not an amount")
    return result


_TYPED_AMOUNT = re.compile(r"^\$?-?[0-9]{1,15}(\.[0-9]{1,12})?$")


def parse_amount(text: str | Decimal) -> Decimal:
    """An amount a person typed: ASCII digits with an optional `$` and decimal point, at most 15
    digits before it. No exponent (`1e309`), digit separators (`4_096`), signs other than `-`,
    or non-ASCII digits (`١٠٠`, `²`): Python's Decimal reads all of those, and a typo should be
    refused, not read as something else. Provider prices (floats, exponents) use `to_decimal`."""
    if isinstance(text, Decimal):
        return to_decimal(text)
    raw = str(text).strip()
    if not _TYPED_AMOUNT.match(raw):
        raise ValueError(f"{raw[:40]!r} is not an amount")
    return Decimal(raw.lstrip("$"))


def to_micros(amount: Decimal | str | int) -> int:
    """USD -> integer micro-dollars, rounded half-up."""
    return int((to_decimal(amount) * MICRO).to_integral_value(rounding=ROUND_HALF_UP))


def from_micros(micros: int) -> Decimal:
    return Decimal(int(micros)) / MICRO


def cost_of(rate_micros_per_hour: int, seconds: int | float) -> Decimal:
    """Exact cost of `seconds` at a rate; micro-dollar-seconds / 3600 / 1e6."""
    return Decimal(int(rate_micros_per_hour) * int(seconds)) / (3600 * MICRO)


def usd(amount: Decimal, places: int = 2) -> str:
    """'$1,234.57'; small rates keep more places so $0.004/h does not print as $0.00."""
    q = Decimal(1).scaleb(-places)
    rounded = amount.quantize(q, rounding=ROUND_HALF_UP)
    if rounded == 0 and amount != 0:  # a few seconds of billing is not free
        return f"{'-' if amount < 0 else ''}<${q}"
    sign = "-" if rounded < 0 else ""
    return f"{sign}${abs(rounded):,.{places}f}"


def rate(amount_per_hour: Decimal) -> str:
    """'$0.345/h' with three places under a dollar."""
    places = 3 if abs(amount_per_hour) < 1 else 2
    return f"{usd(amount_per_hour, places)}/h"
