"""An origin server for cache tests: it counts the requests it gets, per path, and
answers with whatever caching fields the query asks for.

Query parameters: `cc` (Cache-Control), `age` (Age), `etag`, `lm` (Last-Modified; with `etag`
they make conditional requests answer 304), `vary`, `expires`, `cookie` (Set-Cookie),
`status`, `size` (body bytes), `chunked` (no Content-Length), `lie` (announce this many more bytes than sent, then
close), `slow` (seconds before answering), `location` (on unsafe methods). The body
says the path and the request's number, so a test sees which answer it got.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.conftest import Backend, BackendThread, free_port


@dataclass
class Origin:
    port: int
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    requests: list[dict[str, Any]] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)
    """Paths answered 503 (an origin in trouble)."""
    delayed: dict[str, float] = field(default_factory=dict)
    """Paths answered only after this many seconds (a slow origin, from now on)."""
    runner: web.AppRunner | None = None

    def count(self, path: str) -> int:
        return self.counts[path]


def origin_app(origin: Origin) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        query = request.query
        origin.counts[request.path] += 1
        number = origin.counts[request.path]
        origin.requests.append({"method": request.method, "path": request.path_qs,
                                "headers": dict(request.headers)})
        if request.method not in ("GET", "HEAD"):
            headers = {}
            if "location" in query:
                headers["Location"] = query["location"]
            return web.Response(status=int(query.get("status", "200")), text="done",
                                headers=headers)
        if request.path in origin.failing:
            return web.Response(status=503, text="down")
        if "slow" in query:
            await asyncio.sleep(float(query["slow"]))
        if request.path in origin.delayed:
            await asyncio.sleep(origin.delayed[request.path])
        headers: dict[str, str] = {}
        for name, key in (("Cache-Control", "cc"), ("ETag", "etag"), ("Last-Modified", "lm"),
                          ("Vary", "vary"), ("Expires", "expires"), ("Set-Cookie", "cookie"),
                          ("Age", "age")):
            if key in query:
                headers[name] = query[key]
        etag = query.get("etag")
        if etag is not None and request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        lm = query.get("lm")
        if etag is None and lm is not None and request.headers.get("If-Modified-Since") == lm:
            return web.Response(status=304, headers=headers)
        status = int(query.get("status", "200"))
        size = query.get("size")
        if size is not None:
            body = (f"{request.path} #{number} ".encode() * (int(size) // 8 + 1))[: int(size)]
        else:
            body = f"{request.path} #{number} {request.headers.get('X-Variant', '')}".encode()
        if "chunked" in query:
            response = web.StreamResponse(status=status, headers=headers)
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, len(body), 1000):
                await response.write(body[start:start + 1000])
            await response.write_eof()
            return response
        if "lie" in query:
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = len(body) + int(query["lie"])
            await response.prepare(request)
            await response.write(body)
            assert request.transport is not None
            request.transport.close()
            return response
        return web.Response(status=status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def start_origin(pool: BackendThread) -> Origin:
    origin = Origin(port=free_port())

    async def go() -> web.AppRunner:
        runner = web.AppRunner(origin_app(origin), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", origin.port).start()
        return runner

    runner = pool.run(go())
    origin.runner = runner
    pool.started.append(Backend(name="origin", port=origin.port, runner=runner))
    return origin
