//! The operator's policy: what an app may ask of the host.
//!
//! A manifest says what an app wants (an interpreter, network access, memory); only the
//! operator's [`Policy`] decides whether it gets it, so nothing an app declares widens its own
//! privileges. The gateway checks it at deploy and every worker again before it makes a
//! sandbox, so an app deployed under a looser policy still runs only within what its worker
//! allows. What a sandbox mounts for an interpreter comes from here, never from the manifest.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use sand_protocol::ids::AppName;

use crate::manifest::{Manifest, Python};

/// The interpreter apps get when the operator names none.
pub const PYTHON_DEFAULT: &str = "/usr/bin/python3";
/// The memory cap of one app when the operator sets none, in MiB.
pub const APP_MEMORY_MB_MAX_DEFAULT: u64 = 4096;

/// What apps may ask of the host. [`Policy::default`] allows [`PYTHON_DEFAULT`], network for
/// no app, and [`APP_MEMORY_MB_MAX_DEFAULT`] per app.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Policy {
    /// The host interpreters apps may name as `python`; the first is the interpreter of apps
    /// that name none. An empty list allows only interpreters shipped in bundles.
    pub interpreters: Vec<Interpreter>,
    /// The apps whose sandboxes may have network access.
    pub network_apps: BTreeSet<AppName>,
    /// The most memory one app's grains may ask for together, in MiB.
    pub app_memory_mb_max: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            interpreters: vec![Interpreter {
                path: PYTHON_DEFAULT.into(),
                mounts: Vec::new(),
            }],
            network_apps: BTreeSet::new(),
            app_memory_mb_max: APP_MEMORY_MB_MAX_DEFAULT,
        }
    }
}

/// A host interpreter the operator allows, and what a sandbox needs to run it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Interpreter {
    /// Its absolute path, as apps name it and as sandboxes run it.
    pub path: PathBuf,
    /// Host directories mounted read-only, at the same path, into the sandbox of an app that
    /// uses it: its installation prefix when it lives outside the system directories (which
    /// every sandbox has).
    pub mounts: Vec<PathBuf>,
}

impl FromStr for Interpreter {
    type Err = String;

    /// `PATH` or `PATH=PREFIX`: an interpreter, and the directory to mount for it.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, mount) = match s.split_once('=') {
            Some((path, mount)) => (path, Some(mount)),
            None => (s, None),
        };
        let path = plain_absolute(path)?;
        let mounts = match mount {
            None => Vec::new(),
            Some(m) => {
                let m = plain_absolute(m)?;
                if m == Path::new("/") {
                    return Err("the host's root cannot be mounted into a sandbox".into());
                }
                vec![m]
            }
        };
        Ok(Self { path, mounts })
    }
}

/// An absolute path without `..`.
fn plain_absolute(s: &str) -> Result<PathBuf, String> {
    let path = Path::new(s);
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{s:?} is not an absolute path without `..`"));
    }
    Ok(path.to_owned())
}

/// The interpreter an app's python grains run, as the policy allows it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PythonChoice<'a> {
    /// One of the host's, with what to mount for it.
    Host(&'a Interpreter),
    /// One shipped in the app's bundle: a path relative to it; nothing is mounted for it.
    Bundled(&'a Path),
}

/// Something an app asked for that the policy does not allow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The app names a host interpreter the operator has not allowed.
    #[error(
        "app {app}: `python` is {path:?}, an interpreter this cluster does not allow (allowed: \
         {allowed}); the operator allows one with `--python PATH` on the gateway and the \
         workers, or the app ships its own in its bundle (a relative path)"
    )]
    Interpreter {
        /// The app.
        app: AppName,
        /// What it named.
        path: PathBuf,
        /// What is allowed.
        allowed: String,
    },
    /// The app names no interpreter, has python grains, and the operator allows none.
    #[error(
        "app {app} has python grains but names no `python`, and this cluster allows no host \
         interpreter; the operator allows one with `--python PATH`, or the app ships its own"
    )]
    NoInterpreter {
        /// The app.
        app: AppName,
    },
    /// The app asks for network access the operator has not given it.
    #[error(
        "app {app}: `network` is true, but this cluster gives the app no network access; the \
         operator allows it with `--allow-network {app}` on the gateway and the workers"
    )]
    Network {
        /// The app.
        app: AppName,
    },
    /// The app's grains ask for more memory than one app may have.
    #[error(
        "app {app}: its grains' `memory_mb` add up to {mb} MiB, over the {max} MiB one app may \
         have on this cluster; the operator raises the cap with `--app-memory-mb-max`"
    )]
    Memory {
        /// The app.
        app: AppName,
        /// What its grains ask for together.
        mb: u64,
        /// The cap.
        max: u64,
    },
}

impl Policy {
    /// Checks everything the app asks of the host.
    pub fn check(&self, manifest: &Manifest) -> Result<(), PolicyError> {
        let has_python = manifest
            .grains
            .values()
            .any(|g| g.code.runtime() == crate::Runtime::Python);
        if has_python || manifest.python.is_some() {
            self.python(manifest)?;
        }
        if manifest.network && !self.network_apps.contains(&manifest.name) {
            return Err(PolicyError::Network {
                app: manifest.name.clone(),
            });
        }
        let mb = manifest.memory_bytes().div_ceil(1 << 20);
        if mb > self.app_memory_mb_max {
            return Err(PolicyError::Memory {
                app: manifest.name.clone(),
                mb,
                max: self.app_memory_mb_max,
            });
        }
        Ok(())
    }

    /// The interpreter of the app's python grains: the one it names if allowed, else the
    /// first allowed.
    pub fn python<'a>(&'a self, manifest: &'a Manifest) -> Result<PythonChoice<'a>, PolicyError> {
        match &manifest.python {
            Some(Python::Bundled(path)) => Ok(PythonChoice::Bundled(path)),
            Some(Python::Host(path)) => self
                .interpreters
                .iter()
                .find(|i| i.path == *path)
                .map(PythonChoice::Host)
                .ok_or_else(|| PolicyError::Interpreter {
                    app: manifest.name.clone(),
                    path: path.clone(),
                    allowed: self.allowed(),
                }),
            None => self
                .interpreters
                .first()
                .map(PythonChoice::Host)
                .ok_or_else(|| PolicyError::NoInterpreter {
                    app: manifest.name.clone(),
                }),
        }
    }

    fn allowed(&self) -> String {
        if self.interpreters.is_empty() {
            return "none".into();
        }
        let paths: Vec<String> = self
            .interpreters
            .iter()
            .map(|i| i.path.display().to_string())
            .collect();
        paths.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(top: &str, grain: &str) -> Manifest {
        let text = format!(
            "name = \"app\"\nentry = \"g\"\n{top}\n[grains.g]\nruntime = \"python\"\n\
             module = \"g.py\"\nhandler = \"h\"\n{grain}"
        );
        Manifest::parse(&text, "sand.toml").expect("a valid manifest")
    }

    fn app() -> AppName {
        AppName::new("app").expect("a valid name")
    }

    #[test]
    fn the_default_allows_only_the_system_python_no_network_and_a_memory_cap() {
        let policy = Policy::default();
        let plain = manifest("", "");
        assert_eq!(policy.check(&plain), Ok(()));
        assert_eq!(
            policy.python(&plain),
            Ok(PythonChoice::Host(&policy.interpreters[0]))
        );
        assert_eq!(policy.interpreters[0].path, Path::new(PYTHON_DEFAULT));
        assert!(policy.interpreters[0].mounts.is_empty());
        assert_eq!(
            policy.check(&manifest("python = \"/usr/bin/python3\"", "")),
            Ok(())
        );
        for python in [
            "/srv/sand/worker-1/apps/other/x/python",
            "/usr/bin/../bin/python3",
        ] {
            let err = policy
                .check(&manifest(&format!("python = {python:?}"), ""))
                .expect_err(python);
            assert_eq!(
                err,
                PolicyError::Interpreter {
                    app: app(),
                    path: python.into(),
                    allowed: PYTHON_DEFAULT.into()
                }
            );
            assert!(err.to_string().contains("--python PATH"), "{err}");
        }
        let err = policy
            .check(&manifest("network = true", ""))
            .expect_err("network");
        assert_eq!(err, PolicyError::Network { app: app() });
        assert!(err.to_string().contains("--allow-network app"), "{err}");
        let err = policy
            .check(&manifest("", "memory_mb = 5000"))
            .expect_err("memory");
        assert_eq!(
            err,
            PolicyError::Memory {
                app: app(),
                mb: 5000,
                max: APP_MEMORY_MB_MAX_DEFAULT
            }
        );
        assert_eq!(policy.check(&manifest("", "memory_mb = 4096")), Ok(()));
    }

    #[test]
    fn what_the_operator_allows_is_allowed_with_the_mounts_the_operator_named() {
        let pyenv: Interpreter = "/opt/py/3.11/bin/python3=/opt/py/3.11"
            .parse()
            .expect("an interpreter");
        assert_eq!(pyenv.mounts, vec![PathBuf::from("/opt/py/3.11")]);
        let policy = Policy {
            interpreters: vec![pyenv.clone()],
            network_apps: [app()].into(),
            app_memory_mb_max: 8192,
        };
        let m = manifest(
            "python = \"/opt/py/3.11/bin/python3\"\nnetwork = true",
            "memory_mb = 5000",
        );
        assert_eq!(policy.check(&m), Ok(()));
        assert_eq!(policy.python(&m), Ok(PythonChoice::Host(&pyenv)));
        // The first interpreter allowed is the default; the system one is no longer allowed.
        assert_eq!(
            policy.python(&manifest("", "")),
            Ok(PythonChoice::Host(&pyenv))
        );
        assert!(policy
            .check(&manifest("python = \"/usr/bin/python3\"", ""))
            .is_err());
    }

    #[test]
    fn an_interpreter_in_the_bundle_needs_no_permission_and_no_mount() {
        let policy = Policy {
            interpreters: Vec::new(),
            ..Policy::default()
        };
        let m = manifest("python = \"py/bin/python3\"", "");
        assert_eq!(policy.check(&m), Ok(()));
        assert_eq!(
            policy.python(&m),
            Ok(PythonChoice::Bundled(Path::new("py/bin/python3")))
        );
        assert_eq!(
            policy.check(&manifest("", "")),
            Err(PolicyError::NoInterpreter { app: app() })
        );
    }

    #[test]
    fn an_operators_interpreter_must_be_absolute_and_mount_no_root() {
        for bad in [
            "python3",
            "/a/../python3",
            "/usr/bin/python3=/",
            "/x/python=rel",
        ] {
            assert!(bad.parse::<Interpreter>().is_err(), "{bad} accepted");
        }
        let plain: Interpreter = "/usr/bin/python3".parse().expect("plain");
        assert!(plain.mounts.is_empty());
    }
}
