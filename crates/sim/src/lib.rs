//! Deterministic simulation of whole Tandem clusters.
//!
//! Several complete agents — the real `tandem-agent` runtime with its openraft consensus, redb
//! storage, liveness, fencing, coordinator and reconciler — run in one process on one thread, in
//! paused tokio time. Only the world around them is simulated ([`world`]): the network (loss,
//! duplication, delay, full / one-way / pairwise partitions), the shared heartbeat disk (errors
//! and hangs for one host or all), the hypervisor, and per-host clocks with drift. Faults are
//! drawn from a seed; the same seed replays the same run and the same trace.
//!
//! Invariants are checked while the run goes on: `double-run` at every VM start, `healthy-fenced`
//! at every fencing, `not-recovered` a bounded time after a host failure, `state-lost` and
//! `wrong-host` at every quiet point and at the end.

pub mod fault;
mod heal;
mod hypervisor;
mod inject;
mod localdisk;
mod mirror;
pub mod oracle;
mod planned;
mod postcopy;
mod sites;
mod stalls;
mod witness;
pub mod world;

use fault::{Backend, FaultKind};
use oracle::{Invariant, Recoveries};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tandem_agent::agent::Agent;
use tandem_agent::config::AgentConfig;
use tandem_agent::io::AgentIo;
pub use tandem_agent::io::Mutation;
use tandem_agent::views::{EmptyRequest, Event, EventKind, ForceRequest, JoinRequest, StatusView, VmView};
use tandem_core::state::VmSpec;
use world::{lock, DiskMode, SimClock, SimDisk, SimDriver, SimRpc, SimTransport, World};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub hosts: u32,
    /// Virtual seconds of faults (the run then heals everything and settles).
    pub duration_s: u64,
    /// Protected VMs created at the start.
    pub vms: u32,
    /// Print the trace as the run goes.
    pub verbose: bool,
    /// A safety mechanism switched off (the simulator must catch what follows).
    pub mutation: Option<Mutation>,
    /// Hosts that are not in the cluster at the start and join it as an operator action.
    pub late_hosts: u32,
    /// Draw only this fault kind (one the simulator injects, [`Backend::Sim`]).
    pub only: Option<FaultKind>,
    /// Mutation: the hosts have no hardware watchdog, so a frozen host keeps its VMs (frozen
    /// with it) until it thaws; the simulator must find the double run this allows.
    pub no_watchdog: bool,
    /// The agents' timings (default: `Timings::default()`).
    pub timings: Option<tandem_core::timing::Timings>,
    /// One VM in five keeps a writable local disk (best-effort, parked with its failed host,
    /// its copies per host followed by the `stale-disk` invariant). The sweep's even seeds run
    /// with it.
    pub local_disks: bool,
    /// Each host's site, by index (empty: no sites). With sites, the site faults are drawn too.
    pub sites: Vec<String>,
    /// Two hosts with a disk witness (`hosts` 2, no late host): the witness's faults are drawn,
    /// and a private copy of the disk is not (the witness assumes one device).
    pub disk_witness: bool,
    /// With the disk witness: the last host starts first and takes the witness, which its
    /// holder keeps while it lives — so the host that a cut keeps (the lower id) is not the
    /// one holding the witness, and must take it over from the loser's last term.
    pub witness_last: bool,
    /// The cluster's preferred site, set once the cluster formed: a split that leaves no side
    /// a majority keeps its hosts (with two hosts and the witness, the other one fences).
    pub preferred_site: Option<String>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 1,
            hosts: 3,
            duration_s: 120,
            vms: 6,
            verbose: false,
            mutation: None,
            late_hosts: 1,
            only: None,
            no_watchdog: false,
            timings: None,
            local_disks: false,
            sites: Vec::new(),
            disk_witness: false,
            witness_last: false,
            preferred_site: None,
        }
    }
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub simulated_ms: u64,
    pub faults: BTreeMap<&'static str, u32>,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    /// FNV-1a of the trace: equal seeds must give equal hashes.
    pub trace_hash: u64,
}

/// Timings in which the fence deadline, not detection, decides when a failover happens: a peer
/// is declared dead after 1 s of silence but may hold its lease for 2 s. The mutation check on
/// the deadline's evidence runs with them (with the defaults both take ~3 s, so a deadline
/// counted too early is hidden behind detection).
pub const SLOW_FENCE_TIMINGS: tandem_core::timing::Timings = tandem_core::timing::Timings {
    heartbeat_interval_ms: 100,
    peer_timeout_ms: 1000,
    self_fence_ms: 2000,
    disk_io_timeout_ms: 500,
    kill_grace_ms: 500,
    clock_margin_ms: 200,
    partition_confirm_ms: 500,
};

/// The fault kinds the simulator draws from, in drawing order, when the hosts have no sites.
pub fn fault_kinds() -> Vec<FaultKind> {
    FaultKind::of(Backend::Sim).filter(|k| !k.needs_sites() && !k.needs_witness() && !k.on_request_only()).collect()
}

/// The fault kinds the simulator draws from when the hosts have sites: the others, then the
/// site faults.
pub fn fault_kinds_with_sites() -> Vec<FaultKind> {
    FaultKind::of(Backend::Sim).filter(|k| !k.needs_witness() && !k.on_request_only()).collect()
}

/// The fault kinds of a two-host cluster with a disk witness: the usual ones but a private copy
/// of the disk (which the witness rules out) and a write-only path, then the link cut with a
/// disk path lost.
pub fn fault_kinds_with_witness() -> Vec<FaultKind> {
    FaultKind::of(Backend::Sim)
        .filter(|k| !k.needs_sites() && !k.on_request_only() && !matches!(k, FaultKind::DiskPrivateOne | FaultKind::DiskWriteOnlyOne))
        .collect()
}

/// The simulated hosts have a hardware watchdog that resets a host this long after its agent
/// stopped feeding it (the agent's default `watchdog.timeout_s`): a host frozen for longer is
/// reset while frozen, as the real device would do.
/// The simulated hosts' `[shutdown] restart_elsewhere_after_s`.
const SIM_PARK_HOLD_S: u64 = 3;
/// The simulated agents' `[mirror] hung_storage_restart_s` (a hang fault lasts longer).
const SIM_HUNG_STORAGE_RESTART_S: u64 = 4;
const WATCHDOG_RESET_MS: u64 = tandem_core::limits::DEFAULT_WATCHDOG_TIMEOUT_S * 1000;

struct Host {
    cfg: AgentConfig,
    agent: Option<Arc<Agent>>,
    driver: Arc<SimDriver>,
    drift_ppm: i64,
    /// Until when (virtual ms) a fault may legitimately make this host fence.
    excused_until: u64,
    events_seen: u64,
    /// Part of the cluster (late hosts are not until they join).
    member: bool,
}

struct Sim {
    world: Arc<World>,
    hosts: Vec<Host>,
    opts: SimOptions,
    dir: PathBuf,
    faults: BTreeMap<&'static str, u32>,
    /// VM names the cluster acknowledged creating and has not been told to delete.
    created: BTreeSet<String>,
    /// VMs with a writable local disk: no recovery is owed for them while their host is away
    /// (parked with it, they run again when it returns).
    local_disk_vms: BTreeSet<String>,
    /// VMs with a disk mirrored between sites, and the sites whose copies committed state
    /// counted current when a fault last looked (`vms_on`): a recovery is owed for one only if
    /// both its copies were current — with one, the loss of that site's hosts leaves it down by
    /// design (no current copy), which the settle check then holds to committed state.
    mirrored_vms: BTreeSet<String>,
    copies_seen: std::sync::Mutex<BTreeMap<String, Vec<String>>>,
    /// VMs that faults stopped and that must run again within the oracle's bound.
    recoveries: Recoveries,
    next_vm: u32,
    /// The disk witness's region, in a two-host run with one.
    witness_region: Option<Arc<std::sync::Mutex<witness::SimRegion>>>,
}

fn fnv(lines: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for l in lines {
        for b in l.bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Sim {
    fn rand(&self, n: u64) -> u64 {
        lock(&self.world.rng).below(n)
    }

    fn config(&self, i: u32) -> AgentConfig {
        let (api, hb) = &self.world.addrs[i as usize];
        let data = self.dir.join(format!("h{i}"));
        // Room for three times a host's share of the VMs (1 vCPU, 64 MiB each), so that
        // failovers of several hosts find capacity in a large cluster too.
        let vcpus = (3 * self.opts.vms / self.opts.hosts.max(1) + 8).max(64);
        let memory_mib = u64::from(vcpus) * 256;
        let text = format!(
            "host_id = {i}\nname = \"h{i}\"\napi_addr = \"{api}\"\nheartbeat_addr = \"{hb}\"\ndata_dir = \"{}\"\n\
             heartbeat_disk = \"{}\"\nsecret_file = \"{}\"\ndriver = \"process\"\ncapacity = {{ vcpus = {vcpus}, memory_mib = {memory_mib} }}\n",
            data.display(),
            self.dir.join("heartbeat.disk").display(),
            self.dir.join("secret").display()
        );
        // The text is built here from valid parts; a failure is a bug in this function.
        let mut cfg = AgentConfig::parse(&text, "simulated host").unwrap_or_else(|e| panic!("simulated config: {e}"));
        // A planned stop's parked VMs go elsewhere after a hold short enough to see in a seed.
        cfg.shutdown.restart_elsewhere_after_s = SIM_PARK_HOLD_S;
        // And a `migrate` stop waits for its evacuation no longer than a seed can afford.
        cfg.shutdown.evacuate_timeout_s = 20;
        // A hung site's VMs go to their other copy within a seed.
        cfg.mirror.hung_storage_restart_s = SIM_HUNG_STORAGE_RESTART_S;
        if let Some(t) = self.opts.timings {
            cfg.timings = t;
        }
        cfg.site = self.opts.sites.get(i as usize).cloned();
        cfg
    }

    async fn boot(&mut self, i: u32) {
        let w = Arc::clone(&self.world);
        // A powered-off host's tasks that were awaiting something (a proposal, an RPC, one of
        // openraft's) still hold its consensus database for a moment of simulated time; a real
        // reset ends the process at once. The next boot waits for them to be gone (bounded), as
        // the real one never sees them.
        let mut waited = 0;
        let agent = loop {
            {
                // A fresh boot: powered, running, clock without jumps.
                let mut c = lock(&w.cond);
                c.down.remove(&i);
                c.frozen.remove(&i);
                c.clock_jump_ms.remove(&i);
            }
            let h = &self.hosts[i as usize];
            let io = AgentIo {
                clock: Arc::new(SimClock { world: Arc::clone(&w), me: i, boot: tokio::time::Instant::now(), drift_ppm: h.drift_ppm }),
                heartbeats: Arc::new(SimTransport { world: Arc::clone(&w), me: i, inbox: tokio::sync::Mutex::new(w.inbox(i)) }),
                disk: Arc::new(SimDisk { world: Arc::clone(&w), me: i }),
                rpc: Arc::new(SimRpc { world: Arc::clone(&w), me: i }),
                driver: Arc::clone(&h.driver) as Arc<dyn tandem_drivers::VmDriver>,
                os_threads: false,
                mutation: self.opts.mutation,
                witness: self.witness_region.as_ref().map(|region| {
                    Arc::new(witness::SimWitness { region: Arc::clone(region), world: Arc::clone(&w), me: i }) as Arc<dyn tandem_agent::witness::WitnessRegion>
                }),
            };
            // Every task of this agent (its loops, openraft's) logs inside this span (at error
            // level so the span shows whatever the log filter lets through).
            let span = tracing::error_span!("host", h = i);
            match tracing::Instrument::instrument(Agent::with_io(h.cfg.clone(), io), span.clone()).await {
                Ok(agent) => break Some((agent, span)),
                Err(e) => {
                    // The whole chain: "consensus failed" alone says too little.
                    let mut why = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        why.push_str(&format!(": {s}"));
                        source = s.source();
                    }
                    if why.contains("Database already open") && waited < 30_000 {
                        // Still powered off while the old tasks end.
                        lock(&w.cond).down.insert(i);
                        self.run_for(Duration::from_millis(50)).await;
                        waited += 50;
                        continue;
                    }
                    w.harness_error(format!("h{i} failed to start: {why}"));
                    break None;
                }
            }
        };
        if waited > 0 {
            w.log(format!("h{i}: the previous boot's tasks let its database go {waited} ms later"));
        }
        let Some((agent, span)) = agent else { return };
        if let Err(e) = span.in_scope(|| agent.spawn_loops()) {
            w.harness_error(format!("h{i} loops: {e}"));
        }
        lock(&w.routers).insert(i, tandem_agent::api::router(Arc::clone(&agent)));
        self.hosts[i as usize].agent = Some(agent);
        // The agent reloads its timeline and numbers on, so the cursor stays valid.
        w.log(format!("h{i} boots"));
    }

    async fn power_off(&mut self, i: u32) {
        let w = Arc::clone(&self.world);
        lock(&w.cond).down.insert(i);
        lock(&w.routers).remove(&i);
        w.power_off_vms(i);
        self.hosts[i as usize].driver.power_lost();
        if let Some(a) = self.hosts[i as usize].agent.take() {
            a.shutdown().await;
        }
        // A fresh driver: the host's processes are gone.
        self.hosts[i as usize].driver = Arc::new(SimDriver::new(Arc::clone(&w), i, format!("h{i}")));
        w.log(format!("h{i} loses power"));
    }

    /// A request to host `i`'s API, as an operator's CLI would send it.
    async fn api(&self, i: u32, method: &str, path: &str, body: Option<serde_json::Value>) -> Option<(u16, serde_json::Value)> {
        if self.world.is_frozen(i) {
            return None;
        }
        let router = lock(&self.world.routers).get(&i).cloned()?;
        // The operator holds the cluster token (derived from the secret every agent reads).
        let secret = std::fs::read(self.dir.join("secret")).ok()?;
        let token = tandem_core::wire::ClusterKey::new(&secret).ok()?.peer_token();
        let req = axum::http::Request::builder()
            .uri(path)
            .method(method)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(axum::body::Body::from(body.map(|b| b.to_string()).unwrap_or_default()))
            .ok()?;
        let call = async {
            let resp = tower::ServiceExt::oneshot(router, req).await.ok()?;
            let status = resp.status().as_u16();
            let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.ok()?.to_bytes();
            Some((status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)))
        };
        tokio::time::timeout(Duration::from_secs(10), call).await.ok().flatten()
    }

    /// [`Sim::api`] with a typed request body (`tandem_agent::views`).
    async fn send<B: serde::Serialize>(&self, i: u32, method: &str, path: &str, body: &B) -> Option<(u16, serde_json::Value)> {
        let body = serde_json::to_value(body).ok()?;
        self.api(i, method, path, Some(body)).await
    }

    fn up(&self) -> Vec<u32> {
        (0..self.opts.hosts).filter(|i| self.hosts[*i as usize].agent.is_some()).collect()
    }

    /// The committed VM list from the leader (or any host that answers).
    async fn committed_vms(&self) -> Option<Vec<VmView>> {
        let leader = self.leader().await;
        let order: Vec<u32> = leader.into_iter().chain(self.up()).collect();
        for i in order {
            if let Some((200, v)) = self.api(i, "GET", "/v1/vms", None).await {
                if let Ok(list) = serde_json::from_value::<Vec<VmView>>(v) {
                    return Some(list);
                }
            }
        }
        None
    }

    async fn leader(&self) -> Option<u32> {
        for i in self.up() {
            if let Some((200, v)) = self.api(i, "GET", "/v1/status", None).await {
                // Typed: a string compared by hand once had the wrong case and never matched.
                let status: Option<StatusView> = serde_json::from_value(v).ok();
                if status.is_some_and(|s| s.consensus.role == "leader" && s.consensus.leader == Some(s.consensus.me)) {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Reads new events from every agent into the trace; checks `healthy-fenced`.
    async fn collect_events(&mut self) {
        let now = self.world.now_ms();
        for i in self.up() {
            let after = self.hosts[i as usize].events_seen;
            let Some((200, v)) = self.api(i, "GET", &format!("/v1/events?after={after}"), None).await else { continue };
            let events: Vec<Event> = serde_json::from_value(v).unwrap_or_default();
            for e in events {
                self.hosts[i as usize].events_seen = self.hosts[i as usize].events_seen.max(e.seq);
                self.world.log(format!("h{i} event {}: {}", e.kind, e.detail));
                if e.kind == EventKind::Fenced && now > self.hosts[i as usize].excused_until {
                    let detail = format!("h{i} fenced although no fault touched it: {:?}", e.detail);
                    self.world.violation(oracle::Violation::new(Invariant::HealthyFenced, detail));
                }
            }
        }
    }

    /// Lets exactly `hosts` fence until `until_ms`, whatever the cluster's size: for a fault
    /// that names its loser (a host that loses both its link and its disk path is the one that
    /// fences; the other keeps the disk's vote and must not, before the heal or after it).
    fn excuse_only(&mut self, hosts: &[u32], until_ms: u64) {
        for h in hosts {
            let e = &mut self.hosts[*h as usize].excused_until;
            *e = (*e).max(until_ms);
        }
    }

    fn excuse(&mut self, hosts: &[u32], until_ms: u64) {
        // Two hosts: which one a cut leaves fenced is the partition verdict's (the higher id),
        // not the one the fault picked; the faults that must move the loser's VMs check that.
        let all: Vec<u32> = (0..self.hosts.len() as u32).collect();
        let hosts = if self.two_with_witness() && !hosts.is_empty() { &all[..] } else { hosts };
        self.excuse_only(hosts, until_ms);
    }

    /// VMs the committed state places on `host`, desired running.
    async fn vms_on(&self, host: u32) -> Vec<String> {
        let name = format!("h{host}");
        let vms = self.committed_vms().await.unwrap_or_default();
        self.note_copies(&vms);
        vms.iter().filter(|v| v.should_run_on() == Some(name.as_str())).map(|v| v.name.clone()).collect()
    }

    /// Keeps what committed state says of the mirrored VMs' copies (see `copies_seen`).
    fn note_copies(&self, vms: &[VmView]) {
        lock(&self.copies_seen).extend(vms.iter().filter(|v| self.mirrored_vms.contains(&v.name)).map(|v| (v.name.clone(), v.copies.clone())));
    }

    /// Reads the mirrored VMs' copies again: a copy committed stale during a fault (its running
    /// host lost it, and the cut then fenced that host with its writes still held) leaves the
    /// VM nowhere to run on the majority side, by design, until that host's site is back.
    async fn refresh_copies(&self) {
        if !self.mirrored_vms.is_empty() {
            if let Some(vms) = self.committed_vms().await {
                self.note_copies(&vms);
            }
        }
    }

    async fn create_vm(&mut self, on: u32) {
        let name = format!("vm{}", self.next_vm);
        self.next_vm += 1;
        let mut spec = VmSpec::process(&name, 64, (self.next_vm % 3) as i32, &["sim"]);
        // Half the VMs name a service probe: the agents run their probe loops here too.
        if self.next_vm.is_multiple_of(2) {
            spec.probe = Some(tandem_core::state::ServiceProbe::Tcp { address: "{host_ip}:80".into() });
        }
        // A third of them let their live migrations switch to post-copy.
        if self.next_vm.is_multiple_of(3) {
            spec.postcopy = tandem_core::spec::Postcopy::AfterFirstPass;
        }
        // One in five keeps a writable disk on its host's own storage: best-effort (HA cannot
        // restart it elsewhere), mirrored by its migrations, parked with its host when that fails.
        let local_disk = self.opts.local_disks && self.next_vm % 5 == 4;
        if local_disk {
            spec.protection = tandem_core::state::Protection::BestEffort;
            spec.disks = vec![tandem_core::state::DiskSpec { path: format!("{name}.raw"), format: None, readonly: false, local: true, mirror: false }];
        }
        // With sites, one in four (of the others) keeps its disk mirrored between them, protected:
        // it restarts only at a site whose copy is current (`stale-copy` checks every start).
        let mirrored = !local_disk && !self.opts.sites.is_empty() && self.next_vm % 4 == 1;
        if mirrored {
            spec.disks = vec![tandem_core::state::DiskSpec { path: format!("{name}.raw"), format: None, readonly: false, local: false, mirror: true }];
        }
        if let Some((200 | 201, _)) = self.send(on, "POST", "/v1/vms", &spec).await {
            self.created.insert(name.clone());
            if local_disk {
                self.local_disk_vms.insert(name.clone());
            }
            if mirrored {
                self.mirrored_vms.insert(name.clone());
            }
            // Whether it starts now or not, the oracle's settle check holds it to committed state.
            let _ = self.send(on, "POST", &format!("/v1/vms/{name}/start"), &ForceRequest::default()).await;
            self.world.log(format!("operator: created and started {name}"));
        }
    }

    /// Lets virtual time pass, collecting events and checking recovery deadlines.
    async fn run_for(&mut self, d: Duration) {
        let end = self.world.now_ms() + d.as_millis() as u64;
        while self.world.now_ms() < end {
            tokio::time::sleep(Duration::from_millis(250)).await;
            self.collect_events().await;
            if self.recoveries.owes_any(&self.mirrored_vms) {
                self.refresh_copies().await;
            }
            self.check_recoveries();
        }
    }

    /// Where each VM runs now, from the world's run table, for the oracle.
    fn running(&self) -> oracle::Running {
        lock(&self.world.running).iter().map(|(vm, on)| (vm.clone(), on.keys().map(|h| format!("h{h}")).collect())).collect()
    }

    /// Hands the oracle one observation of where VMs run: a recovery it owes is settled the
    /// first time its VMs are seen running again; one past its bound is a violation.
    fn check_recoveries(&mut self) {
        let now = self.world.now_ms();
        // A mirrored VM left with one current copy is owed nothing (see `restartable`).
        let owed: BTreeSet<String> = self.created.iter().filter(|v| self.may_restart(v)).cloned().collect();
        let (_, late) = self.recoveries.observe(now, &self.running(), &owed);
        for v in late {
            self.world.violation(v);
        }
    }

    /// A host cut off from the majority for long enough must have lost its VMs to the majority
    /// by now: running only on the cut-off host (unreachable, its host never fenced) is a VM
    /// that was never recovered.
    /// Of `vms`, those HA restarts elsewhere when their host fails (not those with a local disk).
    fn restartable(&self, vms: &[String]) -> Vec<String> {
        vms.iter().filter(|v| self.may_restart(v)).cloned().collect()
    }

    /// Whether a recovery is owed for `vm` when its host is lost: not for a local disk, nor for
    /// a mirrored disk with one current copy (mirrored into one other site: with both current,
    /// one site's loss leaves one).
    fn may_restart(&self, vm: &str) -> bool {
        let fully_mirrored = || lock(&self.copies_seen).get(vm).is_some_and(|c| c.len() >= 2);
        !self.local_disk_vms.contains(vm) && (!self.mirrored_vms.contains(vm) || fully_mirrored())
    }

    async fn check_moved_off(&self, target: u32, vms: &[String], what: &str) {
        self.refresh_copies().await;
        let running = lock(&self.world.running).clone();
        let stuck: Vec<&String> = vms
            .iter()
            .filter(|v| self.created.contains(*v) && self.may_restart(v))
            .filter(|v| running.get(*v).is_none_or(|on| on.keys().all(|h| *h == target)))
            .collect();
        if !stuck.is_empty() {
            let detail = format!("after {what}: {stuck:?} do not run on the majority side while h{target} is still cut off");
            self.world.violation(oracle::Violation::new(Invariant::NotRecovered, detail));
        }
    }

    /// With every fault healed and every host up: the oracle's settle check — committed state
    /// keeps every VM, every member host is active and alive, and each VM runs exactly once,
    /// where committed state assigns it.
    async fn settle_and_check(&mut self) {
        let deadline = self.world.now_ms() + oracle::SETTLE_BOUND_MS;
        let mut problem = String::new();
        while self.world.now_ms() < deadline {
            self.run_for(Duration::from_secs(1)).await;
            let Some(vms) = self.committed_vms().await else {
                problem = "no agent answers".into();
                continue;
            };
            let committed: Vec<oracle::Committed> = vms.iter().map(oracle::Committed::from).collect();
            match oracle::settle(&self.created, &committed, &self.running(), true) {
                oracle::Settle::Settled => {
                    self.world.log("settled: every VM runs once, where committed state assigns it".into());
                    return;
                }
                oracle::Settle::NotYet(p) => problem = p,
                oracle::Settle::Broken(v) => {
                    self.world.violation(v);
                    return;
                }
            }
        }
        self.world.violation(oracle::not_settled("healing", &problem));
    }
}

/// Runs one seed to the end and reports what it found.
pub fn run(opts: &SimOptions) -> SimReport {
    // Every source of randomness is seeded: tokio's (select! branch order), openraft's
    // (election timeouts), and the world's own generator.
    tandem_agent::raft_runtime::seed_thread_rng(opts.seed);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&opts.seed.to_le_bytes()))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return SimReport { seed: opts.seed, violations: vec![format!("sim-error: runtime: {e}")], ..SimReport::default() };
        }
    };
    rt.block_on(run_async(opts.clone()))
}

thread_local! {
    /// When the running simulation began, in the runtime's virtual time.
    static STARTED: std::cell::Cell<Option<tokio::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// Virtual seconds since the simulation on this thread began (for log stamps), if one runs.
#[must_use]
pub fn simulated_seconds() -> Option<f64> {
    STARTED.with(|s| s.get()).map(|t| t.elapsed().as_secs_f64())
}

/// Where the simulated hosts keep their data (their consensus stores are real redb files): in
/// memory (`/dev/shm`) where there is one with room to spare. The simulated world has no disk to
/// wait for; on a real one, 64 hosts each syncing every commit to disk made a 64-host, 1,000-VM
/// run take 800 s. (Containers often mount a 64 MiB `/dev/shm`: too small, so not used.)
fn run_root() -> PathBuf {
    const SHM_ROOM: u64 = 2 << 30;
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() && free_bytes(shm).is_some_and(|b| b >= SHM_ROOM) {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Bytes free for an unprivileged writer on the filesystem of `path`.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs(3) writes one struct through a valid pointer for a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_bavail.saturating_mul(st.f_frsize))
}

async fn run_async(opts: SimOptions) -> SimReport {
    STARTED.with(|s| s.set(Some(tokio::time::Instant::now())));
    // Runs may go on in parallel in one process (tests): each gets its own directory.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run_no = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = run_root().join(format!("tandem-sim-{}-{run_no}-{}", std::process::id(), opts.seed));
    let _ = std::fs::remove_dir_all(&dir);
    let report = match std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("secret"), format!("sim-secret-{}-0123456789abcdef", opts.seed)))
        .and_then(|()| std::fs::set_permissions(dir.join("secret"), std::os::unix::fs::PermissionsExt::from_mode(0o600)))
    {
        Ok(()) => simulate(opts.clone(), dir.clone()).await,
        Err(e) => SimReport { seed: opts.seed, violations: vec![format!("sim-error: {e}")], ..SimReport::default() },
    };
    let _ = std::fs::remove_dir_all(&dir);
    report
}

async fn simulate(opts: SimOptions, dir: PathBuf) -> SimReport {
    let world = World::new(opts.seed, opts.hosts + opts.late_hosts);
    *lock(&world.sites) = opts.sites.clone();
    world.skip_disk_sync.store(opts.mutation == Some(Mutation::SwitchoverBeforeDiskSync), std::sync::atomic::Ordering::SeqCst);
    world.mirror_without_hold.store(opts.mutation == Some(Mutation::MirrorWithoutHold), std::sync::atomic::Ordering::SeqCst);
    world.local_copies_direct.store(opts.seed % 2 == 1, std::sync::atomic::Ordering::SeqCst);
    // The disk is formatted once, before any agent starts, as `tandem disk format` does.
    match std::fs::read(dir.join("secret")).ok().and_then(|s| tandem_core::wire::ClusterKey::new(&s).ok()) {
        Some(key) => world.format_disk(&key),
        None => world.harness_error("no cluster secret to format the disk with".into()),
    }
    let mut sim = Sim {
        world: Arc::clone(&world),
        hosts: Vec::new(),
        opts: opts.clone(),
        dir,
        faults: BTreeMap::new(),
        created: BTreeSet::new(),
        local_disk_vms: BTreeSet::new(),
        mirrored_vms: BTreeSet::new(),
        copies_seen: std::sync::Mutex::default(),
        recoveries: Recoveries::default(),
        next_vm: 0,
        witness_region: opts.disk_witness.then(witness::SimWitness::new_region),
    };
    for i in 0..opts.hosts + opts.late_hosts {
        let cfg = sim.config(i);
        let driver = Arc::new(SimDriver::new(Arc::clone(&world), i, format!("h{i}")));
        sim.hosts.push(Host { cfg, agent: None, driver, drift_ppm: 0, excused_until: 0, events_seen: 0, member: i < opts.hosts });
    }
    let last = opts.hosts.saturating_sub(1);
    if opts.disk_witness && opts.witness_last {
        sim.boot(last).await;
        sim.run_for(Duration::from_secs(2)).await;
    }
    for i in 0..opts.hosts {
        if !(opts.disk_witness && opts.witness_last && i == last) {
            sim.boot(i).await;
        }
    }
    sim.run_for(Duration::from_secs(1)).await;
    let init = sim.send(0, "POST", "/v1/cluster/init", &EmptyRequest {}).await;
    world.log(format!("cluster init -> {:?}", init.map(|r| r.0)));
    for i in 1..opts.hosts {
        for _ in 0..20 {
            let api = world.addrs[i as usize].0.clone();
            if let Some((200, _)) = sim.send(0, "POST", "/v1/hosts/join", &JoinRequest { api_addr: api }).await {
                world.log(format!("h{i} joined"));
                break;
            }
            sim.run_for(Duration::from_millis(500)).await;
        }
    }
    sim.run_for(Duration::from_secs(3)).await;
    if let Some(site) = &opts.preferred_site {
        let req = tandem_agent::views::SettingsRequest { preferred_site: Some(Some(site.clone())), ..Default::default() };
        let set = sim.send(0, "POST", "/v1/settings", &req).await;
        world.log(format!("preferred site {site} -> {:?}", set.map(|r| r.0)));
        sim.run_for(Duration::from_secs(1)).await;
    }
    for _ in 0..opts.vms {
        sim.create_vm(0).await;
    }
    sim.settle_and_check().await;
    while world.now_ms() < opts.duration_s * 1000 {
        sim.fault().await;
        if opts.verbose {
            for l in lock(&world.trace).iter() {
                println!("{l}");
            }
            lock(&world.trace).clear();
        }
    }
    for i in 0..opts.hosts + opts.late_hosts {
        if sim.hosts[i as usize].member && sim.hosts[i as usize].agent.is_none() {
            sim.boot(i).await;
        }
    }
    sim.settle_and_check().await;
    let simulated_ms = world.now_ms();
    for i in 0..opts.hosts + opts.late_hosts {
        if let Some(a) = sim.hosts[i as usize].agent.take() {
            a.shutdown().await;
        }
    }
    let trace = lock(&world.trace).clone();
    let violations = lock(&world.violations).clone();
    SimReport { seed: opts.seed, simulated_ms, faults: sim.faults, violations, trace_hash: fnv(&trace), trace }
}
