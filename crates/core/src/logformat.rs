//! The consensus log's entry format, versioned.
//!
//! Every entry carries the format version it was written in next to the command, kept as JSON
//! until it is applied. So an agent always loads its whole log (an entry it cannot decode is
//! still a well-formed entry), and when it reaches one that is newer than it understands, or
//! that does not decode, it says so and stops applying — it never skips an entry, which would
//! leave its state different from the other hosts'.
//!
//! Format 1 is the bare command of releases before versioning (read, never written); format 2
//! wraps it: `{"format": 2, "command": {"op": ...}}`. Format 3 adds the proposer's admission
//! verdict, `"admission": {"revision": R, "forced": ...}`: admission control (an FTT search whose
//! answer may change between releases) is judged once, by the proposer, on the state at revision
//! R, and `apply` only checks that the state is still at R — so hosts of different releases
//! apply it to the same result. Entries of format 2 and 1 keep their old meaning (admission
//! judged inside `apply`). Format 4 adds the live-migration commands (`start-migration`,
//! `migration-switchover`, `migration-abort`); only those entries are written in it. Format 5
//! adds the `bridge` network mode of a VM spec (in `create-vm` and `update-vm`); only entries
//! whose spec uses it are written in it, so an older host stops at such an entry and says
//! "upgrade" instead of failing to decode a spec. Format 6 adds a host's planned stop with its
//! VMs parked (`host-leave`, `release-parked`). Format 7 adds a VM spec's local disks (`local = true`:
//! on each host's own storage, copied by live migration, never restarted elsewhere by HA); only
//! entries whose spec has one are written in it — an older host would read such a spec as a
//! shared disk. Format 8 adds a QEMU spec's `guest_agent` (a guest-agent channel among the VM's
//! devices); only entries whose spec asks for it are written in it. Format 9 adds a VM spec's
//! `postcopy` (a migration may switch to post-copy; an older host would ignore the field and
//! its destination would not be ready for it). Format 10 adds `stop-exited` (a VM that exited
//! for good is stopped only if still assigned where it exited; an older host has only the
//! unconditional `set-power`). Format 11 adds sites: `set-host-site`, and settings with the
//! `survive_site_loss` target (an older host would judge admission without it). Format 12 adds
//! `set-witness` (the disk witness's vote; an older host would count quorums without it). Format
//! 13 adds disks mirrored between sites: a spec with one, and `mirror-synced`/`mirror-degraded`,
//! which keep which sites' copies are current. Format 14 adds the settings' preferred site
//! (which side a split without a majority keeps) and `mirror-switched` (a VM whose site's
//! storage failed goes on on another site's copy). Format 15 adds a switchover's `arrives_home`: a
//! move back home keeps the VM's home until the switchover that reaches it, which forgets it (it
//! was forgotten when the move began, so a move back that failed left the VM away for good). Format 16
//! adds a live move of a VM with mirrored disks to another site (`start-migration` with
//! `across_sites`: an older host refused such a move — only within the site — and would not
//! start the migration its peers run). A release that adds a command or a field that older hosts would
//! misread raises [`LOG_FORMAT`], and writes the new format only for entries that need it: an
//! entry without a verdict is still written in format 2.

use crate::state::{Admission, Command};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The newest entry format this release reads and the one it writes.
pub const LOG_FORMAT: u32 = 16;
/// The format of the live-migration commands: a host of format 3 would not know them, and stops
/// at the first one with a clear error (upgrade it) rather than misread it.
pub(crate) const MIGRATION_FORMAT: u32 = 4;
/// The format of a VM spec on a bridge network.
pub(crate) const BRIDGE_FORMAT: u32 = 5;
/// The format of a host's planned stop with parked VMs (`host-leave`, `release-parked`).
pub(crate) const LEAVE_FORMAT: u32 = 6;
/// The format of a VM spec with a local disk.
pub(crate) const LOCAL_DISK_FORMAT: u32 = 7;
/// The format of a VM spec whose guest runs the QEMU guest agent (its channel changes the
/// VM's devices: a host that ignored the field would start a copy no migration could reach).
pub(crate) const GUEST_AGENT_FORMAT: u32 = 8;
/// The format of a VM spec that lets its migrations switch to post-copy.
pub(crate) const POSTCOPY_FORMAT: u32 = 9;
/// The format of `stop-exited`, the stop a host proposes for a VM that exited there.
pub(crate) const EXIT_STOP_FORMAT: u32 = 10;
/// The format of a host's site and of the "survive one site" target.
pub(crate) const SITE_FORMAT: u32 = 11;
/// The disk witness's vote in committed state.
pub(crate) const WITNESS_FORMAT: u32 = 12;
/// Disks mirrored between sites: a spec with one (an older host would take its relative path
/// for a shared one), and the copies' state (`mirror-synced`, `mirror-degraded`).
pub(crate) const MIRROR_FORMAT: u32 = 13;
/// Settings with a preferred site: an older host would leave it out of its partition verdict
/// and keep another side than its peers.
pub(crate) const PREFERRED_SITE_FORMAT: u32 = 14;
/// `mirror-switched`, a storage path failover (the same release as the preferred site).
pub(crate) const MIRROR_SWITCH_FORMAT: u32 = 14;
/// A switchover that brings a VM back home, which forgets its home there.
pub(crate) const HOME_ARRIVAL_FORMAT: u32 = 15;
/// A live move of a VM with mirrored disks to another site.
pub(crate) const CROSS_SITE_MOVE_FORMAT: u32 = 16;
/// The format of an entry that carries no admission verdict (older hosts still read it).
const PLAIN_FORMAT: u32 = 2;

/// One log entry's payload: the format it was written in and its command, still undecoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogEntry {
    pub format: u32,
    pub command: serde_json::Value,
    /// The proposer's admission verdict (format 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission: Option<serde_json::Value>,
}

/// Why an entry cannot be applied by this release.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum LogFormatError {
    #[error("log entry written in format {found}; this agent reads formats up to {LOG_FORMAT}: upgrade it before it can follow the cluster")]
    Newer { found: u32 },
    #[error("log entry of format {format} does not decode as a command this agent knows: {detail}")]
    Undecodable { format: u32, detail: String },
    #[error("command does not survive the log's encoding: {0}")]
    Unencodable(String),
}

impl<'de> Deserialize<'de> for LogEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let versioned = v
            .as_object()
            .filter(|o| o.contains_key("command") && o.keys().all(|k| matches!(k.as_str(), "format" | "command" | "admission")))
            .and_then(|o| o.get("format")?.as_u64());
        Ok(match versioned {
            Some(format) => {
                LogEntry { format: u32::try_from(format).unwrap_or(u32::MAX), command: v["command"].clone(), admission: v.get("admission").cloned() }
            }
            // Written before entries were versioned: a bare command.
            None => LogEntry { format: 1, command: v, admission: None },
        })
    }
}

impl LogEntry {
    /// The entry for `cmd` in the current format, checked to decode back to the same command
    /// (an entry that committed but could not be read back would stop every host).
    pub fn new(cmd: &Command) -> Result<LogEntry, LogFormatError> {
        LogEntry::judged(cmd, None)
    }

    /// The entry for `cmd` with the proposer's admission verdict (format 3), or without one
    /// (format 2), checked to decode back to the same command and verdict.
    pub fn judged(cmd: &Command, admission: Option<&Admission>) -> Result<LogEntry, LogFormatError> {
        let unencodable = |e: serde_json::Error| LogFormatError::Unencodable(e.to_string());
        let command = serde_json::to_value(cmd).map_err(unencodable)?;
        let verdict = admission.map(serde_json::to_value).transpose().map_err(unencodable)?;
        let format = cmd.min_format().unwrap_or(PLAIN_FORMAT).max(if verdict.is_some() { 3 } else { PLAIN_FORMAT });
        let entry = LogEntry { format, command, admission: verdict };
        let text = serde_json::to_vec(&entry).map_err(unencodable)?;
        let back: LogEntry = serde_json::from_slice(&text).map_err(unencodable)?;
        match back.decode() {
            Ok((c, a)) if c == *cmd && a.as_ref() == admission => Ok(entry),
            Ok(_) => Err(LogFormatError::Unencodable("decodes to a different command".into())),
            Err(e) => Err(LogFormatError::Unencodable(e.to_string())),
        }
    }

    /// The command and its admission verdict, if this release understands the entry. A verdict
    /// is only read from format 3 on.
    pub fn decode(&self) -> Result<(Command, Option<Admission>), LogFormatError> {
        if self.format > LOG_FORMAT {
            return Err(LogFormatError::Newer { found: self.format });
        }
        let undecodable = |e: serde_json::Error| LogFormatError::Undecodable { format: self.format, detail: e.to_string() };
        let cmd: Command = serde_json::from_value(self.command.clone()).map_err(undecodable)?;
        if let Some(min) = cmd.min_format().filter(|min| self.format < *min) {
            return Err(LogFormatError::Undecodable { format: self.format, detail: format!("this '{}' exists from format {min} on", cmd.op()) });
        }
        let admission = match (&self.admission, self.format >= 3) {
            (Some(a), true) => Some(serde_json::from_value(a.clone()).map_err(undecodable)?),
            (Some(_), false) => return Err(LogFormatError::Undecodable { format: self.format, detail: "an admission verdict before format 3".into() }),
            (None, _) => None,
        };
        Ok((cmd, admission))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostId;

    #[test]
    fn entries_round_trip_and_older_entries_still_read() {
        let cmd = Command::HostJoined { host: HostId(3) };
        let e = LogEntry::new(&cmd).expect("encodes");
        assert_eq!(e.format, 2, "an entry without a verdict stays readable by hosts of format 2");
        let text = serde_json::to_string(&e).expect("json");
        assert!(text.starts_with("{\"format\":2,\"command\":{") && text.contains("\"op\":\"host-joined\""), "{text}");
        assert_eq!(serde_json::from_str::<LogEntry>(&text).expect("reads").decode(), Ok((cmd.clone(), None)));
        // Format 1: the bare command, as releases before versioning wrote it.
        let legacy: LogEntry = serde_json::from_str("{\"op\":\"host-joined\",\"host\":3}").expect("reads");
        assert_eq!((legacy.format, legacy.decode()), (1, Ok((cmd, None))));
        // Format 3: with the proposer's admission verdict.
        let start = Command::SetPower { name: "a".into(), desired: crate::state::PowerState::Running, force: false };
        let verdict = Admission { revision: 7, forced: None };
        let judged = LogEntry::judged(&start, Some(&verdict)).expect("encodes");
        let text = serde_json::to_string(&judged).expect("json");
        assert!(text.starts_with("{\"format\":3,") && text.contains("\"admission\":{\"revision\":7"), "{text}");
        assert_eq!(serde_json::from_str::<LogEntry>(&text).expect("reads").decode(), Ok((start, Some(verdict))));
    }

    /// A newer entry, or one naming a command this release does not know, still loads (the
    /// log stays readable) and says precisely why it cannot be applied.
    #[test]
    fn unknown_entries_load_and_refuse_to_apply_with_a_reason() {
        let newer: LogEntry = serde_json::from_str("{\"format\":99,\"command\":{\"op\":\"migrate-vm\",\"name\":\"a\"}}").expect("loads");
        assert_eq!(newer.decode(), Err(LogFormatError::Newer { found: 99 }));
        assert!(newer.decode().err().is_some_and(|e| e.to_string().contains("upgrade")));
        let unknown: LogEntry = serde_json::from_str("{\"format\":2,\"command\":{\"op\":\"migrate-vm\",\"name\":\"a\"}}").expect("loads");
        assert!(matches!(unknown.decode(), Err(LogFormatError::Undecodable { format: 2, .. })));
        // A field this release does not know, inside a command it knows, is no reason to stop:
        // a newer release adds such fields only where an older host may ignore them (a field
        // it must not ignore raises the format).
        let newer_field: LogEntry = serde_json::from_str(
            "{\"format\":2,\"command\":{\"op\":\"create-vm\",\"spec\":{\"name\":\"a\",\"vcpus\":1,\"memory_mib\":64,\"later\":1,\
             \"driver\":{\"kind\":\"process\",\"command\":[\"true\"],\"later\":2}}}}",
        )
        .expect("loads");
        assert!(matches!(newer_field.decode(), Ok((Command::CreateVm { .. }, None))), "{:?}", newer_field.decode());
        let smuggled: LogEntry =
            serde_json::from_str("{\"format\":2,\"command\":{\"op\":\"host-joined\",\"host\":3},\"admission\":{\"revision\":1}}").expect("loads");
        assert!(matches!(smuggled.decode(), Err(LogFormatError::Undecodable { format: 2, .. })), "a verdict is only read from format 3 on");
    }

    /// Migration commands are written in format 4, so a host of format 3 stops at them with
    /// "upgrade"; the other commands keep their older formats.
    #[test]
    fn migration_commands_are_format_4_and_only_they() {
        let switch = Command::MigrationSwitchover { name: "a".into(), generation: 3, arrives_home: false };
        let e = LogEntry::new(&switch).expect("encodes");
        assert_eq!(e.format, 4);
        assert_eq!(e.decode(), Ok((switch, None)));
        let start = Command::StartMigration { name: "a".into(), to: HostId(1), force: false, evacuation: false, across_sites: false };
        let judged = LogEntry::judged(&start, Some(&Admission { revision: 2, forced: None })).expect("encodes");
        assert_eq!(judged.format, 4);
        let old_host_sees = LogFormatError::Newer { found: 4 };
        assert!(old_host_sees.to_string().contains("upgrade"));
        let smuggled: LogEntry =
            serde_json::from_str("{\"format\":2,\"command\":{\"op\":\"migration-abort\",\"name\":\"a\",\"generation\":1,\"reason\":\"x\"}}").expect("loads");
        assert!(matches!(smuggled.decode(), Err(LogFormatError::Undecodable { format: 2, .. })));
        assert_eq!(LogEntry::new(&Command::HostJoined { host: HostId(1) }).expect("encodes").format, 2);
    }

    /// A switchover that brings a VM home is written in format 15 (an older host would keep the
    /// home the others forget); any other switchover keeps format 4.
    #[test]
    fn a_switchover_home_is_format_15_and_only_it() {
        let home = Command::MigrationSwitchover { name: "a".into(), generation: 3, arrives_home: true };
        let e = LogEntry::new(&home).expect("encodes");
        assert_eq!(e.format, 15);
        assert_eq!(e.decode(), Ok((home, None)));
        let mut old = e.clone();
        old.format = 14;
        assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 14, .. })), "{:?}", old.decode());
        let elsewhere = Command::MigrationSwitchover { name: "a".into(), generation: 3, arrives_home: false };
        let e = LogEntry::new(&elsewhere).expect("encodes");
        assert_eq!(e.format, 4);
        assert!(!e.command.to_string().contains("arrives_home"), "an older host reads it as before: {}", e.command);
    }

    /// A live move of a VM with mirrored disks to another site is written in format 16 (an
    /// older host refused it and would not run the migration its peers run); any other
    /// `start-migration` keeps format 4 and reads as before.
    #[test]
    fn a_move_across_sites_is_format_16_and_only_it() {
        let across = Command::StartMigration { name: "a".into(), to: HostId(1), force: false, evacuation: true, across_sites: true };
        let e = LogEntry::judged(&across, Some(&Admission { revision: 2, forced: None })).expect("encodes");
        assert_eq!(e.format, 16);
        assert_eq!(e.decode(), Ok((across, Some(Admission { revision: 2, forced: None }))));
        let mut old = e.clone();
        old.format = 15;
        assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 15, .. })), "{:?}", old.decode());
        let within = Command::StartMigration { name: "a".into(), to: HostId(1), force: false, evacuation: true, across_sites: false };
        let e = LogEntry::new(&within).expect("encodes");
        assert_eq!(e.format, 4);
        assert!(!e.command.to_string().contains("across_sites"), "an older host reads it as before: {}", e.command);
    }

    /// A VM on a bridge network is written in format 5 (a host of format 4 stops at it with
    /// "upgrade" rather than fail to decode its spec); the same VM on any other network keeps
    /// format 2, and a format-4 entry smuggling a bridge spec is refused.
    #[test]
    fn bridge_specs_are_format_5_and_only_they() {
        let mut spec = crate::state::VmSpec {
            name: "a".into(),
            vcpus: 1,
            memory_mib: 128,
            disks: vec![],
            network: Some(crate::state::NetworkSpec::Bridge {
                bridge: "vmbr0".into(),
                mac: "52:54:00:00:00:01".into(),
                address: Some("198.18.0.100/24".into()),
            }),
            protection: crate::state::Protection::default(),
            priority: 0,
            restart_group: 0,
            driver: crate::state::DriverSpec::Process { command: vec!["true".into()] },
            probe: None,
            postcopy: crate::spec::Postcopy::Off,
        };
        let create = Command::CreateVm { spec: spec.clone() };
        let e = LogEntry::new(&create).expect("encodes");
        assert_eq!(e.format, 5);
        assert_eq!(e.decode(), Ok((create, None)));
        assert!(LogFormatError::Newer { found: e.format }.to_string().contains("upgrade"));
        let mut old = e.clone();
        old.format = 4;
        assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 4, .. })), "{:?}", old.decode());
        spec.network = Some(crate::state::NetworkSpec::User { hostfwd: vec![] });
        assert_eq!(LogEntry::new(&Command::CreateVm { spec }).expect("encodes").format, 2);
    }

    /// A spec with a local disk is written in format 7: an older host would take the disk for
    /// a shared one (and restart the VM elsewhere, on an empty or stale copy).
    #[test]
    fn local_disk_specs_are_format_7() {
        let mut spec = crate::state::VmSpec::process("a", 128, 0, &["true"]);
        spec.protection = crate::state::Protection::BestEffort;
        spec.disks = vec![crate::state::DiskSpec { path: "a.raw".into(), format: None, readonly: false, local: true, mirror: false }];
        let create = Command::CreateVm { spec: spec.clone() };
        let e = LogEntry::new(&create).expect("encodes");
        assert_eq!(e.format, 7);
        assert_eq!(e.decode(), Ok((create, None)));
        let mut old = e.clone();
        old.format = 6;
        assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 6, .. })), "{:?}", old.decode());
        spec.disks[0].local = false;
        spec.disks[0].path = "/shared/a.raw".into();
        let e = LogEntry::new(&Command::CreateVm { spec }).expect("encodes");
        assert_eq!(e.format, 2);
        assert!(!e.command.to_string().contains("local"), "a shared disk's spec reads as before: {}", e.command);
    }

    /// A spec whose guest runs the guest agent is written in format 8 (its channel is one of
    /// the VM's devices: an older host would start a copy without it); one without reads as
    /// before, the field left out.
    #[test]
    fn guest_agent_specs_are_format_8() {
        let mut spec = crate::state::VmSpec::process("a", 128, 0, &["true"]);
        spec.driver = crate::spec::DriverSpec::Qemu { kernel: Some("/k".into()), initrd: None, cmdline: None, extra_args: vec![], guest_agent: true };
        let create = Command::CreateVm { spec: spec.clone() };
        let e = LogEntry::new(&create).expect("encodes");
        assert_eq!(e.format, 8);
        assert_eq!(e.decode(), Ok((create, None)));
        let mut old = e.clone();
        old.format = 7;
        assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 7, .. })), "{:?}", old.decode());
        spec.driver = crate::spec::DriverSpec::Qemu { kernel: Some("/k".into()), initrd: None, cmdline: None, extra_args: vec![], guest_agent: false };
        let e = LogEntry::new(&Command::CreateVm { spec }).expect("encodes");
        assert_eq!(e.format, 2);
        assert!(!e.command.to_string().contains("guest_agent"), "{}", e.command);
    }

    /// A spec that lets its migrations switch to post-copy is written in format 9 (an older
    /// destination would not be ready for it); one without reads as before.
    #[test]
    fn postcopy_specs_are_format_9() {
        let mut spec = crate::state::VmSpec::process("a", 128, 0, &["true"]);
        spec.postcopy = crate::spec::Postcopy::WhenStalled;
        let create = Command::CreateVm { spec: spec.clone() };
        let e = LogEntry::new(&create).expect("encodes");
        assert_eq!(e.format, 9);
        assert!(e.command.to_string().contains("\"postcopy\":\"when-stalled\""), "{}", e.command);
        assert_eq!(e.decode(), Ok((create, None)));
        let mut old = e.clone();
        old.format = 8;
        assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 8, .. })), "{:?}", old.decode());
        spec.postcopy = crate::spec::Postcopy::Off;
        let e = LogEntry::new(&Command::CreateVm { spec }).expect("encodes");
        assert_eq!(e.format, 2);
        assert!(!e.command.to_string().contains("postcopy"), "{}", e.command);
    }

    /// The conditional stop of an exited VM is format 10: an older host stops at it ("upgrade")
    /// rather than fail to decode it.
    #[test]
    fn stop_exited_is_format_10() {
        let cmd = Command::StopExited { name: "a".into(), host: crate::hostset::HostId(1), generation: 4 };
        let e = LogEntry::new(&cmd).expect("encodes");
        assert_eq!(e.format, 10);
        assert_eq!(e.decode(), Ok((cmd, None)));
        let mut old = e.clone();
        old.format = 9;
        assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 9, .. })), "{:?}", old.decode());
    }

    /// The disk witness's vote is format 12: an older host stops at it.
    #[test]
    fn the_witness_vote_is_format_12() {
        let cmd = Command::SetWitness { disk: true };
        let e = LogEntry::new(&cmd).expect("encodes");
        assert_eq!(e.format, 12);
        assert_eq!(e.decode(), Ok((cmd, None)));
        let mut old = e.clone();
        old.format = 11;
        assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 11, .. })), "{:?}", old.decode());
    }

    /// A spec with a disk mirrored between sites, and the copies' state, are format 13: an
    /// older host would take the disk's relative path for a shared one, and could not keep
    /// which copies are current.
    #[test]
    fn mirrored_disks_are_format_13() {
        let mut spec = crate::state::VmSpec::process("a", 128, 0, &["true"]);
        spec.disks = vec![crate::state::DiskSpec { path: "a.raw".into(), format: None, readonly: false, local: false, mirror: true }];
        let create = Command::CreateVm { spec };
        for cmd in [
            create,
            Command::MirrorSynced { name: "a".into(), generation: 3, site: "east".into() },
            Command::MirrorDegraded { name: "a".into(), generation: 3, site: "east".into() },
        ] {
            let e = LogEntry::new(&cmd).expect("encodes");
            assert_eq!(e.format, 13, "{cmd:?}");
            assert_eq!(e.decode(), Ok((cmd, None)));
            let mut old = e.clone();
            old.format = 12;
            assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 12, .. })), "{:?}", old.decode());
        }
    }

    /// A host's site and the "survive one site" target are format 11; settings without the
    /// target read as before.
    #[test]
    fn sites_are_format_11() {
        let cmd = Command::SetHostSite { host: crate::hostset::HostId(1), site: Some("east".into()) };
        assert_eq!(LogEntry::new(&cmd).expect("encodes").format, 11);
        let target = crate::state::Settings { survive_site_loss: true, ..crate::state::Settings::default() };
        let admission = crate::state::Admission { revision: 3, forced: None };
        let e = LogEntry::judged(&Command::SetSettings { settings: target, force: false }, Some(&admission)).expect("encodes");
        assert_eq!(e.format, 11);
        let mut old = e.clone();
        old.format = 10;
        assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 10, .. })), "{:?}", old.decode());
        let plain = LogEntry::judged(&Command::SetSettings { settings: crate::state::Settings::default(), force: false }, Some(&admission)).expect("encodes");
        assert_eq!(plain.format, 3);
        assert!(!plain.command.to_string().contains("survive_site_loss"), "{}", plain.command);
    }

    /// A preferred site is format 14: a host of format 13 would decide a split without it and
    /// keep another side than its peers, so it stops at the entry instead (upgrade it).
    #[test]
    fn a_preferred_site_is_format_14() {
        let preferring = crate::state::Settings { preferred_site: Some("b".into()), ..crate::state::Settings::default() };
        let admission = crate::state::Admission { revision: 3, forced: None };
        let e = LogEntry::judged(&Command::SetSettings { settings: preferring, force: false }, Some(&admission)).expect("encodes");
        assert_eq!(e.format, 14);
        let mut old = e.clone();
        old.format = 13;
        assert!(matches!(old.decode(), Err(LogFormatError::Undecodable { format: 13, .. })), "{:?}", old.decode());
        let plain = LogEntry::judged(&Command::SetSettings { settings: crate::state::Settings::default(), force: false }, Some(&admission)).expect("encodes");
        assert!(!plain.command.to_string().contains("preferred_site"), "{}", plain.command);
    }
}
