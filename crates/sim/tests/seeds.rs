//! The deterministic simulator in `cargo test`: determinism, a sweep of seeds, the regression
//! seeds of bugs it found, and proof that it catches a broken safety mechanism.

use tandem_sim::{run, SimOptions};

fn opts(seed: u64, duration_s: u64) -> SimOptions {
    SimOptions { seed, duration_s, ..SimOptions::default() }
}

#[test]
fn the_same_seed_replays_the_same_trace_byte_for_byte() {
    let a = run(&opts(3, 90));
    let b = run(&opts(3, 90));
    assert!(a.trace.len() > 50, "a run worth comparing: {} lines", a.trace.len());
    assert!(a.faults.values().sum::<u32>() >= 5, "faults injected: {:?}", a.faults);
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.trace_hash, b.trace_hash);
    let c = run(&opts(4, 90));
    assert_ne!(a.trace_hash, c.trace_hash, "another seed, another run");
}

/// Safety invariants fail the sweep. Liveness findings (`not-recovered`, and `wrong-host` when the
/// cluster has not settled) are printed and counted but do not fail it yet: one open bug (issue
/// #3) — a host that crashes and reboots before its fence deadline sometimes does not rejoin —
/// shows up in about one seed in a hundred. `tandem sim` itself fails on every violation.
const SAFETY: [&str; 4] = ["double-run", "state-lost", "healthy-fenced", "sim-error"];

/// `TANDEM_SIM_SEEDS` changes how many seeds the sweep runs (default 60, 60 virtual s each).
#[test]
fn a_sweep_of_seeds_breaks_no_safety_invariant() {
    let n: u64 = std::env::var("TANDEM_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let mut unsafe_seeds = Vec::new();
    let mut liveness = Vec::new();
    let mut simulated_ms = 0;
    let mut faults = 0;
    for seed in 1..=n {
        let r = run(&opts(seed, 60));
        simulated_ms += r.simulated_ms;
        faults += r.faults.values().sum::<u32>();
        let (safety, other): (Vec<String>, Vec<String>) =
            r.violations.into_iter().partition(|v| SAFETY.iter().any(|k| v.starts_with(k)));
        if !safety.is_empty() {
            unsafe_seeds.push((seed, safety));
        }
        if !other.is_empty() {
            liveness.push((seed, other));
        }
    }
    eprintln!("{n} seeds, {:.2} simulated hours, {faults} faults; liveness findings: {liveness:#?}", simulated_ms as f64 / 3.6e6);
    assert!(u64::from(faults) >= n * 3, "too few faults injected: {faults}");
    assert!(unsafe_seeds.is_empty(), "seeds breaking safety (replay: tandem sim --seed N --duration-s 60 --trace): {unsafe_seeds:#?}");
    assert!(liveness.len() as u64 * 10 <= n, "liveness findings in more than one seed in ten: {liveness:#?}");
}

/// Bugs the simulator found, kept as regression seeds (300 virtual seconds each).
/// - 17: a fenced host was left out of the partition decision, so a healthy host lost a tie to
///   a host cut off one-way and fenced itself.
const REGRESSION_SEEDS: &[u64] = &[17];

#[test]
fn regression_seeds_stay_fixed() {
    for &seed in REGRESSION_SEEDS {
        let r = run(&opts(seed, 300));
        assert!(r.violations.is_empty(), "seed {seed}: {:#?}", r.violations);
    }
}

/// With the coordinator's wait for the fence deadline switched off, the simulator must find a
/// VM running on two hosts within a few seeds.
#[test]
fn disabling_the_fence_wait_is_caught() {
    let found = (1..=10).find(|seed| {
        let r = run(&SimOptions { unsafe_skip_fence_wait: true, ..opts(*seed, 120) });
        r.violations.iter().any(|v| v.starts_with("double-run"))
    });
    assert!(found.is_some(), "no double run found in 10 seeds with the fence wait disabled");
}
