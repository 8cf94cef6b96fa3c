//! When the agent has this host stand for election, sans I/O. openraft elects by itself; the
//! agent steps in for three cases its timer handles badly:
//!
//! - **A fenced leader.** A fenced host stops its Raft heartbeats, but one whose answers are
//!   lost (a one-way cut) still reaches its followers with the appends it retries, so they
//!   would follow it while it can commit nothing (simulator, two hosts with a disk witness,
//!   one-way cut of the lower id). A follower that is not fenced stands against it.
//! - **A long time without a leader.** A node that once saw a greater log than its own waits
//!   twice the longest election timeout more before each election of its timer, and forgets
//!   that only in an election its own timer starts — not in one the agent starts. A node that
//!   was behind long ago then holds back long after its log became the most up to date, while
//!   the nodes behind now are refused (simulator, `--only partition-full`, seed 132: the leader
//!   cut off, its successor elected only after the heal).
//! - **Shorter logs raising terms.** A host that cannot win (its log is shorter) still raises
//!   its term at each refused election of its timer, and turns away the up-to-date host's next
//!   request at that term; while no leader is known it keeps its timer quiet (`defer`).
//!
//! Standing is always safe in Raft (a vote goes only to a log at least as up to date as the
//! voter's); what this decides is that somebody able to win does, and soon.

use crate::hostset::HostId;
use crate::liveness::Assessment;
use crate::time::Millis;
use crate::witness::LogPosition;

/// What one pass of the agent's membership loop sees.
#[derive(Clone, Copy, Debug)]
pub struct StandView<'a> {
    pub me: HostId,
    /// The leader this host follows, if it knows one.
    pub leader: Option<HostId>,
    /// The term this host's vote is in (the leader's, while it follows one).
    pub term: u64,
    /// Where this host's log ends.
    pub last_log: Option<LogPosition>,
    /// Where other hosts' logs ended when they last took part in an election with this one
    /// (a vote request of theirs, or their answer to this host's).
    pub peer_logs: &'a [PeerLog],
    pub own_fenced: bool,
    pub assessment: &'a Assessment,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

/// Where one host's log ended in an election it took part in with this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLog {
    pub host: HostId,
    pub last_log: LogPosition,
    /// Raised at every exchange this host noted (with any host): which records are newer than
    /// the start of a time without a leader.
    pub exchange: u64,
}

/// Why this host stands now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stand {
    /// The leader it follows reports itself fenced.
    AgainstFencedLeader(HostId),
    /// No leader known for too long.
    Leaderless,
}

/// What the agent does after one pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ElectionStep {
    /// Stand for election now.
    pub stand: Option<Stand>,
    /// Keep openraft's timer from starting elections on this host: no leader is known, and a
    /// host it hears has shown a longer log. Each election of a host with the shorter log
    /// raises its term and then is refused, and the up-to-date host — which learns the raised
    /// term only from answers to its own requests — stands at that same term and is refused
    /// too (simulator, `--only partition-full`, seed 13: three such ties in a row). Only for a
    /// bounded time ([`DEFER_AT_MOST_TIMEOUTS`] longest election timeouts from when it began),
    /// in case what it was shown is stale (a log truncated since).
    pub defer: bool,
}

/// How long, in longest election timeouts, a host's timer defers to a longer log at most.
pub const DEFER_AT_MOST_TIMEOUTS: u64 = 8;

/// What the agent remembers between passes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ElectionWatch {
    /// The leader this host follows, and since when (as seen by this watch).
    following: Option<(HostId, Millis)>,
    /// Since when this host has known no leader.
    leaderless_since: Option<Millis>,
    /// The last exchange noted before that time: only the logs shown after it count (a log
    /// shown long ago may have been cut back since, and its host may no longer be able to stand
    /// — one that must fence sends nothing).
    exchanges_before: u64,
    /// When this host last stood because of this watch.
    stood: Option<Millis>,
    /// Since when its timer has deferred to a longer log (while no leader is known).
    deferring_since: Option<Millis>,
}

impl ElectionWatch {
    /// Whether this host stands for election now (and why), and whether its timer defers.
    pub fn step(&mut self, v: &StandView<'_>) -> ElectionStep {
        let stand = self.stand(v);
        let now = v.assessment.now;
        if v.leader.is_some() || !longer_log_heard(v, self.exchanges_before) {
            self.deferring_since = None;
            return ElectionStep { stand, defer: false };
        }
        let since = *self.deferring_since.get_or_insert(now);
        ElectionStep { stand, defer: now.0 < since.0.saturating_add(DEFER_AT_MOST_TIMEOUTS * v.election_timeout_max_ms) }
    }

    fn stand(&mut self, v: &StandView<'_>) -> Option<Stand> {
        let now = v.assessment.now;
        let able = !v.own_fenced && v.assessment.fence.is_none() && v.assessment.has_majority;
        match v.leader {
            Some(leader) => {
                self.leaderless_since = None;
                let since = match self.following {
                    Some((l, since)) if l == leader => since,
                    _ => {
                        self.following = Some((leader, now));
                        now
                    }
                };
                (able && self.depose(v, leader, since)).then(|| {
                    self.stood = Some(now);
                    Stand::AgainstFencedLeader(leader)
                })
            }
            None => {
                self.following = None;
                if self.leaderless_since.is_none() {
                    self.exchanges_before = v.peer_logs.iter().map(|p| p.exchange).max().unwrap_or(0);
                }
                let since = *self.leaderless_since.get_or_insert(now);
                (able && self.leaderless_turn(v, since)).then(|| {
                    self.stood = Some(now);
                    Stand::Leaderless
                })
            }
        }
    }

    /// Against a leader that reports itself fenced — but only once this host holds an entry of
    /// the leader's term (the first one a new leader appends: before, its own log may be the
    /// shorter and its election could not win), and has followed it for an election timeout. A
    /// fenced host that leads and can commit rejoins at once, and may be the only one with the
    /// longest log: deposing it the moment it is elected left the cluster leaderless round after
    /// round (simulator, `--only partition-full`, seed 90). The one-way cut's leader has led
    /// for long when it fences, so that wait costs it nothing.
    fn depose(&self, v: &StandView<'_>, leader: HostId, since: Millis) -> bool {
        if leader == v.me || v.assessment.peer(leader).is_none_or(|p| p.fenced_epoch.is_none()) {
            return false;
        }
        let holds_its_entries = v.last_log.is_some_and(|p| p.term == v.term && p.leader == u64::from(leader.0));
        holds_its_entries && v.assessment.now.0 >= since.0.saturating_add(v.election_timeout_min_ms)
    }

    /// After twice the longest election timeout without a leader (openraft's own timer has had
    /// its turn by then unless it holds back), a host to which no host it hears has shown a
    /// longer log stands; then again after each longest election timeout while no leader
    /// comes (its term rises past the other candidates' each time, and a voter with a log no
    /// longer than its own then grants it). Hosts that may hold an equal log stand in turn,
    /// lowest id first, an election timeout apart, so that two of them do not split the votes.
    /// A host with a reason to fence, or that no majority hears, never stands (it could not
    /// win, and its higher term would only delay the others); nor one with a shorter log (its
    /// terms would only turn away the up-to-date host's requests).
    fn leaderless_turn(&self, v: &StandView<'_>, since: Millis) -> bool {
        if longer_log_heard(v, self.exchanges_before) {
            return false;
        }
        let ahead = candidates(v).filter(|h| *h < v.me).count() as u64;
        let wait = match self.stood.filter(|s| *s >= since) {
            None => since.0.saturating_add(2 * v.election_timeout_max_ms),
            Some(stood) => stood.0.saturating_add(v.election_timeout_max_ms),
        };
        v.assessment.now.0 >= wait.saturating_add(ahead * v.election_timeout_min_ms)
    }
}

/// The other hosts this one hears that are not fenced: those that may take a turn to stand.
fn candidates<'v>(v: &'v StandView<'_>) -> impl Iterator<Item = HostId> + 'v {
    let a = v.assessment;
    a.heard.iter().filter(move |h| *h != v.me && a.peer(*h).is_none_or(|p| p.fenced_epoch.is_none()))
}

/// Whether a host it hears has shown a log longer than this host's — fenced or not: a fenced
/// host's timer stands too, and wins with the longest log (it then commits its own rejoin).
/// Leaving them out let a shorter log's stands turn away their elections round after round
/// (simulator, sites a, a, b, b, site power loss, seed 2: hosts back from a power loss report
/// themselves fenced until they rejoin).
///
/// Only logs shown in this time without a leader (`exchange` past `exchanges_before`).
fn longer_log_heard(v: &StandView<'_>, exchanges_before: u64) -> bool {
    let shown_longer = |h: HostId| v.peer_logs.iter().any(|p| p.host == h && p.exchange > exchanges_before && Some(p.last_log) > v.last_log);
    v.assessment.heard.iter().any(|h| h != v.me && shown_longer(h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostset::HostSet;
    use crate::liveness::{FenceReason, HostLiveness, PeerAssessment};

    impl ElectionWatch {
        fn stand_step(&mut self, v: &StandView<'_>) -> Option<Stand> {
            self.step(v).stand
        }
    }

    fn hearing(now: u64, heard: &[u32]) -> Assessment {
        let mut set = HostSet::EMPTY;
        for h in heard {
            set.insert(HostId(*h));
        }
        Assessment { now: Millis(now), heard: set, disk_alive: HostSet::EMPTY, disk_readable: true, peers: vec![], fence: None, has_majority: true }
    }

    fn peer(host: u32, fenced_epoch: Option<u64>) -> PeerAssessment {
        PeerAssessment {
            host: HostId(host),
            liveness: HostLiveness::Alive,
            net_age_ms: Some(100),
            disk_age_ms: Some(100),
            fenced_epoch,
            dead_since: None,
            last_evidence: None,
            fence_deadline: None,
            slot_corrupt: false,
        }
    }

    /// Host 0 following `leader` in term 7, its log ending with an entry of that term.
    fn following(a: &Assessment, leader: u32) -> StandView<'_> {
        StandView {
            me: HostId(0),
            leader: Some(HostId(leader)),
            term: 7,
            last_log: Some(LogPosition { term: 7, leader: u64::from(leader), index: 40 }),
            peer_logs: &[],
            own_fenced: false,
            assessment: a,
            election_timeout_min_ms: 900,
            election_timeout_max_ms: 1800,
        }
    }

    fn leaderless(a: &Assessment, me: u32) -> StandView<'_> {
        StandView { me: HostId(me), leader: None, ..following(a, 1) }
    }

    fn with_leader_fenced(now: u64, fenced: bool) -> Assessment {
        Assessment { peers: vec![peer(1, fenced.then_some(3))], ..hearing(now, &[0, 1]) }
    }

    #[test]
    fn a_follower_stands_against_a_fenced_leader_it_followed_for_an_election_timeout() {
        let mut w = ElectionWatch::default();
        assert_eq!(w.stand_step(&following(&with_leader_fenced(0, true), 1)), None, "just elected: it may rejoin at once");
        assert_eq!(w.stand_step(&following(&with_leader_fenced(800, true), 1)), None);
        assert_eq!(w.stand_step(&following(&with_leader_fenced(900, true), 1)), Some(Stand::AgainstFencedLeader(HostId(1))));

        // A leader followed for long (the one-way cut): at once once it reports itself fenced.
        let mut w = ElectionWatch::default();
        assert_eq!(w.stand_step(&following(&with_leader_fenced(0, false), 1)), None);
        assert_eq!(w.stand_step(&following(&with_leader_fenced(5_000, false), 1)), None, "not a fenced leader");
        assert_eq!(w.stand_step(&following(&with_leader_fenced(5_100, true), 1)), Some(Stand::AgainstFencedLeader(HostId(1))));
    }

    #[test]
    fn no_stand_against_a_fenced_leader_by_a_host_that_cannot_win_or_must_not() {
        let a = with_leader_fenced(10_000, true);
        let cases = [
            (StandView { own_fenced: true, ..following(&a, 1) }, "a fenced host does not stand"),
            (StandView { last_log: Some(LogPosition { term: 5, leader: 2, index: 44 }), ..following(&a, 1) }, "its log may be shorter than the leader's"),
            (StandView { last_log: None, ..following(&a, 1) }, "an empty log"),
            (StandView { me: HostId(1), ..following(&a, 1) }, "not against itself"),
        ];
        for (view, why) in cases {
            let mut w = ElectionWatch { following: Some((HostId(1), Millis(0))), ..ElectionWatch::default() };
            assert_eq!(w.stand_step(&view), None, "{why}");
        }
        let minority = Assessment { has_majority: false, ..a.clone() };
        let mut w = ElectionWatch { following: Some((HostId(1), Millis(0))), ..ElectionWatch::default() };
        assert_eq!(w.stand_step(&following(&minority, 1)), None, "no majority hears it");
        let fencing = Assessment { fence: Some(FenceReason::Isolated { silent_ms: 3000 }), ..a };
        assert_eq!(w.stand_step(&following(&fencing, 1)), None, "it has a reason to fence");
    }

    #[test]
    fn a_host_stands_when_no_leader_is_known_for_twice_the_longest_election_timeout_in_turn_by_id() {
        // h2 hears h1 below it: it waits 3.6 s plus one election timeout for h1's turn.
        let at = |now| hearing(now, &[1, 2]);
        let mut w = ElectionWatch::default();
        assert_eq!(w.stand_step(&leaderless(&at(10_000), 2)), None);
        assert_eq!(w.stand_step(&leaderless(&at(14_000), 2)), None);
        assert_eq!(w.stand_step(&leaderless(&at(14_500), 2)), Some(Stand::Leaderless), "3.6 s + 0.9 s without a leader");
        assert_eq!(w.stand_step(&leaderless(&at(15_000), 2)), None, "not again at once");
        assert_eq!(w.stand_step(&leaderless(&at(17_000), 2)), None);
        assert_eq!(w.stand_step(&leaderless(&at(17_200), 2)), Some(Stand::Leaderless), "again 1.8 s + 0.9 s after it stood");
        // A leader known resets the watch.
        assert_eq!(w.stand_step(&StandView { me: HostId(2), ..following(&at(19_100), 1) }), None);
        assert_eq!(w.stand_step(&leaderless(&at(19_200), 2)), None);
        assert_eq!(w.stand_step(&leaderless(&at(23_000), 2)), None);
        // h1 is first: nobody below it.
        let mut w = ElectionWatch::default();
        assert_eq!(w.stand_step(&leaderless(&at(10_000), 1)), None);
        assert_eq!(w.stand_step(&leaderless(&at(13_600), 1)), Some(Stand::Leaderless));
        // A fenced host below does not take a turn.
        let fenced_below = Assessment { peers: vec![peer(1, Some(2))], ..at(0) };
        let mut w = ElectionWatch::default();
        assert_eq!(w.stand_step(&leaderless(&fenced_below, 2)), None);
        assert_eq!(w.stand_step(&leaderless(&Assessment { now: Millis(3_600), ..fenced_below }, 2)), Some(Stand::Leaderless));
    }

    fn shown(host: u32, last_log: LogPosition, exchange: u64) -> PeerLog {
        PeerLog { host: HostId(host), last_log, exchange }
    }

    #[test]
    fn a_host_never_stands_for_a_leaderless_cluster_when_a_host_it_hears_showed_a_longer_log() {
        let at = |now| hearing(now, &[1, 2]);
        let mine = LogPosition { term: 7, leader: 1, index: 40 };
        let longer = [shown(2, LogPosition { index: 41, ..mine }, 1)];
        let newer_term = [shown(2, LogPosition { term: 8, leader: 2, index: 12 }, 1)];
        let equal = [shown(2, mine, 1)];
        for (logs, stands) in [(&longer[..], false), (&newer_term[..], false), (&equal[..], true), (&[][..], true)] {
            let mut w = ElectionWatch::default();
            let (start, later) = (at(0), at(3_600));
            assert_eq!(w.stand_step(&StandView { peer_logs: &[], last_log: Some(mine), ..leaderless(&start, 1) }), None);
            assert_eq!(w.stand_step(&StandView { peer_logs: logs, last_log: Some(mine), ..leaderless(&later, 1) }).is_some(), stands, "{logs:?}");
        }
        // A log shown before this time without a leader does not count: it may be stale.
        let (start, later) = (at(0), at(3_600));
        let mut w = ElectionWatch::default();
        assert_eq!(w.stand_step(&StandView { peer_logs: &longer, last_log: Some(mine), ..leaderless(&start, 1) }), None);
        assert_eq!(w.stand_step(&StandView { peer_logs: &longer, last_log: Some(mine), ..leaderless(&later, 1) }), Some(Stand::Leaderless));
        // A fenced host's longer log counts too: its timer stands, and it can win.
        let fenced_peer = Assessment { peers: vec![peer(2, Some(4))], ..at(3_600) };
        let mut w = ElectionWatch { leaderless_since: Some(Millis(0)), ..ElectionWatch::default() };
        let step = w.step(&StandView { peer_logs: &longer, last_log: Some(mine), ..leaderless(&fenced_peer, 1) });
        assert_eq!(step, ElectionStep { stand: None, defer: true });
        // Only the hosts it hears count: a longer log cut off with its host cannot win.
        let alone = hearing(3_600, &[1]);
        let mut w = ElectionWatch { leaderless_since: Some(Millis(0)), ..ElectionWatch::default() };
        assert_eq!(w.stand_step(&StandView { peer_logs: &longer, last_log: Some(mine), ..leaderless(&alone, 1) }), Some(Stand::Leaderless));
    }

    #[test]
    fn a_host_defers_its_timer_to_a_longer_log_it_hears_while_leaderless_for_a_bounded_time() {
        let at = |now| hearing(now, &[1, 2]);
        let mine = LogPosition { term: 7, leader: 1, index: 40 };
        let longer = [shown(2, LogPosition { index: 41, ..mine }, 1)];
        let view = |a| StandView { peer_logs: &longer, last_log: Some(mine), ..leaderless(a, 1) };
        let (t0, t1, t2) = (at(0), at(14_300), at(14_400));
        let mut w = ElectionWatch::default();
        assert!(!w.step(&StandView { peer_logs: &[], ..view(&t0) }).defer, "nothing shown yet");
        assert!(w.step(&view(&t0)).defer);
        assert!(w.step(&view(&t1)).defer);
        assert_eq!(w.step(&view(&t2)), ElectionStep::default(), "eight longest election timeouts at most");
        // Not while a leader is known, nor for an equal log, nor for a host it no longer hears.
        let mut w = ElectionWatch::default();
        assert!(!w.step(&StandView { leader: Some(HostId(2)), ..view(&t0) }).defer);
        let mut w = ElectionWatch::default();
        assert!(!w.step(&StandView { peer_logs: &[], ..view(&t0) }).defer);
        assert!(!w.step(&StandView { peer_logs: &[shown(2, mine, 1)], ..view(&t0) }).defer);
        let alone = hearing(0, &[1]);
        assert!(!w.step(&view(&alone)).defer);
    }

    #[test]
    fn a_host_with_a_reason_to_fence_or_no_majority_never_stands_for_a_leaderless_cluster() {
        let mut minority = ElectionWatch::default();
        let mut fenced = ElectionWatch::default();
        for t in 0..20 {
            let alone = hearing(t * 1000, &[2]);
            let a = Assessment { has_majority: false, ..alone.clone() };
            assert_eq!(minority.stand_step(&leaderless(&a, 2)), None);
            assert_eq!(fenced.stand_step(&StandView { own_fenced: true, ..leaderless(&alone, 2) }), None);
        }
    }
}
