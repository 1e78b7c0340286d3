//! One app on this worker: its unpacked bundle, its sandbox, and a runner per grain.
//!
//! An [`AppHost`] is made on the app's first call here, from the bundle the gateway ships, once
//! the worker's own [`Policy`] allows what the app asks for (the gateway checked it at deploy;
//! this worker may allow less). The sandbox mounts what the policy says, never what the
//! manifest names, and shows grains no host path of the worker's data directory.
//! Zygotes start on their grain's first call and are restarted when found dead. The driver
//! retires a host when the app changes or sits idle; [`AppHost::shutdown`] stops every zygote
//! and destroys the sandbox.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sand_app::{Code, Manifest, Policy, PythonChoice};
use sand_protocol::ids::{AppName, GrainName};
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::{CallSpec, ErrorKind, GrainError};
use sand_sandbox::{Limits, ReadOnlyPath, RunAs, Sandbox, SandboxConfig};
use tokio::sync::{mpsc, watch, Mutex};

use crate::runtime::exec::{ExecGrain, ExecSpec};
use crate::runtime::launch::{
    BoxFuture, Exit, HostLauncher, LaunchedProcess, Launcher, ProcessSpec,
};
use crate::runtime::zygote::{Zygote, ZygoteRuntime, ZygoteSpec};
use crate::runtime::{CallReport, CallRequest};

/// Where an app's bundle appears inside its sandbox.
pub const SANDBOX_APP_DIR: &str = "/app";
/// Where the Python runtime's directory appears inside a sandbox: a fixed place, so grains do
/// not learn where the worker keeps its data.
pub const SANDBOX_RUNTIME_DIR: &str = "/sand/runtime";

/// How grains are isolated on this worker.
#[derive(Clone, Debug)]
pub enum Isolation {
    /// One sandbox per app (namespaces and a cgroup), its holder started as `program args`.
    Sandbox {
        /// The holder program (the `sand` binary).
        program: PathBuf,
        /// Its arguments (the hidden subcommand).
        args: Vec<OsString>,
    },
    /// Grains run as plain processes on the host, for machines without namespaces.
    None,
}

/// What every app host of a worker shares.
#[derive(Clone, Debug)]
pub struct HostContext {
    /// How to isolate apps.
    pub isolation: Isolation,
    /// Where the Python runtime script is installed (its directory is mounted read-only into
    /// sandboxes at [`SANDBOX_RUNTIME_DIR`]).
    pub python_runtime: PathBuf,
    /// What apps may ask of this worker.
    pub policy: Policy,
    /// Start sandboxes even where their cgroup limits cannot be enforced (the operator's
    /// `--allow-unlimited`); otherwise such an app fails to start with the reason.
    pub allow_unlimited: bool,
}

/// Runs one grain's calls.
enum Runner {
    Zygote(Zygote),
    Exec(ExecGrain),
}

impl Runner {
    async fn call(&self, request: CallRequest) -> CallReport {
        match self {
            Runner::Zygote(z) => z.call(request).await,
            Runner::Exec(e) => e.call(request).await,
        }
    }

    async fn stop(&self) {
        if let Runner::Zygote(z) = self {
            z.stop().await;
        }
    }
}

/// One deployed app, ready to run its grains here.
pub struct AppHost {
    manifest: Manifest,
    digest: String,
    launcher: Arc<dyn Launcher>,
    sandbox: Option<Arc<Sandbox>>,
    /// The app directory as grains see it.
    app_dir: PathBuf,
    /// The interpreter of the app's python grains as they see it, if it has any.
    python: Option<PathBuf>,
    /// The Python runtime script as grains see it.
    python_runtime: PathBuf,
    runners: Mutex<HashMap<GrainName, Arc<Runner>>>,
    /// How many of the sandbox's out-of-memory kills have been blamed on a call.
    oom_blamed: AtomicU64,
    running: AtomicU64,
    last_used: std::sync::Mutex<Instant>,
}

impl AppHost {
    /// Starts hosting the app unpacked in `bundle_dir`, if the worker's policy allows what it
    /// asks for: makes its sandbox (unless isolation is off). Zygotes start later, at their
    /// grain's first call.
    pub async fn start(
        ctx: &HostContext,
        manifest: Manifest,
        digest: String,
        bundle_dir: &Path,
    ) -> Result<Self, String> {
        ctx.policy
            .check(&manifest)
            .map_err(|e| format!("refused by this worker's policy: {e}"))?;
        // After the check, only an app without python grains may have no interpreter.
        let python = ctx.policy.python(&manifest).ok();
        let (launcher, sandbox, app_dir): (Arc<dyn Launcher>, _, _) = match &ctx.isolation {
            Isolation::None => (Arc::new(HostLauncher), None, bundle_dir.to_owned()),
            Isolation::Sandbox { program, args } => {
                let mut ro_paths = vec![ReadOnlyPath {
                    host: runtime_dir(&ctx.python_runtime),
                    inside: SANDBOX_RUNTIME_DIR.into(),
                }];
                if let Some(PythonChoice::Host(interpreter)) = python {
                    ro_paths.extend(interpreter.mounts.iter().map(ReadOnlyPath::same));
                }
                let config = SandboxConfig {
                    name: manifest.name.as_str().replace('.', "-"),
                    bundle_dir: bundle_dir.to_owned(),
                    ro_paths,
                    // Processes, CPU and tmpfs: the sandbox defaults.
                    limits: Limits {
                        memory_bytes: manifest.memory_bytes(),
                        ..Limits::default()
                    },
                    allow_unlimited: ctx.allow_unlimited,
                    network: manifest.network,
                    init_program: program.clone(),
                    init_args: args.clone(),
                    run_as: RunAs::NOBODY,
                };
                let sandbox = Arc::new(
                    Sandbox::create(config)
                        .await
                        .map_err(|e| format!("cannot make the sandbox: {e}"))?,
                );
                let launcher = Arc::new(SandboxLauncher(sandbox.clone()));
                (
                    launcher as Arc<dyn Launcher>,
                    Some(sandbox),
                    PathBuf::from(SANDBOX_APP_DIR),
                )
            }
        };
        let python_runtime = match (&sandbox, ctx.python_runtime.file_name()) {
            (Some(_), Some(script)) => Path::new(SANDBOX_RUNTIME_DIR).join(script),
            _ => ctx.python_runtime.clone(),
        };
        let python = python.map(|choice| match choice {
            PythonChoice::Host(interpreter) => interpreter.path.clone(),
            PythonChoice::Bundled(path) => app_dir.join(path),
        });
        let oom_blamed = AtomicU64::new(sandbox.as_ref().map_or(0, |s| s.oom_kills()));
        Ok(Self {
            manifest,
            digest,
            launcher,
            oom_blamed,
            sandbox,
            app_dir,
            python,
            python_runtime,
            runners: Mutex::new(HashMap::new()),
            running: AtomicU64::new(0),
            last_used: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// The app this host runs.
    pub fn app(&self) -> &AppName {
        &self.manifest.name
    }

    /// The bundle version this host runs.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Calls running now.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    /// How long since a call last ended or began here.
    pub fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .map_or(Duration::ZERO, |t| t.elapsed())
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    /// Runs one attempt of a call and says how it went. Never fails: a grain that cannot run
    /// is a grain error.
    pub async fn run(&self, spec: &CallSpec) -> CallReport {
        self.running.fetch_add(1, Ordering::Relaxed);
        self.touch();
        let mut report = match self.runner(&spec.grain).await {
            Ok(runner) => {
                let timeout = self
                    .manifest
                    .grains
                    .get(&spec.grain)
                    .map(|g| Duration::from_millis(g.timeout_ms));
                runner
                    .call(CallRequest {
                        exec: spec.exec_ref.clone(),
                        call: spec.call,
                        attempt: spec.attempt,
                        trace: spec.traceparent.run(spec.call, spec.attempt).to_string(),
                        input: spec.input.clone(),
                        timeout,
                    })
                    .await
            }
            Err(error) => CallReport {
                result: GrainResult::Error(error),
                stdout: Default::default(),
                stderr: Default::default(),
                started: Instant::now(),
                finished: Instant::now(),
                cold: false,
                instance_exit: None,
            },
        };
        if report.killed_by_sigkill() && self.blame_oom_kill() {
            let limit = self
                .sandbox
                .as_ref()
                .and_then(|s| s.memory_limit())
                .map_or(String::new(), |b| format!(" of {} MiB", b >> 20));
            report.result = GrainResult::Error(GrainError::new(
                ErrorKind::OutOfMemory,
                format!("killed: out of memory (the app's limit{limit})"),
            ));
        }
        self.running.fetch_sub(1, Ordering::Relaxed);
        self.touch();
        report
    }

    /// Whether an instance that died of SIGKILL was killed for memory: true if the sandbox
    /// counts an out-of-memory kill not yet blamed on a call, which this call then takes. The
    /// counter is a cgroup file, read only when an instance died this way rather than twice on
    /// every call's path; each kill is blamed on at most one call.
    fn blame_oom_kill(&self) -> bool {
        let Some(sandbox) = &self.sandbox else {
            return false;
        };
        let kills = sandbox.oom_kills();
        self.oom_blamed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |blamed| {
                (kills > blamed).then_some(blamed + 1)
            })
            .is_ok()
    }

    /// The grain's runner, started at its first call.
    async fn runner(&self, grain: &GrainName) -> Result<Arc<Runner>, GrainError> {
        let mut runners = self.runners.lock().await;
        if let Some(r) = runners.get(grain) {
            return Ok(r.clone());
        }
        let g = self.manifest.grains.get(grain).ok_or_else(|| {
            GrainError::new(
                ErrorKind::Unavailable,
                format!("app {} has no grain {grain}", self.manifest.name),
            )
        })?;
        let env = vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("HOME".into(), "/tmp".into()),
        ];
        let runner = match &g.code {
            Code::Python { module, handler } => {
                // Checked at start: an app with python grains has an interpreter.
                let interpreter = self.python.clone().ok_or_else(|| {
                    GrainError::new(ErrorKind::Unavailable, "no python interpreter is allowed")
                })?;
                let runtime = ZygoteRuntime::Python {
                    interpreter,
                    runtime_script: self.python_runtime.clone(),
                    module: module.to_string_lossy().into_owned(),
                    handler: handler.clone(),
                };
                self.zygote(runtime, g, env).await?
            }
            Code::Rust { binary } => {
                let runtime = ZygoteRuntime::Rust {
                    binary: self.app_dir.join(binary),
                };
                self.zygote(runtime, g, env).await?
            }
            Code::Exec { binary } => Runner::Exec(ExecGrain::new(
                self.launcher.clone(),
                ExecSpec {
                    program: self.app_dir.join(binary),
                    app_dir: self.app_dir.clone(),
                    env,
                    concurrency: g.concurrency as usize,
                },
            )),
        };
        let runner = Arc::new(runner);
        runners.insert(grain.clone(), runner.clone());
        Ok(runner)
    }

    async fn zygote(
        &self,
        runtime: ZygoteRuntime,
        g: &sand_app::Grain,
        env: Vec<(OsString, OsString)>,
    ) -> Result<Runner, GrainError> {
        let mut spec = ZygoteSpec::new(runtime, self.app_dir.clone());
        spec.concurrency = g.concurrency as usize;
        spec.reuse = g.reuse;
        spec.env = env;
        Zygote::start(self.launcher.clone(), spec)
            .await
            .map(Runner::Zygote)
            .map_err(|e| GrainError::new(ErrorKind::Unavailable, e.to_string()))
    }

    /// Stops every zygote and destroys the sandbox.
    pub async fn shutdown(self) {
        let runners: Vec<Arc<Runner>> = self.runners.into_inner().into_values().collect();
        for r in &runners {
            r.stop().await;
        }
        drop(runners);
        drop(self.launcher);
        // Every holder of the sandbox is gone once the runners and the launcher are.
        match self.sandbox.map(Arc::try_unwrap) {
            Some(Ok(sandbox)) => {
                if let Err(e) = sandbox.destroy().await {
                    tracing::warn!(app = %self.manifest.name, "sandbox teardown: {e}");
                }
            }
            Some(Err(shared)) => drop(shared), // Dropping the last reference ends it too.
            None => {}
        }
    }
}

/// The directory holding the runtime script (mounted into sandboxes).
fn runtime_dir(script: &Path) -> PathBuf {
    script
        .parent()
        .map_or_else(|| script.to_owned(), Path::to_owned)
}

/// Starts processes in an app's sandbox. The channel and the standard streams travel to the
/// sandbox with the spawn request; a process given no streams has /dev/null for all three.
struct SandboxLauncher(Arc<Sandbox>);

impl Launcher for SandboxLauncher {
    fn spawn(&self, spec: ProcessSpec) -> BoxFuture<'_, std::io::Result<Box<dyn LaunchedProcess>>> {
        Box::pin(async move {
            let process = self.0.spawn(spec).await.map_err(std::io::Error::other)?;
            Ok(Box::new(SandboxProcess::watch(process)) as Box<dyn LaunchedProcess>)
        })
    }
}

/// A sandboxed process, owned by a task that waits for it and kills it on request.
struct SandboxProcess {
    kill: mpsc::UnboundedSender<()>,
    exit: watch::Receiver<Option<Exit>>,
}

impl SandboxProcess {
    fn watch(mut process: sand_sandbox::Process) -> Self {
        let (kill, mut kills) = mpsc::unbounded_channel();
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ended = process.wait() => {
                        let ended = match ended {
                            sand_sandbox::Exit::Exited(c) => Exit::Exited(c),
                            sand_sandbox::Exit::Signaled(s) => Exit::Signaled(s),
                            sand_sandbox::Exit::SandboxGone => Exit::Gone,
                        };
                        let _ = exit_tx.send(Some(ended));
                        return;
                    }
                    asked = kills.recv() => {
                        if asked.is_none() {
                            // The handle is gone: nobody can learn the exit, so end it.
                            let _ = process.kill().await;
                            return;
                        }
                        if let Err(e) = process.kill().await {
                            tracing::debug!("kill in sandbox: {e}");
                        }
                    }
                }
            }
        });
        Self { kill, exit }
    }
}

impl LaunchedProcess for SandboxProcess {
    fn kill(&self) -> std::io::Result<()> {
        self.kill
            .send(())
            .map_err(|_| std::io::Error::other("the process has ended"))
            .or(Ok(()))
    }

    fn wait(&self) -> BoxFuture<'_, Exit> {
        let mut exit = self.exit.clone();
        Box::pin(async move {
            match exit.wait_for(Option::is_some).await {
                Ok(e) => e.unwrap_or(Exit::Gone),
                Err(_) => Exit::Gone,
            }
        })
    }
}
