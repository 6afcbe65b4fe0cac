"""The Kanal dataplane: the proxy that runs Snapshots (types in `kanal.contract`)."""

from kanal.dataplane import compiled as _compiled

BUILD = _compiled.choose()
"""How the hot modules run: `compiled`, `pure` or `stale` (see `compiled.py`)."""
