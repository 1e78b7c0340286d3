//! Every app's sandbox is bounded, and a grain that tries to take the machine is contained: a
//! memory hog is that call's `OutOfMemory` error, a fork bomb that call's error, and the
//! worker, the same app and another app keep serving. The apps run in real sandboxes, so these
//! need root and cgroups (as on CI); they fail, not skip, without them.

mod common;

use std::path::PathBuf;

use common::{bounded, grain, TempDir};
use sand_app::{Manifest, Policy};
use sand_protocol::ids::{AppName, Attempt, CallId, ExecId};
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::{CallSpec, Cont, ErrorKind, Payload};
use sand_testkit::cgroups::assert_usable as assert_cgroups_usable;
use sand_worker::host::{AppHost, HostContext, Isolation};
use sand_worker::runtime::python::install_python_runtime;
use sand_worker::runtime::CallReport;

const GRAINS: &str = r#"
import os, time

def echo(event, ctx):
    return event

def hog(event, ctx):
    held = b"x" * (768 << 20)
    return len(held)

def bomb(event, ctx):
    while True:
        try:
            os.fork()  # parent and child both go round again
        except OSError:
            time.sleep(0.001)
"#;

/// An app `name` in its own sandbox, its grains as in `grains_toml`.
struct HostedApp {
    host: AppHost,
    _bundle: TempDir,
}

fn context(runtime: &TempDir) -> HostContext {
    HostContext {
        isolation: Isolation::Sandbox {
            program: PathBuf::from(env!("CARGO_BIN_EXE_sand-test-sandbox-init")),
            args: Vec::new(),
        },
        python_runtime: install_python_runtime(runtime.path()).expect("install the runtime"),
        allow_unlimited: false,
        policy: Policy::default(),
    }
}

async fn host(ctx: &HostContext, name: &str, grains_toml: &str) -> HostedApp {
    let bundle = TempDir::new(name);
    bundle.write("grains.py", GRAINS);
    bundle.write(
        "sand.toml",
        &format!("name = \"{name}\"\nentry = \"echo\"\n{grains_toml}"),
    );
    let manifest = Manifest::load(bundle.path()).expect("manifest");
    let host = AppHost::start(ctx, manifest, "digest".into(), bundle.path())
        .await
        .expect("the app's sandbox starts with its limits");
    HostedApp {
        host,
        _bundle: bundle,
    }
}

fn grain_toml(name: &str, extra: &str) -> String {
    format!(
        "[grains.{name}]\nruntime = \"python\"\nmodule = \"grains.py\"\nhandler = \"{name}\"\n{extra}\n"
    )
}

async fn call(app: &HostedApp, name: &str, grain_name: &str, input: &str) -> CallReport {
    app.host
        .run(&CallSpec {
            exec: ExecId(7),
            call: CallId(1),
            attempt: Attempt(1),
            app: AppName::new(name).expect("app name"),
            grain: grain(grain_name),
            input: Payload::from(input),
            cont: Cont::Client,
            depth_left: 16,
            exec_ref: String::new(),
            traceparent: Default::default(),
        })
        .await
}

fn assert_returns(report: &CallReport, expected: &str) {
    match &report.result {
        GrainResult::Return(p) => assert_eq!(p.0.as_ref(), expected.as_bytes()),
        other => panic!(
            "expected {expected}, got {other:?} (stderr {:?})",
            report.stderr
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_its_calls_out_of_memory_error_and_everyone_keeps_serving() {
    assert_cgroups_usable();
    bounded(60, async {
        let runtime = TempDir::new("limits-runtime");
        let ctx = context(&runtime);
        let hungry = host(
            &ctx,
            "hungry",
            // No memory_mb: the default of 128 MiB a grain counts for, 256 MiB for the app.
            &(grain_toml("echo", "") + &grain_toml("hog", "")),
        )
        .await;
        let other = host(&ctx, "other", &grain_toml("echo", "")).await;

        let report = call(&hungry, "hungry", "hog", "1").await;
        match &report.result {
            GrainResult::Error(e) => assert_eq!(e.kind, ErrorKind::OutOfMemory, "{e:?}"),
            other => panic!("the hog was not stopped: {other:?}"),
        }
        assert_returns(&call(&hungry, "hungry", "echo", "2").await, "2");
        assert_returns(&call(&other, "other", "echo", "3").await, "3");
        hungry.host.shutdown().await;
        other.host.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_its_calls_error_and_another_app_keeps_serving() {
    assert_cgroups_usable();
    bounded(90, async {
        let runtime = TempDir::new("limits-runtime");
        let ctx = context(&runtime);
        let bombed = host(
            &ctx,
            "bombed",
            &(grain_toml("echo", "") + &grain_toml("bomb", "timeout_ms = 3000")),
        )
        .await;
        let other = host(&ctx, "other", &grain_toml("echo", "")).await;

        let report = call(&bombed, "bombed", "bomb", "1").await;
        assert!(
            matches!(report.result, GrainResult::Error(_)),
            "the bomb's call is a grain error: {:?}",
            report.result
        );
        // The bomb's processes live on in their sandbox, bounded by its pids, CPU and memory
        // limits; the other app's calls still run.
        for n in 0..3 {
            assert_returns(
                &call(&other, "other", "echo", &n.to_string()).await,
                &n.to_string(),
            );
        }
        bombed.host.shutdown().await;
        other.host.shutdown().await;
    })
    .await;
}
