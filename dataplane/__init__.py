"""The Kanal dataplane: the proxy and the Snapshot types it consumes (its contract)."""
