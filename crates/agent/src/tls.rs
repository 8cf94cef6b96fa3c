//! Optional TLS for the agent's HTTP API (rustls with the ring provider).
//!
//! One certificate and key per agent, and the CA that signed the agents' certificates: agents
//! verify each other against it, and so does the CLI (`--ca`). Agents are addressed by IP, so
//! their certificates carry IP subject alternative names.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a client may take to finish the TLS handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the HTTP server to take them.
pub const ACCEPT_QUEUE: usize = 64;

/// A TLS file that could not be used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("TLS configuration refused")]
    Rustls(#[from] rustls::Error),
    #[error("TLS private key refused")]
    Exposed(#[source] Box<crate::config::ConfigError>),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem { what, path: path.to_path_buf(), source };
    let certs = CertificateDer::pem_file_iter(path).map_err(pem)?.collect::<Result<Vec<_>, _>>().map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The server side: this agent's certificate chain and key.
#[derive(Clone)]
pub struct ServerTls(tokio_rustls::TlsAcceptor);

impl ServerTls {
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let chain = certificates(cert, "certificate")?;
        crate::config::private_file("TLS private key", key).map_err(|e| TlsError::Exposed(Box::new(e)))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem { what: "private key", path: key.to_path_buf(), source })?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(ServerTls(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }

    /// The acceptor, for the copy channel's gate (`tandem_drivers::copychannel`).
    #[must_use]
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.0.clone()
    }
}

/// The client side: the CA that agents' certificates must chain to.
#[derive(Clone)]
pub struct ClientTls(tokio_rustls::TlsConnector);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    pub fn load(ca: &Path) -> Result<ClientTls, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(ca, "CA certificate")? {
            roots.add(cert)?;
        }
        let config =
            rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?.with_root_certificates(roots).with_no_client_auth();
        Ok(ClientTls(tokio_rustls::TlsConnector::from(Arc::new(config))))
    }

    /// The connector, for the copy channel's relays (`tandem_drivers::copychannel`).
    #[must_use]
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        self.0.clone()
    }

    /// Runs the handshake on `tcp`, checking the certificate against `addr`'s host part (an
    /// IP address or a DNS name).
    pub async fn connect(&self, addr: &str, tcp: TcpStream) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.0.connect(name, tcp).await
    }
}

/// A listener whose connections are already through the TLS handshake. Handshakes run in their
/// own tasks with a deadline, so a slow or silent client holds up nobody.
pub struct TlsListener {
    rx: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn spawn(listener: TcpListener, tls: ServerTls) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, queue) = (tls.0.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = queue.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {peer} failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task only ends when this listener is gone; wait forever meanwhile.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
