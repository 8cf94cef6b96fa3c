//! The copy channel: how the relay in front of a mirroring QEMU (`copyrelay`) reaches the copy
//! server of another site (`sitecopy`) — over TCP, through TLS when the cluster has `[tls]`, and
//! always through a mutual challenge over the cluster key before one byte of NBD passes.
//!
//! The copy server (`qemu-storage-daemon`) listens only on a unix socket; what listens on the
//! network is the *gate* here, which lets a connection through to the daemon only once its peer
//! proved that it holds the cluster secret. So a peer without the secret can neither write a
//! served copy nor pose as a copy server: the relay checks the gate's proof before QEMU's first
//! byte goes out — an impostor that took the mirror's writes would make a copy count as current
//! that never got them.
//!
//! The handshake, after TLS if any: the gate sends `MAGIC` and a fresh nonce; the relay answers
//! `MAGIC`, a nonce of its own and its proof (a MAC over both nonces, labelled "client"); the gate
//! answers its proof (the same, labelled "server"). Fresh nonces on both sides keep a proof from
//! being replayed on another connection; the labels keep it from being reflected to its sender.
//!
//! A relay may also ask, instead of NBD, for the chunk sums of a served copy (`chunksums`): it
//! answers with `SUMS_MAGIC` in place of `MAGIC`, then names the export and its length; the gate
//! sums the image where it lives and sends the sums (or why not). A gate of an older agent
//! refuses that magic, and the relay then makes a full copy, as before.
//!
//! Without `[tls]` the stream after the handshake is neither encrypted nor integrity-protected:
//! whoever is on the path between the sites can read it, or inject into it. With `[tls]` it is
//! both, and the gate's certificate must name the address the relay dials.

use crate::chunksums::{ChunkSums, ENCODED_HEADER_LEN, SUM_LEN};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tandem_core::wire::{ClusterKey, CopySide, COPY_NONCE_LEN};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// The first bytes each side sends.
const MAGIC: &[u8; 8] = b"TNDMCPY1";
/// The relay's first bytes when it asks for a copy's chunk sums rather than its NBD export.
const SUMS_MAGIC: &[u8; 8] = b"TNDMSUM1";
/// The longest export name a sums request may carry.
const MAX_EXPORT_NAME: usize = 255;
/// A proof's length (HMAC-SHA256).
const PROOF_LEN: usize = 32;
/// How long a gate may take to sum a copy, beyond its reading: TLS, the handshake, and the wait
/// for the copy's earlier writes to land.
pub const SUMS_BASE_TIMEOUT: Duration = Duration::from_secs(15);
/// The slowest reading of a copy that its summing is given time for (bytes per second).
pub const SUMS_MIN_RATE: u64 = 50 * 1024 * 1024;

/// How long summing a copy of `len` bytes may take.
#[must_use]
pub fn sums_limit(len: u64) -> Duration {
    SUMS_BASE_TIMEOUT + Duration::from_secs(len / SUMS_MIN_RATE)
}

/// How long a peer of the gate may take for TLS and the handshake together.
pub const GATE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most connections the gate carries at once (each mirrored disk of a VM at another site
/// holds one); more are closed at once.
pub const MAX_GATE_CONNECTIONS: usize = 256;

/// What both ends of the channel need: the cluster key and, with `[tls]`, this agent's TLS.
#[derive(Clone)]
pub struct CopyCredentials {
    key: ClusterKey,
    connector: Option<tokio_rustls::TlsConnector>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for CopyCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CopyCredentials {{ tls: {} }}", self.connector.is_some())
    }
}

impl CopyCredentials {
    /// The key only: the handshake authenticates both ends, the stream is in the clear.
    #[must_use]
    pub fn plain(key: ClusterKey) -> CopyCredentials {
        CopyCredentials { key, connector: None, acceptor: None }
    }

    /// The key and TLS both ways: the relay checks the gate's certificate against the cluster's
    /// CA (`connector`), the gate presents this agent's certificate (`acceptor`).
    #[must_use]
    pub fn with_tls(key: ClusterKey, connector: tokio_rustls::TlsConnector, acceptor: tokio_rustls::TlsAcceptor) -> CopyCredentials {
        CopyCredentials { key, connector: Some(connector), acceptor: Some(acceptor) }
    }

    /// Whether the stream is TLS.
    #[must_use]
    pub fn tls(&self) -> bool {
        self.connector.is_some()
    }
}

/// Why a connection through the channel failed.
#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("could not connect to the copy gate at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {peer} failed")]
    Tls {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the copy channel's handshake with {peer} broke off")]
    Io {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the copy channel's handshake with {peer} failed: {why}")]
    Refused { peer: String, why: &'static str },
    #[error("the copy channel's handshake with {peer} took longer than {GATE_HANDSHAKE_TIMEOUT:?}")]
    Timeout { peer: String },
    #[error("the copy gate at {peer} did not send chunk sums of {export}: {why}")]
    Sums { peer: String, export: String, why: String },
    #[error("the copy gate at {peer} took longer than {limit:?} to sum {export}")]
    SumsTimeout { peer: String, export: String, limit: Duration },
    #[error("the copy server's socket {path} does not answer")]
    Daemon {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A byte stream of the channel: TCP, or TLS over TCP.
pub trait CopyIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> CopyIo for T {}
/// A stream through the handshake, ready to carry NBD.
pub type CopyStream = Box<dyn CopyIo>;

fn nonce() -> [u8; COPY_NONCE_LEN] {
    let mut out = [0u8; COPY_NONCE_LEN];
    let mut filled = 0;
    while filled < out.len() {
        // SAFETY: getrandom(2) writes at most the given length into the buffer it is given.
        let n = unsafe { libc::getrandom(out[filled..].as_mut_ptr().cast(), out.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
    out
}

/// An error and its sources, one line.
#[must_use]
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The TLS name of `addr`'s host part (an IP address or a DNS name).
fn server_name(addr: &str) -> Result<rustls_pki_types::ServerName<'static>, std::io::Error> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Connects to the gate at `addr` (`host:port`) and runs the handshake as the relay. The TCP
/// connection closes with a reset when dropped: bytes still unsent then never reach the copy.
pub async fn connect(addr: &str, creds: &CopyCredentials) -> Result<CopyStream, ChannelError> {
    open(addr, creds, MAGIC).await
}

/// Asks the gate at `addr` for the chunk sums of `export`, whose image must hold `len` bytes;
/// `limit` bounds the whole exchange (the gate reads the whole image).
pub async fn fetch_sums(addr: &str, creds: &CopyCredentials, export: &str, len: u64, limit: Duration) -> Result<ChunkSums, ChannelError> {
    let failed = |why: String| ChannelError::Sums { peer: addr.to_string(), export: export.to_string(), why };
    if export.len() > MAX_EXPORT_NAME {
        return Err(failed("the export's name is too long".into()));
    }
    let exchange = async {
        let mut s = open(addr, creds, SUMS_MAGIC).await?;
        let mut ask = vec![u8::try_from(export.len()).unwrap_or(u8::MAX)];
        ask.extend_from_slice(export.as_bytes());
        ask.extend_from_slice(&len.to_be_bytes());
        let io = |e: std::io::Error| failed(e.to_string());
        s.write_all(&ask).await.map_err(io)?;
        s.flush().await.map_err(io)?;
        let mut status = [0u8; 1];
        s.read_exact(&mut status).await.map_err(io)?;
        if status[0] != 0 {
            let mut n = [0u8; 2];
            s.read_exact(&mut n).await.map_err(io)?;
            let mut why = vec![0u8; usize::from(u16::from_be_bytes(n))];
            s.read_exact(&mut why).await.map_err(io)?;
            return Err(failed(format!("refused: {}", String::from_utf8_lossy(&why))));
        }
        let mut header = [0u8; ENCODED_HEADER_LEN];
        s.read_exact(&mut header).await.map_err(io)?;
        let (_, _, count) = ChunkSums::decode_header(&header).map_err(|e| failed(e.to_string()))?;
        let mut body = header.to_vec();
        body.resize(ENCODED_HEADER_LEN + usize::try_from(count).unwrap_or(0) * SUM_LEN, 0);
        s.read_exact(&mut body[ENCODED_HEADER_LEN..]).await.map_err(io)?;
        let sums = ChunkSums::decode(&body).map_err(|e| failed(e.to_string()))?;
        if sums.len() != len {
            return Err(failed(format!("the sums cover {} bytes, not {len}", sums.len())));
        }
        Ok(sums)
    };
    tokio::time::timeout(limit, exchange).await.map_err(|_| ChannelError::SumsTimeout { peer: addr.to_string(), export: export.to_string(), limit })?
}

/// Connects to the gate and runs the handshake as the relay, announcing `magic`'s purpose.
async fn open(addr: &str, creds: &CopyCredentials, magic: &[u8; 8]) -> Result<CopyStream, ChannelError> {
    let tcp = TcpStream::connect(addr).await.map_err(|source| ChannelError::Connect { addr: addr.to_string(), source })?;
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_zero_linger();
    let mut stream: CopyStream = match &creds.connector {
        Some(c) => {
            let tls = |source| ChannelError::Tls { peer: addr.to_string(), source };
            let name = server_name(addr).map_err(tls)?;
            Box::new(c.connect(name, tcp).await.map_err(tls)?)
        }
        None => Box::new(tcp),
    };
    client_handshake(&mut stream, &creds.key, addr, magic).await?;
    Ok(stream)
}

async fn client_handshake(s: &mut CopyStream, key: &ClusterKey, peer: &str, purpose: &[u8; 8]) -> Result<(), ChannelError> {
    let io = |source| ChannelError::Io { peer: peer.to_string(), source };
    let refused = |why| ChannelError::Refused { peer: peer.to_string(), why };
    let mut hello = [0u8; MAGIC.len() + COPY_NONCE_LEN];
    s.read_exact(&mut hello).await.map_err(io)?;
    let (magic, server_nonce) = hello.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(refused("the peer is not a Tandem copy gate"));
    }
    let server_nonce: [u8; COPY_NONCE_LEN] = server_nonce.try_into().map_err(|_| refused("short hello"))?;
    let client_nonce = nonce();
    let mut answer = Vec::with_capacity(MAGIC.len() + COPY_NONCE_LEN + PROOF_LEN);
    answer.extend_from_slice(purpose);
    answer.extend_from_slice(&client_nonce);
    answer.extend_from_slice(&key.copy_proof(CopySide::Client, &server_nonce, &client_nonce));
    s.write_all(&answer).await.map_err(io)?;
    s.flush().await.map_err(io)?;
    let mut proof = [0u8; PROOF_LEN];
    s.read_exact(&mut proof).await.map_err(io)?;
    if !key.verify_copy_proof(CopySide::Server, &server_nonce, &client_nonce, &proof) {
        return Err(refused("the copy gate does not hold the cluster secret"));
    }
    Ok(())
}

/// What a peer that passed the handshake asked for.
enum Purpose {
    /// NBD, joined to the daemon.
    Nbd(UnixStream),
    /// A served copy's chunk sums.
    Sums,
}

/// The gate's side of the handshake; `daemon` is connected after the peer's proof checked and
/// before the gate's own goes out, so that a relay is never joined to a copy server that is not
/// there (it sees that as it saw a refused connection before the gate: nothing to join).
async fn server_handshake(s: &mut CopyStream, key: &ClusterKey, peer: &str, daemon: &Path) -> Result<Purpose, ChannelError> {
    let io = |source| ChannelError::Io { peer: peer.to_string(), source };
    let refused = |why| ChannelError::Refused { peer: peer.to_string(), why };
    let server_nonce = nonce();
    let mut hello = Vec::with_capacity(MAGIC.len() + COPY_NONCE_LEN);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&server_nonce);
    s.write_all(&hello).await.map_err(io)?;
    s.flush().await.map_err(io)?;
    let mut answer = [0u8; MAGIC.len() + COPY_NONCE_LEN + PROOF_LEN];
    s.read_exact(&mut answer).await.map_err(io)?;
    let (magic, rest) = answer.split_at(MAGIC.len());
    let (client_nonce, proof) = rest.split_at(COPY_NONCE_LEN);
    let client_nonce: [u8; COPY_NONCE_LEN] = client_nonce.try_into().map_err(|_| refused("short answer"))?;
    if (magic != MAGIC && magic != SUMS_MAGIC) || !key.verify_copy_proof(CopySide::Client, &server_nonce, &client_nonce, proof) {
        return Err(refused("the peer does not hold the cluster secret"));
    }
    let purpose = if magic == MAGIC {
        Purpose::Nbd(UnixStream::connect(daemon).await.map_err(|source| ChannelError::Daemon { path: daemon.display().to_string(), source })?)
    } else {
        Purpose::Sums
    };
    s.write_all(&key.copy_proof(CopySide::Server, &server_nonce, &client_nonce)).await.map_err(io)?;
    s.flush().await.map_err(io)?;
    Ok(purpose)
}

/// Where the gate finds the image a served export reads, once no earlier write can still reach
/// it (`sitecopy`); or why not.
pub type SumsSource = Arc<dyn Fn(String) -> crate::BoxFuture<'static, Result<PathBuf, String>> + Send + Sync>;

/// Answers a sums request: reads the export's name and length, sums its image and sends the
/// sums, or why not.
async fn answer_sums(s: &mut CopyStream, peer: &str, sums: Option<&SumsSource>) -> Result<(), ChannelError> {
    let io = |source| ChannelError::Io { peer: peer.to_string(), source };
    let mut n = [0u8; 1];
    s.read_exact(&mut n).await.map_err(io)?;
    let mut name = vec![0u8; usize::from(n[0])];
    s.read_exact(&mut name).await.map_err(io)?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len).await.map_err(io)?;
    let (export, len) = (String::from_utf8_lossy(&name).into_owned(), u64::from_be_bytes(len));
    let image = match sums {
        None => Err(format!("{export} is not served here")),
        Some(f) => f(export.clone()).await,
    };
    let answer = match image {
        Err(why) => Err(why),
        Ok(path) => match tokio::task::spawn_blocking(move || ChunkSums::of_file(&path, len)).await {
            Ok(Ok(sums)) => Ok(sums),
            Ok(Err(e)) => Err(chain(&e)),
            Err(e) => Err(format!("summing stopped: {e}")),
        },
    };
    let mut out = Vec::new();
    match answer {
        Ok(sums) => {
            out.push(0);
            out.extend(sums.encode());
        }
        Err(why) => {
            let why: String = why.chars().take(1000).collect();
            out.push(1);
            out.extend_from_slice(&u16::try_from(why.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(why.as_bytes());
        }
    }
    s.write_all(&out).await.map_err(io)?;
    s.flush().await.map_err(io)
}

/// The gate in front of a copy server: listens on the network, and joins each connection that
/// passes TLS (if any) and the handshake to the daemon's unix socket.
pub struct CopyGate {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CopyGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CopyGate {
    /// Listens on `listen` (`ip:port`) for relays of other sites, joining them to `daemon`;
    /// chunk sums are read from the images `sums` names (none: every sums request is refused).
    pub async fn start(listen: &str, daemon: &Path, creds: Arc<CopyCredentials>, sums: Option<SumsSource>) -> std::io::Result<CopyGate> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let daemon: Arc<PathBuf> = Arc::new(daemon.to_path_buf());
        let open = Arc::new(tokio::sync::Semaphore::new(MAX_GATE_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!("copy gate: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
                    tracing::warn!("copy gate: {MAX_GATE_CONNECTIONS} connections open; {peer} refused");
                    continue;
                };
                let (creds, daemon, sums) = (Arc::clone(&creds), Arc::clone(&daemon), sums.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = carry(tcp, &peer.to_string(), &daemon, &creds, sums.as_ref()).await {
                        tracing::warn!("copy gate: {}", chain(&e));
                    }
                });
            }
        });
        Ok(CopyGate { addr, task })
    }

    /// Where it listens.
    #[must_use]
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

/// One connection through the gate: TLS and the handshake within their deadline, then the bytes
/// both ways until either side ends.
async fn carry(tcp: TcpStream, peer: &str, daemon: &Path, creds: &CopyCredentials, sums: Option<&SumsSource>) -> Result<(), ChannelError> {
    let _ = tcp.set_nodelay(true);
    let through = async {
        let mut s: CopyStream = match &creds.acceptor {
            Some(a) => Box::new(a.accept(tcp).await.map_err(|source| ChannelError::Tls { peer: peer.to_string(), source })?),
            None => Box::new(tcp),
        };
        let purpose = server_handshake(&mut s, &creds.key, peer, daemon).await?;
        Ok::<_, ChannelError>((s, purpose))
    };
    let (mut stream, purpose) = tokio::time::timeout(GATE_HANDSHAKE_TIMEOUT, through).await.map_err(|_| ChannelError::Timeout { peer: peer.to_string() })??;
    match purpose {
        Purpose::Nbd(mut unix) => {
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut unix).await;
            Ok(())
        }
        Purpose::Sums => answer_sums(&mut stream, peer, sums).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    fn key(secret: &[u8]) -> ClusterKey {
        ClusterKey::new(secret).expect("key")
    }

    /// A daemon stand-in that echoes what it gets.
    fn echo_daemon(path: &Path) {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-copychannel-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_with_the_cluster_key_reaches_the_copy_server() {
        let dir = scratch("ok");
        echo_daemon(&dir.join("d.sock"));
        let creds = Arc::new(CopyCredentials::plain(key(b"the cluster secret, 16+ bytes")));
        let gate = CopyGate::start("127.113.0.1:0", &dir.join("d.sock"), Arc::clone(&creds), None).await.expect("gate");
        let mut s = connect(&gate.addr().to_string(), &creds).await.expect("through the gate");
        s.write_all(b"NBD bytes").await.expect("write");
        let mut back = [0u8; 9];
        s.read_exact(&mut back).await.expect("echo");
        assert_eq!(&back, b"NBD bytes");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The gate sums a served copy where it lives; it refuses one it does not serve, one of
    /// another length, and a peer without the key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_gets_the_chunk_sums_of_a_served_copy() {
        let dir = scratch("sums");
        let image = dir.join("vm-disk0.raw");
        let mut data = vec![0u8; 3 * 64 * 1024];
        data[100_000] = 42;
        std::fs::write(&image, &data).expect("image");
        let served = image.clone();
        let source: SumsSource = Arc::new(move |export: String| {
            let found = (export == "vm-disk0").then(|| served.clone()).ok_or(format!("{export} is not served here"));
            Box::pin(async move { found })
        });
        let creds = Arc::new(CopyCredentials::plain(key(b"the cluster secret, 16+ bytes")));
        let gate = CopyGate::start("127.113.0.1:0", &dir.join("d.sock"), Arc::clone(&creds), Some(source)).await.expect("gate");
        let addr = gate.addr().to_string();
        let limit = Duration::from_secs(10);
        let sums = fetch_sums(&addr, &creds, "vm-disk0", data.len() as u64, limit).await.expect("sums");
        assert_eq!(sums, ChunkSums::of_file(&image, data.len() as u64).expect("local sums"));
        assert_eq!(sums.sums().len(), 3);
        let err = fetch_sums(&addr, &creds, "other-disk0", data.len() as u64, limit).await.expect_err("not served");
        assert!(chain(&err).contains("not served"), "{}", chain(&err));
        let err = fetch_sums(&addr, &creds, "vm-disk0", 4096, limit).await.expect_err("another length");
        assert!(chain(&err).contains("bytes"), "{}", chain(&err));
        let theirs = CopyCredentials::plain(key(b"another cluster's secret ....."));
        let err = fetch_sums(&addr, &theirs, "vm-disk0", data.len() as u64, limit).await.expect_err("refused");
        assert!(matches!(err, ChannelError::Refused { .. } | ChannelError::Io { .. } | ChannelError::Sums { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Another cluster's relay is refused by the gate before the daemon sees a byte, and a relay
    /// refuses a gate of another cluster before sending one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn either_end_without_the_cluster_key_is_refused() {
        let dir = scratch("refused");
        let daemon = dir.join("d.sock");
        let _ = std::fs::remove_file(&daemon);
        let listener = UnixListener::bind(&daemon).expect("bind");
        let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&reached);
        tokio::spawn(async move {
            while let Ok((_s, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let ours = Arc::new(CopyCredentials::plain(key(b"the cluster secret, 16+ bytes")));
        let theirs = CopyCredentials::plain(key(b"another cluster's secret ....."));
        let gate = CopyGate::start("127.113.0.1:0", &daemon, Arc::clone(&ours), None).await.expect("gate");
        let err = connect(&gate.addr().to_string(), &theirs).await.err().expect("refused");
        assert!(matches!(err, ChannelError::Refused { .. } | ChannelError::Io { .. }), "{err}");
        // A gate of another cluster: the relay refuses it on its proof.
        let foreign = CopyGate::start("127.113.0.1:0", &daemon, Arc::new(theirs), None).await.expect("gate");
        let err = connect(&foreign.addr().to_string(), &ours).await.err().expect("refused");
        assert!(matches!(err, ChannelError::Refused { .. } | ChannelError::Io { .. }), "{err}");
        // A plain NBD client (or anything else) never gets past the hello either.
        let mut raw = TcpStream::connect(gate.addr()).await.expect("tcp");
        let mut hello = [0u8; MAGIC.len() + COPY_NONCE_LEN];
        raw.read_exact(&mut hello).await.expect("hello");
        raw.write_all(&[0u8; MAGIC.len() + COPY_NONCE_LEN + PROOF_LEN]).await.expect("write");
        let mut more = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut more)).await.expect("closed in time").unwrap_or(0);
        assert_eq!(n, 0, "the gate closed the connection");
        assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0, "no refused peer reached the daemon");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A peer that connects and says nothing is dropped after the deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_peer_is_dropped_after_the_deadline() {
        let dir = scratch("silent");
        echo_daemon(&dir.join("d.sock"));
        let creds = Arc::new(CopyCredentials::plain(key(b"the cluster secret, 16+ bytes")));
        let gate = CopyGate::start("127.113.0.1:0", &dir.join("d.sock"), creds, None).await.expect("gate");
        let mut raw = TcpStream::connect(gate.addr()).await.expect("tcp");
        let mut hello = [0u8; MAGIC.len() + COPY_NONCE_LEN];
        raw.read_exact(&mut hello).await.expect("hello");
        let since = std::time::Instant::now();
        let mut more = [0u8; 1];
        let n = tokio::time::timeout(GATE_HANDSHAKE_TIMEOUT * 2, raw.read(&mut more)).await.expect("closed").unwrap_or(0);
        assert_eq!(n, 0);
        assert!(since.elapsed() >= GATE_HANDSHAKE_TIMEOUT - Duration::from_millis(500), "closed after {:?}, before the deadline", since.elapsed());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
