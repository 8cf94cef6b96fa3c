//! Post-copy over QMP: the switch, the source serving the pages its guest left behind, and the
//! destination watching that they keep coming.
//!
//! The guest's vCPUs leave the source for good at the switch, and the switchover is committed
//! only after it (see `agent/migration` and ARCHITECTURE.md): from then on the destination owns
//! the VM and runs it while the source still sends the pages it lacks. Two things make that safe
//! whatever QEMU does on a failure:
//! - The source's vCPUs are stopped by a QMP `stop` before `migrate-start-postcopy`. QEMU
//!   restarts a guest whose migration failed only if it was running when the migration stopped
//!   it (its `vm_was_running`, later `vm_old_state`); releases before 10.0 did so even in
//!   post-copy, with the destination already running. Stopped first, it stays stopped.
//! - The source's copy is marked spent (`QemuDriver`'s resume refuses it): its memory is no
//!   longer whole, and nothing here ever runs it again. It is killed once the last page went.
//!
//! The destination, resumed in post-copy, fetches missing pages from the source; if the source
//! or the link is lost, QEMU pauses the migration (`postcopy-paused`) and the guest stalls on
//! the first page it lacks. Its copy is then of no use: [`watch_incoming`] reports it, the driver
//! kills it, and the reconciler restarts the VM from its disk.

use crate::launcher::Launcher;
use crate::migration::{qmp_failed, SAMPLE_INTERVAL};
use crate::qmp::Qmp;
use crate::DriverError;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long the switch may take: QEMU stops the guest, sends the device state, and reports
/// `postcopy-active` (one device state over the link).
pub const SWITCH_WAIT: Duration = Duration::from_secs(30);
/// How often a destination in post-copy looks at its migration: a lost source is noticed at
/// most this late (the guest already stalls on missing pages by then).
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Turns on post-copy on either side (both must, the destination before it listens), with
/// `bandwidth` bytes/s for the post-copy phase on the source (`None` on the destination).
pub async fn enable(vm: &str, q: &Qmp, timeout: Duration, bandwidth: Option<u64>) -> Result<(), DriverError> {
    let caps = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]});
    q.execute("migrate-set-capabilities", caps, timeout).await.map_err(qmp_failed(vm))?;
    if let Some(b) = bandwidth {
        q.execute("migrate-set-parameters", json!({"max-postcopy-bandwidth": b}), timeout).await.map_err(qmp_failed(vm))?;
    }
    Ok(())
}

/// The source's switch: stops the guest (so that no failure path of QEMU ever restarts it), asks
/// for post-copy, and returns once QEMU reports `postcopy-active` with the vCPUs stopped — the
/// device state is on its way and the guest can only run at the destination from now on. `Err`
/// if QEMU ended the migration instead; the guest is then left stopped here (QEMU restarts only a
/// guest it stopped itself), a paused copy for the caller to judge.
pub async fn switch(vm: &str, q: &Qmp, timeout: Duration, disks: &[usize]) -> Result<(), DriverError> {
    q.execute("stop", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
    q.execute("migrate-start-postcopy", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
    let deadline = tokio::time::Instant::now() + SWITCH_WAIT;
    loop {
        let info = q.execute("query-migrate", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
        match info.get("status").and_then(Value::as_str).unwrap_or("none") {
            // With local disks QEMU pauses before the switch (see `migration::migrate_out`):
            // their mirrors conclude in sync first, the guest already stopped.
            "pre-switchover" => {
                crate::diskcopy::complete(vm, q, timeout, disks).await?;
                q.execute("migrate-continue", json!({"state": "pre-switchover"}), timeout).await.map_err(qmp_failed(vm))?;
                continue;
            }
            "postcopy-active" | "completed" => {
                let run = q.execute("query-status", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
                if run.get("running").and_then(Value::as_bool) == Some(false) {
                    return Ok(());
                }
            }
            "failed" | "cancelled" | "postcopy-paused" => {
                let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                return Err(DriverError::Migration { vm: vm.to_string(), reason: format!("the switch to post-copy failed: {why}") });
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DriverError::Migration { vm: vm.to_string(), reason: format!("post-copy not active after {SWITCH_WAIT:?}") });
        }
        tokio::time::sleep(SAMPLE_INTERVAL).await;
    }
}

/// How the source's post-copy phase ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// QEMU's total time of the migration, ms.
    pub total_ms: Option<u64>,
    /// The guest's pause at the switch as QEMU measured it, ms.
    pub downtime_ms: Option<u64>,
    pub transferred_bytes: u64,
}

/// The source after the switch: follows its migration until QEMU reports every page sent
/// (`completed`), within `bound`. `Err` when it failed, paused (the destination or the link is
/// gone) or outlasted the bound: the destination's copy cannot be whole.
pub async fn serve(vm: &str, q: &Qmp, timeout: Duration, bound: Duration) -> Result<Served, DriverError> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let info = q.execute("query-migrate", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
        match info.get("status").and_then(Value::as_str).unwrap_or("none") {
            "completed" => {
                let total_ms = info.get("total-time").and_then(Value::as_u64);
                // QEMU 7.2 sometimes reports a post-copy downtime of days (seen here: 51,244,810
                // ms for a 5.8 s migration): a downtime longer than the migration is dropped.
                let downtime_ms = info.get("downtime").and_then(Value::as_u64).filter(|d| total_ms.is_none_or(|t| *d <= t));
                return Ok(Served {
                    total_ms,
                    downtime_ms,
                    transferred_bytes: info.get("ram").and_then(|r| r.get("transferred")).and_then(Value::as_u64).unwrap_or(0),
                });
            }
            s @ ("failed" | "cancelled" | "postcopy-paused") => {
                return Err(DriverError::Migration { vm: vm.to_string(), reason: format!("post-copy {s} before every page was sent") });
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DriverError::Migration { vm: vm.to_string(), reason: format!("post-copy still sending pages after {bound:?}") });
        }
        tokio::time::sleep(SAMPLE_INTERVAL).await;
    }
}

/// Whether a destination's incoming migration is still in post-copy (pages still to come).
pub async fn incoming_active(vm: &str, q: &Qmp, timeout: Duration) -> Result<bool, DriverError> {
    let info = q.execute("query-migrate", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
    Ok(info.get("status").and_then(Value::as_str) == Some("postcopy-active"))
}

/// A destination resumed in post-copy: follows its incoming migration until every page arrived
/// (`Ok`), or says why its copy can never be whole (`Err`: the migration paused or failed — the
/// source or the link is gone — or QEMU stopped answering).
pub async fn watch_incoming(q: &Qmp, timeout: Duration) -> Result<(), String> {
    loop {
        let info = q.execute("query-migrate", Value::Null, timeout).await.map_err(|e| format!("QEMU did not say how its post-copy goes: {e}"))?;
        match info.get("status").and_then(Value::as_str).unwrap_or("none") {
            "completed" => return Ok(()),
            "postcopy-active" => {}
            other => return Err(format!("its post-copy migration is {other}: the pages still at the source are lost")),
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

/// What the QEMU driver knows of its copies' post-copy migrations, by VM name (a host holds at
/// most one copy of a VM).
#[derive(Default)]
pub struct PostcopyCopies {
    /// Paused incoming copies prepared to receive a post-copy migration.
    prepared: Mutex<HashSet<String>>,
    /// Copies whose migration switched to post-copy: their memory is no longer whole, and they
    /// never run again.
    spent: Mutex<HashSet<String>>,
    /// Copies resumed in post-copy whose last pages have not arrived yet: QEMU refuses to send
    /// such a VM on ("duplicate yank instance" on 7.2) until its arrival has ended.
    arriving: Arc<Mutex<HashSet<String>>>,
}

fn guard(m: &Mutex<HashSet<String>>) -> MutexGuard<'_, HashSet<String>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PostcopyCopies {
    /// A new copy of `name` starts here: nothing of an older one applies.
    pub fn started_afresh(&self, name: &str) {
        guard(&self.spent).remove(name);
        guard(&self.prepared).remove(name);
    }

    /// `name`'s paused incoming copy is ready for post-copy.
    pub fn prepared(&self, name: &str) {
        guard(&self.prepared).insert(name.to_string());
    }

    /// Whether `name`'s copy, being resumed, was prepared for post-copy (asked once).
    pub fn take_prepared(&self, name: &str) -> bool {
        guard(&self.prepared).remove(name)
    }

    /// `name`'s copy here switched to post-copy: it never resumes.
    pub fn spend(&self, name: &str) {
        guard(&self.spent).insert(name.to_string());
    }

    #[must_use]
    pub fn is_spent(&self, name: &str) -> bool {
        guard(&self.spent).contains(name)
    }

    /// A copy resumed in post-copy: if its pages stop coming (the source or the link is gone),
    /// it can never be whole — killed as a crash, so that the reconciler restarts the VM from
    /// its disk. The watch ends when every page has arrived, or with the copy.
    pub fn watch(&self, name: &str, q: Arc<Qmp>, timeout: Duration, launcher: Launcher) {
        let (name, arriving) = (name.to_string(), Arc::clone(&self.arriving));
        guard(&arriving).insert(name.clone());
        tokio::spawn(async move {
            if let Err(why) = watch_incoming(&q, timeout).await {
                if launcher.is_running(&name) {
                    tracing::error!("{name}: {why}; killing this copy so that it is started afresh from its disk");
                    launcher.signal(&name, libc::SIGKILL, false);
                }
            }
            guard(&arriving).remove(&name);
        });
    }

    /// Waits (bounded by [`SWITCH_WAIT`]) until VM `name` has no post-copy arrival under way
    /// here: a migration out of it cannot begin before.
    pub async fn arrived(&self, name: &str) -> Result<(), DriverError> {
        let deadline = tokio::time::Instant::now() + SWITCH_WAIT;
        while guard(&self.arriving).contains(name) {
            if tokio::time::Instant::now() >= deadline {
                return Err(DriverError::Migration { vm: name.to_string(), reason: "its own arrival by post-copy has not ended".into() });
            }
            tokio::time::sleep(SAMPLE_INTERVAL).await;
        }
        Ok(())
    }
}
