//! The chaos run's clients. Submitters POST every request asynchronously with its own
//! `Idempotency-Key`, again with the same key after any failure, until it is accepted; then
//! each key once more, which must be answered with the same execution. Pollers follow every
//! execution returned until it ends, the gateway forgets it, or the deadline passes.
//!
//! Everything the clients see is recorded as a `History` for the checker.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use super::check::{History, Observation, Submission};

/// How long a submitter waits before it sends a failed POST again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Why a request got no answer.
#[derive(Debug)]
pub enum Failure {
    /// No connection, no answer in time, or a 5xx: the gateway is down or starting. Try
    /// again.
    Unavailable(String),
    /// A 4xx: the request itself is wrong, and will be wrong again.
    Refused(String),
}

/// What a poll of an execution found.
#[derive(Debug)]
pub enum Polled {
    /// 200, with the execution's document.
    Found(Value),
    /// 404, with the error document.
    NotFound(Value),
}

/// One client's connection to the HTTP API.
pub struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    /// A client of the API at `base` (`http://ADDR`).
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .build(),
        }
    }

    /// Invokes `app` with `input`, asynchronously, under `key`; the execution's id.
    pub fn submit(&self, app: &str, key: &str, input: u64) -> Result<String, Failure> {
        let url = format!("{}/v1/apps/{app}/invoke?async=true", self.base);
        let answer = self
            .agent
            .post(&url)
            .set("Idempotency-Key", key)
            .set("Content-Type", "application/json")
            .send_string(&input.to_string());
        let body = json(answer.map_err(failure)?)?;
        match body["execution"].as_str() {
            Some(id) => Ok(id.to_owned()),
            None => Err(Failure::Refused(format!("no execution id in {body}"))),
        }
    }

    /// `GET /v1/executions/{id}`.
    pub fn execution(&self, id: &str) -> Result<Polled, Failure> {
        let url = format!("{}/v1/executions/{id}", self.base);
        match self.agent.get(&url).call() {
            Ok(r) => Ok(Polled::Found(json(r)?)),
            Err(ureq::Error::Status(404, r)) => Ok(Polled::NotFound(json(r)?)),
            Err(e) => Err(failure(e)),
        }
    }
}

/// A response's JSON body; one cut short by a dying gateway is a failure to try again.
fn json(response: ureq::Response) -> Result<Value, Failure> {
    response
        .into_json()
        .map_err(|e| Failure::Unavailable(format!("unreadable answer: {e}")))
}

fn failure(e: ureq::Error) -> Failure {
    match e {
        ureq::Error::Status(code, r) if code >= 500 => {
            Failure::Unavailable(format!("{code} {}", r.into_string().unwrap_or_default()))
        }
        ureq::Error::Status(code, r) => {
            Failure::Refused(format!("{code} {}", r.into_string().unwrap_or_default()))
        }
        ureq::Error::Transport(t) => Failure::Unavailable(t.to_string()),
    }
}

/// The load of one run: what its clients share with each other and with the driver.
pub struct Load {
    app: String,
    requests: usize,
    poll_interval: Duration,
    /// Set to end the run early: Ctrl-C, or a fault the run cannot go on after.
    stop: Arc<AtomicBool>,
    /// The next POST to send: request `i` for i < requests, then request `i - requests`
    /// again.
    next: AtomicUsize,
    accepted: AtomicUsize,
    resent: AtomicUsize,
    retries: AtomicUsize,
    /// Why the last retried POST failed.
    last_failure: Mutex<String>,
    ended: AtomicUsize,
    lost: AtomicUsize,
    submissions: Mutex<Vec<Submission>>,
    /// Every execution id returned so far; each goes to one poller's inbox the first time.
    seen: Mutex<HashSet<String>>,
    inboxes: Vec<Mutex<Vec<String>>>,
    /// Set once no submitter will return a new execution id.
    submitted: AtomicBool,
    /// When the clients give up on what is still to come; set when the faults stop.
    deadline: Mutex<Option<Instant>>,
}

/// Counters for progress lines.
#[derive(Clone, Debug)]
pub struct Counts {
    /// Requests accepted (first POSTs answered).
    pub accepted: usize,
    /// Requests sent again and answered.
    pub resent: usize,
    /// POSTs that failed and were sent again with the same key.
    pub retries: usize,
    /// Why the last retried POST failed.
    pub last_failure: String,
    /// Distinct executions returned.
    pub executions: usize,
    /// Executions seen to end.
    pub ended: usize,
    /// Executions the gateway answered 404 for.
    pub lost: usize,
}

impl Load {
    /// A load of `requests` invocations of `app`, keyed `chaos-SEED-N`, followed by
    /// `pollers` pollers that sweep their executions every `poll_interval`.
    pub fn new(
        app: &str,
        requests: usize,
        seed: u64,
        pollers: usize,
        poll_interval: Duration,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let submissions = (0..requests)
            .map(|i| Submission {
                key: format!("chaos-{seed:016x}-{i}"),
                input: i as u64,
                posts: 0,
                executions: Vec::new(),
            })
            .collect();
        Self {
            app: app.to_owned(),
            requests,
            poll_interval,
            stop,
            next: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            resent: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            last_failure: Mutex::new(String::new()),
            ended: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
            submissions: Mutex::new(submissions),
            seen: Mutex::new(HashSet::new()),
            inboxes: (0..pollers.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            submitted: AtomicBool::new(false),
            deadline: Mutex::new(None),
        }
    }

    /// The counters, for a progress line.
    pub fn counts(&self) -> Counts {
        Counts {
            accepted: self.accepted.load(Ordering::Relaxed),
            resent: self.resent.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            last_failure: lock(&self.last_failure).clone(),
            executions: lock(&self.seen).len(),
            ended: self.ended.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }

    /// Whether the run was ended early.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Ends the run early: every client returns what it has.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// One submitter: takes POSTs to send until there are none left, each sent until it is
    /// answered. A refused POST (a 4xx) stops the whole run.
    pub fn submit(&self, api: &Api) -> Result<()> {
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            if n >= 2 * self.requests || self.stopped() {
                return Ok(());
            }
            let first = n < self.requests;
            let request = if first { n } else { n - self.requests };
            let answered = match self.send(api, request) {
                Ok(answered) => answered,
                Err(e) => {
                    self.stop();
                    return Err(e);
                }
            };
            if !answered {
                return Ok(());
            }
            if first {
                self.accepted.fetch_add(1, Ordering::Relaxed);
            } else {
                self.resent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// POSTs request `i` until it is answered, with the same key every time; false if the
    /// run stopped or the deadline passed first.
    fn send(&self, api: &Api, i: usize) -> Result<bool> {
        let (key, input) = {
            let submissions = lock(&self.submissions);
            (submissions[i].key.clone(), submissions[i].input)
        };
        while !self.stopped() && !self.past_deadline() {
            let answer = api.submit(&self.app, &key, input);
            let mut submissions = lock(&self.submissions);
            submissions[i].posts += 1;
            match answer {
                Ok(id) => {
                    submissions[i].executions.push(id.clone());
                    drop(submissions);
                    if lock(&self.seen).insert(id.clone()) {
                        lock(&self.inboxes[i % self.inboxes.len()]).push(id);
                    }
                    return Ok(true);
                }
                Err(Failure::Unavailable(why)) => {
                    drop(submissions);
                    *lock(&self.last_failure) = why;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(RETRY_PAUSE);
                }
                Err(Failure::Refused(why)) => bail!("request {i} (key {key}) was refused: {why}"),
            }
        }
        Ok(false)
    }

    /// Says that no new execution id will come: a poller with nothing left to poll ends.
    pub fn submissions_done(&self) {
        self.submitted.store(true, Ordering::Release);
    }

    /// Sets when the clients stop waiting: for a request to be accepted, for an execution to
    /// end.
    pub fn set_deadline(&self, deadline: Instant) {
        *lock(&self.deadline) = Some(deadline);
    }

    fn past_deadline(&self) -> bool {
        lock(&self.deadline).is_some_and(|d| Instant::now() >= d)
    }

    /// Poller `me`: polls the executions in its inbox until each has ended or been answered
    /// 404, or until the deadline; returns what it saw of each. Failed polls (the gateway is
    /// down) are tried again on the next sweep.
    pub fn poll(&self, api: &Api, me: usize) -> Result<BTreeMap<String, Observation>> {
        let mut seen: BTreeMap<String, Observation> = BTreeMap::new();
        let mut pending: Vec<String> = Vec::new();
        loop {
            // Read before the inbox is emptied, so that no id pushed before the flag was
            // set can be left behind.
            let no_more = self.submitted.load(Ordering::Acquire);
            for id in std::mem::take(&mut *lock(&self.inboxes[me])) {
                seen.entry(id.clone()).or_default();
                pending.push(id);
            }
            if self.stopped() || self.past_deadline() || (no_more && pending.is_empty()) {
                return Ok(seen);
            }
            let mut i = 0;
            while i < pending.len() && !self.stopped() {
                let observation = seen.entry(pending[i].clone()).or_default();
                match api.execution(&pending[i]) {
                    Ok(Polled::Found(body)) => {
                        let ended = body["status"] != "running";
                        observation.last = Some(body);
                        if ended {
                            self.ended.fetch_add(1, Ordering::Relaxed);
                            pending.swap_remove(i);
                            continue;
                        }
                    }
                    Ok(Polled::NotFound(body)) => {
                        observation.not_found = Some(body);
                        self.lost.fetch_add(1, Ordering::Relaxed);
                        pending.swap_remove(i);
                        continue;
                    }
                    // The gateway is down: the rest of the sweep would fail the same way.
                    Err(Failure::Unavailable(_)) => break,
                    Err(Failure::Refused(why)) => {
                        self.stop();
                        bail!("polling execution {} was refused: {why}", pending[i]);
                    }
                }
                i += 1;
            }
            std::thread::sleep(self.poll_interval);
        }
    }

    /// The history: every submission, and what the pollers saw.
    pub fn history(&self, observations: BTreeMap<String, Observation>) -> History {
        History {
            submissions: lock(&self.submissions).clone(),
            observations,
        }
    }
}

/// Locks `m`; a client that panicked holding it left data that is still worth reporting.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
