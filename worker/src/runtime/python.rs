//! The Python zygote runtime (`runtimes/python/sand_runtime.py`), built into the worker.

use std::fs::Permissions;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The runtime script's text.
pub const PYTHON_RUNTIME: &str = include_str!("../../../runtimes/python/sand_runtime.py");

/// The file name the runtime is installed under.
pub const PYTHON_RUNTIME_FILE: &str = "sand_runtime.py";

/// Writes the runtime script into `dir` (created if missing) and returns its path. Writes it
/// atomically ([`sand_transport::file::write_atomic`]), so a zygote starting meanwhile never
/// reads half a file. The
/// directory is 0755 and the script 0644 whatever the umask: zygotes in a sandbox run as
/// another user.
pub fn install_python_runtime(dir: &Path) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(0o755))?;
    let path = dir.join(PYTHON_RUNTIME_FILE);
    if std::fs::read(&path).is_ok_and(|text| text == PYTHON_RUNTIME.as_bytes()) {
        std::fs::set_permissions(&path, Permissions::from_mode(0o644))?;
        return Ok(path);
    }
    sand_transport::file::write_atomic(&path, PYTHON_RUNTIME.as_bytes(), 0o644)?;
    Ok(path)
}
