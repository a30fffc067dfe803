"""The collector tuned for a server (gc_tuning.py): young collections rarer, start-up's garbage collected
and the rest left out of later collections, cycles made afterwards still collected automatically."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from llmfleet_agent import gc_tuning


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert frozen == 0, "nothing else in the test process freezes objects"
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    gc.enable()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def _garbage_cycle() -> weakref.ref[_Node]:
    node = _Node()
    return weakref.ref(node)  # `node` goes: the cycle is garbage, alive until a collection


async def test_startup_garbage_collected_the_rest_frozen_later_cycles_collected(restored_gc: None) -> None:
    gc_tuning.tune()
    assert gc.get_threshold() == (50_000, 20, 10)
    built_at_start = _Node()
    startup_garbage = _garbage_cycle()
    await gc_tuning.freeze_startup()
    assert startup_garbage() is None  # collected, not frozen for the life of the process
    # in the permanent generation: no collection walks it any more
    assert gc.get_freeze_count() > 0
    assert not any(obj is built_at_start for obj in gc.get_objects())

    # cycles made after start-up are still collected by the collector itself, without an explicit call
    assert gc.isenabled()
    made = [_garbage_cycle() for _ in range(3 * gc_tuning.GEN0_THRESHOLD)]
    assert any(ref() is None for ref in made)
