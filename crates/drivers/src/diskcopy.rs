//! Copying a VM's local disks with its live migration, through QEMU's own block layer: the
//! destination creates an empty image of each disk's size and serves it, writable, from an NBD
//! server in its paused QEMU; the source mirrors each disk into it (`blockdev-mirror`, full
//! sync) until every job is ready — from then on each guest write goes to both copies — and
//! only then sends memory. Once the memory copy completed (the source paused, so no more
//! writes), the source completes each job (`block-job-cancel` of a ready mirror ends it in
//! sync, without a pivot) and checks that it concluded without error; only then may the
//! switchover be proposed. The destination stops its NBD server before it resumes.
//!
//! Any failure before that point leaves the source's disks whole (the mirror only ever read
//! them): the jobs are cancelled and the source runs on; the destination's half-written images
//! are recreated by the next migration there.

use crate::migration::qmp_failed;
use crate::qmp::{Qmp, QmpError};
use crate::DriverError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the mirror jobs are sampled while they catch up.
pub const MIRROR_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// How long the completion of ready mirrors (the last in-flight writes) may take.
pub const MIRROR_COMPLETE_WAIT: Duration = Duration::from_secs(30);
/// Ports tried for a destination's NBD server, from `nbd_port_base` on.
pub const NBD_PORT_ATTEMPTS: u16 = 16;
/// The largest local disk a destination creates on a peer's request (64 TiB).
pub const MAX_LOCAL_DISK_BYTES: u64 = 64 << 40;
/// How long creating one empty image (`qemu-img create` for non-raw formats) may take.
pub const CREATE_IMAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A local disk the destination must create before it receives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LocalDiskSize {
    /// Its index in the VM spec's `disks`.
    pub index: usize,
    /// Its virtual size.
    pub bytes: u64,
}

/// Where a destination receives a migration: the memory stream's URI and, when local disks
/// come with it, the NBD server (`host:port`) that takes them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct IncomingEndpoint {
    pub uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
}

/// Where a local disk's image lives on this host.
#[must_use]
pub fn local_path(dir: &Path, relative: &str) -> PathBuf {
    dir.join(relative)
}

/// The mirror job of disk `i` on the source.
fn mirror_job(i: usize) -> String {
    format!("tandem-mirror{i}")
}

/// The source's NBD client node that writes into the destination's export of disk `i`.
fn nbd_node(i: usize) -> String {
    format!("tandem-nbd{i}")
}

/// The job `id` in a `query-jobs` answer.
fn find_job<'a>(jobs: &'a Value, id: &str) -> Option<&'a Value> {
    jobs.as_array()?.iter().find(|j| j.get("id").and_then(Value::as_str) == Some(id))
}

fn copy_failed(vm: &str, reason: String) -> DriverError {
    DriverError::Migration { vm: vm.to_string(), reason }
}

/// The destination's side, before its QEMU starts: an empty image of `bytes` at `path`
/// (any earlier copy there is stale — the VM ran elsewhere since — and is replaced).
pub async fn create_image(vm: &str, qemu_img: &str, path: &Path, format: &str, bytes: u64) -> Result<(), DriverError> {
    if bytes > MAX_LOCAL_DISK_BYTES {
        return Err(copy_failed(vm, format!("a local disk of {bytes} bytes is larger than {MAX_LOCAL_DISK_BYTES}")));
    }
    let io = |e: std::io::Error| copy_failed(vm, format!("could not create the local disk {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if format == "raw" {
        // Truncated to nothing first: every byte then reads as zero until the mirror writes it.
        let f = std::fs::File::create(path).map_err(io)?;
        return f.set_len(bytes).map_err(io);
    }
    let mut cmd = tokio::process::Command::new(qemu_img);
    cmd.args(["create", "-q", "-f", format]).arg(path).arg(bytes.to_string()).kill_on_drop(true);
    match tokio::time::timeout(CREATE_IMAGE_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(copy_failed(vm, format!("qemu-img create {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim()))),
        Ok(Err(e)) => Err(io(e)),
        Err(_) => Err(copy_failed(vm, format!("qemu-img create {} took longer than {CREATE_IMAGE_TIMEOUT:?}", path.display()))),
    }
}

/// The destination's side, its QEMU paused on `-incoming`: an NBD server on `host_ip` (the
/// first free port from `port_base`) exporting each disk in `disks` writable, as `disk{i}` —
/// over TLS with `tls_creds` (a loaded server credentials object: only a client with a
/// certificate of the cluster's CA gets in).
pub async fn serve(
    vm: &str,
    q: &Qmp,
    timeout: Duration,
    host_ip: &str,
    port_base: u16,
    disks: &[usize],
    tls_creds: Option<&str>,
) -> Result<String, DriverError> {
    let mut last = String::new();
    let mut listening = None;
    for port in (0..NBD_PORT_ATTEMPTS).map(|k| port_base.saturating_add(k)) {
        let mut addr = json!({"addr": {"type": "inet", "data": {"host": host_ip, "port": port.to_string()}}});
        if let Some(id) = tls_creds {
            addr["tls-creds"] = json!(id);
        }
        match q.execute("nbd-server-start", addr, timeout).await {
            Ok(_) => {
                listening = Some(port);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let port = listening.ok_or_else(|| copy_failed(vm, format!("no NBD port free from {port_base} on: {last}")))?;
    for i in disks {
        let export = json!({"device": format!("disk{i}"), "name": format!("disk{i}"), "writable": true});
        q.execute("nbd-server-add", export, timeout).await.map_err(qmp_failed(vm))?;
    }
    Ok(format!("{host_ip}:{port}"))
}

/// The destination's side, before it resumes: no one may write its disks but its guest now.
pub async fn stop_serving(vm: &str, q: &Qmp, timeout: Duration) -> Result<(), DriverError> {
    q.execute("nbd-server-stop", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
    Ok(())
}

/// Sums over the mirror jobs of `disks`: (copied, still to copy, all ready).
fn mirror_state(jobs: &Value, disks: &[usize]) -> Result<(u64, u64, bool), String> {
    let (mut done, mut left, mut ready) = (0u64, 0u64, true);
    for i in disks {
        let id = mirror_job(*i);
        let job = jobs.as_array().and_then(|a| a.iter().find(|j| j.get("device").and_then(Value::as_str) == Some(&id)));
        let Some(job) = job else { return Err(format!("the mirror of disk {i} ended early")) };
        if job.get("io-status").and_then(Value::as_str).is_some_and(|s| s != "ok") {
            return Err(format!("the mirror of disk {i} met an I/O error"));
        }
        let (len, offset) = (job.get("len").and_then(Value::as_u64).unwrap_or(0), job.get("offset").and_then(Value::as_u64).unwrap_or(0));
        done += offset;
        left += len.saturating_sub(offset);
        ready &= job.get("ready").and_then(Value::as_bool) == Some(true);
    }
    Ok((done, left, ready))
}

/// What the source's mirror needs.
pub struct MirrorTarget<'a> {
    /// The destination's NBD server, `host:port`.
    pub nbd: &'a str,
    pub disks: &'a [usize],
    /// The copy's bandwidth cap in bytes per second (the migration's own), 0 for none.
    pub speed: u64,
    /// Checked every sample: set, the mirror is abandoned.
    pub cancelled: &'a (dyn Fn() -> bool + Send + Sync),
    /// Called with (copied, still to copy) every sample.
    pub progress: &'a (dyn Fn(u64, u64) + Send + Sync),
    pub deadline: tokio::time::Instant,
    /// A loaded client credentials object: the copy goes over TLS.
    pub tls_creds: Option<&'a str>,
}

/// The source's side: mirrors each disk to the destination's export and returns once every
/// job is ready (both copies equal, each new write going to both), with the bytes copied. On
/// failure the jobs are abandoned and the source's disks are as they were.
pub async fn mirror(vm: &str, q: &Qmp, timeout: Duration, to: &MirrorTarget<'_>) -> Result<u64, DriverError> {
    let (host, port) = to.nbd.rsplit_once(':').ok_or_else(|| copy_failed(vm, format!("bad NBD address {}", to.nbd)))?;
    let started = async {
        for i in to.disks {
            let mut node = json!({"driver": "nbd", "node-name": nbd_node(*i), "export": format!("disk{i}"),
                "server": {"type": "inet", "host": host, "port": port}});
            if let Some(id) = to.tls_creds {
                // The destination's certificate must name `host`, as for the memory stream.
                node["tls-creds"] = json!(id);
            }
            q.execute("blockdev-add", node, timeout).await.map_err(qmp_failed(vm))?;
            let job = json!({"job-id": mirror_job(*i), "device": format!("disk{i}"), "target": nbd_node(*i),
                "sync": "full", "copy-mode": "write-blocking", "auto-dismiss": false, "speed": to.speed});
            q.execute("blockdev-mirror", job, timeout).await.map_err(qmp_failed(vm))?;
        }
        loop {
            let jobs = q.execute("query-block-jobs", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
            let (done, left, ready) = mirror_state(&jobs, to.disks).map_err(|why| copy_failed(vm, why))?;
            (to.progress)(done, left);
            if ready {
                return Ok(done);
            }
            if (to.cancelled)() {
                return Err(copy_failed(vm, "cancelled".into()));
            }
            if tokio::time::Instant::now() >= to.deadline {
                return Err(copy_failed(vm, "the disks were not copied within the migration's bound".into()));
            }
            tokio::time::sleep(MIRROR_SAMPLE_INTERVAL).await;
        }
    };
    let result = started.await;
    if result.is_err() {
        abandon(q, timeout, to.disks).await;
    }
    result
}

/// The source's side, in QEMU's pause before the switchover (the memory copy done, its guest
/// stopped, its disks still active): completes each mirror in sync and checks that it
/// concluded without error. `Ok` means the destination's disks hold every write the guest made.
pub async fn complete(vm: &str, q: &Qmp, timeout: Duration, disks: &[usize]) -> Result<(), DriverError> {
    let result = async {
        for i in disks {
            q.execute("block-job-cancel", json!({"device": mirror_job(*i)}), timeout).await.map_err(qmp_failed(vm))?;
        }
        let deadline = tokio::time::Instant::now() + MIRROR_COMPLETE_WAIT;
        for i in disks {
            let id = mirror_job(*i);
            loop {
                let jobs = q.execute("query-jobs", Value::Null, timeout).await.map_err(qmp_failed(vm))?;
                let Some(job) = find_job(&jobs, &id) else { return Err(copy_failed(vm, format!("the mirror of disk {i} vanished before it concluded"))) };
                if job.get("status").and_then(Value::as_str) == Some("concluded") {
                    if let Some(e) = job.get("error").and_then(Value::as_str) {
                        return Err(copy_failed(vm, format!("the mirror of disk {i} failed at its end: {e}")));
                    }
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(copy_failed(vm, format!("the mirror of disk {i} did not conclude within {MIRROR_COMPLETE_WAIT:?}")));
                }
                // The guest is paused meanwhile: look again soon.
                tokio::time::sleep(crate::migration::CLOSING_SAMPLE_INTERVAL).await;
            }
        }
        Ok(())
    }
    .await;
    abandon(q, timeout, disks).await;
    result
}

/// Best effort: ends the mirror jobs (forced), dismisses them and drops the NBD client nodes.
pub async fn abandon(q: &Qmp, timeout: Duration, disks: &[usize]) {
    for i in disks {
        let _ = q.execute("block-job-cancel", json!({"device": mirror_job(*i), "force": true}), timeout).await;
    }
    for i in disks {
        let id = mirror_job(*i);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            match q.execute("job-dismiss", json!({"id": id}), timeout).await {
                Ok(_) => break,
                Err(QmpError::Command { .. }) if !job_exists(q, timeout, &id).await => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let _ = q.execute("blockdev-del", json!({"node-name": nbd_node(*i)}), timeout).await;
    }
}

async fn job_exists(q: &Qmp, timeout: Duration, id: &str) -> bool {
    q.execute("query-jobs", Value::Null, timeout).await.ok().is_some_and(|jobs| find_job(&jobs, id).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_state_sums_the_jobs_and_sees_errors() {
        let jobs = json!([
            {"device": "tandem-mirror0", "len": 100, "offset": 100, "ready": true, "io-status": "ok"},
            {"device": "tandem-mirror2", "len": 50, "offset": 20, "ready": false, "io-status": "ok"},
        ]);
        assert_eq!(mirror_state(&jobs, &[0, 2]), Ok((120, 30, false)));
        assert_eq!(mirror_state(&jobs, &[0]), Ok((100, 0, true)));
        assert!(mirror_state(&jobs, &[1]).is_err_and(|e| e.contains("ended early")));
        let broken = json!([{"device": "tandem-mirror0", "len": 100, "offset": 10, "ready": false, "io-status": "failed"}]);
        assert!(mirror_state(&broken, &[0]).is_err_and(|e| e.contains("I/O error")));
    }

    #[tokio::test]
    async fn a_raw_image_is_recreated_empty_at_the_size_asked() {
        let dir = std::env::temp_dir().join(format!("tandem-diskcopy-{}", std::process::id()));
        let path = local_path(&dir, "vms/a.raw");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(&path, b"stale copy").expect("write");
        create_image("a", "qemu-img", &path, "raw", 1 << 20).await.expect("created");
        let data = std::fs::read(&path).expect("read");
        assert_eq!(data.len(), 1 << 20);
        assert!(data.iter().all(|b| *b == 0), "nothing stale is left");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
