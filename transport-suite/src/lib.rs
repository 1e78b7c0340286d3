//! One test suite for every sand transport: the same checks of the seam's contract run against
//! QUIC, TCP with TLS, and the in-memory transport, each behind a small [`TestTransport`].
//!
//! - [`common`]: a cluster PKI, fast settings, message makers, bounded waits, log capture.
//! - [`suite`]: the checks, generic over the transport. `tests/quic.rs`, `tests/tcp.rs` and
//!   `tests/mem.rs` instantiate them with [`suite!`], and add what only one transport has (raw
//!   peers that break the framing, QUIC's streams).
//!
//! The in-memory transport runs the checks that are not about TLS or sockets: it has no
//! certificates and no addresses, and its reconnections are played by [`Mem`] the way the
//! worker's reconnection loop plays them for a real transport.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

pub mod common;
pub mod raw;
pub mod suite;

use std::net::SocketAddr;
use std::time::Duration;

use sand_protocol::ids::WorkerId;
use sand_transport::config::{LinkConfig, TransportError};
use sand_transport::mem::MemNetwork;
use sand_transport::seam::{GatewayLink, WorkerLink};
use sand_transport::tls::certs::{self, NodeIdentity};
use sand_transport::tls::Dial;
use sand_transport_quic::{QuicGateway, QuicWorker};
use sand_transport_tcp::{TcpGateway, TcpWorker};
use tokio::task::JoinHandle;

use common::Pki;

/// Makes `#[tokio::test]`s of the checks in [`suite`] and [`raw`] for transport `$t`: every
/// check for a real transport (`suite!(T; real)`), or those listed under `current` on a
/// current-thread runtime, under `multi` on four threads, and under `raw` (refusals of bare
/// peers, for a [`raw::RawPeers`] transport).
#[macro_export]
macro_rules! suite {
    ($t:ty; real) => {
        $crate::suite!($t;
            current: [
                messages_round_trip_in_order_per_stream,
                a_broken_connection_is_reopened_and_the_layer_above_resends,
                a_worker_reconnects_to_a_restarted_gateway,
                a_newer_connection_of_a_worker_replaces_the_older,
                an_overflowing_send_queue_closes_the_connection_instead_of_dropping_a_message,
                large_messages_fit_and_oversize_ones_are_refused_at_send,
                a_worker_of_another_cluster_is_refused,
                an_expired_worker_certificate_is_refused,
                a_certificate_that_names_no_worker_is_refused,
                shutting_down_leaves_no_connection_and_no_task,
                a_stopped_worker_ends_its_event_stream,
            ];
            multi: [no_message_of_an_old_connection_follows_the_new_ones_connected];
            raw: [
                a_peer_without_a_client_certificate_is_refused,
                an_oversize_frame_closes_the_connection_before_its_body_is_read,
                garbage_bytes_close_the_connection,
                a_worker_of_an_older_wire_version_is_told_which_version_the_gateway_speaks,
                handshakes_past_the_cap_are_refused_at_once,
            ];
        );
    };
    ($t:ty; current: [$($current:ident),* $(,)?]; multi: [$($multi:ident),* $(,)?]
     $(; raw: [$($raw:ident),* $(,)?])? $(;)?) => {
        $(
            #[tokio::test]
            async fn $current() {
                $crate::suite::$current::<$t>().await
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $multi() {
                $crate::suite::$multi::<$t>().await
            }
        )*
        $($(
            #[tokio::test]
            async fn $raw() {
                $crate::raw::$raw::<$t>().await
            }
        )*)?
    };
}

/// What the suite needs of a transport: its two endpoints, and the handles tests pull.
pub trait TestTransport: 'static {
    /// The gateway's endpoint.
    type Gateway: Send + Sync + 'static;
    /// A worker's endpoint.
    type Worker: Send + 'static;

    /// Starts a gateway listening on `addr`.
    fn bind(
        pki: &Pki,
        addr: SocketAddr,
        config: LinkConfig,
    ) -> Result<(Self::Gateway, GatewayLink), TransportError>;
    /// Starts a worker with `identity`, dialing `gateway` as `localhost`.
    fn start_worker(
        gateway: &Self::Gateway,
        identity: &NodeIdentity,
        config: LinkConfig,
    ) -> (Self::Worker, WorkerLink);
    /// The gateway's address.
    fn local_addr(gateway: &Self::Gateway) -> SocketAddr;
    /// The workers connected now, in id order.
    fn connected_workers(gateway: &Self::Gateway) -> Vec<WorkerId>;
    /// Closes a worker's connection from the gateway's side.
    fn disconnect(gateway: &Self::Gateway, worker: WorkerId) -> bool;
    /// Connections open now, including ones in their handshake.
    fn open_connections(gateway: &Self::Gateway) -> usize;
    /// The gateway's connection tasks alive now.
    fn live_tasks(gateway: &Self::Gateway) -> usize;
    /// Drops the worker's connection, as a network fault would.
    fn reconnect(worker: &Self::Worker) -> bool;
    /// The worker's connection tasks alive now.
    fn worker_live_tasks(worker: &Self::Worker) -> usize;
    /// Stops a worker and waits until the gateway can know.
    fn shutdown_worker(worker: Self::Worker) -> impl std::future::Future<Output = ()> + Send;
    /// Stops the gateway.
    fn shutdown_gateway(gateway: Self::Gateway) -> impl std::future::Future<Output = ()> + Send;
}

/// Implements [`TestTransport`] for a real transport, whose endpoints dereference to
/// [`GatewayEnd`](sand_transport::peers::GatewayEnd) and
/// [`WorkerEnd`](sand_transport::peers::WorkerEnd).
macro_rules! real_transport {
    ($(#[$doc:meta])* $name:ident, $gateway:ty, $worker:ty) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;

        impl TestTransport for $name {
            type Gateway = $gateway;
            type Worker = $worker;

            fn bind(
                pki: &Pki,
                addr: SocketAddr,
                config: LinkConfig,
            ) -> Result<($gateway, GatewayLink), TransportError> {
                <$gateway>::bind(addr, &pki.gateway, config)
            }
            fn start_worker(
                gateway: &$gateway,
                identity: &NodeIdentity,
                config: LinkConfig,
            ) -> ($worker, WorkerLink) {
                let dial = Dial {
                    gateway: gateway.local_addr(),
                    server_name: "localhost",
                    identity,
                };
                <$worker>::start(dial, config).unwrap()
            }
            fn local_addr(gateway: &$gateway) -> SocketAddr {
                gateway.local_addr()
            }
            fn connected_workers(gateway: &$gateway) -> Vec<WorkerId> {
                gateway.connected_workers()
            }
            fn disconnect(gateway: &$gateway, worker: WorkerId) -> bool {
                gateway.disconnect(worker)
            }
            fn open_connections(gateway: &$gateway) -> usize {
                gateway.open_connections()
            }
            fn live_tasks(gateway: &$gateway) -> usize {
                gateway.live_tasks()
            }
            fn reconnect(worker: &$worker) -> bool {
                worker.reconnect()
            }
            fn worker_live_tasks(worker: &$worker) -> usize {
                worker.live_tasks()
            }
            async fn shutdown_worker(worker: $worker) {
                worker.shutdown().await
            }
            async fn shutdown_gateway(gateway: $gateway) {
                gateway.shutdown().await
            }
        }
    };
}

real_transport!(
    /// QUIC (`sand-transport-quic`).
    Quic,
    QuicGateway,
    QuicWorker
);
real_transport!(
    /// TCP with TLS 1.3 (`sand-transport-tcp`).
    Tcp,
    TcpGateway,
    TcpWorker
);

/// The in-memory transport ([`MemNetwork`]). A worker is known by the id its certificate
/// names; a task per worker plays its reconnection loop, restoring a broken link after
/// `reconnect_delay_min`.
#[derive(Debug)]
pub struct Mem;

/// A worker of the in-memory network, with the task that reconnects it.
#[derive(Debug)]
pub struct MemWorker {
    net: MemNetwork,
    id: WorkerId,
    reconnecting: JoinHandle<()>,
}

impl Drop for MemWorker {
    fn drop(&mut self) {
        self.reconnecting.abort();
    }
}

impl TestTransport for Mem {
    type Gateway = MemNetwork;
    type Worker = MemWorker;

    fn bind(
        _: &Pki,
        _: SocketAddr,
        config: LinkConfig,
    ) -> Result<(MemNetwork, GatewayLink), TransportError> {
        config.validate()?;
        Ok(MemNetwork::new(config.recv_queue_len_max))
    }
    fn start_worker(
        net: &MemNetwork,
        identity: &NodeIdentity,
        config: LinkConfig,
    ) -> (MemWorker, WorkerLink) {
        let id = certs::worker_id_of(&identity.chain()[0]).unwrap();
        let link = net.add_worker(id);
        let reconnecting =
            tokio::spawn(reconnect_loop(net.clone(), id, config.reconnect_delay_min));
        let worker = MemWorker {
            net: net.clone(),
            id,
            reconnecting,
        };
        (worker, link)
    }
    fn local_addr(_: &MemNetwork) -> SocketAddr {
        common::localhost()
    }
    fn connected_workers(net: &MemNetwork) -> Vec<WorkerId> {
        net.connected_workers()
    }
    fn disconnect(net: &MemNetwork, worker: WorkerId) -> bool {
        net.break_link(worker)
    }
    fn open_connections(net: &MemNetwork) -> usize {
        net.connected_workers().len()
    }
    fn live_tasks(_: &MemNetwork) -> usize {
        0
    }
    fn reconnect(worker: &MemWorker) -> bool {
        worker.net.break_link(worker.id)
    }
    fn worker_live_tasks(_: &MemWorker) -> usize {
        0
    }
    async fn shutdown_worker(worker: MemWorker) {
        worker.reconnecting.abort();
        worker.net.break_link(worker.id);
    }
    async fn shutdown_gateway(_: MemNetwork) {}
}

/// Restores worker `id`'s link `delay` after it is seen broken.
async fn reconnect_loop(net: MemNetwork, id: WorkerId, delay: Duration) {
    loop {
        while net.is_connected(id) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(delay).await;
        net.connect(id);
    }
}
