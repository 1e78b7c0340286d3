//! Secrets kept in files only their owner may read: the API's token and the key of execution
//! references. One way to make them (in one step, mode 0600) and one way to read them (refused
//! when other users could have read them too).

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom as _, SystemRandom};

/// A secret file that could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// Reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Other users can read the file, so the secret may be theirs too.
    #[error(
        "{} can be read by other users (mode {mode:o}): run `chmod 600 {}`, or remove it to \
         make a new one",
        path.display(),
        path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The OS gave no random bytes.
    #[error("the operating system gave no random bytes for a new secret")]
    NoRandomness,
}

/// `N` random bytes from the OS.
pub fn random<const N: usize>() -> Result<[u8; N], SecretFileError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SecretFileError::NoRandomness)?;
    Ok(bytes)
}

/// The content of `path`; refused if its group or other users may read it.
pub fn read(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mode = file.metadata().map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Exposed {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    let mut content = Vec::new();
    file.read_to_end(&mut content).map_err(io)?;
    Ok(content)
}

/// The content of `path`, or `fresh` written there (and synced) if there is no file yet.
///
/// The file is created with its final mode 0600 in one step (`O_CREAT | O_EXCL`): never
/// readable by others, not even for a moment, and never a file someone else put there.
pub fn read_or_create(path: &Path, fresh: &[u8]) -> Result<Vec<u8>, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut file) => {
            file.write_all(fresh).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(fresh.to_vec())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_made_private_once_kept_and_refused_once_exposed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        assert_eq!(read_or_create(&path, b"first").unwrap(), b"first");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_or_create(&path, b"second").unwrap(), b"first");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_or_create(&path, b"third").unwrap_err();
        assert!(
            matches!(e, SecretFileError::Exposed { mode: 0o640, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert_ne!(random::<32>().unwrap(), random::<32>().unwrap());
    }
}
