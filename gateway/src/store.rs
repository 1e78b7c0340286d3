//! The gateway's durable store: one redb file holding the global queue's durable state (the
//! deployed apps' bundles included) and call traces.
//!
//! The global queue's state lives as tables, one row per entity (apps, execs, calls, joins,
//! workers) plus `meta` (the epoch and the last committed [`LogIndex`]). Every [`Op`] is a put
//! or a delete of one row, so writing a [`Batch`] costs O(its ops), not O(state), and reading
//! the tables back gives exactly the state of applying every committed batch in order.
//!
//! # Group commit
//!
//! [`Store::append`] only queues a batch. A dedicated thread (redb is blocking) takes every
//! job queued since its last commit and writes them in ONE write transaction with
//! `Durability::Immediate`, one fsync shared by all of them. Batches commit in the order they
//! were appended, which must be index order, all or nothing per transaction. After each commit
//! the thread publishes a [`CommitStatus`] on a tokio `watch` channel ([`Store::commits`]):
//! the driver awaits it and feeds `GqEvent::Persisted(status.upto)` to the global queue.
//! Because the log is written in order, `upto` covers every earlier batch too.
//!
//! # Deferred batches
//!
//! A batch that nobody waits on yet — the acceptance of a synchronous invocation, whose client
//! is told nothing before the answer — is appended with [`Store::append_deferred`]. It does
//! not start a commit of its own: it rides in the next transaction an [`Store::append`]ed batch
//! starts, or commits on its own once it has waited [`DEFER_MAX`]. Traces wait the same way.
//! Order is kept all the same: a durable later batch implies every earlier one. So a
//! synchronous execution whose grain answers within [`DEFER_MAX`] pays for one fsync on its
//! critical path (its answer's), not two in a row.
//!
//! # Failure
//!
//! A commit that fails stops the thread and sets [`CommitStatus::failure`]; every later
//! `append` returns [`StoreError::Failed`]. The driver must treat that as fatal and stop the
//! gateway: the queue's in-memory state is then ahead of the disk, and only a restart (which
//! replays the disk) makes them agree again. Never retry the batch.
//!
//! Dropping a [`Store`] without [`Store::close`] is a crash as far as the disk can tell: what
//! was queued but not committed is discarded.

// redb's error type is large. `StoreError` boxes it; only private helpers pass it unboxed, on
// paths that run once per transaction.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::watch;

use sand_protocol::durable::{
    Batch, CallRecord, Deployment, DurableState, ExecRecord, JoinRecord, LogIndex, Op, WorkerRecord,
};
use sand_protocol::ids::{Attempt, CallId, ExecId, WorkerId};
use sand_protocol::policy::AppSpec;
use sand_protocol::wire::AppBundle;

mod upgrade;

/// Where the commit thread stands, published after every commit.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct CommitStatus {
    /// Every batch up to this index is durable (0: none yet since the store was opened).
    pub upto: LogIndex,
    /// Why the commit thread stopped, if a commit failed. Fatal: stop the gateway.
    pub failure: Option<String>,
}

/// Counts for `/metrics`, since the store was opened.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct StoreStats {
    /// Batches committed.
    pub batches: u64,
    /// Write transactions the commit thread committed (each one fsync when it held batches).
    pub transactions: u64,
    /// Traces written.
    pub traces: u64,
}

/// One call attempt's trace, kept for `GET /v1/executions/{id}`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Trace {
    /// The execution.
    pub exec: ExecId,
    /// The call.
    pub call: CallId,
    /// The attempt.
    pub attempt: Attempt,
    /// The serialized trace; the store does not look inside.
    pub data: Bytes,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened as a store: unreadable, not a redb file, or in use.
    #[error("cannot open the store {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<redb::DatabaseError>,
    },
    /// Reading or writing failed.
    #[error("store {path}: {source}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<redb::Error>,
    },
    /// The file holds something this build cannot read back.
    #[error("store {path} is corrupt: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// A batch was appended out of index order: a bug in the caller.
    #[error("batch {got:?} appended out of order: the next must be {expected:?}")]
    OutOfOrder {
        /// The index the store expected.
        expected: LogIndex,
        /// The index it got.
        got: LogIndex,
    },
    /// A commit failed earlier, or the store was closed: nothing more is written.
    #[error("store {path} no longer writes: {reason}")]
    Failed {
        /// The file.
        path: PathBuf,
        /// The failure that stopped it.
        reason: String,
    },
}

/// The durable store. `Send + Sync`: share it in an `Arc`.
pub struct Store {
    shared: Arc<Shared>,
    queue: Mutex<Queue>,
    commits: watch::Receiver<CommitStatus>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    recovered: LogIndex,
}

impl Store {
    /// Opens (or creates) the store at `path` and starts its commit thread. Returns the durable
    /// state equal to applying every batch ever committed, in order, for
    /// `GlobalQueue::recover`. The first batch appended after opening must have index 1.
    pub fn open(path: &Path) -> Result<(Store, DurableState), StoreError> {
        Self::open_with(path, DEFER_MAX)
    }

    /// Like [`Store::open`], with deferred work waiting at most `defer_max` (instead of
    /// [`DEFER_MAX`]) for a batch to ride with.
    pub fn open_with(
        path: &Path,
        defer_max: Duration,
    ) -> Result<(Store, DurableState), StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let shared = Arc::new(Shared {
            db,
            path: path.to_path_buf(),
            batches: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            traces: AtomicU64::new(0),
        });
        shared.init()?;
        let (state, recovered) = shared.load()?;
        let (jobs, job_rx) = mpsc::channel();
        let (status_tx, commits) = watch::channel(CommitStatus::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("sand-store-commit".to_string())
                .spawn(move || commit_loop(&shared, &job_rx, &stop, &status_tx, defer_max))
                .map_err(|e| StoreError::Storage {
                    path: path.to_path_buf(),
                    source: Box::new(redb::Error::Io(e)),
                })?
        };
        let store = Store {
            shared,
            queue: Mutex::new(Queue {
                jobs: Some(jobs),
                appended: LogIndex(0),
            }),
            commits,
            stop,
            thread: Some(thread),
            recovered,
        };
        Ok((store, state))
    }

    /// Queues a batch for the next group commit, which starts at once if the commit thread is
    /// idle. Its index must follow the last appended one (1 first after opening). Returns at
    /// once; await [`Store::commits`] (or [`Store::durable`]) to learn when it is on disk.
    pub fn append(&self, batch: Batch) -> Result<(), StoreError> {
        self.append_job(batch, true)
    }

    /// Like [`Store::append`], for a batch nobody waits on yet: it is written with the next
    /// batch appended by [`Store::append`], or on its own after [`DEFER_MAX`], whichever comes
    /// first. Its place in the order is where it was appended, as for any batch.
    pub fn append_deferred(&self, batch: Batch) -> Result<(), StoreError> {
        self.append_job(batch, false)
    }

    fn append_job(&self, batch: Batch, urgent: bool) -> Result<(), StoreError> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let expected = LogIndex(queue.appended.0 + 1);
        if batch.index != expected {
            return Err(StoreError::OutOfOrder {
                expected,
                got: batch.index,
            });
        }
        let index = batch.index;
        self.send(&queue, Job::Batch { batch, urgent })?;
        queue.appended = index;
        Ok(())
    }

    /// Queues traces to be written with the next group commit, or on their own after
    /// [`DEFER_MAX`]. Best effort: traces never start a commit early, and a crash may lose the
    /// ones not yet committed.
    pub fn put_traces(&self, traces: Vec<Trace>) -> Result<(), StoreError> {
        if traces.is_empty() {
            return Ok(());
        }
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        self.send(&queue, Job::Traces(traces))
    }

    /// Queues the removal of every trace of `exec`, written like traces.
    pub fn delete_traces(&self, exec: ExecId) -> Result<(), StoreError> {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        self.send(&queue, Job::DeleteTraces(exec))
    }

    /// Waits until batch `index` is durable. Fails if the commit thread failed first.
    pub async fn durable(&self, index: LogIndex) -> Result<(), StoreError> {
        let mut rx = self.commits.clone();
        let status = rx
            .wait_for(|s| s.upto >= index || s.failure.is_some())
            .await
            .map_err(|_| self.failed("the commit thread stopped"))?;
        match &status.failure {
            Some(reason) if status.upto < index => Err(self.failed(reason)),
            _ => Ok(()),
        }
    }

    /// Stops the commit thread after it has committed everything queued, and returns the
    /// final counts, or the failure that stopped it earlier.
    pub fn close(mut self) -> Result<StoreStats, StoreError> {
        self.shutdown();
        match &self.commits.borrow().failure {
            Some(reason) => Err(self.failed(reason)),
            None => Ok(self.stats()),
        }
    }

    /// The commit thread's status, updated after every commit. The driver selects on
    /// `changed()` and reports `GqEvent::Persisted(upto)`; a `failure` is fatal.
    pub fn commits(&self) -> watch::Receiver<CommitStatus> {
        self.commits.clone()
    }

    /// The index of the last batch committed before this open: indices restart at 1 in each
    /// gateway incarnation, so this is the last one of the latest incarnation that committed
    /// any (0 for a new store). For logs and tests; recovery needs only the state.
    pub fn recovered(&self) -> LogIndex {
        self.recovered
    }

    /// Counts since the store was opened.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            batches: self.shared.batches.load(Ordering::Relaxed),
            transactions: self.shared.transactions.load(Ordering::Relaxed),
            traces: self.shared.traces.load(Ordering::Relaxed),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The committed traces of `exec`, ordered by call and attempt. Blocking.
    pub fn traces(&self, exec: ExecId) -> Result<Vec<Trace>, StoreError> {
        let s = &self.shared;
        let txn = s.db.begin_read().map_err(|e| s.storage(e))?;
        let t = txn.open_table(TRACES).map_err(|e| s.storage(e))?;
        let range = t.range(trace_range(exec)).map_err(|e| s.storage(e))?;
        let mut out = Vec::new();
        for row in range {
            let (k, v) = row.map_err(|e| s.storage(e))?;
            let (e, c, a) = k.value();
            out.push(Trace {
                exec: ExecId(e),
                call: CallId(c),
                attempt: Attempt(a),
                data: Bytes::copy_from_slice(v.value()),
            });
        }
        Ok(out)
    }

    fn send(&self, queue: &Queue, job: Job) -> Result<(), StoreError> {
        let jobs = queue
            .jobs
            .as_ref()
            .ok_or_else(|| self.failed("the store is closed"))?;
        jobs.send(job).map_err(|_| {
            let reason = self.commits.borrow().failure.clone();
            self.failed(reason.as_deref().unwrap_or("the commit thread stopped"))
        })
    }

    fn failed(&self, reason: &str) -> StoreError {
        StoreError::Failed {
            path: self.shared.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// Closes the queue and waits for the thread: it commits what is queued unless `stop` is
    /// set.
    fn shutdown(&mut self) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .jobs
            .take();
        if let Some(thread) = self.thread.take() {
            // A panic in the thread already surfaced as a closed channel; nothing to add here.
            let _ = thread.join();
        }
    }
}

impl Drop for Store {
    /// Like a crash: the thread finishes the transaction it is in, and queued jobs are lost.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.shutdown();
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.shared.path)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
const EXECS: TableDefinition<u64, &[u8]> = TableDefinition::new("execs");
const CALLS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("calls");
const JOINS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("joins");
const WORKERS: TableDefinition<u32, &[u8]> = TableDefinition::new("workers");
const BUNDLES: TableDefinition<&str, (&str, &[u8])> = TableDefinition::new("bundles");
const TRACES: TableDefinition<(u64, u64, u64), &[u8]> = TableDefinition::new("traces");

const META_FORMAT: &str = "format";
const META_EPOCH: &str = "epoch";
const META_LAST_INDEX: &str = "last_index";
/// The layout this build writes. Bump it when a table's encoding changes, and upgrade the
/// format before it in [`upgrade`]. 3: executions keep their key's input digest, acceptance
/// and end times. 4: calls and joins keep the span they hang from.
const FORMAT: u64 = 4;

/// The most jobs written in one transaction, so one transaction stays bounded under a flood.
const GROUP_JOBS_MAX: usize = 8192;

/// The longest a deferred batch or a trace waits for a batch to ride with before it is
/// committed on its own. It covers a warm grain's run, so that a synchronous execution's
/// acceptance and answer share one fsync; it also bounds how late a 202 for a synchronous
/// request that timed out can leave, and how long an accepted synchronous execution may be
/// lost by a crash (which the design allows: its client was told nothing).
pub const DEFER_MAX: Duration = Duration::from_millis(10);

/// Work for the commit thread.
enum Job {
    /// A batch of the log; `urgent` if someone waits for it to be durable.
    Batch {
        batch: Batch,
        urgent: bool,
    },
    Traces(Vec<Trace>),
    DeleteTraces(ExecId),
}

impl Job {
    /// Whether this job starts a commit as soon as the thread can take it.
    fn is_urgent(&self) -> bool {
        matches!(self, Job::Batch { urgent: true, .. })
    }
}

struct Queue {
    /// `None` once the store is closing.
    jobs: Option<mpsc::Sender<Job>>,
    /// The index of the last batch appended.
    appended: LogIndex,
}

struct Shared {
    db: Database,
    path: PathBuf,
    batches: AtomicU64,
    transactions: AtomicU64,
    traces: AtomicU64,
}

/// The commit thread: one transaction per wake-up, covering everything queued. A wake-up that
/// finds only deferred work waits (up to `defer_max`) for urgent work to carry it.
fn commit_loop(
    shared: &Shared,
    jobs: &mpsc::Receiver<Job>,
    stop: &AtomicBool,
    status: &watch::Sender<CommitStatus>,
    defer_max: Duration,
) {
    let mut upto = LogIndex(0);
    while let Ok(first) = jobs.recv() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let mut group = vec![first];
        let mut urgent = take_queued(jobs, &mut group);
        let deadline = Instant::now() + defer_max;
        while !urgent && group.len() < GROUP_JOBS_MAX {
            let left = deadline.saturating_duration_since(Instant::now());
            match jobs.recv_timeout(left) {
                Ok(job) => {
                    urgent = job.is_urgent();
                    group.push(job);
                    urgent |= take_queued(jobs, &mut group);
                }
                // Waited long enough, or the store is closing: commit what is held (unless
                // it is a crash, checked below).
                Err(_) => break,
            }
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        match shared.write_group(&group) {
            Ok(Some(index)) => {
                upto = index;
                status.send_replace(CommitStatus {
                    upto,
                    failure: None,
                });
            }
            Ok(None) => {}
            Err(e) => {
                status.send_replace(CommitStatus {
                    upto,
                    failure: Some(e.to_string()),
                });
                return;
            }
        }
    }
}

/// Moves every job already queued into `group`, up to [`GROUP_JOBS_MAX`]; returns whether
/// the group now holds urgent work.
fn take_queued(jobs: &mpsc::Receiver<Job>, group: &mut Vec<Job>) -> bool {
    while group.len() < GROUP_JOBS_MAX {
        match jobs.try_recv() {
            Ok(job) => group.push(job),
            Err(_) => break,
        }
    }
    group.iter().any(Job::is_urgent)
}

impl Shared {
    fn storage(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Storage {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    /// Creates the tables of a new store, and checks the format of an old one.
    fn init(&self) -> Result<(), StoreError> {
        let format = self.write_now(|txn| {
            let mut meta = txn.open_table(META)?;
            let format = meta.get(META_FORMAT)?.map(|v| v.value());
            if format.is_none() {
                meta.insert(META_FORMAT, FORMAT)?;
            }
            drop(meta);
            txn.open_table(APPS)?;
            txn.open_table(EXECS)?;
            txn.open_table(CALLS)?;
            txn.open_table(JOINS)?;
            txn.open_table(WORKERS)?;
            txn.open_table(BUNDLES)?;
            txn.open_table(TRACES)?;
            Ok(format)
        })?;
        match format {
            None | Some(FORMAT) => Ok(()),
            Some(3) => self.upgrade_from_3(),
            Some(other) => Err(self.corrupt(format!(
                "format {other}, but this build reads format {FORMAT} (and upgrades format 3)"
            ))),
        }
    }

    /// Rewrites a format-3 store as format 4, in one durable transaction.
    fn upgrade_from_3(&self) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.storage(e))?;
        txn.set_durability(Durability::Immediate);
        upgrade::from_3(&txn, &self.path)?;
        let mut meta = txn.open_table(META).map_err(|e| self.storage(e))?;
        meta.insert(META_FORMAT, FORMAT)
            .map_err(|e| self.storage(e))?;
        drop(meta);
        txn.commit().map_err(|e| self.storage(e))?;
        tracing::info!(path = %self.path.display(), "upgraded the store from format 3 to {FORMAT}");
        Ok(())
    }

    /// Runs `f` in a write transaction of its own, committed durably before returning.
    fn write_now<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.storage(e))?;
        txn.set_durability(Durability::Immediate);
        let out = f(&txn).map_err(|e| self.storage(e))?;
        txn.commit().map_err(|e| self.storage(e))?;
        Ok(out)
    }

    /// Reads the durable state back, and the last index committed.
    fn load(&self) -> Result<(DurableState, LogIndex), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.storage(e))?;
        let mut state = DurableState::default();
        let meta = txn.open_table(META).map_err(|e| self.storage(e))?;
        let read_meta = |key| -> Result<u64, StoreError> {
            Ok(meta
                .get(key)
                .map_err(|e| self.storage(e))?
                .map_or(0, |v| v.value()))
        };
        let epoch = read_meta(META_EPOCH)?;
        state.epoch = u32::try_from(epoch)
            .map_err(|_| self.corrupt(format!("epoch {epoch} is above u32")))?;
        let last = LogIndex(read_meta(META_LAST_INDEX)?);

        let apps = txn.open_table(APPS).map_err(|e| self.storage(e))?;
        let bundles = txn.open_table(BUNDLES).map_err(|e| self.storage(e))?;
        for row in apps.iter().map_err(|e| self.storage(e))? {
            let (k, v) = row.map_err(|e| self.storage(e))?;
            let spec: AppSpec = self.decode("apps", v.value())?;
            if spec.name.as_str() != k.value() {
                return Err(self.corrupt(format!(
                    "apps row {:?} holds app {}",
                    k.value(),
                    spec.name
                )));
            }
            let found = bundles.get(k.value()).map_err(|e| self.storage(e))?;
            let Some(row) = found else {
                return Err(self.corrupt(format!(
                    "app {} is deployed without its bundle (only a store written before bundles \
                     and apps shared a transaction can be so; remove the app's row, or start \
                     on a new store and deploy again)",
                    spec.name
                )));
            };
            let (digest, archive) = row.value();
            let bundle = AppBundle {
                digest: digest.to_owned(),
                archive: Bytes::copy_from_slice(archive),
            };
            state
                .apps
                .insert(spec.name.clone(), Deployment { spec, bundle });
        }
        let execs = txn.open_table(EXECS).map_err(|e| self.storage(e))?;
        for row in execs.iter().map_err(|e| self.storage(e))? {
            let (k, v) = row.map_err(|e| self.storage(e))?;
            let rec: ExecRecord = self.decode("execs", v.value())?;
            self.check_key("execs", rec.exec.0 == k.value())?;
            state.execs.insert(rec.exec, rec);
        }
        let calls = txn.open_table(CALLS).map_err(|e| self.storage(e))?;
        for row in calls.iter().map_err(|e| self.storage(e))? {
            let (k, v) = row.map_err(|e| self.storage(e))?;
            let rec: CallRecord = self.decode("calls", v.value())?;
            self.check_key("calls", (rec.exec.0, rec.call.0) == k.value())?;
            state.calls.insert(rec.key(), rec);
        }
        let joins = txn.open_table(JOINS).map_err(|e| self.storage(e))?;
        for row in joins.iter().map_err(|e| self.storage(e))? {
            let (k, v) = row.map_err(|e| self.storage(e))?;
            let rec: JoinRecord = self.decode("joins", v.value())?;
            self.check_key("joins", (rec.exec.0, rec.spec.call.0) == k.value())?;
            state.joins.insert(rec.key(), rec);
        }
        let workers = txn.open_table(WORKERS).map_err(|e| self.storage(e))?;
        for row in workers.iter().map_err(|e| self.storage(e))? {
            let (k, v) = row.map_err(|e| self.storage(e))?;
            let rec: WorkerRecord = self.decode("workers", v.value())?;
            state.workers.insert(WorkerId(k.value()), rec);
        }
        Ok((state, last))
    }

    fn decode<T: DeserializeOwned>(&self, table: &str, bytes: &[u8]) -> Result<T, StoreError> {
        postcard::from_bytes(bytes)
            .map_err(|e| self.corrupt(format!("a row of table {table} does not decode: {e}")))
    }

    fn check_key(&self, table: &str, matches: bool) -> Result<(), StoreError> {
        if matches {
            Ok(())
        } else {
            Err(self.corrupt(format!("a row of table {table} is filed under another key")))
        }
    }

    /// Writes a group of jobs in one transaction: `Immediate` when it holds batches (their
    /// callers wait for the fsync), `Eventual` for traces alone. Returns the highest batch
    /// index written.
    fn write_group(&self, group: &[Job]) -> Result<Option<LogIndex>, StoreError> {
        let has_batches = group.iter().any(|j| matches!(j, Job::Batch { .. }));
        let mut txn = self.db.begin_write().map_err(|e| self.storage(e))?;
        txn.set_durability(if has_batches {
            Durability::Immediate
        } else {
            Durability::Eventual
        });
        let mut upto = None;
        let (mut batches, mut traces) = (0u64, 0u64);
        {
            let mut t = Tables::open(&txn, &self.path).map_err(|e| self.storage(e))?;
            for job in group {
                match job {
                    Job::Batch { batch, .. } => {
                        for op in &batch.ops {
                            t.apply(op)?;
                        }
                        upto = Some(batch.index);
                        batches += 1;
                    }
                    Job::Traces(list) => {
                        for tr in list {
                            t.traces
                                .insert((tr.exec.0, tr.call.0, tr.attempt.0), &tr.data[..])
                                .map_err(|e| self.storage(e))?;
                            traces += 1;
                        }
                    }
                    Job::DeleteTraces(exec) => {
                        t.traces
                            .retain_in(trace_range(*exec), |_, _| false)
                            .map_err(|e| self.storage(e))?;
                    }
                }
            }
            if let Some(index) = upto {
                t.meta
                    .insert(META_LAST_INDEX, index.0)
                    .map_err(|e| self.storage(e))?;
            }
        }
        txn.commit().map_err(|e| self.storage(e))?;
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.batches.fetch_add(batches, Ordering::Relaxed);
        self.traces.fetch_add(traces, Ordering::Relaxed);
        Ok(upto)
    }
}

fn trace_range(exec: ExecId) -> std::ops::RangeInclusive<(u64, u64, u64)> {
    (exec.0, 0, 0)..=(exec.0, u64::MAX, u64::MAX)
}

/// The tables of one write transaction.
struct Tables<'txn> {
    path: &'txn Path,
    meta: redb::Table<'txn, &'static str, u64>,
    apps: redb::Table<'txn, &'static str, &'static [u8]>,
    bundles: redb::Table<'txn, &'static str, (&'static str, &'static [u8])>,
    execs: redb::Table<'txn, u64, &'static [u8]>,
    calls: redb::Table<'txn, (u64, u64), &'static [u8]>,
    joins: redb::Table<'txn, (u64, u64), &'static [u8]>,
    workers: redb::Table<'txn, u32, &'static [u8]>,
    traces: redb::Table<'txn, (u64, u64, u64), &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction, path: &'txn Path) -> Result<Self, redb::Error> {
        Ok(Self {
            path,
            meta: txn.open_table(META)?,
            apps: txn.open_table(APPS)?,
            bundles: txn.open_table(BUNDLES)?,
            execs: txn.open_table(EXECS)?,
            calls: txn.open_table(CALLS)?,
            joins: txn.open_table(JOINS)?,
            workers: txn.open_table(WORKERS)?,
            traces: txn.open_table(TRACES)?,
        })
    }

    /// Writes one op: a put or a delete of one row.
    fn apply(&mut self, op: &Op) -> Result<(), StoreError> {
        let path = self.path;
        let done = match op {
            Op::Epoch(e) => self.meta.insert(META_EPOCH, u64::from(*e)).map(drop),
            Op::PutApp(Deployment { spec, bundle }) => {
                let value = encode(spec, path)?;
                let name = spec.name.as_str();
                let code = (bundle.digest.as_str(), &bundle.archive[..]);
                self.apps
                    .insert(name, &value[..])
                    .and_then(|_| self.bundles.insert(name, code))
                    .map(drop)
            }
            Op::DelApp(app) => self
                .apps
                .remove(app.as_str())
                .and_then(|_| self.bundles.remove(app.as_str()))
                .map(drop),
            Op::PutExec(rec) => {
                let value = encode(rec, path)?;
                self.execs.insert(rec.exec.0, &value[..]).map(drop)
            }
            Op::DelExec(exec) => self.execs.remove(exec.0).map(drop),
            Op::PutCall(rec) => {
                let value = encode(rec, path)?;
                self.calls
                    .insert((rec.exec.0, rec.call.0), &value[..])
                    .map(drop)
            }
            Op::DelCall(exec, call) => self.calls.remove((exec.0, call.0)).map(drop),
            Op::PutJoin(rec) => {
                let value = encode(rec, path)?;
                self.joins
                    .insert((rec.exec.0, rec.spec.call.0), &value[..])
                    .map(drop)
            }
            Op::DelJoin(exec, call) => self.joins.remove((exec.0, call.0)).map(drop),
            Op::PutWorker(worker, rec) => {
                let value = encode(rec, path)?;
                self.workers.insert(worker.0, &value[..]).map(drop)
            }
        };
        done.map_err(|e| StoreError::Storage {
            path: path.to_path_buf(),
            source: Box::new(e.into()),
        })
    }
}

/// postcard of a protocol record.
fn encode<T: Serialize>(value: &T, path: &Path) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        what: format!("a record does not encode: {e}"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use sand_protocol::durable::{ExecStatus, Owner};
    use sand_protocol::ids::{AppName, GrainName, Incarnation};
    use sand_protocol::time::Time;
    use sand_protocol::wire::{Cont, Payload, Reason};

    /// Longer than any test runs: deferred work in these stores never commits by the clock.
    const FOREVER: Duration = Duration::from_secs(3600);

    /// The acceptance of execution `i`: what a synchronous invocation defers.
    fn accept(i: u64) -> Batch {
        let exec = ExecId::new(1, i as u32);
        let app = AppName::new("one").unwrap();
        Batch {
            index: LogIndex(i),
            ops: vec![
                Op::PutExec(ExecRecord {
                    exec,
                    app: app.clone(),
                    idempotency: None,
                    accepted: Time::ZERO,
                    ended: None,
                    calls: 1,
                    status: ExecStatus::Running,
                }),
                Op::PutCall(CallRecord {
                    exec,
                    call: exec.root_call(),
                    app,
                    grain: GrainName::new("square").unwrap(),
                    input: Payload::new(&b"3"[..]),
                    cont: Cont::Client,
                    attempt: Attempt(1),
                    failures: 0,
                    reason: Reason::First,
                    owner: Some(Owner {
                        worker: WorkerId(1),
                        incarnation: Incarnation(1),
                    }),
                    depth_left: 16,
                    traceparent: Default::default(),
                }),
            ],
        }
    }

    /// Waits (at most 20 s) until batch `index` is durable.
    fn wait_durable(store: &Store, index: u64) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), store.durable(LogIndex(index)))
                .await
                .expect("durable within 20 s")
                .unwrap();
        });
    }

    fn applied(batches: &[Batch]) -> DurableState {
        let mut state = DurableState::default();
        batches.iter().for_each(|b| state.apply_batch(b));
        state
    }

    #[test]
    fn a_deferred_batch_rides_in_the_next_urgent_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gq.redb");
        let (store, _) = Store::open_with(&path, FOREVER).unwrap();
        store.append_deferred(accept(1)).unwrap();
        store
            .put_traces(vec![Trace {
                exec: ExecId::new(1, 1),
                call: CallId(1),
                attempt: Attempt(1),
                data: Bytes::from_static(b"t"),
            }])
            .unwrap();
        // Deferred work alone starts no commit, however long it waits.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(store.stats().transactions, 0);
        assert_eq!(store.commits().borrow().upto, LogIndex(0));
        store.append(accept(2)).unwrap();
        wait_durable(&store, 2);
        assert_eq!(
            store.stats(),
            StoreStats {
                batches: 2,
                transactions: 1,
                traces: 1
            },
            "the deferred batch and the trace rode in the urgent batch's transaction"
        );
        drop(store);
        let (store, state) = Store::open(&path).unwrap();
        assert_eq!(store.recovered(), LogIndex(2));
        assert_eq!(state, applied(&[accept(1), accept(2)]));
        assert_eq!(store.traces(ExecId::new(1, 1)).unwrap().len(), 1);
    }

    #[test]
    fn a_deferred_batch_alone_commits_once_it_has_waited() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gq.redb");
        let wait = Duration::from_millis(100);
        let (store, _) = Store::open_with(&path, wait).unwrap();
        let t0 = Instant::now();
        store.append_deferred(accept(1)).unwrap();
        wait_durable(&store, 1);
        assert!(t0.elapsed() >= wait, "committed after {:?}", t0.elapsed());
        assert_eq!(store.stats().transactions, 1);
        drop(store);
        let (_, state) = Store::open(&path).unwrap();
        assert_eq!(state, applied(&[accept(1)]));
    }

    #[test]
    fn closing_commits_deferred_batches_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gq.redb");
        let (store, _) = Store::open_with(&path, FOREVER).unwrap();
        let log: Vec<Batch> = (1..=3).map(accept).collect();
        for b in &log {
            store.append_deferred(b.clone()).unwrap();
        }
        let t0 = Instant::now();
        assert_eq!(store.close().unwrap().batches, 3);
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "close waited out the deferral"
        );
        let (store, state) = Store::open(&path).unwrap();
        assert_eq!(store.recovered(), LogIndex(3));
        assert_eq!(state, applied(&log));
    }

    #[test]
    fn a_crash_does_not_wait_for_deferred_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gq.redb");
        let (store, _) = Store::open_with(&path, FOREVER).unwrap();
        store.append(accept(1)).unwrap();
        wait_durable(&store, 1);
        store.append_deferred(accept(2)).unwrap();
        let t0 = Instant::now();
        drop(store);
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "drop waited out the deferral"
        );
        // What was reported durable survives; the deferred batch may be lost, as a crash may.
        let (store, state) = Store::open(&path).unwrap();
        assert!(store.recovered() >= LogIndex(1));
        assert_eq!(state.execs.len(), store.recovered().0 as usize);
    }
}
