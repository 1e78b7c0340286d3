//! A grain's result document (the same for every runtime) and its checks.
//!
//! The document is JSON, one of:
//!
//! - `{"return": v}`: finish with the value `v`;
//! - `{"next": ["grain", v]}`: call `grain` with `v` next;
//! - `{"fan_out": [["grain", v], ...], "join": "grain"}`: call each branch, then `join` with the
//!   list of their values, in order;
//! - `{"error": "text"}`: the handler failed (`Raised`);
//! - `{"error": "text", "kind": "bad_output"}`: the runtime could not encode what the handler
//!   returned (`BadOutput`).
//!
//! Values are kept as the exact bytes the grain wrote, never re-encoded. Anything else, a bad
//! grain name, a fan-out of 0 or more than [`FANOUT_MAX`] branches, or a value above
//! [`PAYLOAD_BYTES_MAX`], is `BadOutput`.

use std::collections::BTreeMap;

use sand_protocol::ids::GrainName;
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::{ErrorKind, GrainError, Payload, FANOUT_MAX, PAYLOAD_BYTES_MAX};
use serde_json::value::RawValue;

/// Reads a result document.
pub(crate) fn parse(doc: &[u8]) -> GrainResult {
    match parse_doc(doc) {
        Ok(result) => result,
        Err(why) => GrainResult::Error(GrainError::new(ErrorKind::BadOutput, why)),
    }
}

fn parse_doc(doc: &[u8]) -> Result<GrainResult, String> {
    let fields: BTreeMap<String, &RawValue> =
        serde_json::from_slice(doc).map_err(|e| format!("the result is not a JSON object: {e}"))?;
    let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    match keys.as_slice() {
        ["return"] => Ok(GrainResult::Return(payload(fields["return"])?)),
        ["next"] => {
            let (grain, value): (String, &RawValue) = serde_json::from_str(fields["next"].get())
                .map_err(|e| format!("\"next\" must be [grain, value]: {e}"))?;
            Ok(GrainResult::Next {
                grain: grain_name(grain)?,
                input: payload(value)?,
            })
        }
        ["fan_out", "join"] => {
            let branches: Vec<(String, &RawValue)> = serde_json::from_str(fields["fan_out"].get())
                .map_err(|e| format!("\"fan_out\" must be a list of [grain, value]: {e}"))?;
            if branches.is_empty() || branches.len() > FANOUT_MAX {
                return Err(format!(
                    "a fan-out needs 1 to {FANOUT_MAX} branches, not {}",
                    branches.len()
                ));
            }
            let join: String = serde_json::from_str(fields["join"].get())
                .map_err(|e| format!("\"join\" must be a grain name: {e}"))?;
            let branches = branches
                .into_iter()
                .map(|(g, v)| Ok((grain_name(g)?, payload(v)?)))
                .collect::<Result<Vec<_>, String>>()?;
            Ok(GrainResult::FanOut {
                branches,
                join: grain_name(join)?,
            })
        }
        ["error"] | ["error", "kind"] => {
            let message: String = serde_json::from_str(fields["error"].get())
                .map_err(|e| format!("\"error\" must be a string: {e}"))?;
            let kind = match fields.get("kind").map(|k| k.get()) {
                None => ErrorKind::Raised,
                Some("\"bad_output\"") => ErrorKind::BadOutput,
                Some(other) => return Err(format!("unknown error kind {other}")),
            };
            Ok(GrainResult::Error(GrainError::new(kind, message)))
        }
        _ => Err(format!(
            "the result must hold \"return\", \"next\", \"fan_out\" and \"join\", or \"error\"; \
             it holds {keys:?}"
        )),
    }
}

fn payload(value: &RawValue) -> Result<Payload, String> {
    let bytes = value.get().as_bytes();
    if bytes.len() > PAYLOAD_BYTES_MAX {
        return Err(format!(
            "a value of {} bytes exceeds the {PAYLOAD_BYTES_MAX} byte limit",
            bytes.len()
        ));
    }
    Ok(Payload::new(bytes.to_vec()))
}

fn grain_name(name: String) -> Result<GrainName, String> {
    GrainName::new(name).map_err(|e| format!("a bad grain name: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(doc: &str) -> String {
        match parse(doc.as_bytes()) {
            GrainResult::Error(GrainError {
                kind: ErrorKind::BadOutput,
                message,
            }) => message,
            other => panic!("{doc} gave {other:?}"),
        }
    }

    #[test]
    fn each_shape_parses_and_keeps_the_value_bytes() {
        assert_eq!(
            parse(br#"{"return": {"a": [1, 2]}}"#),
            GrainResult::Return(Payload::from(r#"{"a": [1, 2]}"#))
        );
        assert_eq!(
            parse(br#"{"return":null}"#),
            GrainResult::Return("null".into())
        );
        let g = |s: &str| GrainName::new(s).expect("valid");
        assert_eq!(
            parse(br#"{"next":["b",5]}"#),
            GrainResult::Next {
                grain: g("b"),
                input: "5".into()
            }
        );
        assert_eq!(
            parse(br#"{"fan_out":[["x",1],["y","z"]],"join":"j"}"#),
            GrainResult::FanOut {
                branches: vec![(g("x"), "1".into()), (g("y"), "\"z\"".into())],
                join: g("j")
            }
        );
        assert_eq!(
            parse(br#"{"error":"ValueError: no"}"#),
            GrainResult::Error(GrainError::new(ErrorKind::Raised, "ValueError: no"))
        );
    }

    #[test]
    fn every_malformed_document_is_bad_output() {
        assert!(bad("not json").contains("not a JSON object"));
        assert!(bad("[1]").contains("not a JSON object"));
        assert!(bad(r#"{"return":1,"next":["a",1]}"#).contains("must hold"));
        assert!(bad(r#"{"next":["../etc",1]}"#).contains("bad grain name"));
        assert!(bad(r#"{"next":"b"}"#).contains("[grain, value]"));
        assert!(bad(r#"{"fan_out":[],"join":"j"}"#).contains("1 to 256"));
        let many = format!(
            r#"{{"fan_out":[{}],"join":"j"}}"#,
            vec![r#"["a",1]"#; FANOUT_MAX + 1].join(",")
        );
        assert!(bad(&many).contains("not 257"));
        assert!(bad(r#"{"error":"x","kind":"weird"}"#).contains("unknown error kind"));
        let big = format!(r#"{{"return":"{}"}}"#, "a".repeat(PAYLOAD_BYTES_MAX));
        assert!(bad(&big).contains("byte limit"));
    }
}
