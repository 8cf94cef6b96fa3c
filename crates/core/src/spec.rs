//! VM specs and what they need of a host: sizes, disks, networks, drivers, protection, and the
//! checks a spec passes before it is proposed.

use serde::{Deserialize, Serialize};
use thiserror::Error;

mod args;
mod probe;
pub use args::DISK_FORMATS;
pub use probe::{ServiceProbe, MAX_PROBE_TEXT};

/// CPU and memory a host offers or a VM needs.
// No `deny_unknown_fields` on the types that travel in log entries: an older host must not
// refuse a newer entry over a field it may ignore (a field it must not ignore raises the log
// format, which stops it clearly). API input is checked strictly by the API instead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// What HA does for a VM whose host fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DiskSpec {
    /// Shared disk: an absolute path on shared storage, the same on every host. Local disk: a
    /// path relative to each host's `[qemu] local_disk_dir`.
    pub path: String,
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    /// On the running host's own storage, not shared: a live migration copies it to the
    /// destination (QEMU's mirror to an NBD export there), and HA cannot restart the VM on
    /// another host — after its host fails it waits for that host (parked with it). A local
    /// read-only disk (an installer image, say) is expected on every host and is not copied.
    #[serde(default, skip_serializing_if = "is_false")]
    pub local: bool,
    /// Mirrored between sites: every site holds a copy at this path, relative to each host's
    /// `[qemu] site_disk_dir` (its site's storage). The running host's QEMU mirrors every write
    /// synchronously into one other site's copy, and HA restarts the VM only at a site whose
    /// copy committed state shows current (log format 13).
    #[serde(default, skip_serializing_if = "is_false")]
    pub mirror: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

/// Whether `path` is a plain relative path that stays inside the directory it is joined to.
fn stays_inside(path: &str) -> bool {
    !path.is_empty() && path.len() <= 255 && !path.starts_with('/') && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// A VM's network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// The VM's own network identity on a bridge that every host has: wherever the VM runs, the
    /// host gives it a tap device on `bridge` (one its `[qemu] bridges` allows) with this `mac`,
    /// so the guest keeps its address after a failover or a migration. `address` (`IP/PREFIX`)
    /// is the guest's address: a kernel-booted guest is told it as `tandem.ip=` on its command
    /// line; otherwise it is configured inside the guest and recorded here for operators.
    /// Entries with it are written in log format 5.
    Bridge {
        bridge: String,
        mac: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
    },
}

/// How the VM's workload is run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
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
        /// The guest runs the QEMU guest agent: the VM gets its channel (a virtio-serial port
        /// named `org.qemu.guest_agent.0`), and a clean stop asks the agent to shut the guest
        /// down (`guest-shutdown`) before it falls back to the ACPI power button.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        guest_agent: bool,
    },
    /// Any command; it runs as long as the "VM" runs.
    Process { command: Vec<String> },
}

/// Everything an operator says about a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// How the host that starts it tells that its service answers (observed, recorded in the
    /// timeline and a failover's phases; decides nothing). An older host ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ServiceProbe>,
    /// Whether a live migration of it may switch to post-copy (see [`Postcopy`]). Entries
    /// with it are written in log format 9.
    #[serde(default, skip_serializing_if = "Postcopy::is_off")]
    pub postcopy: Postcopy,
}

/// Whether a VM's live migration may switch to **post-copy**: the guest's vCPUs move to the
/// destination before all of its memory has, and the pages it still lacks are fetched from
/// the source on demand. A post-copy migration always ends, within the time it takes to send
/// the memory once — but from the switch until the last page arrived, the guest needs both
/// hosts: if either is lost, or the link between them, the guest is lost and HA restarts it
/// from its disk. Hence an opt-in, per VM (as vSphere and libvirt make it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Postcopy {
    /// Never: a migration that cannot converge is cancelled and the VM runs on at its source.
    #[default]
    Off,
    /// As the last step of the convergence schedule, instead of cancelling: the higher downtime
    /// limits and the throttling were tried first.
    WhenStalled,
    /// As soon as the first pass over memory is done (libvirt's `--postcopy-after-precopy`):
    /// the whole migration takes about one copy of the memory, whatever the guest dirties.
    AfterFirstPass,
}

impl Postcopy {
    #[must_use]
    pub fn is_off(&self) -> bool {
        *self == Postcopy::Off
    }
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
    #[error("disk path must be absolute: '{0}' (a disk on each host's own storage says `local = true`)")]
    RelativeDiskPath(String),
    #[error("local disk path '{0}' must be relative to the host's local_disk_dir, without '.' or '..' parts, at most 255 characters")]
    BadLocalDiskPath(String),
    #[error("mirrored disk path '{0}' must be relative to the site's site_disk_dir, without '.' or '..' parts, at most 255 characters")]
    BadMirroredDiskPath(String),
    #[error("disk '{0}' is both local and mirrored: a disk lives on its host's storage, or on every site's")]
    LocalAndMirrored(String),
    #[error("disk '{0}' is read-only: only a writable disk is mirrored")]
    ReadOnlyMirror(String),
    #[error("a VM with a writable local disk cannot be protected: HA cannot restart it on another host (its disk is on its host); use protection best-effort or off, or shared storage")]
    ProtectedLocalDisk,
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
    /// A protected, one-vCPU process "VM" running `command`, with no disks and no network: the
    /// cheapest workload, for labs, simulations and tests.
    #[must_use]
    pub fn process(name: &str, memory_mib: u64, priority: i32, command: &[&str]) -> VmSpec {
        VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib,
            disks: vec![],
            network: None,
            protection: Protection::Protect,
            priority,
            restart_group: 0,
            driver: DriverSpec::Process { command: command.iter().map(|c| c.to_string()).collect() },
            probe: None,
            postcopy: Postcopy::Off,
        }
    }

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
        if let Some(d) = self.disks.iter().find(|d| d.local && d.mirror) {
            return Err(SpecError::LocalAndMirrored(d.path.clone()));
        }
        if let Some(d) = self.disks.iter().find(|d| d.mirror && d.readonly) {
            return Err(SpecError::ReadOnlyMirror(d.path.clone()));
        }
        if let Some(d) = self.disks.iter().find(|d| d.mirror && !stays_inside(&d.path)) {
            return Err(SpecError::BadMirroredDiskPath(d.path.clone()));
        }
        if let Some(d) = self.disks.iter().find(|d| !d.local && !d.mirror && !d.path.starts_with('/')) {
            return Err(SpecError::RelativeDiskPath(d.path.clone()));
        }
        if let Some(d) = self.disks.iter().find(|d| d.local && !stays_inside(&d.path)) {
            return Err(SpecError::BadLocalDiskPath(d.path.clone()));
        }
        if self.protection == Protection::Protect && self.copied_disks().next().is_some() {
            return Err(SpecError::ProtectedLocalDisk);
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

    /// The disks a live migration copies (local and writable), with their index in `disks`.
    pub fn copied_disks(&self) -> impl Iterator<Item = (usize, &DiskSpec)> {
        self.disks.iter().enumerate().filter(|(_, d)| d.local && !d.readonly)
    }

    /// The disks mirrored between sites, with their index in `disks`.
    pub fn mirrored_disks(&self) -> impl Iterator<Item = (usize, &DiskSpec)> {
        self.disks.iter().enumerate().filter(|(_, d)| d.mirror)
    }

    /// Whether the VM's data is mirrored between sites: it runs only at a site whose copy is
    /// current.
    #[must_use]
    pub fn site_mirrored(&self) -> bool {
        self.mirrored_disks().next().is_some()
    }

    /// Whether the VM's data lives on its host's own storage: it can move live, but HA cannot
    /// restart it on another host.
    #[must_use]
    pub fn bound_to_host(&self) -> bool {
        self.copied_disks().next().is_some()
    }

    /// What the VM takes from its host.
    #[must_use]
    pub fn demand(&self) -> Capacity {
        Capacity { vcpus: self.vcpus, memory_mib: self.memory_mib }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_disk(path: &str, local: bool, protection: Protection) -> VmSpec {
        let mut v = VmSpec::process("a", 128, 0, &["true"]);
        v.protection = protection;
        v.disks = vec![DiskSpec { path: path.into(), format: None, readonly: false, local, mirror: false }];
        v
    }

    #[test]
    fn local_disks_stay_in_their_directory_and_are_not_protected() {
        assert_eq!(with_disk("vms/a.raw", true, Protection::BestEffort).validate(), Ok(()));
        for bad in ["/abs/a.raw", "../a.raw", "vms/../../a.raw", "vms//a.raw", "./a.raw", ""] {
            assert_eq!(with_disk(bad, true, Protection::Off).validate(), Err(SpecError::BadLocalDiskPath(bad.into())), "{bad}");
        }
        assert_eq!(with_disk("a.raw", true, Protection::Protect).validate(), Err(SpecError::ProtectedLocalDisk));
        assert!(matches!(with_disk("a.raw", false, Protection::Off).validate(), Err(SpecError::RelativeDiskPath(_))));
        // A read-only local image (present on every host) is not copied and binds nothing.
        let mut iso = with_disk("install.iso", true, Protection::Protect);
        iso.disks[0].readonly = true;
        assert_eq!(iso.validate(), Ok(()));
        assert!(!iso.bound_to_host());
        assert!(with_disk("a.raw", true, Protection::Off).bound_to_host());
    }

    #[test]
    fn mirrored_disks_are_relative_writable_and_not_local() {
        let mirrored = |path: &str| {
            let mut v = with_disk(path, false, Protection::Protect);
            v.disks[0].mirror = true;
            v
        };
        let ok = mirrored("vms/db.raw");
        assert_eq!(ok.validate(), Ok(()), "a protected VM may have a mirrored disk: it restarts at the other site");
        assert!(ok.site_mirrored() && !ok.bound_to_host());
        for bad in ["/abs/a.raw", "../a.raw", ""] {
            assert_eq!(mirrored(bad).validate(), Err(SpecError::BadMirroredDiskPath(bad.into())), "{bad}");
        }
        let mut both = mirrored("a.raw");
        both.disks[0].local = true;
        assert_eq!(both.validate(), Err(SpecError::LocalAndMirrored("a.raw".into())));
        let mut ro = mirrored("a.raw");
        ro.disks[0].readonly = true;
        assert_eq!(ro.validate(), Err(SpecError::ReadOnlyMirror("a.raw".into())));
        assert!(!with_disk("/shared/a.raw", false, Protection::Protect).site_mirrored());
    }
}
