"""`kanal operator`: the control plane in a cluster.

kopf watches Routes, Upstreams, EgressPolicies, Services, EndpointSlices and the
Secrets they name (`handlers`); an in-memory store keeps what the compiler needs and
says whether an event changed any of it (`store`); a debounced builder compiles, so a
burst of events costs one compile (`builder`); the Publisher serves each new Snapshot
to the dataplanes; a status writer patches conditions and raises Events for rejected
objects (`status`). `main` ties them together with the admin endpoints.

Start it with `kanal operator` or `kopf run -m kanal.operator.kube.handlers`.
"""
