//! Who may take part in a run: the run token's other source (a file) and the TLS flags that
//! `coordinator`, `worker` and `launch` share.

use std::path::{Path, PathBuf};

use anyhow::Context;
use distclip_proto::tls::{Tls, TlsFiles};

/// TLS on the control and data planes. All three files turn it on; none leaves it off.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate(s) (PEM) that signed the run's certificates; peers must chain to it.
    #[arg(long, env = "DISTCLIP_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM), presented when serving and, with --tls-mutual,
    /// when calling.
    #[arg(long, env = "DISTCLIP_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "DISTCLIP_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: refuse callers without a certificate signed by --tls-ca.
    #[arg(long, env = "DISTCLIP_TLS_MUTUAL")]
    pub tls_mutual: bool,
    /// Check servers' certificates against this name instead of the host dialled (one
    /// certificate for workers reached by IP address; `distclip certs` adds `distclip`).
    #[arg(long, env = "DISTCLIP_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// Read and check the files; None when TLS is off.
    pub fn load(&self) -> anyhow::Result<Option<Tls>> {
        let (ca, cert, key) = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) => {
                anyhow::ensure!(
                    !self.tls_mutual && self.tls_server_name.is_none(),
                    "--tls-mutual and --tls-server-name need TLS: give --tls-ca, --tls-cert and --tls-key"
                );
                return Ok(None);
            }
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            _ => anyhow::bail!(
                "TLS needs all three of --tls-ca, --tls-cert and --tls-key (or DISTCLIP_TLS_CA, _CERT, _KEY); `distclip certs` makes a set"
            ),
        };
        let files = TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            mutual: self.tls_mutual,
            server_name: self.tls_server_name.clone(),
        };
        Ok(Some(files.load()?))
    }

    /// The same settings as arguments for a child process (`distclip launch`).
    pub fn to_cli_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for (flag, path) in [("--tls-ca", &self.tls_ca), ("--tls-cert", &self.tls_cert), ("--tls-key", &self.tls_key)] {
            if let Some(p) = path {
                args.push(flag.into());
                args.push(p.clone().into_os_string());
            }
        }
        if self.tls_mutual {
            args.push("--tls-mutual".into());
        }
        if let Some(n) = &self.tls_server_name {
            args.push("--tls-server-name".into());
            args.push(n.into());
        }
        args
    }
}

/// The run token from `--token-file` (its first line), else `token` (the flag or
/// `DISTCLIP_TOKEN`); giving both is an error.
pub fn token(token: Option<String>, file: Option<&Path>) -> anyhow::Result<Option<String>> {
    let Some(p) = file else {
        return Ok(token.filter(|t| !t.is_empty()));
    };
    anyhow::ensure!(token.is_none(), "give the run token with --token (or DISTCLIP_TOKEN) or --token-file, not both");
    let text = std::fs::read_to_string(p).with_context(|| format!("reading the token file {}", p.display()))?;
    let t = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(!t.is_empty(), "the token file {} is empty; write the run token on its first line", p.display());
    Ok(Some(t))
}

/// `distclip certs`: a throwaway CA and one certificate for every process of a run.
#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Folder for `ca.pem`, `node.pem` and `node-key.pem` (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Host names and IP addresses the certificate is valid for, comma separated (it also
    /// carries the name `distclip`, for --tls-server-name distclip).
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1,::1")]
    hosts: Vec<String>,
}

/// Write the files and print their paths as JSON, with the flags that use them.
pub fn certs(args: CertsArgs) -> anyhow::Result<()> {
    let files = distclip_proto::tls::certs::generate(&args.out, &args.hosts).map_err(anyhow::Error::msg)?;
    files.load().context("checking the files just written")?;
    super::print_json(&serde_json::json!({
        "ca": files.ca,
        "cert": files.cert,
        "key": files.key,
        "hosts": args.hosts,
        "flags": format!(
            "--tls-ca {} --tls-cert {} --tls-key {} --tls-mutual",
            files.ca.display(), files.cert.display(), files.key.display()
        ),
    }))
}
