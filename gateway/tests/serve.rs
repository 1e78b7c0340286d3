//! The HTTP server against slow clients: connections that send half a request head, or half a
//! body, are cut after their deadline, connections over the limit wait, and an established
//! client is served meanwhile.

#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::{get, post};
use axum::Router;
use sand_gateway::serve::{serve, Limits};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
const HALF_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: local";

/// A server on loopback with `limits`, in a runtime of its own on another thread.
fn server(limits: Limits) -> (SocketAddr, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/echo", post(|body: Bytes| async move { body }));
    rt.spawn(serve(listener, app, limits, None));
    (addr, rt)
}

/// Reads one answer to [`REQUEST`] (the body is "ok"), or `None` if none comes within `wait`.
fn answer(tcp: &mut TcpStream, wait: Duration) -> Option<String> {
    tcp.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0; 1024];
    while !got.ends_with(b"\r\n\r\nok") {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// Whether the server closes `tcp` within `wait` (its answer, if any, is a 408).
fn cut(tcp: &mut TcpStream, wait: Duration) -> bool {
    tcp.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    match tcp.read_to_end(&mut got) {
        Ok(_) => got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn half_sent_requests_are_cut_and_the_connection_limit_holds() {
    let timeout = Duration::from_secs(1);
    let (addr, _rt) = server(Limits {
        max_connections: 3,
        header_timeout: timeout,
        ..Limits::default()
    });
    // An established client, then two that send half a request: the limit is reached.
    let mut established = TcpStream::connect(addr).unwrap();
    established.write_all(REQUEST).unwrap();
    assert!(answer(&mut established, Duration::from_secs(5)).is_some());
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut tcp = TcpStream::connect(addr).unwrap();
            tcp.write_all(HALF_REQUEST).unwrap();
            tcp
        })
        .collect();
    // One more waits to be accepted: it is not served while the limit is reached...
    let mut waiting = TcpStream::connect(addr).unwrap();
    waiting.write_all(REQUEST).unwrap();
    assert_eq!(answer(&mut waiting, Duration::from_millis(300)), None);
    // ...while the established client still is.
    established.write_all(REQUEST).unwrap();
    assert!(
        answer(&mut established, Duration::from_secs(5)).is_some(),
        "an established client was not served at the limit"
    );
    drop(established);
    // The half-sent requests are cut after the deadline, not before.
    for tcp in &mut slow {
        assert!(
            cut(tcp, Duration::from_secs(10)),
            "a half-sent request was kept"
        );
    }
    assert!(started.elapsed() >= timeout, "cut before the deadline");
    // The waiting client is served once connections close.
    assert!(
        answer(&mut waiting, Duration::from_secs(10)).is_some(),
        "the waiting client was never served"
    );
}

#[test]
fn a_body_trickled_past_its_deadline_is_refused_and_its_connection_cut() {
    let timeout = Duration::from_secs(1);
    let (addr, _rt) = server(Limits {
        body_timeout: timeout,
        ..Limits::default()
    });
    let head = b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\n";
    // A whole body is served.
    let mut whole = TcpStream::connect(addr).unwrap();
    whole.write_all(head).unwrap();
    whole.write_all(b"ping").unwrap();
    whole
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = [0; 1024];
    let n = whole.read(&mut got).unwrap();
    let got = String::from_utf8_lossy(&got[..n]);
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("ping"),
        "{got}"
    );
    // Half a body, and then nothing: refused once the deadline passes, and the connection
    // closed, so it holds nothing.
    let started = Instant::now();
    let mut trickle = TcpStream::connect(addr).unwrap();
    trickle.write_all(head).unwrap();
    trickle.write_all(b"pi").unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = trickle.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.contains("did not arrive within 1000 ms"), "{answer}");
    let waited = started.elapsed();
    assert!(waited >= timeout, "refused before the deadline: {waited:?}");
    assert!(waited < Duration::from_secs(9), "kept for {waited:?}");
}
