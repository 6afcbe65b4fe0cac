"""Name rules both planes apply: public suffixes and Kubernetes service spellings.

Pure: no I/O. Mozilla's Public Suffix List comes from the `publicsuffixlist` package
(which ships the list) and is loaded at the first wildcard checked, so a sidecar with no
egress wildcard never pays for it.

Mesh spellings: an app calls a service the way Kubernetes DNS lets it (`orders`,
`orders.shop`, `orders.shop.svc`, `orders.shop.svc.cluster.local`); see
`kanal.dataplane.mesh` for how a sidecar routes them.
"""

from __future__ import annotations

import functools

from publicsuffixlist import PublicSuffixList


@functools.cache
def _public_suffix_list() -> PublicSuffixList:
    return PublicSuffixList()


def wildcard_public_suffix(pattern: str) -> str | None:
    """The public suffix a wildcard spans (`*.co.uk` -> `co.uk`, `*.github.io`), or None.

    As in the Public Suffix List's default rule, every single-label suffix (a top-level
    domain, known or not) is public. Exact names (no `*.`) are never refused.
    """
    if not pattern.startswith("*."):
        return None
    suffix = pattern[2:].lower().rstrip(".")
    if "." not in suffix or _public_suffix_list().is_public(suffix):
        return suffix
    return None


CLUSTER_DOMAIN = "cluster.local"


def service_of(hostname: str, namespace: str) -> tuple[str, str] | None:
    """(service, namespace) a Kubernetes DNS name stands for; None for any other name."""
    name = hostname.lower().rstrip(".")
    if not name or "*" in name or ":" in name:
        return None
    labels = name.split(".")
    if labels[-1].isdigit():
        return None  # an IPv4 address
    if name.endswith(".svc." + CLUSTER_DOMAIN):
        labels = labels[: -1 - CLUSTER_DOMAIN.count(".") - 1]
    elif labels[-1] == "svc":
        labels = labels[:-1]
    elif len(labels) > 2:
        return None
    if len(labels) == 1:
        return labels[0], namespace
    if len(labels) == 2 and all(labels):
        return labels[0], labels[1]
    return None


def spellings(hostname: str, route_namespace: str, local_namespace: str) -> tuple[str, ...]:
    """The host names a mesh Route's `hostname` answers to, seen from `local_namespace`."""
    found = service_of(hostname, route_namespace)
    names = [hostname]
    if found is not None:
        service, namespace = found
        if namespace == local_namespace:
            names.append(service)
        names += [f"{service}.{namespace}", f"{service}.{namespace}.svc",
                  f"{service}.{namespace}.svc.{CLUSTER_DOMAIN}"]
    return tuple(dict.fromkeys(names))
