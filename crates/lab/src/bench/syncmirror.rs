//! `tandem-lab bench sync-mirror`: what synchronous mirroring between sites costs a guest's
//! 4 KiB write-through writes, against the same disk unmirrored, at several one-way inter-site
//! delays. The real parts: QEMU (`-M none`), the disk's own copy behind its local copy server
//! (`qemu-storage-daemon` over a unix socket, as the agent serves it) — the unmirrored figure is
//! a raw image QEMU opens itself with `cache=none`, as a disk that is not mirrored —, the other
//! site's copy server (`qemu-storage-daemon` over NBD), the agent's relay and QEMU's
//! write-blocking mirror (`tandem_drivers::syncmirror`), with the lab's delay relay
//! (`delayrelay`) as the inter-site link. Beside each, the other copy alone — the copy server
//! over its own socket, then through the relay and its gate, then through the delay too — so
//! that what each hop costs is seen. Each write is QEMU's own (`qemu-io` through the
//! monitor), so the figures include the monitor's round trip, the same with and without the
//! mirror; a write is made stable either as a guest's fsync reaches a virtio-blk disk (a write,
//! then a flush: virtio-blk has no FUA) or with FUA (it completes once stable on every copy).
//!
//! For comparison only — the agent does not run it —, each delay also measures the two copies
//! written at once: QEMU's `quorum` of the local and the other copy, every write sent to both
//! together and complete once both have it (`vote-threshold` 2), put under the same disk while
//! nothing writes. It answers whether writing both copies in parallel, instead of the
//! write-blocking mirror's local-then-other, would bring the cost near the bare round trip; and
//! the other copy alone is the floor of any design, serial or parallel.

use crate::delayrelay::DelayRelay;
use crate::qemuproc::QemuProcess;
use anyhow::{anyhow, Result};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_drivers::copychannel::CopyCredentials;
use tandem_drivers::copyrelay::CopyRelay;
use tandem_drivers::launcher::Launcher;
use tandem_drivers::localcopy::LocalCopyServer;
use tandem_drivers::qmp::Qmp;
use tandem_drivers::sitecopy::{export_name, CopyServer, CopyServerConfig};
use tandem_drivers::syncmirror::{self, MirrorSample, RemoteCopy};

pub(super) const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const DISK_BYTES: u64 = 64 << 20;
/// The disk's format node and the local copy's NBD node under it (the quorum comparison puts
/// a quorum between them).
const FORMAT_NODE: &str = "bench-disk0";
const LOCAL_NODE: &str = "bench-local0";
/// The copy server's address (loopback net 106).
const COPY_IP: &str = "127.106.0.1";
const COPY_PORT: u16 = 10_941;

/// The copy channel's credentials of a bench or test outside a cluster: a key of its own, no
/// TLS.
pub fn copy_credentials() -> Result<Arc<CopyCredentials>> {
    let key = tandem_core::wire::ClusterKey::new(b"tandem lab copy channel key").map_err(|e| anyhow!("{e}"))?;
    Ok(Arc::new(CopyCredentials::plain(key)))
}

/// Runs the bench: `writes` writes unmirrored, then as many mirrored at each one-way delay.
pub fn run(writes: usize, delays_ms: &[u64]) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tandem-bench-sync-mirror-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(measure(&dir, writes, delays_ms));
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// QEMU with `disk0` on the local copy server at `served` (as the agent runs a mirrored disk's
/// own copy) and node `direct` on the image `direct` opened by QEMU itself (as an unmirrored
/// disk is).
async fn launch(dir: &Path, served: &Path, direct: &Path) -> Result<QemuProcess> {
    let qmp_path = dir.join("q.qmp");
    let mut cmd = std::process::Command::new("qemu-system-x86_64");
    let nbd = format!("file.driver=nbd,file.server.type=unix,file.server.path={},file.export={}", served.display(), tandem_drivers::localcopy::LOCAL_EXPORT);
    cmd.args(["-M", "none", "-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())])
        .args(["-drive", &format!("{nbd},if=none,id=disk0,format=raw,cache=none,node-name={FORMAT_NODE},file.node-name={LOCAL_NODE}")])
        .args(["-drive", &format!("file={},if=none,id=direct,format=raw,cache=none,aio=native", direct.display())]);
    QemuProcess::spawn(cmd, &qmp_path, QMP_TIMEOUT).await
}

/// A mirror bench's running parts, dropped in this order: QEMU with `disk0` on the local copy
/// server and node `direct` opened by itself (see [`launch`]), the other site's copy server
/// (nothing served yet), the local copy server, the launcher.
pub(super) struct BenchParts {
    pub(super) vm: QemuProcess,
    pub(super) server: CopyServer,
    pub(super) credentials: Arc<CopyCredentials>,
    _local_server: LocalCopyServer,
    _launcher: Launcher,
}

impl BenchParts {
    /// Starts them: `local` behind its local copy server, `direct` opened by QEMU, the copy
    /// server on `copy_ip:copy_port`.
    pub(super) async fn start(dir: &Path, local: &Path, direct: &Path, copy_ip: &str, copy_port: u16) -> Result<BenchParts> {
        let launcher = Launcher::new()?;
        let claim = tandem_drivers::localcopy::claim(local, tandem_drivers::localcopy::ClaimKind::Sole).await?;
        let local_server = LocalCopyServer::start("qemu-storage-daemon", &launcher, local, &dir.join("local.nbd"), claim).await?;
        let credentials = copy_credentials()?;
        let cfg = CopyServerConfig {
            binary: "qemu-storage-daemon".into(),
            run_dir: dir.to_path_buf(),
            host_ip: copy_ip.into(),
            port: copy_port,
            credentials: Arc::clone(&credentials),
        };
        let server = CopyServer::start(&cfg, &launcher).await?;
        let vm = launch(dir, local_server.socket(), direct).await?;
        Ok(BenchParts { vm, server, credentials, _local_server: local_server, _launcher: launcher })
    }

    /// Mirrors `disk0` into `export` through a relay of its own (socket `relay{k}.sock` in
    /// `dir`) to `link`, which delays `delay` each way; the job capped at `speed` bytes/s. The
    /// relay must live as long as the mirror.
    pub(super) async fn attach_through(&self, dir: &Path, k: usize, link: &str, delay: Duration, export: &str, speed: Option<u64>) -> Result<CopyRelay> {
        let stall = tandem_drivers::copyrelay::DEFAULT_STALL.max(delay * 4);
        let relay = CopyRelay::start(&dir.join(format!("relay{k}.sock")), link, stall, Arc::clone(&self.credentials))?;
        let copy = RemoteCopy { disk: 0, relay: relay.socket().to_path_buf(), export: export.to_string(), granularity: None, speed };
        syncmirror::attach("bench", &self.vm.qmp, QMP_TIMEOUT, &copy).await?;
        Ok(relay)
    }
}

/// How a bench's 4 KiB write asks to be stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WritePattern {
    /// A write with FUA: complete once stable.
    Fua,
    /// A write, then a flush: what a guest's `fsync` (or `O_DSYNC` write) sends to a virtio-blk
    /// disk, which has no FUA.
    WriteThenFlush,
    /// A write alone: stable on nothing in particular.
    Plain,
}

impl WritePattern {
    fn describe(self) -> &'static str {
        match self {
            WritePattern::Fua => "with FUA",
            WritePattern::WriteThenFlush => "as a guest's fsync (write, then flush)",
            WritePattern::Plain => "plain",
        }
    }
}

/// `n` write-through 4 KiB writes through QEMU's block layer; each one's latency, ms.
async fn writes(q: &Qmp, n: usize) -> Result<Vec<f64>> {
    writes_to(q, "disk0", n).await
}

/// The same to `node` (a drive or a node name).
async fn writes_to(q: &Qmp, node: &str, n: usize) -> Result<Vec<f64>> {
    writes_as(q, node, n, WritePattern::Fua).await
}

/// `n` 4 KiB writes to `node` as `pattern` says (the flush, when there is one, counted in);
/// each one's latency, ms.
pub(super) async fn writes_as(q: &Qmp, node: &str, n: usize, pattern: WritePattern) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    let flags = if pattern == WritePattern::Fua { "-f " } else { "" };
    for i in 0..n {
        let offset = (i % 4096) * 4096;
        let mut lines = vec![format!("qemu-io {node} \"write {flags}-P 0x5a {offset} 4k\"")];
        if pattern == WritePattern::WriteThenFlush {
            lines.push(format!("qemu-io {node} flush"));
        }
        let t = Instant::now();
        for line in lines {
            let answer = q.execute("human-monitor-command", json!({"command-line": line}), QMP_TIMEOUT).await?;
            if answer.as_str().is_some_and(|s| s.contains("error") || s.contains("failed")) {
                return Err(anyhow!("qemu-io: {answer}"));
            }
        }
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// Measures `n` writes of each pattern to `node`, after a few to warm up.
async fn spreads(q: &Qmp, node: &str, n: usize, patterns: &[WritePattern]) -> Result<Vec<Spread>> {
    let _ = writes_as(q, node, 20, WritePattern::Fua).await?;
    let mut out = Vec::with_capacity(patterns.len());
    for p in patterns {
        out.push(summary(&mut writes_as(q, node, n, *p).await?));
    }
    Ok(out)
}

/// One figure against its unmirrored counterpart and the link's round trips (nominal, then
/// measured; none at no delay).
fn against(what: &str, (med, min, max): Spread, unmirrored: f64, rtt: f64, measured: f64) -> String {
    let extra = med - unmirrored;
    let share = if rtt > 0.0 {
        format!("; {:.0} % of the round trip, {:.0} % of the measured one", 100.0 * extra / rtt, 100.0 * extra / measured.max(0.001))
    } else {
        String::new()
    };
    format!("    {what}: {med:.2} ms ({min:.2}-{max:.2}); {extra:.2} ms over unmirrored{share}")
}

/// The median round trip of `n` 4 KiB pings through a delay relay of `delay` each way to an echo
/// server on the copy server's address, ms.
async fn link_round_trip(delay: Duration, n: usize) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = tokio::net::TcpListener::bind(format!("{COPY_IP}:0")).await?;
    let echo_addr = echo.local_addr()?;
    let server = tokio::spawn(async move {
        if let Ok((mut s, _)) = echo.accept().await {
            let _ = s.set_nodelay(true);
            let mut b = vec![0u8; 4096];
            while s.read_exact(&mut b).await.is_ok() {
                if s.write_all(&b).await.is_err() {
                    break;
                }
            }
        }
    });
    let link = DelayRelay::start(&format!("{COPY_IP}:0"), &echo_addr.to_string(), delay).await?;
    let mut c = tokio::net::TcpStream::connect(link.addr).await?;
    c.set_nodelay(true)?;
    let mut b = vec![0x5au8; 4096];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n + 20 {
        let t = Instant::now();
        c.write_all(&b).await?;
        c.read_exact(&mut b).await?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    server.abort();
    Ok(summary(&mut out[20..]).0)
}

/// `n` write-through writes to the other copy alone, as an NBD node of the bench's QEMU on
/// `server`: median, min, max.
async fn other_copy_alone(q: &Qmp, export: &str, server: serde_json::Value, n: usize) -> Result<(f64, f64, f64)> {
    let node = json!({"driver": "raw", "node-name": "other", "file": {"driver": "nbd", "export": export, "server": server}});
    q.execute("blockdev-add", node, QMP_TIMEOUT).await?;
    let _ = writes_to(q, "other", 20).await?;
    let measured = writes_to(q, "other", n).await;
    q.execute("blockdev-del", json!({"node-name": "other"}), QMP_TIMEOUT).await?;
    Ok(summary(&mut measured?))
}

/// The disk's format node reopened onto `file`.
async fn reopen_disk_onto(q: &Qmp, file: &str) -> Result<()> {
    let options = json!([{"driver": "raw", "node-name": FORMAT_NODE, "file": file, "read-only": false, "discard": "ignore",
        "cache": {"direct": true, "no-flush": false}}]);
    q.execute("blockdev-reopen", json!({"options": options}), QMP_TIMEOUT).await?;
    Ok(())
}

/// `n` writes with the disk on a quorum of its local copy and the other copy at `server`
/// (every write to both at once, complete once both have it) made stable as a guest's fsync,
/// then `n` plain ones (no flush at all). The quorum cannot take the local copy's node from
/// under the disk directly (each parent keeps the other from writing it), so the disk passes
/// through a placeholder while nothing writes; a read-only holder keeps the local node alive
/// meanwhile.
async fn both_at_once(q: &Qmp, export: &str, server: serde_json::Value, n: usize) -> Result<(Spread, Spread)> {
    let other = json!({"driver": "nbd", "node-name": "bench-other", "export": export, "server": server,
        // The copy server's export is write-through: each write is stable once answered.
        "cache": {"no-flush": true}});
    q.execute("blockdev-add", other, QMP_TIMEOUT).await?;
    let holder = json!({"driver": "raw", "node-name": "bench-holder", "file": LOCAL_NODE, "read-only": true});
    q.execute("blockdev-add", holder, QMP_TIMEOUT).await?;
    let placeholder = json!({"driver": "null-co", "node-name": "bench-placeholder", "size": DISK_BYTES});
    q.execute("blockdev-add", placeholder, QMP_TIMEOUT).await?;
    let quorum = json!({"driver": "quorum", "node-name": "bench-both", "children": [LOCAL_NODE, "bench-other"],
        "vote-threshold": 2, "read-pattern": "fifo"});
    reopen_disk_onto(q, "bench-placeholder").await?;
    q.execute("blockdev-add", quorum, QMP_TIMEOUT).await?;
    reopen_disk_onto(q, "bench-both").await?;
    let measured = spreads(q, "disk0", n, &[WritePattern::WriteThenFlush, WritePattern::Plain]).await;
    reopen_disk_onto(q, "bench-placeholder").await?;
    q.execute("blockdev-del", json!({"node-name": "bench-both"}), QMP_TIMEOUT).await?;
    reopen_disk_onto(q, LOCAL_NODE).await?;
    for node in ["bench-placeholder", "bench-holder", "bench-other"] {
        q.execute("blockdev-del", json!({"node-name": node}), QMP_TIMEOUT).await?;
    }
    match measured?.as_slice() {
        [synced, plain] => Ok((*synced, *plain)),
        _ => Err(anyhow!("the quorum's figures are missing")),
    }
}

/// Median, min, max, ms.
type Spread = (f64, f64, f64);

/// The patterns measured unmirrored, in this order (the mirrored disk: the first two).
const PATTERNS: [WritePattern; 3] = [WritePattern::WriteThenFlush, WritePattern::Fua, WritePattern::Plain];

fn summary(ms: &mut [f64]) -> Spread {
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0], ms[ms.len() - 1])
}

async fn measure(dir: &Path, n: usize, delays_ms: &[u64]) -> Result<()> {
    let (local, remote, unmirrored) = (dir.join("site-a.img"), dir.join("site-b.img"), dir.join("unmirrored.img"));
    for image in [&local, &remote, &unmirrored] {
        std::fs::File::create(image).and_then(|f| f.set_len(DISK_BYTES))?;
    }
    let parts = BenchParts::start(dir, &local, &unmirrored, COPY_IP, COPY_PORT).await?;
    let (vm, server, credentials) = (&parts.vm, &parts.server, &parts.credentials);
    let export = export_name("bench", 0);
    server.serve(&export, &remote).await?;
    let unmirrored = spreads(&vm.qmp, "direct", n, &PATTERNS).await?;
    let [fsync_base, fua_base, plain_base] = [unmirrored[0].0, unmirrored[1].0, unmirrored[2].0];
    println!("4 KiB writes, {n} each (QEMU's own, through qemu-io in its monitor; medians (min-max)):");
    for (pattern, (med, min, max)) in PATTERNS.iter().zip(&unmirrored) {
        println!("  unmirrored, {}: {med:.2} ms ({min:.2}-{max:.2})", pattern.describe());
    }
    // A mirrored disk's own copy is served by a local copy server (so that a hang can be cut):
    // one more hop, here unmirrored.
    let _ = writes(&vm.qmp, 20).await?;
    let (own, omin, omax) = summary(&mut writes(&vm.qmp, n).await?);
    println!("  unmirrored with FUA, behind its local copy server: {own:.2} ms ({omin:.2}-{omax:.2}); {:.2} ms over opened directly", own - fua_base);
    // Where the other copy's time goes, hop by hop, with no delay: the copy server alone (its
    // unix socket), then through its gate (TCP, the handshake), then through the relay too.
    let direct = json!({"type": "unix", "path": dir.join("copy-server.nbd").display().to_string()});
    let relay0 = CopyRelay::start(&dir.join("relay-direct.sock"), server.endpoint(), tandem_drivers::copyrelay::DEFAULT_STALL, Arc::clone(credentials))?;
    let through_relay = json!({"type": "unix", "path": relay0.socket().display().to_string()});
    for (what, at) in [("the copy server alone (its unix socket)", direct), ("through the relay and the gate", through_relay)] {
        let (alone, amin, amax) = other_copy_alone(&vm.qmp, &export, at, n).await?;
        println!("  the other copy, {what}: {alone:.2} ms ({amin:.2}-{amax:.2})");
    }
    drop(relay0);
    for (k, d) in delays_ms.iter().enumerate() {
        let delay = Duration::from_millis(*d);
        let link = DelayRelay::start(&format!("{COPY_IP}:0"), &format!("{COPY_IP}:{COPY_PORT}"), delay).await?;
        let relay = parts.attach_through(dir, k, &link.addr.to_string(), delay, &export, None).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while syncmirror::sample("bench", &vm.qmp, QMP_TIMEOUT, 0).await? != MirrorSample::InSync {
            if Instant::now() >= deadline {
                return Err(anyhow!("the mirror at {d} ms never got in sync"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mirrored = spreads(&vm.qmp, "disk0", n, &PATTERNS[..2]).await?;
        syncmirror::detach("bench", &vm.qmp, QMP_TIMEOUT, 0).await?;
        // The link's own round trip as the lab makes it (a 4 KiB ping through a delay relay of
        // its own: its timing is close, not exact): the goal is judged against this too.
        let measured = link_round_trip(delay, n).await?;
        let rtt = 2.0 * *d as f64;
        println!("  {d} ms one-way ({rtt:.0} ms round trip; the link's measured round trip {measured:.2} ms):");
        println!("{}", against("mirrored, as a guest's fsync", mirrored[0], fsync_base, rtt, measured));
        println!("{}", against("mirrored, with FUA", mirrored[1], fua_base, rtt, measured));
        // The other copy alone, through the same relay, gate and delay.
        let at = json!({"type": "unix", "path": relay.socket().display().to_string()});
        let alone = other_copy_alone(&vm.qmp, &export, at.clone(), n).await?;
        println!("{}", against("the other copy alone, with FUA (the floor of any design)", alone, fua_base, rtt, measured));
        // QEMU's quorum passes no FUA and flushes its children one after the other: the other
        // copy's flush is a second round trip, though its export is write-through and so has
        // nothing to flush. Its plain writes show the parallel write alone.
        let (synced, plain) = both_at_once(&vm.qmp, &export, at, n).await?;
        println!("{}", against("both copies at once (QEMU quorum, for comparison), as a guest's fsync", synced, fsync_base, rtt, measured));
        println!("{}", against("both copies at once, plain writes (no flush; against unmirrored plain)", plain, plain_base, rtt, measured));
    }
    Ok(())
}
