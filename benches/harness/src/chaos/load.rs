//! The chaos run's clients, and the recorder of everything they see.
//!
//! Every request is POSTed twice with its `Idempotency-Key`: first, then again a while later
//! (sometimes at once, racing the first), each time synchronously or not as the seed says, and
//! each time again with the same key after any failure until the gateway answers. Submitters
//! take these POSTs in order, each not before its time: the requests are spread over the
//! faults. Pollers follow every execution named until it ends, the gateway forgets it, or the
//! deadline passes; an auditor polls the ended ones again, round and round, while the run goes
//! on; and after the faults every execution named is polled once more.
//!
//! The recorder is dumb: each exchange goes into the history as it happened, for the checker.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;

use super::check::{Event, History, Outcome, Polled, Posted, Request, What};

/// How long a client waits before it sends a POST that got no reply again, or polls again an
/// execution the gateway did not answer for.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How long a client waits for a reply beyond a synchronous invocation's own wait.
const REPLY_SLACK: Duration = Duration::from_secs(5);

/// One client's connection to the HTTP API.
pub struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    /// A client of the API at `base` (`http://ADDR`) whose synchronous invocations wait up to
    /// `sync_wait` for their answer.
    pub fn new(base: &str, sync_wait: Duration) -> Self {
        Self {
            base: base.to_owned(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(2))
                .timeout(sync_wait + REPLY_SLACK)
                .build(),
        }
    }

    /// Invokes `app` with `input` under `key`: asynchronously, or waiting up to `wait` for the
    /// answer. Fails only if the gateway refused the request as malformed (a 4xx other than a
    /// forgotten execution): it would be refused again.
    pub fn invoke(
        &self,
        app: &str,
        key: &str,
        input: u64,
        wait: Option<Duration>,
    ) -> Result<Posted> {
        let query = match wait {
            Some(w) => format!("wait={}", w.as_secs_f64()),
            None => "async=true".to_owned(),
        };
        let url = format!("{}/v1/apps/{app}/invoke?{query}", self.base);
        let answer = self
            .agent
            .post(&url)
            .set("Idempotency-Key", key)
            .set("Content-Type", "application/json")
            .send_string(&input.to_string());
        let (code, body) = match reply(answer) {
            Ok(reply) => reply,
            Err(why) => return Ok(Posted::Unavailable(why)),
        };
        let exec = body["execution"].as_str().map(str::to_owned);
        match (code, exec) {
            (200, Some(exec)) => Ok(Posted::Answered(exec, Outcome::of_answer(&body))),
            (202, Some(exec)) => Ok(Posted::Accepted(exec)),
            (404, _) if body["error"]["code"] == "unknown_execution" => Ok(Posted::Forgotten(body)),
            _ => bail!("POST {url} (key {key}) was answered {code} {body}"),
        }
    }

    /// `GET /v1/executions/{id}`.
    pub fn execution(&self, id: &str) -> Result<Polled> {
        let url = format!("{}/v1/executions/{id}", self.base);
        let (code, body) = match reply(self.agent.get(&url).call()) {
            Ok(reply) => reply,
            Err(why) => return Ok(Polled::Unavailable(why)),
        };
        match code {
            200 => Ok(Polled::Found {
                app: body["app"].as_str().unwrap_or_default().to_owned(),
                outcome: Outcome::of_status(&body),
            }),
            404 => Ok(Polled::NotFound(body)),
            _ => bail!("GET {url} was answered {code} {body}"),
        }
    }
}

/// A reply's status and JSON body; or why there was none: no connection, no answer in time,
/// a 5xx, or a body cut short by a dying gateway.
fn reply(answer: Result<ureq::Response, ureq::Error>) -> Result<(u16, Value), String> {
    let response = match answer {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) if code < 500 => r,
        Err(ureq::Error::Status(code, r)) => {
            return Err(format!("{code} {}", r.into_string().unwrap_or_default()))
        }
        Err(ureq::Error::Transport(t)) => return Err(t.to_string()),
    };
    let code = response.status();
    response
        .into_json()
        .map(|body| (code, body))
        .map_err(|e| format!("unreadable answer: {e}"))
}

/// One POST to send: the first or the second of a request, synchronous or not, and not before
/// `due` after the start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Job {
    /// The request's index.
    pub request: usize,
    /// The second POST of the request.
    pub again: bool,
    /// Waits for the answer.
    pub sync: bool,
    /// When it may go, from the start of the run.
    pub due: Duration,
}

/// The POSTs of `requests` requests spread over `span`, drawn from `seed`: request i's first
/// POST is due at i/requests of the span, its second up to a quarter of the span later;
/// `sync_percent` of them wait for the answer. In due order.
pub fn jobs(requests: usize, span: Duration, sync_percent: u32, seed: u64) -> Vec<Job> {
    let mut rng = StdRng::seed_from_u64(seed);
    let slot = span / requests.max(1) as u32;
    let mut jobs = Vec::with_capacity(2 * requests);
    for request in 0..requests {
        let later = rng.random_range(0..=requests / 4);
        for (again, at) in [
            (false, request),
            (true, (request + later).min(requests - 1)),
        ] {
            jobs.push(Job {
                request,
                again,
                sync: rng.random_range(0..100) < sync_percent,
                due: slot * at as u32,
            });
        }
    }
    jobs.sort_by_key(|j| (j.due, j.again, j.request));
    jobs
}

/// The load of one run: what its clients share with each other and with the driver.
pub struct Load {
    requests: Vec<Request>,
    jobs: Vec<Job>,
    sync_wait: Duration,
    poll_interval: Duration,
    start: Instant,
    gateway_lives: Arc<AtomicU32>,
    /// Set to end the run early: Ctrl-C, or a fault the run cannot go on after.
    stop: Arc<AtomicBool>,
    /// The next job to send.
    next: AtomicUsize,
    answered: AtomicUsize,
    retries: AtomicUsize,
    /// Why the last POST that got no reply got none.
    last_failure: Mutex<String>,
    ended: AtomicUsize,
    not_found: AtomicUsize,
    events: Mutex<Vec<Event>>,
    /// Every execution named so far; each goes to one poller's inbox the first time.
    named: Mutex<BTreeSet<String>>,
    inboxes: Vec<Mutex<Vec<String>>>,
    /// Executions seen ended, in the order they ended: what the auditor goes round.
    finished: Mutex<Vec<String>>,
    /// Set once no submitter will name a new execution.
    submitted: AtomicBool,
    /// Set once the pollers are done: the auditor stops.
    polled: AtomicBool,
    /// When the clients give up on what is still to come; set when the faults stop.
    deadline: Mutex<Option<Instant>>,
}

/// Counters for progress lines.
#[derive(Clone, Debug)]
pub struct Counts {
    /// POSTs answered (first and second of each request).
    pub answered: usize,
    /// POSTs to send in all.
    pub jobs: usize,
    /// POSTs that got no reply and were sent again with the same key.
    pub retries: usize,
    /// Why the last of those got none.
    pub last_failure: String,
    /// Distinct executions named.
    pub executions: usize,
    /// Executions seen to end.
    pub ended: usize,
    /// Executions the gateway answered 404 for (the verdict tells lost from vanished).
    pub not_found: usize,
}

impl Load {
    /// The load of `requests` sent as `jobs` from `start`; synchronous POSTs wait up to
    /// `sync_wait`, `pollers` pollers sweep their executions every `poll_interval`, and
    /// `gateway_lives` counts the gateway's starts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        requests: Vec<Request>,
        jobs: Vec<Job>,
        sync_wait: Duration,
        pollers: usize,
        poll_interval: Duration,
        start: Instant,
        gateway_lives: Arc<AtomicU32>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Self {
            requests,
            jobs,
            sync_wait,
            poll_interval,
            start,
            gateway_lives,
            stop,
            next: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            last_failure: Mutex::new(String::new()),
            ended: AtomicUsize::new(0),
            not_found: AtomicUsize::new(0),
            events: Mutex::new(Vec::new()),
            named: Mutex::new(BTreeSet::new()),
            inboxes: (0..pollers.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            finished: Mutex::new(Vec::new()),
            submitted: AtomicBool::new(false),
            polled: AtomicBool::new(false),
            deadline: Mutex::new(None),
        }
    }

    /// The counters, for a progress line.
    pub fn counts(&self) -> Counts {
        Counts {
            answered: self.answered.load(Ordering::Relaxed),
            jobs: self.jobs.len(),
            retries: self.retries.load(Ordering::Relaxed),
            last_failure: lock(&self.last_failure).clone(),
            executions: lock(&self.named).len(),
            ended: self.ended.load(Ordering::Relaxed),
            not_found: self.not_found.load(Ordering::Relaxed),
        }
    }

    /// Whether the run was ended early.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Ends the run early: every client returns.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Time since the start of the run.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// One submitter: takes jobs until there are none left, each sent when due and until it
    /// is answered. A refused POST stops the whole run.
    pub fn submit(&self, api: &Api) -> Result<()> {
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&job) = self.jobs.get(n) else {
                return Ok(());
            };
            let due = self.start + job.due;
            while Instant::now() < due && self.going() {
                std::thread::sleep((due - Instant::now()).min(RETRY_PAUSE));
            }
            match self.send(api, job) {
                Ok(true) => {
                    self.answered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => return Ok(()),
                Err(e) => {
                    self.stop();
                    return Err(e);
                }
            }
        }
    }

    /// Sends a job's POST until it is answered, with the same key every time; false if the
    /// run stopped or the deadline passed first.
    fn send(&self, api: &Api, job: Job) -> Result<bool> {
        let r = &self.requests[job.request];
        let wait = job.sync.then_some(self.sync_wait);
        while self.going() {
            let (sent, life) = self.clock();
            let reply = api.invoke(&r.app, &r.key, r.input, wait)?;
            let outcome = match &reply {
                Posted::Accepted(exec) | Posted::Answered(exec, _) => Ok(Some(exec.clone())),
                Posted::Forgotten(_) => Ok(None),
                Posted::Unavailable(why) => Err(why.clone()),
            };
            self.record(
                sent,
                life,
                What::Post {
                    request: job.request,
                    sync: job.sync,
                    reply,
                },
            );
            let named = match outcome {
                Ok(named) => named,
                Err(why) => {
                    *lock(&self.last_failure) = why;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(RETRY_PAUSE);
                    continue;
                }
            };
            if let Some(exec) = named {
                if lock(&self.named).insert(exec.clone()) {
                    lock(&self.inboxes[job.request % self.inboxes.len()]).push(exec);
                }
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Says that no new execution will be named: a poller with nothing left to poll ends.
    pub fn submissions_done(&self) {
        self.submitted.store(true, Ordering::Release);
    }

    /// Says that the pollers are done: the auditor ends.
    pub fn polling_done(&self) {
        self.polled.store(true, Ordering::Release);
    }

    /// Sets when the clients stop waiting: for a POST to be answered, for an execution to
    /// end.
    pub fn set_deadline(&self, deadline: Instant) {
        *lock(&self.deadline) = Some(deadline);
    }

    /// Not stopped, and the deadline not passed.
    fn going(&self) -> bool {
        !self.stopped() && lock(&self.deadline).is_none_or(|d| Instant::now() < d)
    }

    /// Poller `me`: polls the executions in its inbox until each has ended or been answered
    /// 404, or until the deadline. A sweep the gateway does not answer is cut short and tried
    /// again.
    pub fn poll(&self, api: &Api, me: usize) -> Result<()> {
        let mut pending: Vec<String> = Vec::new();
        loop {
            // Read before the inbox is emptied, so that no id pushed before the flag was
            // set can be left behind.
            let no_more = self.submitted.load(Ordering::Acquire);
            pending.append(&mut lock(&self.inboxes[me]));
            if !self.going() || (no_more && pending.is_empty()) {
                return Ok(());
            }
            let mut i = 0;
            while i < pending.len() && !self.stopped() {
                match self.poll_once(api, &pending[i])? {
                    Polled::Found { outcome, .. } if outcome != Outcome::Running => {
                        self.ended.fetch_add(1, Ordering::Relaxed);
                        lock(&self.finished).push(pending.swap_remove(i));
                        continue;
                    }
                    Polled::Found { .. } => {}
                    Polled::NotFound(_) => {
                        self.not_found.fetch_add(1, Ordering::Relaxed);
                        pending.swap_remove(i);
                        continue;
                    }
                    Polled::Unavailable(_) => break,
                }
                i += 1;
            }
            std::thread::sleep(self.poll_interval);
        }
    }

    /// The auditor: polls the executions seen ended again, one every `pause`, round and round,
    /// until the pollers are done. Each answer must agree with the first, whichever life of
    /// the gateway gives it.
    pub fn audit_while_running(&self, api: &Api, pause: Duration) -> Result<()> {
        let mut cursor = 0;
        while !self.polled.load(Ordering::Acquire) && !self.stopped() {
            let next = {
                let finished = lock(&self.finished);
                (!finished.is_empty()).then(|| finished[cursor % finished.len()].clone())
            };
            if let Some(id) = next {
                self.poll_once(api, &id)?;
                cursor += 1;
            }
            std::thread::sleep(pause);
        }
        Ok(())
    }

    /// Auditor `me` of `of` after the faults: polls every `of`-th execution named, once, each
    /// again for up to `patience` while the gateway does not answer for it.
    pub fn audit(&self, api: &Api, me: usize, of: usize, patience: Duration) -> Result<()> {
        let ids: Vec<String> = lock(&self.named)
            .iter()
            .skip(me)
            .step_by(of)
            .cloned()
            .collect();
        for id in ids {
            let until = Instant::now() + patience;
            while let Polled::Unavailable(_) = self.poll_once(api, &id)? {
                if self.stopped() || Instant::now() >= until {
                    break;
                }
                std::thread::sleep(RETRY_PAUSE);
            }
            if self.stopped() {
                break;
            }
        }
        Ok(())
    }

    /// Polls an execution once and records the exchange.
    fn poll_once(&self, api: &Api, id: &str) -> Result<Polled> {
        let (sent, life) = self.clock();
        let reply = api.execution(id).inspect_err(|_| self.stop())?;
        let what = What::Poll {
            exec: id.to_owned(),
            reply: reply.clone(),
        };
        self.record(sent, life, what);
        Ok(reply)
    }

    /// The time and the gateway's life before an exchange.
    fn clock(&self) -> (Instant, u32) {
        (Instant::now(), self.gateway_lives.load(Ordering::SeqCst))
    }

    /// Records an exchange sent at `sent` in the gateway's life `life`; the life is certain if
    /// the gateway has not started again since.
    fn record(&self, sent: Instant, life: u32, what: What) {
        let got = Instant::now();
        let same_life = self.gateway_lives.load(Ordering::SeqCst) == life;
        let event = Event {
            sent: sent - self.start,
            got: got - self.start,
            life: same_life.then_some(life),
            what,
        };
        lock(&self.events).push(event);
    }

    /// The history so far, for a run whose faults stopped at `healed` and whose executions had
    /// `bound` after that to end.
    pub fn history(&self, healed: Duration, bound: Duration) -> History {
        History {
            requests: self.requests.clone(),
            events: lock(&self.events).clone(),
            healed,
            bound,
        }
    }
}

/// Locks `m`; a client that panicked holding it left data that is still worth reporting.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Turns a thread's panic into an error.
pub fn joined<T>(joined: std::thread::Result<Result<T>>) -> Result<T> {
    joined.map_err(|_| anyhow!("a client thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_send_each_request_twice_in_due_order_over_the_span() {
        let span = Duration::from_secs(100);
        let jobs = jobs(1000, span, 30, 7);
        assert_eq!(jobs.len(), 2000);
        assert!(jobs.windows(2).all(|w| w[0].due <= w[1].due));
        assert!(jobs.iter().all(|j| j.due < span));
        for request in 0..1000 {
            let mine: Vec<&Job> = jobs.iter().filter(|j| j.request == request).collect();
            assert_eq!(mine.len(), 2);
            let (first, again) = (mine[0], mine[1]);
            assert!(!first.again && again.again);
            assert!(first.due <= again.due && again.due <= first.due + span / 4);
        }
        let sync = jobs.iter().filter(|j| j.sync).count();
        assert!((500..700).contains(&sync), "{sync} of 2000 synchronous");
        let racing = (0..1000)
            .filter(|&r| {
                let due: Vec<Duration> = jobs
                    .iter()
                    .filter(|j| j.request == r)
                    .map(|j| j.due)
                    .collect();
                due[0] == due[1]
            })
            .count();
        assert!(racing > 0, "no request is sent twice at once");
        assert_eq!(super::jobs(1000, span, 30, 7), jobs);
        assert_ne!(super::jobs(1000, span, 30, 8), jobs);
    }
}
