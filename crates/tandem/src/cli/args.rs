//! The command line: every command, subcommand and flag (clap).

use super::output::Output;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Tandem keeps QEMU/KVM virtual machines available: one agent per host, network and disk
/// heartbeats, self-fencing, and restart of protected VMs on the surviving hosts.
/// What every command's `--help` ends with, in the manner of a man page.
pub const MANUAL: &str = "\
ENVIRONMENT:
    TANDEM_API          the agent to talk to (ip:port), instead of --api
    TANDEM_TOKEN        API token (admin or read-only), instead of --token
    TANDEM_SECRET_FILE  cluster secret file; its derived cluster token is used (admin)
    RUST_LOG            log filter (default: warn; the agent also logs its own info lines)

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
pub struct Cli {
    /// Address of any agent's API (ip:port).
    #[arg(long, global = true, env = "TANDEM_API", default_value = "127.0.0.1:7400")]
    pub api: String,
    /// API token (admin or read-only; see `tandem token`).
    #[arg(long, global = true, env = "TANDEM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Use the cluster token derived from this cluster secret file (what the agents share).
    #[arg(long, global = true, env = "TANDEM_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Talk TLS to the agents, verifying them against this CA certificate (PEM).
    #[arg(long, global = true, env = "TANDEM_CA")]
    pub ca: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the agent of one host.
    Agent {
        /// The agent's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a network witness: the third vote (and, for clusters without shared storage, the
    /// heartbeat area) of the clusters its configuration names. It runs no VMs.
    Witness {
        /// The witness's TOML configuration (listen, data_dir, [tls], [[cluster]] name and
        /// secret_file).
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
    /// The recent failovers and where their seconds went: last evidence of life, declared
    /// dead, fence deadline, decided, committed, and each moved VM's start on its new host.
    Failovers {
        /// At most this many, newest first.
        #[arg(long, default_value_t = 5)]
        limit: usize,
        /// List every moved VM's start, not only the first, median and last.
        #[arg(long)]
        vms: bool,
    },
    /// Live migrations: those running (with progress where the host at --api drives them) and
    /// the last ones that host drove.
    Migrations,
    /// Live migrations that remove placement-rule violations and even out memory use: shows the
    /// plan, then (once confirmed) carries it out, at most --parallel moves at once.
    Rebalance(RebalanceArgs),
    /// What would happen if the given hosts, or every host of a site, failed together.
    Whatif {
        /// Host names, comma-separated (e.g. h1,h2).
        #[arg(long, value_delimiter = ',', required_unless_present = "fail_site", conflicts_with = "fail_site")]
        fail: Vec<String>,
        /// A site: all its hosts fail at once.
        #[arg(long)]
        fail_site: Option<String>,
    },
    /// Placement rules: affinity and anti-affinity groups of VMs.
    Rule {
        #[command(subcommand)]
        op: RuleOp,
    },
    /// The HA event timeline recorded by the agent at --api.
    Events(EventsArgs),
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
}

#[derive(Subcommand)]
pub enum TokenOp {
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
pub enum DiskOp {
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
pub enum ClusterOp {
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
        /// What a host's planned stop does with its VMs, for the whole cluster (`host`: each
        /// host's own `[shutdown] policy`).
        #[arg(long, value_parser = ["kill", "migrate", "shutdown", "freeze", "host"])]
        shutdown_policy: Option<String>,
        /// The target "survive the loss of one site", protected by admission control.
        #[arg(long)]
        survive_site_loss: Option<bool>,
        /// The site a network split keeps running when no side holds a majority (a cut
        /// between two sites, or between two hosts with their witness); `none` for the lowest
        /// host id.
        #[arg(long)]
        preferred_site: Option<String>,
        /// Apply even if admission control refuses (recorded as an admission-forced event).
        #[arg(long)]
        force: bool,
    },
}

/// `tandem rebalance`'s options.
#[derive(clap::Args, Clone, Debug)]
pub struct RebalanceArgs {
    /// Show the plan only.
    #[arg(long)]
    pub dry_run: bool,
    /// Carry it out without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Only this rule's violations.
    #[arg(long)]
    pub rule: Option<String>,
    /// Fix rule violations only; leave memory use as it is.
    #[arg(long)]
    pub no_balance: bool,
    /// Moves at once (the cluster allows at most 2 leaving or reaching a host, 8 in all).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub parallel: u32,
}

#[derive(Subcommand)]
pub enum RuleOp {
    /// Add or replace a rule. Refused when infeasible or in conflict with another hard rule.
    Add {
        name: String,
        /// affinity (together), anti-affinity (apart) or site (in the site of --site)
        #[arg(long, required_unless_present = "site")]
        kind: Option<String>,
        /// The site the VMs run in (a site rule: required with --hard, else preferred).
        #[arg(long)]
        site: Option<String>,
        /// Never broken (a VM stays down instead); without it, a preference.
        #[arg(long)]
        hard: bool,
        /// The VMs (two or more; one is enough for a site rule).
        #[arg(required = true, num_args = 1..)]
        vms: Vec<String>,
        /// Apply even if admission control refuses (recorded as an admission-forced event).
        #[arg(long)]
        force: bool,
        /// Then move the running VMs that break it (live migrations, as `rebalance --rule NAME`).
        #[arg(long)]
        enforce: bool,
    },
    List,
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum HostOp {
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
    /// A planned stop of the host's agent: `kill` (peers restart its VMs at once), `migrate`
    /// (they leave live first), `shutdown` (shut down cleanly and parked: back with the host, or
    /// elsewhere after its `restart_elsewhere_after_s`) or `freeze` (shut down and parked until
    /// it returns). Without --policy, the host's configured one. Followed until it has left.
    Shutdown {
        name: String,
        #[arg(long, value_parser = ["kill", "migrate", "shutdown", "freeze"])]
        policy: Option<String>,
        /// Return once the stop has begun.
        #[arg(long)]
        no_wait: bool,
    },
    /// Maintenance by live migration: `enter` shows where each VM goes, puts the host in
    /// maintenance and follows its evacuation (VMs leave live, two at a time, highest priority
    /// first); `exit` puts it back in normal mode and follows its VMs' return.
    Maintenance {
        #[arg(value_parser = ["enter", "exit"])]
        action: String,
        name: String,
        /// Enter even if admission control refuses, or some VM cannot move live (it then keeps
        /// running on the host).
        #[arg(long)]
        force: bool,
        /// VMs whose live migration keeps failing are shut down cleanly and started on another
        /// host instead of staying (`enter` only; the CLI does it while it follows).
        #[arg(long)]
        shutdown_unmovable: bool,
        /// Return once the mode is set, without following the migrations.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
pub enum VmOp {
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
    /// Live-migrate a running VM to another host (named, or the roomiest that may take it) and
    /// follow it to the end; or cancel the migration in progress.
    Migrate {
        name: String,
        /// The destination host.
        #[arg(long)]
        to: Option<String>,
        /// Apply even if admission control refuses (admin token; recorded as an event).
        #[arg(long)]
        force: bool,
        /// Cancel the VM's migration in progress instead (it runs on at its source).
        #[arg(long, conflicts_with_all = ["to", "force", "no_wait"])]
        cancel: bool,
        /// Return once the migration is committed to begin, without following it.
        #[arg(long)]
        no_wait: bool,
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
    /// A VM's disks mirrored between sites: current copies, and each mirror's state at its host.
    Mirrors { name: String },
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// VM name (ignored with --spec).
    pub name: Option<String>,
    /// A JSON or TOML VM spec file.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long, default_value_t = 128)]
    pub memory_mib: u64,
    /// protect | best-effort | off
    #[arg(long, default_value = "protect")]
    pub protection: String,
    /// Higher restarts first.
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// Restart order group 0-9: after a host failure, higher groups start after the lower ones run.
    #[arg(long, default_value_t = 0)]
    pub group: u8,
    /// QEMU: kernel image.
    #[arg(long)]
    pub kernel: Option<String>,
    /// QEMU: initrd.
    #[arg(long)]
    pub initrd: Option<String>,
    /// QEMU: kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// QEMU: the guest runs the QEMU guest agent (a clean stop asks it first, then ACPI).
    #[arg(long)]
    pub guest_agent: bool,
    /// QEMU: let a live migration switch to post-copy — `when-stalled` (the convergence
    /// schedule's last step, instead of cancelling) or `after-first-pass`; `off` by default. In
    /// post-copy the guest needs both hosts until its last page arrived: losing either restarts
    /// it from its disk.
    #[arg(long, default_value = "off", value_parser = ["off", "when-stalled", "after-first-pass"])]
    pub postcopy: String,
    /// QEMU: a disk image on shared storage (repeatable).
    #[arg(long)]
    pub disk: Vec<String>,
    /// QEMU: a disk image on each host's own storage, relative to its `[qemu] local_disk_dir`
    /// (repeatable): copied by live migration; HA cannot restart the VM elsewhere.
    #[arg(long)]
    pub local_disk: Vec<String>,
    /// QEMU: a disk image mirrored between sites, relative to each host's `[qemu]
    /// site_disk_dir` (repeatable): every write goes to every site's copy; HA restarts the VM
    /// only at a site whose copy is current.
    #[arg(long)]
    pub mirrored_disk: Vec<String>,
    /// QEMU user networking port forward, e.g. tcp:{host_ip}:8080-:80 (repeatable).
    #[arg(long, conflicts_with = "bridge")]
    pub hostfwd: Vec<String>,
    /// QEMU: join this bridge (one the hosts' `[qemu] bridges` allow) with the VM's own MAC, so
    /// its address follows it from host to host.
    #[arg(long, requires = "mac")]
    pub bridge: Option<String>,
    /// With --bridge: the VM's MAC address, e.g. 52:54:00:12:34:01.
    #[arg(long, requires = "bridge")]
    pub mac: Option<String>,
    /// With --bridge: the guest's address, IP/PREFIX (a kernel-booted guest gets it as
    /// `tandem.ip=` on its command line).
    #[arg(long, requires = "bridge")]
    pub address: Option<String>,
    /// How to tell that the VM's service answers: tcp:ADDR:PORT or http://ADDR:PORT/PATH, ADDR
    /// an IPv4 address or {host_ip} (the running host's).
    #[arg(long)]
    pub probe: Option<String>,
    /// With an http probe: text the answer must contain.
    #[arg(long, requires = "probe")]
    pub probe_expect: Option<String>,
    /// Process driver: the command to run (everything after --).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// `tandem events`' filters and modes.
#[derive(clap::Args)]
pub struct EventsArgs {
    /// Only events after this sequence number.
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Only events about this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only events recorded by, or about, this host.
    #[arg(long)]
    pub host: Option<String>,
    /// Only events of this kind (peer-dead, fenced, failover-committed, vm-started, ...).
    #[arg(long)]
    pub kind: Option<String>,
    /// Keep printing new events as they are recorded (Ctrl-C ends).
    #[arg(long)]
    pub follow: bool,
    /// Merge the timelines of every host in the cluster (each agent records its own), in
    /// time order: a failover's whole story, from the coordinator and the hosts that restart
    /// the VMs, in one list.
    #[arg(long)]
    pub cluster: bool,
}
