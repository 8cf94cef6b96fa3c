//! Storage path failover: a mirrored disk whose local copy fails goes on on the other site's
//! copy, in the same QEMU process — no restart.
//!
//! A mirrored disk is opened with `werror=stop,rerror=stop`: when its site's storage fails a
//! request, QEMU pauses the guest (`io-error`) and keeps the request to retry, instead of
//! handing the guest an error. The failed request reached neither copy (the write-blocking
//! mirror writes the local copy first and the other copy only after it succeeded), so while
//! the mirror is in sync the other copy holds every write the guest saw acknowledged. Completing
//! the mirror job then makes QEMU replace the disk's node by the mirror's target — the NBD
//! client on the other site's copy — and the guest, resumed, retries its request there.
//! Whether the switch is allowed (the mirror in sync, the local copy committed stale first) is
//! the agent's and the core's to decide; this module only reads the pause and makes the switch.
//!
//! The way back, once the local storage answers again ([`ReturnStep`]): the local copy is
//! opened again and brought up to date with what the guest wrote since the switch — a dirty
//! bitmap added at the switch records it, and `catchup` copies it in rounds (QEMU 7.2's
//! `blockdev-mirror` takes no bitmap, its `blockdev-backup` does). Once little is left, the
//! guest is paused, the agent commits the local copy current again, the last round copies the
//! rest, the disk moves onto the local copy, a new mirror into the other copy starts from that
//! instant (`sync: none`: both are equal while the guest is paused), and the guest resumes.
//! Without the bitmap, the disk is mirrored back whole, write-blocking, and that mirror is
//! completed instead.

pub mod catchup;

use crate::qmp::{Qmp, QmpError};
use crate::syncmirror::{job_id, judge, judge_job, remote_node, MirrorSample};
use serde_json::{json, Value};
use std::time::Duration;
use thiserror::Error;

/// How long the mirror job may take to conclude once asked to complete (the guest is paused
/// meanwhile, so nothing is left to copy: it concludes at once unless QEMU is stuck).
pub const SWITCH_WAIT: Duration = Duration::from_secs(5);

/// Errors of a switch to the other copy.
#[derive(Debug, Error)]
pub enum PathSwitchError {
    #[error("QMP of VM '{vm}' failed while it {what}")]
    Qmp {
        vm: String,
        what: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("disk {disk} of VM '{vm}' cannot switch to the other copy: its mirror is {sample:?}, not in sync")]
    NotInSync { vm: String, disk: usize, sample: MirrorSample },
    #[error("the mirror of disk {disk} of VM '{vm}' did not conclude within {SWITCH_WAIT:?} after its completion")]
    Stuck { vm: String, disk: usize },
    #[error("the mirror of disk {disk} of VM '{vm}' ended with an error instead of switching: {reason}")]
    Failed { vm: String, disk: usize, reason: String },
    #[error("disk {disk} of VM '{vm}' does not run on the expected copy after the switch (its node is '{node}')")]
    NotSwitched { vm: String, disk: usize, node: String },
    #[error("disk {disk} of VM '{vm}': its site's copy at {path} does not answer a read within {PROBE_TIMEOUT:?}")]
    NotAnswering { vm: String, disk: usize, path: String },
}

fn qmp_err(vm: &str, what: &'static str) -> impl FnOnce(QmpError) -> PathSwitchError {
    let vm = vm.to_string();
    move |source| PathSwitchError::Qmp { vm, what, source }
}

/// The disks (by index) whose local storage failed a request and paused the guest: QEMU's
/// `io-error` status and each device's `io-status`. Empty when the guest is not paused by one.
pub async fn failed_disks(vm: &str, q: &Qmp, timeout: Duration) -> Result<Vec<usize>, PathSwitchError> {
    let status = q.execute("query-status", Value::Null, timeout).await.map_err(qmp_err(vm, "read its run state"))?;
    if status.get("status").and_then(Value::as_str) != Some("io-error") {
        return Ok(Vec::new());
    }
    let block = q.execute("query-block", Value::Null, timeout).await.map_err(qmp_err(vm, "read its disks"))?;
    Ok(failed_in(&block))
}

/// A `query-block` answer's disks (`disk{i}`) whose `io-status` is not `ok`.
#[must_use]
pub fn failed_in(block: &Value) -> Vec<usize> {
    let devices = block.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut out: Vec<usize> = devices
        .iter()
        .filter(|d| d.get("io-status").and_then(Value::as_str).is_some_and(|s| s != "ok"))
        .filter_map(|d| d.get("device").and_then(Value::as_str)?.strip_prefix("disk")?.parse().ok())
        .collect();
    out.sort_unstable();
    out
}

/// The node a disk's device reads and writes now.
async fn device_node(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<String, PathSwitchError> {
    let block = q.execute("query-block", Value::Null, timeout).await.map_err(qmp_err(vm, "read its disks"))?;
    let device = format!("disk{disk}");
    let node = block
        .as_array()
        .and_then(|a| a.iter().find(|d| d.get("device").and_then(Value::as_str) == Some(device.as_str())))
        .and_then(|d| d.pointer("/inserted/node-name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    Ok(node.to_string())
}

/// Switches disk `disk` onto the other site's copy: completes its mirror (which must be in
/// sync), waits for the job to conclude, dismisses it, and checks that the device now runs on
/// the NBD node. The guest stays paused: the caller resumes it (`cont`), and its failed
/// request is retried on the other copy.
pub async fn switch_to_copy(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), PathSwitchError> {
    let id = job_id(disk);
    let jobs = q.execute("query-block-jobs", Value::Null, timeout).await.map_err(qmp_err(vm, "read its mirror"))?;
    match judge(&jobs, disk) {
        MirrorSample::InSync => {}
        sample => return Err(PathSwitchError::NotInSync { vm: vm.to_string(), disk, sample }),
    }
    complete(vm, q, timeout, disk, &id).await?;
    let node = device_node(vm, q, timeout, disk).await?;
    if node != remote_node(disk) {
        return Err(PathSwitchError::NotSwitched { vm: vm.to_string(), disk, node });
    }
    // The guest is still paused: the bitmap misses no write made on the other copy. Without
    // it the way back is a full copy, so its failure does not undo the switch.
    if let Err(e) = catchup::mark_switch(vm, q, timeout, disk).await {
        tracing::warn!("{vm} disk {disk}: the way back will copy the whole disk: {}", crate::copychannel::chain(&e));
    }
    Ok(())
}

/// Completes mirror job `id` (QEMU then runs the disk on its target), waits for it to
/// conclude and dismisses it.
async fn complete(vm: &str, q: &Qmp, timeout: Duration, disk: usize, id: &str) -> Result<(), PathSwitchError> {
    q.execute("block-job-complete", json!({"device": id}), timeout).await.map_err(qmp_err(vm, "completed its mirror"))?;
    wait_concluded(vm, q, timeout, disk, id, SWITCH_WAIT).await
}

/// Waits up to `wait` for job `id` of disk `disk` to conclude (none is fine) and dismisses it;
/// an error if it ended with one, or took longer.
pub(super) async fn wait_concluded(vm: &str, q: &Qmp, timeout: Duration, disk: usize, id: &str, wait: Duration) -> Result<(), PathSwitchError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let jobs = q.execute("query-jobs", Value::Null, timeout).await.map_err(qmp_err(vm, "read its block job"))?;
        let job = jobs.as_array().and_then(|a| a.iter().find(|j| j.get("id").and_then(Value::as_str) == Some(id))).cloned();
        match job {
            None => return Ok(()),
            Some(j) if j.get("status").and_then(Value::as_str) == Some("concluded") => {
                let error = j.get("error").and_then(Value::as_str).map(str::to_string);
                let _ = q.execute("job-dismiss", json!({"id": id}), timeout).await;
                return match error {
                    Some(reason) => Err(PathSwitchError::Failed { vm: vm.to_string(), disk, reason }),
                    None => Ok(()),
                };
            }
            Some(_) if tokio::time::Instant::now() >= deadline => return Err(PathSwitchError::Stuck { vm: vm.to_string(), disk }),
            Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Resumes a guest paused by an I/O error (its failed requests are retried).
pub async fn resume(vm: &str, q: &Qmp, timeout: Duration) -> Result<(), PathSwitchError> {
    q.execute("cont", json!({}), timeout).await.map_err(qmp_err(vm, "resumed"))?;
    Ok(())
}

/// How long a read of the local copy may take before its storage counts as not answering.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads of local copies under way: at most one per file, so that storage that hangs holds at
/// most one thread per copy however often the way back is tried.
#[derive(Default)]
pub struct StorageProbes {
    in_flight: std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>,
}

/// What a direct read of a copy got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeAnswer {
    Answers,
    /// An error (or no such file).
    Fails,
    /// No answer within [`PROBE_TIMEOUT`] (or an earlier read of it has none yet).
    Hangs,
}

impl StorageProbes {
    /// Whether the copy at `path` answers a direct read of its first 4 KiB within
    /// [`PROBE_TIMEOUT`] — before QEMU is asked to open it (an open on hung storage would
    /// stall QEMU's main loop, and the guest with it).
    pub async fn answers(self: &std::sync::Arc<Self>, path: &std::path::Path) -> bool {
        self.probe(path).await == ProbeAnswer::Answers
    }

    /// What a direct read of the first 4 KiB of the copy at `path` gets. A read of it already
    /// under way (the storage watch's and the way back's meet) is waited for first, within the
    /// same bound: one that does not end in time means the storage hangs.
    pub async fn probe(self: &std::sync::Arc<Self>, path: &std::path::Path) -> ProbeAnswer {
        let waited = tokio::time::Instant::now();
        while !self.lock().insert(path.to_path_buf()) {
            if waited.elapsed() >= PROBE_TIMEOUT {
                return ProbeAnswer::Hangs;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (probes, owned) = (std::sync::Arc::clone(self), path.to_path_buf());
        let read = tokio::task::spawn_blocking(move || {
            let ok = read_direct(&owned).is_ok();
            probes.lock().remove(&owned);
            ok
        });
        match tokio::time::timeout(PROBE_TIMEOUT, read).await {
            Ok(Ok(true)) => ProbeAnswer::Answers,
            Ok(_) => ProbeAnswer::Fails,
            Err(_) => ProbeAnswer::Hangs,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<std::path::PathBuf>> {
        self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One 4 KiB read with `O_DIRECT` (the page cache must not answer for the storage).
fn read_direct(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
    let mut buf = vec![0u8; 8192];
    let at = buf.as_ptr().align_offset(4096);
    let block = buf.get_mut(at..at + 4096).ok_or_else(|| std::io::Error::other("no aligned block"))?;
    file.read_at(block, 0).map(|_| ())
}

/// A step of a disk's return to its own site's copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReturnStep {
    /// Open the local copy (`relative` to the site's storage, in `format`) and mirror the disk
    /// back into it.
    Start { relative: String, format: String },
    /// Pause the guest before the local copy is committed current again (a way back by rounds
    /// copies its last round then: the copies are equal when it returns).
    Pause,
    /// Complete the way back (the guest paused, the local copy committed current), mirror into
    /// the other copy again, resume the guest.
    Finish,
    /// Resume the guest without finishing (the commit failed).
    Resume,
    /// Give the way back up (its mirror stopped or ended: the local copy failed again).
    Abandon,
    /// Never switched (the other copy was not in sync): resume the guest on its own copy
    /// (`relative`), whose storage answers again — its failed request is retried there.
    Retry { relative: String },
}

/// The mirror back into disk `disk`'s local copy.
#[must_use]
pub fn back_job_id(disk: usize) -> String {
    format!("tandem-back{disk}")
}

/// The node of disk `disk`'s local copy, opened again for the way back.
#[must_use]
pub fn local_node(disk: usize) -> String {
    format!("tandem-local{disk}")
}

/// Where the way back into disk `disk`'s local copy stands (`block_jobs`: `query-block-jobs`);
/// a way back by rounds is moved on (`catchup::advance`).
pub async fn back_sample(vm: &str, q: &Qmp, timeout: Duration, disk: usize, block_jobs: &Value) -> Result<MirrorSample, PathSwitchError> {
    let id = back_job_id(disk);
    let mirror = block_jobs.as_array().and_then(|a| a.iter().find(|j| j.get("device").and_then(Value::as_str) == Some(id.as_str())));
    if mirror.is_some_and(|j| j.get("type").and_then(Value::as_str) == Some("mirror")) {
        return Ok(judge_job(block_jobs, &id));
    }
    let jobs = q.execute("query-jobs", Value::Null, timeout).await.map_err(qmp_err(vm, "read its way back"))?;
    let round = jobs.as_array().and_then(|a| a.iter().find(|j| j.get("id").and_then(Value::as_str) == Some(id.as_str())));
    if round.is_none() {
        // No round under way: a way back by rounds only if the writes since the switch are
        // recorded and the local copy is open (else switched, the way back not started).
        let nodes = catchup::nodes(vm, q, timeout).await?;
        let local = local_node(disk);
        let open = nodes.as_array().is_some_and(|a| a.iter().any(|n| n.get("node-name").and_then(Value::as_str) == Some(local.as_str())));
        if catchup::rounds_in(&nodes, disk).is_empty() || !open {
            return Ok(MirrorSample::Absent);
        }
    }
    catchup::advance(vm, q, timeout, disk, round).await
}

/// The options of a protocol node that opens the copy at `path` itself (no local copy server).
#[must_use]
pub fn file_node(path: &std::path::Path) -> Value {
    json!({"driver": "file", "filename": path.display().to_string(), "cache": {"direct": true}, "auto-read-only": false})
}

/// Runs `step` of disk `disk`'s return (`local`: the options of the local copy's protocol node
/// — its file, or its local copy server's NBD client — for `Start`).
pub async fn return_step(vm: &str, q: &Qmp, timeout: Duration, disk: usize, step: &ReturnStep, local: &Value) -> Result<(), PathSwitchError> {
    match step {
        ReturnStep::Start { format, .. } => start_return(vm, q, timeout, disk, local, format).await,
        ReturnStep::Pause => pause_return(vm, q, timeout, disk).await,
        ReturnStep::Finish => finish_return(vm, q, timeout, disk).await,
        ReturnStep::Resume | ReturnStep::Retry { .. } => resume(vm, q, timeout).await,
        ReturnStep::Abandon => {
            abandon_return(vm, q, timeout, disk).await?;
            // A guest write that waited for the way back's copy of its old data failed with it
            // (the copy cut, or its storage failing; the guest paused on it): with the way back
            // gone, it is retried on the other copy.
            if failed_disks(vm, q, timeout).await?.contains(&disk) {
                resume(vm, q, timeout).await?;
            }
            Ok(())
        }
    }
}

async fn start_return(vm: &str, q: &Qmp, timeout: Duration, disk: usize, local: &Value, format: &str) -> Result<(), PathSwitchError> {
    abandon_return(vm, q, timeout, disk).await?;
    let node = json!({"driver": format, "node-name": local_node(disk), "cache": {"direct": true}, "auto-read-only": false, "file": local});
    q.execute("blockdev-add", node, timeout).await.map_err(qmp_err(vm, "opened its site's copy again"))?;
    if catchup::recorded(vm, q, timeout, disk).await? {
        // What the guest wrote since the switch is recorded: only that is copied, in rounds.
        if let Err(e) = catchup::start(vm, q, timeout, disk).await {
            let _ = q.execute("blockdev-del", json!({"node-name": local_node(disk)}), timeout).await;
            return Err(e);
        }
        return Ok(());
    }
    let job = json!({"job-id": back_job_id(disk), "device": format!("disk{disk}"), "target": local_node(disk), "sync": "full",
        "copy-mode": "write-blocking", "on-target-error": "stop", "on-source-error": "stop", "auto-dismiss": false});
    if let Err(e) = q.execute("blockdev-mirror", job, timeout).await {
        let _ = q.execute("blockdev-del", json!({"node-name": local_node(disk)}), timeout).await;
        return Err(qmp_err(vm, "mirrored back into its site's copy")(e));
    }
    Ok(())
}

/// Pauses the guest; a way back by rounds then copies its last round, so that the local copy
/// equals the other before the agent commits it current. If that fails, the guest resumes (on
/// the other copy) and the error is returned.
async fn pause_return(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), PathSwitchError> {
    q.execute("stop", json!({}), timeout).await.map_err(qmp_err(vm, "paused for the way back"))?;
    // The local copy is committed current once this returns: what was copied into it must be
    // on stable storage, not in a volatile cache. A full mirror back is still its writer, so
    // the `stop` flushed it; the rounds' last job has ended by now, and only a new writer's
    // readiness flushes it (`catchup::flush_local`).
    let caught_up = match catchup::recorded(vm, q, timeout, disk).await {
        Ok(true) => match catchup::last_round(vm, q, timeout, disk).await {
            Ok(()) => catchup::flush_local(vm, q, timeout, disk).await,
            Err(e) => Err(e),
        },
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = caught_up {
        let _ = resume(vm, q, timeout).await;
        return Err(e);
    }
    Ok(())
}

async fn finish_return(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), PathSwitchError> {
    if catchup::recorded(vm, q, timeout, disk).await? {
        // The last round was copied when the guest paused: the copies are equal.
        catchup::finish(vm, q, timeout, disk).await?;
    } else {
        let jobs = q.execute("query-block-jobs", Value::Null, timeout).await.map_err(qmp_err(vm, "read its mirror back"))?;
        match judge_job(&jobs, &back_job_id(disk)) {
            MirrorSample::InSync => {}
            sample => return Err(PathSwitchError::NotInSync { vm: vm.to_string(), disk, sample }),
        }
        complete(vm, q, timeout, disk, &back_job_id(disk)).await?;
    }
    let node = device_node(vm, q, timeout, disk).await?;
    if node != local_node(disk) {
        return Err(PathSwitchError::NotSwitched { vm: vm.to_string(), disk, node });
    }
    let job = json!({"job-id": job_id(disk), "device": format!("disk{disk}"), "target": remote_node(disk), "sync": "none",
        "copy-mode": "write-blocking", "on-target-error": "stop", "on-source-error": "stop", "auto-dismiss": false});
    q.execute("blockdev-mirror", job, timeout).await.map_err(qmp_err(vm, "mirrored into the other copy again"))?;
    resume(vm, q, timeout).await
}

/// Cancels the way back and closes the local copy's node (nothing to do when there is none).
async fn abandon_return(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), PathSwitchError> {
    match crate::syncmirror::end_job_and_node(q, timeout, &back_job_id(disk), &local_node(disk), SWITCH_WAIT).await {
        Ok(true) => catchup::keep_unfinished(vm, q, timeout, disk).await,
        Ok(false) => Err(PathSwitchError::Stuck { vm: vm.to_string(), disk }),
        Err((what, source)) => Err(PathSwitchError::Qmp { vm: vm.to_string(), what, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe that meets another read of the same copy waits for it rather than calling the
    /// storage hung; one that is never done within the bound is a hang. (Whether the read
    /// itself answers depends on the test's file system taking `O_DIRECT`.)
    #[tokio::test]
    async fn a_probe_waits_for_a_read_of_the_same_copy_under_way() {
        let probes = std::sync::Arc::new(StorageProbes::default());
        let path = std::path::PathBuf::from(format!("/nonexistent-tandem-probe-{}", std::process::id()));
        assert_eq!(probes.probe(&path).await, ProbeAnswer::Fails, "no such file");
        probes.lock().insert(path.clone());
        let (p, at) = (std::sync::Arc::clone(&probes), path.clone());
        let done = tokio::spawn(async move { p.probe(&at).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        probes.lock().remove(&path);
        assert_eq!(done.await.expect("probe"), ProbeAnswer::Fails, "waited for the other read, then read itself");
        probes.lock().insert(path.clone());
        let started = std::time::Instant::now();
        assert_eq!(probes.probe(&path).await, ProbeAnswer::Hangs, "the other read never ends");
        assert!(started.elapsed() >= PROBE_TIMEOUT);
    }

    #[test]
    fn a_disk_whose_storage_failed_is_read_from_query_block() {
        let block = json!([
            {"device": "disk0", "io-status": "ok", "inserted": {"node-name": "a"}},
            {"device": "disk2", "io-status": "failed", "inserted": {"node-name": "b"}},
            {"device": "disk1", "io-status": "nospace"},
            {"device": "cdrom", "io-status": "failed"},
            {"device": "disk3"}
        ]);
        assert_eq!(failed_in(&block), vec![1, 2]);
        assert!(failed_in(&json!([])).is_empty());
    }
}
