//! What the gateway promises when it speaks, and whether its disk already holds it: the one rule
//! "durable before visible", shared by the model and the simulator.
//!
//! An ack or a `Welcome` lets a worker drop its backups; a `Fenced`, a `Cancel` or an `Abort`
//! lets it drop work; a `ConfirmInvoke`, an answer, a `ConfirmDeploy` or a `ConfirmRemove` tells
//! a client something. Each may leave the gateway only once the state change behind it is on
//! disk: a gateway that crashed before the write would otherwise still expect what was dropped,
//! or forget what it said.

use sand_protocol::durable::{DurableState, ExecStatus};
use sand_protocol::global_queue::GqOutput;
use sand_protocol::ids::{CallKey, WorkerId};
use sand_protocol::wire::ToWorker;

/// Whether the disk holds what `out` promises (outputs that promise nothing always pass, and
/// app changes are the caller's to check).
pub fn is_durable(store: &DurableState, out: &GqOutput) -> bool {
    match out {
        GqOutput::Send(worker, msg) => sent_is_durable(store, *worker, msg),
        GqOutput::ConfirmInvoke(exec) => store.execs.contains_key(exec),
        GqOutput::Respond(exec, answer) => store
            .execs
            .get(exec)
            .is_some_and(|e| e.status == ExecStatus::Done(answer.clone())),
        // Whether what one says is on disk depends on the changes after it, which a write
        // may make durable with it: the caller checks each against the batch that made it.
        GqOutput::ConfirmDeploy(_) | GqOutput::ConfirmRemove { .. } | GqOutput::Persist(_) => true,
    }
}

/// Whether the disk holds what message `msg` to `worker` promises.
pub fn sent_is_durable(store: &DurableState, worker: WorkerId, msg: &ToWorker) -> bool {
    match msg {
        ToWorker::Ack { incarnation, upto }
        | ToWorker::Welcome {
            incarnation,
            applied: upto,
            ..
        } => store.workers.get(&worker).is_some_and(|r| {
            r.incarnation > *incarnation || (r.incarnation == *incarnation && r.applied >= *upto)
        }),
        ToWorker::Fenced { incarnation, .. } => store
            .workers
            .get(&worker)
            .is_some_and(|r| r.incarnation > *incarnation || r.dead),
        // The worker drops the execution's work: it must have ended.
        ToWorker::Cancel { exec, .. } => store
            .execs
            .get(exec)
            .is_some_and(|e| matches!(e.status, ExecStatus::Done(_))),
        // The worker kills the attempt: no one may hold it any longer (an attempt is fresh per
        // placement, so one still owned is one still expected to run).
        ToWorker::Abort {
            exec,
            call,
            attempt,
            ..
        } => store
            .calls
            .get(&CallKey::new(*exec, *call))
            .is_none_or(|c| c.attempt != *attempt || c.owner.is_none()),
        ToWorker::Dispatch { .. } => true,
    }
}
