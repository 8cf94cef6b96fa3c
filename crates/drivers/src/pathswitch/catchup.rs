//! The way back by what changed: from the instant a disk switches onto the other site's copy,
//! a dirty bitmap on that copy's node records every write the guest makes there (the guest is
//! still paused when it is added, so it misses none). When the local copy answers again, it is
//! brought up to date in rounds: each round backs up — `blockdev-backup` with `sync: bitmap`,
//! QEMU's own point-in-time copy — the ranges of the bitmap that recorded until then, while a
//! new bitmap, added in the same transaction, records the writes made meanwhile. Once what is
//! left is small (`FINAL_ROUND_MAX`), the way back counts as in sync: the agent pauses the guest
//! and the last round copies what is left — the copies are then equal — *before* the agent
//! commits the local copy current again; then the disk is moved onto the local copy (a mirror
//! with `sync: none`, completed at once).
//!
//! Bitmaps are named `tandem-since{disk}-{round}`: the highest round records now. A round that
//! fails or is abandoned merges its bitmap into the recording one first, so no write is ever
//! forgotten. A guest that writes faster than the link copies keeps its way back in rounds —
//! it runs on, on the other copy — until its writes slow down. Without the bitmap (its adding
//! failed at the switch) the way back is a full mirror, as before.

use super::{back_job_id, local_node, qmp_err, PathSwitchError, SWITCH_WAIT};
use crate::qmp::Qmp;
use crate::syncmirror::{remote_node, MirrorSample};
use serde_json::{json, Value};
use std::time::Duration;

/// What may be left for the round the guest waits for, paused.
pub const FINAL_ROUND_MAX: u64 = 8 * 1024 * 1024;
/// How long the last round (the guest paused) may take.
pub const FINAL_ROUND_WAIT: Duration = Duration::from_secs(30);

fn bitmap(disk: usize, round: u64) -> String {
    format!("tandem-since{disk}-{round}")
}

/// Starts recording the writes to disk `disk` on the other copy (call it right after the
/// switch, the guest still paused).
pub async fn mark_switch(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), PathSwitchError> {
    let add = json!({"node": remote_node(disk), "name": bitmap(disk, 0)});
    q.execute("block-dirty-bitmap-add", add, timeout).await.map_err(qmp_err(vm, "started recording its writes on the other copy"))?;
    Ok(())
}

/// The VM's block nodes (`query-named-block-nodes`, flat).
pub(super) async fn nodes(vm: &str, q: &Qmp, timeout: Duration) -> Result<Value, PathSwitchError> {
    q.execute("query-named-block-nodes", json!({"flat": true}), timeout).await.map_err(qmp_err(vm, "read its disks' bitmaps"))
}

/// The rounds' bitmaps on the other copy's node: (round, bytes recorded), oldest first.
async fn rounds(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<Vec<(u64, u64)>, PathSwitchError> {
    Ok(rounds_in(&nodes(vm, q, timeout).await?, disk))
}

/// The rounds' bitmaps of disk `disk` in a `query-named-block-nodes` answer, oldest first.
pub(super) fn rounds_in(nodes: &Value, disk: usize) -> Vec<(u64, u64)> {
    let prefix = format!("tandem-since{disk}-");
    let node = remote_node(disk);
    let mut out: Vec<(u64, u64)> = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n.get("node-name").and_then(Value::as_str) == Some(node.as_str())))
        .and_then(|n| n.get("dirty-bitmaps"))
        .and_then(Value::as_array)
        .map(|bs| {
            bs.iter()
                .filter_map(|b| {
                    let round = b.get("name")?.as_str()?.strip_prefix(&prefix)?.parse().ok()?;
                    Some((round, b.get("count").and_then(Value::as_u64).unwrap_or(0)))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out
}

/// Whether disk `disk`'s writes since its switch are recorded (the way back can go by rounds).
pub async fn recorded(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<bool, PathSwitchError> {
    Ok(!rounds(vm, q, timeout, disk).await?.is_empty())
}

/// Starts a round: a new bitmap records from now, and the ranges of the one that recorded
/// until now are backed up into the local copy.
async fn start_round(vm: &str, q: &Qmp, timeout: Duration, disk: usize, recording: u64) -> Result<(), PathSwitchError> {
    let actions = json!([
        {"type": "block-dirty-bitmap-add", "data": {"node": remote_node(disk), "name": bitmap(disk, recording + 1)}},
        backup(disk, recording),
    ]);
    q.execute("transaction", json!({"actions": actions}), timeout).await.map_err(qmp_err(vm, "started a round of its way back"))?;
    Ok(())
}

fn backup(disk: usize, round: u64) -> Value {
    json!({"type": "blockdev-backup", "data": {"job-id": back_job_id(disk), "device": remote_node(disk), "target": local_node(disk),
        "sync": "bitmap", "bitmap": bitmap(disk, round), "bitmap-mode": "never", "on-source-error": "stop",
        "on-target-error": "report", "auto-dismiss": false}})
}

/// Starts the first round of the way back (the local copy's node is open).
pub async fn start(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), PathSwitchError> {
    let rounds = rounds(vm, q, timeout, disk).await?;
    let Some(&(recording, _)) = rounds.last() else { return Ok(()) };
    forget_older(vm, q, timeout, disk, &rounds, recording).await?;
    start_round(vm, q, timeout, disk, recording).await
}

/// Merges every bitmap older than `recording` into it and removes them: what they hold is not
/// known to be in the local copy.
async fn forget_older(vm: &str, q: &Qmp, timeout: Duration, disk: usize, rounds: &[(u64, u64)], recording: u64) -> Result<(), PathSwitchError> {
    let older: Vec<String> = rounds.iter().filter(|(r, _)| *r < recording).map(|(r, _)| bitmap(disk, *r)).collect();
    if older.is_empty() {
        return Ok(());
    }
    let merge = json!({"node": remote_node(disk), "target": bitmap(disk, recording), "bitmaps": older});
    q.execute("block-dirty-bitmap-merge", merge, timeout).await.map_err(qmp_err(vm, "kept the writes of an unfinished round"))?;
    remove(vm, q, timeout, disk, &older).await
}

async fn remove(vm: &str, q: &Qmp, timeout: Duration, disk: usize, names: &[String]) -> Result<(), PathSwitchError> {
    for name in names {
        let del = json!({"node": remote_node(disk), "name": name});
        q.execute("block-dirty-bitmap-remove", del, timeout).await.map_err(qmp_err(vm, "removed a round's bitmap"))?;
    }
    Ok(())
}

/// The way back by rounds, moved on: a round that ended successfully lets its bitmap go, and the
/// next starts while more than `FINAL_ROUND_MAX` is left; in sync once no more is. `job` is the
/// way back's job in `query-jobs`, if any.
pub async fn advance(vm: &str, q: &Qmp, timeout: Duration, disk: usize, job: Option<&Value>) -> Result<MirrorSample, PathSwitchError> {
    let text = |j: &Value, k: &str| j.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    if let Some(j) = job {
        let (done, total) = (j.get("current-progress").and_then(Value::as_u64).unwrap_or(0), j.get("total-progress").and_then(Value::as_u64).unwrap_or(0));
        if text(j, "status") != "concluded" {
            return Ok(MirrorSample::Copying { copied: done, remaining: total.saturating_sub(done) });
        }
        let _ = q.execute("job-dismiss", json!({"id": back_job_id(disk)}), timeout).await;
        let rounds = rounds(vm, q, timeout, disk).await?;
        let recording = rounds.last().map_or(0, |r| r.0);
        if let Some(reason) = j.get("error").and_then(Value::as_str) {
            // The local copy failed again: what the round was copying stays to copy.
            forget_older(vm, q, timeout, disk, &rounds, recording).await?;
            return Ok(MirrorSample::Ended { reason: reason.to_string() });
        }
        let copied: Vec<String> = rounds.iter().filter(|(r, _)| *r < recording).map(|(r, _)| bitmap(disk, *r)).collect();
        remove(vm, q, timeout, disk, &copied).await?;
    }
    let rounds = rounds(vm, q, timeout, disk).await?;
    let Some(&(recording, left)) = rounds.last() else { return Ok(MirrorSample::Absent) };
    if left <= FINAL_ROUND_MAX {
        return Ok(MirrorSample::InSync);
    }
    start_round(vm, q, timeout, disk, recording).await?;
    Ok(MirrorSample::Copying { copied: 0, remaining: left })
}

/// The last round, the guest paused: copies what is left, so that the local copy equals the
/// other when this returns. (The bitmap keeps recording: if the guest resumes on the other copy
/// instead, those ranges are simply copied again.)
pub async fn last_round(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), PathSwitchError> {
    // The mirror of an earlier pause whose commit failed (`flush_local`, then the guest
    // resumed) is cancelled — it never moved the disk, and the writes since are recorded — and
    // a round under way ends first (what it copied may be copied again: its bitmap is merged).
    let jobs = q.execute("query-jobs", Value::Null, timeout).await.map_err(qmp_err(vm, "read its way back"))?;
    let id = back_job_id(disk);
    let flush_mirror = jobs
        .as_array()
        .into_iter()
        .flatten()
        .any(|j| j.get("id").and_then(Value::as_str) == Some(id.as_str()) && j.get("type").and_then(Value::as_str) == Some("mirror"));
    if flush_mirror {
        q.execute("block-job-cancel", json!({"device": id}), timeout).await.map_err(qmp_err(vm, "ended the mirror of an earlier pause"))?;
    }
    super::wait_concluded(vm, q, timeout, disk, &id, FINAL_ROUND_WAIT).await?;
    let rounds = rounds(vm, q, timeout, disk).await?;
    let Some(&(recording, _)) = rounds.last() else {
        return Err(PathSwitchError::Failed { vm: vm.to_string(), disk, reason: "no record of the writes since the switch".into() });
    };
    forget_older(vm, q, timeout, disk, &rounds, recording).await?;
    q.execute("transaction", json!({"actions": [backup(disk, recording)]}), timeout).await.map_err(qmp_err(vm, "started the last round of its way back"))?;
    super::wait_concluded(vm, q, timeout, disk, &back_job_id(disk), FINAL_ROUND_WAIT).await
}

/// After the last round (the guest still paused, the copies equal): a mirror with `sync: none`
/// into the local copy, ready — QEMU flushes a mirror's target before it calls it ready, and
/// only a node with a writer is flushed at all (a `stop` skips the local copy once the round's
/// job has ended), so what the rounds copied is on stable storage when this returns, before
/// the local copy is committed current. Nothing moves yet; an existing one is kept.
pub async fn flush_local(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), PathSwitchError> {
    let jobs = q.execute("query-block-jobs", Value::Null, timeout).await.map_err(qmp_err(vm, "read its mirror back"))?;
    if crate::syncmirror::judge_job(&jobs, &back_job_id(disk)) == MirrorSample::Absent {
        let job = json!({"job-id": back_job_id(disk), "device": format!("disk{disk}"), "target": local_node(disk), "sync": "none",
            "copy-mode": "write-blocking", "on-target-error": "stop", "on-source-error": "stop", "auto-dismiss": false});
        q.execute("blockdev-mirror", job, timeout).await.map_err(qmp_err(vm, "mirrored into its site's copy"))?;
    }
    let deadline = tokio::time::Instant::now() + SWITCH_WAIT;
    while crate::syncmirror::judge_job(
        &q.execute("query-block-jobs", Value::Null, timeout).await.map_err(qmp_err(vm, "read its mirror back"))?,
        &back_job_id(disk),
    ) != MirrorSample::InSync
    {
        if tokio::time::Instant::now() >= deadline {
            return Err(PathSwitchError::Stuck { vm: vm.to_string(), disk });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Moves the disk onto the local copy (the guest still paused, the copies equal, the local copy
/// flushed and committed current): the `sync: none` mirror of [`flush_local`] completed at
/// once; then lets the bitmaps go.
pub async fn finish(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), PathSwitchError> {
    flush_local(vm, q, timeout, disk).await?;
    super::complete(vm, q, timeout, disk, &back_job_id(disk)).await?;
    let left: Vec<String> = rounds(vm, q, timeout, disk).await?.iter().map(|(r, _)| bitmap(disk, *r)).collect();
    remove(vm, q, timeout, disk, &left).await
}

/// After the way back was given up (its job ended): what its round was copying stays to copy.
pub async fn keep_unfinished(vm: &str, q: &Qmp, timeout: Duration, disk: usize) -> Result<(), PathSwitchError> {
    let rounds = rounds(vm, q, timeout, disk).await?;
    match rounds.last() {
        Some(&(recording, _)) => forget_older(vm, q, timeout, disk, &rounds, recording).await,
        None => Ok(()),
    }
}
