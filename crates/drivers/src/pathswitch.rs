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

use crate::qmp::{Qmp, QmpError};
use crate::syncmirror::{job_id, judge, remote_node, MirrorSample};
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
    #[error("disk {disk} of VM '{vm}' does not run on the other copy after the switch (its node is '{node}')")]
    NotSwitched { vm: String, disk: usize, node: String },
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
    q.execute("block-job-complete", json!({"device": id}), timeout).await.map_err(qmp_err(vm, "completed its mirror"))?;
    let deadline = tokio::time::Instant::now() + SWITCH_WAIT;
    loop {
        let jobs = q.execute("query-jobs", Value::Null, timeout).await.map_err(qmp_err(vm, "read its mirror"))?;
        let job = jobs.as_array().and_then(|a| a.iter().find(|j| j.get("id").and_then(Value::as_str) == Some(id.as_str()))).cloned();
        match job {
            None => break,
            Some(j) if j.get("status").and_then(Value::as_str) == Some("concluded") => {
                let error = j.get("error").and_then(Value::as_str).map(str::to_string);
                let _ = q.execute("job-dismiss", json!({"id": id}), timeout).await;
                if let Some(reason) = error {
                    return Err(PathSwitchError::Failed { vm: vm.to_string(), disk, reason });
                }
                break;
            }
            Some(_) if tokio::time::Instant::now() >= deadline => return Err(PathSwitchError::Stuck { vm: vm.to_string(), disk }),
            Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let node = device_node(vm, q, timeout, disk).await?;
    if node != remote_node(disk) {
        return Err(PathSwitchError::NotSwitched { vm: vm.to_string(), disk, node });
    }
    Ok(())
}

/// Resumes a guest paused by an I/O error (its failed requests are retried).
pub async fn resume(vm: &str, q: &Qmp, timeout: Duration) -> Result<(), PathSwitchError> {
    q.execute("cont", json!({}), timeout).await.map_err(qmp_err(vm, "resumed"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
