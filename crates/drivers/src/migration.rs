//! Live migration through QEMU's QMP: the destination started paused on `-incoming defer`, the
//! source's `migrate` followed sample by sample under `tandem_core::convergence`'s schedule.
//!
//! The driver only moves memory and device state; who owns the VM is committed state's business
//! (see `tandem_core::state` and ARCHITECTURE.md): a completed migration leaves the source paused
//! and the destination paused, and neither resumes until committed state says which one runs.

use crate::qmp::{Qmp, QmpError};
use crate::DriverError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_core::convergence::{Convergence, ConvergenceAction, ConvergenceStep};
use tandem_core::Millis;

/// How often the source samples `query-migrate`: the completion is seen at most this late, and
/// the guest stays paused until the switchover commits (a local QMP call costs little).
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);
/// How often the source samples once the guest is stopped for the end of the copy (QEMU's
/// `device` and `pre-switchover` phases): every millisecond here is a millisecond of the guest's
/// pause, and the phase is short.
pub const CLOSING_SAMPLE_INTERVAL: Duration = Duration::from_millis(5);
/// How long a cancelled migration gets to report `cancelled` before the source gives up waiting.
pub const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// Default bandwidth cap of a migration (QEMU's own default is 128 MiB/s, too low for a LAN).
pub const DEFAULT_MAX_BANDWIDTH: u64 = 1 << 30;
/// The most parallel channels of one migration's memory stream (QEMU multifd; QEMU itself
/// allows 255, each a TCP connection and a thread on both hosts).
pub const MAX_MULTIFD_CHANNELS: u8 = 16;

/// One progress sample, as shown to operators.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigrationProgress {
    /// QEMU's status: setup, active, device, completed, failed, cancelled.
    pub status: String,
    pub elapsed_ms: u64,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    /// Pages the guest dirties per second (QEMU's estimate).
    pub dirty_pages_rate: u64,
    /// The pause QEMU expects at the switchover, ms.
    pub expected_downtime_ms: u64,
    /// The downtime limit in force, ms.
    pub downtime_limit_ms: u64,
    /// Whether throttling the guest is allowed (the schedule's last step).
    pub throttling: bool,
}

/// How a completed migration went.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigrationReport {
    pub total_ms: u64,
    /// The guest's pause at the switchover as QEMU measured it.
    pub downtime_ms: Option<u64>,
    pub transferred_bytes: u64,
    /// The schedule's steps taken, in order.
    pub steps: Vec<String>,
    /// The local disks' copy before the memory's, when the VM has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<DiskCopyReport>,
    /// Memory bytes sent over the parallel channels, when the migration used them (multifd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_bytes: Option<u64>,
    /// The memory stream (and the disk copy, if any) went over TLS, both ends verified with
    /// the cluster's certificates (as QEMU's own parameters said when it began).
    #[serde(default)]
    pub tls: bool,
    /// The migration switched to post-copy: the guest moved before all of its memory had, and
    /// the source still serves the rest (`total_ms`, `downtime_ms` and `transferred_bytes` are
    /// then as of the switch until the agent has followed it to the end).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
}

/// How the copy of a migration's local disks went (the mirror, until both copies were equal).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DiskCopyReport {
    pub copy_ms: u64,
    pub bytes: u64,
}

/// Where and how the source sends one migration.
#[derive(Clone)]
pub struct MigrationTarget {
    /// The destination's address, as its `prepare_incoming` returned it.
    pub uri: String,
    /// The destination's NBD server for the local disks, and which disks (spec indices) it
    /// receives; mirrored before memory is sent.
    pub nbd: Option<String>,
    pub disks: Vec<usize>,
    pub max_bandwidth: u64,
    /// Parallel channels of the memory stream (QEMU multifd); 0: one stream. The destination
    /// was prepared with the same number.
    pub multifd_channels: u8,
    /// Whether (and when) the VM's spec lets the migration switch to post-copy, and the bandwidth
    /// cap of that phase (bytes/s).
    pub postcopy: tandem_core::spec::Postcopy,
    pub postcopy_bandwidth: u64,
    pub stall_ms: u64,
    pub overall_ms: u64,
    /// Set to cancel; looked at every sample.
    pub cancel: Arc<AtomicBool>,
    /// Called with every sample.
    pub progress: Arc<dyn Fn(&MigrationProgress) + Send + Sync>,
    /// The clock of the schedule (the agent's).
    pub now: Arc<dyn Fn() -> Millis + Send + Sync>,
}

impl std::fmt::Debug for MigrationTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationTarget").field("uri", &self.uri).field("max_bandwidth", &self.max_bandwidth).finish_non_exhaustive()
    }
}

impl std::fmt::Display for ConvergenceStepText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            ConvergenceStep::DowntimeLimit { ms } => write!(f, "downtime limit {ms} ms"),
            ConvergenceStep::Throttle { max_pct } => write!(f, "guest throttled up to {max_pct} %"),
            ConvergenceStep::PostCopy => write!(f, "switched to post-copy"),
        }
    }
}

/// A step, as the report and the timeline word it.
pub struct ConvergenceStepText(pub ConvergenceStep);

/// Maps a QMP failure of VM `vm` into the driver's error (shared with `diskcopy`).
pub(crate) fn qmp_failed(vm: &str) -> impl Fn(QmpError) -> DriverError + '_ {
    move |source| DriverError::Qmp { vm: vm.to_string(), source }
}

/// Turns on QEMU's parallel memory channels (multifd) with `channels` connections, on either
/// side (both must agree, and the destination must before it listens); nothing for 0.
async fn set_multifd(vm: &str, q: &Qmp, timeout: Duration, channels: u8) -> Result<(), DriverError> {
    if channels == 0 {
        return Ok(());
    }
    let caps = json!({"capabilities": [{"capability": "multifd", "state": true}]});
    q.execute("migrate-set-capabilities", caps, timeout).await.map_err(qmp_failed(vm))?;
    q.execute("migrate-set-parameters", json!({"multifd-channels": channels.min(MAX_MULTIFD_CHANNELS)}), timeout).await.map_err(qmp_failed(vm))?;
    Ok(())
}

/// The destination's side, on a QEMU started with `-S -incoming defer`: listens on `host_ip`
/// (a port the kernel picks) with `multifd_channels` parallel channels (as the source will send)
/// and returns the URI the source sends to.
/// With `tls_creds` (a loaded server credentials object) it accepts only a TLS source that
/// presents a certificate of the cluster's CA.
/// With `postcopy` it is ready for the source to switch to post-copy.
pub async fn prepare_incoming(
    vm: &str,
    q: &Qmp,
    host_ip: &str,
    timeout: Duration,
    multifd_channels: u8,
    tls_creds: Option<&str>,
    postcopy: bool,
) -> Result<String, DriverError> {
    set_multifd(vm, q, timeout, multifd_channels).await?;
    if postcopy {
        crate::postcopy::enable(vm, q, timeout, None).await?;
    }
    if let Some(id) = tls_creds {
        q.execute("migrate-set-parameters", json!({"tls-creds": id}), timeout).await.map_err(qmp_failed(vm))?;
    }
    q.execute("migrate-incoming", json!({"uri": format!("tcp:{host_ip}:0")}), timeout).await.map_err(qmp_failed(vm))?;
    let info = q.execute("query-migrate", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
    let port = info
        .get("socket-address")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(|s| s.get("port"))
        .and_then(|p| p.as_str().map(str::to_string).or_else(|| p.as_u64().map(|n| n.to_string())))
        .ok_or_else(|| DriverError::Migration { vm: vm.to_string(), reason: format!("the destination did not say where it listens: {info}") })?;
    Ok(format!("tcp:{host_ip}:{port}"))
}

async fn apply_step(vm: &str, q: &Qmp, timeout: Duration, step: ConvergenceStep, disks: &[usize]) -> Result<(), DriverError> {
    let args = match step {
        ConvergenceStep::DowntimeLimit { ms } => json!({"downtime-limit": ms}),
        ConvergenceStep::Throttle { max_pct } => json!({"max-cpu-throttle": max_pct, "cpu-throttle-increment": 10}),
        ConvergenceStep::PostCopy => return crate::postcopy::switch(vm, q, timeout, disks).await,
    };
    q.execute("migrate-set-parameters", args, timeout).await.map_err(qmp_failed(vm))?;
    Ok(())
}

fn sample(info: &Value, elapsed_ms: u64, limit_ms: u64, throttling: bool) -> MigrationProgress {
    let ram = |k: &str| info.get("ram").and_then(|r| r.get(k)).and_then(Value::as_u64).unwrap_or(0);
    MigrationProgress {
        status: info.get("status").and_then(Value::as_str).unwrap_or("none").to_string(),
        elapsed_ms,
        transferred_bytes: ram("transferred"),
        remaining_bytes: ram("remaining"),
        total_bytes: ram("total"),
        dirty_pages_rate: ram("dirty-pages-rate"),
        expected_downtime_ms: info.get("expected-downtime").and_then(Value::as_u64).unwrap_or(0),
        downtime_limit_ms: limit_ms,
        throttling,
    }
}

/// Cancels and waits (bounded) for QEMU to say so: the source runs on.
async fn cancel(vm: &str, q: &Qmp, timeout: Duration, reason: String) -> DriverError {
    let _ = q.execute("migrate_cancel", Value::Null, timeout).await;
    let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
    while tokio::time::Instant::now() < deadline {
        match q.execute("query-migrate", Value::Null, timeout).await {
            Ok(info) if matches!(info.get("status").and_then(Value::as_str), Some("cancelled" | "failed")) => break,
            Ok(_) => tokio::time::sleep(SAMPLE_INTERVAL).await,
            Err(_) => break,
        }
    }
    DriverError::Migration { vm: vm.to_string(), reason }
}

/// The source's side: starts the migration and follows it to its end. `Ok` means QEMU reported
/// it completed: the source is paused from here on (its state is at the destination). With
/// `tls_creds` (a loaded client credentials object) the stream is TLS and the destination's
/// certificate must name the host of `to.uri`; QEMU's parameters are read back before it
/// begins, so a migration meant to be encrypted never goes out in the clear.
pub async fn migrate_out(vm: &str, q: &Qmp, timeout: Duration, to: &MigrationTarget, tls_creds: Option<&str>) -> Result<MigrationReport, DriverError> {
    let started = (to.now)();
    let mut schedule = Convergence::with(started, to.stall_ms, to.overall_ms).with_postcopy(to.postcopy);
    let mut limit = schedule.initial_downtime_ms();
    // Auto-converge is on from the start but capped at 1 % (QEMU refuses to change capabilities
    // during a migration); the schedule's last step raises the cap. With local disks QEMU
    // pauses before the switchover (`pre-switchover`, the guest stopped): the mirrors conclude
    // there, before QEMU inactivates the disks — a mirror still writing to its target after
    // that aborts QEMU 7.2 (`bdrv_co_write_req_prepare: Assertion !(bs->open_flags &
    // BDRV_O_INACTIVE)`, seen here), and the destination gets the device state only with its
    // disks complete. Set every time: the capability outlives one migration in the process.
    let mirrored = !to.disks.is_empty();
    let caps = json!({"capabilities": [
        {"capability": "auto-converge", "state": true},
        {"capability": "pause-before-switchover", "state": mirrored},
    ]});
    q.execute("migrate-set-capabilities", caps, timeout).await.map_err(qmp_failed(vm))?;
    set_multifd(vm, q, timeout, to.multifd_channels).await?;
    if !to.postcopy.is_off() {
        crate::postcopy::enable(vm, q, timeout, Some(to.postcopy_bandwidth)).await?;
    }
    let params = json!({"downtime-limit": limit, "max-bandwidth": to.max_bandwidth, "cpu-throttle-initial": 1, "max-cpu-throttle": 1});
    q.execute("migrate-set-parameters", params, timeout).await.map_err(qmp_failed(vm))?;
    if let Some(id) = tls_creds {
        let host = crate::migtls::uri_host(&to.uri)
            .ok_or_else(|| DriverError::Migration { vm: vm.to_string(), reason: format!("no host to verify in the destination's address {}", to.uri) })?;
        q.execute("migrate-set-parameters", json!({"tls-creds": id, "tls-hostname": host}), timeout).await.map_err(qmp_failed(vm))?;
        let set = q.execute("query-migrate-parameters", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
        if set.get("tls-creds").and_then(Value::as_str) != Some(id) {
            return Err(DriverError::Migration { vm: vm.to_string(), reason: format!("QEMU did not take the TLS credentials: {set}") });
        }
    }
    q.execute("migrate", json!({"uri": to.uri}), timeout).await.map_err(qmp_failed(vm))?;
    let mut throttling = false;
    let mut disks_concluded = false;
    let mut closing = false;
    loop {
        tokio::time::sleep(if closing { CLOSING_SAMPLE_INTERVAL } else { SAMPLE_INTERVAL }).await;
        let now = (to.now)();
        let info = match q.execute("query-migrate", Value::Null, timeout).await {
            Ok(i) => i,
            Err(e) => return Err(cancel(vm, q, timeout, format!("QEMU did not report progress: {e}")).await),
        };
        let p = sample(&info, now.since(started), limit, throttling);
        (to.progress)(&p);
        closing = matches!(p.status.as_str(), "device" | "pre-switchover");
        match p.status.as_str() {
            "pre-switchover" => {
                if let Err(e) = crate::diskcopy::complete(vm, q, timeout, &to.disks).await {
                    return Err(cancel(vm, q, timeout, e.to_string()).await);
                }
                disks_concluded = true;
                if let Err(e) = q.execute("migrate-continue", json!({"state": "pre-switchover"}), timeout).await {
                    return Err(cancel(vm, q, timeout, format!("QEMU did not go on past the pause before the switchover: {e}")).await);
                }
                continue;
            }
            "completed" if mirrored && !disks_concluded => {
                // Never seen: the capability makes QEMU pause first. Without the mirrors'
                // conclusion the destination's disks may lack the last writes.
                return Err(DriverError::Migration { vm: vm.to_string(), reason: "completed without pausing for the local disks' mirrors".into() });
            }
            "completed" => {
                let steps = schedule.applied().iter().map(|s| ConvergenceStepText(*s).to_string()).collect();
                return Ok(MigrationReport {
                    total_ms: info.get("total-time").and_then(Value::as_u64).unwrap_or(p.elapsed_ms),
                    downtime_ms: info.get("downtime").and_then(Value::as_u64),
                    transferred_bytes: p.transferred_bytes,
                    steps,
                    disks: None,
                    multifd_bytes: info.get("ram").and_then(|r| r.get("multifd-bytes")).and_then(Value::as_u64).filter(|b| *b > 0),
                    tls: tls_creds.is_some(),
                    postcopy: false,
                });
            }
            "failed" | "cancelled" => {
                let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                return Err(DriverError::Migration { vm: vm.to_string(), reason: format!("QEMU reports the migration {}: {why}", p.status) });
            }
            _ => {}
        }
        if to.cancel.load(Ordering::SeqCst) {
            return Err(cancel(vm, q, timeout, "cancelled".into()).await);
        }
        let passes = info.get("ram").and_then(|r| r.get("dirty-sync-count")).and_then(Value::as_u64).unwrap_or(0);
        match schedule.observe(now, p.remaining_bytes, passes) {
            ConvergenceAction::Continue => {}
            ConvergenceAction::Apply(ConvergenceStep::PostCopy) => {
                // From the switch on the guest can only run at the destination: the source's
                // copy is spent whatever happens next (see `postcopy`).
                apply_step(vm, q, timeout, ConvergenceStep::PostCopy, &to.disks).await?;
                let steps = schedule.applied().iter().map(|s| ConvergenceStepText(*s).to_string()).collect();
                return Ok(MigrationReport {
                    total_ms: p.elapsed_ms,
                    transferred_bytes: p.transferred_bytes,
                    steps,
                    tls: tls_creds.is_some(),
                    postcopy: true,
                    ..Default::default()
                });
            }
            ConvergenceAction::Apply(step) => {
                if let ConvergenceStep::DowntimeLimit { ms } = step {
                    limit = ms;
                }
                throttling |= matches!(step, ConvergenceStep::Throttle { .. });
                if let Err(e) = apply_step(vm, q, timeout, step, &to.disks).await {
                    return Err(cancel(vm, q, timeout, format!("could not apply {}: {e}", ConvergenceStepText(step))).await);
                }
            }
            ConvergenceAction::Cancel { reason } => return Err(cancel(vm, q, timeout, reason).await),
        }
    }
}

/// How long a failed or cancelled migration's source gets to run its guest again: QEMU marks the
/// migration failed before its migration thread restarts the vCPUs it stopped for the completion.
pub const RESUME_AFTER_FAILURE_WAIT: Duration = Duration::from_secs(2);

/// After a migration that did not complete: QEMU's run state once it has had
/// [`RESUME_AFTER_FAILURE_WAIT`] to restart the guest — `running`, or the state it stayed in
/// (`finish-migrate`, `postmigrate`, `paused`), which the caller must treat as a paused copy.
pub async fn state_after_failure(vm: &str, q: &Qmp, timeout: Duration) -> Result<String, DriverError> {
    let deadline = tokio::time::Instant::now() + RESUME_AFTER_FAILURE_WAIT;
    loop {
        let info = q.execute("query-status", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
        let status = info.get("status").and_then(Value::as_str).unwrap_or("unknown").to_string();
        if info.get("running").and_then(Value::as_bool) == Some(true) || tokio::time::Instant::now() >= deadline {
            return Ok(status);
        }
        tokio::time::sleep(SAMPLE_INTERVAL).await;
    }
}

/// Resumes a paused guest (`cont`), then has QEMU announce its NICs' addresses again.
///
/// Why announce again: an incoming QEMU announces when its migration completes, while the
/// guest is still paused awaiting the switchover's commit — which may take seconds when the
/// leader is lost meanwhile — and a source resumed after a migration that completed but was not
/// committed never announced at all, while its destination did. Either way the bridge may
/// forward the VM's address to the wrong host until its forwarding entry ages out (minutes);
/// the announcement after `cont` points it where the guest now runs. A QEMU without
/// `announce-self` (before 4.0) resumes all the same.
pub async fn resume(vm: &str, q: &Qmp, timeout: Duration) -> Result<(), DriverError> {
    q.execute("cont", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
    let rounds = json!({"initial": 0, "max": 250, "rounds": 4, "step": 100});
    if let Err(e) = q.execute("announce-self", rounds, timeout).await {
        tracing::warn!("{vm}: resumed, but QEMU did not announce its addresses: {e}");
    }
    Ok(())
}
