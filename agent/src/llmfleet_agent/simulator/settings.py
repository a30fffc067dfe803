"""The simulator's settings: where to listen, where the store is, keep-alive, speed and faults.

Read like `ollama serve` reads them (OLLAMA_HOST, OLLAMA_MODELS, OLLAMA_KEEP_ALIVE), plus the
simulator's own switches (see faults.py). A bad value raises SettingError naming the variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .faults import FaultFlags, Faults, SettingError, faults_from
from .residency import DEFAULT_KEEP_ALIVE, KEEP_ALIVE_ENV, parse_keep_alive

HOST_ENV = "OLLAMA_HOST"
MODELS_ENV = "OLLAMA_MODELS"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    models_dir: Path
    keep_alive: float  # seconds; residency.FOREVER for ever
    faults: Faults


def parse_host(raw: str) -> tuple[str, int]:
    """`host:port`, `http://host:port`, a bare host, `:port` or `[v6]:port`, as OLLAMA_HOST takes them."""
    text = raw.strip()
    for scheme in ("http://", "https://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
    text = text.split("/", 1)[0]
    if not text:
        return DEFAULT_HOST, DEFAULT_PORT
    host, port_text = _split_host_port(text)
    if port_text is None:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or int(port_text) > 65535:
        raise SettingError(f"{HOST_ENV} has a bad port {port_text!r} (in {raw!r})")
    # an empty host (":11434") means every interface, as for Ollama
    return host or "0.0.0.0", int(port_text)


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise SettingError(f"{HOST_ENV} is not host:port: {text!r}")
        return host, (rest[1:] if rest else None)
    if text.count(":") > 1:  # a bare IPv6 address
        return text, None
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def load_settings(env: Mapping[str, str], flags: FaultFlags) -> Settings:
    host, port = parse_host(env.get(HOST_ENV, ""))
    models = env.get(MODELS_ENV, "").strip()
    models_dir = Path(models).expanduser() if models else Path.home() / ".ollama" / "models"
    keep_alive = DEFAULT_KEEP_ALIVE
    if raw := env.get(KEEP_ALIVE_ENV, "").strip():
        try:
            keep_alive = parse_keep_alive(raw)
        except ValueError:
            raise SettingError(
                f"{KEEP_ALIVE_ENV} must be a duration like 5m, 30s or -1, got {raw!r}"
            ) from None
    return Settings(
        host=host, port=port, models_dir=models_dir, keep_alive=keep_alive, faults=faults_from(env, flags)
    )
