//! A local cluster on one machine: several real agent processes sharing a directory as shared
//! storage, each on its own loopback address (or in its own network namespace). Used by
//! `tandem-lab demo` and the integration tests. Everything it starts is killed and removed on drop.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem::client::Client;
use tandem_agent::views::{EmptyRequest, Event, HostStatus, HostView, JoinRequest, LivenessView, VmView};

/// A protected process "VM" running `sleep`: the lab's cheapest workload.
#[must_use]
pub fn process_vm(name: &str, memory_mib: u64, priority: i32) -> tandem_core::state::VmSpec {
    tandem_core::state::VmSpec::process(name, memory_mib, priority, &["sleep", "1000000"])
}

/// The operator's binary that every lab host runs: `TANDEM_BIN` when set, else the `tandem`
/// built next to this program (the lab never runs itself as an agent, so what is tested is
/// exactly what operators install).
pub fn tandem_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TANDEM_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().context("locating this program")?;
    // Beside a binary in target/<profile>/, or one level up from an integration test in deps/.
    let candidates = me.ancestors().skip(1).take(2).map(|d| d.join("tandem")).collect::<Vec<_>>();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| anyhow!("the tandem binary is not beside {} (build it with `cargo build --bin tandem`, or set TANDEM_BIN)", me.display()))
}

pub mod witness;

/// How to build a lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub hosts: u32,
    /// `qemu` or `process`.
    pub driver: String,
    /// Third octet of 127.x.y.z is fixed; hosts get 127.<net>.0.<10+i>.
    pub loopback_net: u8,
    pub api_port: u16,
    /// Extra TOML appended to every agent config (timings, qemu settings).
    pub extra_config: String,
    /// Memory (MiB) and vCPUs each host offers.
    pub capacity: (u32, u64),
    /// Per-host command prefix (for `ip netns exec NS`), and address override.
    pub netns: Option<Vec<(String, String)>>,
    /// Hosts whose heartbeat disk is another path than the shared one (fault injection).
    pub disk_paths: BTreeMap<u32, PathBuf>,
    /// The agents serve TLS (a `[tls]` table in `extra_config`): clients verify them with this CA.
    pub ca: Option<PathBuf>,
    /// How often the recorder samples the process table (it reads every process's environment:
    /// with a thousand workloads, every 10 ms would take a core of its own).
    pub recorder_period: Duration,
    /// Each host's site, by index (a host beyond the list has none).
    pub sites: Vec<String>,
    /// Keep a disk witness beside the heartbeat disk (`shared/witness.region`).
    pub disk_witness: bool,
    /// A network witness (`tandem witness`) instead of shared storage: it keeps the heartbeat
    /// area and the third vote (see [`witness`]).
    pub network_witness: Option<witness::NetWitnessOptions>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            hosts: 3,
            driver: "process".into(),
            loopback_net: 77,
            api_port: 7400,
            extra_config: String::new(),
            capacity: (4, 2048),
            netns: None,
            disk_paths: BTreeMap::new(),
            ca: None,
            recorder_period: Duration::from_millis(10),
            sites: Vec::new(),
            disk_witness: false,
            network_witness: None,
        }
    }
}

/// One agent of the lab.
pub struct LabHost {
    pub id: u32,
    pub name: String,
    pub ip: String,
    pub api: String,
    pub config: PathBuf,
    pub data: PathBuf,
    child: Option<Child>,
    prefix: Vec<String>,
}

/// What the process recorder saw of one VM instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub vm: String,
    pub host: String,
    pub pid: u32,
    pub first_seen: Duration,
    pub last_seen: Duration,
}

/// A moment at which one VM was seen on several hosts: when, which VM, which hosts.
pub type DoubleRun = (Duration, String, Vec<String>);

/// Tells whether VM `vm`, seen as processes on `hosts` at once, is explained without two copies
/// running: e.g. a live migration's paused incoming copy (see [`Recorder::set_double_judge`]).
pub type DoubleJudge = Arc<dyn Fn(&str, &BTreeSet<String>) -> bool + Send + Sync>;

/// Watches /proc for this lab's workload processes and counts moments where one VM runs on two
/// hosts at once. It samples every 10 ms, and independently of the agents.
pub struct Recorder {
    stop: Arc<AtomicBool>,
    pub instances: Arc<Mutex<BTreeMap<u32, Instance>>>,
    pub double_runs: Arc<Mutex<Vec<DoubleRun>>>,
    judge: Arc<Mutex<Option<DoubleJudge>>>,
    /// Samples with two processes of a VM that the judge explained (paused copies).
    pub explained: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub origin: Instant,
}

fn environ_of(pid: u32) -> Option<BTreeMap<String, String>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter_map(|kv| {
                let s = String::from_utf8_lossy(kv);
                let (k, v) = s.split_once('=')?;
                k.starts_with("TANDEM_").then(|| (k.to_string(), v.to_string()))
            })
            .collect(),
    )
}

/// PIDs of live (not zombie) processes whose environment has `TANDEM_LAB=lab` and `key`.
#[must_use]
pub fn lab_processes(lab: &str) -> Vec<(u32, BTreeMap<String, String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let env = environ_of(pid)?;
            if env.get("TANDEM_LAB").map(String::as_str) != Some(lab) {
                return None;
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit(')').next()?.split_whitespace().next()?;
            (state != "Z" && state != "X").then_some((pid, env))
        })
        .collect()
}

/// Whether `pid` is stopped by a signal (SIGSTOP) or traced.
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next()?.split_whitespace().next().map(|st| st == "T" || st == "t"))
        .unwrap_or(false)
}

impl Recorder {
    fn start(lab: String, period: Duration) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let instances = Arc::new(Mutex::new(BTreeMap::new()));
        let double_runs = Arc::new(Mutex::new(Vec::new()));
        let judge: Arc<Mutex<Option<DoubleJudge>>> = Arc::default();
        let explained = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let origin = Instant::now();
        let (s, i, d) = (Arc::clone(&stop), Arc::clone(&instances), Arc::clone(&double_runs));
        let (j, e) = (Arc::clone(&judge), Arc::clone(&explained));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let t = origin.elapsed();
                let mut by_vm = tandem_sim::oracle::Running::new();
                for (pid, env) in lab_processes(&lab) {
                    let (Some(vm), Some(host)) = (env.get("TANDEM_VM"), env.get("TANDEM_HOST")) else { continue };
                    // A stopped (frozen) process counts as present: a frozen qemu still holds its
                    // disk and resumes where it stopped, so a copy started elsewhere meanwhile is
                    // a double run even before the frozen one runs again.
                    by_vm.entry(vm.clone()).or_default().insert(host.clone());
                    let mut inst = i.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    inst.entry(pid).and_modify(|x: &mut Instance| x.last_seen = t).or_insert(Instance {
                        vm: vm.clone(),
                        host: host.clone(),
                        pid,
                        first_seen: t,
                        last_seen: t,
                    });
                }
                // The oracle's definition of a double run, as the simulator's — unless the
                // judge shows all copies but one paused.
                let judge = j.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                for (vm, hosts) in tandem_sim::oracle::on_two_hosts(&by_vm) {
                    if judge.as_ref().is_some_and(|judge| judge(vm, hosts)) {
                        e.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    d.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((t, vm.clone(), hosts.iter().cloned().collect()));
                }
                std::thread::sleep(period);
            }
        });
        Recorder { stop, instances, double_runs, judge, explained, thread: Some(thread), origin }
    }

    /// Has every later sample that finds a VM's processes on several hosts ask `judge` first: a
    /// sample it explains (e.g. one copy running and the others paused, as live migration
    /// keeps them) is counted in `explained`, not as a double run. Without a judge every such
    /// sample is a double run; a judge must count any doubt (a host that does not answer) as
    /// one.
    pub fn set_double_judge(&self, judge: DoubleJudge) {
        *self.judge.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(judge);
    }

    /// Moments at which a VM was seen running on two hosts.
    #[must_use]
    pub fn double_run_count(&self) -> usize {
        self.double_runs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Every instance seen so far.
    #[must_use]
    pub fn instances(&self) -> Vec<Instance> {
        self.instances.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values().cloned().collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running local cluster.
pub struct Lab {
    pub root: PathBuf,
    pub shared: PathBuf,
    pub hosts: Vec<LabHost>,
    pub opts: LabOptions,
    pub id: String,
    pub recorder: Recorder,
    binary: PathBuf,
    keep: bool,
    /// The network witness's process, while it runs.
    witness: Option<Child>,
}

fn kill_pid(pid: u32) {
    // SAFETY: kill(2) with a pid we started (or that our lab's agents started).
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

impl Lab {
    /// Creates the directories and configs; starts no agent.
    pub fn new(opts: LabOptions, binary: &Path) -> Result<Lab> {
        let id = format!("{}-{}", std::process::id(), opts.loopback_net);
        let root = std::env::temp_dir().join(format!("tandem-lab-{id}"));
        let _ = std::fs::remove_dir_all(&root);
        let shared = root.join("shared");
        std::fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
        std::fs::write(shared.join("secret"), format!("lab-secret-{id}-0123456789abcdef\n"))?;
        std::fs::set_permissions(shared.join("secret"), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        // The heartbeat disk is formatted once, explicitly, as an operator does with
        // `tandem disk format`: agents refuse a disk without this cluster's header.
        let key = tandem_core::wire::ClusterKey::new(&std::fs::read(shared.join("secret"))?)?;
        tandem_agent::disk::format(&shared.join("heartbeat.disk"), &key, false)?;
        let witness = shared.join("witness.region");
        if opts.disk_witness {
            // As an operator does: a file of the region's size on the shared storage.
            std::fs::File::create(&witness)?.set_len(tandem_agent::witness::MIN_REGION_BYTES)?;
        }
        let mut hosts = Vec::new();
        for i in 0..opts.hosts {
            let (prefix, ip) = match &opts.netns {
                Some(ns) => {
                    let (name, ip) = ns.get(i as usize).ok_or_else(|| anyhow!("no namespace for host {i}"))?;
                    (vec!["ip".into(), "netns".into(), "exec".into(), name.clone()], ip.clone())
                }
                None => (vec![], format!("127.{}.0.{}", opts.loopback_net, 10 + i)),
            };
            let name = format!("h{i}");
            let data = root.join(&name);
            std::fs::create_dir_all(&data)?;
            let api = format!("{ip}:{}", opts.api_port);
            let config = data.join("agent.toml");
            let text = format!(
                "host_id = {i}\nname = \"{name}\"\napi_addr = \"{api}\"\nheartbeat_addr = \"{ip}:{hb}\"\n\
                 data_dir = \"{data}\"\n{disk}secret_file = \"{secret}\"\n\
                 driver = \"{driver}\"\ncapacity = {{ vcpus = {vcpus}, memory_mib = {mem} }}\n{site}{witness}{extra}\n{net_witness}",
                hb = opts.api_port + 1,
                data = data.display(),
                disk = match &opts.network_witness {
                    Some(_) => String::new(),
                    None => format!("heartbeat_disk = \"{}\"\n", opts.disk_paths.get(&i).cloned().unwrap_or_else(|| shared.join("heartbeat.disk")).display()),
                },
                net_witness = opts.network_witness.as_ref().map(|w| w.agent_table()).unwrap_or_default(),
                secret = shared.join("secret").display(),
                driver = opts.driver,
                vcpus = opts.capacity.0,
                mem = opts.capacity.1,
                site = opts.sites.get(i as usize).map(|s| format!("site = \"{s}\"\n")).unwrap_or_default(),
                witness = if opts.disk_witness { format!("disk_witness = \"{}\"\n", witness.display()) } else { String::new() },
                // `{data}` in the extra config stands for this host's data directory, `{index}`
                // for its index.
                extra = opts
                    .extra_config
                    .replace("{data}", &data.display().to_string())
                    .replace("{site}", opts.sites.get(i as usize).map_or("", String::as_str))
                    .replace("{index}", &i.to_string()),
            );
            std::fs::write(&config, text)?;
            hosts.push(LabHost { id: i, name, ip, api, config, data, child: None, prefix });
        }
        if let Some(w) = &opts.network_witness {
            w.write_config(&root, &shared)?;
        }
        let recorder = Recorder::start(id.clone(), opts.recorder_period);
        // `TANDEM_KEEP_LAB`: every lab keeps its directory (the agents' logs) for a look after.
        let keep = std::env::var_os("TANDEM_KEEP_LAB").is_some();
        if keep {
            eprintln!("lab directory (kept): {}", root.display());
        }
        Ok(Lab { root, shared, hosts, opts, id, recorder, binary: binary.to_path_buf(), keep, witness: None })
    }

    /// Keeps the lab directory on drop (for looking at logs).
    pub fn keep_files(&mut self) {
        self.keep = true;
    }

    /// Starts host `i`'s agent.
    pub fn start(&mut self, i: usize) -> Result<()> {
        let h = &mut self.hosts[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(h.data.join("agent.log"))?;
        let mut cmd = if h.prefix.is_empty() {
            Command::new(&self.binary)
        } else {
            let mut c = Command::new(&h.prefix[0]);
            c.args(&h.prefix[1..]).arg(&self.binary);
            c
        };
        cmd.arg("agent")
            .arg("--config")
            .arg(&h.config)
            .env("TANDEM_LAB", &self.id)
            .env("RUST_LOG", std::env::var("TANDEM_LAB_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        h.child = Some(cmd.spawn().with_context(|| format!("starting agent {}", h.name))?);
        Ok(())
    }

    /// Starts every agent.
    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..self.hosts.len() {
            self.start(i)?;
        }
        Ok(())
    }

    #[must_use]
    pub fn client(&self, i: usize) -> Client {
        self.client_at(&self.hosts[i].api)
    }

    /// A client of the agent at `api`, with the cluster token (and TLS when the lab uses it).
    #[must_use]
    pub fn client_at(&self, api: &str) -> Client {
        let tls = self.opts.ca.as_ref().and_then(|ca| tandem_agent::tls::ClientTls::load(ca).ok());
        Client::new(api).with_token(Some(self.token())).with_tls(tls)
    }

    /// Cuts host `i`'s power: its agent and every workload it runs are SIGKILLed at once.
    pub fn power_off(&mut self, i: usize) {
        let name = self.hosts[i].name.clone();
        let mut pids: Vec<u32> = lab_processes(&self.id).into_iter().filter(|(_, env)| env.get("TANDEM_HOST") == Some(&name)).map(|(p, _)| p).collect();
        if let Some(c) = self.hosts[i].child.as_ref() {
            pids.insert(0, c.id());
        }
        for p in pids {
            kill_pid(p);
        }
        if let Some(mut c) = self.hosts[i].child.take() {
            let _ = c.wait();
        }
    }

    /// Kills only host `i`'s agent (SIGKILL); its workloads die through their parent-death signal.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].child.take() {
            kill_pid(c.id());
            let _ = c.wait();
        }
    }

    /// Whether host `i`'s agent was started and not killed by the lab.
    #[must_use]
    pub fn is_up(&self, i: usize) -> bool {
        self.hosts[i].child.is_some()
    }

    /// Reaps host `i`'s agent if something else killed it (a watchdog reset); true if it had died.
    pub fn reap(&mut self, i: usize) -> bool {
        let dead = self.hosts[i].child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
        if dead {
            self.hosts[i].child = None;
        }
        dead
    }

    /// PIDs of the workloads host `i` runs, read from /proc.
    #[must_use]
    pub fn workload_pids(&self, i: usize) -> Vec<(u32, String)> {
        let name = &self.hosts[i].name;
        lab_processes(&self.id)
            .into_iter()
            .filter(|(_, env)| env.get("TANDEM_HOST") == Some(name))
            .filter_map(|(p, env)| Some((p, env.get("TANDEM_VM")?.clone())))
            .collect()
    }

    /// The PID of host `i`'s agent process (for SIGSTOP and the like).
    #[must_use]
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.hosts[i].child.as_ref().map(Child::id)
    }

    /// Creates the cluster on host 0 and joins every other host, then waits until all are active.
    pub fn form_cluster(&self) -> Result<()> {
        let c0 = self.client(0);
        c0.wait_for(Duration::from_secs(30), Duration::from_millis(100), |c| c.get("/v1/status").ok())?;
        c0.send("POST", "/v1/cluster/init", &EmptyRequest {}).map_err(|e| anyhow!("cluster init: {e}"))?;
        for h in self.hosts.iter().skip(1) {
            let c = self.client_at(&h.api);
            c.wait_for(Duration::from_secs(30), Duration::from_millis(100), |c| c.get("/v1/status").ok())?;
            c0.wait_for(Duration::from_secs(30), Duration::from_millis(250), |c| {
                c.send("POST", "/v1/hosts/join", &JoinRequest { api_addr: h.api.clone() }).ok()
            })?;
        }
        self.wait_all_active(Duration::from_secs(30))
    }

    /// Has the recorder count two processes of a VM as a double run only when the hosts do not
    /// show all copies but one paused (live migration keeps a paused copy beside the running
    /// one): see `chaos::planned::paused_copies_judge`.
    pub fn judge_paused_copies(&self) {
        self.recorder.set_double_judge(crate::chaos::planned::paused_copies_judge(self));
    }

    /// The cluster token (admin), derived from the lab's cluster secret like the agents do.
    #[must_use]
    pub fn token(&self) -> String {
        let secret = std::fs::read(self.shared.join("secret")).unwrap_or_default();
        tandem_core::wire::ClusterKey::new(&secret).map(|k| k.peer_token()).unwrap_or_default()
    }

    /// Waits until every host is active in committed state and every running agent sees every
    /// other one alive — only then may the coordinator, whichever host it is, place on all of them.
    pub fn wait_all_active(&self, timeout: Duration) -> Result<()> {
        let n = self.hosts.len();
        self.client(0).wait_for(timeout, Duration::from_millis(100), |c| {
            let hosts = c.list_as::<HostView>("/v1/hosts").ok()?;
            (hosts.len() == n && hosts.iter().all(|h| h.status == HostStatus::Active)).then_some(())
        })?;
        for (i, h) in self.hosts.iter().enumerate() {
            if h.child.is_none() {
                continue;
            }
            self.client(i).wait_for(timeout, Duration::from_millis(100), |c| {
                let hosts = c.list_as::<HostView>("/v1/hosts").ok()?;
                (hosts.len() == n && hosts.iter().all(|h| matches!(h.liveness, LivenessView::Alive | LivenessView::Itself))).then_some(())
            })?;
        }
        Ok(())
    }

    /// The VM list as seen by host `i`.
    pub fn vms(&self, i: usize) -> Result<Vec<VmView>> {
        self.client(i).list_as("/v1/vms")
    }

    /// Where each VM is assigned, as seen by host `i`.
    pub fn placement(&self, i: usize) -> Result<BTreeMap<String, Option<String>>> {
        Ok(self.vms(i)?.into_iter().map(|v| (v.name, v.host)).collect())
    }

    /// The names of running workloads per host, read from /proc.
    #[must_use]
    pub fn running(&self) -> BTreeMap<String, String> {
        lab_processes(&self.id).into_iter().filter_map(|(_, env)| Some((env.get("TANDEM_VM")?.clone(), env.get("TANDEM_HOST")?.clone()))).collect()
    }

    /// Every workload process that is not stopped, as (VM, host); a VM may appear twice.
    #[must_use]
    pub fn running_instances(&self) -> Vec<(String, String)> {
        lab_processes(&self.id)
            .into_iter()
            .filter(|(pid, _)| !is_stopped(*pid))
            .filter_map(|(_, env)| Some((env.get("TANDEM_VM")?.clone(), env.get("TANDEM_HOST")?.clone())))
            .collect()
    }

    /// Every workload process, as (pid, VM).
    #[must_use]
    pub fn running_pids(&self) -> Vec<(u32, String)> {
        lab_processes(&self.id).into_iter().filter_map(|(pid, env)| Some((pid, env.get("TANDEM_VM")?.clone()))).collect()
    }

    /// Fails unless every VM running anywhere runs where committed state (as host `i` has it)
    /// assigns it: after a heal, nothing runs against committed state.
    pub fn assert_runs_as_committed(&self, i: usize) -> Result<()> {
        let placement = self.placement(i)?;
        for (vm, host) in self.running() {
            if placement.get(&vm) != Some(&Some(host.clone())) {
                bail!("{vm} runs on {host} against committed state ({:?})", placement.get(&vm));
            }
        }
        Ok(())
    }

    /// The fences host `i` recorded at or after `since_ms` (wall clock), their details.
    #[must_use]
    pub fn fences_since(&self, i: usize, since_ms: u64) -> Vec<String> {
        self.client(i)
            .list_as::<Event>("/v1/events?limit=4096")
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.kind == tandem_agent::events::EventKind::Fenced && e.at_ms >= since_ms)
            .map(|e| e.detail)
            .collect()
    }

    /// Events recorded by every live host, merged and sorted by time.
    pub fn events(&self) -> Vec<Event> {
        let mut all = Vec::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if h.child.is_none() {
                continue;
            }
            if let Ok(v) = self.client(i).list_as::<Event>("/v1/events?limit=4096") {
                all.extend(v);
            }
        }
        all.sort_by_key(|e| e.at_ms);
        all
    }

    /// Fails unless no VM ever ran on two hosts at once.
    pub fn assert_no_double_run(&self) -> Result<()> {
        let d = self.recorder.double_run_count();
        if d > 0 {
            let first = self.recorder.double_runs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).first().cloned();
            bail!("{d} moment(s) with a VM on two hosts; first: {first:?}");
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_witness();
        for h in &mut self.hosts {
            if let Some(mut c) = h.child.take() {
                kill_pid(c.id());
                let _ = c.wait();
            }
        }
        // Workloads die with their agent (parent-death signal); sweep any straggler of this lab.
        for _ in 0..50 {
            let left = lab_processes(&self.id);
            if left.is_empty() {
                break;
            }
            for (pid, _) in left {
                kill_pid(pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
