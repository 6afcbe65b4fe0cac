"""A small Kubernetes API client on aiohttp, for what kopf's handlers do not do for us.

kopf watches; this lists once at startup (so the first Snapshot is complete), fetches
a Secret that becomes referenced after its watch event was ignored, patches statuses
and asks for TokenReviews. Credentials come from the same places kopf's own minimal
login looks: the pod's service account, else the kubeconfig (`KUBECONFIG` or
`~/.kube/config`).
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

log = logging.getLogger("kanal.operator.kube")


class KubeError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def login(settings: kopf.OperatorSettings | None = None) -> kopf.ConnectionInfo:
    """Connection info: the pod's service account, else the kubeconfig."""
    settings = settings or kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings)
    if info is None:
        info = kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account token and no kubeconfig: "
                              "run in a pod or set KUBECONFIG")
    return info


def _as_text(data: str | bytes) -> str:
    """kubeconfig `*-data` values are base64 PEM; kopf passes them through as given."""
    text = data.decode() if isinstance(data, bytes) else data
    if "-----BEGIN" in text:
        return text
    return base64.b64decode(text).decode()


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context(
        cafile=os.fsdecode(info.ca_path) if info.ca_path else None,
        cadata=_as_text(info.ca_data) if info.ca_data else None,
    )
    if info.certificate_path or info.certificate_data:
        with tempfile.TemporaryDirectory() as folder:
            cert = os.fsdecode(info.certificate_path) if info.certificate_path else None
            key = os.fsdecode(info.private_key_path) if info.private_key_path else None
            if cert is None and info.certificate_data:
                cert = os.path.join(folder, "tls.crt")
                with open(cert, "w", encoding="ascii") as file:
                    file.write(_as_text(info.certificate_data))
            if key is None and info.private_key_data:
                key = os.path.join(folder, "tls.key")
                with open(key, "w", encoding="ascii") as file:
                    file.write(_as_text(info.private_key_data))
            context.load_cert_chain(cert, key)  # type: ignore[arg-type]
    return context


class KubeClient:
    """Paths are the API's own (`/api/v1/...`, `/apis/group/version/...`)."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self._info = info
        self._server = info.server.rstrip("/")
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = (aiohttp.BasicAuth(info.username, info.password or "")
                if info.username and not info.token else None)
        self._session = aiohttp.ClientSession(
            headers=headers, auth=auth,
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info)),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, *, json: Any = None,
                      content_type: str = "application/json") -> Any:
        headers = {"Content-Type": content_type} if json is not None else {}
        async with self._session.request(method, self._server + path, json=json,
                                         headers=headers) as response:
            if response.status >= 400:
                text = await response.text()
                message = text[:300]
                try:
                    message = str((await response.json(content_type=None)).get("message"))
                except (ValueError, AttributeError):
                    pass
                raise KubeError(response.status, message)
            return await response.json(content_type=None)

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def list(self, path: str) -> list[Mapping[str, Any]]:
        body = await self.get(path)
        items = body.get("items") or [] if isinstance(body, Mapping) else []
        return [item for item in items if isinstance(item, Mapping)]

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        return await self.request("PATCH", path, json=patch,
                                  content_type="application/merge-patch+json")

    async def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return await self.request("POST", path, json=body)
