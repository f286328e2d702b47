"""Small core pieces: money, retries, secret scrubbing, short ids."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from gpuherd.core.audit import MASK, scrub
from gpuherd.core.errors import AuthError, ProviderUnavailable, RateLimited
from gpuherd.core.ids import ID_RE, new_instance_id, normalise_instance_id
from gpuherd.core.money import cost_of, from_micros, rate, to_decimal, to_micros, usd
from gpuherd.core.retry import with_retries


def test_money_is_exact():
    assert to_decimal(0.1) + to_decimal(0.2) == Decimal("0.3")
    assert to_micros("0.3475") == 347500 and from_micros(347500) == Decimal("0.3475")
    assert cost_of(1_000_000, 1800) == Decimal("0.5")
    assert usd(Decimal("1234.565")) == "$1,234.57" and usd(Decimal("-2")) == "-$2.00"
    assert usd(Decimal("0.0004")) == "<$0.01" and usd(Decimal(0)) == "$0.00"
    assert rate(Decimal("0.0045")) == "$0.005/h" and rate(Decimal("2.5")) == "$2.50/h"
    for bad in ("abc", "nan", "inf", True):
        with pytest.raises(ValueError):
            to_decimal(bad)


async def test_retry_honours_retry_after_capped_at_60s():
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)

    calls = {"n": 0}

    async def flaky():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RateLimited("vast", "slow down", retry_after=3)
        if calls["n"] == 2:
            raise RateLimited("vast", "slow down", retry_after=600)
        if calls["n"] == 3:
            raise ProviderUnavailable("vast", "502")
        return "ok"

    assert await with_retries(flaky, sleep=sleep, rng=random.Random(1)) == "ok"
    assert slept[:2] == [3, 60] and 0 <= slept[2] <= 2.0 and calls["n"] == 4


async def test_retry_gives_up_and_never_retries_auth_errors():
    async def sleep(d: float) -> None:
        return None

    calls = {"n": 0}

    async def refused():
        calls["n"] += 1
        raise AuthError("runpod", "the API key was refused")

    with pytest.raises(AuthError):
        await with_retries(refused, sleep=sleep)
    assert calls["n"] == 1

    async def down():
        calls["n"] += 1
        raise ProviderUnavailable("runpod", "503")

    calls["n"] = 0
    with pytest.raises(ProviderUnavailable):
        await with_retries(down, attempts=3, sleep=sleep)
    assert calls["n"] == 3


def test_scrub_masks_secret_keys_and_values():
    slack_shaped = "-".join(["xoxb", "1" * 12, "2" * 12, "fake" * 6])   # built here: no token in the source
    out = scrub({"env": {"HF_TOKEN": "x", "MODEL": "qwen"}, "api_key": "k",
                 "note": f"used {slack_shaped} today",
                 "list": ["AKIAIOSFODNN7EXAMPLE"], "amount": Decimal("1.5")})
    assert out["env"] == {"HF_TOKEN": MASK, "MODEL": "qwen"} and out["api_key"] == MASK
    assert "xoxb-" not in out["note"] and MASK in out["note"]
    assert out["list"] == [MASK] and out["amount"] == "1.5"


def test_ids_are_short_unique_and_normalised():
    taken: set[str] = set()
    for _ in range(500):
        taken.add(new_instance_id(taken))
    assert len(taken) == 500 and all(ID_RE.match(i) for i in taken)
    assert normalise_instance_id(" G-7F3A ") == "g-7f3a" and normalise_instance_id("7f3a") == "g-7f3a"
