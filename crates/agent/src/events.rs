//! The event timeline: every HA decision and VM transition with its reason, kept in a bounded
//! ring for the API and appended to `events.jsonl` in the data directory.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Events kept in memory.
pub const EVENT_RING: usize = 4096;
/// `events.jsonl` is rotated to `events.jsonl.1` (replacing the previous one) past this size.
pub const EVENT_FILE_MAX: u64 = 64 << 20;
/// At start, the tail of `events.jsonl` read back into the ring (a few thousand events fit).
pub const RELOAD_BYTES: u64 = 4 << 20;

/// One recorded event.
/// What an event is about. Serialized as its kebab-case name (`peer-dead`, `vm-started`, ...),
/// which is what the API, the CLI's filters and the timeline file carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    AdmissionForced,
    AgentStarted,
    AgentStopping,
    ApiChange,
    ClusterInitialized,
    /// The heartbeat disk's path in use failed and the next one took over.
    DiskPathChanged,
    ConsensusStopped,
    EpochLost,
    FailoverCommitted,
    FailoverDecided,
    FenceConfirmed,
    Fenced,
    HostAdded,
    /// A host left for a planned stop with its VMs parked.
    HostLeft,
    /// A host's site changed in committed state (as its configuration names it).
    HostSite,
    Joined,
    MigrationAborted,
    MigrationCompleted,
    MigrationStarted,
    /// A mirrored disk's copy at another site stopped answering: the guest's writes wait until
    /// that copy is committed as stale (an alert).
    MirrorHolding,
    /// A mirrored disk runs on its site's copy alone, the other committed as stale (an alert).
    MirrorDegraded,
    /// A mirror started copying what the other site's copy lacks (all of it, or what it missed).
    MirrorResyncing,
    /// A mirrored disk's copy at another site is in sync again, and committed as current.
    MirrorInSync,
    /// A mirrored disk's own site's storage failed and the disk went on on the other site's
    /// copy, in the same QEMU process (an alert: this site's copy is stale now).
    StoragePathSwitched,
    /// A mirrored disk's own site's storage failed while the other copy was not in sync: the
    /// guest stays paused (an alert); or the copy it runs on is lost too, or its storage hung
    /// past `hung_storage_restart_s`: the VM is killed and given up, to start where a copy is
    /// current.
    StoragePathLost,
    /// A switched disk's own site's storage answers again: mirroring back into its copy.
    StoragePathReturning,
    /// A running mirrored disk's own site's storage does not answer a read at all (an alert:
    /// the guest's requests to it wait); or, past `hung_storage_switch_ms`, the disk was cut
    /// from it to go on on the other copy.
    StoragePathHung,
    /// That storage answers again.
    StoragePathResponsive,
    /// A switched disk runs on its own site's copy again, mirrored into the other.
    StoragePathRestored,
    /// The VMs parked with a host that did not come back were released to run elsewhere.
    ParkedReleased,
    PeerAlive,
    PeerDead,
    PeerPartitioned,
    PeerUnknown,
    RestartGroupReleased,
    TokenCreated,
    TokenRevoked,
    VmAnswering,
    VmAssigned,
    VmCrashed,
    VmError,
    VmErrorCleared,
    VmExited,
    VmKilled,
    VmLeftDown,
    VmNotAnswering,
    VmReassigned,
    VmRelocating,
    VmResumed,
    VmStartFailed,
    VmStarted,
    VmWaiting,
    /// This host opened the disk witness's node (it holds the witness).
    WitnessHeld,
    /// This host closed the disk witness's node (it fenced, or stops).
    WitnessReleased,
    /// The leader made the disk witness a voter, or removed it.
    WitnessVoter,
    /// The witness's region (on the shared disk, or kept by a network witness) stopped
    /// answering this host: a warning — the hosts still hear each other, but the cluster has
    /// no third vote until it answers again.
    WitnessUnreachable,
    /// The witness's region answers this host again.
    WitnessReachable,
    /// A kind this release does not know (read back from an older or newer timeline file).
    #[serde(other)]
    Unknown,
}

impl EventKind {
    /// The kebab-case name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AdmissionForced => "admission-forced",
            EventKind::AgentStarted => "agent-started",
            EventKind::AgentStopping => "agent-stopping",
            EventKind::ApiChange => "api-change",
            EventKind::ClusterInitialized => "cluster-initialized",
            EventKind::DiskPathChanged => "disk-path-changed",
            EventKind::ConsensusStopped => "consensus-stopped",
            EventKind::EpochLost => "epoch-lost",
            EventKind::FailoverCommitted => "failover-committed",
            EventKind::FailoverDecided => "failover-decided",
            EventKind::FenceConfirmed => "fence-confirmed",
            EventKind::Fenced => "fenced",
            EventKind::HostAdded => "host-added",
            EventKind::HostSite => "host-site",
            EventKind::HostLeft => "host-left",
            EventKind::Joined => "joined",
            EventKind::MigrationAborted => "migration-aborted",
            EventKind::MigrationCompleted => "migration-completed",
            EventKind::MigrationStarted => "migration-started",
            EventKind::MirrorHolding => "mirror-holding",
            EventKind::MirrorDegraded => "mirror-degraded",
            EventKind::MirrorResyncing => "mirror-resyncing",
            EventKind::MirrorInSync => "mirror-in-sync",
            EventKind::StoragePathSwitched => "storage-path-switched",
            EventKind::StoragePathLost => "storage-path-lost",
            EventKind::StoragePathHung => "storage-path-hung",
            EventKind::StoragePathResponsive => "storage-path-responsive",
            EventKind::StoragePathReturning => "storage-path-returning",
            EventKind::StoragePathRestored => "storage-path-restored",
            EventKind::ParkedReleased => "parked-released",
            EventKind::PeerAlive => "peer-alive",
            EventKind::PeerDead => "peer-dead",
            EventKind::PeerPartitioned => "peer-partitioned",
            EventKind::PeerUnknown => "peer-unknown",
            EventKind::RestartGroupReleased => "restart-group-released",
            EventKind::TokenCreated => "token-created",
            EventKind::TokenRevoked => "token-revoked",
            EventKind::VmAnswering => "vm-answering",
            EventKind::VmAssigned => "vm-assigned",
            EventKind::VmCrashed => "vm-crashed",
            EventKind::VmError => "vm-error",
            EventKind::VmErrorCleared => "vm-error-cleared",
            EventKind::VmExited => "vm-exited",
            EventKind::VmKilled => "vm-killed",
            EventKind::VmLeftDown => "vm-left-down",
            EventKind::VmNotAnswering => "vm-not-answering",
            EventKind::VmReassigned => "vm-reassigned",
            EventKind::VmRelocating => "vm-relocating",
            EventKind::VmResumed => "vm-resumed",
            EventKind::VmStartFailed => "vm-start-failed",
            EventKind::VmStarted => "vm-started",
            EventKind::VmWaiting => "vm-waiting",
            EventKind::WitnessHeld => "witness-held",
            EventKind::WitnessReleased => "witness-released",
            EventKind::WitnessVoter => "witness-voter",
            EventKind::WitnessUnreachable => "witness-unreachable",
            EventKind::WitnessReachable => "witness-reachable",
            EventKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Event {
    /// Position in this agent's timeline.
    pub seq: u64,
    /// Wall-clock milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The host that recorded it.
    pub host: String,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub detail: String,
    /// On a `failover-committed` event: the failover's measured phases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverRecord>,
    /// On a `mirror-in-sync` event after a resync by chunk sums: what crossed the link and what
    /// matched the other copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<tandem_drivers::copyrelay::DeltaStats>,
}

/// The measured phases of one failover, recorded with its `failover-committed` event by the
/// coordinator that committed it, so that an operator sees where the seconds went. Every time
/// is wall-clock milliseconds since the Unix epoch, converted from that coordinator's own clock
/// (the liveness times are its view of the failed host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FailoverRecord {
    /// The failed host.
    pub host: String,
    pub epoch: u64,
    /// Why it was failed over: `dead`, `reported-fenced` or `coordinator-fenced`.
    pub reason: String,
    /// The latest evidence of the host's life the coordinator could vouch for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_evidence_ms: Option<u64>,
    /// When the coordinator first saw it dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_dead_ms: Option<u64>,
    /// When the host had certainly killed its VMs, if it still ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_deadline_ms: Option<u64>,
    /// When the coordinator decided and proposed the failover.
    pub decided_ms: u64,
    /// When the failover was committed.
    pub committed_ms: u64,
    /// Each VM restarted elsewhere: where, and at which generation.
    pub moved: Vec<MovedVm>,
    /// VMs left down (no capacity, or their protection does not allow a restart).
    pub left_down: Vec<String>,
}

/// One VM a failover moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MovedVm {
    pub vm: String,
    /// The host it was assigned to.
    pub to: String,
    pub generation: u64,
}

struct Inner {
    ring: VecDeque<Event>,
    next: u64,
    file: Option<std::fs::File>,
    path: PathBuf,
    written: u64,
}

/// Whether the file's last byte is not a newline (a write cut short).
fn ends_torn(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    let mut last = [0u8; 1];
    f.seek(SeekFrom::End(-1)).is_ok() && f.read_exact(&mut last).is_ok() && last[0] != b'\n'
}

/// The last events of a previous run, from the end of the file.
fn reload(path: &Path) -> VecDeque<Event> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return VecDeque::new() };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(RELOAD_BYTES);
    let mut text = String::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(RELOAD_BYTES).read_to_string(&mut text).is_err() {
        return VecDeque::new();
    }
    // From the middle of the file, the first line is partial; a torn last line does not parse.
    let lines = text.lines().skip(usize::from(start > 0));
    let mut ring: VecDeque<Event> = lines.filter_map(|l| serde_json::from_str(l).ok()).collect();
    while ring.len() > EVENT_RING {
        ring.pop_front();
    }
    ring
}

/// This agent's timeline.
pub struct EventLog {
    host: String,
    inner: Mutex<Inner>,
}

impl EventLog {
    /// A timeline that also appends to `dir/events.jsonl` (when it can be opened), starting
    /// with the last events recorded there before a restart, numbered on from them.
    #[must_use]
    pub fn new(host: &str, dir: &Path) -> EventLog {
        let path = dir.join("events.jsonl");
        let ring = reload(&path);
        let next = ring.back().map_or(1, |e| e.seq + 1);
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).ok();
        if ends_torn(&path) {
            // A line cut short by a crash: end it, so the next event starts a line of its own.
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f);
            }
        }
        let written = file.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
        EventLog { host: host.to_string(), inner: Mutex::new(Inner { ring, next, file, path, written }) }
    }

    /// Records an event.
    pub fn record(&self, kind: EventKind, vm: Option<&str>, subject: Option<&str>, detail: impl Into<String>) {
        self.record_with(kind, vm, subject, detail.into(), None, None);
    }

    /// Records a mirror in sync after a resync by chunk sums, with its figures.
    pub fn record_resync(&self, vm: &str, site: &str, detail: String, resync: tandem_drivers::copyrelay::DeltaStats) {
        self.record_with(EventKind::MirrorInSync, Some(vm), Some(site), detail, None, Some(resync));
    }

    /// Records a committed failover with its phases.
    pub fn record_failover(&self, record: FailoverRecord, detail: String) {
        let host = record.host.clone();
        self.record_with(EventKind::FailoverCommitted, None, Some(&host), detail, Some(record), None);
    }

    fn record_with(
        &self,
        kind: EventKind,
        vm: Option<&str>,
        subject: Option<&str>,
        detail: String,
        failover: Option<FailoverRecord>,
        resync: Option<tandem_drivers::copyrelay::DeltaStats>,
    ) {
        tracing::info!(kind = kind.as_str(), vm, subject, "{detail}");
        let mut i = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = Event {
            seq: i.next,
            at_ms: tandem_drivers::wall_ms(),
            host: self.host.clone(),
            kind,
            vm: vm.map(str::to_string),
            subject: subject.map(str::to_string),
            detail,
            failover,
            resync,
        };
        i.next += 1;
        if i.written > EVENT_FILE_MAX {
            // Bounded on disk too: one previous file is kept.
            let _ = std::fs::rename(&i.path, i.path.with_extension("jsonl.1"));
            i.file = std::fs::OpenOptions::new().create(true).append(true).open(&i.path).ok();
            i.written = 0;
        }
        if let Ok(line) = serde_json::to_string(&e) {
            if let Some(f) = i.file.as_mut() {
                if writeln!(f, "{line}").is_ok() {
                    i.written += line.len() as u64 + 1;
                }
            }
        }
        if i.ring.len() == EVENT_RING {
            i.ring.pop_front();
        }
        i.ring.push_back(e);
    }

    /// Events with `seq > after`, oldest first, at most `limit`.
    #[must_use]
    pub fn since(&self, after: u64, limit: usize) -> Vec<Event> {
        let i = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        i.ring.iter().filter(|e| e.seq > after).take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_agent_keeps_its_timeline_and_numbers_on() {
        let dir = std::env::temp_dir().join(format!("tandem-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = EventLog::new("h0", &dir);
        for i in 0..3 {
            log.record(EventKind::PeerDead, None, Some("h1"), format!("event {i}"));
        }
        drop(log);
        // A torn last line (power loss mid-write) is skipped, not fatal.
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("events.jsonl")).expect("open");
        write!(f, "{{\"seq\": 4, \"at_").expect("write");
        drop(f);
        let log = EventLog::new("h0", &dir);
        let before: Vec<String> = log.since(0, 10).into_iter().map(|e| e.detail).collect();
        assert_eq!(before, ["event 0", "event 1", "event 2"]);
        log.record(EventKind::Fenced, None, None, "after restart");
        assert_eq!(log.since(3, 10).into_iter().map(|e| e.seq).collect::<Vec<_>>(), [4]);
        drop(log);
        let log = EventLog::new("h0", &dir);
        assert_eq!(log.since(0, 10).len(), 4, "the event after the torn line survives a restart too");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Kinds travel as their kebab-case names; a kind this release does not know (a newer
    /// release's timeline) reads back as `unknown` instead of losing the event.
    #[test]
    fn event_kinds_are_kebab_case_and_unknown_ones_still_read() {
        assert_eq!(serde_json::to_value(EventKind::FailoverCommitted).ok(), Some(serde_json::json!("failover-committed")));
        assert_eq!(EventKind::VmStartFailed.as_str(), "vm-start-failed");
        let newer: Event =
            serde_json::from_str("{\"seq\":1,\"at_ms\":0,\"host\":\"h0\",\"kind\":\"replication-started\",\"vm\":null,\"subject\":null,\"detail\":\"x\"}")
                .expect("reads");
        assert_eq!(newer.kind, EventKind::Unknown);
    }
}
