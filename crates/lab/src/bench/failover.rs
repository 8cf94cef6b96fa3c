//! `tandem-lab bench failover`: N power-loss rounds of the demo's cluster, and the median, minimum
//! and maximum of each phase — detection, restart committed, restarted, answering — per driver
//! and timing profile. Figures only: nothing is asserted (the tests check behaviour).

use crate::demo::{power_loss_round, DemoArgs, RoundFigures};
use anyhow::{bail, Result};

/// Reads one phase's time out of a round's figures.
type Phase = fn(&RoundFigures) -> Option<f64>;

/// Runs `rounds` rounds with `args` and prints the figures of each phase.
pub fn run(args: &DemoArgs, rounds: usize) -> Result<()> {
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let mut figures: Vec<RoundFigures> = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        println!("\n=== round {round} of {rounds} ===");
        figures.push(power_loss_round(args)?);
    }
    println!("\nfailover after a host's power loss: {rounds} round(s), driver {}, timings {}", args.driver, args.timings);
    println!("{:<22} {:>8} {:>8} {:>8}   (seconds after the power cut)", "phase", "median", "min", "max");
    let phases: [(&str, Phase); 5] = [
        ("declared dead", |f| f.detect_s),
        ("restart committed", |f| f.committed_s),
        ("restarted (process)", |f| f.started_s),
        ("answering", |f| Some(f.answering_s)),
        ("answering (agent)", |f| f.probe_answering_s),
    ];
    for (name, get) in phases {
        let mut v: Vec<f64> = figures.iter().filter_map(get).collect();
        v.sort_by(f64::total_cmp);
        match (v.first(), v.last()) {
            (Some(min), Some(max)) => println!("{name:<22} {:>8.2} {min:>8.2} {max:>8.2}", v[v.len() / 2]),
            _ => println!("{name:<22} {:>8} (not measured)", "-"),
        }
    }
    Ok(())
}
