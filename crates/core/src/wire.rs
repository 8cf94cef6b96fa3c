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
const FLAG_FENCED: u8 = 1;

/// Size of one heartbeat-disk slot: one 4 KiB block, so O_DIRECT writes of a slot are aligned on
/// every device.
pub const SLOT_SIZE: usize = 4096;
/// The largest heartbeat datagram: header, one ack per possible peer, MAC.
pub const MAX_HEARTBEAT_LEN: usize = heartbeat_len(MAX_HOSTS - 1);

/// The size of a heartbeat carrying `acks` acks: header, ack count, acks, MAC.
#[must_use]
pub const fn heartbeat_len(acks: usize) -> usize {
    HEARTBEAT_HEADER_LEN + 1 + acks * ACK_LEN + MAC_LEN
}
const ACK_LEN: usize = 4 + 8 + 8 + 2;
const ACK_LEN_NO_AGES: usize = 4 + 8 + 8;
const HEARTBEAT_HEADER_LEN: usize = 4 + 1 + 1 + 4 + 8 + 8 + 8 + 8;
const SLOT_BODY_LEN: usize = 4 + 1 + 1 + 2 + 4 + 8 + 8 + 8 + 8 + 8;

/// The cluster secret as a MAC key. Its bytes never appear in logs.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

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
        Ok(ClusterKey(trimmed.to_vec()))
    }

    pub(crate) fn mac(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut m = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            // HMAC takes keys of any length; this arm cannot run.
            Err(_) => return [0; MAC_LEN],
        };
        m.update(data);
        m.finalize().into_bytes().into()
    }

    pub(crate) fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        match HmacSha256::new_from_slice(&self.0) {
            Ok(mut m) => {
                m.update(data);
                m.verify_slice(tag).is_ok()
            }
            Err(_) => false,
        }
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

    /// A token derived from the secret for authenticating agent-to-agent HTTP calls.
    #[must_use]
    pub fn peer_token(&self) -> String {
        self.mac(b"tandem peer rpc v1").iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One network heartbeat from `from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub from: HostId,
    /// Raised at every agent start, so sequence numbers restart safely.
    pub incarnation: u64,
    /// Raised at every heartbeat of one incarnation.
    pub seq: u64,
    /// The sender's membership epoch in committed state (informational).
    pub epoch: u64,
    /// The hosts the sender currently hears (itself included).
    pub heard: HostSet,
    /// For each peer, the last heartbeat the sender received from it, so that the peer learns
    /// which of its own heartbeats reached whom.
    pub acks: Vec<Ack>,
    /// The sender has fenced itself.
    pub fenced: bool,
}

/// "The last heartbeat I received from `host` was `seq` of its `incarnation`." The incarnation
/// matters: a host that restarts counts its sequence numbers from one again, and an ack of its
/// previous life must not be taken for an ack of its new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub host: HostId,
    pub incarnation: u64,
    pub seq: u64,
    /// How long before this heartbeat left the sender last heard `host`, in ms; saturated at
    /// `u16::MAX` (a saturated age is shorter than the truth, so the evidence it gives is later
    /// than the truth, never earlier).
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
    /// Encodes and signs the heartbeat. At most `MAX_HOSTS - 1` acks are kept.
    #[must_use]
    pub fn encode(&self, key: &ClusterKey) -> Vec<u8> {
        let acks = &self.acks[..self.acks.len().min(MAX_HOSTS - 1)];
        let mut b = Vec::with_capacity(heartbeat_len(acks.len()));
        b.extend_from_slice(HEARTBEAT_MAGIC);
        b.push(HEARTBEAT_VERSION);
        b.push(if self.fenced { FLAG_FENCED } else { 0 });
        b.extend_from_slice(&self.from.0.to_le_bytes());
        b.extend_from_slice(&self.incarnation.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.heard.0.to_le_bytes());
        b.push(acks.len() as u8);
        for a in acks {
            b.extend_from_slice(&a.host.0.to_le_bytes());
            b.extend_from_slice(&a.incarnation.to_le_bytes());
            b.extend_from_slice(&a.seq.to_le_bytes());
            b.extend_from_slice(&a.age_ms.to_le_bytes());
        }
        let tag = key.mac(&b);
        b.extend_from_slice(&tag);
        b
    }

    /// Decodes and authenticates a datagram.
    pub fn decode(b: &[u8], key: &ClusterKey) -> Result<Heartbeat, HeartbeatError> {
        if b.len() < HEARTBEAT_HEADER_LEN + 1 + MAC_LEN || b.len() > MAX_HEARTBEAT_LEN {
            return Err(HeartbeatError::BadLength(b.len()));
        }
        if &b[0..4] != HEARTBEAT_MAGIC || !matches!(b[4], HEARTBEAT_VERSION | HEARTBEAT_VERSION_NO_AGES) {
            return Err(HeartbeatError::BadMagic);
        }
        let with_ages = b[4] == HEARTBEAT_VERSION;
        let n_acks = b[HEARTBEAT_HEADER_LEN] as usize;
        let body_len = HEARTBEAT_HEADER_LEN + 1 + n_acks * if with_ages { ACK_LEN } else { ACK_LEN_NO_AGES };
        if b.len() != body_len + MAC_LEN {
            return Err(HeartbeatError::BadLength(b.len()));
        }
        if !key.verify(&b[..body_len], &b[body_len..]) {
            return Err(HeartbeatError::BadMac);
        }
        let mut at = 5;
        let flags = take::<1>(b, &mut at)[0];
        let from = u32::from_le_bytes(take(b, &mut at));
        if !HostId(from).is_valid() {
            return Err(HeartbeatError::BadHost(from));
        }
        let incarnation = u64::from_le_bytes(take(b, &mut at));
        let seq = u64::from_le_bytes(take(b, &mut at));
        let epoch = u64::from_le_bytes(take(b, &mut at));
        let heard = HostSet(u64::from_le_bytes(take(b, &mut at)));
        at += 1;
        let mut acks = Vec::with_capacity(n_acks);
        for _ in 0..n_acks {
            let h = u32::from_le_bytes(take(b, &mut at));
            let incarnation = u64::from_le_bytes(take(b, &mut at));
            let seq = u64::from_le_bytes(take(b, &mut at));
            let age_ms = if with_ages { u16::from_le_bytes(take(b, &mut at)) } else { 0 };
            if !HostId(h).is_valid() {
                return Err(HeartbeatError::BadHost(h));
            }
            acks.push(Ack { host: HostId(h), incarnation, seq, age_ms });
        }
        Ok(Heartbeat { from: HostId(from), incarnation, seq, epoch, heard, acks, fenced: flags & FLAG_FENCED != 0 })
    }
}

/// What one host last wrote into its heartbeat-disk slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSlot {
    pub host: HostId,
    pub incarnation: u64,
    /// Raised at every write; a reader sees the host alive on disk while it keeps changing.
    pub counter: u64,
    /// The host's membership epoch; a `fenced` slot speaks for this epoch only.
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
        if b.len() < SLOT_BODY_LEN + 4 + MAC_LEN {
            return SlotRead::Corrupt(SlotCorruption::BadMagic);
        }
        if b.iter().all(|x| *x == 0) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> ClusterKey {
        ClusterKey::new(b"0123456789abcdef-test").expect("key")
    }

    fn sample_heartbeat() -> Heartbeat {
        Heartbeat {
            from: HostId(2),
            incarnation: 7,
            seq: 99,
            epoch: 3,
            heard: [HostId(0), HostId(2)].into_iter().collect(),
            acks: vec![Ack { host: HostId(0), incarnation: 3, seq: 41, age_ms: 120 }, Ack { host: HostId(1), incarnation: 1, seq: 12, age_ms: u16::MAX }],
            fenced: false,
        }
    }

    #[test]
    fn weak_secret_is_refused() {
        assert_eq!(ClusterKey::new(b"  short \n").err(), Some(WeakSecret(5)));
    }

    #[test]
    fn heartbeat_round_trips() {
        let hb = sample_heartbeat();
        let bytes = hb.encode(&key());
        assert_eq!(Heartbeat::decode(&bytes, &key()), Ok(hb));
    }

    /// A heartbeat of the previous format (no ages) is still read; its acks count as heard at
    /// the moment it was sent, the later evidence.
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
        b.push(hb.acks.len() as u8);
        for a in &hb.acks {
            b.extend_from_slice(&a.host.0.to_le_bytes());
            b.extend_from_slice(&a.incarnation.to_le_bytes());
            b.extend_from_slice(&a.seq.to_le_bytes());
        }
        let tag = key().mac(&b);
        b.extend_from_slice(&tag);
        let read = Heartbeat::decode(&b, &key()).expect("a version 2 heartbeat is read");
        assert!(read.acks.iter().all(|a| a.age_ms == 0));
        assert_eq!(read.acks.len(), 2);
    }

    #[test]
    fn forged_heartbeat_is_rejected() {
        let other = ClusterKey::new(b"another-cluster-secret").expect("key");
        let bytes = sample_heartbeat().encode(&other);
        assert_eq!(Heartbeat::decode(&bytes, &key()), Err(HeartbeatError::BadMac));
        let mut tampered = sample_heartbeat().encode(&key());
        tampered[10] ^= 1;
        assert_eq!(Heartbeat::decode(&tampered, &key()), Err(HeartbeatError::BadMac));
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
            let _ = Heartbeat::decode(&bytes, &key());
            let _ = DiskSlot::decode(&bytes, HostId(0), &key());
        }

        #[test]
        fn any_heartbeat_round_trips(from in 0u32..64, inc in any::<u64>(), seq in any::<u64>(), heard in any::<u64>(),
                                      acks in proptest::collection::vec((0u32..64, any::<u64>(), any::<u64>(), any::<u16>()), 0..63), fenced in any::<bool>()) {
            let hb = Heartbeat { from: HostId(from), incarnation: inc, seq, epoch: 1, heard: HostSet(heard),
                                 acks: acks.into_iter().map(|(h, i, s, age_ms)| Ack { host: HostId(h), incarnation: i, seq: s, age_ms }).collect(), fenced };
            let bytes = hb.encode(&key());
            prop_assert!(bytes.len() <= MAX_HEARTBEAT_LEN);
            prop_assert_eq!(bytes.len(), heartbeat_len(hb.acks.len()));
            prop_assert_eq!(Heartbeat::decode(&bytes, &key()), Ok(hb));
        }
    }
}
