//! Each grain binary, started as the worker starts a Rust grain (its zygote, over fd 3), answers
//! as the app needs: split fans out one measure per word and joins at total, measure counts
//! characters, total sums in order. Building this test is also what builds the binaries that
//! the end-to-end test (`tests/cluster.rs` of sand) deploys.

use std::sync::Arc;
use std::time::Duration;

use sand_protocol::ids::{Attempt, CallId, GrainName};
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::{ErrorKind, Payload};
use sand_worker::runtime::launch::HostLauncher;
use sand_worker::runtime::zygote::{Zygote, ZygoteRuntime, ZygoteSpec};
use sand_worker::runtime::CallRequest;

/// The grain `binary`, started as a zygote in a scratch app directory, answering `input`.
async fn call(binary: &str, input: &str) -> GrainResult {
    let app = tempfile::tempdir().expect("a scratch directory");
    let spec = ZygoteSpec::new(
        ZygoteRuntime::Rust {
            binary: binary.into(),
        },
        app.path(),
    );
    let zygote = Zygote::start(Arc::new(HostLauncher), spec)
        .await
        .expect("the grain starts");
    let request = CallRequest {
        exec: String::new(),
        call: CallId(2),
        attempt: Attempt(0),
        input: Payload::from(input),
        timeout: Some(Duration::from_secs(10)),
        trace: String::new(),
    };
    let report = tokio::time::timeout(Duration::from_secs(30), zygote.call(request))
        .await
        .expect("the call ends in time");
    report.result
}

fn grain(name: &str) -> GrainName {
    GrainName::new(name).expect("a grain name")
}

#[tokio::test]
async fn split_fans_out_one_measure_per_word_joined_by_total() {
    let split = env!("CARGO_BIN_EXE_fanout-split");
    assert_eq!(
        call(split, r#""chained functions""#).await,
        GrainResult::FanOut {
            branches: vec![
                (grain("measure"), "\"chained\"".into()),
                (grain("measure"), "\"functions\"".into()),
            ],
            join: grain("total"),
        }
    );
    assert_eq!(
        call(split, r#""  ""#).await,
        GrainResult::Return(r#"{"letters":0,"words":0}"#.into())
    );
    match call(split, "7").await {
        GrainResult::Error(e) => {
            assert_eq!(e.kind, ErrorKind::Raised);
            assert!(e.message.contains("split takes a JSON string"), "{e:?}");
        }
        other => panic!("a number was not refused: {other:?}"),
    }
}

#[tokio::test]
async fn measure_counts_characters_and_total_sums_in_order() {
    let measure = env!("CARGO_BIN_EXE_fanout-measure");
    assert_eq!(
        call(measure, r#""sänd""#).await,
        GrainResult::Return("4".into())
    );
    let total = env!("CARGO_BIN_EXE_fanout-total");
    assert_eq!(
        call(total, "[10, 6, 10]").await,
        GrainResult::Return(r#"{"letters":26,"words":3}"#.into())
    );
}
