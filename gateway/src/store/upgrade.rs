//! Stores written by earlier builds, rewritten in this build's format when opened.
//!
//! Each upgrade reads the rows whose encoding changed as the earlier build wrote them and
//! writes them back as this build would have, in one durable transaction with the new format
//! number: a crash during it leaves the store as it was.

use std::path::Path;

use redb::{ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use sand_protocol::durable::{CallRecord, JoinRecord, Owner};
use sand_protocol::ids::{AppName, Attempt, CallId, ExecId, GrainName};
use sand_protocol::trace_context::TraceParent;
use sand_protocol::wire::{Cont, JoinSpec, Payload, Reason};

use super::{encode, StoreError, CALLS, JOINS};

/// Format 3 to 4: calls and joins gained the span they hang from. Those pending across the
/// upgrade get none: their runs are not traced.
pub(super) fn from_3(txn: &WriteTransaction, path: &Path) -> Result<(), StoreError> {
    rewrite::<Call3, CallRecord>(txn, CALLS, path)?;
    rewrite::<Join3, JoinRecord>(txn, JOINS, path)
}

/// Rewrites every row of `table`, read as `Old`, as the `New` it becomes.
fn rewrite<Old, New>(
    txn: &WriteTransaction,
    table: TableDefinition<(u64, u64), &[u8]>,
    path: &Path,
) -> Result<(), StoreError>
where
    Old: DeserializeOwned,
    New: Serialize + From<Old>,
{
    let storage = |e: redb::Error| StoreError::Storage {
        path: path.to_path_buf(),
        source: Box::new(e),
    };
    let mut rows = txn.open_table(table).map_err(|e| storage(e.into()))?;
    let mut rewritten = Vec::new();
    for row in rows.iter().map_err(|e| storage(e.into()))? {
        let (k, v) = row.map_err(|e| storage(e.into()))?;
        let old: Old = postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            what: format!(
                "a row of table {} does not decode as format 3: {e}",
                table.name()
            ),
        })?;
        rewritten.push((k.value(), encode(&New::from(old), path)?));
    }
    for (key, value) in rewritten {
        rows.insert(key, &value[..])
            .map_err(|e| storage(e.into()))?;
    }
    Ok(())
}

/// A [`CallRecord`] as format 3 wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct Call3 {
    pub exec: ExecId,
    pub call: CallId,
    pub app: AppName,
    pub grain: GrainName,
    pub input: Payload,
    pub cont: Cont,
    pub attempt: Attempt,
    pub failures: u32,
    pub reason: Reason,
    pub owner: Option<Owner>,
    pub depth_left: u32,
}

impl From<Call3> for CallRecord {
    fn from(c: Call3) -> Self {
        CallRecord {
            exec: c.exec,
            call: c.call,
            app: c.app,
            grain: c.grain,
            input: c.input,
            cont: c.cont,
            attempt: c.attempt,
            failures: c.failures,
            reason: c.reason,
            owner: c.owner,
            depth_left: c.depth_left,
            traceparent: TraceParent::default(),
        }
    }
}

/// A [`JoinRecord`] as format 3 wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct Join3 {
    pub exec: ExecId,
    pub spec: JoinSpec3,
    pub contributions: Vec<Option<Payload>>,
    pub fired: bool,
}

/// A [`JoinSpec`] as format 3 wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct JoinSpec3 {
    pub call: CallId,
    pub grain: GrainName,
    pub branches: u32,
    pub cont: Cont,
    pub depth_left: u32,
}

impl From<Join3> for JoinRecord {
    fn from(j: Join3) -> Self {
        let s = j.spec;
        JoinRecord {
            exec: j.exec,
            spec: JoinSpec {
                call: s.call,
                grain: s.grain,
                branches: s.branches,
                cont: s.cont,
                depth_left: s.depth_left,
                traceparent: TraceParent::default(),
            },
            contributions: j.contributions,
            fired: j.fired,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use crate::store::{Store, META, META_FORMAT};
    use sand_protocol::ids::{CallKey, Incarnation, WorkerId};

    /// Writes a store as a format-3 build left it: one pending call, one join.
    fn format_3_store(path: &std::path::Path, format: u64) -> (Call3, Join3) {
        let exec = ExecId::new(1, 7);
        let call = Call3 {
            exec,
            call: exec.root_call().child(0),
            app: AppName::new("shop").unwrap(),
            grain: GrainName::new("pay").unwrap(),
            input: Payload::from("[1]"),
            cont: Cont::Join {
                join: exec.root_call().join(),
                branch: 0,
            },
            attempt: Attempt(5),
            failures: 1,
            reason: Reason::Retry,
            owner: Some(Owner {
                worker: WorkerId(2),
                incarnation: Incarnation(3),
            }),
            depth_left: 15,
        };
        let join = Join3 {
            exec,
            spec: JoinSpec3 {
                call: exec.root_call().join(),
                grain: GrainName::new("sum").unwrap(),
                branches: 2,
                cont: Cont::Client,
                depth_left: 16,
            },
            contributions: vec![None, Some(Payload::from("2"))],
            fired: false,
        };
        let db = redb::Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(META_FORMAT, format)
            .unwrap();
        let key = (exec.0, call.call.0);
        let row = postcard::to_stdvec(&call).unwrap();
        txn.open_table(CALLS)
            .unwrap()
            .insert(key, &row[..])
            .unwrap();
        let key = (exec.0, join.spec.call.0);
        let row = postcard::to_stdvec(&join).unwrap();
        txn.open_table(JOINS)
            .unwrap()
            .insert(key, &row[..])
            .unwrap();
        txn.commit().unwrap();
        (call, join)
    }

    #[test]
    fn a_format_3_store_opens_upgraded_and_stays_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gq.redb");
        let (call, join) = format_3_store(&path, 3);
        let (exec, call_id, join_id) = (call.exec, call.call, join.spec.call);
        let (expect_call, expect_join) = (CallRecord::from(call), JoinRecord::from(join));
        assert_eq!(expect_call.traceparent, TraceParent::default());
        for _ in 0..2 {
            let (store, state) = Store::open(&path).unwrap();
            assert_eq!(state.calls[&CallKey::new(exec, call_id)], expect_call);
            assert_eq!(state.joins[&CallKey::new(exec, join_id)], expect_join);
            store.close().unwrap();
        }
    }

    #[test]
    fn a_store_of_a_format_not_upgraded_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gq.redb");
        format_3_store(&path, 2);
        let e = Store::open(&path).unwrap_err().to_string();
        assert!(e.contains("format 2, but this build reads format 4"), "{e}");
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let format = txn.open_table(META).unwrap().get(META_FORMAT).unwrap();
        assert_eq!(format.map(|v| v.value()), Some(2));
    }
}
