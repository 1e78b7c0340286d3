//! The app manifest, `sand.toml`: what an app's grains are, how to run them, and their limits.
//!
//! ```toml
//! name = "pipeline"
//! entry = "double"                 # the grain a client invocation starts at
//! python = "/usr/bin/python3"      # optional: a host interpreter the operator allows, or one
//!                                  #   shipped in the app (a relative path)
//! network = false                  # optional: network access, if the operator allows it
//!
//! [grains.double]
//! runtime = "python"               # python | rust | exec
//! module = "grains.py"             # python: a .py file in the app dir; rust/exec: a binary
//! handler = "double"               # python only: the function to call
//! timeout_ms = 5000                # optional, default 30000
//! memory_mb = 128                  # optional, default 128: the grain's zygote and instances
//! concurrency = 8                  # optional, default 8
//! reuse = 1                        # optional, default 1: calls one forked instance serves
//! retries = { attempts = 3, backoff_ms = 100, factor = 2.0 }   # optional
//! ```
//!
//! [`Manifest::parse`] checks the text alone; [`Manifest::load`] also checks the files it names
//! against the app directory. What the app asks of the host is the operator's to grant: see
//! [`crate::policy`]. Every mistake comes back as a [`ManifestError`] naming the key and
//! its line and column; nothing here panics on any input.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::de::DeTable;
use toml::Spanned;

use sand_protocol::ids::{AppName, GrainName};
use sand_protocol::policy::{AppSpec, GrainPolicy};

use crate::locate::KeyMap;
pub use crate::locate::Position;

/// The manifest's file name, at the root of an app directory.
pub const MANIFEST_FILE: &str = "sand.toml";

/// The largest manifest read, in bytes.
pub const MANIFEST_BYTES_MAX: u64 = 1 << 20;

/// A grain's timeout when the manifest gives none, in milliseconds.
pub const TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// The longest timeout a manifest may ask for: one day, in milliseconds.
pub const TIMEOUT_MS_MAX: u64 = 24 * 60 * 60 * 1000;
/// A grain's concurrency when the manifest gives none.
pub const CONCURRENCY_DEFAULT: u32 = 8;
/// The most concurrent instances of one grain on one worker.
pub const CONCURRENCY_MAX: u32 = 4096;
/// The most calls one forked instance may serve.
pub const REUSE_MAX: u32 = 1_000_000;
/// The most attempts a retry policy may ask for.
pub const ATTEMPTS_MAX: u32 = 1000;
/// The largest retry backoff factor.
pub const FACTOR_MAX: f64 = 1000.0;
/// The largest memory limit of one grain, in MiB (1 TiB).
pub const MEMORY_MB_MAX: u64 = 1 << 20;
/// The memory a grain without `memory_mb` counts for in its app's sandbox limit: enough for a
/// Python zygote and its default [`CONCURRENCY_DEFAULT`] instances, each a fork that shares
/// the interpreter's pages until it writes them.
pub const MEMORY_MB_DEFAULT: u64 = 128;
/// The largest backoff, in milliseconds (one hour).
pub const BACKOFF_MS_MAX: u64 = 60 * 60 * 1000;

/// A checked `sand.toml`.
#[derive(Clone, PartialEq, Debug)]
pub struct Manifest {
    /// The app's name.
    pub name: AppName,
    /// The grain a client invocation starts at; a key of `grains`.
    pub entry: GrainName,
    /// The interpreter of the app's python zygotes, if the app chose one.
    pub python: Option<Python>,
    /// Whether the app asks for network access (which the operator's policy may refuse).
    pub network: bool,
    /// The grains, by name; never empty.
    pub grains: BTreeMap<GrainName, Grain>,
}

/// The interpreter an app names for its python grains.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Python {
    /// A host interpreter, an absolute path: only the operator's policy can allow it.
    Host(PathBuf),
    /// One shipped in the bundle: a path relative to the app directory (normal components
    /// only), an executable regular file inside it.
    Bundled(PathBuf),
}

/// One grain of a manifest.
#[derive(Clone, PartialEq, Debug)]
pub struct Grain {
    /// What runs it.
    pub code: Code,
    /// How long one call may run, in milliseconds (at least 1).
    pub timeout_ms: u64,
    /// The memory of the grain's zygote and instances together, in MiB, if limited.
    pub memory_mb: Option<u64>,
    /// How many calls of the grain may run at once on one worker (at least 1).
    pub concurrency: u32,
    /// How many calls one forked instance serves before it exits (at least 1).
    pub reuse: u32,
    /// What the gateway does when a call fails.
    pub retries: Retries,
}

/// A grain's code: the runtime and the file it runs, a path relative to the app directory
/// with only normal components (no `..`, not absolute).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Code {
    /// A function in a Python file, run by sand's Python zygote runtime.
    Python {
        /// The `.py` file.
        module: PathBuf,
        /// The function's name: a Python identifier.
        handler: String,
    },
    /// A binary built with sand's Rust SDK: its `serve(handler)` is the zygote.
    Rust {
        /// The binary.
        binary: PathBuf,
    },
    /// Any binary, forked and executed once per call.
    Exec {
        /// The binary.
        binary: PathBuf,
    },
}

impl Code {
    /// The runtime kind.
    pub fn runtime(&self) -> Runtime {
        match self {
            Code::Python { .. } => Runtime::Python,
            Code::Rust { .. } => Runtime::Rust,
            Code::Exec { .. } => Runtime::Exec,
        }
    }

    /// The file it runs, relative to the app directory.
    pub fn path(&self) -> &Path {
        match self {
            Code::Python { module, .. } => module,
            Code::Rust { binary } | Code::Exec { binary } => binary,
        }
    }
}

/// A grain runtime.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// sand's Python zygote runtime.
    Python,
    /// sand's Rust SDK.
    Rust,
    /// A plain binary, fork+exec per call.
    Exec,
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Runtime::Python => "python",
            Runtime::Rust => "rust",
            Runtime::Exec => "exec",
        })
    }
}

/// A grain's retry policy.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Retries {
    /// Attempts that may fail before the execution fails (at least 1).
    pub attempts: u32,
    /// The wait before the first retry, in milliseconds.
    pub backoff_ms: u64,
    /// The factor by which each later wait grows (at least 1.0).
    pub factor: f64,
    /// The longest wait, in milliseconds.
    pub backoff_ms_max: u64,
}

impl Default for Retries {
    /// The protocol's default policy: 3 attempts, 100 ms doubling up to 10 s.
    fn default() -> Self {
        let p = GrainPolicy::default();
        Self {
            attempts: p.attempts_max,
            backoff_ms: p.backoff_ms,
            factor: f64::from(p.backoff_factor_milli) / 1000.0,
            backoff_ms_max: p.backoff_ms_max,
        }
    }
}

/// A manifest that could not be read or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than [`MANIFEST_BYTES_MAX`] or not UTF-8.
    #[error("{origin}: {reason}")]
    Unreadable {
        /// Where the manifest came from.
        origin: String,
        /// Why it was not read.
        reason: String,
    },
    /// The text is not TOML, or does not have the manifest's shape.
    #[error("{origin}:{at}: {field_text}{message}", at = at_text(at), field_text = field_text(field))]
    Syntax {
        /// Where the manifest came from.
        origin: String,
        /// The dotted key concerned, when known.
        field: Option<String>,
        /// Where in the text, when known.
        at: Option<Position>,
        /// What is wrong.
        message: String,
    },
    /// A key has a value the manifest does not accept.
    #[error("{origin}:{at}: `{field}` {reason}")]
    Invalid {
        /// Where the manifest came from.
        origin: String,
        /// The dotted key, e.g. `grains.double.timeout_ms`.
        field: String,
        /// Where its value is.
        at: Position,
        /// What is wrong, and what would be right.
        reason: String,
    },
}

fn at_text(at: &Option<Position>) -> String {
    at.map_or_else(|| "?".to_string(), |p| p.to_string())
}

fn field_text(field: &Option<String>) -> String {
    field
        .as_ref()
        .map_or_else(String::new, |f| format!("`{f}`: "))
}

impl Manifest {
    /// Parses and checks a manifest's text; `origin` names it in errors (a path, or "upload").
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, ManifestError> {
        Ok(Parsed::new(text, origin)?.manifest)
    }

    /// Reads `dir/sand.toml` and checks it, and that every grain's file is a regular file
    /// inside `dir` (a symlink may point only within `dir`) and that binaries are executable.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let origin = path.display().to_string();
        let text = read_limited(&path, &origin)?;
        let parsed = Parsed::new(&text, &origin)?;
        let root = dir.canonicalize().map_err(|source| ManifestError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        for (name, grain) in &parsed.manifest.grains {
            let at = parsed
                .module_at
                .get(name)
                .copied()
                .unwrap_or(Position { line: 1, column: 1 });
            let executable = grain.code.runtime() != Runtime::Python;
            check_file(&root, grain.code.path(), executable).map_err(|reason| {
                ManifestError::Invalid {
                    origin: origin.clone(),
                    field: format!("grains.{name}.module"),
                    at,
                    reason,
                }
            })?;
        }
        if let (Some(Python::Bundled(path)), Some(at)) = (&parsed.manifest.python, parsed.python_at)
        {
            check_file(&root, path, true).map_err(|reason| ManifestError::Invalid {
                origin: origin.clone(),
                field: "python".into(),
                at,
                reason,
            })?;
        }
        Ok(parsed.manifest)
    }

    /// What the global queue needs: the entry grain and each grain's retry and timeout policy.
    pub fn app_spec(&self) -> AppSpec {
        let grains = self
            .grains
            .iter()
            .map(|(name, g)| {
                let policy = GrainPolicy {
                    attempts_max: g.retries.attempts,
                    backoff_ms: g.retries.backoff_ms,
                    backoff_factor_milli: factor_milli(g.retries.factor),
                    backoff_ms_max: g.retries.backoff_ms_max,
                    timeout_ms: Some(g.timeout_ms),
                };
                (name.clone(), policy)
            })
            .collect();
        AppSpec {
            name: self.name.clone(),
            entry: self.entry.clone(),
            grains,
        }
    }

    /// The memory limit of the app's sandbox, in bytes: the sum over grains of `memory_mb`,
    /// a grain without one counting [`MEMORY_MB_DEFAULT`]. Every app has one.
    pub fn memory_bytes(&self) -> u64 {
        let mb: u64 = self
            .grains
            .values()
            .map(|g| g.memory_mb.unwrap_or(MEMORY_MB_DEFAULT))
            .fold(0, u64::saturating_add);
        mb.saturating_mul(1 << 20)
    }
}

/// The factor in thousandths, as the protocol keeps it. The manifest bounds it to
/// [1, FACTOR_MAX], so the product fits a u32.
fn factor_milli(factor: f64) -> u32 {
    (factor * 1000.0).round().clamp(1000.0, f64::from(u32::MAX)) as u32
}

fn read_limited(path: &Path, origin: &str) -> Result<String, ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MANIFEST_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MANIFEST_BYTES_MAX {
        return Err(ManifestError::Unreadable {
            origin: origin.to_string(),
            reason: format!("larger than the {MANIFEST_BYTES_MAX} byte limit"),
        });
    }
    String::from_utf8(bytes).map_err(|e| ManifestError::Unreadable {
        origin: origin.to_string(),
        reason: format!("not UTF-8 text ({e})"),
    })
}

/// Checks that a file an app runs is a regular file inside `root` (resolving symlinks), and
/// executable if `executable`.
fn check_file(root: &Path, rel: &Path, executable: bool) -> Result<(), String> {
    let path = root.join(rel);
    let real = path
        .canonicalize()
        .map_err(|e| format!("names {}, which cannot be opened: {e}", rel.display()))?;
    if !real.starts_with(root) {
        return Err(format!(
            "names {}, a symlink that leads out of the app directory (to {})",
            rel.display(),
            real.display()
        ));
    }
    let meta = std::fs::metadata(&real)
        .map_err(|e| format!("names {}, which cannot be read: {e}", rel.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "names {}, which is not a regular file",
            rel.display()
        ));
    }
    if executable {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(format!(
                "names {}, which is not executable (chmod +x it)",
                rel.display()
            ));
        }
    }
    Ok(())
}

/// A manifest with the positions of the files it names, for `load`'s file checks.
struct Parsed {
    manifest: Manifest,
    module_at: BTreeMap<GrainName, Position>,
    python_at: Option<Position>,
}

/// The manifest as written, before checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: Spanned<String>,
    entry: Spanned<String>,
    python: Option<Spanned<String>>,
    #[serde(default)]
    network: bool,
    grains: Spanned<BTreeMap<Spanned<String>, RawGrain>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrain {
    runtime: Spanned<Runtime>,
    module: Spanned<String>,
    handler: Option<Spanned<String>>,
    timeout_ms: Option<Spanned<i64>>,
    memory_mb: Option<Spanned<i64>>,
    concurrency: Option<Spanned<i64>>,
    reuse: Option<Spanned<i64>>,
    retries: Option<RawRetries>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetries {
    attempts: Spanned<i64>,
    backoff_ms: Option<Spanned<i64>>,
    factor: Option<Spanned<f64>>,
    backoff_ms_max: Option<Spanned<i64>>,
}

/// Builds errors about one manifest's text.
struct Checker<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Checker<'_> {
    fn invalid(&self, field: &str, span: Range<usize>, reason: impl Into<String>) -> ManifestError {
        ManifestError::Invalid {
            origin: self.origin.to_string(),
            field: field.to_string(),
            at: Position::of_offset(self.text, span.start),
            reason: reason.into(),
        }
    }

    fn syntax(&self, keys: Option<&KeyMap>, err: &toml::de::Error) -> ManifestError {
        let span = err.span();
        ManifestError::Syntax {
            origin: self.origin.to_string(),
            field: match (keys, &span) {
                (Some(keys), Some(span)) => keys.path_at(span).map(str::to_string),
                _ => None,
            },
            at: span.map(|s| Position::of_offset(self.text, s.start)),
            message: err.message().trim_end().to_string(),
        }
    }

    /// An integer within `min..=max`.
    fn int<T: TryFrom<i64>>(
        &self,
        field: &str,
        v: &Spanned<i64>,
        min: i64,
        max: i64,
    ) -> Result<T, ManifestError> {
        let n = *v.get_ref();
        if n < min || n > max {
            return Err(self.invalid(
                field,
                v.span(),
                format!("is {n}; it must be from {min} to {max}"),
            ));
        }
        T::try_from(n).map_err(|_| self.invalid(field, v.span(), format!("is {n}; out of range")))
    }

    fn app_path(&self, field: &str, v: &Spanned<String>) -> Result<PathBuf, ManifestError> {
        relative_path(v.get_ref()).map_err(|why| self.invalid(field, v.span(), why))
    }
}

impl Parsed {
    fn new(text: &str, origin: &str) -> Result<Parsed, ManifestError> {
        let check = Checker { text, origin };
        let doc = DeTable::parse(text).map_err(|e| check.syntax(None, &e))?;
        let keys = KeyMap::new(doc.get_ref());
        let raw: RawManifest = toml::from_str(text).map_err(|e| check.syntax(Some(&keys), &e))?;

        let name = AppName::new(raw.name.get_ref().as_str())
            .map_err(|e| check.invalid("name", raw.name.span(), e.to_string()))?;
        let python = match &raw.python {
            None => None,
            Some(p) if p.get_ref().contains('\0') => {
                return Err(check.invalid("python", p.span(), "contains a NUL byte"))
            }
            Some(p) if Path::new(p.get_ref()).is_absolute() => {
                Some(Python::Host(PathBuf::from(p.get_ref())))
            }
            Some(p) => Some(Python::Bundled(check.app_path("python", p)?)),
        };
        let python_at = raw
            .python
            .as_ref()
            .map(|p| Position::of_offset(text, p.span().start));
        if raw.grains.get_ref().is_empty() {
            return Err(check.invalid("grains", raw.grains.span(), "must name at least one grain"));
        }
        let mut grains = BTreeMap::new();
        let mut module_at = BTreeMap::new();
        for (key, g) in raw.grains.get_ref() {
            let grain_name = GrainName::new(key.get_ref().as_str()).map_err(|e| {
                check.invalid(
                    &format!("grains.{}", key.get_ref()),
                    key.span(),
                    e.to_string(),
                )
            })?;
            let grain = check_grain(&check, &grain_name, g)?;
            module_at.insert(
                grain_name.clone(),
                Position::of_offset(text, g.module.span().start),
            );
            grains.insert(grain_name, grain);
        }
        let entry = GrainName::new(raw.entry.get_ref().as_str())
            .map_err(|e| check.invalid("entry", raw.entry.span(), e.to_string()))?;
        if !grains.contains_key(&entry) {
            let known: Vec<&str> = grains.keys().map(GrainName::as_str).collect();
            return Err(check.invalid(
                "entry",
                raw.entry.span(),
                format!(
                    "names grain {entry}, which is not defined; defined: {}",
                    known.join(", ")
                ),
            ));
        }
        Ok(Parsed {
            manifest: Manifest {
                name,
                entry,
                python,
                network: raw.network,
                grains,
            },
            module_at,
            python_at,
        })
    }
}

fn check_grain(
    check: &Checker<'_>,
    name: &GrainName,
    g: &RawGrain,
) -> Result<Grain, ManifestError> {
    let field = |k: &str| format!("grains.{name}.{k}");
    let runtime = *g.runtime.get_ref();
    let module = check.app_path(&field("module"), &g.module)?;
    let code = match (runtime, &g.handler) {
        (Runtime::Python, Some(h)) => {
            if module.extension().and_then(|e| e.to_str()) != Some("py") {
                return Err(check.invalid(
                    &field("module"),
                    g.module.span(),
                    format!(
                        "is {:?}; a python module must be a .py file",
                        g.module.get_ref()
                    ),
                ));
            }
            if !is_identifier(h.get_ref()) {
                return Err(check.invalid(
                    &field("handler"),
                    h.span(),
                    format!("is {:?}; it must be a Python function name", h.get_ref()),
                ));
            }
            Code::Python {
                module,
                handler: h.get_ref().clone(),
            }
        }
        (Runtime::Python, None) => {
            return Err(check.invalid(
                &format!("grains.{name}"),
                g.runtime.span(),
                "has runtime \"python\" but no `handler`: name the function to call",
            ))
        }
        (other, Some(h)) => {
            return Err(check.invalid(
                &field("handler"),
                h.span(),
                format!("is only for runtime \"python\"; a {other} grain runs its binary's main"),
            ))
        }
        (Runtime::Rust, None) => Code::Rust { binary: module },
        (Runtime::Exec, None) => Code::Exec { binary: module },
    };
    let timeout_ms = match &g.timeout_ms {
        Some(v) => check.int(&field("timeout_ms"), v, 1, TIMEOUT_MS_MAX as i64)?,
        None => TIMEOUT_MS_DEFAULT,
    };
    let memory_mb = match &g.memory_mb {
        Some(v) => Some(check.int(&field("memory_mb"), v, 1, MEMORY_MB_MAX as i64)?),
        None => None,
    };
    let concurrency = match &g.concurrency {
        Some(v) => check.int(&field("concurrency"), v, 1, i64::from(CONCURRENCY_MAX))?,
        None => CONCURRENCY_DEFAULT,
    };
    let reuse = match &g.reuse {
        Some(v) => check.int(&field("reuse"), v, 1, i64::from(REUSE_MAX))?,
        None => 1,
    };
    let retries = match &g.retries {
        Some(r) => check_retries(check, &field("retries"), r)?,
        None => Retries::default(),
    };
    Ok(Grain {
        code,
        timeout_ms,
        memory_mb,
        concurrency,
        reuse,
        retries,
    })
}

fn check_retries(
    check: &Checker<'_>,
    field: &str,
    r: &RawRetries,
) -> Result<Retries, ManifestError> {
    let defaults = Retries::default();
    let attempts = check.int(
        &format!("{field}.attempts"),
        &r.attempts,
        1,
        i64::from(ATTEMPTS_MAX),
    )?;
    let backoff_ms = match &r.backoff_ms {
        Some(v) => check.int(&format!("{field}.backoff_ms"), v, 0, BACKOFF_MS_MAX as i64)?,
        None => defaults.backoff_ms,
    };
    let factor = match &r.factor {
        Some(v) => {
            let f = *v.get_ref();
            // NaN fails both comparisons, so it is refused too.
            if !(1.0..=FACTOR_MAX).contains(&f) {
                return Err(check.invalid(
                    &format!("{field}.factor"),
                    v.span(),
                    format!("is {f}; it must be from 1.0 to {FACTOR_MAX:.1}"),
                ));
            }
            f
        }
        None => defaults.factor,
    };
    let backoff_ms_max = match &r.backoff_ms_max {
        Some(v) => check.int(
            &format!("{field}.backoff_ms_max"),
            v,
            i64::try_from(backoff_ms).unwrap_or(i64::MAX),
            BACKOFF_MS_MAX as i64,
        )?,
        None => defaults.backoff_ms_max.max(backoff_ms),
    };
    Ok(Retries {
        attempts,
        backoff_ms,
        factor,
        backoff_ms_max,
    })
}

/// A path inside the app directory: relative, with normal components only (`.` is dropped).
fn relative_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("is empty; name a file in the app directory".to_string());
    }
    if s.contains('\0') {
        return Err("contains a NUL byte".to_string());
    }
    let mut out = PathBuf::new();
    for c in Path::new(s).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("is {s:?}; `..` may not leave the app directory"))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "is {s:?}; it must be a path relative to the app directory, not absolute"
                ))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("is {s:?}; name a file in the app directory"));
    }
    Ok(out)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
