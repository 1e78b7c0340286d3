//! App bundles: an app directory as a gzip'd tar, the form in which apps are uploaded, stored
//! and shipped to workers.
//!
//! [`pack`] is deterministic: entries in byte order of their paths, mtimes 0, owners 0, modes
//! 0644/0755, so the same directory always packs to the same bytes and [`digest`] names a
//! version. [`unpack`] treats the bytes as hostile: it writes only regular files and
//! directories, only below its destination, within size and count limits, and checks the
//! manifest inside before it returns.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};

use crate::manifest::{Manifest, ManifestError, MANIFEST_FILE};

/// The largest bundle accepted, compressed, in bytes.
pub const BUNDLE_BYTES_MAX: usize = 64 << 20;
/// The most bytes a bundle may expand to (the whole tar stream, headers included).
pub const UNPACKED_BYTES_MAX: u64 = 256 << 20;
/// The most entries (files and directories) in a bundle.
pub const ENTRIES_MAX: usize = 10_000;
/// Names left out of bundles wherever they appear: version control, bytecode caches, and
/// sand's own scratch directory.
pub const SKIPPED_NAMES: [&str; 3] = [".git", "__pycache__", ".sand"];

/// Why a bundle could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The manifest is missing or wrong.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Reading the app directory or writing the destination failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The bundle is not a valid gzip'd tar.
    #[error("not a valid bundle (gzip'd tar): {0}")]
    Corrupt(io::Error),
    /// The bundle is larger than a limit.
    #[error("bundle too large: {0}")]
    TooLarge(String),
    /// An entry is refused.
    #[error("bundle entry {path:?} refused: {reason}")]
    Entry {
        /// The entry's path as written in the archive.
        path: String,
        /// Why.
        reason: String,
    },
    /// The destination of `unpack` exists already.
    #[error("{0} exists already; unpack into a new directory")]
    DestinationExists(PathBuf),
    /// A grain's file is not a regular file in the app directory (a symlink, say): bundles
    /// carry regular files only.
    #[error("{0} is not a regular file; bundles carry regular files and directories only")]
    NotRegular(PathBuf),
}

/// The sha256 of a bundle, in lowercase hex: the name of its version.
pub fn digest(bundle: &[u8]) -> String {
    Sha256::digest(bundle)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `s` could be a [`digest`]: 64 lowercase hex digits, and so a safe path component.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Packs the app in `dir` into a bundle, after checking its manifest. Regular files and
/// directories go in; symlinks, sockets and devices are left out, as is everything named in
/// [`SKIPPED_NAMES`]. The manifest and each grain's file must be regular files. Refused when the bundle would
/// break `unpack`'s limits.
pub fn pack(dir: &Path) -> Result<Bytes, BundleError> {
    let manifest = Manifest::load(dir)?;
    let own_files = manifest.grains.values().map(|g| g.code.path());
    for rel in std::iter::once(Path::new(MANIFEST_FILE)).chain(own_files) {
        let path = dir.join(rel);
        let meta = fs::symlink_metadata(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(BundleError::NotRegular(path));
        }
    }
    let mut entries = Vec::new();
    walk(dir, Path::new(""), &mut entries)?;
    if entries.len() > ENTRIES_MAX {
        return Err(BundleError::TooLarge(format!(
            "{} entries, above the {ENTRIES_MAX} limit",
            entries.len()
        )));
    }
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let mut unpacked: u64 = 1024; // the two zero blocks that end a tar
    for entry in &entries {
        let full = dir.join(&entry.rel);
        let io_err = |source| BundleError::Io {
            path: full.clone(),
            source,
        };
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if entry.is_dir {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            unpacked += 512;
            tar.append_data(&mut header, &entry.rel, io::empty())
                .map_err(io_err)?;
        } else {
            let file = fs::File::open(&full).map_err(io_err)?;
            let meta = file.metadata().map_err(io_err)?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            });
            header.set_size(meta.len());
            unpacked += 512 + meta.len().div_ceil(512) * 512;
            if unpacked > UNPACKED_BYTES_MAX {
                return Err(BundleError::TooLarge(format!(
                    "the app's files exceed the {UNPACKED_BYTES_MAX} byte limit"
                )));
            }
            // Read exactly the size in the header, even if the file grows meanwhile.
            tar.append_data(&mut header, &entry.rel, file.take(meta.len()))
                .map_err(io_err)?;
        }
    }
    let gz = tar.into_inner().map_err(|source| BundleError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let bytes = gz.finish().map_err(|source| BundleError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if bytes.len() > BUNDLE_BYTES_MAX {
        return Err(BundleError::TooLarge(format!(
            "{} bytes compressed, above the {BUNDLE_BYTES_MAX} byte limit",
            bytes.len()
        )));
    }
    Ok(Bytes::from(bytes))
}

/// Unpacks a bundle into `dest`, a directory that must not exist yet, and returns its checked
/// manifest. Refuses bundles over the size and entry limits, entries with absolute paths or
/// `..`, links, devices and any other entry that is not a regular file or directory, and
/// duplicate paths. Writes nothing outside `dest`; on any error `dest` is removed again.
pub fn unpack(bundle: &[u8], dest: &Path) -> Result<Manifest, BundleError> {
    if bundle.len() > BUNDLE_BYTES_MAX {
        return Err(BundleError::TooLarge(format!(
            "{} bytes compressed, above the {BUNDLE_BYTES_MAX} byte limit",
            bundle.len()
        )));
    }
    match fs::symlink_metadata(dest) {
        Ok(_) => return Err(BundleError::DestinationExists(dest.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(BundleError::Io {
                path: dest.to_path_buf(),
                source,
            })
        }
    }
    fs::create_dir(dest).map_err(|source| BundleError::Io {
        path: dest.to_path_buf(),
        source,
    })?;
    let result = fs::set_permissions(dest, fs::Permissions::from_mode(0o755))
        .map_err(|source| BundleError::Io {
            path: dest.to_path_buf(),
            source,
        })
        .and_then(|()| extract(bundle, dest))
        .and_then(|()| Ok(Manifest::load(dest)?));
    if result.is_err() {
        // Best effort: the error being returned matters more than a failed cleanup.
        let _ = fs::remove_dir_all(dest);
    }
    result
}

/// One path to pack, relative to the app directory.
struct PackEntry {
    rel: PathBuf,
    is_dir: bool,
}

/// Lists `dir/rel` recursively in byte order of names: directories before their contents.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PackEntry>) -> Result<(), BundleError> {
    let here = root.join(rel);
    let io_err = |source| BundleError::Io {
        path: here.clone(),
        source,
    };
    let mut children = Vec::new();
    for entry in fs::read_dir(&here).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        children.push((entry.file_name(), entry.file_type().map_err(io_err)?));
    }
    children.sort_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
    for (name, kind) in children {
        if SKIPPED_NAMES.iter().any(|s| name == *s) {
            continue;
        }
        let child = rel.join(&name);
        if kind.is_dir() {
            out.push(PackEntry {
                rel: child.clone(),
                is_dir: true,
            });
            if out.len() > ENTRIES_MAX {
                return Ok(());
            }
            walk(root, &child, out)?;
        } else if kind.is_file() {
            out.push(PackEntry {
                rel: child,
                is_dir: false,
            });
        }
        if out.len() > ENTRIES_MAX {
            return Ok(());
        }
    }
    Ok(())
}

/// Counts the bytes read through it and fails past a limit: the defence against a gzip bomb.
struct Limited<R> {
    inner: R,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("expands past the {} byte limit", self.limit),
            ));
        }
        Ok(n)
    }
}

fn extract(bundle: &[u8], dest: &Path) -> Result<(), BundleError> {
    let mut stream = Limited {
        inner: GzDecoder::new(bundle),
        read: 0,
        limit: UNPACKED_BYTES_MAX,
    };
    let mut archive = tar::Archive::new(&mut stream);
    let entries = archive.entries().map_err(stream_error)?;
    let mut count = 0usize;
    for entry in entries {
        let mut entry = entry.map_err(stream_error)?;
        count += 1;
        if count > ENTRIES_MAX {
            return Err(BundleError::TooLarge(format!(
                "more than {ENTRIES_MAX} entries"
            )));
        }
        let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason: &str| BundleError::Entry {
            path: shown.clone(),
            reason: reason.to_string(),
        };
        let rel = entry_path(&entry.path_bytes()).map_err(|why| refuse(&why))?;
        let target = dest.join(&rel);
        let io_err = |source| BundleError::Io {
            path: target.clone(),
            source,
        };
        match entry.header().entry_type() {
            tar::EntryType::Directory => make_dirs(dest, &rel)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(stream_error)?;
                if size > UNPACKED_BYTES_MAX {
                    return Err(BundleError::TooLarge(format!(
                        "entry {shown:?} declares {size} bytes"
                    )));
                }
                if let Some(parent) = rel.parent() {
                    make_dirs(dest, parent)?;
                }
                let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
                let mode = if executable { 0o755 } else { 0o644 };
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&target)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            refuse("a duplicate path")
                        } else {
                            io_err(e)
                        }
                    })?;
                // The umask narrowed the mode above; grains run as another user and must read it.
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err)?;
                let copied = io::copy(&mut entry, &mut file).map_err(stream_error)?;
                if copied != size {
                    return Err(refuse("truncated"));
                }
                file.flush().map_err(io_err)?;
            }
            tar::EntryType::Symlink => return Err(refuse("symlinks are not allowed")),
            tar::EntryType::Link => return Err(refuse("hard links are not allowed")),
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                return Err(refuse("device files and fifos are not allowed"))
            }
            other => {
                return Err(refuse(&format!(
                    "entry type {other:?} is not allowed; only files and directories"
                )))
            }
        }
    }
    // Read to the end, so the gzip trailer's checksum is verified (and counted in the limit).
    io::copy(&mut stream, &mut io::sink()).map_err(stream_error)?;
    Ok(())
}

/// Makes each missing directory of `rel` below `dest`, mode 0755 whatever the umask: the
/// sandbox's processes run as another user and must reach the files. `rel` holds only normal
/// components, and `dest` only what unpacking made: no symlink can lead out.
fn make_dirs(dest: &Path, rel: &Path) -> Result<(), BundleError> {
    let mut dir = dest.to_path_buf();
    for part in rel.components() {
        dir.push(part);
        make_dir(&dir).map_err(|source| BundleError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Makes one directory, mode 0755, unless it is there already.
fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o755)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// A read error of the stream: past the size limit, or corrupt.
fn stream_error(e: io::Error) -> BundleError {
    if e.kind() == io::ErrorKind::FileTooLarge {
        BundleError::TooLarge(e.to_string())
    } else {
        BundleError::Corrupt(e)
    }
}

/// An entry's path, made of normal components only.
fn entry_path(raw: &[u8]) -> Result<PathBuf, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "the path is not UTF-8".to_string())?;
    if text.contains('\0') {
        return Err("the path contains a NUL byte".to_string());
    }
    let mut out = PathBuf::new();
    for c in Path::new(text).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` in the path".to_string()),
            Component::RootDir | Component::Prefix(_) => return Err("an absolute path".to_string()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err("an empty path".to_string());
    }
    Ok(out)
}
