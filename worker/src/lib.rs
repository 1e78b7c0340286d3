//! The sand worker: drives the LocalBus and runs grains in zygotes inside app sandboxes.

pub mod runtime;

pub mod driver;
pub mod host;
