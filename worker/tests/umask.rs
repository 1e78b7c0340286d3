//! The Python runtime is installed readable by other users whatever the worker's umask:
//! zygotes in a sandbox run as an unprivileged user. (Its own test binary: the umask is
//! process-wide.)

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::stat::{umask, Mode};
use sand_worker::runtime::python::install_python_runtime;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_runtime_is_readable_by_others_under_a_strict_umask() {
    umask(Mode::from_bits_truncate(0o077));
    let root = std::env::temp_dir().join(format!("sand-umask-{}", std::process::id()));
    let dir = root.join("runtime");
    let script = install_python_runtime(&dir).unwrap();
    assert_eq!(mode(&dir), 0o755);
    assert_eq!(mode(&script), 0o644);
    // An install over a script left unreadable by an older worker repairs it.
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(install_python_runtime(&dir).unwrap(), script);
    assert_eq!(mode(&script), 0o644);
    std::fs::remove_dir_all(root).unwrap();
}
