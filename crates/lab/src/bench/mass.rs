//! `tandem-lab bench mass-failover`: one host of a three-host local cluster runs N process VMs
//! (1,000 by default); its power is cut; how long until every one of them runs on the survivors,
//! and where the time goes: the failover's commit, then the survivors' launchers (first, median
//! and last start, starts per second) and the reconciler passes that issued them. Figures only;
//! nothing is asserted beyond the run completing without a VM on two hosts.

use crate::demo::{check_interrupt, wait};
use crate::lab::{Lab, LabOptions};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tandem_agent::views::{Event, ForceRequest, HostModeRequest, LocalView};
use tandem_core::state::HostMode;

/// What one round measured, in seconds after the power cut.
struct MassRound {
    committed: f64,
    first_started: f64,
    median_started: f64,
    all_started: f64,
    all_running: f64,
    passes: usize,
}

/// VMs running (not exited) on host `i`, from its agent.
fn running_on(lab: &Lab, i: usize) -> BTreeSet<String> {
    lab.client(i).get_as::<LocalView>("/v1/local").map(|l| l.vms.into_iter().filter(|v| v.exit.is_none()).map(|v| v.name).collect()).unwrap_or_default()
}

fn set_mode(lab: &Lab, host: &str, mode: HostMode) -> Result<()> {
    lab.client(0).send("POST", &format!("/v1/hosts/{host}/mode"), &HostModeRequest { mode, force: true }).map_err(|e| anyhow!("host mode of {host}: {e}"))?;
    Ok(())
}

fn round(vms: usize) -> Result<MassRound> {
    let binary = crate::lab::tandem_binary()?;
    let opts = LabOptions {
        hosts: 3,
        loopback_net: 67,
        api_port: 7420,
        capacity: (4096, 4 << 20),
        recorder_period: Duration::from_millis(100),
        ..LabOptions::default()
    };
    let mut lab = Lab::new(opts, &binary)?;
    lab.start_all()?;
    lab.form_cluster()?;
    // Everything goes to h1 (not the leader, which is h0 after `cluster init`): the others are in
    // maintenance while the VMs are placed.
    set_mode(&lab, "h0", HostMode::Maintenance)?;
    set_mode(&lab, "h2", HostMode::Maintenance)?;
    let c0 = lab.client(0);
    let t = Instant::now();
    for i in 0..vms {
        let spec = crate::lab::process_vm(&format!("m{i}"), 64, (i % 5) as i32);
        c0.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create m{i}: {e}"))?;
        c0.send("POST", &format!("/v1/vms/m{i}/start"), &ForceRequest::default()).map_err(|e| anyhow!("start m{i}: {e}"))?;
        check_interrupt()?;
    }
    wait("every VM to run on h1", Duration::from_secs(300), || (running_on(&lab, 1).len() == vms).then_some(()))?;
    println!("{vms} VMs created, started and running on h1 in {:.1} s", t.elapsed().as_secs_f64());
    set_mode(&lab, "h0", HostMode::Normal)?;
    set_mode(&lab, "h2", HostMode::Normal)?;
    std::thread::sleep(Duration::from_secs(1));

    let wall0 = tandem_drivers::wall_ms() as i64;
    let t0 = Instant::now();
    lab.power_off(1);
    let all_running = wait("every VM to run on the survivors", Duration::from_secs(300), || {
        let n = running_on(&lab, 0).len() + running_on(&lab, 2).len();
        (n >= vms).then(|| t0.elapsed().as_secs_f64())
    })?;
    std::thread::sleep(Duration::from_millis(300));
    lab.assert_no_double_run()?;
    let rel = |e: &Event| (e.at_ms as i64 - wall0) as f64 / 1000.0;
    let events = |i: usize, kind: &str| -> Vec<Event> {
        lab.client(i)
            .list_as::<Event>(&format!("/v1/events?kind={kind}&limit=4096"))
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.at_ms as i64 >= wall0)
            .collect()
    };
    let committed = [0, 2]
        .iter()
        .flat_map(|i| events(*i, "failover-committed"))
        .filter(|e| e.subject.as_deref() == Some("h1"))
        .map(|e| rel(&e))
        .fold(f64::INFINITY, f64::min);
    let started: Vec<Event> = [0, 2].iter().flat_map(|i| events(*i, "vm-started")).collect();
    let mut at: Vec<f64> = started.iter().map(rel).collect();
    at.sort_by(f64::total_cmp);
    if at.len() < vms || !committed.is_finite() {
        bail!("the timelines hold {} start(s) of {vms} and {} commit", at.len(), if committed.is_finite() { "a" } else { "no" });
    }
    // A reconciler pass issues its starts within a few milliseconds; a gap of more than half a
    // heartbeat interval between two starts on one host is the next pass.
    let mut passes = 0;
    for host in ["h0", "h2"] {
        let mut t: Vec<u64> = started.iter().filter(|e| e.host == host).map(|e| e.at_ms).collect();
        t.sort_unstable();
        passes += t.windows(2).filter(|w| w[1] - w[0] > 100).count() + usize::from(!t.is_empty());
    }
    Ok(MassRound { committed, first_started: at[0], median_started: at[at.len() / 2], all_started: at[at.len() - 1], all_running, passes })
}

/// Runs `rounds` rounds with `vms` VMs on the victim and prints each phase's median, min and max.
pub fn run(vms: usize, rounds: usize) -> Result<()> {
    if rounds == 0 || vms == 0 {
        bail!("--rounds and --vms must be at least 1");
    }
    crate::demo::install_interrupt_handler();
    let mut all = Vec::with_capacity(rounds);
    for r in 1..=rounds {
        println!("\n=== round {r} of {rounds} ===");
        let m = round(vms).with_context(|| format!("round {r}"))?;
        println!(
            "committed {:.2} s, first start {:.2} s, median start {:.2} s, last start {:.2} s, all running {:.2} s, {} reconciler pass(es)",
            m.committed, m.first_started, m.median_started, m.all_started, m.all_running, m.passes
        );
        all.push(m);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\n{vms} process VMs of a dead host, {rounds} round(s) (load average now: {})", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!("{:<28} {:>8} {:>8} {:>8}   (seconds after the power cut)", "phase", "median", "min", "max");
    type Get = fn(&MassRound) -> f64;
    let phases: [(&str, Get); 5] = [
        ("restart committed", |m| m.committed),
        ("first VM started", |m| m.first_started),
        ("half the VMs started", |m| m.median_started),
        ("last VM started", |m| m.all_started),
        ("all seen running", |m| m.all_running),
    ];
    for (name, get) in phases {
        let mut v: Vec<f64> = all.iter().map(get).collect();
        v.sort_by(f64::total_cmp);
        println!("{name:<28} {:>8.2} {:>8.2} {:>8.2}", v[v.len() / 2], v[0], v[v.len() - 1]);
    }
    let mut rate: Vec<f64> = all.iter().map(|m| vms as f64 / (m.all_started - m.first_started).max(0.001)).collect();
    rate.sort_by(f64::total_cmp);
    let mut passes: Vec<usize> = all.iter().map(|m| m.passes).collect();
    passes.sort_unstable();
    println!("launch throughput (first to last start): median {:.0} VMs/s (min {:.0}, max {:.0})", rate[rate.len() / 2], rate[0], rate[rate.len() - 1]);
    println!(
        "reconciler passes that issued starts (both survivors): median {} (min {}, max {})",
        passes[passes.len() / 2],
        passes[0],
        passes[passes.len() - 1]
    );
    Ok(())
}
