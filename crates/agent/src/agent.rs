//! The agent: wires the sans-I/O core to sockets, the heartbeat disk, consensus and the driver.
//!
//! Four loops run side by side so that a slow one cannot delay the others:
//! - the **liveness loop** sends heartbeats, writes and reads the heartbeat disk, assesses
//!   liveness and fences this host when the core says so; it never waits on consensus;
//! - the **membership loop** (re)joins this host to the cluster when it is connected again;
//! - the **coordinator loop**, on the leader only, fails over dead or fenced hosts once their
//!   fence deadline has passed and places VMs that wait for a host;
//! - the **reconciler loop** makes the VMs running here match what committed state assigns here.

use crate::config::{AgentConfig, DriverKind};
use crate::consensus::{CommandResult, Consensus, ConsensusError};
use crate::disk::{DiskError, HeartbeatDisk};
use crate::events::EventLog;
use crate::httpc;
use crate::io::{AgentIo, Clock, HeartbeatTransport, PeerRpc};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tandem_core::liveness::{Assessment, FenceReason, HostLiveness, Liveness};
use tandem_core::recovery;
use tandem_core::state::{Applied, Command, HostStatus, PowerState, Protection, BEST_EFFORT_RETRIES, BEST_EFFORT_RETRY_INTERVAL_MS};
use tandem_core::wire::{ClusterKey, DiskSlot, Heartbeat, MAX_HEARTBEAT_LEN};
use tandem_core::{HostId, HostSet, Millis};
use tandem_drivers::launcher::Launcher;
use tandem_drivers::process::ProcessDriver;
use tandem_drivers::qemu::QemuDriver;
use tandem_drivers::{VmDriver, VmExit, VmLaunch};
use thiserror::Error;
use tracing::Instrument;

mod fencing;
mod watchdogs;

/// Restarts of one crashed VM allowed on this host within [`RESTART_WINDOW_MS`].
const MAX_LOCAL_RESTARTS: usize = 3;
const RESTART_WINDOW_MS: u64 = 60_000;
/// Timeout of a forwarded write.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the coordinator waits for a host's list of running VMs (restart groups).
const LOCAL_QUERY_TIMEOUT: Duration = Duration::from_secs(1);

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
    #[error("the leader refused the forwarded command: {0}")]
    ForwardRefused(String),
    #[error("hardware watchdog unusable")]
    Watchdog(#[from] crate::watchdog::WatchdogError),
    #[error("cannot start the liveness thread")]
    LivenessThread(#[source] std::io::Error),
}

/// What this agent is doing, for the API and the loops.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RuntimeStatus {
    /// The epoch this host joined in; `None` until joined, and again after fencing.
    pub joined_epoch: Option<u64>,
    pub fenced: Option<FenceReason>,
    pub fenced_at: Option<Millis>,
    /// The epoch the fence speaks for: the one this host held when it fenced.
    pub fenced_in_epoch: Option<u64>,
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
    pub fn announcement(&self, committed_epoch: u64) -> (u64, bool) {
        match (self.fenced_in_epoch, self.fence_confirmed_at) {
            (Some(e), Some(_)) if self.fenced.is_some() => (e, true),
            _ => (self.joined_epoch.unwrap_or(committed_epoch), false),
        }
    }
}

#[derive(Default)]
struct Scratch {
    seq: u64,
    disk_counter: u64,
    disk_busy: bool,
    assessment: Option<Assessment>,
    starting: BTreeSet<String>,
    stopping: BTreeSet<String>,
    restarts: BTreeMap<String, VecDeque<Millis>>,
    /// VMs (and the generation) this host gave up on: never started again here in that
    /// generation, even while the local copy of committed state still lags the release.
    given_up: BTreeMap<String, (u64, String)>,
    /// Coordinator: the restart group being held back, and since when.
    group_gate: Option<recovery::GroupGate>,
    /// Coordinator: when each best-effort VM waiting for capacity is due for its next retry.
    capacity_retry_due: BTreeMap<String, Millis>,
    previous: BTreeMap<HostId, HostLiveness>,
    /// Coordinator: when it first saw each host report itself fenced in an epoch.
    fence_reports: BTreeMap<(HostId, u64), Millis>,
    /// Coordinator: the last reason recorded for each VM that no host takes.
    waiting_reasons: BTreeMap<String, String>,
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
    scratch: Mutex<Scratch>,
    heartbeats: Arc<dyn HeartbeatTransport>,
    disk: HeartbeatDisk,
    rpc: Arc<dyn PeerRpc>,
    /// Whether the agent runs OS threads of its own (liveness, watchdog, heavy work): a
    /// simulator, which must stay deterministic, runs everything on its one runtime.
    os_threads: bool,
    /// Where FTT searches, plans and the metrics page run: off the runtime's workers.
    pub heavy: Arc<crate::heavy::HeavyWork>,
    mutation: Option<crate::io::Mutation>,
    last_tick: AtomicU64,
    /// The open hardware watchdog, when configured; `stop` disarms it.
    hw_watchdog: Mutex<Option<crate::watchdog::HardwareWatchdog>>,
    stopping: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads, raises and durably stores the incarnation number.
fn next_incarnation(dir: &std::path::Path) -> std::io::Result<u64> {
    let path = dir.join("incarnation");
    let prev: u64 = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let next = prev + 1;
    let tmp = dir.join("incarnation.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{next}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(next)
}

impl Agent {
    /// Opens everything the agent needs, wired to the real world. Nothing runs until
    /// [`Agent::spawn_loops`].
    pub async fn open(cfg: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        let launcher = Launcher::new().map_err(AgentError::Launcher)?;
        let stop_timeout = Duration::from_secs(cfg.qemu.stop_timeout_s);
        let driver: Arc<dyn VmDriver> = match cfg.driver {
            DriverKind::Process => Arc::new(ProcessDriver::new(launcher, &cfg.name, stop_timeout)),
            DriverKind::Qemu => Arc::new(QemuDriver::new(cfg.qemu.clone(), launcher, &cfg.name, &cfg.api_addr.ip().to_string(), cfg.data_dir.join("run"))),
            DriverKind::Mixed => Arc::new(tandem_drivers::mixed::MixedDriver::new(
                launcher,
                cfg.qemu.clone(),
                &cfg.name,
                &cfg.api_addr.ip().to_string(),
                cfg.data_dir.join("run"),
                stop_timeout,
            )),
        };
        let tls = match &cfg.tls {
            Some(t) => Some(crate::tls::ClientTls::load(&t.ca)?),
            None => None,
        };
        let io = AgentIo::production(cfg.heartbeat_addr, &cfg.heartbeat_disk, driver, tls).await?;
        Agent::with_io(cfg, io).await
    }

    /// Opens an agent on the given I/O (the simulator's, or production's).
    pub async fn with_io(cfg: AgentConfig, io: AgentIo) -> Result<Arc<Agent>, AgentError> {
        let key = cfg.key()?;
        let dd = |source| AgentError::DataDir { path: cfg.data_dir.display().to_string(), source };
        std::fs::create_dir_all(&cfg.data_dir).map_err(dd)?;
        let incarnation = next_incarnation(&cfg.data_dir).map_err(dd)?;
        let me = cfg.host();
        let AgentIo { clock, heartbeats, disk, rpc, driver, os_threads, mutation } = io;
        let disk = HeartbeatDisk::new(disk, key.clone(), Duration::from_millis(cfg.timings.disk_io_timeout_ms));
        // Refuse a disk that is not this cluster's, formatted with this layout: a path typo or a
        // mount missing at boot must not leave this host counting its own writes as shared.
        disk.check_header(&cfg.heartbeat_disk.display().to_string()).await?;
        let token = key.peer_token();
        let mut consensus = Consensus::open(&cfg.data_dir, u64::from(me.0), token.clone(), Arc::clone(&rpc)).await?;
        let heavy = Arc::new(crate::heavy::HeavyWork::new(os_threads));
        consensus.use_heavy(Arc::clone(&heavy));
        let events = EventLog::new(&cfg.name, &cfg.data_dir);
        let liveness = Liveness::new(me, incarnation, cfg.timings, clock.now());
        events.record("agent-started", None, None, format!("incarnation {incarnation}, driver {}", driver.kind()));
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
            scratch: Mutex::new(Scratch::default()),
            heartbeats,
            disk,
            rpc,
            os_threads,
            heavy,
            mutation,
            last_tick: AtomicU64::new(0),
            hw_watchdog: Mutex::new(None),
            stopping: AtomicBool::new(false),
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
            tokio::spawn(Arc::clone(self).receive_loop().in_current_span());
            tokio::spawn(Arc::clone(self).liveness_loop().in_current_span());
        }
        tokio::spawn(Arc::clone(self).membership_loop().in_current_span());
        tokio::spawn(Arc::clone(self).coordinator_loop().in_current_span());
        tokio::spawn(Arc::clone(self).reconcile_loop().in_current_span());
        self.start_watchdogs()
    }

    /// Heartbeats in and out, the slot I/O and the liveness decision run on a thread and runtime
    /// of their own: nothing else the agent does (applying the log, FTT searches, the API, the
    /// launcher) can make them wait for a worker, so a busy host never fences itself.
    fn spawn_liveness_thread(self: &Arc<Self>) -> Result<(), AgentError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AgentError::LivenessThread)?;
        let a = Arc::clone(self);
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("tandem-liveness".into())
            .spawn(move || {
                rt.block_on(
                    async move {
                        let receiving = tokio::spawn(Arc::clone(&a).receive_loop().in_current_span());
                        a.liveness_loop().await;
                        let _ = receiving.await;
                    }
                    .instrument(span),
                );
            })
            .map_err(AgentError::LivenessThread)?;
        Ok(())
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
        lock(&self.scratch).assessment.clone()
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

    async fn receive_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_HEARTBEAT_LEN + 1];
        while !self.stopping.load(Ordering::SeqCst) {
            // Bounded, so that a silent network still lets the loop see that the agent stops.
            let Ok(received) = tokio::time::timeout(self.interval(), self.heartbeats.recv_from(&mut buf)).await else {
                continue;
            };
            let Ok((n, _from)) = received else {
                // A failing transport must not turn this loop into a busy spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let now = self.clock.now();
            match Heartbeat::decode(&buf[..n], &self.key) {
                Ok(hb) => {
                    if let Err(e) = lock(&self.liveness).heartbeat_received(&hb, now) {
                        tracing::debug!("{e}");
                    }
                }
                Err(e) => {
                    lock(&self.liveness).heartbeat_forged();
                    tracing::warn!("rejected datagram: {e}");
                }
            }
        }
    }

    async fn liveness_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while !self.stopping.load(Ordering::SeqCst) {
            tick.tick().await;
            self.liveness_tick().await;
        }
    }

    async fn liveness_tick(self: &Arc<Self>) {
        let now = self.clock.now();
        self.last_tick.store(now.0.max(1), Ordering::SeqCst);
        if let Some(why) = self.consensus.fatal() {
            // Heartbeating on frozen state would keep this host looking healthy while it can
            // no longer see failovers, rejoins or stops: fence, say why, and stop.
            if !self.is_fenced() {
                self.fence(FenceReason::ConsensusStopped, now);
            }
            if !self.stopping.swap(true, Ordering::SeqCst) {
                tracing::error!("consensus stopped: {why}; every VM killed, the agent stops");
                self.events.record("consensus-stopped", None, Some(&self.cfg.name), format!("consensus stopped: {why}; fenced, the agent stops"));
            }
            return;
        }
        let (members, epoch, peers) = self.consensus.with_state(|s| {
            let peers: Vec<SocketAddr> = s.hosts.values().filter(|h| h.id != self.me).filter_map(|h| h.heartbeat_addr.parse().ok()).collect();
            (s.members(), s.hosts.get(&self.me).map_or(0, |h| h.epoch), peers)
        });
        self.confirm_fence(now);
        let (epoch, fenced) = self.status().announcement(epoch);
        let (hb, assessment, seq) = {
            let mut l = lock(&self.liveness);
            l.set_members(members);
            let seq = {
                let mut s = lock(&self.scratch);
                s.seq += 1;
                s.seq
            };
            l.heartbeat_sent(seq, now);
            let hb = Heartbeat { from: self.me, incarnation: self.incarnation, seq, epoch, heard: l.heard(now), acks: l.acks(), fenced };
            (hb, l.assess(now), seq)
        };
        let bytes = hb.encode(&self.key);
        for p in &peers {
            let _ = self.heartbeats.send_to(&bytes, *p).await;
        }
        self.disk_round(seq, hb.heard, epoch, fenced);
        self.note_transitions(&assessment);
        if let Some(reason) = assessment.fence {
            if !self.is_fenced() {
                self.fence(reason, now);
            }
        }
        lock(&self.scratch).assessment = Some(assessment);
    }

    /// Writes our slot then reads every slot, unless the previous round still hangs.
    fn disk_round(self: &Arc<Self>, _seq: u64, heard: HostSet, epoch: u64, fenced: bool) {
        let counter = {
            let mut s = lock(&self.scratch);
            if s.disk_busy {
                drop(s);
                lock(&self.liveness).disk_write_failed();
                return;
            }
            s.disk_busy = true;
            s.disk_counter += 1;
            s.disk_counter
        };
        let a = Arc::clone(self);
        tokio::spawn(
            async move {
                let slot = DiskSlot { host: a.me, incarnation: a.incarnation, counter, epoch, heard, fenced, written_at_ms: a.clock.now().0 };
                let started = a.clock.now();
                match a.disk.write(&slot).await {
                    Ok(()) => {
                        let finished = a.clock.now();
                        a.metrics.disk_write_seconds.observe(finished.since(started) as f64 / 1000.0);
                        lock(&a.liveness).disk_written(started, finished);
                    }
                    Err(e) => {
                        tracing::debug!("slot write failed: {e}");
                        a.metrics.disk_write_failures.fetch_add(1, Ordering::Relaxed);
                        lock(&a.liveness).disk_write_failed();
                    }
                }
                match a.disk.read_all().await {
                    Ok(slots) => {
                        let now = a.clock.now();
                        lock(&a.liveness).disk_read(&slots, now);
                    }
                    Err(e) => {
                        tracing::debug!("slot read failed: {e}");
                        lock(&a.liveness).disk_read_failed();
                    }
                }
                lock(&a.scratch).disk_busy = false;
            }
            .in_current_span(),
        );
    }

    fn host_name(&self, h: HostId) -> String {
        self.consensus.with_state(|s| s.hosts.get(&h).map_or_else(|| h.to_string(), |r| r.name.clone()))
    }

    fn note_transitions(&self, a: &Assessment) {
        let changes: Vec<(HostId, HostLiveness, Option<HostLiveness>)> = {
            let mut s = lock(&self.scratch);
            let mut out = Vec::new();
            for p in &a.peers {
                let before = s.previous.insert(p.host, p.liveness);
                if before != Some(p.liveness) {
                    out.push((p.host, p.liveness, before));
                }
            }
            out
        };
        for (host, now_is, before) in changes {
            let Some(before) = before else { continue };
            let p = a.peer(host);
            let age = |v: Option<u64>| v.map_or_else(|| "never".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
            let detail = format!(
                "{} is {:?} (was {:?}): network heartbeat {} ago, disk heartbeat {} ago{}",
                self.host_name(host),
                now_is,
                before,
                age(p.and_then(|p| p.net_age_ms)),
                age(p.and_then(|p| p.disk_age_ms)),
                p.and_then(|p| p.fence_deadline).map(|d| format!("; fence deadline in {:.1} s", d.since(a.now) as f64 / 1000.0)).unwrap_or_default()
            );
            let kind = match now_is {
                HostLiveness::Alive => "peer-alive",
                HostLiveness::Partitioned => "peer-partitioned",
                HostLiveness::Dead => "peer-dead",
                HostLiveness::Unknown => "peer-unknown",
            };
            self.events.record(kind, None, Some(&self.host_name(host)), detail);
        }
    }

    /// Proposes `cmd`, forwarding it to the leader when this host is not the leader.
    pub async fn submit(&self, cmd: Command) -> Result<CommandResult, AgentError> {
        match self.consensus.propose(cmd.clone()).await {
            Ok((r, _)) => Ok(r),
            Err(ConsensusError::NotLeader(Some(addr))) => {
                let body = serde_json::to_vec(&cmd).map_err(|e| AgentError::ForwardRefused(e.to_string()))?;
                let resp = self.rpc.call(&addr, "/v1/internal/propose", Some(&self.token), Some(body), FORWARD_TIMEOUT).await?;
                if resp.status != 200 {
                    return Err(AgentError::ForwardRefused(String::from_utf8_lossy(&resp.body).into_owned()));
                }
                let (r, index): (CommandResult, u64) = serde_json::from_slice(&resp.body).map_err(|e| AgentError::ForwardRefused(e.to_string()))?;
                self.consensus.wait_applied(index).await;
                Ok(r)
            }
            Err(ConsensusError::NotLeader(None)) => Err(AgentError::NoLeader),
            Err(e) => Err(e.into()),
        }
    }

    async fn membership_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while !self.stopping.load(Ordering::SeqCst) {
            tick.tick().await;
            let st = self.status();
            let known = self.consensus.with_state(|s| s.hosts.get(&self.me).map(|h| (h.status, h.epoch)));
            // Committed state may say we were failed over or rejoined elsewhere: then we no
            // longer hold the epoch we joined in, and must stop everything and join again.
            if let (Some(joined), Some((status, epoch))) = (st.joined_epoch, known) {
                if status != HostStatus::Active || epoch != joined {
                    // Unjoined first, so no start passes its last-instant check, then the kill.
                    lock(&self.status).joined_epoch = None;
                    let killed = self.driver.kill_all();
                    self.events.record(
                        "epoch-lost",
                        None,
                        Some(&self.cfg.name),
                        format!("committed state has this host {status:?} in epoch {epoch}, joined in {joined}; killed {killed} VM(s)"),
                    );
                }
                continue;
            }
            if st.joined_epoch.is_some() || known.is_none() || self.consensus.status().leader.is_none() {
                continue;
            }
            // A host that is stopping, or whose consensus stopped, never joins again.
            if self.is_stopping() || matches!(st.fenced, Some(FenceReason::Stopping | FenceReason::ConsensusStopped)) {
                continue;
            }
            let Some(a) = self.assessment() else { continue };
            if a.fence.is_some() || !a.has_majority {
                continue;
            }
            match self.submit(Command::HostJoined { host: self.me }).await {
                Ok(Ok(Applied::HostEpoch { epoch, .. })) => {
                    {
                        let mut s = lock(&self.status);
                        s.joined_epoch = Some(epoch);
                        s.fenced = None;
                        s.fenced_at = None;
                        s.fenced_in_epoch = None;
                        s.fence_confirmed_at = None;
                    }
                    self.events.record("joined", None, Some(&self.cfg.name), format!("joined the cluster in epoch {epoch}"));
                }
                Ok(other) => tracing::warn!("join refused: {other:?}"),
                Err(e) => tracing::debug!("join failed: {e}"),
            }
        }
    }

    async fn coordinator_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while !self.stopping.load(Ordering::SeqCst) {
            tick.tick().await;
            // A fenced host that still leads consensus keeps coordinating: otherwise a leader that
            // lost a pairwise partition (it still reaches a majority, so nobody replaces it)
            // would leave its own VMs, and everyone else's, without a coordinator.
            let st = self.status();
            if !self.consensus.is_leader() || (st.joined_epoch.is_none() && st.fenced.is_none()) {
                continue;
            }
            let Some(a) = self.assessment() else { continue };
            self.fail_over_hosts(&a).await;
            self.place_waiting(&a).await;
            self.count_capacity_retries().await;
            self.release_restart_groups().await;
        }
    }

    /// Best-effort VMs a failover left without a host are placed by `place_waiting` as soon as
    /// room appears; every [`BEST_EFFORT_RETRY_INTERVAL_MS`] without one counts a retry, and the
    /// last one stops them.
    async fn count_capacity_retries(&self) {
        let now = self.clock.now();
        let waiting: Vec<String> = self
            .consensus
            .with_state(|s| s.vms.values().filter(|v| v.capacity_retries.is_some() && v.assignment.is_none()).map(|v| v.spec.name.clone()).collect());
        let due: Vec<String> = {
            let mut scratch = lock(&self.scratch);
            scratch.capacity_retry_due.retain(|n, _| waiting.contains(n));
            waiting
                .into_iter()
                .filter(|n| {
                    let at = *scratch.capacity_retry_due.entry(n.clone()).or_insert(now.plus(BEST_EFFORT_RETRY_INTERVAL_MS));
                    now >= at
                })
                .collect()
        };
        for name in due {
            lock(&self.scratch).capacity_retry_due.insert(name.clone(), now.plus(BEST_EFFORT_RETRY_INTERVAL_MS));
            match self.submit(Command::CapacityRetry { name: name.clone() }).await {
                Ok(Ok(Applied::StillWaiting { attempt, .. })) => {
                    self.events.record("vm-waiting", Some(&name), None, format!("{name}: still no host with room (retry {attempt} of {BEST_EFFORT_RETRIES})"));
                }
                Ok(Ok(Applied::GaveUpWaiting { .. })) => self.events.record(
                    "vm-left-down",
                    Some(&name),
                    None,
                    format!("{name} (best-effort) stopped: no host with room after {BEST_EFFORT_RETRIES} retries"),
                ),
                Ok(other) => tracing::debug!("capacity retry of {name}: {other:?}"),
                Err(e) => tracing::debug!("capacity retry of {name} not committed: {e}"),
            }
        }
    }

    /// Lets the lowest held restart group start once the lower groups run (asked of their
    /// hosts) or its delay has passed.
    async fn release_restart_groups(&self) {
        // Only the hosts of the VMs the lowest held group waits for are asked, all at once, so
        // one slow host delays this loop (and failovers) by at most LOCAL_QUERY_TIMEOUT.
        let hosts: Option<Vec<(HostId, String)>> = self.consensus.with_state(|s| {
            let held = recovery::lowest_held_group(s)?;
            let hosts: BTreeSet<HostId> = held.waits_for.iter().map(|(_, h, _)| *h).collect();
            Some(hosts.into_iter().filter_map(|h| Some((h, s.hosts.get(&h)?.api_addr.clone()))).collect())
        });
        let Some(hosts) = hosts else {
            lock(&self.scratch).group_gate = None;
            return;
        };
        let mut running: BTreeSet<(String, u64)> = BTreeSet::new();
        let mut asks = tokio::task::JoinSet::new();
        for (host, addr) in hosts {
            if host == self.me {
                running.extend(self.driver.list().into_iter().filter(|v| v.exit.is_none()).map(|v| (v.name, v.generation)));
                continue;
            }
            let (rpc, token) = (Arc::clone(&self.rpc), self.token.clone());
            asks.spawn(async move { rpc.call(&addr, "/v1/local", Some(&token), None, LOCAL_QUERY_TIMEOUT).await }.in_current_span());
        }
        // A host that does not answer counts as running nothing: its group waits for the delay.
        while let Some(answer) = asks.join_next().await {
            let Ok(Ok(resp)) = answer else { continue };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&resp.body) else { continue };
            for vm in v["vms"].as_array().into_iter().flatten().filter(|vm| vm["exit"].is_null()) {
                if let (Some(n), Some(g)) = (vm["name"].as_str(), vm["generation"].as_u64()) {
                    running.insert((n.to_string(), g));
                }
            }
        }
        let now = self.clock.now();
        let release = {
            let mut gate = lock(&self.scratch).group_gate;
            let r = self.consensus.with_state(|s| recovery::release_held(s, |n, g| running.contains(&(n.to_string(), g)), &mut gate, now));
            lock(&self.scratch).group_gate = gate;
            r
        };
        let Some(r) = release else { return };
        let count = r.names.len();
        match self.submit(Command::ReleaseHeld { names: r.names }).await {
            Ok(Ok(_)) => {
                let why = match r.reason {
                    recovery::GroupReleaseReason::LowerGroupsRunning => "the lower groups run".to_string(),
                    recovery::GroupReleaseReason::DelayPassed => "its delay passed".to_string(),
                };
                self.events.record("restart-group-released", None, None, format!("restart group {} ({count} VM(s)) starts: {why}", r.group));
            }
            Ok(Err(e)) => tracing::debug!("release of restart group {} refused: {e}", r.group),
            Err(e) => tracing::debug!("release of restart group {} not committed: {e}", r.group),
        }
    }

    /// Hosts that may receive VMs now: active in committed state and alive as seen from here.
    fn eligible_hosts(&self, a: &Assessment) -> HostSet {
        self.consensus.with_state(|s| {
            s.active_hosts()
                .iter()
                .filter(|h| (*h == self.me && !self.is_fenced()) || a.peer(*h).is_some_and(|p| p.liveness == HostLiveness::Alive && p.fenced_epoch.is_none()))
                .collect()
        })
    }

    async fn fail_over_hosts(&self, a: &Assessment) {
        let now = self.clock.now();
        let st = self.status();
        let grace = self.cfg.timings.kill_grace_ms;
        // A fenced host's VMs move once its kills have had kill_grace_ms to take effect (a qemu
        // in uninterruptible I/O may still have writes in flight): for our own fence, counted from
        // the confirmed exits; for a peer's, from when we first saw its report.
        let own_fence = st.fenced.filter(|_| st.fence_confirmed_at.is_some_and(|c| now.since(c) >= grace));
        let reported: BTreeMap<HostId, u64> = a.peers.iter().filter_map(|p| Some((p.host, p.fenced_epoch?))).collect();
        let reports_due: BTreeSet<HostId> = {
            let mut scratch = lock(&self.scratch);
            scratch.fence_reports.retain(|(h, e), _| reported.get(h) == Some(e));
            reported.iter().filter(|(h, e)| now.since(*scratch.fence_reports.entry((**h, **e)).or_insert(now)) >= grace).map(|(h, _)| *h).collect()
        };
        let candidates: Vec<(HostId, u64, String)> = self.consensus.with_state(|s| {
            s.hosts
                .values()
                .filter(|h| h.status == HostStatus::Active)
                .filter_map(|h| {
                    if h.id == self.me {
                        // Fencing killed our VMs synchronously before this flag was set, and
                        // nothing starts here while it is set: our VMs may move at once.
                        return own_fence.map(|r| (h.id, h.epoch, format!("{} (the coordinator) fenced itself: {r}", h.name)));
                    }
                    let p = a.peer(h.id)?;
                    if p.fenced_epoch == Some(h.epoch) && reports_due.contains(&h.id) {
                        return Some((h.id, h.epoch, format!("{} reports itself fenced in epoch {}", h.name, h.epoch)));
                    }
                    if self.mutation == Some(crate::io::Mutation::SkipFenceWait) && p.liveness != HostLiveness::Alive && p.liveness != HostLiveness::Unknown {
                        return Some((h.id, h.epoch, format!("UNSAFE: {} not heard; fence deadline skipped", h.name)));
                    }
                    let deadline = p.fence_deadline?;
                    (p.liveness == HostLiveness::Dead && now >= deadline).then(|| {
                        (
                            h.id,
                            h.epoch,
                            format!(
                                "{} dead: no network heartbeat for {:.1} s, no disk heartbeat for {:.1} s; fence deadline passed {:.1} s ago",
                                h.name,
                                p.net_age_ms.unwrap_or(0) as f64 / 1000.0,
                                p.disk_age_ms.unwrap_or(0) as f64 / 1000.0,
                                now.since(deadline) as f64 / 1000.0
                            ),
                        )
                    })
                })
                .collect()
        });
        for (host, epoch, why) in candidates {
            if !self.consensus.confirm_leader().await {
                return;
            }
            let eligible = self.eligible_hosts(a);
            let plan = self.consensus.with_state(|s| recovery::plan_failover(s, host, eligible));
            let name = self.host_name(host);
            self.events.record(
                "failover-decided",
                None,
                Some(&name),
                format!("{why}; plan: {} placement(s), {} left down", plan.placements.len(), plan.left_down.len()),
            );
            match self.submit(Command::Failover { host, epoch, plan: plan.placements }).await {
                Ok(Ok(Applied::FailedOver { moved, left_down, .. })) => {
                    for (vm, target, generation) in &moved {
                        self.events.record(
                            "vm-reassigned",
                            Some(vm),
                            Some(&name),
                            format!("{vm} reassigned {name} -> {}, generation {generation}", self.host_name(*target)),
                        );
                    }
                    for vm in &left_down {
                        self.events.record("vm-left-down", Some(vm), Some(&name), format!("{vm} not restarted: no capacity or protection does not allow it"));
                    }
                    let since_dead = a.peer(host).and_then(|p| p.dead_since).map(|d| self.clock.now().since(d));
                    self.metrics.failovers.fetch_add(1, Ordering::Relaxed);
                    self.metrics.vms_moved.fetch_add(moved.len() as u64, Ordering::Relaxed);
                    if let Some(ms) = since_dead {
                        self.metrics.failover_seconds.observe(ms as f64 / 1000.0);
                    }
                    let timing = since_dead.map_or_else(String::new, |ms| format!(", {:.2} s after it was first seen dead", ms as f64 / 1000.0));
                    self.events.record("failover-committed", None, Some(&name), format!("{} VM(s) moved, {} left down{timing}", moved.len(), left_down.len()));
                }
                Ok(Ok(other)) => tracing::warn!("unexpected failover answer {other:?}"),
                Ok(Err(e)) => tracing::info!("failover of {name} refused: {e}"),
                Err(e) => tracing::warn!("failover of {name} not committed: {e}"),
            }
        }
    }

    async fn place_waiting(&self, a: &Assessment) {
        let waiting = self.consensus.with_state(|s| s.unplaced());
        if waiting.is_empty() {
            lock(&self.scratch).waiting_reasons.clear();
            return;
        }
        let eligible = self.eligible_hosts(a);
        let plan = self.consensus.with_state(|s| recovery::place(s, &waiting, eligible, true));
        // Say once, in the timeline, why a VM finds no host (and again when the reason changes).
        let reasons: Vec<(String, String)> =
            self.consensus.with_state(|s| plan.left_down.iter().filter_map(|(vm, _)| Some((vm.clone(), recovery::waiting_reason(s, vm, eligible)?))).collect());
        for (vm, why) in reasons {
            let changed = lock(&self.scratch).waiting_reasons.insert(vm.clone(), why.clone()).as_ref() != Some(&why);
            if changed {
                self.events.record("vm-waiting", Some(&vm), None, format!("{vm} waits for a host: {why}"));
            }
        }
        lock(&self.scratch).waiting_reasons.retain(|vm, _| waiting.contains(vm));
        for (vm, host) in plan.placements {
            match self.submit(Command::Assign { name: vm.clone(), host }).await {
                Ok(Ok(Applied::Assigned { generation, .. })) => self.events.record(
                    "vm-assigned",
                    Some(&vm),
                    Some(&self.host_name(host)),
                    format!("{vm} placed on {}, generation {generation}", self.host_name(host)),
                ),
                Ok(other) => tracing::debug!("assign of {vm} refused: {other:?}"),
                Err(e) => tracing::debug!("assign of {vm} failed: {e}"),
            }
        }
    }

    async fn reconcile_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while !self.stopping.load(Ordering::SeqCst) {
            tick.tick().await;
            self.reconcile().await;
        }
    }

    async fn reconcile(self: &Arc<Self>) {
        let st = self.status();
        let running: Vec<tandem_drivers::VmStatus> = self.driver.list();
        let live: Vec<&tandem_drivers::VmStatus> = running.iter().filter(|v| v.exit.is_none()).collect();
        let Some(joined) = st.joined_epoch.filter(|_| st.fenced.is_none()) else {
            // Not joined, or fenced: nothing may run here.
            for v in &live {
                let _ = self.driver.kill(&v.name);
            }
            return;
        };
        let (active, wanted, to_release, specs, held) = self.consensus.with_state(|s| {
            let active = s.hosts.get(&self.me).is_some_and(|h| h.status == HostStatus::Active && h.epoch == joined);
            let mut wanted: BTreeMap<String, u64> = BTreeMap::new();
            let mut to_release = Vec::new();
            let mut specs = BTreeMap::new();
            let mut held = BTreeSet::new();
            for vm in s.assigned_to(self.me) {
                let Some(a) = vm.assignment else { continue };
                match vm.desired {
                    PowerState::Running => {
                        wanted.insert(vm.spec.name.clone(), a.generation);
                        specs.insert(vm.spec.name.clone(), vm.spec.clone());
                        if vm.held {
                            held.insert(vm.spec.name.clone());
                        }
                    }
                    PowerState::Stopped => to_release.push((vm.spec.name.clone(), a.generation)),
                }
            }
            (active, wanted, to_release, specs, held)
        });
        if !active {
            for v in &live {
                let _ = self.driver.kill(&v.name);
            }
            return;
        }
        // Running here but not wanted here (at this generation): stop gracefully when it was
        // stopped by an operator and is still ours, kill otherwise.
        for v in &live {
            if wanted.get(&v.name) == Some(&v.generation) {
                continue;
            }
            if to_release.iter().any(|(n, g)| *n == v.name && *g == v.generation) {
                let newly = lock(&self.scratch).stopping.insert(v.name.clone());
                if newly {
                    let a = Arc::clone(self);
                    let name = v.name.clone();
                    tokio::spawn(
                        async move {
                            if let Err(e) = a.driver.stop(&name).await {
                                tracing::warn!("stop of {name} failed: {e}");
                            }
                            lock(&a.scratch).stopping.remove(&name);
                        }
                        .in_current_span(),
                    );
                }
            } else {
                let _ = self.driver.kill(&v.name);
                self.events.record("vm-killed", Some(&v.name), None, format!("{} runs here but committed state assigns it elsewhere; killed", v.name));
            }
        }
        let retry_give_up: Vec<(String, u64, String)> = {
            let mut scratch = lock(&self.scratch);
            scratch.given_up.retain(|name, (generation, _)| wanted.get(name) == Some(generation));
            scratch.given_up.iter().map(|(n, (g, d))| (n.clone(), *g, d.clone())).collect()
        };
        // Still ours after giving up: the release was not committed (or is not applied here
        // yet); ask again rather than leave the VM stuck on a host that will not start it.
        for (name, generation, detail) in &retry_give_up {
            self.give_up_here(name, *generation, detail).await;
        }
        // Exits. A VM whose exit stops it is not started again below, even while this host's
        // copy of committed state has not applied the stop yet.
        let mut stopped_now: BTreeSet<String> = BTreeSet::new();
        for v in running.iter().filter(|v| v.exit.is_some()) {
            let exit = v.exit.clone().unwrap_or(VmExit::StoppedByAgent);
            self.driver.forget(&v.name);
            self.events.record("vm-exited", Some(&v.name), None, format!("{} exited: {exit:?}", v.name));
            if wanted.get(&v.name) != Some(&v.generation) {
                continue;
            }
            let protection = specs.get(&v.name).map(|s| s.protection);
            match exit {
                // A guest that powered itself off stays off: HA must not fight the operator.
                VmExit::GuestShutdown => {
                    stopped_now.insert(v.name.clone());
                    let _ = self.submit(Command::SetPower { name: v.name.clone(), desired: PowerState::Stopped, force: false }).await;
                }
                VmExit::StoppedByAgent => {}
                // Only `protect` VMs are restarted after a crash on a live host; best-effort ones
                // are restarted only when their host fails.
                VmExit::Crashed { detail } if protection != Some(Protection::Protect) => {
                    stopped_now.insert(v.name.clone());
                    let _ = self.submit(Command::SetPower { name: v.name.clone(), desired: PowerState::Stopped, force: false }).await;
                    self.events.record(
                        "vm-crashed",
                        Some(&v.name),
                        Some(&self.cfg.name),
                        format!("{} crashed ({detail}); not protected, so it stays stopped", v.name),
                    );
                }
                // Restarted here while the budget lasts (the start below), then moved on.
                VmExit::Crashed { detail } => {
                    if !self.allow_restart(&v.name) {
                        self.give_up_here(
                            &v.name,
                            v.generation,
                            &format!("crashed {MAX_LOCAL_RESTARTS} times within {} s: {detail}", RESTART_WINDOW_MS / 1000),
                        )
                        .await;
                    }
                }
            }
        }
        // Released once stopped.
        let live_names: BTreeSet<&str> = live.iter().map(|v| v.name.as_str()).collect();
        for (name, generation) in to_release {
            if !live_names.contains(name.as_str()) && !lock(&self.scratch).stopping.contains(&name) {
                let _ = self.submit(Command::Release { name, host: self.me, generation }).await;
            }
        }
        // Wanted but not running: start, if we hold the lease.
        if !self.may_start_vms() {
            return;
        }
        for (name, generation) in wanted {
            // Held: a lower restart group is still starting.
            if live_names.contains(name.as_str())
                || held.contains(&name)
                || stopped_now.contains(&name)
                || lock(&self.scratch).given_up.get(&name).is_some_and(|(g, _)| *g == generation)
            {
                continue;
            }
            let Some(spec) = specs.get(&name).cloned() else { continue };
            if !lock(&self.scratch).starting.insert(name.clone()) {
                continue;
            }
            let a = Arc::clone(self);
            tokio::spawn(
                async move {
                    if !a.may_start_vms() {
                        lock(&a.scratch).starting.remove(&name);
                        return;
                    }
                    let check = a.start_check(&spec, generation);
                    let launch = VmLaunch { spec, generation, check };
                    match a.driver.start(&launch).await {
                        Ok(()) => {
                            a.events.record("vm-started", Some(&name), Some(&a.cfg.name), format!("{name} started on {} (generation {generation})", a.cfg.name))
                        }
                        Err(e) => {
                            a.events.record("vm-start-failed", Some(&name), Some(&a.cfg.name), format!("{name} failed to start: {e}"));
                            // Retried on the next pass while the budget lasts, then moved on.
                            if !a.allow_restart(&name) {
                                a.give_up_here(&name, generation, &e.to_string()).await;
                            }
                        }
                    }
                    lock(&a.scratch).starting.remove(&name);
                }
                .in_current_span(),
            );
        }
    }

    /// This host has spent its restart budget on `name`: the cluster moves it to another host,
    /// or puts it in the error state once it has failed on enough of them.
    async fn give_up_here(&self, name: &str, generation: u64, detail: &str) {
        {
            let mut scratch = lock(&self.scratch);
            scratch.restarts.remove(name);
            // Whatever the outcome of the submit (a timeout may still commit), this generation
            // is not started here again: another host may be given it at any moment.
            scratch.given_up.insert(name.to_string(), (generation, detail.to_string()));
        }
        let cmd = Command::VmFailed { name: name.to_string(), host: self.me, generation, detail: detail.to_string() };
        match self.submit(cmd).await {
            Ok(Ok(Applied::Relocating { failed_on, .. })) => self.events.record(
                "vm-relocating",
                Some(name),
                Some(&self.cfg.name),
                format!("{name} gave up on {} ({detail}); failed on {} host(s), placing it elsewhere", self.cfg.name, failed_on.len()),
            ),
            Ok(Ok(Applied::VmInError { error, .. })) => {
                self.events.record("vm-error", Some(name), Some(&self.cfg.name), format!("{name} is in the error state: {error}"));
            }
            Ok(other) => tracing::debug!("giving up {name} here refused: {other:?}"),
            Err(e) => tracing::warn!("giving up {name} here not committed: {e}"),
        }
    }

    /// Counts a local (re)start attempt of a failing VM; false once the budget is spent.
    fn allow_restart(&self, name: &str) -> bool {
        let now = self.clock.now();
        let mut s = lock(&self.scratch);
        let q = s.restarts.entry(name.to_string()).or_default();
        while q.front().is_some_and(|t| now.since(*t) > RESTART_WINDOW_MS) {
            q.pop_front();
        }
        if q.len() >= MAX_LOCAL_RESTARTS {
            return false;
        }
        q.push_back(now);
        true
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
        let mut st = RuntimeStatus { fenced: Some(reason), fenced_at: Some(Millis(10)), fenced_in_epoch: Some(5), ..RuntimeStatus::default() };
        // Kills not yet confirmed: not announced.
        assert_eq!(st.announcement(5), (5, false));
        st.fence_confirmed_at = Some(Millis(12));
        assert_eq!(st.announcement(6), (5, true), "the join committed epoch 6 before the status was updated");
        // Joined again: the new epoch, not fenced.
        let joined = RuntimeStatus { joined_epoch: Some(6), ..RuntimeStatus::default() };
        assert_eq!(joined.announcement(6), (6, false));
        // Never joined: the committed epoch, informational.
        assert_eq!(RuntimeStatus::default().announcement(3), (3, false));
    }
}
