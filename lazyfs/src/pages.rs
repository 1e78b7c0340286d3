//! The contents of one regular file, live and durable, as copy-on-write pages.
//!
//! Both versions are vectors of `Arc`'d 4 KiB pages, and they share every page that has not
//! been written since the last sync. A write copies only the pages it touches (and only when
//! they are still shared) and records them in a dirty set; a sync copies the `Arc`s of the
//! dirty pages into the durable version; a revert clones the durable vector back. So a write
//! costs what it touches and a sync costs what changed since the previous one, never the size
//! of the file. This module knows nothing of FUSE, names or handles.

use std::collections::BTreeSet;
use std::sync::Arc;

/// Bytes in a page: the unit of copy-on-write and of dirty tracking.
pub(crate) const PAGE_SIZE: usize = 4096;

/// One page of file data. Bytes of the last page past the file's length are always zero, so
/// growing a file reveals zeros without touching any page.
type Page = Arc<[u8; PAGE_SIZE]>;

/// One version of a file's bytes.
#[derive(Clone, Debug, Default)]
struct Contents {
    /// Length of the file in bytes.
    len: u64,
    /// One slot per page up to `len`; `None` is a hole that reads as zeros.
    pages: Vec<Option<Page>>,
}

/// A regular file's data: what processes see (`live`) and what survives a power cut
/// (`durable`).
///
/// Invariant: for every page index not in `dirty`, the live and durable slots are the same
/// `Arc` or both holes (an index past the end of a vector counts as a hole).
#[derive(Debug, Default)]
pub(crate) struct FileData {
    live: Contents,
    durable: Contents,
    /// Page indices whose live slot may differ from the durable one.
    dirty: BTreeSet<usize>,
    /// Bytes passed to `write` since the last sync (overwrites count each time).
    unsynced_bytes: u64,
}

/// What a revert threw away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reverted {
    /// Bytes written since the last sync.
    pub(crate) bytes: u64,
    /// Whether the live data differed from the durable data (written pages or a new length).
    pub(crate) changed: bool,
}

impl FileData {
    /// The live length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.live.len
    }

    /// Reads up to `size` live bytes at `offset`; shorter at the end of the file.
    pub(crate) fn read(&self, offset: u64, size: usize) -> Vec<u8> {
        if offset >= self.live.len {
            return Vec::new();
        }
        let end = self.live.len.min(offset.saturating_add(size as u64));
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut position = offset;
        while position < end {
            let (index, within) = split(position);
            let n = ((end - position) as usize).min(PAGE_SIZE - within);
            match &self.live.pages[index] {
                Some(page) => out.extend_from_slice(&page[within..within + n]),
                None => out.resize(out.len() + n, 0),
            }
            position += n as u64;
        }
        out
    }

    /// Writes `data` at `offset` into the live version, growing the file if needed. The
    /// caller has checked that `offset + data.len()` is a length it accepts.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        if end > self.live.len {
            self.grow(end);
        }
        let mut position = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let (index, within) = split(position);
            let n = rest.len().min(PAGE_SIZE - within);
            let page = self.live.pages[index].get_or_insert_with(|| Arc::new([0; PAGE_SIZE]));
            // Copies the page only if the durable version still shares it.
            Arc::make_mut(page)[within..within + n].copy_from_slice(&rest[..n]);
            self.dirty.insert(index);
            position += n as u64;
            rest = &rest[n..];
        }
        self.unsynced_bytes += data.len() as u64;
    }

    /// Sets the live length: shrinking drops the data past it, growing adds zeros.
    pub(crate) fn set_len(&mut self, len: u64) {
        if len >= self.live.len {
            self.grow(len);
            return;
        }
        let kept = pages_for(len);
        // Slots past the new end now read as holes: where the durable version has a page
        // there, the two differ.
        for index in kept..self.live.pages.len() {
            if matches!(self.durable.pages.get(index), Some(Some(_))) {
                self.dirty.insert(index);
            }
        }
        self.live.pages.truncate(kept);
        self.live.len = len;
        let (last, within) = split(len);
        if within != 0 {
            if let Some(Some(page)) = self.live.pages.get_mut(last) {
                if page[within..].iter().any(|&byte| byte != 0) {
                    Arc::make_mut(page)[within..].fill(0);
                    self.dirty.insert(last);
                }
            }
        }
    }

    /// Makes the live data durable; returns the number of pages copied. Costs the number of
    /// dirty pages plus the change in page count, not the file size.
    pub(crate) fn sync(&mut self) -> usize {
        self.durable.pages.resize(self.live.pages.len(), None);
        for &index in &self.dirty {
            if let Some(slot) = self.live.pages.get(index) {
                self.durable.pages[index] = slot.clone();
            }
        }
        self.durable.len = self.live.len;
        let copied = self.dirty.len();
        self.dirty.clear();
        self.unsynced_bytes = 0;
        copied
    }

    /// Bytes written since the last sync.
    pub(crate) fn unsynced_bytes(&self) -> u64 {
        self.unsynced_bytes
    }

    /// Throws the live data away: live := durable.
    pub(crate) fn revert(&mut self) -> Reverted {
        let reverted = Reverted {
            bytes: self.unsynced_bytes,
            changed: !self.dirty.is_empty() || self.live.len != self.durable.len,
        };
        self.live = self.durable.clone();
        self.dirty.clear();
        self.unsynced_bytes = 0;
        reverted
    }

    /// Grows the live length to `len` (at least the current one) with holes.
    fn grow(&mut self, len: u64) {
        // The old last page's bytes past the old length are zero already (see `Page`).
        self.live.pages.resize(pages_for(len), None);
        self.live.len = len;
    }
}

/// Splits a byte position into a page index and an offset within that page.
fn split(position: u64) -> (usize, usize) {
    let page = PAGE_SIZE as u64;
    ((position / page) as usize, (position % page) as usize)
}

/// Pages needed to hold `len` bytes.
fn pages_for(len: u64) -> usize {
    len.div_ceil(PAGE_SIZE as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// A reference file: two plain byte vectors.
    #[derive(Default)]
    struct Model {
        live: Vec<u8>,
        durable: Vec<u8>,
    }

    impl Model {
        fn write(&mut self, offset: u64, data: &[u8]) {
            if data.is_empty() {
                return;
            }
            let end = offset as usize + data.len();
            if end > self.live.len() {
                self.live.resize(end, 0);
            }
            self.live[offset as usize..end].copy_from_slice(data);
        }
    }

    fn everything(file: &FileData) -> Vec<u8> {
        file.read(0, file.len() as usize)
    }

    #[test]
    fn sync_then_revert_keeps_only_synced_data() {
        let mut file = FileData::default();
        file.write(10, b"durable");
        assert_eq!(file.sync(), 1);
        file.write(10, b"DURABLE and more");
        assert_eq!(file.read(10, 16), b"DURABLE and more");
        let reverted = file.revert();
        assert_eq!(
            reverted,
            Reverted {
                bytes: 16,
                changed: true
            }
        );
        assert_eq!(file.len(), 17);
        assert_eq!(file.read(0, 100), [&[0; 10][..], b"durable"].concat());
    }

    #[test]
    fn shrink_then_grow_reverts_to_the_old_bytes_not_zeros() {
        let mut file = FileData::default();
        file.write(0, &[7; 3 * PAGE_SIZE]);
        file.sync();
        file.set_len(100);
        file.set_len(3 * PAGE_SIZE as u64);
        assert_eq!(file.read(100, 10), [0; 10]);
        assert!(file.revert().changed);
        assert_eq!(everything(&file), vec![7; 3 * PAGE_SIZE]);
    }

    #[test]
    fn shrink_then_grow_then_sync_keeps_the_zeros() {
        let mut file = FileData::default();
        file.write(0, &[7; 3 * PAGE_SIZE]);
        file.sync();
        file.set_len(100);
        file.set_len(2 * PAGE_SIZE as u64);
        file.sync();
        assert!(!file.revert().changed);
        let mut expected = vec![7; 100];
        expected.resize(2 * PAGE_SIZE, 0);
        assert_eq!(everything(&file), expected);
    }

    #[test]
    fn a_sync_copies_only_the_pages_written_since_the_last_one() {
        let mut file = FileData::default();
        file.write(0, &vec![1; 1000 * PAGE_SIZE]);
        assert_eq!(file.sync(), 1000);
        file.write(5 * PAGE_SIZE as u64 + 10, b"x");
        file.write(900 * PAGE_SIZE as u64 - 1, b"yz");
        assert_eq!(file.sync(), 3);
        assert_eq!(file.sync(), 0);
    }

    #[test]
    fn writes_after_a_sync_do_not_touch_the_durable_pages() {
        let mut file = FileData::default();
        file.write(0, b"abc");
        file.sync();
        file.write(1, b"X");
        assert_eq!(file.read(0, 3), b"aXc");
        file.revert();
        assert_eq!(file.read(0, 3), b"abc");
    }

    #[test]
    fn random_operations_match_a_byte_vector_model() {
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        for _round in 0..20 {
            let mut file = FileData::default();
            let mut model = Model::default();
            for _step in 0..300 {
                let limit = 6 * PAGE_SIZE as u64;
                match rng.random_range(0..10) {
                    0..=4 => {
                        let offset = rng.random_range(0..limit);
                        let len = rng.random_range(0..2 * PAGE_SIZE as u64) as usize;
                        let byte = rng.random_range(0..255) as u8 + 1;
                        file.write(offset, &vec![byte; len]);
                        model.write(offset, &vec![byte; len]);
                    }
                    5 | 6 => {
                        let len = rng.random_range(0..limit);
                        file.set_len(len);
                        model.live.resize(len as usize, 0);
                    }
                    7 | 8 => {
                        file.sync();
                        model.durable = model.live.clone();
                    }
                    _ => {
                        file.revert();
                        model.live = model.durable.clone();
                    }
                }
                assert_eq!(everything(&file), model.live);
                let offset = rng.random_range(0..limit);
                let size = rng.random_range(0..2 * PAGE_SIZE as u64) as usize;
                let start = (offset as usize).min(model.live.len());
                let end = (start + size).min(model.live.len());
                assert_eq!(file.read(offset, size), &model.live[start..end]);
            }
            file.revert();
            assert_eq!(everything(&file), model.durable);
        }
    }
}
