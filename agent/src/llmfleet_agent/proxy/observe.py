"""Reading token counts out of responses as they stream past, without holding the stream back.

Each observer gets every chunk from Ollama and returns what to forward at once. NDJSON and plain JSON pass
through untouched (the observer reads a copy). SSE passes through untouched too, except when the proxy
asked Ollama for a usage chunk the client did not ask for: then each event is forwarded as soon as it is
complete, and that one usage-only event is kept back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

JSON_COPY_LIMIT = 32 * 1024 * 1024  # a non-streamed answer larger than this is forwarded but not read


@dataclass
class Counts:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    # pieces of a streamed answer seen (NDJSON lines, SSE events): about a token each, what a stream cut
    # before its last piece (which carries the counts) is charged
    chunks: int = 0

    def take_native(self, obj: dict[str, Any]) -> None:
        if "prompt_eval_count" in obj:
            self.prompt_tokens = _tokens(obj["prompt_eval_count"], self.prompt_tokens)
        if "eval_count" in obj:
            self.completion_tokens = _tokens(obj["eval_count"], self.completion_tokens)
        if "error" in obj:
            self.error = str(obj["error"])

    def take_openai(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = _tokens(usage.get("prompt_tokens"), self.prompt_tokens)
            if "completion_tokens" in usage:  # absent for embeddings
                self.completion_tokens = _tokens(usage["completion_tokens"], self.completion_tokens)
        error = obj.get("error")
        if error is not None:
            self.error = str(error.get("message", error)) if isinstance(error, dict) else str(error)


def _tokens(value: Any, known: int | None) -> int | None:
    """A token count from the answer (null: 0); one that is not a number leaves what was known (the answer
    is the upstream's, passed on as it is: its odd field is no reason to fail it)."""
    if value is None:
        return 0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return max(0, int(value)) if abs(value) < 2**63 else known
    return known


class Observer(Protocol):
    """`feed` returns what to forward of a chunk; `finish`, at the answer's end, what it held back (a second
    call does nothing). `holds_back`: whether `finish` may return bytes (else it is called after the end has
    gone to the client, which need not wait for the counts to be read)."""

    counts: Counts
    holds_back: bool

    def feed(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


class PassThrough:
    holds_back = False

    def __init__(self) -> None:
        self.counts = Counts()

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b""


class JsonObserver:
    """One JSON document (a non-streamed answer): read when it is complete."""

    holds_back = False

    def __init__(self, openai: bool) -> None:
        self.counts = Counts()
        self._openai = openai
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> bytes:
        self._size += len(chunk)
        if self._size <= JSON_COPY_LIMIT:
            self._parts.append(chunk)
        return chunk

    def finish(self) -> bytes:
        if self._size <= JSON_COPY_LIMIT and self._parts:
            try:
                obj = json.loads(b"".join(self._parts))
            except ValueError:
                return b""
            if isinstance(obj, dict):
                (self.counts.take_openai if self._openai else self.counts.take_native)(obj)
        self._parts = []
        return b""


class NdjsonObserver:
    """Ollama's native stream: the final line (`"done":true`) carries the counts; an error is a line too."""

    holds_back = False

    def __init__(self) -> None:
        self.counts = Counts()
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        self.counts.chunks += chunk.count(b"\n")
        data = self._partial + chunk if self._partial else chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            self._read(line)
        return chunk

    def _read(self, line: bytes) -> None:
        if b'"done":true' in line or b'"done": true' in line or b'"error"' in line:
            try:
                obj = json.loads(line)
            except ValueError:
                return
            if isinstance(obj, dict):
                self.counts.take_native(obj)

    def finish(self) -> bytes:
        if self._partial.strip():
            self._read(self._partial)
        self._partial = b""
        return b""


class SseObserver:
    """OpenAI-style Server-Sent Events (`data: {...}` blocks separated by a blank line)."""

    def __init__(self, strip_usage_event: bool) -> None:
        self.counts = Counts()
        self._strip = strip_usage_event
        self.holds_back = strip_usage_event  # the usage event may come last, without its blank line
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        self.counts.chunks += chunk.count(b"\n\n")
        data = self._pending + chunk if self._pending else chunk
        *events, self._pending = data.split(b"\n\n")
        if not self._strip:
            for event in events:
                self._read(event)
            return chunk
        out = []
        for event in events:
            if not self._read(event):
                out.append(event + b"\n\n")
        return b"".join(out)

    def _read(self, event: bytes) -> bool:
        """Take counts from the event; True when it is a usage-only event that the client did not ask for."""
        if b'"usage"' not in event and b'"error"' not in event:
            return False
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                obj = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(obj, dict):
                self.counts.take_openai(obj)
                return self._strip and obj.get("choices") == [] and obj.get("usage") is not None
        return False

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        if not self._strip:
            if rest.strip():
                self._read(rest)
            return b""
        return b"" if not rest or self._read(rest) else rest


def observer_for(content_type: str, openai: bool, strip_usage_event: bool) -> Observer:
    if content_type.startswith("application/x-ndjson"):
        return NdjsonObserver()
    if content_type.startswith("text/event-stream"):
        return SseObserver(strip_usage_event)
    if content_type.startswith("application/json"):
        return JsonObserver(openai)
    return PassThrough()
