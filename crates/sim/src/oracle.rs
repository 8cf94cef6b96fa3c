//! The invariant oracle shared by the simulator and the real fault suite: what must hold after
//! a fault, with one set of bounds. Each backend observes its world (the simulator reads its run
//! table and its agents' APIs; the fault suite samples the process table and asks the agents)
//! and hands the observations here; the verdicts and their names are the same in both.
//!
//! Everything here is pure: time enters as milliseconds on the backend's clock (virtual in the
//! simulator, wall in the suite).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Within this long after a fault, every protected VM the fault stopped runs again: detection
/// (`peer_timeout_ms`), the fence deadline and the restart, with room for a slow machine.
pub const RECOVERY_BOUND_MS: u64 = 20_000;
/// Within this long after every fault healed, the cluster settles: every host active and alive,
/// every VM running exactly once, where committed state assigns it.
pub const SETTLE_BOUND_MS: u64 = 60_000;

/// One invariant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    /// A VM ran on two hosts at once.
    DoubleRun,
    /// A VM the cluster acknowledged creating is gone from committed state.
    StateLost,
    /// After settling, a VM does not run where committed state assigns it (or runs where it
    /// should not).
    WrongHost,
    /// A VM stopped by a fault did not run again within [`RECOVERY_BOUND_MS`].
    NotRecovered,
    /// A host that no fault touched fenced itself (or was reset by its watchdog).
    HealthyFenced,
    /// A host whose lease lapsed went on as if it held it.
    Lease,
    /// A paused copy resumed from memory that was not the VM's latest: a destination resumed
    /// before its migration completed, or after another copy ran since.
    StaleResume,
    /// A live migration that no fault touched did not complete.
    MigrationStuck,
    /// A VM parked with a host that left under the `freeze` policy (or `shutdown`, before its
    /// restart-elsewhere time) ran before that host returned.
    ParkedRan,
    /// A VM with a local disk ran on a host whose copy of the disk was not the latest.
    StaleDisk,
    /// The disk witness's database was written by a node other than the one opened last: two
    /// hosts held the witness at once.
    WitnessTwice,
    /// A VM with a disk mirrored between sites started from a site's copy that lacked a write
    /// its guest had acknowledged.
    StaleCopy,
}

impl Invariant {
    pub fn name(self) -> &'static str {
        match self {
            Invariant::DoubleRun => "double-run",
            Invariant::StateLost => "state-lost",
            Invariant::WrongHost => "wrong-host",
            Invariant::NotRecovered => "not-recovered",
            Invariant::HealthyFenced => "healthy-fenced",
            Invariant::Lease => "lease",
            Invariant::StaleResume => "stale-resume",
            Invariant::MigrationStuck => "migration-stuck",
            Invariant::ParkedRan => "parked-ran",
            Invariant::StaleDisk => "stale-disk",
            Invariant::WitnessTwice => "witness-twice",
            Invariant::StaleCopy => "stale-copy",
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A broken invariant and what showed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: Invariant,
    pub detail: String,
}

impl Violation {
    pub fn new(invariant: Invariant, detail: impl Into<String>) -> Self {
        Violation { invariant, detail: detail.into() }
    }
}

/// Where each VM runs now, as the backend observed it: VM name → host names.
pub type Running = BTreeMap<String, BTreeSet<String>>;

/// The VMs observed on two or more hosts at once, with those hosts.
pub fn on_two_hosts(running: &Running) -> impl Iterator<Item = (&String, &BTreeSet<String>)> {
    running.iter().filter(|(_, hosts)| hosts.len() > 1)
}

/// The double runs in one observation, as violations.
pub fn double_runs(running: &Running) -> Vec<Violation> {
    on_two_hosts(running).map(|(vm, hosts)| Violation::new(Invariant::DoubleRun, format!("{vm} runs on {hosts:?}"))).collect()
}

/// Hosts that fenced (or were reset) although the faults allowed only `allowed` to.
pub fn unexcused_fences(what: &str, fenced: &BTreeSet<String>, allowed: &BTreeSet<String>) -> Option<Violation> {
    let wrongly: Vec<&String> = fenced.difference(allowed).collect();
    (!wrongly.is_empty()).then(|| Violation::new(Invariant::HealthyFenced, format!("{what}: {wrongly:?} fenced themselves (allowed: {allowed:?})")))
}

/// One VM as committed state has it, for the settle check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub name: String,
    /// The host it must run on: its assignment when desired running, else none.
    pub runs_on: Option<String>,
}

impl From<&tandem_agent::views::VmView> for Committed {
    fn from(v: &tandem_agent::views::VmView) -> Committed {
        Committed { name: v.name.clone(), runs_on: v.should_run_on().map(str::to_string) }
    }
}

/// What the settle check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Settle {
    /// Every VM runs exactly once, where committed state assigns it.
    Settled,
    /// Not yet; the problem, for the report if the bound passes.
    NotYet(String),
    /// Something that waiting cannot repair.
    Broken(Violation),
}

/// Checks one observation of a cluster whose faults all healed. `acknowledged` are the VMs the
/// cluster acknowledged creating and was not told to delete; `hosts_ready` is whether every host
/// is up, active and seen alive.
pub fn settle(acknowledged: &BTreeSet<String>, committed: &[Committed], running: &Running, hosts_ready: bool) -> Settle {
    let names: BTreeSet<String> = committed.iter().map(|c| c.name.clone()).collect();
    let lost: Vec<&String> = acknowledged.difference(&names).collect();
    if !lost.is_empty() {
        return Settle::Broken(Violation::new(Invariant::StateLost, format!("acknowledged VMs {lost:?} are missing from committed state")));
    }
    if !hosts_ready {
        return Settle::NotYet("not every host is active and alive".into());
    }
    let wrong: Vec<String> = committed
        .iter()
        .filter_map(|c| {
            let on: Vec<&String> = running.get(&c.name).map(|h| h.iter().collect()).unwrap_or_default();
            let want: Vec<&String> = c.runs_on.iter().collect();
            (on != want).then(|| format!("{}: assigned {want:?}, runs on {on:?}", c.name))
        })
        .collect();
    if wrong.is_empty() {
        Settle::Settled
    } else {
        Settle::NotYet(wrong.join("; "))
    }
}

/// The report of a settle that never happened within [`SETTLE_BOUND_MS`].
pub fn not_settled(after: &str, problem: &str) -> Violation {
    Violation::new(Invariant::WrongHost, format!("not settled {} s after {after}: {problem}", SETTLE_BOUND_MS / 1000))
}

/// VMs a fault stopped, owed a recovery by a deadline.
#[derive(Clone, Debug)]
struct Owed {
    what: String,
    since_ms: u64,
    vms: BTreeSet<String>,
    /// Hosts the VMs must have left (the failed ones).
    away_from: BTreeSet<String>,
}

/// A recovery that completed: every VM of a fault runs again, once, away from the failed hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    pub what: String,
    pub vms: usize,
    pub took_ms: u64,
}

/// The recoveries the cluster owes.
#[derive(Debug, Default)]
pub struct Recoveries {
    owed: Vec<Owed>,
}

impl Recoveries {
    /// After `what` at `now_ms`, `vms` must run again, each on one host not in `away_from`,
    /// within [`RECOVERY_BOUND_MS`].
    pub fn owe(&mut self, now_ms: u64, what: impl Into<String>, vms: &[String], away_from: &[String]) {
        if vms.is_empty() {
            return;
        }
        self.owed.push(Owed { what: what.into(), since_ms: now_ms, vms: vms.iter().cloned().collect(), away_from: away_from.iter().cloned().collect() });
    }

    /// The operator no longer wants `vm` running: no recovery is owed for it.
    pub fn forgive(&mut self, vm: &str) {
        for o in &mut self.owed {
            o.vms.remove(vm);
        }
    }

    /// Nothing owed.
    pub fn is_empty(&self) -> bool {
        self.owed.is_empty()
    }

    /// One observation: a VM seen running once, away from the failed hosts, is recovered; a
    /// VM gone from `existing` (deleted) is owed nothing. Returns the recoveries completed now
    /// and the violations of those whose bound passed.
    /// Whether a recovery is owed for any of `vms`.
    #[must_use]
    pub fn owes_any(&self, vms: &BTreeSet<String>) -> bool {
        self.owed.iter().any(|o| o.vms.iter().any(|v| vms.contains(v)))
    }

    pub fn observe(&mut self, now_ms: u64, running: &Running, existing: &BTreeSet<String>) -> (Vec<Recovered>, Vec<Violation>) {
        let mut done = vec![];
        let mut late = vec![];
        let mut keep = vec![];
        for mut o in std::mem::take(&mut self.owed) {
            let before = o.vms.len();
            o.vms.retain(|v| existing.contains(v) && !running.get(v).is_some_and(|hosts| hosts.len() == 1 && hosts.is_disjoint(&o.away_from)));
            if o.vms.is_empty() {
                done.push(Recovered { what: o.what, vms: before, took_ms: now_ms.saturating_sub(o.since_ms) });
            } else if now_ms >= o.since_ms + RECOVERY_BOUND_MS {
                late.push(Violation::new(Invariant::NotRecovered, format!("after {}: {:?} not running within {RECOVERY_BOUND_MS} ms", o.what, o.vms)));
            } else {
                keep.push(o);
            }
        }
        self.owed = keep;
        (done, late)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn running(pairs: &[(&str, &[&str])]) -> Running {
        pairs.iter().map(|(vm, hosts)| (vm.to_string(), s(hosts))).collect()
    }

    #[test]
    fn a_vm_on_two_hosts_is_a_double_run() {
        let r = running(&[("a", &["h0"]), ("b", &["h0", "h1"])]);
        let v = double_runs(&r);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].invariant, Invariant::DoubleRun);
        assert!(v[0].detail.contains('b'));
    }

    #[test]
    fn a_recovery_needs_one_copy_away_from_the_failed_host() {
        let mut r = Recoveries::default();
        let vms = vec!["a".to_string(), "b".to_string()];
        r.owe(1_000, "power-loss of h1", &vms, &["h1".to_string()]);
        let existing = s(&["a", "b"]);
        // Still on the failed host, or on two hosts: not recovered.
        let (done, late) = r.observe(2_000, &running(&[("a", &["h1"]), ("b", &["h0", "h2"])]), &existing);
        assert!(done.is_empty() && late.is_empty());
        let (done, late) = r.observe(5_000, &running(&[("a", &["h0"]), ("b", &["h2"])]), &existing);
        assert_eq!(done, vec![Recovered { what: "power-loss of h1".into(), vms: 2, took_ms: 4_000 }]);
        assert!(late.is_empty() && r.is_empty());
    }

    #[test]
    fn a_recovery_past_its_bound_is_a_violation_once() {
        let mut r = Recoveries::default();
        r.owe(0, "partition-full of h2", &["a".to_string()], &["h2".to_string()]);
        let (_, late) = r.observe(RECOVERY_BOUND_MS - 1, &Running::new(), &s(&["a"]));
        assert!(late.is_empty());
        let (_, late) = r.observe(RECOVERY_BOUND_MS, &Running::new(), &s(&["a"]));
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].invariant, Invariant::NotRecovered);
        assert!(r.is_empty(), "reported once");
    }

    #[test]
    fn deleted_or_forgiven_vms_are_owed_nothing() {
        let mut r = Recoveries::default();
        r.owe(0, "x", &["a".to_string(), "b".to_string()], &[]);
        r.forgive("a");
        let (done, late) = r.observe(RECOVERY_BOUND_MS, &Running::new(), &s(&["a"]));
        assert!(late.is_empty(), "b was deleted, a forgiven: {late:?}");
        assert_eq!(done.len(), 1);
    }

    #[test]
    fn settling_needs_every_vm_once_where_assigned() {
        let committed = vec![Committed { name: "a".into(), runs_on: Some("h0".into()) }, Committed { name: "b".into(), runs_on: None }];
        let ack = s(&["a", "b"]);
        assert_eq!(settle(&ack, &committed, &running(&[("a", &["h0"])]), true), Settle::Settled);
        assert!(matches!(settle(&ack, &committed, &running(&[("a", &["h0"])]), false), Settle::NotYet(_)));
        assert!(matches!(settle(&ack, &committed, &running(&[("a", &["h1"])]), true), Settle::NotYet(_)));
        assert!(matches!(settle(&ack, &committed, &running(&[("a", &["h0"]), ("b", &["h1"])]), true), Settle::NotYet(_)));
        match settle(&s(&["a", "b", "c"]), &committed, &Running::new(), true) {
            Settle::Broken(v) => assert_eq!(v.invariant, Invariant::StateLost),
            other => panic!("a lost VM must break the settle: {other:?}"),
        }
    }

    #[test]
    fn only_allowed_hosts_may_fence() {
        assert!(unexcused_fences("f", &s(&["h1"]), &s(&["h1", "h2"])).is_none());
        let v = unexcused_fences("f", &s(&["h0", "h1"]), &s(&["h1"])).expect("h0 was not allowed");
        assert_eq!(v.invariant, Invariant::HealthyFenced);
    }
}
