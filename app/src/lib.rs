//! sand apps: the `sand.toml` manifest and app bundles.
//!
//! - [`manifest`]: parses and checks `sand.toml`; every mistake names its key and line.
//! - [`bundle`]: packs an app directory into a deterministic gzip'd tar, and unpacks one
//!   received from elsewhere as hostile input.
//!
//! Both sit at a boundary (files a user wrote, bytes from the network): they return errors,
//! never panic.

pub mod bundle;
mod locate;
pub mod manifest;

pub use bundle::{digest, pack, unpack, BundleError};
pub use manifest::{Code, Grain, Manifest, ManifestError, Position, Retries, Runtime};
