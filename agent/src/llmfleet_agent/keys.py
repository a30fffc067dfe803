"""API keys: generated at random, shown once, stored only as a SHA-256 hash.

A key's id is the first 16 hex digits of its hash, so the same key given to many hosts has the same id
on each (usage records line up), and an id says nothing usable about the secret. Keys are high-entropy
(at least 32 characters), so a fast hash is the right one: no salt or stretching to slow down the proxy.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .models import InvalidName, normalize_model, parse_name
from .roles import Role

KEY_PREFIX = "llmf_"
# a personal key's stored hash carries this prefix: an agent that knows no personal keys (an older version
# on the same database) matches none of them, so it cannot honour a key it could not suspend
PERSONAL_HASH_PREFIX = "p:"
MIN_KEY_LENGTH = 32
ID_LENGTH = 16


def generate_secret() -> str:
    """A new key: 32 random bytes, URL-safe base64, with a prefix that secret scanners can spot."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id_for(secret: str) -> str:
    return hash_secret(secret)[:ID_LENGTH]


def validate_secret(secret: str) -> str:
    secret = secret.strip()
    if len(secret) < MIN_KEY_LENGTH:
        raise ValueError(f"a key must be at least {MIN_KEY_LENGTH} characters (got {len(secret)})")
    if any(ch.isspace() for ch in secret):
        raise ValueError("a key must not contain whitespace")
    return secret


def model_matches(patterns: tuple[str, ...], model: str) -> bool:
    """True when no patterns limit the key, or one of them matches the model.

    The model is taken in Ollama's own form (`name:tag`, the default registry and namespace dropped), and
    matched without regard to case, as Ollama finds an existing model; a name Ollama would refuse
    matches no pattern. Patterns are `name:tag` globs.
    """
    if not patterns:
        return True
    try:
        name = parse_name(model).full.lower()
    except InvalidName:
        return False
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in patterns)


def normalize_pattern(pattern: str) -> str:
    """`llama3` -> `llama3:latest`; `llama3*` and `llama3:*` stay as they are."""
    if any(ch in pattern for ch in "*?[") or ":" in pattern.rsplit("/", 1)[-1]:
        return pattern
    return normalize_model(pattern)


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    role: Role
    hash: str
    models: tuple[str, ...] = ()
    created: float = field(default_factory=time.time)
    expires: float | None = None
    revoked: float | None = None
    last_used: float | None = None
    # per-key limits; None: the config's defaults
    max_concurrent: int | None = None
    rpm: int | None = None
    # a personal key (minted by a directory user): its owner's immutable id (objectGUID) and UPN; its
    # role and models are the owner's current group rights, which revalidation keeps up to date
    owner_id: str | None = None
    owner: str | None = None
    # why a personal key is refused for now (the account is disabled, locked, gone, no longer entitled);
    # revalidation sets and clears it
    suspended: str | None = None
    # when the directory last confirmed the owner's account (a personal key past auth.ldap.max_stale
    # without a confirmation is refused)
    checked: float | None = None
    # the key of a frontend (Open WebUI) that names its end user per request in forwarded headers: the
    # usage record (and budgets) go to that person (frontend.py); any other key's such headers are ignored
    frontend: bool = False
    # the fleet's gateway's key: its requests may act for the caller the gateway authenticated, named in
    # X-Llmfleet-* headers (gateway_identity.py), accepted only from auth.gateway_sources
    gateway: bool = False

    @classmethod
    def new(
        cls,
        secret: str,
        name: str,
        role: Role,
        models: tuple[str, ...] = (),
        ttl: float | None = None,
        max_concurrent: int | None = None,
        rpm: int | None = None,
        frontend: bool = False,
        gateway: bool = False,
    ) -> KeyRecord:
        now = time.time()
        return cls(
            id=key_id_for(secret),
            name=name,
            role=role,
            hash=hash_secret(secret),
            models=tuple(normalize_pattern(p) for p in models),
            created=now,
            expires=None if ttl is None else now + ttl,
            max_concurrent=max_concurrent,
            rpm=rpm,
            frontend=frontend,
            gateway=gateway,
        )

    def matches(self, secret: str) -> bool:
        return self.matches_hash(hash_secret(secret))

    def matches_hash(self, digest: str) -> bool:
        """`digest`: hash_secret of the secret presented (computed once per request: its id is a prefix)."""
        return hmac.compare_digest(digest, self.hash.removeprefix(PERSONAL_HASH_PREFIX))

    def refusal(self, now: float | None = None) -> str | None:
        """Why this key may not be used now, or None."""
        now = time.time() if now is None else now
        if self.revoked is not None:
            return f"key {self.id} was revoked"
        if self.expires is not None and now >= self.expires:
            return f"key {self.id} expired"
        if self.suspended is not None:
            return f"key {self.id}: {self.suspended}"
        return None

    @property
    def personal(self) -> bool:
        return self.owner_id is not None

    def same_grant(self, other: KeyRecord) -> bool:
        return self._grant() == other._grant()

    def _grant(self) -> tuple[object, ...]:
        return (
            self.name,
            self.role,
            self.models,
            self.expires is None,
            self.max_concurrent,
            self.rpm,
            self.frontend,
            self.gateway,
        )

    def with_grant_of(self, other: KeyRecord) -> KeyRecord:
        return replace(
            self,
            name=other.name,
            role=other.role,
            models=other.models,
            expires=other.expires,
            max_concurrent=other.max_concurrent,
            rpm=other.rpm,
            frontend=other.frontend,
            gateway=other.gateway,
        )

    def public(self) -> dict[str, Any]:
        """Everything but the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "models": list(self.models),
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
            "last_used": self.last_used,
            "max_concurrent": self.max_concurrent,
            "rpm": self.rpm,
            "owner": self.owner,
            "suspended": self.suspended,
            "frontend": self.frontend,
            "gateway": self.gateway,
        }


# the keys table's columns, in this order, in every store (SQLite and PostgreSQL): one place for both
KEY_COLUMNS = (
    "id",
    "name",
    "role",
    "hash",
    "models",
    "created",
    "expires",
    "revoked",
    "last_used",
    "max_concurrent",
    "rpm",
    "owner_id",
    "owner",
    "suspended",
    "checked",
    "frontend",
    "gateway",
)


def key_to_row(record: KeyRecord) -> tuple[Any, ...]:
    """The record's column values in KEY_COLUMNS order (the role as its name, the models as JSON text)."""
    values = {**record.__dict__, "role": record.role.value, "models": json.dumps(list(record.models))}
    return tuple(values[column] for column in KEY_COLUMNS)


def key_from_row(row: Any) -> KeyRecord:
    """A record from the column values in KEY_COLUMNS order (a tuple, or a mapping such as asyncpg's)."""
    values = dict(zip(KEY_COLUMNS, row, strict=True)) if isinstance(row, tuple) else dict(row)
    values["role"] = Role(values["role"])
    models = values["models"]
    values["models"] = tuple(json.loads(models) if isinstance(models, str) else models)
    values["frontend"] = bool(values["frontend"])
    values["gateway"] = bool(values["gateway"])
    return KeyRecord(**{column: values[column] for column in KEY_COLUMNS})
