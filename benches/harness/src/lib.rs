//! sand-bench's library: the benchmarks' parts, and the chaos run's
//! history check. The `sand-bench` binary drives them; the root package's `tests/history.rs`
//! runs a short chaos run as part of `cargo test`.

pub mod alternatives;
pub mod apps;
pub mod chaos;
pub mod cold_start;
pub mod measure;
pub mod plot;
pub mod recovery;
pub mod report;
