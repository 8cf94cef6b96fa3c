use super::*;
use crate::hostset::HostSet;
use crate::liveness::PeerAssessment;
use crate::time::Millis;

fn key() -> ClusterKey {
    ClusterKey::new(b"0123456789abcdef-witness").expect("key")
}

fn peer(host: u32, liveness: HostLiveness, fence_deadline: Option<u64>) -> PeerAssessment {
    PeerAssessment {
        host: HostId(host),
        liveness,
        net_age_ms: None,
        disk_age_ms: None,
        fenced_epoch: None,
        dead_since: None,
        last_evidence: None,
        fence_deadline: fence_deadline.map(Millis),
        slot_corrupt: false,
    }
}

fn assessment(now: u64, peers: Vec<PeerAssessment>) -> Assessment {
    Assessment { now: Millis(now), heard: HostSet::EMPTY, disk_alive: HostSet::EMPTY, disk_readable: true, peers, fence: None, has_majority: true }
}

fn claim(host: u32, claiming: bool) -> Claim {
    Claim { host: HostId(host), claiming, incarnation: 7, counter: 3 }
}

fn step(me: u32, holding: bool, claims: &[Claim], a: &Assessment) -> WitnessStep {
    next_step(&WitnessView { me: HostId(me), holding, may_hold: true, claims: Some(claims), assessment: a })
}

#[test]
fn a_claim_block_round_trips_and_a_forged_or_misplaced_one_is_refused() {
    let k = key();
    let c = Claim { host: HostId(1), claiming: true, incarnation: 99, counter: 12 };
    let b = c.encode(&k);
    assert_eq!(b.len(), CLAIM_SIZE);
    assert_eq!(Claim::decode(&b, HostId(1), &k), Ok(Some(c)));
    assert_eq!(Claim::decode(&b, HostId(0), &k), Err(ClaimError::WrongHost { expected: 0, found: 1 }));
    let other = ClusterKey::new(b"another-secret-of-this-length").expect("key");
    assert_eq!(Claim::decode(&b, HostId(1), &other), Err(ClaimError::BadMac));
    let mut flipped = b.clone();
    flipped[5] = 0;
    assert_eq!(Claim::decode(&flipped, HostId(1), &k), Err(ClaimError::BadMac), "a flipped claim flag does not verify");
    assert_eq!(Claim::decode(&[0; CLAIM_SIZE], HostId(1), &k), Ok(None));
    assert_eq!(Claim::decode(&[7; 8], HostId(1), &k), Err(ClaimError::BadMagic));
    assert!(DATABASE_OFFSET >= CLAIMS_OFFSET + (MAX_HOSTS * CLAIM_SIZE) as u64);
}

#[test]
fn a_host_claims_then_opens_only_after_reading_no_live_rival() {
    let a = assessment(1_000, vec![peer(1, HostLiveness::Alive, None)]);
    assert_eq!(step(0, false, &[], &a), WitnessStep::Claim);
    assert_eq!(step(0, false, &[claim(0, true)], &a), WitnessStep::Open);
    assert_eq!(step(0, false, &[claim(0, true), claim(1, false)], &a), WitnessStep::Open);
    assert_eq!(step(0, true, &[claim(0, true), claim(1, true)], &a), WitnessStep::Wait, "the holder keeps it");
    // A live rival holds it: wait, claim nothing.
    let b = assessment(1_000, vec![peer(0, HostLiveness::Alive, None)]);
    assert_eq!(step(1, false, &[claim(0, true)], &b), WitnessStep::Wait);
    // Both claimed at once: the higher id withdraws, the lower waits for that.
    assert_eq!(step(1, false, &[claim(0, true), claim(1, true)], &b), WitnessStep::Withdraw);
    assert_eq!(step(0, false, &[claim(0, true), claim(1, true)], &a), WitnessStep::Wait);
    // A claim of a host this one knows nothing of yet (no peer in its assessment: the cluster
    // is still forming) counts as well.
    let forming = assessment(1_000, vec![]);
    assert_eq!(step(0, false, &[claim(0, true), claim(1, true)], &forming), WitnessStep::Wait);
    assert_eq!(step(1, false, &[claim(0, true), claim(1, true)], &forming), WitnessStep::Withdraw);
    assert_eq!(step(1, false, &[claim(0, true)], &forming), WitnessStep::Wait);
    // A failed read decides nothing.
    let v = WitnessView { me: HostId(0), holding: false, may_hold: true, claims: None, assessment: &a };
    assert_eq!(next_step(&v), WitnessStep::Wait);
}

#[test]
fn a_dead_holders_claim_stops_counting_only_at_its_fence_deadline() {
    let claims = [claim(0, true)];
    for liveness in [HostLiveness::Alive, HostLiveness::Partitioned, HostLiveness::Unknown] {
        let a = assessment(10_000, vec![peer(0, liveness, Some(5_000))]);
        assert_eq!(step(1, false, &claims, &a), WitnessStep::Wait, "{liveness:?}: only a dead host's claim lapses");
    }
    let before = assessment(4_999, vec![peer(0, HostLiveness::Dead, Some(5_000))]);
    assert_eq!(step(1, false, &claims, &before), WitnessStep::Wait, "not before the deadline");
    let after = assessment(5_000, vec![peer(0, HostLiveness::Dead, Some(5_000))]);
    assert_eq!(step(1, false, &claims, &after), WitnessStep::Claim);
    assert_eq!(step(1, false, &[claim(0, true), claim(1, true)], &after), WitnessStep::Open);
}

#[test]
fn a_host_that_may_not_speak_for_the_cluster_closes_it_and_claims_nothing() {
    let a = assessment(1_000, vec![]);
    let v = WitnessView { me: HostId(0), holding: true, may_hold: false, claims: Some(&[]), assessment: &a };
    assert_eq!(next_step(&v), WitnessStep::Close);
    assert_eq!(next_step(&WitnessView { holding: false, ..v }), WitnessStep::Wait);
    // It claimed, then lost the right before it opened: the claim must not hold the other off.
    let claimed = [claim(0, true), claim(1, false)];
    assert_eq!(next_step(&WitnessView { holding: false, claims: Some(&claimed), ..v }), WitnessStep::Withdraw);
}

/// Two hosts run the protocol against one disk under every kind of interleaving: a host reads
/// the claims, and acts on that read later (the other may have written meanwhile); holders close
/// and withdraw at random. Never do both hold the witness at once, and it is held again soon.
#[test]
fn no_interleaving_of_two_claimers_lets_both_hold() {
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let a = assessment(1_000, vec![peer(0, HostLiveness::Alive, None), peer(1, HostLiveness::Alive, None)]);
    let mut held_rounds = 0u32;
    for _schedule in 0..2_000 {
        let mut disk = [claim(0, false), claim(1, false)];
        let mut holding = [false, false];
        // The step each host decided on its last read, not yet carried out.
        let mut pending: [Option<WitnessStep>; 2] = [None, None];
        for _ in 0..60 {
            let h = (next() % 2) as usize;
            match pending[h].take() {
                None => pending[h] = Some(step(h as u32, holding[h], &disk, &a)),
                Some(WitnessStep::Claim) => disk[h].claiming = true,
                Some(WitnessStep::Withdraw) => disk[h].claiming = false,
                Some(WitnessStep::Open) => holding[h] = true,
                Some(WitnessStep::Close) => holding[h] = false,
                Some(WitnessStep::Wait) if holding[h] && next() % 10 == 0 => {
                    // A planned release: close first, then withdraw.
                    holding[h] = false;
                    disk[h].claiming = false;
                }
                Some(WitnessStep::Wait) => {}
            }
            assert!(!(holding[0] && holding[1]), "both hosts hold the witness: disk {disk:?}");
            held_rounds += u32::from(holding[0] || holding[1]);
        }
    }
    assert!(held_rounds > 2_000 * 20, "the witness is held most of the time ({held_rounds})");
}

fn at(term: u64, leader: u64, index: u64) -> Option<LogPosition> {
    Some(LogPosition { term, leader, index })
}

fn election(host_knows_leader: bool, witness_leads: bool, past_lease: bool, host_log: Option<LogPosition>, witness_log: Option<LogPosition>) -> ElectionStep {
    let witness_lead = match (witness_leads, past_lease) {
        (false, _) => WitnessLead::No,
        (true, false) => WitnessLead::LeaseFresh,
        (true, true) => WitnessLead::LeasePassed,
    };
    steer_election(&ElectionView { host_knows_leader, witness_lead, host_log, witness_log, host_may_stand: false })
}

/// The lab's cut between two sites (CI, and 1 run in 6 here): the host that kept the cluster
/// had led in term 1 and written entry 22 that reached nobody; the other host, holding the
/// witness, won term 2 with it and wrote its own entry 22 there, then fenced and let the
/// witness go. The survivor took the witness over: its log (T1-22) is less up to date than the
/// witness's (T2-22) though as long, so the witness refuses it — the witness must stand.
#[test]
fn the_witness_stands_when_its_log_has_a_later_term_at_the_same_index() {
    assert_eq!(election(false, false, false, at(1, 0, 22), at(2, 1, 22)), ElectionStep::WitnessStands);
    // A later term wins even over a longer log.
    assert_eq!(election(false, false, false, at(1, 0, 30), at(2, 1, 22)), ElectionStep::WitnessStands);
    // The same term, further on; and a witness that never saw an entry.
    assert_eq!(election(false, false, false, at(2, 1, 21), at(2, 1, 22)), ElectionStep::WitnessStands);
    assert_eq!(election(false, false, false, None, at(1, 0, 1)), ElectionStep::WitnessStands);
}

#[test]
fn the_host_stands_itself_when_its_log_is_as_up_to_date() {
    for host in [at(2, 1, 22), at(3, 0, 1), at(2, 1, 40)] {
        assert_eq!(election(false, false, false, host, at(2, 1, 22)), ElectionStep::Nothing, "{host:?}");
    }
    // A leader known: nothing to steer.
    assert_eq!(election(true, false, false, at(1, 0, 22), at(2, 1, 22)), ElectionStep::Nothing);
}

#[test]
fn a_leading_witness_hands_over_once_its_lease_passed_and_the_host_caught_up() {
    assert_eq!(election(false, true, true, at(4, 64, 23), at(4, 64, 23)), ElectionStep::HostStands);
    // Not yet caught up, or the lease still fresh (the witness would refuse the vote).
    assert_eq!(election(true, true, true, at(2, 1, 22), at(4, 64, 23)), ElectionStep::Nothing);
    assert_eq!(election(true, true, false, at(4, 64, 23), at(4, 64, 23)), ElectionStep::Nothing);
    // A leading witness never stands again.
    assert_eq!(election(false, true, false, at(1, 0, 22), at(4, 64, 23)), ElectionStep::Nothing);
}

#[test]
fn a_host_as_up_to_date_as_the_witness_stands_without_waiting_for_its_timer() {
    let view = |host_knows_leader, host_log, witness_log, host_may_stand| ElectionView {
        host_knows_leader,
        witness_lead: WitnessLead::No,
        host_log,
        witness_log,
        host_may_stand,
    };
    assert_eq!(steer_election(&view(false, at(2, 1, 22), at(2, 1, 22), true)), ElectionStep::HostStandsLeaderless);
    assert_eq!(steer_election(&view(false, at(2, 1, 23), at(2, 1, 22), true)), ElectionStep::HostStandsLeaderless);
    // The witness just opened (its lease refuses the vote), or the host stood a moment ago.
    assert_eq!(steer_election(&view(false, at(2, 1, 22), at(2, 1, 22), false)), ElectionStep::Nothing);
    // A leader known; or the witness's log is ahead (the witness stands instead).
    assert_eq!(steer_election(&view(true, at(2, 1, 22), at(2, 1, 22), true)), ElectionStep::Nothing);
    assert_eq!(steer_election(&view(false, at(2, 1, 21), at(2, 1, 22), true)), ElectionStep::WitnessStands);
}

/// The leader a holder's node names counts only if it is this host, the witness, or a peer
/// heard on the network: a peer gone (the reason the witness was taken over) leads nobody.
#[test]
fn only_a_leader_this_host_hears_counts_for_the_witnesss_elections() {
    let a = assessment(10_000, vec![peer(0, HostLiveness::Alive, None)]);
    let dead = assessment(10_000, vec![peer(0, HostLiveness::Dead, Some(9_000))]);
    let partitioned = assessment(10_000, vec![peer(0, HostLiveness::Partitioned, None)]);
    let me = HostId(1);
    assert!(leader_heard(Some(0), me, &a), "a peer heard on the network leads");
    assert!(!leader_heard(Some(0), me, &dead), "a dead peer leads nobody");
    assert!(!leader_heard(Some(0), me, &partitioned), "a peer heard only on the disk sends us no consensus");
    assert!(leader_heard(Some(1), me, &dead), "this host");
    assert!(leader_heard(Some(WITNESS_NODE), me, &dead), "the witness's node");
    assert!(!leader_heard(None, me, &a));
    assert!(!leader_heard(Some(7), me, &a), "a node that is no peer");
}

/// A link broken one way (this host's words no longer reach the peer, the peer's still reach
/// it): the peer, holding the witness, won a term with its vote, then found itself on the
/// losing side, let the witness go and fenced. This host took the witness over and still hears
/// the peer — and its node names the peer's term's leader. A leader that declared itself fenced
/// leads nobody: the holder steers the election now (the lab once held the guest's writes 8.1 s
/// for this host's election timer, the peer heard and fenced all along).
#[test]
fn a_leader_heard_but_fenced_leads_nobody() {
    let fenced = PeerAssessment { fenced_epoch: Some(1), ..peer(1, HostLiveness::Alive, None) };
    let a = assessment(10_000, vec![fenced]);
    assert!(!leader_heard(Some(1), HostId(0), &a), "the peer fenced itself");
    let view = ElectionView {
        host_knows_leader: leader_heard(Some(1), HostId(0), &a),
        witness_lead: WitnessLead::No,
        host_log: at(1, 0, 22),
        witness_log: at(2, 1, 22),
        host_may_stand: true,
    };
    assert_eq!(steer_election(&view), ElectionStep::WitnessStands, "the witness's log holds the fenced leader's entry: it stands");
}
