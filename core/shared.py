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
        self._generation = 0       # bumped by forget/clear: a fetch begun before is not kept

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[T]], ttl: float, *,
                  stale: float = 0.0) -> T:
        """The result for `key`: reused while younger than `ttl`; for `stale` seconds more it is
        still answered at once while one fetch renews it in the background (a page polled by a
        hundred clients never has them all wait for its rebuild); when older, never fetched or
        forgotten, callers wait for the one fetch in flight."""
        hit = self._cache.get(key)
        if hit is not None:
            age = self._monotonic() - hit[0]
            if age < ttl:
                return hit[1]
            if age < ttl + stale:
                self._flight(key, fetch)
                return hit[1]
        # shielded: one caller giving up (a time limit) does not cancel the others' request
        return await asyncio.shield(self._flight(key, fetch))

    def _flight(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        flight = self._in_flight.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._fetch(key, fetch, self._generation))
            self._in_flight[key] = flight
            flight.add_done_callback(functools.partial(self._landed, key))
        return flight

    async def _fetch(self, key: Hashable, fetch: Callable[[], Awaitable[T]], generation: int) -> T:
        value = await fetch()
        if generation == self._generation:     # nothing was forgotten meanwhile: keep it
            self._cache[key] = (self._monotonic(), value)
            if len(self._cache) > self._max:  # many distinct keys: drop the oldest
                oldest = min(self._cache, key=lambda k: self._cache[k][0])
                self._cache.pop(oldest, None)
        return value

    def _landed(self, key: Hashable, flight: asyncio.Future[Any]) -> None:
        if self._in_flight.get(key) is flight:
            del self._in_flight[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: a request whose waiters all gave up must not warn later

    def forget(self, key: Hashable) -> None:
        """`key`'s result is out of date: the next caller fetches anew (not joining a fetch
        begun before, whose answer may predate the change, and which will not be kept)."""
        self._cache.pop(key, None)
        self._in_flight.pop(key, None)
        self._generation += 1

    def clear(self) -> None:
        self._cache.clear()
        self._in_flight.clear()
        self._generation += 1

    async def aclose(self) -> None:
        """Forget everything and cancel the fetches in flight, waiting until they have stopped: a
        fetch that outlived its callers (one gave up on a time limit) must not go on against
        clients its owner is about to close."""
        flights = list(self._in_flight.values())
        self.clear()
        for flight in flights:
            flight.cancel()
        if flights:
            await asyncio.gather(*flights, return_exceptions=True)
