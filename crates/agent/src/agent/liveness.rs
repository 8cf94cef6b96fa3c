//! The liveness loop: heartbeats out and in, the slot write and read, the liveness assessment
//! and the fence decision. It runs on a thread and runtime of its own (in production), so nothing
//! else the agent does can make it wait for a worker.

use super::{lock, Agent, AgentError};
use crate::io::{MAX_DATAGRAMS_PER_POLL, RECEIVE_POLL_DIVISOR};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tandem_core::liveness::{Assessment, FenceReason, HostLiveness};
use tandem_core::wire::{DiskSlot, Heartbeat, HeartbeatFormat, MAX_HEARTBEAT_LEN};
use tandem_core::{HostId, HostSet, Millis};
use tracing::Instrument;

/// What the liveness loop keeps between ticks.
#[derive(Default)]
pub(super) struct LivenessLoop {
    seq: u64,
    disk_counter: u64,
    disk_busy: bool,
    /// The latest assessment (the coordinator and the API read it).
    pub(super) assessment: Option<Assessment>,
    /// Each peer's liveness at the previous tick, to record transitions.
    previous: BTreeMap<HostId, HostLiveness>,
    /// The heartbeat view of committed state, and the applied index it was taken at.
    view: Option<(u64, Arc<HeartbeatView>)>,
    /// While this host announces its fence: the first heartbeat that said so, and whether a
    /// slot write saying so has landed (see [`Agent::fence_announced`]).
    fence_first_seq: Option<u64>,
    fence_slot_written: bool,
    /// The path the heartbeat disk was last reached through (several with
    /// `heartbeat_disk_paths`): a change is recorded in the timeline.
    disk_path: Option<std::path::PathBuf>,
}

/// What the liveness tick needs of committed state.
struct HeartbeatView {
    members: HostSet,
    /// The preferred site's hosts.
    preferred: HostSet,
    epoch: u64,
    peers: Vec<(HostId, SocketAddr)>,
}

impl Agent {
    /// Heartbeats in and out, the slot I/O and the liveness decision run on a thread and runtime
    /// of their own: nothing else the agent does (applying the log, FTT searches, the API, the
    /// launcher) can make them wait for a worker, so a busy host never fences itself.
    ///
    /// The thread sleeps on the system clock between polls and runs its runtime only for a
    /// poll: one wake-up per poll and none besides. (Sleeping in the runtime instead cost two
    /// or three: its timer wheel wakes at a slot boundary before the deadline, and the answer of
    /// each disk round woke it again.) The disk round's answer is taken at the next poll, and
    /// counts as of when its I/O completed (`Agent::completed_at`).
    pub(super) fn spawn_liveness_thread(self: &Arc<Self>) -> Result<(), AgentError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AgentError::LivenessThread)?;
        let a = Arc::clone(self);
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("tandem-liveness".into())
            .spawn(move || {
                let _entered = span.enter();
                let mut buf = vec![0u8; MAX_HEARTBEAT_LEN + 1];
                let mut next_tick = a.clock.now();
                let mut next_poll = std::time::Instant::now();
                while !a.stopping.load(Ordering::SeqCst) {
                    rt.block_on(async {
                        // The disk round whose answer came since the last poll takes it first,
                        // so this poll's tick assesses with it.
                        tokio::task::yield_now().await;
                        a.poll_once(&mut buf, &mut next_tick).await;
                        // Lets the runtime run what the poll woke (the disk round it spawned,
                        // or the one whose answer came) before the thread sleeps.
                        tokio::task::yield_now().await;
                    });
                    let poll = a.poll_period();
                    next_poll += poll;
                    let now = std::time::Instant::now();
                    if next_poll <= now {
                        // Held up past a poll: the next one is a full period from now.
                        next_poll = now + poll;
                    }
                    std::thread::sleep(next_poll - now);
                }
            })
            .map_err(AgentError::LivenessThread)?;
        Ok(())
    }

    /// The liveness loop on the caller's runtime (the simulator's): polls as the thread does.
    pub(super) async fn liveness_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_HEARTBEAT_LEN + 1];
        let mut next_tick = self.clock.now();
        let mut next_poll = tokio::time::Instant::now();
        while !self.stopping.load(Ordering::SeqCst) {
            tokio::time::sleep_until(next_poll).await;
            self.poll_once(&mut buf, &mut next_tick).await;
            next_poll += self.poll_period();
            let now = tokio::time::Instant::now();
            if next_poll <= now {
                next_poll = now + self.poll_period();
            }
        }
    }

    /// How long until the next poll: [`RECEIVE_POLL_DIVISOR`] polls per interval, or one while
    /// the cluster is calm (`Liveness::polls_sparse`: evidence carries its own stamps).
    fn poll_period(&self) -> std::time::Duration {
        if lock(&self.liveness).polls_sparse(self.clock.now()) {
            self.interval()
        } else {
            self.interval() / RECEIVE_POLL_DIVISOR
        }
    }

    /// One poll: takes the queued datagrams, and ticks when the tick is due. Ticks are counted
    /// on the agent's clock, not in polls: a poll skipped while the thread was held up does not
    /// delay the tick after it.
    async fn poll_once(self: &Arc<Self>, buf: &mut [u8], next_tick: &mut Millis) {
        self.receive_queued(buf);
        let now = self.clock.now();
        let t = &self.cfg.timings;
        // Near a dead peer's fence deadline every poll ticks (see `fence_deadline_near`).
        let deadline_near =
            lock(&self.beat).assessment.as_ref().is_some_and(|a| a.fence_deadline_near(now, t.fence_wait_ms(), t.heartbeat_interval_ms, t.peer_timeout_ms));
        if now >= *next_tick || deadline_near {
            *next_tick = Millis(now.0 + self.cfg.timings.heartbeat_interval_ms - self.interval_slack());
            self.liveness_tick().await;
        }
    }

    /// A tick counts as due up to half a poll early: the polls that carry it are periodic too,
    /// and a tick a hair short of the interval would otherwise wait for the next poll.
    fn interval_slack(&self) -> u64 {
        self.cfg.timings.heartbeat_interval_ms / u64::from(RECEIVE_POLL_DIVISOR) / 2
    }

    /// Takes every datagram queued on the heartbeat socket (at most a bounded number).
    fn receive_queued(&self, buf: &mut [u8]) {
        if let Err(e) = self.heartbeats.drain(buf, MAX_DATAGRAMS_PER_POLL, &mut |bytes, waited| self.accept_datagram(bytes, waited)) {
            tracing::debug!("heartbeat socket: {e}");
        }
    }

    /// Verifies one datagram and hands it to the liveness state, stamped with its arrival when
    /// the transport says how long it `waited` (less that wait, rounded down to the millisecond,
    /// and less one millisecond of tolerance: see `ARRIVAL_STEP_TOLERANCE`), else now, when it
    /// is processed (up to a poll period after it arrived). Either stamp is no earlier than the
    /// sender sent it: it only makes the evidence this host vouches for later — fence deadlines
    /// move later and its own lease ends sooner, never the unsafe way.
    fn accept_datagram(&self, bytes: &[u8], waited: Option<std::time::Duration>) {
        let now = self.clock.now();
        let now = waited.map_or(now, |w| Millis(now.0.saturating_sub((w.as_millis() as u64).saturating_sub(1))));
        match Heartbeat::decode(bytes, &self.key, self.me) {
            Ok((hb, format)) => {
                if let Err(e) = lock(&self.liveness).heartbeat_received_as(&hb, format, now) {
                    tracing::debug!("{e}");
                }
            }
            Err(e) => {
                lock(&self.liveness).heartbeat_forged();
                tracing::warn!("rejected datagram: {e}");
            }
        }
    }

    pub(super) async fn liveness_tick(self: &Arc<Self>) {
        let now = self.clock.now();
        self.last_tick.store(now.0.max(1), Ordering::SeqCst);
        if let Some(why) = self.consensus.fatal() {
            // Heartbeating on frozen state would keep this host looking healthy while it can
            // no longer see failovers, rejoins or stops: fence, say why, and stop.
            if !self.is_fenced() {
                self.fence(FenceReason::ConsensusStopped, now);
            }
            if !self.stopping.swap(true, Ordering::SeqCst) {
                tracing::error!("consensus stopped: {why}; every VM killed, the agent stops");
                self.events.record(
                    crate::events::EventKind::ConsensusStopped,
                    None,
                    Some(&self.cfg.name),
                    format!("consensus stopped: {why}; fenced, the agent stops"),
                );
            }
            return;
        }
        let view = self.heartbeat_view();
        let (members, epoch, peers) = (view.members, view.epoch, &view.peers);
        self.confirm_fence(now);
        let (epoch, fenced) = self.status().announcement(epoch, self.promised_through());
        let (hb, copies, broadcast, assessment, full_round) = {
            let mut l = lock(&self.liveness);
            l.set_members_at(members, now);
            l.set_preferred(view.preferred);
            l.set_announcing_fence(fenced);
            let seq = {
                let mut s = lock(&self.beat);
                s.seq += 1;
                let seq = s.seq;
                if fenced {
                    s.fence_first_seq.get_or_insert(seq);
                } else {
                    s.fence_first_seq = None;
                    s.fence_slot_written = false;
                }
                seq
            };
            l.heartbeat_sent(seq, now);
            let hb = Heartbeat {
                from: self.me,
                incarnation: self.incarnation,
                seq,
                epoch,
                heard: l.heard(now),
                fenced,
                to: self.me,
                ack: None,
                ages: l.ages(now),
                paced: false,
            };
            // Each peer's copy, in the format it speaks (paced while the cluster is calm); one
            // broadcast datagram serves every peer of the previous release.
            let paced = l.copies_paced(now);
            let copies: Vec<(SocketAddr, Option<Heartbeat>)> = peers
                .iter()
                .filter_map(|(h, addr)| match l.format_of(*h) {
                    HeartbeatFormat::Addressed => l.copy_for(&hb, *h, paced).map(|c| (*addr, Some(c))),
                    HeartbeatFormat::Broadcast => Some((*addr, None)),
                })
                .collect();
            let broadcast = copies.iter().any(|(_, c)| c.is_none()).then(|| hb.encode_broadcast(&l.broadcast_acks(now), &self.key));
            let assessment = l.assess(now);
            self.lease_until.store(l.lease_until(now).map_or(0, |u| u.0.max(1)), Ordering::SeqCst);
            let full_round = l.round_due(now);
            if full_round {
                l.round_begun(now);
            }
            (hb, copies, broadcast, assessment, full_round)
        };
        // Every copy encoded first, one after another in one buffer, then handed to the kernel
        // in one call.
        let mut scratch = Vec::with_capacity(tandem_core::wire::addressed_len(tandem_core::MAX_HOSTS));
        let mut encoded = Vec::with_capacity(copies.len() * scratch.capacity());
        let mut ends = Vec::with_capacity(copies.len());
        for (_, copy) in &copies {
            if let Some(copy) = copy {
                copy.encode_into(&self.key, &mut scratch);
                encoded.extend_from_slice(&scratch);
            }
            ends.push(encoded.len());
        }
        let mut start = 0;
        let mut batch: Vec<(SocketAddr, &[u8])> = Vec::with_capacity(copies.len());
        for ((addr, copy), end) in copies.iter().zip(ends) {
            match (copy, &broadcast) {
                (Some(_), _) => batch.push((*addr, &encoded[start..end])),
                (None, Some(b)) => batch.push((*addr, b.as_slice())),
                (None, None) => {}
            }
            start = end;
        }
        self.heartbeats.send_batch(&batch).await;
        // The slot is written in full rounds only; every tick reads the disk, so a peer's slot
        // change is stamped no later than before (a read's time is the evidence it gives).
        self.disk_round(full_round.then_some((hb.heard, epoch, fenced)));
        self.note_transitions(&assessment);
        // A host that may be failed over now: the coordinator (if this is the leader) acts at
        // once rather than at its next tick.
        let due = assessment.peers.iter().any(|p| p.fenced_epoch.is_some() || (p.liveness == HostLiveness::Dead && p.fence_deadline.is_some_and(|d| d <= now)));
        if let Some(reason) = assessment.fence {
            if !self.is_fenced() {
                self.fence(reason, now);
            }
        }
        // A host with a reason to fence (cut off, on a losing side) takes no part in consensus
        // until it is connected again: it stands for no election and sends nothing. Where a cut
        // is one-way, its vote requests and the appends it retried as a stale leader still
        // reached the side that stays, which then gave up or never elected its own leader
        // (simulator, two hosts with a disk witness, one-way cuts). Once connected it takes
        // part again, so a cluster whose hosts all fenced elects again.
        self.consensus.set_muted(assessment.fence.is_some());
        lock(&self.beat).assessment = Some(assessment);
        if full_round || due {
            self.ticks.send_modify(|t| *t = t.wrapping_add(1));
        }
        if due {
            self.coordinator_wake.notify_one();
        }
    }

    /// Whether this host's fence has been announced where every peer will find it: a slot write
    /// saying so has landed (the slot outlives this host's heartbeats, and no older word can
    /// follow it there), and every peer that still hears us acknowledged a heartbeat saying so.
    pub(super) fn fence_announced(&self) -> bool {
        let first = {
            let b = lock(&self.beat);
            if !b.fence_slot_written {
                return false;
            }
            b.fence_first_seq
        };
        first.is_some_and(|seq| lock(&self.liveness).acknowledged_since(seq, self.clock.now()))
    }

    /// The members, this host's epoch and every peer's heartbeat address, as committed state
    /// has them: worked out again only after an entry was applied (parsing every peer's address
    /// at every tick showed in the profile of an idle agent of 64). The applied index is read
    /// before the state, so a view is never filed under a later index than its own.
    fn heartbeat_view(&self) -> Arc<HeartbeatView> {
        let applied = *self.consensus.applied().borrow();
        if let Some(view) = lock(&self.beat).view.as_ref().filter(|(at, _)| *at == applied) {
            return Arc::clone(&view.1);
        }
        let view = Arc::new(self.consensus.with_state(|s| HeartbeatView {
            members: s.members(),
            preferred: s.preferred_hosts(),
            epoch: s.hosts.get(&self.me).map_or(0, |h| h.epoch),
            peers: s.hosts.values().filter(|h| h.id != self.me).filter_map(|h| Some((h.id, h.heartbeat_addr.parse().ok()?))).collect(),
        }));
        lock(&self.beat).view = Some((applied, Arc::clone(&view)));
        view
    }

    /// Writes our slot (when `write` carries what it says) then reads every slot, unless the
    /// previous round still hangs.
    pub(super) fn disk_round(self: &Arc<Self>, write: Option<(HostSet, u64, bool)>) {
        let counter = {
            let mut s = lock(&self.beat);
            if s.disk_busy {
                drop(s);
                if write.is_some() {
                    lock(&self.liveness).disk_write_failed();
                } else {
                    lock(&self.liveness).disk_read_failed();
                }
                return;
            }
            s.disk_busy = true;
            // Counted per write: peers count the values they never read as missed.
            if write.is_some() {
                s.disk_counter += 1;
            }
            s.disk_counter
        };
        let a = Arc::clone(self);
        tokio::spawn(
            async move {
                let started = a.clock.now();
                let (read, done) = match write {
                    Some((heard, epoch, fenced)) => {
                        let slot = DiskSlot { host: a.me, incarnation: a.incarnation, counter, epoch, heard, fenced, written_at_ms: a.clock.now().0 };
                        // One request writes, then reads: the write counts as finished when the
                        // read did (later than the truth, so a slow read can only make it count
                        // as late), and the read as begun before the write (earlier, so evidence
                        // settles later).
                        let (written, read, done) = a.disk.round(&slot).await;
                        if fenced && written.is_ok() {
                            lock(&a.beat).fence_slot_written = true;
                        }
                        a.slot_written(written, started, a.completed_at(done, started));
                        (read, done)
                    }
                    None => a.disk.read_all_stamped().await,
                };
                let finished = a.completed_at(done, started);
                a.note_disk_path();
                match read {
                    Ok(slots) => lock(&a.liveness).disk_read_between(&slots, started, finished),
                    Err(e) => {
                        tracing::debug!("slot read failed: {e}");
                        lock(&a.liveness).disk_read_failed();
                    }
                }
                lock(&a.beat).disk_busy = false;
            }
            .in_current_span(),
        );
    }

    /// Records in the timeline a change of the path the heartbeat disk is reached through: the
    /// path in use failed and the next took over.
    fn note_disk_path(&self) {
        let Some(now) = self.disk.path_in_use() else { return };
        let was = lock(&self.beat).disk_path.replace(now.clone());
        if let Some(was) = was.filter(|w| *w != now) {
            let detail = format!("heartbeat disk path {} failed; now reached through {}", was.display(), now.display());
            self.events.record(crate::events::EventKind::DiskPathChanged, None, Some(&self.cfg.name), detail);
        }
    }

    /// When a disk request that began at `started` completed, on the agent's clock: when the
    /// device's I/O thread had the answer (`done`), if it stamped it, else now. The answer
    /// reaches the liveness runtime only at its next poll, and the slot changes a read saw are
    /// evidence as of its end: stamped with the poll they would be up to a poll period later.
    /// `done` is on the monotonic clock and the agent's on boot time, which can only have run
    /// further since (a suspend): the stamp is never earlier than the truth, and, as for a
    /// datagram's arrival, it is rounded one millisecond later and never before `started`.
    fn completed_at(&self, done: Option<std::time::Instant>, started: Millis) -> Millis {
        let now = self.clock.now();
        let Some(done) = done else { return now };
        let ago = u64::try_from(done.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_sub(1);
        Millis(now.0.saturating_sub(ago)).max(started)
    }

    /// Takes the outcome of a slot write that began at `started` and ended at `finished`.
    fn slot_written(&self, written: Result<(), crate::disk::DiskError>, started: Millis, finished: Millis) {
        match written {
            Ok(()) => {
                self.metrics.disk_write_seconds.observe(finished.since(started) as f64 / 1000.0);
                lock(&self.liveness).disk_written(started, finished);
            }
            Err(e) => {
                tracing::debug!("slot write failed: {e}");
                self.metrics.disk_write_failures.fetch_add(1, Ordering::Relaxed);
                lock(&self.liveness).disk_write_failed();
            }
        }
    }

    pub(super) fn host_name(&self, h: HostId) -> String {
        self.consensus.with_state(|s| s.host_name(h))
    }

    pub(super) fn note_transitions(&self, a: &Assessment) {
        let changes: Vec<(HostId, HostLiveness, Option<HostLiveness>)> = {
            let mut s = lock(&self.beat);
            let mut out = Vec::new();
            for p in &a.peers {
                let before = s.previous.insert(p.host, p.liveness);
                if before != Some(p.liveness) {
                    out.push((p.host, p.liveness, before));
                }
            }
            out
        };
        for (host, now_is, before) in changes {
            let Some(before) = before else { continue };
            let p = a.peer(host);
            let age = |v: Option<u64>| v.map_or_else(|| "never".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
            let detail = format!(
                "{} is {:?} (was {:?}): network heartbeat {} ago, disk heartbeat {} ago{}",
                self.host_name(host),
                now_is,
                before,
                age(p.and_then(|p| p.net_age_ms)),
                age(p.and_then(|p| p.disk_age_ms)),
                p.and_then(|p| p.fence_deadline).map(|d| format!("; fence deadline in {:.1} s", d.since(a.now) as f64 / 1000.0)).unwrap_or_default()
            );
            let kind = match now_is {
                HostLiveness::Alive => crate::events::EventKind::PeerAlive,
                HostLiveness::Partitioned => crate::events::EventKind::PeerPartitioned,
                HostLiveness::Dead => crate::events::EventKind::PeerDead,
                HostLiveness::Unknown => crate::events::EventKind::PeerUnknown,
            };
            self.events.record(kind, None, Some(&self.host_name(host)), detail);
        }
    }
}
