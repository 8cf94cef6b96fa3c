//! Live migration with real agents: process workloads (a stop and a start) and real QEMU
//! guests (memory and device state over QMP), each moved around a 3-host cluster. Every host's
//! `/v1/local` is sampled throughout: the VM never runs (unpaused) on two hosts at once, every
//! migration completes, and the service answers at its new home afterwards.

use anyhow::Result;
use tandem_lab::bench::migration::{test_guest, MigrationLab};

fn moves_around(driver: &str, guest: &std::path::Path, net: u8) -> Result<()> {
    let ml = MigrationLab::start(driver, 128, guest, net)?;
    let mut seen = vec![];
    for _ in 0..3 {
        let f = ml.migrate_once()?;
        eprintln!("{f:?}");
        assert!(f.completed, "{driver}: the migration {} -> {} did not complete", f.from, f.to);
        assert_eq!(f.two_running, 0, "{driver}: the VM ran on two hosts at once");
        assert_eq!(ml.host_of()?, f.to, "{driver}: committed state has the VM at its destination");
        if driver == "qemu" {
            assert!(f.downtime_ms.is_some(), "QEMU reports the downtime of a completed migration");
            let corrupted = ml.guest_fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some();
            assert!(corrupted || f.http_gap_ms.is_some_and(|g| g < 10_000), "the service came back: {f:?}");
        }
        seen.push(f.to.clone());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "the VM visited every host");
    let events = ml.lab.events();
    let completed = events.iter().filter(|e| e.kind == tandem_agent::views::EventKind::MigrationCompleted).count();
    assert_eq!(completed, 3, "each migration is on the source's timeline");
    Ok(())
}

#[test]
fn process_workloads_move_by_a_stop_and_a_start_after_the_switchover() -> Result<()> {
    moves_around("process", std::path::Path::new("/nonexistent"), 68)
}

#[test]
fn qemu_guests_move_live_and_answer_at_their_new_home() -> Result<()> {
    let Some(g) = test_guest() else { return Ok(()) };
    moves_around("qemu", &g, 69)
}

/// With `[migration] multifd_channels = 2` on every host, a guest's memory goes over QEMU's
/// parallel channels (the destination listens with as many as the source's request says; QEMU
/// reports the bytes sent over them), and the guest answers at its new home.
#[test]
fn qemu_guests_move_over_parallel_channels_when_configured() -> Result<()> {
    let Some(g) = test_guest() else { return Ok(()) };
    let ml = MigrationLab::start_with("qemu", 128, &g, 84, "[migration]\nmultifd_channels = 2\n")?;
    for _ in 0..2 {
        let f = ml.migrate_once()?;
        eprintln!("{f:?}");
        assert!(f.completed, "the migration {} -> {} did not complete", f.from, f.to);
        assert_eq!(f.two_running, 0, "the VM ran on two hosts at once");
        assert_eq!(ml.host_of()?, f.to, "committed state has the VM at its destination");
        assert!(f.multifd_bytes.is_some_and(|b| b > 0), "QEMU sent the memory over its parallel channels: {f:?}");
        let corrupted = ml.guest_fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some();
        assert!(corrupted || f.http_gap_ms.is_some_and(|g| g < 10_000), "the service came back: {f:?}");
    }
    Ok(())
}

/// A destination's copy is started with its vCPUs held (`-S -incoming defer`), so its host
/// lists it paused from its very first listing: a listing in between (seen in CI: the source
/// running, the destination's copy listed as running for a moment) would report two running
/// copies that never were, and every check of "never two unpaused copies" would count it.
/// `list()` is polled without pause on another thread while the copy is prepared, again and
/// again.
#[test]
fn a_destinations_copy_is_listed_paused_from_its_start() -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use tandem_drivers::launcher::Launcher;
    use tandem_drivers::qemu::{QemuConfig, QemuDriver};
    use tandem_drivers::{always_start, VmDriver, VmLaunch};
    let Some(guest) = test_guest() else { return Ok(()) };
    let dir = tandem_lab::scratch::ScratchDir::new("tandem-incoming-paused", &[])?;
    let cfg = QemuConfig { accel: "tcg".into(), stop_timeout_s: 3, local_disk_dir: dir.path().join("local").display().to_string(), ..QemuConfig::default() };
    let driver = Arc::new(QemuDriver::new(cfg, Launcher::new()?, "h0", "127.118.0.2", dir.path().join("run")));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let spec = tandem_lab::demo::demo_vm(0, "qemu", &guest);
    let (stop, listings, running) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let poller = {
        let (driver, stop, listings, running) = (Arc::clone(&driver), Arc::clone(&stop), Arc::clone(&listings), Arc::clone(&running));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let copies = driver.list();
                if copies.iter().any(|v| v.exit.is_none() && !v.paused) {
                    running.fetch_add(1, Ordering::SeqCst);
                }
                if !copies.is_empty() {
                    listings.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let prepared = rt.block_on(async {
        for generation in 1..=5 {
            let launch = VmLaunch { spec: spec.clone(), generation, check: always_start() };
            driver.prepare_incoming(&launch, &[], 0).await?;
            driver.kill(&spec.name)?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while driver.list().iter().any(|v| v.exit.is_none()) {
                anyhow::ensure!(std::time::Instant::now() < deadline, "the killed copy did not exit within 10 s");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            driver.forget(&spec.name);
        }
        anyhow::Ok(())
    });
    stop.store(true, Ordering::SeqCst);
    let _ = poller.join();
    prepared?;
    assert!(listings.load(Ordering::SeqCst) > 0, "the poller saw the copies");
    assert_eq!(running.load(Ordering::SeqCst), 0, "listings showed a destination's held copy as running");
    Ok(())
}
