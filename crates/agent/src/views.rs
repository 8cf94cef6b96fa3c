//! Every request and response body of the agent's API, defined once.
//!
//! The server builds and parses these; the CLI, the laboratory (demo, fault suite, benchmarks),
//! the simulator and the dashboard's JSON read them; the OpenAPI document's schemas are
//! generated from them (`endpoints`), so a client can be generated and a fuzzer can send valid
//! bodies. Types the API shares with committed state (`VmSpec`, `Rule`, `Settings`, ...) are
//! re-exported from `tandem-core` rather than copied.
//!
//! Architecture invariant (API boundary): a body crosses the API only as one of these types; a
//! field added here is documented by the OpenAPI drift test and read by every client at once.

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

mod rebalance;
mod shutdown;
pub use rebalance::{RebalanceMoveView, RebalanceView, UnfixableView};
pub use shutdown::{ShutdownAsked, ShutdownRequest};

pub use crate::agent::RuntimeStatus;
pub use crate::consensus::ConsensusStatus;
pub use crate::events::{Event, EventKind, FailoverRecord, MovedVm};
pub use tandem_core::liveness::RejectCounters;
pub use tandem_core::placement::{FttLimit, FttReport, RuleKind};
pub use tandem_core::recovery::LeftDown;
pub use tandem_core::state::{Capacity, HostMode, HostStatus, PowerState, Protection, Role, Rule, Settings, VmSpec};
pub use tandem_drivers::VmStatus;

// ---------------------------------------------------------------- responses: reads

/// `GET /v1/status`: this agent.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct StatusView {
    pub host: String,
    pub host_id: u32,
    /// Changes at every start of the agent process.
    pub incarnation: u64,
    /// The workload driver this host runs (`qemu`, `process`, `mixed`).
    pub driver: String,
    pub runtime: RuntimeStatus,
    pub consensus: ConsensusStatus,
    pub rejected: RejectCounters,
}

/// `GET /v1/identity`: who this host is (also what a joining host proves).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Identity {
    pub host_id: u32,
    pub name: String,
    pub api_addr: String,
    pub heartbeat_addr: String,
    pub capacity: Capacity,
}

/// How this agent sees a host now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LivenessView {
    /// The answering host itself.
    #[serde(rename = "self")]
    Itself,
    /// The answering host itself, fenced.
    #[serde(rename = "fenced(self)")]
    FencedItself,
    #[serde(rename = "alive")]
    Alive,
    #[serde(rename = "partitioned")]
    Partitioned,
    #[serde(rename = "dead")]
    Dead,
    #[serde(rename = "unknown")]
    Unknown,
}

impl LivenessView {
    pub fn as_str(self) -> &'static str {
        match self {
            LivenessView::Itself => "self",
            LivenessView::FencedItself => "fenced(self)",
            LivenessView::Alive => "alive",
            LivenessView::Partitioned => "partitioned",
            LivenessView::Dead => "dead",
            LivenessView::Unknown => "unknown",
        }
    }
}

/// `GET /v1/hosts`: one host with its status, capacity use and liveness as seen by this agent.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct HostView {
    pub id: u32,
    pub name: String,
    pub api_addr: String,
    pub status: HostStatus,
    pub epoch: u64,
    pub capacity: Capacity,
    pub used: Capacity,
    pub liveness: LivenessView,
    pub net_age_ms: Option<u64>,
    pub disk_age_ms: Option<u64>,
    /// Milliseconds until the fence deadline of a host declared dead (negative: passed).
    pub fence_deadline_in_ms: Option<i64>,
    pub fenced_epoch: Option<u64>,
    pub leader: bool,
    /// normal, maintenance (its VMs leave live, it receives none) or disabled.
    #[serde(default)]
    pub mode: HostMode,
    /// The site its configuration names.
    #[serde(default)]
    pub site: Option<String>,
}

/// `GET /v1/vms`: one VM with its desired state, placement and HA state.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct VmView {
    pub name: String,
    pub protection: Protection,
    pub priority: i32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub desired: PowerState,
    pub host: Option<String>,
    pub host_api: Option<String>,
    pub generation: Option<u64>,
    /// Set when HA gave up on it after failures on several hosts.
    pub error: Option<String>,
    pub failed_on: Vec<String>,
    /// Assigned after a failover but held until its restart group may start.
    pub held: bool,
    /// A best-effort VM waiting for room after a failover: retries spent.
    pub capacity_retries: Option<u32>,
    /// Desired running but placed nowhere: why no host takes it now.
    pub waiting: Option<String>,
    /// The host it is live-migrating to (it still runs on `host` until the switchover).
    #[serde(default)]
    pub migrating_to: Option<String>,
    /// The host a maintenance evacuation moved it from; it returns there when that host leaves
    /// maintenance.
    #[serde(default)]
    pub home: Option<String>,
    /// For a VM with a writable local disk: the host with that disk's latest copy, the only one
    /// it starts on (none before it first ran).
    #[serde(default)]
    pub disk_host: Option<String>,
    /// For a VM with disks mirrored between sites: the sites whose copies hold every write the
    /// guest acknowledged — where it may start (every site before it first ran).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<String>,
    pub spec: VmSpec,
}

impl VmView {
    /// The host it must run on now: its host when desired running, else none.
    #[must_use]
    pub fn should_run_on(&self) -> Option<&str> {
        if self.desired == PowerState::Running {
            self.host.as_deref()
        } else {
            None
        }
    }
}

/// `GET /v1/ftt`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct FttView {
    pub report: FttReport,
    /// The target admission control protects; none: not enforced.
    pub target: Option<u32>,
    /// The loss of each whole site (hosts with a `site`), in name order.
    #[serde(default)]
    pub sites: Vec<SiteLossView>,
    /// Whether admission control protects the target "survive one site".
    #[serde(default)]
    pub survive_site_loss: bool,
}

/// What the loss of one whole site would do (`GET /v1/ftt`).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SiteLossView {
    pub site: String,
    pub hosts: Vec<String>,
    /// Whether the hosts left would still be a majority of the voting hosts.
    pub quorum: bool,
    /// Every protected VM of the site would run again elsewhere.
    pub survived: bool,
    /// The protected VMs that would stay down.
    pub protected_down: Vec<StaysDown>,
}

/// `GET /v1/plan`: what one failure set would do.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct FailurePlan {
    /// The hosts failing together.
    pub failed: Vec<String>,
    /// Whether a consensus majority would be left (without one, nothing restarts).
    pub quorum: bool,
    pub note: Option<String>,
    pub restarts: Vec<PlannedRestart>,
    pub left_down: Vec<StaysDown>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct PlannedRestart {
    pub vm: String,
    pub host: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct StaysDown {
    pub vm: String,
    pub reason: LeftDown,
}

/// `GET /v1/tokens`: a token's name and role (never the token).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct TokenView {
    pub name: String,
    pub role: Role,
}

/// `GET /v1/local`: the workloads this host's driver runs now.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct LocalView {
    pub host: String,
    pub vms: Vec<VmStatus>,
    /// The site mirrors of the VMs running here: one per mirrored disk, into one other site's copy.
    #[serde(default)]
    pub mirrors: Vec<MirrorLinkView>,
}

/// `tandem vm mirrors NAME` (assembled by the CLI): committed state's current copies and the
/// running host's mirrors of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MirrorsView {
    pub vm: String,
    pub host: Option<String>,
    /// The sites whose copies are current (empty: it has not run yet).
    pub copies: Vec<String>,
    pub links: Vec<MirrorLinkView>,
}

/// One disk's mirror into another site's copy, at the host running the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MirrorLinkView {
    pub vm: String,
    /// The disk's index in the VM's spec.
    pub disk: usize,
    /// The site whose copy it is.
    pub site: String,
    /// The host of that site serving the copy.
    pub server: String,
    #[serde(flatten)]
    pub state: tandem_core::mirroring::LinkState,
    /// While it resyncs by chunk sums: the writes that crossed the link so far, and those
    /// answered because the copy held them already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compared: Option<tandem_drivers::copyrelay::DeltaStats>,
    /// The cap on the mirror's own copying, MiB/s (`[mirror] resync_max_mib_s` of the host
    /// running the VM); none: uncapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_cap_mib_s: Option<u64>,
    /// While it resyncs (or copies back, on the way back): its pace since it began and the time
    /// left at that pace, once it has run a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pace: Option<ResyncPaceView>,
}

/// A resync's pace: KiB/s since it began, and seconds left at that pace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ResyncPaceView {
    pub kib_s: u64,
    pub left_s: u64,
}

/// `GET /v1/join-proof`: a host's identity with proof that it holds the cluster secret.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct JoinProof {
    /// The identity as JSON text: the MAC covers these exact bytes.
    pub identity: String,
    pub proof: String,
}

/// Every refusal: what was wrong, in words.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub error: String,
}

// ---------------------------------------------------------------- responses: writes

/// What admission control said about an accepted change.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
pub struct AdmissionNote {
    /// The change broke the FTT target and went through because it was forced; why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced: Option<String>,
    /// A stored rule that running VMs break now (nothing is moved): those VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violations: Option<Vec<String>>,
}

/// `POST /v1/cluster/init`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Initialized {
    pub initialized: bool,
    pub host: String,
}

/// `POST /v1/hosts/join`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Joined {
    pub joined: String,
    pub host_id: u32,
}

/// `POST /v1/hosts/{name}/mode`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct HostModeSet {
    pub host: String,
    pub mode: HostMode,
    #[serde(flatten)]
    pub admission: AdmissionNote,
}

/// `POST /v1/vms`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Created {
    pub created: String,
}

/// `DELETE /v1/vms/{name}`, `DELETE /v1/rules/{name}`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Deleted {
    pub deleted: String,
}

/// `POST /v1/vms/{name}/start`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Starting {
    pub starting: String,
    #[serde(flatten)]
    pub admission: AdmissionNote,
}

/// `POST /v1/vms/{name}/stop`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Stopping {
    pub stopping: String,
}

/// `POST /v1/vms/{name}/clear`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Cleared {
    pub cleared: String,
}

/// `PUT /v1/vms/{name}`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Updated {
    pub updated: String,
    #[serde(flatten)]
    pub admission: AdmissionNote,
}

/// `POST /v1/settings`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SettingsSet {
    pub settings: Settings,
    #[serde(flatten)]
    pub admission: AdmissionNote,
}

/// `POST /v1/rules`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct RuleAdded {
    pub rule: String,
    #[serde(flatten)]
    pub admission: AdmissionNote,
}

/// `POST /v1/tokens`: the token, shown this once.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct NewToken {
    pub name: String,
    pub role: Role,
    pub token: String,
}

/// `DELETE /v1/tokens/{name}`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Revoked {
    pub revoked: String,
}

// ---------------------------------------------------------------- requests

/// A body that carries nothing (`{}`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

/// `{"force": true}` overrides admission control (recorded as an event; admin only).
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceRequest {
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/hosts/join`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The joining agent's API address (ip:port).
    pub api_addr: String,
}

/// `POST /v1/hosts/{name}/mode`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostModeRequest {
    pub mode: HostMode,
    #[serde(default)]
    pub force: bool,
}

/// `PUT /v1/vms/{name}`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVmRequest {
    pub spec: VmSpec,
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/settings`: only the fields given change.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsRequest {
    /// A number, or null to stop enforcing a target; absent: unchanged.
    #[serde(default, deserialize_with = "present_or_null", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<u32>")]
    pub ftt_target: Option<Option<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_overcommit_pct: Option<u32>,
    /// Per restart group (0-9, as a string key): its delay in ms, or null for the default.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(with = "BTreeMap<String, Option<u64>>")]
    pub group_delays_ms: BTreeMap<u8, Option<u64>>,
    /// The cluster's planned-stop policy, or null for each host's own; absent: unchanged.
    #[serde(default, deserialize_with = "present_or_null", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<tandem_core::state::ShutdownPolicy>")]
    pub shutdown_policy: Option<Option<tandem_core::state::ShutdownPolicy>>,
    /// The target "survive the loss of one site"; absent: unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub survive_site_loss: Option<bool>,
    /// The site a split without a majority keeps (a host must be there), or null for none;
    /// absent: unchanged.
    #[serde(default, deserialize_with = "present_or_null", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub preferred_site: Option<Option<String>>,
    #[serde(default)]
    pub force: bool,
}

/// A present field is `Some`, even when null (`Some(None)`), so that "absent" and "null" differ.
fn present_or_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `POST /v1/rules`: the rule's fields, and `force`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleRequest {
    pub name: String,
    pub kind: RuleKind,
    /// Hard rules are never broken (a VM stays down instead); soft ones are preferences.
    #[serde(default)]
    pub hard: bool,
    pub vms: Vec<String>,
    /// The site of a `site` rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default)]
    pub force: bool,
}

impl RuleRequest {
    /// The rule to store.
    #[must_use]
    pub fn rule(&self) -> Rule {
        Rule { name: self.name.clone(), kind: self.kind, hard: self.hard, vms: self.vms.clone(), site: self.site.clone() }
    }
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub name: String,
    pub role: Role,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_names_round_trip() {
        for l in [LivenessView::Itself, LivenessView::FencedItself, LivenessView::Alive, LivenessView::Partitioned, LivenessView::Dead, LivenessView::Unknown] {
            let json = serde_json::to_value(l).expect("serializes");
            assert_eq!(json, serde_json::json!(l.as_str()));
            assert_eq!(serde_json::from_value::<LivenessView>(json).expect("reads back"), l);
        }
    }

    #[test]
    fn settings_request_tells_absent_from_null() {
        let absent: SettingsRequest = serde_json::from_str("{}").expect("parses");
        assert_eq!(absent.ftt_target, None);
        let null: SettingsRequest = serde_json::from_str(r#"{"ftt_target": null}"#).expect("parses");
        assert_eq!(null.ftt_target, Some(None));
        let two: SettingsRequest = serde_json::from_str(r#"{"ftt_target": 2, "group_delays_ms": {"3": null}}"#).expect("parses");
        assert_eq!((two.ftt_target, two.group_delays_ms.get(&3)), (Some(Some(2)), Some(&None)));
        assert!(serde_json::from_str::<SettingsRequest>(r#"{"fft_target": 1}"#).is_err(), "a misspelt field is refused");
    }

    #[test]
    fn admission_notes_flatten_into_the_answer() {
        let s = Starting { starting: "web0".into(), admission: AdmissionNote { forced: Some("why".into()), violations: None } };
        assert_eq!(serde_json::to_value(&s).expect("serializes"), serde_json::json!({ "starting": "web0", "forced": "why" }));
        let back: Starting = serde_json::from_value(serde_json::json!({ "starting": "web0" })).expect("reads back");
        assert!(back.admission.forced.is_none());
    }
}

/// `GET /v1/failovers`: one committed failover with its measured phases, and when each VM it
/// moved started on its new host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FailoverView {
    /// The host whose coordinator committed it (its clock stamped the phases).
    pub recorded_by: String,
    #[serde(flatten)]
    pub record: FailoverRecord,
    /// Each moved VM's first start on its new host (that host's clock), if recorded yet.
    pub starts: Vec<VmStartView>,
}

/// When one VM a failover moved started on its new host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmStartView {
    pub vm: String,
    pub host: String,
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// When its service first answered its probe after that start (that host's clock); only
    /// for a VM whose spec names a probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answering_ms: Option<u64>,
}

/// `POST /v1/vms/{name}/migrate`: where to (a host name; omitted: the host with the most free
/// memory that may take it), and whether to override admission control (admin only).
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/vms/{name}/migrate`: the migration committed to begin.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct MigrationBegun {
    pub name: String,
    pub from: String,
    pub to: String,
    /// The generation the VM has at the destination once the switchover commits.
    pub generation: u64,
    /// The source's API address: it drives the migration and reports its progress.
    pub source_api: String,
    #[serde(flatten)]
    pub admission: AdmissionNote,
}

/// `DELETE /v1/vms/{name}/migrate`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct MigrationCancelled {
    pub cancelled: String,
}

/// One migration in progress.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct MigrationView {
    pub name: String,
    pub from: String,
    pub to: String,
    pub generation: u64,
    /// preparing, copying, switching over, or (post-copy, committed) sending the last pages;
    /// `None` when another host (`from`) drives it.
    pub phase: Option<String>,
    pub progress: Option<tandem_drivers::migration::MigrationProgress>,
}

/// How a migration this host drove ended.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct MigrationOutcome {
    pub name: String,
    pub generation: u64,
    pub from: String,
    pub to: String,
    /// `completed` (the VM runs at `to`), `aborted` (it runs on at `from`, or was stopped or
    /// failed over meanwhile) or `lost` (post-copy: committed at `to`, but the last pages never
    /// arrived; `to` restarts it from its disk).
    pub result: String,
    pub reason: Option<String>,
    pub report: Option<tandem_drivers::migration::MigrationReport>,
    pub finished_at_ms: u64,
}

/// `GET /v1/migrations`: the migrations committed state has running (progress for those this
/// host drives), and the last ones this host drove.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct MigrationsView {
    pub host: String,
    pub active: Vec<MigrationView>,
    pub recent: Vec<MigrationOutcome>,
}

/// `POST /v1/internal/copies` (the host running a site-mirrored VM to a host of another site):
/// serve that site's copy of one of its disks.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    pub name: String,
    /// The generation the VM runs in at the asking host (committed state must agree).
    pub generation: u64,
    /// The disk's index in the VM's spec.
    pub disk: usize,
    /// Its virtual size: a copy missing at this site is created empty of this size.
    pub bytes: u64,
}

/// The answer to a [`CopyRequest`]: where this site's copy is served.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyEndpoint {
    /// The copy server's `host:port` (NBD).
    pub address: String,
    /// The export's name.
    pub export: String,
}

/// `POST /v1/internal/incoming` (source to destination): prepare the paused copy.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    pub name: String,
    pub generation: u64,
    /// The local disks that come with it (each created empty at the destination, then mirrored
    /// into it): every writable local disk of the VM's spec, with its size.
    #[serde(default)]
    pub local_disks: Vec<tandem_drivers::diskcopy::LocalDiskSize>,
    /// The parallel memory channels the source will send over (QEMU multifd; 0: one stream):
    /// the destination listens with as many.
    #[serde(default)]
    pub multifd_channels: u8,
}

/// Where the destination listens for the migration stream (and its local disks): the driver's
/// own answer, passed on as it is.
pub use tandem_drivers::diskcopy::IncomingEndpoint;

/// One VM of a host's evacuation plan: where it would go, or why it cannot move live.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct EvacuationStep {
    pub vm: String,
    pub to: Option<String>,
    pub why_not: Option<String>,
    /// Live migrations of it off this host that did not complete, when the coordinator gave
    /// up on moving it live (only the leader, which counts them, says so). Such a VM can still
    /// be shut down and started elsewhere (`maintenance enter --shutdown-unmovable`).
    #[serde(default)]
    pub live_failed: Option<u32>,
}

/// `GET /v1/hosts/{name}/evacuation`: where each of the host's VMs would go if it entered
/// maintenance now (in the order they would leave; at most two at once leave one host).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct EvacuationPlan {
    pub host: String,
    pub steps: Vec<EvacuationStep>,
    /// VMs whose home is this host, away from it, that the coordinator gave up moving back
    /// (their live migrations back did not complete; only the leader says so): each with where
    /// it stays (`to`) and why.
    #[serde(default)]
    pub not_coming_back: Vec<EvacuationStep>,
}
