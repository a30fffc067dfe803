"""The client's address behind a load balancer (`listen.forwarded_by`).

Behind an Application Load Balancer every connection comes from the load balancer's own addresses, so the
per-address login throttle would let one client lock everyone out, and the access and audit logs would name
the load balancer. The load balancer appends the address it received the connection from to
`X-Forwarded-For`; when a connection comes from `listen.forwarded_by` (the load balancer's networks), the
last entry of that header is the client, and the request is handled as coming from it. Only the last
entry: the ones before it are whatever the client sent. From anywhere else the header is ignored. Not
configured (the default), nothing is installed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from .addresses import Network, parse_address, parse_networks, within

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def client_address(peer: str | None, forwarded_for: str | None, proxies: tuple[Network, ...]) -> str | None:
    """The client's address: the last X-Forwarded-For entry when `peer` is one of `proxies` and that entry
    is an address; otherwise the peer."""
    if forwarded_for is None or not within(parse_address(peer), proxies):
        return peer
    forwarded = parse_address(forwarded_for.rsplit(",", 1)[-1])
    return str(forwarded) if forwarded is not None else peer


def forwarded_middleware(
    networks: list[str],
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    proxies = parse_networks(networks)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        forwarded_for = request.headers.get("X-Forwarded-For")
        if forwarded_for is not None:
            client = client_address(request.remote, forwarded_for, proxies)
            if client != request.remote:
                request = request.clone(remote=client)
        return await handler(request)

    return middleware
