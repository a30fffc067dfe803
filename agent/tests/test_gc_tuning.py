"""The collector tuned for a server (gc_tuning.py): young collections rarer, start-up left out of them, and
cycles made afterwards still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from llmfleet_agent import gc_tuning


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


async def test_startup_objects_are_frozen_and_later_cycles_still_collected(restored_gc: None) -> None:
    gc_tuning.tune()
    assert gc.get_threshold() == (
        gc_tuning.GEN0_THRESHOLD,
        gc_tuning.GEN1_THRESHOLD,
        gc_tuning.GEN2_THRESHOLD,
    )
    built_at_start = _Node()
    await gc_tuning.freeze_startup()
    # in the permanent generation: no collection walks it any more
    assert gc.get_freeze_count() > 0
    assert not any(obj is built_at_start for obj in gc.get_objects())

    garbage = _Node()
    gone = weakref.ref(garbage)
    del garbage
    gc.collect()  # a full collection, as the tuned thresholds make one eventually
    assert gone() is None  # a cycle made after start-up is freed
