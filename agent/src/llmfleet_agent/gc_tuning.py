"""The garbage collector tuned for a server: what start-up built is left alone, and collections are rarer.

CPython's cycle collector runs its youngest generation every 700 net allocations of container objects,
every tenth of those the middle one, and now and then a full collection that walks every object the
process holds: most of them the modules, configuration and caches built at start-up (about 70,000 in
the agent), which live as long as the process. Once every part has started, `freeze_startup` collects
once and moves all of them to a permanent generation no collection visits again; `tune` makes young
collections rarer. Measured (docs/performance.md): 5-13% less CPU a request at concurrency 64, nothing
visible at concurrency 1, where a collection came only about every 27 requests anyway.

What it costs: objects that reference counting frees (nearly everything a request makes) are freed as
before. Garbage cycles wait longer: up to GEN0_THRESHOLD net allocations when they die young, up to about
GEN0_THRESHOLD x GEN1_THRESHOLD when they were alive at a young collection. The bound is a count of
objects; a request here leaves next to no cycles (a probe with DEBUG_SAVEALL found none per request). A
young collection walks up to GEN0_THRESHOLD objects: about a millisecond, rarely.
"""

from __future__ import annotations

import gc
from typing import Any

GEN0_THRESHOLD = 50_000  # net allocations between young collections (CPython's default: 700)
GEN1_THRESHOLD, GEN2_THRESHOLD = 20, 10  # young collections per middle one; middle ones per full one


def tune() -> None:
    """At start: young collections rarer."""
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)


async def freeze_startup(_app: Any = None) -> None:
    """The last on_startup hook (after the cleanup contexts, before the server listens): start-up's
    garbage collected, and the rest left out of every later collection."""
    gc.collect()
    gc.freeze()
