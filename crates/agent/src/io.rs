//! The narrow interfaces through which the agent touches the world: time, heartbeat datagrams,
//! the heartbeat disk, calls to peer agents, and (in `tandem-drivers`) the hypervisor.
//!
//! Production wires them to CLOCK_BOOTTIME, a UDP socket, a file or block device and HTTP.
//! A simulator supplies its own implementations and runs several whole agents in one process;
//! the agent code does not know the difference.

use crate::disk::{DiskError, FileSlotDevice};
use crate::httpc::{self, HttpError, Response};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::{HostId, Millis};
use tandem_drivers::{BoxFuture, VmDriver};

/// The time source.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Millis;
}

/// Milliseconds since the agent started, on CLOCK_BOOTTIME: unlike CLOCK_MONOTONIC (Rust's
/// `Instant`), it keeps counting while the host is suspended, so a host that wakes from a
/// suspend sees its lease as long expired as its peers do, and never acts on it.
pub struct BootClock(u64);

/// CLOCK_BOOTTIME in milliseconds.
fn boottime_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer; CLOCK_BOOTTIME exists
    // on every Linux this runs on (2.6.39+), so it does not fail.
    unsafe {
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
    }
    (ts.tv_sec as u64).saturating_mul(1000) + (ts.tv_nsec as u64) / 1_000_000
}

impl BootClock {
    #[must_use]
    pub fn new() -> BootClock {
        BootClock(boottime_ms())
    }
}

impl Default for BootClock {
    fn default() -> Self {
        BootClock::new()
    }
}

impl Clock for BootClock {
    fn now(&self) -> Millis {
        Millis(boottime_ms().saturating_sub(self.0))
    }
}

/// Unreliable datagrams between agents, for network heartbeats.
pub trait HeartbeatTransport: Send + Sync + 'static {
    fn send_to<'a>(&'a self, bytes: &'a [u8], to: SocketAddr) -> BoxFuture<'a, std::io::Result<()>>;
    /// Sends a tick's datagrams, each to its address; one that cannot go is dropped, as the
    /// network would drop it. By default one `send_to` each.
    fn send_batch<'a>(&'a self, batch: &'a [(SocketAddr, &'a [u8])]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            for (to, bytes) in batch {
                let _ = self.send_to(bytes, *to).await;
            }
        })
    }
    /// Takes the next datagram already received, without waiting: its length, sender and how
    /// long it waited to be taken (when the transport knows: the kernel's receive stamp, or the
    /// simulator's), or `None` when there is none. The liveness loop polls (see
    /// [`RECEIVE_POLL_DIVISOR`]).
    fn try_recv_from(&self, buf: &mut [u8]) -> std::io::Result<Option<(usize, SocketAddr, Option<Duration>)>>;
    /// Hands up to `max` queued datagrams to `accept` with how long each waited (when known),
    /// without waiting; how many. By default one `try_recv_from` each, into `buf`.
    fn drain(&self, buf: &mut [u8], max: usize, accept: &mut dyn FnMut(&[u8], Option<Duration>)) -> std::io::Result<usize> {
        for taken in 0..max {
            match self.try_recv_from(buf)? {
                Some((n, _, waited)) => accept(&buf[..n.min(buf.len())], waited),
                None => return Ok(taken),
            }
        }
        Ok(max)
    }
}

mod mmsg;
pub use mmsg::MMSG_BATCH;

/// The liveness loop polls the heartbeat socket every `heartbeat_interval /
/// RECEIVE_POLL_DIVISOR`, and its tick falls on every `RECEIVE_POLL_DIVISOR`-th poll.
///
/// Polled, not registered with the async runtime: a registered socket wakes its thread for
/// every datagram, a context switch per peer per interval (171 a second for an idle agent of 32
/// hosts, 73 polled). Polled from the loop that also ticks, the thread wakes a fixed number of
/// times per second whatever the cluster's size (the tick costs no wake of its own), takes every
/// queued datagram, and stamps each at most one poll period late (`Agent::accept_datagram` says
/// why late is safe). A poll period's datagrams from 63 peers fit the default socket receive
/// buffer. Two polls per interval, not four: the liveness thread's wake-ups were the largest
/// share of an idle agent's CPU at 64 hosts, and a stamp half an interval late only moves
/// fence deadlines (never the unsafe way) by at most that.
///
/// Where the transport stamps arrivals (the kernel's receive timestamp, [`UdpTransport`]), a
/// datagram is stamped with its arrival rather than with the poll, and the heartbeat disk's
/// I/O thread stamps when each read completed (`SlotRound::read_done`): the disk round's answer
/// is taken at the next poll, but its slot changes count as of the read's end. So while the
/// cluster is calm the loop polls once per interval (`Liveness::polls_sparse`), and at this
/// divisor otherwise. (Before the disk stamped its answers, one poll per interval stamped
/// slot changes a poll later and moved the median restart commit from 3.2 to 3.3 s.)
pub const RECEIVE_POLL_DIVISOR: u32 = 2;

/// How much the real-time clock may move against the boot-time clock between two drains for
/// the kernel's arrival stamps (on the real-time clock) to be trusted: more is a clock step,
/// and that drain's datagrams are stamped when taken, as without stamps. Within it (slewing,
/// at most 0.5 ms per second), a stamp is moved a millisecond later to stay on the late side.
pub const ARRIVAL_STEP_TOLERANCE: Duration = Duration::from_millis(1);

/// The most datagrams one poll takes: a flood (of forged datagrams, say) cannot keep the loop
/// from its tick; what is left waits for the next poll or is dropped by the socket's buffer.
pub const MAX_DATAGRAMS_PER_POLL: usize = 4 * tandem_core::MAX_HOSTS;

/// A UDP socket, bound at start (so a taken port is an error then) and non-blocking.
/// Sends and receives in batches (`sendmmsg`, `recvmmsg`; see `io/mmsg`), with the kernel's
/// arrival stamps where it gives them.
pub struct UdpTransport {
    socket: std::net::UdpSocket,
    /// Where `drain` receives: only the liveness thread drains, so this is never contended.
    receiving: std::sync::Mutex<Receiving>,
    stamps: bool,
}

struct Receiving {
    arena: mmsg::RecvArena,
    /// CLOCK_REALTIME less CLOCK_BOOTTIME at the start of the previous drain, and whether that
    /// drain emptied the queue: then every datagram of this drain arrived after that instant,
    /// and the clocks' offset since then tells whether the real-time clock was stepped while
    /// it waited.
    offset_before: Option<i128>,
    emptied: bool,
}

impl Receiving {
    /// How long each datagram of the arena waited, at `real_now` (ns), if the stamps can be
    /// trusted: the previous drain emptied the queue and the clocks' offset held since it.
    fn waits(&self, trusted: bool, real_now: i128) -> impl Iterator<Item = (&[u8], Option<Duration>)> {
        self.arena.datagrams().map(move |(bytes, _, at)| {
            let waited = at.filter(|_| trusted).map(|at| Duration::from_nanos(u64::try_from(real_now - at).unwrap_or(0)));
            (bytes, waited)
        })
    }
}

impl UdpTransport {
    pub fn bind(addr: SocketAddr) -> std::io::Result<UdpTransport> {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        // A longer datagram is cut here, and then refused by its decoder as malformed.
        let arena = mmsg::RecvArena::new(tandem_core::wire::MAX_HEARTBEAT_LEN + 1);
        let stamps = mmsg::enable_arrival_stamps(&socket);
        if !stamps {
            tracing::warn!("the kernel refused receive timestamps on the heartbeat socket: datagrams are stamped when taken");
        }
        Ok(UdpTransport { socket, receiving: std::sync::Mutex::new(Receiving { arena, offset_before: None, emptied: false }), stamps })
    }
}

impl HeartbeatTransport for UdpTransport {
    fn send_to<'a>(&'a self, bytes: &'a [u8], to: SocketAddr) -> BoxFuture<'a, std::io::Result<()>> {
        // A full send buffer drops the datagram, as a congested network would.
        Box::pin(async move { self.socket.send_to(bytes, to).map(|_| ()) })
    }
    fn send_batch<'a>(&'a self, batch: &'a [(SocketAddr, &'a [u8])]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            mmsg::send_batch(&self.socket, batch);
        })
    }
    fn drain(&self, _buf: &mut [u8], max: usize, accept: &mut dyn FnMut(&[u8], Option<Duration>)) -> std::io::Result<usize> {
        let mut r = self.receiving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let offset = || mmsg::clock_ns(libc::CLOCK_REALTIME) - mmsg::clock_ns(libc::CLOCK_BOOTTIME);
        let since = r.offset_before.filter(|_| self.stamps && r.emptied);
        r.offset_before = Some(offset());
        r.emptied = false;
        let tolerance = ARRIVAL_STEP_TOLERANCE.as_nanos() as i128;
        let mut taken = 0;
        while taken < max {
            let n = mmsg::recv_batch(&self.socket, &mut r.arena)?;
            let real_now = mmsg::clock_ns(libc::CLOCK_REALTIME);
            let trusted = since.is_some_and(|before| (offset() - before).abs() <= tolerance);
            for (bytes, waited) in r.waits(trusted, real_now) {
                accept(bytes, waited);
            }
            taken += n;
            if n < MMSG_BATCH {
                r.emptied = true;
                break;
            }
        }
        Ok(taken)
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> std::io::Result<Option<(usize, SocketAddr, Option<Duration>)>> {
        loop {
            match self.socket.recv_from(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => return other.map(|(n, from)| Some((n, from, None))),
            }
        }
    }
}

/// The raw heartbeat area: one fixed-size slot per host. Implementations may hang (shared
/// storage does); the caller puts a deadline on every call.
pub trait SlotDevice: Send + Sync + 'static {
    /// Writes one whole slot (`SLOT_SIZE` bytes).
    fn write_slot(&self, slot: HostId, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), DiskError>>;
    /// Reads the whole area (`DISK_SIZE` bytes) and hands over its image: the header's record
    /// and every slot's (`tandem_core::diskformat::area_image`).
    fn read_all(&self) -> BoxFuture<'_, Result<Vec<u8>, DiskError>>;
    /// Writes one slot, then reads every slot: a liveness round. Each half is bounded by
    /// `timeout`; a device may do both in one request.
    fn write_then_read_all(&self, slot: HostId, bytes: Vec<u8>, timeout: Duration) -> BoxFuture<'_, SlotRound> {
        Box::pin(async move {
            let write = tokio::time::timeout(timeout, self.write_slot(slot, bytes)).await.unwrap_or(Err(DiskError::Timeout(timeout)));
            let read = tokio::time::timeout(timeout, self.read_all()).await.unwrap_or(Err(DiskError::Timeout(timeout)));
            SlotRound { write, read, read_done: None }
        })
    }
    /// [`SlotDevice::read_all`], and when the read completed if the device knows it better
    /// than its caller, who takes the answer later (see [`SlotRound::read_done`]).
    fn read_all_stamped(&self) -> BoxFuture<'_, StampedRead> {
        Box::pin(async move { (self.read_all().await, None) })
    }
    /// The path the disk is reached through now, for a device with several (a single path
    /// never changes, and says nothing).
    fn path_in_use(&self) -> Option<std::path::PathBuf> {
        None
    }
}

/// A read of the heartbeat area, and when it completed if the device stamped it.
pub type StampedRead = (Result<Vec<u8>, DiskError>, Option<std::time::Instant>);

/// What a write-then-read round of the heartbeat disk gave.
pub struct SlotRound {
    pub write: Result<(), DiskError>,
    pub read: Result<Vec<u8>, DiskError>,
    /// When the read completed, stamped by the device's own I/O thread: the liveness thread
    /// takes the answer at its next poll, and the slot changes a read saw are evidence as of
    /// its end, so the poll's time would make them later than they are. `None`: the caller
    /// stamps the answer when it gets it.
    pub read_done: Option<std::time::Instant>,
}

/// Requests to another agent's API (consensus RPCs, forwarded writes, joins).
pub trait PeerRpc: Send + Sync + 'static {
    /// Sends `body` (POST) or nothing (GET) to `path` on the agent whose API is at `addr`.
    fn call<'a>(
        &'a self,
        addr: &'a str,
        path: &'a str,
        token: Option<&'a str>,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Response, HttpError>>;
}

/// HTTP/1.1 over TCP, or over TLS when the cluster uses it, on kept-alive connections.
#[derive(Default)]
pub struct HttpRpc {
    pub pool: httpc::ConnectionPool,
}

impl PeerRpc for HttpRpc {
    fn call<'a>(
        &'a self,
        addr: &'a str,
        path: &'a str,
        token: Option<&'a str>,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Response, HttpError>> {
        let method = if body.is_some() { "POST" } else { "GET" };
        Box::pin(self.pool.request(method, addr, path, token, body, timeout))
    }
}

/// Everything an agent needs from outside, as trait objects.
#[derive(Clone)]
pub struct AgentIo {
    pub clock: Arc<dyn Clock>,
    pub heartbeats: Arc<dyn HeartbeatTransport>,
    pub disk: Arc<dyn SlotDevice>,
    pub rpc: Arc<dyn PeerRpc>,
    pub driver: Arc<dyn VmDriver>,
    /// Whether the agent runs OS threads of its own: the liveness thread and runtime, the
    /// software watchdog (it reads the real clock) and the blocking pool for heavy work. A
    /// simulator, deterministic on one runtime and freezing hosts itself, turns them off.
    pub os_threads: bool,
    /// A safety mechanism broken on purpose. Only the simulator's mutation checks set one, to
    /// show that the simulator catches what follows; production wiring and configuration cannot.
    pub mutation: Option<Mutation>,
    /// The disk witness's region, when the cluster keeps one.
    pub witness: Option<Arc<dyn crate::witness::WitnessRegion>>,
}

/// A safety mechanism the simulator's mutation checks switch off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// The coordinator fails a host over as soon as it stops hearing it, without waiting for
    /// its fence deadline or its fenced record.
    SkipFenceWait,
    /// A host starts VMs without checking that it holds its liveness lease.
    SkipLeaseCheck,
    /// The coordinator counts fence deadlines from evidence `self_fence_ms` too early.
    EarlyEvidence,
    /// A live migration's destination resumes its paused copy as soon as it is prepared,
    /// without waiting for the switchover's commit.
    ResumeBeforeSwitchover,
    /// The simulated hypervisor reports a migration complete before its local disks' mirror is
    /// in sync (what the QEMU driver's `diskcopy::complete` prevents); the agent itself ignores it.
    SwitchoverBeforeDiskSync,
    /// The simulated mirrors do not hold the writes of a lost copy (what the QEMU driver's relay
    /// does): the guest's writes complete at once on its own site's copy, before committed state
    /// counts the other copy stale; the agent itself ignores it.
    MirrorWithoutHold,
}

/// A heartbeat disk on shared storage, over one path or several.
pub async fn open_heartbeat_disk(heartbeat_disk: &Path, more_paths: &[std::path::PathBuf]) -> Result<Arc<dyn SlotDevice>, DiskError> {
    if more_paths.is_empty() {
        return Ok(Arc::new(FileSlotDevice::open(heartbeat_disk)?));
    }
    let paths: Vec<std::path::PathBuf> = std::iter::once(heartbeat_disk.to_path_buf()).chain(more_paths.iter().cloned()).collect();
    let dev = crate::multipath::MultipathSlotDevice::open(&paths)?;
    // Every path the same disk: refused at start otherwise.
    dev.check_paths_agree(crate::multipath::PATH_CHECK_TIMEOUT).await?;
    Ok(Arc::new(dev))
}

impl AgentIo {
    /// The production wiring: boot-time clock, UDP, the heartbeat area's device, HTTP.
    pub fn production(
        heartbeat_addr: SocketAddr,
        disk: Arc<dyn SlotDevice>,
        driver: Arc<dyn VmDriver>,
        tls: Option<crate::tls::ClientTls>,
    ) -> Result<AgentIo, crate::agent::AgentError> {
        let heartbeats =
            UdpTransport::bind(heartbeat_addr).map_err(|source| crate::agent::AgentError::Bind { what: "heartbeat socket", addr: heartbeat_addr, source })?;
        Ok(AgentIo {
            clock: Arc::new(BootClock::new()),
            heartbeats: Arc::new(heartbeats),
            disk,
            rpc: Arc::new(HttpRpc { pool: httpc::ConnectionPool::new(tls) }),
            driver,
            os_threads: true,
            mutation: None,
            witness: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's clock is CLOCK_BOOTTIME (counts through a suspend), and it advances.
    #[test]
    fn the_clock_counts_boot_time() {
        let c = BootClock::new();
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: as in boottime_ms.
        unsafe {
            libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
        }
        let boot_ms = ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000;
        assert!(boot_ms.abs_diff(c.0) < 1000, "origin {} is not CLOCK_BOOTTIME {boot_ms}", c.0);
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.now().0 >= 20);
    }

    /// A drain reports how long each datagram waited only when the drain before it emptied
    /// the queue (so every datagram arrived after it began): the first drain cannot say.
    #[test]
    fn waits_are_reported_once_a_drain_emptied_the_queue() {
        let rx = UdpTransport::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        assert!(rx.stamps, "the kernel stamps arrivals");
        let to = rx.socket.local_addr().expect("addr");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut buf = [0u8; 16];
        let mut drain = || {
            let mut got = Vec::new();
            rx.drain(&mut buf, 8, &mut |bytes, waited| got.push((bytes.to_vec(), waited))).expect("drain");
            got
        };
        // Stamping is switched on shortly after the first socket asks (see `io/mmsg`).
        std::thread::sleep(Duration::from_millis(100));
        tx.send_to(b"first", to).expect("send");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(drain(), vec![(b"first".to_vec(), None)], "no drain before it: the wait is unknown");
        tx.send_to(b"second", to).expect("send");
        std::thread::sleep(Duration::from_millis(30));
        let got = drain();
        assert_eq!(got.len(), 1);
        let waited = got[0].1.expect("a wait after a drain that emptied the queue");
        assert!(waited >= Duration::from_millis(25) && waited < Duration::from_secs(5), "waited {waited:?}");
    }
}
