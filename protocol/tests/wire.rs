//! Property tests of the wire encoding: decoding never panics, and what is encoded decodes, for
//! both envelopes and both kinds of message in them.

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use bytes::Bytes;
use proptest::prelude::*;
use sand_protocol::ids::{AppName, Attempt, ExecId, GrainName, Incarnation, Seq};
use sand_protocol::wire::{
    decode, encode, AppBundle, CallSpec, Cont, Down, Effects, EncodeError, NewCall, Outcome,
    Payload, Preview, Reason, Report, RunTrace, ServiceToGateway, ServiceToWorker, ToGateway,
    ToWorker, Up, WIRE_VERSION,
};

fn sample_frames() -> Vec<Vec<u8>> {
    let exec = ExecId::new(1, 2);
    let call = CallSpec {
        exec,
        call: exec.root_call(),
        attempt: Attempt(3),
        app: AppName::new("app").unwrap(),
        grain: GrainName::new("g").unwrap(),
        input: Payload::from("{\"k\":[1,2,3]}"),
        cont: Cont::Client,
        depth_left: 16,
        exec_ref: String::new(),
        traceparent: Default::default(),
    };
    let report = Report {
        exec,
        call: call.call,
        attempt: Attempt(0),
        outcome: Outcome::Done(Effects {
            spawned: vec![NewCall {
                call: call.call.child(0),
                grain: call.grain.clone(),
                input: call.input.clone(),
                cont: Cont::Join {
                    join: call.call.join(),
                    branch: 1,
                },
                owned: true,
                depth_left: 16,
                traceparent: Default::default(),
            }],
            ..Effects::default()
        }),
    };
    let run = RunTrace {
        exec,
        call: call.call,
        attempt: Attempt(0),
        grain: call.grain.clone(),
        dispatched: false,
        started_us: 1_700_000_000_000_000,
        ended_us: 1_700_000_000_012_000,
        error: None,
        stdout: Bytes::from_static(b"hello\n"),
        stderr: Bytes::new(),
        input: Preview::of(&call.input),
        output: None,
        emitted: vec![call.call.child(0)],
        cold: false,
        traceparent: Default::default(),
    };
    let bundle = ServiceToWorker::Bundle {
        app: call.app.clone(),
        bundle: Some(AppBundle {
            digest: "abc".into(),
            archive: Bytes::from_static(b"\x1f\x8b tar"),
        }),
    };
    vec![
        down(ToWorker::Dispatch {
            incarnation: Incarnation(1),
            call,
            reason: Reason::First,
        })
        .unwrap(),
        up(ToGateway::Progress {
            incarnation: Incarnation(1),
            seq: Seq(5),
            reports: vec![report],
        })
        .unwrap(),
        down(bundle).unwrap(),
        up(ServiceToGateway::Trace { runs: vec![run] }).unwrap(),
    ]
}

/// Encodes a message to a worker, in its envelope.
fn down(msg: impl Into<Down>) -> Result<Vec<u8>, EncodeError> {
    encode(&msg.into())
}

/// Encodes a message to the gateway, in its envelope.
fn up(msg: impl Into<Up>) -> Result<Vec<u8>, EncodeError> {
    encode(&msg.into())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Any byte string decodes to a message or an error.
    #[test]
    fn decoding_any_bytes_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<Up>(&bytes);
        let _ = decode::<Down>(&bytes);
        if let Some(b) = bytes.first_mut() {
            *b = WIRE_VERSION;
        }
        let _ = decode::<Up>(&bytes);
        let _ = decode::<Down>(&bytes);
    }

    /// Valid frames with random bytes overwritten or cut short decode to a message or an error.
    #[test]
    fn decoding_corrupted_frames_never_panics(
        which in 0usize..4,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut frame = sample_frames().swap_remove(which);
        for (at, byte) in edits {
            let i = at % frame.len();
            frame[i] = byte;
        }
        frame.truncate(cut % (frame.len() + 1));
        let _ = decode::<Up>(&frame);
        let _ = decode::<Down>(&frame);
    }

    /// Heartbeats of any value round-trip.
    #[test]
    fn heartbeats_round_trip(incarnation in any::<u64>(), running in any::<u32>()) {
        let m = ToGateway::Heartbeat { incarnation: Incarnation(incarnation), running };
        prop_assert_eq!(decode::<Up>(&up(m.clone()).unwrap()), Ok(Up::Protocol(m)));
    }

    /// App-change notices of any app name round-trip, as service messages.
    #[test]
    fn app_changes_round_trip(name in "[a-z][a-z0-9-]{0,30}") {
        let m = ServiceToWorker::AppChanged { app: AppName::new(&name).unwrap() };
        prop_assert_eq!(decode::<Down>(&down(m.clone()).unwrap()), Ok(Down::Service(m)));
    }
}

#[test]
fn sample_frames_decode() {
    let frames = sample_frames();
    assert!(matches!(decode::<Down>(&frames[0]), Ok(Down::Protocol(_))));
    assert!(matches!(decode::<Up>(&frames[1]), Ok(Up::Protocol(_))));
    assert!(matches!(decode::<Down>(&frames[2]), Ok(Down::Service(_))));
    assert!(matches!(decode::<Up>(&frames[3]), Ok(Up::Service(_))));
}
