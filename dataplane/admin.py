"""The dataplane's admin endpoints: /live, /ready, /config, /explain, /metrics, and the dashboard (/ui)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from kanal.dataplane.acceptor import ListenerCollector
from kanal.dataplane.access.counters import AccessCollector
from kanal.dataplane.access.explain import explain_access, redact_access
from kanal.dataplane.casing import camel_document
from kanal.dataplane.dashboard import add_dashboard
from kanal.dataplane.heap import release_free_memory
from kanal.dataplane.metrics import MetricsCollector
from kanal.dataplane.overload import OverloadCollector
from kanal.dataplane.routemetrics import TrafficCollector
from kanal.dataplane.runtime import Config, Runtime
from kanal.dataplane.splitfeed import split_ticker, watch_splits
from kanal.dataplane.splitwatch import SplitCollector, explain_with_split, routes_with_status


def config_document(config: Config) -> dict[str, Any]:
    """The applied configuration as /config shows it, with each endpoint's live state."""
    snapshot = config.snapshot.to_dict()
    upstreams = []
    for spec in snapshot["upstreams"]:
        runtime = config.upstreams.get(spec["key"])
        endpoints = []
        if runtime is not None:
            for state in runtime.states:
                endpoints.append(
                    {
                        "address": state.endpoint.address,
                        "port": state.endpoint.port,
                        "weight": state.endpoint.weight,
                        "health": endpoint_health(state),
                        "circuit": endpoint_circuit(state),
                        "activeRequests": state.active,
                    }
                )
        upstreams.append({**spec, "endpoints": endpoints})
    for route in snapshot["routes"]:
        tls = route.get("tls")
        if tls:
            # Certificates are shown by name, never with their private keys.
            route["tls"] = {k: v for k, v in tls.items() if k not in ("cert_pem", "key_pem")}
        redact_access(route)
    return camel_document({
        "version": config.version,
        "appliedAt": config.applied_at,
        "routes": snapshot["routes"],
        "upstreams": upstreams,
        "egressPolicies": [
            {**policy, "basic_auth": [user for user, _ in policy.get("basic_auth", [])]}
            for policy in snapshot["egress_policies"]
        ],
    })


def endpoint_health(state: Any) -> str:
    health = getattr(state, "health", None)
    if isinstance(health, str):
        return health
    return "healthy" if state.available else "unhealthy"


def endpoint_circuit(state: Any) -> str:
    circuit = getattr(state, "circuit", None)
    if isinstance(circuit, str):
        return circuit
    return "closed"


def parse_explain_query(query: Any) -> tuple[str, str, str, str, dict[str, str]]:
    """host, method, path, query and headers from /explain's parameters."""
    url = query.get("url")
    if not url:
        raise ValueError("the url parameter is required, e.g. /explain?url=http://host/path")
    method = query.get("method", "GET").upper()
    headers: dict[str, str] = {}
    for item in query.getall("header", []):
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header must be Name:Value, got {item!r}")
        headers.setdefault(name.strip().lower(), value.strip())
    if url.startswith("/"):
        parts = urlsplit("http://placeholder" + url)
        host = headers.get("host", "")
    else:
        parts = urlsplit(url if "://" in url else "http://" + url)
        host = parts.netloc.rpartition("@")[2]
        headers.setdefault("host", host)
    return host, method, parts.path or "/", parts.query, headers


def admin_app(runtime: Runtime, *, extra_ready: Callable[[], bool] | None = None) -> web.Application:
    registry: Any = None  # prometheus_client's, made at the first scrape (lazy import)
    splits = watch_splits(runtime)  # observed shares of weighted rules

    async def live(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(_: web.Request) -> web.Response:
        if runtime.config is None or (extra_ready is not None and not extra_ready()):
            return web.Response(status=503, text="not ready: no configuration applied yet\n")
        return web.Response(text=f"ready: version {runtime.config.version}\n")

    async def config(request: web.Request) -> web.StreamResponse:
        if runtime.config is None:
            return web.json_response({"version": None, "routes": [], "upstreams": []}, status=503)
        document = config_document(runtime.config)
        routes_with_status(document["routes"], splits)
        body = _dumps(document).encode()
        del document
        answer = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        answer.content_length = len(body)
        await answer.prepare(request)
        await answer.write(body)
        await answer.write_eof()
        del body
        # The document of a big configuration was megabytes of short-lived objects: their
        # memory goes back to the system rather than stay with the process.
        await asyncio.to_thread(release_free_memory)
        return answer

    async def explain(request: web.Request) -> web.Response:
        if runtime.config is None:
            return web.json_response({"error": "no configuration applied yet"}, status=503)
        try:
            host, method, path, query, headers = parse_explain_query(request.query)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        answer = runtime.config.table.explain(host, method, path, query, headers)
        answer = explain_access(runtime.config.table, answer, host, method, path, query, headers)
        answer = camel_document(
            explain_with_split({"version": runtime.config.version, **answer}, splits))
        return web.json_response(answer, dumps=_dumps)

    async def metrics(_: web.Request) -> web.Response:
        nonlocal registry
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            registry.register(MetricsCollector(runtime.metrics))
            registry.register(TrafficCollector(runtime))
            registry.register(SplitCollector(splits))
            registry.register(AccessCollector())
            registry.register(ListenerCollector(runtime.connection_gate))
            registry.register(OverloadCollector(runtime))
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def purge(request: web.Request) -> web.Response:
        answer, status = purge_cache(request.query.get("url"), request.query.get("prefix"))
        return web.json_response(answer, status=status)

    app = web.Application()
    app.router.add_post("/cache/purge", purge)
    app.router.add_delete("/cache/purge", purge)
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    app.router.add_get("/config", config)
    app.router.add_get("/explain", explain)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(split_ticker(splits))
    add_dashboard(app, runtime, splits)  # /ui and /
    return app


def purge_cache(url: str | None, prefix: str | None) -> tuple[dict[str, Any], int]:
    """`POST /cache/purge?url=...` or `?prefix=...`: drop stored answers (every variant
    and extra key part) of one URL, or of every URL that starts with the prefix."""
    from kanal.dataplane.cache.policy import url_of
    from kanal.dataplane.cache.store import PROCESS_STORE

    if (url is None) == (prefix is None):
        return {"error": "give exactly one of url= or prefix= (an absolute http or https "
                         "URL)"}, 400
    text = url if url is not None else prefix
    assert text is not None
    normalized = url_of(text)
    if normalized is None:
        return {"error": f"not an absolute http or https URL: {text!r}"}, 400
    purged = PROCESS_STORE.purge(normalized, prefix=prefix is not None)
    PROCESS_STORE.stats.count("purge")
    return {"purged": purged, "url" if url is not None else "prefix": normalized}, 200


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False)
