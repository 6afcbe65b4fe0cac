"""A rule's cache settings, precompiled once per route table (pure).

`RouteTable.build` makes one `RuleCache` per rule with a `cache` section (None
otherwise), so the request path reads ready values: a frozenset of statuses, the
extra key parts' names as bytes.
"""

from __future__ import annotations

from kanal.contract.snapshot import Cache
from kanal.dataplane.cache.policy import HeaderList, cookie_values, field_value


class RuleCache:
    """What the cache needs of a rule (or of an EgressPolicy) at request time."""

    __slots__ = ("allow_set_cookie", "default_ttl", "key_cookies", "key_headers",
                 "max_object_size", "settings", "statuses")

    def __init__(self, settings: Cache) -> None:
        self.settings = settings
        self.statuses = frozenset(settings.statuses)
        self.default_ttl = settings.default_ttl
        self.max_object_size = settings.max_object_size
        self.allow_set_cookie = settings.allow_set_cookie
        self.key_headers = settings.key_headers
        self.key_cookies = settings.key_cookies

    def extra_key(self, headers: HeaderList, cookie: bytes | None) -> str:
        """The request's values of the rule's extra key parts ("" when it has none)."""
        if not self.key_headers and not self.key_cookies:
            return ""
        parts = [f"h:{name}={field_value(headers, name)}" for name in self.key_headers]
        parts += [f"c:{name}={value}" for name, value in
                  zip(self.key_cookies, cookie_values(cookie, self.key_cookies), strict=True)]
        return "\n" + "\n".join(parts)


def rule_cache(settings: Cache | None) -> RuleCache | None:
    """The precompiled settings, or None when caching is absent or disabled."""
    if settings is None or not settings.enabled:
        return None
    return RuleCache(settings)
