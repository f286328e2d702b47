"""The collector set-up a serving process applies once start-up is done (core/collector.py)."""

from __future__ import annotations

import gc

import pytest

from gpuherd.core.collector import YOUNG_THRESHOLD, tune_for_serving


@pytest.fixture
def restore_collector():
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_start_up_objects_are_frozen_and_young_threshold_raised(restore_collector):
    gc.unfreeze()
    survivor = [object() for _ in range(10)]  # alive at "start-up": must land in the permanent generation
    state = tune_for_serving()
    assert state.frozen > len(survivor)
    assert gc.get_freeze_count() >= state.frozen      # (another test's server thread may freeze more)
    assert state.thresholds[0] >= YOUNG_THRESHOLD
    assert gc.get_threshold()[0] >= YOUNG_THRESHOLD


def test_cycles_made_after_start_up_are_still_collected(restore_collector):
    tune_for_serving()

    class Node:
        pass
    a, b = Node(), Node()
    a.other, b.other = b, a
    import weakref
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None
