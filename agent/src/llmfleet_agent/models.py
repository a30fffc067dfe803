"""Model names as Ollama understands them: `name:tag`, where a missing tag means `latest`."""

from __future__ import annotations


def normalize_model(name: str) -> str:
    """`llama3` -> `llama3:latest`; a name with a tag is returned as it is."""
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"
