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
