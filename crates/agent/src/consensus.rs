//! Replicated desired state on openraft. Everything openraft-specific stays in this module.
//!
//! The log, the vote and the state machine live in one redb database in the data directory;
//! every write transaction is durable before openraft is told it happened, so a host that loses
//! power keeps every entry it acknowledged. The state machine is small (the desired state) and is
//! persisted whole after every applied batch, so a restart needs no replay.

mod network;
pub mod witness;

pub use network::{Network, PeerLogs};

use crate::heavy::HeavyWork;
use crate::io::PeerRpc;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_core::logformat::LogEntry;
use tandem_core::state::{Applied, ClusterState, Command, StateError};
use tandem_core::timing::Timings;
use thiserror::Error;
use tokio::sync::watch;

/// The outcome of one command, as replicated.
pub type CommandResult = Result<Applied, StateError>;

openraft::declare_raft_types!(
    /// Tandem's openraft type configuration.
    pub TypeConfig:
        D = LogEntry,
        R = CommandResult,
        NodeId = u64,
        Node = BasicNode,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::raft_runtime::SeededTokio,
);

type Raft = openraft::Raft<TypeConfig>;
type NodeId = u64;
type SErr = StorageError<NodeId>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Requests slower than this count as lost; openraft retries.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// A snapshot transfer chunk.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a command is judged again when the state moved on before its verdict committed
/// (the coordinator's placements commit in between; judged commands themselves take turns).
pub const ADMISSION_ATTEMPTS: u32 = 10;

/// How long a proposal on this host may wait for its entry to commit and apply. Past it the
/// outcome is unknown (the entry may still commit, under a later leader): callers treat it as
/// such. Unbounded, a leader cut off with a proposal in flight (its own rejoin) waited until the
/// partition healed, and then took an answer given 12 s after it asked.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Consensus failures.
#[derive(Debug, Error)]
pub enum ConsensusError {
    #[error("could not open the consensus database {path}")]
    Open {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("consensus storage failed")]
    Storage(#[from] Box<SErr>),
    #[error("openraft refused to start")]
    Start(#[from] Box<openraft::error::Fatal<NodeId>>),
    #[error("this host is not the leader; the leader is {0:?}")]
    NotLeader(Option<String>),
    #[error("the cluster is already initialized")]
    AlreadyInitialized,
    #[error("consensus operation failed: {0}")]
    Raft(String),
    #[error("the proposal did not commit within {0:?}; it may still commit later")]
    Undecided(Duration),
    #[error("command would not read back from the log, refused: {0}")]
    Unencodable(String),
}

fn io_err(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

fn put_meta(db: &Database, key: &str, value: &[u8]) -> Result<(), AnyError> {
    let tx = db.begin_write().map_err(io_err)?;
    {
        let mut t = tx.open_table(META).map_err(io_err)?;
        t.insert(key, value).map_err(io_err)?;
    }
    tx.commit().map_err(io_err)
}

fn get_meta<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>, AnyError> {
    let tx = db.begin_read().map_err(io_err)?;
    let t = match tx.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    match t.get(key).map_err(io_err)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(io_err)?)),
        None => Ok(None),
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, AnyError> {
    serde_json::to_vec(v).map_err(io_err)
}

/// The log half of the storage.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The id of the last entry in the log (or the last purged), kept as the log changes: whose
    /// log is more up to date is judged by it (term first, then index), as a voter judges.
    last: Arc<Mutex<Option<LogId<NodeId>>>>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(&mut self, range: RB) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let read = || -> Result<Vec<Entry<TypeConfig>>, AnyError> {
            let tx = self.db.begin_read().map_err(io_err)?;
            let t = match tx.open_table(LOG) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
                Err(e) => return Err(io_err(e)),
            };
            let mut out = Vec::new();
            for item in t.range(range).map_err(io_err)? {
                let (_, v) = item.map_err(io_err)?;
                out.push(serde_json::from_slice(v.value()).map_err(io_err)?);
            }
            Ok(out)
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let state = || -> Result<LogState<TypeConfig>, AnyError> {
            let last_purged: Option<LogId<NodeId>> = get_meta(&self.db, "last_purged")?;
            let last = self.read_last()?;
            Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
        };
        state().map_err(|e| StorageIOError::read_logs(e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        put_meta(&self.db, "vote", &json(vote).map_err(StorageIOError::write_vote)?).map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        get_meta(&self.db, "vote").map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        put_meta(&self.db, "committed", &json(&committed).map_err(StorageIOError::write)?).map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(get_meta::<Option<LogId<NodeId>>>(&self.db, "committed").map_err(StorageIOError::read)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let write = || -> Result<Option<LogId<NodeId>>, AnyError> {
            let tx = self.db.begin_write().map_err(io_err)?;
            let mut appended = None;
            {
                let mut t = tx.open_table(LOG).map_err(io_err)?;
                for e in entries {
                    t.insert(e.log_id.index, json(&e)?.as_slice()).map_err(io_err)?;
                    appended = Some(e.log_id);
                }
            }
            tx.commit().map_err(io_err)?;
            Ok(appended)
        };
        match write() {
            Ok(appended) => {
                if let Some(id) = appended {
                    *lock_log_id(&self.last) = Some(id);
                }
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.remove_range(log_id.index..).map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        put_meta(&self.db, "last_purged", &json(&log_id).map_err(StorageIOError::write_logs)?).map_err(StorageIOError::write_logs)?;
        self.remove_range(..=log_id.index).map_err(|e| StorageIOError::write_logs(e).into())
    }
}

/// A log id in the order a voter ranks logs.
fn log_position(id: &LogId<NodeId>) -> tandem_core::witness::LogPosition {
    tandem_core::witness::LogPosition { term: id.leader_id.term, leader: id.leader_id.node_id, index: id.index }
}

fn lock_log_id(m: &Mutex<Option<LogId<NodeId>>>) -> std::sync::MutexGuard<'_, Option<LogId<NodeId>>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LogStore {
    fn open(db: Arc<Database>) -> Result<LogStore, AnyError> {
        let store = LogStore { db, last: Arc::default() };
        *lock_log_id(&store.last) = store.read_last()?;
        Ok(store)
    }

    /// The last entry's id as stored (the last purged one when the log is empty).
    fn read_last(&self) -> Result<Option<LogId<NodeId>>, AnyError> {
        let last_purged: Option<LogId<NodeId>> = get_meta(&self.db, "last_purged")?;
        let tx = self.db.begin_read().map_err(io_err)?;
        let last = match tx.open_table(LOG) {
            Ok(t) => match t.last().map_err(io_err)? {
                Some((_, v)) => Some(serde_json::from_slice::<Entry<TypeConfig>>(v.value()).map_err(io_err)?.log_id),
                None => None,
            },
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(io_err(e)),
        };
        Ok(last.or(last_purged))
    }

    fn remove_range(&self, range: impl RangeBounds<u64>) -> Result<(), AnyError> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut t = tx.open_table(LOG).map_err(io_err)?;
            t.retain_in(range, |_, _| false).map_err(io_err)?;
        }
        tx.commit().map_err(io_err)?;
        *lock_log_id(&self.last) = self.read_last()?;
        Ok(())
    }
}

/// What the state machine holds; also the snapshot format.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineData {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub state: ClusterState,
}

/// The applied state as published to readers, who hold this lock only to clone the `Arc` and
/// then read their copy for as long as they like (an FTT search, the metrics page). `apply`
/// changes the state in place under the lock when no reader holds it, and copies it first
/// (`Arc::make_mut`) when one does: a reader never sees a half-applied batch, an apply never
/// waits behind a slow reader, and a reader waits at most one batch's apply (each command is
/// a few map updates). Copying the whole state for every batch, as before, made each commit
/// cost O(VMs) on every host: quadratic when creating thousands of VMs.
type Published = Mutex<Arc<MachineData>>;

/// The state-machine half of the storage. The data is shared with the agent for reads.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    data: Arc<Published>,
    applied_tx: Arc<watch::Sender<u64>>,
    /// Entries applied since the state was last written to the database.
    unpersisted: Arc<std::sync::atomic::AtomicU64>,
}

/// The applied state is written to the database every this many entries (and at every snapshot),
/// not after each: writing it serializes the whole cluster state, which with thousands of VMs
/// cost more than the rest of a commit together. The log holds every entry since, and openraft
/// applies the committed ones again when the agent starts (`save_committed` is implemented), so
/// nothing committed is lost; a start re-applies at most this many entries. Log purges follow
/// snapshots, and a snapshot writes the state first, so the log always reaches back to it.
pub const PERSIST_EVERY_ENTRIES: u64 = 64;

impl StateMachine {
    #[allow(clippy::result_large_err)] // openraft's storage traits fix this error type
    fn persist(&self, d: &MachineData) -> Result<(), SErr> {
        self.unpersisted.store(0, std::sync::atomic::Ordering::SeqCst);
        put_meta(&self.db, "machine", &json(d).map_err(StorageIOError::write_state_machine)?).map_err(|e| StorageIOError::write_state_machine(e).into())
    }

    #[allow(clippy::result_large_err)] // openraft's storage traits fix this error type
    fn snapshot_of(d: &MachineData) -> Result<Snapshot<TypeConfig>, SErr> {
        let bytes = json(d).map_err(|e| StorageIOError::write_snapshot(None, e))?;
        let meta = SnapshotMeta {
            last_log_id: d.last_applied,
            last_membership: d.membership.clone(),
            snapshot_id: d.last_applied.map_or_else(|| "empty".to_string(), |l| format!("{}-{}", l.leader_id, l.index)),
        };
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

/// The applied state as of now.
fn current(p: &Published) -> Arc<MachineData> {
    Arc::clone(&p.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}

fn publish(p: &Published, next: Arc<MachineData>) {
    *p.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        // Written first: the log is purged up to the snapshot afterwards, and a start must find
        // the state at least that far.
        let d = current(&self.data);
        self.persist(&d)?;
        StateMachine::snapshot_of(&d)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SErr> {
        let d = current(&self.data);
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut published = self.data.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = Arc::make_mut(&mut published);
        let mut stopped = None;
        for e in entries {
            let log_id = e.log_id;
            out.push(match e.payload {
                EntryPayload::Blank => Ok(Applied::Done),
                EntryPayload::Normal(entry) => match entry.decode() {
                    Ok((cmd, admission)) if entry.format >= 3 => next.state.apply_judged(&cmd, admission.as_ref()),
                    Ok((cmd, _)) => next.state.apply(&cmd),
                    Err(err) => {
                        // Never skip an entry: the state would silently differ from the
                        // other hosts'. Stop applying here (what came before stays applied);
                        // the agent fences and exits.
                        tracing::error!("consensus stops applying at log index {}: {err}", log_id.index);
                        stopped = Some(SErr::from(StorageIOError::apply(log_id, AnyError::error(err.to_string()))));
                        break;
                    }
                },
                EntryPayload::Membership(m) => {
                    next.membership = StoredMembership::new(Some(log_id), m);
                    Ok(Applied::Done)
                }
            });
            next.last_applied = Some(log_id);
        }
        let next = Arc::clone(&published);
        drop(published);
        let applied = out.len() as u64;
        if self.unpersisted.fetch_add(applied, std::sync::atomic::Ordering::SeqCst) + applied >= PERSIST_EVERY_ENTRIES || stopped.is_some() {
            self.persist(&next)?;
        }
        self.applied_tx.send_replace(next.last_applied.map_or(0, |l| l.index));
        match stopped {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<NodeId, BasicNode>, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), SErr> {
        let mut d: MachineData = serde_json::from_slice(snapshot.get_ref()).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        d.last_applied = meta.last_log_id;
        d.membership = meta.last_membership.clone();
        self.persist(&d)?;
        let index = d.last_applied.map_or(0, |l| l.index);
        publish(&self.data, Arc::new(d));
        self.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let d = current(&self.data);
        if d.last_applied.is_none() {
            return Ok(None);
        }
        Ok(Some(StateMachine::snapshot_of(&d)?))
    }
}

/// Writes `state` as the applied state of a new consensus database in `dir` that has no log and
/// no membership: an agent opened on `dir` starts uninitialized, holding this state, and `cluster
/// init` makes it the first voter. Benchmarks use it to start a real agent on a state far too
/// large to build command by command; nothing in the API or the agent reaches it.
pub fn seed_applied_state(dir: &Path, state: ClusterState) -> Result<(), ConsensusError> {
    let path = dir.join("consensus.redb");
    if path.exists() {
        return Err(ConsensusError::Raft(format!("{} already exists; seeding is only for a new database", path.display())));
    }
    let db = Database::create(&path).map_err(|source| ConsensusError::Open { path: path.display().to_string(), source })?;
    let data = MachineData { last_applied: None, membership: StoredMembership::default(), state };
    let bytes = json(&data).map_err(|e| ConsensusError::Raft(e.to_string()))?;
    put_meta(&db, "machine", &bytes).map_err(|e| ConsensusError::Raft(e.to_string()))
}

/// The consensus instance of this host.
#[derive(Clone)]
pub struct Consensus {
    pub raft: Raft,
    data: Arc<Published>,
    applied_rx: watch::Receiver<u64>,
    me: NodeId,
    /// Where admission verdicts are computed.
    heavy: Arc<HeavyWork>,
    /// Proposals take turns on this host (judge if needed, then commit), so that nothing this
    /// leader commits makes a verdict stale between its judging and its entry.
    proposing: Arc<tokio::sync::Mutex<()>>,
    /// This node sends nothing while set (see [`Consensus::set_muted`]).
    muted: Arc<std::sync::atomic::AtomicBool>,
    /// The id of the last entry in this node's log (its storage keeps it current).
    last_log: Arc<Mutex<Option<LogId<NodeId>>>>,
    /// Where the other nodes' logs ended in the elections this node took part in.
    peer_logs: PeerLogs,
    /// Set while another node has the longer log (see [`Consensus::set_deferring`]).
    deferring: Arc<std::sync::atomic::AtomicBool>,
    /// Held while openraft's election flag is set from `muted` and `deferring`.
    timer_flag: Arc<Mutex<()>>,
    /// The node's timer elects at all (the disk witness's never does).
    elects: bool,
}

/// Who leads, as far as this host knows.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ConsensusStatus {
    pub me: NodeId,
    pub leader: Option<NodeId>,
    pub role: String,
    pub term: u64,
    pub last_applied: Option<u64>,
    pub last_log_index: Option<u64>,
    /// Entries in this host's log not yet applied to its state.
    pub commit_lag: u64,
    pub voters: Vec<NodeId>,
}

/// The leader's heartbeat to its followers, which openraft also uses as the deadline of each
/// append: a third of the shortest election timeout (300 ms with the default timings, 100 ms
/// with the low-latency ones). Followers then miss three before one stands for election, and
/// a busy machine has that long to answer an append. Proposals do not wait for it: an append
/// is sent as soon as an entry is written.
#[must_use]
pub const fn raft_heartbeat_ms(t: &Timings) -> u64 {
    election_timeout_min_ms(t) / 3
}

/// How long followers wait without hearing the leader before one stands for election (drawn
/// between this and twice this): three tenths of the peer timeout. A leader that loses power is
/// then replaced within about 0.3–0.6 peer timeouts — before the fence deadline of its VMs (a
/// peer timeout or more after its last evidence), so the new leader can commit their failover
/// as soon as it may. The defaults give the 900–1,800 ms used before timings chose them; the
/// low-latency profile 300–600 ms.
#[must_use]
pub const fn election_timeout_min_ms(t: &Timings) -> u64 {
    t.peer_timeout_ms * 3 / 10
}

/// The longest election timeout: twice the shortest.
#[must_use]
pub const fn election_timeout_max_ms(t: &Timings) -> u64 {
    2 * election_timeout_min_ms(t)
}

impl Consensus {
    /// Opens (or creates) the database in `dir` and starts openraft.
    pub async fn open(dir: &Path, me: NodeId, token: String, rpc: Arc<dyn PeerRpc>, timings: &Timings) -> Result<Consensus, ConsensusError> {
        Consensus::open_routed(dir, me, token, rpc, witness::WitnessRoute::default(), timings).await
    }

    /// [`Consensus::open`], reaching the disk witness through `route`.
    pub async fn open_routed(
        dir: &Path,
        me: NodeId,
        token: String,
        rpc: Arc<dyn PeerRpc>,
        route: witness::WitnessRoute,
        timings: &Timings,
    ) -> Result<Consensus, ConsensusError> {
        let path = dir.join("consensus.redb");
        let db = Arc::new(Database::create(&path).map_err(|source| ConsensusError::Open { path: path.display().to_string(), source })?);
        Consensus::start(db, me, Network { token, rpc, witness: route, muted: Arc::default(), peer_logs: PeerLogs::default() }, timings, true).await
    }

    /// Starts openraft on `db`; `elects`: the node stands for election by itself when it hears
    /// no leader (the disk witness's does only when its holder asks it to).
    async fn start(db: Arc<Database>, me: NodeId, network: Network, timings: &Timings, elects: bool) -> Result<Consensus, ConsensusError> {
        let data: MachineData = get_meta(&db, "machine").map_err(|e| Box::new(SErr::from(StorageIOError::read_state_machine(e))))?.unwrap_or_default();
        let (applied_tx, applied_rx) = watch::channel(data.last_applied.map_or(0, |l| l.index));
        let data = Arc::new(Mutex::new(Arc::new(data)));
        let sm = StateMachine { db: Arc::clone(&db), data: Arc::clone(&data), applied_tx: Arc::new(applied_tx), unpersisted: Arc::default() };
        let log = LogStore::open(db).map_err(|e| Box::new(SErr::from(StorageIOError::read_logs(e))))?;
        let last_log = Arc::clone(&log.last);
        // A node that never elects by itself (the disk witness's) uses its election timeouts
        // only for the leader lease: a node just opened refuses votes until the lease passes.
        // For a witness just taken over by the survivor that lease (1.8 s with the defaults)
        // would only delay the survivor's election, so it is kept just above a heartbeat.
        let (min, max) = if elects {
            (election_timeout_min_ms(timings), election_timeout_max_ms(timings))
        } else {
            (raft_heartbeat_ms(timings) + 1, raft_heartbeat_ms(timings) + 2)
        };
        let config = openraft::Config {
            cluster_name: "tandem".into(),
            heartbeat_interval: raft_heartbeat_ms(timings),
            election_timeout_min: min,
            election_timeout_max: max,
            enable_elect: elects,
            install_snapshot_timeout: SNAPSHOT_TIMEOUT.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 500,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| ConsensusError::Raft(e.to_string()))?);
        let muted = Arc::clone(&network.muted);
        let peer_logs = network.peer_logs.clone();
        let raft = Raft::new(me, config, network, log, sm).await.map_err(Box::new)?;
        Ok(Consensus {
            raft,
            data,
            applied_rx,
            me,
            heavy: Arc::default(),
            proposing: Arc::default(),
            muted,
            last_log,
            peer_logs,
            deferring: Arc::default(),
            timer_flag: Arc::default(),
            elects,
        })
    }

    /// While `muted`, this node sends no RPC and stands for no election (it still answers):
    /// for a host with a reason to fence.
    pub fn set_muted(&self, muted: bool) {
        self.muted.store(muted, std::sync::atomic::Ordering::Relaxed);
        self.update_timer();
    }

    /// While `deferring`, openraft's timer starts no election on this node (the agent still
    /// may): another node it hears has the longer log (see `tandem_core::election`).
    pub fn set_deferring(&self, deferring: bool) {
        if self.deferring.swap(deferring, std::sync::atomic::Ordering::Relaxed) != deferring {
            tracing::debug!(deferring, "openraft's timer defers to a longer log of a host heard");
        }
        self.update_timer();
    }

    fn update_timer(&self) {
        let _one_at_a_time = self.timer_flag.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let elect = self.elects && !self.muted.load(std::sync::atomic::Ordering::Relaxed) && !self.deferring.load(std::sync::atomic::Ordering::Relaxed);
        self.raft.runtime_config().elect(elect);
    }

    /// Has this node stand for election now (in a task of its own: the caller does not wait).
    pub fn stand_for_election(&self) {
        let raft = self.raft.clone();
        tokio::spawn(async move {
            if let Err(e) = raft.trigger().elect().await {
                tracing::debug!("election not started: {e}");
            }
        });
    }

    /// Whether this node, when it leads, sends heartbeats (a fenced host's does not).
    pub fn send_heartbeats(&self, on: bool) {
        self.raft.runtime_config().heartbeat(on);
    }

    /// Stops openraft (its tasks end and release the database), as on a crash.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::debug!("raft shutdown: {e}");
        }
    }

    /// Computes admission verdicts on `heavy` (the agent's: off the runtime's workers).
    pub fn use_heavy(&mut self, heavy: Arc<HeavyWork>) {
        self.heavy = heavy;
    }

    /// A copy of the committed desired state as applied on this host.
    #[must_use]
    pub fn state(&self) -> ClusterState {
        current(&self.data).state.clone()
    }

    /// The applied state as of now, shared: it never changes, and holding it blocks nobody.
    #[must_use]
    pub fn snapshot(&self) -> Arc<MachineData> {
        current(&self.data)
    }

    /// False once an apply panicked while changing the state in place (see [`Published`]): the
    /// state may hold half a command, and the host must not act on it.
    #[must_use]
    pub fn state_intact(&self) -> bool {
        !self.data.is_poisoned()
    }

    /// Reads the applied state without copying it.
    pub fn with_state<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&current(&self.data).state)
    }

    /// Notified whenever an entry is applied.
    #[must_use]
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied_rx.clone()
    }

    #[must_use]
    pub fn status(&self) -> ConsensusStatus {
        let m = self.raft.metrics().borrow().clone();
        ConsensusStatus {
            me: self.me,
            leader: m.current_leader,
            role: format!("{:?}", m.state).to_lowercase(),
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            commit_lag: m.last_log_index.unwrap_or(0).saturating_sub(m.last_applied.map_or(0, |l| l.index)),
            voters: m.membership_config.membership().voter_ids().collect(),
        }
    }

    /// Where this node's log ends, in the order a voter ranks logs (the index alone does not
    /// say which log is the more up to date).
    #[must_use]
    pub fn last_log_position(&self) -> Option<tandem_core::witness::LogPosition> {
        lock_log_id(&self.last_log).as_ref().map(log_position)
    }

    /// Where each other node's log ended when it last took part in an election with this one.
    #[must_use]
    pub fn peer_logs(&self) -> Vec<(NodeId, tandem_core::witness::LogPosition, u64)> {
        self.peer_logs.snapshot()
    }

    /// Answers a candidate's vote request, noting where its log ends.
    pub async fn vote(&self, req: openraft::raft::VoteRequest<NodeId>) -> Result<openraft::raft::VoteResponse<NodeId>, openraft::error::RaftError<NodeId>> {
        self.peer_logs.record(req.vote.leader_id.node_id, req.last_log_id.as_ref());
        self.raft.vote(req).await
    }

    #[must_use]
    pub fn is_leader(&self) -> bool {
        // One borrow of the metrics: a second one while holding the first could wait behind
        // openraft's writer.
        let m = self.raft.metrics();
        let m = m.borrow();
        m.current_leader == Some(self.me) && m.running_state.is_ok()
    }

    /// Why consensus stopped on this host for good (an entry it cannot apply, a storage
    /// failure), if it did: the host can no longer follow committed state.
    #[must_use]
    pub fn fatal(&self) -> Option<String> {
        self.raft.metrics().borrow().running_state.as_ref().err().map(ToString::to_string)
    }

    /// The API address of the current leader, if known.
    #[must_use]
    pub fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
    }

    /// Makes this host the first member of a new cluster.
    pub async fn initialize(&self, api_addr: &str) -> Result<(), ConsensusError> {
        let mut nodes = BTreeMap::new();
        nodes.insert(self.me, BasicNode { addr: api_addr.to_string() });
        self.raft.initialize(nodes).await.map_err(|e| match e {
            openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_)) => ConsensusError::AlreadyInitialized,
            other => ConsensusError::Raft(other.to_string()),
        })
    }

    /// Proposes a command on the leader and waits for it to be applied here; returns the
    /// outcome and the log index it was applied at.
    ///
    /// A command that admission control judges is judged here, on the leader's applied state,
    /// and proposed with the verdict; if anything committed in between (the revision moved on),
    /// `apply` refuses it as stale and it is judged again, at most [`ADMISSION_ATTEMPTS`] times.
    pub async fn propose(&self, cmd: Command) -> Result<(CommandResult, u64), ConsensusError> {
        let unencodable = |e: tandem_core::logformat::LogFormatError| ConsensusError::Unencodable(e.to_string());
        if !cmd.needs_admission() {
            // Every proposal on the leader takes its turn, judged or not: a command committing
            // between a verdict and its entry would make the verdict stale, and a steady stream
            // of them (the coordinator's placements during a burst of writes) starved judged
            // commands. An entry that is committed but cannot be decoded would stop every host;
            // LogEntry::new checks the round trip before it gets there.
            let entry = LogEntry::new(&cmd).map_err(unencodable)?;
            let _turn = self.proposing.lock().await;
            return self.propose_entry(entry).await;
        }
        if !self.is_leader() {
            return Err(ConsensusError::NotLeader(self.leader_addr()));
        }
        let cmd = Arc::new(cmd);
        let _turn = self.proposing.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let snap = self.snapshot();
            let index = snap.last_applied.map_or(0, |l| l.index);
            let judged = {
                let cmd = Arc::clone(&cmd);
                self.heavy.run(move || snap.state.judge(&cmd)).await.map_err(|e| ConsensusError::Raft(e.to_string()))?
            };
            let admission = match judged {
                Ok(a) => a,
                Err(refused) => return Ok((Err(refused), index)),
            };
            let (r, index) = self.propose_entry(LogEntry::judged(&cmd, admission.as_ref()).map_err(unencodable)?).await?;
            match r {
                Err(StateError::Stale(why)) if attempt < ADMISSION_ATTEMPTS => tracing::debug!("judged again: {why}"),
                r => return Ok((r, index)),
            }
        }
    }

    /// Proposes an entry as it is (tests use it to put an entry of a newer format in the log).
    pub async fn propose_entry(&self, entry: LogEntry) -> Result<(CommandResult, u64), ConsensusError> {
        let written = tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(entry)).await;
        match written.map_err(|_| ConsensusError::Undecided(PROPOSE_TIMEOUT))? {
            Ok(resp) => {
                self.wait_applied(resp.log_id.index).await;
                Ok((resp.data, resp.log_id.index))
            }
            Err(openraft::error::RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(f))) => {
                Err(ConsensusError::NotLeader(f.leader_node.map(|n| n.addr)))
            }
            Err(e) => Err(ConsensusError::Raft(e.to_string())),
        }
    }

    /// Waits (bounded) until this host has applied `index`.
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.applied_rx.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|i| *i >= index)).await;
    }

    /// Confirms leadership with a quorum (a leader restarted or cut off may be stale).
    pub async fn confirm_leader(&self) -> bool {
        matches!(tokio::time::timeout(Duration::from_secs(2), self.raft.ensure_linearizable()).await, Ok(Ok(_)))
    }

    /// Removes `id` from the voters (and the cluster).
    pub async fn remove_voter(&self, id: NodeId) -> Result<(), ConsensusError> {
        let mut voters: BTreeSet<NodeId> = self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.remove(&id);
        self.raft.change_membership(voters, false).await.map_err(|e| ConsensusError::Raft(e.to_string()))?;
        Ok(())
    }

    /// Adds `id` at `addr` as a voter (learner first, so it catches up before it counts).
    pub async fn add_voter(&self, id: NodeId, addr: &str) -> Result<(), ConsensusError> {
        self.raft.add_learner(id, BasicNode { addr: addr.to_string() }, true).await.map_err(|e| ConsensusError::Raft(e.to_string()))?;
        let mut voters: BTreeSet<NodeId> = self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.insert(id);
        self.raft.change_membership(voters, false).await.map_err(|e| ConsensusError::Raft(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::httpc::{HttpError, Response};
    use crate::io::PeerRpc;
    use tandem_core::HostId;
    use tandem_drivers::BoxFuture;

    /// A single-host cluster never calls a peer.
    struct NoPeers;

    impl PeerRpc for NoPeers {
        fn call<'a>(
            &'a self,
            addr: &'a str,
            _: &'a str,
            _: Option<&'a str>,
            _: Option<Vec<u8>>,
            timeout: Duration,
        ) -> BoxFuture<'a, Result<Response, HttpError>> {
            Box::pin(async move { Err(HttpError::Timeout { addr: addr.to_string(), timeout }) })
        }
    }

    async fn single(dir: &Path) -> Consensus {
        let c = Consensus::open(dir, 0, "token".into(), Arc::new(NoPeers), &Timings::default()).await.expect("open");
        let _ = c.initialize("127.0.0.1:1").await;
        for _ in 0..100 {
            if c.is_leader() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c
    }

    fn add_host(id: u32) -> Command {
        Command::AddHost {
            id: HostId(id),
            name: format!("h{id}"),
            api_addr: "127.0.0.1:1".into(),
            heartbeat_addr: "127.0.0.1:2".into(),
            capacity: tandem_core::state::Capacity { vcpus: 1, memory_mib: 64 },
        }
    }

    /// Admission control is judged by the proposer and travels in the entry: a refusal commits
    /// nothing; an admitted or forced change commits once, with its verdict; an entry whose
    /// verdict was reached on an older revision is refused as stale and changes nothing.
    #[tokio::test]
    async fn admission_is_judged_by_the_proposer_and_checked_against_the_revision() {
        use tandem_core::state::{PowerState, Settings};
        let dir = std::env::temp_dir().join(format!("tandem-admission-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let c = single(&dir).await;
        for cmd in [add_host(0), Command::HostJoined { host: HostId(0) }] {
            c.propose(cmd).await.expect("committed").0.expect("applies");
        }
        // One host tolerates no failure: a target of one is refused, unless forced.
        let target = |force| Command::SetSettings { settings: Settings { ftt_target: Some(1), ..Settings::default() }, force };
        let last = c.status().last_log_index;
        let (r, _) = c.propose(target(false)).await.expect("answered");
        assert!(matches!(r, Err(StateError::Admission(_))), "{r:?}");
        assert_eq!(c.status().last_log_index, last, "a refusal is judged before the log: nothing committed");
        let (r, _) = c.propose(target(true)).await.expect("committed");
        assert!(matches!(r, Ok(Applied::Forced { .. })), "forced, and said so: {r:?}");
        let spec: tandem_core::state::VmSpec = serde_json::from_value(
            serde_json::json!({ "name": "a", "vcpus": 1, "memory_mib": 32, "driver": { "kind": "process", "command": ["sleep", "1"] } }),
        )
        .expect("spec");
        c.propose(Command::CreateVm { spec }).await.expect("committed").0.expect("created");
        let start = Command::SetPower { name: "a".into(), desired: PowerState::Running, force: false };
        let stale = c.with_state(|s| tandem_core::state::Admission { revision: s.revision - 1, forced: None });
        let before = c.state();
        let (r, _) = c.propose_entry(LogEntry::judged(&start, Some(&stale)).expect("entry")).await.expect("committed");
        assert!(matches!(r, Err(StateError::Stale(_))), "{r:?}");
        assert_eq!(c.state().vms, before.vms, "a stale verdict changes nothing");
        let (r, _) = c.propose(start).await.expect("committed");
        assert_eq!(r, Ok(Applied::Done), "judged afresh, it applies");
        assert!(c.with_state(|s| s.vms["a"].desired() == PowerState::Running));
        c.raft.shutdown().await.ok();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A judged command is not starved by others committing meanwhile (the coordinator's
    /// placements, during a burst of API writes): every proposal on the leader takes its turn,
    /// so a verdict never goes stale there. Found by `bench mass-failover`: starting the
    /// 20th of a thousand VMs answered 409 "propose it again" after ten stale verdicts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn judged_commands_are_not_starved_by_concurrent_proposals() {
        use tandem_core::state::PowerState;
        let dir = std::env::temp_dir().join(format!("tandem-starve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let c = Arc::new(single(&dir).await);
        for cmd in [add_host(0), Command::HostJoined { host: HostId(0) }] {
            c.propose(cmd).await.expect("committed").0.expect("applies");
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Unjudged commands, back to back from several proposers, as the coordinator's and
        // forwarded writes are.
        let busy: Vec<_> = (0..4u32)
            .map(|k| {
                let (c, stop) = (Arc::clone(&c), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut id = 1 + k * 10_000;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let _ = c.propose(add_host(id)).await;
                        id += 1;
                    }
                })
            })
            .collect();
        for i in 0..20 {
            let spec = tandem_core::state::VmSpec::process(&format!("v{i}"), 16, 0, &["sleep", "1"]);
            c.propose(Command::CreateVm { spec }).await.expect("committed").0.expect("created");
            let (r, _) = c.propose(Command::SetPower { name: format!("v{i}"), desired: PowerState::Running, force: false }).await.expect("committed");
            assert_eq!(r, Ok(Applied::Done), "start of v{i}");
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for b in busy {
            b.await.expect("busy proposer");
        }
        c.raft.shutdown().await.ok();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An entry of a newer format (or an unknown command) commits, since the log only carries
    /// The applied state is written every `PERSIST_EVERY_ENTRIES` entries, not after each; what
    /// was committed since is applied again from the log when the host starts: a restart loses
    /// nothing, and the state it reopens with is the one it closed with.
    #[tokio::test]
    async fn entries_applied_since_the_state_was_last_written_are_applied_again_at_start() {
        let dir = std::env::temp_dir().join(format!("tandem-persist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let vms = PERSIST_EVERY_ENTRIES as usize + 5;
        let vm = |i: usize| -> Command {
            let spec =
                serde_json::json!({ "name": format!("vm{i}"), "vcpus": 1, "memory_mib": 32, "driver": { "kind": "process", "command": ["sleep", "1"] } });
            Command::CreateVm { spec: serde_json::from_value(spec).expect("spec") }
        };
        {
            let c = single(&dir).await;
            for i in 0..vms {
                c.propose(vm(i)).await.expect("committed").0.expect("applies");
            }
            assert_eq!(c.with_state(|s| s.vms.len()), vms);
            c.shutdown().await;
        }
        let written: MachineData = {
            let db = Database::create(dir.join("consensus.redb")).expect("db");
            get_meta(&db, "machine").expect("read").expect("written once")
        };
        assert!(written.state.vms.len() < vms, "the last entries were not written: {}", written.state.vms.len());
        let c = Consensus::open(&dir, 0, "token".into(), Arc::new(NoPeers), &Timings::default()).await.expect("reopen");
        let mut seen = 0;
        for _ in 0..100 {
            seen = c.with_state(|s| s.vms.len());
            if seen == vms {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen, vms, "every committed entry is applied again");
        c.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// it; this host then stops applying at it — no skip, no divergence — says why, and stops
    /// leading. Reopened, its log still loads, and it stops at the same entry again.
    #[tokio::test]
    async fn an_entry_this_release_cannot_read_stops_applying_without_skipping_it() {
        let dir = std::env::temp_dir().join(format!("tandem-logformat-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        {
            let c = single(&dir).await;
            assert!(c.is_leader());
            c.propose(add_host(0)).await.expect("committed").0.expect("a known command applies");
            let newer = LogEntry { format: 99, command: serde_json::json!({ "op": "migrate-vm", "name": "a" }), admission: None };
            let _ = tokio::time::timeout(Duration::from_secs(5), c.propose_entry(newer)).await;
            let why = c.fatal().expect("consensus stopped");
            assert!(why.contains("format 99") && why.contains("upgrade"), "{why}");
            assert!(!c.is_leader(), "a host that cannot apply must not lead");
            assert!(c.with_state(|s| s.hosts.contains_key(&HostId(0))), "what applied before stays");
            c.propose(add_host(1)).await.expect_err("nothing is applied past the unreadable entry");
            assert!(!c.with_state(|s| s.hosts.contains_key(&HostId(1))));
            c.shutdown().await;
        }
        // Reopened, the log itself loads (the entry is well-formed), and replaying it stops at
        // the same entry: the agent refuses to start, saying which entry and why.
        match Consensus::open(&dir, 0, "token".into(), Arc::new(NoPeers), &Timings::default()).await {
            Err(e) => assert!(e.to_string().contains("format 99") || format!("{e:?}").contains("format 99"), "{e:?}"),
            Ok(c) => {
                let mut stopped = None;
                for _ in 0..100 {
                    stopped = c.fatal();
                    if stopped.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                assert!(stopped.is_some_and(|w| w.contains("format 99")), "reopened, it stops at the same entry");
                c.shutdown().await;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
