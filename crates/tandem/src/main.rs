//! `tandem`: the agent, the CLI and the demo in one binary.

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::path::PathBuf;
use tandem::client::{Client, ClientError};
use tandem_core::state::{DriverSpec, NetworkSpec, Protection, VmSpec};

/// Tandem keeps QEMU/KVM virtual machines available: one agent per host, network and disk
/// heartbeats, self-fencing, and restart of protected VMs on the surviving hosts.
/// What every command's `--help` ends with, in the manner of a man page.
const MANUAL: &str = "\
ENVIRONMENT:
    TANDEM_API          the agent to talk to (ip:port), instead of --api
    TANDEM_TOKEN        API token (admin or read-only), instead of --token
    TANDEM_SECRET_FILE  cluster secret file; its derived cluster token is used (admin)
    RUST_LOG            log filter for agent, sim and chaos (default: warn)

EXIT STATUS:
    0   success
    1   refused by the cluster: bad input, unknown name, conflict, admission control,
        missing or insufficient token; the message says which
    2   usage error, or the agent could not start (bad configuration)
    3   the agent is unreachable or the cluster has no quorum: retrying may help

OUTPUT:
    Tables by default; --output json prints the API's JSON unchanged (events --follow prints
    one JSON object per line).

SEE ALSO:
    README.md (concepts, configuration), docs/openapi.json (the API), tandem openapi";

#[derive(Parser)]
#[command(name = "tandem", version, about, long_about = None, after_long_help = MANUAL, propagate_version = true)]
struct Cli {
    /// Address of any agent's API (ip:port).
    #[arg(long, global = true, env = "TANDEM_API", default_value = "127.0.0.1:7400")]
    api: String,
    /// API token (admin or read-only; see `tandem token`).
    #[arg(long, global = true, env = "TANDEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Use the cluster token derived from this cluster secret file (what the agents share).
    #[arg(long, global = true, env = "TANDEM_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// Talk TLS to the agents, verifying them against this CA certificate (PEM).
    #[arg(long, global = true, env = "TANDEM_CA")]
    ca: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent of one host.
    Agent {
        /// The agent's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// The shared heartbeat disk: format it once, before the first agent starts.
    Disk {
        #[command(subcommand)]
        op: DiskOp,
    },
    /// Cluster-wide operations.
    Cluster {
        #[command(subcommand)]
        op: ClusterOp,
    },
    /// Hosts.
    Host {
        #[command(subcommand)]
        op: HostOp,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        op: VmOp,
    },
    /// Failures to tolerate: how many simultaneous host failures every protected VM survives.
    Ftt,
    /// For each single host failure: where every VM would restart and which would stay down.
    Plan,
    /// What would happen if the given hosts failed together.
    Whatif {
        /// Host names, comma-separated (e.g. h1,h2).
        #[arg(long, value_delimiter = ',', required = true)]
        fail: Vec<String>,
    },
    /// Placement rules: affinity and anti-affinity groups of VMs.
    Rule {
        #[command(subcommand)]
        op: RuleOp,
    },
    /// Benchmarks (figures printed; nothing asserted).
    Bench {
        #[command(subcommand)]
        op: BenchOp,
    },
    /// The HA event timeline recorded by the agent at --api.
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Only events about this VM.
        #[arg(long)]
        vm: Option<String>,
        /// Only events recorded by, or about, this host.
        #[arg(long)]
        host: Option<String>,
        /// Only events of this kind (peer-dead, fenced, failover-committed, vm-started, ...).
        #[arg(long)]
        kind: Option<String>,
        /// Keep printing new events as they are recorded (Ctrl-C ends).
        #[arg(long)]
        follow: bool,
        /// Merge the timelines of every host in the cluster (each agent records its own), in
        /// time order: a failover's whole story, from the coordinator and the hosts that restart
        /// the VMs, in one list.
        #[arg(long)]
        cluster: bool,
    },
    /// API tokens: admin (read and write) or read-only; only their hash is stored.
    Token {
        #[command(subcommand)]
        op: TokenOp,
    },
    /// Print the OpenAPI description of the agent API.
    Openapi,
    /// Print a shell completion script: tandem completions bash > /etc/bash_completion.d/tandem
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Start a three-host cluster on this machine, cut one host's power, and measure recovery.
    Demo(tandem::demo::DemoArgs),
    /// Real fault injection (root): agents in network namespaces, seeded faults, invariant checks.
    Chaos(tandem::chaos::ChaosArgs),
    /// Deterministic simulation of whole clusters (real agents, simulated world), seed by seed.
    Sim(tandem::sim::SimArgs),
}

#[derive(Subcommand)]
enum TokenOp {
    /// Make a token; it is printed once and cannot be shown again.
    Create {
        name: String,
        /// admin (everything) | operator (start, stop, clear VMs; reads) | read-only
        #[arg(long, default_value = "read-only")]
        role: String,
    },
    /// Token names and roles.
    List,
    /// Revoke a token.
    Delete { name: String },
}

#[derive(Subcommand)]
enum DiskOp {
    /// Write the header (cluster fingerprint, layout) and empty slots to the agent's
    /// `heartbeat_disk`. Agents refuse a disk that was not formatted for their cluster. A disk
    /// that already carries a header is refused unless --force (it erases live slots: only while
    /// no agent runs).
    Format {
        /// An agent configuration naming the disk and the cluster secret.
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ClusterOp {
    /// Make the agent at --api the first host of a new cluster.
    Init,
    /// Consensus and runtime status of the agent at --api.
    Status,
    /// Show the cluster settings.
    Settings,
    /// Change cluster settings; refused if it would break the FTT target unless --force.
    Set {
        /// Failures-to-tolerate target protected by admission control (`none` to clear).
        #[arg(long)]
        ftt_target: Option<String>,
        /// vCPUs offered per physical vCPU, in percent (100..=1600).
        #[arg(long)]
        vcpu_overcommit_pct: Option<u32>,
        /// GROUP=SECONDS: how long restart group GROUP waits for the lower groups to run before
        /// it starts anyway (GROUP=default restores 120 s; repeatable).
        #[arg(long)]
        group_delay: Vec<String>,
        /// Apply even if admission control refuses (recorded as an admission-forced event).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum RuleOp {
    /// Add or replace a rule. Refused when infeasible or in conflict with another hard rule.
    Add {
        name: String,
        /// affinity (together) or anti-affinity (apart)
        #[arg(long)]
        kind: String,
        /// Never broken (a VM stays down instead); without it, a preference.
        #[arg(long)]
        hard: bool,
        /// The VMs (two or more).
        #[arg(required = true, num_args = 2..)]
        vms: Vec<String>,
        /// Apply even if admission control refuses (recorded as an admission-forced event).
        #[arg(long)]
        force: bool,
    },
    List,
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum BenchOp {
    /// FTT and failover plans for large synthetic clusters, and the approximation's gap.
    Placement {
        /// Repetitions per figure (medians are printed).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Heartbeat jitter of one real agent kept busy on a 64-host, 100,000-VM state (/v1/plan,
    /// /v1/ftt, /metrics in a loop, and commands judged by admission control); the other 63
    /// hosts are played by this process.
    Liveness {
        /// VMs in the state.
        #[arg(long, default_value_t = 100_000)]
        vms: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Concurrent clients requesting the heavy endpoints.
        #[arg(long, default_value_t = 2)]
        readers: usize,
    },
}

#[derive(Subcommand)]
enum HostOp {
    /// Add the agent listening at API_ADDR to the cluster.
    Join { api_addr: String },
    /// Hosts, with each one's liveness as seen by the agent at --api.
    List,
    /// Set a host's mode: normal, maintenance (no new VMs) or disabled. Refused if it would
    /// break the FTT target unless --force.
    Mode {
        name: String,
        mode: String,
        /// Apply even if admission control refuses (recorded as an admission-forced event).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum VmOp {
    /// Create a VM (stopped) from a spec file or from flags.
    Create(Box<CreateArgs>),
    /// Ask the cluster to run a VM. Refused if it would break the FTT target unless --force.
    Start {
        name: String,
        /// Apply even if admission control refuses (recorded as an admission-forced event).
        #[arg(long)]
        force: bool,
    },
    /// Change a VM's size, protection or priority. Refused if it would break the FTT target
    /// unless --force.
    Update {
        name: String,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        /// protect | best-effort | off
        #[arg(long)]
        protection: Option<String>,
        #[arg(long)]
        priority: Option<i32>,
        /// Restart order group 0-9.
        #[arg(long)]
        group: Option<u8>,
        /// Apply even if admission control refuses (recorded as an admission-forced event).
        #[arg(long)]
        force: bool,
    },
    /// Ask the cluster to stop a VM (ACPI power-down, then kill after the stop timeout).
    Stop { name: String },
    /// Delete a stopped VM.
    Delete { name: String },
    /// Clear a VM's error state and failure history (after fixing the cause; then start it).
    Clear { name: String },
    /// List VMs.
    List,
    /// Show one VM.
    Show { name: String },
}

#[derive(clap::Args)]
struct CreateArgs {
    /// VM name (ignored with --spec).
    name: Option<String>,
    /// A JSON or TOML VM spec file.
    #[arg(long)]
    spec: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// protect | best-effort | off
    #[arg(long, default_value = "protect")]
    protection: String,
    /// Higher restarts first.
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Restart order group 0-9: after a host failure, higher groups start after the lower ones run.
    #[arg(long, default_value_t = 0)]
    group: u8,
    /// QEMU: kernel image.
    #[arg(long)]
    kernel: Option<String>,
    /// QEMU: initrd.
    #[arg(long)]
    initrd: Option<String>,
    /// QEMU: kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// QEMU: a disk image on shared storage (repeatable).
    #[arg(long)]
    disk: Vec<String>,
    /// QEMU user networking port forward, e.g. tcp:{host_ip}:8080-:80 (repeatable).
    #[arg(long)]
    hostfwd: Vec<String>,
    /// Process driver: the command to run (everything after --).
    #[arg(last = true)]
    command: Vec<String>,
}

fn spec_from(args: &CreateArgs) -> Result<VmSpec> {
    if let Some(path) = &args.spec {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let spec: VmSpec = if is_toml {
            toml_spec(&text).with_context(|| format!("parsing {}", path.display()))?
        } else {
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        };
        return Ok(spec);
    }
    let name = args.name.clone().ok_or_else(|| anyhow!("a VM name or --spec FILE is required"))?;
    let protection: Protection = args.protection.parse().map_err(|e: String| anyhow!(e))?;
    let driver = if args.command.is_empty() {
        DriverSpec::Qemu { kernel: args.kernel.clone(), initrd: args.initrd.clone(), cmdline: args.cmdline.clone(), extra_args: vec![] }
    } else {
        DriverSpec::Process { command: args.command.clone() }
    };
    let network = (!args.hostfwd.is_empty()).then(|| NetworkSpec::User { hostfwd: args.hostfwd.clone() });
    let disks = args.disk.iter().map(|p| tandem_core::state::DiskSpec { path: p.clone(), format: None, readonly: false }).collect();
    Ok(VmSpec { name, vcpus: args.vcpus, memory_mib: args.memory_mib, disks, network, protection, priority: args.priority, restart_group: args.group, driver })
}

fn toml_spec(text: &str) -> Result<VmSpec> {
    // TOML → JSON value → spec, so both formats share one schema.
    let v: toml_value::Value = toml_value::parse(text)?;
    Ok(serde_json::from_value(v)?)
}

/// The agent crate already parses TOML; reuse it through serde_json's Value.
mod toml_value {
    pub type Value = serde_json::Value;
    pub fn parse(text: &str) -> anyhow::Result<Value> {
        Ok(tandem_agent::config::toml_to_json(text)?)
    }
}

/// Wall-clock milliseconds since the Unix epoch as HH:MM:SS.mmm (UTC).
fn clock_time(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!("{:02}:{:02}:{:02}.{:03}", day_ms / 3_600_000, day_ms / 60_000 % 60, day_ms / 1000 % 60, day_ms % 1000)
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(String::len).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, s)| format!("{s:<w$}", w = widths[i])).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

fn show(out: Output, v: &Value, table: impl FnOnce(&Value)) {
    match out {
        Output::Json => println!("{v}"),
        Output::Table => table(v),
    }
}

fn usage(message: impl std::fmt::Display) -> ClientError {
    ClientError::Usage(message.to_string())
}

fn print_plans(v: &Value) {
    for p in v.as_array().into_iter().flatten() {
        let failed: Vec<String> = p["failed"].as_array().into_iter().flatten().map(s).collect();
        println!("if {} fail{}:", failed.join(" and "), if failed.len() == 1 { "s" } else { "" });
        if let Some(note) = p["note"].as_str() {
            println!("  {note}");
        }
        let mut rows = vec![["  VM", "RESTARTS ON"].map(String::from).to_vec()];
        for r in p["restarts"].as_array().into_iter().flatten() {
            rows.push(vec![format!("  {}", s(&r["vm"])), s(&r["host"])]);
        }
        for r in p["left_down"].as_array().into_iter().flatten() {
            rows.push(vec![format!("  {}", s(&r["vm"])), format!("stays down ({})", s(&r["reason"]))]);
        }
        if rows.len() == 1 {
            println!("  nothing to restart");
        } else {
            print_table(&rows);
        }
    }
}

fn cli_token(cli: &Cli) -> Result<Option<String>, ClientError> {
    if let Some(t) = &cli.token {
        return Ok(Some(t.clone()));
    }
    let Some(path) = &cli.secret_file else { return Ok(None) };
    let bytes = std::fs::read(path).map_err(|e| usage(format!("cannot read secret file {}: {e}", path.display())))?;
    let key = tandem_core::wire::ClusterKey::new(&bytes).map_err(|e| usage(format!("secret file {}: {e}", path.display())))?;
    Ok(Some(key.peer_token()))
}

fn run_client(cli: &Cli) -> Result<(), ClientError> {
    let tls = match &cli.ca {
        Some(ca) => Some(tandem_agent::tls::ClientTls::load(ca).map_err(|e| usage(format!("{:#}", anyhow::Error::new(e))))?),
        None => None,
    };
    let c = Client::new(&cli.api).with_token(cli_token(cli)?).with_tls(tls);
    let out = cli.output;
    let kv = |v: &Value| {
        if let Some(m) = v.as_object() {
            for (k, x) in m {
                println!("{k}: {}", s(x));
            }
        }
    };
    match &cli.command {
        Cmd::Agent { .. } | Cmd::Disk { .. } | Cmd::Demo(_) | Cmd::Chaos(_) | Cmd::Sim(_) | Cmd::Bench { .. } => Ok(()),
        Cmd::Cluster { op: ClusterOp::Settings } => {
            let v = c.get("/v1/settings")?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Cluster { op: ClusterOp::Set { ftt_target, vcpu_overcommit_pct, group_delay, force } } => {
            let mut body = json!({ "force": force });
            if let Some(t) = ftt_target {
                body["ftt_target"] = if t == "none" {
                    Value::Null
                } else {
                    json!(t.parse::<u32>().map_err(|_| usage(format!("--ftt-target '{t}' is not a number or 'none'")))?)
                };
            }
            if let Some(p) = vcpu_overcommit_pct {
                body["vcpu_overcommit_pct"] = json!(p);
            }
            let mut delays = serde_json::Map::new();
            for g in group_delay {
                let bad = || usage(format!("--group-delay '{g}' is not GROUP=SECONDS or GROUP=default"));
                let (group, secs) = g.split_once('=').ok_or_else(bad)?;
                let group: u8 = group.parse().map_err(|_| bad())?;
                let ms = if secs == "default" {
                    Value::Null
                } else {
                    let secs: f64 = secs.parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0).ok_or_else(bad)?;
                    json!((secs * 1000.0).round() as u64)
                };
                delays.insert(group.to_string(), ms);
            }
            if !delays.is_empty() {
                body["group_delays_ms"] = Value::Object(delays);
            }
            let v = c.post("/v1/settings", &body)?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Host { op: HostOp::Mode { name, mode, force } } => {
            let v = c.post(&format!("/v1/hosts/{name}/mode"), &json!({ "mode": mode, "force": force }))?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Ftt => {
            let v = c.get("/v1/ftt")?;
            show(out, &v, |v| {
                let r = &v["report"];
                let exact = if r["exact"] == true { "exact" } else { "lower bound" };
                println!("failures to tolerate: {} ({exact}; limited by {})", s(&r["ftt"]), s(&r["limited_by"]));
                println!("target: {}", s(&v["target"]));
                println!("failure sets checked: {} (every set up to {} host(s))", s(&r["sets_checked"]), s(&r["checked_up_to"]));
                if let Some(c) = r["counterexample"].as_array() {
                    println!("breaks when hosts {} fail: {} could not restart", s(&c[0]), s(&c[1]));
                }
            });
            Ok(())
        }
        Cmd::Plan => {
            let v = c.get("/v1/plan")?;
            show(out, &v, print_plans);
            Ok(())
        }
        Cmd::Whatif { fail } => {
            let v = c.get(&format!("/v1/plan?fail={}", fail.join(",")))?;
            show(out, &v, print_plans);
            Ok(())
        }
        Cmd::Rule { op: RuleOp::Add { name, kind, hard, vms, force } } => {
            let v = c.post("/v1/rules", &json!({ "name": name, "kind": kind, "hard": hard, "vms": vms, "force": force }))?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Rule { op: RuleOp::List } => {
            let v = c.get("/v1/rules")?;
            show(out, &v, |v| {
                let mut rows = vec![["NAME", "KIND", "HARD", "VMS"].map(String::from).to_vec()];
                for r in v.as_array().into_iter().flatten() {
                    let vms: Vec<String> = r["vms"].as_array().into_iter().flatten().map(s).collect();
                    rows.push(vec![s(&r["name"]), s(&r["kind"]), s(&r["hard"]), vms.join(",")]);
                }
                print_table(&rows);
            });
            Ok(())
        }
        Cmd::Rule { op: RuleOp::Delete { name } } => {
            let v = c.call("DELETE", &format!("/v1/rules/{name}"), None)?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Cluster { op: ClusterOp::Init } => {
            let v = c.post("/v1/cluster/init", &json!({}))?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Cluster { op: ClusterOp::Status } => {
            let v = c.get("/v1/status")?;
            show(out, &v, |v| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()));
            Ok(())
        }
        Cmd::Host { op: HostOp::Join { api_addr } } => {
            let v = c.post("/v1/hosts/join", &json!({ "api_addr": api_addr }))?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Host { op: HostOp::List } => {
            let v = c.get("/v1/hosts")?;
            show(out, &v, |v| {
                let mut rows =
                    vec![["ID", "NAME", "STATUS", "EPOCH", "LIVENESS", "NET AGE", "DISK AGE", "VCPU", "MEMORY MiB", "LEADER"].map(String::from).to_vec()];
                for h in v.as_array().into_iter().flatten() {
                    let age = |x: &Value| x.as_u64().map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
                    rows.push(vec![
                        s(&h["id"]),
                        s(&h["name"]),
                        s(&h["status"]),
                        s(&h["epoch"]),
                        s(&h["liveness"]),
                        age(&h["net_age_ms"]),
                        age(&h["disk_age_ms"]),
                        format!("{}/{}", s(&h["used"]["vcpus"]), s(&h["capacity"]["vcpus"])),
                        format!("{}/{}", s(&h["used"]["memory_mib"]), s(&h["capacity"]["memory_mib"])),
                        if h["leader"] == true { "*".into() } else { String::new() },
                    ]);
                }
                print_table(&rows);
            });
            Ok(())
        }
        Cmd::Vm { op } => match op {
            VmOp::Create(args) => {
                let spec = spec_from(args).map_err(|e| ClientError::Refused { status: 400, message: format!("{e:#}") })?;
                let v = c.post("/v1/vms", &serde_json::to_value(&spec).map_err(|e| ClientError::Refused { status: 400, message: e.to_string() })?)?;
                show(out, &v, kv);
                Ok(())
            }
            VmOp::Start { name, force } => {
                let v = c.post(&format!("/v1/vms/{name}/start"), &json!({ "force": force }))?;
                show(out, &v, kv);
                Ok(())
            }
            VmOp::Update { name, vcpus, memory_mib, protection, priority, group, force } => {
                let current = c.get(&format!("/v1/vms/{name}"))?;
                let mut spec = current["spec"].clone();
                if let Some(x) = vcpus {
                    spec["vcpus"] = json!(x);
                }
                if let Some(x) = memory_mib {
                    spec["memory_mib"] = json!(x);
                }
                if let Some(x) = protection {
                    let p: Protection = x.parse().map_err(usage)?;
                    spec["protection"] = json!(p);
                }
                if let Some(x) = priority {
                    spec["priority"] = json!(x);
                }
                if let Some(x) = group {
                    spec["restart_group"] = json!(x);
                }
                let v = c.call("PUT", &format!("/v1/vms/{name}"), Some(&json!({ "spec": spec, "force": force })))?;
                show(out, &v, kv);
                Ok(())
            }
            VmOp::Stop { name } => {
                let v = c.post(&format!("/v1/vms/{name}/stop"), &json!({}))?;
                show(out, &v, kv);
                Ok(())
            }
            VmOp::Clear { name } => {
                let v = c.post(&format!("/v1/vms/{name}/clear"), &json!({}))?;
                show(out, &v, kv);
                Ok(())
            }
            VmOp::Delete { name } => {
                let v = c.call("DELETE", &format!("/v1/vms/{name}"), None)?;
                show(out, &v, kv);
                Ok(())
            }
            VmOp::Show { name } => {
                let v = c.get(&format!("/v1/vms/{name}"))?;
                show(out, &v, |v| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()));
                Ok(())
            }
            VmOp::List => {
                let v = c.get("/v1/vms")?;
                show(out, &v, |v| {
                    let mut rows = vec![["NAME", "PROTECTION", "PRIORITY", "VCPU", "MEMORY MiB", "DESIRED", "HOST", "GENERATION", "ERROR / WAITING"]
                        .map(String::from)
                        .to_vec()];
                    for x in v.as_array().into_iter().flatten() {
                        rows.push(vec![
                            s(&x["name"]),
                            s(&x["protection"]),
                            s(&x["priority"]),
                            s(&x["vcpus"]),
                            s(&x["memory_mib"]),
                            s(&x["desired"]),
                            s(&x["host"]),
                            s(&x["generation"]),
                            if x["error"].is_null() { s(&x["waiting"]) } else { s(&x["error"]) },
                        ]);
                    }
                    print_table(&rows);
                });
                Ok(())
            }
        },
        Cmd::Events { after, vm, host, kind, follow, cluster } => {
            let mut filter = String::new();
            for (k, v) in [("vm", vm), ("host", host), ("kind", kind)] {
                if let Some(v) = v {
                    filter.push_str(&format!("&{k}={v}"));
                }
            }
            // One (agent, last seq seen) per timeline read.
            let mut sources: Vec<(Client, u64)> = if *cluster {
                c.get("/v1/hosts")?
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|h| h["api_addr"].as_str())
                    .map(|a| (Client { addr: a.to_string(), timeout: std::time::Duration::from_secs(5), ..c.clone() }, *after))
                    .collect()
            } else {
                vec![(c.clone(), *after)]
            };
            loop {
                let mut list = Vec::new();
                for (src, after) in &mut sources {
                    match src.get(&format!("/v1/events?after={after}{filter}")) {
                        Ok(v) => {
                            let got = v.as_array().cloned().unwrap_or_default();
                            *after = got.iter().filter_map(|e| e["seq"].as_u64()).max().unwrap_or(*after);
                            list.extend(got);
                        }
                        Err(e) if *cluster => eprintln!("tandem: events of {} not read: {e}", src.addr),
                        Err(e) => return Err(e),
                    }
                }
                list.sort_by_key(|e| (e["at_ms"].as_u64().unwrap_or(0), e["seq"].as_u64().unwrap_or(0)));
                match out {
                    // One JSON object per line when following, so it can be piped.
                    Output::Json if *follow => list.iter().for_each(|e| println!("{e}")),
                    Output::Json => println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default()),
                    Output::Table => {
                        for e in &list {
                            let at = e["at_ms"].as_u64().map_or_else(String::new, clock_time);
                            println!("{:>6} {at} {:<10} {:<22} {}", s(&e["seq"]), s(&e["host"]), s(&e["kind"]), s(&e["detail"]));
                        }
                    }
                }
                if !*follow {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "tandem", &mut script);
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(())
        }
        Cmd::Openapi => {
            println!("{}", serde_json::to_string_pretty(&tandem_agent::endpoints::openapi()).unwrap_or_default());
            Ok(())
        }
        Cmd::Token { op: TokenOp::Create { name, role } } => {
            let role: tandem_core::state::Role = role.parse().map_err(usage)?;
            let v = c.post("/v1/tokens", &json!({ "name": name, "role": role }))?;
            show(out, &v, |v| {
                println!("token {} ({}) created; it is shown only now:", s(&v["name"]), s(&v["role"]));
                println!("{}", s(&v["token"]));
            });
            Ok(())
        }
        Cmd::Token { op: TokenOp::List } => {
            let v = c.get("/v1/tokens")?;
            show(out, &v, |v| {
                let mut rows = vec![vec!["NAME".to_string(), "ROLE".to_string()]];
                rows.extend(v.as_array().into_iter().flatten().map(|t| vec![s(&t["name"]), s(&t["role"])]));
                print_table(&rows);
            });
            Ok(())
        }
        Cmd::Token { op: TokenOp::Delete { name } } => {
            let v = c.call("DELETE", &format!("/v1/tokens/{name}"), None)?;
            show(out, &v, kv);
            Ok(())
        }
    }
}

/// Log stamps in the simulator's virtual seconds, to line up with its trace.
struct SimulatedTime;

impl tracing_subscriber::fmt::time::FormatTime for SimulatedTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match tandem_sim::simulated_seconds() {
            Some(s) => write!(w, "{s:>9.3}"),
            None => write!(w, "{:>9}", "-"),
        }
    }
}

/// Gives every subcommand's long help the manual's sections.
fn with_manual(cmd: clap::Command) -> clap::Command {
    cmd.after_long_help(MANUAL).mut_subcommands(with_manual)
}

fn main() {
    let matches = with_manual(<Cli as clap::CommandFactory>::command()).get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let simulating = matches!(cli.command, Cmd::Sim(_) | Cmd::Bench { .. });
    // The simulator drives the real consensus library through thousands of injected faults; its
    // complaints about them (failed RPCs) are expected, so only Tandem's own errors show unless
    // RUST_LOG asks for more.
    let agent = matches!(cli.command, Cmd::Agent { .. });
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| {
        if simulating {
            "error,openraft=off"
        } else if agent {
            "warn,tandem=info,tandem_agent=info"
        } else {
            "warn"
        }
        .into()
    });
    let logs = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).with_writer(std::io::stderr);
    let _ = if simulating { logs.with_timer(SimulatedTime).try_init() } else { logs.try_init() };
    let code = match &cli.command {
        Cmd::Disk { op: DiskOp::Format { config, force } } => match tandem::agent_cmd::format_disk(config, *force) {
            Ok(path) => {
                println!("formatted {path} as this cluster's heartbeat disk");
                0
            }
            Err(e) => {
                eprintln!("tandem disk format: {e:#}");
                1
            }
        },
        Cmd::Agent { config } => match tandem::agent_cmd::run_agent(config) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tandem agent: {e:#}");
                2
            }
        },
        Cmd::Bench { op } => {
            let r = match op {
                BenchOp::Placement { runs } => tandem::bench::placement(*runs),
                BenchOp::Liveness { vms, seconds, readers } => {
                    tandem::bench::liveness::run(tandem::bench::liveness::LivenessBench { vms: *vms, seconds: *seconds, readers: *readers })
                }
            };
            match r {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("tandem bench: {e:#}");
                    1
                }
            }
        }
        Cmd::Sim(args) => match tandem::sim::run(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tandem sim: {e:#}");
                1
            }
        },
        Cmd::Chaos(args) => match tandem::chaos::run(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tandem chaos: {e:#}");
                1
            }
        },
        Cmd::Demo(args) => match tandem::demo::run(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tandem demo: {e:#}");
                1
            }
        },
        _ => match run_client(&cli) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tandem: {e}");
                e.exit_code()
            }
        },
    };
    std::process::exit(code);
}
