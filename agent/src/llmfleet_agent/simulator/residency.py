"""Which models are "loaded in memory" (what /api/ps shows), and keep_alive durations."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

FOREVER = math.inf
DEFAULT_KEEP_ALIVE = 300.0
KEEP_ALIVE_ENV = "OLLAMA_KEEP_ALIVE"

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION = re.compile(r"([+-]?)((?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+)")
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_keep_alive(value: object) -> float:
    """Seconds to keep a model loaded; FOREVER for a negative value, 0 to unload at once.

    Accepts what Ollama accepts: a JSON number of seconds, a Go duration string ("5m", "1h30m",
    "-1m"), and (as OLLAMA_KEEP_ALIVE does) a string holding a whole number of seconds ("300", "-1").
    Raises ValueError for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value.strip())
    else:
        raise ValueError(f"invalid keep_alive {value!r}")
    if math.isnan(seconds):
        raise ValueError(f"invalid keep_alive {value!r}")
    return FOREVER if seconds < 0 else seconds


def _parse_duration_text(text: str) -> float:
    if re.fullmatch(r"[+-]?\d+", text):
        return float(int(text))
    if text in {"0", "+0", "-0"}:
        return 0.0
    match = _GO_DURATION.fullmatch(text)
    if not match:
        raise ValueError(f'time: invalid duration "{text}"')
    total = sum(float(number) * _UNITS[unit] for number, unit in _GO_PART.findall(match.group(2)))
    return -total if match.group(1) == "-" else total


@dataclass
class _Resident:
    expires_at: float
    in_flight: int = 0


@dataclass(frozen=True)
class LoadedModel:
    name: str
    expires_at: float  # epoch seconds; FOREVER when kept for ever


class Residency:
    """The simulated memory: models stay "loaded" until their keep_alive runs out."""

    def __init__(self) -> None:
        self._models: dict[str, _Resident] = {}

    def begin(self, name: str, keep_alive: float) -> bool:
        """A request starts using `name`; True when the model had to be loaded (a cold start)."""
        now = time.time()
        self._expire(now)
        resident = self._models.get(name)
        cold = resident is None
        if resident is None:
            resident = self._models[name] = _Resident(expires_at=now + keep_alive)
        resident.in_flight += 1
        return cold

    def end(self, name: str, keep_alive: float) -> None:
        """A request is done with `name`; it stays loaded for `keep_alive` seconds (0: unloaded now)."""
        resident = self._models.get(name)
        if resident is None:
            return
        resident.in_flight = max(0, resident.in_flight - 1)
        resident.expires_at = time.time() + keep_alive
        if keep_alive <= 0 and resident.in_flight == 0:
            del self._models[name]

    def load(self, name: str, keep_alive: float) -> bool:
        """Load without generating (an empty prompt); True when it was a cold start."""
        cold = self.begin(name, keep_alive)
        self.end(name, keep_alive)
        return cold

    def unload(self, name: str) -> None:
        self._models.pop(name, None)

    def loaded(self) -> list[LoadedModel]:
        """The models in memory now, soonest to expire last (Ollama lists the newest first)."""
        self._expire(time.time())
        models = [LoadedModel(name, r.expires_at) for name, r in self._models.items()]
        return sorted(models, key=lambda m: m.expires_at, reverse=True)

    def _expire(self, now: float) -> None:
        for name in [n for n, r in self._models.items() if r.in_flight == 0 and r.expires_at <= now]:
            del self._models[name]
