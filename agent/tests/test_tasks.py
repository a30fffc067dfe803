"""How a background task ends (tasks.cancel)."""

from __future__ import annotations

import asyncio

from llmfleet_agent.tasks import cancel


def part(ended: asyncio.Event) -> asyncio.Task[None]:
    async def loop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.set()

    return asyncio.create_task(loop())


async def test_a_task_is_cancelled_and_awaited() -> None:
    ended = asyncio.Event()
    task = part(ended)
    await asyncio.sleep(0)
    await cancel(task)
    assert task.cancelled() and ended.is_set()
    await cancel(task)  # again: nothing to do
    await cancel(None)


async def test_a_cleanup_in_a_cancelled_task_still_ends_the_part() -> None:
    """aiohttp runs SIGTERM's cleanups in its main task after cancelling it: a part's stop there must
    still wait for the part's end and return, or the cleanups after it (the last records) never run."""
    ended = asyncio.Event()
    task = part(ended)

    async def shutdown() -> str:
        me = asyncio.current_task()
        assert me is not None
        me.cancel()
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            await cancel(task)
            return "the next cleanup runs"
        return "not cancelled"

    assert await asyncio.create_task(shutdown()) == "the next cleanup runs"
    assert ended.is_set()
