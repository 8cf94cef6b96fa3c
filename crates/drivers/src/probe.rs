//! One attempt of a VM's service probe over the network: a TCP connection, or an HTTP/1.0 GET
//! whose status and (bounded) answer are read. The agent decides when to try and what the
//! answer means for its timeline; this only asks, within a deadline.

use std::time::Duration;
use tandem_core::state::ServiceProbe;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The most of an HTTP answer read to find the status and the expected text.
pub const MAX_PROBE_ANSWER: usize = 16 * 1024;

/// Why an attempt did not find the service answering.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("no answer from {address} within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("{address} refused or failed")]
    Io {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{address} answered '{status_line}', not 2xx")]
    Status { address: String, status_line: String },
    #[error("{address} answered without '{expect}' in its first {MAX_PROBE_ANSWER} bytes")]
    Unexpected { address: String, expect: String },
}

/// One attempt: Ok when the service answers as `probe` asks, on the host whose address is
/// `host_ip`, within `timeout` (connection, request and answer together).
pub async fn attempt(probe: &ServiceProbe, host_ip: &str, timeout: Duration) -> Result<(), ProbeError> {
    let address = probe.address_on(host_ip);
    match tokio::time::timeout(timeout, ask(probe, &address)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout { address, timeout }),
    }
}

async fn ask(probe: &ServiceProbe, address: &str) -> Result<(), ProbeError> {
    let io = |source| ProbeError::Io { address: address.to_string(), source };
    let mut stream = tokio::net::TcpStream::connect(address).await.map_err(io)?;
    let ServiceProbe::Http { path, expect, .. } = probe else {
        return Ok(());
    };
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n").as_bytes()).await.map_err(io)?;
    let mut answer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while answer.len() < MAX_PROBE_ANSWER {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n.min(MAX_PROBE_ANSWER - answer.len())]);
    }
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or_default();
    let ok = status_line.split_whitespace().nth(1).is_some_and(|code| code.len() == 3 && code.starts_with('2'));
    if !ok {
        return Err(ProbeError::Status { address: address.to_string(), status_line: status_line.chars().take(120).collect() });
    }
    match expect {
        Some(e) if !text.contains(e.as_str()) => Err(ProbeError::Unexpected { address: address.to_string(), expect: e.clone() }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot HTTP server that answers `answer` to the first request.
    async fn serve(answer: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    fn http(address: &str, expect: Option<&str>) -> ServiceProbe {
        ServiceProbe::Http { address: address.into(), path: "/health".into(), expect: expect.map(Into::into) }
    }

    #[tokio::test]
    async fn a_probe_needs_the_status_and_the_text_it_asks_for() {
        let up = serve("HTTP/1.0 200 OK\r\n\r\nbooted 1\n").await;
        attempt(&http(&up, Some("booted")), "127.0.0.1", Duration::from_secs(2)).await.expect("answers");
        attempt(&ServiceProbe::Tcp { address: up.clone() }, "127.0.0.1", Duration::from_secs(2)).await.expect("accepts");
        let e = attempt(&http(&up, Some("ready")), "127.0.0.1", Duration::from_secs(2)).await;
        assert!(matches!(e, Err(ProbeError::Unexpected { .. })), "{e:?}");
        let down = serve("HTTP/1.0 503 Service Unavailable\r\n\r\n").await;
        let e = attempt(&http(&down, None), "127.0.0.1", Duration::from_secs(2)).await;
        assert!(matches!(e, Err(ProbeError::Status { .. })), "{e:?}");
        // Via {host_ip}: the probe's address is resolved on the host that runs the VM.
        let port = up.rsplit_once(':').map(|(_, p)| p.to_string()).expect("port");
        attempt(&http(&format!("{{host_ip}}:{port}"), None), "127.0.0.1", Duration::from_secs(2)).await.expect("resolved");
    }

    #[tokio::test]
    async fn a_silent_service_times_out_and_a_closed_port_is_refused() {
        // Accepts but never answers.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let silent = l.local_addr().expect("addr").to_string();
        let e = attempt(&http(&silent, None), "127.0.0.1", Duration::from_millis(200)).await;
        assert!(matches!(e, Err(ProbeError::Timeout { .. })), "{e:?}");
        drop(l);
        let e = attempt(&ServiceProbe::Tcp { address: silent }, "127.0.0.1", Duration::from_secs(2)).await;
        assert!(matches!(e, Err(ProbeError::Io { .. })), "{e:?}");
    }
}
