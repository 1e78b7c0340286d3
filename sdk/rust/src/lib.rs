//! Write sand grains in Rust: `serve(handler)` is the zygote loop.
//!
//! ```no_run
//! use sand_grain::{serve, Ctx, Output, Value};
//!
//! fn double(event: Value, ctx: &Ctx) -> Result<Output, String> {
//!     let n = event.as_i64().ok_or("expected a number")?;
//!     if n > 100 {
//!         return Ok(ctx.next("shrink", Value::from(n)));
//!     }
//!     Ok(Output::Return(Value::from(n * 2)))
//! }
//!
//! fn main() {
//!     serve(double)
//! }
//! ```
//!
//! The binary is the grain's zygote: sand starts it once, with its channel on fd 3; `serve`
//! forks an instance per call (one always forked ahead), exactly like the Python runtime, over
//! the same [`wire`]. Call `serve` first thing in `main`, before any thread starts: a zygote
//! forks, and only a single-threaded process may fork safely.

pub mod wire;
mod zygote;

pub use serde_json::Value;
pub use zygote::serve;

/// Who a call is: hand these to the outside world to make side effects idempotent. Each is
/// spelled as the HTTP API spells it, so an id a grain logs can be pasted into `sand logs`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Ctx {
    /// The execution the call belongs to: its reference, as the API names it.
    pub exec: String,
    /// The call: 16 hex digits, as in the execution's trace.
    pub call: String,
    /// Which attempt of the call this is (a retry or a recovery has a larger one).
    pub attempt: u64,
    /// This run's W3C `traceparent` (its span in the execution's trace), for spans of the
    /// handler's own to hang from; empty when the execution is not traced.
    pub trace: String,
}

impl Ctx {
    /// Finish by calling `grain` with `input` next (it answers in this call's place).
    pub fn next(&self, grain: impl Into<String>, input: Value) -> Output {
        Output::Next {
            grain: grain.into(),
            input,
        }
    }

    /// Finish by calling each `(grain, input)`, then `join` with the list of their values, in
    /// order.
    pub fn fan_out<G: Into<String>>(
        &self,
        branches: impl IntoIterator<Item = (G, Value)>,
        join: impl Into<String>,
    ) -> Output {
        Output::FanOut {
            branches: branches.into_iter().map(|(g, v)| (g.into(), v)).collect(),
            join: join.into(),
        }
    }
}

/// How a handler finishes a call.
#[derive(Clone, PartialEq, Debug)]
pub enum Output {
    /// With a value.
    Return(Value),
    /// By calling another grain.
    Next {
        /// The grain.
        grain: String,
        /// Its input.
        input: Value,
    },
    /// By fanning out and joining.
    FanOut {
        /// Each branch's grain and input.
        branches: Vec<(String, Value)>,
        /// The grain that gets the branch values.
        join: String,
    },
}

impl From<Value> for Output {
    fn from(value: Value) -> Self {
        Output::Return(value)
    }
}

impl Output {
    /// The result document (see [`wire`]).
    fn document(self) -> Value {
        match self {
            Output::Return(v) => serde_json::json!({ "return": v }),
            Output::Next { grain, input } => serde_json::json!({ "next": [grain, input] }),
            Output::FanOut { branches, join } => serde_json::json!({
                "fan_out": branches.into_iter().map(|(g, v)| serde_json::json!([g, v])).collect::<Vec<_>>(),
                "join": join,
            }),
        }
    }
}
