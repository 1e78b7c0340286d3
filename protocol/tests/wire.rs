//! Property tests of the wire encoding: decoding never panics, and what is encoded decodes.

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use proptest::prelude::*;
use sand_protocol::ids::{AppName, Attempt, ExecId, GrainName, Incarnation, Seq};
use sand_protocol::wire::{
    decode, encode, CallSpec, Cont, Effects, NewCall, Outcome, Payload, Reason, Report, ToGateway,
    ToWorker, WIRE_VERSION,
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
            }],
            ..Effects::default()
        }),
    };
    vec![
        encode(&ToWorker::Dispatch {
            incarnation: Incarnation(1),
            call,
            reason: Reason::First,
        })
        .unwrap(),
        encode(&ToGateway::Progress {
            incarnation: Incarnation(1),
            seq: Seq(5),
            reports: vec![report],
        })
        .unwrap(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Any byte string decodes to a message or an error.
    #[test]
    fn decoding_any_bytes_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<ToGateway>(&bytes);
        let _ = decode::<ToWorker>(&bytes);
        if let Some(b) = bytes.first_mut() {
            *b = WIRE_VERSION;
        }
        let _ = decode::<ToGateway>(&bytes);
        let _ = decode::<ToWorker>(&bytes);
    }

    /// Valid frames with random bytes overwritten or cut short decode to a message or an error.
    #[test]
    fn decoding_corrupted_frames_never_panics(
        which in 0usize..2,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut frame = sample_frames().swap_remove(which);
        for (at, byte) in edits {
            let i = at % frame.len();
            frame[i] = byte;
        }
        frame.truncate(cut % (frame.len() + 1));
        let _ = decode::<ToGateway>(&frame);
        let _ = decode::<ToWorker>(&frame);
    }

    /// Heartbeats of any value round-trip.
    #[test]
    fn heartbeats_round_trip(incarnation in any::<u64>(), running in any::<u32>()) {
        let m = ToGateway::Heartbeat { incarnation: Incarnation(incarnation), running };
        prop_assert_eq!(decode::<ToGateway>(&encode(&m).unwrap()), Ok(m));
    }
}

#[test]
fn sample_frames_decode() {
    let frames = sample_frames();
    assert!(decode::<ToWorker>(&frames[0]).is_ok());
    assert!(decode::<ToGateway>(&frames[1]).is_ok());
}
