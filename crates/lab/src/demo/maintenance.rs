//! The demo's second act. The host that lost its power comes back and rejoins; then the host
//! running the most demo VMs is put in maintenance with the operator's own command (`tandem host
//! maintenance enter`, which shows its plan and follows the evacuation), its VMs leaving live,
//! and taken out of it again (`exit`), its VMs coming back live. Throughout, every moving VM's
//! service is polled every 20 ms on every host's address (QEMU guests; a process workload is
//! looked for in the process table as often), and the longest time without an answer is what
//! a client of that VM saw. One JSON line ends it.

use super::{http_get, wait, Stage};
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_agent::views::{HostStatus, HostView, MigrationsView};

/// How often a moving VM's service is polled.
const POLL: Duration = Duration::from_millis(20);
/// How long one poll may wait for an answer.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// When each watched VM last answered, and the longest silence between two answers so far.
#[derive(Default)]
struct Silence {
    last: Option<Instant>,
    longest: Duration,
}

/// Pollers of the moving VMs' services, each recording answers into the VM's [`Silence`].
struct GapWatch {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    silences: BTreeMap<u32, Arc<Mutex<Silence>>>,
}

fn note(s: &Mutex<Silence>, at: Instant) {
    let mut s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(last) = s.last {
        s.longest = s.longest.max(at.saturating_duration_since(last));
    }
    s.last = Some(s.last.map_or(at, |l| l.max(at)));
}

impl GapWatch {
    /// Polls demo VMs `vms`: a QEMU guest on each host's address (user-mode networking: its
    /// port moves with it), a process workload in the lab's process table.
    fn start(stage: &Stage, vms: &[u32]) -> GapWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut silences = BTreeMap::new();
        for i in vms {
            let silence = Arc::new(Mutex::new(Silence::default()));
            silences.insert(*i, Arc::clone(&silence));
            let probes: Vec<Box<dyn Fn() -> bool + Send>> = if stage.driver == "qemu" {
                let port = 8080 + i;
                stage
                    .lab
                    .hosts
                    .iter()
                    .map(|h| {
                        let addr = format!("{}:{port}", h.ip);
                        Box::new(move || http_get(&addr, "/health", POLL_TIMEOUT).is_some()) as Box<dyn Fn() -> bool + Send>
                    })
                    .collect()
            } else {
                let (lab_id, vm) = (stage.lab.id.clone(), format!("web{i}"));
                vec![Box::new(move || crate::lab::lab_processes(&lab_id).iter().any(|(_, env)| env.get("TANDEM_VM") == Some(&vm)))]
            };
            // One thread per address, so a paused copy's port (which accepts, then times out)
            // does not hold up the poll of the copy that answers.
            for probe in probes {
                let (stop, silence) = (Arc::clone(&stop), Arc::clone(&silence));
                threads.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let t = Instant::now();
                        if probe() {
                            note(&silence, t);
                        }
                        std::thread::sleep(POLL.saturating_sub(t.elapsed()));
                    }
                }));
            }
        }
        GapWatch { stop, threads, silences }
    }

    /// Stops polling; each VM's longest silence, in milliseconds (one that never answered
    /// again is silent until now; one that never answered at all, `u64::MAX`).
    fn finish(self) -> BTreeMap<u32, u64> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        let now = Instant::now();
        self.silences
            .into_iter()
            .map(|(i, s)| {
                let s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let longest = s.last.map(|l| s.longest.max(now.saturating_duration_since(l)));
                (i, longest.map_or(u64::MAX, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
            })
            .collect()
    }
}

/// The host whose API the act reads and the CLI asks: one that never lost its power (the
/// host that comes back may still be catching up with the log, and answer from older state).
fn reader(stage: &Stage) -> usize {
    usize::from(stage.victim == 0)
}

/// Runs the operator's CLI against [`reader`]'s API, its output shown as it comes.
fn cli(stage: &Stage, args: &[&str]) -> Result<()> {
    let status = std::process::Command::new(crate::lab::tandem_binary()?)
        .arg("--api")
        .arg(&stage.lab.hosts[reader(stage)].api)
        .env("TANDEM_TOKEN", stage.lab.token())
        .args(args)
        .status()?;
    if !status.success() {
        bail!("tandem {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The demo VMs each host runs, as committed state places them.
fn placement(stage: &Stage) -> Result<BTreeMap<String, Vec<u32>>> {
    let p = stage.lab.placement(reader(stage))?;
    let mut on: BTreeMap<String, Vec<u32>> = stage.lab.hosts.iter().map(|h| (h.name.clone(), vec![])).collect();
    for i in 0..stage.vms {
        if let Some(Some(h)) = p.get(&format!("web{i}")) {
            on.entry(h.clone()).or_default().push(i);
        }
    }
    Ok(on)
}

/// QEMU's downtime of each migration the hosts drove since `since_ms` (wall clock), the largest.
fn largest_downtime(stage: &Stage, since_ms: u64) -> Option<u64> {
    (0..stage.lab.hosts.len())
        .filter_map(|i| stage.lab.client(i).get_as::<MigrationsView>("/v1/migrations").ok())
        .flat_map(|v| v.recent)
        .filter(|o| o.finished_at_ms >= since_ms && o.result == "completed")
        .filter_map(|o| o.report?.downtime_ms)
        .max()
}

/// The second act (see the module's comment).
pub(super) fn act(stage: &mut Stage) -> Result<()> {
    let victim_name = stage.lab.hosts[stage.victim].name.clone();
    println!("\nSecond act: the power of {victim_name} comes back; it rejoins the cluster ...");
    stage.lab.start(stage.victim)?;
    wait("the host to rejoin", Duration::from_secs(120), || {
        let hosts = stage.lab.client(reader(stage)).list_as::<HostView>("/v1/hosts").ok()?;
        hosts.iter().all(|h| h.status == HostStatus::Active).then_some(())
    })?;
    let before = placement(stage)?;
    let (host, moving) =
        before.iter().max_by_key(|(h, vms)| (vms.len(), (*h).clone())).map(|(h, v)| (h.clone(), v.clone())).ok_or_else(|| anyhow!("no hosts"))?;
    println!("{victim_name} is back. {host} runs {} demo VM(s); it goes into maintenance, its VMs leaving live:\n", moving.len());
    // Live migration keeps a paused copy beside the running one: the recorder asks the hosts
    // before it counts two processes of a VM as a double run.
    stage.lab.judge_paused_copies();
    let watch = GapWatch::start(stage, &moving);
    std::thread::sleep(Duration::from_millis(300));
    let since_ms = tandem_drivers::wall_ms();
    let t0 = Instant::now();
    cli(stage, &["host", "maintenance", "enter", &host])?;
    let evacuated_s = t0.elapsed().as_secs_f64();
    let left = placement(stage)?.get(&host).map_or(0, Vec::len);
    if left > 0 {
        bail!("{left} VM(s) still on {host} after its evacuation");
    }
    println!("\nMaintenance done; {host} leaves it and its VMs come back live:\n");
    let t1 = Instant::now();
    cli(stage, &["host", "maintenance", "exit", &host])?;
    let returned_s = t1.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let gaps = watch.finish();
    let downtime = largest_downtime(stage, since_ms);
    println!("\nLongest time without an answer, per VM (polled every 20 ms, over both moves):");
    for (i, g) in &gaps {
        println!("  web{i:<3} {g} ms");
    }
    let double_runs = stage.lab.recorder.double_run_count();
    println!("No VM ran on two hosts at once: {}", if double_runs == 0 { "confirmed" } else { "VIOLATED" });
    let longest = gaps.values().copied().max().unwrap_or(0);
    let downtime = downtime.map_or_else(|| "null".to_string(), |d| d.to_string());
    println!(
        "{{\"scenario\":\"maintenance\",\"driver\":\"{}\",\"host\":\"{host}\",\"vms\":{},\"evacuated_s\":{:.2},\"returned_s\":{:.2},\"longest_gap_ms\":{longest},\"qemu_downtime_ms\":{downtime},\"double_runs\":{double_runs}}}",
        stage.driver,
        moving.len(),
        evacuated_s,
        returned_s,
    );
    if double_runs > 0 {
        bail!("a VM ran on two hosts at once");
    }
    Ok(())
}
