//! The sand gateway: drives the GlobalQueue, keeps the durable store, serves the HTTP API.
