"""The garbage collector tuned for a server: what start-up built is left alone, and collections are rarer.

CPython's cycle collector runs its youngest generation every 700 net allocations (a proxied request makes
several hundred objects: a collection every request or two), and each full collection walks every object
the process holds, most of them the modules, configuration and caches built at start-up that live as long
as the process. Once the server has started, `freeze()` moves all of those to a permanent generation no
collection visits, and a higher threshold makes the young collections rarer (each one finds the same few
cycles a request leaves, so the work per request falls). The objects a request makes are freed by their
reference counts as before; only cycles wait longer, at most GEN0_THRESHOLD allocations.
"""

from __future__ import annotations

import gc
from typing import Any

GEN0_THRESHOLD = 50_000  # net allocations between young collections (CPython's default: 700)
GEN1_THRESHOLD, GEN2_THRESHOLD = 20, 10


def tune() -> None:
    """At start: young collections rarer."""
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)


async def freeze_startup(_app: Any = None) -> None:
    """Once the server has started (an aiohttp on_startup hook, after the cleanup contexts): what start-up
    made is collected once, then left out of every later collection."""
    gc.collect()
    gc.freeze()
