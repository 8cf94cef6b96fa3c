//! `tandem-lab bench placement`: figures for the placement engine on large synthetic clusters, and
//! the FTT approximation's gap against the exact answer on random small ones. Prints medians;
//! asserts nothing (this machine is noisy; the tests check behaviour). `tandem-lab bench liveness`
//! lives in [`liveness`].

pub mod diskguest;
pub mod failover;
pub mod heartbeat;
pub mod liveness;
pub mod maintenance;
pub mod mass;
pub mod migration;
pub mod plannedstop;
pub mod qemualone;
pub mod resynccap;
pub mod syncmirror;
pub mod twohosts;

use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::hostset::HostId;
use tandem_core::placement::{Model, PlacementHost, PlacementRule, PlacementVm, RuleKind, DEFAULT_FTT_BUDGET};
use tandem_core::state::{Capacity, Command, DriverSpec, PowerState, Protection, VmSpec};
use tandem_sim::world::Rng;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// `hosts` hosts of 512 GiB and 64 vCPUs (4× overcommit); `vms` VMs of 1-4.5 GiB and 1-2
/// vCPUs spread over them (about 70 % of memory and vCPUs used at 125 VMs a host), a tenth best-effort, a
/// tenth off; `anti_pairs` hard anti-affinity pairs.
fn synthetic(hosts: usize, vms: usize, anti_pairs: usize, seed: u64) -> Model {
    let mut rng = Rng(seed);
    let hs: Vec<PlacementHost> =
        (0..hosts).map(|i| PlacementHost { id: HostId(i as u32), mem_mib: 512 * 1024, cpu_milli: 64 * 4 * 1000, up: true, usable: true }).collect();
    let mut vs: Vec<PlacementVm> = (0..vms)
        .map(|i| PlacementVm {
            name: format!("vm{i}"),
            mem_mib: 1024 * (1 + rng.below(4)) + 512 * rng.below(2),
            cpu_milli: 1000 * (1 + rng.below(2)),
            protection: match rng.below(10) {
                0 => Protection::BestEffort,
                1 => Protection::Off,
                _ => Protection::Protect,
            },
            priority: rng.below(5) as i32,
            host: Some((i % hosts) as u32),
            running: true,
            rules: vec![],
            avoid: vec![],
        })
        .collect();
    let mut rules = Vec::new();
    for p in 0..anti_pairs {
        // Members on different hosts, as a valid placement has them.
        let (a, b) = (2 * p, 2 * p + 1);
        if b >= vs.len() {
            break;
        }
        let r = rules.len() as u32;
        vs[a].rules.push(r);
        vs[b].rules.push(r);
        rules.push(PlacementRule { name: format!("apart{p}"), kind: RuleKind::AntiAffinity, hard: true, members: vec![a as u32, b as u32], hosts: vec![] });
    }
    Model::new(hs, vs, rules)
}

fn ftt_and_plans(hosts: usize, vms: usize, anti: usize, runs: usize) {
    let model = synthetic(hosts, vms, anti, 7);
    let mut ftt_times = Vec::new();
    let mut plan_times = Vec::new();
    let mut report = None;
    let mut restarted = 0;
    for _ in 0..runs {
        let t = Instant::now();
        report = Some(model.ftt(DEFAULT_FTT_BUDGET));
        ftt_times.push(t.elapsed());
        let t = Instant::now();
        let plan = model.plan(&[0], false);
        plan_times.push(t.elapsed());
        restarted = plan.placed.len();
    }
    let r = report.unwrap_or_else(|| model.ftt(DEFAULT_FTT_BUDGET));
    let (f, p) = (median(ftt_times), median(plan_times));
    println!(
        "{hosts:>5} hosts {vms:>7} VMs {anti:>4} anti-affinity pairs: FTT {} ({}, limited by {}, {} sets, exact up to {}) in {:.1} ms; one host's failover plan ({restarted} VMs) in {:.2} ms; together {:.1} ms",
        r.ftt,
        if r.exact { "exact" } else { "lower bound" },
        r.limited_by,
        r.sets_checked,
        r.checked_up_to,
        f.as_secs_f64() * 1e3,
        p.as_secs_f64() * 1e3,
        (f + p).as_secs_f64() * 1e3
    );
}

/// Random small clusters where the exact answer is cheap: how far below it the slot bound is.
fn approximation_gap(instances: usize) {
    let mut rng = Rng(11);
    let mut gaps = Vec::new();
    let mut over = 0;
    for _ in 0..instances {
        let hosts = 5 + rng.below(6) as usize;
        let vms = hosts * (2 + rng.below(8) as usize);
        let hs = (0..hosts)
            .map(|i| {
                let big = rng.below(4) == 0;
                PlacementHost { id: HostId(i as u32), mem_mib: if big { 64 } else { 32 } * 1024, cpu_milli: 32_000, up: true, usable: true }
            })
            .collect();
        let vs = (0..vms)
            .map(|i| PlacementVm {
                name: format!("v{i}"),
                mem_mib: 1024 * (1 + rng.below(6)),
                cpu_milli: 1000 * (1 + rng.below(2)),
                protection: Protection::Protect,
                priority: 0,
                host: Some(rng.below(hosts as u64) as u32),
                running: true,
                rules: vec![],
                avoid: vec![],
            })
            .collect();
        let m = Model::new(hs, vs, vec![]);
        let exact = m.ftt(u64::MAX);
        let bound = m.slot_bound((hosts as u32 - 1) / 2);
        if bound > exact.ftt {
            over += 1;
        }
        gaps.push(exact.ftt.saturating_sub(bound));
    }
    let exact_hits = gaps.iter().filter(|g| **g == 0).count();
    let mean = gaps.iter().map(|g| f64::from(*g)).sum::<f64>() / gaps.len().max(1) as f64;
    println!(
        "slot bound vs exact FTT on {instances} random clusters (5-10 hosts, mixed sizes): equal in {exact_hits}, mean gap {mean:.2}, max gap {}, overstated {over} time(s)",
        gaps.iter().max().copied().unwrap_or(0)
    );
}

async fn must(c: &tandem_agent::consensus::Consensus, cmd: Command) -> Result<tandem_core::state::Applied> {
    let (r, _) = c.propose(cmd).await?;
    Ok(r?)
}

/// A dead host with 1000 VMs on a 64-host cluster: the plan, then the one `Failover` command
/// committed through a real (single-node) openraft log on disk and applied.
fn recover_thousand(runs: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let mut plan_times = Vec::new();
        let mut commit_times = Vec::new();
        let mut moved = 0;
        for run in 0..runs {
            let dir = std::env::temp_dir().join(format!("tandem-bench-{}-{run}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let c = tandem_agent::consensus::Consensus::open(
                &dir,
                0,
                "bench".into(),
                Arc::new(tandem_agent::io::HttpRpc::default()),
                &tandem_core::timing::Timings::default(),
            )
            .await?;
            c.initialize("127.0.0.1:1").await?;
            for _ in 0..200 {
                if c.is_leader() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for h in 0..64u32 {
                let cap = Capacity { vcpus: 2048, memory_mib: 512 * 1024 };
                must(
                    &c,
                    Command::AddHost {
                        id: HostId(h),
                        name: format!("h{h}"),
                        api_addr: format!("127.0.0.1:{}", 2000 + h),
                        heartbeat_addr: format!("127.0.0.1:{}", 3000 + h),
                        capacity: cap,
                    },
                )
                .await?;
                must(&c, Command::HostJoined { host: HostId(h) }).await?;
            }
            for i in 0..1000 {
                let name = format!("vm{i}");
                let spec = VmSpec {
                    name: name.clone(),
                    vcpus: 1,
                    memory_mib: 256,
                    disks: vec![],
                    network: None,
                    protection: Protection::Protect,
                    priority: i % 5,
                    restart_group: 0,
                    driver: DriverSpec::Process { command: vec!["sleep".into(), "1".into()] },
                    probe: None,
                    postcopy: tandem_core::spec::Postcopy::Off,
                };
                must(&c, Command::CreateVm { spec }).await?;
                must(&c, Command::SetPower { name: name.clone(), desired: PowerState::Running, force: false }).await?;
                must(&c, Command::Assign { name, host: HostId(0) }).await?;
            }
            let t = Instant::now();
            let (plan, epoch, members) =
                c.with_state(|s| (tandem_core::recovery::plan_failover(s, HostId(0), s.members()), s.hosts[&HostId(0)].epoch, s.members()));
            plan_times.push(t.elapsed());
            let _ = members;
            let (r, _) = c.propose(Command::Failover { host: HostId(0), epoch, plan: plan.placements.clone() }).await?;
            commit_times.push(t.elapsed());
            if let Ok(tandem_core::state::Applied::FailedOver { moved: m, .. }) = r {
                moved = m.len();
            }
            c.shutdown().await;
            let _ = std::fs::remove_dir_all(&dir);
        }
        println!(
            "a dead host's {moved} VMs (64 hosts): planned in {:.1} ms, planned + committed (one openraft entry, redb, fsync) + applied in {:.1} ms",
            median(plan_times).as_secs_f64() * 1e3,
            median(commit_times).as_secs_f64() * 1e3
        );
        Ok::<(), anyhow::Error>(())
    })
}

/// Runs every placement figure.
pub fn placement(runs: usize) -> Result<()> {
    let runs = runs.max(1);
    println!("placement benchmark, medians of {runs} run(s)");
    ftt_and_plans(64, 8000, 0, runs);
    ftt_and_plans(64, 8000, 200, runs);
    ftt_and_plans(1000, 100_000, 0, runs);
    ftt_and_plans(1000, 100_000, 2000, runs);
    approximation_gap(300);
    recover_thousand(runs.min(3)).context("recovery of 1000 VMs")?;
    Ok(())
}
