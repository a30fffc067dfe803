"""Request bodies read as Go's encoding/json reads them: one rule for the agent's checks and the simulator."""

from __future__ import annotations

import json

import pytest

from llmfleet_agent.gojson import BodyError, GoObject, go_fold, loads_object

KELVIN = "\u212a"  # folds to k
LONG_S = "\u017f"  # folds to s


def test_keys_match_fields_without_regard_to_case() -> None:
    body = loads_object(b'{"MoDeL": "tinyllama"}')
    assert body.get("model") == "tinyllama" and "model" in body and body["model"] == "tinyllama"
    assert body.count("model") == 1


def test_the_last_of_a_repeated_field_wins_under_any_case() -> None:
    body = loads_object(b'{"model": "allowed", "Model": "forbidden"}')
    assert body.get("model") == "forbidden" and body.count("model") == 2
    exact_twice = loads_object(b'{"model": "a", "Model": "b", "model": "c"}')
    assert exact_twice.get("model") == "c" and exact_twice.count("model") == 3


def test_unicode_simple_folding_as_go() -> None:
    # Go folds the Kelvin sign to k and the long s to s: both name ASCII fields
    assert go_fold(f"{KELVIN}eep_alive") == go_fold("keep_alive")
    assert go_fold(f"{LONG_S}ource") == go_fold("source")
    body = loads_object(json.dumps({"source": "a", f"{LONG_S}ource": "b"}).encode())
    assert body.get("source") == "b" and body.count("source") == 2
    # the dotted capital I and the dotless i have no simple folding to i in Go: nor here
    assert go_fold("\u0130d") != go_fold("id")
    assert go_fold("\u0131nclude_usage") != go_fold("include_usage")
    assert go_fold("m\u00f6del") != go_fold("model")


def test_exact_keys_are_what_is_forwarded() -> None:
    body = loads_object(b'{"Model": "x", "options": {"Temperature": 1}}')
    assert list(body) == ["Model", "options"]
    assert json.loads(json.dumps(body)) == {"Model": "x", "options": {"Temperature": 1}}
    assert body.without("model") == {"options": {"Temperature": 1}}
    assert isinstance(body.get("options"), GoObject)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 1000 + b"]" * 1000, "nested too deeply"),
        (b'{"a":' * 1000 + b"1" + b"}" * 1000, "nested too deeply"),
        (b'{"model": ', "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_bodies_are_body_errors(raw: bytes, message: str) -> None:
    with pytest.raises(BodyError, match=message):
        loads_object(raw)
