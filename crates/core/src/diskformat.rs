//! The heartbeat disk's layout and the header that marks a disk as formatted for one cluster.
//!
//! A disk is formatted once, explicitly (`tandem disk format`): block 0 holds a header naming the
//! cluster (a fingerprint of its secret, never the secret) and the layout; the slots follow, one
//! block per host. An agent refuses to start on a disk without that header, of another cluster,
//! or of another layout — a path typo or a mount missing at boot must not turn a local file into
//! a "heartbeat disk" that only this host writes. Every read checks the header again, so a disk
//! swapped underneath a running agent reads as failed, not as a silent cluster.

use crate::hostset::{HostId, MAX_HOSTS};
use crate::wire::{ClusterKey, SLOT_RECORD_LEN, SLOT_SIZE};
use thiserror::Error;

const HEADER_MAGIC: &[u8; 8] = b"TNDMDISK";
/// Layout 1 had no header and slots from block 0; layout 2 puts the header in block 0.
pub const DISK_LAYOUT: u32 = 2;
/// Size of the header block.
pub const HEADER_SIZE: usize = SLOT_SIZE;
/// Size of the whole heartbeat area: header and one slot per possible host.
pub const DISK_SIZE: usize = HEADER_SIZE + SLOT_SIZE * MAX_HOSTS;
const FINGERPRINT_LEN: usize = 16;
const BODY_LEN: usize = 8 + 4 + 4 + 4 + FINGERPRINT_LEN;
/// The bytes of the header block that are looked at: body, CRC32, MAC.
pub const HEADER_RECORD_LEN: usize = BODY_LEN + 4 + crate::wire::MAC_LEN;
/// What a read of the heartbeat area hands over (an *area image*): the header's record and
/// every slot's record, one after another — all a reader looks at, a twenty-fifth of the area.
/// A read copies this much out of the block-aligned buffer it read into, not the 260 KiB area.
pub const AREA_IMAGE_LEN: usize = HEADER_RECORD_LEN + MAX_HOSTS * SLOT_RECORD_LEN;

/// The area image (see [`AREA_IMAGE_LEN`]) of a whole heartbeat area (`DISK_SIZE` bytes). An
/// empty slot (its record all zeros) whose block is not all zeros past the record is damaged:
/// its record in the image is all `0xFF`, which decodes as a corrupt slot, so the damage is
/// not hidden by what the image leaves out.
#[must_use]
pub fn area_image(area: &[u8]) -> Vec<u8> {
    let mut image = Vec::with_capacity(AREA_IMAGE_LEN);
    image.extend_from_slice(&area[..HEADER_RECORD_LEN.min(area.len())]);
    for slot in area.get(HEADER_SIZE..).unwrap_or_default().chunks(SLOT_SIZE).take(MAX_HOSTS) {
        let (record, padding) = slot.split_at(SLOT_RECORD_LEN.min(slot.len()));
        if record.iter().all(|b| *b == 0) && padding.iter().any(|b| *b != 0) {
            image.extend(std::iter::repeat_n(0xFF, record.len()));
        } else {
            image.extend_from_slice(record);
        }
    }
    image
}

/// The slot records of an area image, in host order.
pub fn image_slots(image: &[u8]) -> impl Iterator<Item = &[u8]> {
    image.get(HEADER_RECORD_LEN..).unwrap_or_default().chunks(SLOT_RECORD_LEN)
}

/// Byte offset of `host`'s slot.
#[must_use]
pub fn slot_offset(host: HostId) -> u64 {
    (HEADER_SIZE + host.0 as usize * SLOT_SIZE) as u64
}

/// What block 0 of a formatted heartbeat disk says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskHeader {
    pub layout: u32,
    pub slot_size: u32,
    pub slots: u32,
    /// Names the cluster: derived from its secret, so it reveals nothing about it.
    pub cluster: [u8; FINGERPRINT_LEN],
}

/// Why a disk is not this cluster's heartbeat disk.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("the disk is not formatted as a Tandem heartbeat disk (no header in its first block); format it once with `tandem disk format`")]
    Unformatted,
    #[error("the disk header is damaged (checksum mismatch)")]
    Damaged,
    #[error("the disk belongs to another cluster (fingerprint {found}, this cluster's is {ours})")]
    OtherCluster { found: String, ours: String },
    #[error("the disk header does not verify with this cluster's secret (forged, or the secret changed)")]
    BadMac,
    #[error("the disk has layout {found} ({slots} slots of {slot_size} bytes); this agent uses layout {DISK_LAYOUT} ({MAX_HOSTS} slots of {SLOT_SIZE} bytes)")]
    OtherLayout { found: u32, slots: u32, slot_size: u32 },
    #[error("the disk is {0} bytes, smaller than the {DISK_SIZE} bytes of the heartbeat area")]
    TooSmall(usize),
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl DiskHeader {
    /// The header of this agent's layout for the cluster of `key`.
    #[must_use]
    pub fn for_cluster(key: &ClusterKey) -> DiskHeader {
        DiskHeader { layout: DISK_LAYOUT, slot_size: SLOT_SIZE as u32, slots: MAX_HOSTS as u32, cluster: key.fingerprint() }
    }

    /// Encodes the header block: body, CRC32, MAC, zeros.
    #[must_use]
    pub fn encode(&self, key: &ClusterKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_SIZE);
        b.extend_from_slice(HEADER_MAGIC);
        b.extend_from_slice(&self.layout.to_le_bytes());
        b.extend_from_slice(&self.slot_size.to_le_bytes());
        b.extend_from_slice(&self.slots.to_le_bytes());
        b.extend_from_slice(&self.cluster);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let tag = key.mac(&b);
        b.extend_from_slice(&tag);
        b.resize(HEADER_SIZE, 0);
        b
    }

    /// Checks that an area image (see [`AREA_IMAGE_LEN`]) is of a heartbeat disk of this
    /// cluster and this layout.
    pub fn check_image(image: &[u8], key: &ClusterKey) -> Result<DiskHeader, HeaderError> {
        if image.len() != AREA_IMAGE_LEN {
            return Err(HeaderError::TooSmall(image.len()));
        }
        Self::check_record(image, key)
    }

    /// Checks that `area` (at least the header block) is a heartbeat disk of this cluster and
    /// this layout; the error says which check failed.
    pub fn check(area: &[u8], key: &ClusterKey) -> Result<DiskHeader, HeaderError> {
        if area.len() < HEADER_SIZE {
            return Err(HeaderError::TooSmall(area.len()));
        }
        let h = Self::check_record(area, key)?;
        if area.len() > HEADER_SIZE && area.len() < DISK_SIZE {
            return Err(HeaderError::TooSmall(area.len()));
        }
        Ok(h)
    }

    /// The checks of the header's record (the first [`HEADER_RECORD_LEN`] bytes of `area`).
    fn check_record(area: &[u8], key: &ClusterKey) -> Result<DiskHeader, HeaderError> {
        if area.len() < HEADER_RECORD_LEN {
            return Err(HeaderError::TooSmall(area.len()));
        }
        if &area[..8] != HEADER_MAGIC {
            return Err(HeaderError::Unformatted);
        }
        let crc = u32::from_le_bytes([area[BODY_LEN], area[BODY_LEN + 1], area[BODY_LEN + 2], area[BODY_LEN + 3]]);
        if crc32fast::hash(&area[..BODY_LEN]) != crc {
            return Err(HeaderError::Damaged);
        }
        let word = |at: usize| u32::from_le_bytes([area[at], area[at + 1], area[at + 2], area[at + 3]]);
        let mut cluster = [0u8; FINGERPRINT_LEN];
        cluster.copy_from_slice(&area[20..20 + FINGERPRINT_LEN]);
        let h = DiskHeader { layout: word(8), slot_size: word(12), slots: word(16), cluster };
        let ours = key.fingerprint();
        if h.cluster != ours {
            return Err(HeaderError::OtherCluster { found: hex(&h.cluster), ours: hex(&ours) });
        }
        if !key.verify(&area[..BODY_LEN + 4], &area[BODY_LEN + 4..BODY_LEN + 4 + crate::wire::MAC_LEN]) {
            return Err(HeaderError::BadMac);
        }
        if h.layout != DISK_LAYOUT || h.slot_size as usize != SLOT_SIZE || h.slots as usize != MAX_HOSTS {
            return Err(HeaderError::OtherLayout { found: h.layout, slots: h.slots, slot_size: h.slot_size });
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image holds the header's record and each slot's record, in host order; an empty slot
    /// with damage past its record is marked so that it decodes as corrupt.
    #[test]
    fn an_area_image_keeps_every_record_and_marks_damaged_empty_slots() {
        let k = key(b"cluster-one-secret-0123");
        let mut area = DiskHeader::for_cluster(&k).encode(&k);
        area.resize(DISK_SIZE, 0);
        let slot =
            crate::wire::DiskSlot { host: HostId(2), incarnation: 1, counter: 4, epoch: 1, heard: crate::HostSet(0b100), fenced: false, written_at_ms: 0 };
        let at = slot_offset(HostId(2)) as usize;
        area[at..at + SLOT_SIZE].copy_from_slice(&slot.encode(&k));
        area[slot_offset(HostId(5)) as usize + 2000] = 7;
        let image = area_image(&area);
        assert_eq!(image.len(), AREA_IMAGE_LEN);
        assert_eq!(DiskHeader::check_image(&image, &k), Ok(DiskHeader::for_cluster(&k)));
        let reads: Vec<crate::wire::SlotRead> = image_slots(&image).enumerate().map(|(i, r)| crate::wire::DiskSlot::decode(r, HostId(i as u32), &k)).collect();
        assert_eq!(reads.len(), MAX_HOSTS);
        assert_eq!(reads[2], crate::wire::SlotRead::Valid(slot));
        assert!(matches!(reads[5], crate::wire::SlotRead::Corrupt(_)), "{:?}", reads[5]);
        assert!(reads.iter().enumerate().all(|(i, r)| i == 2 || i == 5 || *r == crate::wire::SlotRead::Empty));
        assert!(matches!(DiskHeader::check_image(&image[1..], &k), Err(HeaderError::TooSmall(_))));
    }

    fn key(s: &[u8]) -> ClusterKey {
        ClusterKey::new(s).expect("key")
    }

    #[test]
    fn a_formatted_header_checks_and_every_mismatch_is_named() {
        let k = key(b"cluster-one-secret-0123");
        let block = DiskHeader::for_cluster(&k).encode(&k);
        assert_eq!(block.len(), HEADER_SIZE);
        assert_eq!(DiskHeader::check(&block, &k), Ok(DiskHeader::for_cluster(&k)));

        assert_eq!(DiskHeader::check(&vec![0u8; HEADER_SIZE], &k), Err(HeaderError::Unformatted));
        let other = key(b"cluster-two-secret-4567");
        assert!(matches!(DiskHeader::check(&block, &other), Err(HeaderError::OtherCluster { .. })));

        let mut damaged = block.clone();
        damaged[13] ^= 1;
        assert_eq!(DiskHeader::check(&damaged, &k), Err(HeaderError::Damaged));

        let old_layout = DiskHeader { layout: 1, ..DiskHeader::for_cluster(&k) }.encode(&k);
        assert!(matches!(DiskHeader::check(&old_layout, &k), Err(HeaderError::OtherLayout { found: 1, .. })));

        // Someone without the secret copies the fingerprint and fixes the checksum.
        let mut forged = DiskHeader::for_cluster(&k).encode(&other);
        forged[..BODY_LEN].copy_from_slice(&block[..BODY_LEN]);
        let crc = crc32fast::hash(&forged[..BODY_LEN]);
        forged[BODY_LEN..BODY_LEN + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(DiskHeader::check(&forged, &k), Err(HeaderError::BadMac));

        assert_eq!(DiskHeader::check(&block[..100], &k), Err(HeaderError::TooSmall(100)));
        for e in [HeaderError::Unformatted, HeaderError::BadMac, HeaderError::TooSmall(3)] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn slots_follow_the_header() {
        assert_eq!(slot_offset(HostId(0)), HEADER_SIZE as u64);
        assert_eq!(slot_offset(HostId(63)) as usize + SLOT_SIZE, DISK_SIZE);
    }
}
