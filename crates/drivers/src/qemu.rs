//! The `qemu` driver: real QEMU guests, controlled over QMP on a UNIX socket.

use crate::diskcopy::{IncomingEndpoint, LocalDiskSize};
use crate::launcher::Launcher;
use crate::qmp::{Qmp, QmpEvent};
use crate::{BoxFuture, DriverError, VmDriver, VmLaunch, VmStatus};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_core::state::{NetworkSpec, VmSpec};

mod cmdline;
mod localserve;
mod sitemirror;

/// How long the guest gets to power down on a stop before QEMU is asked to quit (default of
/// `[qemu] stop_timeout_s`).
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 10;
/// How long one QMP command may take (default of `[qemu] qmp_timeout_ms`); a stopped QEMU never
/// answers, so every command has this deadline.
pub const DEFAULT_QMP_TIMEOUT_MS: u64 = 2000;
/// How long a start keeps trying to reach a new QEMU's QMP socket before it kills it.
pub const QMP_CONNECT_DEADLINE: Duration = Duration::from_secs(15);
/// The pause between two attempts to reach the QMP socket.
pub const QMP_CONNECT_RETRY: Duration = Duration::from_millis(25);
/// How long QEMU gets to exit after `quit` before it is killed.
pub const QUIT_WAIT: Duration = Duration::from_secs(2);

/// Host-side QEMU settings (the VM spec says what to run, this says how on this host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    pub binary: String,
    /// `kvm` on real hosts; `tcg` where KVM is unusable (as on the CI machine).
    pub accel: String,
    /// `microvm` (virtio-mmio devices) or a PCI machine such as `q35`.
    pub machine: String,
    /// The guest CPU model (`-cpu`). Empty: `host` under KVM, `qemu64` under TCG — TCG's `max`
    /// emulates every feature it knows, which made the test guest boot about a second (30 %)
    /// slower here. Hosts that live-migrate between different CPUs should name a common model.
    pub cpu: String,
    /// Seconds between ACPI power-down and a hard kill.
    pub stop_timeout_s: u64,
    /// Timeout of each QMP call, in milliseconds.
    pub qmp_timeout_ms: u64,
    /// The bridges VMs may join (`network.mode = "bridge"`); a spec naming another is refused
    /// on this host.
    pub bridges: Vec<String>,
    /// Where this host keeps the VMs' local disks (`local = true`: their paths are relative
    /// to it).
    pub local_disk_dir: String,
    /// The first port a destination tries for the NBD server that receives local disks.
    pub nbd_port_base: u16,
    /// `qemu-img`, which creates a destination's empty non-raw local images.
    pub img_binary: String,
    /// This host's view of its site's storage: site-mirrored disks (`mirror = true`) are
    /// opened here, their paths relative to it.
    pub site_disk_dir: String,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: "qemu-system-x86_64".into(),
            accel: "kvm".into(),
            machine: "microvm".into(),
            cpu: String::new(),
            stop_timeout_s: DEFAULT_STOP_TIMEOUT_S,
            qmp_timeout_ms: DEFAULT_QMP_TIMEOUT_MS,
            bridges: Vec::new(),
            local_disk_dir: "/var/lib/tandem/disks".into(),
            nbd_port_base: 10_810,
            img_binary: "qemu-img".into(),
            site_disk_dir: "/var/lib/tandem/site".into(),
        }
    }
}

impl QemuConfig {
    /// The `-cpu` model: the configured one, else `host` under KVM and `qemu64` otherwise.
    #[must_use]
    pub fn cpu_model(&self) -> String {
        match (self.cpu.as_str(), self.accel.as_str()) {
            ("", "kvm") => "host".into(),
            ("", _) => "qemu64".into(),
            (model, _) => model.into(),
        }
    }
}

/// Escapes a value placed inside a QEMU `key=value,...` option: QEMU reads a doubled comma as
/// a literal one, so a value can never end the option and start another.
#[must_use]
pub fn escape_option_value(v: &str) -> String {
    v.replace(',', ",,")
}

/// Runs VMs as QEMU processes.
pub struct QemuDriver {
    cfg: QemuConfig,
    launcher: Launcher,
    host_name: String,
    host_ip: String,
    run_dir: PathBuf,
    sessions: Mutex<HashMap<String, Arc<Qmp>>>,
    /// Paused incoming copies whose NBD server (receiving their local disks) still runs.
    serving: Mutex<std::collections::HashSet<String>>,
    /// Its copies' post-copy migrations (prepared for one, spent by one, arriving by one).
    postcopy: crate::postcopy::PostcopyCopies,
    /// Where the cluster uses TLS: the credentials its migrations and disk copies use.
    tls: Option<crate::migtls::MigrationTls>,
    /// How this host serves its site's copies of mirrored disks: the copy server's port and
    /// binary (`[mirror]`); `None`: it serves none.
    /// `[mirror]`: the copy server's port and binary, and what the copy channel asks of both
    /// ends.
    copy_settings: Option<(u16, String, Arc<crate::copychannel::CopyCredentials>)>,
    /// The copy server, started on the first request.
    copy_server: tokio::sync::Mutex<Option<crate::sitecopy::CopyServer>>,
    /// The relays of this host's mirrors, per (VM, disk), and a counter naming their sockets
    /// (short paths: a unix socket's path is at most 107 bytes).
    relays: Mutex<HashMap<(String, usize), Arc<crate::copyrelay::CopyRelay>>>,
    next_relay: std::sync::atomic::AtomicU64,
    /// Wakes the agent's mirror loop (`VmDriver::mirror_events`).
    mirror_events: Arc<tokio::sync::Notify>,
    /// Reads of site copies whose storage failed, before the way back opens them again.
    probes: Arc<crate::pathswitch::StorageProbes>,
    /// The local copy servers of running VMs' mirrored disks, per (VM, disk).
    local_copies: Mutex<HashMap<(String, usize), crate::localcopy::LocalCopyServer>>,
    /// The claims the copy server's exports hold on this site's copies, per export.
    copy_claims: Mutex<HashMap<String, crate::localcopy::CopyClaim>>,
    /// Whether mirrored disks' own copies are served by local copy servers (`[mirror]
    /// local_copy_servers`); else QEMU opens them itself.
    local_copy_servers: bool,
}

impl QemuDriver {
    /// `run_dir` holds QMP sockets and serial logs; `host_ip` replaces `{host_ip}` in port
    /// forwards.
    #[must_use]
    pub fn new(cfg: QemuConfig, launcher: Launcher, host_name: &str, host_ip: &str, run_dir: PathBuf) -> QemuDriver {
        QemuDriver {
            cfg,
            launcher,
            host_name: host_name.to_string(),
            host_ip: host_ip.to_string(),
            run_dir,
            sessions: Mutex::new(HashMap::new()),
            serving: Mutex::default(),
            postcopy: crate::postcopy::PostcopyCopies::default(),
            tls: None,
            copy_settings: None,
            copy_server: tokio::sync::Mutex::new(None),
            relays: Mutex::default(),
            next_relay: std::sync::atomic::AtomicU64::new(0),
            mirror_events: Arc::new(tokio::sync::Notify::new()),
            probes: Arc::default(),
            local_copies: Mutex::default(),
            copy_claims: Mutex::default(),
            local_copy_servers: true,
        }
    }

    /// Sends and receives migrations (memory and local disks) over TLS with `tls`.
    #[must_use]
    pub fn with_migration_tls(mut self, tls: Option<crate::migtls::MigrationTls>) -> QemuDriver {
        self.tls = tls;
        self
    }

    /// Loads this host's TLS credentials into VM `name`'s QEMU for `endpoint`, where the
    /// cluster uses TLS.
    async fn tls_creds(&self, name: &str, q: &Qmp, endpoint: crate::migtls::TlsEndpoint) -> Result<Option<String>, DriverError> {
        match &self.tls {
            Some(tls) => Ok(Some(tls.load(name, q, self.qmp_timeout(), endpoint).await?)),
            None => Ok(None),
        }
    }

    fn qmp_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.qmp_timeout_ms)
    }

    /// The VM's QMP session. One whose connection ended while QEMU still runs (a malformed or
    /// overlong line from QEMU ends it) is replaced by a new connection, so a stop still reaches
    /// the guest's power button rather than killing it.
    async fn session(&self, name: &str) -> Option<Arc<Qmp>> {
        let current = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned()?;
        if !current.is_closed() {
            return Some(current);
        }
        let pid = self.launcher.pid(name).filter(|_| self.launcher.is_running(name))?;
        match self.connect_qmp(name, pid).await {
            Ok(q) => {
                tracing::warn!("{name}: its QMP connection had ended; connected again");
                let q = Arc::new(q);
                self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.to_string(), Arc::clone(&q));
                Some(q)
            }
            Err(e) => {
                tracing::warn!("{name}: its QMP connection had ended and could not be made again: {e}");
                None
            }
        }
    }

    /// Where a local disk's image lives on this host.
    #[must_use]
    pub fn local_disk(&self, relative: &str) -> PathBuf {
        crate::diskcopy::local_path(Path::new(&self.cfg.local_disk_dir), relative)
    }

    fn relays(&self) -> std::sync::MutexGuard<'_, HashMap<(String, usize), Arc<crate::copyrelay::CopyRelay>>> {
        self.relays.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn serving(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.serving.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Before an incoming copy's QEMU starts: an empty image for each local disk it receives.
    async fn create_local_disks(&self, spec: &VmSpec, disks: &[LocalDiskSize]) -> Result<(), DriverError> {
        for d in disks {
            let disk = spec
                .disks
                .get(d.index)
                .filter(|x| x.local && !x.readonly)
                .ok_or_else(|| DriverError::Refused { vm: spec.name.clone(), reason: format!("disk {} is not a writable local disk of this VM", d.index) })?;
            let format = disk.format.as_deref().unwrap_or("raw");
            crate::diskcopy::create_image(&spec.name, &self.cfg.img_binary, &self.local_disk(&disk.path), format, d.bytes).await?;
        }
        Ok(())
    }

    /// The source's mirror of its local disks to the destination, before memory is sent.
    /// Returns the bytes the mirror copied.
    async fn mirror_disks(&self, name: &str, q: &Qmp, to: &crate::migration::MigrationTarget, tls_creds: Option<&str>) -> Result<u64, DriverError> {
        let Some(nbd) = to.nbd.as_deref().filter(|_| !to.disks.is_empty()) else {
            return if to.disks.is_empty() {
                Ok(0)
            } else {
                Err(DriverError::Migration { vm: name.to_string(), reason: "the destination serves no NBD export for the local disks".into() })
            };
        };
        let cancel = Arc::clone(&to.cancel);
        let cancelled = move || cancel.load(std::sync::atomic::Ordering::SeqCst);
        let report = Arc::clone(&to.progress);
        let progress = move |done: u64, left: u64| {
            report(&crate::migration::MigrationProgress {
                status: "copying disks".into(),
                transferred_bytes: done,
                remaining_bytes: left,
                total_bytes: done + left,
                ..Default::default()
            });
        };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(to.overall_ms);
        let target =
            crate::diskcopy::MirrorTarget { nbd, disks: &to.disks, speed: to.max_bandwidth, cancelled: &cancelled, progress: &progress, deadline, tls_creds };
        crate::diskcopy::mirror(name, q, self.qmp_timeout(), &target).await
    }

    /// Puts a bridged VM's tap (which its QEMU created before answering on QMP) on its bridge.
    async fn attach_network(&self, launch: &VmLaunch) -> Result<(), DriverError> {
        match &launch.spec.network {
            Some(NetworkSpec::Bridge { bridge, .. }) => crate::bridge::attach(&launch.spec.name, bridge).await,
            _ => Ok(()),
        }
    }

    async fn connect_qmp(&self, name: &str, pid: u32) -> Result<Qmp, DriverError> {
        let path = self.run_dir.join(format!("{name}.qmp"));
        let deadline = tokio::time::Instant::now() + QMP_CONNECT_DEADLINE;
        loop {
            let launcher = self.launcher.clone();
            let vm = name.to_string();
            let mirror_events = Arc::clone(&self.mirror_events);
            let on_event = move |e: QmpEvent| match e.name.as_str() {
                // A request failed and the guest paused on it (`werror=stop`): a mirrored disk's
                // path may have to switch now, not at the agent's next round.
                "BLOCK_IO_ERROR" => mirror_events.notify_one(),
                "SHUTDOWN" => {
                    if let Some(reason) = e.data.get("reason").and_then(Value::as_str) {
                        launcher.note_shutdown_reason(&vm, pid, reason);
                    }
                    if e.data.get("guest").and_then(Value::as_bool) == Some(true) {
                        launcher.note_guest_event(&vm, pid, false);
                    }
                }
                "GUEST_PANICKED" => launcher.note_guest_event(&vm, pid, true),
                _ => {}
            };
            match Qmp::connect(&path, self.qmp_timeout(), on_event).await {
                Ok(q) => return Ok(q),
                Err(source) => {
                    if !self.launcher.is_running(name) || tokio::time::Instant::now() >= deadline {
                        return Err(DriverError::Qmp { vm: name.to_string(), source });
                    }
                    tokio::time::sleep(QMP_CONNECT_RETRY).await;
                }
            }
        }
    }
}

impl VmDriver for QemuDriver {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn start<'a>(&'a self, launch: &'a VmLaunch) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let name = launch.spec.name.clone();
            std::fs::create_dir_all(&self.run_dir).map_err(|source| DriverError::Spawn { vm: name.clone(), source })?;
            // This host may still serve this site's copy of a mirrored disk to a host of the
            // other site that ran the VM before: that copy server holds the image's lock.
            for (i, _) in launch.spec.mirrored_disks() {
                self.withdraw_site_copy(&crate::sitecopy::export_name(&name, i)).await?;
            }
            let local = self.serve_local_copies(&launch.spec, crate::localcopy::ClaimKind::Sole).await?;
            let cmd = self.command(launch, &local)?;
            let pid = match self.launcher.spawn(&name, launch.generation, cmd, crate::launcher::VcpusAtStart::Running, &launch.check) {
                Ok(pid) => pid,
                Err(e) => {
                    self.end_local_copies(&name);
                    return Err(e);
                }
            };
            self.postcopy.started_afresh(&name);
            let ready = async {
                let q = self.connect_qmp(&name, pid).await?;
                self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.clone(), Arc::new(q));
                self.attach_network(launch).await
            };
            match ready.await {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.launcher.signal(&name, libc::SIGKILL, true);
                    Err(e)
                }
            }
        })
    }

    fn stop<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            if !self.launcher.is_running(name) {
                return Err(DriverError::NotRunning(name.to_string()));
            }
            // Mark the coming exit as ours before asking, so it is not taken for a crash.
            self.launcher.signal(name, 0, true);
            // A guest with an agent shuts itself down when asked; one whose agent does not
            // answer gets the power button below. (The socket exists only for a VM started with
            // the channel.)
            let qga = crate::qga::socket_path(&self.run_dir, name);
            if qga.exists() {
                match crate::qga::shutdown(&qga, crate::qga::SYNC_TIMEOUT).await {
                    Ok(()) => {
                        if self.launcher.wait_exit(name, Duration::from_secs(self.cfg.stop_timeout_s)).await {
                            tracing::info!("{name}: shut down by its guest agent");
                            return Ok(());
                        }
                        tracing::warn!("{name}: its guest agent took the shutdown request but the guest still runs; the power button next");
                    }
                    Err(e) => tracing::info!("{name}: {e}; the power button instead"),
                }
            }
            if let Some(q) = self.session(name).await {
                // The ACPI power button, pressed again halfway: a guest that was not listening
                // yet (still booting) misses the first press.
                let half = Duration::from_millis(self.cfg.stop_timeout_s * 500);
                for _ in 0..2 {
                    let _ = q.execute("system_powerdown", Value::Null, self.qmp_timeout()).await;
                    if self.launcher.wait_exit(name, half).await {
                        return Ok(());
                    }
                }
                let _ = q.execute("quit", Value::Null, self.qmp_timeout()).await;
                if self.launcher.wait_exit(name, QUIT_WAIT).await {
                    return Ok(());
                }
            }
            self.launcher.kill_and_wait(name).await
        })
    }

    fn kill(&self, name: &str) -> Result<(), DriverError> {
        self.launcher.kill(name)
    }

    fn kill_all(&self) -> usize {
        let killed = self.launcher.kill_all();
        self.end_all_local_copies();
        killed
    }

    fn kill_for_good<'a>(&'a self, name: &'a str, bound: std::time::Duration) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            // Its relays first: nothing it had sent is carried to another site's copy after this.
            self.relays().retain(|(vm, _), _| vm != name);
            let inert = self.launcher.kill_until_inert(name, bound).await;
            // (A server stuck in storage keeps its claim on the copy until it has exited.)
            self.end_local_copies(name);
            inert
        })
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
        disks: &'a [LocalDiskSize],
        multifd_channels: u8,
    ) -> BoxFuture<'a, Result<IncomingEndpoint, DriverError>> {
        Box::pin(async move {
            let name = launch.spec.name.clone();
            std::fs::create_dir_all(&self.run_dir).map_err(|source| DriverError::Spawn { vm: name.clone(), source })?;
            // An older copy still running here (about to be killed by the reconciler) may hold
            // the image open: it is not recreated under it; the source asks again.
            if self.launcher.is_running(&name) {
                return Err(DriverError::AlreadyRunning(name));
            }
            self.create_local_disks(&launch.spec, disks).await?;
            // The source's servers share the copies until it stops.
            let local = self.serve_local_copies(&launch.spec, crate::localcopy::ClaimKind::Shared).await?;
            let mut cmd = self.command(launch, &local)?;
            // Paused, and listening only once asked (so the port is the kernel's choice).
            cmd.args(["-S", "-incoming", "defer"]);
            let pid = match self.launcher.spawn(&name, launch.generation, cmd, crate::launcher::VcpusAtStart::Held, &launch.check) {
                Ok(pid) => pid,
                Err(e) => {
                    self.end_local_copies(&name);
                    return Err(e);
                }
            };
            self.postcopy.started_afresh(&name);
            let ready = async {
                let q = Arc::new(self.connect_qmp(&name, pid).await?);
                self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.clone(), Arc::clone(&q));
                self.attach_network(launch).await?;
                let tls = self.tls_creds(&name, &q, crate::migtls::TlsEndpoint::Server).await?;
                let nbd = if disks.is_empty() {
                    None
                } else {
                    let indices: Vec<usize> = disks.iter().map(|d| d.index).collect();
                    let addr = crate::diskcopy::serve(&name, &q, self.qmp_timeout(), &self.host_ip, self.cfg.nbd_port_base, &indices, tls.as_deref()).await?;
                    self.serving().insert(name.clone());
                    Some(addr)
                };
                let postcopy = !launch.spec.postcopy.is_off();
                if postcopy {
                    self.postcopy.prepared(&name);
                }
                let uri = crate::migration::prepare_incoming(&name, &q, &self.host_ip, self.qmp_timeout(), multifd_channels, tls.as_deref(), postcopy).await?;
                Ok(IncomingEndpoint { uri, nbd })
            };
            match ready.await {
                Ok(endpoint) => Ok(endpoint),
                Err(e) => {
                    self.launcher.signal(&name, libc::SIGKILL, true);
                    Err(e)
                }
            }
        })
    }

    fn migrate_out<'a>(
        &'a self,
        name: &'a str,
        to: &'a crate::migration::MigrationTarget,
    ) -> BoxFuture<'a, Result<crate::migration::MigrationReport, DriverError>> {
        Box::pin(async move {
            let q = self.session(name).await.filter(|_| self.launcher.is_running(name)).ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
            self.postcopy.arrived(name).await?;
            let tls = self.tls_creds(name, &q, crate::migtls::TlsEndpoint::Client).await?;
            let mirror_started = std::time::Instant::now();
            let disk_bytes = self.mirror_disks(name, &q, to, tls.as_deref()).await?;
            let disk_ms = u64::try_from(mirror_started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let sent = crate::migration::migrate_out(name, &q, self.qmp_timeout(), to, tls.as_deref()).await;
            if sent.is_err() && !to.disks.is_empty() {
                crate::diskcopy::abandon(&q, self.qmp_timeout(), &to.disks).await;
            }
            let report = match sent {
                Ok(r) => r,
                Err(e) => {
                    // A migration that failed in its completion stopped the vCPUs; QEMU restarts
                    // them, but a guest left stopped must be seen as a paused copy, or nothing
                    // would ever resume it (the reconciler resumes paused copies committed state
                    // places here).
                    match crate::migration::state_after_failure(name, &q, self.qmp_timeout()).await {
                        Ok(state) if state == "running" => {}
                        Ok(state) => {
                            tracing::warn!("{name}: QEMU left the guest {state} after the migration ended without completing; it counts as paused");
                            self.launcher.set_paused(name, true);
                        }
                        Err(q) => tracing::warn!("{name}: QEMU's state after the migration ended without completing is unknown: {q}"),
                    }
                    return Err(e);
                }
            };
            // Completed: the guest's vCPUs are stopped here for good unless the migration is
            // aborted — and for good whatever happens once it switched to post-copy.
            self.launcher.set_paused(name, true);
            tracing::debug!("{name}: memory copy completed (QEMU downtime {:?} ms)", report.downtime_ms);
            if report.postcopy {
                self.postcopy.spend(name);
            }
            // Its local disks' mirrors concluded in sync in QEMU's pause before the switchover
            // (`migration::migrate_out`), so the destination holds every write.
            let disks = (!to.disks.is_empty()).then_some(crate::migration::DiskCopyReport { copy_ms: disk_ms, bytes: disk_bytes });
            Ok(crate::migration::MigrationReport { disks, ..report })
        })
    }

    fn resume<'a>(&'a self, name: &'a str, check: &'a crate::StartCheck) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let q = self.session(name).await.filter(|_| self.launcher.is_running(name)).ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
            check().map_err(|reason| DriverError::Refused { vm: name.to_string(), reason })?;
            if self.postcopy.is_spent(name) {
                let reason = "its memory left with a post-copy migration: it can only be started afresh".to_string();
                return Err(DriverError::Refused { vm: name.to_string(), reason });
            }
            if self.serving().contains(name) {
                // From here on only its guest writes its disks.
                crate::diskcopy::stop_serving(name, &q, self.qmp_timeout()).await?;
                self.serving().remove(name);
            }
            // Listed running before `cont`, not after: a listing never shows paused a copy whose
            // vCPUs may already run (if `cont` fails, the caller kills the copy).
            self.launcher.set_paused(name, false);
            crate::migration::resume(name, &q, self.qmp_timeout()).await?;
            // Only a copy prepared for post-copy can be in it; the others resume as before.
            if self.postcopy.take_prepared(name) && crate::postcopy::incoming_active(name, &q, self.qmp_timeout()).await.unwrap_or(false) {
                self.postcopy.watch(name, q, self.qmp_timeout(), self.launcher.clone());
            }
            Ok(())
        })
    }

    fn finish_postcopy<'a>(&'a self, name: &'a str, bound: Duration) -> BoxFuture<'a, Result<crate::postcopy::Served, DriverError>> {
        Box::pin(async move {
            let q = self.session(name).await.filter(|_| self.launcher.is_running(name)).ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
            crate::postcopy::serve(name, &q, self.qmp_timeout(), bound).await
        })
    }

    fn disk_sizes<'a>(&'a self, name: &'a str, disks: &'a [usize]) -> BoxFuture<'a, Result<Vec<LocalDiskSize>, DriverError>> {
        Box::pin(async move {
            if disks.is_empty() {
                return Ok(Vec::new());
            }
            let q = self.session(name).await.filter(|_| self.launcher.is_running(name)).ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
            let block = q
                .execute("query-block", serde_json::Value::Null, self.qmp_timeout())
                .await
                .map_err(|source| DriverError::Qmp { vm: name.to_string(), source })?;
            disks
                .iter()
                .map(|i| {
                    let id = format!("disk{i}");
                    let dev = block.as_array().and_then(|a| a.iter().find(|d| d.get("device").and_then(serde_json::Value::as_str) == Some(&id)));
                    let bytes = dev.and_then(|d| d.pointer("/inserted/image/virtual-size")).and_then(serde_json::Value::as_u64);
                    bytes
                        .map(|bytes| LocalDiskSize { index: *i, bytes })
                        .ok_or_else(|| DriverError::Migration { vm: name.to_string(), reason: format!("QEMU does not say the size of disk {i}") })
                })
                .collect()
        })
    }

    fn serve_copy<'a>(&'a self, export: &'a str, relative: &'a str, bytes: u64) -> BoxFuture<'a, Result<String, DriverError>> {
        Box::pin(self.serve_site_copy(export, relative, bytes))
    }

    fn withdraw_copy<'a>(&'a self, export: &'a str) -> BoxFuture<'a, Result<Vec<String>, DriverError>> {
        Box::pin(self.withdraw_site_copy(export))
    }

    fn mirror_events(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(Arc::clone(&self.mirror_events))
    }

    fn served_copies(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(self.site_copies())
    }

    fn attach_mirror<'a>(&'a self, name: &'a str, to: &'a crate::syncmirror::MirrorTarget) -> BoxFuture<'a, Result<crate::syncmirror::FirstCopy, DriverError>> {
        Box::pin(self.attach_site_mirror(name, to))
    }

    fn mirror_status<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<crate::syncmirror::MirrorStatus, DriverError>> {
        Box::pin(self.site_mirror_status(name, disk))
    }

    fn release_mirror<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        self.release_site_mirror(name, disk);
        Box::pin(async { Ok(()) })
    }

    fn resume_mirror<'a>(&'a self, name: &'a str, disk: usize, server: &'a str) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.resume_site_mirror(name, disk, server))
    }

    fn detach_mirror<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.detach_site_mirror(name, disk))
    }

    fn failed_disks<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<usize>, DriverError>> {
        Box::pin(self.storage_failed_disks(name))
    }

    fn probe_site_copy<'a>(&'a self, relative: &'a str) -> Option<BoxFuture<'a, crate::pathswitch::ProbeAnswer>> {
        Some(Box::pin(async move { self.probes.probe(&crate::diskcopy::local_path(std::path::Path::new(&self.cfg.site_disk_dir), relative)).await }))
    }

    fn switch_to_copy<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.switch_disk_to_copy(name, disk))
    }

    fn return_to_local<'a>(&'a self, name: &'a str, disk: usize, step: &'a crate::pathswitch::ReturnStep) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.return_disk_to_local(name, disk, step))
    }

    fn local_reach(&self, name: &str, disk: usize) -> tandem_core::mirroring::LocalReach {
        self.local_reach_of(name, disk)
    }

    fn cut_local<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.cut_local_copy(name, disk))
    }

    fn forget(&self, name: &str) {
        self.end_local_copies(name);
        self.serving().remove(name);
        self.relays().retain(|(vm, _), _| vm != name);
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(name);
        self.launcher.forget(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::state::{DiskSpec, DriverSpec, Protection, VmSpec};

    fn spec() -> VmSpec {
        VmSpec {
            name: "web".into(),
            vcpus: 1,
            memory_mib: 128,
            disks: vec![DiskSpec { path: "/shared/a,file.locking=off".into(), format: None, readonly: false, local: false, mirror: false }],
            network: Some(NetworkSpec::User { hostfwd: vec!["tcp:{host_ip}:8080-:80".into()] }),
            protection: Protection::Protect,
            priority: 0,
            restart_group: 0,
            driver: DriverSpec::Qemu { kernel: Some("/srv/vmlinuz".into()), initrd: None, cmdline: None, extra_args: vec![], guest_agent: false },
            probe: None,
            postcopy: tandem_core::spec::Postcopy::Off,
        }
    }

    fn args(d: &QemuDriver, spec: VmSpec) -> Result<Vec<String>, DriverError> {
        let c = d.command(&VmLaunch { spec, generation: 1, check: crate::always_start() }, &std::collections::BTreeMap::new())?;
        Ok(c.get_args().map(|a| a.to_string_lossy().into_owned()).collect())
    }

    /// A comma in a disk path stays part of the file name; a hostile port forward or tap name
    /// never reaches QEMU.
    #[test]
    fn spec_values_cannot_add_qemu_options() {
        let dir = std::env::temp_dir().join(format!("tandem-qemu-args-{}", std::process::id()));
        let d = QemuDriver::new(QemuConfig::default(), Launcher::new().expect("launcher"), "h0", "127.0.0.1", dir.clone());
        std::fs::create_dir_all(&dir).expect("dir");
        let a = args(&d, spec()).expect("ordinary spec");
        assert!(a.iter().any(|x| x.starts_with("file=/shared/a,,file.locking=off,if=none")), "{a:?}");
        assert!(a.iter().any(|x| x == "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80"), "{a:?}");
        let mut evil = spec();
        evil.network = Some(NetworkSpec::User { hostfwd: vec!["tcp::1-:2,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh".into()] });
        assert!(matches!(args(&d, evil), Err(DriverError::Refused { .. })));
        let mut evil = spec();
        evil.network = Some(NetworkSpec::Tap { ifname: "t0,script=/tmp/x".into(), mac: None });
        assert!(matches!(args(&d, evil), Err(DriverError::Refused { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A bridged VM gets its tap (named after it), its own MAC and, on its kernel command line,
    /// its address; a bridge the host does not allow is refused before anything runs.
    #[test]
    fn a_bridged_vm_gets_its_tap_mac_and_address() {
        let dir = std::env::temp_dir().join(format!("tandem-qemu-bridge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = QemuConfig { bridges: vec!["vmbr0".into()], ..QemuConfig::default() };
        let d = QemuDriver::new(cfg, Launcher::new().expect("launcher"), "h0", "127.0.0.1", dir.clone());
        let mut bridged = spec();
        bridged.network = Some(NetworkSpec::Bridge { bridge: "vmbr0".into(), mac: "52:54:00:ab:cd:01".into(), address: Some("198.18.0.100/24".into()) });
        let a = args(&d, bridged.clone()).expect("allowed bridge");
        let tap = crate::bridge::tap_name("web");
        assert!(a.iter().any(|x| *x == format!("tap,id=net0,ifname={tap},script=no,downscript=no")), "{a:?}");
        assert!(a.iter().any(|x| x == "virtio-net-device,netdev=net0,mac=52:54:00:ab:cd:01"), "{a:?}");
        assert!(a.windows(2).any(|w| w[0] == "-append" && w[1].ends_with("tandem.vm=web tandem.ip=198.18.0.100/24")), "{a:?}");
        bridged.network = Some(NetworkSpec::Bridge { bridge: "mgmt0".into(), mac: "52:54:00:ab:cd:01".into(), address: None });
        assert!(matches!(args(&d, bridged), Err(DriverError::Refused { reason, .. }) if reason.contains("mgmt0")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The CPU model follows the accelerator unless configured: `host` under KVM, `qemu64`
    /// under TCG (whose `max` boots the test guest a second slower), and reaches the command line.
    #[test]
    fn the_cpu_model_follows_the_accelerator_unless_configured() {
        let mut cfg = QemuConfig::default();
        assert_eq!(cfg.cpu_model(), "host");
        cfg.accel = "tcg".into();
        assert_eq!(cfg.cpu_model(), "qemu64");
        cfg.cpu = "Skylake-Server".into();
        assert_eq!(cfg.cpu_model(), "Skylake-Server");
        let dir = std::env::temp_dir().join(format!("tandem-qemu-cpu-{}", std::process::id()));
        let d = QemuDriver::new(cfg, Launcher::new().expect("launcher"), "h0", "127.0.0.1", dir.clone());
        std::fs::create_dir_all(&dir).expect("dir");
        let a = args(&d, spec()).expect("spec");
        assert!(a.windows(2).any(|w| w[0] == "-cpu" && w[1] == "Skylake-Server"), "{a:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
