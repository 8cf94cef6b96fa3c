//! Byte formats that cross a host boundary: the UDP heartbeat and the heartbeat-disk slot.
//!
//! Both carry an HMAC-SHA256 over their content keyed with the cluster secret, so a host that
//! does not hold the secret cannot make another host believe a peer is alive, heard or fenced.
//! Decoding is total: any byte string yields a value or a typed error, never a panic.

use crate::hostset::{HostId, HostSet, MAX_HOSTS};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

pub(crate) const MAC_LEN: usize = 32;
const HEARTBEAT_MAGIC: &[u8; 4] = b"TDHB";
const SLOT_MAGIC: &[u8; 4] = b"TDSL";
// Version 2: acks name the incarnation they acknowledge. (Slots.)
const VERSION: u8 = 2;
// Heartbeat version 3: each ack also says how long ago its host was last heard, so a receiver
// can bound every host's evidence of that peer on its own clock. Version 2 heartbeats are still
// read, their acks taken as "heard just now" (the later evidence, so a deadline can only move
// later).
const HEARTBEAT_VERSION: u8 = 3;
const HEARTBEAT_VERSION_NO_AGES: u8 = 2;
// Heartbeat version 4: one copy per peer (see `Heartbeat`).
const HEARTBEAT_VERSION_ADDRESSED: u8 = 4;
const FLAG_FENCED: u8 = 1;
const FLAG_ACK: u8 = 2;
// Added in the addressed format without a new version: receivers before it ignore the bit and
// only count one more sequence number as missed.
const FLAG_PACED: u8 = 4;

/// Size of one heartbeat-disk slot: one 4 KiB block, so O_DIRECT writes of a slot are aligned on
/// every device.
pub const SLOT_SIZE: usize = 4096;
/// The largest heartbeat datagram that is read: a broadcast one acknowledging every possible peer.
pub const MAX_HEARTBEAT_LEN: usize = broadcast_len(MAX_HOSTS - 1);

/// The size of a broadcast heartbeat carrying `acks` acks: header, ack count, acks, MAC.
#[must_use]
pub const fn broadcast_len(acks: usize) -> usize {
    BROADCAST_HEADER_LEN + 1 + acks * ACK_LEN + MAC_LEN
}

/// The size of an addressed heartbeat giving the ages of `heard` hosts: header, ack, the set
/// of hosts with an age, the ages, MAC.
#[must_use]
pub const fn addressed_len(heard: usize) -> usize {
    ADDRESSED_HEADER_LEN + 2 * heard + MAC_LEN
}
const ACK_LEN: usize = 4 + 8 + 8 + 2;
const ACK_LEN_NO_AGES: usize = 4 + 8 + 8;
const BROADCAST_HEADER_LEN: usize = 4 + 1 + 1 + 4 + 8 + 8 + 8 + 8;
// Magic, version, flags, from, to, incarnation, seq, epoch, heard, ack (incarnation, seq), aged hosts.
const ADDRESSED_HEADER_LEN: usize = 4 + 1 + 1 + 4 + 4 + 8 + 8 + 8 + 8 + 16 + 8;
const SLOT_BODY_LEN: usize = 4 + 1 + 1 + 2 + 4 + 8 + 8 + 8 + 8 + 8;
/// The bytes at the start of a slot that [`DiskSlot::decode`] reads when they are not all zero
/// (body, CRC, MAC); the rest of the block is padding it never looks at.
pub const SLOT_RECORD_LEN: usize = SLOT_BODY_LEN + 4 + MAC_LEN;

/// The length of each side's nonce in the copy channel's handshake.
pub const COPY_NONCE_LEN: usize = 32;

/// Which end of the copy channel a proof comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopySide {
    /// The relay in front of the mirroring QEMU.
    Client,
    /// The gate in front of the copy server.
    Server,
}

/// The cluster secret as a MAC key. Its bytes never appear in logs. The HMAC state is keyed once:
/// every MAC then starts from a copy instead of hashing the key's pads again (two of the four
/// SHA-256 blocks of a heartbeat's MAC).
#[derive(Clone)]
pub struct ClusterKey(HmacSha256);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Why a cluster secret is refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("cluster secret is {0} bytes; at least 16 are required")]
pub struct WeakSecret(pub usize);

impl ClusterKey {
    /// A key from the secret file's content (surrounding whitespace ignored).
    pub fn new(secret: &[u8]) -> Result<ClusterKey, WeakSecret> {
        let trimmed = secret.trim_ascii();
        if trimmed.len() < 16 {
            return Err(WeakSecret(trimmed.len()));
        }
        // HMAC takes keys of any length, so this cannot fail; were it to, the secret is refused.
        HmacSha256::new_from_slice(trimmed).map(ClusterKey).map_err(|_| WeakSecret(trimmed.len()))
    }

    pub(crate) fn mac(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut m = self.0.clone();
        m.update(data);
        m.finalize().into_bytes().into()
    }

    pub(crate) fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut m = self.0.clone();
        m.update(data);
        m.verify_slice(tag).is_ok()
    }

    /// Names the cluster without revealing its secret: the heartbeat disk's header carries it.
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out.copy_from_slice(&self.mac(b"tandem cluster fingerprint v1")[..16]);
        out
    }

    /// Proof that whoever answers a join challenge holds the cluster secret: a MAC over the
    /// challenge and the identity it reports, so neither can be replayed or swapped.
    #[must_use]
    pub fn join_proof(&self, challenge: &str, identity: &[u8]) -> String {
        let mut data = b"tandem join proof v1\0".to_vec();
        data.extend_from_slice(challenge.as_bytes());
        data.push(0);
        data.extend_from_slice(identity);
        self.mac(&data).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Checks a [`ClusterKey::join_proof`] in constant time.
    #[must_use]
    pub fn verify_join_proof(&self, challenge: &str, identity: &[u8], proof: &str) -> bool {
        let expected = self.join_proof(challenge, identity);
        expected.len() == proof.len() && expected.bytes().zip(proof.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// One side's proof in the copy channel's handshake (a relay reaching a copy server of
    /// another site): a MAC over both sides' fresh nonces, labelled by the side, so a proof is
    /// never replayed on another connection nor reflected back to its sender.
    #[must_use]
    pub fn copy_proof(&self, side: CopySide, server_nonce: &[u8; COPY_NONCE_LEN], client_nonce: &[u8; COPY_NONCE_LEN]) -> [u8; MAC_LEN] {
        let label: &[u8] = match side {
            CopySide::Client => b"tandem copy client v1\0",
            CopySide::Server => b"tandem copy server v1\0",
        };
        let mut data = Vec::with_capacity(label.len() + 2 * COPY_NONCE_LEN);
        data.extend_from_slice(label);
        data.extend_from_slice(server_nonce);
        data.extend_from_slice(client_nonce);
        self.mac(&data)
    }

    /// Checks a [`ClusterKey::copy_proof`] in constant time.
    #[must_use]
    pub fn verify_copy_proof(&self, side: CopySide, server_nonce: &[u8; COPY_NONCE_LEN], client_nonce: &[u8; COPY_NONCE_LEN], proof: &[u8]) -> bool {
        let expected = self.copy_proof(side, server_nonce, client_nonce);
        expected.len() == proof.len() && expected.iter().zip(proof).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// A token derived from the secret for authenticating agent-to-agent HTTP calls.
    #[must_use]
    pub fn peer_token(&self) -> String {
        self.mac(b"tandem peer rpc v1").iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One network heartbeat from `from`, in the copy addressed to `to`.
///
/// Each peer gets a copy of its own: it carries the acknowledgement only that peer needs (the
/// last of its heartbeats the sender received) and, for every host, only how long ago the
/// sender last heard it. A heartbeat that acknowledged every peer in full was 1,461 bytes at 64
/// hosts, and every receiver verified and walked all of it; the addressed copy is 228.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub from: HostId,
    /// Raised at every agent start, so sequence numbers restart safely.
    pub incarnation: u64,
    /// Raised at every heartbeat of one incarnation.
    pub seq: u64,
    /// The sender's membership epoch; when `fenced`, the epoch its fence runs through (it runs
    /// no VM in this epoch or any before it again).
    pub epoch: u64,
    /// The hosts the sender currently hears (itself included): the set its slot would carry.
    /// Receivers date the evidence of others' life by `ages`, and take this set as the
    /// sender's word in the partition decision when it is newer than its slot; the broadcast
    /// format carries the same set.
    pub heard: HostSet,
    /// The sender has fenced itself.
    pub fenced: bool,
    /// The host this copy is for. A copy received by any other host is refused, so a copy
    /// cannot be replayed to another host as an acknowledgement of its heartbeats.
    pub to: HostId,
    /// The last heartbeat of `to` that the sender received, so that `to` learns which of its
    /// own heartbeats reached whom.
    pub ack: Option<Ack>,
    /// How long before this heartbeat left the sender last heard each host.
    pub ages: HeardAges,
    /// The sender left `to` out of its previous heartbeat on purpose (a calm cluster's paced
    /// copies, see `Liveness::copy_for`): that sequence number is not a loss.
    pub paced: bool,
}

/// "The last heartbeat I received from you was `seq` of your `incarnation`." The incarnation
/// matters: a host that restarts counts its sequence numbers from one again, and an ack of its
/// previous life must not be taken for an ack of its new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub incarnation: u64,
    pub seq: u64,
}

/// For each host the sender has heard, how long before sending it last did, in ms; saturated at
/// `u16::MAX` (a saturated age is shorter than the truth, so the evidence it gives is later than
/// the truth, never earlier). Indexed by host id, so reading one costs no search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeardAges {
    hosts: HostSet,
    ms: [u16; MAX_HOSTS],
}

impl Default for HeardAges {
    fn default() -> Self {
        HeardAges { hosts: HostSet::EMPTY, ms: [0; MAX_HOSTS] }
    }
}

impl HeardAges {
    /// Records that `host` was last heard `ms` ago (hosts outside the valid range are ignored).
    pub fn set(&mut self, host: HostId, ms: u64) {
        if let Some(slot) = self.ms.get_mut(host.0 as usize) {
            *slot = ms.min(u64::from(u16::MAX)) as u16;
            self.hosts.insert(host);
        }
    }

    /// How long ago `host` was last heard, if it was.
    #[must_use]
    pub fn get(&self, host: HostId) -> Option<u16> {
        if self.hosts.contains(host) {
            self.ms.get(host.0 as usize).copied()
        } else {
            None
        }
    }

    /// Every host heard, with its age, in host order.
    pub fn iter(&self) -> impl Iterator<Item = (HostId, u16)> + '_ {
        self.hosts.iter().filter_map(|h| self.get(h).map(|ms| (h, ms)))
    }
}

/// The wire formats a heartbeat can take. A host reads all of them and answers each peer in the
/// format that peer last sent, so hosts of the previous release keep hearing upgraded ones
/// during a rolling upgrade.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeartbeatFormat {
    /// Version 4: one copy per peer.
    #[default]
    Addressed,
    /// Versions 2 and 3: one datagram for all, acknowledging every peer in full (version 2
    /// without ages).
    Broadcast,
}

/// A peer's acknowledgement as the broadcast format carries it: one per peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BroadcastAck {
    pub host: HostId,
    pub ack: Ack,
    pub age_ms: u16,
}

/// Why a datagram is not a heartbeat we accept.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeartbeatError {
    #[error("heartbeat of {0} bytes is outside the valid sizes")]
    BadLength(usize),
    #[error("not a Tandem heartbeat (bad magic or version)")]
    BadMagic,
    #[error("heartbeat names host {0}, outside 0..{MAX_HOSTS}")]
    BadHost(u32),
    #[error("heartbeat MAC does not verify: forged or from another cluster")]
    BadMac,
}

fn take<const N: usize>(b: &[u8], at: &mut usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(*at..*at + N) {
        out.copy_from_slice(src);
    }
    *at += N;
    out
}

impl Heartbeat {
    /// Encodes and signs the copy for `to` (the addressed format, version 4).
    #[must_use]
    pub fn encode(&self, key: &ClusterKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(addressed_len(self.ages.hosts.len()));
        self.encode_into(key, &mut b);
        b
    }

    /// [`Heartbeat::encode`] into a buffer that is cleared first, so one buffer serves every peer.
    pub fn encode_into(&self, key: &ClusterKey, b: &mut Vec<u8>) {
        b.clear();
        b.extend_from_slice(HEARTBEAT_MAGIC);
        b.push(HEARTBEAT_VERSION_ADDRESSED);
        b.push(if self.fenced { FLAG_FENCED } else { 0 } | if self.ack.is_some() { FLAG_ACK } else { 0 } | if self.paced { FLAG_PACED } else { 0 });
        b.extend_from_slice(&self.from.0.to_le_bytes());
        b.extend_from_slice(&self.to.0.to_le_bytes());
        for x in [self.incarnation, self.seq, self.epoch, self.heard.0] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        let ack = self.ack.unwrap_or(Ack { incarnation: 0, seq: 0 });
        b.extend_from_slice(&ack.incarnation.to_le_bytes());
        b.extend_from_slice(&ack.seq.to_le_bytes());
        b.extend_from_slice(&self.ages.hosts.0.to_le_bytes());
        for (_, ms) in self.ages.iter() {
            b.extend_from_slice(&ms.to_le_bytes());
        }
        let tag = key.mac(b);
        b.extend_from_slice(&tag);
    }

    /// Encodes and signs the heartbeat in the broadcast format (version 3), for peers of the
    /// previous release: `to`, `ack` and `ages` are replaced by `acks`, one per peer (at most
    /// `MAX_HOSTS - 1` are kept).
    #[must_use]
    pub fn encode_broadcast(&self, acks: &[BroadcastAck], key: &ClusterKey) -> Vec<u8> {
        let acks = &acks[..acks.len().min(MAX_HOSTS - 1)];
        let mut b = Vec::with_capacity(broadcast_len(acks.len()));
        b.extend_from_slice(HEARTBEAT_MAGIC);
        b.push(HEARTBEAT_VERSION);
        b.push(if self.fenced { FLAG_FENCED } else { 0 });
        b.extend_from_slice(&self.from.0.to_le_bytes());
        for x in [self.incarnation, self.seq, self.epoch, self.heard.0] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b.push(acks.len() as u8);
        for a in acks {
            b.extend_from_slice(&a.host.0.to_le_bytes());
            b.extend_from_slice(&a.ack.incarnation.to_le_bytes());
            b.extend_from_slice(&a.ack.seq.to_le_bytes());
            b.extend_from_slice(&a.age_ms.to_le_bytes());
        }
        let tag = key.mac(&b);
        b.extend_from_slice(&tag);
        b
    }

    /// Decodes and authenticates a datagram received by `me`, in any format. A broadcast one is
    /// read as the copy for `me`: its ack for `me`, and the ages of all its acks (version 2
    /// carries none; its acks count as heard when it was sent, the later evidence, so a
    /// deadline can only move later).
    pub fn decode(b: &[u8], key: &ClusterKey, me: HostId) -> Result<(Heartbeat, HeartbeatFormat), HeartbeatError> {
        if b.len() < 5 || &b[0..4] != HEARTBEAT_MAGIC {
            return Err(HeartbeatError::BadMagic);
        }
        match b[4] {
            HEARTBEAT_VERSION_ADDRESSED => Self::decode_addressed(b, key).map(|hb| (hb, HeartbeatFormat::Addressed)),
            HEARTBEAT_VERSION | HEARTBEAT_VERSION_NO_AGES => Self::decode_broadcast(b, key, me).map(|hb| (hb, HeartbeatFormat::Broadcast)),
            _ => Err(HeartbeatError::BadMagic),
        }
    }

    fn decode_addressed(b: &[u8], key: &ClusterKey) -> Result<Heartbeat, HeartbeatError> {
        if b.len() < ADDRESSED_HEADER_LEN + MAC_LEN || b.len() > MAX_HEARTBEAT_LEN {
            return Err(HeartbeatError::BadLength(b.len()));
        }
        let mut at = ADDRESSED_HEADER_LEN - 8;
        let hosts = HostSet(u64::from_le_bytes(take(b, &mut at)));
        let body_len = ADDRESSED_HEADER_LEN + 2 * hosts.len();
        authenticate(b, body_len, key)?;
        let mut at = 5;
        let flags = take::<1>(b, &mut at)[0];
        let from = valid_host(u32::from_le_bytes(take(b, &mut at)))?;
        let to = valid_host(u32::from_le_bytes(take(b, &mut at)))?;
        let [incarnation, seq, epoch, heard, ack_incarnation, ack_seq] = [(); 6].map(|()| u64::from_le_bytes(take(b, &mut at)));
        at += 8;
        let mut ages = HeardAges::default();
        for h in hosts.iter() {
            ages.set(h, u64::from(u16::from_le_bytes(take(b, &mut at))));
        }
        Ok(Heartbeat {
            from,
            incarnation,
            seq,
            epoch,
            heard: HostSet(heard),
            fenced: flags & FLAG_FENCED != 0,
            to,
            ack: (flags & FLAG_ACK != 0).then_some(Ack { incarnation: ack_incarnation, seq: ack_seq }),
            ages,
            paced: flags & FLAG_PACED != 0,
        })
    }

    fn decode_broadcast(b: &[u8], key: &ClusterKey, me: HostId) -> Result<Heartbeat, HeartbeatError> {
        if b.len() < BROADCAST_HEADER_LEN + 1 + MAC_LEN || b.len() > MAX_HEARTBEAT_LEN {
            return Err(HeartbeatError::BadLength(b.len()));
        }
        let with_ages = b[4] == HEARTBEAT_VERSION;
        let n_acks = b[BROADCAST_HEADER_LEN] as usize;
        let body_len = BROADCAST_HEADER_LEN + 1 + n_acks * if with_ages { ACK_LEN } else { ACK_LEN_NO_AGES };
        authenticate(b, body_len, key)?;
        let mut at = 5;
        let flags = take::<1>(b, &mut at)[0];
        let from = valid_host(u32::from_le_bytes(take(b, &mut at)))?;
        let [incarnation, seq, epoch, heard] = [(); 4].map(|()| u64::from_le_bytes(take(b, &mut at)));
        at += 1;
        let mut ack = None;
        let mut ages = HeardAges::default();
        for _ in 0..n_acks {
            let h = valid_host(u32::from_le_bytes(take(b, &mut at)))?;
            let this = Ack { incarnation: u64::from_le_bytes(take(b, &mut at)), seq: u64::from_le_bytes(take(b, &mut at)) };
            let age_ms = if with_ages { u16::from_le_bytes(take(b, &mut at)) } else { 0 };
            if h == me {
                ack = Some(this);
            }
            ages.set(h, u64::from(age_ms));
        }
        Ok(Heartbeat { from, incarnation, seq, epoch, heard: HostSet(heard), fenced: flags & FLAG_FENCED != 0, to: me, ack, ages, paced: false })
    }
}

/// Checks that `b` is a body of `body_len` bytes followed by its MAC.
fn authenticate(b: &[u8], body_len: usize, key: &ClusterKey) -> Result<(), HeartbeatError> {
    if b.len() != body_len + MAC_LEN {
        return Err(HeartbeatError::BadLength(b.len()));
    }
    if !key.verify(&b[..body_len], &b[body_len..]) {
        return Err(HeartbeatError::BadMac);
    }
    Ok(())
}

fn valid_host(h: u32) -> Result<HostId, HeartbeatError> {
    if HostId(h).is_valid() {
        Ok(HostId(h))
    } else {
        Err(HeartbeatError::BadHost(h))
    }
}

/// What one host last wrote into its heartbeat-disk slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSlot {
    pub host: HostId,
    pub incarnation: u64,
    /// Raised at every write; a reader sees the host alive on disk while it keeps changing.
    pub counter: u64,
    /// The host's membership epoch; a `fenced` slot speaks for this epoch and every earlier one
    /// (the writer runs no VM in them again).
    pub epoch: u64,
    /// The hosts the writer hears on the network (itself included).
    pub heard: HostSet,
    pub fenced: bool,
    /// The writer's clock at the write, for display only.
    pub written_at_ms: u64,
}

/// What reading one slot gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotRead {
    /// Never written (all zeros).
    Empty,
    Valid(DiskSlot),
    /// Not a valid slot: damaged, torn, or forged. It is reported and not trusted.
    Corrupt(SlotCorruption),
}

/// How a slot failed its checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum SlotCorruption {
    #[error("bad magic or version")]
    BadMagic,
    #[error("checksum mismatch")]
    BadChecksum,
    #[error("MAC does not verify (forged, or written with another secret)")]
    BadMac,
    #[error("slot {found} is stored where slot {expected} belongs")]
    WrongHost { expected: u32, found: u32 },
}

impl DiskSlot {
    /// Encodes the slot into one block: body, CRC32 of the body, MAC of body and CRC, zeros.
    #[must_use]
    pub fn encode(&self, key: &ClusterKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(SLOT_SIZE);
        b.extend_from_slice(SLOT_MAGIC);
        b.push(VERSION);
        b.push(if self.fenced { FLAG_FENCED } else { 0 });
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.host.0.to_le_bytes());
        b.extend_from_slice(&self.incarnation.to_le_bytes());
        b.extend_from_slice(&self.counter.to_le_bytes());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.heard.0.to_le_bytes());
        b.extend_from_slice(&self.written_at_ms.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let tag = key.mac(&b);
        b.extend_from_slice(&tag);
        b.resize(SLOT_SIZE, 0);
        b
    }

    /// Decodes the block stored at slot `index`.
    #[must_use]
    pub fn decode(b: &[u8], index: HostId, key: &ClusterKey) -> SlotRead {
        if b.len() < SLOT_RECORD_LEN {
            return SlotRead::Corrupt(SlotCorruption::BadMagic);
        }
        if all_zero(b) {
            return SlotRead::Empty;
        }
        if &b[0..4] != SLOT_MAGIC || b[4] != VERSION {
            return SlotRead::Corrupt(SlotCorruption::BadMagic);
        }
        let crc_at = SLOT_BODY_LEN;
        let mut at = crc_at;
        let crc = u32::from_le_bytes(take(b, &mut at));
        if crc32fast::hash(&b[..crc_at]) != crc {
            return SlotRead::Corrupt(SlotCorruption::BadChecksum);
        }
        if !key.verify(&b[..crc_at + 4], &b[crc_at + 4..crc_at + 4 + MAC_LEN]) {
            return SlotRead::Corrupt(SlotCorruption::BadMac);
        }
        let mut at = 5;
        let flags = take::<1>(b, &mut at)[0];
        at += 2;
        let host = u32::from_le_bytes(take(b, &mut at));
        if host != index.0 {
            return SlotRead::Corrupt(SlotCorruption::WrongHost { expected: index.0, found: host });
        }
        SlotRead::Valid(DiskSlot {
            host: HostId(host),
            incarnation: u64::from_le_bytes(take(b, &mut at)),
            counter: u64::from_le_bytes(take(b, &mut at)),
            epoch: u64::from_le_bytes(take(b, &mut at)),
            heard: HostSet(u64::from_le_bytes(take(b, &mut at))),
            written_at_ms: u64::from_le_bytes(take(b, &mut at)),
            fenced: flags & FLAG_FENCED != 0,
        })
    }
}

/// Whether every byte is zero. An OR over the whole block, without an early exit, so the
/// compiler vectorizes it: every empty slot of the heartbeat disk (4 KiB each, most of the area
/// in a small cluster) is checked at every round.
fn all_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, x| acc | x) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> ClusterKey {
        ClusterKey::new(b"0123456789abcdef-test").expect("key")
    }

    #[test]
    fn a_copy_proof_holds_only_for_its_side_its_nonces_and_its_key() {
        let (k, other) = (key(), ClusterKey::new(b"another cluster's secret").expect("key"));
        let (s, c) = ([1u8; COPY_NONCE_LEN], [2u8; COPY_NONCE_LEN]);
        let proof = k.copy_proof(CopySide::Client, &s, &c);
        assert!(k.verify_copy_proof(CopySide::Client, &s, &c, &proof));
        // Reflected to the other side, replayed with another nonce, made with another key, cut
        // short: refused.
        assert!(!k.verify_copy_proof(CopySide::Server, &s, &c, &proof));
        assert!(!k.verify_copy_proof(CopySide::Client, &[3u8; COPY_NONCE_LEN], &c, &proof));
        assert!(!k.verify_copy_proof(CopySide::Client, &s, &[3u8; COPY_NONCE_LEN], &proof));
        assert!(!other.verify_copy_proof(CopySide::Client, &s, &c, &proof));
        assert!(!k.verify_copy_proof(CopySide::Client, &s, &c, &proof[..31]));
        assert_ne!(k.copy_proof(CopySide::Server, &s, &c), proof);
    }

    fn sample_heartbeat() -> Heartbeat {
        let mut ages = HeardAges::default();
        ages.set(HostId(0), 120);
        ages.set(HostId(1), 1_000_000);
        Heartbeat {
            from: HostId(2),
            incarnation: 7,
            seq: 99,
            epoch: 3,
            heard: [HostId(0), HostId(2)].into_iter().collect(),
            fenced: false,
            to: HostId(0),
            ack: Some(Ack { incarnation: 3, seq: 41 }),
            ages,
            paced: false,
        }
    }

    #[test]
    fn weak_secret_is_refused() {
        assert_eq!(ClusterKey::new(b"  short \n").err(), Some(WeakSecret(5)));
    }

    #[test]
    fn heartbeat_round_trips() {
        let hb = Heartbeat { paced: true, ..sample_heartbeat() };
        let bytes = hb.encode(&key());
        assert_eq!(bytes.len(), addressed_len(2));
        assert_eq!(hb.ages.get(HostId(1)), Some(u16::MAX), "a long age saturates");
        assert_eq!(Heartbeat::decode(&bytes, &key(), HostId(0)), Ok((hb, HeartbeatFormat::Addressed)));
    }

    /// The addressed copy for the largest cluster is a sixth of the broadcast heartbeat.
    #[test]
    fn an_addressed_heartbeat_is_small() {
        assert_eq!(addressed_len(MAX_HOSTS - 1), 228);
        assert_eq!(broadcast_len(MAX_HOSTS - 1), 1461);
    }

    /// A broadcast heartbeat (the previous release's) is read as the copy for the receiver: its
    /// ack for the receiver, every ack's age.
    #[test]
    fn broadcast_heartbeats_are_read_as_the_receivers_copy() {
        let hb = sample_heartbeat();
        let acks = [
            BroadcastAck { host: HostId(0), ack: Ack { incarnation: 3, seq: 41 }, age_ms: 120 },
            BroadcastAck { host: HostId(1), ack: Ack { incarnation: 1, seq: 12 }, age_ms: u16::MAX },
        ];
        let bytes = hb.encode_broadcast(&acks, &key());
        assert_eq!(bytes.len(), broadcast_len(2));
        let (for_0, format) = Heartbeat::decode(&bytes, &key(), HostId(0)).expect("a version 3 heartbeat is read");
        assert_eq!(format, HeartbeatFormat::Broadcast);
        assert_eq!(for_0, hb);
        let (for_1, _) = Heartbeat::decode(&bytes, &key(), HostId(1)).expect("read");
        assert_eq!((for_1.to, for_1.ack), (HostId(1), Some(Ack { incarnation: 1, seq: 12 })));
        let (for_5, _) = Heartbeat::decode(&bytes, &key(), HostId(5)).expect("read");
        assert_eq!(for_5.ack, None, "no ack for a host it does not name");
    }

    /// A heartbeat of version 2 (no ages) is still read; its acks count as heard at the moment
    /// it was sent, the later evidence.
    #[test]
    fn heartbeats_without_ages_are_read_as_heard_just_now() {
        let hb = sample_heartbeat();
        let mut b = Vec::new();
        b.extend_from_slice(HEARTBEAT_MAGIC);
        b.push(HEARTBEAT_VERSION_NO_AGES);
        b.push(0);
        b.extend_from_slice(&hb.from.0.to_le_bytes());
        for x in [hb.incarnation, hb.seq, hb.epoch, hb.heard.0] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b.push(2);
        for (h, inc, seq) in [(0u32, 3u64, 41u64), (1, 1, 12)] {
            b.extend_from_slice(&h.to_le_bytes());
            b.extend_from_slice(&inc.to_le_bytes());
            b.extend_from_slice(&seq.to_le_bytes());
        }
        let tag = key().mac(&b);
        b.extend_from_slice(&tag);
        let (read, _) = Heartbeat::decode(&b, &key(), HostId(0)).expect("a version 2 heartbeat is read");
        assert_eq!(read.ages.iter().collect::<Vec<_>>(), vec![(HostId(0), 0), (HostId(1), 0)]);
        assert_eq!(read.ack, Some(Ack { incarnation: 3, seq: 41 }));
    }

    #[test]
    fn forged_heartbeat_is_rejected() {
        let other = ClusterKey::new(b"another-cluster-secret").expect("key");
        let bytes = sample_heartbeat().encode(&other);
        assert_eq!(Heartbeat::decode(&bytes, &key(), HostId(0)), Err(HeartbeatError::BadMac));
        let mut tampered = sample_heartbeat().encode(&key());
        tampered[10] ^= 1;
        assert_eq!(Heartbeat::decode(&tampered, &key(), HostId(0)), Err(HeartbeatError::BadMac));
        let mut bigger = sample_heartbeat().encode(&key());
        bigger[ADDRESSED_HEADER_LEN - 8] |= 0x80;
        assert_eq!(Heartbeat::decode(&bigger, &key(), HostId(0)), Err(HeartbeatError::BadLength(bigger.len())), "the aged-host set says the length");
    }

    #[test]
    fn slot_round_trips_and_detects_damage() {
        let slot = DiskSlot { host: HostId(5), incarnation: 2, counter: 1000, epoch: 4, heard: HostSet(0b101101), fenced: true, written_at_ms: 123 };
        let bytes = slot.encode(&key());
        assert_eq!(bytes.len(), SLOT_SIZE);
        assert_eq!(DiskSlot::decode(&bytes, HostId(5), &key()), SlotRead::Valid(slot));
        assert_eq!(DiskSlot::decode(&bytes, HostId(4), &key()), SlotRead::Corrupt(SlotCorruption::WrongHost { expected: 4, found: 5 }));
        let mut damaged = bytes.clone();
        damaged[20] ^= 0x40;
        assert_eq!(DiskSlot::decode(&damaged, HostId(5), &key()), SlotRead::Corrupt(SlotCorruption::BadChecksum));
        let forged = slot.encode(&ClusterKey::new(b"another-cluster-secret").expect("key"));
        assert_eq!(DiskSlot::decode(&forged, HostId(5), &key()), SlotRead::Corrupt(SlotCorruption::BadMac));
        assert_eq!(DiskSlot::decode(&vec![0u8; SLOT_SIZE], HostId(5), &key()), SlotRead::Empty);
        assert_eq!(DiskSlot::decode(&[1, 2, 3], HostId(5), &key()), SlotRead::Corrupt(SlotCorruption::BadMagic));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = Heartbeat::decode(&bytes, &key(), HostId(0));
            let _ = DiskSlot::decode(&bytes, HostId(0), &key());
        }

        #[test]
        fn any_heartbeat_round_trips(from in 0u32..64, to in 0u32..64, inc in any::<u64>(), seq in any::<u64>(), heard in any::<u64>(),
                                      ack in proptest::option::of((any::<u64>(), any::<u64>())),
                                      ages in proptest::collection::vec((0u32..64, any::<u16>()), 0..64), fenced in any::<bool>(), paced in any::<bool>()) {
            let mut heard_ages = HeardAges::default();
            for (h, ms) in ages {
                heard_ages.set(HostId(h), u64::from(ms));
            }
            let hb = Heartbeat { from: HostId(from), incarnation: inc, seq, epoch: 1, heard: HostSet(heard), fenced, to: HostId(to),
                                 ack: ack.map(|(incarnation, seq)| Ack { incarnation, seq }), ages: heard_ages, paced };
            let bytes = hb.encode(&key());
            prop_assert!(bytes.len() <= MAX_HEARTBEAT_LEN);
            prop_assert_eq!(bytes.len(), addressed_len(heard_ages.iter().count()));
            prop_assert_eq!(Heartbeat::decode(&bytes, &key(), HostId(to)), Ok((hb, HeartbeatFormat::Addressed)));
        }
    }
}
