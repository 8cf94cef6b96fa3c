//! `tandem-lab demo`: a three-host cluster on this machine, protected guests, one host's power cut,
//! and the measured recovery, ending with one JSON line; then a second act (`maintenance`): the
//! host's power comes back, and another host is emptied live for maintenance and filled again,
//! the longest gap in each guest's service measured, ending with a second JSON line.

mod maintenance;
mod siteloss;

use crate::lab::{Lab, LabOptions};
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tandem_agent::views::{Event, EventKind, ForceRequest, HostView};
use tandem_core::state::{DriverSpec, NetworkSpec, ServiceProbe, VmSpec};

/// Options of the demo.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// `auto` (QEMU when it and the test guest are present), `qemu` or `process`.
    #[arg(long, default_value = "auto")]
    pub driver: String,
    /// How many protected VMs to create (spread over the three hosts).
    #[arg(long, default_value_t = 4)]
    pub vms: u32,
    /// Where scripts/build-guest.sh put vmlinuz and initrd.img.
    #[arg(long, env = "TANDEM_GUEST_DIR")]
    pub guest_dir: Option<PathBuf>,
    /// Keep the lab directory (configs, logs, event files) after the run.
    #[arg(long)]
    pub keep: bool,
    /// The agents' timings: the defaults, or the low-latency profile (100 ms heartbeats).
    #[arg(long, default_value = "default", value_parser = ["default", "low-latency"])]
    pub timings: String,
    /// `power-loss` (three hosts: one host's power cut, then maintenance) or `site-loss` (two
    /// sites, the guests' disks mirrored between them, one site's power cut; needs QEMU).
    #[arg(long, default_value = "power-loss", value_parser = ["power-loss", "site-loss"])]
    pub scenario: String,
}

/// What one power-loss round measured, in seconds after the power cut.
#[derive(Clone, Copy, Debug)]
pub struct RoundFigures {
    /// A survivor declared the host dead.
    pub detect_s: Option<f64>,
    /// The failover was committed.
    pub committed_s: Option<f64>,
    /// Every affected VM's process existed on a survivor (the recorder's first sample).
    pub started_s: Option<f64>,
    /// Every affected VM answered on its new host (the lab's own check).
    pub answering_s: f64,
    /// Every affected VM's service answered its probe, as the agents recorded it (`vm-answering`;
    /// only for VMs whose spec names a probe: the QEMU guests).
    pub probe_answering_s: Option<f64>,
}

/// The `[timings]` table of a profile, for the lab's agent configs.
fn timings_table(profile: &str) -> String {
    let t = match profile {
        "low-latency" => tandem_core::timing::LOW_LATENCY_TIMINGS,
        _ => return String::new(),
    };
    format!(
        "[timings]\nheartbeat_interval_ms = {}\npeer_timeout_ms = {}\nself_fence_ms = {}\ndisk_io_timeout_ms = {}\nkill_grace_ms = {}\nclock_margin_ms = {}\npartition_confirm_ms = {}\n",
        t.heartbeat_interval_ms, t.peer_timeout_ms, t.self_fence_ms, t.disk_io_timeout_ms, t.kill_grace_ms, t.clock_margin_ms, t.partition_confirm_ms
    )
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Fails once Ctrl-C or SIGTERM arrived, so the caller unwinds and its guards clean up.
pub fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Polls `f` every 50 ms until it gives a value, Ctrl-C, or `timeout`.
pub fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        check_interrupt()?;
        if let Some(t) = f() {
            return Ok(t);
        }
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path` from `addr` over plain HTTP/1.0 with a short timeout; the body if status is 200.
#[must_use]
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Option<String> {
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.take(64 * 1024).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.split_whitespace().nth(1).filter(|c| *c == "200")?;
    Some(body.to_string())
}

fn guest_dir(args: &DemoArgs) -> PathBuf {
    if let Some(d) = &args.guest_dir {
        return d.clone();
    }
    let cwd = PathBuf::from(".cache/guest");
    if cwd.join("vmlinuz").exists() {
        return cwd;
    }
    // target/{debug,release}/tandem → repository root.
    std::env::current_exe().ok().and_then(|p| p.parent()?.parent()?.parent().map(|r| r.join(".cache/guest"))).unwrap_or(cwd)
}

fn qemu_present() -> bool {
    std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The spec of demo VM `i` for the chosen driver.
#[must_use]
pub fn demo_vm(i: u32, driver: &str, guest: &std::path::Path) -> VmSpec {
    let mut spec = crate::lab::process_vm(&format!("web{i}"), 128, 10 - i as i32);
    if driver == "qemu" {
        // Specs take absolute paths only.
        let guest = std::fs::canonicalize(guest).unwrap_or_else(|_| guest.to_path_buf());
        spec.driver = DriverSpec::Qemu {
            kernel: Some(guest.join("vmlinuz").display().to_string()),
            initrd: Some(guest.join("initrd.img").display().to_string()),
            cmdline: Some("console=ttyS0 quiet tsc_early_khz=2000000 mitigations=off".into()),
            extra_args: vec![],
            guest_agent: false,
        };
        spec.network = Some(NetworkSpec::User { hostfwd: vec![format!("tcp:{{host_ip}}:{}-:80", 8080 + i)] });
        spec.probe = Some(ServiceProbe::Http { address: format!("{{host_ip}}:{}", 8080 + i), path: "/health".into(), expect: Some("booted".into()) });
    }
    spec
}

/// Whether VM `i`'s service answers on `host_ip` (QEMU: its HTTP server; process: its process).
fn service_up(lab: &Lab, driver: &str, i: u32, host: &str) -> bool {
    let Some(h) = lab.hosts.iter().find(|h| h.name == host) else { return false };
    if driver == "qemu" {
        http_get(&format!("{}:{}", h.ip, 8080 + i), "/health", Duration::from_millis(400)).is_some_and(|b| b.contains("booted"))
    } else {
        lab.running().get(&format!("web{i}")).is_some_and(|on| on == host)
    }
}

/// Routes Ctrl-C and SIGTERM to a flag that [`check_interrupt`] reads: the run stops at its next
/// check and its guards remove every process, namespace and file it made.
pub fn install_interrupt_handler() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
    }
}

fn secs(ms: i64) -> f64 {
    (ms as f64 / 10.0).round() / 100.0
}

/// Runs the demo: the power loss, then maintenance.
pub fn run(args: &DemoArgs) -> Result<()> {
    if args.scenario == "site-loss" {
        return siteloss::act(args);
    }
    let (_, mut stage) = power_loss_act(args)?;
    maintenance::act(&mut stage)
}

/// One demo round: a cluster, its VMs, one host's power cut, the recovery measured and printed
/// (timeline and the JSON summary line).
pub fn power_loss_round(args: &DemoArgs) -> Result<RoundFigures> {
    power_loss_act(args).map(|(figures, _)| figures)
}

/// What the second act takes over from the first: the lab, its driver, how many demo VMs it
/// runs, and which host lost its power.
struct Stage {
    lab: Lab,
    driver: &'static str,
    vms: u32,
    victim: usize,
}

/// The first act (see [`power_loss_round`]), handing over its lab.
fn power_loss_act(args: &DemoArgs) -> Result<(RoundFigures, Stage)> {
    install_interrupt_handler();
    let guest = guest_dir(args);
    let have_guest = guest.join("vmlinuz").exists() && guest.join("initrd.img").exists();
    let driver = match args.driver.as_str() {
        "qemu" => {
            if !qemu_present() || !have_guest {
                bail!("--driver qemu needs qemu-system-x86_64 and the test guest in {} (run scripts/build-guest.sh)", guest.display());
            }
            "qemu"
        }
        "process" => "process",
        "auto" if qemu_present() && have_guest => "qemu",
        "auto" => {
            println!("QEMU or the test guest is missing: this demo uses process workloads instead of real guests.");
            println!("(install qemu-system-x86 and run scripts/build-guest.sh for real QEMU guests)");
            "process"
        }
        other => bail!("unknown driver '{other}': use auto, qemu or process"),
    };
    let qemu = if driver == "qemu" { "[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 5\n" } else { "" };
    let extra = format!("{qemu}{}", timings_table(&args.timings));
    let binary = crate::lab::tandem_binary()?;
    let opts =
        LabOptions { hosts: 3, driver: driver.into(), loopback_net: 66, api_port: 7400, extra_config: extra, capacity: (4, 1024), ..LabOptions::default() };
    let mut lab = Lab::new(opts, &binary)?;
    if args.keep {
        lab.keep_files();
        println!("lab directory: {}", lab.root.display());
    }
    println!("Starting 3 agents ({driver} driver) on {} ...", lab.hosts.iter().map(|h| h.api.clone()).collect::<Vec<_>>().join(", "));
    lab.start_all()?;
    lab.form_cluster()?;
    check_interrupt()?;
    let c0 = lab.client(0);
    for i in 0..args.vms {
        c0.send("POST", "/v1/vms", &demo_vm(i, driver, &guest)).map_err(|e| anyhow!("create web{i}: {e}"))?;
        c0.send("POST", &format!("/v1/vms/web{i}/start"), &ForceRequest::default()).map_err(|e| anyhow!("start web{i}: {e}"))?;
    }
    println!("Created and started {} protected VM(s); waiting for them to serve ...", args.vms);
    let boot = Instant::now();
    let placement = wait("every VM to be placed", Duration::from_secs(60), || {
        let p = lab.placement(0).ok()?;
        (p.len() == args.vms as usize && p.values().all(Option::is_some)).then_some(p)
    })?;
    wait("every VM to answer", Duration::from_secs(120), || {
        (0..args.vms).all(|i| placement.get(&format!("web{i}")).and_then(Clone::clone).is_some_and(|h| service_up(&lab, driver, i, &h))).then_some(())
    })?;
    println!("All VMs answer after {:.1} s:", boot.elapsed().as_secs_f64());
    for (vm, host) in &placement {
        println!("  {vm:<6} on {}", host.as_deref().unwrap_or("-"));
    }
    // The victim: the host with the most VMs (ties: a non-leader, then the highest id).
    let leader = lab.client(0).list_as::<HostView>("/v1/hosts")?.into_iter().find(|h| h.leader).map(|h| h.name);
    let mut count: BTreeMap<String, usize> = lab.hosts.iter().map(|h| (h.name.clone(), 0)).collect();
    for h in placement.values().flatten() {
        *count.entry(h.clone()).or_default() += 1;
    }
    let victim_name =
        count.iter().max_by_key(|(h, n)| (**n, Some(*h) != leader.as_ref(), (*h).clone())).map(|(h, _)| h.clone()).ok_or_else(|| anyhow!("no hosts"))?;
    let victim = lab.hosts.iter().position(|h| h.name == victim_name).ok_or_else(|| anyhow!("victim vanished"))?;
    let affected: Vec<u32> =
        (0..args.vms).filter(|i| placement.get(&format!("web{i}")).and_then(Clone::clone).as_deref() == Some(victim_name.as_str())).collect();
    let survivor = (0..lab.hosts.len()).find(|i| *i != victim).unwrap_or(0);

    println!("\nCutting the power of {victim_name} (agent and its {} VM(s) killed at once) ...", affected.len());
    let wall0 = tandem_drivers::wall_ms() as i64;
    let t0 = Instant::now();
    lab.power_off(victim);
    let mut back: BTreeMap<u32, f64> = BTreeMap::new();
    let mut new_home: BTreeMap<u32, String> = BTreeMap::new();
    wait("the affected VMs to answer again", Duration::from_secs(120), || {
        let p = lab.placement(survivor).ok()?;
        for i in &affected {
            if back.contains_key(i) {
                continue;
            }
            if let Some(Some(h)) = p.get(&format!("web{i}")) {
                if *h != victim_name && service_up(&lab, driver, *i, h) {
                    back.insert(*i, t0.elapsed().as_secs_f64());
                    new_home.insert(*i, h.clone());
                }
            }
        }
        (back.len() == affected.len()).then_some(())
    })?;
    // Give the recorder a moment past recovery, so a late duplicate would be seen.
    std::thread::sleep(Duration::from_millis(500));

    let events = lab.events();
    let rel = |e: &Event| e.at_ms as i64 - wall0;
    let first = |kind: EventKind, subject: Option<&str>| {
        events.iter().filter(|e| rel(e) >= 0 && e.kind == kind && subject.is_none_or(|s| e.subject.as_deref() == Some(s))).map(rel).min()
    };
    let detect = first(EventKind::PeerDead, Some(&victim_name));
    let committed = first(EventKind::FailoverCommitted, Some(&victim_name));
    println!("\nTimeline (seconds after the power cut):");
    println!("  {:>6.2}  {victim_name} loses power", 0.0);
    let interesting = [
        EventKind::PeerDead,
        EventKind::PeerPartitioned,
        EventKind::FailoverDecided,
        EventKind::VmReassigned,
        EventKind::FailoverCommitted,
        EventKind::VmStarted,
        EventKind::VmAnswering,
        EventKind::Fenced,
        EventKind::VmLeftDown,
    ];
    for e in events.iter().filter(|e| rel(e) >= 0 && interesting.contains(&e.kind)) {
        println!("  {:>6.2}  [{}] {}", secs(rel(e)), e.host, e.detail);
    }
    for (i, t) in &back {
        println!("  {t:>6.2}  web{i} answers again on {}", new_home.get(i).map_or("?", String::as_str));
    }
    let double_runs = lab.recorder.double_run_count();
    let service_back = back.values().copied().fold(0.0_f64, f64::max);
    // When each affected VM's new process first appeared, from the recorder's samples.
    let cut_at = t0.saturating_duration_since(lab.recorder.origin);
    let started: Vec<f64> = affected
        .iter()
        .filter_map(|i| {
            let (vm, home) = (format!("web{i}"), new_home.get(i)?);
            let first = lab.recorder.instances().into_iter().filter(|x| x.vm == vm && &x.host == home).map(|x| x.first_seen).min()?;
            Some(first.saturating_sub(cut_at).as_secs_f64())
        })
        .collect();
    let started_s = (started.len() == affected.len()).then(|| started.iter().copied().fold(0.0_f64, f64::max));
    println!("\nNo VM ran on two hosts at once: {}", if double_runs == 0 { "confirmed (process table sampled every 10 ms)" } else { "VIOLATED" });
    // Keys in a fixed order, as documented.
    let opt = |v: Option<i64>| v.map_or_else(|| "null".to_string(), |ms| format!("{}", secs(ms)));
    let summary = format!(
        "{{\"scenario\":\"host-power-loss\",\"driver\":\"{driver}\",\"vms\":{},\"recovered\":{},\"detect_s\":{},\"restart_issued_s\":{},\"service_back_s\":{},\"double_runs\":{double_runs}}}",
        affected.len(),
        back.len(),
        opt(detect),
        opt(committed),
        (service_back * 100.0).round() / 100.0,
    );
    println!("{summary}");
    if double_runs > 0 {
        bail!("a VM ran on two hosts at once");
    }
    let s = |v: Option<i64>| v.map(secs);
    // The agents' own record: each affected VM's first `vm-answering` on its new host.
    let probed: Vec<i64> = affected
        .iter()
        .filter_map(|i| {
            let (vm, home) = (format!("web{i}"), new_home.get(i)?);
            events.iter().filter(|e| e.kind == EventKind::VmAnswering && e.vm.as_deref() == Some(vm.as_str()) && &e.host == home && rel(e) >= 0).map(rel).min()
        })
        .collect();
    let probe_answering_s = (!probed.is_empty() && probed.len() == affected.len()).then(|| secs(probed.iter().copied().max().unwrap_or(0)));
    let figures = RoundFigures { detect_s: s(detect), committed_s: s(committed), started_s, answering_s: service_back, probe_answering_s };
    Ok((figures, Stage { lab, driver, vms: args.vms, victim }))
}
