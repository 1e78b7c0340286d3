//! Execution references: how the HTTP API names an execution to clients.
//!
//! Execution ids are sequential (epoch and counter), so a client that sees one could guess every
//! other app's. Clients never see them bare: a reference is the id's 16 hex digits followed by
//! 32 hex digits of HMAC-SHA256 of the id (its first 128 bits) under a secret of this gateway,
//! kept in its data directory. A reference that does not parse is malformed; one whose MAC does
//! not match (a guessed id) is answered exactly like an unknown execution, so a client learns
//! nothing from guessing.

use std::path::{Path, PathBuf};

use ring::hmac;
use sand_protocol::ids::ExecId;
use subtle::ConstantTimeEq;

use crate::secret_file::{self, SecretFileError};

/// The file of the secret, in the gateway's data directory.
pub const SECRET_FILE: &str = "exec-refs.key";

/// The secret's length in bytes.
const SECRET_BYTES: usize = 32;
/// The MAC's length in a reference, in bytes (128 bits).
const MAC_BYTES: usize = 16;
/// A reference's length: the id and the MAC, in hex.
const REF_LEN: usize = 16 + 2 * MAC_BYTES;

/// Makes and checks execution references under one gateway's secret.
pub struct ExecRefs {
    key: hmac::Key,
}

/// Why a reference names no execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    /// It is not a reference at all.
    #[error("not an execution reference ({REF_LEN} lowercase hex digits)")]
    Malformed,
    /// Its MAC does not match: this gateway never gave it out.
    #[error("no such execution")]
    Unknown,
}

/// Why the secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read or made, or other users can read it.
    #[error("execution reference secret {0}")]
    File(#[from] SecretFileError),
    /// The file is not a secret this gateway wrote.
    #[error(
        "execution reference secret {}: {len} bytes, not {SECRET_BYTES}; remove it to make a \
         new one (every reference given out so far then stops working)",
        path.display()
    )]
    WrongLength {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
}

impl ExecRefs {
    /// References under `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// References under the secret in `dir`, made (random, mode 0600) if it is not there yet.
    /// A secret readable by other users is refused: with it, anyone could forge references.
    pub fn open(dir: &Path) -> Result<Self, SecretError> {
        let path = dir.join(SECRET_FILE);
        let fresh: [u8; SECRET_BYTES] = secret_file::random()?;
        let secret = secret_file::read_or_create(&path, &fresh)?;
        if secret.len() != SECRET_BYTES {
            return Err(SecretError::WrongLength {
                path,
                len: secret.len(),
            });
        }
        Ok(Self::new(&secret))
    }

    /// The reference clients get for `exec`.
    pub fn present(&self, exec: ExecId) -> String {
        let mac = self.mac(exec);
        let mac = u128::from_be_bytes(mac);
        format!("{:016x}{mac:032x}", exec.0)
    }

    /// The execution a client's reference names. Compares the MAC in constant time.
    pub fn resolve(&self, reference: &str) -> Result<ExecId, RefError> {
        let hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
        if reference.len() != REF_LEN || !reference.bytes().all(hex) {
            return Err(RefError::Malformed);
        }
        let (id, mac) = reference.split_at(16);
        let exec = u64::from_str_radix(id, 16).map_err(|_| RefError::Malformed)?;
        let mac = u128::from_str_radix(mac, 16).map_err(|_| RefError::Malformed)?;
        let exec = ExecId(exec);
        if bool::from(self.mac(exec).ct_eq(&mac.to_be_bytes())) {
            Ok(exec)
        } else {
            Err(RefError::Unknown)
        }
    }

    fn mac(&self, exec: ExecId) -> [u8; MAC_BYTES] {
        let tag = hmac::sign(&self.key, &exec.0.to_be_bytes());
        let mut mac = [0u8; MAC_BYTES];
        mac.copy_from_slice(&tag.as_ref()[..MAC_BYTES]);
        mac
    }
}

impl std::fmt::Debug for ExecRefs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecRefs(..)")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_reference_names_its_execution_and_a_guessed_one_names_none() {
        let refs = ExecRefs::new(b"secret");
        let mine = ExecId::new(3, 7);
        let reference = refs.present(mine);
        assert_eq!(reference.len(), REF_LEN);
        assert_eq!(refs.resolve(&reference), Ok(mine));
        // The next execution's id is easy to guess; with any MAC, it names nothing.
        let next = ExecId::new(3, 8);
        let (_, mac) = reference.split_at(16);
        for guess in [
            format!("{:016x}{mac}", next.0),
            format!("{:016x}{}", next.0, "0".repeat(32)),
        ] {
            assert_eq!(refs.resolve(&guess), Err(RefError::Unknown), "{guess}");
        }
        // Another gateway's references name nothing here.
        let theirs = ExecRefs::new(b"other").present(mine);
        assert_eq!(refs.resolve(&theirs), Err(RefError::Unknown));
    }

    #[test]
    fn a_malformed_reference_is_told_apart() {
        let refs = ExecRefs::new(b"secret");
        let good = refs.present(ExecId::new(1, 1));
        for bad in [
            String::new(),
            "zzz".into(),
            format!("{:016x}", ExecId::new(1, 1).0),
            good.to_uppercase(),
            format!("+{}", &good[1..]),
            format!("{good}0"),
        ] {
            assert_eq!(refs.resolve(&bad), Err(RefError::Malformed), "{bad}");
        }
    }

    #[test]
    fn the_secret_is_made_private_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = ExecRefs::open(dir.path())
            .unwrap()
            .present(ExecId::new(1, 1));
        let path = dir.path().join(SECRET_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = ExecRefs::open(dir.path()).unwrap();
        assert_eq!(again.resolve(&first), Ok(ExecId::new(1, 1)));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ExecRefs::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
