//! The relay's delta: while a mirror copies a disk into a stale copy whose chunk sums the relay
//! holds (`chunksums`, computed where that copy lives, after its server let every earlier write
//! land), a write whose chunks already hold the same bytes there is answered here and never
//! crosses the link. QEMU's mirror still reads the whole disk and orders its bulk copy against
//! the guest's writes as always; the relay only drops the bytes the copy already has.
//!
//! Why a skip is safe: a sum stands for a chunk only while no write that the relay sent could
//! have changed it — every write, write-zeroes or trim the relay sends forgets the sums of the
//! chunks it touches, before it goes — and every write to the copy comes through this relay
//! (the copy is served to the VM's one host, for its generation, and its server cut off every
//! other connection before summing). So a chunk whose sum stands holds what the sum says, and a
//! write of those very bytes changes nothing: answering it here is answering it as the copy
//! would. A write that covers a chunk only in part is sent (a sum says nothing of a part).
//!
//! A write that matches in some chunks and not others is split: only the runs of chunks that
//! differ are sent, as requests of the relay's own (their handles carry the top bit, which
//! QEMU's never do), and QEMU gets one reply when all of them are answered. Replies the relay
//! makes are put into the server's stream between its frames.

use super::nbdwatch::{
    be16, be32, be64, read_reply_head, read_request_head, reply_header_len, Framing, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
    REQUEST_HEADER, SIMPLE_REPLY_HEADER, SIMPLE_REPLY_MAGIC,
};
use crate::chunksums::{sum, ChunkSum, ChunkSums};
use std::collections::HashMap;

/// The longest write the relay gathers to compare (QEMU's NBD client sends at most 32 MiB).
pub const MAX_DELTA_WRITE: u32 = 32 * 1024 * 1024;
/// The relay's own requests carry this bit in their handles.
const OWN_HANDLE: u64 = 1 << 63;

/// What a resync by chunk sums did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct DeltaStats {
    /// The chunk size compared.
    pub chunk: u64,
    /// The copy's chunks.
    pub chunks: u64,
    /// Bytes of writes (and zeroed ranges) answered here: the copy had them already.
    pub matched: u64,
    /// Bytes of write payload sent to the copy.
    pub sent: u64,
}

/// What the copy holds, as far as the relay knows: per chunk, its sum, while it stands.
pub struct DeltaTable {
    chunk: u64,
    len: u64,
    known: Vec<Option<ChunkSum>>,
    /// The sum of a whole chunk of zeroes, and of the last chunk's zeroes when it is short.
    zero: ChunkSum,
    zero_last: ChunkSum,
    stats: DeltaStats,
}

impl DeltaTable {
    #[must_use]
    pub fn new(sums: &ChunkSums) -> DeltaTable {
        let chunk = sums.chunk();
        let whole = usize::try_from(chunk).unwrap_or(0);
        let last = usize::try_from(sums.len() % chunk).unwrap_or(0);
        let zero = sum(&vec![0u8; whole]);
        let zero_last = if last == 0 { zero } else { sum(&vec![0u8; last]) };
        let stats = DeltaStats { chunk, chunks: sums.sums().len() as u64, matched: 0, sent: 0 };
        DeltaTable { chunk, len: sums.len(), known: sums.sums().iter().map(|s| Some(*s)).collect(), zero, zero_last, stats }
    }

    #[must_use]
    pub fn stats(&self) -> DeltaStats {
        self.stats
    }

    /// The byte ranges of `[offset, offset + length)` that must be sent — the copy may not hold
    /// them — for a write of `data` (`None`: zeroes); the sums of the chunks they touch are
    /// forgotten, and the counts kept.
    fn runs_to_send(&mut self, offset: u64, length: u64, data: Option<&[u8]>) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(length);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        if length == 0 {
            return vec![(offset, end)];
        }
        for i in offset / self.chunk..=(end - 1) / self.chunk {
            let (start, stop) = (i * self.chunk, ((i + 1) * self.chunk).min(self.len));
            if !self.holds(i, start, stop, offset, end, data) {
                let run = (start.max(offset), ((i + 1) * self.chunk).min(end));
                match runs.last_mut() {
                    Some(last) if last.1 == run.0 => last.1 = run.1,
                    _ => runs.push(run),
                }
                if let Some(k) = usize::try_from(i).ok().and_then(|i| self.known.get_mut(i)) {
                    *k = None;
                }
            }
        }
        let sent: u64 = runs.iter().map(|(a, b)| b - a).sum();
        self.stats.matched += length - sent;
        if data.is_some() {
            self.stats.sent += sent;
        }
        runs
    }

    /// Whether chunk `i` (`[start, stop)`) lies wholly in the write `[offset, end)` and the copy
    /// holds there what the write brings.
    fn holds(&self, i: u64, start: u64, stop: u64, offset: u64, end: u64, data: Option<&[u8]>) -> bool {
        let Some(Some(known)) = usize::try_from(i).ok().and_then(|i| self.known.get(i)) else { return false };
        if start < offset || stop > end || stop <= start {
            return false;
        }
        let brought = match data {
            None if stop - start == self.chunk => self.zero,
            None => self.zero_last,
            Some(d) => {
                let (a, b) = (usize::try_from(start - offset).unwrap_or(usize::MAX), usize::try_from(stop - offset).unwrap_or(usize::MAX));
                match d.get(a..b) {
                    Some(part) => sum(part),
                    None => return false,
                }
            }
        };
        brought == *known
    }

    /// Forgets the sums of the chunks `[offset, offset + length)` touches.
    fn forget(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let end = offset.saturating_add(length);
        for i in offset / self.chunk..=(end - 1) / self.chunk {
            match usize::try_from(i).ok().and_then(|i| self.known.get_mut(i)) {
                Some(k) => *k = None,
                None => break,
            }
        }
    }
}

/// A write being gathered: its header and its payload so far.
struct Gathering {
    header: Vec<u8>,
    payload: Vec<u8>,
    length: usize,
}

/// One connection's rewriting, in both directions.
pub struct Splitter {
    request: Framing,
    write: Option<Gathering>,
    reply: Framing,
    /// Whether the reply frame being carried is the answer to one of the relay's own requests
    /// (dropped, not passed on).
    reply_own: bool,
    /// QEMU's reads in flight: handle → length (a simple reply's payload).
    reads: HashMap<u64, u32>,
    /// The relay's requests in flight → QEMU's request each is part of.
    own: HashMap<u64, u64>,
    /// QEMU's split requests → their parts not answered yet.
    parts_left: HashMap<u64, usize>,
    next: u64,
    /// Replies made here, passed on between the server's frames.
    answers: Vec<u8>,
}

impl Splitter {
    /// A splitter for a connection whose `reads` are in flight.
    pub fn new(reads: impl Iterator<Item = (u64, u32)>) -> Splitter {
        Splitter {
            request: Framing::default(),
            write: None,
            reply: Framing::default(),
            reply_own: false,
            reads: reads.collect(),
            own: HashMap::new(),
            parts_left: HashMap::new(),
            next: 0,
            answers: Vec::new(),
        }
    }

    /// Whether nothing of the relay's own is under way, in either direction: the connection
    /// can go on without it.
    pub fn idle(&self) -> bool {
        self.request.header.is_empty()
            && self.write.is_none()
            && self.reply.header.is_empty()
            && self.reply.skip == 0
            && self.own.is_empty()
            && self.answers.is_empty()
    }

    /// QEMU's bytes, rewritten: what goes to the copy server. Replies made here wait in the
    /// splitter (`answers_now`). With no table every request goes as it came.
    pub fn client(&mut self, mut data: &[u8], mut table: Option<&mut DeltaTable>) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(data.len());
        while !data.is_empty() {
            if let Some(w) = &mut self.write {
                let take = (w.length - w.payload.len()).min(data.len());
                w.payload.extend_from_slice(&data[..take]);
                data = &data[take..];
                if w.payload.len() == w.length {
                    if let Some(w) = self.write.take() {
                        self.request_out(&w.header, Some(&w.payload), table.as_deref_mut(), &mut out);
                    }
                }
                continue;
            }
            let (used, header) = self.request.gather(data, REQUEST_HEADER);
            data = &data[used..];
            let Some(h) = header else { continue };
            let (command, handle, length) = read_request_head(&h)?;
            if handle & OWN_HANDLE != 0 && self.own.contains_key(&handle) {
                return Err(format!("QEMU sent a request with the relay's own handle {handle:#x}"));
            }
            match command {
                NBD_CMD_WRITE if length > MAX_DELTA_WRITE => return Err(format!("a write of {length} bytes, more than the relay compares")),
                NBD_CMD_WRITE if length > 0 => {
                    self.write = Some(Gathering { header: h, payload: Vec::with_capacity(length as usize), length: length as usize });
                }
                NBD_CMD_READ => {
                    if self.reads.len() >= super::MAX_TRACKED_REQUESTS {
                        return Err(format!("more than {} NBD reads in flight", super::MAX_TRACKED_REQUESTS));
                    }
                    self.reads.insert(handle, length);
                    out.extend_from_slice(&h);
                }
                _ => self.request_out(&h, None, table.as_deref_mut(), &mut out),
            }
        }
        Ok(out)
    }

    /// Sends a whole request on (header `h`, `payload` for a write), answers it here, or splits
    /// it, as the table says.
    fn request_out(&mut self, h: &[u8], payload: Option<&[u8]>, table: Option<&mut DeltaTable>, out: &mut Vec<u8>) {
        let whole = |out: &mut Vec<u8>| {
            out.extend_from_slice(h);
            out.extend_from_slice(payload.unwrap_or(&[]));
        };
        let (command, handle, offset, length) = (be16(h, 6), be64(h, 8), be64(h, 16), u64::from(be32(h, 24)));
        let Some(table) = table else { return whole(out) };
        let runs = match command {
            NBD_CMD_WRITE => table.runs_to_send(offset, length, payload),
            NBD_CMD_WRITE_ZEROES => table.runs_to_send(offset, length, None),
            NBD_CMD_TRIM => {
                table.forget(offset, length);
                return whole(out);
            }
            _ => return whole(out),
        };
        if runs.is_empty() {
            self.answers.extend_from_slice(&simple_reply(handle));
            return;
        }
        if runs == [(offset, offset + length)] {
            return whole(out);
        }
        self.parts_left.insert(handle, runs.len());
        for (from, to) in runs {
            let own = OWN_HANDLE | self.next;
            self.next = (self.next + 1) & !OWN_HANDLE;
            self.own.insert(own, handle);
            let mut part = h.to_vec();
            part[8..16].copy_from_slice(&own.to_be_bytes());
            part[16..24].copy_from_slice(&from.to_be_bytes());
            part[24..28].copy_from_slice(&u32::try_from(to - from).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&part);
            if let Some(p) = payload {
                let (a, b) = (usize::try_from(from - offset).unwrap_or(0), usize::try_from(to - offset).unwrap_or(0));
                out.extend_from_slice(p.get(a..b).unwrap_or(&[]));
            }
        }
    }

    /// The copy server's bytes, rewritten: what goes to QEMU (answers to the relay's own
    /// requests dropped, replies made here put in between frames). An error reply is `Err`.
    pub fn server(&mut self, mut data: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(data.len() + self.answers.len());
        loop {
            if self.reply.header.is_empty() && self.reply.skip == 0 {
                out.append(&mut self.answers);
            }
            if data.is_empty() {
                return Ok(out);
            }
            if self.reply.skip > 0 {
                let n = self.reply.skipping(data);
                if !self.reply_own {
                    out.extend_from_slice(&data[..n]);
                }
                data = &data[n..];
                continue;
            }
            let used = self.reply.fill(data, 4);
            data = &data[used..];
            if self.reply.header.len() < 4 {
                continue;
            }
            let len = reply_header_len(be32(&self.reply.header, 0))?;
            let (used, header) = self.reply.gather(data, len);
            data = &data[used..];
            let Some(h) = header else { continue };
            let reads = &self.reads;
            let head = read_reply_head(&h, |handle| reads.get(&handle).copied())?;
            if head.done {
                self.reads.remove(&head.handle);
            }
            self.reply.skip = head.payload;
            self.reply_own = self.own.contains_key(&head.handle);
            if !self.reply_own {
                out.extend_from_slice(&h);
                continue;
            }
            if head.done {
                let Some(parent) = self.own.remove(&head.handle) else { continue };
                let left = self.parts_left.get(&parent).map_or(0, |n| n.saturating_sub(1));
                if left == 0 {
                    self.parts_left.remove(&parent);
                    self.answers.extend_from_slice(&simple_reply(parent));
                } else {
                    self.parts_left.insert(parent, left);
                }
            }
        }
    }

    /// Replies made here that can go to QEMU now (the server's stream is between frames).
    pub fn answers_now(&mut self) -> Vec<u8> {
        if self.reply.header.is_empty() && self.reply.skip == 0 {
            std::mem::take(&mut self.answers)
        } else {
            Vec::new()
        }
    }
}

/// A successful simple reply to `handle`.
fn simple_reply(handle: u64) -> [u8; SIMPLE_REPLY_HEADER] {
    let mut r = [0u8; SIMPLE_REPLY_HEADER];
    r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[8..].copy_from_slice(&handle.to_be_bytes());
    r
}

#[cfg(test)]
mod tests;
