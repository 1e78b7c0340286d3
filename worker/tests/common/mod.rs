//! Helpers shared by the runtime tests: temporary app dirs, requests, and bounded runs.

#![allow(dead_code)] // Each test file uses its own subset.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sand_protocol::ids::{Attempt, CallId, GrainName};
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::{ErrorKind, GrainError, Payload};
use sand_worker::runtime::{CallReport, CallRequest};

/// The interpreter the tests use.
pub const PYTHON: &str = "/usr/bin/python3";

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sand-worker-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes a file (made executable when it starts with `#!`).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write a test file");
        if text.starts_with("#!") {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The execution reference of [`request`]'s calls: execution 11, as the gateway would name it.
pub const EXEC_REF: &str = "000000000000000b0123456789abcdef0123456789abcdef";

/// The run's place in its trace that [`request`] gives.
pub const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// What a grain's `ctx` gives for [`request`]: the reference, the call as 16 hex digits (22),
/// the attempt, as the HTTP API spells them; and the run's traceparent.
pub fn ctx_of_request() -> serde_json::Value {
    serde_json::json!([EXEC_REF, "0000000000000016", 3, TRACE])
}

/// A request with `input` and a 20 s timeout.
pub fn request(input: &str) -> CallRequest {
    CallRequest {
        exec: EXEC_REF.into(),
        call: CallId(22),
        attempt: Attempt(3),
        input: Payload::from(input),
        timeout: Some(Duration::from_secs(20)),
        trace: TRACE.into(),
    }
}

/// Runs `f` with a hard bound, so a hung test fails instead of hanging.
pub async fn bounded<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("the test ran past its bound")
}

pub fn grain(name: &str) -> GrainName {
    GrainName::new(name).expect("a valid grain name")
}

/// The returned value's JSON text.
pub fn returned(report: &CallReport) -> String {
    match &report.result {
        GrainResult::Return(p) => String::from_utf8(p.0.to_vec()).expect("utf-8"),
        other => panic!(
            "expected a value, got {other:?} (stderr {:?})",
            report.stderr
        ),
    }
}

/// The returned value, parsed.
pub fn value(report: &CallReport) -> serde_json::Value {
    serde_json::from_str(&returned(report)).expect("JSON")
}

/// Asserts what the test grains answer to `{"kind":"next"}` (hand `next_input` to `second`)
/// and to `{"kind":"fan_out"}` (`1` to `left` and `right_input` to `right`, joined at `join`),
/// given those two reports.
pub fn assert_next_and_fan_out(
    next: &CallReport,
    fan_out: &CallReport,
    next_input: &str,
    right_input: &str,
) {
    assert_eq!(
        next.result,
        GrainResult::Next {
            grain: grain("second"),
            input: next_input.into()
        }
    );
    assert_eq!(
        fan_out.result,
        GrainResult::FanOut {
            branches: vec![
                (grain("left"), "1".into()),
                (grain("right"), right_input.into())
            ],
            join: grain("join"),
        }
    );
}

/// The error, asserting its kind.
pub fn error(report: &CallReport, kind: ErrorKind) -> String {
    match &report.result {
        GrainResult::Error(GrainError { kind: k, message }) if *k == kind => message.clone(),
        other => panic!("expected a {kind:?} error, got {other:?}"),
    }
}
