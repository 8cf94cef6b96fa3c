//! Prometheus metrics (`GET /metrics`, text exposition format 0.0.4).
//!
//! Counters and histograms the agent updates as it works live in [`Metrics`]; gauges (liveness,
//! heartbeat ages, VMs, FTT, consensus) are read from the agent's state when scraped.

use crate::agent::Agent;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tandem_core::liveness::HostLiveness;
use tandem_core::state::{Protection, VmPhase};

/// A fixed-bucket histogram in seconds.
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

#[derive(Default)]
struct HistogramData {
    /// Per bucket (non-cumulative); the last one is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    #[must_use]
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, inner: Mutex::new(HistogramData { counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }) }
    }

    pub fn observe(&self, seconds: f64) {
        let i = self.bounds.iter().position(|b| seconds <= *b).unwrap_or(self.bounds.len());
        let mut d = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        d.counts[i] += 1;
        d.sum += seconds;
        d.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let d = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += d.counts[i];
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", d.count, d.sum, d.count);
    }
}

/// What the agent counts as it works.
pub struct Metrics {
    /// Heartbeat disk round latency (slot write, then the read of every slot).
    pub disk_write_seconds: Histogram,
    /// From a peer's death (first seen dead) to the failover committed by this coordinator.
    pub failover_seconds: Histogram,
    pub failovers: AtomicU64,
    pub vms_moved: AtomicU64,
    pub disk_write_failures: AtomicU64,
    /// Live migrations this host drove that completed: their whole time, and the guest's pause
    /// at the switchover as QEMU measured it.
    pub migration_seconds: Histogram,
    pub migration_downtime_seconds: Histogram,
    pub migrations_completed: AtomicU64,
    pub migrations_aborted: AtomicU64,
}

impl Metrics {
    /// Counts a migration this host drove: `Some` with its report when it completed.
    pub fn note_migration(&self, completed: Option<&tandem_drivers::migration::MigrationReport>) {
        match completed {
            Some(r) => {
                self.migrations_completed.fetch_add(1, Ordering::Relaxed);
                self.migration_seconds.observe(r.total_ms as f64 / 1000.0);
                if let Some(d) = r.downtime_ms {
                    self.migration_downtime_seconds.observe(d as f64 / 1000.0);
                }
            }
            None => {
                self.migrations_aborted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            disk_write_seconds: Histogram::new(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            failover_seconds: Histogram::new(&[1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0]),
            failovers: AtomicU64::new(0),
            vms_moved: AtomicU64::new(0),
            disk_write_failures: AtomicU64::new(0),
            migration_seconds: Histogram::new(&[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
            migration_downtime_seconds: Histogram::new(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0]),
            migrations_completed: AtomicU64::new(0),
            migrations_aborted: AtomicU64::new(0),
        }
    }
}

/// One metric family: `kind` is `gauge` or `counter`; each sample is (labels, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    family(out, name, "gauge", help, samples);
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    family(out, name, "counter", help, &[(String::new(), v as f64)]);
}

/// Label values are host and VM names (letters, digits, '-', '_'), which need no escaping.
fn render(a: &Agent) -> String {
    let mut out = String::new();
    let assessment = a.assessment();
    // Each site's loss, planned on a snapshot (nothing to plan without sites).
    let site_losses = {
        let snap = a.consensus.snapshot();
        snap.state.site_losses()
    };
    let (names, vms, ftt, target) = a.consensus.with_state(|s| {
        let names: Vec<(tandem_core::HostId, String)> = s.hosts.values().map(|h| (h.id, h.name.clone())).collect();
        let vms: Vec<(String, String, bool)> = s
            .vms
            .values()
            .map(|v| {
                let state = match v.phase {
                    VmPhase::Failed { .. } => "error",
                    VmPhase::Stopped | VmPhase::Stopping { .. } => "stopped",
                    VmPhase::Held { .. } => "held",
                    VmPhase::Placed { .. } => "assigned",
                    VmPhase::Migrating { .. } => "migrating",
                    VmPhase::Waiting { .. } => "waiting",
                    VmPhase::Parked { .. } => "parked",
                };
                let protection = match v.spec.protection {
                    Protection::Protect => "protect",
                    Protection::BestEffort => "best-effort",
                    Protection::Off => "off",
                };
                (state.to_string(), protection.to_string(), v.assignment().is_some_and(|x| x.host == a.me))
            })
            .collect();
        (names, vms, s.ftt_model(), s.settings.ftt_target)
    });
    let ftt = ftt.ftt(tandem_core::placement::DEFAULT_FTT_BUDGET);
    let name_of = |h: tandem_core::HostId| names.iter().find(|(id, _)| *id == h).map_or_else(|| h.to_string(), |(_, n)| n.clone());
    let mut liveness = Vec::new();
    let mut ages = Vec::new();
    for p in assessment.iter().flat_map(|x| x.peers.iter()) {
        let peer = name_of(p.host);
        for (state, l) in
            [("alive", HostLiveness::Alive), ("partitioned", HostLiveness::Partitioned), ("dead", HostLiveness::Dead), ("unknown", HostLiveness::Unknown)]
        {
            liveness.push((format!("{{peer=\"{peer}\",state=\"{state}\"}}"), f64::from(u8::from(p.liveness == l))));
        }
        if let Some(ms) = p.net_age_ms {
            ages.push((format!("{{peer=\"{peer}\",channel=\"network\"}}"), ms as f64 / 1000.0));
        }
        if let Some(ms) = p.disk_age_ms {
            ages.push((format!("{{peer=\"{peer}\",channel=\"disk\"}}"), ms as f64 / 1000.0));
        }
    }
    gauge(&mut out, "tandem_peer_liveness", "Liveness of each peer as seen by this host (1 for its current state).", &liveness);
    gauge(&mut out, "tandem_heartbeat_age_seconds", "Time since the last heartbeat from each peer, per channel.", &ages);
    let counts = a.heartbeat_counts();
    for (name, help, pick) in [
        (
            "tandem_heartbeats_received_total",
            "Network heartbeats accepted from each peer.",
            (|c: &tandem_core::liveness::HeartbeatCount| c.received) as fn(&_) -> u64,
        ),
        ("tandem_heartbeats_missed_total", "Network heartbeat sequence numbers from each peer that never arrived.", |c| c.missed),
        ("tandem_disk_heartbeats_seen_total", "Updates of each peer's heartbeat-disk slot this host read.", |c| c.disk_seen),
        ("tandem_disk_heartbeats_missed_total", "Slot updates of each peer this host never read (counter values skipped).", |c| c.disk_missed),
    ] {
        let samples: Vec<(String, f64)> = counts.iter().map(|c| (format!("{{peer=\"{}\"}}", name_of(c.host)), pick(c) as f64)).collect();
        family(&mut out, name, "counter", help, &samples);
    }
    let fenced = a.status().fenced.is_some();
    gauge(&mut out, "tandem_fenced", "1 while this host is fenced.", &[(String::new(), f64::from(u8::from(fenced)))]);
    gauge(
        &mut out,
        "tandem_disk_readable",
        "1 when this host's last heartbeat-disk read succeeded.",
        &[(String::new(), f64::from(u8::from(assessment.as_ref().is_some_and(|x| x.disk_readable))))],
    );
    let rejected = serde_json::to_value(a.reject_counters()).unwrap_or_default();
    let rejected: Vec<(String, f64)> =
        rejected.as_object().into_iter().flatten().filter_map(|(k, v)| Some((format!("{{reason=\"{k}\"}}"), v.as_u64()? as f64))).collect();
    family(&mut out, "tandem_rejected_input_total", "counter", "Heartbeats and slots rejected since start, by reason.", &rejected);
    let m = &a.metrics;
    m.disk_write_seconds.render(&mut out, "tandem_disk_write_seconds", "Heartbeat disk round latency as the liveness loop saw it: the slot write, then the read of every slot (the answer is taken at the next poll, half an interval at most after it came).");
    counter(&mut out, "tandem_disk_write_failures_total", "Heartbeat slot writes that failed or timed out.", m.disk_write_failures.load(Ordering::Relaxed));
    m.migration_seconds.render(
        &mut out,
        "tandem_migration_seconds",
        "Live migrations this host drove that completed: from the start of the copy to QEMU's completion.",
    );
    m.migration_downtime_seconds.render(
        &mut out,
        "tandem_migration_downtime_seconds",
        "The guest's pause at the switchover of those migrations, as QEMU measured it.",
    );
    counter(
        &mut out,
        "tandem_migrations_completed_total",
        "Live migrations this host drove that switched over.",
        m.migrations_completed.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "tandem_migrations_aborted_total",
        "Live migrations this host drove that ended without a switchover.",
        m.migrations_aborted.load(Ordering::Relaxed),
    );
    let mut by_state: std::collections::BTreeMap<(String, String), u64> = std::collections::BTreeMap::new();
    let mut here = 0u64;
    for (state, protection, on_me) in &vms {
        *by_state.entry((state.clone(), protection.clone())).or_default() += 1;
        here += u64::from(*on_me);
    }
    let samples: Vec<(String, f64)> = by_state.iter().map(|((s, p), n)| (format!("{{state=\"{s}\",protection=\"{p}\"}}"), *n as f64)).collect();
    gauge(&mut out, "tandem_vms", "VMs in committed state by state and protection level.", &samples);
    gauge(&mut out, "tandem_vms_assigned_here", "VMs committed state assigns to this host.", &[(String::new(), here as f64)]);
    gauge(
        &mut out,
        "tandem_vms_running_here",
        "Workloads this host's driver runs now.",
        &[(String::new(), a.driver.list().iter().filter(|v| v.exit.is_none()).count() as f64)],
    );
    let mut mirrors = Vec::new();
    for l in a.mirror_links() {
        let now = match l.state {
            tandem_core::mirroring::LinkState::Detached => "detached",
            tandem_core::mirroring::LinkState::Resyncing { .. } => "resyncing",
            tandem_core::mirroring::LinkState::InSync => "in-sync",
            tandem_core::mirroring::LinkState::Holding => "holding",
            tandem_core::mirroring::LinkState::Degraded => "degraded",
            tandem_core::mirroring::LinkState::OnOtherCopy => "on-other-copy",
            tandem_core::mirroring::LinkState::Returning { .. } => "returning",
            tandem_core::mirroring::LinkState::PathLost => "path-lost",
        };
        for state in ["detached", "resyncing", "in-sync", "holding", "degraded", "on-other-copy", "returning", "path-lost"] {
            let labels = format!("{{vm=\"{}\",disk=\"{}\",site=\"{}\",state=\"{state}\"}}", l.vm, l.disk, l.site);
            mirrors.push((labels, f64::from(u8::from(state == now))));
        }
    }
    gauge(&mut out, "tandem_mirror_state", "Each mirrored disk's link to another site's copy, at the host running its VM (1 for its current state).", &mirrors);
    counter(&mut out, "tandem_failovers_total", "Failovers this agent committed as coordinator.", m.failovers.load(Ordering::Relaxed));
    counter(&mut out, "tandem_vms_moved_total", "VMs those failovers moved.", m.vms_moved.load(Ordering::Relaxed));
    m.failover_seconds.render(&mut out, "tandem_failover_seconds", "From a host first seen dead to its failover committed.");
    gauge(&mut out, "tandem_ftt", "Failures to tolerate now.", &[(String::new(), f64::from(ftt.ftt))]);
    gauge(&mut out, "tandem_ftt_exact", "1 if tandem_ftt is exact, 0 if a lower bound.", &[(String::new(), f64::from(u8::from(ftt.exact)))]);
    if let Some(t) = target {
        gauge(&mut out, "tandem_ftt_target", "The failures-to-tolerate target admission control protects.", &[(String::new(), f64::from(t))]);
    }
    if !site_losses.is_empty() {
        let survived: Vec<(String, f64)> = site_losses.iter().map(|l| (format!("{{site=\"{}\"}}", l.site), f64::from(u8::from(l.survived())))).collect();
        gauge(&mut out, "tandem_site_loss_survived", "1 if every protected VM of the site would restart elsewhere after its loss.", &survived);
        let down: Vec<(String, f64)> = site_losses.iter().map(|l| (format!("{{site=\"{}\"}}", l.site), l.protected_down.len() as f64)).collect();
        gauge(&mut out, "tandem_site_loss_protected_down", "Protected VMs the loss of the site would leave down.", &down);
    }
    let c = a.consensus.status();
    gauge(&mut out, "tandem_consensus_leader", "1 if this host leads consensus.", &[(String::new(), f64::from(u8::from(a.consensus.is_leader())))]);
    let c = serde_json::to_value(c).unwrap_or_default();
    for (key, name, help) in [
        ("term", "tandem_consensus_term", "Current Raft term."),
        ("last_log_index", "tandem_consensus_last_log_index", "Last log index on this host."),
        ("last_applied", "tandem_consensus_last_applied", "Last log index applied on this host."),
        ("commit_lag", "tandem_consensus_commit_lag", "Log entries this host has but has not applied."),
    ] {
        if let Some(v) = c[key].as_u64() {
            gauge(&mut out, name, help, &[(String::new(), v as f64)]);
        }
    }
    out
}

/// `GET /metrics`.
pub async fn serve(State(a): State<Arc<Agent>>) -> Response {
    // On a large state the page (an FTT search among it) is heavy work: off the runtime.
    let page = Arc::clone(&a);
    match a.heavy.run(move || render(&page)).await {
        Ok(text) => ([(CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}
