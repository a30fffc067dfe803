"""What every request handler shares: settings, the store, the simulated memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from .residency import Residency
from .settings import Settings
from .store import BlobStore, ModelStore

VERSION = "0.9.0-llmfleet-sim"


@dataclass
class SimState:
    settings: Settings
    store: ModelStore
    blobs: BlobStore
    residency: Residency = field(default_factory=Residency)


STATE = web.AppKey("llmfleet_sim_state", SimState)
