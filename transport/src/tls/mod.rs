//! Mutual TLS for the real transports: the cluster's certificates ([`certs`]) and the rustls
//! configurations that QUIC and TCP both use.
//!
//! Both sides speak TLS 1.3 only, with ALPN [`ALPN`]. The gateway requires a client
//! certificate signed by the cluster CA that names exactly one worker; a worker trusts only a
//! gateway certificate signed by the cluster CA for the name it dials. Every refusal logs a
//! `WARN` line that says why in words an operator can act on.

pub mod certs;

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tracing::warn;

use crate::config::TransportError;
use certs::NodeIdentity;

/// The ALPN protocol name both sides require: a client speaking anything else is refused.
pub const ALPN: &[u8] = b"sand/1";

/// Where and as whom a worker dials the gateway, whatever the transport.
#[derive(Debug, Clone, Copy)]
pub struct Dial<'a> {
    /// The gateway's address.
    pub gateway: SocketAddr,
    /// The name the gateway's certificate carries: a DNS name or IP address it was issued for.
    pub server_name: &'a str,
    /// The worker's certificate and key, and the cluster CA it trusts.
    pub identity: &'a NodeIdentity,
}

impl Dial<'_> {
    /// The server name as TLS checks it; refused if it is not a DNS name or IP address.
    pub fn checked_name(&self) -> Result<ServerName<'static>, TransportError> {
        ServerName::try_from(self.server_name.to_string())
            .map_err(|_| TransportError::ServerName(self.server_name.to_string()))
    }
}

/// The gateway's TLS configuration: its certificate, TLS 1.3 with ALPN [`ALPN`], and client
/// certificates required, signed by the cluster CA and naming a worker.
pub fn server_config(identity: &NodeIdentity) -> Result<rustls::ServerConfig, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner =
        WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider.clone()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(Explained { inner }))
        .with_single_cert(identity.chain().to_vec(), identity.key().clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// A worker's TLS configuration: it presents its certificate and trusts only a gateway
/// certificate signed by the cluster CA.
pub fn client_config(identity: &NodeIdentity) -> Result<rustls::ClientConfig, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(roots(identity)?, provider.clone())
        .build()
        .map_err(|e| TransportError::Crypto(e.to_string()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Explained { inner }))
        .with_client_auth_cert(identity.chain().to_vec(), identity.key().clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

fn roots(identity: &NodeIdentity) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca().clone())?;
    Ok(Arc::new(roots))
}

/// A webpki verifier of either side, which also says why it refused a certificate, and on the
/// gateway's side refuses a client certificate that does not name exactly one worker, so that
/// such a peer is turned away in the handshake rather than after it.
#[derive(Debug)]
struct Explained<V: ?Sized> {
    inner: Arc<V>,
}

/// The signature checks, handed to the webpki verifier inside unchanged.
macro_rules! signatures_of_inner {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

impl<V: ClientCertVerifier + ?Sized> ClientCertVerifier for Explained<V> {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let claimed = certs::worker_id_of(end_entity).ok();
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .and_then(|verified| match claimed {
                Some(_) => Ok(verified),
                None => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    rustls::OtherError(Arc::new(certs::CertError::NoWorkerName)),
                ))),
            });
        if let Err(e) = &verified {
            warn!(worker = ?claimed, reason = %explain(e), "refused a worker's certificate");
        }
        verified
    }

    signatures_of_inner!();
}

impl<V: ServerCertVerifier + ?Sized> ServerCertVerifier for Explained<V> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(e) = &verified {
            warn!(gateway = ?server_name, reason = %explain(e), "refused the gateway's certificate");
        }
        verified
    }

    signatures_of_inner!();
}

/// What a certificate refusal means for whoever runs the cluster.
fn explain(e: &rustls::Error) -> String {
    let what = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            // Every sand CA has the same subject name: another cluster's certificate finds an
            // issuer by name and fails on its signature.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "it was not signed by this cluster's CA"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "it has expired; issue a new one with `sand cert issue`"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "it is not valid yet; check the clocks"
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "it is not meant for this role (a gateway certificate used by a worker, or the \
                 reverse)"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "it does not name the address dialled; issue it with that name"
            }
            CertificateError::Other(_) => "it names no sand worker",
            _ => "it is not valid",
        },
        _ => "the handshake failed",
    };
    format!("{what} ({e})")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use certs::{ClusterCa, Validity};
    use rcgen::{ExtendedKeyUsagePurpose, SanType};
    use sand_protocol::ids::WorkerId;

    fn verifier(ca: &ClusterCa) -> Explained<dyn ClientCertVerifier> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert().clone()).unwrap();
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        Explained { inner }
    }

    fn client_cert(ca: &ClusterCa, names: &[&str]) -> CertificateDer<'static> {
        let sans = names
            .iter()
            .map(|n| SanType::DnsName(n.to_string().try_into().unwrap()))
            .collect();
        let issued = ca
            .issue(
                "someone",
                sans,
                ExtendedKeyUsagePurpose::ClientAuth,
                Validity::days_from_now(1),
            )
            .unwrap();
        issued.identity.chain()[0].clone()
    }

    #[test]
    fn client_certificates_must_name_exactly_one_worker() {
        let ca = ClusterCa::generate(Validity::days_from_now(1)).unwrap();
        let v = verifier(&ca);
        let now = UnixTime::now();
        let worker = ca
            .issue_worker(WorkerId(3), Validity::days_from_now(1))
            .unwrap();
        assert!(v.verify_client_cert(&worker.chain()[0], &[], now).is_ok());
        for names in [
            &["someone"][..],
            &["sand-worker-01"],
            &["sand-worker-1", "sand-worker-2"],
        ] {
            let err = v
                .verify_client_cert(&client_cert(&ca, names), &[], now)
                .unwrap_err();
            assert!(
                explain(&err).contains("names no sand worker"),
                "{names:?}: {err}"
            );
        }
    }
}
