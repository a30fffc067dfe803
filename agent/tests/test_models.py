"""Model names as Ollama reads them, and how a key's patterns match them."""

from __future__ import annotations

import pytest

from llmfleet_agent.keys import model_matches, normalize_pattern
from llmfleet_agent.models import MAX_RECORDED_NAME, InvalidName, parse_name, recorded_model

LIMITED = (normalize_pattern("tinyllama*"), normalize_pattern("team/*"))


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("tinyllama", True),
        ("tinyllama:1b", True),
        ("registry.ollama.ai/library/tinyllama:latest", True),  # Ollama's long form of the same model
        ("library/tinyllama", True),
        ("TinyLlama", True),  # Ollama finds an existing model without regard to case
        ("team/coder:7b", True),
        ("secret", False),
        ("other/tinyllama", False),
        # Ollama's parser takes what precedes :// as a scheme it then ignores: this is `secret`
        ("tinyllama://registry.ollama.ai/library/secret", False),
        ("tinyllama secret", False),
        ("tinyllama/../secret", False),
        ("a/b/c/d", False),
    ],
)
def test_patterns_match_the_model_ollama_would_use(name: str, allowed: bool) -> None:
    assert model_matches(LIMITED, name) is allowed
    assert model_matches((), name)  # an unlimited key: every name


@pytest.mark.parametrize(
    "name",
    ["tinyllama://registry.ollama.ai/library/secret", "", " ", "a b", "x" * 81, "m@sha256:00", "a/b/c/d"],
)
def test_names_outside_the_grammar_are_invalid(name: str) -> None:
    with pytest.raises(InvalidName):
        parse_name(name)


def test_recorded_names_always_store() -> None:
    assert recorded_model("registry.ollama.ai/library/tinyllama") == "tinyllama:latest"
    assert recorded_model("  tinyllama  ") == "tinyllama:latest"
    lone = recorded_model("tinyllama\ud800")
    assert "\ufffd" in lone
    lone.encode()  # a lone surrogate would fail here, and in the store
    assert len(recorded_model("x" * 5000)) == MAX_RECORDED_NAME
