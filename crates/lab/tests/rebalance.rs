//! Rebalancing with real agents and the operator's CLI: VMs crowded on one host are spread by
//! `rule add --enforce` (the rule's violations only) and `rebalance` (memory use), each move a
//! live migration; the plan is shown first, a non-interactive run without `--yes` changes
//! nothing, and an even cluster has nothing to move.

use anyhow::Result;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use tandem_agent::views::{ForceRequest, HostModeRequest};
use tandem_core::state::HostMode;
use tandem_lab::demo::wait;
use tandem_lab::lab::{process_vm, Lab, LabOptions};

fn per_host(p: &BTreeMap<String, Option<String>>) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for h in p.values().flatten() {
        *n.entry(h.clone()).or_default() += 1;
    }
    n
}

#[test]
fn crowded_vms_are_spread_by_an_enforced_rule_then_by_rebalance() -> Result<()> {
    let bin = tandem_lab::lab::tandem_binary()?;
    let mut lab = Lab::new(LabOptions { loopback_net: 79, api_port: 7950, capacity: (8, 2048), ..LabOptions::default() }, &bin)?;
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(0);
    // h1 and h2 in maintenance while the VMs start: all of them land on h0.
    for h in ["h1", "h2"] {
        c.send("POST", &format!("/v1/hosts/{h}/mode"), &HostModeRequest { mode: HostMode::Maintenance, force: true })?;
    }
    for i in 0..4 {
        c.send("POST", "/v1/vms", &process_vm(&format!("a{i}"), 256, i))?;
        c.send("POST", &format!("/v1/vms/a{i}/start"), &ForceRequest::default())?;
    }
    wait("all four running on h0", Duration::from_secs(30), || {
        let p = lab.placement(0).ok()?;
        (p.values().filter(|h| h.as_deref() == Some("h0")).count() == 4 && lab.running().len() == 4).then_some(())
    })?;
    for h in ["h1", "h2"] {
        c.send("POST", &format!("/v1/hosts/{h}/mode"), &HostModeRequest { mode: HostMode::Normal, force: false })?;
    }
    let cli =
        |args: &[&str]| Command::new(&bin).args(["--api", &lab.hosts[0].api, "--token", &lab.token()]).args(args).stdin(std::process::Stdio::null()).output();
    let said = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);

    // A rule enforced at once: only its members move, one to another host.
    let out = cli(&["rule", "add", "apart", "--kind", "anti-affinity", "a0", "a1", "--enforce"])?;
    let text = said(&out);
    eprintln!("{text}");
    assert!(out.status.success() && text.contains("rule apart") && text.contains("1 of 1 moves completed"), "{text}");
    let p = lab.placement(0)?;
    assert_ne!(p["a0"], p["a1"], "the rule holds");
    assert_eq!(p["a1"].as_deref(), Some("h0"), "the member of higher priority (a1) kept its place");
    assert_eq!(per_host(&p)["h0"], 3);

    // Memory: the plan first; without a terminal and without --yes nothing moves.
    let out = cli(&["rebalance", "--dry-run"])?;
    let text = said(&out);
    assert!(out.status.success() && text.contains("even out memory") && text.contains("memory use spread"), "{text}");
    let out = cli(&["rebalance"])?;
    assert_eq!(out.status.code(), Some(2), "{}", said(&out));
    assert_eq!(lab.placement(0)?, p, "nothing moved");
    let out = cli(&["rebalance", "--yes"])?;
    let text = said(&out);
    eprintln!("{text}");
    assert!(out.status.success() && text.contains("moves completed"), "{text}");
    let after = per_host(&lab.placement(0)?);
    assert!(after.len() == 3 && after.values().all(|n| (1..=2).contains(n)), "{after:?}");
    let p = lab.placement(0)?;
    assert_ne!(p["a0"], p["a1"], "balancing kept the rule");
    let out = cli(&["rebalance", "--yes"])?;
    assert!(out.status.success() && said(&out).contains("nothing to move"), "{}", said(&out));
    wait("every VM running where it is placed", Duration::from_secs(30), || {
        let running = lab.running();
        let p = lab.placement(0).ok()?;
        p.iter().all(|(vm, h)| running.get(vm) == h.as_ref()).then_some(())
    })?;
    lab.assert_no_double_run()?;
    Ok(())
}
