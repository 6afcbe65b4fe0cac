"""camelCase keys for the JSON the admin endpoints show.

The Snapshot's fields are Python names (`query_params`, `circuit_breaker`); the
resources users write say `queryParams` and `circuitBreaker`. /config shows one
casing, the resources', so what a user reads there is what they typed. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

_CAMEL: dict[str, str] = {}


def camel(name: str) -> str:
    """`circuit_breaker` -> `circuitBreaker`; names without `_` are returned as they are."""
    known = _CAMEL.get(name)
    if known is None:
        head, *rest = name.split("_")
        known = _CAMEL[name] = head + "".join(part[:1].upper() + part[1:] for part in rest)
    return known


def camel_keys(value: Any) -> Any:
    """A copy of a JSON-ready value with every object key in camelCase.

    Only keys change: values (host names, header names, paths) are user data and are
    kept byte for byte.
    """
    if isinstance(value, dict):
        return {camel(key) if isinstance(key, str) else key: camel_keys(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [camel_keys(item) for item in value]
    return value


def camel_document(document: dict[str, Any]) -> dict[str, Any]:
    """`camel_keys` of a JSON object."""
    return {camel(key): camel_keys(item) for key, item in document.items()}
