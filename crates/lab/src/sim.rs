//! `tandem-lab sim`: runs seeds of the deterministic whole-cluster simulator and prints what they
//! found; a failing seed prints the command that replays it with its trace.

use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tandem_sim::{SimOptions, SimReport};

/// Options of `tandem-lab sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// First seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of consecutive seeds to run (a soak: as many as you like).
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Hosts per simulated cluster.
    #[arg(long, default_value_t = 3)]
    pub hosts: u32,
    /// Virtual seconds of faults per seed.
    #[arg(long, default_value_t = 120)]
    pub duration_s: u64,
    /// Protected VMs created at the start.
    #[arg(long, default_value_t = 6)]
    pub vms: u32,
    /// Extra hosts that join the cluster later, as an operator action during the faults.
    #[arg(long, default_value_t = 1)]
    pub late_hosts: u32,
    /// Print each seed's full trace.
    #[arg(long)]
    pub trace: bool,
    /// Mutation check: the coordinator skips the fence deadline; the run must find violations.
    #[arg(long)]
    pub unsafe_skip_fence_wait: bool,
    /// Mutation check: hosts start VMs without checking their liveness lease; the run must find
    /// violations.
    #[arg(long, conflicts_with = "unsafe_skip_fence_wait")]
    pub unsafe_skip_lease_check: bool,
    /// Mutation check: hosts have no hardware watchdog, so a frozen host keeps its VMs until it
    /// thaws; the run must find double runs.
    #[arg(long)]
    pub no_watchdog: bool,
    /// Mutation check: the coordinator counts fence deadlines from evidence `self_fence_ms` too
    /// early; with timings whose fence wait outlasts the peer timeout, the run must find
    /// violations.
    #[arg(long, conflicts_with_all = ["unsafe_skip_fence_wait", "unsafe_skip_lease_check"])]
    pub unsafe_early_evidence: bool,
    /// Mutation check: a live migration's destination resumes its paused copy without waiting
    /// for the switchover's commit; with `--only live-migration` the run must find violations.
    #[arg(long, conflicts_with_all = ["unsafe_skip_fence_wait", "unsafe_skip_lease_check", "unsafe_early_evidence"])]
    pub unsafe_resume_before_switchover: bool,
    /// Mutation check: the simulated hypervisor completes live migrations before their local
    /// disks' mirror is in sync; with `--only live-migration` the run must find stale disks.
    #[arg(long, conflicts_with_all = ["unsafe_skip_fence_wait", "unsafe_skip_lease_check", "unsafe_early_evidence", "unsafe_resume_before_switchover"])]
    pub unsafe_skip_disk_sync: bool,
    /// Mutation check: the simulated mirrors let a lost copy's writes complete at once instead
    /// of holding them until that copy is committed stale; with `--sites` and `--only
    /// site-link-cut` the run must find a VM started from a stale copy.
    #[arg(long, conflicts_with_all = ["unsafe_skip_fence_wait", "unsafe_skip_lease_check", "unsafe_early_evidence", "unsafe_resume_before_switchover", "unsafe_skip_disk_sync"])]
    pub unsafe_mirror_without_hold: bool,
    /// One VM in five keeps a writable local disk (best-effort, parked with its failed host);
    /// a VM run from a stale copy of its disk is a `stale-disk`.
    #[arg(long)]
    pub local_disks: bool,
    /// Each host's site, by index, comma-separated (e.g. a,a,b,b,w); with sites the simulator
    /// also draws site power losses and cuts of the link between two sites.
    #[arg(long, value_delimiter = ',')]
    pub sites: Vec<String>,
    /// Two hosts with a disk witness on the shared storage (needs --hosts 2 --late-hosts 0):
    /// also draws the cut of their link with one host's disk path lost.
    #[arg(long)]
    pub disk_witness: bool,
    /// With --disk-witness: the last host starts first and takes the witness, so the host a
    /// cut keeps (the lower id) must take it over from the losing side.
    #[arg(long)]
    pub witness_last: bool,
    /// The cluster's preferred site (one of --sites), set once it formed: a split without a
    /// majority keeps its hosts.
    #[arg(long)]
    pub preferred_site: Option<String>,
    /// The agents' timings: the defaults, the low-latency profile (100 ms heartbeats), or
    /// slow-fence (dead after 1 s, lease of 2 s: the deadline decides; for --unsafe-early-evidence).
    #[arg(long, default_value = "default", value_parser = ["default", "low-latency", "slow-fence"])]
    pub timings: String,
    /// Draw only this fault kind.
    #[arg(long, value_parser = sim_fault)]
    pub only: Option<tandem_sim::fault::FaultKind>,
}

/// A fault kind the simulator injects, by name.
fn sim_fault(name: &str) -> std::result::Result<tandem_sim::fault::FaultKind, String> {
    let kinds: Vec<tandem_sim::fault::FaultKind> = tandem_sim::fault::FaultKind::of(tandem_sim::fault::Backend::Sim).collect();
    kinds.iter().copied().find(|k| k.name() == name).ok_or_else(|| {
        let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
        format!("the simulator injects none called '{name}'; it injects: {}", names.join(", "))
    })
}

impl SimArgs {
    fn mutation(&self) -> Option<tandem_sim::Mutation> {
        if self.unsafe_skip_fence_wait {
            Some(tandem_sim::Mutation::SkipFenceWait)
        } else if self.unsafe_early_evidence {
            Some(tandem_sim::Mutation::EarlyEvidence)
        } else if self.unsafe_resume_before_switchover {
            Some(tandem_sim::Mutation::ResumeBeforeSwitchover)
        } else if self.unsafe_skip_disk_sync {
            Some(tandem_sim::Mutation::SwitchoverBeforeDiskSync)
        } else if self.unsafe_mirror_without_hold {
            Some(tandem_sim::Mutation::MirrorWithoutHold)
        } else {
            self.unsafe_skip_lease_check.then_some(tandem_sim::Mutation::SkipLeaseCheck)
        }
    }
}

/// Runs the seeds; fails when any seed violated an invariant.
pub fn run(args: &SimArgs) -> Result<()> {
    let max_hosts = tandem_core::MAX_HOSTS as u32;
    if args.witness_last && !args.disk_witness {
        bail!("--witness-last needs --disk-witness");
    }
    if args.preferred_site.as_ref().is_some_and(|p| !args.sites.contains(p)) {
        bail!("--preferred-site must be one of --sites");
    }
    if args.disk_witness && (args.hosts != 2 || args.late_hosts != 0) {
        bail!("--disk-witness is for two hosts: --hosts 2 --late-hosts 0");
    }
    if !args.disk_witness && !(3..=max_hosts).contains(&args.hosts) {
        bail!("--hosts must be 3 to {max_hosts} (2 with --disk-witness)");
    }
    if args.only.is_some_and(|k| k.needs_witness()) && !args.disk_witness {
        bail!("--only {} needs --disk-witness", args.only.map(|k| k.name()).unwrap_or_default());
    }
    if args.late_hosts > 2 || args.hosts + args.late_hosts > max_hosts {
        bail!("--late-hosts must be 0 to 2, and hosts plus late hosts at most {max_hosts}");
    }
    if args.vms > 10_000 {
        bail!("--vms must be at most 10,000");
    }
    if args.sites.len() as u32 > args.hosts + args.late_hosts || args.sites.iter().any(|s| !tandem_core::state::valid_name(s)) {
        bail!("--sites names at most one site per host, each 1-63 letters, digits, '-' or '_'");
    }
    if args.only.is_some_and(|k| k.needs_sites()) && args.sites.is_empty() {
        bail!("--only {} needs --sites", args.only.map(|k| k.name()).unwrap_or_default());
    }
    let started = std::time::Instant::now();
    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut simulated_ms = 0u64;
    let mut failing: Vec<(u64, Vec<String>)> = Vec::new();
    let progress = crate::progress::Progress::new(args.seeds, "seeds");
    for seed in args.seed..args.seed + args.seeds {
        progress.set(seed - args.seed, &format!("{} failing", failing.len()));
        let opts = SimOptions {
            seed,
            hosts: args.hosts,
            duration_s: args.duration_s,
            vms: args.vms,
            verbose: false,
            mutation: args.mutation(),
            late_hosts: args.late_hosts,
            only: args.only,
            no_watchdog: args.no_watchdog,
            timings: match args.timings.as_str() {
                "low-latency" => Some(tandem_core::timing::LOW_LATENCY_TIMINGS),
                "slow-fence" => Some(tandem_sim::SLOW_FENCE_TIMINGS),
                _ => None,
            },
            local_disks: args.local_disks,
            sites: args.sites.clone(),
            disk_witness: args.disk_witness,
            witness_last: args.witness_last,
            preferred_site: args.preferred_site.clone(),
        };
        let r: SimReport = tandem_sim::run(&opts);
        progress.finish();
        if args.trace {
            for l in &r.trace {
                println!("{l}");
            }
        }
        simulated_ms += r.simulated_ms;
        for (k, n) in &r.faults {
            *faults.entry(k).or_default() += n;
        }
        println!(
            "seed {seed}: {:.0} simulated s, {} fault(s), {} violation(s), trace {:016x}",
            r.simulated_ms as f64 / 1000.0,
            r.faults.values().sum::<u32>(),
            r.violations.len(),
            r.trace_hash
        );
        if !r.violations.is_empty() {
            for v in &r.violations {
                println!("  {v}");
            }
            failing.push((seed, r.violations));
        }
    }
    println!("\nseeds: {} ({}..={})", args.seeds, args.seed, args.seed + args.seeds - 1);
    println!("simulated: {:.2} h in {:.0} s of wall time", simulated_ms as f64 / 3_600_000.0, started.elapsed().as_secs_f64());
    println!("faults injected by kind:");
    for (k, n) in &faults {
        println!("  {k:<24} {n}");
    }
    println!("violations: {} seed(s) failed", failing.len());
    for (seed, _) in &failing {
        let mut mutation = String::new();
        if args.unsafe_skip_fence_wait {
            mutation.push_str(" --unsafe-skip-fence-wait");
        }
        if args.unsafe_skip_lease_check {
            mutation.push_str(" --unsafe-skip-lease-check");
        }
        if args.no_watchdog {
            mutation.push_str(" --no-watchdog");
        }
        if args.unsafe_early_evidence {
            mutation.push_str(" --unsafe-early-evidence");
        }
        if args.unsafe_resume_before_switchover {
            mutation.push_str(" --unsafe-resume-before-switchover");
        }
        if args.unsafe_skip_disk_sync {
            mutation.push_str(" --unsafe-skip-disk-sync");
        }
        if !args.sites.is_empty() {
            mutation.push_str(&format!(" --sites {}", args.sites.join(",")));
        }
        if args.local_disks {
            mutation.push_str(" --local-disks");
        }
        if args.disk_witness {
            mutation.push_str(" --disk-witness");
        }
        if args.witness_last {
            mutation.push_str(" --witness-last");
        }
        if let Some(site) = &args.preferred_site {
            mutation.push_str(&format!(" --preferred-site {site}"));
        }
        if args.timings != "default" {
            mutation.push_str(&format!(" --timings {}", args.timings));
        }
        if let Some(o) = &args.only {
            mutation.push_str(&format!(" --only {o}"));
        }
        println!(
            "  replay: tandem-lab sim --seed {seed} --hosts {} --late-hosts {} --duration-s {} --vms {} --trace{mutation}",
            args.hosts, args.late_hosts, args.duration_s, args.vms
        );
    }
    if !failing.is_empty() {
        bail!("{} seed(s) violated invariants", failing.len());
    }
    Ok(())
}
