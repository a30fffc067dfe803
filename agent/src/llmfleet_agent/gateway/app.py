"""The gateway's application: the agent's authentication, limits, budgets and forwarder (app.py,
proxy/handler.py), with the fleet's hosts as the upstream instead of a local Ollama."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from ..app import base_app
from ..appkeys import CONFIG, KNOWN_MODELS, UPSTREAM, UPSTREAM_CLIENT
from ..config import Config, ConfigError
from ..credentials import CredentialError, read_credential
from ..http_errors import add_routes
from ..proxy.handler import add_proxy_routes
from ..proxy.http1 import Client
from ..proxy.routes import ROUTES
from .fleet import Fleet
from .routing import FLEET, SWEEPER, WAKER, GatewayUpstream, routes
from .sweep import Sweeper
from .wake import Waker

# the fleet's model lists are the gateway's own (the union of the hosts'); every other route is forwarded
OWN_PATHS = {("GET", "/api/tags"), ("GET", "/v1/models")}


async def _fleet_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    gateway = cfg.gateway
    assert gateway is not None
    try:
        key = read_credential(gateway.key_file, "gateway.key_file")
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None
    context = ssl.create_default_context(
        cafile=str(gateway.agent_ca_file) if gateway.agent_ca_file is not None else None
    )
    proxy = cfg.proxy
    client = Client(
        limit=proxy.max_connections,
        connect_timeout=proxy.connect_timeout,
        read_timeout=proxy.read_timeout,
        ssl_context=context,
    )
    app[UPSTREAM_CLIENT] = client
    fleet = Fleet(gateway, key, context)
    await fleet.start()
    app[FLEET] = fleet
    # waking needs instances to start: EC2 discovery, not a fixed list
    waker = Waker(fleet, gateway.wake) if gateway.wake.enabled and not gateway.hosts else None
    if waker is not None:
        app[WAKER] = waker
    # the idle sweep: the instances to stop, EC2 discovery too
    sweeper = None
    if gateway.sweep.enabled and not gateway.hosts:
        summary_file = gateway.sweep.summary_file or cfg.resolved_state_dir / "idle-summary.json"
        sweeper = Sweeper(fleet, gateway.sweep, gateway.deployment or "", summary_file)
        sweeper.start()
        app[SWEEPER] = sweeper
    app[UPSTREAM] = GatewayUpstream(fleet, key, waker)
    app[KNOWN_MODELS] = lambda: {m for h in fleet.hosts.values() for m in h.models}
    yield
    if sweeper is not None:
        await sweeper.stop()
    if waker is not None:
        await waker.stop()
    await fleet.stop()
    await client.close()


def create_gateway_app(cfg: Config) -> web.Application:
    if cfg.gateway is None:
        raise ConfigError("gateway: the section is required to run the gateway")
    app = base_app(cfg)
    app.cleanup_ctx.append(_fleet_ctx)
    add_routes(app, routes)
    add_proxy_routes(app, tuple(s for s in ROUTES if (s.method, s.path) not in OWN_PATHS))
    return app
