//! The commands that change the desired state (as carried in the consensus log), what applying
//! one reports, and why one is refused.

use super::*;
/// A change to the desired state, as carried in the consensus log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Command {
    AddHost {
        id: HostId,
        name: String,
        api_addr: String,
        heartbeat_addr: String,
        capacity: Capacity,
    },
    /// The host's agent (re)joins: it becomes active in a new epoch.
    HostJoined {
        host: HostId,
    },
    CreateVm {
        spec: VmSpec,
    },
    DeleteVm {
        name: String,
    },
    /// `force`: apply even if admission control refuses (recorded in the result).
    SetPower {
        name: String,
        desired: PowerState,
        #[serde(default)]
        force: bool,
    },
    /// Changes a VM's size, protection or priority (the name stays).
    UpdateVm {
        spec: VmSpec,
        #[serde(default)]
        force: bool,
    },
    SetHostMode {
        host: HostId,
        mode: HostMode,
        #[serde(default)]
        force: bool,
    },
    SetRule {
        rule: Rule,
        #[serde(default)]
        force: bool,
    },
    DeleteRule {
        name: String,
    },
    SetSettings {
        settings: Settings,
        #[serde(default)]
        force: bool,
    },
    /// The coordinator places a running-desired VM that has no assignment.
    Assign {
        name: String,
        host: HostId,
    },
    /// A host releases a VM it has stopped.
    Release {
        name: String,
        host: HostId,
        generation: u64,
    },
    /// The host running `name` in `generation` gave up on it (its start failed, or it crashed,
    /// more often than the host's restart budget allows): it moves to another host, or, after
    /// [`MAX_RELOCATIONS`] moves, enters the error state.
    VmFailed {
        name: String,
        host: HostId,
        generation: u64,
        detail: String,
    },
    /// The host running `name` in `generation` saw it exit for good — the guest powered
    /// itself off, or an unprotected VM crashed — so it is wanted stopped (log format 10).
    /// Unlike an operator's `SetPower`, it applies only while the VM is still assigned there in
    /// that generation: a host reporting from an old view (it rebooted, or was failed over)
    /// must not stop a VM that has since been parked, moved or restarted elsewhere.
    StopExited {
        name: String,
        host: HostId,
        generation: u64,
    },
    /// A host's site, as its own configuration names it (`None`: none); proposed by the host
    /// when committed state says otherwise (log format 11).
    SetHostSite {
        host: HostId,
        #[serde(default)]
        site: Option<String>,
    },
    /// Whether the cluster's Raft has the disk witness as a voter (log format 12): proposed by
    /// the leader once it added or removed the witness, so FTT, what-if and admission count its
    /// vote (it survives any host's loss: the survivor takes it over from the shared disk).
    SetWitness {
        disk: bool,
    },
    /// An operator clears a VM's error state and failure history (it stays stopped).
    ClearVmError {
        name: String,
    },
    /// An operator adds an API token (by its hash).
    SetToken {
        token: ApiToken,
    },
    DeleteToken {
        name: String,
    },
    /// The coordinator lets held VMs (a restart group) start.
    ReleaseHeld {
        names: Vec<String>,
    },
    /// The coordinator's periodic placement retry found no host for a `best-effort` VM left
    /// down by a failover; after [`BEST_EFFORT_RETRIES`] it is stopped.
    CapacityRetry {
        name: String,
    },
    /// The coordinator declares `host` failed in `epoch` and moves its VMs by `plan`.
    Failover {
        host: HostId,
        epoch: u64,
        plan: Vec<(String, HostId)>,
    },
    /// An operator (or maintenance) live-migrates a running VM to `to` (log format 4).
    StartMigration {
        name: String,
        to: HostId,
        #[serde(default)]
        force: bool,
        /// One of the coordinator's maintenance moves, which keeps the VM's home: an
        /// evacuation (the VM remembers its source as its home, unless it has one already) or a
        /// move back home (the home stays until the switchover reaches it, so a move back that
        /// fails is tried again). An operator's migration (false) forgets any home.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        evacuation: bool,
        /// The VM's disks are mirrored between sites and `to` is at another site than its host
        /// (log format 16: an older release moves such a VM only within its site and refused
        /// the entry, so an older host stops at it). Set by the proposer
        /// ([`ClusterState::start_migration_command`](crate::state::ClusterState::start_migration_command));
        /// `apply` refuses an entry that says otherwise than its state.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        across_sites: bool,
    },
    /// The source reports the migration to `generation` complete with the destination still
    /// paused: the destination becomes the owner (log format 4). This commit is the switchover.
    MigrationSwitchover {
        name: String,
        generation: u64,
        /// The destination is the VM's home: it is back, and forgets its home (log format 15;
        /// an older host would keep it, and its coordinator would plan moves its peers do not).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        arrives_home: bool,
    },
    /// The migration to `generation` ends without a switchover; the source keeps the VM
    /// (log format 4).
    MigrationAbort {
        name: String,
        generation: u64,
        reason: String,
    },
    /// `host` stops for a planned stop in `epoch`, its VMs already shut down cleanly: it is
    /// `left` (nobody fails it over) and its VMs are parked with it — started again there when it
    /// rejoins, or released to run elsewhere after `hold_ms` (`None`: never; `Some(0)`: at
    /// once). Proposed by the host itself (log format 6).
    HostLeave {
        host: HostId,
        epoch: u64,
        #[serde(default)]
        hold_ms: Option<u64>,
    },
    /// The coordinator lets the VMs parked with `host` run elsewhere: their hold passed and the
    /// host has not come back (log format 6).
    ReleaseParked {
        host: HostId,
    },
    /// The host running `name` in `generation` has its mirror into `site`'s copy in sync: that
    /// copy is current again (log format 13; see `state::mirror`).
    MirrorSynced {
        name: String,
        generation: u64,
        site: String,
    },
    /// The host running `name` in `generation` lost `site`'s copy: it is stale, and only once
    /// this is committed may the guest's writes complete without it (log format 13).
    MirrorDegraded {
        name: String,
        generation: u64,
        site: String,
    },
    /// The host running `name` in `generation` lost its own site's copy (its storage failed)
    /// and goes on on `site`'s copy, in sync until then: only that copy stays current, and only
    /// once this is committed does the guest, paused meanwhile, go on (log format 14).
    MirrorSwitched {
        name: String,
        generation: u64,
        site: String,
    },
}

impl Command {
    /// Its name in the log (the `op` tag).
    #[must_use]
    pub fn op(&self) -> &'static str {
        match self {
            Command::AddHost { .. } => "add-host",
            Command::HostJoined { .. } => "host-joined",
            Command::CreateVm { .. } => "create-vm",
            Command::HostLeave { .. } => "host-leave",
            Command::ReleaseParked { .. } => "release-parked",
            Command::DeleteVm { .. } => "delete-vm",
            Command::SetPower { .. } => "set-power",
            Command::UpdateVm { .. } => "update-vm",
            Command::SetHostMode { .. } => "set-host-mode",
            Command::SetRule { .. } => "set-rule",
            Command::DeleteRule { .. } => "delete-rule",
            Command::SetSettings { .. } => "set-settings",
            Command::Assign { .. } => "assign",
            Command::Release { .. } => "release",
            Command::VmFailed { .. } => "vm-failed",
            Command::StopExited { .. } => "stop-exited",
            Command::SetHostSite { .. } => "set-host-site",
            Command::SetWitness { .. } => "set-witness",
            Command::ClearVmError { .. } => "clear-vm-error",
            Command::SetToken { .. } => "set-token",
            Command::DeleteToken { .. } => "delete-token",
            Command::ReleaseHeld { .. } => "release-held",
            Command::CapacityRetry { .. } => "capacity-retry",
            Command::Failover { .. } => "failover",
            Command::StartMigration { .. } => "start-migration",
            Command::MigrationSwitchover { .. } => "migration-switchover",
            Command::MigrationAbort { .. } => "migration-abort",
            Command::MirrorSynced { .. } => "mirror-synced",
            Command::MirrorDegraded { .. } => "mirror-degraded",
            Command::MirrorSwitched { .. } => "mirror-switched",
        }
    }

    /// What it names (a VM, host, rule or token), for the timeline.
    #[must_use]
    pub fn subject(&self) -> Option<String> {
        match self {
            Command::AddHost { name, .. }
            | Command::DeleteVm { name }
            | Command::SetPower { name, .. }
            | Command::DeleteRule { name }
            | Command::Assign { name, .. }
            | Command::Release { name, .. }
            | Command::VmFailed { name, .. }
            | Command::StopExited { name, .. }
            | Command::ClearVmError { name }
            | Command::DeleteToken { name }
            | Command::CapacityRetry { name }
            | Command::StartMigration { name, .. }
            | Command::MigrationSwitchover { name, .. }
            | Command::MigrationAbort { name, .. }
            | Command::MirrorSynced { name, .. }
            | Command::MirrorDegraded { name, .. }
            | Command::MirrorSwitched { name, .. } => Some(name.clone()),
            Command::HostJoined { host }
            | Command::SetHostMode { host, .. }
            | Command::Failover { host, .. }
            | Command::HostLeave { host, .. }
            | Command::ReleaseParked { host }
            | Command::SetHostSite { host, .. } => Some(format!("host {}", host.0)),
            Command::CreateVm { spec } | Command::UpdateVm { spec, .. } => Some(spec.name.clone()),
            Command::SetRule { rule, .. } => Some(rule.name.clone()),
            Command::SetToken { token } => Some(token.name.clone()),
            Command::SetSettings { .. } | Command::ReleaseHeld { .. } | Command::SetWitness { .. } => None,
        }
    }

    /// The oldest log format whose hosts understand it: 4 for the live-migration commands, 5
    /// for a VM on a bridge network (`network.mode = "bridge"`), else `None` (any format).
    #[must_use]
    pub fn min_format(&self) -> Option<u32> {
        match self {
            Command::StartMigration { across_sites: true, .. } => Some(crate::logformat::CROSS_SITE_MOVE_FORMAT),
            Command::MigrationSwitchover { arrives_home: true, .. } => Some(crate::logformat::HOME_ARRIVAL_FORMAT),
            Command::StartMigration { .. } | Command::MigrationSwitchover { .. } | Command::MigrationAbort { .. } => Some(crate::logformat::MIGRATION_FORMAT),
            Command::HostLeave { .. } | Command::ReleaseParked { .. } => Some(crate::logformat::LEAVE_FORMAT),
            Command::StopExited { .. } => Some(crate::logformat::EXIT_STOP_FORMAT),
            Command::SetHostSite { .. } => Some(crate::logformat::SITE_FORMAT),
            Command::SetWitness { .. } => Some(crate::logformat::WITNESS_FORMAT),
            Command::MirrorSynced { .. } | Command::MirrorDegraded { .. } => Some(crate::logformat::MIRROR_FORMAT),
            Command::MirrorSwitched { .. } => Some(crate::logformat::MIRROR_SWITCH_FORMAT),
            Command::CreateVm { spec } | Command::UpdateVm { spec, .. } if spec.site_mirrored() => Some(crate::logformat::MIRROR_FORMAT),
            Command::SetSettings { settings, .. } if settings.preferred_site.is_some() => Some(crate::logformat::PREFERRED_SITE_FORMAT),
            Command::SetSettings { settings, .. } if settings.survive_site_loss => Some(crate::logformat::SITE_FORMAT),
            Command::SetRule { rule, .. } if rule.kind == crate::placement::RuleKind::Site => Some(crate::logformat::SITE_FORMAT),
            Command::CreateVm { spec } | Command::UpdateVm { spec, .. } if !spec.postcopy.is_off() => Some(crate::logformat::POSTCOPY_FORMAT),
            Command::CreateVm { spec } | Command::UpdateVm { spec, .. } if matches!(spec.driver, crate::spec::DriverSpec::Qemu { guest_agent: true, .. }) => {
                Some(crate::logformat::GUEST_AGENT_FORMAT)
            }
            Command::CreateVm { spec } | Command::UpdateVm { spec, .. } if spec.disks.iter().any(|d| d.local) => Some(crate::logformat::LOCAL_DISK_FORMAT),
            Command::CreateVm { spec } | Command::UpdateVm { spec, .. } if matches!(spec.network, Some(super::NetworkSpec::Bridge { .. })) => {
                Some(crate::logformat::BRIDGE_FORMAT)
            }
            _ => None,
        }
    }

    /// Whether it overrides admission control.
    #[must_use]
    pub fn forced(&self) -> bool {
        match self {
            Command::SetPower { force, .. }
            | Command::UpdateVm { force, .. }
            | Command::SetHostMode { force, .. }
            | Command::SetRule { force, .. }
            | Command::SetSettings { force, .. }
            | Command::StartMigration { force, .. } => *force,
            _ => false,
        }
    }
}

/// What an applied command returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Applied {
    Done,
    HostEpoch {
        host: HostId,
        epoch: u64,
    },
    Assigned {
        name: String,
        host: HostId,
        generation: u64,
    },
    FailedOver {
        host: HostId,
        moved: Vec<(String, HostId, u64)>,
        left_down: Vec<String>,
    },
    /// A host left for a planned stop; `parked` waited with it (those with a hold of zero wait
    /// for another host at once).
    HostLeft {
        host: HostId,
        parked: Vec<String>,
    },
    /// VMs parked with a host that did not come back may run elsewhere now.
    ParkedReleased {
        host: HostId,
        names: Vec<String>,
    },
    /// A host rejoined: the VMs parked with it run there again (`back`), or wait for another
    /// host where it cannot take them now (`elsewhere`).
    Rejoined {
        host: HostId,
        epoch: u64,
        back: Vec<(String, u64)>,
        elsewhere: Vec<String>,
    },
    /// A change admission control would have refused, applied because it was forced.
    Forced {
        reason: String,
    },
    /// A rule stored; `violations` names running VMs that currently break it (nothing is moved).
    RuleSet {
        violations: Vec<String>,
    },
    /// A failing VM was released from its host to be placed elsewhere.
    Relocating {
        name: String,
        failed_on: Vec<HostId>,
    },
    /// A failing VM ran out of hosts to try: stopped, with the reason.
    VmInError {
        name: String,
        error: String,
    },
    /// A `best-effort` VM still waits for capacity after `attempt` retries.
    StillWaiting {
        name: String,
        attempt: u32,
    },
    /// A `best-effort` VM's retries are spent: stopped.
    GaveUpWaiting {
        name: String,
    },
    /// A live migration began: the VM runs at `from`; `to` receives a paused copy.
    MigrationStarted {
        name: String,
        from: Assignment,
        to: Assignment,
    },
    /// The switchover committed: the VM is assigned to `to`, which resumes it.
    Migrated {
        name: String,
        to: Assignment,
    },
    /// The migration ended without a switchover: the VM stays at its source.
    MigrationAborted {
        name: String,
        reason: String,
    },
}

/// Why a command is refused. The state is unchanged.
#[derive(Debug, Error, PartialEq, Eq, Clone, Serialize, Deserialize)]
pub enum StateError {
    #[error("host {0} already exists")]
    HostExists(String),
    #[error("host id {0} is out of range or already taken")]
    BadHostId(u32),
    #[error("host name '{0}' is not valid")]
    BadHostName(String),
    #[error("site name '{0}' is not valid: 1-63 letters, digits, '-' or '_'")]
    BadSite(String),
    #[error("unknown host {0}")]
    UnknownHost(HostId),
    #[error("unknown VM '{0}'")]
    UnknownVm(String),
    #[error("VM '{0}' has no disk mirrored between sites")]
    NotMirrored(String),
    #[error("VM '{vm}' cannot start on {host}: its site's copy of the VM's mirrored disks is not current (current: {current})")]
    StaleCopy { vm: String, host: HostId, current: String },
    #[error("a VM named '{0}' already exists")]
    VmExists(String),
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("VM '{0}' must be stopped and released by its host before it is deleted")]
    VmNotStopped(String),
    #[error("VM '{0}' is not waiting for placement")]
    NotPlaceable(String),
    #[error("host {0} is not active")]
    HostNotActive(HostId),
    #[error("host {host} lacks capacity for VM '{vm}'")]
    NoCapacity { vm: String, host: HostId },
    #[error("host {host} is in {mode:?} mode and receives no VMs")]
    HostMode { host: HostId, mode: HostMode },
    #[error("placing VM '{vm}' on host {host} breaks hard rule '{rule}'")]
    BreaksHardRule { vm: String, host: HostId, rule: String },
    #[error("stale order: {0}")]
    Stale(String),
    #[error("refused by admission control: {0}; use --force to override")]
    Admission(String),
    #[error("log entry refused: {0}")]
    Unjudged(String),
    #[error("rule '{rule}' cannot be satisfied: {why}")]
    RuleInfeasible { rule: String, why: String },
    #[error("rule '{rule}' conflicts with rule '{other}': {why}")]
    RuleConflict { rule: String, other: String, why: String },
    #[error("unknown rule '{0}'")]
    UnknownRule(String),
    #[error("unknown token '{0}'")]
    UnknownToken(String),
    #[error("token '{0}' already exists")]
    TokenExists(String),
    #[error("invalid token: {0}")]
    BadToken(String),
    #[error("VM '{name}' is in the error state ({error}); clear it first (tandem vm clear {name})")]
    VmInError { name: String, error: String },
    #[error("invalid setting: {0}")]
    BadSetting(String),
    #[error("VM '{name}' cannot be migrated: {why}")]
    NotMigratable { name: String, why: String },
    #[error("VM '{name}' is not migrating to generation {generation}")]
    NotMigrating { name: String, generation: u64 },
    #[error("too many live migrations at once: {0}")]
    MigrationLimit(String),
}
