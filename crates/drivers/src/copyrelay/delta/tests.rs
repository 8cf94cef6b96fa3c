use super::*;
use crate::copyrelay::nbdwatch::REQUEST_MAGIC;

const C: u64 = crate::chunksums::MIN_CHUNK;

fn request(command: u16, handle: u64, offset: u64, payload: &[u8], length: u32) -> Vec<u8> {
    let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&command.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&length.to_be_bytes());
    r.extend_from_slice(payload);
    r
}

fn write(handle: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    request(NBD_CMD_WRITE, handle, offset, payload, payload.len() as u32)
}

fn reply(handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut r = simple_reply(handle).to_vec();
    r.extend_from_slice(payload);
    r
}

/// A copy of four chunks: chunk i filled with byte i.
fn copy() -> Vec<u8> {
    (0..4u8).flat_map(|i| std::iter::repeat_n(i, C as usize)).collect()
}

fn table_of(data: &[u8]) -> DeltaTable {
    let sums = data.chunks(C as usize).map(sum).collect();
    DeltaTable::new(&ChunkSums::new(C, data.len() as u64, sums).expect("sums"))
}

/// Feeds `bytes` in pieces of 1000, as a socket may.
fn client(s: &mut Splitter, t: &mut DeltaTable, bytes: &[u8]) -> Vec<u8> {
    bytes.chunks(1000).flat_map(|b| s.client(b, Some(&mut *t)).expect("client")).collect()
}

fn handles_of(upstream: &[u8]) -> Vec<(u64, u64, u32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < upstream.len() {
        let h = &upstream[at..at + REQUEST_HEADER];
        let (handle, offset, length) = (be64(h, 8), be64(h, 16), be32(h, 24));
        out.push((handle, offset, length));
        at += REQUEST_HEADER + if be16(h, 6) == NBD_CMD_WRITE { length as usize } else { 0 };
    }
    out
}

#[test]
fn a_write_the_copy_already_holds_is_answered_here_and_never_sent() {
    let data = copy();
    let mut t = table_of(&data);
    let mut s = Splitter::new(std::iter::empty());
    let up = client(&mut s, &mut t, &write(7, 0, &data));
    assert!(up.is_empty(), "nothing crosses the link");
    assert_eq!(s.answers_now(), simple_reply(7).to_vec());
    assert!(s.idle());
    assert_eq!(t.stats().matched, 4 * C);
    assert_eq!(t.stats().sent, 0);
}

#[test]
fn a_write_that_differs_in_some_chunks_sends_only_those_and_is_answered_once_all_are() {
    let data = copy();
    let mut t = table_of(&data);
    let mut s = Splitter::new(std::iter::empty());
    let mut new = data.clone();
    new[(C + 5) as usize] = 0xff; // chunk 1
    new[(3 * C) as usize] = 0xff; // chunk 3
    let up = client(&mut s, &mut t, &write(9, 0, &new));
    let parts = handles_of(&up);
    assert_eq!(parts.len(), 2, "two runs: {parts:?}");
    assert_eq!((parts[0].1, parts[0].2), (C, C as u32));
    assert_eq!((parts[1].1, parts[1].2), (3 * C, C as u32));
    assert!(parts.iter().all(|p| p.0 & OWN_HANDLE != 0 && p.0 != 9));
    // The first part's payload is chunk 1 of the new data.
    assert_eq!(&up[REQUEST_HEADER..REQUEST_HEADER + C as usize], &new[C as usize..2 * C as usize]);
    assert!(s.answers_now().is_empty(), "not answered before its parts");
    let down = s.server(&reply(parts[0].0, &[])).expect("reply");
    assert!(down.is_empty(), "a part's answer is the relay's own");
    let down = s.server(&reply(parts[1].0, &[])).expect("reply");
    assert_eq!(down, simple_reply(9).to_vec(), "answered once both parts are");
    assert!(s.idle());
    assert_eq!(t.stats(), DeltaStats { chunk: C, chunks: 4, matched: 2 * C, sent: 2 * C });
}

#[test]
fn a_chunk_once_written_or_written_in_part_is_always_sent_again() {
    let data = copy();
    let mut t = table_of(&data);
    let mut s = Splitter::new(std::iter::empty());
    // Chunk 0 gets other bytes: sent whole, with QEMU's own handle.
    let other = vec![9u8; C as usize];
    let up = client(&mut s, &mut t, &write(1, 0, &other));
    assert_eq!(handles_of(&up), vec![(1, 0, C as u32)]);
    // Its old bytes again: the copy may hold the new ones now, so sent.
    let up = client(&mut s, &mut t, &write(2, 0, &data[..C as usize]));
    assert_eq!(handles_of(&up), vec![(2, 0, C as u32)]);
    // A write of part of chunk 2 (same bytes) is sent, and chunk 2 is forgotten.
    let up = client(&mut s, &mut t, &write(3, 2 * C + 512, &data[(2 * C + 512) as usize..(2 * C + 1024) as usize]));
    assert_eq!(handles_of(&up).len(), 1);
    let up = client(&mut s, &mut t, &write(4, 2 * C, &data[2 * C as usize..3 * C as usize]));
    assert_eq!(handles_of(&up), vec![(4, 2 * C, C as u32)]);
    // A trim forgets chunk 3.
    let up = client(&mut s, &mut t, &request(NBD_CMD_TRIM, 5, 3 * C, &[], 4096));
    assert_eq!(handles_of(&up).len(), 1);
    let up = client(&mut s, &mut t, &write(6, 3 * C, &data[3 * C as usize..]));
    assert_eq!(handles_of(&up).len(), 1, "sent after the trim");
    // Chunk 1 was never touched: still answered here.
    let up = client(&mut s, &mut t, &write(8, C, &data[C as usize..2 * C as usize]));
    assert!(up.is_empty());
}

#[test]
fn zeroes_are_answered_here_where_the_copy_holds_zeroes() {
    let mut data = vec![0u8; 3 * C as usize];
    data[(C + 1) as usize] = 1;
    let mut t = table_of(&data);
    let mut s = Splitter::new(std::iter::empty());
    let up = client(&mut s, &mut t, &request(NBD_CMD_WRITE_ZEROES, 4, 0, &[], (3 * C) as u32));
    let parts = handles_of(&up);
    assert_eq!(parts.len(), 1, "only chunk 1, which is not zero there, is zeroed");
    assert_eq!((parts[0].1, parts[0].2), (C, C as u32));
    assert!(s.server(&reply(parts[0].0, &[])).expect("reply") == simple_reply(4).to_vec());
    assert_eq!(t.stats().sent, 0, "zeroes carry no payload");
    assert_eq!(t.stats().matched, 2 * C);
}

#[test]
fn a_reply_made_here_waits_for_the_end_of_the_frame_the_server_is_sending() {
    let data = copy();
    let mut t = table_of(&data);
    let mut s = Splitter::new(std::iter::empty());
    let up = client(&mut s, &mut t, &request(NBD_CMD_READ, 3, 0, &[], 100));
    assert_eq!(handles_of(&up).len(), 1);
    let read_reply = reply(3, &[0xab; 100]);
    // The read's reply starts; meanwhile a write the copy holds is answered here.
    let first = s.server(&read_reply[..40]).expect("reply");
    assert!(client(&mut s, &mut t, &write(5, C, &data[C as usize..2 * C as usize])).is_empty());
    assert!(s.answers_now().is_empty(), "not inside the read's reply");
    let rest = s.server(&read_reply[40..]).expect("reply");
    let mut down = first;
    down.extend(rest);
    let mut expected = read_reply.clone();
    expected.extend_from_slice(&simple_reply(5));
    assert_eq!(down, expected, "the read's reply whole, then the answer");
}

#[test]
fn without_a_table_every_request_goes_as_it_came() {
    let data = copy();
    let mut s = Splitter::new(std::iter::empty());
    let w = write(1, 0, &data);
    let up: Vec<u8> = w.chunks(777).flat_map(|b| s.client(b, None).expect("client")).collect();
    assert_eq!(up, w);
    assert_eq!(s.server(&reply(1, &[])).expect("reply"), reply(1, &[]));
    assert!(s.idle());
}

#[test]
fn an_error_from_the_copy_server_is_caught() {
    let mut s = Splitter::new(std::iter::empty());
    let mut r = simple_reply(1);
    r[4..8].copy_from_slice(&5u32.to_be_bytes());
    assert!(s.server(&r).is_err());
}
