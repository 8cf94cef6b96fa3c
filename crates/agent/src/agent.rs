//! The agent: wires the sans-I/O core to sockets, the heartbeat disk, consensus and the driver.
//!
//! Four loops run side by side so that a slow one cannot delay the others, each in its own
//! module with the state it keeps between passes:
//! - [`liveness`]: sends heartbeats, writes and reads the heartbeat disk, assesses liveness and
//!   fences this host when the core says so, on its own thread; it never waits on consensus;
//! - [`membership`]: (re)joins this host to the cluster when it is connected again;
//! - [`coordinator`], on the leader only: fails over dead or fenced hosts once their fence
//!   deadline has passed and places VMs that wait for a host;
//! - [`reconciler`]: makes the VMs running here match what committed state assigns here.
//!
//! [`fencing`] holds the fence, the graceful stop and the start gate; [`watchdogs`] the software
//! and hardware watchdogs. This file holds what they share: the agent, its status and `submit`.

use crate::config::{AgentConfig, DriverKind};
use crate::consensus::{CommandResult, Consensus, ConsensusError};
use crate::disk::{DiskError, HeartbeatDisk};
use crate::events::EventLog;
use crate::httpc;
use crate::io::{AgentIo, Clock, HeartbeatTransport, PeerRpc};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tandem_core::liveness::{Assessment, FenceReason, Liveness};
use tandem_core::state::Command;
use tandem_core::wire::ClusterKey;
use tandem_core::{HostId, Millis};
use tandem_drivers::launcher::Launcher;
use tandem_drivers::process::ProcessDriver;
use tandem_drivers::qemu::QemuDriver;
use tandem_drivers::VmDriver;
use thiserror::Error;
use tracing::Instrument;

mod coordinator;
mod copyserve;
mod fencing;
mod liveness;
mod maintenance;
mod membership;
mod migration;
mod mirror;
mod probe;
mod reconciler;
mod shutdown;
mod storagewatch;
pub use shutdown::{policy_name, ShutdownConfig, ShutdownPolicy};
mod watchdogs;
pub mod witness;

pub use copyserve::COPY_APPLY_WAIT;
pub use mirror::{COPY_REQUEST_TIMEOUT, HUNG_KILL_WAIT, LINK_RETRY, MAX_MIRROR_LINKS};
pub use probe::{MAX_PROBES, PROBE_ATTEMPT_TIMEOUT, PROBE_GIVE_UP, PROBE_INTERVAL};
pub use storagewatch::STORAGE_PROBE_SPACING;
pub use watchdogs::{WATCHDOG_MAX_SLEEP_MS, WATCHDOG_MIN_SLEEP_MS};

/// Timeout of a forwarded write.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the coordinator waits for a host's list of running VMs (restart groups).
pub const LOCAL_QUERY_TIMEOUT: Duration = Duration::from_secs(1);

/// Agent start-up and operation failures.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("invalid configuration")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot prepare data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("heartbeat disk unusable")]
    Disk(#[from] DiskError),
    #[error("disk witness unusable")]
    Witness(#[from] crate::witness::RegionError),
    #[error("TLS files unusable")]
    Tls(#[from] crate::tls::TlsError),
    #[error("consensus failed")]
    Consensus(#[from] ConsensusError),
    #[error("cannot start the VM launcher")]
    Launcher(#[source] std::io::Error),
    #[error("no leader is known; the cluster may lack a quorum")]
    NoLeader,
    #[error("forwarding to the leader failed")]
    Forward(#[from] httpc::HttpError),
    #[error("the leader changed while the command was forwarded to it; it may still commit")]
    LeaderChanged,
    #[error("the leader refused the forwarded command: {0}")]
    ForwardRefused(String),
    #[error("hardware watchdog unusable")]
    Watchdog(#[from] crate::watchdog::WatchdogError),
    #[error("cannot start the liveness thread")]
    LivenessThread(#[source] std::io::Error),
}

/// What this agent is doing, for the API and the loops.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct RuntimeStatus {
    /// The epoch this host joined in; `None` until joined, and again after fencing.
    pub joined_epoch: Option<u64>,
    pub fenced: Option<FenceReason>,
    pub fenced_at: Option<Millis>,
    /// While fenced, the epochs the fence speaks for: this host runs no VM in this epoch or
    /// any before it, ever again — it unfences only by joining in a later one. It starts at the
    /// epoch held when fencing and rises past every epoch a join whose answer never came may
    /// have committed (a host cut off with its rejoin in flight), so that the coordinator can
    /// move its VMs in the epoch committed state has for it. Announced only up to the promise
    /// kept in `data_dir` (see `Agent::promise_through`).
    pub fenced_through: Option<u64>,
    /// The highest epoch committed state may hold for this host through its own joins whose
    /// answers it never took (an undecided proposal may still commit, under a later leader).
    pub unanswered_join_epoch: u64,
    /// When every VM's exit was confirmed after the fence; only from then on is the fence
    /// announced in heartbeats and the slot (a peer may move the VMs at once on that word).
    pub fence_confirmed_at: Option<Millis>,
    pub kills_on_fence: usize,
}

impl RuntimeStatus {
    /// What the next heartbeat and slot say about this host, `(epoch, fenced)`, read from one
    /// snapshot: a fence is announced for the epoch it was taken in, and only once confirmed.
    /// (Reading the fenced flag here and the epoch from committed state separately once let a
    /// rejoin that had committed, but not yet cleared the flag, announce "fenced in the new
    /// epoch", on which the coordinator fails the host over at once.)
    #[must_use]
    pub fn announcement(&self, committed_epoch: u64, promised_through: u64) -> (u64, bool) {
        match (self.fenced_through, self.fence_confirmed_at) {
            (Some(e), Some(_)) if self.fenced.is_some() => (e.min(promised_through), true),
            _ => (self.joined_epoch.unwrap_or(committed_epoch), false),
        }
    }
}

/// The liveness ticks and applied entries a periodic loop wakes on.
struct Rounds {
    ticks: tokio::sync::watch::Receiver<u64>,
    applied: tokio::sync::watch::Receiver<u64>,
}

/// One host's agent.
pub struct Agent {
    pub cfg: AgentConfig,
    pub me: HostId,
    pub key: ClusterKey,
    /// Bearer token for agent-to-agent calls, derived from the cluster secret.
    pub token: String,
    pub metrics: crate::metrics::Metrics,
    pub consensus: Consensus,
    pub driver: Arc<dyn VmDriver>,
    pub clock: Arc<dyn Clock>,
    pub events: EventLog,
    pub incarnation: u64,
    liveness: Mutex<Liveness>,
    status: Mutex<RuntimeStatus>,
    beat: Mutex<liveness::LivenessLoop>,
    coordination: Mutex<coordinator::Coordination>,
    /// Wakes the coordinator loop at once when the liveness loop finds a host it may fail over
    /// (a passed deadline, a fence report), instead of at its next tick.
    coordinator_wake: tokio::sync::Notify,
    /// Raised at the end of every liveness tick that is a full round (or finds a host to fail
    /// over). The membership, coordinator, reconciler and migration loops run on it (and on
    /// applied entries) rather than on timers of their own: one wake-up of the runtime per
    /// round, not four at four phases, and each loop sees the assessment of that tick.
    ticks: tokio::sync::watch::Sender<u64>,
    reconciling: Mutex<reconciler::Reconciling>,
    /// Wakes the reconciler at once (a switchover to this host was applied).
    reconcile_wake: tokio::sync::Notify,
    migrations: Mutex<migration::Migrations>,
    mirroring: Mutex<mirror::Mirroring>,
    probing: Mutex<probe::Probing>,
    heartbeats: Arc<dyn HeartbeatTransport>,
    disk: HeartbeatDisk,
    /// The disk witness, when the configuration names one.
    witness: Option<witness::DiskWitness>,
    rpc: Arc<dyn PeerRpc>,
    /// Whether the agent runs OS threads of its own (liveness, watchdog, heavy work): a
    /// simulator, which must stay deterministic, runs everything on its one runtime.
    os_threads: bool,
    /// Where FTT searches, plans and the metrics page run: off the runtime's workers.
    pub heavy: Arc<crate::heavy::HeavyWork>,
    mutation: Option<crate::io::Mutation>,
    last_tick: AtomicU64,
    /// When this host's liveness lease ends if nothing renews it (ms on the agent's clock), as
    /// the liveness loop last computed it; 0 when no lease is needed (a lone host). The
    /// watchdogs act on it.
    lease_until: AtomicU64,
    /// The open hardware watchdog, when configured; `stop` disarms it.
    hw_watchdog: Mutex<Option<crate::watchdog::HardwareWatchdog>>,
    stopping: AtomicBool,
    /// Set while a planned stop shuts this host's VMs down to park them (`shutdown` and
    /// `freeze` policies): nothing starts here, the reconciler stands aside (the exits are the
    /// stop's, not the guests' own), and no join is attempted.
    parking: AtomicBool,
    /// A planned stop asked over the API (`tandem host shutdown`), with its policy.
    stop_request: tokio::sync::watch::Sender<Option<shutdown::ShutdownPolicy>>,
    /// The highest epoch this host has promised never to run VMs in again, kept in `data_dir`
    /// across restarts: a fence is announced only through it, and a join answered with an
    /// epoch not past it is given up (see `RuntimeStatus::fenced_through`).
    promised_through: AtomicU64,
    /// Held while the promise rises and while a join's answer is checked against it and the
    /// host unfences: a promise can never rise between that check and the unfencing (the
    /// fence would then be announced through an epoch the host is about to run VMs in).
    promise_gate: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A number kept in `dir/name` (0 when the file is missing or unreadable).
fn read_number(dir: &std::path::Path, name: &str) -> u64 {
    std::fs::read_to_string(dir.join(name)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Stores `value` in `dir/name` so that it survives a crash at any point: written aside,
/// synced, renamed over, directory synced.
fn store_number(dir: &std::path::Path, name: &str, value: u64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{value}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads, raises and durably stores the incarnation number.
fn next_incarnation(dir: &std::path::Path) -> std::io::Result<u64> {
    let next = read_number(dir, "incarnation") + 1;
    store_number(dir, "incarnation", next)?;
    Ok(next)
}

impl Agent {
    /// Opens everything the agent needs, wired to the real world. Nothing runs until
    /// [`Agent::spawn_loops`].
    pub async fn open(cfg: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        let launcher = Launcher::new().map_err(AgentError::Launcher)?;
        let stop_timeout = Duration::from_secs(cfg.qemu.stop_timeout_s);
        // A cluster on TLS migrates over TLS too, with the agents' own certificates.
        let migration_tls = match &cfg.tls {
            Some(t) => {
                let dir = cfg.data_dir.join("qemu-tls");
                let fail = |source| AgentError::DataDir { path: dir.display().to_string(), source };
                Some(tandem_drivers::migtls::MigrationTls::prepare(&dir, &t.cert, &t.key, &t.ca).map_err(fail)?)
            }
            None => None,
        };
        // Copies of mirrored disks cross sites through the copy channel: the cluster key always,
        // TLS with `[tls]` (the agents' own certificates and CA).
        let copy_credentials = Arc::new(match &cfg.tls {
            Some(t) => tandem_drivers::copychannel::CopyCredentials::with_tls(
                cfg.key()?,
                crate::tls::ClientTls::load(&t.ca)?.connector(),
                crate::tls::ServerTls::load(&t.cert, &t.key)?.acceptor(),
            ),
            None => tandem_drivers::copychannel::CopyCredentials::plain(cfg.key()?),
        });
        let driver: Arc<dyn VmDriver> = match cfg.driver {
            DriverKind::Process => Arc::new(ProcessDriver::new(launcher, &cfg.name, stop_timeout)),
            DriverKind::Qemu => Arc::new(
                QemuDriver::new(cfg.qemu.clone(), launcher, &cfg.name, &cfg.api_addr.ip().to_string(), cfg.data_dir.join("run"))
                    .with_migration_tls(migration_tls)
                    .with_copy_server(cfg.mirror.copy_port, &cfg.mirror.storage_daemon, Arc::clone(&copy_credentials))
                    .with_local_copy_servers(cfg.mirror.local_copy_servers),
            ),
            DriverKind::Mixed => Arc::new(
                tandem_drivers::mixed::MixedDriver::new(
                    launcher,
                    cfg.qemu.clone(),
                    &cfg.name,
                    &cfg.api_addr.ip().to_string(),
                    cfg.data_dir.join("run"),
                    stop_timeout,
                )
                .with_migration_tls(migration_tls)
                .with_copy_server(cfg.mirror.copy_port, &cfg.mirror.storage_daemon, copy_credentials)
                .with_local_copy_servers(cfg.mirror.local_copy_servers),
            ),
        };
        let tls = match &cfg.tls {
            Some(t) => Some(crate::tls::ClientTls::load(&t.ca)?),
            None => None,
        };
        // A client for each area: the region's runs on a thread of its own (see `NetWitnessRegion`).
        let witness_client = |w: &crate::config::NetworkWitness| -> Result<crate::netwitness::client::WitnessClient, AgentError> {
            Ok(crate::netwitness::client::WitnessClient::new(w, cfg.key()?.peer_token(), tls.clone()))
        };
        let region: Option<Arc<dyn crate::witness::WitnessRegion>> = match (&cfg.disk_witness, &cfg.witness) {
            (Some(path), _) => Some(crate::witness::open_region(path)?),
            (None, Some(w)) => Some(Arc::new(crate::netwitness::client::NetWitnessRegion::open(witness_client(w)?).map_err(crate::witness::RegionError::Io)?)),
            (None, None) => None,
        };
        let disk: Arc<dyn crate::io::SlotDevice> = match (&cfg.heartbeat_disk, &cfg.witness) {
            (Some(path), _) => crate::io::open_heartbeat_disk(path, &cfg.heartbeat_disk_paths).await?,
            (None, Some(w)) => {
                Arc::new(crate::netwitness::client::NetSlotDevice::new(witness_client(w)?, Duration::from_millis(cfg.timings.disk_io_timeout_ms)))
            }
            (None, None) => return Err(AgentError::Config(crate::config::ConfigError::Witness("no heartbeat disk and no witness"))),
        };
        let mut io = AgentIo::production(cfg.heartbeat_addr, disk, driver, tls)?;
        io.witness = region;
        Agent::with_io(cfg, io).await
    }

    /// Opens an agent on the given I/O (the simulator's, or production's).
    pub async fn with_io(cfg: AgentConfig, io: AgentIo) -> Result<Arc<Agent>, AgentError> {
        let key = cfg.key()?;
        let dd = |source| AgentError::DataDir { path: cfg.data_dir.display().to_string(), source };
        std::fs::create_dir_all(&cfg.data_dir).map_err(dd)?;
        let incarnation = next_incarnation(&cfg.data_dir).map_err(dd)?;
        let me = cfg.host();
        let AgentIo { clock, heartbeats, disk, rpc, driver, os_threads, mutation, witness } = io;
        let disk = HeartbeatDisk::new(disk, key.clone(), Duration::from_millis(cfg.timings.disk_io_timeout_ms));
        // Refuse a disk that is not this cluster's, formatted with this layout: a path typo or a
        // mount missing at boot must not leave this host counting its own writes as shared.
        match (&cfg.heartbeat_disk, &cfg.witness) {
            (Some(path), _) => {
                disk.check_header(&path.display().to_string()).await?;
            }
            (None, Some(w)) => {
                // The witness formats the area for the cluster; a witness that is down now
                // must not keep a host from starting (its loss alone changes nothing), but
                // one that answers with another cluster's area is refused.
                let name = w.to_string();
                match disk.check_header(&name).await {
                    Err(e @ DiskError::Header { .. }) => return Err(e.into()),
                    Err(e) => tracing::warn!("{name}: {e}; starting without it"),
                    Ok(_) => {}
                }
            }
            (None, None) => {}
        }
        let token = key.peer_token();
        let witness = witness.map(|region| witness::DiskWitness::new(region, me, incarnation, os_threads));
        let route = witness.as_ref().map(|w| w.route.clone()).unwrap_or_default();
        let mut consensus = Consensus::open_routed(&cfg.data_dir, u64::from(me.0), token.clone(), Arc::clone(&rpc), route, &cfg.timings).await?;
        let heavy = Arc::new(crate::heavy::HeavyWork::new(os_threads));
        consensus.use_heavy(Arc::clone(&heavy));
        let events = EventLog::new(&cfg.name, &cfg.data_dir);
        let mut liveness = Liveness::new(me, incarnation, cfg.timings, clock.now());
        liveness.set_disk_witness(witness.is_some());
        events.record(crate::events::EventKind::AgentStarted, None, None, format!("incarnation {incarnation}, driver {}", driver.kind()));
        Ok(Arc::new(Agent {
            me,
            key,
            token,
            metrics: crate::metrics::Metrics::default(),
            consensus,
            driver,
            clock,
            events,
            incarnation,
            liveness: Mutex::new(liveness),
            status: Mutex::new(RuntimeStatus::default()),
            beat: Mutex::default(),
            coordination: Mutex::default(),
            coordinator_wake: tokio::sync::Notify::new(),
            ticks: tokio::sync::watch::Sender::new(0),
            reconciling: Mutex::default(),
            migrations: Mutex::default(),
            mirroring: Mutex::default(),
            reconcile_wake: tokio::sync::Notify::new(),
            probing: Mutex::default(),
            heartbeats,
            disk,
            witness,
            rpc,
            os_threads,
            heavy,
            mutation,
            last_tick: AtomicU64::new(0),
            lease_until: AtomicU64::new(0),
            hw_watchdog: Mutex::new(None),
            stopping: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            stop_request: tokio::sync::watch::channel(None).0,
            promised_through: AtomicU64::new(read_number(&cfg.data_dir, fencing::PROMISE_FILE)),
            promise_gate: Mutex::new(()),
            cfg,
        }))
    }

    /// Starts the loops and the software watchdog.
    pub fn spawn_loops(self: &Arc<Self>) -> Result<(), AgentError> {
        // Loops inherit the caller's tracing span, so a process hosting several agents (the
        // simulator) can tell their logs apart.
        if self.os_threads {
            self.spawn_liveness_thread()?;
        } else {
            tokio::spawn(Arc::clone(self).liveness_loop().in_current_span());
        }
        tokio::spawn(Arc::clone(self).membership_loop().in_current_span());
        tokio::spawn(Arc::clone(self).coordinator_loop().in_current_span());
        tokio::spawn(Arc::clone(self).reconcile_loop().in_current_span());
        tokio::spawn(Arc::clone(self).migration_loop().in_current_span());
        tokio::spawn(Arc::clone(self).mirror_loop().in_current_span());
        if self.witness.is_some() {
            tokio::spawn(Arc::clone(self).witness_loop().in_current_span());
        }
        self.start_watchdogs()
    }

    /// What a periodic loop waits on between its passes (see [`Agent::next_round`]).
    fn rounds(&self) -> Rounds {
        Rounds { ticks: self.ticks.subscribe(), applied: self.consensus.applied() }
    }

    /// Waits for the next pass of a periodic loop: a liveness tick that is a full round (every
    /// tick while a peer is quiet, every fifth of the peer timeout while the cluster is calm:
    /// see `Liveness::round_due`), an applied entry (a placement, a switchover, a join is acted
    /// on at once rather than at a round), or twice the calm spacing (at least four intervals)
    /// should the liveness loop stall (the loops that wait here must not stall with it).
    async fn next_round(&self, rounds: &mut Rounds) {
        let wait = async {
            tokio::select! {
                _ = rounds.ticks.changed() => {}
                applied = rounds.applied.changed() => {
                    if applied.is_err() {
                        // Consensus is gone (the agent stops): the ticks alone, or the bound.
                        let _ = rounds.ticks.changed().await;
                    }
                }
            }
        };
        let calm_spacing = Duration::from_millis(tandem_core::liveness::calm_round_spacing_ms(&self.cfg.timings));
        let _ = tokio::time::timeout((4 * self.interval()).max(2 * calm_spacing), wait).await;
    }

    /// Whether the agent has stopped (asked to, or after consensus stopped).
    #[must_use]
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Marks the agent as stopping: loops end, VMs are left to the launcher's death signal.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // A deliberate stop takes the VMs down with the agent: disarm the watchdog (the "magic
        // close") so that the host is not reset as well.
        if let Some(mut w) = lock(&self.hw_watchdog).take() {
            w.disarm();
        }
    }

    /// Stops the loops and consensus, as a crash would: a simulator uses it to take a host
    /// down and later open a new agent on the same data directory.
    pub async fn shutdown(&self) {
        self.stop();
        // As on a crash, the witness's node stops here and now, and nothing more is written
        // for it (not even the claim's withdrawal: the host may be running again by then).
        if let Some(w) = &self.witness {
            w.halt().await;
        }
        self.consensus.shutdown().await;
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.cfg.timings.heartbeat_interval_ms)
    }

    /// The current runtime status.
    #[must_use]
    pub fn status(&self) -> RuntimeStatus {
        lock(&self.status).clone()
    }

    /// The latest liveness assessment.
    #[must_use]
    pub fn assessment(&self) -> Option<Assessment> {
        lock(&self.beat).assessment.clone()
    }

    /// Network heartbeats received and missed per peer.
    #[must_use]
    pub fn heartbeat_counts(&self) -> Vec<tandem_core::liveness::HeartbeatCount> {
        lock(&self.liveness).heartbeat_counts()
    }

    /// Counters of rejected heartbeats and slots.
    #[must_use]
    pub fn reject_counters(&self) -> tandem_core::liveness::RejectCounters {
        lock(&self.liveness).counters()
    }

    /// How this agent calls other agents.
    #[must_use]
    pub fn rpc(&self) -> &dyn PeerRpc {
        self.rpc.as_ref()
    }

    fn is_fenced(&self) -> bool {
        lock(&self.status).fenced.is_some()
    }

    /// Proposes `cmd`, forwarding it to the leader when this host is not the leader.
    pub async fn submit(&self, cmd: Command) -> Result<CommandResult, AgentError> {
        match self.consensus.propose(cmd.clone()).await {
            Ok((r, _)) => Ok(r),
            Err(ConsensusError::NotLeader(leader)) => {
                let body = serde_json::to_vec(&cmd).map_err(|e| AgentError::ForwardRefused(e.to_string()))?;
                // A leader cut off holds the forward until its timeout, 10 s, although a new
                // leader — this host, even — may be known a second later: the caller (the
                // membership loop's join, the coordinator) then waited all that time. The forward
                // is given up once the leader this host knows changes, as it is at its timeout:
                // undecided, it may still commit.
                let forwarded_to = self.consensus.status().leader;
                let resp = tokio::select! {
                    resp = self.forward_to_leader(leader, "/v1/internal/propose", body, FORWARD_TIMEOUT) => resp?,
                    () = self.consensus.leader_changed_from(forwarded_to) => return Err(AgentError::LeaderChanged),
                };
                if resp.status != 200 {
                    return Err(AgentError::ForwardRefused(String::from_utf8_lossy(&resp.body).into_owned()));
                }
                let (r, index): (CommandResult, u64) = serde_json::from_slice(&resp.body).map_err(|e| AgentError::ForwardRefused(e.to_string()))?;
                self.consensus.wait_applied(index).await;
                Ok(r)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `body` to `path` on the leader's API, with the cluster token: a request this host
    /// was authorized for but only the leader can carry out (a proposal, a join).
    pub async fn forward_to_leader(&self, leader: Option<String>, path: &str, body: Vec<u8>, timeout: Duration) -> Result<httpc::Response, AgentError> {
        let leader = leader.ok_or(AgentError::NoLeader)?;
        Ok(self.rpc.call(&leader, path, Some(&self.token), Some(body), timeout).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heartbeat's epoch and fenced flag come from one snapshot. Mid-rejoin, committed state
    /// already has this host in epoch 6 while the status still says "fenced in epoch 5": the
    /// announcement must be "fenced in 5" (old news, refused as stale by the coordinator), never
    /// "fenced in 6", on which the coordinator would fail the rejoined host over at once.
    #[test]
    fn a_fence_is_announced_for_its_own_epoch_and_only_once_confirmed() {
        let reason = FenceReason::Isolated { silent_ms: 2500 };
        let mut st = RuntimeStatus { fenced: Some(reason), fenced_at: Some(Millis(10)), fenced_through: Some(5), ..RuntimeStatus::default() };
        // Kills not yet confirmed: not announced.
        assert_eq!(st.announcement(5, 5), (5, false));
        st.fence_confirmed_at = Some(Millis(12));
        assert_eq!(st.announcement(6, 5), (5, true), "the join committed epoch 6 before the status was updated");
        // Only as far as the stored promise.
        st.fenced_through = Some(7);
        assert_eq!(st.announcement(6, 6), (6, true), "epoch 7 not yet promised durably");
        // Joined again: the new epoch, not fenced.
        let joined = RuntimeStatus { joined_epoch: Some(6), ..RuntimeStatus::default() };
        assert_eq!(joined.announcement(6, 5), (6, false));
        // Never joined: the committed epoch, informational.
        assert_eq!(RuntimeStatus::default().announcement(3, 0), (3, false));
    }
}
