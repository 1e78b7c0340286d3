//! A gateway's disk in memory: what the model, the simulator and the protocol's tests keep where
//! the gateway keeps its store, to drive a [`GlobalQueue`] without I/O.
//!
//! The queue hands out batches to write (`GqOutput::Persist`); the disk [`takes`](MemDisk::take)
//! them, writes the oldest when its caller says so, and tells the queue how far its log is
//! durable (`GqEvent::Persisted`), which lets the outputs the queue held for those batches leave.
//! A crash loses what was not written. The gateway's store does the same with files, an fsync
//! and its own thread, which is why it does not use this.

use crate::durable::{Batch, DurableState, LogIndex};
use crate::global_queue::{GlobalQueue, GqEvent};
use crate::time::Time;

/// The batches handed out and not yet written, oldest first, and what the disk holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemDisk {
    unwritten: Vec<Batch>,
    durable: DurableState,
}

impl MemDisk {
    /// A disk holding `durable`, with nothing waiting to be written.
    pub fn new(durable: DurableState) -> Self {
        Self {
            unwritten: Vec::new(),
            durable,
        }
    }

    /// What the disk holds: all a restart keeps.
    pub fn durable(&self) -> &DurableState {
        &self.durable
    }

    /// What the disk holds, taken from it (as a restarting gateway reads it).
    pub fn into_durable(self) -> DurableState {
        self.durable
    }

    /// How many batches wait to be written.
    pub fn unwritten(&self) -> usize {
        self.unwritten.len()
    }

    /// Takes a batch the queue handed out, to be written after those before it.
    pub fn take(&mut self, batch: Batch) {
        self.unwritten.push(batch);
    }

    /// Writes the oldest `count` waiting batches in log order, each by `put`, which puts it on
    /// the disk (checking what it must of the disk's history first). Returns the index of the
    /// last one written, if any; an error from `put` stops the writing (the batch it refused
    /// and those after it in this group are gone).
    pub fn write<E>(
        &mut self,
        count: usize,
        mut put: impl FnMut(&mut DurableState, &Batch) -> Result<(), E>,
    ) -> Result<Option<LogIndex>, E> {
        let count = count.min(self.unwritten.len());
        let mut last = None;
        for batch in self.unwritten.drain(..count) {
            put(&mut self.durable, &batch)?;
            last = Some(batch.index);
        }
        Ok(last)
    }

    /// Writes as [`MemDisk::write`] does, then tells `gq` that its log is durable up to the last
    /// batch written. Returns whether any was.
    pub fn flush<E>(
        &mut self,
        gq: &mut GlobalQueue,
        now: Time,
        count: usize,
        put: impl FnMut(&mut DurableState, &Batch) -> Result<(), E>,
    ) -> Result<bool, E> {
        let last = self.write(count, put)?;
        if let Some(upto) = last {
            gq.handle(now, GqEvent::Persisted(upto));
        }
        Ok(last.is_some())
    }

    /// The gateway crashed: the batches not yet written are lost. Returns how many.
    pub fn crash(&mut self) -> usize {
        std::mem::take(&mut self.unwritten).len()
    }
}

/// Puts a batch on the disk as it is, checking nothing: the `put` of a caller with no history
/// to check.
pub fn put(durable: &mut DurableState, batch: &Batch) -> Result<(), std::convert::Infallible> {
    durable.apply_batch(batch);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.
mod tests {
    use super::*;
    use crate::durable::Op;
    use crate::global_queue::{GqConfig, GqOutput};
    use crate::ids::{AppName, GrainName};
    use crate::policy::{AppSpec, GrainPolicy};
    use crate::wire::AppBundle;

    fn epoch(index: u64, epoch: u32) -> Batch {
        Batch {
            index: LogIndex(index),
            ops: vec![Op::Epoch(epoch)],
        }
    }

    /// The oldest batches are written first, as many as asked; a crash loses the rest.
    #[test]
    fn writes_the_oldest_first_and_a_crash_loses_the_rest() {
        let mut disk = MemDisk::default();
        for i in 1..=3 {
            disk.take(epoch(i, i as u32));
        }
        assert_eq!(disk.write(2, put).unwrap(), Some(LogIndex(2)));
        assert_eq!(disk.durable().epoch, 2);
        assert_eq!(disk.unwritten(), 1);
        assert_eq!(disk.crash(), 1);
        assert_eq!(disk.write(usize::MAX, put).unwrap(), None);
        assert_eq!(disk.durable().epoch, 2);
    }

    /// A refused batch stops the group: nothing after it is written.
    #[test]
    fn a_refused_batch_stops_the_group() {
        let mut disk = MemDisk::default();
        for i in 1..=3 {
            disk.take(epoch(i, i as u32));
        }
        let refused = disk.write(3, |d, b| {
            if b.index == LogIndex(2) {
                return Err(b.index);
            }
            put(d, b).map_err(|never| match never {})
        });
        assert_eq!(refused, Err(LogIndex(2)));
        assert_eq!(disk.durable().epoch, 1);
        assert_eq!(disk.unwritten(), 0);
    }

    /// Flushing tells the queue: what it held for the batches written leaves, and not before.
    #[test]
    fn a_flush_tells_the_queue() {
        let mut gq = GlobalQueue::new(GqConfig::default(), Time::ZERO);
        let mut disk = MemDisk::default();
        // What leaves the queue, the batches it hands out aside.
        let drain = |gq: &mut GlobalQueue, disk: &mut MemDisk| {
            let mut told = Vec::new();
            while let Some(out) = gq.poll_output() {
                match out {
                    GqOutput::Persist(batch) => disk.take(batch),
                    other => told.push(other),
                }
            }
            told
        };
        drain(&mut gq, &mut disk);
        assert!(disk.flush(&mut gq, Time::ZERO, usize::MAX, put).unwrap());
        assert!(drain(&mut gq, &mut disk).is_empty());
        let app = AppName::new("app").unwrap();
        let grain = GrainName::new("a").unwrap();
        let spec = AppSpec {
            name: app,
            entry: grain.clone(),
            grains: [(grain, GrainPolicy::default())].into_iter().collect(),
        };
        let bundle = AppBundle {
            digest: "d".into(),
            archive: Default::default(),
        };
        gq.deploy(spec, bundle);
        assert!(drain(&mut gq, &mut disk).is_empty(), "told before durable");
        assert_eq!(disk.unwritten(), 1);
        assert!(disk.flush(&mut gq, Time::ZERO, 1, put).unwrap());
        assert_eq!(drain(&mut gq, &mut disk).len(), 1, "the deployment is told");
        assert!(!disk.flush(&mut gq, Time::ZERO, usize::MAX, put).unwrap());
    }
}
