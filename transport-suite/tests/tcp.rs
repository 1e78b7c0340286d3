//! TCP with TLS 1.3 on 127.0.0.1: the whole suite, refusals of bare TLS peers included, and
//! the keep-alives that stand in for QUIC's. TCP carries no close codes: each refusal is
//! checked by the connection ending and by the gateway's warning, which says why.

use std::time::Duration;

use sand_protocol::ids::WorkerId;
use sand_transport::seam::GatewayEvent;
use sand_transport_suite::common::*;
use sand_transport_suite::raw::{closed, RawPeers};
use sand_transport_suite::suite::Arena;
use sand_transport_suite::Tcp;

sand_transport_suite::suite!(Tcp; real);

/// A silent peer is dropped after the idle timeout; a live one is kept by keep-alives.
#[tokio::test]
async fn a_silent_peer_is_dropped_and_an_idle_one_is_kept() {
    bounded(async {
        let mut arena = Arena::<Tcp>::new().await;
        let mut stream = Tcp::raw_worker(&arena, 75).await;
        Tcp::greet(&mut stream).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(75))
        );
        // Nothing more from this peer: dropped after `idle_timeout` (2 s in these settings),
        // while the good worker, as idle, stays connected.
        closed(&mut stream).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(75))
        );
        arena
            .logs
            .wait_for_warning(&["the worker's connection broke", "w75", "nothing heard"])
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        arena.check_unharmed().await;
    })
    .await
}
