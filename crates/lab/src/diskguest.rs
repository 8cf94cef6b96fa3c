//! A guest that looks like a real one: a QEMU test guest with a disk image on the shared storage
//! and its own address on a bridge every host shares (namespace lab). Its disk writer appends a
//! sequence number with O_DIRECT|O_DSYNC every few milliseconds and serves the last acknowledged
//! one at `/seq` ("LAST RECOVERED WRITES"; see `scripts/guest/seqwriter.c`).
//!
//! Two watchers observe it from outside the agents:
//! - [`SeqWatch`] polls `/seq` on the VM's own address every 20 ms: the highest number ever
//!   acknowledged, each boot's recovered number (which must be at least every number
//!   acknowledged before it), and the longest time without progress.
//! - [`LockWatch`] samples the kernel's lock table for the image: QEMU holds a shared lock on
//!   byte 101 of the image while it has the disk open for writing (its image locking: byte
//!   100 + the permission bit, `BLK_PERM_WRITE` = bit 1), so two such locks at once mean two
//!   QEMU processes that could both write the disk.

use crate::demo::{http_get, wait};
use crate::lab::{Lab, LabOptions};
use crate::netlab::{NetLab, VM_BRIDGE};
use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_agent::views::{ForceRequest, MigrateRequest, MigrationBegun, MigrationOutcome, MigrationsView};
use tandem_core::state::{DiskSpec, NetworkSpec, Protection, ServiceProbe};

/// How often the sequence is read.
const SEQ_POLL: Duration = Duration::from_millis(20);
/// How often the lock table is sampled.
const LOCK_POLL: Duration = Duration::from_millis(5);
/// The disk image's size (the writer uses the first 4 MiB as a ring).
const IMAGE_BYTES: u64 = 8 << 20;
/// QEMU's image-locking byte for "holds the write permission".
const WRITE_LOCK_BYTE: u64 = 101;

/// One answer of `/seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqSample {
    pub at: Instant,
    /// The last number acknowledged (written and reported stable by the device).
    pub last: u64,
    /// The highest number found on the disk when this boot's writer started.
    pub recovered: u64,
    /// Writes acknowledged since this boot's writer started.
    pub writes: u64,
}

/// A `/seq` answer ("LAST RECOVERED WRITES") read at `at`.
#[must_use]
pub fn parse_seq(at: Instant, body: &str) -> Option<SeqSample> {
    let mut it = body.split_whitespace().map(str::parse::<u64>);
    Some(SeqSample { at, last: it.next()?.ok()?, recovered: it.next()?.ok()?, writes: it.next()?.ok()? })
}

/// Polls a guest's `/seq` until dropped or finished.
pub struct SeqWatch {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<SeqSample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SeqWatch {
    /// Starts polling `addr` (`IP:PORT`). The thread inherits the caller's network namespace.
    #[must_use]
    pub fn start(addr: &str) -> SeqWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out, addr) = (Arc::clone(&stop), Arc::clone(&samples), addr.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let t = Instant::now();
                if let Some(sample) = http_get(&addr, "/seq", Duration::from_millis(100)).and_then(|b| parse_seq(t, &b)) {
                    out.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(sample);
                }
                std::thread::sleep(SEQ_POLL.saturating_sub(t.elapsed()));
            }
        });
        SeqWatch { stop, samples, thread: Some(thread) }
    }

    /// Every answer so far.
    #[must_use]
    pub fn samples(&self) -> Vec<SeqSample> {
        self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The highest number acknowledged so far.
    #[must_use]
    pub fn highest(&self) -> u64 {
        self.samples().iter().map(|s| s.last).max().unwrap_or(0)
    }

    /// Waits until the guest has acknowledged more than `above`.
    pub fn wait_past(&self, above: u64, timeout: Duration) -> Result<SeqSample> {
        wait(&format!("the guest to acknowledge a write past {above}"), timeout, || self.samples().into_iter().rev().find(|s| s.last > above))
    }

    /// Stops polling.
    pub fn finish(mut self) -> Vec<SeqSample> {
        self.halt();
        self.samples()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SeqWatch {
    fn drop(&mut self) {
        self.halt();
    }
}

/// What a run of `/seq` samples shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqVerdict {
    /// Boots seen (a boot is a change of `recovered` or a fall of `writes`).
    pub boots: usize,
    /// Acknowledged numbers that a later boot did not find on the disk: (acknowledged, recovered).
    pub lost: Vec<(u64, u64)>,
    /// Samples whose number went back within one boot.
    pub regressions: usize,
    /// The longest time the acknowledged number did not advance, ms.
    pub longest_stall_ms: u64,
}

/// Judges a run of samples: within a boot the number only grows; each new boot recovered at
/// least every number acknowledged before it.
#[must_use]
pub fn judge(samples: &[SeqSample]) -> SeqVerdict {
    let mut v = SeqVerdict { boots: usize::from(!samples.is_empty()), lost: vec![], regressions: 0, longest_stall_ms: 0 };
    let mut highest = 0u64;
    let mut progress_at: Option<Instant> = None;
    for (i, s) in samples.iter().enumerate() {
        if let Some(prev) = i.checked_sub(1).and_then(|p| samples.get(p)) {
            let new_boot = s.recovered != prev.recovered || s.writes < prev.writes;
            if new_boot {
                v.boots += 1;
                if s.recovered < highest {
                    v.lost.push((highest, s.recovered));
                }
            } else if s.last < prev.last {
                v.regressions += 1;
            }
        }
        if s.last > highest || progress_at.is_none() {
            if let Some(p) = progress_at {
                v.longest_stall_ms = v.longest_stall_ms.max(s.at.duration_since(p).as_millis() as u64);
            }
            progress_at = Some(s.at);
        }
        highest = highest.max(s.last);
    }
    v
}

/// Samples the kernel's lock table for one image: how many QEMU processes hold its write lock.
pub struct LockWatch {
    stop: Arc<AtomicBool>,
    most: Arc<Mutex<(usize, usize)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The image's identity as `/proc/locks` prints it: `MAJOR:MINOR:INODE` (hex, hex, decimal).
fn lock_key(image: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(image).with_context(|| format!("reading {}", image.display()))?;
    let (major, minor) = (libc::major(m.dev()), libc::minor(m.dev()));
    Ok(format!("{major:02x}:{minor:02x}:{}", m.ino()))
}

/// Locks on `key` covering the write-permission byte, in one reading of `/proc/locks`.
fn write_locks(table: &str, key: &str) -> usize {
    table
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: OFDLCK ADVISORY READ -1 fe:00:10012336 100 101" (a lock blocked behind another
            // has "->" first and one field more).
            let Some(at) = f.iter().position(|x| *x == key) else { return false };
            let (start, end) = (f.get(at + 1).and_then(|x| x.parse::<u64>().ok()), f.get(at + 2));
            let end = end.and_then(|x| if *x == "EOF" { Some(u64::MAX) } else { x.parse::<u64>().ok() });
            !l.contains("->") && start.zip(end).is_some_and(|(s, e)| s <= WRITE_LOCK_BYTE && WRITE_LOCK_BYTE <= e)
        })
        .count()
}

impl LockWatch {
    /// Starts sampling the locks on `image`.
    pub fn start(image: &Path) -> Result<LockWatch> {
        let key = lock_key(image)?;
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(Mutex::new((0usize, 0usize)));
        let (s, m) = (Arc::clone(&stop), Arc::clone(&most));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Ok(table) = std::fs::read_to_string("/proc/locks") {
                    let n = write_locks(&table, &key);
                    let mut g = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    g.0 = g.0.max(n);
                    g.1 += 1;
                }
                std::thread::sleep(LOCK_POLL);
            }
        });
        Ok(LockWatch { stop, most, thread: Some(thread) })
    }

    /// (the most write-lock holders seen at once, samples taken).
    #[must_use]
    pub fn most(&self) -> (usize, usize) {
        *self.most.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for LockWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A 3-host namespace lab with one disk-backed, bridged, protected guest `db`. The calling thread
/// is moved into the lab's control namespace (its sockets reach the agents and the guest).
pub struct DiskGuestLab {
    // Dropped in this order: the agents and guests first, then the namespaces.
    pub lab: Lab,
    pub net: NetLab,
    pub image: PathBuf,
    /// `IP:80` of the guest.
    pub addr: String,
    pub vm: String,
}

impl DiskGuestLab {
    /// Builds the lab, creates and starts the guest, and waits for its writer to answer.
    pub fn start(prefix: &str, guest: &Path, memory_mib: u64, extra: &str) -> Result<DiskGuestLab> {
        let mut net = NetLab::create(prefix, 3)?;
        net.add_vm_network()?;
        net.enter_control()?;
        let qemu = format!("[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 5\nbridges = [\"{VM_BRIDGE}\"]\n");
        let opts = LabOptions {
            hosts: 3,
            driver: "qemu".into(),
            loopback_net: 69,
            extra_config: format!("{qemu}{extra}"),
            capacity: (4, 4096.max(2 * memory_mib)),
            netns: Some(net.lab_hosts()),
            ..LabOptions::default()
        };
        let mut lab = Lab::new(opts, &crate::lab::tandem_binary()?)?;
        let image = lab.shared.join("db.img");
        std::fs::File::create(&image).and_then(|f| f.set_len(IMAGE_BYTES)).with_context(|| format!("creating {}", image.display()))?;
        lab.start_all()?;
        lab.form_cluster()?;
        let ip = NetLab::vm_ip(0);
        let bare = ip.split('/').next().unwrap_or_default().to_string();
        let mut spec = crate::demo::demo_vm(0, "qemu", guest);
        spec.name = "db".into();
        spec.memory_mib = memory_mib;
        spec.protection = Protection::Protect;
        spec.disks = vec![DiskSpec { path: image.display().to_string(), format: Some("raw".into()), readonly: false, local: false, mirror: false }];
        spec.network = Some(NetworkSpec::Bridge { bridge: VM_BRIDGE.into(), mac: "52:54:00:18:00:64".into(), address: Some(ip) });
        spec.probe = Some(ServiceProbe::Http { address: format!("{bare}:80"), path: "/seq".into(), expect: None });
        let c = lab.client(0);
        c.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create: {e}"))?;
        c.send("POST", "/v1/vms/db/start", &ForceRequest::default()).map_err(|e| anyhow!("start: {e}"))?;
        let addr = format!("{bare}:80");
        wait("the guest's writer to answer on its own address", Duration::from_secs(120), || http_get(&addr, "/seq", Duration::from_millis(400)))?;
        Ok(DiskGuestLab { lab, net, image, addr, vm: "db".into() })
    }

    /// Where committed state runs the guest.
    pub fn host_of(&self) -> Result<String> {
        wait("the guest to be placed", Duration::from_secs(60), || self.lab.placement(0).ok()?.get(&self.vm).cloned().flatten())
    }

    /// The index of host `name`.
    pub fn index(&self, name: &str) -> Result<usize> {
        self.lab.hosts.iter().position(|h| h.name == name).ok_or_else(|| anyhow!("no host {name}"))
    }

    /// Migrates the guest live to the next host and waits for the outcome.
    pub fn migrate_next(&self) -> Result<MigrationOutcome> {
        let from = self.index(&self.host_of()?)?;
        let to = self.lab.hosts[(from + 1) % self.lab.hosts.len()].name.clone();
        let v = self.lab.client(0).send("POST", &format!("/v1/vms/{}/migrate", self.vm), &MigrateRequest { to: Some(to), force: true })?;
        let begun: MigrationBegun = serde_json::from_value(v)?;
        let source = self.lab.client_at(&begun.source_api);
        wait("the migration's outcome", Duration::from_secs(120), || {
            source.get_as::<MigrationsView>("/v1/migrations").ok()?.recent.into_iter().find(|o| o.generation == begun.generation)
        })
    }

    /// Cuts the power of the guest's host, as a real power loss does: every process of the host
    /// dies and its links go dark. Returns the host's index.
    pub fn power_off_guest_host(&mut self) -> Result<usize> {
        let i = self.index(&self.host_of()?)?;
        self.lab.power_off(i);
        self.net.cut(i)?;
        Ok(i)
    }
}

/// Evidence that a QEMU guest's memory was corrupted under it, as it now runs on `host`: its
/// kernel's oops or panic on a serial console, or QEMU refusing a virtio ring whose index in guest
/// memory lags its device state. Seen here only after live migrations under TCG with Debian's QEMU
/// 7.2 (a few in a hundred; the guest then faults in timer or scheduler code, or stops answering),
/// never with shared or local disks alone — a defect of the emulator's dirty-page tracking,
/// not of ownership: every test that meets it still checks that one QEMU ran the VM at a time.
/// After a switch to post-copy a guest that touches many missing pages at once sometimes hangs
/// instead (its kernel reports RCU stalls 21 s later; seen under TCG only, never after pre-copy).
///
/// The corrupted memory travels with the guest: a fault printed on the console of a host it ran on
/// before it migrated (once on its way, or moments before) is its own fault too. So the consoles
/// searched are the guest's lineage — `host`'s, then, while the one searched shows no boot of its
/// own (a guest that arrived by migration prints nothing at start), the other hosts' from the
/// latest written back, up to the one where it booted. A guest restarted cold is judged by its
/// own console alone. Returns the first lines of the evidence.
#[must_use]
pub fn guest_memory_fault(lab: &Lab, host: &str, vm: &str) -> Option<String> {
    let read = |h: &str, what: &str| std::fs::read_to_string(lab.root.join(h).join("run").join(format!("{vm}.{what}"))).unwrap_or_default();
    let written = |h: &str| std::fs::metadata(lab.root.join(h).join("run").join(format!("{vm}.serial"))).and_then(|m| m.modified()).ok();
    let mut earlier: Vec<(std::time::SystemTime, &str)> =
        lab.hosts.iter().filter(|h| h.name != host).filter_map(|h| Some((written(&h.name)?, h.name.as_str()))).collect();
    earlier.sort_by_key(|c| std::cmp::Reverse(c.0));
    let lineage: Vec<(String, String)> =
        std::iter::once(host).chain(earlier.into_iter().map(|(_, h)| h)).map(|h| (read(h, "serial"), read(h, "stderr"))).collect();
    fault_in_lineage(&lineage).map(first_lines)
}

/// The first fault on a guest's consoles and QEMU's own words (serial, stderr), its current host
/// first and the earlier ones from the latest written back, searched up to the first console that
/// shows a boot (the lineage's start).
fn fault_in_lineage(lineage: &[(String, String)]) -> Option<&str> {
    for (serial, stderr) in lineage {
        if let Some(text) = kernel_fault(serial).or_else(|| ring_fault(stderr)) {
            return Some(text);
        }
        if booted_here(serial) {
            return None;
        }
    }
    None
}

/// QEMU refusing a virtio ring whose index in guest memory lags its device state, from that line.
fn ring_fault(stderr: &str) -> Option<&str> {
    stderr.find("inconsistent with Host index").map(|at| &stderr[stderr[..at].rfind('\n').map_or(0, |n| n + 1)..])
}

/// The guest kernel's report of a fault on a serial console, from its first line on.
fn kernel_fault(serial: &str) -> Option<&str> {
    ["BUG: ", "general protection fault", "Kernel panic", "Oops", "rcu: INFO: rcu_preempt", "kthread starved"]
        .iter()
        .filter_map(|m| serial.find(m))
        .min()
        .map(|at| &serial[at..])
}

/// Whether a console shows a boot: the kernel's first messages or the test guest's ready line.
fn booted_here(serial: &str) -> bool {
    serial.contains("TANDEM-GUEST-READY") || serial.lines().any(|l| l.starts_with("[    0."))
}

fn first_lines(text: &str) -> String {
    text.lines().take(8).collect::<Vec<_>>().join("\n")
}

/// The highest sequence number the guest's writer left on a raw image (its records: 512 bytes,
/// `TNDMSEQ1`, the number and its complement, little-endian; a torn or stale sector does not
/// pass), or `None` when it holds none.
pub fn highest_record(image: &Path) -> Result<Option<u64>> {
    Ok(records(image)?.last().copied())
}

/// Every whole sequence record in `image`'s ring (torn ones left out).
pub fn records(image: &Path) -> Result<std::collections::BTreeSet<u64>> {
    let data = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    Ok(data
        .chunks_exact(512)
        .filter(|r| &r[..8] == b"TNDMSEQ1")
        .filter_map(|r| {
            let seq = u64::from_le_bytes(r[8..16].try_into().ok()?);
            let check = u64::from_le_bytes(r[16..24].try_into().ok()?);
            (check == !seq).then_some(seq)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_fault_is_found_along_the_migrations_back_to_the_boot_but_not_before_it() {
        let boot = "[    0.331703] PCI: x\nTANDEM-GUEST-READY web0\n".to_string();
        let oops = "[   12.424355] Oops: 0000 [#1]\n[   12.4] note: httpd[138] exited\n".to_string();
        let console = |serial: &str| (serial.to_string(), String::new());
        // Booted on one host, faulted after a move to a second, moved on to a third.
        assert!(fault_in_lineage(&[console(""), console(&oops), console(&boot)]).is_some_and(|t| t.starts_with("Oops")));
        // Faulted on its first host, moved twice since.
        assert!(fault_in_lineage(&[console(""), console(""), console(&format!("{boot}{oops}"))]).is_some());
        // Restarted cold where it runs now: an old incarnation's fault is not its own.
        assert_eq!(fault_in_lineage(&[console(&boot), console(&oops)]), None);
        // Arrived by a move from a host where it booted and ran well.
        assert_eq!(fault_in_lineage(&[console(""), console(&boot), console(&oops)]), None);
        assert_eq!(fault_in_lineage(&[]), None);
        // QEMU's ring error on the host it came from (where the corrupted memory arrived).
        let ring = "qemu: warn\nqemu-system-x86_64: VQ 1 size 0x400 Guest index 0x33a inconsistent with Host index 0x33b: delta 0xffff\n";
        let lineage = [console(""), (String::new(), ring.to_string()), console(&boot)];
        let found = fault_in_lineage(&lineage);
        assert!(found.is_some_and(|t| t.starts_with("qemu-system-x86_64: VQ 1")), "{found:?}");
    }

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn records_are_read_back_and_torn_ones_ignored() {
        let path = std::env::temp_dir().join(format!("tandem-records-{}", std::process::id()));
        let mut data = vec![0u8; 4 * 512];
        for (slot, seq, check) in [(0usize, 7u64, !7u64), (1, 9, !9), (2, 40, 41)] {
            let r = &mut data[slot * 512..slot * 512 + 24];
            r[..8].copy_from_slice(b"TNDMSEQ1");
            r[8..16].copy_from_slice(&seq.to_le_bytes());
            r[16..24].copy_from_slice(&check.to_le_bytes());
        }
        std::fs::write(&path, &data).expect("write");
        assert_eq!(highest_record(&path).expect("read"), Some(9), "the torn record (40) does not count");
        std::fs::write(&path, vec![0u8; 1024]).expect("write");
        assert_eq!(highest_record(&path).expect("read"), None);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_judge_sees_lost_writes_regressions_and_stalls() {
        let t = Instant::now();
        let s = |ms, last, recovered, writes| SeqSample { at: at(t, ms), last, recovered, writes };
        // One boot, steady; then a reboot that found everything.
        let good = [s(0, 10, 0, 10), s(20, 14, 0, 14), s(40, 18, 0, 18), s(400, 18, 18, 0), s(420, 22, 18, 4)];
        let v = judge(&good);
        assert_eq!((v.boots, v.lost.clone(), v.regressions), (2, vec![], 0));
        assert_eq!(v.longest_stall_ms, 380, "from the last progress (40 ms) to the next (420 ms)");
        // A reboot that found less than was acknowledged, and a number that went back.
        let bad = [s(0, 10, 0, 10), s(20, 9, 0, 11), s(40, 14, 0, 14), s(400, 12, 12, 0)];
        let v = judge(&bad);
        assert_eq!((v.boots, v.lost, v.regressions), (2, vec![(14, 12)], 1));
        assert_eq!(judge(&[]).boots, 0);
    }

    #[test]
    fn write_locks_are_counted_per_image() {
        let table = "1: OFDLCK ADVISORY  READ -1 fe:00:77 201 201\n\
                     2: OFDLCK ADVISORY  READ -1 fe:00:77 100 101\n\
                     3: OFDLCK ADVISORY  READ -1 fe:00:78 100 101\n\
                     4: POSIX  ADVISORY  WRITE 12 fe:00:77 0 EOF\n\
                     4: -> OFDLCK ADVISORY  READ -1 fe:00:77 100 101\n";
        assert_eq!(write_locks(table, "fe:00:77"), 2, "the granted write-permission lock and a whole-file lock; not the waiter, not 201");
        assert_eq!(write_locks(table, "fe:00:78"), 1);
        assert_eq!(write_locks(table, "fe:00:79"), 0);
    }
}
