"""What the access scenarios through `kanal run` share: a Route `api` with its policies
in front of one Upstream `api`, and a local aiohttp server for the services they call."""

from __future__ import annotations

from aiohttp import web

from tests.conftest import Backend, upstream_yaml


def api_manifests(backend: Backend, policies: str) -> dict[str, str]:
    """The Route `api` with `policies` (the YAML lines under `policies:`, indented four
    spaces) and one rule to the Upstream `api` on `backend`."""
    route = f"""\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: api}}
spec:
  policies:
{policies}  rules: [{{backends: [{{upstream: api}}]}}]
"""
    return {"route.yaml": route, "up.yaml": upstream_yaml("api", backend)}


async def serve_app(app: web.Application, port: int) -> web.AppRunner:
    """Serve `app` on 127.0.0.1:`port`; the runner's cleanup stops it."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
