//! The real fault suite, run as operators run it: `tandem-lab chaos` against the `tandem` binary
//! built beside it.

use anyhow::Result;
use serde_json::Value;

/// The short fault-injection profile, real QEMU guests mixed with process workloads: every fault kind once (partitions full, one-way and
/// pairwise, random heartbeat loss, power loss, leader loss, kill -9 of an agent and of a workload,
/// a frozen host — past its fence deadline, and past self_fence_ms only —, a failing and a hanging (FUSE) heartbeat disk, a live migration faulted mid-copy, a maintenance cycle, a planned stop) against real agents in namespaces; no invariant may
/// break. `TANDEM_CHAOS_SEED` picks another seed.
#[test]
fn chaos_short_profile_breaks_no_invariant() -> Result<()> {
    if !tandem_lab::netlab::can_use_namespaces() {
        return Ok(());
    }
    let seed = std::env::var("TANDEM_CHAOS_SEED").unwrap_or_else(|_| "7".into());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-lab")).args(["chaos", "--profile", "short", "--seed", &seed, "--hosts", "3"]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_str(stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or("{}"))?;
    assert_eq!(summary["violations"], serde_json::json!([]), "violations with seed {seed}");
    assert_eq!(summary["faults_total"], 15, "every fault kind injected once");
    assert!(summary["vm_recoveries"].as_u64() >= Some(4), "faults moved or restarted VMs");
    assert!(out.status.success(), "tandem-lab chaos failed with seed {seed}");
    Ok(())
}

/// Two hosts in sites a and b with no shared storage and a network witness in a third
/// namespace: every fault kind of that profile once — a site's power loss, the link between the
/// sites cut both ways and one way, the witness's loss (which must change nothing and be
/// shown), partitions, power and leader loss, kills, freezes, a live migration, a maintenance
/// cycle, a planned stop; no invariant may break. `TANDEM_CHAOS_SEED` picks another seed.
#[test]
fn chaos_two_sites_with_a_network_witness_breaks_no_invariant() -> Result<()> {
    if !tandem_lab::netlab::can_use_namespaces() {
        return Ok(());
    }
    let seed = std::env::var("TANDEM_CHAOS_SEED").unwrap_or_else(|_| "3".into());
    let args = ["chaos", "--profile", "short", "--seed", &seed, "--hosts", "2", "--sites", "a,b", "--witness", "network", "--vms-per-host", "2"];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-lab")).args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_str(stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or("{}"))?;
    assert_eq!(summary["violations"], serde_json::json!([]), "violations with seed {seed}");
    assert_eq!(summary["faults_total"], 17, "every fault kind of the profile injected once");
    for kind in ["site-power-loss", "site-link-cut", "site-link-one-way", "witness-loss"] {
        assert_eq!(summary["faults"][kind], 1, "{kind} injected");
    }
    assert!(summary["vm_recoveries"].as_u64() >= Some(4), "faults moved or restarted VMs");
    assert!(out.status.success(), "tandem-lab chaos failed with seed {seed}");
    Ok(())
}
