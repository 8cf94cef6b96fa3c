//! `tandem-lab bench heartbeat`: what liveness costs per agent in a cluster of N real agents on
//! loopback (process driver, no VMs): CPU time per agent, heartbeat datagrams and bytes received
//! per second, and whether any host fenced itself while the cluster grew one join at a time.
//! Figures only; nothing is asserted.

use crate::lab::{Lab, LabOptions};
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use tandem_agent::views::{Event, EventKind};
use tandem_core::hostset::MAX_HOSTS;

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let (utime, stime) = (fields.get(11), fields.get(12));
    Ok(utime.and_then(|u| u.parse::<u64>().ok()).unwrap_or(0) + stime.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0))
}

/// Heartbeats this agent has accepted from all its peers, from its metrics.
fn heartbeats_received(lab: &Lab, i: usize) -> u64 {
    let Ok(v) = lab.client(i).get("/metrics") else { return 0 };
    let text = v.as_str().unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("tandem_heartbeats_received_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|x| x as u64)
        .sum()
}

/// Runs the benchmark with `hosts` agents for `seconds` of measurement.
pub fn run(hosts: u32, seconds: u64, keep: bool) -> Result<()> {
    if !(2..=MAX_HOSTS as u32).contains(&hosts) {
        bail!("--hosts must be 2 to {MAX_HOSTS}");
    }
    let binary = crate::lab::tandem_binary()?;
    // No VMs run: the double-run recorder samples once a second rather than every 10 ms (each
    // sample reads every process's environment — at 10 ms it took 17 % of a core, which the
    // agents being measured would share).
    let opts = LabOptions { hosts, loopback_net: 88, api_port: 7600, capacity: (4, 2048), recorder_period: Duration::from_secs(1), ..LabOptions::default() };
    let mut lab = Lab::new(opts, &binary)?;
    if keep {
        lab.keep_files();
        println!("lab directory: {}", lab.root.display());
    }
    let t = Instant::now();
    lab.start_all()?;
    lab.form_cluster()?;
    println!("{hosts} agents started and joined one after another in {:.1} s", t.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(2));
    let fenced: Vec<Event> = lab.events().into_iter().filter(|e| e.kind == EventKind::Fenced).collect();
    println!("hosts that fenced themselves while the cluster grew: {}", fenced.len());
    for e in &fenced {
        println!("  {}: {}", e.host, e.detail);
    }
    let pids: Vec<u32> = (0..lab.hosts.len()).filter_map(|i| lab.agent_pid(i)).collect();
    let ticks0: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect::<Result<_>>()?;
    let beats0: Vec<u64> = (0..lab.hosts.len()).map(|i| heartbeats_received(&lab, i)).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let elapsed = t0.elapsed().as_secs_f64();
    let ticks1: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect::<Result<_>>()?;
    let beats1: Vec<u64> = (0..lab.hosts.len()).map(|i| heartbeats_received(&lab, i)).collect();
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut cpu: Vec<f64> = ticks0.iter().zip(&ticks1).map(|(a, b)| b.saturating_sub(*a) as f64 / hz / elapsed * 100.0).collect();
    cpu.sort_by(f64::total_cmp);
    let mut rate: Vec<f64> = beats0.iter().zip(&beats1).map(|(a, b)| b.saturating_sub(*a) as f64 / elapsed).collect();
    rate.sort_by(f64::total_cmp);
    let datagram = tandem_core::wire::addressed_len(hosts as usize - 1);
    let mid = |v: &[f64]| v[v.len() / 2];
    println!("{hosts} agents, {elapsed:.0} s idle (no VMs), 200 ms heartbeats:");
    println!(
        "  CPU per agent: median {:.2} % of a core (min {:.2}, max {:.2}); all agents: {:.0} % of a core",
        mid(&cpu),
        cpu[0],
        cpu[cpu.len() - 1],
        cpu.iter().sum::<f64>()
    );
    println!(
        "  heartbeats received per agent: median {:.0}/s ({} bytes each: {:.0} KB/s); sent per agent: {:.0}/s (all received / agents: loopback loses none)",
        mid(&rate),
        datagram,
        mid(&rate) * datagram as f64 / 1000.0,
        rate.iter().sum::<f64>() / rate.len() as f64
    );
    Ok(())
}
