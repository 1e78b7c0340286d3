//! Write sand grains in Rust: `serve(handler)` is the zygote loop.
