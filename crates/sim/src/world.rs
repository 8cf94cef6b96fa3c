//! The simulated world the agents live in: network, shared heartbeat disk, hypervisor and
//! clocks. Everything here runs on one thread in virtual (paused tokio) time and draws its
//! randomness from one seeded generator, so a seed replays exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tandem_agent::disk::DiskError;
use tandem_agent::httpc::{HttpError, Response};
use tandem_agent::io::{Clock, HeartbeatTransport, PeerRpc, SlotDevice};
use tandem_core::diskformat::{slot_offset, DiskHeader, DISK_SIZE, HEADER_SIZE};
use tandem_core::wire::SLOT_SIZE;
use tandem_core::{HostId, Millis};
use tandem_drivers::BoxFuture;
use tokio::sync::mpsc;

/// SplitMix64: the simulation's only source of randomness.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How the shared heartbeat disk behaves for one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskMode {
    Ok,
    /// Every I/O fails at once.
    Fail,
    /// Every I/O hangs until the mode changes back.
    Hang,
    /// The host's `heartbeat_disk` is a private copy of the shared disk (a path typo to an old
    /// copy, a mount missing at boot): its writes and reads go to that copy only.
    Private,
    /// Writes reach the shared disk; every read fails (a broken read path).
    WriteOnly,
}

/// Network and disk conditions, changed by faults.
#[derive(Debug)]
pub struct Conditions {
    /// `blocked.contains(&(a, b))`: nothing from host a reaches host b.
    pub blocked: BTreeSet<(u32, u32)>,
    /// `heartbeats_blocked.contains(&(a, b))`: host a's heartbeats do not reach host b, while
    /// its API calls do (a heal that reaches the heartbeat path last).
    pub heartbeats_blocked: BTreeSet<(u32, u32)>,
    /// Hosts that are powered off.
    pub down: BTreeSet<u32>,
    /// Datagram loss, duplication: chance out of 1000.
    pub loss_permille: u64,
    pub dup_permille: u64,
    /// Extra delay drawn up to this bound, per datagram and per RPC.
    pub max_delay_ms: u64,
    pub disk: BTreeMap<u32, DiskMode>,
    /// Frozen hosts (a long pause: SIGSTOP, a stalled hypervisor) and since when.
    pub frozen: BTreeMap<u32, tokio::time::Instant>,
    /// How far each host's clock has jumped forward since it booted, in ms.
    pub clock_jump_ms: BTreeMap<u32, u64>,
    /// Hosts whose liveness path alone is stalled (its thread starved): their heartbeats and
    /// slot I/O wait, while the rest of the agent runs.
    pub liveness_stalled: BTreeSet<u32>,
}

/// A datagram waiting in a host's socket buffer: bytes and sender.
/// A datagram in a host's inbox: its bytes, sender, and when it arrived.
type Datagram = (Vec<u8>, SocketAddr, tokio::time::Instant);

/// What every simulated part shares.
pub struct World {
    pub rng: Mutex<Rng>,
    pub cond: Mutex<Conditions>,
    /// Heartbeat inboxes, by host.
    inboxes: Mutex<BTreeMap<u32, mpsc::Sender<Datagram>>>,
    /// API routers of the hosts that are up, by host.
    pub routers: Mutex<BTreeMap<u32, axum::Router>>,
    /// The shared heartbeat disk.
    disk: Mutex<Vec<u8>>,
    /// Private copies of the disk, for hosts in [`DiskMode::Private`].
    private_disks: Mutex<BTreeMap<u32, Vec<u8>>>,
    /// Which hosts run which VM now: VM → (host → generation).
    pub running: Mutex<BTreeMap<String, BTreeMap<u32, u64>>>,
    /// Live migrations' memory images: VM → what the latest completed migration delivered and
    /// when any copy last began to run (a resume from an image older than that is stale).
    pub images: Mutex<BTreeMap<String, VmImage>>,
    /// VMs' local disks: which host's copy is current (see `localdisk`).
    pub local_disks: Mutex<BTreeMap<String, crate::localdisk::DiskCopies>>,
    /// Each host's site, by index (empty: no sites).
    pub sites: Mutex<Vec<String>>,
    /// Disks mirrored between sites: what each site's copy holds (see `mirror`).
    pub site_copies: Mutex<BTreeMap<String, crate::mirror::SiteCopies>>,
    /// The mutation check's broken hypervisor: migrations complete without their disks' mirror.
    pub skip_disk_sync: std::sync::atomic::AtomicBool,
    /// The mutation check's broken mirrors: a lost copy's writes are not held.
    pub mirror_without_hold: std::sync::atomic::AtomicBool,
    /// The simulated driver opens mirrored disks' own copies directly, as a driver without
    /// local copy servers (odd seeds): hung storage is then answered by a restart elsewhere, not
    /// by a cut — both answers stay exercised.
    pub local_copies_direct: std::sync::atomic::AtomicBool,
    /// Sites whose storage fails every request (fault `site-storage-loss`).
    pub storage_down: Mutex<std::collections::BTreeSet<String>>,
    /// Sites whose storage answers no request at all (fault `site-storage-hang`).
    pub storage_hung: Mutex<std::collections::BTreeSet<String>>,
    /// The witness's region answers nobody (fault `witness-loss`).
    pub witness_down: std::sync::atomic::AtomicBool,
    /// Invariant violations seen while running (double runs are caught at the start).
    pub violations: Mutex<Vec<String>>,
    /// Readable trace lines, in order.
    pub trace: Mutex<Vec<String>>,
    /// Virtual time origin.
    pub origin: tokio::time::Instant,
    /// Host → API address and heartbeat address.
    pub addrs: Vec<(String, SocketAddr)>,
}

impl World {
    pub fn new(seed: u64, hosts: u32) -> Arc<World> {
        let addrs = (0..hosts)
            .map(|i| {
                let ip = format!("198.18.1.{}", 10 + i);
                (format!("{ip}:7400"), SocketAddr::from(([198, 18, 1, 10 + i as u8], 7401)))
            })
            .collect();
        Arc::new(World {
            rng: Mutex::new(Rng(seed)),
            cond: Mutex::new(Conditions {
                blocked: BTreeSet::new(),
                heartbeats_blocked: BTreeSet::new(),
                down: BTreeSet::new(),
                loss_permille: 0,
                dup_permille: 0,
                max_delay_ms: 2,
                disk: BTreeMap::new(),
                frozen: BTreeMap::new(),
                liveness_stalled: BTreeSet::new(),
                clock_jump_ms: BTreeMap::new(),
            }),
            inboxes: Mutex::new(BTreeMap::new()),
            images: Mutex::new(BTreeMap::new()),
            local_disks: Mutex::new(BTreeMap::new()),
            sites: Mutex::new(Vec::new()),
            site_copies: Mutex::new(BTreeMap::new()),
            skip_disk_sync: std::sync::atomic::AtomicBool::new(false),
            mirror_without_hold: std::sync::atomic::AtomicBool::new(false),
            local_copies_direct: std::sync::atomic::AtomicBool::new(false),
            witness_down: std::sync::atomic::AtomicBool::new(false),
            storage_down: Mutex::new(std::collections::BTreeSet::new()),
            storage_hung: Mutex::new(std::collections::BTreeSet::new()),
            routers: Mutex::new(BTreeMap::new()),
            disk: Mutex::new(vec![0; DISK_SIZE]),
            private_disks: Mutex::new(BTreeMap::new()),
            running: Mutex::new(BTreeMap::new()),
            violations: Mutex::new(Vec::new()),
            trace: Mutex::new(Vec::new()),
            origin: tokio::time::Instant::now(),
            addrs,
        })
    }

    /// Virtual milliseconds since the start.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn log(&self, line: String) {
        let l = format!("{:>9.3} {line}", self.now_ms() as f64 / 1000.0);
        lock(&self.trace).push(l);
    }

    /// Records a broken invariant (from the shared oracle's vocabulary).
    pub fn violation(&self, v: crate::oracle::Violation) {
        self.record(v.invariant.name(), &v.detail);
    }

    /// Records a failure of the simulator itself (an agent that would not start): the run
    /// proves nothing, so it counts as a finding too.
    pub fn harness_error(&self, detail: String) {
        self.record("sim-error", &detail);
    }

    fn record(&self, what: &str, detail: &str) {
        self.log(format!("VIOLATION {what}: {detail}"));
        lock(&self.violations).push(format!("{what} at {:.3} s: {detail}", self.now_ms() as f64 / 1000.0));
    }

    fn host_of_api(&self, addr: &str) -> Option<u32> {
        self.addrs.iter().position(|(a, _)| a == addr).map(|i| i as u32)
    }

    fn host_of_hb(&self, addr: SocketAddr) -> Option<u32> {
        self.addrs.iter().position(|(_, a)| *a == addr).map(|i| i as u32)
    }

    /// Whether a message from `a` reaches `b` now.
    pub(crate) fn reaches(&self, a: u32, b: u32) -> bool {
        let c = lock(&self.cond);
        !c.down.contains(&a) && !c.down.contains(&b) && !c.blocked.contains(&(a, b))
    }

    fn delay(&self) -> Duration {
        let max = lock(&self.cond).max_delay_ms;
        Duration::from_millis(lock(&self.rng).below(max + 1))
    }

    pub fn is_frozen(&self, h: u32) -> bool {
        lock(&self.cond).frozen.contains_key(&h)
    }

    /// Returns once host `h` is not frozen: a frozen host does nothing the world could see.
    pub async fn thawed(&self, h: u32) {
        while self.is_frozen(h) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Returns once host `h` is thawed and its liveness path is not stalled.
    pub async fn liveness_runs(&self, h: u32) {
        self.thawed(h).await;
        while lock(&self.cond).liveness_stalled.contains(&h) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Formats the shared disk for the cluster of `key`, as `tandem disk format` does.
    pub fn format_disk(&self, key: &tandem_core::wire::ClusterKey) {
        let header = DiskHeader::for_cluster(key).encode(key);
        lock(&self.disk)[..HEADER_SIZE].copy_from_slice(&header);
    }

    /// Sets how host `h` sees the heartbeat disk. Entering [`DiskMode::Private`] copies the
    /// shared disk as it is now; leaving it drops the copy.
    pub fn set_disk_mode(&self, h: u32, mode: DiskMode) {
        if mode == DiskMode::Private {
            let copy = lock(&self.disk).clone();
            lock(&self.private_disks).insert(h, copy);
        } else {
            lock(&self.private_disks).remove(&h);
        }
        if mode == DiskMode::Ok {
            lock(&self.cond).disk.remove(&h);
        } else {
            lock(&self.cond).disk.insert(h, mode);
        }
    }

    /// Every host sees the shared disk again.
    pub fn heal_disks(&self) {
        lock(&self.private_disks).clear();
        lock(&self.cond).disk.clear();
    }

    /// Runs `f` on the disk host `h` writes to and reads from.
    fn with_disk<T>(&self, h: u32, f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        let mut private = lock(&self.private_disks);
        match private.get_mut(&h) {
            Some(copy) => f(copy),
            None => {
                drop(private);
                f(&mut lock(&self.disk))
            }
        }
    }

    pub fn disk_mode(&self, h: u32) -> DiskMode {
        lock(&self.cond).disk.get(&h).copied().unwrap_or(DiskMode::Ok)
    }

    /// Registers host `h`'s heartbeat inbox (a restarted host gets a new one).
    pub fn inbox(&self, h: u32) -> mpsc::Receiver<Datagram> {
        let (tx, rx) = mpsc::channel(256);
        lock(&self.inboxes).insert(h, tx);
        rx
    }

    /// Every VM that host `h` runs dies (power loss).
    pub fn power_off_vms(&self, h: u32) {
        for hosts in lock(&self.running).values_mut() {
            hosts.remove(&h);
        }
    }
}

/// A host's clock: virtual time since the host booted, running fast or slow by `drift_ppm`,
/// plus any forward jumps; it stands still while the host is frozen (a frozen process reads no
/// clock) and catches up at once when it thaws.
pub struct SimClock {
    pub world: Arc<World>,
    pub me: u32,
    pub boot: tokio::time::Instant,
    pub drift_ppm: i64,
}

impl Clock for SimClock {
    fn now(&self) -> Millis {
        let (frozen_at, jump) = {
            let c = lock(&self.world.cond);
            (c.frozen.get(&self.me).copied(), c.clock_jump_ms.get(&self.me).copied().unwrap_or(0))
        };
        let at = frozen_at.unwrap_or_else(tokio::time::Instant::now);
        let ms = at.saturating_duration_since(self.boot).as_millis() as i128;
        Millis((ms + ms * i128::from(self.drift_ppm) / 1_000_000 + i128::from(jump)).max(0) as u64)
    }
}

/// A host's network endpoint for heartbeats.
pub struct SimTransport {
    pub world: Arc<World>,
    pub me: u32,
    pub inbox: tokio::sync::Mutex<mpsc::Receiver<Datagram>>,
}

impl HeartbeatTransport for SimTransport {
    fn send_to<'a>(&'a self, bytes: &'a [u8], to: SocketAddr) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let w = &self.world;
            w.liveness_runs(self.me).await;
            let Some(target) = w.host_of_hb(to) else { return Ok(()) };
            if !w.reaches(self.me, target) || lock(&w.cond).heartbeats_blocked.contains(&(self.me, target)) {
                return Ok(());
            }
            let (lost, dup) = {
                let (loss, dupp) = {
                    let c = lock(&w.cond);
                    (c.loss_permille, c.dup_permille)
                };
                let mut r = lock(&w.rng);
                (r.chance(loss, 1000), r.chance(dupp, 1000))
            };
            if lost {
                return Ok(());
            }
            let from = w.addrs[self.me as usize].1;
            for _ in 0..(1 + usize::from(dup)) {
                let d = w.delay();
                let world = Arc::clone(w);
                let bytes = bytes.to_vec();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let tx = lock(&world.inboxes).get(&target).cloned();
                    if let Some(tx) = tx {
                        // A full inbox drops the datagram, as a socket buffer would.
                        let _ = tx.try_send((bytes, from, tokio::time::Instant::now()));
                    }
                });
            }
            Ok(())
        })
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> std::io::Result<Option<(usize, SocketAddr, Option<Duration>)>> {
        // A frozen host, or one whose liveness path is stalled, reads its socket only once it
        // runs again; what arrived meanwhile waits in its inbox.
        if self.world.is_frozen(self.me) || lock(&self.world.cond).liveness_stalled.contains(&self.me) {
            return Ok(None);
        }
        let Ok(mut inbox) = self.inbox.try_lock() else { return Ok(None) };
        match inbox.try_recv() {
            Ok((bytes, from, arrived)) => {
                let n = bytes.len().min(buf.len());
                buf[..n].copy_from_slice(&bytes[..n]);
                // Like the kernel's receive stamp: how long it waited in the inbox.
                Ok(Some((n, from, Some(arrived.elapsed()))))
            }
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "host is down")),
        }
    }
}

/// A host's view of the shared heartbeat disk.
pub struct SimDisk {
    pub world: Arc<World>,
    pub me: u32,
}

impl SimDisk {
    async fn gate(&self, read: bool) -> Result<(), DiskError> {
        self.world.liveness_runs(self.me).await;
        loop {
            if lock(&self.world.cond).down.contains(&self.me) {
                return Err(DiskError::Io(std::io::Error::other("host is powered off")));
            }
            match self.world.disk_mode(self.me) {
                DiskMode::Ok | DiskMode::Private => return Ok(()),
                DiskMode::WriteOnly if read => return Err(DiskError::Io(std::io::Error::other("simulated read-path failure"))),
                DiskMode::WriteOnly => return Ok(()),
                DiskMode::Fail => return Err(DiskError::Io(std::io::Error::other("simulated disk failure"))),
                // A hung request completes once the disk answers again (or the caller gives up).
                DiskMode::Hang => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl SlotDevice for SimDisk {
    /// A write the agent gave up on (the disk hung past its timeout) still lands once the disk
    /// answers, unless the host lost power first: a real device's I/O thread finishes it. Its
    /// slot then says what the host heard when it began, after newer heartbeats.
    fn write_slot(&self, slot: HostId, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), DiskError>> {
        let disk = SimDisk { world: Arc::clone(&self.world), me: self.me };
        let write = tokio::spawn(async move {
            disk.gate(false).await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
            let off = slot_offset(slot) as usize;
            let n = bytes.len().min(SLOT_SIZE);
            disk.world.with_disk(disk.me, |d| d[off..off + n].copy_from_slice(&bytes[..n]));
            Ok(())
        });
        Box::pin(async move { write.await.unwrap_or_else(|e| Err(DiskError::Io(std::io::Error::other(e.to_string())))) })
    }

    fn read_all(&self) -> BoxFuture<'_, Result<Vec<u8>, DiskError>> {
        Box::pin(async move {
            self.gate(true).await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(self.world.with_disk(self.me, |d| tandem_core::diskformat::area_image(d)))
        })
    }
}

/// A host's calls to other agents' APIs, through the simulated network.
pub struct SimRpc {
    pub world: Arc<World>,
    pub me: u32,
}

impl PeerRpc for SimRpc {
    fn call<'a>(
        &'a self,
        addr: &'a str,
        path: &'a str,
        token: Option<&'a str>,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Response, HttpError>> {
        Box::pin(async move {
            let w = &self.world;
            w.thawed(self.me).await;
            let timed_out = || HttpError::Timeout { addr: addr.to_string(), timeout };
            let Some(target) = w.host_of_api(addr) else {
                return Err(HttpError::Protocol { addr: addr.into(), detail: "no such host".into() });
            };
            // Never a connection to ourselves (openraft's rule). A blocked or dead path behaves
            // like TCP's connect: the SYN is sent again after 1, 2, 4 ... s, and the call goes
            // through at the first retry after the path opens, or times out. (A call made during a
            // partition can therefore complete well after the partition healed.)
            let mut waited = Duration::ZERO;
            let mut backoff = Duration::from_secs(1);
            let router = loop {
                if w.reaches(self.me, target) {
                    if let Some(r) = lock(&w.routers).get(&target).cloned() {
                        break r;
                    }
                }
                if waited + backoff >= timeout {
                    tokio::time::sleep(timeout - waited).await;
                    return Err(timed_out());
                }
                tokio::time::sleep(backoff).await;
                waited += backoff;
                backoff *= 2;
            };
            let timeout = timeout - waited;
            let mut req = axum::http::Request::builder().uri(path).method(if body.is_some() { "POST" } else { "GET" });
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            req = req.header("content-type", "application/json");
            let req =
                req.body(axum::body::Body::from(body.unwrap_or_default())).map_err(|e| HttpError::Protocol { addr: addr.into(), detail: e.to_string() })?;
            let world = Arc::clone(w);
            let me = self.me;
            let exchange = async move {
                tokio::time::sleep(world.delay()).await;
                // A frozen host answers once it thaws (if the caller still waits).
                world.thawed(target).await;
                let resp = tower::ServiceExt::oneshot(router, req).await.map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.map_err(|e| e.to_string())?.to_bytes();
                tokio::time::sleep(world.delay()).await;
                // The answer must make it back too.
                if !world.reaches(target, me) {
                    return Err("answer lost".to_string());
                }
                Ok(Response { status, body: bytes })
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(_)) | Err(_) => Err(timed_out()),
            }
        })
    }
}

pub use crate::hypervisor::{SimDriver, VmImage, SIM_MIGRATION_COPY_MS, SIM_MIGRATION_LINK_LOSS_MS, SIM_SERVICE_BOOT_MS};
