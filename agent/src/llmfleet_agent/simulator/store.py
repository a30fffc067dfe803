"""The simulator's model store: model names, model records and blobs, kept under OLLAMA_MODELS.

Layout: `<OLLAMA_MODELS>/llmfleet-sim/models.json` (every model record, rewritten atomically through a
temporary file and a rename) and `<OLLAMA_MODELS>/llmfleet-sim/blobs/sha256-<hex>` (uploaded blobs).
Nothing is written outside `llmfleet-sim/`, so the directory can sit beside a real Ollama store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

STATE_DIR = "llmfleet-sim"


class StoreError(RuntimeError):
    """The state directory cannot be read or written."""


def now_rfc3339() -> str:
    """The current time in RFC 3339 with microseconds, in UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def name_digest(full_name: str) -> str:
    """The stable digest of a model: the sha256 hex of its full name."""
    return hashlib.sha256(full_name.encode()).hexdigest()


def default_details(quantization: str = "Q4_0") -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "1B",
        "quantization_level": quantization,
    }


@dataclass
class ModelRecord:
    """One model in the store, as /api/tags lists it, plus what /api/create may add."""

    name: str
    modified_at: str
    size: int
    digest: str
    details: dict[str, Any] = field(default_factory=default_details)
    system: str = ""
    template: str = "{{ .Prompt }}"
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fresh(cls, name: str, **extra: Any) -> ModelRecord:
        digest = name_digest(name)
        size = 400_000_000 + int(digest[:8], 16) % 1_200_000_000
        return cls(name=name, modified_at=now_rfc3339(), size=size, digest=digest, **extra)

    def tags_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details,
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ModelStore:
    """Model records in `models.json`, saved atomically after every change."""

    def __init__(self, models_dir: Path) -> None:
        self.root = models_dir / STATE_DIR
        self.path = self.root / "models.json"
        self._models: dict[str, ModelRecord] = {}

    def load(self) -> None:
        """Read the records (none when the file does not exist yet); raises StoreError."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                return
            data = json.loads(self.path.read_text())
            self._models = {m["name"]: ModelRecord.from_json(m) for m in data["models"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"cannot read the model store {self.path}: {exc}") from exc

    def get(self, name: str) -> ModelRecord | None:
        return self._models.get(name)

    def all(self) -> list[ModelRecord]:
        """Every model, the most recently modified first (as `ollama list` shows them)."""
        return sorted(self._models.values(), key=lambda m: m.modified_at, reverse=True)

    def put(self, record: ModelRecord) -> None:
        self._models[record.name] = record
        self._save()

    def remove(self, name: str) -> bool:
        if self._models.pop(name, None) is None:
            return False
        self._save()
        return True

    def _save(self) -> None:
        body = json.dumps({"version": 1, "models": [m.to_json() for m in self.all()]}, indent=2)
        atomic_write(self.path, body.encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class BlobUpload:
    """A blob being received: written to a temporary file while its sha256 is computed."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".upload.", suffix=".tmp")
        self._tmp = Path(tmp_name)
        self._fh: BinaryIO = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        self._sha.update(chunk)

    def finish(self, expected_hex: str, final_path: Path) -> str:
        """Keep the blob if its digest is `expected_hex`; returns the actual hex either way."""
        self._fh.close()
        actual = self._sha.hexdigest()
        if actual == expected_hex:
            self._tmp.replace(final_path)
        else:
            self._tmp.unlink(missing_ok=True)
        return actual

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        self._tmp.unlink(missing_ok=True)


class BlobStore:
    """Blobs under `blobs/sha256-<hex>`."""

    def __init__(self, models_dir: Path) -> None:
        self.root = models_dir / STATE_DIR / "blobs"

    def path(self, hex_digest: str) -> Path:
        return self.root / f"sha256-{hex_digest}"

    def exists(self, hex_digest: str) -> bool:
        return self.path(hex_digest).is_file()

    def upload(self) -> BlobUpload:
        return BlobUpload(self.root)
