"""Idle accounting and the atomic drain, on a clock the test controls."""

from __future__ import annotations

from llmfleet_agent.activity import Activity


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Activity, Clock]:
    clock = Clock()
    return Activity(monotonic=clock, wall=clock), clock


def test_idle_grows_and_is_zero_while_in_flight() -> None:
    activity, clock = make()
    clock.now += 30
    assert activity.idle_seconds() == 30
    assert activity.try_begin()
    clock.now += 100
    assert activity.idle_seconds() == 0  # busy, however long it takes
    activity.end()
    clock.now += 5
    assert activity.idle_seconds() == 5  # counted from when the request finished


def test_drain_if_idle_for_refuses_when_not_idle_long_enough() -> None:
    activity, clock = make()
    clock.now += 10
    drained, figures = activity.drain(if_idle_for=60)
    assert not drained
    assert not activity.draining
    assert figures.idle_seconds == 10
    assert activity.try_begin()  # still admitting work
    activity.end()


def test_drain_refuses_while_in_flight_even_after_long_idle() -> None:
    activity, clock = make()
    clock.now += 3600
    assert activity.try_begin()
    drained, figures = activity.drain(if_idle_for=0)
    assert not drained and figures.inflight == 1


def test_drain_then_refuse_new_work_then_resume() -> None:
    activity, clock = make()
    clock.now += 120
    drained, figures = activity.drain(if_idle_for=60)
    assert drained and figures.draining
    assert not activity.try_begin()  # nothing slips in after the decision
    assert activity.inflight == 0
    clock.now += 50
    activity.resume()
    assert not activity.draining
    assert activity.idle_seconds() == 0  # idle counts again from the resume
    assert activity.try_begin()


def test_unconditional_drain_lets_in_flight_work_finish() -> None:
    activity, _ = make()
    assert activity.try_begin()
    drained, figures = activity.drain()
    assert drained and figures.inflight == 1
    activity.end()
    assert activity.inflight == 0
