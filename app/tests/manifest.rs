//! The manifest: good ones of every runtime, and every mistake named by key and line.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sand_app::manifest::{CONCURRENCY_DEFAULT, MEMORY_MB_DEFAULT, TIMEOUT_MS_DEFAULT};
use sand_app::{Code, Manifest, Python, Runtime};
use sand_protocol::ids::GrainName;

const FULL: &str = r#"name = "pipeline"
entry = "double"
python = "/usr/bin/python3"
network = true

[grains.double]
runtime = "python"
module = "grains.py"
handler = "double"
timeout_ms = 5000
memory_mb = 128
concurrency = 4
reuse = 10
retries = { attempts = 5, backoff_ms = 50, factor = 1.5, backoff_ms_max = 2000 }

[grains.fast]
runtime = "rust"
module = "bin/fast"

[grains.shell]
runtime = "exec"
module = "./bin/shell.sh"
memory_mb = 64
"#;

fn grain(s: &str) -> GrainName {
    GrainName::new(s).unwrap()
}

/// A manifest with one python grain whose `[grains.g]` table gets `extra` lines.
fn with_grain_lines(extra: &str) -> String {
    format!(
        "name = \"app\"\nentry = \"g\"\n\n[grains.g]\nruntime = \"python\"\nmodule = \"g.py\"\nhandler = \"h\"\n{extra}"
    )
}

fn error_of(text: &str) -> String {
    Manifest::parse(text, "sand.toml").unwrap_err().to_string()
}

#[test]
fn a_full_manifest_with_all_three_runtimes_parses() {
    let m = Manifest::parse(FULL, "sand.toml").unwrap();
    assert_eq!(m.name.as_str(), "pipeline");
    assert_eq!(m.entry, grain("double"));
    assert_eq!(m.python, Some(Python::Host("/usr/bin/python3".into())));
    assert!(m.network);
    let double = &m.grains[&grain("double")];
    assert_eq!(
        double.code,
        Code::Python {
            module: "grains.py".into(),
            handler: "double".into()
        }
    );
    assert_eq!(double.timeout_ms, 5000);
    assert_eq!(double.memory_mb, Some(128));
    assert_eq!((double.concurrency, double.reuse), (4, 10));
    assert_eq!(double.retries.attempts, 5);
    assert_eq!(double.retries.factor, 1.5);

    let fast = &m.grains[&grain("fast")];
    assert_eq!(fast.code.runtime(), Runtime::Rust);
    assert_eq!(fast.code.path(), Path::new("bin/fast"));
    assert_eq!(fast.timeout_ms, TIMEOUT_MS_DEFAULT);
    assert_eq!(fast.concurrency, CONCURRENCY_DEFAULT);
    assert_eq!(fast.reuse, 1);

    let shell = &m.grains[&grain("shell")];
    assert_eq!(shell.code.runtime(), Runtime::Exec);
    assert_eq!(
        shell.code.path(),
        Path::new("bin/shell.sh"),
        "./ is dropped"
    );

    // 128 + 64 + the default 128 for the grain that sets none.
    assert_eq!(m.memory_bytes(), 320 << 20);
}

#[test]
fn defaults_fill_a_minimal_manifest() {
    let m = Manifest::parse(&with_grain_lines(""), "x").unwrap();
    assert!(!m.network);
    assert_eq!(m.python, None);
    assert_eq!(
        m.memory_bytes(),
        MEMORY_MB_DEFAULT << 20,
        "one grain, the default"
    );
    let spec = m.app_spec();
    assert_eq!(
        spec.policy(&grain("g")),
        sand_protocol::policy::GrainPolicy {
            timeout_ms: Some(TIMEOUT_MS_DEFAULT),
            ..Default::default()
        }
    );
}

#[test]
fn app_spec_carries_the_retry_policy() {
    let spec = Manifest::parse(FULL, "sand.toml").unwrap().app_spec();
    assert_eq!(spec.name.as_str(), "pipeline");
    assert_eq!(spec.entry, grain("double"));
    let p = spec.policy(&grain("double"));
    assert_eq!(p.attempts_max, 5);
    assert_eq!(p.backoff_ms, 50);
    assert_eq!(p.backoff_factor_milli, 1500);
    assert_eq!(p.backoff_ms_max, 2000);
    assert_eq!(p.timeout_ms, Some(5000));
    assert_eq!(p.backoff(3).as_millis(), 112, "50 * 1.5^2");
    assert_eq!(spec.grains.len(), 3);
}

#[test]
fn shape_errors_name_the_key_and_line() {
    let cases: &[(&str, &str)] = &[
        (
            "colour = 1\n",
            "sand.toml:8:1: `grains.g.colour`: unknown field `colour`",
        ),
        (
            "timeout_ms = \"soon\"\n",
            "sand.toml:8:14: `grains.g.timeout_ms`: invalid type: string \"soon\"",
        ),
        (
            "retries = { backoff_ms = 3 }\n",
            "sand.toml:8:11: `grains.g.retries`: missing field `attempts`",
        ),
        (
            "retries = { attempts = 2, factor = \"x\" }\n",
            "sand.toml:8:36: `grains.g.retries.factor`: invalid type: string \"x\"",
        ),
    ];
    for (extra, want) in cases {
        let got = error_of(&with_grain_lines(extra));
        assert!(
            got.starts_with(want),
            "{extra:?}\n got: {got}\nwant: {want}"
        );
    }
    let got = error_of(&with_grain_lines("").replace("\"python\"", "\"java\""));
    assert!(
        got.starts_with("sand.toml:5:11: `grains.g.runtime`: unknown variant `java`"),
        "{got}"
    );
    let got = error_of(&format!("wat = 3\n{}", with_grain_lines("")));
    assert!(
        got.starts_with("sand.toml:1:1: `wat`: unknown field `wat`"),
        "{got}"
    );
    let got = error_of("name = \"app\"\n[grains.g]\nruntime = \"rust\"\nmodule = \"b\"\n");
    assert!(got.contains("missing field `entry`"), "{got}");
    let got = error_of("name = \"app\"\nentry = = \"g\"\n");
    assert!(got.starts_with("sand.toml:2:9: "), "{got}");
}

#[test]
fn value_errors_name_the_key_and_line() {
    let cases: &[(&str, &str)] = &[
        (
            "timeout_ms = 0\n",
            "sand.toml:8:14: `grains.g.timeout_ms` is 0; it must be from 1",
        ),
        (
            "timeout_ms = -5\n",
            "sand.toml:8:14: `grains.g.timeout_ms` is -5",
        ),
        (
            "concurrency = 0\n",
            "sand.toml:8:15: `grains.g.concurrency` is 0",
        ),
        ("reuse = 0\n", "sand.toml:8:9: `grains.g.reuse` is 0"),
        (
            "memory_mb = 0\n",
            "sand.toml:8:13: `grains.g.memory_mb` is 0",
        ),
        (
            "retries = { attempts = 0 }\n",
            "sand.toml:8:24: `grains.g.retries.attempts` is 0",
        ),
        (
            "retries = { attempts = 2, factor = 0.5 }\n",
            "sand.toml:8:36: `grains.g.retries.factor` is 0.5; it must be from 1.0",
        ),
        (
            "retries = { attempts = 2, factor = nan }\n",
            "sand.toml:8:36: `grains.g.retries.factor` is NaN",
        ),
        (
            "retries = { attempts = 2, backoff_ms = 500, backoff_ms_max = 100 }\n",
            "sand.toml:8:62: `grains.g.retries.backoff_ms_max` is 100; it must be from 500",
        ),
    ];
    for (extra, want) in cases {
        let got = error_of(&with_grain_lines(extra));
        assert!(
            got.starts_with(want),
            "{extra:?}\n got: {got}\nwant: {want}"
        );
    }
}

#[test]
fn names_paths_and_handlers_are_checked() {
    let base = with_grain_lines("");
    let cases: Vec<(String, &str)> = vec![
        (
            base.replace("\"app\"", "\"my app\""),
            "sand.toml:1:8: `name` invalid name",
        ),
        (
            base.replace("entry = \"g\"", "entry = \"h\""),
            "sand.toml:2:9: `entry` names grain h, which is not defined",
        ),
        (
            base.replace("[grains.g]", "[grains.\"a/b\"]"),
            "sand.toml:4:9: `grains.a/b` invalid name",
        ),
        (
            base.replace("\"g.py\"", "\"../g.py\""),
            "sand.toml:6:10: `grains.g.module` is \"../g.py\"; `..` may not leave",
        ),
        (
            base.replace("\"g.py\"", "\"/etc/g.py\""),
            "sand.toml:6:10: `grains.g.module` is \"/etc/g.py\"; it must be a path relative",
        ),
        (
            base.replace("\"g.py\"", "\"g.txt\""),
            "sand.toml:6:10: `grains.g.module` is \"g.txt\"; a python module must be a .py file",
        ),
        (
            base.replace("\"g.py\"", "\"\""),
            "sand.toml:6:10: `grains.g.module` is empty",
        ),
        (
            base.replace("handler = \"h\"", "handler = \"not-ident\""),
            "sand.toml:7:11: `grains.g.handler` is \"not-ident\"",
        ),
        (
            base.replace("handler = \"h\"\n", ""),
            "sand.toml:5:11: `grains.g` has runtime \"python\" but no `handler`",
        ),
        (
            base.replace("runtime = \"python\"", "runtime = \"rust\"")
                .replace("g.py", "g"),
            "sand.toml:7:11: `grains.g.handler` is only for runtime \"python\"",
        ),
        (
            format!("python = \"../python3\"\n{base}"),
            "sand.toml:1:10: `python` is \"../python3\"; `..` may not leave the app directory",
        ),
        (
            "name = \"app\"\nentry = \"g\"\ngrains = {}\n".to_string(),
            "sand.toml:3:10: `grains` must name at least one grain",
        ),
    ];
    for (text, want) in cases {
        let got = error_of(&text);
        assert!(got.starts_with(want), "{text}\n got: {got}\nwant: {want}");
    }
}

fn write(path: &Path, text: &str, mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn load_checks_the_files_the_manifest_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("app");
    write(&dir.join("sand.toml"), FULL, 0o644);
    write(
        &dir.join("grains.py"),
        "def double(x):\n    return 2 * x\n",
        0o644,
    );
    write(&dir.join("bin/fast"), "binary", 0o755);
    write(&dir.join("bin/shell.sh"), "#!/bin/sh\n", 0o755);
    let m = Manifest::load(&dir).unwrap();
    assert_eq!(m.grains.len(), 3);

    // Not executable.
    fs::set_permissions(dir.join("bin/fast"), fs::Permissions::from_mode(0o644)).unwrap();
    let err = Manifest::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains(
            "sand.toml:18:10: `grains.fast.module` names bin/fast, which is not executable"
        ),
        "{err}"
    );
    fs::set_permissions(dir.join("bin/fast"), fs::Permissions::from_mode(0o755)).unwrap();

    // Missing.
    fs::remove_file(dir.join("grains.py")).unwrap();
    let err = Manifest::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains(
            "sand.toml:8:10: `grains.double.module` names grains.py, which cannot be opened"
        ),
        "{err}"
    );

    // A symlink inside the app directory is fine; one leading out is not.
    write(
        &dir.join("src/grains.py"),
        "def double(x): return x\n",
        0o644,
    );
    std::os::unix::fs::symlink("src/grains.py", dir.join("grains.py")).unwrap();
    Manifest::load(&dir).unwrap();
    fs::remove_file(dir.join("grains.py")).unwrap();
    write(
        &tmp.path().join("outside.py"),
        "def double(x): return x\n",
        0o644,
    );
    std::os::unix::fs::symlink(tmp.path().join("outside.py"), dir.join("grains.py")).unwrap();
    let err = Manifest::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains(
            "`grains.double.module` names grains.py, a symlink that leads out of the app directory"
        ),
        "{err}"
    );

    // A directory is not a module.
    fs::remove_file(dir.join("grains.py")).unwrap();
    fs::create_dir(dir.join("grains.py")).unwrap();
    let err = Manifest::load(&dir).unwrap_err().to_string();
    assert!(err.contains("which is not a regular file"), "{err}");

    // No manifest at all.
    let err = Manifest::load(tmp.path()).unwrap_err().to_string();
    assert!(
        err.starts_with("cannot read ") && err.contains("sand.toml"),
        "{err}"
    );
}

#[test]
fn load_refuses_a_huge_or_binary_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("sand.toml"), vec![b'#'; 2 << 20]).unwrap();
    let err = Manifest::load(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("larger than the 1048576 byte limit"), "{err}");
    fs::write(tmp.path().join("sand.toml"), [0xff, 0xfe, 0x00]).unwrap();
    let err = Manifest::load(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("not UTF-8"), "{err}");
}

mod never_panics {
    use proptest::prelude::*;
    use sand_app::Manifest;

    proptest! {
        #[test]
        fn on_arbitrary_text(text in "\\PC{0,300}") {
            let _ = Manifest::parse(&text, "fuzz");
        }

        #[test]
        fn on_manifest_like_text(
            lines in proptest::collection::vec(
                prop_oneof![
                    Just("name = \"a\"".to_string()),
                    Just("entry = \"g\"".to_string()),
                    Just("[grains.g]".to_string()),
                    Just("runtime = \"python\"".to_string()),
                    Just("module = \"g.py\"".to_string()),
                    Just("handler = \"h\"".to_string()),
                    "[a-z_.]{1,12} = [-0-9a-z\"{}=.,\\[\\] ]{0,20}",
                    "\\[[a-z.\"]{0,12}\\]",
                ],
                0..12,
            )
        ) {
            let _ = Manifest::parse(&lines.join("\n"), "fuzz");
        }
    }
}

/// An interpreter shipped in the bundle is named by a path relative to the app directory, and
/// must be an executable regular file inside it, like a grain's binary.
#[test]
fn a_bundled_interpreter_must_be_an_executable_in_the_app() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("app");
    write(&dir.join("g.py"), "def h(e, c): return e\n", 0o644);
    let text = format!("python = \"py/bin/python3\"\n{}", with_grain_lines(""));
    write(&dir.join("sand.toml"), &text, 0o644);
    let err = Manifest::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("`python` names py/bin/python3, which cannot be opened"),
        "{err}"
    );
    write(&dir.join("py/bin/python3"), "#!/bin/sh\n", 0o644);
    let err = Manifest::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("`python` names py/bin/python3, which is not executable"),
        "{err}"
    );
    fs::set_permissions(
        dir.join("py/bin/python3"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let m = Manifest::load(&dir).unwrap();
    assert_eq!(m.python, Some(Python::Bundled("py/bin/python3".into())));
}
