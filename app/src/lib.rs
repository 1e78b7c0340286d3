//! sand apps: the `sand.toml` manifest and app bundles.
//!
//! - [`manifest`]: parses and checks `sand.toml`; every mistake names its key and line.
//! - [`policy`]: the operator's policy, which decides what an app's manifest may ask of the
//!   host (interpreters, network, memory).
//! - [`bundle`]: packs an app directory into a deterministic gzip'd tar, and unpacks one
//!   received from elsewhere as hostile input.
//!
//! Both sit at a boundary (files a user wrote, bytes from the network): they return errors,
//! never panic.

pub mod bundle;
mod locate;
pub mod manifest;
pub mod policy;

pub use bundle::{digest, is_digest, pack, unpack, BundleError};
pub use manifest::{Code, Grain, Manifest, ManifestError, Position, Python, Retries, Runtime};
pub use policy::{Interpreter, Policy, PolicyError, PythonChoice};
