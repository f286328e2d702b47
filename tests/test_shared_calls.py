"""core.shared.SharedCalls: one fetch for many callers, reuse for `ttl`, answered at once while a
background fetch renews it for `stale` seconds more, and nothing fetched before a `forget` is kept
or joined after it (a page built before a change must not be answered after the change)."""

from __future__ import annotations

import asyncio

import pytest

from gpuherd.core.shared import SharedCalls


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Source:
    """A fetch that counts its calls and waits for `release` before answering."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()
        self.fail = False

    async def __call__(self) -> int:
        self.calls += 1
        n = self.calls
        await self.release.wait()
        if self.fail:
            raise RuntimeError("provider down")
        return n


async def test_within_ttl_one_fetch_serves_everyone() -> None:
    clock, src = Clock(), Source()
    shared: SharedCalls[int] = SharedCalls(clock)
    got = await asyncio.gather(*(shared.get("k", src, 1.0) for _ in range(50)))
    assert got == [1] * 50 and src.calls == 1
    clock.t = 0.9
    assert await shared.get("k", src, 1.0) == 1 and src.calls == 1
    clock.t = 1.1                                     # no stale window: the caller waits for a new one
    assert await shared.get("k", src, 1.0) == 2 and src.calls == 2


async def test_a_stale_answer_is_given_at_once_while_one_fetch_renews_it() -> None:
    clock, src = Clock(), Source()
    shared: SharedCalls[int] = SharedCalls(clock)
    assert await shared.get("k", src, 1.0, stale=1.0) == 1
    clock.t = 1.5
    src.release.clear()                               # the renewal hangs: callers must not
    got = await asyncio.wait_for(asyncio.gather(*(shared.get("k", src, 1.0, stale=1.0) for _ in range(30))), 1)
    assert got == [1] * 30 and src.calls == 2        # one renewal for all thirty
    src.release.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await shared.get("k", src, 1.0, stale=1.0) == 2 and src.calls == 2


async def test_past_the_stale_window_callers_wait_and_see_the_error() -> None:
    clock, src = Clock(), Source()
    shared: SharedCalls[int] = SharedCalls(clock)
    assert await shared.get("k", src, 1.0, stale=1.0) == 1
    src.fail = True
    clock.t = 1.2
    assert await shared.get("k", src, 1.0, stale=1.0) == 1      # renewal fails in the background
    await asyncio.sleep(0)
    clock.t = 2.5
    with pytest.raises(RuntimeError, match="provider down"):
        await shared.get("k", src, 1.0, stale=1.0)


async def test_a_fetch_begun_before_forget_is_neither_joined_nor_kept() -> None:
    clock, src = Clock(), Source()
    shared: SharedCalls[int] = SharedCalls(clock)
    src.release.clear()
    before = asyncio.ensure_future(shared.get("k", src, 1.0))    # fetch 1, in flight
    await asyncio.sleep(0)
    shared.forget("k")                                            # a change lands meanwhile
    after = asyncio.ensure_future(shared.get("k", src, 1.0))     # must not join fetch 1
    await asyncio.sleep(0)
    src.release.set()
    assert await before == 1 and await after == 2 and src.calls == 2
    assert await shared.get("k", src, 1.0) == 2 and src.calls == 2   # fetch 1's answer was not kept


async def test_clear_forgets_every_key_and_every_flight() -> None:
    clock, src = Clock(), Source()
    shared: SharedCalls[int] = SharedCalls(clock)
    assert await shared.get("a", src, 10.0) == 1
    src.release.clear()
    flight = asyncio.ensure_future(shared.get("b", src, 10.0))
    await asyncio.sleep(0)
    shared.clear()
    src.release.set()
    assert await flight == 2
    assert await shared.get("a", src, 10.0) == 3 and await shared.get("b", src, 10.0) == 4


async def test_aclose_cancels_a_fetch_its_callers_gave_up_on() -> None:
    clock, src = Clock(), Source()
    shared: SharedCalls[int] = SharedCalls(clock)
    src.release.clear()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(shared.get("k", src, 1.0), 0.01)   # the caller gives up; the fetch goes on
    flight = next(iter(shared._in_flight.values()))
    assert not flight.done()
    await asyncio.wait_for(shared.aclose(), 1)
    assert flight.cancelled() and not shared._in_flight
