//! `tandem vm migrate`: start a live migration and follow it on its source host (which drives
//! it and knows its progress) until committed state says how it ended.

use super::output::{kv, show, Output};
use std::io::Write;
use std::time::{Duration, Instant};
use tandem::client::{decode, Client, ClientError};
use tandem_agent::views::{MigrateRequest, MigrationBegun, MigrationCancelled, MigrationOutcome, MigrationsView};

/// How often the source is asked for progress.
const POLL: Duration = Duration::from_millis(200);
/// How long the CLI follows a migration before it stops waiting (the migration goes on; its own
/// bound is the convergence schedule's).
const FOLLOW_FOR: Duration = Duration::from_secs(900);

pub fn run(c: &Client, out: Output, name: &str, to: Option<String>, force: bool, cancel: bool, no_wait: bool) -> Result<(), ClientError> {
    if cancel {
        return show(out, &c.call("DELETE", &format!("/v1/vms/{name}/migrate"), None)?, kv::<MigrationCancelled>);
    }
    let answer = c.send("POST", &format!("/v1/vms/{name}/migrate"), &MigrateRequest { to, force })?;
    let begun: MigrationBegun = decode(answer.clone())?;
    if no_wait {
        return show(out, &answer, kv::<MigrationBegun>);
    }
    if out == Output::Table {
        println!("migrating {} from {} to {} (generation {})", begun.name, begun.from, begun.to, begun.generation);
        if let Some(f) = &begun.admission.forced {
            println!("forced past admission control: {f}");
        }
    }
    let source = Client { addr: begun.source_api.clone(), ..c.clone() };
    let outcome = follow(&source, &begun, out == Output::Table)?;
    match out {
        Output::Json => println!("{}", serde_json::to_string(&outcome).unwrap_or_default()),
        Output::Table => print_outcome(&outcome),
    }
    if outcome.result == "completed" {
        Ok(())
    } else {
        Err(ClientError::Refused {
            status: 409,
            message: format!("migration of {} {}: {}", outcome.name, outcome.result, outcome.reason.clone().unwrap_or_default()),
        })
    }
}

/// Polls the source until its outcome for this generation appears, drawing a progress line.
pub(super) fn follow(source: &Client, begun: &MigrationBegun, draw: bool) -> Result<MigrationOutcome, ClientError> {
    let started = Instant::now();
    let tty = draw && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last_line = String::new();
    loop {
        if started.elapsed() > FOLLOW_FOR {
            return Err(ClientError::Unavailable(format!("stopped following after {} s; see tandem migrations", FOLLOW_FOR.as_secs())));
        }
        let view: MigrationsView = match source.get_as("/v1/migrations") {
            Ok(v) => v,
            // The source may be busy or briefly unreachable; the bound above ends the wait.
            Err(_) => {
                std::thread::sleep(POLL);
                continue;
            }
        };
        if let Some(o) = view.recent.iter().rev().find(|o| o.name == begun.name && o.generation == begun.generation) {
            if tty {
                println!();
            }
            return Ok(o.clone());
        }
        if let Some(m) = view.active.iter().find(|m| m.name == begun.name && m.generation == begun.generation) {
            let line = progress_line(m.phase.as_deref().unwrap_or("waiting"), m.progress.as_ref());
            if tty {
                print!("\r{line:<100}");
                let _ = std::io::stdout().flush();
            } else if draw && line != last_line {
                println!("{line}");
            }
            last_line = line;
        }
        std::thread::sleep(POLL);
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

/// `[#####-----] 52 %  transferred 66.0 MiB, remaining 61.2 MiB, dirty 120 pages/s, expected downtime 12 ms`
pub fn progress_line(phase: &str, p: Option<&tandem_drivers::migration::MigrationProgress>) -> String {
    let Some(p) = p else { return format!("{phase}…") };
    let pct = (100 * p.total_bytes.saturating_sub(p.remaining_bytes)).checked_div(p.total_bytes).unwrap_or(0).min(100);
    let filled = (pct / 5) as usize;
    if p.status == "copying disks" {
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(20 - filled));
        return format!("{phase}: local disks [{bar}] {pct:>3} %  copied {}, remaining {}", mib(p.transferred_bytes), mib(p.remaining_bytes));
    }
    format!(
        "{phase} [{}{}] {pct:>3} %  sent {}, remaining {}, dirty {} pages/s, expected downtime {} ms (limit {} ms{})",
        "#".repeat(filled),
        "-".repeat(20 - filled),
        mib(p.transferred_bytes),
        mib(p.remaining_bytes),
        p.dirty_pages_rate,
        p.expected_downtime_ms,
        p.downtime_limit_ms,
        if p.throttling { ", throttling" } else { "" }
    )
}

/// `tandem migrations`.
pub fn print_migrations(v: &MigrationsView) {
    if v.active.is_empty() {
        println!("no live migration in progress");
    }
    for m in &v.active {
        let phase = m.phase.as_deref().unwrap_or("driven by its source");
        println!("{} {} -> {} (generation {}): {}", m.name, m.from, m.to, m.generation, progress_line(phase, m.progress.as_ref()));
    }
    if !v.recent.is_empty() {
        println!("\nlast migrations driven by {}:", v.host);
        for o in &v.recent {
            print!("  {} ", super::output::clock_time(o.finished_at_ms));
            print_outcome(o);
        }
    }
}

fn print_outcome(o: &MigrationOutcome) {
    match (&o.report, o.result.as_str()) {
        (Some(r), "completed") => println!(
            "{} now runs on {}: {:.2} s, downtime {}, {} sent ({}){}",
            o.name,
            o.to,
            r.total_ms as f64 / 1000.0,
            r.downtime_ms.map_or_else(|| "not reported".into(), |d| format!("{d} ms")),
            mib(r.transferred_bytes),
            r.steps.join(", "),
            r.disks.as_ref().map_or_else(String::new, |d| format!("; local disks copied first: {} in {:.2} s", mib(d.bytes), d.copy_ms as f64 / 1000.0))
        ),
        (_, "lost") => {
            println!("{} moved to {} by post-copy but its guest was lost: {}; it restarts there from its disk", o.name, o.to, o.reason.as_deref().unwrap_or(""))
        }
        _ => println!("{} stays on {}: {}", o.name, o.from, o.reason.as_deref().unwrap_or("aborted")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_shows_the_share_sent_and_the_figures() {
        let p = tandem_drivers::migration::MigrationProgress {
            status: "active".into(),
            transferred_bytes: 64 << 20,
            remaining_bytes: 32 << 20,
            total_bytes: 128 << 20,
            dirty_pages_rate: 120,
            expected_downtime_ms: 12,
            downtime_limit_ms: 100,
            ..Default::default()
        };
        let l = progress_line("copying", Some(&p));
        assert!(l.starts_with("copying [###############-----]  75 %"), "{l}");
        assert!(l.contains("sent 64.0 MiB") && l.contains("remaining 32.0 MiB") && l.contains("expected downtime 12 ms"), "{l}");
        assert_eq!(progress_line("preparing", None), "preparing…");
        let disks = tandem_drivers::migration::MigrationProgress {
            status: "copying disks".into(),
            transferred_bytes: 16 << 20,
            remaining_bytes: 48 << 20,
            total_bytes: 64 << 20,
            ..Default::default()
        };
        let l = progress_line("copying", Some(&disks));
        assert!(l.starts_with("copying: local disks [#####---------------]  25 %  copied 16.0 MiB, remaining 48.0 MiB"), "{l}");
    }
}
