//! A worker's incarnation across restarts: saved before it is used, read back at the next start
//! and passed, and a file that cannot be read stops the worker at startup instead of letting it
//! start over as a fresh worker.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{bounded, TempDir};
use sand_app::Policy;
use sand_protocol::ids::{Incarnation, WorkerId};
use sand_protocol::local_bus::LbConfig;
use sand_protocol::wire::{ToGateway, Up};
use sand_transport::mem::MemNetwork;
use sand_transport::seam::GatewayEvent;
use sand_worker::driver::{self, WorkerConfig, WorkerError};
use sand_worker::host::{HostContext, Isolation};

const WORKER: WorkerId = WorkerId(1);

/// The file the worker keeps its incarnation in (pinned here: operators read and remove it).
const INCARNATION_FILE: &str = "incarnation";

fn config(data_dir: &Path) -> WorkerConfig {
    WorkerConfig {
        lb: LbConfig {
            worker: WORKER,
            ..LbConfig::default()
        },
        data_dir: data_dir.to_path_buf(),
        host: HostContext {
            isolation: Isolation::None,
            allow_unlimited: false,
            // No app is hosted here, so no runtime is needed.
            python_runtime: data_dir.join("no-runtime"),
            policy: Policy::default(),
        },
        idle_teardown: Duration::from_secs(600),
        trace_interval: Duration::from_secs(600),
    }
}

/// Starts a worker on `data_dir`, and returns the incarnation its `Hello` says once it stops.
async fn start(data_dir: &Path) -> Incarnation {
    let (net, mut gateway) = MemNetwork::new(16);
    let driver = tokio::spawn(driver::run(config(data_dir), net.add_worker(WORKER)));
    let incarnation = bounded(10, async {
        loop {
            let event = gateway.events.recv().await.expect("the network lives");
            if let GatewayEvent::Message(_, Up::Protocol(ToGateway::Hello { incarnation, .. })) =
                event
            {
                break incarnation;
            }
        }
    })
    .await;
    driver.abort();
    let _ = driver.await;
    incarnation
}

/// Starts a worker on `data_dir` that must refuse to start, and returns why.
async fn refused_start(data_dir: &Path) -> WorkerError {
    let (net, _gateway) = MemNetwork::new(16);
    let run = driver::run(config(data_dir), net.add_worker(WORKER));
    match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Err(e)) => e,
        Ok(Ok(())) => panic!("the worker ran and stopped"),
        Err(_) => panic!("the worker started on {}", data_dir.display()),
    }
}

fn saved(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join(INCARNATION_FILE)).expect("an incarnation file")
}

#[tokio::test]
async fn each_start_takes_an_incarnation_above_the_saved_one() {
    let dir = TempDir::new("incarnation");
    let data = dir.path().join("data");
    assert_eq!(start(&data).await, Incarnation(1), "a fresh worker");
    assert_eq!(saved(&data), "1");
    assert_eq!(start(&data).await, Incarnation(2), "read back, and passed");
    assert_eq!(saved(&data), "2");
    std::fs::write(data.join(INCARNATION_FILE), "41\n").expect("write");
    assert_eq!(start(&data).await, Incarnation(42));
    assert_eq!(saved(&data), "42");
    let mut names: Vec<String> = std::fs::read_dir(&data)
        .expect("read the data directory")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["apps", INCARNATION_FILE],
        "nothing is left of the saves but the file (beside the bundles' directory)"
    );
}

#[tokio::test]
async fn an_incarnation_file_that_cannot_be_read_stops_the_worker_at_startup() {
    let garbled: [&[u8]; 6] = [
        b"",
        b"garbage",
        b"-3",
        b"7 8",
        b"\xff\xfe1",
        // The last incarnation there is: no life is left after it.
        b"18446744073709551615",
    ];
    for content in garbled {
        let dir = TempDir::new("incarnation");
        let path = dir.path().join(INCARNATION_FILE);
        std::fs::write(&path, content).expect("write");
        let error = refused_start(dir.path()).await;
        assert!(
            matches!(error, WorkerError::Incarnation { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("remove"), "{message}");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            content,
            "left as it was"
        );
    }

    // A directory in its place cannot be read either.
    let dir = TempDir::new("incarnation");
    let path = dir.path().join(INCARNATION_FILE);
    std::fs::create_dir(&path).expect("mkdir");
    let error = refused_start(dir.path()).await;
    assert!(
        matches!(error, WorkerError::Incarnation { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("cannot be read"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
}
