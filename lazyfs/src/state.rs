//! The filesystem's state: inodes, their live and durable names, and the open handles.
//!
//! Pure data and no I/O: every FUSE request becomes one call here under one lock, and a power
//! cut is one more call. This module owns the rules written in the crate doc; `server.rs`
//! only translates requests and replies. It must never panic on anything a request carries.
//!
//! Names: every inode but the root has at most one live name (no hard links) and at most one
//! durable name. `Inode::durable_name` mirrors the durable maps of the directories: an entry
//! `name -> ino` is in `parent`'s durable map exactly when `ino`'s durable name is
//! `(parent, name)`. An inode with no live name, no durable name and no open handle can never
//! be seen again, and is dropped ("reaped") at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use fuser::{Errno, FileAttr, FileType, INodeNo};

use crate::pages::{FileData, PAGE_SIZE};
use crate::{Cut, Stats};

/// Inode number of the root directory (FUSE's convention).
pub(crate) const ROOT: u64 = 1;

/// Largest file length accepted (16 GiB), so that a stray offset cannot exhaust memory.
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 34;

/// Longest name in a directory, as on ext4.
const NAME_MAX_BYTES: usize = 255;

/// Who creates an inode, and with which permission bits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Creator {
    /// Owner of the new inode.
    pub(crate) uid: u32,
    /// Group of the new inode.
    pub(crate) gid: u32,
    /// Permission bits (the kernel has applied the umask already).
    pub(crate) perm: u32,
}

/// The attributes `setattr` may change; `None` leaves one alone.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SetAttr {
    /// New permission bits (the file type bits are ignored).
    pub(crate) mode: Option<u32>,
    /// New owner.
    pub(crate) uid: Option<u32>,
    /// New group.
    pub(crate) gid: Option<u32>,
    /// New length: a truncate, which changes the live data only.
    pub(crate) size: Option<u64>,
    /// New access time.
    pub(crate) atime: Option<SystemTime>,
    /// New modification time.
    pub(crate) mtime: Option<SystemTime>,
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub(crate) struct DirEntry {
    /// Inode the entry names.
    pub(crate) ino: u64,
    /// File or directory.
    pub(crate) kind: FileType,
    /// The name (`.` and `..` included).
    pub(crate) name: OsString,
}

/// Totals for `statfs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Usage {
    /// Live bytes in all files.
    pub(crate) bytes: u64,
    /// Inodes held, live or only durable.
    pub(crate) inodes: u64,
}

/// Owner, permissions and times of an inode. A cut does not roll these back.
#[derive(Debug)]
struct Meta {
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Meta {
    fn new(creator: Creator) -> Meta {
        let now = SystemTime::now();
        Meta {
            perm: (creator.perm & 0o7777) as u16,
            uid: creator.uid,
            gid: creator.gid,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    /// Records a change of the inode's contents.
    fn modified(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

/// A directory's entries, live and durable.
#[derive(Debug, Default)]
struct Dir {
    live: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
}

#[derive(Debug)]
enum Body {
    File(FileData),
    Dir(Dir),
}

/// A name of an inode: an entry `name` in directory `parent`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Link {
    parent: u64,
    name: OsString,
}

impl Link {
    fn is(&self, parent: u64, name: &OsStr) -> bool {
        self.parent == parent && self.name == name
    }
}

#[derive(Debug)]
struct Inode {
    meta: Meta,
    body: Body,
    /// The name processes see; `None` once unlinked (and always for the root).
    live_name: Option<Link>,
    /// The name that survives a cut; `None` until a fsync or fsyncdir gives it one.
    durable_name: Option<Link>,
    /// Open handles made since the last cut.
    open: u32,
}

/// What an open handle refers to.
#[derive(Debug)]
enum Handle {
    File { ino: u64 },
    Dir { ino: u64, entries: Vec<DirEntry> },
}

impl Handle {
    fn ino(&self) -> u64 {
        match self {
            Handle::File { ino } | Handle::Dir { ino, .. } => *ino,
        }
    }
}

/// The whole filesystem, live and durable.
#[derive(Debug)]
pub(crate) struct State {
    inodes: HashMap<u64, Inode>,
    /// Inode numbers are never reused, across cuts too, so the kernel can't confuse two.
    next_ino: u64,
    /// Handles made since the last cut; a cut forgets them all, so older ones get `EIO`.
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    stats: Stats,
}

impl State {
    /// An empty filesystem whose root has the given owner and permissions, durable already.
    pub(crate) fn new(root: Creator) -> State {
        let root = Inode {
            meta: Meta::new(root),
            body: Body::Dir(Dir::default()),
            live_name: None,
            durable_name: None,
            open: 0,
        };
        State {
            inodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
            stats: Stats::default(),
        }
    }

    /// Looks `name` up among `parent`'s live entries.
    pub(crate) fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        check_name(name)?;
        let ino = *self.dir(parent)?.live.get(name).ok_or(Errno::ENOENT)?;
        self.attr(ino)
    }

    /// The live attributes of `ino`; `EIO` if `fh` is a handle from before a cut.
    pub(crate) fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, Errno> {
        if let Some(fh) = fh {
            self.handle(fh, ino)?;
        }
        self.attr(ino)
    }

    /// Changes attributes; a new size truncates or extends the live data only.
    pub(crate) fn setattr(
        &mut self,
        ino: u64,
        fh: Option<u64>,
        change: SetAttr,
    ) -> Result<FileAttr, Errno> {
        if let Some(fh) = fh {
            self.handle(fh, ino)?;
        }
        if let Some(size) = change.size {
            if size > MAX_FILE_BYTES {
                return Err(Errno::EFBIG);
            }
            self.file_mut(ino)?.set_len(size);
        }
        let inode = self.inode_mut(ino)?;
        if change.size.is_some() {
            inode.meta.modified();
        }
        if let Some(mode) = change.mode {
            inode.meta.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = change.uid {
            inode.meta.uid = uid;
        }
        if let Some(gid) = change.gid {
            inode.meta.gid = gid;
        }
        if let Some(atime) = change.atime {
            inode.meta.atime = atime;
        }
        if let Some(mtime) = change.mtime {
            inode.meta.mtime = mtime;
        }
        inode.meta.ctime = SystemTime::now();
        self.attr(ino)
    }

    /// Creates an empty regular file (`mknod` with `S_IFREG`).
    pub(crate) fn mknod(
        &mut self,
        parent: u64,
        name: &OsStr,
        creator: Creator,
    ) -> Result<FileAttr, Errno> {
        let ino = self.create_inode(parent, name, creator, Body::File(FileData::default()))?;
        self.attr(ino)
    }

    /// Creates an empty regular file and opens it.
    pub(crate) fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        creator: Creator,
    ) -> Result<(FileAttr, u64), Errno> {
        let ino = self.create_inode(parent, name, creator, Body::File(FileData::default()))?;
        let fh = self.add_handle(Handle::File { ino });
        Ok((self.attr(ino)?, fh))
    }

    /// Creates an empty directory. Its name becomes durable only by a fsyncdir of `parent`.
    pub(crate) fn mkdir(
        &mut self,
        parent: u64,
        name: &OsStr,
        creator: Creator,
    ) -> Result<FileAttr, Errno> {
        let ino = self.create_inode(parent, name, creator, Body::Dir(Dir::default()))?;
        self.attr(ino)
    }

    /// Removes a file's live name; the durable one stays until a fsyncdir of `parent`.
    pub(crate) fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = *self.dir(parent)?.live.get(name).ok_or(Errno::ENOENT)?;
        if self.is_dir(ino)? {
            return Err(Errno::EISDIR);
        }
        self.remove_live_entry(parent, name, ino)
    }

    /// Removes an empty directory's live name; the durable one stays until a fsyncdir.
    pub(crate) fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = *self.dir(parent)?.live.get(name).ok_or(Errno::ENOENT)?;
        if !self.dir(ino)?.live.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        self.remove_live_entry(parent, name, ino)
    }

    /// Moves a live name, replacing what `new_name` named unless `no_replace`.
    pub(crate) fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Errno> {
        check_name(new_name)?;
        let source = *self.dir(parent)?.live.get(name).ok_or(Errno::ENOENT)?;
        self.check_live_dir(new_parent)?;
        let target = self.dir(new_parent)?.live.get(new_name).copied();
        if target == Some(source) {
            return Ok(());
        }
        if no_replace && target.is_some() {
            return Err(Errno::EEXIST);
        }
        let source_is_dir = self.is_dir(source)?;
        if source_is_dir {
            // A directory must not move into itself (the kernel checks too).
            let mut at = Some(new_parent);
            while let Some(dir) = at {
                if dir == source {
                    return Err(Errno::EINVAL);
                }
                at = self.inode(dir)?.live_name.as_ref().map(|link| link.parent);
            }
        }
        if let Some(target) = target {
            match (source_is_dir, self.is_dir(target)?) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.dir(target)?.live.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        self.dir_mut(parent)?.live.remove(name);
        self.inode_mut(parent)?.meta.modified();
        self.dir_mut(new_parent)?
            .live
            .insert(new_name.to_owned(), source);
        self.inode_mut(new_parent)?.meta.modified();
        let moved = self.inode_mut(source)?;
        moved.live_name = Some(Link {
            parent: new_parent,
            name: new_name.to_owned(),
        });
        moved.meta.ctime = SystemTime::now();
        if let Some(target) = target {
            let replaced = self.inode_mut(target)?;
            replaced.live_name = None;
            replaced.meta.ctime = SystemTime::now();
            self.reap(vec![target]);
        }
        Ok(())
    }

    /// Opens a regular file.
    pub(crate) fn open(&mut self, ino: u64) -> Result<u64, Errno> {
        if self.is_dir(ino)? {
            return Err(Errno::EISDIR);
        }
        Ok(self.add_handle(Handle::File { ino }))
    }

    /// Opens a directory, taking a snapshot of its live entries for `readdir`.
    pub(crate) fn opendir(&mut self, ino: u64) -> Result<u64, Errno> {
        let inode = self.inode(ino)?;
        let parent = inode.live_name.as_ref().map_or(ino, |link| link.parent);
        let mut entries = vec![
            DirEntry {
                ino,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: parent,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        for (name, &child) in &self.dir(ino)?.live {
            let kind = if self.is_dir(child)? {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            entries.push(DirEntry {
                ino: child,
                kind,
                name: name.clone(),
            });
        }
        Ok(self.add_handle(Handle::Dir { ino, entries }))
    }

    /// The entries of an open directory from position `offset` on.
    pub(crate) fn readdir(&self, ino: u64, fh: u64, offset: u64) -> Result<&[DirEntry], Errno> {
        match self.handle(fh, ino)? {
            Handle::Dir { entries, .. } => {
                let start = usize::try_from(offset).map_or(entries.len(), |o| o.min(entries.len()));
                Ok(&entries[start..])
            }
            Handle::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    /// Closes a handle. A handle from before a cut is already forgotten: nothing to do.
    pub(crate) fn release(&mut self, fh: u64) {
        let Some(handle) = self.handles.remove(&fh) else {
            return;
        };
        let ino = handle.ino();
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.open = inode.open.saturating_sub(1);
        }
        self.reap(vec![ino]);
    }

    /// Reads live data.
    pub(crate) fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        self.handle(fh, ino)?;
        match &self.inode(ino)?.body {
            Body::File(data) => Ok(data.read(offset, size as usize)),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    /// Writes live data; returns the number of bytes written.
    pub(crate) fn write(
        &mut self,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, Errno> {
        self.handle(fh, ino)?;
        let written = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= MAX_FILE_BYTES => {}
            _ => return Err(Errno::EFBIG),
        }
        self.file_mut(ino)?.write(offset, data);
        self.inode_mut(ino)?.meta.modified();
        self.stats.bytes_written += data.len() as u64;
        Ok(written)
    }

    /// Checks the handle of a `close`; nothing else to do, as closing does not sync.
    pub(crate) fn flush(&self, ino: u64, fh: u64) -> Result<(), Errno> {
        self.handle(fh, ino).map(|_| ())
    }

    /// `fsync`/`fdatasync`: the file's live data becomes durable, and so does its name if it
    /// has no durable one yet.
    pub(crate) fn fsync(&mut self, ino: u64, fh: u64) -> Result<(), Errno> {
        self.handle(fh, ino)?;
        if self.is_dir(ino)? {
            return self.sync_dir(ino);
        }
        let pages = self.file_mut(ino)?.sync();
        self.stats.fsyncs += 1;
        self.stats.pages_synced += pages as u64;
        let inode = self.inode(ino)?;
        if inode.durable_name.is_none() {
            if let Some(link) = inode.live_name.clone() {
                let mut orphans = Vec::new();
                self.set_durable_entry(link.parent, &link.name, ino, &mut orphans);
                self.reap(orphans);
            }
        }
        Ok(())
    }

    /// `fsync` on a directory: its live entries become its durable entries.
    pub(crate) fn fsyncdir(&mut self, ino: u64, fh: u64) -> Result<(), Errno> {
        self.handle(fh, ino)?;
        self.sync_dir(ino)
    }

    /// `fallocate`: mode 0 extends the live length, `FALLOC_FL_KEEP_SIZE` changes nothing
    /// visible (memory is allocated on write); every other mode is `EOPNOTSUPP`.
    pub(crate) fn fallocate(
        &mut self,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        self.handle(fh, ino)?;
        if self.is_dir(ino)? {
            return Err(Errno::ENODEV);
        }
        let end = match offset.checked_add(length) {
            Some(end) if end <= MAX_FILE_BYTES => end,
            _ => return Err(Errno::EFBIG),
        };
        match mode {
            0 => {
                let data = self.file_mut(ino)?;
                if end > data.len() {
                    data.set_len(end);
                    self.inode_mut(ino)?.meta.modified();
                }
                Ok(())
            }
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// Totals for `statfs`.
    pub(crate) fn usage(&self) -> Usage {
        let bytes = self
            .inodes
            .values()
            .map(|inode| match &inode.body {
                Body::File(data) => data.len(),
                Body::Dir(_) => 0,
            })
            .sum();
        Usage {
            bytes,
            inodes: self.inodes.len() as u64,
        }
    }

    /// The power cut: live := durable everywhere, and every open handle is forgotten.
    pub(crate) fn cut(&mut self) -> Cut {
        let mut reachable = HashSet::new();
        let mut work = vec![ROOT];
        while let Some(ino) = work.pop() {
            if !reachable.insert(ino) {
                continue;
            }
            if let Some(Inode {
                body: Body::Dir(dir),
                ..
            }) = self.inodes.get(&ino)
            {
                work.extend(dir.durable.values().filter(|c| self.inodes.contains_key(c)));
            }
        }
        let mut cut = Cut::default();
        for (ino, inode) in &mut self.inodes {
            let survives = reachable.contains(ino);
            match &mut inode.body {
                Body::File(data) if survives => {
                    let reverted = data.revert();
                    cut.bytes_lost += reverted.bytes;
                    cut.files_reverted += u64::from(reverted.changed);
                }
                Body::File(data) => cut.bytes_lost += data.unsynced_bytes(),
                Body::Dir(dir) if survives => {
                    cut.entries_lost += differing_entries(dir);
                    dir.durable.retain(|_, child| reachable.contains(child));
                    dir.live = dir.durable.clone();
                }
                Body::Dir(_) => {}
            }
            if !survives {
                cut.inodes_lost += 1;
            }
            inode.live_name = inode.durable_name.clone();
            inode.open = 0;
        }
        self.inodes.retain(|ino, _| reachable.contains(ino));
        self.handles.clear();
        self.stats.cuts += 1;
        cut
    }

    /// The counters since the mount.
    pub(crate) fn stats(&self) -> Stats {
        self.stats
    }

    fn inode(&self, ino: u64) -> Result<&Inode, Errno> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn is_dir(&self, ino: u64) -> Result<bool, Errno> {
        Ok(matches!(self.inode(ino)?.body, Body::Dir(_)))
    }

    fn dir(&self, ino: u64) -> Result<&Dir, Errno> {
        match &self.inode(ino)?.body {
            Body::Dir(dir) => Ok(dir),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut Dir, Errno> {
        match &mut self.inode_mut(ino)?.body {
            Body::Dir(dir) => Ok(dir),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match &mut self.inode_mut(ino)?.body {
            Body::File(data) => Ok(data),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    /// A directory that can get new entries: not removed.
    fn check_live_dir(&self, ino: u64) -> Result<(), Errno> {
        self.dir(ino)?;
        if ino != ROOT && self.inode(ino)?.live_name.is_none() {
            return Err(Errno::ENOENT);
        }
        Ok(())
    }

    /// The handle `fh`, which must be open on `ino`. A handle this state does not know was
    /// made before a cut (the kernel only sends handles we gave it): `EIO`.
    fn handle(&self, fh: u64, ino: u64) -> Result<&Handle, Errno> {
        match self.handles.get(&fh) {
            Some(handle) if handle.ino() == ino => Ok(handle),
            _ => Err(Errno::EIO),
        }
    }

    fn add_handle(&mut self, handle: Handle) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        if let Some(inode) = self.inodes.get_mut(&handle.ino()) {
            inode.open += 1;
        }
        self.handles.insert(fh, handle);
        fh
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let inode = self.inode(ino)?;
        let (kind, size) = match &inode.body {
            Body::File(data) => (FileType::RegularFile, data.len()),
            Body::Dir(_) => (FileType::Directory, PAGE_SIZE as u64),
        };
        // Directories report one link, as btrfs does: "not counted".
        let nlink = u32::from(ino == ROOT || inode.live_name.is_some());
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: inode.meta.atime,
            mtime: inode.meta.mtime,
            ctime: inode.meta.ctime,
            crtime: inode.meta.ctime,
            kind,
            perm: inode.meta.perm,
            nlink,
            uid: inode.meta.uid,
            gid: inode.meta.gid,
            rdev: 0,
            blksize: PAGE_SIZE as u32,
            flags: 0,
        })
    }

    fn create_inode(
        &mut self,
        parent: u64,
        name: &OsStr,
        creator: Creator,
        body: Body,
    ) -> Result<u64, Errno> {
        check_name(name)?;
        self.check_live_dir(parent)?;
        if self.dir(parent)?.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                meta: Meta::new(creator),
                body,
                live_name: Some(Link {
                    parent,
                    name: name.to_owned(),
                }),
                durable_name: None,
                open: 0,
            },
        );
        self.dir_mut(parent)?.live.insert(name.to_owned(), ino);
        self.inode_mut(parent)?.meta.modified();
        Ok(ino)
    }

    fn remove_live_entry(&mut self, parent: u64, name: &OsStr, ino: u64) -> Result<(), Errno> {
        self.dir_mut(parent)?.live.remove(name);
        self.inode_mut(parent)?.meta.modified();
        let inode = self.inode_mut(ino)?;
        inode.live_name = None;
        inode.meta.ctime = SystemTime::now();
        self.reap(vec![ino]);
        Ok(())
    }

    /// Makes `dir`'s durable entries equal to its live entries.
    fn sync_dir(&mut self, dir: u64) -> Result<(), Errno> {
        let (live, durable) = {
            let entries = self.dir(dir)?;
            (entries.live.clone(), entries.durable.clone())
        };
        self.stats.fsyncdirs += 1;
        let mut orphans = Vec::new();
        for (name, ino) in &durable {
            if live.get(name) != Some(ino) {
                self.remove_durable_entry(dir, name, &mut orphans);
            }
        }
        for (name, &ino) in &live {
            if durable.get(name) != Some(&ino) {
                self.set_durable_entry(dir, name, ino, &mut orphans);
            }
        }
        self.reap(orphans);
        Ok(())
    }

    /// Removes the durable entry `name` of `parent`; the inode it named is pushed on
    /// `orphans` for a later `reap`.
    fn remove_durable_entry(&mut self, parent: u64, name: &OsStr, orphans: &mut Vec<u64>) {
        let Ok(dir) = self.dir_mut(parent) else {
            return;
        };
        let Some(child) = dir.durable.remove(name) else {
            return;
        };
        self.forget_durable_name(child, parent, name);
        orphans.push(child);
    }

    /// Forgets that `ino`'s durable name is `name` in `parent`, if it is.
    fn forget_durable_name(&mut self, ino: u64, parent: u64, name: &OsStr) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            if inode
                .durable_name
                .as_ref()
                .is_some_and(|l| l.is(parent, name))
            {
                inode.durable_name = None;
            }
        }
    }

    /// Makes `name` in `parent` the durable name of `ino`. What that entry named before, and
    /// the durable entry `ino` had elsewhere, are gone from the durable state (an inode has
    /// one durable name: a rename's durable half is a move).
    fn set_durable_entry(&mut self, parent: u64, name: &OsStr, ino: u64, orphans: &mut Vec<u64>) {
        let Ok(dir) = self.dir_mut(parent) else {
            return;
        };
        if let Some(displaced) = dir.durable.insert(name.to_owned(), ino) {
            if displaced != ino {
                self.forget_durable_name(displaced, parent, name);
                orphans.push(displaced);
            }
        }
        let link = Link {
            parent,
            name: name.to_owned(),
        };
        let previous = self
            .inodes
            .get_mut(&ino)
            .and_then(|inode| inode.durable_name.replace(link));
        if let Some(previous) = previous.filter(|p| !p.is(parent, name)) {
            if let Ok(old_dir) = self.dir_mut(previous.parent) {
                if old_dir.durable.get(&previous.name) == Some(&ino) {
                    old_dir.durable.remove(&previous.name);
                }
            }
        }
    }

    /// Drops the inodes in `work` that nothing can reach any more: no live name, no durable
    /// name, no open handle. A dropped directory's durable entries go with it.
    fn reap(&mut self, mut work: Vec<u64>) {
        while let Some(ino) = work.pop() {
            let unreachable = self.inodes.get(&ino).is_some_and(|inode| {
                ino != ROOT
                    && inode.live_name.is_none()
                    && inode.durable_name.is_none()
                    && inode.open == 0
            });
            if !unreachable {
                continue;
            }
            let Some(inode) = self.inodes.remove(&ino) else {
                continue;
            };
            if let Body::Dir(dir) = inode.body {
                for (name, child) in dir.durable {
                    if let Some(inode) = self.inodes.get_mut(&child) {
                        if inode
                            .durable_name
                            .as_ref()
                            .is_some_and(|l| l.is(ino, &name))
                        {
                            inode.durable_name = None;
                        }
                    }
                    work.push(child);
                }
            }
        }
    }
}

/// Rejects names a directory cannot hold.
fn check_name(name: &OsStr) -> Result<(), Errno> {
    if name.len() > NAME_MAX_BYTES {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(())
}

/// Names whose live and durable entries differ.
fn differing_entries(dir: &Dir) -> u64 {
    let changed = dir
        .live
        .iter()
        .filter(|(name, ino)| dir.durable.get(*name) != Some(*ino))
        .count();
    let removed = dir
        .durable
        .keys()
        .filter(|name| !dir.live.contains_key(*name))
        .count();
    (changed + removed) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_OWNER: Creator = Creator {
        uid: 0,
        gid: 0,
        perm: 0o755,
    };

    fn name(text: &str) -> &OsStr {
        OsStr::new(text)
    }

    /// Creates `file` in `parent` with `data`, fsyncs it and closes it; returns its inode.
    fn synced_file(state: &mut State, parent: u64, file: &str, data: &[u8]) -> u64 {
        let (attr, fh) = state
            .create(parent, name(file), ROOT_OWNER)
            .expect("create");
        state.write(attr.ino.0, fh, 0, data).expect("write");
        state.fsync(attr.ino.0, fh).expect("fsync");
        state.release(fh);
        attr.ino.0
    }

    /// A state whose root holds a directory `d` with a durable name; returns it and `d`'s
    /// inode.
    fn with_durable_dir() -> (State, u64) {
        let mut state = State::new(ROOT_OWNER);
        let dir = state
            .mkdir(ROOT, name("d"), ROOT_OWNER)
            .expect("mkdir")
            .ino
            .0;
        sync_dir(&mut state, ROOT);
        (state, dir)
    }

    fn sync_dir(state: &mut State, dir: u64) {
        let fh = state.opendir(dir).expect("opendir");
        state.fsyncdir(dir, fh).expect("fsyncdir");
        state.release(fh);
    }

    fn content(state: &mut State, parent: u64, file: &str) -> Option<Vec<u8>> {
        let ino = state.lookup(parent, name(file)).ok()?.ino.0;
        let fh = state.open(ino).expect("open");
        let data = state.read(ino, fh, 0, 1 << 20).expect("read");
        state.release(fh);
        Some(data)
    }

    #[test]
    fn replacing_a_file_durably_drops_the_old_inode() {
        let mut state = State::new(ROOT_OWNER);
        for version in 0..10u8 {
            synced_file(&mut state, ROOT, "state.tmp", &[version]);
            state
                .rename(ROOT, name("state.tmp"), ROOT, name("state"), false)
                .expect("rename");
            sync_dir(&mut state, ROOT);
        }
        assert_eq!(state.usage().inodes, 2, "the root and one file");
        assert_eq!(state.cut(), Cut::default());
        assert_eq!(content(&mut state, ROOT, "state"), Some(vec![9]));
    }

    #[test]
    fn an_unlinked_open_file_lives_until_closed_and_its_durable_name_until_synced() {
        let mut state = State::new(ROOT_OWNER);
        let ino = synced_file(&mut state, ROOT, "f", b"data");
        let fh = state.open(ino).expect("open");
        state.unlink(ROOT, name("f")).expect("unlink");
        assert_eq!(state.read(ino, fh, 0, 10).as_deref(), Ok(&b"data"[..]));
        state.release(fh);
        assert_eq!(state.usage().inodes, 2, "still durable in the root");
        sync_dir(&mut state, ROOT);
        assert_eq!(state.usage().inodes, 1, "only the root");
    }

    #[test]
    fn removing_a_tree_durably_drops_every_inode_in_it() {
        let (mut state, dir) = with_durable_dir();
        synced_file(&mut state, dir, "a", b"a");
        synced_file(&mut state, dir, "b", b"b");
        state.unlink(dir, name("a")).expect("unlink");
        state.unlink(dir, name("b")).expect("unlink");
        state.rmdir(ROOT, name("d")).expect("rmdir");
        assert_eq!(state.usage().inodes, 4, "all still durable");
        sync_dir(&mut state, ROOT);
        assert_eq!(state.usage().inodes, 1, "only the root");
        assert_eq!(state.cut(), Cut::default());
    }

    #[test]
    fn a_cut_restores_live_names_that_agree_with_the_durable_ones() {
        let (mut state, dir) = with_durable_dir();
        synced_file(&mut state, dir, "f", b"f");
        state
            .rename(dir, name("f"), ROOT, name("g"), false)
            .expect("rename");
        let cut = state.cut();
        assert_eq!((cut.entries_lost, cut.inodes_lost), (2, 0));
        assert_eq!(content(&mut state, dir, "f"), Some(b"f".to_vec()));
        // The restored name is the live one again: a rename from it works and is durable.
        state
            .rename(dir, name("f"), ROOT, name("g"), false)
            .expect("rename after the cut");
        sync_dir(&mut state, ROOT);
        sync_dir(&mut state, dir);
        assert_eq!(state.cut(), Cut::default());
        assert_eq!(content(&mut state, ROOT, "g"), Some(b"f".to_vec()));
    }

    #[test]
    fn a_handle_from_before_a_cut_gets_eio_and_closes_quietly() {
        let mut state = State::new(ROOT_OWNER);
        let ino = synced_file(&mut state, ROOT, "f", b"data");
        let fh = state.open(ino).expect("open");
        state.cut();
        assert_eq!(state.read(ino, fh, 0, 4), Err(Errno::EIO));
        assert_eq!(state.write(ino, fh, 0, b"x"), Err(Errno::EIO));
        assert_eq!(state.fsync(ino, fh), Err(Errno::EIO));
        assert_eq!(state.getattr(ino, Some(fh)).map(|_| ()), Err(Errno::EIO));
        state.release(fh);
        assert_eq!(content(&mut state, ROOT, "f"), Some(b"data".to_vec()));
    }

    #[test]
    fn offsets_past_the_limit_are_efbig_not_a_panic() {
        let mut state = State::new(ROOT_OWNER);
        let (attr, fh) = state.create(ROOT, name("f"), ROOT_OWNER).expect("create");
        let ino = attr.ino.0;
        assert_eq!(state.write(ino, fh, u64::MAX, b"x"), Err(Errno::EFBIG));
        assert_eq!(
            state.write(ino, fh, MAX_FILE_BYTES, b"x"),
            Err(Errno::EFBIG)
        );
        assert_eq!(state.fallocate(ino, fh, u64::MAX, 2, 0), Err(Errno::EFBIG));
        let huge = SetAttr {
            size: Some(u64::MAX),
            ..SetAttr::default()
        };
        assert_eq!(
            state.setattr(ino, Some(fh), huge).map(|_| ()),
            Err(Errno::EFBIG)
        );
        assert_eq!(state.getattr(ino, Some(fh)).map(|a| a.size), Ok(0));
    }
}
