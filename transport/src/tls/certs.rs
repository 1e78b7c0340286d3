//! The cluster's certificate authority, and the certificates it gives the gateway and workers.
//!
//! Every node of a cluster trusts one CA, made by [`init_ca`]. The gateway's certificate
//! ([`issue_gateway`]) names the DNS names and IP addresses workers dial; a worker's certificate
//! ([`issue_worker`]) names the worker: its subject alternative name (and common name) is
//! `sand-worker-<id>`, and that name is the only way the gateway learns which worker is
//! connecting. Gateway certificates are valid for server authentication only and worker
//! certificates for client authentication only, so neither can stand in for the other.
//!
//! A directory made by these functions holds:
//!
//! | file | what |
//! |---|---|
//! | `ca.crt`, `ca.key` | the cluster CA (keep `ca.key` off worker hosts) |
//! | `gateway.crt`, `gateway.key` | the gateway's certificate and key |
//! | `worker-<id>.crt`, `worker-<id>.key` | worker `<id>`'s certificate and key |
//!
//! Certificates are PEM; keys are PKCS#8 PEM written with mode `0600`. A worker host needs
//! `ca.crt` and its own two files.
//!
//! Every sand CA has the same subject name (`sand cluster CA`); clusters are told apart by their
//! keys. That lets [`ClusterCa::load`] rebuild the issuer from the key alone, and a certificate
//! of another cluster is refused on its signature.
//!
//! This module never logs and never talks to the network; [`crate::tls`] turns a
//! [`NodeIdentity`] into TLS configurations.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sand_protocol::ids::WorkerId;
use time::{Duration, OffsetDateTime};

/// The CA certificate's file name.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA key's file name.
pub const CA_KEY_FILE: &str = "ca.key";
/// The gateway certificate's file name.
pub const GATEWAY_CERT_FILE: &str = "gateway.crt";
/// The gateway key's file name.
pub const GATEWAY_KEY_FILE: &str = "gateway.key";
/// How long a new CA is valid, in days.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a new gateway or worker certificate is valid, in days.
pub const NODE_VALIDITY_DAYS: i64 = 365;
/// What a worker's certificate name starts with; the worker id follows in decimal.
pub const WORKER_NAME_PREFIX: &str = "sand-worker-";

const CA_COMMON_NAME: &str = "sand cluster CA";
const ORGANIZATION: &str = "sand";

/// Why a certificate could not be made, written, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file that should be there is not.
    #[error("{what} not found at {path}: {hint}")]
    Missing {
        /// What the file should hold.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
    },
    /// A file is there but does not hold what it should.
    #[error("{what} at {path} is not usable: {reason}")]
    Invalid {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file that would be overwritten already exists.
    #[error("{path} already exists; {hint}")]
    Exists {
        /// The file.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
    },
    /// Reading or writing a file failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A gateway certificate was requested without any name to put in it.
    #[error("a gateway certificate needs at least one DNS name or IP address that workers dial")]
    NoNames,
    /// A name cannot go in a certificate.
    #[error("{name:?} is not a valid DNS name or IP address: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The certificate does not name a worker.
    #[error("the certificate names no sand worker (expected a name `{WORKER_NAME_PREFIX}<id>`)")]
    NoWorkerName,
    /// Key or certificate generation failed.
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before this instant.
    pub not_before: OffsetDateTime,
    /// Not valid after this instant.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (to forgive small clock differences) until `days` from now.
    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
}

/// A node's credentials: the cluster CA it trusts, its certificate chain, and its private key.
pub struct NodeIdentity {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl NodeIdentity {
    /// Assembles an identity. `chain` starts with the node's own certificate. Nothing is
    /// checked here: a mismatched identity is refused at the TLS handshake.
    pub fn new(
        ca: CertificateDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        Self { ca, chain, key }
    }

    /// The cluster CA certificate this node trusts.
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// The node's certificate chain, its own certificate first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The node's private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The paths of a certificate and key just written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PEM, mode 0600).
    pub key: PathBuf,
}

/// A certificate just issued: the identity it makes, and its certificate and key as PEM, as
/// rcgen wrote them, for [`save_identity`].
pub(crate) struct Issued {
    /// The node's identity.
    pub(crate) identity: NodeIdentity,
    cert_pem: String,
    key_pem: String,
}

/// A cluster CA that can issue certificates.
pub struct ClusterCa {
    cert: CertificateDer<'static>,
    /// The certificate as PEM, as rcgen made it or as it was read.
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl ClusterCa {
    /// Makes a new CA with a new key.
    pub fn generate(validity: Validity) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA made by [`init_ca`] from `dir`, checking that its key and certificate
    /// belong together.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let (cert, cert_pem) = read_cert(&cert_path, "the cluster CA certificate", HINT_INIT)?;
        let pem = read_text(&key_path, "the cluster CA key", HINT_INIT)?;
        let key = KeyPair::from_pem(&pem).map_err(|e| CertError::Invalid {
            what: "the cluster CA key",
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let parsed = webpki::EndEntityCert::try_from(&cert).map_err(|e| CertError::Invalid {
            what: "the cluster CA certificate",
            path: cert_path.clone(),
            reason: format!("{e:?}"),
        })?;
        if parsed.subject_public_key_info().as_ref() != key.subject_public_key_info() {
            return Err(CertError::Invalid {
                what: "the cluster CA key",
                path: key_path,
                reason: format!(
                    "it does not belong to the certificate {}",
                    cert_path.display()
                ),
            });
        }
        // rcgen signs with the issuer's name and key: rebuilding the parameters `init_ca` used
        // gives the same name, so the certificates issued chain to the stored CA certificate.
        // `issue` verifies that they do.
        Ok(Self {
            cert,
            cert_pem,
            issuer: Issuer::new(ca_params(), key),
        })
    }

    /// Writes the CA certificate and key into `dir` (made if missing). Refuses to overwrite an
    /// existing CA.
    pub fn save(&self, dir: &Path) -> Result<IssuedFiles, CertError> {
        let files = IssuedFiles {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
        };
        for path in [&files.cert, &files.key] {
            if path.exists() {
                return Err(CertError::Exists {
                    path: path.clone(),
                    hint: "a cluster CA is already there. To start a new cluster, remove ca.crt \
                           and ca.key first; every certificate must then be issued again",
                });
            }
        }
        make_dir(dir)?;
        write_file(&files.key, &self.issuer.key().serialize_pem(), 0o600)?;
        write_file(&files.cert, &self.cert_pem, 0o644)?;
        Ok(files)
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Issues a gateway certificate valid for `names` (DNS names or IP addresses).
    pub fn issue_gateway(
        &self,
        names: &[String],
        validity: Validity,
    ) -> Result<NodeIdentity, CertError> {
        Ok(self.gateway(names, validity)?.identity)
    }

    /// Issues worker `id`'s certificate.
    pub fn issue_worker(
        &self,
        id: WorkerId,
        validity: Validity,
    ) -> Result<NodeIdentity, CertError> {
        Ok(self.worker(id, validity)?.identity)
    }

    fn gateway(&self, names: &[String], validity: Validity) -> Result<Issued, CertError> {
        if names.is_empty() {
            return Err(CertError::NoNames);
        }
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            // Checked as the worker will dial it, so a name that cannot be dialled is refused now.
            let san = match ServerName::try_from(name.as_str()) {
                Ok(ServerName::IpAddress(ip)) => SanType::IpAddress(std::net::IpAddr::from(ip)),
                Ok(ServerName::DnsName(dns)) => SanType::DnsName(dns.as_ref().try_into()?),
                Ok(_) | Err(_) => {
                    return Err(CertError::BadName {
                        name: name.clone(),
                        reason: "expected a DNS name such as gw.example.com or an IP address"
                            .to_string(),
                    })
                }
            };
            sans.push(san);
        }
        self.issue(
            "sand gateway",
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        )
    }

    fn worker(&self, id: WorkerId, validity: Validity) -> Result<Issued, CertError> {
        let name = worker_name(id);
        let san = SanType::DnsName(name.clone().try_into()?);
        self.issue(
            &name,
            vec![san],
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        )
    }

    /// Issues a certificate for `sans`, usable for `usage` only.
    pub(crate) fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage.clone()];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial());
        let signed = params.signed_by(&key, &self.issuer)?;
        let cert = signed.der().clone();
        // The issuer was rebuilt from fixed parameters when loaded from disk; a CA certificate
        // made by another tool would yield certificates that do not chain. Catch that here,
        // before anything is written. Validity is checked at `not_before`, so that issuing a
        // certificate for the future or the past (tests do) is still checked.
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(validity.not_before.unix_timestamp().max(0)).unwrap_or(0) + 1,
        ));
        let eku = match usage {
            ExtendedKeyUsagePurpose::ServerAuth => webpki::KeyUsage::server_auth(),
            _ => webpki::KeyUsage::client_auth(),
        };
        verify_chain(&self.cert, &cert, at, eku).map_err(|reason| CertError::Invalid {
            what: "the cluster CA certificate",
            path: PathBuf::from(CA_CERT_FILE),
            reason: format!(
                "a certificate it issued does not chain to it ({reason}); was it made by \
                 `sand cert init`?"
            ),
        })?;
        Ok(Issued {
            identity: NodeIdentity {
                ca: self.cert.clone(),
                chain: vec![cert],
                key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            },
            cert_pem: signed.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// Creates a new cluster CA in `dir` (made if missing): `ca.crt` and `ca.key`, valid for
/// [`CA_VALIDITY_DAYS`]. Refuses to overwrite an existing CA.
pub fn init_ca(dir: &Path) -> Result<IssuedFiles, CertError> {
    ClusterCa::generate(Validity::days_from_now(CA_VALIDITY_DAYS))?.save(dir)
}

/// Issues the gateway's certificate with the CA in `dir`, valid for [`NODE_VALIDITY_DAYS`] and
/// for `names` (the DNS names and IP addresses workers dial), and writes `gateway.crt` and
/// `gateway.key` into `dir`, replacing any older ones.
pub fn issue_gateway(dir: &Path, names: &[String]) -> Result<IssuedFiles, CertError> {
    let ca = ClusterCa::load(dir)?;
    let issued = ca.gateway(names, Validity::days_from_now(NODE_VALIDITY_DAYS))?;
    save_identity(dir, &issued, GATEWAY_CERT_FILE, GATEWAY_KEY_FILE)
}

/// Issues worker `id`'s certificate with the CA in `dir`, valid for [`NODE_VALIDITY_DAYS`], and
/// writes `worker-<id>.crt` and `worker-<id>.key` into `dir`, replacing any older ones.
pub fn issue_worker(dir: &Path, id: WorkerId) -> Result<IssuedFiles, CertError> {
    let ca = ClusterCa::load(dir)?;
    let issued = ca.worker(id, Validity::days_from_now(NODE_VALIDITY_DAYS))?;
    save_identity(dir, &issued, &worker_cert_file(id), &worker_key_file(id))
}

/// Loads the gateway's identity from `dir`, checking that its certificate chains to the CA
/// there and is valid now.
pub fn load_gateway(dir: &Path) -> Result<NodeIdentity, CertError> {
    let identity = load_identity(dir, GATEWAY_CERT_FILE, GATEWAY_KEY_FILE, HINT_ISSUE_GATEWAY)?;
    check_now(
        &identity,
        &dir.join(GATEWAY_CERT_FILE),
        webpki::KeyUsage::server_auth(),
    )?;
    Ok(identity)
}

/// Loads worker `id`'s identity from `dir`, checking that its certificate chains to the CA
/// there, is valid now, and names worker `id`.
pub fn load_worker(dir: &Path, id: WorkerId) -> Result<NodeIdentity, CertError> {
    let cert_file = worker_cert_file(id);
    let identity = load_identity(dir, &cert_file, &worker_key_file(id), HINT_ISSUE_WORKER)?;
    let path = dir.join(&cert_file);
    check_now(&identity, &path, webpki::KeyUsage::client_auth())?;
    let named = identity
        .chain
        .first()
        .map(worker_id_of)
        .transpose()
        .map_err(|e| CertError::Invalid {
            what: "the worker certificate",
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if named != Some(id) {
        return Err(CertError::Invalid {
            what: "the worker certificate",
            path,
            reason: format!("it names {named:?}, not worker {id}"),
        });
    }
    Ok(identity)
}

/// The name in worker `id`'s certificate: `sand-worker-<id>`.
pub fn worker_name(id: WorkerId) -> String {
    format!("{WORKER_NAME_PREFIX}{}", id.0)
}

/// The worker a certificate name stands for: `sand-worker-<id>` with `<id>` a decimal `u32`
/// without leading zeros. Anything else is `None`.
pub fn parse_worker_name(name: &str) -> Option<WorkerId> {
    let digits = name.strip_prefix(WORKER_NAME_PREFIX)?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if !canonical {
        return None;
    }
    digits.parse().ok().map(WorkerId)
}

/// The worker a certificate names, from its DNS subject alternative names. Exactly one
/// worker name must be present.
pub fn worker_id_of(cert: &CertificateDer<'_>) -> Result<WorkerId, CertError> {
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(|_| CertError::NoWorkerName)?;
    let mut ids = parsed.valid_dns_names().filter_map(parse_worker_name);
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id),
        _ => Err(CertError::NoWorkerName),
    }
}

/// The file name of worker `id`'s certificate.
pub fn worker_cert_file(id: WorkerId) -> String {
    format!("worker-{}.crt", id.0)
}

/// The file name of worker `id`'s key.
pub fn worker_key_file(id: WorkerId) -> String {
    format!("worker-{}.key", id.0)
}

const HINT_INIT: &str = "create the cluster CA with `sand cert init`";
const HINT_ISSUE_GATEWAY: &str =
    "issue the gateway certificate with `sand cert issue gateway` and copy it here";
const HINT_ISSUE_WORKER: &str =
    "issue the worker certificate with `sand cert issue worker` and copy it here";

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive DER integer, and never zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Verifies that `leaf` chains to `ca` at time `at` for `usage`.
fn verify_chain(
    ca: &CertificateDer<'_>,
    leaf: &CertificateDer<'_>,
    at: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| format!("{e:?}"))?;
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("{e:?}"))?;
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    leaf.verify_for_usage(algs, &[anchor], &[], at, usage, None, None)
        .map(|_| ())
        .map_err(|e| describe_webpki_error(&e))
}

/// A sentence for the certificate errors a user can fix.
pub(crate) fn describe_webpki_error(e: &webpki::Error) -> String {
    match e {
        webpki::Error::CertExpired { not_after, .. } => format!(
            "the certificate expired (not valid after {}s since the epoch); issue a new one",
            not_after.as_secs()
        ),
        webpki::Error::CertNotValidYet { not_before, .. } => format!(
            "the certificate is not valid yet (not before {}s since the epoch); check the clock",
            not_before.as_secs()
        ),
        // Every sand CA has the same subject name, so a certificate of another cluster finds
        // an issuer by name and fails on its signature.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            "the certificate was not signed by this cluster's CA".to_string()
        }
        other => format!("{other:?}"),
    }
}

fn check_now(
    identity: &NodeIdentity,
    path: &Path,
    usage: webpki::KeyUsage,
) -> Result<(), CertError> {
    let leaf = identity.chain.first().ok_or_else(|| CertError::Invalid {
        what: "the certificate file",
        path: path.to_path_buf(),
        reason: "it holds no certificate".to_string(),
    })?;
    verify_chain(&identity.ca, leaf, UnixTime::now(), usage).map_err(|reason| CertError::Invalid {
        what: "the certificate",
        path: path.to_path_buf(),
        reason,
    })
}

fn load_identity(
    dir: &Path,
    cert_file: &str,
    key_file: &str,
    hint: &'static str,
) -> Result<NodeIdentity, CertError> {
    let (ca, _) = read_cert(
        &dir.join(CA_CERT_FILE),
        "the cluster CA certificate",
        HINT_INIT,
    )?;
    let cert_path = dir.join(cert_file);
    let text = read_text(&cert_path, "the certificate", hint)?;
    let chain = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Invalid {
            what: "the certificate file",
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::Invalid {
            what: "the certificate file",
            path: cert_path,
            reason: "it holds no PEM certificate".to_string(),
        });
    }
    let key_path = dir.join(key_file);
    let text = read_text(&key_path, "the private key", hint)?;
    let key = PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| CertError::Invalid {
        what: "the private key",
        path: key_path,
        reason: e.to_string(),
    })?;
    Ok(NodeIdentity { ca, chain, key })
}

fn save_identity(
    dir: &Path,
    issued: &Issued,
    cert_file: &str,
    key_file: &str,
) -> Result<IssuedFiles, CertError> {
    let files = IssuedFiles {
        cert: dir.join(cert_file),
        key: dir.join(key_file),
    };
    write_file(&files.key, &issued.key_pem, 0o600)?;
    write_file(&files.cert, &issued.cert_pem, 0o644)?;
    Ok(files)
}

fn read_text(path: &Path, what: &'static str, hint: &'static str) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CertError::Missing {
            what,
            path: path.to_path_buf(),
            hint,
        },
        io::ErrorKind::InvalidData => CertError::Invalid {
            what,
            path: path.to_path_buf(),
            reason: "it is not text (PEM expected)".to_string(),
        },
        _ => CertError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        },
    })
}

/// A certificate file: the certificate, and the file's text.
fn read_cert(
    path: &Path,
    what: &'static str,
    hint: &'static str,
) -> Result<(CertificateDer<'static>, String), CertError> {
    let text = read_text(path, what, hint)?;
    let cert = CertificateDer::from_pem_slice(text.as_bytes()).map_err(|e| CertError::Invalid {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok((cert, text))
}

fn make_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "create the directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `text` to `path` with `mode`, atomically ([`crate::file::write_atomic`]), so a
/// reader never sees half a key and a key never exists with looser permissions.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), CertError> {
    crate::file::write_atomic(path, text.as_bytes(), mode).map_err(|source| CertError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sand-certs-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn worker_names_parse_strictly() {
        assert_eq!(parse_worker_name("sand-worker-0"), Some(WorkerId(0)));
        assert_eq!(parse_worker_name("sand-worker-42"), Some(WorkerId(42)));
        assert_eq!(
            parse_worker_name("sand-worker-4294967295"),
            Some(WorkerId(u32::MAX))
        );
        for bad in [
            "sand-worker-",
            "sand-worker-042",
            "sand-worker-+4",
            "sand-worker--4",
            "sand-worker-4294967296",
            "sand-worker-4x",
            "worker-4",
            "localhost",
        ] {
            assert_eq!(parse_worker_name(bad), None, "{bad}");
        }
        assert_eq!(
            parse_worker_name(&worker_name(WorkerId(7))),
            Some(WorkerId(7))
        );
    }

    #[test]
    fn pem_written_by_rcgen_matches_the_pem_parser() {
        let ca = ClusterCa::generate(Validity::days_from_now(1)).unwrap();
        let back = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
        assert_eq!(back, ca.cert);
        let issued = ca.worker(WorkerId(1), Validity::days_from_now(1)).unwrap();
        let back = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(back, issued.identity.chain()[0]);
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        assert_eq!(key.secret_der(), issued.identity.key().secret_der());
    }

    #[test]
    fn files_round_trip_and_keys_are_private() {
        let dir = temp_dir("roundtrip");
        let ca_files = init_ca(&dir).unwrap();
        let gw = issue_gateway(&dir, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let w = issue_worker(&dir, WorkerId(7)).unwrap();
        for key in [&ca_files.key, &gw.key, &w.key] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let gateway = load_gateway(&dir).unwrap();
        let worker = load_worker(&dir, WorkerId(7)).unwrap();
        assert_eq!(gateway.ca(), worker.ca());
        assert_eq!(worker_id_of(&worker.chain()[0]).unwrap(), WorkerId(7));
        assert!(worker_id_of(&gateway.chain()[0]).is_err());
        // Issuing again replaces the files; the loaded CA still issues chaining certificates.
        issue_worker(&dir, WorkerId(7)).unwrap();
        load_worker(&dir, WorkerId(7)).unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn clear_errors_for_missing_and_invalid_files() {
        let dir = temp_dir("errors");
        let err = issue_worker(&dir, WorkerId(1)).unwrap_err();
        assert!(matches!(err, CertError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("sand cert init"), "{err}");

        init_ca(&dir).unwrap();
        let err = init_ca(&dir).unwrap_err();
        assert!(matches!(err, CertError::Exists { .. }), "{err}");

        let err = load_worker(&dir, WorkerId(1)).unwrap_err();
        assert!(err.to_string().contains("worker-1.crt"), "{err}");
        assert!(err.to_string().contains("sand cert issue worker"), "{err}");

        issue_worker(&dir, WorkerId(1)).unwrap();
        fs::rename(dir.join("worker-1.crt"), dir.join("worker-2.crt")).unwrap();
        fs::rename(dir.join("worker-1.key"), dir.join("worker-2.key")).unwrap();
        let err = load_worker(&dir, WorkerId(2)).unwrap_err();
        assert!(err.to_string().contains("not worker w2"), "{err}");

        fs::write(dir.join("worker-2.key"), "not a key").unwrap();
        let err = load_worker(&dir, WorkerId(2)).unwrap_err();
        assert!(matches!(err, CertError::Invalid { .. }), "{err}");

        let err = issue_gateway(&dir, &[]).unwrap_err();
        assert!(matches!(err, CertError::NoNames), "{err}");
        let err = issue_gateway(&dir, &["bad name!".into()]).unwrap_err();
        assert!(matches!(err, CertError::BadName { .. }), "{err}");

        // A CA key that does not belong to the CA certificate is caught on load.
        let other = temp_dir("other");
        init_ca(&other).unwrap();
        fs::copy(other.join(CA_KEY_FILE), dir.join(CA_KEY_FILE)).unwrap();
        let err = issue_worker(&dir, WorkerId(3)).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&other);
    }

    #[test]
    fn expired_and_foreign_certificates_are_refused_on_load() {
        let dir = temp_dir("expired");
        init_ca(&dir).unwrap();
        let ca = ClusterCa::load(&dir).unwrap();
        let now = OffsetDateTime::now_utc();
        let expired = ca
            .worker(
                WorkerId(5),
                Validity {
                    not_before: now - Duration::days(10),
                    not_after: now - Duration::days(1),
                },
            )
            .unwrap();
        save_identity(
            &dir,
            &expired,
            &worker_cert_file(WorkerId(5)),
            &worker_key_file(WorkerId(5)),
        )
        .unwrap();
        let err = load_worker(&dir, WorkerId(5)).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");

        let foreign = ClusterCa::generate(Validity::days_from_now(1))
            .unwrap()
            .worker(WorkerId(6), Validity::days_from_now(1))
            .unwrap();
        save_identity(
            &dir,
            &foreign,
            &worker_cert_file(WorkerId(6)),
            &worker_key_file(WorkerId(6)),
        )
        .unwrap();
        let err = load_worker(&dir, WorkerId(6)).unwrap_err();
        assert!(
            err.to_string().contains("not signed by this cluster's CA"),
            "{err}"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
