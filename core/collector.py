"""CPython's cyclic garbage collector, set up for a long-running gpuherd process.

Why this exists: `bench/bench_loop_lag.py` showed that almost every event-loop stall over 50 ms
was a full (generation 2) collection. A collection stops every thread, the loop's included, and a
full one walks every container object the process holds: about 150,000 right after start-up
(modules, classes, pydantic validators, SQLAlchemy mappers, the template catalogue), so each one
paused the loop for 60-110 ms however small the request that happened to set it off.

Decisions:

- Once start-up is done (migrations, providers, templates, the first reconcile), collect once and
  `gc.freeze()`: what survived moves to the permanent generation, which later collections never
  walk. Those objects live as long as the process anyway; freezing them only saves the walk.
- The first generation's threshold rises from 700 to 10,000 allocations, so a burst of requests
  that each build a few thousand short-lived rows and views frees them by reference counting
  before a collection looks at them; the older generations keep their default ratios.
- Only serving processes (the shell, `gpuherd guards --run`, `gpuherd serve`) opt in, through
  `Runtime(tune_collector=True)`: a library user's process and the test suite keep CPython's
  defaults. Applying it twice is harmless (the second freeze adds what start-up left since).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

YOUNG_THRESHOLD = 10_000


@dataclass(frozen=True)
class CollectorState:
    frozen: int                    # objects in the permanent generation
    thresholds: tuple[int, int, int]


def tune_for_serving() -> CollectorState:
    """Freeze what start-up left alive and raise the young threshold (see the module docstring)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(max(YOUNG_THRESHOLD, gc.get_threshold()[0]), middle, old)
    return CollectorState(gc.get_freeze_count(), gc.get_threshold())
