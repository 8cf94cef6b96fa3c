//! Site mirroring on this host, both halves.
//!
//! - For each site-mirrored VM running here, and each of its disks, one link to one other site:
//!   a copy served by a host of that site (`POST /v1/internal/copies`) and the driver's mirror
//!   into it (for QEMU: a relay, `tandem_drivers::copyrelay`, and a write-blocking mirror
//!   through it, which holds writes to a lost copy until released). Each pass
//!   observes every link and does what `tandem_core::mirroring::decide` says: attach, propose
//!   `mirror-synced` once in sync, propose `mirror-degraded` when the copy is lost — and let the
//!   held writes go only once committed state counts that copy as stale — then resume (copy
//!   only what was missed) when a host of that site serves the copy again.
//! - For each VM of another site whose copy this host serves: the export stays only while that
//!   VM runs in the generation it was asked for, at another site; otherwise it is withdrawn (its
//!   image lock freed), so a host of this site can start the VM on the copy.

mod pace;
mod report;

use super::storagewatch::HangAnswer;
use super::{lock, Agent};
use crate::events::EventKind;
use crate::views::{CopyEndpoint, CopyRequest};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tandem_core::hostset::HostId;
use tandem_core::mirroring::{decide, link_state, DiskPath, JobPhase, LinkAction, LinkObservation, LinkState, RelayPhase};
use tandem_core::state::Command;
use tandem_drivers::copyrelay::DeltaStats;
use tandem_drivers::pathswitch::ReturnStep;
use tandem_drivers::syncmirror::{FirstCopy, MirrorSample, MirrorTarget};
use tracing::Instrument;

/// One request to a host of another site to serve its copy.
pub const COPY_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The most links (VM disks × other sites) one host keeps.
pub const MAX_MIRROR_LINKS: usize = 1024;
/// After a failed attach or resume (nobody serves the copy, say), the link waits this long
/// before it tries again.
pub const LINK_RETRY: Duration = Duration::from_secs(2);
/// How long a VM killed because its storage hangs may take until none of its threads can run
/// again (exited, or only threads stuck in the storage left); longer, the kill is tried again.
pub const HUNG_KILL_WAIT: Duration = Duration::from_secs(5);

/// A link: (VM, disk index, other site).
type LinkKey = (String, usize, String);
/// A mirrored disk: (VM, disk index).
type DiskKey = (String, usize);

/// The disk a link mirrors.
fn disk_of(key: &LinkKey) -> DiskKey {
    (key.0.clone(), key.1)
}

struct Link {
    generation: u64,
    /// Who serves the copy now.
    server: String,
    state: LinkState,
    /// A resync by chunk sums under way: what it did so far.
    delta: Option<DeltaStats>,
    /// A resync under way (or a way back): where it stood when first seen, for its pace.
    pace: Option<pace::ResyncPace>,
}

/// This host's mirroring state.
#[derive(Default)]
pub(super) struct Mirroring {
    links: BTreeMap<LinkKey, Link>,
    /// Disks (VM, disk index) with an action on their link under way (attach, resume, a
    /// proposal): one at a time per disk, whatever the site, as QEMU runs one mirror per disk.
    /// Kept per link, an attach to a site whose hosts had just lost power, still waiting for
    /// one to answer, once completed after another site's copy had been attached and synced:
    /// its mirror replaced the first, whose copy committed state still counted current, and a
    /// start there lost writes (simulator: sites a, a, b, b, w, seed 24).
    busy: BTreeSet<DiskKey>,
    /// Links whose last attach or resume failed: not tried again before then.
    retry_at: BTreeMap<LinkKey, tokio::time::Instant>,
    /// Exports this host serves: the VM and the generation they serve.
    pub(super) served: BTreeMap<String, (String, u64)>,
    /// The watch on this site's storage under each running mirrored disk (`storagewatch`).
    pub(super) storage: BTreeMap<DiskKey, super::storagewatch::StorageWatch>,
}

/// What committed state wants of one link.
#[derive(Clone, Debug)]
struct Wanted {
    key: LinkKey,
    generation: u64,
    current: bool,
    /// Whether committed state counts this host's own site's copy current.
    local_current: bool,
    /// This host's site.
    my_site: String,
    /// Names and API addresses of the active hosts of the link's site, lowest id first.
    servers: Vec<(String, String)>,
}

fn job_phase(s: &MirrorSample) -> (JobPhase, u64, u64) {
    match s {
        MirrorSample::Absent => (JobPhase::Absent, 0, 0),
        MirrorSample::Copying { copied, remaining } => (JobPhase::Copying, *copied, copied + remaining),
        MirrorSample::InSync => (JobPhase::InSync, 0, 0),
        MirrorSample::Stopped { .. } => (JobPhase::Stopped, 0, 0),
        MirrorSample::Ended { .. } => (JobPhase::Ended, 0, 0),
    }
}

impl Agent {
    pub(super) async fn mirror_loop(self: Arc<Self>) {
        let mut rounds = self.rounds();
        // A guest paused on its storage's failure, a copy found lost: acted on at once (the
        // switch and the hold's commit start then), not at the next round.
        let events = self.driver.mirror_events();
        while !self.is_stopping() {
            match &events {
                Some(e) => tokio::select! {
                    () = self.next_round(&mut rounds) => {}
                    () = e.notified() => {}
                },
                None => self.next_round(&mut rounds).await,
            }
            self.follow_mirrors().await;
            self.sweep_served_copies().await;
        }
    }

    /// The links committed state wants of this host now: one per mirrored disk of each VM
    /// running here (QEMU runs one mirror job per disk), into the copy of one other site — the
    /// one this generation's link already writes, else the one committed state picks
    /// (`mirror_site_for`: the VM's home's site first). Once attached it never changes within a
    /// generation: a copy the mirror stopped writing while committed state still counted it
    /// current could restart the VM without the writes made since. A new generation (a start) counts only its own site's copy current anyway.
    fn wanted_links(&self) -> Vec<Wanted> {
        let me = self.me;
        let existing: BTreeMap<(String, usize, u64), String> =
            lock(&self.mirroring).links.iter().map(|((vm, disk, site), l)| ((vm.clone(), *disk, l.generation), site.clone())).collect();
        self.consensus.with_state(|s| {
            let my_site = s.hosts.get(&me).and_then(|h| h.site.clone());
            let active = |hosts: &[HostId]| -> Vec<(String, String)> {
                hosts
                    .iter()
                    .filter_map(|h| s.hosts.get(h))
                    .filter(|h| h.status == tandem_core::state::HostStatus::Active)
                    .map(|h| (h.name.clone(), h.api_addr.clone()))
                    .collect()
            };
            let sites: Vec<(String, Vec<HostId>)> = s.sites().into_iter().filter(|(site, _)| Some(site) != my_site.as_ref()).collect();
            let mut wanted = Vec::new();
            for v in s.vms.values().filter(|v| v.spec.site_mirrored()) {
                let Some(a) = v.assignment().filter(|a| a.host == me) else { continue };
                for (disk, _) in v.spec.mirrored_disks() {
                    let chosen = existing.get(&(v.spec.name.clone(), disk, a.generation));
                    // With no site that could serve a copy, still a link (it attaches nothing):
                    // a guest paused by its own storage's failure is resumed through it.
                    let target = chosen.cloned().or_else(|| s.mirror_site_for(v, me)).and_then(|site| sites.iter().find(|(name, _)| *name == site));
                    let Some((site, hosts)) = target else { continue };
                    let key = (v.spec.name.clone(), disk, site.clone());
                    let local_current = s.copy_current_on(v, me);
                    let current = v.copies.contains(site);
                    let my_site = my_site.clone().unwrap_or_default();
                    wanted.push(Wanted { key, generation: a.generation, current, local_current, my_site, servers: active(hosts) });
                }
            }
            wanted.truncate(MAX_MIRROR_LINKS);
            wanted
        })
    }

    async fn follow_mirrors(self: &Arc<Self>) {
        let running: BTreeMap<String, u64> = self.driver.list().into_iter().filter(|v| v.exit.is_none()).map(|v| (v.name, v.generation)).collect();
        let wanted: Vec<Wanted> = self.wanted_links().into_iter().filter(|w| running.get(&w.key.0) == Some(&w.generation)).collect();
        {
            // A link of a VM no longer running here (or started again since) goes (the driver drops its relay with the VM).
            let mut m = lock(&self.mirroring);
            m.links.retain(|k, l| wanted.iter().any(|w| w.key == *k && w.generation == l.generation));
            m.retry_at.retain(|k, _| wanted.iter().any(|w| w.key == *k));
        }
        self.watch_storage_of(&wanted);
        // The disks whose own site's storage failed, per VM (one question per VM and pass).
        let mut failed: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for w in wanted {
            {
                let m = lock(&self.mirroring);
                if m.busy.contains(&disk_of(&w.key)) || m.retry_at.get(&w.key).is_some_and(|t| *t > tokio::time::Instant::now()) {
                    continue;
                }
            }
            let (vm, disk, site) = &w.key;
            if !failed.contains_key(vm) {
                let disks = self.driver.failed_disks(vm).await.unwrap_or_else(|e| {
                    tracing::debug!("storage of {vm}: {e}");
                    Vec::new()
                });
                failed.insert(vm.clone(), disks);
            }
            let local_failed = failed.get(vm).is_some_and(|d| d.contains(disk));
            let local_reach = self.driver.local_reach(vm, *disk);
            // A served copy (the disk's, or the way back's) is cut; one opened directly only a
            // restart answers.
            let answer = if local_reach == tandem_core::mirroring::LocalReach::Served { HangAnswer::Switch } else { HangAnswer::Restart };
            let local_hung = self.local_copy_hung(vm, *disk, answer);
            let status = match self.driver.mirror_status(vm, *disk).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("mirror of {vm} disk {disk}: {e}");
                    continue;
                }
            };
            let (job, mut copied, mut total) = job_phase(&status.job);
            let (back, back_copied, back_total) = job_phase(&status.back);
            if back == JobPhase::Copying {
                (copied, total) = (back_copied, back_total);
            }
            let (obs, action) = {
                let mut m = lock(&self.mirroring);
                // A relay without a link of this generation is the last generation's.
                let relay = if m.links.contains_key(&w.key) { status.relay } else { RelayPhase::None };
                let path = match m.links.get(&w.key) {
                    // (Returning too: the disk is still on the other copy until the way back ends.)
                    Some(l) if l.state.on_other_copy() => DiskPath::OtherCopy,
                    _ if local_failed => DiskPath::LocalFailed,
                    _ => DiskPath::Local,
                };
                let obs = LinkObservation {
                    job,
                    relay,
                    current: w.current,
                    server_reachable: !w.servers.is_empty(),
                    path,
                    local_current: w.local_current,
                    back,
                    local_hung,
                    local_reach,
                };
                if let Some(link) = m.links.get_mut(&w.key) {
                    let state = link_state(obs, copied, total, &link.state);
                    link.delta = status.delta.filter(|_| matches!(state, LinkState::Resyncing { .. }));
                    link.track_pace(&state);
                    let before = std::mem::replace(&mut link.state, state.clone());
                    self.note_link_change(&w.key, &before, &state, status.lost.as_deref().unwrap_or(""), status.delta);
                }
                (obs, decide(obs))
            };
            let Some(action) = action else { continue };
            if action == LinkAction::Release {
                // Committed state already counts the copy as stale: the held writes may go.
                if let Err(e) = self.driver.release_mirror(vm, *disk).await {
                    tracing::warn!("releasing the writes of {vm} disk {disk}: {}", crate::api::chain(&e));
                    continue;
                }
                self.events.record(
                    EventKind::MirrorDegraded,
                    Some(vm),
                    Some(site),
                    format!("disk {disk} runs on this site's copy alone; {site}'s copy is stale"),
                );
                continue;
            }
            tracing::debug!("mirror of {vm} disk {disk} to {site}: {obs:?} → {action:?}");
            lock(&self.mirroring).busy.insert(disk_of(&w.key));
            let a = Arc::clone(self);
            tokio::spawn(
                async move {
                    let failed = a.act_on_link(&w, action).await.err();
                    let mut m = lock(&a.mirroring);
                    m.busy.remove(&disk_of(&w.key));
                    m.retry_at.remove(&w.key);
                    if let Some(why) = failed {
                        tracing::warn!("mirror of {} disk {} to site {}: {action:?} failed (tried again in {LINK_RETRY:?}): {why}", w.key.0, w.key.1, w.key.2);
                        m.retry_at.insert(w.key.clone(), tokio::time::Instant::now() + LINK_RETRY);
                    }
                }
                .in_current_span(),
            );
        }
    }

    /// Starts the probes of this site's storage under the wanted links' disks — those on the
    /// other copy too: a way back writes into it, and the guest's writes wait for those.
    fn watch_storage_of(self: &Arc<Self>, wanted: &[Wanted]) {
        let mut disks: BTreeMap<DiskKey, String> = BTreeMap::new();
        for w in wanted {
            let key = disk_of(&w.key);
            if disks.contains_key(&key) {
                continue;
            }
            if let Ok(d) = self.disk_spec(&key.0, key.1) {
                disks.insert(key, d.path);
            }
        }
        let site = wanted.first().map(|w| w.my_site.clone()).unwrap_or_default();
        self.watch_site_storage(disks.into_iter().map(|((vm, disk), path)| (vm, disk, path)).collect(), &site);
    }

    async fn act_on_link(self: &Arc<Self>, w: &Wanted, action: LinkAction) -> Result<(), String> {
        let (vm, disk, site) = &w.key;
        match action {
            LinkAction::Attach => self.attach_link(w).await,
            LinkAction::Reattach => {
                self.driver.detach_mirror(vm, *disk).await.map_err(|e| crate::api::chain(&e))?;
                lock(&self.mirroring).links.remove(&w.key);
                Ok(())
            }
            LinkAction::Resume => {
                let (endpoint, server, _) = self.request_copy(w).await?;
                self.driver.resume_mirror(vm, *disk, &endpoint.address).await.map_err(|e| crate::api::chain(&e))?;
                if let Some(link) = lock(&self.mirroring).links.get_mut(&w.key) {
                    link.server = server;
                }
                self.events.record(EventKind::MirrorResyncing, Some(vm), Some(site), format!("disk {disk}: copying what {site}'s copy missed"));
                Ok(())
            }
            LinkAction::ProposeSynced => {
                let cmd = Command::MirrorSynced { name: vm.clone(), generation: w.generation, site: site.clone() };
                match self.submit(cmd).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("refused: {e}")),
                    Err(e) => Err(format!("not committed: {}", crate::api::chain(&e))),
                }
            }
            LinkAction::ProposeDegraded => {
                let cmd = Command::MirrorDegraded { name: vm.clone(), generation: w.generation, site: site.clone() };
                match self.submit(cmd).await {
                    // Committed: the copy is stale, the held writes may go now.
                    Ok(Ok(_)) => {
                        self.driver.release_mirror(vm, *disk).await.map_err(|e| crate::api::chain(&e))?;
                        self.events.record(
                            EventKind::MirrorDegraded,
                            Some(vm),
                            Some(site),
                            format!("disk {disk} runs on this site's copy alone; {site}'s copy is stale"),
                        );
                        Ok(())
                    }
                    Ok(Err(e)) => Err(format!("refused (writes stay held): {e}")),
                    Err(e) => Err(format!("not committed (writes stay held): {}", crate::api::chain(&e))),
                }
            }
            // Committed: only the other copy is current, the guest may go on there.
            LinkAction::ProposeSwitch => {
                self.commit_switched(w, "the guest stays paused").await?;
                self.switch_link(w).await
            }
            LinkAction::Switch => self.switch_link(w).await,
            // Committed: only the other copy is current; the VM restarts there.
            LinkAction::ProposeRestartElsewhere => {
                self.commit_switched(w, "the guest waits for its storage").await?;
                self.restart_elsewhere(w).await
            }
            LinkAction::RestartElsewhere => self.restart_elsewhere(w).await,
            LinkAction::CutLocal => {
                self.driver.cut_local(vm, *disk).await.map_err(|e| crate::api::chain(&e))?;
                let detail = format!("disk {disk}: this site's storage hangs; its requests were cut from it and the disk goes on on {site}'s copy (a way back into it is given up)");
                self.events.record(EventKind::StoragePathHung, Some(vm), Some(&w.my_site), detail);
                Ok(())
            }
            LinkAction::StartReturn => {
                let d = self.disk_spec(vm, *disk)?;
                let step = ReturnStep::Start { relative: d.path, format: d.format.unwrap_or_else(|| "raw".into()) };
                // Fails while the site's storage does not answer: tried again every LINK_RETRY.
                self.driver.return_to_local(vm, *disk, &step).await.map_err(|e| crate::api::chain(&e))?;
                self.storage_answered(vm, *disk);
                let detail = format!("disk {disk}: this site's storage answers again; bringing its copy up to date with what was written since the switch");
                self.events.record(EventKind::StoragePathReturning, Some(vm), Some(&w.my_site), detail);
                Ok(())
            }
            LinkAction::Return => self.return_link(w).await,
            LinkAction::AbandonReturn => self.driver.return_to_local(vm, *disk, &ReturnStep::Abandon).await.map_err(|e| crate::api::chain(&e)),
            LinkAction::RetryLocal => {
                let relative = self.disk_spec(vm, *disk)?.path;
                // Fails while the site's storage does not answer: tried again every LINK_RETRY.
                self.driver.return_to_local(vm, *disk, &ReturnStep::Retry { relative }).await.map_err(|e| crate::api::chain(&e))?;
                self.storage_answered(vm, *disk);
                tracing::info!("{vm} disk {disk}: this site's storage answers again; the guest resumed on it");
                Ok(())
            }
            LinkAction::GiveUp => {
                // Killed first: its vCPUs must stop before the cluster starts it elsewhere (its
                // held writes were never acknowledged, and never reach any copy).
                self.driver.kill(vm).map_err(|e| crate::api::chain(&e))?;
                let detail = format!("disk {disk} ran on {site}'s copy, which is lost too: no copy is left to go on with here");
                self.events.record(EventKind::StoragePathLost, Some(vm), Some(site), format!("{detail}; {vm} killed and given up"));
                self.give_up_here(vm, w.generation, &detail).await;
                Ok(())
            }
            LinkAction::Release => Ok(()),
        }
    }

    /// Commits `mirror-switched` for the link's copy (the only current one from then on); what
    /// `meanwhile` says holds while it is not committed.
    async fn commit_switched(&self, w: &Wanted, meanwhile: &str) -> Result<(), String> {
        let (vm, _, site) = &w.key;
        let cmd = Command::MirrorSwitched { name: vm.clone(), generation: w.generation, site: site.clone() };
        match self.submit(cmd).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("refused ({meanwhile}): {e}")),
            Err(e) => Err(format!("not committed ({meanwhile}): {}", crate::api::chain(&e))),
        }
    }

    /// The local copy hangs, committed state counts only the other copy current: the VM is
    /// killed — its relay first, so that nothing it had under way reaches the other copy later
    /// — and given up once none of its threads can run again (those stuck in the hung storage
    /// die when it lets them go), so that the cluster starts it where that copy is.
    async fn restart_elsewhere(&self, w: &Wanted) -> Result<(), String> {
        let (vm, disk, site) = &w.key;
        match self.driver.kill_for_good(vm, HUNG_KILL_WAIT).await {
            // (Gone already: an earlier try killed it and its give-up was not committed.)
            Ok(()) | Err(tandem_drivers::DriverError::NotRunning(_)) => {}
            Err(e) => return Err(crate::api::chain(&e)),
        }
        let detail = format!(
            "disk {disk}: this site's storage has not answered for {} s, and {site}'s copy holds every write the guest saw acknowledged",
            self.cfg.mirror.hung_storage_restart_s
        );
        self.events.record(
            EventKind::StoragePathLost,
            Some(vm),
            Some(&w.my_site),
            format!("{detail}; {vm} killed and given up, to start again where that copy is"),
        );
        self.give_up_here(vm, w.generation, &detail).await;
        Ok(())
    }

    /// Disk `disk` of `vm`'s spec, as committed.
    fn disk_spec(&self, vm: &str, disk: usize) -> Result<tandem_core::state::DiskSpec, String> {
        let d = self.consensus.with_state(|s| s.vms.get(vm).and_then(|v| v.spec.disks.get(disk).cloned()));
        d.ok_or_else(|| format!("disk {disk} of {vm} is gone from committed state"))
    }

    /// The mirror back into this site's copy is in sync: with the guest paused, this site's
    /// copy is committed current again, then the disk runs on it (mirrored into the other copy
    /// from that instant: both are equal while the guest is paused) and the guest resumes.
    async fn return_link(&self, w: &Wanted) -> Result<(), String> {
        let (vm, disk, _) = &w.key;
        let started = tokio::time::Instant::now();
        self.driver.return_to_local(vm, *disk, &ReturnStep::Pause).await.map_err(|e| crate::api::chain(&e))?;
        let cmd = Command::MirrorSynced { name: vm.clone(), generation: w.generation, site: w.my_site.clone() };
        let committed = match self.submit(cmd).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("refused: {e}")),
            Err(e) => Err(format!("not committed: {}", crate::api::chain(&e))),
        };
        if let Err(why) = committed {
            // Not current: the guest goes on on the other copy; tried again next pass.
            self.driver.return_to_local(vm, *disk, &ReturnStep::Resume).await.map_err(|e| crate::api::chain(&e))?;
            return Err(why);
        }
        if let Err(e) = self.driver.return_to_local(vm, *disk, &ReturnStep::Finish).await {
            // Both copies count current and the disk may run on this one without a mirror:
            // the guest stays paused (no write can then miss a current copy).
            let detail = format!("disk {disk}: the way back to this site's copy failed midway; the guest stays paused: {}", crate::api::chain(&e));
            self.events.record(EventKind::StoragePathLost, Some(vm), Some(&w.my_site), detail.clone());
            return Err(detail);
        }
        if let Some(link) = lock(&self.mirroring).links.get_mut(&w.key) {
            link.state = LinkState::InSync;
        }
        let detail = format!("disk {disk}: back on this site's copy, mirrored into the other again (guest paused {} ms)", started.elapsed().as_millis());
        self.events.record(EventKind::StoragePathRestored, Some(vm), Some(&w.my_site), detail);
        Ok(())
    }

    /// Switches the link's disk onto the other site's copy (committed as the only current one)
    /// and resumes the guest.
    async fn switch_link(&self, w: &Wanted) -> Result<(), String> {
        let (vm, disk, site) = &w.key;
        let started = tokio::time::Instant::now();
        self.driver.switch_to_copy(vm, *disk).await.map_err(|e| crate::api::chain(&e))?;
        if let Some(link) = lock(&self.mirroring).links.get_mut(&w.key) {
            link.state = LinkState::OnOtherCopy;
        }
        let detail = format!(
            "disk {disk}: this site's storage failed; the disk runs on {site}'s copy, without a restart (switched in {} ms); this site's copy is stale",
            started.elapsed().as_millis()
        );
        self.events.record(EventKind::StoragePathSwitched, Some(vm), Some(site), detail);
        Ok(())
    }

    /// Asks a host of the link's site to serve its copy and starts the mirror into it (a full
    /// copy).
    async fn attach_link(self: &Arc<Self>, w: &Wanted) -> Result<(), String> {
        let (vm, disk, site) = &w.key;
        let (endpoint, server, bytes) = self.request_copy(w).await?;
        // The mirror replaces any other of the disk: never one whose copy this generation
        // attached (committed state may count it current, and it would stop getting writes).
        let other = lock(&self.mirroring)
            .links
            .iter()
            .find(|((v, d, s), l)| v == vm && d == disk && s != site && l.generation == w.generation)
            .map(|(k, _)| k.2.clone());
        if let Some(other) = other {
            return Err(format!("disk {disk} already mirrors into {other}'s copy in generation {}", w.generation));
        }
        let to = MirrorTarget {
            disk: *disk,
            server: endpoint.address,
            export: endpoint.export,
            stall: Duration::from_millis(self.cfg.mirror.stall_ms),
            bytes,
            resync_cap: self.cfg.mirror.resync_cap_mib_s().map(|mib_s| mib_s << 20),
        };
        let first = self.driver.attach_mirror(vm, &to).await.map_err(|e| crate::api::chain(&e))?;
        let link = Link { generation: w.generation, server: server.clone(), state: LinkState::Resyncing { copied: 0, total: 0 }, delta: None, pace: None };
        lock(&self.mirroring).links.insert(w.key.clone(), link);
        let how = match first {
            FirstCopy::ByChunkSums { chunk, chunks } => format!(
                "copy into {site}'s copy, served by {server}, compared with its chunk sums ({chunks} chunks of {} KiB): only chunks that differ cross the link",
                chunk >> 10
            ),
            FirstCopy::Whole { why } => format!("full copy into {site}'s copy, served by {server} (no chunk sums: {why})"),
        };
        let how = match to.resync_cap {
            Some(cap) => format!("{how}; copying at most {} MiB/s (the guest's writes are not held by it)", cap >> 20),
            None => how,
        };
        self.events.record(EventKind::MirrorResyncing, Some(vm), Some(site), format!("disk {disk}: {how}"));
        Ok(())
    }

    /// The first host of the link's site that serves the copy: its answer, its name, and the
    /// disk's length.
    async fn request_copy(&self, w: &Wanted) -> Result<(CopyEndpoint, String, u64), String> {
        let (vm, disk, _) = &w.key;
        let bytes = self.driver.disk_sizes(vm, &[*disk]).await.map_err(|e| crate::api::chain(&e))?.first().map(|d| d.bytes).ok_or("no disk size")?;
        let req = CopyRequest { name: vm.clone(), generation: w.generation, disk: *disk, bytes };
        let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        let mut last = String::from("no host of that site is active");
        for (host, api) in &w.servers {
            match self.rpc.call(api, "/v1/internal/copies", Some(&self.token), Some(body.clone()), COPY_REQUEST_TIMEOUT).await {
                Ok(r) if r.status == 200 => {
                    let answer: CopyEndpoint = serde_json::from_slice(&r.body).map_err(|e| format!("unreadable answer from {host}: {e}"))?;
                    return Ok((answer, host.clone(), bytes));
                }
                Ok(r) => last = format!("{host}: {}", String::from_utf8_lossy(&r.body).chars().take(300).collect::<String>()),
                Err(e) => last = format!("{host}: {}", crate::api::chain(&e)),
            }
        }
        Err(last)
    }

    /// Before a start of `name` here in `generation`: commits every other site's copy stale
    /// (`ClusterState::copies_to_leave_behind`). False when that did not commit: no start now
    /// (the reconciler asks again next pass).
    pub(super) async fn leave_copies_behind(&self, name: &str, generation: u64) -> bool {
        let sites = self.consensus.with_state(|s| s.copies_to_leave_behind(name, self.me));
        for site in sites {
            let cmd = Command::MirrorDegraded { name: name.to_string(), generation, site: site.clone() };
            match self.submit(cmd).await {
                Ok(Ok(_)) => {
                    let detail = format!("{site}'s copy left behind: {name} starts again here, without a mirror until one is in sync");
                    self.events.record(EventKind::MirrorDegraded, Some(name), Some(&site), detail);
                }
                Ok(Err(e)) => {
                    tracing::warn!("leaving {site}'s copy of {name} behind refused (not started now): {e}");
                    return false;
                }
                Err(e) => {
                    tracing::warn!("leaving {site}'s copy of {name} behind not committed (not started now): {}", crate::api::chain(&e));
                    return false;
                }
            }
        }
        true
    }
}
