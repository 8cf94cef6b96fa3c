//! The agent's relay between a VM's QEMU and the other site's copy server: QEMU's NBD client
//! connects to a unix socket here, and the relay carries the bytes to the copy server through
//! the copy channel (`copychannel`: TCP, TLS with `[tls]`, a handshake over the cluster key).
//!
//! It exists so that the agent, not a timer in QEMU or TCP, decides when a mirrored disk's
//! writes may complete on one copy. When the other copy stops answering — the connection fails,
//! or bytes were sent and nothing came back for `stall` (a cut link drops packets silently, and
//! TCP would retransmit for minutes) — the relay keeps QEMU's side open and forwards nothing:
//! QEMU's writes to the other copy wait, and so do the guest's writes. They complete only when
//! the agent calls [`CopyRelay::release`], after the cluster has committed that copy as stale:
//! the relay then closes QEMU's side, QEMU's NBD client (whose `reconnect-delay` is 0) fails
//! the waiting writes at once, and the mirror stops with them in its bitmap. If the agent dies
//! the relay dies with it — and so does the VM, forked with the agent's death signal.
//!
//! A copy server can also *answer* a write with an error (its storage failing): QEMU's mirror
//! would then stop and the guest's write complete on the local copy alone, just the same. So
//! the relay follows the NBD conversation (`nbdwatch`) and treats an error reply — or anything
//! it cannot read — as a lost copy: the reply is held, not passed on.
//!
//! After a release, each new connection from QEMU (its client reconnects by itself) is joined
//! to a fresh connection to the copy server if one can be made within `connect`, and closed
//! otherwise.
//!
//! While a mirror copies the disk into a stale copy whose chunk sums the relay was given
//! (`compare_with`), it rewrites the conversation (`delta`): writes of bytes the copy already
//! holds are answered here, and only the rest crosses the link. Once the copy is in sync
//! (`end_delta`) it carries bytes as they come again.

mod delta;
mod nbdwatch;

pub use nbdwatch::MAX_TRACKED_REQUESTS;

use crate::copychannel::{CopyCredentials, CopyStream};
pub use delta::{DeltaStats, MAX_DELTA_WRITE};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The default time without an answer, with bytes outstanding, after which the other copy
/// counts as lost.
pub const DEFAULT_STALL: Duration = Duration::from_millis(1500);
/// How long a connection to the copy server may take (TLS and the handshake included).
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The relay's buffer per direction.
const CHUNK: usize = 256 * 1024;

/// Where the relay stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayHealth {
    /// No connection from QEMU yet (or QEMU closed its own).
    Idle,
    /// QEMU's connection joined to the copy server.
    Joined,
    /// The copy server stopped answering at `since`; QEMU's writes to it are held.
    Lost { since: Instant, why: String },
    /// Held writes were let go: QEMU's side was closed. New connections join again if the copy
    /// server answers.
    Released,
}

struct Shared {
    health: RelayHealth,
    /// The copy server's `host:port`: a host of the other site, which may change between
    /// connections (another host of that site serves the same copy).
    upstream: String,
    /// Bumped by `release`: a joined or held connection ends when it sees a newer value.
    releases: u64,
    /// Told when the copy is found lost (`waking`), so the agent need not wait for its round.
    wake: Option<Arc<tokio::sync::Notify>>,
    /// What the copy holds, while a resync compares by chunk sums.
    delta: Option<delta::DeltaTable>,
}

/// A running relay for one disk's remote copy.
pub struct CopyRelay {
    socket: PathBuf,
    creds: Arc<CopyCredentials>,
    shared: Arc<Mutex<Shared>>,
    released: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CopyRelay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A task aborted when its handle goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl CopyRelay {
    /// Listens on `socket` (replacing a stale one) and relays to the copy gate at `upstream`
    /// (`host:port`), with `creds`.
    pub fn start(socket: &Path, upstream: &str, stall: Duration, creds: Arc<CopyCredentials>) -> std::io::Result<CopyRelay> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let shared = Arc::new(Mutex::new(Shared { health: RelayHealth::Idle, upstream: upstream.to_string(), releases: 0, wake: None, delta: None }));
        let released = Arc::new(tokio::sync::Notify::new());
        let (s, r, c) = (Arc::clone(&shared), Arc::clone(&released), Arc::clone(&creds));
        let task = tokio::spawn(async move {
            // Aborted with the relay: a dropped relay carries nothing more.
            let mut current: Option<AbortOnDrop> = None;
            while let Ok((down, _)) = listener.accept().await {
                // A held connection is never given up for a new one: closing it would fail the
                // writes it holds, which QEMU would then complete on the local copy alone.
                if matches!(lock(&s).health, RelayHealth::Lost { .. }) {
                    drop(down);
                    continue;
                }
                // QEMU holds one connection per disk: a new one replaces the old.
                drop(current.take());
                let up = lock(&s).upstream.clone();
                // Closed with a reset, its unsent bytes dropped (`copychannel::connect`): writes
                // held here must never reach the copy later, when a healed link would carry
                // them to a copy that another host may be running the VM on by then.
                let upstream = match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, crate::copychannel::connect(&up, &c)).await {
                    Ok(Ok(u)) => u,
                    // Nothing to join it to: QEMU's client sees the close and tries again later.
                    Ok(Err(e)) => {
                        tracing::warn!("copy relay: {}", crate::copychannel::chain(&e));
                        continue;
                    }
                    Err(_) => continue,
                };
                let generation = {
                    let mut g = lock(&s);
                    g.health = RelayHealth::Joined;
                    g.releases
                };
                current = Some(AbortOnDrop(tokio::spawn(pair(down, upstream, stall, Arc::clone(&s), Arc::clone(&r), generation))));
            }
        });
        Ok(CopyRelay { socket: socket.to_path_buf(), creds, shared, released, task })
    }

    /// Tells `wake` each time the copy is found lost.
    #[must_use]
    pub fn waking(self, wake: Arc<tokio::sync::Notify>) -> CopyRelay {
        lock(&self.shared).wake = Some(wake);
        self
    }

    /// The unix socket QEMU's NBD client connects to.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Joins new connections to `upstream` (`host:port`) from now on.
    pub fn set_upstream(&self, upstream: &str) {
        let mut g = lock(&self.shared);
        g.upstream = upstream.to_string();
        // (As on a loss: the sums stand only for the copy as first reached.)
        g.delta = None;
    }

    /// Asks the copy server for the chunk sums of `export` (`len` bytes) and compares the writes
    /// to come with them: call it before the mirror starts. The sums, or why there are none
    /// (then every write is sent: a full copy).
    pub async fn compare_with_copy(&self, export: &str, len: u64) -> Result<crate::chunksums::ChunkSums, crate::copychannel::ChannelError> {
        let up = lock(&self.shared).upstream.clone();
        let sums = crate::copychannel::fetch_sums(&up, &self.creds, export, len, crate::copychannel::sums_limit(len)).await?;
        self.compare_with(&sums);
        Ok(sums)
    }

    /// Compares the writes to come with `sums`, the copy's chunk sums, taken after its server
    /// let every earlier write land: a write of bytes the copy holds is answered here.
    pub fn compare_with(&self, sums: &crate::chunksums::ChunkSums) {
        lock(&self.shared).delta = Some(delta::DeltaTable::new(sums));
    }

    /// Ends the comparison (the copy is in sync): every write is sent again. What it did, if
    /// one was on.
    pub fn end_delta(&self) -> Option<DeltaStats> {
        lock(&self.shared).delta.take().map(|t| t.stats())
    }

    /// What the resync by chunk sums under way did so far (none: none is).
    #[must_use]
    pub fn delta_stats(&self) -> Option<DeltaStats> {
        lock(&self.shared).delta.as_ref().map(delta::DeltaTable::stats)
    }

    /// Where the relay stands now.
    #[must_use]
    pub fn health(&self) -> RelayHealth {
        lock(&self.shared).health.clone()
    }

    /// Lets held writes go: closes QEMU's side (a joined connection too), so its writes to the
    /// other copy fail and the guest's complete on the local copy alone. Call it only once the
    /// other copy is committed as stale.
    pub fn release(&self) {
        let mut g = lock(&self.shared);
        g.releases += 1;
        g.health = RelayHealth::Released;
        drop(g);
        self.released.notify_waiters();
    }
}

/// Carries bytes both ways until either side ends, the copy server stops answering (then QEMU's
/// side is held open, forwarding nothing, until a release), or a release.
async fn pair(down: UnixStream, up: CopyStream, stall: Duration, shared: Arc<Mutex<Shared>>, released: Arc<tokio::sync::Notify>, generation: u64) {
    let is_released = |s: &Mutex<Shared>| lock(s).releases != generation;
    let (mut down_r, mut down_w) = down.into_split();
    let (mut up_r, mut up_w) = tokio::io::split(up);
    let (mut to_up, mut to_down) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut watch = nbdwatch::NbdWatch::default();
    // The rewriting of a resync by chunk sums, while one is on (or its own requests are).
    let mut splitter: Option<delta::Splitter> = None;
    // Bytes sent to the copy server with no answer since: when they were first left waiting.
    let mut waiting_since: Option<Instant> = None;
    let lost = loop {
        let stall_check = async {
            match waiting_since {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t + stall)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = down_r.read(&mut to_up) => match n {
                Ok(0) | Err(_) => {
                    // QEMU closed its side (the node was deleted, or QEMU ended).
                    let mut g = lock(&shared);
                    if g.releases == generation { g.health = RelayHealth::Idle; }
                    return;
                }
                Ok(n) => {
                    if splitter.is_none() && watch.in_transmission() && watch.between_frames() && lock(&shared).delta.is_some() {
                        splitter = Some(delta::Splitter::new(watch.reads_in_flight()));
                    }
                    let rewritten = match rewrite_up(&mut watch, splitter.as_mut(), &shared, &to_up[..n]) {
                        Ok(r) => r,
                        Err(why) => break why,
                    };
                    let up = rewritten.as_deref().unwrap_or(&to_up[..n]);
                    if !up.is_empty() {
                        // Flushed: a TLS stream holds written bytes until then.
                        let sent = async {
                            up_w.write_all(up).await?;
                            up_w.flush().await
                        };
                        match tokio::time::timeout(stall, sent).await {
                            // A goodbye gets no answer: nothing is left waiting for one.
                            Ok(Ok(())) if watch.ended_by_client() => waiting_since = None,
                            Ok(Ok(())) => { waiting_since.get_or_insert_with(Instant::now); }
                            Ok(Err(e)) => break format!("writing to the copy server failed: {e}"),
                            Err(_) => break format!("the copy server took no bytes for {stall:?}"),
                        }
                    }
                    if let Some(sp) = splitter.as_mut() {
                        let answers = sp.answers_now();
                        if !answers.is_empty() && down_w.write_all(&answers).await.is_err() {
                            return;
                        }
                        if sp.idle() && lock(&shared).delta.is_none() {
                            splitter = None;
                        }
                    }
                }
            },
            n = up_r.read(&mut to_down) => match n {
                // The server's close after the client's goodbye (whichever side's close the
                // relay reads first): the conversation ended, every write answered.
                Ok(0) if watch.ended_by_client() => {
                    let mut g = lock(&shared);
                    if g.releases == generation { g.health = RelayHealth::Idle; }
                    return;
                }
                Ok(0) => break "the copy server closed the connection".to_string(),
                Err(e) => break format!("reading from the copy server failed: {e}"),
                Ok(n) => {
                    // An error reply (or one that does not parse) is held, not passed on.
                    let rewritten = match rewrite_down(&mut watch, splitter.as_mut(), &to_down[..n]) {
                        Ok(r) => r,
                        Err(why) => break why,
                    };
                    waiting_since = None;
                    if down_w.write_all(rewritten.as_deref().unwrap_or(&to_down[..n])).await.is_err() {
                        return;
                    }
                }
            },
            () = stall_check => break format!("the copy server did not answer for {stall:?}"),
            () = released.notified() => return,
        }
        if is_released(&shared) {
            return;
        }
    };
    drop((up_r, up_w));
    {
        let mut g = lock(&shared);
        if g.releases != generation {
            return;
        }
        g.health = RelayHealth::Lost { since: Instant::now(), why: lost };
        // The sums stand for the copy this connection reached: the next may reach another
        // serving (even one made again, empty). From now on every write is sent.
        g.delta = None;
        if let Some(w) = &g.wake {
            w.notify_one();
        }
    }
    // Hold QEMU's side open, forwarding nothing, until the agent lets the writes go.
    let notified = released.notified();
    tokio::pin!(notified);
    if !is_released(&shared) {
        notified.await;
    }
    drop((down_r, down_w));
}

/// QEMU's bytes as they go to the copy server (`None`: as they came): the handshake's rewrite,
/// or the delta's, then followed by the watch. `Err`: the copy counts as lost.
fn rewrite_up(watch: &mut nbdwatch::NbdWatch, splitter: Option<&mut delta::Splitter>, shared: &Mutex<Shared>, data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    // (The client sends requests only once the server accepted its GO, which ended the
    // handshake: a read is all handshake or all transmission.)
    let rewritten = if !watch.in_transmission() {
        Some(watch.client_handshake(data)?)
    } else if let Some(sp) = splitter {
        Some(sp.client(data, lock(shared).delta.as_mut())?)
    } else {
        None
    };
    watch.client_bytes(rewritten.as_deref().unwrap_or(data))?;
    Ok(rewritten)
}

/// The copy server's bytes as they go to QEMU (`None`: as they came): followed by the watch
/// (an error reply is `Err`), the handshake's rewrite, or the delta's.
fn rewrite_down(watch: &mut nbdwatch::NbdWatch, splitter: Option<&mut delta::Splitter>, data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    if !watch.in_transmission() {
        return Ok(Some(watch.server_handshake(data)?));
    }
    watch.server_bytes(data)?;
    match splitter {
        Some(sp) => Ok(Some(sp.server(data)?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::TestDir;
    use tokio::io::AsyncReadExt;

    /// Reads from `s` for `within`: `Some(n)` bytes (0: closed), `None` if nothing came.
    async fn read_for(s: &mut UnixStream, within: Duration) -> Option<usize> {
        let mut b = [0u8; 64];
        tokio::time::timeout(within, s.read(&mut b)).await.ok().map(|r| r.unwrap_or(0))
    }

    /// A scratch directory `name`, and a copy server in it behind its gate on `ip` that takes
    /// the bytes and never answers.
    async fn silent_copy_server(name: &str, ip: &str) -> (TestDir, Arc<CopyCredentials>, crate::copychannel::CopyGate) {
        let dir = TestDir::new(name);
        let daemon = dir.path().join("d.sock");
        let silent = UnixListener::bind(&daemon).expect("bind");
        tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((mut s, _)) = silent.accept().await {
                let mut b = [0u8; 64];
                let _ = s.read(&mut b).await;
                kept.push(s);
            }
        });
        let creds = Arc::new(CopyCredentials::plain(tandem_core::wire::ClusterKey::new(b"the cluster secret, 16+ bytes").expect("key")));
        let gate = crate::copychannel::CopyGate::start(&format!("{ip}:0"), &daemon, Arc::clone(&creds), None).await.expect("gate");
        (dir, creds, gate)
    }

    /// A copy server that takes the bytes and never answers: the relay counts the copy lost
    /// after its stall and holds QEMU's connection — however long, and whatever else connects —
    /// until the release closes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_connection_stays_open_until_the_release_and_is_never_replaced() {
        let (dir, creds, gate) = silent_copy_server("tandem-copyrelay", "127.108.0.1").await;
        let wake = Arc::new(tokio::sync::Notify::new());
        let relay =
            CopyRelay::start(&dir.path().join("r.sock"), &gate.addr().to_string(), Duration::from_millis(200), creds).expect("relay").waking(Arc::clone(&wake));
        let chunk = crate::chunksums::MIN_CHUNK;
        relay.compare_with(&crate::chunksums::ChunkSums::new(chunk, chunk, vec![[0; crate::chunksums::SUM_LEN]]).expect("sums"));
        assert!(relay.delta_stats().is_some(), "comparing");
        let mut qemu = UnixStream::connect(relay.socket()).await.expect("connect");
        qemu.write_all(b"a write").await.expect("write");
        tokio::time::timeout(Duration::from_secs(5), async {
            while !matches!(relay.health(), RelayHealth::Lost { .. }) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the relay sees the silent copy lost");
        tokio::time::timeout(Duration::from_secs(1), wake.notified()).await.expect("the agent is woken when the copy is found lost");
        assert_eq!(relay.delta_stats(), None, "a lost copy ends the comparison: the next connection may reach another");
        let mut other = UnixStream::connect(relay.socket()).await.expect("connect");
        assert_eq!(read_for(&mut other, Duration::from_secs(2)).await, Some(0), "a new connection is closed while one is held");
        assert_eq!(read_for(&mut qemu, Duration::from_millis(500)).await, None, "the held connection stays open");
        assert!(matches!(relay.health(), RelayHealth::Lost { .. }));
        relay.release();
        assert_eq!(read_for(&mut qemu, Duration::from_secs(2)).await, Some(0), "released: closed");
    }

    /// A copy server that does the NBD handshake, reads one request, and closes: as a server
    /// answers the client's `NBD_CMD_DISC`.
    async fn closing_copy_server(name: &str, ip: &str) -> (TestDir, Arc<CopyCredentials>, crate::copychannel::CopyGate) {
        let dir = TestDir::new(name);
        let daemon = dir.path().join("d.sock");
        let server = UnixListener::bind(&daemon).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut greeting = b"NBDMAGICIHAVEOPT".to_vec();
                    greeting.extend_from_slice(&3u16.to_be_bytes());
                    s.write_all(&greeting).await?;
                    // The client's flags, then its GO (no payload here).
                    let mut b = [0u8; 4 + 16];
                    s.read_exact(&mut b).await?;
                    let mut ack = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
                    for word in [7u32, 1, 0] {
                        ack.extend_from_slice(&word.to_be_bytes());
                    }
                    s.write_all(&ack).await?;
                    let mut request = [0u8; 28];
                    s.read_exact(&mut request).await?;
                    Ok::<(), std::io::Error>(())
                });
            }
        });
        let creds = Arc::new(CopyCredentials::plain(tandem_core::wire::ClusterKey::new(b"the cluster secret, 16+ bytes").expect("key")));
        let gate = crate::copychannel::CopyGate::start(&format!("{ip}:0"), &daemon, Arc::clone(&creds), None).await.expect("gate");
        (dir, creds, gate)
    }

    /// QEMU's side of a handshake through the relay: its flags and GO sent, the server's
    /// greeting and acknowledgement read.
    async fn handshake(qemu: &mut UnixStream) {
        let mut go = vec![0u8; 4];
        go.extend_from_slice(b"IHAVEOPT");
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&0u32.to_be_bytes());
        qemu.write_all(&go).await.expect("flags and GO");
        let mut replies = [0u8; 18 + 20];
        tokio::time::timeout(Duration::from_secs(5), qemu.read_exact(&mut replies)).await.expect("in time").expect("greeting and GO's acknowledgement");
        assert_eq!(&replies[..8], b"NBDMAGIC");
    }

    /// A client that disconnects (`NBD_CMD_DISC`, which has no reply: the server closes) ends
    /// its connection; the copy is not lost, however the two closes race or however long
    /// QEMU takes to close its own side, and the next connection joins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_disconnects_does_not_lose_the_copy() {
        let (dir, creds, gate) = closing_copy_server("tandem-copyrelay-disc", "127.108.0.3").await;
        let relay = CopyRelay::start(&dir.path().join("r.sock"), &gate.addr().to_string(), Duration::from_millis(200), creds).expect("relay");
        for round in 0..3 {
            let mut qemu = UnixStream::connect(relay.socket()).await.expect("connect");
            handshake(&mut qemu).await;
            let mut disc = 0x2560_9513u32.to_be_bytes().to_vec();
            disc.extend_from_slice(&0u16.to_be_bytes());
            disc.extend_from_slice(&2u16.to_be_bytes());
            disc.extend_from_slice(&[0u8; 8 + 8 + 4]);
            qemu.write_all(&disc).await.expect("disconnect");
            // QEMU closes its side a while after: the server's close comes first.
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(!matches!(relay.health(), RelayHealth::Lost { .. }), "round {round}: a disconnect lost the copy: {:?}", relay.health());
            drop(qemu);
        }
    }

    /// A relay dropped (its VM killed) ends the connection it joins, held or not: a QEMU that
    /// lingers with bytes still in its socket gets none of them carried any more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_relay_ends_its_connections() {
        let (dir, creds, gate) = silent_copy_server("tandem-copyrelay-drop", "127.108.0.2").await;
        let relay = CopyRelay::start(&dir.path().join("r.sock"), &gate.addr().to_string(), Duration::from_secs(30), creds).expect("relay");
        let mut qemu = UnixStream::connect(relay.socket()).await.expect("connect");
        tokio::time::timeout(Duration::from_secs(5), async {
            while relay.health() != RelayHealth::Joined {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("joined to the copy server");
        assert_eq!(read_for(&mut qemu, Duration::from_millis(300)).await, None, "joined: open");
        drop(relay);
        assert_eq!(read_for(&mut qemu, Duration::from_secs(2)).await, Some(0), "dropped: closed");
    }
}
