//! Consensus storage: the log, the vote and the state machine in one redb database in the data
//! directory. Every write transaction is durable before openraft is told it happened, so a host
//! that loses power keeps every entry it acknowledged; the state machine (the desired state) is
//! persisted whole after every applied batch, so a restart needs no replay.

use super::{CommandResult, ConsensusError, NodeId, SErr, TypeConfig};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError, StoredMembership,
    Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tandem_core::state::{Applied, ClusterState};
use tokio::sync::watch;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

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

pub(super) fn get_meta<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>, AnyError> {
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
    pub(super) last: Arc<Mutex<Option<LogId<NodeId>>>>,
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
pub(super) fn log_position(id: &LogId<NodeId>) -> tandem_core::witness::LogPosition {
    tandem_core::witness::LogPosition { term: id.leader_id.term, leader: id.leader_id.node_id, index: id.index }
}

pub(super) fn lock_log_id(m: &Mutex<Option<LogId<NodeId>>>) -> std::sync::MutexGuard<'_, Option<LogId<NodeId>>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LogStore {
    pub(super) fn open(db: Arc<Database>) -> Result<LogStore, AnyError> {
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
pub(super) type Published = Mutex<Arc<MachineData>>;

/// The state-machine half of the storage. The data is shared with the agent for reads.
#[derive(Clone)]
pub struct StateMachine {
    pub(super) db: Arc<Database>,
    pub(super) data: Arc<Published>,
    pub(super) applied_tx: Arc<watch::Sender<u64>>,
    /// Entries applied since the state was last written to the database.
    pub(super) unpersisted: Arc<std::sync::atomic::AtomicU64>,
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
pub(super) fn current(p: &Published) -> Arc<MachineData> {
    Arc::clone(&p.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}

pub(super) fn publish(p: &Published, next: Arc<MachineData>) {
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
