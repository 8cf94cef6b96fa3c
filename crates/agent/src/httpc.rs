//! A minimal HTTP/1.1 JSON client on hyper, with a deadline on every request and a cap on the
//! response size. Used for consensus RPCs, write forwarding and the CLI.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The largest response body accepted.
pub const MAX_RESPONSE: usize = 64 << 20;

/// A failed request.
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("could not connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("request to {addr} timed out after {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("HTTP exchange with {addr} failed: {detail}")]
    Protocol { addr: String, detail: String },
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

/// Sends one request (`body` None → GET, else POST/DELETE with a JSON body), over TLS when
/// `tls` is given.
pub async fn request(
    tls: Option<&crate::tls::ClientTls>,
    method: &str,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    within(addr, timeout, exchange(tls, method, addr, path, token, body)).await
}

/// Runs one request's exchange under its deadline (connecting included).
async fn within(addr: &str, timeout: Duration, exchange: impl std::future::Future<Output = Result<Response, HttpError>>) -> Result<Response, HttpError> {
    tokio::time::timeout(timeout, exchange).await.map_err(|_| HttpError::Timeout { addr: addr.to_string(), timeout })?
}

/// An open HTTP/1.1 connection: the handle that sends requests on it, and the task that drives it
/// (aborted when the connection is dropped).
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
    idle_since: std::time::Instant,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Connects to `addr` (over TLS when `tls` is given) and completes the HTTP/1.1 handshake.
async fn connect(tls: Option<&crate::tls::ClientTls>, addr: &str) -> Result<Connection, HttpError> {
    let stream = TcpStream::connect(addr).await.map_err(|source| HttpError::Connect { addr: addr.to_string(), source })?;
    let _ = stream.set_nodelay(true);
    match tls {
        Some(tls) => {
            let stream = tls.connect(addr, stream).await.map_err(|source| HttpError::Connect { addr: addr.to_string(), source })?;
            handshake(stream, addr).await
        }
        None => handshake(stream, addr).await,
    }
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, addr: &str) -> Result<Connection, HttpError> {
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| HttpError::Protocol { addr: addr.to_string(), detail: e.to_string() })?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Connection { sender, driver, idle_since: std::time::Instant::now() })
}

/// Sends one request on `conn` and reads the whole answer.
async fn send(conn: &mut Connection, method: &str, addr: &str, path: &str, token: Option<&str>, body: Option<Vec<u8>>) -> Result<Response, HttpError> {
    let protocol = |detail: String| HttpError::Protocol { addr: addr.to_string(), detail };
    let mut req = Request::builder().method(method).uri(path).header("host", addr).header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| protocol(e.to_string()))?;
    let resp = conn.sender.send_request(req).await.map_err(|e| protocol(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE).collect().await.map_err(|e| protocol(e.to_string()))?.to_bytes();
    Ok(Response { status, body })
}

async fn exchange(
    tls: Option<&crate::tls::ClientTls>,
    method: &str,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Response, HttpError> {
    let mut conn = connect(tls, addr).await?;
    send(&mut conn, method, addr, path, token, body).await
}

/// Idle connections kept per peer.
pub const POOL_PER_PEER: usize = 2;
/// A connection idle longer than this is closed rather than reused.
pub const POOL_IDLE: Duration = Duration::from_secs(30);
/// Peers with idle connections kept at most (a cluster's hosts, with room for replaced ones).
pub const POOL_PEERS: usize = 2 * tandem_core::MAX_HOSTS;

/// Keep-alive connections to peer agents, for the requests they send each other many times a
/// second (consensus heartbeats and log appends). Connecting anew for each one cost the leader
/// a TCP connection per follower per consensus heartbeat; at a few dozen hosts on a busy machine
/// those connects alone outlasted the append deadline and set off election storms. A connection
/// that fails is dropped, never returned; the caller's deadline covers connecting and the exchange.
#[derive(Default)]
pub struct ConnectionPool {
    tls: Option<crate::tls::ClientTls>,
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<Connection>>>,
}

impl ConnectionPool {
    /// A pool whose connections use TLS when `tls` is given.
    #[must_use]
    pub fn new(tls: Option<crate::tls::ClientTls>) -> ConnectionPool {
        ConnectionPool { tls, idle: std::sync::Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Vec<Connection>>> {
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle connection to `addr` that is still open, if one is kept.
    fn checkout(&self, addr: &str) -> Option<Connection> {
        let mut idle = self.lock();
        let list = idle.get_mut(addr)?;
        while let Some(c) = list.pop() {
            if c.sender.is_ready() && c.idle_since.elapsed() < POOL_IDLE {
                return Some(c);
            }
        }
        None
    }

    /// Keeps `conn` for the next request to `addr`, within the pool's bounds.
    fn checkin(&self, addr: &str, mut conn: Connection) {
        conn.idle_since = std::time::Instant::now();
        let mut idle = self.lock();
        if !idle.contains_key(addr) && idle.len() >= POOL_PEERS {
            // A peer no longer used (a replaced host's old address) gives way.
            idle.retain(|_, list| list.iter().any(|c| c.idle_since.elapsed() < POOL_IDLE));
            if idle.len() >= POOL_PEERS {
                return;
            }
        }
        let list = idle.entry(addr.to_string()).or_default();
        if list.len() < POOL_PER_PEER {
            list.push(conn);
        }
    }

    /// Like [`request`], on a kept connection when one is open.
    pub async fn request(
        &self,
        method: &str,
        addr: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let exchange = async {
            let mut conn = match self.checkout(addr) {
                Some(c) => c,
                None => connect(self.tls.as_ref(), addr).await?,
            };
            let answer = send(&mut conn, method, addr, path, token, body).await?;
            self.checkin(addr, conn);
            Ok(answer)
        };
        within(addr, timeout, exchange).await
    }

    /// Idle connections kept now (for tests).
    #[must_use]
    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    /// A server that answers every request on a connection with a small keep-alive response, and
    /// counts the connections it accepted.
    fn keepalive_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&accepted);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut stream = stream;
                    loop {
                        let mut line = String::new();
                        // Headers up to the blank line; the test's requests have no body.
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Requests to one peer reuse one connection: the server accepts it once, and the pool
    /// keeps it idle between requests.
    #[tokio::test]
    async fn the_pool_reuses_a_connection() {
        let (addr, accepted) = keepalive_server();
        let pool = ConnectionPool::default();
        for _ in 0..5 {
            let r = pool.request("GET", &addr, "/", None, None, Duration::from_secs(5)).await.expect("answer");
            assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]));
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "five requests, one connection");
        assert_eq!(pool.idle_count(), 1);
        // A one-shot request connects anew each time.
        request(None, "GET", &addr, "/", None, None, Duration::from_secs(5)).await.expect("answer");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
