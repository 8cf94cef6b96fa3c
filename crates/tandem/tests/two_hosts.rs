//! Two hosts, a shared heartbeat disk and a disk witness beside it, and no third machine: the
//! witness is the third Raft vote, held by one host at a time from the shared storage. The
//! power loss of either host restarts its protected VMs on the other; a cut of the link between
//! them keeps exactly one side (the lower host id) and moves the other's VMs — never two copies.

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tandem_agent::views::FttView;
use tandem_lab::demo::wait;
use tandem_lab::lab::{Lab, LabOptions};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

fn process_vm(name: &str) -> Value {
    json!({ "name": name, "vcpus": 1, "memory_mib": 256, "protection": "protect",
            "driver": { "kind": "process", "command": ["sleep", "1000000"] } })
}

/// Forms the two-host cluster, waits until the witness votes (FTT 1), and runs one of `p0` and
/// `p1` on each host.
fn two_hosts_with_witness(lab: &mut Lab) -> Result<()> {
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(0);
    let ftt: FttView = wait("the disk witness to vote (FTT 1)", Duration::from_secs(60), || {
        let f: FttView = c.get_as("/v1/ftt").ok()?;
        (f.report.ftt == 1).then_some(f)
    })?;
    assert!(ftt.report.exact, "{ftt:?}");
    eprintln!("FTT with the witness: {:?}", ftt.report);
    // One on each host: a soft anti-affinity rule spreads them, and lets them share a host
    // once only one is left.
    for vm in ["p0", "p1"] {
        c.post("/v1/vms", &process_vm(vm)).map_err(|e| anyhow!("{e}"))?;
    }
    c.post("/v1/rules", &json!({ "name": "apart", "kind": "anti-affinity", "hard": false, "vms": ["p0", "p1"] })).map_err(|e| anyhow!("{e}"))?;
    for vm in ["p0", "p1"] {
        c.post(&format!("/v1/vms/{vm}/start"), &json!({})).map_err(|e| anyhow!("{e}"))?;
    }
    wait("p0 and p1 running", Duration::from_secs(30), || (lab.running().len() == 2).then_some(()))?;
    let running = lab.running();
    let mut hosts: Vec<&String> = running.values().collect();
    hosts.sort();
    assert_eq!(hosts, ["h0", "h1"], "one VM on each host: {running:?}");
    Ok(())
}

/// Powers host `lost` off and waits until both VMs run on the other; returns the seconds.
fn lose_host(lab: &mut Lab, lost: usize) -> Result<f64> {
    let survivor = format!("h{}", 1 - lost);
    let at = Instant::now();
    lab.power_off(lost);
    wait(&format!("both VMs on {survivor}"), Duration::from_secs(60), || {
        let running = lab.running();
        ["p0", "p1"].iter().all(|vm| running.get(*vm) == Some(&survivor)).then_some(())
    })?;
    Ok(at.elapsed().as_secs_f64())
}

#[test]
fn either_host_of_two_survives_the_others_power_loss() -> Result<()> {
    let opts = LabOptions { hosts: 2, loopback_net: 87, capacity: (4, 2048), disk_witness: true, ..LabOptions::default() };
    let mut lab = Lab::new(opts, &binary())?;
    two_hosts_with_witness(&mut lab)?;
    let secs = lose_host(&mut lab, 1)?;
    eprintln!("h1 lost power: its VM ran again on h0 {secs:.2} s later");
    lab.assert_no_double_run()?;
    // h1 returns, joins again, and runs nothing that moved.
    lab.start(1)?;
    lab.wait_all_active(Duration::from_secs(60))?;
    wait("FTT 1 again", Duration::from_secs(60), || lab.client(1).get_as::<FttView>("/v1/ftt").ok().filter(|f| f.report.ftt == 1))?;
    assert!(lab.running().values().all(|h| h == "h0"), "{:?}", lab.running());
    // Now the other one: h0 — which held the witness and led — loses power.
    let secs = lose_host(&mut lab, 0)?;
    eprintln!("h0 lost power: both VMs ran again on h1 {secs:.2} s later");
    let events = lab.client(1).list("/v1/events?limit=4096").map_err(|e| anyhow!("{e}"))?;
    assert!(events.iter().any(|e| e["kind"] == "witness-held"), "h1 took the witness over");
    lab.assert_no_double_run()
}

/// The link between the two hosts cut, in network namespaces (root; without it the test returns
/// early): both still write the shared disk, which decides — the lower id (h0) stays, h1 fences
/// and its VM restarts on h0; after the heal h1 joins again and runs nothing moved.
#[test]
fn a_cut_link_between_two_hosts_keeps_exactly_the_lower_id() -> Result<()> {
    if !tandem_lab::netlab::can_use_namespaces() {
        return Ok(());
    }
    let net = tandem_lab::netlab::NetLab::create(&format!("tw{}", std::process::id() % 100_000), 2)?;
    net.enter_control()?;
    let opts = LabOptions { hosts: 2, loopback_net: 89, netns: Some(net.lab_hosts()), capacity: (4, 2048), disk_witness: true, ..LabOptions::default() };
    let mut lab = Lab::new(opts, &binary())?;
    two_hosts_with_witness(&mut lab)?;
    let cut_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    net.block_hosts(0, &[1])?;
    net.block_hosts(1, &[0])?;
    let cut = Instant::now();
    wait("p1 restarted on h0", Duration::from_secs(60), || {
        let running = lab.running();
        ["p0", "p1"].iter().all(|vm| running.get(*vm).is_some_and(|h| h == "h0")).then_some(())
    })?;
    eprintln!("link cut: h1's VM ran again on h0 {:.2} s later", cut.elapsed().as_secs_f64());
    let fenced_since = |i: usize| -> Vec<String> {
        lab.client(i)
            .list("/v1/events?limit=4096")
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["kind"] == "fenced" && e["at_ms"].as_u64().is_some_and(|t| t >= cut_at))
            .map(|e| e["detail"].to_string())
            .collect()
    };
    assert!(fenced_since(0).is_empty(), "h0 fenced: {:?}", fenced_since(0));
    assert!(!fenced_since(1).is_empty(), "h1, the higher id, did not fence");
    lab.assert_no_double_run()?;
    net.unblock(0)?;
    net.unblock(1)?;
    lab.wait_all_active(Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let placement = lab.placement(0)?;
    for (vm, host) in lab.running() {
        assert_eq!(placement.get(&vm), Some(&Some(host.clone())), "{vm} runs on {host} against committed state");
    }
    lab.assert_no_double_run()?;
    drop(lab);
    drop(net);
    Ok(())
}
