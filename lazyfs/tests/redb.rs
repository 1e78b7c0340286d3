//! The gateway's store, redb, on a lazy filesystem: committed transactions survive a cut,
//! non-durable ones do not, the database reopens cleanly, and a commit's fsync costs what the
//! commit changed, not the size of the file.

mod common;

use std::time::Instant;

use common::mount;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use redb::{Database, DatabaseError, Durability, ReadableTable, TableDefinition};

const TABLE: TableDefinition<&str, &str> = TableDefinition::new("t");
const NUMBERS: TableDefinition<u64, &[u8]> = TableDefinition::new("numbers");

fn insert(db: &Database, key: &str, value: &str, durability: Durability) {
    let mut txn = db.begin_write().expect("begin write");
    txn.set_durability(durability);
    txn.open_table(TABLE)
        .expect("open table")
        .insert(key, value)
        .expect("insert");
    txn.commit().expect("commit");
}

fn get(db: &Database, key: &str) -> Option<String> {
    let txn = db.begin_read().expect("begin read");
    let table = txn.open_table(TABLE).expect("open table");
    let value = table.get(key).expect("get");
    value.map(|v| v.value().to_owned())
}

#[test]
fn redb_keeps_committed_transactions_and_forgets_the_rest() {
    let m = mount();
    let path = m.path("store.redb");
    let db = Database::create(&path).expect("create database");
    insert(&db, "a", "committed", Durability::Immediate);
    insert(&db, "b", "not durable", Durability::None);
    let uncommitted = db.begin_write().expect("begin write");
    uncommitted
        .open_table(TABLE)
        .expect("open table")
        .insert("c", "uncommitted")
        .expect("insert");
    assert_eq!(get(&db, "b").as_deref(), Some("not durable"));
    // redb locks its file with flock; the kernel keeps that lock for the mount.
    assert!(matches!(
        Database::create(&path),
        Err(DatabaseError::DatabaseAlreadyOpen)
    ));

    // The process "dies": its handles are dead after the cut, so whatever redb tries to
    // write when it is dropped fails with EIO and changes nothing.
    let cut = m.fs.cut_power();
    println!("{cut}");
    assert!(cut.bytes_lost > 0);
    drop(uncommitted);
    drop(db);

    let db = Database::open(&path).expect("reopen after the cut");
    assert_eq!(get(&db, "a").as_deref(), Some("committed"));
    assert_eq!(get(&db, "b"), None);
    assert_eq!(get(&db, "c"), None);
    insert(&db, "d", "after the cut", Durability::Immediate);
    drop(db);
    m.fs.cut_power();
    let db = Database::open(&path).expect("reopen after the second cut");
    assert_eq!(get(&db, "d").as_deref(), Some("after the cut"));
}

/// Commits `count` small transactions; returns commits per second.
fn small_commits(db: &Database, first_key: u64, count: u64) -> f64 {
    let start = Instant::now();
    for key in first_key..first_key + count {
        let txn = db.begin_write().expect("begin write");
        txn.open_table(NUMBERS)
            .expect("open table")
            .insert(key, &key.to_le_bytes()[..])
            .expect("insert");
        txn.commit().expect("commit");
    }
    count as f64 / start.elapsed().as_secs_f64()
}

#[test]
fn redb_commit_cost_tracks_the_change_not_the_file_size() {
    const COMMITS: u64 = 1_000;
    let m = mount();
    let path = m.path("store.redb");
    let db = Database::create(&path).expect("create database");

    let before = m.fs.stats();
    let small_rate = small_commits(&db, 0, COMMITS);
    let small = m.fs.stats();
    let small_bytes = std::fs::metadata(&path).expect("stat").len();

    // Write 64 MiB of 256 KiB values in one transaction; redb allocates regions ahead, so the
    // file grows larger still.
    let txn = db.begin_write().expect("begin write");
    {
        let mut table = txn.open_table(NUMBERS).expect("open table");
        let value = vec![0x5a; 256 << 10];
        for key in 0..256u64 {
            table.insert(1 << 40 | key, &value[..]).expect("insert");
        }
    }
    txn.commit().expect("commit");
    let grown = m.fs.stats();
    let large_bytes = std::fs::metadata(&path).expect("stat").len();
    assert!(large_bytes >= 64 << 20, "file is {large_bytes} bytes");

    let large_rate = small_commits(&db, COMMITS, COMMITS);
    let large = m.fs.stats();

    let per_fsync = |from: sand_lazyfs::Stats, to: sand_lazyfs::Stats| {
        (to.pages_synced - from.pages_synced) as f64 / (to.fsyncs - from.fsyncs) as f64
    };
    let small_pages = per_fsync(before, small);
    let large_pages = per_fsync(grown, large);
    println!(
        "redb on lazyfs: {COMMITS} small commits at {small_rate:.0}/s on a {:.1} MiB file \
         ({small_pages:.1} pages per fsync), at {large_rate:.0}/s on a {:.1} MiB file \
         ({large_pages:.1} pages per fsync); {}",
        small_bytes as f64 / (1 << 20) as f64,
        large_bytes as f64 / (1 << 20) as f64,
        large,
    );
    // The work of a fsync is the pages the commit wrote: a handful, whatever the file size
    // (the grown file has over 16,000 pages).
    assert!(large_pages < 64.0, "{large_pages} pages per fsync");
    assert!(large_pages < small_pages * 4.0 + 8.0);
}

const ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("rows");
const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");

type Tables = (
    std::collections::BTreeMap<u64, Vec<u8>>,
    std::collections::BTreeMap<u64, Vec<u8>>,
);

fn read_all(db: &Database) -> Tables {
    let txn = db.begin_read().expect("begin read");
    let mut out: Tables = Default::default();
    for (def, map) in [(ROWS, &mut out.0), (LOGS, &mut out.1)] {
        let Ok(table) = txn.open_table(def) else {
            continue;
        };
        for row in table.iter().expect("iter") {
            let (k, v) = row.expect("row");
            map.insert(k.value(), v.value().to_vec());
        }
    }
    out
}

/// The gateway's pattern of writes: durable transactions that put and delete rows of many
/// sizes (the queue's calls and executions), between them non-durable ones that only add
/// rows (traces), and a power cut every few transactions. After every cut, the database must
/// hold what the last durable transaction committed, or that and some of the non-durable ones
/// after it (redb may write them out early), in order: never less, never out of order.
#[test]
fn redb_keeps_every_durable_commit_across_cuts_between_mixed_commits() {
    let m = mount();
    let path = m.path("store.redb");
    let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    // What the database may hold after a cut: the state after the last durable commit, then
    // after each non-durable one that followed it.
    let mut since: Vec<Tables> = vec![Tables::default()];
    let mut next_key = 0u64;
    for round in 0..40 {
        let db = Database::create(&path).expect("open");
        let found = read_all(&db);
        let keys = |t: &Tables| {
            (
                t.0.keys().copied().collect::<Vec<_>>(),
                t.1.keys().copied().collect::<Vec<_>>(),
            )
        };
        let Some(at) = since.iter().position(|t| *t == found) else {
            panic!(
                "round {round}: the reopened database holds {:?}, the last durable commit {:?}",
                keys(&found),
                keys(&since[0])
            );
        };
        let mut live = since.swap_remove(at);
        since = vec![live.clone()];
        for _ in 0..rng.random_range(0..30) + 1 {
            let immediate = rng.random_range(0..3) != 0;
            let mut txn = db.begin_write().expect("begin write");
            txn.set_durability(if immediate {
                Durability::Immediate
            } else {
                Durability::Eventual
            });
            {
                let mut rows = txn.open_table(ROWS).expect("rows");
                let mut logs = txn.open_table(LOGS).expect("logs");
                for _ in 0..rng.random_range(0..8) + 1 {
                    let size = [16, 200, 3000, 9000, 40_000][rng.random_range(0..5) as usize];
                    let value = vec![(next_key % 251) as u8; size];
                    if immediate && rng.random_range(0..3) == 0 && !live.0.is_empty() {
                        let nth = rng.random_range(0..live.0.len() as u64) as usize;
                        let k = *live.0.keys().nth(nth).expect("a row");
                        rows.remove(k).expect("remove");
                        live.0.remove(&k);
                    } else if immediate {
                        rows.insert(next_key, &value[..]).expect("insert");
                        live.0.insert(next_key, value);
                    } else {
                        logs.insert(next_key, &value[..]).expect("insert");
                        live.1.insert(next_key, value);
                    }
                    next_key += 1;
                }
            }
            txn.commit().expect("commit");
            if immediate {
                since.clear();
            }
            since.push(live.clone());
        }
        let _ = m.fs.cut_power();
        drop(db);
    }
}
