//! The network witness (`tandem witness`): a small process, running no VMs, that keeps for each
//! cluster it serves the two areas such a cluster otherwise keeps on shared storage — the
//! heartbeat area (a header and one slot per host) and the witness region (the claim blocks and
//! the database of the third Raft vote) — and serves them over HTTP(S) to that cluster's agents,
//! who authenticate with the cluster's peer token, as they do to each other.
//!
//! Agents reach these areas through the same seams as shared storage (`io::SlotDevice`,
//! `witness::WitnessRegion`): the decisions — who holds the witness, who is dead, who fences —
//! are the ones argued for the disk witness, on a device that happens to be a process. Its loss
//! is the loss of that device: a healthy cluster hears itself over the network and goes on, and
//! the agents say so (`witness-unreachable`).

pub mod client;
pub mod server;

use std::time::Duration;

/// Bytes one region request may read or write; a client splits longer spans.
pub const MAX_IO: usize = 1 << 20;
/// The witness region each cluster gets: what the disk witness needs, rounded up to a MiB.
pub const REGION_BYTES: u64 = crate::witness::MIN_REGION_BYTES.div_ceil(1 << 20) * (1 << 20);
/// Clusters one witness serves.
pub const MAX_CLUSTERS: usize = 64;
/// Connections the witness serves at once (every host of every cluster keeps one or two).
pub const MAX_CONNECTIONS: usize = 1024;
/// The URL prefix of a cluster's areas.
pub const PREFIX: &str = "/witness/v1";

/// How long a region request may take from the agent's side (the heartbeat area's requests
/// take the disk I/O timeout instead).
pub const REGION_TIMEOUT: Duration = Duration::from_secs(2);
/// Region requests queued behind the one in flight; more means the witness hangs.
pub const REGION_QUEUE: usize = 4;

#[cfg(test)]
mod tests;
