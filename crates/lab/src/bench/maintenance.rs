//! `tandem-lab bench maintenance`: a host of a 3-host lab runs N VMs and enters maintenance: time
//! until it is empty (every VM moved live), then until they are all back after it leaves it.
//! Every host's `/v1/local` is sampled throughout for a VM running on two hosts.

use crate::demo::{demo_vm, wait};
use crate::lab::{Lab, LabOptions};
use anyhow::{anyhow, bail, Result};
use std::path::Path;
use std::time::{Duration, Instant};
use tandem_agent::views::{ForceRequest, HostMode, HostModeRequest, VmView};

/// What one evacuation and return took.
#[derive(Clone, Debug)]
pub struct MaintenanceFigures {
    pub vms: usize,
    pub evacuated_s: f64,
    pub returned_s: f64,
    /// Samples in which two hosts reported one VM running (not paused).
    pub two_running: usize,
}

/// Sets `host`'s mode (forced: a lab's setup, not an admission test).
pub fn set_mode(lab: &Lab, host: &str, mode: HostMode) -> Result<()> {
    lab.client(0).send("POST", &format!("/v1/hosts/{host}/mode"), &HostModeRequest { mode, force: true }).map_err(|e| anyhow!("mode of {host}: {e}"))?;
    Ok(())
}

/// A fresh 3-host lab whose `vms` demo VMs (`{prefix}0`, `{prefix}1`...) all run on h0: h1 and
/// h2 are in maintenance while they start, and stay so (the caller puts them back).
pub fn crowded_lab(driver: &str, vms: usize, guest: &Path, net: u8, api_port: u16, prefix: &str, stop_timeout_s: u64) -> Result<Lab> {
    let qemu = if driver == "qemu" { format!("[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = {stop_timeout_s}\n") } else { String::new() };
    let opts = LabOptions { hosts: 3, driver: driver.into(), loopback_net: net, api_port, extra_config: qemu, capacity: (16, 8192), ..LabOptions::default() };
    let mut lab = Lab::new(opts, &crate::lab::tandem_binary()?)?;
    lab.start_all()?;
    lab.form_cluster()?;
    set_mode(&lab, "h1", HostMode::Maintenance)?;
    set_mode(&lab, "h2", HostMode::Maintenance)?;
    let c = lab.client(0);
    for i in 0..vms as u32 {
        let mut spec = demo_vm(i, driver, guest);
        spec.name = format!("{prefix}{i}");
        c.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create: {e}"))?;
        c.send("POST", &format!("/v1/vms/{prefix}{i}/start"), &ForceRequest::default()).map_err(|e| anyhow!("start: {e}"))?;
    }
    wait("every VM running on h0", Duration::from_secs(180), || all_on_h0(&lab, prefix, vms).then_some(()))?;
    Ok(lab)
}

/// Whether the lab's `vms` VMs `{prefix}0`... all run on h0.
#[must_use]
pub fn all_on_h0(lab: &Lab, prefix: &str, vms: usize) -> bool {
    let r = lab.running();
    (0..vms).all(|i| r.get(&format!("{prefix}{i}")).is_some_and(|h| h == "h0"))
}

fn two_running(lab: &Lab) -> usize {
    let clients: Vec<_> = (0..lab.hosts.len()).map(|i| lab.client(i)).collect();
    crate::bench::migration::doubly_running(&clients).len()
}

/// Starts `vms` VMs on h0 of a fresh lab, then puts h0 in maintenance and back.
pub fn round(driver: &str, vms: usize, guest: &Path, net: u8) -> Result<MaintenanceFigures> {
    let lab = crowded_lab(driver, vms, guest, net, 7800, "m", 5)?;
    if driver == "qemu" {
        // Let the guests finish booting (a migration of a booting guest is fine, but the
        // figures are for running guests).
        std::thread::sleep(Duration::from_secs(5));
    }
    set_mode(&lab, "h1", HostMode::Normal)?;
    set_mode(&lab, "h2", HostMode::Normal)?;
    let mut two = 0;
    let on = |host: &str| -> Option<usize> {
        let v: Vec<VmView> = lab.client(0).get_as("/v1/vms").ok()?;
        Some(v.iter().filter(|x| x.host.as_deref() == Some(host) || x.migrating_to.is_some()).count())
    };
    let t0 = Instant::now();
    set_mode(&lab, "h0", HostMode::Maintenance)?;
    wait("h0 to be empty", Duration::from_secs(600), || {
        two += two_running(&lab);
        (on("h0") == Some(0)).then_some(())
    })?;
    let evacuated_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    set_mode(&lab, "h0", HostMode::Normal)?;
    wait("every VM back on h0", Duration::from_secs(600), || {
        two += two_running(&lab);
        let v: Vec<VmView> = lab.client(0).get_as("/v1/vms").ok()?;
        (v.iter().filter(|x| x.host.as_deref() == Some("h0") && x.migrating_to.is_none()).count() == vms).then_some(())
    })?;
    let returned_s = t1.elapsed().as_secs_f64();
    // (The lab's process-level recorder is not asked: it counts a destination's paused QEMU as
    // a second copy. The hosts' own reports, sampled above, are the check.)
    Ok(MaintenanceFigures { vms, evacuated_s, returned_s, two_running: two })
}

/// Runs `rounds` rounds with `vms` VMs and prints the figures.
pub fn run(driver: &str, vms: usize, rounds: usize, guest: &Path) -> Result<()> {
    if rounds == 0 || vms == 0 {
        bail!("--rounds and --vms must be at least 1");
    }
    crate::demo::install_interrupt_handler();
    let mut figures = vec![];
    for r in 1..=rounds {
        let f = round(driver, vms, guest, 75)?;
        println!("round {r}: {} VM(s): evacuated in {:.2} s, back in {:.2} s, two running: {}", f.vms, f.evacuated_s, f.returned_s, f.two_running);
        figures.push(f);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (m, lo, hi) = med(figures.iter().map(|f| f.evacuated_s).collect());
    println!("\nmaintenance of a host with {vms} VM(s) ({driver} driver), {rounds} round(s): evacuated {m:.2} s ({lo:.2}–{hi:.2})");
    let (m, lo, hi) = med(figures.iter().map(|f| f.returned_s).collect());
    println!("back home after exit: {m:.2} s ({lo:.2}–{hi:.2}); samples with two running copies: {}", figures.iter().map(|f| f.two_running).sum::<usize>());
    Ok(())
}
