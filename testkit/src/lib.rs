//! What sand's tests and benchmarks share, so that each mechanism is written once: polling
//! until a condition holds ([`wait`]), what /proc says about processes ([`proc`]), latency
//! percentiles ([`stats`]), the benchmark chain's grains ([`apps`]); with the `cgroups`
//! feature, the check that cgroups are usable ([`cgroups`]); and with the `cluster` feature, a
//! cluster of real `sand` processes ([`cluster`]) whose workers can dial through an emulated
//! link ([`link`]), with the process helpers it is made of ([`process`]); with the `contract`
//! feature, the API's OpenAPI document as a check of every answer a test sees ([`contract`]).
//!
//! A dev-dependency only: nothing shipped depends on it.

pub mod apps;
#[cfg(feature = "cgroups")]
pub mod cgroups;
#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "contract")]
pub mod contract;
#[cfg(feature = "cluster")]
pub mod link;
pub mod proc;
#[cfg(feature = "cluster")]
pub mod process;
pub mod stats;
pub mod wait;
