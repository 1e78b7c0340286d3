//! Bundles: round trips, determinism, and hostile archives refused without writing outside.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use sand_app::bundle::{BUNDLE_BYTES_MAX, ENTRIES_MAX};
use sand_app::{digest, pack, unpack, BundleError};

const MANIFEST: &str = r#"name = "pipeline"
entry = "double"

[grains.double]
runtime = "python"
module = "grains/double.py"
handler = "double"

[grains.tool]
runtime = "exec"
module = "bin/tool"
"#;

fn write(path: &Path, bytes: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A valid app with a nested module, an executable, a data file, and things pack must skip.
fn sample_app(dir: &Path) {
    write(&dir.join("sand.toml"), MANIFEST.as_bytes(), 0o644);
    write(
        &dir.join("grains/double.py"),
        b"def double(x):\n    return 2 * x\n",
        0o644,
    );
    write(&dir.join("bin/tool"), b"#!/bin/sh\ncat\n", 0o750);
    write(&dir.join("data/big.bin"), &vec![7u8; 300_000], 0o600);
    fs::create_dir_all(dir.join("empty")).unwrap();
    write(&dir.join(".git/HEAD"), b"ref: refs/heads/main\n", 0o644);
    write(&dir.join("grains/__pycache__/double.pyc"), b"junk", 0o644);
    write(&dir.join(".sand/state"), b"junk", 0o644);
    std::os::unix::fs::symlink("/etc/passwd", dir.join("data/link")).unwrap();
}

/// Every file below `dir` with its contents and mode bits, for comparisons.
fn tree(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(dir).unwrap().to_path_buf();
            if meta.is_dir() {
                stack.push(e.path());
                out.push((rel, None, meta.permissions().mode() & 0o777));
            } else {
                out.push((
                    rel,
                    Some(fs::read(e.path()).unwrap()),
                    meta.permissions().mode() & 0o777,
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn pack_then_unpack_round_trips_and_skips_what_it_should() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_app(&src);
    let bundle = pack(&src).unwrap();
    let dest = tmp.path().join("dest");
    let manifest = unpack(&bundle, &dest).unwrap();
    assert_eq!(manifest.name.as_str(), "pipeline");
    assert_eq!(manifest.grains.len(), 2);

    let got = tree(&dest);
    let paths: Vec<&Path> = got.iter().map(|(p, _, _)| p.as_path()).collect();
    assert_eq!(
        paths,
        [
            "bin",
            "bin/tool",
            "data",
            "data/big.bin",
            "empty",
            "grains",
            "grains/double.py",
            "sand.toml"
        ]
        .map(Path::new)
    );
    let file = |p: &str| got.iter().find(|(q, _, _)| q == Path::new(p)).unwrap();
    assert_eq!(file("bin/tool").2, 0o755, "executables stay executable");
    assert_eq!(file("data/big.bin").2, 0o644, "modes are normalised");
    assert_eq!(
        file("data/big.bin").1.as_deref(),
        Some(&vec![7u8; 300_000][..])
    );
    assert_eq!(file("sand.toml").1.as_deref(), Some(MANIFEST.as_bytes()));
}

#[test]
fn pack_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    sample_app(&a);
    // The same files made in another order, at another time, with other modes.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(&b.join("data/big.bin"), &vec![7u8; 300_000], 0o640);
    write(&b.join("bin/tool"), b"#!/bin/sh\ncat\n", 0o700);
    fs::create_dir_all(b.join("empty")).unwrap();
    write(
        &b.join("grains/double.py"),
        b"def double(x):\n    return 2 * x\n",
        0o600,
    );
    write(&b.join("sand.toml"), MANIFEST.as_bytes(), 0o600);

    let first = pack(&a).unwrap();
    assert_eq!(first, pack(&a).unwrap());
    assert_eq!(first, pack(&b).unwrap());
    assert_eq!(digest(&first), digest(&pack(&b).unwrap()));
    assert_eq!(digest(&first).len(), 64);
    assert_eq!(
        digest(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    write(
        &b.join("grains/double.py"),
        b"def double(x):\n    return 3 * x\n",
        0o644,
    );
    assert_ne!(
        first,
        pack(&b).unwrap(),
        "a changed file changes the bundle"
    );
}

#[test]
fn pack_refuses_an_invalid_app_or_a_symlinked_module() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_app(&src);
    fs::rename(src.join("grains/double.py"), src.join("real.py")).unwrap();
    std::os::unix::fs::symlink("../real.py", src.join("grains/double.py")).unwrap();
    let err = pack(&src).unwrap_err();
    assert!(matches!(err, BundleError::NotRegular(_)), "{err}");
    assert!(
        err.to_string()
            .contains("grains/double.py is not a regular file"),
        "{err}"
    );

    fs::remove_file(src.join("sand.toml")).unwrap();
    let err = pack(&src).unwrap_err();
    assert!(matches!(err, BundleError::Manifest(_)), "{err}");
}

/// A gzip'd tar written entry by entry with raw headers, so any path and type can be forged.
struct Forge {
    tar: tar::Builder<Vec<u8>>,
}

impl Forge {
    fn new() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    fn entry(mut self, path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>) -> Self {
        let mut h = tar::Header::new_gnu();
        // Write the name bytes directly: `set_path` itself refuses `..` and absolute paths.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        self.tar.append(&h, data).unwrap();
        self
    }

    fn file(self, path: &str, data: &[u8]) -> Self {
        self.entry(path, tar::EntryType::Regular, data, None)
    }

    fn valid_app(self) -> Self {
        self.file("sand.toml", MANIFEST.as_bytes())
            .file("grains/double.py", b"def double(x): return x\n")
            .entry("bin/tool", tar::EntryType::Regular, b"#!/bin/sh\n", None)
    }

    fn finish(self) -> Vec<u8> {
        gzip(&self.tar.into_inner().unwrap())
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// Unpacks a hostile bundle into `dir/dest`, expects an error containing `want`, and checks
/// that nothing was left: neither `dest` nor anything beside it.
fn refused(bundle: &[u8], want: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("deep/er/dest");
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let err = unpack(bundle, &dest).unwrap_err().to_string();
    assert!(err.contains(want), "got: {err}\nwant: {want}");
    assert!(!dest.exists(), "dest is removed after an error");
    let left: Vec<_> = walk_all(tmp.path());
    assert_eq!(
        left,
        [Path::new("deep"), Path::new("deep/er")],
        "nothing written outside dest"
    );
}

fn walk_all(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

#[test]
fn a_forged_valid_bundle_unpacks() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    // The forge's 0644 binary is not executable: the manifest check inside catches it.
    let err = unpack(&Forge::new().valid_app().finish(), &dest)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`grains.tool.module` names bin/tool, which is not executable"),
        "{err}"
    );
    assert!(!dest.exists());
    let mut h = tar::Header::new_gnu();
    h.set_path("bin/tool").unwrap();
    h.set_mode(0o755);
    h.set_size(3);
    h.set_cksum();
    let mut forge = Forge::new()
        .file("./sand.toml", MANIFEST.as_bytes())
        .file("grains/double.py", b"def double(x): return x\n");
    forge.tar.append(&h, &b"abc"[..]).unwrap();
    let m = unpack(&forge.finish(), &dest).unwrap();
    assert_eq!(m.entry.as_str(), "double");
}

#[test]
fn hostile_paths_and_types_are_refused() {
    use tar::EntryType as T;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            Forge::new().valid_app().file("../x", b"evil").finish(),
            "\"../x\" refused: `..` in the path",
        ),
        (
            Forge::new().valid_app().file("a/../../x", b"evil").finish(),
            "`..` in the path",
        ),
        (
            Forge::new()
                .valid_app()
                .file("/etc/passwd", b"evil")
                .finish(),
            "\"/etc/passwd\" refused: an absolute path",
        ),
        (
            Forge::new()
                .valid_app()
                .entry("link", T::Symlink, b"", Some("/etc"))
                .finish(),
            "\"link\" refused: symlinks are not allowed",
        ),
        (
            Forge::new()
                .valid_app()
                .entry("hard", T::Link, b"", Some("sand.toml"))
                .finish(),
            "hard links are not allowed",
        ),
        (
            Forge::new()
                .valid_app()
                .entry("dev", T::Char, b"", None)
                .finish(),
            "device files and fifos are not allowed",
        ),
        (
            Forge::new()
                .valid_app()
                .entry("fifo", T::Fifo, b"", None)
                .finish(),
            "device files and fifos are not allowed",
        ),
        (
            Forge::new()
                .valid_app()
                .file("sand.toml", b"again")
                .finish(),
            "\"sand.toml\" refused: a duplicate path",
        ),
        (
            Forge::new().file("grains/double.py", b"x").finish(),
            "sand.toml",
        ),
        (b"definitely not gzip".to_vec(), "not a valid bundle"),
        (
            gzip(b"not a tar either, but some bytes that are longer than nothing at all"),
            "not a valid bundle",
        ),
    ];
    for (bundle, want) in cases {
        refused(&bundle, want);
    }
}

#[test]
fn a_symlink_then_a_write_through_it_is_refused_before_anything_is_written() {
    // The classic: `dir -> /tmp/outside`, then `dir/file`. The symlink is refused first.
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let bundle = Forge::new()
        .entry(
            "dir",
            tar::EntryType::Symlink,
            b"",
            Some(outside.to_str().unwrap()),
        )
        .file("dir/file", b"evil")
        .finish();
    let dest = tmp.path().join("dest");
    let err = unpack(&bundle, &dest).unwrap_err().to_string();
    assert!(err.contains("symlinks are not allowed"), "{err}");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn size_and_count_limits_hold() {
    // A gzip bomb: 300 MiB of zeros in one entry compresses to about 300 KiB.
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let mut h = tar::Header::new_gnu();
    h.set_path("bomb").unwrap();
    h.set_size(300 << 20);
    h.set_cksum();
    tar.append(&h, std::io::Read::take(std::io::repeat(0), 300 << 20))
        .unwrap();
    let bomb = tar.into_inner().unwrap().finish().unwrap();
    assert!(bomb.len() < 1 << 20, "the bomb is small: {}", bomb.len());
    refused(&bomb, "bundle too large");

    // Too many entries.
    let mut forge = Forge::new();
    for i in 0..=ENTRIES_MAX {
        forge = forge.entry(&format!("d{i}"), tar::EntryType::Directory, b"", None);
    }
    refused(&forge.finish(), &format!("more than {ENTRIES_MAX} entries"));

    // Too large compressed: refused before reading a byte.
    let tmp = tempfile::tempdir().unwrap();
    let err = unpack(&vec![0u8; BUNDLE_BYTES_MAX + 1], &tmp.path().join("d")).unwrap_err();
    assert!(matches!(err, BundleError::TooLarge(_)), "{err}");
    assert!(!tmp.path().join("d").exists());
}

#[test]
fn unpack_refuses_an_existing_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let err = unpack(&Forge::new().valid_app().finish(), tmp.path()).unwrap_err();
    assert!(matches!(err, BundleError::DestinationExists(_)), "{err}");
    assert!(tmp.path().exists(), "an existing directory is left alone");
}

mod never_panics {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let tmp = tempfile::tempdir().unwrap();
            let _ = sand_app::unpack(&bytes, &tmp.path().join("d"));
        }

        #[test]
        fn on_arbitrary_gzip_payloads(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let tmp = tempfile::tempdir().unwrap();
            let _ = sand_app::unpack(&super::gzip(&bytes), &tmp.path().join("d"));
        }

        #[test]
        fn on_a_valid_bundle_with_a_byte_flipped(at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bundle = super::Forge::new().valid_app().finish();
            let i = at.index(bundle.len());
            bundle[i] ^= 1 << bit;
            let tmp = tempfile::tempdir().unwrap();
            let _ = sand_app::unpack(&bundle, &tmp.path().join("d"));
        }
    }
}
