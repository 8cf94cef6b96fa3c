//! The fault vocabulary shared by the two backends that inject faults: the deterministic
//! simulator (`tandem-lab sim`, this crate) and the real fault suite (`tandem-lab chaos`, in the
//! lab). A fault has one name wherever it appears — a trace, a report, `--only` — and says which
//! backend can inject it, so that a kind added to one is visibly missing from the other.

use std::fmt;

/// Where a fault kind can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The simulated world: network, heartbeat disk, clocks, hypervisor.
    Sim,
    /// Real agents in network namespaces: nftables, signals, the FUSE heartbeat disk.
    Chaos,
}

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// A host cut off from every other host, both directions.
    PartitionFull,
    /// A host's outgoing traffic dropped; it still hears the others.
    PartitionOneWay,
    /// Two hosts lose each other; each still reaches the rest.
    PartitionPair,
    /// A guest powers itself off on a follower as the follower is cut off.
    GuestShutdownInPartition,
    /// One datagram in three lost (the real suite drops heartbeat datagrams with nftables).
    MessageLoss,
    /// Duplicated and delayed messages.
    DuplicationAndDelay,
    /// One host's path to the heartbeat disk fails with I/O errors.
    DiskErrorOne,
    /// One host's heartbeat disk I/O hangs, and completes late.
    DiskHangOne,
    /// Every host's heartbeat disk fails at once.
    DiskErrorAll,
    /// One host's "shared" disk is in fact a private copy.
    DiskPrivateOne,
    /// One host can write its slot but read nothing.
    DiskWriteOnlyOne,
    /// A host and its VMs lose power, and boot again later.
    PowerLoss,
    /// The consensus leader loses power.
    LeaderLoss,
    /// A host crashes and boots again at once.
    CrashRestart,
    /// The agent alone is killed (kill -9); it is started again.
    AgentKill,
    /// One workload (QEMU or process) is killed (kill -9).
    WorkloadKill,
    /// A host's clock runs fast or slow.
    ClockDrift,
    /// A host's clock jumps forward within the configured margin.
    ClockJump,
    /// A whole host (agent and workloads) stops and resumes later, as under SIGSTOP.
    HostFreeze,
    /// A whole host paused for less than its watchdog timeout and its lease: a hiccup, after
    /// which nothing may have changed.
    HostHiccup,
    /// The agent stalls while its workloads run on.
    AgentStall,
    /// The liveness thread alone is starved while the host is cut off.
    LivenessStallInPartition,
    /// A new host joins the running cluster.
    HostJoin,
    /// Operator commands: create, stop, start, delete VMs.
    Operator,
    /// A live migration, alone or with a fault at a random phase: cancelled, the source's or
    /// the destination's power lost, the link between them cut, the leader's power lost.
    LiveMigration,
    /// A host enters maintenance (its VMs leave by live migration) and leaves it again (they
    /// come back).
    MaintenanceCycle,
    /// A host's planned stop under a drawn policy (kill, migrate, shutdown, freeze), its agent
    /// stopped as systemd stops it, then started again.
    PlannedStop,
    /// Every host of one site loses power at once (drawn only when the hosts have sites).
    SitePowerLoss,
    /// The link between two sites is cut: no host of one hears any host of the other (drawn
    /// only when the hosts have sites).
    SiteLinkCut,
    /// The link between two hosts cut while one of them loses its path to the shared disk
    /// (drawn only in two-host clusters with a disk witness).
    LinkCutDiskLost,
    /// Two hosts with a witness: the witness's region alone stops answering every host for a
    /// while (a network witness down, the heartbeat disk still fine): nothing may fence or move.
    WitnessLoss,
    /// One site's storage fails every request for a while (its hosts and network fine): VMs
    /// running there go on on another site's copy of their mirrored disks, without a restart,
    /// and come back to it after; copies it serves are lost to their mirrors. Drawn only on
    /// request (`--only`), so that no seed of the other kinds draws otherwise.
    SiteStorageLoss,
    /// One site's storage answers no request at all for a while (long enough to pass the
    /// agents' `hung_storage_restart_s`): disks running there whose other copy is in sync are
    /// cut from their local copy servers and switch to it, a way back writing into it is cut
    /// and given up (in odd seeds, copies opened directly: those VMs start again where their
    /// other copy is); the others wait. Drawn only on request (`--only`).
    SiteStorageHang,
    /// The link between two sites fails one way: no host of one site reaches any host of the
    /// other, which still reaches it (a half-broken inter-site line). Drawn only on request
    /// (`--only`), like the storage loss, so that the recorded seeds of sites draw as before.
    SiteLinkOneWay,
    /// A host cut off from everything, then a heal that reaches it unevenly: everything comes
    /// back but its heartbeats to the others, which follow up to most of a peer timeout later
    /// — and in half the runs, before they do, another host is cut off from everything. Drawn
    /// only on request (`--only`), so that the recorded seeds draw as before.
    PartitionUnevenHeal,
}

use Backend::{Chaos, Sim};
use FaultKind::*;

impl FaultKind {
    /// Every kind, in the order the simulator draws from (changing it changes every seed).
    pub const ALL: [FaultKind; 35] = [
        PartitionFull,
        PartitionOneWay,
        PartitionPair,
        GuestShutdownInPartition,
        MessageLoss,
        DuplicationAndDelay,
        DiskErrorOne,
        DiskHangOne,
        DiskErrorAll,
        DiskPrivateOne,
        DiskWriteOnlyOne,
        PowerLoss,
        LeaderLoss,
        CrashRestart,
        ClockDrift,
        ClockJump,
        HostFreeze,
        AgentStall,
        LivenessStallInPartition,
        HostJoin,
        Operator,
        AgentKill,
        WorkloadKill,
        HostHiccup,
        LiveMigration,
        MaintenanceCycle,
        PlannedStop,
        SitePowerLoss,
        SiteLinkCut,
        LinkCutDiskLost,
        WitnessLoss,
        SiteStorageLoss,
        SiteLinkOneWay,
        PartitionUnevenHeal,
        SiteStorageHang,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PartitionFull => "partition-full",
            PartitionOneWay => "partition-one-way",
            PartitionPair => "partition-pair",
            GuestShutdownInPartition => "guest-shutdown-in-partition",
            MessageLoss => "message-loss",
            DuplicationAndDelay => "duplication-and-delay",
            DiskErrorOne => "disk-error-one",
            DiskHangOne => "disk-hang-one",
            DiskErrorAll => "disk-error-all",
            DiskPrivateOne => "disk-private-one",
            DiskWriteOnlyOne => "disk-write-only-one",
            PowerLoss => "power-loss",
            LeaderLoss => "leader-loss",
            CrashRestart => "crash-restart",
            AgentKill => "agent-kill",
            WorkloadKill => "workload-kill",
            ClockDrift => "clock-drift",
            ClockJump => "clock-jump",
            HostFreeze => "host-freeze",
            HostHiccup => "host-hiccup",
            AgentStall => "agent-stall",
            LivenessStallInPartition => "liveness-stall-in-partition",
            HostJoin => "host-join",
            Operator => "operator",
            LiveMigration => "live-migration",
            MaintenanceCycle => "maintenance-cycle",
            PlannedStop => "planned-stop",
            SitePowerLoss => "site-power-loss",
            SiteLinkCut => "site-link-cut",
            LinkCutDiskLost => "link-cut-disk-lost",
            WitnessLoss => "witness-loss",
            SiteStorageLoss => "site-storage-loss",
            SiteStorageHang => "site-storage-hang",
            SiteLinkOneWay => "site-link-one-way",
            PartitionUnevenHeal => "partition-uneven-heal",
        }
    }

    /// Whether it needs hosts in sites (drawn only then).
    pub fn needs_sites(self) -> bool {
        matches!(self, SitePowerLoss | SiteLinkCut | SiteStorageLoss | SiteStorageHang | SiteLinkOneWay)
    }

    /// Whether it is drawn only when asked for (`--only`), never by the default draw.
    pub fn on_request_only(self) -> bool {
        matches!(self, SiteStorageLoss | SiteStorageHang | SiteLinkOneWay | PartitionUnevenHeal)
    }

    /// Whether it is drawn only in two-host clusters with a disk witness.
    pub fn needs_witness(self) -> bool {
        matches!(self, LinkCutDiskLost | WitnessLoss)
    }

    /// The backends that can inject this kind.
    pub fn backends(self) -> &'static [Backend] {
        match self {
            PartitionFull | PartitionOneWay | PartitionPair | MessageLoss | DiskErrorOne | DiskHangOne | PowerLoss | LeaderLoss | HostFreeze => &[Sim, Chaos],
            // A real agent cannot be killed without its workloads in the simulator's model (its
            // VMs are rows of the world, not children), and the simulator's host freeze draws
            // its length across the watchdog bound (short freezes are its hiccups).
            AgentKill | WorkloadKill | HostHiccup => &[Chaos],
            GuestShutdownInPartition
            | DuplicationAndDelay
            | DiskErrorAll
            | DiskPrivateOne
            | DiskWriteOnlyOne
            | CrashRestart
            | ClockDrift
            | ClockJump
            | AgentStall
            | LivenessStallInPartition
            | HostJoin
            | Operator
            | LinkCutDiskLost
            | SiteStorageLoss
            | SiteStorageHang => &[Sim],
            // The fault suite injects it only with `--only` too.
            PartitionUnevenHeal => &[Sim, Chaos],
            // Drawn only where the hosts have sites (`--sites` of either backend).
            SitePowerLoss | SiteLinkCut | SiteLinkOneWay => &[Sim, Chaos],
            // The simulator's witness region stops answering; the fault suite kills the
            // network witness (`--witness network`).
            WitnessLoss => &[Sim, Chaos],
            // The fault suite draws the operation and its fault its own way (real agents, real
            // QEMU): a migration faulted at a random instant, a maintenance cycle, a planned stop
            // per policy.
            LiveMigration | MaintenanceCycle | PlannedStop => &[Sim, Chaos],
        }
    }

    /// The kinds one backend injects, in drawing order.
    pub fn of(backend: Backend) -> impl Iterator<Item = FaultKind> {
        Self::ALL.into_iter().filter(move |k| k.backends().contains(&backend))
    }

    /// The kind with this name.
    pub fn parse(name: &str) -> Option<FaultKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn names_are_unique_and_parse_back() {
        let names: BTreeSet<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), FaultKind::ALL.len());
        for k in FaultKind::ALL {
            assert_eq!(FaultKind::parse(k.name()), Some(k));
            assert!(!k.backends().is_empty(), "{k} is injected nowhere");
        }
        assert_eq!(FaultKind::parse("no-such-fault"), None);
    }

    #[test]
    fn the_simulator_keeps_its_drawing_order() {
        // The first 21 kinds are the simulator's, in the order its seeds were recorded with;
        // the planned-operation kinds came later and are drawn after them. (A new kind still
        // changes what an old seed draws — the choice is among all kinds — but never the
        // meaning of `--only`, which the regression seeds use.)
        // The site kinds are drawn only by runs whose hosts have sites, so the other seeds
        // draw as before.
        let sim: Vec<FaultKind> = crate::fault_kinds();
        assert_eq!(sim.len(), 24);
        assert_eq!(sim[..21].to_vec(), FaultKind::ALL[..21].to_vec());
        assert_eq!(sim[21..].to_vec(), vec![LiveMigration, MaintenanceCycle, PlannedStop]);
        assert_eq!(crate::fault_kinds_with_sites()[24..].to_vec(), vec![SitePowerLoss, SiteLinkCut]);
        assert_eq!(FaultKind::of(Backend::Chaos).count(), 20);
    }
}
