"""The toy "model": deterministic answers, token counts, durations and embeddings.

It is not a language model. The answer to a prompt is the prompt's own words, one token per word
("w1", " w2", " w3", ...). A "token" here is a whitespace-separated word, and every count the
simulator reports is a count of such words, so the numbers are exact and easy to check.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

EMBEDDING_DIM = 32
VOCAB_SIZE = 32_000
FALLBACK_WORD = "ok"  # the answer to a prompt without words

# Nominal costs, used where the simulator does no real work to time (nanoseconds).
COLD_LOAD_NS = 25_000_000
WARM_LOAD_NS = 40_000
PROMPT_NS_PER_WORD = 100_000
EVAL_NS_PER_TOKEN = 1_000_000


def words(text: str) -> list[str]:
    return text.split()


def count_words(texts: Iterable[str]) -> int:
    """The prompt_eval_count of these texts: the number of whitespace-separated words in all."""
    return sum(len(words(t)) for t in texts)


def piece(index: int, word: str) -> str:
    """The text of token `index`: the word, with a leading space for every token but the first."""
    return word if index == 0 else f" {word}"


@dataclass(frozen=True)
class Plan:
    """What a generation will emit, decided before the first token."""

    pieces: tuple[str, ...]
    done_reason: str  # "stop" (the answer ended) or "length" (cut by num_predict / max_tokens)
    prompt_eval_count: int


def plan_answer(source: str, counted: Iterable[str], limit: int | None) -> Plan:
    """The answer to `source` (the prompt, or the last user message).

    Its natural length is the number of words in `source` (at least 1); `limit` (num_predict or
    max_tokens; negative means no limit, as in Ollama) cuts it short. Words cycle when more tokens
    are asked for than the source has words (only the one-word fallback does that today).
    """
    vocabulary = words(source) or [FALLBACK_WORD]
    natural = len(vocabulary)
    if limit is not None and 0 <= limit < natural:
        length, reason = limit, "length"
    else:
        length, reason = natural, "stop"
    pieces = tuple(piece(i, vocabulary[i % len(vocabulary)]) for i in range(length))
    return Plan(pieces=pieces, done_reason=reason, prompt_eval_count=count_words(counted))


def token_id(word: str) -> int:
    """A stable fake vocabulary id for a word (for the `context` of /api/generate)."""
    return int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % VOCAB_SIZE


def context_ids(prompt: str, pieces: Iterable[str]) -> list[int]:
    return [token_id(w) for w in words(prompt)] + [token_id(p.strip()) for p in pieces]


@dataclass(frozen=True)
class Timings:
    """Durations of one request, in nanoseconds, as Ollama reports them."""

    load_ns: int
    prompt_eval_ns: int
    eval_ns: int
    total_ns: int

    def native(self) -> dict[str, int]:
        return {
            "total_duration": self.total_ns,
            "load_duration": self.load_ns,
            "prompt_eval_duration": self.prompt_eval_ns,
            "eval_duration": self.eval_ns,
        }


def timings(prompt_count: int, eval_count: int, measured_eval_ns: int, wall_ns: int, cold: bool) -> Timings:
    """Plausible, non-zero durations: measured where time really passed (the token delay), nominal
    costs elsewhere, and a total never less than its parts."""
    load = COLD_LOAD_NS if cold else WARM_LOAD_NS
    prompt_eval = max(1, prompt_count) * PROMPT_NS_PER_WORD
    evaluation = max(measured_eval_ns, max(1, eval_count) * EVAL_NS_PER_TOKEN)
    total = max(wall_ns, load + prompt_eval + evaluation) + 50_000
    return Timings(load_ns=load, prompt_eval_ns=prompt_eval, eval_ns=evaluation, total_ns=total)


def embed(text: str) -> list[float]:
    """A deterministic unit-length vector of EMBEDDING_DIM floats derived from a hash of `text`."""
    raw = b"".join(hashlib.sha256(f"{block}:{text}".encode()).digest() for block in range(4))
    values = [(n / 0xFFFFFFFF) * 2.0 - 1.0 for n in struct.unpack(f">{EMBEDDING_DIM}I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
