//! A host that runs both QEMU guests and plain process workloads: each VM goes to the driver its
//! spec names. The fault suite uses it to run a few real guests next to many cheap workloads.

use crate::launcher::Launcher;
use crate::process::ProcessDriver;
use crate::qemu::{QemuConfig, QemuDriver};
use crate::{BoxFuture, DriverError, VmDriver, VmLaunch, VmStatus};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use tandem_core::state::DriverSpec;

/// Dispatches by the VM's driver spec. Both sub-drivers start their children through one
/// launcher, whose table is the one list of this host's VMs: listing, killing and forgetting go
/// through it once, and each VM's stop goes to the driver that started it.
pub struct MixedDriver {
    qemu: QemuDriver,
    process: ProcessDriver,
    launcher: Launcher,
    /// Which sub-driver started each VM: true for QEMU.
    started_by_qemu: Mutex<BTreeMap<String, bool>>,
}

impl MixedDriver {
    /// Both sub-drivers on `launcher`.
    #[must_use]
    pub fn new(launcher: Launcher, qemu: QemuConfig, host_name: &str, host_ip: &str, run_dir: PathBuf, stop_timeout: Duration) -> MixedDriver {
        MixedDriver {
            qemu: QemuDriver::new(qemu, launcher.clone(), host_name, host_ip, run_dir),
            process: ProcessDriver::new(launcher.clone(), host_name, stop_timeout),
            launcher,
            started_by_qemu: Mutex::new(BTreeMap::new()),
        }
    }

    /// Its QEMU guests migrate over TLS with `tls` (see [`QemuDriver::with_migration_tls`]).
    #[must_use]
    pub fn with_migration_tls(self, tls: Option<crate::migtls::MigrationTls>) -> MixedDriver {
        MixedDriver { qemu: self.qemu.with_migration_tls(tls), ..self }
    }

    /// Its QEMU side serves this site's copies (see [`QemuDriver::with_copy_server`]).
    #[must_use]
    pub fn with_copy_server(self, port: u16, binary: &str, credentials: std::sync::Arc<crate::copychannel::CopyCredentials>) -> MixedDriver {
        MixedDriver { qemu: self.qemu.with_copy_server(port, binary, credentials), ..self }
    }

    /// Its QEMU side's local copy servers on or off (see [`QemuDriver::with_local_copy_servers`]).
    #[must_use]
    pub fn with_local_copy_servers(self, on: bool) -> MixedDriver {
        MixedDriver { qemu: self.qemu.with_local_copy_servers(on), ..self }
    }

    fn owner(&self, name: &str) -> &dyn VmDriver {
        let qemu = self.started_by_qemu.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).copied().unwrap_or(false);
        if qemu {
            &self.qemu
        } else {
            &self.process
        }
    }
}

impl VmDriver for MixedDriver {
    fn kind(&self) -> &'static str {
        "mixed"
    }

    fn start<'a>(&'a self, launch: &'a VmLaunch) -> BoxFuture<'a, Result<(), DriverError>> {
        let qemu = matches!(launch.spec.driver, DriverSpec::Qemu { .. });
        self.started_by_qemu.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(launch.spec.name.clone(), qemu);
        if qemu {
            self.qemu.start(launch)
        } else {
            self.process.start(launch)
        }
    }

    fn stop<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DriverError>> {
        self.owner(name).stop(name)
    }

    fn kill(&self, name: &str) -> Result<(), DriverError> {
        self.owner(name).kill(name)
    }

    fn kill_all(&self) -> usize {
        self.launcher.kill_all()
    }

    fn exits(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        Some(self.launcher.exits())
    }

    fn list(&self) -> Vec<VmStatus> {
        self.launcher.list()
    }

    fn prepare_incoming<'a>(
        &'a self,
        launch: &'a VmLaunch,
        disks: &'a [crate::diskcopy::LocalDiskSize],
        multifd_channels: u8,
    ) -> BoxFuture<'a, Result<crate::diskcopy::IncomingEndpoint, DriverError>> {
        let qemu = matches!(launch.spec.driver, DriverSpec::Qemu { .. });
        self.started_by_qemu.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(launch.spec.name.clone(), qemu);
        if qemu {
            self.qemu.prepare_incoming(launch, disks, multifd_channels)
        } else {
            self.process.prepare_incoming(launch, disks, multifd_channels)
        }
    }

    fn disk_sizes<'a>(&'a self, name: &'a str, disks: &'a [usize]) -> BoxFuture<'a, Result<Vec<crate::diskcopy::LocalDiskSize>, DriverError>> {
        self.qemu.disk_sizes(name, disks)
    }

    fn migrate_out<'a>(
        &'a self,
        name: &'a str,
        to: &'a crate::migration::MigrationTarget,
    ) -> BoxFuture<'a, Result<crate::migration::MigrationReport, DriverError>> {
        self.owner(name).migrate_out(name, to)
    }

    fn resume<'a>(&'a self, name: &'a str, check: &'a crate::StartCheck) -> BoxFuture<'a, Result<(), DriverError>> {
        self.owner(name).resume(name, check)
    }

    fn finish_postcopy<'a>(&'a self, name: &'a str, bound: std::time::Duration) -> BoxFuture<'a, Result<crate::postcopy::Served, DriverError>> {
        self.owner(name).finish_postcopy(name, bound)
    }

    fn serve_copy<'a>(&'a self, export: &'a str, relative: &'a str, bytes: u64) -> BoxFuture<'a, Result<String, DriverError>> {
        self.qemu.serve_copy(export, relative, bytes)
    }

    fn withdraw_copy<'a>(&'a self, export: &'a str) -> BoxFuture<'a, Result<Vec<String>, DriverError>> {
        self.qemu.withdraw_copy(export)
    }

    fn served_copies(&self) -> BoxFuture<'_, Vec<String>> {
        self.qemu.served_copies()
    }

    fn mirror_events(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        self.qemu.mirror_events()
    }

    fn attach_mirror<'a>(&'a self, name: &'a str, to: &'a crate::syncmirror::MirrorTarget) -> BoxFuture<'a, Result<crate::syncmirror::FirstCopy, DriverError>> {
        self.owner(name).attach_mirror(name, to)
    }

    fn mirror_status<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<crate::syncmirror::MirrorStatus, DriverError>> {
        self.owner(name).mirror_status(name, disk)
    }

    fn release_mirror<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        self.owner(name).release_mirror(name, disk)
    }

    fn resume_mirror<'a>(&'a self, name: &'a str, disk: usize, server: &'a str) -> BoxFuture<'a, Result<(), DriverError>> {
        self.owner(name).resume_mirror(name, disk, server)
    }

    fn detach_mirror<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        self.owner(name).detach_mirror(name, disk)
    }

    fn failed_disks<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<usize>, DriverError>> {
        self.owner(name).failed_disks(name)
    }

    fn probe_site_copy<'a>(&'a self, relative: &'a str) -> Option<BoxFuture<'a, crate::pathswitch::ProbeAnswer>> {
        self.qemu.probe_site_copy(relative)
    }

    fn switch_to_copy<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        self.owner(name).switch_to_copy(name, disk)
    }

    fn return_to_local<'a>(&'a self, name: &'a str, disk: usize, step: &'a crate::pathswitch::ReturnStep) -> BoxFuture<'a, Result<(), DriverError>> {
        self.owner(name).return_to_local(name, disk, step)
    }

    fn forget(&self, name: &str) {
        // The QEMU driver also drops its QMP session; the launcher record goes either way.
        self.qemu.forget(name);
        self.started_by_qemu.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process_vm(name: &str, script: &str) -> VmLaunch {
        crate::process::tests::launch(name, &["sh", "-c", script])
    }

    /// Both sub-drivers share one launcher: every VM is listed once, counted once when killed,
    /// and a process VM is stopped the process way (SIGTERM first), not as a QEMU guest.
    #[tokio::test]
    async fn each_vm_is_listed_killed_and_stopped_once_by_its_own_driver() {
        let dir = std::env::temp_dir().join(format!("tandem-mixed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let d = MixedDriver::new(Launcher::new().expect("launcher"), QemuConfig::default(), "h0", "127.0.0.1", dir.join("run"), Duration::from_secs(3));
        let mark = dir.join("got-sigterm");
        d.start(&process_vm("p1", &format!("trap 'touch {}; exit 0' TERM; while :; do sleep 0.05; done", mark.display()))).await.expect("start p1");
        d.start(&process_vm("p2", "sleep 100")).await.expect("start p2");
        assert_eq!(d.list().len(), 2, "listed once each: {:?}", d.list());
        tokio::time::sleep(Duration::from_millis(200)).await;
        d.stop("p1").await.expect("stop p1");
        assert!(mark.exists(), "a process VM is asked with SIGTERM before it is killed");
        assert_eq!(d.kill_all(), 1, "kill_all counts each VM once");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
