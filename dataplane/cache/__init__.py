"""The HTTP cache of both listeners (RFC 9111, a shared cache).

`policy` decides (pure: what may be stored, keys, freshness, revalidation); `rule`
holds a rule's settings precompiled for the request path; `store` keeps entries in
memory (LRU, bounded in bytes) with an optional disk spill; `exchange` is the glue the
reverse proxy calls at the few points of an exchange where the cache acts.
"""
