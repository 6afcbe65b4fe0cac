"""Who may subscribe: dataplanes present a Kubernetes service-account token.

Without `--token-file`, the operator asks the API server (a TokenReview) whether the
bearer token a dataplane presents is a valid service-account token. Answers are cached
by the token's hash (accepted ones for `ttl`, refused ones for `negative_ttl`), so a
long-polling dataplane costs one review a minute, not one per poll.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence

from kanal.operator.kube.client import KubeClient

log = logging.getLogger("kanal.operator.auth")

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class TokenReviewAuthenticator:
    """`await authenticator(token)`: True for a valid service-account token."""

    def __init__(self, client: KubeClient, *, audiences: Sequence[str] = (),
                 namespaces: Sequence[str] = (), ttl: float = 60.0, negative_ttl: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000) -> None:
        self.client = client
        self.audiences = list(audiences)
        self.namespaces = frozenset(namespaces)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.clock = clock
        self.max_entries = max_entries
        self.reviews = 0
        self._cache: dict[str, tuple[bool, float]] = {}

    async def __call__(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        ok = await self._review(token)
        if len(self._cache) >= self.max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
        self._cache[digest] = (ok, now + (self.ttl if ok else self.negative_ttl))
        return ok

    async def _review(self, token: str) -> bool:
        spec: dict[str, object] = {"token": token}
        if self.audiences:
            spec["audiences"] = self.audiences
        self.reviews += 1
        answer = await self.client.post(TOKEN_REVIEWS, {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
        status = answer.get("status") if isinstance(answer, dict) else None
        if not isinstance(status, dict) or status.get("authenticated") is not True:
            return False
        user = status.get("user") or {}
        username = str(user.get("username") or "")
        if not username.startswith(SERVICE_ACCOUNT_PREFIX):
            log.warning("refused a token of %r: not a service account", username)
            return False
        namespace = username[len(SERVICE_ACCOUNT_PREFIX):].split(":", 1)[0]
        if self.namespaces and namespace not in self.namespaces:
            log.warning("refused service account %s: not in a watched namespace", username)
            return False
        return True
