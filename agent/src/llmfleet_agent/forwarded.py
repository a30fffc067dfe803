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

import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # an IPv4 peer seen through a dual-stack socket
    return address


def client_address(peer: str | None, forwarded_for: str | None, proxies: list[Network]) -> str | None:
    """The client's address: the last X-Forwarded-For entry when `peer` is one of `proxies` and that entry
    is an address; otherwise the peer."""
    address = _address(peer)
    if forwarded_for is None or address is None or not any(address in net for net in proxies):
        return peer
    forwarded = _address(forwarded_for.rsplit(",", 1)[-1])
    return str(forwarded) if forwarded is not None else peer


def forwarded_middleware(
    networks: list[str],
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    proxies: list[Network] = [ipaddress.ip_network(n, strict=False) for n in networks]

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        forwarded_for = request.headers.get("X-Forwarded-For")
        if forwarded_for is not None:
            client = client_address(request.remote, forwarded_for, proxies)
            if client != request.remote:
                request = request.clone(remote=client)
        return await handler(request)

    return middleware
