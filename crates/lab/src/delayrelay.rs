//! An inter-site delay for the lab, where there is no netem: a TCP relay that holds every chunk
//! it carries for a fixed one-way delay before passing it on, in order, both ways. A round trip
//! through it takes twice the delay more.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Chunks in flight per direction before the reader waits.
const IN_FLIGHT: usize = 1024;

/// A running delay relay; dropped, it stops accepting (connections under way end with it).
pub struct DelayRelay {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
    /// Connections relayed so far.
    relayed: Arc<AtomicUsize>,
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DelayRelay {
    /// Listens on `listen` and relays each connection to `upstream`, `delay` each way.
    pub async fn start(listen: &str, upstream: &str, delay: Duration) -> std::io::Result<DelayRelay> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let upstream: Arc<str> = upstream.into();
        let relayed = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&relayed);
        let task = tokio::spawn(async move {
            let mut pairs = Vec::new();
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(&*upstream).await else { continue };
                counted.fetch_add(1, Ordering::Relaxed);
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                pairs.push(tokio::spawn(carry(dr, uw, delay)));
                pairs.push(tokio::spawn(carry(ur, dw, delay)));
            }
            for p in pairs {
                p.abort();
            }
        });
        Ok(DelayRelay { addr, task, relayed })
    }

    /// How many connections it has relayed to its upstream.
    #[must_use]
    pub fn relayed(&self) -> usize {
        self.relayed.load(Ordering::Relaxed)
    }
}

/// Waits until `due`, to within a few microseconds. The runtime's timer fires on whole
/// milliseconds and late — a chunk held by it alone would lose up to a millisecond each way
/// (measured: a 0 ms relay added 2.5 ms to a round trip) — so it sleeps to two milliseconds
/// short of `due` (the timer may fire a millisecond late) and yields the rest.
async fn hold_until(due: tokio::time::Instant) {
    let coarse = due.checked_sub(Duration::from_millis(2));
    if let Some(c) = coarse.filter(|c| *c > tokio::time::Instant::now()) {
        tokio::time::sleep_until(c).await;
    }
    while tokio::time::Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

/// One direction: each chunk read is written `delay` after it arrived, in order.
async fn carry(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            hold_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_trip_takes_twice_the_delay_more() {
        let echo = TcpListener::bind("127.105.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.expect("accept");
            let mut b = [0u8; 4];
            while s.read_exact(&mut b).await.is_ok() {
                if s.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
        let relay = DelayRelay::start("127.105.0.1:0", &echo_addr.to_string(), Duration::from_millis(20)).await.expect("relay");
        let mut c = TcpStream::connect(relay.addr).await.expect("connect");
        let started = tokio::time::Instant::now();
        c.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.expect("read");
        assert_eq!(&b, b"ping", "bytes pass in order");
        let rtt = started.elapsed();
        assert!(rtt >= Duration::from_millis(40), "a round trip through the relay took {rtt:?}");
    }
}
