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

from kanal.contract.names import spellings
from kanal.contract.snapshot import Snapshot


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
