//! The replicated desired state: hosts, VM specs, and which host each VM is assigned to.
//!
//! Every change is a [`Command`] applied through the consensus log; [`ClusterState::apply`] is
//! deterministic and leaves the state untouched when it refuses a command, so every host that
//! applies the same log holds the same state.

use crate::hostset::{HostId, HostSet};
use crate::placement::{FttReport, Model, PlacementHost, PlacementRule, PlacementVm, RuleKind, DEFAULT_FTT_BUDGET};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

mod admission;
mod specargs;

pub use admission::Admission;
use admission::AdmitMode;
pub use specargs::DISK_FORMATS;

/// CPU and memory a host offers or a VM needs.
// No `deny_unknown_fields` on the types that travel in log entries: an older host must not
// refuse a newer entry over a field it may ignore (a field it must not ignore raises the log
// format, which stops it clearly). API input is checked strictly by the API instead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// What HA does for a VM whose host fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    /// Always restarted, first.
    #[default]
    Protect,
    /// Restarted when its host dies if capacity remains after the protected VMs.
    BestEffort,
    /// Never restarted by HA.
    Off,
}

impl std::str::FromStr for Protection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "protect" => Ok(Protection::Protect),
            "best-effort" => Ok(Protection::BestEffort),
            "off" => Ok(Protection::Off),
            other => Err(format!("protection level '{other}' is not one of protect, best-effort, off")),
        }
    }
}

/// A disk attached to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Path on shared storage, the same on every host.
    pub path: String,
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub readonly: bool,
}

/// A VM's network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum NetworkSpec {
    /// QEMU user-mode networking; `hostfwd` entries like `tcp:{host_ip}:8080-:80`, where
    /// `{host_ip}` becomes the running host's address.
    User {
        #[serde(default)]
        hostfwd: Vec<String>,
    },
    /// A tap device on the host (created and bridged by the host's own setup).
    Tap { ifname: String, mac: Option<String> },
}

/// How the VM's workload is run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DriverSpec {
    /// A QEMU guest, from a kernel (+ initrd + cmdline) or a boot disk.
    Qemu {
        #[serde(default)]
        kernel: Option<String>,
        #[serde(default)]
        initrd: Option<String>,
        #[serde(default)]
        cmdline: Option<String>,
        #[serde(default)]
        extra_args: Vec<String>,
    },
    /// Any command; it runs as long as the "VM" runs.
    Process { command: Vec<String> },
}

/// Everything an operator says about a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub network: Option<NetworkSpec>,
    #[serde(default)]
    pub protection: Protection,
    /// Higher restarts first.
    #[serde(default)]
    pub priority: i32,
    /// Restart order group (0..=[`MAX_RESTART_GROUP`]): after a host failure, a group's VMs start
    /// once every VM of the lower groups runs, or once the group's delay has passed.
    #[serde(default)]
    pub restart_group: u8,
    pub driver: DriverSpec,
}

/// The highest restart order group.
pub const MAX_RESTART_GROUP: u8 = 9;
/// How long a restart group waits for the lower groups by default.
pub const DEFAULT_GROUP_DELAY_MS: u64 = 120_000;
/// The longest delay a restart group may be given.
pub const MAX_GROUP_DELAY_MS: u64 = 3_600_000;
/// Placement retries of a `best-effort` VM that its host's failover left without a host, after
/// which it is stopped; the coordinator spaces them [`BEST_EFFORT_RETRY_INTERVAL_MS`] apart.
pub const BEST_EFFORT_RETRIES: u32 = 3;
pub const BEST_EFFORT_RETRY_INTERVAL_MS: u64 = 10_000;

/// Why a VM spec is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("VM name '{0}' must be 1-63 characters of letters, digits, '-' and '_'")]
    BadName(String),
    #[error("vcpus = {0} is outside 1..=256")]
    BadVcpus(u32),
    #[error("memory_mib = {0} is outside 16..=4194304")]
    BadMemory(u64),
    #[error("process driver needs a non-empty command")]
    EmptyCommand,
    #[error("qemu driver needs a kernel or at least one disk to boot from")]
    NothingToBoot,
    #[error("disk path must be absolute: '{0}'")]
    RelativeDiskPath(String),
    #[error("restart_group = {0} is outside 0..={MAX_RESTART_GROUP}")]
    BadRestartGroup(u8),
    #[error("{field} '{value}' is refused: {why}")]
    BadValue { field: &'static str, value: String, why: &'static str },
}

/// Checks a name used for VMs and hosts.
#[must_use]
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() < 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl VmSpec {
    /// Checks the spec on its own, before it reaches the log.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !valid_name(&self.name) {
            return Err(SpecError::BadName(self.name.clone()));
        }
        if !(1..=256).contains(&self.vcpus) {
            return Err(SpecError::BadVcpus(self.vcpus));
        }
        if !(16..=4 * 1024 * 1024).contains(&self.memory_mib) {
            return Err(SpecError::BadMemory(self.memory_mib));
        }
        if let Some(d) = self.disks.iter().find(|d| !d.path.starts_with('/')) {
            return Err(SpecError::RelativeDiskPath(d.path.clone()));
        }
        if self.restart_group > MAX_RESTART_GROUP {
            return Err(SpecError::BadRestartGroup(self.restart_group));
        }
        match &self.driver {
            DriverSpec::Process { command } if command.is_empty() || command[0].is_empty() => Err(SpecError::EmptyCommand),
            DriverSpec::Qemu { kernel: None, .. } if self.disks.is_empty() => Err(SpecError::NothingToBoot),
            _ => Ok(()),
        }
    }

    /// What the VM takes from its host.
    #[must_use]
    pub fn demand(&self) -> Capacity {
        Capacity { vcpus: self.vcpus, memory_mib: self.memory_mib }
    }
}

/// Where a host stands in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostStatus {
    /// Added, but its agent has not joined yet: nothing is placed on it.
    Joining,
    /// Runs the VMs assigned to it.
    Active,
    /// Declared failed; its VMs were reassigned. It must rejoin before it runs anything.
    Failed,
}

/// What an operator allows on a host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostMode {
    /// Receives VMs.
    #[default]
    Normal,
    /// Planned work: receives no new VMs (it still votes and runs what it has).
    Maintenance,
    /// Taken out of placement until an operator puts it back.
    Disabled,
}

impl std::fmt::Display for HostMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostMode::Normal => "normal",
            HostMode::Maintenance => "maintenance",
            HostMode::Disabled => "disabled",
        })
    }
}

impl std::str::FromStr for HostMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(HostMode::Normal),
            "maintenance" => Ok(HostMode::Maintenance),
            "disabled" => Ok(HostMode::Disabled),
            other => Err(format!("host mode '{other}' is not one of normal, maintenance, disabled")),
        }
    }
}

/// A placement rule as the operator states it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub kind: RuleKind,
    /// Hard rules are never broken (a VM stays down instead); soft ones are preferences.
    #[serde(default)]
    pub hard: bool,
    pub vms: Vec<String>,
}

/// Cluster-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Failures-to-tolerate target that admission control protects; `None`: not enforced.
    pub ftt_target: Option<u32>,
    /// vCPUs a host offers per physical vCPU, in percent (100 = no overcommit).
    pub vcpu_overcommit_pct: u32,
    /// Per restart group: how long it waits for the lower groups to run before it starts anyway
    /// ([`DEFAULT_GROUP_DELAY_MS`] when absent; 0 means it does not wait).
    #[serde(with = "group_keys")]
    pub group_delays_ms: BTreeMap<u8, u64>,
}

/// JSON object keys are strings, and a map with integer keys inside an internally tagged enum
/// (`Command`) does not read back through serde's buffering; so the keys are written and read
/// as strings explicitly, and every command round-trips (see `commands_round_trip`).
mod group_keys {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(map: &BTreeMap<u8, u64>, s: S) -> Result<S::Ok, S::Error> {
        map.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<String, u64>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u8, u64>, D::Error> {
        BTreeMap::<String, u64>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| k.parse::<u8>().map(|k| (k, v)).map_err(|_| D::Error::custom(format!("restart group '{k}' is not 0..=255"))))
            .collect()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings { ftt_target: None, vcpu_overcommit_pct: 100, group_delays_ms: BTreeMap::new() }
    }
}

impl Settings {
    /// How long restart group `group` waits for the lower groups.
    #[must_use]
    pub fn group_delay_ms(&self, group: u8) -> u64 {
        self.group_delays_ms.get(&group).copied().unwrap_or(DEFAULT_GROUP_DELAY_MS)
    }
}

/// A host in the desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: HostId,
    pub name: String,
    /// `ip:port` of its HTTP API (also used for consensus traffic).
    pub api_addr: String,
    /// `ip:port` of its UDP heartbeat socket.
    pub heartbeat_addr: String,
    pub capacity: Capacity,
    pub status: HostStatus,
    /// Raised every time the host (re)joins; a failover names the epoch it ends.
    pub epoch: u64,
    #[serde(default)]
    pub mode: HostMode,
}

/// Desired power state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerState {
    Running,
    Stopped,
}

/// A VM placed on a host. The generation rises at every placement, so a stale order can be told
/// from a current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub host: HostId,
    pub generation: u64,
}

/// A VM in the desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub desired: PowerState,
    pub assignment: Option<Assignment>,
    /// Hosts it kept failing on since an operator last cleared it; placement avoids them.
    #[serde(default)]
    pub failed_on: Vec<HostId>,
    /// Set when it failed on [`MAX_RELOCATIONS`] + 1 hosts: HA stopped trying until an operator
    /// clears it.
    #[serde(default)]
    pub error: Option<String>,
    /// Assigned by a failover but held back: a lower restart group is still starting. Its host
    /// does not start it until the coordinator lets the group go (`ReleaseHeld`).
    #[serde(default)]
    pub held: bool,
    /// A `best-effort` VM its host's failover left without a host: placement retries spent so
    /// far (see [`BEST_EFFORT_RETRIES`]).
    #[serde(default)]
    pub capacity_retries: Option<u32>,
}

/// Hosts a VM that keeps failing to start (or keeps crashing) is moved to, after its own host
/// gave up, before it is put in the error state.
pub const MAX_RELOCATIONS: usize = 2;

/// The whole replicated desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub hosts: BTreeMap<HostId, HostRecord>,
    pub vms: BTreeMap<String, VmRecord>,
    /// The next generation number handed out by a placement.
    pub next_generation: u64,
    #[serde(default)]
    pub rules: BTreeMap<String, Rule>,
    #[serde(default)]
    pub settings: Settings,
    /// API tokens by name (only their SHA-256 is kept).
    #[serde(default)]
    pub tokens: BTreeMap<String, ApiToken>,
    /// Raised by every command applied: an admission verdict names the revision it judged.
    #[serde(default)]
    pub revision: u64,
}

/// What an API token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads and writes.
    Admin,
    /// Reads, and starts, stops and clears VMs; no specs, rules, settings, hosts or tokens.
    Operator,
    /// Reads only (GET).
    ReadOnly,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::ReadOnly => "read-only",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "read-only" => Ok(Role::ReadOnly),
            other => Err(format!("unknown role '{other}': use admin, operator or read-only")),
        }
    }
}

/// A named API token. The token itself is shown once, when it is made; the cluster keeps its
/// SHA-256 only, so a copy of the state or the log gives nobody access.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    /// Lower-case hex SHA-256 of the token.
    pub sha256: String,
}

/// The SHA-256 of a presented token, as stored in [`ApiToken::sha256`].
#[must_use]
pub fn token_sha256(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

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
    #[error("unknown host {0}")]
    UnknownHost(HostId),
    #[error("unknown VM '{0}'")]
    UnknownVm(String),
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
}

impl ClusterState {
    /// The hosts that may run VMs.
    #[must_use]
    pub fn active_hosts(&self) -> HostSet {
        self.hosts.values().filter(|h| h.status == HostStatus::Active).map(|h| h.id).collect()
    }

    /// All hosts (voting members).
    #[must_use]
    pub fn members(&self) -> HostSet {
        self.hosts.keys().copied().collect()
    }

    /// A host's id by name.
    #[must_use]
    pub fn host_by_name(&self, name: &str) -> Option<&HostRecord> {
        self.hosts.values().find(|h| h.name == name)
    }

    /// Resources taken on `host` by the VMs assigned to it.
    #[must_use]
    pub fn used(&self, host: HostId) -> Capacity {
        let mut c = Capacity::default();
        for vm in self.vms.values() {
            if vm.assignment.is_some_and(|a| a.host == host) {
                c.vcpus += vm.spec.vcpus;
                c.memory_mib += vm.spec.memory_mib;
            }
        }
        c
    }

    /// Whether `demand` fits on `host` next to what it already runs (vCPUs with the overcommit
    /// ratio).
    #[must_use]
    pub fn fits(&self, host: HostId, demand: Capacity) -> bool {
        self.fits_with(host, demand, None)
    }

    /// Like [`ClusterState::fits`], not counting VM `except` (which is being resized).
    fn fits_with(&self, host: HostId, demand: Capacity, except: Option<&str>) -> bool {
        let Some(h) = self.hosts.get(&host) else { return false };
        let mut used = self.used(host);
        if let Some(v) = except.and_then(|n| self.vms.get(n)).filter(|v| v.assignment.is_some_and(|a| a.host == host)) {
            used.vcpus -= v.spec.vcpus;
            used.memory_mib -= v.spec.memory_mib;
        }
        let cpu_cap = u64::from(h.capacity.vcpus) * u64::from(self.settings.vcpu_overcommit_pct) / 100;
        u64::from(used.vcpus + demand.vcpus) <= cpu_cap && used.memory_mib + demand.memory_mib <= h.capacity.memory_mib
    }

    /// The placement model of this state. `usable` hosts may receive VMs (also active and in
    /// normal mode); `down` hosts count as failed.
    #[must_use]
    pub fn placement_model(&self, usable: HostSet) -> Model {
        let index: BTreeMap<HostId, u32> = self.hosts.keys().enumerate().map(|(i, h)| (*h, i as u32)).collect();
        let hosts = self
            .hosts
            .values()
            .map(|h| PlacementHost {
                id: h.id,
                mem_mib: h.capacity.memory_mib,
                cpu_milli: u64::from(h.capacity.vcpus) * u64::from(self.settings.vcpu_overcommit_pct) * 10,
                up: h.status == HostStatus::Active,
                usable: h.status == HostStatus::Active && h.mode == HostMode::Normal && usable.contains(h.id),
            })
            .collect();
        let vm_index: BTreeMap<&str, u32> = self.vms.keys().enumerate().map(|(i, n)| (n.as_str(), i as u32)).collect();
        let mut vms: Vec<PlacementVm> = self
            .vms
            .values()
            .map(|v| PlacementVm {
                name: v.spec.name.clone(),
                mem_mib: v.spec.memory_mib,
                cpu_milli: u64::from(v.spec.vcpus) * 1000,
                protection: v.spec.protection,
                priority: v.spec.priority,
                host: v.assignment.and_then(|a| index.get(&a.host).copied()),
                running: v.desired == PowerState::Running,
                rules: Vec::new(),
                avoid: v.failed_on.iter().filter_map(|h| index.get(h).copied()).collect(),
            })
            .collect();
        let rules = self
            .rules
            .values()
            .enumerate()
            .map(|(r, rule)| {
                let members: Vec<u32> = rule.vms.iter().filter_map(|n| vm_index.get(n.as_str()).copied()).collect();
                for m in &members {
                    vms[*m as usize].rules.push(r as u32);
                }
                PlacementRule { name: rule.name.clone(), kind: rule.kind, hard: rule.hard, members }
            })
            .collect();
        Model::new(hosts, vms, rules)
    }

    /// The name and role of the stored token whose hash matches `presented`.
    #[must_use]
    pub fn token_role(&self, presented: &str) -> Option<(&str, Role)> {
        let hash = token_sha256(presented);
        self.tokens.values().find(|t| t.sha256 == hash).map(|t| (t.name.as_str(), t.role))
    }

    /// Failures to tolerate now (every active host counts as usable).
    #[must_use]
    pub fn ftt(&self) -> FttReport {
        self.ftt_model().ftt(DEFAULT_FTT_BUDGET)
    }

    /// The model [`ClusterState::ftt`] searches: built under a lock, searched outside it.
    #[must_use]
    pub fn ftt_model(&self) -> Model {
        self.placement_model(self.members())
    }

    /// A rule must name known VMs, be satisfiable by some placement, and not contradict
    /// another hard rule.
    fn check_rule(&self, rule: &Rule) -> Result<(), StateError> {
        let infeasible = |why: String| Err(StateError::RuleInfeasible { rule: rule.name.clone(), why });
        if !valid_name(&rule.name) {
            return infeasible("its name must be 1-63 letters, digits, '-' or '_'".into());
        }
        let mut vms: Vec<&String> = rule.vms.iter().collect();
        vms.sort();
        vms.dedup();
        if vms.len() < 2 {
            return infeasible("it needs at least two distinct VMs".into());
        }
        if let Some(unknown) = vms.iter().find(|n| !self.vms.contains_key(n.as_str())) {
            return Err(StateError::UnknownVm((*unknown).clone()));
        }
        if rule.hard {
            match rule.kind {
                RuleKind::AntiAffinity => {
                    let hosts = self.hosts.len();
                    if vms.len() > hosts {
                        return infeasible(format!("{} VMs must be on different hosts, but the cluster has {hosts}", vms.len()));
                    }
                }
                RuleKind::Affinity => {
                    let mem: u64 = vms.iter().map(|n| self.vms[n.as_str()].spec.memory_mib).sum();
                    let cpus: u64 = vms.iter().map(|n| u64::from(self.vms[n.as_str()].spec.vcpus)).sum();
                    let fits = self
                        .hosts
                        .values()
                        .any(|h| h.capacity.memory_mib >= mem && u64::from(h.capacity.vcpus) * u64::from(self.settings.vcpu_overcommit_pct) / 100 >= cpus);
                    if !fits {
                        return infeasible(format!("together they need {mem} MiB and {cpus} vCPUs, more than any host has"));
                    }
                }
            }
            for other in self.rules.values().filter(|o| o.hard && o.name != rule.name && o.kind != rule.kind) {
                let shared: Vec<&String> = vms.iter().copied().filter(|v| other.vms.contains(v)).collect();
                if shared.len() >= 2 {
                    return Err(StateError::RuleConflict {
                        rule: rule.name.clone(),
                        other: other.name.clone(),
                        why: format!("{} must be both together and apart", shared.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" and ")),
                    });
                }
            }
        }
        Ok(())
    }

    /// Running VMs whose current hosts break `rule`.
    fn rule_violations(&self, rule: &Rule) -> Vec<String> {
        let placed: Vec<(&String, HostId)> = rule.vms.iter().filter_map(|n| self.vms.get(n).and_then(|v| v.assignment).map(|a| (n, a.host))).collect();
        let mut out = Vec::new();
        for (i, (n, h)) in placed.iter().enumerate() {
            let clash = match rule.kind {
                RuleKind::AntiAffinity => placed.iter().enumerate().any(|(j, (_, g))| j != i && g == h),
                RuleKind::Affinity => placed.first().is_some_and(|(_, g)| g != h),
            };
            if clash {
                out.push((*n).clone());
            }
        }
        out
    }

    /// VMs that should run and have no host: the coordinator's placement queue.
    #[must_use]
    pub fn unplaced(&self) -> Vec<String> {
        self.vms.values().filter(|v| v.desired == PowerState::Running && v.assignment.is_none()).map(|v| v.spec.name.clone()).collect()
    }

    /// VMs assigned to `host`.
    pub fn assigned_to(&self, host: HostId) -> impl Iterator<Item = &VmRecord> {
        self.vms.values().filter(move |v| v.assignment.is_some_and(|a| a.host == host))
    }

    fn next_gen(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    fn vm_mut(&mut self, name: &str) -> Result<&mut VmRecord, StateError> {
        self.vms.get_mut(name).ok_or_else(|| StateError::UnknownVm(name.to_string()))
    }

    /// Applies one command of log format 1 or 2 (admission judged here). On error nothing
    /// changed.
    pub fn apply(&mut self, cmd: &Command) -> Result<Applied, StateError> {
        self.apply_with(cmd, AdmitMode::InApply)
    }

    /// Applies one command, admission as `mode` says; every command applied raises the revision.
    pub(crate) fn apply_with(&mut self, cmd: &Command, mode: AdmitMode<'_>) -> Result<Applied, StateError> {
        let applied = self.apply_command(cmd, mode)?;
        self.assert_placed_within_bounds(&applied);
        self.revision += 1;
        Ok(applied)
    }

    /// Invariants of a placement just applied; a violation is a bug in `apply` (every target
    /// was checked by `check_target`), and committing it would spread it to every host, so it
    /// stops here. A failover leaves nothing assigned to the failed host, and no host a VM was
    /// just placed on holds more memory than it has.
    fn assert_placed_within_bounds(&self, applied: &Applied) {
        let targets: Vec<HostId> = match applied {
            Applied::Assigned { host, .. } => vec![*host],
            Applied::FailedOver { host, moved, .. } => {
                assert!(self.assigned_to(*host).next().is_none(), "a failover of {host} left VMs assigned to it");
                moved.iter().map(|(_, to, _)| *to).collect()
            }
            _ => return,
        };
        for h in targets {
            let (used, capacity) = (self.used(h).memory_mib, self.hosts.get(&h).map_or(0, |r| r.capacity.memory_mib));
            assert!(used <= capacity, "apply placed {used} MiB on {h}, which has {capacity} MiB");
        }
    }

    fn apply_command(&mut self, cmd: &Command, mode: AdmitMode<'_>) -> Result<Applied, StateError> {
        match cmd {
            Command::AddHost { id, name, api_addr, heartbeat_addr, capacity } => {
                if !id.is_valid() || self.hosts.contains_key(id) {
                    return Err(StateError::BadHostId(id.0));
                }
                if !valid_name(name) {
                    return Err(StateError::BadHostName(name.clone()));
                }
                if self.host_by_name(name).is_some() {
                    return Err(StateError::HostExists(name.clone()));
                }
                self.hosts.insert(
                    *id,
                    HostRecord {
                        id: *id,
                        name: name.clone(),
                        api_addr: api_addr.clone(),
                        heartbeat_addr: heartbeat_addr.clone(),
                        capacity: *capacity,
                        status: HostStatus::Joining,
                        epoch: 0,
                        mode: HostMode::Normal,
                    },
                );
                Ok(Applied::Done)
            }
            Command::HostJoined { host } => {
                let h = self.hosts.get_mut(host).ok_or(StateError::UnknownHost(*host))?;
                h.status = HostStatus::Active;
                h.epoch += 1;
                Ok(Applied::HostEpoch { host: *host, epoch: h.epoch })
            }
            Command::CreateVm { spec } => {
                spec.validate().map_err(|e| StateError::InvalidSpec(e.to_string()))?;
                if self.vms.contains_key(&spec.name) {
                    return Err(StateError::VmExists(spec.name.clone()));
                }
                self.vms.insert(
                    spec.name.clone(),
                    VmRecord {
                        spec: spec.clone(),
                        desired: PowerState::Stopped,
                        assignment: None,
                        failed_on: vec![],
                        error: None,
                        held: false,
                        capacity_retries: None,
                    },
                );
                Ok(Applied::Done)
            }
            Command::DeleteVm { name } => {
                let vm = self.vms.get(name).ok_or_else(|| StateError::UnknownVm(name.clone()))?;
                if vm.desired != PowerState::Stopped || vm.assignment.is_some() {
                    return Err(StateError::VmNotStopped(name.clone()));
                }
                self.vms.remove(name);
                Ok(Applied::Done)
            }
            Command::SetPower { name, desired, .. } => {
                if let Some(e) = self.vm_mut(name)?.error.clone().filter(|_| *desired == PowerState::Running) {
                    return Err(StateError::VmInError { name: name.clone(), error: e });
                }
                self.admit(mode, cmd, |s| {
                    if let Some(v) = s.vms.get_mut(name) {
                        v.desired = *desired;
                        // An operator's word ends any wait for capacity.
                        v.capacity_retries = None;
                    }
                    Ok(())
                })
            }
            Command::UpdateVm { spec, .. } => {
                spec.validate().map_err(|e| StateError::InvalidSpec(e.to_string()))?;
                let vm = self.vms.get(&spec.name).ok_or_else(|| StateError::UnknownVm(spec.name.clone()))?;
                if let Some(a) = vm.assignment {
                    if !self.fits_with(a.host, spec.demand(), Some(&spec.name)) {
                        return Err(StateError::NoCapacity { vm: spec.name.clone(), host: a.host });
                    }
                }
                self.admit(mode, cmd, |s| {
                    if let Some(v) = s.vms.get_mut(&spec.name) {
                        v.spec = spec.clone();
                    }
                    Ok(())
                })
            }
            Command::SetHostMode { host, mode: host_mode, .. } => {
                self.hosts.get(host).ok_or(StateError::UnknownHost(*host))?;
                self.admit(mode, cmd, |s| {
                    if let Some(h) = s.hosts.get_mut(host) {
                        h.mode = *host_mode;
                    }
                    Ok(())
                })
            }
            Command::SetRule { rule, .. } => {
                self.check_rule(rule)?;
                let violations = self.rule_violations(rule);
                let applied = self.admit(mode, cmd, |s| {
                    s.rules.insert(rule.name.clone(), rule.clone());
                    Ok(())
                })?;
                Ok(match applied {
                    Applied::Done => Applied::RuleSet { violations },
                    other => other,
                })
            }
            Command::VmFailed { name, host, generation, detail } => {
                let active = self.active_hosts();
                let vm = self.vm_mut(name)?;
                if vm.assignment != Some(Assignment { host: *host, generation: *generation }) {
                    return Err(StateError::Stale(format!("VM '{name}' is not assigned to {host} in generation {generation}")));
                }
                vm.assignment = None;
                vm.held = false;
                if !vm.failed_on.contains(host) {
                    vm.failed_on.push(*host);
                }
                // Out of tries, or out of hosts to try: a small cluster runs out before the budget.
                if vm.failed_on.len() > MAX_RELOCATIONS || active.iter().all(|h| vm.failed_on.contains(&h)) {
                    let hosts: Vec<String> = vm.failed_on.iter().map(ToString::to_string).collect();
                    let error = format!("gave up after failing on hosts {}: {detail}", hosts.join(", "));
                    vm.desired = PowerState::Stopped;
                    vm.error = Some(error.clone());
                    return Ok(Applied::VmInError { name: name.clone(), error });
                }
                Ok(Applied::Relocating { name: name.clone(), failed_on: vm.failed_on.clone() })
            }
            Command::SetToken { token } => {
                if !valid_name(&token.name) {
                    return Err(StateError::BadToken(format!("name '{}' must be 1-63 letters, digits, '-' or '_'", token.name)));
                }
                if token.sha256.len() != 64 || !token.sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
                    return Err(StateError::BadToken("sha256 must be 64 lower-case hex digits".into()));
                }
                if self.tokens.contains_key(&token.name) {
                    return Err(StateError::TokenExists(token.name.clone()));
                }
                self.tokens.insert(token.name.clone(), token.clone());
                Ok(Applied::Done)
            }
            Command::DeleteToken { name } => {
                self.tokens.remove(name).ok_or_else(|| StateError::UnknownToken(name.clone()))?;
                Ok(Applied::Done)
            }
            Command::ReleaseHeld { names } => {
                for name in names {
                    if let Some(vm) = self.vms.get_mut(name) {
                        vm.held = false;
                    }
                }
                Ok(Applied::Done)
            }
            Command::CapacityRetry { name } => {
                let vm = self.vm_mut(name)?;
                let Some(spent) = vm.capacity_retries.filter(|_| vm.assignment.is_none() && vm.desired == PowerState::Running) else {
                    return Err(StateError::Stale(format!("VM '{name}' is not waiting for capacity")));
                };
                let attempt = spent + 1;
                if attempt >= BEST_EFFORT_RETRIES {
                    vm.capacity_retries = None;
                    vm.desired = PowerState::Stopped;
                    return Ok(Applied::GaveUpWaiting { name: name.clone() });
                }
                vm.capacity_retries = Some(attempt);
                Ok(Applied::StillWaiting { name: name.clone(), attempt })
            }
            Command::ClearVmError { name } => {
                let vm = self.vm_mut(name)?;
                vm.error = None;
                vm.failed_on.clear();
                Ok(Applied::Done)
            }
            Command::DeleteRule { name } => {
                self.rules.remove(name).ok_or_else(|| StateError::UnknownRule(name.clone()))?;
                Ok(Applied::Done)
            }
            Command::SetSettings { settings, .. } => {
                if !(100..=1600).contains(&settings.vcpu_overcommit_pct) {
                    return Err(StateError::BadSetting(format!("vcpu_overcommit_pct = {} is outside 100..=1600", settings.vcpu_overcommit_pct)));
                }
                if settings.ftt_target.is_some_and(|t| t as usize >= crate::hostset::MAX_HOSTS) {
                    return Err(StateError::BadSetting("ftt_target is larger than any cluster".into()));
                }
                if let Some((g, d)) = settings.group_delays_ms.iter().find(|(g, d)| **g > MAX_RESTART_GROUP || **d > MAX_GROUP_DELAY_MS) {
                    return Err(StateError::BadSetting(format!(
                        "restart group {g} delay {d} ms: groups are 0..={MAX_RESTART_GROUP}, delays at most {MAX_GROUP_DELAY_MS} ms"
                    )));
                }
                self.admit(mode, cmd, |s| {
                    s.settings = settings.clone();
                    Ok(())
                })
            }
            Command::Assign { name, host } => {
                let vm = self.vms.get(name).ok_or_else(|| StateError::UnknownVm(name.clone()))?;
                if vm.desired != PowerState::Running || vm.assignment.is_some() {
                    return Err(StateError::NotPlaceable(name.clone()));
                }
                let demand = vm.spec.demand();
                self.check_target(name, *host, demand)?;
                let generation = self.next_gen();
                let vm = self.vm_mut(name)?;
                vm.assignment = Some(Assignment { host: *host, generation });
                vm.held = false;
                vm.capacity_retries = None;
                Ok(Applied::Assigned { name: name.clone(), host: *host, generation })
            }
            Command::Release { name, host, generation } => {
                let vm = self.vm_mut(name)?;
                if vm.assignment != Some(Assignment { host: *host, generation: *generation }) {
                    return Err(StateError::Stale(format!("VM '{name}' is not assigned to {host} in generation {generation}")));
                }
                if vm.desired != PowerState::Stopped {
                    return Err(StateError::Stale(format!("VM '{name}' is desired running again")));
                }
                vm.assignment = None;
                vm.held = false;
                Ok(Applied::Done)
            }
            Command::Failover { host, epoch, plan } => self.failover(*host, *epoch, plan),
        }
    }

    /// Whether committed state lets `name` be assigned to `host` now: active, in normal mode,
    /// with room, and no hard rule broken. The proposer planned it on its own copy; this is
    /// checked again on every host, when applied, against the state at that point of the log.
    fn check_target(&self, name: &str, host: HostId, demand: Capacity) -> Result<(), StateError> {
        let h = self.hosts.get(&host).ok_or(StateError::UnknownHost(host))?;
        if h.status != HostStatus::Active {
            return Err(StateError::HostNotActive(host));
        }
        if h.mode != HostMode::Normal {
            return Err(StateError::HostMode { host, mode: h.mode });
        }
        if !self.fits(host, demand) {
            return Err(StateError::NoCapacity { vm: name.to_string(), host });
        }
        if let Some(rule) = self.broken_hard_rule(name, host) {
            return Err(StateError::BreaksHardRule { vm: name.to_string(), host, rule });
        }
        Ok(())
    }

    /// The first hard rule that assigning `name` to `host` would break, given where the other
    /// members of its rules are assigned now.
    fn broken_hard_rule(&self, name: &str, host: HostId) -> Option<String> {
        let placed_on = |vm: &str| self.vms.get(vm).and_then(|v| v.assignment).map(|a| a.host);
        self.rules.values().filter(|r| r.hard && r.vms.iter().any(|v| v == name)).find_map(|r| {
            let others = r.vms.iter().filter(|v| *v != name).filter_map(|v| placed_on(v));
            let broken = match r.kind {
                RuleKind::AntiAffinity => others.into_iter().any(|h| h == host),
                RuleKind::Affinity => others.into_iter().any(|h| h != host),
            };
            broken.then(|| r.name.clone())
        })
    }

    fn failover(&mut self, host: HostId, epoch: u64, plan: &[(String, HostId)]) -> Result<Applied, StateError> {
        let h = self.hosts.get(&host).ok_or(StateError::UnknownHost(host))?;
        if h.status != HostStatus::Active || h.epoch != epoch {
            return Err(StateError::Stale(format!("failover of {host} epoch {epoch}, but the host is {:?} in epoch {}", h.status, h.epoch)));
        }
        if let Some(h) = self.hosts.get_mut(&host) {
            h.status = HostStatus::Failed;
        }
        // Everything on the failed host is released first, so capacity is counted without it.
        let victims: Vec<String> = self.assigned_to(host).map(|v| v.spec.name.clone()).collect();
        for name in &victims {
            if let Some(vm) = self.vms.get_mut(name) {
                vm.assignment = None;
                vm.held = false;
            }
        }
        let mut moved = Vec::new();
        for (name, target) in plan {
            let Some(vm) = self.vms.get(name) else { continue };
            if !victims.contains(name) || vm.desired != PowerState::Running || *target == host {
                continue;
            }
            let demand = vm.spec.demand();
            if self.check_target(name, *target, demand).is_err() {
                continue;
            }
            let generation = self.next_gen();
            if let Some(vm) = self.vms.get_mut(name) {
                vm.assignment = Some(Assignment { host: *target, generation });
            }
            moved.push((name.clone(), *target, generation));
        }
        // Restart order: the lowest group among the moved VMs starts now; the higher ones are
        // held until the coordinator sees the lower groups run (or their delay passes).
        let first_group = moved.iter().filter_map(|(n, _, _)| self.vms.get(n)).map(|v| v.spec.restart_group).min();
        for (name, _, _) in &moved {
            if let Some(vm) = self.vms.get_mut(name) {
                vm.held = first_group.is_some_and(|g| vm.spec.restart_group > g);
            }
        }
        let mut left_down = Vec::new();
        for name in &victims {
            let Some(vm) = self.vms.get_mut(name) else { continue };
            if vm.assignment.is_none() && vm.desired == PowerState::Running {
                left_down.push(name.clone());
                // Protected VMs stay wanted and are placed as soon as capacity appears; best-effort
                // ones wait for a bounded number of retries; `off` ones are stopped.
                match vm.spec.protection {
                    Protection::Protect => {}
                    Protection::BestEffort => vm.capacity_retries = Some(0),
                    Protection::Off => vm.desired = PowerState::Stopped,
                }
            }
        }
        Ok(Applied::FailedOver { host, moved, left_down })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::recovery;

    pub(crate) fn process_vm(name: &str, protection: Protection, priority: i32, mem: u64) -> VmSpec {
        VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib: mem,
            disks: vec![],
            network: None,
            protection,
            priority,
            restart_group: 0,
            driver: DriverSpec::Process { command: vec!["sleep".into(), "1000".into()] },
        }
    }

    pub(crate) fn cluster(hosts: u32, mem: u64) -> ClusterState {
        let mut s = ClusterState::default();
        for i in 0..hosts {
            s.apply(&Command::AddHost {
                id: HostId(i),
                name: format!("h{i}"),
                api_addr: format!("127.0.0.1:{}", 7000 + i),
                heartbeat_addr: format!("127.0.0.1:{}", 7100 + i),
                capacity: Capacity { vcpus: 8, memory_mib: mem },
            })
            .expect("add host");
            s.apply(&Command::HostJoined { host: HostId(i) }).expect("join");
        }
        s
    }

    pub(crate) fn run_on(s: &mut ClusterState, spec: VmSpec, host: u32) {
        let name = spec.name.clone();
        s.apply(&Command::CreateVm { spec }).expect("create");
        s.apply(&Command::SetPower { name: name.clone(), desired: PowerState::Running, force: false }).expect("start");
        s.apply(&Command::Assign { name, host: HostId(host) }).expect("assign");
    }

    /// `Assign` and `Failover` are planned by the proposer on its copy of the state; when they
    /// are applied, host mode and hard rules are checked again, not only capacity (a host put in
    /// maintenance, or a rule added, between the plan and the commit).
    #[test]
    fn assign_and_failover_recheck_host_mode_and_hard_rules_when_applied() {
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 256), 0);
        s.apply(&Command::CreateVm { spec: process_vm("b", Protection::Protect, 0, 256) }).expect("create");
        s.apply(&Command::SetRule {
            rule: Rule { name: "apart".into(), kind: RuleKind::AntiAffinity, hard: true, vms: vec!["a".into(), "b".into()] },
            force: true,
        })
        .expect("rule");
        s.apply(&Command::SetHostMode { host: HostId(2), mode: HostMode::Maintenance, force: true }).expect("mode");
        s.apply(&Command::SetPower { name: "b".into(), desired: PowerState::Running, force: true }).expect("start");
        let before = s.clone();
        assert!(matches!(s.apply(&Command::Assign { name: "b".into(), host: HostId(0) }), Err(StateError::BreaksHardRule { .. })));
        assert!(matches!(s.apply(&Command::Assign { name: "b".into(), host: HostId(2) }), Err(StateError::HostMode { .. })));
        assert_eq!(s, before, "a refused assignment changes nothing");
        s.apply(&Command::Assign { name: "b".into(), host: HostId(1) }).expect("allowed");
        // h1 fails; a stale plan puts b on the maintenance host h2 and... nowhere else fits the rule.
        let epoch = s.hosts[&HostId(1)].epoch;
        match s.apply(&Command::Failover { host: HostId(1), epoch, plan: vec![("b".into(), HostId(2))] }) {
            Ok(Applied::FailedOver { moved, .. }) => assert!(moved.is_empty(), "moved onto a maintenance host: {moved:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.vms["b"].assignment, None, "b waits for a host instead");
        let mut t = before.clone();
        t.apply(&Command::Assign { name: "b".into(), host: HostId(1) }).expect("allowed");
        let epoch = t.hosts[&HostId(1)].epoch;
        match t.apply(&Command::Failover { host: HostId(1), epoch, plan: vec![("b".into(), HostId(0))] }) {
            Ok(Applied::FailedOver { moved, .. }) => assert!(moved.is_empty(), "hard anti-affinity broken by a failover: {moved:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut s = cluster(2, 1024);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 512), 0);
        let before = s.clone();
        let refused = [
            Command::CreateVm { spec: process_vm("a", Protection::Protect, 0, 512) },
            Command::CreateVm { spec: process_vm("bad name!", Protection::Protect, 0, 512) },
            Command::DeleteVm { name: "a".into() },
            Command::DeleteVm { name: "nope".into() },
            Command::Assign { name: "a".into(), host: HostId(1) },
            Command::Release { name: "a".into(), host: HostId(0), generation: 99 },
            Command::Failover { host: HostId(0), epoch: 7, plan: vec![] },
            Command::AddHost { id: HostId(64), name: "x".into(), api_addr: String::new(), heartbeat_addr: String::new(), capacity: Capacity::default() },
            Command::AddHost { id: HostId(5), name: "h0".into(), api_addr: String::new(), heartbeat_addr: String::new(), capacity: Capacity::default() },
            Command::SetPower { name: "ghost".into(), desired: PowerState::Running, force: false },
        ];
        for c in &refused {
            assert!(s.apply(c).is_err(), "{c:?} was accepted");
            assert_eq!(s, before, "{c:?} changed state");
        }
    }

    #[test]
    fn assignment_respects_capacity_and_raises_generation() {
        let mut s = cluster(1, 1024);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 600), 0);
        s.apply(&Command::CreateVm { spec: process_vm("b", Protection::Protect, 0, 600) }).expect("create");
        s.apply(&Command::SetPower { name: "b".into(), desired: PowerState::Running, force: false }).expect("start");
        assert_eq!(s.apply(&Command::Assign { name: "b".into(), host: HostId(0) }), Err(StateError::NoCapacity { vm: "b".into(), host: HostId(0) }));
        let g1 = s.vms["a"].assignment.expect("assigned").generation;
        assert!(g1 >= 1);
    }

    #[test]
    fn stop_release_delete_lifecycle() {
        let mut s = cluster(1, 1024);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 100), 0);
        let gen = s.vms["a"].assignment.expect("assigned").generation;
        s.apply(&Command::SetPower { name: "a".into(), desired: PowerState::Stopped, force: false }).expect("stop");
        assert_eq!(s.apply(&Command::DeleteVm { name: "a".into() }), Err(StateError::VmNotStopped("a".into())));
        s.apply(&Command::Release { name: "a".into(), host: HostId(0), generation: gen }).expect("release");
        s.apply(&Command::DeleteVm { name: "a".into() }).expect("delete");
        assert!(s.vms.is_empty());
    }

    #[test]
    fn a_failing_vm_moves_away_then_enters_the_error_state_until_cleared() {
        let mut s = cluster(4, 2048);
        run_on(&mut s, process_vm("f", Protection::Protect, 0, 64), 0);
        let failed = |s: &mut ClusterState, host: u32| {
            let a = s.vms["f"].assignment.expect("assigned");
            assert_eq!(a.host, HostId(host));
            s.apply(&Command::VmFailed { name: "f".into(), host: a.host, generation: a.generation, detail: "exit 1".into() })
        };
        // A report for a generation it no longer holds is stale and changes nothing.
        let before = s.clone();
        let g = s.vms["f"].assignment.expect("assigned").generation;
        assert!(matches!(
            s.apply(&Command::VmFailed { name: "f".into(), host: HostId(0), generation: g + 1, detail: String::new() }),
            Err(StateError::Stale(_))
        ));
        assert_eq!(s, before);
        // Released and placed elsewhere: placement never picks a host it failed on.
        let mut tried = vec![0];
        for _ in 0..MAX_RELOCATIONS {
            let out = failed(&mut s, *tried.last().expect("one")).expect("relocate");
            assert!(matches!(out, Applied::Relocating { ref failed_on, .. } if failed_on.len() == tried.len()), "{out:?}");
            assert_eq!(s.vms["f"].desired, PowerState::Running);
            let plan = crate::recovery::place(&s, &["f".to_string()], s.active_hosts(), true);
            let (_, next) = plan.placements.first().cloned().expect("placed");
            assert!(!tried.contains(&next.0), "placed again on {next} after failing there");
            s.apply(&Command::Assign { name: "f".into(), host: next }).expect("assign");
            tried.push(next.0);
        }
        let out = failed(&mut s, *tried.last().expect("one")).expect("error");
        assert!(matches!(out, Applied::VmInError { ref error, .. } if error.contains("exit 1")), "{out:?}");
        assert_eq!((s.vms["f"].desired, s.vms["f"].assignment), (PowerState::Stopped, None));
        // Starting is refused until an operator clears it; clearing forgets the history.
        let start = Command::SetPower { name: "f".into(), desired: PowerState::Running, force: false };
        assert!(matches!(s.apply(&start), Err(StateError::VmInError { .. })));
        s.apply(&Command::ClearVmError { name: "f".into() }).expect("clear");
        assert!(s.vms["f"].failed_on.is_empty() && s.vms["f"].error.is_none());
        s.apply(&start).expect("start after clear");
    }

    #[test]
    fn a_small_cluster_runs_out_of_hosts_before_the_relocation_budget() {
        let mut s = cluster(2, 2048);
        run_on(&mut s, process_vm("f", Protection::Protect, 0, 64), 0);
        let g = s.vms["f"].assignment.expect("assigned").generation;
        let out = s.apply(&Command::VmFailed { name: "f".into(), host: HostId(0), generation: g, detail: "x".into() });
        assert!(matches!(out, Ok(Applied::Relocating { .. })), "{out:?}");
        s.apply(&Command::Assign { name: "f".into(), host: HostId(1) }).expect("assign");
        let g = s.vms["f"].assignment.expect("assigned").generation;
        let out = s.apply(&Command::VmFailed { name: "f".into(), host: HostId(1), generation: g, detail: "x".into() });
        assert!(matches!(out, Ok(Applied::VmInError { .. })), "{out:?}");
    }

    /// Every command survives the consensus log's encoding: one that did not would be
    /// committed and then fail to load on every host.
    #[test]
    fn commands_round_trip() {
        let mut settings = Settings::default();
        settings.group_delays_ms.insert(2, 30_000);
        settings.ftt_target = Some(1);
        let spec = process_vm("a", Protection::BestEffort, 3, 64);
        let commands = [
            Command::SetSettings { settings, force: true },
            Command::CreateVm { spec: spec.clone() },
            Command::UpdateVm { spec, force: false },
            Command::SetPower { name: "a".into(), desired: PowerState::Running, force: false },
            Command::SetHostMode { host: HostId(1), mode: HostMode::Maintenance, force: false },
            Command::Assign { name: "a".into(), host: HostId(2) },
            Command::Release { name: "a".into(), host: HostId(2), generation: 9 },
            Command::VmFailed { name: "a".into(), host: HostId(2), generation: 9, detail: "x".into() },
            Command::ClearVmError { name: "a".into() },
            Command::ReleaseHeld { names: vec!["a".into()] },
            Command::CapacityRetry { name: "a".into() },
            Command::Failover { host: HostId(0), epoch: 3, plan: vec![("a".into(), HostId(1))] },
            Command::HostJoined { host: HostId(1) },
            Command::AddHost {
                id: HostId(3),
                name: "h3".into(),
                api_addr: "a:1".into(),
                heartbeat_addr: "a:2".into(),
                capacity: Capacity { vcpus: 4, memory_mib: 512 },
            },
            Command::SetRule {
                rule: Rule { name: "r".into(), kind: crate::placement::RuleKind::AntiAffinity, hard: true, vms: vec!["a".into(), "b".into()] },
                force: false,
            },
            Command::DeleteRule { name: "r".into() },
            Command::DeleteVm { name: "a".into() },
            Command::SetToken { token: ApiToken { name: "ro".into(), role: Role::ReadOnly, sha256: token_sha256("x") } },
            Command::DeleteToken { name: "ro".into() },
        ];
        for c in commands {
            let json = serde_json::to_vec(&c).expect("encode");
            let back: Command = serde_json::from_slice(&json).unwrap_or_else(|e| panic!("{c:?} does not read back: {e}"));
            assert_eq!(back, c);
        }
    }

    #[test]
    fn tokens_are_kept_hashed_and_checked() {
        let mut s = cluster(1, 1024);
        let t = ApiToken { name: "ops".into(), role: Role::ReadOnly, sha256: token_sha256("s3cret-token") };
        s.apply(&Command::SetToken { token: t.clone() }).expect("set");
        assert_eq!(s.token_role("s3cret-token"), Some(("ops", Role::ReadOnly)));
        assert_eq!(s.token_role("s3cret-tokeN"), None);
        assert!(!serde_json::to_string(&s).expect("json").contains("s3cret-token"), "the token itself is never stored");
        assert_eq!(s.apply(&Command::SetToken { token: t }), Err(StateError::TokenExists("ops".into())));
        let bad = ApiToken { name: "x".into(), role: Role::Admin, sha256: "ABC".into() };
        assert!(matches!(s.apply(&Command::SetToken { token: bad }), Err(StateError::BadToken(_))));
        s.apply(&Command::DeleteToken { name: "ops".into() }).expect("delete");
        assert_eq!(s.token_role("s3cret-token"), None);
        assert_eq!(s.apply(&Command::DeleteToken { name: "ops".into() }), Err(StateError::UnknownToken("ops".into())));
    }

    #[test]
    fn failover_needs_the_current_epoch_and_moves_by_plan() {
        let mut s = cluster(3, 2048);
        run_on(&mut s, process_vm("p", Protection::Protect, 0, 512), 0);
        run_on(&mut s, process_vm("b", Protection::BestEffort, 0, 512), 0);
        run_on(&mut s, process_vm("o", Protection::Off, 0, 16), 0);
        let epoch = s.hosts[&HostId(0)].epoch;
        let plan = vec![("p".to_string(), HostId(1)), ("o".to_string(), HostId(0))];
        let out = s.apply(&Command::Failover { host: HostId(0), epoch, plan }).expect("failover");
        let Applied::FailedOver { moved, left_down, .. } = out else { panic!("unexpected {out:?}") };
        assert_eq!(moved.len(), 1);
        assert_eq!(left_down, vec!["b".to_string(), "o".to_string()]);
        assert_eq!(s.vms["p"].assignment.map(|a| a.host), Some(HostId(1)));
        // Best-effort waits for capacity a bounded number of retries; `off` is stopped.
        assert_eq!((s.vms["b"].desired, s.vms["b"].capacity_retries), (PowerState::Running, Some(0)));
        assert_eq!(s.vms["o"].desired, PowerState::Stopped);
        assert_eq!(s.hosts[&HostId(0)].status, HostStatus::Failed);
        // A second failover for the same epoch is stale.
        assert!(matches!(s.apply(&Command::Failover { host: HostId(0), epoch, plan: vec![] }), Err(StateError::Stale(_))));
        // After rejoining, a failover decided on the old epoch is refused.
        s.apply(&Command::HostJoined { host: HostId(0) }).expect("rejoin");
        assert!(matches!(s.apply(&Command::Failover { host: HostId(0), epoch, plan: vec![] }), Err(StateError::Stale(_))));
    }

    #[test]
    fn spec_validation_messages() {
        let mut bad = process_vm("x", Protection::Off, 0, 8);
        assert_eq!(bad.validate(), Err(SpecError::BadMemory(8)));
        bad.memory_mib = 64;
        bad.driver = DriverSpec::Qemu { kernel: None, initrd: None, cmdline: None, extra_args: vec![] };
        assert_eq!(bad.validate(), Err(SpecError::NothingToBoot));
        bad.driver = DriverSpec::Process { command: vec![] };
        assert_eq!(bad.validate(), Err(SpecError::EmptyCommand));
        assert_eq!("bogus".parse::<Protection>().map_err(|e| e.contains("bogus")), Err(true));
    }

    /// Hostile specs: every value that ends up inside a QEMU option is refused when it could
    /// add an option of its own, and an ordinary spec still passes.
    #[test]
    fn hostile_spec_values_are_refused() {
        let qemu = |f: &dyn Fn(&mut VmSpec)| {
            let mut v = process_vm("q", Protection::Protect, 0, 128);
            v.driver = DriverSpec::Qemu { kernel: Some("/srv/vmlinuz".into()), initrd: None, cmdline: Some("console=ttyS0".into()), extra_args: vec![] };
            v.network = Some(NetworkSpec::User { hostfwd: vec!["tcp:{host_ip}:8080-:80".into()] });
            v.disks = vec![DiskSpec { path: "/shared/q.raw".into(), format: Some("raw".into()), readonly: false }];
            f(&mut v);
            v.check_arguments()
        };
        assert_eq!(qemu(&|_| {}), Ok(()));
        type Edit = Box<dyn Fn(&mut VmSpec)>;
        let hostile: Vec<(&str, Edit)> = vec![
            ("hostfwd", Box::new(|v| v.network = Some(NetworkSpec::User { hostfwd: vec!["tcp::1-:2,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh".into()] }))),
            ("hostfwd", Box::new(|v| v.network = Some(NetworkSpec::User { hostfwd: vec!["tcp:1.2.3.4:80-:22:x".into()] }))),
            ("ifname", Box::new(|v| v.network = Some(NetworkSpec::Tap { ifname: "tap0,helper=/bin/sh".into(), mac: None }))),
            ("mac", Box::new(|v| v.network = Some(NetworkSpec::Tap { ifname: "tap0".into(), mac: Some("52:54:00:12:34:56,romfile=/etc/shadow".into()) }))),
            ("disk format", Box::new(|v| v.disks[0].format = Some("raw,driver=vvfat".into()))),
            ("disk path", Box::new(|v| v.disks[0].path = "/shared/../etc/shadow".into())),
            ("disk path", Box::new(|v| v.disks[0].path = "/shared/a\nb".into())),
            ("kernel", Box::new(|v| v.driver = DriverSpec::Qemu { kernel: Some("vmlinuz".into()), initrd: None, cmdline: None, extra_args: vec![] })),
            (
                "cmdline",
                Box::new(|v| v.driver = DriverSpec::Qemu { kernel: Some("/k".into()), initrd: None, cmdline: Some("a\u{0}b".into()), extra_args: vec![] }),
            ),
        ];
        for (field, f) in hostile {
            match qemu(&*f) {
                Err(SpecError::BadValue { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: a hostile value was not refused: {other:?}"),
            }
        }
    }

    /// Three hosts of 2000 MiB with two 600 MiB protected VMs each and an FTT target of 1 (met),
    /// and two commands: starting a 100 MiB VM (fits) and a 700 MiB one (breaks the target).
    pub(crate) fn three_hosts_near_target() -> (ClusterState, Command, Command) {
        let mut s = cluster(3, 2000);
        for i in 0..6u32 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 600), i % 3);
        }
        target(&mut s, 1);
        s.apply(&Command::CreateVm { spec: process_vm("small", Protection::Protect, 0, 100) }).expect("create");
        s.apply(&Command::CreateVm { spec: process_vm("big", Protection::Protect, 0, 700) }).expect("create");
        let start = |name: &str| Command::SetPower { name: name.into(), desired: PowerState::Running, force: false };
        (s, start("small"), start("big"))
    }

    fn target(s: &mut ClusterState, ftt: u32) {
        s.apply(&Command::SetSettings { settings: Settings { ftt_target: Some(ftt), ..s.settings.clone() }, force: false }).expect("target");
    }

    /// Admission control: with a target of one failure, starting a VM that could no longer
    /// restart after some host failure is refused with a message naming the host and the VM,
    /// and nothing changes; `force` applies it and says so.
    #[test]
    fn admission_control_refuses_what_breaks_the_ftt_target() {
        // 3 hosts × 1000 MiB; two 400 MiB VMs per host: any one host's VMs fit on the others.
        let mut s = cluster(3, 1000);
        for i in 0..6u32 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 400), i % 3);
        }
        // Each host has 200 MiB free: losing a host displaces 800 MiB into 400 MiB. FTT is 0.
        assert_eq!(s.ftt().ftt, 0);
        // 3 hosts × 2000 MiB, two 600 MiB VMs each: a failed host's 1200 MiB fit in 800 + 800.
        let mut s = cluster(3, 2000);
        for i in 0..6u32 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 600), i % 3);
        }
        assert_eq!(s.ftt().ftt, 1);
        target(&mut s, 1);
        // 700 MiB more on host 0: if it fails, 700 + 600 + 600 do not fit in 800 + 800.
        s.apply(&Command::CreateVm { spec: process_vm("big", Protection::Protect, 0, 700) }).expect("create (stopped) is free");
        let before = s.clone();
        let err = s.apply(&Command::SetPower { name: "big".into(), desired: PowerState::Running, force: false }).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("starting VM 'big'") && msg.contains("failures-to-tolerate to 0 (target 1)") && msg.contains("--force"), "{msg}");
        assert!(msg.contains("if h") && msg.contains("could not restart"), "{msg}");
        assert_eq!(s, before, "a refusal changes nothing");
        // A bigger size for a running VM, and maintenance of a host, are refused alike.
        let mut grown = s.vms["v0"].spec.clone();
        grown.memory_mib = 1000;
        assert!(matches!(s.apply(&Command::UpdateVm { spec: grown.clone(), force: false }), Err(StateError::Admission(_))));
        assert!(matches!(s.apply(&Command::SetHostMode { host: HostId(2), mode: HostMode::Maintenance, force: false }), Err(StateError::Admission(_))));
        assert_eq!(s, before);
        // Forced: applied, and the result says why it would have been refused.
        let forced = s.apply(&Command::SetPower { name: "big".into(), desired: PowerState::Running, force: true }).expect("forced");
        assert!(matches!(&forced, Applied::Forced { reason } if reason.contains("big")), "{forced:?}");
        // A smaller size is always fine.
        let mut small = s.vms["v1"].spec.clone();
        small.memory_mib = 200;
        assert_eq!(s.apply(&Command::UpdateVm { spec: small, force: false }), Ok(Applied::Done));
    }

    #[test]
    fn rules_are_checked_when_made() {
        let mut s = cluster(3, 4000);
        for i in 0..4u32 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 1000), i % 3);
        }
        let rule = |name: &str, kind, hard, vms: &[&str]| Command::SetRule {
            rule: Rule { name: name.into(), kind, hard, vms: vms.iter().map(|v| v.to_string()).collect() },
            force: false,
        };
        // v0 and v3 share host 0: the rule is stored and the violation reported.
        assert_eq!(s.apply(&rule("apart", RuleKind::AntiAffinity, true, &["v0", "v3"])), Ok(Applied::RuleSet { violations: vec!["v0".into(), "v3".into()] }));
        let conflict = s.apply(&rule("together", RuleKind::Affinity, true, &["v3", "v0", "v1"])).expect_err("conflict");
        assert!(conflict.to_string().contains("must be both together and apart"), "{conflict}");
        let too_many = s.apply(&rule("spread", RuleKind::AntiAffinity, true, &["v0", "v1", "v2", "v3"])).expect_err("4 VMs, 3 hosts");
        assert!(matches!(too_many, StateError::RuleInfeasible { .. }), "{too_many}");
        s.apply(&Command::CreateVm { spec: process_vm("huge", Protection::Protect, 0, 3500) }).expect("create");
        let heavy = s.apply(&rule("heavy", RuleKind::Affinity, true, &["huge", "v1"])).expect_err("4500 MiB > 4000");
        assert!(heavy.to_string().contains("more than any host has"), "{heavy}");
        assert_eq!(s.apply(&rule("ghost", RuleKind::Affinity, false, &["v1", "nope"])), Err(StateError::UnknownVm("nope".into())));
        // Soft rules never conflict.
        assert!(matches!(s.apply(&rule("near", RuleKind::Affinity, false, &["v0", "v3"])), Ok(Applied::RuleSet { .. })));
        assert_eq!(s.apply(&Command::DeleteRule { name: "nope".into() }), Err(StateError::UnknownRule("nope".into())));
        // A hard anti-affinity rule now keeps v1 off v2's host when host 1 fails.
        s.apply(&rule("v1-v2", RuleKind::AntiAffinity, true, &["v1", "v2"])).expect("rule");
        let plan = recovery::plan_failover(&s, HostId(1), s.active_hosts());
        assert_eq!(plan.placements, vec![("v1".to_string(), HostId(0))]);
    }

    #[test]
    fn vcpu_overcommit_is_counted() {
        let mut s = cluster(1, 100_000);
        let mut spec = process_vm("wide", Protection::Protect, 0, 100);
        spec.vcpus = 12;
        s.apply(&Command::CreateVm { spec }).expect("create");
        assert!(!s.fits(HostId(0), Capacity { vcpus: 12, memory_mib: 100 }), "8 vCPUs at 100 %");
        s.apply(&Command::SetSettings { settings: Settings { vcpu_overcommit_pct: 200, ..s.settings.clone() }, force: false }).expect("200 %");
        assert!(s.fits(HostId(0), Capacity { vcpus: 12, memory_mib: 100 }));
        assert!(s.apply(&Command::SetSettings { settings: Settings { vcpu_overcommit_pct: 50, ..s.settings.clone() }, force: false }).is_err());
    }
}
