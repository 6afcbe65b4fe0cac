"""gRPC status codes by name, as both planes spell them (`retryOn`, answers)."""

from __future__ import annotations

STATUS_CODES = {
    "ok": 0, "cancelled": 1, "unknown": 2, "invalid-argument": 3, "deadline-exceeded": 4,
    "not-found": 5, "already-exists": 6, "permission-denied": 7, "resource-exhausted": 8,
    "failed-precondition": 9, "aborted": 10, "out-of-range": 11, "unimplemented": 12,
    "internal": 13, "unavailable": 14, "data-loss": 15, "unauthenticated": 16,
}
"""Names in lower case with dashes, as Envoy's `x-envoy-retry-grpc-on` writes them."""

STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}

RETRYABLE_NAMES = tuple(name for name in STATUS_CODES if name != "ok")
"""What `retryOn` accepts besides HTTP conditions: a gRPC answer with this status."""
