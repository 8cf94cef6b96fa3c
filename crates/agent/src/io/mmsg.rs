//! Batched datagram I/O on Linux: one `sendmmsg` for a tick's heartbeat copies and one
//! `recvmmsg` for a poll's queued datagrams, instead of one system call each. At 64 hosts an
//! agent sends and receives about 315 datagrams a second each way; on a virtual machine each
//! system call's entry and exit cost about as much as the datagram's own work.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// The most datagrams one call hands to the kernel (a tick's copies to every peer fit).
pub const MMSG_BATCH: usize = tandem_core::MAX_HOSTS;

/// `SO_TIMESTAMPNS` (and its control message, `SCM_TIMESTAMPNS`) where `time_t` is 64 bits
/// (x86-64, arm64): the kernel stamps each datagram with CLOCK_REALTIME when it arrives.
const SO_TIMESTAMPNS: libc::c_int = 35;

/// Room for one datagram's control messages, in words so that it is aligned for `cmsghdr`:
/// the receive timestamp needs a header and a `timespec` (32 bytes).
const CONTROL_WORDS: usize = 8;

/// Asks the kernel to stamp every datagram received on `socket` with its arrival time; whether
/// it agreed.
pub fn enable_arrival_stamps(socket: &std::net::UdpSocket) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one int through a valid pointer of the length given.
    let r = unsafe {
        libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_TIMESTAMPNS, (&raw const on).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    r == 0
}

/// Nanoseconds on `clock`.
pub fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe {
        libc::clock_gettime(clock, &mut ts);
    }
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// A socket address in the kernel's layout.
#[derive(Clone, Copy)]
#[repr(C)]
union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

fn raw(addr: &SocketAddr) -> (RawAddr, libc::socklen_t) {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: all-zero bytes are a valid sockaddr_in.
            let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            (RawAddr { v4: s }, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            // SAFETY: all-zero bytes are a valid sockaddr_in6.
            let mut s: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_scope_id = a.scope_id();
            (RawAddr { v6: s }, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn from_raw(a: &RawAddr) -> Option<SocketAddr> {
    // SAFETY: the family field sits at the same offset in both variants, and the kernel wrote
    // the variant it names.
    let family = i32::from(unsafe { a.v4.sin_family });
    match family {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let s = unsafe { a.v4 };
            Some(SocketAddr::V4(SocketAddrV4::new(s.sin_addr.s_addr.to_ne_bytes().into(), u16::from_be(s.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let s = unsafe { a.v6 };
            Some(SocketAddr::V6(SocketAddrV6::new(s.sin6_addr.s6_addr.into(), u16::from_be(s.sin6_port), s.sin6_flowinfo, s.sin6_scope_id)))
        }
        _ => None,
    }
}

/// Sends each datagram to its address, `MMSG_BATCH` per call. A datagram the kernel refuses
/// (a full buffer, an unreachable address) is dropped, as the network would drop it; the
/// others still go. Returns how many the kernel took.
pub fn send_batch(socket: &std::net::UdpSocket, batch: &[(SocketAddr, &[u8])]) -> usize {
    let mut sent = 0;
    let mut rest = batch;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MMSG_BATCH)];
        let mut addrs: Vec<(RawAddr, libc::socklen_t)> = chunk.iter().map(|(a, _)| raw(a)).collect();
        let mut iovs: Vec<libc::iovec> = chunk.iter().map(|(_, b)| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() }).collect();
        let mut msgs: Vec<libc::mmsghdr> = addrs
            .iter_mut()
            .zip(iovs.iter_mut())
            .map(|((addr, len), iov)| {
                // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero lengths).
                let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                h.msg_name = (addr as *mut RawAddr).cast();
                h.msg_namelen = *len;
                h.msg_iov = iov;
                h.msg_iovlen = 1;
                libc::mmsghdr { msg_hdr: h, msg_len: 0 }
            })
            .collect();
        // SAFETY: every header points into `addrs` and `iovs`, and every iovec into `batch`,
        // all alive and unmoved for the duration of the call.
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as libc::c_uint, libc::MSG_DONTWAIT) };
        // The first datagram failed (or the call did): skip it, as a lost datagram, and go on.
        let took = usize::try_from(n).unwrap_or(0);
        sent += took;
        rest = &rest[took.max(1).min(rest.len())..];
    }
    sent
}

/// Room for up to `MMSG_BATCH` received datagrams of up to `len` bytes each.
pub struct RecvArena {
    bufs: Vec<u8>,
    len: usize,
    addrs: Vec<RawAddr>,
    sizes: Vec<usize>,
    controls: Vec<[u64; CONTROL_WORDS]>,
    /// Each datagram's arrival on CLOCK_REALTIME (ns), when the kernel stamped it.
    arrivals: Vec<Option<i128>>,
}

impl RecvArena {
    #[must_use]
    pub fn new(len: usize) -> RecvArena {
        // SAFETY: all-zero bytes are a valid sockaddr_in.
        let zero = RawAddr { v4: unsafe { std::mem::zeroed() } };
        RecvArena {
            bufs: vec![0; len * MMSG_BATCH],
            len,
            addrs: vec![zero; MMSG_BATCH],
            sizes: Vec::with_capacity(MMSG_BATCH),
            controls: vec![[0; CONTROL_WORDS]; MMSG_BATCH],
            arrivals: Vec::with_capacity(MMSG_BATCH),
        }
    }

    /// The datagrams of the last [`recv_batch`]: their bytes (cut at the arena's length),
    /// senders, and arrival times on CLOCK_REALTIME in ns (when the kernel stamped them; see
    /// [`enable_arrival_stamps`]).
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], Option<SocketAddr>, Option<i128>)> {
        self.sizes
            .iter()
            .zip(&self.arrivals)
            .enumerate()
            .map(|(i, (n, at))| (&self.bufs[i * self.len..i * self.len + (*n).min(self.len)], from_raw(&self.addrs[i]), *at))
    }
}

/// The receive timestamp among a received message's control messages, in ns.
fn arrival_of(h: &libc::msghdr) -> Option<i128> {
    // SAFETY: the kernel filled `msg_control` up to `msg_controllen` with well-formed control
    // messages; the macros walk them within those bounds.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == SO_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return Some(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec));
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Takes up to `MMSG_BATCH` queued datagrams without waiting; how many (0: none queued).
pub fn recv_batch(socket: &std::net::UdpSocket, arena: &mut RecvArena) -> std::io::Result<usize> {
    let len = arena.len;
    arena.sizes.clear();
    arena.arrivals.clear();
    let mut iovs: Vec<libc::iovec> = arena.bufs.chunks_mut(len).map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
    let mut msgs: Vec<libc::mmsghdr> = arena
        .addrs
        .iter_mut()
        .zip(iovs.iter_mut())
        .zip(arena.controls.iter_mut())
        .map(|((addr, iov), control)| {
            // SAFETY: all-zero bytes are a valid msghdr.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (addr as *mut RawAddr).cast();
            h.msg_namelen = std::mem::size_of::<RawAddr>() as libc::socklen_t;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
            h.msg_control = control.as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of_val(control);
            libc::mmsghdr { msg_hdr: h, msg_len: 0 }
        })
        .collect();
    // SAFETY: every header points into the arena's buffers and addresses, alive and unmoved
    // for the duration of the call.
    let n = unsafe { libc::recvmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(0),
            _ => Err(e),
        };
    }
    let n = n as usize;
    arena.sizes.extend(msgs[..n].iter().map(|m| m.msg_len as usize));
    arena.arrivals.extend(msgs[..n].iter().map(|m| arrival_of(&m.msg_hdr)));
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_out_and_comes_back_in_order_with_its_senders() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.set_nonblocking(true).expect("nonblocking");
        let to = b.local_addr().expect("addr");
        let payloads: Vec<Vec<u8>> = (0..70u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let batch: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (to, p.as_slice())).collect();
        assert_eq!(send_batch(&a, &batch), 70, "two calls: 64 and 6");
        let mut arena = RecvArena::new(64);
        let mut got: Vec<Vec<u8>> = Vec::new();
        for _ in 0..100 {
            if recv_batch(&b, &mut arena).expect("recv") == 0 && got.len() == 70 {
                break;
            }
            for (bytes, from, _) in arena.datagrams() {
                assert_eq!(from, a.local_addr().ok());
                got.push(bytes.to_vec());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got.len(), 70);
        for (i, g) in got.iter().enumerate() {
            let want = &payloads[i][..payloads[i].len().min(64)];
            assert_eq!(g.as_slice(), want, "datagram {i}, cut at the arena's length");
        }
    }

    /// With stamps on, every datagram comes with its arrival time on the real-time clock:
    /// after it was sent, before it was taken.
    #[test]
    fn datagrams_come_with_the_kernels_arrival_stamp() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.set_nonblocking(true).expect("nonblocking");
        assert!(enable_arrival_stamps(&b));
        // The kernel turns receive stamping on shortly after the first socket asks (a
        // deferred switch); until then it stamps a datagram when it is taken — later, and so
        // still on the safe side, but not what this test looks at.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let to = b.local_addr().expect("addr");
        let before = clock_ns(libc::CLOCK_REALTIME);
        assert_eq!(send_batch(&a, &[(to, b"one"), (to, b"two")]), 2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut arena = RecvArena::new(64);
        assert_eq!(recv_batch(&b, &mut arena).expect("recv"), 2);
        let after = clock_ns(libc::CLOCK_REALTIME);
        for (_, _, at) in arena.datagrams() {
            let at = at.expect("stamped");
            assert!(before <= at && at + 15_000_000 <= after, "arrived at {at}, sent after {before}, taken at {after}");
        }
    }

    #[test]
    fn an_unsendable_datagram_is_dropped_and_the_rest_still_go() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = b.local_addr().expect("addr");
        let v6: SocketAddr = "[::1]:9".parse().expect("addr");
        let big = vec![0u8; 70_000];
        let batch: Vec<(SocketAddr, &[u8])> = vec![(to, b"one"), (v6, b"wrong family"), (to, &big), (to, b"two")];
        assert_eq!(send_batch(&a, &batch), 2);
    }
}
