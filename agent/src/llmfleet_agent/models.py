"""Model names and blob digests as Ollama understands them: one grammar for the agent and the simulator.

A name is `[host/][namespace/]model[:tag]`; a missing tag means `latest`, and the default registry and
namespace (`registry.ollama.ai/library/`) are dropped when shown, as Ollama shows names. A digest names a
blob: `sha256:<hex>` (or `sha256-<hex>`, as Ollama writes blob file names).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"

_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*(?::\d{1,5})?")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,79}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
_SURROGATE = re.compile("[\ud800-\udfff]")
# what a record or a log keeps of a name that is not a valid one
MAX_RECORDED_NAME = 200
# names up to this long are parsed once and remembered (the same few names come with every request)
_CACHED_NAME = 256


class InvalidName(ValueError):
    """A model name that Ollama would refuse."""


@dataclass(frozen=True)
class ModelName:
    """A parsed `[host/][namespace/]name[:tag]`; the tag defaults to `latest`."""

    path: str  # what comes before the tag, without the default registry and namespace
    tag: str

    @property
    def full(self) -> str:
        return f"{self.path}:{self.tag}"

    @property
    def base(self) -> str:
        """The bare model name: no host, namespace or tag."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def namespace(self) -> str:
        parts = self.path.split("/")
        return parts[-2] if len(parts) > 1 else DEFAULT_NAMESPACE


def parse_name(raw: str) -> ModelName:
    """Parse and normalise a model name; raises InvalidName."""
    return _parse_cached(raw) if len(raw) <= _CACHED_NAME else _parse(raw)


@functools.lru_cache(maxsize=1024)
def _parse_cached(raw: str) -> ModelName:
    return _parse(raw)  # a refused name raises: it is not remembered


def _parse(raw: str) -> ModelName:
    text = raw.strip()
    parts = text.split("/")
    if not text or len(parts) > 3:
        raise InvalidName(f"invalid model name {raw!r}")
    last = parts[-1]
    name, _, tag = last.partition(":")
    tag = tag or "latest"
    if len(parts) == 3 and not _HOST.fullmatch(parts[0]):
        raise InvalidName(f"invalid model name {raw!r}")
    namespaces = parts[1:-1] if len(parts) == 3 else parts[:-1]
    if not all(_PART.fullmatch(p) for p in [*namespaces, name]) or not _TAG.fullmatch(tag):
        raise InvalidName(f"invalid model name {raw!r}")
    if len(parts) == 3 and parts[0] == DEFAULT_REGISTRY:
        parts = parts[1:]
    if len(parts) == 2 and parts[0] == DEFAULT_NAMESPACE:
        parts = parts[1:]
    return ModelName(path="/".join([*parts[:-1], name]), tag=tag)


def normalize_model(name: str) -> str:
    """`llama3` -> `llama3:latest`; a name with a tag is returned as it is."""
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"


def recorded_model(name: str) -> str:
    """The name as a usage record or a log keeps it: Ollama's own form of a valid name; anything else
    cut to MAX_RECORDED_NAME characters, lone surrogates replaced (as Go decodes them), so it stores."""
    try:
        return parse_name(name).full
    except InvalidName:
        pass
    text = _SURROGATE.sub("\ufffd", name.strip())
    return text if len(text) <= MAX_RECORDED_NAME else text[: MAX_RECORDED_NAME - 1] + "…"


def parse_digest(text: str) -> str | None:
    """The hex of `sha256:<hex>` (or `sha256-<hex>`), or None if it is not one."""
    match = _DIGEST.fullmatch(text)
    return match.group(1) if match else None
