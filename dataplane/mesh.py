"""Mesh service names: the spellings of a Kubernetes Service name a sidecar answers to.

An app calls a service the way Kubernetes DNS lets it: `orders` (a Service of its own
namespace), `orders.shop`, `orders.shop.svc` or `orders.shop.svc.cluster.local`. A
Route with `gateways: [mesh]` names the service in any of these spellings. So that a
request in one spelling finds a Route written in another, a dataplane that knows its
namespace (a sidecar: `--namespace`, else $POD_NAMESPACE) routes the mesh over a copy
of the Snapshot whose mesh Routes carry every spelling of their service host names:

- a host name of one label (`orders`) is the Service of the Route's own namespace;
  two labels (`orders.shop`), or ending in `.svc` or `.svc.cluster.local`, name the
  namespace themselves;
- the spellings are `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`, and the bare
  `svc` only for the dataplane's own namespace (from another namespace, `orders` means
  another Service, as in Kubernetes DNS);
- wildcards, IP addresses and other names (`api.example.com`) are left as written.

So a mesh Route with host name `orders` in namespace `shop` takes `orders`,
`orders.shop` and `orders.shop.svc.cluster.local` from a pod in `shop`, and
`orders.shop` (not `orders`) from a pod in `web`. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses

from kanal.dataplane.snapshot import Snapshot

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


def with_mesh_aliases(snapshot: Snapshot, local_namespace: str) -> Snapshot:
    """The Snapshot whose mesh Routes carry every spelling of their service host names.

    For routing only: the version stays the one of the Snapshot it was made from.
    """
    routes = []
    changed = False
    for route in snapshot.routes:
        if "mesh" in route.gateways and route.hostnames:
            namespace = route.key.partition("/")[0]
            names = tuple(dict.fromkeys(
                name for hostname in route.hostnames
                for name in spellings(hostname, namespace, local_namespace)))
            if names != route.hostnames:
                route = dataclasses.replace(route, hostnames=names)
                changed = True
        routes.append(route)
    return dataclasses.replace(snapshot, routes=tuple(routes)) if changed else snapshot
