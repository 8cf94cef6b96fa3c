//! `tandem-lab bench planned-stop`: a host of a 3-host lab runs N VMs and is stopped with
//! `tandem host shutdown h0 --policy P`: the time until it has left (every guest shut down and
//! the leave committed, or — `kill`, `migrate` — until it is failed over), then, once its agent
//! is started again, until its VMs run there again. Every host's `/v1/local` is sampled for a VM
//! running on two hosts. For QEMU guests the serial log tells whether each guest powered itself
//! down (its kernel's "reboot: Power down") rather than being killed.

use crate::demo::{demo_vm, wait};
use crate::lab::{Lab, LabOptions};
use anyhow::{anyhow, bail, Result};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tandem_agent::views::{ForceRequest, HostMode, HostModeRequest, HostView};
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

fn set_mode(lab: &Lab, host: &str, mode: HostMode) -> Result<()> {
    lab.client(0).send("POST", &format!("/v1/hosts/{host}/mode"), &HostModeRequest { mode, force: true }).map_err(|e| anyhow!("mode of {host}: {e}"))?;
    Ok(())
}

fn on_h0(lab: &Lab, vms: usize) -> bool {
    let r = lab.running();
    (0..vms).all(|i| r.get(&format!("p{i}")).is_some_and(|h| h == "h0"))
}

/// Starts `vms` VMs on h0 of a fresh lab, stops h0 under `policy`, then starts it again.
pub fn round(driver: &str, vms: usize, policy: &str, guest: &Path, net: u8) -> Result<PlannedStopFigures> {
    let qemu = if driver == "qemu" { "[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 10\n" } else { "" };
    let opts = LabOptions {
        hosts: 3,
        driver: driver.into(),
        loopback_net: net,
        api_port: 7820,
        extra_config: qemu.into(),
        capacity: (16, 8192),
        ..LabOptions::default()
    };
    let mut lab = Lab::new(opts, &crate::lab::tandem_binary()?)?;
    lab.start_all()?;
    lab.form_cluster()?;
    set_mode(&lab, "h1", HostMode::Maintenance)?;
    set_mode(&lab, "h2", HostMode::Maintenance)?;
    let c = lab.client(0);
    for i in 0..vms as u32 {
        let mut spec = demo_vm(i, driver, guest);
        spec.name = format!("p{i}");
        c.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create: {e}"))?;
        c.send("POST", &format!("/v1/vms/p{i}/start"), &ForceRequest::default()).map_err(|e| anyhow!("start: {e}"))?;
    }
    wait("every VM running on h0", Duration::from_secs(180), || on_h0(&lab, vms).then_some(()))?;
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
    let powered_down = (0..vms)
        .filter(|i| std::fs::read_to_string(lab.hosts[0].data.join("run").join(format!("p{i}.serial"))).is_ok_and(|s| s.contains("reboot: Power down")))
        .count();
    let t1 = Instant::now();
    lab.start(0)?;
    wait("every VM running on h0 again", Duration::from_secs(300), || {
        two += crate::bench::migration::doubly_running(&clients).len();
        on_h0(&lab, vms).then_some(())
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
