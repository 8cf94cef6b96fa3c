//! `tandem-lab`: the demo, the fault suite, the simulator and the benchmarks. It runs the
//! operator's `tandem` binary (built beside it) as its agents.

use clap::{Parser, Subcommand};

/// Tandem's laboratory: clusters of real agents on this machine, faults, simulation, figures.
#[derive(Parser)]
#[command(name = "tandem-lab", version)]
struct LabCli {
    #[command(subcommand)]
    command: LabCmd,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Start a three-host cluster on this machine, cut one host's power, and measure recovery.
    Demo(tandem_lab::demo::DemoArgs),
    /// Real fault injection (root): agents in network namespaces, seeded faults, invariant checks.
    Chaos(tandem_lab::chaos::ChaosArgs),
    /// Deterministic simulation of whole clusters (real agents, simulated world), seed by seed.
    Sim(tandem_lab::sim::SimArgs),
    /// Benchmarks (figures printed; nothing asserted).
    Bench {
        #[command(subcommand)]
        op: BenchOp,
    },
}

#[derive(Subcommand)]
enum BenchOp {
    /// What liveness costs with N real agents on loopback (no VMs): CPU per agent, heartbeats
    /// per second, and whether any host fenced itself while the cluster grew.
    Heartbeat {
        /// Agents (2 to 64).
        #[arg(long, default_value_t = 16)]
        hosts: u32,
        /// Seconds of measurement.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Keep the lab directory (configs, agent logs, event files) after the run.
        #[arg(long)]
        keep: bool,
    },
    /// Power-loss rounds on a local three-host cluster: median, min and max of detection,
    /// restart committed, restarted and answering.
    Failover {
        /// Rounds (a fresh cluster each).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[command(flatten)]
        demo: tandem_lab::demo::DemoArgs,
    },
    /// FTT and failover plans for large synthetic clusters, and the approximation's gap.
    Placement {
        /// Repetitions per figure (medians are printed).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Live migrations of one VM around a local 3-host cluster: whole time, QEMU's total and
    /// downtime, and the longest HTTP gap a client polling every 20 ms saw.
    Migration {
        /// `qemu` (the test guest) or `process`.
        #[arg(long, default_value = "qemu")]
        driver: String,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Where the test guest's vmlinuz and initrd.img are.
        #[arg(long, default_value = ".cache/guest")]
        guest_dir: std::path::PathBuf,
        /// The migration bandwidth cap, MiB/s (the agents' `[migration] max_bandwidth_mib_s`).
        #[arg(long, default_value_t = 1024)]
        max_bandwidth_mib_s: u64,
        /// QEMU: give the guest a writable local disk of this size, MiB (each host's own copy,
        /// mirrored by every migration; the guest's writer appends to it), 0 for none.
        #[arg(long, default_value_t = 0)]
        local_disk_mib: u64,
    },
    /// A two-host cluster with a disk witness (or a network witness): each host's power loss
    /// (fresh cluster per round) and, with root, cuts of the link between them, timed until the
    /// VMs run on the survivor.
    TwoHosts {
        /// Power-loss rounds (each loses h1, brings it back, then loses h0).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Link cuts (network namespaces; skipped without root).
        #[arg(long, default_value_t = 10)]
        cuts: usize,
        /// A network witness (`tandem witness`) and no shared storage, instead of the disk witness.
        #[arg(long)]
        network_witness: bool,
    },
    /// What synchronous mirroring between sites costs 4 KiB write-through writes, against the
    /// same disk unmirrored, at each one-way inter-site delay (QEMU, a copy server, the relay,
    /// and the lab's delay relay as the link; no agents).
    SyncMirror {
        #[arg(long, default_value_t = 200)]
        writes: usize,
        /// One-way delays, ms, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0,1,5")]
        delays_ms: Vec<u64>,
    },
    /// What a mirror's first copy (as a resync after a site's return) costs the guest's writes
    /// meanwhile, uncapped and under a `[mirror] resync_max_mib_s` cap (QEMU, a copy server, the
    /// relay, the lab's delay relay; no agents).
    ResyncCap {
        /// Writes measured in each phase, at most.
        #[arg(long, default_value_t = 200)]
        writes: usize,
        /// The disk, MiB (full of data).
        #[arg(long, default_value_t = 256)]
        disk_mib: u64,
        /// The cap, MiB/s.
        #[arg(long, default_value_t = 32)]
        cap_mib_s: u64,
        /// The link's one-way delay, ms.
        #[arg(long, default_value_t = 1)]
        delay_ms: u64,
    },
    /// The floor under `bench migration`'s HTTP gap: two QEMU processes and no Tandem, the test
    /// guest migrated back and forth over loopback and resumed the instant QEMU completes.
    QemuAlone {
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Where the test guest's vmlinuz and initrd.img are.
        #[arg(long, default_value = ".cache/guest")]
        guest_dir: std::path::PathBuf,
    },
    /// The disk-backed, bridged test guest in a 3-host namespace lab: live migrations (whole time,
    /// QEMU's downtime, the longest gap between answers on its own address and in its write
    /// sequence), then power losses of its host (answering and writing again, writes lost).
    DiskGuest {
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        #[arg(long, default_value_t = 5)]
        migrations: usize,
        #[arg(long, default_value_t = 3)]
        power_losses: usize,
        #[arg(long, default_value = ".cache/guest")]
        guest_dir: std::path::PathBuf,
    },
    /// A host of three runs N VMs and enters maintenance: time until it is empty (live
    /// migrations), then until its VMs are back after it leaves maintenance.
    Maintenance {
        #[arg(long, default_value = "qemu")]
        driver: String,
        #[arg(long, default_value_t = 4)]
        vms: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value = ".cache/guest")]
        guest_dir: std::path::PathBuf,
    },
    /// A host of three runs N VMs and is stopped with `tandem host shutdown --policy P`: time
    /// until it has left, then until its VMs run there again after its agent's restart.
    PlannedStop {
        #[arg(long, default_value = "qemu")]
        driver: String,
        #[arg(long, default_value_t = 4)]
        vms: usize,
        #[arg(long, default_value = "shutdown", value_parser = ["kill", "migrate", "shutdown", "freeze"])]
        policy: String,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value = ".cache/guest")]
        guest_dir: std::path::PathBuf,
    },
    /// One host of three runs N process VMs; its power is cut: time until all of them run on
    /// the survivors, and where it goes (commit, starts per second, reconciler passes).
    MassFailover {
        /// VMs on the host that loses power.
        #[arg(long, default_value_t = 1000)]
        vms: usize,
        /// Rounds (a fresh cluster each).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
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

fn main() {
    let cli = LabCli::parse();
    let simulating = matches!(cli.command, LabCmd::Sim(_) | LabCmd::Bench { .. });
    // The simulator drives the real consensus library through thousands of injected faults; its
    // complaints about them (failed RPCs) are expected, so only Tandem's own errors show unless
    // RUST_LOG asks for more.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| if simulating { "error,openraft=off" } else { "warn" }.into());
    let logs = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).with_writer(std::io::stderr);
    // A subscriber already set (none is, in this program) would keep logging: nothing to handle.
    let _ = if simulating { logs.with_timer(SimulatedTime).try_init() } else { logs.try_init() };
    let (what, result) = match &cli.command {
        LabCmd::Demo(args) => ("demo", tandem_lab::demo::run(args)),
        LabCmd::Chaos(args) => ("chaos", tandem_lab::chaos::run(args)),
        LabCmd::Sim(args) => ("sim", tandem_lab::sim::run(args)),
        LabCmd::Bench { op: BenchOp::Placement { runs } } => ("bench", tandem_lab::bench::placement(*runs)),
        LabCmd::Bench { op: BenchOp::Heartbeat { hosts, seconds, keep } } => ("bench", tandem_lab::bench::heartbeat::run(*hosts, *seconds, *keep)),
        LabCmd::Bench { op: BenchOp::Failover { rounds, demo } } => ("bench", tandem_lab::bench::failover::run(demo, *rounds)),
        LabCmd::Bench { op: BenchOp::Migration { driver, memory_mib, rounds, guest_dir, max_bandwidth_mib_s, local_disk_mib } } => {
            ("bench", tandem_lab::bench::migration::run(driver, *memory_mib, *rounds, guest_dir, *max_bandwidth_mib_s, *local_disk_mib))
        }
        LabCmd::Bench { op: BenchOp::Maintenance { driver, vms, rounds, guest_dir } } => {
            ("bench", tandem_lab::bench::maintenance::run(driver, *vms, *rounds, guest_dir))
        }
        LabCmd::Bench { op: BenchOp::DiskGuest { memory_mib, migrations, power_losses, guest_dir } } => (
            "bench",
            tandem_lab::bench::diskguest::run(&tandem_lab::bench::diskguest::DiskGuestBench {
                memory_mib: *memory_mib,
                migrations: *migrations,
                power_losses: *power_losses,
                guest: guest_dir,
            }),
        ),
        LabCmd::Bench { op: BenchOp::PlannedStop { driver, vms, policy, rounds, guest_dir } } => {
            ("bench", tandem_lab::bench::plannedstop::run(driver, *vms, policy, *rounds, guest_dir))
        }
        LabCmd::Bench { op: BenchOp::TwoHosts { rounds, cuts, network_witness } } => {
            ("bench", tandem_lab::lab::tandem_binary().and_then(|b| tandem_lab::bench::twohosts::run(&b, *rounds, *cuts, *network_witness)))
        }
        LabCmd::Bench { op: BenchOp::SyncMirror { writes, delays_ms } } => ("bench", tandem_lab::bench::syncmirror::run(*writes, delays_ms)),
        LabCmd::Bench { op: BenchOp::ResyncCap { writes, disk_mib, cap_mib_s, delay_ms } } => (
            "bench",
            tandem_lab::bench::resynccap::run(tandem_lab::bench::resynccap::ResyncCapBench {
                writes: *writes,
                disk_mib: *disk_mib,
                cap_mib_s: *cap_mib_s,
                delay_ms: *delay_ms,
            }),
        ),
        LabCmd::Bench { op: BenchOp::QemuAlone { memory_mib, rounds, guest_dir } } => {
            ("bench", tandem_lab::bench::qemualone::run(*memory_mib, *rounds, guest_dir))
        }
        LabCmd::Bench { op: BenchOp::MassFailover { vms, rounds } } => ("bench", tandem_lab::bench::mass::run(*vms, *rounds)),
        LabCmd::Bench { op: BenchOp::Liveness { vms, seconds, readers } } => {
            ("bench", tandem_lab::bench::liveness::run(tandem_lab::bench::liveness::LivenessBench { vms: *vms, seconds: *seconds, readers: *readers }))
        }
    };
    if let Err(e) = result {
        eprintln!("tandem-lab {what}: {e:#}");
        std::process::exit(1);
    }
}
