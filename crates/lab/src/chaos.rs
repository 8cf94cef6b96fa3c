//! `tandem-lab chaos`: real fault injection. Real agents run in network namespaces (addresses in
//! 198.18.0.0/24, nothing leaves them) with real workloads; faults are injected for real —
//! nftables partitions (full, one-way, pairwise), random heartbeat loss, SIGKILL of agents, of
//! whole hosts and of single workloads, SIGSTOP of a whole host past the timeouts, a host's
//! heartbeat disk failing, a live migration with a fault in its copy, a maintenance cycle, a
//! planned stop under each shutdown policy; with sites, a site's power loss and the link
//! between two sites cut both ways or one way; with a network witness (`--witness network`, two
//! hosts), the witness's loss — and the invariants are checked from the outside:
//!
//! - `double-run`: no VM executes on two hosts at once (process table sampled every 10 ms; a
//!   stopped process counts as present; two processes of a VM count unless their hosts show all
//!   copies but one paused, as live migration keeps them: see `chaos/planned`);
//! - `parked-ran`: a VM a planned stop parked does not run while its host is away;
//! - `migration-stuck`: a host in maintenance sees its VMs leave, and back once it exits;
//! - `wrong-host`: once the cluster settles, each VM runs exactly where committed state says;
//! - `state-lost`: the committed VM set never changes (the suite makes no changes of its own);
//! - `healthy-fenced`: no host fences itself unless the fault cut or froze it;
//! - `not-recovered`: every VM whose host failed runs again within the bound.
//!
//! The order of faults, their targets and durations come from a seed, printed at the start.

use crate::fusedisk::{FuseDisk, ViewMode};
use crate::lab::{Lab, LabOptions};
use crate::netlab::NetLab;
use tandem::client::Client;
// The simulator's SplitMix64: the suite's only randomness, seeded.
use anyhow::{anyhow, bail, Result};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tandem_agent::views::{Event, EventKind, ForceRequest, HostStatus, HostView, LivenessView, VmView};
use tandem_sim::fault::FaultKind;
use tandem_sim::oracle::{self, Invariant, Violation};
use tandem_sim::world::Rng;

/// Resumes a frozen host: its workloads first, the worst order — they run before their agent
/// notices the pause.
fn thaw(agent: u32, workloads: &[u32]) {
    for p in workloads {
        signal(*p, libc::SIGCONT);
    }
    signal(agent, libc::SIGCONT);
}

mod emulator;
mod heal;
pub(crate) mod planned;
mod sites;
mod witness;
use emulator::WatchdogEmulator;

/// The hardware watchdog's reset timeout the agents are configured with: the default.
const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(tandem_core::limits::DEFAULT_WATCHDOG_TIMEOUT_S);
const _: () = assert!(
    tandem_core::limits::watchdog_resets_in_time(&tandem_core::timing::DEFAULT_TIMINGS, WATCHDOG_TIMEOUT.as_secs()),
    "the chaos suite's watchdog must reset a hung host before any fence deadline"
);
/// A pause shorter than the watchdog timeout and the lease: a hiccup that must change nothing.
const HICCUP: Duration = Duration::from_millis(600);
const _: () = assert!(HICCUP.as_millis() < WATCHDOG_TIMEOUT.as_millis());

/// Options of `tandem-lab chaos`.
#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// `short` (every fault kind once, in seeded order; what CI runs) or `long` (40 faults drawn
    /// at random).
    #[arg(long, default_value = "short")]
    pub profile: String,
    /// Seed for the order, targets and durations of faults (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Hosts in the cluster, 3 to 5 (2 with `--witness network`).
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// The third vote of a two-host cluster: `none` (3 to 5 hosts and a shared heartbeat
    /// disk) or `network` (2 hosts, no shared storage: a `tandem witness` in the lab's control
    /// namespace, a third place both hosts reach, keeps their heartbeat area and votes; the
    /// witness's loss is injected too, and the heartbeat-disk faults are not).
    #[arg(long, default_value = "none")]
    pub witness: String,
    /// Number of faults, overriding the profile's.
    #[arg(long)]
    pub faults: Option<usize>,
    /// Protected VMs per host at the start.
    #[arg(long, default_value_t = 3)]
    pub vms_per_host: usize,
    /// `process` (fast, many VMs), `qemu` (real guests only; TCG) or `mixed` (one real QEMU
    /// guest per host, process workloads for the rest).
    #[arg(long, default_value = "mixed")]
    pub driver: String,
    /// Where scripts/build-guest.sh put the test guest (for `--driver qemu`).
    #[arg(long, env = "TANDEM_GUEST_DIR")]
    pub guest_dir: Option<PathBuf>,
    /// Inject only this fault kind (for example `host-freeze`), `--faults` times.
    #[arg(long)]
    pub only: Option<String>,
    /// Each host's site, by index, comma-separated (one per host, e.g. a,a,b,b,w): the site
    /// faults (site-power-loss, site-link-cut) are injected too.
    #[arg(long, value_delimiter = ',')]
    pub sites: Vec<String>,
    /// `emulated`: each agent feeds a watchdog file and the suite resets (kill -9 of the agent and
    /// its workloads) a host whose file goes unfed for the watchdog timeout, as watchdog hardware
    /// would, also while the host is frozen. `none`: no watchdog, as on this machine; a host
    /// frozen past its fence deadline then runs its VMs for a moment after it thaws.
    #[arg(long, default_value = "emulated")]
    pub watchdog: String,
    /// Keep the lab directory (configs, agent logs, event files) afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// The bounds are the oracle's, shared with the simulator.
const RECOVERY_BOUND: Duration = Duration::from_millis(oracle::RECOVERY_BOUND_MS);
const SETTLE_BOUND: Duration = Duration::from_millis(oracle::SETTLE_BOUND_MS);

/// The kinds this suite injects (the shared vocabulary's `Backend::Chaos` ones), in the order a
/// short profile shuffles them from (changing it changes every seed's plan).
const CHAOS_FAULTS: [FaultKind; 15] = [
    FaultKind::PartitionFull,
    FaultKind::PartitionOneWay,
    FaultKind::PartitionPair,
    FaultKind::MessageLoss,
    FaultKind::PowerLoss,
    FaultKind::LeaderLoss,
    FaultKind::AgentKill,
    FaultKind::WorkloadKill,
    FaultKind::HostFreeze,
    FaultKind::HostHiccup,
    FaultKind::DiskErrorOne,
    FaultKind::DiskHangOne,
    FaultKind::LiveMigration,
    FaultKind::PlannedStop,
    FaultKind::MaintenanceCycle,
];

/// The kinds injected as well when the hosts have sites (`--sites`), after the others.
const SITE_FAULTS: [FaultKind; 3] = [FaultKind::SitePowerLoss, FaultKind::SiteLinkCut, FaultKind::SiteLinkOneWay];

/// The kinds a network witness adds (`--witness network`), after the others.
const WITNESS_FAULTS: [FaultKind; 1] = [FaultKind::WitnessLoss];

/// The kinds injected only when asked for (`--only`): no plan draws them, so seeds plan as before.
const ON_REQUEST_FAULTS: [FaultKind; 1] = [FaultKind::PartitionUnevenHeal];

/// The kinds that need the shared heartbeat disk (none with a network witness).
const DISK_FAULTS: [FaultKind; 2] = [FaultKind::DiskErrorOne, FaultKind::DiskHangOne];

/// What the suite measured.
#[derive(Default)]
struct Report {
    faults: BTreeMap<&'static str, u32>,
    recoveries: u32,
    recovery_ms: Vec<u64>,
    violations: Vec<String>,
}

struct Suite {
    lab: Lab,
    net: NetLab,
    rng: Rng,
    report: Report,
    /// The VM names created at the start; committed state must keep exactly these.
    vm_names: BTreeSet<String>,
    origin: Instant,
    watchdog: Option<WatchdogEmulator>,
    /// The shared heartbeat disk's faulty paths (none with a network witness; last: unmounted
    /// after the agents are gone).
    disk: Option<HeartbeatPaths>,
}

/// How each host reaches the shared heartbeat disk: its own symlink (which a fault breaks) to
/// its own view of one FUSE layer (which a fault hangs).
struct HeartbeatPaths {
    links: Vec<PathBuf>,
    fuse: FuseDisk,
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this suite's lab started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Each VM's name and host, from a VM list.
fn placement(vms: &Option<Vec<VmView>>) -> Option<Vec<(String, Option<String>)>> {
    vms.as_ref().map(|l| l.iter().map(|x| (x.name.clone(), x.host.clone())).collect())
}

fn interrupted() -> bool {
    crate::demo::check_interrupt().is_err()
}

fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

impl Suite {
    fn log(&self, msg: &str) {
        crate::progress::clear_line();
        println!("[{:>7.2} s] {msg}", self.origin.elapsed().as_secs_f64());
    }

    fn violation(&mut self, v: Violation) {
        self.report_finding(v.invariant.name(), &v.detail);
    }

    fn report_finding(&mut self, what: &str, detail: &str) {
        if interrupted() {
            // A wait cut short by Ctrl-C is not a finding.
            return;
        }
        let v = format!("{what}: {detail}");
        self.log(&format!("VIOLATION {v}"));
        self.report.violations.push(v);
    }

    /// A client with a short timeout (a cut-off or frozen host must not stall the suite).
    fn client(&self, i: usize) -> Client {
        Client { addr: self.lab.hosts[i].api.clone(), timeout: Duration::from_secs(2), token: Some(self.lab.token()), tls: None }
    }

    /// The VM list from the first host in `from` that answers.
    fn vms(&self, from: &[usize]) -> Option<Vec<VmView>> {
        from.iter().filter(|i| self.lab.is_up(**i)).find_map(|i| self.client(*i).list_as("/v1/vms").ok())
    }

    fn hosts_except(&self, out: &[usize]) -> Vec<usize> {
        (0..self.lab.hosts.len()).filter(|i| !out.contains(i)).collect()
    }

    /// Where each VM runs now (processes not stopped), as VM → hosts.
    fn running_now(&self) -> oracle::Running {
        let mut by_vm = oracle::Running::new();
        for (vm, host) in self.lab.running_instances() {
            by_vm.entry(vm).or_default().insert(host);
        }
        by_vm
    }

    /// Milliseconds since the suite began: the oracle's clock here.
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// SIGSTOPs host `i`'s agent and workloads; returns their pids for [`thaw`].
    fn freeze(&self, i: usize) -> Result<(u32, Vec<u32>)> {
        let agent = self.lab.agent_pid(i).ok_or_else(|| anyhow!("{} has no agent", self.lab.hosts[i].name))?;
        let workloads: Vec<u32> = self.lab.workload_pids(i).into_iter().map(|(p, _)| p).collect();
        signal(agent, libc::SIGSTOP);
        for p in &workloads {
            signal(*p, libc::SIGSTOP);
        }
        Ok((agent, workloads))
    }

    fn leader(&self) -> Option<usize> {
        let hosts = (0..self.lab.hosts.len()).find_map(|i| self.client(i).list_as::<HostView>("/v1/hosts").ok())?;
        let name = hosts.into_iter().find(|h| h.leader)?.name;
        self.lab.hosts.iter().position(|h| h.name == name)
    }

    /// Waits until the oracle finds `moved` recovered — each running once, on none of
    /// `away_from` — and returns how long that took from `since`; records the violation and
    /// returns None when the bound passes first.
    fn wait_moved(&mut self, what: &str, moved: &[String], away_from: &[String], since: Instant) -> Option<Duration> {
        let mut owed = oracle::Recoveries::default();
        let start_ms = self.now_ms().saturating_sub(since.elapsed().as_millis() as u64);
        owed.owe(start_ms, what, moved, away_from);
        let existing: BTreeSet<String> = moved.iter().cloned().collect();
        while !owed.is_empty() && !interrupted() {
            let (done, late) = owed.observe(self.now_ms(), &self.running_now(), &existing);
            if let Some(d) = done.first() {
                return Some(Duration::from_millis(d.took_ms));
            }
            for v in late {
                self.violation(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        moved.is_empty().then_some(Duration::ZERO)
    }

    /// Waits until the oracle finds the cluster settled: every agent up, active and alive, and
    /// every VM running exactly once, where committed state assigns it.
    fn settle(&mut self, after: &str) {
        let all: Vec<usize> = (0..self.lab.hosts.len()).collect();
        let start = Instant::now();
        let mut last_problem = String::new();
        while start.elapsed() < SETTLE_BOUND {
            if interrupted() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
            let Some(vms) = self.vms(&all) else {
                last_problem = "no agent answers".into();
                continue;
            };
            let committed: Vec<oracle::Committed> = vms.iter().map(oracle::Committed::from).collect();
            let ready = all.iter().find_map(|i| self.client(*i).list_as::<HostView>("/v1/hosts").ok()).is_some_and(|hs| {
                hs.len() == all.len()
                    && hs.iter().all(|h| h.status == HostStatus::Active && !matches!(h.liveness, LivenessView::Partitioned | LivenessView::Dead))
            });
            match oracle::settle(&self.vm_names, &committed, &self.running_now(), ready) {
                oracle::Settle::Settled => return,
                oracle::Settle::NotYet(p) => last_problem = p,
                oracle::Settle::Broken(v) => {
                    self.violation(Violation::new(v.invariant, format!("after {after}: {}", v.detail)));
                    return;
                }
            }
        }
        self.violation(oracle::not_settled(after, &last_problem));
    }

    /// Fenced events since `since_ms` (wall clock) from every host that answers: host names.
    fn fenced_since(&self, since_ms: u64) -> BTreeSet<String> {
        self.recorded_since(EventKind::Fenced, since_ms)
    }

    /// The hosts that recorded an event of `kind` since `since_ms` (wall clock), as every host
    /// that answers tells.
    fn recorded_since(&self, kind: EventKind, since_ms: u64) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for i in 0..self.lab.hosts.len() {
            if let Ok(ev) = self.client(i).list_as::<Event>(&format!("/v1/events?kind={kind}&limit=4096")) {
                out.extend(ev.into_iter().filter(|e| e.kind == kind && e.at_ms >= since_ms).map(|e| e.host));
            }
        }
        out
    }

    fn names(&self, hosts: &[usize]) -> Vec<String> {
        hosts.iter().map(|i| self.lab.hosts[*i].name.clone()).collect()
    }

    /// VMs placed on any of `hosts` in committed state.
    fn vms_on(&self, hosts: &[usize]) -> Vec<String> {
        let names = self.names(hosts);
        let others = self.hosts_except(hosts);
        self.vms(&others)
            .unwrap_or_default()
            .iter()
            .filter(|v| v.should_run_on().is_some_and(|h| names.iter().any(|n| n == h)))
            .map(|v| v.name.clone())
            .collect()
    }

    /// Logs a recovery the oracle confirmed (a missed one was reported by [`Suite::wait_moved`]).
    fn record_recovery(&mut self, vms: &[String], took: Option<Duration>, what: &str) {
        let Some(d) = took else { return };
        if vms.is_empty() {
            self.log("  no VMs to recover");
            return;
        }
        self.report.recoveries += vms.len() as u32;
        self.report.recovery_ms.push(d.as_millis() as u64);
        self.log(&format!("  {} VM(s) {what} {:.2} s after the fault", vms.len(), d.as_secs_f64()));
    }

    fn inject(&mut self, fault: FaultKind) -> Result<()> {
        let n = self.lab.hosts.len();
        // Prefer a host that runs VMs: a fault there has something to recover.
        let loaded: Vec<usize> = (0..n).filter(|h| !self.lab.workload_pids(*h).is_empty()).collect();
        let target = if loaded.is_empty() { self.rng.below(n as u64) as usize } else { loaded[self.rng.below(loaded.len() as u64) as usize] };
        let since_ms = tandem_drivers::wall_ms();
        let doubles_before = self.lab.recorder.double_run_count();
        let resets_before = self.watchdog.as_ref().map_or(0, |w| w.resets().len());
        let t0 = Instant::now();
        // Hosts allowed to fence themselves because of this fault.
        let mut may_fence: Vec<usize> = vec![];
        match fault {
            FaultKind::PartitionFull | FaultKind::PartitionOneWay => {
                let vms = self.vms_on(&[target]);
                let name = self.lab.hosts[target].name.clone();
                self.log(&format!("{}: {name} ({} VM(s))", fault.name(), vms.len()));
                if fault == FaultKind::PartitionFull {
                    self.net.cut(target)?;
                } else {
                    self.net.block_outbound(target)?;
                }
                may_fence.push(target);
                let took = self.wait_moved(fault.name(), &vms, &[name], t0);
                self.record_recovery(&vms, took, "back on the majority");
                std::thread::sleep(Duration::from_secs(1));
                if fault == FaultKind::PartitionFull {
                    self.net.heal(target)?;
                } else {
                    self.net.unblock(target)?;
                }
            }
            FaultKind::PartitionPair => {
                let other = (target + 1 + self.rng.below(n as u64 - 1) as usize) % n;
                let (a, b) = (target.min(other), target.max(other));
                let (na, nb) = (self.lab.hosts[a].name.clone(), self.lab.hosts[b].name.clone());
                let placed = [self.vms_on(&[a]), self.vms_on(&[b])];
                self.log(&format!("{}: {na} and {nb} lose each other", fault.name()));
                self.net.block_pair(a, b)?;
                may_fence.extend([a, b]);
                // Exactly one of the pair loses (the sides {a, rest} and {b, rest} tie on size, and
                // the lower id wins); the fenced record says which, then its VMs must move.
                let mut loser = None;
                while loser.is_none() && t0.elapsed() < RECOVERY_BOUND && !interrupted() {
                    let fenced = self.fenced_since(since_ms);
                    loser = [a, b].into_iter().position(|h| fenced.contains(&self.lab.hosts[h].name));
                    std::thread::sleep(Duration::from_millis(100));
                }
                match loser {
                    Some(k) => {
                        let name = [&na, &nb][k].clone();
                        self.log(&format!("  {name} fenced itself"));
                        let took = self.wait_moved(fault.name(), &placed[k], std::slice::from_ref(&name), t0);
                        self.record_recovery(&placed[k], took, "of the losing host back");
                    }
                    None => self.violation(Violation::new(Invariant::NotRecovered, format!("{fault}: neither {na} nor {nb} fenced itself"))),
                }
                std::thread::sleep(Duration::from_secs(1));
                self.net.unblock(a)?;
            }
            FaultKind::MessageLoss => {
                self.log(&format!("{}: every host drops a random third of incoming heartbeats for 12 s", fault.name()));
                let port = self.lab.opts.api_port + 1;
                for i in 0..n {
                    self.net.lose_udp(i, port, 3)?;
                }
                let before = self.vms(&(0..n).collect::<Vec<_>>());
                std::thread::sleep(Duration::from_secs(12));
                let lost: u64 = (0..n).filter_map(|i| self.net.lost_udp(i).ok()).sum();
                for i in 0..n {
                    self.net.stop_losing(i)?;
                }
                self.log(&format!("  {lost} heartbeats dropped"));
                let after = self.vms(&(0..n).collect::<Vec<_>>());
                if placement(&before) != placement(&after) {
                    self.violation(Violation::new(Invariant::HealthyFenced, "VMs moved under 1-in-3 heartbeat loss"));
                }
            }
            FaultKind::PowerLoss | FaultKind::LeaderLoss | FaultKind::AgentKill => {
                let victim = if fault == FaultKind::LeaderLoss { self.leader().unwrap_or(target) } else { target };
                let vms = self.vms_on(&[victim]);
                let name = self.lab.hosts[victim].name.clone();
                self.log(&format!("{}: {name} ({} VM(s))", fault.name(), vms.len()));
                if fault == FaultKind::AgentKill {
                    self.lab.kill_agent(victim);
                } else {
                    self.lab.power_off(victim);
                }
                may_fence.push(victim);
                let took = self.wait_moved(fault.name(), &vms, &[name], t0);
                self.record_recovery(&vms, took, "back on the survivors");
                std::thread::sleep(Duration::from_secs(1));
                self.lab.start(victim)?;
            }
            FaultKind::WorkloadKill => {
                let pids: Vec<(u32, String, usize)> = (0..n).flat_map(|h| self.lab.workload_pids(h).into_iter().map(move |(p, vm)| (p, vm, h))).collect();
                let Some((pid, vm, host)) = pids.get(self.rng.below(pids.len() as u64) as usize).cloned() else {
                    bail!("no workload runs anywhere");
                };
                self.log(&format!("{}: {vm} (pid {pid}) on {}", fault.name(), self.lab.hosts[host].name));
                signal(pid, libc::SIGKILL);
                let mut took = None;
                while t0.elapsed() < RECOVERY_BOUND {
                    if self.lab.running_pids().iter().any(|(p, v)| *v == vm && *p != pid) {
                        took = Some(t0.elapsed());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                self.record_recovery(std::slice::from_ref(&vm), took, "restarted");
            }
            FaultKind::HostFreeze => {
                let vms = self.vms_on(&[target]);
                let name = self.lab.hosts[target].name.clone();
                let (agent, workloads) = self.freeze(target)?;
                self.log(&format!("{}: SIGSTOP {name}'s agent and {} workload(s)", fault.name(), workloads.len()));
                may_fence.push(target);
                let took = self.wait_moved(fault.name(), &vms, std::slice::from_ref(&name), t0);
                self.record_recovery(&vms, took, "back on the survivors");
                std::thread::sleep(Duration::from_secs(1));
                if self.lab.reap(target) {
                    self.log(&format!("  the watchdog reset {name} while it was frozen"));
                } else {
                    thaw(agent, &workloads);
                    self.log(&format!("  SIGCONT {name} after {:.2} s", t0.elapsed().as_secs_f64()));
                }
            }
            FaultKind::HostHiccup => {
                let before = self.vms(&(0..n).collect::<Vec<_>>());
                let name = self.lab.hosts[target].name.clone();
                let (agent, workloads) = self.freeze(target)?;
                self.log(&format!("{}: SIGSTOP {name} for {:.1} s (under the watchdog timeout and the lease)", fault.name(), HICCUP.as_secs_f64()));
                std::thread::sleep(HICCUP);
                if self.lab.reap(target) {
                    self.violation(Violation::new(Invariant::HealthyFenced, format!("the watchdog reset {name} during a {HICCUP:?} pause")));
                }
                thaw(agent, &workloads);
                // Nobody may fence (no host is allowed to), and nothing may move.
                std::thread::sleep(Duration::from_secs(4));
                let after = self.vms(&(0..n).collect::<Vec<_>>());
                if placement(&before) != placement(&after) {
                    self.violation(Violation::new(Invariant::HealthyFenced, format!("VMs moved after a {HICCUP:?} pause of {name}")));
                }
            }
            FaultKind::DiskErrorOne => {
                let Some(disk) = &self.disk else { bail!("{fault} needs the shared heartbeat disk") };
                let (link, view) = (disk.links[target].clone(), disk.fuse.path(target));
                let before = self.vms(&(0..n).collect::<Vec<_>>());
                self.log(&format!("{}: {}'s path to the heartbeat disk fails for 10 s", fault.name(), self.lab.hosts[target].name));
                std::fs::remove_file(&link)?;
                std::thread::sleep(Duration::from_secs(10));
                std::os::unix::fs::symlink(view, &link)?;
                let after = self.vms(&(0..n).collect::<Vec<_>>());
                if placement(&before) != placement(&after) {
                    self.violation(Violation::new(Invariant::HealthyFenced, "VMs moved although only one host's disk failed"));
                }
            }
            FaultKind::DiskHangOne => {
                let Some(disk) = &self.disk else { bail!("{fault} needs the shared heartbeat disk") };
                let fuse = &disk.fuse;
                let before = self.vms(&(0..n).collect::<Vec<_>>());
                self.log(&format!("{}: {}'s heartbeat disk hangs for 10 s (FUSE)", fault.name(), self.lab.hosts[target].name));
                fuse.set_mode(target, ViewMode::Hang);
                std::thread::sleep(Duration::from_secs(10));
                let parked = fuse.parked();
                fuse.set_mode(target, ViewMode::Normal);
                self.log(&format!("  {parked} I/O request(s) were hung when the disk came back"));
                let after = self.vms(&(0..n).collect::<Vec<_>>());
                if placement(&before) != placement(&after) {
                    self.violation(Violation::new(Invariant::HealthyFenced, "VMs moved although only one host's disk failed"));
                }
            }
            FaultKind::LiveMigration => self.inject_live_migration(target, t0, &mut may_fence)?,
            FaultKind::SitePowerLoss => self.inject_site_power_loss(target, t0, &mut may_fence)?,
            FaultKind::SiteLinkCut => self.inject_site_link_cut(target, t0, since_ms, &mut may_fence, false)?,
            FaultKind::SiteLinkOneWay => self.inject_site_link_cut(target, t0, since_ms, &mut may_fence, true)?,
            FaultKind::WitnessLoss => self.inject_witness_loss(since_ms)?,
            FaultKind::PartitionUnevenHeal => self.inject_uneven_heal(target, t0, &mut may_fence)?,
            FaultKind::PlannedStop => self.inject_planned_stop(target, t0, &mut may_fence)?,
            FaultKind::MaintenanceCycle => self.inject_maintenance_cycle(target)?,
            // The plan draws from CHAOS_FAULTS, SITE_FAULTS and WITNESS_FAULTS, and `--only` from
            // ON_REQUEST_FAULTS as well (tested to be the vocabulary's chaos kinds).
            other => bail!("{other} is injected by the simulator only"),
        }
        *self.report.faults.entry(fault.name()).or_default() += 1;
        // A host the watchdog reset boots again, as a real one would.
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..n {
            if self.lab.reap(i) || !self.lab.is_up(i) {
                self.log(&format!("  {} boots again after a watchdog reset", self.lab.hosts[i].name));
                self.lab.start(i)?;
            }
        }
        self.settle(fault.name());
        let allowed: BTreeSet<String> = self.names(&may_fence).into_iter().collect();
        let reset_now = self.watchdog.as_ref().map(WatchdogEmulator::resets).unwrap_or_default();
        let reset: BTreeSet<String> = reset_now.iter().skip(resets_before).cloned().collect();
        if let Some(v) = oracle::unexcused_fences(&format!("{fault} (watchdog resets)"), &reset, &allowed) {
            self.violation(v);
        }
        if let Some(v) = oracle::unexcused_fences(fault.name(), &self.fenced_since(since_ms), &allowed) {
            self.violation(v);
        }
        let doubles = self.lab.recorder.double_run_count();
        if doubles > doubles_before {
            let first = self.lab.recorder.double_runs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(doubles_before).cloned();
            self.violation(Violation::new(
                Invariant::DoubleRun,
                format!("{fault}: {} sample(s) with a VM on two hosts; first {first:?}", doubles - doubles_before),
            ));
        }
        Ok(())
    }
}

/// Per host: name, watchdog file, agent config (which names the agent's process).
fn suite_hosts_for_watchdog(lab: &Lab) -> Vec<(String, PathBuf, PathBuf)> {
    lab.hosts.iter().map(|h| (h.name.clone(), h.data.join("watchdog"), h.config.clone())).collect()
}

/// Runs the suite; prints the figures and one JSON line; fails when an invariant was violated.
pub fn run(args: &ChaosArgs) -> Result<()> {
    let network_witness = match args.witness.as_str() {
        "none" => false,
        "network" => true,
        other => bail!("unknown witness '{other}': use none or network"),
    };
    match (network_witness, args.hosts) {
        (false, 3..=5) | (true, 2) => {}
        (false, _) => bail!("--hosts must be 3 to 5 (2 with --witness network)"),
        (true, _) => bail!("--witness network is the third vote of two hosts: --hosts 2"),
    }
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("tandem-lab chaos needs root: it builds network namespaces and firewall rules");
    }
    if !args.sites.is_empty() && (args.sites.len() != args.hosts || args.sites.iter().any(|s| !tandem_core::state::valid_name(s))) {
        bail!("--sites names one site per host ({}), each 1-63 letters, digits, '-' or '_'", args.hosts);
    }
    let kinds: Vec<FaultKind> = CHAOS_FAULTS
        .into_iter()
        .filter(|k| !(network_witness && DISK_FAULTS.contains(k)))
        .chain(SITE_FAULTS.into_iter().filter(|_| !args.sites.is_empty()))
        .chain(WITNESS_FAULTS.into_iter().filter(|_| network_witness))
        .collect();
    let count = match (args.faults, args.profile.as_str()) {
        (Some(n), _) => n,
        (None, "short") => kinds.len(),
        (None, "long") => 40,
        (None, other) => bail!("unknown profile '{other}': use short or long"),
    };
    let seed = args.seed.unwrap_or_else(tandem_drivers::wall_ms);
    let mut rng = Rng(seed);
    let mut plan: Vec<FaultKind> = Vec::new();
    while plan.len() < count {
        let mut round = kinds.clone();
        rng.shuffle(&mut round);
        plan.extend(round);
    }
    plan.truncate(count);
    if args.profile == "long" && args.faults.is_none() {
        plan = (0..count).map(|_| kinds[rng.below(kinds.len() as u64) as usize]).collect();
    }
    if let Some(only) = &args.only {
        let asked: Vec<FaultKind> = kinds.iter().copied().chain(ON_REQUEST_FAULTS).collect();
        let names: Vec<&str> = asked.iter().map(|k| k.name()).collect();
        let kind = asked.iter().copied().find(|f| f.name() == only).ok_or_else(|| {
            anyhow!(
                "the fault suite injects no fault called '{only}' here (site faults need --sites, witness-loss --witness network): one of {}",
                names.join(", ")
            )
        })?;
        plan = vec![kind; args.faults.unwrap_or(1)];
    }
    let emulate_watchdog = match args.watchdog.as_str() {
        "emulated" => true,
        "none" => false,
        other => bail!("unknown watchdog '{other}': use emulated or none"),
    };
    let mut extra = if emulate_watchdog {
        format!("watchdog = {{ enabled = true, device = \"{{data}}/watchdog\", timeout_s = {}, test_file = true }}\n", WATCHDOG_TIMEOUT.as_secs())
    } else {
        String::new()
    };
    let (driver, vms_per_host) = match args.driver.as_str() {
        "process" => ("process", args.vms_per_host),
        "qemu" | "mixed" => {
            extra.push_str("[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 5\n");
            if args.driver == "qemu" {
                ("qemu", args.vms_per_host.min(2))
            } else {
                ("mixed", args.vms_per_host)
            }
        }
        other => bail!("unknown driver '{other}': use process, qemu or mixed"),
    };
    println!("tandem-lab chaos: profile {}, seed {seed}, {} hosts, {driver} workloads, {count} faults", args.profile, args.hosts);
    println!(
        "replay: tandem-lab chaos --profile {} --seed {seed} --hosts {} --witness {} --driver {driver} --watchdog {}{}{}{}",
        args.profile,
        args.hosts,
        args.witness,
        args.watchdog,
        args.faults.map(|n| format!(" --faults {n}")).unwrap_or_default(),
        args.only.as_ref().map(|k| format!(" --only {k}")).unwrap_or_default(),
        if args.sites.is_empty() { String::new() } else { format!(" --sites {}", args.sites.join(",")) }
    );

    crate::demo::install_interrupt_handler();
    let net = NetLab::create(&format!("tc{}", std::process::id() % 100_000), args.hosts)?;
    net.enter_control()?;
    let binary = crate::lab::tandem_binary()?;
    let links_dir = std::env::temp_dir().join(format!("tandem-chaos-links-{}", std::process::id()));
    std::fs::create_dir_all(&links_dir)?;
    let disk_links: Vec<PathBuf> = if network_witness { Vec::new() } else { (0..args.hosts).map(|i| links_dir.join(format!("h{i}.disk"))).collect() };
    // The witness listens in the control namespace, where the suite runs: a third place.
    let witness_at = network_witness.then(|| crate::lab::witness::NetWitnessOptions { addr: format!("{}:7463", net.control_ip()), netns: None, tls: None });
    let opts = LabOptions {
        hosts: args.hosts as u32,
        driver: driver.into(),
        loopback_net: 90,
        extra_config: extra,
        capacity: (64, 16384),
        netns: Some(net.lab_hosts()),
        disk_paths: disk_links.iter().enumerate().map(|(i, l)| (i as u32, l.clone())).collect(),
        sites: args.sites.clone(),
        network_witness: witness_at,
        ..LabOptions::default()
    };
    let mut lab = Lab::new(opts, &binary)?;
    if args.keep {
        lab.keep_files();
        println!("lab directory: {}", lab.root.display());
    }
    for h in &lab.hosts {
        std::fs::write(h.data.join("watchdog"), b"")?;
    }
    // Each host reaches the shared heartbeat disk through its own FUSE view (which a fault
    // hangs) and its own symlink to that view (which a fault breaks).
    // `Lab::new` formatted it.
    let disk = if network_witness {
        lab.start_witness()?;
        None
    } else {
        let backing = lab.shared.join("heartbeat.disk");
        let fuse_dir = links_dir.join("fuse");
        std::fs::create_dir_all(&fuse_dir)?;
        let fuse = FuseDisk::mount(&backing, &fuse_dir, args.hosts)?;
        for (i, l) in disk_links.iter().enumerate() {
            std::os::unix::fs::symlink(fuse.path(i), l)?;
        }
        Some(HeartbeatPaths { links: disk_links, fuse })
    };
    lab.start_all()?;
    lab.form_cluster()?;
    let guest = args.guest_dir.clone().unwrap_or_else(|| PathBuf::from(".cache/guest"));
    let total = args.hosts * vms_per_host;
    let c0 = lab.client(0);
    let mut vm_names = BTreeSet::new();
    for i in 0..total {
        // Mixed: the first VM of each host's share is a real guest (TCG is slow; two cores).
        let real_guest = driver == "qemu" || (driver == "mixed" && i < args.hosts);
        let spec = if real_guest { crate::demo::demo_vm(i as u32, "qemu", &guest) } else { crate::lab::process_vm(&format!("vm{i}"), 64, (i % 3) as i32) };
        let name = spec.name.clone();
        c0.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create {name}: {e}"))?;
        c0.send("POST", &format!("/v1/vms/{name}/start"), &ForceRequest::default()).map_err(|e| anyhow!("start {name}: {e}"))?;
        vm_names.insert(name);
    }
    let watchdog = emulate_watchdog.then(|| {
        let hosts = suite_hosts_for_watchdog(&lab);
        WatchdogEmulator::start(lab.id.clone(), hosts)
    });
    // A live migration's destination holds a paused copy while the source runs: the recorder
    // asks the hosts before it counts two processes of a VM as a double run.
    lab.judge_paused_copies();
    let mut suite = Suite { lab, net, rng, report: Report::default(), vm_names, origin: Instant::now(), watchdog, disk };
    if network_witness {
        suite.wait_witness_votes();
    }
    suite.settle("start");
    suite.log(&format!("{total} protected VM(s) running on {} hosts", args.hosts));
    let progress = crate::progress::Progress::new(plan.len() as u64, "faults");
    for (i, fault) in plan.into_iter().enumerate() {
        if interrupted() {
            break;
        }
        progress.set(i as u64, &format!("{} violation(s)", suite.report.violations.len()));
        let outcome = suite.inject(fault);
        progress.finish();
        if let Err(e) = outcome {
            suite.report_finding("suite-error", &format!("{fault}: {e:#}"));
            break;
        }
    }
    let resets = suite.watchdog.as_ref().map_or(0, |w| w.resets().len());
    let r = &suite.report;
    println!("\nFaults injected:");
    for (k, n) in &r.faults {
        println!("  {k:<24} {n}");
    }
    println!(
        "VM recoveries: {} (median {:.2} s, max {:.2} s from fault to running again)",
        r.recoveries,
        median(&r.recovery_ms) as f64 / 1000.0,
        r.recovery_ms.iter().max().copied().unwrap_or(0) as f64 / 1000.0
    );
    if emulate_watchdog {
        println!("Watchdog resets: {resets}");
    }
    println!("Violations: {}", r.violations.len());
    for v in &r.violations {
        println!("  {v}");
    }
    let summary = json!({
        "profile": args.profile, "seed": seed, "hosts": args.hosts, "witness": args.witness, "driver": driver,
        "faults": r.faults, "faults_total": r.faults.values().sum::<u32>(),
        "vm_recoveries": r.recoveries, "watchdog": args.watchdog, "watchdog_resets": resets,
        "recovery_ms": { "median": median(&r.recovery_ms), "max": r.recovery_ms.iter().max().copied().unwrap_or(0) },
        "violations": r.violations,
    });
    println!("{summary}");
    let failed = !r.violations.is_empty();
    drop(suite);
    let _ = std::fs::remove_dir_all(&links_dir);
    crate::demo::check_interrupt()?;
    if failed {
        bail!("invariants violated; replay with --seed {seed}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_sim::fault::Backend;

    #[test]
    fn the_suite_injects_exactly_the_vocabularys_chaos_kinds() {
        let mine: BTreeSet<FaultKind> = CHAOS_FAULTS.into_iter().chain(SITE_FAULTS).chain(WITNESS_FAULTS).chain(ON_REQUEST_FAULTS).collect();
        let vocabulary: BTreeSet<FaultKind> = FaultKind::of(Backend::Chaos).collect();
        assert_eq!(mine, vocabulary);
        assert_eq!(mine.len(), CHAOS_FAULTS.len() + SITE_FAULTS.len() + WITNESS_FAULTS.len() + ON_REQUEST_FAULTS.len(), "no kind twice");
        assert!(ON_REQUEST_FAULTS.iter().all(|k| k.on_request_only()));
        assert!(SITE_FAULTS.iter().all(|k| k.needs_sites()) && !CHAOS_FAULTS.iter().any(|k| k.needs_sites()));
        assert!(WITNESS_FAULTS.iter().all(|k| k.needs_witness()) && DISK_FAULTS.iter().all(|k| CHAOS_FAULTS.contains(k)));
    }
}
