//! Chunk sums of a disk copy: a SHA-256 (cut to 128 bits) of every chunk, computed where the
//! copy lives. They let a resync into a stale copy — the other site's, back after its loss, when
//! the VM restarted on this one; or any copy after the VM's QEMU restarted and its dirty bitmap
//! died with it — send across the link only the chunks whose content differs (`copyrelay`'s
//! delta), while QEMU's own mirror still reads and orders the whole copy.
//!
//! This is a checksum delta sync, as Zerto does when no bitmap is left: it needs no record of
//! what changed, so it also finds the writes a site had in flight when it was lost, which no
//! bitmap of the survivor knows.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use thiserror::Error;

/// A chunk's sum: the first 128 bits of its SHA-256.
pub type ChunkSum = [u8; SUM_LEN];
/// Bytes kept of each SHA-256.
pub const SUM_LEN: usize = 16;
/// The smallest chunk: QEMU's default mirror granularity.
pub const MIN_CHUNK: u64 = 64 * 1024;
/// The largest chunk: QEMU's largest mirror granularity.
pub const MAX_CHUNK: u64 = 64 * 1024 * 1024;
/// The most chunks one copy is summed in (64 MiB of sums): a larger disk gets larger chunks.
pub const MAX_SUM_CHUNKS: u64 = 4 * 1024 * 1024;
/// The encoding's header: chunk size, copy length, count, each a big-endian u64.
pub const ENCODED_HEADER_LEN: usize = 24;

/// Why a copy could not be summed, or its sums could not be read.
#[derive(Debug, Error)]
pub enum ChunkSumsError {
    #[error("a copy of {0} bytes is too large to sum in at most {MAX_SUM_CHUNKS} chunks of at most {MAX_CHUNK} bytes")]
    TooLarge(u64),
    #[error("reading {path} for its chunk sums failed")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the copy {path} has {found} bytes, not the {expected} asked for")]
    Length { path: String, found: u64, expected: u64 },
    #[error("malformed chunk sums: {0}")]
    Malformed(&'static str),
}

/// The sums of one copy's chunks, in order; the last chunk may be short.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkSums {
    chunk: u64,
    len: u64,
    sums: Vec<ChunkSum>,
}

/// The sum of `data`.
#[must_use]
pub fn sum(data: &[u8]) -> ChunkSum {
    let full = Sha256::digest(data);
    let mut out = [0u8; SUM_LEN];
    out.copy_from_slice(&full[..SUM_LEN]);
    out
}

/// The chunk size for a copy of `len` bytes: the smallest power of two from `MIN_CHUNK` that
/// keeps the count within `MAX_SUM_CHUNKS`.
pub fn chunk_for(len: u64) -> Result<u64, ChunkSumsError> {
    let mut chunk = MIN_CHUNK;
    while len.div_ceil(chunk) > MAX_SUM_CHUNKS {
        chunk *= 2;
        if chunk > MAX_CHUNK {
            return Err(ChunkSumsError::TooLarge(len));
        }
    }
    Ok(chunk)
}

impl ChunkSums {
    /// Sums the raw image at `path`, which must hold `expected` bytes. Blocking: it reads the
    /// whole file. Cached pages are dropped first, so what is summed is what the storage holds
    /// (the copy server writes around the page cache), and the file is synced after, so that a
    /// write the resync skips because it matches is durable as the guest's flush expects.
    pub fn of_file(path: &Path, expected: u64) -> Result<ChunkSums, ChunkSumsError> {
        let read_err = |source| ChunkSumsError::Read { path: path.display().to_string(), source };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let found = file.metadata().map_err(read_err)?.len();
        if found != expected {
            return Err(ChunkSumsError::Length { path: path.display().to_string(), found, expected });
        }
        let chunk = chunk_for(found)?;
        drop_cached(&file);
        let mut sums = Vec::with_capacity(usize::try_from(found.div_ceil(chunk)).unwrap_or(0));
        let mut buf = vec![0u8; usize::try_from(chunk).map_err(|_| ChunkSumsError::TooLarge(found))?];
        let mut at = 0u64;
        while at < found {
            let n = usize::try_from(chunk.min(found - at)).map_err(|_| ChunkSumsError::TooLarge(found))?;
            file.read_exact(&mut buf[..n]).map_err(read_err)?;
            sums.push(sum(&buf[..n]));
            at += n as u64;
        }
        file.sync_data().map_err(read_err)?;
        drop_cached(&file);
        Ok(ChunkSums { chunk, len: found, sums })
    }

    /// Sums from their parts (tests, the simulator).
    pub fn new(chunk: u64, len: u64, sums: Vec<ChunkSum>) -> Result<ChunkSums, ChunkSumsError> {
        if !chunk.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
            return Err(ChunkSumsError::Malformed("the chunk size is not a power of two within bounds"));
        }
        if sums.len() as u64 != len.div_ceil(chunk) || sums.len() as u64 > MAX_SUM_CHUNKS {
            return Err(ChunkSumsError::Malformed("the count does not match the length"));
        }
        Ok(ChunkSums { chunk, len, sums })
    }

    /// The chunk size.
    #[must_use]
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// The copy's length.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the copy is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sums, in order.
    #[must_use]
    pub fn sums(&self) -> &[ChunkSum] {
        &self.sums
    }

    /// The sums as bytes: the header, then each sum.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_HEADER_LEN + self.sums.len() * SUM_LEN);
        out.extend_from_slice(&self.chunk.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&(self.sums.len() as u64).to_be_bytes());
        for s in &self.sums {
            out.extend_from_slice(s);
        }
        out
    }

    /// The header of an encoding: (chunk, length, count), checked, so that a reader knows how many
    /// bytes of sums follow before it takes them.
    pub fn decode_header(header: &[u8; ENCODED_HEADER_LEN]) -> Result<(u64, u64, u64), ChunkSumsError> {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        let (chunk, len, count) = (word(0), word(1), word(2));
        if !chunk.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
            return Err(ChunkSumsError::Malformed("the chunk size is not a power of two within bounds"));
        }
        if count != len.div_ceil(chunk) || count > MAX_SUM_CHUNKS {
            return Err(ChunkSumsError::Malformed("the count does not match the length"));
        }
        Ok((chunk, len, count))
    }

    /// The sums from their encoding.
    pub fn decode(bytes: &[u8]) -> Result<ChunkSums, ChunkSumsError> {
        let header: &[u8; ENCODED_HEADER_LEN] =
            bytes.get(..ENCODED_HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or(ChunkSumsError::Malformed("short header"))?;
        let (chunk, len, count) = Self::decode_header(header)?;
        let body = &bytes[ENCODED_HEADER_LEN..];
        if body.len() as u64 != count * SUM_LEN as u64 {
            return Err(ChunkSumsError::Malformed("the sums do not match their count"));
        }
        let sums = body.chunks_exact(SUM_LEN).map(|c| c.try_into().unwrap_or([0; SUM_LEN])).collect();
        Ok(ChunkSums { chunk, len, sums })
    }
}

/// Drops the file's clean cached pages (advice only: its failure changes nothing but speed).
fn drop_cached(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise(2) on a descriptor we own; it reads no memory of ours.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_grow_with_the_copy_so_the_count_stays_bounded() {
        assert_eq!(chunk_for(0).ok(), Some(MIN_CHUNK));
        assert_eq!(chunk_for(64 << 20).ok(), Some(MIN_CHUNK));
        assert_eq!(chunk_for(MIN_CHUNK * MAX_SUM_CHUNKS).ok(), Some(MIN_CHUNK));
        assert_eq!(chunk_for(MIN_CHUNK * MAX_SUM_CHUNKS + 1).ok(), Some(2 * MIN_CHUNK));
        assert_eq!(chunk_for(1 << 40).ok(), Some(256 * 1024), "1 TiB: 256 KiB chunks");
        assert!(matches!(chunk_for(MAX_CHUNK * MAX_SUM_CHUNKS + 1), Err(ChunkSumsError::TooLarge(_))));
    }

    #[test]
    fn a_files_sums_cover_every_chunk_and_round_trip() {
        let dir = std::env::temp_dir().join(format!("tandem-chunksums-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("copy.raw");
        // Two and a half chunks: the last one short.
        let mut data = vec![0u8; (MIN_CHUNK * 5 / 2) as usize];
        data[MIN_CHUNK as usize + 7] = 1;
        std::fs::write(&path, &data).expect("write");
        let sums = ChunkSums::of_file(&path, data.len() as u64).expect("sums");
        assert_eq!(sums.chunk(), MIN_CHUNK);
        assert_eq!(sums.sums().len(), 3);
        assert_eq!(sums.sums()[0], sum(&[0u8; MIN_CHUNK as usize]));
        assert_ne!(sums.sums()[1], sums.sums()[0], "the changed chunk sums differently");
        assert_eq!(sums.sums()[2], sum(&data[2 * MIN_CHUNK as usize..]), "the short last chunk sums its own bytes");
        assert_eq!(ChunkSums::decode(&sums.encode()).expect("decode"), sums);
        assert!(matches!(ChunkSums::of_file(&path, 1), Err(ChunkSumsError::Length { .. })), "a copy of another size is refused");
        let mut bad = sums.encode();
        bad.pop();
        assert!(matches!(ChunkSums::decode(&bad), Err(ChunkSumsError::Malformed(_))));
        let mut bad = sums.encode();
        bad[7] = 3; // chunk size 65539
        assert!(matches!(ChunkSums::decode(&bad), Err(ChunkSumsError::Malformed(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
