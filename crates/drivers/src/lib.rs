//! Workload drivers: how a VM assigned to this host is actually run.
//!
//! [`VmDriver`] is the narrow interface the agent uses; [`qemu::QemuDriver`] runs real QEMU
//! guests over QMP, [`process::ProcessDriver`] runs any command as the workload. Both start
//! their children through [`launcher::Launcher`], which ties every workload to the agent's life
//! (a dead agent takes its VMs with it) and tracks exits without polling.

pub mod bridge;
pub mod chunksums;
pub mod copychannel;
pub mod copyrelay;
pub mod diskcopy;
pub mod launcher;
pub mod limits;
pub mod localcopy;
pub mod migration;
pub mod migtls;
pub mod mixed;
pub mod pathswitch;
pub mod postcopy;
pub mod probe;
pub mod process;
pub mod qemu;
pub mod qga;
pub mod qmp;
pub mod sitecopy;
pub mod syncmirror;
#[cfg(test)]
mod testdir;

use diskcopy::{IncomingEndpoint, LocalDiskSize};
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tandem_core::state::{ServiceProbe, VmSpec};
use thiserror::Error;

/// A boxed future, so the driver can be a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Decides, at the instant a VM's process is created, whether it may still start there: the
/// driver calls it while holding the lock that `kill_all` takes, so a start either sees the
/// host's fencing and is refused, or is created before `kill_all` runs and is killed by it.
/// The error says why the start was refused.
pub type StartCheck = std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A check that admits every start (tests, tools).
#[must_use]
pub fn always_start() -> StartCheck {
    std::sync::Arc::new(|| Ok(()))
}

/// What to run: the spec, the assignment generation it runs under, and the last-instant check.
#[derive(Clone)]
pub struct VmLaunch {
    pub spec: VmSpec,
    pub generation: u64,
    pub check: StartCheck,
}

impl std::fmt::Debug for VmLaunch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmLaunch").field("spec", &self.spec).field("generation", &self.generation).finish_non_exhaustive()
    }
}

/// How a workload ended (the reconciler's decisions in `tandem-core` read it).
pub use tandem_core::reconcile::VmExit;

/// One workload known to the driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct VmStatus {
    pub name: String,
    pub generation: u64,
    pub pid: u32,
    /// Milliseconds since the Unix epoch when it was started.
    pub started_at_ms: u64,
    pub exit: Option<VmExit>,
    /// Alive with its vCPUs stopped by a live migration (a destination waiting for the
    /// switchover, or a source whose migration completed).
    #[serde(default)]
    pub paused: bool,
    /// QEMU's reason for the last shutdown it reported (its SHUTDOWN event: `guest-shutdown`,
    /// `guest-reset`, `host-qmp-quit`, `host-signal`...), recorded with the exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_reason: Option<String>,
}

/// Errors of a driver operation.
#[derive(Debug, Error)]
pub enum DriverError {
    #[error("VM '{0}' is already running")]
    AlreadyRunning(String),
    #[error("VM '{0}' is not running on this host")]
    NotRunning(String),
    #[error("VM '{vm}' needs driver '{needed}', this host runs '{have}'")]
    WrongDriver { vm: String, needed: &'static str, have: &'static str },
    #[error("could not start VM '{vm}'")]
    Spawn {
        vm: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the launcher thread is gone")]
    LauncherGone,
    #[error("start of VM '{vm}' refused at the last instant: {reason}")]
    Refused { vm: String, reason: String },
    #[error("QMP of VM '{vm}' failed")]
    Qmp {
        vm: String,
        #[source]
        source: qmp::QmpError,
    },
    #[error("VM '{0}' did not stop within its timeout")]
    StopTimeout(String),
    #[error("live migration of VM '{vm}' failed: {reason}")]
    Migration { vm: String, reason: String },
    #[error("the {driver} driver cannot {what}")]
    Unsupported { driver: &'static str, what: &'static str },
    #[error("the site mirror failed")]
    Mirror(#[from] syncmirror::SyncMirrorError),
    #[error("switching a disk to the other site's copy failed")]
    PathSwitch(#[from] pathswitch::PathSwitchError),
    #[error("serving this site's copy failed")]
    Copy(#[from] sitecopy::SiteCopyError),
    #[error("serving a VM's own copy of a mirrored disk failed")]
    LocalCopy(#[from] localcopy::LocalCopyError),
}

/// The interface between the agent and whatever runs VMs.
pub trait VmDriver: Send + Sync + 'static {
    /// `"qemu"`, `"process"` or `"mixed"`.
    fn kind(&self) -> &'static str;
    /// Starts the VM; returns when it runs (for QEMU: the QMP handshake succeeded).
    fn start<'a>(&'a self, launch: &'a VmLaunch) -> BoxFuture<'a, Result<(), DriverError>>;
    /// Asks the VM to shut down, and kills it if it has not within the driver's stop timeout.
    fn stop<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DriverError>>;
    /// Kills the VM at once (SIGKILL). Synchronous: used while fencing.
    fn kill(&self, name: &str) -> Result<(), DriverError>;
    /// Kills every VM at once; returns how many were signalled. Synchronous: used while fencing.
    fn kill_all(&self) -> usize;
    /// Kills the VM and its ways to other copies, and waits up to `bound` until none of its
    /// threads can run again: exited, or only threads stuck in uninterruptible I/O left (hung
    /// storage), which die before they could run once it lets them go. An error if that takes
    /// longer.
    fn kill_for_good<'a>(&'a self, name: &'a str, _bound: std::time::Duration) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { self.kill(name) })
    }
    /// Every VM started and not yet forgotten, running or exited.
    fn list(&self) -> Vec<VmStatus>;
    /// Notified whenever a VM's exit is recorded, so the reconciler restarts a crashed VM at
    /// once rather than at its next round; `None` when the driver has no such signal (the
    /// reconciler's rounds still see every exit).
    fn exits(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
    /// Drops the record of an exited VM.
    fn forget(&self, name: &str);
    /// A live migration's destination: starts the VM paused, waiting for the incoming state, and
    /// returns where the source sends it. `launch.check` admits it as for a start. `disks`: the
    /// local disks it receives too (created empty here, then served over NBD);
    /// `multifd_channels`: the parallel memory channels the source sends over (0: one stream).
    fn prepare_incoming<'a>(
        &'a self,
        _launch: &'a VmLaunch,
        _disks: &'a [LocalDiskSize],
        _multifd_channels: u8,
    ) -> BoxFuture<'a, Result<IncomingEndpoint, DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "receive a live migration" }) })
    }
    /// The virtual sizes of a running VM's disks `disks` (indices in its spec), which a
    /// destination creates before it receives them.
    fn disk_sizes<'a>(&'a self, _name: &'a str, disks: &'a [usize]) -> BoxFuture<'a, Result<Vec<LocalDiskSize>, DriverError>> {
        Box::pin(async move {
            if disks.is_empty() {
                Ok(Vec::new())
            } else {
                Err(DriverError::Unsupported { driver: self.kind(), what: "copy local disks" })
            }
        })
    }
    /// A live migration's source: sends VM `name` to `to.uri`, following the convergence
    /// schedule, reporting progress, until it completes (the VM is then paused here) or fails
    /// or is cancelled (it then keeps running here).
    fn migrate_out<'a>(&'a self, _name: &'a str, _to: &'a migration::MigrationTarget) -> BoxFuture<'a, Result<migration::MigrationReport, DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "send a live migration" }) })
    }
    /// A source after a migration that switched to post-copy (its report says so): serves the
    /// pages the destination still lacks until every one was sent, within `bound`. `Err` when
    /// that cannot end (the destination or the link is gone). Either way this host's copy is
    /// spent: it never resumes, and is killed afterwards.
    fn finish_postcopy<'a>(&'a self, _name: &'a str, _bound: Duration) -> BoxFuture<'a, Result<postcopy::Served, DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "serve a post-copy migration" }) })
    }
    /// Resumes a paused VM (after the switchover, or after an aborted migration), if `check`
    /// still admits it at this instant.
    fn resume<'a>(&'a self, name: &'a str, _check: &'a StartCheck) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { Err(DriverError::NotRunning(name.to_string())) })
    }
    /// Serves this site's copy of a mirrored disk (`relative` to the site's storage; created
    /// empty of `bytes` when missing) as `export`, to the other site's mirror; where
    /// (`host:port`).
    fn serve_copy<'a>(&'a self, _export: &'a str, _relative: &'a str, _bytes: u64) -> BoxFuture<'a, Result<String, DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "serve copies of mirrored disks" }) })
    }
    /// Stops serving `export` (no-op if not served); the exports still served.
    fn withdraw_copy<'a>(&'a self, _export: &'a str) -> BoxFuture<'a, Result<Vec<String>, DriverError>> {
        Box::pin(async move { Ok(Vec::new()) })
    }
    /// The exports this host serves now.
    fn served_copies(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move { Vec::new() })
    }
    /// Signalled when a mirrored disk may need the agent at once rather than at its next round:
    /// a guest paused on a failed request (QEMU's `BLOCK_IO_ERROR`), a relay that found its copy
    /// lost. None where nothing is mirrored.
    fn mirror_events(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
    /// Starts mirroring disk `to.disk` of running VM `name` synchronously into the other site's
    /// copy that `to.server` serves (for QEMU: through a relay that holds writes to a lost copy
    /// until `release_mirror`; see `syncmirror` and `copyrelay`). A mirror already there is
    /// replaced. How its first copy goes: by the copy's chunk sums, or whole (and why).
    fn attach_mirror<'a>(&'a self, _name: &'a str, _to: &'a syncmirror::MirrorTarget) -> BoxFuture<'a, Result<syncmirror::FirstCopy, DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "mirror disks between sites" }) })
    }
    /// Where the mirror of disk `disk` of VM `name` stands.
    fn mirror_status<'a>(&'a self, _name: &'a str, _disk: usize) -> BoxFuture<'a, Result<syncmirror::MirrorStatus, DriverError>> {
        Box::pin(async move {
            let absent = syncmirror::MirrorSample::Absent;
            Ok(syncmirror::MirrorStatus { job: absent.clone(), back: absent, relay: tandem_core::mirroring::RelayPhase::None, lost: None, delta: None })
        })
    }
    /// Lets the writes held for a lost copy go (they complete on the local copy alone): only
    /// once committed state counts that copy as stale.
    fn release_mirror<'a>(&'a self, _name: &'a str, _disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "mirror disks between sites" }) })
    }
    /// Resumes a stopped mirror through `server` (a host of that site serving the copy now): it
    /// copies what its copy missed.
    fn resume_mirror<'a>(&'a self, _name: &'a str, _disk: usize, _server: &'a str) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "mirror disks between sites" }) })
    }
    /// What a direct read of this site's copy of a mirrored disk (`relative` to the site's
    /// storage) gets within `pathswitch::PROBE_TIMEOUT`; `None` for a driver without copies of
    /// its own (nothing to watch).
    fn probe_site_copy<'a>(&'a self, _relative: &'a str) -> Option<BoxFuture<'a, pathswitch::ProbeAnswer>> {
        None
    }
    /// The mirrored disks of VM `name` whose own site's storage failed a request, the guest
    /// paused on it (see `pathswitch`); none for a driver without them.
    fn failed_disks<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Vec<usize>, DriverError>> {
        Box::pin(async move { Ok(Vec::new()) })
    }
    /// Switches disk `disk` of VM `name` onto the other site's copy its mirror is in sync with,
    /// and resumes the guest: only once committed state counts that copy as the only current one.
    fn switch_to_copy<'a>(&'a self, _name: &'a str, _disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "switch a disk to another site's copy" }) })
    }
    /// A step of disk `disk`'s return to its own site's copy after a switch (see
    /// `pathswitch::ReturnStep`).
    fn return_to_local<'a>(&'a self, _name: &'a str, _disk: usize, _step: &'a pathswitch::ReturnStep) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "return a disk to its site's copy" }) })
    }
    /// How VM `name`'s QEMU reaches disk `disk`'s own site copy (see `localcopy`): opened
    /// directly by a driver without local copy servers.
    fn local_reach(&self, _name: &str, _disk: usize) -> tandem_core::mirroring::LocalReach {
        tandem_core::mirroring::LocalReach::Direct
    }
    /// Cuts disk `disk`'s connection to its local copy server, whose storage hangs: the
    /// requests waiting there fail (the guest pauses on them) and the server is ended.
    fn cut_local<'a>(&'a self, _name: &'a str, _disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "cut a disk from its local copy server" }) })
    }
    /// Ends the mirror of disk `disk` (it ended on its own, or the link is given up).
    fn detach_mirror<'a>(&'a self, _name: &'a str, _disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { Err(DriverError::Unsupported { driver: self.kind(), what: "mirror disks between sites" }) })
    }
    /// One attempt of VM `name`'s service probe from this host (whose address is `host_ip`),
    /// within `timeout`. Over the network unless the driver knows better (the simulator's).
    fn probe<'a>(&'a self, _name: &'a str, probe: &'a ServiceProbe, host_ip: &'a str, timeout: Duration) -> BoxFuture<'a, Result<(), probe::ProbeError>> {
        Box::pin(probe::attempt(probe, host_ip, timeout))
    }
}

/// Milliseconds since the Unix epoch, for records shown to people.
#[must_use]
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
