//! The agent's side of the network witness: its heartbeat area as a [`SlotDevice`] (one request
//! per liveness round: write this host's slot, read every slot's record back) and its witness
//! region as a [`WitnessRegion`] (the redb backend's reads and writes, in spans of at most
//! [`MAX_IO`]), both over the agents' HTTP client with a deadline on every request.

use super::{MAX_IO, PREFIX, REGION_BYTES, REGION_QUEUE, REGION_TIMEOUT};
use crate::disk::DiskError;
use crate::httpc::ConnectionPool;
use crate::io::{SlotDevice, SlotRound};
use crate::witness::WitnessRegion;
use std::time::Duration;
use tandem_core::HostId;
use tandem_drivers::BoxFuture;

/// Where one cluster's areas are served, and how to ask.
pub struct WitnessClient {
    witness: crate::config::NetworkWitness,
    token: String,
    pool: ConnectionPool,
}

impl std::fmt::Debug for WitnessClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.witness)
    }
}

impl WitnessClient {
    /// A client of `witness` presenting `token` (the cluster's peer token).
    #[must_use]
    pub fn new(witness: &crate::config::NetworkWitness, token: String, tls: Option<crate::tls::ClientTls>) -> WitnessClient {
        WitnessClient { witness: witness.clone(), token, pool: ConnectionPool::new(tls) }
    }

    async fn call(&self, path: &str, body: Option<Vec<u8>>, timeout: Duration) -> std::io::Result<axum::body::Bytes> {
        let method = if body.is_some() { "POST" } else { "GET" };
        let path = format!("{PREFIX}/{}{path}", self.witness.cluster);
        let resp = self.pool.request(method, &self.witness.address, &path, Some(&self.token), body, timeout).await.map_err(std::io::Error::other)?;
        if !(200..300).contains(&resp.status) {
            return Err(std::io::Error::other(format!("{} answered HTTP {}: {}", self.witness, resp.status, String::from_utf8_lossy(&resp.body).trim())));
        }
        Ok(resp.body)
    }

    async fn read_region(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        for (i, chunk) in out.chunks_mut(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            let bytes = self.call(&format!("/region?offset={at}&len={}", chunk.len()), None, REGION_TIMEOUT).await?;
            if bytes.len() != chunk.len() {
                return Err(std::io::Error::other(format!("{} sent {} bytes for a read of {}", self.witness, bytes.len(), chunk.len())));
            }
            chunk.copy_from_slice(&bytes);
        }
        Ok(())
    }

    async fn write_region(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        for (i, chunk) in data.chunks(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            self.call(&format!("/region?offset={at}"), Some(chunk.to_vec()), REGION_TIMEOUT).await?;
        }
        Ok(())
    }
}

/// The heartbeat area kept by the witness.
pub struct NetSlotDevice {
    client: WitnessClient,
    /// The deadline of one request (the disk I/O timeout).
    timeout: Duration,
}

impl NetSlotDevice {
    #[must_use]
    pub fn new(client: WitnessClient, timeout: Duration) -> NetSlotDevice {
        NetSlotDevice { client, timeout }
    }
}

impl SlotDevice for NetSlotDevice {
    fn write_slot(&self, slot: HostId, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), DiskError>> {
        Box::pin(async move { self.client.call(&format!("/heartbeat/{}", slot.0), Some(bytes), self.timeout).await.map(|_| ()).map_err(DiskError::Io) })
    }

    fn read_all(&self) -> BoxFuture<'_, Result<Vec<u8>, DiskError>> {
        Box::pin(async move { self.client.call("/heartbeat", None, self.timeout).await.map(|b| b.to_vec()).map_err(DiskError::Io) })
    }

    /// One request: the witness writes the slot, then reads the area.
    fn write_then_read_all(&self, slot: HostId, bytes: Vec<u8>, timeout: Duration) -> BoxFuture<'_, SlotRound> {
        Box::pin(async move {
            let answer = self.client.call(&format!("/heartbeat/{}", slot.0), Some(bytes), timeout.min(self.timeout)).await;
            match answer {
                Ok(image) => SlotRound { write: Ok(()), read: Ok(image.to_vec()), read_done: None },
                Err(e) => {
                    let again = std::io::Error::new(e.kind(), e.to_string());
                    SlotRound { write: Err(DiskError::Io(e)), read: Err(DiskError::Io(again)), read_done: None }
                }
            }
        })
    }
}

enum RegionRequest {
    Read { offset: u64, len: usize, reply: std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>> },
    Write { offset: u64, data: Vec<u8>, reply: std::sync::mpsc::SyncSender<std::io::Result<()>> },
}

/// The witness region kept by the witness. Its callers (redb's backend) are synchronous: the
/// requests run on a thread of their own with its own small runtime, and each caller waits for
/// its answer with a deadline. The thread owns its client: a kept-alive connection is driven by
/// the runtime that opened it, and this one runs only while a request is under way — a
/// connection of its own lent to the agent's runtime (the heartbeat rounds) would stall there
/// (it did: a new holder's vote took seconds to persist, and its elections timed out).
#[derive(Debug)]
pub struct NetWitnessRegion {
    tx: std::sync::mpsc::SyncSender<RegionRequest>,
}

impl NetWitnessRegion {
    pub fn open(client: WitnessClient) -> std::io::Result<NetWitnessRegion> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<RegionRequest>(REGION_QUEUE);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("witness-io".into()).spawn(move || {
            for req in rx {
                match req {
                    RegionRequest::Read { offset, len, reply } => {
                        let mut out = vec![0u8; len];
                        let r = runtime.block_on(client.read_region(offset, &mut out)).map(|()| out);
                        let _ = reply.send(r);
                    }
                    RegionRequest::Write { offset, data, reply } => {
                        let _ = reply.send(runtime.block_on(client.write_region(offset, &data)));
                    }
                }
            }
        })?;
        Ok(NetWitnessRegion { tx })
    }

    fn ask<T>(&self, req: RegionRequest, rx: &std::sync::mpsc::Receiver<std::io::Result<T>>, bytes: usize) -> std::io::Result<T> {
        self.tx.try_send(req).map_err(|_| std::io::Error::new(std::io::ErrorKind::WouldBlock, "the witness's earlier requests still hang"))?;
        // Each span of a long request has its own deadline; the caller waits for all of them.
        let spans = u32::try_from(bytes.div_ceil(MAX_IO).max(1)).unwrap_or(u32::MAX);
        rx.recv_timeout(REGION_TIMEOUT * spans + REGION_TIMEOUT)
            .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the witness did not answer in time")))
    }
}

impl WitnessRegion for NetWitnessRegion {
    fn read_at(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        let bytes = self.ask(RegionRequest::Read { offset, len: out.len(), reply }, &rx, out.len())?;
        out.copy_from_slice(&bytes);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        self.ask(RegionRequest::Write { offset, data: data.to_vec(), reply }, &rx, data.len())
    }

    fn size(&self) -> u64 {
        REGION_BYTES
    }
}
