//! The relay's reading of the NBD conversation it carries, for one purpose: to find a reply in
//! which the copy server reports an error. Such a reply must not reach QEMU: its mirror would
//! stop and let the guest's write complete on the local copy alone, before the copy is
//! committed stale. The relay holds it instead, as it holds the writes of a copy that went
//! silent (the copy counts as lost).
//!
//! Both directions are followed frame by frame, without buffering payloads: the handshake
//! (the server's greeting and option replies, until the reply that accepts `NBD_OPT_GO`), then
//! the client's requests (a write's payload skipped; a read's length kept for its simple reply)
//! and the server's replies, simple and structured. Anything that does not parse counts as an
//! error too: a relay that cannot tell is a relay that holds.
//!
//! The handshake is also *rewritten* in one place: QEMU 9.0 and later ask for NBD's extended
//! headers (`NBD_OPT_EXTENDED_HEADERS`), whose requests and replies the relay does not read. The
//! relay renames that option, in the client's request, to one no server knows, and the server's
//! refusal back to it: QEMU then goes on with structured replies, as a 7.2 server would have it.
//! (Option headers are passed on whole, so that a rewrite never straddles what was sent.)

use std::collections::HashMap;

const GREETING_LEN: usize = 18;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPTION_REPLY_HEADER: usize = 20;
const NBD_OPT_GO: u32 = 7;
const NBD_OPT_EXTENDED_HEADERS: u32 = 11;
/// What the relay renames `NBD_OPT_EXTENDED_HEADERS` to: an option no server knows ("~TND").
const NBD_OPT_UNKNOWN_STAND_IN: u32 = 0x7e54_4e44;
const NBD_REP_ACK: u32 = 1;
const CLIENT_FLAGS_LEN: usize = 4;
const OPTION_REQUEST_MAGIC: u64 = 0x4948_4156_454f_5054;
const OPTION_REQUEST_HEADER: usize = 16;
pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(super) const REQUEST_HEADER: usize = 28;
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(super) const SIMPLE_REPLY_HEADER: usize = 16;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const STRUCTURED_REPLY_HEADER: usize = 20;
pub(super) const NBD_CMD_READ: u16 = 0;
pub(super) const NBD_CMD_WRITE: u16 = 1;
/// The client's goodbye: it has no reply, and the server closes after it.
const NBD_CMD_DISC: u16 = 2;
pub(super) const NBD_CMD_TRIM: u16 = 4;
pub(super) const NBD_CMD_WRITE_ZEROES: u16 = 6;
const NBD_REPLY_FLAG_DONE: u16 = 1;
/// A structured reply chunk whose type has this bit is an error.
const NBD_REPLY_TYPE_ERROR_BIT: u16 = 0x8000;
/// The most requests in flight the relay follows (QEMU keeps 16).
pub const MAX_TRACKED_REQUESTS: usize = 4096;

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5], b[at + 6], b[at + 7]])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Greeting,
    Options,
    Transmission,
}

/// One direction's framing: a header being gathered, or a payload being skipped.
#[derive(Default)]
pub(super) struct Framing {
    pub(super) header: Vec<u8>,
    pub(super) skip: u64,
}

/// A reply's header, read: whose it is, how many payload bytes follow, and whether it ends the
/// request's replies.
pub(super) struct ReplyHead {
    pub(super) handle: u64,
    pub(super) payload: u64,
    pub(super) done: bool,
}

/// A whole request header (`REQUEST_HEADER` bytes), read: its command, handle and length.
pub(super) fn read_request_head(h: &[u8]) -> Result<(u16, u64, u32), String> {
    if be32(h, 0) != REQUEST_MAGIC {
        return Err("an NBD request the relay cannot read".into());
    }
    Ok((be16(h, 6), be64(h, 8), be32(h, 24)))
}

/// The length of the reply header that begins with `magic`.
pub(super) fn reply_header_len(magic: u32) -> Result<usize, String> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_HEADER),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_HEADER),
        other => Err(format!("an NBD reply the relay cannot read (magic {other:#x})")),
    }
}

/// Reads a whole reply header (`reply_header_len` bytes): an error reply is `Err`. A simple
/// reply's payload is a read's data, whose length only its request says (`read_len`).
pub(super) fn read_reply_head(h: &[u8], read_len: impl FnOnce(u64) -> Option<u32>) -> Result<ReplyHead, String> {
    let handle = be64(h, 8);
    if h.len() == SIMPLE_REPLY_HEADER {
        let error = be32(h, 4);
        if error != 0 {
            return Err(format!("the copy server answered a request with error {error}"));
        }
        return Ok(ReplyHead { handle, payload: read_len(handle).map_or(0, u64::from), done: true });
    }
    let (flags, kind, length) = (be16(h, 4), be16(h, 6), be32(h, 16));
    if kind & NBD_REPLY_TYPE_ERROR_BIT != 0 {
        return Err(format!("the copy server answered a request with an error chunk (type {kind})"));
    }
    Ok(ReplyHead { handle, payload: u64::from(length), done: flags & NBD_REPLY_FLAG_DONE != 0 })
}

impl Framing {
    /// Feeds `data` until the header holds `len` bytes; the bytes used.
    pub(super) fn fill(&mut self, data: &[u8], len: usize) -> usize {
        let take = len.saturating_sub(self.header.len()).min(data.len());
        self.header.extend_from_slice(&data[..take]);
        take
    }

    /// Feeds `data` until a header of `len` bytes is complete; the bytes used and the header,
    /// when it is.
    pub(super) fn gather(&mut self, data: &[u8], len: usize) -> (usize, Option<Vec<u8>>) {
        let used = self.fill(data, len);
        (used, (self.header.len() == len).then(|| std::mem::take(&mut self.header)))
    }

    /// Skips what is left of a payload in `data`; the bytes used.
    pub(super) fn skipping(&mut self, data: &[u8]) -> usize {
        let n = usize::try_from(self.skip).unwrap_or(usize::MAX).min(data.len());
        self.skip -= n as u64;
        n
    }
}

/// Both directions of one NBD connection, followed.
pub struct NbdWatch {
    phase: Phase,
    server: Framing,
    client: Framing,
    /// Whether the client's flags (its first bytes) were passed on.
    client_flags_seen: bool,
    /// Requests in flight: handle → (command, length).
    requests: HashMap<u64, (u16, u32)>,
    /// Whether the client said goodbye (`NBD_CMD_DISC`).
    disconnecting: bool,
}

impl Default for NbdWatch {
    fn default() -> Self {
        NbdWatch {
            phase: Phase::Greeting,
            server: Framing::default(),
            client: Framing::default(),
            client_flags_seen: false,
            requests: HashMap::new(),
            disconnecting: false,
        }
    }
}

impl NbdWatch {
    /// QEMU's bytes during the handshake (before transmission), rewritten: what to pass on.
    /// A partial option header is kept until it is whole.
    pub fn client_handshake(&mut self, mut data: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(data.len());
        while !data.is_empty() {
            if self.client.skip > 0 {
                let n = self.client.skipping(data);
                out.extend_from_slice(&data[..n]);
                data = &data[n..];
                continue;
            }
            let len = if self.client_flags_seen { OPTION_REQUEST_HEADER } else { CLIENT_FLAGS_LEN };
            let (used, header) = self.client.gather(data, len);
            data = &data[used..];
            let Some(mut h) = header else { continue };
            if !self.client_flags_seen {
                self.client_flags_seen = true;
            } else {
                if be64(&h, 0) != OPTION_REQUEST_MAGIC {
                    return Err("an NBD option request the relay cannot read".into());
                }
                if be32(&h, 8) == NBD_OPT_EXTENDED_HEADERS {
                    h[8..12].copy_from_slice(&NBD_OPT_UNKNOWN_STAND_IN.to_be_bytes());
                }
                self.client.skip = u64::from(be32(&h, 12));
            }
            out.extend_from_slice(&h);
        }
        Ok(out)
    }

    /// Bytes from QEMU to the copy server.
    pub fn client_bytes(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() {
            // The handshake's client side is not followed: its end is read from the server's.
            if self.phase != Phase::Transmission {
                return Ok(());
            }
            if self.client.skip > 0 {
                data = &data[self.client.skipping(data)..];
                continue;
            }
            let (used, header) = self.client.gather(data, REQUEST_HEADER);
            data = &data[used..];
            let Some(h) = header else { continue };
            let (command, handle, length) = read_request_head(&h)?;
            if command == NBD_CMD_WRITE {
                self.client.skip = u64::from(length);
            }
            if command == NBD_CMD_DISC {
                self.disconnecting = true;
                continue;
            }
            if self.requests.len() >= MAX_TRACKED_REQUESTS {
                return Err(format!("more than {MAX_TRACKED_REQUESTS} NBD requests in flight"));
            }
            self.requests.insert(handle, (command, length));
        }
        Ok(())
    }

    /// Bytes from the copy server to QEMU: `Err` when they carry an error reply (or do not
    /// parse), and must not be passed on. (In the handshake, what `server_handshake` passes on.)
    pub fn server_bytes(&mut self, data: &[u8]) -> Result<(), String> {
        self.server_handshake(data).map(|_| ())
    }

    /// The copy server's bytes, rewritten where the handshake needs it: what to pass on. A
    /// partial header of the handshake is kept until it is whole; replies in transmission pass
    /// as they came (`Err` as in `server_bytes`).
    pub fn server_handshake(&mut self, mut data: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while !data.is_empty() {
            if self.phase == Phase::Transmission {
                self.transmission_replies(data)?;
                out.extend_from_slice(data);
                break;
            }
            if self.server.skip > 0 {
                let n = self.server.skipping(data);
                out.extend_from_slice(&data[..n]);
                data = &data[n..];
                continue;
            }
            let len = if self.phase == Phase::Greeting { GREETING_LEN } else { OPTION_REPLY_HEADER };
            let (used, header) = self.server.gather(data, len);
            data = &data[used..];
            let Some(mut h) = header else { continue };
            if self.phase == Phase::Greeting {
                if &h[..8] != b"NBDMAGIC" {
                    return Err("an NBD greeting the relay cannot read".into());
                }
                self.phase = Phase::Options;
            } else {
                if be64(&h, 0) != OPTION_REPLY_MAGIC {
                    return Err("an NBD option reply the relay cannot read".into());
                }
                if be32(&h, 8) == NBD_OPT_UNKNOWN_STAND_IN {
                    h[8..12].copy_from_slice(&NBD_OPT_EXTENDED_HEADERS.to_be_bytes());
                }
                self.server.skip = u64::from(be32(&h, 16));
                if be32(&h, 8) == NBD_OPT_GO && be32(&h, 12) == NBD_REP_ACK {
                    // GO's acknowledgement carries no payload: transmission begins after it.
                    self.phase = Phase::Transmission;
                }
            }
            out.extend_from_slice(&h);
        }
        Ok(out)
    }

    /// Follows replies in transmission.
    fn transmission_replies(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() {
            if self.server.skip > 0 {
                data = &data[self.server.skipping(data)..];
                continue;
            }
            data = &data[self.reply(data)?..];
        }
        Ok(())
    }

    /// One step of the server's transmission stream; the bytes used.
    fn reply(&mut self, data: &[u8]) -> Result<usize, String> {
        // The magic says which header this is, and so its length.
        let used = self.server.fill(data, 4);
        if self.server.header.len() < 4 {
            return Ok(used);
        }
        let len = reply_header_len(be32(&self.server.header, 0))?;
        let (more, header) = self.server.gather(&data[used..], len);
        let Some(h) = header else { return Ok(used + more) };
        let requests = &mut self.requests;
        let head = read_reply_head(&h, |handle| match requests.get(&handle) {
            Some(&(NBD_CMD_READ, length)) => Some(length),
            _ => None,
        })?;
        self.server.skip = head.payload;
        if head.done {
            self.requests.remove(&head.handle);
        }
        Ok(used + more)
    }

    /// Whether the client said goodbye with every request it sent answered: the server's close
    /// that follows is the conversation's end, not the copy's loss.
    pub fn ended_by_client(&self) -> bool {
        self.disconnecting && self.requests.is_empty()
    }

    /// Whether transmission began (the handshake is over).
    pub fn in_transmission(&self) -> bool {
        self.phase == Phase::Transmission
    }

    /// Whether both directions stand between frames.
    pub fn between_frames(&self) -> bool {
        self.client.header.is_empty() && self.client.skip == 0 && self.server.header.is_empty() && self.server.skip == 0
    }

    /// The reads in flight: handle → length.
    pub fn reads_in_flight(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.requests.iter().filter(|(_, (c, _))| *c == NBD_CMD_READ).map(|(h, (_, l))| (*h, *l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting() -> Vec<u8> {
        let mut g = b"NBDMAGIC".to_vec();
        g.extend_from_slice(b"IHAVEOPT");
        g.extend_from_slice(&[0, 3]);
        g
    }

    fn option_reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&option.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    fn request(command: u16, handle: u64, length: u32, with_payload: bool) -> Vec<u8> {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&command.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&0u64.to_be_bytes());
        r.extend_from_slice(&length.to_be_bytes());
        if with_payload {
            r.extend(std::iter::repeat_n(0x5a, length as usize));
        }
        r
    }

    fn simple(error: u32, handle: u64, payload: usize) -> Vec<u8> {
        let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&error.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend(std::iter::repeat_n(7, payload));
        r
    }

    fn structured(flags: u16, kind: u16, handle: u64, payload: usize) -> Vec<u8> {
        let mut r = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&(payload as u32).to_be_bytes());
        r.extend(std::iter::repeat_n(9, payload));
        r
    }

    /// Feeds `bytes` one split at a time (every split point), as TCP may deliver them.
    fn each_split(bytes: &[u8], mut feed: impl FnMut(&[u8]) -> Result<(), String>) -> Result<(), String> {
        for chunk in bytes.chunks(7) {
            feed(chunk)?;
        }
        Ok(())
    }

    fn in_transmission() -> NbdWatch {
        let mut w = NbdWatch::default();
        let mut server = greeting();
        server.extend(option_reply(9, NBD_REP_ACK, b""));
        server.extend(option_reply(NBD_OPT_GO, 3, &[0; 12]));
        server.extend(option_reply(NBD_OPT_GO, NBD_REP_ACK, b""));
        each_split(&server, |c| w.server_bytes(c)).expect("handshake");
        assert_eq!(w.phase, Phase::Transmission);
        w
    }

    #[test]
    fn writes_reads_and_their_replies_pass_and_an_error_reply_is_caught() {
        let mut w = in_transmission();
        let mut client = request(NBD_CMD_WRITE, 1, 4096, true);
        client.extend(request(NBD_CMD_READ, 2, 512, false));
        client.extend(request(NBD_CMD_READ, 3, 1024, false));
        client.extend(request(NBD_CMD_WRITE, 4, 4096, true));
        each_split(&client, |c| w.client_bytes(c)).expect("requests");
        let mut server = simple(0, 1, 0);
        server.extend(simple(0, 2, 512));
        server.extend(structured(0, 1, 3, 8 + 1024));
        server.extend(structured(NBD_REPLY_FLAG_DONE, 0, 3, 0));
        each_split(&server, |c| w.server_bytes(c)).expect("successful replies pass");
        assert!(w.requests.keys().eq([4u64].iter()), "only the last write is in flight");
        let caught = w.server_bytes(&simple(5, 4, 0));
        assert!(caught.is_err_and(|e| e.contains("error 5")));
    }

    /// A goodbye ends the conversation only once every request before it was answered: a
    /// server that closes on a write it never answered still loses the copy.
    #[test]
    fn a_goodbye_ends_the_conversation_only_with_every_request_answered() {
        let mut w = in_transmission();
        let mut client = request(NBD_CMD_WRITE, 1, 4096, true);
        client.extend(request(NBD_CMD_DISC, 2, 0, false));
        each_split(&client, |c| w.client_bytes(c)).expect("requests");
        assert!(!w.ended_by_client(), "the write is not answered yet");
        each_split(&simple(0, 1, 0), |c| w.server_bytes(c)).expect("the write's reply");
        assert!(w.ended_by_client(), "goodbye said, everything answered");
        assert!(w.requests.is_empty(), "the goodbye awaits no reply");
    }

    fn option_request(option: u32, payload: &[u8]) -> Vec<u8> {
        let mut r = OPTION_REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&option.to_be_bytes());
        r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    /// Feeds `bytes` in pieces of 7 through `f`, and joins what it passes on.
    fn passed(bytes: &[u8], mut f: impl FnMut(&[u8]) -> Result<Vec<u8>, String>) -> Vec<u8> {
        bytes.chunks(7).flat_map(|c| f(c).expect("handshake")).collect()
    }

    /// QEMU 9+ asks for extended headers: the relay renames the option on its way to the server
    /// and the server's refusal on its way back, and passes everything else as it came.
    #[test]
    fn the_extended_headers_option_is_refused_on_the_relays_behalf() {
        const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
        let mut w = NbdWatch::default();
        let mut server = greeting();
        assert_eq!(passed(&server, |c| w.server_handshake(c)), server, "the greeting passes");
        let mut client = vec![0, 0, 0, 3];
        client.extend(option_request(NBD_OPT_EXTENDED_HEADERS, b""));
        client.extend(option_request(8, b""));
        client.extend(option_request(NBD_OPT_GO, b"\0\0\0\x02db\0\0"));
        let up = passed(&client, |c| w.client_handshake(c));
        let mut expected = client.clone();
        expected[4 + 8..4 + 12].copy_from_slice(&NBD_OPT_UNKNOWN_STAND_IN.to_be_bytes());
        assert_eq!(up, expected, "only the option's code is renamed");
        server = option_reply(NBD_OPT_UNKNOWN_STAND_IN, NBD_REP_ERR_UNSUP, b"unknown option");
        server.extend(option_reply(8, NBD_REP_ACK, b""));
        server.extend(option_reply(NBD_OPT_GO, 3, &[0; 12]));
        server.extend(option_reply(NBD_OPT_GO, NBD_REP_ACK, b""));
        let down = passed(&server, |c| w.server_handshake(c));
        let mut expected = server.clone();
        expected[8..12].copy_from_slice(&NBD_OPT_EXTENDED_HEADERS.to_be_bytes());
        assert_eq!(down, expected, "the refusal is QEMU's option's again");
        assert!(w.in_transmission());
        // Transmission as before.
        w.client_bytes(&request(NBD_CMD_WRITE, 1, 16, true)).expect("request");
        assert_eq!(w.server_handshake(&simple(0, 1, 0)).expect("reply"), simple(0, 1, 0));
    }

    #[test]
    fn an_error_chunk_and_an_unreadable_reply_are_caught() {
        let mut w = in_transmission();
        w.client_bytes(&request(NBD_CMD_WRITE, 1, 16, true)).expect("request");
        assert!(w.server_bytes(&structured(NBD_REPLY_FLAG_DONE, 0x8001, 1, 6)).is_err());
        let mut w = in_transmission();
        assert!(w.server_bytes(&[1, 2, 3, 4, 5]).is_err_and(|e| e.contains("cannot read")));
        let mut w = NbdWatch::default();
        assert!(w.server_bytes(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "not NBD at all");
    }
}
