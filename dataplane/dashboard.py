"""The admin dashboard: `/ui` (and `/`), its live tables, and the same data as JSON.

The page is complete as served (plain HTML tables rendered by `dashview`); its inline
script only fetches `/ui/tables` again every second and swaps them in, so it updates
without a reload, and without scripts it is a page that refreshes itself every few
seconds. Nothing is loaded from elsewhere: the Content-Security-Policy says so, and a
dashboard on an admin port must work where there is no internet.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from functools import lru_cache
from importlib import resources
from typing import Any

from aiohttp import web

from kanal.dataplane.dashview import Traffic, dashboard_view, render_tables
from kanal.dataplane.runtime import Runtime
from kanal.dataplane.splitwatch import SplitWatch

__all__ = ["PATHS", "add_dashboard", "headers", "render_page"]

PATHS = ("/", "/ui", "/ui/tables", "/ui/state.json")
"""What the dashboard serves on the admin port."""

_MARK = "<!--tables-->"
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


@lru_cache(maxsize=1)
def _page() -> str:
    return (resources.files("kanal.dataplane") / "static" / "dashboard.html").read_text("utf-8")


def render_page(view: dict[str, Any]) -> str:
    """The whole page, its tables rendered from `view` (a `dashboard_view`)."""
    return _page().replace(_MARK, render_tables(view), 1)


def headers() -> dict[str, str]:
    """The headers of every dashboard answer."""
    return dict(_headers())


@lru_cache(maxsize=1)
def _headers() -> dict[str, str]:
    """No asset from elsewhere, and no script but the page's own (allowed by its hash:
    even text from a resource that escaped escaping could not run)."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in _SCRIPT.findall(_page()))
    return {
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                   f"script-src {hashes}; connect-src 'self'; img-src data:",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }


def add_dashboard(app: web.Application, runtime: Runtime, splits: SplitWatch) -> None:
    """Serve the dashboard of `runtime` on `app` (the admin application)."""
    traffic = Traffic()

    def view() -> dict[str, Any]:
        return dashboard_view(runtime.config, runtime.metrics, splits, traffic, time.time())

    async def page(_: web.Request) -> web.Response:
        html = render_page(view())
        return web.Response(text=html, content_type="text/html", headers=_headers())

    async def tables(_: web.Request) -> web.Response:
        return web.Response(text=render_tables(view()), content_type="text/html",
                            headers=_headers())

    async def state(_: web.Request) -> web.Response:
        return web.json_response(view(), headers=_headers())

    app.router.add_get("/", page)
    app.router.add_get("/ui", page)
    app.router.add_get("/ui/tables", tables)
    app.router.add_get("/ui/state.json", state)
