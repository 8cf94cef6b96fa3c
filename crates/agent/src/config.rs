//! The agent's TOML configuration, checked before anything starts.

use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tandem_core::state::{valid_name, Capacity};
use tandem_core::timing::{TimingError, Timings};
use tandem_core::wire::{ClusterKey, WeakSecret};
use tandem_core::{HostId, MAX_HOSTS};
use tandem_drivers::qemu::QemuConfig;
use thiserror::Error;

/// Which driver runs this host's VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverKind {
    #[default]
    Qemu,
    Process,
    /// QEMU guests and process workloads side by side, each VM by its own spec.
    Mixed,
}

/// Hardware watchdog use.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_watchdog")]
    pub device: PathBuf,
    /// Seconds without a feed before the watchdog resets the host (set on the device with
    /// WDIOC_SETTIMEOUT). It must expire before any peer's fence deadline for this host.
    #[serde(default = "default_watchdog_timeout")]
    pub timeout_s: u64,
    /// Accept a regular file as the device (it resets nothing): for tests and fault emulation
    /// only, never on a real host.
    #[serde(default)]
    pub test_file: bool,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig { enabled: false, device: default_watchdog(), timeout_s: default_watchdog_timeout(), test_file: false }
    }
}

fn default_watchdog() -> PathBuf {
    PathBuf::from("/dev/watchdog")
}

fn default_watchdog_timeout() -> u64 {
    tandem_core::limits::DEFAULT_WATCHDOG_TIMEOUT_S
}

/// One host's agent configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's index, 0..64: its heartbeat-disk slot and consensus id.
    pub host_id: u32,
    pub name: String,
    /// Where the HTTP API (and consensus traffic) listens; also the address peers use.
    pub api_addr: SocketAddr,
    /// Where UDP heartbeats are received.
    pub heartbeat_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// A file on shared storage, or a block device, seen by every host. Absent: the heartbeat
    /// area is kept by the network witness (`[witness]`), which must then be set.
    #[serde(default)]
    pub heartbeat_disk: Option<PathBuf>,
    /// More paths to the same heartbeat disk (a second mount, a second device path): when the
    /// path in use fails, the next takes over (at most three more).
    #[serde(default)]
    pub heartbeat_disk_paths: Vec<PathBuf>,
    /// A region of shared storage (a file beside the heartbeat disk, or a block device; at
    /// least 16.04 MiB) that holds the disk witness: the third vote of a two-host cluster. Set
    /// it on both hosts, to the same storage; it assumes that storage is one device that every
    /// host reaches (no private copies). Absent: no disk witness.
    #[serde(default)]
    pub disk_witness: Option<PathBuf>,
    /// A network witness (`tandem witness`) serving this cluster: it keeps the third vote's
    /// region (instead of `disk_witness`), and the heartbeat area too when `heartbeat_disk` is
    /// absent.
    #[serde(default)]
    pub witness: Option<NetworkWitness>,
    /// A file holding the cluster secret (at least 16 bytes), the same on every host.
    pub secret_file: PathBuf,
    #[serde(default)]
    pub driver: DriverKind,
    /// What this host offers to VMs; detected from the machine when absent.
    #[serde(default, deserialize_with = "strict_capacity")]
    pub capacity: Option<Capacity>,
    #[serde(default)]
    pub watchdog: WatchdogConfig,
    #[serde(default)]
    pub timings: Timings,
    #[serde(default)]
    pub qemu: QemuConfig,
    /// Serve the API over TLS and call other agents over TLS (all agents of a cluster alike).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// What VM specs may do to this host, whatever the API caller's role.
    #[serde(default)]
    pub policy: crate::policy::HostPolicy,
    /// Live migrations this host sends.
    #[serde(default)]
    pub migration: MigrationConfig,
    /// What a planned stop of the agent does with this host's VMs.
    #[serde(default)]
    pub shutdown: crate::agent::ShutdownConfig,
    /// The site this host stands in (a data centre, a room); committed state learns it from
    /// here when the host joins. Absent: no site.
    #[serde(default)]
    pub site: Option<String>,
    /// `[mirror]`: disks mirrored between sites.
    #[serde(default)]
    pub mirror: MirrorConfig,
}

/// The longest `[mirror] hung_storage_restart_s`, seconds (a day).
pub const MAX_HUNG_STORAGE_RESTART_S: u64 = 86_400;
/// The longest `[mirror] hung_storage_switch_ms` (a day).
pub const MAX_HUNG_STORAGE_SWITCH_MS: u64 = 86_400_000;
/// The highest `[mirror] resync_max_mib_s` (100 GiB/s: no link is faster; 0 is no cap).
pub const MAX_RESYNC_MIB_S: u64 = 102_400;

/// `[mirror]`: how this host serves its site's copies of mirrored disks to the other sites,
/// and how it mirrors its own VMs' disks into theirs. (Where its site's copies are is
/// `[qemu] site_disk_dir`.)
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    /// The port of this host's copy server (NBD, on its cluster address).
    pub copy_port: u16,
    /// `qemu-storage-daemon`, which serves the copies: this site's to the other sites (the copy
    /// server), and each running mirrored disk's own to its QEMU (its local copy server).
    pub storage_daemon: String,
    /// Bytes sent to the other copy with no answer for this long, milliseconds: the copy counts
    /// as lost, and the guest's writes wait until that is committed.
    pub stall_ms: u64,
    /// Where the other sites reach this host's copy server, `ip:port`, when not at its cluster
    /// address and `copy_port`: a replication network of its own, a forwarded port (the lab's
    /// inter-site delay is one).
    pub advertise: Option<std::net::SocketAddr>,
    /// Whether each running mirrored disk's own copy is served to its QEMU by a local copy
    /// server (`tandem_drivers::localcopy`), so that storage that hangs is switched away from
    /// without a restart; off, QEMU opens the copy itself — one hop less per request — and a
    /// hang is answered by a restart elsewhere (`hung_storage_restart_s`).
    pub local_copy_servers: bool,
    /// A running mirrored disk whose own site's storage has not answered a direct read for
    /// this long, milliseconds, is cut from its local copy server and goes on on its other copy
    /// — if that copy is in sync — without a restart (the guest sees a pause as long). At least
    /// the probe's bound (1000); 0: never. A switch costs little (the disk comes back once the
    /// storage answers), so this is short.
    pub hung_storage_switch_ms: u64,
    /// Where no switch can take the guest's requests back from hung storage — a way back
    /// writing into it, a copy opened without a local copy server — a hang that lasts this
    /// long, seconds, restarts the VM where its other copy is, if that copy is in sync. 0:
    /// never (the guest waits for its storage; the alert is raised either way). Kept above
    /// storage that pauses a while to fail over on its own (an HA NAS: tens of seconds).
    pub hung_storage_restart_s: u64,
    /// The most a mirror's own copying may move, MiB/s per disk: the first copy into another
    /// site's copy and every resync after a loss (QEMU's mirror `speed`), so that a site coming
    /// back does not take the whole link and the storage from the guests. The guests' own writes
    /// are never held by it (a write-blocking mirror sends them as they come). 0: no cap.
    pub resync_max_mib_s: u64,
}

impl MirrorConfig {
    /// `resync_max_mib_s` as a cap: none when 0.
    #[must_use]
    pub fn resync_cap_mib_s(&self) -> Option<u64> {
        Some(self.resync_max_mib_s).filter(|c| *c > 0)
    }
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            copy_port: 10_930,
            storage_daemon: "qemu-storage-daemon".into(),
            stall_ms: tandem_drivers::copyrelay::DEFAULT_STALL.as_millis() as u64,
            advertise: None,
            local_copy_servers: true,
            hung_storage_switch_ms: 1_000,
            hung_storage_restart_s: 60,
            resync_max_mib_s: 0,
        }
    }
}

/// `[migration]`: how this host sends live migrations.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    /// The bandwidth cap of one migration, MiB/s (the migration network's share for it).
    pub max_bandwidth_mib_s: u64,
    /// Progress stalled this long takes the convergence schedule's next step, seconds.
    pub stall_s: u64,
    /// The bound of one migration, seconds: one that has not completed by then is cancelled.
    pub timeout_s: u64,
    /// Parallel channels of a migration's memory stream (QEMU multifd: one TCP connection and
    /// one thread each, on both hosts); 0 (the default) sends one stream, which a LAN below
    /// 10 Gb/s fills already. The source's setting is sent to the destination with each
    /// migration.
    pub multifd_channels: u8,
    /// The bandwidth cap of a migration's post-copy phase, MiB/s (only VMs whose spec allows
    /// post-copy have one); 0 (the default): the same as `max_bandwidth_mib_s`. The guest waits
    /// for every page it touches that has not arrived yet, so it is usually left high.
    pub postcopy_bandwidth_mib_s: u64,
}

impl MigrationConfig {
    /// The post-copy phase's cap, bytes/s.
    #[must_use]
    pub fn postcopy_bandwidth(&self) -> u64 {
        let mib = if self.postcopy_bandwidth_mib_s == 0 { self.max_bandwidth_mib_s } else { self.postcopy_bandwidth_mib_s };
        mib << 20
    }
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            max_bandwidth_mib_s: tandem_drivers::migration::DEFAULT_MAX_BANDWIDTH >> 20,
            stall_s: tandem_core::convergence::STALL_MS / 1000,
            timeout_s: tandem_core::convergence::OVERALL_MS / 1000,
            multifd_channels: 0,
            postcopy_bandwidth_mib_s: 0,
        }
    }
}

/// TLS files, PEM encoded.
/// `capacity` in the configuration refuses unknown keys (a typo must not go unnoticed), although
/// `Capacity` itself, which travels in log entries, does not.
fn strict_capacity<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Capacity>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        vcpus: u32,
        memory_mib: u64,
    }
    Ok(Option::<Strict>::deserialize(d)?.map(|c| Capacity { vcpus: c.vcpus, memory_mib: c.memory_mib }))
}

/// Where a network witness answers, and the name it serves this cluster under.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkWitness {
    /// `host:port` (over TLS with the agents' CA when `[tls]` is set).
    pub address: String,
    pub cluster: String,
}

impl std::fmt::Display for NetworkWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "witness {} (cluster {})", self.address, self.cluster)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This agent's certificate chain; it must name the API address's IP (or DNS name).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signed every agent's certificate.
    pub ca: PathBuf,
}

/// Why a configuration is refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("host_id = {0} is outside 0..{MAX_HOSTS}")]
    HostId(u32),
    #[error("name '{0}' must be 1-63 characters of letters, digits, '-' and '_'")]
    Name(String),
    #[error("site '{0}' must be 1-63 characters of letters, digits, '-' and '_'")]
    Site(String),
    #[error("[mirror] {0}")]
    Mirror(&'static str),
    #[error("heartbeat_disk_paths: at most {0} more paths, none the same as heartbeat_disk (which they need)")]
    DiskPaths(usize),
    #[error("{0}")]
    Witness(&'static str),
    #[error("unsafe timings")]
    Timings(#[from] TimingError),
    #[error("[migration] is not valid: {0}")]
    Migration(String),
    #[error("cannot read secret file {path}")]
    Secret {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is readable or writable by others (mode {mode:o}); allow its owner only (chmod 600)")]
    Exposed { what: &'static str, path: String, mode: u32 },
    #[error("secret file {path} is too weak")]
    WeakSecret {
        path: String,
        #[source]
        source: WeakSecret,
    },
    #[error("watchdog is enabled but {0} does not exist")]
    NoWatchdog(String),
    #[error("watchdog timeout_s = {timeout_s} does not fit the timings: a hung host must be reset within self_fence_ms + kill_grace_ms = {lease_ms} ms of its last proof of life, and a healthy one must keep feeding it through {slack_ms} ms of silence (five heartbeats), so the timeout must be 1 to {max_s} s (or raise kill_grace_ms)")]
    WatchdogTimeout { timeout_s: u64, lease_ms: u64, slack_ms: u64, max_s: u64 },
    #[error("api_addr and heartbeat_addr must differ or use different protocols' ports: both are {0}")]
    SameAddr(SocketAddr),
    #[error("capacity must offer at least 1 vCPU and 16 MiB")]
    Capacity,
}

fn valid_witness(w: &NetworkWitness) -> bool {
    tandem_core::spec::valid_name(&w.cluster) && w.address.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// The cluster key from a secret file that only its owner may read.
pub fn load_key(secret_file: &Path) -> Result<ClusterKey, ConfigError> {
    let path = secret_file.display().to_string();
    private_file("secret file", secret_file)?;
    let bytes = std::fs::read(secret_file).map_err(|source| ConfigError::Secret { path: path.clone(), source })?;
    ClusterKey::new(&bytes).map_err(|source| ConfigError::WeakSecret { path, source })
}

/// Refuses a secret-bearing file that group or others may read or write.
pub fn private_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Secret { path: path.display().to_string(), source })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::Exposed { what, path: path.display().to_string(), mode });
    }
    Ok(())
}

impl AgentConfig {
    /// Parses and checks a configuration text.
    pub fn parse(text: &str, origin: &str) -> Result<AgentConfig, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|source| ConfigError::Parse { path: origin.to_string(), source })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads, parses and checks the file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        AgentConfig::parse(&text, &path.display().to_string())
    }

    fn check(&self) -> Result<(), ConfigError> {
        if !HostId(self.host_id).is_valid() {
            return Err(ConfigError::HostId(self.host_id));
        }
        if !valid_name(&self.name) {
            return Err(ConfigError::Name(self.name.clone()));
        }
        if let Some(site) = self.site.as_ref().filter(|s| !valid_name(s)) {
            return Err(ConfigError::Site(site.clone()));
        }
        if self.mirror.copy_port == 0 || !(100..=60_000).contains(&self.mirror.stall_ms) {
            return Err(ConfigError::Mirror("copy_port must be a port, and stall_ms within 100..=60000"));
        }
        if self.mirror.resync_max_mib_s > MAX_RESYNC_MIB_S {
            return Err(ConfigError::Mirror("resync_max_mib_s must be at most 102400 (0: no cap)"));
        }
        if self.mirror.hung_storage_restart_s > MAX_HUNG_STORAGE_RESTART_S {
            return Err(ConfigError::Mirror("hung_storage_restart_s must be at most 86400 (0: never)"));
        }
        let switch = self.mirror.hung_storage_switch_ms;
        if switch != 0 && !(tandem_drivers::pathswitch::PROBE_TIMEOUT.as_millis() as u64..=MAX_HUNG_STORAGE_SWITCH_MS).contains(&switch) {
            return Err(ConfigError::Mirror("hung_storage_switch_ms must be within 1000..=86400000 (a hang is known after the probe's 1 s; 0: never)"));
        }
        let paths = &self.heartbeat_disk_paths;
        let same = self.heartbeat_disk.as_ref().is_some_and(|d| paths.contains(d));
        if paths.len() >= crate::multipath::MAX_DISK_PATHS || same || (!paths.is_empty() && self.heartbeat_disk.is_none()) {
            return Err(ConfigError::DiskPaths(crate::multipath::MAX_DISK_PATHS - 1));
        }
        match (&self.heartbeat_disk, &self.disk_witness, &self.witness) {
            (None, _, None) => return Err(ConfigError::Witness("set heartbeat_disk (shared storage), a [witness], or both")),
            (_, Some(_), Some(_)) => return Err(ConfigError::Witness("disk_witness and [witness] both give the third vote: set one")),
            (_, _, Some(w)) if !valid_witness(w) => {
                return Err(ConfigError::Witness("[witness] needs address = \"host:port\" and a cluster name of letters, digits, '-' and '_'"))
            }
            _ => {}
        }
        if self.api_addr == self.heartbeat_addr {
            return Err(ConfigError::SameAddr(self.api_addr));
        }
        if self.capacity.is_some_and(|c| c.vcpus == 0 || c.memory_mib < 16) {
            return Err(ConfigError::Capacity);
        }
        self.timings.validate()?;
        let m = &self.migration;
        let max_channels = tandem_drivers::migration::MAX_MULTIFD_CHANNELS;
        if m.max_bandwidth_mib_s == 0
            || m.max_bandwidth_mib_s > 1 << 20
            || m.stall_s == 0
            || m.timeout_s < m.stall_s
            || m.timeout_s > 86_400
            || m.multifd_channels > max_channels
            || m.postcopy_bandwidth_mib_s > 1 << 20
        {
            return Err(ConfigError::Migration(format!(
                "max_bandwidth_mib_s = {} must be 1..=1048576, stall_s = {} at least 1, timeout_s = {} between stall_s and 86400, multifd_channels = {} at most {max_channels}, postcopy_bandwidth_mib_s = {} at most 1048576",
                m.max_bandwidth_mib_s, m.stall_s, m.timeout_s, m.multifd_channels, m.postcopy_bandwidth_mib_s
            )));
        }
        if self.watchdog.enabled && !self.watchdog.device.exists() {
            return Err(ConfigError::NoWatchdog(self.watchdog.device.display().to_string()));
        }
        // A hung host must be reset by its lease's end plus the kill grace, and a healthy one
        // must keep feeding (tandem_core::limits::watchdog_resets_in_time).
        let t = &self.timings;
        let in_time = self.watchdog.timeout_s < 1_000_000 && tandem_core::limits::watchdog_resets_in_time(t, self.watchdog.timeout_s);
        if self.watchdog.enabled && !in_time {
            return Err(ConfigError::WatchdogTimeout {
                timeout_s: self.watchdog.timeout_s,
                lease_ms: t.self_fence_ms + t.kill_grace_ms,
                slack_ms: 5 * t.heartbeat_interval_ms,
                max_s: self.watchdog_max_timeout_s(),
            });
        }
        Ok(())
    }

    /// The longest watchdog timeout that still resets a hung host before any peer may restart
    /// its VMs; the timeout the device applies is checked against it at start.
    #[must_use]
    pub fn watchdog_max_timeout_s(&self) -> u64 {
        let t = &self.timings;
        (t.self_fence_ms + t.kill_grace_ms).saturating_sub(5 * t.heartbeat_interval_ms) / 1000
    }

    /// Reads the cluster secret, refusing a file that others may read.
    pub fn key(&self) -> Result<ClusterKey, ConfigError> {
        load_key(&self.secret_file)
    }

    #[must_use]
    pub fn host(&self) -> HostId {
        HostId(self.host_id)
    }

    /// The configured capacity, or what this machine has.
    #[must_use]
    pub fn capacity(&self) -> Capacity {
        self.capacity.unwrap_or_else(|| {
            let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            let memory_mib = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<u64>().ok()))
                .map_or(1024, |kb| kb / 1024);
            Capacity { vcpus, memory_mib }
        })
    }
}

/// Parses TOML text into a JSON value, so TOML and JSON inputs share one serde schema.
pub fn toml_to_json(text: &str) -> Result<serde_json::Value, toml::de::Error> {
    let v: toml::Value = toml::from_str(text)?;
    Ok(serde_json::to_value(v).unwrap_or(serde_json::Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
host_id = 1
name = "h1"
api_addr = "127.0.0.1:7001"
heartbeat_addr = "127.0.0.1:7101"
data_dir = "/tmp/x"
heartbeat_disk = "/tmp/hb"
secret_file = "/tmp/secret"
driver = "process"
capacity = { vcpus = 4, memory_mib = 4096 }
[timings]
peer_timeout_ms = 4000
"#;

    #[test]
    fn good_config_parses() {
        let c = AgentConfig::parse(GOOD, "test").expect("valid");
        assert_eq!(c.host(), HostId(1));
        assert_eq!(c.driver, DriverKind::Process);
        assert_eq!(c.timings.peer_timeout_ms, 4000);
        assert_eq!(c.timings.heartbeat_interval_ms, Timings::default().heartbeat_interval_ms);
        assert_eq!(c.mirror.hung_storage_switch_ms, 1_000, "a hang is cut as soon as it is known");
        assert!(c.mirror.local_copy_servers, "mirrored disks' own copies are served, so that a hang can be cut");
        let never = AgentConfig::parse(&format!("{GOOD}\n[mirror]\nhung_storage_switch_ms = 0\n"), "test").expect("0: never");
        assert_eq!(never.mirror.hung_storage_switch_ms, 0);
    }

    /// A secret that others can read is refused, naming the file and the fix.
    #[test]
    fn a_secret_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tandem-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let secret = dir.join("secret");
        std::fs::write(&secret, "a-secret-of-enough-bytes").expect("write");
        let cfg = AgentConfig::parse(&GOOD.replace("/tmp/secret", &secret.display().to_string()), "test").expect("valid");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = cfg.key().expect_err("world-readable");
        assert!(e.to_string().contains("chmod 600") && e.to_string().contains("644"), "{e}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(cfg.key().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let cases = [
            (GOOD.replace("host_id = 1", "host_id = 64"), "outside"),
            (GOOD.replace("name = \"h1\"", "name = \"h 1\""), "name"),
            (GOOD.replace("peer_timeout_ms = 4000", "peer_timeout_ms = 400"), "unsafe timings"),
            (GOOD.replace("driver = \"process\"", "driver = \"xen\""), "not valid"),
            (format!("{GOOD}\nbogus_key = 1\n"), "not valid"),
            (GOOD.replace("memory_mib = 4096", "memory_mib = 4096, disk_gib = 1"), "not valid"),
            (GOOD.replace("127.0.0.1:7101", "127.0.0.1:7001"), "must differ"),
            (GOOD.replace("[timings]", "watchdog = { enabled = true, device = \"/nonexistent/wd\" }\n[timings]"), "watchdog"),
            (
                GOOD.replace("[timings]", "watchdog = { enabled = true, device = \"/dev/null\", timeout_s = 60 }\n[timings]"),
                "timeout_s = 60 does not fit the timings",
            ),
            (format!("{GOOD}\n[mirror]\nhung_storage_switch_ms = 500\n"), "hung_storage_switch_ms must be within 1000"),
            (format!("{GOOD}\n[mirror]\nhung_storage_restart_s = 90000\n"), "hung_storage_restart_s must be at most"),
            (format!("{GOOD}\n[mirror]\nresync_max_mib_s = 200000\n"), "resync_max_mib_s must be at most"),
            (format!("{GOOD}\n[mirror]\nresync_max_mib_s = -1\n"), "not valid"),
        ];
        for (text, needle) in cases {
            let err = AgentConfig::parse(&text, "test").expect_err("must be refused");
            let msg = format!("{err}");
            assert!(msg.contains(needle), "'{msg}' lacks '{needle}'");
        }
    }

    /// Shared storage, a network witness, or both; never neither, never two third votes.
    #[test]
    fn a_cluster_uses_the_disk_a_witness_or_both() {
        let witness = "[witness]\naddress = \"10.0.9.1:7470\"\ncluster = \"prod\"\n";
        let no_disk = GOOD.replace("heartbeat_disk = \"/tmp/hb\"\n", "");
        let only_witness = AgentConfig::parse(&format!("{no_disk}{witness}"), "test").expect("a witness alone");
        assert_eq!((only_witness.heartbeat_disk, only_witness.witness.map(|w| w.cluster)), (None, Some("prod".to_string())));
        let both = AgentConfig::parse(&format!("{GOOD}{witness}"), "test").expect("disk and witness");
        assert!(both.heartbeat_disk.is_some() && both.witness.is_some());
        let refused = [
            (no_disk.clone(), "heartbeat_disk (shared storage), a [witness], or both"),
            (format!("{}{witness}", GOOD.replace("[timings]", "disk_witness = \"/tmp/w\"\n[timings]")), "set one"),
            (format!("{no_disk}{}", witness.replace("10.0.9.1:7470", "10.0.9.1")), "host:port"),
            (format!("{no_disk}{}", witness.replace("prod", "a b")), "cluster name"),
            (format!("{}{witness}", no_disk.replace("[timings]", "heartbeat_disk_paths = [\"/tmp/hb2\"]\n[timings]")), "which they need"),
        ];
        for (text, needle) in refused {
            let msg = AgentConfig::parse(&text, "test").expect_err("must be refused").to_string();
            assert!(msg.contains(needle), "'{msg}' lacks '{needle}'");
        }
    }
}
