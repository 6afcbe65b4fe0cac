"""Egress decisions: may this client reach this destination? Pure: no I/O, no clock.

The forward proxy (`kanal.dataplane.forward`) asks, in this order:

1. `EgressRules.authenticate`: when any EgressPolicy of the namespace names a
   basic-auth Secret, a `Proxy-Authorization: Basic` header must carry one of their
   credentials (compared in constant time). Asked first, so a client without
   credentials learns nothing about the policy.
2. `EgressRules.decide(host, port)`: by name and port, before any resolution.
   - A host typed as an IP address (including the numeric IPv4 forms a URL parser or
     `inet_aton` would take, like `2130706433` or `0x7f.1`) is never allowed: allow
     rules name hosts, and allowing a name does not allow its addresses.
   - Deny rules win over allow rules, across every policy of the namespace.
     A deny rule without ports denies every port.
   - A host served by a Route with `gateways: [mesh]` is a mesh service: it is routed
     through the mesh route table, never dialed directly, with or without a policy.
   - Otherwise some allow rule must name the host (exactly, or `*.suffix` for strict
     subdomains of `suffix` at any depth) and the port (the compiler writes the
     default 80 and 443 out). With no policy at all, only mesh services pass.
3. `check_addresses(addresses, allow_private)`: after ONE resolution, every address
   the name resolved to is classified; the proxy then dials those checked addresses
   and never the name again, so DNS rebinding cannot slip a private address in.
   Loopback, RFC 1918, link-local (169.254.0.0/16: cloud metadata), CGNAT
   (100.64.0.0/10), "this network", benchmarking, reserved, broadcast, multicast,
   IPv6 loopback/unspecified/ULA/link-local/site-local/multicast, and the IPv6 forms
   that embed an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
   `::a.b.c.d`, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4 `2002::/16`, Teredo)
   are private unless a policy that allows the destination says `allowPrivateNetworks`.

Several policies in one namespace combine: a destination passes when some policy
allows it and none denies it; private addresses pass when one of the policies that
allow the destination allows private networks; `anonymize` holds when any policy says
so (privacy errs on the side of saying less).

Wildcards across a public suffix (`*.com`, `*.co.uk`, `*.github.io`) are refused in
allow rules when manifests are loaded (`kanal.contract.names.wildcard_public_suffix`,
Mozilla's Public Suffix List; every single-label suffix is public, as in its default
rule).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kanal.contract.names import wildcard_public_suffix
from kanal.contract.snapshot import EgressPolicy, EgressRule, Snapshot

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

"""Multi-label public suffixes refused under an allow wildcard (every TLD is one too)."""

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class InvalidHost(ValueError):
    """A destination that is neither a DNS name nor an IP address."""


# --------------------------------------------------------------------------- names


def normalize_host(text: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets. Raises InvalidHost."""
    host = text.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not host or len(host) > 253:
        raise InvalidHost(f"invalid host {text!r}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise InvalidHost(f"invalid host {text!r}") from None
        return host.split("%", 1)[0]
    if not all(len(label) <= 63 and _LABEL.fullmatch(label) for label in host.split(".")):
        raise InvalidHost(f"invalid host {text!r}")
    return host


def ip_literal(host: str) -> IPAddress | None:
    """The address a (normalized) host denotes when typed as a literal, else None.

    Besides dotted quads and IPv6, the numeric forms URL parsers and `inet_aton` take
    count: a last label that is a number (`2130706433`, `127.1`, `0x7f.0.0.1`) makes
    the host an IPv4 literal (WHATWG URL), even when it is not a valid one.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    labels = host.split(".")
    if not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    value = _inet_aton(labels)
    if value is None:
        raise InvalidHost(f"{host!r} is neither a host name nor a valid IPv4 address")
    return ipaddress.IPv4Address(value)


def _inet_aton(labels: Sequence[str]) -> int | None:
    """The BSD `inet_aton` reading of 1 to 4 numeric parts (decimal, 0x hex, 0 octal)."""
    if not 1 <= len(labels) <= 4:
        return None
    numbers = []
    for label in labels:
        try:
            if label.startswith("0x"):
                numbers.append(int(label[2:] or "0", 16))
            elif len(label) > 1 and label.startswith("0"):
                numbers.append(int(label, 8))
            else:
                numbers.append(int(label, 10))
        except ValueError:
            return None
    *front, last = numbers
    if any(n > 255 for n in front) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for index, number in enumerate(front):
        value += number << (8 * (3 - index))
    return value


def host_matches(pattern: str, host: str) -> bool:
    """`pattern` is a host name or `*.suffix` (strict subdomains of suffix, any depth)."""
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


# --------------------------------------------------------------------------- addresses

_V4_PRIVATE: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), why) for net, why in (
        ("0.0.0.0/8", "a 'this network' address"),
        ("10.0.0.0/8", "a private (RFC 1918) address"),
        ("100.64.0.0/10", "a carrier-grade NAT (RFC 6598) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address (cloud metadata)"),
        ("172.16.0.0/12", "a private (RFC 1918) address"),
        ("192.0.0.0/24", "an IETF protocol assignment address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay anycast address"),
        ("192.168.0.0/16", "a private (RFC 1918) address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),
    )
)
_V6_PRIVATE: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), why) for net, why in (
        ("::1/128", "the IPv6 loopback address"),
        ("::/128", "the unspecified IPv6 address"),
        ("64:ff9b:1::/48", "a local-use NAT64 (RFC 8215) address"),
        ("100::/64", "a discard-only IPv6 address"),
        ("2001:db8::/32", "an IPv6 documentation address"),
        ("2001:10::/28", "an ORCHID IPv6 address"),
        ("2001:20::/28", "an ORCHIDv2 IPv6 address"),
        ("fc00::/7", "an IPv6 unique local (ULA) address"),
        ("fe80::/10", "an IPv6 link-local address"),
        ("fec0::/10", "an IPv6 site-local address"),
        ("ff00::/8", "an IPv6 multicast address"),
    )
)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def classify(address: IPAddress | str) -> str | None:
    """Why an address is private (a phrase for the 403 body), or None when public."""
    addr = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(addr, ipaddress.IPv4Address):
        for net, why in _V4_PRIVATE:
            if addr in net:
                return why
        if addr == ipaddress.IPv4Address("255.255.255.255"):
            return "the broadcast address"
        return None
    embedded = _embedded_v4(addr)
    if embedded is not None:
        form, v4 = embedded
        inner = classify(v4)
        return f"{form} of {v4}, {inner}" if inner is not None else None
    for v6net, why in _V6_PRIVATE:
        if addr in v6net:
            return why
    if not addr.is_global:
        return "a special-purpose IPv6 address"
    return None


def _embedded_v4(addr: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    packed = addr.packed
    if addr in _MAPPED:
        return "the IPv4-mapped form", ipaddress.IPv4Address(packed[12:])
    if addr in _NAT64:
        return "the NAT64 form", ipaddress.IPv4Address(packed[12:])
    if addr in _COMPATIBLE and int(addr) > 1:
        return "the IPv4-compatible form", ipaddress.IPv4Address(packed[12:])
    if addr in _SIX_TO_FOUR:
        return "the 6to4 form", ipaddress.IPv4Address(packed[2:6])
    if addr in _TEREDO:
        # The client address is stored inverted in the last 32 bits.
        return "the Teredo form", ipaddress.IPv4Address(bytes(b ^ 0xFF for b in packed[12:]))
    return None


def check_addresses(addresses: Iterable[IPAddress], allow_private: bool) -> str | None:
    """Why dialing these (all the addresses of one resolution) is refused, or None."""
    for address in addresses:
        why = classify(address)
        if why is not None and not allow_private:
            return f"{address} is {why}; private networks are not allowed"
    return None


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on a destination by name and port (before resolution)."""

    allowed: bool
    reason: str
    mesh: bool = False
    allow_private: bool = False
    policies: tuple[str, ...] = ()


class EgressRules:
    """The EgressPolicies of one namespace and the mesh hostnames, ready to decide."""

    def __init__(
        self,
        policies: Sequence[EgressPolicy],
        mesh_hostnames: Iterable[str] = (),
        namespace: str = "default",
    ) -> None:
        self.namespace = namespace
        self.policies = tuple(policies)
        self.mesh_hostnames = tuple(sorted(set(mesh_hostnames)))
        self.credentials: tuple[bytes, ...] = tuple(
            f"{user}:{password}".encode() for policy in self.policies
            for user, password in policy.basic_auth
        )
        self.auth_required = any(policy.basic_auth for policy in self.policies)
        self.anonymize = any(policy.anonymize for policy in self.policies)
        # Allow wildcards across a public suffix are refused when manifests load; a
        # Snapshot that carries one anyway (another compiler) has it ignored here.
        self.ignored: tuple[str, ...] = tuple(
            f"{policy.key}: {rule.host}" for policy in self.policies for rule in policy.allow
            if wildcard_public_suffix(rule.host) is not None
        )

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, namespace: str = "default") -> EgressRules:
        prefix = f"{namespace}/"
        policies = [p for p in snapshot.egress_policies if p.key.startswith(prefix)]
        mesh = [
            hostname for route in snapshot.routes if "mesh" in route.gateways
            for hostname in route.hostnames
        ]
        return cls(policies, mesh, namespace)

    def authenticate(self, header: bytes | None) -> bool:
        """Whether a `Proxy-Authorization` value carries known credentials (if any are needed)."""
        if not self.auth_required:
            return True
        if header is None:
            return False
        scheme, _, encoded = header.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        matched = False
        for known in self.credentials:
            # Every credential is compared, so timing does not tell which one matched.
            matched |= hmac.compare_digest(given, known)
        return matched

    def is_mesh(self, host: str) -> bool:
        return any(host_matches(pattern, host) for pattern in self.mesh_hostnames)

    def decide(self, host: str, port: int, *, connect: bool = False) -> Decision:
        """May `host:port` be reached? `host` is normalized; `connect` for CONNECT tunnels."""
        literal = ip_literal(host)
        if literal is not None:
            why = classify(literal)
            if why is not None:
                return Decision(False, f"{host} is {why}; IP literals are not allowed")
            return Decision(
                False, f"{host} is an IP literal: allow rules name hosts, and allowing a "
                       f"name does not allow its addresses")
        for policy in self.policies:
            for rule in policy.deny:
                if host_matches(rule.host, host) and (not rule.ports or port in rule.ports):
                    return Decision(False, f"{host}:{port} is denied by rule {_rule_text(rule)} "
                                           f"of EgressPolicy {policy.key}")
        if not connect and self.is_mesh(host):
            return Decision(True, f"{host} is a mesh service", mesh=True)
        allowing: list[EgressPolicy] = []
        other_ports: set[int] = set()
        for policy in self.policies:
            for rule in policy.allow:
                if wildcard_public_suffix(rule.host) is not None:
                    continue
                if host_matches(rule.host, host):
                    if port in rule.ports:
                        allowing.append(policy)
                        break
                    other_ports.update(rule.ports)
        if allowing:
            names = tuple(dict.fromkeys(policy.key for policy in allowing))
            return Decision(
                True, f"allowed by EgressPolicy {', '.join(names)}",
                allow_private=any(policy.allow_private_networks for policy in allowing),
                policies=names,
            )
        if other_ports:
            listed = ", ".join(str(p) for p in sorted(other_ports))
            return Decision(False, f"port {port} is not allowed for {host} (allowed: {listed})")
        if not self.policies:
            return Decision(False, f"no EgressPolicy in namespace {self.namespace}: only mesh "
                                   f"services are reachable, and {host} is not one")
        return Decision(False, f"{host} is not allowed by any EgressPolicy of namespace "
                               f"{self.namespace}")


def _rule_text(rule: EgressRule) -> str:
    if not rule.ports:
        return rule.host
    return f"{rule.host} ports {','.join(str(p) for p in rule.ports)}"
