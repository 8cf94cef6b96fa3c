//! The disk witness's Raft node: the same storage and state machine as a host's, on a
//! database in the witness region, run by whichever host holds the witness; and the route by
//! which every node reaches it.

use super::{Consensus, ConsensusError, Network};
use crate::io::PeerRpc;
use crate::witness::{RegionBackend, WitnessRegion};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use tandem_core::timing::Timings;
use tandem_core::witness::WITNESS_NODE;
use thiserror::Error;

/// The witness's database cache: its state is one cluster state and a bounded log.
const WITNESS_CACHE_BYTES: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum WitnessError {
    #[error("no host holds the disk witness now")]
    NoHolder,
}

/// Where the disk witness answers: the API address of the host that holds it (or claims it),
/// as the witness loop last read the claims. Shared by this host's node and the witness node
/// it may run.
#[derive(Clone, Debug, Default)]
pub struct WitnessRoute(Arc<Mutex<Option<String>>>);

impl WitnessRoute {
    #[must_use]
    pub fn holder_addr(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn set(&self, addr: Option<String>) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = addr;
    }
}

impl Consensus {
    /// Opens the witness's node on the database in `region` (created there when the region is
    /// new). `closed` refuses every write once set.
    pub async fn open_witness(
        region: Arc<dyn WitnessRegion>,
        closed: Arc<AtomicBool>,
        lease: crate::witness::LeaseCheck,
        token: String,
        rpc: Arc<dyn PeerRpc>,
        route: WitnessRoute,
        timings: &Timings,
    ) -> Result<Consensus, ConsensusError> {
        let backend = RegionBackend::open(region, closed, lease).map_err(|e| ConsensusError::Raft(format!("disk witness region: {e}")))?;
        let db = redb::Database::builder()
            .set_cache_size(WITNESS_CACHE_BYTES)
            .create_with_backend(backend)
            .map_err(|source| ConsensusError::Open { path: "disk witness region".into(), source })?;
        // The witness never stands for election by itself: a host always can when its log is
        // as up to date, and when the witness's is ahead of every live host's (a leader's last
        // entries reached the witness and no other host) its holder has it stand (see the
        // witness loop), then takes over once it caught up.
        Consensus::start(
            Arc::new(db),
            WITNESS_NODE,
            Network { token, rpc, witness: route, muted: Arc::default(), peer_logs: super::PeerLogs::default() },
            timings,
            false,
        )
        .await
    }
}
