//! The chaos run's checker: a pure function over what the clients saw, so that a verdict
//! depends on the history alone and can be tested without a cluster.
//!
//! The history is Jepsen's: every exchange with the gateway, with when it was sent, when its
//! reply came, and which life of the gateway (its starts, counted) answered it. A POST that got
//! no reply (a refused connection, a timeout, a 5xx) leaves its request in doubt; it is never
//! counted as a failure. Only what the gateway said is judged, by these rules:
//!
//! - each request, an (app, key) pair, is named one execution, and each execution one request;
//! - no execution a POST named is ever answered 404 (reported as *vanished* if a later answer
//!   found it again: the gateway's look-up was behind what it had said, though the execution
//!   survived; as *lost* if none did);
//! - every answer that an execution has ended says the same (status, and output or error),
//!   whether it came as a synchronous answer or a poll, from whichever life of the gateway, and
//!   none is followed by an answer that it is still running;
//! - every poll names the request's app, and every execution succeeds, with the output its app
//!   computes from its input;
//! - every execution is seen to end within a bound after the faults stop, and is seen ended
//!   again by a poll sent after they stopped: it survived every crash.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sand_api::Status;
use sand_protocol::wire::GrainError;
use serde_json::{json, Value};

/// One request: an app, an idempotency key, and the entry grain's input.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The app invoked.
    pub app: String,
    /// The `Idempotency-Key` every POST of the request carries.
    pub key: String,
    /// The entry grain's input.
    pub input: u64,
}

impl Request {
    /// `app/key`: how problems name a request.
    pub fn name(&self) -> String {
        format!("{}/{}", self.app, self.key)
    }
}

/// What the gateway said of an execution's state.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Not ended yet.
    Running,
    /// Ended with this output.
    Succeeded(Value),
    /// Ended with this error.
    Failed(Value),
}

impl Outcome {
    /// The state a `GET /v1/executions/{id}` body reports. A body that is not the API's
    /// [`sand_api::Execution`] is a failure, the whole body its error.
    pub fn of_status(body: &Value) -> Self {
        match serde_json::from_value::<sand_api::Execution>(body.clone()) {
            Ok(e) => Self::of(e.status, e.output, e.error.as_ref(), body),
            Err(_) => Self::Failed(body.clone()),
        }
    }

    /// The outcome a synchronous invocation's answer ([`sand_api::Answer`]) carries.
    pub fn of_answer(body: &Value) -> Self {
        match serde_json::from_value::<sand_api::Answer>(body.clone()) {
            Ok(a) => Self::of(a.status, a.output, a.error.as_ref(), body),
            Err(_) => Self::Failed(body.clone()),
        }
    }

    fn of(status: Status, output: Option<Value>, error: Option<&GrainError>, body: &Value) -> Self {
        match (status, error) {
            (Status::Running, _) => Self::Running,
            (Status::Succeeded, _) => Self::Succeeded(output.unwrap_or_default()),
            (Status::Failed, Some(e)) => Self::Failed(json!(e)),
            (Status::Failed, None) => Self::Failed(body.clone()),
        }
    }

    fn ended(&self) -> bool {
        *self != Self::Running
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Running => json!({"status": "running"}),
            Self::Succeeded(output) => json!({"status": "succeeded", "output": output}),
            Self::Failed(error) => json!({"status": "failed", "error": error}),
        }
    }
}

/// The reply to one POST of a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Posted {
    /// The execution's id without its outcome: an asynchronous invocation, or a synchronous
    /// one whose wait ran out.
    Accepted(String),
    /// A synchronous invocation's answer: the execution and how it ended.
    Answered(String, Outcome),
    /// A synchronous invocation answered 404: the gateway forgot the execution it ran.
    Forgotten(Value),
    /// No reply: the request is in doubt.
    Unavailable(String),
}

/// The reply to one poll of an execution.
#[derive(Clone, Debug, PartialEq)]
pub enum Polled {
    /// 200: the execution's app and state.
    Found {
        /// The app the gateway says the execution belongs to.
        app: String,
        /// Its state.
        outcome: Outcome,
    },
    /// 404, with the error document.
    NotFound(Value),
    /// No reply.
    Unavailable(String),
}

/// What an exchange was.
#[derive(Clone, Debug, PartialEq)]
pub enum What {
    /// A POST of request number `request`, synchronous or not.
    Post {
        /// The request's index in [`History::requests`].
        request: usize,
        /// Whether the client waited for the answer.
        sync: bool,
        /// The reply.
        reply: Posted,
    },
    /// A `GET /v1/executions/{exec}`.
    Poll {
        /// The execution polled.
        exec: String,
        /// The reply.
        reply: Polled,
    },
}

/// One exchange with the gateway.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// When the request was sent, from the start of the run.
    pub sent: Duration,
    /// When its reply (or its failure) came.
    pub got: Duration,
    /// The life of the gateway that answered (1 for its first start), if that is certain: the
    /// gateway was not started again while the exchange was under way.
    pub life: Option<u32>,
    /// The exchange.
    pub what: What,
}

impl Event {
    /// The exchange as one JSON object, for the history file a failed run keeps.
    pub fn to_json(&self) -> Value {
        let what = match &self.what {
            What::Post {
                request,
                sync,
                reply,
            } => {
                let reply = match reply {
                    Posted::Accepted(exec) => json!({"accepted": exec}),
                    Posted::Answered(exec, outcome) => {
                        json!({"answered": exec, "outcome": outcome.to_json()})
                    }
                    Posted::Forgotten(body) => json!({"forgotten": body}),
                    Posted::Unavailable(why) => json!({"unavailable": why}),
                };
                json!({"post": request, "sync": sync, "reply": reply})
            }
            What::Poll { exec, reply } => {
                let reply = match reply {
                    Polled::Found { app, outcome } => {
                        json!({"app": app, "outcome": outcome.to_json()})
                    }
                    Polled::NotFound(body) => json!({"not_found": body}),
                    Polled::Unavailable(why) => json!({"unavailable": why}),
                };
                json!({"poll": exec, "reply": reply})
            }
        };
        json!({
            "sent_ms": self.sent.as_secs_f64() * 1e3,
            "got_ms": self.got.as_secs_f64() * 1e3,
            "gateway_life": self.life,
            "exchange": what,
        })
    }
}

/// Everything the clients recorded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    /// The requests, by index.
    pub requests: Vec<Request>,
    /// Every exchange, in no particular order.
    pub events: Vec<Event>,
    /// When the faults stopped and every host was healed, from the start of the run.
    pub healed: Duration,
    /// How long after `healed` every execution has to have ended.
    pub bound: Duration,
}

/// One answer about an execution, as evidence.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Sent, from the start of the run.
    pub sent: Duration,
    /// Answered.
    pub got: Duration,
    /// The gateway's life, if certain.
    pub life: Option<u32>,
    /// A synchronous answer, or a poll.
    pub sync_answer: bool,
    /// The app it named (a synchronous answer names none).
    pub app: Option<String>,
    /// What it said.
    pub outcome: Outcome,
}

impl Observation {
    fn to_json(&self) -> Value {
        json!({
            "via": if self.sync_answer { "sync answer" } else { "poll" },
            "sent_ms": self.sent.as_millis() as u64,
            "got_ms": self.got.as_millis() as u64,
            "gateway_life": self.life,
            "app": self.app,
            "outcome": self.outcome.to_json(),
        })
    }
}

/// A way the run went wrong.
#[derive(Clone, Debug, PartialEq)]
pub enum Problem {
    /// No POST of the request was answered with an execution.
    Unaccepted {
        /// `app/key`.
        request: String,
    },
    /// POSTs of one request were answered with different executions.
    KeyForked {
        /// `app/key`.
        request: String,
        /// Every execution named, in the order first named.
        executions: Vec<String>,
    },
    /// POSTs of different requests were answered with the same execution.
    SharedExecution {
        /// The execution.
        execution: String,
        /// `app/key` of every request it was named to.
        requests: Vec<String>,
    },
    /// A poll of an execution a POST had named was answered 404, and no later answer found it.
    Lost {
        /// The execution.
        execution: String,
        /// The 404's body.
        body: Value,
    },
    /// A poll of an execution a POST had named was answered 404, and a later answer found it.
    Vanished {
        /// The execution.
        execution: String,
        /// The 404's body.
        body: Value,
        /// The first answer sent after the 404 came that found it.
        found: Observation,
    },
    /// A synchronous POST was answered 404: its execution was forgotten.
    Forgotten {
        /// `app/key`.
        request: String,
        /// The 404's body.
        body: Value,
    },
    /// Two answers that the execution had ended disagree.
    Changed {
        /// The execution.
        execution: String,
        /// The first answer received.
        first: Observation,
        /// One that disagrees with it.
        other: Observation,
    },
    /// The execution was said to be running after it was said to have ended.
    Regressed {
        /// The execution.
        execution: String,
        /// The first answer that it had ended.
        ended: Observation,
        /// A later answer, sent after that one came, that it was running.
        running: Observation,
    },
    /// A poll said the execution belongs to another app than the request's.
    OtherApp {
        /// The execution.
        execution: String,
        /// The request's app.
        app: String,
        /// The poll that named another.
        seen: Observation,
    },
    /// Ended `failed`.
    Failed {
        /// The execution.
        execution: String,
        /// The first answer that it had ended.
        seen: Observation,
    },
    /// Ended `succeeded`, with an output other than its app computes from its input.
    WrongOutput {
        /// The execution.
        execution: String,
        /// The request's input.
        input: u64,
        /// The output its app computes.
        expected: u64,
        /// The first answer that it had ended.
        seen: Observation,
    },
    /// Never seen to end.
    Running {
        /// The execution.
        execution: String,
        /// The last answer about it, if any came.
        last: Option<Observation>,
    },
    /// First seen ended later than the bound after the faults stopped.
    Late {
        /// The execution.
        execution: String,
        /// When the first answer that it had ended came, from the end of the faults.
        after_healing: Duration,
    },
    /// Seen to end, but never again by a poll sent after the faults stopped: nothing shows that
    /// it survived the last crash.
    Unconfirmed {
        /// The execution.
        execution: String,
        /// The last answer about it.
        last: Observation,
    },
}

impl Problem {
    /// A short name for the kind of problem.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unaccepted { .. } => "unaccepted",
            Self::KeyForked { .. } => "request with several executions",
            Self::SharedExecution { .. } => "execution with several requests",
            Self::Lost { .. } => "lost",
            Self::Vanished { .. } => "vanished",
            Self::Forgotten { .. } => "forgotten",
            Self::Changed { .. } => "outcome changed",
            Self::Regressed { .. } => "running after it ended",
            Self::OtherApp { .. } => "execution of another app",
            Self::Failed { .. } => "failed",
            Self::WrongOutput { .. } => "wrong output",
            Self::Running { .. } => "running",
            Self::Late { .. } => "late",
            Self::Unconfirmed { .. } => "unconfirmed",
        }
    }

    /// What the problem is about: a request (`app/key`) or an execution id.
    pub fn subject(&self) -> &str {
        match self {
            Self::Unaccepted { request }
            | Self::KeyForked { request, .. }
            | Self::Forgotten { request, .. } => request,
            Self::SharedExecution { execution, .. }
            | Self::Lost { execution, .. }
            | Self::Vanished { execution, .. }
            | Self::Changed { execution, .. }
            | Self::Regressed { execution, .. }
            | Self::OtherApp { execution, .. }
            | Self::Failed { execution, .. }
            | Self::WrongOutput { execution, .. }
            | Self::Running { execution, .. }
            | Self::Late { execution, .. }
            | Self::Unconfirmed { execution, .. } => execution,
        }
    }

    /// The execution the problem is about, if it is about one.
    pub fn execution(&self) -> Option<&str> {
        match self {
            Self::Unaccepted { .. } | Self::KeyForked { .. } | Self::Forgotten { .. } => None,
            _ => Some(self.subject()),
        }
    }

    /// The evidence: the answers, ids and requests involved.
    pub fn evidence(&self) -> Value {
        match self {
            Self::Unaccepted { .. } => Value::Null,
            Self::KeyForked { executions, .. } => json!(executions),
            Self::SharedExecution { requests, .. } => json!(requests),
            Self::Lost { body, .. } | Self::Forgotten { body, .. } => body.clone(),
            Self::Vanished { body, found, .. } => {
                json!({"not_found": body, "found_after": found.to_json()})
            }
            Self::Changed { first, other, .. } => {
                json!({"first": first.to_json(), "other": other.to_json()})
            }
            Self::Regressed { ended, running, .. } => {
                json!({"ended": ended.to_json(), "running": running.to_json()})
            }
            Self::OtherApp { app, seen, .. } => json!({"app": app, "seen": seen.to_json()}),
            Self::Failed { seen, .. } => seen.to_json(),
            Self::WrongOutput {
                input,
                expected,
                seen,
                ..
            } => json!({"input": input, "expected": expected, "seen": seen.to_json()}),
            Self::Running { last, .. } => last.as_ref().map_or(Value::Null, Observation::to_json),
            Self::Late { after_healing, .. } => {
                json!({"ended_ms_after_healing": after_healing.as_millis() as u64})
            }
            Self::Unconfirmed { last, .. } => last.to_json(),
        }
    }
}

/// The checker's account of a history.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// Requests, one (app, key) each.
    pub requests: usize,
    /// POSTs sent, synchronous ones among them, and those that got no reply.
    pub posts: usize,
    /// Synchronous POSTs.
    pub sync_posts: usize,
    /// POSTs with no reply.
    pub posts_unanswered: usize,
    /// Synchronous POSTs answered with the outcome.
    pub sync_answers: usize,
    /// Polls sent.
    pub polls: usize,
    /// Distinct executions named.
    pub executions: usize,
    /// Executions that succeeded with the right output.
    pub succeeded: usize,
    /// Executions seen ended by at least two lives of the gateway.
    pub seen_across_restarts: usize,
    /// Everything that went wrong: requests first, then executions, each in name order.
    pub problems: Vec<Problem>,
}

impl Verdict {
    /// Nothing lost, nothing wrong.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks a history by the rules in the module doc; `expected(app, input)` is the output an
/// execution of `app` must end with.
pub fn check(history: &History, expected: impl Fn(&str, u64) -> u64) -> Verdict {
    let mut verdict = Verdict {
        requests: history.requests.len(),
        ..Verdict::default()
    };
    // What each request was told, and what each execution was seen to do.
    let mut named: Vec<Vec<&str>> = vec![Vec::new(); history.requests.len()];
    let mut forgotten: BTreeMap<usize, &Value> = BTreeMap::new();
    let mut seen: BTreeMap<&str, Vec<Observation>> = BTreeMap::new();
    // The first 404 for each execution, with when it came.
    let mut not_found: BTreeMap<&str, (Duration, &Value)> = BTreeMap::new();
    let mut events: Vec<&Event> = history.events.iter().collect();
    events.sort_by_key(|e| (e.sent, e.got));
    for e in events {
        let observation = |sync_answer, app: Option<&String>, outcome: &Outcome| Observation {
            sent: e.sent,
            got: e.got,
            life: e.life,
            sync_answer,
            app: app.cloned(),
            outcome: outcome.clone(),
        };
        match &e.what {
            What::Post {
                request,
                sync,
                reply,
            } => {
                verdict.posts += 1;
                verdict.sync_posts += usize::from(*sync);
                match reply {
                    Posted::Accepted(exec) => named[*request].push(exec),
                    Posted::Answered(exec, outcome) => {
                        verdict.sync_answers += 1;
                        named[*request].push(exec);
                        seen.entry(exec)
                            .or_default()
                            .push(observation(true, None, outcome));
                    }
                    Posted::Forgotten(body) => {
                        forgotten.entry(*request).or_insert(body);
                    }
                    Posted::Unavailable(_) => verdict.posts_unanswered += 1,
                }
            }
            What::Poll { exec, reply } => {
                verdict.polls += 1;
                match reply {
                    Polled::Found { app, outcome } => seen
                        .entry(exec)
                        .or_default()
                        .push(observation(false, Some(app), outcome)),
                    Polled::NotFound(body) => {
                        not_found.entry(exec).or_insert((e.got, body));
                    }
                    Polled::Unavailable(_) => {}
                }
            }
        }
    }

    // Each execution, with the requests it was named to.
    let mut owners: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (i, request) in history.requests.iter().enumerate() {
        let mut distinct: Vec<&str> = Vec::new();
        for &exec in &named[i] {
            if !distinct.contains(&exec) {
                distinct.push(exec);
            }
        }
        match distinct.as_slice() {
            [] => problems.push(Problem::Unaccepted {
                request: request.name(),
            }),
            [_] => {}
            many => problems.push(Problem::KeyForked {
                request: request.name(),
                executions: many.iter().map(|e| e.to_string()).collect(),
            }),
        }
        if let Some(body) = forgotten.get(&i) {
            problems.push(Problem::Forgotten {
                request: request.name(),
                body: (*body).clone(),
            });
        }
        for exec in distinct {
            owners.entry(exec).or_default().push(i);
        }
    }
    verdict.executions = owners.len();

    let deadline = history.healed + history.bound;
    for (&exec, requests) in &owners {
        let execution = exec.to_owned();
        if requests.len() > 1 {
            problems.push(Problem::SharedExecution {
                execution: execution.clone(),
                requests: requests
                    .iter()
                    .map(|&i| history.requests[i].name())
                    .collect(),
            });
        }
        let request = &history.requests[requests[0]];
        let mut observations = seen.remove(exec).unwrap_or_default();
        observations.sort_by_key(|o| (o.got, o.sent));
        if let Some(&(at, body)) = not_found.get(exec) {
            let body = body.clone();
            problems.push(match observations.iter().find(|o| o.sent >= at) {
                Some(found) => Problem::Vanished {
                    execution,
                    body,
                    found: found.clone(),
                },
                None => Problem::Lost { execution, body },
            });
            continue;
        }
        if let Some(other) = observations
            .iter()
            .find(|o| o.app.as_ref().is_some_and(|app| *app != request.app))
        {
            problems.push(Problem::OtherApp {
                execution: execution.clone(),
                app: request.app.clone(),
                seen: other.clone(),
            });
        }
        let ended: Vec<&Observation> = observations.iter().filter(|o| o.outcome.ended()).collect();
        let Some(&first) = ended.first() else {
            problems.push(Problem::Running {
                execution,
                last: observations.last().cloned(),
            });
            continue;
        };
        if let Some(other) = ended.iter().find(|o| o.outcome != first.outcome) {
            problems.push(Problem::Changed {
                execution: execution.clone(),
                first: first.clone(),
                other: (*other).clone(),
            });
        }
        if let Some(running) = observations
            .iter()
            .find(|o| !o.outcome.ended() && o.sent > first.got)
        {
            problems.push(Problem::Regressed {
                execution: execution.clone(),
                ended: first.clone(),
                running: running.clone(),
            });
        }
        let want = expected(&request.app, request.input);
        match &first.outcome {
            Outcome::Succeeded(output) if *output == json!(want) => verdict.succeeded += 1,
            Outcome::Succeeded(_) => problems.push(Problem::WrongOutput {
                execution: execution.clone(),
                input: request.input,
                expected: want,
                seen: first.clone(),
            }),
            _ => problems.push(Problem::Failed {
                execution: execution.clone(),
                seen: first.clone(),
            }),
        }
        if first.got > deadline {
            problems.push(Problem::Late {
                execution: execution.clone(),
                after_healing: first.got - history.healed,
            });
        }
        if !ended
            .iter()
            .any(|o| !o.sync_answer && o.sent >= history.healed)
        {
            problems.push(Problem::Unconfirmed {
                execution,
                last: (*ended[ended.len() - 1]).clone(),
            });
        }
        let lives: BTreeSet<u32> = ended.iter().filter_map(|o| o.life).collect();
        verdict.seen_across_restarts += usize::from(lives.len() > 1);
    }
    verdict.problems = problems;
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triple(app: &str, x: u64) -> u64 {
        match app {
            "a" => 3 * x,
            _ => 5 * x,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// An exchange sent at `sent` ms, answered 10 ms later by the gateway's first life.
    fn event(sent: u64, what: What) -> Event {
        Event {
            sent: ms(sent),
            got: ms(sent + 10),
            life: Some(1),
            what,
        }
    }

    fn post(request: usize, sync: bool, reply: Posted) -> What {
        What::Post {
            request,
            sync,
            reply,
        }
    }

    fn poll(exec: &str, app: &str, outcome: Outcome) -> What {
        What::Poll {
            exec: exec.into(),
            reply: Polled::Found {
                app: app.into(),
                outcome,
            },
        }
    }

    fn ok(n: u64) -> Outcome {
        Outcome::Succeeded(json!(n))
    }

    /// Three requests, the same key in two apps: an async one accepted after a failed POST and
    /// followed by polls; a sync one answered at once; and a sync one whose wait ran out, sent
    /// again and answered. The faults stopped at 1 s; every execution is polled after that.
    fn clean() -> History {
        let request = |app: &str, key: &str, input| Request {
            app: app.into(),
            key: key.into(),
            input,
        };
        History {
            requests: vec![
                request("a", "k1", 1),
                request("b", "k1", 2),
                request("a", "k3", 3),
            ],
            events: vec![
                event(0, post(0, false, Posted::Unavailable("refused".into()))),
                event(100, post(0, false, Posted::Accepted("e1".into()))),
                event(200, poll("e1", "a", Outcome::Running)),
                event(300, poll("e1", "a", ok(3))),
                event(100, post(1, true, Posted::Answered("e2".into(), ok(10)))),
                event(150, post(2, true, Posted::Accepted("e3".into()))),
                event(400, post(2, true, Posted::Answered("e3".into(), ok(9)))),
                event(1000, poll("e1", "a", ok(3))),
                event(1000, poll("e2", "b", ok(10))),
                event(1000, poll("e3", "a", ok(9))),
            ],
            healed: ms(1000),
            bound: ms(5000),
        }
    }

    /// The clean history with `events` added.
    fn with(events: impl IntoIterator<Item = Event>) -> History {
        let mut h = clean();
        h.events.extend(events);
        h
    }

    fn kinds(v: &Verdict) -> Vec<(&'static str, &str)> {
        v.problems.iter().map(|p| (p.kind(), p.subject())).collect()
    }

    #[test]
    fn a_clean_history_passes_and_is_counted() {
        let v = check(&clean(), triple);
        assert!(v.passed(), "{:?}", v.problems);
        assert_eq!(
            (v.requests, v.posts, v.sync_posts, v.posts_unanswered),
            (3, 5, 3, 1)
        );
        assert_eq!(
            (v.sync_answers, v.polls, v.executions, v.succeeded),
            (2, 5, 3, 3)
        );
        assert_eq!(v.seen_across_restarts, 0);
    }

    #[test]
    fn an_unaccepted_request_is_caught() {
        let mut h = clean();
        h.requests.push(Request {
            app: "a".into(),
            key: "k4".into(),
            input: 4,
        });
        h.events.push(event(
            0,
            post(3, true, Posted::Unavailable("timeout".into())),
        ));
        assert_eq!(kinds(&check(&h, triple)), vec![("unaccepted", "a/k4")]);
    }

    #[test]
    fn a_request_named_two_executions_is_caught() {
        let h = with([
            event(500, post(1, false, Posted::Accepted("e4".into()))),
            event(1000, poll("e4", "b", ok(10))),
        ]);
        let v = check(&h, triple);
        assert_eq!(kinds(&v), vec![("request with several executions", "b/k1")]);
        assert_eq!(v.problems[0].evidence(), json!(["e2", "e4"]));
    }

    #[test]
    fn an_execution_named_to_two_requests_is_caught() {
        // The same key in two apps must not find the other app's execution.
        let h = with([event(500, post(1, false, Posted::Accepted("e1".into())))]);
        let v = check(&h, triple);
        assert_eq!(
            kinds(&v),
            vec![
                ("request with several executions", "b/k1"),
                ("execution with several requests", "e1")
            ]
        );
        assert_eq!(v.problems[1].evidence(), json!(["a/k1", "b/k1"]));
    }

    #[test]
    fn a_404_for_a_named_execution_is_a_loss() {
        let body = json!({"error": {"code": "unknown_execution"}});
        let h = with([event(
            1100,
            What::Poll {
                exec: "e3".into(),
                reply: Polled::NotFound(body.clone()),
            },
        )]);
        let v = check(&h, triple);
        assert_eq!(kinds(&v), vec![("lost", "e3")]);
        assert_eq!(v.problems[0].evidence(), body);
    }

    #[test]
    fn a_404_then_an_answer_that_finds_the_execution_is_a_vanishing() {
        let body = json!({"error": {"code": "unknown_execution"}});
        let h = with([event(
            220,
            What::Poll {
                exec: "e1".into(),
                reply: Polled::NotFound(body.clone()),
            },
        )]);
        let v = check(&h, triple);
        assert_eq!(kinds(&v), vec![("vanished", "e1")]);
        assert_eq!(v.problems[0].evidence()["not_found"], body);
        assert_eq!(
            v.problems[0].evidence()["found_after"]["sent_ms"],
            json!(300),
            "{}",
            v.problems[0].evidence()
        );
    }

    #[test]
    fn a_sync_answer_of_404_is_a_forgotten_execution() {
        let body = json!({"error": {"code": "unknown_execution"}});
        let h = with([event(500, post(2, true, Posted::Forgotten(body)))]);
        assert_eq!(kinds(&check(&h, triple)), vec![("forgotten", "a/k3")]);
    }

    #[test]
    fn a_poll_that_disagrees_with_the_sync_answer_is_caught() {
        let h = with([event(1200, poll("e2", "b", ok(11)))]);
        let v = check(&h, triple);
        assert_eq!(kinds(&v), vec![("outcome changed", "e2")]);
        assert_eq!(v.problems[0].evidence()["first"]["via"], "sync answer");
        assert_eq!(
            v.problems[0].evidence()["other"]["outcome"],
            json!({"status": "succeeded", "output": 11})
        );
    }

    #[test]
    fn an_outcome_that_changes_across_gateway_lives_is_caught() {
        let mut later = event(
            2000,
            poll("e1", "a", Outcome::Failed(json!({"kind": "unavailable"}))),
        );
        later.life = Some(2);
        let v = check(&with([later]), triple);
        assert_eq!(kinds(&v), vec![("outcome changed", "e1")]);
        assert_eq!(v.problems[0].evidence()["other"]["gateway_life"], 2);
    }

    #[test]
    fn running_after_an_answer_that_it_ended_is_caught() {
        let h = with([event(350, poll("e1", "a", Outcome::Running))]);
        let v = check(&h, triple);
        assert_eq!(kinds(&v), vec![("running after it ended", "e1")]);
        assert_eq!(v.problems[0].evidence()["running"]["sent_ms"], 350);
    }

    #[test]
    fn running_sent_before_the_end_was_answered_is_no_regression() {
        // Sent at 305 ms, before the answer that it ended came (at 310 ms): concurrent.
        let h = with([event(305, poll("e1", "a", Outcome::Running))]);
        assert!(check(&h, triple).passed());
    }

    #[test]
    fn an_execution_of_another_app_is_caught() {
        let h = with([event(1200, poll("e3", "b", ok(9)))]);
        let v = check(&h, triple);
        assert_eq!(kinds(&v), vec![("execution of another app", "e3")]);
    }

    #[test]
    fn a_failed_execution_and_a_wrong_output_are_caught() {
        let mut h = clean();
        h.events
            .retain(|e| !matches!(&e.what, What::Poll { exec, .. } if exec == "e1"));
        h.events.push(event(
            1000,
            poll("e1", "a", Outcome::Failed(json!({"kind": "timeout"}))),
        ));
        for e in &mut h.events {
            if let What::Post {
                reply: Posted::Answered(_, outcome),
                request: 1,
                ..
            } = &mut e.what
            {
                *outcome = ok(11);
            }
            if let What::Poll {
                exec,
                reply: Polled::Found { outcome, .. },
            } = &mut e.what
            {
                if exec == "e2" {
                    *outcome = ok(11);
                }
            }
        }
        let v = check(&h, triple);
        assert_eq!(kinds(&v), vec![("failed", "e1"), ("wrong output", "e2")]);
        assert_eq!(v.problems[1].evidence()["expected"], 10);
    }

    #[test]
    fn an_execution_never_seen_to_end_is_running() {
        let mut h = clean();
        h.events
            .retain(|e| !matches!(&e.what, What::Poll { exec, .. } if exec == "e1"));
        h.events
            .push(event(6000, poll("e1", "a", Outcome::Running)));
        let v = check(&h, triple);
        assert_eq!(kinds(&v), vec![("running", "e1")]);
        assert_eq!(v.problems[0].evidence()["sent_ms"], 6000);
    }

    #[test]
    fn an_execution_that_ended_past_the_bound_is_late() {
        let mut h = clean();
        h.events
            .retain(|e| !matches!(&e.what, What::Poll { exec, .. } if exec == "e1"));
        h.events.push(event(6000, poll("e1", "a", ok(3))));
        let v = check(&h, triple);
        assert_eq!(kinds(&v), vec![("late", "e1")]);
        assert_eq!(v.problems[0].evidence()["ended_ms_after_healing"], 5010);
    }

    #[test]
    fn an_execution_not_polled_after_the_faults_is_unconfirmed() {
        let mut h = clean();
        h.events.retain(|e| e.sent < ms(1000));
        let v = check(&h, triple);
        assert_eq!(
            kinds(&v),
            vec![
                ("unconfirmed", "e1"),
                ("unconfirmed", "e2"),
                ("unconfirmed", "e3")
            ]
        );
    }

    #[test]
    fn executions_seen_ended_by_two_gateway_lives_are_counted() {
        let mut again = event(2000, poll("e1", "a", ok(3)));
        again.life = Some(2);
        let mut unsure = event(2000, poll("e2", "b", ok(10)));
        unsure.life = None;
        let v = check(&with([again, unsure]), triple);
        assert!(v.passed(), "{:?}", v.problems);
        assert_eq!(v.seen_across_restarts, 1);
    }

    #[test]
    fn bodies_are_read_as_outcomes() {
        let body = |status: &str, rest: Value| {
            let mut b = json!({"execution": "e", "app": "a", "status": status, "calls": []});
            if let (Some(b), Some(rest)) = (b.as_object_mut(), rest.as_object()) {
                b.extend(rest.clone());
            }
            b
        };
        let raised = json!({"kind": "raised", "message": "m"});
        assert_eq!(
            Outcome::of_status(&body("running", json!({}))),
            Outcome::Running
        );
        let done = body("succeeded", json!({"output": 4}));
        assert_eq!(Outcome::of_status(&done), ok(4));
        let failed = body("failed", json!({"error": raised}));
        assert_eq!(Outcome::of_status(&failed), Outcome::Failed(raised.clone()));
        let odd = body("paused", json!({}));
        assert_eq!(Outcome::of_status(&odd), Outcome::Failed(odd.clone()));
        let answer = json!({"execution": "e", "status": "succeeded", "output": 4});
        assert_eq!(Outcome::of_answer(&answer), ok(4));
        let answer = json!({"execution": "e", "status": "failed", "error": raised});
        assert_eq!(Outcome::of_answer(&answer), Outcome::Failed(raised));
    }
}
