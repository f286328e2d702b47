"""Retries with exponential backoff and full jitter for provider calls that are safe to repeat.
A 429's Retry-After is honoured (capped at 60 s, as the vast.ai client does)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .errors import ProviderError, RateLimited
from .provider_health import HEALTH
from .telemetry import TELEMETRY

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_RETRY_AFTER_S = 60.0


async def with_retries(call: Callable[[], Awaitable[T]], *, attempts: int = 4, base_delay: float = 0.5,
                       max_delay: float = 20.0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                       rng: random.Random | None = None, what: str = "provider call") -> T:
    rng = rng or random.Random()
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except ProviderError as exc:
            if not exc.retryable or attempt == attempts:
                raise
            if isinstance(exc, RateLimited) and exc.retry_after is not None:
                delay = min(max(exc.retry_after, 0.0), MAX_RETRY_AFTER_S)
            else:
                delay = rng.uniform(0, min(max_delay, base_delay * 2 ** (attempt - 1)))
            log.warning("%s failed (%s), retry %d/%d in %.2fs", what, exc.code, attempt, attempts - 1, delay)
            await sleep(delay)
    raise AssertionError("unreachable")


async def provider_call(provider: object, call: Callable[[], Awaitable[T]], *,
                        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                        what: str = "provider call") -> T:
    """One call to a provider, retried here only when its client does not already retry the way
    its official SDK does (retrying twice over would multiply the waits). Each attempt is counted
    in `telemetry.TELEMETRY` by provider and outcome."""
    name = str(getattr(provider, "name", type(provider).__name__))
    call = TELEMETRY.counted(name, HEALTH.watched(name, call))   # and its answer or error (provider_health)
    caps = getattr(provider, "capabilities", None)
    if caps is not None and getattr(caps, "retries_internally", False):
        return await call()
    return await with_retries(call, sleep=sleep, what=what)
