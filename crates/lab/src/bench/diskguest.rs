//! `tandem-lab bench disk-guest`: the disk-backed, bridged test guest (see [`crate::diskguest`])
//! moved live around a 3-host namespace lab, then failed over by power losses. Per migration: the
//! whole time, QEMU's downtime, the longest gap between two answers on the guest's own address
//! (polled every 20 ms) and the longest time its acknowledged write sequence did not advance. Per
//! power loss: the time until the guest answers again elsewhere and until it writes again, and
//! whether its disk held every number it had acknowledged. Figures only; the test asserts.

use crate::demo::wait;
use crate::diskguest::{judge, DiskGuestLab, LockWatch, SeqSample, SeqWatch};
use anyhow::{bail, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// What to run.
pub struct DiskGuestBench<'a> {
    pub memory_mib: u64,
    pub migrations: usize,
    pub power_losses: usize,
    pub guest: &'a Path,
}

/// The longest time between two answers, and without progress, among samples taken in
/// `[from, to]` (the sample just before `from` included, so a gap that began before counts).
fn gaps(samples: &[SeqSample], from: Instant, to: Instant) -> (u64, u64) {
    let start = samples.iter().rposition(|s| s.at < from).unwrap_or(0);
    let window: Vec<&SeqSample> = samples[start..].iter().filter(|s| s.at <= to).collect();
    let answer_gap = window.windows(2).map(|w| w[1].at.duration_since(w[0].at).as_millis() as u64).max().unwrap_or(0);
    let owned: Vec<SeqSample> = window.into_iter().copied().collect();
    (answer_gap, judge(&owned).longest_stall_ms)
}

fn line(name: &str, mut v: Vec<f64>, unit: &str) {
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(min), Some(max)) => println!("{name:<34} {:>9.0} {min:>9.0} {max:>9.0}  {unit}", v[v.len() / 2]),
        _ => println!("{name:<34} {:>9}  (not measured)", "-"),
    }
}

/// Runs the benchmark and prints its figures.
pub fn run(b: &DiskGuestBench) -> Result<()> {
    if b.migrations + b.power_losses == 0 {
        bail!("nothing to measure: give --migrations or --power-losses");
    }
    crate::demo::install_interrupt_handler();
    let mut dl = DiskGuestLab::start(&format!("tbd{}", std::process::id() % 10_000), b.guest, b.memory_mib, "")?;
    let locks = LockWatch::start(&dl.image)?;
    let seq = SeqWatch::start(&dl.addr);
    seq.wait_past(0, Duration::from_secs(30))?;
    let (mut total, mut downtime, mut answer_gap, mut stall) = (vec![], vec![], vec![], vec![]);
    for round in 1..=b.migrations {
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        let outcome = dl.migrate_next()?;
        let took = t0.elapsed();
        seq.wait_past(seq.highest(), Duration::from_secs(30))?;
        std::thread::sleep(Duration::from_millis(300));
        let (gap, still) = gaps(&seq.samples(), t0, Instant::now());
        let qemu_down = outcome.report.as_ref().and_then(|r| r.downtime_ms);
        println!(
            "migration {round}: {} in {:.0} ms (QEMU downtime {} ms); longest gap between answers {gap} ms, write sequence stalled {still} ms",
            outcome.result,
            took.as_secs_f64() * 1000.0,
            qemu_down.map_or_else(|| "-".into(), |d| d.to_string())
        );
        total.push(took.as_secs_f64() * 1000.0);
        downtime.extend(qemu_down.map(|d| d as f64));
        answer_gap.push(gap as f64);
        stall.push(still as f64);
    }
    let (mut answering, mut writing, mut lost) = (vec![], vec![], 0usize);
    for round in 1..=b.power_losses {
        std::thread::sleep(Duration::from_millis(500));
        let acknowledged = seq.highest();
        let boot = seq.samples().last().map(|s| s.recovered);
        let t0 = Instant::now();
        let dead = dl.power_off_guest_host()?;
        let back = wait("the guest to answer again", Duration::from_secs(120), || seq.samples().into_iter().find(|s| s.at > t0 && Some(s.recovered) != boot))?;
        let wrote = wait("the guest to write again", Duration::from_secs(60), || {
            seq.samples().into_iter().find(|s| s.at > t0 && s.recovered == back.recovered && s.writes > 0)
        })?;
        let ok = back.recovered >= acknowledged;
        lost += usize::from(!ok);
        println!(
            "power loss {round}: answering after {:.2} s, writing after {:.2} s; acknowledged {acknowledged}, found on disk {} ({})",
            back.at.duration_since(t0).as_secs_f64(),
            wrote.at.duration_since(t0).as_secs_f64(),
            back.recovered,
            if ok { "nothing lost" } else { "LOST WRITES" }
        );
        answering.push(back.at.duration_since(t0).as_secs_f64() * 1000.0);
        writing.push(wrote.at.duration_since(t0).as_secs_f64() * 1000.0);
        dl.net.heal(dead)?;
        dl.lab.start(dead)?;
        dl.lab.wait_all_active(Duration::from_secs(60))?;
    }
    let verdict = judge(&seq.finish());
    let (most, lock_samples) = locks.most();
    println!("\ndisk-backed bridged guest of {} MiB, 3 hosts in namespaces", b.memory_mib);
    println!("{:<34} {:>9} {:>9} {:>9}", "", "median", "min", "max");
    line("migration: request to outcome", total, "ms");
    line("migration: QEMU downtime", downtime, "ms");
    line("migration: longest gap in answers", answer_gap, "ms");
    line("migration: write sequence stalled", stall, "ms");
    line("power loss: answering again", answering, "ms");
    line("power loss: writing again", writing, "ms");
    println!(
        "acknowledged writes lost: {lost} of {} power losses; numbers gone back: {}; most QEMU processes holding the image's write lock at once: {most} ({lock_samples} samples)",
        b.power_losses, verdict.regressions
    );
    Ok(())
}
