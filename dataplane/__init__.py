"""The Kanal dataplane: the proxy that runs Snapshots (types in `kanal.contract`)."""
