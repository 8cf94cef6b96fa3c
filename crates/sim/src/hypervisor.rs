//! The simulated hypervisor: a host's VMs are rows of the world's run table, so a second
//! running copy of a VM is seen at the instant it starts or resumes; a live migration's paused
//! copies are not rows until they resume, and `World::images` follows which memory each holds.

use crate::world::{lock, World};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_drivers::{BoxFuture, DriverError, VmDriver, VmExit, VmLaunch, VmStatus};

/// What the simulator knows of a VM's memory, to tell a stale resume.
#[derive(Clone, Debug, Default)]
pub struct VmImage {
    /// Bumped whenever a copy begins to run (start or resume): its memory moves on from there.
    pub runs: u64,
    /// (host, generation) → the `runs` value its paused copy holds the memory of.
    pub paused: BTreeMap<(u32, u64), u64>,
    /// A post-copy migration's pages still at its source (see `postcopy`).
    pub pages_at_source: Option<crate::postcopy::PagesAtSource>,
}

/// How long a simulated migration copies memory (virtual time), and how long a link may be cut
/// before the copy fails.
pub const SIM_MIGRATION_COPY_MS: u64 = 400;
pub const SIM_MIGRATION_LINK_LOSS_MS: u64 = 1_000;

/// A host's hypervisor: VMs are entries in the world's run table, so two hosts running one VM
/// is seen the moment it happens.
pub struct SimDriver {
    pub world: Arc<World>,
    pub me: u32,
    pub name: String,
    vms: Mutex<BTreeMap<String, VmStatus>>,
    next_pid: Mutex<u32>,
    /// Cleared when the host loses power: this driver's VMs are gone, and an operation the old
    /// agent still had in flight must not bring one back (the host boots a new driver).
    powered: std::sync::atomic::AtomicBool,
    /// Copies whose migration switched to post-copy: never resumed (see `postcopy`).
    spent: Mutex<std::collections::BTreeSet<String>>,
    /// VMs started or received here whose spec has a writable local disk.
    local_disk: Mutex<std::collections::BTreeSet<String>>,
    /// The mirrors of this host's VMs' mirrored disks: VM → disk → link (see `mirror`).
    mirrors: Mutex<BTreeMap<String, BTreeMap<usize, crate::mirror::SimLink>>>,
}

impl SimDriver {
    pub fn new(world: Arc<World>, me: u32, name: String) -> SimDriver {
        SimDriver {
            world,
            me,
            name,
            vms: Mutex::new(BTreeMap::new()),
            next_pid: Mutex::new(1),
            powered: std::sync::atomic::AtomicBool::new(true),
            spent: Mutex::default(),
            local_disk: Mutex::default(),
            mirrors: Mutex::default(),
        }
    }

    /// The host lost power: this driver runs nothing from now on.
    pub fn power_lost(&self) {
        self.powered.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether this driver's host is powered and up (checked with no await before the change it
    /// guards).
    fn up(&self) -> bool {
        self.powered.load(std::sync::atomic::Ordering::SeqCst) && !lock(&self.world.cond).down.contains(&self.me)
    }

    fn end(&self, name: &str, exit: VmExit) -> bool {
        let mut vms = lock(&self.vms);
        let Some(v) = vms.get_mut(name).filter(|v| v.exit.is_none()) else { return false };
        v.exit = Some(exit);
        if let Some(hosts) = lock(&self.world.running).get_mut(name) {
            hosts.remove(&self.me);
        }
        true
    }

    /// The guest powers itself off (as QMP SHUTDOWN guest=true reports it).
    pub fn guest_shutdown(&self, name: &str) -> bool {
        let done = self.end(name, VmExit::GuestShutdown);
        if done {
            self.world.log(format!("{}: {name} shut down from inside the guest", self.name));
        }
        done
    }

    /// Whether the VM still runs in the world (a power loss removes it behind the driver's back).
    fn sync_power(&self) {
        let running = lock(&self.world.running);
        // A paused copy is not in the run table (its vCPUs do not run); a power loss takes it
        // with the driver, which the simulator replaces.
        for v in lock(&self.vms).values_mut().filter(|v| v.exit.is_none() && !v.paused) {
            if !running.get(&v.name).is_some_and(|h| h.contains_key(&self.me)) {
                v.exit = Some(VmExit::Crashed { detail: "host lost power".into() });
            }
        }
        drop(running);
        // A guest resumed in post-copy whose missing pages cannot come any more is lost (the
        // QEMU driver kills such a copy); its host restarts it from its disk.
        let lost: Vec<(String, String)> = lock(&self.vms)
            .values()
            .filter(|v| v.exit.is_none() && !v.paused)
            .filter_map(|v| Some((v.name.clone(), crate::postcopy::missing_pages(&self.world, &v.name, self.me, v.generation)?)))
            .collect();
        for (name, why) in lost {
            if self.end(&name, VmExit::Crashed { detail: format!("post-copy: {why}") }) {
                self.world.log(format!("{}: {name} lost its post-copy pages ({why}); killed", self.name));
            }
        }
    }
}

impl VmDriver for SimDriver {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn start<'a>(&'a self, launch: &'a VmLaunch) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let name = launch.spec.name.clone();
            if lock(&self.vms).get(&name).is_some_and(|v| v.exit.is_none()) {
                return Err(DriverError::AlreadyRunning(name));
            }
            self.world.thawed(self.me).await;
            let w = &self.world;
            if !self.up() {
                return Err(DriverError::NotRunning(name));
            }
            // The last-instant check, with no await between it and the VM appearing (the
            // simulator runs on one thread, so nothing can fence this host in between); as with
            // a real driver, the process exists from here on and boots afterwards.
            (launch.check)().map_err(|reason| DriverError::Refused { vm: name.clone(), reason })?;
            let others: Vec<u32> = {
                let mut running = lock(&w.running);
                let hosts = running.entry(name.clone()).or_default();
                let others = hosts.keys().copied().filter(|h| *h != self.me).collect();
                hosts.insert(self.me, launch.generation);
                others
            };
            if !others.is_empty() {
                let detail = format!("{name} started on {} (generation {}) while it runs on host(s) {others:?}", self.name, launch.generation);
                w.violation(crate::oracle::Violation::new(crate::oracle::Invariant::DoubleRun, detail));
            }
            lock(&w.images).entry(name.clone()).or_default().runs += 1;
            crate::postcopy::started_afresh(w, &name);
            if launch.spec.copied_disks().next().is_some() {
                if let Some(why) = crate::localdisk::runs(w, &name, self.me) {
                    w.violation(crate::oracle::Violation::new(crate::oracle::Invariant::StaleDisk, why));
                }
            }
            // A fresh start runs from this site's copy, with no mirror yet.
            lock(&self.mirrors).remove(&name);
            if launch.spec.site_mirrored() {
                if let Some(why) = crate::mirror::runs(w, &name, self.me) {
                    w.violation(crate::oracle::Violation::new(crate::oracle::Invariant::StaleCopy, why));
                }
            }
            w.log(format!("{}: {name} runs (generation {})", self.name, launch.generation));
            let pid = {
                let mut p = lock(&self.next_pid);
                *p += 1;
                *p
            };
            lock(&self.spent).remove(&name);
            if launch.spec.copied_disks().next().is_some() {
                lock(&self.local_disk).insert(name.clone());
            }
            lock(&self.vms).insert(
                name.clone(),
                VmStatus { name, generation: launch.generation, pid, started_at_ms: w.now_ms(), exit: None, paused: false, shutdown_reason: None },
            );
            // Booting takes a moment of virtual time.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(())
        })
    }

    fn stop<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.world.thawed(self.me).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.end(name, VmExit::StoppedByAgent) {
                self.world.log(format!("{}: {name} stopped", self.name));
                Ok(())
            } else {
                Err(DriverError::NotRunning(name.to_string()))
            }
        })
    }

    fn kill(&self, name: &str) -> Result<(), DriverError> {
        if lock(&self.spent).contains(name) {
            crate::postcopy::lose(&self.world, name, self.me, "the source's copy was killed");
        }
        if self.end(name, VmExit::StoppedByAgent) {
            self.world.log(format!("{}: {name} killed", self.name));
            Ok(())
        } else {
            Err(DriverError::NotRunning(name.to_string()))
        }
    }

    fn kill_all(&self) -> usize {
        let names: Vec<String> = lock(&self.vms).values().filter(|v| v.exit.is_none()).map(|v| v.name.clone()).collect();
        names.iter().filter(|n| self.kill(n).is_ok()).count()
    }

    fn list(&self) -> Vec<VmStatus> {
        self.sync_power();
        lock(&self.vms).values().cloned().collect()
    }

    fn forget(&self, name: &str) {
        let mut vms = lock(&self.vms);
        if vms.get(name).is_some_and(|v| v.exit.is_some()) {
            vms.remove(name);
        }
    }

    /// A paused copy that holds no memory yet: it receives the source's at the migration's end.
    fn prepare_incoming<'a>(
        &'a self,
        launch: &'a VmLaunch,
        _disks: &'a [tandem_drivers::diskcopy::LocalDiskSize],
        _multifd_channels: u8,
    ) -> BoxFuture<'a, Result<tandem_drivers::diskcopy::IncomingEndpoint, DriverError>> {
        Box::pin(async move {
            let name = launch.spec.name.clone();
            if lock(&self.vms).get(&name).is_some_and(|v| v.exit.is_none()) {
                return Err(DriverError::AlreadyRunning(name));
            }
            self.world.thawed(self.me).await;
            if !self.up() {
                return Err(DriverError::NotRunning(name));
            }
            (launch.check)().map_err(|reason| DriverError::Refused { vm: name.clone(), reason })?;
            let pid = {
                let mut p = lock(&self.next_pid);
                *p += 1;
                *p
            };
            let status = VmStatus {
                name: name.clone(),
                generation: launch.generation,
                pid,
                started_at_ms: self.world.now_ms(),
                exit: None,
                paused: true,
                shutdown_reason: None,
            };
            lock(&self.spent).remove(&name);
            if launch.spec.copied_disks().next().is_some() {
                lock(&self.local_disk).insert(name.clone());
            }
            lock(&self.vms).insert(name.clone(), status);
            self.world.log(format!("{}: {name} waits paused for its migration (generation {})", self.name, launch.generation));
            Ok(tandem_drivers::diskcopy::IncomingEndpoint { uri: format!("sim:{}:{}", self.me, launch.generation), nbd: None })
        })
    }

    /// Copies for [`SIM_MIGRATION_COPY_MS`] of virtual time while source and destination reach
    /// each other (a cut longer than [`SIM_MIGRATION_LINK_LOSS_MS`] fails it), then stops this
    /// copy's vCPUs and hands its memory to the destination's paused copy.
    fn migrate_out<'a>(
        &'a self,
        name: &'a str,
        to: &'a tandem_drivers::migration::MigrationTarget,
    ) -> BoxFuture<'a, Result<tandem_drivers::migration::MigrationReport, DriverError>> {
        Box::pin(async move {
            let fail = |reason: &str| DriverError::Migration { vm: name.to_string(), reason: reason.to_string() };
            let mut parts = to.uri.split(':').skip(1);
            let (Some(dest), Some(generation)) = (parts.next().and_then(|x| x.parse::<u32>().ok()), parts.next().and_then(|x| x.parse::<u64>().ok())) else {
                return Err(fail("not a simulated destination"));
            };
            let w = &self.world;
            let (mut copied, mut cut) = (0u64, 0u64);
            // A VM that allows post-copy switches halfway (the simulator does not model
            // convergence: a first pass, then the switch).
            let copy_ms = if to.postcopy.is_off() { SIM_MIGRATION_COPY_MS } else { SIM_MIGRATION_COPY_MS / 2 };
            while copied < copy_ms {
                tokio::time::sleep(Duration::from_millis(50)).await;
                w.thawed(self.me).await;
                if to.cancel.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(fail("cancelled"));
                }
                if !self.up() {
                    return Err(fail("the source lost power"));
                }
                if !lock(&self.vms).get(name).is_some_and(|v| v.exit.is_none() && !v.paused) {
                    return Err(fail("the source copy is gone"));
                }
                if lock(&w.cond).down.contains(&dest) {
                    return Err(fail("the destination lost power"));
                }
                if w.reaches(self.me, dest) && w.reaches(dest, self.me) {
                    copied += 50;
                } else {
                    cut += 50;
                    if cut >= SIM_MIGRATION_LINK_LOSS_MS {
                        return Err(fail("the link to the destination is cut"));
                    }
                }
            }
            if !to.postcopy.is_off() {
                let mut vms = lock(&self.vms);
                let Some(v) = vms.get_mut(name).filter(|v| v.exit.is_none()) else { return Err(fail("the source copy is gone")) };
                v.paused = true;
                lock(&self.spent).insert(name.to_string());
                crate::postcopy::switch(w, name, self.me, dest, generation);
                if !to.disks.is_empty() && !w.skip_disk_sync.load(std::sync::atomic::Ordering::SeqCst) {
                    crate::localdisk::mirrored(w, name, self.me, dest);
                }
                drop(vms);
                w.log(format!("{}: {name} switched to post-copy towards host {dest} (generation {generation}); spent here", self.name));
                let steps = vec!["switched to post-copy".to_string()];
                return Ok(tandem_drivers::migration::MigrationReport { total_ms: copied + cut, steps, postcopy: true, ..Default::default() });
            }
            // The switchover's pause: this copy stops for good unless the migration is aborted.
            {
                let mut vms = lock(&self.vms);
                let Some(v) = vms.get_mut(name).filter(|v| v.exit.is_none()) else { return Err(fail("the source copy is gone")) };
                v.paused = true;
                let source_generation = v.generation;
                if let Some(hosts) = lock(&w.running).get_mut(name) {
                    hosts.remove(&self.me);
                }
                let mut images = lock(&w.images);
                let img = images.entry(name.to_string()).or_default();
                let runs = img.runs;
                img.paused.insert((self.me, source_generation), runs);
                img.paused.insert((dest, generation), runs);
                drop(images);
                // The mirror is in sync once the guest stopped: the destination's disk is level.
                if !to.disks.is_empty() && !w.skip_disk_sync.load(std::sync::atomic::Ordering::SeqCst) {
                    crate::localdisk::mirrored(w, name, self.me, dest);
                }
            }
            w.log(format!("{}: {name} migrated to host {dest} (generation {generation}); paused here", self.name));
            // The simulated hypervisor measures no downtime: it reports none rather than a made-up one.
            Ok(tandem_drivers::migration::MigrationReport {
                total_ms: copied + cut,
                downtime_ms: None,
                transferred_bytes: 0,
                steps: vec![],
                disks: None,
                multifd_bytes: None,
                tls: false,
                postcopy: false,
            })
        })
    }

    /// A host serves its site's copies whenever it is up: its address names it.
    fn serve_copy<'a>(&'a self, _export: &'a str, _relative: &'a str, _bytes: u64) -> BoxFuture<'a, Result<String, DriverError>> {
        Box::pin(async move {
            if self.up() {
                Ok(format!("sim:{}", self.me))
            } else {
                Err(DriverError::Unsupported { driver: "sim", what: "serve a copy while down" })
            }
        })
    }

    fn withdraw_copy<'a>(&'a self, _export: &'a str) -> BoxFuture<'a, Result<Vec<String>, DriverError>> {
        Box::pin(async move { Ok(Vec::new()) })
    }

    fn attach_mirror<'a>(
        &'a self,
        name: &'a str,
        to: &'a tandem_drivers::syncmirror::MirrorTarget,
    ) -> BoxFuture<'a, Result<tandem_drivers::syncmirror::FirstCopy, DriverError>> {
        Box::pin(async move {
            let server = crate::mirror::server_of(&to.server).ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
            let site = crate::mirror::site_of(&self.world, server).ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
            if lock(&self.vms).get(name).is_none_or(|v| v.exit.is_some()) {
                return Err(DriverError::NotRunning(name.to_string()));
            }
            // As QEMU, whose mirror's NBD node is then the disk itself: no new mirror on a disk
            // that runs on the other copy.
            if lock(&self.mirrors).get(name).and_then(|m| m.get(&to.disk)).is_some_and(|l| l.path != crate::mirror::SimPath::Local) {
                self.world.log(format!("{}: {name} disk {}: attach refused: the disk runs on the other copy", self.name, to.disk));
                return Err(DriverError::Unsupported { driver: "sim", what: "mirror a disk that runs on the other copy" });
            }
            let link = crate::mirror::SimLink::new(server, site);
            lock(&self.mirrors).entry(name.to_string()).or_default().insert(to.disk, link);
            Ok(tandem_drivers::syncmirror::FirstCopy::Whole { why: "the simulator copies no bytes".into() })
        })
    }

    /// One mirror pass: the links move on and the guest writes (see `mirror::step`).
    fn mirror_status<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<tandem_drivers::syncmirror::MirrorStatus, DriverError>> {
        Box::pin(async move {
            self.sync_power();
            if !self.up() || !lock(&self.vms).get(name).is_some_and(|v| v.exit.is_none() && !v.paused) {
                return Err(DriverError::NotRunning(name.to_string()));
            }
            let mut mirrors = lock(&self.mirrors);
            let links = mirrors.entry(name.to_string()).or_default();
            crate::mirror::step(&self.world, name, self.me, links);
            Ok(crate::mirror::status(links.get(&disk)))
        })
    }

    fn release_mirror<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            if let Some(l) = lock(&self.mirrors).get_mut(name).and_then(|m| m.get_mut(&disk)) {
                l.relay = tandem_core::mirroring::RelayPhase::Released;
                l.job = crate::mirror::SimJob::Stopped;
            }
            self.world.log(format!("{}: {name} disk {disk}: held writes released", self.name));
            Ok(())
        })
    }

    fn resume_mirror<'a>(&'a self, name: &'a str, disk: usize, server: &'a str) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let server = crate::mirror::server_of(server).ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
            if let Some(l) = lock(&self.mirrors).get_mut(name).and_then(|m| m.get_mut(&disk)) {
                l.server = server;
                if l.job == crate::mirror::SimJob::Stopped && l.relay == tandem_core::mirroring::RelayPhase::Open {
                    l.job = crate::mirror::SimJob::Copying { left: crate::mirror::SIM_COPY_PASSES };
                }
            }
            Ok(())
        })
    }

    fn detach_mirror<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            if let Some(m) = lock(&self.mirrors).get_mut(name) {
                m.remove(&disk);
            }
            Ok(())
        })
    }

    /// As the real probe: a hung site's storage gives no answer within the probe's bound.
    fn probe_site_copy<'a>(&'a self, _relative: &'a str) -> Option<BoxFuture<'a, tandem_drivers::pathswitch::ProbeAnswer>> {
        use tandem_drivers::pathswitch::{ProbeAnswer, PROBE_TIMEOUT};
        Some(Box::pin(async move {
            let Some(site) = crate::mirror::site_of(&self.world, self.me) else { return ProbeAnswer::Answers };
            if crate::mirror::storage_hung(&self.world, &site) {
                tokio::time::sleep(PROBE_TIMEOUT).await;
                return ProbeAnswer::Hangs;
            }
            if crate::mirror::storage_up(&self.world, &site) {
                ProbeAnswer::Answers
            } else {
                ProbeAnswer::Fails
            }
        }))
    }

    /// As the real driver, a mirrored disk is served by a local copy server of its own — in
    /// even seeds; odd seeds open the copies directly, as a driver without such servers, so
    /// that both answers to hung storage (the cut and the restart elsewhere) stay exercised.
    fn local_reach(&self, name: &str, disk: usize) -> tandem_core::mirroring::LocalReach {
        use tandem_core::mirroring::LocalReach;
        let direct = self.world.local_copies_direct.load(std::sync::atomic::Ordering::SeqCst);
        match lock(&self.mirrors).get(name).and_then(|m| m.get(&disk)) {
            Some(l) if l.cut => LocalReach::Cut,
            Some(_) if !direct => LocalReach::Served,
            _ => LocalReach::Direct,
        }
    }

    /// As the real driver: the requests waiting in hung storage fail, and the guest pauses on
    /// them (the disk's path is `Failed`); the copy is out of reach until a way back.
    fn cut_local<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            use crate::mirror::SimPath;
            let mut mirrors = lock(&self.mirrors);
            let l = mirrors.get_mut(name).and_then(|m| m.get_mut(&disk)).ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
            match l.path {
                SimPath::Local => (l.path, l.cut) = (SimPath::Failed, true),
                // A way back into it: its writes fail, and its job stops.
                SimPath::Other { back: Some(_) } => (l.path, l.cut) = (SimPath::Other { back: Some(crate::mirror::SimJob::Stopped) }, true),
                _ => return Err(DriverError::Unsupported { driver: "sim", what: "cut a disk from a copy it does not use" }),
            }
            self.world.log(format!("{}: {name} disk {disk}: cut from its hung local copy", self.name));
            Ok(())
        })
    }

    fn failed_disks<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<usize>, DriverError>> {
        Box::pin(async move {
            let mirrors = lock(&self.mirrors);
            let links = mirrors.get(name).map(|m| m.iter().filter(|(_, l)| l.path == crate::mirror::SimPath::Failed).map(|(d, _)| *d).collect());
            Ok(links.unwrap_or_default())
        })
    }

    fn switch_to_copy<'a>(&'a self, name: &'a str, disk: usize) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            use crate::mirror::{SimJob, SimPath};
            let mut mirrors = lock(&self.mirrors);
            let l = mirrors.get_mut(name).and_then(|m| m.get_mut(&disk)).ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
            // As `pathswitch::switch_to_copy`: only from a mirror in sync.
            if l.path != SimPath::Failed || l.job != SimJob::InSync || l.relay != tandem_core::mirroring::RelayPhase::Open {
                return Err(DriverError::Unsupported { driver: "sim", what: "switch a disk whose mirror is not in sync" });
            }
            l.path = SimPath::Other { back: None };
            self.world.log(format!("{}: {name} disk {disk}: runs on site {}'s copy", self.name, l.site));
            Ok(())
        })
    }

    fn return_to_local<'a>(&'a self, name: &'a str, disk: usize, step: &'a tandem_drivers::pathswitch::ReturnStep) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            use crate::mirror::{SimJob, SimPath};
            use tandem_drivers::pathswitch::ReturnStep;
            let site = crate::mirror::site_of(&self.world, self.me);
            let local_up = site.as_ref().is_some_and(|s| crate::mirror::storage_up(&self.world, s));
            let local_hung = site.as_ref().is_some_and(|s| crate::mirror::storage_hung(&self.world, s));
            let mut mirrors = lock(&self.mirrors);
            let l = mirrors.get_mut(name).and_then(|m| m.get_mut(&disk)).ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
            // As QEMU: a way back whose writes wait in hung storage cannot be given up or
            // finished (either drains them first).
            let writing_back = matches!(l.path, SimPath::Other { back: Some(SimJob::Copying { .. } | SimJob::InSync) });
            let refused = |what| {
                self.world.log(format!("{}: {name} disk {disk}: {step:?} refused: {what}", self.name));
                Err(DriverError::Unsupported { driver: "sim", what })
            };
            match step {
                ReturnStep::Abandon | ReturnStep::Pause | ReturnStep::Finish if local_hung && writing_back => {
                    return refused("end a way back whose writes wait in hung storage")
                }
                ReturnStep::Start { .. } | ReturnStep::Retry { .. } if !local_up => return refused("open a copy whose storage fails"),
                // A new local copy server (the cut one exited once its storage answered).
                ReturnStep::Start { .. } => {
                    (l.path, l.cut) = (SimPath::Other { back: Some(SimJob::Copying { left: crate::mirror::SIM_COPY_PASSES }) }, false);
                }
                ReturnStep::Retry { .. } if l.cut => return refused("retry a request on a copy it was cut from"),
                ReturnStep::Retry { .. } if l.path == SimPath::Failed => l.path = SimPath::Local,
                ReturnStep::Retry { .. } => return refused("resume a disk that did not fail"),
                ReturnStep::Pause => {
                    l.paused = true;
                    // As QEMU's driver: the way back's last round, the guest paused, copies what
                    // the site's copy still lacks — before the agent commits it current.
                    if l.path == (SimPath::Other { back: Some(SimJob::InSync) }) {
                        let site = crate::mirror::site_of(&self.world, self.me);
                        let mut copies = lock(&self.world.site_copies);
                        let c = copies.entry(name.to_string()).or_default();
                        if let (Some(site), Some(there)) = (site, c.at.get(&l.site).copied()) {
                            c.at.insert(site, there);
                        }
                    }
                }
                ReturnStep::Finish if l.path == (SimPath::Other { back: Some(SimJob::InSync) }) => {
                    // Back on the site's copy, mirrored into the other from this instant.
                    (l.path, l.job, l.paused) = (SimPath::Local, SimJob::InSync, false);
                }
                ReturnStep::Finish => return refused("finish a way back that is not in sync"),
                ReturnStep::Resume => l.paused = false,
                ReturnStep::Abandon => {
                    if let SimPath::Other { .. } = l.path {
                        l.path = SimPath::Other { back: None };
                    }
                }
            }
            self.world.log(format!("{}: {name} disk {disk}: {step:?} -> {:?}", self.name, l.path));
            Ok(())
        })
    }

    /// Every local disk has the same simulated size (the mirror's time is not modelled apart
    /// from the memory copy's).
    fn disk_sizes<'a>(&'a self, _name: &'a str, disks: &'a [usize]) -> BoxFuture<'a, Result<Vec<tandem_drivers::diskcopy::LocalDiskSize>, DriverError>> {
        Box::pin(async move { Ok(disks.iter().map(|i| tandem_drivers::diskcopy::LocalDiskSize { index: *i, bytes: 1 << 30 }).collect()) })
    }

    /// Sends the pages left at this source after a switch to post-copy, while the destination
    /// is reachable (a cut longer than [`SIM_MIGRATION_LINK_LOSS_MS`] loses them, as does this
    /// copy's end or either host's power).
    fn finish_postcopy<'a>(&'a self, name: &'a str, bound: Duration) -> BoxFuture<'a, Result<tandem_drivers::postcopy::Served, DriverError>> {
        Box::pin(async move {
            let w = &self.world;
            let fail = |reason: &str| DriverError::Migration { vm: name.to_string(), reason: reason.to_string() };
            let dest = lock(&w.images).get(name).and_then(|i| i.pages_at_source.as_ref()).filter(|p| p.source == self.me).map(|p| p.dest);
            let Some(dest) = dest else { return Err(fail("no post-copy pages are left here")) };
            let started = w.now_ms();
            let mut cut = 0u64;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                w.thawed(self.me).await;
                let linked = w.reaches(self.me, dest) && w.reaches(dest, self.me);
                cut = if linked { 0 } else { cut + 50 };
                let why = if !self.up() {
                    Some("the source lost power")
                } else if lock(&self.vms).get(name).is_none_or(|v| v.exit.is_some()) {
                    Some("the source copy is gone")
                } else if lock(&w.cond).down.contains(&dest) {
                    Some("the destination lost power")
                } else if cut >= SIM_MIGRATION_LINK_LOSS_MS {
                    Some("the link to the destination is cut")
                } else if w.now_ms() - started > bound.as_millis() as u64 {
                    Some("not every page was sent within the bound")
                } else {
                    None
                };
                if let Some(why) = why {
                    crate::postcopy::lose(w, name, self.me, why);
                    return Err(fail(why));
                }
                if linked {
                    match crate::postcopy::send(w, name, self.me, 50) {
                        crate::postcopy::Sent::More => {}
                        crate::postcopy::Sent::Done => {
                            w.log(format!("{}: {name}'s last post-copy pages reached host {dest}", self.name));
                            // Like its downtime, the simulator reports no total time of its own.
                            return Ok(tandem_drivers::postcopy::Served { total_ms: None, downtime_ms: None, transferred_bytes: 0 });
                        }
                        crate::postcopy::Sent::Gone => return Err(fail("no copy waits for the pages any more")),
                    }
                }
            }
        })
    }

    /// Resumes a paused copy: a double run if another copy runs, stale if it holds memory older
    /// than the latest run.
    fn resume<'a>(&'a self, name: &'a str, check: &'a tandem_drivers::StartCheck) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.world.thawed(self.me).await;
            let w = &self.world;
            if !self.up() {
                return Err(DriverError::NotRunning(name.to_string()));
            }
            check().map_err(|reason| DriverError::Refused { vm: name.to_string(), reason })?;
            if lock(&self.spent).contains(name) {
                return Err(DriverError::Refused { vm: name.to_string(), reason: "its memory left with a post-copy migration".into() });
            }
            let generation = {
                let mut vms = lock(&self.vms);
                let Some(v) = vms.get_mut(name).filter(|v| v.exit.is_none() && v.paused) else { return Err(DriverError::NotRunning(name.to_string())) };
                v.paused = false;
                v.generation
            };
            let others: Vec<u32> = {
                let mut running = lock(&w.running);
                let hosts = running.entry(name.to_string()).or_default();
                let others = hosts.keys().copied().filter(|h| *h != self.me).collect();
                hosts.insert(self.me, generation);
                others
            };
            if !others.is_empty() {
                let detail = format!("{name} resumed on {} (generation {generation}) while it runs on host(s) {others:?}", self.name);
                w.violation(crate::oracle::Violation::new(crate::oracle::Invariant::DoubleRun, detail));
            }
            let stale = {
                let mut images = lock(&w.images);
                let img = images.entry(name.to_string()).or_default();
                let held = img.paused.remove(&(self.me, generation));
                let stale = match held {
                    None => Some("it never received the migration's memory".to_string()),
                    Some(r) if r != img.runs => Some(format!("another copy ran since its memory was taken ({} runs later)", img.runs - r)),
                    Some(_) => None,
                };
                img.runs += 1;
                stale
            };
            if lock(&self.local_disk).contains(name) {
                if let Some(why) = crate::localdisk::runs(w, name, self.me) {
                    w.violation(crate::oracle::Violation::new(crate::oracle::Invariant::StaleDisk, why));
                }
            }
            if let Some(why) = crate::mirror::runs(w, name, self.me) {
                w.violation(crate::oracle::Violation::new(crate::oracle::Invariant::StaleCopy, why));
            }
            if let Some(why) = stale {
                w.violation(crate::oracle::Violation::new(
                    crate::oracle::Invariant::StaleResume,
                    format!("{name} resumed on {} (generation {generation}): {why}", self.name),
                ));
            }
            w.log(format!("{}: {name} resumed (generation {generation})", self.name));
            Ok(())
        })
    }

    /// A simulated service answers once its VM has run for [`SIM_SERVICE_BOOT_MS`] on this
    /// host; no real connection is made.
    fn probe<'a>(
        &'a self,
        name: &'a str,
        _probe: &'a tandem_core::state::ServiceProbe,
        _host_ip: &'a str,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<(), tandem_drivers::probe::ProbeError>> {
        Box::pin(async move {
            let now = self.world.now_ms();
            let up = lock(&self.vms).get(name).is_some_and(|v| v.exit.is_none() && now >= v.started_at_ms + SIM_SERVICE_BOOT_MS);
            if up {
                Ok(())
            } else {
                let source = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
                Err(tandem_drivers::probe::ProbeError::Io { address: format!("{name} on {}", self.name), source })
            }
        })
    }
}

/// How long after its start a simulated VM's service answers its probe.
pub const SIM_SERVICE_BOOT_MS: u64 = 300;
