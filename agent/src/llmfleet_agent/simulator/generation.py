"""Running one generation: tokens emitted one by one with the token delay, the exit-mid-stream fault,
the model marked as loaded, and the generation stopped when the client goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from .faults import Faults, die
from .httpio import ClientGone, EventStream, client_gone
from .logs import log
from .state import SimState
from .toymodel import Plan, Timings, timings

PieceSink = Callable[[int, str], Awaitable[None]]


@dataclass(frozen=True)
class Result:
    pieces: list[str]
    done_reason: str
    prompt_eval_count: int
    timings: Timings

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def eval_count(self) -> int:
        return len(self.pieces)


class Channel:
    """Where the pieces go: a stream (sent at once) or nowhere yet (a non-streamed answer)."""

    def __init__(self, request: web.Request, stream: EventStream | None, sink: PieceSink | None) -> None:
        self._request = request
        self._stream = stream
        self._sink = sink

    @classmethod
    def streaming(cls, stream: EventStream, sink: PieceSink) -> Channel:
        return cls(stream.request, stream, sink)

    @classmethod
    def collecting(cls, request: web.Request) -> Channel:
        return cls(request, None, None)

    async def piece(self, index: int, text: str) -> None:
        if self._sink is not None:
            await self._sink(index, text)

    async def flush(self) -> None:
        if self._stream is not None:
            await self._stream.flush()

    def gone(self) -> bool:
        return client_gone(self._request)


async def _emit(plan: Plan, faults: Faults, channel: Channel) -> tuple[list[str], int]:
    """Emit the plan's pieces; returns them and the nanoseconds it took."""
    emitted: list[str] = []
    started = time.perf_counter_ns()
    for index, text in enumerate(plan.pieces):
        await asyncio.sleep(faults.token_delay)  # sleep(0) still lets other requests run
        if channel.gone():
            raise ClientGone
        await channel.piece(index, text)
        emitted.append(text)
        if faults.exit_after_tokens == index + 1:
            await channel.flush()
            die(f"exit after {index + 1} tokens (LLMFLEET_SIM_EXIT_AFTER_TOKENS)")
    return emitted, time.perf_counter_ns() - started


async def run_generation(
    state: SimState, model: str, keep_alive: float, plan: Plan, channel: Channel
) -> Result:
    """Generate `plan` with `model` loaded for the duration; raises ClientGone if the client left."""
    started = time.perf_counter_ns()
    cold = state.residency.begin(model, keep_alive)
    try:
        pieces, eval_ns = await _emit(plan, state.settings.faults, channel)
    except ClientGone:
        log.info("client disconnected, generation cancelled")
        raise
    except asyncio.CancelledError:
        log.info("server stopping, generation cancelled")
        raise
    finally:
        state.residency.end(model, keep_alive)
    wall_ns = time.perf_counter_ns() - started
    return Result(
        pieces=pieces,
        done_reason=plan.done_reason,
        prompt_eval_count=plan.prompt_eval_count,
        timings=timings(plan.prompt_eval_count, len(pieces), eval_ns, wall_ns, cold),
    )
