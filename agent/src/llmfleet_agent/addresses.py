"""The one rule for reading a client's address and the networks it is checked against: used by
`auth.gateway_sources` (a gateway key is taken only from the gateway's addresses, gateway_identity.py),
`listen.forwarded_by` (the load balancer's networks, forwarded.py) and the configuration's validation of both.

An IPv4 peer seen through a dual-stack socket (`::ffff:10.0.0.5`) is its IPv4 address: a network written
`10.0.0.0/16` must match it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str | None) -> Address | None:
    """The address in `text` (surrounding spaces allowed), or None when it is not one."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(text: str) -> Network:
    """An address or a CIDR block (host bits allowed: `10.42.1.7/16` is 10.42.0.0/16); a ValueError names
    the text that is neither."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an address or a CIDR block (10.42.0.0/16)") from None


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    return tuple(parse_network(text) for text in texts)


def within(address: Address | None, networks: Iterable[Network]) -> bool:
    return address is not None and any(address in network for network in networks)
