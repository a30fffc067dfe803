"""The gateway's application: the agent's authentication, limits, budgets and forwarder (app.py,
proxy/handler.py), with the fleet's hosts as the upstream instead of a local Ollama."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from ..access_control import requires
from ..app import base_app
from ..appkeys import CONFIG, KNOWN_MODELS, UPSTREAM, UPSTREAM_CLIENT
from ..config import Config, ConfigError
from ..credentials import CredentialError, read_credential
from ..http_errors import Handler, add_routes, defer_expect, json_error
from ..proxy.handler import add_proxy_routes
from ..proxy.http1 import Client
from ..proxy.routes import ROUTES, Kind, RouteSpec
from .fleet import Fleet
from .routing import FLEET, SWEEPER, WAKER, GatewayUpstream, routes
from .sweep import Sweeper
from .wake import Waker

# the fleet's model lists are the gateway's own (the union of the hosts'); model management is refused
# (below); every other route is forwarded
OWN_PATHS = {("GET", "/api/tags"), ("GET", "/v1/models")}
# Model management changes one host's models: routed by model like a chat, a pull would reach a host that
# already has the model, a delete one host of several, a blob any host. It is done on the hosts themselves
# (the agent role's agent_models, or a host's own agent), never half-done through the gateway.
MANAGE_ON_THE_HOSTS = (
    "model management is done on each host, not through the gateway: set the agent role's agent_models"
    " and run configure.yml, or send it to a host's agent (GET /gateway/status lists the hosts)"
)


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


def _manage_refused(spec: RouteSpec) -> Handler:
    @requires(spec.role)  # who may not manage models hears that first, as on an agent
    async def handler(request: web.Request) -> web.StreamResponse:
        response = json_error(501, f"{spec.method} {spec.path}: {MANAGE_ON_THE_HOSTS}")
        if request.body_exists:  # a blob upload's body is not read for nothing: the connection ends
            response.force_close()
        return response

    handler.__name__ = f"refused {spec.method} {spec.path}"
    return handler


def create_gateway_app(cfg: Config) -> web.Application:
    if cfg.gateway is None:
        raise ConfigError("gateway: the section is required to run the gateway")
    app = base_app(cfg)
    app.cleanup_ctx.append(_fleet_ctx)
    add_routes(app, routes)
    forwarded = [s for s in ROUTES if (s.method, s.path) not in OWN_PATHS]
    add_proxy_routes(app, tuple(s for s in forwarded if s.kind is not Kind.MANAGE))
    for spec in forwarded:
        if spec.kind is Kind.MANAGE:
            app.router.add_route(spec.method, spec.path, _manage_refused(spec), expect_handler=defer_expect)
    return app
