"""Allow and deny CIDR lists on the client address (pure).

The address is the client's as `--trusted-hops` defines it (the proxy's peer, or the
address the trusted proxies in front reported). Deny wins over allow; an empty allow
list allows every address not denied. An address that does not parse is refused when
any allow list is set: an unknown client is never inside an allowed network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or bare addresses) as networks; raises ValueError naming a bad one."""
    networks: list[Network] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not a CIDR: {exc}") from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 for every rule
    return address


class IPFilter:
    """One rule's allow and deny networks."""

    __slots__ = ("allow", "deny")

    def __init__(self, allow: Iterable[str], deny: Iterable[str]) -> None:
        self.allow = parse_networks(allow)
        self.deny = parse_networks(deny)

    def refusal(self, client: str) -> str | None:
        """Why `client` may not pass (a short reason), or None when it may."""
        address = _address(client)
        if address is None:
            return "the client address is unknown" if self.allow else None
        for network in self.deny:
            if address in network:
                return f"the client address {address} is denied"
        if self.allow and not any(address in network for network in self.allow):
            return f"the client address {address} is not allowed"
        return None
