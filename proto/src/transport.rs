//! How clients (the worker and the `accrete` CLI) reach a server: the URL's scheme chooses the
//! transport. `https://` is TLS (rustls), trusting a CA file when one is given, else the system's
//! roots; `http://` is plaintext, which is only ever chosen by writing it.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Where a client finds the certificate authority that signed the server's certificate.
/// `None` means the operating system's trust store.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// PEM of the CA certificate(s) to trust instead of the system roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl ClientTls {
    /// Reads a PEM CA file (`--ca-file`), or trusts the system roots when `path` is `None`.
    pub fn from_ca_file(path: Option<&Path>) -> anyhow::Result<ClientTls> {
        let ca_pem = match path {
            Some(p) => {
                Some(std::fs::read(p).with_context(|| format!("reading CA file {}", p.display()))?)
            }
            None => None,
        };
        Ok(ClientTls { ca_pem })
    }
}

/// An endpoint for `url` with TLS set up when the scheme is `https`. A CA file given with an
/// `http://` URL is refused: it almost certainly means the operator meant TLS.
pub fn endpoint(url: &str, tls: &ClientTls) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid server URL {url:?}"))?;
    match endpoint.uri().scheme_str() {
        Some("https") => {
            let config = match &tls.ca_pem {
                Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                None => ClientTlsConfig::new().with_native_roots(),
            };
            endpoint
                .tls_config(config.timeout(Duration::from_secs(10)))
                .context("setting up TLS")
        }
        Some("http") => {
            anyhow::ensure!(
                tls.ca_pem.is_none(),
                "a CA file was given but the server URL {url} is plaintext (http://); use https://"
            );
            Ok(endpoint)
        }
        other => anyhow::bail!(
            "server URL {url:?} must start with https:// (TLS) or http:// (plaintext), not {other:?}"
        ),
    }
}

/// Formats a connection error with its whole cause chain (TLS failures such as an unknown
/// issuer are several sources deep, and the top level says only "transport error").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}
