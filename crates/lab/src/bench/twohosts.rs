//! `tandem-lab bench two-hosts`: a two-host cluster with a disk witness and no third machine
//! (or, with `--network-witness`, a network witness and no shared storage).
//! Each round a fresh cluster runs one process VM on each host; then the power loss of h1, h1's
//! return, and the power loss of h0 (which holds the witness and leads), each timed until both
//! VMs run on the survivor; and, where network namespaces can be made (root), cuts of the link
//! between the two hosts, timed until h1's VM runs on h0. Figures only: the tests
//! (`crates/tandem/tests/two_hosts.rs`) check the behaviour with the same steps.

use crate::demo::wait;
use crate::lab::{Lab, LabOptions};
use anyhow::{anyhow, bail, Result};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use tandem_agent::views::FttView;

/// A process VM of 256 MiB that HA protects.
fn process_vm(name: &str) -> serde_json::Value {
    json!({ "name": name, "vcpus": 1, "memory_mib": 256, "protection": "protect",
            "driver": { "kind": "process", "command": ["sleep", "1000000"] } })
}

/// The options of a two-host lab with a disk witness.
#[must_use]
pub fn two_host_options(loopback_net: u8, netns: Option<Vec<(String, String)>>) -> LabOptions {
    LabOptions { hosts: 2, loopback_net, netns, capacity: (4, 2048), disk_witness: true, ..LabOptions::default() }
}

/// The options of a two-host lab whose third vote and heartbeat area a network witness at
/// `witness` keeps (no shared storage).
#[must_use]
pub fn network_witness_options(loopback_net: u8, netns: Option<Vec<(String, String)>>, witness: &str) -> LabOptions {
    let network_witness = Some(crate::lab::witness::NetWitnessOptions { addr: witness.to_string(), netns: None, tls: None });
    LabOptions { disk_witness: false, network_witness, ..two_host_options(loopback_net, netns) }
}

/// Starts and forms the two-host cluster, waits until the witness votes (FTT 1), and runs one
/// of `p0` and `p1` on each host (a soft anti-affinity rule spreads them and lets them share
/// a host once only one is left). Returns the FTT report.
pub fn start_two_hosts(lab: &mut Lab) -> Result<FttView> {
    if lab.opts.network_witness.is_some() {
        lab.start_witness()?;
    }
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(0);
    let ftt: FttView = wait("the disk witness to vote (FTT 1)", Duration::from_secs(60), || {
        let f: FttView = c.get_as("/v1/ftt").ok()?;
        (f.report.ftt == 1).then_some(f)
    })?;
    for vm in ["p0", "p1"] {
        c.post("/v1/vms", &process_vm(vm)).map_err(|e| anyhow!("{e}"))?;
    }
    c.post("/v1/rules", &json!({ "name": "apart", "kind": "anti-affinity", "hard": false, "vms": ["p0", "p1"] })).map_err(|e| anyhow!("{e}"))?;
    for vm in ["p0", "p1"] {
        c.post(&format!("/v1/vms/{vm}/start"), &json!({})).map_err(|e| anyhow!("{e}"))?;
    }
    wait("p0 and p1 running", Duration::from_secs(30), || (lab.running().len() == 2).then_some(()))?;
    Ok(ftt)
}

/// Waits until both VMs run on host `survivor`; the time since `from`.
pub fn both_on(lab: &Lab, survivor: usize, from: Instant) -> Result<f64> {
    let name = format!("h{survivor}");
    wait(&format!("both VMs on {name}"), Duration::from_secs(60), || {
        let running = lab.running();
        ["p0", "p1"].iter().all(|vm| running.get(*vm) == Some(&name)).then_some(())
    })?;
    Ok(from.elapsed().as_secs_f64())
}

/// Powers host `lost` off and waits until both VMs run on the other: the seconds it took.
pub fn lose_host(lab: &mut Lab, lost: usize) -> Result<f64> {
    let at = Instant::now();
    lab.power_off(lost);
    both_on(lab, 1 - lost, at)
}

/// Cuts the link between the two hosts of a namespace lab (each still reaches the witness):
/// waits until both VMs run on `keeper` (h0, the lower id, unless a preferred site says
/// otherwise), checks that it did not fence and the other did, and that nothing ran twice;
/// heals the link and waits until both hosts are active again. The seconds until both VMs ran
/// on the keeper.
pub fn cut_link(lab: &Lab, net: &crate::netlab::NetLab, keeper: usize) -> Result<f64> {
    let cut_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let cut = Instant::now();
    net.block_hosts(0, &[1])?;
    net.block_hosts(1, &[0])?;
    let secs = both_on(lab, keeper, cut)?;
    let kept = lab.fences_since(keeper, cut_at);
    anyhow::ensure!(kept.is_empty(), "h{keeper}, which the cut should keep, fenced: {kept:?}");
    anyhow::ensure!(!lab.fences_since(1 - keeper, cut_at).is_empty(), "h{}, which the cut should fence, did not", 1 - keeper);
    lab.assert_no_double_run()?;
    net.unblock(0)?;
    net.unblock(1)?;
    lab.wait_all_active(Duration::from_secs(60))?;
    Ok(secs)
}

/// Brings host 1 back and waits until it joined and the witness votes again.
pub fn bring_back(lab: &mut Lab, host: usize) -> Result<()> {
    lab.start(host)?;
    lab.wait_all_active(Duration::from_secs(60))?;
    wait("FTT 1 again", Duration::from_secs(60), || lab.client(host).get_as::<FttView>("/v1/ftt").ok().filter(|f| f.report.ftt == 1))?;
    Ok(())
}

fn print_phase(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(min), Some(max)) => println!("{name:<40} {:>8.2} {min:>8.2} {max:>8.2}   ({} rounds)", v[v.len() / 2], v.len()),
        _ => println!("{name:<40} {:>8} (not measured)", "-"),
    }
}

/// Runs `rounds` power-loss rounds and `cuts` link cuts, and prints the figures.
pub fn run(binary: &Path, rounds: usize, cuts: usize, network_witness: bool) -> Result<()> {
    if rounds == 0 && cuts == 0 {
        bail!("nothing to measure: --rounds and --cuts are both 0");
    }
    let (mut h1_lost, mut h0_lost, mut cut) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let opts = if network_witness { network_witness_options(91, None, "127.91.0.9:7400") } else { two_host_options(91, None) };
        let mut lab = Lab::new(opts, binary)?;
        start_two_hosts(&mut lab)?;
        h1_lost.push(lose_host(&mut lab, 1)?);
        bring_back(&mut lab, 1)?;
        h0_lost.push(lose_host(&mut lab, 0)?);
        lab.assert_no_double_run()?;
        println!("round {round}: h1 lost {:.2} s, h0 lost {:.2} s", h1_lost[round - 1], h0_lost[round - 1]);
    }
    let cuts = if crate::netlab::can_use_namespaces() {
        cuts
    } else {
        println!("link cuts: skipped (network namespaces need root)");
        0
    };
    for round in 1..=cuts {
        let net = crate::netlab::NetLab::create(&format!("tb{}", std::process::id() % 100_000), 2)?;
        net.enter_control()?;
        let opts = if network_witness {
            network_witness_options(92, Some(net.lab_hosts()), &format!("{}:7462", net.control_ip()))
        } else {
            two_host_options(92, Some(net.lab_hosts()))
        };
        let mut lab = Lab::new(opts, binary)?;
        start_two_hosts(&mut lab)?;
        let secs = cut_link(&lab, &net, 0)?;
        println!("cut {round}: h1's VM on h0 {secs:.2} s after the cut");
        cut.push(secs);
        drop(lab);
        drop(net);
    }
    let witness = if network_witness { "a network witness (no shared storage)" } else { "a disk witness" };
    println!("\ntwo hosts with {witness} (process VMs, default timings)");
    println!("{:<40} {:>8} {:>8} {:>8}", "seconds until both VMs run on the survivor", "median", "min", "max");
    print_phase("h1's power loss", h1_lost);
    print_phase("h0's power loss (it led, held the witness)", h0_lost);
    print_phase("link cut (h1 fences, h0 stays)", cut);
    Ok(())
}
