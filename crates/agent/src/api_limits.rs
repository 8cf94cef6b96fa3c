//! Bounds on what API clients can hold: open connections, request time. (Bodies are capped
//! by the router, headers by hyper's own limits.)
//!
//! A client that opens connections and never finishes a request must not exhaust the agent's
//! descriptors or memory; a request that never completes must not hold a task forever.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections the API serves at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 512;
/// A request that takes longer is answered 503 (a snapshot transfer chunk is the slowest
/// legitimate one, well under this).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A listener that accepts a connection only while fewer than `MAX_CONNECTIONS` are open.
pub struct CappedListener<L> {
    inner: L,
    slots: Arc<Semaphore>,
}

impl<L> CappedListener<L> {
    pub fn new(inner: L, max: usize) -> CappedListener<L> {
        CappedListener { inner, slots: Arc::new(Semaphore::new(max)) }
    }
}

/// A connection holding its slot until it closes.
pub struct Capped<S> {
    inner: S,
    _slot: OwnedSemaphorePermit,
}

impl<L: axum::serve::Listener> axum::serve::Listener for CappedListener<L>
where
    L::Io: Unpin,
{
    type Io = Capped<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so acquiring only waits.
        let slot = match Arc::clone(&self.slots).acquire_owned().await {
            Ok(s) => s,
            Err(_) => std::future::pending().await,
        };
        let (io, addr) = self.inner.accept().await;
        (Capped { inner: io, _slot: slot }, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Answers 503 for a request still running after [`REQUEST_TIMEOUT`].
pub async fn deadline(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "error": format!("request took longer than {REQUEST_TIMEOUT:?}") })))
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With every slot taken, a new connection waits in the accept queue until one closes.
    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        use axum::serve::Listener;
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let mut l = CappedListener::new(tcp, 1);
        let first = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (held, _) = l.accept().await;
        let _second = tokio::net::TcpStream::connect(addr).await.expect("queued in the backlog");
        assert!(tokio::time::timeout(Duration::from_millis(200), l.accept()).await.is_err(), "a second connection got a slot");
        drop(held);
        drop(first);
        assert!(tokio::time::timeout(Duration::from_secs(2), l.accept()).await.is_ok(), "a freed slot is given to the waiting connection");
    }
}
