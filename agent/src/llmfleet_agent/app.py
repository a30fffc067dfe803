"""The application factory: wires config, store, keys, probes, the Ollama supervisor and the routes.

Each long-lived part is set up and torn down by a cleanup context, in order; teardown runs in reverse, so
Ollama is stopped before the HTTP client session closes and records are flushed before the store closes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
from aiohttp import web

from .access_control import access_middleware
from .activity import Activity
from .appkeys import (
    ACTIVITY,
    AUDIT,
    BUDGETS,
    CONFIG,
    DIRECTORY,
    GATE,
    HOST_ID,
    KEYRING,
    LIMITER,
    LOGIN_THROTTLE,
    METRICS,
    PROBES,
    SESSION,
    STARTED_AT,
    STORE,
    SUPERVISOR,
    UPSTREAM_CLIENT,
    USAGE,
)
from .auth import KeyRing
from .batching import BatchWriter
from .budget_ledger import Ledger
from .budgets import Budgets
from .caller_status import routes as caller_routes
from .config import DEFAULT_MAX_STALE, Config, ConfigError
from .control import routes as control_routes
from .credentials import CredentialError, read_credential
from .directory import Directory
from .forwarded import forwarded_middleware
from .http_errors import add_routes, error_middleware
from .login_throttle import LoginThrottle
from .metrics import Metrics
from .person_groups import PersonGroups
from .personal_keys import routes as personal_routes
from .probes import ProbeSampler, default_probes, gpu_busy, logins_open
from .proxy.gate import Gate
from .proxy.handler import add_proxy_routes
from .proxy.http1 import Client
from .proxy.limits import KeyLimiter
from .proxy.routes import ROUTES
from .reports import routes as report_routes
from .retention import Pruner
from .revalidation import Revalidator
from .spool import Spool, dataclass_codec
from .store import AuditRecord, open_store
from .supervisor import Supervisor
from .usage import UsageRecord

log = logging.getLogger("llmfleet.app")
R = TypeVar("R")


def models_dir(cfg: Config) -> Path:
    """Ollama's models: `ollama.models_dir`, else OLLAMA_MODELS in `ollama.env`, else its default."""
    if cfg.ollama.models_dir is not None:
        return cfg.ollama.models_dir
    if "OLLAMA_MODELS" in cfg.ollama.env:
        return Path(cfg.ollama.env["OLLAMA_MODELS"])
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def _writer(
    cfg: Config, name: str, cls: type[R], write: Callable[[list[R]], Awaitable[None]]
) -> BatchWriter[R]:
    """A record writer whose batches the store does not take (away, or slow) wait in a spool on disk.

    Each spool (usage, audit) has its own bound, store.spool_max_bytes: a flood of usage records never
    crowds out the audit. A write may take the store's own timeouts and as long again (a backstop: the
    PostgreSQL store enforces them itself)."""
    spool = Spool(cfg.resolved_spool_dir, name, *dataclass_codec(cls), max_bytes=cfg.store.spool_max_bytes)
    timeout = cfg.store.connect_timeout + 2 * cfg.store.statement_timeout
    return BatchWriter(name, write, spool=spool, write_timeout=timeout)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    store = open_store(cfg.store)
    await store.open()
    app[STORE] = store
    host = app[HOST_ID]

    async def add_audit(records: list[AuditRecord]) -> None:
        # audit records are made in many places; this host is named once, here
        await store.add_audit([r if r.host else dataclasses.replace(r, host=host) for r in records])

    audit = _writer(cfg, "audit", AuditRecord, add_audit)
    usage = _writer(cfg, "usage", UsageRecord, store.add_usage)
    try:
        await audit.open()
        await usage.open()
    except OSError as exc:  # a directory the agent cannot write, or one another agent uses
        await store.close()
        where = cfg.resolved_spool_dir
        raise ConfigError(f"store.spool_dir: cannot use {where}: {exc.strerror or exc}") from None
    app[AUDIT], app[USAGE] = audit, usage
    pruner = Pruner(store, cfg.store)
    pruner.start()
    yield
    await pruner.stop()
    # runs after every request has finished: the last records go to the store (else to the spool) before
    # it closes; both writers at once, so a store that is away costs one close_timeout
    await asyncio.gather(usage.close(), audit.close())
    await store.close()


async def _keys_ctx(app: web.Application) -> AsyncIterator[None]:
    auth = app[CONFIG].auth
    cfg = app[CONFIG]
    # a shared store may be away when the agent starts: the key set last loaded is kept on local disk
    cache = None if cfg.store.sqlite_path is not None else cfg.resolved_state_dir / "keys-cache.json"
    lookup_timeout = cfg.store.connect_timeout + cfg.store.statement_timeout
    keyring = KeyRing(
        app[STORE],
        auth.refresh_interval,
        app[AUDIT],
        auth.failure_window,
        cache,
        lookup_timeout,
        # without auth.ldap nothing confirms personal keys' owners here: they end after the default max_stale
        personal_max_stale=auth.ldap.max_stale if auth.ldap is not None else DEFAULT_MAX_STALE,
    )
    await keyring.start()
    app[KEYRING] = keyring
    yield
    await keyring.stop()


async def _directory_ctx(app: web.Application) -> AsyncIterator[None]:
    """Directory logins (auth.ldap): the client, and the revalidation of personal keys."""
    ldap = app[CONFIG].auth.ldap
    assert ldap is not None
    try:  # the service account's password and the CA must be readable now, not at the first login
        read_credential(ldap.bind_password_file, "auth.ldap.bind_password_file")
        if ldap.ca_file is not None:
            ssl.create_default_context(cafile=str(ldap.ca_file))
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"auth.ldap.ca_file: cannot use {ldap.ca_file}: {exc}") from None
    directory = Directory(ldap)
    app[DIRECTORY] = directory
    app[LOGIN_THROTTLE] = LoginThrottle()
    revalidator = Revalidator(app[STORE], directory, ldap, app[AUDIT], app[HOST_ID])
    revalidator.start()
    yield
    await revalidator.stop()
    directory.close()


async def _budgets_ctx(app: web.Application) -> AsyncIterator[None]:
    """Token budgets: the fleet's use read before the agent serves, then every budgets.refresh_interval."""
    cfg = app[CONFIG]
    budgets = cfg.budgets
    assert budgets is not None
    timeout = cfg.store.connect_timeout + cfg.store.statement_timeout
    # a store of one host (SQLite) has no other agents' use to read after the start
    ledger = Ledger(
        app[STORE], app[HOST_ID], budgets.refresh_interval, timeout, shared=cfg.store.sqlite_path is None
    )
    ldap = cfg.auth.ldap
    groups = PersonGroups(app[DIRECTORY], ldap.revalidate_interval) if ldap is not None else None
    await ledger.start()
    app[BUDGETS] = Budgets(budgets, ledger, groups)
    yield
    await ledger.stop()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    # the one client session to Ollama (loopback): many connections for parallel streams; no total timeout
    proxy = app[CONFIG].proxy
    connector = aiohttp.TCPConnector(limit=proxy.max_connections, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=proxy.connect_timeout, sock_read=proxy.read_timeout
    )
    session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
    app[SESSION] = session
    # the proxied requests' own client: lighter than aiohttp's on the hot path
    client = Client(
        limit=proxy.max_connections, connect_timeout=proxy.connect_timeout, read_timeout=proxy.read_timeout
    )
    app[UPSTREAM_CLIENT] = client
    yield
    await client.close()
    await session.close()


async def _probes_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    sampler = ProbeSampler(default_probes(models_dir(cfg)), cfg.probes.interval)
    activity = app[ACTIVITY]
    threshold = cfg.idle.gpu_activity_threshold

    def count_as_activity(results: dict) -> None:  # type: ignore[type-arg]
        if (threshold is not None and gpu_busy(results, threshold)) or (
            cfg.idle.count_logins and logins_open(results)
        ):
            activity.touch()

    sampler.on_sample(count_as_activity)
    await sampler.start()
    app[PROBES] = sampler
    yield
    await sampler.stop()


async def _supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    supervisor = Supervisor(cfg.ollama, cfg.resolved_state_dir, app[SESSION])
    app[SUPERVISOR] = supervisor
    await supervisor.start()
    yield
    await supervisor.stop()


async def _close_gate(app: web.Application) -> None:
    # on SIGTERM, after the listener closed: the one grace for requests in flight, then the cut
    await app[GATE].close(app[CONFIG].listen.shutdown_timeout)


def base_app(cfg: Config) -> web.Application:
    """What the agent and the gateway share: middlewares, limits, metrics, the store and its writers, keys,
    and (when configured) directory logins and budgets."""
    # behind a load balancer, first: every other middleware and handler sees the client's address
    forwarded = [forwarded_middleware(cfg.listen.forwarded_by)] if cfg.listen.forwarded_by else []
    app = web.Application(
        middlewares=[*forwarded, error_middleware, access_middleware],
        client_max_size=cfg.limits.max_body_bytes,
    )
    app[CONFIG] = cfg
    app[HOST_ID] = cfg.resolved_host_id
    app[STARTED_AT] = time.time()
    app[ACTIVITY] = Activity()
    app[LIMITER] = KeyLimiter(cfg.limits.max_concurrent_per_key, cfg.limits.requests_per_minute_per_key)
    app[METRICS] = Metrics(
        app[ACTIVITY],
        lambda: app.get(SUPERVISOR),
        lambda: app.get(PROBES),
        lambda: [w for w in (app.get(USAGE), app.get(AUDIT)) if w is not None],
    )
    app[GATE] = Gate()
    app.cleanup_ctx.extend([_store_ctx, _keys_ctx])
    if cfg.auth.ldap is not None:  # without it the routes do not exist (401, like any unknown route)
        app.cleanup_ctx.append(_directory_ctx)
        add_routes(app, personal_routes)
    if cfg.budgets is not None:
        app.cleanup_ctx.append(_budgets_ctx)
    return app


def create_app(cfg: Config) -> web.Application:
    app = base_app(cfg)
    app.cleanup_ctx.extend([_session_ctx, _probes_ctx, _supervisor_ctx])
    app.on_shutdown.append(_close_gate)
    add_routes(app, control_routes)
    add_routes(app, report_routes)
    add_routes(app, caller_routes)
    add_proxy_routes(app, ROUTES)
    return app


def _refuse_shared_key(key: Path) -> None:
    """A private key that other users may read or write is refused, as ssh does; group-readable is fine."""
    try:
        mode = stat.S_IMODE(key.stat().st_mode)
    except OSError:
        return  # loading it names the problem
    if mode & 0o007:
        raise ConfigError(
            f"listen.tls.key: {key} has mode {mode:04o}, open to other users; a private key must not be:"
            f" chmod 600 {key} (or 640 with the agent's group)"
        )


def ssl_context(cfg: Config) -> ssl.SSLContext | None:
    tls = cfg.listen.tls
    if tls is None:
        return None
    _refuse_shared_key(tls.key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"listen.tls: cannot load {tls.cert} / {tls.key}: {exc}") from None
    return ctx
