"""Token counts read from the answers as they pass (proxy/observe.py): an odd count never fails an answer."""

from __future__ import annotations

from llmfleet_agent.proxy.observe import observer_for


def test_counts_that_are_not_numbers_are_left_out_and_the_answer_passes() -> None:
    json_answer = b'{"done":true,"prompt_eval_count":"many","eval_count":null}'
    observer = observer_for("application/json", False, False)
    assert observer.feed(json_answer) == json_answer and observer.finish() == b""
    assert (observer.counts.prompt_tokens, observer.counts.completion_tokens) == (None, 0)

    stream = b'{"done":false}\n{"done":true,"prompt_eval_count":7,"eval_count":true}\n'
    observer = observer_for("application/x-ndjson", False, False)
    assert observer.feed(stream) == stream and observer.finish() == b""
    assert (observer.counts.prompt_tokens, observer.counts.completion_tokens) == (7, None)

    sse = b'data: {"choices":[],"usage":{"prompt_tokens":3.0,"completion_tokens":[1]}}\n\n'
    observer = observer_for("text/event-stream", True, False)
    assert observer.feed(sse) == sse and observer.finish() == b""
    assert (observer.counts.prompt_tokens, observer.counts.completion_tokens) == (3, None)
