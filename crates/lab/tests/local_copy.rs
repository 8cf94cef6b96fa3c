//! A mirrored disk's own site copy behind its local copy server (`tandem_drivers::localcopy`),
//! with the real QEMU driver and the disk-backed test guest: a live migration within the site
//! serves the copy from both ends at once (a shared claim), then from the destination alone;
//! while any server of the copy lives, a fresh start on it and this site's copy server are
//! refused (their claims are held), and the copy is free again once the VM is gone.

use anyhow::{anyhow, Result};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::mirroring::LocalReach;
use tandem_core::state::DiskSpec;
use tandem_drivers::launcher::Launcher;
use tandem_drivers::localcopy::{claim, ClaimKind, LocalCopyError};
use tandem_drivers::qemu::{QemuConfig, QemuDriver};
use tandem_drivers::{always_start, VmDriver, VmLaunch};
use tandem_lab::bench::migration::test_guest;
use tandem_lab::diskguest::{highest_record, SeqWatch};
use tandem_lab::scratch::ScratchDir;

/// The two hosts of site a, on loopback net 117 (each forwards the guest's HTTP port).
const HOST_IPS: [&str; 2] = ["127.117.0.2", "127.117.0.3"];
const DISK_BYTES: u64 = 64 << 20;

fn driver(dir: &Path, i: usize) -> Result<QemuDriver> {
    let cfg = QemuConfig {
        accel: "tcg".into(),
        stop_timeout_s: 3,
        site_disk_dir: dir.join("site-a").display().to_string(),
        local_disk_dir: dir.join(format!("local-h{i}")).display().to_string(),
        ..QemuConfig::default()
    };
    let creds = Arc::new(tandem_drivers::copychannel::CopyCredentials::plain(tandem_core::wire::ClusterKey::new(b"the site test's cluster secret")?));
    // One launcher each: a launcher knows a VM by its name, and both hosts run "db" at once.
    Ok(QemuDriver::new(cfg, Launcher::new()?, &format!("h{i}"), HOST_IPS[i], dir.join(format!("run-h{i}"))).with_copy_server(
        10_960 + i as u16,
        "qemu-storage-daemon",
        creds,
    ))
}

/// Waits for the VM's process on `d` to have exited.
async fn exited(d: &QemuDriver, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.list().iter().any(|v| v.name == "db" && v.exit.is_none()) {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn is_held(image: &Path, kind: ClaimKind) -> bool {
    matches!(claim(image, kind).await, Err(LocalCopyError::Held { .. }))
}

async fn scenario(dir: &Path, guest: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("site-a"))?;
    let image = dir.join("site-a/db.raw");
    std::fs::File::create(&image)?.set_len(DISK_BYTES)?;
    let (h0, h1) = (driver(dir, 0)?, driver(dir, 1)?);
    let mut spec = tandem_lab::demo::demo_vm(0, "qemu", guest);
    spec.name = "db".into();
    spec.probe = None;
    spec.disks = vec![DiskSpec { path: "db.raw".into(), format: Some("raw".into()), readonly: false, local: false, mirror: true }];
    let launch = VmLaunch { spec, generation: 1, check: always_start() };
    h0.start(&launch).await?;
    assert_eq!(h0.local_reach("db", 0), LocalReach::Served, "the copy is not behind a local copy server");
    let seq = SeqWatch::start(&format!("{}:8080", HOST_IPS[0]));
    seq.wait_past(0, Duration::from_secs(60)).map_err(|e| anyhow!("the guest's writer never answered: {e}"))?;
    assert!(is_held(&image, ClaimKind::Sole).await, "a second start on the copy while the VM runs on it");

    // Live, within the site: the destination's server shares the copy with the source's.
    let incoming = h1.prepare_incoming(&VmLaunch { generation: 2, ..launch.clone() }, &[], 0).await?;
    assert_eq!(h1.local_reach("db", 0), LocalReach::Served);
    let target = tandem_drivers::migration::MigrationTarget {
        uri: incoming.uri,
        nbd: None,
        disks: Vec::new(),
        max_bandwidth: 0,
        multifd_channels: 0,
        postcopy: tandem_core::spec::Postcopy::Off,
        postcopy_bandwidth: 0,
        stall_ms: 10_000,
        overall_ms: 120_000,
        cancel: Arc::new(AtomicBool::new(false)),
        progress: Arc::new(|_| {}),
        now: Arc::new(|| tandem_core::time::Millis(0)),
    };
    let before = seq.highest();
    h0.migrate_out("db", &target).await?;
    h1.resume("db", &always_start()).await?;
    // The source goes (as the reconciler kills it once the switchover is committed).
    h0.kill("db")?;
    exited(&h0, "the source").await?;
    h0.forget("db");
    drop(seq);
    let seq = SeqWatch::start(&format!("{}:8080", HOST_IPS[1]));
    let after = seq.wait_past(before, Duration::from_secs(60)).map_err(|e| anyhow!("the guest did not write on at the destination: {e}"))?;
    eprintln!("moved live within the site: writing on at h1 ({} → {})", before, after.last);
    assert!(is_held(&image, ClaimKind::Sole).await, "the destination's server alone holds the copy");
    let on_disk = highest_record(&image)?.unwrap_or(0);
    seq.wait_past(on_disk + 5, Duration::from_secs(30)).map_err(|e| anyhow!("writes stopped: {e}"))?;
    let later = highest_record(&image)?.unwrap_or(0);
    assert!(later > on_disk, "the guest's writes do not reach the copy through the destination's server ({later} <= {on_disk})");
    let verdict = tandem_lab::diskguest::judge(&seq.samples());
    assert!(verdict.lost.is_empty() && verdict.regressions == 0, "{verdict:?}");

    // The VM gone, the copy is free again (its server reaped).
    h1.kill("db")?;
    exited(&h1, "the destination").await?;
    h1.forget("db");
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_held(&image, ClaimKind::Sole).await {
        anyhow::ensure!(Instant::now() < deadline, "the copy is still claimed after its VM went");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[test]
fn a_mirrored_disk_moves_live_within_its_site_served_from_both_ends_and_is_claimed_by_one_vm_at_a_time() -> Result<()> {
    let Some(guest) = test_guest() else { return Ok(()) };
    let dir = ScratchDir::new("tandem-local-copy", &[])?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(scenario(dir.path(), &guest))
}
