//! A disk mirrored synchronously to another site's copy, with the real parts: the disk-backed
//! test guest in QEMU, its disk mirrored write-blocking (`tandem_drivers::syncmirror`) into the
//! copy a `qemu-storage-daemon` serves over NBD (`tandem_drivers::sitecopy`). No agents: this is
//! the block layer's half of site mirroring, checked from outside.
//!
//! - In sync, no write the guest acknowledged is missing from the other copy.
//! - The other copy lost — its server gone, or silent as behind a cut link: the guest's writes
//!   are held, however long, until the relay lets them go (the agent does so once the copy is
//!   committed as stale); then they complete on the local copy and the mirror stops.
//! - The copy back: the resync copies only what was missed (far less than the disk), and both
//!   copies end byte for byte equal.
//! - The local copy's storage fails (EIO): the guest pauses, its disk switches onto the other
//!   copy in the same QEMU (`tandem_drivers::pathswitch`), and it writes on — no restart, no
//!   error seen, no acknowledged write lost; the storage back, the disk goes back to it.

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use tandem_drivers::copyrelay::{CopyRelay, RelayHealth};
use tandem_drivers::launcher::Launcher;
use tandem_drivers::pathswitch;
use tandem_drivers::qmp::Qmp;
use tandem_drivers::sitecopy::{export_name, CopyServer, CopyServerConfig};
use tandem_drivers::syncmirror::{self, MirrorSample, RemoteCopy};
use tandem_lab::bench::migration::test_guest;
use tandem_lab::diskguest::{highest_record, SeqWatch};
use tandem_lab::qemuproc::QemuProcess as Guest;
use tandem_lab::scratch::ScratchDir;

const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// The guest's HTTP port forward and the copy server's NBD address (loopback net 103).
const GUEST_ADDR: &str = "127.103.0.2:8080";
const COPY_IP: &str = "127.103.0.1";
const COPY_PORT: u16 = 10_931;
const DISK_BYTES: u64 = 64 << 20;
const STALL: Duration = Duration::from_millis(800);

async fn launch(dir: &Path, guest: &Path, image: &Path, addr: &str) -> Result<Guest> {
    let qmp_path = dir.join("vm.qmp");
    let (ip, port) = addr.split_once(':').ok_or_else(|| anyhow!("address"))?;
    let mut cmd = std::process::Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-M", "microvm", "-nodefaults", "-no-user-config", "-cpu", "qemu64", "-display", "none", "-smp", "1", "-m", "128"])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())])
        .args(["-serial", &format!("file:{}", dir.join("vm.serial").display())])
        .args(["-kernel", &guest.join("vmlinuz").display().to_string(), "-initrd", &guest.join("initrd.img").display().to_string()])
        .args(["-append", "console=ttyS0 quiet tsc_early_khz=2000000 mitigations=off tandem.vm=db"])
        // As the qemu driver opens a mirrored disk: a failed request pauses the guest.
        .args(["-drive", &format!("file={},if=none,id=disk0,format=raw,cache=none,werror=stop,rerror=stop,auto-read-only=off", image.display())])
        .args(["-device", "virtio-blk-device,drive=disk0"])
        .args(["-netdev", &format!("user,id=net0,hostfwd=tcp:{ip}:{port}-:80"), "-device", "virtio-net-device,netdev=net0"]);
    Guest::spawn(cmd, &qmp_path, QMP_TIMEOUT).await
}

async fn wait_for(what: &str, q: &Qmp, within: Duration, mut done: impl FnMut(&MirrorSample) -> bool) -> Result<MirrorSample> {
    let deadline = Instant::now() + within;
    loop {
        let s = syncmirror::sample("db", q, QMP_TIMEOUT, 0).await?;
        if done(&s) {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(anyhow!("{what}: still {s:?} after {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The mirror job's total work so far (QEMU's `len`: the disk, plus every range copied again).
async fn job_len(q: &Qmp) -> Result<u64> {
    let jobs = q.execute("query-block-jobs", Value::Null, QMP_TIMEOUT).await?;
    let id = syncmirror::job_id(0);
    jobs.as_array()
        .and_then(|a| a.iter().find(|j| j.get("device").and_then(Value::as_str) == Some(id.as_str())))
        .and_then(|j| j.get("len").and_then(Value::as_u64))
        .ok_or_else(|| anyhow!("no mirror job in {jobs}"))
}

/// Both ends of the copy channel hold the same key (the lab's), as a cluster's hosts do.
fn creds() -> std::sync::Arc<tandem_drivers::copychannel::CopyCredentials> {
    tandem_lab::bench::syncmirror::copy_credentials().expect("credentials")
}

fn copy_config(dir: &Path) -> CopyServerConfig {
    copy_config_on(dir, COPY_PORT)
}

fn copy_config_on(dir: &Path, port: u16) -> CopyServerConfig {
    CopyServerConfig { binary: "qemu-storage-daemon".into(), run_dir: dir.to_path_buf(), host_ip: COPY_IP.into(), port, credentials: creds() }
}

/// Holds for `hold` and checks that no write completed meanwhile; returns the number last
/// acknowledged before the hold.
async fn assert_held(seq: &SeqWatch, relay: &CopyRelay, hold: Duration) -> Result<u64> {
    assert_held_for(seq, relay, hold, "").await
}

/// [`assert_held`], the relay's reason for the loss containing `why`.
async fn assert_held_for(seq: &SeqWatch, relay: &CopyRelay, hold: Duration, why: &str) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(relay.health(), RelayHealth::Lost { .. }) {
        if Instant::now() >= deadline {
            return Err(anyhow!("the relay never saw the copy lost: {:?}", relay.health()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let RelayHealth::Lost { why: seen, .. } = relay.health() {
        assert!(seen.contains(why), "the relay lost the copy for '{seen}', not '{why}'");
    }
    // The watcher samples every 20 ms: what the guest had acknowledged before the loss is in
    // its samples a moment later (and nothing is acknowledged meanwhile, if the hold works).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_loss = seq.highest();
    tokio::time::sleep(hold).await;
    let now = seq.highest();
    assert!(now == at_loss, "writes completed on one copy without a release: {at_loss} soon after the loss, {now} after {hold:?} more");
    Ok(now)
}

/// Lets the held writes go and checks that they do, on the local copy alone.
async fn release_and_go_on(seq: &SeqWatch, relay: &CopyRelay, vm: &Guest, held: u64) -> Result<()> {
    relay.release();
    seq.wait_past(held + 5, Duration::from_secs(30)).map_err(|e| anyhow!("writes never went on alone: {e}"))?;
    wait_for("the mirror to stop", &vm.qmp, Duration::from_secs(10), |s| matches!(s, MirrorSample::Stopped { .. })).await?;
    Ok(())
}

/// Resumes the mirror until it is in sync again.
async fn resume_until_in_sync(vm: &Guest) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        syncmirror::resume("db", &vm.qmp, QMP_TIMEOUT, 0).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        match syncmirror::sample("db", &vm.qmp, QMP_TIMEOUT, 0).await? {
            MirrorSample::InSync => return Ok(()),
            s if Instant::now() >= deadline => return Err(anyhow!("no resync: {s:?}")),
            _ => {}
        }
    }
}

/// Resumes the mirror until it is in sync again; the bytes it copied again.
async fn resync(vm: &Guest, len_before: u64) -> Result<u64> {
    resume_until_in_sync(vm).await?;
    let recopied = job_len(&vm.qmp).await? - len_before;
    eprintln!("resync copied {} KiB of a {} MiB disk", recopied >> 10, DISK_BYTES >> 20);
    assert!(recopied > 0 && recopied < DISK_BYTES / 4, "the resync copied {recopied} bytes of {DISK_BYTES}");
    Ok(recopied)
}

fn assert_acknowledged_on(remote: &Path, seq: &SeqWatch) -> Result<()> {
    let acknowledged = seq.highest();
    let there = highest_record(remote)?.unwrap_or(0);
    assert!(there >= acknowledged, "the other copy holds {there}, the guest acknowledged {acknowledged}");
    Ok(())
}

async fn scenario(dir: &Path, guest: &Path) -> Result<()> {
    let (local, remote) = (dir.join("site-a.img"), dir.join("site-b.img"));
    for image in [&local, &remote] {
        std::fs::File::create(image).and_then(|f| f.set_len(DISK_BYTES))?;
    }
    let launcher = Launcher::new()?;
    let export = export_name("db", 0);
    let server = CopyServer::start(&copy_config(dir), &launcher).await?;
    server.serve(&export, &remote).await?;
    let relay = CopyRelay::start(&dir.join("relay.sock"), &format!("{COPY_IP}:{COPY_PORT}"), STALL, creds())?;
    let vm = launch(dir, guest, &local, GUEST_ADDR).await?;
    let seq = SeqWatch::start(GUEST_ADDR);
    seq.wait_past(0, Duration::from_secs(60)).map_err(|e| anyhow!("the guest's writer never answered: {e}"))?;

    let copy = RemoteCopy { disk: 0, relay: relay.socket().to_path_buf(), export: export.clone(), granularity: None, speed: None };
    syncmirror::attach("db", &vm.qmp, QMP_TIMEOUT, &copy).await?;
    wait_for("the first full copy", &vm.qmp, Duration::from_secs(60), |s| *s == MirrorSample::InSync).await?;
    assert_eq!(relay.health(), RelayHealth::Joined);
    // In sync: every number the guest acknowledged is on the other copy already.
    for _ in 0..5 {
        assert_acknowledged_on(&remote, &seq)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The copy server gone (its connection closed): the writes wait for the release, however long.
    let len_before = job_len(&vm.qmp).await?;
    drop(server);
    let held = assert_held(&seq, &relay, Duration::from_secs(4)).await?;
    assert!(highest_record(&remote)?.unwrap_or(0) + 1 >= held, "the other copy lost a number acknowledged before the loss");
    release_and_go_on(&seq, &relay, &vm, held).await?;
    let server = CopyServer::start(&copy_config(dir), &launcher).await?;
    server.serve(&export, &remote).await?;
    resync(&vm, len_before).await?;
    assert_acknowledged_on(&remote, &seq)?;

    // The copy server silent (stopped: its connection stays up, nothing answers — a cut link).
    let len_before = job_len(&vm.qmp).await?;
    let pid = server.pid();
    signal(pid, libc::SIGSTOP);
    let held = assert_held(&seq, &relay, Duration::from_secs(4)).await;
    signal(pid, libc::SIGCONT);
    let held = held?;
    release_and_go_on(&seq, &relay, &vm, held).await?;
    resync(&vm, len_before).await?;

    // Both copies equal (the guest paused, so nothing is in flight).
    vm.qmp.execute("stop", json!({}), QMP_TIMEOUT).await?;
    let (a, b) = (std::fs::read(&local)?, std::fs::read(&remote)?);
    assert!(a == b, "the copies differ after the resync");
    assert_acknowledged_on(&remote, &seq)?;
    syncmirror::detach("db", &vm.qmp, QMP_TIMEOUT, 0).await?;
    assert_eq!(syncmirror::sample("db", &vm.qmp, QMP_TIMEOUT, 0).await?, MirrorSample::Absent);
    server.withdraw(&export).await?;
    assert!(server.served().await.is_empty());
    drop(seq);
    Ok(())
}

/// Waits, up to a minute, for the way back into disk 0's local copy to be in sync.
async fn way_back_in_sync(vm: &Guest) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = vm.qmp.execute("query-block-jobs", Value::Null, QMP_TIMEOUT).await?;
        if pathswitch::back_sample("db", &vm.qmp, QMP_TIMEOUT, 0, &jobs).await? == MirrorSample::InSync {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the way back never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits, up to `within`, for the guest to pause on an error of its disk 0.
async fn paused_on_failed_disk(vm: &Guest, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while pathswitch::failed_disks("db", &vm.qmp, QMP_TIMEOUT).await? != [0] {
        anyhow::ensure!(Instant::now() < deadline, "the guest did not pause on its failed disk within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the copy server this test started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Runs a scenario on its own runtime; on failure, prints the guest's console.
fn run(dir: &ScratchDir, scenario: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(scenario);
    if result.is_err() {
        eprintln!("guest console:\n{}", std::fs::read_to_string(dir.path().join("vm.serial")).unwrap_or_default());
        eprintln!("QEMU's stderr:\n{}", std::fs::read_to_string(dir.path().join("vm.stderr")).unwrap_or_default());
    }
    result
}

#[test]
fn a_mirrored_disk_holds_writes_while_its_other_copy_is_lost_and_resyncs_only_what_was_missed() -> Result<()> {
    let Some(guest) = test_guest() else { return Ok(()) };
    let dir = ScratchDir::new("tandem-site-mirror", &[])?;
    run(&dir, scenario(dir.path(), &guest))
}

/// The stale copy of a site back from its loss: the VM's disk as it was, plus chunks the
/// site had written and the VM's copy never got (in flight at the loss); the VM's copy has
/// chunks of its own since. A mirror compared with the stale copy's chunk sums sends only what
/// differs, and leaves both copies equal.
async fn delta_scenario(dir: &Path, guest: &Path) -> Result<()> {
    let (local, remote) = (dir.join("site-a.img"), dir.join("site-b.img"));
    let chunk = tandem_drivers::chunksums::MIN_CHUNK as usize;
    let mut disk: Vec<u8> = (0..DISK_BYTES as usize / chunk).flat_map(|i| std::iter::repeat_n((i % 251) as u8 + 1, chunk)).collect();
    let mut stale = disk.clone();
    for mib in [10usize, 20, 30] {
        stale[mib << 20..(mib << 20) + 4096].fill(0xee);
    }
    stale[40 << 20..(40 << 20) + chunk].fill(0);
    disk[50 << 20..(50 << 20) + 3 * chunk].fill(0x5a);
    std::fs::write(&local, &disk)?;
    std::fs::write(&remote, &stale)?;
    drop((disk, stale));
    let launcher = Launcher::new()?;
    let export = export_name("db", 0);
    let server = CopyServer::start(&copy_config_on(dir, COPY_PORT + 7), &launcher).await?;
    server.serve(&export, &remote).await?;
    let relay = CopyRelay::start(&dir.join("relay.sock"), &format!("{COPY_IP}:{}", COPY_PORT + 7), STALL, creds())?;
    let sums = relay.compare_with_copy(&export, DISK_BYTES).await?;
    assert_eq!(sums.chunk(), chunk as u64);
    let vm = launch(dir, guest, &local, GUEST_ADDR).await?;
    let seq = SeqWatch::start(GUEST_ADDR);
    seq.wait_past(0, Duration::from_secs(60)).map_err(|e| anyhow!("the guest's writer never answered: {e}"))?;
    let copy = RemoteCopy { disk: 0, relay: relay.socket().to_path_buf(), export: export.clone(), granularity: Some(sums.chunk()), speed: None };
    let started = Instant::now();
    syncmirror::attach("db", &vm.qmp, QMP_TIMEOUT, &copy).await?;
    wait_for("the resync by chunk sums", &vm.qmp, Duration::from_secs(60), |s| *s == MirrorSample::InSync).await?;
    let took = started.elapsed();
    let stats = relay.end_delta().ok_or_else(|| anyhow!("no figures of the resync"))?;
    assert_eq!(relay.delta_stats(), None, "the comparison ended");
    eprintln!(
        "resync by chunk sums: {} KiB of writes crossed the link, {} KiB matched, of a {} MiB disk, in {took:?}",
        stats.sent >> 10,
        stats.matched >> 10,
        DISK_BYTES >> 20
    );
    // The differing chunks (3 scribbled, 1 zeroed there, 3 changed here) and the guest's own
    // writes meanwhile: far less than the disk.
    assert!(stats.sent >= 6 * chunk as u64, "the differing chunks were sent: {stats:?}");
    assert!(stats.sent < DISK_BYTES / 8, "only what differs crosses the link: {stats:?}");
    assert!(stats.matched > DISK_BYTES / 2, "the rest matched: {stats:?}");
    // In sync, and writing on: acknowledged writes are on the other copy; the copies end equal.
    let past = seq.highest();
    seq.wait_past(past + 5, Duration::from_secs(30)).map_err(|e| anyhow!("writes stopped: {e}"))?;
    assert_acknowledged_on(&remote, &seq)?;
    vm.qmp.execute("stop", json!({}), QMP_TIMEOUT).await?;
    let (a, b) = (std::fs::read(&local)?, std::fs::read(&remote)?);
    assert!(a == b, "the copies differ after the resync by chunk sums");
    vm.qmp.execute("cont", json!({}), QMP_TIMEOUT).await?;
    syncmirror::detach("db", &vm.qmp, QMP_TIMEOUT, 0).await?;
    let _server = lost_midway(dir, &launcher, server, &relay, &vm, &seq, &remote).await?;
    vm.qmp.execute("stop", json!({}), QMP_TIMEOUT).await?;
    let (a, b) = (std::fs::read(&local)?, std::fs::read(&remote)?);
    assert!(a == b, "the copies differ after a resync by chunk sums that lost its copy midway");
    syncmirror::detach("db", &vm.qmp, QMP_TIMEOUT, 0).await?;
    drop(seq);
    Ok(())
}

/// A resync by chunk sums whose copy is lost as it starts (its server gone): the writes are
/// held until the release, the comparison ends (the next server may serve anything), and the
/// mirror resumed through a new server sends what it copies whole — the copies end equal. The
/// new server is returned (the caller detaches the mirror before it goes).
async fn lost_midway(dir: &Path, launcher: &Launcher, server: CopyServer, relay: &CopyRelay, vm: &Guest, seq: &SeqWatch, remote: &Path) -> Result<CopyServer> {
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(remote)?;
        for at in [12u64 << 20, 44 << 20] {
            f.write_all_at(&[0xdd; 4096], at)?;
        }
    }
    let export = export_name("db", 0);
    let sums = relay.compare_with_copy(&export, DISK_BYTES).await?;
    let copy = RemoteCopy { disk: 0, relay: relay.socket().to_path_buf(), export: export.clone(), granularity: Some(sums.chunk()), speed: None };
    syncmirror::attach("db", &vm.qmp, QMP_TIMEOUT, &copy).await?;
    drop(server);
    let held = assert_held(seq, relay, Duration::from_secs(2)).await?;
    assert_eq!(relay.delta_stats(), None, "the comparison ended with the copy's loss");
    release_and_go_on(seq, relay, vm, held).await?;
    eprintln!("a resync by chunk sums lost its copy: {:?}", syncmirror::sample("db", &vm.qmp, QMP_TIMEOUT, 0).await?);
    let server = CopyServer::start(&copy_config_on(dir, COPY_PORT + 7), launcher).await?;
    server.serve(&export, remote).await?;
    resume_until_in_sync(vm).await?;
    assert_acknowledged_on(remote, seq)?;
    Ok(server)
}

/// A mirror capped at `[mirror] resync_max_mib_s` (QEMU's job `speed`): QEMU takes the cap, the
/// first copy of a disk full of data goes no faster (its rate is printed, not asserted: this
/// machine is noisy), and the guest's writes are acknowledged while it copies — the cap is on
/// the mirror's own copying, never on them — each on both copies once in sync.
async fn capped_scenario(dir: &Path, guest: &Path) -> Result<()> {
    const CAP: u64 = 8 << 20;
    let (local, remote) = (dir.join("site-a.img"), dir.join("site-b.img"));
    // Data everywhere (no zero ranges for the mirror to skip): every byte crosses.
    let disk: Vec<u8> = (0..DISK_BYTES).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1).collect();
    std::fs::write(&local, &disk)?;
    std::fs::File::create(&remote)?.set_len(DISK_BYTES)?;
    drop(disk);
    let launcher = Launcher::new()?;
    let export = export_name("db", 0);
    let server = CopyServer::start(&copy_config_on(dir, COPY_PORT + 20), &launcher).await?;
    server.serve(&export, &remote).await?;
    let relay = CopyRelay::start(&dir.join("relay.sock"), &format!("{COPY_IP}:{}", COPY_PORT + 20), STALL, creds())?;
    let addr = "127.103.0.9:8080";
    let vm = launch(dir, guest, &local, addr).await?;
    let seq = SeqWatch::start(addr);
    seq.wait_past(0, Duration::from_secs(60)).map_err(|e| anyhow!("the guest's writer never answered: {e}"))?;
    let copy = RemoteCopy { disk: 0, relay: relay.socket().to_path_buf(), export, granularity: None, speed: Some(CAP) };
    let started = Instant::now();
    syncmirror::attach("db", &vm.qmp, QMP_TIMEOUT, &copy).await?;
    let jobs = vm.qmp.execute("query-block-jobs", Value::Null, QMP_TIMEOUT).await?;
    let speed = jobs.as_array().and_then(|a| a.first()).and_then(|j| j.get("speed")).and_then(Value::as_u64);
    assert_eq!(speed, Some(CAP), "QEMU took the cap: {jobs}");
    // While the first copy goes, the guest's writes are acknowledged as ever.
    let (at_start, mut copying_seen) = (seq.highest(), 0u32);
    while syncmirror::sample("db", &vm.qmp, QMP_TIMEOUT, 0).await? != MirrorSample::InSync {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "the capped first copy never ended");
        if seq.highest() > at_start + 3 {
            copying_seen += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    eprintln!(
        "capped first copy: {} MiB in {:.2} s = {:.1} MiB/s (cap {} MiB/s); the guest wrote {} records meanwhile",
        DISK_BYTES >> 20,
        took.as_secs_f64(),
        (DISK_BYTES >> 20) as f64 / took.as_secs_f64(),
        CAP >> 20,
        seq.highest() - at_start
    );
    assert!(copying_seen > 0, "the guest's writes went on while the capped mirror copied");
    let past = seq.highest();
    seq.wait_past(past + 5, Duration::from_secs(30)).map_err(|e| anyhow!("writes stopped: {e}"))?;
    assert_acknowledged_on(&remote, &seq)?;
    vm.qmp.execute("stop", json!({}), QMP_TIMEOUT).await?;
    assert!(std::fs::read(&local)? == std::fs::read(&remote)?, "the copies differ after the capped first copy");
    syncmirror::detach("db", &vm.qmp, QMP_TIMEOUT, 0).await?;
    drop((seq, relay, server));
    Ok(())
}

#[test]
fn a_capped_mirror_copies_no_faster_than_its_cap_and_never_holds_the_guests_writes() -> Result<()> {
    let Some(guest) = test_guest() else { return Ok(()) };
    let dir = ScratchDir::new("tandem-site-mirror-cap", &[])?;
    run(&dir, capped_scenario(dir.path(), &guest))
}

#[test]
fn a_resync_into_a_stale_copy_sends_only_the_chunks_that_differ() -> Result<()> {
    let Some(guest) = test_guest() else { return Ok(()) };
    let dir = ScratchDir::new("tandem-site-delta", &[])?;
    run(&dir, delta_scenario(dir.path(), &guest))
}

/// Which copy's storage is a FUSE view that the test can make fail.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FuseSide {
    Local,
    Remote,
}

/// A guest whose disk is mirrored, in sync, one copy's storage behind FUSE (dropped in this
/// order: the guest first, the FUSE view last).
struct FuseMirror {
    vm: Guest,
    seq: SeqWatch,
    relay: CopyRelay,
    _server: CopyServer,
    /// The copy server's parent: its children die with it, so it outlives the server.
    _launcher: Launcher,
    fuse: tandem_lab::fusedisk::FuseDisk,
    /// The files that hold each copy's bytes.
    local: std::path::PathBuf,
    remote: std::path::PathBuf,
}

/// Starts the guest on `site-a.img`, mirrored into `site-b.img` served at `COPY_PORT + port`,
/// `side`'s file reached through FUSE; waits for the mirror in sync.
async fn fuse_mirror(dir: &Path, guest: &Path, side: FuseSide, port: u16, addr: &str) -> Result<FuseMirror> {
    let (local, remote) = (dir.join("site-a.img"), dir.join("site-b.img"));
    for image in [&local, &remote] {
        std::fs::File::create(image).and_then(|f| f.set_len(DISK_BYTES))?;
    }
    let mount = dir.join("fuse");
    std::fs::create_dir_all(&mount)?;
    let fuse = tandem_lab::fusedisk::FuseDisk::mount(if side == FuseSide::Local { &local } else { &remote }, &mount, 1)?;
    let (local_at, remote_at) = if side == FuseSide::Local { (fuse.path(0), remote.clone()) } else { (local.clone(), fuse.path(0)) };
    let launcher = Launcher::new()?;
    let export = export_name("db", 0);
    let server = CopyServer::start(&copy_config_on(dir, COPY_PORT + port), &launcher).await?;
    server.serve(&export, &remote_at).await?;
    let relay = CopyRelay::start(&dir.join("relay.sock"), &format!("{COPY_IP}:{}", COPY_PORT + port), STALL, creds())?;
    let vm = launch(dir, guest, &local_at, addr).await?;
    let seq = SeqWatch::start(addr);
    seq.wait_past(0, Duration::from_secs(60)).map_err(|e| anyhow!("the guest's writer never answered: {e}"))?;
    let copy = RemoteCopy { disk: 0, relay: relay.socket().to_path_buf(), export, granularity: None, speed: None };
    syncmirror::attach("db", &vm.qmp, QMP_TIMEOUT, &copy).await?;
    wait_for("the first full copy", &vm.qmp, Duration::from_secs(60), |s| *s == MirrorSample::InSync).await?;
    Ok(FuseMirror { vm, seq, relay, _server: server, _launcher: launcher, fuse, local, remote })
}

/// The copy server's storage fails (EIO through a FUSE view): the server answers the mirror's
/// writes with errors, which QEMU would take as "complete on the local copy alone". The relay
/// holds those replies like a silent copy's: no write is acknowledged on one copy until the
/// release; the storage back, the resync copies only what was missed.
async fn failing_storage_scenario(dir: &Path, guest: &Path) -> Result<()> {
    // Held as one: whatever ends the test, the guest goes before the storage under it.
    let m = fuse_mirror(dir, guest, FuseSide::Remote, 1, "127.103.0.3:8080").await?;
    let (vm, seq, relay, fuse) = (&m.vm, &m.seq, &m.relay, &m.fuse);
    let len_before = job_len(&vm.qmp).await?;
    fuse.set_mode(0, tandem_lab::fusedisk::ViewMode::Fail);
    let held = assert_held_for(seq, relay, Duration::from_secs(3), "error").await?;
    release_and_go_on(seq, relay, vm, held).await?;
    fuse.set_mode(0, tandem_lab::fusedisk::ViewMode::Normal);
    resync(vm, len_before).await?;
    vm.qmp.execute("stop", json!({}), QMP_TIMEOUT).await?;
    assert!(std::fs::read(&m.local)? == std::fs::read(&m.remote)?, "the copies differ after the resync");
    Ok(())
}

#[test]
fn a_copy_whose_storage_answers_errors_holds_the_writes_like_a_lost_one() -> Result<()> {
    let Some(guest) = test_guest() else { return Ok(()) };
    let dir = ScratchDir::new("tandem-site-mirror-eio", &[])?;
    run(&dir, failing_storage_scenario(dir.path(), &guest))
}

/// The other site's storage has a volatile write cache and loses its power: every write the
/// guest acknowledged must be on that copy all the same. The guest makes its writes durable with
/// flushes, which QEMU's mirror passes to the local copy alone; the copy server writes through
/// (each write flushed before its reply), so the flush is not needed there.
async fn volatile_cache_scenario(dir: &Path, guest: &Path) -> Result<()> {
    let m = fuse_mirror(dir, guest, FuseSide::Remote, 3, "127.103.0.5:8080").await?;
    m.fuse.set_volatile_cache(true);
    let (from, syncs) = (m.seq.highest(), m.fuse.syncs());
    m.seq.wait_past(from + 30, Duration::from_secs(30)).map_err(|e| anyhow!("the guest did not write on: {e}"))?;
    // Power lost while the guest writes (stopping the guest first would flush every copy).
    let lost = m.fuse.lose_power()?;
    let flushes = m.fuse.syncs() - syncs;
    // A write the guest sees acknowledged after this instant is held (the storage answers
    // nothing more): the last acknowledged number settles.
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!("the other copy's storage lost its power: {lost} unflushed writes undone; {flushes} flushes had reached it");
    let acknowledged = m.seq.highest();
    let there = tandem_lab::diskguest::records(&m.remote)?;
    let missing: Vec<u64> = (from + 1..=acknowledged).filter(|n| !there.contains(n)).collect();
    // Power back before judging: the copy server, stuck on the storage, must be able to end.
    m.fuse.set_mode(0, tandem_lab::fusedisk::ViewMode::Normal);
    assert!(missing.is_empty(), "acknowledged writes missing on the other copy: {missing:?} of {}..={acknowledged}", from + 1);
    Ok(())
}

#[test]
fn every_acknowledged_write_survives_the_other_copys_storage_losing_its_cache() -> Result<()> {
    let Some(guest) = test_guest() else { return Ok(()) };
    let dir = ScratchDir::new("tandem-site-mirror-cache", &[])?;
    run(&dir, volatile_cache_scenario(dir.path(), &guest))
}

/// The local copy's storage fails (EIO through a FUSE view) while the mirror is in sync: the
/// guest pauses on the failed request (it sees no error), the disk switches onto the other
/// site's copy, and the guest, resumed, writes on there: every number it acknowledged is on
/// that copy, none after the switch reaches the failed one.
async fn local_path_loss_scenario(dir: &Path, guest: &Path) -> Result<()> {
    // Held as one: whatever ends the test, the guest goes before the storage under it.
    let m = fuse_mirror(dir, guest, FuseSide::Local, 2, "127.103.0.4:8080").await?;
    let (vm, seq, fuse, backing, remote) = (&m.vm, &m.seq, &m.fuse, &m.local, &m.remote);
    let lost = Instant::now();
    fuse.set_mode(0, tandem_lab::fusedisk::ViewMode::Fail);
    paused_on_failed_disk(vm, Duration::from_secs(10)).await?;
    let acknowledged = seq.highest();
    pathswitch::switch_to_copy("db", &vm.qmp, QMP_TIMEOUT, 0).await?;
    pathswitch::resume("db", &vm.qmp, QMP_TIMEOUT).await?;
    let switched = lost.elapsed();
    seq.wait_past(acknowledged + 20, Duration::from_secs(30)).map_err(|e| anyhow!("the guest did not write on on the other copy: {e}"))?;
    let verdict = tandem_lab::diskguest::judge(&seq.samples());
    eprintln!("local copy lost: switched to the other copy {switched:?} after the loss; longest pause in the writes {} ms", verdict.longest_stall_ms);
    assert!(verdict.lost.is_empty() && verdict.regressions == 0 && verdict.boots == 1, "{verdict:?}");
    assert_acknowledged_on(remote, seq)?;
    fuse.set_mode(0, tandem_lab::fusedisk::ViewMode::Normal);
    let on_failed = highest_record(backing)?.unwrap_or(0);
    assert!(on_failed < seq.highest(), "the failed copy got writes after the switch ({on_failed})");

    // The local storage back: the disk is mirrored back into it, then runs on it again, mirrored
    // into the other copy as before — still without a restart.
    let start = pathswitch::ReturnStep::Start { relative: String::new(), format: "raw".into() };
    let written_before = fuse.written();
    // The storage back has a volatile cache: what the way back copies must be flushed before
    // the local copy is committed current (after `Pause`).
    fuse.set_volatile_cache(true);
    pathswitch::return_step("db", &vm.qmp, QMP_TIMEOUT, 0, &start, &pathswitch::file_node(&fuse.path(0))).await?;
    // Given up at once (as when the storage fails again) and started again: what the first
    // round was copying must not be forgotten (the copies are compared at the end).
    pathswitch::return_step("db", &vm.qmp, QMP_TIMEOUT, 0, &pathswitch::ReturnStep::Abandon, &Value::Null).await?;
    pathswitch::return_step("db", &vm.qmp, QMP_TIMEOUT, 0, &start, &pathswitch::file_node(&fuse.path(0))).await?;
    way_back_in_sync(vm).await?;
    // Paused, then resumed as when the commit fails (the guest writes on on the other copy),
    // then paused again for the commit that succeeds: the second pause copies and flushes as
    // the first did.
    pathswitch::return_step("db", &vm.qmp, QMP_TIMEOUT, 0, &pathswitch::ReturnStep::Pause, &Value::Null).await?;
    pathswitch::return_step("db", &vm.qmp, QMP_TIMEOUT, 0, &pathswitch::ReturnStep::Resume, &Value::Null).await?;
    let resumed_at = seq.highest();
    seq.wait_past(resumed_at + 5, Duration::from_secs(30)).map_err(|e| anyhow!("the guest did not write on after the failed commit: {e}"))?;
    way_back_in_sync(vm).await?;
    let paused = Instant::now();
    pathswitch::return_step("db", &vm.qmp, QMP_TIMEOUT, 0, &pathswitch::ReturnStep::Pause, &Value::Null).await?;
    assert_eq!(fuse.unsynced(), 0, "writes the way back copied are not flushed when the local copy may be committed current");
    pathswitch::return_step("db", &vm.qmp, QMP_TIMEOUT, 0, &pathswitch::ReturnStep::Finish, &Value::Null).await?;
    let copied_back = fuse.written() - written_before;
    eprintln!(
        "back on the local copy: the guest paused {:?} for the switch back; {} KiB copied back of a {} MiB disk",
        paused.elapsed(),
        copied_back >> 10,
        DISK_BYTES >> 20
    );
    // Only what the guest wrote since the switch (and its writes meanwhile), not the disk.
    assert!(copied_back < DISK_BYTES / 4, "the way back copied {copied_back} bytes of {DISK_BYTES}");
    let back = seq.highest();
    seq.wait_past(back + 20, Duration::from_secs(30)).map_err(|e| anyhow!("the guest did not write on on its local copy: {e}"))?;
    wait_for("the mirror into the other copy", &vm.qmp, Duration::from_secs(30), |s| *s == MirrorSample::InSync).await?;
    assert!(highest_record(backing)?.unwrap_or(0) > back, "the local copy does not get the writes again");
    assert_acknowledged_on(remote, seq)?;
    vm.qmp.execute("stop", json!({}), QMP_TIMEOUT).await?;
    assert!(std::fs::read(backing)? == std::fs::read(remote)?, "the copies differ after the way back");
    let verdict = tandem_lab::diskguest::judge(&seq.samples());
    assert!(verdict.lost.is_empty() && verdict.regressions == 0 && verdict.boots == 1, "{verdict:?}");
    Ok(())
}

#[test]
fn a_local_copy_whose_storage_fails_switches_to_the_other_copy_without_a_restart() -> Result<()> {
    let Some(guest) = test_guest() else { return Ok(()) };
    let dir = ScratchDir::new("tandem-site-path", &[])?;
    run(&dir, local_path_loss_scenario(dir.path(), &guest))
}

/// QEMU's own NBD client (a bare QEMU's block layer): opens the export at `server` (a relay's
/// unix socket, or an address) as node `node` and writes `pattern` at `offset`. Whether the
/// write went through.
async fn nbd_write(q: &Qmp, node: &str, server: Value, export: &str, pattern: u8, offset: u64) -> Result<bool> {
    let add = json!({"driver": "raw", "node-name": node, "file": {"driver": "nbd", "server": server, "export": export}});
    // Longer than a gate gives a peer that says nothing (a plain NBD client before a gate on
    // TLS waits for the server's greeting, the gate for TLS): refused by the gate, not by us.
    let within = tandem_drivers::copychannel::GATE_HANDSHAKE_TIMEOUT + Duration::from_secs(3);
    if let Err(e) = q.execute("blockdev-add", add, within).await {
        eprintln!("{node}: not opened: {e}");
        return Ok(false);
    }
    // qemu-io through the monitor says nothing when a write succeeds (the bytes are checked in
    // the image afterwards), and why when it fails.
    let line = format!("qemu-io {node} \"write -P {pattern} {offset} 4k\"");
    let answer = q.execute("human-monitor-command", json!({"command-line": line}), QMP_TIMEOUT).await?;
    let said = answer.as_str().unwrap_or_default().to_lowercase();
    Ok(!said.contains("error") && !said.contains("fail"))
}

/// The first byte of each 4 KiB block at `offsets` of `image`.
fn bytes_at(image: &Path, offsets: &[u64]) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image)?;
    let mut out = Vec::new();
    for o in offsets {
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(*o))?;
        f.read_exact(&mut b)?;
        out.push(b[0]);
    }
    Ok(out)
}

async fn channel_scenario(dir: &Path) -> Result<()> {
    use std::sync::Arc;
    use tandem_drivers::copychannel::CopyCredentials;
    let (ca, other_ca) = (dir.join("ca"), dir.join("other-ca"));
    tandem_lab::testca::make_ca(&ca, "tandem copy test CA", &[COPY_IP.to_string()])?;
    tandem_lab::testca::make_ca(&other_ca, "another CA", &[COPY_IP.to_string()])?;
    let key = |secret: &[u8]| tandem_core::wire::ClusterKey::new(secret).map_err(|e| anyhow!("{e}"));
    let over_tls = |ca: &Path, secret: &[u8]| -> Result<Arc<CopyCredentials>> {
        let connector = tandem_agent::tls::ClientTls::load(&ca.join("ca.pem"))?.connector();
        let acceptor = tandem_agent::tls::ServerTls::load(&ca.join("agent.pem"), &ca.join("agent.key"))?.acceptor();
        Ok(Arc::new(CopyCredentials::with_tls(key(secret)?, connector, acceptor)))
    };
    let ours: &[u8] = b"the cluster's secret, 16+ bytes";
    let remote = dir.join("site-b.img");
    std::fs::File::create(&remote)?.set_len(DISK_BYTES)?;
    let launcher = Launcher::new()?;
    let port = COPY_PORT + 10;
    let cfg = CopyServerConfig { credentials: over_tls(&ca, ours)?, ..copy_config_on(dir, port) };
    let server = CopyServer::start(&cfg, &launcher).await?;
    let export = export_name("db", 0);
    server.serve(&export, &remote).await?;
    let gate = format!("{COPY_IP}:{port}");
    let qmp_path = dir.join("client.qmp");
    let mut cmd = std::process::Command::new("qemu-system-x86_64");
    cmd.args(["-M", "none", "-nodefaults", "-no-user-config", "-display", "none", "-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())]);
    let client = Guest::spawn(cmd, &qmp_path, QMP_TIMEOUT).await?;
    let q = &client.qmp;
    let via = |relay: &CopyRelay| json!({"type": "unix", "path": relay.socket().display().to_string()});
    // A relay of the cluster, over TLS: QEMU's write lands in the served copy.
    let relay = CopyRelay::start(&dir.join("ok.sock"), &gate, STALL, over_tls(&ca, ours)?)?;
    assert!(nbd_write(q, "ok", via(&relay), &export, 0x5a, 0).await?, "a relay of the cluster could not write through the channel");
    q.execute("blockdev-del", json!({"node-name": "ok"}), QMP_TIMEOUT).await?;
    // Trusting another CA (the gate is not who it should be), another cluster's key over the
    // right TLS, no TLS at all: refused, nothing written.
    let wrong_ca = CopyRelay::start(&dir.join("ca.sock"), &gate, STALL, over_tls(&other_ca, ours)?)?;
    assert!(!nbd_write(q, "ca", via(&wrong_ca), &export, 0x11, 4096).await?, "a relay trusting another CA wrote");
    let wrong_key = CopyRelay::start(&dir.join("key.sock"), &gate, STALL, over_tls(&ca, b"another cluster's secret .....")?)?;
    assert!(!nbd_write(q, "key", via(&wrong_key), &export, 0x22, 8192).await?, "a relay with another cluster's key wrote");
    let plain = CopyRelay::start(&dir.join("plain.sock"), &gate, STALL, Arc::new(CopyCredentials::plain(key(ours)?)))?;
    assert!(!nbd_write(q, "plain", via(&plain), &export, 0x33, 12288).await?, "a relay without TLS wrote to a gate on TLS");
    // Anyone on the storage network with a plain NBD client: nothing.
    let direct = json!({"type": "inet", "host": COPY_IP, "port": port.to_string()});
    assert!(!nbd_write(q, "direct", direct, &export, 0x44, 16384).await?, "a plain NBD client wrote the copy");
    assert_eq!(bytes_at(&remote, &[0, 4096, 8192, 12288, 16384])?, vec![0x5a, 0, 0, 0, 0], "only the cluster's relay wrote");
    server.withdraw(&export).await?;
    Ok(())
}

/// The copy channel end to end, with QEMU's own NBD client, `qemu-storage-daemon` and TLS:
/// through the relay, TLS and the gate's handshake, a write lands in the served copy; a relay
/// trusting another CA, one with another cluster's key, one without TLS, and a plain NBD client
/// (anyone who reaches the storage network) write nothing.
#[test]
fn the_copy_channel_carries_a_mirror_over_tls_only_for_the_cluster() -> Result<()> {
    if !tandem_lab::testca::openssl_available() {
        return Ok(());
    }
    let dir = ScratchDir::new("tandem-copy-channel", &[])?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(channel_scenario(dir.path()))
}

/// The ground under storage that hangs being switched away from without a restart (not yet
/// what the agent does: it restarts such a VM where its other copy is). The local copy behind
/// an NBD node served by a process of its own; that process stops answering (SIGSTOP: its
/// requests unanswered, as behind a hung storage path); the guest's writes wait. QEMU's NBD
/// client, yanked, fails what it had in flight: the guest pauses on the error (it sees none),
/// and the disk switches to the other copy as after any failed request — every acknowledged
/// write is there.
async fn yanked_local_server_scenario(dir: &Path, guest: &Path) -> Result<()> {
    let (local, remote) = (dir.join("site-a.img"), dir.join("site-b.img"));
    for image in [&local, &remote] {
        std::fs::File::create(image).and_then(|f| f.set_len(DISK_BYTES))?;
    }
    let launcher = Launcher::new()?;
    let socket = dir.join("local.nbd");
    let local_server = LocalServer(
        std::process::Command::new("qemu-storage-daemon")
            .args(["--blockdev", &format!("driver=file,node-name=local,filename={},cache.direct=on", local.display())])
            .args(["--nbd-server", &format!("addr.type=unix,addr.path={}", socket.display())])
            .args(["--export", "type=nbd,id=local,node-name=local,name=local,writable=on,writethrough=on"])
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        anyhow::ensure!(Instant::now() < deadline, "the local copy's server never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let export = export_name("db", 0);
    let server = CopyServer::start(&copy_config_on(dir, COPY_PORT + 4), &launcher).await?;
    server.serve(&export, &remote).await?;
    let relay = CopyRelay::start(&dir.join("relay.sock"), &format!("{COPY_IP}:{}", COPY_PORT + 4), STALL, creds())?;
    let addr = "127.103.0.6:8080";
    let vm = launch(dir, guest, Path::new(&format!("nbd+unix:///local?socket={}", socket.display())), addr).await?;
    let seq = SeqWatch::start(addr);
    seq.wait_past(0, Duration::from_secs(60)).map_err(|e| anyhow!("the guest's writer never answered: {e}"))?;
    let copy = RemoteCopy { disk: 0, relay: relay.socket().to_path_buf(), export, granularity: None, speed: None };
    syncmirror::attach("db", &vm.qmp, QMP_TIMEOUT, &copy).await?;
    wait_for("the first full copy", &vm.qmp, Duration::from_secs(60), |s| *s == MirrorSample::InSync).await?;
    let before = seq.highest();
    seq.wait_past(before + 10, Duration::from_secs(30)).map_err(|e| anyhow!("the guest did not write: {e}"))?;

    signal(local_server.0.id(), libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stuck = seq.highest();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(seq.highest(), stuck, "the guest wrote on while its storage answered nothing");
    let nodes = vm.qmp.execute("query-named-block-nodes", json!({}), QMP_TIMEOUT).await?;
    let nbd = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n.get("drv").and_then(Value::as_str) == Some("nbd") && n.get("file").and_then(Value::as_str).is_some_and(|f| f.contains("local.nbd")))
        .and_then(|n| n.get("node-name").and_then(Value::as_str).map(str::to_string))
        .ok_or_else(|| anyhow!("no NBD node on the local copy: {nodes}"))?;
    let yanked = Instant::now();
    vm.qmp.execute("yank", json!({"instances": [{"type": "block-node", "node-name": nbd}]}), QMP_TIMEOUT).await?;
    paused_on_failed_disk(&vm, Duration::from_secs(5)).await?;
    let paused_after = yanked.elapsed();
    pathswitch::switch_to_copy("db", &vm.qmp, QMP_TIMEOUT, 0).await?;
    pathswitch::resume("db", &vm.qmp, QMP_TIMEOUT).await?;
    let switched = yanked.elapsed();
    seq.wait_past(stuck + 20, Duration::from_secs(30)).map_err(|e| anyhow!("the guest did not write on on the other copy: {e}"))?;
    eprintln!("local copy's server hung, yanked: the guest paused {paused_after:?} and ran on the other copy {switched:?} after the yank");
    let verdict = tandem_lab::diskguest::judge(&seq.samples());
    assert!(verdict.lost.is_empty() && verdict.regressions == 0 && verdict.boots == 1, "{verdict:?}");
    assert_acknowledged_on(&remote, &seq)
}

/// The local copy's own server: woken and ended however the test ends.
struct LocalServer(std::process::Child);

impl Drop for LocalServer {
    fn drop(&mut self) {
        signal(self.0.id(), libc::SIGCONT);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_local_copy_whose_server_hangs_can_be_yanked_and_switched_away_from_without_a_restart() -> Result<()> {
    let Some(guest) = test_guest() else { return Ok(()) };
    let dir = ScratchDir::new("tandem-site-yank", &[])?;
    run(&dir, yanked_local_server_scenario(dir.path(), &guest))
}
