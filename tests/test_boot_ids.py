"""Two boots at once that draw the same short instance id (each checked it free before either
inserted: with 10,000 rows and 100 concurrent boots, bench_loop_lag hit it) both boot, each under
an id of its own; before, the loser read the primary-key clash as a double click on its own
idempotency key and gave up after five seconds with "still in progress"."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from gpuherd.core import lifecycle
from gpuherd.core.results import BootResult


@pytest.mark.parametrize("detach", [False, True])
async def test_a_clash_of_fresh_ids_gives_each_boot_its_own(service, admin, monkeypatch, detach):
    original = lifecycle.fresh_id
    drawn = itertools.count()

    def clashing(s):
        return "g-dead" if next(drawn) < 2 else original(s)    # both see g-dead free, as in the race
    monkeypatch.setattr(lifecycle, "fresh_id", clashing)
    results = await asyncio.wait_for(asyncio.gather(*(service.boot(admin, "budget", detach=detach)
                                                      for _ in range(2))), 4)
    assert all(isinstance(r, BootResult) for r in results)
    ids = {r.instance.id for r in results}
    assert len(ids) == 2 and "g-dead" in ids
    assert next(drawn) >= 3                                    # the loser drew again
    page = await service.status(admin, refresh=False)
    assert ids <= {v.id for v in page.instances}
