//! The heartbeat disk's part in the liveness view: slots seen and missed, when a disk counts as
//! shared, private and write-only disks, corrupt and stale slots.

use super::*;

/// Disk-channel loss per peer: slot counter values written but never read are counted.
#[test]
fn disk_heartbeats_seen_and_missed_are_counted_per_peer() {
    let mut l = three(0);
    for (t, counter) in [(0, 1), (200, 2), (400, 2), (600, 5), (800, 6)] {
        l.disk_read(&[SlotRead::Empty, slot(1, counter, &[0, 1, 2], false), SlotRead::Empty], Millis(t));
    }
    let c = l.heartbeat_counts().into_iter().find(|c| c.host == HostId(1)).expect("peer 1");
    // Changes seen: 1, 2, 5, 6; values 3 and 4 were never read.
    assert_eq!((c.disk_seen, c.disk_missed), (4, 2));
    let quiet = l.heartbeat_counts().into_iter().find(|c| c.host == HostId(2)).expect("peer 2");
    assert_eq!((quiet.disk_seen, quiet.disk_missed), (0, 0));
}

/// A host joining a running cluster is not yet in the heard-sets its peers wrote in their
/// slots (they hear it only once they applied its join and its heartbeats reached them), so
/// the slots show it apart from the majority for a while. It must not fence on that while its
/// membership is new; a losing verdict that outlasts the grace still fences it. (Found by
/// `bench heartbeat` with 64 agents: "h61: self-fenced: network partition: side {0..60}
/// survives without us" right after it joined.)
#[test]
fn a_joining_host_is_not_fenced_by_slots_written_before_its_peers_heard_it() {
    let mut l = Liveness::new(HostId(3), 1, T, Millis(0));
    l.set_members_at(HostSet::single(HostId(3)), Millis(0));
    let four: HostSet = [0, 1, 2, 3].into_iter().map(HostId).collect();
    let join = 10_000;
    l.set_members_at(four, Millis(join));
    // Peers heartbeat to the newcomer and acknowledge it (its lease holds), but until
    // `heard_from` their slots say they hear only each other.
    let drive = |l: &mut Liveness, from: u64, until: u64, heard_from: u64| {
        let mut t = from;
        while t < until {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
            let peers_hear: Vec<u32> = if t >= heard_from { vec![0, 1, 2, 3] } else { vec![0, 1, 2] };
            let mut slots = vec![SlotRead::Empty; 4];
            slots[3] = slot(3, seq, &[0, 1, 2, 3], false);
            for p in 0..3u32 {
                l.heartbeat_received(&hb(p, seq, &peers_hear, Some((3, seq))), now.plus(1)).expect("fresh");
                slots[p as usize] = slot(p, seq, &peers_hear, false);
            }
            l.disk_read(&slots, now.plus(2));
            if let Some(f) = l.assess(now.plus(3)).fence {
                return Some((t, f));
            }
            t += 200;
        }
        None
    };
    // The peers' slots catch up 2 s after the join (a busy cluster applying many joins).
    assert_eq!(drive(&mut l, join, join + 4000, join + 2000), None, "no fence while the peers catch up");
    // A newcomer that stays apart from the majority past the grace still fences.
    let mut m = Liveness::new(HostId(3), 1, T, Millis(0));
    m.set_members_at(HostSet::single(HostId(3)), Millis(0));
    m.set_members_at(four, Millis(join));
    let fenced = drive(&mut m, join, join + 10_000, u64::MAX);
    assert!(matches!(fenced, Some((t, FenceReason::LosingSide { .. })) if t >= join + T.peer_timeout_ms), "{fenced:?}");
}

/// A dead host is declared dead once every report of it is a peer timeout old. A peer's
/// slot read before its latest heartbeat arrived is the older word and does not keep the
/// host "partitioned" for another disk round (the coordinator's failover waited for it).
#[test]
fn a_slot_older_than_its_writers_heartbeat_does_not_keep_a_dead_host_partitioned() {
    let mut l = three(0);
    run(&mut l, 0, 5000, |_, _| true);
    // Host 2 lost power after its heartbeat and slot of 4800; everyone last heard it at 4801.
    let last_heard = 4801;
    let mut heard_1_before = vec![0, 1, 2];
    let mut declared = None;
    let mut t = 5000;
    while t < 9000 {
        let now = Millis(t);
        let seq = t / 200 + 1;
        l.heartbeat_sent(seq, now);
        l.disk_written(now, now.plus(1));
        let heard_1: Vec<u32> = if t - last_heard < T.peer_timeout_ms { vec![0, 1, 2] } else { vec![0, 1] };
        // The disk round reads host 1's slot as host 1 wrote it a round ago ...
        let mut slots = vec![SlotRead::Empty; 3];
        slots[0] = slot(0, seq, &[0, 1, 2], false);
        slots[1] = slot(1, seq - 1, &heard_1_before, false);
        slots[2] = slot(2, 25, &[0, 1, 2], false);
        l.disk_read(&slots, now.plus(1));
        // ... then host 1's heartbeat of this round arrives, saying when it last heard host 2.
        let mut beat = hb(1, seq, &heard_1, Some((0, seq)));
        beat.ages.set(HostId(2), t - last_heard);
        l.heartbeat_received(&beat, now.plus(2)).expect("fresh");
        heard_1_before = heard_1;
        let a = l.assess(now.plus(3));
        if declared.is_none() && a.peer(HostId(2)).is_some_and(|p| p.liveness == HostLiveness::Dead) {
            declared = Some(t);
        }
        t += 200;
    }
    assert_eq!(declared, Some(7800), "dead at the first assessment a peer timeout after anyone heard it");
}

#[test]
fn disk_alive_peer_is_partitioned_not_dead() {
    let mut l = three(0);
    run(&mut l, 0, 4000, |_, _| true);
    // Host 2 keeps writing its slot but its heartbeats stop reaching us and host 1.
    for t in (4000..9000).step_by(200) {
        let now = Millis(t);
        let seq = t / 200 + 1;
        l.heartbeat_sent(seq, now);
        l.disk_written(now, now.plus(1));
        l.heartbeat_received(&hb(1, seq, &[0, 1], Some((0, seq))), now).expect("fresh");
        l.disk_read(&[slot(0, seq, &[0, 1], false), slot(1, seq, &[0, 1], false), slot(2, seq, &[2], false)], now);
    }
    let a = l.assess(Millis(9000));
    assert_eq!(a.peer(HostId(2)).map(|p| p.liveness), Some(HostLiveness::Partitioned));
    assert_eq!(a.peer(HostId(2)).and_then(|p| p.fence_deadline), None);
    assert_eq!(a.fence, None, "host 0 is on the winning side");
}

/// A host whose path to the heartbeat disk switched to a stale private copy (and whose
/// network is cut) keeps writing and reading "its" disk: its own slot advances there, the
/// peers' slots no longer do. Those writes renew nothing — the peers cannot see them and
/// count its fence deadline from its last heartbeat — although the copy still looks shared
/// by its old changes for a peer timeout. (Simulator seed 237 found the lease extended.)
#[test]
fn writes_to_a_disk_that_only_was_shared_renew_no_lease() {
    let mut l = three(0);
    let mut last_ack = Millis(0);
    for t in (0..2000).step_by(200) {
        let now = Millis(t);
        let seq = t / 200 + 1;
        l.heartbeat_sent(seq, now);
        l.heartbeat_received(&hb(1, seq, &[0, 1, 2], Some((0, seq))), now).expect("fresh");
        l.heartbeat_received(&hb(2, seq, &[0, 1, 2], Some((0, seq))), now).expect("fresh");
        last_ack = now;
        l.disk_written(now, now);
        l.disk_read(&[slot(0, seq, &[0, 1, 2], false), slot(1, seq, &[0, 1, 2], false), slot(2, seq, &[0, 1, 2], false)], now);
    }
    let frozen = 2000 / 200;
    for t in (2000..5000).step_by(200) {
        let now = Millis(t);
        let seq = t / 200 + 1;
        l.disk_written(now, now);
        l.disk_read(&[slot(0, seq, &[0], false), slot(1, frozen, &[0, 1, 2], false), slot(2, frozen, &[0, 1, 2], false)], now);
        let until = l.lease_until(now).expect("a member of three holds a lease");
        assert!(until.0 <= last_ack.0 + T.self_fence_ms, "at {t} ms the lease runs to {until:?}, past the last acknowledged heartbeat + self_fence_ms");
    }
    assert!(matches!(l.assess(Millis(4800)).fence, Some(FenceReason::Isolated { .. })), "the host fences itself");
}

/// Writes to the shared disk renew the lease once a read shows them there and shows the
/// peers still writing to it after them: a host cut from the network but not from the disk
/// keeps its lease by the disk.
#[test]
fn writes_to_the_shared_disk_renew_the_lease_once_reads_confirm_them() {
    let mut l = three(0);
    for t in (0..5000).step_by(200) {
        let now = Millis(t);
        let seq = t / 200 + 1;
        l.disk_written(now, now);
        l.disk_read(&[slot(0, seq, &[0], false), slot(1, seq, &[1, 2], false), slot(2, seq, &[1, 2], false)], now);
        if t >= 400 {
            let until = l.lease_until(now).expect("lease");
            assert!(until.0 + 400 >= now.0 + T.self_fence_ms, "at {t} ms the lease runs to {until:?}: the disk renews it, a read or two behind");
        }
    }
}

#[test]
fn lost_disk_with_network_is_no_fence_and_peers_are_alive() {
    let mut l = three(0);
    for t in (0..10_000).step_by(200) {
        let now = Millis(t);
        let seq = t / 200 + 1;
        l.heartbeat_sent(seq, now);
        l.disk_write_failed();
        l.disk_read_failed();
        for p in [1, 2] {
            l.heartbeat_received(&hb(p, seq, &[0, 1, 2], Some((0, seq))), now).expect("fresh");
        }
    }
    let a = l.assess(Millis(10_000));
    assert_eq!(a.fence, None);
    assert!(a.peers.iter().all(|p| p.liveness == HostLiveness::Alive));
}

#[test]
fn silent_peer_without_readable_disk_is_unknown_never_dead() {
    let mut l = three(0);
    for t in (0..10_000).step_by(200) {
        let now = Millis(t);
        let seq = t / 200 + 1;
        l.heartbeat_sent(seq, now);
        l.heartbeat_received(&hb(1, seq, &[0, 1], Some((0, seq))), now).expect("fresh");
    }
    let a = l.assess(Millis(10_000));
    let p2 = a.peer(HostId(2)).expect("peer");
    assert_eq!(p2.liveness, HostLiveness::Unknown);
    assert_eq!(p2.fence_deadline, None);
}

#[test]
fn corrupt_slot_is_counted_once_and_not_trusted() {
    let mut l = three(0);
    let bad = SlotRead::Corrupt(SlotCorruption::BadChecksum);
    l.disk_read(&[SlotRead::Empty, bad, SlotRead::Empty], Millis(0));
    l.disk_read(&[SlotRead::Empty, bad, SlotRead::Empty], Millis(200));
    assert_eq!(l.counters().corrupt_slots, 1);
    let a = l.assess(Millis(200));
    assert!(a.peer(HostId(1)).is_some_and(|p| p.slot_corrupt && p.disk_age_ms.is_none()));
}

/// Host 0's `heartbeat_disk` is a private file (a typo, a missing mount, a copy): its own
/// slot writes land, but it reads nobody else advancing there. Cut off from the network it
/// must fence — its peers see its slot silent on the real disk, declare it dead and restart
/// its VMs once its fence deadline has passed.
#[test]
fn a_host_on_a_private_disk_fences_when_cut_off() {
    let mut l = three(0);
    let mut fenced_at = None;
    for t in (0..12_000).step_by(200) {
        let now = Millis(t);
        let seq = t / 200 + 1;
        l.heartbeat_sent(seq, now);
        l.disk_written(now, now.plus(1));
        if t < 4000 {
            for p in [1, 2] {
                l.heartbeat_received(&hb(p, seq, &[0, 1, 2], Some((0, seq))), now.plus(1)).expect("fresh");
            }
        }
        // Only our own slot advances on the private copy; the peers' slots are frozen copies.
        l.disk_read(&[slot(0, seq, &[0], false), slot(1, 3, &[0, 1, 2], false), slot(2, 3, &[0, 1, 2], false)], now.plus(2));
        if let Some(FenceReason::Isolated { .. }) = l.assess(now.plus(3)).fence {
            fenced_at = Some(t);
            break;
        }
    }
    let at = fenced_at.expect("a cut-off host on a private disk must fence");
    assert!(at <= 4000 + T.self_fence_ms + 200, "fenced too late at {at}");
    assert!(!l.lease_valid(Millis(at + 3)));
}

/// A host that can write its slot but reads nothing (read path broken) and is cut off.
#[test]
fn a_host_that_writes_but_cannot_read_fences_when_cut_off() {
    let mut l = three(0);
    run(&mut l, 0, 4000, |_, _| true);
    let mut fenced = false;
    for t in (4000..9000).step_by(200) {
        let now = Millis(t);
        l.heartbeat_sent(t / 200 + 1, now);
        l.disk_written(now, now.plus(1));
        l.disk_read_failed();
        if l.assess(now.plus(3)).fence.is_some() {
            fenced = true;
            break;
        }
    }
    assert!(fenced, "a write-only host cut off from the network must fence");
}

/// A host on a private disk that still hears one peer must not call the other peer dead: its
/// disk proves nothing about anyone (the silent peer may be alive on the real disk).
#[test]
fn a_private_disk_is_no_evidence_of_death() {
    let mut l = three(0);
    for t in (0..10_000).step_by(200) {
        let now = Millis(t);
        let seq = t / 200 + 1;
        l.heartbeat_sent(seq, now);
        l.disk_written(now, now.plus(1));
        l.heartbeat_received(&hb(1, seq, &[0, 1], Some((0, seq))), now.plus(1)).expect("fresh");
        l.disk_read(&[slot(0, seq, &[0, 1], false), SlotRead::Empty, SlotRead::Empty], now.plus(2));
    }
    let a = l.assess(Millis(10_000));
    assert_eq!(a.peer(HostId(2)).map(|p| p.liveness), Some(HostLiveness::Unknown));
    assert_eq!(a.peer(HostId(2)).and_then(|p| p.fence_deadline), None);
    assert_eq!(a.fence, None, "host 0 still has a network majority");
}

/// The shared disk keeps a lone network-isolated host's lease only while it reads a majority
/// advancing there: with its two peers writing, it is partitioned, not isolated.
#[test]
fn a_shared_disk_with_a_majority_advancing_counts_for_the_lease() {
    let mut l = three(0);
    for t in (0..6000).step_by(200) {
        let now = Millis(t);
        let seq = t / 200 + 1;
        l.heartbeat_sent(seq, now);
        l.disk_written(now, now.plus(1));
        l.disk_read(&[slot(0, seq, &[0], false), slot(1, seq, &[0, 1, 2], false), SlotRead::Empty], now.plus(2));
    }
    assert!(l.lease_valid(Millis(6000)), "two of three advancing on the disk: it is shared");
}

/// A slot read after a fresher heartbeat must not override it: host 1 wrote "fenced in
/// epoch 1" to its slot, then rejoined and says "not fenced" on the network; a reader that
/// sees the old slot content afterwards still takes the newer word.
#[test]
fn a_stale_slot_never_overrides_a_fresher_heartbeat() {
    let mut l = three(0);
    run(&mut l, 0, 2000, |_, _| true);
    // t=2000: the slot changes to "fenced in epoch 1".
    l.disk_read(&[SlotRead::Empty, slot(1, 500, &[0, 1, 2], true), SlotRead::Empty], Millis(2000));
    assert_eq!(l.assess(Millis(2001)).peer(HostId(1)).and_then(|p| p.fenced_epoch), Some(1));
    // t=2100: a newer heartbeat says it is no longer fenced; the slot, unchanged since, is older.
    l.heartbeat_received(&hb(1, 900, &[0, 1, 2], Some((0, 10))), Millis(2100)).expect("fresh");
    l.disk_read(&[SlotRead::Empty, slot(1, 500, &[0, 1, 2], true), SlotRead::Empty], Millis(2150));
    assert_eq!(l.assess(Millis(2200)).peer(HostId(1)).and_then(|p| p.fenced_epoch), None);
    // A slot that changes after the heartbeat is the newer word again.
    l.disk_read(&[SlotRead::Empty, slot(1, 501, &[0, 1, 2], true), SlotRead::Empty], Millis(2300));
    assert_eq!(l.assess(Millis(2301)).peer(HostId(1)).and_then(|p| p.fenced_epoch), Some(1));
}

/// Host `me` of two, with or without a disk witness.
fn two(me: u32, witness: bool) -> Liveness {
    let mut l = Liveness::new(HostId(me), 1, T, Millis(0));
    l.set_members([HostId(0), HostId(1)].into_iter().collect());
    l.set_disk_witness(witness);
    l
}

/// Two hosts and a heartbeat disk: host 1 loses power at 2 s. Without a disk witness the
/// survivor cannot tell its disk is shared (its own slot alone is no majority) and fences; with
/// one, the disk carries the third vote: the survivor keeps its lease, finds host 1 dead, and
/// gets a fence deadline counted from host 1's last evidence.
#[test]
fn a_two_host_survivor_keeps_its_lease_only_with_a_disk_witness() {
    let run_two = |witness: bool| {
        let mut l = two(0, witness);
        let mut last = None;
        for t in (0..12_000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
            let peer_up = t < 2_000;
            let peer_seq = if peer_up { seq } else { 2_000 / 200 };
            l.disk_read(&[slot(0, seq, &[0, 1], false), slot(1, peer_seq, &[0, 1], false)], now.plus(2));
            if peer_up {
                l.heartbeat_received(&hb(1, seq, &[0, 1], Some((0, seq))), now).expect("fresh");
            }
            last = Some(l.assess(now.plus(3)));
        }
        last.expect("assessed")
    };
    let without = run_two(false);
    assert!(matches!(without.fence, Some(FenceReason::Isolated { .. })), "{without:?}");
    assert!(!without.has_majority);
    let with = run_two(true);
    assert_eq!(with.fence, None, "{with:?}");
    assert!(with.has_majority, "the witness on the disk is the other vote: a fenced survivor may join again");
    let p = with.peer(HostId(1)).expect("peer");
    assert_eq!(p.liveness, HostLiveness::Dead);
    let deadline = p.fence_deadline.expect("deadline");
    let evidence = p.last_evidence.expect("evidence");
    assert_eq!(deadline, evidence.plus(T.fence_wait_ms()), "counted from the last evidence, settled by the disk");
    assert!(deadline.0 < 12_000, "passed before the end: {deadline:?}");
}

/// With a disk witness, a link cut between two hosts that both still write the disk is a
/// partition: the lower id wins and the other fences — never both, never neither.
#[test]
fn a_two_host_link_cut_with_a_disk_witness_fences_exactly_the_higher_id() {
    let verdict = |me: u32| {
        let mut l = two(me, true);
        let other = 1 - me;
        let mut last = None;
        for t in (0..12_000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
            let linked = t < 2_000;
            let heard: &[u32] = if linked { &[0, 1] } else { &[other] };
            let mine: &[u32] = if linked { &[0, 1] } else { &[me] };
            l.disk_read(&[slot(me, seq, mine, false), slot(other, seq, heard, false)], now.plus(2));
            if linked {
                l.heartbeat_received(&hb(other, seq, &[0, 1], Some((me, seq))), now).expect("fresh");
            }
            last = Some(l.assess(now.plus(3)));
        }
        last.expect("assessed").fence
    };
    assert_eq!(verdict(0), None);
    assert!(matches!(verdict(1), Some(FenceReason::LosingSide { .. })), "{:?}", verdict(1));
}

/// What host 0 does at one instant, as host 1 sees it.
struct Host0 {
    /// It sends a heartbeat now, hearing these hosts and acknowledging host 1's or not.
    beat: Option<(&'static [u32], bool)>,
    /// Its slot changes now.
    writes: bool,
    /// What its slot says (the last one written stays on the disk).
    heard: &'static [u32],
    fenced: bool,
}

/// Host 1 of two with a disk witness, sending and writing every 200 ms and reading the disk every
/// 100 ms, for `until` ms with host 0 doing what `host0` says at each instant: every fence host
/// 1 decided on.
fn fences_of_host_1(until: u64, host0: impl Fn(u64) -> Host0) -> Vec<FenceReason> {
    let mut l = two(1, true);
    let mut fences = Vec::new();
    let mut peer_counter = 0;
    for t in (0..until).step_by(100) {
        let now = Millis(t);
        let seq = t / 100 + 1;
        if t % 200 == 0 {
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
        }
        let h0 = host0(t);
        if let Some((heard, acked)) = h0.beat {
            let mut beat = hb(0, seq, heard, acked.then_some((1, seq)));
            beat.to = HostId(1);
            l.heartbeat_received(&beat, now).expect("fresh");
        }
        if h0.writes {
            peer_counter += 1;
        }
        l.disk_read(&[slot(0, peer_counter, h0.heard, h0.fenced), slot(1, seq, &[0, 1], false)], now.plus(2));
        fences.extend(l.assess(now.plus(3)).fence);
    }
    fences
}

/// Host 0 heard both ways until `last_beat` ms; its slot changes for the last time at
/// `last_slot` ms, saying it hears `last_heard`, and host 0 then says nothing more.
fn fences_after_host_0_falls_silent(last_beat: u64, last_slot: u64, last_heard: &'static [u32]) -> Vec<FenceReason> {
    fences_of_host_1(last_slot + 2 * T.peer_timeout_ms, |t| Host0 {
        beat: (t <= last_beat && t % 200 == 0).then_some((&[0, 1][..], true)),
        writes: t <= last_slot && (t % 200 == 0 || t == last_slot),
        heard: if t >= last_slot { last_heard } else { &[0, 1] },
        fenced: false,
    })
}

/// A slot of host 0 that lands after its last heartbeat — a write delayed on its way to the
/// disk or the witness, composed while host 0 did not hear host 1 — says host 0 hears only
/// itself, and host 0 is then gone (power loss). That word makes host 1 the losing side of a
/// split, but nothing of host 0 follows it: host 1, healthy and connected to the disk, must not
/// fence for a host that no longer runs. (Found by the fault suite: two hosts and a network
/// witness, h1 fenced a second after h0 lost power.)
#[test]
fn a_late_slot_of_a_host_that_then_died_fences_nobody() {
    let fences = fences_after_host_0_falls_silent(2_000, 2_300, &[0]);
    assert!(fences.is_empty(), "{fences:?}");
}

/// Host 0's slot changes last well after its last heartbeat (heartbeats are paced while the
/// cluster is calm, and a slot read may come late): once its heartbeats are stale, host 1
/// hears nobody while host 0's slot, still fresh, says it hears host 1 — a split that host 0,
/// dead, wins by its lower id. Host 1 must not fence on it.
#[test]
fn the_last_slot_of_a_dead_host_outliving_its_heartbeats_fences_nobody() {
    let fences = fences_after_host_0_falls_silent(2_000, 2_900, &[0, 1]);
    assert!(fences.is_empty(), "{fences:?}");
}

/// The same host 0 alive, its link to host 1 broken one way (host 1's heartbeats no longer
/// reach it): its slot and its heartbeats both say it hears only itself, it keeps speaking,
/// and host 1 fences on the verdict.
#[test]
fn a_living_winner_that_no_longer_hears_us_still_fences_us() {
    let fences = fences_of_host_1(8_000, |t| {
        let heard: &'static [u32] = if t < 2_000 { &[0, 1] } else { &[0] };
        Host0 { beat: (t % 200 == 0).then_some((heard, t < 2_000)), writes: t % 200 == 0, heard, fenced: false }
    });
    assert!(matches!(fences.first(), Some(FenceReason::LosingSide { .. })), "{fences:?}");
}

/// Host 0 of two (with a disk witness) is cut off from everything, fences, and host 1 carries
/// on alone. Back, host 0's slot reaches the disk — fenced, hearing only itself — a second
/// before its heartbeats reach host 1: two sides of one host each, no majority. Host 1, not
/// fenced, stays; the lower id no longer wins over it. (Found by the fault suite: two hosts
/// and a network witness, a full partition of h0 healed; h1 stopped every VM it ran.)
#[test]
fn a_fenced_host_back_on_the_disk_does_not_win_over_the_one_that_runs() {
    let fences = fences_of_host_1(14_000, |t| {
        let (linked, on_disk) = (!(2_000..9_500).contains(&t), !(2_000..8_000).contains(&t));
        let heard: &'static [u32] = if linked { &[0, 1] } else { &[0] };
        Host0 { beat: (linked && t % 200 == 0).then_some((&[0, 1][..], true)), writes: on_disk && t % 200 == 0, heard, fenced: t >= 2_000 }
    });
    assert!(fences.is_empty(), "{fences:?}");
}

/// Host 0 back from a spell cut off from everything (silent on the network and on the disk
/// from 2 s to 6 s). From 6 s its heartbeats reach host 1 again, but host 1's do not reach it
/// yet: its heartbeats and its slot say it hears only itself. `deaf_until` is when host 0
/// begins to hear host 1 (and says so), `silent_from` when it is cut off from everything again.
fn fences_after_an_uneven_heal(deaf_until: u64, silent_from: u64, until: u64) -> Vec<FenceReason> {
    fences_of_host_1(until, |t| {
        let speaks = !(2_000..6_000).contains(&t) && t < silent_from;
        let heard: &'static [u32] = if (2_000..deaf_until).contains(&t) { &[0] } else { &[0, 1] };
        Host0 { beat: (speaks && t % 200 == 0).then_some((heard, heard.len() == 2)), writes: speaks && t % 200 == 0, heard, fenced: false }
    })
}

/// A heal reaches the two hosts unevenly: host 1 hears host 0 at once, host 0 hears host 1 only
/// a while later — and before it does, host 0 is cut off again. Host 0's last words say it hears
/// only itself, which reads as a link broken one way that host 0, the lower id, wins; but they
/// were spoken before host 0 could have heard host 1 for a peer timeout, and host 1, the host
/// that stays connected, must not fence on them. (Found by the fault suite: two sites and a
/// network witness, a heal then a cut of h0 within a second; h1 fenced, and every VM was down
/// until it rejoined, 13 s.)
#[test]
fn an_uneven_heal_then_a_cut_does_not_fence_the_host_that_stays() {
    let fences = fences_after_an_uneven_heal(u64::MAX, 6_800, 6_800 + 3 * T.peer_timeout_ms);
    assert!(fences.is_empty(), "{fences:?}");
}

/// The same heal, but host 0 goes on not hearing host 1 (the link is broken one way from then
/// on) and keeps speaking: a peer timeout after host 1 began to hear it again, its words count,
/// and host 1 fences on the verdict.
#[test]
fn a_link_broken_one_way_from_a_heal_on_still_fences_its_loser() {
    let fences = fences_after_an_uneven_heal(u64::MAX, u64::MAX, 6_000 + 3 * T.peer_timeout_ms);
    assert!(matches!(fences.first(), Some(FenceReason::LosingSide { .. })), "{fences:?}");
}

/// A heal that reaches host 0 a second late, after which both hear each other: nobody fences.
#[test]
fn a_heal_that_reaches_one_host_late_fences_nobody() {
    let fences = fences_after_an_uneven_heal(7_000, u64::MAX, 6_000 + 3 * T.peer_timeout_ms);
    assert!(fences.is_empty(), "{fences:?}");
}
