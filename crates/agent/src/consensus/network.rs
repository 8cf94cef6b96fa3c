//! Consensus traffic to peers: openraft's network over the agents' HTTP API, the disk witness
//! reached through its route, and nothing at all from a host that is muted.

use super::{witness, NodeId, TypeConfig, RPC_TIMEOUT, SNAPSHOT_TIMEOUT};
use crate::httpc;
use crate::io::PeerRpc;
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Sends consensus RPCs to peers over their HTTP API.
#[derive(Clone)]
pub struct Network {
    pub(super) token: String,
    pub(super) rpc: Arc<dyn PeerRpc>,
    /// Where the disk witness answers now (see [`witness::WitnessRoute`]).
    pub(super) witness: witness::WitnessRoute,
    /// Set while this host has a reason to fence: it sends no consensus traffic.
    pub(super) muted: Arc<std::sync::atomic::AtomicBool>,
    /// Where each peer's log ended, as its vote requests and answers said.
    pub(super) peer_logs: PeerLogs,
}

/// Where each node's log ended when it last took part in an election with this one (its vote
/// request, or its answer to this node's): what the agent knows of who could win one.
#[derive(Clone, Debug, Default)]
pub struct PeerLogs(Arc<std::sync::Mutex<NotedLogs>>);

/// Each node's last log shown, and the exchange (counted over all nodes) that showed it.
#[derive(Debug, Default)]
struct NotedLogs {
    exchanges: u64,
    logs: std::collections::BTreeMap<NodeId, (tandem_core::witness::LogPosition, u64)>,
}

impl PeerLogs {
    /// Notes where `node`'s log ended. Only node ids a cluster can have (hosts and the disk
    /// witness) are kept, so the map stays bounded whatever a request names.
    pub fn record(&self, node: NodeId, last_log: Option<&openraft::LogId<NodeId>>) {
        if node > tandem_core::witness::WITNESS_NODE {
            return;
        }
        if let Some(id) = last_log {
            let mut noted = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            noted.exchanges += 1;
            let exchange = noted.exchanges;
            noted.logs.insert(node, (super::log_position(id), exchange));
        }
    }

    /// Each node's last log shown, with the exchange that showed it.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(NodeId, tandem_core::witness::LogPosition, u64)> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).logs.iter().map(|(n, (p, e))| (*n, *p, *e)).collect()
    }
}

/// One peer connection.
pub struct PeerLink {
    addr: String,
    target: NodeId,
    token: String,
    rpc: Arc<dyn PeerRpc>,
    /// For the disk witness: the route, read at each call (its holder changes), instead of
    /// `addr`.
    route: Option<witness::WitnessRoute>,
    muted: Arc<std::sync::atomic::AtomicBool>,
    peer_logs: PeerLogs,
}

impl openraft::RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerLink;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerLink {
        let route = (target == tandem_core::witness::WITNESS_NODE).then(|| self.witness.clone());
        PeerLink {
            addr: node.addr.clone(),
            target,
            token: self.token.clone(),
            rpc: Arc::clone(&self.rpc),
            route,
            muted: Arc::clone(&self.muted),
            peer_logs: self.peer_logs.clone(),
        }
    }
}

type RpcErr<E = openraft::error::Infallible> = openraft::error::RPCError<NodeId, BasicNode, openraft::error::RaftError<NodeId, E>>;

impl PeerLink {
    async fn call<Req: Serialize, Resp: for<'de> Deserialize<'de>, E>(&self, path: &str, req: &Req, timeout: Duration) -> Result<Resp, RpcErr<E>>
    where
        E: std::error::Error + for<'de> Deserialize<'de>,
    {
        use openraft::error::{NetworkError, RPCError, RemoteError, Unreachable};
        if self.muted.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other("this host has a reason to fence: it sends no consensus traffic"))));
        }
        let (addr, path) = match &self.route {
            None => (self.addr.clone(), path.to_string()),
            Some(route) => {
                let addr = route.holder_addr().ok_or_else(|| RPCError::Unreachable(Unreachable::new(&witness::WitnessError::NoHolder)))?;
                (addr, path.replacen("/raft/", "/raft/witness/", 1))
            }
        };
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let resp = self.rpc.call(&addr, &path, Some(&self.token), Some(body), timeout).await.map_err(|e| match e {
            httpc::HttpError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            _ => RPCError::Network(NetworkError::new(&e)),
        })?;
        if resp.status != 200 {
            let e = std::io::Error::other(format!("peer answered HTTP {}: {}", resp.status, String::from_utf8_lossy(&resp.body)));
            return Err(RPCError::Network(NetworkError::new(&e)));
        }
        let r: Result<Resp, openraft::error::RaftError<NodeId, E>> =
            serde_json::from_slice(&resp.body).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl openraft::RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
        option: openraft::network::RPCOption,
    ) -> Result<openraft::raft::AppendEntriesResponse<NodeId>, RpcErr> {
        self.call("/raft/append", &rpc, option.hard_ttl().min(RPC_TIMEOUT)).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: openraft::raft::InstallSnapshotRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<openraft::raft::InstallSnapshotResponse<NodeId>, RpcErr<openraft::error::InstallSnapshotError>> {
        self.call("/raft/snapshot", &rpc, SNAPSHOT_TIMEOUT).await
    }

    async fn vote(
        &mut self,
        rpc: openraft::raft::VoteRequest<NodeId>,
        option: openraft::network::RPCOption,
    ) -> Result<openraft::raft::VoteResponse<NodeId>, RpcErr> {
        let answer: openraft::raft::VoteResponse<NodeId> = self.call("/raft/vote", &rpc, option.hard_ttl().min(RPC_TIMEOUT)).await?;
        self.peer_logs.record(self.target, answer.last_log_id.as_ref());
        Ok(answer)
    }
}
