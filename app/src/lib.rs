//! sand apps: the `sand.toml` manifest and app bundles.
