//! The chaos run's checker: a pure function over what the clients recorded, so that a
//! verdict depends on the history alone and can be tested without a cluster.

use std::collections::BTreeMap;

use serde_json::Value;

/// One request: its idempotency key, its input, and what every POST with the key got back.
#[derive(Clone, Debug, PartialEq)]
pub struct Submission {
    /// The `Idempotency-Key` every POST of this request carried.
    pub key: String,
    /// The entry grain's input.
    pub input: u64,
    /// POSTs sent with the key, failed ones included.
    pub posts: u32,
    /// The execution id of every POST that was answered, in order.
    pub executions: Vec<String>,
}

/// What polling saw of one execution.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// The body of the last 200 answer to `GET /v1/executions/{id}`, if one came.
    pub last: Option<Value>,
    /// The body of a 404 answer, if one came: the gateway did not know the execution.
    pub not_found: Option<Value>,
}

/// Everything the clients recorded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    /// One per request, by request number.
    pub submissions: Vec<Submission>,
    /// One per execution id that a POST returned.
    pub observations: BTreeMap<String, Observation>,
}

/// A way the run went wrong.
#[derive(Clone, Debug, PartialEq)]
pub enum Problem {
    /// No POST of the request was ever answered with an execution.
    Unaccepted { key: String },
    /// POSTs with one key were answered with different executions.
    KeyForked {
        key: String,
        executions: Vec<String>,
    },
    /// POSTs with different keys were answered with the same execution.
    SharedExecution {
        execution: String,
        keys: Vec<String>,
    },
    /// The gateway answered 404 for an execution it had returned.
    Lost { execution: String, body: Value },
    /// Not seen to end by the deadline; the body of the last poll, if one was answered.
    Running {
        execution: String,
        body: Option<Value>,
    },
    /// Ended `failed`.
    Failed { execution: String, body: Value },
    /// Ended `succeeded`, with an output other than the one its input calls for.
    WrongOutput {
        execution: String,
        input: u64,
        expected: u64,
        body: Value,
    },
}

impl Problem {
    /// A short name for the kind of problem.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unaccepted { .. } => "unaccepted",
            Self::KeyForked { .. } => "key with several executions",
            Self::SharedExecution { .. } => "execution with several keys",
            Self::Lost { .. } => "lost",
            Self::Running { .. } => "running",
            Self::Failed { .. } => "failed",
            Self::WrongOutput { .. } => "wrong output",
        }
    }

    /// What the problem is about: a key or an execution id.
    pub fn subject(&self) -> &str {
        match self {
            Self::Unaccepted { key } | Self::KeyForked { key, .. } => key,
            Self::SharedExecution { execution, .. }
            | Self::Lost { execution, .. }
            | Self::Running { execution, .. }
            | Self::Failed { execution, .. }
            | Self::WrongOutput { execution, .. } => execution,
        }
    }

    /// The evidence: the execution's body, or the ids and keys involved.
    pub fn evidence(&self) -> Value {
        match self {
            Self::Unaccepted { .. } => Value::Null,
            Self::KeyForked { executions, .. } => executions.clone().into(),
            Self::SharedExecution { keys, .. } => keys.clone().into(),
            Self::Running { body, .. } => body.clone().unwrap_or(Value::Null),
            Self::Lost { body, .. } | Self::Failed { body, .. } => body.clone(),
            Self::WrongOutput { expected, body, .. } => {
                serde_json::json!({"expected": expected, "body": body})
            }
        }
    }
}

/// The checker's account of a history.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Requests, one key each.
    pub requests: usize,
    /// POSTs sent, retries and re-sends included.
    pub posts: u64,
    /// Distinct executions returned.
    pub executions: usize,
    /// Executions that succeeded with the right output.
    pub succeeded: usize,
    /// Executions that succeeded with a wrong output.
    pub wrong: usize,
    /// Executions that ended `failed`.
    pub failed: usize,
    /// Executions not seen to end.
    pub running: usize,
    /// Executions the gateway answered 404 for.
    pub lost: usize,
    /// Everything that went wrong, requests first, then executions in id order.
    pub problems: Vec<Problem>,
}

impl Verdict {
    /// Nothing lost, nothing wrong.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks a history: each key got exactly one execution and each execution exactly one key;
/// every execution was seen to succeed, with `expected(input)` as its output; none was
/// forgotten by the gateway (a 404), failed, or still running when polling ended.
pub fn check(history: &History, expected: fn(u64) -> u64) -> Verdict {
    let mut problems = Vec::new();
    // Each execution, with the requests (key, input) that were answered with it.
    let mut owners: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
    let mut posts = 0u64;
    for s in &history.submissions {
        posts += u64::from(s.posts);
        let mut distinct: Vec<&String> = Vec::new();
        for id in &s.executions {
            if !distinct.contains(&id) {
                distinct.push(id);
            }
        }
        match distinct.as_slice() {
            [] => problems.push(Problem::Unaccepted { key: s.key.clone() }),
            [_] => {}
            many => problems.push(Problem::KeyForked {
                key: s.key.clone(),
                executions: many.iter().map(|id| id.to_string()).collect(),
            }),
        }
        for id in distinct {
            owners.entry(id).or_default().push((&s.key, s.input));
        }
    }
    let mut verdict = Verdict {
        requests: history.submissions.len(),
        posts,
        executions: owners.len(),
        succeeded: 0,
        wrong: 0,
        failed: 0,
        running: 0,
        lost: 0,
        problems: Vec::new(),
    };
    let unseen = Observation::default();
    for (&id, keys) in &owners {
        let execution = id.to_owned();
        if keys.len() > 1 {
            problems.push(Problem::SharedExecution {
                execution: execution.clone(),
                keys: keys.iter().map(|(k, _)| k.to_string()).collect(),
            });
        }
        let input = keys[0].1;
        let seen = history.observations.get(id).unwrap_or(&unseen);
        if let Some(body) = &seen.not_found {
            verdict.lost += 1;
            problems.push(Problem::Lost {
                execution,
                body: body.clone(),
            });
            continue;
        }
        let Some(body) = &seen.last else {
            verdict.running += 1;
            problems.push(Problem::Running {
                execution,
                body: None,
            });
            continue;
        };
        let want = expected(input);
        match body["status"].as_str() {
            Some("succeeded") if body["output"].as_u64() == Some(want) => verdict.succeeded += 1,
            Some("succeeded") => {
                verdict.wrong += 1;
                problems.push(Problem::WrongOutput {
                    execution,
                    input,
                    expected: want,
                    body: body.clone(),
                });
            }
            Some("failed") => {
                verdict.failed += 1;
                problems.push(Problem::Failed {
                    execution,
                    body: body.clone(),
                });
            }
            _ => {
                verdict.running += 1;
                problems.push(Problem::Running {
                    execution,
                    body: Some(body.clone()),
                });
            }
        }
    }
    verdict.problems = problems;
    verdict
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn triple(x: u64) -> u64 {
        3 * x
    }

    fn submission(key: &str, input: u64, executions: &[&str]) -> Submission {
        Submission {
            key: key.to_owned(),
            input,
            posts: executions.len() as u32,
            executions: executions.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn seen(body: Value) -> Observation {
        Observation {
            last: Some(body),
            not_found: None,
        }
    }

    /// Two requests, each answered (twice for the first) with its own execution; both
    /// succeeded with the right output.
    fn clean() -> History {
        History {
            submissions: vec![
                submission("k1", 1, &["e1", "e1"]),
                submission("k2", 2, &["e2"]),
            ],
            observations: [
                ("e1", seen(json!({"status": "succeeded", "output": 3}))),
                ("e2", seen(json!({"status": "succeeded", "output": 6}))),
            ]
            .into_iter()
            .map(|(id, o)| (id.to_owned(), o))
            .collect(),
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let v = check(&clean(), triple);
        assert!(v.passed(), "{:?}", v.problems);
        assert_eq!(
            (v.requests, v.posts, v.executions, v.succeeded),
            (2, 3, 2, 2)
        );
    }

    #[test]
    fn a_key_answered_with_two_executions_is_caught() {
        let mut h = clean();
        h.submissions[1].executions.push("e3".into());
        h.observations.insert(
            "e3".into(),
            seen(json!({"status": "succeeded", "output": 6})),
        );
        let v = check(&h, triple);
        assert_eq!(
            v.problems,
            vec![Problem::KeyForked {
                key: "k2".into(),
                executions: vec!["e2".into(), "e3".into()]
            }]
        );
    }

    #[test]
    fn two_keys_answered_with_one_execution_are_caught() {
        let mut h = clean();
        h.submissions[1].executions = vec!["e1".into()];
        let v = check(&h, triple);
        assert_eq!(v.executions, 1);
        assert_eq!(
            v.problems,
            vec![Problem::SharedExecution {
                execution: "e1".into(),
                keys: vec!["k1".into(), "k2".into()]
            }]
        );
    }

    #[test]
    fn a_request_never_accepted_is_caught() {
        let mut h = clean();
        h.submissions.push(submission("k3", 3, &[]));
        let v = check(&h, triple);
        assert_eq!(v.problems, vec![Problem::Unaccepted { key: "k3".into() }]);
    }

    #[test]
    fn a_404_is_a_loss_even_if_a_body_came_before() {
        let mut h = clean();
        let o = h.observations.get_mut("e2").expect("e2");
        o.last = Some(json!({"status": "running"}));
        o.not_found = Some(json!({"error": {"code": "unknown_execution"}}));
        let v = check(&h, triple);
        assert_eq!((v.lost, v.running, v.succeeded), (1, 0, 1));
        assert_eq!(v.problems[0].kind(), "lost");
    }

    #[test]
    fn running_failed_wrong_and_unpolled_executions_are_each_counted() {
        let mut h = clean();
        h.submissions.push(submission("k3", 3, &["e3"]));
        h.submissions.push(submission("k4", 4, &["e4"]));
        h.submissions.push(submission("k5", 5, &["e5"]));
        h.observations
            .insert("e1".into(), seen(json!({"status": "running"})));
        h.observations.insert(
            "e3".into(),
            seen(json!({"status": "failed", "error": {"kind": "Grain"}})),
        );
        h.observations.insert(
            "e4".into(),
            seen(json!({"status": "succeeded", "output": 13})),
        );
        let v = check(&h, triple);
        assert_eq!(
            (v.succeeded, v.running, v.failed, v.wrong, v.lost),
            (1, 2, 1, 1, 0)
        );
        let kinds: Vec<(&str, &str)> = v.problems.iter().map(|p| (p.kind(), p.subject())).collect();
        assert_eq!(
            kinds,
            vec![
                ("running", "e1"),
                ("failed", "e3"),
                ("wrong output", "e4"),
                ("running", "e5")
            ]
        );
        assert_eq!(
            v.problems[2].evidence()["expected"],
            json!(12),
            "the wrong output's evidence names what was expected"
        );
    }
}
