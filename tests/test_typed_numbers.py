"""Numbers a person types are ASCII and bounded: Python reads `1e309`, `4_096`, `+40`, `١٠٠`
and `²` as numbers (Decimal, int, str.isdigit), and a typo read as something else is worse than
a refusal. Each gets a message that names it, no internal error, and nothing changes."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gpuherd.bot.grammar import Context, dispatch
from gpuherd.core.money import parse_amount, to_decimal
from gpuherd.core.service import GpuService

HOSTILE_AMOUNTS = ["1e309", "1E3", "4_096", "+40", "١٠٠", "²", "0x10", "1,000", "Infinity", "NaN", " ", "", "1" * 16,
                   "12.", ".5", "--5", "$$5", "5$"]


@pytest.mark.parametrize("text", HOSTILE_AMOUNTS)
def test_a_typed_amount_is_ascii_digits_only(text: str) -> None:
    with pytest.raises(ValueError):
        parse_amount(text)


@pytest.mark.parametrize(("text", "value"), [("500", "500"), ("$1250.50", "1250.50"), ("0.01", "0.01"),
                                             ("-3", "-3"), (" 7 ", "7")])
def test_plain_amounts_still_parse(text: str, value: str) -> None:
    assert parse_amount(text) == Decimal(value)


def test_provider_prices_keep_their_own_reader() -> None:
    assert to_decimal(0.00001) == Decimal("0.00001")           # repr is '1e-05'


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_hostile_numbers_in_commands_are_refused_by_name_and_change_nothing(service: GpuService) -> None:
    ctx = Context(service=service, actor=service.local_actor(), wait=True)
    for amount in ("1e309", "4_096", "+40", "١٠٠"):
        reply = await dispatch(ctx, f"/gpu budget set team=x {amount}")
        assert reply.level == "error" and reply.title != "Internal error", reply
        assert "not an amount" in reply.text and amount in reply.text
    assert (await service.budgets(ctx.actor)).budgets == []
    for word in ("²", "١٠"):
        reply = await dispatch(ctx, f"/gpu audit {word}")
        assert reply.level == "error" and reply.title != "Internal error", reply
        assert word in reply.text
