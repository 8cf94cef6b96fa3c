//! The demo as operators run it: `tandem-lab demo` with real QEMU guests, driving the `tandem`
//! binary built beside it.

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
    let last = stdout.lines().last().ok_or_else(|| anyhow!("no output"))?;
    let summary: Value = serde_json::from_str(last)?;
    eprintln!("{summary}");
    assert_eq!(summary["driver"], "qemu");
    assert!(summary["vms"].as_u64() >= Some(1));
    assert_eq!(summary["recovered"], summary["vms"]);
    assert_eq!(summary["double_runs"], 0);
    assert!(summary["restart_issued_s"].as_f64().is_some());
    Ok(())
}
