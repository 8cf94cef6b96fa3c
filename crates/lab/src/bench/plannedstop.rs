//! `tandem-lab bench planned-stop`: a host of a 3-host lab runs N VMs and is stopped with
//! `tandem host shutdown h0 --policy P`: the time until it has left (every guest shut down and
//! the leave committed, or — `kill`, `migrate` — until it is failed over), then, once its agent
//! is started again, until its VMs run there again. Every host's `/v1/local` is sampled for a VM
//! running on two hosts. For QEMU guests the serial log tells whether each guest powered itself
//! down (its kernel's "reboot: Power down") rather than being killed.

use crate::bench::maintenance::{all_on_h0, crowded_lab, set_mode};
use crate::demo::wait;
use anyhow::{bail, Result};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tandem_agent::views::{HostMode, HostView};
use tandem_core::state::HostStatus;

/// What one planned stop and return took.
#[derive(Clone, Debug)]
pub struct PlannedStopFigures {
    pub vms: usize,
    /// From the request to the host no longer active in committed state, seconds.
    pub left_s: f64,
    /// From its agent's restart to every VM running there again, seconds.
    pub back_s: f64,
    /// QEMU guests whose kernel powered down cleanly (from their serial logs).
    pub powered_down: usize,
    /// Samples in which two hosts reported one VM running.
    pub two_running: usize,
}

/// Starts `vms` VMs on h0 of a fresh lab, stops h0 under `policy`, then starts it again.
pub fn round(driver: &str, vms: usize, policy: &str, guest: &Path, net: u8) -> Result<PlannedStopFigures> {
    let mut lab = crowded_lab(driver, vms, guest, net, 7820, "p", 10)?;
    if driver == "qemu" {
        // Booted guests: their power-button handler runs once init is done (a button pressed
        // before is lost, and the guest is then killed after the stop timeout).
        let serial = |i: usize| std::fs::read_to_string(lab.hosts[0].data.join("run").join(format!("p{i}.serial"))).unwrap_or_default();
        wait("every guest booted", Duration::from_secs(180), || (0..vms).all(|i| serial(i).contains("TANDEM-GUEST-READY")).then_some(()))?;
    }
    set_mode(&lab, "h1", HostMode::Normal)?;
    set_mode(&lab, "h2", HostMode::Normal)?;
    let clients: Vec<_> = (0..lab.hosts.len()).map(|i| lab.client(i)).collect();
    let mut two = 0;
    let t0 = Instant::now();
    let out = Command::new(&crate::lab::tandem_binary()?)
        .args(["--api", &lab.hosts[1].api, "--token", &lab.token(), "host", "shutdown", "h0", "--policy", policy, "--no-wait"])
        .output()?;
    if !out.status.success() {
        bail!("tandem host shutdown: {}", String::from_utf8_lossy(&out.stderr));
    }
    let watcher = lab.client(1);
    wait("h0 to leave", Duration::from_secs(600), || {
        two += crate::bench::migration::doubly_running(&clients).len();
        let hosts: Vec<HostView> = watcher.get_as("/v1/hosts").ok()?;
        hosts.iter().find(|h| h.name == "h0").filter(|h| h.status != HostStatus::Active).map(|_| ())
    })?;
    let left_s = t0.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lab.reap(0) {
        if Instant::now() > deadline {
            bail!("h0's agent did not exit after its planned stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let serials: Vec<String> =
        (0..vms).map(|i| std::fs::read_to_string(lab.hosts[0].data.join("run").join(format!("p{i}.serial"))).unwrap_or_default()).collect();
    let powered_down = serials.iter().filter(|s| s.contains("reboot: Power down")).count();
    for (i, s) in serials.iter().enumerate().filter(|(_, s)| driver == "qemu" && !s.contains("reboot: Power down")) {
        // Why a guest did not go cleanly is on its console: say it with the figures.
        let tail: String = s.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        eprintln!("p{i} did not power down cleanly; its console ends:\n{tail}");
    }
    let t1 = Instant::now();
    lab.start(0)?;
    wait("every VM running on h0 again", Duration::from_secs(300), || {
        two += crate::bench::migration::doubly_running(&clients).len();
        all_on_h0(&lab, "p", vms).then_some(())
    })?;
    let back_s = t1.elapsed().as_secs_f64();
    Ok(PlannedStopFigures { vms, left_s, back_s, powered_down, two_running: two })
}

/// Runs `rounds` rounds and prints the figures.
pub fn run(driver: &str, vms: usize, policy: &str, rounds: usize, guest: &Path) -> Result<()> {
    if rounds == 0 || vms == 0 {
        bail!("--rounds and --vms must be at least 1");
    }
    crate::demo::install_interrupt_handler();
    let mut figures = vec![];
    for r in 1..=rounds {
        let f = round(driver, vms, policy, guest, 74)?;
        println!(
            "round {r}: {} VM(s): left in {:.2} s ({} powered down cleanly), back in {:.2} s after the restart, two running: {}",
            f.vms, f.left_s, f.powered_down, f.back_s, f.two_running
        );
        figures.push(f);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (m, lo, hi) = med(figures.iter().map(|f| f.left_s).collect());
    println!("\nplanned stop (policy {policy}) of a host with {vms} VM(s) ({driver} driver), {rounds} round(s): left after {m:.2} s ({lo:.2}–{hi:.2})");
    let (m, lo, hi) = med(figures.iter().map(|f| f.back_s).collect());
    println!(
        "running there again after its restart: {m:.2} s ({lo:.2}–{hi:.2}); samples with two running copies: {}",
        figures.iter().map(|f| f.two_running).sum::<usize>()
    );
    Ok(())
}
