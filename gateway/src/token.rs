//! The API's bearer token: 256 random bits from the OS, kept in a file only its owner may
//! read, compared in constant time.
//!
//! A token is never taken from the command line: every local user reads another's argv in
//! `ps`. It comes from a file (`--token-file`, or the one `sand dev` makes) or from the
//! environment (`SAND_TOKEN`), which only the process's owner can read.

use std::path::Path;

use subtle::ConstantTimeEq as _;

use crate::secret_file::{self, SecretFileError};

/// The file, in `sand dev`'s data directory, that holds its token.
pub const TOKEN_FILE: &str = "token";
/// The longest token accepted, in bytes.
pub const TOKEN_BYTES_MAX: usize = 1024;

/// A bearer token. Its `Debug` form hides it.
#[derive(Clone)]
pub struct Token(String);

/// Why there is no token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read or made, or other users can read it.
    #[error("the token file {0}")]
    File(#[from] SecretFileError),
    /// The token is empty, too long, or holds characters a header cannot carry.
    #[error("the token {where_} is not usable: {why}")]
    Malformed {
        /// Where it came from.
        where_: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

impl Token {
    /// A token given by an operator (`where_` names its source in errors): visible ASCII,
    /// 1 to [`TOKEN_BYTES_MAX`] bytes; surrounding whitespace (a file's newline) is dropped.
    pub fn new(text: &str, where_: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let why = if text.is_empty() {
            Some("it is empty")
        } else if text.len() > TOKEN_BYTES_MAX {
            Some("it is longer than 1024 bytes")
        } else if !text.bytes().all(|b| b.is_ascii_graphic()) {
            Some("it holds spaces, control or non-ASCII characters")
        } else {
            None
        };
        match why {
            Some(why) => Err(TokenError::Malformed {
                where_: where_.to_owned(),
                why,
            }),
            None => Ok(Self(text.to_owned())),
        }
    }

    /// A new token: 256 random bits, as 64 hex digits.
    pub fn generate() -> Result<Self, TokenError> {
        let bytes: [u8; 32] = secret_file::random()?;
        Ok(Self(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The token in `path`; refused if other users can read the file.
    pub fn read(path: &Path) -> Result<Self, TokenError> {
        Self::parse(&secret_file::read(path)?, path)
    }

    /// The token in `path`, or a new one written there with mode 0600 if there is none.
    pub fn read_or_create(path: &Path) -> Result<Self, TokenError> {
        let fresh = format!(
            "{}
",
            Self::generate()?.0
        );
        Self::parse(&secret_file::read_or_create(path, fresh.as_bytes())?, path)
    }

    /// The token a file holds.
    fn parse(content: &[u8], path: &Path) -> Result<Self, TokenError> {
        let text = std::str::from_utf8(content).map_err(|_| TokenError::Malformed {
            where_: format!("in {}", path.display()),
            why: "it is not UTF-8 text",
        })?;
        Self::new(text, &format!("in {}", path.display()))
    }

    /// Whether `given` is this token, in time independent of where they differ (both are
    /// hashed first, so neither is the length of this token revealed).
    pub fn matches(&self, given: &[u8]) -> bool {
        let digest = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
        let (ours, theirs) = (digest(self.0.as_bytes()), digest(given));
        ours.as_ref().ct_eq(theirs.as_ref()).into()
    }

    /// The token itself, for a client's `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_new_token_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE);
        let first = Token::read_or_create(&path).unwrap();
        assert_eq!(first.expose().len(), 64);
        assert!(first.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Token::read_or_create(&path).unwrap();
        assert_eq!(again.expose(), first.expose());
        assert_ne!(Token::generate().unwrap().expose(), first.expose());
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE);
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Token::read(&path).unwrap_err();
        assert!(
            matches!(
                e,
                TokenError::File(SecretFileError::Exposed { mode: 0o644, .. })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Token::read(&path).unwrap().expose(), "s3cret");
    }

    #[test]
    fn tokens_compare_whole_and_hide_in_debug() {
        let t = Token::new("s3cret", "test").unwrap();
        assert!(t.matches(b"s3cret"));
        for wrong in [&b""[..], b"s3cre", b"s3crett", b"S3cret"] {
            assert!(!t.matches(wrong));
        }
        assert_eq!(format!("{t:?}"), "Token(..)");
        for bad in ["", "  \n", "a b", "caf\u{e9}"] {
            assert!(Token::new(bad, "test").is_err(), "{bad:?}");
        }
    }
}
