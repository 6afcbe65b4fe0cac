"""Route filters from the models to the Snapshot (the compiler's part for `filters`).

Pure, like the compiler: the models have checked every value already, so this only
changes shapes: camelCase settings to `contract.snapshot` filters, sizes to bytes,
Upstream names to `namespace/name` keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from kanal.contract import snapshot as snap
from kanal.operator.models import (
    FilterSpec,
    HeaderModifierSpec,
    HTTPHeaderSpec,
    PathModifierSpec,
    parse_byte_size,
)


def compile_filters(filters: Sequence[FilterSpec], namespace: str) -> tuple[snap.Filter, ...]:
    """A rule's or a backend's filters, in the order written."""
    return tuple(_filter(item, namespace) for item in filters)


def mirrored_upstreams(rule: snap.Rule) -> list[str]:
    """The Upstream keys a rule's RequestMirror filters send copies to."""
    return [f.request_mirror.upstream for f in rule.filters if f.request_mirror is not None]


def _headers(items: Sequence[HTTPHeaderSpec]) -> tuple[snap.HeaderValue, ...]:
    return tuple(snap.HeaderValue(h.name, h.value) for h in items)


def _modifier(spec: HeaderModifierSpec | None) -> snap.HeaderModifier | None:
    if spec is None:
        return None
    return snap.HeaderModifier(set=_headers(spec.set), add=_headers(spec.add),
                               remove=tuple(spec.remove))


def _path(spec: PathModifierSpec | None) -> snap.PathModifier | None:
    return None if spec is None else snap.PathModifier(spec.type, spec.value)


def _filter(item: FilterSpec, namespace: str) -> snap.Filter:
    rewrite = item.url_rewrite
    redirect = item.request_redirect
    mirror = item.request_mirror
    cors = item.cors
    direct = item.direct_response
    compression = item.compression
    if item.type == "Compression" and compression is None:
        compression_value: snap.Compression | None = snap.Compression()
    elif compression is not None:
        compression_value = snap.Compression(
            algorithms=tuple(compression.algorithms),
            content_types=tuple(t.lower() for t in compression.content_types),
            min_size=parse_byte_size(compression.min_size))
    else:
        compression_value = None
    return snap.Filter(
        type=item.type,
        request_header_modifier=_modifier(item.request_header_modifier),
        response_header_modifier=_modifier(item.response_header_modifier),
        url_rewrite=None if rewrite is None else snap.URLRewrite(
            hostname=rewrite.hostname, path=_path(rewrite.path)),
        request_redirect=None if redirect is None else snap.RequestRedirect(
            scheme=redirect.scheme, hostname=redirect.hostname, port=redirect.port,
            path=_path(redirect.path), status_code=redirect.status_code,
            keep_query=redirect.keep_query),
        request_mirror=None if mirror is None else snap.RequestMirror(
            upstream=f"{namespace}/{mirror.upstream}", percent=mirror.percent,
            max_body_size=parse_byte_size(mirror.max_body_size)),
        cors=None if cors is None else snap.CORS(
            allow_origins=tuple(cors.allow_origins), allow_methods=tuple(cors.allow_methods),
            allow_headers=tuple(cors.allow_headers), expose_headers=tuple(cors.expose_headers),
            allow_credentials=cors.allow_credentials, max_age=cors.max_age),
        direct_response=None if direct is None else snap.DirectResponse(
            status_code=direct.status_code, headers=_headers(direct.headers), body=direct.body),
        compression=compression_value,
    )
