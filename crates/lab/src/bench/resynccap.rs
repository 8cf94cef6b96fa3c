//! `tandem-lab bench resync-cap`: what a mirror's first copy (the same as a resync after a
//! site's return) costs the guest's writes meanwhile, uncapped and under `[mirror]
//! resync_max_mib_s` (QEMU's job `speed`). The parts of `bench sync-mirror`: QEMU (`-M none`),
//! the disk's own copy behind its local copy server, the other site's copy server, the agent's
//! relay, the lab's delay relay as the link. The disk is full of data (no zero range for the
//! mirror to skip), the other copy empty; each 4 KiB write is made stable as a guest's fsync
//! reaches a virtio-blk disk (a write, then a flush), one after the other while the copy goes,
//! then as many once the copy is in sync for reference.

use super::syncmirror::{writes_as, BenchParts, WritePattern, QMP_TIMEOUT};
use crate::delayrelay::DelayRelay;
use anyhow::{anyhow, Result};
use std::path::Path;
use std::time::{Duration, Instant};
use tandem_drivers::qmp::Qmp;
use tandem_drivers::sitecopy::export_name;
use tandem_drivers::syncmirror::{self, MirrorSample};

/// The copy server's address (loopback net 107).
const COPY_IP: &str = "127.107.0.1";
const COPY_PORT: u16 = 10_945;

/// What to measure.
#[derive(Clone, Copy, Debug)]
pub struct ResyncCapBench {
    /// Writes measured in each phase, at most (fewer when the copy ends first).
    pub writes: usize,
    /// The disk, MiB.
    pub disk_mib: u64,
    /// The cap, MiB/s.
    pub cap_mib_s: u64,
    /// The link's one-way delay, ms.
    pub delay_ms: u64,
}

/// Runs the bench: the first copy uncapped, then capped, each from an empty other copy.
pub fn run(b: ResyncCapBench) -> Result<()> {
    anyhow::ensure!(b.writes > 0 && b.disk_mib >= 16 && b.cap_mib_s > 0, "writes, a disk of 16 MiB or more and a cap are needed");
    let dir = std::env::temp_dir().join(format!("tandem-bench-resync-cap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(measure(&dir, b));
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Latencies while the mirror copies: one write after the other until `n` or the copy's end;
/// and how long the copy took.
async fn while_copying(q: &Qmp, n: usize) -> Result<(Vec<f64>, Duration)> {
    let started = Instant::now();
    let mut out = Vec::with_capacity(n);
    loop {
        match syncmirror::sample("bench", q, QMP_TIMEOUT, 0).await? {
            MirrorSample::InSync => return Ok((out, started.elapsed())),
            MirrorSample::Copying { .. } if out.len() < n => out.extend(writes_as(q, "disk0", 1, WritePattern::WriteThenFlush).await?),
            MirrorSample::Copying { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
            other => return Err(anyhow!("the mirror left its first copy: {other:?}")),
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "the first copy took over 10 minutes");
    }
}

/// Median, 90th percentile and max, ms, of `v` (sorted here).
fn spread(v: &mut [f64]) -> String {
    if v.is_empty() {
        return "no write fell inside the copy".into();
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!("median {:.2} ms, p90 {:.2} ms, max {:.2} ms ({} writes)", at(0.5), at(0.9), at(1.0), v.len())
}

async fn measure(dir: &Path, b: ResyncCapBench) -> Result<()> {
    let bytes = b.disk_mib << 20;
    let (local, remote, direct) = (dir.join("site-a.img"), dir.join("site-b.img"), dir.join("direct.img"));
    // Data everywhere, different in every 4 KiB.
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&local)?);
        let mut block = [0u8; 4096];
        for i in 0..bytes / 4096 {
            block[..8].copy_from_slice(&i.to_le_bytes());
            block[8..].fill((i % 251) as u8 | 1);
            f.write_all(&block)?;
        }
        f.flush()?;
    }
    std::fs::File::create(&direct)?.set_len(1 << 20)?;
    let parts = BenchParts::start(dir, &local, &direct, COPY_IP, COPY_PORT).await?;
    let (vm, server) = (&parts.vm, &parts.server);
    let export = export_name("bench", 0);
    let delay = Duration::from_millis(b.delay_ms);
    let link = DelayRelay::start(&format!("{COPY_IP}:0"), &format!("{COPY_IP}:{COPY_PORT}"), delay).await?;
    println!("first copy of a {} MiB disk full of data, {} ms each way; 4 KiB writes as a guest's fsync meanwhile:", b.disk_mib, b.delay_ms);
    for (k, cap) in [None, Some(b.cap_mib_s << 20)].into_iter().enumerate() {
        // An empty other copy each time: the whole disk crosses.
        let _ = std::fs::remove_file(&remote);
        std::fs::File::create(&remote)?.set_len(bytes)?;
        server.serve(&export, &remote).await?;
        let _relay = parts.attach_through(dir, k, &link.addr.to_string(), delay, &export, cap).await?;
        let (mut during, took) = while_copying(&vm.qmp, b.writes).await?;
        let mut after = writes_as(&vm.qmp, "disk0", b.writes, WritePattern::WriteThenFlush).await?;
        syncmirror::detach("bench", &vm.qmp, QMP_TIMEOUT, 0).await?;
        server.withdraw(&export).await?;
        let what = cap.map_or_else(|| "uncapped".to_string(), |c| format!("capped at {} MiB/s", c >> 20));
        println!("  {what}: the copy took {:.2} s ({:.1} MiB/s)", took.as_secs_f64(), b.disk_mib as f64 / took.as_secs_f64().max(0.001));
        println!("    writes during the copy: {}", spread(&mut during));
        println!("    writes once in sync:    {}", spread(&mut after));
    }
    Ok(())
}
