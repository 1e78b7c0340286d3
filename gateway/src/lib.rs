//! The sand gateway: drives the GlobalQueue, keeps the durable store, serves the HTTP API.
//!
//! - [`core`]: the one task that owns the [`GlobalQueue`](sand_protocol::global_queue::GlobalQueue);
//! - [`store`]: the durable store (redb, group commit);
//! - [`http`]: the client API, naming executions by [`exec_ref`]erences; [`serve`]: its
//!   connections; [`token`]: its bearer token;
//!   [`secret_file`]: how the token and the references' key are kept;
//! - [`metrics`]: what `/metrics` shows; [`trace`]: execution traces; [`ui`]: the page that
//!   draws them; [`telemetry`]: the same executions as OpenTelemetry spans;
//! - [`server`]: all of it started together.

pub mod core;
pub mod exec_ref;
pub mod http;
pub mod metrics;
pub mod secret_file;
pub mod serve;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod token;
pub mod trace;
pub mod ui;

pub use server::{Gateway, GatewayConfig, GatewayError};
