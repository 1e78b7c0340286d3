//! An unpacked bundle is readable by other users whatever the worker's umask: grains run as
//! an unprivileged user in their sandbox. (Its own test binary: the umask is process-wide.)

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::stat::{umask, Mode};
use sand_app::bundle::{pack, unpack};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn unpacked_files_are_readable_by_others_under_a_strict_umask() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("sand.toml"),
        "name = \"u\"\nentry = \"g\"\n[grains.g]\nruntime = \"exec\"\nmodule = \"bin/run\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(src.path().join("bin")).unwrap();
    std::fs::create_dir_all(src.path().join("lib/deep")).unwrap();
    std::fs::write(src.path().join("bin/run"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        src.path().join("bin/run"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::fs::write(src.path().join("lib/deep/data.txt"), "x").unwrap();
    let bundle = pack(src.path()).unwrap();

    umask(Mode::from_bits_truncate(0o077));
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("app");
    unpack(&bundle, &dest).unwrap();

    assert_eq!(mode(&dest), 0o755);
    for dir in ["bin", "lib", "lib/deep"] {
        assert_eq!(mode(&dest.join(dir)), 0o755, "{dir}");
    }
    assert_eq!(mode(&dest.join("sand.toml")), 0o644);
    assert_eq!(mode(&dest.join("lib/deep/data.txt")), 0o644);
    assert_eq!(mode(&dest.join("bin/run")), 0o755);
}
