//! The HTTP API's connections: bounded in number, headers read within a deadline, optionally
//! over TLS.
//!
//! A client that opens connections and sends half a request each would otherwise hold them
//! for ever and starve everyone else. Two bounds stop it:
//! - at most [`Limits::max_connections`] connections are open at once; the accept loop takes no
//!   more until one closes, so the excess waits in the kernel's backlog (a semaphore on
//!   accepted connections: a limit on requests, as tower's `ConcurrencyLimitLayer` sets, would
//!   not count idle or half-sent connections, which are the attack);
//! - a connection whose request head (or TLS handshake) is not complete within
//!   [`Limits::header_timeout`] is closed (hyper's `header_read_timeout`; it also closes a
//!   keep-alive connection idle that long between requests);
//! - a request whose body has not all arrived within [`Limits::body_timeout`] of its head fails
//!   (the handler reading it gets an error, the client a 400, and hyper closes the connection,
//!   whose body was not read to its end), so trickling a body holds no connection for long.
//!
//! axum's `serve` sets neither (it gives hyper no timer, so hyper's header timeout never fires);
//! hence this loop, which serves the same router.

use std::future::Future as _;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::Router;
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;

/// At most this many HTTP connections at once, by default (well under the usual limit of
/// 1,024 open files, which the store and QUIC share).
pub const MAX_CONNECTIONS_DEFAULT: usize = 512;
/// A request head (and a TLS handshake) must arrive within this time, by default.
pub const HEADER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// A request body must arrive within this time of its head, by default (a bundle of the
/// largest size at about 2 MB/s).
pub const BODY_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// How many connections the server holds and how long it waits for a request's head and body.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more wait to be accepted.
    pub max_connections: usize,
    /// The longest a connection may take to send a request head (or finish its TLS
    /// handshake), and the longest it may stay idle between requests.
    pub header_timeout: Duration,
    /// The longest a request's body may take to arrive, from its head.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS_DEFAULT,
            header_timeout: HEADER_TIMEOUT_DEFAULT,
            body_timeout: BODY_TIMEOUT_DEFAULT,
        }
    }
}

/// A request body that fails once its deadline has passed before it ended.
struct Deadline {
    body: Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            let why = format!(
                "the request body did not arrive within {} ms of its head",
                self.timeout.as_millis()
            );
            return Poll::Ready(Some(Err(axum::Error::new(why))));
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Gives a request's body its deadline, counted from now (its head has arrived).
async fn body_deadline(State(timeout): State<Duration>, req: Request) -> Request {
    req.map(|body| {
        Body::new(Deadline {
            body,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        })
    })
}

/// Why the TLS certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use {} for the HTTP API's TLS: {why}", path.display())]
pub struct TlsError {
    path: std::path::PathBuf,
    why: String,
}

/// A TLS server configuration from a PEM certificate chain and a PEM private key.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let fail = |path: &Path| {
        let path = path.to_owned();
        move |e: &dyn std::fmt::Display| TlsError {
            path: path.clone(),
            why: e.to_string(),
        }
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(cert)(&e))?;
    if chain.is_empty() {
        return Err(fail(cert)(&"no certificate in it"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| fail(key)(&e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key_der))
        .map_err(|e| fail(key)(&e))?;
    Ok(Arc::new(config))
}

/// Serves `app` on `listener` within `limits`, over TLS if `tls` is given; never returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::convert::Infallible {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let app = app.layer(axum::middleware::map_request_with_state(
        limits.body_timeout,
        body_deadline,
    ));
    let tls = tls.map(TlsAcceptor::from);
    loop {
        let permit =
            (permits.clone().acquire_owned().await).expect("the semaphore is never closed");
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or similar: wait rather than spin; a peer that
                // reset its connection before it was accepted costs nothing.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = TowerToHyperService::new(app);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let served = match tls {
                None => http.serve_connection(TokioIo::new(tcp), service).await,
                Some(tls) => {
                    let handshake = tokio::time::timeout(limits.header_timeout, tls.accept(tcp));
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            http.serve_connection(TokioIo::new(stream), service).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake too slow");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}
