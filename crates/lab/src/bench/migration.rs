//! `tandem-lab bench migration`: live migrations of one VM back and forth in a local 3-host
//! cluster — the whole time as the operator sees it, QEMU's own total and downtime, and (for QEMU
//! guests) the longest gap an HTTP client polling every 20 ms saw. While it runs, every host's
//! `/v1/local` is sampled: a VM reported running (not paused) on two hosts at once is counted.
//! The integration test asserts on the behaviour; the figures are for people.

use crate::demo::{demo_vm, http_get, wait};
use crate::lab::{Lab, LabOptions};
use anyhow::{anyhow, bail, Result};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_agent::views::{ForceRequest, LocalView, MigrateRequest, MigrationBegun, MigrationOutcome, MigrationsView};

/// How often the HTTP client polls the VM's service.
pub(crate) const HTTP_POLL: Duration = Duration::from_millis(20);
/// How often the hosts' local views are sampled for two running copies.
const LOCAL_POLL: Duration = Duration::from_millis(50);
/// The service port of demo VM 0 on its host's address (user-mode networking: the address moves
/// with the host, so the client polls every host).
const PORT: u16 = 8080;

/// The test guest for an integration test: `$TANDEM_GUEST_DIR` or the repository's
/// `.cache/guest`, when QEMU and the guest are present. `None` (skip) only outside CI: CI must
/// run the QEMU tests.
#[must_use]
pub fn test_guest() -> Option<std::path::PathBuf> {
    let guest = std::env::var("TANDEM_GUEST_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| std::path::PathBuf::from("../../.cache/guest"));
    let have_qemu = std::process::Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_qemu || !guest.join("vmlinuz").exists() {
        assert!(std::env::var("CI").is_err(), "CI must run the QEMU test: qemu or guest missing");
        eprintln!("skipping: qemu-system-x86_64 or the test guest is missing");
        return None;
    }
    Some(guest)
}

/// One migration's figures.
#[derive(Clone, Debug)]
pub struct MigrationFigures {
    pub from: String,
    pub to: String,
    pub completed: bool,
    /// From the request to the outcome seen at the source, seconds.
    pub total_s: f64,
    pub qemu_total_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    /// The longest time without an HTTP answer from any host, ms (QEMU guests only).
    pub http_gap_ms: Option<u64>,
    /// Samples in which two hosts reported the VM running (not paused) at once.
    pub two_running: usize,
    /// Memory and device state sent, MiB.
    pub transferred_mib: u64,
    /// Memory sent over QEMU's parallel channels (multifd), bytes, when it used them.
    pub multifd_bytes: Option<u64>,
    /// How long the local disks' mirror took before memory was sent, ms, when there were any.
    pub disk_copy_ms: Option<u64>,
    /// The migration switched to post-copy.
    pub postcopy: bool,
    /// With a local disk (the guest's writer appends to it): the longest time its acknowledged
    /// write sequence did not advance, ms.
    pub seq_stall_ms: Option<u64>,
}

/// A running local cluster with one VM to move.
pub struct MigrationLab {
    pub lab: Lab,
    pub driver: String,
    pub vm: String,
    /// Evidence that the emulator corrupted the guest's memory, once seen.
    pub guest_fault: Mutex<Option<String>>,
    /// The VM has a writable local disk its guest writes to.
    pub local_disk: bool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MigrationLab {
    /// A 3-host lab with demo VM `web0` of `memory_mib`, running and (QEMU) answering.
    pub fn start(driver: &str, memory_mib: u64, guest: &Path, net: u8) -> Result<MigrationLab> {
        MigrationLab::start_with(driver, memory_mib, guest, net, "")
    }

    /// [`MigrationLab::start`] with more agent configuration (a `[migration]` table, say).
    pub fn start_with(driver: &str, memory_mib: u64, guest: &Path, net: u8, extra: &str) -> Result<MigrationLab> {
        MigrationLab::start_full(driver, memory_mib, guest, net, extra, 0)
    }

    /// [`MigrationLab::start_with`], and (QEMU) a writable local disk of `local_disk_mib` (0:
    /// none) on each host's own storage, which every migration mirrors; such a VM is
    /// `best-effort` (HA cannot restart it elsewhere).
    pub fn start_full(driver: &str, memory_mib: u64, guest: &Path, net: u8, extra: &str, local_disk_mib: u64) -> Result<MigrationLab> {
        MigrationLab::start_spec(driver, memory_mib, guest, net, extra, local_disk_mib, |_| {})
    }

    /// [`MigrationLab::start_full`] with the VM's spec changed by `edit` before it is created.
    pub fn start_spec(
        driver: &str,
        memory_mib: u64,
        guest: &Path,
        net: u8,
        extra: &str,
        local_disk_mib: u64,
        edit: impl FnOnce(&mut tandem_core::state::VmSpec),
    ) -> Result<MigrationLab> {
        let disks = if local_disk_mib > 0 { "local_disk_dir = \"{data}/disks\"\n" } else { "" };
        let qemu = if driver == "qemu" { format!("[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 5\n{disks}") } else { String::new() };
        let opts = LabOptions {
            hosts: 3,
            driver: driver.into(),
            loopback_net: net,
            api_port: 7700,
            extra_config: format!("{qemu}{extra}"),
            capacity: (4, 4096),
            ..LabOptions::default()
        };
        let mut lab = Lab::new(opts, &crate::lab::tandem_binary()?)?;
        if local_disk_mib > 0 {
            for h in &lab.hosts {
                std::fs::create_dir_all(h.data.join("disks"))?;
                std::fs::File::create(h.data.join("disks/web0.raw"))?.set_len(local_disk_mib << 20)?;
            }
        }
        lab.start_all()?;
        lab.form_cluster()?;
        let mut spec = demo_vm(0, driver, guest);
        spec.memory_mib = memory_mib;
        if local_disk_mib > 0 {
            spec.protection = tandem_core::state::Protection::BestEffort;
            spec.disks =
                vec![tandem_core::state::DiskSpec { path: "web0.raw".into(), format: Some("raw".into()), readonly: false, local: true, mirror: false }];
        }
        edit(&mut spec);
        let c = lab.client(0);
        c.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create: {e}"))?;
        c.send("POST", "/v1/vms/web0/start", &ForceRequest::default()).map_err(|e| anyhow!("start: {e}"))?;
        let me = MigrationLab { lab, driver: driver.into(), vm: "web0".into(), guest_fault: Mutex::new(None), local_disk: local_disk_mib > 0 };
        let host = me.host_of()?;
        if driver == "qemu" {
            let ip = me.ip_of(&host)?;
            wait("the guest to answer", Duration::from_secs(120), || http_get(&format!("{ip}:{PORT}"), "/health", Duration::from_millis(400)).map(|_| ()))?;
        } else {
            wait("the workload to run", Duration::from_secs(30), || me.lab.running().contains_key(&me.vm).then_some(()))?;
        }
        Ok(me)
    }

    /// Where committed state runs the VM.
    pub fn host_of(&self) -> Result<String> {
        wait("the VM to be placed", Duration::from_secs(60), || self.lab.placement(0).ok()?.get(&self.vm).cloned().flatten())
    }

    /// Whether the VM's service answers on `host` (QEMU) or its workload runs there (process).
    pub fn answers_on(&self, host: &str) -> bool {
        if self.driver == "qemu" {
            self.ip_of(host).is_ok_and(|ip| http_get(&format!("{ip}:{PORT}"), "/health", Duration::from_millis(400)).is_some())
        } else {
            self.lab.running().get(&self.vm).is_some_and(|h| h == host)
        }
    }

    /// Counts, until dropped, the samples in which two hosts report the VM running (not paused);
    /// hosts that do not answer (powered off) count as running nothing.
    #[must_use]
    pub fn watch_copies(&self) -> CopyWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let two = Arc::new(Mutex::new(0usize));
        let clients: Vec<_> = (0..self.lab.hosts.len()).map(|i| self.lab.client(i)).collect();
        let (s, t, vm) = (Arc::clone(&stop), Arc::clone(&two), self.vm.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if doubly_running(&clients).contains(&vm) {
                    *lock(&t) += 1;
                }
                std::thread::sleep(LOCAL_POLL);
            }
        });
        CopyWatch { stop, two, thread: Some(thread) }
    }

    fn ip_of(&self, host: &str) -> Result<String> {
        self.lab.hosts.iter().find(|h| h.name == host).map(|h| h.ip.clone()).ok_or_else(|| anyhow!("no host {host}"))
    }

    /// Migrates the VM to the next host and measures it.
    pub fn migrate_once(&self) -> Result<MigrationFigures> {
        let from = self.host_of()?;
        let i = self.lab.hosts.iter().position(|h| h.name == from).ok_or_else(|| anyhow!("no host {from}"))?;
        let to = self.lab.hosts[(i + 1) % self.lab.hosts.len()].name.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::<Instant>::new()));
        // A guest with a local disk serves its write sequence: polled instead of `/health`.
        let writes = self.local_disk;
        let seq = Arc::new(Mutex::new(Vec::<crate::diskguest::SeqSample>::new()));
        let ips: Vec<String> = self.lab.hosts.iter().map(|h| h.ip.clone()).collect();
        // One client per host address, so a host whose port forward accepts but whose guest is
        // paused (its timeout) does not hold up the polling of the others.
        let http: Vec<std::thread::JoinHandle<()>> = if self.driver == "qemu" {
            ips.into_iter()
                .map(|ip| {
                    let (stop, answers, seq) = (Arc::clone(&stop), Arc::clone(&answers), Arc::clone(&seq));
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::SeqCst) {
                            let t = Instant::now();
                            if let Some(body) = http_get(&format!("{ip}:{PORT}"), if writes { "/seq" } else { "/health" }, Duration::from_millis(100)) {
                                lock(&answers).push(t);
                                if let Some(s) = crate::diskguest::parse_seq(t, &body).filter(|_| writes) {
                                    lock(&seq).push(s);
                                }
                            }
                            std::thread::sleep(HTTP_POLL.saturating_sub(t.elapsed()));
                        }
                    })
                })
                .collect()
        } else {
            vec![]
        };
        let copies = self.watch_copies();
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let begun: MigrationBegun = self
            .lab
            .client(0)
            .send("POST", &format!("/v1/vms/{}/migrate", self.vm), &MigrateRequest { to: Some(to.clone()), force: true })
            .map_err(|e| anyhow!("migrate: {e}"))
            .and_then(|v| serde_json::from_value(v).map_err(|e| anyhow!("migrate answer: {e}")))?;
        let source = self.lab.client_at(&begun.source_api);
        let outcome: MigrationOutcome = wait("the migration's outcome", Duration::from_secs(120), || {
            let v: MigrationsView = source.get_as("/v1/migrations").ok()?;
            v.recent.into_iter().find(|o| o.name == self.vm && o.generation == begun.generation)
        })?;
        let total_s = t0.elapsed().as_secs_f64();
        let completed = outcome.result == "completed";
        if self.driver == "qemu" {
            // A post-copy migration whose last pages were lost (`lost`) still moved the VM.
            let home = if outcome.result == "aborted" { from.clone() } else { to.clone() };
            let ip = self.ip_of(&home)?;
            // A guest whose memory the emulator corrupted (TCG, see `guest_memory_fault`) no
            // longer answers anywhere: the evidence is printed once and kept, and the migrations
            // go on being checked for ownership and outcome. (A hung guest's kernel reports its
            // RCU stall only about 21 s after the hang began: hence the minute.)
            wait("the guest to answer after the migration", Duration::from_secs(60), || {
                if lock(&self.guest_fault).is_some() {
                    return Some(());
                }
                if let Some(evidence) = crate::diskguest::guest_memory_fault(&self.lab, &home, &self.vm) {
                    eprintln!("the guest's memory was corrupted on {home} (TCG; not an ownership fault):\n{evidence}");
                    *lock(&self.guest_fault) = Some(evidence);
                    return Some(());
                }
                http_get(&format!("{ip}:{PORT}"), "/health", Duration::from_millis(400)).map(|_| ())
            })?;
            std::thread::sleep(Duration::from_millis(300));
        } else {
            let home = if completed { to.clone() } else { from.clone() };
            wait("the workload to run again", Duration::from_secs(30), || (self.lab.running().get(&self.vm) == Some(&home)).then_some(()))?;
        }
        stop.store(true, Ordering::SeqCst);
        for h in http {
            let _ = h.join();
        }

        let mut answers = lock(&answers).clone();
        answers.sort();
        if std::env::var_os("TANDEM_BENCH_TRACE").is_some() {
            // The longest gap's edges on the wall clock, to line up with the agents' logs.
            let wall = |t: Instant| chrono_like(std::time::SystemTime::now() - t.elapsed());
            if let Some(w) = answers.windows(2).filter(|w| w[1] >= t0).max_by_key(|w| w[1].duration_since(w[0])) {
                eprintln!("longest HTTP gap: last answer asked at {}, next at {}", wall(w[0]), wall(w[1]));
            }
        }
        let http_gap_ms = (self.driver == "qemu")
            .then(|| answers.windows(2).filter(|w| w[1] >= t0).map(|w| w[1].duration_since(w[0]).as_millis() as u64).max().unwrap_or(u64::MAX));
        let two_running = copies.finish();
        let seq_stall_ms = writes.then(|| {
            let mut samples = lock(&seq).clone();
            samples.sort_by_key(|s| s.at);
            crate::diskguest::judge(&samples).longest_stall_ms
        });
        let report = outcome.report.clone();
        let transferred_mib = report.as_ref().map_or(0, |r| r.transferred_bytes >> 20);
        Ok(MigrationFigures {
            from,
            to,
            completed,
            total_s,
            qemu_total_ms: report.as_ref().map(|r| r.total_ms).filter(|_| self.driver == "qemu"),
            downtime_ms: report.as_ref().and_then(|r| r.downtime_ms),
            multifd_bytes: report.as_ref().and_then(|r| r.multifd_bytes),
            disk_copy_ms: report.as_ref().and_then(|r| r.disks.as_ref()).map(|d| d.copy_ms),
            postcopy: report.as_ref().is_some_and(|r| r.postcopy),
            seq_stall_ms,
            http_gap_ms,
            two_running,
            transferred_mib,
        })
    }
}

/// Where each VM runs unpaused, as the hosts' `/v1/local` report it, asking them in `order`.
fn unpaused(clients: &[tandem::client::Client], order: &[usize]) -> std::collections::BTreeMap<String, std::collections::BTreeSet<usize>> {
    let mut on: std::collections::BTreeMap<String, std::collections::BTreeSet<usize>> = std::collections::BTreeMap::new();
    for i in order {
        if let Ok(l) = clients[*i].get_as::<LocalView>("/v1/local") {
            for v in l.vms.iter().filter(|v| v.exit.is_none() && !v.paused) {
                on.entry(v.name.clone()).or_default().insert(*i);
            }
        }
    }
    on
}

/// VMs seen running unpaused on two hosts in one sample. A sample asks the hosts one after the
/// other, then again in reverse order, and counts only what both sweeps show: a switchover that
/// falls between two hosts' answers (the source seen running before it, the destination after)
/// shows in one sweep only, while two copies running together show in both.
#[must_use]
pub fn doubly_running(clients: &[tandem::client::Client]) -> Vec<String> {
    let forward: Vec<usize> = (0..clients.len()).collect();
    let backward: Vec<usize> = forward.iter().rev().copied().collect();
    let (a, b) = (unpaused(clients, &forward), unpaused(clients, &backward));
    a.into_iter().filter(|(vm, hosts)| hosts.len() > 1 && b.get(vm).is_some_and(|h| h.intersection(hosts).count() > 1)).map(|(vm, _)| vm).collect()
}

/// A running count of samples with two running copies (see [`MigrationLab::watch_copies`]).
pub struct CopyWatch {
    stop: Arc<AtomicBool>,
    two: Arc<Mutex<usize>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CopyWatch {
    /// Stops sampling; the count.
    pub fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *lock(&self.two)
    }
}

impl Drop for CopyWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn line(name: &str, mut v: Vec<f64>, unit: &str) {
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(min), Some(max)) => println!("{name:<28} {:>9.1} {min:>9.1} {max:>9.1}  {unit}", v[v.len() / 2]),
        _ => println!("{name:<28} {:>9}  (not measured)", "-"),
    }
}

/// Runs `rounds` migrations of a `memory_mib` guest (each capped at `bandwidth_mib_s`) and
/// prints the figures.
pub fn run(driver: &str, memory_mib: u64, rounds: usize, guest: &Path, bandwidth_mib_s: u64, local_disk_mib: u64) -> Result<()> {
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if local_disk_mib > 0 && driver != "qemu" {
        bail!("--local-disk-mib needs --driver qemu");
    }
    crate::demo::install_interrupt_handler();
    let extra = format!("[migration]\nmax_bandwidth_mib_s = {bandwidth_mib_s}\n");
    let ml = MigrationLab::start_full(driver, memory_mib, guest, 67, &extra, local_disk_mib)?;
    let mut figures = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let f = ml.migrate_once()?;
        println!(
            "round {round}: {} -> {}: {} in {:.2} s (QEMU {} ms, downtime {} ms, {} MiB sent), HTTP gap {} ms, writes stalled {} ms, two running: {}",
            f.from,
            f.to,
            if f.completed { "completed" } else { "aborted" },
            f.total_s,
            f.qemu_total_ms.map_or_else(|| "-".into(), |x| x.to_string()),
            f.downtime_ms.map_or_else(|| "-".into(), |x| x.to_string()),
            f.transferred_mib,
            f.http_gap_ms.map_or_else(|| "-".into(), |x| x.to_string()),
            f.seq_stall_ms.map_or_else(|| "-".into(), |x| x.to_string()),
            f.two_running
        );
        figures.push(f);
    }
    let disk = if local_disk_mib > 0 { format!(" with a {local_disk_mib} MiB local disk mirrored") } else { String::new() };
    println!("\nlive migration of a {memory_mib} MiB guest{disk} ({driver} driver): {rounds} round(s)");
    println!("{:<28} {:>9} {:>9} {:>9}", "", "median", "min", "max");
    line("request to outcome", figures.iter().map(|f| f.total_s * 1000.0).collect(), "ms");
    if local_disk_mib > 0 {
        line("local disk mirrored", figures.iter().filter_map(|f| f.disk_copy_ms.map(|x| x as f64)).collect(), "ms");
    }
    line("QEMU total time", figures.iter().filter_map(|f| f.qemu_total_ms.map(|x| x as f64)).collect(), "ms");
    line("QEMU downtime", figures.iter().filter_map(|f| f.downtime_ms.map(|x| x as f64)).collect(), "ms");
    line("longest HTTP gap (20 ms poll)", figures.iter().filter_map(|f| f.http_gap_ms.map(|x| x as f64)).collect(), "ms");
    if local_disk_mib > 0 {
        line("write sequence stalled", figures.iter().filter_map(|f| f.seq_stall_ms.map(|x| x as f64)).collect(), "ms");
    }
    println!(
        "completed: {} of {rounds}; samples with two running copies: {}",
        figures.iter().filter(|f| f.completed).count(),
        figures.iter().map(|f| f.two_running).sum::<usize>()
    );
    Ok(())
}

/// A wall-clock time as seconds of the day, UTC (`HH:MM:SS.mmm`), as the agents' logs print it.
fn chrono_like(t: std::time::SystemTime) -> String {
    let ms = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis()) % 86_400_000;
    format!("{:02}:{:02}:{:02}.{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000)
}
