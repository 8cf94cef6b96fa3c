//! A VM's lifecycle in committed state: one [`VmPhase`] instead of loose flags.
//!
//! Every state a VM can be in is a variant, with exactly the data that state has; a transition
//! is a method that either moves the VM or says why it cannot. Migration, monitoring and
//! replication add variants here rather than flags beside them.
//!
//! On the wire (log snapshots, the state a host sends a joining host) a record keeps the field
//! layout that older hosts read — `desired`, `assignment`, `held`, `error`,
//! `capacity_retries` — so this type changes no format: [`VmRecordWire`] converts, and a
//! combination of fields that no phase has is mapped to the nearest phase and counted as a bug
//! by the debug assertion in [`VmPhase::from_fields`].

use super::{Assignment, PowerState, VmSpec};
use crate::hostset::HostId;
use serde::{Deserialize, Serialize};

/// Where a VM stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmPhase {
    /// Not wanted running, placed nowhere.
    Stopped,
    /// HA gave up on it after it failed on too many hosts; stopped until an operator clears it.
    Failed { reason: String },
    /// Wanted running, placed nowhere yet: the coordinator places it when a host has room.
    /// `capacity_retries`: for a `best-effort` VM its host's failover left without a host, the
    /// placement retries spent so far (it is stopped after `BEST_EFFORT_RETRIES`).
    Waiting { capacity_retries: Option<u32> },
    /// Assigned by a failover and held back: a lower restart group is still starting. Its host
    /// does not start it until the coordinator releases the group.
    Held { at: Assignment },
    /// Assigned to a host, which runs it.
    Placed { at: Assignment },
    /// Stopped by an operator while assigned: its host stops it and then releases it.
    Stopping { at: Assignment },
    /// Live-migrating from `at` (still its owner: the source runs it, and resumes it if the
    /// migration fails) to `to` (the destination, which holds a paused copy). Only the commit of
    /// the switchover makes `to` the assignment; only then does the destination resume.
    Migrating { at: Assignment, to: Assignment },
    /// Shut down cleanly with its host's planned stop (`shutdown` or `freeze` policy): wanted
    /// running, placed nowhere, and not placed by the coordinator either — it starts again on
    /// `host` when that host rejoins, or, once `hold_ms` has passed (`None`: never), the
    /// coordinator releases it to run elsewhere.
    Parked { host: HostId, hold_ms: Option<u64> },
}

/// A VM in the desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "VmRecordWire", into = "VmRecordWire")]
pub struct VmRecord {
    pub spec: VmSpec,
    pub phase: VmPhase,
    /// Hosts it kept failing on since an operator last cleared it; placement avoids them. Kept
    /// across phases (a relocated VM still avoids the hosts it failed on).
    pub failed_on: Vec<HostId>,
    /// The host a maintenance evacuation moved it away from: it goes back there when that host
    /// leaves maintenance. An operator's own migration forgets it.
    pub home: Option<HostId>,
    /// For a VM whose writable disk lives on its host's own storage: the host whose copy is the
    /// latest — where it last ran, or where a live migration's switchover took it. A stopped
    /// or parked VM keeps it, and is only ever started there again (every other host holds an
    /// older copy, or none). `None` until it first runs, and for VMs without a local disk.
    pub disk_host: Option<HostId>,
    /// For a VM with site-mirrored disks: the sites whose copies hold every write the guest had
    /// acknowledged (sorted). A start places it at one of them, and makes that site's copy the
    /// only current one until a mirror catches another up (`mirror-synced`). Empty until it
    /// first runs: every site's copy is as the operator left it.
    pub copies: Vec<String>,
}

impl VmRecord {
    /// A new VM: stopped, with no history.
    #[must_use]
    pub fn new(spec: VmSpec) -> VmRecord {
        VmRecord { spec, phase: VmPhase::Stopped, failed_on: vec![], home: None, disk_host: None, copies: vec![] }
    }

    /// What the operator (or HA) wants: running or stopped.
    #[must_use]
    pub fn desired(&self) -> PowerState {
        match self.phase {
            VmPhase::Waiting { .. } | VmPhase::Held { .. } | VmPhase::Placed { .. } | VmPhase::Migrating { .. } | VmPhase::Parked { .. } => PowerState::Running,
            VmPhase::Stopped | VmPhase::Failed { .. } | VmPhase::Stopping { .. } => PowerState::Stopped,
        }
    }

    /// The host and generation it is assigned to, if any.
    #[must_use]
    pub fn assignment(&self) -> Option<Assignment> {
        match self.phase {
            VmPhase::Held { at } | VmPhase::Placed { at } | VmPhase::Stopping { at } | VmPhase::Migrating { at, .. } => Some(at),
            VmPhase::Stopped | VmPhase::Failed { .. } | VmPhase::Waiting { .. } | VmPhase::Parked { .. } => None,
        }
    }

    /// The host whose planned stop parked it, and how long it waits for that host.
    #[must_use]
    pub fn parked(&self) -> Option<(HostId, Option<u64>)> {
        match self.phase {
            VmPhase::Parked { host, hold_ms } => Some((host, hold_ms)),
            _ => None,
        }
    }

    /// Where a live migration in progress takes it (the destination's generation included).
    #[must_use]
    pub fn migrating_to(&self) -> Option<Assignment> {
        match self.phase {
            VmPhase::Migrating { to, .. } => Some(to),
            _ => None,
        }
    }

    /// Whether its restart waits for a lower group.
    #[must_use]
    pub fn held(&self) -> bool {
        matches!(self.phase, VmPhase::Held { .. })
    }

    /// Why HA gave up on it, if it did.
    #[must_use]
    pub fn error(&self) -> Option<&str> {
        match &self.phase {
            VmPhase::Failed { reason } => Some(reason),
            _ => None,
        }
    }

    /// The placement retries of a `best-effort` VM waiting for room after a failover.
    #[must_use]
    pub fn capacity_retries(&self) -> Option<u32> {
        match self.phase {
            VmPhase::Waiting { capacity_retries } => capacity_retries,
            _ => None,
        }
    }

    /// Whether it waits for a host: wanted running and placed nowhere.
    #[must_use]
    pub fn is_waiting(&self) -> bool {
        matches!(self.phase, VmPhase::Waiting { .. })
    }

    /// Whether it is assigned to `host`.
    #[must_use]
    pub fn is_on(&self, host: HostId) -> bool {
        self.assignment().is_some_and(|a| a.host == host)
    }

    /// The operator wants it running (or stopped). An operator's word ends a wait for capacity
    /// retries, and a VM stopped while held and started again before its host released it runs
    /// at once (the operator asked for it). A failed VM stays failed until cleared (the caller
    /// refuses the start, with the reason).
    pub fn set_desired(&mut self, desired: PowerState) {
        self.phase = match (std::mem::replace(&mut self.phase, VmPhase::Stopped), desired) {
            (VmPhase::Stopped | VmPhase::Waiting { .. }, PowerState::Running) => VmPhase::Waiting { capacity_retries: None },
            // Parked with its host: a start changes nothing (it comes back with its host, or
            // when released); a stop ends the wait.
            (parked @ VmPhase::Parked { .. }, PowerState::Running) => parked,
            (VmPhase::Parked { .. }, PowerState::Stopped) => VmPhase::Stopped,
            (held @ VmPhase::Held { .. }, PowerState::Running) => held,
            (VmPhase::Stopping { at } | VmPhase::Placed { at }, PowerState::Running) => VmPhase::Placed { at },
            // Already running: a start changes nothing, the migration goes on.
            (migrating @ VmPhase::Migrating { .. }, PowerState::Running) => migrating,
            // A stop ends a migration: the destination's paused copy is no longer wanted.
            (VmPhase::Held { at } | VmPhase::Placed { at } | VmPhase::Stopping { at } | VmPhase::Migrating { at, .. }, PowerState::Stopped) => {
                VmPhase::Stopping { at }
            }
            (VmPhase::Stopped | VmPhase::Waiting { .. }, PowerState::Stopped) => VmPhase::Stopped,
            (failed @ VmPhase::Failed { .. }, _) => failed,
        };
    }

    /// It leaves its host (failed there, released, or its host failed over): wanted running, it
    /// waits for another; otherwise it is stopped. A failed VM stays failed.
    pub fn unassign(&mut self) {
        self.phase = match std::mem::replace(&mut self.phase, VmPhase::Stopped) {
            VmPhase::Held { .. } | VmPhase::Placed { .. } | VmPhase::Migrating { .. } => VmPhase::Waiting { capacity_retries: None },
            VmPhase::Stopping { .. } | VmPhase::Stopped => VmPhase::Stopped,
            other @ (VmPhase::Failed { .. } | VmPhase::Waiting { .. } | VmPhase::Parked { .. }) => other,
        };
    }

    /// Its host stops for a planned stop with it shut down cleanly: a VM that host ran is parked
    /// with it (or, with a hold of zero, waits for another host at once); one it was stopping
    /// is stopped. Anything else is left alone.
    pub fn park(&mut self, host: HostId, hold_ms: Option<u64>) {
        self.phase = match std::mem::replace(&mut self.phase, VmPhase::Stopped) {
            VmPhase::Held { at } | VmPhase::Placed { at } | VmPhase::Migrating { at, .. } if at.host == host => match hold_ms {
                Some(0) => VmPhase::Waiting { capacity_retries: None },
                _ => VmPhase::Parked { host, hold_ms },
            },
            VmPhase::Stopping { at } if at.host == host => VmPhase::Stopped,
            other => other,
        };
    }

    /// It is placed on a host (by the coordinator, or by a failover, `held` when its restart
    /// group must wait).
    pub fn place(&mut self, at: Assignment, held: bool) {
        debug_assert!(self.desired() == PowerState::Running, "only a VM wanted running is placed");
        self.phase = if held { VmPhase::Held { at } } else { VmPhase::Placed { at } };
        self.note_disk_host(at.host);
    }

    /// Its local disk's latest copy is now on `host` (it starts there, or a switchover took it
    /// there); a VM without a local disk has none.
    pub fn note_disk_host(&mut self, host: HostId) {
        self.disk_host = self.spec.bound_to_host().then_some(host);
    }

    /// The only host it may be started on from its disk, if it is bound to one: the host with
    /// its local disk's latest copy. A live migration may still take it anywhere (it copies the
    /// disk).
    #[must_use]
    pub fn start_host(&self) -> Option<HostId> {
        self.disk_host.filter(|_| self.spec.bound_to_host())
    }

    /// Its restart group may start: a held VM is placed.
    pub fn release_hold(&mut self) {
        if let VmPhase::Held { at } = self.phase {
            self.phase = VmPhase::Placed { at };
        }
    }

    /// A live migration begins: `to` receives a paused copy while the VM keeps running where it
    /// is. The caller checked that it is placed (not held, stopping or already migrating).
    pub fn begin_migration(&mut self, to: Assignment) {
        if let VmPhase::Placed { at } = self.phase {
            self.phase = VmPhase::Migrating { at, to };
        }
    }

    /// The migration ends: `committed` makes the destination the owner (the switchover);
    /// otherwise the source keeps it. Anything but a migration is left alone.
    pub fn end_migration(&mut self, committed: bool) {
        if let VmPhase::Migrating { at, to } = self.phase {
            let owner = if committed { to } else { at };
            self.phase = VmPhase::Placed { at: owner };
            self.note_disk_host(owner.host);
        }
    }

    /// HA gives up on it.
    pub fn fail(&mut self, reason: String) {
        self.phase = VmPhase::Failed { reason };
    }

    /// An operator clears the failure and its history: a failed VM is stopped.
    pub fn clear_failure(&mut self) {
        if matches!(self.phase, VmPhase::Failed { .. }) {
            self.phase = VmPhase::Stopped;
        }
        self.failed_on.clear();
    }
}

impl VmPhase {
    /// The phase the loose fields of the wire format describe.
    fn from_fields(w: &VmRecordWire) -> VmPhase {
        let (desired, assignment, held, error, capacity_retries) = (w.desired, w.assignment, w.held, w.error.clone(), w.capacity_retries);
        // Every record this code writes is one of these combinations; a record that is none of
        // them was written by a bug, and is read as the nearest phase.
        debug_assert!(!(error.is_some() && (assignment.is_some() || desired == PowerState::Running)), "a failed VM is stopped and placed nowhere");
        match (error, desired, assignment) {
            (Some(reason), _, None) => VmPhase::Failed { reason },
            (_, PowerState::Running, Some(at)) => match w.migrating_to {
                Some(to) => VmPhase::Migrating { at, to },
                None if held => VmPhase::Held { at },
                None => VmPhase::Placed { at },
            },
            (_, PowerState::Stopped, Some(at)) => VmPhase::Stopping { at },
            (_, PowerState::Running, None) => match w.parked {
                Some(p) => VmPhase::Parked { host: p.host, hold_ms: p.hold_ms },
                None => VmPhase::Waiting { capacity_retries },
            },
            (_, PowerState::Stopped, None) => VmPhase::Stopped,
        }
    }
}

/// A [`VmRecord`] as it has always been written: the fields older hosts read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecordWire {
    spec: VmSpec,
    desired: PowerState,
    assignment: Option<Assignment>,
    #[serde(default)]
    failed_on: Vec<HostId>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    held: bool,
    #[serde(default)]
    capacity_retries: Option<u32>,
    /// A live migration's destination (written only while one runs; older hosts never see a
    /// migrating VM, since the commands that start one are of a log format they refuse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    migrating_to: Option<Assignment>,
    /// Where a maintenance evacuation took it from (an older host ignores it: it only steers
    /// the coordinator of this release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    home: Option<HostId>,
    /// Parked with its host's planned stop (written only then; the command that parks VMs is of
    /// a log format older hosts refuse, so they never read one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parked: Option<ParkedWire>,
    /// Where its local disk's latest copy is (an older host ignores it, and would place such a
    /// VM anywhere: upgrade every host before relying on local disks across stops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disk_host: Option<HostId>,
    /// The sites whose mirrored copies are current (written only for a site-mirrored VM, whose
    /// spec an older host refuses: log format 13).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    copies: Vec<String>,
}

/// [`VmPhase::Parked`] on the wire.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ParkedWire {
    host: HostId,
    #[serde(default)]
    hold_ms: Option<u64>,
}

impl From<VmRecordWire> for VmRecord {
    fn from(w: VmRecordWire) -> VmRecord {
        VmRecord { phase: VmPhase::from_fields(&w), spec: w.spec, failed_on: w.failed_on, home: w.home, disk_host: w.disk_host, copies: w.copies }
    }
}

impl From<VmRecord> for VmRecordWire {
    fn from(r: VmRecord) -> VmRecordWire {
        VmRecordWire {
            desired: r.desired(),
            assignment: r.assignment(),
            held: r.held(),
            error: r.error().map(str::to_string),
            capacity_retries: r.capacity_retries(),
            migrating_to: r.migrating_to(),
            home: r.home,
            disk_host: r.disk_host,
            parked: r.parked().map(|(host, hold_ms)| ParkedWire { host, hold_ms }),
            copies: r.copies,
            spec: r.spec,
            failed_on: r.failed_on,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec::process("v", 64, 0, &["x"])
    }

    fn at(h: u32, g: u64) -> Assignment {
        Assignment { host: HostId(h), generation: g }
    }

    fn phases() -> Vec<VmPhase> {
        vec![
            VmPhase::Stopped,
            VmPhase::Failed { reason: "why".into() },
            VmPhase::Waiting { capacity_retries: None },
            VmPhase::Waiting { capacity_retries: Some(2) },
            VmPhase::Held { at: at(1, 7) },
            VmPhase::Placed { at: at(2, 8) },
            VmPhase::Stopping { at: at(0, 9) },
            VmPhase::Migrating { at: at(0, 10), to: at(1, 11) },
            VmPhase::Parked { host: HostId(2), hold_ms: Some(300_000) },
            VmPhase::Parked { host: HostId(1), hold_ms: None },
        ]
    }

    #[test]
    fn every_phase_round_trips_through_the_old_wire_format() {
        for phase in phases() {
            let r = VmRecord {
                spec: spec(),
                phase: phase.clone(),
                failed_on: vec![HostId(3)],
                home: Some(HostId(1)),
                disk_host: Some(HostId(2)),
                copies: vec!["a".into()],
            };
            let json = serde_json::to_value(&r).expect("serializes");
            for field in ["desired", "assignment", "held", "error", "capacity_retries", "failed_on"] {
                assert!(json.get(field).is_some(), "{field} missing for {phase:?}: older hosts read it");
            }
            let back: VmRecord = serde_json::from_value(json).expect("reads back");
            assert_eq!(back, r);
        }
    }

    #[test]
    fn a_record_written_before_phases_reads_as_its_phase() {
        let old = serde_json::json!({
            "spec": spec(), "desired": "running", "assignment": { "host": 1, "generation": 4 }, "held": true
        });
        let r: VmRecord = serde_json::from_value(old).expect("reads");
        assert_eq!(r.phase, VmPhase::Held { at: at(1, 4) });
        assert!(r.failed_on.is_empty());
    }

    #[test]
    fn operator_power_changes_follow_the_lifecycle() {
        let mut r = VmRecord::new(spec());
        r.set_desired(PowerState::Running);
        assert_eq!(r.phase, VmPhase::Waiting { capacity_retries: None });
        r.place(at(1, 1), true);
        assert!(r.held());
        r.set_desired(PowerState::Stopped);
        assert_eq!(r.phase, VmPhase::Stopping { at: at(1, 1) });
        r.set_desired(PowerState::Running);
        assert_eq!(r.phase, VmPhase::Placed { at: at(1, 1) }, "started again before its host released it: it keeps its place");
        r.unassign();
        assert_eq!(r.phase, VmPhase::Waiting { capacity_retries: None });
        r.fail("gave up".into());
        r.set_desired(PowerState::Running);
        assert_eq!(r.error(), Some("gave up"), "a failed VM starts only once cleared");
        r.failed_on.push(HostId(1));
        r.clear_failure();
        assert_eq!((r.phase.clone(), r.failed_on.len()), (VmPhase::Stopped, 0));
    }

    #[test]
    fn accessors_agree_with_the_phase() {
        for phase in phases() {
            let r = VmRecord { spec: spec(), phase: phase.clone(), failed_on: vec![], home: None, disk_host: None, copies: vec![] };
            assert_eq!(
                r.assignment().is_some(),
                matches!(phase, VmPhase::Held { .. } | VmPhase::Placed { .. } | VmPhase::Stopping { .. } | VmPhase::Migrating { .. })
            );
            assert_eq!(r.migrating_to().is_some(), matches!(phase, VmPhase::Migrating { .. }));
            assert_eq!(r.is_waiting(), r.desired() == PowerState::Running && r.assignment().is_none() && r.parked().is_none());
            assert_eq!(r.parked().is_some(), matches!(phase, VmPhase::Parked { .. }));
            assert!(r.error().is_none() || (r.desired() == PowerState::Stopped && r.assignment().is_none()));
        }
    }
}
