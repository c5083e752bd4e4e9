//! Transport security for both planes: TLS from PEM files, optionally mutual (rustls). gRPC
//! gets its settings as tonic's ([`Tls::server_config`], [`Tls::client_config`]); the data
//! plane's framed TCP channels, which tonic does not carry, get plain rustls configurations
//! ([`Tls::rustls_server`], [`Tls::rustls_client`]) from the same files. Every distclip process
//! both serves (the coordinator its control plane, a worker its data plane) and calls, so each
//! one is given the same three files: the CA that signs the run's certificates, its own
//! certificate chain and its private key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Longest TLS handshake: a peer that opens a connection and stays silent is dropped after it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a process finds its TLS material, as given on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates (PEM) that the other side's certificate must chain to.
    pub ca: PathBuf,
    /// This process's certificate chain (PEM): presented when serving and, with `mutual`, when
    /// calling.
    pub cert: PathBuf,
    /// The private key (PEM, PKCS#8, PKCS#1 or SEC1) of `cert`.
    pub key: PathBuf,
    /// Mutual TLS: servers refuse callers without a certificate signed by `ca`, and callers
    /// present theirs.
    pub mutual: bool,
    /// The name servers' certificates are checked against, instead of the host a caller dials;
    /// lets one certificate issued for a name serve workers reached by IP address.
    pub server_name: Option<String>,
}

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read the TLS {what} file {path}: {source}")]
    Read {
        /// `CA`, `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but does not hold what it should.
    #[error("the TLS {what} file {path} {problem}")]
    Invalid {
        /// `CA`, `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong and how to mend it.
        problem: String,
    },
    /// The files are each well formed but do not work together (a key of another certificate).
    #[error("the TLS certificate {cert} and key {key} do not work together: {problem}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        problem: String,
    },
}

/// Loaded TLS settings, ready to configure servers and clients. Cheap to clone; its `Debug`
/// shows no key material.
#[derive(Clone)]
pub struct Tls {
    ca: Certificate,
    identity: Identity,
    /// The same material parsed, for the rustls configurations of the framed TCP channels.
    raw: Arc<Raw>,
    mutual: bool,
    server_name: Option<String>,
}

struct Raw {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("mutual", &self.mutual)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

fn certificates(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |problem: String| TlsError::Invalid { what, path: path.to_owned(), problem };
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(pem) {
        out.push(c.map_err(|e| invalid(format!("has a malformed PEM block ({e})")))?);
    }
    if out.is_empty() {
        return Err(invalid("holds no `BEGIN CERTIFICATE` block; give a PEM certificate file".into()));
    }
    Ok(out)
}

/// The crypto provider tonic's TLS is built on here (aws-lc-rs), named explicitly so that the
/// data plane's configurations never depend on a process-wide default being installed.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl TlsFiles {
    /// Read and check the three files: each must parse, and the key must belong to the
    /// certificate. Errors name the file and the fix.
    pub fn load(&self) -> Result<Tls, TlsError> {
        let ca = read("CA", &self.ca)?;
        let ca_ders = certificates("CA", &self.ca, &ca)?;
        let cert = read("certificate", &self.cert)?;
        let chain = certificates("certificate", &self.cert, &cert)?;
        let key = read("key", &self.key)?;
        let key_der = PrivateKeyDer::from_pem_slice(&key).map_err(|e| TlsError::Invalid {
            what: "key",
            path: self.key.clone(),
            problem: format!("holds no usable private key ({e}); give the PEM key of the certificate"),
        })?;
        let tls = Tls {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
            raw: Arc::new(Raw { ca: ca_ders, chain, key: key_der }),
            mutual: self.mutual,
            server_name: self.server_name.clone().filter(|s| !s.is_empty()),
        };
        // Building a server configuration is where rustls pairs the key with the certificate.
        tls.rustls_server(&[]).map_err(|problem| TlsError::Mismatch {
            cert: self.cert.clone(),
            key: self.key.clone(),
            problem,
        })?;
        Ok(tls)
    }
}

impl Tls {
    /// Whether callers must present a certificate (mutual TLS).
    pub fn mutual(&self) -> bool {
        self.mutual
    }

    /// A server's settings: present this process's certificate and, with mutual TLS, require
    /// one signed by the CA from every caller.
    pub fn server_config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone()).timeout(HANDSHAKE_TIMEOUT);
        if self.mutual { config.client_ca_root(self.ca.clone()) } else { config }
    }

    /// A client's settings for dialling `host` (a DNS name or an IP address): trust only the CA,
    /// check the server's certificate against `server_name` if one was given, else `host`, and
    /// with mutual TLS present this process's certificate.
    pub fn client_config(&self, host: &str) -> ClientTlsConfig {
        let name = self.name_for(host);
        let config = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(name)
            .timeout(HANDSHAKE_TIMEOUT);
        if self.mutual { config.identity(self.identity.clone()) } else { config }
    }

    /// The longest a TLS handshake may take before the connection is dropped.
    pub fn handshake_timeout(&self) -> Duration {
        HANDSHAKE_TIMEOUT
    }

    /// A rustls server configuration with these files, offering `alpn` (most preferred first),
    /// for a server that does its own TLS accept (the data plane's shared port).
    pub fn rustls_server(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, String> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if self.mutual {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?.into(), provider())
                .build()
                .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config =
            builder.with_single_cert(self.raw.chain.clone(), self.raw.key.clone_key()).map_err(|e| e.to_string())?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Data channels last a quorum and are never resumed: no session tickets to send.
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// A rustls client configuration with these files, asking for `alpn`: trusts only the CA
    /// and, with mutual TLS, presents this process's certificate.
    pub fn rustls_client(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, String> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(self.roots()?);
        let mut config = if self.mutual {
            builder.with_client_auth_cert(self.raw.chain.clone(), self.raw.key.clone_key()).map_err(|e| e.to_string())?
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The name a server dialled as `host` must prove: `server_name` if one was given, else
    /// `host` itself (a DNS name or an IP address, `[::1]` brackets allowed).
    pub fn server_name_for(&self, host: &str) -> Result<ServerName<'static>, String> {
        let name = self.name_for(host);
        ServerName::try_from(name.to_owned())
            .map_err(|e| format!("`{name}` is not a DNS name or IP address a certificate can be checked against ({e}); pass --tls-server-name"))
    }

    /// The name checked in the certificate of a server dialled as `host`, for both the gRPC
    /// and the framed TCP clients: `server_name` if given, else `host` (`[::1]` in a URL is
    /// `::1` in a certificate).
    fn name_for<'a>(&'a self, host: &'a str) -> &'a str {
        self.server_name.as_deref().unwrap_or(host).trim_start_matches('[').trim_end_matches(']')
    }

    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.raw.ca {
            roots.add(c.clone()).map_err(|e| format!("a CA certificate is not usable as a trust anchor: {e}"))?;
        }
        Ok(roots)
    }
}

/// An error with its sources, one line: tonic's outer errors alone say little ("transport error").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let next = s.to_string();
        if !msg.contains(&next) {
            msg = format!("{msg}: {next}");
        }
        src = s.source();
    }
    msg
}

/// Whether `e` is a TLS handshake that failed on certificates or protocol (rustls's verdict),
/// rather than a peer that is not there yet: retrying will not help, so callers stop and say so.
pub fn is_tls_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<rustls::Error>() {
            return true;
        }
        // An io::Error's `source` skips the error it wraps, which is where rustls puts its own.
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        // Some layers (h2) keep rustls's error only as text in their own.
        let text = err.to_string();
        if RUSTLS_PHRASES.iter().any(|p| text.contains(p)) {
            return true;
        }
        next = err.source();
    }
    false
}

/// How rustls's `Display` begins the errors of a refused handshake.
const RUSTLS_PHRASES: [&str; 3] = ["received fatal alert", "invalid peer certificate", "peer sent no certificates"];

/// A throwaway certificate authority and one certificate for every process of a run, for trying
/// TLS and for tests. Real deployments issue certificates from their own CA (cert-manager, Vault).
#[cfg(feature = "certs")]
pub mod certs {
    use super::TlsFiles;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    use std::path::Path;

    /// The name every generated node certificate carries besides the hosts asked for, to use
    /// with `--tls-server-name` when peers are reached by addresses not known in advance.
    pub const NODE_NAME: &str = "distclip";

    /// Write `ca.pem`, `node.pem` and `node-key.pem` into `dir` (created if missing): a new CA and
    /// one certificate it signs, valid for serving and calling, for `hosts` (DNS names or IP
    /// addresses) and [`NODE_NAME`]. The CA's key is not kept. Returns the files for mutual TLS.
    pub fn generate(dir: &Path, hosts: &[String]) -> Result<TlsFiles, String> {
        let e = |what: &str, err: rcgen::Error| format!("generating the {what}: {err}");
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|x| e("CA", x))?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "distclip run CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().map_err(|x| e("CA key", x))?;
        let ca_cert = ca.self_signed(&ca_key).map_err(|x| e("CA", x))?;

        let mut names = hosts.to_vec();
        names.push(NODE_NAME.to_string());
        let mut node = CertificateParams::new(names).map_err(|x| e("node certificate", x))?;
        node.distinguished_name.push(DnType::CommonName, NODE_NAME);
        node.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        node.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let node_key = KeyPair::generate().map_err(|x| e("node key", x))?;
        let node_cert =
            node.signed_by(&node_key, &Issuer::new(ca, ca_key)).map_err(|x| e("node certificate", x))?;

        std::fs::create_dir_all(dir).map_err(|x| format!("creating {}: {x}", dir.display()))?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node-key.pem"),
            mutual: true,
            server_name: None,
        };
        for (path, text) in
            [(&files.ca, ca_cert.pem()), (&files.cert, node_cert.pem()), (&files.key, node_key.serialize_pem())]
        {
            std::fs::write(path, text).map_err(|x| format!("writing {}: {x}", path.display()))?;
        }
        restrict(&files.key)?;
        Ok(files)
    }

    /// Keep the private key readable by its owner only.
    #[cfg(unix)]
    fn restrict(path: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|x| format!("restricting {}: {x}", path.display()))
    }

    #[cfg(not(unix))]
    fn restrict(_: &Path) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(all(test, feature = "certs"))]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("distclip-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn generated_files_load_and_bad_ones_are_named() {
        let dir = tmp("load");
        let files = certs::generate(&dir, &["127.0.0.1".into(), "localhost".into()]).unwrap();
        let tls = files.load().unwrap();
        assert!(tls.mutual());
        assert!(!format!("{tls:?}").contains("PRIVATE"));

        // A missing file names itself.
        let missing = TlsFiles { ca: dir.join("nope.pem"), ..files.clone() };
        let err = missing.load().unwrap_err().to_string();
        assert!(err.contains("CA file") && err.contains("nope.pem"), "{err}");

        // A key given as the certificate, and a certificate given as the key.
        let swapped = TlsFiles { cert: files.key.clone(), key: files.cert.clone(), ..files.clone() };
        let err = swapped.load().unwrap_err().to_string();
        assert!(err.contains("certificate file") && err.contains("no `BEGIN CERTIFICATE`"), "{err}");
        let keyless = TlsFiles { key: files.ca.clone(), ..files.clone() };
        let err = keyless.load().unwrap_err().to_string();
        assert!(err.contains("key file") && err.contains("no usable private key"), "{err}");

        // The key of another certificate.
        let other = certs::generate(&tmp("other"), &["127.0.0.1".into()]).unwrap();
        let mixed = TlsFiles { key: other.key.clone(), ..files.clone() };
        let err = mixed.load().unwrap_err().to_string();
        assert!(err.contains("do not work together"), "{err}");
    }
}
