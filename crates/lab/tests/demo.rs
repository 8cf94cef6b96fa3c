//! The demo as operators run it: `tandem-lab demo` with real QEMU guests, driving the `tandem`
//! binary built beside it — the power loss, then the maintenance act.

use anyhow::{anyhow, Result};
use serde_json::Value;
use std::process::Command;

#[test]
fn qemu_guests_answer_again_after_host_power_loss() -> Result<()> {
    // CI installs both (scripts/setup.sh); only a developer machine without them may skip.
    let Some(guest) = tandem_lab::bench::migration::test_guest() else { return Ok(()) };
    let out = Command::new(env!("CARGO_BIN_EXE_tandem-lab")).args(["demo", "--driver", "qemu", "--vms", "3", "--guest-dir"]).arg(&guest).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summaries: Vec<Value> = stdout.lines().filter(|l| l.starts_with("{\"scenario\"")).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let [summary, maintenance] = summaries.as_slice() else { return Err(anyhow!("two summary lines expected: {stdout}")) };
    eprintln!("{summary}\n{maintenance}");
    assert_eq!(summary["scenario"], "host-power-loss");
    assert_eq!(summary["driver"], "qemu");
    assert!(summary["vms"].as_u64() >= Some(1));
    assert_eq!(summary["recovered"], summary["vms"]);
    assert_eq!(summary["double_runs"], 0);
    assert!(summary["restart_issued_s"].as_f64().is_some());
    // The second act: a host emptied live and filled again, every moved guest answering
    // throughout but for a bounded gap (TCG on a busy 2-core machine: seconds, not minutes).
    assert_eq!(maintenance["scenario"], "maintenance");
    assert!(maintenance["vms"].as_u64() >= Some(1), "{maintenance}");
    assert_eq!(maintenance["double_runs"], 0);
    assert!(maintenance["longest_gap_ms"].as_u64().is_some_and(|g| g < 20_000), "{maintenance}");
    assert!(maintenance["qemu_downtime_ms"].as_u64().is_some(), "QEMU reports the migrations' downtime: {maintenance}");
    Ok(())
}

/// `tandem-lab demo --scenario site-loss`: the guests' disks mirrored between two sites, site a's
/// power cut, every guest writing again at site b with every write it acknowledged; site a back,
/// its copies current again by chunk sums.
#[test]
fn site_loss_scenario_restarts_the_guests_at_the_other_site_with_their_writes() -> Result<()> {
    let Some(guest) = tandem_lab::bench::migration::test_guest() else { return Ok(()) };
    let out = Command::new(env!("CARGO_BIN_EXE_tandem-lab")).args(["demo", "--scenario", "site-loss", "--vms", "2", "--guest-dir"]).arg(&guest).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = stdout.lines().find(|l| l.starts_with("{\"scenario\"")).map(serde_json::from_str).ok_or_else(|| anyhow!("no summary: {stdout}"))??;
    eprintln!("{summary}");
    assert_eq!(summary["scenario"], "site-loss");
    assert_eq!(summary["recovered"], 2);
    assert_eq!(summary["writes_lost"], 0);
    assert_eq!(summary["double_runs"], 0);
    assert!(stdout.contains("writes again at site b"), "{stdout}");
    // Site a back: its stale copies brought up to date by chunk sums, far less than the disks.
    assert!(summary["both_copies_current_again_s"].as_f64().is_some(), "{summary}");
    assert!(stdout.contains("compared with its chunk sums"), "{stdout}");
    assert!(summary["resync_crossed_kib"].as_u64().is_some_and(|k| k < 2 * 64 * 1024 / 4), "{summary}");
    Ok(())
}
