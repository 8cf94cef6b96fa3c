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
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(|source| HttpError::Connect { addr: addr.to_string(), source })?;
        let _ = stream.set_nodelay(true);
        match tls {
            Some(tls) => {
                let stream = tls.connect(addr, stream).await.map_err(|source| HttpError::Connect { addr: addr.to_string(), source })?;
                exchange(stream, method, addr, path, token, body).await
            }
            None => exchange(stream, method, addr, path, token, body).await,
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| HttpError::Timeout { addr: addr.to_string(), timeout })?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    method: &str,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Response, HttpError> {
    {
        let protocol = |detail: String| HttpError::Protocol { addr: addr.to_string(), detail };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| protocol(e.to_string()))?;
        let conn_task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder().method(method).uri(path).header("host", addr).header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| protocol(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| protocol(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE).collect().await.map_err(|e| protocol(e.to_string()))?.to_bytes();
        conn_task.abort();
        Ok(Response { status, body })
    }
}
