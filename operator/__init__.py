"""The Kanal control plane: API models, compiler, sources, and the `kanal` command line."""
