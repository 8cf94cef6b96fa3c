//! Live migration, the source's loop: for every migration committed state has leaving this host,
//! ask the destination for a paused copy, send the VM with the driver, and commit the switchover
//! (or the abort). The decisions — who owns the VM at each instant, when a paused copy may run —
//! are committed state's and the reconciler's (`tandem_core::state`, `tandem_core::reconcile`):
//! this loop only proposes `MigrationSwitchover` after the driver reported the migration complete
//! (the source then paused), and `MigrationAbort` when it failed or was cancelled. Whichever the
//! log applies first decides; the reconciler resumes the one paused copy committed state names.

use super::{lock, Agent};
use crate::views::{IncomingEndpoint, IncomingRequest, MigrationOutcome, MigrationView};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_core::state::{Applied, Assignment, Command, StateError, VmPhase};
use tandem_drivers::diskcopy::LocalDiskSize;
use tandem_drivers::migration::{MigrationProgress, MigrationReport, MigrationTarget};
use tracing::Instrument;

/// Outcomes kept for `GET /v1/migrations`.
pub const MAX_RECENT_MIGRATIONS: usize = 64;
/// Attempts to have the destination prepare its paused copy (it may not have applied the start
/// of the migration yet, or still hold an older copy that its reconciler is about to kill).
pub const PREPARE_ATTEMPTS: u32 = 10;
/// The pause between two such attempts.
pub const PREPARE_RETRY: Duration = Duration::from_millis(300);
/// One prepare request: starting a paused QEMU and reaching its QMP socket included.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the source keeps proposing the switchover before it also proposes an abort (either
/// may commit; the log's order decides). It keeps trying until committed state has decided.
pub const SWITCHOVER_PATIENCE: Duration = Duration::from_secs(30);
/// The pause between two switchover proposals.
pub const SWITCHOVER_RETRY: Duration = Duration::from_millis(200);
/// How long the destination waits to apply the migration's start before it refuses to prepare.
pub const INCOMING_APPLY_WAIT: Duration = Duration::from_secs(3);

/// Where one outgoing migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationPhase {
    /// The destination is starting its paused copy.
    Preparing,
    /// Memory and device state are on their way.
    Copying,
    /// The copy completed (this host's copy is paused); the switchover is being committed.
    Switching,
    /// Switched to post-copy (set before the switchover is proposed, so that the reconciler
    /// never kills the copy under the pages): once committed the guest runs at the destination,
    /// and this host still sends it the pages it lacks. Its copy here is killed once the last
    /// one went.
    ServingPages,
}

impl MigrationPhase {
    fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Preparing => "preparing",
            MigrationPhase::Copying => "copying",
            MigrationPhase::Switching => "switching over",
            MigrationPhase::ServingPages => "post-copy: sending the last pages",
        }
    }
}

struct Outgoing {
    generation: u64,
    to: tandem_core::HostId,
    phase: MigrationPhase,
    progress: Option<MigrationProgress>,
    cancel: Arc<AtomicBool>,
}

/// This host's migrations: those it drives, the last outcomes, and the destinations it prepared.
#[derive(Default)]
pub(super) struct Migrations {
    outgoing: BTreeMap<String, Outgoing>,
    recent: VecDeque<MigrationOutcome>,
    /// Paused copies prepared here: (generation, endpoint), so a repeated request gets the same
    /// answer.
    prepared: BTreeMap<String, (u64, IncomingEndpoint)>,
    /// Migrations leaving this host with no copy here to send (destination generations), whose
    /// abort has been proposed: one proposal at a time.
    orphaned: BTreeSet<(String, u64)>,
}

impl Agent {
    pub(super) async fn migration_loop(self: Arc<Self>) {
        let mut rounds = self.rounds();
        while !self.is_stopping() {
            self.next_round(&mut rounds).await;
            self.follow_migrations();
        }
    }

    /// Starts driving each migration leaving this host, and cancels those committed state ended.
    fn follow_migrations(self: &Arc<Self>) {
        let leaving: Vec<(String, Assignment, Assignment)> =
            self.consensus.with_state(|s| s.migrations().filter(|(_, from, _)| from.host == self.me).map(|(n, from, to)| (n.to_string(), from, to)).collect());
        let running: BTreeMap<String, u64> = self.driver.list().into_iter().filter(|v| v.exit.is_none()).map(|v| (v.name, v.generation)).collect();
        let starting = self.starting_here();
        let mut m = lock(&self.migrations);
        for (name, out) in &m.outgoing {
            if !leaving.iter().any(|(n, _, to)| n == name && to.generation == out.generation) {
                out.cancel.store(true, Ordering::SeqCst);
            }
        }
        m.prepared.retain(|name, (g, _)| running.get(name) == Some(g));
        if self.status().joined_epoch.is_none() {
            return;
        }
        m.orphaned.retain(|(n, g)| leaving.iter().any(|(name, _, to)| name == n && to.generation == *g));
        for (name, from, to) in leaving {
            if m.outgoing.contains_key(&name) {
                continue;
            }
            // Only a copy that runs here, in the generation committed state has, is sent. With
            // none (this host restarted since the migration began — a power loss, a crash — or
            // the guest exited), nothing ever will be: the migration is aborted, so that the
            // reconciler starts the VM here again once the abort commits and the destination
            // drops its paused copy. Without it the VM would wait, migrating, forever.
            if running.get(&name) != Some(&from.generation) {
                if !starting.contains(&name) && m.orphaned.insert((name.clone(), to.generation)) {
                    let a = Arc::clone(self);
                    tokio::spawn(
                        async move {
                            a.propose_abort(&name, to.generation, "no copy of it runs at its source any more (its host restarted, or it exited)").await;
                            lock(&a.migrations).orphaned.remove(&(name, to.generation));
                        }
                        .in_current_span(),
                    );
                }
                continue;
            }
            let cancel = Arc::new(AtomicBool::new(false));
            m.outgoing.insert(
                name.clone(),
                Outgoing { generation: to.generation, to: to.host, phase: MigrationPhase::Preparing, progress: None, cancel: Arc::clone(&cancel) },
            );
            let a = Arc::clone(self);
            tokio::spawn(async move { a.drive_migration(name, to, cancel).await }.in_current_span());
        }
    }

    fn set_phase(&self, name: &str, phase: MigrationPhase) {
        if let Some(o) = lock(&self.migrations).outgoing.get_mut(name) {
            o.phase = phase;
        }
    }

    async fn drive_migration(self: Arc<Self>, name: String, to: Assignment, cancel: Arc<AtomicBool>) {
        let (dest_api, dest_name) = self.consensus.with_state(|s| s.hosts.get(&to.host).map(|h| (h.api_addr.clone(), h.name.clone()))).unwrap_or_default();
        let copied: Vec<usize> = self.consensus.with_state(|s| s.vms.get(&name).map(|v| v.spec.copied_disks().map(|(i, _)| i).collect())).unwrap_or_default();
        let prepared = match self.driver.disk_sizes(&name, &copied).await {
            Err(e) => Err(format!("the sizes of its local disks are unknown: {}", crate::api::chain(&e))),
            Ok(sizes) => self
                .request_incoming(&dest_api, &name, to.generation, sizes, &cancel)
                .await
                .map_err(|why| format!("the destination {dest_name} could not prepare: {why}")),
        };
        let result = match prepared {
            Err(why) => Err(why),
            Ok(ready) => {
                self.set_phase(&name, MigrationPhase::Copying);
                let target = self.migration_target(&name, ready, copied, &cancel);
                match self.driver.migrate_out(&name, &target).await {
                    Err(e) => Err(crate::api::chain(&e)),
                    Ok(report) => {
                        // A copy spent by post-copy is protected from the reconciler before the
                        // commit: the switchover's entry wakes it at once, and killing the copy
                        // then would lose the pages the destination still needs.
                        self.set_phase(&name, if report.postcopy { MigrationPhase::ServingPages } else { MigrationPhase::Switching });
                        tracing::debug!("{name}: copy complete at the source; proposing the switchover");
                        self.commit_switchover(&name, to).await;
                        tracing::debug!("{name}: the switchover is decided");
                        if report.postcopy {
                            self.serve_postcopy(&name, report).await
                        } else {
                            Ok(report)
                        }
                    }
                }
            }
        };
        let reason = result.as_ref().err().cloned();
        if let Some(why) = &reason {
            self.propose_abort(&name, to.generation, why).await;
        }
        self.finish_migration(&name, to, &dest_name, result).await;
    }

    /// After a switch to post-copy (the switchover committed, or an abort or a failover decided
    /// instead): sends the pages the destination lacks until the last one, then kills this
    /// host's copy, which is spent either way — its memory is no longer whole, and nothing ever
    /// resumes it (the driver refuses). Pages are served only to a destination that owns the VM;
    /// without the commit the copy goes at once and the VM starts afresh where it is placed.
    async fn serve_postcopy(&self, name: &str, report: MigrationReport) -> Result<MigrationReport, String> {
        let committed = self.consensus.with_state(|s| s.vms.get(name).and_then(|v| v.assignment())).is_some_and(|a| a.host != self.me);
        let served = if committed {
            let bound = Duration::from_secs(self.cfg.migration.timeout_s);
            self.driver.finish_postcopy(name, bound).await.map_err(|e| crate::api::chain(&e))
        } else {
            Err("the switchover was not committed after the switch to post-copy".to_string())
        };
        let _ = self.driver.kill(name);
        let served = served?;
        Ok(MigrationReport {
            total_ms: served.total_ms.unwrap_or(report.total_ms),
            downtime_ms: served.downtime_ms.or(report.downtime_ms),
            transferred_bytes: served.transferred_bytes.max(report.transferred_bytes),
            ..report
        })
    }

    /// The VMs whose copy here serves a post-copy migration's last pages: the reconciler leaves
    /// them alone although committed state has them elsewhere (killing one would lose the guest).
    pub(super) fn serving_pages(&self) -> BTreeSet<String> {
        lock(&self.migrations).outgoing.iter().filter(|(_, o)| o.phase == MigrationPhase::ServingPages).map(|(n, _)| n.clone()).collect()
    }

    /// Asks the destination for its paused copy; retried while it may still come.
    async fn request_incoming(
        &self,
        dest_api: &str,
        name: &str,
        generation: u64,
        local_disks: Vec<LocalDiskSize>,
        cancel: &AtomicBool,
    ) -> Result<IncomingEndpoint, String> {
        let body =
            serde_json::to_vec(&IncomingRequest { name: name.to_string(), generation, local_disks, multifd_channels: self.cfg.migration.multifd_channels })
                .map_err(|e| e.to_string())?;
        let mut last = String::from("no attempt");
        for _ in 0..PREPARE_ATTEMPTS {
            if cancel.load(Ordering::SeqCst) {
                return Err("cancelled".into());
            }
            match self.rpc.call(dest_api, "/v1/internal/incoming", Some(&self.token), Some(body.clone()), PREPARE_TIMEOUT).await {
                Ok(r) if r.status == 200 => {
                    return serde_json::from_slice(&r.body).map_err(|e| format!("unreadable answer: {e}"));
                }
                Ok(r) => last = String::from_utf8_lossy(&r.body).chars().take(300).collect(),
                Err(e) => last = crate::api::chain(&e),
            }
            tokio::time::sleep(PREPARE_RETRY).await;
        }
        Err(last)
    }

    fn migration_target(self: &Arc<Self>, name: &str, ready: IncomingEndpoint, disks: Vec<usize>, cancel: &Arc<AtomicBool>) -> MigrationTarget {
        let weak = Arc::downgrade(self);
        let vm = name.to_string();
        let clock = Arc::clone(&self.clock);
        MigrationTarget {
            uri: ready.uri,
            nbd: ready.nbd,
            disks,
            max_bandwidth: self.cfg.migration.max_bandwidth_mib_s << 20,
            multifd_channels: self.cfg.migration.multifd_channels,
            postcopy: self.consensus.with_state(|s| s.vms.get(name).map(|v| v.spec.postcopy)).unwrap_or_default(),
            postcopy_bandwidth: self.cfg.migration.postcopy_bandwidth(),
            stall_ms: self.cfg.migration.stall_s * 1000,
            overall_ms: self.cfg.migration.timeout_s * 1000,
            cancel: Arc::clone(cancel),
            progress: Arc::new(move |p: &MigrationProgress| {
                if let Some(a) = weak.upgrade() {
                    if let Some(o) = lock(&a.migrations).outgoing.get_mut(&vm) {
                        o.progress = Some(p.clone());
                    }
                }
            }),
            now: Arc::new(move || clock.now()),
        }
    }

    /// Whether committed state still migrates `name` to `generation`.
    fn still_migrating(&self, name: &str, generation: u64) -> bool {
        self.consensus.with_state(|s| s.vms.get(name).and_then(|v| v.migrating_to()).is_some_and(|t| t.generation == generation))
    }

    /// Proposes the switchover until committed state has decided (switched over, aborted, or
    /// the VM failed over or stopped). Past [`SWITCHOVER_PATIENCE`] it also proposes an abort:
    /// whichever the log applies first decides, and the reconciler resumes that copy.
    async fn commit_switchover(&self, name: &str, to: Assignment) {
        let started = tokio::time::Instant::now();
        let mut abort_proposed = false;
        while self.still_migrating(name, to.generation) && !self.is_stopping() && !self.is_fenced() {
            let cmd = self.consensus.with_state(|s| s.switchover_command(name, to.generation));
            match self.submit(cmd).await {
                Ok(Ok(Applied::Migrated { .. })) => return,
                // The destination's copy of a mirrored disk was left behind while the memory
                // moved: no retry can help, and the guest waits paused — abort at once.
                Ok(Err(e @ StateError::StaleCopy { .. })) if !abort_proposed => {
                    abort_proposed = true;
                    self.propose_abort(name, to.generation, &format!("the switchover was refused: {e}")).await;
                }
                Ok(other) => tracing::debug!("switchover of {name} refused: {other:?}"),
                Err(e) => tracing::warn!("switchover of {name} not committed yet: {e}"),
            }
            if !abort_proposed && started.elapsed() >= SWITCHOVER_PATIENCE {
                abort_proposed = true;
                self.propose_abort(name, to.generation, "the switchover could not be committed in time").await;
            }
            tokio::time::sleep(SWITCHOVER_RETRY).await;
        }
    }

    async fn propose_abort(&self, name: &str, generation: u64, reason: &str) {
        if !self.still_migrating(name, generation) {
            return;
        }
        let cmd = Command::MigrationAbort { name: name.to_string(), generation, reason: reason.to_string() };
        if let Err(e) = self.submit(cmd).await {
            // Not committed: the source keeps its copy paused or running as it is; a later
            // proposal, the destination's failover or this host's fencing settles it.
            tracing::warn!("abort of the migration of {name} not committed: {e}");
        }
    }

    async fn finish_migration(&self, name: &str, to: Assignment, dest_name: &str, result: Result<MigrationReport, String>) {
        // The outcome is what committed state says, not what this host hoped.
        let now_at = self.consensus.with_state(|s| s.vms.get(name).map(|v| v.phase.clone()));
        let completed = matches!(now_at, Some(VmPhase::Placed { at }) if at == to);
        // Committed at the destination, yet failed: a post-copy migration whose last pages were
        // lost — the destination owns the VM and restarts it from its disk.
        let lost = completed && result.is_err();
        let (report, reason) = match (result, completed) {
            (Ok(r), true) => (Some(r), None),
            (Ok(r), false) => (Some(r), Some(format!("the switchover was not committed (the VM is now {now_at:?})"))),
            (Err(why), _) => (None, Some(why)),
        };
        let detail = match (&report, &reason) {
            (Some(r), None) => format!(
                "{name} moved live to {dest_name} in {:.2} s (downtime {} as QEMU measured it; {} MiB sent; {}){}",
                r.total_ms as f64 / 1000.0,
                r.downtime_ms.map_or_else(|| "not reported".to_string(), |d| format!("{d} ms")),
                r.transferred_bytes >> 20,
                r.steps.join(", "),
                r.disks.as_ref().map_or_else(String::new, |d| format!(
                    "; its local disks copied first: {} MiB in {:.2} s",
                    d.bytes >> 20,
                    d.copy_ms as f64 / 1000.0
                ))
            ),
            (_, Some(why)) if lost => {
                format!("{name} switched to {dest_name} by post-copy, but its last pages were lost ({why}): {dest_name} restarts it from its disk")
            }
            (_, Some(why)) => format!("migration of {name} to {dest_name} aborted: {why}; it runs on at {}", self.cfg.name),
            (None, None) => String::new(),
        };
        let kind = if completed && !lost { crate::events::EventKind::MigrationCompleted } else { crate::events::EventKind::MigrationAborted };
        self.events.record(kind, Some(name), Some(&self.cfg.name), detail);
        self.metrics.note_migration(report.as_ref().filter(|_| completed && !lost));
        let outcome = MigrationOutcome {
            name: name.to_string(),
            generation: to.generation,
            from: self.cfg.name.clone(),
            to: dest_name.to_string(),
            result: if lost {
                "lost"
            } else if completed {
                "completed"
            } else {
                "aborted"
            }
            .to_string(),
            reason,
            report,
            finished_at_ms: tandem_drivers::wall_ms(),
        };
        let mut m = lock(&self.migrations);
        m.outgoing.remove(name);
        m.recent.push_back(outcome);
        while m.recent.len() > MAX_RECENT_MIGRATIONS {
            m.recent.pop_front();
        }
    }

    /// The destination's side of `POST /v1/internal/incoming`: starts the paused copy that
    /// committed state migrates here, or says why not.
    pub async fn prepare_incoming(self: &Arc<Self>, req: &IncomingRequest) -> Result<IncomingEndpoint, String> {
        let deadline = tokio::time::Instant::now() + INCOMING_APPLY_WAIT;
        let spec = loop {
            let found = self.consensus.with_state(|s| {
                s.vms.get(&req.name).filter(|v| v.migrating_to() == Some(Assignment { host: self.me, generation: req.generation })).map(|v| v.spec.clone())
            });
            match found {
                Some(spec) => break spec,
                None if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("committed state does not migrate {} here in generation {}", req.name, req.generation))
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        if let Some((g, ready)) = lock(&self.migrations).prepared.get(&req.name) {
            if *g == req.generation {
                return Ok(ready.clone());
            }
        }
        // Every writable local disk must come with it: a disk left out would be started from
        // whatever (stale or no) image this host has.
        let copied: Vec<usize> = spec.copied_disks().map(|(i, _)| i).collect();
        let offered: Vec<usize> = req.local_disks.iter().map(|d| d.index).collect();
        if copied != offered {
            return Err(format!("the VM's local disks are {copied:?}, the request brings {offered:?}"));
        }
        if !self.may_start_vms() {
            return Err("this host may not start VMs now (not joined, fenced or without its lease)".into());
        }
        if !self.cfg.mirror.local_copy_servers && !self.consensus.with_state(|s| s.keeps_site(&req.name, self.me)) {
            // QEMU would open this site's copy itself at the switchover while this site's copy
            // server still holds it for the source's mirror: the resume would fail, a restart.
            return Err("a VM with mirrored disks moves here from another site only through local copy servers ([mirror] local_copy_servers)".into());
        }
        let check = self.start_check_as(&spec, req.generation, super::fencing::StartKind::Incoming);
        let launch = tandem_drivers::VmLaunch { spec, generation: req.generation, check };
        let ready = self
            .driver
            .prepare_incoming(&launch, &req.local_disks, req.multifd_channels.min(tandem_drivers::migration::MAX_MULTIFD_CHANNELS))
            .await
            .map_err(|e| crate::api::chain(&e))?;
        lock(&self.migrations).prepared.insert(req.name.clone(), (req.generation, ready.clone()));
        self.wake_on_switchover(&req.name, req.generation);
        if self.mutation == Some(crate::io::Mutation::ResumeBeforeSwitchover) {
            let (a, name) = (Arc::clone(self), req.name.clone());
            tokio::spawn(
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = a.driver.resume(&name, &tandem_drivers::always_start()).await;
                }
                .in_current_span(),
            );
        }
        Ok(ready)
    }

    /// Watches the applied state until the migration to `generation` here ends, then wakes the
    /// reconciler: after a switchover the paused copy resumes at once instead of at the next
    /// tick (up to a heartbeat interval of pause for the guest). Bounded by the migration's own.
    fn wake_on_switchover(self: &Arc<Self>, name: &str, generation: u64) {
        let (a, name) = (Arc::clone(self), name.to_string());
        let mut applied = self.consensus.applied();
        let bound = Duration::from_secs(self.cfg.migration.timeout_s) + SWITCHOVER_PATIENCE;
        tokio::spawn(
            async move {
                let watch = async {
                    while a.still_migrating(&name, generation) {
                        if applied.changed().await.is_err() {
                            return;
                        }
                    }
                    tracing::debug!("{name}: its migration ended in committed state here; waking the reconciler");
                    a.reconcile_wake.notify_one();
                };
                let _ = tokio::time::timeout(bound, watch).await;
            }
            .in_current_span(),
        );
    }

    /// The migrations committed state runs, with progress for those this host drives, and the
    /// last outcomes here.
    #[must_use]
    pub fn migrations_view(&self) -> crate::views::MigrationsView {
        let active: Vec<(String, Assignment, Assignment, String, String)> = self.consensus.with_state(|s| {
            let host = |h: tandem_core::HostId| s.host_name(h);
            s.migrations().map(|(n, from, to)| (n.to_string(), from, to, host(from.host), host(to.host))).collect()
        });
        let m = lock(&self.migrations);
        // A post-copy migration whose switchover committed is over for committed state, but not
        // for this host, which still sends the last pages: shown until it has.
        let serving: Vec<(String, Assignment, Assignment, String, String)> = m
            .outgoing
            .iter()
            .filter(|(n, o)| o.phase == MigrationPhase::ServingPages && !active.iter().any(|a| a.0 == **n))
            .map(|(n, o)| {
                let to = Assignment { host: o.to, generation: o.generation };
                (n.clone(), Assignment { host: self.me, generation: 0 }, to, self.cfg.name.clone(), self.host_name(o.to))
            })
            .collect();
        let active = active
            .into_iter()
            .chain(serving)
            .map(|(name, from, to, from_name, to_name)| {
                let mine = m.outgoing.get(&name).filter(|o| from.host == self.me && o.generation == to.generation);
                MigrationView {
                    progress: mine.and_then(|o| o.progress.clone()),
                    phase: mine.map(|o| o.phase.as_str().to_string()),
                    name,
                    from: from_name,
                    to: to_name,
                    generation: to.generation,
                }
            })
            .collect();
        crate::views::MigrationsView { host: self.cfg.name.clone(), active, recent: m.recent.iter().cloned().collect() }
    }
}
