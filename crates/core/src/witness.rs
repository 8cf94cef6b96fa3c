//! The disk witness: a third Raft vote for a two-host cluster, kept on the shared disk.
//!
//! Two hosts cannot form a Raft majority once either is lost. The disk witness is a third voter
//! whose durable state (vote, log, state) lives in a region of shared storage, and which at most
//! one host at a time *holds*: runs its Raft node from that region and answers for it. Whichever
//! host survives takes it over, so the survivor and the witness are two votes of three.
//!
//! Who holds it is settled on the disk, without Raft (Raft needs the witness to have a
//! majority). Each host owns one claim block of the witness region and writes only that block;
//! everyone reads all of them — the Disk Paxos discipline of one writer per block. A host opens
//! the witness only after it wrote its own claim and then, in a read that began after that write,
//! found no other live claim. Two hosts doing that at once each read after their own write, so
//! the later reader sees the other's claim: at most one of them opens it. A claim is not live
//! when its host is certainly fenced — dead past its fence deadline, the same proof that lets
//! its VMs restart elsewhere — because a fencing host closes the witness before it kills its VMs
//! and a host never reopens it without a new round of write-then-read.
//!
//! This module decides (`next_step`, and `steer_election` for the holder), and encodes the claim
//! block; the agent does the I/O.

use crate::hostset::{HostId, MAX_HOSTS};
use crate::liveness::{Assessment, HostLiveness};
use crate::wire::{ClusterKey, MAC_LEN};

/// The witness's node id in Raft: above every host id (0–63), so it can never be a host's.
pub const WITNESS_NODE: u64 = MAX_HOSTS as u64;

/// The bytes of one claim block; host `h`'s block lies at `CLAIMS_OFFSET + h * CLAIM_SIZE`.
pub const CLAIM_SIZE: usize = 512;
/// Where the claim blocks start in the witness region (after its 4 KiB header).
pub const CLAIMS_OFFSET: u64 = 4096;
/// Where the witness's database starts: after the header and one claim block per possible host.
pub const DATABASE_OFFSET: u64 = CLAIMS_OFFSET + (MAX_HOSTS * CLAIM_SIZE) as u64;

const CLAIM_MAGIC: &[u8; 4] = b"TNDW";
const CLAIM_VERSION: u8 = 1;
const CLAIM_BODY_LEN: usize = 4 + 1 + 1 + 2 + 4 + 8 + 8;

/// What one host last wrote in its claim block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub host: HostId,
    /// The host claims the witness (it holds it, or is about to open it).
    pub claiming: bool,
    /// The writer's incarnation (a new one each time its agent starts), for display and checks.
    pub incarnation: u64,
    /// Raised at every write of the block.
    pub counter: u64,
}

/// Why a claim block is not trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("bad magic or version")]
    BadMagic,
    #[error("MAC does not verify (forged, or written with another secret)")]
    BadMac,
    #[error("claim of host {found} is stored where host {expected}'s belongs")]
    WrongHost { expected: u32, found: u32 },
}

impl Claim {
    /// One block: body, MAC of the body, zeros.
    #[must_use]
    pub fn encode(&self, key: &ClusterKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(CLAIM_SIZE);
        b.extend_from_slice(CLAIM_MAGIC);
        b.push(CLAIM_VERSION);
        b.push(u8::from(self.claiming));
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.host.0.to_le_bytes());
        b.extend_from_slice(&self.incarnation.to_le_bytes());
        b.extend_from_slice(&self.counter.to_le_bytes());
        let tag = key.mac(&b);
        b.extend_from_slice(&tag);
        b.resize(CLAIM_SIZE, 0);
        b
    }

    /// Decodes host `index`'s block: `Ok(None)` when it was never written (all zeros).
    pub fn decode(b: &[u8], index: HostId, key: &ClusterKey) -> Result<Option<Claim>, ClaimError> {
        if b.len() < CLAIM_BODY_LEN + MAC_LEN {
            return Err(ClaimError::BadMagic);
        }
        if b.iter().all(|x| *x == 0) {
            return Ok(None);
        }
        if &b[0..4] != CLAIM_MAGIC || b[4] != CLAIM_VERSION {
            return Err(ClaimError::BadMagic);
        }
        if !key.verify(&b[..CLAIM_BODY_LEN], &b[CLAIM_BODY_LEN..CLAIM_BODY_LEN + MAC_LEN]) {
            return Err(ClaimError::BadMac);
        }
        let u32_at = |at: usize| b.get(at..at + 4).and_then(|s| s.try_into().ok()).map_or(0, u32::from_le_bytes);
        let u64_at = |at: usize| b.get(at..at + 8).and_then(|s| s.try_into().ok()).map_or(0, u64::from_le_bytes);
        let host = u32_at(8);
        if host != index.0 {
            return Err(ClaimError::WrongHost { expected: index.0, found: host });
        }
        Ok(Some(Claim { host: index, claiming: b[5] == 1, incarnation: u64_at(12), counter: u64_at(20) }))
    }
}

/// What the witness loop sees in one round.
#[derive(Clone, Copy, Debug)]
pub struct WitnessView<'a> {
    pub me: HostId,
    /// This host runs the witness's node now.
    pub holding: bool,
    /// This host may speak for the witness: its lease is valid and it has no reason to fence
    /// (joined or not). A host that may not closes the witness (its fence does it first).
    pub may_hold: bool,
    /// The claims read in this round — a read that began after this host's last claim write
    /// completed — or `None` when the read failed. Hosts absent from it never claimed.
    pub claims: Option<&'a [Claim]>,
    pub assessment: &'a Assessment,
}

/// What the witness loop does now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WitnessStep {
    /// Nothing to change.
    Wait,
    /// Write this host's claim (then read again before opening).
    Claim,
    /// Open the witness's node here: this host's claim is on the disk and no other claim is live.
    Open,
    /// Withdraw this host's claim: another live host claims too and has the lower id, or this
    /// host may no longer hold the witness.
    Withdraw,
    /// Close the witness's node here (this host may no longer speak for the cluster), then
    /// withdraw the claim.
    Close,
}

/// Whether `host`'s claim no longer counts: it is certainly fenced, so it closed the witness and
/// opens it again only after a new claim that this host will read.
fn gone(a: &Assessment, host: HostId) -> bool {
    a.peer(host).is_some_and(|p| p.liveness == HostLiveness::Dead && p.fence_deadline.is_some_and(|d| a.now >= d))
}

/// The decision for one round.
#[must_use]
pub fn next_step(v: &WitnessView<'_>) -> WitnessStep {
    let mine = v.claims.is_some_and(|claims| claims.iter().any(|c| c.host == v.me && c.claiming));
    if !v.may_hold {
        // A claim left standing by a host that may not hold the witness (it claimed, then lost
        // its lease or landed on a losing side before it opened) would hold the other host off
        // for as long as this one lives: withdraw it.
        return match (v.holding, mine) {
            (true, _) => WitnessStep::Close,
            (false, true) => WitnessStep::Withdraw,
            (false, false) => WitnessStep::Wait,
        };
    }
    if v.holding {
        // The holder keeps it: its claim stays on the disk, so nobody else opens it.
        return WitnessStep::Wait;
    }
    let Some(claims) = v.claims else { return WitnessStep::Wait };
    // Every other claim counts, a member's or not: a host not yet in this host's view of the
    // membership (both starting, before the cluster formed) can hold the witness as well.
    // (Filtering by membership let two starting hosts open it together: simulator, first
    // two-host seeds.)
    let rivals: Vec<HostId> = claims.iter().filter(|c| c.claiming && c.host != v.me && !gone(v.assessment, c.host)).map(|c| c.host).collect();
    match (mine, rivals.is_empty()) {
        (false, true) => WitnessStep::Claim,
        (true, true) => WitnessStep::Open,
        // Two live claims: the lower id keeps its own and waits for the other to withdraw (or to
        // be proven fenced); the higher withdraws. So two hosts that claimed together do not
        // both back off forever.
        (true, false) if rivals.iter().all(|r| r.0 > v.me.0) => WitnessStep::Wait,
        (true, false) => WitnessStep::Withdraw,
        (false, false) => WitnessStep::Wait,
    }
}

/// Where a Raft log ends, in the order a voter ranks logs: the last entry's leader (term, then
/// node id), then its index. A log whose last entry has a later leader is the more up to date
/// even when it is shorter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPosition {
    pub term: u64,
    pub leader: u64,
    pub index: u64,
}

/// Whether the witness's node leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WitnessLead {
    No,
    /// It leads, its leader lease still fresh: it refuses every vote.
    LeaseFresh,
    /// It leads, for longer than its leader lease.
    LeasePassed,
}

/// What the holder of the witness sees of both Raft nodes it runs, for [`steer_election`].
#[derive(Clone, Copy, Debug)]
pub struct ElectionView {
    /// This host's node knows a leader that still counts ([`leader_heard`]).
    pub host_knows_leader: bool,
    /// (A witness that does not lead may still name the lost leader: it hears of no election
    /// it refused — so this is whether it leads itself.)
    pub witness_lead: WitnessLead,
    pub host_log: Option<LogPosition>,
    pub witness_log: Option<LogPosition>,
    /// This host may have its own node stand without a leader to hand over from: the node here
    /// has been open past its leader lease (a node just opened refuses every vote until then),
    /// and this host has not stood for this reason within an election timeout.
    pub host_may_stand: bool,
}

/// Who stands for election now, on the host that holds the witness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElectionStep {
    Nothing,
    /// The witness leads and this host's log is as up to date: a host should lead (only hosts
    /// coordinate failovers), and the witness would vote for it.
    HostStands,
    /// No leader, and the witness's log is more up to date than this host's: the witness
    /// refuses this host's vote and no other host can win without it, so the witness stands
    /// (and brings this host's log up to date), then hands over.
    WitnessStands,
    /// No leader, and this host's log is as up to date as the witness's: the witness would vote
    /// for it, so it stands now rather than at its timer's next turn. (A survivor's timer often
    /// fires just as it opens the witness, whose fresh lease refuses the vote; it then waited a
    /// whole election timeout more — the slow half of two hosts' failover times, ~1 s.)
    HostStandsLeaderless,
}

/// Whether the leader this host's node names (`leader`, a Raft node id) still counts for the
/// witness's holder: this host, the witness's node, or a peer it hears on the network. A host
/// usually takes the witness over because its peer is gone, and its node goes on naming that
/// peer until its own election timer runs out — 3.8 s after the takeover in simulator seed 33
/// of `partition-uneven-heal` (two hosts), openraft adding twice the longest timeout for a node
/// once behind — while no election was steered. A leader not heard sends this host nothing
/// either (the consensus runs on the same network), so it leads nobody here. Nor does a peer
/// heard that declared itself fenced: on a link broken one way it is still heard after it won
/// a term with the witness's vote, found itself on the losing side and let the witness go — and
/// this host's node, which saw that term, waited its election timer out (8.1 s of held writes
/// in the lab's one-way cut).
#[must_use]
pub fn leader_heard(leader: Option<u64>, me: HostId, a: &Assessment) -> bool {
    match leader {
        None => false,
        Some(l) if l == u64::from(me.0) || l == WITNESS_NODE => true,
        Some(l) => u32::try_from(l).ok().and_then(|h| a.peer(HostId(h))).is_some_and(|p| p.liveness == HostLiveness::Alive && p.fenced_epoch.is_none()),
    }
}

/// The witness never stands by itself; its holder steers it. "More up to date" is judged as the
/// voter judges it ([`LogPosition`]'s order): by index alone, a last leader's entry that reached
/// only the witness looks no newer than this host's own uncommitted entry at the same index,
/// and nobody who could win would stand.
#[must_use]
pub fn steer_election(v: &ElectionView) -> ElectionStep {
    if v.witness_lead == WitnessLead::LeasePassed && v.host_log >= v.witness_log {
        ElectionStep::HostStands
    } else if !v.host_knows_leader && v.witness_lead == WitnessLead::No && v.witness_log > v.host_log {
        ElectionStep::WitnessStands
    } else if !v.host_knows_leader && v.witness_lead == WitnessLead::No && v.host_may_stand {
        ElectionStep::HostStandsLeaderless
    } else {
        ElectionStep::Nothing
    }
}

#[cfg(test)]
mod tests;
