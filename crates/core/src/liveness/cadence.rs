//! Which liveness ticks are full rounds (slot write, the agent's periodic loops).

use super::Liveness;
use crate::time::Millis;
use crate::timing::Timings;

/// While the cluster is calm, a full round (slot write, periodic loops) at most every this many
/// ticks (see [`Liveness::round_due`]).
pub const CALM_ROUND_TICKS: u64 = 2;

/// While the cluster is calm, full rounds are spaced by a fifth of the peer timeout when that is
/// longer than [`CALM_ROUND_TICKS`] ticks (600 ms with the default timings): every writer's
/// slot still advances this many times within a peer timeout, which is what
/// [`Liveness::disk_shared`] looks for.
pub const CALM_WRITES_PER_PEER_TIMEOUT: u64 = 5;

/// While the cluster is calm, each peer gets a copy of every this many heartbeats (see
/// [`Liveness::copies_paced`]). Two, so that between two copies to a peer at most one sequence
/// number is left out, which is what the wire's `paced` flag says.
pub const CALM_COPY_TICKS: u64 = 2;

/// How far apart full rounds are while the cluster is calm with timings `t`:
/// [`CALM_ROUND_TICKS`] ticks, or a fifth of the peer timeout in whole ticks where that is
/// longer. Never more than a fifth of the peer timeout (validation keeps it at ten intervals or
/// more), so every slot still advances [`CALM_WRITES_PER_PEER_TIMEOUT`] times within it.
#[must_use]
pub fn calm_round_spacing_ms(t: &Timings) -> u64 {
    let i = t.heartbeat_interval_ms.max(1);
    let fifth = t.peer_timeout_ms / CALM_WRITES_PER_PEER_TIMEOUT;
    (fifth / i * i).max(CALM_ROUND_TICKS * i)
}

impl Liveness {
    /// Whether the tick at `now` is a full round: this host writes its disk slot, and the
    /// agent's periodic loops (membership, coordinator, reconciler, migrations — they also run
    /// at once on every applied entry) make a pass. Network heartbeats go out and the disk is
    /// read at every tick regardless: a peer's slot change is stamped with the time of the read
    /// that saw it, so reading less often would make that evidence later, and fence deadlines
    /// with it. While the cluster is calm — every peer heard on the network within a third of
    /// the peer timeout, our lease not lapsed, no losing verdict — full rounds are spaced by
    /// [`Liveness::calm_round_spacing_ms`]: the network renews the lease and shows every peer alive,
    /// and the slot only has to keep advancing for the disk to count as shared. As soon as any
    /// peer goes quiet (long before it can be declared dead) every tick is a full round again,
    /// so a lease renewed by the disk alone and a partition's verdict are as fresh as before.
    /// Safety does not depend on the cadence: every use of a disk time is bounded by the time
    /// itself, never by a count of rounds.
    #[must_use]
    pub fn round_due(&self, now: Millis) -> bool {
        let i = self.timings.heartbeat_interval_ms;
        // Half an interval of slack: ticks are periodic, not exact.
        let spaced = self.round_begun_at.is_none_or(|t| now.since(t) + i / 2 >= self.calm_round_spacing_ms());
        spaced || !self.calm(now)
    }

    /// How far apart full rounds are while the cluster is calm: see [`calm_round_spacing_ms`].
    #[must_use]
    pub fn calm_round_spacing_ms(&self) -> u64 {
        calm_round_spacing_ms(&self.timings)
    }

    /// Whether this host's heartbeats go to its peers only every [`CALM_COPY_TICKS`]th tick
    /// (see [`Liveness::copy_for`]): while the cluster is
    /// calm and our lease is younger than half of `self_fence_ms`. Datagrams — one per peer per
    /// tick, in and out — were the largest share of an idle agent's cost at 64 hosts, and this
    /// halves them where nothing is at stake. Detection and fence deadlines are untouched: a peer that goes quiet
    /// ends the calm (a third of the peer timeout, long before it can be declared dead), every
    /// peer then hears us at every tick again, and a dead peer's deadline counts from the
    /// evidence its own heartbeats gave. The lease takes the acks as they come (the k-th latest
    /// acknowledged send time, [`Liveness::majority_acked_at`]), and if it ages past half of
    /// `self_fence_ms` the pacing stops, long before it could lapse.
    #[must_use]
    pub fn copies_paced(&self, now: Millis) -> bool {
        let half = self.timings.self_fence_ms / 2;
        self.calm(now) && self.last_proof_of_life(now).is_some_and(|l| now.since(l) < half)
    }

    /// Whether the agent may poll for datagrams and disk answers once per tick rather than twice:
    /// while the cluster is calm. Datagrams carry the kernel's arrival stamp and disk reads the
    /// time their I/O completed, so a sparser poll makes no evidence later; it only delays when
    /// a change is looked at, and a peer that goes quiet ends the calm (a third of the peer
    /// timeout) long before anything is decided on its silence.
    #[must_use]
    pub fn polls_sparse(&self, now: Millis) -> bool {
        self.calm(now)
    }

    /// Says whether this host's heartbeats and slot now announce its own fence. A fence is the
    /// one word a peer acts on at once (it moves our VMs without waiting out a deadline), and a
    /// host that stops announces it only for a short while before it goes quiet: while it is
    /// announced nothing is paced — every tick writes the slot and sends every peer a copy —
    /// so the word reaches the slot, which outlives the host, within one tick.
    pub fn set_announcing_fence(&mut self, on: bool) {
        self.announcing_fence = on;
    }

    /// Records that a full round began at `now`.
    pub fn round_begun(&mut self, now: Millis) {
        self.round_begun_at = Some(now);
    }

    /// Every peer heard on the network within a third of the peer timeout and, by its ack,
    /// hearing us as recently; the lease not lapsed, no losing verdict (see
    /// [`Liveness::round_due`]). The second half matters to the pacing: a peer that stops
    /// hearing us (a lossy link one way) must get every heartbeat again, not every second one,
    /// and its acks are how we learn it.
    pub(super) fn calm(&self, now: Millis) -> bool {
        let recent = |t: Option<Millis>| t.is_some_and(|t| now.since(t) < self.timings.peer_timeout_ms / 3);
        !self.announcing_fence
            && self.lapsed.is_none()
            && self.losing_since.is_none()
            && self.peers.values().all(|p| recent(p.last_net) && recent(p.acked_my_seq.and_then(|s| self.sent_at(s))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{HostLiveness, Liveness};
    use crate::hostset::{HostId, HostSet};
    use crate::time::Millis;
    use crate::timing::DEFAULT_TIMINGS as T;
    use crate::wire::Heartbeat;

    /// A mesh of `n` hosts exchanging heartbeats every interval on a network without delay,
    /// the copies chosen by `copy_for`. `delivered(from, to)` says whether a copy arrives.
    struct Mesh {
        hosts: Vec<Liveness>,
        seq: u64,
    }

    impl Mesh {
        fn new(n: u32) -> Mesh {
            let members: HostSet = (0..n).map(HostId).collect();
            let hosts = (0..n)
                .map(|h| {
                    let mut l = Liveness::new(HostId(h), 1, T, Millis(0));
                    l.set_members(members);
                    l
                })
                .collect();
            Mesh { hosts, seq: 0 }
        }

        /// One tick at `now`: the copies each live host sent (`None` for a silent one).
        fn tick(&mut self, now: Millis, live: impl Fn(u32) -> bool, delivered: &mut impl FnMut(u32, u32) -> bool) -> Vec<Option<Vec<u32>>> {
            self.seq += 1;
            let mut sent = Vec::new();
            let mut inbox = Vec::new();
            for l in &mut self.hosts {
                let me = l.me;
                if !live(me.0) {
                    sent.push(None);
                    continue;
                }
                l.heartbeat_sent(self.seq, now);
                let common = Heartbeat {
                    from: me,
                    incarnation: 1,
                    seq: self.seq,
                    epoch: 1,
                    heard: l.heard(now),
                    fenced: false,
                    to: me,
                    ack: None,
                    ages: l.ages(now),
                    paced: false,
                };
                let paced = l.copies_paced(now);
                let peers: Vec<HostId> = l.peers.keys().copied().collect();
                let copies: Vec<Heartbeat> = peers.into_iter().filter_map(|p| l.copy_for(&common, p, paced)).collect();
                sent.push(Some(copies.iter().map(|c| c.to.0).collect()));
                inbox.extend(copies.into_iter().filter(|c| delivered(me.0, c.to.0)));
            }
            for copy in inbox {
                if let Some(l) = self.hosts.get_mut(copy.to.0 as usize) {
                    l.heartbeat_received(&copy, now).expect("a fresh copy is taken");
                }
            }
            sent
        }
    }

    /// A calm cluster sends every peer the same heartbeats, every second one — a host's copies
    /// go to all its peers at a tick or to none, so its peers last heard it alike — and counts
    /// no loss for the heartbeats a peer was not meant to get; every lease stays valid.
    #[test]
    fn a_calm_cluster_sends_each_peer_every_second_heartbeat() {
        let mut mesh = Mesh::new(5);
        let mut counts = Vec::new();
        for tick in 0..100u64 {
            let now = Millis(tick * T.heartbeat_interval_ms);
            let sent = mesh.tick(now, |_| true, &mut |_, _| true);
            counts.push(sent.iter().flatten().map(Vec::len).sum::<usize>());
            if tick >= 20 {
                assert!(sent.iter().flatten().all(|s| s.is_empty() || s.len() == 4), "tick {tick}: some peers only: {sent:?}");
            }
            assert!(mesh.hosts.iter().all(|l| l.lease_valid(now)), "a lease lapsed at tick {tick}");
        }
        // The first ticks go to everyone (nobody is heard yet); then half of the copies.
        assert_eq!(counts[0], 20);
        assert_eq!(counts[20..].iter().sum::<usize>(), 80 * 10, "{counts:?}");
        for l in &mut mesh.hosts {
            assert!(l.heartbeat_counts().iter().all(|c| c.missed == 0 && c.received >= 45), "{:?}", l.heartbeat_counts());
            assert!(l.assess(Millis(100 * T.heartbeat_interval_ms)).fence.is_none());
        }
    }

    /// A peer that goes quiet ends the pacing: within a third of the peer timeout (and a tick)
    /// every host sends every peer every heartbeat, long before the quiet one is declared dead.
    #[test]
    fn a_quiet_peer_ends_the_pacing_long_before_it_is_declared_dead() {
        let mut mesh = Mesh::new(5);
        let i = T.heartbeat_interval_ms;
        let silent_from = 30u64;
        let mut everyone_from = None;
        for tick in 0..60u64 {
            let now = Millis(tick * i);
            let sent = mesh.tick(now, |h| h != 4 || tick < silent_from, &mut |_, _| true);
            let all = sent.iter().take(4).all(|s| s.as_ref().is_some_and(|s| s.len() == 4));
            if tick > silent_from && all && everyone_from.is_none() {
                everyone_from = Some(tick);
            }
            if everyone_from.is_some() {
                assert!(all, "pacing came back at tick {tick} while host 4 is quiet");
            }
        }
        let from = everyone_from.expect("the pacing ended");
        assert!((from - silent_from) * i <= T.peer_timeout_ms / 3 + i, "every copy again only at tick {from}");
        let a = mesh.hosts[0].assess(Millis(60 * i));
        assert!(a.peers.iter().any(|p| p.host == HostId(4) && p.liveness != HostLiveness::Alive));
    }

    /// A peer that stops hearing us (the link lossy one way only) gets every heartbeat again:
    /// its acks stop advancing, and that ends our pacing as a quiet peer would.
    #[test]
    fn a_peer_that_stops_hearing_us_gets_every_heartbeat_again() {
        let mut mesh = Mesh::new(3);
        let i = T.heartbeat_interval_ms;
        let mut to_1 = Vec::new();
        for tick in 0..40u64 {
            let now = Millis(tick * i);
            // From tick 20, host 0's copies to host 1 are lost; host 1 still reaches host 0.
            let sent = mesh.tick(now, |_| true, &mut |from, to| tick < 20 || (from, to) != (0, 1));
            to_1.push(sent[0].as_ref().is_some_and(|s| s.contains(&1)));
        }
        assert!(to_1[10..20].iter().filter(|c| **c).count() <= 6, "host 0 was not pacing: {to_1:?}");
        let recent = usize::try_from(T.peer_timeout_ms / 3 / i).expect("small") + 1;
        assert!(to_1[20 + recent..].iter().all(|c| *c), "host 0 still paces its copies to host 1: {to_1:?}");
    }

    /// One copy in three lost at random: the pacing comes and goes, but no host fences or
    /// lets its lease lapse, and every host stays alive to every other.
    #[test]
    fn one_copy_in_three_lost_with_pacing_fences_nobody() {
        let mut mesh = Mesh::new(5);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut lost = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.is_multiple_of(3)
        };
        let mut paced_ticks = 0;
        for tick in 0..3000u64 {
            let now = Millis(tick * T.heartbeat_interval_ms);
            let sent = mesh.tick(now, |_| true, &mut |_, _| !lost());
            paced_ticks += usize::from(sent.iter().flatten().any(|s| s.len() < 4));
            for l in &mut mesh.hosts {
                assert!(l.lease_valid(now), "host {} lost its lease at tick {tick}", l.me);
                let a = l.assess(now);
                assert!(a.fence.is_none(), "host {} fenced at tick {tick}", l.me);
                if tick > 30 {
                    assert!(a.peers.iter().all(|p| p.liveness == HostLiveness::Alive), "a peer not alive to {} at tick {tick}", l.me);
                }
            }
        }
        assert!(paced_ticks > 0, "the pacing never started");
    }

    /// A host that announces its fence paces nothing: from the next tick every tick is a full
    /// round (its slot carries the fence at once) and every peer gets every heartbeat, and once
    /// every peer acknowledged a heartbeat sent since, the announcement is known to be heard.
    #[test]
    fn a_host_announcing_its_fence_paces_nothing_and_learns_when_it_was_heard() {
        let mut mesh = Mesh::new(4);
        let i = T.heartbeat_interval_ms;
        let mut tick = 0u64;
        while tick < 30 {
            mesh.tick(Millis(tick * i), |_| true, &mut |_, _| true);
            tick += 1;
        }
        let now = Millis(tick * i);
        assert!(mesh.hosts[0].copies_paced(now), "the cluster is calm before the fence");
        mesh.hosts[0].round_begun(now);
        assert!(!mesh.hosts[0].round_due(now.plus(i)), "a calm host spaces its full rounds");
        mesh.hosts[0].set_announcing_fence(true);
        let first = mesh.seq + 1;
        assert!(!mesh.hosts[0].acknowledged_since(first, now), "nothing was sent since");
        for _ in 0..4 {
            let now = Millis(tick * i);
            assert!(mesh.hosts[0].round_due(now), "tick {tick}: the announcing host skipped a full round");
            assert!(!mesh.hosts[0].copies_paced(now), "tick {tick}: the announcing host paces its copies");
            let sent = mesh.tick(now, |_| true, &mut |_, _| true);
            assert_eq!(sent[0].as_ref().map(Vec::len), Some(3), "tick {tick}: not every peer got the announcement");
            mesh.hosts[0].round_begun(now);
            tick += 1;
        }
        assert!(mesh.hosts[0].acknowledged_since(first, Millis(tick * i)), "every peer acknowledged the announcement");
        // A peer that went silent long ago is not waited for.
        let mut cut = Mesh::new(3);
        for t in 0..40u64 {
            cut.tick(Millis(t * i), |h| h != 2 || t < 5, &mut |_, _| true);
        }
        // (A heartbeat's ack comes back with the peer's next one: the last acknowledged is the one before.)
        assert!(cut.hosts[0].acknowledged_since(cut.seq - 1, Millis(40 * i)), "a silent peer held the announcement up");
        assert!(!cut.hosts[0].acknowledged_since(cut.seq + 1, Millis(40 * i)), "a heartbeat not sent yet counts as acknowledged");
    }
}
