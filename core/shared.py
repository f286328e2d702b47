"""Calls many callers may want at once, made once: concurrent callers of the same key share one
in-flight request, and a result is reused for `ttl` seconds. Search uses it for offers (a 30 s
window), instance sync for provider listings (a window of a few seconds), so a hundred
`/gpu status` presses in one second ask a provider once, not a hundred times."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SharedCalls(Generic[T]):
    def __init__(self, monotonic: Callable[[], float], *, max_entries: int = 256) -> None:
        self._monotonic = monotonic
        self._cache: dict[Hashable, tuple[float, T]] = {}
        self._in_flight: dict[Hashable, asyncio.Future[T]] = {}
        self._max = max_entries

    def cached(self, key: Hashable, ttl: float) -> T | None:
        hit = self._cache.get(key)
        if hit is not None and self._monotonic() - hit[0] < ttl:
            return hit[1]
        return None

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[T]], ttl: float) -> T:
        hit = self.cached(key, ttl)
        if hit is not None:
            return hit
        flight = self._in_flight.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._fetch(key, fetch))
            self._in_flight[key] = flight
            flight.add_done_callback(functools.partial(self._landed, key))
        # shielded: one caller giving up (a time limit) does not cancel the others' request
        return await asyncio.shield(flight)

    async def _fetch(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        value = await fetch()
        self._cache[key] = (self._monotonic(), value)
        if len(self._cache) > self._max:  # many distinct keys: drop the oldest
            oldest = min(self._cache, key=lambda k: self._cache[k][0])
            self._cache.pop(oldest, None)
        return value

    def _landed(self, key: Hashable, flight: asyncio.Future[Any]) -> None:
        self._in_flight.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # retrieved: a request whose waiters all gave up must not warn later

    def forget(self, key: Hashable) -> None:
        self._cache.pop(key, None)

    def clear(self) -> None:
        self._cache.clear()
