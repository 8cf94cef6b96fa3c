//! Synchronous mirroring of a VM's disk to the other site's copy, by QEMU's own block layer: an
//! NBD client node (`tandem-remote{i}`) on the copy the other site serves (see `sitecopy`),
//! reached through the agent's relay (see `copyrelay`), and a write-blocking `blockdev-mirror`
//! (`tandem-sync{i}`) from the VM's disk into it. Once the job is ready every guest write
//! completes only when both copies have it.
//!
//! When the other copy stops answering, the relay holds QEMU's connection: the copy's writes
//! wait, and with them the guest's. When the agent lets them go (the relay closes QEMU's side,
//! once the cluster committed that copy as stale), the NBD client — `reconnect-delay` 0: no
//! hold of its own — fails them at once; the job stops (`on-target-error=stop`), keeping in its
//! dirty bitmap every range the other copy missed, and the guest's writes complete on the local
//! copy alone. When the copy is reachable again, resuming the job copies only the ranges in its
//! bitmap; it is in sync once the job is ready again with nothing left.

use crate::qmp::{Qmp, QmpError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::Duration;
use thiserror::Error;

/// How long a detached job may take to conclude after its forced cancel.
pub const DETACH_WAIT: Duration = Duration::from_secs(10);

/// Errors of a synchronous mirror.
#[derive(Debug, Error)]
pub enum SyncMirrorError {
    #[error("QMP of VM '{vm}' failed while it {what}")]
    Qmp {
        vm: String,
        what: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("the mirror of disk {disk} of VM '{vm}' did not conclude within {DETACH_WAIT:?}")]
    Detach { vm: String, disk: usize },
}

/// The other site's copy of one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteCopy {
    /// The disk's index in the VM spec.
    pub disk: usize,
    /// The relay's unix socket (`copyrelay`): never the copy server itself, whose connection
    /// could end without the agent's consent and let writes complete on one copy.
    pub relay: std::path::PathBuf,
    /// The export's name (`sitecopy::export_name`).
    pub export: String,
    /// The mirror's granularity: the chunk of the copy's sums, when the relay compares with
    /// them (so that the bulk copy's writes cover whole chunks); QEMU's default otherwise.
    pub granularity: Option<u64>,
    /// The job's `speed`, bytes/s: a cap on its own copying — the first copy and the copy of
    /// the ranges a loss left dirty — not on the guest's writes, which a write-blocking mirror
    /// sends as they come (QEMU's active writes pass no rate limit). `None`: no cap.
    pub speed: Option<u64>,
}

/// How a mirror's first copy goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstCopy {
    /// Compared with the chunk sums of the other copy: only chunks that differ cross the link.
    ByChunkSums { chunk: u64, chunks: u64 },
    /// Every byte crosses the link, for the reason given.
    Whole { why: String },
}

/// What a driver needs to mirror one disk into another site's copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorTarget {
    /// The disk's index in the VM spec.
    pub disk: usize,
    /// The copy server's `host:port`.
    pub server: String,
    /// The export's name (`sitecopy::export_name`).
    pub export: String,
    /// Bytes left unanswered this long: the copy is lost (the relay's `stall`).
    pub stall: std::time::Duration,
    /// The disk's length (its copy's must be the same).
    pub bytes: u64,
    /// The most the mirror's own copying moves, bytes/s (`None`: no cap).
    pub resync_cap: Option<u64>,
}

/// One disk's mirror as the driver sees it: QEMU's job, and the relay in front of the copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorStatus {
    pub job: MirrorSample,
    /// The mirror back into this site's copy, after a storage path failover
    /// (`pathswitch::start_return`).
    pub back: MirrorSample,
    pub relay: tandem_core::mirroring::RelayPhase,
    /// Why the copy counts as lost, when it does.
    pub lost: Option<String>,
    /// What the resync by chunk sums under way did so far — or, in the sample that finds the
    /// copy in sync, what it did in all (told once).
    pub delta: Option<crate::copyrelay::DeltaStats>,
}

/// Where a disk's synchronous mirror stands, as QEMU reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum MirrorSample {
    /// No mirror job for this disk.
    Absent,
    /// Copying what the other copy lacks (the first full copy, or a resync of the ranges it
    /// missed); writes made meanwhile go to both.
    Copying { copied: u64, remaining: u64 },
    /// Both copies equal; every write goes to both before it completes.
    InSync,
    /// Stopped after the other copy failed a write: writes complete on the local copy alone and
    /// the job's bitmap records them.
    Stopped { missed: u64 },
    /// The job ended (an error it could not stop on); the other copy needs a new full copy.
    Ended { reason: String },
}

/// The mirror job of disk `disk`.
#[must_use]
pub fn job_id(disk: usize) -> String {
    format!("tandem-sync{disk}")
}

/// The NBD client node on the other site's copy of disk `disk`.
#[must_use]
pub fn remote_node(disk: usize) -> String {
    format!("tandem-remote{disk}")
}

fn qmp_err(vm: &str, what: &'static str) -> impl FnOnce(QmpError) -> SyncMirrorError {
    let vm = vm.to_string();
    move |source| SyncMirrorError::Qmp { vm, what, source }
}

/// Connects to the other site's copy and starts mirroring the disk into it: a full copy first
/// (`Copying`), in sync once it is ready. The VM keeps running throughout.
pub async fn attach(vm: &str, q: &Qmp, timeout: Duration, copy: &RemoteCopy) -> Result<(), SyncMirrorError> {
    let node = json!({"driver": "nbd", "node-name": remote_node(copy.disk), "export": copy.export,
        "server": {"type": "unix", "path": copy.relay.display().to_string()}, "reconnect-delay": 0});
    q.execute("blockdev-add", node, timeout).await.map_err(qmp_err(vm, "connected to the other site's copy"))?;
    let mut job = json!({"job-id": job_id(copy.disk), "device": format!("disk{}", copy.disk), "target": remote_node(copy.disk),
        "sync": "full", "copy-mode": "write-blocking", "on-target-error": "stop", "on-source-error": "stop", "auto-dismiss": false});
    if let Some(g) = copy.granularity {
        job["granularity"] = json!(g);
    }
    if let Some(speed) = copy.speed {
        job["speed"] = json!(speed);
    }
    if let Err(e) = q.execute("blockdev-mirror", job, timeout).await {
        let _ = q.execute("blockdev-del", json!({"node-name": remote_node(copy.disk)}), timeout).await;
        return Err(qmp_err(vm, "started its mirror")(e));
    }
    Ok(())
}

/// Reads where the mirror of `disk` stands.
pub async fn sample(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<MirrorSample, SyncMirrorError> {
    Ok(judge(&jobs(vm, q, timeout).await?, disk))
}

/// The VM's block jobs (`query-block-jobs`), for `judge` and `judge_job`: one question for
/// every job of a disk.
pub async fn jobs(vm: &str, q: &Qmp, timeout: Duration) -> Result<Value, SyncMirrorError> {
    q.execute("query-block-jobs", Value::Null, timeout).await.map_err(qmp_err(vm, "read its mirror"))
}

/// A `query-block-jobs` answer, for the mirror of `disk`.
#[must_use]
pub fn judge(jobs: &Value, disk: usize) -> MirrorSample {
    judge_job(jobs, &job_id(disk))
}

/// A `query-block-jobs` answer, for the mirror job `id`.
#[must_use]
pub fn judge_job(jobs: &Value, id: &str) -> MirrorSample {
    let Some(job) = jobs.as_array().and_then(|a| a.iter().find(|j| j.get("device").and_then(Value::as_str) == Some(id))) else {
        return MirrorSample::Absent;
    };
    let text = |k: &str| job.get(k).and_then(Value::as_str).unwrap_or("");
    let (len, offset) = (job.get("len").and_then(Value::as_u64).unwrap_or(0), job.get("offset").and_then(Value::as_u64).unwrap_or(0));
    let remaining = len.saturating_sub(offset);
    match text("status") {
        "concluded" | "aborting" | "null" | "undefined" => {
            let reason = job.get("error").and_then(Value::as_str).unwrap_or("the job ended");
            MirrorSample::Ended { reason: reason.to_string() }
        }
        "paused" | "standby" if text("io-status") != "ok" => MirrorSample::Stopped { missed: remaining },
        _ if text("io-status") != "ok" && !text("io-status").is_empty() => MirrorSample::Stopped { missed: remaining },
        _ if job.get("ready").and_then(Value::as_bool) == Some(true) && remaining == 0 => MirrorSample::InSync,
        _ => MirrorSample::Copying { copied: offset, remaining },
    }
}

/// Resumes a stopped mirror (its copy reachable again): it copies the ranges its bitmap holds,
/// then is in sync again.
pub async fn resume(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), SyncMirrorError> {
    match q.execute("block-job-resume", json!({"device": job_id(disk)}), timeout).await {
        Ok(_) => Ok(()),
        // Not paused (it resumed itself, or was never stopped): nothing to do.
        Err(QmpError::Command { .. }) => Ok(()),
        Err(e) => Err(qmp_err(vm, "resumed its mirror")(e)),
    }
}

/// Ends the mirror of `disk` and closes the connection to the other copy; the VM runs on its
/// local copy. A forced cancel: writes held for the other copy fail there (and complete here),
/// so call it only when the other copy is recorded as stale.
pub async fn detach(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), SyncMirrorError> {
    match end_job_and_node(q, timeout, &job_id(disk), &remote_node(disk), DETACH_WAIT).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(SyncMirrorError::Detach { vm: vm.to_string(), disk }),
        Err((what, source)) => Err(SyncMirrorError::Qmp { vm: vm.to_string(), what, source }),
    }
}

/// Cancels mirror job `id` (forced; none is fine), waits up to `wait` for it to be gone
/// (dismissing it once it ended), then deletes node `node` (none is fine). `Ok(false)`: the job
/// was still there after `wait`; an error says what the call was doing.
pub(crate) async fn end_job_and_node(q: &Qmp, timeout: Duration, id: &str, node: &str, wait: Duration) -> Result<bool, (&'static str, QmpError)> {
    match q.execute("block-job-cancel", json!({"device": id, "force": true}), timeout).await {
        Ok(_) | Err(QmpError::Command { .. }) => {}
        Err(e) => return Err(("cancelled a mirror", e)),
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let jobs = q.execute("query-block-jobs", Value::Null, timeout).await.map_err(|e| ("read a mirror", e))?;
        match judge_job(&jobs, id) {
            MirrorSample::Absent => break,
            MirrorSample::Ended { .. } => {
                let _ = q.execute("job-dismiss", json!({"id": id}), timeout).await;
            }
            _ if tokio::time::Instant::now() >= deadline => return Ok(false),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    match q.execute("blockdev-del", json!({"node-name": node}), timeout).await {
        Ok(_) | Err(QmpError::Command { .. }) => Ok(true),
        Err(e) => Err(("closed a copy's node", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: &str, io: &str, ready: bool, len: u64, offset: u64) -> Value {
        json!([{"device": job_id(0), "status": status, "io-status": io, "ready": ready, "len": len, "offset": offset, "type": "mirror"}])
    }

    #[test]
    fn a_jobs_answer_reads_as_its_phase() {
        assert_eq!(judge(&json!([]), 0), MirrorSample::Absent);
        assert_eq!(judge(&job("running", "ok", false, 100, 40), 0), MirrorSample::Copying { copied: 40, remaining: 60 });
        assert_eq!(judge(&job("ready", "ok", true, 100, 100), 0), MirrorSample::InSync);
        // Ready, but writes the other copy missed are being copied again.
        assert_eq!(judge(&job("ready", "ok", true, 164, 100), 0), MirrorSample::Copying { copied: 100, remaining: 64 });
        assert_eq!(judge(&job("paused", "failed", true, 164, 100), 0), MirrorSample::Stopped { missed: 64 });
        assert!(matches!(judge(&job("concluded", "ok", false, 1, 0), 0), MirrorSample::Ended { .. }));
        assert_eq!(judge(&job("ready", "ok", true, 100, 100), 1), MirrorSample::Absent, "another disk's job");
    }
}
